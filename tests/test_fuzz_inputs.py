"""Fuzzing the inputs: broken annotation files and configs fail with an error naming the file.

A seeded generator breaks the synthetic dataset's annotation files (every format a loader
reads) and the toy configs in the ways real files break: cut off mid-write, a field of the
wrong type, a field missing, an entry or the whole document of the wrong kind, odd unicode,
an extra field. Each broken file goes through what a task script does with it (create_dataset,
then reading items; load_config and the config checks). Every failure must be a DataError or
ConfigError whose message names the broken file, never another exception; breakage of a field
the loader reads must fail, never pass silently; harmless changes (an extra field, unicode
text) must load.
"""
import copy
import json
import random
import shutil
from pathlib import Path

import pytest

import data
from conftest import REPO
from data.utils import DataError
from data_fixtures import data_config, synthetic  # noqa: F401 (fixture)
from engine.config import ENGINE_DEFAULTS, VALUE_RULES, ConfigError, check_config, load_config, save_config

# file -> (the datasets that read it, the fields each entry must have, read by the loader)
FILES = {
    'coco_karpathy_train.json': (['caption_coco', 'retrieval_coco'], ['image', 'caption', 'image_id']),
    'coco_karpathy_val.json': (['caption_coco', 'retrieval_coco'], ['image', 'caption']),
    'coco_karpathy_test.json': (['retrieval_coco'], ['image', 'caption']),
    'flickr30k_train.json': (['retrieval_flickr'], ['image', 'caption', 'image_id']),
    'flickr30k_test.json': (['retrieval_flickr'], ['image', 'caption']),
    'vqa_train.json': (['vqa'], ['question_id', 'question', 'answer', 'image', 'dataset']),
    'vg_qa.json': (['vqa'], ['question_id', 'question', 'answer', 'image', 'dataset']),
    'vqa_test.json': (['vqa'], ['question_id', 'question', 'image']),
    'nlvr_train.json': (['nlvr'], ['images', 'sentence', 'label']),
    'nlvr_dev.json': (['nlvr'], ['images', 'sentence', 'label']),
    'nocaps_val.json': (['nocaps'], ['image', 'img_id']),
    'msrvtt_test.jsonl': (['retrieval_msrvtt'], ['clip_name', 'caption']),
    # your own data (dataset: custom), written by the test from the Karpathy files
    'custom.jsonl': (['retrieval_custom'], ['image', 'caption']),
    'custom.json': (['retrieval_custom', 'caption_custom'], ['image', 'caption']),
}
CUSTOM_SOURCES = {'custom.jsonl': 'coco_karpathy_train.json', 'custom.json': 'coco_karpathy_val.json'}
WRONG_VALUES = [7, 2.5, None, True, [], {}, {'a': 1}, [1, 2]]
ODD_TEXT = ['caf\u00e9 \u202e\u0301 \U0001F600', '\u3042\u3044\u3046 red circle', 'tab\tand\u00a0nbsp']
CASES_PER_FILE = 12


def read_entries(path):
    text = path.read_text(encoding='utf-8')
    if path.suffix == '.jsonl':
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def write_entries(path, entries):
    if path.suffix == '.jsonl':
        path.write_text(''.join(json.dumps(entry) + '\n' for entry in entries), encoding='utf-8')
    else:
        path.write_text(json.dumps(entries), encoding='utf-8')


def cut_off(path, rng):
    """The file cut mid-write: inside a JSON value (a .jsonl inside one of its lines)."""
    text = path.read_text(encoding='utf-8')
    if path.suffix == '.jsonl':
        starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == '\n'][:-1]
        start = rng.choice(starts)
        end = text.index('\n', start)
        return text[:rng.randrange(start + 1, end - 1)]
    return text[:rng.randrange(1, len(text.rstrip()) - 1)]


def breakages(path, fields, rng):
    """(description, must_fail, write(path)) for CASES_PER_FILE seeded breakages of one file."""
    entries = read_entries(path)
    cases = []
    for _ in range(CASES_PER_FILE):
        kind = rng.choice(['cut', 'wrong_type', 'missing', 'bad_entry', 'bad_document', 'odd_text', 'extra'])
        index = rng.randrange(len(entries))
        field = rng.choice(fields)
        broken = copy.deepcopy(entries)
        if kind == 'cut':
            text = cut_off(path, rng)
            cases.append((f'cut to {len(text)} characters', True, lambda p, t=text: p.write_text(t, encoding='utf-8')))
            continue
        if kind == 'wrong_type':
            original = broken[index][field]
            value = rng.choice([v for v in WRONG_VALUES if type(v) is not type(original)])
            broken[index][field] = value
            description, must_fail = f'entry {index} {field}={value!r}', True
        elif kind == 'missing':
            del broken[index][field]
            description, must_fail = f'entry {index} without {field}', True
        elif kind == 'bad_entry':
            broken[index] = rng.choice([5, 'text', [1, 2], None])
            description, must_fail = f'entry {index} = {broken[index]!r}', True
        elif kind == 'bad_document':
            if path.suffix == '.jsonl':  # a .jsonl line holding a list is the jsonl form of this
                broken = [[entry] for entry in broken]
            else:
                broken = rng.choice([{'entries': broken}, 42, 'text'])
            description, must_fail = 'a document of the wrong kind', True
        elif kind == 'odd_text':
            text_fields = [f for f in fields if isinstance(broken[index][f], str) and f in ('caption', 'question', 'sentence')]
            if not text_fields:
                continue
            broken[index][text_fields[0]] = rng.choice(ODD_TEXT)
            description, must_fail = f'entry {index} {text_fields[0]} in odd unicode', False
        else:
            broken[index]['unexpected_field'] = 'x'
            description, must_fail = f'entry {index} with an extra field', False
        cases.append((description, must_fail, lambda p, b=broken: write_entries(p, b)))
    return cases


def load_everything(name, config):
    """What a task script does with its data before and while training: every split, a few items."""
    splits = data.create_dataset(name, config)
    for split in (splits if isinstance(splits, (tuple, list)) else [splits]):
        for index in range(min(len(split), 3)):
            split[index]
        for index in range(max(0, len(split) - 2), len(split)):
            split[index]


@pytest.mark.parametrize('filename', sorted(FILES))
def test_broken_annotation_files_fail_naming_the_file(synthetic, tmp_path, filename):  # noqa: F811
    names, fields = FILES[filename]
    rng = random.Random(f'fuzz {filename}')
    ann_root = tmp_path / 'annotation'
    shutil.copytree(synthetic['ann_root'], ann_root)
    for custom, source in CUSTOM_SOURCES.items():
        entries = [{'image': e['image'], 'caption': e['caption']} for e in read_entries(ann_root / source)]
        write_entries(ann_root / custom, entries)
    path = ann_root / filename
    pristine = path.read_bytes()
    config = data_config(synthetic, ann_root=str(ann_root), train_file=str(ann_root / 'custom.jsonl'),
                         val_file=str(ann_root / 'custom.json'), test_file=str(ann_root / 'custom.json'))
    checked = loaded = 0
    for description, must_fail, write in breakages(path, fields, rng):
        path.write_bytes(pristine)
        write(path)
        for name in names:
            try:
                load_everything(name, config)
            except DataError as error:
                assert filename in str(error), f'{filename} {description}: {name}: the error does not name the file: {error}'
            except Exception as error:  # noqa: BLE001 (the point of the test)
                pytest.fail(f'{filename} {description}: {name} raised {type(error).__name__}: {error}')
            else:
                assert not must_fail, f'{filename} {description}: {name} loaded it silently'
                loaded += 1
            checked += 1
    # the generator broke the file in ways that must fail, and made harmless changes too
    assert checked >= CASES_PER_FILE // 2 and checked - loaded >= CASES_PER_FILE // 3


TOY_CONFIGS = ['retrieval_coco', 'caption_coco', 'vqa', 'nlvr', 'pretrain']


@pytest.mark.parametrize('name', TOY_CONFIGS)
def test_broken_configs_fail_naming_the_file(tmp_path, name):
    rng = random.Random(f'fuzz config {name}')
    source = REPO / 'configs' / 'shapes' / f'{name}.yaml'
    original = load_config(str(source))
    numeric = [key for key in original if key in VALUE_RULES]
    assert numeric
    for case in range(15):
        path = tmp_path / f'{name}_{case}.yaml'
        kind = rng.choice(['cut', 'wrong_value', 'not_a_mapping', 'bad_yaml'])
        if kind == 'cut':
            text = source.read_text()
            path.write_text(text[:rng.randrange(1, len(text))])
            must_fail = False  # a cut may still parse (then a missing key or value is caught below, or nothing is lost)
        elif kind == 'wrong_value':
            key = rng.choice(numeric)
            value = rng.choice(['abc', -1, -0.5, [], {'a': 1}, True, None, '1e-4x'])
            config = dict(original, **{key: value})
            save_config(config, str(tmp_path / 'saved'))
            path.write_text((tmp_path / 'saved' / 'config.yaml').read_text())
            integer, lowest, allowed, highest = VALUE_RULES[key]
            must_fail = not (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and (value > lowest or (allowed and value == lowest)))
        elif kind == 'not_a_mapping':
            path.write_text(rng.choice(['- a\n- b\n', '42\n', 'just text\n']))
            must_fail = True
        else:
            path.write_text(rng.choice(['a: [1, 2\n', 'key: "unclosed\n', 'a:\n\t- tab\n', ': :\n']))
            must_fail = True
        try:
            config = load_config(str(path), defaults=ENGINE_DEFAULTS)
            check_config(config, str(path))
        except ConfigError as error:
            assert str(path) in str(error), f'{kind}: the error does not name the file: {error}'
        except Exception as error:  # noqa: BLE001
            pytest.fail(f'{name} case {case} ({kind}): {type(error).__name__}: {error}')
        else:
            assert not must_fail, f'{name} case {case} ({kind}) passed silently: {path.read_text()[:200]}'


def test_the_generator_is_seeded(synthetic, tmp_path):  # noqa: F811
    path = Path(synthetic['ann_root']) / 'coco_karpathy_train.json'
    first = [d for d, _, _ in breakages(path, FILES[path.name][1], random.Random(1))]
    assert first == [d for d, _, _ in breakages(path, FILES[path.name][1], random.Random(1))]

"""Your own image-text data (`dataset: custom`, data/custom_dataset.py) for retrieval and captioning.

The synthetic shapes data written out as a user would (a CSV, JSON, JSONL or a folder with
sidecar captions) must give the datasets the Karpathy files give, and train exactly as they
do: a retrieval run from the CSV writes the log of the run from the Karpathy files, number for
number (that run learns: test_retrieval_learning.py). Bad rows get errors naming file and row.
"""
import csv
import json
import os
import shutil
from pathlib import Path

import pytest

import data
import train_caption
import train_retrieval
from conftest import REPO
from data.coco_karpathy_dataset import coco_image_id
from data.custom_dataset import load_splits, read_rows
from data.utils import DataError
from data_fixtures import data_config, synthetic  # noqa: F401 (fixture)
from engine import preflight
from engine.config import ConfigError, load_config
from metrics import caption_eval
from script_runner import one_thread, read_json_lines, script_config

pytestmark = pytest.mark.slow  # trains toy models or runs whole scripts (make test-fast skips it)

TOY_RETRIEVAL = REPO / 'configs' / 'shapes' / 'retrieval_coco.yaml'
TOY_CAPTION = REPO / 'configs' / 'shapes' / 'caption_coco.yaml'
SHAPES = REPO / 'datasets' / 'shapes'


def karpathy(ann_root, split):
    return json.loads((ann_root / f'coco_karpathy_{split}.json').read_text())


def write_csv(path, rows, header=('image', 'caption')):
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def pairs(entries):
    """(image, caption) rows of Karpathy entries (a caption or a list of them)."""
    return [(e['image'], c) for e in entries for c in (e['caption'] if isinstance(e['caption'], list) else [e['caption']])]


def write_user_files(ann_root, folder):
    """The Karpathy splits as a user's train.csv, val.json, test.jsonl (paths relative to image_root)."""
    folder.mkdir(exist_ok=True)
    train = write_csv(folder / 'train.csv', pairs(karpathy(ann_root, 'train')))
    (folder / 'val.json').write_text(json.dumps(karpathy(ann_root, 'val')))
    (folder / 'test.jsonl').write_text(''.join(json.dumps({'image': e['image'], 'caption': e['caption']}) + '\n'
                                               for e in karpathy(ann_root, 'test')))
    return {'train_file': train, 'val_file': str(folder / 'val.json'), 'test_file': str(folder / 'test.jsonl')}


def test_files_give_the_datasets_of_the_karpathy_files(synthetic, tmp_path):  # noqa: F811
    ann_root = Path(synthetic['ann_root'])
    config = data_config(synthetic, dataset='custom', **write_user_files(ann_root, tmp_path))
    data.check_dataset_config('retrieval_custom', config, 'custom.yaml')
    ours = data.create_dataset('retrieval_custom', config)
    theirs = data.create_dataset('retrieval_coco', config)
    # training: the same items (transform aside) in the same order, the same image indices
    assert len(ours[0]) == len(theirs[0])
    assert [a['caption'] for a in ours[0].annotation] == [a['caption'] for a in theirs[0].annotation]
    assert ([ours[0].img_ids[a['image_id']] for a in ours[0].annotation]
            == [theirs[0].img_ids[a['image_id']] for a in theirs[0].annotation])
    # evaluation: the same texts, images and ground truth
    for mine, karpathy_set in zip(ours[1:], theirs[1:]):
        assert mine.text == karpathy_set.text
        assert mine.txt2img == karpathy_set.txt2img and mine.img2txt == karpathy_set.img2txt
        assert [os.path.basename(p) for p in mine.image] == [os.path.basename(p) for p in karpathy_set.image]
    # captioning: the prompt leads the training caption; the ground truth is the split's captions
    train, val, _ = data.create_dataset('caption_custom', config)
    assert train[0][1] == 'a picture of ' + theirs[0][0][1]
    gt = val.coco_ground_truth()
    assert [img['id'] for img in gt['images']] == list(range(len(val)))
    assert ([(a['image_id'], a['caption']) for a in gt['annotations']]
            == [(i, c) for i, e in enumerate(karpathy(ann_root, 'val')) for c in e['caption']])


def test_a_folder_of_images_with_sidecar_captions(synthetic, tmp_path):  # noqa: F811
    folder = tmp_path / 'mine' / 'nested'
    folder.mkdir(parents=True)
    entries = karpathy(Path(synthetic['ann_root']), 'val')[:3]
    for number, entry in enumerate(entries):
        shutil.copy(os.path.join(synthetic['image_root'], entry['image']), folder / f'{number}.jpg')
        (folder / f'{number}.txt').write_text('\n'.join(entry['caption']) + '\n\n')
    rows = read_rows(str(tmp_path / 'mine'))
    assert [(os.path.basename(r.image), r.caption) for r in rows] == [
        (f'{n}.jpg', c) for n, e in enumerate(entries) for c in e['caption']]
    assert rows[0].where == str(folder / '0.txt')
    # an image without its caption file is a bad row
    shutil.copy(folder / '0.jpg', folder / 'lonely.png')
    with pytest.raises(DataError, match=r'lonely\.png has no caption file lonely\.txt'):
        read_rows(str(tmp_path / 'mine'))
    assert len(read_rows(str(tmp_path / 'mine'), bad_rows='skip')) == len(rows)


def test_bad_rows_are_named_with_file_and_line_or_skipped_and_counted(synthetic, tmp_path, capsys):  # noqa: F811
    image_root = synthetic['image_root']
    good = pairs(karpathy(Path(synthetic['ann_root']), 'val'))[:4]
    cases = [
        ([good[0], ('synth/missing.jpg', 'a red circle')], 'line 3 image .*missing.jpg does not exist'),
        ([good[0], (good[1][0], '  ')], "line 3 caption '  ' is empty"),
        ([good[0], (good[1][0], '...!')], 'line 3 caption .* is empty after removing punctuation'),
        ([good[0], good[1], good[0]], r'line 4 repeats the row'),
        ([good[0], (good[1][0], 'a, b', 'extra')], 'line 3 has 3 values, the header 2'),
    ]
    for number, (rows, message) in enumerate(cases):
        path = write_csv(tmp_path / f'bad{number}.csv', rows)
        with pytest.raises(DataError, match=f'bad{number}.csv: {message}'):
            read_rows(path, image_root)
        kept = read_rows(path, image_root, bad_rows='skip')
        assert len(kept) == len(rows) - 1
        assert f'bad{number}.csv: skipped 1 bad row(s)' in capsys.readouterr().out
    # a header without the columns names what it found
    path = write_csv(tmp_path / 'header.csv', good, header=('file', 'text'))
    with pytest.raises(DataError, match=r"line 1: the header must name .*missing 'image', 'caption'; found 'file', 'text'"):
        read_rows(path, image_root, bad_rows='skip')
    # JSON: missing fields and wrong types name the entry; a JSONL the line
    (tmp_path / 'bad.json').write_text(json.dumps([{'image': good[0][0], 'caption': [good[0][1]]},
                                                   {'image': good[1][0], 'text': 'x'}]))
    with pytest.raises(DataError, match=r"bad.json: entry 1 has no field 'caption'"):
        read_rows(str(tmp_path / 'bad.json'), image_root)
    (tmp_path / 'bad.jsonl').write_text(json.dumps({'image': good[0][0], 'caption': good[0][1]}) + '\n\n{oops\n')
    with pytest.raises(DataError, match=r'bad.jsonl: line 3 is not JSON'):
        read_rows(str(tmp_path / 'bad.jsonl'), image_root)
    # a source with nothing usable is an error even when skipping
    path = write_csv(tmp_path / 'none.csv', [('synth/missing.jpg', 'a red circle')])
    with pytest.raises(DataError, match='none.csv: no usable'):
        read_rows(path, image_root, bad_rows='skip')


def test_one_data_file_is_split_by_image_with_a_seed(synthetic, tmp_path):  # noqa: F811
    rows = pairs(karpathy(Path(synthetic['ann_root']), 'train'))
    source = write_csv(tmp_path / 'all.csv', rows)
    config = {'data_file': source, 'image_root': synthetic['image_root'], 'val_fraction': 0.2,
              'test_fraction': 0.1, 'split_seed': 3}
    splits = load_splits(config)
    images = {split: {r.image for r in part} for split, (part, _) in splits.items()}
    n_images = len({image for image, _ in rows})
    assert sum(len(s) for s in images.values()) == n_images  # no image in two splits
    assert len(images['val']) == round(0.2 * n_images) and len(images['test']) == round(0.1 * n_images)
    assert sum(len(part) for part, _ in splits.values()) == len(rows)  # every row kept, with its image
    assert load_splits(config)['val'][0] == splits['val'][0]  # the seed decides
    assert {r.image for r in load_splits({**config, 'split_seed': 4})['val'][0]} != images['val']


def test_config_errors_name_the_key(synthetic, tmp_path):  # noqa: F811
    source = write_csv(tmp_path / 'all.csv', [])
    base = {'image_size': 32}
    cases = [({}, 'needs data_file, or all of train_file'),
             ({'train_file': source}, 'missing: val_file, test_file'),
             ({'data_file': source, 'train_file': source}, 'either data_file or'),
             ({'data_file': str(tmp_path / 'nope.csv')}, 'data_file: .*nope.csv.* does not exist'),
             ({'data_file': str(tmp_path / 'all.txt')}, 'does not exist'),
             ({'data_file': source, 'val_fraction': 1.5}, 'val_fraction must be a number between 0 and 1'),
             ({'data_file': source, 'val_fraction': 0.5, 'test_fraction': 0.5}, 'must leave images to train'),
             ({'data_file': source, 'bad_rows': 'ignore'}, "bad_rows must be error or skip; got 'ignore'"),
             ({'data_file': source, 'image_root': str(tmp_path / 'no_images')}, 'image_root: .*no_images')]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            data.check_dataset_config('retrieval_custom', {**base, **extra}, 'mine.yaml')
    (tmp_path / 'all.txt').write_text('x')
    with pytest.raises(ConfigError, match='neither a folder nor a .csv, .json, .jsonl file'):
        data.check_dataset_config('retrieval_custom', {**base, 'data_file': str(tmp_path / 'all.txt')}, 'mine.yaml')


def toy_user_files(tmp_path):
    """The toy configs' shapes data as a user's CSV/JSON/JSONL files (generated on first use)."""
    preflight.prepare_synthetic_data(load_config(str(TOY_RETRIEVAL)))
    return write_user_files(SHAPES / 'annotation', tmp_path / 'mine')


def test_retrieval_from_a_csv_trains_as_from_the_karpathy_files(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    files = toy_user_files(tmp_path)
    base = ['--config', str(TOY_RETRIEVAL), '--device', 'cpu', 'max_epoch=1', 'min_lr=1e-4']
    custom = ['dataset=custom', 'ann_root=null', *[f'{key}={value}' for key, value in files.items()]]
    with one_thread():
        train_retrieval.run(base + ['--output_dir', str(tmp_path / 'karpathy')])
        train_retrieval.run(base + ['--output_dir', str(tmp_path / 'csv')] + custom)
    theirs, ours = read_json_lines(tmp_path / 'karpathy' / 'log.txt'), read_json_lines(tmp_path / 'csv' / 'log.txt')
    assert [line['epoch'] for line in ours] == [0]
    assert ours == theirs  # every loss and recall, number for number


def test_captioning_from_a_csv_scores_against_its_own_captions(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    files = toy_user_files(tmp_path)
    out = tmp_path / 'caption'
    with one_thread():
        train_caption.run(['--config', str(TOY_CAPTION), '--device', 'cpu', '--output_dir', str(out),
                           'max_epoch=1', 'max_length=8', 'dataset=custom', 'ann_root=null',
                           'coco_gt_root=null', *[f'{key}={value}' for key, value in files.items()]])
    (line,) = read_json_lines(out / 'log.txt')
    # the split's own captions were the ground truth: scoring the same captions against
    # COCO's ground-truth file (ids from the file names) gives the same metrics
    val = karpathy(SHAPES / 'annotation', 'val')
    results = json.loads((out / 'result' / 'val_epoch0.json').read_text())
    remapped = [{'image_id': coco_image_id(val[r['image_id']]['image']), 'caption': r['caption']} for r in results]
    (tmp_path / 'remapped.json').write_text(json.dumps(remapped))
    coco = caption_eval(str(SHAPES / 'annotation' / 'coco_gt' / 'coco_karpathy_val_gt.json'), str(tmp_path / 'remapped.json'))
    for metric in ('Bleu_1', 'Bleu_4', 'CIDEr', 'ROUGE_L'):
        assert line[f'val_{metric}'] == pytest.approx(coco.eval[metric], abs=1e-9), metric
    gt = json.loads((out / 'result' / 'val_gt.json').read_text())
    assert [os.path.basename(image['file_name']) for image in gt['images']] == [os.path.basename(e['image']) for e in val]


def test_scripts_refuse_a_custom_config_without_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match='dataset custom needs data_file'):
        train_retrieval.run(['--config', str(TOY_RETRIEVAL), '--output_dir', str(tmp_path / 'a'), 'dataset=custom'])
    with pytest.raises(ConfigError, match='missing: test_file'):
        train_caption.run(['--config', str(TOY_CAPTION), '--output_dir', str(tmp_path / 'b'), 'dataset=custom',
                           f'train_file={TOY_CAPTION}', f'val_file={TOY_CAPTION}'])
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


@pytest.mark.parametrize('script, name', [(train_retrieval, 'retrieval_custom'), (train_caption, 'caption_custom')])
def test_the_custom_configs_read_with_their_scripts(script, name, monkeypatch):
    monkeypatch.chdir(REPO)
    _, config = script_config(script, f'configs/{name}.yaml')
    assert config['dataset'] == 'custom' and config['accum_steps'] == 2
    # a fresh checkout has no my_data/: the error names the config, the key and the path
    with pytest.raises(ConfigError, match=f"configs/{name}.yaml: data_file: 'my_data/captions.csv' does not exist"):
        data.check_dataset_config(f"{name.split('_')[0]}_custom", config, f'configs/{name}.yaml')

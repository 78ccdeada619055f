"""capfilt.py: output files in the formats pretrain.py reads, every text scored and reported,
unreadable images skipped with their file and entry, a killed run resumed to the same files, two
processes equal to one, filter_only / caption_only. Models with random weights saved as
checkpoints: these tests check the machinery (tests/test_capfilt_toy.py has the learning proof)."""
import json

import pytest
import torch

import capfilt
from conftest import REPO
from engine.config import ConfigError, load_config
from script_runner import one_thread, run_script

CONFIG = REPO / 'configs' / 'shapes' / 'capfilt.yaml'
OUTPUTS = ('scores.jsonl', 'web_filtered.json', 'synthetic_filtered.json')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """(pre-training list with one unreadable image, captioner and filter checkpoints)."""
    from data.synthetic import make_synthetic
    from models.blip import BLIP_Decoder
    from models.blip_itm import BLIP_ITM
    root = tmp_path_factory.mktemp('capfilt')
    make_synthetic(root / 'data', num_images=24, num_videos=1)
    config = load_config(str(CONFIG))
    keys = dict(image_size=config['image_size'], vit=config['vit'], med_config=config['med_config'])
    torch.manual_seed(0)
    checkpoints = {}
    for name, model in (('captioner', BLIP_Decoder(prompt=config['prompt'], **keys)),
                        ('filter', BLIP_ITM(embed_dim=config['embed_dim'], **keys))):
        checkpoints[name] = root / f'{name}.pth'
        torch.save({'model': model.state_dict()}, checkpoints[name])
    entries = json.loads((root / 'data' / 'annotation' / 'pretrain_synth.json').read_text())[:20]
    broken = root / 'broken.jpg'
    broken.write_bytes(b'not an image')
    entries[7] = {'image': str(broken), 'caption': 'a broken image'}
    entries[3]['caption'] = [entries[3]['caption'], 'a second web caption']
    train_file = root / 'noisy.json'
    train_file.write_text(json.dumps(entries))
    return train_file, checkpoints, entries


def args(setup, output_dir, *overrides):
    train_file, checkpoints, _ = setup
    return ['--config', str(CONFIG), '--output_dir', str(output_dir), '--device', 'cpu', 'synthetic=null',
            f'train_file=[{train_file}]', f"captioner_checkpoint={checkpoints['captioner']}",
            f"filter_checkpoint={checkpoints['filter']}", 'chunk_size=6', 'batch_size=4', *overrides]


def read_outputs(output_dir):
    return {name: (output_dir / name).read_text() for name in OUTPUTS}


@pytest.fixture(scope='module', autouse=True)
def one_torch_thread():
    """Every in-process run on one thread, as each process of the two-process run: CPU float
    sums depend on the thread count, and the tests compare the files byte for byte."""
    with one_thread():
        yield


@pytest.fixture(scope='module')
def reference(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp('capfilt_reference')
    capfilt.run(args(setup, out, 'num_captions=2'))
    return out


def test_outputs_score_every_text_and_report_the_unreadable_image(setup, reference):
    _, _, entries = setup
    lines = [json.loads(line) for line in (reference / 'scores.jsonl').read_text().splitlines()]
    assert all(set(line) == {'image', 'source', 'text', 'itm', 'itc', 'kept'} for line in lines)
    readable = [e for i, e in enumerate(entries) if i != 7]
    web = [line for line in lines if line['source'] == 'web']
    synthetic = [line for line in lines if line['source'] == 'synthetic']
    assert len(web) == len(readable) + 1  # entry 3 has two captions
    assert len(synthetic) == 2 * len(readable)  # num_captions=2
    assert all(0 <= line['itm'] <= 1 and -1 <= line['itc'] <= 1 for line in lines)
    assert all(line['kept'] == (line['itm'] > 0.5) for line in lines)
    assert [line['image'] for line in web][:4] == [e['image'] for e in readable[:3] + [readable[3]]][:4]

    # the kept pairs, in the format pretrain.py reads
    for source, name in (('web', 'web_filtered.json'), ('synthetic', 'synthetic_filtered.json')):
        kept = json.loads((reference / name).read_text())
        assert kept == [{'image': line['image'], 'caption': line['text']} for line in lines
                        if line['source'] == source and line['kept']]
    from data.pretrain_dataset import pretrain_dataset
    dataset = pretrain_dataset([str(reference / 'web_filtered.json'), str(reference / 'synthetic_filtered.json')],
                               '', lambda image: image)
    assert len(dataset) == sum(line['kept'] for line in lines)

    summary = json.loads((reference / 'summary.json').read_text())
    assert summary['images'] == 20 and summary['images_skipped'] == 1
    (skipped,) = summary['skipped']
    assert skipped['entry'] == 7 and skipped['image'].endswith('broken.jpg') and 'noisy.json' in skipped['file']
    assert summary['web']['texts'] == len(web) and summary['synthetic']['texts'] == len(synthetic)
    assert summary['web']['kept'] == sum(line['kept'] for line in web)


def test_a_killed_run_resumes_to_the_same_files(setup, reference, tmp_path, monkeypatch):
    real, calls = capfilt.process_chunk, []

    def die_on_the_third_chunk(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(capfilt, 'process_chunk', die_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        capfilt.run(args(setup, tmp_path, 'num_captions=2'))
    assert len(list((tmp_path / capfilt.PARTS).iterdir())) == 2 and not (tmp_path / 'scores.jsonl').exists()

    calls.clear()
    monkeypatch.setattr(capfilt, 'process_chunk', lambda *a, **k: calls.append(1) or real(*a, **k))
    capfilt.run(args(setup, tmp_path, 'num_captions=2'))
    assert len(calls) == 2  # 4 chunks of 6 images (20 entries): the first two were done
    assert read_outputs(tmp_path) == read_outputs(reference)


def test_two_processes_write_the_files_of_one(setup, reference, tmp_path):
    run_script('capfilt.py', *args(setup, tmp_path, 'num_captions=2'), nproc=2)
    assert read_outputs(tmp_path) == read_outputs(reference)
    assert json.loads((tmp_path / 'summary.json').read_text())['processes'] == 2


def test_filter_only_and_caption_only(setup, tmp_path):
    capfilt.run(args(setup, tmp_path / 'filter', 'filter_only=true', 'captioner_checkpoint='))
    lines = [json.loads(line) for line in (tmp_path / 'filter' / 'scores.jsonl').read_text().splitlines()]
    assert lines and all(line['source'] == 'web' for line in lines)
    assert json.loads((tmp_path / 'filter' / 'synthetic_filtered.json').read_text()) == []

    capfilt.run(args(setup, tmp_path / 'caption', 'caption_only=true', 'filter_checkpoint='))
    lines = [json.loads(line) for line in (tmp_path / 'caption' / 'scores.jsonl').read_text().splitlines()]
    synthetic = [line for line in lines if line['source'] == 'synthetic']
    assert len(synthetic) == 19 and all(line['kept'] and line['itm'] is None for line in lines)


def test_bad_settings_are_refused(setup, tmp_path):
    with pytest.raises(ConfigError, match='filter_checkpoint is empty'):
        capfilt.run(args(setup, tmp_path / 'a', 'filter_checkpoint='))
    with pytest.raises(ConfigError, match='exclude each other'):
        capfilt.run(args(setup, tmp_path / 'b', 'filter_only=true', 'caption_only=true'))
    with pytest.raises(ConfigError, match='top_p must be a number > 0 and <= 1; got 1.5'):
        capfilt.run(args(setup, tmp_path / 'c', 'top_p=1.5'))
    # a captioning checkpoint given as the filter lacks the ITM head: refused, naming it
    _, checkpoints, _ = setup
    with pytest.raises(RuntimeError, match='captioner.pth lacks .* weights of BLIP_ITM'):
        capfilt.run(args(setup, tmp_path / 'd', f"filter_checkpoint={checkpoints['captioner']}"))

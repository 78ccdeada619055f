"""train_caption.py and eval_nocaps.py on the toy shapes data (configs/shapes/).

One DDP training run (two gloo processes) is shared by the tests: it shows the captioner
learns (the loss falls, BLEU/CIDEr far above the untrained model) and reads the image (most
test captions name the shapes' colour, which no caption prior can guess), that training
runs under DDP, and its checkpoint is then evaluated by one process, which must reproduce the
two-process metrics and captions exactly. The COCO metrics start a METEOR java process per
call (the slow part), so the script runs are few; the untrained baseline is scored in-process
without METEOR.
"""
import json

import pytest
import torch

import eval_nocaps
import train_caption
from captioning import generate_captions
from conftest import CAPTION_TOY_EPOCHS, REPO
from script_runner import read_json_lines, run_script, script_config, toy_setup

pytestmark = pytest.mark.slow  # trains toy models or runs whole scripts (make test-fast skips it)

CONFIG = 'configs/shapes/caption_coco.yaml'
NOCAPS_CONFIG = 'configs/shapes/nocaps.yaml'
METRICS = ['Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr']
EPOCHS = CAPTION_TOY_EPOCHS
COLOURS = ('red', 'green', 'blue', 'yellow')
SPLIT_IDS = {}


def split_image_ids(split):
    """Image ids of a split's COCO ground truth (val and test; NoCaps uses the same images)."""
    if split not in SPLIT_IDS:
        gt = json.loads((REPO / 'datasets/shapes/annotation/coco_gt' / f'coco_karpathy_{split}_gt.json').read_text())
        SPLIT_IDS[split] = sorted(image['id'] for image in gt['images'])
    return SPLIT_IDS[split]


def read_results(path):
    return sorted(json.loads(path.read_text()), key=lambda r: r['image_id'])


@pytest.fixture(scope='module')
def trained(caption_toy_run):
    """A short fine-tuning run under torchrun with two processes (the learning run, conftest)."""
    return caption_toy_run


def colour_of(caption):
    words = caption.lower().replace('.', ' ').split()
    return [colour for colour in COLOURS if colour in words]


def bleu_cider(results, gt_file):
    """BLEU-1..4 and CIDEr of [{image_id, caption}] as coco_caption_eval computes them (PTB
    tokenizer, pycocoevalcap scorers), without METEOR's slow java start."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gt = json.loads(gt_file.read_text())
    refs = {}
    for ann in gt['annotations']:
        refs.setdefault(ann['image_id'], []).append({'caption': ann['caption']})
    res = {r['image_id']: [{'caption': r['caption']}] for r in results}
    tokenizer = PTBTokenizer()
    refs, res = tokenizer.tokenize({i: refs[i] for i in res}), tokenizer.tokenize(res)
    bleu, _ = Bleu(4).compute_score(refs, res)
    cider, _ = Cider().compute_score(refs, res)
    return {'Bleu_1': bleu[0], 'Bleu_4': bleu[3], 'CIDEr': cider}


@pytest.fixture(scope='module')
def untrained():
    """Metrics of the toy captioner before training (same config, seed and generation)."""
    from data import create_dataset, create_loader
    from models.blip import blip_decoder

    with toy_setup(train_caption, CONFIG) as (_, config):
        model = blip_decoder(image_size=config['image_size'], vit=config['vit'], prompt=config['prompt'],
                             med_config=config['med_config'])
        _, val_set, test_set = create_dataset('caption_coco', config)
        loaders = create_loader([val_set, test_set], [None, None], [config['batch_size']] * 2, [0, 0],
                                [False, False], [None, None])
        scores = {}
        for split, loader in zip(('val', 'test'), loaders):
            results = generate_captions(model, loader, torch.device('cpu'), config)
            gt_file = REPO / config['coco_gt_root'] / f'coco_karpathy_{split}_gt.json'
            scores.update({f'{split}_{k}': v for k, v in bleu_cider(results, gt_file).items()})
    return scores


def test_training_under_ddp_learns_to_caption(trained, untrained):
    out, result = trained
    assert 'distributed init (rank 0, world 2' in result.stdout
    assert 'Caption generation' in result.stdout and 'eta' in result.stdout
    lines = read_json_lines(out / 'log.txt')
    assert [line['epoch'] for line in lines] == list(range(EPOCHS))
    assert list(lines[0]) == (['train_lr', 'train_loss'] + [f'val_{m}' for m in METRICS]
                              + [f'test_{m}' for m in METRICS] + ['epoch', 'best_epoch'])
    # the loss falls; the metrics at the best epoch are far above the untrained model's
    losses = [float(line['train_loss']) for line in lines]
    assert losses[-1] < 0.75 * losses[0]
    best = lines[lines[-1]['best_epoch']]
    for split in ('val', 'test'):
        assert best[f'{split}_CIDEr'] > untrained[f'{split}_CIDEr'] + 0.3
        assert best[f'{split}_CIDEr'] > 3 * untrained[f'{split}_CIDEr']
        assert best[f'{split}_Bleu_1'] > untrained[f'{split}_Bleu_1'] + 0.15
    # the best epoch is chosen by val CIDEr + BLEU-4, as the original
    scores = [line['val_CIDEr'] + line['val_Bleu_4'] for line in lines]
    assert lines[-1]['best_epoch'] == scores.index(max(scores))

    # checkpoints and result files: one caption per image, prompt stripped
    names = {p.name for p in out.iterdir()}
    assert {'checkpoint_best.pth', 'checkpoint_last.pth', 'config.yaml', 'log.txt', 'result'} <= names
    last = torch.load(out / 'checkpoint_last.pth', weights_only=True)
    assert last['epoch'] == EPOCHS - 1 and last['global_step'] > 0
    for epoch in range(EPOCHS):
        for split in ('val', 'test'):
            results = read_results(out / 'result' / f'{split}_epoch{epoch}.json')
            assert [r['image_id'] for r in results] == split_image_ids(split)
            assert all(isinstance(r['caption'], str) and not r['caption'].startswith('a picture of')
                       for r in results)

    # the captions read the image: most name the shapes' colour (4 colours, every caption of
    # the training data names one, so guessing gets about a quarter right)
    gt = json.loads((REPO / 'datasets/shapes/annotation/coco_gt/coco_karpathy_test_gt.json').read_text())
    true_colour = {ann['image_id']: colour_of(ann['caption']) for ann in gt['annotations']}
    results = read_results(out / 'result' / f'test_epoch{EPOCHS - 1}.json')
    right = sum(colour_of(r['caption']) == true_colour[r['image_id']] for r in results)
    print(f'test captions naming the right colour after {EPOCHS} epochs: {right} of {len(results)}')
    assert right > len(results) / 2


def test_one_process_evaluation_matches_the_two_process_run(trained, tmp_path):
    out, _ = trained
    best_epoch = read_json_lines(out / 'log.txt')[-1]['best_epoch']
    expected = read_json_lines(out / 'log.txt')[best_epoch]

    evaluated = tmp_path / 'eval'
    run_script('train_caption.py', '--config', CONFIG, '--output_dir', evaluated, '--device', 'cpu',
               '--evaluate', f'pretrained={out / "checkpoint_best.pth"}')
    assert {p.name for p in evaluated.iterdir()} == {'config.yaml', 'evaluate.txt', 'result'}
    (line,) = read_json_lines(evaluated / 'evaluate.txt')
    assert list(line) == [f'val_{m}' for m in METRICS] + [f'test_{m}' for m in METRICS]
    for key, value in line.items():
        assert value == pytest.approx(expected[key], abs=1e-9), key
    for split in ('val', 'test'):
        assert (read_results(evaluated / 'result' / f'{split}_epoch0.json')
                == read_results(out / 'result' / f'{split}_epoch{best_epoch}.json'))


def test_nocaps_results_and_metrics_with_ground_truth(trained, untrained, tmp_path):
    out, _ = trained
    gt_file = REPO / 'datasets/shapes/annotation/nocaps_val_gt.json'
    evaluated = tmp_path / 'nocaps'
    result = run_script('eval_nocaps.py', '--config', NOCAPS_CONFIG, '--output_dir', evaluated, '--device', 'cpu',
                        f'pretrained={out / "checkpoint_best.pth"}', f'val_gt_file={gt_file}', 'test_gt_file=null')
    assert 'Evaluation (val)' in result.stdout and 'eta' in result.stdout
    # the result files of the original (one caption per image, for the official server)
    for split in ('val', 'test'):
        results = read_results(evaluated / 'result' / f'{split}.json')
        assert [r['image_id'] for r in results] == split_image_ids(split)
    # val is scored locally; test is given no ground truth here, so no test metrics
    (line,) = read_json_lines(evaluated / 'evaluate.txt')
    assert list(line) == [f'val_{m}' for m in METRICS]
    # the NoCaps val images and references are the caption val ones: far above the untrained captioner
    assert line['val_CIDEr'] > untrained['val_CIDEr'] + 0.3


def test_nocaps_without_ground_truth_writes_only_the_result_files(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the toy config's paths are relative to the repository
    # the original's behaviour (an untrained model, short captions to keep it quick)
    eval_nocaps.run(['--config', str(REPO / NOCAPS_CONFIG), '--output_dir', str(tmp_path / 'out'),
                     '--device', 'cpu', 'val_gt_file=null', 'test_gt_file=null', 'max_length=8'])
    assert {p.name for p in (tmp_path / 'out').iterdir()} == {'config.yaml', 'result'}
    assert {p.name for p in (tmp_path / 'out' / 'result').iterdir()} >= {'val.json', 'test.json'}


def test_bad_input_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    base = ['--config', str(REPO / CONFIG), '--output_dir', str(tmp_path / 'out'), '--device', 'cpu']
    with pytest.raises(FileNotFoundError, match='image_root.*no_such_folder'):
        train_caption.run(base + [f'image_root={tmp_path / "no_such_folder"}'])
    with pytest.raises(FileNotFoundError, match='pretrained.*missing.pth'):
        train_caption.run(base + [f'pretrained={tmp_path / "missing.pth"}'])
    with pytest.raises(SystemExit):
        train_caption.run(base + ['num_beam=3'])
    assert "unknown config key 'num_beam'" in capsys.readouterr().err

    nocaps = ['--config', str(REPO / NOCAPS_CONFIG), '--output_dir', str(tmp_path / 'out'), '--device', 'cpu']
    with pytest.raises(FileNotFoundError, match='val_gt_file.*missing_gt.json'):
        eval_nocaps.run(nocaps + [f'val_gt_file={tmp_path / "missing_gt.json"}'])
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('script, name', [(train_caption, 'caption_coco'), (eval_nocaps, 'nocaps')])
def test_official_configs_pass_the_key_checks(script, name):
    _, config = script_config(script, f'configs/{name}.yaml')
    assert config['med_config'] == 'configs/med_config.json' and config['num_beams'] == 3
    if name == 'nocaps':
        assert config['val_gt_file'] is None and config['test_gt_file'] is None

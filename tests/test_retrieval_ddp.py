"""train_retrieval.py under two-process torchrun (gloo, CPU) and after a SIGKILL.

- `--evaluate` with a fixed checkpoint: two processes give the score matrices and the
  itm_eval metrics of one process;
- a training epoch under DDP: the ITC queue takes the global batch at every micro-step
  (concat_all_gather), ITM hard negatives come from this rank's batch or from every rank's
  (negative_all_rank False / True, the latter through all_gather_with_grad), accum_steps=2
  makes half as many optimizer steps, losses stay finite;
- a run killed with SIGKILL in the middle of an epoch and restarted continues from its
  last checkpoint and ends where the uninterrupted run ends.

All on the toy config (configs/shapes/retrieval_coco.yaml) pointed at a small synthetic
set, so each run takes seconds.
"""
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import REPO
from engine.config import load_config
from script_runner import kill_at, read_json_lines, run_script

pytestmark = pytest.mark.slow  # trains toy models or runs whole scripts (make test-fast skips it)

CONFIG = REPO / 'configs' / 'shapes' / 'retrieval_coco.yaml'
BATCH = 8           # per process
QUEUE = 256         # larger than what one epoch enqueues, so the pointer never wraps
RECALL_KEYS = ['txt_r1', 'txt_r5', 'txt_r10', 'txt_r_mean', 'img_r1', 'img_r5', 'img_r10',
               'img_r_mean', 'r_mean']


@pytest.fixture(scope='module')
def toy_data(tmp_path_factory):
    """40 images: 28 train (140 captions), 6 val, 6 test (30 captions each)."""
    from data.synthetic import make_synthetic
    return make_synthetic(tmp_path_factory.mktemp('retrieval_ddp') / 'data', num_images=40,
                          num_videos=1)


def script_args(toy_data, output_dir, *overrides):
    return ['--config', CONFIG, '--output_dir', output_dir, '--device', 'cpu',
            'synthetic=null', f"image_root={toy_data['image_root']}", f"ann_root={toy_data['ann_root']}",
            f'batch_size_train={BATCH}', f'batch_size_test={BATCH}', f'queue_size={QUEUE}',
            'k_test=4', 'max_epoch=1', *overrides]


def num_train_pairs(toy_data):
    with open(os.path.join(toy_data['ann_root'], 'coco_karpathy_train.json')) as f:
        return len(json.load(f))


# --------------------------------------------------------------------------- evaluation

@pytest.fixture(scope='module')
def fixed_checkpoint(tmp_path_factory):
    """A model with spread-out weights (random init, larger scale), so scores have few ties."""
    from models.blip_retrieval import blip_retrieval
    config = load_config(str(CONFIG), defaults={'med_config': '', 'embed_dim': 256,
                                                      'momentum': 0.995, 'num_workers': 0})
    torch.manual_seed(0)
    model = blip_retrieval(image_size=config['image_size'], vit=config['vit'],
                           med_config=config['med_config'], embed_dim=config['embed_dim'],
                           queue_size=QUEUE)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.add_(0.1 * torch.randn_like(param))
    path = tmp_path_factory.mktemp('retrieval_ckpt') / 'fixed.pth'
    torch.save({'model': model.state_dict()}, path)
    return path


def test_evaluate_two_processes_equal_one(toy_data, fixed_checkpoint, tmp_path):
    results, scores = {}, {}
    for nproc in (1, 2):
        out = tmp_path / f'eval_{nproc}'
        run_script('tests/retrieval_score_dump.py',
                   *script_args(toy_data, out, '--evaluate', f'pretrained={fixed_checkpoint}'),
                   nproc=nproc, env={'SCORE_DUMP_DIR': str(out / 'scores')})
        (results[nproc],) = read_json_lines(out / 'evaluate.txt')
        scores[nproc] = [np.load(out / 'scores' / f'scores_{n}.npz') for n in (0, 1)]  # val, test

    assert list(results[1]) == [f'val_{k}' for k in RECALL_KEYS] + [f'test_{k}' for k in RECALL_KEYS]
    assert results[2] == results[1]
    for one, two in zip(scores[1], scores[2]):
        assert one['i2t'].shape == (6, 30) and one['t2i'].shape == (30, 6)
        for key in ('i2t', 't2i'):
            # k_test re-ranked candidates per row, -100 elsewhere, in both runs
            assert ((one[key] != -100).sum(axis=1) == 4).all()
            np.testing.assert_array_equal(one[key] == -100, two[key] == -100)
            np.testing.assert_allclose(two[key], one[key], rtol=0, atol=1e-5)
    # the scores are not degenerate: the metric equality above could fail
    assert len(np.unique(np.round(scores[1][1]['i2t'][scores[1][1]['i2t'] != -100], 5))) > 20


def test_topk_evaluation_writes_the_dense_evaluate_txt_for_one_and_two_processes(toy_data, fixed_checkpoint,
                                                                               tmp_path):
    results = {}
    for mode, nproc in (('dense', 1), ('topk', 1), ('topk', 2)):
        out = tmp_path / f'{mode}_{nproc}'
        run_script('train_retrieval.py', *script_args(toy_data, out, '--evaluate', f'pretrained={fixed_checkpoint}',
                                                      'k_test=10', f'eval_mode={mode}'), nproc=nproc)
        (results[mode, nproc],) = read_json_lines(out / 'evaluate.txt')
        assert sorted(p.name for p in out.iterdir()) == ['config.yaml', 'evaluate.txt']
    assert results['topk', 1] == results['dense', 1]
    assert results['topk', 2] == results['dense', 1]
    # rankings the comparison can tell apart (recalls strictly between 0 and 100)
    assert sum(0 < value < 100 for value in results['dense', 1].values()) >= 6, results['dense', 1]

    # k_test 0: the ITC ranking alone, labelled as such
    out = tmp_path / 'itc'
    run_script('train_retrieval.py', *script_args(toy_data, out, '--evaluate', f'pretrained={fixed_checkpoint}',
                                                  'k_test=0'))
    (itc,) = read_json_lines(out / 'evaluate.txt')
    assert itc['ranking'] == 'itc only (k_test 0)' and set(results['dense', 1]) < set(itc)


# --------------------------------------------------------------------------- training

@pytest.mark.parametrize('negative_all_rank, accum_steps', [(True, 1), (False, 2)])
def test_training_epoch_under_ddp(toy_data, tmp_path, negative_all_rank, accum_steps):
    out = tmp_path / 'train'
    result = run_script('train_retrieval.py',
                        *script_args(toy_data, out, f'negative_all_rank={negative_all_rank}',
                                     f'accum_steps={accum_steps}'), nproc=2)
    assert 'Train Epoch: [0]' in result.stdout

    # each rank sees half of the training pairs (the sampler drops the last short batch)
    world_size = 2
    iters = num_train_pairs(toy_data) // world_size // BATCH
    (line,) = read_json_lines(out / 'log.txt')
    assert math.isfinite(float(line['train_loss_ita'])) and math.isfinite(float(line['train_loss_itm']))

    last = torch.load(out / 'checkpoint_last.pth', weights_only=True)
    assert last['global_step'] == math.ceil(iters / accum_steps)
    # every micro-step enqueued the momentum features of the global batch (both ranks)
    model = last['model']
    filled = iters * BATCH * world_size
    assert int(model['ptr_queue']) == filled
    idx_queue = model['idx_queue'][0]
    assert (idx_queue[:filled] >= 0).all() and (idx_queue[filled:] == -100).all()
    # the two ranks drew disjoint shards, so no image (5 captions) was queued more than 5 times
    assert torch.bincount(idx_queue[:filled]).max() <= 5
    assert len(torch.unique(idx_queue[:filled])) > BATCH
    assert torch.isfinite(model['image_queue'][:, :filled]).all()
    assert torch.allclose(model['text_queue'][:, :filled].norm(dim=0), torch.ones(filled), atol=1e-4)


# --------------------------------------------------------------------------- killed and resumed

def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(toy_data, tmp_path):
    args = ['max_epoch=2', 'batch_size_train=16']
    reference = tmp_path / 'reference'
    run_script('train_retrieval.py', *script_args(toy_data, reference, *args))

    # the same run, killed right after the first iteration of epoch 1 ...
    out = tmp_path / 'killed'
    kill_at('train_retrieval.py', *script_args(toy_data, out, *args))
    assert torch.load(out / 'checkpoint_last.pth', weights_only=True)['epoch'] == 0
    assert len(read_json_lines(out / 'log.txt')) == 1

    # ... and restarted with the same command: it continues at epoch 1 from the last checkpoint
    result = run_script('train_retrieval.py', *script_args(toy_data, out, *args))
    assert 'continuing at epoch 1' in result.stdout
    final = torch.load(out / 'checkpoint_last.pth', weights_only=True)
    expected = torch.load(reference / 'checkpoint_last.pth', weights_only=True)
    assert final['epoch'] == expected['epoch'] == 1
    assert final['global_step'] == expected['global_step']
    for key, value in expected['model'].items():
        assert torch.equal(value, final['model'][key]), key
    assert read_json_lines(out / 'log.txt') == read_json_lines(reference / 'log.txt')

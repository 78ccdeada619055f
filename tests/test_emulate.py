"""emulate_world_size: one process trains as N torchrun processes did (engine/emulate.py).

- RankStreams: each played rank draws from its own streams, seeded seed + rank;
- the config rules: with accum_steps, under torchrun, the queue against the global batch;
- one step: the gradients of an emulated step equal DDP's over N gloo processes (retrieval
  with ITM negatives from every rank or from the rank's own batch, pre-training);
- whole scripts: an epoch of train_retrieval.py (negative_all_rank true and false, 2 and 3
  ranks), pretrain.py and train_caption.py under torchrun and emulated agree, checkpoint
  and logs; so do 4 processes and 2 processes playing 2 ranks each; plain accum_steps does
  not; a killed emulated run resumes to the same end.

What "agree" means for parameters: within 1e-4, but for attention key biases. Softmax ignores
a constant shift of a row's scores, so their exact gradient is 0 and what they receive is
rounding noise, which Adam normalises into steps of up to the learning rate: two torchrun
runs that differ only in their thread count differ there as much (measured: 3.9e-4 after 17
steps at lr 1e-4). Those are compared within Adam's bound, 2 x lr x steps.
"""
import math
import random

import numpy as np
import pytest
import torch

from conftest import REPO
from engine import emulate
from engine.config import ConfigError
from engine.rng import RankStreams
from script_runner import kill_at, read_json_lines, run_script

# --------------------------------------------------------------------------- streams


def draws():
    return (random.random(), float(np.random.rand()), float(torch.rand(())))


def test_each_rank_draws_its_own_seeded_stream_whatever_the_interleaving():
    streams = RankStreams(5, range(3))
    seen = {rank: [] for rank in range(3)}
    for rank in [0, 2, 2, 1, 0, 1, 2, 0]:
        with streams.use(rank):
            seen[rank].append(draws())
    for rank in range(3):
        random.seed(5 + rank)
        np.random.seed(5 + rank)
        torch.manual_seed(5 + rank)
        assert seen[rank] == [draws() for _ in seen[rank]], rank


def test_streams_live_between_uses_and_survive_states_and_load():
    RankStreams(11, range(2))
    first = draws()  # outside `use`, the process's streams are the first rank's
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    assert draws() == first

    streams = RankStreams(11, range(2))
    with streams.use(1):
        draws()
    saved = streams.states()
    expected = {}
    for rank in range(2):
        with streams.use(rank):
            expected[rank] = draws()
    restored = RankStreams(0, range(2))
    restored.load(saved)
    for rank in range(2):
        with restored.use(rank):
            assert draws() == expected[rank]
    with pytest.raises(ValueError, match='3 RNG states for 2 ranks'):
        restored.load(saved + saved[:1])


def test_replay_draws_again_and_then_forgets():
    streams = RankStreams(3, range(2))
    with streams.use(1):
        from engine import rng
        before = rng.capture()
        first = draws()
        with streams.replay(before):
            assert draws() == first
        after = draws()
    random.seed(4)
    np.random.seed(4)
    torch.manual_seed(4)
    assert [draws(), draws()] == [first, after]


# --------------------------------------------------------------------------- config rules

def base_config(**overrides):
    return {'accum_steps': 1, 'emulate_world_size': 1, 'batch_size_train': 8, 'queue_size': 64, **overrides}


def test_config_rules_name_the_keys(capsys):
    emulate.check_config(base_config(emulate_world_size=8), 'c.yaml', 1)
    with pytest.raises(ConfigError, match=r'c\.yaml: emulate_world_size=2 and accum_steps=2 cannot be combined'):
        emulate.check_config(base_config(emulate_world_size=2, accum_steps=2), 'c.yaml', 1)
    with pytest.raises(ConfigError, match=r'queue_size=36 must be a multiple of the global batch 16 '
                                          r'\(batch_size_train=8 x 2 rank\(s\): emulate_world_size\)'):
        emulate.check_config(base_config(emulate_world_size=2, queue_size=36), 'c.yaml', 1)
    with pytest.raises(ConfigError, match=r'queue_size=40 .* \(batch_size=8 x 2 rank\(s\): processes\)'):
        emulate.check_config({'batch_size': 8, 'queue_size': 40}, 'c.yaml', 2)
    with pytest.raises(ConfigError, match='emulate_world_size=3 under torchrun with 2 processes: it must be a '
                                          'multiple of the number of processes'):
        emulate.check_config(base_config(emulate_world_size=3, queue_size=24), 'c.yaml', 2)
    emulate.check_config(base_config(emulate_world_size=2), 'c.yaml', 2)  # one rank per process: plain DDP
    emulate.check_config(base_config(emulate_world_size=4), 'c.yaml', 2)  # two per process

    capsys.readouterr()
    emulate.check_config(base_config(accum_steps=4), 'c.yaml', 1)
    note = capsys.readouterr().out
    assert 'accum_steps=4' in note and 'emulate_world_size=N' in note and 'momentum' in note
    emulate.check_config({'accum_steps': 4, 'batch_size_train': 8}, 'c.yaml', 1)  # no queue: no note
    assert capsys.readouterr().out == ''


def test_script_refuses_emulation_with_accumulation_before_any_work(tmp_path):
    result = run_script('train_retrieval.py', '--config', REPO / 'configs/shapes/retrieval_coco.yaml',
                        '--output_dir', tmp_path / 'out', '--device', 'cpu', 'emulate_world_size=2',
                        'accum_steps=2', check=False)
    # one message on stderr, exit status 2, no traceback (engine.cli.main), nothing written
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('train_retrieval.py: error: config file ')
    assert 'emulate_world_size=2 and accum_steps=2 cannot be combined' in result.stderr
    assert not (tmp_path / 'out').exists()
    result = run_script('train_retrieval.py', '--config', REPO / 'configs/shapes/retrieval_coco.yaml',
                        '--output_dir', tmp_path / 'out', '--device', 'cpu', 'emulate_world_size=0', check=False,
                        env={'BLIP_DEBUG': '1'})  # BLIP_DEBUG=1: the traceback too
    assert result.returncode != 0 and 'emulate_world_size must be an integer >= 1' in result.stderr
    assert 'Traceback' in result.stderr


# --------------------------------------------------------------------------- one step, gradients

@pytest.mark.slow
@pytest.mark.parametrize('kind, negative_all_rank, world_size', [
    ('retrieval', True, 2), ('retrieval', False, 2), ('pretrain', False, 2), ('retrieval', True, 3)])
def test_emulated_step_gradients_equal_ddp(tmp_path, kind, negative_all_rank, world_size):
    import dist_worker_emulate as worker
    out = tmp_path / 'ddp.pth'
    run_script('tests/dist_worker_emulate.py', out, kind, negative_all_rank, nproc=world_size)
    reference = torch.load(out, weights_only=True)

    model = worker.build(kind, negative_all_rank, world_size)
    streams = RankStreams(worker.SEED, range(world_size))
    loss_fn = emulate.ForwardLosses(lambda batch, *step: batch, worker.LOSS_NAMES[kind])
    inputs = [worker.rank_inputs(kind, rank) for rank in range(world_size)]
    losses = emulate.forward_backward(model, inputs, loss_fn, streams, (0, 0, 1), {'amp': 'none'},
                                      torch.device('cpu'), torch.amp.GradScaler('cpu', enabled=False))

    every_rank = torch.tensor([[losses[r][name] for name in worker.LOSS_NAMES[kind]] for r in range(world_size)])
    torch.testing.assert_close(every_rank, reference['losses'], rtol=0, atol=1e-5)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(reference['grads'])
    for name, grad in reference['grads'].items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-5, msg=name)
    # the gradients are not negligible: the comparison could fail
    assert max(g.abs().max().item() for g in grads.values()) > 1e-2
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, reference['buffers'][name], rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- whole scripts

RETRIEVAL = REPO / 'configs' / 'shapes' / 'retrieval_coco.yaml'


@pytest.fixture(scope='module')
def toy_data(tmp_path_factory):
    from data.synthetic import make_synthetic
    return make_synthetic(tmp_path_factory.mktemp('emulate') / 'data', num_images=40, num_videos=1)


def retrieval_args(toy_data, out, *overrides):
    return ['--config', RETRIEVAL, '--output_dir', out, '--device', 'cpu', 'synthetic=null',
            f"image_root={toy_data['image_root']}", f"ann_root={toy_data['ann_root']}", 'batch_size_train=4',
            'batch_size_test=8', 'k_test=4', 'max_epoch=1', *overrides]


def gradient_free(name, value):
    """The attention key biases of a parameter (a boolean mask), see the module docstring."""
    mask = torch.zeros_like(value, dtype=torch.bool)
    if name.endswith('key.bias'):
        mask[:] = True
    elif name.endswith('qkv.bias'):  # the ViT's fused query | key | value bias
        width = value.numel() // 3
        mask[width:2 * width] = True
    return mask


def differences(checkpoint, reference):
    """{name: largest difference} over the model's parameters and buffers, key biases apart:
    (others, key_biases)."""
    others, key_biases = {}, {}
    for name, expected in reference['model'].items():
        actual = checkpoint['model'][name]
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
        if not expected.is_floating_point():
            others[name] = 0.0 if torch.equal(actual, expected) else math.inf  # idx_queue, pointers: exactly
            continue
        diff = (actual.double() - expected.double()).abs()
        mask = gradient_free(name, expected)
        others[name] = diff[~mask].max().item() if (~mask).any() else 0.0
        if mask.any():
            key_biases[name] = diff[mask].max().item()
    return others, key_biases


def assert_runs_agree(emulated, reference, lr):
    a = torch.load(emulated / 'checkpoint_last.pth', weights_only=True)
    b = torch.load(reference / 'checkpoint_last.pth', weights_only=True)
    assert a['global_step'] == b['global_step'] > 0
    assert len(a['rng_states']) == len(b['rng_states'])
    others, key_biases = differences(a, b)
    worst = max(others, key=others.get)
    assert others[worst] <= 1e-4, f'{worst}: {others[worst]:.3g}'
    bound = 2 * lr * b['global_step']
    assert max(key_biases.values(), default=0.0) <= bound, key_biases
    # the logged train losses: the N-rank averages a torchrun run logs
    lines_a, lines_b = read_json_lines(emulated / 'log.txt'), read_json_lines(reference / 'log.txt')
    assert len(lines_a) == len(lines_b) == b['epoch'] + 1
    for line_a, line_b in zip(lines_a, lines_b):
        train = [key for key in line_b if key.startswith('train_')]
        assert [key for key in line_a if key.startswith('train_')] == train and 'train_lr' in train
        for key in train:
            assert abs(float(line_a[key]) - float(line_b[key])) <= 1e-3, (key, line_a[key], line_b[key])
    return b


# the case with negative_all_rank false also checkpoints activations and clips gradients
MEMORY_OPTIONS = ('vit_grad_ckpt=True', 'vit_ckpt_layer=1', 'text_grad_ckpt=True', 'clip_grad_norm=1.0')


def retrieval_case(negative_all_rank, nproc):
    """The overrides of a case; the two-rank case with negatives from every rank runs two epochs
    (with the evaluation between them)."""
    return (f'negative_all_rank={negative_all_rank}', f'queue_size={12 * nproc}',
            *(() if negative_all_rank else MEMORY_OPTIONS), *(('max_epoch=2',) if (negative_all_rank, nproc) == (True, 2) else ()))


@pytest.fixture(scope='module')
def retrieval_ddp(toy_data, tmp_path_factory):
    """The torchrun reference runs: (negative_all_rank, processes) -> output folder."""
    runs = {}
    for negative_all_rank, nproc in ((True, 2), (False, 2), (True, 3)):
        out = tmp_path_factory.mktemp(f'ddp_{negative_all_rank}_{nproc}')
        run_script('train_retrieval.py', *retrieval_args(toy_data, out, *retrieval_case(negative_all_rank, nproc)),
                   nproc=nproc)
        runs[negative_all_rank, nproc] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize('negative_all_rank, nproc', [(True, 2), (False, 2), (True, 3)])
def test_retrieval_epoch_emulated_equals_torchrun(toy_data, retrieval_ddp, tmp_path, negative_all_rank, nproc):
    out = tmp_path / 'emulated'
    result = run_script('train_retrieval.py', *retrieval_args(toy_data, out, *retrieval_case(negative_all_rank, nproc),
                                                              f'emulate_world_size={nproc}'))
    assert 'Train Epoch: [0]' in result.stdout
    reference = assert_runs_agree(out, retrieval_ddp[negative_all_rank, nproc], lr=1e-4)
    # the queue wrapped: it took every step's global batch
    assert reference['global_step'] * 4 * nproc > 12 * nproc


@pytest.mark.slow
def test_two_processes_playing_two_ranks_each_equal_four_processes(toy_data, tmp_path):
    case = ('negative_all_rank=True', 'queue_size=48')
    run_script('train_retrieval.py', *retrieval_args(toy_data, tmp_path / 'ddp', *case), nproc=4)
    result = run_script('train_retrieval.py', *retrieval_args(toy_data, tmp_path / 'emulated', *case,
                                                              'emulate_world_size=4'), nproc=2)
    assert 'Train Epoch: [0]' in result.stdout
    assert_runs_agree(tmp_path / 'emulated', tmp_path / 'ddp', lr=1e-4)


@pytest.mark.slow
def test_accum_steps_is_not_the_multi_gpu_recipe(toy_data, retrieval_ddp, tmp_path):
    """The control: the same global batch per optimizer step through accum_steps."""
    out = tmp_path / 'accum'
    result = run_script('train_retrieval.py', *retrieval_args(toy_data, out, *retrieval_case(False, 2),
                                                              'accum_steps=2'))
    assert 'emulate_world_size=N trains as N GPUs did' in result.stdout
    a = torch.load(out / 'checkpoint_last.pth', weights_only=True)
    b = torch.load(retrieval_ddp[False, 2] / 'checkpoint_last.pth', weights_only=True)
    others, _ = differences(a, b)
    assert max(others.values()) > 1e-2  # far outside the tolerance the emulated run meets


@pytest.mark.slow
def test_emulated_run_under_bf16_autocast(toy_data, tmp_path):
    run_script('train_retrieval.py', *retrieval_args(toy_data, tmp_path, 'negative_all_rank=True', 'queue_size=24',
                                                     'emulate_world_size=2', 'amp=bf16'))
    (line,) = read_json_lines(tmp_path / 'log.txt')
    assert all(math.isfinite(float(line[key])) for key in ('train_loss_ita', 'train_loss_itm'))
    assert torch.load(tmp_path / 'checkpoint_last.pth', weights_only=True)['global_step'] > 0


@pytest.mark.slow
@pytest.mark.parametrize('script, config, overrides, lr', [
    ('pretrain.py', 'pretrain.yaml', ['batch_size=4'], 1e-4),
    ('train_caption.py', 'caption_coco.yaml', ['batch_size=4'], 1e-3),
])
def test_pretrain_and_caption_epoch_emulated_equals_torchrun(tmp_path, script, config, overrides, lr):
    args = ['--config', REPO / 'configs' / 'shapes' / config, '--device', 'cpu', 'max_epoch=1', *overrides]
    run_script(script, *args, '--output_dir', tmp_path / 'ddp', nproc=2)
    run_script(script, *args, '--output_dir', tmp_path / 'emulated', 'emulate_world_size=2')
    assert_runs_agree(tmp_path / 'emulated', tmp_path / 'ddp', lr)


@pytest.mark.slow
def test_killed_emulated_run_resumes_to_the_uninterrupted_end(toy_data, tmp_path):
    args = ['max_epoch=2', 'emulate_world_size=2', 'queue_size=24', 'negative_all_rank=True']
    reference = tmp_path / 'reference'
    run_script('train_retrieval.py', *retrieval_args(toy_data, reference, *args))

    out = tmp_path / 'killed'
    kill_at('train_retrieval.py', *retrieval_args(toy_data, out, *args))
    killed = torch.load(out / 'checkpoint_last.pth', weights_only=True)
    assert killed['epoch'] == 0 and len(killed['rng_states']) == 2  # both emulated ranks' streams

    result = run_script('train_retrieval.py', *retrieval_args(toy_data, out, *args))
    assert 'continuing at epoch 1' in result.stdout
    final = torch.load(out / 'checkpoint_last.pth', weights_only=True)
    expected = torch.load(reference / 'checkpoint_last.pth', weights_only=True)
    assert final['global_step'] == expected['global_step']
    for key, value in expected['model'].items():
        assert torch.equal(value, final['model'][key]), key
    assert read_json_lines(out / 'log.txt') == read_json_lines(reference / 'log.txt')

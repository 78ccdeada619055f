"""The shared training engine (the engine package) on a toy model: accumulation, mixed precision,
NaN stop, checkpoints, resume, and a run killed with SIGKILL that continues where it stopped."""
import copy
import hashlib
import http.server
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from conftest import REPO
from engine import checkpoints, cli, fileio, loop, precision, preflight, training
from engine.config import ENGINE_DEFAULTS, ConfigError
from engine.fileio import CheckpointError, WriteError, save_checkpoint

sys.path.insert(0, str(REPO / 'tests'))
import engine_toy_task as toy  # noqa: E402

CPU = torch.device('cpu')
TOY_SCRIPT = REPO / 'tests' / 'engine_toy_task.py'


def write_toy_config(path, **values):
    config = {'batch_size_train': 8, 'init_lr': 1e-2, 'min_lr': 1e-3, 'weight_decay': 0.05,
              'max_epoch': 3, **values}
    path.write_text(''.join(f'{k}: {v}\n' for k, v in config.items()))
    return path


def toy_argv(config_path, output_dir, *overrides):
    return ['--config', str(config_path), '--output_dir', str(output_dir), '--device', 'cpu',
            '--seed', '7', *overrides]


def linear_setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(24, 6), torch.randn(24, 2)
    return model, TensorDataset(x, y)


def mse_loss_fn(model, batch, epoch, i, num_iters):
    x, y = batch
    return {'loss': F.mse_loss(model(x).float(), y)}


def one_epoch(model, dataset, batch_size, accum_steps, optimizer_cls=torch.optim.SGD, **kw):
    optimizer = optimizer_cls(model.parameters(), lr=0.1)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    state = checkpoints.TrainState()
    config = {**ENGINE_DEFAULTS, 'accum_steps': accum_steps, **kw.pop('config', {})}
    stats = loop.train_one_epoch(model, loader, optimizer, 0, CPU, config, mse_loss_fn,
                                   state=state, **kw)
    return stats, state


# --------------------------------------------------------------------------- accumulation

@pytest.mark.parametrize('optimizer_cls', [torch.optim.SGD, torch.optim.AdamW])
def test_accumulation_equals_one_big_batch(optimizer_cls):
    model, dataset = linear_setup()
    big = copy.deepcopy(model)
    _, state_small = one_epoch(model, dataset, batch_size=6, accum_steps=4, optimizer_cls=optimizer_cls)
    _, state_big = one_epoch(big, dataset, batch_size=24, accum_steps=1, optimizer_cls=optimizer_cls)
    assert state_small.global_step == state_big.global_step == 1
    for (name, p), q in zip(model.named_parameters(), big.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_short_last_group_is_averaged_over_its_size():
    # 4 micro-batches with accum_steps=3: one step over 3 batches, one over the last batch
    model, dataset = linear_setup()
    reference = copy.deepcopy(model)
    _, state = one_epoch(model, dataset, batch_size=6, accum_steps=3)
    assert state.global_step == 2

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = dataset.tensors
    for part in (slice(0, 18), slice(18, 24)):
        optimizer.zero_grad()
        F.mse_loss(reference(x[part]), y[part]).backward()
        optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_loss_weights_scale_each_loss_in_the_sum_but_not_in_the_logs():
    def two_losses(model, batch, epoch, i, num_iters):
        x, y = batch
        out = model(x).float()
        return {'loss_a': F.mse_loss(out[:, 0], y[:, 0]), 'loss_b': F.mse_loss(out[:, 1], y[:, 1])}

    model, dataset = linear_setup()
    weighted, reference = copy.deepcopy(model), copy.deepcopy(model)
    loader = DataLoader(dataset, batch_size=24, shuffle=False)
    optimizer = torch.optim.SGD(weighted.parameters(), lr=0.1)
    stats = loop.train_one_epoch(weighted, loader, optimizer, 0, CPU, dict(ENGINE_DEFAULTS), two_losses,
                                   loss_weights={'loss_a': 0.25})  # loss_b keeps weight 1
    # the same step by hand: 0.25 * a + b
    x, y = dataset.tensors
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    with torch.no_grad():
        out = model(x)
        logged_a = F.mse_loss(out[:, 0], y[:, 0]).item()
    out = reference(x)
    (0.25 * F.mse_loss(out[:, 0], y[:, 0]) + F.mse_loss(out[:, 1], y[:, 1])).backward()
    reference_optimizer.step()
    for p, q in zip(weighted.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    assert float(stats['loss_a']) == pytest.approx(logged_a, abs=1e-3)  # unweighted in the logs


@pytest.fixture
def single_process_group(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "pg"}', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_syncs_only_on_the_optimizer_step(single_process_group):
    model, dataset = linear_setup()
    reference = copy.deepcopy(model)
    ddp, inner = training.wrap_model(model, Namespace(gpu=None))
    assert isinstance(ddp, nn.parallel.DistributedDataParallel) and inner is model

    no_sync_calls = []
    original_no_sync = ddp.no_sync

    def counting_no_sync():
        no_sync_calls.append(1)
        return original_no_sync()
    ddp.no_sync = counting_no_sync

    _, state = one_epoch(ddp, dataset, batch_size=6, accum_steps=4)
    assert state.global_step == 1
    assert len(no_sync_calls) == 3  # micro-steps 0, 1, 2 skip the all-reduce; 3 syncs
    one_epoch(reference, dataset, batch_size=24, accum_steps=1)
    for p, q in zip(inner.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_without_process_group_the_model_is_not_wrapped():
    model, _ = linear_setup()
    wrapped, inner = training.wrap_model(model, Namespace(gpu=None))
    assert wrapped is model and inner is model


# --------------------------------------------------------------------------- precision

@pytest.mark.parametrize('amp,dtype', [('bf16', torch.bfloat16), ('fp16', torch.float16),
                                       ('none', torch.float32)])
def test_autocast_paths_on_cpu(amp, dtype):
    model, dataset = linear_setup()
    seen = []

    def loss_fn(model, batch, epoch, i, num_iters):
        x, y = batch
        out = model(x)
        seen.append(out.dtype)
        return {'loss': F.mse_loss(out.float(), y)}

    config = {**ENGINE_DEFAULTS, 'amp': amp}
    scaler = precision.make_grad_scaler(config, CPU)
    assert not scaler.is_enabled()  # a GradScaler only for fp16 on CUDA
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(dataset, batch_size=8)
    stats = loop.train_one_epoch(model, loader, optimizer, 0, CPU, config, loss_fn, scaler=scaler)
    assert set(seen) == {dtype}
    assert np.isfinite(float(stats['loss']))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_fp16_with_an_enabled_scaler_and_clipping():
    # the scaler path (scale, unscale before clipping, step, update) with a CPU GradScaler
    model, dataset = linear_setup()
    reference = copy.deepcopy(model)
    config = {**ENGINE_DEFAULTS, 'amp': 'fp16', 'clip_grad_norm': 0.05}
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = loop.train_one_epoch(model, DataLoader(dataset, batch_size=24), optimizer, 0, CPU,
                                   config, mse_loss_fn, scaler=scaler)
    assert 'grad_norm' in stats and float(stats['grad_norm']) > 0.05

    # the same step in float32 by hand: clipped to norm 0.05; fp16 forward differs slightly
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = dataset.tensors
    F.mse_loss(reference(x), y).backward()
    total = nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    assert abs(total.item() - float(stats['grad_norm'])) < 1e-2 * total.item()
    ref_optimizer.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=2e-4, rtol=1e-3)


def test_engine_config_is_checked(tmp_path):
    config_path = write_toy_config(tmp_path / 'toy.yaml')
    for override, message in [('amp=fp32', 'amp must be one of'), ('accum_steps=0', 'accum_steps'),
                              ('clip_grad_norm=-1', 'clip_grad_norm')]:
        with pytest.raises(ConfigError, match=message):
            toy.run(toy_argv(config_path, tmp_path / 'out', override))
    assert not (tmp_path / 'out').exists()


# --------------------------------------------------------------------------- bad input

def test_unknown_override_key_fails_before_training(tmp_path, capsys):
    config_path = write_toy_config(tmp_path / 'toy.yaml')
    with pytest.raises(SystemExit):
        toy.run(toy_argv(config_path, tmp_path / 'out', 'init_lrr=0.1'))
    assert "unknown config key 'init_lrr'" in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_engine_keys_may_be_overridden_and_options_mix_with_overrides(tmp_path):
    config_path = write_toy_config(tmp_path / 'toy.yaml')
    args, config = cli.parse_args_and_config(
        'toy', 'unused.yaml', 'out', defaults=toy.TOY_DEFAULTS,
        argv=['amp=bf16', '--config', str(config_path), 'init_lr=0.5', '--evaluate',
              '--opts', 'accum_steps=4'])
    assert config['amp'] == 'bf16' and config['accum_steps'] == 4 and config['init_lr'] == 0.5
    assert config['clip_grad_norm'] is None and config['text_grad_ckpt'] is False
    assert args.evaluate and not args.no_auto_resume and args.resume == ''


def test_unknown_file_key_and_missing_key(tmp_path):
    with pytest.raises(ConfigError, match='unknown key.*max_epochs'):
        toy.run(toy_argv(write_toy_config(tmp_path / 'a.yaml', max_epochs=3), tmp_path / 'out'))
    (tmp_path / 'b.yaml').write_text('batch_size_train: 8\ninit_lr: 0.1\n')
    with pytest.raises(ConfigError, match="missing required key 'min_lr'"):
        toy.run(toy_argv(tmp_path / 'b.yaml', tmp_path / 'out'))


def test_missing_config_resume_data_and_checkpoint_paths(tmp_path, capsys):
    config_path = write_toy_config(tmp_path / 'toy.yaml')
    with pytest.raises(SystemExit):
        toy.run(toy_argv(tmp_path / 'nope.yaml', tmp_path / 'out'))
    assert 'nope.yaml' in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match='--resume.*missing.pth'):
        toy.run(toy_argv(config_path, tmp_path / 'out', '--resume', str(tmp_path / 'missing.pth')))
    config = {'image_root': str(tmp_path / 'images'), 'pretrained': str(tmp_path / 'model.pth')}
    with pytest.raises(FileNotFoundError, match='image_root.*images'):
        preflight.check_paths(config, 'c.yaml', dirs=['image_root'])
    with pytest.raises(FileNotFoundError, match='pretrained.*model.pth'):
        preflight.check_paths(config, 'c.yaml', files=['pretrained'])
    preflight.check_paths({'pretrained': '', 'image_root': str(tmp_path)}, 'c.yaml',
                       dirs=['image_root'], files=['pretrained'])


@pytest.fixture
def http_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200 if self.path == '/model_ok.pth' else 404)
            self.end_headers()

        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_checkpoint_urls_are_checked_before_any_work(tmp_path, monkeypatch, http_server):
    monkeypatch.setenv('BLIP_CACHE', str(tmp_path / 'cache'))
    preflight.check_paths({'pretrained': f'{http_server}/model_ok.pth'}, 'c.yaml', files=['pretrained'])
    with pytest.raises(FileNotFoundError, match=r'c.yaml: pretrained: checkpoint URL .*/missing.pth does not exist'):
        preflight.check_paths({'pretrained': f'{http_server}/missing.pth'}, 'c.yaml', files=['pretrained'])
    with socket.socket() as s:  # a port nobody listens on
        s.bind(('127.0.0.1', 0))
        closed_port = s.getsockname()[1]
    unreachable = f'http://127.0.0.1:{closed_port}/model_base.pth'
    with pytest.raises(FileNotFoundError, match='cannot be reached'):
        preflight.check_paths({'pretrained': unreachable}, 'c.yaml', files=['pretrained'])
    # already downloaded: no request at all
    from engine.fileio import cached_checkpoint_path
    (tmp_path / 'cache').mkdir()
    open(cached_checkpoint_path(unreachable), 'wb').close()
    preflight.check_paths({'pretrained': unreachable}, 'c.yaml', files=['pretrained'])


# --------------------------------------------------------------------------- checkpoints

def file_digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nan_loss_stops_and_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    config_path = write_toy_config(tmp_path / 'toy.yaml', nan_at=[1, 2])
    out = tmp_path / 'out'
    last = out / checkpoints.LAST_CHECKPOINT
    digests = []
    real_save = save_checkpoint

    def recording_save(obj, path, **kwargs):
        real_save(obj, path, **kwargs)
        if os.path.basename(path) == checkpoints.LAST_CHECKPOINT:
            digests.append(file_digest(last))
    monkeypatch.setattr(checkpoints, 'save_checkpoint', recording_save)

    with pytest.raises(loop.NonFiniteLossError, match=r'loss_mse is nan at epoch 1, iteration 2'):
        toy.run(toy_argv(config_path, out))
    assert len(digests) == 1 and file_digest(last) == digests[0]
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint['epoch'] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint['model'].values() if v.is_floating_point())
    assert len((out / 'log.txt').read_text().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ['checkpoint_best.pth', 'checkpoint_last.pth',
                                                     checkpoints.EVALUATED, 'config.yaml', 'log.txt']


def rng_draws():
    return torch.rand(4), np.random.rand(4), random.random()


def test_resume_restores_model_optimizer_epoch_and_rng(tmp_path):
    torch.manual_seed(0)
    model = toy.ToyModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = DataLoader(toy.make_data(32), batch_size=8, shuffle=True)
    config = {**ENGINE_DEFAULTS, 'max_epoch': 2}
    state = checkpoints.TrainState()
    loop.train_one_epoch(model, loader, optimizer, 0, CPU, config, toy.make_loss_fn(
        {'pause_at': None, 'nan_at': None}, tmp_path), state=state)
    state.best, state.best_epoch = 0.5, 0
    state.extra['test_result'] = {'r_mean': 12.5}
    checkpoints.save_last_checkpoint(str(tmp_path), model, optimizer, None, config, 0, state)
    expected_draws = rng_draws()

    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    fresh = toy.ToyModel()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    args = Namespace(resume='', evaluate=False, no_auto_resume=False, output_dir=str(tmp_path))
    restored = checkpoints.resume(args, fresh, fresh_optimizer)

    assert restored == checkpoints.TrainState(start_epoch=1, global_step=4, best=0.5, best_epoch=0,
                                         extra={'test_result': {'r_mean': 12.5}})
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    assert fresh.seen.item() == 32
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved['param_groups'] == loaded['param_groups']
    for index, values in saved['state'].items():
        for name, tensor in values.items():
            assert torch.equal(tensor, loaded['state'][index][name]), (index, name)
    for expected, got in zip(expected_draws, rng_draws()):
        np.testing.assert_array_equal(np.asarray(expected), np.asarray(got))


def test_resume_from_the_original_checkpoint_format(tmp_path):
    # pretrain.py's --checkpoint: {'model', 'optimizer', 'config', 'epoch'} as the original saves
    model = toy.ToyModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    checkpoints.save_model(str(tmp_path / 'checkpoint_03.pth'), model, optimizer, {'init_lr': 1e-2}, 3)
    fresh = toy.ToyModel()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    args = Namespace(resume=str(tmp_path / 'checkpoint_03.pth'), evaluate=False, no_auto_resume=False,
                     output_dir=str(tmp_path))
    state = checkpoints.resume(args, fresh, fresh_optimizer)
    assert state == checkpoints.TrainState(start_epoch=4)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    assert fresh_optimizer.state_dict()['state'][0]['step'] == 1

    torch.save(model.state_dict(), tmp_path / 'bare.pth')
    with pytest.raises(ValueError, match='not a training checkpoint.*pretrained='):
        checkpoints.resume(Namespace(**{**vars(args), 'resume': str(tmp_path / 'bare.pth')}), fresh, fresh_optimizer)


def test_a_truncated_or_unsafe_resume_checkpoint_gets_a_clear_error(tmp_path, monkeypatch):
    model = toy.ToyModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    checkpoints.save_last_checkpoint(str(tmp_path), model, optimizer, None, dict(ENGINE_DEFAULTS), 0,
                                checkpoints.TrainState())
    last = tmp_path / checkpoints.LAST_CHECKPOINT
    last.write_bytes(last.read_bytes()[:-200])  # killed while copying the output folder
    args = Namespace(resume='', evaluate=False, no_auto_resume=False, output_dir=str(tmp_path))
    with pytest.raises(CheckpointError) as error:
        checkpoints.resume(args, toy.ToyModel(), optimizer)
    message = str(error.value)
    assert str(last) in message and 'truncated or corrupt' in message and '--no_auto_resume' in message
    with pytest.raises(CheckpointError, match='truncated or corrupt') as error:
        checkpoints.resume(Namespace(**{**vars(args), 'resume': str(last)}), toy.ToyModel(), optimizer)
    assert '--no_auto_resume' not in str(error.value)  # asked for by name: nothing to fall back on

    unsafe = tmp_path / 'unsafe.pth'
    torch.save({'model': model.state_dict(), 'args': Namespace(lr=1)}, unsafe)
    monkeypatch.delenv('BLIP_UNSAFE_LOAD', raising=False)
    with pytest.raises(CheckpointError, match='BLIP_UNSAFE_LOAD=1'):
        checkpoints.resume(Namespace(**{**vars(args), 'resume': str(unsafe)}), toy.ToyModel(), optimizer)


def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    config_path = write_toy_config(tmp_path / 'toy.yaml')
    reference = toy.run(toy_argv(config_path, tmp_path / 'reference'))
    out = tmp_path / 'damaged'
    with pytest.raises(KeyboardInterrupt):
        toy.run(toy_argv(config_path, out, 'stop_after=1'))
    last, previous = out / checkpoints.LAST_CHECKPOINT, out / checkpoints.PREVIOUS_CHECKPOINT
    assert torch.load(previous, weights_only=True)['epoch'] == 0 and torch.load(last, weights_only=True)['epoch'] == 1
    damaged = last.read_bytes()[:-300]  # e.g. a disk error, or a half-finished copy of the folder
    last.write_bytes(damaged)
    capsys.readouterr()
    resumed = toy.run(toy_argv(config_path, out))
    printed = capsys.readouterr().out
    assert f'WARNING: {last} is truncated or corrupt' in printed
    assert f'Resuming from {previous} instead (epoch 0, the checkpoint before it)' in printed
    assert (out / 'checkpoint_last.pth.damaged').read_bytes() == damaged  # kept for a look, not reused
    assert 'evaluating epoch 0 (its evaluation had not finished), then continuing at epoch 1' in printed
    for key, value in reference.state_dict().items():  # epoch 1 redone: the same run
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert (out / 'log.txt').read_text() == (tmp_path / 'reference' / 'log.txt').read_text()

    # with both damaged, the error says how to start afresh; keep_previous_last=false keeps one file
    previous.write_bytes(b'')
    last.write_bytes(damaged)
    with pytest.raises(CheckpointError, match='--no_auto_resume'):
        toy.run(toy_argv(config_path, out))
    single = tmp_path / 'single'
    toy.run(toy_argv(config_path, single, 'keep_previous_last=false'))
    assert not (single / checkpoints.PREVIOUS_CHECKPOINT).exists() and (single / checkpoints.LAST_CHECKPOINT).exists()


def test_no_resume_when_evaluating_or_disabled(tmp_path):
    (tmp_path / checkpoints.LAST_CHECKPOINT).write_bytes(b'')
    base = dict(resume='', output_dir=str(tmp_path))
    assert checkpoints.find_resume_checkpoint(Namespace(**base, evaluate=False, no_auto_resume=False))
    assert not checkpoints.find_resume_checkpoint(Namespace(**base, evaluate=True, no_auto_resume=False))
    assert not checkpoints.find_resume_checkpoint(Namespace(**base, evaluate=False, no_auto_resume=True))


def test_last_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    model = toy.ToyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = dict(ENGINE_DEFAULTS)
    checkpoints.save_last_checkpoint(str(tmp_path), model, optimizer, None, config, 0, checkpoints.TrainState())
    last = tmp_path / checkpoints.LAST_CHECKPOINT
    before = file_digest(last)

    def crashing_save(obj, f, *args, **kwargs):  # dies half-way through writing
        if isinstance(f, (str, os.PathLike)):
            with open(f, 'wb') as handle:
                handle.write(b'PK\x03\x04 half a checkpoint')
        else:
            f.write(b'PK\x03\x04 half a checkpoint')
        raise OSError('No space left on device')
    monkeypatch.setattr(torch, 'save', crashing_save)
    with pytest.raises(OSError, match='No space left'):
        checkpoints.save_last_checkpoint(str(tmp_path), model, optimizer, None, config, 1, checkpoints.TrainState())
    monkeypatch.undo()

    assert file_digest(last) == before
    assert torch.load(last, weights_only=True)['epoch'] == 0
    assert [p.name for p in tmp_path.iterdir()] == [checkpoints.LAST_CHECKPOINT]


def test_sigkill_mid_epoch_then_resume_continues(tmp_path):
    config_path = write_toy_config(tmp_path / 'toy.yaml')

    # the uninterrupted run, in this process
    reference = toy.run(toy_argv(config_path, tmp_path / 'reference'))

    # the same run in a subprocess, killed in the middle of epoch 1 ...
    out = tmp_path / 'killed'
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    command = [sys.executable, str(TOY_SCRIPT), *toy_argv(config_path, out)]
    process = subprocess.Popen(command + ['pause_at=[1, 2]'], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / 'paused').exists():
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, 'the toy run never reached epoch 1'
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert torch.load(out / checkpoints.LAST_CHECKPOINT, weights_only=True)['epoch'] == 0

    # ... and restarted: it resumes from the end of epoch 0 and finishes as the reference did
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'continuing at epoch 1' in result.stdout
    final = torch.load(out / checkpoints.LAST_CHECKPOINT, weights_only=True)
    assert final['epoch'] == 2 and final['global_step'] == 3 * 6
    for key, value in reference.state_dict().items():
        assert torch.equal(value, final['model'][key]), key
    log_lines = (out / 'log.txt').read_text().splitlines()
    assert log_lines == (tmp_path / 'reference' / 'log.txt').read_text().splitlines()


def test_prepare_synthetic_data_generates_once(tmp_path, monkeypatch):
    import data.synthetic
    root = tmp_path / 'shapes'
    config = {'synthetic': {'root': str(root), 'seed': 0, 'num_images': 8, 'num_videos': 1}}
    preflight.prepare_synthetic_data(config)
    assert (root / 'synthetic.json').is_file()
    assert (root / 'annotation' / 'coco_karpathy_train.json').is_file()

    def fail(*args, **kwargs):
        raise AssertionError('generated twice')
    monkeypatch.setattr(data.synthetic, 'make_synthetic', fail)
    preflight.prepare_synthetic_data(config)          # already there: no second generation
    preflight.prepare_synthetic_data({'synthetic': None})  # real-data configs: nothing to do

    # a dataset from another version of data/synthetic.py is written again
    marker = json.loads((root / 'synthetic.json').read_text())
    (root / 'synthetic.json').write_text(json.dumps({**marker, 'version': marker['version'] - 1}))
    written = []
    monkeypatch.setattr(data.synthetic, 'make_synthetic', lambda root, **spec: written.append(spec))
    preflight.prepare_synthetic_data(config)
    assert written == [{'seed': 0, 'num_images': 8, 'num_videos': 1}]
    assert not (root / 'synthetic.json').exists()  # removed first: a crash cannot leave it "finished"


def test_ddp_starts_every_rank_with_rank_0s_parameters_and_buffers(tmp_path):
    from script_runner import run_script
    result_file = tmp_path / 'result.json'
    run_script('tests/dist_worker_engine.py', result_file, nproc=2, timeout=300)
    result = json.loads(result_file.read_text())
    assert result == {'queues_equal': True, 'weights_equal': True}


def test_temporaries_of_a_killed_save_are_removed_at_start(tmp_path, capsys):
    for name in ('.checkpoint_last.pth.k3j2.tmp', '.config.yaml.x1.tmp', 'checkpoint_last.pth', 'notes.tmp', '.keep'):
        (tmp_path / name).write_text('x')
    fileio.remove_stale_temporaries(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.keep', 'checkpoint_last.pth', 'notes.tmp']
    assert '.checkpoint_last.pth.k3j2.tmp' in capsys.readouterr().out


def test_a_resumed_run_logs_each_epoch_once(tmp_path, capsys):
    # killed after logging epoch 1 but before checkpoint_last.pth of epoch 1 was written: the
    # resumed run redoes epoch 1, and log.txt must not hold it twice
    config_path = write_toy_config(tmp_path / 'toy.yaml')
    reference = tmp_path / 'reference'
    toy.run(toy_argv(config_path, reference))
    out = tmp_path / 'killed'
    toy.run(toy_argv(config_path, out, 'max_epoch=1'))  # epoch 0 done and checkpointed
    with open(out / 'log.txt', 'a') as f:
        f.write(json.dumps({'train_loss': 'stale', 'epoch': 1}) + '\n{"train_loss": "cut')
    toy.run(toy_argv(config_path, out))
    assert '2 line(s) of epoch 1 or later removed' in capsys.readouterr().out
    assert (out / 'log.txt').read_text().splitlines() == (reference / 'log.txt').read_text().splitlines()


def test_a_full_disk_while_saving_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    model = toy.ToyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = dict(ENGINE_DEFAULTS)
    checkpoints.save_last_checkpoint(str(tmp_path), model, optimizer, None, config, 0, checkpoints.TrainState())
    last = tmp_path / checkpoints.LAST_CHECKPOINT
    before = file_digest(last)
    real_save = torch.save
    failures = [OSError(28, 'No space left on device'),  # ENOSPC from a plain write
                RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0')]  # torch's zip writer
    for failure in failures:
        def full_disk(obj, f, *args, **kwargs):
            f.write(b'PK\x03\x04 the first bytes')
            raise failure
        monkeypatch.setattr(torch, 'save', full_disk)
        if isinstance(failure, RuntimeError):  # torch's message does not say why: the free space does
            monkeypatch.setattr(fileio.shutil, 'disk_usage', lambda folder: Namespace(total=10, used=10, free=0))
        with pytest.raises(WriteError) as error:
            checkpoints.save_last_checkpoint(str(tmp_path), model, optimizer, None, config, 1, checkpoints.TrainState())
        assert str(error.value).startswith(f'could not write {last}: no space left on the device')
        assert str(error.value).endswith('the previous file is unchanged')
        monkeypatch.setattr(torch, 'save', real_save)
        assert file_digest(last) == before and [p.name for p in tmp_path.iterdir()] == [checkpoints.LAST_CHECKPOINT]
    # other failures keep their own message, still naming the file
    monkeypatch.undo()
    monkeypatch.setattr(torch, 'save', lambda obj, f: (_ for _ in ()).throw(PermissionError(13, 'Permission denied')))
    with pytest.raises(WriteError, match=f'could not write {last}: .*Permission denied'):
        checkpoints.save_last_checkpoint(str(tmp_path), model, optimizer, None, config, 1, checkpoints.TrainState())


def test_each_epoch_says_where_the_run_is_and_how_long_the_rest_takes(tmp_path, capsys):
    toy.run(toy_argv(write_toy_config(tmp_path / 'toy.yaml'), tmp_path / 'out'))
    printed = capsys.readouterr().out
    assert re.search(r'epoch 1/3 trained in 0:00:\d\d; the other 2 epoch\(s\) take about 0:00:\d\d more', printed)
    assert re.search(r'epoch 3/3 trained in 0:00:\d\d; training done', printed)


def test_a_failing_evaluation_never_costs_the_epoch(tmp_path, capsys):
    # checkpoint_last.pth is written between an epoch's training and its evaluation: a run whose
    # evaluation fails resumes with that epoch trained, evaluates it, and ends as the reference
    config_path = write_toy_config(tmp_path / 'toy.yaml')
    reference = toy.run(toy_argv(config_path, tmp_path / 'reference'))
    out = tmp_path / 'failed'
    with pytest.raises(RuntimeError, match='evaluation of epoch 1 failed'):
        toy.run(toy_argv(config_path, out, 'fail_eval_at=1'))
    saved = torch.load(out / checkpoints.LAST_CHECKPOINT, weights_only=True)
    assert saved['epoch'] == 1 and saved['evaluated'] is False and 'loss_mse' in saved['train_stats']
    capsys.readouterr()
    resumed = toy.run(toy_argv(config_path, out))
    assert 'evaluating epoch 1 (its evaluation had not finished), then continuing at epoch 2' in capsys.readouterr().out
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert (out / 'log.txt').read_text() == (tmp_path / 'reference' / 'log.txt').read_text()
    assert file_digest(out / checkpoints.BEST_CHECKPOINT) == file_digest(tmp_path / 'reference' / checkpoints.BEST_CHECKPOINT)


def test_a_finished_epoch_is_not_evaluated_again_on_resume(tmp_path, capsys):
    config_path = write_toy_config(tmp_path / 'toy.yaml')
    reference = toy.run(toy_argv(config_path, tmp_path / 'reference'))
    out = tmp_path / 'continued'
    with pytest.raises(KeyboardInterrupt):
        toy.run(toy_argv(config_path, out, 'stop_after=1'))  # stopped after epoch 1, evaluation included
    assert torch.load(out / checkpoints.EVALUATED, weights_only=True)['epoch'] == 1
    capsys.readouterr()
    continued = toy.run(toy_argv(config_path, out))
    printed = capsys.readouterr().out
    assert 'continuing at epoch 2' in printed and 'evaluating epoch' not in printed and 'removed' not in printed
    for key, value in reference.state_dict().items():  # RNG states from after the evaluation
        assert torch.equal(value, continued.state_dict()[key]), key
    assert (out / 'log.txt').read_text() == (tmp_path / 'reference' / 'log.txt').read_text()

    # the record of epoch 1 is not taken for the checkpoint of epoch 2
    again = tmp_path / 'again'
    with pytest.raises(KeyboardInterrupt):
        toy.run(toy_argv(config_path, again, 'stop_after=1'))
    with pytest.raises(RuntimeError, match='evaluation of epoch 2 failed'):
        toy.run(toy_argv(config_path, again, 'fail_eval_at=2'))
    assert torch.load(again / checkpoints.EVALUATED, weights_only=True)['epoch'] == 1
    capsys.readouterr()
    toy.run(toy_argv(config_path, again))
    assert 'evaluating epoch 2 (its evaluation had not finished)' in capsys.readouterr().out
    assert (again / 'log.txt').read_text() == (tmp_path / 'reference' / 'log.txt').read_text()

"""utils.py in one process: LR schedules, logging, seeding, atomic checkpoints and the
distributed helpers without a process group."""
import math
import os
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import utils
from engine import fileio
from engine.fileio import save_checkpoint

# ---------------------------------------------------------------------------------------
# Learning-rate schedules: the original formulas, on every param group
# ---------------------------------------------------------------------------------------

def _optimizer():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    return torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 9.0}], lr=9.0)


def _lrs(optimizer):
    return [group["lr"] for group in optimizer.param_groups]


@pytest.mark.parametrize("epoch", [0, 1, 3, 5, 6])
def test_cosine_lr_schedule(epoch):
    opt = _optimizer()
    init_lr, min_lr, max_epoch = 1e-5, 1e-7, 6
    lr = utils.cosine_lr_schedule(opt, epoch, max_epoch, init_lr, min_lr)
    expected = (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / max_epoch)) + min_lr
    assert lr == pytest.approx(expected, rel=1e-12)
    assert _lrs(opt) == [lr, lr]


def test_cosine_lr_schedule_end_points():
    opt = _optimizer()
    assert utils.cosine_lr_schedule(opt, 0, 10, 2e-5, 0) == pytest.approx(2e-5)
    assert utils.cosine_lr_schedule(opt, 5, 10, 2e-5, 0) == pytest.approx(1e-5)
    assert utils.cosine_lr_schedule(opt, 10, 10, 2e-5, 1e-6) == pytest.approx(1e-6)


@pytest.mark.parametrize("step,expected", [(0, 1e-6), (1500, 1e-6 + (3e-4 - 1e-6) * 0.5),
                                           (3000, 3e-4), (4000, 3e-4)])
def test_warmup_lr_schedule(step, expected):
    opt = _optimizer()
    lr = utils.warmup_lr_schedule(opt, step, 3000, 1e-6, 3e-4)
    assert lr == pytest.approx(expected, rel=1e-12)
    assert _lrs(opt) == [lr, lr]


@pytest.mark.parametrize("epoch", [0, 1, 4, 19, 200])
def test_step_lr_schedule(epoch):
    opt = _optimizer()
    lr = utils.step_lr_schedule(opt, epoch, 3e-4, 1e-6, 0.9)
    assert lr == pytest.approx(max(1e-6, 3e-4 * 0.9 ** epoch), rel=1e-12)
    assert _lrs(opt) == [lr, lr]
    if epoch == 200:
        assert lr == 1e-6  # floored at min_lr


# ---------------------------------------------------------------------------------------
# SmoothedValue / MetricLogger
# ---------------------------------------------------------------------------------------

def test_smoothed_value_statistics():
    meter = utils.SmoothedValue(window_size=3)
    for v in [1.0, 2.0, 3.0, 4.0, 10.0]:
        meter.update(v)
    # window holds [3, 4, 10]; the global figures cover all five values
    assert meter.median == 4.0
    assert meter.avg == pytest.approx(17.0 / 3)
    assert meter.max == 10.0
    assert meter.value == 10.0
    assert meter.global_avg == pytest.approx(4.0)
    assert str(meter) == "4.0000 (4.0000)"


def test_smoothed_value_weighted_update_and_fmt():
    meter = utils.SmoothedValue(window_size=5, fmt="{value:.2f}|{global_avg:.3f}")
    meter.update(2.0, n=3)
    meter.update(6.0, n=1)
    assert meter.count == 4
    assert meter.global_avg == pytest.approx(3.0)
    assert str(meter) == "6.00|3.000"


def test_smoothed_value_sync_is_noop_without_group():
    meter = utils.SmoothedValue()
    meter.update(5.0)
    meter.synchronize_between_processes()
    assert (meter.count, meter.total) == (1, 5.0)


def test_metric_logger_update_and_averages():
    logger = utils.MetricLogger(delimiter="  ")
    logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    logger.update(lr=1e-4, loss=torch.tensor(2.0))
    logger.update(lr=3e-4, loss=4)
    assert logger.loss.global_avg == pytest.approx(3.0)
    assert str(logger.lr) == "0.000300"
    assert logger.global_avg() == "lr: 0.0002  loss: 3.0000"
    assert "loss: 2.0000 (3.0000)" in str(logger)  # torch.median takes the lower middle
    logger.synchronize_between_processes()  # no group: nothing changes
    assert logger.loss.count == 2
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        logger.missing
    with pytest.raises(TypeError, match="'loss'"):
        logger.update(loss="high")


def test_metric_logger_log_every_prints_eta(capsys):
    logger = utils.MetricLogger(delimiter="  ")
    seen = []
    for i in logger.log_every(range(5), print_freq=2, header="Train Epoch: [0]"):
        logger.update(loss=float(i))
        seen.append(i)
    assert seen == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().out.strip().splitlines()
    progress = [line for line in lines if "eta:" in line]
    # printed at i = 0, 2, 4 (every print_freq steps and the last one)
    assert [re.search(r"\[\s*(\d+)/5\]", line).group(1) for line in progress] == ["0", "2", "4"]
    for line in progress:
        assert line.startswith("Train Epoch: [0]")
        assert re.search(r"eta: \d+:\d{2}:\d{2}", line)
        assert "loss:" in line and "time:" in line and "data:" in line
    assert re.search(r"Train Epoch: \[0\] Total time: \d+:\d{2}:\d{2} \(\d+\.\d{4} s / it\)",
                     lines[-1])


def test_compute_acc_and_n_params():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    label = torch.tensor([1, 1, 1])
    assert utils.compute_acc(logits, label) == pytest.approx(2 / 3)
    assert utils.compute_acc(logits, label, reduction="none").tolist() == [1.0, 0.0, 1.0]
    model = torch.nn.Linear(100, 20)  # 2020 parameters
    assert utils.compute_n_params(model) == "2.0K"
    assert utils.compute_n_params(model, return_str=False) == 2020
    assert utils.compute_n_params(torch.nn.Linear(1000, 1000)) == "1.0M"


# ---------------------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------------------

def _draw():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_set_seed_is_deterministic():
    utils.set_seed(42)
    first = _draw()
    utils.set_seed(42)
    assert _draw() == first
    utils.set_seed(43)  # seed + rank gives each rank its own stream
    assert _draw() != first


# ---------------------------------------------------------------------------------------
# Atomic checkpoints
# ---------------------------------------------------------------------------------------

class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_save_checkpoint_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "checkpoint.pth"
    save_checkpoint({"epoch": 1, "w": torch.ones(2)}, path)
    assert torch.load(path)["epoch"] == 1
    save_checkpoint({"epoch": 2, "w": torch.zeros(2)}, path)
    loaded = torch.load(path)
    assert loaded["epoch"] == 2 and torch.equal(loaded["w"], torch.zeros(2))
    assert sorted(os.listdir(path.parent)) == ["checkpoint.pth"]  # no temporary file left


def test_save_checkpoint_failure_keeps_old_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint({"epoch": 2, "bad": _Unpicklable()}, path)
    assert path.read_bytes() == before
    assert torch.load(path) == {"epoch": 1}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]


def test_save_checkpoint_failure_in_rename_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1}, path)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"epoch": 1}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]


# ---------------------------------------------------------------------------------------
# Distributed helpers in one process, no group
# ---------------------------------------------------------------------------------------

@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_init_distributed_mode_without_env(no_torchrun_env):
    args = SimpleNamespace(device="cpu", dist_url="env://", distributed=True)
    utils.init_distributed_mode(args)
    assert args.distributed is False
    assert (args.rank, args.world_size) == (0, 1)
    assert not utils.is_dist_avail_and_initialized()


def test_single_process_queries(no_torchrun_env):
    assert not utils.is_dist_avail_and_initialized()
    assert utils.get_rank() == 0
    assert utils.get_world_size() == 1
    assert utils.is_main_process()
    utils.barrier()  # returns at once


def test_concat_all_gather_returns_input():
    x = torch.randn(4, 3)
    assert utils.concat_all_gather(x) is x


def test_all_gather_with_grad_returns_input_and_keeps_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    gathered = utils.all_gather_with_grad(x)
    assert gathered is x
    (gathered * torch.arange(12.0).view(4, 3)).sum().backward()
    assert torch.equal(x.grad, torch.arange(12.0).view(4, 3))


def test_all_reduce_helpers_without_group():
    t = torch.tensor([1.0, 2.0])
    assert utils.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert utils.all_reduce_mean(t) is t and t.tolist() == [1.0, 2.0]

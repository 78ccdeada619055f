"""utils' distributed helpers under a real two-process `torchrun` with gloo on the CPU."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from engine.cli import add_common_args

WORLD_SIZE = 2
WORKER = REPO / "tests" / "dist_worker_utils.py"


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist_utils")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=180)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun workers hung (killed after {e.timeout}s):\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def test_init_distributed_mode_sets_args(worker_results):
    for rank, res in enumerate(worker_results):
        assert res["args"] == {"distributed": True, "rank": rank, "world_size": WORLD_SIZE,
                               "gpu": rank, "dist_backend": "gloo"}
        assert res["initialized"] is True


def test_rank_and_world_size(worker_results):
    for rank, res in enumerate(worker_results):
        assert res["rank"] == rank
        assert res["world_size"] == WORLD_SIZE
        assert res["is_main_process"] == (rank == 0)


def test_concat_all_gather_values(worker_results):
    expected = torch.cat([torch.tensor([[r, r + 0.5], [10.0 * r, -r]]) for r in range(WORLD_SIZE)])
    for res in worker_results:
        assert torch.equal(torch.tensor(res["concat_all_gather"]), expected)
        assert res["concat_all_gather_requires_grad"] is False


def test_all_gather_with_grad_values_and_gradients(worker_results):
    xs = [torch.tensor(res["x"]) for res in worker_results]
    gathered = torch.cat(xs)
    for res in worker_results:
        assert torch.equal(torch.tensor(res["all_gather_with_grad"]), gathered)
        assert res["all_gather_with_grad_requires_grad"] is True

    # loss_r = sum((r+1) * g**2) + sum(W_r * g) with W_r = (r+1) * arange(numel).view_as(g).
    # Rank k's slice feeds every rank's loss, so its gradient is the sum over r of
    #   2 * (r+1) * x_k + W_r[slice k].
    rows = xs[0].shape[0]
    base = torch.arange(float(gathered.numel())).view_as(gathered)
    for k, res in enumerate(worker_results):
        expected = sum(2 * (r + 1) * xs[k] + (r + 1) * base[k * rows:(k + 1) * rows]
                       for r in range(WORLD_SIZE))
        assert torch.allclose(torch.tensor(res["x_grad"]), expected)


def test_all_reduce_helpers(worker_results):
    for res in worker_results:
        assert res["all_reduce_sum"] == [3.0, 4.0]
        assert res["all_reduce_mean"] == [1.5, 2.0]


def test_metric_logger_synchronizes(worker_results):
    for res in worker_results:
        assert res["meter_count"] == 3      # 1 value on rank 0 + 2 on rank 1
        assert res["meter_total"] == 1.0    # 0 + (0 + 1)


def test_barrier_waits_for_every_rank(worker_results):
    for res in worker_results:
        assert res["markers_after_barrier"] == [f"marker{r}" for r in range(WORLD_SIZE)]


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    import argparse
    import datetime

    import pytest

    import utils
    seen = {}
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    monkeypatch.setattr(utils.dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(utils.dist, 'init_process_group', lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(utils, 'barrier', lambda: None)
    monkeypatch.setattr(utils, 'setup_for_distributed', lambda is_master: None)

    class Store:
        def set_timeout(self, timeout):
            seen['store_timeout'] = timeout
    store = Store()
    monkeypatch.setattr(utils.dist, 'rendezvous', lambda url, rank, world, timeout: iter([(store, rank, world)]))
    parser = add_common_args(argparse.ArgumentParser())
    args = parser.parse_args(['--device', 'cpu', '--dist_timeout', '90'])
    assert utils.init_distributed_mode(args) is store  # the rank monitor shares it (engine.training.setup)
    assert seen['timeout'] == seen['store_timeout'] == datetime.timedelta(minutes=90) and seen['backend'] == 'gloo'
    assert seen['store'] is store
    utils.init_distributed_mode(parser.parse_args(['--device', 'cpu']))
    assert seen['timeout'] == datetime.timedelta(minutes=10)  # the default: a few minutes
    args.dist_timeout = 0
    with pytest.raises(ValueError, match='--dist_timeout must be a positive number of minutes, got 0'):
        utils.init_distributed_mode(args)


def _start_two_ranks(mode, minutes):
    """The two processes of dist_worker_stall.py, as torchrun would start them (env://)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name('dist_worker_stall.py')
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2',
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), OMP_NUM_THREADS='1')
        procs.append(subprocess.Popen([sys.executable, str(worker), mode, str(minutes)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_a_frozen_rank_is_named_before_the_timeout_ends_the_job():
    procs = _start_two_ranks('freeze', 0.25)  # 15 s: rank 1 is reported after 3 s without a tick
    try:
        out, err = procs[0].communicate(timeout=90)
    finally:
        for proc in procs:
            proc.kill()
    assert procs[0].returncode != 0, out + err  # the barrier timed out
    assert 'rank 0 done' not in out
    message = next(line for line in err.splitlines() if 'has not responded' in line)
    assert message.startswith('rank 1 (host ') and f'pid {procs[1].pid})' in message, message
    assert 'it was at Train Epoch: [0] 3/10' in message
    assert 'the job fails when --dist_timeout (0.25 min) has passed' in message
    assert message == [line for line in err.splitlines() if 'has not responded' in line][-1]  # said once


def test_ranks_that_finish_at_different_times_are_not_reported():
    procs = _start_two_ranks('finish', 0.25)
    results = [proc.communicate(timeout=90) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], results
    assert all(f'rank {r} done' in out for r, (out, _) in enumerate(results))
    assert not any('has not responded' in err for _, err in results), results

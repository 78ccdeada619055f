"""One run per output folder (engine/outlock.py): a second run in a folder in use stops at once
naming the holder, and leaves the first run's outputs alone; a lock left by a run that is gone
is taken over; a run's folder is free again when it ends."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO
from engine import outlock
from script_runner import read_json_lines, run_script

CONFIG = REPO / 'configs' / 'shapes' / 'retrieval_coco.yaml'


def args(out, *overrides):
    return ['--config', CONFIG, '--output_dir', out, '--device', 'cpu', 'max_epoch=1', 'k_test=4', *overrides]


@pytest.mark.slow
def test_a_second_run_in_a_folder_in_use_stops_and_the_first_is_unharmed(tmp_path):
    out = tmp_path / 'run'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    first = subprocess.Popen([sys.executable, str(REPO / 'train_retrieval.py'), *map(str, args(out))], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (out / 'config.yaml').exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        holder = json.loads((out / outlock.LOCK_NAME).read_text())
        assert holder['pid'] == first.pid

        second = run_script('train_retrieval.py', *args(out, 'init_lr=5e-5'), check=False)
        assert second.returncode == 2 and 'Traceback' not in second.stderr
        assert f'is in use by another run (pid {first.pid} on' in second.stderr
        output, _ = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, output[-3000:]
    assert 'init_lr: 5e-05' not in (out / 'config.yaml').read_text()  # the first run's config
    assert len(read_json_lines(out / 'log.txt')) == 1
    assert not (out / outlock.LOCK_NAME).exists()  # free again


def test_a_lock_of_a_run_that_is_gone_is_taken_over_and_given_back(tmp_path, capsys):
    gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    lock = tmp_path / outlock.LOCK_NAME
    import socket
    lock.write_text(json.dumps({'host': socket.gethostname(), 'pid': int(gone.stdout), 'started': 'earlier'}))
    outlock.acquire(tmp_path)
    assert 'is gone; taking over its lock' in capsys.readouterr().out
    assert json.loads(lock.read_text())['pid'] == os.getpid()
    outlock.acquire(tmp_path)  # this process again: fine
    outlock.release(tmp_path)
    assert not lock.exists()

    # another host's lock, refreshed recently: in use; once stale: taken over
    lock.write_text(json.dumps({'host': 'elsewhere', 'pid': 1, 'started': 'earlier'}))
    with pytest.raises(outlock.OutputInUseError, match='pid 1 on elsewhere'):
        outlock.acquire(tmp_path)
    old = time.time() - outlock.STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    outlock.acquire(tmp_path)
    assert json.loads(lock.read_text())['host'] != 'elsewhere'
    outlock.release(tmp_path)

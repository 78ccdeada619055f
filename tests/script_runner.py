"""Run a task script as the user would: one plain process, or N processes under torchrun.

Shared by the script tests, so every task is exercised the same way (CPU, gloo, one
thread per process, a free rendezvous port, a timeout that turns a hang into a failure).
"""
import collections
import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from engine import cli, preflight

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def one_thread():
    """Run in-process script calls on one torch thread, as run_script does for subprocesses:
    the tiny toy models gain little from a second thread, and two threads per process thrash
    when several processes share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def script_config(script, config_path):
    """(args, config) as task `script`'s run() reads `config_path` (relative to the repository):
    the script's defaults and required keys, no command-line arguments."""
    return cli.parse_args_and_config('t', str(REPO / config_path), 'out', defaults=script.TASK_DEFAULTS,
                                        required=script.REQUIRED_KEYS,
                                        known=getattr(script, 'OPTIONAL_KEYS', ()), argv=[])


@contextlib.contextmanager
def in_repository():
    """Run in-process script calls from the repository folder: the toy configs' data paths are
    relative to it."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(cwd)


@contextlib.contextmanager
def toy_setup(script, config_path):
    """script_config() of a toy config, as run() prepares it before building the model: from
    the repository folder (the toy configs' data paths are relative to it), with the synthetic
    data written and the seed set."""
    import utils
    args, config = script_config(script, config_path)
    with in_repository():
        preflight.check_paths(config, str(config_path))
        utils.set_seed(args.seed)
        yield args, config


def image_blind_guesses(training_pairs, texts):
    """The best guesses a model that never looks at the image could learn from
    training_pairs [(text, answer)]: for each of `texts`, the answer paired with it most often
    in training (the most common answer overall for a text never seen there)."""
    answers = collections.defaultdict(collections.Counter)
    for text, answer in training_pairs:
        answers[text][answer] += 1
    overall = sum(answers.values(), collections.Counter())
    return [(answers.get(text) or overall).most_common(1)[0][0] for text in texts]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_script(script, *args, nproc=1, timeout=600, check=True, env=None):
    """Run REPO/script with args; nproc > 1 runs it under torchrun. Returns CompletedProcess.

    With check=True a non-zero exit fails with the script's output in the message.
    """
    command = [sys.executable]
    if nproc > 1:
        command += ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
                    '--master_addr=127.0.0.1', f'--master_port={free_port()}']
    command += [str(REPO / script), *map(str, args)]
    full_env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1', **(env or {})}
    full_env.pop('RANK', None)
    full_env.pop('WORLD_SIZE', None)
    result = subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f'{" ".join(command)} exited with {result.returncode}\n'
                             f'--- stdout ---\n{result.stdout[-6000:]}\n'
                             f'--- stderr ---\n{result.stderr[-6000:]}')
    return result


def kill_at(script, *args, line_start='Train Epoch: [1]'):
    """Run REPO/script with args as one plain process and SIGKILL it as soon as it prints a line
    starting with line_start (the first iteration of epoch 1, by default); fails unless it was
    killed there."""
    import signal
    command = [sys.executable, str(REPO / script), *map(str, args)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if line.startswith(line_start):
                os.kill(process.pid, signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, ''.join(seen[-30:])


def read_json_lines(path):
    """The JSON lines of a log.txt / evaluate.txt."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

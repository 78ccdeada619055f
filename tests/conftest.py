"""Shared test fixtures: repository paths, the parity fixtures of the original BLIP, and the toy
training runs several modules read (each made once per test run, also under pytest-xdist)."""
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# The original's outputs (see tests/parity/README.md). BLIP_PARITY_DIR points the same tests
# at another fixture set with the same layout (e.g. the held-back one).
PARITY = Path(os.environ.get("BLIP_PARITY_DIR", REPO / "tests" / "parity"))

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Under pytest-xdist (make test runs one worker per core) each worker takes one thread.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


def made_once(tmp_path_factory, name, make):
    """make(folder) -> a JSON value, run once per test run: under pytest-xdist the first worker
    to ask makes it in the folder the workers share, the others wait for it and read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # one run's workers' base folders sit side by side in it
    folder, done = root / name, root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            done.write_text(json.dumps(make(folder)))
    return folder, json.loads(done.read_text())


def _script_run(folder, script, *args, nproc):
    """Run a task script on the toy config into folder/train; what the tests read of the run."""
    from script_runner import run_script
    result = run_script(script, *args, "--output_dir", folder / "train", "--device", "cpu", nproc=nproc)
    return {"args": [str(a) for a in result.args], "stdout": result.stdout, "stderr": result.stderr}


def _completed(folder, run):
    return folder / "train", subprocess.CompletedProcess(run["args"], 0, run["stdout"], run["stderr"])


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return PARITY


# The toy VQA run (configs/shapes/vqa.yaml, two gloo processes): the VQA tests check it learns,
# and the toy NLVR2 fine-tunes from its weights, as BLIP fine-tunes from pre-trained ones.
VQA_TOY_CONFIG = 'configs/shapes/vqa.yaml'
VQA_TOY_EPOCHS = 10  # the toy config's: colour is read off the image from about epoch 6
VQA_TOY_BATCH_PER_RANK = 16  # two ranks: the toy config's global batch of 32


@pytest.fixture(scope="session")
def vqa_toy_run(tmp_path_factory):
    """(output folder, completed process) of the toy VQA fine-tuning under torchrun."""
    return _completed(*made_once(tmp_path_factory, 'vqa', lambda folder: _script_run(
        folder, 'train_vqa.py', '--config', VQA_TOY_CONFIG, f'max_epoch={VQA_TOY_EPOCHS}',
        f'batch_size_train={VQA_TOY_BATCH_PER_RANK}', nproc=2)))


# The toy retrieval training (configs/shapes/retrieval_coco.yaml, one process, one thread, a
# constant learning rate, no dropout, batch 4): test_retrieval_learning checks it learns,
# reproduce.py's toy suite evaluates it (the toy suite's `retrieval` model, trained with the same
# overrides), and test_capfilt_toy takes it as the toy CapFilt filter: without dropout and with
# 4 pairs a batch its ITM head learns to tell a caption of another image (with the config's
# dropout 0.1 and batch 16 it stays at chance in this budget).
RETRIEVAL_TOY_CONFIG = 'configs/shapes/retrieval_coco.yaml'
RETRIEVAL_TOY_EPOCHS = 24
RETRIEVAL_TOY_OVERRIDES = [f'max_epoch={RETRIEVAL_TOY_EPOCHS}', 'min_lr=1e-4', 'batch_size_train=4',
                           'med_config=configs/shapes/med_config_capfilt.json']


@pytest.fixture(scope="session")
def retrieval_toy_run(tmp_path_factory):
    """Output folder (log.txt, checkpoint_best.pth) of the toy retrieval training."""
    import train_retrieval
    from script_runner import in_repository, one_thread

    def train(folder):
        with in_repository(), one_thread():  # as demo.py: the tiny model gains little from a second thread
            train_retrieval.run(['--config', str(REPO / RETRIEVAL_TOY_CONFIG), '--output_dir',
                                 str(folder / 'trained'), '--device', 'cpu', *RETRIEVAL_TOY_OVERRIDES])
        return None

    folder, _ = made_once(tmp_path_factory, 'retrieval_toy', train)
    return folder / 'trained'


# The toy captioning run (configs/shapes/caption_coco.yaml, two gloo processes, a constant
# learning rate): test_train_caption checks it learns; reproduce.py's toy suite evaluates it.
CAPTION_TOY_CONFIG = 'configs/shapes/caption_coco.yaml'
CAPTION_TOY_EPOCHS = 6
CAPTION_TOY_BATCH_PER_RANK = 8  # two ranks: the toy config's global batch of 16


@pytest.fixture(scope="session")
def caption_toy_run(tmp_path_factory):
    """(output folder, completed process) of the toy captioning fine-tuning under torchrun."""
    return _completed(*made_once(tmp_path_factory, 'caption', lambda folder: _script_run(
        folder, 'train_caption.py', '--config', CAPTION_TOY_CONFIG, f'max_epoch={CAPTION_TOY_EPOCHS}',
        f'batch_size={CAPTION_TOY_BATCH_PER_RANK}', 'min_lr=1e-3', nproc=2)))  # constant lr: colour is learnt sooner

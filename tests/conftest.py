"""Shared test fixtures: repository paths and the parity fixtures of the original BLIP."""
import os
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

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
    from script_runner import run_script
    out = tmp_path_factory.mktemp('vqa') / 'train'
    result = run_script('train_vqa.py', '--config', VQA_TOY_CONFIG, '--output_dir', out, '--device', 'cpu',
                        f'max_epoch={VQA_TOY_EPOCHS}', f'batch_size_train={VQA_TOY_BATCH_PER_RANK}', nproc=2)
    return out, result


# The toy retrieval training (configs/shapes/retrieval_coco.yaml, one process, one thread, a
# constant learning rate): test_retrieval_learning checks it learns, and reproduce.py's toy
# suite evaluates it (the toy suite's `retrieval` model, trained with the same overrides).
RETRIEVAL_TOY_CONFIG = 'configs/shapes/retrieval_coco.yaml'
RETRIEVAL_TOY_EPOCHS = 16
RETRIEVAL_TOY_OVERRIDES = [f'max_epoch={RETRIEVAL_TOY_EPOCHS}', 'min_lr=1e-4']


@pytest.fixture(scope="session")
def retrieval_toy_run(tmp_path_factory):
    """Output folder (log.txt, checkpoint_best.pth) of the toy retrieval training."""
    import os
    from script_runner import one_thread
    import train_retrieval
    out = tmp_path_factory.mktemp('retrieval_toy') / 'trained'
    cwd = os.getcwd()
    os.chdir(REPO)  # the toy config's data paths are relative to the repository
    try:
        with one_thread():  # as demo.py: the tiny model gains little from a second thread
            train_retrieval.run(['--config', str(REPO / RETRIEVAL_TOY_CONFIG), '--output_dir', str(out),
                                 '--device', 'cpu', *RETRIEVAL_TOY_OVERRIDES])
    finally:
        os.chdir(cwd)
    return out


# The toy captioning run (configs/shapes/caption_coco.yaml, two gloo processes, a constant
# learning rate): test_train_caption checks it learns; reproduce.py's toy suite evaluates it.
CAPTION_TOY_CONFIG = 'configs/shapes/caption_coco.yaml'
CAPTION_TOY_EPOCHS = 6
CAPTION_TOY_BATCH_PER_RANK = 8  # two ranks: the toy config's global batch of 16


@pytest.fixture(scope="session")
def caption_toy_run(tmp_path_factory):
    """(output folder, completed process) of the toy captioning fine-tuning under torchrun."""
    from script_runner import run_script
    out = tmp_path_factory.mktemp('caption') / 'train'
    result = run_script('train_caption.py', '--config', CAPTION_TOY_CONFIG, '--output_dir', out, '--device', 'cpu',
                        f'max_epoch={CAPTION_TOY_EPOCHS}', f'batch_size={CAPTION_TOY_BATCH_PER_RANK}',
                        'min_lr=1e-3', nproc=2)  # a constant learning rate: colour is learnt sooner
    return out, result

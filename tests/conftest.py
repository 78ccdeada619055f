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

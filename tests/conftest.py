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

"""Shared test fixtures."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "byu"

# Never let timm or huggingface try the network from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", message=".*pkg_resources.*")


@pytest.fixture
def real_labels_path() -> Path:
    path = REAL_DATA / "train_labels.csv"
    if not path.is_file():
        pytest.skip(f"real competition labels not found at {path}")
    return path

"""Shared test fixtures. Real data lives in ../shared/data (or $GAZESUP_DATA); tests that need it skip
with a stated reason when it is absent."""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_DATA = Path(os.environ.get("GAZESUP_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "slurm: needs a Slurm cluster (scripts/slurm_local.sh start); skipped without")


def _need(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set GAZESUP_DATA to the shared/data folder)")
    return path


@pytest.fixture(scope="session")
def kvasir_dir() -> Path:
    """../shared/data/kvasir-seg: images/, masks/, splits/."""
    return _need("kvasir-seg")


@pytest.fixture(scope="session")
def gazemedseg_dir() -> Path:
    """../shared/data/gazemedseg: the paper's fixation CSVs."""
    return _need("gazemedseg")


@pytest.fixture(scope="session")
def nci_isbi_dir() -> Path:
    """../shared/data/nci-isbi: NRRD label volumes and two DICOM slices."""
    return _need("nci-isbi")


@pytest.fixture(scope="module")
def one_thread():
    """The CI machine has 2 shared cores: one intra-op thread avoids oversubscription."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

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


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One tiny synthetic dataset (8 train, 4 test images, gaze maps = blurred masks) for the whole session.
    Read-only: a test that changes data makes its own (tests.helpers.tiny_dataset)."""
    from tests.helpers import tiny_dataset
    return tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def error_line(capsys):
    """error_line() -> the one `error: ...` line a refused command printed to stderr (asserting it is the
    whole of stderr, without a traceback)."""
    from tests.helpers import one_error_line
    return lambda: one_error_line(capsys.readouterr().err)

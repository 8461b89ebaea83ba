from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_CT = SHARED / "data" / "real_ct"
TS = REAL_CT / "totalsegmentator"
PYRAD = REAL_CT / "pyradiomics"


def _need_real_ct():
    if not (TS / "example_ct.nii.gz").is_file():
        pytest.skip(f"shared real CT data not found at {REAL_CT} (../shared sits beside the repo in CI)")


@pytest.fixture
def real_ct() -> Path:
    _need_real_ct()
    return REAL_CT


@pytest.fixture
def ts() -> Path:
    """TotalSegmentator's reference CTs and segmentations in ../shared."""
    _need_real_ct()
    return TS


@pytest.fixture
def shared() -> Path:
    _need_real_ct()
    return SHARED

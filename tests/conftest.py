from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_CT = SHARED / "data" / "real_ct"


@pytest.fixture
def real_ct() -> Path:
    if not (REAL_CT / "totalsegmentator" / "example_ct.nii.gz").is_file():
        pytest.skip(f"shared real CT data not found at {REAL_CT} (it sits beside the repo in CI)")
    return REAL_CT

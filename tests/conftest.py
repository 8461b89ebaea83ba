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


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> dict:
    """A synthetic preprocessed cohort for training tests, in the per-case folders the imaging stages
    write, listed in a qc-style cases table (``storage.with_folders``): 6 train and 2 val cases of
    32x32x48 voxels, six box-shaped complete anatomies each (never touching the border), their anatomy
    tables and report rows (normal or one of two abnormal texts)."""
    import json

    import numpy as np
    import polars as pl

    from ctvlp import catalog
    from ctvlp.imaging.storage import case_paths, with_folders

    root = tmp_path_factory.mktemp("tiny_cohort")
    rng = np.random.default_rng(0)
    anatomies = catalog.anatomies()[:6]
    cases, reports = [], []
    for i in range(8):
        cid = f"tiny_{i:02d}"
        cases.append({"case_id": cid, "split": "train" if i < 6 else "val"})
        anat = np.zeros((32, 32, 48), np.uint8)
        for j, a in enumerate(anatomies):
            x, y, z = 2 + (j % 3) * 10 + rng.integers(0, 2), 2 + (j // 3) * 14 + rng.integers(0, 2), rng.integers(2, 24)
            anat[x:x + 8, y:y + 10, z:z + 12] = a.index
            abnormal = rng.random() < 0.4
            reports.append({"case_id": cid, "anatomy": a.name, "status": "abnormal" if abnormal else "normal",
                            "text": f"Lesion {rng.integers(0, 2)} in the {a.name}." if abnormal
                            else f"The {a.name} is unremarkable."})
        img = (rng.random(anat.shape) * 0.4 + (anat > 0) * 0.1 * (anat % 5)).astype(np.float16)
        p = case_paths(cid, root / "segment" / cid, root / "preprocessed" / cid)
        for path in (p.image, p.anatomy, p.meta, p.table):
            path.parent.mkdir(parents=True, exist_ok=True)
        np.save(p.image, img)
        np.save(p.anatomy, anat)
        counts = np.bincount(anat.ravel(), minlength=len(catalog.anatomies()) + 1)
        p.meta.write_text(json.dumps({"anatomy_voxels": {a.name: int(counts[a.index]) for a in catalog.anatomies()}}))
        pl.DataFrame([{"case_id": cid, "anatomy": a.name, "index": a.index, "present": bool(counts[a.index]),
                       "complete": bool(counts[a.index])} for a in catalog.anatomies()]).write_parquet(p.table)
    with_folders(pl.DataFrame(cases), root / "segment", root / "preprocessed").write_parquet(root / "cases.parquet")
    pl.DataFrame(reports).write_parquet(root / "reports.parquet")
    return {"cases": root / "cases.parquet", "reports": root / "reports.parquet", "root": root}

"""Stale inputs in the workflow: an image replaced in place (same geometry, other voxels) is made
again by a plain `snakemake`, and only that case; a row added to the table re-runs the cohort and
only the new case is processed. The other cases are "reused" in the shard tables. A case with a 2D
mask sits in a shard all along: excluded with its reason, its shard's other case made."""

import os
import time

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import yaml

from ctvlp.cohort import demo

from snakemake_run import planned_jobs, snakemake

pytestmark = pytest.mark.slow

TARGET = "results/qc/cases.parquet"


def _nifti(arr, affine, path, dtype):
    img = nib.Nifti1Image(np.asarray(arr).astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))


def _statuses(wd, since_ns: int = 0, results: str = "results") -> dict[str, dict[str, str]]:
    """{stage: {case: status}} over the shard tables written after ``since_ns`` (the shard jobs
    that ran; a shard whose inputs did not change is not run at all)."""
    out = {}
    for stage in ("segment", "preprocessed"):
        tables = [pl.read_parquet(p) for p in sorted((wd / results / "shards" / stage).glob("*.parquet"))
                  if p.stat().st_mtime_ns > since_ns]
        out[stage] = dict(zip(*pl.concat(tables).select("case_id", "status").to_dict(as_series=False).values())) \
            if tables else {}
    return out


def _made(wd) -> dict[str, int]:
    """{case: mtime_ns of its preprocessed image}: a case made again gets a new file."""
    return {p.parent.name: p.stat().st_mtime_ns for p in (wd / "results/preprocessed").glob("*/image.npy")}


def _run(wd):
    out = snakemake(wd, TARGET)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out.stdout + out.stderr


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stale")
    data, wd = root / "data", root / "wd"
    data.mkdir()
    wd.mkdir()
    cases = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
        case = demo.generate_case(0, seed=seed)
        _nifti(case.image, case.affine, data / f"{name}.nii.gz", np.int16)
        _nifti(case.mask, case.affine, data / f"{name}_mask.nii.gz", np.uint8)
        cases[name] = case
    rows = [{"case_id": n, "image": f"{n}.nii.gz", "mask": f"{n}_mask.nii.gz", "report": cases[n].report}
            for n in ("a", "b", "c")]
    _nifti(cases["a"].mask[:, :, 60], cases["a"].affine, data / "z_mask2d.nii.gz", np.uint8)  # a 2D mask
    rows.append({"case_id": "z", "image": "a.nii.gz", "mask": "z_mask2d.nii.gz", "report": cases["a"].report})
    pl.DataFrame(rows).write_csv(data / "cohort.csv")
    config = {"results": "results", "shard_size": 2,
              "cohort": {"source": "table", "split": [1.0, 0.0, 0.0],
                         "table": {"path": str(data / "cohort.csv"), "mask_col": "mask"}},
              "preprocess": {"spacing": [8.0, 8.0, 8.0]}, "segment": {"backend": "phantom"}}
    (wd / "config.yaml").write_text(yaml.safe_dump(config))
    _run(wd)
    return {"data": data, "wd": wd, "cases": cases, "rows": rows}


def test_an_image_replaced_in_place_is_redone_by_a_plain_rerun_and_only_it(run):
    wd, data, case = run["wd"], run["data"], run["cases"]["b"]
    assert _statuses(wd)["segment"] == {"a": "done", "b": "done", "c": "done", "z": "excluded"}  # [a, b], [c, z]
    excluded = pl.read_parquet(wd / "results/qc/excluded.parquet")
    reason = excluded.filter(pl.col("case_id") == "z")["reason"].item()
    assert "z_mask2d.nii.gz is 2D" in reason and "its image is 3D" in reason
    assert planned_jobs(wd, TARGET) == {}
    before, made = np.load(wd / "results/preprocessed/b/image.npy"), _made(wd)
    since = time.time_ns()
    time.sleep(0.05)
    changed = case.image.astype(np.int16)
    changed[30:120, 20:100, 30:120] += 400  # same geometry, other voxels
    _nifti(changed, case.affine, data / "b.nii.gz", np.int16)
    assert planned_jobs(wd, TARGET)  # the plain rerun has something to do
    _run(wd)
    status = _statuses(wd, since)  # only b's shard ran: a reused, the shard [c, z] not even started
    assert status["segment"] == status["preprocessed"] == {"a": "reused", "b": "done"}
    assert not np.array_equal(np.load(wd / "results/preprocessed/b/image.npy"), before)
    now = _made(wd)
    assert {c for c in made if now[c] != made[c]} == {"b"}
    assert planned_jobs(wd, TARGET) == {}  # and then it is up to date


def test_a_row_added_to_the_table_reruns_the_cohort_and_only_the_new_case(run):
    wd, data, cases = run["wd"], run["data"], run["cases"]
    rows = [*run["rows"], {"case_id": "d", "image": "d.nii.gz", "mask": "d_mask.nii.gz", "report": cases["d"].report}]
    made, since = _made(wd), time.time_ns()
    time.sleep(0.05)
    pl.DataFrame(rows).write_csv(data / "cohort.csv")
    assert "cohort" in planned_jobs(wd, TARGET)
    out = _run(wd)
    assert "checkpoint cohort" in out
    status = _statuses(wd, since)  # shards [a], [b, c], [d, z] now: all ran, only d was made
    assert status["segment"] == status["preprocessed"] == {"a": "reused", "b": "reused", "c": "reused", "d": "done",
                                                           "z": "excluded"}
    assert pl.read_parquet(wd / TARGET)["case_id"].sort().to_list() == ["a", "b", "c", "d"]
    now = _made(wd)
    assert {c for c in now if now[c] != made.get(c)} == {"d"}
    # a removed row: the cohort re-runs and the case leaves the cohort; nothing is made again
    made, since = now, time.time_ns()
    time.sleep(0.05)
    pl.DataFrame(rows[1:]).write_csv(data / "cohort.csv")
    _run(wd)
    assert set(_statuses(wd, since)["segment"].values()) <= {"reused", "excluded"}
    assert pl.read_parquet(wd / TARGET)["case_id"].sort().to_list() == ["b", "c", "d"]
    assert _made(wd) == made
    assert planned_jobs(wd, TARGET) == {}


def test_a_mask_replaced_in_place_is_redone_even_with_its_mtime_kept_under_forcerun(run):
    wd, data, case = run["wd"], run["data"], run["cases"]["c"]
    path = data / "c_mask.nii.gz"
    st = os.stat(path)
    mask = case.mask.astype(np.uint8)
    mask[mask == np.unique(mask)[1]] = 0  # one class fewer
    _nifti(mask, case.affine, path, np.uint8)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # a copy that kept the old time stamp
    since = time.time_ns()
    out = snakemake(wd, TARGET, "--forcerun", "segment", "preprocess")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    status = _statuses(wd, since)
    assert status["segment"] == status["preprocessed"] == {"b": "reused", "c": "done", "d": "reused", "z": "excluded"}


def test_ctrate_a_precomputed_segmentation_replaced_in_place_reruns_only_its_shard(tmp_path):
    """CT-RATE as downloaded (config.ctrate.yaml) with precomputed segmentations: the shard rules'
    params hold their files' size and mtime, so exactly the shard of a changed file runs again."""
    from test_workflow_ctrate import CONFIG, overlay

    import ctrate_fixture

    why = ctrate_fixture.available()
    if why:
        pytest.skip(why)
    ctrate_fixture.build(tmp_path / "CT-RATE", tmp_path / "seg")
    (tmp_path / "config.yaml").write_text(CONFIG.read_text(encoding="utf-8").replace("/data/CT-RATE",
                                                                                    str(tmp_path / "CT-RATE")))
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay(tmp_path / "seg")))
    target = ["results_ctrate/qc/cases.parquet", "--configfile", str(tmp_path / "overlay.yaml")]
    out = snakemake(tmp_path, *target)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert planned_jobs(tmp_path, *target) == {}
    seg = min((tmp_path / "seg").glob("*.nii.gz"))
    seg.write_bytes(seg.read_bytes())  # rewritten in place: same bytes, new mtime
    assert planned_jobs(tmp_path, *target) == {"segment": 1, "preprocess": 1, "qc": 1}
    since = time.time_ns()
    out = snakemake(tmp_path, *target)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    status = _statuses(tmp_path, since, "results_ctrate")["segment"]
    changed = seg.name.removesuffix(".nii.gz")
    assert status[changed] == "done" and len(status) > 1
    assert {s for c, s in status.items() if c != changed} == {"reused"}

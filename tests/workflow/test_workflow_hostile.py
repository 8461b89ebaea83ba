"""The workflow on hostile input: a table of hostile case ids beside sentinel files runs to qc and
touches nothing outside its results folder; a results folder that is not ctvlp's is refused before
any job; a pasted secret never reaches the output."""

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import yaml

from ctvlp import workspace
from ctvlp.cohort import demo

from snakemake_run import planned_jobs, snakemake

pytestmark = pytest.mark.slow

HOSTILE = ["../..", "../../IMPORTANT.txt", "../cohort", ".", "../x", "./ok2", "-leading", "a\tb", "Ok3", "ok3"]


def _tree(root: Path, skip=()) -> dict[str, str]:
    """Every file under root (links not followed) with a digest of its content."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(rel.parts[: len(s.parts)] == s.parts for s in map(Path, skip)):
            continue
        out[str(rel)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data, wd = root / "data", root / "wd"
    data.mkdir()
    wd.mkdir()
    case = demo.generate_case(0, seed=3)
    for name, arr, dtype in (("ct", case.image, np.int16), ("mask", case.mask, np.uint8)):
        img = nib.Nifti1Image(arr.astype(dtype), case.affine)
        img.set_qform(case.affine, code=1)
        nib.save(img, str(data / f"{name}.nii.gz"))
    ids = HOSTILE + ["ok2"]
    pl.DataFrame({"case_id": ids, "image": ["ct.nii.gz"] * len(ids), "mask": ["mask.nii.gz"] * len(ids),
                  "report": [case.report] * len(ids)}).write_csv(data / "cohort.csv")
    # sentinels where the hostile ids point: beside results/, above the workdir, inside results/
    (wd / "IMPORTANT.txt").write_text("do not delete")
    (root / "OUTSIDE.txt").write_text("do not delete either")
    (wd / "x").mkdir()
    (wd / "x" / "notes.txt").write_text("mine")
    config = {"results": "results", "cohort": {"source": "table", "split": [1.0, 0.0, 0.0],
                                               "table": {"path": str(data / "cohort.csv"), "mask_col": "mask"}},
              "preprocess": {"spacing": [8.0, 8.0, 8.0]}, "segment": {"backend": "phantom"}}
    (wd / "config.yaml").write_text(yaml.safe_dump(config))
    before = _tree(root, skip=["wd/.snakemake", "wd/results"])
    out = snakemake(wd, "results/qc/summary.md")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return root, wd, before


def test_nothing_outside_results_is_touched_and_every_hostile_id_is_excluded(hostile_run):
    root, wd, before = hostile_run
    assert _tree(root, skip=["wd/.snakemake", "wd/results"]) == before
    r = wd / "results"
    assert pl.read_parquet(r / "qc/cases.parquet")["case_id"].to_list() == ["ok2"]
    excluded = pl.read_parquet(r / "qc/excluded.parquet")
    assert sorted(excluded["case_id"]) == sorted(HOSTILE)
    assert excluded["reason"].str.contains("folder").all()
    assert sorted(p.name for p in (r / "segment").iterdir()) == ["ok2"]
    assert sorted(p.name for p in (r / "preprocessed").iterdir()) == ["ok2"]
    assert (r / workspace.MARKER).is_file()
    summary = (r / "qc/summary.md").read_text(encoding="utf-8")
    assert "a\\tb" in summary and "\t" not in summary  # a control character is shown escaped


def test_without_labels_the_default_target_trains_but_does_not_evaluate(hostile_run):
    _, wd, _ = hostile_run
    jobs = planned_jobs(wd)
    assert jobs.get("train") == 4  # the four phases of the method
    assert not set(jobs) & {"evaluate_zeroshot", "linear_probe", "figures"}


def test_stage_commands_carry_no_config_values(hostile_run):
    _, wd, _ = hostile_run
    out = snakemake(wd, "-n", "-p", "--forcerun", "qc", "results/qc/summary.md")
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "ctvlp qc --config" in text and "results/.ctvlp/config/" in text
    command = next(line for line in text.splitlines() if "ctvlp qc " in line)
    assert "--params" not in command and "{" not in command and "false" not in command.lower()


@pytest.mark.parametrize("results, words", [("/", "filesystem root"), (".", "whose files"), ("..", "whose files"),
                                            ("mine", "did not create")])
def test_a_results_folder_that_is_not_ctvlps_is_refused_before_any_job(tmp_path, results, words):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "mine").mkdir()
    (wd / "mine" / "thesis.tex").write_text("years of work")
    (wd / "config.yaml").write_text(yaml.safe_dump({"results": results}))
    before = _tree(tmp_path, skip=["wd/.snakemake"])
    out = snakemake(wd)
    assert out.returncode != 0 and words in out.stdout + out.stderr
    assert _tree(tmp_path, skip=["wd/.snakemake"]) == before


def test_a_pasted_secret_stops_the_run_and_is_never_printed(tmp_path):
    secret = "sk-live-0123456789abcdefSECRET"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"reports": {"backend": "llm", "llm": {"api_key_env": secret}}}))
    out = snakemake(tmp_path, "-n")
    assert out.returncode != 0 and "api_key_env" in out.stdout + out.stderr
    assert secret not in out.stdout + out.stderr
    assert not any(secret in p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()
                   and p.name != "config.yaml")

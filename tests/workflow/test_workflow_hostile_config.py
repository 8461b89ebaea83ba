"""The workflow on hostile configs and damaged intermediate tables: a config the strict loader
refuses stops `snakemake -n` before any job, naming the key or line (config.yaml before Snakemake
evaluates any of it); a damaged manifest names itself and the rule to rerun, and that rerun repairs
the run; the end-of-run message names only outputs that exist."""

import re
import time

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import yaml

from ctvlp.cohort import demo

from snakemake_run import snakemake

pytestmark = pytest.mark.slow

SENTINEL = "EVALUATED"
BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"]
                 + [f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]) + "\n"

BAD = {
    "yte": ("__use_yte__: true\nseed: ?__import__('pathlib').Path('{sentinel}').write_text('x')\n",
            "sets __use_yte__"),
    "alias bomb": (BOMB, "line 1: YAML anchor &a"),
    "duplicate section": ("train:\n  epochs: 3\ncohort:\n  split: [1, 0, 0]\ntrain:\n  lr: 0.1\n",
                          "'train' appears twice .*lines 1 and 5"),
    "nan spacing": ("preprocess:\n  spacing: [.nan, 8.0, 8.0]\n", r"preprocess.spacing\[0\]': nan is not a finite"),
    "inf lr": ("train:\n  lr: .inf\n", "'train.lr': inf is not a finite"),
    "zero split": ("cohort:\n  split: [0, 0, 0]\n", "'cohort.split': .*sum to more than zero"),
    "brace in results": ("results: 'out/{shard}'\n", "'results': .*brace"),
    "brace in table path": ("cohort:\n  source: table\n  table: {path: 'data/{x}.csv'}\n",
                            "'cohort.table.path': .*brace"),
}


@pytest.mark.parametrize("how", ["config.yaml", "--configfile"])
@pytest.mark.parametrize("name", sorted(BAD))
def test_a_hostile_config_stops_the_dry_run_naming_the_problem(tmp_path, name, how):
    text, words = BAD[name]
    text = text.replace("{sentinel}", str(tmp_path / SENTINEL)) if name == "yte" else text
    (tmp_path / ("config.yaml" if how == "config.yaml" else "mine.yaml")).write_text(text)
    args = ["-n"] if how == "config.yaml" else ["-n", "--configfile", str(tmp_path / "mine.yaml")]
    start = time.monotonic()
    out = snakemake(tmp_path, *args, timeout=120)
    assert out.returncode != 0
    assert re.search(words, out.stdout + out.stderr), (out.stdout + out.stderr)[-3000:]
    assert time.monotonic() - start < 60  # the bomb is refused, not expanded
    assert not (tmp_path / "results").exists() and not (tmp_path / "out").exists()
    if name == "yte" and how == "config.yaml":
        # config.yaml is read strictly before Snakemake's own loader, so its template never runs; a
        # --configfile Snakemake reads (and evaluates) before the Snakefile: refused after the fact
        assert not (tmp_path / SENTINEL).exists()


def test_a_good_config_given_with_configfile_still_plans(tmp_path):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"cohort": {"n_cases": 12}, "results": "res"}))
    out = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "mine.yaml"), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cohort" in out.stdout + out.stderr


@pytest.fixture(scope="module")
def qc_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qc_only")
    data, wd = root / "data", root / "wd"
    data.mkdir()
    wd.mkdir()
    case = demo.generate_case(0, seed=3)
    for name, arr, dtype in (("ct", case.image, np.int16), ("mask", case.mask, np.uint8)):
        img = nib.Nifti1Image(arr.astype(dtype), case.affine)
        img.set_qform(case.affine, code=1)
        nib.save(img, str(data / f"{name}.nii.gz"))
    ids = ["a", "b", "", "c"]
    pl.DataFrame({"case_id": ids, "image": ["ct.nii.gz"] * 4, "mask": ["mask.nii.gz"] * 4,
                  "report": [" ".join(case.report.split())] * 4, "liver_cyst": ["1", "0", "1", "0.9"]}).write_csv(data / "cohort.csv")
    config = {"results": "results", "cohort": {"source": "table", "split": [1.0, 0.0, 0.0],
                                               "table": {"path": str(data / "cohort.csv"), "mask_col": "mask",
                                                         "label_cols": ["liver_cyst"]}},
              "evaluate": {"catalog": "demo"}, "preprocess": {"spacing": [8.0, 8.0, 8.0]},
              "segment": {"backend": "phantom"}}
    (wd / "config.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(wd, "results/qc/summary.md")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return wd, out


def test_a_qc_only_run_names_no_model_it_did_not_train(qc_run):
    wd, out = qc_run
    text = out.stdout + out.stderr
    assert "trained model" not in text.lower() and "bundle" not in text.lower()
    excluded = pl.read_parquet(wd / "results/qc/excluded.parquet")
    reasons = " | ".join(excluded["reason"])
    assert "cohort.csv line 4: blank case id" in reasons  # never the image's file name "ct"
    assert "cohort.csv line 5: column 'liver_cyst' holds '0.9'" in reasons
    assert sorted(pl.read_parquet(wd / "results/qc/cases.parquet")["case_id"]) == ["a", "b", "c"]


def test_a_truncated_manifest_names_itself_and_forcerun_repairs_it(qc_run):
    wd, _ = qc_run
    manifest = wd / "results/cohort/manifest.parquet"
    good = pl.read_parquet(manifest)
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    out = snakemake(wd, "-n", "results/qc/summary.md", timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "manifest.parquet" in text and "snakemake --forcerun cohort" in text
    out = snakemake(wd, "results/qc/summary.md", "--forcerun", "cohort")  # (--forcerun takes several rules)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert pl.read_parquet(manifest).equals(good)

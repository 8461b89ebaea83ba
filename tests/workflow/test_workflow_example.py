"""`make example`: the demo cohort written as a plain table plus its config, then the workflow on it
through the table path. The commands are taken from the Makefile as make would run them (a smaller
cohort and the tests' tiny model on top), so the target itself is what is tested."""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from ctvlp import catalog

from conftest import REPO
from snakemake_run import TEST_CONFIG, snakemake

pytestmark = pytest.mark.slow


def make_commands() -> list[list[str]]:
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    out = subprocess.run(["make", "-n", "-s", "-C", str(REPO), "example"], capture_output=True, text=True, check=True)
    return [shlex.split(line) for line in out.stdout.splitlines()
            if line.split() and Path(line.split()[0]).name in ("ctvlp", "snakemake")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("example")
    shutil.copy(TEST_CONFIG, wd / "config.yaml")  # the checkout's config.yaml, at the tests' tiny scale
    commands = make_commands()
    write = [c for c in commands if Path(c[0]).name == "ctvlp"]
    runs = [c for c in commands if Path(c[0]).name == "snakemake" and "--report" not in c]
    assert len(write) == 1 and len(runs) == 1, commands
    ctvlp = str(Path(sys.executable).with_name("ctvlp"))
    out = subprocess.run([ctvlp, *write[0][1:], "--n-cases", "24"], cwd=wd, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    # make runs in the checkout; here the working directory is wd (snakemake reads --configfile from its own cwd)
    out = snakemake(wd, *[str(wd / a) if a.startswith("example/") else a for a in runs[0][1:]])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return wd, yaml.safe_load((wd / "example/config.yaml").read_text(encoding="utf-8"))


def test_the_table_is_plain_and_complete(run):
    wd, config = run
    table = pl.read_csv(wd / config["cohort"]["table"]["path"])
    assert len(table) == 24 and set(table["split"]) == {"train", "val", "test"}
    for column in ("image", "mask"):  # relative paths, beside the table
        assert all((wd / "example" / p).is_file() and not Path(p).is_absolute() for p in table[column])
    assert table["report"].str.contains("FINDINGS").all()
    ids = [d.id for d in catalog.diseases("demo")]
    assert table.select(ids).to_numpy().max() == 1 and set(table.select(ids).unique().to_numpy().ravel()) <= {0, 1}
    assert config["cohort"]["source"] == "table" and config["cohort"]["table"]["label_cols"] == ids


def test_the_workflow_ran_through_the_table_path(run):
    wd, config = run
    r = wd / config["results"]
    table = pl.read_csv(wd / config["cohort"]["table"]["path"])
    man = pl.read_parquet(r / "cohort/manifest.parquet")
    assert set(man["source"]) == {"cases"}  # the table's name: not the demo source
    assert dict(zip(man["case_id"], man["split"])) == dict(zip(table["case_id"], table["split"]))
    truth = pl.read_parquet(r / "cohort/ground_truth.parquet")
    long = table.unpivot(index="case_id", on=[d.id for d in catalog.diseases("demo")],
                         variable_name="disease_id", value_name="label")
    joined = truth.join(long, on=["case_id", "disease_id"], validate="1:1")
    assert len(joined) == len(long) and (joined["label"] == joined["label_right"]).all()
    assert len(pl.read_parquet(r / "qc/excluded.parquet")) == 0
    zeroshot = pl.read_csv(r / "eval/zeroshot.csv")
    assert zeroshot["disease_id"].to_list()[-1] == "mean" and zeroshot["auc"].drop_nulls().len() > 1


def test_example_refuses_a_folder_it_did_not_write(tmp_path):
    from ctvlp.cohort.example import write_example

    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(FileExistsError, match="not written by"):
        write_example(tmp_path, n_cases=10)
    assert (tmp_path / "mine.txt").read_text() == "a user's file" and not (tmp_path / "cases.csv").exists()

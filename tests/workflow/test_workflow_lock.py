"""One results folder, one run: two working directories (two checkouts, as far as Snakemake's own
lock in .snakemake can tell) share one results folder. While a live process holds the folder's lock,
a run from the other working directory stops before any job naming host and PID, a dry run only
warns, a stage by hand and a job without the holder's token are refused; a dead holder's lock is
taken over with a message, and the run's own jobs pass."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ctvlp import runlock, workspace

from conftest import REPO
from snakemake_run import TEST_CONFIG, snakemake

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_checkouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    results = root / "shared-results"
    config = yaml.safe_load(TEST_CONFIG.read_text())
    config.update(results=str(results), shard_size=5)
    config["cohort"]["n_cases"] = 10  # the smallest cohort: two shards
    wds = []
    for name in ("checkout1", "checkout2"):
        wd = root / name
        wd.mkdir()
        (wd / "config.yaml").write_text(yaml.safe_dump(config))
        wds.append(wd)
    workspace.prepare_results(results)
    return results, wds


HOLD = "import sys, time; from ctvlp import runlock; runlock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(600)"


@pytest.fixture
def holder(two_checkouts):
    """A live workflow run as far as the lock can tell: a process in checkout1 that holds the lock."""
    results, (wd1, _) = two_checkouts
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(results)], cwd=wd1, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc.pid, runlock.read(results)
    proc.kill()
    proc.wait()
    if (runlock.read(results) or {}).get("pid") == proc.pid:
        runlock.lock_path(results).unlink()


def _stage_env():
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop(runlock.ENV, None)
    return env


def test_a_second_run_from_another_checkout_stops_before_any_job_naming_the_holder(two_checkouts, holder):
    results, (_, wd2) = two_checkouts
    pid, held = holder
    before = {str(f): f.stat().st_mtime_ns for f in results.rglob("*")}
    start = time.monotonic()
    out = snakemake(wd2, str(results / "cohort/manifest.parquet"), timeout=120)
    elapsed = time.monotonic() - start
    assert out.returncode != 0
    assert f"host {socket.gethostname()}, PID {pid}, started {held['started']}" in out.stderr
    assert "this run stops before any job" in out.stderr
    assert {str(f): f.stat().st_mtime_ns for f in results.rglob("*")} == before  # no job ran, nothing written
    assert runlock.read(results)["token"] == held["token"]  # the holder's lock is untouched
    assert elapsed < 60, elapsed


def test_a_dry_run_only_warns(two_checkouts, holder):
    results, (_, wd2) = two_checkouts
    pid, held = holder
    out = snakemake(wd2, "-n", str(results / "cohort/manifest.parquet"), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Warning: results folder" in out.stderr and f"PID {pid}" in out.stderr
    assert runlock.read(results) == held


def test_a_stage_by_hand_and_a_job_without_the_token_are_refused(two_checkouts, holder):
    results, (_, wd2) = two_checkouts
    pid, _ = holder
    out = subprocess.run(["ctvlp", "cohort", "--config", "config.yaml", "--out", str(results / "cohort")], cwd=wd2, check=False,
                         capture_output=True, text=True, env=_stage_env(), timeout=120)
    assert out.returncode != 0
    assert f"PID {pid}" in out.stderr and "by hand" in out.stderr
    assert not (results / "cohort/manifest.parquet").exists()
    # --no-hooks skips onstart, so no lock is taken and no token exported: the job itself stops
    out = snakemake(wd2, "--no-hooks", str(results / "cohort/manifest.parquet"), timeout=120)
    assert out.returncode != 0
    log = (results / "logs/cohort.log").read_text()
    assert f"PID {pid}" in log and "in use by another ctvlp workflow run" in log
    assert not (results / "cohort/manifest.parquet").exists()


def test_a_dead_holders_lock_is_taken_over_and_the_runs_own_jobs_pass(two_checkouts):
    results, (wd1, _) = two_checkouts
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = runlock.lock_path(results)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"token": "x" * 32, "host": socket.gethostname(), "pid": dead.pid,
                                "started": "2026-01-01 00:00:00 UTC", "cwd": "/gone"}))
    out = snakemake(wd1, str(results / "qc/summary.md"), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert "taking over the stale lock" in out.stderr and f"PID {dead.pid}" in out.stderr
    for log in ("cohort.log", "segment/shard-0.log", "preprocess/shard-1.log", "qc.log"):
        assert "held by this workflow run" in (results / "logs" / log).read_text(), log
    assert (results / "qc/summary.md").is_file()
    assert not path.exists()  # released at the end
    # the finished run's report: made while no run holds the folder; while one does, made with a warning
    out = snakemake(wd1, "--report", str(results.parent / "report.html"), str(results / "qc/summary.md"))
    assert out.returncode == 0 and "Warning: results folder" not in out.stderr, out.stderr[-3000:]
    assert (results.parent / "report.html").stat().st_size > 0
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(results)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        held = runlock.read(results)
        report = snakemake(wd1, "--report", str(results.parent / "report2.html"), str(results / "qc/summary.md"))
        assert runlock.read(results) == held
    finally:
        proc.kill()
        proc.wait()
        path.unlink(missing_ok=True)
    assert report.returncode == 0 and f"PID {proc.pid}" in report.stderr, report.stderr[-3000:]
    assert (results.parent / "report2.html").stat().st_size > 0



def test_the_jobs_get_the_token_and_a_failed_run_releases_the_lock(two_checkouts, tmp_path):
    _, (wd1, _) = two_checkouts
    other = tmp_path / "results"
    config = yaml.safe_load((wd1 / "config.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**config, "results": str(other)}))
    # a `ctvlp` that shows what a job sees (its token, the lock) and fails
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    fake = bin_ / "ctvlp"
    fake.write_text(f'#!/bin/sh\necho "token=${runlock.ENV}"\ncat {other / runlock.LOCK}\nexit 3\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=os.pathsep.join([str(bin_), str(Path(sys.executable).parent), os.environ["PATH"]]))
    env.pop(runlock.ENV, None)
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
                          "-d", str(tmp_path), "--cores", "1", str(other / "cohort/manifest.parquet")],
                         capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode != 0
    log = (other / "logs/cohort.log").read_text()
    token = log.split("token=")[1].split()[0]
    held = json.loads(log.split("\n", 1)[1])
    assert len(token) == 32 and held["token"] == token  # the job ran with its run's lock and token
    assert held["cwd"] == str(tmp_path) and held["host"] == socket.gethostname()
    assert not runlock.lock_path(other).exists()  # released (onerror; at exit should that not run)

"""The tiny config submitted end to end, cohort to evaluation, through profiles/slurm to a real
one-node SLURM cluster (Debian's slurm-wlm and munge, started by tests/slurm_cluster.py): every
stage runs as a SLURM batch job, and the job ids show in the stages' own logs."""

import os
import re
import shutil
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from conftest import REPO
from slurm_cluster import SlurmCluster, missing_requirements
from snakemake_run import TEST_CONFIG

pytestmark = pytest.mark.slow


def _profile_for(cluster: SlurmCluster, folder: Path) -> Path:
    """profiles/slurm with its placeholders filled for this cluster, and each job's memory and CPUs
    capped at what this one node has (the profile asks for cluster-sized nodes). Every other key
    (executor, jobs, retries, latency-wait, set-resources names) is the profile's own."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text(encoding="utf-8"))
    assert profile["default-resources"]["slurm_partition"].startswith("<")  # a clear placeholder
    profile["default-resources"].update(slurm_partition=cluster.partition, slurm_account="none", mem_mb=1000)
    cpus = os.cpu_count() or 1
    for resources in profile["set-resources"].values():
        for key in list(resources):
            if key == "mem_mb":
                resources[key] = min(resources[key], 2500)
            elif key.startswith("cpus_per"):
                resources[key] = min(resources[key], cpus)
    profile["slurm-status-command"] = "squeue"  # no slurmdbd here, so no sacct
    profile["jobs"] = 4
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def test_the_test_config_runs_end_to_end_as_slurm_jobs(tmp_path):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="snakemake-executor-plugin-slurm not installed "
                        "(.ci/slurm_setup.sh)")
    with SlurmCluster(tmp_path / "slurm") as cluster:
        # the run's watchdog: a job asking for more CPUs than the node has is seen as never running
        big = cluster.run(["sbatch", "--parsable", f"--cpus-per-task={4 * (os.cpu_count() or 1)}", "--wrap", "true"])
        job = big.stdout.strip().split(";")[0]
        deadline = time.monotonic() + 30
        while not (stuck := cluster.unschedulable()) and time.monotonic() < deadline:
            time.sleep(1)
        cluster.run(["scancel", job])
        assert len(stuck) == 1 and stuck[0].startswith(f"{job} ") and "PartitionConfig" in stuck[0], stuck
        profile = _profile_for(cluster, tmp_path / "profile")
        wd = tmp_path / "wd"
        wd.mkdir()
        shutil.copy(TEST_CONFIG, wd / "config.yaml")
        env = dict(cluster.env, PATH=f"{Path(sys.executable).parent}{os.pathsep}{cluster.env['PATH']}")
        out = cluster.run_client(
            [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(wd),
             "--workflow-profile", str(profile), *cluster.snakemake_args()],
            env=env, timeout_s=1500)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-6000:] + cluster.log_tail()
        accounting = cluster.run(["squeue", "--states=all", "-h", "-o", "%i %j %T"]).stdout
    r = wd / "results"
    table = pl.read_csv(r / "eval/zeroshot.csv")
    assert table["disease_id"][-1] == "mean" and len(table) > 5  # cohort to evaluation
    # every stage ran as its own SLURM job: its log names the job id, and the ids are distinct
    logs = sorted((r / "logs").rglob("*.log"))
    ids = {}
    for log in logs:
        found = re.findall(r"SLURM job (\d+)", log.read_text(errors="replace"))
        assert found, f"{log} shows no SLURM job id"
        ids[log.relative_to(r / "logs").as_posix()] = found[0]
    assert len(set(ids.values())) == len(ids) >= 15, ids
    assert {"segment/shard-0.log", "train/train_boost.log", "eval/evaluate_zeroshot.log"} <= set(ids)
    completed = {line.split()[0] for line in accounting.splitlines() if line.endswith("COMPLETED")}
    assert set(ids.values()) <= completed, (ids, accounting)

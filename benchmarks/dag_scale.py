"""How the workflow scales with the cohort: dry-run time and memory, and per-job start-up.

    python benchmarks/dag_scale.py [--sizes 1000 10000 50000] [--old-ref REV] [--old-sizes ...]
                                   [--demo-cases 64] [--out benchmarks/results]

1. Dry run. For each size N a synthetic cohort manifest of N cases is written where the cohort
   checkpoint puts it (a dry run reads only the manifest, no image), and `snakemake -n` is timed
   (wall clock and peak RSS of the snakemake process, /usr/bin/time). With --old-ref the same
   manifests go through that revision's Snakefile (checked out into a temporary git worktree;
   before sharding, one job per case and stage) in the same run, for the sizes in --old-sizes.
2. Per-case overhead on a real run. A demo cohort of --demo-cases cases is segmented and
   preprocessed by the workflow (`snakemake results/qc/summary.md`, 2 cores): each shard job's wall
   time (its Snakemake benchmark file) against the in-process work of its cases (the seconds each
   case took inside the job, from the shard tables). Start-up = job time - work. With --old-ref the
   old per-case jobs run on the same cohort for their job time per case.

Goals (issue 12): 50,000 cases dry-run in <= 30 s and <= 1 GB; start-up <= 5% of per-case work.
Writes dag_scale.md and dag_scale.csv into --out, with the machine, versions, date and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from machine import cpu  # benchmarks/machine.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
TODAY_DRY_RUN = {2000: (9, None), 10000: (28, None), 50000: (264, 1.9 * 1024)}  # issue 12, before sharding (s, MB)
TODAY_STARTUP = (1.4, 0.3)  # issue 12: s of start-up per per-case job, s of work per case


def _manifest(n: int) -> pl.DataFrame:
    """A synthetic manifest of n cases (the schema's columns; nothing is read but case_id)."""
    from ctvlp.cohort.schema import MANIFEST_SCHEMA

    ids = [f"case{i:06d}" for i in range(n)]
    split = ["train" if i % 10 < 8 else ("val" if i % 10 == 8 else "test") for i in range(n)]
    values = {"case_id": ids, "split": split, "image_path": [f"/data/{c}.nii.gz" for c in ids], "mask_path": [None] * n,
              "report_text": ["Liver normal."] * n, "source": ["synthetic"] * n, "spacing_x": [1.0] * n,
              "spacing_y": [1.0] * n, "spacing_z": [5.0] * n, "shape_x": [512] * n, "shape_y": [512] * n,
              "shape_z": [100] * n, "rescale_slope": [None] * n, "rescale_intercept": [None] * n, "source_id": ids,
              "ingest_note": [None] * n}
    return pl.DataFrame(values, schema=MANIFEST_SCHEMA)


def _cohort_folder(wd: Path, n: int, new_layout: bool) -> None:
    from ctvlp.cohort.schema import EXCLUSIONS_SCHEMA, GROUND_TRUTH_SCHEMA

    cohort = wd / "results" / "cohort"
    cohort.mkdir(parents=True)
    manifest = _manifest(n)
    if not new_layout:  # the old manifest had no source_id / ingest_note columns
        manifest = manifest.drop("source_id", "ingest_note")
    manifest.write_parquet(cohort / "manifest.parquet")
    pl.DataFrame({"case_id": manifest["case_id"], "disease_id": ["x"] * n, "anatomy": ["liver"] * n,
                  "label": [0] * n}, schema=GROUND_TRUTH_SCHEMA).write_parquet(cohort / "ground_truth.parquet")
    pl.DataFrame(schema=EXCLUSIONS_SCHEMA).write_parquet(cohort / "exclusions.parquet")
    if new_layout:
        (wd / "results" / ".ctvlp-results").write_text("benchmark\n")
    (wd / "config.yaml").write_text("cohort:\n  source: demo\n")


def _timed(cmd: list[str], cwd: Path, env=None) -> tuple[float, float, str]:
    """(wall s, peak RSS MB of the command, output) with GNU time."""
    start = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], cwd=cwd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    rss_kb = int(out.stderr.strip().splitlines()[-1])
    return wall, rss_kb / 1024, out.stdout + out.stderr


def _snakemake(snakefile: Path, wd: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(wd), "--cores", "2", *args]


def _env(snakefile: Path) -> dict:
    """The environment a workflow's jobs run in: its own checkout's ctvlp first on the path (the
    `ctvlp` command imports the package from PYTHONPATH before the installed one)."""
    return dict(os.environ, PYTHONPATH=str(snakefile.parent / "src"),
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def dry_runs(sizes, old_snakefile, old_sizes) -> list[dict]:
    rows = []
    for n in sizes:
        for version, snakefile in (("new", REPO / "Snakefile"), ("old", old_snakefile)):
            if version == "old" and (snakefile is None or n not in old_sizes):
                continue
            with tempfile.TemporaryDirectory(prefix="dagscale_") as tmp:
                wd = Path(tmp)
                _cohort_folder(wd, n, version == "new")
                wall, rss, text = _timed(_snakemake(snakefile, wd, "-n", "--quiet", "rules"), wd, _env(snakefile))
                jobs = int(re.search(r"^total\s+(\d+)$", text, re.M).group(1))
                rows.append({"part": "dry_run", "version": version, "cases": n, "jobs": jobs, "wall_s": round(wall, 1),
                             "peak_rss_mb": round(rss)})
                print(rows[-1], flush=True)
    return rows


def _demo_run(snakefile: Path, wd: Path, n: int, shard_size: int) -> float:
    env = _env(snakefile)
    (wd / "config.yaml").write_text(f"cohort:\n  n_cases: {n}\npreprocess:\n  spacing: [5.0, 5.0, 5.0]\n"
                                    f"shard_size: {shard_size}\n" if snakefile == REPO / "Snakefile" else
                                    f"cohort:\n  n_cases: {n}\npreprocess:\n  spacing: [5.0, 5.0, 5.0]\n")
    out = subprocess.run(_snakemake(snakefile, wd, "results/cohort/manifest.parquet"), cwd=wd, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    start = time.perf_counter()
    out = subprocess.run(_snakemake(snakefile, wd, "results/qc/summary.md"), cwd=wd, env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return time.perf_counter() - start


def per_case_overhead(n: int, shard_size: int, old_snakefile) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="dagscale_demo_") as tmp:
        wd = Path(tmp)
        wall = _demo_run(REPO / "Snakefile", wd, n, shard_size)
        for stage, folder in (("segment", "segment"), ("preprocess", "preprocessed")):
            jobs = [pl.read_csv(f, separator="\t")["s"][0] for f in (wd / "results/benchmarks" / stage).glob("shard-*.tsv")]
            work = pl.concat([pl.read_parquet(f) for f in (wd / "results/shards" / folder).glob("*.parquet")])
            job_s, work_s = sum(jobs), float(work["seconds"].sum())
            rows.append({"part": "per_case", "version": "new", "stage": stage, "cases": n, "jobs": len(jobs),
                         "job_s_per_case": round(job_s / n, 3), "work_s_per_case": round(work_s / n, 3),
                         "startup_s_per_job": round((job_s - work_s) / len(jobs), 2),
                         "startup_share_of_work": round((job_s - work_s) / work_s, 3), "wall_s": round(wall, 1)})
            print(rows[-1], flush=True)
    if old_snakefile is not None:
        with tempfile.TemporaryDirectory(prefix="dagscale_old_") as tmp:
            wd = Path(tmp)
            wall = _demo_run(old_snakefile, wd, n, shard_size)
            for stage in ("segment", "preprocess"):
                jobs = [pl.read_csv(f, separator="\t")["s"][0] for f in (wd / "results/benchmarks" / stage).glob("*.tsv")]
                rows.append({"part": "per_case", "version": "old", "stage": stage, "cases": n, "jobs": len(jobs),
                             "job_s_per_case": round(sum(jobs) / n, 3), "wall_s": round(wall, 1)})
                print(rows[-1], flush=True)
    return rows


def _old_checkout(ref: str, parent: Path) -> Path:
    target = parent / "old"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(target), ref], check=True,
                   capture_output=True)
    return target


def _markdown(rows: list[dict], info: dict) -> str:
    lines = ["# DAG scale and per-job start-up", "", f"- machine: {info['machine']}", f"- date: {info['date']}",
             f"- versions: {info['versions']}", f"- command: `{info['command']}`",
             (f"- old: revision `{info['old_ref']}` (before sharding: one job per case and stage)" if info["old_ref"]
              else "- old: not run (no --old-ref)"), "",
             "## Dry run (`snakemake -n`) on a synthetic manifest", "",
             "| cases | version | jobs | wall (s) | peak RSS (MB) |", "|---:|---|---:|---:|---:|"]
    for r in (r for r in rows if r["part"] == "dry_run"):
        lines.append(f"| {r['cases']} | {r['version']} | {r['jobs']} | {r['wall_s']} | {r['peak_rss_mb']} |")
    lines += ["", "Issue 12's numbers for the old version on its machine: " + ", ".join(
        f"{n} cases {s} s" + (f" and {mb / 1024:.1f} GB" if mb else "") for n, (s, mb) in TODAY_DRY_RUN.items()) + ".",
              "Goal: 50,000 cases in <= 30 s and <= 1 GB.", "", "## Per-case overhead (demo cohort, 2 cores)", "",
              "| stage | version | cases | jobs | job time per case (s) | work per case (s) | start-up per job (s) | "
              "start-up / work |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in (r for r in rows if r["part"] == "per_case"):
        lines.append(f"| {r['stage']} | {r['version']} | {r['cases']} | {r['jobs']} | {r['job_s_per_case']} | "
                     f"{r.get('work_s_per_case', 'n/a')} | {r.get('startup_s_per_job', 'n/a')} | "
                     f"{r.get('startup_share_of_work', 'n/a')} |")
    lines += ["", f"Issue 12's numbers for the old version: ~{TODAY_STARTUP[0]} s start-up per one-case job against "
              f"~{TODAY_STARTUP[1]} s of work per case. Goal: start-up <= 5% of per-case work.", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--old-ref", default=None, help="git revision of the pre-sharding workflow to compare with")
    ap.add_argument("--old-sizes", type=int, nargs="*", default=[1000, 10000, 50000])
    ap.add_argument("--demo-cases", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dagscale_git_") as tmp:
        old = _old_checkout(args.old_ref, Path(tmp)) / "Snakefile" if args.old_ref else None
        try:
            rows = dry_runs(args.sizes, old, set(args.old_sizes))
            rows += per_case_overhead(args.demo_cases, args.shard_size, old)
        finally:
            if old is not None:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old.parent)],
                               capture_output=True)
    import snakemake

    info = {"machine": f"{cpu()}, {os.cpu_count()} cores, {platform.platform()}",
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "versions": f"Python {platform.python_version()}, snakemake {snakemake.__version__}",
            "command": " ".join(["python", "benchmarks/dag_scale.py", *(sys.argv[1:] if argv is None else argv)]),
            "old_ref": args.old_ref}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, infer_schema_length=None).write_csv(out / "dag_scale.csv")
    (out / "dag_scale.md").write_text(_markdown(rows, info), encoding="utf-8")
    print(f"wrote {out / 'dag_scale.md'}")


if __name__ == "__main__":
    main()

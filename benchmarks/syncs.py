"""Host syncs per training step, today's code against an older revision's, side by side (CPU).

    python benchmarks/syncs.py [--ref 9061293] [--out benchmarks/results]

Each revision trains the four ViSD-Boost phases with its own ``ctvlp.training.phases.run`` on the
same small synthetic cohort (written as preprocessed storage by ``gpu_step.write_storage``, 16
training cases, batch 4, widths 4-16, 32^3 crops; today's with train.sync_every 50, its CUDA default), each phase once for 1 epoch and once for 2, under
``ctvlp.training.syncs.SyncCounter`` (today's file, loaded by path into both). Syncs per step =
(count of 2 epochs - count of 1 epoch) / steps per epoch: start-up cancels, per-epoch work
(validation, checkpoint) does not. On the CPU the counter counts every operation that would
make the host wait on a GPU (see its docstring), so the numbers need no GPU. The older revision
runs from a temporary git worktree. Writes syncs.md into --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from gpu_step import write_storage  # benchmarks/ is on sys.path
from machine import cpu

REPO = Path(__file__).resolve().parents[1]
COUNTER = REPO / "src" / "ctvlp" / "training" / "syncs.py"
PHASES = ("visual_cl", "align", "normality", "boost")

DRIVER = r"""
import importlib.util, json, sys
import torch
from ctvlp import config
from ctvlp.training.phases import run
spec = importlib.util.spec_from_file_location("sync_counter", sys.argv[1])
counter = importlib.util.module_from_spec(spec); spec.loader.exec_module(counter)
a = json.loads(sys.argv[2])
model = {"widths": [4, 8, 8, 16], "embed_dim": 16, "heads": 2, "text_max_length": 32, "token_stage": 3,
         "vq_codes": 8, "vq_dim": 16, "vq_heads": 2}
out, init = {}, None
for phase in a["phases"]:
    counts = {}
    for epochs in (1, 2):
        settings = {"epochs": epochs, "batch_size": 4, "crop_size": [32, 32, 32], "threads": 1, "device": "cpu"}
        try:  # train.sync_every as on CUDA where the revision has it
            train = config.validate({"train": {**settings, "sync_every": 50}})["train"]
        except Exception:
            train = config.validate({"train": settings})["train"]
        for section in ("visual_cl", "normality", "boost"):
            train[section]["epochs"] = epochs
        with counter.SyncCounter("cpu") as c:
            run(phase, a["cases"], a["reports"], f"{a['out']}/{phase}{epochs}", model, train, 0,
                init=init, contrast="disease")
        counts[epochs] = c.total
    init = f"{a['out']}/{phase}2"
    out[phase] = (counts[2] - counts[1]) / a["steps_per_epoch"]
print("RESULT" + json.dumps(out))
"""


def cohort(root: Path) -> tuple[Path, Path]:
    """20 cases (16 train, 4 val) with reports: every present anatomy normal or abnormal."""
    from ctvlp import catalog
    from ctvlp.imaging.storage import with_folders

    paths = write_storage(root, 20, (40, 40, 36))
    rng = np.random.default_rng(0)
    reports = []
    for p in paths:
        for a in catalog.anatomies():
            abnormal = rng.random() < 0.3
            reports.append({"case_id": p.case_id, "anatomy": a.name, "status": "abnormal" if abnormal else "normal",
                            "text": f"Lesion in the {a.name}." if abnormal else f"The {a.name} is unremarkable."})
    cases = pl.DataFrame({"case_id": [p.case_id for p in paths],
                          "split": ["train"] * 16 + ["val"] * 4, "report_text": ["-"] * 20})
    with_folders(cases, root / "segment", root / "preprocessed").write_parquet(root / "cases.parquet")
    pl.DataFrame(reports).write_parquet(root / "reports.parquet")
    return root / "cases.parquet", root / "reports.parquet"


def measure(src: Path, cases: Path, reports: Path, out: Path) -> dict:
    args = {"cases": str(cases), "reports": str(reports), "out": str(out), "phases": PHASES, "steps_per_epoch": 4}
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", DRIVER, str(COUNTER), json.dumps(args)], capture_output=True,
                         text=True, env=env, check=False)
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT")]
    if res.returncode or not line:
        raise RuntimeError(f"{src}: {res.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT"):])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="9061293")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ctvlp-syncs-") as tmp:
        tmp = Path(tmp)
        cases, reports = cohort(tmp / "cohort")
        worktree = tmp / "old"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.ref], check=True,
                       capture_output=True)
        try:
            old = measure(worktree / "src", cases, reports, tmp / "runs_old")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)
        new = measure(REPO / "src", cases, reports, tmp / "runs_new")
    lines = [f"# Host syncs per training step ({dt.date.today().isoformat()})", "",
             f"- machine: {cpu()}, {os.cpu_count()} cores, {platform.platform()} (CPU; the count needs no GPU)",
             f"- command: `python benchmarks/syncs.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             "- per step, start-up removed; per-epoch work (validation, checkpoint, the sync at the epoch end) "
             "spread over 4 steps per epoch, so these include it: at real epoch lengths its share per step vanishes",
             "",
             f"| phase | {args.ref} | today |", "|---|---|---|"]
    lines += [f"| {p} | {old[p]:g} | {new[p]:g} |" for p in PHASES]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "syncs.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

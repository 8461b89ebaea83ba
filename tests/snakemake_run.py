"""Running the repository's Snakefile from tests: in a given working directory, with this
interpreter's snakemake and the venv's `ctvlp` on PATH."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO

TEST_CONFIG = REPO / ".test" / "config.yaml"  # the tiny whole-workflow config


def snakemake(workdir: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "--cores", "2", *args], capture_output=True, text=True, env=env, timeout=timeout)


def planned_jobs(workdir: Path, *args: str) -> dict[str, int]:
    """{rule: number of jobs} a dry run would run (empty when nothing is to be done)."""
    out = snakemake(workdir, "-n", *args)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    if "Nothing to be done" in text:
        return {}
    stats = text.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", stats, re.M)
            if m.group(1) != "job"}


def planned_rules(workdir: Path, *args: str) -> set[str]:
    """The rules a dry run would run (empty when nothing is to be done)."""
    return set(planned_jobs(workdir, *args))

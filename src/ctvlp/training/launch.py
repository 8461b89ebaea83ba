"""How a training job starts its processes: ``ctvlp`` itself for one GPU (or the CPU), or torchrun
with one process per GPU on this node (``--standalone``: a local rendezvous, no other setting
needed). The workflow's training rule and the data-parallel test both use ``command``."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

NVIDIA_CONTROL = Path("/dev/nvidiactl")


def command(processes: int, python: str | None = None, module: str = "ctvlp.cli") -> list[str]:
    """The argument list that runs ``module`` (the ``ctvlp`` CLI) in ``processes`` data-parallel
    processes (append the subcommand and its options). ``python``: the interpreter torchrun runs
    under (this one by default), so a venv's torch and ctvlp are used."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, not {processes}")
    if processes == 1:
        return ["ctvlp"] if module == "ctvlp.cli" else [python or sys.executable, "-m", module]
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", "-m", module]


def shell_prefix(processes: int) -> str:
    """``command`` as text for a shell rule; torchrun goes through ``python -m`` of the Python on
    the job's PATH, so a conda env or venv on the node is the one that runs."""
    return shlex.join(command(processes, python="python"))


def cuda_present() -> bool:
    """Whether this machine has an NVIDIA driver (its control device or ``nvidia-smi``): cheap, no
    torch import, so the workflow can plan GPU resources at parse time."""
    return NVIDIA_CONTROL.exists() or shutil.which("nvidia-smi") is not None

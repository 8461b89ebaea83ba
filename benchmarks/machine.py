"""What every benchmark writes beside its numbers: the machine it ran on."""

import platform
from pathlib import Path


def cpu() -> str:
    """The CPU model (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

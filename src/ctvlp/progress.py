"""Progress a person can follow while the full log goes to its file.

Progress is a log record like any other, on the ``ctvlp.progress`` logger: one line per shard
finished, per training epoch (loss, samples/s), per tenth of a batch job (reports, embeddings).
The log file gets every record. A workflow rule passes ``--progress-fd 3`` and opens fd 3 on
Snakemake's own stderr (``3>&2 > {log} 2>&1``): `attach_terminal` sends only the progress
records there, so the terminal (or the SLURM job's output file) shows one line per step while the
rule's log keeps everything.

tqdm bars redraw a line with carriage returns: they run only when stderr is a terminal; anywhere
else (a log file, a pipe, SLURM) `bar` is disabled and `lines` logs plain lines instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

PROGRESS = "ctvlp.progress"
log = logging.getLogger(PROGRESS)


def interactive(stream=None) -> bool:
    """Whether ``stream`` (default sys.stderr) is a terminal that can redraw a bar."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or not a file
        return False


class _OnlyProgress(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == PROGRESS or record.name.startswith(PROGRESS + ".")


def attach_terminal(fd: int, command: str, logger: logging.Logger | None = None) -> logging.Handler | None:
    """Send the progress records (only those) to the open file descriptor ``fd`` as lines
    ``HH:MM:SS ctvlp <command>: <message>``; returns the handler, or None when ``fd`` is not open
    (e.g. a torchrun worker, which does not inherit it): then progress stays in the log only."""
    try:
        os.fstat(fd)
        stream = open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    except OSError:
        return None
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.INFO)
    handler.addFilter(_OnlyProgress())
    handler.setFormatter(logging.Formatter(f"%(asctime)s ctvlp {command}: %(message)s", datefmt="%H:%M:%S"))
    (logger or logging.getLogger()).addHandler(handler)
    return handler


def bar(iterable=None, **kwargs):
    """A tqdm bar when stderr is a terminal; disabled elsewhere, so logs hold no carriage returns."""
    from tqdm import tqdm

    kwargs["disable"] = bool(kwargs.get("disable")) or not interactive()
    return tqdm(iterable, **kwargs)


def lines(iterable: Iterable, total: int, what: str, unit: str, *, parts: int = 10,
          every_s: float = 60.0) -> Iterator:
    """Yield ``iterable``'s items; on a terminal with a tqdm bar, elsewhere with a progress line
    ``<what>: i/total <unit>s (x <unit>/s)`` after each tenth of ``total`` (``parts``), at least
    every ``every_s`` seconds, and at the end."""
    if interactive():
        yield from bar(iterable, total=total, desc=what, unit=unit)
        return
    start = last = time.perf_counter()
    step = max(1, -(-total // parts)) if total else 1
    done = 0
    for done, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if done % step == 0 or done == total or now - last >= every_s:
            last = now
            log.info("%s: %d/%d %ss (%.1f %s/s)", what, done, total, unit, done / max(now - start, 1e-9), unit)
    if done != total:  # an iterable shorter than announced: its real end
        log.info("%s: %d/%d %ss (ended early)", what, done, total, unit)


class _Lines:
    """``counter``'s line-per-tenth form (not a terminal): tqdm's update / set_postfix / close."""

    def __init__(self, total: int, what: str, unit: str, parts: int, every_s: float):
        self.total, self.what, self.unit, self.every_s = total, what, unit, every_s
        self.step = max(1, -(-total // parts)) if total else 1
        self.done, self.postfix = 0, ""
        self.start = self.last = time.perf_counter()

    def set_postfix(self, refresh: bool = True, **values) -> None:  # refresh: tqdm's signature, unused
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        now = time.perf_counter()
        if self.done // self.step > before // self.step or self.done == self.total or now - self.last >= self.every_s:
            self.last = now
            log.info("%s: %d/%d %ss (%.1f %s/s)%s", self.what, self.done, self.total, self.unit,
                     self.done / max(now - self.start, 1e-9), self.unit, f"; {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        if self.done != self.total:
            log.info("%s: %d/%d %ss (stopped)", self.what, self.done, self.total, self.unit)


def counter(total: int, what: str, unit: str, *, parts: int = 10, every_s: float = 60.0):
    """A progress counter for work that finishes out of order (a thread pool): ``update(n)``,
    ``set_postfix(**values)``, ``close()``. A tqdm bar on a terminal; elsewhere a progress line as
    ``lines`` writes them, after each tenth of ``total``, at least every ``every_s`` seconds and at
    the end."""
    if interactive():
        return bar(total=total, desc=what, unit=unit)
    return _Lines(total, what, unit, parts, every_s)


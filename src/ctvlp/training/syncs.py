"""Counting the operations that make the host wait for the device (host syncs).

On a GPU every such operation stalls the Python thread until the queued kernels are done, so the
next step's kernels cannot be queued behind them. ``SyncCounter`` records, below autograd (a
``TorchDispatchMode``), each operation whose result the host needs or whose output size depends
on tensor values: ``.item()``/``bool()``/``float()`` (``_local_scalar_dense``), ``nonzero``,
boolean indexing, ``unique``, ``masked_select``, ``repeat_interleave`` with tensor repeats,
``bincount`` and copies from a device to the CPU. It counts the same operations on the CPU, where
they cost nothing, so the count can be measured on any machine; numpy work on the loader's CPU
batch is not counted (it needs no device). Each record says where it was called from: the
innermost frame in ctvlp's code, or torch's.

On a CUDA device only operations on CUDA tensors count. On the CPU everything is a CPU tensor, so
the work of ``torch.optim`` (its step counters stay on the CPU when the parameters are on CUDA)
and of the DataLoader (it builds CPU batches) is left out there.
"""

from __future__ import annotations

import collections
import os
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

ALWAYS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
          aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
          aten.repeat_interleave.Tensor, aten.bincount.default, aten.equal.default}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
COPIES = {aten._to_copy.default, aten.copy_.default}

_PACKAGE = str(Path(__file__).resolve().parents[1])


def _syncs(func, args, kwargs) -> bool:
    if func in ALWAYS:
        return True
    if func in BOOL_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)
    if func in COPIES:  # device -> host
        if func is aten._to_copy.default:
            src, dst = args[0], kwargs.get("device")
            return dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu"
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and src.device.type != "cpu"
    return False


_HOST_ONLY = (f"torch{os.sep}optim{os.sep}", f"torch{os.sep}utils{os.sep}data{os.sep}")


def _site() -> str | None:
    """file:line of the innermost frame in ctvlp's code (or the caller's outside it); None when
    the operation runs inside torch.optim or the DataLoader, whose work stays on the CPU when
    training runs on CUDA (see the module docstring)."""
    frames = [f for f in traceback.extract_stack() if f.filename != __file__]
    ours = [i for i, f in enumerate(frames) if f.filename.startswith(_PACKAGE)]
    below = frames[ours[-1] + 1:] if ours else frames
    if any(part in f.filename for f in below for part in _HOST_ONLY):
        return None
    if not ours:
        return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    frame = frames[ours[-1]]
    return f"ctvlp/{Path(frame.filename).relative_to(_PACKAGE)}:{frame.lineno}"


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            self.counter.record(str(func.overloadpacket.__name__), args, kwargs)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    """``Tensor.tolist`` reads a CPU tensor without any aten operation (on CUDA it copies to the
    host first, which the dispatch mode sees); counted here, on the CPU only."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and self.counter.device.type == "cpu":
            self.counter.record("tolist", args, kwargs)
        return func(*args, **kwargs)


class SyncCounter:
    """``with SyncCounter(device) as syncs: ...``; then ``syncs.total``, ``syncs.by_op`` and
    ``syncs.by_site`` (Counters), and ``syncs.from_ctvlp`` (those called from ctvlp's code).
    Host-side batch data are read with ``.numpy()`` in ctvlp, which is never counted."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.by_op: collections.Counter = collections.Counter()
        self.by_site: collections.Counter = collections.Counter()
        self._modes = (_Function(self), _Dispatch(self))

    def __enter__(self) -> SyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def record(self, op: str, args, kwargs) -> None:
        if self.device.type != "cpu":
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if not any(t.device.type == self.device.type for t in tensors):
                return
        site = _site()
        if site is not None:
            self.by_op[op] += 1
            self.by_site[site] += 1

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    @property
    def from_ctvlp(self) -> int:
        return sum(n for site, n in self.by_site.items() if site.startswith("ctvlp/"))

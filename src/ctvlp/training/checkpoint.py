"""Training checkpoints: one safetensors file holding module, optimizer and RNG states as tensors
plus JSON metadata (progress, settings); loading it unpickles nothing."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..model.io import atomic_save, load_model_state, model_state

CHECKPOINT = "checkpoint.safetensors"


def checkpoint_payload(modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
                       state: dict) -> tuple[dict, dict]:
    """What a checkpoint holds, copied now (so that training may go on while it is written):
    tensors (each module's state as "<name>.<key>", optimizer state, torch RNG) on the CPU, and the
    JSON metadata (``state``: progress, settings; optimizer hyper-parameters, python/numpy RNG)."""
    def snapshot(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.clone().contiguous() if t.device.type == "cpu" else t.cpu().contiguous()

    tensors = {f"{name}.{k}": snapshot(v) for name, m in modules.items() for k, v in model_state(m).items()}
    osd = opt.state_dict()
    scalars = {}
    for i, s in osd["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"optim.{i}.{k}"] = snapshot(v)
            else:
                scalars[f"{i}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    meta = {**state, "optim_groups": osd["param_groups"], "optim_scalars": scalars, "rng_python": random.getstate(),
            "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, {"state": json.dumps(meta, default=str)}


class CheckpointWriter:
    """Writes checkpoints on a background thread, one at a time: ``submit`` takes the payload
    (already copied) and returns at once; the next ``submit`` or ``wait`` joins the previous write
    and raises its error, if any. atomic_save makes each file complete or absent, also when the
    process is killed mid-write."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, path: Path, payload: tuple[dict, dict]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._write, args=(path, *payload), name="ctvlp-checkpoint")
        self._thread.start()

    def _write(self, path, tensors, metadata):
        try:
            atomic_save(tensors, path, metadata)
        except BaseException as e:  # re-raised on the training thread by wait()
            self._error = e

    def settle(self) -> None:
        """Block until the write in flight (if any) is done; its error stays for ``wait``."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self, raise_error: bool = True) -> None:
        self.settle()
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """-> (tensors, state) of a checkpoint (``checkpoint_payload`` written by ``CheckpointWriter``)."""
    with safe_open(str(path), framework="pt") as f:
        names = f.keys()
        return {k: f.get_tensor(k) for k in names}, json.loads(f.metadata()["state"])


def checkpoint_state(path: Path) -> dict:
    """The JSON state of a checkpoint, without loading its tensors."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["state"])


def restore_checkpoint(path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer) -> dict:
    """Load module, optimizer and RNG states from `path`; returns the JSON state."""
    tensors, meta = read_checkpoint(path)
    for name, m in modules.items():
        n = len(name) + 1
        load_model_state(m, {k[n:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}, path)
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    for k, v in meta["optim_scalars"].items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["optim_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = meta["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = meta["rng_numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    return meta


def flat(d, prefix="") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, sub in d.items() for k, v in flat(sub, f"{prefix}{key}.").items()}

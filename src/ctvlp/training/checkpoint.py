"""Training checkpoints: one safetensors file holding module, optimizer and RNG states as tensors
plus JSON metadata (progress, settings); loading it unpickles nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..model.io import atomic_save, load_model_state, model_state

CHECKPOINT = "checkpoint.safetensors"


def save_checkpoint(path: Path, modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, state: dict):
    """One safetensors file: tensors (each module's state as "<name>.<key>", optimizer state, torch RNG)
    plus JSON metadata `state` (progress, optimizer hyper-parameters, python/numpy RNG). Loading it
    unpickles nothing."""
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in model_state(m).items()}
    osd = opt.state_dict()
    scalars = {}
    for i, s in osd["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"optim.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    meta = {**state, "optim_groups": osd["param_groups"], "optim_scalars": scalars, "rng_python": random.getstate(),
            "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    atomic_save(tensors, path, {"state": json.dumps(meta, default=str)})


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """-> (tensors, state) of a checkpoint written by save_checkpoint."""
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

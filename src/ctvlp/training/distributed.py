"""Data-parallel training under torchrun: the process group, the global batch gathered with
gradient (contrastive negatives from every process), and the DDP wrapper of a step."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..model.io import pick_device

StepFn = Callable[[dict], "tuple[torch.Tensor, int, dict]"]  # batch -> (loss, pairs, extra metrics)


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device_name: str) -> tuple[torch.device, bool]:
    """Join the torchrun process group (env WORLD_SIZE > 1): NCCL with one GPU per LOCAL_RANK, gloo
    on CPU. Returns the device and whether this call initialised the group (then the caller ends it)."""
    device = pick_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() != 0:  # one process reports
        logging.getLogger("ctvlp").setLevel(logging.WARNING)
    return device, True


_GATHER_GROUP: dict = {}


def _gather_group():
    """A process group of its own for gather_batch: DDP's gradient all-reduces start at times that
    depend on each process's graph (a process without text rows never uses the text head), so on a
    shared group they could pair with another process's gather collective."""
    if _GATHER_GROUP.get("world") is not dist.group.WORLD:
        _GATHER_GROUP.update(world=dist.group.WORLD, group=dist.new_group())
    return _GATHER_GROUP["group"]


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous(), group=_gather_group())
    return torch.cat(parts, 0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward sums the gradient over ranks and returns this rank's rows.

    (torch.distributed.nn.functional.all_gather does the same, but on gloo its all_to_all backward
    silently scrambles non-contiguous gradients, e.g. those of an einsum; seen with torch 2.13.)
    """

    @staticmethod
    def forward(ctx, t):
        ctx.rows = slice(dist.get_rank() * t.shape[0], (dist.get_rank() + 1) * t.shape[0])
        return _all_gather(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=_gather_group())
        return grad[ctx.rows]


def gather_batch(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor's rows from every process, concatenated in rank order (the global batch).

    With grad enabled, floating tensors are gathered with gradient (as open_clip's gather_with_grad):
    backward sums the gradients of a rank's rows over all ranks. Every rank computes the same global
    loss L, so a rank gets world_size * dL/d(its rows), and DDP's gradient averaging turns that into
    exactly dL/d(params). (A floating tensor that does not require grad on this process, e.g. text
    embeddings of a batch without text rows, still takes part, so that every process runs the same
    backward collectives.) Other tensors (masks, ids) are gathered without autograd. No-op in one
    process. All ranks must pass the same keys, shapes and dtypes.
    """
    if dist_info()[1] == 1:
        return dict(tensors)
    out = {}
    for key, t in tensors.items():
        if t.is_floating_point() and torch.is_grad_enabled():
            out[key] = _GatherWithGrad.apply(t if t.requires_grad else t.detach().requires_grad_())
        else:  # gloo has no bool
            out[key] = _all_gather(t.to(torch.uint8)).bool() if t.dtype == torch.bool else _all_gather(t)
    return out


class _Step(torch.nn.Module):
    """Holds the model so DDP sees its parameters; forward is the phase's step function."""

    def __init__(self, model: torch.nn.Module, step_fn: StepFn):
        super().__init__()
        self.model, self.step_fn = model, step_fn

    def forward(self, batch):
        return self.step_fn(batch)


def wrap_step(model: torch.nn.Module, step_fn: StepFn, device: torch.device, static_graph: bool = False) -> StepFn:
    """step_fn itself in one process; under torch.distributed a DistributedDataParallel module whose
    forward is step_fn, so that backward averages the gradients over processes. static_graph: every
    step uses every trainable parameter, so DDP need not search the graph for unused ones (else a
    step may leave some out, e.g. a process whose batch has no text rows)."""
    if dist_info()[1] == 1:
        return step_fn
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(_Step(model, step_fn), device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=not static_graph)


def all_sum(*values) -> list[float]:
    """Each value (a number or a one-element tensor) summed over the processes, in one all-reduce
    (one host transfer); the values themselves in one process."""
    device = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
    if dist_info()[1] > 1 and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    if dist_info()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()

"""Training: `run_phase`, one resumable loop for every training phase, and phase 2 (`train`):
anatomy-wise image-report alignment (Eq. 1) with fVLM false-negative calibration.

A phase is a model, its trainable parameters and a step function ``step_fn(batch) -> (loss,
n_pairs, extra_metrics)``; run_phase adds AdamW with linear warmup then cosine decay, gradient
clipping, bf16 autocast on CUDA, metrics (CSV, optional TensorBoard), atomic checkpoints it
resumes from exactly, and DistributedDataParallel under torchrun.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .config import ConfigError, validate_section
from .model import CTVLP, alignment_loss, calibrated_targets

log = logging.getLogger(__name__)

MODEL_KEYS = ("widths", "stem_stride", "token_stage", "embed_dim", "heads", "text_model", "train_text_encoder",
              "temperature", "text_max_length", "train_text_head", "vq_codes", "vq_dim", "vq_depth", "vq_heads",
              "vq_beta", "vq_decay", "global_head")
CHECKPOINT = "checkpoint.safetensors"
RUNNING_METRICS = "metrics.running.csv"  # metrics.csv while the phase runs
# train settings that do not change the numbers: a checkpoint written under other values still resumes
RUNTIME_KEYS = ("threads", "device", "checkpoint_every", "tensorboard", "resume", "workers")

StepFn = Callable[[dict], "tuple[torch.Tensor, int, dict]"]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Learning-rate factor: linear warmup to lr, then cosine decay to min_lr (paper Sec. 7)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr


# ---- distributed -------------------------------------------------------------------------

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


def wrap_step(model: torch.nn.Module, step_fn: StepFn, device: torch.device) -> StepFn:
    """step_fn itself in one process; under torch.distributed a DistributedDataParallel module whose
    forward is step_fn, so that backward averages the gradients over processes."""
    if dist_info()[1] == 1:
        return step_fn
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(_Step(model, step_fn), device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=True)  # e.g. no text rows in a batch


# ---- checkpoints -------------------------------------------------------------------------

def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state to save: everything except a frozen pretrained text encoder (rebuilt from its folder)."""
    keep_text = getattr(model, "train_text_encoder", True)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if keep_text or not k.startswith("text_encoder.")}


def _load_model_state(model: torch.nn.Module, state: dict, where):
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("text_encoder.")]
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None):
    """Write to a temporary file in the same folder, fsync, rename over `path`: complete or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


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
    _atomic_save(tensors, path, {"state": json.dumps(meta, default=str)})


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
        _load_model_state(m, {k[n:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}, path)
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


def _flat(d, prefix="") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    return {k: v for key, sub in d.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ---- the loop ----------------------------------------------------------------------------

def _batch_cases(dataset, batch: dict) -> list[str]:
    """The case ids of a batch (this process's part), for error messages."""
    ids = getattr(dataset, "case_ids", None)
    if ids is None or "index" not in batch:
        return []
    return [ids[i] for i in torch.as_tensor(batch["index"]).tolist()]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA for precision auto (where supported) or bf16; None (fp32) otherwise."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32, not {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto" and not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16


def _tensorboard(out_dir: Path, enabled: bool, purge_step: int):
    if not enabled:
        log.info("TensorBoard off (train.tensorboard is false); metrics go to %s only", out_dir / "metrics.csv")
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        log.info("TensorBoard off (%s); metrics go to %s only", e, out_dir / "metrics.csv")
        return None
    return SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge_step)


def run_phase(phase: str, model: torch.nn.Module, trainable: list[str] | None, step_fn: StepFn,
              dataset: torch.utils.data.Dataset, cfg: dict, out_dir: str | Path, *, seed: int,
              device: torch.device, fingerprint: dict | None = None, val_fn: Callable[[], float | dict] | None = None,
              after_step: Callable[[int, int], None] | None = None, train_mode: Callable[[], None] | None = None,
              extra_modules: dict[str, torch.nn.Module] | None = None, metrics: tuple[str, ...] = (),
              save_fn: Callable[[dict], None] | None = None) -> dict:
    """Train `model` for one phase; resumable. Returns a summary (steps, history, trainable names, ...).

    trainable: names of the parameters to optimise (None: all with requires_grad), e.g. what
    `set_trainable(model, phase)` returns. step_fn(batch) -> (loss, n_pairs, extra) runs under
    autocast and, with several processes, as the forward of a DDP module; contrastive phases gather
    their negatives with `gather_batch`. dataset: items for the default collate; its set_epoch(e), if
    any, is called each epoch. cfg: epochs, batch_size (global, split over processes), lr, min_lr,
    warmup_epochs, weight_decay, grad_clip, and optionally checkpoint_every, precision, tensorboard,
    resume, workers. val_fn() -> loss or {"loss": ..., <metric>: ...}, run on every process after each
    epoch (model in eval mode, no grad). after_step(step, total) runs after each optimizer step (e.g. a
    momentum update). train_mode() replaces model.train() at each epoch start (e.g. to keep a frozen
    encoder in eval mode). extra_modules {name: module}: more state for the checkpoint (e.g. the
    momentum encoder). metrics: the names of step_fn's extra metrics (CSV columns, fixed here).
    fingerprint: what else the result depends on (model config, data); with cfg (less RUNTIME_KEYS),
    seed, phase, trainable names and world size it must match a checkpoint to resume from it.
    save_fn(summary) writes the final weights (rank 0), after which the checkpoint is removed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = dist_info()
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if trainable is None else list(trainable)
    bad = [n for n in names if n not in named or not named[n].requires_grad]
    if bad:
        raise ValueError(f"phase {phase}: not trainable parameters of the model: {bad[:5]}")
    params = [named[n] for n in names]
    log.info("phase %s: %d trainable tensors (%d parameters): %s", phase, len(names),
             sum(p.numel() for p in params), ", ".join(names))

    per_rank = min(cfg["batch_size"], len(dataset)) // world
    if per_rank < 1 or per_rank * world < 2:
        raise ValueError(f"phase {phase}: {len(dataset)} samples and batch_size {cfg['batch_size']} over {world} "
                         "processes leave fewer than 2 samples per batch")
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                                  drop_last=True)
    per_epoch = len(sampler) // per_rank
    epochs = cfg["epochs"]
    total, warmup = epochs * per_epoch, round(cfg["warmup_epochs"] * per_epoch)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    every = int(cfg.get("checkpoint_every", 50))
    select = cfg.get("select", "last")
    if select == "best_val" and val_fn is None:
        raise ValueError(f"phase {phase}: train.select best_val needs a validation split")
    best = out_dir / "best.safetensors"
    dtype = autocast_dtype(cfg.get("precision", "auto"), device)
    amp = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else contextlib.nullcontext

    settings = {"phase": phase, "seed": seed, "world_size": world, "trainable": names, "data": fingerprint or {},
                "train": {k: v for k, v in cfg.items() if k not in RUNTIME_KEYS}}
    ckpt = out_dir / CHECKPOINT
    modules = {"model": model, **(extra_modules or {})}
    step, epoch0, pos0, history, csv_bytes, resumed = 0, 0, 0, [], None, None
    if ckpt.exists() and cfg.get("resume", True):
        meta = checkpoint_state(ckpt)
        if meta["settings_hash"] != _digest(settings):
            old, new = _flat(meta["settings"]), _flat(json.loads(json.dumps(settings, default=str)))
            diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            raise RuntimeError(f"{out_dir}: {CHECKPOINT} was written with other settings (differ: "
                               f"{', '.join(diff[:8]) or 'unknown'}); delete it, or set train.resume: false "
                               "to start this phase over")
        meta = restore_checkpoint(ckpt, modules, opt)
        step, epoch0, pos0, history, csv_bytes = meta["step"], meta["epoch"], meta["pos"], meta["history"], \
            meta["csv_bytes"]
        resumed = step
        log.info("phase %s: resuming from %s at step %d of %d (epoch %d, batch %d)", phase, ckpt, step, total,
                 epoch0, pos0)
    elif ckpt.exists() and rank == 0:
        log.info("phase %s: train.resume is false; starting over (removing %s)", phase, ckpt)
        ckpt.unlink()
    if rank == 0:
        for tmp in out_dir.glob(f".{CHECKPOINT}.*.tmp"):  # a checkpoint write cut off by a kill
            tmp.unlink()

    columns = ["phase", "step", "epoch", "split", "loss", "lr", "samples_per_s", "grad_norm", "pairs", *metrics]
    # metrics.csv is a declared workflow output, which Snakemake deletes before re-running a killed
    # job: rows go to a file of their own until the phase ends, so a resumed run keeps steps 1..N
    csv_path = out_dir / RUNNING_METRICS
    with contextlib.ExitStack() as stack:
        fh = tb = None
        if rank == 0:
            if resumed is not None and csv_path.exists() and csv_path.stat().st_size >= csv_bytes:
                os.truncate(csv_path, csv_bytes)  # drop rows logged after the checkpoint
                fh = stack.enter_context(open(csv_path, "a", newline=""))
            else:
                fh = stack.enter_context(open(csv_path, "w", newline=""))
                fh.write(",".join(columns) + "\n")
            tb = _tensorboard(out_dir, cfg.get("tensorboard", False), step + 1)  # drops events after the checkpoint
            if tb is not None:
                stack.callback(tb.close)
        writer = csv.DictWriter(fh, columns) if fh else None

        def record(row: dict):
            if writer is None:
                return
            writer.writerow({"phase": phase, **row})
            if tb is not None:
                for k, v in row.items():
                    if k not in ("step", "epoch", "split") and v != "":
                        tb.add_scalar(f"{phase}/{row['split']}/{k}", float(v), row["step"])

        def checkpoint(epoch: int, pos: int):
            if rank != 0:
                return
            fh.flush()
            os.fsync(fh.fileno())
            if tb is not None:
                tb.flush()
            save_checkpoint(ckpt, modules, opt, {
                "settings_hash": _digest(settings), "settings": settings, "step": step, "epoch": epoch,
                "pos": pos, "history": history, "csv_bytes": csv_path.stat().st_size})

        run = wrap_step(model, step_fn, device)
        bar = stack.enter_context(tqdm(total=total, initial=step, desc=f"train {phase}", unit="step",
                                       disable=rank != 0))
        for epoch in range(epoch0, epochs):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            order = list(sampler)  # epoch e's order depends on (seed, e) only
            start = pos0 if epoch == epoch0 else 0
            batches = [order[i * per_rank:(i + 1) * per_rank] for i in range(start, per_epoch)]
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=batches, num_workers=cfg.get("workers", 0), pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(seed + epoch))  # leaves the global RNG alone
            (train_mode or model.train)()
            tick = time.perf_counter()
            for pos, batch in enumerate(loader, start):
                lr = 0.0
                for g in opt.param_groups:
                    g["lr"] = lr = g["initial_lr"] * warmup_cosine(step, total, warmup, cfg["lr"], cfg["min_lr"])
                with amp():
                    loss, pairs, extra = run(batch)
                if set(extra) - set(metrics):
                    raise KeyError(f"phase {phase}: step_fn returned metrics {sorted(set(extra) - set(metrics))} "
                                   f"not declared in metrics={metrics}")
                if not torch.isfinite(loss):
                    kept = f"the last checkpoint {ckpt} is kept" if ckpt.exists() else "no checkpoint was written yet"
                    raise FloatingPointError(f"phase {phase}: non-finite loss ({loss.item()}) at step {step} "
                                             f"(epoch {epoch}) on a batch of cases {_batch_cases(dataset, batch)}; "
                                             f"stopped before the update, {kept}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf"))
                if not torch.isfinite(norm):
                    raise FloatingPointError(f"phase {phase}: non-finite gradient norm at step {step} (epoch {epoch})")
                opt.step()
                if after_step is not None:
                    after_step(step, total)
                step += 1
                now = time.perf_counter()
                rate = per_rank * world / (now - tick)
                tick = now
                record({"step": step, "epoch": epoch, "split": "train", "loss": f"{loss.item():.6f}",
                        "lr": f"{lr:.4e}", "samples_per_s": f"{rate:.2f}", "grad_norm": f"{norm.item():.4f}",
                        "pairs": pairs, **{k: f"{float(v):.6g}" for k, v in extra.items()}})
                bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{rate:.1f}")
                bar.update()
                if every > 0 and step % every == 0 and pos + 1 < per_epoch:
                    checkpoint(epoch, pos + 1)
            if world > 1:  # BatchNorm statistics of rank 0 (those saved) everywhere, as DDP's next forward would
                for b in model.buffers():
                    if b.is_floating_point():
                        dist.broadcast(b, 0)
            if val_fn is not None:
                model.eval()
                with torch.no_grad(), amp():
                    val = val_fn()
                val = {k: float(v) for k, v in (val if isinstance(val, dict) else {"loss": val}).items()}
                history.append({"epoch": epoch, **val})
                record({"step": step, "epoch": epoch, "split": "val", "loss": f"{val['loss']:.6f}",
                        **{k: f"{v:.6g}" for k, v in val.items() if k != "loss"}})
                log.info("phase %s epoch %d: validation loss %.4f", phase, epoch, val["loss"])
                if select == "best_val" and rank == 0 and val["loss"] <= min(h["loss"] for h in history):
                    _atomic_save(model_state(model), best)  # before the epoch's checkpoint: resumable
            checkpoint(epoch + 1, 0)

    summary = {"phase": phase, "steps": total, "batch_size": per_rank * world, "world_size": world,
               "precision": str(dtype or torch.float32).replace("torch.", ""), "resumed_from_step": resumed,
               "history": history, "final_val_loss": history[-1]["loss"] if history else None,
               "trainable": {phase: names}}
    if select == "best_val" and history:
        # the epoch with the lowest VALIDATION loss (never test data); ties go to the later epoch
        summary["selected_epoch"] = min(reversed(history), key=lambda h: h["loss"])["epoch"]
        if rank == 0:
            _load_model_state(model, load_file(str(best)), best)
    if rank == 0:
        os.replace(csv_path, out_dir / "metrics.csv")
        if save_fn is not None:
            save_fn(summary)
        ckpt.unlink(missing_ok=True)  # the final weights are the result; a stale checkpoint would block reruns
        best.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    return summary


# ---- phase 2: anatomy-wise alignment ---------------------------------------------------------

class TextBank:
    """Token features of every unique anatomy text; computed once when the text encoder is frozen."""

    def __init__(self, model: CTVLP, texts: list[str], device, batch: int = 64):
        self.model, self.texts = model, texts
        self.frozen = not model.train_text_encoder
        if self.frozen and texts:
            hidden, masks = [], []
            tok = model.tokenize(texts)
            with torch.no_grad():
                for s in range(0, len(texts), batch):
                    ids = tok["input_ids"][s:s + batch].to(device)
                    att = tok["attention_mask"][s:s + batch].to(device)
                    hidden.append(model.text_tokens(ids, att))
                    masks.append(att)
            self.hidden, self.mask = torch.cat(hidden), torch.cat(masks)

    def encode(self, text_idx: torch.Tensor, anatomy_idx: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            hidden, mask = self.hidden[text_idx], self.mask[text_idx]
            return self.model.encode_text_tokens(hidden, mask, anatomy_idx)
        return self.model.encode_texts([self.texts[i] for i in text_idx.tolist()], anatomy_idx)


def batch_loss(model: CTVLP, bank: TextBank, batch: dict, device, calibrate: bool,
               gather: bool = False) -> tuple[torch.Tensor, int]:
    """Eq. 1 loss of a batch and its number of valid (sample, anatomy) pairs. gather: over the global
    batch of all processes (text ids agree across processes: the vocabulary comes from the whole split)."""
    image, anatomy = batch["image"].to(device), batch["anatomy"].to(device)
    valid, normal, tidx = batch["valid"].to(device), batch["normal"].to(device), batch["text_idx"].to(device)
    img, _ = model.encode_image(image, anatomy)
    txt = torch.zeros_like(img)
    rows, cols = torch.nonzero(valid, as_tuple=True)
    if len(rows):
        txt[rows, cols] = bank.encode(tidx[rows, cols], cols).to(txt.dtype)
    t = {"img": img, "txt": txt, "valid": valid, "normal": normal, "tidx": tidx}
    if gather:
        t = gather_batch(t)
    positives = calibrated_targets(t["valid"], t["normal"], t["tidx"], calibrate)
    return alignment_loss(t["img"], t["txt"], t["valid"], positives, model.logit_scale), int(t["valid"].sum())


def build_model(cfg_model: dict) -> CTVLP:
    return CTVLP(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg_model.items() if k in MODEL_KEYS})


def save_model(model: CTVLP, out_dir: Path, cfg_model: dict, extra: dict):
    _atomic_save(model_state(model), Path(out_dir) / "model.safetensors")
    (Path(out_dir) / "config.json").write_text(json.dumps({"model": cfg_model, **extra}, indent=1))


def load_model(model_dir: str | Path, device="cpu") -> CTVLP:
    """Rebuild from config.json and load safetensors weights (no pickle is ever loaded)."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file() or not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{model_dir} is not a ctvlp model folder (needs config.json and model.safetensors)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ConfigError(f"{path} lacks the model settings (a 'model' mapping)")
    # the same bounds as a workflow config, checked before anything is allocated
    model = build_model(validate_section("model", cfg["model"], str(path)))
    _load_model_state(model, load_file(str(model_dir / "model.safetensors")), model_dir)
    return model.to(device).eval()


def train(manifest: str | Path, reports: str | Path, results: str | Path, out_dir: str | Path,
          cfg_model: dict, cfg_train: dict, seed: int, init: str | Path | None = None) -> dict:
    """Phase 2 (fVLM alignment); see ``phases.run`` for every phase."""
    from .phases import run

    return run("align", manifest, reports, results, out_dir, cfg_model, cfg_train, seed, init=init)


@torch.no_grad()
def evaluate_loss(model, loader, bank, device, calibrate) -> float:
    model.eval()
    total, weight = 0.0, 0
    for batch in loader:
        loss, pairs = batch_loss(model, bank, batch, device, calibrate)
        total += loss.item() * pairs
        weight += pairs
    return total / max(weight, 1)

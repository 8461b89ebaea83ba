"""``run_phase``: one resumable training loop for every phase.

A phase is a ``PhaseTask``: its model, what one step computes, and optional validation, momentum
update, train/eval modes, extra checkpointed modules and final save. The loop adds, top to bottom:
AdamW over the task's trainable parameters with linear warmup then cosine decay (paper Sec. 7),
gradient clipping, bf16 autocast on CUDA, a per-step and per-epoch metrics CSV (optional
TensorBoard), atomic checkpoints it resumes from exactly, and DistributedDataParallel under torchrun.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm

from ..config import digest
from ..model.io import atomic_save, load_model_state, model_state
from .checkpoint import (
    CHECKPOINT,
    checkpoint_state,
    flat,
    restore_checkpoint,
    save_checkpoint,
)
from .distributed import dist_info, wrap_step

log = logging.getLogger(__name__)

RUNNING_METRICS = "metrics.running.csv"  # metrics.csv while the phase runs
BEST = "best.safetensors"
COLUMNS = ("phase", "step", "epoch", "split", "loss", "lr", "samples_per_s", "grad_norm", "pairs")


@dataclass(frozen=True)
class LoopSettings:
    """The loop's knobs (the ``train`` config section's; a phase's own section may set epochs, lr).
    ``RUNTIME`` ones do not change the numbers: a checkpoint written under other values resumes."""

    epochs: int
    batch_size: int  # global, split over processes
    lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    grad_clip: float
    checkpoint_every: int = 50
    precision: str = "auto"
    select: str = "last"
    tensorboard: bool = False
    resume: bool = True
    workers: int = 0

    RUNTIME = ("checkpoint_every", "tensorboard", "resume", "workers")

    @classmethod
    def from_dict(cls, values: dict) -> LoopSettings:
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    def numbers(self) -> dict:
        """The settings a checkpoint must share to be resumed."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME}


class PhaseTask:
    """What a training phase adds to the loop. Subclasses set ``name`` and ``metrics`` (the names
    of ``step``'s extra metrics, CSV columns) and implement ``step``; the rest is optional."""

    name = "phase"
    metrics: tuple[str, ...] = ()

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.extra_modules: dict[str, torch.nn.Module] = {}  # more state for the checkpoint

    def trainable(self) -> list[str]:
        """Names of the parameters to optimise (default: all that require grad)."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def step(self, batch: dict) -> tuple[torch.Tensor, int, dict]:
        """(loss, contrastive pairs or rows, extra metrics) of one batch; runs under autocast and,
        with several processes, as the forward of a DDP module."""
        raise NotImplementedError

    def validate(self) -> float | dict | None:
        """Validation loss (or {"loss": ..., metric: ...}) after each epoch, model in eval mode,
        no grad, on every process; None: the phase has no validation."""
        return None

    def train_mode(self) -> None:
        """Called at each epoch start (e.g. to keep a frozen module in eval mode)."""
        self.model.train()

    def after_step(self, step: int, total: int) -> None:
        """Called after each optimizer step (e.g. a momentum update)."""

    def save(self, summary: dict) -> None:
        """Write the final result (rank 0), after which the checkpoint is removed."""


def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Learning-rate factor: linear warmup to lr, then cosine decay to min_lr (paper Sec. 7)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA for precision auto (where supported) or bf16; None (fp32) otherwise."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32, not {precision!r}")
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto" and not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _MetricsLog:
    """Rows of the phase's metrics on rank 0: ``metrics.running.csv`` while the phase runs (a
    declared workflow output would be deleted by Snakemake before a rerun of a killed job), renamed
    to ``metrics.csv`` at the end; optionally TensorBoard. On resume, rows after the checkpoint go."""

    def __init__(self, out_dir: Path, phase: str, columns: list[str], resume_bytes: int | None, tensorboard: bool,
                 first_step: int, stack: contextlib.ExitStack):
        self.path, self.phase, self.tb = out_dir / RUNNING_METRICS, phase, None
        if resume_bytes is not None and self.path.exists() and self.path.stat().st_size >= resume_bytes:
            os.truncate(self.path, resume_bytes)
            self.fh = stack.enter_context(open(self.path, "a", newline=""))
        else:
            self.fh = stack.enter_context(open(self.path, "w", newline=""))
            self.fh.write(",".join(columns) + "\n")
        self.writer = csv.DictWriter(self.fh, columns)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=first_step)
                stack.callback(self.tb.close)
            except ImportError as e:
                log.info("TensorBoard off (%s); metrics go to %s only", e, self.path)

    def record(self, row: dict) -> None:
        self.writer.writerow({"phase": self.phase, **row})
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch", "split") and v != "":
                    self.tb.add_scalar(f"{self.phase}/{row['split']}/{k}", float(v), row["step"])

    def flush(self) -> int:
        """Make the rows durable; returns the file size (a checkpoint's resume point)."""
        self.fh.flush()
        os.fsync(self.fh.fileno())
        if self.tb is not None:
            self.tb.flush()
        return self.path.stat().st_size


def _batch_cases(dataset, batch: dict) -> list[str]:
    """The case ids of a batch (this process's part), for error messages."""
    ids = getattr(dataset, "case_ids", None)
    if ids is None or "index" not in batch:
        return []
    return [ids[i] for i in torch.as_tensor(batch["index"]).tolist()]


def _resume(ckpt: Path, settings: dict, modules: dict, opt, out_dir: Path, resume: bool, rank: int) -> dict | None:
    """The state of ``ckpt`` restored into ``modules`` and ``opt`` when it was written with the same
    ``settings``; None when there is none (or resume is off: then it is removed)."""
    if not ckpt.exists():
        return None
    if not resume:
        if rank == 0:
            log.info("train.resume is false; starting over (removing %s)", ckpt)
            ckpt.unlink()
        return None
    meta = checkpoint_state(ckpt)
    if meta["settings_hash"] != digest(settings):
        old, new = flat(meta["settings"]), flat(json.loads(json.dumps(settings, default=str)))
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise RuntimeError(f"{out_dir}: {CHECKPOINT} was written with other settings (differ: "
                           f"{', '.join(diff[:8]) or 'unknown'}); delete it, or set train.resume: false "
                           "to start this phase over")
    return restore_checkpoint(ckpt, modules, opt)


def run_phase(task: PhaseTask, dataset: torch.utils.data.Dataset, cfg: LoopSettings, out_dir, *, seed: int,
              device: torch.device, fingerprint: dict | None = None) -> dict:
    """Train ``task`` on ``dataset`` (items for the default collate; its ``set_epoch(e)``, if any,
    runs each epoch) into ``out_dir``; resumable. ``fingerprint``: what else the result depends on
    (model config, data); with the loop's numbers, seed, phase, trainable names and world size it
    must match a checkpoint to resume from it. Returns a summary (steps, history, ...)."""
    phase, model = task.name, task.model
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world = dist_info()

    # what trains, and how
    named = dict(model.named_parameters())
    names = task.trainable()
    bad = [n for n in names if n not in named or not named[n].requires_grad]
    if bad:
        raise ValueError(f"phase {phase}: not trainable parameters of the model: {bad[:5]}")
    params = [named[n] for n in names]
    log.info("phase %s: %d trainable tensors (%d parameters): %s", phase, len(names),
             sum(p.numel() for p in params), ", ".join(names))
    per_rank = min(cfg.batch_size, len(dataset)) // world
    if per_rank < 1 or per_rank * world < 2:
        raise ValueError(f"phase {phase}: {len(dataset)} samples and batch_size {cfg.batch_size} over {world} "
                         "processes leave fewer than 2 samples per batch")
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                                  drop_last=True)
    per_epoch = len(sampler) // per_rank
    total, warmup = cfg.epochs * per_epoch, round(cfg.warmup_epochs * per_epoch)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    validates = type(task).validate is not PhaseTask.validate
    if cfg.select == "best_val" and not validates:
        raise ValueError(f"phase {phase}: train.select best_val needs a validation split")
    dtype = autocast_dtype(cfg.precision, device)
    amp = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else contextlib.nullcontext

    # where to start: the beginning, or a checkpoint written with the same settings
    settings = {"phase": phase, "seed": seed, "world_size": world, "trainable": names, "data": fingerprint or {},
                "train": cfg.numbers()}
    ckpt, best = out_dir / CHECKPOINT, out_dir / BEST
    modules = {"model": model, **task.extra_modules}
    state = _resume(ckpt, settings, modules, opt, out_dir, cfg.resume, rank)
    step, epoch0, pos0, history = (state["step"], state["epoch"], state["pos"], state["history"]) if state else \
        (0, 0, 0, [])
    if state:
        log.info("phase %s: resuming from %s at step %d of %d (epoch %d, batch %d)", phase, ckpt, step, total,
                 epoch0, pos0)
    if rank == 0:
        for tmp in out_dir.glob(f".{CHECKPOINT}.*.tmp"):  # a checkpoint write cut off by a kill
            tmp.unlink()

    with contextlib.ExitStack() as stack:
        metrics = _MetricsLog(out_dir, phase, [*COLUMNS, *task.metrics], state and state["csv_bytes"],
                              cfg.tensorboard, step + 1, stack) if rank == 0 else None

        def checkpoint(epoch: int, pos: int):
            if rank == 0:
                csv_bytes = metrics.flush()
                save_checkpoint(ckpt, modules, opt, {"settings_hash": digest(settings), "settings": settings,
                                                     "step": step, "epoch": epoch, "pos": pos, "history": history,
                                                     "csv_bytes": csv_bytes})

        def record(row: dict):
            if metrics is not None:
                metrics.record(row)

        run = wrap_step(model, task.step, device)
        bar = stack.enter_context(tqdm(total=total, initial=step, desc=f"train {phase}", unit="step",
                                       disable=rank != 0))
        for epoch in range(epoch0, cfg.epochs):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            order = list(sampler)  # epoch e's order depends on (seed, e) only
            start = pos0 if epoch == epoch0 else 0
            batches = [order[i * per_rank:(i + 1) * per_rank] for i in range(start, per_epoch)]
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=batches, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(seed + epoch))  # leaves the global RNG alone
            task.train_mode()
            tick = time.perf_counter()
            for pos, batch in enumerate(loader, start):
                lr = 0.0
                for group in opt.param_groups:
                    group["lr"] = lr = group["initial_lr"] * warmup_cosine(step, total, warmup, cfg.lr, cfg.min_lr)
                with amp():
                    loss, pairs, extra = run(batch)
                if set(extra) - set(task.metrics):
                    raise KeyError(f"phase {phase}: step returned metrics {sorted(set(extra) - set(task.metrics))} "
                                   f"not declared in metrics={task.metrics}")
                if not torch.isfinite(loss):
                    kept = f"the last checkpoint {ckpt} is kept" if ckpt.exists() else "no checkpoint was written yet"
                    raise FloatingPointError(f"phase {phase}: non-finite loss ({loss.item()}) at step {step} "
                                             f"(epoch {epoch}) on a batch of cases {_batch_cases(dataset, batch)}; "
                                             f"stopped before the update, {kept}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
                if not torch.isfinite(norm):
                    raise FloatingPointError(f"phase {phase}: non-finite gradient norm at step {step} (epoch {epoch})")
                opt.step()
                task.after_step(step, total)
                step += 1
                now = time.perf_counter()
                rate = per_rank * world / (now - tick)
                tick = now
                record({"step": step, "epoch": epoch, "split": "train", "loss": f"{loss.item():.6f}",
                        "lr": f"{lr:.4e}", "samples_per_s": f"{rate:.2f}", "grad_norm": f"{norm.item():.4f}",
                        "pairs": pairs, **{k: f"{float(v):.6g}" for k, v in extra.items()}})
                bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{rate:.1f}")
                bar.update()
                if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and pos + 1 < per_epoch:
                    checkpoint(epoch, pos + 1)
            if world > 1:  # BatchNorm statistics of rank 0 (those saved) everywhere, as DDP's next forward would
                for buffer in model.buffers():
                    if buffer.is_floating_point():
                        dist.broadcast(buffer, 0)
            if validates:
                model.eval()
                with torch.no_grad(), amp():
                    val = task.validate()
                val = {k: float(v) for k, v in (val if isinstance(val, dict) else {"loss": val}).items()}
                history.append({"epoch": epoch, **val})
                record({"step": step, "epoch": epoch, "split": "val", "loss": f"{val['loss']:.6f}",
                        **{k: f"{v:.6g}" for k, v in val.items() if k != "loss"}})
                log.info("phase %s epoch %d: validation loss %.4f", phase, epoch, val["loss"])
                if cfg.select == "best_val" and rank == 0 and val["loss"] <= min(h["loss"] for h in history):
                    atomic_save(model_state(model), best)  # before the epoch's checkpoint: resumable
            checkpoint(epoch + 1, 0)

    summary = {"phase": phase, "steps": total, "batch_size": per_rank * world, "world_size": world,
               "precision": str(dtype or torch.float32).replace("torch.", ""),
               "resumed_from_step": state["step"] if state else None, "history": history,
               "final_val_loss": history[-1]["loss"] if history else None, "trainable": {phase: names}}
    if cfg.select == "best_val" and history:
        # the epoch with the lowest VALIDATION loss (never test data); ties go to the later epoch
        summary["selected_epoch"] = min(reversed(history), key=lambda h: h["loss"])["epoch"]
        if rank == 0:
            load_model_state(model, load_file(str(best)), best)
    if rank == 0:
        os.replace(out_dir / RUNNING_METRICS, out_dir / "metrics.csv")
        task.save(summary)
        ckpt.unlink(missing_ok=True)  # the final weights are the result; a stale checkpoint would block reruns
        best.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    return summary

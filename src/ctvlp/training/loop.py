"""``run_phase``: one resumable training loop for every phase.

A phase is a ``PhaseTask``: its model, what one step computes, and optional validation, momentum
update, train/eval modes, extra checkpointed modules and final save. The loop adds, top to bottom:
AdamW (or the paper's Adam, ``train.optimizer``) over the task's trainable parameters with linear
warmup then cosine decay (paper Sec. 7),
gradient clipping, bf16 autocast on CUDA, a per-step and per-epoch metrics CSV (optional
TensorBoard), atomic checkpoints it resumes from exactly (written by a background thread, every
``checkpoint_every`` steps and/or ``checkpoint_minutes``), and DistributedDataParallel under torchrun.

Host syncs: on CUDA the step's values (loss, gradient norm, metrics) stay on the device and reach
the host together every ``sync_every`` steps, where finiteness is checked; on the CPU, where a
"sync" costs nothing, every step is checked before its update. The loader is built once, with
persistent workers that get the epoch with each key (``CropDataset.keyed_by_epoch``).
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

from .. import progress
from ..config import digest
from ..model.io import atomic_save, load_model_state, model_state
from .checkpoint import (
    CHECKPOINT,
    CheckpointWriter,
    checkpoint_payload,
    checkpoint_state,
    flat,
    restore_checkpoint,
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
    checkpoint_every: int = 0
    checkpoint_minutes: float = 10.0
    precision: str = "auto"
    select: str = "last"
    tensorboard: bool = False
    resume: bool = True
    workers: int | str = "auto"
    sync_every: int = 0  # 0: every step on the CPU, every 50 on CUDA
    optimizer: str = "adamw"  # adamw: decoupled weight decay; adam: the paper's (weight_decay as L2)

    RUNTIME = ("checkpoint_every", "checkpoint_minutes", "tensorboard", "resume", "workers", "sync_every")

    @classmethod
    def from_dict(cls, values: dict) -> LoopSettings:
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    def numbers(self) -> dict:
        """The settings a checkpoint must share to be resumed."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME}


OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``train.optimizer``: "adamw" (decoupled weight decay) or "adam" (the paper's; torch's Adam
    adds weight_decay to the gradient as an L2 term, so the paper preset sets it to 0)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"train.optimizer must be one of {sorted(OPTIMIZERS)}, not {name!r}")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


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

    static_graph = False  # True: every step uses every trainable parameter (DDP skips its unused search)

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


def loader_workers(workers: int | str, device: torch.device) -> int:
    """DataLoader workers: a number, or "auto": none on the CPU (the training process uses the
    cores), on CUDA the cores this process may use, shared by the processes of the node, less one
    for the process itself, at most 8."""
    if workers != "auto":
        return int(workers)
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, cores // per_node - 1))


def make_loader(dataset, batch_sampler, workers: int, device: torch.device, seed: int):
    """A DataLoader over ``batch_sampler``; workers persist across epochs when the dataset takes the
    epoch in its keys, pinned memory on CUDA; its own generator leaves the global RNG alone."""
    persistent = workers > 0 and getattr(dataset, "keyed_by_epoch", False)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=persistent,
                                       prefetch_factor=4 if workers else None,
                                       generator=torch.Generator().manual_seed(seed))


def validation_loader(dataset, batch_size: int, workers: int | str, device: torch.device, seed: int = 0):
    """This process's share of a validation set (every world_size-th sample from its rank), in
    order; tasks sum their totals over the processes (``distributed.all_sum``)."""
    rank, world = dist_info()
    keys = list(range(rank, len(dataset), world))
    batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    return make_loader(dataset, batches, loader_workers(workers, device), device, seed)


class _EpochBatches:
    """The batch sampler of the training loader: this process's batches of the current epoch from
    ``start`` on; keys are (epoch, index) when the dataset takes them."""

    def __init__(self, sampler, per_rank: int, per_epoch: int, keyed: bool):
        self.sampler, self.per_rank, self.per_epoch, self.keyed = sampler, per_rank, per_epoch, keyed
        self.epoch, self.start = 0, 0

    def set(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return self.per_epoch - self.start

    def __iter__(self):
        order = list(self.sampler)  # epoch e's order depends on (seed, e) only
        for i in range(self.start, self.per_epoch):
            part = order[i * self.per_rank:(i + 1) * self.per_rank]
            yield [(self.epoch, k) for k in part] if self.keyed else part


class _Pending:
    """Step values kept on the device until the next sync; ``flush`` copies them to the host in one
    transfer, checks that losses and gradient norms are finite and writes the metrics rows."""

    def __init__(self, phase: str, ckpt: Path, samples_per_step: int, writer: CheckpointWriter | None = None):
        self.phase, self.ckpt, self.samples, self.writer = phase, ckpt, samples_per_step, writer
        self.rows: list[dict] = []
        self.tick = time.perf_counter()
        self.epoch_loss, self.epoch_steps, self.epoch_seconds = 0.0, 0, 0.0  # for the epoch's progress line

    def end_epoch(self) -> tuple[float, float]:
        """(mean training loss, samples/s) of the steps flushed since the last call; starts the next epoch."""
        loss = self.epoch_loss / self.epoch_steps if self.epoch_steps else math.nan
        rate = self.samples * self.epoch_steps / self.epoch_seconds if self.epoch_seconds else math.nan
        self.epoch_loss, self.epoch_steps, self.epoch_seconds = 0.0, 0, 0.0
        return loss, rate

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def flush(self, record, bar) -> None:
        if not self.rows:
            return
        slots = [(r, k) for r in self.rows for k, v in r.items() if torch.is_tensor(v)]
        if slots:  # one transfer for all of them
            dev = self.rows[0]["loss"].device
            values = torch.stack([r[k].detach().float().reshape(()).to(dev) for r, k in slots]).tolist()
            for (r, k), v in zip(slots, values):
                r[k] = v
        now = time.perf_counter()
        rate = self.samples * len(self.rows) / (now - self.tick)
        self.epoch_seconds += now - self.tick
        self.tick = now
        for n, row in enumerate(self.rows):
            if not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])):
                what = "loss" if not math.isfinite(row["loss"]) else "gradient norm"
                if self.writer is not None:  # a checked checkpoint still being written completes first
                    self.writer.settle()
                kept = f"the last checkpoint {self.ckpt} is kept" if self.ckpt.exists() else \
                    "no checkpoint was written yet"
                self.rows = []
                raise FloatingPointError(f"phase {self.phase}: non-finite {what} ({row['loss']}) at step {row['step'] - 1} "
                                         f"(epoch {row['epoch']}), found at the sync after it (train.sync_every); "
                                         f"no later weights were saved, {kept}")
            record({"step": row["step"], "epoch": row["epoch"], "split": "train", "loss": f"{row['loss']:.6f}",
                    "lr": f"{row['lr']:.4e}", "samples_per_s": f"{rate:.2f}", "grad_norm": f"{row['grad_norm']:.4f}",
                    "pairs": int(row["pairs"]), **{k: f"{float(row[k]):.6g}" for k in row["extra"]}})
        self.epoch_loss += sum(row["loss"] for row in self.rows)
        self.epoch_steps += len(self.rows)
        bar.set_postfix(loss=f"{self.rows[-1]['loss']:.3f}", samples_s=f"{rate:.1f}")
        bar.update(len(self.rows))
        self.rows = []


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
    opt = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
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

    sync_every = cfg.sync_every or (1 if device.type == "cpu" else 50)
    batches = _EpochBatches(sampler, per_rank, per_epoch, getattr(dataset, "keyed_by_epoch", False))
    loader = make_loader(dataset, batches, loader_workers(cfg.workers, device), device, seed)
    writer = CheckpointWriter()
    with contextlib.ExitStack() as stack:
        stack.callback(writer.wait, raise_error=False)  # a write in flight completes, also on errors
        metrics = _MetricsLog(out_dir, phase, [*COLUMNS, *task.metrics], state and state["csv_bytes"],
                              cfg.tensorboard, step + 1, stack) if rank == 0 else None
        last_checkpoint = time.monotonic()

        def record(row: dict):
            if metrics is not None:
                metrics.record(row)

        bar = stack.enter_context(progress.bar(total=total, initial=step, desc=f"train {phase}", unit="step",
                                               disable=rank != 0))
        pending = _Pending(phase, ckpt, per_rank * world, writer)

        def checkpoint(epoch: int, pos: int):
            nonlocal last_checkpoint
            pending.flush(record, bar)  # only checked weights are saved
            last_checkpoint = time.monotonic()
            if rank == 0:
                csv_bytes = metrics.flush()
                writer.submit(ckpt, checkpoint_payload(modules, opt, {
                    "settings_hash": digest(settings), "settings": settings, "step": step, "epoch": epoch,
                    "pos": pos, "history": history, "csv_bytes": csv_bytes}))

        def due() -> bool:
            by_steps = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
            by_time = cfg.checkpoint_minutes > 0 and time.monotonic() - last_checkpoint >= 60 * cfg.checkpoint_minutes
            return by_steps or by_time

        run = wrap_step(model, task.step, device, static_graph=task.static_graph)
        for epoch in range(epoch0, cfg.epochs):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
            batches.set(epoch, pos0 if epoch == epoch0 else 0)
            task.train_mode()
            pending.tick = time.perf_counter()
            for pos, batch in enumerate(loader, batches.start):
                lr = 0.0
                for group in opt.param_groups:
                    group["lr"] = lr = group["initial_lr"] * warmup_cosine(step, total, warmup, cfg.lr, cfg.min_lr)
                with amp():
                    loss, pairs, extra = run(batch)
                if set(extra) - set(task.metrics):
                    raise KeyError(f"phase {phase}: step returned metrics {sorted(set(extra) - set(task.metrics))} "
                                   f"not declared in metrics={task.metrics}")
                if sync_every == 1 and not torch.isfinite(loss):
                    kept = f"the last checkpoint {ckpt} is kept" if ckpt.exists() else "no checkpoint was written yet"
                    raise FloatingPointError(f"phase {phase}: non-finite loss ({loss.item()}) at step {step} "
                                             f"(epoch {epoch}) on a batch of cases {_batch_cases(dataset, batch)}; "
                                             f"stopped before the update, {kept}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
                if sync_every == 1 and not torch.isfinite(norm):
                    raise FloatingPointError(f"phase {phase}: non-finite gradient norm at step {step} (epoch {epoch})")
                opt.step()
                task.after_step(step, total)
                step += 1
                pending.add({"step": step, "epoch": epoch, "lr": lr, "loss": loss.detach(), "grad_norm": norm.detach(),
                             "pairs": pairs, **extra, "extra": tuple(extra)})
                if len(pending.rows) >= sync_every:
                    pending.flush(record, bar)
                if pos + 1 < per_epoch and due():
                    checkpoint(epoch, pos + 1)
            pending.flush(record, bar)
            train_loss, samples_s = pending.end_epoch()
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
            if rank == 0:
                progress.log.info("train %s epoch %d/%d: step %d/%d, loss %.4f, %.1f samples/s%s", phase, epoch + 1,
                                  cfg.epochs, step, total, train_loss, samples_s,
                                  f", validation loss {history[-1]['loss']:.4f}" if validates else "")
                if cfg.select == "best_val" and rank == 0 and val["loss"] <= min(h["loss"] for h in history):
                    writer.wait()
                    atomic_save(model_state(model), best)  # before the epoch's checkpoint: resumable
            checkpoint(epoch + 1, 0)
        writer.wait()

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

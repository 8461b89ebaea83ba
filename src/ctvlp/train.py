"""Anatomy-wise image-report alignment (Eq. 1) with fVLM false-negative calibration."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import data
from .model import CTVLP, alignment_loss, calibrated_targets

MODEL_KEYS = ("widths", "stem_stride", "token_stage", "embed_dim", "heads", "text_model", "train_text_encoder",
              "temperature", "text_max_length", "train_text_head")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int):
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Learning-rate factor: linear warmup to lr, then cosine decay to min_lr (paper Sec. 7)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr


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


def batch_loss(model: CTVLP, bank: TextBank, batch: dict, device, calibrate: bool) -> tuple[torch.Tensor, int]:
    image, anatomy = batch["image"].to(device), batch["anatomy"].to(device)
    valid, normal, tidx = batch["valid"].to(device), batch["normal"].to(device), batch["text_idx"].to(device)
    img, _ = model.encode_image(image, anatomy)
    txt = torch.zeros_like(img)
    rows, cols = torch.nonzero(valid, as_tuple=True)
    if len(rows):
        txt[rows, cols] = bank.encode(tidx[rows, cols], cols).to(txt.dtype)
    positives = calibrated_targets(valid, normal, tidx, calibrate)
    return alignment_loss(img, txt, valid, positives, model.logit_scale), int(valid.sum())


def build_model(cfg_model: dict) -> CTVLP:
    return CTVLP(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg_model.items() if k in MODEL_KEYS})


def save_model(model: CTVLP, out_dir: Path, cfg_model: dict, extra: dict):
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if model.train_text_encoder or not k.startswith("text_encoder.")}
    save_file(state, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({"model": cfg_model, **extra}, indent=1))


def load_model(model_dir: str | Path, device="cpu") -> CTVLP:
    """Rebuild from config.json and load safetensors weights (no pickle is ever loaded)."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    model = build_model(cfg["model"])
    missing, unexpected = model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)
    missing = [k for k in missing if not k.startswith("text_encoder.")]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval()


def train(manifest: str | Path, reports: str | Path, results: str | Path, out_dir: str | Path,
          cfg_model: dict, cfg_train: dict, seed: int) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg_train["threads"])
    seed_everything(seed)
    device = pick_device(cfg_train["device"])
    man = pl.read_parquet(manifest)
    rep = pl.read_parquet(reports)
    model = build_model(cfg_model).to(device)

    def dataset(split: str, random_crop: bool, flip: bool):
        ids = man.filter(pl.col("split") == split)["case_id"].to_list()
        texts, tidx, normal = data.anatomy_texts(rep, ids, cfg_train["unmentioned_as_normal"])
        ds = data.CropDataset([data.case_paths(results, c) for c in ids], tidx, normal, cfg_train["crop_size"],
                              model.vision.stride, flip, seed, random_crop)
        return ds, TextBank(model, texts, device)

    train_ds, train_bank = dataset("train", True, cfg_train["flip"])
    val_ds, val_bank = dataset("val", True, False)
    if len(train_ds) < 2:
        raise ValueError(f"training needs at least 2 training cases, found {len(train_ds)}")
    bs = min(cfg_train["batch_size"], len(train_ds))
    loader = torch.utils.data.DataLoader(train_ds, batch_size=bs, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=bs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg_train["lr"], weight_decay=cfg_train["weight_decay"])
    total = cfg_train["epochs"] * len(loader)
    warmup = int(round(cfg_train["warmup_epochs"] * len(loader)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, total, warmup, cfg_train["lr"], cfg_train["min_lr"]))
    calibrate = cfg_train["false_negative_calibration"]
    log_path = out_dir / "metrics.csv"
    history = []
    with open(log_path, "w", newline="") as fh, tqdm(total=total, desc="train align", unit="step") as bar:
        log = csv.writer(fh)
        log.writerow(["step", "epoch", "split", "loss", "lr", "samples_per_s", "anatomy_pairs"])
        step = 0
        for epoch in range(cfg_train["epochs"]):
            model.train()
            train_ds.set_epoch(epoch)
            for batch in loader:
                t0 = time.perf_counter()
                loss, pairs = batch_loss(model, train_bank, batch, device, calibrate)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at step {step} (epoch {epoch}); stopping")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg_train["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(params, cfg_train["grad_clip"])
                opt.step()
                sched.step()
                rate = len(batch["index"]) / (time.perf_counter() - t0)
                log.writerow([step, epoch, "train", f"{loss.item():.5f}", f"{sched.get_last_lr()[0]:.3e}",
                              f"{rate:.2f}", pairs])
                bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{rate:.1f}")
                bar.update()
                step += 1
            val = evaluate_loss(model, val_loader, val_bank, device, calibrate)
            log.writerow([step, epoch, "val", f"{val:.5f}", "", "", ""])
            fh.flush()
            history.append({"epoch": epoch, "val_loss": val})
    summary = {"steps": total, "train_cases": len(train_ds), "val_cases": len(val_ds), "batch_size": bs,
               "final_val_loss": history[-1]["val_loss"] if history else None, "device": str(device),
               "seed": seed, "train": cfg_train}
    save_model(model.cpu(), out_dir, cfg_model, summary)
    return summary


@torch.no_grad()
def evaluate_loss(model, loader, bank, device, calibrate) -> float:
    model.eval()
    total, weight = 0.0, 0
    for batch in loader:
        loss, pairs = batch_loss(model, bank, batch, device, calibrate)
        total += loss.item() * pairs
        weight += pairs
    return total / max(weight, 1)

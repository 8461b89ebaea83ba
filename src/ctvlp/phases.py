"""The ViSD-Boost training phases and the CLIP baseline, each a `train.run_phase` with its own
step function (resumable, data-parallel under torchrun, metrics per step).

    visual_cl  phase 1: disease-level (or, for the ablation, instance-level) visual contrastive
               learning (Eq. 2) with a momentum encoder on a second, intensity-augmented view
    align      phase 2: anatomy-wise image-report alignment (Eq. 1, fVLM calibration)
    normality  phase 3: VQ-VAE on the frozen encoder's tokens of NORMAL anatomies (Eq. 3)
    boost      phase 4: Eq. 1 again on f_hat = MLP(f, q) with the VQ-VAE frozen
    global     baseline: CLIP-style whole volume vs whole report

Each phase starts from the previous phase's folder (``init``); which parameters train is
``model.PHASE_TRAINABLE``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from . import data
from .model import (alignment_loss, calibrated_targets, disease_contrastive_loss, instance_contrastive_loss,
                    make_momentum_copy, momentum_update, set_trainable)
from .train import (TextBank, _digest, batch_loss, build_model, dist_info, evaluate_loss, gather_batch, run_phase,
                    save_model, seed_everything, setup_distributed)

log = logging.getLogger(__name__)

PHASES = ("visual_cl", "align", "normality", "boost", "global")
SECTIONS = ("visual_cl", "normality", "boost")  # phases with their own train.<phase> settings


def phase_model_cfg(cfg_model: dict, phase: str) -> dict:
    """The model config a phase builds: the VQ-VAE exists from phase 3 on, global heads only for
    the CLIP baseline (so earlier phases' weights hold only what they train)."""
    out = dict(cfg_model)
    if phase not in ("normality", "boost"):
        out["vq_codes"] = 0
    out["global_head"] = phase == "global"
    return out


def phase_train_cfg(cfg_train: dict, phase: str) -> dict:
    """The shared train settings with this phase's epochs (and lr) from its section."""
    out = {k: v for k, v in cfg_train.items() if not isinstance(v, dict)}
    section = cfg_train.get(phase, {}) if phase in SECTIONS else {}
    out.update({k: v for k, v in section.items() if k in ("epochs", "lr")})
    return out


def init_from(model, init_dir: str | Path) -> None:
    """Load a previous phase's weights; only modules that phase did not have may be missing."""
    state = load_file(str(Path(init_dir) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    new = ("text_encoder.", "vqvae.", "perception.", "boost_on", "vis_global.", "txt_global.")
    missing = [k for k in missing if not k.startswith(new)]
    if missing or unexpected:
        raise ValueError(f"{init_dir}: weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    log.info("initialised from %s", init_dir)


def augment_view(image: torch.Tensor) -> torch.Tensor:
    """Second view for phase 1: random gamma, contrast/brightness and Gaussian noise per sample on
    the same crop, so every anatomy stays complete in both views (torch RNG: resumable)."""
    b = image.shape[0]
    shape = (b,) + (1,) * (image.dim() - 1)
    dev = image.device
    gamma = torch.exp(torch.empty(shape).uniform_(-0.3, 0.3)).to(dev)
    scale = torch.empty(shape).uniform_(0.9, 1.1).to(dev)
    shift = torch.empty(shape).uniform_(-0.05, 0.05).to(dev)
    noise = torch.randn(image.shape) * 0.02
    return ((image.clamp(0, 1) ** gamma) * scale + shift + noise.to(dev)).clamp(0, 1)


def run(phase: str, manifest, reports, results, out_dir, cfg_model: dict, cfg_train: dict, seed: int,
        init: str | Path | None = None, contrast: str = "disease") -> dict:
    """Train one phase into ``out_dir`` (model.safetensors, config.json, metrics.csv)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")
    if phase in ("normality", "boost") and init is None:
        raise ValueError(f"phase {phase} starts from the previous phase: give init")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg_train["threads"])
    device, own_group = setup_distributed(cfg_train["device"])
    try:
        seed_everything(seed)
        mcfg, tcfg = phase_model_cfg(cfg_model, phase), phase_train_cfg(cfg_train, phase)
        model = build_model(mcfg)
        if init is not None:
            init_from(model, init)
        model = model.to(device)
        trainable = set_trainable(model, phase)
        man, rep = pl.read_parquet(manifest), pl.read_parquet(reports)

        def dataset(split: str, flip: bool):
            ids = man.filter(pl.col("split") == split)["case_id"].to_list()
            texts, tidx, normal = data.anatomy_texts(rep, ids, cfg_train["unmentioned_as_normal"])
            ds = data.CropDataset([data.case_paths(results, c) for c in ids], tidx, normal, cfg_train["crop_size"],
                                  model.vision.stride, flip, seed, True)
            return ds, texts, ids

        train_ds, train_texts, train_ids = dataset("train", cfg_train["flip"])
        val_ds, val_texts, val_ids = dataset("val", False)
        if len(train_ds) < 2:
            raise ValueError(f"training needs at least 2 training cases, found {len(train_ds)}")
        val_loader = torch.utils.data.DataLoader(val_ds, batch_size=min(tcfg["batch_size"], len(train_ds)))
        make = {"visual_cl": _visual_cl, "align": _align, "normality": _normality, "boost": _align,
                "global": _global}[phase]
        parts = make(model=model, device=device, cfg=cfg_train, texts=(train_texts, val_texts),
                     ids=(train_ids, val_ids), man=man, val_loader=val_loader, contrast=contrast)
        info = {"phase": phase, "init": str(init) if init else None, "contrast": contrast if phase == "visual_cl" else None,
                "train_cases": len(train_ds), "val_cases": len(val_ds), "device": str(device), "seed": seed,
                "trainable": trainable}

        def save_fn(summary):
            extra = parts.pop("final", lambda: {})()
            save_model(model, out_dir, mcfg, {**info, **summary, **extra, "train": tcfg})

        fingerprint = {"model": mcfg, "cases": train_ids, "texts": _digest(train_texts), "init": info["init"],
                       "contrast": info["contrast"]}
        summary = run_phase(phase, model, trainable, parts["step"], train_ds, tcfg, out_dir, seed=seed,
                            device=device, fingerprint=fingerprint, val_fn=parts.get("val"),
                            after_step=parts.get("after_step"), train_mode=parts.get("train_mode"),
                            extra_modules=parts.get("extra_modules"), metrics=parts.get("metrics", ()),
                            save_fn=save_fn)
        return {**info, **summary}
    finally:
        if own_group:
            dist.destroy_process_group()


# ---- phase step functions ------------------------------------------------------------------


def _align(model, device, cfg, texts, val_loader, **_):
    """Phases 2 and 4 (the model's boost flag, set by set_trainable, makes the difference)."""
    train_bank, val_bank = TextBank(model, texts[0], device), TextBank(model, texts[1], device)
    calibrate = cfg["false_negative_calibration"]

    def step(batch):
        loss, pairs = batch_loss(model, train_bank, batch, device, calibrate, gather=True)
        return loss, pairs, {}

    def train_mode():
        model.train()
        if model.vqvae is not None:
            model.vqvae.eval()  # frozen in phase 4

    return {"step": step, "train_mode": train_mode,
            "val": lambda: evaluate_loss(model, val_loader, val_bank, device, calibrate)}


def _visual_cl(model, device, cfg, val_loader, contrast, **_):
    """Phase 1: Eq. 2 (contrast "disease") or the instance-level baseline (contrast "instance")."""
    if contrast not in ("disease", "instance"):
        raise ValueError(f"contrast must be disease or instance, not {contrast!r}")
    text_encoder, model.text_encoder = model.text_encoder, None  # the key encoder needs no text side
    key = make_momentum_copy(model)
    model.text_encoder = text_encoder
    m, scale = cfg["visual_cl"]["momentum"], math.log(1.0 / cfg["visual_cl"]["temperature"])
    loss_fn = disease_contrastive_loss if contrast == "disease" else instance_contrastive_loss

    def loss_of(batch, train: bool):
        image, anatomy = batch["image"].to(device), batch["anatomy"].to(device)
        valid, normal = batch["valid"].to(device), batch["normal"].to(device)
        q, _ = model.encode_image(image, anatomy)
        with torch.no_grad():
            k, _ = key.encode_image(augment_view(image), anatomy)
        t = {"q": q, "k": k, "valid": valid, "normal": normal}
        if train:
            t = gather_batch(t)
        args = (t["q"], t["k"], t["valid"], t["normal"]) if contrast == "disease" else (t["q"], t["k"], t["valid"])
        return loss_fn(*args, scale), int(t["valid"].sum())

    def step(batch):
        loss, pairs = loss_of(batch, True)
        return loss, pairs, {}

    @torch.no_grad()
    def val():
        total, weight = 0.0, 0
        for batch in val_loader:
            loss, pairs = loss_of(batch, False)
            total, weight = total + loss.item() * pairs, weight + pairs
        return total / max(weight, 1)

    def train_mode():
        model.train()
        key.eval()

    def vision_side(net):  # what Eq. 2 trains, and all the key encoder uses
        return torch.nn.ModuleDict({"vision": net.vision, "vis_pool": net.vis_pool, "vis_proj": net.vis_proj})

    online, target = vision_side(model), vision_side(key)
    return {"step": step, "val": val, "train_mode": train_mode, "extra_modules": {"momentum": target},
            "after_step": lambda step, total: momentum_update(online, target, m)}


def _normality(model, device, val_loader, **_):
    """Phase 3: Eq. 3 on the frozen encoder's tokens of normal anatomies; reports codebook usage
    and reconstruction error on normal vs abnormal anatomies of the validation split."""
    vq = model.vqvae

    def rows(batch, which):
        image, anatomy = batch["image"].to(device), batch["anatomy"].to(device)
        valid, normal = batch["valid"].to(device), batch["normal"].to(device)
        with torch.no_grad():
            return model.anatomy_rows(image, anatomy, valid & which(normal))

    def step(batch):
        r = rows(batch, lambda n: n)
        out = vq(r.tokens, r.pad, r.anatomy)
        if dist_info()[1] > 1:  # keep every process's codebook identical: average the EMA state
            for buf in (vq.codebook, vq.ema_count, vq.ema_sum):
                dist.all_reduce(buf)
                buf /= dist_info()[1]
        stats = vq.codebook_stats()
        return out.loss, int(r.tokens.shape[0]), {"recon": out.recon_loss.item(), "commit": out.commit_loss.item(),
                                                  "perplexity": stats["mean_perplexity"],
                                                  "dead_codes": stats["mean_dead_codes"]}

    @torch.no_grad()
    def recon_errors() -> dict:
        errs = {True: [], False: []}
        for batch in val_loader:
            r = rows(batch, lambda n: torch.ones_like(n))
            if not r.tokens.shape[0]:
                continue
            err = vq(r.tokens, r.pad, r.anatomy, update_codebook=False).row_error
            is_normal = batch["normal"].to(device)[r.batch, r.anatomy]
            for flag in (True, False):
                errs[flag] += err[is_normal == flag].tolist()
        mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
        return {"loss": mean(errs[True]), "recon_normal": mean(errs[True]), "recon_abnormal": mean(errs[False]),
                "n_normal": len(errs[True]), "n_abnormal": len(errs[False])}

    def train_mode():
        model.eval()
        vq.train()

    def final():
        errors = recon_errors()
        stats = vq.codebook_stats()
        log.info("VQ-VAE: validation reconstruction error normal %.4f (n=%d) vs abnormal %.4f (n=%d); "
                 "mean perplexity %.1f, mean dead codes %.1f of %d", errors["recon_normal"], errors["n_normal"],
                 errors["recon_abnormal"], errors["n_abnormal"], stats["mean_perplexity"], stats["mean_dead_codes"],
                 vq.codebook.shape[1])
        return {"normality": {**errors, **{k: v for k, v in stats.items() if k.startswith("mean") or k == "anatomies_seen"}}}

    return {"step": step, "val": recon_errors, "train_mode": train_mode, "final": final,
            "metrics": ("recon", "commit", "perplexity", "dead_codes", "recon_normal", "recon_abnormal", "n_normal",
                        "n_abnormal")}


def _global(model, device, cfg, texts, ids, man, val_loader, **_):
    """CLIP-style baseline: whole crop vs whole report, symmetric InfoNCE over the batch."""
    report_of = dict(zip(man["case_id"], man["report_text"]))
    reports = ([report_of[c] for c in ids[0]], [report_of[c] for c in ids[1]])

    def loss_of(batch, split, gather):
        img = model.encode_image_global(batch["image"].to(device))
        txt = model.encode_report_global([reports[split][i] for i in batch["index"].tolist()])
        valid = torch.ones(img.shape[0], 1, dtype=torch.bool, device=device)
        t = {"img": img[:, None], "txt": txt[:, None], "valid": valid}
        if gather:
            t = gather_batch(t)
        pos = calibrated_targets(t["valid"], torch.zeros_like(t["valid"]), torch.zeros_like(t["valid"], dtype=torch.long),
                                 calibrate=False)
        return alignment_loss(t["img"], t["txt"], t["valid"], pos, model.logit_scale), int(t["valid"].sum())

    def step(batch):
        loss, n = loss_of(batch, 0, True)
        return loss, n, {}

    @torch.no_grad()
    def val():
        total, weight = 0.0, 0
        for batch in val_loader:
            loss, n = loss_of(batch, 1, False)
            total, weight = total + loss.item() * n, weight + n
        return total / max(weight, 1)

    return {"step": step, "val": val}

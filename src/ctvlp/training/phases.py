"""The ViSD-Boost training phases and the CLIP baseline, each a ``PhaseTask`` that ``run_phase``
trains (resumable, data-parallel under torchrun, metrics per step):

    visual_cl  phase 1: disease-level (or, for the ablation, instance-level) visual contrastive
               learning (Eq. 2) with a momentum encoder on a second, intensity-augmented view
    align      phase 2: anatomy-wise image-report alignment (Eq. 1, fVLM calibration)
    normality  phase 3: VQ-VAE on the frozen encoder's tokens of NORMAL anatomies (Eq. 3)
    boost      phase 4: Eq. 1 again on f_hat = MLP(f, q) with the VQ-VAE frozen
    global     baseline: CLIP-style whole volume vs whole report

Each phase starts from the previous phase's folder (``init``); which parameters train is
``trainable.PHASE_TRAINABLE``. ``run`` trains one phase into a folder.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import polars as pl
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from .. import config as cfgmod
from ..config import digest
from ..imaging.storage import paths_from
from ..model.config import ModelConfig
from ..model.io import WEIGHTS, build_model, save_model
from ..model.losses import (
    AlignmentLoss,
    AnatomyRows,
    DiseaseContrastLoss,
    InstanceContrastLoss,
    alignment_loss,
    calibrated_targets,
)
from ..workspace import read_parquet
from .acceleration import accelerate
from .data import CropDataset, TextBank, anatomy_texts, to_device
from .distributed import all_sum, dist_info, gather_batch, setup_distributed
from .loop import LoopSettings, PhaseTask, run_phase, seed_everything, validation_loader
from .trainable import make_momentum_copy, momentum_update, set_trainable

log = logging.getLogger(__name__)

PHASES = ("visual_cl", "align", "normality", "boost", "global")
SECTIONS = ("visual_cl", "normality", "boost")  # phases with their own train.<phase> settings
RUNTIME_KEYS = cfgmod.RUNTIME_KEYS["train"]  # settings that do not change the numbers


def phase_model_config(config: ModelConfig, phase: str) -> ModelConfig:
    """The model a phase builds: the VQ-VAE exists from phase 3 on, global heads only for the CLIP
    baseline (so earlier phases' weights hold only what they train)."""
    return config.replace(vq_codes=config.vq_codes if phase in ("normality", "boost") else 0,
                          global_head=phase == "global")


def phase_train_settings(cfg_train: dict, phase: str) -> dict:
    """The shared train settings with this phase's epochs (and lr, and phase 4's gradient) from its
    section (recorded in the phase's config.json)."""
    out = {k: v for k, v in cfg_train.items() if not isinstance(v, dict)}
    section = cfg_train.get(phase, {}) if phase in SECTIONS else {}
    out.update({k: v for k, v in section.items() if k in ("epochs", "lr", "gradient")})
    return out


def init_from(model, init_dir: str | Path) -> None:
    """Load a previous phase's weights; only modules that phase did not have may be missing."""
    state = load_file(str(Path(init_dir) / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    new = ("text_encoder.", "vqvae.", "perception.", "boost_on", "vis_global.", "txt_global.")
    missing = [k for k in missing if not k.startswith(new)]
    if missing or unexpected:
        raise ValueError(f"{init_dir}: weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    log.info("initialised from %s", init_dir)


def augment_view(image: torch.Tensor, gamma: float = 0.05, scale: float = 0.02, shift: float = 0.01,
                 noise: float = 0.01) -> torch.Tensor:
    """Second view for phase 1: per sample a random gamma exp(U(-gamma, gamma)), contrast
    U(1 - scale, 1 + scale), brightness U(-shift, shift) and Gaussian noise (SD ``noise``) on the
    same crop, so every anatomy stays complete in both views (intensities in [0, 1]: 0.01 = 20 HU
    of the default window). Drawn on the image's device (its RNG is checkpointed: resumable).

    The defaults (those of train.visual_cl.augment) stay within tens of HU. The earlier ranges,
    gamma 0.3, scale 0.1, shift 0.05 (+-100 HU), noise 0.02, were as large as emphysema's density
    change, which Eq. 2 then taught the encoder to ignore (benchmarks/results/alignment_levers_cpu.md:
    on 424 validation cases disease-level CL went from +0.002 to +0.029 mean AUC over fVLM)."""
    b, dev = image.shape[0], image.device
    shape = (b,) + (1,) * (image.dim() - 1)
    g = torch.exp(torch.empty(shape, device=dev).uniform_(-gamma, gamma))
    a = torch.empty(shape, device=dev).uniform_(1 - scale, 1 + scale)
    c = torch.empty(shape, device=dev).uniform_(-shift, shift)
    n = torch.randn(image.shape, device=dev, dtype=image.dtype) * noise
    return ((image.clamp(0, 1) ** g) * a + c + n).clamp(0, 1)


# ---- the phases --------------------------------------------------------------------------------


class _SavedPhase(PhaseTask):
    """A ctvlp phase: its result is the model folder (model.safetensors + config.json)."""

    def __init__(self, model, out_dir: Path, info: dict):
        super().__init__(model)
        self.out_dir, self.info = out_dir, info

    def final(self) -> dict:
        """What the phase adds to config.json at the end."""
        return {}

    def save(self, summary: dict) -> None:
        save_model(self.model, self.out_dir, {**self.info, **summary, **self.final()})


def batch_loss(model, bank: TextBank, batch: dict, device, loss: AlignmentLoss,
               gather: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 loss of a (loader) batch and its number of valid (sample, anatomy) pairs (a tensor: no
    device sync). gather: over the global batch of all processes (group ids agree across
    processes: they come from the whole split)."""
    on = to_device(batch, device)
    img, _ = model.encode_image(on["image"], on["anatomy"])
    txt = bank.embed(batch, on).to(img.dtype)
    t = {"img": img, "txt": txt, "valid": on["valid"], "normal": on["normal"], "group": on["group"]}
    if gather:
        t = gather_batch(t)
    value = loss(t["img"], t["txt"], AnatomyRows(t["valid"], t["normal"], t["group"]), model.logit_scale)
    return value, t["valid"].sum()


def _mean_over(loader, loss_of) -> float:
    """Pair-weighted mean of ``loss_of(batch) -> (loss, pairs)`` over this process's validation
    batches, summed over the processes; totals stay on the device until the end."""
    total = weight = 0.0
    for batch in loader:
        loss, pairs = loss_of(batch)
        total, weight = total + loss.detach().float() * pairs, weight + pairs
    total, weight = all_sum(total, weight)
    return total / max(weight, 1.0)


class AlignPhase(_SavedPhase):
    """Phases 2 and 4 (the model's boost flag, set by ``set_trainable``, makes the difference)."""

    def __init__(self, model, out_dir, info, *, name: str, device, texts, val_loader, calibrate: bool,
                 direction: str = "symmetric"):
        super().__init__(model, out_dir, info)
        self.name, self.device, self.val_loader = name, device, val_loader
        if model.txt_center is not None and not bool(model.txt_center.any()):
            model.set_text_center(texts[0].texts, texts[0].text_idx)  # training reports only; once (phase 2)
        self.train_bank, self.val_bank = TextBank(model, texts[0], device), TextBank(model, texts[1], device)
        self.loss = AlignmentLoss(calibrate, direction)
        # the perception module sits out a step whose crops hold no anatomy at all
        self.static_graph = self.train_bank.static and not model.boost

    def step(self, batch):
        loss, pairs = batch_loss(self.model, self.train_bank, batch, self.device, self.loss, gather=True)
        return loss, pairs, {}

    def train_mode(self):
        self.model.train()
        if self.model.vqvae is not None:
            self.model.vqvae.eval()  # frozen in phase 4

    def validate(self):
        return _mean_over(self.val_loader,
                          lambda b: batch_loss(self.model, self.val_bank, b, self.device, self.loss))


class VisualContrastPhase(_SavedPhase):
    """Phase 1: Eq. 2 (contrast "disease") or the instance-level baseline (contrast "instance")."""

    name = "visual_cl"

    def __init__(self, model, out_dir, info, *, device, val_loader, contrast: str, momentum: float,
                 temperature: float, augment: dict | None = None):
        super().__init__(model, out_dir, info)
        self.augment = dict(augment or {})  # augment_view's keyword ranges; absent ones take its defaults
        if contrast not in ("disease", "instance"):
            raise ValueError(f"contrast must be disease or instance, not {contrast!r}")
        self.device, self.val_loader, self.momentum = device, val_loader, momentum
        text_encoder, model.text_encoder = model.text_encoder, None  # the key encoder needs no text side
        self.key = make_momentum_copy(model)
        model.text_encoder = text_encoder
        self.scale = math.log(1.0 / temperature)
        self.loss = DiseaseContrastLoss() if contrast == "disease" else InstanceContrastLoss()
        self.online, self.target = self._vision_side(model), self._vision_side(self.key)
        self.extra_modules = {"momentum": self.target}

    @staticmethod
    def _vision_side(net):  # what Eq. 2 trains, and all the key encoder uses
        return torch.nn.ModuleDict({"vision": net.vision, "vis_pool": net.vis_pool, "vis_proj": net.vis_proj})

    static_graph = True

    def _loss(self, batch, gather: bool):
        on = to_device(batch, self.device)
        image, anatomy = on["image"], on["anatomy"]
        q, _ = self.model.encode_image(image, anatomy)
        with torch.no_grad():
            k, _ = self.key.encode_image(augment_view(image, **self.augment), anatomy)
        t = {"q": q, "k": k, "valid": on["valid"], "normal": on["normal"]}
        if gather:
            t = gather_batch(t)
        rows = AnatomyRows(t["valid"], t["normal"], torch.zeros_like(t["valid"], dtype=torch.long))
        return self.loss(t["q"], t["k"], rows, self.scale), t["valid"].sum()

    def step(self, batch):
        loss, pairs = self._loss(batch, True)
        return loss, pairs, {}

    def validate(self):
        return _mean_over(self.val_loader, lambda b: self._loss(b, False))

    def train_mode(self):
        self.model.train()
        self.key.eval()

    def after_step(self, step, total):
        momentum_update(self.online, self.target, self.momentum)


def sync_codebooks(vq, initialised_before: torch.Tensor | None, had_rows: bool = True) -> None:
    """Keep every process's VQ-VAE codebook identical after a training step. A codebook set up in
    this step comes from the lowest rank that set it up (each process initialises from its own
    batch; an average of unrelated codes would mean nothing), and so do the token statistics
    (set on a process's first call with rows); then the EMA state is averaged.
    ``initialised_before``: the flags before the step (None: all were set before)."""
    rank, world = dist_info()
    if initialised_before is not None:
        owner = torch.where(vq.initialised & ~initialised_before, rank, world).long()
        dist.all_reduce(owner, op=dist.ReduceOp.MIN)
        first = had_rows and not bool(initialised_before.any())
        stats_owner = torch.tensor([rank if first else world], device=owner.device)
        dist.all_reduce(stats_owner, op=dist.ReduceOp.MIN)
        stats_owner = int(stats_owner)
        for r in sorted(set(owner[owner < world].tolist()) | ({stats_owner} - {world})):
            for name in ("codebook", "ema_count", "ema_sum", "initialised", "token_mean", "token_scale"):
                buf = getattr(vq, name)
                theirs = buf.to(torch.uint8) if buf.dtype == torch.bool else buf.clone()  # gloo has no bool
                dist.broadcast(theirs, r)
                theirs = theirs.to(buf.dtype)
                if name in ("token_mean", "token_scale"):
                    if stats_owner == r:
                        buf.copy_(theirs)
                else:
                    buf.copy_(torch.where((owner == r).view(-1, *([1] * (buf.dim() - 1))), theirs, buf))
    for buf in (vq.codebook, vq.ema_count, vq.ema_sum):
        dist.all_reduce(buf)
        buf /= world


class NormalityPhase(_SavedPhase):
    """Phase 3: Eq. 3 on the frozen encoder's tokens of normal anatomies; reports codebook usage
    and reconstruction error on normal vs abnormal anatomies of the validation split."""

    name = "normality"
    metrics = ("recon", "commit", "perplexity", "dead_codes", "recon_normal", "recon_abnormal", "n_normal",
               "n_abnormal")

    def __init__(self, model, out_dir, info, *, device, val_loader):
        super().__init__(model, out_dir, info)
        self.device, self.val_loader, self.vq = device, val_loader, model.vqvae

    def _rows(self, batch, which):
        on = to_device(batch, self.device)
        with torch.no_grad():
            return self.model.anatomy_rows(on["image"], on["anatomy"], on["valid"] & which(on["normal"])), on

    def step(self, batch):
        vq = self.vq
        rows, _ = self._rows(batch, lambda normal: normal)
        fresh = None if dist_info()[1] == 1 or bool(vq.initialised.all()) else vq.initialised.clone()
        out = vq(rows.tokens, rows.pad, rows.anatomy)
        if dist_info()[1] > 1:
            sync_codebooks(vq, fresh, rows.tokens.shape[0] > 0)
        perplexity, dead = vq.usage_means()
        return out.loss, int(rows.tokens.shape[0]), {"recon": out.recon_loss.detach(),
                                                     "commit": out.commit_loss.detach(),
                                                     "perplexity": perplexity, "dead_codes": dead}

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean reconstruction error of the normal and of the abnormal validation rows."""
        sums = {True: 0.0, False: 0.0}
        counts = {True: 0.0, False: 0.0}
        for batch in self.val_loader:
            rows, on = self._rows(batch, lambda normal: torch.ones_like(normal))
            if not rows.tokens.shape[0]:
                continue
            err = self.vq(rows.tokens, rows.pad, rows.anatomy, update_codebook=False).row_error.float()
            is_normal = on["normal"][rows.batch, rows.anatomy]
            for flag in (True, False):
                pick = (is_normal == flag).float()
                sums[flag], counts[flag] = sums[flag] + (err * pick).sum(), counts[flag] + pick.sum()
        s_n, s_a, n_n, n_a = all_sum(sums[True], sums[False], counts[True], counts[False])

        def mean(total, n):
            return total / n if n else float("nan")

        return {"loss": mean(s_n, n_n), "recon_normal": mean(s_n, n_n), "recon_abnormal": mean(s_a, n_a),
                "n_normal": int(n_n), "n_abnormal": int(n_a)}

    def train_mode(self):
        self.model.eval()
        self.vq.train()

    def final(self) -> dict:
        errors = self.validate()
        stats = self.vq.codebook_stats()
        log.info("VQ-VAE: validation reconstruction error normal %.4f (n=%d) vs abnormal %.4f (n=%d); "
                 "mean perplexity %.1f, mean dead codes %.1f of %d", errors["recon_normal"], errors["n_normal"],
                 errors["recon_abnormal"], errors["n_abnormal"], stats["mean_perplexity"], stats["mean_dead_codes"],
                 self.vq.codebook.shape[1])
        usage = {k: v for k, v in stats.items() if k.startswith("mean") or k == "anatomies_seen"}
        return {"normality": {**errors, **usage}}


class GlobalPhase(_SavedPhase):
    """CLIP-style baseline: whole crop vs whole report, symmetric InfoNCE over the batch."""

    name = "global"

    def __init__(self, model, out_dir, info, *, device, reports, val_loader):
        super().__init__(model, out_dir, info)
        self.device, self.reports, self.val_loader = device, reports, val_loader

    static_graph = True

    def _loss(self, batch, split: int, gather: bool):
        img = self.model.encode_image_global(to_device(batch, self.device)["image"])
        txt = self.model.encode_report_global([self.reports[split][i] for i in batch["index"].numpy()])
        valid = torch.ones(img.shape[0], 1, dtype=torch.bool, device=self.device)
        t = {"img": img[:, None], "txt": txt[:, None], "valid": valid}
        if gather:
            t = gather_batch(t)
        pos = calibrated_targets(t["valid"], torch.zeros_like(t["valid"]), torch.zeros_like(t["valid"], dtype=torch.long),
                                 calibrate=False)
        return alignment_loss(t["img"], t["txt"], t["valid"], pos, self.model.logit_scale), t["valid"].sum()

    def step(self, batch):
        loss, n = self._loss(batch, 0, True)
        return loss, n, {}

    def validate(self):
        return _mean_over(self.val_loader, lambda b: self._loss(b, 1, False))


# ---- one phase into a folder ---------------------------------------------------------------------


def _split_dataset(cases: pl.DataFrame, reports: pl.DataFrame, split: str, cfg_train: dict, stride: int,
                   mode: str, seed: int):
    chosen = cases.filter(pl.col("split") == split)
    ids, paths = chosen["case_id"].to_list(), paths_from(chosen)
    texts = anatomy_texts(reports, ids, cfg_train["unmentioned_as_normal"])
    dataset = CropDataset([paths[c] for c in ids], texts, cfg_train["crop_size"], stride, cfg_train["flip"], seed,
                          mode)
    return dataset, texts, ids


def run(phase: str, cases, reports, out_dir, cfg_model: dict | ModelConfig, cfg_train: dict, seed: int,
        init: str | Path | None = None, contrast: str = "disease") -> dict:
    """Train one phase into ``out_dir`` (model.safetensors, config.json, metrics.csv) on ``cases``
    (qc/cases.parquet: the cases that go on, their splits and folders) and ``reports``."""
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
        base = cfg_model if isinstance(cfg_model, ModelConfig) else ModelConfig.from_settings(cfg_model)
        model_config, train_settings = phase_model_config(base, phase), phase_train_settings(cfg_train, phase)
        model = build_model(model_config)
        if init is not None:
            init_from(model, init)
        model = model.to(device)
        trainable = set_trainable(model, phase)
        case_table, report_table = read_parquet(cases), read_parquet(reports)
        stride = model.vision.stride
        train_ds, train_texts, train_ids = _split_dataset(case_table, report_table, "train", cfg_train, stride,
                                                          "random", seed)
        val_ds, val_texts, val_ids = _split_dataset(case_table, report_table, "val", cfg_train, stride, "center", seed)
        if len(train_ds) < 2:
            raise ValueError(f"training needs at least 2 training cases, found {len(train_ds)}")
        accelerated = accelerate(model, cfg_train, device)
        val_loader = validation_loader(val_ds, max(1, min(train_settings["batch_size"], len(train_ds)) // dist_info()[1]),
                                       cfg_train["workers"], device, seed)
        info = {"phase": phase, "init": str(init) if init else None,
                "contrast": contrast if phase == "visual_cl" else None, "train_cases": len(train_ds),
                "val_cases": len(val_ds), "device": str(device), "seed": seed, "trainable": trainable,
                "train": train_settings, "speed": accelerated}
        common = {"model": model, "out_dir": out_dir, "info": info}
        if phase in ("align", "boost"):
            task = AlignPhase(**common, name=phase, device=device, texts=(train_texts, val_texts),
                              val_loader=val_loader, calibrate=cfg_train["false_negative_calibration"],
                              direction=cfg_train["align_direction"])
            model.vq_gradient = phase == "boost" and cfg_train["boost"]["gradient"] == "straight_through"
        elif phase == "visual_cl":
            section = cfg_train["visual_cl"]
            task = VisualContrastPhase(**common, device=device, val_loader=val_loader, contrast=contrast,
                                       momentum=section["momentum"], temperature=section["temperature"],
                                       augment=section["augment"])
        elif phase == "normality":
            task = NormalityPhase(**common, device=device, val_loader=val_loader)
        else:
            report_of = dict(zip(case_table["case_id"], case_table["report_text"]))
            task = GlobalPhase(**common, device=device, val_loader=val_loader,
                               reports=([report_of[c] for c in train_ids], [report_of[c] for c in val_ids]))
        fingerprint = {"model": model_config.to_dict(), "cases": train_ids, "texts": digest(train_texts.texts),
                       "init": info["init"], "contrast": info["contrast"],
                       "train": {k: v for k, v in cfg_train.items() if k not in RUNTIME_KEYS and
                                 (not isinstance(v, dict) or k == phase)}}
        summary = run_phase(task, train_ds, LoopSettings.from_dict(train_settings), out_dir, seed=seed,
                            device=device, fingerprint=fingerprint)
        return {**info, **summary}
    finally:
        if own_group:
            dist.destroy_process_group()

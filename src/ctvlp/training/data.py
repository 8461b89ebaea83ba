"""Training data: preprocessed cases as random crops (paper: RandomCrop + RandomFlip) with the
complete-organ rule, and the per-anatomy texts and normal/abnormal status from the parsed reports."""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import polars as pl
import torch

from .. import catalog
from ..imaging.storage import CasePaths
from ..model.network import CTVLP
from ..model.vision import N_ANATOMIES
from ..workspace import read_parquet


class AnatomyTexts(NamedTuple):
    """What the reports say per (case, anatomy) of a split, as training uses it."""

    texts: list[str]  # the unique texts
    text_idx: np.ndarray  # (C, M) int: index into texts, -1 = no usable text (left out)
    normal: np.ndarray  # (C, M) bool
    groups: np.ndarray  # (C, M) int: fVLM's positive groups of abnormal rows (``finding_group``), -1 if none


def finding_group(text: str, findings) -> tuple:
    """The calibration group of an abnormal anatomy (fVLM): the set of catalog diseases its report
    states as present or uncertain; two abnormal rows of an anatomy with the same set are positives
    of each other, whatever their wording. Without a catalog finding (an abnormality the catalog does
    not name), only the same text makes rows positives."""
    diseases = frozenset(f["disease_id"] for f in findings or () if f["presence"] in ("present", "uncertain"))
    return ("diseases", tuple(sorted(diseases))) if diseases else ("text", text)


def anatomy_texts(reports: pl.DataFrame, case_ids: list[str], unmentioned_as_normal: bool) -> AnatomyTexts:
    """Per case and anatomy: text, normal flag, usability and calibration group, from the parsed
    reports. An anatomy the report does not mention is trained as normal ("The X is unremarkable.")
    when unmentioned_as_normal, otherwise left out; an unparsed anatomy is always left out."""
    order = {a.name: a.index - 1 for a in catalog.anatomies()}
    row_of = {c: i for i, c in enumerate(case_ids)}
    text_idx = np.full((len(case_ids), N_ANATOMIES), -1, dtype=np.int64)
    groups = np.full((len(case_ids), N_ANATOMIES), -1, dtype=np.int64)
    normal = np.zeros((len(case_ids), N_ANATOMIES), dtype=bool)
    vocab: dict[str, int] = {}
    group_ids: dict[tuple, int] = {}
    subset = reports.filter(pl.col("case_id").is_in(case_ids))
    findings = subset["findings"].to_list() if "findings" in subset.columns else [None] * len(subset)
    for (case_id, anatomy, text, status), found in zip(subset.select("case_id", "anatomy", "text", "status").iter_rows(),
                                                        findings):
        i, j = row_of[case_id], order[anatomy]
        if status == "not_mentioned" and unmentioned_as_normal:
            text, status = f"The {anatomy.replace('_', ' ')} is unremarkable.", "normal"
        if status not in ("normal", "abnormal") or not text:
            continue
        text_idx[i, j] = vocab.setdefault(text, len(vocab))
        normal[i, j] = status == "normal"
        key = ("normal",) if normal[i, j] else finding_group(text, found)
        groups[i, j] = group_ids.setdefault(key, len(group_ids))
    return AnatomyTexts(list(vocab), text_idx, normal, groups)


class CropDataset(torch.utils.data.Dataset):
    """Crops of preprocessed cases. ``mode`` "random" (training; paper: RandomCrop + RandomFlip):
    the crop start and the flip drawn from (seed, epoch, case); "center": the centred crop, no flip
    (validation: the same crops every epoch, one shape for every batch).

    An anatomy counts for a sample only if it is complete in the scan and every one of its voxels
    lies inside the crop, checked on its bounding box that preprocess stored (meta.json); outputs of
    an older ctvlp without boxes fall back to counting the anatomy's voxels in the crop.

    Items keep the stored float16 image and say whether to flip: ``to_device`` converts and flips on
    the device. A key is a case index, or (epoch, index): persistent loader workers hold their own
    copy of the dataset, so the epoch travels with the key (``set_epoch`` sets it for plain ints).
    """

    keyed_by_epoch = True  # run_phase passes (epoch, index) keys

    def __init__(self, paths: list[CasePaths], texts: AnatomyTexts, crop_size, stride: int, flip: bool, seed: int,
                 mode: str = "random"):
        if mode not in ("random", "center"):
            raise ValueError(f"crop mode must be random or center, not {mode!r}")
        self.paths, self.text_idx, self.normal, self.groups = paths, texts.text_idx, texts.normal, texts.groups
        self.crop, self.stride, self.flip, self.mode = tuple(crop_size), stride, flip and mode == "random", mode
        self.seed, self.epoch = seed, 0
        m = N_ANATOMIES
        self.complete = np.zeros((len(paths), m), dtype=bool)
        self.full_counts = np.zeros((len(paths), m), dtype=np.int64)
        self.boxes = np.full((len(paths), m, 6), -1, dtype=np.int64)  # x0, x1, y0, y1, z0, z1 inclusive
        self.has_boxes = np.zeros(len(paths), dtype=bool)
        for i, p in enumerate(paths):
            self.complete[i] = read_parquet(p.table).sort("index")["complete"].to_numpy()
            meta = json.loads(p.meta.read_text(encoding="utf-8"))
            counts, boxes = meta["anatomy_voxels"], meta.get("anatomy_bbox")
            self.has_boxes[i] = boxes is not None
            for a in catalog.anatomies():
                self.full_counts[i, a.index - 1] = counts.get(a.name, 0)
                if boxes and a.name in boxes:
                    self.boxes[i, a.index - 1] = boxes[a.name]

    def __len__(self):
        return len(self.paths)

    @property
    def case_ids(self) -> list[str]:
        return [p.case_id for p in self.paths]

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def window(self, i: int, shape, rng) -> list[tuple[int, int]]:
        """(start, stop) per axis of case i's crop (the whole axis where the volume is smaller)."""
        if self.mode == "random":
            starts = [int(rng.integers(0, max(s - c, 0) + 1)) for s, c in zip(shape, self.crop)]
        else:
            starts = [max(s - c, 0) // 2 for s, c in zip(shape, self.crop)]
        return [(st, min(st + c, s)) for st, c, s in zip(starts, self.crop, shape)]

    def inside(self, i: int, window, anat_crop: np.ndarray) -> np.ndarray:
        """(M,) bool: the anatomies of case i with every voxel inside the window."""
        if self.has_boxes[i]:
            box = self.boxes[i]
            ok = box[:, 0] >= 0
            for axis, (lo, hi) in enumerate(window):
                ok &= (box[:, 2 * axis] >= lo) & (box[:, 2 * axis + 1] < hi)
            return ok
        in_crop = np.bincount(anat_crop.ravel(), minlength=N_ANATOMIES + 1)[1:N_ANATOMIES + 1]
        return (in_crop == self.full_counts[i]) & (in_crop > 0)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        rng = np.random.default_rng((self.seed, epoch, i))
        img = np.load(self.paths[i].image, mmap_mode="r")
        anat = np.load(self.paths[i].anatomy, mmap_mode="r")
        window = self.window(i, img.shape, rng)
        sl = tuple(slice(lo, hi) for lo, hi in window)
        img_c, anat_c = img[sl], anat[sl]  # views of the memory-mapped files
        flip = self.flip and rng.random() < 0.5
        target = tuple(-(-max(t, s) // self.stride) * self.stride for t, s in zip(self.crop, img_c.shape))
        if target != img_c.shape:  # the read is the padding's copy
            pad = [(0, t - s) for t, s in zip(target, img_c.shape)]
            img_c, anat_c = np.pad(img_c, pad), np.pad(anat_c, pad)  # 0 = air after HU scaling
        else:  # the read: one copy, still float16
            img_c, anat_c = np.array(img_c), np.array(anat_c)
        valid = (self.text_idx[i] >= 0) & self.complete[i] & self.inside(i, window, anat_c)
        return {
            "image": torch.from_numpy(img_c)[None],
            "anatomy": torch.from_numpy(anat_c),
            "flip": flip,
            "valid": torch.from_numpy(valid),
            "normal": torch.from_numpy(self.normal[i].copy()),
            "text_idx": torch.from_numpy(self.text_idx[i].copy()),
            "group": torch.from_numpy(self.groups[i].copy()),
            "index": i,
        }


def to_device(batch: dict, device) -> dict:
    """A collated batch on ``device`` (non-blocking copies from the loader's pinned memory), the
    image as float32, and each sample flipped left-right there where its ``flip`` says so. Which
    samples flip is read from the loader's CPU tensor, so nothing waits on the device, and only
    those samples are touched (one conversion pass plus the flipped half, also cheap on the CPU)."""
    flips = batch.get("flip")
    chosen = torch.from_numpy(np.flatnonzero(flips.cpu().numpy())) if torch.is_tensor(flips) else None
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "image" in out:
        image, anatomy = out["image"], out["anatomy"]
        flip_any = chosen is not None and len(chosen) > 0
        # a fresh float32 tensor either way, so flipping in place never touches the caller's batch
        image = image.float() if image.dtype != torch.float32 else (image.clone() if flip_any else image)
        if flip_any:
            rows = chosen.to(device, non_blocking=True)
            image[rows] = image[rows].flip(2)
            anatomy = anatomy.clone() if anatomy is batch["anatomy"] else anatomy
            anatomy[rows] = anatomy[rows].flip(1)
        out["image"], out["anatomy"] = image, anatomy
    return out


class TextBank:
    """The text side of Eq. 1 for every (sample, anatomy) row of a batch, cached as far as the
    model's trainable parts allow:

    - "final": text encoder and text head frozen: the embedding of every (text, anatomy) pair of
      the split is computed once; a batch only indexes it, on the device.
    - "hidden": text encoder frozen, head trained: the encoder's token features are computed once
      and kept in bf16, each text trimmed to its own length, on the CPU (or, up to ``device_bytes``,
      padded on the device). Every row with a text is pooled and projected (rows that are not
      valid get weight 0), so the head's graph is the same every step.
    - "live": the text encoder trains: the valid rows' texts are encoded every step.

    ``embed(batch, on_device)`` -> (B, M, D), zero on rows that are not valid; no device sync.
    """

    def __init__(self, model: CTVLP, texts: AnatomyTexts, device, batch: int = 64, device_bytes: int = 1 << 29):
        self.model, self.texts, self.device = model, texts.texts, torch.device(device)
        head_trains = any(p.requires_grad for m in (model.txt_pool, model.txt_proj) for p in m.parameters())
        self.mode = "live" if model.train_text_encoder else "hidden" if head_trains else "final"
        if self.mode == "live" or not self.texts:
            return
        if self.mode == "final":
            self._embed_pairs(texts, batch)
            return
        hidden, lengths = [], []
        for h, mask in self._encoded(batch):  # kept in bf16, each text at its own length
            n = mask.sum(1).cpu()
            hidden += [h[k, :n[k]].to(torch.bfloat16).cpu() for k in range(len(n))]
            lengths += n.tolist()
        self.lengths = np.asarray(lengths)
        width, dim = int(self.lengths.max()), hidden[0].shape[-1]
        if len(self.texts) * width * dim * 2 <= device_bytes:
            self.store = torch.zeros(len(self.texts), width, dim, dtype=torch.bfloat16)
            for k, h in enumerate(hidden):
                self.store[k, :len(h)] = h
            self.store = self.store.to(self.device)
        else:
            self.store = None
            self.flat = torch.cat(hidden)
            self.start = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])

    def _encoded(self, batch: int):
        """The frozen encoder's token features and mask of the texts, ``batch`` texts at a time."""
        with torch.no_grad():
            for s in range(0, len(self.texts), batch):
                tok = self.model.tokenize(self.texts[s:s + batch])
                ids, att = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
                yield self.model.text_tokens(ids, att), att

    def _embed_pairs(self, texts: AnatomyTexts, batch: int) -> None:
        """The final embedding of every (text, anatomy) pair of the split, in fp32, ``row`` (texts,
        M) pointing into ``table`` (pairs, D)."""
        tidx = texts.text_idx
        pairs = np.unique(np.stack([tidx.ravel(), np.indices(tidx.shape)[1].ravel()], 1)[tidx.ravel() >= 0], axis=0)
        row = np.full((len(self.texts), N_ANATOMIES), -1, dtype=np.int64)
        row[pairs[:, 0], pairs[:, 1]] = np.arange(len(pairs))
        self.row = torch.from_numpy(row).to(self.device)
        self.table = torch.zeros(len(pairs), self.model.txt_proj.weight.shape[-1], device=self.device)
        with torch.no_grad():
            for s, (hidden, mask) in zip(range(0, len(self.texts), batch), self._encoded(batch)):
                mine = pairs[(pairs[:, 0] >= s) & (pairs[:, 0] < s + batch)]
                if len(mine):
                    local = torch.from_numpy(mine[:, 0] - s).to(self.device)
                    self.table[torch.from_numpy(row[mine[:, 0], mine[:, 1]]).to(self.device)] = \
                        self.model.encode_text_tokens(hidden[local], mask[local],
                                                      torch.from_numpy(mine[:, 1]).to(self.device))

    @property
    def static(self) -> bool:
        """Whether every step uses the same parameters (DDP then needs no unused-parameter search)."""
        return self.mode != "live"

    def _gather(self, ids: np.ndarray):
        """Token features (n, L, H) float32 and mask (n, L) on the device of texts ``ids``."""
        width = int(self.lengths[ids].max())
        mask = torch.from_numpy(np.arange(width) < self.lengths[ids][:, None])
        if self.store is not None:
            hidden = self.store[torch.from_numpy(ids).to(self.device, non_blocking=True), :width]
        else:
            pos = np.minimum(np.arange(width), self.lengths[ids][:, None] - 1) + self.start[ids][:, None]
            hidden = self.flat[torch.from_numpy(pos)]
            if self.device.type == "cuda":
                hidden = hidden.pin_memory()
            hidden = hidden.to(self.device, non_blocking=True)
        return hidden.float(), mask.to(self.device, non_blocking=True)

    def embed(self, batch: dict, on_device: dict) -> torch.Tensor:
        """batch: the loader's batch (CPU); on_device: the same on the device (``to_device``)."""
        tidx, valid = on_device["text_idx"], on_device["valid"]
        shape = (*tidx.shape, self.model.txt_proj.weight.shape[-1])
        if not self.texts:
            return torch.zeros(shape, device=self.device)
        if self.mode == "final":
            rows = self.row[tidx.clamp_min(0), torch.arange(shape[1], device=self.device)]
            return self.table[rows.clamp_min(0)] * valid.unsqueeze(-1)
        cpu_idx, cpu_valid = batch["text_idx"].numpy(), batch["valid"].numpy()
        b, j = np.nonzero(cpu_valid if self.mode == "live" else cpu_idx >= 0)
        dummy = len(b) == 0  # no row with a text: one row of text 0 keeps the head in the graph
        if dummy:
            b, j = np.zeros(1, int), np.zeros(1, int)
        ids = np.maximum(cpu_idx[b, j], 0)
        anatomy = torch.from_numpy(j).to(self.device, non_blocking=True)
        if self.mode == "live":
            emb = self.model.encode_texts([self.texts[k] for k in ids.tolist()], anatomy)
        else:
            emb = self.model.encode_text_tokens(*self._gather(ids), anatomy)
        out = torch.zeros(shape, dtype=emb.dtype, device=self.device)
        out = out.index_put((torch.from_numpy(b).to(self.device, non_blocking=True), anatomy), emb)
        return out * (torch.zeros_like(valid) if dummy else valid).unsqueeze(-1)

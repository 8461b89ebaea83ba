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
    """Random crops (paper: RandomCrop + RandomFlip). An anatomy counts for a sample only if it is
    complete in the scan and every one of its voxels lies inside the crop."""

    def __init__(self, paths: list[CasePaths], texts: AnatomyTexts, crop_size, stride: int, flip: bool, seed: int,
                 random_crop: bool = True):
        self.paths, self.text_idx, self.normal, self.groups = paths, texts.text_idx, texts.normal, texts.groups
        self.crop, self.stride, self.flip, self.random_crop = tuple(crop_size), stride, flip, random_crop
        self.seed, self.epoch = seed, 0
        self.complete = np.zeros((len(paths), N_ANATOMIES), dtype=bool)
        self.full_counts = np.zeros((len(paths), N_ANATOMIES), dtype=np.int64)
        for i, p in enumerate(paths):
            tab = pl.read_parquet(p.table).sort("index")
            self.complete[i] = tab["complete"].to_numpy()
            counts = json.loads(p.meta.read_text(encoding="utf-8"))["anatomy_voxels"]
            for a in catalog.anatomies():
                self.full_counts[i, a.index - 1] = counts.get(a.name, 0)

    def __len__(self):
        return len(self.paths)

    @property
    def case_ids(self) -> list[str]:
        return [p.case_id for p in self.paths]

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __getitem__(self, i: int):
        rng = np.random.default_rng((self.seed, self.epoch, i))
        img = np.load(self.paths[i].image, mmap_mode="r")
        anat = np.load(self.paths[i].anatomy, mmap_mode="r")
        if self.random_crop:
            starts = [int(rng.integers(0, max(s - c, 0) + 1)) for s, c in zip(img.shape, self.crop)]
            sl = tuple(slice(st, st + c) for st, c in zip(starts, self.crop))
        else:
            sl = (slice(None),) * 3
        img_c = np.asarray(img[sl], dtype=np.float32)
        anat_c = np.asarray(anat[sl])
        if self.flip and rng.random() < 0.5:
            img_c, anat_c = img_c[::-1], anat_c[::-1]
        target = tuple(self.crop) if self.random_crop else img_c.shape
        target = tuple(-(-max(t, s) // self.stride) * self.stride for t, s in zip(target, img_c.shape))
        pad = [(0, t - s) for t, s in zip(target, img_c.shape)]
        img_c = np.pad(img_c, pad)  # 0 = air after HU scaling
        anat_c = np.pad(anat_c, pad)
        in_crop = np.bincount(anat_c.ravel(), minlength=N_ANATOMIES + 1)[1:]
        valid = (self.text_idx[i] >= 0) & self.complete[i] & (in_crop == self.full_counts[i]) & (in_crop > 0)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img_c))[None],
            "anatomy": torch.from_numpy(np.ascontiguousarray(anat_c)),
            "valid": torch.from_numpy(valid),
            "normal": torch.from_numpy(self.normal[i].copy()),
            "text_idx": torch.from_numpy(self.text_idx[i].copy()),
            "group": torch.from_numpy(self.groups[i].copy()),
            "index": i,
        }


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

"""The contrastive losses, all per anatomy over the batch and behind one interface:
``loss(a, b, rows, logit_scale)`` with ``a``, ``b`` (B, M, D) normalised embeddings and ``rows``
(``AnatomyRows``: which (sample, anatomy) rows are valid, normal, and their text group).

- ``AlignmentLoss``: Eq. 1, image vs text, with fVLM's false-negative calibration; image-to-text
  as the paper writes it, or symmetric (image-to-text and text-to-image averaged, CLIP's form).
- ``DiseaseContrastLoss``: Eq. 2, a view vs the momentum encoder's second view; normal rows of an
  anatomy are positives of each other.
- ``InstanceContrastLoss``: the ablation's instance-level contrast (each row's only positive is
  its own second view).

The functions below the classes hold the arithmetic (tests check them against hand-computed
values).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class AnatomyRows(NamedTuple):
    """What the losses need to know about each (sample, anatomy) row besides its embeddings."""

    valid: torch.Tensor  # (B, M) bool: the anatomy is complete in the crop and has a text
    normal: torch.Tensor  # (B, M) bool: the report calls it normal
    groups: torch.Tensor  # (B, M) long: abnormal rows with the same group id state the same findings


DIRECTIONS = ("symmetric", "i2t")


class AlignmentLoss(nn.Module):
    """Eq. 1 (image ``a`` vs text ``b``) with fVLM's false-negative calibration when ``calibrate``;
    ``direction`` (``train.align_direction``): "i2t" as the paper's Eq. 1, "symmetric" averages it
    with text-to-image."""

    def __init__(self, calibrate: bool = True, direction: str = "symmetric"):
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(f"Eq. 1 direction must be one of {DIRECTIONS}, not {direction!r}")
        self.calibrate, self.direction = calibrate, direction

    def forward(self, a, b, rows: AnatomyRows, logit_scale) -> torch.Tensor:
        positives = calibrated_targets(rows.valid, rows.normal, rows.groups, self.calibrate)
        return alignment_loss(a, b, rows.valid, positives, logit_scale, self.direction)


class DiseaseContrastLoss(nn.Module):
    """Eq. 2: view ``a`` (online encoder) vs view ``b`` (momentum encoder)."""

    def forward(self, a, b, rows: AnatomyRows, logit_scale) -> torch.Tensor:
        return disease_contrastive_loss(a, b, rows.valid, rows.normal, logit_scale)


class InstanceContrastLoss(nn.Module):
    """The ablation's instance-level visual contrast: every row's only positive is its second view."""

    def forward(self, a, b, rows: AnatomyRows, logit_scale) -> torch.Tensor:
        return instance_contrastive_loss(a, b, rows.valid, logit_scale)


def calibrated_targets(valid: torch.Tensor, normal: torch.Tensor, groups: torch.Tensor,
                       calibrate: bool = True) -> torch.Tensor:
    """fVLM false-negative calibration. valid, normal (B, M) bool; groups (B, M) int: abnormal rows
    of an anatomy with the same group state the same findings (``training.data.finding_group``: the
    same set of catalog diseases, or the same text when they name none).

    Returns (M, B, B) positive-pair indicators: the pair itself, and with calibration also every
    normal-normal pair and every abnormal-abnormal pair of the same group, of the same anatomy,
    both valid.
    """
    b = valid.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=valid.device).unsqueeze(0)
    v, nrm, grp = valid.T, normal.T, groups.T  # (M, B)
    pos = eye.expand(v.shape[0], -1, -1).clone()
    if calibrate:
        pos |= nrm.unsqueeze(2) & nrm.unsqueeze(1)
        abnormal = ~nrm
        pos |= (grp.unsqueeze(2) == grp.unsqueeze(1)) & abnormal.unsqueeze(2) & abnormal.unsqueeze(1)
    return pos & v.unsqueeze(2) & v.unsqueeze(1)


def alignment_loss(img: torch.Tensor, txt: torch.Tensor, valid: torch.Tensor, positives: torch.Tensor,
                   logit_scale: torch.Tensor, direction: str = "symmetric") -> torch.Tensor:
    """Eq. 1 per anatomy over the batch: "i2t" each image row's softmax over the texts of its
    anatomy (the paper's Eq. 1), "symmetric" the mean of that and text->image (CLIP's form).

    img, txt (B, M, D) normalised; valid (B, M); positives (M, B, B) from calibrated_targets.
    Targets spread evenly over each row's positives (soft CLIP targets). Anatomies with fewer than
    two valid samples in the batch give no contrast and are skipped. Returns the mean over valid
    (sample, anatomy) rows, as Eq. 1's 1/(B*M) sum (0, still attached to the graph, without any).
    Masks only, no boolean indexing: the value never needs the host (no device sync).
    """
    counted, pair_ok = _contrast_masks(valid)
    logits = logit_scale.exp() * torch.einsum("bmd,cmd->mbc", img, txt)  # (M, B, B)
    logits = logits.masked_fill(~pair_ok, float("-inf"))
    pos = (positives & pair_ok).to(logits.dtype)

    def directional(lg, tg):
        logp = torch.log_softmax(lg, dim=-1).masked_fill(~pair_ok, 0.0)
        tg = tg / tg.sum(-1, keepdim=True).clamp_min(1.0)
        return -(tg * logp).sum(-1)

    if direction == "i2t":
        return _row_mean(directional(logits, pos), counted)
    if direction != "symmetric":
        raise ValueError(f"Eq. 1 direction must be one of {DIRECTIONS}, not {direction!r}")
    per_row = directional(logits, pos) + directional(logits.transpose(1, 2), pos.transpose(1, 2))
    return 0.5 * _row_mean(per_row, counted)


def _contrast_masks(valid: torch.Tensor):
    """From valid (B, M): counted (M, B), the valid rows of anatomies with at least two valid
    samples; pair_ok (M, B, B), the pairs a row's softmax runs over (both valid), plus the
    diagonal of every row, so that no softmax row is all -inf (those rows are not counted)."""
    v = valid.T.bool()
    counted = v & (v.sum(1, keepdim=True) >= 2)
    eye = torch.eye(v.shape[1], dtype=torch.bool, device=v.device)
    return counted, (v.unsqueeze(2) & v.unsqueeze(1)) | eye


def _row_mean(per_row: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Mean of per_row (M, B) over the counted rows; 0 (attached) when there are none."""
    w = counted.to(per_row.dtype)
    return (per_row * w).sum() / w.sum().clamp_min(1.0)


def _view_contrast(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, positives: torch.Tensor,
                   logit_scale) -> torch.Tensor:
    """Sum over each row's positives of -log softmax, per anatomy over the batch.

    q, k (B, M, D); valid (B, M); positives (M, B, B), positives[j, i, p]: k_pj is a positive of q_ij.
    Row i sees the keys of the valid samples of its anatomy. Anatomies with fewer than two valid
    samples are skipped. Returns the sum over the rows of the other anatomies divided by their count
    (masks only, no device sync).
    """
    scale = torch.as_tensor(logit_scale, dtype=q.dtype, device=q.device).exp()
    counted, pair_ok = _contrast_masks(valid)
    logits = scale * torch.einsum("bmd,cmd->mbc", q, k)  # (M, B, B)
    logits = logits.masked_fill(~pair_ok, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1).masked_fill(~(positives & pair_ok), 0.0)
    return _row_mean(-logp.sum(-1), counted)


def disease_contrastive_loss(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, normal: torch.Tensor,
                             logit_scale) -> torch.Tensor:
    """Eq. 2: disease-level visual contrastive loss.

    q (B, M, D) normalised online embeddings of view 1; k (B, M, D) normalised momentum-encoder
    embeddings of view 2; valid, normal (B, M) bool; logit_scale = log(1 / tau), a tensor or float
    (the same convention as alignment_loss: pass model.logit_scale or log(1/0.07)).
    Per anatomy j over the batch: an abnormal row's only positive is its own second view; a normal
    row's positives are the second views of every valid normal sample of that anatomy (itself
    included), and, exactly as Eq. 2, its loss is the SUM of -log p over those positives. The total
    is divided by the number of valid rows in anatomies with at least two valid samples (Eq. 2's
    1/(B*M) over the rows that exist); the other anatomies give no contrast and are skipped.
    """
    b = valid.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=valid.device).unsqueeze(0)
    nrm = normal.T.bool()  # (M, B)
    positives = eye | (nrm.unsqueeze(2) & nrm.unsqueeze(1))
    return _view_contrast(q, k, valid.bool(), positives, logit_scale)


def instance_contrastive_loss(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, logit_scale) -> torch.Tensor:
    """Ablation baseline, instance-level visual CL (MoCo-style, no queue): every row's only positive
    is its own second view. Equals disease_contrastive_loss with no normal samples."""
    return disease_contrastive_loss(q, k, valid, torch.zeros_like(valid, dtype=torch.bool), logit_scale)

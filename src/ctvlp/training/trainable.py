"""Which parameters train in which phase, and the momentum (key) encoder of phase 1."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..model.network import CTVLP


def make_momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy to serve as momentum (key) encoder: same weights, requires_grad False."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """target = m * target + (1 - m) * online for every parameter; buffers copied from online."""
    for p_t, p_o in zip(target.parameters(), online.parameters(), strict=True):
        p_t.mul_(m).add_(p_o.detach(), alpha=1.0 - m)
    for b_t, b_o in zip(target.buffers(), online.buffers(), strict=True):
        b_t.copy_(b_o)


# Top-level parameter groups (attribute names of CTVLP) trained in each phase; a group of
# CONDITIONAL_GROUPS trains only where the model's flag is set. Everything else is frozen.
PHASE_TRAINABLE = {
    "visual_cl": ("vision", "vis_pool", "vis_proj"),  # phase 1, Eq. 2; text side frozen
    "align": ("vision", "vis_pool", "vis_proj", "txt_pool", "txt_proj", "text_encoder", "logit_scale"),  # 2, Eq. 1
    "normality": ("vqvae",),  # phase 3, Eq. 3; vision encoder frozen
    "boost": ("vision", "vis_pool", "vis_proj", "txt_pool", "txt_proj", "text_encoder", "logit_scale",
              "perception"),  # phase 4, Eq. 1 on f_hat; VQ-VAE frozen
    "global": ("vision", "vis_global", "txt_global", "text_encoder", "logit_scale"),  # CLIP baseline
}

CONDITIONAL_GROUPS = {"txt_pool": "train_text_head", "txt_proj": "train_text_head",
                      "text_encoder": "train_text_encoder"}


def set_trainable(model: CTVLP, phase: str) -> list[str]:
    """Freeze everything, then unfreeze the groups of PHASE_TRAINABLE[phase]; also switches
    model.boost on for "boost" and off otherwise. Returns the trainable parameter names.

    Frozen modules keep their train/eval mode: e.g. in "normality" compute the tokens under
    torch.no_grad() with model.vision.eval().
    """
    if phase not in PHASE_TRAINABLE:
        raise ValueError(f"unknown phase {phase!r}; one of {sorted(PHASE_TRAINABLE)}")
    groups = [g for g in PHASE_TRAINABLE[phase] if g not in CONDITIONAL_GROUPS
              or getattr(model, CONDITIONAL_GROUPS[g])]
    missing = [g for g in groups if getattr(model, g, None) is None]
    if missing:
        raise ValueError(f"phase {phase!r} needs {missing}: build the model with vq_codes > 0 / global_head=True")
    model.requires_grad_(False)
    for g in groups:
        getattr(model, g).requires_grad_(True)
    if model.vqvae is not None:
        model.boost = phase == "boost"
    return [n for n, p in model.named_parameters() if p.requires_grad]

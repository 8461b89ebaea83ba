"""How the model runs fast on a GPU, set per training job from the ``train`` section (none of it
changes what is computed beyond float rounding, so none of it blocks a resume):

- ``channels_last`` (auto: on CUDA): the vision trunk in channels_last_3d with the 8-channel
  stem (``VisionEncoder.gpu_layout``), and ``cudnn.benchmark``: every training batch has the crop
  shape and validation uses centre crops, so cuDNN picks its convolution algorithms once.
- ``compile`` (default off): ``torch.compile`` of the vision trunk (fixed shapes).

Issue 14's H200 measurement: the encoder alone ran 23.9 samples/s in NCDHW and 40.5 with
channels_last_3d + cudnn.benchmark. benchmarks/gpu_step.py measures each setting on a GPU.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def accelerate(model, cfg_train: dict, device: torch.device) -> dict:
    """Apply the ``train`` section's speed settings to ``model`` on ``device``; returns what was
    applied (recorded in the phase's config.json)."""
    layout = cfg_train.get("channels_last", "auto")
    channels_last = device.type == "cuda" if layout == "auto" else bool(layout)
    if channels_last:
        model.vision.gpu_layout(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    compiled = bool(cfg_train.get("compile", False))
    if compiled:
        model.vision.compile(dynamic=False)
    applied = {"channels_last": channels_last, "cudnn_benchmark": device.type == "cuda", "compile": compiled}
    log.info("speed settings: %s", applied)
    return applied

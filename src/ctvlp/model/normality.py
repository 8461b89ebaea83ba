"""Phases 3 and 4 of ViSD-Boost: anatomy token rows, the per-anatomy VQ-VAE that models normal
anatomies in token space (Eq. 3, Sec. 3.3.1), and the perception module that contrasts a token
with its normal reconstruction (Sec. 3.3.2)."""

from __future__ import annotations

from itertools import accumulate, groupby
from typing import NamedTuple

import torch
from torch import nn

from .attention import fixed_backends
from .vision import N_ANATOMIES, heads_for


class TokenRows(NamedTuple):
    """Tokens of every (sample, anatomy) row, padded: the unit of the VQ-VAE and boosted pooling."""
    tokens: torch.Tensor   # (R, L, C), zeros on pads
    pad: torch.Tensor      # (R, L) bool, True = real token
    batch: torch.Tensor    # (R,) sample index b
    anatomy: torch.Tensor  # (R,) anatomy index j (0..M-1)
    index: torch.Tensor    # (R, L) token index n into N (0 on pads)
    lengths: list[int] | None = None  # host copy of the real-token count of each row


def anatomy_token_rows(tokens: torch.Tensor, allowed: torch.Tensor,
                       rows_mask: torch.Tensor | None = None) -> TokenRows:
    """tokens (B, N, C); allowed (B, M, N) bool; rows_mask (B, M) bool or None -> TokenRows.

    One row per (b, j) with any allowed token (and rows_mask True), ordered by b then j; a row's
    tokens keep their order in N; L = the largest token count of any row. Host syncs: two (the
    nonzero of the rows, a .tolist() of their lengths).
    """
    has = allowed.any(-1)
    if rows_mask is not None:
        has = has & rows_mask.bool()
    bi, ji = has.nonzero(as_tuple=True)
    sel = allowed[bi, ji]  # (R, N)
    counts = sel.sum(-1)
    lengths = counts.tolist()
    n_len = max(lengths, default=0)
    order = torch.argsort((~sel).to(torch.uint8), dim=-1, stable=True)[:, :n_len]  # allowed first, in order
    pad = torch.arange(n_len, device=tokens.device) < counts.unsqueeze(1)
    order = order.masked_fill(~pad, 0)
    rows = tokens[bi.unsqueeze(1), order] * pad.unsqueeze(-1).to(tokens.dtype)
    return TokenRows(rows, pad, bi, ji, order, lengths)


class VQOutput(NamedTuple):
    recon: torch.Tensor        # (R, L, C) phi_D(e), the reconstruction of the input tokens; 0 on pads
    loss: torch.Tensor         # recon_loss + beta * commit_loss (Eq. 3)
    recon_loss: torch.Tensor   # mean over real tokens and channels of (f - recon)^2
    commit_loss: torch.Tensor  # mean over real tokens and code channels of (phi_E(f) - sg[e])^2
    codes: torch.Tensor        # (R, L) long code index within the row's anatomy codebook, -1 on pads
    row_error: torch.Tensor    # (R,) mean squared reconstruction error over each row's real tokens


class RowBucket(NamedTuple):
    """The rows of one length bucket: the transformers run on (Rb, Lb) instead of (R, L)."""
    idx: torch.Tensor   # (Rb,) index of each row in the call
    cols: torch.Tensor  # (Rb, Lb) the token column of each slot: the row's real tokens first, in order
    pad: torch.Tensor   # (Rb, Lb) True = real token


class RowBuckets(NamedTuple):
    groups: list[RowBucket]
    n_real: int                     # T, the real tokens of the call
    pad_fraction: float             # 1 - T / sum_b Rb Lb: padding share of the transformers' token slots
    pad_fraction_unbucketed: float  # 1 - T / (R L): the same with every row padded to L
    extra: list[int]                # the host copy of NormalityVQVAE.buckets(extra=...)


def padded_length(n: int) -> int:
    """The smallest bucket length >= n of 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, ... (2^k; 3 * 2^k from 24 on)."""
    p = 1 << max(n - 1, 0).bit_length()
    return 3 * p // 4 if p >= 32 and 3 * p // 4 >= n else p


def plan_buckets(lengths: list[int], width: int, max_buckets: int) -> list[tuple[int, int]]:
    """Row lengths, longest first -> [(rows, padded length)] per bucket, longest first.

    Rows of one padded_length (capped at width) form a group; more groups than max_buckets are
    merged, adjacent ones only, into the max_buckets buckets with the fewest token slots (exact DP).
    """
    groups = [(s, len(list(g))) for s, g in groupby(min(padded_length(n), width) for n in lengths)]
    m, cum = len(groups), list(accumulate((c for _, c in groups), initial=0))
    # best[b][i]: (fewest slots, end of the first bucket) for groups i.. in at most b buckets
    best = [[(float("inf"), m)] * m + [(0, m)]]
    for b in range(min(max_buckets, m)):
        best.append([min(((cum[j] - cum[i]) * groups[i][0] + best[b][j][0], j) for j in range(i + 1, m + 1))
                     for i in range(m)] + [(0, m)])
    plan, i, b = [], 0, len(best) - 1
    while i < m:
        j = best[b][i][1]
        plan.append((cum[j] - cum[i], groups[i][0]))
        i, b = j, b - 1
    return plan


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
        with fixed_backends():
            return self.out(self.body(h, src_key_padding_mask=ignore)[:, 1:])


def _sq_dist(z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Exact squared distances (difference form: no cancellation, no TF32, bit-identical per pair whatever the batch)."""
    return torch.cdist(z, codes, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


class NormalityVQVAE(nn.Module):
    """Per-anatomy VQ-VAE on anatomy token rows, in the vision feature space (Eq. 3).

    Token encoder phi_E and decoder phi_D: transformers, each with its own learnable condition
    token per anatomy prepended; no positional encoding (a row is the set of the anatomy's tokens).
    Every real token's latent is quantised to the nearest code of its anatomy's codebook
    (buffer codebook (M, K, code_dim); paper 36 x 100 x 1024), straight-through to the decoder.
    The codebook gets no gradient: in training mode it follows an EMA of the latents assigned to
    each code (van den Oord et al. 2017, App. A.1; decay, Laplace-smoothed cluster sizes with eps),
    only for the anatomies present in the call (callers pass normal rows only). Dead codes are not
    restarted. `usage` counts code assignments in training calls (reset_usage()).

    Quantisation runs in fp32 with autocast off (the transformers run under the caller's autocast):
    exact difference-form distances to the fp32 codebook (no cancellation, no TF32, the same bits
    whatever the batch), argmin ties to the lowest code index, straight-through and commitment in
    fp32, EMA counts as integers and sums accumulated in fp64, EMA state and codebook fp32.

    data_init (default): on the first training call, buffers token_mean (C,) and token_scale ()
    become the mean and the RMS deviation (one scalar) of its real tokens; phi_E sees
    (f - token_mean) / token_scale and recon = phi_D(e) * token_scale + token_mean, so losses stay in
    feature units (without it a large common offset of the features collapsed every anatomy onto one
    code early on). An anatomy's codebook starts on its first training call from that call's latents
    of the anatomy, in call order: k-means++ seeding (D^2 sampling by inverse CDF) with a CPU
    torch.Generator seeded by init_seed * 1000 + j, not the global RNG, then init_iters Lloyd
    iterations if there are more than K distinct latents. With n < K distinct latents those n are
    codes and the other K - n seeded picks of them plus Gaussian noise of 0.1 x the latents' spread:
    no two codes are equal, so argmin never meets an exact tie between codes (such fill codes that
    win tokens are pulled onto the data by the EMA; waiting for K latents would need state outside
    the state dict and unquantised steps). Without data_init: codes N(0, 1), no standardisation.
    State dicts saved without token_mean / token_scale load as the identity (0, 1).

    Bucketing (bucket, default True): rows are sorted by real-token count and split into at most
    max_buckets buckets padded to a length from padded_length(); the transformers run per bucket on
    the trimmed rows, quantisation is per token, and one EMA update covers all real latents of the
    call, so results equal bucket=False (all rows padded to L) up to float rounding; recon is 0 and
    codes -1 on pads. last_pad_fraction / last_pad_fraction_unbucketed: RowBuckets.pad_fraction*
    of the last call. One host sync per call (buckets(): a .tolist() of the row lengths, with the
    initialisation flags in training), plus a few in a call that initialises codebooks.
    """

    def __init__(self, channels: int, n_anatomies: int = N_ANATOMIES, codes: int = 100, code_dim: int = 1024,
                 width: int | None = None, depth: int = 2, heads: int = 4, beta: float = 0.25,
                 decay: float = 0.99, eps: float = 1e-5, data_init: bool = True, init_seed: int = 0):
        super().__init__()
        width = width or code_dim
        self.encoder = _TokenTransformer(channels, width, code_dim, n_anatomies, depth, heads)
        self.decoder = _TokenTransformer(code_dim, width, channels, n_anatomies, depth, heads)
        self.beta, self.decay, self.eps = beta, decay, eps
        self.init_seed, self.init_iters, self.bucket, self.max_buckets = init_seed, 10, True, 4
        self.last_pad_fraction = self.last_pad_fraction_unbucketed = 0.0
        codebook = torch.randn(n_anatomies, codes, code_dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("ema_count", torch.ones(n_anatomies, codes))
        self.register_buffer("ema_sum", codebook.clone())
        self.register_buffer("initialised", torch.full((n_anatomies,), not data_init))
        self.register_buffer("usage", torch.zeros(n_anatomies, codes))
        self.register_buffer("token_mean", torch.zeros(channels))
        self.register_buffer("token_scale", torch.ones(()))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "token_mean", torch.zeros_like(self.token_mean))
        state_dict.setdefault(prefix + "token_scale", torch.ones_like(self.token_scale))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def buckets(self, pad: torch.Tensor, extra: torch.Tensor | None = None,
                lengths: list[int] | None = None) -> RowBuckets:
        """pad (R, L) -> RowBuckets; bucket False: one bucket of all rows in order, L wide.

        The one host sync: a .tolist() of the row lengths (and of extra, 1-D integers, returned);
        none when extra is None and lengths (the host copy, e.g. TokenRows.lengths) is given."""
        r, width = pad.shape
        counts = pad.sum(1)
        if extra is None and lengths is not None:
            host = list(lengths)
        else:
            host = (counts if extra is None else torch.cat([counts, extra.to(counts)])).tolist()
        n_real = sum(host[:r])
        if not self.bucket:
            plan = [(r, width)]
            groups = [RowBucket(torch.arange(r, device=pad.device),
                                torch.arange(width, device=pad.device).expand(r, -1), pad)]
        else:
            plan = plan_buckets(sorted(host[:r], reverse=True), width, self.max_buckets)
            order = torch.argsort(counts, descending=True, stable=True)
            compact = torch.argsort((~pad).to(torch.uint8), dim=1, stable=True)  # real tokens first
            groups, start = [], 0
            for n_rows, size in plan:
                idx = order[start:start + n_rows]
                cols = compact[idx, :size]
                groups.append(RowBucket(idx, cols, pad[idx.unsqueeze(1), cols]))
                start += n_rows
        slots = sum(n_rows * size for n_rows, size in plan)
        return RowBuckets(groups, n_real, 1 - n_real / slots if slots else 0.0,
                          1 - n_real / (r * width) if r * width else 0.0, host[r:])

    def forward(self, rows: torch.Tensor, pad: torch.Tensor, anatomy: torch.Tensor,
                update_codebook: bool | None = None, buckets: RowBuckets | None = None) -> VQOutput:
        """rows (R, L, C), pad (R, L) True = real token, anatomy (R,) in 0..M-1.

        update_codebook (default: self.training): initialisation, EMA codebook update and usage
        counting. buckets: self.buckets(pad), for a caller that uses them too (else made here).
        """
        if rows.shape[0] == 0:
            zero = self.encoder.cond.sum() * 0.0
            return VQOutput(rows, zero, zero, zero, pad.long(), rows.new_zeros(0))
        update = self.training if update_codebook is None else update_codebook
        need = None
        if update:  # per anatomy: real tokens here but no codebook yet; then: any codebook yet
            has = torch.zeros(len(self.initialised), device=pad.device).index_add_(0, anatomy, pad.any(1).float())
            need = torch.cat([((has > 0) & ~self.initialised).long(), self.initialised.any().long().view(1)])
        bk = self.buckets(pad, need) if buckets is None else buckets._replace(extra=need.tolist() if update else [])
        self.last_pad_fraction, self.last_pad_fraction_unbucketed = bk.pad_fraction, bk.pad_fraction_unbucketed
        if update and not bk.extra[-1]:
            self._init_standardise(rows, pad)
        (r, width, ch), dim, groups, slots = rows.shape, self.codebook.shape[-1], bk.groups, self._slots(bk)
        xs = [rows[g.idx.unsqueeze(1), g.cols] for g in groups]
        anats = [anatomy[g.idx] for g in groups]
        zs = [self.encoder((x - self.token_mean) / self.token_scale, g.pad, a) for x, g, a in zip(xs, groups, anats)]
        if update and any(bk.extra[:-1]):
            full = zs[0].new_zeros(r, width, dim).index_put(slots, torch.cat([z.detach().flatten(0, 1) for z in zs]))
            for j in [j for j, flag in enumerate(bk.extra[:-1]) if flag]:
                self._init_codes(full[pad & (anatomy == j).unsqueeze(1)].float(), j)
        with torch.autocast(rows.device.type, enabled=False):
            zs = [z.float() for z in zs]
            books = [self.codebook.float()[a] for a in anats]  # (Rb, K, dim) copies: the codes before the update
            codes = [_sq_dist(z.detach(), book).argmin(-1) for z, book in zip(zs, books)]  # ties: lowest index
            es = [torch.gather(book, 1, c.unsqueeze(-1).expand(-1, -1, dim)) for book, c in zip(books, codes)]
            codes = [c.masked_fill(~g.pad, -1) for c, g in zip(codes, groups)]
            if update:
                self.ema_update(torch.cat([z.detach().flatten(0, 1) for z in zs]),
                                torch.cat([a.unsqueeze(1).expand_as(c).flatten() for a, c in zip(anats, codes)]),
                                torch.cat([c.flatten() for c in codes]))
            commit = sum(((z - e).pow(2) * g.pad.unsqueeze(-1)).sum() for z, e, g in zip(zs, es, groups))
            z_q = [z + (e - z).detach() for z, e in zip(zs, es)]  # straight-through
        recons = [self.decoder(q, g.pad, a) * self.token_scale + self.token_mean for q, g, a in zip(z_q, groups, anats)]
        sq = [(rec - x).pow(2) * g.pad.unsqueeze(-1) for rec, x, g in zip(recons, xs, groups)]
        recon_loss = sum(s.sum() for s in sq) / (bk.n_real * ch)
        commit_loss = commit / (bk.n_real * dim)
        row_error = torch.cat([s.sum((1, 2)) / (g.pad.sum(1) * ch) for s, g in zip(sq, groups)])
        row_error = row_error.new_zeros(r).index_put((torch.cat([g.idx for g in groups]),), row_error)
        recon = recons[0].new_zeros(r, width, ch).index_put(
            slots, torch.cat([(rec * g.pad.unsqueeze(-1)).flatten(0, 1) for rec, g in zip(recons, groups)]))
        code_map = pad.new_full((r, width), -1, dtype=torch.long).index_put(slots, torch.cat([c.flatten() for c in codes]))
        return VQOutput(recon, recon_loss + self.beta * commit_loss, recon_loss, commit_loss, code_map, row_error)

    @staticmethod
    def _slots(bk: RowBuckets) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) in the (R, L) layout of every bucket slot, bucket by bucket, flattened."""
        return (torch.cat([g.idx.unsqueeze(1).expand_as(g.cols).flatten() for g in bk.groups]),
                torch.cat([g.cols.flatten() for g in bk.groups]))

    @torch.no_grad()
    def _init_standardise(self, rows: torch.Tensor, pad: torch.Tensor) -> None:
        w, x = pad.unsqueeze(-1).float(), rows.float()
        mean = (x * w).sum((0, 1)) / w.sum()
        self.token_mean.copy_(mean)
        self.token_scale.copy_((((x - mean).pow(2) * w).sum() / (w.sum() * x.shape[-1])).sqrt().clamp_min(1e-6))

    @torch.no_grad()
    def _init_codes(self, z: torch.Tensor, j: int) -> None:
        """Codebook j from its latents z (n, dim) fp32 in call order (see the class docstring)."""
        k, dev, gen = self.codebook.shape[1], z.device, torch.Generator().manual_seed(self.init_seed * 1000 + j)
        n, distinct = len(z), len(torch.unique(z, dim=0))
        first = int(torch.randint(n, (1,), generator=gen))
        u = torch.rand(k, generator=gen, dtype=torch.float64).to(dev)
        picks, d2 = [z[first]], _sq_dist(z, z[first:first + 1]).squeeze(1).double()
        for t in range(min(k, distinct) - 1):  # k-means++: the next code drawn with probability ~ d2
            cdf = d2.cumsum(0)
            i = torch.searchsorted(cdf, u[t:t + 1] * cdf[-1], right=True).clamp_max(n - 1)
            picks.append(z[i].squeeze(0))
            d2 = torch.minimum(d2, _sq_dist(z, z[i]).squeeze(1).double())
        book = torch.stack(picks)
        if distinct > k:
            for _ in range(self.init_iters):  # Lloyd: each code to the mean of its latents (none: kept)
                near = _sq_dist(z, book).argmin(1)
                count = torch.bincount(near, minlength=k).unsqueeze(1)
                sums = torch.zeros(k, z.shape[1], dtype=torch.float64, device=dev).index_add_(0, near, z.double())
                book = torch.where(count > 0, (sums / count.clamp_min(1)).float(), book)
        elif distinct < k:
            spread = z.var(0, unbiased=False).mean().sqrt()
            scale = torch.where(spread > 0, 0.1 * spread, 1e-3 * z.pow(2).mean().sqrt() + 1e-6)
            base = book[torch.randint(distinct, (k - distinct,), generator=gen).to(dev)]
            book = torch.cat([book, base + scale * torch.randn(k - distinct, z.shape[1], generator=gen).to(dev)])
        self.codebook[j] = book
        self.ema_sum[j] = book
        self.ema_count[j] = 1.0
        self.initialised[j] = True

    @torch.no_grad()
    def ema_update(self, latents: torch.Tensor, anatomy: torch.Tensor, codes: torch.Tensor) -> None:
        """One EMA step from latents (T, code_dim) assigned to codes (T,) of anatomy (T,); codes -1: ignored.

        For each anatomy j present: N_jk <- d N_jk + (1-d) n_jk; m_jk <- d m_jk + (1-d) sum of its
        latents; e_jk = m_jk / N~_jk with N~_jk = (N_jk + eps) / (sum_k N_jk + K eps) * sum_k N_jk.
        In fp32 (sums accumulated in fp64) with autocast off; no host sync.
        """
        m, k, dim = self.codebook.shape
        with torch.autocast(latents.device.type, enabled=False):
            flat = torch.where(codes >= 0, anatomy * k + codes, m * k)  # m * k: a bin for the ignored
            counts = torch.zeros(m * k + 1, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))
            counts = counts[:m * k].view(m, k).float()  # (bincount would sync: its size depends on the values)
            sums = torch.zeros(m * k + 1, dim, dtype=torch.float64, device=latents.device)
            sums = sums.index_add_(0, flat, latents.double())[:m * k].view(m, k, dim).float()
            present = counts.sum(1, keepdim=True) > 0
            d = self.decay
            count = torch.where(present, d * self.ema_count + (1 - d) * counts, self.ema_count)
            total = torch.where(present.unsqueeze(-1), d * self.ema_sum + (1 - d) * sums, self.ema_sum)
            n = count.sum(1, keepdim=True)
            smoothed = (count + self.eps) / (n + k * self.eps) * n
            self.codebook.copy_(torch.where(present.unsqueeze(-1), total / smoothed.unsqueeze(-1), self.codebook))
            self.ema_count.copy_(count)
            self.ema_sum.copy_(total)
            self.usage += counts

    def reset_usage(self) -> None:
        self.usage.zero_()

    def usage_means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean perplexity, mean dead codes) over the anatomies seen, as device tensors (no host
        sync; for per-step metrics). See codebook_stats."""
        perplexity, dead, seen = self._usage()
        n = seen.sum().clamp_min(1)
        return (perplexity * seen).sum() / n, (dead * seen).sum() / n

    def _usage(self):
        total = self.usage.sum(1, keepdim=True)
        p = self.usage / total.clamp_min(1e-12)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
        seen = total.squeeze(1) > 0
        return torch.where(seen, entropy.exp(), torch.zeros_like(entropy)), (self.usage < 0.5).sum(1).float(), seen

    def codebook_stats(self) -> dict:
        """Per anatomy, from the accumulated usage counts: perplexity exp(H(p)) of the code
        distribution (1 = one code used, K = all equally) and dead codes (never used). Anatomies
        never seen report perplexity 0 and K dead; the means are over the anatomies seen."""
        perplexity, dead, seen = self._usage()
        mean_perplexity, mean_dead = self.usage_means()
        return {"perplexity": perplexity.tolist(), "dead_codes": [int(d) for d in dead.tolist()],
                "anatomies_seen": int(seen.sum()), "mean_perplexity": float(mean_perplexity),
                "mean_dead_codes": float(mean_dead)}


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

"""Figures of the paper's kind from a trained model and its zero-shot predictions.

Each figure is a data function (numbers, tested) and a plotting function writing one PNG:

- ROC curves per organ (test split)                     ``roc_curves`` / ``plot_roc_per_organ``
- t-SNE of normal vs abnormal anatomy embeddings, Fig. 3 ``anatomy_embeddings`` / ``plot_tsne``
- vision-token activations w/o and w/ VSDB, Fig. 5     ``token_activations`` / ``plot_activation_histograms``
- visual activation maps, Fig. 4                        ``activation_map`` / ``plot_activation_maps``
  (through the lesion, outlined, where the cohort wrote its voxels: ``lesion_mask``)

``make_all`` writes all of them for one model folder. Plotting uses matplotlib's object API
(``matplotlib.figure.Figure``, rendered by Agg), never pyplot, so no global backend is touched.
Every PNG is ``figsize * DPI`` pixels (no tight bounding box).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from .. import catalog
from ..cohort.schema import LESION_LABELS, LESIONS_DIR
from ..imaging.storage import CasePaths, load_case, paths_from
from ..model.io import load_model, pick_device
from ..model.normality import anatomy_token_rows
from ..model.vision import N_ANATOMIES, pad_to_multiple
from ..model.zeroshot import prompt_embedding
from ..workspace import read_parquet
from .embed import anatomy_crop, embed_cases
from .zeroshot import read_ground_truth

log = logging.getLogger("ctvlp.figures")

DPI = 120
NEAR_ZERO = 0.05  # |activation| below this counts as "near zero" (Fig. 5's sparsity)
NORMAL_COLOR, ABNORMAL_COLOR = "#1f5fd6", "#d62020"


def _figure(n_panels: int, ncols_max: int, panel=(5.0, 4.5)):
    """A constrained-layout Figure with a grid of n_panels axes (extra axes hidden); (fig, axes)."""
    from matplotlib.figure import Figure

    n_panels = max(n_panels, 1)
    ncols = min(ncols_max, n_panels)
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels])


def _save(fig, out_png) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    return out


def _check_eval(model):
    # BatchNorm in training mode would both normalise by one volume's statistics and update the
    # running statistics: every figure is computed in eval mode.
    if model.training:
        model.eval()


# ---- 1. ROC curves per organ ----------------------------------------------------------------------
class RocCurve(NamedTuple):
    disease: str
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float
    n_pos: int
    n: int


def roc_curves(pred: pl.DataFrame) -> dict[str, list[RocCurve]]:
    """Per organ, the test-split ROC curve of every disease with both classes among its evaluable
    test rows (``zeroshot.predict``'s table). Organs and diseases keep the table's order; organs
    without any such disease are left out. fpr/tpr are sklearn's ``roc_curve`` (drop_intermediate)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    test = pred.filter((pl.col("split") == "test") & pl.col("evaluable") & pl.col("score").is_not_null()
                       & pl.col("label").is_not_null())
    out: dict[str, list[RocCurve]] = {}
    for (organ, disease_id), g in test.group_by(["organ", "disease_id"], maintain_order=True):
        y, s = g["label"].to_numpy().astype(int), g["score"].to_numpy().astype(float)
        if len(np.unique(y)) < 2:
            log.info("ROC: %s has one class among %d evaluable test rows; left out", disease_id, len(y))
            continue
        fpr, tpr, _ = roc_curve(y, s)
        out.setdefault(organ, []).append(
            RocCurve(g["disease"][0], fpr, tpr, float(roc_auc_score(y, s)), int(y.sum()), len(y)))
    return out


def operating_point(pred: pl.DataFrame, disease_id: str, threshold: float) -> tuple[float, float] | None:
    """(false-positive rate, sensitivity) on the evaluable test rows of ``disease_id`` when a case
    is called positive at score >= threshold (as ``metrics``); None without both classes or
    without a threshold."""
    if threshold is None or not np.isfinite(threshold):
        return None
    t = pred.filter((pl.col("disease_id") == disease_id) & (pl.col("split") == "test") & pl.col("evaluable")
                    & pl.col("score").is_not_null() & pl.col("label").is_not_null())
    y, s = t["label"].to_numpy().astype(int), t["score"].to_numpy().astype(float)
    if len(np.unique(y)) < 2:
        return None
    called = s >= threshold
    return float(called[y == 0].mean()), float(called[y == 1].mean())


def roc_band(y, s, n_resamples: int = 200, seed: int = 0, grid=None, level: float = 0.95):
    """Pointwise bootstrap band of an ROC curve: (fpr grid, lower tpr, upper tpr). Each resample
    draws the cases with replacement within each class (so every resample has both classes) and
    reads its curve's tpr at the grid's fprs (step interpolation, as the curve is drawn)."""
    from sklearn.metrics import roc_curve

    y, s = np.asarray(y).astype(int), np.asarray(s, float)
    grid = np.linspace(0, 1, 101) if grid is None else np.asarray(grid, float)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    tprs = np.empty((n_resamples, len(grid)))
    for b in range(n_resamples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        fpr, tpr, _ = roc_curve(y[idx], s[idx], drop_intermediate=False)
        tprs[b] = tpr[np.searchsorted(fpr, grid, side="right") - 1]
    alpha = (1 - level) / 2
    return grid, np.quantile(tprs, alpha, axis=0), np.quantile(tprs, 1 - alpha, axis=0)


def plot_roc_per_organ(pred: pl.DataFrame, out_png, thresholds: dict[str, float] | None = None,
                       n_resamples: int = 200, seed: int = 0) -> Path:
    """One panel per organ, one ROC curve per disease (AUC and positives/n in the legend), its 95%
    pointwise bootstrap band (``roc_band``, shaded) and, where ``thresholds`` {disease_id: threshold
    chosen on validation} gives one, the operating point that threshold reaches on the test split."""
    curves = roc_curves(pred)
    thresholds = thresholds or {}
    ids = {d: i for d, i in pred.select("disease", "disease_id").unique(maintain_order=True).iter_rows()}
    test = pred.filter((pl.col("split") == "test") & pl.col("evaluable") & pl.col("score").is_not_null()
                       & pl.col("label").is_not_null())
    n_all = pred.filter(pl.col("split") == "test")["disease_id"].n_unique()
    n_shown = sum(len(v) for v in curves.values())
    fig, axes = _figure(len(curves), 3)
    if not curves:
        axes[0].text(0.5, 0.5, "no disease has both classes\namong its evaluable test cases",
                     ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, (organ, rows) in zip(axes, curves.items()):
        for k, c in enumerate(rows):
            color = f"C{k % 10}"
            did = ids.get(c.disease, c.disease)
            t = test.filter(pl.col("disease_id") == did)
            grid, lo, hi = roc_band(t["label"].to_numpy(), t["score"].to_numpy(), n_resamples, seed)
            ax.fill_between(grid, lo, hi, step="post", color=color, alpha=0.15, lw=0)
            ax.step(c.fpr, c.tpr, where="post", lw=1.6, color=color,
                    label=f"{c.disease}: AUC {c.auc:.3f} ({c.n_pos}+ / {c.n})")
            point = operating_point(pred, did, thresholds.get(did))
            if point is not None:
                ax.plot(*point, marker="o", ms=7, mfc=color, mec="black", mew=1.0, ls="none", zorder=5)
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
        ax.plot([], [], marker="o", ms=7, mfc="white", mec="black", ls="none",
                label="operating point (validation threshold)")
        ax.fill_between([], [], [], color="0.5", alpha=0.3, lw=0, label="95% bootstrap band")
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal",
               xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)")
        ax.set_title(f"{organ} (test cases: n = {max(c.n for c in rows)})", fontsize=11)
        ax.legend(loc="lower right", fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Zero-shot ROC per organ, test split, evaluable cases ({n_shown} of {n_all} diseases "
                 f"have both classes); bands: {n_resamples} bootstrap resamples", fontsize=12)
    return _save(fig, out_png)


# ---- 2. t-SNE of anatomy embeddings (Fig. 3) ------------------------------------------------------
def anatomy_embeddings(model, cases: list[CasePaths], ground_truth, device, crop_size=None):
    """Rows (case, anatomy) for every case and every anatomy complete in its scan that has at least
    one disease in the ground truth (a parquet path or table: case_id, disease_id, anatomy, label).

    Returns X (n, D) float32 anatomy embeddings (``embed.embed_cases``), normal (n,) bool (no
    positive ground-truth disease of that anatomy) and anatomy (n,) names; cases in order, anatomies
    in catalog order within a case.
    """
    _check_eval(model)
    case_ids = [c.case_id for c in cases]
    truth = read_parquet(ground_truth) if isinstance(ground_truth, (str, Path)) else ground_truth
    status = (truth.filter(pl.col("case_id").is_in(list(case_ids)) & pl.col("label").is_not_null())
              .group_by("case_id", "anatomy").agg((pl.col("label") > 0).any().alias("abnormal")))
    abnormal = {(c, a): bool(b) for c, a, b in status.iter_rows()}
    embs = embed_cases(model, cases, device, crop_size)
    xs, normal, names = [], [], []
    for case_id in case_ids:
        emb, complete = embs[case_id]
        for a in catalog.anatomies():
            key = (case_id, a.name)
            if key in abnormal and complete[a.index - 1]:
                xs.append(emb[a.index - 1])
                normal.append(not abnormal[key])
                names.append(a.name)
    dim = model.vis_proj.bias.shape[1]
    x = np.stack(xs).astype(np.float32) if xs else np.zeros((0, dim), np.float32)
    return x, np.array(normal, bool), np.array(names, dtype=object)


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """sklearn t-SNE to 2-D, perplexity min(30, n - 1), PCA initialisation."""
    from sklearn.manifold import TSNE

    n = len(x)
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 embeddings, got {n}")
    return TSNE(n_components=2, perplexity=float(min(30, n - 1)), init="pca", random_state=seed).fit_transform(
        np.asarray(x, np.float64))


TSNE_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">", "p")


def plot_tsne(x, normal, anatomy, out_png, seed: int = 0, title: str = "model", compare: dict | None = None,
              max_labels: int = 12) -> Path:
    """``tsne_figure`` written to out_png."""
    return _save(tsne_figure(x, normal, anatomy, seed, title, compare, max_labels), out_png)


def tsne_figure(x, normal, anatomy, seed: int = 0, title: str = "model", compare: dict | None = None,
                max_labels: int = 12):
    """Fig. 3: t-SNE of anatomy embeddings, normal blue, abnormal red, one marker shape per anatomy
    (the max_labels most frequent; the rest small dots, "other"), both explained in a legend beside
    the panels (nothing is written over the points). compare {title: (X, normal, anatomy)}: further
    panels (e.g. a baseline model) drawn before this one, each its own t-SNE."""
    from matplotlib.lines import Line2D

    panels = [*(compare or {}).items(), (title, (x, normal, anatomy))]
    fig, axes = _figure(len(panels), 3, panel=(6.0, 5.6))
    all_names = np.concatenate([np.asarray(p[1][2], dtype=object) for p in panels])
    names, counts = np.unique(all_names, return_counts=True)
    shown = [str(a) for a in names[np.argsort(-counts, kind="stable")][:min(max_labels, len(TSNE_MARKERS))]]
    marker = {a: TSNE_MARKERS[i] for i, a in enumerate(shown)}
    for ax, (name, (xx, nn, aa)) in zip(axes, panels):
        nn, aa = np.asarray(nn, bool), np.asarray(aa, dtype=object)
        y = tsne_2d(xx, seed)
        for group, color in ((nn, NORMAL_COLOR), (~nn, ABNORMAL_COLOR)):
            for a in [*shown, None]:
                sel = group & (np.isin(aa, shown, invert=True) if a is None else aa == a)
                if sel.any():
                    ax.scatter(*y[sel].T, s=18 if a else 6, c=color, marker=marker.get(a, "."), alpha=0.75, lw=0)
        ax.set_title(f"{name}: n = {len(nn)} anatomy embeddings ({int(nn.sum())} normal, {int((~nn).sum())} "
                     f"abnormal)\n{len(np.unique(aa))} anatomies, perplexity {min(30, len(nn) - 1)}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], ls="none", marker="o", ms=7, mfc=NORMAL_COLOR, mec="none", label="normal"),
               Line2D([], [], ls="none", marker="o", ms=7, mfc=ABNORMAL_COLOR, mec="none", label="abnormal")]
    handles += [Line2D([], [], ls="none", marker=marker[a], ms=7, mfc="0.35", mec="none", label=a.replace("_", " "))
                for a in shown]
    if len(names) > len(shown):
        handles.append(Line2D([], [], ls="none", marker=".", ms=6, mfc="0.35", mec="0.35",
                              label=f"other ({len(names) - len(shown)} anatomies)"))
    fig.legend(handles=handles, loc="outside right center", fontsize=8, title="colour: status\nshape: anatomy",
               title_fontsize=8)
    fig.suptitle("t-SNE of normal (blue) and abnormal (red) anatomy embeddings", fontsize=12)
    return fig


# ---- 3. vision-token activations w/o and w/ VSDB (Fig. 5) -----------------------------------------
def _passes(img, anat, complete, boxes, wanted: list[int], crop_size):
    """(image, anatomy map, anatomy indices 0..M-1 to read) per encoder pass: the whole volume once,
    or one anatomy-centred crop per anatomy (``embed.anatomy_crop``, as ``embed_volume``)."""
    wanted = [j for j in wanted if complete[j]]
    if crop_size is None:
        if wanted:
            yield img, anat, wanted
        return
    for j in wanted:
        box = (boxes or {}).get(catalog.anatomies()[j].name)
        if box is not None:
            sl = anatomy_crop(box, img.shape, crop_size)
            yield img[sl], anat[sl], [j]


def _rows(model, img, anat, wanted: list[int], device, boost: bool):
    """Encoder pass on one (padded) volume -> TokenRows of the wanted anatomies and, with boost,
    f_hat = perception(f, q) of those rows with q the frozen VQ-VAE's reconstruction (as the boost
    path of ``CTVLP.encode_image``); without boost f_hat is None."""
    stride = model.vision.stride
    im = torch.from_numpy(pad_to_multiple(np.asarray(img, np.float32), stride))[None, None].to(device)
    an = torch.from_numpy(pad_to_multiple(np.array(anat), stride))[None].to(device)
    tokens, allowed = model.image_tokens(im, an)
    keep = torch.zeros(1, N_ANATOMIES, dtype=torch.bool, device=device)
    keep[0, wanted] = True
    rows = anatomy_token_rows(tokens, allowed, keep)
    if not boost or rows.tokens.shape[0] == 0:
        return rows, None
    q = model.vqvae(rows.tokens, rows.pad, rows.anatomy, update_codebook=False).recon
    return rows, model.perception(rows.tokens, q)


@torch.no_grad()
def anatomy_tokens(model, cases: list[CasePaths], anatomies, device, crop_size=None, boost: bool = False):
    """{anatomy: (f (T, C), f_hat (T, C) or None)} over the cases' feature-map tokens of each named
    anatomy (complete in the scan); T sums the anatomy's token count over the cases."""
    _check_eval(model)
    idx = {catalog.anatomy_by_name(a).index - 1: a for a in anatomies}
    f = {a: [] for a in anatomies}
    fh = {a: [] for a in anatomies}
    for paths in cases:
        img, anat, complete, boxes = load_case(paths)
        for im, an, wanted in _passes(img, anat, complete, boxes, list(idx), crop_size):
            rows, f_hat = _rows(model, im, an, wanted, device, boost)
            for r, j in enumerate(rows.anatomy.tolist()):
                pad = rows.pad[r]
                f[idx[j]].append(rows.tokens[r][pad].float().cpu().numpy())
                if f_hat is not None:
                    fh[idx[j]].append(f_hat[r][pad].float().cpu().numpy())
    c = model.vision.out_channels

    def cat(parts):
        return np.concatenate(parts) if parts else np.zeros((0, c), np.float32)

    return {a: (cat(f[a]), cat(fh[a]) if boost else None) for a in anatomies}


def token_activations(model, cases: list[CasePaths], anatomies, device, crop_size=None) -> dict:
    """Fig. 5's data: {anatomy: (f, f_hat)}, each (T, C) float32: f the anatomy's feature-map
    tokens (``image_tokens`` + the anatomy's token mask) over the cases, f_hat = perception(f, q)
    with q the frozen VQ-VAE's reconstruction of the anatomy's tokens. Needs a model with a VQ-VAE."""
    if getattr(model, "vqvae", None) is None or getattr(model, "perception", None) is None:
        raise ValueError("token_activations needs a model built with a VQ-VAE (vq_codes > 0), e.g. the "
                         "phase-4 (boost) model; this model has none, so there is no f_hat = perception(f, q)")
    return anatomy_tokens(model, cases, anatomies, device, crop_size, boost=True)


def near_zero_fraction(values: np.ndarray, threshold: float = NEAR_ZERO) -> float:
    v = np.asarray(values)
    return float((np.abs(v) < threshold).mean()) if v.size else float("nan")


def plot_activation_histograms(acts: dict, out_png, baseline: dict | None = None, title: str | None = None,
                               bins: int = 80, threshold: float = NEAR_ZERO) -> Path:
    """Fig. 5: per anatomy, histograms of the token activations w/o VSDB (f) and w/ VSDB (f_hat),
    same bins, counts on a log axis, the fraction with |a| < threshold of each (over all values) in
    the title. baseline {anatomy: f (T, C)}: a third, dashed histogram (e.g. a model trained without
    VSDB). The x axis spans the 0.1-99.9 percentiles of the values shown (widened to hold
    +-threshold); the few values beyond are not drawn."""
    names = [a for a, (f, _) in acts.items() if np.asarray(f).size]
    fig, axes = _figure(len(names), 3, panel=(5.2, 4.2))
    for ax, a in zip(axes, names):
        f, fh = (np.asarray(v, np.float32).ravel() for v in acts[a])
        series = [("w/o VSDB (f)", f, "#4a7fd0", "stepfilled"), ("w/ VSDB (f\u0302)", fh, "#e0762b", "stepfilled")]
        if baseline is not None and a in baseline and np.asarray(baseline[a]).size:
            series.append(("w/o-VSDB model (f)", np.asarray(baseline[a], np.float32).ravel(), "0.25", "step"))
        allv = np.concatenate([s[1] for s in series])
        lo, hi = np.percentile(allv, [0.1, 99.9])
        lo, hi = min(lo, -threshold), max(hi, threshold)
        edges = np.linspace(lo, hi, bins + 1)
        fracs = []
        for label, v, color, kind in series:
            frac = near_zero_fraction(v, threshold)
            fracs.append(f"{label.split(' (')[0]} {frac:.1%}")
            ax.hist(v, bins=edges, histtype=kind, color=color, alpha=0.55 if kind != "step" else 1,
                    ls="--" if kind == "step" else "-", lw=1.4, label=label)
        ax.axvspan(-threshold, threshold, color="0.85", zorder=0)
        ax.set_yscale("log")
        ax.set(xlabel="activation value", ylabel="frequency (log)")
        f2 = np.asarray(acts[a][0])
        n_tok, c = f2.shape if f2.ndim == 2 else (f2.size, 1)
        ax.set_title(f"{a.replace('_', ' ')}: {n_tok} tokens x {c} ch\n|a|<{threshold:g}: " + ", ".join(fracs),
                     fontsize=9.5)
        ax.legend(fontsize=7, loc="upper right")
    if not names:
        axes[0].text(0.5, 0.5, "no tokens of the requested anatomies", ha="center", va="center")
        axes[0].set_axis_off()
    fig.suptitle(title or "Vision-token activations w/o VSDB (f) and w/ VSDB (f\u0302 = perception(f, q))",
                 fontsize=11)
    return _save(fig, out_png)


# ---- 4. visual activation maps (Fig. 4) -----------------------------------------------------------
def _disease(disease, disease_catalog: str) -> catalog.Disease:
    if isinstance(disease, catalog.Disease):
        return disease
    for d in catalog.diseases(disease_catalog):
        if d.id == disease:
            return d
    raise KeyError(f"disease {disease!r} is not in catalog {disease_catalog!r}")


@torch.no_grad()
def activation_map(model, image, anatomy, disease, device, mode: str = "nearest", disease_catalog: str = "demo",
                   single_token_pool: bool = False, prompt_style: str | None = None) -> np.ndarray:
    """(X, Y, Z) float32 map of one disease on one volume: for every feature-map token of the
    disease's anatomy, cos(vis_proj_j(token), positive prompt embedding of the disease) with j the
    anatomy; NaN outside the anatomy's voxels, in [-1, 1] inside.

    disease: a catalog.Disease or an id of disease_catalog. The tokens are f, or f_hat =
    perception(f, q) when the model boosts (``model.boost``), i.e. what its anatomy query pools.
    single_token_pool: project vis_pool(token alone) instead of the raw token (the anatomy embedding
    the model would give if that token were the whole anatomy; in the space vis_proj was trained on).
    mode "nearest": each voxel takes its feature cell's value (the cell ``token_masks`` puts it in);
    "trilinear": normalised trilinear interpolation of the anatomy's cells only (no mixing with
    cells outside the anatomy).
    """
    if mode not in ("nearest", "trilinear"):
        raise ValueError(f"mode must be 'nearest' or 'trilinear', not {mode!r}")
    _check_eval(model)
    d = _disease(disease, disease_catalog)
    j = catalog.anatomy_by_name(d.anatomy).index - 1
    image, anatomy = np.asarray(image), np.asarray(anatomy)
    if image.shape != anatomy.shape:
        raise ValueError(f"image {image.shape} and anatomy {anatomy.shape} differ in shape")
    inside = anatomy == j + 1
    if not inside.any():
        raise ValueError(f"anatomy {d.anatomy!r} (index {j + 1}) of {d.id} is absent from this anatomy map")
    rows, f_hat = _rows(model, image, anatomy, [j], device, model.boost)
    cells = rows.index[0][rows.pad[0]]  # token indices of the anatomy, in feature-map order
    tok = (f_hat if f_hat is not None else rows.tokens)[0][rows.pad[0]]
    idx = torch.full((len(tok),), j, dtype=torch.long, device=tok.device)
    if single_token_pool:
        allowed = torch.ones(len(tok), 1, 1, dtype=torch.bool, device=tok.device)
        tok = model.vis_pool(tok.unsqueeze(1), allowed, idx.unsqueeze(1)).squeeze(1)
    emb = F.normalize(model.vis_proj(tok, idx), dim=-1)
    positive = d.prompts_of(prompt_style)[0]
    sim = (emb @ prompt_embedding(model, positive, j).to(emb.device)).clamp(-1, 1).float()
    stride = model.vision.stride
    padded = tuple(-(-s // stride) * stride for s in image.shape)
    feat = tuple(p // stride for p in padded)
    grid = torch.zeros(int(np.prod(feat)), device=sim.device)
    weight = torch.zeros_like(grid)
    grid[cells], weight[cells] = sim, 1.0
    grid, weight = grid.view(1, 1, *feat), weight.view(1, 1, *feat)
    if mode == "nearest":
        up = F.interpolate(grid, size=padded, mode="nearest")
    else:  # normalised convolution: a voxel of the anatomy always has its own cell's weight >= 1/8
        num = F.interpolate(grid, size=padded, mode="trilinear", align_corners=False)
        den = F.interpolate(weight, size=padded, mode="trilinear", align_corners=False)
        up = num / den.clamp_min(1e-6)
    out = up[0, 0, :image.shape[0], :image.shape[1], :image.shape[2]].cpu().numpy().astype(np.float32)
    out = np.clip(out, -1.0, 1.0)
    out[~inside] = np.nan
    return out


# Display windows (width, level) in HU, per anatomy: lung and airway in the lung window, bone in the
# bone window, the mediastinum's vessels and organs in the mediastinal window, the rest in the
# abdominal soft-tissue window.
CT_WINDOWS = {"abdomen": (400, 40), "lung": (1500, -600), "bone": (2000, 500), "mediastinum": (350, 40)}
WINDOW_OF_ANATOMY = {
    **dict.fromkeys(("lung", "trachea"), "lung"),
    **dict.fromkeys(("heart", "aorta", "esophagus", "pulmonary_vessels", "supraaortic_arteries", "venae_cavae",
                     "thyroid_gland"), "mediastinum"),
    **dict.fromkeys(("sacrum", "cervical_spine", "thoracic_spine", "lumbar_spine", "ribs", "sternum",
                     "shoulder_girdle", "hip", "femur"), "bone"),
}
PREPROCESS_HU = (-1000.0, 1000.0)  # preprocess.hu_window's default: image value 0..1 <-> these HU
MAP_CMAP = "RdBu_r"  # diverging, perceptually uniform in lightness, white at zero


def ct_window(anatomy: str) -> tuple[str, int, int]:
    """(window name, width, level) in HU for an anatomy (abdomen W400/L40 unless listed)."""
    name = WINDOW_OF_ANATOMY.get(anatomy, "abdomen")
    return (name, *CT_WINDOWS[name])


def window_image(image, window: tuple[float, float], hu_range=PREPROCESS_HU) -> np.ndarray:
    """A preprocessed image (values 0..1 for hu_range) in the display window (width, level):
    0 at level - width/2 and below, 1 at level + width/2 and above."""
    lo, hi = hu_range
    hu = lo + np.asarray(image, np.float32) * (hi - lo)
    width, level = window
    return np.clip((hu - (level - width / 2)) / width, 0.0, 1.0)


def lesion_mask(case: CasePaths, lesions_dir, disease_id: str) -> np.ndarray | None:
    """``disease_id``'s lesion voxels (bool, (X, Y, Z)) on the case's preprocessed grid, from the
    cohort's label map ``lesions_dir/<case_id>.nii.gz`` (values named by ``lesions_dir/labels.json``,
    ``{"labels": {value: disease_id}}``, as the demo cohort writes them), resampled nearest-neighbour
    through physical coordinates onto the grid meta.json records (as the preprocess stage resamples
    the anatomy map). None where there is no map, the disease has no value or no voxel on the grid,
    or meta.json lacks the grid (an older ctvlp)."""
    import SimpleITK as sitk

    from ..imaging.io import read_image, to_xyz
    from ..imaging.preprocess import resample

    if lesions_dir is None:
        return None
    path, labels = Path(lesions_dir) / f"{case.case_id}.nii.gz", Path(lesions_dir) / LESION_LABELS
    if not path.is_file() or not labels.is_file():
        return None
    value = {d: int(v) for v, d in json.loads(labels.read_text(encoding="utf-8"))["labels"].items()}.get(disease_id)
    meta = json.loads(case.meta.read_text(encoding="utf-8"))
    if value is None or not {"size", "spacing", "origin", "direction"} <= set(meta):
        return None
    grid = sitk.Image([int(n) for n in meta["size"]], sitk.sitkUInt8)
    grid.SetSpacing([float(v) for v in meta["spacing"]])
    grid.SetOrigin([float(v) for v in meta["origin"]])
    grid.SetDirection([float(v) for v in meta["direction"]])
    on_grid = to_xyz(resample(read_image(path), None, sitk.sitkNearestNeighbor, 0, reference=grid)) == value
    return on_grid if on_grid.any() else None


@dataclass
class MapPanel:
    """One panel of ``plot_activation_maps``: image (preprocessed, 0..1 for ``hu_range``) and map
    (X, Y, Z), the anatomy's voxels (bool), the anatomy's name (its CT window), the lesion's voxels
    where the cohort records them (the slice goes through the lesion, outlined), and the column
    header (e.g. "positive 1")."""
    title: str
    image: np.ndarray
    amap: np.ndarray
    mask: np.ndarray
    anatomy: str = ""
    lesion: np.ndarray | None = None
    hu_range: tuple[float, float] = PREPROCESS_HU


def centre_slice(mask: np.ndarray) -> int:
    """Axial (z) index through the mask's centroid; the slice with most voxels if that one is empty."""
    zs = np.nonzero(mask)[2]
    z = round(float(zs.mean()))
    return z if mask[:, :, z].any() else int(np.bincount(zs).argmax())


def panel_slice(it: MapPanel) -> tuple[int, str]:
    """(axial index, how it was chosen): the slice with most lesion voxels where the panel has a
    lesion mask, else the anatomy's centre slice."""
    if it.lesion is not None and np.asarray(it.lesion).any():
        return int(np.asarray(it.lesion).sum(axis=(0, 1)).argmax()), "through the lesion"
    return centre_slice(it.mask), "anatomy centre"


def map_limit(items: list[MapPanel]) -> float:
    """The figure's one colour scale, symmetric about zero: max |value| over every panel's map."""
    vals = [np.abs(it.amap[np.isfinite(it.amap)]) for it in items]
    vmax = max((float(v.max()) for v in vals if v.size), default=1.0)
    return vmax if vmax > 0 else 1e-3


def plot_activation_maps(items: list[MapPanel], out_png, ncols: int = 4, title: str | None = None,
                         slots: list[int] | None = None) -> Path:
    """Fig. 4: per (case, disease), one axial slice (arrays are LPS (x, y, z): shown radiologically,
    patient right on the left, anterior up) in the anatomy's own CT window (``ct_window``), the map
    overlaid inside the anatomy with a diverging colormap centred on zero and ONE symmetric scale
    for the whole figure (``map_limit``; one colour bar), the anatomy's outline (white) and the
    lesion's (yellow) where known. The slice goes through the lesion where known, else through the
    anatomy's centre (``panel_slice``); each panel says which. slots: the grid cell (row-major,
    ncols per row) of each item, e.g. one row per disease with its positives and its negatives in
    fixed columns; default one after the other."""
    from matplotlib.colors import Normalize

    fixed = slots is not None  # a fixed grid: whole rows of ncols cells
    slots = list(range(len(items))) if slots is None else list(slots)
    if len(slots) != len(items) or len(set(slots)) != len(slots):
        raise ValueError("slots must give each item its own grid cell")
    n_cells = max(slots, default=0) + 1
    fig, axes = _figure(-(-n_cells // ncols) * ncols if fixed else n_cells, ncols, panel=(3.6, 3.4))
    rows_used = {k // ncols for k in slots}
    for k, ax in enumerate(axes):
        if k not in slots and items:
            if fixed and k // ncols in rows_used:  # a gap in a row: say so rather than leave a hole
                ax.text(0.5, 0.5, "no further test case\nof this class", ha="center", va="center", color="0.4",
                        fontsize=9, transform=ax.transAxes)
                ax.set_axis_off()
            else:
                ax.set_visible(False)
    vmax = map_limit(items)
    norm = Normalize(-vmax, vmax)
    over = None
    for ax, it in zip([axes[k] for k in slots], items):
        z, how = panel_slice(it)
        wname, width, level = ct_window(it.anatomy)
        shown = window_image(it.image[:, :, z], (width, level), it.hu_range)
        ax.imshow(shown.T, cmap="gray", vmin=0, vmax=1, origin="upper", interpolation="nearest")
        over = ax.imshow(it.amap[:, :, z].T, cmap=MAP_CMAP, norm=norm, alpha=0.7, origin="upper",
                         interpolation="nearest")
        ax.contour(it.mask[:, :, z].T.astype(float), levels=[0.5], colors="white", linewidths=0.7)
        if it.lesion is not None and np.asarray(it.lesion)[:, :, z].any():
            ax.contour(np.asarray(it.lesion)[:, :, z].T.astype(float), levels=[0.5], colors="yellow",
                       linewidths=1.2)
        ax.set_title(f"{it.title}\naxial z = {z} ({how}); {wname} W{width}/L{level}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if over is not None:
        fig.colorbar(over, ax=[ax for ax in axes if ax.get_visible()], fraction=0.025, pad=0.01, shrink=0.8,
                     label="cosine similarity to the positive prompt (one scale)")
    if not items:
        axes[0].text(0.5, 0.5, "no test case with both classes to show", ha="center", va="center")
        axes[0].set_axis_off()
    fig.suptitle(title or "Visual activation maps: cos(token embedding, positive prompt) inside the disease's "
                 "anatomy (white outline); red > 0 > blue", fontsize=10)
    return _save(fig, out_png)


def map_cases(pred: pl.DataFrame, n_diseases: int, per_class: int = 2, prefer_local: bool = True) -> pl.DataFrame:
    """The cases of the activation maps, chosen WITHOUT looking at scores: the first n_diseases
    diseases (table order; local ones first when prefer_local and the table has a ``type`` column)
    with an evaluable positive and negative test case, and for each the first per_class positive and
    the first per_class negative evaluable test cases by case id. Rows (disease_id, disease,
    anatomy, case_id, label, score, ...) in that order: a disease's positives, then its negatives."""
    test = pred.filter((pl.col("split") == "test") & pl.col("evaluable") & pl.col("label").is_not_null()
                       & pl.col("score").is_not_null())
    both = (test.group_by("disease_id", maintain_order=True).agg(pl.col("label").n_unique().alias("k"))
            .filter(pl.col("k") == 2)["disease_id"].to_list())
    if prefer_local and "type" in test.columns:
        kind = dict(test.select("disease_id", "type").unique("disease_id").iter_rows())
        both = sorted(both, key=lambda d: kind.get(d) != "local")  # stable: table order within a kind
    parts = []
    for did in both[:n_diseases]:
        t = test.filter(pl.col("disease_id") == did).sort("case_id")
        parts += [t.filter(pl.col("label") == 1).head(per_class), t.filter(pl.col("label") == 0).head(per_class)]
    extra = [c for c in ("prompt_style",) if c in test.columns]
    cols = ["disease_id", "disease", "anatomy", "case_id", "label", "score", *extra]
    return pl.concat(parts).select(cols) if parts else pl.DataFrame(schema={c: test.schema[c] for c in cols})


# ---- training curves ------------------------------------------------------------------------------
def training_curves(metrics) -> dict[str, np.ndarray]:
    """A phase's metrics.csv (or its table) as arrays: train step/loss/lr per step, val step/loss
    per validation (the step it was computed after), epoch ends (steps)."""
    df = metrics if isinstance(metrics, pl.DataFrame) else pl.read_csv(metrics, infer_schema_length=None)
    tr, va = df.filter(pl.col("split") == "train"), df.filter(pl.col("split") == "val")

    def arr(t, c):
        return t[c].cast(pl.Float64).to_numpy() if c in t.columns else np.zeros(len(t))

    ends = tr.group_by("epoch", maintain_order=True).agg(pl.col("step").max())["step"].to_numpy()
    return {"step": arr(tr, "step"), "loss": arr(tr, "loss"), "lr": arr(tr, "lr"),
            "val_step": arr(va, "step"), "val_loss": arr(va, "loss"), "epoch_end": ends.astype(float)}


def plot_training_curves(metrics, out_png, phase: str = "", smooth: int = 20) -> Path:
    """One phase's training: loss per step (faint) with its running mean over ``smooth`` steps,
    validation loss per epoch (markers), and the learning rate per step on a second panel."""
    c = training_curves(metrics)
    fig, (ax, ax_lr) = _figure(2, 2, panel=(5.4, 3.8))
    if len(c["step"]):
        ax.plot(c["step"], c["loss"], color="#4a7fd0", alpha=0.35, lw=0.9, label="train loss (per step)")
        w = min(smooth, len(c["loss"]) // 4)
        if w >= 2:  # a running mean only where there are enough steps for one to mean something
            run = np.convolve(c["loss"], np.ones(w) / w, mode="valid")
            ax.plot(c["step"][w - 1:], run, color="#1f4fa0", lw=1.8, label=f"train loss, mean of {w} steps")
        else:
            ax.lines[-1].set(alpha=1.0, lw=1.6, color="#1f4fa0")
    if len(c["val_step"]):
        ax.plot(c["val_step"], c["val_loss"], "o-", color="#d0622b", ms=5, lw=1.4, label="validation loss (per epoch)")
    for e in c["epoch_end"]:
        ax.axvline(e, color="0.85", lw=0.8, zorder=0)
    ax.set(xlabel="step", ylabel="loss", title=f"{phase}: loss ({len(c['epoch_end'])} epochs, "
                                               f"{len(c['step'])} steps)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax_lr.plot(c["step"], c["lr"], color="0.2", lw=1.4)
    ax_lr.set(xlabel="step", ylabel="learning rate", title=f"{phase}: learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.grid(alpha=0.3)
    fig.suptitle(f"Training curves, phase {phase}" if phase else "Training curves", fontsize=11)
    return _save(fig, out_png)


# ---- all figures ----------------------------------------------------------------------------------
def make_all(model_dir, predictions, cases_table, ground_truth, out_dir, disease_catalog: str,
             device="auto", baseline_model_dir=None, n_cases: int = 100, n_hist_cases: int = 20,
             n_maps: int = 3, hist_anatomies=None, crop_size=None, seed: int = 0,
             map_mode: str = "nearest", per_class: int = 2, training: dict | None = None,
             lesions_dir=None) -> dict[str, Path]:
    """Write roc_per_organ.png, tsne.png, activation_histograms.png (model with a VQ-VAE only),
    activation_maps.png and, for each {phase: metrics.csv} of ``training``, training_<phase>.png
    into out_dir; returns {name: path}.

    Cases: the test cases of ``cases_table`` (qc/cases.parquet) with ground truth, n_cases of them
    drawn at random (seed) for the t-SNE, the first n_hist_cases of those for the histograms.
    Histogram anatomies: hist_anatomies, or the anatomies of the catalog's zero-shot diseases, at
    most six. Maps: ``map_cases`` (n_maps
    diseases, per_class positive and per_class negative test cases each, chosen without scores).
    ROC: operating points at the thresholds of zeroshot.csv beside ``predictions`` (chosen on
    validation), where it exists. baseline_model_dir (e.g. the
    phase-2 model, w/o VSDB): a second t-SNE panel and a third histogram series.
    crop_size: as ``zeroshot.predict`` (None = whole volumes, else anatomy-centred crops; the maps
    then show the crop). map_mode: ``activation_map``'s upsampling.
    lesions_dir: the cohort's lesion label maps (``lesion_mask``; the demo cohort writes them); default
    ``lesions`` beside ``ground_truth`` (the cohort folder). A positive case whose map holds the
    disease's lesion gets the slice through it and its outline; every other panel the anatomy's centre.
    """
    truth = read_ground_truth(ground_truth)  # before anything is loaded or written
    lesions_dir = Path(ground_truth).parent / LESIONS_DIR if lesions_dir is None else Path(lesions_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(device)
    pred = read_parquet(predictions)
    paths = {f"training_{phase}": plot_training_curves(csv, out_dir / f"training_{phase}.png", phase)
             for phase, csv in (training or {}).items()}
    table_csv = Path(predictions).parent / "zeroshot.csv"
    thresholds = {}
    if table_csv.exists():
        t = pl.read_csv(table_csv).filter(pl.col("disease_id") != "mean").drop_nulls("threshold")
        thresholds = dict(zip(t["disease_id"].to_list(), t["threshold"].to_list()))
    paths["roc_per_organ"] = plot_roc_per_organ(pred, out_dir / "roc_per_organ.png", thresholds, seed=seed)

    table = read_parquet(cases_table)
    paths_of = paths_from(table)
    test = table.filter(pl.col("split") == "test")["case_id"].to_list()
    test = sorted(set(test) & set(truth["case_id"].to_list()))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(test, size=min(n_cases, len(test)), replace=False).tolist()) if test else []
    cases = [paths_of[c] for c in chosen]
    log.info("figures: %d test cases with ground truth, %d used for the t-SNE", len(test), len(cases))

    model = load_model(model_dir, device)
    base = load_model(baseline_model_dir, device) if baseline_model_dir else None
    x, normal, anat = anatomy_embeddings(model, cases, truth, device, crop_size)
    compare = None
    if base is not None:
        compare = {f"w/o VSDB ({Path(baseline_model_dir).name})":
                   anatomy_embeddings(base, cases, truth, device, crop_size)}
    paths["tsne"] = plot_tsne(x, normal, anat, out_dir / "tsne.png", seed, title=f"model ({Path(model_dir).name})",
                              compare=compare)

    if model.vqvae is not None:
        if hist_anatomies is None:
            hist_anatomies = list(dict.fromkeys(d.anatomy for d in catalog.diseases(disease_catalog)
                                                if d.zero_shot))[:6]
        hcases = cases[:n_hist_cases]
        acts = token_activations(model, hcases, hist_anatomies, device, crop_size)
        base_f = None
        if base is not None:
            base_f = {a: f for a, (f, _) in anatomy_tokens(base, hcases, hist_anatomies, device,
                                                           crop_size).items()}
        paths["activation_histograms"] = plot_activation_histograms(
            acts, out_dir / "activation_histograms.png", baseline=base_f,
            title=f"Vision-token activations w/o VSDB (f) and w/ VSDB (f\u0302 = perception(f, q)), "
                  f"{len(hcases)} test cases")
    else:
        log.info("figures: %s has no VQ-VAE; no activation histograms", model_dir)

    by_id = {d.id: d for d in catalog.diseases(disease_catalog)}
    items, slots = [], []
    chosen_maps = map_cases(pred.filter(pl.col("disease_id").is_in(list(by_id))), n_maps, per_class)
    row_of = {d: i for i, d in enumerate(chosen_maps["disease_id"].unique(maintain_order=True).to_list())}
    seen: dict[tuple[str, int], int] = {}
    for r in chosen_maps.iter_rows(named=True):
        # one row per disease: its positives in the first per_class columns, its negatives after
        k = seen[r["disease_id"], r["label"]] = seen.get((r["disease_id"], r["label"]), -1) + 1
        slots.append(row_of[r["disease_id"]] * 2 * per_class + (0 if r["label"] == 1 else per_class) + k)
        d = by_id[r["disease_id"]]
        case = paths_of[r["case_id"]]
        img, anat_map, _, boxes = load_case(case)
        hu_range = tuple(json.loads(case.meta.read_text(encoding="utf-8")).get("hu_window", PREPROCESS_HU))
        # the disease's lesion voxels where the cohort wrote them (the demo's lesions/), else None
        lesion = lesion_mask(case, lesions_dir, d.id) if r["label"] == 1 else None
        if crop_size is not None and d.anatomy in (boxes or {}):
            sl = anatomy_crop(boxes[d.anatomy], img.shape, crop_size)
            img, anat_map = img[sl], anat_map[sl]
            lesion = None if lesion is None else lesion[sl]
        img, anat_map = np.asarray(img, np.float32), np.asarray(anat_map)
        style = r.get("prompt_style")  # the one the evaluation chose on validation
        amap = activation_map(model, img, anat_map, d, device, mode=map_mode, prompt_style=style)
        status = "positive" if r["label"] == 1 else "negative"
        items.append(MapPanel(f"{d.name}: {status}, {r['case_id']} (score {r['score']:.2f})", img, amap,
                              anat_map == catalog.anatomy_by_name(d.anatomy).index, d.anatomy, lesion, hu_range))
    n_lesion = sum(it.lesion is not None and bool(it.lesion.any()) for it in items)
    log.info("figures: %d of %d activation-map panels slice through a recorded lesion", n_lesion, len(items))
    where = ("slice through the lesion (yellow outline) where the cohort records its voxels, else through the "
             "anatomy's centre" if n_lesion else
             "slice through the anatomy's centre (the cohort records no lesion voxels)")
    paths["activation_maps"] = plot_activation_maps(
        items, out_dir / "activation_maps.png", ncols=2 * per_class, slots=slots,
        title=f"Visual activation maps, test split: per disease the first {per_class} positive and {per_class} "
              "negative cases by case id (chosen without scores)\ncos(token embedding, positive prompt) inside the "
              f"anatomy (white outline); red > 0 > blue, one scale;\n{where}")
    return paths

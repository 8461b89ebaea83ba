"""Figures of the paper's kind from a trained model and its zero-shot predictions.

Each figure is a data function (numbers, tested) and a plotting function writing one PNG:

- ROC curves per organ (test split)                     ``roc_curves`` / ``plot_roc_per_organ``
- t-SNE of normal vs abnormal anatomy embeddings, Fig. 3 ``anatomy_embeddings`` / ``plot_tsne``
- vision-token activations w/o and w/ VSDB, Fig. 5     ``token_activations`` / ``plot_activation_histograms``
- visual activation maps, Fig. 4                        ``activation_map`` / ``plot_activation_maps``

``make_all`` writes all of them for one model folder. Plotting uses matplotlib's object API
(``matplotlib.figure.Figure``, rendered by Agg), never pyplot, so no global backend is touched.
Every PNG is ``figsize * DPI`` pixels (no tight bounding box).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from .. import catalog
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


def plot_roc_per_organ(pred: pl.DataFrame, out_png) -> Path:
    """One panel per organ, one ROC curve per disease (AUC and positives/n in the legend)."""
    curves = roc_curves(pred)
    n_all = pred.filter(pl.col("split") == "test")["disease_id"].n_unique()
    n_shown = sum(len(v) for v in curves.values())
    fig, axes = _figure(len(curves), 3)
    if not curves:
        axes[0].text(0.5, 0.5, "no disease has both classes\namong its evaluable test cases",
                     ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, (organ, rows) in zip(axes, curves.items()):
        for c in rows:
            ax.step(c.fpr, c.tpr, where="post", lw=1.6,
                    label=f"{c.disease}: AUC {c.auc:.3f} ({c.n_pos}+ / {c.n})")
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="chance")
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal",
               xlabel="1 - specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)")
        ax.set_title(f"{organ} (test cases: n = {max(c.n for c in rows)})", fontsize=11)
        ax.legend(loc="lower right", fontsize=7.5)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Zero-shot ROC per organ, test split, evaluable cases ({n_shown} of {n_all} diseases "
                 "have both classes)", fontsize=12)
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


def plot_tsne(x, normal, anatomy, out_png, seed: int = 0, title: str = "model", compare: dict | None = None,
              max_labels: int = 12) -> Path:
    """Fig. 3: t-SNE of anatomy embeddings, normal blue, abnormal red; each of the max_labels most
    frequent anatomies named at the median of its points. compare {title: (X, normal, anatomy)}:
    further panels (e.g. a baseline model) drawn before this one, each its own t-SNE."""
    panels = [*(compare or {}).items(), (title, (x, normal, anatomy))]
    fig, axes = _figure(len(panels), 3, panel=(6.0, 5.6))
    for ax, (name, (xx, nn, aa)) in zip(axes, panels):
        nn, aa = np.asarray(nn, bool), np.asarray(aa, dtype=object)
        y = tsne_2d(xx, seed)
        ax.scatter(*y[nn].T, s=12, c=NORMAL_COLOR, alpha=0.75, lw=0, label=f"normal ({int(nn.sum())})")
        ax.scatter(*y[~nn].T, s=12, c=ABNORMAL_COLOR, alpha=0.75, lw=0, label=f"abnormal ({int((~nn).sum())})")
        names, counts = np.unique(aa, return_counts=True)
        for a in names[np.argsort(-counts, kind="stable")][:max_labels]:
            cx, cy = np.median(y[aa == a], axis=0)
            ax.annotate(str(a).replace("_", " "), (cx, cy), fontsize=7, color="0.2", ha="center",
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.6, "lw": 0})
        ax.set_title(f"{name}: n = {len(nn)} anatomy embeddings\n({len(names)} anatomies, "
                     f"perplexity {min(30, len(nn) - 1)})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=8, markerscale=2)
    fig.suptitle("t-SNE of normal (blue) and abnormal (red) anatomy embeddings", fontsize=12)
    return _save(fig, out_png)


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


@dataclass
class MapPanel:
    """One panel of ``plot_activation_maps``: image and map (X, Y, Z), the anatomy's voxels (bool)."""
    title: str
    image: np.ndarray
    amap: np.ndarray
    mask: np.ndarray


def centre_slice(mask: np.ndarray) -> int:
    """Axial (z) index through the mask's centroid; the slice with most voxels if that one is empty."""
    zs = np.nonzero(mask)[2]
    z = round(float(zs.mean()))
    return z if mask[:, :, z].any() else int(np.bincount(zs).argmax())


def plot_activation_maps(items: list[MapPanel], out_png) -> Path:
    """Fig. 4: per (case, disease), the axial slice through the anatomy's centre (arrays are LPS
    (x, y, z): shown radiologically, patient right on the left, anterior up), the map overlaid
    (alpha 0.55, colour range = the map's range in the volume) and the anatomy's outline."""
    fig, axes = _figure(len(items), 3, panel=(4.6, 4.4))
    for ax, it in zip(axes, items):
        z = centre_slice(it.mask)
        ax.imshow(np.asarray(it.image[:, :, z], np.float32).T, cmap="gray", vmin=0, vmax=1, origin="upper",
                  interpolation="nearest")
        vals = it.amap[np.isfinite(it.amap)]
        lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (-1.0, 1.0)
        if hi <= lo:
            lo, hi = lo - 1e-3, hi + 1e-3
        over = ax.imshow(it.amap[:, :, z].T, cmap="jet", alpha=0.55, vmin=lo, vmax=hi, origin="upper",
                         interpolation="nearest")
        ax.contour(it.mask[:, :, z].T.astype(float), levels=[0.5], colors="white", linewidths=0.8)
        fig.colorbar(over, ax=ax, fraction=0.046, pad=0.02, label="cosine similarity")
        ax.set_title(f"{it.title}\naxial z = {z}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if not items:
        axes[0].text(0.5, 0.5, "no positive test case to show", ha="center", va="center")
        axes[0].set_axis_off()
    fig.suptitle("Visual activation maps: cos(token embedding, positive prompt) inside the disease's anatomy",
                 fontsize=11)
    return _save(fig, out_png)


# ---- all figures ----------------------------------------------------------------------------------
def top_positive_cases(pred: pl.DataFrame, n: int) -> pl.DataFrame:
    """For each disease, its evaluable positive test case with the highest score; then the n
    diseases whose such case scores highest (case_id, disease_id, disease, anatomy, score)."""
    pos = pred.filter((pl.col("split") == "test") & pl.col("evaluable") & (pl.col("label") == 1)
                      & pl.col("score").is_not_null())
    best = pos.sort(["score", "case_id"], descending=[True, False]).unique("disease_id", keep="first",
                                                                           maintain_order=True)
    extra = ["prompt_style"] if "prompt_style" in best.columns else []
    return best.head(n).select("case_id", "disease_id", "disease", "anatomy", "score", *extra)


def make_all(model_dir, predictions, cases_table, ground_truth, out_dir, disease_catalog: str,
             device="auto", baseline_model_dir=None, n_cases: int = 100, n_hist_cases: int = 20,
             n_maps: int = 6, hist_anatomies=None, crop_size=None, seed: int = 0,
             map_mode: str = "nearest") -> dict[str, Path]:
    """Write roc_per_organ.png, tsne.png, activation_histograms.png (model with a VQ-VAE only) and
    activation_maps.png into out_dir; returns {name: path}.

    Cases: the test cases of ``cases_table`` (qc/cases.parquet) with ground truth, n_cases of them drawn at random (seed) for the
    t-SNE, the first n_hist_cases of those for the histograms. Histogram anatomies: hist_anatomies, or
    the anatomies of the catalog's zero-shot diseases, at most six. Maps: ``top_positive_cases``
    (each disease's best-scored positive test case; the n_maps best). baseline_model_dir (e.g. the
    phase-2 model, w/o VSDB): a second t-SNE panel and a third histogram series.
    crop_size: as ``zeroshot.predict`` (None = whole volumes, else anatomy-centred crops; the maps
    then show the crop). map_mode: ``activation_map``'s upsampling.
    """
    truth = read_ground_truth(ground_truth)  # before anything is loaded or written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(device)
    pred = read_parquet(predictions)
    paths = {"roc_per_organ": plot_roc_per_organ(pred, out_dir / "roc_per_organ.png")}

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
    items = []
    for r in top_positive_cases(pred.filter(pl.col("disease_id").is_in(list(by_id))), n_maps).iter_rows(named=True):
        d = by_id[r["disease_id"]]
        img, anat_map, _, boxes = load_case(paths_of[r["case_id"]])
        if crop_size is not None and d.anatomy in (boxes or {}):
            sl = anatomy_crop(boxes[d.anatomy], img.shape, crop_size)
            img, anat_map = img[sl], anat_map[sl]
        img, anat_map = np.asarray(img, np.float32), np.asarray(anat_map)
        style = r.get("prompt_style")  # the one the evaluation chose on validation
        amap = activation_map(model, img, anat_map, d, device, mode=map_mode, prompt_style=style)
        items.append(MapPanel(f"{r['case_id']}: {d.name} (score {r['score']:.2f})", img, amap,
                              anat_map == catalog.anatomy_by_name(d.anatomy).index))
    paths["activation_maps"] = plot_activation_maps(items, out_dir / "activation_maps.png")
    return paths

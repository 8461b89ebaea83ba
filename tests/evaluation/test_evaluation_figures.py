"""Figures (ctvlp.evaluation.figures): each figure's numbers checked against an independent computation, and
each PNG read back with the pixel size its figure asks for."""

import shutil

import numpy as np
import polars as pl
import pytest
import torch
from matplotlib.image import imread
from sklearn.metrics import roc_auc_score, roc_curve

from ctvlp import catalog
from ctvlp.evaluation import figures
from ctvlp.evaluation.embed import embed_cases
from ctvlp.imaging.storage import case_paths, paths_from, with_folders
from ctvlp.model.config import ModelConfig
from ctvlp.model.io import build_model, save_model
from ctvlp.model.zeroshot import prompt_embedding

MODEL = ModelConfig.from_settings(widths=[4, 8, 8, 16], embed_dim=16, heads=2, text_max_length=32, token_stage=3,
                                  vq_codes=4, vq_dim=16, vq_depth=1, vq_heads=2)
DPI = figures.DPI


@pytest.fixture(scope="module")
def vq_model():
    torch.manual_seed(0)
    return build_model(MODEL).eval()


def _tiny(tiny_cohort, case_ids):
    """The tiny cohort's files of these cases."""
    paths = paths_from(pl.read_parquet(tiny_cohort["cases"]))
    return [paths[c] for c in case_ids]


def _results_copy(tiny_cohort, root, case_ids):
    """The tiny cohort's cases copied under root, their meta.json given the anatomy boxes that
    `ctvlp preprocess` writes (the shared fixture has none); -> {case_id: its files}."""
    import json

    out = {}
    for src in _tiny(tiny_cohort, case_ids):
        cid = src.case_id
        dst = out[cid] = case_paths(cid, root / "segment" / cid, root / "preprocessed" / cid)
        shutil.copytree(src.image.parent, dst.image.parent)
        shutil.copytree(src.table.parent, dst.table.parent)
        anat = np.load(dst.anatomy)
        meta = json.loads(dst.meta.read_text(encoding="utf-8"))
        meta["anatomy_bbox"] = {a.name: [int(v) for ax in np.nonzero(anat == a.index) for v in (ax.min(), ax.max())]
                                for a in catalog.anatomies() if (anat == a.index).any()}
        dst.meta.write_text(json.dumps(meta), encoding="utf-8")
    return out


def _png(path, height_in, width_in):
    img = imread(path)
    assert img.shape[:2] == (round(height_in * DPI), round(width_in * DPI))
    assert img[..., :3].std() > 0.01  # something was drawn
    return img


def _anat_index(name):
    return catalog.anatomy_by_name(name).index


# ---- ROC ----------------------------------------------------------------------------------------
def _random_predictions(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    spec = [("d1", "liver"), ("d2", "liver"), ("one_class", "liver"), ("d3", "kidney"), ("val_only_pos", "kidney")]
    for i in range(60):
        split = "test" if i < 40 else "val"
        for d, organ in spec:
            label = int(rng.random() < 0.3)
            if d == "one_class" and split == "test":
                label = 0
            if d == "val_only_pos":
                label = int(split == "val")
            ok = rng.random() > 0.1
            rows.append({"case_id": f"c{i}", "split": split, "disease_id": d, "disease": d.upper(), "anatomy": organ,
                         "organ": organ, "type": "local", "evaluable": ok, "reason": None,
                         "score": float(np.clip(0.3 * label + rng.random() * 0.8, 0, 1)) if ok else None,
                         "label": label})
    return pl.DataFrame(rows)


def test_roc_curves_match_sklearn_and_skip_one_class_diseases():
    pred = _random_predictions()
    curves = figures.roc_curves(pred)
    assert list(curves) == ["liver", "kidney"]
    assert [c.disease for c in curves["liver"]] == ["D1", "D2"]  # one_class has only negatives in test
    assert [c.disease for c in curves["kidney"]] == ["D3"]  # val_only_pos has positives only in val
    for rows in curves.values():
        for c in rows:
            t = pred.filter((pl.col("disease") == c.disease) & (pl.col("split") == "test") & pl.col("evaluable"))
            y, s = t["label"].to_numpy(), t["score"].to_numpy()
            fpr, tpr, _ = roc_curve(y, s)
            np.testing.assert_array_equal(c.fpr, fpr)
            np.testing.assert_array_equal(c.tpr, tpr)
            assert c.auc == pytest.approx(roc_auc_score(y, s))
            assert (c.n_pos, c.n) == (int(y.sum()), len(y))
            assert c.n < 40  # non-evaluable rows left out


def test_plot_roc_per_organ_png(tmp_path):
    out = figures.plot_roc_per_organ(_random_predictions(), tmp_path / "roc.png", {"d1": 0.5, "d3": 0.4},
                                     n_resamples=50)
    _png(out, 4.5, 2 * 5.0)  # two organs: one row of two 5 x 4.5 in panels


def test_operating_point_is_the_thresholds_test_sensitivity_and_fpr():
    pred = _random_predictions()
    t = pred.filter((pl.col("disease_id") == "d1") & (pl.col("split") == "test") & pl.col("evaluable"))
    y, s = t["label"].to_numpy(), t["score"].to_numpy()
    fpr, sens = figures.operating_point(pred, "d1", 0.5)
    assert sens == pytest.approx(((s >= 0.5) & (y == 1)).sum() / (y == 1).sum())
    assert fpr == pytest.approx(((s >= 0.5) & (y == 0)).sum() / (y == 0).sum())
    assert figures.operating_point(pred, "d1", float("nan")) is None
    assert figures.operating_point(pred, "one_class", 0.5) is None  # no positive among test rows


def test_roc_band_brackets_the_curve():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(30), np.zeros(50)].astype(int)
    s = rng.normal(y * 1.0, 1.0)
    grid, lo, hi = figures.roc_band(y, s, n_resamples=300, seed=0)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    curve = tpr[np.searchsorted(fpr, grid, side="right") - 1]
    assert (lo <= hi).all() and (hi - lo).max() > 0.1  # a band, not a line
    inside = (lo - 1e-9 <= curve) & (curve <= hi + 1e-9)
    assert inside.mean() > 0.9  # the observed curve lies within its own bootstrap band
    assert lo[0] >= 0 and hi[-1] == pytest.approx(1.0)


# ---- t-SNE of anatomy embeddings -----------------------------------------------------------------
def test_anatomy_embeddings_rows_and_normal_flags(tiny_cohort, vq_model, tmp_path):
    copies = _results_copy(tiny_cohort, tmp_path / "results", ["tiny_00", "tiny_01", "tiny_02"])
    table = copies["tiny_01"].table  # trachea incomplete in tiny_01
    pl.read_parquet(table).with_columns(
        pl.when(pl.col("anatomy") == "trachea").then(False).otherwise(pl.col("complete")).alias("complete")
    ).write_parquet(table)
    gt = pl.DataFrame([
        ("tiny_00", "a", "lung", 0), ("tiny_00", "b", "lung", 1), ("tiny_00", "c", "heart", 0),
        ("tiny_00", "d", "liver", 1),  # liver absent from the tiny volumes
        ("tiny_01", "a", "lung", 0), ("tiny_01", "b", "lung", 0), ("tiny_01", "e", "trachea", 1),
        ("tiny_01", "c", "heart", None),  # no label: no row
        ("tiny_02", "f", "aorta", 0),
        ("tiny_07", "a", "lung", 1),  # not asked for
    ], schema={"case_id": pl.Utf8, "disease_id": pl.Utf8, "anatomy": pl.Utf8, "label": pl.Int8}, orient="row")
    cases = [copies[c] for c in ("tiny_00", "tiny_01", "tiny_02")]
    x, normal, anatomy = figures.anatomy_embeddings(vq_model, cases, gt, "cpu")
    assert anatomy.tolist() == ["lung", "heart", "lung", "aorta"]
    assert normal.tolist() == [False, True, True, True]
    assert x.shape == (4, MODEL.embed_dim)
    emb = embed_cases(vq_model, cases, "cpu")
    np.testing.assert_allclose(x[1], emb["tiny_00"][0][_anat_index("heart") - 1], rtol=1e-6)
    np.testing.assert_allclose(x[3], emb["tiny_02"][0][_anat_index("aorta") - 1], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)


def test_plot_tsne_png_blue_normal_red_abnormal(tmp_path):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (25, 8)), rng.normal(4, 1, (15, 8))])
    normal = np.arange(40) < 25
    anatomy = np.array(["liver", "kidney"] * 20, dtype=object)
    out = figures.plot_tsne(x, normal, anatomy, tmp_path / "tsne.png", seed=0,
                            compare={"baseline": (x[::-1], normal[::-1], anatomy[::-1])})
    img = _png(out, 5.6, 2 * 6.0)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    assert ((b > 0.7) & (r < 0.45) & (b - g > 0.25)).sum() > 50  # normal points, blue
    assert ((r > 0.7) & (g < 0.45) & (b < 0.45)).sum() > 50  # abnormal points, red
    # the anatomies are named in one legend, never written over the points
    fig = figures.tsne_figure(x, normal, anatomy, seed=0)
    assert all(not ax.texts for ax in fig.axes)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["normal", "abnormal", "kidney", "liver"]
    with pytest.raises(ValueError, match="at least 3"):
        figures.tsne_2d(x[:2])


# ---- token activations (Fig. 5) ------------------------------------------------------------------
def _expected_tokens(model, cases, name):
    """The anatomy's feature-map tokens straight from the vision encoder: the cells holding any of
    its voxels (cell = floor(voxel * feature size / volume size)), in flattened feature order."""
    j = _anat_index(name)
    out = []
    for p in cases:
        img, anat = np.load(p.image).astype(np.float32), np.load(p.anatomy)
        with torch.no_grad():
            feats = model.vision(torch.from_numpy(img)[None, None])[0]  # (C, fx, fy, fz)
        fs = feats.shape[1:]
        vox = np.argwhere(anat == j)
        cells = np.unique(np.ravel_multi_index(tuple(vox[:, k] * fs[k] // anat.shape[k] for k in range(3)), fs))
        out.append(feats.flatten(1)[:, cells].T.numpy())
    return np.concatenate(out)


def test_token_activations_identity_at_init_then_differ(tiny_cohort, vq_model):
    cases = _tiny(tiny_cohort, ["tiny_00", "tiny_01"])
    acts = figures.token_activations(vq_model, cases, ["lung", "heart"], "cpu")
    assert set(acts) == {"lung", "heart"}
    c = vq_model.vision.out_channels
    for name, (f, f_hat) in acts.items():
        expected = _expected_tokens(vq_model, cases, name)
        assert f.shape == f_hat.shape == expected.shape and f.shape[1] == c
        assert f.size == len(expected) * c  # the anatomy's tokens x channels
        np.testing.assert_allclose(f, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(f_hat, f)  # zero-initialised last layer: perception is the identity
    last = vq_model.perception.mlp[-1]
    saved = last.weight.detach().clone()
    try:
        with torch.no_grad():
            last.weight.normal_(0, 0.1)
        moved = figures.token_activations(vq_model, cases, ["heart"], "cpu")["heart"]
    finally:
        with torch.no_grad():
            last.weight.copy_(saved)
    np.testing.assert_array_equal(moved[0], acts["heart"][0])  # f itself does not change
    assert not np.allclose(moved[1], moved[0])


def test_token_activations_need_a_vq_model(tiny_cohort):
    from types import SimpleNamespace

    no_vq = SimpleNamespace(vqvae=None, perception=None)  # what a model built with vq_codes=0 holds
    with pytest.raises(ValueError, match="VQ-VAE"):
        figures.token_activations(no_vq, _tiny(tiny_cohort, ["tiny_00"]), ["lung"], "cpu")


def test_plot_activation_histograms_png_and_near_zero_fraction(tmp_path):
    rng = np.random.default_rng(0)
    f = np.maximum(rng.normal(0.3, 0.5, (50, 16)), 0)
    acts = {"lung": (f, f * 0.1), "heart": (f[:20], f[:20] - 0.2)}
    assert figures.near_zero_fraction(np.array([0.0, 0.04, -0.049, 0.05, -1.0])) == pytest.approx(0.6)
    out = figures.plot_activation_histograms(acts, tmp_path / "h.png", baseline={"lung": f + 1})
    _png(out, 4.2, 2 * 5.2)


# ---- activation maps (Fig. 4) --------------------------------------------------------------------
def _synthetic_volume():
    rng = np.random.default_rng(1)
    shape = (26, 21, 30)  # not multiples of the stride: padding and cropping are exercised
    anat = np.zeros(shape, np.uint8)
    anat[3:17, 4:15, 5:24] = _anat_index("heart")
    anat[18:25, 2:20, 2:28] = _anat_index("lung")
    img = (rng.random(shape) * 0.5 + (anat > 0) * 0.3).astype(np.float32)
    return img, anat


def test_activation_map_nan_outside_cosine_inside(vq_model):
    img, anat = _synthetic_volume()
    heart = anat == _anat_index("heart")
    maps = {}
    for mode, pool in (("nearest", False), ("trilinear", False), ("nearest", True)):
        m = figures.activation_map(vq_model, img, anat, "cardiomegaly", "cpu", mode=mode, single_token_pool=pool)
        assert m.shape == img.shape
        assert np.array_equal(np.isnan(m), ~heart)
        assert np.isfinite(m[heart]).all() and (np.abs(m[heart]) <= 1).all()
        assert m[heart].std() > 0  # the anatomy spans several feature cells
        maps[mode, pool] = m
    # nearest: every voxel takes cos(vis_proj_j(its cell's token), positive prompt), computed here
    # straight from the vision encoder on the zero-padded volume
    j = _anat_index("heart") - 1
    stride = vq_model.vision.stride
    padded = np.pad(img, [(0, (-s) % stride) for s in img.shape])
    with torch.no_grad():
        feats = vq_model.vision(torch.from_numpy(padded)[None, None])[0]
        fs = feats.shape[1:]
        vox = np.argwhere(heart)
        cells = tuple(torch.from_numpy(vox[:, k] * fs[k] // padded.shape[k]) for k in range(3))
        tok = feats[:, cells[0], cells[1], cells[2]].T
        emb = torch.nn.functional.normalize(tok @ vq_model.vis_proj.weight[j] + vq_model.vis_proj.bias[j], dim=-1)
        cardiomegaly = next(d for d in catalog.diseases("demo") if d.id == "cardiomegaly")
        expected = (emb @ prompt_embedding(vq_model, cardiomegaly.positive_prompts, j)).numpy()
    np.testing.assert_allclose(maps["nearest", False][heart], expected, atol=1e-5)
    # trilinear: convex combinations of the anatomy's cell values only
    near = maps["nearest", False][heart]
    assert near.min() - 1e-6 <= maps["trilinear", False][heart].min()
    assert maps["trilinear", False][heart].max() <= near.max() + 1e-6
    with pytest.raises(ValueError, match="absent"):
        figures.activation_map(vq_model, img, anat, "liver_cyst", "cpu")


def test_plot_activation_maps_png_one_diverging_scale(tmp_path):
    img, anat = _synthetic_volume()
    heart = anat == _anat_index("heart")
    amap = np.where(heart, np.linspace(-0.2, 0.4, img.size).reshape(img.shape), np.nan)
    items = [figures.MapPanel("case a: cardiomegaly", img, amap, heart, "heart"),
             figures.MapPanel("case b: cardiomegaly", img, -amap * 0.5, heart, "heart")]
    assert figures.centre_slice(heart) == 14
    # one scale: the largest |value| of any panel (panel a's, though panel b holds the larger negative)
    assert figures.map_limit(items) == pytest.approx(np.nanmax(np.abs(amap)))
    assert figures.map_limit(items[1:]) == pytest.approx(0.5 * np.nanmax(np.abs(amap)))
    out = figures.plot_activation_maps(items, tmp_path / "maps.png")
    img_png = _png(out, 3.4, 2 * 3.6)
    r, b = img_png[..., 0], img_png[..., 2]
    assert ((r > 0.6) & (b < 0.45) & (r - b > 0.3)).sum() > 30  # positive values: red
    assert ((b > 0.6) & (r < 0.45) & (b - r > 0.3)).sum() > 30  # negative values: blue
    # fixed grid cells: a positive in column 0 and a negative in column 2 of a 4-column row
    _png(figures.plot_activation_maps(items, tmp_path / "grid.png", ncols=4, slots=[0, 2]), 3.4, 4 * 3.6)
    _png(figures.plot_activation_maps(items, tmp_path / "grid2.png", ncols=4, slots=[0, 5]), 2 * 3.4, 4 * 3.6)
    with pytest.raises(ValueError, match="own grid cell"):
        figures.plot_activation_maps(items, tmp_path / "bad.png", slots=[1, 1])


def test_ct_window_per_anatomy_and_windowing():
    assert figures.ct_window("liver") == ("abdomen", 400, 40)
    assert figures.ct_window("lung") == ("lung", 1500, -600)
    assert figures.ct_window("lumbar_spine") == ("bone", 2000, 500)
    hu = np.array([-1000.0, -600.0, 40.0, 240.0, 1000.0])
    image = (hu + 1000) / 2000  # as preprocess scales hu_window [-1000, 1000]
    np.testing.assert_allclose(figures.window_image(image, (1500, -600)), [350 / 1500, 0.5, 1390 / 1500, 1, 1], atol=1e-6)
    np.testing.assert_allclose(figures.window_image(image, (400, 40)), [0, 0, 0.5, 1, 1], atol=1e-6)


def test_panel_slice_goes_through_the_lesion_where_known():
    img, anat = _synthetic_volume()
    heart = anat == _anat_index("heart")
    lesion = np.zeros_like(heart)
    lesion[6:9, 6:9, 20:23] = True
    lesion[7, 7, 19] = True
    lesion[6:10, 6:10, 21] = True  # the lesion's largest slice
    amap = np.where(heart, 0.1, np.nan)
    assert figures.panel_slice(figures.MapPanel("a", img, amap, heart, "heart", lesion)) == (21, "through the lesion")
    assert figures.panel_slice(figures.MapPanel("a", img, amap, heart, "heart")) == (14, "anatomy centre")


def test_map_cases_first_positives_and_negatives_by_case_id_whatever_the_scores():
    pred = _random_predictions(1)
    chosen = figures.map_cases(pred, 2, per_class=2)
    shuffled = pred.with_columns(pl.Series("score", np.random.default_rng(9).random(len(pred))))
    assert figures.map_cases(shuffled, 2, per_class=2).drop("score").equals(chosen.drop("score"))
    assert chosen["disease_id"].unique(maintain_order=True).to_list() == ["d1", "d2"]
    for did in ("d1", "d2"):
        t = pred.filter((pl.col("disease_id") == did) & (pl.col("split") == "test") & pl.col("evaluable")).sort("case_id")
        got = chosen.filter(pl.col("disease_id") == did)
        assert got["label"].to_list() == [1, 1, 0, 0]
        assert got["case_id"].to_list() == (t.filter(pl.col("label") == 1)["case_id"].to_list()[:2]
                                            + t.filter(pl.col("label") == 0)["case_id"].to_list()[:2])
    assert "one_class" not in figures.map_cases(pred, 10)["disease_id"].to_list()


# ---- training curves -----------------------------------------------------------------------------
def _metrics_csv(path):
    rows = ["phase,step,epoch,split,loss,lr,samples_per_s,grad_norm,pairs"]
    step = 0
    for epoch in range(3):
        for _ in range(5):
            step += 1
            rows.append(f"align,{step},{epoch},train,{4 - 0.1 * step:.4f},{1e-3 * min(1, step / 4):.4e},2.0,1.0,9")
        rows.append(f"align,{step},{epoch},val,{3.5 - 0.2 * epoch:.4f},,,,")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_training_curves_read_loss_validation_and_lr(tmp_path):
    c = figures.training_curves(_metrics_csv(tmp_path / "metrics.csv"))
    assert c["step"].tolist() == list(range(1, 16))
    assert c["loss"][0] == pytest.approx(3.9) and c["lr"][3] == pytest.approx(1e-3) and c["lr"][0] == pytest.approx(2.5e-4)
    assert c["val_step"].tolist() == [5, 10, 15] and c["val_loss"].tolist() == pytest.approx([3.5, 3.3, 3.1])
    assert c["epoch_end"].tolist() == [5, 10, 15]
    out = figures.plot_training_curves(tmp_path / "metrics.csv", tmp_path / "curves.png", "align")
    _png(out, 3.8, 2 * 5.4)


# ---- tables for the report -----------------------------------------------------------------------
def test_html_table_holds_the_numbers_as_formatted_and_sorts(tmp_path):
    from ctvlp.htmltable import write_html_table

    df = pl.DataFrame({"disease_id": ["b", "a", "mean"], "auc": [0.81234, float("nan"), 0.8], "n": [3, 10, 13],
                       "note": ["<x>", None, ""]})
    df.write_csv(tmp_path / "t.csv")
    html = write_html_table(tmp_path / "t.csv", tmp_path / "t.html", "Zero-shot", "a note",
                            "disease_id").read_text(encoding="utf-8")
    assert "<td class=\"num\" data-v=\"0.81234\">0.812</td>" in html  # as the Markdown table formats it
    assert "<td>n/a</td>" in html and "&lt;x&gt;" in html and "<x>" not in html
    assert '<tr class="summary">' in html and html.count("<tr") == 4
    assert "addEventListener(\"click\"" in html and "src=" not in html  # sorts, self-contained


def test_make_all_writes_every_figure(tiny_cohort, vq_model, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_model(vq_model, model_dir, {})
    man = pl.read_parquet(tiny_cohort["cases"]).with_columns(
        pl.when(pl.col("case_id") >= "tiny_03").then(pl.lit("test")).otherwise(pl.col("split")).alias("split"))
    diseases = [d for d in catalog.diseases("demo") if d.anatomy in ("lung", "heart")]
    rng = np.random.default_rng(0)
    gt, pred = [], []
    for cid, split in man.select("case_id", "split").iter_rows():
        for d in diseases:
            label = int(rng.random() < 0.4)
            gt.append({"case_id": cid, "disease_id": d.id, "anatomy": d.anatomy, "label": label})
            if split == "test":
                pred.append({"case_id": cid, "split": split, "disease_id": d.id, "disease": d.name,
                             "anatomy": d.anatomy, "organ": d.organ, "type": d.type, "evaluable": True,
                             "reason": None, "score": float(rng.random()), "label": label})
    pl.DataFrame(gt).with_columns(pl.col("label").cast(pl.Int8)).write_parquet(tmp_path / "gt.parquet")
    pl.DataFrame(pred).write_parquet(tmp_path / "pred.parquet")
    _results_copy(tiny_cohort, tmp_path / "results", man["case_id"].to_list())
    with_folders(man.drop("segment_dir", "preprocessed_dir"), tmp_path / "results" / "segment",
                 tmp_path / "results" / "preprocessed").write_parquet(tmp_path / "cases.parquet")
    paths = figures.make_all(model_dir, tmp_path / "pred.parquet", tmp_path / "cases.parquet",
                             tmp_path / "gt.parquet", tmp_path / "fig", "demo", device="cpu", n_cases=4,
                             n_hist_cases=2, n_maps=2, training={"align": _metrics_csv(tmp_path / "metrics.csv")})
    assert set(paths) == {"roc_per_organ", "tsne", "activation_histograms", "activation_maps", "training_align"}
    shown = figures.map_cases(pl.read_parquet(tmp_path / "pred.parquet"), 2)
    rows = shown["disease_id"].n_unique()
    assert rows == 2 and len(shown) > 4  # two diseases, positives and negatives
    _png(paths["activation_maps"], rows * 3.4, 4 * 3.6)
    _png(paths["training_align"], 3.8, 2 * 5.4)
    _png(paths["activation_histograms"], 4.2, 2 * 5.2)  # demo catalog anatomies in the volumes: lung, heart
    _png(paths["tsne"], 5.6, 6.0)

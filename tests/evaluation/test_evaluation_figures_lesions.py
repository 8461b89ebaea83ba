"""Activation maps through the lesion (issue 21): the demo cohort's lesion label maps, resampled by
``figures.lesion_mask`` onto a case's preprocessed grid, land on the lesion, and ``make_all`` hands
them to the positive panels (negatives and cohorts without lesion maps keep the anatomy's centre)."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from scipy import ndimage

from ctvlp import catalog
from ctvlp.cohort import demo
from ctvlp.config import validate
from ctvlp.evaluation import figures
from ctvlp.imaging import preprocess, segment
from ctvlp.imaging.storage import case_paths, paths_from, with_folders
from ctvlp.model.config import ModelConfig
from ctvlp.model.io import build_model, save_model

SEED = 0
PRE = validate({"preprocess": {"spacing": [2.5, 2.5, 5.0]}})["preprocess"]
# case 0: kidney cyst, lung nodule and adrenal nodule (local), kidney atrophy (diffuse); case 3: no local lesion
POSITIVE, NEGATIVE = "demo_0000", "demo_0003"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A 4-case demo cohort; cases 0 and 3 segmented (the cohort's masks) and preprocessed."""
    root = tmp_path_factory.mktemp("lesion_figures")
    manifest = pl.read_parquet(demo.write_cohort(root / "cohort", 4, SEED))
    cfg = {"backend": "phantom", "class_version": "v2", "min_voxels": 10, "preprocess": PRE}
    for row in manifest.filter(pl.col("case_id").is_in([POSITIVE, NEGATIVE])).iter_rows(named=True):
        seg, pre = root / "segment" / row["case_id"], root / "preprocessed" / row["case_id"]
        segment.segment_case(row, cfg, seg)
        preprocess.preprocess_case(row, seg / "anatomy.nii.gz", PRE, pre)
    cases = with_folders(manifest.filter(pl.col("case_id").is_in([POSITIVE, NEGATIVE])).select("case_id", "split"),
                         root / "segment", root / "preprocessed")
    cases.write_parquet(root / "cases.parquet")
    return {"root": root, "paths": paths_from(cases), "lesions": root / "cohort" / demo.LESIONS_DIR}


def _world_lps(ijk, affine):
    """Voxel indices -> world coordinates, LPS (ITK's frame)."""
    xyz = affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]
    return xyz * np.array([-1.0, -1.0, 1.0])


def test_lesion_mask_lands_on_the_lesion_after_resampling(results):
    paths = results["paths"][POSITIVE]
    meta = json.loads(paths.meta.read_text(encoding="utf-8"))
    anat = np.load(paths.anatomy)
    case = demo.generate_case(0, SEED)
    grid = np.asarray(meta["direction"]).reshape(3, 3) @ np.diag(meta["spacing"])
    for d in ("kidney_cyst", "lung_nodule", "adrenal_nodule"):
        disease = catalog.diseases("demo")[[x.id for x in catalog.diseases("demo")].index(d)]
        m = figures.lesion_mask(paths, results["lesions"], d)
        assert m is not None and m.shape == anat.shape and m.dtype == bool, d
        z, how = figures.panel_slice(figures.MapPanel("t", anat, anat.astype(float), anat > 0, disease.anatomy, m))
        assert how == "through the lesion" and m[:, :, z].any(), d
        # on the disease's anatomy: most lesion voxels carry its anatomy index (a flipped axis would not)
        inside = (anat[m] == catalog.anatomy_by_name(disease.anatomy).index).mean()
        assert inside > 0.6, (d, inside)
        # and where each rendered lesion is: its centre (world, LPS) falls on the mask or a voxel beside it
        near = ndimage.binary_dilation(m, np.ones((3, 3, 3), bool))
        for lz in case.lesions:
            if lz.disease_id == d:
                centre = _world_lps(np.argwhere(lz.mask).mean(axis=0), case.affine)
                ijk = np.rint(np.linalg.solve(grid, centre - np.asarray(meta["origin"]))).astype(int)
                assert near[tuple(ijk)], (d, ijk)


def test_lesion_mask_none_without_the_disease_its_map_or_its_grid(results, tmp_path):
    paths = results["paths"]
    assert figures.lesion_mask(paths[POSITIVE], results["lesions"], "liver_cyst") is None  # not in this case
    assert figures.lesion_mask(paths[POSITIVE], results["lesions"], "kidney_atrophy") is None  # diffuse: not written
    assert figures.lesion_mask(paths[NEGATIVE], results["lesions"], "kidney_cyst") is None  # no map at all
    assert figures.lesion_mask(paths[POSITIVE], tmp_path / "no_lesions", "kidney_cyst") is None
    assert figures.lesion_mask(paths[POSITIVE], None, "kidney_cyst") is None
    old = case_paths(POSITIVE, tmp_path / "seg", tmp_path / "pre")  # meta.json of an older ctvlp: no grid
    old.meta.parent.mkdir(parents=True)
    old.meta.write_text(json.dumps({"case_id": POSITIVE}), encoding="utf-8")
    assert figures.lesion_mask(old, results["lesions"], "kidney_cyst") is None


@pytest.mark.parametrize("crop_size", [None, [32, 32, 32]])
def test_make_all_slices_positive_panels_through_the_lesion(results, tmp_path, monkeypatch, crop_size):
    """make_all finds lesions/ beside the ground truth (the cohort folder): the positive kidney-cyst
    panel carries the cyst (cropped like the image), the negative one none; the title says so."""
    root = results["root"]
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_settings(widths=[4, 8, 8, 16], embed_dim=16, heads=2, text_max_length=32,
                                                  token_stage=3, vq_codes=4, vq_dim=16, vq_depth=1, vq_heads=2))
    (tmp_path / "model").mkdir()
    save_model(model.eval(), tmp_path / "model", {})
    d = next(x for x in catalog.diseases("demo") if x.id == "kidney_cyst")
    cases = pl.read_parquet(root / "cases.parquet").with_columns(pl.lit("test").alias("split"))
    cases.write_parquet(tmp_path / "cases.parquet")
    pred = pl.DataFrame([{"case_id": c, "split": "test", "disease_id": d.id, "disease": d.name, "anatomy": d.anatomy,
                          "organ": d.organ, "type": d.type, "evaluable": True, "reason": None, "score": s,
                          "label": int(c == POSITIVE)} for c, s in ((POSITIVE, 0.7), (NEGATIVE, 0.2))])
    pred.write_parquet(tmp_path / "pred.parquet")
    shown = {}

    def capture(items, out_png, **kw):
        shown.update(items=items, title=kw["title"])
        return out_png

    monkeypatch.setattr(figures, "plot_activation_maps", capture)
    figures.make_all(tmp_path / "model", tmp_path / "pred.parquet", tmp_path / "cases.parquet",
                     root / "cohort" / "ground_truth.parquet", tmp_path / "fig", "demo", device="cpu", n_cases=2,
                     n_hist_cases=1, n_maps=1, crop_size=crop_size)
    pos, neg = shown["items"]
    assert "positive" in pos.title and "negative" in neg.title
    assert neg.lesion is None and pos.lesion is not None and pos.lesion.shape == pos.image.shape
    z, how = figures.panel_slice(pos)
    assert how == "through the lesion" and pos.lesion[:, :, z].any()
    assert (pos.mask[pos.lesion]).mean() > 0.6  # cropped like the anatomy mask: the cyst lies on the kidney
    assert "slice through the lesion (yellow outline)" in shown["title"]
    if crop_size is not None:
        return
    # without lesion maps (another cohort source): every panel through the anatomy's centre
    figures.make_all(tmp_path / "model", tmp_path / "pred.parquet", tmp_path / "cases.parquet",
                     root / "cohort" / "ground_truth.parquet", tmp_path / "fig2", "demo", device="cpu", n_cases=2,
                     n_hist_cases=1, n_maps=1, crop_size=crop_size, lesions_dir=tmp_path / "none")
    assert all(it.lesion is None for it in shown["items"])
    assert "the cohort records no lesion voxels" in shown["title"]

"""benchmarks/normality_anomaly.py: the VQ-VAE's row error as an anomaly score. The AUCs against
hand-made examples (the disease's anatomy only, ground-truth positives and negatives), a tiny
random-weight VQ-VAE whose codebook was set up on normal rows scoring rows far from it higher, and
the whole script on a tiny preprocessed cohort."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import normality_anomaly as na

from ctvlp import catalog
from ctvlp.model.normality import NormalityVQVAE

LIVER = catalog.anatomy_by_name("liver").index - 1


def test_disease_auc_uses_its_anatomy_and_the_ground_truth():
    # liver rows: errors 1..4, liver_cyst positives the cases with errors 2 and 4 -> AUC 0.75; the
    # kidney rows rank the other way round and must not count for a liver disease
    rows = pl.DataFrame({"case_id": ["a", "b", "c", "d"] * 2, "anatomy": ["liver"] * 4 + ["kidney"] * 4,
                         "status": ["normal"] * 8, "error": [1.0, 2.0, 3.0, 4.0, 9.0, 0.0, 9.0, 0.0]})
    truth = pl.DataFrame({"case_id": list("abcd") * 2, "disease_id": ["liver_cyst"] * 4 + ["kidney_cyst"] * 4,
                          "label": [0, 1, 0, 1, 1, 0, 0, 0]})
    table = na.disease_aucs(rows, truth).to_dicts()
    by = {r["disease_id"]: r for r in table}
    assert by["liver_cyst"]["auc"] == pytest.approx(0.75)
    assert (by["liver_cyst"]["positives"], by["liver_cyst"]["negatives"]) == (2, 2)
    assert by["liver_cyst"]["error_pos"] == pytest.approx(3.0) and by["liver_cyst"]["error_neg"] == pytest.approx(2.0)
    # kidney_cyst: case a (error 9) above b and d, tied with c -> 2.5 / 3
    assert by["kidney_cyst"]["auc"] == pytest.approx(2.5 / 3)
    # no labels of a disease (fatty_liver absent from truth) or one class only: no AUC, not an error
    assert np.isnan(by["fatty_liver"]["auc"]) and by["fatty_liver"]["positives"] == 0


def test_status_auc_by_report():
    rows = pl.DataFrame({"case_id": list("abcdef"), "anatomy": ["liver"] * 6,
                         "status": ["abnormal", "normal", "abnormal", "not_mentioned", "normal", "no_report_row"],
                         "error": [5.0, 1.0, 0.5, 6.0, 2.0, 100.0]})
    table = {r["anatomy"]: r for r in na.status_aucs(rows).to_dicts()}
    # abnormal {5, 0.5} vs normal {1, 2}: 5 beats both, 0.5 neither -> 0.5
    assert table["liver"]["auc_vs_normal"] == pytest.approx(0.5)
    # vs normal or unmentioned {1, 2, 6}: 5 beats 2 of 3, 0.5 none -> 2/6
    assert table["liver"]["auc_vs_normal_or_unmentioned"] == pytest.approx(2 / 6)
    assert table["all"]["rows"] == 6 and table["liver"]["abnormal"] == 2


def _rows(rng, n, offset, lengths, width=None):
    """n token rows of the liver (C = 8), row i with lengths[i % len] real tokens, N(offset, 1)."""
    width = width or max(lengths)
    tokens = torch.zeros(n, width, 8)
    pad = torch.zeros(n, width, dtype=torch.bool)
    for i in range(n):
        m = lengths[i % len(lengths)]
        tokens[i, :m] = torch.from_numpy(rng.normal(offset, 1.0, (m, 8))).float()
        pad[i, :m] = True
    return tokens, pad, torch.full((n,), LIVER)


def test_rows_far_from_the_codebook_score_higher():
    """A random-weight VQ-VAE whose codebook and standardisation come from normal rows (one training
    call): rows shifted far from those get the larger errors, and the disease AUC of those errors is
    the one roc_auc_score gives by hand, 1.0 here. Rows of different lengths, normal and abnormal
    interleaved: the bucketing reorders rows inside the VQ-VAE, and each error must stay with its row."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    vq = NormalityVQVAE(channels=8, codes=4, code_dim=8, depth=1, heads=2)
    vq.train()
    vq(*_rows(rng, 32, 0.0, [3, 7, 12]))  # sets up the liver codebook and the token statistics
    vq.eval()
    normal, abnormal = _rows(rng, 10, 0.0, [2, 9, 5], 11), _rows(rng, 10, 25.0, [6, 3, 11], 11)
    order = np.arange(20).reshape(2, 10).T.ravel()  # n0, a0, n1, a1, ...
    tokens, pad = torch.cat([normal[0], abnormal[0]])[order], torch.cat([normal[1], abnormal[1]])[order]
    usage_before = vq.usage.clone()
    errors, codes = na.score_rows(vq, tokens, pad, torch.full((20,), LIVER))
    assert torch.equal(vq.usage, usage_before)  # scoring changed nothing
    is_abnormal = (order >= 10).astype(int)
    assert errors[is_abnormal == 1].min() > 10 * errors[is_abnormal == 0].max()
    assert (codes[pad.numpy()] >= 0).all() and (codes[~pad.numpy()] == -1).all()
    rows = pl.DataFrame({"case_id": [f"c{i}" for i in range(20)], "anatomy": ["liver"] * 20,
                         "status": np.where(is_abnormal, "abnormal", "normal"), "error": errors})
    truth = pl.DataFrame({"case_id": [f"c{i}" for i in range(20)], "disease_id": ["liver_metastasis"] * 20,
                          "label": is_abnormal})
    auc = na.disease_aucs(rows, truth).filter(pl.col("disease_id") == "liver_metastasis")["auc"][0]
    assert auc == pytest.approx(roc_auc_score(is_abnormal, errors)) == pytest.approx(1.0)
    assert na.status_aucs(rows).filter(pl.col("anatomy") == "all")["auc_vs_normal"][0] == pytest.approx(1.0)
    # each row's error is the row's own: scoring one row alone gives the same number
    for i in (0, 1, 7):
        alone, _ = na.score_rows(vq, tokens[i:i + 1], pad[i:i + 1], torch.full((1,), LIVER))
        assert alone[0] == pytest.approx(errors[i], rel=1e-4)


def test_usage_counts():
    out = na.usage([np.array([0, 0, 1]), np.array([1, 3])], 5)
    assert out["codes_used"] == 3 and out["dead_codes"] == 2
    p = np.array([2, 2, 1]) / 5
    assert out["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert na.usage([], 4) == {"perplexity": 0.0, "codes_used": 0, "dead_codes": 4}


def test_script_on_a_tiny_cohort(tiny_cohort, tmp_path):
    """main() on a results folder built from the tiny cohort and a random-weight model with a
    VQ-VAE: every complete anatomy of each validation case is one row, in both crop modes."""
    from ctvlp.model.config import ModelConfig
    from ctvlp.model.io import build_model, save_model

    results = tmp_path / "results"
    for sub in ("qc", "reports", "cohort"):
        (results / sub).mkdir(parents=True)
    cases = pl.read_parquet(tiny_cohort["cases"])
    cases.write_parquet(results / "qc" / "cases.parquet")
    shutil.copy(tiny_cohort["reports"], results / "reports" / "reports.parquet")
    val_ids = cases.filter(pl.col("split") == "val")["case_id"].to_list()
    truth = [{"case_id": c, "disease_id": d.id, "anatomy": d.anatomy, "label": int(i % 2 == 0)}
             for i, c in enumerate(val_ids) for d in catalog.diseases("demo")]
    pl.DataFrame(truth).write_parquet(results / "cohort" / "ground_truth.parquet")
    config = ModelConfig.from_settings(widths=[4, 8, 8, 16], embed_dim=16, heads=2, text_max_length=32,
                                       token_stage=3, stem_stride=2, text_model=None, train_text_encoder=False,
                                       temperature=0.07, train_text_head=False, vq_codes=4, vq_dim=8, vq_depth=1,
                                       vq_heads=2)
    torch.manual_seed(0)
    model_dir = tmp_path / "normality"
    model_dir.mkdir()
    save_model(build_model(config), model_dir, {"phase": "normality", "train": {"crop_size": [32, 32, 48]},
                                                "normality": {"recon_normal": 0.5}})
    for crop in ("whole", "center"):
        diseases, anatomy = na.main(["--model", str(model_dir), "--results", str(results), "--crop", crop,
                                     "--device", "cpu", "--label", f"t_{crop}", "--out", str(tmp_path / "out")])
        assert anatomy.filter(pl.col("anatomy") == "all")["rows"][0] == len(val_ids) * 6
        lung = diseases.filter(pl.col("disease_id") == "emphysema").row(0, named=True)
        assert (lung["positives"], lung["negatives"]) == (1, 1) and 0 <= lung["auc"] <= 1
        assert set(anatomy.filter(pl.col("anatomy") != "all")["K"].to_list()) == {4}
        md = (tmp_path / "out" / f"normality_anomaly_t_{crop}.md").read_text(encoding="utf-8")
        assert "Machine:" in md and "Command:" in md and "recon_normal 0.5" in md
        assert (tmp_path / "out" / f"normality_anomaly_t_{crop}_anatomy.csv").exists()
    json.loads((model_dir / "config.json").read_text())  # the model folder is left as it was

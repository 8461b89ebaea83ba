import numpy as np
import polars as pl
import pytest
from sklearn import metrics as skm

from ctvlp.evaluation import metrics


def _pred(seed=0, n=120, diseases=("a", "b")):
    rng = np.random.default_rng(seed)
    rows = []
    for d in diseases:
        for i in range(n):
            y = int(rng.random() < 0.3)
            split = "val" if i < n // 2 else "test"
            ok = i % 17 != 0  # a few not evaluable
            rows.append({"case_id": f"c{i}", "split": split, "disease_id": d, "disease": d, "anatomy": "liver",
                         "organ": "liver", "type": "local", "evaluable": ok,
                         "score": float(np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2), 0, 1)) if ok else None,
                         "label": y})
    return pl.DataFrame(rows)


def test_binary_metrics_match_scikit_learn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = rng.random(200) * 0.5 + 0.4 * y
    thr = 0.55
    m = metrics.binary_metrics(y, s, thr)
    pred = (s >= thr).astype(int)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))


def test_youden_threshold_maximises_j_on_its_split():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    s = rng.random(300) + 0.5 * y
    thr = metrics.choose_threshold(y, s, "youden")
    j = lambda t: skm.recall_score(y, s >= t) + skm.recall_score(1 - y, s < t) - 1  # noqa: E731
    assert all(j(thr) >= j(t) - 1e-12 for t in np.unique(s))


def test_threshold_never_sees_test_labels():
    pred = _pred()
    table, _ = metrics.metrics_table(pred, n_resamples=0)
    flipped = pred.with_columns(
        pl.when(pl.col("split") == "test").then(1 - pl.col("label")).otherwise(pl.col("label")).alias("label"))
    table2, _ = metrics.metrics_table(flipped, n_resamples=0)
    assert table["threshold"].to_list() == table2["threshold"].to_list()
    assert table["auc"].to_list() != table2["auc"].to_list()  # the test metrics did change


def test_not_evaluable_cases_are_counted_not_scored():
    table, _ = metrics.metrics_table(_pred(), n_resamples=0)
    row = table.row(0, named=True)
    n_test = 60
    expected_missing = sum(1 for i in range(60, 120) if i % 17 == 0)
    assert row["test_not_evaluable"] == expected_missing
    assert row["test_evaluable"] == n_test - expected_missing


def test_tables_equal_recomputation_from_predictions(tmp_path):
    pred = _pred(seed=9)
    table, mean_ci = metrics.metrics_table(pred, n_resamples=200)
    paths = metrics.write_tables(table, tmp_path, mean_ci=mean_ci)
    csv = pl.read_csv(paths["csv"])
    for d in ("a", "b"):
        g = pred.filter((pl.col("disease_id") == d) & pl.col("evaluable"))
        val, test = g.filter(pl.col("split") == "val"), g.filter(pl.col("split") == "test")
        thr = metrics.choose_threshold(val["label"].to_numpy(), val["score"].to_numpy())
        auc = skm.roc_auc_score(test["label"].to_numpy(), test["score"].to_numpy())
        row = csv.filter(pl.col("disease_id") == d).row(0, named=True)
        assert row["auc"] == pytest.approx(auc) and row["threshold"] == pytest.approx(thr)
    mean = csv.filter(pl.col("disease_id") == "mean").row(0, named=True)
    assert mean["auc"] == pytest.approx(table["auc"].mean())
    md = paths["md"].read_text(encoding="utf-8")
    assert md.count("\n") == len(table) + 3 and f"{table['auc'][0]:.3f}" in md


def test_bootstrap_ci_covers_the_estimate_and_narrows_with_more_cases():
    widths = []
    for n in (60, 600):
        pred = _pred(seed=4, n=n)
        table, mean_ci = metrics.metrics_table(pred, n_resamples=300, seed=1)
        for row in table.iter_rows(named=True):
            assert row["auc_ci_low"] <= row["auc"] <= row["auc_ci_high"]
        assert mean_ci[0] <= table["auc"].mean() <= mean_ci[1]
        widths.append(mean_ci[1] - mean_ci[0])
    assert widths[1] < 0.6 * widths[0]  # ~1/sqrt(10) in theory


def test_organ_and_type_tables_average_their_diseases(tmp_path):
    pred = _pred(seed=8, diseases=("a", "b", "c"))
    pred = pred.with_columns(pl.when(pl.col("disease_id") == "c").then(pl.lit("spleen"))
                             .otherwise(pl.col("organ")).alias("organ"),
                             pl.when(pl.col("disease_id") == "b").then(pl.lit("diffuse"))
                             .otherwise(pl.col("type")).alias("type"))
    table, _ = metrics.metrics_table(pred, n_resamples=0)
    paths = metrics.write_tables(table, tmp_path)
    organ = pl.read_csv(paths["by_organ_csv"])
    auc = dict(zip(table["disease_id"], table["auc"]))
    assert organ.filter(pl.col("organ") == "liver")["auc"][0] == pytest.approx((auc["a"] + auc["b"]) / 2)
    assert organ.filter(pl.col("organ") == "spleen")["diseases"][0] == 1
    kind = pl.read_csv(paths["by_type_csv"])
    assert kind.filter(pl.col("type") == "local")["auc"][0] == pytest.approx((auc["a"] + auc["c"]) / 2)
    assert "spleen" in paths["by_organ_md"].read_text(encoding="utf-8")


def test_mean_row_skips_undefined_metrics(tmp_path):
    pred = _pred(seed=6, diseases=("a", "b", "c"))
    pred = pred.with_columns(pl.when((pl.col("disease_id") == "c") & (pl.col("split") == "test"))
                             .then(0).otherwise(pl.col("label")).alias("label"))  # c: no test positives
    table, mean_ci = metrics.metrics_table(pred, n_resamples=50)
    assert np.isnan(table.filter(pl.col("disease_id") == "c")["auc"][0])
    mean = pl.read_csv(metrics.write_tables(table, tmp_path, mean_ci=mean_ci)["csv"]).filter(
        pl.col("disease_id") == "mean").row(0, named=True)
    assert mean["auc"] == pytest.approx(table.filter(pl.col("disease_id") != "c")["auc"].mean())


def test_bootstrap_is_seeded():
    pred = _pred(seed=2)
    assert metrics.bootstrap_auc(pred, 100, seed=3) == metrics.bootstrap_auc(pred, 100, seed=3)
    assert metrics.bootstrap_auc(pred, 100, seed=3) != metrics.bootstrap_auc(pred, 100, seed=4)


def test_ablation_table_reads_each_variants_table(tmp_path):
    from ctvlp import cli

    paths = {}
    for seed, (variant, aucs) in enumerate((("fvlm", [0.6, 0.8, 0.7]), ("visd", [0.9, 0.5, 0.4]))):
        t = pl.DataFrame({"disease_id": ["a", "b", "c", "mean"], "type": ["local", "diffuse", "diffuse", ""],
                          "auc": aucs + [float(np.mean(aucs))], "auc_ci_low": [0.0] * 3 + [0.1],
                          "auc_ci_high": [1.0] * 3 + [0.9], "sensitivity": [0.5] * 4, "specificity": [0.5] * 4,
                          "accuracy": [0.5] * 4})
        paths[variant] = tmp_path / variant
        paths[variant].mkdir()
        t.write_csv(paths[variant] / "zeroshot.csv")
        _pred(seed).write_parquet(paths[variant] / "predictions.parquet")
    (tmp_path / "config.yaml").write_text("evaluate: {bootstrap: 50}\n")
    cli.main(["ablation", "--config", str(tmp_path / "config.yaml"), "--variant", f"fvlm={paths['fvlm']}",
              "--variant", f"visd={paths['visd']}", "--out", str(tmp_path / "ablation.md")])
    table = pl.read_csv(tmp_path / "ablation.csv")
    assert np.isnan(table["diff_vs_fvlm"][0]) and table["diff_ci_low"][1] <= table["diff_vs_fvlm"][1] <= table["diff_ci_high"][1]
    assert table["variant"].to_list() == ["fvlm", "visd"]
    assert table["auc"].to_list() == pytest.approx([0.7, 0.6])
    assert table["auc_local"].to_list() == pytest.approx([0.6, 0.9])
    assert table["auc_diffuse"].to_list() == pytest.approx([0.75, 0.45])
    assert "ViSD-Boost" in (tmp_path / "ablation.md").read_text(encoding="utf-8")
    # the report's inline table (ablation.html): every number of the CSV, as the Markdown formats it
    from htmlpage import tables

    header, rows = tables((tmp_path / "ablation.html").read_text(encoding="utf-8"))[None]
    assert header == table.columns and len(rows) == len(table)

    def as_markdown(v):  # metrics.markdown: 3 decimals, n/a for a missing value
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "n/a"
        return format(v, ".3f") if isinstance(v, float) else str(v)

    for shown, row in zip(rows, table.iter_rows()):
        assert shown == [as_markdown(v) for v in row], (shown, row)
    assert rows[0][table.columns.index("auc")] == "0.700" and rows[1][table.columns.index("auc_local")] == "0.900"


def test_anatomy_crops_without_boxes_stop_instead_of_scoring_zeros(tiny_cohort):
    """Preprocess outputs without anatomy boxes (the tiny fixture's meta.json has none) cannot be
    embedded from anatomy-centred crops: a clear error, not zero embeddings scored as evaluable."""
    import torch

    from ctvlp.evaluation.embed import embed_cases
    from ctvlp.imaging.storage import paths_from
    from ctvlp.model.config import ModelConfig
    from ctvlp.model.io import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig.from_settings({"widths": [4, 8, 8, 16], "embed_dim": 16, "heads": 2, "token_stage": 3,
                                                   "text_max_length": 32, "vq_codes": 0})).eval()
    paths = next(iter(paths_from(pl.read_parquet(tiny_cohort["cases"])).values()))
    whole = embed_cases(model, [paths], "cpu")[paths.case_id]
    assert whole[1].any() and np.isfinite(whole[0]).all()
    with pytest.raises(ValueError, match="anatomy's box"):
        embed_cases(model, [paths], "cpu", crop_size=(16, 16, 16))


def test_weighted_auc_equals_scikit_learn_on_the_repeated_cases():
    rng = np.random.default_rng(5)
    y = rng.random(40) < 0.4
    s = np.round(rng.random(40), 1)  # ties
    weights = np.stack([np.bincount(rng.integers(0, 40, 40), minlength=40) for _ in range(30)] + [np.ones(40, int)])
    got = metrics.weighted_auc(y.astype(int), s, weights)
    for w, auc in zip(weights, got):
        yy, ss = np.repeat(y, w), np.repeat(s, w)
        if len(np.unique(yy)) == 2:
            assert auc == pytest.approx(skm.roc_auc_score(yy, ss), abs=1e-12)
        else:
            assert np.isnan(auc)
    assert np.isnan(metrics.weighted_auc(np.zeros(5, int), np.arange(5.0), np.ones((1, 5))))[0]


def test_paired_difference_resamples_the_same_cases_for_both():
    pred = _pred(1, n=400)
    diff, low, high = metrics.paired_difference(pred, pred, 200)
    assert diff == 0 and low == 0 and high == 0  # the same predictions: no difference in any resample
    better = pred.with_columns(score=pl.when(pl.col("evaluable")).then(0.7 * pl.col("label") + 0.3 * pl.col("score")))
    diff, low, high = metrics.paired_difference(better, pred, 200)
    assert 0 < low <= diff <= high
    # paired: narrower than the difference of two independent CIs would be
    _, (a_low, a_high) = metrics.bootstrap_auc(better, 200)
    assert high - low < a_high - a_low + (metrics.bootstrap_auc(pred, 200)[1][1] - metrics.bootstrap_auc(pred, 200)[1][0])


def test_paired_difference_without_a_scorable_disease_is_nan_not_a_crash():
    pred = _pred(1, n=40)
    one_class = pred.with_columns(label=pl.lit(0).cast(pred["label"].dtype))  # no positives anywhere
    assert all(np.isnan(v) for v in metrics.paired_difference(one_class, pred, 50))
    other_cases = pred.with_columns(case_id=pl.col("case_id") + "_x")  # no shared test case
    assert all(np.isnan(v) for v in metrics.paired_difference(other_cases, pred, 50))

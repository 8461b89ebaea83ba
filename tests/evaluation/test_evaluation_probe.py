"""Linear probe: report-derived labels, a frozen encoder, a logistic regression per disease."""

import json
import shutil

import numpy as np
import polars as pl
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from ctvlp import catalog
from ctvlp.evaluation import metrics, probe, zeroshot
from ctvlp.evaluation.schema import (
    NOT_EVALUABLE_ANATOMY,
    NOT_EVALUABLE_NO_LABELS,
    NOT_EVALUABLE_ONE_CLASS,
)
from ctvlp.imaging.storage import case_paths, paths_from, with_folders
from ctvlp.model.config import ModelConfig
from ctvlp.model.io import build_model, save_model
from ctvlp.reports.schema import REPORT_SCHEMA

MODEL = ModelConfig.from_settings(widths=[4, 8, 8, 16], embed_dim=16, heads=2, text_max_length=32, token_stage=3,
                                  stem_stride=2, text_model=None, train_text_encoder=False, temperature=0.07,
                                  train_text_head=False, vq_codes=0)
N_SPLIT = {"train": 40, "val": 12, "test": 24}
SHUFFLED = [f"shuffled_{k}" for k in range(4)]


def _report_rows(case_id, rows):
    """REPORT_SCHEMA rows of one case from {anatomy: (status, [(disease_id, presence)], error)}."""
    return [{"case_id": case_id, "anatomy": a, "text": "", "status": st,
             "findings": [{"disease_id": d, "presence": p} for d, p in fs], "backend": "test", "model": "test",
             "prompt_version": "test", "error": err} for a, (st, fs, err) in rows.items()]


def test_report_labels_present_absent_uncertain_unparsed():
    rows = (_report_rows("c1", {"liver": ("abnormal", [("liver_cyst", "present"), ("liver_metastasis", "uncertain"),
                                                        ("fatty_liver", "absent")], None),
                                "kidney": ("normal", [], None)})
            + _report_rows("c2", {"liver": ("not_mentioned", [], None), "kidney": ("unparsed", [], "bad JSON")})
            + _report_rows("c3", {"liver": ("not_mentioned", [], "empty report"),
                                  "kidney": ("not_mentioned", [], "empty report")})
            + _report_rows("other", {"liver": ("abnormal", [("liver_cyst", "present")], None)}))
    reports = pl.DataFrame(rows, schema=REPORT_SCHEMA)
    dis = [d for d in catalog.diseases("demo") if d.anatomy in ("liver", "kidney")]
    lab = probe.report_labels(reports, ["c1", "c2", "c3", "c4"], dis)
    assert lab.schema == {"case_id": pl.Utf8, "disease_id": pl.Utf8, "label": pl.Int8}
    assert len(lab) == 4 * len(dis) and set(lab["case_id"]) == {"c1", "c2", "c3", "c4"}
    got = {(c, d): v for c, d, v in lab.iter_rows()}
    kidney = [d.id for d in dis if d.anatomy == "kidney"]
    assert (got["c1", "liver_cyst"], got["c1", "liver_metastasis"], got["c1", "fatty_liver"]) == (1, None, 0)
    assert all(got["c1", k] == 0 for k in kidney)  # parsed, normal, not mentioned -> 0
    assert all(got["c2", d] == 0 for d in ("liver_cyst", "liver_metastasis", "fatty_liver"))  # not_mentioned
    assert all(got["c2", k] is None for k in kidney)  # unparsed
    assert all(got["c3", d.id] is None for d in dis)  # the parser reported an error for this report
    assert all(got["c4", d.id] is None for d in dis)  # no report rows at all
    with pytest.raises(ValueError, match="duplicate"):
        probe.report_labels(pl.concat([reports, reports.head(1)]), ["c1"], dis)


# ---------------------------------------------------------------------------------------------- cohort

def _catalog(path):
    """Lung diseases (the tiny cohort's first anatomy), one heart disease, one liver disease (never
    complete in these scans) and one disease that will get no ground truth at all."""
    lung = ["nodule_a", *SHUFFLED, "one_class"]
    rows = [{"id": d, "name": d.replace("_", " "), "anatomy": "lung", "type": "local"} for d in lung]
    rows[-1]["zero_shot"] = False  # the probe covers diseases outside the zero-shot tables too
    rows += [{"id": "heart_x", "name": "heart x", "anatomy": "heart", "type": "diffuse"},
             {"id": "liver_x", "name": "liver x", "anatomy": "liver", "type": "local"},
             {"id": "no_truth", "name": "no truth", "anatomy": "lung", "type": "local"}]
    path.write_text(yaml.safe_dump({"prompt_templates": {"positive": ["There is {name}."],
                                                         "negative": ["There is no {name}."]}, "diseases": rows}))
    return str(path)


@pytest.fixture(scope="module")
def cohort(tiny_cohort, tmp_path_factory):
    """76 cases copied from the tiny cohort's arrays with fresh noise; 'nodule_a' positives get a
    bright lung, so the frozen random encoder sees them. Two val, two test and two train cases have
    an incomplete lung."""
    import torch

    root = tmp_path_factory.mktemp("probe")
    rng = np.random.default_rng(7)
    templates = list(paths_from(pl.read_parquet(tiny_cohort["cases"])).values())
    lung = catalog.anatomy_by_name("lung").index
    man, truth, reports = [], [], []
    for split, n in N_SPLIT.items():
        ys = rng.permutation(np.arange(n) % 2)
        shuffled = [rng.permutation(ys) for _ in SHUFFLED]  # report labels unrelated to the images
        for i in range(n):
            cid, src = f"{split}_{i:02d}", templates[i % len(templates)]
            p, y = case_paths(cid, root / "segment" / cid, root / "preprocessed" / cid), int(ys[i])
            for f in (p.image, p.table):
                f.parent.mkdir(parents=True, exist_ok=True)
            anat = np.load(src.anatomy)
            img = rng.random(anat.shape) * 0.4 + (anat > 0) * 0.1 * (anat % 5) + 0.5 * y * (anat == lung)
            np.save(p.image, img.astype(np.float16))
            shutil.copy(src.anatomy, p.anatomy)
            meta = json.loads(src.meta.read_text(encoding="utf-8"))
            meta["anatomy_bbox"] = {a.name: [int(v) for ax in np.nonzero(anat == a.index) for v in (ax.min(), ax.max())]
                                    for a in catalog.anatomies() if (anat == a.index).any()}
            p.meta.write_text(json.dumps(meta))
            incomplete = i < 2
            tab = pl.read_parquet(src.table).with_columns(
                pl.lit(cid).alias("case_id"),
                pl.when(pl.col("index") == lung).then(pl.lit(not incomplete)).otherwise("complete").alias("complete"))
            tab.write_parquet(p.table)
            man.append({"case_id": cid, "split": split})
            if split == "train" and i in (4, 5):
                lung_findings = [("nodule_a", "uncertain")]  # left out of the fit (label null)
            elif i % 3:
                lung_findings = [("nodule_a", "present" if y else "absent")]
            else:  # a negative the report does not mention
                lung_findings = [("nodule_a", "present")] if y else []
            lung_findings += [(d, "present") for d, s in zip(SHUFFLED, shuffled) if s[i]]
            status = "unparsed" if split == "train" and i == 6 else (
                "abnormal" if any(p_ == "present" for _, p_ in lung_findings) else "normal")
            reports += _report_rows(cid, {"lung": (status, lung_findings, None),
                                          "heart": ("abnormal" if i % 2 else "normal",
                                                    [("heart_x", "present")] if i % 2 else [], None),
                                          "liver": ("normal", [], None)})
            for d in ["nodule_a", *SHUFFLED, "one_class", "heart_x", "liver_x"]:
                truth.append({"case_id": cid, "disease_id": d, "label": int(y if d in ["nodule_a", *SHUFFLED]
                                                                              else (i % 2 if d == "heart_x" else 0))})
    with_folders(pl.DataFrame(man), root / "segment", root / "preprocessed").write_parquet(root / "cases.parquet")
    pl.DataFrame(truth).write_parquet(root / "ground_truth.parquet")
    pl.DataFrame(reports, schema=REPORT_SCHEMA).write_parquet(root / "reports.parquet")
    torch.manual_seed(0)
    (root / "model").mkdir()
    save_model(build_model(MODEL), root / "model", {})
    return {"root": root, "model": root / "model", "cases": root / "cases.parquet",
            "reports": root / "reports.parquet", "ground_truth": root / "ground_truth.parquet",
            "catalog": _catalog(root / "diseases.yaml")}


def _probe(cohort, reports=None, ground_truth=None):
    return probe.linear_probe(cohort["model"], cohort["cases"], reports if reports is not None else cohort["reports"],
                              ground_truth if ground_truth is not None else cohort["ground_truth"],
                              cohort["catalog"], device="cpu")


@pytest.fixture(scope="module")
def pred(cohort):
    return _probe(cohort)


def _test_auc(pred, disease_id):
    t = pred.filter((pl.col("disease_id") == disease_id) & (pl.col("split") == "test") & pl.col("evaluable"))
    return roc_auc_score(t["label"].to_numpy(), t["score"].to_numpy())


def test_probe_learns_what_the_frozen_encoder_sees_and_shuffled_labels_do_not(pred):
    real = _test_auc(pred, "nodule_a")
    shuffled = [_test_auc(pred, d) for d in SHUFFLED]
    print(f"test AUC: real {real:.3f}, shuffled {np.round(shuffled, 3)}")
    assert real > 0.85, real
    assert np.mean(shuffled) < 0.7 and max(shuffled) < real, (real, shuffled)


def test_rows_schema_and_reasons(pred, cohort, tmp_path):
    truth = pl.read_parquet(cohort["ground_truth"])
    # zeroshot.predict wants ground truth for every zero-shot disease of the catalog
    truth.vstack(truth.filter(pl.col("disease_id") == "heart_x").with_columns(disease_id=pl.lit("no_truth"))).write_parquet(
        tmp_path / "gt.parquet")
    zero_shot, _ = zeroshot.predict(cohort["model"], cohort["cases"], tmp_path / "gt.parquet", cohort["catalog"],
                                    device="cpu")
    assert pred.columns == [c for c in zero_shot.columns if c != "prompt_style"]
    assert pred["split"].unique().sort().to_list() == ["test", "val"]
    assert set(pred["disease_id"]) == {"nodule_a", *SHUFFLED, "one_class", "heart_x", "liver_x"}  # not no_truth
    assert len(pred) == (N_SPLIT["val"] + N_SPLIT["test"]) * 8
    assert "one_class" not in set(zero_shot["disease_id"])  # zero_shot: false, probed all the same
    one = pred.filter(pl.col("disease_id") == "one_class")
    assert not one["evaluable"].any() and set(one["reason"]) == {NOT_EVALUABLE_ONE_CLASS}
    assert one["score"].is_null().all()
    liver = pred.filter(pl.col("disease_id") == "liver_x")  # the liver is never complete in these scans
    assert not liver["evaluable"].any() and set(liver["reason"]) == {NOT_EVALUABLE_NO_LABELS}
    nod = pred.filter(pl.col("disease_id") == "nodule_a")
    incomplete = nod["case_id"].str.extract(r"_(\d+)$").cast(pl.Int64) < 2
    assert (nod["evaluable"] == ~incomplete).all()
    assert set(nod.filter(~pl.col("evaluable"))["reason"]) == {NOT_EVALUABLE_ANATOMY}
    assert nod.filter(pl.col("evaluable"))["score"].is_between(0, 1).all()
    assert nod.filter(~pl.col("evaluable"))["score"].is_null().all()
    heart = pred.filter(pl.col("disease_id") == "heart_x")
    assert heart["evaluable"].all()  # the heart is complete everywhere
    # label = ground truth, as in zeroshot.predict
    joined = pred.join(truth, on=["case_id", "disease_id"], suffix="_gt")
    assert len(joined) == len(pred) and (joined["label"] == joined["label_gt"]).all()


def _flip_lung(rep, where):
    """present <-> absent (uncertain -> present) in the lung findings of the rows ``where`` selects."""
    el = pl.element().struct
    flipped = pl.col("findings").list.eval(pl.struct(
        el.field("disease_id"), pl.when(el.field("presence") == "present").then(pl.lit("absent"))
        .otherwise(pl.lit("present")).alias("presence")))
    return rep.with_columns(pl.when(where & (pl.col("anatomy") == "lung")).then(flipped)
                            .otherwise("findings").alias("findings"))


def test_test_labels_and_left_out_training_labels_never_reach_the_fit(pred, cohort):
    """Flip every test ground-truth label and every test report finding, and the report labels of
    the training cases whose lung is incomplete: no score moves."""
    truth = pl.read_parquet(cohort["ground_truth"])
    truth = truth.with_columns(pl.when(pl.col("case_id").str.starts_with("test_")).then(1 - pl.col("label"))
                               .otherwise("label").alias("label"))
    rep = pl.read_parquet(cohort["reports"])
    flipped = _flip_lung(rep, pl.col("case_id").str.starts_with("test_") | pl.col("case_id").is_in(["train_00", "train_01"]))
    assert not flipped.equals(rep)
    again = _probe(cohort, reports=flipped, ground_truth=truth)
    assert again["score"].to_list() == pred["score"].to_list()
    assert again["evaluable"].to_list() == pred["evaluable"].to_list()
    test = pl.col("split") == "test"
    assert (again.filter(test)["label"] == 1 - pred.filter(test)["label"]).all()  # the labels did change
    # the same change to the other training cases does move the scores
    moved = _probe(cohort, reports=_flip_lung(rep, pl.col("case_id").is_in(["train_10", "train_11"])))
    assert moved["score"].to_list() != pred["score"].to_list()


def test_write_uses_the_shared_metric_tables(pred, tmp_path):
    paths = probe.write(pred, tmp_path, "youden", 20, 0)
    assert paths["predictions"].name == "linear_probe_predictions.parquet"
    assert pl.read_parquet(paths["predictions"]).equals(pred)
    assert {p.name for k, p in paths.items() if k != "predictions"} >= {
        "linear_probe.csv", "linear_probe.md", "linear_probe.parquet", "linear_probe_by_organ.md"}
    csv = pl.read_csv(paths["csv"])
    table, _ = metrics.metrics_table(pred, "youden", 0)
    for d in ("nodule_a", "heart_x"):
        row = csv.filter(pl.col("disease_id") == d).row(0, named=True)
        ref = table.filter(pl.col("disease_id") == d).row(0, named=True)
        assert row["auc"] == pytest.approx(_test_auc(pred, d)) and row["threshold"] == pytest.approx(ref["threshold"])
    assert np.isnan(csv.filter(pl.col("disease_id") == "one_class")["auc"][0])
    assert csv["disease_id"].to_list()[-1] == "mean"

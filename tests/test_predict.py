"""Single-scan prediction (`ctvlp predict`, `ctvlp.load_model(...).predict(...)`) on a real CT."""

import json

import polars as pl
import pytest

import ctvlp
from ctvlp import catalog, cli
from ctvlp.config import validate
from ctvlp.imaging import segment
from ctvlp.model.config import ModelConfig
from ctvlp.model.io import build_model, save_model

MODEL = ModelConfig.from_settings(widths=[4, 8, 8, 16], embed_dim=16, heads=2, text_max_length=32, token_stage=3,
                                  stem_stride=2, text_model=None, train_text_encoder=False, temperature=0.07,
                                  train_text_head=False, vq_codes=0)
CONFIG = {"preprocess": {"spacing": [6.0, 6.0, 6.0]}, "evaluate": {"catalog": "demo"}, "train": {"device": "cpu"}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    save_model(build_model(MODEL), out, {})
    diseases = [d.id for d in catalog.diseases("demo") if d.zero_shot]
    pl.DataFrame({"disease_id": diseases + ["mean"], "threshold": [0.5] * len(diseases) + [None]}).write_csv(
        out / "zeroshot.csv")
    return out


def test_api_and_cli_agree_on_a_real_ct(ts, model_dir, tmp_path):
    scan, mask = ts / "example_ct.nii.gz", ts / "example_seg_fast_force_split.nii.gz"
    pred = ctvlp.load_model(model_dir, CONFIG, thresholds=model_dir / "zeroshot.csv", device="cpu").predict(scan, mask=mask)
    zero_shot = [d for d in catalog.diseases("demo") if d.zero_shot]
    assert pred["disease_id"].to_list() == [d.id for d in zero_shot]
    # evaluable exactly where the anatomy is complete in this scan's segmentation
    seg = segment.segment_case({"case_id": "x", "image_path": str(scan), "mask_path": str(mask)},
                               {"backend": "phantom", "class_version": "v2", "min_voxels": 10,
                                "preprocess": validate({})["preprocess"]}, tmp_path / "seg")
    complete = dict(zip(seg["anatomy"], seg["complete"]))
    assert pred["evaluable"].to_list() == [bool(complete[d.anatomy]) for d in zero_shot]
    assert pred["evaluable"].any() and not pred["evaluable"].all()  # e.g. no heart or lungs in an abdomen CT
    ev = pred.filter(pl.col("evaluable"))
    assert ev["probability"].is_between(0, 1).all()
    assert ev["decision"].to_list() == ["positive" if p >= 0.5 else "negative" for p in ev["probability"]]
    assert pred.filter(~pl.col("evaluable"))["probability"].is_null().all()
    # the CLI writes the same numbers
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps(CONFIG))
    cli.main(["predict", str(scan), "--mask", str(mask), "--model", str(model_dir), "--config", str(cfg),
              "--thresholds", str(model_dir / "zeroshot.csv"), "--device", "cpu", "--out", str(tmp_path / "p")])
    written = json.loads((tmp_path / "p.json").read_text(encoding="utf-8"))
    assert [r["probability"] for r in written] == pred["probability"].to_list()
    assert pl.read_csv(tmp_path / "p.csv")["decision"].to_list() == pred["decision"].to_list()


def test_unusable_scan_gives_a_clear_error(ts, model_dir, tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes((ts / "example_ct_sm.nii.gz").read_bytes()[:5000])
    with pytest.raises(ValueError, match="cannot be used: .*truncated"):
        ctvlp.load_model(model_dir, CONFIG, device="cpu").predict(bad, mask=ts / "example_seg.nii.gz")


def test_thresholds_and_prompt_style_come_from_the_evaluations_table(tmp_path):
    from ctvlp.predict import read_thresholds

    table = pl.DataFrame({"disease_id": ["a", "b", "mean"], "threshold": [0.3, None, None],
                          "prompt_style": ["report", "report", None]})
    table.write_csv(tmp_path / "chosen.csv")
    assert read_thresholds(tmp_path / "chosen.csv") == ({"a": 0.3}, "report")
    table.with_columns(pl.lit(None, pl.Utf8).alias("prompt_style")).write_csv(tmp_path / "none.csv")
    assert read_thresholds(tmp_path / "none.csv") == ({"a": 0.3}, None)  # no style recorded: the catalog's first
    table.drop("prompt_style").write_csv(tmp_path / "old.csv")  # a table from before prompt styles
    assert read_thresholds(tmp_path / "old.csv") == ({"a": 0.3}, None)
    assert read_thresholds(None) == ({}, None)

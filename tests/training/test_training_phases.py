"""The four ViSD-Boost phases and the CLIP baseline run in a chain on a tiny cohort: each phase
starts from the previous one's weights, trains exactly its parameter groups and leaves the
others as they were, and its loss falls."""

import json

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from ctvlp import config
from ctvlp.model.io import load_model
from ctvlp.training.data import anatomy_texts
from ctvlp.training.phases import augment_view, run
from ctvlp.training.trainable import PHASE_TRAINABLE

MODEL = {"widths": [4, 8, 8, 16], "embed_dim": 16, "heads": 2, "text_max_length": 32, "token_stage": 3,
         "vq_codes": 4, "vq_dim": 16, "vq_depth": 1, "vq_heads": 2}


@pytest.fixture(scope="module")
def chain(tiny_cohort, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    s = config.validate({"model": MODEL, "train": {
        "epochs": 6, "batch_size": 6, "crop_size": [32, 32, 48], "flip": False, "lr": 3e-3, "threads": 2, "device": "cpu",
        "warmup_epochs": 0, "visual_cl": {"epochs": 8, "momentum": 0.5}, "normality": {"epochs": 6, "lr": 3e-3}, "boost": {"epochs": 4}}})
    # the CLIP baseline reads whole reports: the cohort's per-anatomy texts joined
    rep = pl.read_parquet(tiny_cohort["reports"]).group_by("case_id").agg(pl.col("text").str.join(" ").alias("report_text"))
    pl.read_parquet(tiny_cohort["cases"]).join(rep, on="case_id").write_parquet(root / "cases.parquet")
    paths = [root / "cases.parquet", tiny_cohort["reports"]]
    out = {}
    for phase, init in (("visual_cl", None), ("align", "visual_cl"), ("normality", "align"), ("boost", "normality"),
                        ("global", None)):
        out[phase] = root / phase
        # the CLIP baseline contrasts only 3 whole reports per batch: noisier, so give it more steps
        cfg_train = {**s["train"], "epochs": 16} if phase == "global" else s["train"]
        run(phase, *paths, out[phase], s["model"], cfg_train, 0, init=out.get(init))
    return out


def _weights(folder, prefix):
    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if k.startswith(prefix)}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_phase_trains_exactly_its_groups(chain):
    for phase, folder in chain.items():
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        groups = {name.split(".")[0] for name in cfg["trainable"][phase]}
        assert groups == set(PHASE_TRAINABLE[phase]) - {"text_encoder"}, phase  # train_text_encoder is off
    # phase 3 freezes the vision side: identical to phase 2's; its VQ-VAE is new
    assert _same(_weights(chain["align"], "vision."), _weights(chain["normality"], "vision."))
    # phase 4 freezes the VQ-VAE (weights and EMA codebook) and trains vision + perception
    assert _same(_weights(chain["normality"], "vqvae."), _weights(chain["boost"], "vqvae."))
    assert not _same(_weights(chain["normality"], "vision."), _weights(chain["boost"], "vision."))
    assert not _same(_weights(chain["visual_cl"], "vision."), _weights(chain["align"], "vision."))
    # phases 1-2 hold no VQ-VAE
    assert not _weights(chain["align"], "vqvae.") and not _weights(chain["visual_cl"], "vqvae.")


def test_losses_fall(chain):
    # every step sees the same batch (all 6 training cases, whole volumes, no flips), so the trend
    # is the optimisation's, not the batch composition's
    for phase, folder in chain.items():
        m = pl.read_csv(folder / "metrics.csv").filter(pl.col("split") == "train")
        per_epoch = m.group_by("epoch", maintain_order=True).agg(pl.col("loss").mean())["loss"].to_list()
        k = max(1, len(per_epoch) // 4)  # first vs last quarter of the epochs
        assert sum(per_epoch[-k:]) / k < sum(per_epoch[:k]) / k, (phase, per_epoch)


def test_normality_reports_codebook_and_recon_error(chain):
    cfg = json.loads((chain["normality"] / "config.json").read_text(encoding="utf-8"))["normality"]
    assert cfg["n_normal"] > 0 and cfg["n_abnormal"] > 0
    assert cfg["recon_normal"] > 0 and cfg["recon_abnormal"] > 0
    assert 1.0 <= cfg["mean_perplexity"] <= MODEL["vq_codes"] and 0 <= cfg["mean_dead_codes"] < MODEL["vq_codes"]
    m = pl.read_csv(chain["normality"] / "metrics.csv")
    assert {"recon", "commit", "perplexity", "dead_codes"} <= set(m.columns)


def test_boosted_model_reloads_with_boost_on(chain):
    from ctvlp.model.io import load_model

    model = load_model(chain["boost"])
    assert model.boost and model.vqvae is not None
    assert not load_model(chain["align"]).boost


def test_second_view_changes_intensities_not_geometry():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8, 8)
    v = augment_view(x)
    assert v.shape == x.shape and 0 <= v.min() and v.max() <= 1
    assert not torch.allclose(v, x)
    # a monotone intensity change: the voxel order within a sample is nearly kept
    r = torch.corrcoef(torch.stack([x[0].flatten(), v[0].flatten()]))[0, 1]
    assert r > 0.9
    # train.visual_cl.augment sets each change's range: all zero gives the image back; a brightness
    # shift alone moves no voxel by more than it; the default stays within a few tens of HU (a
    # +-100 HU range erased emphysema), far below the old ranges
    assert torch.equal(augment_view(x, gamma=0, scale=0, shift=0, noise=0), x)
    shifted = augment_view(x, gamma=0.0, scale=0.0, shift=0.01, noise=0.0) - x
    assert shifted.abs().max() <= 0.01 + 1e-6
    lung = torch.full((64, 1, 8, 8, 8), 0.075)  # -850 HU: emphysema is at 0.025 (-950 HU)
    default = augment_view(lung).mean(dim=(1, 2, 3, 4))
    old = augment_view(lung, gamma=0.3, scale=0.1, shift=0.05, noise=0.02).mean(dim=(1, 2, 3, 4))
    assert (default - 0.075).abs().max() < 0.025 and (old - 0.075).abs().max() > 0.04


def test_text_center_is_set_once_from_the_training_reports(tiny_cohort, tmp_path):
    """model.text_center: phase 2 sets each anatomy's centre from the TRAINING split's texts (a
    later phase started from those weights keeps it, even if it were given other reports)."""
    model_cfg = {**MODEL, "vq_codes": 0, "train_text_head": False, "text_center": True}
    s = config.validate({"model": model_cfg, "train": {
        "epochs": 1, "batch_size": 6, "crop_size": [32, 32, 48], "flip": False, "threads": 2, "device": "cpu",
        "warmup_epochs": 0}})
    cases, reports = pl.read_parquet(tiny_cohort["cases"]), pl.read_parquet(tiny_cohort["reports"])
    run("align", tiny_cohort["cases"], tiny_cohort["reports"], tmp_path / "a", s["model"], s["train"], 0)
    saved = load_model(tmp_path / "a").txt_center
    train_ids = cases.filter(pl.col("split") == "train")["case_id"].to_list()
    texts = anatomy_texts(reports, train_ids, True)
    expected = load_model(tmp_path / "a")  # the same (locked) text head; its centre recomputed
    expected.txt_center.zero_()
    expected.set_text_center(texts.texts, texts.text_idx)
    assert saved.abs().sum() > 0 and torch.allclose(saved, expected.txt_center, atol=1e-5)
    # not from all cases: the validation split's texts would give another centre
    every = anatomy_texts(reports, cases["case_id"].to_list(), True)
    other = load_model(tmp_path / "a")
    other.txt_center.zero_()
    other.set_text_center(every.texts, every.text_idx)
    assert not torch.allclose(saved, other.txt_center, atol=1e-4)
    # a phase started from these weights keeps the centre, whatever reports it reads
    changed = tmp_path / "changed.parquet"
    reports.with_columns(pl.lit("Changed wording of every finding.").alias("text")).write_parquet(changed)
    run("align", tiny_cohort["cases"], changed, tmp_path / "b", s["model"], s["train"], 0, init=tmp_path / "a")
    assert torch.equal(load_model(tmp_path / "b").txt_center, saved)


PAPER = {"align_direction": "i2t", "optimizer": "adam", "weight_decay": 0.0, "unmentioned_as_normal": False}


@pytest.fixture(scope="module")
def paper_chain(tiny_cohort, tmp_path_factory):
    """Phases 1-4 with every switch at the paper's setting (config.paper.yaml's)."""
    root = tmp_path_factory.mktemp("paper")
    s = config.validate({"model": {**MODEL, "fusion": "replace", "train_text_head": True}, "train": {
        "epochs": 4, "batch_size": 6, "crop_size": [32, 32, 48], "flip": False, "lr": 3e-3, "threads": 2,
        "device": "cpu", "warmup_epochs": 0, **PAPER, "visual_cl": {"epochs": 4, "momentum": 0.5},
        "normality": {"epochs": 4, "lr": 3e-3}, "boost": {"epochs": 3, "gradient": "straight_through"}}})
    out = {}
    for phase, init in (("visual_cl", None), ("align", "visual_cl"), ("normality", "align"), ("boost", "normality")):
        out[phase] = root / phase
        run(phase, tiny_cohort["cases"], tiny_cohort["reports"], out[phase], s["model"], s["train"], 0,
            init=out.get(init))
    return out


def test_the_paper_switches_train_and_are_recorded(chain, paper_chain):
    for phase, folder in paper_chain.items():
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        assert {k: cfg["train"][k] for k in PAPER} == PAPER, phase
        losses = pl.read_csv(folder / "metrics.csv")["loss"]
        assert losses.is_finite().all() and losses.len() > 0, phase
    boost = json.loads((paper_chain["boost"] / "config.json").read_text(encoding="utf-8"))
    assert boost["train"]["gradient"] == "straight_through"
    assert load_model(paper_chain["boost"]).perception.fusion == "replace"
    # phase 4 trains the encoder and leaves the VQ-VAE as phase 3 left it
    assert _same(_weights(paper_chain["normality"], "vqvae."), _weights(paper_chain["boost"], "vqvae."))
    assert not _same(_weights(paper_chain["normality"], "vision."), _weights(paper_chain["boost"], "vision."))
    # unmentioned anatomies are not normal: phase 3 sees no more normal validation rows than the
    # default chain on the same cases (the tiny validation crops hold few unmentioned anatomies;
    # the data-level test below shows the difference), and as many abnormal ones
    paper3 = json.loads((paper_chain["normality"] / "config.json").read_text(encoding="utf-8"))["normality"]
    default3 = json.loads((chain["normality"] / "config.json").read_text(encoding="utf-8"))["normality"]
    assert paper3["n_normal"] <= default3["n_normal"] and paper3["n_abnormal"] == default3["n_abnormal"]


def test_unmentioned_anatomies_leave_every_normal_set_when_excluded():
    from ctvlp import catalog
    from ctvlp.reports.schema import REPORT_SCHEMA

    def row(case_id, anatomy, text, status):
        return {"case_id": case_id, "anatomy": anatomy, "text": text, "status": status, "findings": [],
                "backend": "rules", "model": "rules", "prompt_version": "rules-1", "error": None}

    reports = pl.DataFrame([row("a", "liver", "The liver is normal.", "normal"),
                            row("a", "kidney", None, "not_mentioned"),
                            row("b", "liver", "A 2 cm liver cyst.", "abnormal"),
                            row("b", "kidney", "Kidneys unremarkable.", "normal"),
                            row("c", "liver", None, "not_mentioned")], schema=REPORT_SCHEMA)
    liver, kidney = (catalog.anatomy_by_name(n).index - 1 for n in ("liver", "kidney"))
    as_normal = anatomy_texts(reports, ["a", "b", "c"], unmentioned_as_normal=True)
    excluded = anatomy_texts(reports, ["a", "b", "c"], unmentioned_as_normal=False)
    unmentioned = [(0, kidney), (2, liver)]
    for i, j in unmentioned:  # default: normal with a stock text (Eq. 1, 2 and the VQ-VAE's normal set)
        assert as_normal.normal[i, j] and as_normal.texts[as_normal.text_idx[i, j]].endswith("is unremarkable.")
        # excluded: no text, so not valid in any loss, not normal, no calibration group
        assert excluded.text_idx[i, j] == -1 and not excluded.normal[i, j] and excluded.groups[i, j] == -1
    for i, j, normal in ((0, liver, True), (1, liver, False), (1, kidney, True)):  # assessed rows stay as they are
        assert excluded.text_idx[i, j] >= 0 and excluded.normal[i, j] == as_normal.normal[i, j] == normal

"""A trained model on one CT scan: `ctvlp predict SCAN [--mask SEG] --model DIR` and
``ctvlp.load_model(DIR).predict(SCAN, mask=SEG)``.

The scan goes through the same segmentation and preprocessing as training (settings from the
workflow config), then every zero-shot disease of the catalog is scored from its anatomy's
embedding. A decision is given at the threshold chosen on the validation split by the
evaluate stage (results/eval/zeroshot.csv), when those thresholds are given.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import torch

from . import config as cfgmod
from .catalog import anatomy_by_name
from .evaluation.embed import crop_size, embed_volume
from .evaluation.schema import NOT_EVALUABLE_ANATOMY
from .imaging.exclusion import CaseExcluded
from .imaging.preprocess import preprocess_case
from .imaging.segment import segment_case
from .model.io import load_model as load_weights
from .model.io import pick_device
from .model.zeroshot import disease_scores
from .workspace import case_id_problem, slug


class Predictor:
    def __init__(self, model, settings: dict, thresholds: dict[str, float], device, prompt_style: str | None = None):
        self.model, self.settings, self.thresholds, self.device = model, settings, thresholds, device
        self.prompt_style = prompt_style  # as chosen on validation by the evaluation (None: the catalog's first)

    @torch.no_grad()
    def predict(self, scan: str | Path, mask: str | Path | None = None, case_id: str | None = None) -> pl.DataFrame:
        """One row per zero-shot disease: probability, threshold, decision, or not evaluable with
        the reason (anatomy absent or cut off by the scan). ``mask``: a TotalSegmentator multilabel
        segmentation of the scan; without it segment.backend runs (e.g. totalsegmentator)."""
        s = self.settings
        case_id = case_id or Path(scan).name.split(".")[0]
        case_id = case_id if case_id_problem(case_id) is None else slug(case_id)  # it may name an output file
        case = {"case_id": case_id, "image_path": str(scan),
                "mask_path": None if mask is None else str(mask)}
        seg_cfg = {**s["segment"], "preprocess": s["preprocess"]}
        if mask is not None:
            seg_cfg["backend"] = "phantom"  # the mask given with the scan, put onto its grid
        with tempfile.TemporaryDirectory(prefix="ctvlp_predict_") as tmp:
            try:
                table = segment_case(case, seg_cfg, Path(tmp) / "seg")
                meta = preprocess_case(case, Path(tmp) / "seg" / "anatomy.nii.gz", s["preprocess"],
                                               Path(tmp) / "pre")
            except CaseExcluded as e:
                raise ValueError(f"{scan}: cannot be used: {e.reason}") from e
            img, anat = np.load(Path(tmp) / "pre" / "image.npy"), np.load(Path(tmp) / "pre" / "anatomy.npy")
        complete = table.sort("index")["complete"].to_numpy()
        emb = embed_volume(self.model, img, anat, complete, meta["anatomy_bbox"], self.device, crop_size(s))
        rows = []
        for d, scores in disease_scores(self.model, torch.from_numpy(emb)[None].to(self.device), s["evaluate"]["catalog"],
                                        self.prompt_style):
            ok = bool(complete[anatomy_by_name(d.anatomy).index - 1])
            thr = self.thresholds.get(d.id)
            prob = float(scores[0]) if ok else None
            rows.append({"case_id": case["case_id"], "disease_id": d.id, "disease": d.name, "anatomy": d.anatomy,
                         "evaluable": ok, "reason": None if ok else NOT_EVALUABLE_ANATOMY,
                         "probability": prob, "threshold": thr,
                         "decision": None if prob is None or thr is None else ("positive" if prob >= thr else "negative")})
        return pl.DataFrame(rows, schema={"case_id": pl.Utf8, "disease_id": pl.Utf8, "disease": pl.Utf8,
                                          "anatomy": pl.Utf8, "evaluable": pl.Boolean, "reason": pl.Utf8,
                                          "probability": pl.Float64, "threshold": pl.Float64, "decision": pl.Utf8})


def read_thresholds(path: str | Path | None) -> tuple[dict[str, float], str | None]:
    """Per-disease thresholds from the evaluate stage's zeroshot.csv (chosen on validation) and the
    prompt style the evaluation chose on validation."""
    if path is None:
        return {}, None
    table = pl.read_csv(path)
    styles = table["prompt_style"].drop_nulls().to_list() if "prompt_style" in table.columns else []
    style = styles[0] if styles else None
    rows = table.filter(pl.col("disease_id") != "mean").drop_nulls("threshold")
    return dict(zip(rows["disease_id"], rows["threshold"])), style


def load_model(model_dir: str | Path, config: str | Path | dict | None = "config.yaml",
               thresholds: str | Path | None = None, device: str = "auto") -> Predictor:
    """A trained model ready for ``.predict(scan, mask=None)``. ``config``: the workflow config
    (file or dict) whose preprocess/segment/evaluate settings the model was trained and
    evaluated with; ``thresholds``: results/eval/zeroshot.csv for decisions."""
    settings = cfgmod.validate(dict(config)) if isinstance(config, dict) else (
        cfgmod.load(config) if config is not None else cfgmod.validate({}))
    dev = pick_device(device if device != "auto" else settings["train"]["device"])
    values, style = read_thresholds(thresholds)
    if style is None and settings["evaluate"]["prompt_style"] != "auto":
        style = settings["evaluate"]["prompt_style"]
    return Predictor(load_weights(model_dir, dev), settings, values, dev, style)


def write(pred: pl.DataFrame, out_prefix: str | Path) -> dict[str, Path]:
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out.with_suffix(".csv"), "json": out.with_suffix(".json")}
    pred.write_csv(paths["csv"])
    paths["json"].write_text(json.dumps(pred.to_dicts(), indent=1))
    return paths

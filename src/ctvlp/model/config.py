"""``ModelConfig``: the one description of a model's hyperparameters, used to build, save and
load a model and in a training checkpoint's fingerprint. Its values and defaults come from the
config schema's ``model`` section (``ctvlp.config``), so they are checked (types, bounds, size)
wherever a model is made, also from a saved ``config.json``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .. import config as cfgmod


@dataclass(frozen=True)
class ModelConfig:
    """See ctvlp/config.schema.yaml, section ``model``, for each field."""

    widths: tuple[int, int, int, int]
    stem_stride: int
    token_stage: int
    embed_dim: int
    heads: int
    text_model: str | None
    text_max_length: int
    train_text_encoder: bool
    train_text_head: bool
    text_center: bool  # subtract each anatomy's mean training-text embedding (CTVLP.set_text_center)
    temperature: float
    vq_codes: int  # 0: no VQ-VAE (phases 1-2 and the baselines)
    vq_dim: int
    vq_depth: int
    vq_heads: int
    vq_beta: float
    vq_decay: float
    fusion: str  # phase 4: "residual" f + MLP([f, q]) or the paper's "replace" MLP([f, q])
    global_head: bool

    @classmethod
    def from_settings(cls, section: dict | None = None, where: str = "model settings", **overrides) -> ModelConfig:
        """From a ``model`` config section (a workflow config's, or a saved model's), with
        ``overrides``; missing keys take the schema's defaults; ConfigError names a bad key."""
        values = {**(section or {}), **overrides}
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        filled = cfgmod.validate_section("model", values, where, fill=True)
        filled["widths"] = tuple(filled["widths"])
        return cls(**filled)

    def to_dict(self) -> dict:
        """JSON-ready values (the ``model`` mapping of a saved config.json)."""
        out = dataclasses.asdict(self)
        out["widths"] = list(self.widths)
        return out

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

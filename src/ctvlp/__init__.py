"""ctvlp: anatomy-level vision-language pretraining on 3D CT (ViSD-Boost on fVLM)."""

__version__ = "0.1.0"


def load_model(model_dir, config=None, thresholds=None, device="auto", allow_text_model_mismatch=False):
    """A trained model for single-scan prediction: ``ctvlp.load_model(DIR).predict(SCAN, mask=SEG)``.
    DIR a model bundle (the workflow's results/model: settings, prompts and thresholds travel with
    it), or a model folder with its ``config`` (see ctvlp.predict and ctvlp.bundle)."""
    from .predict import load_model as _load

    return _load(model_dir, config, thresholds, device, allow_text_model_mismatch)

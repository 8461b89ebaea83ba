"""ctvlp: anatomy-level vision-language pretraining on 3D CT (ViSD-Boost on fVLM)."""

__version__ = "0.1.0"


def load_model(model_dir, config="config.yaml", thresholds=None, device="auto"):
    """A trained model for single-scan prediction: ``ctvlp.load_model(DIR).predict(SCAN, mask=SEG)``
    (see ctvlp.predict)."""
    from .predict import load_model as _load

    return _load(model_dir, config, thresholds, device)

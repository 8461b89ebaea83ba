"""ctvlp: anatomy-level vision-language pretraining on 3D CT (ViSD-Boost on fVLM)."""

__version__ = "0.1.0"

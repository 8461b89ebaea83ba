"""The anatomy-level vision-language model (fVLM backbone with the ViSD-Boost modules), bottom up:
``config`` (``ModelConfig``, the one set of hyperparameters), ``text`` (the BERT-style encoder from
a local folder), ``vision`` (3D ResNet18, per-anatomy query pooling and projections), ``normality``
(anatomy token rows, the VQ-VAE of phase 3 and the perception module of phase 4), ``network``
(``CTVLP``, the whole model), ``losses`` (Eq. 1 and Eq. 2 behind one interface), ``zeroshot``
(prompt scoring) and ``io`` (build, save, load)."""

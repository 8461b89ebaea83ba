"""The attention backends every attention call of the model runs under.

PyTorch's scaled_dot_product_attention picks a backend per call. Under bf16 on CUDA it prefers
cuDNN attention, which plans again for every new sequence length: the anatomy token rows of the
query pooling and of the VQ-VAE change length with every batch, so each call paid for a new plan
(measured on an H200: 127 ms per forward+backward of the VQ-VAE transformer, 10 ms without cuDNN
attention, 7 ms with repeated shapes). ``fixed_backends`` allows flash, memory-efficient and
math attention only (in that order of preference); their outputs agree with an fp32 math reference
(tests/model/test_model_attention.py).
"""

from __future__ import annotations

from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def fixed_backends():
    """Context manager: attention inside runs on ``BACKENDS`` (never cuDNN attention)."""
    return sdpa_kernel(list(BACKENDS))

"""The vision side: a 3D ResNet18 (MONAI) trunk whose feature cells are the anatomy tokens,
one learnable query per anatomy pooling its tokens, and a projection per anatomy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

from .. import catalog
from .attention import fixed_backends

N_ANATOMIES = len(catalog.anatomies())


class VisionEncoder(nn.Module):
    """3D ResNet18 (MONAI) trunk returning the feature map that anatomy tokens come from.

    token_stage 4: the last stage's map (stride 8 * stem_stride), as in the paper.
    token_stage 3: the third stage's map (stride 4 * stem_stride) concatenated with the last
    stage's map upsampled onto it: twice the token resolution for small organs and lesions.
    token_stage 2: the second stage's map (stride 2 * stem_stride) concatenated with the third and
    last stages' maps upsampled onto it: four times the paper's resolution, same trunk compute.
    token_stage 1: the first stage's map (stride stem_stride: 10 mm cells at 5 mm) with all deeper
    maps upsampled onto it: cells small enough that an organ's tokens hold little of its
    neighbours (bone next to a stone); 8x the tokens of stage 2, so the pooling costs more.

    ``gpu_layout(True)`` (training on CUDA): weights and inputs channels_last_3d, and the
    one-channel input padded with zero channels (the stem's weights with zeros) to ``STEM_CHANNELS``,
    the same result without cuDNN's slow fallback kernel for one input channel.
    """

    STEM_CHANNELS = 8

    def __init__(self, widths=(64, 128, 256, 512), stem_stride: int = 2, token_stage: int = 4):
        super().__init__()
        self.net = ResNet(block="basic", layers=[2, 2, 2, 2], block_inplanes=list(widths), spatial_dims=3,
                          n_input_channels=1, conv1_t_size=7, conv1_t_stride=stem_stride,
                          no_max_pool=True, feed_forward=False)
        self.token_stage = token_stage
        if token_stage not in (1, 2, 3, 4):
            raise ValueError(f"token_stage must be 1, 2, 3 or 4, got {token_stage!r}")
        self.out_channels = sum(widths[token_stage - 1:])
        self.stride = 2 ** (token_stage - 1) * stem_stride
        self.channels_last = False

    def gpu_layout(self, on: bool = True) -> VisionEncoder:
        self.channels_last = on
        return self.to(memory_format=torch.channels_last_3d if on else torch.contiguous_format)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.net.conv1
        if not self.channels_last or x.shape[1] >= self.STEM_CHANNELS:
            return conv(x)
        extra = self.STEM_CHANNELS - x.shape[1]
        x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, extra)).contiguous(memory_format=torch.channels_last_3d)
        weight = F.pad(conv.weight, (0, 0, 0, 0, 0, 0, 0, extra)).contiguous(memory_format=torch.channels_last_3d)
        return F.conv3d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.act(n.bn1(self.stem(x)))
        f1 = n.layer1(x)
        f2 = n.layer2(f1)
        f3 = n.layer3(f2)
        f4 = n.layer4(f3)
        maps = (f1, f2, f3, f4)[self.token_stage - 1:]
        if len(maps) == 1:
            return f4
        size = maps[0].shape[2:]
        return torch.cat([maps[0], *(F.interpolate(f, size=size, mode="nearest") for f in maps[1:])], dim=1)


class QueryPool(nn.Module):
    """One learnable query per anatomy attends over that anatomy's tokens (cross-attention)."""

    def __init__(self, n_queries: int, dim: int, heads: int, init_mean: bool = False):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, dim) * dim**-0.5)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.heads = heads
        if init_mean:
            # Start as the encoder's own mean pooling: zero queries attend uniformly, and identity
            # value/output maps pass the mean token through, keeping a pretrained text geometry.
            with torch.no_grad():
                self.queries.zero_()
                self.attn.in_proj_weight[2 * dim:].copy_(torch.eye(dim))
                self.attn.in_proj_bias.zero_()
                self.attn.out_proj.weight.copy_(torch.eye(dim))
                self.attn.out_proj.bias.zero_()

    def forward(self, tokens: torch.Tensor, allowed: torch.Tensor, query_idx: torch.Tensor | None = None):
        """tokens (B, N, C); allowed (B, Q, N) bool, which tokens each query may see.

        query_idx (B, Q) picks the anatomy query per row (default: all anatomies in order).
        Rows whose `allowed` is all False are returned as zeros (caller masks them out).
        """
        b = allowed.shape[0]
        if query_idx is None:
            query = self.queries.unsqueeze(0).expand(b, -1, -1)
        else:
            query = self.queries[query_idx]
        empty = ~allowed.any(-1)
        blocked = ~(allowed | empty.unsqueeze(-1))  # empty rows see everything, then get zeroed
        mask = blocked.repeat_interleave(self.heads, dim=0)
        with fixed_backends():
            out, _ = self.attn(query, tokens, tokens, attn_mask=mask, need_weights=False)
        return self.norm(out + query).masked_fill(empty.unsqueeze(-1), 0.0)


class AnatomyProjection(nn.Module):
    """A separate linear projection per anatomy."""

    def __init__(self, n: int, dim_in: int, dim_out: int, shared_orthogonal: bool = False):
        super().__init__()
        if shared_orthogonal:  # one orthogonal map for all anatomies: preserves the input geometry
            w = nn.init.orthogonal_(torch.empty(dim_in, dim_out)).expand(n, -1, -1).clone()
        else:
            w = torch.randn(n, dim_in, dim_out) * dim_in**-0.5
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(n, dim_out))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (..., dim_in), idx (...) anatomy index 0..M-1 of each row."""
        return torch.einsum("...i,...io->...o", x, self.weight[idx]) + self.bias[idx]


def heads_for(dim: int, heads: int) -> int:
    while dim % heads:
        heads -= 1
    return heads


def pad_to_multiple(arr: np.ndarray, multiple: int, value=0) -> np.ndarray:
    pads = [(0, (-s) % multiple) for s in arr.shape]
    return np.pad(arr, pads, constant_values=value) if any(p for _, p in pads) else arr

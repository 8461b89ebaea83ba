"""The attention calls of the model under the fixed backends (never cuDNN attention): each available
backend's output on padded, masked rows, including rows with nothing allowed, against an fp32
reference written out by hand (softmax over the allowed keys). Runs on CPU, and on CUDA where there
is one."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ctvlp.model.attention import BACKENDS, fixed_backends
from ctvlp.model.vision import QueryPool

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_pool(pool: QueryPool, tokens, allowed, query_idx):
    """QueryPool.forward in fp32, by hand: per head, softmax of q.k / sqrt(d) over allowed keys."""
    dim, heads = tokens.shape[-1], pool.heads
    w, b = pool.attn.in_proj_weight.double(), pool.attn.in_proj_bias.double()
    query = pool.queries.double()[query_idx]  # (B, Q, C)
    x = tokens.double()
    q = query @ w[:dim].T + b[:dim]
    k = x @ w[dim:2 * dim].T + b[dim:2 * dim]
    v = x @ w[2 * dim:].T + b[2 * dim:]

    def split(t):  # (B, L, C) -> (B, H, L, C/H)
        return t.view(t.shape[0], t.shape[1], heads, dim // heads).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / (dim // heads) ** 0.5  # (B, H, Q, N)
    empty = ~allowed.any(-1)
    see = allowed | empty.unsqueeze(-1)
    scores = scores.masked_fill(~see.unsqueeze(1), float("-inf"))
    out = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(query.shape)
    out = out @ pool.attn.out_proj.weight.double().T + pool.attn.out_proj.bias.double()
    normed = F.layer_norm(out + query, (dim,), pool.norm.weight.double(), pool.norm.bias.double(), pool.norm.eps)
    return normed.masked_fill(empty.unsqueeze(-1), 0.0)


def padded_rows(device, b=5, n=40, q=3, dim=32):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(b, n, dim, generator=g)
    lengths = torch.tensor([40, 17, 1, 9, 0])  # a full row, partial rows, one token, nothing allowed
    allowed = (torch.arange(n) < lengths[:, None]).unsqueeze(1).expand(b, q, n).clone()
    allowed[1, 2, 3:10] = False  # holes inside a row
    allowed[3, 1] = False  # one more query with nothing allowed
    query_idx = torch.randint(0, 6, (b, q), generator=g)
    return tokens.to(device), allowed.to(device), query_idx.to(device)


def usable(backend, device) -> bool:
    """Whether this build runs `backend` on `device` for a masked call."""
    x = torch.randn(1, 2, 3, 8, device=device)
    try:
        with sdpa_kernel([backend]):
            F.scaled_dot_product_attention(x, x, x, attn_mask=torch.ones(1, 1, 3, 3, dtype=torch.bool, device=device))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("device", DEVICES)
def test_each_fixed_backend_agrees_with_an_fp32_reference_on_masked_rows(device):
    torch.manual_seed(1)
    pool = QueryPool(6, 32, 4).to(device)
    tokens, allowed, query_idx = padded_rows(device)
    ref = reference_pool(pool.cpu(), tokens.cpu(), allowed.cpu(), query_idx.cpu())
    pool.to(device)
    tried = [b for b in BACKENDS if usable(b, device)]
    assert SDPBackend.MATH in tried and len(tried) >= 2  # math and at least one fast backend
    for backend in tried:
        with sdpa_kernel([backend]):
            out = pool(tokens, allowed, query_idx).double().cpu()
        assert torch.isfinite(out).all(), backend
        assert torch.allclose(out, ref, atol=2e-5), (backend, (out - ref).abs().max())
        empty = ~allowed.any(-1).cpu()
        assert (out[empty] == 0).all()
        if device == "cuda":  # bf16 as training runs it: relative error within 1%
            with sdpa_kernel([backend]), torch.autocast("cuda", dtype=torch.bfloat16):
                low = pool(tokens, allowed, query_idx).double().cpu()
            assert ((low - ref).norm() / ref.norm()) < 1e-2, backend


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_backends_under_bf16_autocast_agree_with_fp32(device):
    """What the model runs: the query pool under fixed_backends and bf16 autocast, within 1%
    relative error of the fp32 reference; no NaN from the rows with nothing allowed."""
    torch.manual_seed(2)
    pool = QueryPool(6, 32, 4).to(device)
    tokens, allowed, query_idx = padded_rows(device)
    ref = reference_pool(pool.cpu(), tokens.cpu(), allowed.cpu(), query_idx.cpu())
    pool.to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = pool(tokens, allowed, query_idx).double().cpu()
    assert torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 1e-2
    with fixed_backends():
        exact = pool(tokens, allowed, query_idx).double().cpu()
    assert torch.allclose(exact, ref, atol=2e-5)


def test_fixed_backends_exclude_cudnn_attention_and_keep_math_as_fallback():
    """cuDNN attention plans again for every new sequence length (issue 14's H200 measurement);
    math is the fallback that always exists."""
    assert SDPBackend.CUDNN_ATTENTION not in BACKENDS and BACKENDS[-1] == SDPBackend.MATH
    with fixed_backends():
        assert torch.backends.cuda.cudnn_sdp_enabled() is False
        assert torch.backends.cuda.math_sdp_enabled() is True
        assert torch.backends.cuda.flash_sdp_enabled() is True
    assert torch.backends.cuda.cudnn_sdp_enabled() is True  # restored outside

"""The normality VQ-VAE's numerics: fp32 quantisation and EMA under bf16 autocast, a seeded and
well-spread codebook initialisation, row length bucketing equal to the unbucketed computation
(VQ-VAE and the phase-4 boost path), and training that gives the same validation error when the
inputs are perturbed at bf16 rounding level or the transformers run under bf16 autocast."""

import copy

import pytest
import torch

from ctvlp.model.config import ModelConfig
from ctvlp.model.network import CTVLP
from ctvlp.model.normality import NormalityVQVAE, padded_length, plan_buckets


def _vq(**kw):
    torch.manual_seed(0)
    args = {"channels": 8, "n_anatomies": 3, "codes": 8, "code_dim": 4, "width": 16, "depth": 1, "heads": 2}
    return NormalityVQVAE(**{**args, **kw})


def _rows(lengths, channels=8, seed=0, holes=False):
    """Rows with the given real-token counts (prefix pads; holes: row 0's real tokens scattered)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    pad = torch.arange(width) < torch.tensor(lengths).unsqueeze(1)
    if holes:
        pad[0] = pad[0][torch.randperm(width, generator=g)]
    rows = (2.0 + torch.randn(len(lengths), width, channels, generator=g)) * pad.unsqueeze(-1)
    return rows, pad, torch.randint(0, 3, (len(lengths),), generator=g)


# ---- bucketing ---------------------------------------------------------------------------------
def test_padded_lengths_and_the_bucket_plan():
    assert [padded_length(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 24, 25, 33, 49, 65, 97, 129)] == \
        [1, 2, 4, 8, 8, 16, 16, 24, 24, 32, 48, 64, 96, 128, 192]
    lengths = [40, 20, 9, 3, 1]  # longest first; padded 40 (capped at L = 40), 24, 16, 4, 1
    assert plan_buckets(lengths, 40, 8) == [(1, 40), (1, 24), (1, 16), (1, 4), (1, 1)]
    # four buckets: merging {4, 1} costs 3 slots, any other merge more
    assert plan_buckets(lengths, 40, 4) == [(1, 40), (1, 24), (1, 16), (2, 4)]
    # two buckets: {40, 24} + {16, 4, 1} = 2 * 40 + 3 * 16 = 128 slots, tied with {40, 24, 16} + {4, 1}
    # (3 * 40 + 2 * 4) and below {40} + the rest (136); ties go to the shorter first bucket
    assert plan_buckets(lengths, 40, 2) == [(2, 40), (3, 16)]
    assert plan_buckets(lengths, 40, 1) == [(5, 40)]


def test_padding_fraction_by_hand():
    """Padding fraction: the share of the transformers' token slots (rows x padded length, the
    condition token not counted) that are padding."""
    vq = _vq()
    rows, pad, anat = _rows([1, 3, 20, 40, 9])
    real = 1 + 3 + 20 + 40 + 9
    vq.eval()(rows, pad, anat)
    assert vq.last_pad_fraction_unbucketed == pytest.approx(1 - real / (5 * 40))  # 0.635
    assert vq.last_pad_fraction == pytest.approx(1 - real / (40 + 24 + 16 + 2 * 4))  # 0.17
    bk = vq.buckets(pad)
    assert [tuple(g.pad.shape) for g in bk.groups] == [(1, 40), (1, 24), (1, 16), (2, 4)]
    assert [g.pad.sum().item() for g in bk.groups] == [40, 20, 9, 1 + 3]
    assert sorted(torch.cat([g.idx for g in bk.groups]).tolist()) == [0, 1, 2, 3, 4]
    given = vq.buckets(pad, lengths=[1, 3, 20, 40, 9])  # host lengths given: no sync, the same buckets
    assert all(torch.equal(g.idx, h.idx) and torch.equal(g.cols, h.cols) for g, h in zip(bk.groups, given.groups))
    vq.max_buckets = 2
    vq(rows, pad, anat)
    assert vq.last_pad_fraction == pytest.approx(1 - real / 128)
    vq.bucket = False
    vq(rows, pad, anat)
    assert vq.last_pad_fraction == vq.last_pad_fraction_unbucketed == pytest.approx(1 - real / 200)


def _compare(a, b, atol=2e-5):
    assert torch.allclose(a, b, rtol=1e-4, atol=atol), (a - b).abs().max()


@pytest.mark.parametrize("holes", [False, True])
def test_bucketed_equals_unbucketed(holes):
    """Forward outputs, losses, codebook initialisation and EMA update, and gradients agree to fp32
    rounding; the codes are identical (per-token exact distances)."""
    lengths = [1, 40, 1, 3, 7, 8, 9, 17, 64, 2, 30, 1, 5, 33]
    rows, pad, anat = _rows(lengths, holes=holes)
    bucketed = _vq()
    plain = copy.deepcopy(bucketed)
    plain.bucket = False
    for step in range(2):  # the first call initialises the codebooks and standardisation, the second only EMA
        outs = []
        for vq in (bucketed, plain):
            vq.train().zero_grad()
            out = vq(rows * (1 + step), pad, anat)
            out.loss.backward()
            outs.append(out)
        a, b = outs
        assert torch.equal(a.codes, b.codes) and torch.all(a.codes[~pad] == -1)
        for x, y in zip(a[:4] + a[5:], b[:4] + b[5:]):
            _compare(x, y)
        assert torch.all(a.recon[~pad] == 0) and torch.all(b.recon[~pad] == 0)
        for name in ("codebook", "ema_count", "ema_sum", "usage", "token_mean", "token_scale"):
            _compare(getattr(bucketed, name), getattr(plain, name))
        assert torch.equal(bucketed.initialised, plain.initialised)
        for (name, p), q in zip(bucketed.named_parameters(), plain.parameters()):
            _compare(p.grad, q.grad, atol=1e-5)
    assert bucketed.last_pad_fraction < 0.5 * bucketed.last_pad_fraction_unbucketed
    assert plain.last_pad_fraction == plain.last_pad_fraction_unbucketed > 0.7


def _boxes_volume(b=2, size=64, seed=0):
    """Anatomies as boxes of very different sizes: rows of 1 to ~64 tokens."""
    g = torch.Generator().manual_seed(seed)
    anatomy = torch.zeros(b, size, size, size, dtype=torch.uint8)
    for i in range(b):
        for j in range(12):
            side = torch.randint(4, 40, (3,), generator=g) if j % 3 else torch.full((3,), 6)
            lo = [int(torch.randint(0, size - int(s) + 1, (1,), generator=g)) for s in side]
            anatomy[i, lo[0]:lo[0] + side[0], lo[1]:lo[1] + side[1], lo[2]:lo[2] + side[2]] = j + 1
    return torch.rand(b, 1, size, size, size, generator=g), anatomy


def test_boost_path_bucketed_equals_unbucketed():
    torch.manual_seed(0)
    model = CTVLP(ModelConfig.from_settings(widths=(4, 8, 8, 16), embed_dim=16, heads=2, vq_codes=4, vq_dim=8,
                                            vq_depth=1, vq_heads=2, text_max_length=32)).eval()
    with torch.no_grad():
        model.perception.mlp[-1].weight.normal_()  # so that q matters
    image, anatomy = _boxes_volume()
    results = []
    for bucket in (True, False):
        model.vqvae.bucket = bucket
        model.zero_grad()
        emb, pooled = model.encode_image(image, anatomy, boost=True)
        (emb * torch.linspace(-1, 1, emb.shape[-1])).sum().backward()
        results.append((emb, pooled, [p.grad.clone() for p in (model.perception.mlp[0].weight,
                                                                 model.vis_pool.queries, model.vision.net.conv1.weight)]))
        if bucket:
            assert model.vqvae.last_pad_fraction < model.vqvae.last_pad_fraction_unbucketed
    (emb_a, pool_a, grads_a), (emb_b, pool_b, grads_b) = results
    _compare(emb_a, emb_b)
    _compare(pool_a, pool_b)
    for x, y in zip(grads_a, grads_b):
        _compare(x, y, atol=1e-5)


# ---- fp32 quantisation and a seeded, well-spread initialisation ----------------------------------
def test_ema_update_is_fp32_under_bf16_autocast():
    """bf16 latents of large cluster sizes (1001 per code): the codebook is their exact EMA mean.
    (Sums and counts in bf16, as before: counts 1001 -> 1000 and codes off by 3e-3 relative.)"""
    vq = _vq(codes=2, code_dim=4, data_init=False, decay=0.5)
    g = torch.Generator().manual_seed(0)
    z = (5.0 + torch.randn(2002, 4, generator=g)).bfloat16()
    codes = torch.arange(2002) % 2
    with torch.no_grad():
        vq.codebook.zero_()
        vq.ema_sum.zero_()
        vq.ema_count.fill_(1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vq.ema_update(z, torch.zeros(2002, dtype=torch.long), codes)
    z64 = z.double()
    count = 0.5 + 0.5 * 1001.0
    n = 2 * count
    smoothed = (count + vq.eps) / (n + 2 * vq.eps) * n
    expected = torch.stack([0.5 * z64[codes == k].sum(0) / smoothed for k in range(2)])
    assert vq.codebook.dtype == torch.float32
    assert torch.allclose(vq.codebook[0].double(), expected, rtol=1e-6, atol=0)
    assert vq.ema_count[0].tolist() == [count, count]


def test_quantisation_is_fp32_and_ties_go_to_the_lowest_code():
    vq = _vq(data_init=False).train()
    vq.bucket = False  # the encoder on the same shapes as below: the same bf16 latents
    rows, pad, anat = _rows([3, 5, 2])
    with torch.no_grad():
        vq.codebook[:, 3] = vq.codebook[:, 1]  # exact duplicates: code 1 must win every tie
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(rows, pad, anat, update_codebook=False)
        z = vq.encoder((rows - vq.token_mean) / vq.token_scale, pad, anat)
    assert z.dtype == torch.bfloat16  # the transformers run under the autocast
    ref = ((z.float().unsqueeze(2) - vq.codebook[anat].unsqueeze(1)) ** 2).sum(-1).argmin(-1)
    assert torch.equal(out.codes[pad], ref[pad]) and not torch.any(out.codes == 3)
    assert out.commit_loss.dtype == torch.float32


def _first_call(vq, rows, pad, anat):
    vq.train()(rows, pad, anat)
    return vq.codebook.clone()


def test_codebook_initialisation_is_seeded_not_global_rng():
    vq = _vq()
    other = copy.deepcopy(vq)
    rows, pad, anat = _rows([9, 12, 30, 4, 16])
    torch.manual_seed(1)
    a = _first_call(vq, rows, pad, anat)
    torch.manual_seed(2)  # another global RNG stream: the same codebook
    assert torch.equal(a, _first_call(other, rows, pad, anat))
    reseeded = _vq(init_seed=1)
    assert not torch.equal(a, _first_call(reseeded, rows, pad, anat))


def test_initialisation_spreads_codes_and_never_duplicates():
    """Few latents (and repeated tokens): all distinct latents become codes, the rest are distinct
    noisy copies; many latents: k-means++ + Lloyd codes are distinct data means."""
    vq = _vq(codes=8)
    token = torch.randn(2, 8)
    rows = token[[0, 1, 0, 0, 1]].unsqueeze(0)  # 5 tokens, 2 distinct
    vq.train()(rows, torch.ones(1, 5, dtype=torch.bool), torch.tensor([0]))
    book = vq.codebook[0]
    assert torch.cdist(book, book).add(torch.eye(8) * 1e9).min() > 0  # no two codes equal
    with torch.no_grad():
        z = vq.encoder((rows - vq.token_mean) / vq.token_scale, torch.ones(1, 5, dtype=torch.bool), torch.tensor([0]))
    # the two distinct latents are codes (then moved by one EMA step towards their means: themselves)
    assert torch.cdist(z[0, :2], book).min(1).values.max() < 1e-4
    rows, pad, _ = _rows([40, 40, 40], seed=3)
    vq = _vq(codes=8)
    vq.train()(rows, pad, torch.tensor([1, 1, 1]))
    book = vq.codebook[1]
    assert torch.cdist(book, book).add(torch.eye(8) * 1e9).min() > 1e-3
    assert vq.codebook_stats()["dead_codes"][1] <= 2


def test_state_dicts_without_token_standardisation_load_as_identity():
    vq = _vq()
    vq.train()(*_rows([5, 9, 3]))
    assert not torch.equal(vq.token_mean, torch.zeros(8))
    old = {k: v for k, v in vq.state_dict().items() if not k.startswith("token_")}
    fresh = _vq()
    fresh.load_state_dict(old)
    assert torch.equal(fresh.token_mean, torch.zeros(8)) and fresh.token_scale.item() == 1.0
    assert torch.equal(fresh.codebook, vq.codebook)
    again = _vq()
    again.load_state_dict(vq.state_dict())
    assert torch.equal(again.token_mean, vq.token_mean) and torch.equal(again.token_scale, vq.token_scale)


# ---- training stability --------------------------------------------------------------------------
M, C, DIM, K, CENTRES = 3, 16, 16, 16, 6
# tokens per row of each anatomy: the first one has fewer latents than K in its first call
LENGTHS = ((2, 4), (4, 12), (32, 64))
STEPS, BATCH, SEEDS = 250, 12, (0, 1, 2)


def _synthetic_rows(g, centres, n_rows):
    """Rows of an anatomy's tokens: each a random one of its 6 centres plus noise of variance 0.01."""
    anat = torch.randint(0, M, (n_rows,), generator=g)
    lengths = torch.tensor([int(torch.randint(LENGTHS[j][0], LENGTHS[j][1] + 1, (1,), generator=g))
                            for j in anat.tolist()])
    pad = torch.arange(int(lengths.max())) < lengths.unsqueeze(1)
    pick = torch.randint(0, CENTRES, pad.shape, generator=g)
    tokens = centres[anat.unsqueeze(1), pick] + 0.1 * torch.randn(*pad.shape, C, generator=g)
    return tokens * pad.unsqueeze(-1), pad, anat


def synthetic_data(seed):
    """STEPS training batches and 96 held-out rows; the features share a large offset, as post-ReLU
    features do (their mean is far from 0 compared with their spread)."""
    g = torch.Generator().manual_seed(1000 + seed)
    centres = 3.0 * torch.randn(C, generator=g) + torch.randn(M, CENTRES, C, generator=g)
    return [_synthetic_rows(g, centres, BATCH) for _ in range(STEPS)], _synthetic_rows(g, centres, 96)


def train_and_validate(seed, data, perturb=False, bf16=False, cls=NormalityVQVAE):
    """-> (mean validation row error, the same of predicting the mean token): STEPS Adam steps."""
    train, (rows, pad, anat) = data
    torch.manual_seed(seed)
    vq = cls(C, M, K, DIM, width=32, depth=1, heads=2)
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    flips = torch.Generator().manual_seed(77)
    for x, p, a in train:
        if perturb:  # relative 2^-8: bf16 rounding level
            x = x * (1 + 2.0 ** -8 * (2 * torch.randint(0, 2, x.shape, generator=flips) - 1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = vq.train()(x, p, a)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        error = vq.eval()(rows, pad, anat).row_error.mean().item()
    w = pad.unsqueeze(-1).float()
    mean = (rows * w).sum((0, 1)) / w.sum()
    baseline = (((rows - mean) ** 2 * w).sum((1, 2)) / (w.sum((1, 2)) * C)).mean().item()
    return error, baseline


@pytest.fixture(scope="module")
def stability_runs():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster for this tiny model, and as measured below
    try:
        runs = {}
        for seed in SEEDS:
            data = synthetic_data(seed)
            runs[seed] = {kind: train_and_validate(seed, data, perturb=kind == "perturbed", bf16=kind == "bf16")
                          for kind in ("fp32", "perturbed", "bf16")}
        return runs
    finally:
        torch.set_num_threads(threads)


# Run-to-run tolerance, relative to the reconstruction error itself: |error_a - error_b| <=
# RELATIVE * min(error_a, error_b). (Before, 0.005 x the baseline, the error of predicting the mean
# token (0.9-1.2 here): about 40% of the errors it compared (0.0115-0.0133 on seeds 0-2), so it
# hardly constrained them.) Measured with `python benchmarks/vq_padding.py --seeds 0 ... 11` (exactly this scenario, 1
# thread; benchmarks/results/vq_padding_cpu.md): this code, errors 0.0115-0.0151, largest relative
# difference 0.049 perturbed (seed 3; <= 0.005 on seeds 0-2) and 0.019 bf16 (<= 0.012 on seeds 0-2).
# The code before the stable phase 3 (05b8a95^: no token standardisation, global-RNG
# initialisation with duplicate codes, bf16 EMA sums), errors 0.06-0.82 (6-90% of the baseline): up to 0.39
# perturbed and 0.54 bf16; on seeds 0-2 it fails RELATIVE in both tests (0.21 perturbed at seed
# 0; 0.12, 0.54 and 0.17 bf16), besides failing LEARNED at every seed.
RELATIVE = 0.1  # 2x the largest of this code on 12 seeds, 8x on the test's seeds
LEARNED = 0.05  # every run: validation error below 5% of the baseline (the code before: 6-90%)


def test_training_is_stable_run_to_run(stability_runs):
    for seed, runs in stability_runs.items():
        (a, base), (b, _) = runs["fp32"], runs["perturbed"]
        assert a < LEARNED * base and b < LEARNED * base, (seed, a, b, base)
        assert abs(a - b) <= RELATIVE * min(a, b), (seed, a, b, base)


def test_training_under_bf16_autocast_matches_fp32(stability_runs):
    for seed, runs in stability_runs.items():
        (a, base), (b, _) = runs["fp32"], runs["bf16"]
        assert a < LEARNED * base and b < LEARNED * base, (seed, a, b, base)
        assert abs(a - b) <= RELATIVE * min(a, b), (seed, a, b, base)

"""ViSD-Boost's model parts: Eq. 2 visual CL, anatomy rows, normality VQ-VAE (Eq. 3), perception
module and the CLIP baseline head (the momentum encoder and the per-phase trainable groups are in
tests/training/test_training_trainable.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ctvlp.model.config import ModelConfig
from ctvlp.model.losses import disease_contrastive_loss, instance_contrastive_loss
from ctvlp.model.network import CTVLP
from ctvlp.model.normality import NormalityVQVAE, PerceptionMLP, anatomy_token_rows
from ctvlp.model.vision import N_ANATOMIES
from ctvlp.training.trainable import set_trainable


def _lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


# ---- Eq. 2 ----------------------------------------------------------------------------------
# B=3, M=1, D=2; row 0 abnormal, rows 1 and 2 normal; temperature 1 (logit_scale 0).
Q = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.6, 0.8]]])
K = torch.tensor([[[0.8, 0.6]], [[0.0, 1.0]], [[1.0, 0.0]]])
NORMAL = torch.tensor([[False], [True], [True]])
VALID = torch.ones(3, 1, dtype=torch.bool)
# <q_i, k_k> by hand
S0 = (0.8, 0.0, 1.0)
S1 = (0.6, 1.0, 0.0)
S2 = (0.96, 0.8, 0.6)


def test_eq2_hand_computed():
    row0 = -(S0[0] - _lse(*S0))                              # abnormal: own view only
    row1 = -(S1[1] - _lse(*S1)) - (S1[2] - _lse(*S1))        # normal: both normal keys, summed
    row2 = -(S2[1] - _lse(*S2)) - (S2[2] - _lse(*S2))
    loss = disease_contrastive_loss(Q, K, VALID, NORMAL, torch.tensor(0.0))
    assert loss.item() == pytest.approx((row0 + row1 + row2) / 3, abs=1e-6)
    inst = instance_contrastive_loss(Q, K, VALID, torch.tensor(0.0))
    expected = (row0 - (S1[1] - _lse(*S1)) - (S2[2] - _lse(*S2))) / 3
    assert inst.item() == pytest.approx(expected, abs=1e-6)


def test_eq2_temperature_and_invalid_keys():
    # logit_scale log(2): logits doubled; sample 2 invalid: neither a row nor a key
    valid = torch.tensor([[True], [True], [False]])
    loss = disease_contrastive_loss(Q, K, valid, NORMAL, math.log(2.0))
    l0 = [2 * s for s in S0[:2]]
    l1 = [2 * s for s in S1[:2]]
    expected = (-(l0[0] - _lse(*l0)) - (l1[1] - _lse(*l1))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_instance_loss_differs_exactly_when_two_normals_share_an_anatomy():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 2, 3), dim=-1)
    k = F.normalize(torch.randn(4, 2, 3), dim=-1)
    valid = torch.ones(4, 2, dtype=torch.bool)
    inst = instance_contrastive_loss(q, k, valid, 0.0)
    no_normal = torch.zeros(4, 2, dtype=torch.bool)
    one_each = torch.tensor([[True, False], [False, True], [False, False], [False, False]])
    two_same = torch.tensor([[True, False], [True, False], [False, False], [False, False]])
    assert disease_contrastive_loss(q, k, valid, no_normal, 0.0).item() == pytest.approx(inst.item(), abs=1e-6)
    assert disease_contrastive_loss(q, k, valid, one_each, 0.0).item() == pytest.approx(inst.item(), abs=1e-6)
    assert abs(disease_contrastive_loss(q, k, valid, two_same, 0.0).item() - inst.item()) > 1e-3


def test_eq2_without_contrast_is_zero_and_attached():
    q = F.normalize(torch.randn(3, 2, 4), dim=-1).requires_grad_(True)
    k = F.normalize(torch.randn(3, 2, 4), dim=-1)
    for valid in (torch.zeros(3, 2, dtype=torch.bool), torch.tensor([[True, False], [False, True], [False, False]])):
        loss = disease_contrastive_loss(q, k, valid, torch.ones(3, 2, dtype=torch.bool), torch.tensor(1.0))
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.isfinite(q.grad).all()


# ---- anatomy token rows --------------------------------------------------------------------------
def test_anatomy_token_rows_gathers_the_masked_tokens():
    tokens = torch.arange(30, dtype=torch.float32).view(2, 5, 3) + 1  # no zero token
    allowed = torch.zeros(2, 3, 5, dtype=torch.bool)
    allowed[0, 0, [1, 3]] = True
    allowed[0, 2, [0, 1, 2, 4]] = True
    allowed[1, 1, [4]] = True
    rows = anatomy_token_rows(tokens, allowed)
    assert rows.batch.tolist() == [0, 0, 1] and rows.anatomy.tolist() == [0, 2, 1]
    assert rows.tokens.shape == (3, 4, 3) and rows.pad.sum(1).tolist() == [2, 4, 1]
    for r in range(3):
        b, j = int(rows.batch[r]), int(rows.anatomy[r])
        assert torch.equal(rows.tokens[r][rows.pad[r]], tokens[b][allowed[b, j]])
        assert torch.all(rows.tokens[r][~rows.pad[r]] == 0)
        assert rows.index[r][rows.pad[r]].tolist() == allowed[b, j].nonzero().flatten().tolist()
    only = anatomy_token_rows(tokens, allowed, rows_mask=torch.tensor([[False, False, True], [True, True, True]]))
    assert only.batch.tolist() == [0, 1] and only.anatomy.tolist() == [2, 1] and only.tokens.shape == (2, 4, 3)
    empty = anatomy_token_rows(tokens, torch.zeros_like(allowed))
    assert empty.tokens.shape == (0, 0, 3) and empty.pad.shape == (0, 0)


# ---- normality VQ-VAE ----------------------------------------------------------------------------
def _vq(**kw):
    torch.manual_seed(0)
    args = {"channels": 8, "n_anatomies": 2, "codes": 8, "code_dim": 4, "width": 16, "depth": 1, "heads": 2}
    return NormalityVQVAE(**{**args, **kw})


def test_ema_codebook_update_hand_computed():
    eps = 0.1  # large, so the Laplace smoothing shows
    vq = _vq(codes=2, code_dim=2, decay=0.5, eps=eps, data_init=False)
    with torch.no_grad():
        vq.codebook[0] = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
        vq.ema_sum.copy_(vq.codebook)
        vq.ema_count.fill_(1.0)
        vq.ema_count[1] = torch.tensor([1.0, 3.0])
    other = vq.codebook[1].clone()
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [10.0, 12.0]])
    vq.ema_update(z, torch.tensor([0, 0, 0]), torch.tensor([0, 0, 1]))
    n0, n1 = 0.5 * 1 + 0.5 * 2, 0.5 * 1 + 0.5 * 1          # cluster sizes
    m0, m1 = [0.5 * 0 + 0.5 * 4, 0.0], [0.5 * 10 + 0.5 * 10, 0.5 * 10 + 0.5 * 12]
    n = n0 + n1
    s0, s1 = (n0 + eps) / (n + 2 * eps) * n, (n1 + eps) / (n + 2 * eps) * n
    expected = torch.tensor([[m0[0] / s0, m0[1] / s0], [m1[0] / s1, m1[1] / s1]])
    assert torch.allclose(vq.codebook[0], expected, atol=1e-6)
    assert vq.ema_count[0].tolist() == pytest.approx([n0, n1])
    assert torch.equal(vq.codebook[1], other) and vq.ema_count[1].tolist() == [1.0, 3.0]  # absent: unchanged
    assert vq.usage[0].tolist() == [2.0, 1.0]


def test_forward_updates_codebook_only_in_training_with_nearest_codes():
    vq = _vq(data_init=False)
    rows, pad = torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    pad[2, 3:] = False
    anat = torch.tensor([0, 1, 0])
    before = vq.codebook.clone()
    vq.eval()(rows, pad, anat)
    vq.train()(rows, pad, anat, update_codebook=False)
    assert torch.equal(vq.codebook, before)
    with torch.no_grad():
        z = vq.encoder(rows, pad, anat)
    codes = torch.cdist(z, before[anat]).argmin(-1)
    ref = _vq(data_init=False)
    ref.load_state_dict(vq.state_dict())
    ref.ema_update(z[pad], anat.unsqueeze(1).expand_as(pad)[pad], codes[pad])
    out = vq.train()(rows, pad, anat)
    assert torch.equal(out.codes[pad], codes[pad]) and torch.all(out.codes[~pad] == -1)
    assert torch.allclose(vq.codebook, ref.codebook, atol=1e-6)
    assert not torch.equal(vq.codebook, before)


def test_commitment_gradient_reaches_only_the_encoder():
    vq = _vq()
    out = vq.train()(torch.randn(4, 6, 8), torch.ones(4, 6, dtype=torch.bool), torch.tensor([0, 1, 1, 0]))
    out.commit_loss.backward()
    assert all(p.grad is not None for p in vq.encoder.parameters())
    assert vq.encoder.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in vq.decoder.parameters())
    assert not vq.codebook.requires_grad and vq.codebook.grad is None
    assert "codebook" not in dict(vq.named_parameters())


def test_straight_through_gradient_reaches_the_encoder_from_reconstruction():
    vq = _vq()
    out = vq.train()(torch.randn(4, 6, 8), torch.ones(4, 6, dtype=torch.bool), torch.tensor([0, 1, 1, 0]))
    out.recon_loss.backward()
    assert vq.encoder.inp.weight.grad.abs().sum() > 0
    assert vq.decoder.out.weight.grad.abs().sum() > 0


def _normal_rows(centers, n_rows, gen):
    """rows of 6 tokens, each a random one of its anatomy's centres plus small noise."""
    anat = torch.randint(0, centers.shape[0], (n_rows,), generator=gen)
    pick = torch.randint(0, centers.shape[1], (n_rows, 6), generator=gen)
    tokens = centers[anat.unsqueeze(1), pick] + 0.05 * torch.randn(n_rows, 6, centers.shape[-1], generator=gen)
    return tokens, torch.ones(n_rows, 6, dtype=torch.bool), anat


def test_vqvae_learns_normality_and_flags_out_of_distribution_rows():
    vq = _vq()
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(2, 3, 8, generator=gen)
    held = _normal_rows(centers, 32, gen)
    vq.eval()
    first = vq(*held).recon_loss.item()
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    for _ in range(100):
        out = vq.train()(*_normal_rows(centers, 16, gen))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    vq.eval()
    normal = vq(*held)
    assert normal.recon_loss.item() < 0.3 * first
    abnormal_tokens = held[0] + 1.5 * torch.randn(held[0].shape, generator=gen)
    abnormal = vq(abnormal_tokens, held[1], held[2])
    assert abnormal.row_error.min() > normal.row_error.max()
    stats = vq.codebook_stats()
    assert stats["anatomies_seen"] == 2 and 1.0 <= stats["mean_perplexity"] <= 8.0


def test_codebook_stats_perplexity_and_dead_codes():
    vq = _vq(codes=4)
    rows = torch.ones(5, 3, 8)  # every token identical -> one code
    vq.train()(rows, torch.ones(5, 3, dtype=torch.bool), torch.zeros(5, dtype=torch.long))
    stats = vq.codebook_stats()
    assert stats["perplexity"][0] == pytest.approx(1.0) and stats["dead_codes"][0] == 3
    assert stats["anatomies_seen"] == 1 and stats["perplexity"][1] == 0.0 and stats["dead_codes"][1] == 4
    vq.reset_usage()
    vq.usage[0] = torch.tensor([3.0, 3.0, 3.0, 3.0])
    vq.usage[1] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    stats = vq.codebook_stats()
    assert stats["perplexity"] == pytest.approx([4.0, 2.0])
    assert stats["dead_codes"] == [0, 2] and stats["mean_perplexity"] == pytest.approx(3.0)


def test_vqvae_empty_input():
    vq = _vq()
    out = vq.train()(torch.zeros(0, 0, 8), torch.zeros(0, 0, dtype=torch.bool), torch.zeros(0, dtype=torch.long))
    assert out.loss.item() == 0.0 and out.loss.requires_grad and out.row_error.shape == (0,)


# ---- perception and the boosted image path -------------------------------------------------------
def test_perception_starts_as_identity():
    torch.manual_seed(0)
    per = PerceptionMLP(6)
    f, q = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    assert torch.equal(per(f, q), f)
    with torch.no_grad():
        per.mlp[-1].weight.normal_()
    assert not torch.allclose(per(f, q), f)


def test_replace_fusion_is_the_mlp_alone_and_residual_adds_f():
    """fusion "replace" (the paper): f_hat = MLP([f, q]), f enters only through the MLP; "residual":
    f + the same MLP. With the same MLP weights the two differ by exactly f."""
    torch.manual_seed(0)
    replace, residual = PerceptionMLP(6, fusion="replace"), PerceptionMLP(6, fusion="residual")
    residual.load_state_dict(replace.state_dict())
    f, q = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    assert torch.allclose(residual(f, q) - replace(f, q), f, atol=1e-6)
    assert not torch.allclose(replace(f, q), f)  # not the identity at the start
    with torch.no_grad():  # an MLP that outputs 0: replace gives 0 whatever f is, residual gives f
        replace.mlp[-1].weight.zero_()
        replace.mlp[-1].bias.zero_()
    assert torch.equal(replace(f, q), torch.zeros_like(f)) and torch.equal(replace(f * 3, q), torch.zeros_like(f))
    with pytest.raises(ValueError, match="fusion"):
        PerceptionMLP(6, fusion="sum")


@pytest.mark.parametrize("fusion", ["residual", "replace"])
def test_the_boosted_image_path_uses_the_configured_fusion(fusion):
    torch.manual_seed(0)
    model = CTVLP(ModelConfig.from_settings(widths=(4, 8, 8, 16), embed_dim=16, heads=2, vq_codes=4, vq_dim=8,
                                            vq_depth=1, vq_heads=2, text_max_length=32, fusion=fusion)).eval()
    assert model.perception.fusion == fusion
    image, anatomy = _volume(3)
    with torch.no_grad():
        fvlm, _ = model.encode_image(image, anatomy, boost=False)
        boosted, _ = model.encode_image(image, anatomy, boost=True)
    same = torch.allclose(fvlm, boosted, atol=1e-6)
    assert same if fusion == "residual" else not same  # residual starts at the fVLM embedding


@pytest.fixture(scope="module")
def vq_model():
    torch.manual_seed(0)
    return CTVLP(ModelConfig.from_settings(widths=(4, 8, 8, 16), embed_dim=16, heads=2, vq_codes=4, vq_dim=8, vq_depth=1,
                 global_head=True)).eval()


def _volume(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 1, 32, 32, 32, generator=g),
            torch.randint(0, N_ANATOMIES + 1, (b, 32, 32, 32), generator=g, dtype=torch.uint8))


def test_encode_image_without_boost_is_the_fvlm_path(vq_model):
    img, anat = _volume()
    with torch.no_grad():
        feats = vq_model.vision(img)
        tokens = feats.flatten(2).transpose(1, 2)
        pooled = vq_model.vis_pool(tokens, CTVLP.token_masks(anat, feats.shape[2:]))
        idx = torch.arange(N_ANATOMIES).expand(2, -1)
        ref = F.normalize(vq_model.vis_proj(pooled, idx), dim=-1)
        assert not vq_model.boost
        for emb, pool in (vq_model.encode_image(img, anat), vq_model.encode_image(img, anat, boost=False)):
            assert torch.equal(emb, ref) and torch.equal(pool, pooled)


def test_boost_starts_at_the_fvlm_embedding_and_then_departs(vq_model):
    img, anat = _volume(1)
    anat[1] = 0
    anat[1, :16] = 5  # sample 1 holds one anatomy only; the others must stay as the unboosted path
    with torch.no_grad():
        plain, _ = vq_model.encode_image(img, anat, boost=False)
        boosted, pooled = vq_model.encode_image(img, anat, boost=True)
        assert torch.allclose(boosted, plain, atol=1e-5)
        assert torch.all(pooled[1, :4] == 0) and torch.all(pooled[1, 5:] == 0) and pooled[1, 4].abs().sum() > 0
        per = vq_model.perception.mlp[-1]
        saved = per.weight.clone()
        per.weight.normal_()
        changed, _ = vq_model.encode_image(img, anat, boost=True)
        dec = vq_model.vqvae.decoder.out.bias
        dec += 1.0  # a different reconstruction q changes f_hat
        other_q, _ = vq_model.encode_image(img, anat, boost=True)
        dec -= 1.0
        per.weight.copy_(saved)
    assert not torch.allclose(changed[0], plain[0], atol=1e-3)
    assert not torch.allclose(other_q[0], changed[0], atol=1e-3)
    assert torch.allclose(changed[1, 0], plain[1, 0], atol=1e-5)  # absent anatomy: projection bias only


def test_global_baseline_heads(vq_model):
    img, _ = _volume(2)
    body = torch.zeros(2, 32, 32, 32, dtype=torch.bool)
    body[:, :16, :16, :16] = True  # feature stride 16: only cell 0
    with torch.no_grad():
        emb = vq_model.encode_image_global(img, body)
        cell0 = vq_model.vision(img).flatten(2)[:, :, 0]
        assert torch.allclose(emb, F.normalize(vq_model.vis_global(cell0), dim=-1), atol=1e-6)
        allcells = vq_model.encode_image_global(img)
        assert allcells.shape == (2, 16) and not torch.allclose(allcells, emb)
        txt = vq_model.encode_report_global(["The liver is unremarkable.", "Hepatic cyst. Renal stone."])
    assert txt.shape == (2, 16) and torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)




@pytest.mark.parametrize("straight_through", [False, True])
def test_phase4_gradient_through_the_frozen_vqvae_only_when_asked(straight_through):
    """train.boost.gradient: with the perception module reading only q (its f inputs zeroed), the
    encoder gets a gradient exactly when the path through the frozen VQ-VAE is open
    (straight_through); the VQ-VAE's own parameters and codebook never change either way."""
    torch.manual_seed(0)
    model = CTVLP(ModelConfig.from_settings(widths=(4, 8, 8, 16), embed_dim=16, heads=2, vq_codes=4, vq_dim=8,
                                            vq_depth=1, vq_heads=2, text_max_length=32, fusion="replace"))
    set_trainable(model, "boost")
    model.vq_gradient = straight_through
    c = model.perception.mlp[0].in_features // 2
    with torch.no_grad():
        model.perception.mlp[0].weight[:, :c] = 0  # f_hat = MLP(0 * f, q): only q reaches the output
    book = model.vqvae.codebook.clone()
    image, anatomy = _volume(2)
    emb, _ = model.encode_image(image, anatomy, boost=True)
    emb.sum().backward()
    grads = [p.grad for p in model.vision.parameters()]
    reached = any(g is not None and g.abs().sum() > 0 for g in grads)
    assert reached == straight_through
    assert all(p.grad is None for p in model.vqvae.parameters())  # frozen parameters, either way
    assert torch.equal(model.vqvae.codebook, book)
    assert model.perception.mlp[0].weight.grad is not None  # the perception module trains either way

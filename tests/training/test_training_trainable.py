"""Training policy: the phase-1 momentum encoder and the per-phase trainable parameter groups."""

import pytest
import torch
from torch import nn

from ctvlp.model.config import ModelConfig
from ctvlp.model.network import CTVLP
from ctvlp.model.vision import N_ANATOMIES
from ctvlp.training.trainable import (
    PHASE_TRAINABLE,
    make_momentum_copy,
    momentum_update,
    set_trainable,
)


def test_momentum_copy_and_update_arithmetic():
    online = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        online[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        online[0].bias.fill_(0.5)
    target = make_momentum_copy(online)
    assert not any(p.requires_grad for p in target.parameters())
    assert target[0].weight.data_ptr() != online[0].weight.data_ptr()
    assert torch.equal(target[0].weight, online[0].weight)
    with torch.no_grad():
        online[0].weight.copy_(torch.tensor([[3.0, -2.0]]))
        online[0].bias.fill_(-0.5)
        online[1].running_mean.fill_(7.0)
    momentum_update(online, target, 0.9)
    assert torch.allclose(target[0].weight, torch.tensor([[0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2]]))
    assert target[0].bias.item() == pytest.approx(0.9 * 0.5 + 0.1 * -0.5)
    assert target[1].running_mean.item() == 7.0  # buffers copied, not averaged
    assert online[0].weight.tolist() == [[3.0, -2.0]]  # online untouched




# ---- trainable parameters per phase ----------------------------------------------------------------
def _volume(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 1, 32, 32, 32, generator=g),
            torch.randint(0, N_ANATOMIES + 1, (b, 32, 32, 32), generator=g, dtype=torch.uint8))


def _everything_loss(m: CTVLP, img, anat):
    """A loss that reaches every parameter group that can train in some phase."""
    emb, _ = m.encode_image(img, anat, boost=True)
    txt = m.encode_texts(["The liver is unremarkable.", "Hepatic cyst."], torch.tensor([10, 10]))
    rows = m.anatomy_rows(img, anat)
    vq = m.vqvae(rows.tokens, rows.pad, rows.anatomy, update_codebook=False).loss
    glob = (m.encode_image_global(img) * m.encode_report_global(["Normal.", "Hepatic cyst."])).sum()
    return m.logit_scale.exp() * ((emb[:, 10] * txt).sum() + vq + glob)


def test_set_trainable_gradients_reach_exactly_the_phase_groups():
    torch.manual_seed(0)
    m = CTVLP(ModelConfig.from_settings(widths=(4, 8, 8, 16), embed_dim=16, heads=2, vq_codes=4, vq_dim=8, vq_depth=1, global_head=True,
              train_text_encoder=True))
    img, anat = _volume(3)
    book = m.vqvae.codebook.clone()
    for phase, groups in PHASE_TRAINABLE.items():
        names = set_trainable(m, phase)
        assert {n.split(".")[0] for n in names} == set(groups)
        assert m.boost == (phase == "boost")
        m.zero_grad(set_to_none=True)
        _everything_loss(m, img, anat).backward()
        got = {n for n, p in m.named_parameters() if p.grad is not None}
        # BERT's pooler is never used (token states only), so it trains but receives no gradient
        assert got == {n for n in names if ".pooler." not in n}, phase
    assert torch.equal(m.vqvae.codebook, book)
    m.train_text_encoder, m.train_text_head = False, False
    names = set_trainable(m, "align")
    assert {n.split(".")[0] for n in names} == {"vision", "vis_pool", "vis_proj", "logit_scale"}
    assert "boost_on" in m.state_dict()
    with pytest.raises(ValueError):
        set_trainable(CTVLP(ModelConfig.from_settings(widths=(4, 8, 8, 16), embed_dim=16, heads=2, vq_codes=0)), "boost")

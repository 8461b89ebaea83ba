"""What one step of phases 1 and 3 does: phase 3 feeds only NORMAL anatomies to the VQ-VAE and
updates its codebook by EMA; phase 1's momentum encoder sees the augmented view and follows the
online encoder after each step."""

import torch

from ctvlp.model.config import ModelConfig
from ctvlp.model.network import CTVLP
from ctvlp.model.vision import N_ANATOMIES
from ctvlp.training.phases import NormalityPhase, VisualContrastPhase
from ctvlp.training.trainable import set_trainable

CPU = torch.device("cpu")
J_NORMAL, J_ABNORMAL = 0, 1  # two anatomies present in every sample


def _model(vq: bool) -> CTVLP:
    torch.manual_seed(0)
    return CTVLP(ModelConfig.from_settings(widths=(4, 8, 8, 16), embed_dim=16, heads=2, text_max_length=32,
                                           vq_codes=4 if vq else 0, vq_dim=8, vq_depth=1, vq_heads=2))


def _batch(b=4):
    g = torch.Generator().manual_seed(1)
    anatomy = torch.zeros(b, 32, 32, 32, dtype=torch.uint8)
    anatomy[:, 2:14, 2:30, 2:30] = J_NORMAL + 1
    anatomy[:, 18:30, 2:30, 2:30] = J_ABNORMAL + 1
    valid = torch.zeros(b, N_ANATOMIES, dtype=torch.bool)
    valid[:, [J_NORMAL, J_ABNORMAL]] = True
    normal = torch.zeros(b, N_ANATOMIES, dtype=torch.bool)
    normal[:, J_NORMAL] = True
    return {"image": torch.rand(b, 1, 32, 32, 32, generator=g), "anatomy": anatomy, "valid": valid, "normal": normal,
            "text_idx": torch.zeros(b, N_ANATOMIES, dtype=torch.long), "index": torch.arange(b)}


def test_phase3_feeds_only_normal_anatomies_and_updates_their_codebook_by_ema(tmp_path):
    model = _model(vq=True)
    set_trainable(model, "normality")
    task = NormalityPhase(model, tmp_path, {}, device=CPU, val_loader=[])
    task.train_mode()
    vq = model.vqvae
    seen = []
    forward = vq.forward
    vq.forward = lambda rows, pad, anatomy, **kw: (seen.append(anatomy.clone()), forward(rows, pad, anatomy, **kw))[1]
    book, count = vq.codebook.clone(), vq.ema_count.clone()
    loss, rows, extra = task.step(_batch())
    assert torch.isfinite(loss) and rows == 4  # one normal row per sample
    assert seen and torch.equal(torch.cat(seen).unique(), torch.tensor([J_NORMAL]))
    # the normal anatomy's codebook was initialised from its latents and moved by the EMA; the
    # abnormal one's, never fed, is untouched
    assert bool(vq.initialised[J_NORMAL]) and not bool(vq.initialised[J_ABNORMAL])
    assert not torch.equal(vq.codebook[J_NORMAL], book[J_NORMAL])
    assert torch.equal(vq.codebook[J_ABNORMAL], book[J_ABNORMAL]) and torch.equal(vq.ema_count[J_ABNORMAL], count[J_ABNORMAL])
    assert vq.usage[J_NORMAL].sum() > 0 and vq.usage[J_ABNORMAL].sum() == 0
    # a second step moves the normal codebook again by the EMA (decay < 1), still nothing else
    after_first = vq.codebook[J_NORMAL].clone()
    task.step(_batch())
    assert not torch.equal(vq.codebook[J_NORMAL], after_first)
    assert torch.equal(vq.codebook[J_ABNORMAL], book[J_ABNORMAL])
    assert {"recon", "commit", "perplexity", "dead_codes"} <= set(extra)


def test_phase1_momentum_encoder_sees_the_augmented_view_and_follows_the_online_one(tmp_path):
    model = _model(vq=False)
    set_trainable(model, "visual_cl")
    task = VisualContrastPhase(model, tmp_path, {}, device=CPU, val_loader=[], contrast="disease", momentum=0.5,
                               temperature=0.1)
    task.train_mode()
    batch = _batch()
    views = {}
    online_encode, key_encode = model.encode_image, task.key.encode_image
    model.encode_image = lambda image, anatomy, **kw: (views.__setitem__("online", image), online_encode(image, anatomy, **kw))[1]
    task.key.encode_image = lambda image, anatomy, **kw: (views.__setitem__("key", image), key_encode(image, anatomy, **kw))[1]
    target = {k: v.clone() for k, v in task.target.state_dict().items()}
    assert all(torch.equal(v, task.online.state_dict()[k]) for k, v in target.items())  # a copy at the start
    loss, pairs, _ = task.step(batch)
    assert torch.equal(views["online"], batch["image"])
    assert views["key"].shape == batch["image"].shape and not torch.allclose(views["key"], batch["image"])
    # one optimizer step of the online encoder, then the momentum update
    params = [p for p in model.parameters() if p.requires_grad]
    loss.backward()
    torch.optim.SGD(params, lr=1.0).step()
    online_after = {k: v.clone() for k, v in task.online.state_dict().items()}
    task.after_step(0, 1)
    moved = 0
    for name, value in task.target.state_dict().items():
        if not value.is_floating_point() or name.endswith(("running_mean", "running_var")):
            continue
        expected = 0.5 * target[name] + 0.5 * online_after[name]
        assert torch.allclose(value, expected, atol=1e-6), name
        moved += not torch.equal(value, target[name])
    assert moved > 0  # the key encoder moved towards the online one
    assert not any(p.requires_grad for p in task.key.parameters())  # it never trains itself

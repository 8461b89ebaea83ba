import math

import pytest
import torch

from ctvlp import catalog
from ctvlp.model.config import ModelConfig
from ctvlp.model.losses import AlignmentLoss, AnatomyRows, alignment_loss, calibrated_targets
from ctvlp.model.network import CTVLP
from ctvlp.model.vision import N_ANATOMIES, QueryPool, VisionEncoder
from ctvlp.model.zeroshot import zero_shot_scores
from ctvlp.training.loop import warmup_cosine

E = math.e


def _pairs(normal, texts, valid=None):
    normal = torch.tensor(normal).reshape(-1, 1)
    valid = torch.ones_like(normal) if valid is None else torch.tensor(valid).reshape(-1, 1)
    tid = torch.tensor(texts).reshape(-1, 1)
    return valid, normal, tid


def test_eq1_hand_computed_without_calibration():
    # two samples, one anatomy, orthogonal unit embeddings, temperature 1: logits [[1, 0], [0, 1]]
    img = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    valid, normal, tid = _pairs([False, False], [0, 1])
    pos = calibrated_targets(valid, normal, tid, calibrate=True)
    loss = alignment_loss(img, img.clone(), valid, pos, torch.tensor(0.0))
    assert loss.item() == pytest.approx(math.log(1 + 1 / E), abs=1e-6)  # -log(e / (e + 1))


def test_eq1_false_negative_calibration_makes_normal_pairs_positive():
    img = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    valid, normal, tid = _pairs([True, True], [0, 1])
    calibrated = alignment_loss(img, img, valid, calibrated_targets(valid, normal, tid, True), torch.tensor(0.0))
    # targets are [0.5, 0.5] per row: 0.5 * (-log(e/(e+1))) + 0.5 * (-log(1/(e+1)))
    expected = 0.5 * (math.log(1 + 1 / E) + math.log(1 + E))
    assert calibrated.item() == pytest.approx(expected, abs=1e-6)
    plain = alignment_loss(img, img, valid, calibrated_targets(valid, normal, tid, False), torch.tensor(0.0))
    assert plain.item() == pytest.approx(math.log(1 + 1 / E), abs=1e-6)


def test_identical_texts_are_positives_even_if_abnormal():
    valid, normal, tid = _pairs([False, False, False], [7, 7, 3])
    pos = calibrated_targets(valid, normal, tid, True)[0]
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_invalid_samples_leave_the_loss_unchanged():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 1, 4), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 1, 4), dim=-1)
    valid, normal, tid = _pairs([False, True, True], [0, 1, 2], valid=[True, True, False])
    full = alignment_loss(img, txt, valid, calibrated_targets(valid, normal, tid), torch.tensor(1.0))
    v2, n2, t2 = _pairs([False, True], [0, 1])
    two = alignment_loss(img[:2], txt[:2], v2, calibrated_targets(v2, n2, t2), torch.tensor(1.0))
    assert full.item() == pytest.approx(two.item(), abs=1e-6)


def test_matches_clip_cross_entropy_when_uncalibrated():
    torch.manual_seed(1)
    b, d = 5, 8
    img = torch.nn.functional.normalize(torch.randn(b, 1, d), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(b, 1, d), dim=-1)
    valid, normal, tid = _pairs([False] * b, list(range(b)))
    scale = torch.tensor(math.log(10.0))
    ours = alignment_loss(img, txt, valid, calibrated_targets(valid, normal, tid, False), scale)
    logits = 10.0 * img[:, 0] @ txt[:, 0].T
    ref = 0.5 * (torch.nn.functional.cross_entropy(logits, torch.arange(b))
                 + torch.nn.functional.cross_entropy(logits.T, torch.arange(b)))
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)


def test_anatomy_with_one_valid_sample_gives_no_contrast():
    img = torch.nn.functional.normalize(torch.randn(2, 1, 4), dim=-1)
    valid, normal, tid = _pairs([True, False], [0, 1], valid=[True, False])
    loss = alignment_loss(img, img, valid, calibrated_targets(valid, normal, tid), torch.tensor(0.0))
    assert loss.item() == 0.0


def test_query_pool_ignores_tokens_outside_the_anatomy():
    torch.manual_seed(0)
    pool = QueryPool(2, 8, 2).eval()
    tokens = torch.randn(1, 6, 8)
    allowed = torch.tensor([[[True, True, False, False, False, False], [False] * 6]])
    out = pool(tokens, allowed)
    changed = tokens.clone()
    changed[:, 2:] = torch.randn(1, 4, 8) * 10
    assert torch.allclose(pool(changed, allowed)[0, 0], out[0, 0], atol=1e-6)
    assert torch.all(out[0, 1] == 0)  # absent anatomy -> zeros (masked out by the caller)
    moved = tokens.clone()
    moved[:, :2] += 1.0
    assert not torch.allclose(pool(moved, allowed)[0, 0], out[0, 0])


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return CTVLP(ModelConfig.from_settings(widths=(4, 8, 8, 16), stem_stride=2, embed_dim=16, heads=2, vq_codes=0)).eval()


def test_token_masks_follow_the_anatomy(small_model):
    anat = torch.zeros(1, 32, 32, 32, dtype=torch.uint8)
    liver = catalog.anatomy_by_name("liver").index
    anat[0, 1:4, 2:5, 20:30] = liver  # feature stride 16: only cell (0, 0, 1)
    masks = small_model.token_masks(anat, (2, 2, 2))
    assert masks.shape == (1, N_ANATOMIES, 8)
    assert masks[0, liver - 1].nonzero().flatten().tolist() == [1]
    assert masks.sum() == 1


def test_token_masks_equal_max_pooling_of_one_hot():
    torch.manual_seed(3)
    anat = torch.randint(0, N_ANATOMIES + 1, (2, 32, 16, 48), dtype=torch.uint8)
    anat[:, :, :, :20] = 0
    onehot = torch.nn.functional.one_hot(anat.long(), N_ANATOMIES + 1)[..., 1:].permute(0, 4, 1, 2, 3).float()
    ref = torch.nn.functional.adaptive_max_pool3d(onehot, (2, 1, 3)).reshape(2, N_ANATOMIES, -1) > 0
    assert torch.equal(CTVLP.token_masks(anat, (2, 1, 3)), ref)


def test_embeddings_are_normalised_and_text_path_works(small_model):
    img = torch.rand(2, 1, 32, 32, 32)
    anat = torch.randint(0, N_ANATOMIES + 1, (2, 32, 32, 32), dtype=torch.uint8)
    emb, _ = small_model.encode_image(img, anat)
    assert emb.shape == (2, N_ANATOMIES, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2, N_ANATOMIES), atol=1e-5)
    txt = small_model.encode_texts(["The liver is unremarkable.", "Hepatic cyst."], torch.tensor([10, 10]))
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(txt[0], txt[1])
    p = zero_shot_scores(emb[:, 10], txt[1], txt[0], small_model.logit_scale)
    assert p.shape == (2,) and torch.all((p > 0) & (p < 1))


def test_frozen_text_encoder_gets_no_gradient(small_model):
    assert not any(p.requires_grad for p in small_model.text_encoder.parameters())
    assert all(p.requires_grad for p in small_model.vision.parameters())


def test_warmup_then_cosine_to_min_lr():
    lr, min_lr, total, warm = 1e-4, 1e-6, 100, 10
    f = [warmup_cosine(s, total, warm, lr, min_lr) * lr for s in range(total + 1)]
    assert f[0] == pytest.approx(lr / warm)
    assert f[warm - 1] == pytest.approx(lr)
    assert f[total] == pytest.approx(min_lr)
    assert all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))


def test_locked_text_head_trains_only_the_vision_side():
    torch.manual_seed(0)
    m = CTVLP(ModelConfig.from_settings(widths=(4, 8, 8, 16), embed_dim=16, heads=2, train_text_head=False, token_stage=3, vq_codes=0))
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"vision", "vis_pool", "vis_proj", "logit_scale"}
    img, anat = torch.rand(2, 1, 32, 32, 32), torch.randint(0, N_ANATOMIES + 1, (2, 32, 32, 32), dtype=torch.uint8)
    emb, _ = m.encode_image(img, anat)
    txt = m.encode_texts(["The liver is unremarkable.", "Hepatic cyst."], torch.tensor([10, 10]))
    (emb[:, 10] * txt).sum().backward()
    assert all(p.grad is None for p in m.txt_pool.parameters()) and m.txt_proj.weight.grad is None
    assert m.vision.net.conv1.weight.grad is not None


def test_earlier_token_stages_refine_the_grid():
    m = {s: CTVLP(ModelConfig.from_settings(widths=(4, 8, 8, 16), embed_dim=16, heads=2, token_stage=s, vq_codes=0))
         for s in (1, 2, 3, 4)}
    x = torch.rand(1, 1, 32, 32, 48)
    f = {s: m[s].vision(x) for s in m}
    assert f[4].shape[2:] == (2, 2, 3) and f[3].shape[2:] == (4, 4, 6) and f[2].shape[2:] == (8, 8, 12)
    assert f[1].shape[2:] == (16, 16, 24)
    assert (f[3].shape[1], f[2].shape[1], f[1].shape[1]) == (8 + 16, 8 + 8 + 16, 4 + 8 + 8 + 16)
    assert (m[1].vision.stride, m[2].vision.stride, m[3].vision.stride, m[4].vision.stride) == (2, 4, 8, 16)
    assert m[1].vision.out_channels == f[1].shape[1]
    # stage 1 holds stage 2's map (upsampled) after its own channels
    m[1].vision.load_state_dict(m[2].vision.state_dict())
    up2 = torch.nn.functional.interpolate(m[2].vision(x), size=(16, 16, 24), mode="nearest")
    assert torch.allclose(m[1].vision(x)[:, 4:], up2, atol=1e-6)
    # same weights: the stage-2 map's deepest channels are the last stage's map, upsampled (nearest)
    m[2].vision.load_state_dict(m[4].vision.state_dict())
    up = torch.nn.functional.interpolate(m[4].vision(x), size=(8, 8, 12), mode="nearest")
    assert torch.allclose(m[2].vision(x)[:, -16:], up, atol=1e-6)
    # the tokens of a stage-2 map: one mask per anatomy on its 8 x 8 x 12 grid
    anat = torch.zeros(1, 32, 32, 48, dtype=torch.uint8)
    anat[0, :4, :4, :4] = 3  # one 4-voxel cube = exactly one stride-4 cell
    _, allowed = m[2].image_tokens(x, anat)
    assert allowed.shape == (1, N_ANATOMIES, 8 * 8 * 12) and allowed[0, 2].sum() == 1 and allowed[0, 2, 0]


def test_text_center_subtracts_each_anatomys_mean_training_text():
    """model.text_center: the centre is the row-weighted mean of the uncentred embeddings of the
    training texts per anatomy; prompts and texts are embedded minus it, renormalised; an anatomy
    without texts keeps a zero centre (embeddings unchanged); the centre is saved with the weights."""
    cfg = dict(widths=(4, 8, 8, 16), embed_dim=16, heads=2, train_text_head=False, vq_codes=0)
    torch.manual_seed(0)
    plain = CTVLP(ModelConfig.from_settings(**cfg))
    torch.manual_seed(0)
    centred = CTVLP(ModelConfig.from_settings(**cfg, text_center=True))
    assert "txt_center" in centred.state_dict() and "txt_center" not in plain.state_dict()
    texts = ["The liver is unremarkable.", "Hepatic cyst.", "Fatty liver.", "Renal cyst."]
    # cases x anatomies (only anatomies 0 and 1 have texts); text 0 on two cases weighs twice
    idx = -torch.ones(4, N_ANATOMIES, dtype=torch.long)
    idx[:, 0] = torch.tensor([0, 0, 1, 2])
    idx[0, 1] = 3
    centred.set_text_center(texts, idx.numpy())
    liver = plain.encode_texts(texts[:3], torch.zeros(3, dtype=torch.long))
    mean = (2 * liver[0] + liver[1] + liver[2]) / 4
    assert torch.allclose(centred.txt_center[0], mean, atol=1e-5)
    kidney = plain.encode_texts([texts[3]], torch.tensor([1]))
    assert torch.allclose(centred.txt_center[1], kidney[0], atol=1e-5)
    assert centred.txt_center[2:].abs().sum() == 0
    got = centred.encode_texts(texts[:3], torch.zeros(3, dtype=torch.long))
    assert torch.allclose(got, torch.nn.functional.normalize(liver - mean, dim=-1), atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3))
    # centring spreads the liver texts apart: their mean pairwise cosine drops (towards -1/(n-1))
    iu = torch.triu_indices(3, 3, 1)
    assert (got @ got.T)[iu[0], iu[1]].mean() < (liver @ liver.T)[iu[0], iu[1]].mean() - 0.2
    # an anatomy without training texts: embeddings as without centring
    assert torch.allclose(centred.encode_texts(["Normal spleen."], torch.tensor([5])),
                          plain.encode_texts(["Normal spleen."], torch.tensor([5])), atol=1e-6)
    reloaded = CTVLP(ModelConfig.from_settings(**cfg, text_center=True))
    reloaded.load_state_dict(centred.state_dict())
    assert torch.equal(reloaded.txt_center, centred.txt_center)
    with pytest.raises(ValueError, match="text_center=True"):
        plain.set_text_center(texts, idx.numpy())


def test_fvlm_calibration_pairs_abnormal_rows_by_their_findings_hand_computed():
    """Three abnormal kidneys: two state the same catalog finding in different words, the third
    another. With calibration the first two are positives of each other; temperature 1,
    orthogonal embeddings: rows 0 and 1 give log(e+2) - 1/2 each, row 2 log(e+2) - 1."""
    import polars as pl

    from ctvlp.training.data import anatomy_texts

    from ctvlp.reports.schema import REPORT_SCHEMA

    def row(case_id, text, disease):
        return {"case_id": case_id, "anatomy": "kidney", "text": text, "status": "abnormal",
                "findings": [{"disease_id": disease, "presence": "present"}], "backend": "rules", "model": "rules",
                "prompt_version": "rules-1", "error": None}

    reports = pl.DataFrame([row("a", "A 12 mm renal cyst in the left kidney.", "kidney_cyst"),
                            row("b", "Simple cortical cyst, right kidney, 20 mm.", "kidney_cyst"),
                            row("c", "A 4 mm calculus in the lower pole.", "renal_calculus")], schema=REPORT_SCHEMA)
    texts = anatomy_texts(reports, ["a", "b", "c"], unmentioned_as_normal=False)
    j = catalog.anatomy_by_name("kidney").index - 1
    assert len(set(texts.text_idx[:, j])) == 3  # three different texts
    groups = texts.groups[:, j]
    assert groups[0] == groups[1] != groups[2]
    valid = torch.zeros(3, N_ANATOMIES, dtype=torch.bool)
    valid[:, j] = True
    normal = torch.zeros_like(valid)
    group = torch.from_numpy(texts.groups)
    img = torch.zeros(3, N_ANATOMIES, 3)
    img[:, j] = torch.eye(3)
    pos = calibrated_targets(valid, normal, group, calibrate=True)[j]
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    loss = alignment_loss(img, img.clone(), valid, calibrated_targets(valid, normal, group), torch.tensor(0.0))
    assert loss.item() == pytest.approx(math.log(E + 2) - 2 / 3, abs=1e-6)
    plain = alignment_loss(img, img.clone(), valid, calibrated_targets(valid, normal, group, False), torch.tensor(0.0))
    assert plain.item() == pytest.approx(math.log(E + 2) - 1, abs=1e-6)


def test_a_normal_and_an_abnormal_row_are_never_calibrated_together():
    valid, normal, group = _pairs([True, False], [5, 5])  # same group id, but one normal
    assert calibrated_targets(valid, normal, group, True)[0].tolist() == [[True, False], [False, True]]


def test_rows_without_a_catalog_finding_pair_only_by_identical_text():
    from ctvlp.training.data import finding_group

    assert finding_group("Lesion in the kidney.", []) == finding_group("Lesion in the kidney.", None)
    assert finding_group("Lesion in the kidney.", []) != finding_group("Kidney lesion.", [])
    absent = [{"disease_id": "kidney_cyst", "presence": "absent"}]
    assert finding_group("No cyst; a lesion.", absent) == ("text", "No cyst; a lesion.")  # absent findings do not count
    uncertain = [{"disease_id": "kidney_cyst", "presence": "uncertain"}]
    assert finding_group("Possible cyst.", uncertain) == finding_group("Renal cyst.", [
        {"disease_id": "kidney_cyst", "presence": "present"}])


def test_gpu_layout_computes_the_same_features_and_gradients():
    """channels_last_3d with the zero-padded 8-channel stem (the layout training uses on CUDA)
    against the plain layout, forward and backward, on the CPU."""
    torch.manual_seed(0)
    enc = VisionEncoder((4, 8, 8, 16)).eval()
    x = torch.rand(2, 1, 32, 32, 32, requires_grad=True)
    ref = enc(x)
    ref.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in enc.named_parameters()}
    ref_x = x.grad.clone()
    enc.zero_grad()
    x.grad = None
    enc.gpu_layout(True)
    out = enc(x)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert enc.net.conv1.weight.shape[1] == 1  # the saved weights keep their shape
    out.square().sum().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(x.grad, ref_x, atol=1e-5)
    for n, p in enc.named_parameters():
        assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-4), n


def test_eq1_image_to_text_as_the_paper_writes_it_and_symmetric_hand_computed():
    """train.align_direction: "i2t" is the paper's Eq. 1 (each image row's softmax over the texts);
    "symmetric" averages it with text-to-image. Hand-computed at temperature 1: images e1, e2, both
    texts e1, so image logits [[1, 1], [0, 0]] (each row -log 1/2) and text logits [[1, 0], [1, 0]]."""
    img = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    txt = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]])
    valid, normal, tid = _pairs([False, False], [0, 1])
    pos = calibrated_targets(valid, normal, tid, calibrate=False)
    i2t = alignment_loss(img, txt, valid, pos, torch.tensor(0.0), direction="i2t")
    assert i2t.item() == pytest.approx(math.log(2), abs=1e-6)
    t2i = 0.5 * (math.log(1 + 1 / E) + math.log(1 + E))  # text 1 picks image 1: -log(e/(e+1)); text 2: -log(1/(e+1))
    sym = alignment_loss(img, txt, valid, pos, torch.tensor(0.0), direction="symmetric")
    assert sym.item() == pytest.approx(0.5 * (math.log(2) + t2i), abs=1e-6)
    assert alignment_loss(img, txt, valid, pos, torch.tensor(0.0)).item() == sym.item()  # the default
    rows = AnatomyRows(valid, normal, tid)
    assert AlignmentLoss(False, "i2t")(img, txt, rows, torch.tensor(0.0)).item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(ValueError, match="direction"):
        AlignmentLoss(True, "t2i")
    with pytest.raises(ValueError, match="direction"):
        alignment_loss(img, txt, valid, pos, torch.tensor(0.0), direction="both")

"""Training crops: the complete-organ rule (an anatomy counts only when complete in the scan and
wholly inside the crop), checked on the stored bounding boxes or, without them, by counting voxels,
with flips (applied on the device by ``to_device``) that move image and anatomy map together."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from torch.utils.data import default_collate

from ctvlp import catalog
from ctvlp.imaging.storage import case_paths
from ctvlp.training.data import AnatomyTexts, CropDataset, to_device

A, B, C = (catalog.anatomies()[k] for k in range(3))  # three anatomies of the catalog


@pytest.fixture(scope="module", params=["boxes", "counts"])
def case(tmp_path_factory, request):
    """A 40 x 16 x 16 volume: A at x 2-7 (complete), B at x 12-27 (complete, 16 wide), C at x 30-35
    (present but cut by the scan border in its segment table: incomplete), each a wedge along x.
    The image is 0.1 x the
    anatomy index, so image and map must stay aligned."""
    root = tmp_path_factory.mktemp("crops")
    anatomy = np.zeros((40, 16, 16), np.uint8)
    for a, (x0, x1) in ((A, (2, 8)), (B, (12, 28)), (C, (30, 36))):
        for x in range(x0, x1):  # a wedge along x, so a flipped crop never looks like an unflipped one
            anatomy[x, 3:4 + (x - x0) % 10, 3:13] = a.index
    paths = case_paths("c0", root / "segment" / "c0", root / "preprocessed" / "c0")
    for p in (paths.image, paths.table):
        p.parent.mkdir(parents=True, exist_ok=True)
    np.save(paths.image, (anatomy * 0.1).astype(np.float16))
    np.save(paths.anatomy, anatomy)
    counts = {a.name: int((anatomy == a.index).sum()) for a in (A, B, C)}
    meta = {"anatomy_voxels": counts}
    if request.param == "boxes":  # as preprocess stores them: x0, x1, y0, y1, z0, z1 inclusive
        meta["anatomy_bbox"] = {a.name: [int(v) for ax in np.nonzero(anatomy == a.index) for v in (ax.min(), ax.max())]
                                for a in (A, B, C)}
    paths.meta.write_text(json.dumps(meta))
    pl.DataFrame([{"case_id": "c0", "anatomy": a.name, "index": a.index, "present": a.name in counts,
                   "complete": a.name in (A.name, B.name)} for a in catalog.anatomies()]).write_parquet(paths.table)
    m = len(catalog.anatomies())
    text_idx = np.full((1, m), -1)
    text_idx[0, [A.index - 1, B.index - 1, C.index - 1]] = 0  # every one has a text
    texts = AnatomyTexts(["x"], text_idx, np.zeros((1, m), bool), np.zeros((1, m), int))
    return paths, anatomy, texts


def _locate(crop_map: np.ndarray, full: np.ndarray) -> tuple[int, bool]:
    """Where along x the crop was taken, and whether it was flipped (the anatomies' positions make
    both unique)."""
    width = crop_map.shape[0]
    found = [(s, flipped) for flipped in (False, True) for s in range(full.shape[0] - width + 1)
             if np.array_equal(full[s:s + width], crop_map[::-1] if flipped else crop_map)]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("flip", [False, True])
def test_only_anatomies_complete_in_scan_and_inside_the_crop_count(case, flip):
    paths, full, texts = case
    dataset = CropDataset([paths], texts, (20, 16, 16), stride=4, flip=flip, seed=0)
    seen = {"A": set(), "B": set(), "flipped": set()}
    for epoch in range(60):
        key = (epoch, 0) if epoch % 2 else 0  # (epoch, index) keys and set_epoch give the same crop
        dataset.set_epoch(epoch)
        item = dataset[key]
        assert item["image"].dtype == torch.float16  # as stored: converted on the device
        batch = to_device(default_collate([item]), torch.device("cpu"))
        image, anatomy, valid = batch["image"][0, 0].numpy(), batch["anatomy"][0].numpy(), batch["valid"][0].numpy()
        assert image.shape == anatomy.shape == (20, 16, 16)
        assert np.allclose(image, anatomy * 0.1, atol=1e-3)  # image and map moved together
        start, flipped = _locate(anatomy, full)
        assert valid[A.index - 1] == (start <= 2), (epoch, start)  # A wholly inside: crop from x <= 2
        assert valid[B.index - 1] == (8 <= start <= 12), (epoch, start)  # B (16 wide) wholly inside
        assert not valid[C.index - 1]  # incomplete in the scan: never, even when wholly inside
        seen["A"].add(bool(valid[A.index - 1]))
        seen["B"].add(bool(valid[B.index - 1]))
        seen["flipped"].add(flipped)
    assert seen["A"] == {True, False} and seen["B"] == {True, False}  # both outcomes were exercised
    assert seen["flipped"] == ({True, False} if flip else {False})


def test_centre_crops_are_the_same_every_epoch_and_never_flipped(case):
    paths, full, texts = case
    dataset = CropDataset([paths], texts, (20, 16, 16), stride=4, flip=True, seed=0, mode="center")
    items = [dataset[(epoch, 0)] for epoch in range(4)]
    assert all(not it["flip"] for it in items)
    assert all(torch.equal(it["anatomy"], items[0]["anatomy"]) for it in items)
    assert torch.equal(items[0]["anatomy"], torch.from_numpy(full[10:30]))  # (40 - 20) // 2


def test_volumes_smaller_than_the_crop_are_padded_to_the_crop_and_stride(case):
    paths, full, texts = case
    dataset = CropDataset([paths], texts, (48, 18, 16), stride=4, flip=False, seed=0)
    item = dataset[0]
    assert tuple(item["anatomy"].shape) == (48, 20, 16)
    assert torch.equal(item["anatomy"][:40, :16], torch.from_numpy(full)) and item["anatomy"][40:].sum() == 0
    assert item["valid"][A.index - 1] and item["valid"][B.index - 1] and not item["valid"][C.index - 1]


def test_to_device_flips_only_the_chosen_samples_and_leaves_the_batch_alone():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 1, 4, 5, 6, generator=gen).half()
    anatomy = torch.randint(0, 9, (3, 4, 5, 6), generator=gen, dtype=torch.uint8)
    batch = {"image": image.clone(), "anatomy": anatomy.clone(), "flip": torch.tensor([True, False, True])}
    out = to_device(batch, torch.device("cpu"))
    assert out["image"].dtype == torch.float32
    for i, flipped in enumerate([True, False, True]):
        want_img = image[i].float().flip(1) if flipped else image[i].float()
        want_map = anatomy[i].flip(0) if flipped else anatomy[i]
        assert torch.equal(out["image"][i], want_img) and torch.equal(out["anatomy"][i], want_map)
    assert torch.equal(batch["image"], image) and torch.equal(batch["anatomy"], anatomy)  # caller's batch untouched
    same = to_device({"image": image.float(), "anatomy": anatomy, "flip": torch.zeros(3, dtype=torch.bool)}, "cpu")
    assert torch.equal(same["image"], image.float()) and torch.equal(same["anatomy"], anatomy)

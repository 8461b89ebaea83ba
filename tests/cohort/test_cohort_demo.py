"""Tests of the built-in synthetic cohort (ctvlp.cohort.demo)."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import SimpleITK as sitk

from ctvlp import catalog
from ctvlp.cohort import demo, schema
from ctvlp.cohort.demo import assign_splits, case_labels, generate_case, lesions, report_text, write_cohort
from ctvlp.cohort.demo.anatomy import FOV_MM, AnatomyChanges

SEED = 0
DISEASES = {d.id: d for d in catalog.diseases("demo")}
LUT = catalog.class_to_anatomy_lut("v2")
STONES = {"renal_calculus", "gallstone", "bladder_stone"}


def _covering_indices(seed: int, min_pos: int = 2, limit: int = 200) -> list[int]:
    """A few case indices with >= min_pos positives of every disease (labels are cheap)."""
    pos: Counter = Counter()
    chosen: list[int] = []
    for i in range(limit):
        lab = case_labels(i, seed)
        if not chosen or any(v and pos[d] < min_pos for d, v in lab.items()):
            chosen.append(i)
            pos.update(d for d, v in lab.items() if v)
        if all(pos[d] >= min_pos for d in DISEASES):
            break
    return chosen


@pytest.fixture(scope="module")
def cases():
    idx = _covering_indices(SEED)
    assert len(idx) <= 20
    return [generate_case(i, SEED) for i in idx]


def _anatomy_index(name: str) -> int:
    return catalog.anatomy_by_name(name).index


def _ml(case, m) -> float:
    return float(m.sum()) * float(np.prod(case.spacing)) / 1000.0


def _centroid_world(case, m) -> np.ndarray:
    ijk = np.argwhere(m).mean(axis=0)
    return case.affine[:3, :3] @ ijk + case.affine[:3, 3]


# ---------------------------------------------------------------------------------------------


def test_deterministic_and_seed_dependent():
    a, b = generate_case(3, SEED), generate_case(3, SEED)
    assert a.case_id == "demo_0003"
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.affine, b.affine)
    assert a.report == b.report and a.labels == b.labels
    assert [l.disease_id for l in a.lesions] == [l.disease_id for l in b.lesions]
    assert all(np.array_equal(x.mask, y.mask) for x, y in zip(a.lesions, b.lesions))
    c = generate_case(3, SEED + 1)
    assert c.image.shape != a.image.shape or not np.array_equal(c.image, a.image)
    assert c.report != a.report
    assert case_labels(3, SEED) == a.labels


def test_volume_types_spacing_and_field_of_view(cases):
    spacings = set()
    for c in cases:
        assert c.image.dtype == np.int16 and c.mask.dtype == np.uint8
        assert c.image.shape == c.mask.shape and c.image.ndim == 3
        assert c.image.min() >= -1024 and c.image.max() <= 3071
        sx, sy, sz = c.spacing
        assert sx == sy and 1.6 <= sx <= 2.6 and 2.5 <= sz <= 4.5
        assert 5.0 not in c.spacing and c.spacing != (1.0, 1.0, 5.0)
        np.testing.assert_array_equal(np.diag(c.affine)[:3], c.spacing)
        assert np.count_nonzero(c.affine[:3, :3] - np.diag(np.diag(c.affine[:3, :3]))) == 0
        fov = np.array(c.image.shape) * np.array(c.spacing)
        np.testing.assert_allclose(fov, FOV_MM, atol=5)
        assert set(c.labels) == set(DISEASES) and set(c.labels.values()) <= {0, 1}
        spacings.add(c.spacing)
        # air outside the body, with noise
        corner = c.image[:5, :5, :].astype(float)
        assert corner.mean() < -950 and 3 < corner.std() < 40
    assert len(spacings) == len(cases)


def test_orientation_is_ras(cases):
    cid = lambda n: catalog.class_id(n, "v2")  # noqa: E731
    for c in cases:
        assert nib.aff2axcodes(c.affine) == ("R", "A", "S")
        liver = _centroid_world(c, c.mask == cid("liver"))
        spleen = _centroid_world(c, c.mask == cid("spleen"))
        stomach = _centroid_world(c, c.mask == cid("stomach"))
        gb = _centroid_world(c, c.mask == cid("gallbladder"))
        heart = _centroid_world(c, c.mask == cid("heart"))
        kr = _centroid_world(c, c.mask == cid("kidney_right"))
        kl = _centroid_world(c, c.mask == cid("kidney_left"))
        spine = _centroid_world(c, np.isin(c.mask, [cid(f"vertebrae_L{k}") for k in range(1, 6)]))
        bladder = _centroid_world(c, c.mask == cid("urinary_bladder"))
        lung = _centroid_world(c, np.isin(c.mask, range(10, 15)))
        # RAS+: +x = patient's right, +y = anterior, +z = superior
        assert liver[0] > spine[0] + 20 and gb[0] > spine[0]
        assert spleen[0] < spine[0] - 40 and stomach[0] < spine[0]
        assert heart[0] < spine[0] and heart[1] > spine[1]
        assert kr[0] > spine[0] > kl[0]
        assert lung[2] > liver[2] > bladder[2]
        assert bladder[1] > spine[1]
        assert _centroid_world(c, c.mask == cid("lung_upper_lobe_right"))[0] > spine[0]


def test_at_least_14_anatomies(cases):
    for c in cases:
        present = set(np.unique(LUT[c.mask])) - {0}
        assert len(present) >= 14, c.case_id
        for a in ("lung", "heart", "liver", "spleen", "kidney", "pancreas", "adrenal_gland",
                  "urinary_bladder", "gallbladder", "stomach", "aorta", "lumbar_spine"):
            assert _anatomy_index(a) in present, (c.case_id, a)
        lobes = set(np.unique(c.mask)) & set(range(10, 15))
        assert lobes == set(range(10, 15))


def test_lesions_inside_anatomy_and_agree_with_labels(cases):
    for c in cases:
        anat = LUT[c.mask]
        by = Counter(l.disease_id for l in c.lesions)
        for d, v in c.labels.items():
            assert (by[d] > 0) == bool(v), (c.case_id, d)
        for l in c.lesions:
            d = DISEASES[l.disease_id]
            assert l.mask.dtype == bool and l.mask.shape == c.image.shape
            assert l.mask.any()
            assert (anat[l.mask] == _anatomy_index(d.anatomy)).all(), (c.case_id, d.id)
            if d.type == "local":
                vol = float(l.mask.sum() * np.prod(c.spacing))
                # a few voxels at 5 mm (125 mm^3); tiny stones rely on their high contrast
                assert vol >= (80 if d.id in STONES else 300), (c.case_id, d.id, vol)


def test_local_lesion_attenuation(cases):
    ranges = {"liver_cyst": (-20, 25), "liver_metastasis": (5, 75), "kidney_cyst": (-20, 25),
              "renal_calculus": (450, 1300), "lung_nodule": (0, 80), "gallstone": (250, 900),
              "bladder_stone": (300, 1000), "adrenal_nodule": (-5, 45)}
    seen = set()
    for c in cases:
        for l in c.lesions:
            if l.disease_id in ranges:
                lo, hi = ranges[l.disease_id]
                med = float(np.median(c.image[l.mask]))
                assert lo <= med <= hi, (c.case_id, l.disease_id, med)
                seen.add(l.disease_id)
    assert seen == set(ranges)


def test_diffuse_signs_are_measurable(cases):
    cid = lambda n: catalog.class_id(n, "v2")  # noqa: E731

    def split(did, fn):
        pos = [fn(c) for c in cases if c.labels[did]]
        neg = [fn(c) for c in cases if not c.labels[did]]
        assert pos and neg, did
        return np.array(pos), np.array(neg)

    pos, neg = split("fatty_liver", lambda c: np.median(c.image[c.mask == cid("liver")]))
    assert pos.max() < 25 and neg.min() > 45
    pos, neg = split("splenomegaly", lambda c: _ml(c, c.mask == cid("spleen")))
    assert pos.min() > neg.max() and np.median(pos) > 2 * np.median(neg)
    pos, neg = split("cardiomegaly", lambda c: _ml(c, c.mask == cid("heart")))
    assert np.median(pos) > 1.3 * np.median(neg)
    lung = lambda c: np.isin(c.mask, range(10, 15))  # noqa: E731
    pos, neg = split("emphysema", lambda c: np.median(c.image[lung(c)]))
    assert pos.max() < -900 and np.median(neg) > -900
    pos, neg = split("pleural_effusion",
                     lambda c: np.mean(c.image[np.isin(c.mask, [11, 14])] > -300))
    assert pos.min() > 0.05 and neg.max() < 0.02
    pos, neg = split("pancreas_atrophy", lambda c: _ml(c, c.mask == cid("pancreas")))
    assert pos.max() < neg.min()
    # atrophic kidneys against normal kidneys of the same cohort
    atrophic, normal = [], []
    for c in cases:
        les = [l.mask for l in c.lesions if l.disease_id == "kidney_atrophy"]
        for side in ("left", "right"):
            k = c.mask == cid(f"kidney_{side}")
            (atrophic if les and (les[0] & k).any() else normal).append(_ml(c, k))
    assert max(atrophic) < 0.75 * np.median(normal)
    # hydronephrosis: a fluid region that is a sizable part of the kidney
    for c in cases:
        for l in c.lesions:
            if l.disease_id == "hydronephrosis":
                kid = np.isin(c.mask, [cid("kidney_left"), cid("kidney_right")])
                assert -10 <= np.median(c.image[l.mask]) <= 25
                assert l.mask.sum() > 0.15 * kid.sum()


def _sentences(report: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.])\s+|\n", report) if s.strip()]


def test_reports_state_positives_and_never_negatives_as_present(cases):
    for c in cases:
        rep = c.report
        assert rep.startswith("FINDINGS:\n") and "\n\nIMPRESSION:\n" in rep
        findings, impression = rep.split("\n\nIMPRESSION:\n")
        assert findings.strip() != "FINDINGS:" and impression.strip()
        low = rep.lower()
        for did, v in c.labels.items():
            d = DISEASES[did]
            terms = [d.name.lower(), *(s.lower() for s in d.synonyms)]
            if v:
                assert any(t in low for t in terms), (c.case_id, did, rep)
                assert any(t in impression.lower() for t in terms), (c.case_id, did, impression)
            else:
                for s in _sentences(low):
                    if d.name.lower() in s:
                        assert re.search(r"\bno\b|\bwithout\b|\bnot\b", s), (c.case_id, did, s)
        if not any(c.labels.values()):
            assert "no acute abnormality" in impression.lower()
        else:
            assert "no acute abnormality" not in impression.lower()


def test_report_wording_varies(cases):
    reports = [c.report for c in cases]
    assert len(set(reports)) == len(reports)
    lines = Counter(line for r in reports for line in r.split("\n")[1:]
                    if line and ":" not in line[:12])
    assert len(lines) > 2 * len(reports)
    # normal liver phrasing is drawn from several templates
    normal_liver = {
        line for c in cases if not any(c.labels[d] for d in ("liver_cyst", "liver_metastasis",
                                                              "fatty_liver"))
        for line in c.report.split("\n") if "liver" in line.lower() or "hepatic" in line.lower()}
    assert len(normal_liver) >= 2


def test_prevalence():
    labels = [case_labels(i, SEED) for i in range(600)]
    for d in DISEASES:
        p = np.mean([lab[d] for lab in labels])
        assert 0.15 <= p <= 0.25, (d, p)


def test_split_assignment():
    labels = [case_labels(i, demo.DEFAULT_SEED) for i in range(demo.DEFAULT_N_CASES)]
    splits = assign_splits(labels, demo.DEFAULT_SEED)
    assert splits == assign_splits(labels, demo.DEFAULT_SEED)
    assert splits != assign_splits(labels, demo.DEFAULT_SEED + 1)
    cnt = Counter(splits)
    assert cnt == {"train": 112, "val": 24, "test": 24}
    # the documented default: >= 3 positives of every disease in val and test
    for d in DISEASES:
        for s in ("val", "test"):
            n = sum(lab[d] for lab, sp in zip(labels, splits) if sp == s)
            assert n >= 3, (d, s, n)
    small = assign_splits(labels[:20], 1, (0.5, 0.25, 0.25))
    assert Counter(small) == {"train": 10, "val": 5, "test": 5}
    tiny = assign_splits(labels[:3], 1)
    assert sorted(tiny) == ["test", "train", "val"]
    with pytest.raises(ValueError):
        assign_splits(labels[:2], 1)


def test_write_cohort_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    n = 6
    path = write_cohort("cohort", n, SEED)
    assert path == Path("cohort") / "manifest.parquet" and path.is_file()
    m = pl.read_parquet(path)
    assert m.schema == pl.Schema(schema.MANIFEST_SCHEMA)  # one manifest schema for every source
    assert m["source_id"].to_list() == m["case_id"].to_list() and m["ingest_note"].null_count() == n
    assert m.height == n and m["case_id"].to_list() == [f"demo_{i:04d}" for i in range(n)]
    assert m["source"].unique().to_list() == ["demo"]
    assert m.schema["spacing_x"] == pl.Float64 and m.schema["shape_z"] in (pl.Int64, pl.Int32)
    assert Counter(m["split"].to_list()) == {"train": 4, "val": 1, "test": 1}
    assert m["image_path"][0] == str(Path("cohort") / "images" / "demo_0000.nii.gz")
    assert not Path(m["mask_path"][0]).is_absolute()

    gt = pl.read_parquet(tmp_path / "cohort" / "ground_truth.parquet")
    assert gt.columns == ["case_id", "disease_id", "anatomy", "label"]
    assert gt.height == n * len(DISEASES) and gt.schema["label"] == pl.Int8
    for row in gt.iter_rows(named=True):
        assert row["anatomy"] == DISEASES[row["disease_id"]].anatomy

    for k in (0, n - 1):
        row = m.row(k, named=True)
        case = generate_case(k, SEED)
        assert row["report_text"] == case.report
        labels = {r["disease_id"]: r["label"]
                  for r in gt.filter(pl.col("case_id") == case.case_id).iter_rows(named=True)}
        assert labels == case.labels
        img = sitk.ReadImage(row["image_path"])
        assert img.GetSpacing() == (row["spacing_x"], row["spacing_y"], row["spacing_z"])
        assert img.GetSize() == (row["shape_x"], row["shape_y"], row["shape_z"])
        assert tuple(case.spacing) == img.GetSpacing()
        arr = sitk.GetArrayFromImage(img)  # (z, y, x)
        assert np.array_equal(arr.transpose(2, 1, 0), case.image)
        nimg = nib.load(row["image_path"])
        assert np.array_equal(nimg.affine, case.affine)
        assert nimg.get_data_dtype() == np.int16
        assert np.array_equal(np.asanyarray(nimg.dataobj), case.image)
        nmsk = nib.load(row["mask_path"])
        assert np.array_equal(nmsk.affine, case.affine) and nmsk.get_data_dtype() == np.uint8
        assert np.array_equal(np.asanyarray(nmsk.dataobj), case.mask)


def test_registries_cover_exactly_the_demo_diseases():
    """One entry per demo disease in each registry: painting (lesions) and wording (report_text)."""
    assert list(lesions.DISEASES) == [d.id for d in lesions.DISEASES.values()]
    assert set(lesions.DISEASES) == set(DISEASES)
    assert len(lesions.DISEASES) == len(DISEASES) == 16
    assert set(report_text.WORDING) == set(DISEASES)
    hooks = set(AnatomyChanges.__dataclass_fields__)
    for entry in lesions.DISEASES.values():
        assert set(entry.alters) <= hooks, entry.id
        assert callable(entry.paint) and callable(report_text.WORDING[entry.id].positive)
        assert report_text.WORDING[entry.id].negations, entry.id
    changed = lesions.anatomy_changes({d: 1 for d in DISEASES})
    assert all(getattr(changed, h) is not None for h in hooks)  # every hook belongs to a disease


def test_package_modules_import_one_way():
    """canvas <- anatomy <- lesions <- report_text <- __init__ (phrases under report_text,
    splits under __init__): a module imports only modules before it."""
    order = ["canvas", "anatomy", "lesions", "phrases", "report_text", "splits", "__init__"]
    folder = Path(demo.__file__).parent
    assert sorted(p.stem for p in folder.glob("*.py")) == sorted(order)
    for k, name in enumerate(order):
        text = (folder / f"{name}.py").read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module in order[:k], (name, node.module)
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("ctvlp.cohort.demo"), (name, node.module)
        assert len(text.splitlines()) <= 500, name


def test_extra_test_cases_leave_the_training_cases_as_they_were(tmp_path, monkeypatch):
    """cohort.test_cases: more cases, all in the test split, after the n_cases; the first n_cases
    (their splits, images, reports) are exactly those of the cohort without them, and rendering in
    parallel changes nothing."""
    monkeypatch.chdir(tmp_path)
    base = pl.read_parquet(write_cohort("a", 10, SEED))
    more = pl.read_parquet(write_cohort("b", 10, SEED, extra_test=3, workers=2))
    assert more.height == 13 and more["split"][10:].to_list() == ["test"] * 3
    same = ["case_id", "split", "report_text", "spacing_x", "shape_z"]
    assert more.head(10).select(same).equals(base.select(same))
    assert more["case_id"][10:].to_list() == [f"demo_{i:04d}" for i in (10, 11, 12)]
    for case in ("demo_0003", "demo_0012"):
        if case in base["case_id"].to_list():
            a = nib.load(f"a/images/{case}.nii.gz").get_fdata()
            b = nib.load(f"b/images/{case}.nii.gz").get_fdata()
            assert np.array_equal(a, b)
    truth = pl.read_parquet("b/ground_truth.parquet")
    assert set(truth["case_id"]) == set(more["case_id"])
    # extra validation and training cases come after the extra test cases, which keep their indices
    most = pl.read_parquet(write_cohort("c", 10, SEED, extra_test=3, extra_val=2, extra_train=2))
    assert most["split"][10:].to_list() == ["test"] * 3 + ["val"] * 2 + ["train"] * 2
    assert most.head(13).select(same).equals(more.select(same))
    assert most["case_id"][13:].to_list() == [f"demo_{i:04d}" for i in range(13, 17)]


def test_lesion_scale_grows_local_lesions_only(cases):
    """cohort.lesion_scale: the same case at scale 2 has the same labels and local lesions of
    larger volume (each lesion, summed per disease); scale 1 is the demo exactly."""
    case = next(c for c in cases if sum(c.labels[d.id] for d in catalog.diseases("demo") if d.type == "local") >= 2)
    index = int(case.case_id.split("_")[1])
    assert np.array_equal(generate_case(index, SEED, lesion_scale=1.0).image, case.image)
    big = generate_case(index, SEED, lesion_scale=2.0)
    assert big.labels == case.labels
    local = {d.id for d in catalog.diseases("demo") if d.type == "local"}

    def volume(c, disease):
        return sum(int(les.mask.sum()) for les in c.lesions if les.disease_id == disease)

    grown = [d for d in local if case.labels[d]]
    assert grown and all(volume(big, d) > 1.5 * volume(case, d) for d in grown), \
        {d: (volume(case, d), volume(big, d)) for d in grown}


def test_test_seed_renders_a_fresh_test_split_and_keeps_train_and_val(tmp_path, monkeypatch):
    """cohort.test_seed: every test case comes from another generator seed (its own ids and
    content), while the training and validation cases are exactly those of the cohort without it."""
    monkeypatch.chdir(tmp_path)
    base = pl.read_parquet(write_cohort("a", 10, SEED, extra_test=2))
    fresh = pl.read_parquet(write_cohort("b", 10, SEED, extra_test=2, test_seed=SEED + 101))
    same = ["case_id", "split", "report_text", "spacing_x", "shape_z"]
    keep = pl.col("split") != "test"
    assert fresh.filter(keep).select(same).equals(base.filter(keep).select(same))
    old_test, new_test = base.filter(~keep), fresh.filter(~keep)
    assert new_test.height == old_test.height == 2 + (base.head(10)["split"] == "test").sum()
    assert all(c.startswith(f"demo_s{SEED + 101}_") for c in new_test["case_id"])
    assert not set(new_test["case_id"]) & set(base["case_id"])
    # other cases, not renamed copies: their reports differ from the cohort's own at the same index
    index = {c: c.rsplit("_", 1)[1] for c in new_test["case_id"]}
    old_text = {c.rsplit("_", 1)[1]: t for c, t in zip(old_test["case_id"], old_test["report_text"])}
    assert sum(t != old_text[index[c]] for c, t in zip(new_test["case_id"], new_test["report_text"])) >= 2
    truth = pl.read_parquet("b/ground_truth.parquet")
    assert set(truth["case_id"]) == set(fresh["case_id"])
    with pytest.raises(ValueError, match="never used"):
        write_cohort("c", 10, SEED, test_seed=SEED)


def test_lesion_maps_hold_the_local_lesions_of_each_case(tmp_path, monkeypatch):
    """lesions/<case_id>.nii.gz: on the image's grid and affine, value 1 + catalog index on exactly the
    voxels of each local lesion of Case.lesions; no map for a case without local lesions (case 3:
    diffuse signs only), and a stale map of an earlier cohort in the folder is removed; labels.json
    names every value."""
    import json

    monkeypatch.chdir(tmp_path)
    stale = Path("cohort") / demo.LESIONS_DIR / "demo_0003.nii.gz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by an earlier cohort")
    write_cohort("cohort", 4, SEED)
    labels = json.loads((Path("cohort") / demo.LESIONS_DIR / demo.LESION_LABELS).read_text(encoding="utf-8"))
    ids = [d.id for d in catalog.diseases("demo")]
    assert labels["labels"] == {str(i + 1): d for i, d in enumerate(ids)}
    local = {d for d, v in DISEASES.items() if v.type == "local"}
    assert set(labels["written"]) == local
    written = sorted(p.name for p in (Path("cohort") / demo.LESIONS_DIR).glob("*.nii.gz"))
    assert written == ["demo_0000.nii.gz", "demo_0001.nii.gz", "demo_0002.nii.gz"]  # case 3: no local lesion
    for k in (0, 1, 2):
        case = generate_case(k, SEED)
        nii = nib.load(Path("cohort") / demo.LESIONS_DIR / f"{case.case_id}.nii.gz")
        assert np.array_equal(nii.affine, case.affine) and nii.get_data_dtype() == np.uint8
        arr = np.asanyarray(nii.dataobj)
        assert arr.shape == case.image.shape
        expected = np.zeros(case.image.shape, np.uint8)
        shown = set()
        for lesion in case.lesions:
            if lesion.disease_id in local:
                assert not (expected[lesion.mask]).any()  # local lesions never overlap
                expected[lesion.mask] = ids.index(lesion.disease_id) + 1
                shown.add(lesion.disease_id)
        assert shown == {d for d in local if case.labels[d]} and shown
        assert np.array_equal(arr, expected)
        assert {labels["labels"][str(v)] for v in np.unique(arr) if v} == shown
    assert not stale.exists()
    assert any(lz.disease_id not in local for lz in generate_case(3, SEED).lesions)  # diffuse ones: left out


def test_test_seed_is_refused_outside_the_demo_source(tmp_path):
    from ctvlp import config
    from ctvlp.cohort.stage import build_cohort

    settings = config.validate({"cohort": {"source": "table", "test_seed": 5, "table": {"path": "x.csv"}}})
    with pytest.raises(SystemExit, match="test_seed"):
        build_cohort(settings, tmp_path)

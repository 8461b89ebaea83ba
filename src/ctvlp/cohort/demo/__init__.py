"""Built-in synthetic cohort: CT-like volumes, TotalSegmentator v2 masks, reports and labels.

Every case is a deterministic function of ``(index, seed)``: a thorax-abdomen-pelvis CT in HU
(int16, array order (X, Y, Z) as nibabel stores it, RAS+ world coordinates in mm), a multilabel
organ mask with TotalSegmentator v2 class ids, ground-truth labels for the 16 diseases of the
``demo`` catalog, the rendered imaging sign of every positive disease, and a free-text radiology
report ("FINDINGS:" / "IMPRESSION:") that states every positive finding by its catalog name or one
of its synonyms and never states a negative one as present.

Orientation: in nibabel's RAS+ world space +x points to the patient's Right, +y Anterior and
+z Superior. Affines here are ``diag(sx, sy, sz)`` plus an origin, so the voxel index i grows
towards the patient's right: the liver and gallbladder lie at larger x than the spleen and the
stomach, and the heart lies slightly to the left (smaller x) of the midline.

Defaults: ``PREVALENCE = 0.2`` for every disease, drawn independently per case; ``write_cohort``
assigns splits by iterative stratification (deterministic from the seed), so a cohort of
``DEFAULT_N_CASES = 160`` with ``DEFAULT_SEED = 0`` has at least 3 positives of every disease in
each of the val and test splits (checked by the tests).

Rendering notes:
- Native spacing: in-plane 1.6-2.6 mm, slices 2.5-4.5 mm, rounded to multiples of 1/256 mm (so
  that NIfTI's float32 header fields hold them exactly); FOV 340 x 260 x 520 mm (lung apex to
  bladder floor).
- 80 % of the cases are contrast-enhanced (aorta ~155 HU, enhancing renal cortex ~150 HU, blood
  pool of the heart ~130 HU), the rest unenhanced (~40 HU); parenchymal organs keep the same HU.
- Lesion radii follow the brief, except lower bounds raised so that every sign stays visible after
  resampling to 5 mm: lung nodule r 4.5-8 mm, renal calculus r 3-5 mm, gallstone r 3.5-7 mm.
- Kidney cysts are labelled kidney_left/kidney_right (not TotalSegmentator's kidney_cyst_* classes),
  so the mask never gives a disease away; an adrenal nodule grows the adrenal label.
- ``Case.lesions`` holds one entry per local lesion and one entry per diffuse sign (its changed
  region: fatty liver = liver, emphysema = lung, effusion = fluid layer in the lower lobes, ...).
- ``write_cohort`` also writes the local lesions' voxels (catalog type "local"; the diffuse signs,
  whose regions overlap one another and are whole organs, are left out) as one label map per case
  that has any, ``lesions/<case_id>.nii.gz`` (uint8, the image's grid and affine, voxel value =
  ``lesion_value(disease_id)``: 1 + the disease's index in the demo catalog, 0 = no lesion), and the
  value -> disease mapping once, ``lesions/labels.json``: where the activation maps slice through a
  lesion and outline it. Local lesions never overlap (each avoids the voxels of earlier ones).

Modules, each importing only the ones before it: ``canvas`` (painting primitives), ``anatomy``
(the normal phantom), ``lesions`` (``DISEASES``: one entry per disease, how it alters the anatomy,
paints its sign and what it records), ``report_text`` (``WORDING``: one entry per disease, and the
normal phrasing), ``splits`` (``assign_splits``), and this package (cases and ``write_cohort``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ctvlp import catalog

from ..schema import GROUND_TRUTH_SCHEMA, LESION_LABELS, LESIONS_DIR, MANIFEST_SCHEMA, frame, write
from .anatomy import TOTALSEG, render_anatomy
from .lesions import Lesion, anatomy_changes, render_signs
from .report_text import make_report
from .splits import assign_splits

__all__ = [
    "Case",
    "Lesion",
    "DEFAULT_SEED",
    "DEFAULT_N_CASES",
    "PREVALENCE",
    "SOURCE",
    "case_labels",
    "generate_case",
    "assign_splits",
    "LESIONS_DIR",
    "LESION_LABELS",
    "lesion_value",
    "lesion_map",
    "write_cohort",
]

DEFAULT_SEED = 0
DEFAULT_N_CASES = 160
PREVALENCE = 0.2
SOURCE = "demo"
HU_MIN, HU_MAX = -1024, 3071


@dataclass
class Case:
    case_id: str
    image: np.ndarray  # int16 HU, (X, Y, Z)
    mask: np.ndarray  # uint8 TotalSegmentator v2 class ids
    affine: np.ndarray  # 4x4 RAS+ mm
    spacing: tuple[float, float, float]
    labels: dict[str, int]
    lesions: list[Lesion] = field(default_factory=list)
    report: str = ""


def _streams(index: int, seed: int) -> tuple[np.random.Generator, ...]:
    """The case's generators: labels, geometry (anatomy), text."""
    if index < 0 or seed < 0:
        raise ValueError("index and seed must be non-negative integers")
    seeds = np.random.SeedSequence([int(seed), int(index)])
    return tuple(np.random.default_rng(s) for s in seeds.spawn(3))  # labels, geometry, text


def _disease_ids() -> list[str]:
    return [d.id for d in catalog.diseases("demo")]


def case_labels(index: int, seed: int) -> dict[str, int]:
    """Ground-truth labels of case ``index`` (cheap: no volume is rendered)."""
    rng = _streams(index, seed)[0]
    draws = rng.random(len(_disease_ids()))
    return {d: int(u < PREVALENCE) for d, u in zip(_disease_ids(), draws)}


def generate_case(index: int, seed: int, lesion_scale: float = 1.0) -> Case:
    """Render synthetic case ``index`` of the cohort ``seed`` (deterministic); ``lesion_scale``
    multiplies the radii of its local lesions (``render_signs``)."""
    labels = case_labels(index, seed)
    _, rng_geometry, rng_text = _streams(index, seed)
    phantom = render_anatomy(rng_geometry, anatomy_changes(labels))
    rng_signs = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 7]))
    lesions, records = render_signs(phantom, labels, rng_signs, lesion_scale)
    cv = phantom.canvas
    # measured after the signs: an adrenal nodule may grow into the spleen
    spleen_cm = cv.extent_cm(cv.lab == TOTALSEG.spleen, 2)
    noise_rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 11]))
    sigma = float(noise_rng.uniform(5, 25))
    img = cv.hu
    img += noise_rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    np.clip(img, HU_MIN, HU_MAX, out=img)
    image = np.rint(img).astype(np.int16)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(cv.spacing)
    affine[:3, 3] = cv.origin
    report = make_report(labels, records, rng_text, spleen_cm=spleen_cm, contrast=phantom.contrast)
    return Case(
        case_id=f"demo_{index:04d}",
        image=image,
        mask=cv.lab,
        affine=affine,
        spacing=tuple(float(x) for x in cv.spacing),
        labels=labels,
        lesions=lesions,
        report=report,
    )


def lesion_value(disease_id: str) -> int:
    """The voxel value of ``disease_id``'s lesions in a lesion map: 1 + its demo catalog index."""
    return 1 + _disease_ids().index(disease_id)


def lesion_map(case: Case) -> np.ndarray | None:
    """The case's local lesions as one uint8 label map on its image grid (``lesion_value`` per
    disease, 0 elsewhere); None when the case has no local lesion. Diffuse signs are left out."""
    local = {d.id for d in catalog.diseases("demo") if d.type == "local"}
    out = None
    for lesion in case.lesions:
        if lesion.disease_id not in local or not lesion.mask.any():
            continue
        if out is None:
            out = np.zeros(case.image.shape, np.uint8)
        out[lesion.mask] = lesion_value(lesion.disease_id)
    return out


def _lesion_labels() -> dict:
    """The contents of lesions/labels.json."""
    return {
        "labels": {str(lesion_value(d.id)): d.id for d in catalog.diseases("demo")},
        "background": 0,
        "written": sorted((d.id for d in catalog.diseases("demo") if d.type == "local"), key=lesion_value),
        "note": "one uint8 map per case with local lesions, on the grid and affine of images/<case_id>.nii.gz; "
                "voxel value = 1 + the disease's index in the demo catalog; diffuse signs are not written",
    }


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, dtype) -> None:
    import nibabel as nib

    nii = nib.Nifti1Image(array.astype(dtype, copy=False), affine)
    nii.header.set_data_dtype(dtype)
    nii.header.set_xyzt_units("mm")
    nii.set_qform(affine, code=1)
    nii.set_sform(affine, code=1)
    nib.save(nii, str(path))


def _write_case(args) -> tuple[dict, list[dict]]:
    """Render case ``index`` of generator ``seed`` and write its image and mask: (manifest row,
    ground-truth rows). A case of another generator seed than the cohort's (``cohort.test_seed``)
    gets its seed in its id, ``demo_s<seed>_<index>``, so it can never be taken for the cohort's own."""
    index, seed, split, out_dir, lesion_scale, cohort_seed = args
    case = generate_case(index, seed, lesion_scale)
    if seed != cohort_seed:
        case.case_id = f"demo_s{seed}_{index:04d}"
    image_path = out_dir / "images" / f"{case.case_id}.nii.gz"
    mask_path = out_dir / "masks" / f"{case.case_id}.nii.gz"
    _save_nifti(case.image, case.affine, image_path, np.int16)
    _save_nifti(case.mask, case.affine, mask_path, np.uint8)
    lesion_path = out_dir / LESIONS_DIR / f"{case.case_id}.nii.gz"
    lesions = lesion_map(case)
    if lesions is None:
        lesion_path.unlink(missing_ok=True)  # a map left by an earlier cohort in this folder would mislead
    else:
        _save_nifti(lesions, case.affine, lesion_path, np.uint8)
    row = {
        "case_id": case.case_id, "split": split, "image_path": str(image_path), "mask_path": str(mask_path),
        "report_text": case.report, "source": SOURCE, "spacing_x": case.spacing[0], "spacing_y": case.spacing[1],
        "spacing_z": case.spacing[2], "shape_x": int(case.image.shape[0]), "shape_y": int(case.image.shape[1]),
        "shape_z": int(case.image.shape[2]), "rescale_slope": None, "rescale_intercept": None,
        "source_id": case.case_id, "ingest_note": None,
    }
    anatomy_of = {d.id: d.anatomy for d in catalog.diseases("demo")}
    truth = [{"case_id": case.case_id, "disease_id": disease_id, "anatomy": anatomy_of[disease_id],
              "label": int(value)} for disease_id, value in case.labels.items()]
    return row, truth


def write_cohort(out_dir: str | Path, n_cases: int, seed: int,
                 split: tuple[float, float, float] = (0.7, 0.15, 0.15), extra_test: int = 0,
                 workers: int = 1, extra_val: int = 0, extra_train: int = 0, lesion_scale: float = 1.0,
                 test_seed: int | None = None) -> Path:
    """Write ``n_cases`` synthetic cases (NIfTI images and masks) plus manifest and ground truth,
    split by ``assign_splits``; then ``extra_test`` more cases (indices n_cases, n_cases + 1, ...),
    all in the test split, then ``extra_val`` more in the validation split, then ``extra_train``
    more in the training split: larger splits that leave every other case exactly as it is (the
    extra test cases keep their indices whatever extra_val and extra_train are). ``workers``
    processes render cases in parallel (the output does not depend on it). ``lesion_scale``
    multiplies the radii of the local lesions (an experiment's lever; 1 = the demo's sizes).
    ``test_seed``: every test case (the split's test share and the extra test cases, same indices)
    is rendered from this generator seed instead: a test split no earlier comparison has seen, while
    the training and validation cases stay exactly as they are.

    Also writes ``out_dir/lesions``: each case's local lesions (``lesion_map``) and labels.json.

    Returns the path of ``out_dir/manifest.parquet``.
    """
    import json
    from concurrent.futures import ProcessPoolExecutor

    from ...progress import lines
    from ...workspace import write_text_atomic

    if test_seed is not None and test_seed == seed:
        raise ValueError(f"cohort.test_seed {test_seed} is the cohort's own seed: pick a generator seed never used")
    out_dir = Path(out_dir)
    for sub in ("images", "masks", LESIONS_DIR):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / LESIONS_DIR / LESION_LABELS, json.dumps(_lesion_labels(), indent=1))
    splits = (assign_splits([case_labels(i, seed) for i in range(n_cases)], seed, split)
              + ["test"] * extra_test + ["val"] * extra_val + ["train"] * extra_train)
    jobs = [(i, test_seed if s == "test" and test_seed is not None else seed, s, out_dir, lesion_scale, seed)
            for i, s in enumerate(splits)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            done = list(lines(pool.map(_write_case, jobs, chunksize=4), len(jobs), "demo cohort", "case"))
    else:
        done = [_write_case(job) for job in lines(jobs, len(jobs), "demo cohort", "case")]
    manifest = frame([row for row, _ in done], MANIFEST_SCHEMA)
    truth = frame([r for _, rows in done for r in rows], GROUND_TRUTH_SCHEMA)
    return write(manifest, truth, None, out_dir)["manifest"]

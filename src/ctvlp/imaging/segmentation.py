"""TotalSegmentator class maps on the image grid, from three backends.

``class_map(backend, case, cfg)`` returns ``(label_image, class_version)``: a SimpleITK image of
TotalSegmentator "total" class ids (0 = background) with exactly the size, spacing, origin and
direction of ``read_image(case["image_path"])``, and the class set of those ids ("v1": 104
classes, "v2": 117; see ``catalog.totalseg_classes``). ``segment.group_classes(label_image,
version)`` turns it into the 36-anatomy map.

Backends (``case`` is a manifest row as a dict: case_id, image_path, mask_path, ...):

``phantom``
    ``case["mask_path"]`` (the demo cohort's masks); version ``cfg["class_version"]`` (default v2).
``precomputed``
    ``cfg["path"]`` is a folder holding, per case, either a multilabel file
    ``{path}/{case_id}.nii.gz`` (or ``.nii``, ``.nrrd``, ``.mha``; version ``cfg["class_version"]``,
    default v2) or a folder ``{path}/{case_id}/`` of binary masks named ``<class_name>.nii.gz``
    (TotalSegmentator's output without ``--ml``); the version is detected from the file names
    (``cfg["class_version"]`` breaks a tie when all names exist in both class sets).
``totalsegmentator``
    Runs TotalSegmentator (task "total", v2 classes, multilabel) through its Python API with
    ``cfg["fast"]``, ``cfg["device"]`` and ``roi_subset`` = the classes that the anatomies in
    ``cfg["anatomies"]`` need (all classes when absent). Weights are looked up in
    ``cfg["weights_dir"]`` (exported as TOTALSEG_HOME_DIR for the call), else the environment's
    TOTALSEG_HOME_DIR (or TOTALSEG_WEIGHTS_PATH), else ~/.totalsegmentator. Missing weights raise
    ``WeightsMissingError`` before TotalSegmentator is even imported, unless ``cfg["download"]`` is
    true: then TotalSegmentator tries to download them, and a failed download (offline: a requests
    ConnectionError) is raised as ``WeightsMissingError`` with the same advice.
    ``cfg["threads"]`` (default 1) caps TotalSegmentator's resampling/saving threads. Usage statistics are
    switched off by writing ``"send_usage_stats": false`` into ``<TOTALSEG_HOME_DIR>/config.json``
    before every call (that file is the only switch TotalSegmentator 2.x reads). Inside
    ``shard_session(cfg)`` (the segment stage runs a shard of cases in one) each of its nnU-Net
    networks is loaded once for all cases rather than once per call (``totalseg.Session``: the
    same TotalSegmentator steps, the same masks). ``preflight(cfg)`` names what would stop the
    backend (package or weights missing) so the workflow can refuse to start.

Every mask (any backend) that is not already on the image grid is resampled onto it through both
images' physical coordinates (nearest neighbour), so masks stored on another grid or with flipped
axes (e.g. a NIfTI written from a DICOM series) land on the right voxels.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import random
import string
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import catalog
from .io import manifest_spacing, read_case_image, read_image

log = logging.getLogger(__name__)

BACKENDS = ("phantom", "precomputed", "totalsegmentator")
MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

WEIGHTS_HELP = (
    "Get them on a machine with internet access with `totalseg_download_weights -t {task}`, or "
    "unpack downloaded weight zips with `totalseg_import_weights -i <zip>`, then point "
    "TOTALSEG_HOME_DIR (or segment.weights_dir in the config) at that TotalSegmentator home folder "
    "(the one holding nnunet/results/){download}. Or switch backend: segment.backend: precomputed "
    "with segment.path: a folder of {{case_id}}.nii.gz multilabel masks or {{case_id}}/<class>.nii.gz files."
)
DOWNLOAD_HINT = "; or set segment.download: true to let TotalSegmentator download them itself (needs internet)"
INSTALL_HELP = (
    "segment.backend is totalsegmentator, but the totalsegmentator package is not installed in this "
    "environment: run `make install TOTALSEG=1` (installs it into .venv; `make install` and `make demo` do so by "
    "themselves when config.yaml selects segment.backend: totalsegmentator), or `pip install 'ctvlp[totalseg]'`.")


class WeightsMissingError(RuntimeError):
    """TotalSegmentator weights are not on this machine (and could not be downloaded)."""


# ---------------------------------------------------------------------------------------------
# Grid handling


def _image_grid(case: dict, image: sitk.Image | None = None) -> dict:
    """Size, spacing, origin and direction of the case's image as ``io.read_case_image``
    returns it (the manifest's spacing where the header disagrees); ``header_spacing`` keeps the
    header's, so a mask made on the header grid is still recognised as voxel-aligned. ``image``:
    the image as already read (a DICOM series is then not read again). A DICOM folder's series is
    the manifest's ``series_uid`` (else ``io.choose_series``'s rule)."""
    path = Path(case["image_path"])
    if image is not None or path.is_dir():  # DICOM: only the series reader knows slice order and spacing
        img = image if image is not None else read_image(path, case.get("series_uid"))
        grid = {"size": img.GetSize(), "spacing": img.GetSpacing(), "origin": img.GetOrigin(),
                "direction": img.GetDirection()}
    elif not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    else:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        grid = {"size": reader.GetSize(), "spacing": reader.GetSpacing(), "origin": reader.GetOrigin(),
                "direction": reader.GetDirection()}
    grid["header_spacing"] = grid["spacing"]
    grid["spacing"] = tuple(manifest_spacing(case, grid["spacing"]) or grid["spacing"])
    return grid


def _on_grid(img: sitk.Image, grid: dict, tol: float = 1e-3) -> bool:
    spacings = (grid["spacing"], grid.get("header_spacing", grid["spacing"]))
    return (tuple(img.GetSize()) == tuple(grid["size"])
            and any(np.allclose(img.GetSpacing(), s, rtol=0, atol=tol) for s in spacings)
            and np.allclose(img.GetOrigin(), grid["origin"], rtol=0, atol=tol)
            and np.allclose(img.GetDirection(), grid["direction"], rtol=0, atol=1e-4))


def _as_labels(img: sitk.Image) -> sitk.Image:
    """Integer label image (UInt8, or UInt16 past 255); float masks are rounded."""
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("segmentation must have one component per voxel, not "
                         f"{img.GetNumberOfComponentsPerPixel()}")
    arr = sitk.GetArrayViewFromImage(img)
    if arr.dtype.kind == "f":
        arr = np.rint(arr)
    if arr.size and arr.min() < 0:
        raise ValueError(f"segmentation has negative label ids (min {arr.min()})")
    dtype = np.uint8 if (not arr.size or arr.max() < 256) else np.uint16
    if arr.dtype == dtype:
        return img
    out = sitk.GetImageFromArray(arr.astype(dtype))
    out.CopyInformation(img)
    return out


def onto_grid(mask: sitk.Image, grid: dict, min_overlap: float = 0.5) -> sitk.Image:
    """Put a label image onto ``grid`` (from ``_image_grid``) via physical coordinates, nearest
    neighbour, background 0. A mask already on the grid (to 1e-3 mm) only gets its header copied.
    Raises ValueError when less than ``min_overlap`` of the mask's labelled volume lands on the grid."""
    mask = _as_labels(mask)
    if _on_grid(mask, grid):
        out = sitk.Image(mask)
        out.SetSpacing(grid["spacing"])
        out.SetOrigin(grid["origin"])
        out.SetDirection(grid["direction"])
        return out
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in grid["size"]])
    f.SetOutputSpacing(grid["spacing"])
    f.SetOutputOrigin(grid["origin"])
    f.SetOutputDirection(grid["direction"])
    f.SetTransform(sitk.Transform())
    f.SetInterpolator(sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(0)
    f.SetOutputPixelType(mask.GetPixelID())
    out = f.Execute(mask)
    # A mask that belongs to another scan (or has a broken header) lands mostly off the image.
    before = np.count_nonzero(sitk.GetArrayViewFromImage(mask)) * float(np.prod(mask.GetSpacing()))
    after = np.count_nonzero(sitk.GetArrayViewFromImage(out)) * float(np.prod(grid["spacing"]))
    if before and after < min_overlap * before:
        raise ValueError(
            f"mask does not match its image: only {after / before:.0%} of the mask's labelled volume "
            f"({before / 1000:.0f} ml) falls inside the image (need {min_overlap:.0%}); mask size "
            f"{list(mask.GetSize())} spacing {[round(v, 3) for v in mask.GetSpacing()]} origin "
            f"{[round(v, 1) for v in mask.GetOrigin()]} vs image size {list(grid['size'])} origin "
            f"{[round(v, 1) for v in grid['origin']]}")
    return out


def _check_ids(img: sitk.Image, version: str, what: str) -> None:
    n = max(catalog.totalseg_classes(version))
    mx = int(sitk.GetArrayViewFromImage(img).max()) if img.GetNumberOfPixels() else 0
    if mx > n:
        raise ValueError(f"{what}: label id {mx} is outside TotalSegmentator {version} (1..{n}); "
                         "wrong segment.class_version?")


# ---------------------------------------------------------------------------------------------
# precomputed


def _strip_suffix(name: str) -> str | None:
    for suf in MASK_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return None


def detect_version(class_names, prefer: str = "v2") -> str:
    """The TotalSegmentator class set ("v1"/"v2") that all ``class_names`` belong to.

    Names found in both sets (most organs) give ``prefer``; names fitting neither raise ValueError.
    """
    names = set(class_names)
    if not names:
        raise ValueError("no class names to detect the TotalSegmentator version from")
    fits = [v for v in ("v2", "v1") if names <= set(catalog.totalseg_classes(v).values())]
    if not fits:
        v1 = set(catalog.totalseg_classes("v1").values())
        v2 = set(catalog.totalseg_classes("v2").values())
        raise ValueError(
            "class names fit neither TotalSegmentator v2 nor v1: "
            f"not in v2: {', '.join(sorted(names - v2))}; not in v1: {', '.join(sorted(names - v1))}")
    return prefer if prefer in fits else fits[0]


def _from_class_folder(folder: Path, grid: dict, prefer: str) -> tuple[sitk.Image, str]:
    files = {}
    for p in sorted(folder.iterdir()):
        name = _strip_suffix(p.name)
        if name is not None and p.is_file():
            files[name] = p
    if not files:
        raise FileNotFoundError(f"{folder}: no per-class mask files (<class_name>.nii.gz) in the folder")
    version = detect_version(files, prefer)
    ids = {n: cid for cid, n in catalog.totalseg_classes(version).items()}
    dtype = np.uint8 if max(ids.values()) < 256 else np.uint16
    out = None
    for name in sorted(files, key=ids.get):  # ascending class id: deterministic on overlaps
        m = onto_grid(sitk.ReadImage(str(files[name])), grid)
        arr = sitk.GetArrayViewFromImage(m)
        if out is None:
            out = np.zeros(arr.shape, dtype=dtype)
            ref = m
        out[arr > 0] = ids[name]
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(ref)
    return img, version


def _precomputed(case: dict, cfg: dict, grid: dict) -> tuple[sitk.Image, str]:
    if not cfg.get("path"):
        raise ValueError("segment.backend precomputed needs segment.path (a folder of segmentations)")
    root = Path(cfg["path"])
    cid = str(case["case_id"])
    prefer = cfg.get("class_version") or "v2"
    candidates = [root / f"{cid}{suf}" for suf in MASK_SUFFIXES]
    for p in candidates:
        if p.is_file():
            version = prefer
            img = onto_grid(sitk.ReadImage(str(p)), grid)
            _check_ids(img, version, str(p))
            return img, version
    folder = root / cid
    if folder.is_dir():
        return _from_class_folder(folder, grid, prefer)
    raise FileNotFoundError(
        f"no precomputed segmentation for case {cid!r}: expected a multilabel file "
        f"({', '.join(str(p) for p in candidates)}) or a folder of per-class masks {folder}/<class>.nii.gz")


# ---------------------------------------------------------------------------------------------
# totalsegmentator


def roi_subset(anatomies) -> list[str] | None:
    """TotalSegmentator v2 class names needed for the given anatomy names (None = all classes)."""
    if anatomies is None or anatomies == "all":
        return None
    names = list(anatomies)
    if set(catalog.anatomy_names()) <= set(names):
        return None
    classes = [c for n in names for c in catalog.anatomy_by_name(n).totalseg_v2]
    return sorted(set(classes), key=lambda c: catalog.class_id(c, "v2"))


def totalseg_home(cfg: dict | None = None) -> Path:
    """The TotalSegmentator home folder used: segment.weights_dir, $TOTALSEG_HOME_DIR, ~/.totalsegmentator."""
    cfg = cfg or {}
    if cfg.get("weights_dir"):
        return Path(cfg["weights_dir"]).expanduser()
    if os.environ.get("TOTALSEG_HOME_DIR"):
        return Path(os.environ["TOTALSEG_HOME_DIR"])
    home = Path("/tmp") if str(Path.home()) == "/" else Path.home()  # as TotalSegmentator does
    return home / ".totalsegmentator"


def weights_dir(home: Path) -> Path:
    """Where TotalSegmentator looks for nnU-Net weights (its config.get_weights_dir)."""
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        return Path(os.environ["TOTALSEG_WEIGHTS_PATH"])
    return home / "nnunet" / "results"


def required_datasets(fast: bool, subset: list[str] | None) -> list[str]:
    """Weight folders task "total" needs: the 5 part models (or the 3 mm model with fast) plus the
    6 mm model TotalSegmentator runs first to crop when a roi_subset is given."""
    from totalsegmentator.map_tasks_config import (  # plain dicts
        TASK_CONFIGS,
        TASK_ID_WEIGHTS_CONFIGS,
    )

    ids = TASK_CONFIGS["total"]["sub_modes"]["fast" if fast else "default"]["task_id"]
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    if subset is not None:
        ids.append(298)
    return [TASK_ID_WEIGHTS_CONFIGS[i]["foldername"] for i in ids]


def missing_weights(wdir: Path, datasets: list[str]) -> list[str]:
    """Dataset folders absent from ``wdir`` or holding no checkpoint_final.pth."""
    return [d for d in datasets
            if not (wdir / d).is_dir() or next((wdir / d).rglob("checkpoint_final.pth"), None) is None]


def disable_usage_stats(home: Path) -> Path:
    """Write ``send_usage_stats: false`` into TotalSegmentator's config.json (created if absent,
    with the same keys TotalSegmentator's setup_totalseg writes) and mark its disclaimer shown."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    config = {}
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            config = {}
    config.setdefault("totalseg_id",
                      "totalseg_" + "".join(random.Random().choices(string.ascii_uppercase + string.digits, k=8)))
    config.setdefault("prediction_counter", 0)
    config["send_usage_stats"] = False
    config["statistics_disclaimer_shown"] = True
    path.write_text(json.dumps(config, indent=4))
    return path


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _weights_message(wdir: Path, missing: list[str], fast: bool, cause: str = "") -> str:
    return (f"TotalSegmentator weights for task 'total' are missing in {wdir}: {', '.join(missing)}"
            f"{cause}. " + WEIGHTS_HELP.format(task="total_fast" if fast else "total",
                                               download="" if cause else DOWNLOAD_HINT))


def preflight(cfg: dict) -> str | None:
    """What stops the configured segment backend before any case runs, or None: for
    totalsegmentator, the package not installed or its weights (for segment.fast, only the 3 mm
    model's folder) missing from the TotalSegmentator home. ``cfg``: the segment section."""
    if cfg.get("backend") != "totalsegmentator":
        return None
    if importlib.util.find_spec("totalsegmentator") is None:
        return INSTALL_HELP
    if cfg.get("download", False):
        return None  # TotalSegmentator fetches what is missing (a failed download is reported per case)
    fast = bool(cfg.get("fast", False))
    wdir = weights_dir(totalseg_home(cfg))
    missing = missing_weights(wdir, required_datasets(fast, roi_subset(cfg.get("anatomies"))))
    if not missing:
        return None
    note = ("" if fast else " With segment.fast: true only one folder is needed, the 3 mm model's ("
            + required_datasets(True, None)[0] + "; `totalseg_download_weights -t total_fast`).")
    return _weights_message(wdir, missing, fast) + note


@contextlib.contextmanager
def shard_session(cfg: dict):
    """Segment many cases inside this block. With the totalsegmentator backend, TotalSegmentator's
    nnU-Net networks are then built and loaded once for all the block's cases (``totalseg.Session``)
    instead of once per ``totalsegmentator()`` call; other backends load nothing, so the block
    does nothing for them. Yields the session (None for other backends). Missing weights raise
    ``WeightsMissingError`` and a missing package ImportError here, before any case."""
    if cfg.get("backend") != "totalsegmentator":
        yield None
        return
    problem = preflight(cfg)
    if problem == INSTALL_HELP:
        raise ImportError(problem)
    if problem:
        raise WeightsMissingError(problem)
    from .totalseg import Session

    session = Session()
    try:
        with session.active():
            yield session
    finally:
        log.info("TotalSegmentator: %d network(s) loaded in %.1f s, %.1f s of nnU-Net prediction",
                 session.loads, session.load_seconds, session.predict_seconds)
        session.close()


def _totalsegmentator(case: dict, cfg: dict, grid: dict) -> tuple[sitk.Image, str]:
    home = totalseg_home(cfg)
    fast = bool(cfg.get("fast", False))
    subset = roi_subset(cfg.get("anatomies"))
    wdir = weights_dir(home)
    needed = required_datasets(fast, subset)
    if not cfg.get("download", False):
        missing = missing_weights(wdir, needed)
        if missing:  # fail before importing torch / nnU-Net, and before any download attempt
            raise WeightsMissingError(_weights_message(wdir, missing, fast))
    disable_usage_stats(home)
    image_path = Path(case["image_path"])
    with _env(TOTALSEG_HOME_DIR=home), tempfile.TemporaryDirectory(prefix="ctvlp_totalseg_") as tmp:
        import requests
        from totalsegmentator.python_api import totalsegmentator

        from .totalseg import register_trainers

        register_trainers()
        if (image_path.is_file() and image_path.name.endswith((".nii.gz", ".nii"))
                and tuple(grid["spacing"]) == tuple(grid["header_spacing"])):
            inp = image_path
        else:  # DICOM folder, NRRD, MHA, or spacing fixed from the manifest: hand it a NIfTI
            inp = Path(tmp) / "image.nii.gz"  # (TotalSegmentator's own DICOM path needs dcm2niix)
            sitk.WriteImage(read_case_image(case)[0], str(inp))
        out = Path(tmp) / "seg.nii.gz"
        try:
            totalsegmentator(input=inp, output=out, ml=True, task="total", fast=fast,
                             device=cfg.get("device", "gpu"), roi_subset=subset, statistics=False,
                             quiet=True, nr_thr_resamp=int(cfg.get("threads", 1)),
                             nr_thr_saving=int(cfg.get("threads", 1)))
        except requests.exceptions.RequestException as e:
            # TotalSegmentator downloads missing weights on first use; offline that is a
            # requests ConnectionError (name resolution / proxy failure).
            raise WeightsMissingError(_weights_message(
                wdir, missing_weights(wdir, needed) or needed, fast,
                f" and downloading them failed ({type(e).__name__}: {e})")) from e
        mask = onto_grid(sitk.ReadImage(str(out)), grid)
    _check_ids(mask, "v2", f"TotalSegmentator output for {case['case_id']}")
    return mask, "v2"


# ---------------------------------------------------------------------------------------------


def class_map(backend: str, case: dict, cfg: dict | None = None,
              image: sitk.Image | None = None) -> tuple[sitk.Image, str]:
    """TotalSegmentator class-id image on the grid of ``case["image_path"]`` and its class version.
    ``image``: the case's image as read from disk (header spacing), when the caller has it."""
    cfg = dict(cfg or {})
    if backend not in BACKENDS:
        raise ValueError(f"unknown segment backend {backend!r}; use one of {', '.join(BACKENDS)}")
    grid = _image_grid(case, image)
    if backend == "phantom":
        mask_path = case.get("mask_path")
        if not mask_path:
            raise ValueError(f"case {case.get('case_id')!r} has no mask_path; segment.backend phantom "
                             "only works with the demo cohort (use precomputed or totalsegmentator)")
        version = cfg.get("class_version") or "v2"
        img = onto_grid(read_image(mask_path), grid)
        _check_ids(img, version, str(mask_path))
        return img, version
    if backend == "precomputed":
        return _precomputed(case, cfg, grid)
    return _totalsegmentator(case, cfg, grid)

"""Imaging throughput: ctvlp preprocessing vs a plain MONAI pipeline, and training crop loading
from ctvlp's .npy storage vs NIfTI.

    python benchmarks/imaging.py [--repeats N] [--out benchmarks/results] [--shared ../shared] [--keep]

Part 1 (real CTs from ../shared/data/real_ct, target spacing 1x1x5 mm as in the paper):
  * ctvlp: ``ctvlp.imaging.preprocess.preprocess_case`` (header/QC checks, HU decision and checks, LPS
    orientation, image linear + anatomy map nearest resampling, HU window [-1000, 1000] -> [0, 1],
    writes image.npy float16 + anatomy.npy uint8 + meta.json). Its anatomy map is made beforehand,
    untimed, by ``segment_case`` (backend "phantom") from the reference segmentation; files without
    one get a class map with TotalSegmentator class 1 (spleen) over the central block of the grid.
  * MONAI: LoadImage(image_only, ensure_channel_first) -> Orientation("LPS") -> Spacing((1, 1, 5),
    bilinear) -> ScaleIntensityRange(-1000, 1000 -> 0, 1, clip) -> np.save float16; then the same
    plus the anatomy map (LoadImage -> Orientation -> Spacing nearest -> np.save uint8).
  Each method runs for each file in its own fresh subprocess: imports, then one warm-up and N timed
  runs (median reported); the process's peak RSS (VmHWM from /proc/self/status) is read right
  after the imports (the import baseline) and after the runs (peak). The outputs are compared:
  mean absolute difference of the [0, 1] images and label agreement, over the overlapping region
  when the grids differ in size (both grids start at the first input voxel centre).

Part 2 (training crop loading): a random crop (paper: 256x384x96) of image + anatomy map, returned
as float32 image + uint8 map, from: ctvlp's .npy memory-maps (what ``CropDataset.__getitem__``
does), a full np.load, NIfTI .nii.gz (nibabel; float32 [0, 1] image since NIfTI has no float16; and
int16 HU scaled after the crop), uncompressed .nii (nibabel memory-map), and .nii.gz through MONAI
LoadImage. Volumes: the real example_ct preprocessed by ctvlp at 1x1x3 mm, and a synthetic
paper-sized 400x400x150 volume (lung1 CT resampled to that size plus noise, HU-threshold map).

Writes imaging.md and imaging.csv into --out (machine, versions, date and command recorded).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu  # benchmarks/machine.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
TARGET_SPACING = [1.0, 1.0, 5.0]
HU_WINDOW = [-1000, 1000]
PRE_CFG = {"spacing": TARGET_SPACING, "hu_window": HU_WINDOW, "hu": "auto", "min_slices": 10,
           "spacing_range": [0.1, 20.0], "max_voxels": 1_000_000_000, "max_nonfinite_fraction": 0.001}
# (name, image relative to data/real_ct, reference segmentation or None)
FILES = [
    ("example_ct", "totalsegmentator/example_ct.nii.gz", "totalsegmentator/example_seg_fast_force_split.nii.gz"),
    ("example_ct_dicom", "totalsegmentator/example_ct_dicom", "totalsegmentator/example_seg_dicom.nii.gz"),
    ("chest_ct_cropped", "totalsegmentator/chest_ct_cropped.nii.gz", None),
    ("lung1", "pyradiomics/lung1_image.nrrd", None),
]
PAPER_CROP = (256, 384, 96)
SYNTH_SHAPE = (400, 400, 150)


# ---------------------------------------------------------------------------------------------
# small helpers


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text(encoding="utf-8").splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def _ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ctvlp", "numpy", "SimpleITK", "nibabel", "scipy", "polars", "monai", "torch", "pydicom"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _mb(nbytes: int) -> float:
    return nbytes / 1e6


# ---------------------------------------------------------------------------------------------
# workers (fresh subprocesses): part 1 timing and peak memory


def _worker_ctvlp(spec: dict) -> dict:
    import numpy as np  # noqa: F401
    import scipy.ndimage  # noqa: F401 - preprocess_case imports it lazily; count it as an import
    import SimpleITK as sitk

    from ctvlp.imaging import io as imaging_io
    from ctvlp.imaging import preprocess

    hwm_import = _status_kb("VmHWM")
    case = {"case_id": spec["name"], "image_path": spec["image"], "rescale_slope": None, "rescale_intercept": None}
    times = []
    for i in range(spec["repeats"] + 1):  # first run = warm-up
        t0 = time.perf_counter()
        meta = preprocess.preprocess_case(case, spec["anatomy"], spec["cfg"], spec["out_dir"])
        dt_ = time.perf_counter() - t0
        if i:
            times.append(dt_)
    hwm_peak = _status_kb("VmHWM")
    reads = []  # the read alone (after the peak reading), to show how much of the time it is
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        imaging_io.read_image(spec["image"])
        reads.append(time.perf_counter() - t0)
    return {"times": times, "read_times": reads, "hwm_import_kb": hwm_import, "hwm_peak_kb": hwm_peak,
            "threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), "shape": meta["size"],
            "origin_lps": meta["origin"], "hu_decision": meta["hu_decision"]}


def _worker_monai(spec: dict) -> dict:
    import numpy as np
    import torch
    from monai.transforms import LoadImage, Orientation, ScaleIntensityRange, Spacing

    hwm_import = _status_kb("VmHWM")
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    load = LoadImage(image_only=True, ensure_channel_first=True)
    orient = Orientation(axcodes="LPS")
    space = Spacing(pixdim=tuple(spec["cfg"]["spacing"]), mode="bilinear")
    space_nn = Spacing(pixdim=tuple(spec["cfg"]["spacing"]), mode="nearest")
    lo, hi = spec["cfg"]["hu_window"]
    scale = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)

    def image():
        x = scale(space(orient(load(spec["monai_image"]))))
        np.save(out / "image.npy", x[0].numpy().astype(np.float16))
        return x

    def label():
        lab = space_nn(orient(load(spec["anatomy"])))
        np.save(out / "anatomy.npy", lab[0].numpy().astype(np.uint8))
        return lab

    t_img, t_both = [], []
    for i in range(spec["repeats"] + 1):
        t0 = time.perf_counter()
        x = image()
        if i:
            t_img.append(time.perf_counter() - t0)
    hwm_img = _status_kb("VmHWM")
    for i in range(spec["repeats"] + 1):
        t0 = time.perf_counter()
        x = image()
        label()
        if i:
            t_both.append(time.perf_counter() - t0)
    aff = x.affine.numpy()
    origin_lps = [-float(aff[0, 3]), -float(aff[1, 3]), float(aff[2, 3])]  # MONAI affines are RAS
    return {"times": t_img, "times_both": t_both, "hwm_import_kb": hwm_import, "hwm_peak_kb": hwm_img,
            "hwm_peak_both_kb": _status_kb("VmHWM"), "threads": torch.get_num_threads(),
            "shape": list(x.shape[1:]), "origin_lps": origin_lps}


def _worker_baseline(spec: dict) -> dict:
    import numpy as np  # noqa: F401

    return {"hwm_import_kb": _status_kb("VmHWM")}


WORKERS = {"ctvlp": _worker_ctvlp, "monai": _worker_monai, "baseline": _worker_baseline}


def _run_worker(kind: str, spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker failed for {spec.get('name')}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# part 1


def _block_class_map(image_path: Path, out_path: Path) -> None:
    """TotalSegmentator class 1 (spleen) over the central half of every axis, on the image grid."""
    import numpy as np
    import SimpleITK as sitk

    from ctvlp import catalog
    from ctvlp.imaging import io as imaging_io

    img = imaging_io.read_image(image_path)
    arr = np.zeros(sitk.GetArrayViewFromImage(img).shape, dtype=np.uint8)
    arr[tuple(slice(n // 4, n - n // 4) for n in arr.shape)] = catalog.class_id("spleen", "v2")
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(img)
    sitk.WriteImage(lab, str(out_path), useCompression=True)


def _monai_can_read(path: Path) -> bool:
    import importlib.util

    if path.name.endswith(".nrrd"):
        return any(importlib.util.find_spec(m) for m in ("itk", "nrrd"))
    return True


def part1(data: Path, work: Path, repeats: int, log) -> list[dict]:
    import numpy as np
    import SimpleITK as sitk

    from ctvlp.imaging import io as imaging_io
    from ctvlp.imaging import segment

    rows = []
    for name, rel, seg in FILES:
        image = data / rel
        wd = work / "pre" / name
        wd.mkdir(parents=True, exist_ok=True)
        if seg is not None:
            mask, anat_src = data / seg, f"reference segmentation {Path(seg).name}"
        else:
            mask = wd / "block_classes.nii.gz"
            _block_class_map(image, mask)
            anat_src = "synthetic block (TotalSegmentator class 1 = spleen, central half of each axis)"
        case = {"case_id": name, "image_path": str(image), "mask_path": str(mask),
                "rescale_slope": None, "rescale_intercept": None}
        segment.segment_case(case, {"backend": "phantom", "class_version": "v2", "min_voxels": 10,
                                    "preprocess": PRE_CFG}, wd / "segment")
        anatomy = wd / "segment" / "anatomy.nii.gz"
        monai_image, monai_note = image, ""
        if not _monai_can_read(image):
            monai_image = wd / (image.name.split(".")[0] + ".nii.gz")
            sitk.WriteImage(sitk.ReadImage(str(image)), str(monai_image), useCompression=True)
            monai_note = ("MONAI has no .nrrd reader here (needs itk or pynrrd, neither installed): MONAI read a "
                          ".nii.gz copy written by SimpleITK (untimed); ctvlp read the .nrrd")
        src = imaging_io.read_image(image)
        spec = {"name": name, "image": str(image), "anatomy": str(anatomy), "cfg": PRE_CFG, "repeats": repeats}
        log(f"[1] {name}: ctvlp ...")
        rc = _run_worker("ctvlp", {**spec, "out_dir": str(wd / "ctvlp")})
        log(f"[1] {name}: ctvlp median {_median(rc['times']):.2f} s; MONAI ...")
        rm = _run_worker("monai", {**spec, "monai_image": str(monai_image), "out_dir": str(wd / "monai")})
        log(f"[1] {name}: MONAI median {_median(rm['times']):.2f} s (image), {_median(rm['times_both']):.2f} s (+label)")
        a = np.load(wd / "ctvlp" / "image.npy").astype(np.float32)
        b = np.load(wd / "monai" / "image.npy").astype(np.float32)
        la, lb = np.load(wd / "ctvlp" / "anatomy.npy"), np.load(wd / "monai" / "anatomy.npy")
        overlap = tuple(min(p, q) for p, q in zip(a.shape, b.shape))
        sl = tuple(slice(0, n) for n in overlap)
        diff = np.abs(a[sl] - b[sl])
        rows.append({
            "file": name, "path": rel, "input_size": list(src.GetSize()),
            "input_spacing": [round(s, 3) for s in src.GetSpacing()], "anatomy_source": anat_src,
            "ctvlp": rc, "monai": rm, "monai_note": monai_note,
            "ctvlp_shape": list(a.shape), "monai_shape": list(b.shape), "overlap": list(overlap),
            "same_shape": a.shape == b.shape, "mad": float(diff.mean()), "max_abs_diff": float(diff.max()),
            "label_agreement": float((la[sl] == lb[sl]).mean()),
            "origin_offset_mm": [round(p - q, 4) for p, q in zip(rc["origin_lps"], rm["origin_lps"])],
            "ctvlp_dir": str(wd / "ctvlp"),
        })
    return rows


# ---------------------------------------------------------------------------------------------
# part 2


def _evict(paths) -> None:
    """Best effort: drop our own files from the page cache (fsync, then POSIX_FADV_DONTNEED)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cached_fraction(path) -> float | None:
    """Fraction of a file in the page cache, via util-linux fincore (None when unavailable)."""
    if not shutil.which("fincore"):
        return None
    try:
        res = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                             capture_output=True, text=True, check=True).stdout.strip()
        return int(res) / max(os.path.getsize(path), 1)
    except (subprocess.CalledProcessError, ValueError):
        return None


def _write_storages(vol_dir: Path, image01, anatomy, hu_int16, spacing) -> dict:
    """The same volume in every storage; returns {storage: (image path, anatomy path)}."""
    import nibabel as nib
    import numpy as np

    vol_dir.mkdir(parents=True, exist_ok=True)
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-ordered axes in RAS terms
    np.save(vol_dir / "image.npy", image01.astype(np.float16))
    np.save(vol_dir / "anatomy.npy", anatomy.astype(np.uint8))
    img32 = image01.astype(np.float32)
    nib.save(nib.Nifti1Image(img32, aff), vol_dir / "image_f32.nii.gz")
    nib.save(nib.Nifti1Image(img32, aff), vol_dir / "image_f32.nii")
    nib.save(nib.Nifti1Image(hu_int16.astype(np.int16), aff), vol_dir / "image_hu_i16.nii.gz")
    nib.save(nib.Nifti1Image(anatomy.astype(np.uint8), aff), vol_dir / "anatomy.nii.gz")
    nib.save(nib.Nifti1Image(anatomy.astype(np.uint8), aff), vol_dir / "anatomy.nii")
    return {
        "npy mmap (ctvlp CropDataset)": (vol_dir / "image.npy", vol_dir / "anatomy.npy"),
        "npy full np.load": (vol_dir / "image.npy", vol_dir / "anatomy.npy"),
        ".nii float32, nibabel mmap + proxy slice": (vol_dir / "image_f32.nii", vol_dir / "anatomy.nii"),
        ".nii.gz float32, nibabel full load": (vol_dir / "image_f32.nii.gz", vol_dir / "anatomy.nii.gz"),
        ".nii.gz int16 HU, nibabel full load + scale": (vol_dir / "image_hu_i16.nii.gz", vol_dir / "anatomy.nii.gz"),
        ".nii.gz float32, MONAI LoadImage": (vol_dir / "image_f32.nii.gz", vol_dir / "anatomy.nii.gz"),
    }


def _loader(storage: str):
    import nibabel as nib
    import numpy as np

    if storage.startswith("npy mmap"):
        def f(ip, ap, sl):  # as ctvlp.training.data.CropDataset.__getitem__
            img = np.load(ip, mmap_mode="r")
            anat = np.load(ap, mmap_mode="r")
            return np.asarray(img[sl], dtype=np.float32), np.asarray(anat[sl])
    elif storage.startswith("npy full"):
        def f(ip, ap, sl):
            return np.load(ip)[sl].astype(np.float32), np.load(ap)[sl].copy()
    elif storage.startswith(".nii float32"):
        def f(ip, ap, sl):
            return (np.asarray(nib.load(ip, mmap=True).dataobj[sl], dtype=np.float32),
                    np.asarray(nib.load(ap, mmap=True).dataobj[sl]))
    elif "int16 HU" in storage:
        def f(ip, ap, sl):
            hu = np.asanyarray(nib.load(ip).dataobj)[sl]
            img = np.clip((hu.astype(np.float32) - HU_WINDOW[0]) / (HU_WINDOW[1] - HU_WINDOW[0]), 0.0, 1.0)
            return img, np.asanyarray(nib.load(ap).dataobj)[sl].copy()
    elif "nibabel full" in storage:
        def f(ip, ap, sl):
            return (np.asanyarray(nib.load(ip).dataobj)[sl].astype(np.float32),
                    np.asanyarray(nib.load(ap).dataobj)[sl].copy())
    elif "MONAI" in storage:
        from monai.transforms import LoadImage

        load = LoadImage(image_only=True)

        def f(ip, ap, sl):
            return (load(str(ip))[sl].numpy().astype(np.float32, copy=True),
                    load(str(ap))[sl].numpy().astype(np.uint8))
    else:
        raise ValueError(storage)
    return f


def _bench_crops(storages: dict, shape, crop, repeats: int, cold: bool, seed: int = 0) -> list[dict]:
    import numpy as np

    crop = tuple(min(c, s) for c, s in zip(crop, shape))
    out_bytes = int(np.prod(crop)) * (4 + 1)  # float32 image + uint8 anatomy
    rows = []
    for storage, (ip, ap) in storages.items():
        if cold and storage.startswith(("npy full", ".nii.gz int16", ".nii.gz float32, MONAI")):
            continue  # cold runs only for the main contenders (keeps the runtime down)
        f = _loader(storage)
        slow = ".nii.gz" in storage or storage.startswith("npy full")
        k = 2 if slow else 10  # crops per repeat
        rng = np.random.default_rng(seed)
        times, cached = [], None
        for r in range(repeats + 1):  # first repeat = warm-up
            t = 0.0
            for _ in range(k):
                starts = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, crop)]
                sl = tuple(slice(st, st + c) for st, c in zip(starts, crop))
                if cold:
                    _evict([ip, ap])
                    if cached is None:
                        cached = _cached_fraction(ip)
                t0 = time.perf_counter()
                img, anat = f(ip, ap, sl)
                t += time.perf_counter() - t0
                assert img.dtype == np.float32 and img.shape == crop and anat.shape == crop
            if r:
                times.append(t / k)
        med = _median(times)
        rows.append({"storage": storage, "cache": "cold (evicted)" if cold else "warm", "crop": list(crop),
                     "crops_per_repeat": k, "s_per_crop": med, "crops_per_s": 1 / med,
                     "mb_per_s": _mb(out_bytes) / med, "crop_mb": _mb(out_bytes),
                     "file_mb": _mb(os.path.getsize(ip) + os.path.getsize(ap)),
                     "image_file_mb": _mb(os.path.getsize(ip)), "anatomy_file_mb": _mb(os.path.getsize(ap)),
                     "cached_after_evict": cached})
    return rows


def _synthetic(data: Path, seed: int = 0):
    """Paper-sized volume from the real lung1 CT: LPS, resampled to 400x400x150 (linear), plus
    Gaussian noise (sd 10 HU) so gzip sees CT-like noise; anatomy map from HU thresholds."""
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    from ctvlp.imaging import io as imaging_io
    from ctvlp.imaging import preprocess

    img = sitk.DICOMOrient(imaging_io.read_image(data / "pyradiomics" / "lung1_image.nrrd"), "LPS")
    hu = imaging_io.to_xyz(img).astype(np.float32)
    hu = ndimage.zoom(hu, [t / s for t, s in zip(SYNTH_SHAPE, hu.shape)], order=1)[tuple(slice(0, n) for n in SYNTH_SHAPE)]
    hu += np.random.default_rng(seed).normal(0.0, 10.0, hu.shape).astype(np.float32)
    hu_i16 = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    anatomy = np.zeros(hu.shape, dtype=np.uint8)
    anatomy[(hu > -950) & (hu < -400)] = 1  # "lung"
    anatomy[hu > 300] = 2  # "bone"
    return preprocess.scale_hu(hu_i16, HU_WINDOW), anatomy, hu_i16


def part2(data: Path, work: Path, pre_rows: list[dict], repeats: int, log) -> list[dict]:
    import numpy as np

    from ctvlp.imaging import preprocess

    results = []
    # real: example_ct preprocessed by ctvlp at 1x1x3 mm (untimed here)
    ex = next(r for r in pre_rows if r["file"] == "example_ct")
    cfg3 = {**PRE_CFG, "spacing": [1.0, 1.0, 3.0]}
    case = {"case_id": "example_ct", "image_path": str(data / ex["path"]), "rescale_slope": None,
            "rescale_intercept": None}
    anat_path = work / "pre" / "example_ct" / "segment" / "anatomy.nii.gz"
    d3 = work / "crops" / "example_ct_1x1x3"
    preprocess.preprocess_case(case, anat_path, cfg3, d3 / "ctvlp")
    image01 = np.load(d3 / "ctvlp" / "image.npy").astype(np.float32)
    anatomy = np.load(d3 / "ctvlp" / "anatomy.npy")
    hu = np.rint(image01 * (HU_WINDOW[1] - HU_WINDOW[0]) + HU_WINDOW[0]).astype(np.int16)  # windowed HU
    vols = [("example_ct, real, ctvlp 1x1x3 mm", image01.shape, _write_storages(d3, image01, anatomy, hu, [1, 1, 3]))]
    log("[2] building the synthetic 400x400x150 volume ...")
    s01, sanat, shu = _synthetic(data)
    vols.append(("synthetic 400x400x150 at 1x1x5 mm (from lung1)", s01.shape,
                 _write_storages(work / "crops" / "synthetic", s01, sanat, shu, [1, 1, 5])))
    del s01, sanat, shu
    for label, shape, storages in vols:
        for cold in (False, True) if label.startswith("synthetic") else (False,):
            log(f"[2] {label}: {'cold' if cold else 'warm'} crops ...")
            for row in _bench_crops(storages, tuple(shape), PAPER_CROP, repeats, cold):
                results.append({"volume": label, "shape": list(shape), **row})
                log(f"    {row['storage']:<45} {row['crops_per_s']:8.2f} crops/s {row['mb_per_s']:8.1f} MB/s")
    return results


# ---------------------------------------------------------------------------------------------
# report


def _t(xs) -> str:
    """median (min-max) of the timed runs"""
    return f"{_median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def _fmt_shape(s) -> str:
    return "x".join(str(int(v)) for v in s)


def write_results(out: Path, info: dict, pre: list[dict], base: dict, crops: list[dict], repeats: int) -> None:
    import polars as pl

    mib = lambda kb: kb / 1024  # noqa: E731
    csv = []
    for r in pre:
        f = r["file"]
        for method, key, hwm in (("ctvlp preprocess_case", "times", "hwm_peak_kb"),
                                 ("MONAI image", "times", "hwm_peak_kb"),
                                 ("MONAI image+label", "times_both", "hwm_peak_both_kb")):
            res = r["ctvlp"] if method.startswith("ctvlp") else r["monai"]
            csv += [
                {"section": "preprocess", "dataset": f, "method": method, "metric": "seconds_median",
                 "value": _median(res[key]), "unit": "s", "detail": f"median of {repeats} after 1 warm-up"},
                {"section": "preprocess", "dataset": f, "method": method, "metric": "peak_rss",
                 "value": mib(res[hwm]), "unit": "MiB", "detail": "VmHWM of the fresh process, imports included"},
                {"section": "preprocess", "dataset": f, "method": method, "metric": "import_rss",
                 "value": mib(res["hwm_import_kb"]), "unit": "MiB", "detail": "VmHWM right after the imports"},
            ]
        csv += [
            {"section": "preprocess", "dataset": f, "method": "ctvlp vs MONAI", "metric": "mean_abs_diff",
             "value": r["mad"], "unit": "[0,1] intensity",
             "detail": "whole volume" if r["same_shape"] else f"overlap {_fmt_shape(r['overlap'])}"},
            {"section": "preprocess", "dataset": f, "method": "ctvlp vs MONAI", "metric": "max_abs_diff",
             "value": r["max_abs_diff"], "unit": "[0,1] intensity", "detail": ""},
            {"section": "preprocess", "dataset": f, "method": "ctvlp vs MONAI", "metric": "label_agreement",
             "value": r["label_agreement"], "unit": "fraction of voxels", "detail": ""},
        ]
        csv.append({"section": "preprocess", "dataset": f, "method": "ctvlp read_image only", "metric": "seconds_median",
                    "value": _median(r["ctvlp"]["read_times"]), "unit": "s",
                    "detail": "SimpleITK read of the input, part of the ctvlp time"})
    for k, v in base.items():
        csv.append({"section": "baseline", "dataset": "", "method": k, "metric": "import_rss",
                    "value": mib(v), "unit": "MiB", "detail": "VmHWM of a process that only imports"})
    for c in crops:
        for metric, unit in (("crops_per_s", "1/s"), ("mb_per_s", "MB/s"), ("s_per_crop", "s"), ("file_mb", "MB")):
            csv.append({"section": f"crops ({c['cache']})", "dataset": c["volume"], "method": c["storage"],
                        "metric": metric, "value": c[metric], "unit": unit,
                        "detail": f"crop {_fmt_shape(c['crop'])}, median of {repeats} x {c['crops_per_repeat']} crops"})
    pl.DataFrame(csv).write_csv(out / "imaging.csv")

    L = ["# Imaging: preprocessing and training crop loading", ""]
    L += [f"- machine: {info['node']}, {info['cpu']}, {info['cores']} cores, {info['ram_gib']:.1f} GiB RAM, "
          f"{info['os']}",
          f"- Python {info['python']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
          f"- threads: SimpleITK {pre[0]['ctvlp']['threads']}, torch {pre[0]['monai']['threads']} (library defaults)",
          f"- date: {info['date']}; total runtime {info['runtime_s']:.0f} s",
          f"- load average (1 min) at start {info['load_start']:.2f}, at end {info['load_end']:.2f}"
          + (f" on {info['cores']} cores: **the machine was shared with other jobs during the run**; absolute "
             "times are inflated and noisy, the ratios between methods are the more reliable part"
             if max(info["load_start"], info["load_end"]) > 0.5 * info["cores"] else ""),
          f"- command: `{info['command']}`", ""]
    L += ["## 1. Preprocessing: ctvlp vs plain MONAI (target 1x1x5 mm, HU [-1000, 1000] -> [0, 1])", "",
          f"Seconds per case: median (min-max) of {repeats} runs after one warm-up, each method in its own fresh process "
          "(files in the page cache). Outputs written as .npy (image float16, anatomy uint8) by both.", "",
          "| file | input (spacing mm) | ctvlp s | (of which: one read_image) | MONAI image s | MONAI image+label s "
          "| ctvlp shape | MONAI shape | mean abs diff | max abs diff | label agreement |",
          "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in pre:
        L.append(f"| {r['file']} | {_fmt_shape(r['input_size'])} ({'x'.join(f'{s:g}' for s in r['input_spacing'])}) "
                 f"| {_t(r['ctvlp']['times'])} | {_median(r['ctvlp']['read_times']):.2f} "
                 f"| {_t(r['monai']['times'])} "
                 f"| {_t(r['monai']['times_both'])} | {_fmt_shape(r['ctvlp_shape'])} "
                 f"| {_fmt_shape(r['monai_shape'])} | {r['mad']:.2e}{'' if r['same_shape'] else ' *'} "
                 f"| {r['max_abs_diff']:.3f} | {100 * r['label_agreement']:.3f} % |")
    L += ["", "\\* shapes differ: compared over the overlapping region (both grids start at the first input "
          "voxel centre; origin offsets " + "; ".join(
              f"{r['file']} {r['origin_offset_mm']} mm" for r in pre) + ").", ""]
    L += ["Anatomy map used by ctvlp (made untimed with `segment_case`, backend phantom):", ""]
    L += [f"- {r['file']}: {r['anatomy_source']}" + (f". {r['monai_note']}" if r["monai_note"] else "") for r in pre]
    L += ["", "### Peak memory (MiB, VmHWM of the process: Python + imported libraries + the work)", "",
          "| file | ctvlp after imports | ctvlp peak | MONAI after imports | MONAI peak (image) "
          "| MONAI peak (image+label) | ctvlp peak - imports | MONAI image+label peak - imports |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in pre:
        c, m = r["ctvlp"], r["monai"]
        L.append(f"| {r['file']} | {mib(c['hwm_import_kb']):.0f} | {mib(c['hwm_peak_kb']):.0f} "
                 f"| {mib(m['hwm_import_kb']):.0f} | {mib(m['hwm_peak_kb']):.0f} | {mib(m['hwm_peak_both_kb']):.0f} "
                 f"| {mib(c['hwm_peak_kb'] - c['hwm_import_kb']):.0f} "
                 f"| {mib(m['hwm_peak_both_kb'] - m['hwm_import_kb']):.0f} |")
    L += ["", "Import baselines (a fresh process that only imports, VmHWM): "
          + "; ".join(f"{k}: {mib(v):.0f} MiB" for k, v in base.items())
          + ". The ctvlp process imports ctvlp.imaging (SimpleITK, polars, nibabel lazily) and scipy.ndimage; the "
          "MONAI process imports torch and monai.transforms. The 'peak - imports' columns are a plain subtraction of "
          "the two VmHWM readings of the same process (the work's extra peak over the import footprint).", ""]
    L += ["## 2. Training crop loading", "",
          f"One sample = a random crop (paper {_fmt_shape(PAPER_CROP)}, clipped to the volume) of the image as float32 "
          "plus the anatomy map as uint8, loaded from the file(s) each time, as a DataLoader worker would. "
          "MB/s counts the bytes delivered (float32 crop + uint8 crop, 1 MB = 1e6 bytes); file MB = image + anatomy "
          f"file sizes on disk. Median of {repeats} repeats (after a warm-up repeat) of 10 crops (npy mmap, .nii) "
          "or 2 crops (full loads).", ""]
    for vol in dict.fromkeys(c["volume"] for c in crops):
        rows = [c for c in crops if c["volume"] == vol]
        L += [f"### {vol}: volume {_fmt_shape(rows[0]['shape'])}, crop {_fmt_shape(rows[0]['crop'])} "
              f"({rows[0]['crop_mb']:.1f} MB delivered per crop)", "",
              "| storage | page cache | file MB (image + anatomy) | crops/s | MB/s | ms/crop |",
              "|---|---|---:|---:|---:|---:|"]
        for c in rows:
            L.append(f"| {c['storage']} | {c['cache']} | {c['file_mb']:.1f} ({c['image_file_mb']:.1f} + "
                     f"{c['anatomy_file_mb']:.1f}) | {c['crops_per_s']:.2f} | {c['mb_per_s']:.0f} "
                     f"| {1000 * c['s_per_crop']:.0f} |")
        L.append("")
    L += ["## Notes", ""] + info["notes"] + [""]
    (out / "imaging.md").write_text("\n".join(L))


def _notes(pre, crops) -> list[str]:
    n = []
    ratios = [(r["file"], _median(r["ctvlp"]["times"]) / _median(r["monai"]["times_both"])) for r in pre]
    n.append("- Preprocessing time ratio ctvlp / MONAI image+label (same work: image linear + map nearest, both "
             "saved): " + ", ".join(f"{f} {x:.2f}x" for f, x in ratios) + ". ctvlp's time also includes what the "
             "MONAI pipeline does not do: header checks, the HU decision and HU percentiles on a subsample, the "
             "anatomy bounding boxes (scipy find_objects) and meta.json. MONAI's Spacing resamples in float64 "
             "(its default dtype) through torch; ctvlp uses SimpleITK in float32.")
    n.append("- Output grids: ctvlp sizes the new grid as round(n * spacing / target) voxels, MONAI Spacing as the "
             "extent between the first and last voxel centres divided by the target plus one, so they can differ "
             "by a voxel or two per axis, either way (the extra voxels of either lie past the last input voxel "
             "centre, filled by extrapolation: -1024 HU blended in for ctvlp, border padding for MONAI). Both keep "
             "the first voxel centre (origin offsets above), so the overlap compares the same physical points. "
             "A mean and max absolute difference of 0 means the two float16 outputs are bit-identical on the "
             "overlap: both interpolate linearly at the same points, and float32 vs float64 arithmetic "
             "differences vanish in the float16 rounding (a development check of ctvlp's float16 file against "
             "MONAI's float32 output before its cast gave ~6e-5 on example_ct, the size of float16 rounding).")
    dicom = [r for r in pre if r["file"].endswith("dicom")]
    if dicom:
        r = dicom[0]
        n.append(f"- DICOM series ({r['file']}): ctvlp reads the whole series twice per case: `check_image` reads "
                 "it to learn its geometry (a folder has no header to read alone), then `preprocess_case` reads it "
                 f"again (plus one header read for the modality). One read_image here takes "
                 f"{_median(r['ctvlp']['read_times']):.2f} s of the {_median(r['ctvlp']['times']):.2f} s, so about "
                 f"{100 * _median(r['ctvlp']['read_times']) / _median(r['ctvlp']['times']):.0f} % of ctvlp's time on "
                 "this file is a redundant second read.")
    imp_c = _median([r["ctvlp"]["hwm_import_kb"] for r in pre]) / 1024
    imp_m = _median([r["monai"]["hwm_import_kb"] for r in pre]) / 1024
    extra_c = [(r["ctvlp"]["hwm_peak_kb"] - r["ctvlp"]["hwm_import_kb"]) / 1024 for r in pre]
    extra_m = [(r["monai"]["hwm_peak_both_kb"] - r["monai"]["hwm_import_kb"]) / 1024 for r in pre]
    n.append(f"- Peak memory is per process and includes the interpreter and all imported libraries. MONAI's "
             f"imports alone ({imp_m:.0f} MiB, mostly torch) exceed ctvlp's whole peak on every file; on top of "
             f"its imports MONAI's work adds {min(extra_m):.0f}-{max(extra_m):.0f} MiB vs ctvlp's "
             f"{min(extra_c):.0f}-{max(extra_c):.0f} MiB (ctvlp imports: {imp_c:.0f} MiB), plausibly "
             "MONAI's float64 resampling of the image and its sampling grid (not profiled). In a training or preprocessing "
             "worker that imports torch anyway, only the 'peak - imports' part is the cost of the method.")
    ts = [(r["file"], max(x) / min(x)) for r in pre for x in (r["ctvlp"]["times"], r["monai"]["times"],
                                                              r["monai"]["times_both"])]
    worst = max(ts, key=lambda t: t[1])
    n.append(f"- Noise: the largest max/min spread of the timed runs of one method on one file was "
             f"{worst[1]:.2f}x ({worst[0]}); on the shared machine the medians moved by up to ~45 % between "
             "otherwise identical runs of this script, and a method's image+label time can even come out below "
             "its image-only time. Differences under ~1.5x between the methods are not firm.")
    n.append("- The ctvlp timing is not comparable to `ctvlp segment`: segment_case (with its NIfTI completeness "
             "check, which streams the whole .gz once) ran beforehand and was not timed.")
    warm = {c["volume"]: c for c in crops if c["storage"].startswith("npy mmap") and c["cache"] == "warm"}
    gz = {c["volume"]: c for c in crops if c["storage"].startswith(".nii.gz float32, nibabel") and c["cache"] == "warm"}
    for v in warm:
        if v in gz:
            n.append(f"- {v}: npy mmap delivers {warm[v]['crops_per_s']:.1f} crops/s vs {gz[v]['crops_per_s']:.2f} "
                     f"for .nii.gz float32 ({warm[v]['crops_per_s'] / gz[v]['crops_per_s']:.0f}x), at "
                     f"{warm[v]['file_mb'] / gz[v]['file_mb']:.1f}x the disk space.")
    nii = [c for c in crops if c["storage"].startswith(".nii float32") and c["cache"] == "warm"]
    full = {c["volume"]: c for c in crops if c["storage"].startswith("npy full") and c["cache"] == "warm"}
    if nii:
        n.append("- Uncompressed .nii through nibabel (mmap=True, slicing the array proxy) was slower than even a "
                 "full np.load of the .npy: " + ", ".join(
                     f"{c['crops_per_s']:.1f} vs {full[c['volume']]['crops_per_s']:.1f} crops/s"
                     for c in nii if c["volume"] in full)
                 + ". The float32 file is twice the float16 .npy, and nibabel's proxy slicing reads the strided "
                 "region itself rather than handing back a numpy memmap view (likely cause, not profiled).")
    n.append("- 'warm' rows read files already in the page cache (the files were just written, or read in the "
             "warm-up): the case of a dataset that fits in RAM. A CT-RATE-sized training set does not, so the "
             "'cold' rows are the relevant ones there.")
    cold = [c for c in crops if c["cache"].startswith("cold")]
    if cold:
        fr = [c["cached_after_evict"] for c in cold if c["cached_after_evict"] is not None]
        n.append("- 'cold' rows: before every crop the files are fsync'ed and dropped from the page cache with "
                 "posix_fadvise(DONTNEED) (own files only, no global cache drop)"
                 + (f"; fincore showed at most {100 * max(fr):.0f} % of the image file still cached after an eviction" if fr
                    else "") + ". The disk is a VM virtio disk; the host may still cache, so 'cold' is a lower "
                 "bound on real cold-read cost.")
    n.append("- Synthetic volume (part 2 only): the real lung1 CT (512x512x48, 0.57x0.57x5 mm) linearly resampled "
             "to 400x400x150 voxels plus Gaussian noise (sd 10 HU) so that gzip meets CT-like noise; it is not a "
             "real 400x400x150 scan (the interpolation along z makes it smoother than one). Its anatomy map is "
             "from HU thresholds (0/1/2), so the anatomy files compress better than a 36-anatomy map would. "
             "For the real example_ct volume the int16 file holds the windowed HU (-1000..1000) recovered from "
             "ctvlp's [0, 1] output. "
             "NIfTI files are written with nibabel (gzip level 1, its default); NIfTI has no float16, hence "
             "float32 .nii(.gz), or int16 HU (the usual raw CT storage) scaled after the crop.")
    return n


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (default 3)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for imaging.md / .csv")
    ap.add_argument("--shared", default=str(REPO.parent / "shared"), help="the shared data folder (../shared)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker[0]](json.loads(args.worker[1]))))
        return 0
    data = Path(args.shared) / "data" / "real_ct"
    if not data.is_dir():
        raise SystemExit(f"{data} not found: this benchmark needs the shared real CTs (../shared beside the "
                         "repository, or --shared PATH). They are not part of the repository.")
    missing = [p for _, img, seg in FILES for p in (img, seg) if p and not (data / p).exists()]
    if missing:
        raise SystemExit(f"missing shared file(s) under {data}: {missing}")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="ctvlp_imaging_bench_"))
    try:
        base = {"python + numpy": _run_worker("baseline", {})["hwm_import_kb"]}
        pre = part1(data, work, args.repeats, log)
        base["ctvlp process (ctvlp.imaging, scipy.ndimage)"] = _median([r["ctvlp"]["hwm_import_kb"] for r in pre])
        base["MONAI process (torch, monai.transforms)"] = _median([r["monai"]["hwm_import_kb"] for r in pre])
        crops = part2(data, work, pre, args.repeats, log)
    finally:
        if args.keep:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    cmd = " ".join(["python", "benchmarks/imaging.py", *(sys.argv[1:] if argv is None else argv)])
    info = {"node": platform.node(), "cpu": cpu(), "cores": os.cpu_count(), "ram_gib": _ram_gib(), "os": _os_name(),
            "python": platform.python_version(), "versions": _versions(),
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "runtime_s": time.perf_counter() - t_start, "load_start": load_start, "load_end": os.getloadavg()[0],
            "command": cmd, "notes": _notes(pre, crops)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, info, pre, base, crops, args.repeats)
    print(f"\nwrote {out / 'imaging.md'} and {out / 'imaging.csv'} ({info['runtime_s']:.0f} s)")
    for r in pre:
        print(f"{r['file']:<18} ctvlp {_median(r['ctvlp']['times']):6.2f} s  MONAI {_median(r['monai']['times']):6.2f} s"
              f" (+label {_median(r['monai']['times_both']):6.2f} s)  MAD {r['mad']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

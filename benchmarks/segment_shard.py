"""TotalSegmentator per case: one ``totalsegmentator()`` call per case (nnU-Net's predictor built and
its checkpoint loaded every call) vs the segment stage's per-shard session (``ctvlp.imaging.
segmentation.shard_session``: each network loaded once, TotalSegmentator's own steps per case).

    python benchmarks/segment_shard.py [--out benchmarks/results] [--shared ../shared] [--cases a,b,c]
                                       [--arch fast3mm|small] [--gpu-seconds 10]

The model is TotalSegmentator's "fast" task (Dataset297, 3 mm, one network) in its own weights layout
in a temporary TOTALSEG_HOME_DIR, written by tests/totalseg_weights.py with RANDOM weights and the
architecture of the published 3 mm model (nnU-Net v2 PlainConvUNet, 6 stages, 32-320 features,
128^3 patch; the checkpoint carries SGD momentum buffers as a trained nnU-Net checkpoint does), so
file size, network build and load times are real; the masks are meaningless. Real CTs from
../shared (TotalSegmentator's example CTs), device cpu. Both routes run in this one process, after
the imports (a shard job pays those once either way), per-call first, then the session; the two
routes' masks are compared voxel for voxel.

Writes segment_shard_cpu.md and segment_shard_cpu.csv into --out, naming the machine.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/totalseg_weights.py: the weights folder builder

from machine import cpu

log = logging.getLogger("segment_shard")

CT_RATE_VOLUMES = 50_188  # CT-RATE's chest CT volumes (train + validation)
FILES = {"example_ct_sm": "example_ct_sm.nii.gz", "chest_ct_cropped": "chest_ct_cropped.nii.gz",
         "example_ct": "example_ct.nii.gz"}


def _shape(path) -> str:
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return "x".join(map(str, r.GetSize())) + " @ " + "x".join(f"{s:g}" for s in r.GetSpacing()) + " mm"


def _import_export_module() -> bool:
    import totalsegmentator.nnunet_runtime_patches  # noqa: F401  (what nnU-Net's export worker unpickles)

    return True


def spawn_seconds() -> float:
    """Start a spawned worker process that imports what nnU-Net's per-call workers need, as
    ``predict_from_files`` does twice per call (a preprocessing process and an export pool)."""
    import multiprocessing

    tick = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(_import_export_module)
    return time.perf_counter() - tick


def run(args) -> dict:
    import numpy as np
    import SimpleITK as sitk
    import torch

    from ctvlp.imaging import segmentation
    from totalseg_weights import FAST_3MM, SMALL, write_model

    ts = Path(args.shared) / "data" / "real_ct" / "totalsegmentator"
    names = args.cases.split(",")
    cases = [{"case_id": n, "image_path": str(ts / FILES[n])} for n in names]
    for c in cases:
        if not Path(c["image_path"]).is_file():
            raise SystemExit(f"{c['image_path']} not found (../shared beside the repo, or --shared)")
    arch = {"fast3mm": FAST_3MM, "small": SMALL}[args.arch]
    with tempfile.TemporaryDirectory(prefix="ctvlp_segment_shard_") as tmp:
        home = Path(tmp) / "totalseg_home"
        folder = write_model(home, 297, arch, optimizer_state=True)
        ckpt = folder / "fold_0" / "checkpoint_final.pth"
        weights = torch.load(ckpt, weights_only=False)["network_weights"]  # the state dict names shared tensors twice
        params = sum({v.data_ptr(): v.numel() for v in weights.values()}.values())
        cfg = {"backend": "totalsegmentator", "weights_dir": str(home), "fast": True, "device": "cpu"}
        import totalsegmentator.python_api  # noqa: F401  (imports: paid once per job by either route)

        rows, masks = [], {}
        for c in cases:
            log.info("per-call route: %s", c["case_id"])
            tick = time.perf_counter()
            img, _ = segmentation.class_map("totalsegmentator", c, cfg)
            rows.append({"route": "per_call", "case": c["case_id"], "seconds": time.perf_counter() - tick})
            masks[c["case_id"]] = sitk.GetArrayFromImage(img)
            log.info("  %.1f s", rows[-1]["seconds"])
        tick_shard = time.perf_counter()
        with segmentation.shard_session(cfg) as session:
            for c in cases:
                log.info("per-shard route: %s", c["case_id"])
                tick = time.perf_counter()
                loads_before, load_s_before = session.loads, session.load_seconds
                img, _ = segmentation.class_map("totalsegmentator", c, cfg)
                rows.append({"route": "per_shard", "case": c["case_id"], "seconds": time.perf_counter() - tick,
                             "load_seconds": session.load_seconds - load_s_before,
                             "loads": session.loads - loads_before,
                             "identical": bool(np.array_equal(sitk.GetArrayFromImage(img), masks[c["case_id"]]))})
                log.info("  %.1f s (identical to per-call: %s)", rows[-1]["seconds"], rows[-1]["identical"])
        shard_seconds = time.perf_counter() - tick_shard
        spawn = sorted(spawn_seconds() for _ in range(3))[1]
        return {"rows": rows, "cases": cases, "shapes": {c["case_id"]: _shape(c["image_path"]) for c in cases},
                "params": params, "ckpt_mb": ckpt.stat().st_size / 1e6, "arch": arch,
                "load_seconds": session.load_seconds, "predict_seconds": session.predict_seconds,
                "shard_seconds": shard_seconds, "spawn_seconds": spawn, "torch": torch.__version__}


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("TotalSegmentator", "nnunetv2", "torch", "SimpleITK", "nibabel"))


def write(res: dict, args, started: float, load_start: float) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = res["rows"]
    per_call = {r["case"]: r["seconds"] for r in rows if r["route"] == "per_call"}
    per_shard = {r["case"]: r for r in rows if r["route"] == "per_shard"}
    n = len(per_call)
    mean_call = sum(per_call.values()) / n
    mean_shard = sum(r["seconds"] for r in per_shard.values()) / n
    load = res["load_seconds"]
    shard_total = sum(r["seconds"] for r in per_shard.values())
    overhead = mean_call - (shard_total - load) / n  # what a per-call case pays beyond the session's steady state
    with (out / "segment_shard_cpu.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["route", "case", "input", "seconds", "load_seconds", "identical_to_per_call"])
        for r in rows:
            w.writerow([r["route"], r["case"], res["shapes"][r["case"]], f"{r['seconds']:.2f}",
                        f"{r.get('load_seconds', ''):.2f}" if "load_seconds" in r else "",
                        r.get("identical", "")])

    g = args.gpu_seconds
    size = args.shard_size
    def gpu_hours(seconds_per_case: float, per_shard_load: float = 0.0) -> float:
        return (CT_RATE_VOLUMES * seconds_per_case + -(-CT_RATE_VOLUMES // size) * per_shard_load) / 3600

    call_gpu = gpu_hours(g + overhead)
    shard_gpu = gpu_hours(g, load)
    share_gpu = load / (size * g + load)
    a = res["arch"]
    L = [f"# TotalSegmentator: per-call API vs per-shard predictor ({dt.date.today()})", "",
         f"- machine: {cpu()}, {os.cpu_count()} cores, {platform.platform()}",
         f"- {_versions()}; device cpu, torch threads as TotalSegmentator sets them ({os.cpu_count()})",
         f"- load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f} on {os.cpu_count()} "
         "cores" + (": **the machine was shared with other jobs during the run**; absolute times are inflated and "
                    "noisy" if max(load_start, os.getloadavg()[0]) > os.cpu_count() else ""),
         (f"- command: `python benchmarks/segment_shard.py {' '.join(sys.argv[1:])}`; total runtime "
         f"{time.perf_counter() - started:.0f} s"),
         (f"- model: TotalSegmentator task total, fast (Dataset297, 3 mm) in its own weights layout, RANDOM weights, "
         f"architecture {a['n_stages']} stages, features {a['features']}, patch {a['patch_size']} "
         f"({res['params'] / 1e6:.1f} M parameters; checkpoint_final.pth {res['ckpt_mb']:.0f} MB with SGD momentum "
         "buffers, as nnU-Net saves it)"), "",
         "## Seconds per case", "",
         ("Per call: `totalsegmentator()` per case (as `ctvlp segment --case` and the segment stage did before): "
         "each call builds nnU-Net's predictor, loads the checkpoint and starts a preprocessing process and an "
         "export pool. Per shard: the same calls inside `shard_session` (one predictor per network for all "
         "cases, prediction in-process). Same TotalSegmentator steps; masks compared voxel for voxel."), "",
         "| case | input | per call s | per shard s | of which model load s | same mask |",
         "|---|---|---:|---:|---:|---|"]
    for case, sec in per_call.items():
        r = per_shard[case]
        L.append(f"| {case} | {res['shapes'][case]} | {sec:.1f} | {r['seconds']:.1f} | {r['load_seconds']:.2f} "
                 f"| {'yes' if r['identical'] else 'NO'} |")
    L += [f"| mean | | {mean_call:.1f} | {mean_shard:.1f} | {load / n:.2f} | |", "",
          (f"- model load (predictor + `initialize_from_trained_model_folder`: plans, network, checkpoint): "
          f"{load:.2f} s, once per shard"),
          (f"- load share of this {n}-case shard's segmentation time: {load:.2f} / {shard_total:.1f} s = "
          f"{100 * load / shard_total:.1f} %; for a full shard of {size} cases at the measured "
          f"{(shard_total - load) / n:.1f} s per case: {100 * load / (load + size * (shard_total - load) / n):.2f} % "
          "(goal: <= 5 %)"),
          (f"- per-call overhead per case (per call minus the session's per-case time without its load): "
           f"{overhead:.1f} s ({100 * overhead / mean_call:.0f} % of a per-call case): the model load "
           f"({load:.2f} s) and two worker processes per call (one spawned worker importing nnU-Net: "
           f"{res['spawn_seconds']:.1f} s, median of 3)"),
          (f"- nnU-Net prediction inside the session (preprocess, network, export): {res['predict_seconds']:.1f} s of "
          f"{res['shard_seconds']:.1f} s"), "",
          f"## CT-RATE ({CT_RATE_VOLUMES:,} volumes) on a GPU", "",
          (f"Assumed GPU time per volume for the fast 3 mm model: {g:g} s end to end (TotalSegmentator README, "
          "'Resource Requirements': the runtime figure for an RTX 3090 puts the 3 mm --fast model in the order of "
          "ten seconds per CT; quoted as best known, not measured here: no GPU on this machine). The per-call "
          f"overhead ({overhead:.1f} s) and the load ({load:.2f} s) are CPU-side work (torch.load, network build, "
          "process start) taken as measured here; on a GPU the weights also move to the device, which is not "
          f"counted. Shards of {size} cases (shard_size default)."), "",
          "| route | s per volume | GPU-hours | share of it not segmenting (load, per-call workers) |", "|---|---:|---:|---:|",
          f"| per call | {g + overhead:.1f} | {call_gpu:,.0f} | {100 * overhead / (g + overhead):.0f} % |",
          f"| per shard | {g + load / size:.2f} | {shard_gpu:,.0f} | {100 * share_gpu:.2f} % |", "",
          (f"- per shard saves {call_gpu - shard_gpu:,.0f} GPU-hours ({100 * (1 - shard_gpu / call_gpu):.0f} %) at "
           f"{g:g} s per volume. The saving is the per-call overhead times the volumes, whatever the GPU time: at "
           f"5 s per volume {100 * (1 - gpu_hours(5, load) / gpu_hours(5 + overhead)):.0f} % "
           f"({gpu_hours(5 + overhead):,.0f} vs {gpu_hours(5, load):,.0f} GPU-hours), at 30 s "
           f"{100 * (1 - gpu_hours(30, load) / gpu_hours(30 + overhead)):.0f} % "
           f"({gpu_hours(30 + overhead):,.0f} vs {gpu_hours(30, load):,.0f})"),
          (f"- on this CPU (measured per-case times): per call {CT_RATE_VOLUMES * mean_call / 3600:,.0f} CPU-node-hours"
          f", per shard {(CT_RATE_VOLUMES * (shard_total - load) / n + -(-CT_RATE_VOLUMES // size) * load) / 3600:,.0f}"
          " (these CTs are small crops; CT-RATE volumes are about 512x512x300 at ~0.7x0.7x1.5 mm, so more "
          "windows per case)"), ""]
    (out / "segment_shard_cpu.md").write_text("\n".join(L))
    print("\n".join(L))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    p.add_argument("--cases", default="example_ct_sm,chest_ct_cropped,example_ct")
    p.add_argument("--arch", default="fast3mm", choices=["fast3mm", "small"])
    p.add_argument("--gpu-seconds", type=float, default=10.0, help="assumed GPU time per volume (fast model)")
    p.add_argument("--shard-size", type=int, default=128)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    write(run(args), args, started, load_start)


if __name__ == "__main__":
    main()

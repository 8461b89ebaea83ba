"""The training step on one GPU (issue 14): encoder, full phase steps, loader, syncs, memory.

    python benchmarks/gpu_step.py [--size paper|tiny] [--device auto|cuda|cpu] [--precision bf16|fp32]
                                  [--no-channels-last] [--compile] [--label NAME] [--out benchmarks/results]

Runs ctvlp's real code paths at the paper's crop (256 x 384 x 96, widths 64-512, 6 crops per GPU;
--size tiny: 32^3 crops and a narrow model, what the test suite runs on the CPU):

1. peak: a large matmul in the benchmark's precision (bf16 on CUDA), TFLOP/s measured in this run.
2. encoder: the 3D ResNet18 forward+backward alone; its FLOPs per sample are counted
   (torch.utils.flop_counter) and samples/s x FLOPs gives the % of the measured peak.
3. phases 1, 2 and 4: ``run_phase`` (the real loop: its settings from the config defaults, AdamW,
   clipping, autocast, metrics, checkpoints) on in-memory crops with 36 anatomies of random sizes,
   so the step is measured without the loader. For each: samples/s, % of peak (encoder FLOPs per
   sample; the rest of the step is not counted, so this is a lower bound), peak device memory and
   its growth per sample (two batch sizes) with the largest batch that fits on 80 and 141 GB, the
   device-busy % of a profiled run (union of kernel times / wall time; CUDA only), and host syncs
   per step (``ctvlp.training.syncs.SyncCounter``; the difference of two runs of n and 2n steps,
   so start-up and epoch-end work cancel; train.sync_every 50 as on CUDA, so the count leaves out
   the one sync per 50 steps). Phase 4 also reports the VQ-VAE's padding.
4. loader: ``CropDataset`` over preprocessed-storage files this script writes (float16 image,
   uint8 anatomy map, meta.json with boxes, segment table), through the loop's ``make_loader``
   at the default worker count (train.workers auto); crops/s and the ratio to what phase 2 consumes.

Writes gpu_step_<label>.md and .json into --out, with the device, versions, date and command.
Goals (issue 14, one GPU): phase 2 >= 35% of measured bf16 peak; phases 1 and 4 within 20% of
phase 2; bf16 never slower than fp32; loader >= 1.2x the step's consumption on 16 cores.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu  # benchmarks/machine.py (the script's folder is on sys.path)

SIZES = {
    "paper": {"crop": (256, 384, 96), "volume": (288, 416, 104), "model": {}, "batch": 6, "steps": 10,
              "loader_cases": 8, "loader_batches": 12, "matmul": 8192},
    "tiny": {"crop": (32, 32, 32), "volume": (40, 40, 36),
             "model": {"widths": [4, 8, 8, 16], "embed_dim": 16, "heads": 2, "text_max_length": 32, "vq_codes": 8,
                       "vq_dim": 16, "vq_heads": 2}, "batch": 2, "steps": 2, "loader_cases": 4, "loader_batches": 4,
             "matmul": 512},
}
CAPACITIES_GB = (80, 141)


# ---- synthetic anatomy crops ----------------------------------------------------------------------

def anatomy_map(rng: np.random.Generator, shape, stride: int = 16) -> np.ndarray:
    """36 anatomies of very different sizes: a coarse random label grid (Zipf-like label
    probabilities, a third background) upsampled to ``shape``."""
    from ctvlp.model.vision import N_ANATOMIES

    coarse = tuple(max(1, s // stride) for s in shape)
    p = 1.0 / np.arange(1, N_ANATOMIES + 1)
    p = np.concatenate([[p.sum() / 2], p])
    labels = rng.choice(N_ANATOMIES + 1, size=coarse, p=p / p.sum()).astype(np.uint8)
    reps = [-(-s // c) for s, c in zip(shape, coarse)]
    return np.kron(labels, np.ones(reps, np.uint8))[tuple(slice(0, s) for s in shape)]


def synthetic_texts(n_cases: int, rng: np.random.Generator):
    """AnatomyTexts for n cases: each anatomy has a normal and three abnormal texts."""
    from ctvlp import catalog
    from ctvlp.training.data import AnatomyTexts

    names = [a.name.replace("_", " ") for a in catalog.anatomies()]
    texts = [t for n in names for t in (f"The {n} is unremarkable.", f"A small lesion in the {n}.",
                                        f"The {n} is enlarged.", f"A calcification of the {n}.")]
    m = len(names)
    kind = rng.choice(4, size=(n_cases, m), p=[0.7, 0.1, 0.1, 0.1])
    text_idx = np.arange(m)[None] * 4 + kind
    return AnatomyTexts(texts, text_idx, kind == 0, text_idx)


class SyntheticCrops(torch.utils.data.Dataset):
    """In-memory items shaped like ``CropDataset``'s (a pool of a few distinct crops, repeated)."""

    keyed_by_epoch = True

    def __init__(self, n: int, crop, texts, pool: int = 3, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.n, self.texts = n, texts
        self.pool = []
        for _ in range(pool):
            anat = anatomy_map(rng, crop)
            image = (rng.random(crop, dtype=np.float32) * 0.2 + anat / 40.0).astype(np.float16)
            self.pool.append((torch.from_numpy(image)[None], torch.from_numpy(anat)))

    def __len__(self):
        return self.n

    def __getitem__(self, key):
        i = key[1] if isinstance(key, tuple) else key
        image, anat = self.pool[i % len(self.pool)]
        present = torch.zeros(self.texts.text_idx.shape[1] + 1, dtype=torch.bool)
        present[anat.unique().long()] = True
        c = i % len(self.texts.text_idx)
        return {"image": image, "anatomy": anat, "flip": bool(i % 2), "valid": present[1:],
                "normal": torch.from_numpy(self.texts.normal[c]), "text_idx": torch.from_numpy(self.texts.text_idx[c]),
                "group": torch.from_numpy(self.texts.groups[c]), "index": i}


# ---- measurements ---------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype, n: int) -> float:
    """TFLOP/s of an n x n x n matmul in ``dtype`` (the best of a few)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * n**3 / best / 1e12


def encoder_flops(model, crop, device) -> float:
    """FLOPs of the vision trunk's forward + backward for one sample."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 1, *crop, device=device)
    with FlopCounterMode(display=False) as counter:
        model.vision(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def encoder_rate(model, crop, batch, steps, device, amp) -> float:
    model.train()
    x = torch.rand(batch, 1, *crop, device=device)
    for i in range(steps + 2):
        if i == 2:
            sync(device)
            t = time.perf_counter()
        with amp():
            y = model.vision(x)
        y.float().mean().backward()
    sync(device)
    model.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - t)


def busy_fraction(fn, device) -> float | None:
    """Union of the device's kernel intervals / wall time while ``fn`` runs (CUDA only)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - t
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, -1.0
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy / 1e6 / wall


class Phase:
    """One phase's task and model at a batch size, run through run_phase for n steps."""

    def __init__(self, name, args, size, device, batch, texts):
        from ctvlp import config as cfgmod
        from ctvlp.model.config import ModelConfig
        from ctvlp.training.acceleration import accelerate
        from ctvlp.training.phases import AlignPhase, VisualContrastPhase
        from ctvlp.training.trainable import set_trainable

        self.name, self.device, self.batch = name, device, batch
        model_cfg = ModelConfig.from_settings(size["model"], vq_codes=size["model"].get("vq_codes", 100)
                                              if name == "boost" else 0)
        torch.manual_seed(0)
        from ctvlp.model.io import build_model

        self.model = build_model(model_cfg).to(device)
        set_trainable(self.model, {"visual_cl": "visual_cl", "align": "align", "boost": "boost"}[name])
        train = cfgmod.validate({"train": {"precision": args.precision,
                                           "channels_last": False if args.no_channels_last else "auto",
                                           "compile": args.compile}})["train"]
        self.speed = accelerate(self.model, train, device)
        self.train = train
        common = {"model": self.model, "out_dir": None, "info": {}, "device": device, "val_loader": []}
        if name == "visual_cl":
            self.task = VisualContrastPhase(**common, contrast="disease", momentum=0.99, temperature=0.1)
        else:
            self.task = AlignPhase(**common, name=name, texts=(texts, texts), calibrate=True)
        self.texts, self.crop = texts, size["crop"]

    def run(self, steps: int, out_dir: Path, sync_every: int) -> list[dict]:
        """run_phase for ``steps`` steps; -> the metrics rows."""
        import csv

        from ctvlp.training.loop import LoopSettings, run_phase

        self.task.out_dir = out_dir
        self.task.save = lambda summary: None
        data = SyntheticCrops(self.batch * steps, self.crop, self.texts)
        settings = {**self.train, "epochs": 1, "batch_size": self.batch, "sync_every": sync_every, "workers": 0}
        run_phase(self.task, data, LoopSettings.from_dict(settings), out_dir, seed=0, device=self.device)
        with open(out_dir / "metrics.csv", newline="") as fh:
            return list(csv.DictReader(fh))


def measure_phase(name, args, size, device, texts, peak_tflops, flops, work: Path) -> dict:
    from ctvlp.training.syncs import SyncCounter

    batch, steps = size["batch"], size["steps"]
    phase = Phase(name, args, size, device, batch, texts)
    phase.run(2, work / f"{name}-warm", sync_every=1)  # cuDNN plans, allocator, first kernels
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = phase.run(2 * steps, work / f"{name}-rate", sync_every=steps)
    rates = [float(r["samples_per_s"]) for r in rows if r["split"] == "train"][steps:]  # the second window
    rate = float(np.mean(rates))
    out = {"phase": name, "batch": batch, "samples_per_s": rate,
           "pct_of_peak": 100 * rate * flops / (peak_tflops * 1e12), "speed": phase.speed}
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device)
        half = Phase(name, args, size, device, max(2, batch // 2), texts)
        torch.cuda.reset_peak_memory_stats(device)
        half.run(2, work / f"{name}-half", sync_every=1)
        small = torch.cuda.max_memory_allocated(device)
        per_sample = (peak_mem - small) / (batch - max(2, batch // 2))
        fixed = peak_mem - per_sample * batch
        out.update(peak_mem_gb=peak_mem / 1e9, mem_per_sample_gb=per_sample / 1e9,
                   **{f"max_batch_{c}gb": int((c * 1e9 * 0.95 - fixed) // per_sample) for c in CAPACITIES_GB})
        del half
    counts = []
    for n in (steps, 2 * steps):  # train.sync_every as on CUDA (50), also on the CPU
        with SyncCounter(device) as counter:
            phase.run(n, work / f"{name}-syncs{n}", sync_every=50)
        counts.append(counter)
    out["syncs_per_step"] = (counts[1].total - counts[0].total) / steps
    out["syncs_from_ctvlp_per_step"] = (counts[1].from_ctvlp - counts[0].from_ctvlp) / steps
    out["sync_sites"] = {k: (v - counts[0].by_site.get(k, 0)) / steps for k, v in counts[1].by_site.items()
                         if v - counts[0].by_site.get(k, 0)}
    out["busy_pct"] = None if device.type != "cuda" else \
        100 * busy_fraction(lambda: phase.run(steps, work / f"{name}-prof", sync_every=50), device)
    vq = phase.model.vqvae
    if vq is not None and getattr(vq, "last_pad_fraction", None) is not None:
        out["vq_pad_pct"] = 100 * vq.last_pad_fraction
        out["vq_pad_pct_unbucketed"] = 100 * vq.last_pad_fraction_unbucketed
    return out


def write_storage(root: Path, n: int, volume) -> list:
    """n preprocessed cases as the imaging stages store them; -> their CasePaths."""
    import polars as pl
    from scipy import ndimage

    from ctvlp import catalog
    from ctvlp.imaging.storage import case_paths

    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        paths = case_paths(f"bench{i:03d}", root / "segment" / f"bench{i:03d}", root / "preprocessed" / f"bench{i:03d}")
        paths.image.parent.mkdir(parents=True, exist_ok=True)
        paths.table.parent.mkdir(parents=True, exist_ok=True)
        anat = anatomy_map(rng, volume)
        np.save(paths.image, (rng.random(volume, dtype=np.float32) * 0.2 + anat / 40.0).astype(np.float16))
        np.save(paths.anatomy, anat)
        counts = np.bincount(anat.ravel(), minlength=len(catalog.anatomies()) + 1)
        boxes = ndimage.find_objects(anat, max_label=len(counts) - 1)
        paths.meta.write_text(json.dumps({
            "anatomy_voxels": {a.name: int(counts[a.index]) for a in catalog.anatomies() if counts[a.index]},
            "anatomy_bbox": {a.name: [v for sl in box for v in (sl.start, sl.stop - 1)]
                             for a, box in zip(catalog.anatomies(), boxes) if box}}))
        pl.DataFrame([{"case_id": paths.case_id, "anatomy": a.name, "index": a.index, "present": bool(counts[a.index]),
                       "complete": True} for a in catalog.anatomies()]).write_parquet(paths.table)
        out.append(paths)
    return out


def measure_loader(size, device, work: Path, texts) -> dict:
    from ctvlp.training.data import CropDataset
    from ctvlp.training.loop import _EpochBatches, loader_workers, make_loader

    paths = write_storage(work / "storage", size["loader_cases"], size["volume"])
    data = CropDataset(paths, texts, size["crop"], stride=16, flip=True, seed=0)
    workers = loader_workers("auto", device)
    sampler = torch.utils.data.RandomSampler(range(len(data)), replacement=True,
                                             num_samples=size["batch"] * size["loader_batches"],
                                             generator=torch.Generator().manual_seed(0))
    sampler.set_epoch = lambda epoch: None
    batches = _EpochBatches(sampler, size["batch"], size["loader_batches"], keyed=True)
    loader = make_loader(data, batches, workers, device, 0)
    batches.set(0, 0)
    it = iter(loader)
    next(it)  # workers start, first batch
    t = time.perf_counter()
    n = 0
    for batch in it:
        batch["image"].to(device, non_blocking=True)
        n += len(batch["index"])
    sync(device)
    rate = n / (time.perf_counter() - t)
    single = [time.perf_counter()]
    for k in range(4):
        data[(1, k % len(data))]
        single.append(time.perf_counter())
    return {"workers": workers, "crops_per_s": rate, "ms_per_crop_one_process": 1000 * np.mean(np.diff(single)),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def device_name(device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU: {cpu()}, {os.cpu_count()} cores"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="paper")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--phases", nargs="+", default=["visual_cl", "align", "boost"])
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)

    from ctvlp.model.io import pick_device
    from ctvlp.training.loop import autocast_dtype

    device = pick_device(args.device)
    size = SIZES[args.size]
    dtype = autocast_dtype(args.precision, device) if device.type == "cuda" else None
    peak_dtype = dtype or torch.float32
    import contextlib

    amp = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else contextlib.nullcontext
    rng = np.random.default_rng(0)
    texts = synthetic_texts(64, rng)
    result = {"device": device_name(device), "size": args.size, "crop": size["crop"], "precision": str(peak_dtype),
              "torch": torch.__version__, "python": platform.python_version(), "date": dt.date.today().isoformat(),
              "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])}
    print(f"device: {result['device']}", flush=True)
    result["peak_tflops"] = matmul_peak(device, peak_dtype, size["matmul"])
    print(f"peak {peak_dtype} matmul: {result['peak_tflops']:.1f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="ctvlp-gpu-step-") as tmp:
        work = Path(tmp)
        probe = Phase("align", args, size, device, size["batch"], texts)
        flops = encoder_flops(probe.model, size["crop"], device)
        enc = encoder_rate(probe.model, size["crop"], size["batch"], size["steps"], device, amp)
        del probe
        result["encoder"] = {"flops_per_sample": flops, "samples_per_s": enc,
                             "pct_of_peak": 100 * enc * flops / (result["peak_tflops"] * 1e12)}
        print(f"encoder: {enc:.2f} samples/s, {result['encoder']['pct_of_peak']:.1f}% of peak", flush=True)
        result["phases"] = []
        for name in args.phases:
            r = measure_phase(name, args, size, device, texts, result["peak_tflops"], flops, work)
            result["phases"].append(r)
            print(f"{name}: {r['samples_per_s']:.2f} samples/s, {r['pct_of_peak']:.1f}% of peak, "
                  f"{r['syncs_per_step']:.1f} syncs/step", flush=True)
        result["loader"] = measure_loader(size, device, work, texts)
        align = next((r for r in result["phases"] if r["phase"] == "align"), None)
        if align:
            result["loader"]["ratio_to_phase2"] = result["loader"]["crops_per_s"] / align["samples_per_s"]
        print(f"loader: {result['loader']['crops_per_s']:.1f} crops/s with {result['loader']['workers']} workers",
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gpu_step_{args.label}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {stem}.md and .json")
    return result


def markdown(r: dict) -> str:
    def f(v, fmt=".1f"):
        return "n/a" if v is None else format(v, fmt)

    lines = [f"# Training step benchmark ({r['size']} size)", "",
             f"- device: {r['device']}", f"- crop {tuple(r['crop'])}, {r['precision']}, torch {r['torch']}, "
             f"Python {r['python']}, {r['date']}", f"- command: `{r['command']}`",
             f"- measured peak matmul ({r['precision']}): {r['peak_tflops']:.1f} TFLOP/s", "",
             f"Encoder alone: {r['encoder']['samples_per_s']:.2f} samples/s, "
             f"{r['encoder']['flops_per_sample'] / 1e12:.3f} TFLOP per sample (fwd+bwd), "
             f"{r['encoder']['pct_of_peak']:.1f}% of peak.", "",
             "| phase | batch | samples/s | % of peak | peak mem GB | GB/sample | max batch 80/141 GB | busy % "
             "| syncs/step (from ctvlp) | VQ padding % (unbucketed) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in r["phases"]:
        vq = f"{f(p.get('vq_pad_pct'))} ({f(p.get('vq_pad_pct_unbucketed'))})" if "vq_pad_pct" in p else "-"
        lines.append(f"| {p['phase']} | {p['batch']} | {p['samples_per_s']:.2f} | {p['pct_of_peak']:.1f} | "
                     f"{f(p.get('peak_mem_gb'), '.2f')} | {f(p.get('mem_per_sample_gb'), '.2f')} | "
                     f"{p.get('max_batch_80gb', 'n/a')}/{p.get('max_batch_141gb', 'n/a')} | {f(p['busy_pct'])} | "
                     f"{p['syncs_per_step']:.1f} ({p['syncs_from_ctvlp_per_step']:.1f}) | {vq} |")
    lo = r["loader"]
    lines += ["", f"Loader: {lo['crops_per_s']:.1f} crops/s with {lo['workers']} workers on {lo['cores']} cores "
              f"({lo['ms_per_crop_one_process']:.0f} ms per crop in one process)"
              + (f"; {lo['ratio_to_phase2']:.2f}x what phase 2 consumes." if "ratio_to_phase2" in lo else "."), "",
              "Sync sites per step:", ""]
    for p in r["phases"]:
        sites = ", ".join(f"{k} x{v:g}" for k, v in sorted(p["sync_sites"].items())) or "none"
        lines.append(f"- {p['phase']}: {sites}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

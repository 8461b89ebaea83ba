"""The training loader's crop, today's ``CropDataset`` against an older revision's, side by side.

    python benchmarks/loader.py [--ref 9061293] [--crops 24] [--size paper|tiny] [--out benchmarks/results]

Both read the same preprocessed-storage files (written by ``gpu_step.write_storage``: float16
image, uint8 anatomy map, meta.json with boxes, segment table) at the paper's crop. Per
revision: milliseconds per ``__getitem__`` in one process (what a loader worker does per crop),
and for today's also the time ``to_device`` then spends on the CPU (float conversion and flips,
which the old item did inside ``__getitem__``). The old module is read with ``git show REF:...``
and run against today's package (its imports still exist). Writes loader.md into --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpu_step import SIZES, synthetic_texts, write_storage  # benchmarks/ is on sys.path
from machine import cpu

REPO = Path(__file__).resolve().parents[1]


def old_module(ref: str):
    """ctvlp.training.data as of ``ref``, imported under the current package."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:src/ctvlp/training/data.py"], check=True,
                            capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("ctvlp.training._data_at_ref", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "ctvlp.training"
    exec(compile(source, f"{ref}:data.py", "exec"), module.__dict__)  # noqa: S102 - our own file at a revision
    return module


def per_item_ms(dataset, n: int, key) -> float:
    dataset[key(0)]  # page cache warm
    t = time.perf_counter()
    for i in range(n):
        dataset[key(i)]
    return 1000 * (time.perf_counter() - t) / n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="9061293")
    parser.add_argument("--crops", type=int, default=24)
    parser.add_argument("--size", choices=sorted(SIZES), default="paper")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as one loader worker
    from torch.utils.data import default_collate

    from ctvlp.training.data import CropDataset, to_device

    size = SIZES[args.size]
    texts = synthetic_texts(64, np.random.default_rng(0))
    with tempfile.TemporaryDirectory(prefix="ctvlp-loader-") as tmp:
        paths = write_storage(Path(tmp), size["loader_cases"], size["volume"])
        new = CropDataset(paths, texts, size["crop"], stride=16, flip=True, seed=0)
        old = old_module(args.ref).CropDataset(paths, texts, size["crop"], 16, True, 0)
        n = len(paths)
        new_ms = per_item_ms(new, args.crops, lambda i: (i // n, i % n))
        old_ms = per_item_ms(old, args.crops, lambda i: i % n)
        batch = default_collate([new[(0, i % n)] for i in range(size["batch"])])
        t = time.perf_counter()
        for _ in range(3):
            to_device(batch, torch.device("cpu"))
        device_ms = 1000 * (time.perf_counter() - t) / 3 / size["batch"]
    machine = f"{cpu()}, {os.cpu_count()} cores, {platform.platform()}"
    text = (f"# Training loader: one crop ({args.size}, crop {tuple(size['crop'])} of {tuple(size['volume'])})\n\n"
            f"- machine: {machine}; torch {torch.__version__}, 1 thread (one loader worker); "
            f"{dt.date.today().isoformat()}\n"
            f"- command: `python benchmarks/loader.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
            "| revision | ms per crop (`__getitem__`) | crops/s per worker |\n|---|---|---|\n"
            f"| {args.ref} (float32 copy, np.bincount over the crop, np.pad and flip copies) | {old_ms:.1f} | "
            f"{1000 / old_ms:.1f} |\n"
            f"| today (float16 kept, boxes, no pad copy, flips on the device) | {new_ms:.1f} | {1000 / new_ms:.1f} |\n\n"
            f"Today's ``to_device`` on the CPU (float32 conversion and flips, per crop; on a GPU this runs there): "
            f"{device_ms:.1f} ms.\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"loader{'' if args.size == 'paper' else '_' + args.size}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""The normality VQ-VAE's row padding without and with length bucketing, and its phase-3 stability
(run to run and bf16 against fp32), today's code against the code before the stable phase 3 (CPU).

    python benchmarks/vq_padding.py [--seeds 0 1 2 ...] [--ref 05b8a95^] [--no-stability] [--out benchmarks/results]

1. Padding: the share of the VQ-VAE transformers' token slots (rows x padded length; the
   condition token not counted) that are padding, with every row padded to the longest
   (``bucket=False``) and with rows bucketed by length (``NormalityVQVAE.buckets``, at most
   ``max_buckets`` = 4). Pooled over the calls of a row set: 1 - real tokens / slots. Row sets:
   - gpu_step tiny: the anatomy token rows (``anatomy_token_rows`` of ``CTVLP.token_masks``) of
     ``benchmarks/gpu_step.py --size tiny``'s synthetic crops (32^3, its tiny model's token grid),
     each batch of 2 consecutive pool crops (the boost phase's batch);
   - stability test: the 250 training calls (12 rows each) and the 96-row validation call of
     ``tests/model/test_model_normality_stability.py`` (its ``synthetic_data``, each of its SEEDS);
   - boxes: the boost-path test's volume there (``_boxes_volume``, 2 x 64^3, 12 box anatomies).
2. Stability: the stability test's own ``train_and_validate`` (250 Adam steps, 1 thread) per seed
   (--seeds, default the test's SEEDS),
   fp32 / inputs perturbed at bf16 rounding level / transformers under bf16 autocast on the CPU;
   the validation reconstruction error and the differences, relative to the baseline (the error
   of predicting the mean token) and relative to the fp32 error itself; then the same with
   ``NormalityVQVAE`` of --ref (the code before the stable phase 3, read with ``git show``).

The test module is loaded by path, so the numbers are those of exactly the test's scenario.
Writes vq_padding_cpu.md and .csv into --out with the machine and the command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu  # benchmarks/machine.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
TEST = REPO / "tests" / "model" / "test_model_normality_stability.py"


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---- padding ------------------------------------------------------------------------------------

def padding(calls: list[torch.Tensor]) -> dict:
    """calls: the pad masks (R, L) of VQ-VAE calls -> pooled padding fractions and per-call range."""
    from ctvlp.model.normality import NormalityVQVAE

    vq = NormalityVQVAE(4, codes=2, code_dim=4, width=8, depth=1, heads=1)  # only buckets() is used
    real = slots_plain = slots_bucketed = 0
    per_call = []
    for pad in calls:
        bk = vq.buckets(pad)
        r, width = pad.shape
        bucketed_slots = sum(g.pad.numel() for g in bk.groups)
        real += bk.n_real
        slots_plain += r * width
        slots_bucketed += bucketed_slots
        per_call.append((bk.pad_fraction_unbucketed, bk.pad_fraction))
    return {"calls": len(calls), "rows": sum(p.shape[0] for p in calls), "real": real,
            "plain": 1 - real / slots_plain, "bucketed": 1 - real / slots_bucketed,
            "plain_range": (min(p for p, _ in per_call), max(p for p, _ in per_call)),
            "bucketed_range": (min(b for _, b in per_call), max(b for _, b in per_call))}


def gpu_step_tiny_calls() -> list[torch.Tensor]:
    import gpu_step

    from ctvlp.model.config import ModelConfig
    from ctvlp.model.io import build_model
    from ctvlp.model.normality import anatomy_token_rows

    size = gpu_step.SIZES["tiny"]
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_settings(size["model"], vq_codes=size["model"]["vq_codes"])).eval()
    crops = gpu_step.SyntheticCrops(3 * size["batch"], size["crop"], texts=None)  # seed 0, a pool of 3 crops
    pool = len(crops.pool)
    calls = []
    with torch.no_grad():
        for start in range(pool):
            items = [crops.pool[(start + k) % pool] for k in range(size["batch"])]
            image = torch.stack([im for im, _ in items]).float()
            anatomy = torch.stack([an for _, an in items])
            tokens, allowed = model.image_tokens(image, anatomy)
            calls.append(anatomy_token_rows(tokens, allowed).pad)
    return calls


def stability_test_calls(test, seeds) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    train, val = [], []
    for seed in seeds:
        batches, (_, pad, _) = test.synthetic_data(seed)
        train += [p for _, p, _ in batches]
        val.append(pad)
    return train, val


def boxes_calls(test) -> list[torch.Tensor]:
    from ctvlp.model.config import ModelConfig
    from ctvlp.model.network import CTVLP
    from ctvlp.model.normality import anatomy_token_rows

    image, anatomy = test._boxes_volume()
    torch.manual_seed(0)  # the test's model (its token grid is what matters)
    model = CTVLP(ModelConfig.from_settings(widths=(4, 8, 8, 16), embed_dim=16, heads=2, vq_codes=4, vq_dim=8,
                                            vq_depth=1, vq_heads=2, text_max_length=32)).eval()
    with torch.no_grad():
        tokens, allowed = model.image_tokens(image, anatomy)
    return [anatomy_token_rows(tokens, allowed).pad]


# ---- stability ----------------------------------------------------------------------------------

def old_class(ref: str):
    """NormalityVQVAE of git revision ref, loaded as a module of ctvlp.model (its relative imports)."""
    import ctvlp.model  # noqa: F401  (the parent package of the loaded module)

    source = subprocess.run(["git", "-C", str(REPO), "show", f"{ref}:src/ctvlp/model/normality.py"],
                            check=True, capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp()) / "normality_ref.py"
    tmp.write_text(source, encoding="utf-8")
    return load(tmp, "ctvlp.model._normality_ref").NormalityVQVAE


def stability(test, seeds, cls) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the test runs it
    rows = []
    try:
        for seed in seeds:
            data = test.synthetic_data(seed)
            runs = {kind: test.train_and_validate(seed, data, perturb=kind == "perturbed", bf16=kind == "bf16",
                                                  cls=cls) for kind in ("fp32", "perturbed", "bf16")}
            (a, base), (p, _), (b, _) = runs["fp32"], runs["perturbed"], runs["bf16"]
            rows.append({"seed": seed, "baseline": base, "fp32": a, "perturbed": p, "bf16": b,
                         "perturbed_vs_base": abs(a - p) / base, "bf16_vs_base": abs(a - b) / base,
                         "perturbed_vs_error": abs(a - p) / min(a, p), "bf16_vs_error": abs(a - b) / min(a, b)})
    finally:
        torch.set_num_threads(threads)
    return rows


# ---- report -------------------------------------------------------------------------------------

def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", help="stability seeds (default: the test's SEEDS)")
    parser.add_argument("--ref", default="05b8a95^", help="the code before the stable phase 3")
    parser.add_argument("--no-stability", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    test = load(TEST, "normality_stability_test")
    seeds = args.seeds or list(test.SEEDS)
    t0 = time.time()

    train, val = stability_test_calls(test, test.SEEDS)
    sets = [("gpu_step tiny (batch 2, 32^3 crops)", gpu_step_tiny_calls()),
            (f"stability test, training calls (seeds {' '.join(map(str, test.SEEDS))})", train),
            ("stability test, validation call (96 rows, per seed)", val),
            ("boost-path test's boxes volume (2 x 64^3)", boxes_calls(test))]
    padded = [(name, padding(calls)) for name, calls in sets]

    ref_sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.ref], check=True,
                             capture_output=True, text=True).stdout.strip()
    stab = {}
    if not args.no_stability:
        stab["today"] = stability(test, seeds, test.NormalityVQVAE)
        stab[f"before ({ref_sha})"] = stability(test, seeds, old_class(args.ref))

    command = "python benchmarks/vq_padding.py " + " ".join(sys.argv[1:])
    lines = ["# VQ-VAE padding and phase-3 stability (CPU)", "",
             f"- machine: CPU: {cpu()}, {torch.get_num_threads()} threads available; the stability runs use 1",
             (f"- torch {torch.__version__}, Python {platform.python_version()}, {dt.date.today()}, "
             f"{time.time() - t0:.0f} s"),
             f"- command: `{command.strip()}`", "",
             "## Padding of the VQ-VAE's token rows", "",
             ("Share of the transformers' token slots that are padding (pooled: 1 - real tokens / slots; "
             "per-call range in brackets), every row padded to the longest vs rows bucketed by length "
             "(at most 4 buckets)."), "",
             "| rows | calls | rows | real tokens | unbucketed | bucketed |", "|---|---|---|---|---|---|"]
    for name, r in padded:
        lines.append(f"| {name} | {r['calls']} | {r['rows']} | {r['real']} | {pct(r['plain'])} "
                     f"({pct(r['plain_range'][0])}-{pct(r['plain_range'][1])}) | {pct(r['bucketed'])} "
                     f"({pct(r['bucketed_range'][0])}-{pct(r['bucketed_range'][1])}) |")
    csv = [("section,code,rows,seed,baseline,fp32,perturbed,bf16,perturbed_vs_base,bf16_vs_base,"
           "perturbed_vs_error,bf16_vs_error,unbucketed,bucketed")]
    for name, r in padded:
        csv.append(f"padding,today,\"{name}\",,,,,,,,,,{r['plain']:.4f},{r['bucketed']:.4f}")
    if stab:
        lines += ["", "## Phase-3 stability (the stability test's scenario)", "",
                  ("Validation reconstruction error after 250 steps (fp32; inputs perturbed at bf16 rounding "
                  "level; transformers under bf16 autocast on the CPU) and |difference| to fp32, relative "
                  "to the baseline (the error of predicting the mean token) and to the error itself "
                  "(|a - b| / min(a, b))."), "",
                  ("| code | seed | baseline | error fp32 / perturbed / bf16 | perturbed: / baseline, / error "
                  "| bf16: / baseline, / error |"), "|---|---|---|---|---|---|"]
        for code, rows in stab.items():
            for r in rows:
                lines.append(f"| {code} | {r['seed']} | {r['baseline']:.3f} | {r['fp32']:.4f} / {r['perturbed']:.4f}"
                             f" / {r['bf16']:.4f} | {r['perturbed_vs_base']:.5f}, {r['perturbed_vs_error']:.3f} | "
                             f"{r['bf16_vs_base']:.5f}, {r['bf16_vs_error']:.3f} |")
                csv.append(f"stability,\"{code}\",,{r['seed']},{r['baseline']:.5f},{r['fp32']:.5f},"
                           f"{r['perturbed']:.5f},{r['bf16']:.5f},{r['perturbed_vs_base']:.5f},{r['bf16_vs_base']:.5f},"
                           f"{r['perturbed_vs_error']:.5f},{r['bf16_vs_error']:.5f},,")
            worst = {k: max(r[k] for r in rows) for k in rows[0] if k.endswith(("_base", "_error"))}
            lines.append(f"| {code} | largest | | | {worst['perturbed_vs_base']:.5f}, "
                         f"{worst['perturbed_vs_error']:.3f} | {worst['bf16_vs_base']:.5f}, {worst['bf16_vs_error']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vq_padding_cpu.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.out / "vq_padding_cpu.csv").write_text("\n".join(csv) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The paper preset against ctvlp's defaults (issue 22): the ablation's five variants of two workflow
runs on the same training and test cases side by side, each variant's difference to fVLM within its
run (paired bootstrap CI), the paper preset's difference to the defaults per variant (paired, on the
same test cases), local and diffuse means, and the diseases whose CI lies entirely below 0.5.

    python benchmarks/paper_vs_defaults.py --defaults results_holdout --paper results_holdout_paper \\
        --label holdout

Reads each run's ``eval/ablation/<variant>/`` and ``eval/`` (ViSD-Boost) folders, as ``ctvlp ablation``
does; refuses two runs whose test cases differ. Writes ``paper_vs_defaults_<label>.md`` and ``.csv``
into --out with the machine and the command. Nothing is chosen here: it reports.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import polars as pl
from machine import cpu  # benchmarks/ is on sys.path

from ctvlp.evaluation import metrics
from ctvlp.workspace import read_parquet

VARIANTS = {"clip": "eval/ablation/clip", "fvlm": "eval/ablation/fvlm", "fvlm_icl": "eval/ablation/fvlm_icl",
            "fvlm_dcl": "eval/ablation/fvlm_dcl", "visd": "eval"}
GOALS = {"mean": 0.75, "local": 0.65}


def folders(results: Path) -> dict[str, Path]:
    out = {v: results / sub for v, sub in VARIANTS.items()}
    missing = [str(f) for f in out.values() if not (f / "predictions.parquet").exists()]
    if missing:
        raise SystemExit(f"{results}: no evaluation in {', '.join(missing)}: run `snakemake all ablation` there first")
    return out


def test_cases(folder: Path) -> set[str]:
    pred = read_parquet(folder / "predictions.parquet")
    return set(pred.filter(pl.col("split") == "test")["case_id"])


def below_chance(folder: Path) -> list[str]:
    """Diseases whose AUC CI lies entirely below 0.5."""
    t = pl.read_csv(folder / "zeroshot.csv").filter(pl.col("disease_id") != "mean")
    return t.filter(pl.col("auc_ci_high") < 0.5)["disease_id"].to_list()


def compare(defaults: Path, paper: Path, n_resamples: int = 1000, seed: int = 0) -> pl.DataFrame:
    """One row per (run, variant): the ablation table's columns, the diseases below chance, and for the
    paper run the difference to the same variant of the defaults run with its paired CI."""
    runs = {"defaults": folders(defaults), "paper": folders(paper)}
    cases = {run: test_cases(f["fvlm"]) for run, f in runs.items()}
    if cases["defaults"] != cases["paper"]:
        raise SystemExit("the two runs were evaluated on different test cases: not comparable")
    rows = []
    for run, by_variant in runs.items():
        table = metrics.ablation_table({v: str(f) for v, f in by_variant.items()}, reference="fvlm",
                                       n_resamples=n_resamples, seed=seed)
        for r in table.iter_rows(named=True):
            v = r["variant"]
            vs = (float("nan"),) * 3
            if run == "paper":
                vs = metrics.paired_difference(read_parquet(by_variant[v] / "predictions.parquet"),
                                               read_parquet(runs["defaults"][v] / "predictions.parquet"),
                                               n_resamples, seed=seed)
            rows.append({"run": run, **r, "paper_minus_defaults": vs[0], "pmd_ci_low": vs[1], "pmd_ci_high": vs[2],
                         "below_chance": ", ".join(below_chance(by_variant[v])) or "none"})
    return pl.DataFrame(rows)


def _ci(x, lo, hi, signed=False) -> str:
    if x != x:  # nan
        return "—"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(x)} ({f.format(lo)} to {f.format(hi)})"


def render(table: pl.DataFrame, command: str, label: str) -> str:
    lines = [f"# The paper preset against ctvlp's defaults ({label})", "",
             f"Machine: {cpu()}. {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. Command: `{command}`", "",
             "Mean zero-shot AUC over the catalog's diseases on the same test cases, 95% bootstrap CI; differences "
             "paired (both scored on the same resampled cases). Prompt style as each run chose it on validation "
             "(the paper preset fixes CT-CLIP's `presence`).", "",
             "| variant | defaults: AUC (95% CI) | diff to fVLM | local / diffuse | paper preset: AUC (95% CI) | "
             "diff to fVLM | local / diffuse | paper − defaults (paired CI) |", "|---|---|---|---|---|---|---|---|"]
    d = {r["variant"]: r for r in table.filter(pl.col("run") == "defaults").iter_rows(named=True)}
    p = {r["variant"]: r for r in table.filter(pl.col("run") == "paper").iter_rows(named=True)}
    for v in VARIANTS:
        a, b = d[v], p[v]
        lines.append(f"| {a['method']} | {_ci(a['auc'], a['auc_ci_low'], a['auc_ci_high'])} | "
                     f"{_ci(a['diff_vs_fvlm'], a['diff_ci_low'], a['diff_ci_high'], True)} | "
                     f"{a['auc_local']:.3f} / {a['auc_diffuse']:.3f} | "
                     f"{_ci(b['auc'], b['auc_ci_low'], b['auc_ci_high'])} | "
                     f"{_ci(b['diff_vs_fvlm'], b['diff_ci_low'], b['diff_ci_high'], True)} | "
                     f"{b['auc_local']:.3f} / {b['auc_diffuse']:.3f} | "
                     f"{_ci(b['paper_minus_defaults'], b['pmd_ci_low'], b['pmd_ci_high'], True)} |")
    lines += ["", "Diseases whose CI lies entirely below 0.5:", ""]
    lines += [f"- {r['run']}, {r['method']}: {r['below_chance']}" for r in table.iter_rows(named=True)]
    lines += ["", "Goals (ViSD-Boost >= fVLM + 0.02 with the paired CI above 0; mean >= 0.75, local >= 0.65):", ""]
    for run, rows in (("defaults", d), ("paper preset", p)):
        v = rows["visd"]
        lift = v["diff_vs_fvlm"] >= 0.02 and v["diff_ci_low"] > 0
        lines.append(f"- {run}: ViSD-Boost − fVLM {v['diff_vs_fvlm']:+.3f} (CI {v['diff_ci_low']:+.3f} to "
                     f"{v['diff_ci_high']:+.3f}): {'met' if lift else 'not met'}; mean {v['auc']:.3f} "
                     f"({'met' if v['auc'] >= GOALS['mean'] else 'not met'}), local {v['auc_local']:.3f} "
                     f"({'met' if v['auc_local'] >= GOALS['local'] else 'not met'})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--defaults", type=Path, default=Path("results_holdout"), help="run of config.yaml's defaults")
    parser.add_argument("--paper", type=Path, default=Path("results_holdout_paper"), help="run of config.paper.yaml")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--label", default="holdout")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    table = compare(args.defaults, args.paper, args.resamples)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/paper_vs_defaults.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / f"paper_vs_defaults_{args.label}.md").write_text(render(table, command, args.label), encoding="utf-8")
    table.write_csv(args.out / f"paper_vs_defaults_{args.label}.csv")
    print(render(table, command, args.label))


if __name__ == "__main__":
    main()

"""How far could zero-shot diagnosis go if the vision side were perfect? The text ceiling.

    python benchmarks/text_ceiling.py --results results_ablation --model results_ablation/ablation/fvlm/align

Each test case's own per-anatomy report text (as training reads it: an unmentioned anatomy is "The X is
unremarkable.") is embedded by the model's text side and scored against every disease's prompts
exactly as an image embedding is (``ctvlp.model.zeroshot.disease_scores``), per prompt style. An
AUC near 1 means the text side separates the disease with these prompts, so a zero-shot AUC near 0.5
is the vision side's shortfall; a low ceiling would point at the prompts or the text encoder. Reads
report texts and labels of the test split only to describe them; nothing is chosen from it. Writes
``text_ceiling.md`` into --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch
from machine import cpu  # benchmarks/ is on sys.path
from sklearn.metrics import roc_auc_score

from ctvlp import catalog
from ctvlp.evaluation.metrics import markdown
from ctvlp.model.io import load_model
from ctvlp.model.vision import N_ANATOMIES
from ctvlp.model.zeroshot import disease_scores, prompt_styles
from ctvlp.training.data import anatomy_texts


def ceiling(model_dir: Path, results: Path, catalog_name: str, split: str = "test") -> pl.DataFrame:
    """One row per (prompt style, disease): the AUC of the case's own report text as its embedding."""
    model = load_model(model_dir).eval()
    ids = pl.read_parquet(results / "qc" / "cases.parquet").filter(pl.col("split") == split)["case_id"].to_list()
    texts = anatomy_texts(pl.read_parquet(results / "reports" / "reports.parquet"), ids, True)
    emb = torch.zeros(len(ids), N_ANATOMIES, model.config.embed_dim)
    with torch.no_grad():
        for j in range(N_ANATOMIES):
            rows = np.flatnonzero(texts.text_idx[:, j] >= 0)
            if rows.size:
                chosen = [texts.texts[k] for k in texts.text_idx[rows, j]]
                emb[rows, j] = model.encode_texts(chosen, torch.full((len(chosen),), j, dtype=torch.long))
    types = {d.id: d.type for d in catalog.diseases(catalog_name)}
    out = []
    for style in prompt_styles(catalog_name):
        aucs = per_disease_auc(model, emb, texts.text_idx >= 0, ids, results, catalog_name, style)
        out += [{"style": style, "disease_id": d, "type": types[d], "auc": a} for d, a in aucs.items()]
    return pl.DataFrame(out)


def per_disease_auc(model, emb: torch.Tensor, usable: np.ndarray, ids: list[str], results: Path, catalog_name: str,
                    style: str) -> dict[str, float]:
    """Zero-shot AUC per disease of the anatomy embeddings ``emb`` (cases, M, D) of cases ``ids``,
    over the cases whose anatomy is ``usable`` (cases, M) and labelled in ``results``' ground truth."""
    truth = pl.read_parquet(results / "cohort" / "ground_truth.parquet")
    out = {}
    for disease, scores in disease_scores(model, emb, catalog_name, style):
        labels = dict(truth.filter(pl.col("disease_id") == disease.id).select("case_id", "label").iter_rows())
        j = catalog.anatomy_by_name(disease.anatomy).index - 1
        keep = [k for k, c in enumerate(ids) if usable[k, j] and labels.get(c) is not None]
        y = np.array([labels[ids[k]] for k in keep])
        if 0 < y.sum() < len(y):
            out[disease.id] = float(roc_auc_score(y, scores[keep]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results_ablation"))
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--catalog", default="demo", help="disease catalog of the prompts (evaluate.catalog)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = ceiling(args.model, args.results, args.catalog)
    summary = table.group_by("style", maintain_order=True).agg(
        pl.col("auc").mean().alias("mean"), pl.col("auc").filter(pl.col("type") == "local").mean().alias("local"),
        pl.col("auc").filter(pl.col("type") == "diffuse").mean().alias("diffuse"))
    wide = table.pivot("style", index=["disease_id", "type"], values="auc")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "text_ceiling.md"
    path.write_text(f"# Text ceiling of zero-shot diagnosis ({dt.date.today()})\n\nMachine: {cpu()}. Command: "
                    f"`python benchmarks/text_ceiling.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
                    "Each test case's own report text in place of its image embedding, scored with the prompts "
                    "as zero-shot diagnosis scores an image (AUC over the test split).\n\n" + markdown(summary)
                    + "\n" + markdown(wide), encoding="utf-8")
    print(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()

"""Are the demo's local lesions still in the preprocessed volumes, and does the model see them?

    python benchmarks/lesion_visibility.py [--results results] [--out benchmarks/results]

For every local disease of the demo catalog, over all cases of a finished demo run (all splits:
nothing here is chosen or tuned, it only describes the data): a handcrafted score per case inside
the disease's anatomy, computed on the preprocessed image the model trains on,

- ``outlier``: the 99.9th percentile of |voxel - the organ's median| (a stone or a bright nodule),
- ``dark``: the fraction of organ voxels more than 0.02 (40 HU) below the organ's median (a cyst),

and the AUC of each against the ground truth, beside the run's own test AUCs (zero-shot and
linear probe, from eval/). A high handcrafted AUC with a model AUC near 0.5 means the lesion
survives resampling and the model does not learn it; a handcrafted AUC near 0.5 means the lesion
is (nearly) gone at this spacing. Writes lesion_visibility.md into --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

from ctvlp import catalog


def scores(image: np.ndarray, amap: np.ndarray, labels: list[int]) -> tuple[float, float] | None:
    voxels = image[np.isin(amap, labels)].astype(np.float32)
    if voxels.size < 5:
        return None
    dev = voxels - np.median(voxels)
    return float(np.percentile(np.abs(dev), 99.9)), float((dev < -0.02).mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    res = args.results
    truth = pl.read_parquet(res / "cohort" / "ground_truth.parquet").drop_nulls("label")
    cases = pl.read_parquet(res / "qc" / "cases.parquet")
    index = {a.name: a.index for a in catalog.anatomies()}
    volumes = {}
    for case_id, folder in cases.select("case_id", "preprocessed_dir").iter_rows():
        folder = Path(folder) if Path(folder).is_absolute() else res.parent / folder
        volumes[case_id] = (np.load(folder / "image.npy", mmap_mode="r"), np.load(folder / "anatomy.npy", mmap_mode="r"))
    model_auc = {}
    for name in ("zeroshot", "linear_probe"):
        path = res / "eval" / f"{name}.csv"
        if path.exists():
            table = pl.read_csv(path, infer_schema_length=0)
            model_auc[name] = {d: float(a) for d, a in zip(table["disease_id"], table["auc"])}
    rows = []
    for disease in catalog.diseases("demo"):
        if disease.type != "local":
            continue
        y, outlier, dark = [], [], []
        for case_id, anatomy, label in truth.filter(pl.col("disease_id") == disease.id).select(
                "case_id", "anatomy", "label").iter_rows():
            if case_id not in volumes or anatomy not in index:
                continue
            s = scores(*volumes[case_id], [index[anatomy]])
            if s is not None:
                y.append(int(label))
                outlier.append(s[0])
                dark.append(s[1])
        rows.append({"disease": disease.id, "anatomy": disease.anatomy, "cases": len(y), "positives": sum(y),
                     "outlier_auc": roc_auc_score(y, outlier), "dark_auc": roc_auc_score(y, dark),
                     **{f"{k}_test_auc": v.get(disease.id) for k, v in model_auc.items()}})
    args.out.mkdir(parents=True, exist_ok=True)
    meta = (f"# Local lesions: visible after preprocessing? ({dt.date.today().isoformat()})\n\n"
            f"Results folder `{res}` ({len(volumes)} cases); handcrafted scores over all cases, the model's AUCs on "
            "its test split (eval/). Command: `python benchmarks/lesion_visibility.py "
            f"--results {res}`.\n\n")
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    text = meta + "\n".join(lines) + "\n"
    (args.out / "lesion_visibility.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

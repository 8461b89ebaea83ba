"""Where are the demo's local lesions lost: in the encoder's tokens, or in the per-anatomy pooling?

    python benchmarks/lesion_readout.py --results results_ablation --model results_ablation/train/align

For each local disease of the demo catalog, three read-outs of the same encoder on every case of
the run's train and test splits, restricted to the disease's anatomy:

- ``query``: the anatomy query's pooled feature (what alignment and zero-shot use),
- ``token_mean``: the mean of the anatomy's tokens,
- ``token_max``: the channel-wise max of the anatomy's tokens (a small lesion in one token survives),
- ``image_control``: no encoder: the 0.1th and 99.9th percentiles of the organ's voxels minus its
  median, the same for both encoders (it shows what the same probe gets from the image itself),
- ``cell_control``: the same percentiles over every voxel of the anatomy's token cells, the
  anatomy's and its neighbours' (what the tokens are computed from; bone next to the bladder is as
  bright as a stone in it),

each fed to a logistic regression fitted on the TRAINING cases' labels (regularisation chosen by
cross-validation on the training cases only) and scored on the test cases (AUC). The same for the
same architecture at its random initialisation (``--seed``), which tells what training added. A
high ``token_max`` with a low ``query`` means the tokens carry the lesion and the pooling loses it;
all low means the encoder never learned (or never could see) it. Writes
``lesion_readout_<label>.md`` into --out, with the machine named.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from machine import cpu  # benchmarks/ is on sys.path
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from ctvlp import catalog
from ctvlp.evaluation.metrics import markdown
from ctvlp.imaging.storage import load_case, paths_from
from ctvlp.model.io import build_model, load_model, read_config
from ctvlp.model.vision import pad_to_multiple

READOUTS = ("query", "token_mean", "token_max", "image_control", "cell_control")


@torch.no_grad()
def readouts(model, cases: dict, anatomies: list[int]) -> dict[str, dict[int, np.ndarray]]:
    """{case_id: {anatomy index: {readout: (C,) feature}}} for the anatomies present in each case."""
    out = {}
    stride = model.vision.stride
    for case_id, paths in tqdm(cases.items(), desc="read out", unit="case"):
        img, anat, _, _ = load_case(paths)
        im = torch.from_numpy(pad_to_multiple(np.array(img, np.float32), stride))[None, None]
        an = torch.from_numpy(pad_to_multiple(np.array(anat), stride))[None]
        tokens, allowed = model.image_tokens(im, an)
        grid = tuple(d // stride for d in im.shape[2:])
        padded_img, padded_anat = im[0, 0].numpy(), an[0].numpy()
        pooled = model.vis_pool(tokens, allowed)
        feats = {}
        for a in anatomies:
            keep = allowed[0, a - 1]
            if not keep.any():
                continue
            t = tokens[0, keep]
            voxels = padded_img[padded_anat == a]
            cells = keep.numpy().reshape(grid)
            for axis in range(3):
                cells = cells.repeat(stride, axis=axis)
            in_cells = padded_img[cells]
            feats[a] = {"query": pooled[0, a - 1].numpy(), "token_mean": t.mean(0).numpy(),
                        "token_max": t.amax(0).numpy(),
                        # the control: no encoder, the organ's own intensity tails (as lesion_visibility.py)
                        "image_control": np.percentile(voxels - np.median(voxels), [0.1, 99.9]),
                        # the same over every voxel of the anatomy's token cells (what a token sees)
                        "cell_control": np.percentile(in_cells - np.median(voxels), [0.1, 99.9])}
        out[case_id] = feats
    return out


def probe_auc(feats: dict, truth: pl.DataFrame, disease, anatomy: int, train: set, test: set, seed: int):
    """Test AUC of a logistic regression on one read-out, fitted on the training cases."""
    rows = {s: ([], []) for s in ("train", "test")}
    for case_id, label in truth.filter(pl.col("disease_id") == disease.id).select("case_id", "label").iter_rows():
        split = "train" if case_id in train else "test" if case_id in test else None
        if split and anatomy in feats.get(case_id, {}):
            rows[split][0].append(case_id)
            rows[split][1].append(int(label))
    out = {"train_pos": sum(rows["train"][1]), "test_pos": sum(rows["test"][1]), "test_cases": len(rows["test"][1])}
    for name in READOUTS:
        x = {s: np.stack([feats[c][anatomy][name] for c in rows[s][0]]) for s in rows}
        clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=4, scoring="roc_auc", max_iter=2000,
                                                                   random_state=seed))
        clf.fit(x["train"], rows["train"][1])
        out[name] = roc_auc_score(rows["test"][1], clf.predict_proba(x["test"])[:, 1])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results_ablation"))
    parser.add_argument("--model", type=Path, default=None, help="trained model folder (default RESULTS/train/align)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-initialisation encoder")
    parser.add_argument("--label", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    res, model_dir = args.results, args.model or args.results / "train" / "align"
    cases = pl.read_parquet(res / "qc" / "cases.parquet").filter(pl.col("split").is_in(["train", "test"]))
    split = {s: set(cases.filter(pl.col("split") == s)["case_id"]) for s in ("train", "test")}
    truth = pl.read_parquet(res / "cohort" / "ground_truth.parquet").drop_nulls("label")
    index = {a.name: a.index for a in catalog.anatomies()}
    local = [d for d in catalog.diseases("demo") if d.type == "local"]
    anatomies = sorted({index[d.anatomy] for d in local})
    paths = paths_from(cases)

    trained = load_model(model_dir)
    torch.manual_seed(args.seed)
    untrained = build_model(read_config(model_dir)[0]).eval()
    started = time.perf_counter()
    feats = {"trained": readouts(trained, paths, anatomies), "random init": readouts(untrained, paths, anatomies)}
    seconds = time.perf_counter() - started

    rows = []
    for d in local:
        for which, f in feats.items():
            r = probe_auc(f, truth, d, index[d.anatomy], split["train"], split["test"], args.seed)
            rows.append({"disease": d.id, "encoder": which, **r})
    table = pl.DataFrame(rows)
    means = table.group_by("encoder", maintain_order=True).agg(pl.col(list(READOUTS)).mean())
    command = "python benchmarks/lesion_readout.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (f"# Local lesions: read out from tokens or from the anatomy query? ({dt.date.today().isoformat()})\n\n"
            f"Machine: {cpu()}, {platform.platform()}, torch {torch.__version__}, {args.threads} threads; "
            f"read-outs of {len(paths)} cases x 2 encoders took {seconds:.0f} s.\n\n"
            f"Command: `{command}`\n\nModel `{model_dir}`; logistic regression on each read-out, fitted on the "
            f"{len(split['train'])} training cases (C by 4-fold CV on them), AUC on the {len(split['test'])} "
            "test cases. `random init`: the same architecture untrained (seed "
            f"{args.seed}).\n\nMean over the local diseases:\n\n"
            + markdown(means) + "\n\nPer disease:\n\n" + markdown(table) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"lesion_readout_{args.label}.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()

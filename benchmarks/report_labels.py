"""Accuracy of the report parser against CT-RATE's 18 abnormality labels.

    python benchmarks/report_labels.py --csv PATH [--backend rules] [--out DIR] [--uncertain positive|negative]

PATH is a CSV with the columns of ctrate_manual_labels_val200.csv: AccessionNo, report_text and the
18 0/1 label columns named like the `name`s of the "ctrate" disease catalog. The parser's findings
are mapped to labels: a label is 1 when its disease is found "present" anywhere in the report;
"absent", unmentioned and, by default, "uncertain" findings are 0 (``--uncertain negative``). The
manual CT-RATE labels leave hedged findings ("may be atelectasis", "lymph node?") unlabelled: on
the 200 validation reports the two choices differ on 5 report-labels, 4 of which are labelled 0;
``--uncertain positive`` counts them as 1.

Prints a per-label table (precision, recall, F1, support; scikit-learn) and, as its last line,
``macro_f1=<value>`` (macro average of the 18 per-label F1). With --out it also writes
report_labels.csv and report_labels.md (naming the machine, CPU and date) and the per-report
predictions (report_labels_predictions.csv).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path

from machine import cpu  # benchmarks/machine.py (the script's folder is on sys.path)

import numpy as np
import polars as pl
from sklearn.metrics import precision_recall_fscore_support

from ctvlp import catalog
from ctvlp.reports import rules

BACKENDS = ("rules",)


def predict(df: pl.DataFrame, backend: str, uncertain_positive: bool) -> tuple[np.ndarray, list[str], float]:
    """(N, 18) 0/1 predictions in catalog order, the label names, and seconds spent parsing."""
    if backend not in BACKENDS:
        raise SystemExit(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    dis = catalog.diseases("ctrate")
    cases = df.select(pl.col("AccessionNo").cast(pl.Utf8).alias("case_id"), pl.col("report_text"))
    t0 = time.perf_counter()
    parsed = rules.parse_reports(cases, "ctrate")
    seconds = time.perf_counter() - t0
    positive = {"present", "uncertain"} if uncertain_positive else {"present"}
    found = (
        parsed.select("case_id", "findings")
        .explode("findings")
        .drop_nulls("findings")
        .unnest("findings")
        .filter(pl.col("presence").is_in(list(positive)))
    )
    index = {c: i for i, c in enumerate(cases["case_id"].to_list())}
    col = {d.id: j for j, d in enumerate(dis)}
    pred = np.zeros((cases.height, len(dis)), dtype=np.int64)
    for case_id, did in found.select("case_id", "disease_id").iter_rows():
        pred[index[case_id], col[did]] = 1
    return pred, [d.name for d in dis], seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", required=True, help="CSV with AccessionNo, report_text and 18 label columns")
    ap.add_argument("--backend", default="rules", choices=BACKENDS)
    ap.add_argument("--out", help="directory for report_labels.csv / .md / _predictions.csv")
    ap.add_argument("--uncertain", default="negative", choices=("positive", "negative"),
                    help="whether an 'uncertain' finding counts as label 1 (default: negative)")
    args = ap.parse_args(argv)

    df = pl.read_csv(args.csv, infer_schema_length=0)
    names = [d.name for d in catalog.diseases("ctrate")]
    missing = [c for c in ("AccessionNo", "report_text", *names) if c not in df.columns]
    if missing:
        raise SystemExit(f"{args.csv}: missing column(s) {missing}")
    df = df.with_columns(pl.col("report_text").fill_null(""))
    truth = df.select([pl.col(n).cast(pl.Int64) for n in names]).to_numpy()
    pred, names, seconds = predict(df, args.backend, args.uncertain == "positive")

    p, r, f, s = precision_recall_fscore_support(truth, pred, average=None, zero_division=0)
    table = pl.DataFrame(
        {"label": names, "precision": p.round(4), "recall": r.round(4), "f1": f.round(4),
         "support": s.astype(np.int64), "predicted": pred.sum(0).astype(np.int64)}
    )
    macro = float(np.mean(f))
    micro = precision_recall_fscore_support(truth, pred, average="micro", zero_division=0)[2]
    with pl.Config(tbl_rows=40, tbl_width_chars=120, tbl_hide_dataframe_shape=True):
        print(table)
    print(f"reports={df.height} backend={args.backend} uncertain={args.uncertain} "
          f"seconds={seconds:.2f} micro_f1={micro:.4f}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table.write_csv(out / "report_labels.csv")
        ids = df["AccessionNo"].to_list()
        pl.DataFrame({"AccessionNo": ids, **{n: pred[:, j] for j, n in enumerate(names)}}).write_csv(
            out / "report_labels_predictions.csv"
        )
        lines = [
            "# Report parser vs CT-RATE labels",
            "",
            f"- data: `{Path(args.csv).name}` ({df.height} reports)",
            f"- backend: {args.backend} ({rules.PARSER_VERSION}); uncertain findings count as "
            f"{'1' if args.uncertain == 'positive' else '0'}",
            f"- machine: {platform.node()}, {cpu()}, Python {platform.python_version()}",
            f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- parse time: {seconds:.2f} s ({1000 * seconds / max(df.height, 1):.1f} ms per report)",
            "",
            "| label | precision | recall | F1 | support | predicted |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in table.iter_rows(named=True):
            lines.append(f"| {row['label']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} "
                         f"| {row['support']} | {row['predicted']} |")
        lines += ["", f"macro F1 = {macro:.4f}; micro F1 = {micro:.4f}", ""]
        (out / "report_labels.md").write_text("\n".join(lines))
    print(f"macro_f1={macro:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

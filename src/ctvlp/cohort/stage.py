"""The cohort stage: the configured source (``cohort.source``) as manifest, ground truth and
exclusions in one folder (``schema.write``)."""

from __future__ import annotations

import logging
from pathlib import Path

from . import ctrate, generic
from .schema import write

log = logging.getLogger(__name__)


def build_cohort(settings: dict, out_dir, threads: int = 1) -> dict[str, Path]:
    """Write the cohort of ``settings`` (sections cohort, seed, evaluate.catalog) into ``out_dir``;
    returns the paths written. ``threads``: processes that render the demo cohort."""
    cohort, seed = settings["cohort"], settings["seed"]
    if cohort["source"] != "demo" and cohort.get("test_seed") is not None:
        raise SystemExit(f"cohort.test_seed renders the demo's test cases from another seed; it has no meaning for "
                         f"cohort.source {cohort['source']}: remove it (your test split is the one your data define)")
    if cohort["source"] == "demo":
        from .demo import write_cohort

        path = write_cohort(out_dir, n_cases=cohort["n_cases"], seed=seed, split=tuple(cohort["split"]),
                            extra_test=cohort["test_cases"], extra_val=cohort["val_cases"],
                            extra_train=cohort["train_cases"], lesion_scale=cohort["lesion_scale"],
                            test_seed=cohort["test_seed"], workers=threads)
        return {"manifest": path}
    if cohort["source"] == "ctrate":
        source = cohort["ctrate"]
        missing = [k for k in ("volumes_root", "metadata_csv", "reports_csv") if not source[k]]
        if missing:
            raise SystemExit(f"cohort.source ctrate needs cohort.ctrate.{', cohort.ctrate.'.join(missing)}")
        manifest, truth, excluded = ctrate.ingest(
            source["volumes_root"], source["metadata_csv"], source["reports_csv"], source["labels_csv"],
            split=source["split"], one_recon_per_scan=source["one_recon_per_scan"],
            val_fraction=source["val_fraction"], seed=seed, fallback_encoding=cohort["text_fallback_encoding"])
        test = set(manifest.filter(manifest["split"] == "test")["case_id"])
        if source["labels_csv"] and test and not test & set(truth["case_id"]):
            log.warning("none of the %d test cases (CT-RATE's valid volumes) has labels: give "
                        "cohort.ctrate.labels_csv as a list with valid_predicted_labels.csv beside the train file, "
                        "or the evaluation has nothing to score", len(test))
    else:
        source = cohort["table"]
        if not source["path"]:
            raise SystemExit("cohort.source table needs cohort.table.path")
        manifest, truth, excluded = generic.ingest(
            source["path"], image_col=source["image_col"], report_col=source["report_col"], id_col=source["id_col"],
            split_col=source["split_col"], label_cols=source["label_cols"], split_fractions=tuple(cohort["split"]),
            seed=seed, patient_col=source["patient_col"], mask_col=source["mask_col"],
            disease_catalog=settings["evaluate"]["catalog"], unsafe_ids=cohort["unsafe_ids"],
            fallback_encoding=cohort["text_fallback_encoding"], series_col=source["series_col"],
            min_slices=settings["preprocess"]["min_slices"] if "preprocess" in settings else None)
    paths = write(manifest, truth, excluded, out_dir)
    log.info("%d cases in the manifest, %d exclusions (see %s)", len(manifest), len(excluded), paths["exclusions"])
    return paths

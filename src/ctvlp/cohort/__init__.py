"""The cohort stage: where the cases come from (``demo``, ``ctrate``, a generic ``table``), as
one manifest, ground truth and exclusions (``schema``). ``stage.build_cohort`` dispatches on
``cohort.source``."""

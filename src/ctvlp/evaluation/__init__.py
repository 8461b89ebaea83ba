"""Evaluation of a trained model: ``schema`` (the predictions table and not-evaluable reasons),
``embed`` (anatomy embeddings of preprocessed cases, the evaluation crop rule), ``zeroshot``
(zero-shot predictions against ground truth), ``metrics`` (thresholds chosen on validation, test
metrics, bootstrap CIs, tables, the ablation table), ``probe`` (the linear probe) and ``figures``;
``stage`` runs them as the workflow's evaluation rules."""

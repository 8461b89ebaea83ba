"""Training, the application on top of the model: ``data`` (crops with the complete-organ rule,
per-anatomy texts from the reports), ``distributed`` (torchrun process groups, gathered negatives,
DDP), ``checkpoint`` (resumable state in safetensors), ``loop`` (``run_phase``: one resumable loop
for every phase) and ``phases`` (the four ViSD-Boost phases and the baselines as ``PhaseTask``
objects; ``phases.run`` trains one into a folder)."""

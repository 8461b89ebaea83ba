"""Assigning cases to train/val/test by group (patient), deterministic from the seed."""

from __future__ import annotations

import hashlib


def _rank(keys, seed: int) -> list:
    """Keys in a deterministic pseudo-random order that depends only on (seed, key)."""
    return sorted(set(keys), key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())


def split_groups(groups, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict:
    """Assign each group (patient) to train/val/test: groups ranked by a hash of (seed, group);
    the first round(f_val * n) go to val, the next round(f_test * n) to test, the rest to train.
    A non-zero fraction gets at least one group when there are enough groups to keep one in train."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers, not {fractions}")
    total = float(sum(fractions))
    f_val, f_test = fractions[1] / total, fractions[2] / total
    order = _rank(groups, seed)
    n = len(order)
    n_val, n_test = round(f_val * n), round(f_test * n)
    if f_val > 0 and n_val == 0 and n - n_test >= 2:
        n_val = 1
    if f_test > 0 and n_test == 0 and n - n_val >= 2:
        n_test = 1
    out = {}
    for i, g in enumerate(order):
        out[g] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return out

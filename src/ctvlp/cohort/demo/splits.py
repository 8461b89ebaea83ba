"""Train/val/test assignment of the demo cohort: iterative stratification of multilabel cases
(Sechidis et al. 2011) with exact split sizes, then label-balancing swaps; deterministic from the
seed. (``ctvlp.cohort.splits`` splits other sources by patient group instead.)
"""

from __future__ import annotations

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


def split_counts(n: int, split: tuple[float, float, float]) -> list[int]:
    """Case counts per split from the fractions (largest remainders), every split non-empty."""
    fractions = np.asarray(split, float)
    if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"split must be three non-negative fractions, got {split!r}")
    if n < 3:
        raise ValueError("need at least 3 cases so that train, val and test are non-empty")
    fractions = fractions / fractions.sum()
    raw = fractions * n
    counts = np.floor(raw).astype(int)
    for j in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[j] += 1
    for j in range(3):  # every split non-empty
        if counts[j] == 0:
            counts[int(np.argmax(counts))] -= 1
            counts[j] = 1
    return [int(c) for c in counts]


def assign_splits(labels: list[dict[str, int]], seed: int,
                  split: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> list[str]:
    """Iterative stratification (Sechidis et al. 2011) of multilabel cases into train/val/test.

    Exact split sizes from the fractions, deterministic from the seed.
    """
    n = len(labels)
    counts = split_counts(n, split)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5917]))
    ids = sorted({k for case in labels for k in case})
    positives = np.array([[case.get(k, 0) for k in ids] for case in labels], int)
    positives = positives.reshape(n, len(ids))
    fractions = np.array(counts, float) / n
    need = fractions[:, None] * positives.sum(axis=0)[None, :]  # desired positives per split, label
    capacity = np.array(counts, float)
    out = np.full(n, -1)
    order = rng.permutation(n)
    while (out < 0).any():
        left = (out < 0)
        positives_left = positives[left].sum(axis=0)
        if positives_left.sum() == 0:
            for i in order:
                if out[i] < 0:
                    candidates = np.flatnonzero(capacity == capacity.max())
                    j = int(rng.choice(candidates))
                    out[i], capacity[j] = j, capacity[j] - 1
            break
        rarest = int(np.argmin(np.where(positives_left > 0, positives_left, np.inf)))
        for i in order:
            if out[i] >= 0 or not positives[i, rarest]:
                continue
            score = np.where(capacity > 0, need[:, rarest], -np.inf)
            candidates = np.flatnonzero(score == score.max())
            if len(candidates) > 1:
                room = capacity[candidates]
                candidates = candidates[room == room.max()]
            j = int(rng.choice(candidates))
            out[i] = j
            capacity[j] -= 1
            need[j] -= positives[i]
    # refine by label-balancing swaps between splits (sizes stay exact)
    target = fractions[:, None] * positives.sum(axis=0)[None, :]
    per_split = np.stack([positives[out == j].sum(axis=0) for j in range(3)]).astype(float)

    def loss(per_split_):
        short = np.clip(np.minimum(3.0, np.floor(target)) - per_split_, 0, None)
        return float((((per_split_ - target) ** 2) / np.maximum(target, 1.0)).sum()
                     + 10.0 * short.sum())

    current = loss(per_split)
    for _ in range(40 * n):
        a, b = rng.integers(n, size=2)
        ja, jb = out[a], out[b]
        if ja == jb:
            continue
        delta = (positives[b] - positives[a]).astype(float)
        per_split[ja] += delta
        per_split[jb] -= delta
        new = loss(per_split)
        if new < current:
            out[a], out[b], current = jb, ja, new
        else:
            per_split[ja] -= delta
            per_split[jb] += delta
    return [SPLIT_NAMES[j] for j in out]

"""Which rows: seeded hold-outs (stratified by label) and K rows per label, decided from the labels alone.

Both work on label codes (one small integer per row, `source.Labels`), never on the rows, so a
5-million-row file is split without reading its text; and they draw exactly what sampling the rows
themselves would (`rng.sample(range(n), k)` picks the same positions as `rng.sample(rows, k)`), so a
Parquet file and the same rows in JSONL give the same splits. Positions are 0-based within the rows
given; labels are taken in order of first appearance.
"""

from __future__ import annotations

import random

import numpy as np


def held_out_positions(codes: np.ndarray | None, n: int, size: int, seed: int, leave_one: bool) -> np.ndarray:
    """Positions (ascending) of `size` rows of n to take out, seeded.

    With `codes` (label per row) every label gives its share (largest remainder), so a file sorted by
    label still yields every label; with `leave_one` a label also keeps at least one row in the rest
    (so holding rows out of train never removes a label from training)."""
    size = min(size, n)
    rng = random.Random(seed)
    if codes is None:
        return np.sort(np.array(rng.sample(range(n), size), np.int64))
    counts = _counts(codes)
    chosen = []
    for label, quota in _quotas(counts, size).items():
        within = rng.sample(range(counts[label]), min(quota, counts[label] - leave_one))
        chosen.append(np.flatnonzero(codes == label)[within])
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64)


def k_per_label_positions(codes: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Positions (ascending) of K rows per label, seeded."""
    rng = random.Random(seed)
    counts = _counts(codes)
    chosen = [
        np.flatnonzero(codes == label)[rng.sample(range(n), min(shots, n))] for label, n in counts.items()
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64)


def _counts(codes: np.ndarray) -> dict[int, int]:
    """Rows per label code, the labels in order of first appearance."""
    labels, first, counts = np.unique(codes, return_index=True, return_counts=True)
    order = np.argsort(first)
    return dict(zip(labels[order].tolist(), counts[order].tolist()))


def _quotas(counts: dict, size: int) -> dict:
    """Split `size` over the keys in proportion to `counts` (largest remainder, ties in key order)."""
    total = sum(counts.values())
    exact = {k: size * n / total for k, n in counts.items()}
    quotas = {k: int(v) for k, v in exact.items()}
    by_remainder = sorted(counts, key=lambda k: quotas[k] - exact[k])
    for k in by_remainder[: size - sum(quotas.values())]:
        quotas[k] += 1
    return quotas


def held_out_size(n: int, fraction: float, limit: int | None) -> int:
    """Rows to hold out of n: the fraction (at least one), at most `limit`."""
    size = max(1, round(n * fraction))
    return min(size, limit) if limit else size

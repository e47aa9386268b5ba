"""Classification metrics. Written out (a few lines of numpy) rather than pulling in scikit-learn,
which would add a large dependency for four formulas."""

from __future__ import annotations

import numpy as np


def confusion(gold: list[int], pred: list[int], n_labels: int) -> np.ndarray:
    """[gold, predicted] counts."""
    matrix = np.zeros((n_labels, n_labels), dtype=int)
    np.add.at(matrix, (np.asarray(gold, dtype=int), np.asarray(pred, dtype=int)), 1)
    return matrix


def classification_report(gold: list[int], pred: list[int], labels: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    matrix = confusion(gold, pred, len(labels))
    true_pos = np.diag(matrix).astype(float)
    predicted = matrix.sum(0).astype(float)
    actual = matrix.sum(1).astype(float)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, actual, out=np.zeros_like(true_pos), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    present = actual > 0  # macro-F1 over labels that occur in the gold data
    return {
        "n": int(matrix.sum()),
        "accuracy": float(true_pos.sum() / max(1, matrix.sum())),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(actual[i]),
            }
            for i, label in enumerate(labels)
        },
        "labels": labels,
        "confusion": matrix.tolist(),
    }

"""PNG figures for a run folder (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .run import atomic_file  # noqa: E402
from .taskfile import CLASSIFICATION_METRICS, GENERATION_METRICS  # noqa: E402


def save_figure(fig: Figure, path: Path) -> None:
    """A figure as PNG, written atomically."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)


def metric_axis_limits(metric: str) -> tuple[float, float] | None:
    """The metric's whole scale: classification scores are fractions, generation scores percentages
    (BLEU, chrF, ...). None for a metric of unknown scale, which then gets matplotlib's own range."""
    if metric in CLASSIFICATION_METRICS:
        return (0, 1)
    if metric in GENERATION_METRICS:
        return (0, 100)
    return None


def learning_curve(history: list[dict], metric: str, path: Path) -> Figure:
    """Training loss per step and the validation metric at each evaluation; returns the (closed)
    figure, whose second axes is the metric's."""
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [
        (h["step"], h[metric])
        for h in history
        if h.get("split") == "validation" and h.get("variant") != "zero_shot" and metric in h
    ]
    fig, ax_loss = plt.subplots(figsize=(7, 4))
    if losses:
        ax_loss.plot(*zip(*losses), color="tab:blue", alpha=0.6, label="train loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss", color="tab:blue")
    ax_metric = ax_loss.twinx()
    if evals:
        ax_metric.plot(*zip(*evals), "o-", color="tab:orange", label=f"validation {metric}")
    ax_metric.set_ylabel(f"validation {metric}", color="tab:orange")
    limits = metric_axis_limits(metric)
    if limits is not None:
        ax_metric.set_ylim(*limits)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return fig


def confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path) -> None:
    size = max(4.0, 0.35 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if len(labels) <= 20:
        top = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(
                    j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black"
                )
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)

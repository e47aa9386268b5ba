"""The compare report: one row per (method, shots) setting, read from the grid's cell records.

A cell is one run (method x training-set size x seed, or one learning rate of the search), stored by
`softprompt compare` as one JSON record. This module only reads them. It averages the final cells over
the seeds that finished (mean and sample standard deviation: the seeds are the only spread we
measure), draws three figures, and writes the result three ways: report.json for programs, report.md
with the PNGs beside it, report.html with the PNGs inlined so that the one file can be sent on its own.
The markdown and the HTML are rendered from one list of blocks, so the two cannot drift apart.

Classification scores are stored as fractions (as `metrics.py` computes them) and shown as
percentages; generation scores are percentages already.
"""

from __future__ import annotations

import base64
import html
import json
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from math import ceil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table as RichTable  # noqa: E402
from rich.text import Text  # noqa: E402

from ..methods import METHODS  # noqa: E402
from ..plots import metric_axis_limits, save_figure  # noqa: E402
from ..run import write_atomic  # noqa: E402
from ..taskfile import CLASSIFICATION_METRICS  # noqa: E402

FRACTION_METRICS = CLASSIFICATION_METRICS  # stored as 0..1, shown as percentages
NOT_METRICS = ("n", "labels", "confusion")  # entries of a cell's `test` that are not scores
TIMINGS = ("train_seconds", "train_examples_per_s", "eval_examples_per_s", "peak_rss_mb")
SIZES = ("trainable_params", "saved_params", "artifact_bytes", "examples_seen", "train_rows")
MAX_TICK_LABELS = 20  # a confusion matrix with more labels (e.g. 77 intents) gets no tick labels
MAX_COUNT_LABELS = 10  # ... and with more than this, no counts written in its squares
DASH = "—"


# ----------------------------------------------------------------------------------------- summary


def summarize(cells: list[dict], meta: dict) -> list[dict]:
    """One row per (method, shots) from the final cells, in the order of meta["methods"] and
    meta["shots"] (settings the meta does not name come after, as first seen): the mean and sample
    standard deviation over the seeds that finished of the headline metric (`mean`, `sd`) and of every
    numeric test metric (`metrics`), the seeds done and planned, mean timings, the sizes of the trained
    parameters and the artifact, the chosen learning rate and a status line. A setting with no
    finished seed still gets a row, with None for its numbers and the reason in `status`."""
    groups = _group(c for c in cells if c.get("stage") == "final")
    methods = _ordered((m for m, _ in groups), meta.get("methods", []))
    shots = _ordered((s for _, s in groups), meta.get("shots", []))
    return [_row(groups[m, s], meta) for m in methods for s in shots if (m, s) in groups]


def _group(cells: Iterable[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell["method"], str(cell["shots"])), []).append(cell)
    return groups


def _ordered(values: Iterable[str], order: list) -> list[str]:
    """The names of `order` that occur in `values`, then the others in first-seen order."""
    seen = list(dict.fromkeys(values))
    return [str(v) for v in order if str(v) in seen] + [v for v in seen if v not in map(str, order)]


def _row(group: list[dict], meta: dict) -> dict:
    group = sorted(group, key=lambda c: c.get("seed", 0))  # "first" below means the lowest seed
    done = [c for c in group if c.get("status") == "done"]
    first = done[0] if done else {}
    metrics = _metric_stats(done, meta["metric"])
    headline = metrics.get(meta["metric"], {"mean": None, "sd": None})
    method = group[0]["method"]
    return {
        "method": method,
        "shots": str(group[0]["shots"]),
        "metric": meta["metric"],
        "mean": headline["mean"],
        "sd": headline["sd"],
        "metrics": metrics,
        "seeds_done": len(done),
        "seeds_planned": len(group),
        **{key: _mean(c.get(key) for c in done) for key in TIMINGS},
        **{key: first.get(key) for key in SIZES},
        "lr": meta.get("chosen_lr", {}).get(method, first.get("lr")),
        "base_unchanged": first.get("base_unchanged"),
        "status": _status(group, len(done)),
    }


def _metric_stats(done: list[dict], headline: str) -> dict[str, dict]:
    """{metric: {"mean", "sd"}} over the done cells, the headline metric first."""
    names = [headline] + [n for c in done for n, v in (c.get("test") or {}).items() if _is_score(n, v)]
    stats = {}
    for name in dict.fromkeys(names):
        values = [c["test"][name] for c in done if _is_score(name, (c.get("test") or {}).get(name))]
        if values:
            mean, sd = _mean_sd(values)
            stats[name] = {"mean": mean, "sd": sd}
    return stats


def _is_score(name: str, value: object) -> bool:
    return name not in NOT_METRICS and isinstance(value, (int, float)) and not isinstance(value, bool)


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no spread from a single seed."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _status(group: list[dict], n_done: int) -> str:
    """`done`, `failed: <first error>` or `over budget (k of n seeds done)`."""
    failed = [c for c in group if c.get("status") == "failed"]
    count = f"({n_done} of {len(group)} seeds done)"
    if failed:
        error = (failed[0].get("error") or "unknown error").strip().splitlines() or ["unknown error"]
        return f"failed: {error[0][:200]}" + (f" {count}" if n_done else "")
    if any(c.get("status") == "over_budget" for c in group):
        return f"over budget {count}"
    if n_done < len(group):
        return f"incomplete {count}"
    return "done"


# -------------------------------------------------------------------------------------- formatting


def _shown(metric: str, value: float | None) -> float | None:
    """A score on the scale the tables and figures use: percentages."""
    if value is None:
        return None
    return value * 100 if metric in FRACTION_METRICS else value


def _metric_header(metric: str) -> str:
    return f"{metric} (%)" if metric in FRACTION_METRICS else metric


def _score(metric: str, mean: float | None, sd: float | None = None) -> str:
    if mean is None:
        return DASH
    text = f"{_shown(metric, mean):.1f}"
    return text if sd is None else f"{text} ± {_shown(metric, sd):.1f}"


def _count(n: int | None) -> str:
    """Parameter counts, three significant digits: 16.4K, 1.24M, 135M."""
    if n is None:
        return DASH
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _bytes(n: int | None) -> str:
    if n is None:
        return DASH
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def _number(value: float | None, digits: int = 1) -> str:
    return DASH if value is None else f"{value:,.{digits}f}"


def _lr(lr: float | None) -> str:
    return DASH if lr is None else f"{lr:g}"


def _yes_no(flag: bool | None) -> str:
    return DASH if flag is None else ("yes" if flag else "no")


# ------------------------------------------------------------------------------------------ blocks


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Image:
    title: str
    path: Path  # a PNG beside the report


Block = Heading | Paragraph | Table | Bullets | Image


def summary_table(rows: list[dict], meta: dict) -> Table:
    """The main table: one line per (method, shots) row of `summarize`."""
    headers = ["method", "shots", _metric_header(meta["metric"]), "seeds", "train rows / seen", "trainable params"]
    headers += ["saved params", "artifact", "train time", "train ex/s", "eval ex/s", "peak memory (MB)"]
    headers += ["lr", "base unchanged", "status"]
    return Table(headers, [_summary_line(r) for r in rows])


def _summary_line(r: dict) -> list[str]:
    return [
        r["method"],
        r["shots"],
        _score(r["metric"], r["mean"], r["sd"]),
        f"{r['seeds_done']}/{r['seeds_planned']}",
        f"{_count(r['train_rows'])} / {_count(r['examples_seen'])}",
        _count(r["trainable_params"]),
        _count(r["saved_params"]),
        _bytes(r["artifact_bytes"]),
        _duration(r["train_seconds"]),
        _number(r["train_examples_per_s"]),
        _number(r["eval_examples_per_s"]),
        _number(r["peak_rss_mb"], 0),
        _lr(r["lr"]),
        _yes_no(r["base_unchanged"]),
        r["status"],
    ]


def _metrics_table(rows: list[dict]) -> Table | None:
    """Every test metric, mean ± sd; None when the headline metric is the only one."""
    names = list(dict.fromkeys(n for r in rows for n in r["metrics"]))
    if len(names) < 2:
        return None
    lines = [
        [r["method"], r["shots"], *(_score(n, **r["metrics"].get(n, {"mean": None})) for n in names)]
        for r in rows
    ]
    return Table(["method", "shots", *map(_metric_header, names)], lines)


def _search_table(cells: list[dict], meta: dict) -> Table | None:
    search = [c for c in cells if c.get("stage") == "search"]
    if not search:
        return None
    methods = _ordered((c["method"] for c in search), meta.get("methods", []))
    search.sort(key=lambda c: (methods.index(c["method"]), c.get("lr") or 0))
    chosen = meta.get("chosen_lr", {})
    metric = meta["metric"]
    headers = ["method", "shots", "lr", f"validation {_metric_header(metric)}", "chosen", "status"]
    lines = [
        [
            c["method"],
            str(c["shots"]),
            _lr(c.get("lr")),
            _score(c.get("metric", metric), c.get("validation")),
            "✓" if c.get("lr") is not None and chosen.get(c["method"]) == c.get("lr") else "",
            _cell_status(c),
        ]
        for c in search
    ]
    return Table(headers, lines)


def _cell_status(cell: dict) -> str:
    status = str(cell.get("status", "")).replace("_", " ")
    error = (cell.get("error") or "").strip().splitlines()
    return f"{status}: {error[0][:200]}" if status == "failed" and error else status


def _intro(meta: dict) -> str:
    seeds = ", ".join(map(str, meta.get("seeds", []))) or DASH
    budget = meta.get("budget_seconds")
    return (
        f"Each trained method ran {meta.get('steps', DASH)} steps at batch size "
        f"{meta.get('batch_size', DASH)}. Test rows: {meta.get('report_rows', DASH)}. "
        f"Validation rows: {meta.get('validation_rows', DASH)}. Seeds: {seeds}; scores are the mean ± "
        f"sample standard deviation over the seeds that finished. Time budget: "
        f"{_duration(budget) if budget is not None else 'none'}. Wall time of the whole comparison: "
        f"{_duration(meta.get('wall_seconds'))}{_overlap(meta)}."
    )


def _overlap(meta: dict) -> str:
    """What the summed cell time means when cells ran side by side (`--jobs`)."""
    jobs = meta.get("jobs") or 1
    return f" (summed over cells, up to {jobs} of which ran at once)" if jobs > 1 else ""


def _notes(cells: list[dict], meta: dict, rows: list[dict]) -> list[str]:
    """The meta's notes, each method's own notes (e.g. how many demonstrations), once each, then
    every trained setting whose mean fell below zero-shot's on the same training-set size."""
    own = [f"{c['method']}: {c['note']}" for c in cells if c.get("stage") == "final" and c.get("note")]
    return list(dict.fromkeys([*meta.get("notes", []), *own, *_below_zero_shot(rows, meta)]))


def _below_zero_shot(rows: list[dict], meta: dict) -> list[str]:
    """A user must see where training left them worse than no training at all (the report rows
    choose nothing, so saying so is honest; nothing is dropped or changed for it)."""
    zero = {r["shots"]: r["mean"] for r in rows if r["method"] == "zero-shot" and r["mean"] is not None}
    metric = meta["metric"]
    return [
        f"{r['method']} ({_shots_text(r['shots'])}) scored {_score(metric, r['mean'])}, below zero-shot's "
        f"{_score(metric, zero[r['shots']])}: training did not pay off on these rows"
        for r in rows
        if METHODS.get(r["method"]) is not None and METHODS[r["method"]].trains
        and r["mean"] is not None and r["shots"] in zero and r["mean"] < zero[r["shots"]]
    ]


def _shots_text(shots: str) -> str:
    return "all training rows" if shots == "all" else f"{shots} per label"


def _blocks(cells: list[dict], meta: dict, rows: list[dict], images: list[Image]) -> list[Block]:
    blocks: list[Block] = [
        Heading(f"Compare: {meta['task']} on {meta['model']}", 1),
        Paragraph(_intro(meta)),
        Heading(f"Results ({meta['metric']}, {meta.get('kind', '')})"),
        summary_table(rows, meta),
    ]
    if (metrics := _metrics_table(rows)) is not None:
        blocks += [Heading("All test metrics"), metrics]
    if (search := _search_table(cells, meta)) is not None:
        blocks += [Heading("Learning-rate search"), search]
    if notes := _notes(cells, meta, rows):
        blocks += [Heading("Notes"), Bullets(notes)]
    if images:
        blocks += [Heading("Figures"), *images]
    return blocks


# --------------------------------------------------------------------------------------- rendering


def _md_text(text: str) -> str:
    """One line, with no `|` to end a table cell and no `<` to open an HTML tag."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;")


def _markdown(blocks: list[Block]) -> str:
    parts = []
    for block in blocks:
        match block:
            case Heading(text, level):
                parts.append(f"{'#' * level} {_md_text(text)}")
            case Paragraph(text):
                parts.append(_md_text(text))
            case Table(headers, rows):
                lines = [headers, ["---"] * len(headers), *rows]
                parts.append("\n".join("| " + " | ".join(map(_md_text, line)) + " |" for line in lines))
            case Bullets(items):
                parts.append("\n".join(f"- {_md_text(item)}" for item in items))
            case Image(title, path):
                parts.append(f"![{_md_text(title)}]({path.name})")
    return "\n\n".join(parts) + "\n"


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; }
th { background: #f4f4f4; }
td { font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; }
img { max-width: 100%; }
"""


def _html(blocks: list[Block]) -> str:
    title = next((b.text for b in blocks if isinstance(b, Heading)), "compare report")
    body = "\n".join(_html_block(b) for b in blocks)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _html_block(block: Block) -> str:
    esc = html.escape
    match block:
        case Heading(text, level):
            return f"<h{level}>{esc(text)}</h{level}>"
        case Paragraph(text):
            return f"<p>{esc(text)}</p>"
        case Table(headers, rows):
            head = "".join(f"<th>{esc(h)}</th>" for h in headers)
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>\n" for r in rows)
            return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"
        case Bullets(items):
            return "<ul>\n" + "".join(f"<li>{esc(i)}</li>\n" for i in items) + "</ul>"
        case Image(title, path):
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            return (
                f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(title)}</figcaption></figure>"
            )
    raise TypeError(f"not a report block: {block!r}")


# ----------------------------------------------------------------------------------------- figures


def _representatives(cells: list[dict], meta: dict, keep: Callable[[dict], bool]) -> tuple[str, dict]:
    """Among the final cells that `keep` accepts: the largest shots setting (last in meta order), and
    in it each method's cell of the lowest seed, methods in meta order. ("", {}) when none."""
    kept = [c for c in cells if c.get("stage") == "final" and keep(c)]
    if not kept:
        return "", {}
    shots = _ordered((str(c["shots"]) for c in kept), meta.get("shots", []))[-1]
    kept = sorted((c for c in kept if str(c["shots"]) == shots), key=lambda c: c.get("seed", 0))
    methods = _ordered((c["method"] for c in kept), meta.get("methods", []))
    return shots, {m: next(c for c in kept if c["method"] == m) for m in methods}


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _set_metric_axis(ax: plt.Axes, metric: str, label: str) -> None:
    ax.set_ylabel(label)
    if metric_axis_limits(metric) is not None:  # the metric's whole scale, in percent
        ax.set_ylim(0, 100)


def learning_curves_figure(cells: list[dict], meta: dict, path: Path) -> bool:
    """Validation metric against step, one line per method (largest shots, lowest seed); False
    (and no file) when no final cell has a curve."""
    shots, picked = _representatives(cells, meta, lambda c: bool(c.get("curve")))
    if not picked:
        return False
    metric = meta["metric"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, cell in picked.items():
        points = sorted((p["step"], _shown(metric, p["value"])) for p in cell["curve"])
        ax.plot(*zip(*points), "o-", markersize=3, label=method)
    ax.set_xlabel("step")
    _set_metric_axis(ax, metric, f"validation {_metric_header(metric)}")
    ax.set_title(f"learning curves, shots={shots}, seed {min(c.get('seed', 0) for c in picked.values())}")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def metric_vs_shots_figure(rows: list[dict], meta: dict, path: Path) -> bool:
    """Mean test metric against training-set size (categorical), error bars one sd, one line per
    method (dashed: untrained); False when no row has a score."""
    scored = [r for r in rows if r["mean"] is not None]
    if not scored:
        return False
    metric = meta["metric"]
    shots = _ordered((r["shots"] for r in scored), meta.get("shots", []))
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in _ordered((r["method"] for r in scored), meta.get("methods", [])):
        mine = [r for r in scored if r["method"] == method]
        untrained = all(r["trainable_params"] == 0 for r in mine)
        ax.errorbar(
            [shots.index(r["shots"]) for r in mine],
            [_shown(metric, r["mean"]) for r in mine],
            yerr=[_shown(metric, r["sd"] or 0.0) for r in mine],
            marker="o",
            capsize=3,
            linestyle="--" if untrained else "-",
            label=f"{method} (untrained)" if untrained else method,
        )
    ax.set_xticks(range(len(shots)), shots)
    ax.set_xlim(-0.5, len(shots) - 0.5)
    ax.set_xlabel("training-set size (shots)")
    ax.set_title("test score, mean ± sd over seeds")
    _set_metric_axis(ax, metric, f"test {_metric_header(metric)}")
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def confusion_figure(cells: list[dict], meta: dict, path: Path) -> bool:
    """Each method's test confusion matrix (largest shots, lowest seed) side by side, wrapped at four
    to a line; False when there is none to draw (generation cells carry no matrix)."""
    shots, picked = _representatives(cells, meta, _has_confusion)
    if not picked:
        return False
    n_labels = max(len(c["test"]["confusion"]) for c in picked.values())
    side = min(6.0, max(3.0, 0.3 * n_labels + 1.5))
    cols = min(4, len(picked))
    fig, axes = plt.subplots(
        ceil(len(picked) / cols), cols, figsize=(cols * side, ceil(len(picked) / cols) * side), squeeze=False
    )
    for ax, (method, cell) in zip(axes.flat, picked.items()):
        _draw_confusion(ax, cell["test"])
        ax.set_title(f"{method} (shots={shots}, seed {cell.get('seed', 0)})", fontsize=9)
    for ax in axes.flat[len(picked) :]:
        ax.axis("off")
    _save(fig, path)
    return True


def _has_confusion(cell: dict) -> bool:
    return cell.get("status") == "done" and bool((cell.get("test") or {}).get("confusion"))


def _draw_confusion(ax: plt.Axes, test: dict) -> None:
    matrix = test["confusion"]
    labels = [str(label) for label in test.get("labels") or range(len(matrix))]
    ax.imshow(matrix, cmap="Blues")
    if len(labels) <= MAX_TICK_LABELS:
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel(f"predicted ({len(labels)} labels)", fontsize=8)
    ax.set_ylabel("gold", fontsize=8)
    if len(labels) <= MAX_COUNT_LABELS:
        top = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                color = "white" if count > top / 2 else "black"
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)


# ------------------------------------------------------------------------------------------ output


def _figures(out: Path, cells: list[dict], meta: dict, rows: list[dict]) -> list[Image]:
    """Draw each figure that has data to a PNG in `out`; a stale PNG of a figure without data goes."""
    drawers = {
        "learning_curves.png": ("Validation learning curves", partial(learning_curves_figure, cells, meta)),
        "metric_vs_shots.png": ("Test metric against shots", partial(metric_vs_shots_figure, rows, meta)),
        "confusion.png": ("Test confusion matrices", partial(confusion_figure, cells, meta)),
    }
    images = []
    for name, (title, draw) in drawers.items():
        path = out / name
        path.unlink(missing_ok=True)
        if draw(path):
            images.append(Image(title, path))
    return images


def write_report(out: Path, cells: list[dict], meta: dict) -> list[dict]:
    """Write out/report.json ({"meta", "summary", "cells"}: scores as stored, fractions for
    classification), out/report.md (figures as PNG files beside it) and out/report.html
    (self-contained: figures embedded as base64 data URIs, no external resources); return the
    summary rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(cells, meta)
    report = {"meta": meta, "summary": rows, "cells": cells}
    write_atomic(out / "report.json", json.dumps(report, indent=1, ensure_ascii=False))
    blocks = _blocks(cells, meta, rows, _figures(out, cells, meta, rows))
    write_atomic(out / "report.md", _markdown(blocks))
    write_atomic(out / "report.html", _html(blocks))
    return rows


def console_table(rows: list[dict], meta: dict) -> RichTable:
    """The summary as a rich Table for the terminal (plain text cells: an error message is never
    read as rich markup)."""
    table = summary_table(rows, meta)
    rich = RichTable(*table.headers, title=f"{meta['task']} on {meta['model']}")
    for line, row in zip(table.rows, rows):
        rich.add_row(*map(Text, line[:-1]), Text(line[-1], style=_status_style(row["status"])))
    return rich


def _status_style(status: str) -> str:
    if status == "done":
        return "green"
    return "red" if status.startswith("failed") else "yellow"

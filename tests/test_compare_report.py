"""The compare report from synthetic cell records: summary statistics, status lines, and the three
files (json, markdown with PNGs beside it, self-contained html). No model is loaded."""

from __future__ import annotations

import io
import json
import re
import statistics

import matplotlib.pyplot as plt
import pytest
from rich.console import Console

from softprompt.compare.report import _draw_confusion, console_table, summarize, write_report

LABELS = ["negative", "positive"]
META = {
    "task": "sst2",
    "model": "tiny-llama",
    "kind": "classification",
    "metric": "accuracy",
    "methods": ["zero-shot", "prompt", "lora"],
    "shots": ["16", "all"],
    "seeds": [0, 1],
    "steps": 40,
    "batch_size": 8,
    "report_rows": "sst2/test.jsonl, 1821 rows",
    "validation_rows": "sst2/dev.jsonl, 200 rows",
    "budget_seconds": 600.0,
    "wall_seconds": 1234.0,
    "notes": ["accuracy on the test rows; the learning rate chosen on validation"],
    "chosen_lr": {"prompt": 0.3, "lora": 0.001},
}


def cell(method: str, shots: str, seed: int, accuracy: float | None = None, **fields) -> dict:
    """A final cell that finished with `accuracy` (None: no test scores), overridden by `fields`."""
    trained = method != "zero-shot"
    test = None
    if accuracy is not None:
        test = {"n": 10, "accuracy": accuracy, "macro_f1": accuracy - 0.1, "labels": LABELS}
        test["confusion"] = [[4, 1], [1, 4]]
    record = {
        "id": f"final-{method}-{shots}-s{seed}",
        "stage": "final",
        "method": method,
        "shots": shots,
        "seed": seed,
        "lr": META["chosen_lr"].get(method),
        "status": "done",
        "error": None,
        "metric": "accuracy",
        "validation": accuracy,
        "test": test,
        "trainable_params": 2048 if trained else 0,
        "saved_params": 2048 if trained else 0,
        "artifact_bytes": 9000 if trained else 0,
        "train_seconds": 10.0 + seed if trained else 0.0,
        "train_examples_per_s": 30.0 if trained else None,
        "eval_examples_per_s": 200.0,
        "peak_rss_mb": 800.0,
        "steps": 40 if trained else 0,
        "train_rows": 16 if shots == "16" else 67349,
        "examples_seen": 320 if trained else 0,
        "base_unchanged": True,
        "curve": [{"step": s, "value": 0.5 + s / 100} for s in (0, 20, 40)] if trained else [],
        "wall_seconds": 12.0,
        "note": None,
    }
    return record | fields


def search(method: str, lr: float, validation: float) -> dict:
    return cell(
        method, "16", 0, None, id=f"search-{method}-16-lr{lr}", stage="search", lr=lr, validation=validation
    )


CELLS = [
    # listed out of order on purpose: the report follows meta["methods"] and meta["shots"]
    cell("prompt", "all", 1, 0.90),
    cell("prompt", "16", 0, 0.70),
    cell("prompt", "16", 1, 0.80),
    cell("prompt", "all", 0, 0.86),
    cell("zero-shot", "16", 0, 0.55),
    cell("zero-shot", "all", 0, 0.55),
    cell("lora", "16", 0, 0.82),
    cell("lora", "16", 1, None, status="over_budget"),
    cell("lora", "all", 0, None, status="failed", error="CUDA out of memory\nTraceback (most recent call)"),
    cell("lora", "all", 1, None, status="failed", error="another error"),
    search("prompt", 0.03, 0.61),
    search("prompt", 0.3, 0.74),
    search("lora", 0.001, 0.70),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report written once for the read-only tests: (folder, summary rows)."""
    out = tmp_path_factory.mktemp("report")
    return out, write_report(out, CELLS, META)


def row(rows: list[dict], method: str, shots: str) -> dict:
    return next(r for r in rows if r["method"] == method and r["shots"] == shots)


# --------------------------------------------------------------------------------------- summarize


def test_summary_has_one_row_per_setting_in_meta_order():
    rows = summarize(CELLS, META)
    assert [(r["method"], r["shots"]) for r in rows] == [
        ("zero-shot", "16"),
        ("zero-shot", "all"),
        ("prompt", "16"),
        ("prompt", "all"),
        ("lora", "16"),
        ("lora", "all"),
    ]


def test_summary_mean_and_sample_sd_over_seeds():
    prompt = row(summarize(CELLS, META), "prompt", "16")
    assert prompt["mean"] == pytest.approx(0.75)
    assert prompt["sd"] == pytest.approx(statistics.stdev([0.70, 0.80]))  # n - 1: 0.0707, not 0.05
    assert prompt["metrics"]["macro_f1"] == {
        "mean": pytest.approx(0.65),
        "sd": pytest.approx(0.0707, abs=1e-4),
    }
    assert set(prompt["metrics"]) == {"accuracy", "macro_f1"}  # n, labels, confusion are not scores


def test_summary_single_seed_has_no_sd():
    zero_shot = row(summarize(CELLS, META), "zero-shot", "16")
    assert zero_shot["mean"] == pytest.approx(0.55)
    assert zero_shot["sd"] is None


def test_summary_averages_timings_and_takes_sizes_and_chosen_lr():
    prompt = row(summarize(CELLS, META), "prompt", "16")
    assert prompt["train_seconds"] == pytest.approx(10.5)
    assert prompt["eval_examples_per_s"] == pytest.approx(200.0)
    assert (prompt["trainable_params"], prompt["saved_params"], prompt["artifact_bytes"]) == (
        2048,
        2048,
        9000,
    )
    assert (prompt["train_rows"], prompt["examples_seen"], prompt["base_unchanged"]) == (16, 320, True)
    assert prompt["lr"] == 0.3
    assert row(summarize(CELLS, META), "zero-shot", "16")["lr"] is None


def test_summary_lr_is_the_one_the_search_chose():
    rows = summarize(CELLS, META | {"chosen_lr": {"prompt": 0.1}})
    assert row(rows, "prompt", "16")["lr"] == 0.1


def test_summary_search_cells_are_not_seeds():
    prompt = row(summarize(CELLS, META), "prompt", "16")
    assert (prompt["seeds_done"], prompt["seeds_planned"], prompt["status"]) == (2, 2, "done")


def test_summary_over_budget_seed_is_left_out_and_counted_in_status():
    lora = row(summarize(CELLS, META), "lora", "16")
    assert lora["status"] == "over budget (1 of 2 seeds done)"
    assert (lora["mean"], lora["sd"]) == (pytest.approx(0.82), None)


def test_summary_failed_setting_keeps_its_row_with_first_error_and_no_numbers():
    lora = row(summarize(CELLS, META), "lora", "all")
    assert lora["status"] == "failed: CUDA out of memory"
    assert lora["seeds_done"] == 0
    assert lora["mean"] is None and lora["trainable_params"] is None and lora["train_seconds"] is None


# ---------------------------------------------------------------------------------------- markdown


def test_markdown_intro_states_the_settings(report):
    md = (report[0] / "report.md").read_text()
    assert md.startswith("# Compare: sst2 on tiny-llama\n")
    assert "40 steps at batch size 8" in md and "sst2/test.jsonl, 1821 rows" in md
    assert "sst2/dev.jsonl, 200 rows" in md and "Seeds: 0, 1" in md
    assert "Time budget: 10m 00s" in md and "comparison: 20m 34s" in md


def test_markdown_shows_accuracy_as_percent_with_sd(report):
    md = (report[0] / "report.md").read_text()
    assert "accuracy (%)" in md
    assert "| prompt | 16 | 75.0 ± 7.1 | 2/2 |" in md
    assert "| zero-shot | 16 | 55.0 | 1/1 |" in md


def test_markdown_lists_over_budget_and_failed_settings(report):
    md = (report[0] / "report.md").read_text()
    assert "over budget (1 of 2 seeds done)" in md
    assert "failed: CUDA out of memory" in md
    assert "Traceback" not in md  # only the first line of the error


def test_markdown_has_the_learning_rate_search_table(report):
    md = (report[0] / "report.md").read_text()
    search_part = md.split("## Learning-rate search", 1)[1]
    assert "| prompt | 16 | 0.03 | 61.0 |  | done |" in search_part
    assert "| prompt | 16 | 0.3 | 74.0 | ✓ | done |" in search_part


def test_markdown_links_png_figures_that_exist(report):
    out = report[0]
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (out / "report.md").read_text())
    assert links == ["learning_curves.png", "metric_vs_shots.png", "confusion.png"]
    for link in links:
        assert (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_escapes_pipes_in_table_cells(tmp_path):
    cells = [cell("prompt", "16", 0, None, status="failed", error="bad | value")]
    write_report(tmp_path, cells, META)
    assert "failed: bad \\| value |" in (tmp_path / "report.md").read_text()


# -------------------------------------------------------------------------------------------- html


def test_html_embeds_every_figure_as_a_data_uri(report):
    page = (report[0] / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3


def test_html_needs_no_other_file_or_network(report):
    page = (report[0] / "report.html").read_text()
    assert 'src="http' not in page
    assert ".png" not in page
    assert "<link" not in page and "<script" not in page


def test_html_escapes_text_from_the_cells(tmp_path):
    cells = [cell("prompt", "16", 0, None, status="failed", error="<script>alert(1)</script>")]
    write_report(tmp_path, cells, META)
    page = (tmp_path / "report.html").read_text()
    assert "<script>" not in page
    assert "failed: &lt;script&gt;alert(1)&lt;/script&gt;" in page


# -------------------------------------------------------------------------------------------- json


def test_report_json_round_trips_with_raw_fractions(report):
    out, rows = report
    saved = json.loads((out / "report.json").read_text())
    assert saved == {"meta": META, "summary": rows, "cells": CELLS}
    assert row(saved["summary"], "prompt", "16")["mean"] == pytest.approx(0.75)  # a fraction, not 75


# ----------------------------------------------------------------------------- figures and variants


def test_figures_without_data_are_skipped_and_not_linked(tmp_path):
    (tmp_path / "confusion.png").write_bytes(b"stale")
    cells = [cell("zero-shot", "16", 0, 0.5, test={"n": 10, "accuracy": 0.5})]  # no curve, no matrix
    write_report(tmp_path, cells, META)
    md = (tmp_path / "report.md").read_text()
    assert re.findall(r"\]\(([^)]+\.png)\)", md) == ["metric_vs_shots.png"]
    assert not (tmp_path / "learning_curves.png").exists()
    assert not (tmp_path / "confusion.png").exists()


def test_report_with_no_finished_cell_still_writes_every_file(tmp_path):
    stopped = cell("prompt", "16", 0, None, status="over_budget", curve=[])
    rows = write_report(tmp_path, [stopped], META)
    assert rows[0]["status"] == "over budget (0 of 1 seeds done)"
    assert "![" not in (tmp_path / "report.md").read_text()
    assert "data:image/png" not in (tmp_path / "report.html").read_text()


def test_generation_scores_are_already_percent_and_have_no_confusion_figure(tmp_path):
    meta = META | {"kind": "generation", "metric": "bleu", "methods": ["prompt"], "shots": ["16"]}
    cells = [
        cell("prompt", "16", s, None, metric="bleu", test={"n": 5, "bleu": b, "chrf": 50.0})
        for s, b in ((0, 20.0), (1, 30.0))
    ]
    rows = write_report(tmp_path, cells, meta)
    md = (tmp_path / "report.md").read_text()
    assert rows[0]["mean"] == pytest.approx(25.0)
    assert "| prompt | 16 | 25.0 ± 7.1 |" in md and "| bleu |" in md
    assert not (tmp_path / "confusion.png").exists()


def many_labels(n: int) -> dict:
    matrix = [[5 if i == j else 0 for j in range(n)] for i in range(n)]
    return {"n": 5 * n, "accuracy": 1.0, "labels": [f"intent_{i}" for i in range(n)], "confusion": matrix}


def test_confusion_figure_draws_77_labels(tmp_path):
    write_report(tmp_path, [cell("prompt", "16", 0, 1.0, test=many_labels(77))], META)
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_confusion_matrix_with_many_labels_drops_tick_labels():
    fig, (few, many) = plt.subplots(1, 2)
    _draw_confusion(few, many_labels(2))
    _draw_confusion(many, many_labels(77))
    assert [t.get_text() for t in few.get_xticklabels()] == ["intent_0", "intent_1"]
    assert many.get_xticklabels() == [] and many.get_yticklabels() == []
    plt.close(fig)


# ----------------------------------------------------------------------------------------- console


def test_console_table_has_one_line_per_row_and_shows_status(report):
    rows = report[1]
    table = console_table(rows, META)
    assert table.row_count == len(rows)
    console = Console(record=True, width=400, file=io.StringIO())
    console.print(table)
    text = console.export_text()
    assert "75.0 ± 7.1" in text and "failed: CUDA out of memory" in text


def test_notes_name_each_trained_setting_below_zero_shot(tmp_path):
    cells = [cell("zero-shot", "16", 0, 0.72), cell("prompt", "16", 0, 0.68), cell("prompt", "16", 1, 0.74),
             cell("lora", "16", 0, 0.71), cell("lora", "16", 1, 0.85)]
    write_report(tmp_path, cells, META | {"shots": ["16"]})
    notes = (tmp_path / "report.md").read_text().split("## Notes", 1)[1]
    assert "prompt (16 per label) scored 71.0, below zero-shot's 72.0" in notes  # the mean of 68 and 74
    assert "lora" not in notes  # its mean, 78.0, is above


def test_the_report_says_how_many_test_rows_each_cell_scores_and_that_cell_times_overlap(tmp_path):
    from types import SimpleNamespace

    from softprompt.compare.grid import Plan, _report_limit, _rows_text
    from softprompt.compare.report import _intro

    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"text": str(i), "label": "a"}) + "\n" for i in range(5)))
    spec = SimpleNamespace(train=SimpleNamespace(report_limit=3))
    plan = Plan(task=tmp_path / "t.yaml", out=tmp_path, methods=[], shots=["16"], seeds=[0], steps=1, test=path, budget_s=None)
    assert _rows_text(path, _report_limit(plan, spec)) == f"{path} (5 rows, of which each cell scores a seeded, label-stratified 3)"
    plan.extra = ("--report-limit=2",)  # the command line's flag wins
    assert _report_limit(plan, spec) == 2
    assert _rows_text(path, None) == _rows_text(path, 9) == f"{path} (5 rows)"
    assert "summed over cells, up to 2 of which ran at once" in _intro({"jobs": 2, "wall_seconds": 60})
    assert "summed" not in _intro({"jobs": 1, "wall_seconds": 60})

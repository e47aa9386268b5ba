"""The task doctor: each check fires on a task that has its problem, and a clean task has none."""

import json
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from softprompt.cli import app
from softprompt.doctor import chance_finding, diagnose
from softprompt.task import make_task
from softprompt.taskfile import TaskSpec, load_task
from softprompt.train import train

from helpers import write_task

runner = CliRunner()
TEMPLATE = "{soft:4} Review: {text} Sentiment: {label}"
CLEAN_WORDS = "{positive: [code], negative: [Sentiment]}"  # one token each in the tiny tokenizer


def rows(label: str, n: int, tag: str = "train") -> list[dict]:
    word = "lovely" if label == "positive" else "dull"
    return [{"text": f"a {word} film, {tag} review {i}", "label": label} for i in range(n)]


def write_rows(path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_task_file(
    folder,
    model_dir,
    template: str = TEMPLATE,
    verbalizer: str = CLEAN_WORDS,
    train_rows: list[dict] | None = None,
    dev_rows: list[dict] | None = None,
    data: str = "",
    settings: str = "steps: 8, batch_size: 4",
    top: str = "",
):
    """A task whose rows are all distinct (10 per label in train): clean unless told otherwise."""
    write_rows(folder / "train.jsonl", train_rows or rows("positive", 10) + rows("negative", 10))
    write_rows(folder / "dev.jsonl", dev_rows or rows("positive", 5, "dev") + rows("negative", 5, "dev"))
    task = folder / "task.yaml"
    task.write_text(
        f"model: {model_dir}\n"
        f"template: '{template}'\n"
        f"verbalizer: {verbalizer}\n"
        f"data: {{train: train.jsonl, dev: dev.jsonl{data}}}\n"
        f"train: {{{settings}}}\n{top}"
    )
    return task


def findings_for(task_path, backbone, zero_shot: bool = False):
    return diagnose(make_task(load_task(task_path), backbone), backbone, zero_shot=zero_shot)


def codes(findings) -> set[str]:
    return {f.code for f in findings}


def only(findings, code: str):
    found = [f for f in findings if f.code == code]
    assert len(found) == 1, findings
    return found[0]


def test_a_clean_task_has_no_findings(tmp_path, tiny_model_dir, tiny_backbone):
    assert findings_for(make_task_file(tmp_path, tiny_model_dir), tiny_backbone) == []


def test_label_words_of_different_labels_sharing_a_first_token_are_flagged(tmp_path, tiny_model_dir, tiny_backbone):
    task = make_task_file(tmp_path, tiny_model_dir, verbalizer="{positive: [positive], negative: [positivo]}")
    finding = only(findings_for(task, tiny_backbone), "shared_first_token")
    assert "'positive' (positive)" in finding.message and "'positivo' (negative)" in finding.message
    assert finding.level == "warn" and "first token differs" in finding.fix


def test_words_of_one_label_may_share_a_first_token(tmp_path, tiny_model_dir, tiny_backbone):
    task = make_task_file(tmp_path, tiny_model_dir, verbalizer="{positive: [positive, positivo], negative: [code]}")
    assert "shared_first_token" not in codes(findings_for(task, tiny_backbone))


def test_label_words_of_many_tokens_are_flagged(tmp_path, tiny_model_dir, tiny_backbone):
    task = make_task_file(tmp_path, tiny_model_dir, verbalizer="{positive: [supercalifragilistic], negative: [code]}")
    finding = only(findings_for(task, tiny_backbone), "long_label_words")
    assert re.search(r"'supercalifragilistic' \(\d+ tokens\)", finding.message)
    assert "code" not in finding.message and "shorter label words" in finding.fix


@pytest.mark.skipif("label_scores" not in TaskSpec.model_fields, reason="the task has no label_scores setting yet")
def test_long_label_words_are_no_handicap_with_mean_label_scores(tmp_path, tiny_model_dir, tiny_backbone):
    task = make_task_file(
        tmp_path, tiny_model_dir, verbalizer="{positive: [supercalifragilistic], negative: [code]}", top="label_scores: mean\n"
    )
    assert "long_label_words" not in codes(findings_for(task, tiny_backbone))


def test_label_words_sharing_a_first_token_or_long_are_not_flagged_with_one_vector_per_label(
    tmp_path, tiny_model_dir, tiny_backbone
):
    """per_label reads each label by its own vector at the slot, not by its words' tokens."""
    task = make_task_file(
        tmp_path, tiny_model_dir, verbalizer="{positive: [supercalifragilistic], negative: [supercalifornia]}",
        top="label_vectors: per_label\n",
    )
    assert not codes(findings_for(task, tiny_backbone)) & {"shared_first_token", "long_label_words"}


def test_a_label_slot_before_the_input_is_flagged(tmp_path, tiny_model_dir, tiny_backbone):
    task = make_task_file(tmp_path, tiny_model_dir, template="{soft:4} Sentiment: {label}. Review: {text}")
    finding = only(findings_for(task, tiny_backbone), "label_before_input")
    assert "put {label} last" in finding.fix and "{text}" in finding.fix


def test_imbalanced_training_labels_are_flagged(tmp_path, tiny_model_dir, tiny_backbone):
    task = make_task_file(tmp_path, tiny_model_dir, train_rows=rows("positive", 40) + rows("negative", 10))
    findings = findings_for(task, tiny_backbone)
    finding = only(findings, "imbalance")
    assert "'positive' has 36 rows, 'negative' 9 (4.0x fewer rows)" in finding.message  # after validation's 5
    assert "--shots" in finding.fix and "few_rows_per_label" not in codes(findings)


def test_labels_with_few_training_rows_are_flagged(tmp_path, tiny_model_dir, tiny_backbone):
    task = make_task_file(tmp_path, tiny_model_dir, train_rows=rows("positive", 4) + rows("negative", 4))
    finding = only(findings_for(task, tiny_backbone), "few_rows_per_label")
    assert "'positive' (3)" in finding.message and "'negative' (4)" in finding.message


def test_cut_inputs_are_flagged_with_a_budget_that_fits_every_row(tmp_path, tiny_model_dir, tiny_backbone):
    task = make_task_file(tmp_path, tiny_model_dir, settings="steps: 8, batch_size: 4, max_length: 16")
    cut = [f for f in findings_for(task, tiny_backbone) if f.code == "cut_inputs"]
    assert {f.message.split(" rows ")[0].split()[-1] for f in cut} == {"train", "validation", "dev"}
    assert all(f.level == "warn" and "were cut to fit train.max_length 16" in f.message for f in cut)
    need = int(re.search(r"raise train.max_length to (\d+)", cut[0].fix).group(1))
    fixed = make_task_file(tmp_path, tiny_model_dir, settings=f"steps: 8, batch_size: 4, max_length: {need}")
    assert "cut_inputs" not in codes(findings_for(fixed, tiny_backbone))


def test_a_step_budget_of_many_passes_is_flagged_with_steps_that_fit(tmp_path, tiny_model_dir, tiny_backbone):
    task = make_task_file(tmp_path, tiny_model_dir, settings="steps: 500, batch_size: 4")
    finding = only(findings_for(task, tiny_backbone), "too_many_passes")
    assert "read the 18 training rows 111 times" in finding.message
    steps = re.search(r"--steps (\d+)", finding.fix).group(1)
    fixed = make_task_file(tmp_path, tiny_model_dir, settings=f"steps: {steps}, batch_size: 4")
    assert "too_many_passes" not in codes(findings_for(fixed, tiny_backbone))


def test_a_method_that_trains_nothing_gets_no_step_budget_check(tmp_path, tiny_model_dir, tiny_backbone):
    task = make_task(load_task(make_task_file(tmp_path, tiny_model_dir, settings="steps: 500, batch_size: 4")), tiny_backbone)
    assert "too_many_passes" not in codes(diagnose(task, tiny_backbone, trains=False))


def test_dev_rows_repeating_training_inputs_are_flagged_with_their_lines(tmp_path, tiny_model_dir, tiny_backbone):
    dev = rows("positive", 5, "dev") + rows("negative", 5, "dev")
    dev[2]["text"] = "  A LOVELY film,   train review 7 "  # train.jsonl:8 once case and spaces are ignored
    task = make_task_file(tmp_path, tiny_model_dir, dev_rows=dev)
    finding = only(findings_for(task, tiny_backbone), "duplicates")
    assert re.search(r"1 of 10 dev rows repeat a training input: \S*dev\.jsonl:3 = \S*train\.jsonl:8;", finding.message)
    assert "dev.jsonl" in finding.fix


def test_test_file_rows_repeating_training_inputs_are_flagged(tmp_path, tiny_model_dir, tiny_backbone):
    write_rows(tmp_path / "test.jsonl", rows("negative", 2) + rows("negative", 3, "test"))
    task = make_task_file(tmp_path, tiny_model_dir, data=", test: test.jsonl")
    finding = only(findings_for(task, tiny_backbone), "duplicates")
    assert finding.message.startswith("2 of 5 test rows") and "test.jsonl:1 = " in finding.message


def test_zero_shot_of_a_random_model_is_at_chance(tmp_path, tiny_model_dir, tiny_backbone):
    write_rows(tmp_path / "val.jsonl", rows("positive", 20, "val") + rows("negative", 20, "val"))
    task = make_task_file(tmp_path, tiny_model_dir, data=", validation: val.jsonl")
    finding = only(findings_for(task, tiny_backbone, zero_shot=True), "zero_shot_at_chance")
    assert "on 40 validation rows is at chance (50.0%" in finding.message
    assert "--model gemma3-270m" in finding.fix


def test_zero_shot_is_at_chance_up_to_five_points_above_the_larger_of_uniform_and_majority():
    balanced = ["a"] * 50 + ["b"] * 50
    assert chance_finding(0.55, balanced, 2, "default") and not chance_finding(0.56, balanced, 2, "default")
    skewed = ["a"] * 80 + ["b"] * 20
    assert chance_finding(0.85, skewed, 2, "default") and not chance_finding(0.86, skewed, 2, "default")
    assert chance_finding(0.30, ["a", "b", "c"] * 10, 3, "default")  # 1/3 + 5 points
    assert "--model gemma3-270m" not in chance_finding(0.5, balanced, 2, "gemma3-270m")[0].fix
    assert "--model gemma3-270m" not in chance_finding(0.5, balanced, 2, "default")[0].fix  # the default is gemma
    assert "--model gemma3-270m" in chance_finding(0.5, balanced, 2, "smollm2-135m")[0].fix


def test_a_generation_task_gets_the_checks_that_apply(tmp_path, tiny_model_dir, tiny_backbone):
    train_rows = [{"text": f"def f{i}(a): return a", "target": f"function {i}"} for i in range(20)]
    dev_rows = train_rows[:3] + [{"text": f"def g{i}(): pass", "target": "nothing"} for i in range(3)]
    write_rows(tmp_path / "train.jsonl", train_rows)
    write_rows(tmp_path / "dev.jsonl", dev_rows)
    task = tmp_path / "task.yaml"
    task.write_text(
        f"model: {tiny_model_dir}\ntemplate: '{{soft:4}} Code: {{text}} Summary: {{target}}'\n"
        "data: {train: train.jsonl, dev: dev.jsonl}\ntrain: {steps: 500, batch_size: 4}\n"
    )
    assert codes(findings_for(task, tiny_backbone, zero_shot=True)) == {"duplicates", "too_many_passes"}


def test_train_prints_the_doctors_findings_and_each_cut_once(tmp_path, tiny_model_dir, tiny_backbone):
    task = make_task_file(tmp_path, tiny_model_dir, verbalizer="{positive: [positive], negative: [positivo]}")
    spec = load_task(task, {"steps": 1, "max_length": 16})
    console = Console(record=True, width=400, file=open("/dev/null", "w"))
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=console, baselines=False, report=False)
    text = console.export_text()
    assert text.count("were cut to fit") == 3  # train, validation, dev
    assert text.count("start with the same token") == 1 and "Fix: pick label words" in text


def test_cli_doctor_warns_with_fixes_and_exits_1(tmp_path, tiny_model_dir):
    task = write_task(tmp_path, tiny_model_dir)  # its dev rows are its training rows
    result = runner.invoke(app, ["doctor", str(task)], terminal_width=400)
    assert result.exit_code == 1, result.output
    assert re.search(r"warning: 10 of 10 dev rows repeat a training input: \S*dev\.jsonl:1 = \S*train\.jsonl:1", result.output)
    assert "Fix: remove them from" in result.output and "(duplicates)" in result.output
    assert re.search(r"task\.yaml: \d+ warnings", result.output)


def test_cli_doctor_on_a_clean_task_exits_0(tmp_path, tiny_model_dir):
    task = make_task_file(tmp_path, tiny_model_dir)
    task.write_text(task.read_text().replace(f"model: {tiny_model_dir}", f"model: {tmp_path / 'no-such-model'}"))
    result = runner.invoke(app, ["doctor", str(task), "--model", str(tiny_model_dir), "--no-zero-shot"], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert f"no problems found (classification; 18 train, 2 validation, 10 dev rows; model {tiny_model_dir})" in result.output


def test_cli_doctor_names_a_bad_data_line_and_exits_2(tmp_path, tiny_model_dir):
    task = make_task_file(tmp_path, tiny_model_dir)
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write('{"text": "fine"}\n')
    result = runner.invoke(app, ["doctor", str(task)], terminal_width=400)
    assert result.exit_code == 2
    assert "train.jsonl:21: missing field 'label'" in result.output


def _generation_task_with_pass_rate(folder, model_dir, metrics: str = "[chrf, parse_rate, pass_rate]"):
    test = "const assert = require('node:assert');\nassert.deepEqual(f(1), 1);\n"
    train_rows = [{"text": f"def f{i}(a): return a", "target": f"function f{i}(a) {{ return a; }}", "tests": test} for i in range(20)]
    dev_rows = [{"text": f"def g{i}(): pass", "target": f"function g{i}() {{}}", "tests": test} for i in range(3)]
    write_rows(folder / "train.jsonl", train_rows)
    write_rows(folder / "dev.jsonl", dev_rows)
    task = folder / "task.yaml"
    task.write_text(
        f"model: {model_dir}\ntemplate: '{{soft:4}} Python: {{text}} JavaScript: {{target}}'\n"
        "data: {train: train.jsonl, dev: dev.jsonl, tests: tests}\n"
        f"generation: {{metrics: {metrics}, language: javascript}}\ntrain: {{steps: 8, batch_size: 4}}\n"
    )
    return task


def test_a_task_whose_metrics_run_node_gets_a_warning_when_node_is_missing(tmp_path, tiny_model_dir, tiny_backbone, monkeypatch):
    task = _generation_task_with_pass_rate(tmp_path, tiny_model_dir)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    finding = only(findings_for(task, tiny_backbone), "node_missing")
    assert finding.level == "warn" and "parse_rate, pass_rate run the generated JavaScript with node" in finding.message
    assert "apt-get install nodejs" in finding.fix
    only_parse = _generation_task_with_pass_rate(tmp_path, tiny_model_dir, "[chrf, parse_rate]")
    assert only(findings_for(only_parse, tiny_backbone), "node_missing").level == "info"  # left out, no failure


@pytest.mark.skipif(not __import__("shutil").which("node"), reason="node not installed")
def test_a_task_whose_metrics_run_node_gets_no_node_finding_where_node_is_installed(tmp_path, tiny_model_dir, tiny_backbone):
    task = _generation_task_with_pass_rate(tmp_path, tiny_model_dir)
    assert "node_missing" not in codes(findings_for(task, tiny_backbone))

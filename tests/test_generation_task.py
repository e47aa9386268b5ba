import json

import pytest
from typer.testing import CliRunner

from softprompt.cli import app
from softprompt.codecheck import node_available

runner = CliRunner()
PAIRS = [
    ("def add(a, b): return a + b", "function add(a, b) { return a + b; }"),
    ("def sub(a, b): return a - b", "function sub(a, b) { return a - b; }"),
    ("def neg(a): return -a", "function neg(a) { return -a; }"),
    ("def one(): return 1", "function one() { return 1; }"),
]
TESTS = {
    "add": "const assert = require('node:assert');\nassert.deepStrictEqual(add(2, 3), 5);\n",
    "sub": "const assert = require('node:assert');\nassert.deepStrictEqual(sub(2, 3), -1);\n",
    "neg": "const assert = require('node:assert');\nassert.deepStrictEqual(neg(2), -2);\n",
    "one": "const assert = require('node:assert');\nassert.deepStrictEqual(one(), 1);\n",
}


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("gen")
    rows = [{"code": p, "js": j, "tests": TESTS[p.split()[1].split("(")[0]]} for p, j in PAIRS]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = folder / "task.yaml"
    task.write_text(
        f"model: {tiny_model_dir}\n"
        "template: '{soft:4} Python: {code} JavaScript: {target}'\n"
        "data: {train: train.jsonl, dev: dev.jsonl, target: js, tests: tests, validation_fraction: 0.25}\n"
        "generation: {metrics: [chrf, bleu, parse_rate, pass_rate], language: javascript, max_new_tokens: 12}\n"
        "train: {steps: 4, batch_size: 4, lr: 0.3, eval_every: 2, eval_limit: 3}\n"
    )
    result = runner.invoke(app, ["train", str(task), "--out", str(folder / "run")])
    assert result.exit_code == 0, result.output
    return folder


def test_generation_run_records_the_task_metric_and_dev_predictions(gen_run):
    info = json.loads((gen_run / "run" / "task.json").read_text())
    assert info["kind"] == "generation"
    assert info["training"]["metric"] == "chrf"
    assert {"chrf", "bleu", "n"} <= set(info["metrics"]["validation"]["zero_shot"])
    assert info["metrics"]["validation"]["zero_shot"]["n"] == 3  # eval_limit validation rows, from train
    assert info["metrics"]["dev"]["n"] == 4 and info["metrics"]["dev_zero_shot"]["n"] == 4
    for name in ("dev_predictions.jsonl", "dev_zero_shot_predictions.jsonl"):
        rows = [json.loads(x) for x in (gen_run / "run" / name).read_text().splitlines()]
        assert len(rows) == 4 and {"prediction", "reference", "source"} <= set(rows[0])


def test_inputs_reach_the_model_whole_in_training_and_in_use(gen_run, tiny_backbone):
    """The default budgets leave every input whole (the target has its own budget); training rows,
    validation rows and rows in use render the same input text."""
    from softprompt.artifact import load_run
    from softprompt.task import make_task
    from softprompt.taskfile import load_task

    task = make_task(load_task(gen_run / "task.yaml"), tiny_backbone)
    for role in ("train", "validation", "dev"):
        rows, examples = task.rows[role], getattr(task.splits, role)
        assert rows.encoded.truncated == 0
        for body, example in zip(rows.encoded.bodies, examples):
            assert example.fields["code"] in tiny_backbone.tokenizer.decode(body)
    generator, _ = load_run(gen_run / "run", tiny_backbone)
    in_use = generator.encode([e.fields for e in task.splits.dev])
    assert in_use.encoded.bodies == task.rows["dev"].encoded.bodies


@pytest.mark.skipif(not node_available(), reason="node not installed")
def test_eval_scores_execution_and_writes_per_row_predictions(gen_run):
    out = gen_run / "preds.jsonl"
    result = runner.invoke(
        app, ["eval", str(gen_run / "run"), "--data", str(gen_run / "dev.jsonl"), "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert report["n"] == 4 and len(rows) == 4
    assert report["pass_rate"] == 100 * sum(r["passed"] for r in rows) / 4
    assert report["parse_rate"] == 100 * sum(r["parses"] for r in rows) / 4


@pytest.mark.skipif(not node_available(), reason="node not installed")
def test_a_correct_javascript_answer_passes_its_tests_and_a_wrong_one_fails():
    from softprompt.data import Example
    from softprompt.task import score_generations
    from softprompt.taskfile import GenerationSpec

    examples = [
        Example({"code": p}, j, f"dev.jsonl:{i + 1}", {"tests": TESTS[p.split()[1].split("(")[0]]})
        for i, (p, j) in enumerate(PAIRS[:2])
    ]
    right = PAIRS[0][1]  # add, exactly the reference
    wrong = "function sub(a, b) { return a + b; }"  # parses, but sub(2, 3) is not -1
    spec = GenerationSpec(metrics=["pass_rate", "parse_rate"], language="javascript")
    report = score_generations([right, wrong], examples, spec, "tests")
    assert [r["passed"] for r in report["rows"]] == [True, False]
    assert report["pass_rate"] == 50.0 and report["parse_rate"] == 100.0


def test_predict_writes_the_generators_own_answers_for_a_file(gen_run, tiny_backbone):
    out = gen_run / "answers.jsonl"
    result = runner.invoke(
        app,
        [
            "predict",
            str(gen_run / "run"),
            "--input",
            str(gen_run / "dev.jsonl"),
            "--out",
            str(out),
            "--num-beams",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    from softprompt.artifact import load_run
    from softprompt.generate import DecodeConfig

    generator, _ = load_run(gen_run / "run", tiny_backbone)
    inputs = [{"code": r["code"]} for r in rows]
    expected = generator.generate(generator.encode(inputs), DecodeConfig(max_new_tokens=12, num_beams=2))
    assert [r["prediction"] for r in rows] == expected


def test_eval_reads_renamed_columns_with_column_options(gen_run):
    """A held-out file with other column names (like py2js/exec.jsonl) scores as the original."""
    original = [json.loads(x) for x in (gen_run / "dev.jsonl").read_text().splitlines()]
    renamed = [{"python": r["code"], "reference": r["js"], "checks": r["tests"]} for r in original]
    (gen_run / "renamed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in renamed))

    def scores(data: str, *extra: str) -> dict:
        result = runner.invoke(app, ["eval", str(gen_run / "run"), "--data", data, "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.strip().splitlines()[-1])

    mapping = ["--column", "code=python", "--column", "target=reference", "--column", "tests=checks"]
    assert scores(str(gen_run / "renamed.jsonl"), *mapping) == scores(str(gen_run / "dev.jsonl"))

    missing = runner.invoke(app, ["eval", str(gen_run / "run"), "--data", str(gen_run / "renamed.jsonl")])
    assert missing.exit_code != 0 and "renamed.jsonl:1" in missing.output and "'code'" in missing.output
    wrong = runner.invoke(
        app, ["eval", str(gen_run / "run"), "--data", str(gen_run / "renamed.jsonl"), "--column", "text=python"]
    )
    assert wrong.exit_code != 0 and "not a template field" in wrong.output

"""The `linear-probe` baseline: its features are the frozen model's hidden states of the text without
soft tokens, its head separates what is separable, a saved run answers exactly as the trained one did
(train, eval, predict), compare reports it with its parameters and cost, and what it cannot do
(generation, serving) is refused with the reason."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from softprompt.artifact import load_run
from softprompt.cli import app
from softprompt.methods import MethodError, method_class
from softprompt.methods.linear_probe import PROBE_FILE, ProbeClassifier, fit_head, pooled_features
from softprompt.run import RunInfo
from softprompt.taskfile import TaskError, load_task
from softprompt.train import _task_for, train

from helpers import quiet, write_task

PROBE = method_class("linear-probe")


def probe_task(tmp_path, backbone):
    """The toy sentiment task rendered for the probe (its file's template has {soft:4}), probe fitted."""
    spec = load_task(write_task(tmp_path, backbone.spec))
    task, _ = _task_for(spec, PROBE, backbone)
    method = PROBE.build(task, backbone)
    task.use_method(method)
    return spec, task, method


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_features_are_the_frozen_model_s_hidden_states_of_the_text_without_soft_tokens(pooling, tmp_path, any_backbone):
    """Against a plain forward of the base model on the rendered ids (Gemma: BOS, sliding windows)."""
    before = {n: p.detach().clone() for n, p in any_backbone.model.named_parameters()}
    _, task, method = probe_task(tmp_path, any_backbone)
    assert task.template.soft_tokens == 0 and set(method.trainable()) == {"weight", "bias"}
    rows = task.rows["dev"]
    features = pooled_features(task.model, rows, pooling)
    encoded = rows.encoded
    for i in range(len(rows)):
        ids = encoded.prefix + encoded.bodies[i] + encoded.afters[i]
        assert min(ids) >= 0  # no soft token anywhere in the row
        with torch.no_grad():
            hidden = any_backbone.body(input_ids=torch.tensor([ids])).last_hidden_state[0].float()
        own = hidden[len(encoded.prefix):]  # the row's own tokens, after the shared prefix
        expected = own[-1] if pooling == "last" else own.mean(0)
        torch.testing.assert_close(features[i], expected, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in any_backbone.model.named_parameters())  # frozen


@pytest.mark.parametrize("labels", [2, 3])
def test_the_folded_head_is_scikit_learn_s_standardized_logistic_regression_and_separates_a_separable_task(labels):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    generator = torch.Generator().manual_seed(0)
    y = torch.arange(labels).repeat(12)
    centres = 4 * torch.randn(labels, 16, generator=generator)
    x = centres[y] + torch.randn(len(y), 16, generator=generator) * torch.linspace(0.1, 3, 16)
    head = fit_head(x, y, [f"l{k}" for k in range(labels)], "last")
    probs = head.probabilities(x)
    assert probs.shape == (len(y), labels) and torch.equal(probs.argmax(-1), y)  # 100% on the training rows
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(x.double().numpy(), y.numpy())
    np.testing.assert_allclose(probs.numpy(), reference.predict_proba(x.double().numpy()), atol=1e-5)


def test_the_probe_learns_the_toy_task_to_100_percent_with_hidden_times_labels_plus_labels_parameters(tmp_path, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_backbone.spec))
    info = train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), method="linear-probe")
    hidden = tiny_backbone.hidden_size
    assert info.metrics["dev"]["accuracy"] == 1.0 and info.metrics["validation"]["kept"]["accuracy"] == 1.0
    assert info.metrics["trainable_parameters"] == info.metrics["saved_parameters"] == hidden * 2 + 2
    assert info.metrics["steps"] == 0 and info.metrics["train_seconds"] > 0  # the fit is its training time
    model, _ = load_run(tmp_path / "run", tiny_backbone)
    examples = list(_task_for(spec, PROBE, tiny_backbone)[0].splits.train)
    predicted = model.predict_proba(model.encode([e.fields for e in examples])).argmax(-1)
    assert [model.labels[k] for k in predicted] == [str(e.label) for e in examples]


def test_a_saved_probe_run_reloads_and_predicts_exactly_as_trained(tmp_path, tiny_backbone):
    spec, task, _ = probe_task(tmp_path, tiny_backbone)
    trained = task.model.predict_proba(task.rows["dev"])
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), method="linear-probe", baselines=False)
    tensors = load_file(str(tmp_path / "run" / PROBE_FILE))
    assert {k: list(v.shape) for k, v in tensors.items()} == {"weight": [2, tiny_backbone.hidden_size], "bias": [2]}
    assert RunInfo.read(tmp_path / "run").method_settings["pooling"] == "last"
    loaded, _ = load_run(tmp_path / "run", tiny_backbone)
    assert isinstance(loaded, ProbeClassifier)
    assert torch.equal(loaded.predict_proba(task.rows["dev"]), trained)


def test_eval_and_predict_on_a_probe_run_answer_with_its_head(tmp_path, tiny_backbone):
    spec, task, _ = probe_task(tmp_path, tiny_backbone)
    info = train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), method="linear-probe", baselines=False)
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--data", str(tmp_path / "dev.jsonl"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["confusion"] == info.metrics["dev"]["confusion"]
    out = tmp_path / "preds.jsonl"
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), "--input", str(tmp_path / "dev.jsonl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    probs = task.model.predict_proba(task.rows["dev"])
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["label"] for p in predicted] == [task.model.labels[k] for k in probs.argmax(-1)]
    torch.testing.assert_close(torch.tensor([list(p["probabilities"].values()) for p in predicted]), probs)


def test_compare_lists_the_probe_with_its_parameters_time_and_memory(tmp_path, tiny_model_dir, tiny_backbone):
    task = write_task(tmp_path, tiny_model_dir)
    args = ["compare", str(task), "--out", str(tmp_path / "report"), "--methods", "zero-shot,linear-probe",
            "--shots", "2", "--seeds", "0", "--steps", "2", "--test", str(tmp_path / "dev.jsonl")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert not [c for c in data["cells"] if c["stage"] == "search"]  # nothing to search
    row = next(r for r in data["summary"] if r["method"] == "linear-probe")
    assert row["status"] == "done" and row["lr"] is None and row["base_unchanged"] is True
    assert row["trainable_params"] == row["saved_params"] == 2 * tiny_backbone.hidden_size + 2
    assert row["train_seconds"] > 0 and row["peak_rss_mb"] > 0 and row["artifact_bytes"] > 0
    assert row["mean"] is not None
    report = (tmp_path / "report" / "report.md").read_text()
    assert "linear-probe" in report and "logistic regression (C=1) on the last token's hidden state" in report


def generation_task(tmp_path, model_dir):
    rows = [{"code": "def add(a, b): return a + b", "js": "function add(a, b) { return a + b; }"}] * 8
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "gen.yaml"
    task.write_text(
        f"model: {model_dir}\n"
        "template: '{soft:4} Python: {code} JavaScript: {target}'\n"
        "data: {train: train.jsonl, target: js, validation_fraction: 0.25}\n"
        "generation: {metrics: [chrf], max_new_tokens: 4}\n"
        "train: {steps: 1, batch_size: 4}\n"
    )
    return task


def test_a_generation_task_is_refused_with_the_reason(tmp_path, tiny_model_dir, tiny_backbone):
    task = generation_task(tmp_path, tiny_model_dir)
    with pytest.raises(TaskError, match="'linear-probe' is for classification tasks; .* is generation"):
        train(load_task(task), tmp_path / "run", backbone=tiny_backbone, console=quiet(), method="linear-probe")
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(app, ["train", str(task), "--out", str(tmp_path / "run"), "--method", "linear-probe"])
    assert result.exit_code == 2 and "is for classification tasks" in result.output


def test_serve_refuses_a_probe_run_and_says_why(tmp_path, tiny_backbone):
    from softprompt.serve.bank import BankError, TaskBank

    spec = load_task(write_task(tmp_path, tiny_backbone.spec))
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), method="linear-probe", baselines=False)
    with pytest.raises(BankError, match="its own logistic-regression head .* `softprompt predict`"):
        TaskBank(tiny_backbone, allow=[tmp_path]).load("probe", tmp_path / "run")


def test_a_label_without_training_rows_is_refused_by_name():
    with pytest.raises(MethodError, match="'neutral' has none"):
        fit_head(torch.randn(4, 8), torch.tensor([0, 1, 0, 1]), ["positive", "negative", "neutral"], "last")

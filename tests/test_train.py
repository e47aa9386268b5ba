import json

import pytest

from softprompt.artifact import load_classifier
from softprompt.backbone import Backbone
from softprompt.classify import Classifier
from softprompt.run import ArtifactError
from softprompt.task import ClassificationTask
from softprompt.taskfile import TaskError, load_task
from softprompt.template import Template
from softprompt.train import CHECKPOINT, train
from softprompt.verbalizer import Verbalizer

from helpers import NEGATIVE, POSITIVE, quiet, write_task


def log_of(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_training_writes_a_complete_run_folder(tmp_path, tiny_model_dir, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_model_dir))
    info = train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    run = tmp_path / "run"
    for name in (
        "prompt.safetensors",
        "task.json",
        "metrics.jsonl",
        "splits.json",
        "learning_curve.png",
        "confusion_matrix.png",
    ):
        assert (run / name).is_file(), name
    assert not (run / CHECKPOINT).exists()
    assert (run / "prompt.safetensors").stat().st_size < 4096
    assert info.fingerprint == tiny_backbone.fingerprint
    assert {"dev", "dev_zero_shot", "validation", "best_step", "rows"} <= set(info.metrics)
    assert set(info.metrics["validation"]) == {"zero_shot", "initial_prompt", "kept", "calibrated"}
    log = log_of(run)
    assert [h["step"] for h in log if "loss" in h] == list(range(1, 9))
    assert [h["step"] for h in log if h.get("split") == "validation" and "variant" not in h] == [2, 4, 6, 8]


def test_training_lowers_the_loss(tmp_path, tiny_model_dir, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=30))
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    losses = [h["loss"] for h in log_of(tmp_path / "run") if "loss" in h]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


def test_linear_schedule_warms_up_then_decays_to_zero(tmp_path, tiny_model_dir, tiny_backbone):
    """8 steps, warmup 25% (2 steps), peak 0.3: the rate each step actually used."""
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=8, extra=", warmup: 0.25"))
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    used = [h["lr"] for h in log_of(tmp_path / "run") if "lr" in h]
    assert used == pytest.approx([0.15, 0.3, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05])


def test_early_stopping_ends_training_after_patience_validations_without_gain(
    tmp_path, tiny_model_dir, tiny_backbone, monkeypatch
):
    monkeypatch.setattr(ClassificationTask, "validate", lambda self, progress=None: {"n": 2, "accuracy": 0.5})
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=20, extra=", patience: 3"))
    info = train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    assert info.metrics["stopped_early"] and info.metrics["steps"] == 6  # no gain at steps 2, 4, 6
    assert info.metrics["best_step"] == 0  # the initial prompt was never beaten, so it is kept
    assert max(h["step"] for h in log_of(tmp_path / "run")) == 6


def test_few_shot_trains_on_exactly_k_rows_per_label(tmp_path, tiny_model_dir, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=2, extra=", shots: 3"))
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    lines = next(iter(splits["train"]["files"].values()))
    rows = (tmp_path / "train.jsonl").read_text().splitlines()
    labels = [json.loads(rows[n - 1])["label"] for n in lines]
    assert sorted(labels) == ["negative"] * 3 + ["positive"] * 3


def test_validation_is_a_label_stratified_slice_of_train_and_the_dev_file_is_only_reported(
    tmp_path, tiny_model_dir, tiny_backbone
):
    """The training file is sorted by label (all positives first): the first rows would all be
    positive, yet the validation slice holds both labels; no row has two roles."""
    task = write_task(tmp_path, tiny_model_dir, steps=2)
    task.write_text(task.read_text().replace("data: {", "data: {validation_fraction: 0.2, "))
    rows = [{"text": t, "label": "positive"} for t in POSITIVE * 2] + [
        {"text": t, "label": "negative"} for t in NEGATIVE * 2
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = train(load_task(task), tmp_path / "run", backbone=tiny_backbone, console=quiet())
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    train_file = str(tmp_path / "train.jsonl")
    rows = (tmp_path / "train.jsonl").read_text().splitlines()
    validation = splits["validation"]["files"][train_file]
    assert sorted(json.loads(rows[n - 1])["label"] for n in validation) == ["negative"] * 2 + ["positive"] * 2
    assert not set(validation) & set(splits["train"]["files"][train_file])
    assert list(splits["dev"]["files"]) == [str(tmp_path / "dev.jsonl")]
    assert info.metrics["rows"] == {"train": 16, "validation": 4, "dev": 10}


def test_zero_shot_report_is_the_template_without_soft_tokens_on_the_dev_rows(
    tmp_path, tiny_model_dir, tiny_backbone, monkeypatch
):
    scored = []  # (template text, soft tokens, has a prompt, rows) of every dev scoring
    original = Classifier.predict  # what a report scores with: the answers, not the probabilities

    def spy(self, rows, *args, **kwargs):
        scored.append((self.template.segments, self.template.soft_tokens, self.lm.prompt is not None, len(rows)))
        return original(self, rows, *args, **kwargs)

    monkeypatch.setattr(Classifier, "predict", spy)
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=2))
    info = train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    dev = [s for s in scored if s[3] == 10]  # the 10 dev rows: zero-shot before training, the kept prompt after
    assert len(dev) == 2 and scored.index(dev[0]) < 3 and scored[-1] is dev[1], scored
    zero, kept = dev
    assert kept[1:] == (4, True, 10) and zero[1:] == (0, False, 10)
    assert [seg for seg in kept[0] if seg.kind != "soft"][1:] == zero[0][1:]  # same text, fields, slot
    plain = Classifier(
        tiny_backbone,
        Template.parse("Review: {text} Sentiment: {label}"),
        Verbalizer.from_spec({"positive": ["code"], "negative": ["Sentiment"]}),
        None,
    )
    texts = POSITIVE + NEGATIVE
    rows = plain.encode([{"text": t} for t in texts], ["positive"] * 5 + ["negative"] * 5)
    accuracy = (plain.predict_proba(rows).argmax(-1) == rows.labels).float().mean().item()
    assert info.metrics["dev_zero_shot"]["accuracy"] == pytest.approx(accuracy)
    assert info.metrics["dev_zero_shot"]["n"] == 10


def test_a_finished_run_is_not_overwritten(tmp_path, tiny_model_dir, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=2))
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    with pytest.raises(TaskError, match="already holds a run"):
        train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    with pytest.raises(TaskError, match="finished: there is nothing to resume"):
        train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), resume=True)


def test_loading_a_prompt_onto_another_model_is_refused(tmp_path, tiny_model_dir, tiny_backbone):
    from conftest import build_tiny_model

    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=2))
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    other = Backbone.load(str(build_tiny_model(tmp_path / "other", seed=1)), device="cpu")
    with pytest.raises(ArtifactError, match="trained on model"):
        load_classifier(tmp_path / "run", other)


def test_task_file_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "task.yaml"
    bad.write_text(
        "template: '{soft} {text} {label}'\nverbalizer: {a: [x], b: [y]}\ndata: {train: t.jsonl}\ntrain: {lr: -1}\n"
    )
    with pytest.raises(TaskError, match=r"task\.yaml: field train\.lr"):
        load_task(bad)
    bad.write_text("template: [unclosed\n")
    with pytest.raises(TaskError, match=r"task\.yaml:\d+: not valid YAML"):
        load_task(bad)


def test_without_a_verbalizer_the_labels_in_the_data_speak_for_themselves(
    tmp_path, tiny_model_dir, tiny_backbone
):
    task = write_task(tmp_path, tiny_model_dir, steps=2)
    text = task.read_text().replace("verbalizer: {positive: [code], negative: [Sentiment]}\n", "")
    task.write_text(text)
    info = train(load_task(task), tmp_path / "run", backbone=tiny_backbone, console=quiet())
    assert info.verbalizer == {"negative": ["negative"], "positive": ["positive"]}


def test_constant_files_fill_a_field_and_join_the_shared_prefix(tmp_path, tiny_model_dir, tiny_backbone):
    from softprompt.task import make_task

    (tmp_path / "policy.md").write_text("Refunds within {7} days.")
    task = write_task(tmp_path, tiny_model_dir, steps=1)
    text = task.read_text().replace("'{soft:4} Review: {text}", "'{soft:4} Policy: {policy} Review: {text}")
    task.write_text(text + "constants: {policy: policy.md}\n")
    spec = load_task(task)
    assert "Refunds within {{7}} days." in spec.template
    rows = make_task(spec, tiny_backbone).rows["train"].encoded
    shared = tiny_backbone.tokenizer.decode([t for t in rows.prefix if t >= 0])
    assert "Refunds within {7} days." in shared

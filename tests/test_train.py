import json

import pytest
import torch

from softprompt.artifact import ArtifactError, RunInfo, load_classifier
from softprompt.backbone import Backbone
from softprompt.prompt import SoftPrompt
from softprompt.task import TaskError, load_task
from softprompt.train import CHECKPOINT, train

from helpers import quiet, write_task


def test_training_writes_a_complete_run_folder(tmp_path, tiny_model_dir, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_model_dir))
    info = train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    run = tmp_path / "run"
    for name in (
        "prompt.safetensors",
        "task.json",
        "metrics.jsonl",
        "learning_curve.png",
        "confusion_matrix.png",
    ):
        assert (run / name).is_file(), name
    assert not (run / CHECKPOINT).exists()
    assert (run / "prompt.safetensors").stat().st_size < 4096
    assert info.fingerprint == tiny_backbone.fingerprint
    assert {"zero_shot", "initial_prompt", "dev", "best_step"} <= set(info.metrics)
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log if "loss" in h] == list(range(1, 9))
    assert [h["step"] for h in log if h.get("split") == "dev" and "variant" not in h] == [2, 4, 6, 8]


def test_training_lowers_the_loss(tmp_path, tiny_model_dir, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=30))
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    losses = [
        json.loads(x)["loss"]
        for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in x
    ]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_resume_reaches_the_same_prompt_as_an_uninterrupted_run(
    tmp_path, tiny_model_dir, tiny_backbone, optimizer
):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=8, extra=f", optimizer: {optimizer}"))
    train(spec, tmp_path / "straight", backbone=tiny_backbone, console=quiet())

    def stop_at_five(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(spec, tmp_path / "cut", backbone=tiny_backbone, console=quiet(), on_step=stop_at_five)
    assert (tmp_path / "cut" / CHECKPOINT).is_dir()
    train(spec, tmp_path / "cut", backbone=tiny_backbone, console=quiet(), resume=True)
    torch.testing.assert_close(
        SoftPrompt.load(tmp_path / "cut").vectors, SoftPrompt.load(tmp_path / "straight").vectors
    )
    straight = RunInfo.read(tmp_path / "straight").metrics
    resumed = RunInfo.read(tmp_path / "cut").metrics
    assert resumed["best_step"] == straight["best_step"]
    assert resumed["dev"]["accuracy"] == straight["dev"]["accuracy"]


def test_a_finished_run_is_not_overwritten(tmp_path, tiny_model_dir, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=2))
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    with pytest.raises(TaskError, match="already holds a run"):
        train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())


def test_few_shot_trains_on_k_rows_per_label(tmp_path, tiny_model_dir, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=2, extra=", shots: 2"))
    info = train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    assert info.training["shots"] == 2


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
    from softprompt.tasks import make_task

    (tmp_path / "policy.md").write_text("Refunds within {7} days.")
    task = write_task(tmp_path, tiny_model_dir, steps=1)
    text = task.read_text().replace("'{soft:4} Review: {text}", "'{soft:4} Policy: {policy} Review: {text}")
    task.write_text(text + "constants: {policy: policy.md}\n")
    spec = load_task(task)
    assert "Refunds within {{7}} days." in spec.template
    rows = make_task(spec, tiny_backbone).train_rows.encoded
    shared = tiny_backbone.tokenizer.decode([t for t in rows.prefix if t >= 0])
    assert "Refunds within {7} days." in shared

"""Good results without expert tuning: length-normalised label scores, learned label vectors
(WARP), a prompt started from demonstrations, and contextual calibration of a trained prompt kept
only when it helps on the validation rows."""

import json

import pytest
import torch
from safetensors.torch import load_file

from softprompt.artifact import load_run
from softprompt.backbone import Backbone
from softprompt.classify import Classifier
from softprompt.methods import method_class
from softprompt.run import RunInfo
from softprompt.soft_prompt import init_prompt
from softprompt.taskfile import TaskError, load_task
from softprompt.template import Template
from softprompt.train import _task_for, train
from softprompt.verbalizer import Verbalizer

from helpers import quiet, reference_label_scores, train_stopped_and_resumed, write_task

ROWS = [{"text": "a great film"}, {"text": "a dull, boring mess with many more words in it"}, {"text": "ok"}]
LONG_NAMES = {"pos": ["great film, truly moving", "positive"], "neg": ["dull"]}


def task_file(tmp_path, model_dir, steps=8, extra="", top=""):
    path = write_task(tmp_path, model_dir, steps=steps, extra=extra)
    path.write_text(path.read_text() + top)
    return load_task(path)


# -- label_scores: mean -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "template", ["{soft:4} Review: {text} Sentiment: {label}", "{soft:3} Sentiment: {label}. Review: {text}"]
)
def test_mean_label_scores_are_each_word_s_mean_token_log_probability(any_backbone, template):
    t = Template.parse(template)
    v = Verbalizer.from_spec(LONG_NAMES)
    clf = Classifier(any_backbone, t, v, init_prompt("vocab", t.soft_tokens, any_backbone, seed=5), length_norm=True)
    enc = clf.encode(ROWS)
    got = clf.scores(clf.prefix(enc.encoded), enc.encoded.bodies, enc.encoded.afters)
    for row in range(len(ROWS)):
        # exact values, not up to a per-row constant: the constant would not cancel across lengths
        want = reference_label_scores(clf, enc.encoded, row, mean=True)
        torch.testing.assert_close(got[row], want, rtol=1e-4, atol=1e-4)


def test_summed_scores_penalise_a_long_label_name_that_mean_scores_do_not(tiny_backbone):
    t = Template.parse("{soft:4} Review: {text} Sentiment: {label}")
    prompt = init_prompt("vocab", 4, tiny_backbone, seed=5)
    summed = Classifier(tiny_backbone, t, Verbalizer.from_spec(LONG_NAMES), prompt)
    mean = Classifier(tiny_backbone, t, Verbalizer.from_spec(LONG_NAMES), prompt, length_norm=True)
    enc = summed.encode(ROWS)
    gap_sum = summed.scores(summed.prefix(enc.encoded), enc.encoded.bodies, enc.encoded.afters).diff(dim=-1)
    gap_mean = mean.scores(mean.prefix(enc.encoded), enc.encoded.bodies, enc.encoded.afters).diff(dim=-1)
    assert (gap_sum > gap_mean).all()  # neg minus pos: the long "pos" name loses more when summed


# -- learned label vectors ----------------------------------------------------------------------------
@pytest.mark.parametrize("length_norm", [False, True])
def test_label_vectors_started_from_the_output_rows_score_as_the_frozen_model(any_backbone, length_norm):
    t = Template.parse("{soft:4} Review: {text} Sentiment: {label}")
    v = Verbalizer.from_spec(LONG_NAMES)
    clf = Classifier(any_backbone, t, v, init_prompt("vocab", 4, any_backbone, seed=1), length_norm=length_norm)
    learned = clf.with_label_rows(any_backbone.output_rows(clf.choices.first_ids))
    enc = clf.encode(ROWS)
    torch.testing.assert_close(learned.predict_proba(enc), clf.predict_proba(enc), rtol=1e-4, atol=1e-5)
    moved = clf.with_label_rows(torch.randn(len(clf.choices.ids), any_backbone.hidden_size))
    assert not torch.allclose(moved.predict_proba(enc), clf.predict_proba(enc), atol=1e-3)


def test_label_vectors_are_trained_saved_and_read_back_by_eval(tmp_path, tiny_model_dir, tiny_backbone):
    spec = task_file(tmp_path, tiny_model_dir, steps=6, extra=", label_lr: 0.05", top="label_vectors: true\n")
    info = train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), baselines=False)
    rows = load_file(str(tmp_path / "run" / "labels.safetensors"))["label_rows"]
    task, _ = _task_for(spec, method_class("prompt"), tiny_backbone)
    start = tiny_backbone.output_rows(task.model.choices.first_ids).cpu()
    assert rows.shape == start.shape and not torch.allclose(rows, start)
    assert info.label_vectors and info.metrics["saved_parameters"] == 4 * 32 + rows.numel()
    model, _ = load_run(tmp_path / "run", tiny_backbone)
    torch.testing.assert_close(model.label_rows.cpu(), rows)
    assert task.score(model, "dev")["confusion"] == info.metrics["dev"]["confusion"]
    assert not torch.allclose(
        model.predict_proba(task.rows["dev"]), model.with_label_rows(None).predict_proba(task.rows["dev"])
    )


def test_a_run_with_label_vectors_stopped_and_resumed_equals_the_straight_run(tmp_path, tiny_model_dir, tiny_backbone):
    spec = task_file(tmp_path, tiny_model_dir, steps=6, extra=", label_lr: 0.05", top="label_vectors: true\n")
    train(spec, tmp_path / "straight", backbone=tiny_backbone, console=quiet())
    train_stopped_and_resumed(spec, tmp_path / "cut", lambda: tiny_backbone, stop_at=3)
    for name in ("labels.safetensors", "prompt.safetensors"):
        for key, value in load_file(str(tmp_path / "straight" / name)).items():
            torch.testing.assert_close(load_file(str(tmp_path / "cut" / name))[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["zero-shot", "linear-probe"])
def test_label_vectors_are_ignored_by_methods_that_take_no_gradient_steps_and_refused_for_generation(name, tmp_path, tiny_model_dir):
    spec = task_file(tmp_path, tiny_model_dir, steps=2, top="label_vectors: true\n")
    info = train(spec, tmp_path / "run", backbone=Backbone.load(str(tiny_model_dir)), console=quiet(), method=name)
    assert not info.label_vectors and not (tmp_path / "run" / "labels.safetensors").exists()
    (tmp_path / "gen.jsonl").write_text(json.dumps({"text": "a", "target": "b"}) + "\n")
    (tmp_path / "gen.yaml").write_text(
        f"model: {tiny_model_dir}\ntemplate: '{{soft:2}} {{text}} => {{target}}'\nlabel_vectors: true\n"
        "data: {train: gen.jsonl}\n"
    )
    with pytest.raises(TaskError, match="label_vectors"):
        load_task(tmp_path / "gen.yaml")


# -- init: demos --------------------------------------------------------------------------------------
def test_demos_init_starts_as_the_shortest_rows_of_each_label_rendered_with_their_answers(tmp_path, tiny_backbone):
    spec = task_file(tmp_path, tiny_backbone.spec)
    spec.init = "demos"
    spec.template = spec.template.replace("{soft:4}", "{soft:24}")
    task, _ = _task_for(spec, method_class("prompt"), tiny_backbone)
    demos = task.demonstrations()
    answers = {"positive": "code", "negative": "Sentiment"}
    for demo, label in zip(demos[:2], ["negative", "positive"]):  # labels in turn, the shortest row first
        shortest = min(len(e.fields["text"]) for e in task.splits.train if e.label == label)
        assert demo.endswith(f"Sentiment: {answers[label]}") and len(demo.split(": ")[1]) - len(" Sentiment") == shortest
    ids = tiny_backbone.tokenize(demos[0]) + tiny_backbone.tokenize("\n" + demos[1])
    assert len(ids) <= 24 < len(ids) + len(tiny_backbone.tokenize("\n" + demos[2]))
    prompt = task.start_prompt(tiny_backbone)
    want = tiny_backbone.embed(torch.tensor(ids)).float().cpu()
    torch.testing.assert_close(prompt.vectors[: len(ids)], want)
    assert prompt.length == 24


def test_the_default_init_is_demos_for_classification_and_vocab_for_generation_and_a_file_s_own_wins(tmp_path, tiny_model_dir):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "a", "label": "x", "target": "b"}) + "\n")
    for name, (tail, init) in {"classify": ("{label}", ""), "generate": ("=> {target}", ""), "own": ("{label}", "init: random\n")}.items():
        (tmp_path / f"{name}.yaml").write_text(
            f"model: {tiny_model_dir}\ntemplate: '{{soft:2}} {{text}} {tail}'\n{init}data: {{train: rows.jsonl}}\n"
        )
    assert [load_task(tmp_path / f"{n}.yaml").init for n in ("classify", "generate", "own")] == ["demos", "vocab", "random"]


# -- calibration of a trained prompt ------------------------------------------------------------------
def biased_prior(task_model):
    """A prior that, divided out, makes every row the first label: calibration can only hurt."""
    return torch.tensor([1e-6, 1 - 1e-6])


@pytest.mark.parametrize("setting", ["auto", "on", "off"])
def test_calibration_of_a_trained_prompt_is_kept_only_when_asked_or_when_it_helps(setting, tmp_path, tiny_model_dir, tiny_backbone, monkeypatch):
    monkeypatch.setattr("softprompt.calibration.content_free_prior", biased_prior)
    spec = task_file(tmp_path, tiny_model_dir, steps=4, extra=f", calibrate: {setting}")
    info = train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), baselines=False)
    validation = info.metrics["validation"]
    assert ("calibrated" in validation) == (setting == "auto")
    if setting == "auto":
        assert validation["calibrated"]["accuracy"] <= validation["kept"]["accuracy"]
    kept = "calibration" in info.method_settings
    assert kept == (setting == "on")
    model, _ = load_run(tmp_path / "run", tiny_backbone)
    assert (model.prior is not None) == kept


def test_a_kept_prior_is_read_back_exactly_even_where_a_label_is_below_one_in_a_million(tmp_path, tiny_model_dir, tiny_backbone, monkeypatch):
    # with many labels a content-free prior holds probabilities far below 1e-6 (Banking77: a
    # rounded 0 made a label's calibrated score infinite and every probability NaN)
    prior = torch.tensor([3e-9, 1 - 3e-9])
    monkeypatch.setattr("softprompt.calibration.content_free_prior", lambda model: prior)
    spec = task_file(tmp_path, tiny_model_dir, steps=2, extra=", calibrate: on")
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), baselines=False)
    model, _ = load_run(tmp_path / "run", tiny_backbone)
    assert torch.equal(model.prior, prior)
    rows = model.encode([{"text": t} for t in ["a great film", "boring mess"]])
    assert torch.isfinite(model.predict_proba(rows)).all()


def test_auto_calibration_is_kept_when_it_raises_the_validation_score(tmp_path, tiny_model_dir, tiny_backbone, monkeypatch):
    # a lr far too small to move the prompt: the untrained prompt's bias stays, and dividing out
    # its mean prediction on the validation rows themselves must do better than always one label
    spec = task_file(tmp_path, tiny_model_dir, steps=2, extra=", lr: 0.000001, calibrate: auto")

    def validation_prior(model):
        task, _ = _task_for(spec, method_class("prompt"), tiny_backbone)
        return model.predict_proba(task.rows["validation"]).mean(0)

    monkeypatch.setattr("softprompt.calibration.content_free_prior", validation_prior)
    info = train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), baselines=False)
    validation = info.metrics["validation"]
    assert validation["calibrated"]["accuracy"] > validation["kept"]["accuracy"]
    assert "calibration" in info.method_settings
    assert RunInfo.read(tmp_path / "run").method_settings["calibration"] == info.method_settings["calibration"]


def test_a_checkpoint_from_before_the_new_settings_resumes_while_they_keep_their_defaults(tmp_path, tiny_model_dir, tiny_backbone):
    from softprompt.train import identity_changes, run_identity

    now = run_identity(task_file(tmp_path, tiny_model_dir), tiny_backbone)
    older = {k: v for k, v in now.items() if k not in ("label_scores", "label_vectors")}
    older["train"] = {k: v for k, v in now["train"].items() if k not in ("calibrate", "label_lr")}
    assert identity_changes(older, now) == []
    changed = run_identity(task_file(tmp_path, tiny_model_dir, extra=", calibrate: off", top="label_scores: mean\n"), tiny_backbone)
    assert identity_changes(older, changed) == ["label_scores: None -> 'mean'", "train.calibrate: None -> 'off'"]

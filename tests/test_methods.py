"""Training methods as variants of one interface: each trains, saves, loads back and scores the
same; the folded methods are plain prompts; a prefix is the model's own keys at init; calibration
divides the content-free prior out; few-shot demonstrations sit in the shared prefix; a run of any
method resumes exactly."""


import pytest
import torch
from safetensors.torch import load_file

import softprompt.train as train_mod
from softprompt.artifact import load_run
from softprompt.backbone import Backbone
from softprompt.methods import METHODS, method_class
from softprompt.methods.prefix import PREFIX_FILE
from softprompt.run import ArtifactError, RunInfo
from softprompt.soft_prompt import SoftPrompt
from softprompt.task import ClassificationTask
from softprompt.taskfile import TaskError, load_task
from softprompt.train import CHECKPOINT, _task_for, train

from helpers import quiet, train_stopped_and_resumed, write_task

TRAINED = [name for name, m in METHODS.items() if m.trains]


def built(name, tmp_path, backbone, extra=""):
    """A task of the toy data rendered for the method, and the fresh method in its model."""
    spec = load_task(write_task(tmp_path, backbone.spec, extra=extra))
    task, _ = _task_for(spec, method_class(name), backbone)
    method = method_class(name).build(task, backbone)
    task.use_method(method)
    return task, method


def scores(task, role="dev"):
    with torch.no_grad():
        return task.model.predict_proba(task.rows[role])


@pytest.mark.parametrize("name", TRAINED)
def test_every_trained_method_lowers_the_training_loss_through_its_own_parameters(name, tmp_path, tiny_model_dir):
    backbone = Backbone.load(str(tiny_model_dir))  # lora and full change the model they train
    task, method = built(name, tmp_path, backbone)
    params = list(method.trainable().values())
    assert params and all(p.requires_grad for p in params)
    frozen = {n: p.detach().clone() for n, p in backbone.model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(params, lr=method.lrs[-1] * (30 if name == "full" else 3))
    batch = list(range(8))
    first = float(task.loss(batch).detach())
    for _ in range(25):
        optimizer.zero_grad()
        task.loss(batch).backward()
        optimizer.step()
    assert float(task.loss(batch).detach()) < first - 0.002
    for n, p in backbone.model.named_parameters():  # what the method does not train never moves
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("name", ["residual", "p-tuning"])
def test_a_reparameterised_prompt_folds_into_a_plain_prompt_that_scores_the_same(name, tmp_path, tiny_backbone):
    task, method = built(name, tmp_path, tiny_backbone)
    with torch.no_grad():
        for p in method.trainable().values():
            p.add_(0.05 * torch.randn_like(p))
    live = scores(task)
    folded = task.model.with_prompt(method.folded())
    assert isinstance(folded.lm.prompt, SoftPrompt)
    with torch.no_grad():
        torch.testing.assert_close(folded.predict_proba(task.rows["dev"]), live, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["tiny_backbone", "tiny_gemma"])
def test_a_fresh_prefix_is_the_model_s_own_keys_for_the_init_prompt(model, request, tmp_path):
    """At init, prefix tuning computes exactly what prompt tuning with the same init vectors does
    (Gemma: with its BOS before the prefix and sliding-window layers)."""
    backbone = request.getfixturevalue(model)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    prefix_task, prefix = built("prefix", tmp_path / "a", backbone)
    prompt_task, _ = built("prompt", tmp_path / "b", backbone)
    torch.testing.assert_close(scores(prefix_task), scores(prompt_task), rtol=1e-4, atol=1e-5)
    assert prefix.kv.length == prompt_task.template.soft_tokens


def test_prefix_tuning_refuses_soft_tokens_after_the_input(tmp_path, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_backbone.spec))
    spec.template = "Review: {text} {soft:4} Sentiment: {label}"
    task, _ = _task_for(spec, method_class("prefix"), tiny_backbone)
    with pytest.raises(ValueError, match="before the first input field"):
        method_class("prefix").build(task, tiny_backbone)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_run_of_every_method_loads_back_and_scores_as_it_reported(name, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr("softprompt.train._judge", lambda state, score, patience: True)  # keep the last step
    backbone = Backbone.load(str(tiny_model_dir))  # lora and full change the model they train
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=4, extra=f", lr: {METHODS[name].lr or 0.1}"))
    info = train(spec, tmp_path / "run", backbone=backbone, console=quiet(), method=name, baselines=False)
    saved = RunInfo.read(tmp_path / "run")
    assert saved.method == name and not (tmp_path / "run" / CHECKPOINT).exists()
    assert (info.metrics["trainable_parameters"] > 0) == (METHODS[name].trains or METHODS[name].fits)
    assert (saved.soft_tokens > 0) == METHODS[name].soft_tokens
    model, _ = load_run(tmp_path / "run", Backbone.load(str(tiny_model_dir)))
    task, _ = _task_for(spec, method_class(name), Backbone.load(str(tiny_model_dir)))
    assert task.score(model, "dev")["confusion"] == info.metrics["dev"]["confusion"]
    if METHODS[name].trains:  # the loaded run is the trained one, not the untrained start
        start, _ = _task_for(spec, method_class(name), Backbone.load(str(tiny_model_dir)))
        start.use_method(method_class(name).build(start, start.model.backbone))
        rows = task.rows["dev"]
        assert not torch.allclose(model.predict_proba(rows), start.model.predict_proba(rows))


def test_folded_runs_are_plain_prompts_and_prefix_runs_hold_every_layer(tmp_path, tiny_model_dir, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=2))
    for name in ("residual", "p-tuning"):
        train(spec, tmp_path / name, backbone=tiny_backbone, console=quiet(), method=name, baselines=False)
        assert set(load_file(str(tmp_path / name / "prompt.safetensors"))) == {"prompt"}
        assert RunInfo.read(tmp_path / name).metrics["saved_parameters"] == 4 * tiny_backbone.hidden_size
    train(spec, tmp_path / "prefix", backbone=tiny_backbone, console=quiet(), method="prefix", baselines=False)
    layers = tiny_backbone.model.config.num_hidden_layers
    assert len(load_file(str(tmp_path / "prefix" / PREFIX_FILE))) == 2 * layers


def test_calibration_divides_the_content_free_prior_out_and_is_kept_in_the_run(tmp_path, tiny_model_dir, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_model_dir))
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), method="calibrated")
    prior = torch.tensor(RunInfo.read(tmp_path / "run").method_settings["calibration"])
    calibrated, _ = load_run(tmp_path / "run", tiny_backbone)
    plain = calibrated.with_prompt(None)  # the same zero-shot classifier, no calibration
    rows = plain.encode([{"text": t} for t in ["a great film", "boring mess", "N/A"]])
    expected = plain.predict_proba(rows) / prior
    torch.testing.assert_close(calibrated.predict_proba(rows), expected / expected.sum(-1, keepdim=True), rtol=1e-3, atol=1e-5)


def test_few_shot_demonstrations_sit_in_the_shared_prefix_within_their_token_cap(tmp_path, tiny_backbone, monkeypatch):
    spec = load_task(write_task(tmp_path, tiny_backbone.spec))
    task, settings = _task_for(spec, method_class("few-shot"), tiny_backbone)
    assert settings["demonstrations"] == 2 * settings["per_label"] == 8
    prefix = tiny_backbone.tokenizer.decode(task.rows["dev"].encoded.prefix)
    assert prefix.count("Sentiment: code") == 4 and prefix.count("Sentiment: Sentiment") == 4
    assert task.template.soft_tokens == 0
    monkeypatch.setattr("softprompt.methods.few_shot.DEMO_TOKENS", settings["demonstration_tokens"] // 3)
    _, fewer = _task_for(spec, method_class("few-shot"), tiny_backbone)
    assert fewer["per_label"] < settings["per_label"] and fewer["demonstration_tokens"] <= settings["demonstration_tokens"] // 3


@pytest.mark.parametrize("name", ["residual", "prefix", "lora"])
def test_a_run_of_another_method_stopped_and_resumed_equals_the_uninterrupted_run(name, tmp_path, tiny_model_dir, monkeypatch):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=6, extra=f", lr: {METHODS[name].lr}"))
    train(spec, tmp_path / "straight", backbone=Backbone.load(str(tiny_model_dir)), console=quiet(), method=name)

    saved = []
    real_resume = train_mod._starting_point

    def note_step(run, *args):  # the step the resume starts from: a model's weights are saved at validations only
        checkpoint, fresh = real_resume(run, *args)
        saved.append(None if fresh else checkpoint.state.step)
        return checkpoint, fresh

    monkeypatch.setattr(train_mod, "_starting_point", note_step)
    train_stopped_and_resumed(spec, tmp_path / "cut", lambda: Backbone.load(str(tiny_model_dir)), stop_at=5, method=name)
    assert saved == [None, 4 if METHODS[name].changes_base else 5]
    a, b = RunInfo.read(tmp_path / "cut").metrics, RunInfo.read(tmp_path / "straight").metrics
    assert a["dev"] == b["dev"] and a["validation"] == b["validation"]
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "straight" / "metrics.jsonl").read_text()
    artifact = {"residual": "prompt.safetensors", "prefix": PREFIX_FILE, "lora": "adapter_model.safetensors"}[name]
    for key, value in load_file(str(tmp_path / "straight" / artifact)).items():
        torch.testing.assert_close(load_file(str(tmp_path / "cut" / artifact))[key], value, rtol=0, atol=0)


def test_resuming_with_another_method_is_refused(tmp_path, tiny_model_dir, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=6))

    def stop(step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), on_step=stop)
    with pytest.raises(TaskError, match="method: 'prompt' -> 'residual'"):
        train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), method="residual", resume=True)


def test_a_prefix_run_is_served_beside_a_prompt_run_and_answers_as_it_does_alone(tmp_path, tiny_model_dir, tiny_backbone):
    from softprompt.serve.bank import TaskBank

    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=2))
    for name in ("prefix", "prompt", "calibrated"):
        train(spec, tmp_path / name, backbone=tiny_backbone, console=quiet(), method=name, baselines=False)
    bank = TaskBank(tiny_backbone, allow=[tmp_path])
    for name in ("prefix", "prompt", "calibrated"):
        bank.load(name, tmp_path / name)
    texts = ["a great film", "boring mess"]
    answers = bank.classify([(name, {"text": t}) for t in texts for name in ("prefix", "prompt", "calibrated")])
    for name in ("prefix", "prompt", "calibrated"):
        alone, _ = load_run(tmp_path / name, tiny_backbone)
        expected = alone.predict_proba(alone.encode([{"text": t} for t in texts]))
        got = [a for a, (n, _) in zip(answers, [(n, t) for t in texts for n in ("prefix", "prompt", "calibrated")]) if n == name]
        torch.testing.assert_close(torch.tensor([list(a["probabilities"].values()) for a in got]), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["prefix", "lora"])
def test_export_and_inspect_refuse_runs_that_hold_no_soft_prompt(name, tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from softprompt.cli import app

    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=1))
    train(spec, tmp_path / "run", backbone=Backbone.load(str(tiny_model_dir)), console=quiet(), method=name, baselines=False)
    for args in (["export", str(tmp_path / "run"), "--peft", str(tmp_path / "peft")], ["inspect", str(tmp_path / "run")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and f"a {name!r} run holds no soft" in result.output.replace("\n", " ")


@pytest.mark.parametrize("name", ["residual", "p-tuning", "lora"])
def test_a_method_s_random_init_depends_on_the_task_seed_alone(name, tmp_path, tiny_model_dir):
    """A run resumed in a new process must rebuild the same start, whatever the global RNG holds."""
    states = []
    for global_seed, task_seed in ((1, 0), (2, 0), (1, 5)):
        torch.manual_seed(global_seed)
        folder = tmp_path / f"{global_seed}-{task_seed}"
        folder.mkdir()
        spec = load_task(write_task(folder, tiny_model_dir, extra=f", seed: {task_seed}"))
        task, _ = _task_for(spec, method_class(name), Backbone.load(str(tiny_model_dir)))
        states.append(method_class(name).build(task, task.model.backbone).state())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


@pytest.mark.parametrize("name", ["lora", "full"])
def test_methods_that_change_the_weights_report_zero_shot_of_the_base_model(name, tmp_path, tiny_model_dir, monkeypatch):
    seen = {}
    original = ClassificationTask.zero_shot

    def spy(self, role, progress=None):  # the probabilities the dev zero-shot report is made of
        if role == "dev":
            model = self.model.with_prompt(None)
            seen["probs"] = model.predict_proba(self._rows_for(model, "dev"))
        return original(self, role, progress)

    monkeypatch.setattr(ClassificationTask, "zero_shot", spy)
    backbone = Backbone.load(str(tiny_model_dir))
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=4, extra=f", lr: {METHODS[name].lrs[-1] * 10}"))
    info = train(spec, tmp_path / "run", backbone=backbone, console=quiet(), method=name)
    base, _ = _task_for(spec, method_class(name), Backbone.load(str(tiny_model_dir)))
    plain = base.model.with_prompt(None)
    assert torch.allclose(seen["probs"], plain.predict_proba(base._rows_for(plain, "dev")), atol=1e-6)
    assert info.metrics["dev_zero_shot"] == base.zero_shot("dev")


@pytest.mark.parametrize("name", ["lora", "full"])
def test_a_backbone_whose_weights_a_method_changed_refuses_runs_of_the_base_model(name, tmp_path, tiny_model_dir):
    backbone = Backbone.load(str(tiny_model_dir))
    base = backbone.fingerprint
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=2))
    train(spec, tmp_path / "prompt", backbone=backbone, console=quiet(), baselines=False)
    info = train(spec, tmp_path / name, backbone=backbone, console=quiet(), method=name, baselines=False)
    assert info.fingerprint == base != backbone.fingerprint  # the run names the model it started from
    with pytest.raises(ArtifactError, match="fingerprint"):
        load_run(tmp_path / "prompt", backbone)  # scored on tuned weights it would answer wrongly
    load_run(tmp_path / name, Backbone.load(str(tiny_model_dir)))  # and on a fresh base it loads

"""`train --auto`: trials on the validation rows, the winner trained fully and recorded, the
user's own flags left alone, a budget too small refused before anything runs."""

import json

import pytest
from typer.testing import CliRunner

from softprompt.auto import AutoError, Costs, plan_stages, run_auto
from softprompt.cli import app
from softprompt.run import RunInfo
from softprompt.taskfile import load_task

from helpers import quiet, write_task


def test_auto_chooses_the_best_trial_on_validation_and_continues_it_into_the_final_run(tmp_path, tiny_model_dir, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=40))  # trials: 15 steps, the better half 30
    info = run_auto(spec, tmp_path / "run", tiny_backbone, quiet(), budget_s=3600)
    tried = info.auto["tried"]
    assert [t["stage"] for t in tried][:3] == ["lr", "lr", "lr"] and not info.auto["skipped"]
    assert {t["steps"] for t in tried} <= {15, 30} and all("15" in t["validation_by_steps"] for t in tried)
    lr_stage = tried[:3]  # successive halving: all three to 15 steps, the better two to 30, where a change
    # must beat the task's own rate (the first) by a standard error of its score on the validation rows
    n = info.metrics["rows"]["validation"]

    def ranked(trials, steps):
        held = trials[0]["validation_by_steps"][steps]
        noise = (held * (1 - held) / n) ** 0.5
        return sorted(range(len(trials)), key=lambda i: -(trials[i]["validation_by_steps"][steps] - (noise if i else 0.0)))

    at_half = ranked(lr_stage, "15")
    assert [t["steps"] for t in lr_stage] == [30 if i in at_half[:2] else 15 for i in range(3)]
    saved = RunInfo.read(tmp_path / "run")
    assert saved.auto == info.auto and saved.training["steps"] == 40 and saved.metrics["steps"] == 40
    assert {t["seconds"] > 0 for t in tried} == {True}
    best = next(t for t in tried if t["recipe"] == info.auto["chosen"])
    recipe = dict(part.split(" ", 1) for part in best["recipe"].split(", ")[1:3])
    assert saved.training["lr"] == float(recipe["lr"]) and saved.init == recipe["init"]
    assert not (tmp_path / ".run.auto-trials").exists()
    # the final run is the winning trial continued: its kept state is at least the trial's best,
    # and its zero-shot baselines (which the trials skip) were scored when it went on
    assert saved.metrics["validation"]["kept"]["accuracy"] >= best["validation"] - 1e-6
    assert "zero_shot" in saved.metrics["validation"] and "dev_zero_shot" in saved.metrics


def test_settings_given_on_the_command_line_are_not_searched(tmp_path, tiny_model_dir):
    spec = load_task(write_task(tmp_path, tiny_model_dir))
    stages = [name for name, _ in plan_stages(spec, _start(spec), frozenset({"lr", "init"}))]
    assert stages == ["label vectors", "method", "prompt length"]


def test_a_budget_too_small_is_refused_up_front_with_the_time_the_task_needs(tmp_path, tiny_model_dir, tiny_backbone, monkeypatch):
    monkeypatch.setattr("softprompt.auto.probe", lambda *a: (Costs(step_s=2.0, row_s=0.5, validation_rows=10, report_rows=10), 20))
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=100))
    # the final run goes on from a 30-step trial: 70 steps x 2 s + (50 - 15 + 1 + 2 passes) x 10 rows x 0.5 s
    # + 20 report rows x 0.5 s = 340 s; the lr stage: 3 first halves of 15 steps x 2 s + 9 passes x 5 s (75 s
    # each) and 2 second halves of the same cost: 375 s; 715 s in all
    with pytest.raises(AutoError, match=r"--budget 12m or more"):
        run_auto(spec, tmp_path / "run", tiny_backbone, quiet(), budget_s=600)
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.auto-trials").exists()


def test_train_auto_from_the_command_line_records_the_search_in_task_json(tmp_path, tiny_model_dir):
    task = write_task(tmp_path, tiny_model_dir, steps=4)
    result = CliRunner().invoke(app, ["train", str(task), "--out", str(tmp_path / "run"), "--auto", "--budget", "1h", "--lr", "0.3"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "run" / "task.json").read_text())
    assert info["auto"]["tried"] and all(t["stage"] != "lr" for t in info["auto"]["tried"])
    assert info["training"]["lr"] == 0.3 or "residual" in info["auto"]["chosen"]
    refused = CliRunner().invoke(app, ["train", str(task), "--out", str(tmp_path / "lora"), "--auto", "--method", "lora"])
    assert refused.exit_code != 0 and "searches the soft-prompt methods" in refused.output


def test_a_change_must_beat_the_recipe_it_would_replace_by_more_than_the_validation_noise():
    """On 36 validation rows at 61% accuracy a standard error is 8.1 points: a two-row lead (5.6)
    keeps the held recipe, a four-row lead (11.1) replaces it; among the others the order is the scores'."""
    from types import SimpleNamespace

    from softprompt.auto import Trial, _ranked

    def trial(name, score):
        return Trial("lr", _start_named(name), None, scores={15: score})

    held, near, far, below = trial("held", 22 / 36), trial("near", 24 / 36), trial("far", 26 / 36), trial("below", 20 / 36)
    context = SimpleNamespace(spec=SimpleNamespace(train=SimpleNamespace(metric="accuracy")),
                              costs=SimpleNamespace(validation_rows=36))
    assert _ranked([held, near, below], held, 15, context) == [held, near, below]
    assert _ranked([held, near, far, below], held, 15, context) == [far, held, near, below]
    context.spec.train.metric = "chrf"  # a generation metric, 0-100: the same rule on its scale
    scaled = [trial(t.recipe.init, 100 * t.scores[15]) for t in (held, near, far)]
    assert [t.recipe.init for t in _ranked(scaled, scaled[0], 15, context)] == ["far", "held", "near"]


def _start_named(init):
    from softprompt.auto import Recipe

    return Recipe("prompt", 0.03, init, False, None)


def _start(spec):
    from softprompt.auto import Recipe

    return Recipe("prompt", spec.train.lr, str(spec.init), spec.label_vectors, None)


def test_auto_refuses_when_every_choice_is_fixed_and_budget_needs_auto(tmp_path, tiny_model_dir, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_model_dir))
    every = frozenset({"lr", "init", "label_vectors", "method", "soft"})
    with pytest.raises(AutoError, match="nothing left to search"):
        run_auto(spec, tmp_path / "run", tiny_backbone, quiet(), fixed=every)
    task = write_task(tmp_path, tiny_model_dir)
    result = CliRunner().invoke(app, ["train", str(task), "--out", str(tmp_path / "run"), "--budget", "5m"])
    assert result.exit_code != 0 and "add --auto" in result.output and not (tmp_path / "run").exists()


def test_a_trial_is_the_start_of_the_final_run_and_the_winner_goes_on_where_it_stopped(tmp_path, tiny_model_dir, tiny_backbone, monkeypatch):
    import softprompt.train as training

    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=6))
    training.train(spec, tmp_path / "full", backbone=tiny_backbone, console=quiet(), baselines=False)
    state = training.train_prefix(spec, tmp_path / "trial", tiny_backbone, until=3, console=quiet())
    assert state.step == 3 and not (tmp_path / "trial" / "task.json").exists()

    def lines(run):
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    def steps(run):
        return [x for x in lines(run) if "loss" in x]

    assert steps("trial") == steps("full")[:3]  # the same losses at the same learning rates
    assert any(x.get("split") == "validation" and x["step"] == 3 for x in lines("trial"))
    training.train(spec, tmp_path / "trial", backbone=tiny_backbone, console=quiet(), baselines=False, resume=True)
    assert steps("trial") == steps("full")  # continued, it is the uninterrupted run
    calls = []
    real_prefix, real_train = training.train_prefix, training.train

    def spy_prefix(spec, out, *args, **kwargs):
        calls.append(("trial", spec.train.steps, kwargs["until"]))
        return real_prefix(spec, out, *args, **kwargs)

    def spy_train(spec, out, *args, **kwargs):
        calls.append(("final", spec.train.steps, kwargs.get("resume")))
        return real_train(spec, out, *args, **kwargs)

    monkeypatch.setattr(training, "train_prefix", spy_prefix)
    monkeypatch.setattr(training, "train", spy_train)
    run_auto(load_task(write_task(tmp_path, tiny_model_dir, steps=40)), tmp_path / "auto", tiny_backbone, quiet(),
             fixed=frozenset({"init", "label_vectors", "method", "soft"}))
    # three learning rates to 15 steps, the better two to 30, then the winner continued to 40
    assert calls == [("trial", 40, 15)] * 3 + [("trial", 40, 30)] * 2 + [("final", 40, True)]

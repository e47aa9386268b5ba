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


def test_auto_chooses_the_best_trial_on_validation_and_trains_it_fully(tmp_path, tiny_model_dir, tiny_backbone):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=40))  # trials: 30 steps
    info = run_auto(spec, tmp_path / "run", tiny_backbone, quiet(), budget_s=3600)
    tried = info.auto["tried"]
    assert [t["stage"] for t in tried][:3] == ["lr", "lr", "lr"] and not info.auto["skipped"]
    best = max(tried, key=lambda t: t["validation"])  # max keeps the first of equals, as the search does
    assert info.auto["chosen"] == best["recipe"]
    saved = RunInfo.read(tmp_path / "run")
    assert saved.auto == info.auto and saved.training["steps"] == 40  # the final run has every step
    assert {t["seconds"] > 0 for t in tried} == {True}
    recipe = dict(part.split(" ", 1) for part in best["recipe"].split(", ")[1:3])
    assert saved.training["lr"] == float(recipe["lr"]) and saved.init == recipe["init"]
    assert not (tmp_path / ".run.auto-trials").exists()
    # a trial is the first 30 steps of the final run's own schedule, and the final run validates at
    # step 30 too: it keeps a state at least as good on validation as the trial that chose it
    validation = saved.metrics["validation"]
    assert max(validation["kept"]["accuracy"], validation.get("calibrated", {}).get("accuracy", 0)) >= best["validation"] - 1e-4


def test_settings_given_on_the_command_line_are_not_searched(tmp_path, tiny_model_dir):
    spec = load_task(write_task(tmp_path, tiny_model_dir))
    stages = [name for name, _ in plan_stages(spec, _start(spec), frozenset({"lr", "init"}))]
    assert stages == ["label vectors", "method", "prompt length"]


def test_a_budget_too_small_is_refused_up_front_with_the_time_the_task_needs(tmp_path, tiny_model_dir, tiny_backbone, monkeypatch):
    monkeypatch.setattr("softprompt.auto.probe", lambda *a: (Costs(step_s=2.0, row_s=0.5, validation_rows=10, report_rows=10), 20))
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=100))
    # final: 100 steps x 2 s + (100 // 2 + 3 passes) x 10 rows x 0.5 s + 20 report rows x 0.5 s = 475 s;
    # a trial: 30 steps x 2 s + 3 passes x 10 rows x 0.5 s = 75 s, and the lr stage holds 3 of them
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


def test_a_trial_is_the_start_of_the_final_run_s_own_schedule(tmp_path, tiny_model_dir, tiny_backbone, monkeypatch):
    import softprompt.train as training

    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=6))
    training.train(spec, tmp_path / "full", backbone=tiny_backbone, console=quiet(), baselines=False)
    training.train(spec, tmp_path / "trial", backbone=tiny_backbone, console=quiet(), baselines=False, stop_after=3)
    def lines(run):
        return [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    def steps(run):
        return [x for x in lines(run) if "loss" in x]
    assert steps("trial") == steps("full")[:3]  # the same losses at the same learning rates
    assert any(x.get("split") == "validation" and x["step"] == 3 for x in lines("trial"))
    calls = []
    real = training.train

    def spy(spec, out, *args, **kwargs):
        calls.append((spec.train.steps, kwargs.get("stop_after")))
        return real(spec, out, *args, **kwargs)

    monkeypatch.setattr(training, "train", spy)
    run_auto(load_task(write_task(tmp_path, tiny_model_dir, steps=40)), tmp_path / "auto", tiny_backbone, quiet(),
             fixed=frozenset({"init", "label_vectors", "method", "soft"}))
    assert calls == [(40, 30)] * 3 + [(40, None)]  # three learning rates, then the final run

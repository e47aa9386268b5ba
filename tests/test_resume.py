"""A run stopped at any moment and resumed ends exactly where the uninterrupted run ends: the same
kept prompt, the same report and the same metrics.jsonl, line for line. Stops are simulated by an
exception the training loop does not handle (what a kill leaves behind is only what was written), and
once by a real `kill -9` of a training process."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from softprompt.run import RunInfo
from softprompt.soft_prompt import SoftPrompt
from softprompt.task import ClassificationTask
from softprompt.taskfile import TaskError, load_task
from softprompt.train import CHECKPOINT, train

from helpers import quiet, write_task


class Killed(BaseException):
    """Stands for the process dying: nothing in the training code catches it."""


def killing(monkeypatch, method: str, call: int) -> None:
    """Make ClassificationTask.<method> die on its `call`-th call."""
    original = getattr(ClassificationTask, method)
    calls = {"n": 0}

    def wrapper(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ClassificationTask, method, wrapper)


def assert_same_run(resumed, straight):
    torch.testing.assert_close(SoftPrompt.load(resumed).vectors, SoftPrompt.load(straight).vectors, rtol=0, atol=0)
    a, b = RunInfo.read(resumed).metrics, RunInfo.read(straight).metrics
    for key in ("dev", "dev_zero_shot", "validation", "best_step", "steps", "stopped_early", "rows"):
        assert a[key] == b[key], key
    assert (resumed / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    assert not (resumed / CHECKPOINT).exists()


EXTRA = ", grad_accum: 2, eval_every: 2"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir, tiny_backbone):
    folder = tmp_path_factory.mktemp("straight")
    spec = load_task(write_task(folder, tiny_model_dir, steps=8, extra=EXTRA))
    train(spec, folder / "run", backbone=tiny_backbone, console=quiet())
    return folder / "run"


@pytest.mark.parametrize(
    "method, call",
    [
        ("zero_shot", 1),  # before anything was checkpointed
        ("loss", 8),  # between the two micro-batches of step 4
        ("validate", 3),  # during step 4's validation
        ("validate", 5),  # during the last step's validation
        ("final", 1),  # during the final scoring on the dev rows
    ],
)
def test_a_run_stopped_anywhere_and_resumed_equals_the_uninterrupted_run(
    tmp_path, tiny_model_dir, tiny_backbone, straight, monkeypatch, method, call
):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=8, extra=EXTRA))
    with monkeypatch.context() as patch:
        killing(patch, method, call)
        with pytest.raises(Killed):
            train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), resume=True)
    assert_same_run(tmp_path / "run", straight)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_ctrl_c_between_steps_then_resume_equals_the_uninterrupted_run(
    tmp_path, tiny_model_dir, tiny_backbone, optimizer
):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=8, extra=f", optimizer: {optimizer}"))
    train(spec, tmp_path / "straight", backbone=tiny_backbone, console=quiet())

    def stop_at_five(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(spec, tmp_path / "cut", backbone=tiny_backbone, console=quiet(), on_step=stop_at_five)
    assert json.loads((tmp_path / "cut" / CHECKPOINT / "state.json").read_text())["state"]["step"] == 5
    train(spec, tmp_path / "cut", backbone=tiny_backbone, console=quiet(), resume=True)
    assert_same_run(tmp_path / "cut", tmp_path / "straight")


def test_a_half_written_metrics_line_does_not_break_the_resume(tmp_path, tiny_model_dir, tiny_backbone, straight):
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=8, extra=EXTRA))

    def die_at_three(step):
        if step == 3:
            with (tmp_path / "run" / "metrics.jsonl").open("a") as log:
                log.write('{"step": 4, "loss": 0.6')  # the kill landed inside an append
            raise Killed

    with pytest.raises(Killed):
        train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), on_step=die_at_three)
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), resume=True)
    assert_same_run(tmp_path / "run", straight)


def test_an_early_stopped_run_resumed_does_not_train_past_its_stop(
    tmp_path, tiny_model_dir, tiny_backbone, monkeypatch
):
    constant = {"n": 2, "accuracy": 0.5}
    monkeypatch.setattr(ClassificationTask, "validate", lambda self, progress=None: dict(constant))
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=20, extra=", patience: 2"))
    train(spec, tmp_path / "straight", backbone=tiny_backbone, console=quiet())
    killing(monkeypatch, "final", 1)  # stopped early at step 4, then killed while scoring dev
    with pytest.raises(Killed):
        train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    monkeypatch.undo()
    monkeypatch.setattr(ClassificationTask, "validate", lambda self, progress=None: dict(constant))
    info = train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), resume=True)
    assert info.metrics["steps"] == 4 and info.metrics["stopped_early"]
    assert_same_run(tmp_path / "run", tmp_path / "straight")


def test_a_kill_between_the_checkpoint_and_the_kept_prompts_file_loses_nothing(
    tmp_path, tiny_model_dir, tiny_backbone, monkeypatch
):
    """The checkpoint holds the best prompt; prompt.safetensors beside it is a copy written just after.
    Killed between the two, the resumed run restores the copy from the checkpoint."""
    scores = iter([0.5, 0.6] + [0.6] * 10)  # the initial prompt, then a best at step 2 that is never beaten
    monkeypatch.setattr(ClassificationTask, "validate", lambda self, progress=None: {"n": 2, "accuracy": next(scores)})
    spec = load_task(write_task(tmp_path, tiny_model_dir, steps=8, extra=", patience: 100"))
    train(spec, tmp_path / "straight", backbone=tiny_backbone, console=quiet())
    scores = iter([0.5, 0.6] + [0.6] * 10)
    original, saves = SoftPrompt.save, {"n": 0}

    def save(self, folder):
        saves["n"] += 1
        if saves["n"] == 2:  # step 2's new best: checkpoint written, its copy not yet
            raise Killed
        return original(self, folder)

    with monkeypatch.context() as patch:
        patch.setattr(SoftPrompt, "save", save)
        with pytest.raises(Killed):
            train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    scores = iter([0.6] * 10)
    train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), resume=True)
    assert RunInfo.read(tmp_path / "run").metrics["best_step"] == 2
    assert_same_run(tmp_path / "run", tmp_path / "straight")


def test_resuming_with_settings_that_change_the_result_is_refused(tmp_path, tiny_model_dir, tiny_backbone):
    task = write_task(tmp_path, tiny_model_dir, steps=8)
    spec = load_task(task)

    def stop(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), on_step=stop)
    with pytest.raises(TaskError, match=r"train\.lr: 0\.3 -> 0\.1"):
        train(load_task(task, {"lr": 0.1}), tmp_path / "run", backbone=tiny_backbone, console=quiet(), resume=True)
    with pytest.raises(TaskError, match=r"train\.steps: 8 -> 12.*--init from:"):
        train(load_task(task, {"steps": 12}), tmp_path / "run", backbone=tiny_backbone, console=quiet(), resume=True)
    with (tmp_path / "train.jsonl").open("a") as data:
        data.write('{"text": "one more", "label": "positive"}\n')
    with pytest.raises(TaskError, match=r"data_bytes\.train"):
        train(load_task(task), tmp_path / "run", backbone=tiny_backbone, console=quiet(), resume=True)


def test_kill_9_at_a_random_moment_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_model_dir, tiny_backbone):
    task = write_task(tmp_path, tiny_model_dir, steps=24, extra=EXTRA)
    spec = load_task(task)
    train(spec, tmp_path / "straight", backbone=tiny_backbone, console=quiet())

    run = tmp_path / "run"
    target = random.Random(os.getpid()).randint(2, 14)
    command = [sys.executable, "-m", "softprompt.cli", "train", str(task), "--out", str(run)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                step = json.loads((run / CHECKPOINT / "state.json").read_text())["state"]["step"]
            except (OSError, ValueError, KeyError):
                step = -1
            if step >= target:
                break
            time.sleep(0.005)
        assert process.poll() is None, "training ended before the kill"
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run / "task.json").exists()
    train(spec, run, backbone=tiny_backbone, console=quiet(), resume=True)
    assert_same_run(run, tmp_path / "straight")

"""The training loop's rules, pinned by numbers: the learning-rate schedule, the label vectors' own
rate and gradient clipping, each through the real loop on the tiny model where the loop applies it."""

import math

import pytest
import torch

from softprompt import train as train_module
from softprompt.task import Task
from softprompt.taskfile import TrainSettings, load_task
from softprompt.train import lr_at, train

from helpers import quiet, write_task


def test_cosine_schedule_warms_up_linearly_then_follows_half_a_cosine_to_zero():
    """10 steps, warmup 20% (2 steps), peak 0.2: the warmup climbs to the peak, then the rate is
    peak * (1 + cos(pi * progress)) / 2, progress running over the 8 steps after warmup."""
    settings = TrainSettings(lr=0.2, schedule="cosine", warmup=0.2)
    assert [lr_at(step, 10, settings) for step in (0, 1)] == pytest.approx([0.1, 0.2])
    assert lr_at(2, 10, settings) == pytest.approx(0.2)  # decay starts at the peak
    assert lr_at(4, 10, settings) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))  # 0.1707
    assert lr_at(6, 10, settings) == pytest.approx(0.1)  # the middle of the decay: half the peak
    assert lr_at(8, 10, settings) == pytest.approx(0.1 * (1 - math.cos(math.pi / 4)))  # 0.0293, mirrors step 4
    assert lr_at(9, 10, settings) == pytest.approx(0.1 * (1 + math.cos(7 * math.pi / 8)))  # 0.0076, the last step
    assert lr_at(10, 10, settings) == pytest.approx(0.0, abs=1e-12)  # the end of the curve


def _spy_optimizer(monkeypatch) -> dict:
    """Record the optimizer the loop makes and copies of its tensors as the loop starts them."""
    seen: dict = {}
    real = train_module.make_optimizer

    def spy(groups, settings):
        optimizer = real(groups, settings)
        seen["optimizer"] = optimizer
        seen["start"] = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]
        return optimizer

    monkeypatch.setattr(train_module, "make_optimizer", spy)
    return seen


def test_learned_label_vectors_step_at_label_lr_while_the_prompt_steps_at_lr(
    tmp_path, tiny_model_dir, tiny_backbone, monkeypatch
):
    """AdamW's first step moves every tensor element with a gradient by the group's rate (m/sqrt(v)
    is the gradient's sign), so after one step at a constant rate the prompt's largest move is lr
    (0.3) and the label vectors' is label_lr (0.05), not lr: the loop multiplies the rate by the
    group's `scale`, label_lr / lr."""
    seen = _spy_optimizer(monkeypatch)
    moves = {}

    def after(step):
        optimizer = seen["optimizer"]
        moves["lr"] = [g["lr"] for g in optimizer.param_groups]
        moves["max"] = [
            max(float((p.detach() - p0).abs().max()) for p, p0 in zip(g["params"], start))
            for g, start in zip(optimizer.param_groups, seen["start"])
        ]

    path = write_task(tmp_path, tiny_model_dir, steps=1, extra=", schedule: constant, warmup: 0, label_lr: 0.05")
    path.write_text(path.read_text() + "label_vectors: true\n")
    train(load_task(path), tmp_path / "run", backbone=tiny_backbone, console=quiet(), on_step=after, baselines=False, report=False)
    optimizer = seen["optimizer"]
    assert len(optimizer.param_groups) == 2
    label_group = optimizer.param_groups[1]
    assert label_group["params"][0].shape[0] == 2  # the two labels' vectors
    assert moves["lr"] == pytest.approx([0.3, 0.05])
    assert moves["max"] == pytest.approx([0.3, 0.05], rel=1e-3)


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_gradient_clipping_bounds_the_step_of_a_huge_gradient(
    tmp_path, tiny_model_dir, tiny_backbone, monkeypatch, max_grad_norm
):
    """With plain SGD in place of AdamW (a step proportional to the gradient), a loss scaled by 1e6
    moves the prompt by exactly lr * max_grad_norm (the gradient clipped to norm 1); without
    clipping (max_grad_norm: null) it moves it thousands of times further."""
    seen: dict = {}

    def sgd(groups, settings):
        optimizer = torch.optim.SGD(groups, lr=settings.lr)
        seen["start"] = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
        seen["params"] = [p for g in optimizer.param_groups for p in g["params"]]
        return optimizer

    real_loss = Task.loss
    monkeypatch.setattr(train_module, "make_optimizer", sgd)
    monkeypatch.setattr(Task, "loss", lambda self, index: 1e6 * real_loss(self, index))
    moved = {}

    def after(step):
        moved["norm"] = math.sqrt(sum(float((p.detach() - p0).pow(2).sum()) for p, p0 in zip(seen["params"], seen["start"])))

    setting = "null" if max_grad_norm is None else str(max_grad_norm)
    path = write_task(tmp_path, tiny_model_dir, steps=1, extra=f", schedule: constant, warmup: 0, max_grad_norm: {setting}")
    train(load_task(path), tmp_path / "run", backbone=tiny_backbone, console=quiet(), on_step=after, baselines=False, report=False)
    lr = 0.3
    if max_grad_norm is None:
        assert moved["norm"] > 1000 * lr
    else:
        assert moved["norm"] == pytest.approx(lr * max_grad_norm, rel=1e-4)

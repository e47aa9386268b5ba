"""Training memory that grows with the rows' length by a hidden state per layer and token: a pass
with gradients whose activations would exceed `Backbone.activation_budget` recomputes each layer in
the backward pass (activation checkpointing), and the loss and the soft prompt's gradient are the
ones the plain pass gives. Checked on the tiny Llama and the tiny Gemma 3 (sliding-window layers),
through the shared-prefix cache and, for classification, the label trie's tree mask."""

import pytest
import torch

from softprompt.backbone import layer_activation_bytes
from softprompt.classify import Classifier
from softprompt.generate import Generator
from softprompt.soft_prompt import init_prompt
from softprompt.template import Template
from softprompt.verbalizer import Verbalizer

TEXTS = ["a great film, lovely and moving", "a dull, boring mess with many more words in it", "ok", "lovely"]
CODE = ["def add(a, b): return a + b", "def f(x): return x", "def boring(): pass  # a long comment here"]
SUMMARIES = ["add two numbers", "identity", "do nothing at all"]


def _classifier(backbone):
    template = Template.parse("{soft:4} Read the review. Review: {text} Sentiment: {label}")
    words = {"pos": ["great film", "positive"], "neg": ["dull mess"], "meh": ["ok"]}
    prompt = init_prompt("vocab", template.soft_tokens, backbone, seed=1)
    clf = Classifier(backbone, template, Verbalizer.from_spec(words), prompt)
    rows = clf.encode([{"text": t} for t in TEXTS], ["pos", "neg", "meh", "pos"])
    return prompt, lambda: clf.loss(rows, list(range(len(TEXTS))))


def _generator(backbone):
    template = Template.parse("{soft:3} Code: {input} Summary: {target}", slot="target")
    prompt = init_prompt("vocab", template.soft_tokens, backbone, seed=2)
    gen = Generator(backbone, template, prompt)
    rows = gen.encode([{"input": c} for c in CODE], SUMMARIES)
    return prompt, lambda: gen.loss(rows, list(range(len(CODE))))


def _loss_and_gradient(prompt, loss_of) -> tuple[torch.Tensor, torch.Tensor]:
    prompt.vectors.grad = None
    loss = loss_of()
    loss.backward()
    return loss.detach(), prompt.vectors.grad.clone()


def _saved_bytes(loss_of) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of one loss."""
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss_of()
    return sum(storages.values())


def _last_mlp_calls(backbone):
    """A counter of the last layer's MLP calls: a recomputed layer runs it again in backward."""
    calls = [0]
    handle = backbone.body.layers[-1].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


@pytest.mark.parametrize("recomputed", ["all", "last"])
@pytest.mark.parametrize("task", [_classifier, _generator], ids=["classification", "generation"])
def test_recomputed_layers_give_the_plain_loss_and_gradient(any_backbone, task, recomputed, monkeypatch):
    prompt, loss_of = task(any_backbone)
    monkeypatch.setattr(any_backbone, "activation_budget", None)  # never recompute
    plain_loss, plain_grad = _loss_and_gradient(prompt, loss_of)
    if recomputed == "all":
        monkeypatch.setattr(any_backbone, "activation_budget", 0)
    else:  # a budget that keeps every layer but the last
        monkeypatch.setattr(any_backbone, "recomputed_layers", lambda tokens: 1 if torch.is_grad_enabled() else 0)
    calls, handle = _last_mlp_calls(any_backbone)
    try:
        loss, grad = _loss_and_gradient(prompt, loss_of)
    finally:
        handle.remove()
    assert calls[0] == 4  # the prefix's pass and the rows' pass, each forward and again in backward
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-5, atol=1e-6)
    assert grad.abs().sum() > 0


def test_recomputing_keeps_far_less_for_the_backward_pass(any_backbone, monkeypatch):
    _, loss_of = _generator(any_backbone)
    monkeypatch.setattr(any_backbone, "activation_budget", None)
    plain = _saved_bytes(loss_of)
    monkeypatch.setattr(any_backbone, "activation_budget", 0)
    recomputed = _saved_bytes(loss_of)
    assert recomputed < plain / 2, (recomputed, plain)


def test_only_the_layers_past_the_budget_recompute_and_only_with_gradients(any_backbone, monkeypatch):
    n = any_backbone.n_layers
    assert n == any_backbone.model.config.num_hidden_layers
    per_token = layer_activation_bytes(any_backbone.model.config, 1, any_backbone.dtype)
    monkeypatch.setattr(any_backbone, "activation_budget", n * 100 * per_token)
    assert any_backbone.recomputed_layers(100) == 0
    assert any_backbone.recomputed_layers(101) == 1
    assert any_backbone.recomputed_layers(100 * n) == n - 1
    assert any_backbone.recomputed_layers(100 * n * 10) == n
    with torch.no_grad():
        assert any_backbone.recomputed_layers(10**9) == 0  # inference keeps nothing for a backward pass
    monkeypatch.setattr(any_backbone, "activation_budget", None)
    assert any_backbone.recomputed_layers(10**9) == 0


def test_the_estimate_is_near_what_smollm2_keeps():
    """SmolLM2-135M's shape, fp32: measured 1.15 MB a token kept for backward (README, "Memory")."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3)  # fmt: skip
    assert 1.0e6 < 30 * layer_activation_bytes(config, 1, torch.float32) < 1.3e6


def test_train_activation_memory_sets_the_budget_and_a_resume_may_change_it(
    tmp_path, tiny_model_dir, tiny_backbone, monkeypatch
):
    """`train.activation_memory` (MiB) is the budget a run's passes keep; it changes no result, so
    it is not part of the run's identity: a run stopped and resumed under another budget goes on."""
    from softprompt.taskfile import load_task
    from softprompt.train import train

    from helpers import quiet, write_task

    monkeypatch.setattr(tiny_backbone, "activation_budget", tiny_backbone.activation_budget)  # restored after
    path = write_task(tmp_path, tiny_model_dir, steps=4, extra=", activation_memory: 0")
    stopped = {}

    def stop_at_2(step):
        if step == 2:
            stopped["budget"] = tiny_backbone.activation_budget
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_task(path), tmp_path / "run", backbone=tiny_backbone, console=quiet(), baselines=False, on_step=stop_at_2)
    assert stopped["budget"] == 0
    resumed = load_task(path, {"activation_memory": 3})
    train(resumed, tmp_path / "run", backbone=tiny_backbone, console=quiet(), baselines=False, resume=True)
    assert tiny_backbone.activation_budget == 3 * 2**20
    assert (tmp_path / "run" / "task.json").exists()

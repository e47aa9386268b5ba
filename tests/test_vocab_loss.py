"""The chunked vocabulary log-probabilities (`vocab_loss`) against the plain logits + cross-entropy."""

import pytest
import torch

from softprompt import vocab_loss
from softprompt.vocab_loss import vocab_log_probs


def _plain(hidden, weight, targets, softcap, bias):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_log_probs_and_their_gradients_equal_the_plain_cross_entropy(monkeypatch, softcap, with_bias):
    monkeypatch.setattr(vocab_loss, "CHUNK_POSITIONS", 3)  # several chunks and a short last one
    torch.manual_seed(0)
    hidden = torch.randn(10, 16, requires_grad=True)
    weight, targets = torch.randn(50, 16), torch.randint(0, 50, (10,))
    bias = torch.randn(50) if with_bias else None
    upstream = torch.randn(10)  # a weighted sum checks the gradient per position, not only its total
    fused = vocab_log_probs(hidden, weight, targets, softcap, bias)
    (grad_fused,) = torch.autograd.grad((fused * upstream).sum(), hidden)
    plain = _plain(hidden, weight, targets, softcap, bias)
    (grad_plain,) = torch.autograd.grad((plain * upstream).sum(), hidden)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_fused, grad_plain, rtol=1e-5, atol=1e-5)


def test_a_trained_output_projection_gets_its_gradient():
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    vocab_log_probs(hidden, weight, torch.tensor([1, 2, 3, 4]), None).sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_no_gradient_is_computed_without_autograd(monkeypatch):
    monkeypatch.setattr(vocab_loss, "CHUNK_POSITIONS", 2)
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(20, 8)
    with torch.no_grad():
        out = vocab_log_probs(hidden, weight, torch.tensor([0, 1, 2, 3, 4]), None)
    assert not out.requires_grad
    torch.testing.assert_close(out, _plain(hidden, weight, torch.tensor([0, 1, 2, 3, 4]), None, None).detach())

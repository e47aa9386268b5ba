"""The chunked vocabulary log-probabilities (`vocab_loss`) against plain logits and log-softmax."""

import pytest
import torch

from softprompt import vocab_loss
from softprompt.vocab_loss import vocab_log_probs


def _plain(hidden, weight, parents, tokens, softcap, bias):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, -1)[parents, tokens]


# one token per position (a generation loss), and trie nodes with several children, or none
SHAPES = {"one each": list(range(10)), "a trie": [0, 0, 0, 1, 3, 3, 4, 6, 6, 6, 6, 9]}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_log_probs_and_their_gradients_equal_the_plain_log_softmax(monkeypatch, shape, softcap, with_bias):
    monkeypatch.setattr(vocab_loss, "CHUNK_LOGITS", 3 * 50)  # 3 positions a chunk: several, a short last one
    torch.manual_seed(0)
    parents = torch.tensor(SHAPES[shape])
    hidden = torch.randn(10, 16, requires_grad=True)
    weight, tokens = torch.randn(50, 16), torch.randint(0, 50, (len(parents),))
    bias = torch.randn(50) if with_bias else None
    upstream = torch.randn(len(parents))  # a weighted sum checks each edge's gradient, not only their total
    chunked = vocab_log_probs(hidden, weight, parents, tokens, softcap, bias)
    (grad_chunked,) = torch.autograd.grad((chunked * upstream).sum(), hidden)
    plain = _plain(hidden, weight, parents, tokens, softcap, bias)
    (grad_plain,) = torch.autograd.grad((plain * upstream).sum(), hidden)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_chunked, grad_plain, rtol=1e-5, atol=1e-5)


def test_a_trained_output_projection_gets_its_gradient():
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    vocab_log_probs(hidden, weight, torch.arange(4), torch.tensor([1, 2, 3, 4]), None).sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_without_autograd_the_values_are_the_same_and_carry_no_graph(monkeypatch):
    monkeypatch.setattr(vocab_loss, "CHUNK_LOGITS", 2 * 20)
    hidden, weight, tokens = torch.randn(5, 8, requires_grad=True), torch.randn(20, 8), torch.tensor([0, 1, 2, 3, 4])
    with torch.no_grad():
        out = vocab_log_probs(hidden, weight, torch.arange(5), tokens, None)
    assert not out.requires_grad
    torch.testing.assert_close(out, _plain(hidden, weight, torch.arange(5), tokens, None, None).detach())

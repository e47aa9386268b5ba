"""Log-probabilities of chosen tokens over the whole vocabulary, a chunk of positions at a time.

Two jobs need log p(token | a position's hidden state) normalised over the whole vocabulary: a
generation task's loss (every target position, one token each) and a label's later tokens in the
label trie (a trie node, one log-probability per child). Done plainly (`head(hidden)`, then
log-softmax) a training step holds [positions, V] fp32 logits and, for the backward pass, their
log-softmax and gradient: on Gemma 3 (V = 262,144) a batch of 8 Python -> JavaScript rows has
~1,500 target positions, 1.6 GB per copy.

The output projection W is frozen (prompt tuning trains the input side), so the backward pass needs
little: with p the softmax at a position and s the soft-cap's slope (1 without one),
d log p_t / d h = s_t W_t - sum_v p_v s_v W_v. The forward pass computes, a chunk of positions at a
time, the log-probabilities and the expectation m = (p * s) @ W, [positions, H], and keeps only m;
`backward` adds up, per position, its tokens' incoming gradients times (s_t W_t - m). The same two
[chunk, V] x [V, H] products as the plain backward, and at most one [chunk, V] tensor alive (two
with a soft-cap: its slope).

Written here because the fused linear cross-entropy kernels that exist (Liger, the `kernels` hub,
torchtune's chunked losses) are Triton or torch.compile code for GPUs; this is plain PyTorch and
runs wherever the model runs. A trained output projection (the `full` method) takes the plain path:
its weight needs its own gradient.
"""

from __future__ import annotations

import torch

CHUNK_LOGITS = 2**26  # logits held at once: 256 MiB fp32, 256 positions of Gemma's vocabulary


def vocab_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, parents: torch.Tensor, tokens: torch.Tensor,
    softcap: float | None, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """[E] log p(tokens[e] | hidden[parents[e]]) over the whole vocabulary ([P, H] hidden states,
    [V, H] output projection, [E] parent index and token id per edge; `parents` ascending). Logits
    are `hidden @ weight.T (+ bias)` in the weight's dtype, then fp32, soft-capped where `softcap`
    is set. Differentiable with respect to `hidden` (see the module docstring)."""
    parents, tokens = parents.to(hidden.device), tokens.to(hidden.device)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return _plain(hidden, weight, parents, tokens, softcap, bias)
    wanted = torch.is_grad_enabled() and hidden.requires_grad
    return _ChunkedLogProbs.apply(hidden, weight, parents, tokens, softcap, bias, wanted)


def soft_cap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Final-logit soft-capping where the model has it (Gemma 2); the identity elsewhere."""
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def capped_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None, bias) -> torch.Tensor:
    """Logits of `weight`'s rows (`hidden @ weight.T + bias`, in the weight's dtype), then fp32, soft-capped."""
    return soft_cap(torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float(), softcap)


def _plain(hidden, weight, parents, tokens, softcap, bias) -> torch.Tensor:
    logits = capped_logits(hidden, weight, softcap, bias)
    return logits[parents, tokens] - logits.logsumexp(-1)[parents]


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, parents, tokens, softcap, bias, wanted):  # noqa: D102 - see vocab_log_probs
        out = torch.empty(len(tokens), dtype=torch.float32, device=hidden.device)
        norms = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        expected = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if wanted else None
        step = max(1, CHUNK_LOGITS // weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            lo, hi = torch.searchsorted(parents, torch.tensor([start, start + step], device=parents.device)).tolist()
            if lo == hi:  # no edge below these positions: nothing to score, no gradient
                continue
            logits = capped_logits(hidden[start : start + step], weight, softcap, bias)
            norm = logits.logsumexp(-1)
            local = parents[lo:hi] - start
            out[lo:hi] = logits[local, tokens[lo:hi]] - norm[local]
            norms[start : start + step] = norm
            if wanted:
                slope = 1 - (logits / softcap).square() if softcap else None  # d capped / d raw: 1 - tanh^2
                weights = logits.sub_(norm[:, None]).exp_()  # the softmax, in place of the logits
                if slope is not None:
                    weights.mul_(slope)
                expected[start : start + step] = weights.to(weight.dtype) @ weight
        ctx.save_for_backward(expected, norms, out, weight, parents, tokens)
        ctx.softcap, ctx.hidden_dtype = softcap, hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        expected, norms, out, weight, parents, tokens = ctx.saved_tensors
        rows = weight[tokens].float() * grad_out[:, None]  # each edge's own token row, weighted
        if ctx.softcap:  # times its own slope, from its capped logit (its log-probability + the norm)
            rows *= (1 - ((out + norms[parents]) / ctx.softcap).square())[:, None]
        d_hidden = torch.zeros_like(expected).index_add_(0, parents, rows)
        per_parent = torch.zeros_like(norms).index_add_(0, parents, grad_out)
        d_hidden -= per_parent[:, None] * expected
        return d_hidden.to(ctx.hidden_dtype), None, None, None, None, None, None

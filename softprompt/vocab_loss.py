"""Log-probabilities of target tokens over the whole vocabulary, a chunk of positions at a time.

A generation task's loss needs log p(target) at every target position, normalised over the whole
vocabulary. Done plainly (`head(hidden)` then cross-entropy) it holds [N, V] fp32 logits, their
log-softmax for the backward pass and, in the backward pass, their gradient: on Gemma 3 (262,144
tokens) a batch of 8 Python -> JavaScript rows has ~1,500 target positions, 1.6 GB per copy.

Here the output projection is frozen (prompt tuning trains only the input side), so the gradient
of log p(target) with respect to a hidden state is known as soon as that position is scored:
d log p_t / d h = W_t - sum_v p_v W_v (through the soft-cap's derivative where the model has one).
`forward` computes it a chunk of positions at a time and keeps only it, [N, H]; `backward` scales
it by the incoming gradient. Same values, same gradients, the same two [chunk, V] x [V, H]
products, and at most one [chunk, V] tensor alive.

Written here because the fused linear cross-entropy kernels that exist (Liger, the `kernels` hub,
torchtune's chunked losses) are Triton or torch.compile code for GPUs; this is plain PyTorch and
runs wherever the model runs. A trained output projection (the `full` method) takes the plain path:
its weight needs its own gradient.
"""

from __future__ import annotations

import torch

CHUNK_POSITIONS = 256  # [256, 262,144] fp32 is 256 MiB: the most this ever holds


def vocab_log_probs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(target) at each position over the whole vocabulary ([N, H], [V, H], [N] -> [N] fp32):
    logits are `hidden @ weight.T (+ bias)` in the weight's dtype, then fp32, soft-capped where
    `softcap` is set. Differentiable with respect to `hidden` only (see the module docstring)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return _plain(hidden, weight, targets, softcap, bias)
    wanted = torch.is_grad_enabled() and hidden.requires_grad
    return _FusedLogProbs.apply(hidden, weight, targets, softcap, bias, wanted)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None, bias) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _plain(hidden, weight, targets, softcap, bias) -> torch.Tensor:
    return -torch.nn.functional.cross_entropy(_logits(hidden, weight, softcap, bias), targets, reduction="none")


class _FusedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, bias, wanted):  # noqa: D102 - see vocab_log_probs
        out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if wanted else None
        for start in range(0, len(targets), CHUNK_POSITIONS):
            end = start + CHUNK_POSITIONS
            logits = _logits(hidden[start:end], weight, softcap, bias)
            slope = 1 - (logits / softcap).square() if wanted and softcap else None  # d tanh-capped / d raw
            target = targets[start:end, None]
            norm = torch.logsumexp(logits, -1, keepdim=True)
            out[start:end] = (logits.gather(-1, target) - norm).squeeze(-1)
            if wanted:  # d log p_t / d logits = onehot(t) - softmax, through the soft-cap's tanh
                d_logits = logits.sub_(norm).exp_().neg_().scatter_add_(-1, target, torch.ones_like(target, dtype=logits.dtype))
                if slope is not None:
                    d_logits.mul_(slope)
                grad[start:end] = d_logits.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        (grad,) = ctx.saved_tensors
        d_hidden = None if grad is None else (grad * grad_out[:, None]).to(ctx.hidden_dtype)
        return d_hidden, None, None, None, None, None

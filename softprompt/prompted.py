"""The splice: run template-rendered ids through the frozen model with the soft prompt inside.

Soft tokens arrive as negative ids (see `template.soft_id`); `splice` swaps them for the prompt's
vectors. The constant prefix (soft tokens + fixed text before the first input field) is run once,
with batch size one, and its key/value cache is shared by every row of a batch. In training the
gradient flows back through that shared cache, so the soft prompt is still learned exactly, while
each row only pays for its own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backbone import Backbone, Context, KeyValues, Layout
from .prompt import SoftPrompt

PAD_ID = 0  # any real id: padded positions are masked out of attention and never read


@dataclass
class Prefix:
    """The shared prefix's key/value states (batch 1) and its length."""

    kv: KeyValues | None
    length: int

    def context_for(self, backbone: Backbone, batch: int) -> Context | None:
        """The prefix as the starting context of a batch (its keys shared, not copied, per row)."""
        if self.kv is None:
            return None
        cache = backbone.new_cache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.kv])
        return Context(cache, Layout.of(torch.arange(self.length).unsqueeze(0)).expand(batch))


@dataclass
class RowsOutput:
    hidden: torch.Tensor  # [B, S, H] final hidden states of the rows' own tokens
    context: Context  # keys/values of prefix + rows, for continuing
    mask: torch.Tensor  # [B, S] 1 on real tokens
    lengths: torch.Tensor  # [B] real tokens per row


def pad(rows: list[list[int]], value: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into [B, S] ids and a [B, S] mask."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


class PromptedLM:
    """A frozen backbone plus (optionally) a soft prompt for a template with `soft_tokens` slots."""

    def __init__(self, backbone: Backbone, prompt: SoftPrompt | None, soft_tokens: int) -> None:
        if prompt is not None and prompt.length != soft_tokens:
            raise ValueError(f"the prompt has {prompt.length} vectors, the template {soft_tokens} soft tokens")
        self.backbone = backbone
        self.prompt = prompt

    def splice(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, S] ids (soft tokens negative) -> [B, S, H] embeddings in the model's dtype."""
        ids = ids.to(self.backbone.device)
        soft = ids < 0
        embeds = self.backbone.embed(ids.clamp(min=0))
        if soft.any():
            if self.prompt is None:
                raise ValueError("the template has soft tokens but no soft prompt was given")
            vectors = self.prompt.vectors.to(embeds.device, embeds.dtype)
            embeds = embeds.masked_scatter(soft.unsqueeze(-1), vectors[(-ids[soft] - 1)])
        return embeds

    def run_prefix(self, prefix_ids: list[int]) -> Prefix:
        if not prefix_ids:
            return Prefix(None, 0)
        ids = torch.tensor([prefix_ids])
        layout = Layout.of(torch.arange(len(prefix_ids)).unsqueeze(0))
        _, context = self.backbone.run(self.splice(ids), layout)
        return Prefix([(layer.keys, layer.values) for layer in context.cache.layers], len(prefix_ids))

    def run_rows(self, prefix: Prefix, rows: list[list[int]]) -> RowsOutput:
        """Run each row after the shared prefix; rows are right-padded."""
        ids, mask = pad(rows)
        batch, width = ids.shape
        positions = (prefix.length + torch.arange(width)).unsqueeze(0).expand(batch, -1)
        hidden, context = self.backbone.run(
            self.splice(ids), Layout.of(positions, mask), prefix.context_for(self.backbone, batch)
        )
        return RowsOutput(hidden, context, mask, mask.sum(1))

    def continuation_log_probs(
        self, prefix: Prefix, out: RowsOutput, pairs: list[tuple[int, list[int]]]
    ) -> torch.Tensor:
        """Teacher-forced log p(tokens[1:]) of each (row, tokens) continuation, after that row.

        All continuations of a row are packed into one sequence after that row's cache, each in a
        group of its own: it sees the row and its own earlier tokens only, at position ids that
        restart where the row ends. So the row's keys/values are never copied per continuation: with
        77 labels that copy, not the arithmetic, was the cost. Consumes `out.context`. The first token
        of each continuation is left out on purpose: callers score it from the slot's hidden state
        with only the label rows of the output projection."""
        batch = out.mask.shape[0]
        inputs: list[list[int]] = [[] for _ in range(batch)]
        targets: list[list[int]] = [[] for _ in range(batch)]
        owner: list[list[int]] = [[] for _ in range(batch)]  # pair index of each packed token
        offset: list[list[int]] = [[] for _ in range(batch)]  # position within its continuation
        for index, (row, tokens) in enumerate(pairs):
            inputs[row] += tokens[:-1]
            targets[row] += tokens[1:]
            owner[row] += [index] * (len(tokens) - 1)
            offset[row] += list(range(len(tokens) - 1))
        ids, real = pad(inputs)
        target_ids, _ = pad(targets)
        owners, _ = pad(owner, value=-1)
        offsets, _ = pad(offset)
        positions = prefix.length + out.lengths.unsqueeze(1) + offsets
        hidden, _ = self.backbone.run(self.splice(ids), Layout.of(positions, real, owners), out.context)
        flat = real.reshape(-1).bool().to(hidden.device)
        logp = self.backbone.token_log_probs(
            hidden.reshape(-1, hidden.shape[-1])[flat], target_ids.reshape(-1).to(hidden.device)[flat]
        )
        sums = torch.zeros(len(pairs), device=logp.device)
        return sums.index_add(0, owners.reshape(-1)[flat.cpu()].to(logp.device), logp)

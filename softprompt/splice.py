"""The splice: run template-rendered ids through the frozen model with the soft prompt inside.

Soft tokens arrive as negative ids (see `template.soft_id`); `splice` swaps them for the prompt's
vectors. The constant prefix (soft tokens + fixed text before the first input field) is run once,
with batch size one, and its key/value cache is shared by every row of a batch. In training the
gradient flows back through that shared cache, so the soft prompt is still learned exactly, while
each row only pays for its own tokens.

A batch is a list of `BatchRow`s, and each row brings its own prompted model and prefix: rows of
different tasks (prompts, prefix lengths) run in one forward pass. Each row's prefix keys are
right-padded to the longest prefix and its own tokens start at its own prefix length, so the
position-based masks of `backbone.Layout` make every row see exactly what it would see alone. One
task is the case where every row shares one prefix (its keys are then expanded, not copied).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .backbone import Backbone, Context, KeyValues, Layout, join_contexts


class Prompt(Protocol):
    """What a method puts into the model at the template's soft tokens: input vectors (a soft
    prompt, folded or still behind its encoder) or keys and values at every layer (prefix tuning)."""

    @property
    def length(self) -> int: ...

    @property
    def vectors(self) -> torch.Tensor: ...  # [N, H]; unused when prefix_kv() gives the keys

    def prefix_kv(self) -> KeyValues | None: ...

    def tensors(self) -> dict[str, torch.Tensor]: ...  # what is saved; keys a server's prefix cache

PAD_ID = 0  # any real id: padded positions are masked out of attention and never read


@dataclass
class Prefix:
    """The shared prefix's key/value states (batch 1) and its length."""

    kv: KeyValues | None
    length: int

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv or [])


EMPTY_PREFIX = Prefix(None, 0)


def batch_context(backbone: Backbone, prefixes: list[Prefix]) -> Context | None:
    """The prefixes of a batch's rows as its starting context. With one prefix its keys are
    expanded (shared, not copied); with several, each distinct prefix is padded to the longest with
    keys that no query sees (`join_contexts`) and gathered per row."""
    unique = list({id(p): p for p in prefixes}.values())
    if max(p.length for p in unique) == 0:
        return None
    batch = len(prefixes)
    if len(unique) == 1:
        kv = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in unique[0].kv]
        return Context(backbone.new_cache(kv), Layout.of(torch.arange(unique[0].length).unsqueeze(0)).expand(batch))
    like = next(p.kv for p in unique if p.kv is not None)  # an empty prefix is zero keys of this shape

    def alone(p: Prefix) -> Context:
        kv = p.kv if p.kv is not None else [(k[:, :, :0], v[:, :, :0]) for k, v in like]
        return Context(backbone.new_cache(kv), Layout.of(torch.arange(p.length).unsqueeze(0)))

    context = join_contexts([alone(p) for p in unique])
    index = {id(p): i for i, p in enumerate(unique)}
    context.select(torch.tensor([index[id(p)] for p in prefixes], device=like[0][0].device))
    return context


@dataclass
class BatchOutput:
    hidden: torch.Tensor  # [B, S, H] final hidden states of the rows' own tokens
    context: Context  # keys/values of prefix + rows, for continuing
    mask: torch.Tensor  # [B, S] 1 on real tokens
    lengths: torch.Tensor  # [B] real tokens per row
    starts: torch.Tensor  # [B] each row's prefix length: the position of its first own token


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

    def __init__(self, backbone: Backbone, prompt: Prompt | None, soft_tokens: int) -> None:
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
            return EMPTY_PREFIX
        learned = self.prompt.prefix_kv() if self.prompt is not None else None
        if learned is None:
            context = self._run_span(prefix_ids, 0, None)
        else:  # prefix tuning: the soft span is trained keys/values, not input vectors
            first = prefix_ids.index(-1)
            end = first + self.prompt.length
            context = self._run_span(prefix_ids[:first], 0, None)
            context = _with_keys(self.backbone, context, learned, first)
            context = self._run_span(prefix_ids[end:], end, context)
        assert context is not None
        return Prefix([(layer.keys, layer.values) for layer in context.cache.layers], len(prefix_ids))

    def _run_span(self, ids: list[int], start: int, context: Context | None) -> Context | None:
        """Run ids at positions start, start+1, ... after `context` (batch one)."""
        if not ids:
            return context
        layout = Layout.of(torch.arange(start, start + len(ids)).unsqueeze(0))
        _, context = self.backbone.run(self.splice(torch.tensor([ids])), layout, context)
        return context

    def run_rows(self, prefix: Prefix, rows: list[list[int]]) -> BatchOutput:
        """Rows of this model only, all after one prefix: the one-task case of `run_rows`."""
        return run_rows([BatchRow(self, prefix, ids) for ids in rows])


def _with_keys(backbone: Backbone, context: Context | None, kv: KeyValues, first: int) -> Context:
    """`context` followed by given keys/values at positions first, first+1, ... (batch one)."""
    kv = [(k.to(backbone.device, backbone.dtype), v.to(backbone.device, backbone.dtype)) for k, v in kv]
    length = kv[0][0].shape[2]
    layout = Layout.of(torch.arange(first, first + length).unsqueeze(0))
    if context is not None:
        kv = [(torch.cat([layer.keys, k], dim=2), torch.cat([layer.values, v], dim=2)) for layer, (k, v) in zip(context.cache.layers, kv)]
        layout = context.layout.cat(layout)
    return Context(backbone.new_cache(kv), layout)


@dataclass
class BatchRow:
    """One row of a batch: the prompted model of its task, the prefix it follows and its own ids."""

    lm: PromptedLM
    prefix: Prefix
    ids: list[int]
    # A row continued by a tree (the label trie: continuations that share their first tokens) says
    # where each token sits after the prefix (default 0, 1, 2, ...), its node (default -1: the row's
    # own tokens, seen by every later token) and the last node of its subtree: tree nodes are numbered
    # in pre-order and a node is seen by itself and its descendants only (`backbone.Layout`).
    offsets: list[int] | None = None
    nodes: list[int] | None = None
    last: list[int] | None = None


def splice_rows(rows: list[BatchRow], ids: torch.Tensor) -> torch.Tensor:
    """[B, S] ids -> embeddings, each row spliced with its own model's soft prompt."""
    groups: dict[int, list[int]] = {}
    for r, row in enumerate(rows):
        groups.setdefault(id(row.lm), []).append(r)
    if len(groups) == 1:
        return rows[0].lm.splice(ids)
    order = [r for members in groups.values() for r in members]
    parts = [rows[members[0]].lm.splice(ids[members]) for members in groups.values()]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts).index_select(0, inverse.to(parts[0].device))


def run_rows(rows: list[BatchRow]) -> BatchOutput:
    """Run each row after its own prefix; rows are right-padded and may belong to different tasks."""
    backbone = rows[0].lm.backbone
    ids, mask = pad([row.ids for row in rows])
    starts = torch.tensor([row.prefix.length for row in rows])
    offsets, _ = pad([row.offsets if row.offsets is not None else list(range(len(row.ids))) for row in rows])
    nodes, _ = pad([row.nodes if row.nodes is not None else [-1] * len(row.ids) for row in rows], value=-1)
    last, _ = pad([row.last if row.last is not None else [-1] * len(row.ids) for row in rows], value=-1)
    layout = Layout.of(starts.unsqueeze(1) + offsets, mask, nodes, last)
    context = batch_context(backbone, [row.prefix for row in rows])
    hidden, context = backbone.run(splice_rows(rows, ids), layout, context)
    return BatchOutput(hidden, context, mask, mask.sum(1), starts)

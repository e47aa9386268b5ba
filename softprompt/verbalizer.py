"""Verbalizers: each label is said by one or more words, and the model's opinion of those words
is the label's score.

Every (label, word) pair is a *choice*. A choice's score is the teacher-forced log-probability of
its tokens at the label slot (summed over a multi-token word). A label's score is the log of the
mean probability of its words, so a label with more words gets no unfair advantage.

The choices' token sequences share prefixes ("card arrival", "card linking", ...): `LabelTrie` holds
them as a prefix tree, so each distinct prefix is fed to the model once per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .backbone import Backbone


class VerbalizerError(ValueError):
    """The verbalizer is malformed or cannot say a label."""


@dataclass
class Verbalizer:
    words: dict[str, list[str]]  # label -> words, in label order

    @classmethod
    def from_spec(cls, spec: dict[str, str | list[str]] | list[str]) -> Verbalizer:
        """Accepts {label: word}, {label: [words]} or a plain list of labels (each its own word)."""
        if isinstance(spec, list):
            spec = {label: [label] for label in spec}
        words: dict[str, list[str]] = {}
        for label, value in spec.items():
            items = [value] if isinstance(value, str) else list(value or [])
            items = [str(w).strip() for w in items if str(w).strip()]
            if not items:
                raise VerbalizerError(f"label {label!r} has no words in the verbalizer")
            words[str(label)] = items
        if len(words) < 2:
            raise VerbalizerError("a verbalizer needs at least two labels")
        return cls(words)

    @property
    def labels(self) -> list[str]:
        return list(self.words)

    def all_words(self) -> list[str]:
        return [w for ws in self.words.values() for w in ws]

    def choices(self, backbone: Backbone, lead: str) -> Choices:
        """Tokenize every word as it follows the slot (`lead` is the whitespace before the slot)."""
        ids, owner = [], []
        for index, (label, words) in enumerate(self.words.items()):
            for word in words:
                tokens = backbone.tokenize(lead + word)
                if not tokens:
                    raise VerbalizerError(f"word {word!r} of label {label!r} tokenizes to nothing")
                ids.append(tokens)
                owner.append(index)
        return Choices(ids, torch.tensor(owner), len(self.words))


@dataclass
class Choices:
    """The tokenized (label, word) pairs."""

    ids: list[list[int]]  # token ids of each choice's word
    owner: torch.Tensor  # [C] label index of each choice
    n_labels: int

    @property
    def first_ids(self) -> torch.Tensor:
        return torch.tensor([ids[0] for ids in self.ids])

    @property
    def single_token(self) -> bool:
        return all(len(ids) == 1 for ids in self.ids)

    def trie(self, after: list[int]) -> LabelTrie:
        """The choices' words, each followed by `after` (a row's input after the slot), as a trie."""
        return LabelTrie.of([ids + after for ids in self.ids], [len(ids) for ids in self.ids])

    def label_scores(self, choice_scores: torch.Tensor) -> torch.Tensor:
        """[B, C] choice log-probs -> [B, L] label scores: log of each label's mean word probability."""
        owner = self.owner.to(choice_scores.device)
        per_label = []
        for label in range(self.n_labels):
            cols = choice_scores[:, owner == label]
            per_label.append(torch.logsumexp(cols, dim=-1) - math.log(cols.shape[1]))
        return torch.stack(per_label, dim=-1)


@dataclass
class LabelTrie:
    """Token sequences (one per choice: its word, then what follows the slot) as a prefix tree: one
    node per distinct prefix, numbered in pre-order, so node k's subtree is nodes k..last[k].

    A node's score is log p(its token | the row and its ancestors), read at its parent's hidden
    state (a first token's at the row's last token): only nodes with children are fed to the model.
    """

    tokens: list[int]  # node -> its token
    parent: list[int]  # node -> its parent; -1 for a first token
    depth: list[int]  # node -> 1 for a first token, 2 for the next, ...
    last: list[int]  # node -> the last node of its subtree
    children: list[list[int]]  # node -> its children, in pre-order
    paths: list[list[int]]  # choice -> its nodes, first token to last
    words: list[int]  # choice -> tokens of its word (the rest of its path follows the slot)

    @classmethod
    def of(cls, sequences: list[list[int]], words: list[int]) -> LabelTrie:
        kids: list[dict[int, int]] = [{}]  # built with the root as 0, then renumbered in pre-order
        token, ends = [-1], []
        for sequence in sequences:
            node = 0
            for t in sequence:
                if t not in kids[node]:
                    kids[node][t] = len(token)
                    kids.append({})
                    token.append(t)
                node = kids[node][t]
            ends.append(node)
        order, stack = [], list(reversed(kids[0].values()))
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(kids[node].values()))
        new = {old: k for k, old in enumerate(order)} | {0: -1}
        children = [[new[c] for c in kids[old].values()] for old in order]
        parent = [-1] * len(order)
        for k, kin in enumerate(children):
            for c in kin:
                parent[c] = k
        depth, last = [0] * len(order), list(range(len(order)))
        for k in range(len(order)):
            depth[k] = 1 if parent[k] < 0 else depth[parent[k]] + 1
        for k in reversed(range(len(order))):
            if children[k]:
                last[k] = last[children[k][-1]]
        paths = []
        for end in ends:
            path = [new[end]]
            while parent[path[-1]] >= 0:
                path.append(parent[path[-1]])
            paths.append(path[::-1])
        return cls([token[old] for old in order], parent, depth, last, children, paths, list(words))

    @property
    def fed(self) -> list[int]:
        """The nodes fed to the model (those with children), in pre-order."""
        return [k for k, kin in enumerate(self.children) if kin]


class LabelHead(torch.nn.Module):
    """One output vector (and bias) per label, read at the label slot: a label's score is
    `hidden · vector + bias`, one projection whatever the label names' lengths, so a row costs one
    pass over its own tokens and no label token is fed (the task's `label_vectors: per_label`).

    Labels sharing a first token ("card arrival", "card linking") get vectors of their own, which
    the first-token rows of `label_vectors: true` cannot give them."""

    def __init__(self, vectors: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.vectors = torch.nn.Parameter(vectors.detach().float().clone())  # [L, H]
        self.bias = torch.nn.Parameter(bias.detach().float().clone())  # [L]

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, H] hidden states at the slot -> [B, L] label scores (up to a per-row constant)."""
        return hidden.float() @ self.vectors.T + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"label_vectors": self.vectors.detach().cpu().contiguous(), "label_bias": self.bias.detach().cpu().contiguous()}

"""Verbalizers: each label is said by one or more words, and the model's opinion of those words
is the label's score.

Every (label, word) pair is a *choice*. A choice's score is the teacher-forced log-probability of
its tokens at the label slot (summed over a multi-token word). A label's score is the log of the
mean probability of its words, so a label with more words gets no unfair advantage.
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

    def label_scores(self, choice_scores: torch.Tensor) -> torch.Tensor:
        """[B, C] choice log-probs -> [B, L] label scores: log of each label's mean word probability."""
        owner = self.owner.to(choice_scores.device)
        per_label = []
        for label in range(self.n_labels):
            cols = choice_scores[:, owner == label]
            per_label.append(torch.logsumexp(cols, dim=-1) - math.log(cols.shape[1]))
        return torch.stack(per_label, dim=-1)

"""Classification: template + verbalizer + prompted model -> label scores.

Scores are read at the label slot from the label-word rows of the output projection only. Where a
word has several tokens, or input follows the slot (the seed's Portuguese form), the remaining
tokens are scored teacher-forced on top of the row's key/value cache.

Label before input: we score each label by the likelihood of the whole filled-in sequence (the
label's word followed by the rest of the template with the row's input). A causal model cannot
read the label after input it has not seen yet, so this is the only faithful reading; it costs one
extra short pass per label and row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .backbone import Backbone
from .prompted import Prefix, Prompt, PromptedLM, Row, run_rows
from .template import Encoded, Template
from .verbalizer import Choices, Verbalizer

DEFAULT_MAX_LENGTH = 512


@dataclass
class EncodedRows:
    encoded: Encoded
    labels: torch.Tensor | None  # [N] label indices, when known

    def __len__(self) -> int:
        return len(self.encoded.bodies)


class Classifier:
    def __init__(
        self,
        backbone: Backbone,
        template: Template,
        verbalizer: Verbalizer,
        prompt: Prompt | None,
        max_length: int = DEFAULT_MAX_LENGTH,
        prior: torch.Tensor | None = None,
    ) -> None:
        """`prior`: [L] label probabilities on content-free inputs, divided out of every prediction
        (contextual calibration, methods/zero_shot.py); None leaves scores as the model gives them."""
        self.backbone = backbone
        self.template = template
        self.verbalizer = verbalizer
        self.lm = PromptedLM(backbone, prompt, template.soft_tokens)
        self.max_length = max_length
        self.choices: Choices = verbalizer.choices(backbone, template.slot_lead)
        self.log_prior = None if prior is None else torch.as_tensor(prior, dtype=torch.float32).log()

    def calibrated(self, prior: torch.Tensor) -> Classifier:
        """The same classifier with contextual calibration by `prior`."""
        return Classifier(self.backbone, self.template, self.verbalizer, self.lm.prompt, self.max_length, prior)

    def with_prompt(self, prompt: Prompt | None) -> Classifier:
        """The same template, verbalizer, model and length with another prompt (checked against the
        template); None drops the soft tokens (plain prompting, the zero-shot baseline)."""
        template = self.template if prompt is not None or not self.template.soft_tokens else self.template.without_soft()
        return Classifier(self.backbone, template, self.verbalizer, prompt, self.max_length)

    def zero_shot(self) -> Classifier:
        return self.with_prompt(None)

    @property
    def labels(self) -> list[str]:
        return self.verbalizer.labels

    def encode(self, rows: list[dict[str, str]], labels: list[str] | None = None) -> EncodedRows:
        encoded = self.template.encode(
            rows, self.backbone.tokenize_many, self.max_length, self.backbone.bos_ids
        )
        index = {label: i for i, label in enumerate(self.labels)}
        targets = torch.tensor([index[y] for y in labels]) if labels is not None else None
        return EncodedRows(encoded, targets)

    def prefix(self, encoded: Encoded) -> Prefix:
        return self.lm.run_prefix(encoded.prefix)

    def scores(self, prefix: Prefix, bodies: list[list[int]], afters: list[list[int]]) -> torch.Tensor:
        """[B, L] label scores of rows of this task after one prefix (the one-task case of `label_scores`)."""
        return torch.stack(label_scores([LabelRow(self, prefix, b, a) for b, a in zip(bodies, afters)]))

    def batches(self, rows: EncodedRows, batch_size: int) -> Iterator[list[int]]:
        """Index batches sorted by length, so little compute goes to padding."""
        order = sorted(
            range(len(rows)), key=lambda i: len(rows.encoded.bodies[i]) + len(rows.encoded.afters[i])
        )
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]

    @torch.inference_mode()
    def predict_proba(self, rows: EncodedRows, batch_size: int = 16, progress=None) -> torch.Tensor:
        """[N, L] label probabilities, in row order."""
        prefix = self.prefix(rows.encoded)
        probs = torch.zeros(len(rows), len(self.labels))
        for index in self.batches(rows, batch_size):
            scores = self.scores(
                prefix, [rows.encoded.bodies[i] for i in index], [rows.encoded.afters[i] for i in index]
            )
            probs[index] = torch.softmax(scores.float(), dim=-1).cpu()
            if progress is not None:
                progress(len(index))
        return probs

    def loss(self, rows: EncodedRows, index: list[int]) -> torch.Tensor:
        """Cross-entropy over the labels for one training batch (prefix recomputed: it is trained)."""
        prefix = self.prefix(rows.encoded)
        scores = self.scores(
            prefix, [rows.encoded.bodies[i] for i in index], [rows.encoded.afters[i] for i in index]
        )
        assert rows.labels is not None
        return torch.nn.functional.cross_entropy(scores, rows.labels[index].to(scores.device))


@dataclass
class LabelRow:
    """A row to classify: its task's classifier, the prefix it follows, its ids before and after the slot."""

    classifier: Classifier
    prefix: Prefix
    body: list[int]
    after: list[int]


def label_scores(rows: list[LabelRow]) -> list[torch.Tensor]:
    """Each row's [L] label scores (log of mean word probability, up to a per-row constant); the
    rows may belong to different tasks (prompts, templates, verbalizers) and run as one batch.

    One forward pass per batch: after each row's own tokens come, packed, the tokens that score
    its multi-token words (a word's later tokens, and the input that follows a label slot), each
    word in a group of its own that sees the row and its own earlier tokens only, at the positions
    it would have right after the row. The first token of every word is read at the row's last
    token from the label rows of the output projection only."""
    backbone = rows[0].classifier.backbone
    pairs = [(r, word + row.after) for r, row in enumerate(rows) for word in row.classifier.choices.ids]
    packed = [Row(row.classifier.lm, row.prefix, list(row.body)) for row in rows]
    for row in packed:
        row.offsets, row.groups = list(range(len(row.ids))), [-1] * len(row.ids)
    where: list[tuple[int, int]] = []  # (row, column) of each packed token that predicts a target
    targets, owners = [], []
    for index, (r, tokens) in enumerate(pairs):
        row, body = packed[r], len(rows[r].body)
        for k, token in enumerate(tokens[:-1]):
            where.append((r, len(row.ids)))
            row.ids.append(token)
            row.offsets.append(body + k)
            row.groups.append(index)
        targets += tokens[1:]
        owners += [index] * (len(tokens) - 1)
    out = run_rows(packed)
    bodies = torch.tensor([len(row.body) for row in rows])
    slot_hidden = out.hidden[torch.arange(len(rows)), (bodies - 1).to(out.hidden.device)]
    groups: dict[int, list[int]] = {}
    for r, row in enumerate(rows):
        groups.setdefault(id(row.classifier), []).append(r)
    first: list[torch.Tensor] = [slot_hidden[0, :0]] * len(rows)  # per row: [C] first-token scores
    for members in groups.values():
        choices = rows[members[0]].classifier.choices
        logits = backbone.logits_for(slot_hidden[members], choices.first_ids)
        for r, scores in zip(members, logits):
            first[r] = scores
    flat = torch.cat(first)  # choice scores of every row, in pair order
    if where:
        at = torch.tensor(where).to(out.hidden.device)
        logp = backbone.token_log_probs(out.hidden[at[:, 0], at[:, 1]], torch.tensor(targets))
        flat = flat.index_add(0, torch.tensor(owners, device=logp.device), logp)
    per_row = flat.split([len(row.classifier.choices.ids) for row in rows])
    result: list[torch.Tensor] = list(per_row)
    for members in groups.values():
        classifier = rows[members[0]].classifier
        labels = classifier.choices.label_scores(torch.stack([per_row[r] for r in members]))
        if classifier.log_prior is not None:
            labels = labels - classifier.log_prior.to(labels.device)
        for r, scores in zip(members, labels):
            result[r] = scores
    return result

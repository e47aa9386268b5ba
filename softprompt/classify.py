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
from .splice import BatchRow, Prefix, Prompt, PromptedLM, run_rows
from .template import RenderedRows, Template
from .verbalizer import Choices, Verbalizer

DEFAULT_MAX_LENGTH = 512


@dataclass
class ClassificationRows:
    encoded: RenderedRows
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
        length_norm: bool = False,
        label_rows: torch.Tensor | None = None,
    ) -> None:
        """`prior`: [L] label probabilities on content-free inputs, divided out of every prediction
        (contextual calibration, methods/zero_shot.py); None leaves scores as the model gives them.
        `length_norm`: a word's score is its mean log-probability per token, so long label names are
        not penalised (the task's `label_scores: mean`). `label_rows`: [C, H] output vectors that read
        each choice's first token in place of the frozen output rows (learned label vectors, WARP)."""
        self.backbone = backbone
        self.template = template
        self.verbalizer = verbalizer
        self.lm = PromptedLM(backbone, prompt, template.soft_tokens)
        self.max_length = max_length
        self.choices: Choices = verbalizer.choices(backbone, template.slot_lead)
        self.prior = None if prior is None else torch.as_tensor(prior, dtype=torch.float32)
        self.log_prior = None if prior is None else self.prior.log()
        self.length_norm = length_norm
        self.label_rows = label_rows

    def _with(self, **changes) -> Classifier:
        """A copy with some of the constructor's arguments changed."""
        now = dict(
            template=self.template, prompt=self.lm.prompt, max_length=self.max_length, prior=self.prior,
            length_norm=self.length_norm, label_rows=self.label_rows,
        )
        return Classifier(self.backbone, verbalizer=self.verbalizer, **{**now, **changes})

    def calibrated(self, prior: torch.Tensor | None) -> Classifier:
        """The same classifier with contextual calibration by `prior` (None: uncalibrated)."""
        return self._with(prior=prior)

    def with_label_rows(self, rows: torch.Tensor | None) -> Classifier:
        """The same classifier reading the label slot with learned output rows (None: the model's)."""
        return self._with(label_rows=rows)

    def with_prompt(self, prompt: Prompt | None) -> Classifier:
        """The same template, verbalizer, model and length with another prompt (checked against the
        template); None drops the soft tokens, the calibration and learned label rows (plain
        prompting, the zero-shot baseline)."""
        if prompt is None:
            template = self.template.without_soft() if self.template.soft_tokens else self.template
            return self._with(template=template, prompt=None, prior=None, label_rows=None)
        return self._with(prompt=prompt)

    def zero_shot(self) -> Classifier:
        return self.with_prompt(None)

    @property
    def labels(self) -> list[str]:
        return self.verbalizer.labels

    def encode(self, rows: list[dict[str, str]], labels: list[str] | None = None) -> ClassificationRows:
        encoded = self.template.encode(
            rows, self.backbone.tokenize_many, self.max_length, self.backbone.bos_ids
        )
        index = {label: i for i, label in enumerate(self.labels)}
        targets = torch.tensor([index[y] for y in labels]) if labels is not None else None
        return ClassificationRows(encoded, targets)

    def prefix(self, encoded: RenderedRows) -> Prefix:
        return self.lm.run_prefix(encoded.prefix)

    def scores(self, prefix: Prefix, bodies: list[list[int]], afters: list[list[int]]) -> torch.Tensor:
        """[B, L] label scores of rows of this task after one prefix (the one-task case of `label_scores`)."""
        return torch.stack(label_scores([RowToScore(self, prefix, b, a) for b, a in zip(bodies, afters)]))

    def batches(self, rows: ClassificationRows, batch_size: int) -> Iterator[list[int]]:
        """Index batches sorted by length, so little compute goes to padding."""
        order = sorted(
            range(len(rows)), key=lambda i: len(rows.encoded.bodies[i]) + len(rows.encoded.afters[i])
        )
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]

    @torch.inference_mode()
    def predict_proba(self, rows: ClassificationRows, batch_size: int = 16, progress=None) -> torch.Tensor:
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

    def loss(self, rows: ClassificationRows, index: list[int]) -> torch.Tensor:
        """Cross-entropy over the labels for one training batch (prefix recomputed: it is trained)."""
        prefix = self.prefix(rows.encoded)
        scores = self.scores(
            prefix, [rows.encoded.bodies[i] for i in index], [rows.encoded.afters[i] for i in index]
        )
        assert rows.labels is not None
        return torch.nn.functional.cross_entropy(scores, rows.labels[index].to(scores.device))


@dataclass
class RowToScore:
    """A row to classify: its task's classifier, the prefix it follows, its ids before and after the slot."""

    classifier: Classifier
    prefix: Prefix
    body: list[int]
    after: list[int]


def label_scores(rows: list[RowToScore]) -> list[torch.Tensor]:
    """Each row's [L] label scores (log of mean word probability, up to a per-row constant, exact
    with `length_norm`); the rows may belong to different tasks (prompts, templates, verbalizers)
    and run as one batch.

    One forward pass per batch: after each row's own tokens come, packed, the tokens that score
    its multi-token words (a word's later tokens, and the input that follows a label slot), each
    word in a group of its own that sees the row and its own earlier tokens only, at the positions
    it would have right after the row. The first token of every word is read at the row's last
    token from the label rows of the output projection only."""
    backbone = rows[0].classifier.backbone
    pairs = [(r, word, word + row.after) for r, row in enumerate(rows) for word in row.classifier.choices.ids]
    packed = [BatchRow(row.classifier.lm, row.prefix, list(row.body)) for row in rows]
    for row in packed:
        row.offsets, row.groups = list(range(len(row.ids))), [-1] * len(row.ids)
    where: list[tuple[int, int]] = []  # (row, column) of each packed token that predicts a target
    targets, owners, in_word = [], [], []
    for index, (r, word, tokens) in enumerate(pairs):
        row, body = packed[r], len(rows[r].body)
        for k, token in enumerate(tokens[:-1]):
            where.append((r, len(row.ids)))
            row.ids.append(token)
            row.offsets.append(body + k)
            row.groups.append(index)
        targets += tokens[1:]
        owners += [index] * (len(tokens) - 1)
        in_word += [k < len(word) for k in range(1, len(tokens))]
    out = run_rows(packed)
    bodies = torch.tensor([len(row.body) for row in rows])
    slot_hidden = out.hidden[torch.arange(len(rows)), (bodies - 1).to(out.hidden.device)]
    groups: dict[int, list[int]] = {}
    for r, row in enumerate(rows):
        groups.setdefault(id(row.classifier), []).append(r)
    first: list[torch.Tensor] = [slot_hidden[0, :0]] * len(rows)  # per row: [C] first-token scores
    for members in groups.values():
        logits = _first_token_scores(rows[members[0]].classifier, slot_hidden[members])
        for r, scores in zip(members, logits):
            first[r] = scores
    flat = torch.cat(first)  # choice scores of every row, in pair order
    after = torch.zeros_like(flat)  # log-probabilities of the input that follows a slot
    if where:
        at = torch.tensor(where).to(out.hidden.device)
        logp = backbone.token_log_probs(out.hidden[at[:, 0], at[:, 1]], torch.tensor(targets))
        word = torch.tensor(in_word, device=logp.device)
        owner = torch.tensor(owners, device=logp.device)
        flat = flat.index_add(0, owner[word], logp[word])
        after = after.index_add(0, owner[~word], logp[~word])
    # label_scores: mean divides each word's log-probability by its own tokens (not by the input
    # after the slot, the same for every word); sum keeps it whole
    counts = torch.tensor([len(word) if rows[r].classifier.length_norm else 1 for r, word, _ in pairs])
    flat = flat / counts.to(flat.device) + after
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


def _first_token_scores(classifier: Classifier, hidden: torch.Tensor) -> torch.Tensor:
    """[B, C] scores of each choice's first token at the slot: logits of the label rows (learned ones
    where the classifier has them), up to a per-row constant; with `length_norm` exact
    log-probabilities, since a per-row constant divided by unequal token counts would not cancel."""
    ids, backbone = classifier.choices.first_ids, classifier.backbone
    if classifier.label_rows is None and not classifier.length_norm:
        return backbone.logits_for(hidden, ids)
    if classifier.label_rows is None:  # exact: the scores and their normaliser from the same logits
        vocab = backbone.logits(hidden)
        return vocab[:, ids.to(vocab.device)] - vocab.logsumexp(-1, keepdim=True)
    rows = classifier.label_rows.to(hidden.device).float()
    learned = backbone.cap_logits(hidden.float() @ rows.T + backbone.output_bias(ids))
    if not classifier.length_norm:
        return learned
    # the learned rows stand in for the first tokens' own rows in the normaliser
    vocab = backbone.logits(hidden).index_fill(-1, ids.unique().to(hidden.device), float("-inf"))
    return learned - torch.cat([vocab, learned], dim=-1).logsumexp(-1, keepdim=True)

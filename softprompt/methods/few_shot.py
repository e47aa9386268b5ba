"""`few-shot`: k labelled training rows rendered through the template, answers filled in, as
demonstrations before the input (in-context learning, Brown et al. 2020). They are fixed text
before the first input field, so they sit in the cached shared prefix and cost each row nothing
but attention. Nothing is trained.

k demonstrations per label (4 by default, seeded choice, labels interleaved so no label is always
last), fewer when they would not fit `DEMO_TOKENS` (Banking77's 77 intents get 1 each); the choice
is recorded in task.json. From a training set larger than CANDIDATE_ROWS they are chosen from a
seeded, label-stratified sample of that many rows (grouping every row of millions would hold them all).
"""

from __future__ import annotations

import random

from ..data import sample
from .base import Method

PER_LABEL = 4
CANDIDATE_ROWS = 10_000  # training rows the demonstrations are drawn from, at most
DEMO_TOKENS = 2048  # demonstrations' tokens at most: beyond, every row pays for a long prefix


class FewShot(Method):
    name = "few-shot"
    summary = "k training rows as in-context demonstrations, nothing trained"
    trains = False
    soft_tokens = False

    @classmethod
    def template_for(cls, task) -> tuple[str, dict]:
        text, settings = demonstrations(task)
        return text + task.template.without_soft().source(), settings

    @classmethod
    def note(cls, settings: dict) -> str | None:
        if "demonstrations" not in settings:
            return None
        return f"{settings['demonstrations']} demonstrations ({settings['per_label']} per label, {settings['demonstration_tokens']} tokens)"


def demonstrations(task) -> tuple[str, dict]:
    """The demonstrations' text (braces escaped, ending in a blank line) and what was chosen."""
    template = task.template.without_soft()
    train = sample(task.splits.train, CANDIDATE_ROWS, task.spec.train.seed, task.kind == "classification")
    rng = random.Random(task.spec.train.seed)
    by_label: dict[str, list] = {}
    for example in train:
        by_label.setdefault(task.demo_group(example), []).append(example)
    for rows in by_label.values():
        rng.shuffle(rows)
    budget = DEMO_TOKENS
    if task.model.backbone.max_positions:
        budget = min(budget, task.model.backbone.max_positions - task.spec.train.max_length - task.answer_budget())
    per_label = PER_LABEL if task.kind == "classification" else 2 * PER_LABEL
    while True:
        chosen = _interleave([rows[:per_label] for rows in by_label.values()], rng)
        text = "".join(template.render(e.fields, task.answer_text(e)) + "\n\n" for e in chosen)
        tokens = len(task.model.backbone.tokenize(text))
        if tokens <= budget or len(chosen) <= 1:
            break
        if per_label > 1:
            per_label -= 1
        else:  # one per label is still too long: as many labels as fit, seeded
            by_label = dict(list(by_label.items())[: max(1, len(by_label) * budget // tokens)])
    settings = {"demonstrations": len(chosen), "per_label": per_label, "demonstration_tokens": tokens}
    return text.replace("{", "{{").replace("}", "}}"), settings


def _interleave(groups: list[list], rng: random.Random) -> list:
    """Round-robin over the groups, each round in a seeded order."""
    out = []
    for k in range(max((len(g) for g in groups), default=0)):
        round_ = [g[k] for g in groups if k < len(g)]
        rng.shuffle(round_)
        out += round_
    return out

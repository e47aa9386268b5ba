"""A task file bound to a model: its rows split by role, and what the training loop asks of them.

Rows have one of three roles, never two: `train` rows are learned from; `validation` rows choose
(validation, early stopping, the kept prompt); `dev` rows are the report: scored with plain
zero-shot prompting before training (the model is still the base model then) and with the kept
prompt at the end. By default validation is a seeded slice of train,
stratified by label, so a file sorted by label still validates on every label; the report is the dev
file (or a held-out slice of train when there is none). `splits.json` in the run folder records
which file lines went where.

Training rows are encoded a batch at a time (`TrainRows`): a source of millions of rows is read
once at the start for every row's length and never held encoded; validation and report rows,
bounded by `eval_limit` and `report_limit`, are encoded once.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from . import plots
from .backbone import Backbone
from .classify import ClassificationRows, Classifier
from .codecheck import node_metrics, parses, require_node, run_tests
from .data import (
    DataError,
    Example,
    Rows,
    held_out_size,
    hold_out,
    k_per_label,
    label_names,
    line_runs,
    lines_by_file,
    open_rows,
    sample,
    take,
)
from .distributed import processes
from .generate import DecodeConfig, GenerationRows, Generator
from .metrics import classification_report, generation_scores
from .run import write_atomic
from .soft_prompt import SoftPrompt, init_prompt
from .taskfile import CLASSIFICATION_METRICS, GENERATION_METRICS, GenerationSpec, TaskError, TaskSpec
from .template import CutSummary, RenderedRows, Template, summarize_cuts
from .verbalizer import Verbalizer

Progress = Callable[[int], None]  # called with the number of rows just done
ROLES = ("train", "validation", "dev")
ENCODE_CHUNK = 10_000  # training rows tokenized at a time by the lengths pass
CANDIDATE_ROWS = 10_000  # training rows the init demonstrations are chosen from, at most (seeded sample)
LISTED_LINES = 100_000  # splits.json lists a role's lines one by one up to this many rows, then as runs


@dataclass
class Splits:
    train: Sequence[Example]  # a data.Rows: read from its file when iterated (it may not fit in memory)
    validation: list[Example]
    dev: list[Example]  # the report rows

    def record(self) -> dict:
        """For splits.json: per role, how many rows and which lines of which files; a role of more
        than LISTED_LINES rows as `line_runs`, runs of consecutive lines [first, last] (5 million
        numbers listed took ~200 MB to write, more than all else training on them holds)."""
        out = {}
        for role in ROLES:
            rows = getattr(self, role)
            if isinstance(rows, Rows) and len(rows) > LISTED_LINES:
                out[role] = {"rows": len(rows), "line_runs": line_runs(rows)}
            else:
                out[role] = {"rows": len(rows), "files": lines_by_file(rows)}
        return out


def read_splits(spec: TaskSpec, template: Template, labels: list[str] | None) -> Splits:
    """Train, validation and report rows, disjoint; seeded, label-stratified slices; few-shot last."""
    generation = spec.kind == "generation"
    by_label = not generation
    column = spec.data.target if generation else spec.data.label
    keep = [spec.data.tests] if generation and spec.data.tests else None
    seed, limit = spec.train.seed, spec.train.eval_limit
    group = by_label or bool(spec.train.shots)  # a generation task's targets are grouped only for shots

    def read(path: str) -> Rows:  # every row checked, labels as codes; text read when iterated or taken
        return open_rows(spec.path(path), template.fields, spec.data.columns, column, labels, keep, group=group)

    train = read(spec.data.train)
    read_rows = len(train)
    if spec.data.dev:
        dev = read(spec.data.dev)
    else:
        train, dev = hold_out(train, held_out_size(len(train), spec.data.dev_fraction, None), seed, by_label)
    if spec.data.validation:
        validation = read(spec.data.validation)
        if limit:
            validation = hold_out(validation, limit, seed, by_label, leave_one=False)[1]
    else:
        size = held_out_size(len(train), spec.data.validation_fraction, limit)
        train, validation = hold_out(train, size, seed + 1, by_label)
    if spec.train.report_limit:
        dev = hold_out(dev, spec.train.report_limit, seed, by_label, leave_one=False)[1]
    if spec.train.shots:
        train = k_per_label(train, spec.train.shots, seed)
    splits = Splits(train, list(validation), list(dev))
    _refuse_empty(splits, spec, read_rows)
    return splits


def _refuse_empty(splits: Splits, spec: TaskSpec, read_rows: int) -> None:
    """Too few rows to give every role one: say how many are needed rather than fail later."""
    empty = [role for role in ROLES if not getattr(splits, role)]
    if not empty:
        return
    message = f"{spec.path(spec.data.train)}: {read_rows} rows leave no {' and no '.join(empty)} rows."
    taken = [f"data.{role}" for role, path in (("dev", spec.data.dev), ("validation", spec.data.validation)) if not path]
    if taken:
        unit = "rows per label" if spec.kind == "classification" else "rows"
        message += (
            f" With no {' or '.join(taken)} file those rows are taken out of the training file, and each label "
            f"keeps at least one row for training: give at least {len(taken) + 1} {unit} (8 per label or more to "
            f"learn anything measurable), or name the {' and '.join(taken)} file{'s' if len(taken) > 1 else ''}."
        )
    raise TaskError(message)


def summarize(report: dict) -> dict:
    """The headline numbers of a report (what metrics.jsonl and the console show)."""
    return {k: report[k] for k in ("n", *CLASSIFICATION_METRICS, *GENERATION_METRICS) if k in report}


class TrainRows:
    """The training rows, encoded a batch at a time: what the loss reads, without holding every row encoded.

    Encoded whole, as token-id lists, a row took ~4.5 KB, so a 5-million-row file could not be
    trained on. One pass at the start encodes the rows ENCODE_CHUNK at a time (every row is checked
    against the template and the budget there, as before) and keeps only what the loop and the
    warnings need: each row's length for length bucketing (int32), the prefix every row shares, the
    input cut to fit and the answers cut. `batch` then reads and encodes just a batch's rows.

    A batch encodes exactly as the rows encoded all together would: their ids are each row's own,
    except where a row has no token before the slot, which moves the prefix's last token into every
    row of the set encoded (Template.encode); `_aligned` makes every batch (and chunk) share the
    prefix of all the rows."""

    def __init__(
        self,
        examples: Sequence[Example],
        encode: Callable[[list[Example]], ClassificationRows | GenerationRows],
        lengths: Callable[[ClassificationRows | GenerationRows], list[int]],
        answer_cuts: Callable[[ClassificationRows | GenerationRows], int],
    ) -> None:
        self.examples = examples
        self._encode = encode
        self.lengths = np.zeros(len(examples), np.int32)  # tokens per row (after the shared prefix)
        self.answer_cuts = 0  # rows whose answer was cut (generation)
        self.cuts: CutSummary | None = None
        self.prefix: list[int] = []
        self._measure(lengths, answer_cuts)

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, index: Sequence[int]) -> ClassificationRows | GenerationRows:
        """The rows at these positions, encoded, in this order (what `Task.loss` scores)."""
        return self._aligned(self._encode(take(self.examples, index)))

    def sample(self, size: int, seed: int, by_label: bool) -> ClassificationRows | GenerationRows:
        """At most `size` rows (all of a smaller set), seeded, in source order, encoded together:
        for a fit that reads a bounded set of rows (data.sample)."""
        return self._aligned(self._encode(list(sample(self.examples, size, seed, by_label))))

    @cached_property
    def encoded(self) -> RenderedRows:
        """Every row encoded at once, to look at a small source's rows (training never reads it)."""
        return self.batch(range(len(self))).encoded

    def _measure(self, lengths, answer_cuts) -> None:
        """The one pass: lengths, the shared prefix (the shortest any chunk has), cuts."""
        spans, cut_rows, worst = [], 0, (0, 0, "")
        for start, chunk in _chunks(self.examples, ENCODE_CHUNK):
            rows = self._encode(chunk)
            encoded = rows.encoded
            self.lengths[start : start + len(chunk)] = lengths(rows)
            spans.append((start, len(chunk), len(encoded.prefix)))
            if start == 0 or len(encoded.prefix) < len(self.prefix):
                self.prefix = encoded.prefix
            self.answer_cuts += answer_cuts(rows)
            cut = np.asarray(encoded.cut)
            cut_rows += int(np.count_nonzero(cut))
            if cut.size and cut.max() > worst[0]:  # the first row cut the most, as summarize_cuts
                k = int(cut.argmax())
                worst = (int(cut[k]), encoded.input_tokens[k], chunk[k].source)
        for start, size, prefix in spans:  # a chunk with a longer prefix has that much less per row
            self.lengths[start : start + size] += prefix - len(self.prefix)
        if cut_rows:
            self.cuts = CutSummary(cut_rows, len(self), *worst)

    def _aligned(self, rows):
        encoded = rows.encoded
        moved = encoded.prefix[len(self.prefix) :]
        if moved:
            encoded.prefix = encoded.prefix[: len(self.prefix)]
            encoded.bodies = [moved + body for body in encoded.bodies]
        return rows


def _chunks(examples: Sequence[Example], size: int) -> Iterator[tuple[int, list[Example]]]:
    """(first position, rows) of consecutive chunks, streaming a source's rows in one read."""
    rows = iter(examples)
    start = 0
    while chunk := list(islice(rows, size)):
        yield start, chunk
        start += len(chunk)


class Task:
    """What the two kinds share: rows by role, the current prompt, validation and the final report."""

    kind: str
    init_words: list[str] = []

    def __init__(self, spec: TaskSpec, backbone: Backbone, model, splits: Splits) -> None:
        self.spec = spec
        self.model = model
        self.splits = splits
        self.template: Template = model.template
        self._check_context(backbone)
        train = TrainRows(splits.train, lambda rows: self.encode(model, rows, True), self.row_lengths, self.answer_cuts)
        self.rows = {
            "train": train,
            "validation": self.encode(model, splits.validation, False),
            "dev": self.encode(model, splits.dev, False),
        }

    def _check_context(self, backbone: Backbone) -> None:
        need = self.spec.train.max_length + self.answer_budget()
        if backbone.max_positions and need > backbone.max_positions:
            raise TaskError(
                f"train.max_length {self.spec.train.max_length} + {self.answer_budget()} answer tokens = {need}, "
                f"more than the {backbone.max_positions} positions model {self.spec.model} can read"
            )

    def with_spec(self, spec: TaskSpec) -> Task:
        """This task, its rows as read and encoded, under a spec that changes only what the loop
        reads (learning rate, init, label vectors, steps): the runs of a search share one task."""
        changed = copy.copy(self)
        changed.spec = spec
        return changed

    # -- what the loop asks for ---------------------------------------------------------------
    def use_method(self, method) -> None:
        """Put a training method (methods/) in the model: its prompt, prefix or calibration."""
        self.model = method.apply(self.model)
        if method.label_rows is not None:
            self.model = self.model.with_label_rows(method.label_rows)

    def lengths(self) -> np.ndarray:
        """Tokens per training row, for length bucketing (int32, from the one pass over them)."""
        return self.rows["train"].lengths

    def start_prompt(self, backbone: Backbone) -> SoftPrompt:
        """The soft prompt the task's `init` asks for, as long as the template's soft tokens."""
        spec = self.spec
        demos = self.demonstrations() if spec.init == "demos" else None
        return init_prompt(spec.init, self.template.soft_tokens, backbone, self.init_words, spec.train.seed, demos)

    def demonstrations(self) -> list[str]:
        """Training rows as plain text with their answers, shortest first, taking the labels in turn
        (init `demos`: the prompt starts as the embeddings of what the task looks like done). From a
        larger training set the candidates are a seeded sample of CANDIDATE_ROWS rows, stratified by
        label (sorting millions of rendered rows would hold them all)."""
        candidates = sample(self.splits.train, CANDIDATE_ROWS, self.spec.train.seed, self.kind == "classification")
        by_answer: dict[str, list[Example]] = {}
        for example in sorted(candidates, key=lambda e: (len(self.template.render(e.fields, "")), e.source)):
            by_answer.setdefault(self.demo_group(example), []).append(example)
        queues = list(by_answer.values())
        turns = [queue[k] for k in range(max(map(len, queues), default=0)) for queue in queues if k < len(queue)]
        return [self.template.render(e.fields, self.answer_text(e)) for e in turns]

    def demo_group(self, example: Example) -> str:
        """Demonstrations take these groups in turn (a classification task's labels)."""
        return ""

    def answer_text(self, example: Example) -> str:
        return str(example.label)

    def loss(self, index: list[int]) -> torch.Tensor:
        """The training loss of the rows at `index` (positions in train), encoded just for it."""
        return self.model.loss(self.rows["train"].batch(index), list(range(len(index))))

    def loss_terms(self, index: list[int]) -> int:
        """How many terms the loss of these training rows is the mean of (one per row): a process
        holding part of a batch weighs its loss by its part (distributed.py)."""
        return len(index)

    def validate(self, progress: Progress | None = None) -> dict:
        return summarize(self.score(self.model, "validation", progress))

    def zero_shot(self, role: str, progress: Progress | None = None) -> dict:
        """The same template without its soft tokens (plain prompting) on the rows of `role`."""
        return summarize(self.score(self.model.with_prompt(None), role, progress))

    def dev_zero_shot(self, run: Path, progress: Progress | None = None) -> dict:
        """Zero-shot prompting on the report rows (training scores it before the first step)."""
        return self.zero_shot("dev", progress)

    def target_cuts(self) -> int:
        """Training rows whose answer was cut (generation only)."""
        return 0

    def require_tools(self) -> None:
        """Refuse when scoring needs a program that is not installed (a generation task's node)."""

    def cuts(self) -> list[tuple[str, CutSummary]]:
        """Per role, how much input the length budget cut (roles with no cut left out)."""
        out = []
        for role in ROLES:
            if role == "train":
                summary = self.rows[role].cuts  # from the lengths pass
            else:
                summary = summarize_cuts(self.rows[role].encoded, [e.source for e in getattr(self.splits, role)])
            if summary is not None:
                out.append((role, summary))
        return out

    # -- per kind ------------------------------------------------------------------------------
    def answer_budget(self) -> int:
        """Tokens the answer may add to a row's prompt."""
        raise NotImplementedError

    def encode(self, model, examples: list[Example], with_answers: bool):
        raise NotImplementedError

    def row_lengths(self, rows) -> list[int]:
        """Tokens of each encoded training row after the shared prefix, its answer included."""
        raise NotImplementedError

    def answer_cuts(self, rows) -> int:
        """Encoded training rows whose answer was cut (generation only)."""
        return 0

    def score(self, model, role: str, progress: Progress | None = None) -> dict:
        raise NotImplementedError

    def _predicted(self, rows, predict: Callable[[object], Sequence]) -> list:
        """`predict(rows)` as a list in row order; under N processes each predicts its slice of
        the rows and all are gathered (distributed.py)."""
        return processes().predicted(len(rows), lambda index: list(predict(_take(rows, index))))

    def _rows_for(self, model, role: str):
        """Rows of `role` rendered for `model` (re-rendered when its template differs, e.g. zero-shot)."""
        if model.template is self.template:
            return self.rows[role]
        return self.encode(model, getattr(self.splits, role), False)


class ClassificationTask(Task):
    kind = "classification"

    def __init__(self, spec: TaskSpec, backbone: Backbone) -> None:
        template = Template.parse(spec.template)
        verbalizer = Verbalizer.from_spec(spec.verbalizer) if spec.verbalizer else None
        splits = read_splits(spec, template, verbalizer.labels if verbalizer else None)
        if verbalizer is None:  # labels found in the training data, each said by its own name
            names = sorted(map(str, label_names(splits.train)))
            verbalizer = Verbalizer.from_spec({n: [n.replace("_", " ")] for n in names})
            bad = next((e for e in splits.validation + splits.dev if e.label not in verbalizer.words), None)
            if bad is not None:
                raise DataError(f"{bad.source}: label {bad.label!r} does not occur in the training data")
        self.verbalizer = verbalizer
        self.init_words = verbalizer.all_words()
        model = Classifier(
            backbone, template, verbalizer, None, spec.train.max_length, length_norm=spec.label_scores == "mean"
        )
        super().__init__(spec, backbone, model, splits)

    def answer_budget(self) -> int:
        return max(len(ids) for ids in self.model.choices.ids)

    def demo_group(self, example: Example) -> str:
        return str(example.label)

    def answer_text(self, example: Example) -> str:
        return self.verbalizer.words[str(example.label)][0]

    def encode(self, model: Classifier, examples: list[Example], with_answers: bool) -> ClassificationRows:
        return model.encode([e.fields for e in examples], [str(e.label) for e in examples])

    def row_lengths(self, rows: ClassificationRows) -> list[int]:
        return [len(b) + len(a) for b, a in zip(rows.encoded.bodies, rows.encoded.afters)]

    def score(self, model: Classifier, role: str, progress: Progress | None = None) -> dict:
        rows = self._rows_for(model, role)
        batch = self.spec.train.eval_batch_size
        predicted = self._predicted(rows, lambda part: model.predict(part, batch, progress).tolist())  # the pruned answer
        return classification_report(rows.labels.tolist(), predicted, model.labels)

    def final(self, run: Path, progress: Progress | None = None) -> dict:
        """The kept state on the dev rows; the confusion-matrix figure."""
        report = self.score(self.model, "dev", progress)
        plots.confusion_matrix(report["confusion"], report["labels"], run / "confusion_matrix.png")
        return {"dev": report}

    def describe(self) -> dict:
        return {"verbalizer": self.verbalizer.words, "label_column": self.spec.data.label}


class GenerationTask(Task):
    kind = "generation"

    def __init__(self, spec: TaskSpec, backbone: Backbone) -> None:
        template = Template.parse(spec.template, slot="target")
        splits = read_splits(spec, template, None)
        gen = spec.generation
        model = Generator(backbone, template, None, spec.train.max_length, gen.max_target_length)
        self.decode = DecodeConfig(max_new_tokens=gen.max_new_tokens, num_beams=gen.num_beams, stop=gen.stop)
        super().__init__(spec, backbone, model, splits)

    def answer_budget(self) -> int:
        return max(self.spec.generation.max_target_length, self.spec.generation.max_new_tokens)

    def encode(self, model: Generator, examples: list[Example], with_answers: bool) -> GenerationRows:
        targets = [str(e.label) for e in examples] if with_answers else None
        return model.encode([e.fields for e in examples], targets)

    def row_lengths(self, rows: GenerationRows) -> list[int]:
        assert rows.targets is not None
        return [len(b) + len(t) for b, t in zip(rows.encoded.bodies, rows.targets)]

    def answer_cuts(self, rows: GenerationRows) -> int:
        return sum(1 for c in rows.target_cut if c)

    def loss_terms(self, index: list[int]) -> int:
        """The loss is the mean over the batch's target tokens."""
        return sum(map(len, self.rows["train"].batch(index).targets))

    def score(self, model: Generator, role: str, progress: Progress | None = None) -> dict:
        batch = self.spec.train.eval_batch_size
        predictions = self._predicted(
            self._rows_for(model, role), lambda part: model.generate(part, self.decode, batch, progress)
        )
        examples = getattr(self.splits, role)
        return score_generations(predictions, examples, self.spec.generation, self.spec.data.tests)

    def final(self, run: Path, progress: Progress | None = None) -> dict:
        """The kept state on the dev rows, each row's answers written."""
        report = self.score(self.model, "dev", progress)
        write_predictions(run / "dev_predictions.jsonl", report.pop("rows"))
        return {"dev": report}

    def dev_zero_shot(self, run: Path, progress: Progress | None = None) -> dict:
        """Zero-shot prompting on the dev rows, each row's answers written."""
        report = self.score(self.model.with_prompt(None), "dev", progress)
        write_predictions(run / "dev_zero_shot_predictions.jsonl", report.pop("rows"))
        return summarize(report)

    def require_tools(self) -> None:
        gen = self.spec.generation
        if "pass_rate" in node_metrics(gen.metrics, gen.language, self.spec.data.tests):
            require_node("pass_rate")

    def target_cuts(self) -> int:
        """Training rows whose answer was cut to generation.max_target_length."""
        return self.rows["train"].answer_cuts

    def describe(self) -> dict:
        return {
            "generation": self.spec.generation.model_dump(),
            "target_column": self.spec.data.target,
            "tests_column": self.spec.data.tests,
        }


def score_generations(
    predictions: list[str], examples: list[Example], gen: GenerationSpec, tests_column: str | None
) -> dict:
    """Metrics named in the task, plus per-row records (prediction, reference, checks)."""
    references = [str(e.label) for e in examples]
    report: dict = {"n": len(examples), **generation_scores(predictions, references, gen.metrics)}
    rows = [
        {"prediction": p, "reference": r, "source": e.source}
        for p, r, e in zip(predictions, references, examples)
    ]
    if "parse_rate" in gen.metrics and gen.language:
        checks = [parses(p, gen.language) for p in predictions]
        if all(c is not None for c in checks):
            report["parse_rate"] = 100 * sum(map(bool, checks)) / max(1, len(checks))
            for row, ok in zip(rows, checks):
                row["parses"] = ok
    if "pass_rate" in gen.metrics and tests_column:
        results = [run_tests(p, e.extra[tests_column]) for p, e in zip(predictions, examples)]
        report["pass_rate"] = 100 * sum(r.passed for r in results) / max(1, len(results))
        for row, result in zip(rows, results):
            row["passed"] = result.passed
    report["rows"] = rows
    return report


def _take(rows: ClassificationRows | GenerationRows, index: list[int]) -> ClassificationRows | GenerationRows:
    """The rows at `index` (one process's slice of a role's rows), as rows of the same kind."""

    def pick(values):
        return [values[i] for i in index] if values else values

    enc = rows.encoded
    encoded = replace(enc, bodies=pick(enc.bodies), afters=pick(enc.afters), input_tokens=pick(enc.input_tokens), cut=pick(enc.cut))
    if isinstance(rows, ClassificationRows):
        return replace(rows, encoded=encoded, labels=None if rows.labels is None else rows.labels[index])
    return replace(rows, encoded=encoded, targets=pick(rows.targets), target_cut=pick(rows.target_cut))


def write_predictions(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def make_task(spec: TaskSpec, backbone: Backbone) -> Task:
    return (GenerationTask if spec.kind == "generation" else ClassificationTask)(spec, backbone)

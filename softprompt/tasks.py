"""The two kinds of task the training loop can drive, behind one small interface.

A task owns its encoded train/dev rows and its model (Classifier or Generator); the loop in
`train.py` only asks it for a loss on a batch, for validation metrics, and for the final report.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import plots
from .backbone import Backbone
from .classify import Classifier, EncodedRows
from .codecheck import parses, run_tests
from .data import DataError, Example, few_shot, load_examples, split
from .generate import DecodeConfig, Generator, GenRows
from .metrics import classification_report, generation_scores
from .prompt import SoftPrompt
from .task import CLASSIFICATION_METRICS, GENERATION_METRICS, GenerationSpec, TaskSpec
from .template import Encoded, Template
from .verbalizer import Verbalizer


def read_examples(
    spec: TaskSpec, template: Template, labels: list[str] | None
) -> tuple[list[Example], list[Example]]:
    """Train and dev rows (dev split off train when the task names no dev file); few-shot applied."""
    generation = spec.kind == "generation"
    column = spec.data.target if generation else spec.data.label
    keep = [spec.data.tests] if generation and spec.data.tests else None

    def read(path: str) -> list[Example]:
        return load_examples(spec.path(path), template.fields, spec.data.columns, column, labels, keep)

    train = read(spec.data.train)
    dev = read(spec.data.dev) if spec.data.dev else None
    if dev is None:
        train, dev = split(train, spec.data.dev_fraction, spec.train.seed)
    if spec.train.shots:
        train = few_shot(train, spec.train.shots, spec.train.seed)
    return train, dev


def _subset_encoded(enc: Encoded, index: list[int]) -> Encoded:
    return Encoded(enc.prefix, [enc.bodies[i] for i in index], [enc.afters[i] for i in index], enc.truncated)


class ClassificationTask:
    kind = "classification"

    def __init__(self, spec: TaskSpec, backbone: Backbone, prompt: SoftPrompt | None = None) -> None:
        self.spec = spec
        self.template = Template.parse(spec.template)
        verbalizer = Verbalizer.from_spec(spec.verbalizer) if spec.verbalizer else None
        train, dev = read_examples(spec, self.template, verbalizer.labels if verbalizer else None)
        if verbalizer is None:  # labels found in the data, each said by its own name
            names = sorted({str(e.label) for e in train})
            verbalizer = Verbalizer.from_spec({n: [n.replace("_", " ")] for n in names})
            bad = next((e for e in dev if e.label not in verbalizer.words), None)
            if bad is not None:
                raise DataError(f"{bad.source}: label {bad.label!r} does not occur in the training data")
        self.verbalizer = verbalizer
        self.model = Classifier(backbone, self.template, verbalizer, prompt, spec.train.max_length)
        self.train_rows = self._encode(train)
        self.dev_examples = dev
        self.dev_rows = self._encode(dev)
        self.val_rows = self._limit(self.dev_rows, spec.train.eval_limit)

    def _encode(self, examples: list[Example]) -> EncodedRows:
        return self.model.encode([e.fields for e in examples], [str(e.label) for e in examples])

    @staticmethod
    def _limit(rows: EncodedRows, limit: int | None) -> EncodedRows:
        if limit is None or limit >= len(rows):
            return rows
        index = list(range(limit))
        return EncodedRows(
            _subset_encoded(rows.encoded, index), rows.labels[:limit] if rows.labels is not None else None
        )

    # -- what the loop asks for ---------------------------------------------------------------
    @property
    def init_words(self) -> list[str]:
        return self.verbalizer.all_words()

    def lengths(self) -> list[int]:
        enc = self.train_rows.encoded
        return [len(b) + len(a) for b, a in zip(enc.bodies, enc.afters)]

    def loss(self, index: list[int]) -> torch.Tensor:
        return self.model.loss(self.train_rows, index)

    def report(self, rows: EncodedRows, model: Classifier | None = None) -> dict:
        model = model or self.model
        probs = model.predict_proba(rows, self.spec.train.eval_batch_size)
        assert rows.labels is not None
        return classification_report(rows.labels.tolist(), probs.argmax(-1).tolist(), model.labels)

    def validate(self) -> dict:
        return summarize(self.report(self.val_rows))

    def zero_shot(self) -> dict:
        plain = self.model.zero_shot()
        rows = plain.encode([e.fields for e in self.dev_examples], [str(e.label) for e in self.dev_examples])
        return summarize(self.report(self._limit(rows, self.spec.train.eval_limit), plain))

    def final(self, run: Path) -> dict:
        """Full report on the whole dev set, with the confusion-matrix figure."""
        report = self.report(self.dev_rows)
        plots.confusion_matrix(report["confusion"], report["labels"], run / "confusion_matrix.png")
        return report

    def describe(self) -> dict:
        return {"verbalizer": self.verbalizer.words, "label_column": self.spec.data.label}


def summarize(report: dict) -> dict:
    """The headline numbers of a report (what metrics.jsonl and the console show)."""
    return {k: report[k] for k in ("n", *CLASSIFICATION_METRICS, *GENERATION_METRICS) if k in report}


class GenerationTask:
    kind = "generation"
    init_words: list[str] = []

    def __init__(self, spec: TaskSpec, backbone: Backbone, prompt: SoftPrompt | None = None) -> None:
        self.spec = spec
        self.template = Template.parse(spec.template, slot="target")
        train, dev = read_examples(spec, self.template, None)
        gen = spec.generation
        self.model = Generator(backbone, self.template, prompt, spec.train.max_length, gen.max_target_length)
        self.train_rows = self.model.encode([e.fields for e in train], [str(e.label) for e in train])
        limit = spec.train.eval_limit or len(dev)
        self.dev_examples = dev[:limit]  # decoding is costly: validation and the final report use this cap
        self.dev_rows = self.model.encode([e.fields for e in self.dev_examples])
        self.decode = DecodeConfig(max_new_tokens=gen.max_new_tokens, num_beams=gen.num_beams, stop=gen.stop)

    def lengths(self) -> list[int]:
        assert self.train_rows.targets is not None
        return [len(b) + len(t) for b, t in zip(self.train_rows.encoded.bodies, self.train_rows.targets)]

    def loss(self, index: list[int]) -> torch.Tensor:
        return self.model.loss(self.train_rows, index)

    def report(self, model: Generator | None = None, rows: GenRows | None = None) -> dict:
        model = model or self.model
        predictions = model.generate(rows or self.dev_rows, self.decode, self.spec.train.eval_batch_size)
        return score_generations(predictions, self.dev_examples, self.spec.generation, self.spec.data.tests)

    def validate(self) -> dict:
        return summarize(self.report())

    def zero_shot(self) -> dict:
        plain = self.model.with_prompt(None)
        return summarize(self.report(plain, plain.encode([e.fields for e in self.dev_examples])))

    def final(self, run: Path) -> dict:
        report = self.report()
        write_predictions(run / "dev_predictions.jsonl", report.pop("rows"))
        return report

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


def write_predictions(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_task(spec: TaskSpec, backbone: Backbone, prompt: SoftPrompt | None = None):
    return (GenerationTask if spec.kind == "generation" else ClassificationTask)(spec, backbone, prompt)

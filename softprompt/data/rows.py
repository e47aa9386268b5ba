"""Rows: the validated rows of one source that one role uses, read from the file when iterated.

`open_rows` checks every row of a source once (the file is rejected whole, naming its first bad
row) and keeps each row's label code. Hold-outs and K per label then pick rows by position from the
codes, and only iterating (or `take`) turns rows into `Example`s, reading just the chunks that hold
them. A Rows is a Sequence of Examples, so code written for a list of rows reads it unchanged; a
loop over a huge training file should take its batches with `take` rather than iterate it whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .example import DataError, Example, RowSpec
from .sampling import held_out_positions, k_per_label_positions
from .source import ARROW, PARQUET, Labels, Source
from .text_files import SUFFIXES, TextFile

FORMATS = ".jsonl, .csv, .tsv, .parquet, .arrow or .feather, or a folder written by datasets' save_to_disk"


def open_source(path: str | Path) -> Source:
    """The rows of a .jsonl/.csv/.tsv file (read whole), a .parquet/.arrow/.feather file or a
    `datasets` folder (read by batch)."""
    name, path = str(path), Path(path)
    if not path.exists():
        raise DataError(f"{name}: file not found")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in PARQUET or suffix in ARROW:
        from .tables import open_table  # pyarrow only for the commands that read a table

        return open_table(path, name)
    if suffix in SUFFIXES:
        return TextFile(path, name)
    raise DataError(f"{name}: unknown format {suffix!r}: use {FORMATS}")


class Rows(Sequence[Example]):
    """Rows `index` (positions in `source`, ascending) as Examples; `labels` when grouped."""

    def __init__(self, source: Source, spec: RowSpec, labels: Labels | None, index: np.ndarray) -> None:
        self.source, self.spec, self.labels, self.index = source, spec, labels, index

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[Example]:
        return (example for _, example in self._read(self.index))

    def __getitem__(self, item):
        if isinstance(item, slice):
            return self.take(range(len(self))[item])
        return self.take([item])[0]

    def take(self, positions: Sequence[int]) -> list[Example]:
        """The rows at these positions (0-based in this Rows), in the order given; only the chunks
        of the file that hold them are read."""
        wanted = self.index[np.asarray(positions, np.int64).reshape(-1)]
        found = dict(self._read(np.unique(wanted)))
        return [found[i] for i in wanted.tolist()]

    def _read(self, indices: np.ndarray) -> Iterator[tuple[int, Example]]:
        """(position in the source, Example) for `indices` (ascending)."""
        source, spec = self.source, self.spec
        for i, record in source.records(indices, spec.needed()):
            yield i, spec.example(record, f"{source.name}:{source.number(i)}")

    def numbers(self) -> list[int]:
        """Each row's number as messages give it (a text file's line, a table's row from 1)."""
        number = self.source.number
        return [number(i) for i in self.index.tolist()]

    def label_counts(self) -> dict[str | None, int]:
        """Rows per label, in order of first appearance (grouped rows only), reading no row."""
        if self.labels is None:
            raise ValueError("these rows were opened without their labels (group=False)")
        codes, counts = np.unique(self.labels.codes[self.index], return_counts=True)
        by_code = dict(zip(codes.tolist(), counts.tolist()))
        return {name: by_code[c] for c, name in enumerate(self.labels.names) if c in by_code}

    def hold_out(self, size: int, seed: int, by_label: bool, leave_one: bool = True) -> tuple[Rows, Rows]:
        """(the rest, `size` rows taken out): seeded, stratified by label with `by_label` (see sampling)."""
        taken = held_out_positions(self._codes(by_label), len(self), size, seed, leave_one)
        kept = np.ones(len(self), bool)
        kept[taken] = False
        return self._subset(self.index[kept]), self._subset(self.index[taken])

    def k_per_label(self, shots: int, seed: int) -> Rows:
        """K rows per label, seeded; source order kept."""
        return self._subset(self.index[k_per_label_positions(self._codes(True), shots, seed)])

    def _codes(self, by_label: bool) -> np.ndarray | None:
        if not by_label:
            return None
        if self.labels is None:
            raise ValueError("sampling by label needs rows opened with group=True")
        return self.labels.codes[self.index]

    def _subset(self, index: np.ndarray) -> Rows:
        return Rows(self.source, self.spec, self.labels, index)


def open_rows(
    path: str | Path,
    fields: Sequence[str],
    columns: dict[str, str] | None = None,
    label_column: str | None = "label",
    labels: Sequence[str] | None = None,
    keep: Sequence[str] | None = None,
    group: bool = True,
) -> Rows:
    """Every row of a source, checked: `columns` maps a template field to the data column holding
    it (default: the same name); `labels`, when given, is the verbalizer's label set; `keep` names
    further columns to carry along (each must be present and non-empty). With `group` each row's
    label is kept as a code, for sampling by label (a generation task's targets need not be)."""
    spec = RowSpec(
        tuple(fields),
        tuple((columns or {}).items()),
        label_column,
        frozenset(labels) if labels is not None else None,
        tuple(keep or ()),
    )
    source = open_source(path)
    found = source.scan(spec, group)
    if not len(source):
        raise DataError(f"{source.name}: no rows")
    return Rows(source, spec, found, np.arange(len(source), dtype=np.int64))


def load_examples(
    path: str | Path,
    fields: Sequence[str],
    columns: dict[str, str] | None = None,
    label_column: str | None = "label",
    labels: Sequence[str] | None = None,
    keep: Sequence[str] | None = None,
) -> list[Example]:
    """Every row of a source as an Example, in memory (for files that are scored whole)."""
    return list(open_rows(path, fields, columns, label_column, labels, keep, group=False))


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(row number, record) for each row of a source, all in memory."""
    source = open_source(path)
    if isinstance(source, TextFile):
        return list(source.rows)
    names = list(source.schema.names)  # a table's
    return [(source.number(i), r) for i, r in source.records(np.arange(len(source)), names)]


def hold_out(
    examples: Sequence[Example], size: int, seed: int, by_label: bool, leave_one: bool = True
) -> tuple[Sequence[Example], Sequence[Example]]:
    """Take `size` rows out, seeded: (the rest, the rows taken), both in source order; with
    `by_label` every label gives its share, and with `leave_one` keeps a row (see sampling)."""
    if isinstance(examples, Rows):
        return examples.hold_out(size, seed, by_label, leave_one)
    taken = held_out_positions(_codes(examples) if by_label else None, len(examples), size, seed, leave_one)
    chosen = set(taken.tolist())
    return [e for i, e in enumerate(examples) if i not in chosen], [examples[i] for i in taken.tolist()]


def k_per_label(examples: Sequence[Example], shots: int, seed: int) -> Sequence[Example]:
    """K examples per label, drawn with a fixed seed; source order is kept."""
    if isinstance(examples, Rows):
        return examples.k_per_label(shots, seed)
    return [examples[i] for i in k_per_label_positions(_codes(examples), shots, seed).tolist()]


def take(examples: Sequence[Example], positions: Sequence[int]) -> list[Example]:
    """The rows at these positions, in this order; a Rows reads only the chunks holding them."""
    if isinstance(examples, Rows):
        return examples.take(positions)
    return [examples[i] for i in positions]


def sample(examples: Sequence[Example], size: int, seed: int, by_label: bool) -> Sequence[Example]:
    """At most `size` of the rows, seeded (stratified by label with `by_label`), in source order:
    all of them when they are no more, for a choice that would otherwise read every row."""
    if len(examples) <= size:
        return examples
    return hold_out(examples, size, seed, by_label, leave_one=False)[1]


def label_names(examples: Sequence[Example]) -> list[str | None]:
    """The labels the rows hold, each once, in order of first appearance; a Rows reads no row."""
    if isinstance(examples, Rows) and examples.labels is not None:
        return list(examples.label_counts())
    return list(dict.fromkeys(e.label for e in examples))


def _codes(examples: Sequence[Example]) -> np.ndarray:
    ids: dict[str | None, int] = {}
    return np.array([ids.setdefault(e.label, len(ids)) for e in examples], np.int64)


def lines_by_file(rows: Sequence[Example]) -> dict[str, list[int]]:
    """Which rows of which files these are (splits.json), reading no row of a Rows."""
    if isinstance(rows, Rows):
        return {rows.source.name: rows.numbers()} if len(rows) else {}
    files: dict[str, list[int]] = {}
    for example in rows:
        path, _, line = example.source.rpartition(":")
        files.setdefault(path, []).append(int(line))
    return files


def line_runs(rows: Rows) -> dict[str, list[list[int]]]:
    """Which rows of which file these are as runs of consecutive rows, [first, last] by number:
    what splits.json records of a role too large to list line by line, reading no row."""
    if not len(rows):
        return {}
    numbers = rows.source.numbers(rows.index)
    breaks = np.flatnonzero(np.diff(numbers) != 1)
    firsts = numbers[np.r_[0, breaks + 1]].tolist()
    lasts = numbers[np.r_[breaks, len(numbers) - 1]].tolist()
    return {rows.source.name: [list(run) for run in zip(firsts, lasts)]}


def fingerprint(path: str | Path) -> str:
    """sha256 of a source's bytes, 16 hex digits, read in blocks: a file's bytes, or a folder's
    files (each relative name, then its bytes, in name order)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()[:16]

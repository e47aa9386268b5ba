"""JSONL, CSV and TSV: text files, read whole (records keep their line numbers)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .example import DataError, RowSpec
from .source import LabelCoder, Labels, Source

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": ",", ".tsv": "\t"}


def read_text(path: Path) -> str:
    """The whole file as text; bytes that are not UTF-8 are an error naming the line they sit on."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(_not_utf8(path, err)) from err


def _not_utf8(path: Path, err: UnicodeDecodeError) -> str:
    """`file:line: not UTF-8 text (byte 0xe9 at column 12); ...` for a failed decode of the file's bytes."""
    data = err.object
    line_start = data.rfind(b"\n", 0, err.start) + 1
    line = data.count(b"\n", 0, err.start) + 1
    return (
        f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {err.start - line_start + 1}); "
        "save the file as UTF-8"
    )


def read_text_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) for each row of a .jsonl, .csv or .tsv file."""
    kind = SUFFIXES[path.suffix.lower()]
    return _read_jsonl(path) if kind == "jsonl" else _read_delimited(path, kind)


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    records = []
    # newline=None: lines end at \n, \r\n or \r, as when reading the file in text mode
    with io.StringIO(read_text(path), newline=None) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append((number, record))
    return records


def _read_delimited(path: Path, delimiter: str) -> list[tuple[int, dict]]:
    records = []
    with io.StringIO(read_text(path), newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        for record in reader:
            if None in record:
                raise DataError(f"{path}:{reader.line_num}: more values than header columns")
            records.append((reader.line_num, record))
    return records


class TextFile(Source):
    """A text file's records, held in memory (as they always were); rows are numbered by line."""

    def __init__(self, path: Path, name: str) -> None:
        self.name = name
        self.rows = read_text_records(path)

    def __len__(self) -> int:
        return len(self.rows)

    def number(self, i: int) -> int:
        return self.rows[i][0]

    def scan(self, spec: RowSpec, group: bool) -> Labels | None:
        coder = LabelCoder()
        codes = np.empty(len(self.rows), np.int32)
        for i, (number, record) in enumerate(self.rows):
            example = spec.example(record, f"{self.name}:{number}")
            codes[i] = coder.code(example.label)
        return Labels(coder.names(), codes) if group else None

    def records(self, indices: np.ndarray, columns: list[str]) -> Iterator[tuple[int, dict]]:
        for i in indices.tolist():
            self.converted += 1
            yield i, self.rows[i][1]

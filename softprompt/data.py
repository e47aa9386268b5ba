"""Reading task data: JSONL, CSV or TSV, validated row by row.

Every problem names the file, the line and the field, and a file is rejected whole rather than
trained on with rows silently dropped.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A data file cannot be used; the message names file, line and field."""


@dataclass
class Example:
    fields: dict[str, str]  # template field -> text
    label: str | None  # the label (classification) or target text (generation)
    source: str  # "file:line", for error messages
    extra: dict[str, str] = field(default_factory=dict)  # other columns asked for (e.g. tests)


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for each row of a .jsonl, .csv or .tsv file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    raise DataError(f"{path}: unknown format {suffix!r}: use .jsonl, .csv or .tsv")


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


def load_examples(
    path: str | Path,
    fields: list[str],
    columns: dict[str, str] | None = None,
    label_column: str | None = "label",
    labels: list[str] | None = None,
    keep: list[str] | None = None,
) -> list[Example]:
    """Validate and map rows. `columns` maps a template field to the data column holding it
    (default: the same name). `labels`, when given, is the verbalizer's label set; `keep` names
    further columns to carry along (each must be present and non-empty)."""
    columns = columns or {}
    known = set(labels) if labels is not None else None
    examples = []
    records = read_records(path)
    for number, record in records:
        where = f"{path}:{number}"
        values = {}
        for name in fields:
            column = columns.get(name, name)
            values[name] = _text(record, column, where)
        label = None
        if label_column is not None:
            label = _text(record, label_column, where)
            if known is not None and label not in known:
                raise DataError(
                    f"{where}: field {label_column!r}: label {label!r} is not in the verbalizer "
                    f"({', '.join(sorted(known))})"
                )
        extra = {column: _text(record, column, where) for column in keep or []}
        examples.append(Example(values, label, where, extra))
    if not examples:
        raise DataError(f"{path}: no rows")
    return examples


def _text(record: dict, column: str, where: str) -> str:
    if column not in record or record[column] is None:
        raise DataError(f"{where}: missing field {column!r}")
    value = record[column]
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise DataError(f"{where}: field {column!r} should be text, got {type(value).__name__}")
    value = str(value)
    if not value.strip():
        raise DataError(f"{where}: field {column!r} is empty")
    return value


def k_per_label(examples: list[Example], shots: int, seed: int) -> list[Example]:
    """K examples per label, drawn with a fixed seed; source order is kept."""
    by_label: dict[str | None, list[int]] = {}
    for i, example in enumerate(examples):
        by_label.setdefault(example.label, []).append(i)
    rng = random.Random(seed)
    chosen = [i for idx in by_label.values() for i in rng.sample(idx, min(shots, len(idx)))]
    return [examples[i] for i in sorted(chosen)]


def hold_out(
    examples: list[Example], size: int, seed: int, by_label: bool, leave_one: bool = True
) -> tuple[list[Example], list[Example]]:
    """Take `size` rows out, seeded: returns (the rest, the rows taken), both in source order.

    With `by_label` every label gives its share (largest remainder), so a file sorted by label still
    yields every label; with `leave_one` a label also keeps at least one row in the rest (so holding
    rows out of train never removes a label from training)."""
    size = min(size, len(examples))
    rng = random.Random(seed)
    if not by_label:
        chosen = set(rng.sample(range(len(examples)), size))
    else:
        groups: dict[str | None, list[int]] = {}
        for i, example in enumerate(examples):
            groups.setdefault(example.label, []).append(i)
        chosen = set()
        for label, quota in _quotas({k: len(v) for k, v in groups.items()}, size).items():
            chosen |= set(rng.sample(groups[label], min(quota, len(groups[label]) - leave_one)))
    rest = [e for i, e in enumerate(examples) if i not in chosen]
    return rest, [examples[i] for i in sorted(chosen)]


def _quotas(counts: dict, size: int) -> dict:
    """Split `size` over the keys in proportion to `counts` (largest remainder, ties in key order)."""
    total = sum(counts.values())
    exact = {k: size * n / total for k, n in counts.items()}
    quotas = {k: int(v) for k, v in exact.items()}
    by_remainder = sorted(counts, key=lambda k: quotas[k] - exact[k])
    for k in by_remainder[: size - sum(quotas.values())]:
        quotas[k] += 1
    return quotas


def held_out_size(n: int, fraction: float, limit: int | None) -> int:
    """Rows to hold out of n: the fraction (at least one), at most `limit`."""
    size = max(1, round(n * fraction))
    return min(size, limit) if limit else size

"""Parquet, Arrow IPC (feather) and `datasets` folders: columnar tables, read one record batch at a time.

A table is never read whole. Checking it reads only the columns the task uses, batch by batch, and
checks them with Arrow's vectorised kernels (nulls, blank text, types, labels outside the
verbalizer), keeping one int32 label code per row; rows become Python records only when asked for,
and then only the row groups (Parquet) or batches that hold them are read. Memory is bounded by one
batch of the used columns, a Parquet row group's compressed pages, and the codes. Arrow and
`datasets` files are memory-mapped (the OS pages them in and out; they are not copied to the heap).

Rows are numbered from 1 in messages, like a text file's lines: `train.parquet:12` is pandas'
`df.iloc[11]` and `datasets`' `ds[11]`. A column of `datasets`' ClassLabel type (in a saved folder,
or in the schema metadata `datasets` writes into Parquet and Arrow files) reads as its class names.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .example import DataError, RowSpec, empty, missing, not_text, unknown_label
from .source import PARQUET, LabelCoder, Labels, Source

BATCH_ROWS = 65_536  # rows per record batch read: a few MB of short texts


class Table(Source):
    """One columnar table, as a list of chunks that can be read independently (Parquet row groups,
    Arrow record batches, slices of a `datasets` folder)."""

    schema: pa.Schema
    chunks: list[tuple[int, int]]  # (first row, rows) of each chunk, in order
    class_names: dict[str, list[str]]  # ClassLabel columns -> their names

    def read(self, chunk: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def __len__(self) -> int:
        return sum(rows for _, rows in self.chunks)

    def number(self, i: int) -> int:
        return i + 1

    def numbers(self, indices: np.ndarray) -> np.ndarray:
        return indices + 1

    def batches(self, columns: list[str]) -> Iterator[tuple[int, pa.RecordBatch]]:
        """(first row, batch) over the whole table, `columns` only."""
        for k, (start, _) in enumerate(self.chunks):
            for batch in self.read(k, columns):
                yield start, batch
                start += batch.num_rows

    def scan(self, spec: RowSpec, group: bool) -> Labels | None:
        columns = spec.needed()
        absent = [c for c in columns if c not in self.schema.names]
        if absent:
            raise DataError(
                f"{missing(f'{self.name}:1', absent[0])} (its columns: {', '.join(self.schema.names)})"
            )
        if not self.chunks or len(self) == 0:
            raise DataError(f"{self.name}: no rows")
        coder = LabelCoder()
        codes = np.zeros(len(self), np.int32) if group else None
        for start, batch in self.batches(columns):
            problems = []
            for rank, (column, is_label) in enumerate(spec.checks()):
                values = self._values(batch.column(column), column)
                found = _first_problem(values)
                if found is not None:
                    row, kind = found
                    problems.append((row, rank, self._message(start + row, column, kind, values, row)))
                if is_label and _readable(values.type):  # (a type problem is reported above)
                    labels = pc.dictionary_encode(values)
                    names = [str(v) for v in labels.dictionary.to_pylist()]  # numbers as text rows read them
                    problems += self._unknown_labels(labels.indices, names, spec, start, rank)
                    if codes is not None:
                        lookup = np.array([coder.code(name) for name in names] + [-1], np.int32)
                        at = labels.indices.fill_null(len(names)).to_numpy(zero_copy_only=False)
                        codes[start : start + len(values)] = lookup[at]
            if problems:
                raise DataError(min(problems)[2])
        if not group:
            return None
        return Labels(coder.names() if spec.label is not None else [None], codes)

    def _values(self, array: pa.Array, column: str) -> pa.Array:
        """The column as the rows read it: dictionaries decoded, class numbers as their names."""
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        names = self.class_names.get(column)
        if names is not None:  # -1 (datasets' "no label") and unknown numbers read as missing
            number = pc.cast(array, pa.int64())
            valid = pc.and_(pc.greater_equal(number, 0), pc.less(number, len(names)))
            array = pc.take(pa.array(names, pa.string()), pc.if_else(valid, number, None))
        return array

    def _message(self, row: int, column: str, kind: str, values: pa.Array, local: int) -> str:
        where = f"{self.name}:{self.number(row)}"
        if kind == "missing":
            return missing(where, column)
        if kind == "empty":
            return empty(where, column)
        return not_text(where, column, type(values[local].as_py()).__name__)

    def _unknown_labels(
        self, indices: pa.Array, names: list[str], spec: RowSpec, start: int, rank: int
    ) -> list:
        """Rows whose label the verbalizer lacks, as problems ranked just after the label's own check."""
        if spec.labels is None:
            return []
        problems = []
        for j, label in enumerate(names):
            if label not in spec.labels:
                row = pc.index(indices, j).as_py()
                where = f"{self.name}:{self.number(start + row)}"
                problems.append((row, rank + 0.5, unknown_label(where, spec.label, label, spec.labels)))
        return problems

    def records(self, indices: np.ndarray, columns: list[str]) -> Iterator[tuple[int, dict]]:
        for k, (first, rows) in enumerate(self.chunks):
            lo, hi = np.searchsorted(indices, [first, first + rows])
            if lo == hi:
                continue  # no chosen row in this chunk: it is not read
            wanted, start = indices[lo:hi], first
            for batch in self.read(k, columns):
                a, b = np.searchsorted(wanted, [start, start + batch.num_rows])
                if a < b:
                    part = batch.take(pa.array(wanted[a:b] - start))
                    part = pa.RecordBatch.from_arrays(
                        [self._values(part.column(c), c) for c in columns], names=columns
                    )
                    rows_read = part.to_pylist()
                    self.converted += len(rows_read)
                    yield from zip(wanted[a:b].tolist(), rows_read)
                start += batch.num_rows
                if start > wanted[-1]:
                    break


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _readable(kind: pa.DataType) -> bool:
    """Text, or numbers (written out as text, as in a JSONL row)."""
    return _is_text(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _first_problem(values: pa.Array) -> tuple[int, str] | None:
    """(row, "missing" | "type" | "empty") of the first bad value in the batch, or None.

    Blank means empty after trimming Unicode whitespace (Arrow's), which matches str.strip() on all
    but a few control characters; a row it misses still fails the exact check when it is read."""
    kind = values.type
    if pa.types.is_null(kind):
        return (0, "missing") if len(values) else None
    found = []
    if values.null_count:
        found.append((pc.index(pc.is_null(values), True).as_py(), "missing"))
    if _is_text(kind):
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0)
        row = pc.index(blank, True).as_py()
        if row >= 0:
            found.append((row, "empty"))
    elif not _readable(kind):
        row = pc.index(pc.is_valid(values), True).as_py()
        if row >= 0:
            found.append((row, "type"))
    return min(found) if found else None


def _class_names(schema: pa.Schema, features=None) -> dict[str, list[str]]:
    """ClassLabel columns from `datasets` features (given, or in the schema metadata it writes)."""
    if features is None:
        if not (schema.metadata and b"huggingface" in schema.metadata):
            return {}
        from datasets import Features

        try:
            features = Features.from_arrow_schema(schema)
        except Exception:  # metadata we cannot read: the plain column values, then
            return {}
    from datasets import ClassLabel

    return {name: list(f.names) for name, f in features.items() if isinstance(f, ClassLabel)}


class ParquetTable(Table):
    """Chunks are row groups; each is read in batches of BATCH_ROWS, used columns only."""

    def __init__(self, path: Path, name: str) -> None:
        import pyarrow.parquet as pq

        self.name = name
        try:
            self.file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{name}: not a readable Parquet file ({err})") from err
        self.schema = self.file.schema_arrow
        meta = self.file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.chunks = list(zip(np.cumsum([0, *sizes[:-1]]).tolist(), sizes))
        self.class_names = _class_names(self.schema)

    def read(self, chunk: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        try:
            yield from self.file.iter_batches(BATCH_ROWS, row_groups=[chunk], columns=columns)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{self.name}: row group {chunk} cannot be read ({err})") from err


class ArrowTable(Table):
    """An Arrow IPC file (random access by record batch) or stream, memory-mapped."""

    def __init__(self, path: Path, name: str) -> None:
        self.name = name
        try:
            mapped = pa.memory_map(str(path))
            try:
                reader = pa.ipc.open_file(mapped)
                self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
                self.schema = reader.schema
            except pa.ArrowInvalid:  # not the file format: the stream format (as datasets writes)
                mapped.seek(0)
                stream = pa.ipc.open_stream(mapped)
                self._batches = list(stream)
                self.schema = stream.schema
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{name}: not a readable Arrow IPC (feather v2) file ({err})") from err
        sizes = [b.num_rows for b in self._batches]
        self.chunks = list(zip(np.cumsum([0, *sizes[:-1]]).tolist(), sizes))
        self.class_names = _class_names(self.schema)

    def read(self, chunk: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        batch = self._batches[chunk].select(columns)
        for start in range(0, batch.num_rows, BATCH_ROWS):
            yield batch.slice(start, BATCH_ROWS)


class DatasetFolder(Table):
    """A folder written by `datasets`' save_to_disk, opened with load_from_disk (memory-mapped)."""

    def __init__(self, path: Path, name: str) -> None:
        from datasets import DatasetDict, load_from_disk

        self.name = name
        try:
            dataset = load_from_disk(str(path))
        except (FileNotFoundError, ValueError, pa.ArrowException) as err:
            raise DataError(f"{name}: not a folder written by datasets' save_to_disk ({err})") from err
        if isinstance(dataset, DatasetDict):
            splits = list(dataset)
            raise DataError(
                f"{name}: a DatasetDict holding the splits {', '.join(splits)}: name one of them, "
                f"e.g. {Path(name) / splits[0]}"
            )
        self.dataset = dataset.with_format("arrow")
        self.schema = dataset.features.arrow_schema
        n = dataset.num_rows
        self.chunks = [(start, min(BATCH_ROWS, n - start)) for start in range(0, n, BATCH_ROWS)]
        self.class_names = _class_names(self.schema, dataset.features)
        self._views: dict[tuple[str, ...], object] = {}

    def read(self, chunk: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
        key = tuple(columns)
        if key not in self._views:
            self._views[key] = self.dataset.select_columns(columns)
        start, rows = self.chunks[chunk]
        yield from self._views[key][start : start + rows].to_batches()


def open_table(path: Path, name: str) -> Table:
    if path.is_dir():
        return DatasetFolder(path, name)
    if path.suffix.lower() in PARQUET:
        return ParquetTable(path, name)
    return ArrowTable(path, name)

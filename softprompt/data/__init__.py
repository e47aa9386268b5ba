"""Task data: rows from files, checked, and chosen for their role without reading what is not used.

A source is JSONL, CSV or TSV (text, read whole), Parquet, Arrow IPC / feather, or a folder written
by `datasets`' save_to_disk (tables, read one record batch at a time). Opening one checks every row
of the columns the task reads and keeps each row's label as a small integer; hold-outs and K per
label are drawn from those codes alone, and rows become `Example`s only when a role reads them. So
the validation slice of a 5-million-row Parquet file reads the text of its own rows only. Every
problem names the file, the row (a text file's line; a table's row counted from 1) and the field,
and a source is rejected whole rather than trained on with rows silently dropped.

    example.py     Example, DataError, the rule a row must pass (RowSpec)
    text_files.py  JSONL, CSV, TSV
    tables.py      Parquet, Arrow, datasets folders, by record batch
    rows.py        Rows: a source's checked rows, read when iterated; open_rows, load_examples
    sampling.py    seeded, label-stratified hold-outs and K per label, on label codes
"""

from .example import DataError, Example, RowSpec
from .rows import (
    FORMATS,
    Rows,
    fingerprint,
    hold_out,
    k_per_label,
    label_names,
    line_runs,
    lines_by_file,
    load_examples,
    open_rows,
    open_source,
    read_records,
    sample,
    take,
)
from .sampling import held_out_size
from .text_files import read_text

__all__ = [
    "FORMATS",
    "DataError",
    "Example",
    "RowSpec",
    "Rows",
    "fingerprint",
    "held_out_size",
    "hold_out",
    "k_per_label",
    "label_names",
    "line_runs",
    "lines_by_file",
    "load_examples",
    "open_rows",
    "open_source",
    "read_records",
    "read_text",
    "sample",
    "take",
]

"""What every kind of data file offers the rest: its rows by position, checked in one pass, and
only the rows asked for turned into Python records."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .example import RowSpec

PARQUET = (".parquet", ".pq")
ARROW = (".arrow", ".feather", ".ipc", ".arrows")  # Arrow IPC: the file format (feather v2) or a stream


@dataclass
class Labels:
    """Every row's label as a small integer: `names[codes[i]]` is row i's label. Names are in order
    of first appearance, which is the order the seeded samplers take the labels in."""

    names: list[str]
    codes: np.ndarray  # int32, one per row


class Source:
    """Rows of one file, by position from 0. `number(i)` is what messages call row i: a text file's
    line, a table's row counted from 1. `converted` counts the rows turned into Python records, the
    costly step that reading only the chosen rows avoids."""

    name: str  # the path as given, as messages write it
    converted: int = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def number(self, i: int) -> int:
        raise NotImplementedError

    def numbers(self, indices: np.ndarray) -> np.ndarray:
        """`number` of each of these rows, as an array."""
        return np.fromiter(map(self.number, indices.tolist()), np.int64, len(indices))

    def scan(self, spec: RowSpec, group: bool) -> Labels | None:
        """Check every row against `spec` (the first bad row, in file order, is the DataError) and,
        with `group`, return every row's label code."""
        raise NotImplementedError

    def records(self, indices: np.ndarray, columns: list[str]) -> Iterator[tuple[int, dict]]:
        """(position, record) for the rows at `indices` (ascending), in that order, reading no others."""
        raise NotImplementedError


class LabelCoder:
    """Assigns codes to label names in order of first appearance."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def code(self, name: str) -> int:
        return self.ids.setdefault(name, len(self.ids))

    def names(self) -> list[str]:
        return list(self.ids)

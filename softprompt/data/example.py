"""One row as a task reads it, and the rule every row must pass, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """A data source cannot be used; the message names file, row (a text file's line) and field."""


@dataclass
class Example:
    fields: dict[str, str]  # template field -> text
    label: str | None  # the label (classification) or target text (generation)
    source: str  # "file:line" (a table's row, counted from 1), for error messages
    extra: dict[str, str] = field(default_factory=dict)  # other columns asked for (e.g. tests)


@dataclass(frozen=True)
class RowSpec:
    """What a task reads from each row: template fields (from their columns), the label or target
    column, the verbalizer's labels when known, and further columns to carry along."""

    fields: tuple[str, ...]
    columns: tuple[tuple[str, str], ...] = ()  # template field -> data column, where they differ
    label: str | None = "label"
    labels: frozenset[str] | None = None
    keep: tuple[str, ...] = ()

    def column(self, name: str) -> str:
        return dict(self.columns).get(name, name)

    def checks(self) -> list[tuple[str, bool]]:
        """(column, is the label) in the order a row is checked; the first failing one is reported."""
        out = [(self.column(name), False) for name in self.fields]
        if self.label is not None:
            out.append((self.label, True))
        return out + [(column, False) for column in self.keep]

    def needed(self) -> list[str]:
        """The columns read, each once, in check order."""
        return list(dict.fromkeys(column for column, _ in self.checks()))

    def example(self, record: dict, where: str) -> Example:
        """The row as an Example, or the DataError naming its first bad field."""
        values = {name: text(record, self.column(name), where) for name in self.fields}
        label = None
        if self.label is not None:
            label = text(record, self.label, where)
            if self.labels is not None and label not in self.labels:
                raise DataError(unknown_label(where, self.label, label, self.labels))
        extra = {column: text(record, column, where) for column in self.keep}
        return Example(values, label, where, extra)


def text(record: dict, column: str, where: str) -> str:
    """A field's value as text: strings as they are, numbers written out; anything else, a missing
    value or blank text is an error."""
    if column not in record or record[column] is None:
        raise DataError(missing(where, column))
    value = record[column]
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise DataError(not_text(where, column, type(value).__name__))
    value = str(value)
    if not value.strip():
        raise DataError(empty(where, column))
    return value


# the messages, shared with the batch checks of tables.py
def missing(where: str, column: str) -> str:
    return f"{where}: missing field {column!r}"


def not_text(where: str, column: str, kind: str) -> str:
    return f"{where}: field {column!r} should be text, got {kind}"


def empty(where: str, column: str) -> str:
    return f"{where}: field {column!r} is empty"


def unknown_label(where: str, column: str, label: str, known: frozenset[str]) -> str:
    return f"{where}: field {column!r}: label {label!r} is not in the verbalizer ({', '.join(sorted(known))})"

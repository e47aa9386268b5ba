"""Templates: where soft tokens, fixed text, input fields and the answer slot go.

Syntax: `{soft}` (20 soft tokens) or `{soft:N}`, `{field}` for any data column, `{label}` (the
verbalizer reads here) or `{target}` (a generation answer starts here), and `{{`/`}}` for literal
braces. Example: `{soft:20} Review: {text} Sentiment: {label}`.

Rendering produces token ids where soft tokens appear as negative ids (-1 - k for soft vector k),
so a whole row is one integer sequence that the model side splices into embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

DEFAULT_SOFT_TOKENS = 20
SLOTS = ("label", "target")
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TemplateError(ValueError):
    """The template text is not valid."""


@dataclass(frozen=True)
class Segment:
    kind: Literal["soft", "text", "field", "slot"]
    value: str = ""  # text, field name or slot name
    count: int = 0  # soft tokens in this segment


def soft_id(k: int) -> int:
    """The negative id standing for soft vector k."""
    return -1 - k


def _parse_placeholder(body: str, template: str) -> Segment:
    name, _, arg = body.strip().partition(":")
    name = name.strip()
    if name == "soft":
        if not arg:
            return Segment("soft", count=DEFAULT_SOFT_TOKENS)
        try:
            count = int(arg)
        except ValueError:
            count = 0
        if not 1 <= count <= 2048:
            raise TemplateError(f"bad soft token count {{{body}}} in {template!r}: use 1..2048")
        return Segment("soft", count=count)
    if arg:
        raise TemplateError(f"unknown placeholder {{{body}}} in {template!r}")
    if name in SLOTS:
        return Segment("slot", name)
    if not _FIELD_NAME.match(name):
        raise TemplateError(f"bad field name {{{body}}} in {template!r}")
    return Segment("field", name)


def _merge_text(segments: list[Segment]) -> list[Segment]:
    """Merge adjacent text and drop empty text; keep segments as written otherwise."""
    merged: list[Segment] = []
    for seg in segments:
        if seg.kind == "text" and merged and merged[-1].kind == "text":
            merged[-1] = Segment("text", merged[-1].value + seg.value)
        elif seg.kind != "text" or seg.value:
            merged.append(seg)
    return merged


@dataclass
class RenderedRows:
    """A batch of rows rendered to ids.

    prefix: ids shared by every row (soft tokens and fixed text before the first field); the
        model runs it once and reuses its key/value cache.
    bodies: per row, the ids after the prefix up to the answer slot.
    afters: per row, ids after the slot, only when they hold a field (else empty lists).
    """

    prefix: list[int]
    bodies: list[list[int]]
    afters: list[list[int]]
    input_tokens: list[int] = field(default_factory=list)  # per row: tokens of its input fields, uncut
    cut: list[int] = field(default_factory=list)  # per row: input tokens cut to fit the length budget

    @property
    def truncated(self) -> int:
        """Rows whose input was cut."""
        return sum(1 for c in self.cut if c)


CUT_WARN_SHARE = 0.05  # above this share of rows cut, the warning is loud: the task likely needs a larger budget


@dataclass
class CutSummary:
    """How much input a length budget removed from a set of rows."""

    rows: int  # rows cut
    total: int  # rows in all
    worst_cut: int  # most tokens cut from one row
    worst_of: int  # that row's input tokens before the cut
    worst_source: str  # where that row comes from (file:line) or its index

    @property
    def loud(self) -> bool:
        return self.rows > CUT_WARN_SHARE * self.total

    def describe(self, what: str, budget: str) -> str:
        return (
            f"{self.rows} of {self.total} {what} rows ({100 * self.rows / self.total:.1f}%) were cut to fit "
            f"{budget}; the worst, {self.worst_source}, lost {self.worst_cut} of its {self.worst_of} input tokens"
        )

    def console_line(self, what: str, budget: str, hint: str = "") -> str:
        """The line train, eval and predict print (rich markup): a bold-red warning with `hint` when
        loud, a quiet yellow note otherwise."""
        if self.loud:
            return f"[bold red]warning:[/] {self.describe(what, budget)}{hint}"
        return f"[yellow]{self.describe(what, budget)}"


def summarize_cuts(encoded: RenderedRows, sources: list[str] | None = None) -> CutSummary | None:
    """None when no row was cut."""
    if not encoded.truncated:
        return None
    worst = max(range(len(encoded.cut)), key=lambda i: encoded.cut[i])
    source = sources[worst] if sources else f"row {worst + 1}"
    return CutSummary(
        encoded.truncated, len(encoded.cut), encoded.cut[worst], encoded.input_tokens[worst], source
    )


@dataclass
class Template:
    text: str
    segments: list[Segment] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, slot: str = "label") -> Template:
        segments: list[Segment] = []
        pos = 0
        for match in _TOKEN.finditer(text):
            segments.append(Segment("text", text[pos : match.start()]))
            token = match.group(0)
            if token in ("{{", "}}"):
                segments.append(Segment("text", token[0]))
            elif match.group(1) is None:
                raise TemplateError(f"unbalanced {token!r} at character {match.start()} of {text!r}")
            else:
                segments.append(_parse_placeholder(match.group(1), text))
            pos = match.end()
        segments.append(Segment("text", text[pos:]))
        template = cls(text, _merge_text(segments))
        template._check(slot)
        return template

    def _check(self, slot: str) -> None:
        slots = [s for s in self.segments if s.kind == "slot"]
        if not slots or slots[0].value != slot:
            raise TemplateError(f"template {self.text!r} has no {{{slot}}} slot: add one")
        if len(slots) > 1:
            raise TemplateError(f"template {self.text!r} has more than one answer slot")
        if not self.fields:
            raise TemplateError(f"template {self.text!r} has no input field such as {{text}}")
        after = self.segments[self.segments.index(slots[0]) + 1 :]
        if any(s.kind == "soft" for s in after):
            raise TemplateError(f"template {self.text!r}: soft tokens must come before {{{slot}}}")
        if slot == "target" and any(s.kind != "text" for s in after):
            raise TemplateError(
                f"template {self.text!r}: the answer is generated last, so nothing but text may follow {{target}}"
            )

    @property
    def fields(self) -> list[str]:
        names = [s.value for s in self.segments if s.kind == "field"]
        return list(dict.fromkeys(names))

    @property
    def soft_tokens(self) -> int:
        return sum(s.count for s in self.segments if s.kind == "soft")

    @property
    def slot_index(self) -> int:
        return next(i for i, s in enumerate(self.segments) if s.kind == "slot")

    @property
    def fields_after_slot(self) -> bool:
        """True when an input field follows the slot (e.g. the seed's Portuguese form)."""
        return any(s.kind == "field" for s in self.segments[self.slot_index + 1 :])

    @property
    def slot_lead(self) -> str:
        """Whitespace before the slot; it is tokenized with the answer (" positive", not " " + "positive")."""
        before = self.segments[self.slot_index - 1] if self.slot_index else None
        if before is not None and before.kind == "text":
            return before.value[len(before.value.rstrip(" ")) :]
        return ""

    def without_soft(self) -> Template:
        """The same template with its soft tokens removed: the zero-shot prompt."""
        kept = [s for s in self.segments if s.kind != "soft"]
        if kept and kept[0].kind == "text":
            kept[0] = Segment("text", kept[0].value.lstrip())
        return Template(self.text, _merge_text(kept))

    def source(self) -> str:
        """The template text of these segments (braces in fixed text escaped)."""
        parts = {
            "soft": lambda s: f"{{soft:{s.count}}}",
            "text": lambda s: s.value.replace("{", "{{").replace("}", "}}"),
            "field": lambda s: f"{{{s.value}}}",
            "slot": lambda s: f"{{{s.value}}}",
        }
        return "".join(parts[s.kind](s) for s in self.segments)

    def render(self, fields: dict[str, str], answer: str) -> str:
        """A row as plain text with its answer in the slot (a demonstration); soft tokens dropped."""
        parts = {
            "soft": lambda s: "",
            "text": lambda s: s.value,
            "field": lambda s: fields[s.value],
            "slot": lambda s: answer,
        }
        return "".join(parts[s.kind](s) for s in self.segments).strip()

    def encode(
        self,
        rows: list[dict[str, str]],
        tokenize: Callable[[list[str]], list[list[int]]],
        max_length: int,
        bos: list[int] | None = None,
    ) -> RenderedRows:
        """Render rows to ids. Fields are cut (longest first) so a row fits `max_length`;
        soft tokens, fixed text and the answer slot are never cut."""
        pieces = self._pieces(rows, tokenize)
        slot = next(i for i, p in enumerate(pieces) if p.kind == "slot")
        shared_end = min(slot, next(i for i, p in enumerate(pieces) if p.kind == "field"))
        prefix = list(bos or []) + [t for p in pieces[:shared_end] for t in p.ids(0)]
        body_pieces = pieces[shared_end:slot]
        after_pieces = pieces[slot + 1 :] if self.fields_after_slot else []
        row_pieces = body_pieces + after_pieces
        fixed = len(prefix) + sum(len(p.ids(0)) for p in row_pieces if p.kind != "field")
        self._check_room(fixed, sum(p.kind == "field" for p in row_pieces), max_length)
        bodies, afters, sizes, cuts = [], [], [], []
        for r in range(len(rows)):
            fields = [p.ids(r) for p in row_pieces if p.kind == "field"]
            sizes.append(sum(map(len, fields)))
            cuts.append(_fit(fields, max_length - fixed))
            bodies.append([t for p in body_pieces for t in p.ids(r)])
            afters.append([t for p in after_pieces for t in p.ids(r)])
        if not all(bodies):
            # A row with no token of its own before the slot (the slot precedes every field, or an
            # empty field right before it): its answer is read at the prefix's last token, which
            # therefore moves into every row (the model reads each row's last token, never padding).
            if not prefix:
                empty = next(r for r, body in enumerate(bodies) if not body)
                raise TemplateError(
                    f"row {empty + 1} gives no token before {{{self.segments[self.slot_index].value}}} and template "
                    f"{self.text!r} has nothing before it: the answer has no text to be read from"
                )
            bodies = [[prefix[-1], *body] for body in bodies]
            prefix = prefix[:-1]
        return RenderedRows(prefix, bodies, afters, sizes, cuts)

    def _check_room(self, fixed: int, n_fields: int, max_length: int) -> None:
        """Refuse a budget that the soft tokens and fixed text (a constant document included) fill."""
        if fixed + n_fields > max_length:
            raise TemplateError(
                f"the template takes {fixed} tokens before any input ({self.soft_tokens} soft tokens, "
                f"{fixed - self.soft_tokens} of fixed text), which leaves no room for its input in "
                f"max_length {max_length}: raise train.max_length to at least {fixed + 64}"
            )

    def _pieces(
        self, rows: list[dict[str, str]], tokenize: Callable[[list[str]], list[list[int]]]
    ) -> list[_Piece]:
        """Tokenize each segment; a text's trailing spaces move to the start of the next field."""
        pieces: list[_Piece] = []
        soft_next = 0
        carry = ""
        for seg in self.segments:
            if seg.kind == "soft":
                pieces.append(_Piece("soft", [[soft_id(soft_next + k) for k in range(seg.count)]]))
                soft_next += seg.count
                carry = ""
            elif seg.kind == "text":
                text = carry + seg.value
                stripped = text.rstrip(" ")
                carry = text[len(stripped) :]
                if stripped:
                    pieces.append(_Piece("text", tokenize([stripped])))
            elif seg.kind == "field":
                values = [carry + row[seg.value] for row in rows]
                pieces.append(_Piece("field", tokenize(values)))
                carry = ""
            else:
                pieces.append(_Piece("slot", [[]]))
                carry = ""
        return pieces


@dataclass
class _Piece:
    kind: str
    rows: list[list[int]]  # one entry when the piece is the same for every row

    def ids(self, r: int) -> list[int]:
        return self.rows[r] if len(self.rows) > 1 or self.kind == "field" else self.rows[0]


def _fit(parts: list[list[int]], budget: int) -> int:
    """Cut tokens from the end of the longest of `parts` (in place) until they fit in `budget`;
    each part keeps at least one token. Returns how many tokens were cut."""
    total = sum(len(p) for p in parts)
    cut = 0
    while total > budget:
        longest = max(parts, key=len)
        if len(longest) <= 1:
            break
        longest.pop()
        total -= 1
        cut += 1
    return cut

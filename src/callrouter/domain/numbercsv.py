"""The number table as CSV: what ``numbers import`` reads and ``numbers export`` writes.

How it works: the header names the columns (``phone_number`` required; ``name``,
``assistant_id``, ``transfer_trunk_id``, ``is_active`` optional, in any order; an unknown
column is an error). ``read`` checks the header and yields the data rows; ``check`` turns
each into a ``CsvNumber`` (the number normalised to E.164 by the one shared normalisation,
without its cache) or a ``RowProblem`` naming the line and every reason; whether the
referenced assistant/trunk exists or the number is taken is for the caller, who knows the
store. Pure: lines in, values out.
"""

from __future__ import annotations

import csv
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from callrouter.domain.numbers import normalise_uncached
from callrouter.errors import InvalidNumber

COLUMNS = ("phone_number", "name", "assistant_id", "transfer_trunk_id", "is_active")
MAX_NAME = 200
_TRUE = frozenset({"true", "1", "yes", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "f"})


@dataclass(frozen=True)
class CsvNumber:
    line: int
    phone_number: str  # E.164
    name: str
    assistant_id: uuid.UUID | None
    transfer_trunk_id: uuid.UUID | None
    is_active: bool


@dataclass(frozen=True)
class RowProblem:
    line: int
    reason: str


class BadHeader(ValueError):
    """The first line is not a usable header; nothing can be read."""


def read(lines: Iterable[str]) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The checked header and each non-blank data row with its first line number: the cheap
    half. ``check`` is the other; a caller may run it elsewhere (a bulk import spreads it
    over worker processes)."""
    reader = csv.reader(lines)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration as exc:
        raise BadHeader("the file is empty: expected a header line") from exc
    _check_header(header)

    def rows() -> Iterator[tuple[int, list[str]]]:
        ended = reader.line_num
        for row in reader:
            line, ended = ended + 1, reader.line_num  # a quoted field may span lines
            if row and any(cell.strip() for cell in row):
                yield line, row
    return header, rows()


def check(line: int, cells: list[str], header: list[str],
          default_region: str) -> CsvNumber | RowProblem:
    """One data row (from ``read``) as a number or a problem."""
    return _row(line, dict(zip(header, cells, strict=False)), len(cells), len(header),
                default_region)


def check_many(rows: list[tuple[int, list[str]]], header: list[str],
               default_region: str) -> list[CsvNumber | RowProblem]:
    """``check`` over a batch: the unit of work a worker process gets."""
    return [check(line, cells, header, default_region) for line, cells in rows]


def _check_header(header: list[str]) -> None:
    unknown = [h for h in header if h not in COLUMNS]
    if "phone_number" not in header or unknown or len(set(header)) != len(header):
        raise BadHeader(f"the header must name phone_number and any of {', '.join(COLUMNS[1:])}"
                        f" once each (got: {', '.join(header)})")


def _row(line: int, cells: dict[str, str], width: int, expected: int,
         region: str) -> CsvNumber | RowProblem:
    reasons = [] if width == expected else [f"{width} fields, the header has {expected}"]
    e164 = ""
    try:
        e164 = normalise_uncached(cells.get("phone_number", ""), region)
    except InvalidNumber as exc:
        reasons.append(f"phone_number {exc.details[0].message if exc.details else exc}")
    name = cells.get("name", "").strip()
    if len(name) > MAX_NAME:
        reasons.append(f"name must be at most {MAX_NAME} characters")
    assistant = _uuid(cells.get("assistant_id", ""), "assistant_id", reasons)
    trunk = _uuid(cells.get("transfer_trunk_id", ""), "transfer_trunk_id", reasons)
    active = _bool(cells.get("is_active", ""), reasons)
    if reasons:
        return RowProblem(line, "; ".join(reasons))
    return CsvNumber(line, e164, name, assistant, trunk, active)


def _uuid(text: str, field: str, reasons: list[str]) -> uuid.UUID | None:
    text = text.strip()
    if not text:
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        reasons.append(f"{field} is not a UUID")
        return None


def _bool(text: str, reasons: list[str]) -> bool:
    word = text.strip().lower()
    if not word or word in _TRUE:
        return True
    if word in _FALSE:
        return False
    reasons.append("is_active must be true or false")
    return True


def export_row(phone_number: str, name: str, assistant_id: object, transfer_trunk_id: object,
               is_active: bool) -> list[str]:
    """One number as a CSV row in ``COLUMNS`` order: what ``parse`` reads back."""
    return [phone_number, name, str(assistant_id or ""), str(transfer_trunk_id or ""),
            "true" if is_active else "false"]

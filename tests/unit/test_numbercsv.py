"""The number table's CSV: every bad row named by line and reason; export reads back."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime

import pytest

from callrouter.domain import numbercsv
from callrouter.domain.models import PhoneNumber
from callrouter.domain.numbercsv import CsvNumber, RowProblem

A = uuid.UUID(int=1)


def parse(text: str) -> list[CsvNumber | RowProblem]:
    header, rows = numbercsv.read(text.splitlines(keepends=True))
    return numbercsv.check_many(list(rows), header, "NL")


def test_rows_are_normalised_and_defaults_filled() -> None:
    rows = parse(f"Phone_Number,name,assistant_id,is_active\n"
                 f"085 083 5037,Sales,{A},false\n\n+31850835038,,,\n")
    assert rows == [CsvNumber(2, "+31850835037", "Sales", A, None, False),
                    CsvNumber(4, "+31850835038", "", None, None, True)]


def test_every_reason_of_a_bad_row_is_reported_with_its_line() -> None:
    rows = parse("phone_number,name,assistant_id,transfer_trunk_id,is_active\n"
                 "+31850835037,ok,,,\n"
                 "12,x,not-a-uuid,,maybe\n"
                 f"+31850835038,{'n' * 201},,{A}\n")
    assert isinstance(rows[0], CsvNumber)
    assert isinstance(rows[1], RowProblem) and rows[1].line == 3
    for reason in ("phone_number", "assistant_id is not a UUID", "is_active must be"):
        assert reason in rows[1].reason
    assert rows[2] == RowProblem(4, "4 fields, the header has 5; name must be at most 200 "
                                    "characters")


def test_quoted_fields_span_lines_and_keep_the_line_count() -> None:
    rows = parse('phone_number,name\n+31850835037,"two\nlines"\n+31850835038,x\n')
    assert [(r.line, r.name) for r in rows if isinstance(r, CsvNumber)] == [
        (2, "two\nlines"), (4, "x")]


@pytest.mark.parametrize("header", ["", "name,assistant_id", "phone_number,colour",
                                    "phone_number,name,name"])
def test_a_bad_header_stops_everything(header: str) -> None:
    with pytest.raises(numbercsv.BadHeader):
        parse(header + "\n+31850835037\n" if header else "")


def test_export_lines_read_back_as_the_same_numbers() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    numbers = [PhoneNumber(uuid.uuid4(), "+31850835037", 'Sales, "NL"', A, None, True, now, now),
               PhoneNumber(uuid.uuid4(), "+31850835038", "", None, A, False, now, now)]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(numbercsv.COLUMNS)
    writer.writerows(numbercsv.export_row(n.phone_number, n.name, n.assistant_id,
                                          n.transfer_trunk_id, n.is_active) for n in numbers)
    text = out.getvalue()
    assert parse(text) == [
        CsvNumber(i + 2, n.phone_number, n.name, n.assistant_id, n.transfer_trunk_id,
                  n.is_active) for i, n in enumerate(numbers)]

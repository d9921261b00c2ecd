"""The bulk import's parallel row checking and its ordered ids (management)."""

from __future__ import annotations

import io
import uuid
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime

import pytest

from callrouter import management
from callrouter.errors import ValidationError


def _csv(rows: int) -> str:
    lines = ["phone_number,name,is_active"]
    for i in range(rows):
        # every 7th row is bad, a quoted name spans two lines every 11th
        number = "not-a-number" if i % 7 == 3 else f"+3185{1000000 + i:07d}"
        name = f'"two\nlines {i}"' if i % 11 == 5 else f"n{i}"
        lines.append(f"{number},{name},{'no' if i % 2 else 'yes'}")
    return "\n".join(lines) + "\n"


def test_worker_processes_check_rows_like_the_thread_in_file_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(management, "_IMPORT_BATCH", 4)  # many batches, out-of-order returns
    text = _csv(60)
    alone = management._parse_csv(io.StringIO(text), "NL", None)
    with management._import_pool(2) as pool:
        assert isinstance(pool, ProcessPoolExecutor)
        spread = management._parse_csv(io.StringIO(text), "NL", pool)
    assert spread == alone
    good, problems = spread
    assert len(good) + len(problems) == 60 and len(problems) == 9
    # row 3 is line 5; row 5 spans two lines, so row 10 is line 13, not 12
    assert [p.line for p in problems][:2] == [5, 13]
    assert [g.line for g in good] == sorted(g.line for g in good)


def test_one_worker_means_no_processes() -> None:
    with management._import_pool(1) as pool:
        assert pool is None


def test_a_bad_header_is_reported_from_the_pool_path_too() -> None:
    with management._import_pool(2) as pool, pytest.raises(ValidationError) as raised:
        management._parse_csv(io.StringIO("number,name\n+31850835037,a\n"), "NL", pool)
    assert raised.value.details[0].field == "header"


def test_ordered_ids_are_uuid7_consecutive_and_fresh_per_import() -> None:
    now = datetime(2026, 11, 30, 3, 0, tzinfo=UTC)
    ids = management.ordered_ids(1000, now)
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 1000
    assert ids[0].int >> 80 == int(now.timestamp() * 1000)
    again = management.ordered_ids(1000, now)
    assert not set(ids) & set(again)

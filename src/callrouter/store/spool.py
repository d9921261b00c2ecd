"""The call-record spool: records kept on local disk while the database is unreachable.

How it works: one append-only file in the data directory (``call-records.spool``), one
JSON array per record (``rows.CALL_COLS`` order, the SQL stores' own row mapping). Each
append is flushed and fsynced before it returns, so a spooled record survives a crash
or a restart of the router. The call-record writer spools a batch the store refused as
unavailable, and every later batch too while anything is spooled (a later state of a
call must never land before an earlier one); once the database answers, it writes the
spool's records in file order and only then empties the file. A crash between the two
writes them again on the next start: upserting a record twice changes nothing.

A line cut short by a crash in the middle of an append (only ever the last one) is
skipped with a log line; every line before it is whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import structlog

from callrouter.domain.models import CallRecord
from callrouter.store import rows

log = structlog.get_logger("callrouter.store")

SPOOL_FILE = "call-records.spool"


class CallSpool:
    """Call records on disk, in the order they were spooled. Blocking file I/O: the
    caller runs it off the event loop (``asyncio.to_thread``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.backlog = len(self.read()) if path.exists() else 0

    def append(self, records: Sequence[CallRecord]) -> None:
        lines = "".join(json.dumps([row[c] for c in rows.CALL_COLS]) + "\n"
                        for row in map(rows.call_to_row, records))
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(lines)
            out.flush()
            os.fsync(out.fileno())
        self.backlog += len(records)

    def read(self) -> list[CallRecord]:
        """Every spooled record, oldest first."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        found: list[CallRecord] = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                found.append(rows.call_from_row(json.loads(line)))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                log.error("call.spool_line_unreadable", path=str(self.path), line=number,
                          error=str(exc))
        return found

    def clear(self) -> None:
        """Forget every record (they are in the database now)."""
        self.path.unlink(missing_ok=True)
        self.backlog = 0

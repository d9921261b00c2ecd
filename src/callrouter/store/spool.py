"""The call-record spool: records kept on local disk while the database is unreachable.

How it works: one append-only file in the data directory (``call-records.spool``), one
JSON object per record (``rows.call_to_row``, the SQL stores' own row mapping; a column
added later reads back as its default, so a spool survives an upgrade), with the webhook
outbox events written with the record under ``"outbox"`` (``rows.delivery_to_row``), so
a status-update caused during an outage is written with its record once the database is
back, in the same transaction. Each
append is flushed and fsynced before it returns, so a spooled record survives a crash
or a restart of the router. The call-record writer spools a batch the store refused as
unavailable, and every later batch too while anything is spooled (a later state of a
call must never land before an earlier one); once the database answers, it writes the
spool's records in file order and only then empties the file. A crash between the two
writes them again on the next start: upserting a record twice changes nothing, and an
outbox event whose id is already stored is not added again.

A line cut short by a crash in the middle of an append (only ever the last one) is
skipped with a log line; every line before it is whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import structlog

from callrouter.domain.models import CallRecord, WebhookDelivery
from callrouter.store import rows

log = structlog.get_logger("callrouter.store")

SPOOL_FILE = "call-records.spool"
_DEFAULTS = {"direction": "inbound", "router": ""}  # columns older spools may lack
Entry = tuple[CallRecord, Sequence[WebhookDelivery]]  # a record and its outbox events


class CallSpool:
    """Call records on disk, in the order they were spooled. Blocking file I/O: the
    caller runs it off the event loop (``asyncio.to_thread``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.backlog = len(self.read()) if path.exists() else 0

    def append(self, entries: Sequence[Entry]) -> None:
        lines = "".join(json.dumps(_line(record, outbox)) + "\n" for record, outbox in entries)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(lines)
            out.flush()
            os.fsync(out.fileno())
        self.backlog += len(entries)

    def read(self) -> list[Entry]:
        """Every spooled record with its outbox events, oldest first."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        found: list[Entry] = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                row = json.loads(line)
                record = rows.call_from_row([row.get(c, _DEFAULTS.get(c))
                                             for c in rows.CALL_COLS])
                outbox = [rows.delivery_from_row([d[c] for c in rows.DELIVERY_COLS])
                          for d in row.get("outbox", ())]
                found.append((record, outbox))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                log.error("call.spool_line_unreadable", path=str(self.path), line=number,
                          error=str(exc))
        return found

    def clear(self) -> None:
        """Forget every record (they are in the database now)."""
        self.path.unlink(missing_ok=True)
        self.backlog = 0


def _line(record: CallRecord, outbox: Sequence[WebhookDelivery]) -> dict[str, object]:
    line: dict[str, object] = rows.call_to_row(record)
    if outbox:
        line["outbox"] = [rows.delivery_to_row(d) for d in outbox]
    return line

"""The integrity rules both stores enforce, and the errors they raise for them.

The SQLite store gets these from its schema (UNIQUE, ``ON DELETE RESTRICT``) and the
in-memory store checks them by hand; both raise the same errors, built here, so the
contract tests can compare them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from callrouter.domain.models import CallRecord, CallStatus, EndReason
from callrouter.errors import Conflict, FieldProblem, NotFound

IN_USE = "the change would break a reference between stored objects"
TRUNK_IN_USE = "the trunk is used by a phone number (transfer_trunk_id); detach it first"
ASSISTANT_IN_USE = "the assistant is used by a phone number (assistant_id); detach it first"
OPEN_STATUSES = (CallStatus.CONNECTING, CallStatus.IN_PROGRESS)


def duplicate_number() -> Conflict:
    return Conflict("phone number is already registered",
                    details=[FieldProblem("phone_number", "already registered")])


def duplicate_id() -> Conflict:
    return Conflict("an object with this id already exists",
                    details=[FieldProblem("id", "already exists")])


def not_found(what: str) -> NotFound:
    return NotFound(f"{what} not found")


def closed_after_restart(record: CallRecord, last_alive: datetime, now: datetime) -> CallRecord:
    """What ``close_open_calls`` makes of a call the router was handling when it stopped:
    it ended when the router was last known alive (its last heartbeat), or at the call's
    own last update if that is later; the downtime is not call time."""
    return replace(record, status=CallStatus.FAILED, end_reason=EndReason.ROUTER_RESTART,
                   ended_at=max(record.updated_at, last_alive), updated_at=now)


def newest_first(records: Sequence[CallRecord]) -> list[CallRecord]:
    return sorted(records, key=lambda r: (r.created_at, str(r.id)), reverse=True)

"""Management: the one place changes to the number table, trunks and assistants go through.

How it works: the HTTP layer turns a request into one of the small input values below
(``NumberInput``, ``NumberChanges``, ...; a ``...Changes`` field left ``UNSET`` is not
touched, ``None`` detaches). ``Management`` validates it — every bad field is reported at
once in one ``ValidationError`` — builds the domain object with an id and timestamps
from the injected clock, and calls the store. Mutations are serialised by one lock so a
check ("does this assistant exist?") and the write that relies on it are not interleaved
with another API change; the store's own constraints still backstop races with other
processes. After every successful change to a number or an assistant it hands the
``RouteChange`` to ``on_routing_change``, which applies it to the router's route table
before the API answers: the very next INVITE sees the change, at the cost of the change.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import enum
import gc
import itertools
import multiprocessing
import os
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, assert_never

from callrouter.crypto import SecretBox, generate_api_key, hash_api_key
from callrouter.domain import numbercsv, trunknets
from callrouter.domain.models import ApiKey, Assistant, PhoneNumber, Trunk, TrunkTransport
from callrouter.domain.numbercsv import CsvNumber, RowProblem
from callrouter.domain.numbers import normalise
from callrouter.domain.routing import (
    AssistantRemoved,
    AssistantUpserted,
    NumberRemoved,
    NumberUpserted,
    RouteChange,
)
from callrouter.domain.webhooks import EVENTS, AssistantHooks, destination_problem, hooks_of
from callrouter.errors import Conflict, FieldProblem, InvalidNumber, NotFound, ValidationError
from callrouter.ports import Store

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_SIP_URI = re.compile(
    r"sips?:(?:[^@\s<>\"]+@)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
    r"(?::\d{1,5})?(?:;[^\s<>\"]*)?"
)
_HOST = re.compile(r"\[?[0-9A-Fa-f:.]+\]?|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")
_MAX_NAME = 200
_TEXT_FIELDS = frozenset({"name", "host", "provider", "username", "runtime_uri",
                          "webhook_url"})
_MAX_SECRET = 1024



class Unset(enum.Enum):
    """Marks a ``...Changes`` field the request did not mention (``None`` means detach)."""

    UNSET = "unset"


UNSET = Unset.UNSET


@dataclass(frozen=True)
class NumberInput:
    phone_number: str
    name: str = ""
    assistant_id: uuid.UUID | None = None
    transfer_trunk_id: uuid.UUID | None = None
    is_active: bool = True


@dataclass(frozen=True)
class NumberChanges:
    name: str | Unset = UNSET
    assistant_id: uuid.UUID | Unset | None = UNSET
    transfer_trunk_id: uuid.UUID | Unset | None = UNSET
    is_active: bool | Unset = UNSET


@dataclass(frozen=True)
class TrunkInput:
    name: str
    host: str = ""  # "": inbound-only (no outbound address)
    port: int = 5060
    transport: TrunkTransport = TrunkTransport.UDP
    provider: str = ""
    username: str | None = None
    password: str | None = None
    is_active: bool = True
    inbound_addresses: tuple[str, ...] = ()
    outbound_number: str | None = None
    register: bool = False
    register_expires: int = 300
    inbound_auth: bool = False


@dataclass(frozen=True)
class TrunkChanges:
    name: str | Unset = UNSET
    host: str | Unset = UNSET
    port: int | Unset = UNSET
    transport: TrunkTransport | Unset = UNSET
    provider: str | Unset = UNSET
    username: str | Unset | None = UNSET
    password: str | Unset | None = UNSET
    is_active: bool | Unset = UNSET
    inbound_addresses: tuple[str, ...] | Unset = UNSET
    outbound_number: str | Unset | None = UNSET
    register: bool | Unset = UNSET
    register_expires: int | Unset = UNSET
    inbound_auth: bool | Unset = UNSET


@dataclass(frozen=True)
class AssistantInput:
    name: str
    runtime_uri: str | None = None
    id: uuid.UUID | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_events: tuple[str, ...] | None = None  # None: every event, when a URL is set


@dataclass(frozen=True)
class AssistantChanges:
    name: str | Unset = UNSET
    runtime_uri: str | Unset | None = UNSET
    webhook_url: str | Unset | None = UNSET
    webhook_secret: str | Unset | None = UNSET
    webhook_events: tuple[str, ...] | Unset | None = UNSET


_Obj = TypeVar("_Obj", PhoneNumber, Trunk, Assistant)


def given(changes: DataclassInstance) -> dict[str, Any]:
    """The fields of a ``...Changes`` value that the request set."""
    return {f.name: getattr(changes, f.name) for f in fields(changes)
            if getattr(changes, f.name) is not UNSET}


def is_sip_uri(text: str) -> bool:
    return _SIP_URI.fullmatch(text) is not None


class Management:
    """Validated create/update/delete of numbers, trunks and assistants; API-key checks."""

    def __init__(
        self,
        store: Store,
        secrets: SecretBox,
        default_region: str,
        on_routing_change: Callable[[Sequence[RouteChange]], Awaitable[None]],
        now: Callable[[], datetime],
        *,
        on_trunk_change: Callable[[Trunk, bool], Awaitable[None]] | None = None,
        on_webhook_change: Callable[[uuid.UUID, AssistantHooks | None], None] | None = None,
        allow_private_webhooks: bool = False,
    ) -> None:
        self._on_webhook_change = on_webhook_change
        self._allow_private = allow_private_webhooks
        self._store = store
        self._secrets = secrets
        self._region = default_region
        self._on_routing_change = on_routing_change
        self._now = now
        # A trunk written (or deleted: True) -> its inbound addresses, registration and
        # digest challenge follow before the API answers.
        self._on_trunks_change = on_trunk_change or _nothing
        self._lock = asyncio.Lock()
        self._importing = asyncio.Lock()  # one bulk import at a time
        self.import_workers = 0  # config numbers.import_workers: processes checking rows

    # -- numbers ---------------------------------------------------------------------

    async def create_number(self, new: NumberInput) -> PhoneNumber:
        async with self._lock:
            e164 = normalise(new.phone_number, self._region)
            await self._check_refs(new.assistant_id, new.transfer_trunk_id)
            now = self._now()
            number = PhoneNumber(
                id=uuid.uuid4(), phone_number=e164, name=_checked_name(new.name, "name"),
                assistant_id=new.assistant_id, transfer_trunk_id=new.transfer_trunk_id,
                is_active=new.is_active, created_at=now, updated_at=now)
            return await self._changed(await self._store.create_number(number))

    async def update_number(self, number_id: uuid.UUID, changes: NumberChanges) -> PhoneNumber:
        async with self._lock:
            number = _found(await self._store.get_number(number_id), "number")
            updates = given(changes)
            if "name" in updates:
                updates["name"] = _checked_name(updates["name"], "name")
            await self._check_refs(updates.get("assistant_id"), updates.get("transfer_trunk_id"))
            updated = self._touched(number, updates)
            return await self._changed(await self._store.update_number(updated))

    async def delete_number(self, number_id: uuid.UUID) -> None:
        async with self._lock:
            number = _found(await self._store.get_number(number_id), "number")
            await self._deleted(await self._store.delete_number(number_id), "number",
                                NumberRemoved(number.phone_number))

    async def import_numbers(self, lines: Iterable[str], *,
                             skip_invalid: bool = False) -> ImportReport:
        """Register every number of a CSV (``domain.numbercsv``): all or nothing, or with
        ``skip_invalid`` every good row. Bad rows are reported with their line and every
        reason: unparseable, unknown assistant/trunk, taken, repeated in the file. Parsing
        (``normalise`` for each row) runs in a worker thread so the API stays responsive;
        the checks and the one-transaction insert hold the management lock."""
        if self._importing.locked():
            raise Conflict("a number import is already running")
        async with self._importing:
            with _collector_paused():
                return await self._import(lines, skip_invalid)

    async def _import(self, lines: Iterable[str], skip_invalid: bool) -> ImportReport:
        with _import_pool(self.import_workers) as pool:
            good, problems = await asyncio.to_thread(_parse_csv, lines, self._region, pool)
        async with self._lock:
            rows, more = await self._importable(good)
            problems = sorted([*problems, *more], key=lambda p: p.line)
            if problems and not skip_invalid:
                raise _import_refused(problems)
            now = self._now()
            rows.sort(key=lambda r: r.phone_number)
            numbers = [PhoneNumber(
                id=id_, phone_number=r.phone_number, name=r.name,
                assistant_id=r.assistant_id, transfer_trunk_id=r.transfer_trunk_id,
                is_active=r.is_active, created_at=now, updated_at=now)
                for id_, r in zip(ordered_ids(len(rows), now), rows, strict=True)]
            if numbers:
                await self._store.create_numbers(numbers)
                changes: list[RouteChange] = [
                    NumberUpserted(n.id, n.phone_number, n.assistant_id, n.is_active)
                    for n in numbers]
                await self._on_routing_change(changes)
                await _release(good, changes, rows)
        imported = len(numbers)
        await _release(numbers)
        return ImportReport(imported, tuple(problems))

    async def _importable(self, rows: list[CsvNumber]) -> tuple[list[CsvNumber],
                                                                 list[RowProblem]]:
        assistants = {a.id for a in await self._store.list_assistants()}
        trunks = {t.id for t in await self._store.list_trunks()}
        taken = await self._store.existing_numbers([r.phone_number for r in rows])
        first: dict[str, int] = {}
        good: list[CsvNumber] = []
        problems: list[RowProblem] = []
        for row in rows:
            reasons = _row_reasons(row, assistants, trunks, taken, first)
            first.setdefault(row.phone_number, row.line)
            if reasons:
                problems.append(RowProblem(row.line, "; ".join(reasons)))
            else:
                good.append(row)
        return good, problems

    async def _check_refs(self, assistant_id: object, trunk_id: object) -> None:
        problems: list[FieldProblem] = []
        if isinstance(assistant_id, uuid.UUID) and not await self._store.get_assistant(
                assistant_id):
            problems.append(FieldProblem("assistant_id", f"no assistant with id {assistant_id}"))
        if isinstance(trunk_id, uuid.UUID) and not await self._store.get_trunk(trunk_id):
            problems.append(FieldProblem("transfer_trunk_id", f"no SIP trunk with id {trunk_id}"))
        _raise_if(problems)

    # -- trunks ----------------------------------------------------------------------

    async def create_trunk(self, new: TrunkInput) -> Trunk:
        values = self._trunk_values(given(new))
        now = self._now()
        trunk = Trunk(
            id=uuid.uuid4(), name=new.name.strip(), host=new.host.strip(), port=new.port,
            transport=new.transport, provider=new.provider.strip(), username=new.username,
            has_password=new.password is not None, is_active=new.is_active,
            created_at=now, updated_at=now, inbound_addresses=values["inbound_addresses"],
            outbound_number=values["outbound_number"], register=new.register,
            register_expires=new.register_expires, inbound_auth=new.inbound_auth)
        _raise_if(_trunk_consistency(trunk))
        async with self._lock:
            stored = await self._store.create_trunk(trunk, self._encrypted(new.password))
            await self._on_trunk_change(stored)
            return stored

    async def update_trunk(self, trunk_id: uuid.UUID, changes: TrunkChanges) -> Trunk:
        updates = self._trunk_values(given(changes))
        password = updates.pop("password", UNSET)
        async with self._lock:
            trunk = _found(await self._store.get_trunk(trunk_id), "SIP trunk")
            updated = self._touched(trunk, _stripped(updates))
            keep = password is UNSET
            if not keep:
                updated = replace(updated, has_password=password is not None)
            _raise_if(_trunk_consistency(updated))
            encrypted = None if keep else self._encrypted(password)
            stored = await self._store.update_trunk(updated, encrypted, keep)
            await self._on_trunk_change(stored)
            return stored

    async def delete_trunk(self, trunk_id: uuid.UUID) -> None:
        async with self._lock:
            trunk = _found(await self._store.get_trunk(trunk_id), "SIP trunk")
            await self._deleted(await self._store.delete_trunk(trunk_id), "SIP trunk", None)
            await self._on_trunk_change(replace(trunk, is_active=False), deleted=True)

    def _trunk_values(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` checked field by field (every problem at once), with the caller id
        in E.164 and the inbound addresses in their canonical spelling."""
        problems = _trunk_problems(values)
        number = values.get("outbound_number")
        if isinstance(number, str) and number.strip():
            try:
                values["outbound_number"] = normalise(number, self._region)
            except InvalidNumber:
                problems.append(FieldProblem("outbound_number", "must be an E.164 number"))
        elif "outbound_number" in values:
            values["outbound_number"] = None
        if "inbound_addresses" in values:
            found, bad = inbound_entries(values["inbound_addresses"])
            problems.extend(FieldProblem("inbound_addresses", m) for m in bad)
            values["inbound_addresses"] = found
        _raise_if(problems)
        return values

    async def _on_trunk_change(self, trunk: Trunk, *, deleted: bool = False) -> None:
        await self._on_trunks_change(trunk, deleted)

    def _encrypted(self, password: str | None) -> bytes | None:
        return None if password is None else self._secrets.encrypt(password)

    # -- assistants ------------------------------------------------------------------

    async def create_assistant(self, new: AssistantInput) -> Assistant:
        _raise_if(_assistant_problems(given(new), self._allow_private))
        now = self._now()
        url = new.webhook_url.strip() if new.webhook_url else None
        events = new.webhook_events if new.webhook_events is not None else (
            EVENTS if url else ())
        assistant = Assistant(
            id=new.id or uuid.uuid4(), name=new.name.strip(), runtime_uri=new.runtime_uri,
            created_at=now, updated_at=now, webhook_url=url, webhook_events=events)
        secret = new.webhook_secret or None
        async with self._lock:
            created = await self._store.create_assistant(assistant, self._encrypted(secret))
            self._webhooks_changed(created, secret)
            return await self._changed(created)

    async def update_assistant(
        self, assistant_id: uuid.UUID, changes: AssistantChanges
    ) -> Assistant:
        updates = given(changes)
        _raise_if(_assistant_problems(updates, self._allow_private))
        secret = updates.pop("webhook_secret", UNSET)
        if updates.get("webhook_events", UNSET) is None:
            updates["webhook_events"] = ()
        async with self._lock:
            assistant = _found(await self._store.get_assistant(assistant_id), "assistant")
            updated = self._touched(assistant, _stripped(updates))
            keep = secret is UNSET
            stored = await self._store.update_assistant(
                updated, None if keep else self._encrypted(secret or None), keep)
            if keep:
                enc = await self._store.get_assistant_webhook_secret(assistant_id)
                secret = self._secrets.decrypt(enc) if enc else None
            self._webhooks_changed(stored, secret or None)
            return await self._changed(stored)

    async def delete_assistant(self, assistant_id: uuid.UUID) -> None:
        async with self._lock:
            await self._deleted(await self._store.delete_assistant(assistant_id), "assistant",
                                AssistantRemoved(assistant_id))
            if self._on_webhook_change is not None:
                self._on_webhook_change(assistant_id, None)

    def _webhooks_changed(self, assistant: Assistant, secret: str | None) -> None:
        if self._on_webhook_change is not None:
            self._on_webhook_change(assistant.id, hooks_of(
                assistant.id, assistant.runtime_uri, assistant.webhook_url,
                assistant.webhook_events, secret))

    # -- calls and keys ----------------------------------------------------------------

    def control_destination(self, raw: str) -> str:
        """A transfer destination as a SIP URI or an E.164 number; ``ValidationError`` else."""
        text = raw.strip()
        if text.startswith(("sip:", "sips:")):
            if is_sip_uri(text):
                return text
            raise _invalid("destination", "is not a valid SIP URI")
        try:
            return normalise(text.removeprefix("tel:"), self._region)
        except InvalidNumber as exc:
            raise _invalid("destination", "must be an E.164 number or a SIP URI") from exc

    async def authenticate(self, token: str) -> ApiKey | None:
        return await self._store.find_api_key(hash_api_key(token))

    # -- shared steps ----------------------------------------------------------------

    def _touched(self, obj: _Obj, updates: dict[str, Any]) -> _Obj:
        return replace(obj, **updates, updated_at=self._now())

    async def _changed(self, obj: _Obj) -> _Obj:
        change = route_change(obj)
        if change is not None:
            await self._on_routing_change([change])
        return obj

    async def _deleted(self, existed: bool, what: str, change: RouteChange | None) -> None:
        if not existed:
            raise NotFound(f"{what} not found")
        if change is not None:
            await self._on_routing_change([change])


async def issue_api_key(
    store: Store, *, name: str, read_only: bool, now: datetime
) -> tuple[str, ApiKey]:
    """Create and store a new API key; returns the token (shown once) and its record."""
    issued = generate_api_key(name, read_only, now)
    return issued.token, await store.create_api_key(issued.record, issued.key_hash)


@dataclass(frozen=True)
class ImportReport:
    imported: int
    problems: tuple[RowProblem, ...]  # the rows left out (only with skip_invalid)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """A bulk import allocates millions of GC-tracked objects (rows, numbers, changes); the
    cyclic collector's full passes over them hold the GIL for hundreds of milliseconds,
    which stalls the SIP thread. They form no cycles (reference counting frees them), so
    the collector rests while an import runs."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


async def _release(*lists: list[Any]) -> None:
    """Free big lists a slice per loop turn: a million objects freed at once hold the GIL
    (and so the SIP thread) for hundreds of milliseconds."""
    for items in lists:
        while items:
            del items[-_RELEASE_SLICE:]
            await asyncio.sleep(0)


_RELEASE_SLICE = 5000


def _parse_csv(lines: Iterable[str], region: str,
               pool: Executor | None) -> tuple[list[CsvNumber], list[RowProblem]]:
    """Every row of the CSV checked (``numbercsv``): read here, checked in batches by
    ``pool``'s worker processes when there is one (normalising a number costs about 65 us
    of pure Python, so a million rows want every core, and other processes leave the
    router's GIL to the SIP thread), in order either way."""
    good: list[CsvNumber] = []
    problems: list[RowProblem] = []

    def take(results: list[CsvNumber | RowProblem]) -> None:
        for result in results:
            if isinstance(result, CsvNumber):
                good.append(result)
            else:
                problems.append(result)

    try:
        header, rows = numbercsv.read(lines)
        pending: collections.deque[Future[list[CsvNumber | RowProblem]]] = collections.deque()
        for batch in _batches(rows, _IMPORT_BATCH):
            if pool is None:
                take(numbercsv.check_many(batch, header, region))
                continue
            pending.append(pool.submit(numbercsv.check_many, batch, header, region))
            if len(pending) > _IMPORT_IN_FLIGHT:  # bounded memory: the file may be huge
                take(pending.popleft().result())
        while pending:
            take(pending.popleft().result())
    except numbercsv.BadHeader as exc:
        raise _invalid("header", str(exc)) from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise _invalid("file", f"is not UTF-8 CSV: {exc}") from exc
    return good, problems


_IMPORT_BATCH = 10_000
# A bulk import is background work: its workers yield the CPU to the SIP thread.
_IMPORT_NICENESS = 10
_IMPORT_IN_FLIGHT = 8


def _batches(rows: Iterator[tuple[int, list[str]]],
             size: int) -> Iterator[list[tuple[int, list[str]]]]:
    while batch := list(itertools.islice(rows, size)):
        yield batch


@contextlib.contextmanager
def _import_pool(workers: int) -> Iterator[Executor | None]:
    """Worker processes for one import (``workers`` 0: one per CPU; 1: none, check rows in
    a thread). They are started fresh (spawn: the router's threads are not forked) and
    stopped when the import is done, so an idle router holds none. Where processes cannot
    be started (no /dev/shm in a sandbox), the rows are checked in a thread. They run
    at a lower priority (nice 10), so a router on few cores answers SIP first."""
    count = workers or os.cpu_count() or 1
    if count <= 1:
        yield None
        return
    try:
        pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=os.nice, initargs=(_IMPORT_NICENESS,))
    except (OSError, NotImplementedError, ImportError):
        yield None
        return
    try:
        yield pool
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def ordered_ids(count: int, now: datetime) -> list[uuid.UUID]:
    """``count`` UUIDv7 (RFC 9562 s5.7: 48-bit Unix milliseconds, then random bits), one
    random start incremented per id: a bulk import's ids are consecutive, so a million
    rows append to the primary-key index instead of landing at random places in it (the
    insert is then about twice as fast). Still unguessable across imports."""
    rand = int.from_bytes(os.urandom(10), "big")
    start = (int(now.timestamp() * 1000) & (1 << 48) - 1) << 80 | 0x7 << 76 \
        | (rand >> 62 & 0xFFF) << 64 | 0b10 << 62
    low = rand & (1 << 62) - 1
    return [uuid.UUID(int=start | (low + i) & (1 << 62) - 1) for i in range(count)]


def _row_reasons(row: CsvNumber, assistants: set[uuid.UUID], trunks: set[uuid.UUID],
                 taken: set[str], first: dict[str, int]) -> list[str]:
    reasons = []
    if row.phone_number in taken:
        reasons.append(f"phone_number {row.phone_number} is already registered")
    elif row.phone_number in first:
        reasons.append(f"phone_number {row.phone_number} repeats line {first[row.phone_number]}")
    if row.assistant_id is not None and row.assistant_id not in assistants:
        reasons.append(f"no assistant with id {row.assistant_id}")
    if row.transfer_trunk_id is not None and row.transfer_trunk_id not in trunks:
        reasons.append(f"no SIP trunk with id {row.transfer_trunk_id}")
    return reasons


def _import_refused(problems: Sequence[RowProblem]) -> ValidationError:
    return ValidationError(
        f"{len(problems)} row(s) are invalid; nothing was imported (skip_invalid imports "
        "the others)", details=[FieldProblem(f"line {p.line}", p.reason) for p in problems])


def route_change(obj: PhoneNumber | Trunk | Assistant) -> RouteChange | None:
    """What a stored number or assistant means for the route table (a trunk: nothing)."""
    match obj:
        case PhoneNumber():
            return NumberUpserted(obj.id, obj.phone_number, obj.assistant_id, obj.is_active)
        case Assistant():
            return AssistantUpserted(obj.id, obj.runtime_uri)
        case Trunk():
            return None
        case _:
            assert_never(obj)


def _found(obj: _Obj | None, what: str) -> _Obj:
    if obj is None:
        raise NotFound(f"{what} not found")
    return obj


def _stripped(updates: dict[str, Any]) -> dict[str, Any]:
    return {k: v.strip() if k in _TEXT_FIELDS and v is not None else v
            for k, v in updates.items()}


def _checked_name(name: str, field: str) -> str:
    _raise_if(_name_problems(name, field, required=False))
    return name.strip()


def _name_problems(name: object, field: str, *, required: bool) -> list[FieldProblem]:
    text = name.strip() if isinstance(name, str) else ""
    if required and not text:
        return [FieldProblem(field, "must not be empty")]
    if len(text) > _MAX_NAME:
        return [FieldProblem(field, f"must be at most {_MAX_NAME} characters")]
    return []


async def _nothing(trunk: Trunk, deleted: bool) -> None:
    return None


MAX_INBOUND_ADDRESSES = 64
REGISTER_EXPIRES = (60, 86400)


def _trunk_problems(values: dict[str, Any]) -> list[FieldProblem]:
    problems = _name_problems(values["name"], "name", required=True) if "name" in values else []
    host = values.get("host")
    if host and not _HOST.fullmatch(host.strip()):
        problems.append(FieldProblem("host", "must be a host name or IP address"))
    port = values.get("port")
    if port is not None and not 1 <= port <= 65535:
        problems.append(FieldProblem("port", "must be between 1 and 65535"))
    if values.get("transport") == TrunkTransport.TLS:
        # issue 11 item 6: no promise the router cannot keep.
        problems.append(FieldProblem(
            "transport", "tls is not supported: the router has no SIP over TLS transport "
                         "(use udp or tcp)"))
    expires = values.get("register_expires")
    low, high = REGISTER_EXPIRES
    if expires is not None and not low <= expires <= high:
        problems.append(FieldProblem("register_expires", f"must be between {low} and {high}"))
    return problems


def _trunk_consistency(trunk: Trunk) -> list[FieldProblem]:
    """Rules over the whole trunk, after a PATCH is merged into it."""
    problems = []
    if not trunk.host and not trunk.inbound_addresses:
        problems.append(FieldProblem(
            "outbound_address", "is required unless the trunk is inbound-only "
                                "(inbound_addresses set)"))
    if trunk.register and not trunk.host:
        problems.append(FieldProblem("register", "needs an outbound_address (the registrar)"))
    for flag in ("register", "inbound_auth"):
        if getattr(trunk, flag) and not (trunk.username and trunk.has_password):
            problems.append(FieldProblem(flag, "needs auth_username and auth_password"))
    return problems


def inbound_entries(raw: Sequence[str]) -> tuple[tuple[str, ...], list[str]]:
    """``inbound_addresses`` as stored (IPs and CIDRs canonical, host names lower case,
    each once) and what is wrong with the others."""
    found: list[str] = []
    bad: list[str] = []
    if len(raw) > MAX_INBOUND_ADDRESSES:
        return (), [f"at most {MAX_INBOUND_ADDRESSES} entries"]
    for entry in raw:
        try:
            canonical = trunknets.canonical(entry)
        except ValueError as exc:
            bad.append(str(exc))
            continue
        if canonical not in found:
            found.append(canonical)
    return tuple(found), bad


def _assistant_problems(values: dict[str, Any], allow_private: bool) -> list[FieldProblem]:
    problems = _name_problems(values["name"], "name", required=True) if "name" in values else []
    uri = values.get("runtime_uri")
    if uri is not None and not is_sip_uri(uri):
        problems.append(FieldProblem("runtime_uri", "must be a sip: or sips: URI, or null"))
    url = values.get("webhook_url")
    if isinstance(url, str):
        problem = destination_problem(url.strip(), allow_private)
        if problem is not None:
            problems.append(FieldProblem("webhook_url", problem))
    secret = values.get("webhook_secret")
    if isinstance(secret, str) and len(secret) > _MAX_SECRET:
        problems.append(FieldProblem("webhook_secret", f"must be at most {_MAX_SECRET} "
                                                       "characters"))
    events = values.get("webhook_events")
    if isinstance(events, tuple):
        unknown = sorted(set(events) - set(EVENTS))
        if unknown:
            problems.append(FieldProblem("webhook_events", f"unknown event(s) "
                                         f"{', '.join(unknown)}; known: {', '.join(EVENTS)}"))
    return problems


def _invalid(field: str, reason: str) -> ValidationError:
    return ValidationError(f"{field} {reason}", details=[FieldProblem(field, reason)])


def _raise_if(problems: Sequence[FieldProblem]) -> None:
    if problems:
        summary = "; ".join(f"{p.field}: {p.message}" for p in problems)
        raise ValidationError(f"invalid request: {summary}", details=list(problems))

"""The route table: every number the router answers, compact, changed by values.

How it works: the SIP thread looks numbers up in an immutable ``RouteTable``; a change to
the number table (a number or an assistant upserted or removed) is a ``RouteChange``
value, and ``table.apply(change)`` returns a new table that shares almost everything with
the old one. The service swaps the new table in with one assignment, so the next INVITE
sees the change and a lookup never sees half of one. A full rebuild (at start, and as a
safety net) is the same thing for a whole table: ``RouteTableBuilder``.

Layout, for a million numbers in a few tens of megabytes:

- the *base*: parallel arrays sorted by ``key`` (an E.164 number as one int64, see
  ``e164_key``): the key (8 bytes), the number's UUID (16 bytes in one ``bytes``), the
  assistant's slot in the assistant table (4 bytes, -1 for none) and ``is_active``
  (1 byte). A lookup is one ``bisect``.
- the *overlay*: a small dict ``key -> entry`` (``None`` for a removed number) holding the
  changes since the base was built. ``apply`` copies it, so it must stay small: from
  ``COMPACT_AT`` entries the owner runs a ``Compaction``, which merges it into new base
  arrays a slice at a time (the service steps it on the asyncio loop, so no single step
  holds the GIL for long) while changes go on; ``FOLD_AT`` is the synchronous fallback.
- the *assistant table*: slot -> (assistant id, runtime URI), so changing an assistant's
  runtime changes one slot, not every number that points at it.

A number's E.164 never changes (the API cannot change it); a changed number is removed
under its old number and upserted under the new one.
"""

from __future__ import annotations

import uuid
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import assert_never

COMPACT_AT = 4096  # overlay entries from which the owner should run a ``Compaction``
FOLD_AT = 65536  # overlay entries from which ``apply`` folds at once (nobody compacted)
_WIDTH = 15  # E.164: at most 15 digits
_UUID = 16


@dataclass(frozen=True)
class Route:
    number_id: uuid.UUID
    e164: str
    assistant_id: uuid.UUID | None
    runtime_uri: str | None  # the assistant's own runtime, if it has one
    is_active: bool


# ---- changes, as values -----------------------------------------------------------------

@dataclass(frozen=True)
class NumberUpserted:
    number_id: uuid.UUID
    e164: str
    assistant_id: uuid.UUID | None
    is_active: bool


@dataclass(frozen=True)
class NumberRemoved:
    e164: str


@dataclass(frozen=True)
class AssistantUpserted:
    assistant_id: uuid.UUID
    runtime_uri: str | None


@dataclass(frozen=True)
class AssistantRemoved:
    assistant_id: uuid.UUID


RouteChange = NumberUpserted | NumberRemoved | AssistantUpserted | AssistantRemoved


@dataclass(frozen=True)
class TrunkChanged:
    """A trunk written (or removed) by any router: not a route, but the change feed carries
    it so every router's trunk policy (allow-list, challenges, registrations) follows."""

    trunk_id: uuid.UUID
    removed: bool = False


FeedChange = RouteChange | TrunkChanged


def e164_key(e164: str) -> int | None:
    """``+31850835037`` as one int64 that sorts like the text: the digits padded right
    to 15, times 16, plus their count (so ``+3185`` and ``+31850`` differ). None when the
    text is not ``+`` and 1-15 digits."""
    digits = e164[1:]
    if not (e164.startswith("+") and 0 < len(digits) <= _WIDTH and digits.isascii()
            and digits.isdigit()):
        return None
    return int(digits.ljust(_WIDTH, "0")) << 4 | len(digits)


def _e164_of(key: int) -> str:
    return "+" + str(key >> 4).rjust(_WIDTH, "0")[: key & 0xF]


# ---- the assistant table ------------------------------------------------------------------

@dataclass(frozen=True)
class _Assistants:
    ids: tuple[uuid.UUID, ...] = ()
    runtimes: tuple[str | None, ...] = ()
    slots: dict[uuid.UUID, int] | None = None

    def slot(self, assistant_id: uuid.UUID) -> int | None:
        return (self.slots or {}).get(assistant_id)

    def with_assistant(self, assistant_id: uuid.UUID, runtime: str | None) -> _Assistants:
        slot = self.slot(assistant_id)
        if slot is None:
            return _Assistants((*self.ids, assistant_id), (*self.runtimes, runtime),
                               {**(self.slots or {}), assistant_id: len(self.ids)})
        if self.runtimes[slot] == runtime:
            return self
        runtimes = (*self.runtimes[:slot], runtime, *self.runtimes[slot + 1:])
        return _Assistants(self.ids, runtimes, self.slots)

    def ensure(self, assistant_id: uuid.UUID | None) -> tuple[_Assistants, int]:
        """The slot of ``assistant_id`` (-1 for None), adding it unknown if need be."""
        if assistant_id is None:
            return self, -1
        slot = self.slot(assistant_id)
        if slot is not None:
            return self, slot
        grown = self.with_assistant(assistant_id, None)
        return grown, len(self.ids)


# ---- the table ------------------------------------------------------------------------------

_Entry = tuple[bytes, int, bool]  # number id (16 bytes), assistant slot, is_active


@dataclass(frozen=True)
class _Base:
    """Parallel arrays in key order. Mutable types (no copy when built), but never written
    once a table holds them: only ``_fold`` fills a new base, before anyone sees it."""

    keys: array[int]
    ids: bytearray
    slots: array[int]
    active: bytearray

    def find(self, key: int) -> _Entry | None:
        i = bisect_left(self.keys, key)
        if i == len(self.keys) or self.keys[i] != key:
            return None
        return bytes(self.ids[i * _UUID:(i + 1) * _UUID]), self.slots[i], bool(self.active[i])


_EMPTY = _Base(array("q"), bytearray(), array("i"), bytearray())


class RouteTable:
    """An immutable snapshot of the routes; see the module docstring."""

    __slots__ = ("_assistants", "_base", "_overlay", "_size")

    def __init__(self, base: _Base = _EMPTY, overlay: dict[int, _Entry | None] | None = None,
                 assistants: _Assistants = _Assistants(), size: int | None = None) -> None:
        self._base = base
        self._overlay = overlay or {}
        self._assistants = assistants
        self._size = len(base.keys) if size is None else size

    @classmethod
    def build(cls, numbers: Iterable[NumberUpserted],
              assistants: Iterable[AssistantUpserted] = ()) -> RouteTable:
        builder = RouteTableBuilder(assistants)
        for n in numbers:
            builder.add(n.e164, n.number_id.bytes, n.assistant_id, n.is_active)
        return builder.table()

    def __len__(self) -> int:
        return self._size

    def get(self, e164: str) -> Route | None:
        key = e164_key(e164)
        if key is None:
            return None
        entry = self._overlay[key] if key in self._overlay else self._base.find(key)
        if entry is None:
            return None
        number_id, slot, active = entry
        assistant = self._assistants.ids[slot] if slot >= 0 else None
        runtime = self._assistants.runtimes[slot] if slot >= 0 else None
        return Route(uuid.UUID(bytes=number_id), e164, assistant, runtime, active)

    def apply(self, change: RouteChange) -> RouteTable:
        """A new table with ``change`` made; this one is left as it was."""
        match change:
            case NumberUpserted(number_id, e164, assistant_id, is_active):
                assistants, slot = self._assistants.ensure(assistant_id)
                return self._with(_checked_key(e164), (number_id.bytes, slot, is_active),
                                  assistants)
            case NumberRemoved(e164):
                key = e164_key(e164)
                return self if key is None else self._with(key, None, self._assistants)
            case AssistantUpserted(assistant_id, runtime):
                return RouteTable(self._base, self._overlay,
                                  self._assistants.with_assistant(assistant_id, runtime),
                                  self._size)
            case AssistantRemoved(assistant_id):
                # Its numbers are gone or detached first (the store restricts the delete);
                # the slot stays, without a runtime, so slots never move.
                if self._assistants.slot(assistant_id) is None:
                    return self
                return RouteTable(self._base, self._overlay,
                                  self._assistants.with_assistant(assistant_id, None),
                                  self._size)
            case _:
                assert_never(change)

    def apply_all(self, changes: Iterable[RouteChange]) -> RouteTable:
        """``apply`` of each change in turn, copying the overlay once, not per change."""
        table = RouteTable(self._base, dict(self._overlay), self._assistants, self._size)
        for change in changes:
            table._apply_in_place(change)
        if len(table._overlay) > FOLD_AT:
            return RouteTable(_fold(table._base, table._overlay), None, table._assistants,
                              table._size)
        return table

    def _apply_in_place(self, change: RouteChange) -> None:
        """Only on a table nobody else has seen yet (``apply_all``'s private copy)."""
        if isinstance(change, NumberUpserted | NumberRemoved):
            key = (_checked_key(change.e164) if isinstance(change, NumberUpserted)
                   else e164_key(change.e164))
            if key is None:
                return
            entry: _Entry | None = None
            if isinstance(change, NumberUpserted):
                self._assistants, slot = self._assistants.ensure(change.assistant_id)
                entry = (change.number_id.bytes, slot, change.is_active)
            self._size += (entry is not None) - self._present(key)
            self._overlay[key] = entry
            return
        self._assistants = self.apply(change)._assistants

    def _with(self, key: int, entry: _Entry | None, assistants: _Assistants) -> RouteTable:
        present = self._present(key)
        size = self._size + (entry is not None) - present
        overlay = dict(self._overlay)
        overlay[key] = entry  # a removal stays a tombstone: a running Compaction needs it
        if len(overlay) > FOLD_AT:
            return RouteTable(_fold(self._base, overlay), None, assistants, size)
        return RouteTable(self._base, overlay, assistants, size)

    @property
    def pending(self) -> int:
        """Changes held in the overlay (what a ``Compaction`` would merge)."""
        return len(self._overlay)

    def _present(self, key: int) -> bool:
        if key in self._overlay:
            return self._overlay[key] is not None
        return self._base.find(key) is not None

    def e164s(self) -> list[str]:
        """Every number in the table, in key order (for tests and diagnostics)."""
        folded = _fold(self._base, self._overlay)
        return [_e164_of(k) for k in folded.keys]


def _checked_key(e164: str) -> int:
    key = e164_key(e164)
    if key is None:
        raise ValueError(f"not an E.164 number: {e164!r}")
    return key


def _fold(base: _Base, overlay: dict[int, _Entry | None]) -> _Base:
    """Merge the overlay into a new base. The new arrays are allocated once at their final
    size and filled by memoryview copies of the runs between changed keys, so the cost is
    one memory copy of the table plus one bisect per change (a few milliseconds for a
    million numbers)."""
    changes = sorted(overlay)
    spots = [bisect_left(base.keys, key) for key in changes]
    n = len(base.keys)
    hits = [i < n and base.keys[i] == key for key, i in zip(changes, spots, strict=True)]
    size = n - sum(hits) + sum(overlay[k] is not None for k in changes)
    out = _Base(array("q", bytes(8 * size)), bytearray(_UUID * size),
                array("i", bytes(4 * size)), bytearray(size))
    src, dst = _views(base), _views(out)
    start = at = 0
    for key, i, hit in zip(changes, spots, hits, strict=True):
        _copy(src, dst, start, i, at)
        at += i - start
        start = i + 1 if hit else i
        entry = overlay[key]
        if entry is not None:
            dst[0][at], dst[2][at], dst[3][at] = key, entry[1], entry[2]
            dst[1][at * _UUID:(at + 1) * _UUID] = entry[0]
            at += 1
    _copy(src, dst, start, n, at)
    return out


_Views = tuple[memoryview, memoryview, memoryview, memoryview]


def _views(base: _Base) -> _Views:
    return (memoryview(base.keys), memoryview(base.ids), memoryview(base.slots),
            memoryview(base.active))


def _copy(src: _Views, dst: _Views, start: int, stop: int, at: int) -> None:
    count = stop - start
    if count <= 0:
        return
    dst[0][at:at + count] = src[0][start:stop]
    dst[1][at * _UUID:(at + count) * _UUID] = src[1][start * _UUID:stop * _UUID]
    dst[2][at:at + count] = src[2][start:stop]
    dst[3][at:at + count] = src[3][start:stop]


class Compaction:
    """Merges a table's overlay into new base arrays, ``step`` by ``step``.

    Each step copies about ``budget`` rows (memory copies of runs between changed keys,
    into arrays that grow as they are filled), so the caller can yield between steps.
    Changes applied to the table meanwhile land in its overlay as usual; ``finish`` keeps
    those (every overlay entry that is not the very one compacted) on top of the new base.
    """

    def __init__(self, table: RouteTable) -> None:
        self._table = table
        self._changes = sorted(table._overlay)
        self._next = 0  # index into _changes
        self._start = 0  # next row of the old base to copy
        self._keys: array[int] = array("q")
        self._ids, self._slots, self._active = bytearray(), array("i"), bytearray()

    def step(self, budget: int = 65536) -> bool:
        """Copy about ``budget`` rows; True when the new base is complete."""
        base, overlay, copied = self._table._base, self._table._overlay, 0
        while copied < budget:
            done = self._next == len(self._changes)
            key = 0 if done else self._changes[self._next]
            stop = len(base.keys) if done else bisect_left(base.keys, key, self._start)
            run = min(stop - self._start, budget - copied)
            self._copy(self._start, self._start + run)
            self._start, copied = self._start + run, copied + run
            if self._start < stop:
                return False
            if done:
                return True
            if stop < len(base.keys) and base.keys[stop] == key:
                self._start = stop + 1  # the change replaces (or removes) this row
            self._append(key, overlay[key])
            self._next, copied = self._next + 1, copied + 1
        return False

    def finish(self, current: RouteTable) -> RouteTable:
        """``current`` (the table now, after any later changes) on the new base."""
        if current._base is not self._table._base:
            return current  # replaced meanwhile (a full rebuild): nothing to do
        compacted = self._table._overlay
        overlay = {k: v for k, v in current._overlay.items()
                   if k not in compacted or compacted[k] is not v}
        base = _Base(self._keys, self._ids, self._slots, self._active)
        return RouteTable(base, overlay, current._assistants, current._size)

    def _copy(self, start: int, stop: int) -> None:
        if stop <= start:
            return
        base = self._table._base
        self._keys.frombytes(memoryview(base.keys).cast("B")[start * 8:stop * 8])
        self._ids += memoryview(base.ids)[start * _UUID:stop * _UUID]
        self._slots.frombytes(memoryview(base.slots).cast("B")[start * 4:stop * 4])
        self._active += memoryview(base.active)[start:stop]

    def _append(self, key: int, entry: _Entry | None) -> None:
        if entry is not None:
            self._keys.append(key)
            self._ids += entry[0]
            self._slots.append(entry[1])
            self._active.append(entry[2])


class RouteTableBuilder:
    """Builds a whole table (start, safety-net rebuild). Rows in key order (the store's
    ``phone_number`` order is key order, see ``e164_key``) are appended as they come;
    rows out of order are sorted once at the end."""

    def __init__(self, assistants: Iterable[AssistantUpserted] = ()) -> None:
        self._assistants = _Assistants()
        for a in assistants:
            self._assistants = self._assistants.with_assistant(a.assistant_id, a.runtime_uri)
        self._by_text: dict[str, int] = {str(a): s for a, s in
                                         (self._assistants.slots or {}).items()}
        self._keys: array[int] = array("q")
        self._ids = bytearray()
        self._slots: array[int] = array("i")
        self._active = bytearray()
        self._sorted = True

    def add(self, e164: str, number_id: bytes, assistant_id: uuid.UUID | None,
            is_active: bool) -> None:
        self._assistants, slot = self._assistants.ensure(assistant_id)
        self._append(_checked_key(e164), number_id, slot, is_active)

    def add_rows(self, rows: Sequence[tuple[str, str, str | None, bool | int]]) -> None:
        """Rows as the store gives them: (E.164, number id, assistant id, is_active), the
        ids as UUID text (parsing them into ``uuid.UUID`` would cost seconds a million)."""
        by_text, append = self._by_text, self._append
        for e164, number_id, assistant_id, is_active in rows:
            slot = -1 if assistant_id is None else by_text.get(assistant_id)
            if slot is None:
                assert assistant_id is not None
                self._assistants, slot = self._assistants.ensure(uuid.UUID(assistant_id))
                by_text[assistant_id] = slot
            append(_checked_key(e164), bytes.fromhex(number_id.replace("-", "")), slot,
                   bool(is_active))

    def _append(self, key: int, number_id: bytes, slot: int, is_active: bool) -> None:
        if self._keys and key <= self._keys[-1]:
            self._sorted = False
        self._keys.append(key)
        self._ids += number_id
        self._slots.append(slot)
        self._active.append(is_active)

    def table(self) -> RouteTable:
        if self._sorted:
            base = _Base(self._keys, self._ids, self._slots, self._active)
            return RouteTable(base, None, self._assistants)
        # Out of order (or repeated): the last row for a key wins, like applying upserts.
        latest = {k: i for i, k in enumerate(self._keys)}
        overlay: dict[int, _Entry | None] = {
            k: (bytes(self._ids[i * _UUID:(i + 1) * _UUID]), self._slots[i],
                bool(self._active[i])) for k, i in latest.items()}
        return RouteTable(_fold(_EMPTY, overlay), None, self._assistants)

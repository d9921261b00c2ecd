"""The route table as values: changes applied as deltas, compact layout, full rebuilds.

A dict model is the oracle: any sequence of ``RouteChange`` values applied to the table
must give the same lookups as the same changes applied to a plain dict.
"""

from __future__ import annotations

import random
import uuid

import pytest

from callrouter.domain import routetable
from callrouter.domain.routetable import (
    AssistantRemoved,
    AssistantUpserted,
    NumberRemoved,
    NumberUpserted,
    Route,
    RouteChange,
    RouteTable,
    RouteTableBuilder,
    e164_key,
)

A, B = uuid.UUID(int=1), uuid.UUID(int=2)
N1, N2 = uuid.UUID(int=10), uuid.UUID(int=11)


def test_keys_sort_like_the_text() -> None:
    """The store streams numbers in phone_number (text) order; the builder relies on the
    keys sorting the same way, prefixes and trailing zeros included."""
    rng = random.Random(7)
    numbers = ["+1", "+10", "+100", "+3185", "+31850", "+318500", "+31851", "+999999999999999",
               "+2", "+19", *(f"+{rng.randrange(1, 10**rng.randrange(1, 16))}"
                               for _ in range(2000))]
    keys = [e164_key(n) for n in numbers]
    assert None not in keys
    assert sorted(numbers) == [n for _, n in sorted(zip(keys, numbers, strict=True))]
    assert len(set(keys)) == len(set(numbers))


@pytest.mark.parametrize("text", ["31850835037", "+", "+1234567890123456", "+12a", "+١٢"])
def test_not_e164_has_no_key_and_no_route(text: str) -> None:
    assert e164_key(text) is None
    assert RouteTable().get(text) is None


def test_a_change_makes_a_new_table_and_leaves_the_old_one() -> None:
    empty = RouteTable()
    one = empty.apply(AssistantUpserted(A, "sip:a@rt")).apply(
        NumberUpserted(N1, "+31850835037", A, True))
    assert empty.get("+31850835037") is None and len(empty) == 0
    assert one.get("+31850835037") == Route(N1, "+31850835037", A, "sip:a@rt", True)
    assert len(one) == 1


def test_an_assistant_change_reaches_every_number_that_points_at_it() -> None:
    table = RouteTable.build([NumberUpserted(N1, "+31850835037", A, True),
                              NumberUpserted(N2, "+31850835038", A, False)],
                             [AssistantUpserted(A, "sip:old@rt")])
    moved = table.apply(AssistantUpserted(A, "sip:new@rt"))
    assert {r.runtime_uri for r in (moved.get("+31850835037"), moved.get("+31850835038"))
            if r} == {"sip:new@rt"}
    gone = moved.apply(NumberRemoved("+31850835037")).apply(NumberRemoved("+31850835038"))
    after = gone.apply(AssistantRemoved(A))
    assert len(after) == 0 and after.get("+31850835037") is None


def test_a_number_of_an_unknown_assistant_gets_its_runtime_later() -> None:
    table = RouteTable().apply(NumberUpserted(N1, "+31850835037", A, True))
    route = table.get("+31850835037")
    assert route is not None and (route.assistant_id, route.runtime_uri) == (A, None)
    table = table.apply(AssistantUpserted(A, "sip:a@rt"))
    assert (r := table.get("+31850835037")) is not None and r.runtime_uri == "sip:a@rt"


def test_removing_an_absent_number_or_assistant_changes_nothing() -> None:
    table = RouteTable.build([NumberUpserted(N1, "+31850835037", None, True)])
    assert len(table.apply(NumberRemoved("+31850835099"))) == 1
    assert table.apply(AssistantRemoved(B)) is table
    assert len(table.apply(NumberRemoved("not a number"))) == 1


def test_an_upsert_of_a_non_e164_number_is_refused() -> None:
    with pytest.raises(ValueError, match=r"E\.164"):
        RouteTable().apply(NumberUpserted(N1, "31850835037", None, True))


@pytest.mark.parametrize("fold_at", [1, 8, 65536])
def test_any_sequence_of_changes_matches_a_dict(monkeypatch: pytest.MonkeyPatch,
                                                 fold_at: int) -> None:
    """Guards the overlay/fold split: whether a change sits in the overlay or has been
    folded into the base arrays, lookups and the size are the same."""
    monkeypatch.setattr(routetable, "FOLD_AT", fold_at)
    rng = random.Random(fold_at)
    pool = [f"+3185{rng.randrange(10**6):06d}" for _ in range(300)] + ["+1", "+10", "+100"]
    assistants = [uuid.UUID(int=i) for i in range(1, 5)]
    runtime: dict[uuid.UUID, str | None] = {}
    model: dict[str, tuple[uuid.UUID, uuid.UUID | None, bool]] = {}
    start = [NumberUpserted(uuid.uuid4(), n, None, True) for n in pool[:100]]
    table = RouteTable.build(start)
    model.update({c.e164: (c.number_id, None, True) for c in start})
    start_table, made = table, []
    for _ in range(1500):
        change = _random_change(rng, pool, assistants)
        table = table.apply(change)
        made.append(change)
        _apply_to_model(model, runtime, change)
    at_once = start_table.apply_all(made)  # the batch path gives the same table
    assert [at_once.get(e) for e in pool] == [table.get(e) for e in pool]
    assert len(at_once) == len(table) == len(model)
    for e164 in pool:
        expected = model.get(e164)
        route = table.get(e164)
        if expected is None:
            assert route is None
            continue
        assert route == Route(expected[0], e164, expected[1],
                              runtime.get(expected[1]) if expected[1] else None, expected[2])
    assert table.e164s() == sorted(model)


def _random_change(rng: random.Random, pool: list[str],
                   assistants: list[uuid.UUID]) -> RouteChange:
    roll = rng.random()
    if roll < 0.55:
        return NumberUpserted(uuid.uuid4(), rng.choice(pool),
                              rng.choice([None, *assistants]), rng.random() < 0.8)
    if roll < 0.9:
        return NumberRemoved(rng.choice(pool))
    return AssistantUpserted(rng.choice(assistants), rng.choice([None, "sip:a@x", "sip:b@y"]))


def _apply_to_model(model: dict[str, tuple[uuid.UUID, uuid.UUID | None, bool]],
                    runtime: dict[uuid.UUID, str | None], change: RouteChange) -> None:
    match change:
        case NumberUpserted(number_id, e164, assistant_id, active):
            model[e164] = (number_id, assistant_id, active)
        case NumberRemoved(e164):
            model.pop(e164, None)
        case AssistantUpserted(assistant_id, uri):
            runtime[assistant_id] = uri
        case AssistantRemoved(assistant_id):
            runtime.pop(assistant_id, None)


def test_builder_reads_store_rows_in_any_order_last_one_wins() -> None:
    builder = RouteTableBuilder([AssistantUpserted(A, "sip:a@rt")])
    builder.add_rows([("+31850835038", str(N2), str(A), True),
                      ("+31850835037", str(N1), None, False),
                      ("+31850835038", str(N1), str(B), True)])
    table = builder.table()
    assert len(table) == 2
    assert table.get("+31850835037") == Route(N1, "+31850835037", None, None, False)
    assert table.get("+31850835038") == Route(N1, "+31850835038", B, None, True)


def test_builder_appends_rows_in_key_order() -> None:
    builder = RouteTableBuilder()
    builder.add_rows([(f"+3185{i:07d}", str(uuid.UUID(int=i)), None, True) for i in range(1000)])
    table = builder.table()
    assert len(table) == 1000
    assert (r := table.get("+31850000999")) is not None and r.number_id == uuid.UUID(int=999)


@pytest.mark.parametrize("budget", [1, 7, 100_000])
def test_a_compaction_keeps_changes_made_while_it_runs(budget: int) -> None:
    """Guards the stepwise compaction: changes applied between its steps (including the
    removal of a number that only the compacted overlay held) survive ``finish``."""
    rng = random.Random(budget)
    pool = [f"+4420{rng.randrange(10**7):07d}" for _ in range(200)]
    assistants = [A, B]
    table = RouteTable.build([NumberUpserted(uuid.uuid4(), n, A, True) for n in pool[:50]])
    model: dict[str, tuple[uuid.UUID, uuid.UUID | None, bool]] = {
        n: (r.number_id, r.assistant_id, r.is_active) for n in pool[:50]
        if (r := table.get(n)) is not None}
    runtime: dict[uuid.UUID, str | None] = {}
    for _ in range(300):
        change = _random_change(rng, pool, assistants)
        table = table.apply(change)
        _apply_to_model(model, runtime, change)
    compaction = routetable.Compaction(table)
    while not compaction.step(budget):
        for _ in range(3):
            change = _random_change(rng, pool, assistants)
            table = table.apply(change)
            _apply_to_model(model, runtime, change)
    table = compaction.finish(table)
    assert len(table) == len(model)
    assert table.e164s() == sorted(model)
    for e164, (number_id, assistant_id, active) in model.items():
        route = table.get(e164)
        assert route is not None
        assert (route.number_id, route.assistant_id, route.is_active) == (
            number_id, assistant_id, active)


def test_a_compaction_of_a_replaced_table_is_dropped() -> None:
    table = RouteTable().apply(NumberUpserted(N1, "+31850835037", None, True))
    compaction = routetable.Compaction(table)
    while not compaction.step():
        pass
    rebuilt = RouteTable.build([NumberUpserted(N2, "+31850835038", None, True)])
    assert compaction.finish(rebuilt) is rebuilt


def test_the_overlay_counts_what_a_compaction_would_merge() -> None:
    table = RouteTable()
    for i in range(2):
        table = table.apply(NumberUpserted(uuid.UUID(int=i), f"+3185083503{i}", None, True))
    assert table.pending == 2
    table = table.apply(NumberRemoved("+31850835039"))  # absent: a tombstone all the same
    assert table.pending == 3 and len(table) == 2

"""The operator CLI (``cli_client``) against the real ASGI app and a SQLite store.

Guards the issue's two-command onboarding (add an assistant, add a number pointing at
it), table and ``--json`` output, ``none`` detaching, API errors exiting non-zero with
the API's message, and ``keys create`` / ``ensure_first_key`` storing only a hash.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from callrouter import cli_client
from callrouter.crypto import SecretBox, hash_api_key
from callrouter.http import ApiDeps, create_app
from callrouter.management import Management, issue_api_key
from callrouter.store import MemoryStore, PostgresStore, SqliteStore

pytestmark = pytest.mark.anyio
T0 = datetime(2025, 12, 13, 10, 0, tzinfo=UTC)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Cli:
    transport: httpx.ASGITransport
    key: str

    async def __call__(self, *argv: str) -> Result:
        parser = argparse.ArgumentParser(prog="callrouter")
        cli_client.register(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args([*argv, "--url", "http://router", "--api-key", self.key])
        out, err = io.StringIO(), io.StringIO()
        code = await cli_client.call_api(args, transport=self.transport, out=out, err=err)
        return Result(code, out.getvalue(), err.getvalue())


async def _nothing(_: object) -> None:
    return None


async def _no_checks() -> dict[str, dict[str, Any]]:
    return {}


async def _no_control(*_: Any) -> dict[str, Any]:
    return {}


@pytest.fixture
async def cli(tmp_path: Path) -> AsyncIterator[Cli]:
    store = SqliteStore(tmp_path / "callrouter.db")
    await store.open()
    ticks = itertools.count()
    management = Management(store, SecretBox.load(tmp_path / "secret.key", {}), "NL", _nothing,
                            lambda: T0 + timedelta(seconds=next(ticks)))
    key, _ = await issue_api_key(store, name="t", read_only=False, now=T0)
    app = create_app(ApiDeps(management=management, store=store, version="t",
                             health=_no_checks, ready=lambda: (True, ""), control=_no_control))
    yield Cli(httpx.ASGITransport(app=app), key)
    await store.close()


async def test_two_commands_register_a_number_with_an_assistant(cli: Cli) -> None:
    added = await cli("assistants", "add", "--name", "Sales", "--runtime-uri", "sip:rt@host",
                      "--json")
    assert added.code == 0, added.err
    assistant_id = added.json()["assistant"]["id"]
    number = await cli("numbers", "add", "085 083 5037", "--assistant", assistant_id)
    assert number.code == 0, number.err
    header, row = number.out.splitlines()
    assert header.split() == ["ID", "NUMBER", "NAME", "ASSISTANT", "TRANSFER", "TRUNK", "ACTIVE"]
    assert "+31850835037" in row and assistant_id in row and row.rstrip().endswith("yes")
    assert row.index("+31850835037") == header.index("NUMBER")  # columns line up


async def test_list_table_aligns_columns_and_json_is_the_api_body(cli: Cli) -> None:
    await cli("assistants", "add", "--name", "A")
    await cli("assistants", "add", "--name", "A much longer name", "--runtime-uri",
              "sips:runtime@example.com:5061")
    table = (await cli("assistants", "list")).out.splitlines()
    assert len(table) == 3
    column = table[0].index("RUNTIME URI")
    assert column > len("A much longer name")  # the widest name pushes the column right
    assert table[2][column:].split()[0] == "sips:runtime@example.com:5061"
    assert table[1][column:].split()[0] == "-"
    listed = (await cli("assistants", "list", "--json")).json()
    assert [a["name"] for a in listed["assistants"]] == ["A", "A much longer name"]


async def test_assistant_webhook_flags_and_the_secret_is_never_printed(cli: Cli) -> None:
    added = await cli("assistants", "add", "--name", "Hooked", "--webhook-url",
                      "https://hooks.example.com/h", "--webhook-secret", "sekrit",
                      "--webhook-events", "status-update")
    assert added.code == 0, added.err
    header, row = added.out.splitlines()
    assert "WEBHOOK URL" in header and "sekrit" not in added.out
    assert "https://hooks.example.com/h" in row and "status-update" in row
    assert row.rstrip().endswith("yes")  # has a secret
    assistant_id = (await cli("assistants", "list", "--json")).json()["assistants"][0]["id"]
    cleared = await cli("assistants", "update", assistant_id, "--webhook-url", "none",
                        "--webhook-secret", "none", "--webhook-events", "", "--json")
    body = cleared.json()["assistant"]
    assert (body["webhook_url"], body["has_webhook_secret"], body["webhook_events"]) == (
        None, False, [])
    bad = await cli("assistants", "update", assistant_id, "--webhook-events", "tool-calls")
    assert bad.code == 1 and "webhook_events" in bad.err


async def test_update_with_none_detaches_and_delete(cli: Cli) -> None:
    assistant_id = (await cli("assistants", "add", "--name", "S", "--json")).json()[
        "assistant"]["id"]
    number_id = (await cli("numbers", "add", "+31850835037", "--assistant", assistant_id,
                           "--json")).json()["number"]["id"]
    updated = await cli("numbers", "update", number_id, "--assistant", "none", "--inactive",
                        "--json")
    assert updated.json()["number"]["assistant_id"] is None
    assert updated.json()["number"]["is_active"] is False
    deleted = await cli("numbers", "delete", number_id)
    assert (deleted.code, deleted.out.strip()) == (0, f"deleted {number_id}")


async def test_api_errors_print_the_message_and_exit_1(cli: Cli) -> None:
    bad = await cli("numbers", "add", "12")
    assert bad.code == 1 and bad.out == ""
    assert bad.err.startswith("error: ") and "phone_number" in bad.err
    await cli("numbers", "add", "+31850835037")
    dup = await cli("numbers", "add", "0031850835037")
    assert dup.code == 1 and "already registered" in dup.err


async def test_trunk_password_from_stdin_is_sent_but_never_printed(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("pa55word\n"))
    added = await cli("trunks", "add", "--name", "carrier", "--host", "sip.example.com",
                      "--username", "u", "--password-stdin")
    assert added.code == 0, added.err
    assert "sip.example.com:5060" in added.out and "pa55word" not in added.out
    as_json = await cli("trunks", "list", "--json")
    assert "pa55word" not in as_json.out and as_json.json()["trunks"][0]["username"] == "u"


async def test_a_provider_trunk_from_the_command_line(cli: Cli) -> None:
    added = await cli("trunks", "add", "--name", "acme", "--inbound-addresses",
                      "192.0.2.10, 198.51.100.0/24", "--outbound-number", "+31850835037")
    assert added.code == 0, added.err
    assert "192.0.2.10,198.51.100.0/24" in added.out


async def test_unreachable_router_exits_1(cli: Cli) -> None:
    parser = argparse.ArgumentParser()
    cli_client.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["numbers", "list", "--url", "http://127.0.0.1:9"])
    err = io.StringIO()
    assert await cli_client.call_api(args, err=err) == 1
    assert "cannot reach the router" in err.getvalue()


async def test_keys_create_prints_a_key_whose_hash_is_stored(tmp_path: Path) -> None:
    out = io.StringIO()
    assert await cli_client.create_key(tmp_path, name="ops", read_only=True, as_json=True,
                                       out=out) == 0
    printed = json.loads(out.getvalue())
    assert printed["key"].startswith("cr_") and printed["read_only"] is True
    store = SqliteStore(tmp_path / cli_client.DB_FILE)
    await store.open()
    try:
        found = await store.find_api_key(hash_api_key(printed["key"]))
        assert found is not None and found.read_only and found.name == "ops"
    finally:
        await store.close()


async def test_keys_create_writes_to_the_routers_postgresql(tmp_path: Path,
                                                            postgres_url: str) -> None:
    """Guards item 1: with a database URL the key lands in the shared database, not in a
    SQLite file of the data directory."""
    out = io.StringIO()
    parser = argparse.ArgumentParser()
    cli_client.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["keys", "create", "--name", "ops", "--data-dir", str(tmp_path),
                              "--database-url", postgres_url])
    assert await cli_client.create_key(args.data_dir, name=args.name, read_only=False,
                                       database_url=args.database_url, out=out) == 0
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        assert await store.find_api_key(hash_api_key(out.getvalue().strip())) is not None
    finally:
        await store.close()
    assert not (tmp_path / cli_client.DB_FILE).exists()


async def test_ensure_first_key_creates_one_only_when_none_exist() -> None:
    store = MemoryStore()
    first = await cli_client.ensure_first_key(store)
    assert first is not None and await store.find_api_key(hash_api_key(first)) is not None
    assert await cli_client.ensure_first_key(store) is None
    assert await store.count_api_keys() == 1


def test_keys_create_parses_read_only_and_data_dir(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    cli_client.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["keys", "create", "--read-only", "--data-dir", str(tmp_path)])
    assert (args.read_only, args.data_dir, args.func) == (
        True, tmp_path, cli_client.run_keys_create)


async def test_import_then_export_round_trips_with_a_progress_bar(cli: Cli,
                                                                   tmp_path: Path) -> None:
    assistant = (await cli("assistants", "add", "--name", "A", "--json")).json()["assistant"]
    source = tmp_path / "in.csv"
    source.write_text(f"phone_number,name,assistant_id,is_active\n"
                      f"085 083 5037,Sales,{assistant['id']},true\n+31850835038,,,false\n")
    imported = await cli("numbers", "import", str(source))
    assert imported.code == 0, imported.err
    assert imported.out.strip() == "imported 2 numbers, skipped 0 rows"
    assert "100%" in imported.err and imported.err.startswith("\r[")
    exported = tmp_path / "out.csv"
    assert (await cli("numbers", "export", str(exported))).code == 0
    assert exported.read_text().splitlines() == [
        "phone_number,name,assistant_id,transfer_trunk_id,is_active",
        f"+31850835037,Sales,{assistant['id']},,true", "+31850835038,,,,false"]
    to_stdout = await cli("numbers", "export")
    assert to_stdout.out.splitlines() == exported.read_text().splitlines()


async def test_import_refusal_lists_every_bad_line_and_skip_invalid_goes_on(
        cli: Cli, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("phone_number\n+31850835037\n12\n+31850835037\n")
    refused = await cli("numbers", "import", str(source))
    assert refused.code == 1
    assert "line 3: phone_number" in refused.err and "line 4: phone_number" in refused.err
    assert "nothing was imported" in refused.err
    skipped = await cli("numbers", "import", str(source), "--skip-invalid")
    assert skipped.code == 0, skipped.err
    assert skipped.out.strip() == "imported 1 numbers, skipped 2 rows"
    assert "skipped line 3:" in skipped.err
    missing = await cli("numbers", "import", str(tmp_path / "nope.csv"))
    assert missing.code == 1 and "cannot read" in missing.err

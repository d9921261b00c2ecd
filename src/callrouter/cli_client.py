"""The operator's subcommands: ``numbers|trunks|assistants list|add|update|delete``,
``numbers import|export`` (CSV, see ``domain.numbercsv``) and ``keys create``.

How it works: the resource subcommands are data, not code. Each resource is a
``Resource`` (API path, envelope names, table columns, flags); every flag maps to one body
field, so ``add`` and ``update`` build their JSON the same way (a flag left out is not
sent; ``none`` for a nullable flag sends ``null``, which detaches). The request goes to the
running router over HTTP (``--url`` / ``CALLROUTER_API_URL``, key from ``--api-key`` /
``CALLROUTER_API_KEY``); the answer prints as an aligned table, or as the API's JSON
with ``--json``. An API error prints its message and field details and exits 1.

``keys create`` does not need a running router: it opens the router's database, the
PostgreSQL one of ``--database-url`` / ``CALLROUTER_DATABASE_URL`` when given, else the
SQLite one in the data dir (``--data-dir`` / ``CALLROUTER_DATA_DIR``, default ``./var``),
and prints the new key once; only its hash is stored.

``register(subparsers)`` adds all of this to the ``callrouter`` parser; each leaf sets
``func``, which takes the parsed args and returns the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, TypeAlias

import httpx

from callrouter.domain import numbercsv
from callrouter.management import issue_api_key
from callrouter.ports import Store
from callrouter.store import make_store

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_DATA_DIR = "./var"
DB_FILE = "callrouter.db"
NULL_WORD = "none"

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"  # add_subparsers()


@dataclass(frozen=True)
class Flag:
    """One command-line option and the body field it sets."""

    option: str
    field: str
    help: str
    kind: Callable[[str], Any] = str
    nullable: bool = False
    required_on_add: bool = False
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Resource:
    command: str
    path: str
    one: str  # envelope of a single object
    many: str  # envelope of a list
    columns: tuple[tuple[str, str], ...]  # (heading, field)
    flags: tuple[Flag, ...]
    positional: str | None = None  # a body field given positionally to ``add``


def _comma_list(text: str) -> list[str]:
    """``--inbound-addresses a,b`` or ``--webhook-events assistant-request,status-update``
    ('' for none)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "yes", "1", "on"):
        return True
    if text.lower() in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


RESOURCES = (
    Resource(
        command="numbers", path="/api/v1/numbers", one="number", many="numbers",
        columns=(("ID", "id"), ("NUMBER", "phone_number"), ("NAME", "name"),
                 ("ASSISTANT", "assistant_id"), ("TRANSFER TRUNK", "transfer_trunk_id"),
                 ("ACTIVE", "is_active")),
        flags=(Flag("--name", "name", "display name"),
               Flag("--assistant", "assistant_id", "assistant id", nullable=True),
               Flag("--transfer-trunk", "transfer_trunk_id", "SIP trunk id for transfers",
                    nullable=True)),
        positional="phone_number"),
    Resource(
        command="trunks", path="/api/v1/sip-trunks", one="trunk", many="trunks",
        columns=(("ID", "id"), ("NAME", "name"), ("ADDRESS", "address"),
                 ("TRANSPORT", "transport"), ("PROVIDER", "provider"),
                 ("USERNAME", "username"), ("INBOUND", "inbound_addresses"),
                 ("REGISTER", "register"), ("ACTIVE", "is_active")),
        flags=(Flag("--name", "name", "trunk name", required_on_add=True),
               Flag("--host", "host", "host name or IP address of outbound legs"),
               Flag("--port", "port", "port (default 5060)", kind=int),
               Flag("--outbound-address", "outbound_address",
                    "host[:port] or SIP URI of outbound legs (the registrar too)",
                    nullable=True),
               Flag("--inbound-addresses", "inbound_addresses",
                    "comma-separated IPs, CIDRs or host names the provider calls from",
                    kind=_comma_list),
               Flag("--outbound-number", "outbound_number", "caller id (E.164) on outbound "
                    "legs", nullable=True),
               Flag("--register", "register", "register with the provider: true or false",
                    kind=_boolean),
               Flag("--register-expires", "register_expires", "REGISTER expiry (s)", kind=int),
               Flag("--inbound-auth", "inbound_auth", "challenge the provider's INVITEs: "
                    "true or false", kind=_boolean),
               Flag("--transport", "transport", "transport", choices=("udp", "tcp")),
               Flag("--provider", "provider", "provider name"),
               Flag("--username", "username", "digest user name", nullable=True),
               Flag("--password", "password", "digest password (prefer --password-stdin)",
                    nullable=True))),
    Resource(
        command="assistants", path="/api/v1/assistants", one="assistant", many="assistants",
        columns=(("ID", "id"), ("NAME", "name"), ("RUNTIME URI", "runtime_uri"),
                 ("WEBHOOK URL", "webhook_url"), ("EVENTS", "webhook_events"),
                 ("SECRET", "has_webhook_secret")),
        flags=(Flag("--name", "name", "assistant name", required_on_add=True),
               Flag("--runtime-uri", "runtime_uri",
                    "SIP URI of the assistant's runtime ('none': default pool)",
                    nullable=True),
               Flag("--webhook-url", "webhook_url",
                    "http(s) URL for its webhooks ('none': the account-level webhook)",
                    nullable=True),
               Flag("--webhook-secret", "webhook_secret",
                    "HMAC secret that signs its webhooks (never shown again)", nullable=True),
               Flag("--webhook-events", "webhook_events",
                    "comma-separated: assistant-request,status-update ('' for none)",
                    kind=_comma_list))),
)
_BY_COMMAND = {r.command: r for r in RESOURCES}


# -- argparse ----------------------------------------------------------------------------

def register(subparsers: SubParsers) -> None:
    """Add ``numbers``, ``trunks``, ``assistants`` and ``keys`` to the ``callrouter`` parser."""
    connection = _connection_options()
    for resource in RESOURCES:
        _register_resource(subparsers, resource, connection)
    _register_keys(subparsers)


def _connection_options() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--url", default=os.environ.get("CALLROUTER_API_URL", DEFAULT_URL),
                        help="router API base URL (env CALLROUTER_API_URL)")
    shared.add_argument("--api-key", default=os.environ.get("CALLROUTER_API_KEY"),
                        help="API key (env CALLROUTER_API_KEY)")
    shared.add_argument("--json", action="store_true", help="print the API's JSON")
    return shared


def _register_resource(
    subparsers: SubParsers, resource: Resource, connection: argparse.ArgumentParser
) -> None:
    parser = subparsers.add_parser(resource.command, help=f"manage {resource.command}")
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[connection], help=f"list {resource.command}")
    add = actions.add_parser("add", parents=[connection], help=f"add to {resource.command}")
    if resource.positional:
        add.add_argument(resource.positional)
    if resource.command == "assistants":
        add.add_argument("--id", dest="id", help="assistant id (default: generated)")
    update = actions.add_parser("update", parents=[connection], help="change fields")
    update.add_argument("id")
    for leaf, is_add in ((add, True), (update, False)):
        _add_flags(leaf, resource, is_add)
    delete = actions.add_parser("delete", parents=[connection], help="delete by id")
    delete.add_argument("id")
    if resource.command == "numbers":
        _register_bulk(actions, connection)
    parser.set_defaults(func=run_api, resource=resource.command)


def _register_bulk(actions: SubParsers, connection: argparse.ArgumentParser) -> None:
    imports = actions.add_parser(
        "import", parents=[connection], help="register every number of a CSV file "
        f"(header: {', '.join(numbercsv.COLUMNS)}; only phone_number is required)")
    imports.add_argument("file", type=Path)
    imports.add_argument("--skip-invalid", action="store_true",
                         help="register the good rows and list the bad ones (default: "
                              "any bad row means none is registered)")
    exports = actions.add_parser("export", parents=[connection],
                                 help="write every number as CSV (the import format)")
    exports.add_argument("file", nargs="?", type=Path, help="default: standard output")


def _add_flags(parser: argparse.ArgumentParser, resource: Resource, is_add: bool) -> None:
    for flag in resource.flags:
        parser.add_argument(flag.option, dest=flag.field, type=flag.kind, choices=flag.choices,
                            required=is_add and flag.required_on_add,
                            help=flag.help + (f" ('{NULL_WORD}' to clear)" if flag.nullable
                                              and not is_add else ""))
    if resource.command == "trunks":
        parser.add_argument("--password-stdin", action="store_true",
                            help="read the password from the first line of stdin")
    if resource.command != "assistants":
        active = parser.add_mutually_exclusive_group()
        active.add_argument("--active", dest="is_active", action="store_const", const=True)
        active.add_argument("--inactive", dest="is_active", action="store_const", const=False)


def _register_keys(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser("keys", help="manage API keys")
    actions = parser.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create an API key and print it once")
    create.add_argument("--read-only", action="store_true", help="key may only read")
    create.add_argument("--name", default="cli", help="label for the key")
    create.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("CALLROUTER_DATA_DIR", DEFAULT_DATA_DIR)),
                        help="data directory (env CALLROUTER_DATA_DIR)")
    create.add_argument("--database-url", default=os.environ.get("CALLROUTER_DATABASE_URL", ""),
                        help="the routers' PostgreSQL database (env CALLROUTER_DATABASE_URL); "
                             "unset: SQLite in the data directory")
    create.add_argument("--json", action="store_true", help="print JSON")
    create.set_defaults(func=run_keys_create)


# -- the API subcommands -----------------------------------------------------------------

def run_api(args: argparse.Namespace) -> int:
    return asyncio.run(call_api(args))


async def call_api(
    args: argparse.Namespace, *, transport: httpx.AsyncBaseTransport | None = None,
    out: TextIO | None = None, err: TextIO | None = None,
) -> int:
    """Run one resource subcommand against the API; returns the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    if args.action in ("import", "export"):
        bulk = import_numbers if args.action == "import" else export_numbers
        try:
            return await bulk(args, _client(args, transport), out, err)
        except httpx.HTTPError as exc:
            print(f"error: cannot reach the router at {args.url}: {exc}", file=err)
            return 1
    resource = _BY_COMMAND[args.resource]
    method, path, body = request_for(args, resource)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        async with httpx.AsyncClient(base_url=args.url, headers=headers,
                                     transport=transport, timeout=10.0) as client:
            response = await client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the router at {args.url}: {exc}", file=err)
        return 1
    if response.is_error:
        print(describe_error(response), file=err)
        return 1
    print(render(args, resource, response.json()), file=out)
    return 0


# -- bulk import and export of numbers ---------------------------------------------------

IMPORT_PATH = "/api/v1/numbers/import"
EXPORT_PAGE = 10_000


def _client(args: argparse.Namespace,
            transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # An import of a million rows is checked and stored for about a minute after the upload.
    return httpx.AsyncClient(base_url=args.url, headers=headers, transport=transport,
                             timeout=httpx.Timeout(10.0, read=900.0))


async def import_numbers(args: argparse.Namespace, client: httpx.AsyncClient, out: TextIO,
                         err: TextIO) -> int:
    """Stream FILE to the router with a progress bar on ``err``; print what was done."""
    path: Path = args.file
    try:
        size = path.stat().st_size
    except OSError as exc:
        print(f"error: cannot read {path}: {exc.strerror}", file=err)
        return 1
    bar = ProgressBar(size, err)

    async def chunks() -> AsyncIterator[bytes]:
        with path.open("rb") as f:
            while chunk := f.read(1 << 16):
                bar.advance(len(chunk))
                yield chunk
        bar.finish("uploaded; the router is checking and storing the rows")

    params = {"skip_invalid": "true"} if args.skip_invalid else {}
    async with client:
        response = await client.post(IMPORT_PATH, content=chunks(), params=params,
                                     headers={"Content-Type": "text/csv"})
    if response.is_error:
        print(describe_error(response), file=err)
        return 1
    payload = response.json()
    if args.json:
        print(json.dumps(payload, indent=2), file=out)
        return 0
    for row in payload["skipped"]:
        print(f"skipped line {row['line']}: {row['message']}", file=err)
    print(f"imported {payload['imported']} numbers, skipped {len(payload['skipped'])} rows",
          file=out)
    return 0


async def export_numbers(args: argparse.Namespace, client: httpx.AsyncClient, out: TextIO,
                         err: TextIO) -> int:
    """Every number as CSV (``numbercsv.COLUMNS``), read a page at a time."""
    target = args.file.open("w", newline="") if args.file else out
    try:
        writer = csv.writer(target)
        writer.writerow(numbercsv.COLUMNS)
        async with client:
            offset = 0
            while True:
                response = await client.get("/api/v1/numbers",
                                            params={"limit": EXPORT_PAGE, "offset": offset})
                if response.is_error:
                    print(describe_error(response), file=err)
                    return 1
                page = response.json()["numbers"]
                writer.writerows(numbercsv.export_row(
                    n["phone_number"], n["name"], n["assistant_id"], n["transfer_trunk_id"],
                    n["is_active"]) for n in page)
                offset += len(page)
                if len(page) < EXPORT_PAGE:
                    return 0
    finally:
        if target is not out:
            target.close()


class ProgressBar:
    """``[#####-----]  50%  12.0/24.0 MB`` on one line of ``err``, redrawn per percent."""

    def __init__(self, total: int, err: TextIO, width: int = 30) -> None:
        self._total, self._err, self._width = max(total, 1), err, width
        self._done = 0
        self._shown = -1

    def advance(self, count: int) -> None:
        self._done += count
        percent = min(100, self._done * 100 // self._total)
        if percent != self._shown:
            self._shown = percent
            filled = self._width * percent // 100
            print(f"\r[{'#' * filled}{'-' * (self._width - filled)}] {percent:3d}%  "
                  f"{self._done / 1e6:.1f}/{self._total / 1e6:.1f} MB", end="", file=self._err,
                  flush=True)

    def finish(self, message: str) -> None:
        print(f"\n{message}", file=self._err, flush=True)


def request_for(
    args: argparse.Namespace, resource: Resource
) -> tuple[str, str, dict[str, Any] | None]:
    action = args.action
    if action == "list":
        return "GET", resource.path, None
    if action == "delete":
        return "DELETE", f"{resource.path}/{args.id}", None
    body = body_from(args, resource)
    if action == "add":
        return "POST", resource.path, body
    return "PATCH", f"{resource.path}/{args.id}", body


def body_from(args: argparse.Namespace, resource: Resource) -> dict[str, Any]:
    """The JSON body for add/update: only the fields given on the command line."""
    names = [f.field for f in resource.flags] + ["is_active"]
    if args.action == "add":
        names += ["id", resource.positional] if resource.positional else ["id"]
    nullable = {f.field for f in resource.flags if f.nullable}
    body: dict[str, Any] = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            body[name] = None if name in nullable and value == NULL_WORD else value
    if getattr(args, "password_stdin", False):
        body["password"] = sys.stdin.readline().rstrip("\r\n")
    return body


def describe_error(response: httpx.Response) -> str:
    try:
        payload = response.json()
        lines = [f"error: {payload['message']}"]
        lines += [f"  {d['field']}: {d['message']}" for d in payload.get("details", [])]
    except (ValueError, KeyError, TypeError):
        lines = [f"error: HTTP {response.status_code}: {response.text.strip()}"]
    return "\n".join(lines)


def render(args: argparse.Namespace, resource: Resource, payload: Mapping[str, Any]) -> str:
    if args.json:
        return json.dumps(payload, indent=2)
    if args.action == "delete":
        return f"deleted {args.id}"
    items = payload[resource.many] if args.action == "list" else [payload[resource.one]]
    return format_table([h for h, _ in resource.columns],
                        [[item.get(f) for _, f in resource.columns] for item in items])


def format_table(headings: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns left-aligned to their widest cell, two spaces apart."""
    cells = [list(headings)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headings))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


# -- API keys ----------------------------------------------------------------------------

def run_keys_create(args: argparse.Namespace) -> int:
    return asyncio.run(create_key(args.data_dir, name=args.name, read_only=args.read_only,
                                  as_json=args.json, database_url=args.database_url))


async def create_key(
    data_dir: Path, *, name: str, read_only: bool, as_json: bool = False,
    out: TextIO | None = None, database_url: str = "",
) -> int:
    """Create a key directly in the router's database (PostgreSQL at ``database_url``,
    else SQLite in ``data_dir``) and print it (the only time)."""
    store = make_store(database_url, data_dir / DB_FILE)
    await store.open()
    try:
        token, key = await issue_api_key(store, name=name, read_only=read_only, now=_now())
    finally:
        await store.close()
    text = json.dumps({"key": token, "id": str(key.id), "name": key.name,
                       "read_only": key.read_only}) if as_json else token
    print(text, file=out or sys.stdout)
    return 0


async def ensure_first_key(store: Store) -> str | None:
    """If no API key exists yet, create a read-write one and return it (else ``None``).
    Of several routers starting together on one empty database only the first makes one."""
    if await store.count_api_keys() > 0 or not await store.claim("first_api_key"):
        return None
    token, _ = await issue_api_key(store, name="initial", read_only=False, now=_now())
    return token


def _now() -> datetime:
    return datetime.now(UTC)


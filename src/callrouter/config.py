"""Configuration: parsed once, validated as a whole, frozen.

How it works: every setting is declared once in ``SETTINGS`` (dotted path,
default, parser). ``load(environ, path)`` layers the defaults, then the TOML file
given with ``--config`` (if any), then environment variables, parses each value,
checks the settings against each other, and raises ``ConfigError`` listing
*every* problem at once. The environment variable for ``a.b_c`` is
``CALLROUTER_A_B_C``; a few short aliases (``CALLROUTER_RTP_PORTS``,
``CALLROUTER_DATA_DIR``) are kept because operators and the issue texts use them.
``config/callrouter.toml`` documents every setting with its default; a unit test
keeps it in step with ``SETTINGS``.
"""

from __future__ import annotations

import ipaddress
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from callrouter.domain.webhooks import EVENTS, destination_problem
from callrouter.errors import ConfigError

ENV_PREFIX = "CALLROUTER_"
ENV_ALIASES = {
    "CALLROUTER_RTP_PORTS": "sip.rtp_ports",
    "CALLROUTER_DATA_DIR": "storage.data_dir",
    "CALLROUTER_DATABASE_URL": "store.database_url",
}
ENGINE_SLOT_RESERVE = 16  # pjsua call slots kept free so the router, not pjsua, says 503


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class PortRange:
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1


@dataclass(frozen=True)
class InboundConfig:
    allowed_sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    forbidden_action: str  # "drop" | "reject"
    unknown_number_code: int
    not_a_number_code: int
    unassigned_code: int
    inactive_code: int
    runtime_failure_code: int
    retry_after_seconds: int
    flood_limit: int  # new requests per second from one source; 0 = off
    flood_ban_seconds: int


@dataclass(frozen=True)
class SipConfig:
    listen: HostPort
    advertise: str
    rtp_ports: PortRange
    max_calls: int
    ring_timeout_seconds: float
    max_duration_seconds: float
    transfer_ring_timeout_seconds: float
    codecs: tuple[str, ...]
    max_message_bytes: int
    inbound: InboundConfig
    media_relay: bool = True  # same-codec legs: packets relayed, not decoded
    media_relay_threads: int = 0  # threads moving relayed packets; 0: one per 2 cores


@dataclass(frozen=True)
class RuntimeConfig:
    pool: tuple[str, ...]
    strategy: str  # "round-robin" | "first"


@dataclass(frozen=True)
class HttpConfig:
    listen: HostPort
    rate_limit_per_minute: int
    max_body_bytes: int


@dataclass(frozen=True)
class StorageConfig:
    data_dir: Path

    @property
    def database(self) -> Path:
        return self.data_dir / "callrouter.db"


@dataclass(frozen=True)
class StoreConfig:
    """Where the router keeps its data: SQLite in the data directory unless
    ``database_url`` names a PostgreSQL database shared by several routers."""

    # postgresql://user:pass@host:port/db; "" = SQLite. Not in repr: it holds a password.
    database_url: str = field(default="", repr=False)
    timeout_seconds: float = 5.0  # connecting and each statement (PostgreSQL)
    pool_size: int = 10  # connections per router (PostgreSQL)
    full_reload_seconds: float = 300.0  # route table rebuilt from the database this often


@dataclass(frozen=True)
class LogConfig:
    format: str  # "json" | "console" | "auto"
    level: str
    engine_level: int


@dataclass(frozen=True)
class CallsConfig:
    retention_days: int = 90  # call records older than this are deleted; 0 keeps them
    rejected_records_per_second: int = 10  # per outcome; further rejections only counted


@dataclass(frozen=True)
class TrunksConfig:
    """Providers as trunks (issue 11)."""

    resolve_interval_seconds: float = 300.0  # host names in inbound_addresses re-resolved
    outbound_ring_timeout_seconds: float = 60.0  # POST /calls/outbound: no answer -> CANCEL
    register_retry_seconds: int = 30  # first REGISTER retry after a failure, then doubling
    register_retry_max_seconds: int = 300  # up to this
    keepalive_seconds: int = 15  # CRLF keep-alive to a registrar over UDP (RFC 5626)


@dataclass(frozen=True)
class WebhooksConfig:
    """The account-level webhook (the fallback for assistants without their own) and how
    every webhook is delivered."""

    url: str = ""  # "" = no account-level webhook
    secret: str = ""
    events: tuple[str, ...] = EVENTS
    assistant_request_timeout_seconds: float = 5.0
    retry_hours: float = 24.0
    allow_private: bool = False
    max_concurrency_per_destination: int = 4
    delivery_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class Config:
    sip: SipConfig
    runtime: RuntimeConfig
    http: HttpConfig
    storage: StorageConfig
    log: LogConfig
    default_region: str
    drain_timeout_seconds: float
    calls: CallsConfig = CallsConfig()
    import_max_bytes: int = 256 * 1024 * 1024  # POST /api/v1/numbers/import body limit
    route_compaction_at: int = 4096  # route changes held before they are merged
    trunks: TrunksConfig = TrunksConfig()
    store: StoreConfig = StoreConfig()
    node_name: str = ""  # this router's name in call records (default host:sip-port)
    secrets_key_file: Path | None = None  # the trunk-password key (default data_dir)

    @property
    def key_file(self) -> Path:
        return self.secrets_key_file or self.storage.data_dir / "secret.key"
    import_workers: int = 0  # processes checking an import's rows (0: one per CPU)
    webhooks: WebhooksConfig = WebhooksConfig()


# ---- parsers: value -> parsed value, or ValueError with a message ------------------


def _host_port(value: Any) -> HostPort:
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {text!r}")
    host = host.strip("[]")
    return HostPort(host, _port(port))


def _port(value: Any) -> int:
    port = _int(value)
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    return port


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected an integer, got {value!r}") from None


def _non_negative_int(value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a whole number >= 0, got {value!r}") from None
    if number < 0 or isinstance(value, bool):
        raise ValueError(f"expected a whole number >= 0, got {value!r}")
    return number


def _relay_threads(value: Any) -> int:
    number = _non_negative_int(value)
    if number > 16:
        raise ValueError(f"expected 0 (one per two CPU cores, at most 4) to 16, got {number}")
    return number


def _positive_int(value: Any) -> int:
    number = _int(value)
    if number <= 0:
        raise ValueError(f"must be positive, got {number}")
    return number


def _seconds(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected seconds, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"must be positive, got {number}")
    return number


def _database_url(value: Any) -> str:
    text = str(value).strip()
    if text and not text.startswith(("postgresql://", "postgres://")):
        raise ValueError("expected a postgresql://user:password@host:port/database URL "
                         "(or empty for SQLite in the data directory)")
    return text


def _node_name(value: Any) -> str:
    text = str(value).strip()
    if len(text) > 100 or not all(c.isprintable() and not c.isspace() for c in text):
        raise ValueError(f"expected at most 100 printable characters without spaces, "
                         f"got {text!r}")
    return text


def _optional_path(value: Any) -> Path | None:
    text = str(value).strip()
    return Path(text) if text else None


def _sip_code(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        code = _int(value)
        if not low <= code <= high:
            raise ValueError(f"expected a SIP status {low}-{high}, got {code}")
        return code

    return parse


def _port_range(value: Any) -> PortRange:
    start, sep, end = str(value).partition("-")
    if not sep:
        raise ValueError(f"expected start-end, got {value!r}")
    rng = PortRange(_port(start), _port(end))
    if rng.start < 1024 or rng.end < rng.start:
        raise ValueError(f"expected 1024 <= start <= end, got {value!r}")
    return rng


def _str_list(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f"expected a list, got {value!r}")
    return tuple(str(item).strip() for item in items if str(item).strip())


def _networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in _str_list(value))
    except ValueError as exc:
        raise ValueError(f"invalid network: {exc}") from None


def _sip_uris(value: Any) -> tuple[str, ...]:
    uris = _str_list(value)
    for uri in uris:
        scheme, _, rest = uri.partition(":")
        host = rest.split("@")[-1].split(";")[0].strip()
        if scheme.lower() not in ("sip", "sips") or not host:
            raise ValueError(f"not a SIP URI: {uri!r}")
    return uris


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return text

    return parse


def _region(value: Any) -> str:
    text = str(value).strip().upper()
    if len(text) != 2 or not text.isalpha():
        raise ValueError(f"expected a two-letter region code, got {value!r}")
    return text


def _codecs(value: Any) -> tuple[str, ...]:
    # 8 kHz G.711 only: the engine's audio switchboard joins legs 1:1 without resampling.
    codecs = tuple(c.upper() for c in _str_list(value))
    unknown = set(codecs) - {"PCMU", "PCMA"}
    if unknown or not codecs:
        raise ValueError(f"supported codecs are PCMU and PCMA; got {value!r}")
    return codecs


# What the engine's transports can read whole (PJSIP_MAX_PKT_LEN in
# scripts/engine/config_site.h): the largest UDP payload fits, TCP messages up to this.
ENGINE_MAX_MESSAGE_BYTES = 65535


def _message_size(value: Any) -> int:
    # Below 1,500 bytes ordinary INVITEs with SDP would be refused.
    size = _positive_int(value)
    if not 1500 <= size <= ENGINE_MAX_MESSAGE_BYTES:
        raise ValueError(f"expected 1500..{ENGINE_MAX_MESSAGE_BYTES} bytes, got {value!r}")
    return size


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _webhook_url(value: Any) -> str:
    text = str(value).strip()
    if text:
        problem = destination_problem(text, allow_private=True)  # private: cross-checked
        if problem is not None:
            raise ValueError(f"{text!r} {problem}")
    return text


def _events(value: Any) -> tuple[str, ...]:
    events = _str_list(value)
    unknown = sorted(set(events) - set(EVENTS))
    if unknown:
        raise ValueError(f"unknown event(s) {', '.join(unknown)}; known: {', '.join(EVENTS)}")
    return tuple(dict.fromkeys(events))


@dataclass(frozen=True)
class Setting:
    path: str
    default: Any
    parse: Callable[[Any], Any]

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.path.replace(".", "_").upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("sip.listen", "0.0.0.0:5060", _host_port),
    Setting("sip.advertise", "", str),
    Setting("sip.rtp_ports", "20000-29999", _port_range),
    Setting("sip.max_calls", 1000, _positive_int),
    Setting("sip.ring_timeout_seconds", 30, _seconds),
    Setting("sip.max_duration_seconds", 14400, _seconds),
    Setting("sip.transfer_ring_timeout_seconds", 30, _seconds),
    Setting("sip.codecs", ["PCMU", "PCMA"], _codecs),
    Setting("sip.max_message_bytes", 16384, _message_size),
    Setting("sip.media_relay", True, _bool),
    Setting("sip.media_relay_threads", 0, _relay_threads),
    Setting("sip.inbound.allowed_sources", ["127.0.0.0/8", "::1/128"], _networks),
    Setting("sip.inbound.forbidden_action", "drop", _choice("drop", "reject")),
    Setting("sip.inbound.unknown_number_code", 404, _sip_code(400, 699)),
    Setting("sip.inbound.not_a_number_code", 404, _sip_code(400, 699)),
    Setting("sip.inbound.unassigned_code", 480, _sip_code(400, 699)),
    Setting("sip.inbound.inactive_code", 480, _sip_code(400, 699)),
    Setting("sip.inbound.runtime_failure_code", 503, _sip_code(400, 699)),
    Setting("sip.inbound.retry_after_seconds", 5, _positive_int),
    Setting("sip.inbound.flood_limit", 50, _non_negative_int),
    Setting("sip.inbound.flood_ban_seconds", 60, _positive_int),
    Setting("runtime.pool", [], _sip_uris),
    Setting("runtime.strategy", "round-robin", _choice("round-robin", "first")),
    Setting("http.listen", "127.0.0.1:8080", _host_port),
    Setting("http.rate_limit_per_minute", 100, _positive_int),
    Setting("http.max_body_bytes", 1024 * 1024, _positive_int),
    Setting("storage.data_dir", "./var", lambda v: Path(str(v))),
    Setting("store.database_url", "", _database_url),
    Setting("store.timeout_seconds", 5, _seconds),
    Setting("store.pool_size", 10, _positive_int),
    Setting("store.full_reload_seconds", 300, _seconds),
    Setting("secrets.key_file", "", _optional_path),
    Setting("node.name", "", _node_name),
    Setting("log.format", "auto", _choice("auto", "json", "console")),
    Setting("log.level", "info", _choice("debug", "info", "warning", "error")),
    Setting("log.engine_level", 1, _int),
    Setting("numbers.default_region", "NL", _region),
    Setting("numbers.import_max_bytes", 256 * 1024 * 1024, _positive_int),
    Setting("numbers.route_compaction_at", 4096, _positive_int),
    Setting("numbers.import_workers", 0, _non_negative_int),
    Setting("drain.timeout_seconds", 30, _seconds),
    Setting("calls.retention_days", 90, _non_negative_int),
    Setting("calls.rejected_records_per_second", 10, _non_negative_int),
    Setting("trunks.resolve_interval_seconds", 300, _seconds),
    Setting("trunks.outbound_ring_timeout_seconds", 60, _seconds),
    Setting("trunks.register_retry_seconds", 30, _positive_int),
    Setting("trunks.register_retry_max_seconds", 300, _positive_int),
    Setting("trunks.keepalive_seconds", 15, _non_negative_int),
    Setting("webhooks.url", "", _webhook_url),
    Setting("webhooks.secret", "", str),
    Setting("webhooks.events", list(EVENTS), _events),
    Setting("webhooks.assistant_request_timeout_seconds", 5, _seconds),
    Setting("webhooks.retry_hours", 24, _seconds),
    Setting("webhooks.allow_private", False, _bool),
    Setting("webhooks.max_concurrency_per_destination", 4, _positive_int),
    Setting("webhooks.delivery_timeout_seconds", 10, _seconds),
)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _raw_values(
    environ: Mapping[str, str], path: Path | None, problems: list[str]
) -> dict[str, Any]:
    raw = {s.path: s.default for s in SETTINGS}
    if path is not None:
        try:
            from_file = _flatten(tomllib.loads(path.read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"{path}: {exc}")
            from_file = {}
        for key in sorted(set(from_file) - set(raw)):
            problems.append(f"{path}: unknown setting {key!r}")
        raw.update({k: v for k, v in from_file.items() if k in raw})
    by_env = {s.env: s.path for s in SETTINGS} | ENV_ALIASES
    for name, setting_path in by_env.items():
        if name in environ:
            raw[setting_path] = environ[name]
    return raw


def _parsed(raw: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        try:
            values[setting.path] = setting.parse(raw[setting.path])
        except ValueError as exc:
            problems.append(f"{setting.path} ({setting.env}): {exc}")
    return values


def _cross_checks(v: Mapping[str, Any], engine_max_calls: int | None) -> list[str]:
    problems = []
    # Each inbound call takes up to two engine calls (caller + runtime leg) and each leg
    # an RTP and an RTCP port, so the RTP range must cover max_calls * 2 legs * 2 ports.
    needed_ports = v["sip.max_calls"] * 4
    if v["sip.rtp_ports"].size < needed_ports:
        problems.append(
            f"sip.rtp_ports: {v['sip.rtp_ports'].size} ports cannot carry sip.max_calls="
            f"{v['sip.max_calls']} bridged calls (needs {needed_ports})"
        )
    if v["webhooks.url"]:
        problem = destination_problem(v["webhooks.url"], v["webhooks.allow_private"])
        if problem is not None:
            problems.append(f"webhooks.url: {problem}")
    slots = v["sip.max_calls"] * 2 + ENGINE_SLOT_RESERVE
    if engine_max_calls is not None and slots > engine_max_calls:
        problems.append(
            f"sip.max_calls: {v['sip.max_calls']} bridged calls need "
            f"{slots} engine call slots; "
            f"the engine was built with {engine_max_calls}"
        )
    return problems


def load(
    environ: Mapping[str, str],
    path: Path | None = None,
    *,
    engine_max_calls: int | None = None,
) -> Config:
    """Build the configuration; raise ConfigError listing every problem."""
    problems: list[str] = []
    values = _parsed(_raw_values(environ, path, problems), problems)
    if not problems:
        problems.extend(_cross_checks(values, engine_max_calls))
    if problems:
        raise ConfigError(problems)
    return _build(values)


def _build(v: Mapping[str, Any]) -> Config:
    inbound = InboundConfig(
        allowed_sources=v["sip.inbound.allowed_sources"],
        forbidden_action=v["sip.inbound.forbidden_action"],
        unknown_number_code=v["sip.inbound.unknown_number_code"],
        not_a_number_code=v["sip.inbound.not_a_number_code"],
        unassigned_code=v["sip.inbound.unassigned_code"],
        inactive_code=v["sip.inbound.inactive_code"],
        runtime_failure_code=v["sip.inbound.runtime_failure_code"],
        retry_after_seconds=v["sip.inbound.retry_after_seconds"],
        flood_limit=v["sip.inbound.flood_limit"],
        flood_ban_seconds=v["sip.inbound.flood_ban_seconds"],
    )
    sip = SipConfig(
        listen=v["sip.listen"],
        advertise=v["sip.advertise"],
        rtp_ports=v["sip.rtp_ports"],
        max_calls=v["sip.max_calls"],
        ring_timeout_seconds=v["sip.ring_timeout_seconds"],
        max_duration_seconds=v["sip.max_duration_seconds"],
        transfer_ring_timeout_seconds=v["sip.transfer_ring_timeout_seconds"],
        codecs=v["sip.codecs"],
        max_message_bytes=v["sip.max_message_bytes"],
        inbound=inbound,
        media_relay=v["sip.media_relay"],
        media_relay_threads=v["sip.media_relay_threads"],
    )
    return Config(
        sip=sip,
        runtime=RuntimeConfig(pool=v["runtime.pool"], strategy=v["runtime.strategy"]),
        http=HttpConfig(listen=v["http.listen"],
                        rate_limit_per_minute=v["http.rate_limit_per_minute"],
                        max_body_bytes=v["http.max_body_bytes"]),
        storage=StorageConfig(data_dir=v["storage.data_dir"]),
        log=LogConfig(format=v["log.format"], level=v["log.level"],
                      engine_level=v["log.engine_level"]),
        default_region=v["numbers.default_region"],
        drain_timeout_seconds=v["drain.timeout_seconds"],
        calls=CallsConfig(retention_days=v["calls.retention_days"],
                          rejected_records_per_second=v["calls.rejected_records_per_second"]),
        import_max_bytes=v["numbers.import_max_bytes"],
        route_compaction_at=v["numbers.route_compaction_at"],
        trunks=TrunksConfig(
            resolve_interval_seconds=v["trunks.resolve_interval_seconds"],
            outbound_ring_timeout_seconds=v["trunks.outbound_ring_timeout_seconds"],
            register_retry_seconds=v["trunks.register_retry_seconds"],
            register_retry_max_seconds=v["trunks.register_retry_max_seconds"],
            keepalive_seconds=v["trunks.keepalive_seconds"]),
        store=StoreConfig(database_url=v["store.database_url"],
                          timeout_seconds=v["store.timeout_seconds"],
                          pool_size=v["store.pool_size"],
                          full_reload_seconds=v["store.full_reload_seconds"]),
        node_name=v["node.name"] or f"{socket.gethostname()}:{sip.listen.port}",
        secrets_key_file=v["secrets.key_file"],
        import_workers=v["numbers.import_workers"],
        webhooks=WebhooksConfig(
            url=v["webhooks.url"], secret=v["webhooks.secret"], events=v["webhooks.events"],
            assistant_request_timeout_seconds=v["webhooks.assistant_request_timeout_seconds"],
            retry_hours=v["webhooks.retry_hours"], allow_private=v["webhooks.allow_private"],
            max_concurrency_per_destination=v["webhooks.max_concurrency_per_destination"],
            delivery_timeout_seconds=v["webhooks.delivery_timeout_seconds"]),
    )

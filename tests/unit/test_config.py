"""Config: defaults, the documented file, environment overrides, every problem at once."""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path

import pytest

from callrouter import config
from callrouter.app import auto_relay_threads
from callrouter.errors import ConfigError

DOC = Path(__file__).resolve().parents[2] / "config" / "callrouter.toml"


def test_documented_file_lists_every_setting_with_its_default() -> None:
    documented = config._flatten(tomllib.loads(DOC.read_text()))
    assert set(documented) == {s.path for s in config.SETTINGS}
    for setting in config.SETTINGS:
        assert documented[setting.path] == setting.default, setting.path


def test_defaults_load() -> None:
    cfg = config.load({})
    assert str(cfg.sip.listen) == "0.0.0.0:5060"
    assert str(cfg.http.listen) == "127.0.0.1:8080"
    assert cfg.sip.rtp_ports.start == 20000 and cfg.sip.rtp_ports.end == 29999
    assert cfg.storage.data_dir == Path("./var")
    assert cfg.sip.inbound.forbidden_action == "drop"
    assert [str(n) for n in cfg.sip.inbound.allowed_sources] == ["127.0.0.0/8", "::1/128"]


def test_environment_overrides_file_which_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[sip]\nlisten = "127.0.0.1:5070"\nmax_calls = 10\n'
                    '[http]\nlisten = "127.0.0.1:9000"\n')
    env = {
        "CALLROUTER_SIP_LISTEN": "127.0.0.1:5080",
        "CALLROUTER_SIP_ADVERTISE": "203.0.113.7",
        "CALLROUTER_RTP_PORTS": "40000-40999",
        "CALLROUTER_DATA_DIR": "/srv/cr",
        "CALLROUTER_LOG_FORMAT": "console",
        "CALLROUTER_SIP_INBOUND_ALLOWED_SOURCES": "10.1.0.0/16, 192.0.2.1",
        "CALLROUTER_RUNTIME_POOL": "sip:rt1.example:5060,sip:rt2.example",
    }
    cfg = config.load(env, path)
    assert str(cfg.sip.listen) == "127.0.0.1:5080"  # env wins over the file
    assert str(cfg.http.listen) == "127.0.0.1:9000"  # the file wins over the default
    assert cfg.sip.max_calls == 10
    assert cfg.sip.advertise == "203.0.113.7"
    assert cfg.sip.rtp_ports.size == 1000
    assert cfg.storage.database == Path("/srv/cr/callrouter.db")
    assert cfg.log.format == "console"
    assert [str(n) for n in cfg.sip.inbound.allowed_sources] == ["10.1.0.0/16", "192.0.2.1/32"]
    assert cfg.runtime.pool == ("sip:rt1.example:5060", "sip:rt2.example")


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[sip]\nlistn = "x"\n')
    env = {
        "CALLROUTER_SIP_LISTEN": "nonsense",
        "CALLROUTER_RTP_PORTS": "30000-20000",
        "CALLROUTER_LOG_FORMAT": "xml",
        "CALLROUTER_SIP_INBOUND_ALLOWED_SOURCES": "10.0.0.0/33",
        "CALLROUTER_RUNTIME_POOL": "http://x",
        "CALLROUTER_NUMBERS_DEFAULT_REGION": "Netherlands",
        "CALLROUTER_SIP_INBOUND_UNKNOWN_NUMBER_CODE": "200",
    }
    with pytest.raises(ConfigError) as err:
        config.load(env, path)
    text = "\n".join(err.value.problems)
    for fragment in ("unknown setting 'sip.listn'", "CALLROUTER_SIP_LISTEN", "sip.rtp_ports",
                     "log.format", "allowed_sources", "runtime.pool", "default_region",
                     "unknown_number_code"):
        assert fragment in text, fragment
    assert len(err.value.problems) == 8


def test_settings_are_checked_against_each_other() -> None:
    env = {"CALLROUTER_SIP_MAX_CALLS": "1020", "CALLROUTER_RTP_PORTS": "20000-20999"}
    with pytest.raises(ConfigError) as err:
        config.load(env, engine_max_calls=2048)
    text = "\n".join(err.value.problems)
    assert "cannot carry sip.max_calls=1020" in text
    assert "need 2056 engine call slots; the engine was built with 2048" in text


def test_message_size_limit_is_bounded_by_what_the_engine_reads() -> None:
    assert config.load({}).sip.max_message_bytes == 16384
    assert config.load({"CALLROUTER_SIP_MAX_MESSAGE_BYTES": "65535"}).sip.max_message_bytes \
        == config.ENGINE_MAX_MESSAGE_BYTES
    for bad in ("65536", "1000", "big"):
        with pytest.raises(ConfigError, match=r"sip\.max_message_bytes"):
            config.load({"CALLROUTER_SIP_MAX_MESSAGE_BYTES": bad})


def test_relay_threads_are_counted_or_given(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.load({}).sip.media_relay_threads == 0  # auto
    assert config.load({"CALLROUTER_SIP_MEDIA_RELAY_THREADS": "3"}).sip.media_relay_threads == 3
    for bad in ("-1", "17", "two"):
        with pytest.raises(ConfigError, match=r"sip\.media_relay_threads"):
            config.load({"CALLROUTER_SIP_MEDIA_RELAY_THREADS": bad})
    for cores, threads in ((1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (64, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert auto_relay_threads() == threads, cores


def test_a_capped_engine_is_refused() -> None:
    with pytest.raises(ConfigError, match="the engine was built with 4"):
        config.load({}, engine_max_calls=4)


def test_call_record_settings_have_defaults_and_refuse_negatives() -> None:
    """Guards the flood settings of issue 9 item 7(a): records kept 90 days, at most 10
    rejected INVITEs of each outcome recorded a second; 0 turns either off."""
    cfg = config.load({})
    assert (cfg.calls.retention_days, cfg.calls.rejected_records_per_second) == (90, 10)
    off = config.load({"CALLROUTER_CALLS_RETENTION_DAYS": "0",
                       "CALLROUTER_CALLS_REJECTED_RECORDS_PER_SECOND": "0"})
    assert (off.calls.retention_days, off.calls.rejected_records_per_second) == (0, 0)
    with pytest.raises(ConfigError) as caught:
        config.load({"CALLROUTER_CALLS_RETENTION_DAYS": "-1",
                     "CALLROUTER_CALLS_REJECTED_RECORDS_PER_SECOND": "many"})
    assert "calls.retention_days" in str(caught.value)
    assert "calls.rejected_records_per_second" in str(caught.value)


def test_cluster_settings_defaults_and_environment() -> None:
    """Guards issue 10's settings: SQLite by default; the PostgreSQL URL (also by its short
    name), the shared key file and the node name from the environment."""
    cfg = config.load({})
    assert cfg.store.database_url == "" and cfg.key_file == Path("./var/secret.key")
    assert cfg.node_name == f"{socket.gethostname()}:5060"
    cfg = config.load({"CALLROUTER_DATABASE_URL": "postgresql://cr:pw@db:5432/cr",
                       "CALLROUTER_SECRETS_KEY_FILE": "/etc/callrouter/key",
                       "CALLROUTER_NODE_NAME": "edge-a", "CALLROUTER_SIP_LISTEN": "0.0.0.0:5070",
                       "CALLROUTER_STORE_FULL_RELOAD_SECONDS": "60"})
    assert cfg.store.database_url == "postgresql://cr:pw@db:5432/cr"
    assert "pw" not in repr(cfg.store)  # check-config prints the configuration
    assert cfg.key_file == Path("/etc/callrouter/key")
    assert (cfg.node_name, cfg.store.full_reload_seconds) == ("edge-a", 60)
    assert config.load({"CALLROUTER_SIP_LISTEN": "0.0.0.0:5070"}).node_name.endswith(":5070")


def test_cluster_settings_refuse_bad_values() -> None:
    with pytest.raises(ConfigError) as err:
        config.load({"CALLROUTER_DATABASE_URL": "mysql://db/cr", "CALLROUTER_NODE_NAME": "a b",
                     "CALLROUTER_STORE_POOL_SIZE": "0", "CALLROUTER_STORE_TIMEOUT_SECONDS": "-1"})
    text = "\n".join(err.value.problems)
    for fragment in ("store.database_url", "node.name", "store.pool_size",
                     "store.timeout_seconds"):
        assert fragment in text, fragment

"""Start the real router as a subprocess on free loopback ports, for integration tests.

``RouterProcess`` runs ``python -m callrouter serve`` with the environment variables
an operator would use, waits until ``/api/v1/health`` answers, reads the first API
key the router prints on a fresh data dir, and offers a tiny REST client. Stopping
sends SIGTERM to the router's pid (and SIGKILL if it does not exit in time).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.sipp import LOOPBACK, free_port, free_sip_port

KEY_RE = re.compile(r"CALLROUTER_API_KEY=(\S+)")


def free_rtp_range(size: int = 400) -> str:
    base = 20000 + (os.getpid() * 7919) % 30000
    base -= base % 2
    return f"{base}-{base + size - 1}"


@dataclass
class RouterProcess:
    data_dir: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    sip_host: str = LOOPBACK  # "::1" for an IPv6 listener
    sip_port: int = 0
    http_port: int = field(default_factory=lambda: free_port(socket.SOCK_STREAM))
    rtp_ports: str = field(default_factory=free_rtp_range)
    proc: subprocess.Popen[bytes] | None = None
    key: str = ""

    def __post_init__(self) -> None:
        self.sip_port = self.sip_port or free_sip_port(self.sip_host)

    @property
    def sip_address(self) -> str:
        host = f"[{self.sip_host}]" if ":" in self.sip_host else self.sip_host
        return f"{host}:{self.sip_port}"

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "router.log"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "CALLROUTER_SIP_LISTEN": self.sip_address,
            "CALLROUTER_SIP_ADVERTISE": self.sip_host,
            "CALLROUTER_RTP_PORTS": self.rtp_ports,
            "CALLROUTER_HTTP_LISTEN": f"{LOOPBACK}:{self.http_port}",
            "CALLROUTER_DATA_DIR": str(self.data_dir),
            "CALLROUTER_LOG_FORMAT": "json",
            "CALLROUTER_SIP_MAX_CALLS": "50",
            # Every test peer sends from 127.0.0.1, and the suite's load and fuzz tests send
            # far more than 50 requests a second from it: flood control is off here and
            # tested on its own (test_flood_control.py) with its default limit.
            "CALLROUTER_SIP_INBOUND_FLOOD_LIMIT": "0",
        })
        env.update(self.env_extra)
        return env

    def command(self) -> list[str]:
        return [sys.executable, "-m", "callrouter", "serve"]

    def start(self, timeout: float = 20.0) -> RouterProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.command(), env=self.env(), stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited {self.proc.returncode}:\n{self.logs()}")
            if self._healthy():
                found = KEY_RE.search(self.logs())
                self.key = found.group(1) if found else self.key
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"router did not become healthy:\n{self.logs()}")

    def restart(self) -> RouterProcess:
        """Start again after the process ended, keeping the API key (the first key is
        printed only on a database that had none)."""
        key = self.key
        self.start()
        self.key = key
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.http_url}/api/v1/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        import json

        found = []
        for line in self.logs().splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    # ---- the REST API -----------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.request(method, f"{self.http_url}/api/v1{path}", headers=headers,
                             timeout=10, **kwargs)

    def add_assistant(self, runtime_uri: str | None, name: str = "Test") -> str:
        response = self.api("POST", "/assistants", json={"name": name, "runtime_uri": runtime_uri})
        assert response.status_code == 201, response.text
        return str(response.json()["assistant"]["id"])

    def add_number(self, number: str, assistant_id: str | None = None, **fields: Any) -> str:
        body = {"phone_number": number, "assistant_id": assistant_id, **fields}
        response = self.api("POST", "/numbers", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["number"]["id"])

    def calls(self) -> list[dict[str, Any]]:
        response = self.api("GET", "/calls")
        assert response.status_code == 200, response.text
        return list(response.json()["calls"])

    def wait_for_call(self, predicate: Any, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for call in self.calls():
                if predicate(call):
                    return call
            time.sleep(0.05)
        raise AssertionError(f"no call record matched; have {self.calls()}")


def media_env(media_path: str) -> dict[str, str]:
    """The router's environment for a media path (the ``media_path`` fixture): "relay"
    relays same-codec legs packet by packet, "switchboard" decodes and re-encodes."""
    return {"CALLROUTER_SIP_MEDIA_RELAY": "true" if media_path == "relay" else "false"}

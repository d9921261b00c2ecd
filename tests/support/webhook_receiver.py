"""A real HTTP webhook receiver in the test process: verifies every request the way the
platform's receivers do (HMAC-SHA256 over ``"{timestamp}.{body}"``, timestamp within
300 s) and answers as the test says.

``WebhookReceiver`` runs a ``ThreadingHTTPServer`` on a loopback port in a thread. Each
request is kept as a ``Received`` (headers, raw body, parsed JSON, whether its signature
verified with the receiver's secret). ``reply`` is a function of the request returning
(status, body, extra headers, seconds to wait first); ``stop()`` closes the port (the
receiver is "down") and ``start()`` opens the same port again.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from callrouter.domain.webhooks import verify


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def message(self) -> dict[str, Any]:
        return dict(self.json["message"])

    @property
    def event(self) -> str:
        return self.headers.get("x-webhook-event", "")

    @property
    def delivery_id(self) -> str:
        return self.headers.get("x-webhook-id", "")


Reply = tuple[int, bytes, dict[str, str], float]
Replier = Callable[[Received], Reply]


def ok(_: Received) -> Reply:
    return 200, b"{}", {}, 0.0


@dataclass
class WebhookReceiver:
    secret: str | None = "test-secret"
    reply: Replier = ok
    port: int = 0
    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                stamp = headers.get("x-webhook-timestamp", "")
                fresh = stamp.isdigit() and abs(time.time() - int(stamp)) <= 300
                verified = fresh and (receiver.secret is None or verify(
                    receiver.secret, stamp, body, headers.get("x-webhook-signature", "")))
                got = Received(self.path, headers, body, verified, time.monotonic())
                with receiver._lock:
                    receiver.received.append(got)
                if not verified:
                    status, reply, extra, delay = 401, b'{"error":"bad signature"}', {}, 0.0
                else:
                    status, reply, extra, delay = receiver.reply(got)
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    for name, value in extra.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(reply)))
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(reply)
                except OSError:
                    pass  # the router stopped waiting

            def log_message(self, format: str, *args: Any) -> None:
                return None

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, name="webhook-receiver",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def events(self, event: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if event is None or r.event == event]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 10.0
                 ) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.events()
            if predicate(got):
                return got
            time.sleep(0.02)
        raise AssertionError(f"the receiver never saw that; got {self.summary()}")

    def summary(self) -> list[tuple[str, str, str, bool]]:
        return [(r.event, r.message.get("call", {}).get("status", ""), r.delivery_id,
                 r.verified) for r in self.events()]

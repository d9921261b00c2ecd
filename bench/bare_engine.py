"""The bare-engine baseline: the smallest pjsua2 UAS on the router's own engine build.

How it works: one thread (this one) creates the endpoint with ``threadCnt = 0`` and polls
``libHandleEvents`` in a loop, so every pjsua2 callback and call runs here (docs: the
engine pitfalls in ../shared/engine.md). ``--mode answer`` answers every INVITE with 200
and loops the caller's audio back to it through the conference bridge (clocked by the
null audio device) until the caller sends BYE; ``--mode reject`` answers every INVITE
with 404, like the router does for an unknown number. Each ``Call`` object stays
referenced until it is DISCONNECTED and is released afterwards, in the poll loop, never
inside its own callback. SIGTERM or SIGINT stops the loop; the endpoint is destroyed.

No routing, no database, no logging: whatever the router costs on top of this is its own.

Prints one line ``READY sip=HOST:PORT mode=MODE max_calls=N`` to stdout once listening
(``--listen 127.0.0.1:0`` picks a free port; the line says which).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

import pjsua2 as pj

NOT_FOUND = 404
OK = 200


@dataclass(frozen=True)
class Options:
    host: str
    port: int
    mode: str
    rtp_start: int
    rtp_end: int
    max_calls: int


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:5080", help="HOST:PORT (port 0: any)")
    parser.add_argument("--mode", choices=("answer", "reject"), default="answer")
    parser.add_argument("--rtp-ports", default="20000-29999", help="START-END, two per call")
    parser.add_argument("--max-calls", type=int, default=2000)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    start, _, end = args.rtp_ports.partition("-")
    return Options(
        host=host.strip("[]"),
        port=int(port),
        mode=args.mode,
        rtp_start=int(start),
        rtp_end=int(end),
        max_calls=args.max_calls,
    )


class BenchCall(pj.Call):  # type: ignore[misc]
    def __init__(self, engine: BareEngine, account: pj.Account, call_id: int) -> None:
        super().__init__(account, call_id)
        self.engine = engine

    def onCallState(self, prm: pj.OnCallStateParam) -> None:
        if self.getInfo().state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.engine.finished.append(self)

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:
        # Loop the caller's audio back through the conference bridge: RTP flows both ways,
        # as through the router's bridge, with no Python per frame. Keep the CallInfo in a
        # name: iterating `getInfo().media` reads a vector owned by a freed temporary.
        info = self.getInfo()
        for index, media in enumerate(info.media):
            if media.type == pj.PJMEDIA_TYPE_AUDIO and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                audio = self.getAudioMedia(index)
                audio.startTransmit(audio)


class BenchAccount(pj.Account):  # type: ignore[misc]
    def __init__(self, engine: BareEngine) -> None:
        super().__init__()
        self.engine = engine

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:
        call = BenchCall(self.engine, self, prm.callId)
        self.engine.calls[prm.callId] = call
        answer = pj.CallOpParam()
        answer.statusCode = OK if self.engine.options.mode == "answer" else NOT_FOUND
        call.answer(answer)


class BareEngine:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.calls: dict[int, BenchCall] = {}  # keeps each Call alive until DISCONNECTED
        self.finished: list[BenchCall] = []
        self.stopping = False
        self.ep = pj.Endpoint()
        self.account: BenchAccount | None = None

    def start(self) -> str:
        with _stdout_silenced():  # pjlib logs to stdout until libInit applies the levels
            self.ep.libCreate()
            self.ep.libInit(self._ep_config())
        self.ep.audDevManager().setNullDev()
        transport = pj.TransportConfig()
        transport.port = self.options.port
        transport.boundAddress = self.options.host
        transport.publicAddress = self.options.host
        kind = pj.PJSIP_TRANSPORT_UDP6 if ":" in self.options.host else pj.PJSIP_TRANSPORT_UDP
        tid = self.ep.transportCreate(kind, transport)
        self.ep.libStart()
        local = self.ep.transportGetInfo(tid).localName
        self.account = BenchAccount(self)
        self.account.create(self._account_config(local))
        return str(local)

    def _ep_config(self) -> pj.EpConfig:
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0  # this thread polls and owns every pjsua2 call
        cfg.uaConfig.mainThreadOnly = False
        cfg.uaConfig.maxCalls = self.options.max_calls
        cfg.uaConfig.userAgent = "callrouter-bare-engine"
        cfg.logConfig.level = 1
        cfg.logConfig.consoleLevel = 0
        cfg.medConfig.clockRate = 8000  # G.711 end to end: no resampling in the bridge
        cfg.medConfig.sndClockRate = 8000
        cfg.medConfig.channelCount = 1
        cfg.medConfig.ecTailLen = 0
        cfg.medConfig.noVad = True
        return cfg

    def _account_config(self, local: str) -> pj.AccountConfig:
        cfg = pj.AccountConfig()
        cfg.idUri = f"sip:bare@{local}"
        media = cfg.mediaConfig
        media.lockCodecEnabled = False  # no re-INVITE to lock one codec after answering
        media.transportConfig.port = self.options.rtp_start
        media.transportConfig.portRange = self.options.rtp_end - self.options.rtp_start
        media.transportConfig.boundAddress = self.options.host
        media.transportConfig.publicAddress = self.options.host  # not the default route's
        return cfg

    def run(self) -> None:
        while not self.stopping:
            self.ep.libHandleEvents(10)
            self._release_finished()

    def _release_finished(self) -> None:
        # Outside any callback: dropping the last reference here is safe (engine pitfalls).
        while self.finished:
            call = self.finished.pop()
            if self.calls.get(call.getId()) is call:
                del self.calls[call.getId()]

    def stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self.stopping = True

    def close(self) -> None:
        self.ep.hangupAllCalls()
        for _ in range(20):  # let the BYEs go out and their DISCONNECTED callbacks run
            self.ep.libHandleEvents(10)
            self._release_finished()
        self.calls.clear()
        self.account = None
        self.ep.libDestroy()


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    engine = BareEngine(options)
    signal.signal(signal.SIGTERM, engine.stop)
    signal.signal(signal.SIGINT, engine.stop)
    local = engine.start()
    print(f"READY sip={local} mode={options.mode} max_calls={options.max_calls}", flush=True)
    try:
        engine.run()
    finally:
        engine.close()
    print("STOPPED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

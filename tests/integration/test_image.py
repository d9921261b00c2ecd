"""The container image (Dockerfile) built and run: a bridged call through the container.

Building the image compiles the engine inside it (several minutes), so the test runs when
what the image is built from beyond the Python code changed since it last passed: the
Dockerfile and the engine build (scripts/image.sh inputs-hash: Dockerfile, .dockerignore,
scripts/build-engine.sh, scripts/engine/, pyproject.toml, config/callrouter.toml). On a
pass it writes that hash to tests/integration/image-tested.sha256, which is committed with
the change. CALLROUTER_IMAGE_TEST=1 runs it anyway, =0 never. When it runs, the build
reuses the engine's cached layers where they still apply, so the Python code in the image
is always the checkout's.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.integration.test_router_sip import CALLER, NUMBER, runtime
from tests.support.router import RouterProcess
from tests.support.sipp import Sipp, scenario

ROOT = Path(__file__).resolve().parents[2]
STAMP = Path(__file__).with_name("image-tested.sha256")
IMAGE_SH = ["bash", str(ROOT / "scripts" / "image.sh")]
TAG = "callrouter:test"


def _inputs_hash() -> str:
    return subprocess.run([*IMAGE_SH, "inputs-hash"], check=True, capture_output=True,
                          text=True).stdout.strip()


def _why_not() -> str | None:
    wanted = os.environ.get("CALLROUTER_IMAGE_TEST", "")
    if wanted == "0":
        return "CALLROUTER_IMAGE_TEST=0"
    if subprocess.run([*IMAGE_SH, "engine"], capture_output=True).returncode != 0:
        return "neither docker nor podman is installed (make deps installs podman)"
    if wanted != "1" and STAMP.exists() and STAMP.read_text().strip() == _inputs_hash():
        return ("the Dockerfile and the engine build are unchanged since the image test last "
                f"passed ({STAMP.name}); CALLROUTER_IMAGE_TEST=1 runs it anyway")
    return None


_reason = _why_not()
pytestmark = [pytest.mark.sip,
              pytest.mark.skipif(_reason is not None, reason=_reason or ""),
              pytest.mark.skipif(shutil.which("sipp") is None, reason="needs SIPp")]


class ContainerRouter(RouterProcess):
    """The router as the image runs it: `<engine> run --network host` with operator env."""

    name: str = ""

    def command(self) -> list[str]:
        self.name = f"callrouter-test-{uuid.uuid4().hex[:8]}"
        env = self.env()
        keys = ["CALLROUTER_SIP_LISTEN", "CALLROUTER_SIP_ADVERTISE", "CALLROUTER_RTP_PORTS",
                "CALLROUTER_HTTP_LISTEN", "CALLROUTER_SIP_MAX_CALLS",
                "CALLROUTER_SIP_INBOUND_FLOOD_LIMIT", "CALLROUTER_LOG_FORMAT"]
        args = [a for k in keys for a in ("-e", f"{k}={env[k]}")]
        # --sig-proxy (the default): SIGTERM to this process reaches the router in it.
        return [*IMAGE_SH, "run", "--rm", "--network", "host", "--name", self.name, *args, TAG]


@pytest.mark.timeout(2400)  # a build that changed the engine compiles pjproject (~15 min here)
def test_bridged_call_through_the_running_container(tmp_path: Path) -> None:
    inputs = _inputs_hash()  # before the build: a change made meanwhile is not claimed
    build = subprocess.run([*IMAGE_SH, "build", TAG], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    router = ContainerRouter(tmp_path / "container")
    rt = runtime("uas-runtime-answer", rtp_echo=True)
    try:
        router.start(timeout=90)
        assert router.key, router.logs()[-2000:]  # the first key, printed once on a fresh volume
        assistant = router.add_assistant(f"sip:assistant@{rt.address}")
        router.add_number(NUMBER, assistant)
        caller = Sipp(scenario("uac-call-bridged"), target=router.sip_address,
                      keys={"dialled": NUMBER, "caller": CALLER}, duration_ms=1000)
        result = caller.run()
        assert result.ok, result.explain()
        assert result.sequence() == ["INVITE", 100, 180, 200, "ACK", "BYE", 200]
        call = router.wait_for_call(lambda c: c["status"] == "ended")
        assert call["end_reason"] == "caller_hangup"
        router.signal(signal.SIGTERM)
        assert router.wait(30) == 0  # drained and stopped inside the container
    finally:
        router.stop()
        rt.stop()
    STAMP.write_text(inputs + "\n")

"""Providers as trunks, on the wire (issue 11): SIPp plays the provider.

The static allow-list is 127.0.0.1/32 (the runtime lives there) and refused sources get
403, so a provider on 127.0.0.2 is let in only by a trunk's ``inbound_addresses``: live,
from the API's 2xx on, and shut out again at once when the trunk is deactivated or
deleted.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from tests.support.router import RouterProcess, media_env
from tests.support.sipp import Sipp, scenario

pytestmark = pytest.mark.sip

NUMBER = "+31850835037"
CALLER = "+31201234567"
PROVIDER = "127.0.0.2"
STATIC_ONLY = {"CALLROUTER_SIP_INBOUND_ALLOWED_SOURCES": "127.0.0.1/32",
               "CALLROUTER_SIP_INBOUND_FORBIDDEN_ACTION": "reject",
               "CALLROUTER_SIP_RING_TIMEOUT_SECONDS": "3"}


def provider(router: RouterProcess, name: str, **kw: Any) -> Sipp:
    keys = {"dialled": NUMBER, "caller": CALLER}
    return Sipp(scenario(name), target=router.sip_address, keys=keys, host=PROVIDER, **kw)


def runtime(name: str = "uas-runtime-echo") -> Sipp:
    return Sipp(scenario(name), role="uas", rtp_echo=True).start()


def refused_from_provider(router: RouterProcess) -> None:
    result = provider(router, "uac-invite-forbidden").run()
    assert result.ok, result.explain()
    assert result.sequence() == ["INVITE", 403, "ACK"]


def test_inbound_addresses_are_a_live_allow_list(router_factory: Any) -> None:
    router: RouterProcess = router_factory(**STATIC_ONLY)
    rt = runtime()
    assistant = router.add_assistant(f"sip:assistant@{rt.address}")
    rt.stop()
    router.add_number(NUMBER, assistant)
    refused_from_provider(router)

    made = router.api("POST", "/sip-trunks", json={
        "name": "Acme", "provider": "acme", "inbound_addresses": [PROVIDER]})
    assert made.status_code == 201, made.text
    trunk = made.json()["trunk"]
    _bridged_with(router, assistant)
    call = router.wait_for_call(lambda c: c["status"] == "ended")
    assert call["trunk_id"] == trunk["id"]
    routed = [e for e in router.events("call.routed") if e["outcome"] == "bridged"]
    assert routed[-1]["trunk_id"] == trunk["id"]

    closed = router.api("PATCH", f"/sip-trunks/{trunk['id']}", json={"is_active": False})
    assert closed.status_code == 200, closed.text
    refused_from_provider(router)
    router.api("PATCH", f"/sip-trunks/{trunk['id']}", json={"is_active": True})
    _bridged_with(router, assistant)
    assert router.api("DELETE", f"/sip-trunks/{trunk['id']}").status_code == 200
    refused_from_provider(router)


def _bridged_with(router: RouterProcess, assistant: str) -> None:
    """A bridged call from the provider (each SIPp runtime has its own port: the
    assistant is pointed at this one)."""
    rt = runtime()
    router.api("PATCH", f"/assistants/{assistant}", json={"runtime_uri": f"sip:a@{rt.address}"})
    result = provider(router, "uac-call-bridged", duration_ms=500).run()
    assert result.ok, result.explain()
    assert result.sequence() == ["INVITE", 100, 200, "ACK", "BYE", 200]
    assert rt.wait().ok


def test_a_static_source_has_no_trunk(router_factory: Any) -> None:
    """trunk_id is null when the call matched only sip.inbound.allowed_sources."""
    router: RouterProcess = router_factory(**STATIC_ONLY)
    rt = runtime()
    router.add_number(NUMBER, router.add_assistant(f"sip:a@{rt.address}"))
    result = Sipp(scenario("uac-call-bridged"), target=router.sip_address,
                  keys={"dialled": NUMBER, "caller": CALLER}, duration_ms=300).run()
    assert result.ok, result.explain()
    call = router.wait_for_call(lambda c: c["status"] == "ended")
    assert call["trunk_id"] is None


def metric(router: RouterProcess, series: str) -> float:
    import httpx

    for line in httpx.get(f"{router.http_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no series {series}")


def wait_for(check: Any, timeout: float = 5.0) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("ending", ["delete", "drain"])
def test_a_registration_trunk_registers_takes_calls_on_it_and_unregisters(
        router_factory: Any, ending: str) -> None:
    """Issue 11 item 3: REGISTER -> 401 -> REGISTER with credentials -> 200; the provider
    then calls the registered Contact from an address the static list refuses; deleting
    the trunk, or draining the router (SIGTERM), sends REGISTER with expires 0."""
    router: RouterProcess = router_factory(**STATIC_ONLY)
    rt = runtime()
    router.add_number(NUMBER, router.add_assistant(f"sip:a@{rt.address}"))
    registrar = Sipp(scenario("uas-provider-registrar"), role="uas", host=PROVIDER,
                     duration_ms=500, timeout_s=20,
                     keys={"user": "acme-user", "password": "s3cr3t", "dialled": NUMBER,
                           "caller": CALLER}).start()
    made = router.api("POST", "/sip-trunks", json={
        "name": "Acme", "provider": "acme", "outbound_address": registrar.address,
        "auth_username": "acme-user", "auth_password": "s3cr3t", "register": True,
        "register_expires": 300})
    assert made.status_code == 201, made.text
    trunk_id = made.json()["trunk"]["id"]
    registered = wait_for(lambda: (r := router.api("GET", f"/sip-trunks/{trunk_id}").json()[
        "trunk"]["registration"]) and r["state"] == "registered" and r)
    assert registered["code"] == 200 and registered["expires_at"]
    assert metric(router, 'callrouter_trunk_registrations{state="registered"}') == 1
    call = router.wait_for_call(lambda c: c["status"] == "ended", timeout=10)
    assert (call["trunk_id"], call["assistant_phone"]) == (trunk_id, NUMBER)
    assert rt.wait().ok
    if ending == "delete":
        assert router.api("DELETE", f"/sip-trunks/{trunk_id}").status_code == 200
    else:
        router.signal(signal.SIGTERM)
    result = registrar.wait()
    assert result.ok, result.explain()
    assert [m for m in result.sequence() if m not in (100, 180, 183)] == [
        "REGISTER", 401, "REGISTER", 200, "INVITE", 200, "ACK", "BYE", 200, "REGISTER", 200]


def test_an_outbound_call_through_a_challenging_provider_is_bridged_with_rtp(
        router_factory: Any, media_path: str) -> None:
    """Issue 11 item 4: POST /calls/outbound dials the destination through the number's
    trunk; the provider challenges with 407 and checks the credentials and the caller id;
    once the customer answers, the runtime is dialled (X-Direction: outbound) and the two
    are bridged with RTP both ways."""
    from tests.support.sipp import RtpCounter

    router: RouterProcess = router_factory(**STATIC_ONLY, **media_env(media_path))
    rt = runtime()
    provider_peer = Sipp(scenario("uas-provider-auth-answer"), role="uas", host=PROVIDER,
                         duration_ms=1500, timeout_s=20).start()
    trunk = router.api("POST", "/sip-trunks", json={
        "name": "Acme", "outbound_address": provider_peer.address,
        "auth_username": "acme-user", "auth_password": "s3cr3t"}).json()["trunk"]
    number_id = router.add_number(NUMBER, router.add_assistant(f"sip:a@{rt.address}"),
                                  transfer_trunk_id=trunk["id"])
    with RtpCounter([provider_peer.media_port, rt.media_port]) as rtp:
        placed = router.api("POST", "/calls/outbound", json={
            "destination": "+31612345678", "number_id": number_id,
            "first_message": "Hello", "assistant_overrides": {"x": 1}})
        assert placed.status_code == 200, placed.text
        body = placed.json()
        assert (body["success"], body["status"]) == (True, "dialing")
        result = provider_peer.wait()
        rt_result = rt.wait()
    assert result.ok, result.explain()
    assert result.sequence() == ["INVITE", 407, "ACK", "INVITE", 100, 180, 200, "ACK",
                                 "BYE", 200]
    customer_invite = [m for m in result.messages if m.kind == "INVITE"][-1]
    assert customer_invite.headers["from"].startswith(f"sip:{NUMBER}@")  # the caller id
    assert digest_ok(customer_invite.headers["proxy-authorization"], "INVITE", "acme-user",
                     "s3cr3t")
    assert rt_result.ok, rt_result.explain()
    invite = next(m for m in rt_result.messages if m.kind == "INVITE")
    assert invite.headers["x-direction"] == "outbound"
    assert invite.headers["x-call-id"] == body["call_id"]
    if RtpCounter.available():
        assert rtp.count(rt.media_port) > 20, "no RTP reached the runtime"
        assert rtp.count(provider_peer.media_port) > 20, "no RTP came back to the customer"
    call = router.wait_for_call(lambda c: c["id"] == body["call_id"] and c["status"] == "ended")
    assert (call["direction"], call["trunk_id"], call["end_reason"]) == (
        "outbound", trunk["id"], "caller_hangup")
    assert (call["caller_phone"], call["assistant_phone"]) == ("+31612345678", NUMBER)
    assert call["duration_seconds"] >= 1
    assert call["sip_call_id"] == customer_invite.call_id


def digest_ok(header: str, method: str, user: str, password: str) -> bool:
    """RFC 2617 s3.2.2 without qop (the challenge offers none): the response is right."""
    import hashlib
    import re

    fields = dict(re.findall(r'(\w+)="?([^",]*)"?', header.removeprefix("Digest ")))

    def md5(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    ha1 = md5(f"{user}:{fields['realm']}:{password}")
    ha2 = md5(f"{method}:{fields['uri']}")
    expected = md5(f"{ha1}:{fields['nonce']}:{ha2}")
    return fields["username"] == user and fields["response"] == expected


def test_outbound_calls_refuse_bad_input_naming_the_field(router_factory: Any) -> None:
    router: RouterProcess = router_factory(**STATIC_ONLY)
    number_id = router.add_number(NUMBER, router.add_assistant("sip:a@127.0.0.1:5999"))
    for body, field in (({"destination": "0612345678", "number_id": number_id}, "destination"),
                        ({"destination": "+31612345678", "number_id": number_id}, "number_id")):
        r = router.api("POST", "/calls/outbound", json=body)
        assert r.status_code == 422, r.text
        assert [d["field"] for d in r.json()["details"]] == [field]


def test_an_inbound_auth_trunk_challenges_and_refuses_a_wrong_password(
        router_factory: Any) -> None:
    """Issue 11 item 5: INVITEs from the trunk's addresses get 407; the right credentials
    are bridged, a wrong password is 403 after the challenge and counted."""
    router: RouterProcess = router_factory(**STATIC_ONLY)
    rt = runtime()
    router.add_number(NUMBER, router.add_assistant(f"sip:a@{rt.address}"))
    made = router.api("POST", "/sip-trunks", json={
        "name": "Acme", "inbound_addresses": [PROVIDER], "inbound_auth": True,
        "auth_username": "acme-in", "auth_password": "pw-in"})
    assert made.status_code == 201, made.text
    wrong = provider(router, "uac-invite-auth-403",
                     extra_args=("-au", "acme-in", "-ap", "not-the-password")).run()
    assert wrong.ok, wrong.explain()
    assert wrong.sequence() == ["INVITE", 407, "ACK", "INVITE", 403, "ACK"]
    assert metric(router, 'callrouter_engine_guard_total{action="auth_failed"}') == 1
    right = provider(router, "uac-call-auth", duration_ms=500,
                     extra_args=("-au", "acme-in", "-ap", "pw-in")).run()
    assert right.ok, right.explain()
    assert [m for m in right.sequence() if m not in (100, 180, 183)] == [
        "INVITE", 407, "ACK", "INVITE", 200, "ACK", "BYE", 200]
    assert rt.wait().ok
    assert metric(router, 'callrouter_engine_guard_total{action="auth_ok"}') == 1
    call = router.wait_for_call(lambda c: c["status"] == "ended")
    assert call["trunk_id"] == made.json()["trunk"]["id"]


def test_more_registration_trunks_than_pjsua_accounts_by_default(router_factory: Any) -> None:
    """pjsua's default PJSUA_MAX_ACC is 8: the ninth registration account failed to be
    created (PJ_ETOOMANY) before config_site.h raised it."""
    from tests.support.sipp import free_udp_port

    router: RouterProcess = router_factory(**STATIC_ONLY)
    silent = f"{PROVIDER}:{free_udp_port(PROVIDER)}"  # a registrar that never answers
    ids = []
    for n in range(12):
        made = router.api("POST", "/sip-trunks", json={
            "name": f"reg{n}", "outbound_address": silent, "auth_username": f"u{n}",
            "auth_password": "pw", "register": True})
        assert made.status_code == 201, made.text
        ids.append(made.json()["trunk"]["id"])
    states = wait_for(lambda: all(
        r := [router.api("GET", f"/sip-trunks/{i}").json()["trunk"]["registration"]
              for i in ids]) and r)
    assert all(s["state"] == "unregistered" and s["code"] is None for s in states), states

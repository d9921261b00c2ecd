"""Reading the dialled number from Request-URI / To, and the runtime Request-URI."""

from __future__ import annotations

import pytest

from callrouter.domain.sipuri import dialled_user, runtime_request_uri, uri_of, user_part


@pytest.mark.parametrize(("ruri", "to", "expected"), [
    ("sip:+31850835037@router.example", "", "+31850835037"),
    ("sip:+31850835037@router.example;user=phone", "", "+31850835037"),
    ("sips:0850835037@10.0.0.1:5061;transport=tls", "", "0850835037"),
    ("tel:+31-85-083-5037", "", "+31-85-083-5037"),
    ("tel:+31850835037;phone-context=example.com", "", "+31850835037"),
    ("sip:%2B31850835037@host", "", "+31850835037"),  # RFC 3261 s19.1.2 escaping
    ("sip:+31850835037;isub=1@host", "", "+31850835037"),  # user-part parameters
    ("sip:router.example", "<sip:+31850835037@router.example>;tag=x", "+31850835037"),
    ("sip:router.example", '"Sales" <tel:+31850835037>', "+31850835037"),
    ("sip:router.example", "sip:router.example", ""),
    ("http://x", "", ""),
])
def test_dialled_user(ruri: str, to: str, expected: str) -> None:
    assert dialled_user(ruri, to) == expected


def test_uri_of_and_user_part() -> None:
    assert uri_of('"Bob" <sip:bob@x>;tag=1') == "sip:bob@x"
    assert uri_of("sip:bob@x;tag=1") == "sip:bob@x"
    assert user_part("sip:bob:secret@x") == "bob"
    assert user_part("sip:x") == ""


@pytest.mark.parametrize(("uri", "expected"), [
    ("sip:rt.example:5070", "sip:A1@rt.example:5070"),
    ("sip:pool@10.0.0.5;transport=tcp", "sip:A1@10.0.0.5;transport=tcp"),
    ("SIPS:x@[::1]:5061", "sips:A1@[::1]:5061"),
])
def test_runtime_request_uri_puts_the_assistant_in_the_user_part(uri: str, expected: str) -> None:
    assert runtime_request_uri(uri, "A1") == expected


def test_runtime_request_uri_refuses_non_sip() -> None:
    with pytest.raises(ValueError, match="not a SIP URI"):
        runtime_request_uri("tel:+31850835037", "A1")

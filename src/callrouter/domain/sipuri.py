"""Reading the dialled number out of SIP and building the runtime's Request-URI.

The dialled number is the user part of the Request-URI (RFC 3261 s19.1.1) of a
``sip:``/``sips:`` URI, or the number of a ``tel:`` URI (RFC 3966), with URI
parameters (``;user=phone``, ``;phone-context=...``) and %-escapes (s19.1.2)
removed. When the Request-URI carries no user (``sip:host``) the To header's URI
is used instead. Normalising to E.164 is ``domain.numbers.normalise``'s job.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

_SCHEME = re.compile(r"^\s*(sips?|tel):", re.IGNORECASE)
_ANGLE = re.compile(r"<([^>]*)>")


def uri_of(header_value: str) -> str:
    """The URI in a name-addr (``"Bob" <sip:bob@x>;tag=1``) or a bare addr-spec."""
    match = _ANGLE.search(header_value)
    if match:
        return match.group(1).strip()
    return header_value.split(";", 1)[0].strip()


def user_part(uri: str) -> str:
    """The unescaped user of a sip/sips URI, or the number of a tel URI ('' if none)."""
    match = _SCHEME.match(uri)
    if not match:
        return ""
    rest = uri[match.end():]
    if match.group(1).lower() == "tel":
        return unquote(rest.split(";", 1)[0]).strip()
    if "@" not in rest:
        return ""
    user = rest.split("@", 1)[0]
    # RFC 4475 s3.1.1.9: ';' may appear inside the user part; a ';user=phone' style
    # parameter sits after the host, so only the part before '@' is the user.
    return unquote(user.split(":", 1)[0]).strip()


def dialled_user(request_uri: str, to_header: str) -> str:
    """The dialled digits as the provider sent them, before normalisation."""
    user = user_part(request_uri)
    if not user:
        user = user_part(uri_of(to_header))
    # A telephone-subscriber user part may carry its own parameters (RFC 3966 s3).
    return user.split(";", 1)[0].strip()


def runtime_request_uri(runtime_uri: str, assistant_id: str) -> str:
    """``runtime_uri`` with its user part replaced by the assistant id."""
    match = _SCHEME.match(runtime_uri)
    if not match or match.group(1).lower() == "tel":
        raise ValueError(f"not a SIP URI: {runtime_uri!r}")
    scheme = match.group(1).lower()
    rest = runtime_uri[match.end():]
    host_part = rest.split("@", 1)[1] if "@" in rest else rest
    return f"{scheme}:{assistant_id}@{host_part}"

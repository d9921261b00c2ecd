"""Phone numbers in E.164: the one normalisation the API and the SIP side share.

How it works: the raw text must look like a phone number (digits, an optional
leading ``+`` and visual separators — spaces, ``-``, ``.``, ``/``, parentheses);
``phonenumbers`` then parses it against the default region, which resolves national
forms (``085 083 5037`` in NL) and the region's own international prefix
(``00`` in NL, ``0011`` in AU). If that does not give a valid number and the text
starts with ``00``, it is read once more as ``+``: ``00`` is the ITU-recommended
international prefix, so ``0031850835037`` means ``+31850835037`` even where the
default region dials abroad differently. Letters are refused rather than mapped to
keypad digits (``1-800-FLOWERS``): a router should never guess which number was meant.

Pure and I/O-free (``phonenumbers`` keeps its metadata in memory), so the SIP side can
call it for every dialled number.
"""

from __future__ import annotations

import functools
import re

import phonenumbers

from callrouter.errors import FieldProblem, InvalidNumber

_PLAUSIBLE = re.compile(r"\+?[0-9 ().\-/]{1,48}")
_FIELD = "phone_number"


@functools.lru_cache(maxsize=4096)  # pure; called for every INVITE on the SIP thread
def normalise(raw: str, default_region: str) -> str:
    """Return ``raw`` as E.164 (``+31850835037``); raise ``InvalidNumber`` if it is not one."""
    return normalise_uncached(raw, default_region)


def normalise_uncached(raw: str, default_region: str) -> str:
    """``normalise`` without its cache: for a bulk import, whose million distinct numbers
    would only evict the dialled numbers the SIP side keeps hot."""
    text = raw.strip()
    if not _PLAUSIBLE.fullmatch(text):
        raise _invalid("must contain only digits, an optional leading '+' and separators")
    parsed = _parse_valid(text, default_region)
    if parsed is None and text.startswith("00"):
        parsed = _parse_valid("+" + text[2:], default_region)
    if parsed is None:
        raise _invalid("is not a valid phone number")
    return str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))


def mask(e164: str) -> str:
    """Hide the middle of a number for logs: ``+31850835037`` -> ``+3185*****37``."""
    if len(e164) <= 7:
        return e164[:1] + "*" * (len(e164) - 1)
    return e164[:5] + "*" * (len(e164) - 7) + e164[-2:]


def _parse_valid(text: str, default_region: str) -> phonenumbers.PhoneNumber | None:
    try:
        parsed = phonenumbers.parse(text, default_region or None)
    except phonenumbers.NumberParseException:
        return None
    return parsed if phonenumbers.is_valid_number(parsed) else None


def _invalid(reason: str) -> InvalidNumber:
    message = f"{_FIELD} {reason}"
    return InvalidNumber(message, details=[FieldProblem(_FIELD, message)])

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
from phonenumbers import PhoneMetadata
from phonenumbers import phonenumberutil as pnu

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
    if _CANONICAL.fullmatch(text):
        fast = _canonical_e164(text)
        if fast != _SLOW:
            if fast is None:
                raise _invalid("is not a valid phone number")
            return fast
    if not _PLAUSIBLE.fullmatch(text):
        raise _invalid("must contain only digits, an optional leading '+' and separators")
    parsed = _parse_valid(text, default_region)
    if parsed is None and text.startswith("00"):
        parsed = _parse_valid("+" + text[2:], default_region)
    if parsed is None:
        raise _invalid("is not a valid phone number")
    return str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))


# -- E.164 text that is already canonical, about six times cheaper -----------------------
#
# ``phonenumbers.parse`` + ``is_valid_number`` cost about 60 us a number: general-purpose
# text handling, then up to ten regular expressions looked up in a cache by pattern text
# for every number type of every candidate region (25 for +1). A bulk import of a million
# numbers, almost all written ``+<digits>``, spends most of its time there. For that one
# shape, ``_canonical_e164`` takes the same steps as ``parse`` does for it (country code,
# national prefix, leading zeros) with phonenumbers' own helpers, then the same
# validity test with the patterns compiled once per region. Its answer is phonenumbers'
# answer: tests/unit/test_numbers.py compares the two over every region's example numbers
# and random digits for every country code. Anything it is not sure of goes the slow way.

_CANONICAL = re.compile(r"\+[1-9][0-9]{2,16}")
_SLOW = ""  # "take the general path"
_TYPES = ("premium_rate", "toll_free", "shared_cost", "voip", "personal_number", "pager",
          "uan", "voicemail", "fixed_line")
_Desc = tuple[frozenset[int], "re.Pattern[str]"] | None
_compiled: dict[int, tuple[_Desc, tuple[_Desc, ...], _Desc, bool]] = {}


def _canonical_e164(text: str) -> str | None:
    """``+<digits>`` as E.164 (valid), None (invalid), or ``_SLOW``."""
    cc, national = pnu._extract_country_code(text[1:])
    if cc == 0:
        return _SLOW
    regions = pnu.COUNTRY_CODE_TO_REGION_CODE[cc]
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(cc, regions[0])
    if metadata is None:
        return _SLOW
    _carrier, stripped, _ = pnu._maybe_strip_national_prefix_carrier_code(national, metadata)
    if pnu._test_number_length(stripped, metadata) not in (
            pnu.ValidationResult.TOO_SHORT, pnu.ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
            pnu.ValidationResult.INVALID_LENGTH):
        national = stripped
    if not 2 <= len(national) <= 17:
        return None
    nsn = _significant(national)
    region = regions[0] if len(regions) == 1 else _region_of(nsn, regions)
    if region is None:
        return None
    if region != phonenumbers.REGION_CODE_FOR_NON_GEO_ENTITY:
        metadata = PhoneMetadata.metadata_for_region(region, None)
        if metadata is None or metadata.country_code != cc:
            return None
    return f"+{cc}{nsn}" if _has_type(nsn, metadata) else None


def _significant(national: str) -> str:
    """The national significant number ``parse`` would store: leading zeros kept (all of
    them but the last digit's), the rest as an integer's digits."""
    if len(national) > 1 and national[0] == "0":
        zeros = 1
        while zeros < len(national) - 1 and national[zeros] == "0":
            zeros += 1
        return "0" * zeros + str(int(national))
    return str(int(national))


def _region_of(nsn: str, regions: tuple[str, ...]) -> str | None:
    for region in regions:
        metadata = PhoneMetadata.metadata_for_region(region, None)
        if metadata is None:
            continue
        if metadata.leading_digits is not None:
            if re.match(metadata.leading_digits, nsn):
                return region
        elif _has_type(nsn, metadata):
            return region
    return None


def _has_type(nsn: str, metadata: PhoneMetadata) -> bool:
    """``_number_type_helper(nsn, metadata) != UNKNOWN``, with compiled patterns."""
    found = _compiled.get(id(metadata))
    if found is None:
        found = _compiled[id(metadata)] = (
            _desc(metadata.general_desc), tuple(_desc(getattr(metadata, t)) for t in _TYPES),
            _desc(metadata.mobile), bool(metadata.same_mobile_and_fixed_line_pattern))
    general, types, mobile, same_mobile = found
    if not _matches(nsn, general):
        return False
    return any(_matches(nsn, d) for d in types) or (not same_mobile and _matches(nsn, mobile))


def _desc(desc: object) -> _Desc:
    pattern = getattr(desc, "national_number_pattern", None)
    if desc is None or not pattern:
        return None
    return frozenset(getattr(desc, "possible_length", ()) or ()), re.compile(pattern)


def _matches(nsn: str, desc: _Desc) -> bool:
    if desc is None:
        return False
    lengths, pattern = desc
    return (not lengths or len(nsn) in lengths) and pattern.fullmatch(nsn) is not None


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

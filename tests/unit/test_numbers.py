"""Normalisation of phone numbers to E.164 (``domain.numbers``), table-driven.

Guards the issue's promise that every spelling of one number registers the same E.164
(so duplicates in another spelling are caught), and that anything else is refused with
the field named.
"""

from __future__ import annotations

import random

import phonenumbers
import pytest

from callrouter.domain.numbers import mask, normalise, normalise_uncached
from callrouter.errors import InvalidNumber

VALID = [
    # (raw, default region, E.164)
    ("+31850835037", "NL", "+31850835037"),
    ("+31 85 083 5037", "NL", "+31850835037"),
    ("+31-85-083-5037", "NL", "+31850835037"),
    ("0031850835037", "NL", "+31850835037"),
    ("085 083 5037", "NL", "+31850835037"),
    ("(085) 083.50.37", "NL", "+31850835037"),
    ("  +31 85 083 5037  ", "US", "+31850835037"),
    # '00' read as '+' even where the region dials abroad differently (US: 011)
    ("0031850835037", "US", "+31850835037"),
    ("011 31 85 083 5037", "US", "+31850835037"),
    ("0011 31 85 083 5037", "AU", "+31850835037"),
    ("06 1234 5678", "NL", "+31612345678"),
    ("(650) 253-0000", "US", "+16502530000"),
    ("020 7946 0018", "GB", "+442079460018"),
    ("030 123456", "DE", "+4930123456"),
    ("+44 20 7946 0018", "", "+442079460018"),
]

INVALID = [
    ("", "NL"),
    ("   ", "NL"),
    ("12", "NL"),
    ("+31 85", "NL"),
    ("085 083 5037", ""),  # national form with no region to resolve it
    ("1-800-FLOWERS", "US"),  # letters are never mapped to keypad digits
    ("sip:+31850835037@host", "NL"),
    ("+31850835037; DROP TABLE", "NL"),
    ("+999 123 456 789", "NL"),  # no such country code
    ("+31 85 083 5037 12345", "NL"),  # too long
    ("+" + "1" * 60, "NL"),
]


@pytest.mark.parametrize(("raw", "region", "expected"), VALID)
def test_valid_spellings_normalise_to_e164(raw: str, region: str, expected: str) -> None:
    assert normalise(raw, region) == expected


@pytest.mark.parametrize(("raw", "region"), INVALID)
def test_invalid_numbers_are_refused_naming_the_field(raw: str, region: str) -> None:
    with pytest.raises(InvalidNumber) as caught:
        normalise(raw, region)
    assert caught.value.status == 400
    assert [d.field for d in caught.value.details] == ["phone_number"]


@pytest.mark.parametrize(("e164", "masked"), [
    ("+31850835037", "+3185*****37"),
    ("+16502530000", "+1650*****00"),
    ("+4930123456", "+4930****56"),
    ("+12345", "+*****"),
])
def test_mask_hides_the_middle(e164: str, masked: str) -> None:
    assert mask(e164) == masked
    assert len(mask(e164)) == len(e164)


# -- the canonical fast path gives phonenumbers' own answer -------------------------------

def _reference(text: str) -> str | None:
    """What ``normalise`` answered before the fast path: parse + is_valid_number."""
    try:
        parsed = phonenumbers.parse(text, "NL")
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))


def _canonical_samples(per_code: int, seed: int) -> list[str]:
    """Every region's example number of every type, each mutated (a digit changed, one
    added or dropped, zeros after the country code), and random digits after every
    country code: valid and invalid numbers of every shape the fast path sees."""
    rnd = random.Random(seed)
    e164 = phonenumbers.PhoneNumberFormat.E164
    examples = [phonenumbers.format_number(ex, e164)
                for region in sorted(phonenumbers.SUPPORTED_REGIONS)
                for kind in phonenumbers.PhoneNumberType.values()
                if (ex := phonenumbers.example_number_for_type(region, kind)) is not None]
    examples += [phonenumbers.format_number(ex, e164)
                 for code in sorted(phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS)
                 if (ex := phonenumbers.example_number_for_non_geo_entity(code)) is not None]
    out = list(examples)
    for ex in examples:
        digits = list(ex[1:])
        digits[rnd.randrange(len(digits))] = str(rnd.randrange(10))
        out += ["+" + "".join(digits), ex[:-1], ex + "5", ex[:3] + "0" + ex[3:],
                ex[:4] + "0" + ex[4:], ex[:4] + "00" + ex[4:]]
    for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
        out += [f"+{code}" + "".join(rnd.choices("0123456789", k=rnd.randrange(1, 15)))
                for _ in range(per_code)]
    return out


def test_canonical_numbers_get_phonenumbers_own_answer() -> None:
    """The fast path for ``+<digits>`` (numbers._canonical_e164) must agree with
    phonenumbers on every number; a million samples agreed when it was written."""
    samples = _canonical_samples(per_code=25, seed=20261130)
    valid = 0
    for text in samples:
        expected = _reference(text)
        try:
            got: str | None = normalise_uncached(text, "NL")
        except InvalidNumber:
            got = None
        assert got == expected, text
        valid += expected is not None
    assert valid > 1000 and len(samples) - valid > 1000  # both answers well covered

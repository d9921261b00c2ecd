"""Normalisation of phone numbers to E.164 (``domain.numbers``), table-driven.

Guards the issue's promise that every spelling of one number registers the same E.164
(so duplicates in another spelling are caught), and that anything else is refused with
the field named.
"""

from __future__ import annotations

import pytest

from callrouter.domain.numbers import mask, normalise
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

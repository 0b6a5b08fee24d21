"""Tests of protocol/_saslprep.py: SASLprep (RFC 4013) for user names and passwords."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mailwire.protocol._saslprep import SASLprepError, saslprep


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I\u00adX", "IX"),  # SOFT HYPHEN mapped to nothing
        ("user", "user"),  # no transformation
        ("USER", "USER"),  # case preserved, will not match #2
        ("\u00aa", "a"),  # output is NFKC, input in ISO 8859-1
        ("\u2168", "IX"),  # output is NFKC, will match #1
    ],
)
@pytest.mark.parametrize("allow_unassigned", [False, True])
def test_rfc_4013_section_3_examples(text: str, expected: str, allow_unassigned: bool) -> None:
    assert saslprep(text, allow_unassigned=allow_unassigned) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("\u0007", "ASCII control character"),  # RFC 4013 3 #6: prohibited character
        ("\u0627\u0031", "start and end"),  # RFC 4013 3 #7: bidi check
    ],
)
@pytest.mark.parametrize("allow_unassigned", [False, True])
def test_rfc_4013_section_3_errors(text: str, reason: str, allow_unassigned: bool) -> None:
    with pytest.raises(SASLprepError, match=reason):
        saslprep(text, allow_unassigned=allow_unassigned)


def test_non_ascii_spaces_become_ascii_spaces() -> None:
    # C.1.2: NO-BREAK SPACE, EN QUAD, IDEOGRAPHIC SPACE, NARROW NO-BREAK SPACE
    assert saslprep("a\u00a0b\u2000c\u3000d\u202fe", allow_unassigned=False) == "a b c d e"
    # OGHAM SPACE MARK has no compatibility decomposition: only the mapping makes it a space
    assert saslprep("a\u1680b", allow_unassigned=False) == "a b"
    # ZERO WIDTH SPACE is in both C.1.2 and B.1: mapped to nothing, as other SASLprep
    # implementations do (pymongo, passlib)
    assert saslprep("a\u200bb", allow_unassigned=False) == "ab"


def test_mapped_to_nothing_characters_vanish() -> None:
    # B.1: ZERO WIDTH NON-JOINER/JOINER, WORD JOINER, BYTE ORDER MARK, VARIATION SELECTOR-1
    assert saslprep("p\u200cw\u200d\u2060\ufeffd\ufe00", allow_unassigned=False) == "pwd"


def test_nfkc_composes_and_folds_compatibility_forms() -> None:
    assert saslprep("pa\u0308sswo\u0308rd", allow_unassigned=False) == "p\u00e4ssw\u00f6rd"
    assert saslprep("\uff21\ufb01", allow_unassigned=False) == "Afi"  # fullwidth A, fi ligature
    # a character mapped to nothing between a base and its combining mark: composed after
    assert saslprep("a\u00ad\u0301", allow_unassigned=False) == "\u00e1"


@pytest.mark.parametrize(
    ("char", "table"),
    [
        ("\u0000", "C.2.1"),
        ("\u007f", "C.2.1"),
        ("\u0085", "C.2.2"),
        ("\u2028", "C.2.2"),
        ("\ue000", "C.3"),
        ("\U000f0000", "C.3"),
        ("\ufdd0", "C.4"),
        ("\U0010ffff", "C.4"),
        ("\ud800", "C.5"),
        ("\ufffd", "C.6"),
        ("\u2ff0", "C.7"),
        ("\u200e", "C.8"),
        ("\u202e", "C.8"),
        ("\U000e0001", "C.9"),
    ],
)
@pytest.mark.parametrize("allow_unassigned", [False, True])
def test_prohibited_output_is_refused(char: str, table: str, allow_unassigned: bool) -> None:
    with pytest.raises(SASLprepError, match=table) as info:
        saslprep(f"ab{char}cd", allow_unassigned=allow_unassigned)
    assert f"U+{ord(char):04X}" in str(info.value)
    assert f"U+{ord(char):04X}" not in info.value.reason  # safe to show for a password
    assert info.value.code_point == char
    assert isinstance(info.value, ValueError)


def test_unassigned_code_points_are_allowed_only_in_queries() -> None:
    for char in ("\U0001f600", "\u0221"):  # unassigned in Unicode 3.2 (emoji, LATIN D WITH CURL)
        assert saslprep(f"x{char}", allow_unassigned=True) == f"x{char}"
        with pytest.raises(SASLprepError, match=r"unassigned .*A\.1"):
            saslprep(f"x{char}", allow_unassigned=False)


def test_normalization_uses_unicode_3_2_data() -> None:
    # DIGIT ZERO FULL STOP (Unicode 5.2) has a compatibility decomposition to "0." today;
    # for stringprep's Unicode 3.2 it is an unassigned code point, left as it is
    assert saslprep("\U0001f100", allow_unassigned=True) == "\U0001f100"


def test_right_to_left_strings() -> None:
    arabic = "\u0627\u0644\u0633\u0644\u0627\u0645"
    assert saslprep(arabic, allow_unassigned=False) == arabic
    assert saslprep("\u0627 1 \u0628", allow_unassigned=False) == "\u0627 1 \u0628"  # neutral
    with pytest.raises(SASLprepError, match="mixes"):
        saslprep("\u0627a\u0628", allow_unassigned=False)  # an LCat character inside
    with pytest.raises(SASLprepError, match="start and end"):
        saslprep("1\u0627", allow_unassigned=False)


def test_empty_string_and_string_mapped_to_nothing_are_empty() -> None:
    assert saslprep("", allow_unassigned=False) == ""
    assert saslprep("\u00ad\u00a0", allow_unassigned=False) == " "
    assert saslprep("\u00ad\u200d", allow_unassigned=False) == ""


_PRINTABLE_ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@settings(max_examples=200, deadline=None)
@given(text=_PRINTABLE_ASCII)
def test_printable_ascii_is_unchanged(text: str) -> None:
    assert saslprep(text, allow_unassigned=False) == text
    # the same through the full pipeline (a SOFT HYPHEN defeats the ASCII fast path)
    assert saslprep(text + "\u00ad", allow_unassigned=False) == text


@settings(max_examples=400, deadline=None)
@given(text=st.text(max_size=30), allow_unassigned=st.booleans())
def test_saslprep_is_idempotent(text: str, allow_unassigned: bool) -> None:
    try:
        once = saslprep(text, allow_unassigned=allow_unassigned)
    except SASLprepError:
        assume(False)
        return
    assert saslprep(once, allow_unassigned=allow_unassigned) == once


@settings(max_examples=400, deadline=None)
@given(text=st.text(st.characters(codec="utf-8"), max_size=30))
def test_queries_accept_whatever_stored_strings_accept(text: str) -> None:
    try:
        stored = saslprep(text, allow_unassigned=False)
    except SASLprepError:
        assume(False)
        return
    assert saslprep(text, allow_unassigned=True) == stored


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(
        st.characters(categories=["Lu", "Ll", "Lo", "Nd", "Zs", "Mn", "Cf", "Cc"]), max_size=20
    )
)
def test_errors_are_only_saslprep_errors(text: str) -> None:
    try:
        result = saslprep(text, allow_unassigned=True)
    except SASLprepError as exc:
        assert exc.reason and str(exc).startswith("SASLprep (RFC 4013) prohibits")
    else:
        assert isinstance(result, str)

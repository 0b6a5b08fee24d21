"""RFC 5321 path grammar, ESMTP parameters and xtext."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailwire.protocol import is_valid_domain, is_valid_mailbox, split_mailbox
from mailwire.protocol._grammar import (
    GrammarError,
    parse_params,
    parse_path,
    xtext_decode,
    xtext_encode,
)


@pytest.mark.parametrize(
    "domain",
    ["example.com", "a-b.example", "xn--bcher-kva.example", "[192.0.2.1]", "[IPv6:::1]",
     "[x-tag:some-literal]", "localhost"],
)  # fmt: skip
def test_valid_domains(domain: str) -> None:
    assert is_valid_domain(domain)


@pytest.mark.parametrize(
    "domain",
    ["-a.example", "a-.example", "a..example", "", "[1.2.3]", "[IPv6:1::2::3]", "a_b.example",
     "[999.0.0.1]", "x" * 64 + ".example"],
)  # fmt: skip
def test_invalid_domains(domain: str) -> None:
    assert not is_valid_domain(domain)


def test_quoted_local_part_may_contain_at_and_spaces() -> None:
    assert parse_path('<"a@b c"@example.com>', utf8=False, recipient=False) == (
        '"a@b c"@example.com'
    )
    assert split_mailbox('"a@b c"@example.com') == ('"a@b c"', "example.com")


def test_postmaster_only_for_recipients() -> None:
    assert parse_path("<POSTMASTER>", utf8=False, recipient=True) == "Postmaster"
    with pytest.raises(GrammarError):
        parse_path("<postmaster>", utf8=False, recipient=False)


def test_limits_in_octets_not_characters() -> None:
    local = "\u00e9" * 33  # 66 octets in UTF-8, 33 characters
    with pytest.raises(GrammarError):
        parse_path(f"<{local}@example.com>", utf8=True, recipient=False)
    assert is_valid_mailbox("\u00e9" * 32 + "@example.com")


def test_parameters_are_keyed_upper_case_and_ordered() -> None:
    assert parse_params("size=10 BODY=8BITMIME  SMTPUTF8", utf8=False) == {
        "SIZE": "10",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
    }


@pytest.mark.parametrize("text", ["=x", "SIZE==1", "A B=", "-X=1"])
def test_bad_parameters(text: str) -> None:
    with pytest.raises(GrammarError):
        parse_params(text, utf8=False)


def test_xtext_known_values() -> None:
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_decode("a+2Bb+3Dc+20d") == "a+b=c d"
    with pytest.raises(GrammarError):
        xtext_decode("a+2")


@given(st.text(max_size=50))
def test_xtext_round_trips(text: str) -> None:
    assert xtext_decode(xtext_encode(text)) == text


def test_split_mailbox_with_at_inside_an_address_literal() -> None:
    assert split_mailbox("user@[x-tag:a@b]") == ("user", "[x-tag:a@b]")
    assert split_mailbox('"a@[b"@[192.0.2.1]') == ('"a@[b"', "[192.0.2.1]")
    assert split_mailbox("user@example.com") == ("user", "example.com")

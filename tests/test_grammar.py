"""RFC 5321 path grammar, ESMTP parameters and xtext."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwire.protocol import ServerConfig, is_valid_domain, is_valid_mailbox, split_mailbox
from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._grammar import (
    GrammarError,
    parse_params,
    parse_path,
    xtext_decode,
    xtext_encode,
)
from mailwire.protocol._readers import (
    _PLAIN_MAIL,
    _PLAIN_RCPT,
    _parse_mail,
    _parse_mail_full,
    _parse_rcpt,
    _parse_rcpt_full,
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


# --- the MAIL/RCPT fast path (_readers._PLAIN_MAIL/_PLAIN_RCPT) against the full grammar ------

_CONFIG = ServerConfig()


def _outcome(parse: object, arg: str, utf8: bool) -> object:
    try:
        return ("ok", parse(arg, _CONFIG, utf8))  # type: ignore[operator]
    except GrammarError as exc:
        return ("grammar", exc.code, exc.enhanced, exc.text)
    except LocalProtocolError as exc:
        return ("local", str(exc))


_LOCALS = st.one_of(
    # dot-separated atoms, lengths around the 64-octet local-part limit, or atext with the odd
    # dot, quote, space, '@' or non-ASCII letter
    st.lists(st.text("aZ9!~", min_size=1, max_size=40), min_size=1, max_size=3).map(".".join),
    st.integers(60, 68).map(lambda n: "a." * 3 + "x" * (n - 6)),
    st.text(alphabet='aZ9!#-_+~." @\u00e9', max_size=70),
)
_DOMAINS = st.one_of(
    # LDH labels, one label around the 63-octet label limit, or domain-ish text and literals
    st.lists(st.text("aZ9-", min_size=1, max_size=40), min_size=1, max_size=3).map(".".join),
    st.integers(60, 68).map(lambda n: "d" * n),
    st.text(alphabet="aZ9-.\u00e9[]_:", max_size=70),
)


def _path_args(prefix: str) -> st.SearchStrategy[str]:
    variants = [prefix, prefix.lower(), prefix.title()]
    plain = st.tuples(  # the fast path's form, with locals and domains valid or not
        st.sampled_from(variants), st.sampled_from(["", " "]), st.just("<"), _LOCALS,
        st.just("@"), _DOMAINS, st.just(">"),
    )  # fmt: skip
    noisy = st.tuples(  # anything near it
        st.sampled_from([*variants, prefix[:-1] + " :", "", "X" + prefix]),
        st.sampled_from(["", " ", "  ", "\t"]),
        st.sampled_from(["<", "", "<@relay.example:", "<<"]),
        _LOCALS,
        st.sampled_from(["@", "", "@@"]),
        _DOMAINS,
        st.sampled_from([">", "", ">>"]),
        st.sampled_from(["", " ", " SIZE=100", " BODY=8BITMIME", "x", " NOTIFY=NEVER"]),
    )
    return st.one_of(plain, noisy).map("".join)


@settings(max_examples=300)
@given(_path_args("FROM:"), st.booleans())
def test_mail_fast_path_agrees_with_the_full_parser(arg: str, utf8: bool) -> None:
    assert _outcome(_parse_mail, arg, utf8) == _outcome(_parse_mail_full, arg, utf8)


@settings(max_examples=300)
@given(_path_args("TO:"), st.booleans())
def test_rcpt_fast_path_agrees_with_the_full_parser(arg: str, utf8: bool) -> None:
    assert _outcome(_parse_rcpt, arg, utf8) == _outcome(_parse_rcpt_full, arg, utf8)


@pytest.mark.parametrize("local_len, domain_len", [(64, 63), (65, 10), (10, 64)])
def test_fast_path_length_limits_match_the_full_parser(local_len: int, domain_len: int) -> None:
    arg = f"FROM:<{'a' * local_len}@{'b' * domain_len}>"
    assert _outcome(_parse_mail, arg, False) == _outcome(_parse_mail_full, arg, False)


def test_fast_path_matches_the_plain_form() -> None:
    # the property above would hold vacuously if the fast path never matched
    assert _PLAIN_MAIL.fullmatch("MAIL FROM:<a.b@c-d.example>"[5:]) is not None
    assert _PLAIN_RCPT.fullmatch("to: <x+y@example.net>") is not None
    assert _PLAIN_RCPT.fullmatch("TO:<@relay:x@example.net>") is None

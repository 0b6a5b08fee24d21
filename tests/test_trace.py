"""Trace headers (RFC 5321 4.4), RFC 5322 dates, and Received counting (RFC 5321 6.3)."""

from __future__ import annotations

import calendar
import email.utils

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwire.protocol._trace import (
    DEFAULT_MAX_RECEIVED,
    ReceivedCounter,
    TraceInfo,
    address_literal,
    check_hop_count,
    count_received,
    format_date,
    parse_date,
    received_header,
    with_protocol,
)

T0 = calendar.timegm((2026, 11, 29, 4, 11, 28))

# --- dates ------------------------------------------------------------------------------------


def test_format_date_is_rfc5322_in_utc() -> None:
    assert format_date(T0) == "Sun, 29 Nov 2026 04:11:28 +0000"


def test_format_date_applies_the_offset() -> None:
    assert format_date(T0, utc_offset_minutes=-330) == "Sat, 28 Nov 2026 22:41:28 -0530"


def test_format_date_epoch_and_leap_day() -> None:
    assert format_date(0) == "Thu, 01 Jan 1970 00:00:00 +0000"
    leap = calendar.timegm((2024, 2, 29, 23, 59, 59))
    assert format_date(leap) == "Thu, 29 Feb 2024 23:59:59 +0000"


def test_format_date_rejects_absurd_offsets() -> None:
    with pytest.raises(ValueError):
        format_date(T0, utc_offset_minutes=6000)


@settings(max_examples=300)
@given(
    ts=st.integers(min_value=-(10**10), max_value=10**11),
    offset=st.integers(min_value=-1439, max_value=1439),
)
def test_format_date_agrees_with_the_stdlib_and_round_trips(ts: int, offset: int) -> None:
    text = format_date(ts, utc_offset_minutes=offset)
    parsed = email.utils.parsedate_tz(text)
    assert parsed is not None
    assert email.utils.mktime_tz(parsed) == ts
    assert parse_date(text) == ts


def test_parse_date_reads_obsolete_forms() -> None:
    assert parse_date("29 Nov 26 04:11 GMT") == T0 - 28
    assert parse_date("Sat, 28 Nov 2026 23:11:28 EST") == T0
    assert parse_date("Sun, 29 Nov 2026 04:11:28 +0000 (UTC)") == T0


@pytest.mark.parametrize(
    "text", ["", "yesterday", "32 Nov 2026 04:11:28 +0000", "29 Foo 2026 1:00 +0000"]
)
def test_parse_date_refuses_non_dates(text: str) -> None:
    assert parse_date(text) is None


# --- protocol names (RFC 3848, RFC 6531) --------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"esmtp": False}, "SMTP"),
        ({}, "ESMTP"),
        ({"tls": True}, "ESMTPS"),
        ({"authenticated": True}, "ESMTPA"),
        ({"tls": True, "authenticated": True}, "ESMTPSA"),
        ({"lmtp": True}, "LMTP"),
        ({"lmtp": True, "tls": True, "authenticated": True}, "LMTPSA"),
        ({"smtputf8": True, "tls": True}, "UTF8SMTPS"),
    ],
)
def test_with_protocol_names_follow_rfc3848(kwargs: dict[str, bool], name: str) -> None:
    assert with_protocol(**kwargs) == name


def test_address_literals() -> None:
    assert address_literal("192.0.2.1") == "[192.0.2.1]"
    assert address_literal("2001:0db8::0001") == "[IPv6:2001:db8::1]"
    assert address_literal("::ffff:192.0.2.7") == "[192.0.2.7]"
    with pytest.raises(ValueError):
        address_literal("mx.example")


# --- Received -------------------------------------------------------------------------------------


def info(**kw: object) -> TraceInfo:
    base: dict[str, object] = {
        "helo": "client.example",
        "client_address": "192.0.2.1",
        "client_name": "host1.client.example",
        "by": "mx.example",
        "protocol": "ESMTPS",
        "queue_id": "4Xyz12",
        "recipient": "bob@example.net",
        "timestamp": T0,
    }
    base.update(kw)
    return TraceInfo(**base)  # type: ignore[arg-type]


def test_received_header_has_from_by_with_id_for_and_date() -> None:
    assert received_header(info()) == (
        b"Received: from client.example (host1.client.example [192.0.2.1])\r\n"
        b"\tby mx.example (mailwire) with ESMTPS id 4Xyz12\r\n"
        b"\tfor <bob@example.net>; Sun, 29 Nov 2026 04:11:28 +0000\r\n"
    )


def test_received_header_without_recipient_puts_semicolon_before_date() -> None:
    header = received_header(info(recipient=None, client_name=None, queue_id=None))
    assert header == (
        b"Received: from client.example ([192.0.2.1])\r\n"
        b"\tby mx.example (mailwire) with ESMTPS;\r\n"
        b"\tSun, 29 Nov 2026 04:11:28 +0000\r\n"
    )


def test_bogus_helo_is_quoted_in_a_comment_after_the_address_literal() -> None:
    header = received_header(info(helo="evil) by attacker (x\\", client_name=None))
    assert header.startswith(b"Received: from [192.0.2.1] (HELO evil\\) by attacker \\(x\\\\)\r\n")


def test_address_literal_helo_is_accepted_as_from_domain() -> None:
    header = received_header(info(helo="[IPv6:2001:db8::1]", client_address="2001:db8::1"))
    assert header.startswith(b"Received: from [IPv6:2001:db8::1] (host1.client.example [IPv6:")


def test_tls_details_go_in_a_comment() -> None:
    header = received_header(info(tls_comment="TLSv1.3 TLS_AES_256_GCM_SHA384"))
    assert b"with ESMTPS (TLSv1.3 TLS_AES_256_GCM_SHA384) id 4Xyz12" in header


def test_received_header_parses_with_the_stdlib() -> None:
    msg = email.message_from_bytes(received_header(info()) + b"\r\nbody\r\n")
    value = " ".join(str(msg["Received"]).split())
    assert value.startswith("from client.example (host1.client.example [192.0.2.1]) by mx.example")
    assert value.endswith("; Sun, 29 Nov 2026 04:11:28 +0000")


@pytest.mark.parametrize(
    "kw",
    [{"by": "not a host"}, {"protocol": "ESMTP S"}, {"queue_id": "a b"}, {"client_address": "x"},
     {"recipient": "a>\r\nX: y"}],
)  # fmt: skip
def test_received_header_refuses_injection(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        received_header(info(**kw))


@settings(max_examples=200)
@given(helo=st.text(min_size=1, max_size=40).filter(lambda s: not any(c.isspace() for c in s)))
def test_any_helo_yields_one_well_formed_field(helo: str) -> None:
    header = received_header(info(helo=helo))
    lines = header.split(b"\r\n")
    assert lines[-1] == b""
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    assert b"\n" not in header.replace(b"\r\n", b"")
    assert count_received(header + b"\r\n") == 1


# --- counting and loops -----------------------------------------------------------------------


def test_count_received_counts_only_header_fields() -> None:
    msg = (
        b"Received: from a by b; Sun, 29 Nov 2026 04:11:28 +0000\r\n"
        b"received : from c\r\n\tby d; Sun, 29 Nov 2026 04:11:28 +0000\r\n"
        b"X-Received: not one\r\n"
        b"Subject: Received: not one either\r\n"
        b" Received: a continuation line\r\n"
        b"\r\n"
        b"Received: in the body\r\n"
    )
    assert count_received(msg) == 2


def test_count_received_tolerates_bare_lf_and_a_missing_final_newline() -> None:
    assert count_received(b"Received: x\nReceived: y\n\nReceived: z\n") == 2
    assert count_received(b"Received: x\r\nReceived: y") == 2


@settings(max_examples=200)
@given(n=st.integers(0, 30), cuts=st.lists(st.integers(0, 2000), max_size=10))
def test_counter_is_chunking_invariant(n: int, cuts: list[int]) -> None:
    data = b"From: a@b\r\n" + b"Received: from x\r\n\tby y; date\r\n" * n + b"\r\nReceived: no\r\n"
    counter = ReceivedCounter()
    pos = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        counter.feed(data[pos:cut])
        pos = max(pos, cut)
    counter.feed(data[pos:])
    counter.close()
    assert counter.count == n == count_received(data)
    assert counter.done


def test_counter_stops_at_the_end_of_headers() -> None:
    counter = ReceivedCounter()
    counter.feed(b"Received: a\r\n\r\n")
    assert counter.done
    counter.feed(b"Received: b\r\n")
    assert counter.count == 1


def test_hop_count_over_the_limit_is_554_routing_loop() -> None:
    assert check_hop_count(DEFAULT_MAX_RECEIVED) is None
    reply = check_hop_count(DEFAULT_MAX_RECEIVED + 1)
    assert reply is not None
    assert reply.code == 554
    assert reply.enhanced == "5.4.6"


def test_hop_count_limit_is_configurable() -> None:
    assert check_hop_count(3, limit=3) is None
    assert check_hop_count(4, limit=3) is not None
    hops = b"Received: x\r\n" * 4 + b"\r\n"
    assert check_hop_count(count_received(hops), limit=3) is not None

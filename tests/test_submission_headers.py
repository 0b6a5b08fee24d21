"""The Date and Message-ID fields an MSA adds to a submitted message that lacks them (RFC 6409
8.2, 8.3): protocol/_submission.py.  (Named _headers: tests/adapters/test_submission.py tests
the submission listener, and pytest refuses two test modules of the same name.)"""

from __future__ import annotations

import calendar
import email.policy
import email.utils
import re
from email.parser import BytesParser

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwire.protocol._submission import (
    SCAN_LIMIT,
    message_id,
    message_id_host,
    missing_fields,
)
from mailwire.protocol._trace import parse_date

T0 = calendar.timegm((2026, 11, 29, 9, 0, 54))
QID = "0KQ3V8Z7M2C4XB1RT9A6"
HOST = "mx.example.org"
DATE = b"Date: Sun, 29 Nov 2026 09:00:54 +0000\r\n"
MSGID = b"Message-ID: <0KQ3V8Z7M2C4XB1RT9A6@mx.example.org>\r\n"
# RFC 5322 3.6.4 msg-id with dot-atom-text on both sides (written out independently)
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
MSG_ID = re.compile(rf"<{ATEXT}+(\.{ATEXT}+)*@{ATEXT}+(\.{ATEXT}+)*>")


def added(content: bytes, *, queue_id: str = QID, hostname: str = HOST) -> bytes:
    return missing_fields(content, arrival=T0, queue_id=queue_id, hostname=hostname)


# --- what is added ------------------------------------------------------------------------------


# dot-atom-text of 700 to 1,500 characters: valid, but too long for a header line
_LONG_DOT_ATOM = st.lists(
    st.text(alphabet="ab", min_size=15, max_size=25), min_size=45, max_size=60
).map(".".join)


def test_a_message_without_date_or_message_id_gets_both() -> None:
    assert added(b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n") == DATE + MSGID


def test_a_message_with_both_gets_nothing() -> None:
    content = b"Date: Mon, 1 Jan 2024 00:00:00 +0100\r\nMessage-ID: <x@y>\r\n\r\nbody\r\n"
    assert added(content) == b""


def test_only_the_missing_field_is_added() -> None:
    assert added(b"Message-ID: <x@y>\r\nSubject: s\r\n\r\nb\r\n") == DATE
    assert added(b"Subject: s\r\nDate: whenever\r\n\r\nb\r\n") == MSGID


def test_a_present_field_is_kept_even_when_its_syntax_is_bad() -> None:
    # only missing fields are added: replacing one would rewrite the client's header section
    assert added(b"Date: not a date\r\nMessage-ID: nonsense\r\n\r\n") == b""
    assert added(b"Date:\r\nMessage-ID:\r\n\r\n") == b""


def test_field_names_compare_case_insensitively() -> None:
    assert added(b"DATE: x\r\nmessage-id: <a@b>\r\n\r\n") == b""
    assert added(b"date: x\r\nMessage-Id: <a@b>\r\n\r\n") == b""


def test_white_space_before_the_colon_is_tolerated() -> None:
    # RFC 5322 4.5: obsolete syntax allows WSP between the field name and the colon
    assert added(b"Date \t: x\r\nMessage-ID : <a@b>\r\n\r\n") == b""


def test_similar_field_names_do_not_count() -> None:
    content = b"Resent-Date: x\r\nX-Date: x\r\nResent-Message-ID: <a@b>\r\nDates: x\r\n\r\n"
    assert added(content) == DATE + MSGID


def test_a_folded_line_belongs_to_the_previous_field() -> None:
    content = b"Subject: a long\r\n Date: this is the subject\r\n\tMessage-ID: too\r\n\r\n"
    assert added(content) == DATE + MSGID


def test_fields_in_the_body_do_not_count() -> None:
    assert added(b"Subject: s\r\n\r\nDate: x\r\nMessage-ID: <a@b>\r\n") == DATE + MSGID


def test_bare_lf_line_ends_work_like_crlf() -> None:
    assert added(b"Subject: s\nDate: x\n\nMessage-ID: <a@b>\n") == MSGID
    assert added(b"Subject: s\nDate: x\nMessage-ID: <a@b>\n\nbody\n") == b""


def test_a_lone_cr_ends_a_line_as_mail_parsers_read_it() -> None:
    # BDAT content may hold lone CRs; Python's email parser (like others) splits lines there,
    # so adding a Date or Message-ID here would give the message two of each
    content = b"Subject: x\rDate: Mon, 1 Jan 2024 00:00:00 +0000\rMessage-ID: <a@b>\r\n\r\nbody\r\n"
    assert added(content) == b""
    parsed = BytesParser(policy=email.policy.default).parsebytes(content)
    assert len(parsed.get_all("Date") or []) == 1
    assert added(b"Subject: x\r\rDate: x\r\n") == DATE + MSGID  # lone CR + CRLF: empty line


def test_a_message_without_body_ends_at_the_end_of_the_content() -> None:
    assert added(b"Subject: s\r\nDate: x\r\nMessage-ID: <a@b>") == b""
    assert added(b"Subject: s\r\nDate: x\r\nMessage-ID: <a@b>\r\n") == b""
    assert added(b"Subject: s\r\nDate: x") == MSGID


def test_a_line_that_is_not_a_field_ends_the_header_section() -> None:
    content = b"Subject: s\r\nthis is no field\r\nDate: x\r\nMessage-ID: <a@b>\r\n\r\n"
    assert added(content) == DATE + MSGID
    assert added(b"Subject: s\r\n: no name\r\nDate: x\r\n") == DATE + MSGID
    assert added(b"Subject: s\r\nDa te: x\r\n") == DATE + MSGID
    # RFC 5322 3.6.8: a field name is printable US-ASCII (no controls, no 8-bit octets)
    assert added("Subject: s\r\nSübject: x\r\nDate: x\r\n".encode()) == DATE + MSGID
    assert added(b"Subject: s\r\nSub\x7fject: x\r\nDate: x\r\n") == DATE + MSGID


def test_an_mbox_from_line_means_there_is_no_header_section() -> None:
    content = b"From alice@example.org Sun Nov 29 09:00:54 2026\r\nDate: x\r\n\r\nbody\r\n"
    # the fields are followed by an empty line: what the client sent becomes the body
    assert added(content) == DATE + MSGID + b"\r\n"


def test_a_body_without_any_header_gets_the_fields_and_an_empty_line() -> None:
    assert added(b"hello, world\r\n") == DATE + MSGID + b"\r\n"
    assert added(b" indented first line: x\r\n") == DATE + MSGID + b"\r\n"
    parsed = BytesParser(policy=email.policy.default).parsebytes(added(b"hi\r\n") + b"hi\r\n")
    assert parsed["Date"] is not None and parsed.get_payload() == "hi\r\n"


def test_empty_content_and_an_empty_header_section_need_no_empty_line() -> None:
    assert added(b"") == DATE + MSGID
    assert added(b"\r\nbody\r\n") == DATE + MSGID
    assert added(b"\nbody\n") == DATE + MSGID


def test_the_result_makes_a_message_the_stdlib_reads_with_one_of_each() -> None:
    content = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    message = BytesParser(policy=email.policy.default).parsebytes(added(content) + content)
    assert message.get_all("Date") == ["Sun, 29 Nov 2026 09:00:54 +0000"]
    assert message.get_all("Message-ID") == ["<0KQ3V8Z7M2C4XB1RT9A6@mx.example.org>"]
    assert message["Subject"] == "hi"
    assert not message.defects


# --- the 64 KiB bound ---------------------------------------------------------------------------


def test_a_header_section_longer_than_the_scan_limit_is_left_alone() -> None:
    # undecided: a Date further on would become a second one (RFC 5322 3.6: at most one)
    long = b"X-Long: " + b"a" * SCAN_LIMIT + b"\r\nDate: x\r\n\r\nbody\r\n"
    assert added(long) == b""
    many = b"X-Filler: yes\r\n" * (SCAN_LIMIT // 15 + 1) + b"\r\nbody\r\n"
    assert len(many) > SCAN_LIMIT and added(many) == b""


def test_a_header_section_that_ends_within_the_limit_is_decided_whatever_the_body() -> None:
    body = b"Date: in the body\r\n" * (2 * SCAN_LIMIT // 19)
    assert added(b"Subject: s\r\n\r\n" + body) == DATE + MSGID
    # the empty line is the last thing inside the window
    header = b"X-Pad: " + b"p" * (SCAN_LIMIT - 11) + b"\r\n\r\n"
    assert len(header) == SCAN_LIMIT
    assert added(header + b"more body" * 100) == DATE + MSGID


def test_a_header_section_that_ends_exactly_at_the_limit_without_a_body_is_decided() -> None:
    content = b"X-Pad: " + b"p" * (SCAN_LIMIT - 9) + b"\r\n"
    assert len(content) == SCAN_LIMIT
    assert added(content) == DATE + MSGID
    assert added(content + b"Date: x\r\n") == b""  # the next line is past the window


# --- the Message-ID -----------------------------------------------------------------------------


def test_the_message_id_is_the_queue_id_at_the_host_name_and_deterministic() -> None:
    assert message_id(queue_id=QID, hostname=HOST) == f"<{QID}@{HOST}>"
    assert added(b"Subject: s\r\n\r\n") == added(b"Subject: s\r\n\r\n")
    assert added(b"", queue_id="AAAA") != added(b"", queue_id="AAAB")


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("mx.example.org", "mx.example.org"),
        ("mx.example.org.", "mx.example.org"),  # absolute form
        ("MX.Example.ORG", "MX.Example.ORG"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("mx_1.example", "mx_1.example"),  # not a host name, but dot-atom-text
        ("[192.0.2.1]", "localhost"),
        ("", "localhost"),
        ("a..b", "localhost"),
        (".", "localhost"),
        ("has space.example", "localhost"),
        ("a@b", "localhost"),
        ("x" * 64 + ".\u00e9", "localhost"),  # IDNA refuses a label over 63 octets
        ("a." * 126 + "b", "a." * 126 + "b"),  # 253 octets: a DNS name's longest
        ("a." * 126 + "bc", "localhost"),  # 254: no DNS name, and lines must stay short
    ],
)
def test_the_host_name_becomes_dot_atom_text_or_localhost(hostname: str, expected: str) -> None:
    assert message_id_host(hostname) == expected
    assert MSG_ID.fullmatch(message_id(queue_id=QID, hostname=hostname))


@pytest.mark.parametrize("queue_id", ["", "a b", "a@b", "<x>", "a..b", ".a", "é", "q" * 65])
def test_a_queue_id_that_is_not_dot_atom_text_becomes_a_digest(queue_id: str) -> None:
    mid = message_id(queue_id=queue_id, hostname=HOST)
    assert MSG_ID.fullmatch(mid)
    assert mid.startswith("<mw.") and len(mid) == len(f"<mw.{'0' * 32}@{HOST}>")
    assert mid == message_id(queue_id=queue_id, hostname=HOST)
    assert mid != message_id(queue_id=queue_id + "x", hostname=HOST)


# --- the Date -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arrival", [float("nan"), float("inf"), float("-inf"), -1e20, 253402300800.0]
)
def test_an_arrival_no_date_can_show_gets_no_date_and_no_error(arrival: float) -> None:
    # years 1 to 9999 only (RFC 5322 3.3); a damaged envelope must not stop a delivery
    out = missing_fields(
        b"Subject: x\r\n\r\nbody\r\n", arrival=arrival, queue_id=QID, hostname=HOST
    )
    assert out == f"Message-ID: <{QID}@{HOST}>\r\n".encode()


def test_the_first_and_last_seconds_of_years_1_to_9999_get_a_date() -> None:
    first = missing_fields(b"", arrival=-62135596800.0, queue_id=QID, hostname=HOST)
    last = missing_fields(b"", arrival=253402300799.9, queue_id=QID, hostname=HOST)
    assert first.startswith(b"Date: Mon, 01 Jan 0001 00:00:00 +0000\r\n")
    assert last.startswith(b"Date: Fri, 31 Dec 9999 23:59:59 +0000\r\n")


def test_the_date_is_the_arrival_time_and_parses_back() -> None:
    line = added(b"Message-ID: <a@b>\r\n\r\n")
    assert line.startswith(b"Date: ") and line.endswith(b"\r\n")
    text = line[6:-2].decode()
    assert parse_date(text) == T0
    assert email.utils.parsedate_to_datetime(text).timestamp() == T0


@settings(max_examples=200, deadline=None)
@given(arrival=st.floats(min_value=0, max_value=4e9))
def test_any_arrival_gives_a_date_that_parses_back_to_its_second(arrival: float) -> None:
    line = missing_fields(b"Message-ID: <a@b>\r\n", arrival=arrival, queue_id=QID, hostname=HOST)
    assert parse_date(line[6:-2].decode()) == int(arrival)


# --- properties ---------------------------------------------------------------------------------

NAMES = ["Subject", "From", "To", "Date", "date", "DATE", "Message-ID", "message-id",
         "Message-Id", "Resent-Date", "X-Message-ID", "Received"]  # fmt: skip


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, bool, bool]:
    """(content, has Date, has Message-ID): a header section built from NAMES, folded or
    not, with CRLF or LF, with or without a body (which may hold field-like lines)."""
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    names = draw(st.lists(st.sampled_from(NAMES), max_size=8))
    lines = []
    for name in names:
        value = draw(st.text("abc <>@:.", max_size=10)).encode()
        ws = draw(st.sampled_from([b"", b" ", b"\t "]))
        line = name.encode() + ws + b":" + value
        if draw(st.booleans()):
            line += eol + draw(st.sampled_from([b" ", b"\t"])) + b"Date: folded"
        lines.append(line)
    content = eol.join(lines)
    if draw(st.booleans()):
        content += eol + eol + draw(st.sampled_from([b"", b"Date: x" + eol, b"Message-ID: y"]))
    elif draw(st.booleans()) and lines:
        content += eol
    lowered = {n.lower() for n in names}
    return content, "date" in lowered, "message-id" in lowered


@settings(max_examples=300, deadline=None)
@given(message=messages())
def test_exactly_the_missing_fields_are_added(message: tuple[bytes, bool, bool]) -> None:
    content, has_date, has_id = message
    out = added(content)
    assert (b"Date: " in out) is not has_date
    assert (b"Message-ID: " in out) is not has_id
    assert out == (b"" if has_date else DATE) + (b"" if has_id else MSGID)


@settings(max_examples=300, deadline=None)
@given(
    content=st.one_of(
        st.binary(max_size=200),
        messages().map(lambda m: m[0]),
        st.lists(st.sampled_from([b"Date: x", b"Subject: y", b" fold", b"", b"junk", b"\r"])).map(
            b"\n".join
        ),
    )
)
def test_applying_it_twice_adds_nothing_the_second_time(content: bytes) -> None:
    out = added(content)
    assert added(out + content) == b""
    # and what it adds is only whole Date / Message-ID lines (and maybe one empty line)
    assert re.fullmatch(rb"(Date: [^\r\n]+\r\n)?(Message-ID: <[^\r\n]+>\r\n)?(\r\n)?", out)


@settings(max_examples=100, deadline=None)
@given(
    content=st.binary(max_size=100),
    queue_id=st.text(max_size=12) | _LONG_DOT_ATOM,
    hostname=st.text(max_size=20) | _LONG_DOT_ATOM,
)
def test_any_queue_id_and_host_name_give_a_valid_message_id(
    content: bytes, queue_id: str, hostname: str
) -> None:
    assert MSG_ID.fullmatch(message_id(queue_id=queue_id, hostname=hostname))
    out = missing_fields(content, arrival=T0, queue_id=queue_id, hostname=hostname)
    assert out == missing_fields(content, arrival=T0, queue_id=queue_id, hostname=hostname)
    assert all(len(line) <= 998 for line in out.split(b"\r\n"))  # RFC 5322 2.1.1

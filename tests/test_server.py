"""ServerConnection: transcripts of whole sessions, one behaviour per test.

Transcripts are bytes; ``# C:`` lines are what the client sends, ``# S:`` what the server must
answer.  ``Session`` accepts every decision unless a test says otherwise.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest

from mailwire.protocol import (
    NEED_DATA,
    PAUSED,
    AuthCredentials,
    Bdat,
    CommandRejected,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfMessage,
    Helo,
    Lhlo,
    LineEndings,
    LocalProtocolError,
    MailFrom,
    MessageData,
    MessageRejected,
    Noop,
    Quit,
    RcptTo,
    RemoteProtocolError,
    Reply,
    Sentinel,
    ServerConfig,
    ServerConnection,
    ServerEvent,
    SessionState,
    StartTLS,
    Vrfy,
)

Decide = Callable[[ServerEvent], Reply | list[Reply] | None]


def accept_all(event: ServerEvent) -> Reply | list[Reply] | None:
    match event:
        case Ehlo() | Helo() | Lhlo():
            return Reply(code=250, text="hello")
        case MailFrom() | RcptTo():
            return Reply(code=250, text="OK")
        case Vrfy():
            return Reply(code=252, text="Cannot VRFY user")
        case AuthCredentials():
            ok = event.username == "alice" and event.password == "secret"
            return Reply(code=235 if ok else 535, text="done" if ok else "nope")
        case EndOfMessage():
            return Reply(code=250, text="queued")
    return None


class Session:
    """A server engine plus an application that decides with ``decide``."""

    def __init__(self, decide: Decide = accept_all, **config: Any) -> None:
        config.setdefault("hostname", "mx.example")
        self.conn = ServerConnection(ServerConfig(**config))
        self.decide = decide
        self.events: list[ServerEvent] = []
        self.conn.send(Reply(code=220, text="mx.example ESMTP"))
        self.conn.data_to_send()

    def feed(self, data: bytes) -> bytes:
        """Feed ``data``, answer every decision, return what the server sent."""
        if data:
            self.conn.receive_data(data)
        self.pump()
        return self.conn.data_to_send()

    def pump(self) -> None:
        while True:
            event = self.conn.next_event()
            if isinstance(event, Sentinel):
                return
            self.events.append(event)
            if isinstance(event, ConnectionClosed):
                return
            reply = self.decide(event)
            if self.conn.owes_reply:
                assert reply is not None, f"no decision for {event!r}"
                for r in reply if isinstance(reply, list) else [reply]:
                    self.conn.send(r)

    def codes(self, data: bytes) -> list[int]:
        return [int(line[:3]) for line in self.feed(data).split(b"\r\n") if line[3:4] == b" "]

    def greet(self) -> None:
        self.feed(b"EHLO client.example\r\n")

    def kinds(self) -> list[type]:
        return [type(e) for e in self.events]


# --- greeting and hello -----------------------------------------------------------------------


def test_greeting_is_owed_before_anything_is_parsed() -> None:
    conn = ServerConnection(ServerConfig(hostname="mx.example"))
    conn.receive_data(b"EHLO x\r\n")
    assert conn.next_event() is PAUSED
    assert conn.state is SessionState.GREETING
    conn.send(Reply(code=220, text="mx.example ESMTP"))
    assert conn.data_to_send() == b"220 mx.example ESMTP\r\n"  # RFC 2034: no code on greeting
    assert conn.next_event() == Ehlo(domain="x")


def test_greeting_must_be_220_554_or_421() -> None:
    conn = ServerConnection(ServerConfig())
    with pytest.raises(LocalProtocolError):
        conn.send(Reply(code=250, text="hi"))


def test_554_greeting_answers_503_to_everything_but_quit() -> None:
    conn = ServerConnection(ServerConfig(hostname="mx.example"))
    conn.send(Reply(code=554, text="mx.example no service"))
    conn.receive_data(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nQUIT\r\n")
    # C: EHLO x            S: 503
    # C: MAIL FROM:<...>   S: 503
    # C: QUIT              S: 221
    events = [conn.next_event() for _ in range(4)]
    assert [type(e) for e in events] == [CommandRejected, CommandRejected, Quit, ConnectionClosed]
    out = conn.data_to_send()
    assert out.endswith(
        b"503 5.5.1 Bad sequence of commands\r\n503 5.5.1 Bad sequence of commands\r\n"
        b"221 2.0.0 mx.example closing connection\r\n"
    )


def test_ehlo_reply_lists_extensions_from_config() -> None:
    s = Session(max_message_size=1000)
    out = s.feed(b"EHLO client.example\r\n")
    assert out == (
        b"250-mx.example hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n"
        b"250-CHUNKING\r\n250 BINARYMIME\r\n"
    )


def test_ehlo_offers_starttls_only_before_tls_and_auth_only_after() -> None:
    s = Session(starttls=True, auth_mechanisms=("PLAIN", "LOGIN"))
    out = s.feed(b"EHLO c\r\n")
    assert b"STARTTLS" in out and b"AUTH" not in out
    s.feed(b"STARTTLS\r\n")
    s.conn.tls_established()
    out = s.feed(b"EHLO c\r\n")
    assert b"STARTTLS" not in out and b"250-AUTH PLAIN LOGIN\r\n" in out


def test_rejected_ehlo_keeps_state_hello() -> None:
    s = Session(decide=lambda e: Reply(code=550, text="go away") if isinstance(e, Ehlo) else None)
    assert s.codes(b"EHLO spammer\r\nMAIL FROM:<a@b.example>\r\n") == [550, 503]
    assert s.conn.state is SessionState.HELLO


def test_helo_disallows_esmtp_parameters() -> None:
    s = Session()
    s.feed(b"HELO c\r\n")
    assert s.codes(b"MAIL FROM:<a@b.example> SIZE=10\r\n") == [555]


# --- mail transaction -------------------------------------------------------------------------


def test_full_transaction_yields_events_and_unstuffed_body() -> None:
    s = Session()
    out = s.feed(
        b"EHLO client.example\r\n"
        b"MAIL FROM:<alice@example.org> SIZE=42 BODY=8BITMIME\r\n"
        b"RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2Bx@example.net\r\n"
        b"DATA\r\n"
    )
    assert out.endswith(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
    out = s.feed(b"Subject: x\r\n\r\n..leading dot\r\n.\r\n")
    assert out == b"250 2.0.0 queued\r\n"
    assert s.events[1] == MailFrom(address="alice@example.org", size=42, body="8BITMIME")
    assert s.events[2] == RcptTo(
        address="bob@example.net", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;bob+x@example.net"
    )
    body = b"".join(e.data for e in s.events if isinstance(e, MessageData))
    assert body == b"Subject: x\r\n\r\n.leading dot\r\n"
    assert s.conn.state is SessionState.READY
    assert s.conn.envelope.sender is None


def test_envelope_holds_only_accepted_recipients() -> None:
    def decide(e: ServerEvent) -> Reply | None:
        if isinstance(e, RcptTo) and e.address.startswith("bad"):
            return Reply(code=550, text="5.1.1 no such user")
        return accept_all(e)  # type: ignore[return-value]

    s = Session(decide)
    s.greet()
    assert s.codes(
        b"MAIL FROM:<a@x.example>\r\nRCPT TO:<bad@y.example>\r\nRCPT TO:<good@y.example>\r\n"
    ) == [250, 550, 250]
    assert [r.address for r in s.conn.envelope.recipients] == ["good@y.example"]


def test_rcpt_before_mail_gets_503() -> None:
    s = Session()
    s.greet()
    out = s.feed(b"RCPT TO:<a@b.example>\r\n")
    assert out == b"503 5.5.1 Need MAIL before RCPT\r\n"
    assert isinstance(s.events[-1], CommandRejected)


def test_mail_before_ehlo_gets_503() -> None:
    assert Session().codes(b"MAIL FROM:<a@b.example>\r\n") == [503]


def test_nested_mail_gets_503() -> None:
    s = Session()
    s.greet()
    assert s.codes(b"MAIL FROM:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\n") == [250, 503]


def test_data_without_valid_recipient_gets_554() -> None:
    s = Session(
        decide=lambda e: Reply(code=550, text="no") if isinstance(e, RcptTo) else accept_all(e)
    )
    s.greet()
    assert s.codes(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n") == [
        250,
        550,
        554,
    ]


def test_null_sender_is_accepted() -> None:
    s = Session()
    s.greet()
    assert s.codes(b"MAIL FROM:<>\r\n") == [250]
    assert s.events[-1] == MailFrom(address="")


def test_rset_clears_the_transaction() -> None:
    s = Session()
    s.greet()
    assert s.codes(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRSET\r\n") == [
        250,
        250,
        250,
    ]
    assert s.conn.state is SessionState.READY and s.conn.envelope.recipients == ()
    assert s.codes(b"RCPT TO:<c@d.example>\r\n") == [503]


def test_noop_help_vrfy_expn_quit() -> None:
    s = Session()
    s.greet()
    out = s.feed(b"NOOP\r\nNOOP anything\r\nHELP\r\nVRFY bob\r\nEXPN list\r\nQUIT\r\n")
    assert out == (
        b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n214 2.0.0 See RFC 5321 (https://www.rfc-editor.org/rfc/rfc5321)\r\n"
        b"252 2.5.0 Cannot VRFY user\r\n502 5.5.1 EXPN not supported\r\n"
        b"221 2.0.0 mx.example closing connection\r\n"
    )
    assert s.conn.state is SessionState.CLOSED


def test_vrfy_without_argument_is_501_not_500() -> None:
    s = Session()
    s.greet()
    assert s.codes(b"VRFY\r\n") == [501]


def test_unknown_command_gets_500() -> None:
    s = Session()
    assert s.feed(b"FOO bar\r\n") == b"500 5.5.2 Syntax error: command unrecognized\r\n"


def test_commands_are_case_insensitive() -> None:
    s = Session()
    assert s.codes(b"ehlo c\r\nmail from:<a@b.example>\r\nrcpt to:<c@d.example>\r\n") == [
        250,
        250,
        250,
    ]


def test_data_with_argument_is_501() -> None:
    s = Session()
    s.greet()
    s.feed(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    assert s.codes(b"DATA now\r\n") == [501]


# --- addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        b"<user@example.com>",
        b'<"john doe"@example.com>',
        b'<"quoted\\"pair"@example.com>',
        b"<user@[192.0.2.1]>",
        b"<user@[IPv6:2001:db8::1]>",
        b"<@relay.example,@other.example:user@example.com>",
        b"<a.b.c!#$%&'*+-/=?^_`{|}~@sub.example.co>",
    ],
)
def test_valid_paths_are_accepted(path: bytes) -> None:
    s = Session()
    s.greet()
    assert s.codes(b"MAIL FROM:" + path + b"\r\n") == [250]


def test_source_route_is_dropped() -> None:
    s = Session()
    s.greet()
    s.feed(b"MAIL FROM:<@relay.example:user@example.com>\r\n")
    assert s.events[-1] == MailFrom(address="user@example.com")


@pytest.mark.parametrize(
    ("path", "code"),
    [
        (b"user@example.com", 501),  # no angle brackets
        (b"<user>", 501),
        (b"<user@>", 501),
        (b"<@example.com>", 501),
        (b"<us er@example.com>", 501),
        (b"<user@exa_mple.com>", 501),
        (b"<user@[300.1.1.1]>", 501),
        (b"<user@[IPv6:zz::1]>", 501),
        (b"<" + b"a" * 65 + b"@example.com>", 501),  # local part > 64 (RFC 5321 4.5.3.1.1)
        (b"<a@" + b"b" * 64 + b".example>", 501),  # label > 63
        (b"<a@" + b".".join([b"b" * 60] * 5) + b">", 501),  # path > 256 / domain > 255
        ("<jos\u00e9@example.com>".encode(), 553),  # non-ASCII without SMTPUTF8
    ],
)
def test_bad_paths_are_rejected(path: bytes, code: int) -> None:
    s = Session()
    s.greet()
    assert s.codes(b"MAIL FROM:" + path + b"\r\n") == [code]


def test_length_limits_are_exact() -> None:
    s = Session()
    s.greet()
    local64 = b"a" * 64
    assert s.codes(b"MAIL FROM:<" + local64 + b"@example.com>\r\n") == [250]


def test_smtputf8_allows_utf8_addresses() -> None:
    s = Session()
    s.greet()
    line = "MAIL FROM:<jos\u00e9@ex\u00e4mple.com> SMTPUTF8\r\nRCPT TO:<\u00fc@b.example>\r\n"
    assert s.codes(line.encode()) == [250, 250]
    assert s.events[-1] == RcptTo(address="\u00fc@b.example")


def test_invalid_utf8_gets_500() -> None:
    s = Session()
    s.greet()
    assert s.codes(b"MAIL FROM:<\xff@b.example> SMTPUTF8\r\n") == [500]


def test_postmaster_without_domain_is_a_valid_recipient() -> None:
    s = Session()
    s.greet()
    assert s.codes(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<Postmaster>\r\n") == [250, 250]
    event = s.events[-1]
    assert isinstance(event, RcptTo) and event.is_postmaster


def test_application_may_not_reject_postmaster_permanently() -> None:
    s = Session(decide=lambda e: None)
    s.conn.receive_data(b"EHLO c\r\n")
    s.conn.next_event()
    s.conn.send(Reply(code=250, text="hi"))
    s.conn.receive_data(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<postmaster>\r\n")
    s.conn.next_event()
    s.conn.send(Reply(code=250, text="ok"))
    s.conn.next_event()
    with pytest.raises(LocalProtocolError):
        s.conn.send(Reply(code=550, text="no"))


# --- ESMTP parameters -------------------------------------------------------------------------


def test_declared_size_over_limit_is_552_at_mail() -> None:
    s = Session(max_message_size=1000)
    s.greet()
    assert s.feed(b"MAIL FROM:<a@b.example> SIZE=1001\r\n") == (
        b"552 5.3.4 Message size exceeds fixed maximum\r\n"
    )


def test_actual_size_over_limit_is_552_at_end_of_data() -> None:
    s = Session(max_message_size=1024)
    s.greet()
    s.feed(b"MAIL FROM:<a@b.example> SIZE=10\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    out = s.feed(b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n.\r\n")
    assert out == b"552 5.3.4 Message size exceeds fixed maximum\r\n"
    assert isinstance(s.events[-1], MessageRejected)
    assert s.conn.state is SessionState.READY
    assert s.codes(b"NOOP\r\n") == [250]  # the session stays usable


def test_unknown_parameter_is_555() -> None:
    s = Session()
    s.greet()
    assert s.codes(b"MAIL FROM:<a@b.example> FOO=bar\r\n") == [555]


def test_duplicate_parameter_is_501() -> None:
    s = Session()
    s.greet()
    assert s.codes(b"MAIL FROM:<a@b.example> SIZE=1 SIZE=2\r\n") == [501]


def test_dsn_parameters_are_parsed_and_carried() -> None:
    s = Session()
    s.greet()
    s.feed(
        b"MAIL FROM:<a@b.example> RET=HDRS ENVID=QQ+2B1\r\nRCPT TO:<c@d.example> NOTIFY=NEVER\r\n"
    )
    assert s.events[-2] == MailFrom(address="a@b.example", ret="HDRS", envid="QQ+1")
    assert s.events[-1] == RcptTo(address="c@d.example", notify=("NEVER",))


@pytest.mark.parametrize(
    "params",
    [b"NOTIFY=NEVER,SUCCESS", b"NOTIFY=", b"NOTIFY=SOMETIMES", b"ORCPT=nosemicolon"],
)
def test_bad_dsn_rcpt_parameters_are_501(params: bytes) -> None:
    s = Session()
    s.greet()
    s.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert s.codes(b"RCPT TO:<c@d.example> " + params + b"\r\n") == [501]


def test_body_parameter_honours_config() -> None:
    s = Session(eightbitmime=False, binarymime=False)
    s.greet()
    assert s.codes(b"MAIL FROM:<a@b.example> BODY=8BITMIME\r\n") == [555]
    assert s.codes(b"MAIL FROM:<a@b.example> BODY=7BIT\r\n") == [250]


def test_too_many_recipients_get_452() -> None:
    s = Session(max_recipients=100)
    s.greet()
    s.feed(b"MAIL FROM:<a@b.example>\r\n")
    codes = s.codes(b"".join(b"RCPT TO:<r%d@d.example>\r\n" % i for i in range(101)))
    assert codes == [250] * 100 + [452]


# --- PIPELINING -------------------------------------------------------------------------------


def test_pipelined_commands_are_decided_in_order_one_at_a_time() -> None:
    conn = ServerConnection(ServerConfig(hostname="mx.example"))
    conn.send(Reply(code=220, text="hi"))
    conn.receive_data(
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@f.example>\r\n"
        b"DATA\r\n"
    )
    seen = []
    while (event := conn.next_event()) is not NEED_DATA:
        assert event is not PAUSED
        seen.append(type(event))
        # nothing after the decision was parsed yet:
        if conn.owes_reply:
            assert conn.next_event() is PAUSED
            conn.send(Reply(code=250, text="ok"))
    assert seen == [Ehlo, MailFrom, RcptTo, RcptTo, Data]


# --- DATA body --------------------------------------------------------------------------------


def _in_data(**config: Any) -> Session:
    s = Session(**config)
    s.feed(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    return s


def _body(s: Session) -> bytes:
    return b"".join(e.data for e in s.events if isinstance(e, MessageData))


def test_empty_body() -> None:
    s = _in_data()
    assert s.feed(b".\r\n") == b"250 2.0.0 queued\r\n"
    assert _body(s) == b""


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n"],
)
def test_only_crlf_dot_crlf_ends_data(smuggle: bytes) -> None:
    # SMTP smuggling (CVE-2023-51764 family): none of these may end the message.
    s = _in_data(line_endings=LineEndings.ALLOW)
    out = s.feed(b"Subject: x\r\n\r\nhello" + smuggle + b"MAIL FROM:<evil@x.example>\r\n")
    assert out == b""
    assert not any(isinstance(e, EndOfMessage) for e in s.events)
    assert s.feed(b"\r\n.\r\n") == b"250 2.0.0 queued\r\n"
    assert b"MAIL FROM:<evil@x.example>" in _body(s)  # content, never a command
    assert [type(e) for e in s.events].count(MailFrom) == 1


def test_bare_lf_rejects_the_message_by_default() -> None:
    s = _in_data()
    out = s.feed(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@x.example>\r\n.\r\n")
    assert out.startswith(b"550 5.6.0")
    assert isinstance(s.events[-1], MessageRejected)
    assert s.conn.state is SessionState.READY


def test_bare_lf_is_normalized_when_configured() -> None:
    s = _in_data(line_endings=LineEndings.NORMALIZE)
    assert s.feed(b"a\nb\rc\r\n..d\n.e\r\n.\r\n") == b"250 2.0.0 queued\r\n"
    assert _body(s) == b"a\r\nb\r\nc\r\n.d\r\ne\r\n"


def test_long_line_rejects_the_message_at_the_end() -> None:
    s = _in_data()
    out = s.feed(b"x" * 998 + b"\r\n" + b"y" * 999 + b"\r\n.\r\n")
    assert out.startswith(b"550 5.6.0 Message has a line longer than 1000")


def test_line_of_exactly_998_octets_is_fine() -> None:
    s = _in_data()
    assert s.feed(b"x" * 998 + b"\r\n.\r\n") == b"250 2.0.0 queued\r\n"


def test_line_limit_is_checked_across_chunks() -> None:
    s = _in_data()
    for _ in range(10):
        s.feed(b"z" * 100)
    assert s.feed(b"\r\n.\r\n").startswith(b"550 5.6.0")


def test_body_chunks_are_bounded_and_the_engine_keeps_no_message() -> None:
    s = _in_data(max_chunk_size=4096, max_line_length=None, max_message_size=0)
    s.feed(b"a" * 100_000)
    assert len(s.conn._buf) - s.conn._pos < 4096 + 5
    assert max(len(e.data) for e in s.events if isinstance(e, MessageData)) <= 4096
    s.feed(b"\r\n.\r\n")
    assert _body(s) == b"a" * 100_000 + b"\r\n"


def test_terminator_split_across_reads() -> None:
    s = _in_data()
    for piece in (b"line\r", b"\n", b".", b"\r", b"\n"):
        s.feed(piece)
    assert isinstance(s.events[-1], EndOfMessage)
    assert _body(s) == b"line\r\n"


def test_commands_after_data_are_parsed_again() -> None:
    s = _in_data()
    assert s.codes(b"body\r\n.\r\nMAIL FROM:<x@y.example>\r\n") == [250, 250]


def test_eof_in_data_loses_nothing_acknowledged() -> None:
    s = _in_data()
    s.feed(b"partial body")
    s.conn.receive_eof()
    s.pump()
    assert isinstance(s.events[-1], ConnectionClosed)
    assert not any(isinstance(e, EndOfMessage) for e in s.events)


# --- BDAT / CHUNKING (RFC 3030) -----------------------------------------------------------------


def test_bdat_chunks_and_last() -> None:
    s = Session()
    s.greet()
    out = s.feed(
        b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\nRCPT TO:<c@d.example>\r\n"
        b"BDAT 5\r\n\r\n.\r\nBDAT 3 LAST\r\n\x00\x01\n"
    )
    assert out.endswith(b"250 2.0.0 5 octets received\r\n250 2.0.0 queued\r\n")
    assert _body(s) == b"\r\n.\r\n\x00\x01\n"
    assert Bdat(size=3, last=True) in s.events


def test_bdat_without_transaction_consumes_its_octets_and_gets_503() -> None:
    s = Session()
    s.greet()
    # the 6 octets look like a command but must never be executed
    assert s.codes(b"BDAT 6\r\nQUIT\r\nNOOP\r\n") == [503, 250]
    assert s.conn.state is SessionState.READY


def test_malformed_bdat_closes_the_session() -> None:
    s = Session()
    s.greet()
    s.conn.receive_data(b"BDAT lots\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        s.conn.next_event()
    assert info.value.reply_hint is not None and info.value.reply_hint.code == 501
    assert s.conn.state is SessionState.ERROR


def test_binarymime_requires_bdat() -> None:
    s = Session()
    s.greet()
    assert s.codes(
        b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
    ) == [250, 250, 503]


def test_bdat_over_size_limit_is_552_and_ends_transaction() -> None:
    s = Session(max_message_size=1024)
    s.greet()
    s.feed(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    assert s.codes(b"BDAT 2000\r\n" + b"x" * 2000 + b"BDAT 1 LAST\r\nx") == [552, 503]


# --- STARTTLS (RFC 3207) ------------------------------------------------------------------------


def test_starttls_discards_pipelined_plaintext() -> None:
    # CVE-2011-0411: commands injected after STARTTLS must never run inside TLS.
    s = Session(starttls=True)
    s.greet()
    out = s.feed(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\n")
    assert out == b"220 2.0.0 Ready to start TLS\r\n"
    assert s.conn.state is SessionState.STARTTLS
    assert isinstance(s.events[-1], StartTLS)
    s.conn.receive_data(b"RCPT TO:<more@x.example>\r\n")  # still before the handshake
    assert s.conn.next_event() is PAUSED
    s.conn.tls_established()
    assert s.conn.state is SessionState.HELLO and s.conn.tls_active
    assert s.codes(b"MAIL FROM:<a@b.example>\r\n") == [503]  # EHLO again first (RFC 3207 4.2)


@pytest.mark.parametrize(("handshake_done", "deadline"), [(None, 10.0 + 300), (10.7, 10.7 + 300)])
def test_after_starttls_the_command_time_starts_when_the_handshake_is_done(
    handshake_done: float | None, deadline: float
) -> None:
    conn = ServerConnection(ServerConfig(starttls=True, command_timeout=300), now=0.0)
    conn.send(Reply(code=220, text="hi"), now=0.0)
    conn.receive_data(b"EHLO c\r\n", now=1.0)
    assert isinstance(conn.next_event(), Ehlo)
    conn.send(Reply(code=250, text="hi"), now=1.0)
    conn.receive_data(b"STARTTLS\r\n", now=10.0)
    assert isinstance(conn.next_event(), StartTLS)
    assert conn.next_event() is PAUSED
    conn.tls_established(now=handshake_done)  # a slow handshake must not eat the client's time
    assert conn.deadline == deadline


def test_starttls_not_offered_is_502_and_twice_is_503() -> None:
    assert Session().codes(b"EHLO c\r\nSTARTTLS\r\n") == [250, 502]
    s = Session(starttls=True)
    s.feed(b"EHLO c\r\nSTARTTLS\r\n")
    s.conn.tls_established()
    assert s.codes(b"EHLO c\r\nSTARTTLS\r\n") == [250, 503]


def test_tls_required_refuses_mail_in_plaintext() -> None:
    s = Session(starttls=True, tls_required=True)
    s.greet()
    assert s.feed(b"MAIL FROM:<a@b.example>\r\n") == (
        b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    )


# --- AUTH (RFC 4954) ----------------------------------------------------------------------------


def _b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def _auth_session(**config: Any) -> Session:
    config.setdefault("auth_mechanisms", ("PLAIN", "LOGIN"))
    config.setdefault("auth_requires_tls", False)
    s = Session(**config)
    s.greet()
    return s


def test_auth_plain_with_initial_response() -> None:
    s = _auth_session()
    out = s.feed(b"AUTH PLAIN " + _b64("\0alice\0secret") + b"\r\n")
    assert out == b"235 2.7.0 done\r\n"
    assert s.events[-1] == AuthCredentials(
        mechanism="PLAIN", authorization_id="", username="alice", password="secret"
    )
    assert s.conn.authenticated_as == "alice"
    assert s.codes(b"AUTH PLAIN " + _b64("\0alice\0secret") + b"\r\n") == [503]


def test_auth_plain_with_empty_challenge() -> None:
    s = _auth_session()
    assert s.feed(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert s.conn.state is SessionState.AUTH
    assert s.feed(_b64("\0alice\0wrong") + b"\r\n") == b"535 5.7.8 nope\r\n"
    assert s.conn.authenticated_as is None and s.conn.state is SessionState.READY


def test_auth_login_exchange() -> None:
    s = _auth_session()
    # C: AUTH LOGIN          S: 334 VXNlcm5hbWU6
    # C: YWxpY2U=            S: 334 UGFzc3dvcmQ6
    # C: c2VjcmV0            S: 235
    assert s.feed(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert s.feed(_b64("alice") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert s.feed(_b64("secret") + b"\r\n") == b"235 2.7.0 done\r\n"


def test_auth_star_cancels() -> None:
    s = _auth_session()
    s.feed(b"AUTH LOGIN\r\n")
    assert s.feed(b"*\r\n") == b"501 5.0.0 Authentication cancelled\r\n"
    assert s.conn.state is SessionState.READY


def test_auth_bad_base64_is_501() -> None:
    s = _auth_session()
    assert s.codes(b"AUTH PLAIN !!!!\r\n") == [501]


def test_auth_unknown_mechanism_is_504() -> None:
    assert _auth_session().codes(b"AUTH CRAM-MD5\r\n") == [504]


def test_auth_only_offered_over_tls_by_default() -> None:
    s = Session(auth_mechanisms=("PLAIN",), starttls=True)
    s.greet()
    assert s.codes(b"AUTH PLAIN " + _b64("\0alice\0secret") + b"\r\n") == [538]


def test_auth_required_refuses_mail_until_authenticated() -> None:
    s = _auth_session(auth_required=True)
    assert s.codes(b"MAIL FROM:<a@b.example>\r\n") == [530]
    s.feed(b"AUTH PLAIN " + _b64("\0alice\0secret") + b"\r\n")
    assert s.codes(b"MAIL FROM:<a@b.example> AUTH=alice@b.example\r\n") == [250]


def test_auth_during_transaction_is_503() -> None:
    s = _auth_session()
    s.feed(b"MAIL FROM:<a@b.example>\r\n")
    assert s.codes(b"AUTH PLAIN\r\n") == [503]


def test_auth_not_configured_is_502() -> None:
    assert Session().codes(b"EHLO c\r\nAUTH PLAIN\r\n") == [250, 502]


def test_success_to_auth_must_be_235() -> None:
    s = _auth_session()
    s.decide = lambda e: None
    s.conn.receive_data(b"AUTH PLAIN " + _b64("\0alice\0secret") + b"\r\n")
    assert isinstance(s.conn.next_event(), AuthCredentials)
    with pytest.raises(LocalProtocolError):
        s.conn.send(Reply(code=250, text="ok"))


# --- LMTP (RFC 2033) ----------------------------------------------------------------------------


def test_lmtp_one_reply_per_recipient_after_data() -> None:
    def decide(e: ServerEvent) -> Reply | list[Reply] | None:
        if isinstance(e, EndOfMessage):
            return [Reply(code=250, text="delivered"), Reply(code=452, text="mailbox full")]
        return accept_all(e)

    s = Session(decide, lmtp=True)
    assert s.codes(b"EHLO c\r\n") == [500]  # RFC 2033: LHLO, not EHLO
    out = s.feed(
        b"LHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@d.example>\r\n"
        b"DATA\r\nhi\r\n.\r\n"
    )
    assert out.endswith(b"250 2.0.0 delivered\r\n452 4.0.0 mailbox full\r\n")
    assert s.conn.state is SessionState.READY


def test_lhlo_is_unknown_in_smtp_mode() -> None:
    assert Session().codes(b"LHLO c\r\n") == [500]


# --- robustness ---------------------------------------------------------------------------------


def test_overlong_command_line_gets_one_500_and_the_session_goes_on() -> None:
    s = Session()
    s.greet()
    out = s.feed(b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n")
    assert out == b"500 5.5.2 Syntax error: line too long\r\n250 2.0.0 OK\r\n"


def test_overlong_line_is_not_buffered() -> None:
    s = Session()
    s.greet()
    for _ in range(100):
        s.feed(b"x" * 10_000)
    assert len(s.conn._buf) < 20_000
    assert s.codes(b"\r\n") == [500]


def test_command_line_limit_is_512_plus_extensions() -> None:
    s = Session()
    s.greet()
    limit = s.conn.config.command_line_limit
    ok = b"NOOP " + b"x" * (limit - 7) + b"\r\n"
    assert len(ok) == limit and s.codes(ok) == [250]
    assert s.codes(b"NOOP " + b"x" * (limit - 6) + b"\r\n") == [500]


def test_bare_lf_in_command_is_rejected() -> None:
    s = Session()
    assert s.feed(b"EHLO c\n") == b"500 5.5.2 Syntax error: bare LF in command\r\n"


@pytest.mark.parametrize("line", [b"EH\x00LO c\r\n", b"NOOP\rNOOP\r\n", b"\r\n"])
def test_control_characters_get_500(line: bytes) -> None:
    assert Session().codes(line) in ([500], [501])


def test_too_many_bad_commands_close_with_421() -> None:
    s = Session(max_bad_commands=3)
    s.conn.receive_data(b"BAD\r\n" * 5)
    with pytest.raises(RemoteProtocolError) as info:
        for _ in range(10):
            s.conn.next_event()
    assert info.value.reply_hint is not None and info.value.reply_hint.code == 421
    assert s.conn.data_to_send().count(b"500 ") == 3
    assert s.conn.state is SessionState.ERROR


def test_http_request_closes_at_once() -> None:
    s = Session()
    s.conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(RemoteProtocolError):
        s.conn.next_event()
    assert s.conn.data_to_send().startswith(b"421 4.7.0")


def test_send_when_nothing_is_owed_is_a_local_error() -> None:
    s = Session()
    with pytest.raises(LocalProtocolError):
        s.conn.send(Reply(code=250, text="ok"))
    assert s.conn.state is SessionState.ERROR


def test_3yz_cannot_answer_a_decision() -> None:
    s = Session(decide=lambda e: None)
    s.conn.receive_data(b"EHLO c\r\n")
    s.conn.next_event()
    with pytest.raises(LocalProtocolError):
        s.conn.send(Reply(code=354, text="no"))


def test_reply_lines_longer_than_512_are_refused() -> None:
    s = Session(decide=lambda e: None)
    s.conn.receive_data(b"EHLO c\r\n")
    s.conn.next_event()
    with pytest.raises(LocalProtocolError):
        s.conn.send(Reply(code=250, text="x" * 600))


def test_application_reply_gets_default_enhanced_code() -> None:
    s = Session(
        decide=lambda e: (
            Reply(code=550, text="no such user") if isinstance(e, RcptTo) else accept_all(e)
        )
    )
    s.greet()
    out = s.feed(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    assert out == b"250 2.1.0 OK\r\n550 5.0.0 no such user\r\n"


def test_enhanced_codes_can_be_disabled() -> None:
    s = Session(enhanced_status_codes=False)
    s.greet()
    assert s.feed(b"NOOP\r\n") == b"250 OK\r\n"


def test_eof_closes_after_pipelined_commands_are_answered() -> None:
    s = Session()
    s.conn.receive_data(b"EHLO c\r\nQUIT\r\n")
    s.conn.receive_eof()
    s.pump()
    assert s.kinds()[-2:] == [Quit, ConnectionClosed]


# --- deadlines (RFC 5321 4.5.3.2) ---------------------------------------------------------------


def test_deadline_is_fixed_while_a_command_trickles_in() -> None:
    conn = ServerConnection(ServerConfig(command_timeout=300), now=0.0)
    conn.send(Reply(code=220, text="hi"), now=0.0)
    assert conn.deadline == 300.0
    for t in range(1, 300, 10):  # slowloris: a byte every 10 s never extends the deadline
        conn.receive_data(b"N", now=float(t))
        assert conn.next_event() is NEED_DATA
    assert conn.deadline == 300.0
    assert not conn.check_timeout(299.0)
    assert conn.check_timeout(300.0)
    assert conn.data_to_send().endswith(b"421 4.4.2 localhost Error: timeout exceeded\r\n")
    assert conn.state is SessionState.CLOSED


def test_no_deadline_while_the_application_decides() -> None:
    conn = ServerConnection(ServerConfig(), now=0.0)
    conn.send(Reply(code=220, text="hi"), now=0.0)
    conn.receive_data(b"EHLO c\r\n", now=5.0)
    assert isinstance(conn.next_event(), Ehlo)
    assert conn.deadline is None
    conn.send(Reply(code=250, text="hi"), now=1000.0)
    assert conn.deadline == 1300.0


def test_deadline_is_none_exactly_while_a_reply_is_owed() -> None:
    conn = ServerConnection(ServerConfig(command_timeout=300), now=0.0)
    seen = []

    def check() -> None:
        seen.append(conn.owes_reply)
        assert (conn.deadline is None) is conn.owes_reply

    check()  # the greeting is owed
    conn.send(Reply(code=220, text="hi"), now=0.0)
    check()
    conn.receive_data(b"EHLO c\r\nNOOP\r\n", now=1.0)
    check()  # received, not yet handed out: the peer's clock still runs
    assert isinstance(conn.next_event(), Ehlo)
    check()
    conn.send(Reply(code=250, text="hi"), now=2.0)
    check()
    assert isinstance(conn.next_event(), Noop)  # answered by the engine: nothing owed
    check()
    assert conn.next_event() is NEED_DATA
    check()
    assert seen == [True, False, False, True, False, False, False]


def test_data_phase_uses_the_data_block_timeout() -> None:
    conn = ServerConnection(ServerConfig(data_timeout=180), now=0.0)
    conn.send(Reply(code=220, text="hi"), now=0.0)
    conn.receive_data(b"EHLO c\r\n", now=1.0)
    conn.next_event()
    conn.send(Reply(code=250, text="hi"), now=1.0)
    conn.receive_data(b"MAIL FROM:<a@b.example>\r\n", now=2.0)
    conn.next_event()
    conn.send(Reply(code=250, text="ok"), now=2.0)
    conn.receive_data(b"RCPT TO:<c@d.example>\r\n", now=3.0)
    conn.next_event()
    conn.send(Reply(code=250, text="ok"), now=3.0)
    conn.receive_data(b"DATA\r\n", now=4.0)
    assert isinstance(conn.next_event(), Data)
    assert conn.deadline == 184.0
    conn.receive_data(b"a line\r\n", now=100.0)
    assert isinstance(conn.next_event(), MessageData)
    assert conn.deadline == 184.0  # 8 octets are not a data block (min_data_progress)
    conn.receive_data((b"x" * 98 + b"\r\n") * 11, now=150.0)
    assert isinstance(conn.next_event(), MessageData)
    assert conn.deadline == 330.0


def test_a_data_trickle_does_not_extend_the_deadline() -> None:
    conn = ServerConnection(ServerConfig(data_timeout=10), now=0.0)
    conn.send(Reply(code=220, text="hi"), now=0.0)
    for line, t in ((b"EHLO c\r\n", 0.0), (b"MAIL FROM:<a@b.example>\r\n", 0.0),
                    (b"RCPT TO:<c@d.example>\r\n", 0.0)):  # fmt: skip
        conn.receive_data(line, now=t)
        conn.next_event()
        conn.send(Reply(code=250, text="ok"), now=t)
    conn.receive_data(b"DATA\r\n", now=0.0)
    conn.next_event()
    for t in range(1, 10):  # 3 octets a second with line ends: never a 1 KiB block
        conn.receive_data(b"a\r\n", now=float(t))
        conn.next_event()
    assert conn.check_timeout(10.0)
    assert conn.data_to_send().endswith(b"421 4.4.2 localhost Error: timeout exceeded\r\n")


def test_no_deadline_without_a_clock() -> None:
    conn = ServerConnection(ServerConfig())
    conn.send(Reply(code=220, text="hi"))
    assert conn.deadline is None and not conn.check_timeout(1e12)


# --- regressions found by the property tests --------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"AUTH PLAIN:\r\n",  # mechanism with ':' made the Auth constructor raise
        b"MAIL FROM:<a@b.example> ENVID=+0D\r\n",  # xtext decoding to CR
        b"MAIL FROM:<a@b.example> AUTH=+00\r\n",  # xtext decoding to NUL
        b"RCPT TO:<a@b.example> ORCPT=rfc822;+0A\r\n",  # xtext decoding to LF
    ],
)
def test_decoded_values_that_events_refuse_get_501(line: bytes) -> None:
    s = Session(auth_mechanisms=("PLAIN",), auth_requires_tls=False)
    s.greet()
    if line.startswith(b"RCPT"):
        s.feed(b"MAIL FROM:<x@y.example>\r\n")
    assert s.codes(line) == [501]


def test_connection_closed_is_reported_once_then_paused() -> None:
    s = Session()
    s.conn.receive_data(b"QUIT\r\n")
    assert isinstance(s.conn.next_event(), Quit)
    assert isinstance(s.conn.next_event(), ConnectionClosed)
    assert s.conn.next_event() is PAUSED
    assert s.conn.next_event() is PAUSED


LMTP_TWO_RECIPIENTS = (
    b"LHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@d.example>\r\n"
)


def test_lmtp_rejected_message_gets_one_reply_per_recipient() -> None:
    # found by the client engine's tests: RFC 2033 4.2 holds for engine rejections too
    s = Session(lmtp=True)
    s.feed(
        b"LHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@d.example>\r\n"
    )
    assert s.codes(b"DATA\r\n" + b"x" * 1200 + b"\r\n.\r\n") == [354, 550, 550]


def test_lmtp_failed_bdat_last_gets_one_reply_per_recipient() -> None:
    s = Session(lmtp=True, max_message_size=1024)
    s.feed(
        b"LHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@d.example>\r\n"
    )
    assert s.codes(b"BDAT 2000 LAST\r\n" + b"x" * 2000) == [552, 552]


def test_sequence_errors_after_failed_pipelined_commands_are_not_bad_commands() -> None:
    s = Session(max_bad_commands=3)
    s.decide = lambda e: Reply(code=550, text="no") if isinstance(e, MailFrom) else accept_all(e)
    s.greet()
    transaction = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
    codes = s.codes(transaction * 10)
    assert codes == [550, 503, 503] * 10
    assert s.conn.state is SessionState.READY


def test_close_queues_an_unsolicited_421_and_ends_the_session() -> None:
    s = Session()
    s.greet()
    s.feed(b"MAIL FROM:<a@b.example>\r\n")
    s.conn.close(Reply(code=421, text="mx.example shutting down"))
    assert s.conn.data_to_send() == b"421 4.0.0 mx.example shutting down\r\n"
    assert s.conn.state is SessionState.CLOSED
    assert isinstance(s.conn.next_event(), ConnectionClosed)
    s.conn.close(Reply(code=421, text="again"))  # already closed: nothing more is sent
    assert s.conn.data_to_send() == b""
    with pytest.raises(LocalProtocolError):
        Session().conn.close(Reply(code=250, text="not a closing reply"))


def test_auth_failures_beyond_the_limit_close_the_session() -> None:
    s = _auth_session(max_auth_failures=2)
    assert s.codes(b"AUTH PLAIN " + _b64("\0alice\0guess1") + b"\r\n") == [535]
    assert s.codes(b"AUTH PLAIN " + _b64("\0alice\0guess2") + b"\r\n") == [535, 421]
    assert s.conn.state is SessionState.CLOSED

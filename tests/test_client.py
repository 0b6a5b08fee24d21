"""Unit tests of ClientConnection (protocol/_client.py), mostly as byte transcripts."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwire.protocol._client import (
    ClientConnection,
    LineNormalizer,
    LoginAuth,
    PlainAuth,
    XOAuth2Auth,
    parse_extensions,
)
from mailwire.protocol._config import ClientConfig
from mailwire.protocol._errors import LocalProtocolError, RemoteProtocolError
from mailwire.protocol._events import (
    NEED_DATA,
    PAUSED,
    Auth,
    AuthResponse,
    Bdat,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfMessage,
    Helo,
    Lhlo,
    MailFrom,
    MessageData,
    Noop,
    Quit,
    RcptTo,
    Reply,
    Rset,
    StartTLS,
    TLSEstablished,
)
from mailwire.protocol._state import SessionState

S = SessionState
ALL_EXTENSIONS = (
    b"250-mx.example Hello client.example\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 1000000\r\n"
    b"250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n"
    b"250-CHUNKING\r\n"
    b"250-BINARYMIME\r\n"
    b"250-DSN\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-STARTTLS\r\n"
    b"250 AUTH PLAIN LOGIN XOAUTH2\r\n"
)
BARE = b"250 mx.example\r\n"
SENDER = MailFrom(address="alice@client.example")
BOB = RcptTo(address="bob@mx.example")
CAROL = RcptTo(address="carol@mx.example")


def state_of(conn: ClientConnection) -> SessionState:
    """The state, read through a call so mypy does not narrow it across calls."""
    return conn.state


def events(conn: ClientConnection) -> list[object]:
    """Every event until NEED_DATA or PAUSED."""
    out: list[object] = []
    while (event := conn.next_event()) not in (NEED_DATA, PAUSED):
        out.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return out


def greeted(
    ehlo_reply: bytes = ALL_EXTENSIONS, *, config: ClientConfig | None = None, tls: bool = False
) -> ClientConnection:
    """A client after the greeting and an accepted EHLO (LHLO in LMTP)."""
    config = config or ClientConfig(local_hostname="client.example")
    conn = ClientConnection(config, tls_active=tls, now=0.0)
    conn.receive_data(b"220 mx.example ESMTP\r\n")
    assert events(conn) == [Reply(code=220, text="mx.example ESMTP")]
    hello = Lhlo if config.lmtp else Ehlo
    conn.send(hello(domain="client.example"))
    assert conn.data_to_send() == f"{hello.__name__.upper()} client.example\r\n".encode()
    conn.receive_data(ehlo_reply)
    [reply] = events(conn)
    assert isinstance(reply, Reply) and reply.code == 250
    assert state_of(conn) is S.READY
    return conn


def open_data(conn: ClientConnection) -> None:
    conn.send(SENDER)
    conn.send(BOB)
    conn.send(Data())
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")
    assert [getattr(e, "code", None) for e in events(conn)] == [250, 250, 354]
    assert state_of(conn) is S.DATA


# --- greeting -----------------------------------------------------------------------------------


def test_greeting_220_opens_the_session_and_yields_a_reply_without_command() -> None:
    conn = ClientConnection(ClientConfig())
    assert state_of(conn) is S.GREETING
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"220 mx.example ESMTP ready\r\n")  # S:
    [reply] = events(conn)
    assert reply == Reply(code=220, text="mx.example ESMTP ready")
    assert isinstance(reply, Reply) and reply.command is None
    assert state_of(conn) is S.HELLO
    assert conn.next_event() is PAUSED  # the application's turn: send EHLO


def test_multi_line_greeting_is_one_reply() -> None:
    conn = ClientConnection(ClientConfig())
    conn.receive_data(
        b"220-mx.example ESMTP\r\n"  # S:
        b"220-no UCE\r\n"  # S:
        b"220 welcome\r\n"  # S:
    )
    assert events(conn) == [Reply(code=220, text="mx.example ESMTP\nno UCE\nwelcome")]
    assert state_of(conn) is S.HELLO


def test_554_greeting_refuses_the_session_and_only_quit_may_follow() -> None:
    conn = ClientConnection(ClientConfig())
    conn.receive_data(b"554 5.7.1 no service for you\r\n")  # S:
    [reply] = events(conn)
    assert isinstance(reply, Reply) and reply.code == 554 and conn.refused
    with pytest.raises(LocalProtocolError, match="refused"):
        conn.send(Ehlo(domain="client.example"))
    assert conn.data_to_send() == b""
    conn.send(Quit())
    assert conn.data_to_send() == b"QUIT\r\n"  # C:
    conn.receive_data(b"221 bye\r\n")  # S:
    assert events(conn) == [Reply(code=221, text="bye"), ConnectionClosed()]
    assert state_of(conn) is S.CLOSED


def test_421_greeting_closes_the_session() -> None:
    conn = ClientConnection(ClientConfig())
    conn.receive_data(b"421 4.3.2 try later\r\n")  # S:
    assert events(conn) == [Reply(code=421, text="4.3.2 try later"), ConnectionClosed()]
    assert state_of(conn) is S.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.send(Ehlo(domain="client.example"))


def test_commands_before_the_greeting_are_refused() -> None:
    conn = ClientConnection(ClientConfig())
    with pytest.raises(LocalProtocolError, match="greeting"):
        conn.send(Ehlo(domain="client.example"))
    assert conn.data_to_send() == b""


def test_greeting_with_a_success_code_other_than_220_is_a_remote_error() -> None:
    conn = ClientConnection(ClientConfig())
    conn.receive_data(b"250 hello\r\n")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert state_of(conn) is S.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


# --- EHLO, HELO fallback, extensions ----------------------------------------------------------


def test_ehlo_reply_extensions_are_parsed() -> None:
    conn = greeted()
    assert set(conn.extensions) == {
        "PIPELINING",
        "SIZE",
        "8BITMIME",
        "SMTPUTF8",
        "CHUNKING",
        "BINARYMIME",
        "DSN",
        "ENHANCEDSTATUSCODES",
        "STARTTLS",
        "AUTH",
    }
    assert conn.max_message_size == 1000000
    assert conn.auth_mechanisms == {"PLAIN", "LOGIN", "XOAUTH2"}
    assert conn.esmtp and conn.has_extension("pipelining")


def test_extension_keywords_are_case_insensitive_and_legacy_auth_merges() -> None:
    reply = Reply(
        code=250,
        text="mx.example\nsize\nAuth login\nAUTH=PLAIN LOGIN\nX-Custom  a b \n8bitmime",
    )
    ext = parse_extensions(reply)
    assert ext == {"SIZE": "", "AUTH": "login PLAIN LOGIN", "X-CUSTOM": "a b", "8BITMIME": ""}
    conn = greeted(b"250-mx.example\r\n250-SIZE\r\n250 AUTH=LOGIN\r\n")
    assert conn.max_message_size is None  # SIZE without a number: no declared limit
    assert conn.auth_mechanisms == {"LOGIN"}


def test_size_zero_means_no_limit() -> None:
    assert greeted(b"250-mx.example\r\n250 SIZE 0\r\n").max_message_size is None


@pytest.mark.parametrize("code", [500, 502])
def test_ehlo_rejected_with_500_or_502_falls_back_to_helo(code: int) -> None:
    conn = ClientConnection(ClientConfig(), now=0.0)
    conn.receive_data(b"220 old.example SMTP\r\n")
    events(conn)
    conn.send(Ehlo(domain="client.example"))
    assert conn.data_to_send() == b"EHLO client.example\r\n"  # C:
    conn.receive_data(f"{code} command not recognized\r\n".encode())  # S:
    [reply] = events(conn)
    assert isinstance(reply, Reply) and reply.code == code
    assert reply.command == Ehlo(domain="client.example")
    assert conn.ehlo_rejected and state_of(conn) is S.HELLO  # not a protocol violation
    conn.send(Helo(domain="client.example"))
    assert conn.data_to_send() == b"HELO client.example\r\n"  # C:
    conn.receive_data(b"250 old.example\r\n")  # S:
    events(conn)
    assert state_of(conn) is S.READY and not conn.esmtp and not conn.ehlo_rejected
    assert dict(conn.extensions) == {}
    with pytest.raises(LocalProtocolError, match="EHLO"):
        conn.send(MailFrom(address="a@client.example", body="8BITMIME"))
    conn.send(SENDER)  # no parameters: fine after HELO
    assert conn.data_to_send() == b"MAIL FROM:<alice@client.example>\r\n"


def test_second_ehlo_replaces_the_extensions() -> None:
    conn = greeted()
    conn.send(Ehlo(domain="client.example"))
    conn.receive_data(b"250-mx.example\r\n250 DSN\r\n")
    events(conn)
    assert dict(conn.extensions) == {"DSN": ""}


# --- reply parsing ------------------------------------------------------------------------------


def test_multi_line_reply_with_enhanced_status_code() -> None:
    conn = greeted()
    conn.send(SENDER)
    conn.receive_data(b"550-5.1.8 sender rejected\r\n550 5.1.8 see https://x.example\r\n")
    [reply] = events(conn)
    assert isinstance(reply, Reply)
    assert reply.lines == ["5.1.8 sender rejected", "5.1.8 see https://x.example"]
    assert reply.enhanced == "5.1.8" and reply.is_permanent
    assert reply.command == SENDER


def test_replies_fed_byte_by_byte_give_the_same_events() -> None:
    conn = greeted()
    conn.send(SENDER)
    conn.send(BOB)
    conn.data_to_send()
    wire = b"250-2.1.0 a\r\n250 2.1.0 b\r\n451 4.3.0 later\r\n"
    got: list[object] = []
    for i in range(len(wire)):
        conn.receive_data(wire[i : i + 1])
        got.extend(events(conn))
    assert got == [Reply(code=250, text="2.1.0 a\n2.1.0 b"), Reply(code=451, text="4.3.0 later")]


def test_a_bare_lf_ends_a_reply_line_too() -> None:
    conn = greeted()
    conn.send(Noop())
    conn.receive_data(b"250 ok\n")
    assert events(conn) == [Reply(code=250, text="ok")]


def test_reply_code_alone_is_a_reply() -> None:
    conn = greeted()
    conn.send(Noop())
    conn.receive_data(b"250\r\n")
    assert events(conn) == [Reply(code=250, text="")]


def test_multi_line_reply_whose_codes_disagree_is_a_remote_error() -> None:
    conn = greeted()
    conn.send(Noop())
    conn.receive_data(b"250-first\r\n251 second\r\n")
    with pytest.raises(RemoteProtocolError, match="code"):
        conn.next_event()
    assert state_of(conn) is S.ERROR


@pytest.mark.parametrize("line", [b"hello\r\n", b"25 x\r\n", b"199 x\r\n", b"250x\r\n"])
def test_malformed_reply_line_is_a_remote_error(line: bytes) -> None:
    conn = greeted()
    conn.send(Noop())
    conn.receive_data(line)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_reply_when_nothing_is_pending_is_a_remote_error() -> None:
    conn = greeted()
    conn.receive_data(b"250 surprise\r\n")
    with pytest.raises(RemoteProtocolError, match="no command"):
        conn.next_event()


def test_unsolicited_421_is_an_event_and_closes_the_session() -> None:
    conn = greeted()
    conn.receive_data(b"421 4.3.2 shutting down\r\n")  # S:
    assert events(conn) == [Reply(code=421, text="4.3.2 shutting down"), ConnectionClosed()]
    assert state_of(conn) is S.CLOSED


def test_421_to_a_pending_command_closes_and_forgets_the_rest() -> None:
    conn = greeted()
    conn.send(SENDER)
    conn.send(BOB)
    conn.receive_data(b"421 4.7.0 too busy\r\n")
    [reply, closed] = events(conn)
    assert isinstance(reply, Reply) and reply.command == SENDER
    assert closed == ConnectionClosed()
    assert conn.pending == () and state_of(conn) is S.CLOSED


def test_over_long_reply_line_is_a_remote_error_even_before_its_end() -> None:
    config = ClientConfig(max_reply_line=512)
    conn = greeted(config=config)
    conn.send(Noop())
    conn.receive_data(b"250 " + b"x" * 600)  # no LF yet: still refused, memory stays bounded
    with pytest.raises(RemoteProtocolError, match="longer"):
        conn.next_event()
    conn = greeted(config=config)
    conn.send(Noop())
    conn.receive_data(b"250 " + b"x" * 507 + b"\r\n")  # 513 octets
    with pytest.raises(RemoteProtocolError, match="longer"):
        conn.next_event()
    conn = greeted(config=config)
    conn.send(Noop())
    conn.receive_data(b"250 " + b"x" * 506 + b"\r\n")  # exactly 512: fine
    assert len(events(conn)) == 1


def test_reply_with_too_many_lines_is_a_remote_error() -> None:
    conn = greeted(b"250-mx.example\r\n250 PIPELINING\r\n", config=ClientConfig(max_reply_lines=3))
    conn.send(Noop())
    conn.receive_data(b"250-a\r\n" * 3)
    with pytest.raises(RemoteProtocolError, match="lines"):
        conn.next_event()


def test_eof_with_commands_pending_closes_the_session() -> None:
    conn = greeted()
    conn.send(SENDER)
    conn.receive_data(b"25")
    conn.receive_eof()
    assert conn.next_event() == ConnectionClosed()
    assert state_of(conn) is S.CLOSED
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"0 ok\r\n")


# --- pipelining ---------------------------------------------------------------------------------


def test_pipelined_envelope_goes_out_in_one_write_and_every_reply_is_correlated() -> None:
    conn = greeted()
    conn.send(SENDER)
    conn.send(BOB)
    conn.send(CAROL)
    conn.send(Data())
    assert conn.pending == (SENDER, BOB, CAROL, Data())
    assert conn.data_to_send() == (
        b"MAIL FROM:<alice@client.example>\r\n"  # C:
        b"RCPT TO:<bob@mx.example>\r\n"  # C:
        b"RCPT TO:<carol@mx.example>\r\n"  # C:
        b"DATA\r\n"  # C:
    )
    conn.receive_data(
        b"250 2.1.0 ok\r\n"  # S:
        b"550 5.1.1 no such user\r\n"  # S:
        b"250 2.1.5 ok\r\n"  # S:
        b"354 go ahead\r\n"  # S:
    )
    replies = events(conn)
    assert [(r.code, r.command) for r in replies if isinstance(r, Reply)] == [
        (250, SENDER),
        (550, BOB),
        (250, CAROL),
        (354, Data()),
    ]
    assert state_of(conn) is S.DATA and conn.accepted_recipients == 1 and not conn.pending


def test_pipelining_is_refused_when_the_server_does_not_offer_it() -> None:
    conn = greeted(b"250 mx.example\r\n")
    conn.send(SENDER)
    with pytest.raises(LocalProtocolError, match="PIPELINING"):
        conn.send(BOB)
    conn.receive_data(b"250 ok\r\n")
    events(conn)
    conn.send(BOB)  # step by step is fine
    assert (
        conn.data_to_send() == b"MAIL FROM:<alice@client.example>\r\nRCPT TO:<bob@mx.example>\r\n"
    )


@pytest.mark.parametrize("first", [Ehlo(domain="c.example"), Noop(), Rset(), Data()])
def test_commands_that_end_a_pipelined_group(first: object) -> None:
    conn = greeted()
    if isinstance(first, Data):
        conn.send(SENDER)
        conn.send(BOB)
    conn.send(first)  # type: ignore[arg-type]
    if isinstance(first, Rset):
        conn.send(SENDER)  # RSET may be followed in the same group (RFC 2920 3.1)
        return
    with pytest.raises(LocalProtocolError):
        conn.send(Noop())


def test_out_of_sequence_command_is_refused_and_changes_nothing() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="READY"):
        conn.send(BOB)
    with pytest.raises(LocalProtocolError):
        conn.send(Data())
    assert conn.data_to_send() == b"" and conn.pending == () and state_of(conn) is S.READY
    conn.send(SENDER)
    with pytest.raises(LocalProtocolError, match="MAIL"):
        conn.send(SENDER)  # nested MAIL, even pipelined


def test_failed_mail_in_a_pipeline_lets_the_client_start_over() -> None:
    conn = greeted()
    conn.send(SENDER)
    conn.send(BOB)
    conn.send(Data())
    conn.receive_data(b"550 5.7.1 no\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
    assert [r.code for r in events(conn) if isinstance(r, Reply)] == [550, 503, 503]
    assert state_of(conn) is S.READY
    conn.send(SENDER)  # the prediction was recomputed from the real state


def test_rset_ends_the_transaction() -> None:
    conn = greeted()
    conn.send(SENDER)
    conn.send(BOB)
    conn.send(Rset())
    conn.send(SENDER)
    conn.receive_data(b"250 ok\r\n250 ok\r\n250 reset\r\n250 ok\r\n")
    events(conn)
    assert state_of(conn) is S.MAIL and conn.accepted_recipients == 0


def test_quit_closes_the_session() -> None:
    conn = greeted()
    conn.send(Quit())
    assert conn.data_to_send() == b"QUIT\r\n"  # C:
    with pytest.raises(LocalProtocolError):
        conn.send(Noop())
    conn.receive_data(b"221 2.0.0 bye\r\n")  # S:
    assert events(conn) == [Reply(code=221, text="2.0.0 bye"), ConnectionClosed()]
    assert state_of(conn) is S.CLOSED


# --- the body -----------------------------------------------------------------------------------


def test_data_body_is_dot_stuffed_normalised_and_terminated() -> None:
    conn = greeted()
    open_data(conn)
    conn.send(MessageData(data=b"Subject: x\n\n.hidden\r\n"))
    conn.send(MessageData(data=b"a\rb\r"))  # bare CR; the last CR may start a CRLF
    conn.send(MessageData(data=b"\n.starts a line\n.."))
    conn.send(EndOfMessage())
    assert conn.data_to_send() == (
        b"Subject: x\r\n"  # C:
        b"\r\n"  # C:
        b"..hidden\r\n"  # C:
        b"a\r\n"  # C:
        b"b\r\n"  # C:
        b"..starts a line\r\n"  # C:
        b"...\r\n"  # C: the content did not end with CRLF: one is added
        b".\r\n"  # C:
    )
    assert conn.pending == (Data(),)
    conn.receive_data(b"250 2.0.0 queued as 42\r\n")  # S:
    [reply] = events(conn)
    assert isinstance(reply, Reply) and reply.command == Data() and reply.code == 250
    assert state_of(conn) is S.READY


def test_empty_body_is_just_the_terminator() -> None:
    conn = greeted()
    open_data(conn)
    conn.send(EndOfMessage())
    assert conn.data_to_send() == b".\r\n"


def test_body_ending_in_a_held_cr_gets_crlf_then_the_terminator() -> None:
    conn = greeted()
    open_data(conn)
    conn.send(MessageData(data=b"x\r"))
    conn.send(EndOfMessage())
    assert conn.data_to_send() == b"x\r\n.\r\n"


def test_a_dot_after_a_chunk_boundary_at_line_start_is_stuffed() -> None:
    conn = greeted()
    open_data(conn)
    conn.send(MessageData(data=b"line\r\n"))
    conn.send(MessageData(data=b"."))
    conn.send(MessageData(data=b"\r\n"))
    conn.send(EndOfMessage())
    assert conn.data_to_send() == b"line\r\n..\r\n.\r\n"


def test_content_outside_data_is_refused() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError):
        conn.send(MessageData(data=b"x"))
    with pytest.raises(LocalProtocolError):
        conn.send(EndOfMessage())
    conn.send(SENDER)
    conn.send(BOB)
    conn.send(Data())
    with pytest.raises(LocalProtocolError, match="354"):
        conn.send(MessageData(data=b"x"))  # not before the 354


def test_final_reply_may_be_pipelined_after_the_end_of_data() -> None:
    conn = greeted()
    open_data(conn)
    conn.send(EndOfMessage())
    conn.send(Rset())  # RFC 2920 allows commands right after the "."
    conn.receive_data(b"250 ok\r\n250 reset\r\n")
    assert [r.command for r in events(conn) if isinstance(r, Reply)] == [Data(), Rset()]
    assert state_of(conn) is S.READY


def test_8bit_content_needs_8bitmime_offered_and_declared() -> None:
    conn = greeted(b"250-mx.example\r\n250 PIPELINING\r\n")
    open_data(conn)
    with pytest.raises(LocalProtocolError, match="8BITMIME"):
        conn.send(MessageData(data="caf\u00e9\r\n".encode()))
    conn = greeted()
    open_data(conn)  # offered, but MAIL did not say BODY=8BITMIME
    with pytest.raises(LocalProtocolError, match="declared"):
        conn.send(MessageData(data="caf\u00e9\r\n".encode()))
    conn = greeted()
    conn.send(MailFrom(address="alice@client.example", body="8BITMIME"))
    conn.send(BOB)
    conn.send(Data())
    conn.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    events(conn)
    conn.send(MessageData(data="caf\u00e9\r\n".encode()))
    assert conn.data_to_send().endswith("caf\u00e9\r\n".encode())


def test_mail_parameters_need_their_extension() -> None:
    conn = greeted(b"250-mx.example\r\n250 PIPELINING\r\n")
    cases = [
        MailFrom(address="a@client.example", size=10),
        MailFrom(address="a@client.example", body="8BITMIME"),
        MailFrom(address="a@client.example", body="BINARYMIME"),
        MailFrom(address="a@client.example", smtputf8=True),
        MailFrom(address="a@client.example", ret="HDRS"),
        MailFrom(address="a@client.example", envid="x"),
        MailFrom(address="a@client.example", auth="<>"),
        MailFrom(address="j\u00f6rg@client.example", smtputf8=False),
    ]
    for mail in cases:
        with pytest.raises(LocalProtocolError):
            conn.send(mail)
    assert conn.data_to_send() == b"" and conn.pending == ()


def test_rcpt_dsn_parameters_and_utf8_addresses_need_their_extension() -> None:
    conn = greeted(b"250-mx.example\r\n250 PIPELINING\r\n")
    conn.send(SENDER)
    with pytest.raises(LocalProtocolError, match="DSN"):
        conn.send(RcptTo(address="b@mx.example", notify=("FAILURE",)))
    with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
        conn.send(RcptTo(address="j\u00f6rg@mx.example"))
    conn = greeted()
    conn.send(MailFrom(address="j\u00f6rg@client.example", smtputf8=True))
    conn.send(
        RcptTo(address="m\u00fcller@mx.example", notify=("SUCCESS", "DELAY"), orcpt="rfc822;b@x")
    )
    assert (
        conn.data_to_send()
        == (
            "MAIL FROM:<j\u00f6rg@client.example> SMTPUTF8\r\n"
            "RCPT TO:<m\u00fcller@mx.example> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b@x\r\n"
        ).encode()
    )


def test_declared_size_over_the_server_limit_is_refused_up_front() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="SIZE"):
        conn.send(MailFrom(address="a@client.example", size=1000001))
    conn.send(MailFrom(address="a@client.example", size=1000000))
    assert conn.data_to_send() == b"MAIL FROM:<a@client.example> SIZE=1000000\r\n"


def test_binarymime_requires_chunking_and_bdat() -> None:
    conn = greeted(b"250-mx.example\r\n250-PIPELINING\r\n250 BINARYMIME\r\n")
    with pytest.raises(LocalProtocolError, match="CHUNKING"):
        conn.send(MailFrom(address="a@client.example", body="BINARYMIME"))
    conn = greeted()
    conn.send(MailFrom(address="a@client.example", body="BINARYMIME"))
    conn.send(BOB)
    with pytest.raises(LocalProtocolError, match="BDAT"):
        conn.send(Data())


# --- BDAT ---------------------------------------------------------------------------------------


def test_bdat_chunks_are_pipelined_and_sent_as_they_are() -> None:
    conn = greeted()
    conn.send(MailFrom(address="a@client.example", body="BINARYMIME"))
    conn.send(BOB)
    conn.send(Bdat(size=5))
    with pytest.raises(LocalProtocolError, match="owed"):
        conn.send(Noop())  # the chunk's octets come first
    conn.send(MessageData(data=b"\x00.\r"))
    with pytest.raises(LocalProtocolError, match="remain"):
        conn.send(MessageData(data=b"abc"))
    conn.send(MessageData(data=b"\n\xff"))
    conn.send(Bdat(size=0, last=True))
    assert conn.data_to_send() == (
        b"MAIL FROM:<a@client.example> BODY=BINARYMIME\r\n"  # C:
        b"RCPT TO:<bob@mx.example>\r\n"  # C:
        b"BDAT 5\r\n\x00.\r\n\xff"  # C: no stuffing, no normalising
        b"BDAT 0 LAST\r\n"  # C:
    )
    conn.receive_data(b"250 ok\r\n250 ok\r\n250 5 octets\r\n")
    events(conn)
    assert state_of(conn) is S.CHUNKING
    conn.receive_data(b"250 2.0.0 queued\r\n")
    [reply] = events(conn)
    assert isinstance(reply, Reply) and reply.command == Bdat(size=0, last=True)
    assert state_of(conn) is S.READY


def test_bdat_needs_chunking() -> None:
    conn = greeted(b"250-mx.example\r\n250 PIPELINING\r\n")
    conn.send(SENDER)
    conn.send(BOB)
    with pytest.raises(LocalProtocolError, match="CHUNKING"):
        conn.send(Bdat(size=1, last=True))


def test_failed_bdat_chunk_ends_the_transaction() -> None:
    conn = greeted()
    conn.send(SENDER)
    conn.send(BOB)
    conn.send(Bdat(size=1))
    conn.send(MessageData(data=b"x"))
    conn.receive_data(b"250 ok\r\n250 ok\r\n552 5.3.4 too big\r\n")
    events(conn)
    assert state_of(conn) is S.READY


# --- STARTTLS -----------------------------------------------------------------------------------


def test_starttls_pauses_for_the_handshake_then_restarts_with_ehlo() -> None:
    conn = greeted()
    conn.send(StartTLS())
    assert conn.data_to_send() == b"STARTTLS\r\n"  # C:
    conn.receive_data(b"220 2.0.0 ready for TLS\r\n")  # S:
    [reply] = events(conn)
    assert isinstance(reply, Reply) and reply.command == StartTLS()
    assert state_of(conn) is S.STARTTLS and conn.next_event() is PAUSED
    with pytest.raises(LocalProtocolError):
        conn.send(Ehlo(domain="client.example"))
    conn.tls_established()
    assert conn.next_event() == TLSEstablished()
    assert state_of(conn) is S.HELLO and conn.tls_active and dict(conn.extensions) == {}
    conn.send(Ehlo(domain="client.example"))
    conn.receive_data(b"250-mx.example\r\n250 AUTH PLAIN\r\n")
    events(conn)
    assert conn.auth_mechanisms == {"PLAIN"} and not conn.has_extension("STARTTLS")
    with pytest.raises(LocalProtocolError):
        conn.send(StartTLS())


def test_replies_injected_after_the_starttls_220_are_a_remote_error() -> None:
    conn = greeted()
    conn.send(StartTLS())
    conn.receive_data(b"220 go\r\n250 injected\r\n")
    with pytest.raises(RemoteProtocolError, match="injection"):
        events(conn)
    conn = greeted()
    conn.send(StartTLS())
    conn.receive_data(b"220 go\r\n")
    events(conn)
    conn.receive_data(b"250 plaintext before the handshake\r\n")
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_starttls_needs_the_extension() -> None:
    conn = greeted(b"250 mx.example\r\n")
    with pytest.raises(LocalProtocolError, match="STARTTLS"):
        conn.send(StartTLS())
    with pytest.raises(LocalProtocolError):
        conn.tls_established()


# --- AUTH ---------------------------------------------------------------------------------------


def test_auth_is_refused_in_clear_text_unless_allowed() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="clear text"):
        conn.send(PlainAuth(username="u", password="p").start())
    conn = greeted(config=ClientConfig(allow_plaintext_auth=True))
    conn.send(PlainAuth(username="u", password="p").start())
    assert conn.data_to_send() == b"AUTH PLAIN AHUAcA==\r\n"


def test_auth_plain_with_initial_response() -> None:
    conn = greeted(tls=True)
    conn.send(PlainAuth(username="alice", password="s3cret").start())
    assert conn.data_to_send() == b"AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n"  # C:
    conn.receive_data(b"235 2.7.0 Authentication successful\r\n")  # S:
    events(conn)
    assert conn.authenticated and state_of(conn) is S.READY
    with pytest.raises(LocalProtocolError, match="already"):
        conn.send(PlainAuth(username="alice", password="s3cret").start())


def test_auth_login_answers_the_challenges() -> None:
    conn = greeted(tls=True)
    sasl = LoginAuth(username="alice", password="s3cret")
    conn.send(sasl.start())
    assert conn.data_to_send() == b"AUTH LOGIN\r\n"  # C:
    conn.receive_data(b"334 VXNlcm5hbWU6\r\n")  # S: "Username:"
    [challenge] = events(conn)
    assert isinstance(challenge, Reply) and state_of(conn) is S.AUTH
    conn.send(sasl.respond(challenge))
    assert conn.data_to_send() == b"YWxpY2U=\r\n"  # C:
    with pytest.raises(LocalProtocolError):
        conn.send(AuthResponse(data="x"))  # one line at a time
    conn.receive_data(b"334 UGFzc3dvcmQ6\r\n")  # S: "Password:"
    [challenge] = events(conn)
    assert isinstance(challenge, Reply)
    conn.send(sasl.respond(challenge))
    assert conn.data_to_send() == b"czNjcmV0\r\n"  # C:
    conn.receive_data(b"235 2.7.0 ok\r\n")  # S:
    events(conn)
    assert conn.authenticated and state_of(conn) is S.READY


def test_auth_xoauth2_failure_challenge_gets_an_empty_response() -> None:
    conn = greeted(tls=True)
    sasl = XOAuth2Auth(username="alice@example.com", token="tok")
    auth = sasl.start()
    expected = base64.b64encode(b"user=alice@example.com\x01auth=Bearer tok\x01\x01").decode()
    assert auth == Auth(mechanism="XOAUTH2", initial_response=expected)
    conn.send(auth)
    conn.data_to_send()
    conn.receive_data(b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n")  # S: base64 JSON error
    [challenge] = events(conn)
    assert isinstance(challenge, Reply)
    conn.send(sasl.respond(challenge))
    assert conn.data_to_send() == b"\r\n"  # C:
    conn.receive_data(b"535 5.7.8 bad token\r\n")  # S:
    events(conn)
    assert not conn.authenticated and state_of(conn) is S.READY


def test_auth_mechanism_must_be_offered() -> None:
    conn = greeted(b"250-mx.example\r\n250 AUTH LOGIN\r\n", tls=True)
    with pytest.raises(LocalProtocolError, match="PLAIN"):
        conn.send(PlainAuth(username="u", password="p").start())


def test_sasl_helpers_validate_their_input() -> None:
    with pytest.raises(LocalProtocolError):
        PlainAuth(username="a\x00b", password="p")
    with pytest.raises(LocalProtocolError):
        XOAuth2Auth(username="a", token="t\x01")
    with pytest.raises(LocalProtocolError):
        PlainAuth(username="a", password="p").respond(Reply(code=250))
    assert "s3cret" not in repr(PlainAuth(username="a", password="s3cret"))
    login = LoginAuth(username="u", password="p")
    login.start()
    assert login.respond(Reply(code=334, text="")) == AuthResponse(data="dQ==")
    assert login.respond(Reply(code=334, text="")) == AuthResponse(data="cA==")
    assert login.respond(Reply(code=334, text="")) == AuthResponse(data="*")


# --- LMTP ---------------------------------------------------------------------------------------


def test_lmtp_gets_one_final_reply_per_accepted_recipient() -> None:
    config = ClientConfig(lmtp=True)
    conn = greeted(b"250-lmtp.example\r\n250 PIPELINING\r\n", config=config)
    with pytest.raises(LocalProtocolError, match="LHLO"):
        conn.send(Ehlo(domain="client.example"))
    dave = RcptTo(address="dave@mx.example")
    conn.send(SENDER)
    conn.send(BOB)
    conn.send(CAROL)
    conn.send(dave)
    conn.send(Data())
    conn.receive_data(b"250 ok\r\n250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n")
    events(conn)
    conn.data_to_send()
    conn.send(MessageData(data=b"hi\r\n"))
    conn.send(EndOfMessage())
    assert conn.pending == (Data(), Data())  # bob and dave
    assert conn.data_to_send() == b"hi\r\n.\r\n"
    conn.receive_data(b"250 2.0.0 bob ok\r\n")  # S:
    events(conn)
    assert state_of(conn) is S.DATA and len(conn.pending) == 1
    conn.receive_data(b"452 4.2.2 dave over quota\r\n")  # S:
    [reply] = events(conn)
    assert isinstance(reply, Reply) and reply.command == Data()
    assert state_of(conn) is S.READY


def test_lmtp_bdat_last_gets_one_reply_per_accepted_recipient() -> None:
    config = ClientConfig(lmtp=True)
    conn = greeted(b"250-lmtp.example\r\n250-PIPELINING\r\n250 CHUNKING\r\n", config=config)
    conn.send(SENDER)
    conn.send(BOB)
    conn.send(CAROL)
    conn.send(Bdat(size=3, last=True))
    conn.send(MessageData(data=b"x\r\n"))
    conn.receive_data(b"250 ok\r\n250 ok\r\n250 ok\r\n250 bob\r\n")
    events(conn)
    assert state_of(conn) is not S.READY and len(conn.pending) == 1
    conn.receive_data(b"250 carol\r\n")
    events(conn)
    assert state_of(conn) is S.READY and not conn.pending


def test_lhlo_is_refused_outside_lmtp() -> None:
    conn = ClientConnection(ClientConfig())
    conn.receive_data(b"220 x\r\n")
    events(conn)
    with pytest.raises(LocalProtocolError, match="LMTP"):
        conn.send(Lhlo(domain="client.example"))


# --- deadlines ----------------------------------------------------------------------------------


def test_deadlines_follow_rfc_5321_section_4_5_3_2() -> None:
    conn = ClientConnection(ClientConfig(), now=100.0)
    assert conn.deadline == 100.0 + 300  # greeting: 5 minutes
    conn.receive_data(b"220 hi\r\n", now=110.0)
    events(conn)
    assert conn.deadline is None  # nothing awaited: the application's turn
    conn.send(Ehlo(domain="c.example"), now=120.0)
    assert conn.deadline == 120.0 + 300
    conn.receive_data(b"250-mx\r\n250 PIPELINING\r\n", now=130.0)
    events(conn)
    conn.send(SENDER, now=140.0)
    conn.send(BOB, now=141.0)
    conn.send(Data(), now=142.0)
    assert conn.deadline == 140.0 + 300  # MAIL: 5 minutes, from when the wait started
    conn.receive_data(b"250 ok\r\n", now=150.0)
    events(conn)
    assert conn.deadline == 150.0 + 300  # RCPT: 5 minutes, from the previous reply
    conn.receive_data(b"250 ok\r\n", now=160.0)
    events(conn)
    assert conn.deadline == 160.0 + 120  # DATA initiation: 2 minutes
    conn.receive_data(b"354 go\r\n", now=170.0)
    events(conn)
    assert conn.deadline == 170.0 + 180  # data block: 3 minutes
    conn.send(MessageData(data=b"x"), now=200.0)
    assert conn.deadline == 200.0 + 180
    conn.send(EndOfMessage(), now=210.0)
    assert conn.deadline == 210.0 + 600  # end of data: 10 minutes
    assert not conn.check_timeout(809.0)
    assert conn.check_timeout(810.0)
    assert conn.timed_out and state_of(conn) is S.CLOSED and conn.deadline is None
    assert conn.next_event() == ConnectionClosed()


def test_bdat_deadlines_and_configured_timeouts() -> None:
    config = ClientConfig(data_block_timeout=7.0, data_end_timeout=9.0, command_timeout=5.0)
    conn = greeted(config=config)
    conn.send(SENDER, now=0.0)
    conn.send(BOB, now=0.0)
    conn.receive_data(b"250 ok\r\n250 ok\r\n", now=1.0)
    events(conn)
    conn.send(Bdat(size=1), now=2.0)
    assert conn.deadline == 2.0 + 7.0
    conn.send(MessageData(data=b"x"), now=3.0)
    conn.receive_data(b"250 ok\r\n", now=4.0)
    events(conn)
    conn.send(Bdat(size=0, last=True), now=5.0)
    assert conn.deadline == 5.0 + 9.0
    conn.receive_data(b"250 ok\r\n", now=6.0)
    events(conn)
    conn.send(Noop(), now=7.0)
    assert conn.deadline == 7.0 + 5.0


def test_no_clock_means_no_deadline() -> None:
    conn = ClientConnection(ClientConfig())
    assert conn.deadline is None and not conn.check_timeout(1e9)


def test_send_failed_moves_to_error() -> None:
    conn = greeted()
    conn.send_failed()
    assert state_of(conn) is S.ERROR
    with pytest.raises(LocalProtocolError):
        conn.send(Noop())


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"local_hostname": ""},
        {"local_hostname": "a b"},
        {"max_reply_line": 100},
        {"max_reply_lines": 0},
        {"bdat_chunk_size": 0},
        {"rcpt_timeout": 0},
        {"data_end_timeout": -1.0},
    ],
)
def test_client_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        ClientConfig(**kwargs)  # type: ignore[arg-type]


# --- properties ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=30), max_size=8))
def test_line_normalizer_output_does_not_depend_on_chunking(chunks: list[bytes]) -> None:
    whole = LineNormalizer()
    expected = whole.feed(b"".join(chunks)) + whole.end()
    pieces = LineNormalizer()
    got = b"".join(pieces.feed(c) for c in chunks) + pieces.end()
    assert got == expected
    assert got.count(b"\r\n") == got.count(b"\n") == got.count(b"\r")
    assert got == b"" or got.endswith(b"\r\n")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_data_stream_never_contains_a_premature_terminator(chunks: list[bytes]) -> None:
    conn = greeted()
    conn.send(MailFrom(address="a@client.example", body="8BITMIME"))
    conn.send(BOB)
    conn.send(Data())
    conn.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    events(conn)
    conn.data_to_send()
    for chunk in chunks:
        conn.send(MessageData(data=chunk))
    conn.send(EndOfMessage())
    wire = b"\r\n" + conn.data_to_send()
    assert wire.endswith(b"\r\n.\r\n")
    assert wire.find(b"\r\n.\r\n") == len(wire) - 5
    assert wire.count(b"\r\n") == wire.count(b"\n") == wire.count(b"\r")


def test_size_with_a_non_ascii_number_is_no_limit() -> None:
    conn = greeted("250-mx.example\r\n250 SIZE \u00b2\r\n".encode())
    assert conn.max_message_size is None


def test_empty_content_outside_data_or_bdat_is_still_refused() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError):
        conn.send(MessageData(data=b""))
    open_data(conn)
    conn.send(MessageData(data=b""))  # a no-op inside DATA
    assert conn.data_to_send() == b""


REPLY_LINE = st.builds(
    lambda code, sep, text, end: f"{code}{sep}{text}".encode() + end,
    st.sampled_from([220, 221, 235, 250, 334, 354, 421, 450, 500, 502, 550, 554, 199, 600]),
    st.sampled_from([" ", "-", "", "x"]),
    st.text(max_size=10),
    st.sampled_from([b"\r\n", b"\n", b"\r", b""]),
)
HOSTILE = st.one_of(st.binary(max_size=300), st.lists(REPLY_LINE, max_size=12).map(b"".join))


@settings(max_examples=300, deadline=None)
@given(HOSTILE, st.integers(1, 20))
def test_hostile_server_bytes_raise_only_remote_protocol_error(wire: bytes, step: int) -> None:
    conn = greeted()
    conn.send(SENDER)
    conn.send(BOB)
    conn.send(Data())
    try:
        for i in range(0, len(wire), step):
            conn.receive_data(wire[i : i + step])
            events(conn)
        conn.receive_eof()
        events(conn)
    except RemoteProtocolError:
        assert state_of(conn) is S.ERROR


def test_envid_and_orcpt_a_server_must_refuse_are_refused_up_front() -> None:
    conn = greeted()
    for envid in ("a\x01b", "\u00e9", "x" * 101, "+" * 34):  # "+" is "+2B" in xtext
        with pytest.raises(LocalProtocolError, match="ENVID"):
            conn.send(MailFrom(address="a@client.example", envid=envid))
    conn.send(MailFrom(address="a@client.example", envid="x" * 100))
    with pytest.raises(LocalProtocolError, match="ORCPT"):
        conn.send(RcptTo(address="b@mx.example", orcpt="rfc822;" + "b" * 500))
    with pytest.raises(LocalProtocolError, match="ORCPT"):
        conn.send(RcptTo(address="b@mx.example", orcpt="rfc822;a\tb"))


def test_command_lines_over_the_rfc_limit_are_refused() -> None:
    conn = greeted()
    with pytest.raises(LocalProtocolError, match="exceeds 512"):
        conn.send(Ehlo(domain="x" * 600))
    assert conn.data_to_send() == b"" and not conn.pending


def test_bdat_refused_before_any_recipient_keeps_the_sender() -> None:
    conn = greeted()
    conn.send(SENDER)
    conn.send(BOB)
    conn.send(Bdat(size=0, last=True))
    conn.receive_data(b"250 ok\r\n550 no bob\r\n554 5.5.1 no valid recipients\r\n")
    events(conn)
    assert state_of(conn) is S.MAIL  # like DATA's 554: RSET (or RCPT) comes next
    conn.send(Rset())


def test_rcpt_parameters_after_helo_are_refused() -> None:
    conn = greeted(b"250 mx.example\r\n")
    conn.send(Helo(domain="client.example"))
    conn.receive_data(b"250 mx.example\r\n")
    events(conn)
    conn.send(SENDER)
    conn.receive_data(b"250 ok\r\n")
    events(conn)
    with pytest.raises(LocalProtocolError, match="EHLO"):
        conn.send(RcptTo(address="b@mx.example", notify=("NEVER",)))


def test_legacy_auth_line_after_the_standard_one_merges() -> None:
    ext = parse_extensions(Reply(code=250, text="mx\nAUTH PLAIN\nAUTH=LOGIN PLAIN"))
    assert ext["AUTH"] == "PLAIN LOGIN"


def test_plain_answers_an_empty_challenge_and_login_tolerates_odd_prompts() -> None:
    plain = PlainAuth(username="u", password="p")
    assert plain.respond(Reply(code=334, text="")) == AuthResponse(data="AHUAcA==")
    login = LoginAuth(username="u", password="p")
    login.start()
    assert login.respond(Reply(code=334, text="not base64!")) == AuthResponse(data="dQ==")


def test_long_sasl_credentials_go_after_an_empty_challenge() -> None:
    conn = greeted(tls=True)
    sasl = XOAuth2Auth(username="alice@example.com", token="t" * 2000)  # a Microsoft-sized token
    auth = sasl.start()
    assert auth == Auth(mechanism="XOAUTH2")  # RFC 4954 4: no initial response over 512
    conn.send(auth)
    assert conn.data_to_send() == b"AUTH XOAUTH2\r\n"  # C:
    conn.receive_data(b"334 \r\n")  # S:
    [challenge] = events(conn)
    assert isinstance(challenge, Reply)
    conn.send(sasl.respond(challenge))
    line = conn.data_to_send()  # C: the token, on a line of its own (up to 12288 octets)
    assert len(line) > 2000 and base64.b64decode(line).startswith(b"user=alice@example.com\x01")
    conn.receive_data(b"235 2.7.0 ok\r\n")  # S:
    events(conn)
    assert conn.authenticated
    plain = PlainAuth(username="u", password="p" * 600)
    assert plain.start().initial_response is None
    first = plain.respond(Reply(code=334))
    assert base64.b64decode(first.data) == b"\x00u\x00" + b"p" * 600
    assert plain.respond(Reply(code=334)) == AuthResponse(data="*")  # no second step


def test_auth_line_over_512_and_sasl_responses_over_12288_are_refused() -> None:
    conn = greeted(tls=True)
    with pytest.raises(LocalProtocolError, match="512"):
        conn.send(Auth(mechanism="PLAIN", initial_response="A" * 600))
    conn.send(Auth(mechanism="LOGIN"))
    conn.receive_data(b"334 VXNlcm5hbWU6\r\n")
    events(conn)
    with pytest.raises(LocalProtocolError, match="12288"):
        conn.send(AuthResponse(data="A" * 12287))
    conn.send(AuthResponse(data="A" * 12286))


def test_connection_closed_is_reported_once_then_paused() -> None:
    # the same contract as the server engine: loops "until NEED_DATA or PAUSED" end
    conn = ClientConnection(ClientConfig(), now=0.0)
    conn.receive_eof()
    assert conn.next_event() == ConnectionClosed()
    assert conn.next_event() is PAUSED
    assert conn.next_event() is PAUSED

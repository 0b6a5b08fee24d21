"""Unit tests of MailTransaction (protocol/_transaction.py): transcripts against a scripted
server, and a few runs against the real server engine."""

from __future__ import annotations

import random

import pytest
from helpers import ConnectionPair, random_splitter
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwire.protocol._client import ClientConnection, LoginAuth, PlainAuth, XOAuth2Auth
from mailwire.protocol._config import ClientConfig, ServerConfig
from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._events import (
    NEED_DATA,
    PAUSED,
    Ehlo,
    EndOfMessage,
    Lhlo,
    MailFrom,
    MessageData,
    RcptTo,
    Reply,
    ServerEvent,
)
from mailwire.protocol._server import ServerConnection
from mailwire.protocol._state import SessionState
from mailwire.protocol._transaction import (
    MailTransaction,
    RecipientResult,
    SessionSetup,
    TransactionResult,
)

S = SessionState
FULL = b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 DSN\r\n"
SENDER = MailFrom(address="alice@client.example")
BOB = RcptTo(address="bob@mx.example")
CAROL = RcptTo(address="carol@mx.example", notify=("FAILURE",))


def greeted(ehlo_reply: bytes = FULL, config: ClientConfig | None = None) -> ClientConnection:
    config = config or ClientConfig()
    conn = ClientConnection(config, now=0.0)
    conn.receive_data(b"220 mx.example\r\n")
    conn.next_event()
    conn.send(Lhlo(domain="c.example") if config.lmtp else Ehlo(domain="c.example"))
    conn.data_to_send()
    conn.receive_data(ehlo_reply)
    while conn.next_event() not in (NEED_DATA, PAUSED):
        pass
    assert conn.state is S.READY
    return conn


# --- pipelined ----------------------------------------------------------------------------------


def test_pipelined_envelope_in_one_write_with_a_partial_recipient_failure() -> None:
    conn = greeted()
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB, CAROL], body=[b"Hi\n", b".\n"])
    assert tx.data_to_send() == (
        b"MAIL FROM:<alice@client.example>\r\n"  # C:
        b"RCPT TO:<bob@mx.example>\r\n"  # C:
        b"RCPT TO:<carol@mx.example> NOTIFY=FAILURE\r\n"  # C:
        b"DATA\r\n"  # C:
    )
    assert not tx.wants_body
    tx.receive_data(b"250 2.1.0 ok\r\n550 5.1.1 no bob\r\n250 2.1.5 ok\r\n354 go\r\n")  # S:
    assert tx.wants_body
    assert tx.data_to_send() == b"Hi\r\n"  # C: one chunk per call
    assert tx.data_to_send() == b"..\r\n"  # C:
    assert tx.data_to_send() == b".\r\n"  # C:
    assert tx.data_to_send() == b""
    assert not tx.done
    tx.receive_data(b"250 2.0.0 queued\r\n")  # S:
    assert tx.done
    result = tx.result
    assert result.mail == Reply(code=250, text="2.1.0 ok")
    assert [r.accepted for r in result.recipients] == [False, True]
    assert result.recipients[0].reply == Reply(code=550, text="5.1.1 no bob")
    assert result.recipients[0].final is None
    assert result.recipients[1].final == Reply(code=250, text="2.0.0 queued")
    assert result.delivered == (CAROL,) and not result.ok and result.error is None
    assert [r.command for r in result.rejected] == [BOB]
    assert conn.state is S.READY


def test_pipelined_transaction_with_no_recipient_accepted_resets() -> None:
    conn = greeted()
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB], body=[b"x"])
    tx.data_to_send()
    tx.receive_data(b"250 ok\r\n550 no\r\n554 5.5.1 no valid recipients\r\n")  # S:
    assert tx.data_to_send() == b"RSET\r\n"  # C:
    assert not tx.done
    tx.receive_data(b"250 reset\r\n")  # S:
    assert tx.done and conn.state is S.READY
    result = tx.result
    assert result.data == Reply(code=554, text="5.5.1 no valid recipients")
    assert result.delivered == () and not result.ok


def test_354_despite_no_accepted_recipient_gets_an_empty_message() -> None:
    conn = greeted()
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB], body=[b"secret"])
    tx.data_to_send()
    tx.receive_data(b"250 ok\r\n550 no\r\n354 go anyway\r\n")
    assert tx.data_to_send() == b".\r\n"  # RFC 2920 3.1: a single dot, not the content
    tx.receive_data(b"554 no valid recipients\r\n")
    assert tx.done and tx.result.delivered == ()


def test_refused_mail_ends_the_transaction_without_rset() -> None:
    conn = greeted()
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB], body=[b"x"])
    tx.data_to_send()
    tx.receive_data(b"550 5.7.1 go away\r\n503 need MAIL\r\n503 need MAIL\r\n")
    assert tx.done and tx.data_to_send() == b""
    assert tx.result.mail is not None and tx.result.mail.code == 550
    assert conn.state is S.READY


# --- step by step ---------------------------------------------------------------------------------


def test_without_pipelining_commands_go_one_at_a_time() -> None:
    conn = greeted(b"250-mx.example\r\n250 8BITMIME\r\n")
    tx = MailTransaction(
        conn,
        sender=SENDER,
        recipients=[BOB, CAROL.__class__(address="c@mx.example")],
        body=[b"x\n"],
    )
    assert tx.data_to_send() == b"MAIL FROM:<alice@client.example>\r\n"  # C:
    tx.receive_data(b"250 ok\r\n")  # S:
    assert tx.data_to_send() == b"RCPT TO:<bob@mx.example>\r\n"  # C:
    tx.receive_data(b"250 ok\r\n")  # S:
    assert tx.data_to_send() == b"RCPT TO:<c@mx.example>\r\n"  # C:
    tx.receive_data(b"250 ok\r\n")  # S:
    assert tx.data_to_send() == b"DATA\r\n"  # C:
    tx.receive_data(b"354 go\r\n")  # S:
    assert tx.data_to_send() == b"x\r\n"
    assert tx.data_to_send() == b".\r\n"
    tx.receive_data(b"250 queued\r\n")
    assert tx.done and tx.result.ok


def test_without_pipelining_data_is_skipped_when_nobody_was_accepted() -> None:
    conn = greeted(b"250 mx.example\r\n")
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB], body=[b"x"])
    assert tx.data_to_send() == b"MAIL FROM:<alice@client.example>\r\n"
    tx.receive_data(b"250 ok\r\n")
    assert tx.data_to_send() == b"RCPT TO:<bob@mx.example>\r\n"
    tx.receive_data(b"450 4.2.1 try later\r\n")
    assert tx.data_to_send() == b"RSET\r\n"  # C: no DATA
    tx.receive_data(b"250 ok\r\n")
    assert tx.done and tx.result.data is None
    assert tx.result.recipients[0].reply == Reply(code=450, text="4.2.1 try later")


def test_without_pipelining_refused_mail_sends_no_rcpt() -> None:
    # found by the delivery agent's property test: the queued RCPT used to be sent after a
    # refused MAIL, and the engine raised LocalProtocolError (RCPT is not legal in READY)
    conn = greeted(b"250 mx.example\r\n")
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB], body=[b"x"])
    assert tx.data_to_send() == b"MAIL FROM:<alice@client.example>\r\n"  # C:
    tx.receive_data(b"550 5.7.1 not you\r\n")  # S:
    assert tx.data_to_send() == b""  # C: nothing: no RCPT, no RSET needed
    assert tx.done and not tx.result.ok
    assert tx.result.recipients[0].reply is None


# --- before anything is sent ------------------------------------------------------------------


def test_declared_size_over_the_limit_fails_before_sending_anything() -> None:
    conn = greeted()
    tx = MailTransaction(
        conn, sender=MailFrom(address="a@client.example", size=1001), recipients=[BOB], body=[]
    )
    assert tx.done and tx.data_to_send() == b""
    assert tx.result.error is not None and "1001" in tx.result.error
    assert tx.result.mail is None and not tx.result.ok


def test_envelope_needing_an_extension_that_is_not_offered_is_refused() -> None:
    conn = greeted(b"250-mx.example\r\n250 PIPELINING\r\n")
    with pytest.raises(LocalProtocolError, match="8BITMIME"):
        MailTransaction(
            conn, sender=MailFrom(address="a@c.example", body="8BITMIME"), recipients=[BOB]
        )
    with pytest.raises(LocalProtocolError, match="CHUNKING"):
        MailTransaction(conn, sender=SENDER, recipients=[BOB], use_bdat=True)
    with pytest.raises(LocalProtocolError, match="DSN"):
        MailTransaction(conn, sender=SENDER, recipients=[CAROL])
    with pytest.raises(LocalProtocolError, match="recipient"):
        MailTransaction(conn, sender=SENDER, recipients=[])


def test_binarymime_cannot_use_data() -> None:
    conn = greeted(b"250-mx.example\r\n250-CHUNKING\r\n250 BINARYMIME\r\n")
    with pytest.raises(LocalProtocolError, match="BDAT"):
        MailTransaction(
            conn, sender=MailFrom(address="a@c.example", body="BINARYMIME"), recipients=[BOB],
            use_bdat=False,
        )  # fmt: skip


def test_a_session_left_inside_a_transaction_is_reset_first() -> None:
    conn = greeted()
    conn.send(SENDER)
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n")
    conn.next_event()
    assert conn.state is S.MAIL
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB], body=[b""])
    assert tx.data_to_send().startswith(b"RSET\r\nMAIL FROM:")
    tx.receive_data(b"250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert tx.data_to_send() == b".\r\n"
    tx.receive_data(b"250 ok\r\n")
    assert tx.done and tx.result.ok


# --- BDAT -----------------------------------------------------------------------------------------


def test_bdat_collects_chunks_and_ends_with_last() -> None:
    conn = greeted(
        b"250-mx.example\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
        ClientConfig(bdat_chunk_size=8),
    )
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB], body=[b"abc\n", b"def\n", b"g"])
    assert tx.data_to_send() == b"MAIL FROM:<alice@client.example>\r\nRCPT TO:<bob@mx.example>\r\n"
    assert tx.data_to_send() == b""  # waits for the RCPT replies before any content
    tx.receive_data(b"250 ok\r\n250 ok\r\n")
    assert tx.wants_body
    assert tx.data_to_send() == b"BDAT 10\r\nabc\r\ndef\r\n"  # C: normalised, >= 8 octets
    assert tx.data_to_send() == b"BDAT 3 LAST\r\ng\r\n"  # C: final CRLF added
    tx.receive_data(b"250 10 octets\r\n250 2.0.0 queued\r\n")
    assert tx.done and tx.result.ok
    assert tx.result.data == Reply(code=250, text="2.0.0 queued")


def test_failed_bdat_chunk_stops_the_content() -> None:
    conn = greeted(b"250-mx.example\r\n250 CHUNKING\r\n", ClientConfig(bdat_chunk_size=4))
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB], body=[b"12345\r\n", b"more\r\n"])
    tx.data_to_send()
    tx.receive_data(b"250 ok\r\n")
    tx.data_to_send()
    tx.receive_data(b"250 ok\r\n")
    assert tx.data_to_send() == b"BDAT 7\r\n12345\r\n"
    assert tx.data_to_send() == b""  # no PIPELINING: wait for the chunk's reply
    tx.receive_data(b"552 5.3.4 too big\r\n")
    assert tx.done and tx.result.data == Reply(code=552, text="5.3.4 too big")
    assert tx.result.delivered == () and conn.state is S.READY


# --- LMTP and ends ------------------------------------------------------------------------------


def test_lmtp_reports_each_recipient_final_reply() -> None:
    conn = greeted(b"250-lmtp.example\r\n250 PIPELINING\r\n", ClientConfig(lmtp=True))
    dave = RcptTo(address="dave@mx.example")
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB, dave], body=[b"hi\r\n"])
    tx.data_to_send()
    tx.receive_data(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert tx.data_to_send() == b"hi\r\n"
    assert tx.data_to_send() == b".\r\n"
    tx.receive_data(b"250 2.0.0 bob delivered\r\n")
    assert not tx.done
    tx.receive_data(b"552 5.2.2 dave over quota\r\n")
    assert tx.done
    result = tx.result
    assert result.data is None
    assert [r.final for r in result.recipients] == [
        Reply(code=250, text="2.0.0 bob delivered"),
        Reply(code=552, text="5.2.2 dave over quota"),
    ]
    assert result.delivered == (BOB,)


def test_421_ends_the_transaction_with_an_error() -> None:
    conn = greeted()
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB], body=[b"x"])
    tx.data_to_send()
    tx.receive_data(b"250 ok\r\n421 4.3.2 shutting down\r\n")
    assert tx.done and tx.result.error is not None and "421" in tx.result.error
    assert tx.result.recipients[0].reply == Reply(code=421, text="4.3.2 shutting down")


def test_connection_closed_ends_the_transaction() -> None:
    conn = greeted()
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB], body=[b"x"])
    tx.data_to_send()
    tx.receive_eof()
    assert tx.done and tx.result.error == "connection closed by the server"
    assert conn.next_event() is PAUSED  # the transaction already consumed ConnectionClosed


def test_timeout_ends_the_transaction() -> None:
    conn = greeted()
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB], body=[b"x"], now=10.0)
    tx.data_to_send()
    assert tx.deadline == 10.0 + 300
    assert not tx.check_timeout(309.0)
    assert tx.check_timeout(310.0)
    assert tx.done and tx.result.error is not None and "timeout" in tx.result.error
    assert tx.deadline is None


def test_manual_body_feeding_and_misuse() -> None:
    conn = greeted()
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB])
    with pytest.raises(LocalProtocolError):
        tx.send_body(b"too early")
    tx.data_to_send()
    tx.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    tx.send_body(b"line")
    tx.end_body()
    with pytest.raises(LocalProtocolError):
        tx.end_body()
    assert tx.data_to_send() == b"line\r\n.\r\n"
    tx.receive_data(b"250 ok\r\n")
    assert tx.result == TransactionResult(
        mail=Reply(code=250, text="ok"),
        recipients=(
            RecipientResult(
                command=BOB, reply=Reply(code=250, text="ok"), final=Reply(code=250, text="ok")
            ),
        ),
        data=Reply(code=250, text="ok"),
    )


def test_transaction_needs_a_ready_session() -> None:
    conn = ClientConnection(ClientConfig())
    with pytest.raises(LocalProtocolError, match="GREETING"):
        MailTransaction(conn, sender=SENDER, recipients=[BOB])


# --- against the server engine ------------------------------------------------------------------


def reject_carol(server: ServerConnection, event: ServerEvent) -> Reply | None:
    if isinstance(event, RcptTo) and event.address.startswith("carol"):
        return Reply(code=550, text="5.1.1 no carol")
    if isinstance(event, EndOfMessage):
        return Reply(code=250, text="2.0.0 queued")
    return Reply(code=250, text="mx.example" if isinstance(event, Ehlo) else "OK")


@settings(max_examples=50, deadline=None)
@given(
    rng=st.randoms(use_true_random=False),
    pipelining=st.booleans(),
    chunking=st.booleans(),
    body=st.lists(st.binary(max_size=100).map(lambda b: b.replace(b"\x00", b"")), max_size=4),
)
def test_two_transactions_on_one_connection_against_the_server_engine(
    rng: random.Random, pipelining: bool, chunking: bool, body: list[bytes]
) -> None:
    pair = ConnectionPair(
        server_config=ServerConfig(
            hostname="mx.example", pipelining=pipelining, chunking=chunking,
            binarymime=chunking, max_line_length=None,
        ),
        server_app=reject_carol,
        split=random_splitter(rng),
    )  # fmt: skip
    pair.run()
    pair.send(Ehlo(domain="client.example"))
    pair.run()
    sender = MailFrom(address="alice@client.example", body="8BITMIME")
    for recipients in ([BOB, CAROL], [CAROL]):
        tx = MailTransaction(pair.client, sender=sender, recipients=recipients, body=body)
        while not tx.done:
            out = tx.data_to_send()
            if out:
                for piece in pair.split(out):
                    pair.server.receive_data(piece)
                    pair._drain_server()
                continue
            pair._drain_server()
            data = pair.server.data_to_send()
            assert data
            for piece in pair.split(data):
                tx.receive_data(piece)
        result = tx.result
        assert result.error is None
        expected = tuple(r for r in recipients if r is not CAROL)
        assert result.delivered == expected
        assert pair.client.state is S.READY and pair.server.state is S.READY
    received = [e for e in pair.server_events if isinstance(e, (MessageData, EndOfMessage))]
    assert sum(isinstance(e, EndOfMessage) for e in received) == 1  # second one had nobody


# --- SessionSetup ---------------------------------------------------------------------------------


def test_setup_greeting_then_ehlo() -> None:
    conn = ClientConnection(ClientConfig(local_hostname="client.example"))
    setup = SessionSetup(conn)
    assert setup.data_to_send() == b""
    setup.receive_data(b"220 mx.example ESMTP\r\n")  # S:
    assert setup.data_to_send() == b"EHLO client.example\r\n"  # C:
    setup.receive_data(b"250-mx.example\r\n250 PIPELINING\r\n")  # S:
    assert setup.done and setup.result.ok
    assert setup.result.greeting == Reply(code=220, text="mx.example ESMTP")
    assert conn.state is S.READY and conn.has_extension("PIPELINING")


def test_setup_falls_back_to_helo() -> None:
    conn = ClientConnection(ClientConfig(local_hostname="client.example"))
    setup = SessionSetup(conn)
    setup.receive_data(b"220 old.example\r\n")
    assert setup.data_to_send() == b"EHLO client.example\r\n"  # C:
    setup.receive_data(b"502 5.5.1 what?\r\n")  # S:
    assert setup.data_to_send() == b"HELO client.example\r\n"  # C:
    setup.receive_data(b"250 old.example\r\n")  # S:
    assert setup.done and setup.result.ok and not conn.esmtp


def test_setup_refused_greeting_fails() -> None:
    setup = SessionSetup(ClientConnection(ClientConfig()))
    setup.receive_data(b"554 5.7.1 go away\r\n")
    assert setup.done and not setup.result.ok
    assert setup.result.reply == Reply(code=554, text="5.7.1 go away")
    setup = SessionSetup(ClientConnection(ClientConfig()))
    setup.receive_data(b"421 busy\r\n")
    assert setup.done and setup.result.error is not None and "421" in setup.result.error


def test_setup_starttls_then_auth() -> None:
    conn = ClientConnection(ClientConfig(local_hostname="client.example"))
    setup = SessionSetup(conn, sasl=PlainAuth(username="alice", password="pw"))
    setup.receive_data(b"220 mx.example\r\n")
    setup.data_to_send()
    setup.receive_data(b"250-mx.example\r\n250-STARTTLS\r\n250 AUTH LOGIN\r\n")
    assert setup.data_to_send() == b"STARTTLS\r\n"  # C: before any AUTH
    assert not setup.wants_tls
    setup.receive_data(b"220 go ahead\r\n")  # S:
    assert setup.wants_tls and not setup.done
    setup.tls_established()
    assert setup.data_to_send() == b"EHLO client.example\r\n"  # C: again, over TLS
    setup.receive_data(b"250-mx.example\r\n250 AUTH PLAIN LOGIN\r\n")  # S:
    assert setup.data_to_send() == b"AUTH PLAIN AGFsaWNlAHB3\r\n"  # C:
    setup.receive_data(b"235 2.7.0 ok\r\n")  # S:
    assert setup.done and setup.result.ok and conn.authenticated and conn.tls_active


def test_setup_auth_login_failure_is_reported() -> None:
    conn = ClientConnection(ClientConfig(), tls_active=True)
    setup = SessionSetup(conn, sasl=LoginAuth(username="u", password="p"))
    setup.receive_data(b"220 mx\r\n")
    setup.receive_data(b"250-mx\r\n250 AUTH LOGIN\r\n")
    assert setup.data_to_send().endswith(b"AUTH LOGIN\r\n")
    setup.receive_data(b"334 VXNlcm5hbWU6\r\n")
    assert setup.data_to_send() == b"dQ==\r\n"
    setup.receive_data(b"334 UGFzc3dvcmQ6\r\n")
    assert setup.data_to_send() == b"cA==\r\n"
    setup.receive_data(b"535 5.7.8 bad credentials\r\n")
    assert setup.done and setup.result.reply == Reply(code=535, text="5.7.8 bad credentials")
    assert setup.result.error == "authentication failed"


def test_setup_required_starttls_missing_or_refused_fails() -> None:
    setup = SessionSetup(ClientConnection(ClientConfig()), starttls=True)
    setup.receive_data(b"220 mx\r\n250 mx\r\n")
    assert setup.done and setup.result.error == "the server does not offer STARTTLS"
    setup = SessionSetup(ClientConnection(ClientConfig()), starttls=True)
    setup.receive_data(b"220 mx\r\n250-mx\r\n250 STARTTLS\r\n454 4.7.0 TLS not available\r\n")
    assert setup.done and setup.result.error == "STARTTLS refused"


def test_setup_opportunistic_starttls_refused_carries_on_but_never_auths_in_clear() -> None:
    conn = ClientConnection(ClientConfig())
    setup = SessionSetup(conn, sasl=PlainAuth(username="u", password="p"))
    setup.receive_data(b"220 mx\r\n250-mx\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n")
    setup.receive_data(b"454 4.7.0 TLS not available\r\n")
    assert setup.done and setup.result.error is not None and "not encrypted" in setup.result.error
    assert b"AUTH" not in setup.data_to_send()
    setup = SessionSetup(ClientConnection(ClientConfig()), starttls=False)
    setup.receive_data(b"220 mx\r\n250-mx\r\n250 STARTTLS\r\n")
    assert setup.done and setup.result.ok


def test_setup_then_transaction_against_the_server_engine() -> None:
    pair = ConnectionPair(
        server_config=ServerConfig(
            hostname="mx.example", starttls=True, auth_mechanisms=("PLAIN", "LOGIN")
        )
    )
    setup = SessionSetup(pair.client, sasl=LoginAuth(username="alice", password="pw"))
    for _ in range(20):
        if setup.done:
            break
        if setup.wants_tls:
            pair.server.tls_established()
            setup.tls_established()
        out = setup.data_to_send()
        if out:
            pair.server.receive_data(out)
        pair._drain_server()
        setup.receive_data(pair.server.data_to_send())
    assert setup.result.ok, setup.result
    assert pair.server.tls_active and pair.server.authenticated_as == "alice"


def test_unsolicited_421_between_replies_ends_the_transaction() -> None:
    conn = greeted()
    tx = MailTransaction(conn, sender=SENDER, recipients=[BOB], body=[b"x"])
    tx.data_to_send()
    tx.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n421 4.3.2 shutting down now\r\n")
    assert tx.done and tx.result.error is not None and "421" in tx.result.error
    assert conn.state is S.CLOSED and not tx.result.delivered


def test_setup_eof_timeout_and_missing_mechanism() -> None:
    setup = SessionSetup(ClientConnection(ClientConfig(), now=0.0), now=0.0)
    assert setup.deadline == 300.0
    assert setup.check_timeout(300.0)
    assert setup.done and setup.result.error == "timeout waiting for the server"
    setup = SessionSetup(ClientConnection(ClientConfig()))
    setup.receive_eof()
    assert setup.done and setup.result.error == "connection closed by the server"
    setup = SessionSetup(
        ClientConnection(ClientConfig(), tls_active=True), sasl=XOAuth2Auth(username="u", token="t")
    )
    setup.receive_data(b"220 mx\r\n250-mx\r\n250 AUTH PLAIN\r\n")
    assert setup.done and setup.result.error == "the server does not offer AUTH XOAUTH2"
    setup = SessionSetup(ClientConnection(ClientConfig()))
    setup.receive_data(b"220 mx\r\n451 4.3.0 try later\r\n")
    assert setup.done and setup.result.error == "EHLO refused"
    with pytest.raises(LocalProtocolError):
        SessionSetup(setup.conn)

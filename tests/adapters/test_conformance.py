"""One set of SMTP dialogues over real loopback sockets, run against every runtime adapter
(asyncio, trio, threads) with real clients: smtplib, aiosmtplib, swaks and raw sockets."""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from email.message import EmailMessage
from typing import Any

import aiosmtplib
import pytest
import trio
from conftest import CLIENT_TIMEOUT, Inbox, Serve

from mailwire.adapters._driver import Handler, Session
from mailwire.protocol import AuthCredentials, RcptTo, Reply, ServerConfig

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\n.leading dot\r\nbody\r\n"


class Raw:
    """A raw-socket SMTP client reading replies line by line."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock: socket.socket = socket.create_connection(address, timeout=CLIENT_TIMEOUT)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed; unread {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, str]:
        """The next reply: (code, text with lines joined by newlines)."""
        lines = []
        while True:
            line = self._line()
            lines.append(line[4:].decode())
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def expect(self, code: int) -> str:
        got, text = self.reply()
        assert got == code, text
        return text

    def closed(self) -> bool:
        """True if the server closed the connection with nothing more to read."""
        return not self.buf and self.sock.recv(1) == b""

    def starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.buf == b""
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def greet_over_tls(self, ctx: ssl.SSLContext) -> None:
        """Greeting, EHLO, STARTTLS, the handshake: ready for EHLO inside TLS."""
        self.expect(220)
        self.send(b"EHLO c.test\r\n")
        self.expect(250)
        self.send(b"STARTTLS\r\n")
        self.expect(220)
        self.starttls(ctx)

    def close(self) -> None:
        self.sock.close()


def smtp(address: tuple[str, int]) -> smtplib.SMTP:
    return smtplib.SMTP(address[0], address[1], timeout=CLIENT_TIMEOUT)


# --- plain SMTP ------------------------------------------------------------------------------


def test_smtplib_delivers_message_with_envelope(serve: Serve) -> None:
    inbox = Inbox()
    server = serve(inbox)
    with smtp(server.addresses[0]) as client:
        refused = client.sendmail("a@example.org", ["b@example.net", "c@example.net"], MESSAGE)
    assert refused == {}
    [(data, envelope)] = inbox.messages
    assert data == MESSAGE  # dot-unstuffed exactly
    assert envelope.sender is not None and envelope.sender.address == "a@example.org"
    assert [r.address for r in envelope.recipients] == ["b@example.net", "c@example.net"]


def test_ehlo_advertises_configured_extensions(serve: Serve) -> None:
    server = serve(config=ServerConfig(hostname="mx.test", max_message_size=12345))
    with smtp(server.addresses[0]) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        assert client.has_extn("pipelining") and client.esmtp_features["size"] == "12345"
        assert not client.has_extn("starttls")


def test_pipelined_commands_are_answered_in_order(serve: Serve) -> None:
    inbox = Inbox()
    server = serve(inbox)
    raw = Raw(server.addresses[0])
    raw.expect(220)
    raw.send(
        b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
        b"RCPT TO:<bad address>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
    )
    raw.expect(250)
    assert raw.expect(250).startswith("2.1.0")
    assert raw.expect(250).startswith("2.1.5")
    assert raw.reply()[0] == 501
    raw.expect(250)
    raw.expect(354)
    raw.send(b"Subject: x\r\n\r\n..dot\r\n.\r\nNOOP\r\nQUIT\r\n")
    raw.expect(250)
    raw.expect(250)
    raw.expect(221)
    assert raw.closed()
    raw.close()
    [(data, envelope)] = inbox.messages
    assert data == b"Subject: x\r\n\r\n.dot\r\n"
    assert len(envelope.recipients) == 2


def test_smtplib_sendmail_pipelined_many_messages_on_one_connection(serve: Serve) -> None:
    inbox = Inbox()
    server = serve(inbox)
    with smtp(server.addresses[0]) as client:
        for i in range(20):
            client.sendmail("a@example.org", [f"r{i}@example.net"], MESSAGE)
    assert len(inbox.messages) == 20
    assert [env.recipients[0].address for _, env in inbox.messages][-1] == "r19@example.net"


def test_bdat_chunking_delivers_message(serve: Serve) -> None:
    inbox = Inbox()
    server = serve(inbox)
    raw = Raw(server.addresses[0])
    raw.expect(220)
    raw.send(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    for code in (250, 250, 250):
        raw.expect(code)
    raw.send(b"BDAT 5\r\nhelloBDAT 7 LAST\r\n world\n")
    raw.expect(250)
    raw.expect(250)
    raw.close()
    assert inbox.messages[0][0] == b"hello world\n"


def test_aiosmtplib_send_message(serve: Serve) -> None:
    inbox = Inbox()
    server = serve(inbox)
    message = EmailMessage()
    message["From"] = "a@example.org"
    message["To"] = "b@example.net"
    message["Subject"] = "aiosmtplib"
    message.set_content("hello\n.\nworld\n")
    host, port = server.addresses[0]
    errors, _ = asyncio.run(
        aiosmtplib.send(message, hostname=host, port=port, timeout=CLIENT_TIMEOUT)
    )
    assert errors == {}
    [(data, _)] = inbox.messages
    assert b"Subject: aiosmtplib" in data and b"\r\n.\r\nworld\r\n" in data


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_sends_message_with_pipelining(serve: Serve) -> None:
    inbox = Inbox()
    server = serve(inbox)
    host, port = server.addresses[0]
    result = subprocess.run(
        ["swaks", "--server", host, "--port", str(port), "--from", "a@example.org",
         "--to", "b@example.net,c@example.net", "--pipeline", "--body", "via swaks"],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    [(data, envelope)] = inbox.messages
    assert b"via swaks" in data and len(envelope.recipients) == 2


def _swaks_has_tls() -> bool:
    if shutil.which("swaks") is None:
        return False
    out = subprocess.run(["swaks", "--support"], capture_output=True, text=True, check=False)
    return "=== TLS supported" in out.stdout + out.stderr


@pytest.mark.skipif(not _swaks_has_tls(), reason="swaks without TLS (needs Net::SSLeay)")
def test_swaks_starttls(serve: Serve, server_tls: ssl.SSLContext) -> None:
    inbox = Inbox()
    config = ServerConfig(hostname="mx.test", starttls=True)
    server = serve(inbox, config, tls_context=server_tls)
    host, port = server.addresses[0]
    result = subprocess.run(
        ["swaks", "--server", host, "--port", str(port), "--from", "a@example.org",
         "--to", "b@example.net", "--tls", "--body", "over tls"],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"over tls" in inbox.messages[0][0]


def test_ipv4_and_ipv6_listen_addresses(serve: Serve) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback")
    inbox = Inbox()
    server = serve(inbox, listen=[("127.0.0.1", 0), ("::1", 0)])
    assert [a[0] for a in server.addresses] == ["127.0.0.1", "::1"]
    for address in server.addresses:
        with smtp(address) as client:
            client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    assert len(inbox.messages) == 2


# --- security: smuggling and STARTTLS injection ----------------------------------------------


def test_smuggled_end_of_data_with_bare_lf_is_rejected_not_executed(serve: Serve) -> None:
    inbox = Inbox()
    server = serve(inbox)
    raw = Raw(server.addresses[0])
    raw.expect(220)
    raw.send(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    for code in (250, 250, 250, 354):
        raw.expect(code)
    raw.send(
        b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<victim@example.net>\n"
        b"DATA\nsmuggled\r\n.\r\n"
    )
    assert raw.reply()[0] == 550
    raw.send(b"QUIT\r\n")
    raw.expect(221)
    raw.close()
    assert inbox.messages == []
    assert inbox.aborted == 1


def test_commands_pipelined_after_starttls_are_never_executed(
    serve: Serve, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    inbox = Inbox()
    config = ServerConfig(hostname="mx.test", starttls=True)
    server = serve(inbox, config, tls_context=server_tls)
    raw = Raw(server.addresses[0])
    raw.expect(220)
    raw.send(b"EHLO c.test\r\n")
    raw.expect(250)
    raw.send(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.net>\r\n")
    raw.expect(220)
    raw.starttls(client_tls)
    raw.send(b"EHLO c.test\r\n")
    assert "STARTTLS" not in raw.expect(250)  # the first reply after the handshake
    raw.send(b"RCPT TO:<b@example.net>\r\n")
    assert raw.reply()[0] == 503  # no MAIL was executed: the injected one was dropped
    raw.send(b"QUIT\r\n")
    raw.expect(221)
    raw.close()


# --- TLS and AUTH ----------------------------------------------------------------------------


class Tracker(Inbox):
    """Records the sessions' TLS and AUTH state when each message arrives."""

    def __init__(self, password: str = "secret") -> None:
        super().__init__()
        self.password = password
        self.seen: list[tuple[bool, str | None]] = []

    def on_auth(self, session: Session, event: AuthCredentials) -> Reply | None:
        if event.username == "user" and event.password == self.password:
            return Reply(code=235, text="Authentication succeeded")
        return None

    def on_message_end(self, session: Session) -> Any:
        self.seen.append((session.tls, session.authenticated_as))
        return super().on_message_end(session)


def test_starttls_with_verified_certificate(
    serve: Serve, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    handler = Tracker()
    config = ServerConfig(hostname="mx.test", starttls=True, tls_required=True)
    server = serve(handler, config, tls_context=server_tls)
    with smtp(server.addresses[0]) as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        assert refused.value.smtp_code == 530
        client.starttls(context=client_tls)
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    assert handler.seen == [(True, None)]


def test_implicit_tls_with_smtp_ssl(
    serve: Serve, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    handler = Tracker()
    server = serve(handler, tls_context=server_tls, implicit_tls=True)
    host, port = server.addresses[0]
    with smtplib.SMTP_SSL(
        "localhost", port, context=client_tls, timeout=CLIENT_TIMEOUT, source_address=(host, 0)
    ) as client:
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    assert handler.seen == [(True, None)]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_submission_requires_auth_over_tls(
    serve: Serve, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext, mechanism: str
) -> None:
    handler = Tracker()
    config = ServerConfig(
        hostname="mx.test",
        starttls=True,
        auth_mechanisms=("PLAIN", "LOGIN"),
        auth_required=True,
    )
    server = serve(handler, config, tls_context=server_tls)
    with smtp(server.addresses[0]) as client:
        client.ehlo()
        assert not client.has_extn("auth")  # RFC 4954 4: not offered in clear text
        client.starttls(context=client_tls)
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        assert refused.value.smtp_code == 530
        client.user, client.password = "user", "wrong"
        authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        with pytest.raises(smtplib.SMTPAuthenticationError) as denied:
            client.auth(mechanism, authobject)
        assert denied.value.smtp_code == 535
        client.user, client.password = "user", "secret"
        code, _ = client.auth(mechanism, authobject)
        assert code == 235
        client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    assert handler.seen == [(True, "user")]


# --- limits ----------------------------------------------------------------------------------


def test_connections_beyond_the_limit_get_421(serve: Serve) -> None:
    server = serve(max_connections=1)
    first = Raw(server.addresses[0])
    first.expect(220)
    second = Raw(server.addresses[0])
    text = second.expect(421)
    assert text.startswith("4.7.0")
    assert second.closed()
    second.close()
    first.send(b"QUIT\r\n")
    first.expect(221)
    first.close()


def test_idle_client_gets_421_after_command_timeout(serve: Serve) -> None:
    server = serve(config=ServerConfig(hostname="mx.test", command_timeout=0.2))
    raw = Raw(server.addresses[0])
    raw.expect(220)
    raw.send(b"EHLO c.test\r\n")
    raw.expect(250)
    assert raw.expect(421).startswith("4.4.2")
    assert raw.closed()
    raw.close()


def test_stalled_data_gets_421_after_data_timeout(serve: Serve) -> None:
    inbox = Inbox()
    config = ServerConfig(hostname="mx.test", command_timeout=30, data_timeout=0.2)
    server = serve(inbox, config)
    raw = Raw(server.addresses[0])
    raw.expect(220)
    raw.send(b"HELO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    for code in (250, 250, 250, 354):
        raw.expect(code)
    raw.send(b"Subject: partial\r\n")
    assert raw.expect(421).startswith("4.4.2")
    assert raw.closed()
    raw.close()
    assert inbox.messages == []


class _BusyHandler(Handler):
    """Accepts everything; each recipient costs a millisecond of CPU, so woken sessions
    queue behind each other."""

    def __init__(self) -> None:
        self.stored = 0
        self.lock = threading.Lock()

    def on_rcpt_to(self, session: Session, event: RcptTo) -> None:
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass

    def on_message_end(self, session: Session) -> None:
        with self.lock:
            self.stored += 1


def test_busy_tls_sessions_outlive_their_timeouts(
    serve: Serve, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    # Sessions sending messages back to back over TLS for several times both timeouts: every
    # reply restarts the engine's deadline, so nothing may time out -- not a read and not a
    # reply.  (A trio scope left early by the data phase's shorter deadline expired while its
    # session waited to run, and cancelled the next TLS write: "timeout in write".)
    handler = _BusyHandler()
    config = ServerConfig(hostname="mx.test", starttls=True, command_timeout=0.4, data_timeout=0.2)
    server = serve(handler, config, tls_context=server_tls)
    counts: list[int] = []
    errors: list[BaseException] = []

    def session() -> None:
        try:
            raw = Raw(server.addresses[0])
            raw.greet_over_tls(client_tls)
            raw.send(b"EHLO c.test\r\n")
            raw.expect(250)
            sent = 0
            stop = time.monotonic() + 1.5
            while time.monotonic() < stop:
                raw.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
                raw.expect(250)
                raw.expect(250)
                raw.send(b"DATA\r\n")
                raw.expect(354)
                raw.send(b"Subject: busy\r\n\r\nbody\r\n.\r\n")
                raw.expect(250)
                sent += 1
            raw.send(b"QUIT\r\n")
            raw.expect(221)
            raw.close()
            counts.append(sent)
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=session) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT + 5)
    assert not errors, errors[:3]
    assert len(counts) == 8 and min(counts) > 5
    assert handler.stored == sum(counts)


class _LoopBlocker(Handler):
    """A recipient "block@..." blocks the handler's caller (trio's event loop) for ``block``
    seconds; each end of message is an await (a checkpoint that is not a read)."""

    def __init__(self, block: float) -> None:
        self.block = block
        self.stored = 0

    def on_rcpt_to(self, session: Session, event: RcptTo) -> None:
        if event.address.startswith("block@"):
            time.sleep(self.block)  # the event loop is busy with another session

    async def on_message_end(self, session: Session) -> None:  # type: ignore[override]
        await trio.sleep(0)
        self.stored += 1


@pytest.mark.parametrize("runtime", ["trio"], indirect=True)
def test_trio_scope_expiring_while_the_loop_is_busy_does_not_end_the_session(
    serve: Serve,
) -> None:
    # The session's CancelScope may expire up to `slack` (here 0.4 s) before the engine's
    # deadline.  If that happens while the final "." is waiting for a busy loop, trio used to
    # deliver the cancel at the next checkpoint -- the handler's await -- and the session
    # ended although its time had not run out (with a spool: after the commit).
    # Times: DATA at ~0; the body at 0.35 restarts the engine's data deadline (4.35), not
    # the scope's (~4.0); another session blocks the loop from 3.5 to 4.15; "." at 3.9.
    handler = _LoopBlocker(block=0.65)
    config = ServerConfig(hostname="mx.test", command_timeout=4.0, data_timeout=4.0)
    server = serve(handler, config)
    start = time.monotonic()

    def at(t: float) -> None:
        select.select([], [], [], max(0.0, start + t - time.monotonic()))

    victim = Raw(server.addresses[0])
    victim.expect(220)
    victim.send(b"HELO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    victim.send(b"DATA\r\n")
    for code in (250, 250, 250, 354):
        victim.expect(code)
    at(0.35)
    victim.send(b"Subject: x\r\n\r\nbody\r\n")
    blocker = Raw(server.addresses[0])
    blocker.expect(220)
    blocker.send(b"HELO c.test\r\nMAIL FROM:<a@example.org>\r\n")
    blocker.expect(250)
    blocker.expect(250)
    at(3.5)
    blocker.send(b"RCPT TO:<block@example.net>\r\n")
    at(3.9)
    victim.send(b".\r\n")
    assert victim.reply()[0] == 250
    assert handler.stored == 1
    blocker.expect(250)
    for raw in (victim, blocker):
        raw.send(b"QUIT\r\n")
        raw.expect(221)
        raw.close()


def test_a_slow_tls_handshake_does_not_use_up_the_next_commands_time(
    serve: Serve, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    config = ServerConfig(hostname="mx.test", starttls=True, command_timeout=1.0)
    server = serve(Inbox(), config, tls_context=server_tls)
    raw = Raw(server.addresses[0])
    raw.expect(220)
    raw.send(b"EHLO c.test\r\nSTARTTLS\r\n")
    raw.expect(250)
    raw.expect(220)
    select.select([], [], [], 0.6)  # the client takes its time to start the handshake
    raw.starttls(client_tls)
    select.select([], [], [], 0.6)  # 1.2 s after the 220, 0.6 s after the handshake
    raw.send(b"EHLO c.test\r\n")
    raw.expect(250)
    raw.send(b"QUIT\r\n")
    raw.expect(221)
    raw.close()


def test_stalled_data_after_starttls_gets_421_after_data_timeout(
    serve: Serve, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    # the handshake has its own deadline; the data phase's shorter one must still apply
    inbox = Inbox()
    config = ServerConfig(hostname="mx.test", starttls=True, command_timeout=30, data_timeout=0.2)
    server = serve(inbox, config, tls_context=server_tls)
    raw = Raw(server.addresses[0])
    raw.greet_over_tls(client_tls)
    raw.send(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    for code in (250, 250, 250, 354):
        raw.expect(code)
    raw.send(b"Subject: partial\r\n")
    assert raw.expect(421).startswith("4.4.2")
    raw.close()
    assert inbox.messages == []


def test_data_phase_outlives_a_shorter_command_timeout(serve: Serve) -> None:
    """The data phase has its own deadline: a body that pauses for longer than command_timeout
    is still taken, and the command deadline applies again after its reply."""
    inbox = Inbox()
    config = ServerConfig(hostname="mx.test", command_timeout=0.2, data_timeout=30)
    server = serve(inbox, config)
    raw = Raw(server.addresses[0])
    raw.expect(220)
    raw.send(b"HELO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    for code in (250, 250, 250, 354):
        raw.expect(code)
    raw.send(b"Subject: slow\r\n")
    ready, _, _ = select.select([raw.sock], [], [], 0.6)  # three command timeouts, silent
    assert not ready, raw.reply()
    raw.send(b"\r\nbody\r\n.\r\n")
    raw.expect(250)
    assert raw.expect(421).startswith("4.4.2")  # idle between transactions: command timeout
    assert raw.closed()
    raw.close()
    assert [m[0] for m in inbox.messages] == [b"Subject: slow\r\n\r\nbody\r\n"]


def test_message_over_size_limit_gets_552(serve: Serve) -> None:
    inbox = Inbox()
    server = serve(inbox, ServerConfig(hostname="mx.test", max_message_size=1000))
    with smtp(server.addresses[0]) as client:
        client.ehlo()
        client.mail("a@example.org")  # no SIZE= declared: caught at the end of the data
        client.rcpt("b@example.net")
        code, _ = client.data(b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n")
        assert code == 552
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:  # declared SIZE=
            client.sendmail("a@example.org", ["b@example.net"], b"z" * 2000)
        assert refused.value.smtp_code == 552
        client.sendmail("a@example.org", ["b@example.net"], b"small\r\n")
    assert [m[0] for m in inbox.messages] == [b"small\r\n"]


def test_recipients_beyond_limit_get_452(serve: Serve) -> None:
    inbox = Inbox()
    server = serve(inbox, ServerConfig(hostname="mx.test", max_recipients=100))
    with smtp(server.addresses[0]) as client:
        client.ehlo()
        client.mail("a@example.org")
        codes = [client.rcpt(f"r{i}@example.net")[0] for i in range(101)]
        assert codes == [250] * 100 + [452]
        assert client.data(MESSAGE)[0] == 250
    assert len(inbox.messages[0][1].recipients) == 100


# --- LMTP and handlers -----------------------------------------------------------------------


class PerRecipient(Inbox):
    def on_message_end(self, session: Session) -> Any:
        super().on_message_end(session)
        return [
            Reply(code=550, text="5.1.1 Mailbox full")
            if r.address.startswith("full")
            else Reply(code=250, text=f"2.0.0 delivered to {r.address}")
            for r in session.envelope.recipients
        ]


def test_lmtp_gives_one_reply_per_recipient(serve: Serve) -> None:
    inbox = PerRecipient()
    server = serve(inbox, ServerConfig(hostname="mx.test", lmtp=True))
    raw = Raw(server.addresses[0])
    raw.expect(220)
    raw.send(b"EHLO c.test\r\n")
    assert raw.reply()[0] == 500  # LMTP speaks LHLO only
    raw.send(b"LHLO c.test\r\nMAIL FROM:<a@example.org>\r\n")
    raw.send(b"RCPT TO:<one@example.net>\r\nRCPT TO:<full@example.net>\r\nDATA\r\n")
    for code in (250, 250, 250, 250, 354):
        raw.expect(code)
    raw.send(b"Subject: lmtp\r\n\r\nbody\r\n.\r\n")
    assert raw.expect(250) == "2.0.0 delivered to one@example.net"
    assert raw.expect(550) == "5.1.1 Mailbox full"
    raw.send(b"QUIT\r\n")
    raw.expect(221)
    raw.close()


def _pause(runtime: str) -> Any:
    """An awaitable that really yields to the runtime's scheduler."""
    return asyncio.sleep(0) if runtime == "asyncio" else trio.sleep(0)


class Policy(Handler):
    """Rejects recipients at example.com; sync or async methods."""

    def __init__(self, runtime: str, use_async: bool) -> None:
        self.runtime, self.use_async = runtime, use_async
        self.data: list[bytes] = []

    def _decide(self, event: RcptTo) -> Reply | None:
        if event.address.endswith("@example.com"):
            return Reply(code=550, text="5.7.1 Relaying denied")
        return None

    def on_rcpt_to(self, session: Session, event: RcptTo) -> Any:
        if not self.use_async:
            return self._decide(event)

        async def decide() -> Reply | None:
            await _pause(self.runtime)
            return self._decide(event)

        return decide()

    def on_message_data(self, session: Session, data: bytes) -> Any:
        if not self.use_async:
            self.data.append(data)
            return None

        async def store() -> None:
            await _pause(self.runtime)
            self.data.append(data)

        return store()


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_handler_methods_sync_and_async(serve: Serve, runtime: str, use_async: bool) -> None:
    if use_async and runtime == "threads":
        pytest.skip("handlers are plain functions on threads")
    handler = Policy(runtime, use_async)
    server = serve(handler)
    with smtp(server.addresses[0]) as client:
        refused = client.sendmail("a@example.org", ["b@example.net", "c@example.com"], MESSAGE)
    assert refused == {"c@example.com": (550, b"5.7.1 Relaying denied")}
    assert b"".join(handler.data) == MESSAGE


class Broken(Inbox):
    def on_message_end(self, session: Session) -> Any:
        raise RuntimeError("disk on fire")


def test_handler_exception_answers_451_and_session_continues(serve: Serve) -> None:
    server = serve(Broken())
    with smtp(server.addresses[0]) as client:
        with pytest.raises(smtplib.SMTPDataError) as failed:
            client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        assert failed.value.smtp_code == 451
        assert client.noop()[0] == 250


# --- graceful shutdown -----------------------------------------------------------------------


def _stop_in_background(server: Any, grace: float) -> threading.Thread:
    thread = threading.Thread(target=server.stop, kwargs={"grace": grace})
    thread.start()
    return thread


def _start_transaction(raw: Raw) -> None:
    raw.expect(220)
    raw.send(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    for code in (250, 250, 250):
        raw.expect(code)


def test_shutdown_lets_transaction_finish_and_closes_idle_sessions(serve: Serve) -> None:
    inbox = Inbox()
    server = serve(inbox)
    busy, idle = Raw(server.addresses[0]), Raw(server.addresses[0])
    _start_transaction(busy)
    idle.expect(220)
    idle.send(b"EHLO c.test\r\n")
    idle.expect(250)
    stopper = _stop_in_background(server, grace=30)
    assert idle.expect(421).startswith("4.3.2")  # idle: closed at once
    assert idle.closed()
    busy.send(b"DATA\r\n")
    busy.expect(354)
    busy.send(MESSAGE + b".\r\n")
    busy.expect(250)  # the transaction in progress completes...
    assert busy.expect(421).startswith("4.3.2")  # ...then the session is closed
    assert busy.closed()
    stopper.join(CLIENT_TIMEOUT)
    assert not stopper.is_alive()
    assert len(inbox.messages) == 1
    with pytest.raises(OSError):
        Raw(server.addresses[0]).expect(220)  # no longer accepting
    busy.close()
    idle.close()


def test_shutdown_closes_transactions_that_outlast_the_grace_period(serve: Serve) -> None:
    inbox = Inbox()
    server = serve(inbox)
    raw = Raw(server.addresses[0])
    _start_transaction(raw)
    stopper = _stop_in_background(server, grace=0.2)
    assert raw.expect(421).startswith("4.3.2")
    assert raw.closed()
    stopper.join(CLIENT_TIMEOUT)
    assert not stopper.is_alive()
    assert inbox.messages == []
    raw.close()


def test_shutdown_sends_421_inside_tls_session(
    serve: Serve, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    config = ServerConfig(hostname="mx.test", starttls=True)
    server = serve(Inbox(), config, tls_context=server_tls)
    raw = Raw(server.addresses[0])
    raw.greet_over_tls(client_tls)
    raw.send(b"EHLO c.test\r\n")
    raw.expect(250)
    stopper = _stop_in_background(server, grace=30)
    assert raw.expect(421).startswith("4.3.2")  # read through TLS: the layer stayed intact
    stopper.join(CLIENT_TIMEOUT)
    assert not stopper.is_alive()
    raw.close()


def test_asyncio_adapter_runs_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    from mailwire.adapters import asyncio as asyncio_adapter
    from mailwire.adapters._driver import bind

    inbox = Inbox()
    sock = bind([("127.0.0.1", 0)])[0]
    address = sock.getsockname()
    started = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        state["loop"] = asyncio.get_running_loop()
        state["task"] = asyncio.current_task()
        started.set()
        await asyncio_adapter.serve(inbox, ServerConfig(hostname="mx.test"), sockets=[sock])

    def run() -> None:
        try:
            uvloop.run(main())
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert started.wait(CLIENT_TIMEOUT)
        with smtp(address) as client:
            client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        assert inbox.messages[0][0] == MESSAGE
        assert type(state["loop"]).__module__.startswith("uvloop")
    finally:
        state["loop"].call_soon_threadsafe(state["task"].cancel)
        thread.join(CLIENT_TIMEOUT)
        sock.close()
    assert not thread.is_alive()


def test_commands_before_a_half_close_are_all_answered(serve: Serve) -> None:
    inbox = Inbox()
    server = serve(inbox)
    raw = Raw(server.addresses[0])
    raw.expect(220)
    raw.send(
        b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        b"Subject: eof\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    )
    raw.sock.shutdown(socket.SHUT_WR)  # the client is done sending, still reading
    for code in (250, 250, 250, 354, 250, 221):
        raw.expect(code)
    assert raw.closed()
    raw.close()
    assert inbox.messages[0][0] == b"Subject: eof\r\n\r\nbody\r\n"


class Gate(Inbox):
    """Holds the first chunk of message data until the test opens the gate."""

    def __init__(self, runtime: str) -> None:
        super().__init__()
        self.runtime = runtime
        self.open = threading.Event()
        self.entered = threading.Event()

    def on_message_data(self, session: Session, data: bytes) -> Any:
        self.entered.set()
        if self.runtime == "threads":
            self.open.wait(CLIENT_TIMEOUT)
            return super().on_message_data(session, data)

        async def held() -> None:
            while not self.open.is_set():  # the test thread opens it
                await (asyncio.sleep(0.01) if self.runtime == "asyncio" else trio.sleep(0.01))
            super(Gate, self).on_message_data(session, data)

        return held()


def test_slow_handler_pushes_back_on_a_fast_client(serve: Serve, runtime: str) -> None:
    import select

    handler = Gate(runtime)
    server = serve(handler, ServerConfig(hostname="mx.test", max_message_size=0))
    raw = Raw(server.addresses[0])
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    _start_transaction(raw)
    raw.send(b"DATA\r\n")
    raw.expect(354)
    line = b"x" * 98 + b"\r\n"
    block = line * 10000  # 1 MB
    limit, sent = 64 * len(block), 0
    raw.sock.setblocking(False)
    while sent < limit:
        if not select.select([], [raw.sock], [], 1.0)[1]:
            break  # the client cannot send: the server stopped reading
        try:
            sent += raw.sock.send(block)
        except BlockingIOError:
            pass
    assert handler.entered.is_set()
    assert sent < limit // 2, f"the server kept reading {sent} bytes past a stalled handler"
    handler.open.set()
    raw.sock.setblocking(True)
    raw.sock.settimeout(CLIENT_TIMEOUT)
    rest = len(block) - sent % len(block)  # finish the block in progress
    raw.send(block[len(block) - rest :] + b".\r\n")
    raw.expect(250)
    raw.close()
    [(data, _)] = handler.messages
    assert len(data) == sent + rest and data.endswith(line)


# --- threads: session threads share one CPU ------------------------------------------------


class _Affinity(Handler):
    def __init__(self) -> None:
        self.seen: list[set[int]] = []

    def on_message_end(self, session: Session) -> Reply:
        self.seen.append(os.sched_getaffinity(0))  # the session's own thread
        return Reply(code=250, text="2.0.0 ok")


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs a process allowed on two CPUs or more",
)
@pytest.mark.parametrize("pin", [True, False])
def test_threads_sessions_share_one_cpu_unless_told_not_to(pin: bool) -> None:
    from mailwire.adapters import threads

    handler = _Affinity()
    config = ServerConfig(hostname="mx.test")
    with threads.Controller(handler, config, pin_sessions=pin) as server:
        for _ in range(3):
            with smtp(server.addresses[0]) as client:
                client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
    assert len(handler.seen) == 3
    if pin:
        assert len(handler.seen[0]) == 1
        assert handler.seen[0] <= os.sched_getaffinity(0)
        assert all(cpus == handler.seen[0] for cpus in handler.seen)
    else:
        assert all(cpus == os.sched_getaffinity(0) for cpus in handler.seen)

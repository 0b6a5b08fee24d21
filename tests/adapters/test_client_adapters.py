"""send_message() on asyncio, trio and threads against aiosmtpd, an independent server: plain,
STARTTLS and implicit TLS with a trustme CA, certificate verification on by default, AUTH,
envelope from headers (Bcc removed), 8BITMIME/SMTPUTF8/SIZE, partial refusal, timeouts."""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from typing import Any

import pytest
import trio
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailwire.adapters import _client_asyncio, _client_threads, _client_trio
from mailwire.adapters._client_driver import SendError, SendResult, prepare
from mailwire.protocol._events import MailFrom, RcptTo

RUNTIMES = ["asyncio", "trio", "threads"]


def send(runtime: str, message: EmailMessage | bytes, **kwargs: Any) -> SendResult:
    """Run the runtime's send_message to completion from synchronous test code."""
    kwargs.setdefault("local_hostname", "client.test")
    kwargs.setdefault("timeout", 10.0)
    if runtime == "asyncio":
        return asyncio.run(_client_asyncio.send_message(message, **kwargs))
    if runtime == "trio":
        return trio.run(functools.partial(_client_trio.send_message, message, **kwargs))
    return _client_threads.send_message(message, **kwargs)


class Recorder:
    """aiosmtpd handler: records envelopes; refuses recipients starting with 'bad'."""

    def __init__(self) -> None:
        self.envelopes: list[Any] = []
        self.sessions: list[Any] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("bad"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        self.sessions.append(session)
        return "250 2.0.0 queued"


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Start = Callable[..., tuple[Recorder, int]]


@pytest.fixture
def aiosmtpd_server() -> Iterator[Start]:
    """start(**smtp_options) -> (recorder, port); stopped at teardown."""
    controllers: list[Controller] = []

    def start(**options: Any) -> tuple[Recorder, int]:
        recorder = Recorder()
        port = _free_port()
        controller = Controller(recorder, hostname="127.0.0.1", port=port, **options)
        controller.start()
        controllers.append(controller)
        return recorder, port

    yield start
    for controller in controllers:
        controller.stop()


def authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        b"alice",
        b"s3cret",
    )
    return AuthResult(success=ok, handled=False)


def message(**headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Alice <alice@example.org>"
    msg["To"] = "bob@example.net, Carol <carol@example.net>"
    for name, value in headers.items():
        msg[name] = value
    msg["Subject"] = "hello"
    msg.set_content("Hello Bob.\n.leading dot\n")
    return msg


def test_envelope_comes_from_headers_and_bcc_is_not_sent(
    runtime: str, aiosmtpd_server: Start
) -> None:
    recorder, port = aiosmtpd_server()
    result = send(
        runtime,
        message(Cc="dave@example.net", Bcc="eve@example.net"),
        host="127.0.0.1",
        port=port,
        tls="none",
    )
    assert result.ok
    assert set(result.delivered) == {
        "bob@example.net",
        "carol@example.net",
        "dave@example.net",
        "eve@example.net",
    }
    (env,) = recorder.envelopes
    assert env.mail_from == "alice@example.org"
    assert sorted(env.rcpt_tos) == sorted(result.delivered)
    assert b"eve@example.net" not in env.original_content
    assert b"\r\n..leading dot" not in env.original_content  # un-stuffed by the server
    assert b"\r\n.leading dot\r\n" in env.original_content
    assert f"SIZE={len(env.original_content)}" in env.mail_options


def test_bytes_with_8bit_content_declares_8bitmime(runtime: str, aiosmtpd_server: Start) -> None:
    recorder, port = aiosmtpd_server()
    content = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()
    result = send(
        runtime,
        content,
        host="127.0.0.1",
        port=port,
        tls="none",
        sender="a@example.org",
        recipients=["b@example.net"],
    )
    assert result.delivered == ("b@example.net",)
    (env,) = recorder.envelopes
    assert "BODY=8BITMIME" in env.mail_options
    assert env.original_content == content


def test_international_address_uses_smtputf8(runtime: str, aiosmtpd_server: Start) -> None:
    recorder, port = aiosmtpd_server(enable_SMTPUTF8=True)
    result = send(
        runtime,
        message(),
        host="127.0.0.1",
        port=port,
        tls="none",
        sender="j\u00f6rg@example.org",
        recipients=["b@example.net"],
    )
    assert result.ok
    assert "SMTPUTF8" in recorder.envelopes[0].mail_options


def test_dsn_parameters_pass_through(runtime: str, aiosmtpd_server: Start) -> None:
    # aiosmtpd does not offer DSN: the client engine refuses to send the parameters
    _, port = aiosmtpd_server()
    with pytest.raises(SendError) as info:
        send(
            runtime,
            message(),
            host="127.0.0.1",
            port=port,
            tls="none",
            sender=MailFrom(address="a@example.org", ret="HDRS"),
            recipients=[RcptTo(address="b@example.net", notify=("FAILURE",))],
        )
    assert "cannot send this message" in str(info.value)


def test_some_recipients_refused(runtime: str, aiosmtpd_server: Start) -> None:
    recorder, port = aiosmtpd_server()
    result = send(
        runtime,
        message(),
        host="127.0.0.1",
        port=port,
        tls="none",
        recipients=["good@example.net", "bad@example.net"],
    )
    assert result.delivered == ("good@example.net",)
    rejected = result.rejected["bad@example.net"]
    assert rejected is not None and rejected.code == 550
    assert not result.ok


def test_all_recipients_refused_raises(runtime: str, aiosmtpd_server: Start) -> None:
    recorder, port = aiosmtpd_server()
    with pytest.raises(SendError) as info:
        send(
            runtime,
            message(),
            host="127.0.0.1",
            port=port,
            tls="none",
            recipients=["bad1@example.net", "bad2@example.net"],
        )
    assert "550" in str(info.value)
    assert recorder.envelopes == []


def test_starttls_with_trusted_ca(
    runtime: str,
    aiosmtpd_server: Start,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    recorder, port = aiosmtpd_server(tls_context=server_context, require_starttls=True)
    result = send(runtime, message(), host="127.0.0.1", port=port, tls_context=client_context)
    assert result.ok
    assert recorder.sessions[0].ssl is not None  # the message went over TLS


def test_starttls_required_but_not_offered_sends_nothing(
    runtime: str, aiosmtpd_server: Start, client_context: ssl.SSLContext
) -> None:
    recorder, port = aiosmtpd_server()
    with pytest.raises(SendError) as info:
        send(runtime, message(), host="127.0.0.1", port=port, tls_context=client_context)
    assert "STARTTLS" in str(info.value)
    assert recorder.envelopes == []


def test_opportunistic_tls_falls_back_to_clear_text(runtime: str, aiosmtpd_server: Start) -> None:
    recorder, port = aiosmtpd_server()
    assert send(runtime, message(), host="127.0.0.1", port=port, tls="opportunistic").ok
    assert recorder.sessions[0].ssl is None


def test_certificate_is_verified_by_default(
    runtime: str, aiosmtpd_server: Start, server_context: ssl.SSLContext
) -> None:
    recorder, port = aiosmtpd_server(tls_context=server_context, require_starttls=True)
    with pytest.raises((ssl.SSLError, trio.BrokenResourceError)) as info:
        send(runtime, message(), host="127.0.0.1", port=port)  # system CAs only
    cause = info.value if isinstance(info.value, ssl.SSLError) else info.value.__cause__
    assert isinstance(cause, ssl.SSLCertVerificationError)
    assert recorder.envelopes == []


def test_host_name_is_checked(
    runtime: str, aiosmtpd_server: Start, client_context: ssl.SSLContext, ca: trustme.CA
) -> None:
    other = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.elsewhere.example").configure_cert(other)
    _, port = aiosmtpd_server(tls_context=other, require_starttls=True)
    with pytest.raises((ssl.SSLError, trio.BrokenResourceError)):
        send(runtime, message(), host="127.0.0.1", port=port, tls_context=client_context)


def test_implicit_tls(
    runtime: str,
    aiosmtpd_server: Start,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    recorder, port = aiosmtpd_server(ssl_context=server_context)
    result = send(
        runtime, message(), host="127.0.0.1", port=port, tls="implicit", tls_context=client_context
    )
    assert result.ok and len(recorder.envelopes) == 1
    # the server speaks TLS from the first byte: a clear-text client gets nowhere
    with pytest.raises(SendError):
        send(runtime, message(), host="127.0.0.1", port=port, tls="none", timeout=1.0)
    assert len(recorder.envelopes) == 1


def test_auth_over_starttls(
    runtime: str,
    aiosmtpd_server: Start,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    recorder, port = aiosmtpd_server(
        tls_context=server_context,
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
        auth_require_tls=True,
    )
    result = send(
        runtime,
        message(),
        host="127.0.0.1",
        port=port,
        tls_context=client_context,
        auth=("alice", "s3cret"),
    )
    assert result.ok
    assert recorder.sessions[0].authenticated


def test_auth_with_wrong_password_fails(
    runtime: str,
    aiosmtpd_server: Start,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
) -> None:
    recorder, port = aiosmtpd_server(
        tls_context=server_context,
        require_starttls=True,
        authenticator=authenticator,
        auth_required=True,
        auth_require_tls=True,
    )
    with pytest.raises(SendError) as info:
        send(
            runtime,
            message(),
            host="127.0.0.1",
            port=port,
            tls_context=client_context,
            auth=("alice", "wrong"),
        )
    assert "authentication failed" in str(info.value)
    assert info.value.result.setup.reply is not None
    assert info.value.result.setup.reply.code == 535
    assert recorder.envelopes == []


def test_no_auth_in_clear_text(runtime: str, aiosmtpd_server: Start) -> None:
    _, port = aiosmtpd_server(authenticator=authenticator, auth_require_tls=False)
    with pytest.raises(SendError) as info:
        send(runtime, message(), host="127.0.0.1", port=port, tls="none", auth=("alice", "s3cret"))
    assert "not encrypted" in str(info.value)


def test_silent_server_times_out(runtime: str) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
    thread.start()
    try:
        with pytest.raises(SendError) as info:
            send(
                runtime,
                message(),
                host="127.0.0.1",
                port=listener.getsockname()[1],
                tls="none",
                timeout=0.3,
            )
        assert "timeout" in str(info.value)
    finally:
        thread.join(5)
        for s in accepted:
            s.close()
        listener.close()


def test_prepare_needs_an_envelope_for_bytes() -> None:
    with pytest.raises(ValueError):
        prepare(b"Subject: x\r\n\r\n", sender="a@example.org")
    with pytest.raises(ValueError):
        prepare(EmailMessage())  # no From:


def test_prepare_uses_resent_headers_for_a_resend() -> None:
    msg = message()
    msg["Resent-Date"] = "Mon, 1 Jan 2026 00:00:00 +0000"
    msg["Resent-From"] = "relay@example.org"
    msg["Resent-To"] = "new@example.net"
    msg["Resent-Bcc"] = "hidden@example.net"
    p = prepare(msg)
    assert p.sender.address == "relay@example.org"
    assert [r.address for r in p.recipients] == ["new@example.net", "hidden@example.net"]
    assert b"hidden@example.net" not in p.content
    assert b"\r\n" in p.content and b"\n" not in p.content.replace(b"\r\n", b"")


@pytest.mark.parametrize("use_bdat", [True, False])
def test_against_mailwire_server_with_pipelining_and_chunking(
    runtime: str,
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    use_bdat: bool,
) -> None:
    from mailwire.adapters._driver import MessageHandler
    from mailwire.adapters.threads import Controller as ThreadsController
    from mailwire.protocol import ServerConfig

    received: list[tuple[bytes, Any]] = []
    handler = MessageHandler(lambda data, env: received.append((data, env)))
    config = ServerConfig(
        hostname="mx.test", starttls=True, chunking=use_bdat, binarymime=use_bdat, dsn=True
    )
    with ThreadsController(handler, config, tls_context=server_context) as ctl:
        host, port = ctl.addresses[0]
        msg = message()
        msg.set_content("x" * 200_000 + "\n.dot\n")  # several BDAT chunks
        result = send(
            runtime,
            msg,
            host=host,
            port=port,
            tls_context=client_context,
            sender=MailFrom(address="alice@example.org", ret="HDRS", envid="id1"),
            recipients=[RcptTo(address="bob@example.net", notify=("FAILURE",)), "c@example.net"],
        )
    assert result.ok
    ((data, env),) = received
    assert env.sender.ret == "HDRS" and env.sender.envid == "id1"
    assert env.sender.size == len(data)
    assert env.recipients[0].notify == ("FAILURE",)
    assert data.endswith(b"\r\n.dot\r\n")
    assert data == prepare(msg).content


def test_threads_client_and_server_sockets_disable_nagle(monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncio and trio set TCP_NODELAY by themselves; blocking sockets do not, and an SMTP
    # exchange (a small write, then a wait for the peer's reply) then stalls on Nagle's
    # algorithm against delayed ACKs: ~40 ms per exchange, seen against smtp-sink.
    from mailwire.adapters._driver import MessageHandler
    from mailwire.adapters.threads import Controller as ThreadsController
    from mailwire.protocol import ServerConfig

    sockets: list[socket.socket] = []
    real_accept = socket.socket.accept
    real_connect = socket.create_connection

    def accept(self: socket.socket) -> tuple[socket.socket, Any]:
        conn, address = real_accept(self)
        sockets.append(conn)
        return conn, address

    def create_connection(*args: Any, **kwargs: Any) -> socket.socket:
        sock = real_connect(*args, **kwargs)
        sockets.append(sock)
        return sock

    monkeypatch.setattr(socket.socket, "accept", accept)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    seen: list[list[int]] = []  # NODELAY of both ends, read while the session is open

    def got(data: bytes, envelope: Any) -> None:
        seen.append([s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets])

    with ThreadsController(MessageHandler(got), ServerConfig(hostname="mx.test")) as ctl:
        host, port = ctl.addresses[0]
        send("threads", message(), host=host, port=port, tls="none")
    assert len(seen) == 1 and len(seen[0]) == 2
    assert all(seen[0]), seen

"""Hostile clients over real loopback sockets, on every runtime (asyncio, trio, threads).

Each test plays one kind of abuse a server on port 25 meets -- slowloris, a client that never
reads, thousands of recipients, a huge message, a connection flood, NUL bytes, overlong lines,
invalid UTF-8, STARTTLS injection, SMTP smuggling, AUTH guessing -- and checks the outcome the
protocol prescribes plus that the *session survives* where it should.  Memory is measured with
tracemalloc (standard library) around the abusive part: the server runs in a thread of this
process and the client sends from preallocated buffers, so the traced peak is the server's.
The bounds are loose multiples of the engine's own buffers (a read, a chunk, a line limit),
far below what the abuse would cost if anything buffered it whole.

No timing assertions: timeouts are configured deadlines (the slowloris test only needs the
server's 421 to arrive, however long the scheduler takes), and waits are bounded by socket
timeouts so a hung server fails the test instead of hanging it.
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import select
import selectors
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import CLIENT_TIMEOUT, RUNTIMES

from mailwire.adapters import _driver
from mailwire.adapters import threads as _threads
from mailwire.adapters._driver import BaseController, Handler, Session
from mailwire.protocol import MailFrom, RcptTo, Reply, ServerConfig

MiB = 1024 * 1024
_bind = _driver.bind
Start = Callable[..., tuple[str, int]]


class Recorder(Handler):
    """Accepts everything, keeps no message content: counts octets, records envelopes."""

    def __init__(self) -> None:
        self.senders: list[str] = []
        self.recipients = 0
        self.octets = 0
        self.delivered: list[int] = []  # octets of each accepted message
        self.aborted = 0
        self.auth_attempts = 0

    def on_mail_from(self, session: Session, event: MailFrom) -> Reply | None:
        self.senders.append(event.address)
        return None

    def on_rcpt_to(self, session: Session, event: RcptTo) -> Reply | None:
        self.recipients += 1
        return None

    def on_auth(self, session: Session, event: Any) -> Reply | None:
        self.auth_attempts += 1
        return None  # 535: every guess is wrong

    def on_message_start(self, session: Session) -> None:
        self.octets = 0

    def on_message_data(self, session: Session, data: bytes) -> None:
        self.octets += len(data)

    def on_message_end(self, session: Session) -> Reply | None:
        self.delivered.append(self.octets)
        return None

    def on_message_aborted(self, session: Session) -> None:
        self.aborted += 1


@pytest.fixture(params=RUNTIMES)
def hostile(request: pytest.FixtureRequest) -> Iterator[Start]:
    """``start(handler, config, **options)`` runs a Controller of the parametrized runtime on
    127.0.0.1 and returns its address; teardown stops it and checks no thread is left."""
    adapter = importlib.import_module(f"mailwire.adapters.{request.param}")
    before = set(threading.enumerate())
    controllers: list[BaseController] = []

    def start(
        handler: Handler | None = None, config: ServerConfig | None = None, **options: Any
    ) -> tuple[str, int]:
        controller: BaseController = adapter.Controller(
            handler if handler is not None else Recorder(),
            config if config is not None else ServerConfig(hostname="mx.test"),
            **options,
        )
        controller.start()
        controllers.append(controller)
        return controller.addresses[0]

    yield start
    for controller in controllers:
        controller.stop()
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for thread in leaked:
        thread.join(5)
    assert [t for t in leaked if t.is_alive()] == []


@contextlib.contextmanager
def peak_memory() -> Iterator[list[int]]:
    """Measures the peak of traced allocations made inside the block, in octets."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    result = [0]
    try:
        yield result
    finally:
        result[0] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()


class Client:
    """A raw-socket SMTP client that can pipeline while it reads (no deadlock on big sends)."""

    def __init__(self, address: tuple[str, int], *, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(CLIENT_TIMEOUT)
        self.sock.connect(address)
        self.buf = bytearray()
        self.lines: list[bytes] = []
        self.last_text = ""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _take_reply(self) -> tuple[int, str] | None:
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                return None
            line = bytes(self.buf[:end])
            del self.buf[: end + 2]
            self.lines.append(line)
            if line[3:4] != b"-":
                lines, self.lines = self.lines, []
                text = "\n".join(x[4:].decode("utf-8", "replace") for x in lines)
                return int(line[:3]), text

    def reply(self) -> tuple[int, str]:
        while True:
            got = self._take_reply()
            if got is not None:
                return got
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; unread {bytes(self.buf)!r}")
            self.buf += chunk

    def expect(self, code: int) -> str:
        got, text = self.reply()
        assert got == code, (got, text)
        return text

    def closed(self) -> bool:
        """True once the server has closed the connection (and nothing is left unread)."""
        try:
            return not self.buf and self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def pipeline(self, payload: bytes, count: int) -> list[int]:
        """Send ``payload`` while reading, until ``count`` replies have arrived; returns their
        codes (the last reply's text is kept in ``last_text``: little client memory)."""
        replies: list[int] = []
        view, pos = memoryview(payload), 0
        self.sock.setblocking(False)
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
                while len(replies) < count:
                    ready = sel.select(CLIENT_TIMEOUT)
                    assert ready, f"no progress: {len(replies)} of {count} replies"
                    _, mask = ready[0]
                    if mask & selectors.EVENT_WRITE:
                        pos += self.sock.send(view[pos : pos + 65536])
                        if pos == len(payload):
                            sel.modify(self.sock, selectors.EVENT_READ)
                    if mask & selectors.EVENT_READ:
                        chunk = self.sock.recv(65536)
                        if not chunk:
                            raise EOFError(f"closed after {len(replies)} replies")
                        self.buf += chunk
                        while (got := self._take_reply()) is not None:
                            replies.append(got[0])
                            self.last_text = got[1]
        finally:
            self.sock.settimeout(CLIENT_TIMEOUT)
        assert pos == len(payload), "replies arrived for commands not yet sent"
        return replies


def greeted(address: tuple[str, int], **options: Any) -> Client:
    client = Client(address, **options)
    client.expect(220)
    return client


def transaction(client: Client, *, sender: str = "a@example.org") -> None:
    client.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n".encode())
    client.expect(250)
    client.expect(250)
    client.expect(354)


def still_serves(client: Client) -> None:
    """The session survived: a whole new transaction goes through, then QUIT."""
    client.send(b"EHLO again.test\r\n")
    client.expect(250)
    transaction(client, sender="after@example.org")
    client.send(b"Subject: still here\r\n\r\nok\r\n.\r\nQUIT\r\n")
    client.expect(250)
    client.expect(221)
    assert client.closed()
    client.close()


# --- slow and silent clients -------------------------------------------------------------------


def test_slowloris_command_is_cut_off_by_the_command_deadline(hostile: Start) -> None:
    address = hostile(config=ServerConfig(hostname="mx.test", command_timeout=1.0))
    client = greeted(address)
    line = b"EHLO slowloris.example.invalid.and.a.long.name\r\n"
    sent = 0
    # One byte about every 0.2 s; the wait for the server's reply is the pacing.
    while sent < len(line):
        ready, _, _ = select.select([client.sock], [], [], 0.2)
        if ready:
            break
        client.send(line[sent : sent + 1])
        sent += 1
    assert sent < len(line), "the line completed before any deadline passed"
    text = client.expect(421)
    assert text.startswith("4.4.2"), text
    assert client.closed()
    client.close()


def _small_buffers(listen: Any) -> list[socket.socket]:
    """bind(), with small kernel buffers (inherited by accepted sockets): back-pressure reaches
    the server after kilobytes instead of the megabytes loopback autotuning allows."""
    sockets = _bind(listen)
    for sock in sockets:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    return sockets


@pytest.mark.parametrize("hostile", ["threads"], indirect=True)  # engine logic: one runtime
# ServerConfig.min_data_progress: the data deadline restarts only after 1 KiB arrived
def test_slowloris_data_trickle_is_cut_off(hostile: Start) -> None:
    config = ServerConfig(hostname="mx.test", command_timeout=5.0, data_timeout=1.0)
    client = greeted(hostile(config=config))
    client.send(b"HELO c.test\r\n")
    client.expect(250)
    transaction(client)
    for _ in range(15):  # 3 octets about every 0.3 s, never a line end; ~4.5 s in all
        ready, _, _ = select.select([client.sock], [], [], 0.3)
        if ready:
            break
        client.send(b"abc")
    else:
        raise AssertionError("no deadline cut off a trickle three times data_timeout long")
    assert client.expect(421).startswith("4.4.2")


def test_client_that_never_reads_replies_keeps_server_memory_bounded(
    hostile: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_driver, "bind", _small_buffers)
    address = hostile(config=ServerConfig(hostname="mx.test", command_timeout=60.0))
    client = greeted(address, rcvbuf=4096)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    noops = 50_000  # the server stops reading after ~16,000 here (small kernel buffers)
    payload = b"NOOP\r\n" * noops
    view, pos = memoryview(payload), 0
    client.sock.setblocking(False)
    with peak_memory() as peak:
        # Pipeline NOOPs without reading a single reply, until the server stops reading us
        # (its writes are blocked: back-pressure) -- or everything is sent.
        while pos < len(payload):
            try:
                pos += client.sock.send(view[pos : pos + 65536])
            except BlockingIOError:
                _, writable, _ = select.select([], [client.sock], [], 1.0)
                if not writable:
                    break
    client.sock.settimeout(CLIENT_TIMEOUT)
    stalled = pos < len(payload)
    sent = pos // 6
    replies = client.pipeline(payload[pos:], noops)  # now read everything: all answered
    assert replies == [250] * noops
    print(f"never-reads: sent {sent} NOOPs unread, stalled={stalled}, peak {peak[0]} B")
    assert stalled, "the server never pushed back: raise noops"
    assert peak[0] < 2 * MiB, peak[0]
    still_serves(client)


# --- too much of everything --------------------------------------------------------------------


def test_ten_thousand_recipients_get_452_beyond_the_limit_and_session_survives(
    hostile: Start,
) -> None:
    recorder = Recorder()
    address = hostile(recorder, ServerConfig(hostname="mx.test", max_recipients=1000))
    client = greeted(address)
    rcpts = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(10_000))
    with peak_memory() as peak:
        replies = client.pipeline(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n" + rcpts, 10_002)
    assert replies == [250] * 1002 + [452] * 9000
    assert client.last_text.startswith("4.5.3"), client.last_text
    client.send(b"DATA\r\n")
    client.expect(354)
    client.send(b"Subject: many\r\n\r\nhi\r\n.\r\n")
    client.expect(250)
    assert recorder.recipients == 1000 and recorder.delivered == [
        len(b"Subject: many\r\n\r\nhi\r\n")
    ]
    print(f"10k recipients: peak {peak[0]} B")
    assert peak[0] < 3 * MiB, peak[0]  # the 1000 accepted RcptTo events are kept
    still_serves(client)


BIG_DATA = 200 * MiB  # streamed against a 10 MiB limit


def test_huge_data_stream_gets_552_with_bounded_memory_and_session_survives(
    hostile: Start,
) -> None:
    recorder = Recorder()
    address = hostile(recorder, ServerConfig(hostname="mx.test", max_message_size=10 * MiB))
    client = greeted(address)
    client.send(b"EHLO c.test\r\n")
    client.expect(250)
    transaction(client)
    block = (b"x" * 998 + b"\r\n") * 64  # 64000 octets of 1000-octet lines
    with peak_memory() as peak:
        for _ in range(BIG_DATA // len(block)):
            client.send(block)
        client.send(b".\r\n")
        text = client.expect(552)
    assert text.startswith("5.3.4"), text
    assert recorder.delivered == [] and recorder.aborted == 1
    print(f"{BIG_DATA // MiB} MiB DATA: peak {peak[0]} B")
    assert peak[0] < 4 * MiB, peak[0]
    still_serves(client)
    assert recorder.delivered == [len(b"Subject: still here\r\n\r\nok\r\n")]


def test_connection_flood_beyond_max_connections_gets_421_and_others_are_served(
    hostile: Start,
) -> None:
    recorder = Recorder()
    address = hostile(recorder, max_connections=50)
    clients = [Client(address) for _ in range(300)]
    greetings = [client.reply() for client in clients]
    served = [c for c, (code, _) in zip(clients, greetings, strict=True) if code == 220]
    refused = [c for c, (code, _) in zip(clients, greetings, strict=True) if code == 421]
    assert len(served) == 50 and len(refused) == 250
    assert all(text.startswith("4.7.0") for code, text in greetings if code == 421)
    for client in refused:
        assert client.closed()
        client.close()
    for client in served:
        client.send(b"EHLO c.test\r\n")
        client.expect(250)
        transaction(client)
        client.send(b"Subject: flood\r\n\r\nserved\r\n.\r\nQUIT\r\n")
        client.expect(250)
        client.expect(221)
        client.close()
    assert len(recorder.delivered) == 50


@pytest.mark.parametrize("hostile", ["threads"], indirect=True)  # sessions start in parallel
def test_connections_arriving_together_never_exceed_max_connections(
    hostile: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Widen the gap between a session's start and its taking a place: a count checked before
    # the gap and a place taken after it let every simultaneous session through.
    slow = _driver.new_session

    def new_session(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.05)  # not a timing assertion: every session start is slowed alike
        return slow(*args, **kwargs)

    monkeypatch.setattr(_threads, "new_session", new_session)
    address = hostile(Recorder(), max_connections=3)
    clients = [Client(address) for _ in range(12)]
    codes = [client.reply()[0] for client in clients]
    assert sorted(codes) == [220] * 3 + [421] * 9
    for client in clients:
        client.close()


# --- hostile bytes -----------------------------------------------------------------------------


HOSTILE_LINES = {
    "nul-ehlo": b"EHLO a\x00b.example\r\n",
    "nul-mail": b"MAIL FROM:<a\x00@example.org>\r\n",
    "bad-utf8-mail": b"MAIL FROM:<\xff\xfe@example.org>\r\n",
    "bad-utf8-rcpt": b"RCPT TO:<\xc3(@example.org>\r\n",
    "encoded-surrogate": b"EHLO \xed\xa0\x80.example\r\n",
    "overlong-utf8": b"MAIL FROM:<\xc0\xaf@example.org>\r\n",
    "bare-cr-inside": b"NOOP\rMAIL FROM:<x@example.org>\r\n",
    "tls-client-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n",
}


@pytest.mark.parametrize("line", list(HOSTILE_LINES.values()), ids=list(HOSTILE_LINES))
def test_hostile_command_bytes_are_refused_and_session_survives(
    hostile: Start, line: bytes
) -> None:
    recorder = Recorder()
    client = greeted(hostile(recorder))
    client.send(b"EHLO c.test\r\n")
    client.expect(250)
    client.send(line)
    got, text = client.reply()
    assert got == 500 and text.startswith("5.5.2"), (got, text)
    assert recorder.senders == []
    still_serves(client)


def test_http_request_on_smtp_port_gets_421_and_close(hostile: Start) -> None:
    client = greeted(hostile())
    client.send(b"POST / HTTP/1.1\r\nHost: mx.test\r\nContent-Length: 0\r\n\r\n")
    assert client.expect(421).startswith("4.7.0")
    assert client.closed()
    client.close()


def test_overlong_command_line_is_refused_with_bounded_memory(hostile: Start) -> None:
    client = greeted(hostile())
    with peak_memory() as peak:
        for _ in range(512):
            client.send(b"A" * 16384)  # 8 MiB without a line end
        client.send(b"\r\n")
        got, text = client.reply()
    assert got == 500 and "too long" in text, (got, text)
    print(f"8 MiB command line: peak {peak[0]} B")
    assert peak[0] < 3 * MiB, peak[0]  # well under what buffering the line would cost
    still_serves(client)


def test_starttls_injection_is_discarded(
    hostile: Start, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    recorder = Recorder()
    config = ServerConfig(hostname="mx.test", starttls=True)
    client = greeted(hostile(recorder, config, tls_context=server_tls))
    client.send(b"EHLO c.test\r\n")
    client.expect(250)
    # Commands pipelined behind STARTTLS in the same packet (CVE-2011-0411).
    client.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\nRCPT TO:<x@example.net>\r\n")
    client.expect(220)
    assert not client.buf, "replies to the injected commands leaked before the handshake"
    client.sock = client_tls.wrap_socket(client.sock, server_hostname="localhost")
    client.send(b"EHLO c.test\r\n")
    client.expect(250)
    client.send(b"RCPT TO:<x@example.net>\r\n")
    client.expect(503)  # no MAIL was ever executed
    assert "injected@evil.example" not in recorder.senders
    still_serves(client)


SMUGGLING = {
    # Fake end-of-data markers (CVE-2023-51764/51765/51766 and relatives), each followed by a
    # smuggled transaction; only CRLF "." CRLF may end the data.
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-cr": b"\r.\r",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
    "crlf-nul-dot-crlf": b"\r\n\x00.\r\n",
    "crlf-dot-space-crlf": b"\r\n. \r\n",
}


@pytest.mark.parametrize("marker", list(SMUGGLING.values()), ids=list(SMUGGLING))
def test_smtp_smuggling_fake_end_of_data_never_executes_smuggled_commands(
    hostile: Start, marker: bytes
) -> None:
    recorder = Recorder()
    client = greeted(hostile(recorder))
    client.send(b"EHLO c.test\r\n")
    client.expect(250)
    transaction(client)
    smuggled = b"MAIL FROM:<smuggled@evil.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
    client.send(b"Subject: real\r\n\r\nreal body" + marker + smuggled + b"fake\r\n.\r\n")
    code, text = client.reply()  # exactly one reply for the whole thing
    bare = any(b in marker.replace(b"\r\n", b"") for b in (b"\r", b"\n"))
    if bare:
        assert code == 550 and text.startswith("5.6."), (code, text)  # bare CR/LF rejected
    else:
        assert code == 250, (code, text)  # legal content: one message, commands as text
    client.send(b"NOOP\r\n")
    client.expect(250)  # not a 250/354 answering the smuggled MAIL/RCPT/DATA
    assert "smuggled@evil.example" not in recorder.senders
    assert recorder.senders == ["a@example.org"]
    still_serves(client)


# --- AUTH guessing -----------------------------------------------------------------------------


def _plain(password: str) -> bytes:
    return base64.b64encode(f"\x00user\x00{password}".encode())


AUTH_CONFIG: dict[str, Any] = {
    "hostname": "mx.test",
    "auth_mechanisms": ("PLAIN",),
    "auth_requires_tls": False,
}


# max_auth_failures (default 3): password guessing costs a new connection each few tries
def test_auth_brute_force_is_cut_off_per_connection(hostile: Start) -> None:
    recorder = Recorder()
    config = ServerConfig(**AUTH_CONFIG, max_bad_commands=10)
    client = greeted(hostile(recorder, config))
    client.send(b"EHLO c.test\r\n")
    client.expect(250)
    codes = []
    for i in range(30):
        try:
            client.send(b"AUTH PLAIN " + _plain(f"guess{i}") + b"\r\n")
            codes.append(client.reply()[0])
        except (EOFError, ConnectionError):
            break
        if codes[-1] == 421:
            break
    assert codes[-1] == 421, codes
    assert recorder.auth_attempts <= 10


def test_auth_failures_are_answered_only_after_a_configured_delay(hostile: Start) -> None:
    config = ServerConfig(**{**AUTH_CONFIG, "auth_failure_delay": 0.5})
    client = greeted(hostile(config=config))
    client.send(b"EHLO c.test\r\n")
    client.expect(250)
    client.send(b"AUTH PLAIN " + _plain("wrong") + b"\r\n")
    client.sock.settimeout(0.25)
    with pytest.raises(TimeoutError):  # a lower bound on a configured delay, not a speed
        client.reply()
    client.sock.settimeout(CLIENT_TIMEOUT)
    client.expect(535)

"""The client's hot path: many 1 KB and 100 KB messages through the client engine.

mailwire runs client engine + server engine in memory (MailTransaction over
ClientConnection, ServerConnection answering), and the client engine alone against canned
replies; smtplib and aiosmtplib send the same messages over loopback to an in-process sink
(a minimal threaded SMTP responder, so the sink costs as little as possible).  The
comparison is not apples to apples -- the engines skip the kernel, the others pay for
sockets but not for a real server -- and is meant as an order of magnitude.

    pytest benchmarks/test_client.py --benchmark-only -s     # timings, then the ratios
    python benchmarks/test_client.py                         # just the ratios
"""

from __future__ import annotations

import asyncio
import smtplib
import socketserver
import threading
import time
from collections.abc import Iterator

import aiosmtplib
import pytest

from mailwire.protocol._client import ClientConnection
from mailwire.protocol._config import ClientConfig, ServerConfig
from mailwire.protocol._events import (
    NEED_DATA,
    PAUSED,
    Ehlo,
    EndOfMessage,
    MailFrom,
    RcptTo,
    Reply,
)
from mailwire.protocol._server import ServerConnection
from mailwire.protocol._transaction import MailTransaction

CASES = {"1k": (100, 1024), "100k": (10, 100 * 1024)}
SENDER = "sender@example.org"
RECIPIENT = "rcpt@example.net"


def body(size: int) -> bytes:
    """A realistic body: headers, 76-column lines, a few lines starting with a dot."""
    head = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: benchmark\r\n\r\n"
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod te\r\n"
    dots = b".leading dot, stuffed on the wire\r\n"
    text = head + (line * 9 + dots) * (size // (len(line) * 9 + len(dots)) + 1)
    return text[: size - 2] + b"\r\n"


# --- mailwire: client engine + server engine in memory -------------------------------------------


def mailwire_send(messages: int, size: int, *, use_bdat: bool = False) -> int:
    """One session, ``messages`` transactions; returns how many were delivered."""
    content = body(size)
    server = ServerConnection(ServerConfig(hostname="mx.example", max_message_size=0))
    client = ClientConnection(ClientConfig(local_hostname="client.example"))
    server.send(Reply(code=220, text="mx.example ESMTP"))

    def serve(data: bytes) -> bytes:
        server.receive_data(data)
        while True:
            event = server.next_event()
            if event is NEED_DATA:
                return server.data_to_send()
            if event is PAUSED:
                server.send(Reply(code=250, text="2.0.0 queued" if last_eom[0] else "OK"))
                last_eom[0] = False
                continue
            last_eom[0] = isinstance(event, EndOfMessage)

    last_eom = [False]
    client.receive_data(server.data_to_send())
    client.next_event()
    client.send(Ehlo(domain="client.example"))
    client.receive_data(serve(client.data_to_send()))
    client.next_event()
    sender, rcpt = MailFrom(address=SENDER), RcptTo(address=RECIPIENT)
    delivered = 0
    for _ in range(messages):
        tx = MailTransaction(
            client, sender=sender, recipients=[rcpt], body=[content], use_bdat=use_bdat
        )
        while not tx.done:
            out = tx.data_to_send()
            answer = serve(out) if out else b""
            if answer:
                tx.receive_data(answer)
        delivered += tx.result.ok
    return delivered


def mailwire_client_only(messages: int, size: int) -> int:
    """The client engine alone, the server's replies canned: what the client itself costs."""
    content = body(size)
    client = ClientConnection(ClientConfig(local_hostname="client.example"))
    client.receive_data(b"220 mx.example ESMTP\r\n")
    client.next_event()
    client.send(Ehlo(domain="client.example"))
    client.receive_data(b"250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
    client.next_event()
    client.data_to_send()
    sender, rcpt = MailFrom(address=SENDER), RcptTo(address=RECIPIENT)
    delivered = 0
    for _ in range(messages):
        tx = MailTransaction(client, sender=sender, recipients=[rcpt], body=[content])
        tx.data_to_send()
        tx.receive_data(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
        while tx.data_to_send():
            pass
        tx.receive_data(b"250 2.0.0 queued\r\n")
        delivered += tx.result.ok
    return delivered


# --- the socket peers -----------------------------------------------------------------------------


class _Sink(socketserver.BaseRequestHandler):
    """Just enough SMTP: canned replies, DATA content skipped up to CRLF.CRLF."""

    def handle(self) -> None:
        sock = self.request
        sock.sendall(b"220 sink ESMTP\r\n")
        buf = b""
        in_data = False
        while True:
            chunk = sock.recv(262144)
            if not chunk:
                return
            buf += chunk
            out = []
            while True:
                if in_data:
                    end = buf.find(b"\r\n.\r\n")
                    if buf.startswith(b".\r\n"):
                        end = -2
                    if end == -1:
                        buf = buf[-4:]
                        break
                    buf = buf[end + 5 :]
                    in_data = False
                    out.append(b"250 2.0.0 queued\r\n")
                    continue
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                verb = buf[:4].upper()
                buf = buf[end + 2 :]
                if verb in (b"EHLO", b"HELO"):
                    out.append(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE\r\n")
                elif verb == b"DATA":
                    out.append(b"354 go ahead\r\n")
                    in_data = True
                elif verb == b"QUIT":
                    sock.sendall(b"".join(out) + b"221 bye\r\n")
                    return
                else:
                    out.append(b"250 OK\r\n")
            if out:
                sock.sendall(b"".join(out))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Sink:
    """The sink on a loopback port, in a thread; stops cleanly."""

    def __init__(self) -> None:
        self.server = _Server(("127.0.0.1", 0), _Sink)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def smtplib_send(port: int, messages: int, size: int) -> int:
    content = body(size)
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example") as smtp:
        for _ in range(messages):
            smtp.sendmail(SENDER, [RECIPIENT], content)
    return messages


def aiosmtplib_send(port: int, messages: int, size: int) -> int:
    content = body(size)

    async def run() -> int:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="client.example")
        await smtp.connect(start_tls=False)
        for _ in range(messages):
            await smtp.sendmail(SENDER, [RECIPIENT], content)
        await smtp.quit()
        return messages

    return asyncio.run(run())


# --- benchmarks -----------------------------------------------------------------------------------

TIMINGS: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    peer = Sink()
    yield peer
    peer.close()
    report = ratios(TIMINGS)
    if report:
        print("\n" + report)


def record(benchmark, name: str, case: str) -> None:  # type: ignore[no-untyped-def]
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        TIMINGS[(name, case)] = stats.stats.mean


def ratios(timings: dict[tuple[str, str], float]) -> str:
    lines = []
    for case, (n, size) in CASES.items():
        ours = timings.get(("mailwire", case))
        if ours is None:
            continue
        parts = [f"{n} x {size // 1024} KB: mailwire {ours * 1000:.1f} ms"]
        for other in ("mailwire-client-only", "mailwire-bdat", "smtplib", "aiosmtplib"):
            theirs = timings.get((other, case))
            if theirs is not None:
                parts.append(f"{other} {theirs * 1000:.1f} ms ({theirs / ours:.1f}x)")
        lines.append("; ".join(parts))
    return "\n".join(lines)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.benchmark(group="client: send messages", max_time=0.5)
def test_mailwire_engines_in_memory(benchmark, case: str) -> None:  # type: ignore[no-untyped-def]
    n, size = CASES[case]
    assert benchmark(mailwire_send, n, size) == n
    record(benchmark, "mailwire", case)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.benchmark(group="client: send messages", max_time=0.5)
def test_mailwire_client_engine_alone(benchmark, case: str) -> None:  # type: ignore[no-untyped-def]
    n, size = CASES[case]
    assert benchmark(mailwire_client_only, n, size) == n
    record(benchmark, "mailwire-client-only", case)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.benchmark(group="client: send messages", max_time=0.5)
def test_mailwire_engines_in_memory_bdat(benchmark, case: str) -> None:  # type: ignore[no-untyped-def]
    n, size = CASES[case]
    assert benchmark(mailwire_send, n, size, use_bdat=True) == n
    record(benchmark, "mailwire-bdat", case)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.benchmark(group="client: send messages", max_time=0.5)
def test_smtplib_to_loopback_sink(benchmark, sink: Sink, case: str) -> None:  # type: ignore[no-untyped-def]
    n, size = CASES[case]
    assert benchmark(smtplib_send, sink.port, n, size) == n
    record(benchmark, "smtplib", case)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.benchmark(group="client: send messages", max_time=0.5)
def test_aiosmtplib_to_loopback_sink(benchmark, sink: Sink, case: str) -> None:  # type: ignore[no-untyped-def]
    n, size = CASES[case]
    assert benchmark(aiosmtplib_send, sink.port, n, size) == n
    record(benchmark, "aiosmtplib", case)


def _best(fn: object, *args: object, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    peer = Sink()
    try:
        timings = {}
        for case, (n, size) in CASES.items():
            timings[("mailwire", case)] = _best(mailwire_send, n, size)
            timings[("mailwire-client-only", case)] = _best(mailwire_client_only, n, size)
            timings[("mailwire-bdat", case)] = _best(
                lambda n=n, size=size: mailwire_send(n, size, use_bdat=True)
            )
            timings[("smtplib", case)] = _best(smtplib_send, peer.port, n, size)
            timings[("aiosmtplib", case)] = _best(aiosmtplib_send, peer.port, n, size)
        print(ratios(timings))
    finally:
        peer.close()

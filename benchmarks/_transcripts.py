"""Shared inputs for the engine benchmarks: whole client transcripts as bytes."""

from __future__ import annotations

import asyncio
from typing import Any

from mailwire.protocol import (
    Ehlo,
    EndOfMessage,
    Helo,
    MailFrom,
    MessageData,
    RcptTo,
    Reply,
    Sentinel,
    ServerConfig,
    ServerConnection,
)
from mailwire.protocol._writers import dot_stuff

READ_SIZE = 64 * 1024


def body(size: int) -> bytes:
    """A realistic body of ``size`` octets: headers, then 76-column lines, CRLF endings."""
    head = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: benchmark\r\n\r\n"
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod te\r\n"
    text = head + line * ((size - len(head)) // len(line) + 1)
    return text[: size - 2] + b"\r\n"


def session(messages: int, size: int, *, pipelined: bool = True) -> bytes:
    """EHLO, then ``messages`` transactions of ``size`` octets, then QUIT."""
    msg = dot_stuff(body(size), True)
    one = (
        b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<rcpt@example.net>\r\nDATA\r\n" + msg + b".\r\n"
    )
    return b"EHLO client.example\r\n" + one * messages + b"QUIT\r\n"


def chunks(data: bytes, size: int = READ_SIZE) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


OK = Reply(code=250, text="2.0.0 OK")


def mailwire_session(pieces: list[bytes], config: ServerConfig | None = None) -> int:
    """Run the pieces through a ServerConnection that accepts everything; return messages."""
    conn = ServerConnection(config or ServerConfig(hostname="mx.example"))
    conn.send(Reply(code=220, text="mx.example ESMTP"))
    done = 0
    size = 0
    for piece in pieces:
        conn.receive_data(piece)
        while not isinstance(event := conn.next_event(), Sentinel):
            if isinstance(event, MessageData):
                size += len(event.data)
            elif isinstance(event, (MailFrom, RcptTo, Ehlo, Helo)):
                conn.send(OK)
            elif isinstance(event, EndOfMessage):
                conn.send(OK)
                done += 1
        conn.data_to_send()
    return done


class _Transport(asyncio.Transport):
    """Collects aiosmtpd's writes in memory; close() ends the run."""

    def __init__(self, closed: asyncio.Future[None]) -> None:
        super().__init__()
        self.closed = closed
        self.out = bytearray()

    def write(self, data: Any) -> None:
        self.out += data

    def close(self) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def is_closing(self) -> bool:
        return self.closed.done()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 12345), "sockname": ("127.0.0.1", 25)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def aiosmtpd_session(pieces: list[bytes]) -> int:
    """Run the same pieces through aiosmtpd's SMTP protocol in memory (do-nothing handler)."""
    from aiosmtpd.smtp import SMTP

    class Sink:
        count = 0

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            Sink.count += 1
            return "250 OK"

    async def main() -> int:
        loop = asyncio.get_running_loop()
        closed: asyncio.Future[None] = loop.create_future()
        transport = _Transport(closed)
        proto = SMTP(Sink(), hostname="mx.example", data_size_limit=None)
        proto.connection_made(transport)
        for piece in pieces:
            proto.data_received(piece)
        await asyncio.wait_for(closed, 60)
        proto.connection_lost(None)
        await asyncio.sleep(0)
        return Sink.count

    return asyncio.run(main())

"""Each runtime's floor: an SMTP responder that parses nothing, on asyncio, trio and threads.

The adapters' targets compare runtimes (trio and threads within 0.8x of asyncio).  Part of
what a runtime costs per message is not the adapter's doing: the event loop's own work per
wake-up (trio re-arms epoll and runs its scheduler for every read; threads hand the GIL over
on every recv and send).  This responder measures that part: it answers each command line
with a canned reply, finds the end of DATA with one ``find`` and keeps no envelope, and its
I/O on each runtime is written the way mailwire's adapter does it (asyncio: a
BufferedProtocol; trio: the stdlib socket with ``wait_readable``; threads: one blocking
socket per thread).  ``floor-<runtime>`` in _peers.py serves it; its CPU per message is a
lower bound for any SMTP server on that runtime in CPython, mailwire's included.

Not an SMTP server: no parsing, no limits, no timeouts.  Benchmarks only.
"""

from __future__ import annotations

import os
import socket
import threading
import time

GREETING = b"220 floor ESMTP\r\n"
_OK = b"250 ok\r\n"
_GO = b"354 go\r\n"
_BYE = b"221 bye\r\n"
_END = b"\r\n.\r\n"
# MAILWIRE_FLOOR_WORK_US: microseconds of pure-Python work (holding the GIL) per read, to
# stand in for a real server's parsing; 0 (the default) for the bare floor
WORK = float(os.environ.get("MAILWIRE_FLOOR_WORK_US", "0")) / 1e6


def _work() -> None:
    end = time.perf_counter() + WORK
    while time.perf_counter() < end:
        pass


class Responder:
    """Replies for the bytes of one session: ``feed(data)`` returns what to send and whether
    the session is over."""

    __slots__ = ("buf", "in_data")

    def __init__(self) -> None:
        self.buf = b""
        self.in_data = False

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        if WORK:
            _work()
        buf = self.buf + data if self.buf else data
        out: list[bytes] = []
        while True:
            if self.in_data:
                end = buf.find(_END)
                if end < 0:
                    self.buf = buf[-4:]
                    return b"".join(out), False
                buf = buf[end + 5 :]
                self.in_data = False
                out.append(_OK)
                continue
            nl = buf.find(b"\n")
            if nl < 0:
                self.buf = buf
                return b"".join(out), False
            verb = buf[:4].upper()
            buf = buf[nl + 1 :]
            if verb == b"DATA":
                self.in_data = True
                buf = b"\r\n" + buf  # the end marker may follow at once (empty body)
                out.append(_GO)
            elif verb == b"QUIT":
                out.append(_BYE)
                self.buf = b""
                return b"".join(out), True
            else:
                out.append(_OK)


def serve_asyncio(sock: socket.socket) -> None:
    """Serve forever on asyncio (the running policy's loop: uvloop if installed as such)."""
    import asyncio

    shared = bytearray(64 * 1024)

    class Proto(asyncio.BufferedProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.responder = Responder()
            transport.write(GREETING)

        def get_buffer(self, sizehint: int) -> bytearray:
            return shared

        def buffer_updated(self, nbytes: int) -> None:
            out, done = self.responder.feed(bytes(shared[:nbytes]))
            if out:
                self.transport.write(out)
            if done:
                self.transport.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Proto, sock=sock)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def serve_trio(sock: socket.socket) -> None:
    """Serve forever on trio, reading the way mailwire's trio adapter does."""
    import trio

    async def session(conn: socket.socket) -> None:
        conn.setblocking(False)
        responder = Responder()
        out: bytes = GREETING
        try:
            while True:
                if out:
                    conn.send(out)  # small replies: the kernel takes them whole
                await trio.lowlevel.wait_readable(conn)
                data = conn.recv(65536)
                if not data:
                    return
                out, done = responder.feed(data)
                if done:
                    conn.send(out)
                    return
        except OSError:
            return
        finally:
            conn.close()

    async def main() -> None:
        sock.setblocking(False)
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(session, conn)

    trio.run(main)


def serve_threads(sock: socket.socket) -> None:
    """Serve forever with one thread and one blocking socket per connection."""

    def session(conn: socket.socket) -> None:
        responder = Responder()
        buf = bytearray(65536)
        try:
            conn.sendall(GREETING)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    return
                out, done = responder.feed(bytes(buf[:n]))
                if out:
                    conn.sendall(out)
                if done:
                    return
        except OSError:
            return
        finally:
            conn.close()

    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=session, args=(conn,), daemon=True).start()

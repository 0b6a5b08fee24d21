"""The SMTP server on asyncio: ``serve()`` and ``Controller``.

This module only moves bytes, sleeps until the engine's deadline and does TLS
(``loop.start_tls``); every SMTP decision is made by :mod:`mailwire.protocol` and the handler,
through :mod:`mailwire.adapters._driver`.  Handler methods may be ``async def``.

Each connection is an ``asyncio.Protocol`` rather than a pair of streams: bytes arriving in
``data_received`` are fed to the engine and the handlers are called at once, so a session with
synchronous handlers costs no task switch, future or timer per read.  An awaitable handler
result pauses reading and continues in a task.

It is a ``BufferedProtocol`` reading into one buffer shared by the server's connections
(``get_buffer`` and ``buffer_updated`` are called back to back on the loop's thread, and the
bytes are copied into the engine at once): asyncio's plain ``Protocol`` path allocates a fresh
256 KiB ``bytes`` for every ``recv()``, which costs two page faults per read, more CPU than the
whole adapter.

Back-pressure: reading is paused while a handler is awaited, during the TLS handshake, and
while the transport's write buffer is above its high-water mark (``pause_writing``), so neither
input nor output is buffered unbounded.  Bytes that arrive with the client's TLS Finished
(before ``start_tls`` returns) are held and fed to the engine after ``tls_established()``;
fed earlier, the engine would discard them as pre-TLS plaintext.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, cast

from mailwire.adapters._client_asyncio import send_message
from mailwire.adapters._client_driver import SendError, SendResult
from mailwire.adapters._driver import (
    BaseController,
    Call,
    Driver,
    Handler,
    Live,
    Pending,
    bind,
    new_session,
    refusal,
    resolve,
    step,
)
from mailwire.protocol._config import ServerConfig

__all__ = ["Controller", "SendError", "SendResult", "send_message", "serve"]

log = logging.getLogger("mailwire.adapters.asyncio")
_CLOSE_TIMEOUT = 5.0  # bound on flushing a 421 and closing after shutdown
_CLOSE_WAIT = 1.0  # how long a closing TLS transport waits for the peer's close_notify
# The shared read buffer.  Not asyncio's 256 KiB: each read is copied out of it into a new
# bytes, and above glibc's mmap threshold (128 KiB) that copy is a fresh mapping with a page
# fault per 4 KiB (100 KB messages: 13 faults per message with 256 KiB, <1 with 64 KiB).
READ_SIZE = 64 * 1024



def _clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """The loop's clock: ``time.monotonic`` itself when the loop keeps asyncio's own time()
    (the driver reads it on every read and reply; loop.time() is one Python call more),
    else the loop's (uvloop's is its own)."""
    if type(loop).time is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time

class _Server:
    def __init__(
        self,
        handler: Handler,
        config: ServerConfig,
        *,
        tls_context: ssl.SSLContext | None,
        implicit_tls: bool,
        max_connections: int,
    ) -> None:
        if (config.starttls or implicit_tls) and tls_context is None:
            raise ValueError("STARTTLS or implicit TLS needs a tls_context")
        self.handler, self.config = handler, config
        self.tls_context, self.implicit_tls = tls_context, implicit_tls
        self.max_connections = max_connections
        self.live: dict[Live, _Connection] = {}
        self.stopping = False
        self.emptied: asyncio.Event | None = None  # set when the last session ends
        self.stop_requested: asyncio.Event | None = None
        self.grace = 0.0
        self.buffer = memoryview(bytearray(READ_SIZE))  # shared by every connection's reads

    async def run(
        self, sockets: Sequence[socket.socket], grace: float, ready: Callable[[], None] | None
    ) -> None:
        self.grace = grace
        self.stop_requested = asyncio.Event()
        self.emptied = asyncio.Event()
        loop = asyncio.get_running_loop()
        ctx = self.tls_context if self.implicit_tls else None
        tls_options: dict[str, Any] = {}
        if ctx is not None:
            tls_options = {"ssl_handshake_timeout": 30.0, "ssl_shutdown_timeout": _CLOSE_WAIT}
        servers = [
            # asyncio re-listens with a backlog of 100; trio and threads use the kernel's
            # larger default, so a connection flood would be refused sooner here.
            await loop.create_server(
                lambda: _Connection(self), sock=sock, ssl=ctx, backlog=1024, **tls_options
            )
            for sock in sockets
        ]
        log.info("listening on %s", [s.getsockname() for s in sockets])
        if ready is not None:
            ready()
        try:
            await self.stop_requested.wait()
        finally:  # cancellation (or a stop request): graceful shutdown
            for server in servers:
                server.close()
            await self._drain_sessions()

    def request_stop(self, grace: float) -> None:
        self.grace = grace
        if self.stop_requested is not None:
            self.stop_requested.set()

    async def _drain_sessions(self) -> None:
        self.stopping = True
        for live in list(self.live):
            live.kick(force=False)
        await self._all_closed(self.grace)
        for live in list(self.live):
            live.kick(force=True)
        await self._all_closed(_CLOSE_TIMEOUT)
        for connection in list(self.live.values()):
            connection.abort()

    async def _all_closed(self, timeout: float) -> None:
        assert self.emptied is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.live:
                    self.emptied.clear()
                    await self.emptied.wait()

    def remove(self, live: Live) -> None:
        self.live.pop(live, None)
        if not self.live and self.emptied is not None:
            self.emptied.set()


class _Connection(asyncio.BufferedProtocol):
    """One SMTP session: the engine driven from the transport's callbacks."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.config = server.config
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.driver: Driver | None = None
        self.live: Live | None = None
        self.steps: Generator[Call, object, Any] | None = None
        self.busy = False  # an awaited handler call or the TLS handshake is in progress
        self.early: list[bytes] | None = None  # bytes received during the STARTTLS handshake
        self.write_paused = False
        self.read_paused = False
        self.closed = False
        self.lost = False
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    # --- transport callbacks ----------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport
        self.transport = transport = cast(asyncio.Transport, base)
        server = self.server
        peer = transport.get_extra_info("peername")
        if len(server.live) >= server.max_connections or server.stopping:
            log.warning("refusing %s: too many connections", peer)
            transport.write(refusal(self.config))
            transport.close()
            return
        session = new_session(peer, transport.get_extra_info("sockname"), tls=server.implicit_tls)
        self.driver = Driver(
            server.handler,
            self.config,
            session,
            clock=_clock(self.loop),
            logger=log,
            sleep=asyncio.sleep,
        )
        self.live = Live(driver=self.driver, wake=self._wake)
        server.live[self.live] = self
        log.debug("%s connect from %s", session.id, session.peer)
        self._process()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.buffer

    def buffer_updated(self, nbytes: int) -> None:
        driver = self.driver
        if driver is None or self.closed:
            return
        data = self.server.buffer[:nbytes].tobytes()
        if self.early is not None:
            self.early.append(data)
            return
        driver.receive(data)
        if self.busy:
            return
        # the common case inline: a reply to write and the next read (see _outcome)
        self.steps = steps = driver.process()
        outcome = step(steps)
        live = self.live
        if (
            outcome != "READ"
            or self.lost
            or self.server.stopping
            or live is None
            or live.kicked
            or self.read_paused
        ):
            self._advance(outcome)
            return
        out = driver.data_to_send()
        if out:
            assert self.transport is not None
            self.transport.write(out)
        live.reading = True
        deadline, timer = driver.deadline, self.timer
        if deadline is not None and (timer is None or timer.when() > deadline):
            self._arm()

    def eof_received(self) -> bool:
        if self.early is not None:
            self.early.append(b"")  # fed after the early bytes, in order
        elif self.driver is not None and not self.closed:
            self.driver.receive(b"")
            if not self.busy:
                self._process()
        # keep the transport open: replies may still be owed (asyncio's TLS transports
        # cannot half-close and warn if asked to)
        return self.transport is None or self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._cancel_timer()
        if exc is not None and self.driver is not None and not self.closed:
            log.info("%s connection lost: %r", self.driver.session.id, exc)
        if not self.busy:
            self._finish()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume_reading()

    # --- driving the engine -------------------------------------------------------------------

    def _process(self) -> None:
        assert self.driver is not None
        self.steps = self.driver.process()
        self._advance(step(self.steps))

    def _advance(self, result: Any) -> None:
        if isinstance(result, Pending):
            self._go_async(self._resume(result))
            return
        try:
            self._outcome(result)
        except Exception:  # a bug: log it, end this session only
            log.exception("session failed")
            self.abort()

    async def _resume(self, pending: Pending) -> None:
        value = await resolve(pending)
        assert self.steps is not None
        self.busy = False
        self._advance(step(self.steps, value))

    def _go_async(self, coro: Any) -> None:
        self.busy = True
        self._pause_reading()
        if self.live is not None:
            self.live.reading = False
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _outcome(self, outcome: str) -> None:
        driver, live, transport = self.driver, self.live, self.transport
        assert driver is not None and live is not None and transport is not None
        if self.lost:
            self._finish()
            return
        if outcome == "READ" and self.server.stopping:
            live.kick(force=False)
        if outcome == "READ" and live.kicked:
            driver.shutdown()
            outcome = "CLOSE"
        out = driver.data_to_send()
        if out:
            transport.write(out)
        if outcome == "CLOSE":
            self._close()
        elif outcome == "STARTTLS":
            self._go_async(self._starttls())
        else:
            live.reading = True
            self._arm()
            self._resume_reading()

    async def _starttls(self) -> None:
        assert self.transport is not None and self.server.tls_context is not None
        self.early = []
        try:
            transport = await self.loop.start_tls(
                self.transport,
                self,
                self.server.tls_context,
                server_side=True,
                ssl_handshake_timeout=self.config.command_timeout,
                ssl_shutdown_timeout=_CLOSE_WAIT,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.info("STARTTLS handshake failed: %r", exc)
            self.busy = False
            self.abort()
            self._finish()
            return
        self.transport = cast(asyncio.Transport, transport)
        self.read_paused, self.busy = False, False
        assert self.driver is not None
        self.driver.tls_established()
        early, self.early = self.early, None
        for data in early or ():
            self.driver.receive(data)
        self._process()

    def _wake(self) -> None:
        """A shutdown kick while waiting for input: 421 now."""
        if not self.busy and not self.closed:
            self._outcome("READ")

    # --- flow control, timers, closing ------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.read_paused and not (self.busy or self.write_paused or self.closed):
            self.read_paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    def _arm(self) -> None:
        """One TimerHandle per connection, re-armed lazily: the deadline moves on every read,
        and scheduling a timer per read would cost a heap push and a cancel each time."""
        assert self.driver is not None
        deadline = self.driver.deadline
        if deadline is None:
            return
        if self.timer is not None:
            if self.timer.when() <= deadline:
                return  # fires first and re-checks
            self.timer.cancel()
        self.timer = self.loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self.timer = None
        driver = self.driver
        if driver is None or self.closed or self.busy:
            return  # a handler is running: _outcome re-arms afterwards
        deadline = driver.deadline
        if deadline is not None and self.loop.time() < deadline:
            self._arm()
        elif driver.check_timeout():
            assert self.transport is not None
            self.transport.write(driver.data_to_send())
            self._close()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        assert self.transport is not None
        if self.write_paused:
            self.transport.abort()  # the client stopped reading: do not wait to flush
        else:
            self.transport.close()
        self._finish()

    def abort(self) -> None:
        """Drop the connection at once."""
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def _finish(self) -> None:
        """The session is over: on_message_aborted/on_disconnect, then forget it."""
        driver, live = self.driver, self.live
        if driver is None or live is None:
            return
        self.driver = None
        steps = driver.finish()
        result = step(steps)
        if isinstance(result, Pending):

            async def finish_async(pending: Pending) -> None:
                while isinstance(pending, Pending):
                    pending = step(steps, await resolve(pending))
                self.server.remove(live)

            task = self.loop.create_task(finish_async(result))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            self.server.remove(live)


async def serve(
    handler: Handler,
    config: ServerConfig,
    *,
    listen: Sequence[tuple[str, int]] = (("127.0.0.1", 2525),),
    sockets: Sequence[socket.socket] | None = None,
    tls_context: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    max_connections: int = 1000,
    grace: float = 30.0,
) -> None:
    """Serve SMTP until cancelled; cancellation is a graceful shutdown.

    Args:
        handler: the application's Handler (methods may be async).
        config: the engine configuration (``starttls=True`` needs ``tls_context``).
        listen: (host, port) pairs to bind, IPv4 or IPv6; ignored when ``sockets`` is given.
        sockets: already bound, listening sockets to serve on.
        tls_context: server-side SSLContext for STARTTLS and implicit TLS.
        implicit_tls: TLS from the first byte (port 465 style).
        max_connections: concurrent sessions; more are answered 421 4.7.0 and closed.
        grace: on shutdown, seconds transactions in progress get to finish before 421.

    Raises:
        ValueError: TLS requested without a tls_context.
        OSError: an address could not be bound.
    """
    server = _Server(
        handler,
        config,
        tls_context=tls_context,
        implicit_tls=implicit_tls,
        max_connections=max_connections,
    )
    await _run(server, sockets, listen, grace, None)


async def _run(
    server: _Server,
    sockets: Sequence[socket.socket] | None,
    listen: Sequence[tuple[str, int]],
    grace: float,
    ready: Callable[[], None] | None,
) -> None:
    owned = bind(listen) if sockets is None else []
    try:
        await server.run(sockets if sockets is not None else owned, grace, ready)
    finally:
        for sock in owned:
            sock.close()


class Controller(BaseController):
    """Runs :func:`serve` on its own event loop in a background thread.

    Args:
        handler: the application's Handler.
        config: the engine configuration.
        listen: addresses to bind (default 127.0.0.1 with a kernel-assigned port).
        tls_context, implicit_tls, max_connections: see :func:`serve`.
    """

    _server: _Server | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def _run(self, sockets: list[socket.socket]) -> None:
        server = _Server(self.handler, self.config, **self.options)
        self._server = server

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            await server.run(sockets, 0.0, self._ready.set)

        asyncio.run(main())

    def _request_stop(self, grace: float) -> None:
        server, loop = self._server, self._loop
        if server is not None and loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(server.request_stop, grace)

"""The SMTP server on asyncio streams: ``serve()`` and ``Controller``.

This module only moves bytes, sleeps until the engine's deadline and does TLS; every SMTP
decision is made by :mod:`mailwire.protocol` and the handler, through
:mod:`mailwire.adapters._driver`.  Handler methods may be ``async def``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Sequence

from mailwire.adapters._driver import (
    BaseController,
    Driver,
    Handler,
    Live,
    bind,
    new_session,
    refusal,
    run_async,
)
from mailwire.protocol._config import ServerConfig

__all__ = ["Controller", "serve"]

log = logging.getLogger("mailwire.adapters.asyncio")
READ_SIZE = 64 * 1024
_CLOSE_TIMEOUT = 5.0  # bound on flushing a 421 and closing after shutdown
_CLOSE_WAIT = 1.0  # how long a closing TLS transport waits for the peer's close_notify


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
        self.live: dict[asyncio.Task[None], Live] = {}
        self.stopping = False
        self.stop_requested: asyncio.Event | None = None
        self.grace = 0.0

    async def run(
        self, sockets: Sequence[socket.socket], grace: float, ready: Callable[[], None] | None
    ) -> None:
        self.grace = grace
        self.stop_requested = asyncio.Event()
        ctx = self.tls_context if self.implicit_tls else None
        servers = [
            await asyncio.start_server(
                self._connection, sock=sock, ssl=ctx, ssl_handshake_timeout=30.0 if ctx else None
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
        for live in self.live.values():
            live.kick(force=False)
        if self.live:
            await asyncio.wait(list(self.live), timeout=self.grace)
        for live in self.live.values():
            live.kick(force=True)
        if self.live:
            _, pending = await asyncio.wait(list(self.live), timeout=_CLOSE_TIMEOUT)
            for task in pending:
                task.cancel()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            if len(self.live) >= self.max_connections or self.stopping:
                log.warning("refusing %s: too many connections", writer.get_extra_info("peername"))
                writer.write(refusal(self.config))
                await writer.drain()
                return
            loop = asyncio.get_running_loop()
            session = new_session(
                writer.get_extra_info("peername"),
                writer.get_extra_info("sockname"),
                tls=self.implicit_tls,
            )
            driver = Driver(self.handler, self.config, session, clock=loop.time, logger=log)
            live = Live(driver=driver, wake=lambda: _cancel(task))
            self.live[task] = live
            log.debug("%s connect from %s", session.id, session.peer)
            try:
                await self._session(live, reader, writer)
            except (OSError, ssl.SSLError, EOFError, TimeoutError) as exc:
                log.info("%s connection lost: %r", session.id, exc)
            except Exception:  # a bug: log it, keep serving the others
                log.exception("%s session failed", session.id)
            finally:
                del self.live[task]
                await run_async(driver.finish())
        finally:
            writer.close()
            try:
                async with asyncio.timeout(_CLOSE_WAIT):
                    await writer.wait_closed()
            except TimeoutError:
                writer.transport.abort()  # a TLS peer that never answers close_notify
            except Exception:  # the connection is gone either way
                pass

    async def _session(
        self, live: Live, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        driver = live.driver
        task = asyncio.current_task()
        assert task is not None
        timer = _Timer(asyncio.get_running_loop(), task, live)
        try:
            while True:
                outcome = await run_async(driver.process())
                if outcome == "READ" and self.stopping:
                    live.kick(force=False)
                if outcome == "READ" and live.kicked:
                    driver.shutdown()
                    outcome = "CLOSE"
                out = driver.data_to_send()
                if out:
                    writer.write(out)
                    timer.in_io = True  # a peer that stops reading times out here
                    timer.arm()
                    try:
                        await writer.drain()  # back-pressure: never read with output pending
                    except asyncio.CancelledError:
                        if not timer.expired:
                            raise
                        task.uncancel()
                        raise TimeoutError("the client stopped reading") from None
                    finally:
                        timer.in_io = False
                if outcome == "CLOSE":
                    return
                if outcome == "STARTTLS":
                    assert self.tls_context is not None
                    await writer.start_tls(
                        self.tls_context, ssl_handshake_timeout=self.config.command_timeout
                    )
                    driver.tls_established()
                    continue
                live.reading = timer.in_io = True
                timer.arm()
                try:
                    data = await reader.read(READ_SIZE)
                except asyncio.CancelledError:
                    if not (timer.expired or live.kicked):
                        raise
                    task.uncancel()
                    if timer.expired:
                        timer.expired = False
                        if driver.check_timeout():
                            writer.write(driver.data_to_send())  # close() flushes it
                            return
                    continue  # a kick: the loop sends 421
                finally:
                    live.reading = timer.in_io = False
                driver.receive(data)
        finally:
            timer.cancel()


class _Timer:
    """Sleeps until the engine's deadline with one TimerHandle per connection, re-armed
    lazily: the deadline moves on every read, so scheduling a timer per read (as
    ``asyncio.timeout`` does) would cost a heap push and a cancel for each one."""

    __slots__ = ("loop", "task", "live", "handle", "expired", "in_io")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[None], live: Live):
        self.loop, self.task, self.live = loop, task, live
        self.handle: asyncio.TimerHandle | None = None
        self.expired = False
        self.in_io = False  # cancel only reads and drains, never a handler call

    def arm(self) -> None:
        deadline = self.live.driver.deadline
        if deadline is None:
            return
        handle = self.handle
        if handle is not None:
            if handle.when() <= deadline:
                return  # fires first and re-checks
            handle.cancel()
        self.handle = self.loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self.handle = None
        deadline = self.live.driver.deadline
        if deadline is None:
            return
        if self.loop.time() < deadline:
            self.handle = self.loop.call_at(deadline, self._fire)
        elif self.in_io:
            self.expired = True
            self.task.cancel()
        # else: in a handler call; arm() before the next read finds the deadline passed

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


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
        **options: tls_context, implicit_tls, max_connections (see :func:`serve`).
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

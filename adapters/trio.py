"""The SMTP server on trio streams: ``serve()`` and ``Controller``.

This module only moves bytes, sleeps until the engine's deadline and does TLS
(``trio.SSLStream``); every SMTP decision is made by :mod:`mailwire.protocol` and the handler,
through :mod:`mailwire.adapters._driver`.  Handler methods may be ``async def``.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import time
from collections.abc import Callable, Sequence

import trio

from mailwire.adapters._client_driver import SendError, SendResult
from mailwire.adapters._client_trio import send_message
from mailwire.adapters._driver import (
    BaseController,
    Driver,
    Handler,
    Live,
    Pending,
    bind,
    new_session,
    refusal,
    resolve,
    run_async,
    step,
)
from mailwire.protocol._config import ServerConfig

__all__ = ["Controller", "SendError", "SendResult", "send_message", "serve"]

log = logging.getLogger("mailwire.adapters.trio")
wait_readable = trio.lowlevel.wait_readable
READ_SIZE = 64 * 1024
_CLOSE_TIMEOUT = 5.0  # bound on flushing a 421 and closing after shutdown
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError)


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
        self.live: set[Live] = set()
        self.stopping = False
        self.stop_requested = trio.Event()
        self.grace = 0.0
        self.token: trio.lowlevel.TrioToken | None = None
        self.closed = trio.Event()  # set whenever a session ends
        # the engine's clock, and what to add to its readings to get trio's time (see _clock)
        self.clock: Callable[[], float] = trio.current_time
        self.offset = 0.0

    async def run(
        self, sockets: Sequence[socket.socket], grace: float, ready: Callable[[], None] | None
    ) -> None:
        self.grace = grace
        self.token = trio.lowlevel.current_trio_token()
        self.clock, self.offset = _clock()
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
        async with trio.open_nursery() as sessions:
            try:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(self._accept, listener, sessions)
                    log.info("listening on %s", [s.getsockname() for s in sockets])
                    if ready is not None:
                        ready()
                    await self.stop_requested.wait()
                    acceptors.cancel_scope.cancel()
            finally:  # cancellation (or a stop request): graceful shutdown
                with trio.CancelScope(shield=True):
                    await self._drain_sessions(sessions)

    def request_stop(self, grace: float) -> None:
        self.grace = grace
        self.stop_requested.set()

    async def _drain_sessions(self, sessions: trio.Nursery) -> None:
        self.stopping = True
        for live in list(self.live):
            live.kick(force=False)
        with trio.move_on_after(self.grace):
            await self._all_closed()
        for live in list(self.live):
            live.kick(force=True)
        with trio.move_on_after(_CLOSE_TIMEOUT):
            await self._all_closed()
        sessions.cancel_scope.cancel()

    async def _all_closed(self) -> None:
        while self.live:
            self.closed = trio.Event()
            await self.closed.wait()

    async def _accept(self, listener: trio.SocketListener, sessions: trio.Nursery) -> None:
        async with listener:
            while True:
                stream = await listener.accept()
                sessions.start_soon(self._connection, stream)

    async def _connection(self, raw: trio.SocketStream) -> None:
        stream: trio.abc.Stream = _Plain(raw)
        try:
            if self.implicit_tls:
                assert self.tls_context is not None
                stream = trio.SSLStream(stream, self.tls_context, server_side=True)
                with trio.fail_after(self.config.command_timeout):
                    await stream.do_handshake()
            if len(self.live) >= self.max_connections or self.stopping:
                log.warning("refusing %s: too many connections", raw.socket.getpeername())
                await stream.send_all(refusal(self.config))
                return
            session = new_session(
                raw.socket.getpeername(), raw.socket.getsockname(), tls=self.implicit_tls
            )
            driver = Driver(
                self.handler,
                self.config,
                session,
                clock=self.clock,
                logger=log,
                sleep=trio.sleep,
            )
            live = Live(driver=driver, wake=lambda: None)
            self.live.add(live)
            log.debug("%s connect from %s", session.id, session.peer)
            box = [stream]
            try:
                await self._session(live, box)
            except (*_STREAM_ERRORS, trio.TooSlowError) as exc:
                log.info("%s connection lost: %r", session.id, exc)
            except Exception:  # a bug: log it, keep serving the others
                log.exception("%s session failed", session.id)
            finally:
                stream = box[0]
                self.live.discard(live)
                self.closed.set()
                with trio.CancelScope(shield=True):
                    await run_async(driver.finish())
        except (*_STREAM_ERRORS, trio.TooSlowError) as exc:
            log.info("connection failed before the session: %r", exc)
        finally:
            with trio.move_on_after(_CLOSE_TIMEOUT) as cleanup:
                cleanup.shield = True
                try:
                    await stream.aclose()
                except _STREAM_ERRORS:
                    pass

    async def _session(self, live: Live, box: list[trio.abc.Stream]) -> None:
        """Run the session; ``box[0]`` is the stream (TLS-wrapped after STARTTLS).

        One CancelScope spans many exchanges, its deadline moved to the engine's deadline
        before each read (a new scope per read and per write costs more than the engine)."""
        driver = live.driver
        phase = [""]
        while True:
            with trio.CancelScope() as scope:
                live.wake = scope.cancel  # a shutdown kick cancels the read in progress
                if await self._exchange(live, box, scope, phase):
                    return
                continue  # the scope expired while the task was busy: a fresh one
            if phase[0] != "read":  # a write or handshake outlived its time: stream broken
                raise trio.TooSlowError(f"timeout in {phase[0]}")
            if not live.kicked and driver.check_timeout():
                with trio.fail_after(self.config.command_timeout):
                    await box[0].send_all(driver.data_to_send())
                return
            # a kick (or an early wake-up): the next exchange sends 421 or reads on

    async def _exchange(
        self, live: Live, box: list[trio.abc.Stream], scope: trio.CancelScope, phase: list[str]
    ) -> bool:
        """Exchanges until the session ends (True) or ``scope`` must be renewed (False).

        The scope's deadline is the engine's deadline, which a reply has just restarted: set
        before the reply is written, kept for the read that follows.  Moving it costs a heap
        operation (several microseconds in trio), so it is moved only when it is later than
        the engine's deadline or earlier by more than ``slack``; an early expiry is a
        spurious wake-up that _session() retries.  It must never be early by more than that:
        a scope whose deadline passes while the task is runnable is cancelled at the task's
        next checkpoint, which may be a handler's await (a spool commit), a TLS write or a
        handshake -- not a read -- and that would end a healthy session.  Only an awaitable
        handler result lifts it (handlers are never timed out).

        On a plain connection the reply is sent and the next read awaited right here, on the
        stdlib socket (see _Plain): two coroutine frames fewer to suspend and resume per
        exchange."""
        driver, timeout, offset = live.driver, self.config.command_timeout, self.offset
        slack = min(1.0, 0.1 * min(timeout, self.config.data_timeout))
        current = scope.deadline  # kept here: only this method moves it
        while True:
            steps = driver.process()
            outcome = step(steps)
            if isinstance(outcome, Pending):
                phase[0], scope.deadline = "process", math.inf
                current = math.inf
                while isinstance(outcome, Pending):
                    outcome = step(steps, await resolve(outcome))
            if outcome == "READ" and self.stopping:
                live.kick(force=False)
            if outcome == "READ" and live.kicked:
                driver.shutdown()
                outcome = "CLOSE"
            out = driver.data_to_send()
            if outcome == "READ":
                deadline = driver.deadline
                if deadline is None:  # not after a reply; a write is still bounded
                    deadline = driver.clock() + timeout if out else math.inf
                deadline += offset  # on trio's clock
                if current > deadline or current < deadline - slack:
                    scope.deadline = current = deadline
                stream = box[0]
                if type(stream) is _Plain:
                    sock = stream.raw
                    if out:
                        try:
                            sent = sock.send(out)
                        except BlockingIOError:
                            sent = 0
                        if sent < len(out):  # back-pressure: wait until the kernel took it
                            phase[0] = "write"
                            await stream.send_all(memoryview(out)[sent:])
                    phase[0] = "read"
                    live.reading = True
                    try:
                        while True:
                            await wait_readable(sock)
                            try:
                                data = sock.recv(READ_SIZE)
                                break
                            except BlockingIOError:
                                pass
                    finally:
                        live.reading = False
                else:
                    if out:
                        phase[0] = "write"
                        await stream.send_all(out)
                    phase[0] = "read"
                    live.reading = True
                    try:
                        chunk = await stream.receive_some(READ_SIZE)
                    finally:
                        live.reading = False
                    data = chunk if type(chunk) is bytes else bytes(chunk)
                driver.receive(data)
                if scope.cancel_called:
                    # The scope expired (up to ``slack`` early) after the read's data had
                    # arrived: trio would deliver it at the next checkpoint, which may be a
                    # handler's await, a TLS write or a handshake -- ending a session whose
                    # message may already be stored.  Renew the scope first; a real timeout
                    # is then found at the next read.
                    return False
                continue
            if out:
                phase[0], scope.deadline = "write", trio.current_time() + timeout
                current = scope.deadline
                await box[0].send_all(out)
            if outcome == "CLOSE":
                return True
            assert outcome == "STARTTLS" and self.tls_context is not None
            phase[0], scope.deadline = "handshake", trio.current_time() + timeout
            current = scope.deadline
            tls = trio.SSLStream(box[0], self.tls_context, server_side=True)
            box[0] = tls
            await tls.do_handshake()
            driver.tls_established()


def _clock() -> tuple[Callable[[], float], float]:
    """The engine's clock and its offset to trio's: ``time.perf_counter`` and the offset
    when the run's clock is trio's SystemClock (``offset + perf_counter()``, checked against
    trio.current_time), else trio.current_time itself and 0.  The driver reads the clock on
    every read and reply; trio.current_time() is three Python calls, perf_counter none."""
    clock = trio.lowlevel.current_clock()
    offset = getattr(clock, "offset", None)
    if type(clock).__name__ == "SystemClock" and isinstance(offset, float):
        if abs(offset + time.perf_counter() - trio.current_time()) < 0.001:
            return time.perf_counter, offset
    return trio.current_time, 0.0


class _Plain(trio.abc.Stream):
    """A SocketStream used through its stdlib socket: the session never sends and receives
    at the same time, so SocketStream's per-call conflict detection and error-translating
    context managers are pure overhead on the hot path.

    Checkpoints: receive_some() is one, as trio's recv is (cancellation is checked before
    the attempt; a read that succeeds at once still yields to the scheduler).  send_all()
    yields only when the kernel's buffer is full: every write of a session is followed by
    a read, whose checkpoint serves both.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._sock = stream.socket
        # the stdlib socket inside trio's (non-blocking; trio closes it with the stream)
        raw = getattr(stream.socket, "_sock", None)
        if not isinstance(raw, socket.socket):  # pragma: no cover - a trio without _sock
            raise RuntimeError("trio socket without its stdlib socket")
        self.raw = raw

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        sock = self.raw
        with memoryview(data) as view:
            sent, total = 0, len(view)
            while sent < total:
                try:
                    sent += sock.send(view[sent:])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                except OSError as exc:
                    raise trio.BrokenResourceError(exc) from exc

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        sock = self.raw
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = sock.recv(max_bytes or READ_SIZE)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from exc
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(max_bytes or READ_SIZE)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


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
    owned = bind(listen) if sockets is None else []
    try:
        await server.run(sockets if sockets is not None else owned, grace, None)
    finally:
        for sock in owned:
            sock.close()


class Controller(BaseController):
    """Runs :func:`serve` under ``trio.run`` in a background thread.

    Args:
        handler: the application's Handler.
        config: the engine configuration.
        listen: addresses to bind (default 127.0.0.1 with a kernel-assigned port).
        tls_context, implicit_tls, max_connections: see :func:`serve`.
    """

    _server: _Server | None = None

    def _run(self, sockets: list[socket.socket]) -> None:
        async def main() -> None:
            self._server = _Server(self.handler, self.config, **self.options)
            await self._server.run(sockets, 0.0, self._ready.set)

        trio.run(main)

    def _request_stop(self, grace: float) -> None:
        server = self._server
        if server is not None and server.token is not None:
            try:
                trio.from_thread.run_sync(server.request_stop, grace, trio_token=server.token)
            except trio.RunFinishedError:
                pass

"""The SMTP server on blocking sockets, one thread per connection: ``serve()`` and
``Controller``.

This module only moves bytes, sleeps until the engine's deadline (socket timeouts) and does
TLS (``SSLContext.wrap_socket``); every SMTP decision is made by :mod:`mailwire.protocol` and
the handler, through :mod:`mailwire.adapters._driver`.  Handler methods are plain functions.

Plain sockets are used in blocking mode with kernel timeouts (``SO_RCVTIMEO``/``SO_SNDTIMEO``)
instead of Python socket timeouts: a socket with a Python timeout polls before every recv() and
send(), and each extra syscall is a GIL hand-off that 20 busy threads fight over.  So a read is
one recv() and a reply one send().  The receive timeout follows the engine's deadline (it is
only reset when it is too long or far too short, so the common case costs no setsockopt); a
shutdown kick wakes a blocked recv() by shutting the socket's read side.  TLS sockets (after
STARTTLS, or implicit TLS) poll the socket and the shutdown phase pipe before each read.

Session threads share one CPU (``pin_sessions``, on by default where the OS supports it).  Only
one thread runs Python at a time anyway (the GIL), but when 20 session threads run on two
cores, every GIL hand-off wakes a thread on the other core, which often finds the GIL taken
again and sleeps: a convoy of futex waits and context switches.  Measured with smtp-source
(1 KB messages, 20 sessions, 2 cores): 197 us of CPU per message unpinned (130 of it in the
kernel), 90 us pinned, and 0.55x -> 0.92x the asyncio adapter's messages/s.  On one CPU a
thread woken by its socket runs when the GIL holder blocks, and takes the GIL uncontended.
The cost: what session threads do outside the GIL (TLS encryption, the kernel's copying)
no longer spreads over cores.  Worker threads the server does not start itself are not
pinned unless a session thread creates them (Linux threads inherit their creator's CPU
mask): the spool's committer and fsync pool are started elsewhere, and the password-hashing
pool, started by the first AUTH, resets its threads to its creator's CPUs.  The CPU is the
one the server starts on, so several servers spread over the cores as the kernel placed
them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence

from mailwire.adapters._client_driver import SendError, SendResult
from mailwire.adapters._client_threads import send_message
from mailwire.adapters._driver import (
    BaseController,
    Driver,
    Handler,
    Live,
    bind,
    new_session,
    refusal,
    run_sync,
)
from mailwire.protocol._config import ServerConfig

__all__ = ["Controller", "SendError", "SendResult", "send_message", "serve"]

log = logging.getLogger("mailwire.adapters.threads")
READ_SIZE = 64 * 1024
_CLOSE_TIMEOUT = 5.0  # bound on flushing a 421 and joining sessions after shutdown
_TIMEOUT_SLACK = 0.01  # a receive timeout up to this much longer than the deadline is kept


class _Server:
    def __init__(
        self,
        handler: Handler,
        config: ServerConfig,
        *,
        tls_context: ssl.SSLContext | None,
        implicit_tls: bool,
        max_connections: int,
        pin_sessions: bool = True,
    ) -> None:
        if (config.starttls or implicit_tls) and tls_context is None:
            raise ValueError("STARTTLS or implicit TLS needs a tls_context")
        self.pin_sessions = pin_sessions
        self.cpu: int | None = None  # the session threads' CPU (chosen by run())
        self.handler, self.config = handler, config
        self.tls_context, self.implicit_tls = tls_context, implicit_tls
        self.max_connections = max_connections
        self.lock = threading.Lock()
        self.live: dict[Live, threading.Thread] = {}
        self.threads: set[threading.Thread] = set()
        self.stopping = False
        self.grace = 0.0
        self._wakeup_r, self._wakeup_w = socket.socketpair()  # wakes the accept loop
        # Sessions poll their socket plus the pipe of the current shutdown phase (0: running,
        # 1: shutdown began, 2: grace is over); kick flags are set before a pipe is written.
        self._phase_pipes = (socket.socketpair(), socket.socketpair())
        self._phase = 0

    def run(
        self, sockets: Sequence[socket.socket], grace: float, ready: Callable[[], None] | None
    ) -> None:
        self.grace = grace
        self.cpu = current_cpu() if self.pin_sessions else None
        with selectors.DefaultSelector() as sel:
            for sock in sockets:
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
            sel.register(self._wakeup_r, selectors.EVENT_READ)
            log.info("listening on %s", [s.getsockname() for s in sockets])
            if ready is not None:
                ready()
            try:
                while not self.stopping:
                    for key, _ in sel.select():
                        if key.fileobj is not self._wakeup_r:
                            self._accept(key.fileobj)  # type: ignore[arg-type]
            finally:
                for sock in sockets:  # stop accepting: new connections are refused
                    sel.unregister(sock)
                    sock.close()
                self._drain_sessions()
                for sock in (self._wakeup_r, self._wakeup_w, *sum(self._phase_pipes, ())):
                    sock.close()

    def request_stop(self, grace: float) -> None:
        self.grace = grace
        self.stopping = True
        with contextlib.suppress(OSError):
            self._wakeup_w.send(b"x")

    def _drain_sessions(self) -> None:
        self.stopping = True
        self._broadcast(force=False)
        _join(self._threads(), self.grace)
        self._broadcast(force=True)
        _join(self._threads(), _CLOSE_TIMEOUT)

    def _broadcast(self, *, force: bool) -> None:
        with self.lock:
            lives = list(self.live)
        for live in lives:
            live.kick(force=force)
        self._phase_pipes[force][1].send(b"x")
        self._phase = 2 if force else 1

    def _threads(self) -> list[threading.Thread]:
        with self.lock:
            return list(self.threads)

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:  # EMFILE and friends: log, back off briefly, keep serving
            log.error("accept failed: %s", exc)
            time.sleep(0.1)
            return
        sock.setblocking(True)
        # replies are small writes awaited by the client: no Nagle delay (asyncio and trio
        # set this by themselves)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        thread = threading.Thread(target=self._connection, args=(sock,), daemon=True)
        with self.lock:
            self.threads.add(thread)
        thread.start()

    def _connection(self, sock: socket.socket) -> None:
        if self.cpu is not None:
            with contextlib.suppress(OSError):  # the CPU went offline: run anywhere
                os.sched_setaffinity(0, {self.cpu})  # this thread only (Linux)
        try:
            if self.implicit_tls:
                assert self.tls_context is not None
                sock.settimeout(self.config.command_timeout)
                sock = self.tls_context.wrap_socket(sock, server_side=True)
            else:  # blocking, with kernel timeouts (see the module docstring)
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.config.command_timeout)
                )
            session = new_session(sock.getpeername(), sock.getsockname(), tls=self.implicit_tls)
            driver = Driver(self.handler, self.config, session, clock=time.monotonic, logger=log)
            reader = _Reader(sock)
            live = Live(driver=driver, wake=reader.wake)  # TLS reads: woken by the phase pipes
            with self.lock:  # count and take the place at once: sessions start in parallel
                refuse = len(self.live) >= self.max_connections or self.stopping
                if not refuse:
                    self.live[live] = threading.current_thread()
            if refuse:
                log.warning("refusing %s: too many connections", session.peer)
                sock.sendall(refusal(self.config))
                return
            log.debug("%s connect from %s", session.id, session.peer)
            try:
                sock = self._session(live, sock, reader)
            except (OSError, ssl.SSLError) as exc:
                log.info("%s connection lost: %r", session.id, exc)
            except Exception:  # a bug: log it, keep serving the others
                log.exception("%s session failed", session.id)
            finally:
                with self.lock:
                    del self.live[live]
                run_sync(driver.finish())
        except (OSError, ssl.SSLError) as exc:
            log.info("connection failed before the session: %r", exc)
        finally:
            sock.close()
            with self.lock:
                self.threads.discard(threading.current_thread())

    def _session(self, live: Live, sock: socket.socket, reader: _Reader) -> socket.socket:
        """Run the session; returns the socket (TLS-wrapped after STARTTLS) to close."""
        driver = live.driver
        while True:
            outcome = run_sync(driver.process())
            if outcome == "READ" and self.stopping:
                live.kick(force=False)
            if outcome == "READ" and live.kicked:
                driver.shutdown()
                outcome = "CLOSE"
            out = driver.data_to_send()
            if out:
                sock.sendall(out)  # blocks until the kernel took it: back-pressure
            if outcome == "CLOSE":
                return sock
            if outcome == "STARTTLS":
                assert self.tls_context is not None
                sock.settimeout(self.config.command_timeout)
                sock = self.tls_context.wrap_socket(sock, server_side=True)
                reader.sock = sock
                driver.tls_established()
                continue
            try:
                if isinstance(sock, ssl.SSLSocket):
                    data = self._read_tls(live, sock)
                else:
                    data = reader.read(live)
            except TimeoutError:
                if driver.check_timeout():
                    sock.sendall(driver.data_to_send())
                    return sock
                continue
            if data is not None:
                driver.receive(data)
            # None: kicked by shutdown, the loop sends 421

    def _read_tls(self, live: Live, sock: ssl.SSLSocket) -> bytes | None:
        """Up to READ_SIZE bytes, or None when shutdown kicked this session.

        The engine's deadline and the shutdown phase pipes are polled first; the socket's own
        timeout then bounds a recv() that waits for the rest of a TLS record.

        Raises:
            TimeoutError: the engine's deadline passed.
        """
        while not live.kicked:
            if sock.pending():
                break  # decrypted bytes are buffered: poll() would not see them
            deadline = live.driver.deadline
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            poller.register(self._phase_pipes[min(self._phase, 1)][0], select.POLLIN)
            ready = poller.poll(None if remaining is None else math.ceil(remaining * 1000))
            if not ready:
                raise TimeoutError
            if any(fd == sock.fileno() for fd, _ in ready):
                break
        else:
            return None
        # a partial TLS record can still block recv()
        sock.settimeout(self.config.command_timeout if remaining is None else remaining + 0.001)
        return sock.recv(READ_SIZE)


class _Reader:
    """Reads a plain blocking socket with the engine's deadline as the kernel's receive
    timeout, and wakes a blocked read at shutdown.

    Attributes:
        sock: the connection's socket (replaced by the TLS socket after STARTTLS).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.timeout: float | None = None  # the SO_RCVTIMEO in force (None: never set)
        # recv() would allocate READ_SIZE per call and shrink it; from a thread's own malloc
        # arena that costs page faults (3 per 100 KB message)
        self.buffer = memoryview(bytearray(READ_SIZE))

    def read(self, live: Live) -> bytes | None:
        """Up to READ_SIZE bytes (b"" at end of file), or None when shutdown kicked this
        session.

        Raises:
            TimeoutError: the receive timeout expired (the engine's deadline may have passed).
        """
        sock = self.sock
        live.reading = True  # set before kicked is tested: a kick in between wakes recv()
        try:
            if live.kicked:
                return None
            deadline = live.driver.deadline
            if deadline is None:
                if self.timeout != 0.0:
                    self._set_timeout(0.0)  # no deadline: wait for ever
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                current = self.timeout
                if not current or not remaining / 2 <= current <= remaining + _TIMEOUT_SLACK:
                    self._set_timeout(remaining)
            n = sock.recv_into(self.buffer)
        except BlockingIOError:  # SO_RCVTIMEO expired (EAGAIN on a blocking socket)
            raise TimeoutError from None
        finally:
            live.reading = False
        if not n and live.kicked:
            return None  # woken by wake(), not the client's end of file
        return self.buffer[:n].tobytes()

    def _set_timeout(self, seconds: float) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        self.timeout = seconds

    def wake(self) -> None:
        """Interrupt a blocked read: shut the read side of a plain socket (recv() returns
        b""); TLS sockets are woken by the phase pipes instead."""
        sock = self.sock
        if not isinstance(sock, ssl.SSLSocket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)


def current_cpu() -> int | None:
    """The CPU the calling thread runs on, if the OS lets threads be pinned and says which
    (Linux: field 39 of /proc/thread-self/stat); else None."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        with open("/proc/thread-self/stat", "rb") as f:
            stat = f.read()
        cpu = int(stat.rpartition(b")")[2].split()[36])  # fields after the name start at 3
        allowed = os.sched_getaffinity(0)
    except (OSError, ValueError, IndexError):
        return None
    return cpu if cpu in allowed and len(allowed) > 1 else None


def _timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO/SO_SNDTIMEO, rounded up to the microsecond (a zero
    timeval means no timeout, so a positive time never rounds down to it)."""
    usec = max(math.ceil(seconds * 1e6), 1) if seconds > 0 else 0
    return struct.pack("@ll", usec // 1_000_000, usec % 1_000_000)


def _join(threads: list[threading.Thread], timeout: float) -> None:
    end = time.monotonic() + timeout
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join(max(end - time.monotonic(), 0.0))


def serve(
    handler: Handler,
    config: ServerConfig,
    *,
    listen: Sequence[tuple[str, int]] = (("127.0.0.1", 2525),),
    sockets: Sequence[socket.socket] | None = None,
    tls_context: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    max_connections: int = 1000,
    grace: float = 30.0,
    pin_sessions: bool = True,
) -> None:
    """Serve SMTP until KeyboardInterrupt (a graceful shutdown); blocks.

    Args:
        handler: the application's Handler (plain methods).
        config: the engine configuration (``starttls=True`` needs ``tls_context``).
        listen: (host, port) pairs to bind, IPv4 or IPv6; ignored when ``sockets`` is given.
        sockets: already bound, listening sockets to serve on.
        tls_context: server-side SSLContext for STARTTLS and implicit TLS.
        implicit_tls: TLS from the first byte (port 465 style).
        max_connections: concurrent sessions; more are answered 421 4.7.0 and closed.
        grace: on shutdown, seconds transactions in progress get to finish before 421.
        pin_sessions: run every session thread on one CPU, the one the server starts on (see
            the module docstring: half the CPU per message with many sessions); False lets
            them run anywhere.  Ignored where threads cannot be pinned.

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
        pin_sessions=pin_sessions,
    )
    owned = bind(listen) if sockets is None else []
    try:
        server.run(sockets if sockets is not None else owned, grace, None)
    except KeyboardInterrupt:
        pass
    finally:
        for sock in owned:
            sock.close()


class Controller(BaseController):
    """Runs :func:`serve` in a background thread (plus one thread per connection).

    Args:
        handler: the application's Handler.
        config: the engine configuration.
        listen: addresses to bind (default 127.0.0.1 with a kernel-assigned port).
        tls_context, implicit_tls, max_connections, pin_sessions: see :func:`serve`.
    """

    _server: _Server | None = None

    def __init__(
        self,
        handler: Handler,
        config: ServerConfig,
        *,
        listen: Sequence[tuple[str, int]] = (("127.0.0.1", 0),),
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        max_connections: int = 1000,
        pin_sessions: bool = True,
    ) -> None:
        super().__init__(
            handler,
            config,
            listen=listen,
            tls_context=tls_context,
            implicit_tls=implicit_tls,
            max_connections=max_connections,
        )
        self.options["pin_sessions"] = pin_sessions

    def _run(self, sockets: list[socket.socket]) -> None:
        self._server = _Server(self.handler, self.config, **self.options)
        self._server.run(sockets, 0.0, self._ready.set)

    def _request_stop(self, grace: float) -> None:
        if self._server is not None:
            self._server.request_stop(grace)

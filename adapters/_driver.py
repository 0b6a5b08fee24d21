# The glue every runtime adapter shares: Session, Handler, and the event -> handler -> Reply
# plumbing, written once.
#
# Strategy.  The SMTP decisions live in mailwire.protocol; the application's policy lives in a
# Handler.  Between them sits Driver.process(), a *generator* that pulls events out of the
# ServerConnection and, wherever the application must be asked, yields a Call ("call this
# handler method with these arguments") and receives the result through send().  It never
# calls a handler itself, so the same decision logic serves synchronous handlers (run_sync)
# and async ones (run_async awaits whatever is awaitable; it uses no asyncio or trio API, so
# it runs on both).  Sync-vs-async is the only difference between the adapters' drivers.
#
# Outcomes.  process() returns what the adapter must do next with the socket:
#   READ      flush data_to_send(), then read more (or sleep until `deadline`);
#   STARTTLS  flush the 220, do the TLS handshake, then call tls_established();
#   CLOSE     flush and close; call finish() for on_message_aborted/on_disconnect.
#
# Invariants.
#   * Every reply the engine is owed is sent exactly once: the default replies of the API
#     contract (adapter-api.md) when a handler returns None, 451 4.3.0 when a handler raises
#     (421 4.3.0 for the greeting, which may only be 220/421/554, RFC 5321 3.1).
#   * on_message_start/on_message_data/on_message_end|on_message_aborted bracket every
#     message; a message is never half-reported: if on_message_start/on_message_data raises,
#     the rest of the message is discarded, the handler hears on_message_aborted and the
#     client gets 451 (RFC 5321 4.2.5: the server must not lose a message it accepted).
#   * LMTP (RFC 2033 4.2): one reply per accepted recipient, in recipient order.
#   * The plumbing (Driver, step/run_sync/run_async, Live) does no I/O and reads the clock
#     only through the `clock` it is given.  Shared by the three runtimes but not I/O-free:
#     bind() (listening sockets, IPv6-only for IPv6 hosts) and BaseController (a server in a
#     background thread, for tests and embedding).
#
# Running the generator.  run_sync (threads) calls every handler inline; run_async (asyncio,
# trio) awaits results that are awaitable; step() runs inline until a handler returns an
# awaitable and hands back a Pending, which is what the asyncio Protocol adapter uses so that
# synchronous handlers never cost a task switch.  Handler exceptions are sent back into the
# generator as a failure value, never raised through it.
#
# Cost.  A handler hook that is still Handler's own (not overridden in the handler's class,
# not set on the instance; decided once per connection) is not called at all: its result is
# known to be None, i.e. the default reply, and the call would cost more than the engine's
# work for the command.  The commands of every transaction (MAIL, RCPT, DATA, message data,
# end of message) are dispatched by exact type before the general match.  With a discarding
# handler this leaves ~8 us per 1 KB message of smtp-source traffic on top of the engine.
#
# Graceful shutdown.  Live records a connection for its adapter; kick() marks it for a 421
# (only when idle unless forced) and wakes a blocked read; the adapter sends the 421 the next
# time the session would read.
from __future__ import annotations

import inspect
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from mailwire.protocol._config import ServerConfig
from mailwire.protocol._errors import LocalProtocolError, RemoteProtocolError
from mailwire.protocol._events import (
    NEED_DATA,
    PAUSED,
    AuthCredentials,
    Bdat,
    CommandRejected,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfMessage,
    Helo,
    Lhlo,
    MailFrom,
    MessageData,
    MessageRejected,
    RcptTo,
    Reply,
    Rset,
    Vrfy,
)
from mailwire.protocol._server import Envelope, ServerConnection
from mailwire.protocol._state import SessionState

Outcome: TypeAlias = Literal["READ", "STARTTLS", "CLOSE"]
HandlerResult: TypeAlias = "Reply | Sequence[Reply] | None"
_IDLE_STATES = frozenset({SessionState.HELLO, SessionState.READY})
_MESSAGE_STATES = frozenset({SessionState.DATA, SessionState.CHUNKING})
_SHUTDOWN_TEXT = "4.3.2 {host} Service shutting down, closing connection"
# Replies are immutable values: the defaults are built once, not per command.
_OK = Reply(code=250, text="OK")
_FAILED = Reply(code=451, text="4.3.0 Local error in processing")
_VRFY_DEFAULT = Reply(code=252, text="Cannot VRFY user, but will accept message")
_AUTH_DEFAULT = Reply(code=535, text="Authentication credentials invalid")
_HOOKS = (
    "on_connect",
    "on_hello",
    "on_mail_from",
    "on_rcpt_to",
    "on_vrfy",
    "on_auth",
    "on_message_start",
    "on_message_data",
    "on_message_end",
    "on_message_aborted",
    "on_disconnect",
)


@dataclass(slots=True, kw_only=True)
class Session:
    """One client connection, passed to every handler call.

    Attributes:
        id: connection id, for logs.
        peer: the client's address (host, port).
        local: the local address (host, port).
        tls: TLS is active (after STARTTLS, or implicit TLS).
        hello: the accepted EHLO/HELO/LHLO argument.
        authenticated_as: the username accepted by AUTH.
        envelope: the current transaction (sender, accepted recipients).
        extra: free for the handler's own use.
    """

    id: str
    peer: tuple[str, int]
    local: tuple[str, int]
    tls: bool = False
    hello: str | None = None
    authenticated_as: str | None = None
    envelope: Envelope = field(default_factory=Envelope)
    extra: dict[str, object] = field(default_factory=dict)


class Handler:
    """The application's policy.  Subclass and override; every method has a default.

    Methods returning ``Reply | None`` answer a decision; ``None`` means the default reply.
    On asyncio and trio any method may be ``async def``; on threads they are plain functions.
    """

    def on_connect(self, session: Session) -> Reply | None:
        """The greeting: 220 (default ``220 <hostname> ESMTP mailwire``) or 554/421."""
        return None

    def on_hello(self, session: Session, event: Helo | Ehlo | Lhlo) -> Reply | None:
        """EHLO/HELO/LHLO; default 250 (the engine appends the extensions)."""
        return None

    def on_mail_from(self, session: Session, event: MailFrom) -> Reply | None:
        """MAIL FROM; default ``250 2.1.0``."""
        return None

    def on_rcpt_to(self, session: Session, event: RcptTo) -> Reply | None:
        """RCPT TO; default ``250 2.1.5``."""
        return None

    def on_vrfy(self, session: Session, event: Vrfy) -> Reply | None:
        """VRFY; default ``252 2.5.0`` (RFC 5321 3.5.3)."""
        return None

    def on_auth(self, session: Session, event: AuthCredentials) -> Reply | None:
        """Completed AUTH PLAIN/LOGIN; default ``535 5.7.8`` (deny).  Accept with 235."""
        return None

    def on_message_start(self, session: Session) -> None:
        """A message body begins (after DATA's 354, or the first BDAT chunk)."""

    def on_message_data(self, session: Session, data: bytes) -> None:
        """A chunk of the un-dot-stuffed message content."""

    def on_message_end(self, session: Session) -> Reply | Sequence[Reply] | None:
        """The message is complete; default ``250 2.0.0``.  Return 250 only once the message
        is durably stored.  LMTP: one Reply per accepted recipient (a sequence); a single
        Reply (or None) applies to all of them."""
        return None

    def on_message_aborted(self, session: Session) -> None:
        """The message was rejected by the engine, or the connection died mid-message."""

    def on_disconnect(self, session: Session) -> None:
        """The connection is over."""


class MessageHandler(Handler):
    """The default handler: accepts every sender and recipient and hands each complete
    message to ``callback(data, envelope)`` (may be async on asyncio/trio).

    The message is held in memory (bounded by the engine's ``max_message_size``).

    Args:
        callback: called with the message bytes and the transaction's Envelope; its return
            value is ignored unless it is a Reply (or sequence of Replies, for LMTP).
    """

    def __init__(
        self,
        callback: Callable[[bytes, Envelope], object],
    ) -> None:
        self.callback = callback

    def on_message_start(self, session: Session) -> None:
        session.extra["_mailwire_chunks"] = []

    def on_message_data(self, session: Session, data: bytes) -> None:
        chunks = session.extra["_mailwire_chunks"]
        assert isinstance(chunks, list)
        chunks.append(data)

    def on_message_end(self, session: Session) -> Any:
        chunks = session.extra.pop("_mailwire_chunks", [])
        assert isinstance(chunks, list)
        result = self.callback(b"".join(chunks), session.envelope)
        if inspect.isawaitable(result):
            return _await_reply(result)
        return result if isinstance(result, (Reply, list, tuple)) else None

    def on_message_aborted(self, session: Session) -> None:
        session.extra.pop("_mailwire_chunks", None)


async def _await_reply(result: Awaitable[object]) -> HandlerResult:
    value = await result
    return value if isinstance(value, (Reply, list, tuple)) else None


@dataclass(frozen=True, slots=True)
class Call:
    """A handler call the driver asks the adapter to make: ``fn(*args)``."""

    fn: Callable[..., object]
    args: tuple[object, ...]


Steps: TypeAlias = Generator[Call, object, Outcome]


class _Failed:
    """Sent into the generator in place of a result when the handler raised."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Driver:
    """One connection's engine plus its handler plumbing; no I/O.

    Args:
        handler: the application's Handler.
        config: the engine configuration.
        session: the Session handed to the handler.
        clock: returns the current time (the clock deadlines are measured on).
        logger: where handler errors and rejected commands are logged.
    """

    def __init__(
        self,
        handler: Handler,
        config: ServerConfig,
        session: Session,
        *,
        clock: Callable[[], float],
        logger: logging.Logger,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.handler = handler
        self.config = config
        self.session = session
        self.clock = clock
        self.sleep = sleep  # the runtime's sleep (awaitable on asyncio and trio)
        self.log = logger
        self.conn = ServerConnection(config, tls_active=session.tls, now=clock())
        # Hooks the handler leaves as Handler's do-nothing defaults are not called at all:
        # their result is known (None, the default reply), and a call costs more than the
        # engine's work for most commands.
        self._skip = _defaults(handler)
        self.in_message = False
        self._message_failed = False
        self._greeted = False
        self._finished = False

    # --- views for the adapter ----------------------------------------------------------------

    @property
    def deadline(self) -> float | None:
        """When check_timeout() is due (on ``clock``), or None."""
        return self.conn.deadline

    @property
    def idle(self) -> bool:
        """Between transactions with nothing owed: safe to close with 421 at shutdown."""
        c = self.conn
        return c.state in _IDLE_STATES and c.envelope.sender is None and not c.owes_reply

    def data_to_send(self) -> bytes:
        """Bytes to write to the client."""
        return self.conn.data_to_send()

    def receive(self, data: bytes) -> None:
        """Feed bytes read from the socket; ``b""`` means end of file."""
        if data:
            self.conn.receive_data(data, now=self.clock())
        else:
            self.conn.receive_eof()

    def check_timeout(self) -> bool:
        """True (421 4.4.2 queued) if the engine's deadline has passed: flush and close."""
        if self.conn.check_timeout(self.clock()):
            self.log.info("%s timeout in state %s", self.session.id, self.conn.state.name)
            return True
        return False

    def shutdown(self) -> None:
        """Queue ``421 4.3.2`` (server shutting down) and end the session."""
        text = _SHUTDOWN_TEXT.format(host=self.config.hostname)
        self.conn.close(Reply(code=421, text=text))

    def tls_established(self) -> None:
        """The STARTTLS handshake succeeded (the client's command time starts now)."""
        self.conn.tls_established(now=self.clock())
        self._sync()

    # --- the decision plumbing ------------------------------------------------------------------

    def _sync(self) -> None:
        s, c = self.session, self.conn
        s.tls = c.tls_active
        s.hello = c.peer_domain
        s.authenticated_as = c.authenticated_as
        s.envelope = c.envelope

    def _send(self, reply: Reply) -> bool:
        try:
            self.conn.send(reply, now=self.clock())
        except LocalProtocolError as exc:
            self.log.error("%s handler reply refused by the engine: %s", self.session.id, exc)
            self.conn.close(Reply(code=421, text="4.3.0 Local error, closing connection"))
            return False
        self._sync()
        return True

    def _ask(self, fn: Callable[..., object], *args: object) -> Generator[Call, object, object]:
        if getattr(fn, "__name__", None) in self._skip:
            return None  # Handler's default: does nothing, returns None
        result = yield Call(fn, (self.session, *args))
        if isinstance(result, _Failed):
            self._log_failure(fn, result)
        return result

    def _log_failure(self, fn: Callable[..., object], failed: _Failed) -> None:
        self.log.error(
            "%s handler %s failed",
            self.session.id,
            getattr(fn, "__name__", fn),
            exc_info=(type(failed.exc), failed.exc, failed.exc.__traceback__),
        )

    def _answer(
        self, fn: Callable[..., object], default: Reply, *args: object
    ) -> Generator[Call, object, Reply]:
        result = yield from self._ask(fn, *args)
        if isinstance(result, _Failed):
            return _FAILED
        if result is None:
            return default
        if not isinstance(result, Reply):
            self.log.error("%s %r returned %r, not a Reply", self.session.id, fn, result)
            return _FAILED
        return result

    def _decide(
        self, fn: Callable[..., object], default: Reply, *args: object
    ) -> Generator[Call, object, bool]:
        return self._send((yield from self._answer(fn, default, *args)))

    def process(self) -> Steps:
        """Drive the engine until it needs bytes, a TLS handshake, or the session is over.

        Yields:
            Call: a handler call to make; send its result (or raise into it) back.

        Returns:
            "READ", "STARTTLS" or "CLOSE".
        """
        h, cfg, conn, skip = self.handler, self.config, self.conn, self._skip
        if not self._greeted:
            self._greeted = True
            result = yield from self._ask(h.on_connect)
            if isinstance(result, _Failed):
                result = Reply(code=421, text=f"{cfg.hostname} 4.3.0 Local error")
            elif not isinstance(result, Reply):
                result = Reply(code=220, text=f"{cfg.hostname} ESMTP mailwire")
            if not self._send(result):
                return "CLOSE"
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                self.log.info("%s protocol error: %s", self.session.id, exc)
                return "CLOSE"
            if event is NEED_DATA:
                return "READ"
            if event is PAUSED:
                if conn.state is SessionState.STARTTLS:
                    return "STARTTLS"
                return "CLOSE"  # pragma: no cover - every owed decision is answered below
            ok = True
            kind = type(event)
            # the commands of every transaction first, without the match's isinstance chain
            if kind is MessageData:
                if not (self._message_failed or "on_message_data" in skip):
                    data = event.data  # type: ignore[union-attr]
                    result = yield Call(h.on_message_data, (self.session, data))
                    if isinstance(result, _Failed):
                        self._log_failure(h.on_message_data, result)
                        self._message_failed = True
                continue
            if kind is MailFrom or kind is RcptTo:
                name = "on_mail_from" if kind is MailFrom else "on_rcpt_to"
                if name in skip:
                    ok = self._send(_OK)
                else:
                    ok = yield from self._decide(getattr(h, name), _OK, event)
                if not ok:
                    return "CLOSE"
                continue
            if kind is Data and "on_message_start" in skip:
                self.in_message, self._message_failed = True, False
                continue
            if (
                kind is EndOfMessage
                and "on_message_end" in skip
                and not (self._message_failed or cfg.lmtp)
            ):
                self.in_message = False
                if not self._send(_OK):
                    return "CLOSE"
                continue
            match event:
                case Helo() | Ehlo() | Lhlo():
                    hello = Reply(code=250, text=f"{cfg.hostname} Hello {event.domain}")
                    ok = yield from self._decide(h.on_hello, hello, event)
                case Vrfy():
                    ok = yield from self._decide(h.on_vrfy, _VRFY_DEFAULT, event)
                case AuthCredentials():
                    reply = yield from self._answer(h.on_auth, _AUTH_DEFAULT, event)
                    if reply.code != 235 and cfg.auth_failure_delay > 0:
                        # slow password guessing down; the runtime's sleep does not block
                        # other sessions (asyncio/trio await it, threads sleep this thread)
                        yield Call(self.sleep, (cfg.auth_failure_delay,))
                    ok = self._send(reply)
                case Data():
                    yield from self._start_message()
                case Bdat():
                    if not self.in_message:
                        yield from self._start_message()
                case EndOfMessage():
                    ok = yield from self._end_message()
                case MessageRejected():
                    yield from self._abort_message()
                case CommandRejected():
                    self.log.debug("%s rejected %r: %s", self.session.id, event.line, event.reply)
                    if self.in_message and conn.state not in _MESSAGE_STATES:
                        yield from self._abort_message()  # a failed BDAT ends the transaction
                    self._sync()
                case Rset():
                    if self.in_message:
                        yield from self._abort_message()
                    self._sync()
                case ConnectionClosed():
                    return "CLOSE"
                case _:
                    pass  # NOOP, HELP, QUIT, EXPN, STARTTLS: answered by the engine
            if not ok:
                return "CLOSE"

    def _start_message(self) -> Generator[Call, object, None]:
        self.in_message = True
        self._message_failed = False
        result = yield from self._ask(self.handler.on_message_start)
        if isinstance(result, _Failed):
            self._message_failed = True

    def _abort_message(self) -> Generator[Call, object, None]:
        if self.in_message:
            self.in_message = False
            yield from self._ask(self.handler.on_message_aborted)

    def _end_message(self) -> Generator[Call, object, bool]:
        count = len(self.conn.envelope.recipients) if self.config.lmtp else 1
        failed = _FAILED
        if self._message_failed:
            yield from self._abort_message()
            replies: list[Reply] = [failed] * count
        else:
            self.in_message = False
            result = yield from self._ask(self.handler.on_message_end)
            if isinstance(result, _Failed):
                result = failed
            if result is None:
                replies = [_OK] * count
            elif isinstance(result, Reply):
                replies = [result] * count
            elif isinstance(result, (list, tuple)) and all(isinstance(r, Reply) for r in result):
                replies = list(result)
            else:
                self.log.error("%s on_message_end returned %r", self.session.id, result)
                replies = [failed] * count
            if len(replies) != count:
                self.log.error(
                    "%s on_message_end gave %d replies for %d recipients",
                    self.session.id,
                    len(replies),
                    count,
                )
                replies = [failed] * count
        for reply in replies:
            if not self._send(reply):
                return False
        return True

    def finish(self) -> Generator[Call, object, None]:
        """The connection is closed: on_message_aborted (if mid-message), on_disconnect."""
        if self._finished:
            return
        self._finished = True
        yield from self._abort_message()
        yield from self._ask(self.handler.on_disconnect)


def _defaults(handler: Handler) -> frozenset[str]:
    """The hooks ``handler`` leaves as Handler's own (not overridden in its class nor set on
    the instance)."""
    cls, own = type(handler), getattr(handler, "__dict__", {})
    return frozenset(
        name
        for name in _HOOKS
        if name not in own and getattr(cls, name, None) is getattr(Handler, name)
    )


def run_sync(steps: Generator[Call, object, Any]) -> Any:
    """Run a driver generator, calling each handler synchronously.

    Returns:
        The generator's return value (an Outcome for process()).
    """
    try:
        call = next(steps)
        while True:
            try:
                result: object = call.fn(*call.args)
            except Exception as exc:
                result = _Failed(exc)
            call = steps.send(result)
    except StopIteration as stop:
        return stop.value


@dataclass(frozen=True, slots=True)
class Pending:
    """A handler returned an awaitable: ``step(steps, await resolve(pending))`` resumes."""

    awaitable: Awaitable[object]


_START = object()


def step(steps: Generator[Call, object, Any], value: object = _START) -> Any:
    """Advance a driver generator, calling handlers synchronously, until it finishes or a
    handler returns an awaitable.  Callback-style adapters (asyncio protocols) use this so
    that sync handlers cost no task switch.

    Args:
        steps: the generator (from process() or finish()).
        value: omitted to start; else the resolved result of the last Pending.

    Returns:
        The generator's return value, or a Pending to await and resume with.
    """
    try:
        call = next(steps) if value is _START else steps.send(value)
        while True:
            try:
                result: object = call.fn(*call.args)
            except Exception as exc:
                result = _Failed(exc)
            else:
                if inspect.isawaitable(result):
                    return Pending(result)
            call = steps.send(result)
    except StopIteration as stop:
        return stop.value


async def resolve(pending: Pending) -> object:
    """Await a Pending's awaitable; a handler exception becomes the driver's failure value."""
    try:
        return await pending.awaitable
    except Exception as exc:
        return _Failed(exc)


async def run_async(steps: Generator[Call, object, Any]) -> Any:
    """Run a driver generator, awaiting handler results that are awaitable (asyncio or trio).

    Returns:
        The generator's return value.
    """
    result = step(steps)
    while isinstance(result, Pending):
        result = step(steps, await resolve(result))
    return result


@dataclass(slots=True, eq=False)
class Live:
    """An adapter's record of one live connection, for graceful shutdown.

    Attributes:
        driver: the connection's Driver.
        wake: interrupts a blocked read (cancel the read, or shut the socket's read side).
        reading: the adapter is blocked reading from the client.
        kicked: the session is to be closed with 421 at the next opportunity.
    """

    driver: Driver
    wake: Callable[[], None]
    reading: bool = False
    kicked: bool = False

    def kick(self, *, force: bool) -> None:
        """Mark the session for a 421 close: always with ``force``, else only when idle
        (between transactions).  A blocked read is interrupted; a handler call never is."""
        if self.kicked or not (force or self.driver.idle):
            return
        self.kicked = True
        if self.reading:
            self.wake()


def refusal(config: ServerConfig) -> bytes:
    """The bytes of ``421 4.7.0 Too many connections`` (greeting refusal, RFC 5321 3.1)."""
    conn = ServerConnection(config)
    conn.send(Reply(code=421, text="4.7.0 Too many connections, try again later"))
    return conn.data_to_send()


def new_session(peer: object, local: object, *, tls: bool) -> Session:
    """A Session with a fresh id for a connection between ``peer`` and ``local``."""
    return Session(
        id=uuid.uuid4().hex[:12], peer=_addr(peer), local=_addr(local), tls=tls, extra={}
    )


def _addr(address: object) -> tuple[str, int]:
    if isinstance(address, tuple) and len(address) >= 2:
        return (str(address[0]), int(address[1]))
    return (str(address), 0)


# --- listening sockets and the background-thread Controller (shared by the three runtimes) ----


def bind(listen: Sequence[tuple[str, int]]) -> list[socket.socket]:
    """Bind and listen on each (host, port); IPv6 hosts get IPv6-only sockets.

    Raises:
        OSError: an address could not be bound (already bound sockets are closed).
    """
    sockets: list[socket.socket] = []
    try:
        for host, port in listen:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(1024)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class BaseController:
    """Runs a server in a background thread; the runtimes supply _run and _request_stop.

    Args:
        handler: the application's Handler.
        config: the engine configuration.
        listen: addresses to bind (port 0: kernel-assigned).
        tls_context, implicit_tls, max_connections: as for the runtime's serve().
    """

    def __init__(
        self,
        handler: Handler,
        config: ServerConfig,
        *,
        listen: Sequence[tuple[str, int]] = (("127.0.0.1", 0),),
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        max_connections: int = 1000,
    ) -> None:
        self.handler = handler
        self.config = config
        self.listen = list(listen)
        self.options: dict[str, Any] = {
            "tls_context": tls_context,
            "implicit_tls": implicit_tls,
            "max_connections": max_connections,
        }
        self.addresses: list[tuple[str, int]] = []
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        """Bind the sockets and start serving in a background thread."""
        sockets = bind(self.listen)
        self.addresses = [_addr(s.getsockname()) for s in sockets]
        self._thread = threading.Thread(
            target=self._main, args=(sockets,), name=f"mailwire-{type(self).__module__}"
        )
        self._thread.daemon = True
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise RuntimeError("server failed to start") from self._error

    def _main(self, sockets: list[socket.socket]) -> None:
        try:
            self._run(sockets)
        except BaseException as exc:  # reported to start() or logged
            self._error = exc
            logging.getLogger("mailwire.adapters").exception("server thread failed")
        finally:
            self._ready.set()
            for sock in sockets:
                sock.close()

    def _run(self, sockets: list[socket.socket]) -> None:
        raise NotImplementedError

    def _request_stop(self, grace: float) -> None:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """True while the server thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, grace: float = 0.0) -> None:
        """Stop accepting, let transactions finish within ``grace`` seconds, then 421 and close
        the rest; returns when the server thread has ended."""
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive():
            self._request_stop(grace)
        thread.join(grace + 10)
        self._thread = None

    def __enter__(self) -> BaseController:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

# The delivery agent's decisions, written once for every runtime.
#
# Strategy.  The agent's logic -- what to read, where to route, which host to try next, what
# the Scheduler is told, which notices go out, what is journaled and removed -- is the same
# whether it runs on anyio (asyncio, trio: adapters/_delivery_anyio.py) or on blocking
# sockets and worker threads (adapters/_delivery_threads.py).  So, as adapters/_driver.py does
# for the server's handler calls, every piece that needs I/O is a *generator* that yields an
# Op ("do this I/O") and receives its result through send().  It never performs I/O itself;
# a runtime agent runs the generator with drive() (inline, blocking) or drive_async()
# (awaiting), and supplies only the four kinds of I/O:
#
#   Blocking(fn, args)   a blocking call into the store or the journal (file I/O, fsync):
#                        inline on threads, in a worker thread on anyio;
#   Resolve(lookup)      run a RouteLookup with dnspython (adapters/_dns.py): the sync
#                        resolver on threads, the async one on anyio, both through the
#                        agent's ``dns_cache`` (answers kept for their TTLs, shared by every
#                        delivery);
#   Talk(target, start, channel)
#                        connect to the target (connect_timeout) -- or take the cached
#                        ``channel``'s open connection -- build the DeliverySession with
#                        ``start(now)`` on the runtime's monotonic clock, run its I/O loop
#                        (adapters/_delivery.py) and close, unless the session is parked;
#                        the result is Talked (the session, and the open stream of a
#                        parked one), or the text of why no connection could be made;
#   LocalCall(fn, ...)   call the local delivery callable (sync or async);
#   Close(channels)      say QUIT (without waiting) on cached sessions and close them.
#
# Connection reuse (Postfix's connection cache).  A Talk may carry a Channel -- an SMTP session
# left open after an earlier message -- and then the runtime converses on it instead of
# connecting; when the session ends ``parked`` (DeliverySession's keep_open: RSET instead of
# QUIT, answered 250) the runtime hands its open stream back (Talked.stream) instead of
# closing it.  Everything else is decided here, once: the cache key (target address, port,
# the STARTTLS choice of the attempt, SMTP or LMTP: a session is never reused under another
# TLS policy), SessionCache's bounds (``connection_cache_size`` sessions, each idle at most
# ``connection_cache_time`` seconds on the monotonic clock, newest reused first, oldest
# evicted), the reuse limit (``connection_reuse_limit`` transactions after the first), and
# what a dead cached session means: a reused session that fails before MAIL is answered
# (closed while idle, reset, 421) decided nothing, so the same target is connected to afresh
# and the walk never hears of it (no failed attempt).  The runtimes reap idle sessions in
# their run() loops (_expired_channels / _channel_delay) and close all of them when run()
# ends (stop()) or on close_cached().
#
# An exception raised by an Op is thrown into the generator at the yield, so the logic
# handles store errors where it asked.  Scheduling (when to pop work, how many deliveries at
# once, how to sleep and be woken) is the runtime's too: a task group on anyio, a thread pool
# and a Condition on threads.  The queue verbs (queue, flush, hold, release) and enqueue()
# are plain methods here, made thread-safe by ``_lock`` (a no-op on anyio, where everything
# runs on the event loop thread; an RLock on threads).
#
# Invariants (both runtimes, because the code is shared):
#   * every lease from the Scheduler is completed exactly once, even when a delivery raises
#     (its recipients are deferred with 451 4.3.0): no recipient is lost or stuck;
#   * write order after an attempt: notifications (stored in the spool) first, then the
#     journal, then the removal of a finished message (adapters/_delivery.RecipientJournal);
#   * RFC 5321 6.3: a message with too many Received fields is bounced, not passed on;
#     RFC 5321 4.4: the trace field of the accepting hop is added when the message leaves;
#     RFC 5321 6.1: notifications use the null reverse-path and are queued like any mail.
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias, TypeVar, cast

from mailwire.adapters._delivery import (
    DeliveryConfig,
    DeliverySession,
    RecipientJournal,
    TLSPolicy,
    delivery_recipients,
    loop_reply,
    notifications,
    queued_message,
    report_from_results,
    with_received,
)
from mailwire.adapters._dns import DnsCache
from mailwire.adapters._spool import MessageStore, SpoolEnvelope, SpoolError, StoredMessage
from mailwire.protocol._dnsquery import RouteLookup
from mailwire.protocol._dsn import DSNAction, DSNMessage
from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._events import MailFrom, Quit, RcptTo, Reply
from mailwire.protocol._queue import (
    Completion,
    Delivery,
    Handoff,
    MessageState,
    QueuedMessage,
    Recipient,
    RecipientState,
    Scheduler,
)
from mailwire.protocol._routing import (
    ConnectFailed,
    DeliveryWalk,
    Destination,
    Route,
    RouteKind,
    Target,
    WalkResult,
    group_recipients,
)
from mailwire.protocol._routing import RecipientStatus as WalkStatus
from mailwire.protocol._state import SessionState
from mailwire.protocol._transaction import SessionSetup

log = logging.getLogger("mailwire.adapters.delivery")
T = TypeVar("T")

LocalDeliver = Callable[[str, str, bytes], "Reply | None | Awaitable[Reply | None]"]
"""Local delivery: ``fn(sender, recipient, content)`` -> Reply (None: delivered).  On anyio,
``async def`` callables run on the event loop and plain ones in a worker thread; on threads
they are called in the delivery's worker thread."""


# --- the I/O a runtime supplies ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Blocking:
    """Call ``fn(*args)``: a blocking call into the store or the journal."""

    fn: Callable[..., object]
    args: tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Resolve:
    """Run ``lookup`` (a fresh RouteLookup) with dnspython; the result is its Route."""

    lookup: RouteLookup


CacheKey: TypeAlias = tuple[str, int, "bool | None", bool]
"""What a cached session is kept for: (address, port, STARTTLS choice, LMTP)."""


@dataclasses.dataclass(slots=True, eq=False, kw_only=True)
class Channel:
    """An open SMTP session parked between messages (see the module comment).

    Attributes:
        key: the cache key.
        target: the target it is connected to.
        stream: the runtime's open connection (an anyio stream, a socket).
        setup: the session's finished setup (its ``conn`` is READY for MAIL).
        reuses: how many times it was taken from the cache so far.
        idle_until: when it is closed if nobody takes it (monotonic seconds).
    """

    key: CacheKey
    target: Target
    stream: object
    setup: SessionSetup
    reuses: int = 0
    idle_until: float = 0.0

    def goodbye(self) -> bytes:
        """The QUIT to write (best effort, no reply awaited) before closing."""
        conn = self.setup.conn
        try:
            conn.send(Quit())
            return conn.data_to_send()
        except LocalProtocolError:
            return b""


class SessionCache:
    """Parked sessions by key, bounded in number and idle time; no I/O, no clock of its own
    (``now`` is the runtime's monotonic time).  Not thread-safe: the agent's lock guards it.

    Args:
        size: sessions kept at most (all keys together); the oldest is evicted.
        idle: seconds a session may wait for its next message.
    """

    def __init__(self, *, size: int, idle: float) -> None:
        self.size = size
        self.idle = idle
        self._by_key: dict[CacheKey, list[Channel]] = {}
        self._order: dict[Channel, None] = {}  # parking order == expiry order

    def __len__(self) -> int:
        return len(self._order)

    def put(self, channel: Channel, now: float) -> list[Channel]:
        """Park ``channel``.  Returns the sessions to close (evicted to stay within
        ``size``; ``channel`` itself when the cache holds nothing)."""
        if self.size <= 0 or self.idle <= 0:
            return [channel]
        channel.idle_until = now + self.idle
        self._by_key.setdefault(channel.key, []).append(channel)
        self._order[channel] = None
        evicted = []
        while len(self._order) > self.size:
            oldest = next(iter(self._order))
            self._remove(oldest)
            evicted.append(oldest)
        return evicted

    def take(self, key: CacheKey, now: float) -> Channel | None:
        """The most recently parked live session for ``key`` (removed from the cache), or
        None.  An expired one is left for expire()."""
        stack = self._by_key.get(key)
        if not stack or stack[-1].idle_until <= now:
            return None
        channel = stack[-1]
        self._remove(channel)
        return channel

    def expire(self, now: float) -> list[Channel]:
        """Remove and return the sessions idle past their time (to close)."""
        out = []
        for channel in self._order:
            if channel.idle_until > now:
                break
            out.append(channel)
        for channel in out:
            self._remove(channel)
        return out

    def next_expiry(self) -> float | None:
        """When the oldest session expires, or None when the cache is empty."""
        return next(iter(self._order)).idle_until if self._order else None

    def drain(self) -> list[Channel]:
        """Remove and return every session (to close)."""
        out = list(self._order)
        self._order.clear()
        self._by_key.clear()
        return out

    def _remove(self, channel: Channel) -> None:
        del self._order[channel]
        stack = self._by_key[channel.key]
        stack.remove(channel)
        if not stack:
            del self._by_key[channel.key]


@dataclass(frozen=True, slots=True)
class Talk:
    """Connect to ``target`` (or use ``channel``'s open connection); build the session with
    ``start(now)`` (``now`` on the runtime's monotonic clock, taken once connected) and run
    it to its end.  The result is Talked, or a str: why no connection could be made."""

    target: Target
    start: Callable[[float], DeliverySession]
    channel: Channel | None = None


@dataclass(frozen=True, slots=True)
class Talked:
    """The result of a Talk: the finished session, and when it ended ``parked`` the open
    stream (the runtime did not close it: the agent caches it or has it closed)."""

    session: DeliverySession
    stream: object | None = None


@dataclass(frozen=True, slots=True)
class Close:
    """Write each channel's goodbye() (best effort) and close its stream."""

    channels: tuple[Channel, ...]


@dataclass(frozen=True, slots=True)
class LocalCall:
    """Call the local delivery callable; the result is its Reply (or None: delivered)."""

    fn: LocalDeliver
    sender: str
    recipient: str
    content: bytes


Op: TypeAlias = Blocking | Resolve | Talk | LocalCall | Close
Steps: TypeAlias = Generator[Op, object, T]


def drive(steps: Steps[T], do: Callable[[Op], object]) -> T:
    """Run ``steps`` to its end, doing each Op with the blocking ``do``.

    Args:
        steps: one of the agent's generators.
        do: performs an Op and returns its result (exceptions are thrown into ``steps``).

    Returns:
        The generator's return value.
    """
    value: object = None
    error: Exception | None = None
    try:
        while True:
            try:
                op = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as stop:
                return cast(T, stop.value)
            try:
                value, error = do(op), None
            except Exception as exc:  # thrown into the generator at its yield
                value, error = None, exc
    finally:
        steps.close()


async def drive_async(steps: Steps[T], do: Callable[[Op], Awaitable[object]]) -> T:
    """drive() for async runtimes: ``do`` is awaited (no asyncio or trio API is used)."""
    value: object = None
    error: Exception | None = None
    try:
        while True:
            try:
                op = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as stop:
                return cast(T, stop.value)
            try:
                value, error = await do(op), None
            except Exception as exc:
                value, error = None, exc
    finally:
        steps.close()


def is_async_callable(fn: object) -> bool:
    """True for an ``async def`` function (or an object whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the method itself, not callable()
    )


def reason(exc: BaseException) -> str:
    """Short text for a connection failure."""
    if isinstance(exc, TimeoutError):
        return "connection timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def reply_text(reply: Reply | None) -> str:
    """A reply on one line, for logs."""
    if reply is None:
        return "no reply"
    return f"{reply.code} " + " ".join(reply.text.split())


# --- the agent's logic -------------------------------------------------------------------------


class AgentCore:
    """The runtime-neutral part of a delivery agent (see the module comment).

    Subclasses supply the I/O of the Ops and the scheduling loop (run, run_once, wake, stop).

    Args:
        store: the durable message store (shared with the server's SpoolHandler).
        config: delivery settings (routing, port, nameservers, retry policy, timeouts).
        local: local delivery for local domains, or None (local recipients are then
            deferred with 451 4.3.0).
        scheduler: the Scheduler (default: a new one with ``config.retry``).
        clock: the Scheduler's clock, seconds.
        rng: source of routing seeds.
        journal: where final recipient results are kept across restarts (None: nowhere;
            a restart then delivers again to recipients that already had the message).
    """

    def __init__(
        self,
        store: MessageStore,
        config: DeliveryConfig,
        *,
        local: LocalDeliver | None = None,
        scheduler: Scheduler | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        journal: RecipientJournal | None = None,
    ) -> None:
        self.store = store
        self.journal = journal
        self.config = config
        self.local = local
        self.scheduler = scheduler or Scheduler(config.retry)
        self.clock = clock
        self.rng = rng or random.Random()
        self.dns_cache = (
            DnsCache(max_entries=config.dns_cache_size) if config.dns_cache_size > 0 else None
        )
        self.client_config = config.client_config()
        self.lmtp_config = config.client_config(lmtp=True)
        self.counters = {
            "delivered": 0,
            "deferred": 0,
            "bounced": 0,
            "dsn_sent": 0,
            "connections_reused": 0,
        }
        self.sessions = SessionCache(
            size=config.connection_cache_size, idle=config.connection_cache_time
        )
        self.monotonic = time.monotonic  # the cache's clock (idle times are real time)
        self._stopping = False
        # Messages whose delay notice went out before a restart (from the journal): the
        # Scheduler does not know, and would signal a second one.
        # Guards the Scheduler and the counters: a no-op where one thread does everything.
        self._lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()

    def wake(self) -> None:
        """Make a waiting run() look at the queue again (the runtime's)."""

    # --- feeding the queue --------------------------------------------------------------------

    def enqueue(
        self,
        queue_id: str,
        envelope: SpoolEnvelope,
        *,
        states: Sequence[RecipientState] | None = None,
        delay_warned: bool = False,
    ) -> None:
        """Queue a message the store already holds (anyio: call on the agent's event loop;
        threads: from any thread).

        Args:
            queue_id: its queue ID.
            envelope: its envelope.
            states: recipient states restored from the journal (default: all pending).
            delay_warned: the journal says a delay notice went out before a restart.
        """
        message = self._message(queue_id, envelope)
        with self._lock:
            if queue_id in self.scheduler:
                return
            self.scheduler.add(
                message,
                due=min(message.arrival, self.clock()),
                states=states,
                delay_warned=delay_warned,
            )
        log.info("%s: queued from=<%s> nrcpt=%d", queue_id, message.sender, len(message.recipients))
        self.wake()

    def _message(self, queue_id: str, envelope: SpoolEnvelope) -> QueuedMessage:
        return queued_message(
            queue_id,
            sender=envelope.sender,
            recipients=envelope.recipients,
            arrival=envelope.arrival or self.clock(),
            size=envelope.size,
        )

    def _blocking(self, fn: Callable[..., T], *args: object) -> Steps[T]:
        result = yield Blocking(fn, args)
        return cast(T, result)

    def _start(self) -> Steps[list[str]]:
        ids = yield from self._blocking(self.store.list)
        queued = []
        for queue_id in ids:
            try:
                stored = yield from self._blocking(self.store.get, queue_id)
            except Exception as exc:  # SpoolError, or what a damaged spool makes the store raise
                log.error("%s: cannot read from the spool, left there: %s", queue_id, exc)
                continue
            states = None
            warned = False
            if self.journal is not None:
                message = self._message(queue_id, stored.envelope)
                states = yield from self._blocking(self.journal.states, message)
                if all(st.status.is_final for st in states):
                    # finished before the restart, only its removal was missing
                    yield from self._remove(queue_id)
                    continue
                warned = yield from self._blocking(self.journal.delay_notice_sent, queue_id)
            self.enqueue(queue_id, stored.envelope, states=states, delay_warned=warned)
            queued.append(queue_id)
        return queued

    def _submit(self, sender: MailFrom, recipients: Sequence[RcptTo], content: bytes) -> Steps[str]:
        envelope = SpoolEnvelope(
            sender=sender, recipients=tuple(recipients), arrival=self.clock(), size=len(content)
        )
        queue_id = yield from self._blocking(self.store.put, envelope, [content])
        self.enqueue(queue_id, envelope)
        return queue_id

    # --- queue management ---------------------------------------------------------------------

    def queue(self) -> list[MessageState]:
        """Every queued message's state, in arrival order."""
        with self._lock:
            return list(self.scheduler.messages())

    def flush(self, queue_id: str | None = None) -> int:
        """Retry one message now, or everything (lifting every destination's back-off).

        Returns:
            How many messages were flushed (held ones stay held and are not counted).

        Raises:
            KeyError: no such queued message.
        """
        with self._lock:
            if queue_id is None:
                count = sum(1 for m in self.scheduler.messages() if not m.held)
                self.scheduler.flush_all(now=self.clock())
            else:
                count = 0 if self.scheduler.message(queue_id).held else 1
                self.scheduler.flush(queue_id, now=self.clock())
        self.wake()
        return count

    def hold(self, queue_id: str) -> None:
        """Stop scheduling a message until release() (KeyError if not queued)."""
        with self._lock:
            self.scheduler.hold(queue_id)
        log.info("%s: held", queue_id)

    def release(self, queue_id: str) -> None:
        """Resume a held message's schedule (KeyError if not queued)."""
        with self._lock:
            self.scheduler.release(queue_id)
        log.info("%s: released", queue_id)
        self.wake()

    def _delete(self, queue_id: str) -> Steps[MessageState]:
        with self._lock:
            state = self.scheduler.delete(queue_id)
        log.info("%s: deleted by the administrator", queue_id)
        yield from self._remove(queue_id)
        return state

    def _pop_due(self, limit: int | None = None) -> list[Delivery]:
        with self._lock:
            return self.scheduler.pop_due(self.clock(), limit=limit)

    # --- one delivery -------------------------------------------------------------------------

    def _guarded(self, delivery: Delivery) -> Steps[None]:
        try:
            yield from self._deliver(delivery)
        except Exception as exc:  # never lose a lease: defer and log
            log.exception("%s: delivery failed", delivery.message.queue_id)
            reply = Reply(code=451, text=f"4.3.0 Local error in delivery: {exc!r}")
            with contextlib.suppress(KeyError):  # KeyError: it was completed already
                self._complete(delivery, {}, reply=reply, remote_mta=None, failed_conn=False)

    def _deliver(self, delivery: Delivery) -> Steps[Completion | None]:
        message = delivery.message
        queue_id = message.queue_id
        try:
            stored: StoredMessage = yield from self._blocking(self.store.get, queue_id)
        except SpoolError as exc:
            log.error("%s: cannot read from the spool: %s", queue_id, exc)
            return self._complete(
                delivery,
                {},
                reply=Reply(code=451, text="4.3.0 Queue file unreadable"),
                remote_mta=None,
                failed_conn=False,
            )
        env = stored.envelope
        rcpts = delivery_recipients(delivery)
        loop = loop_reply(stored.content)
        content = with_received(
            stored.content,
            peer=env.peer[0],
            hello=env.hello,
            tls=env.tls,
            authenticated=env.authenticated_as is not None,
            smtputf8=env.sender.smtputf8,
            recipients=[r.address for r in env.recipients],
            queue_id=queue_id,
            hostname=self.config.hostname,
            arrival=env.arrival,
            add_missing_headers=self.config.add_missing_headers,
        )
        results: list[WalkResult] = []
        handoffs: dict[str, Handoff] = {}  # how each delivered recipient left (RFC 3461 4.2)
        if loop is not None:  # RFC 5321 6.3: a mail loop; bounce rather than pass it on
            results = [WalkResult(recipient=r, status=WalkStatus.FAILED, reply=loop) for r in rcpts]
            rcpts = {}
        for destination in group_recipients(rcpts, self.config.routing):
            lookup = RouteLookup(
                destination, config=self.config.routing, seed=self.rng.getrandbits(32)
            )
            route = lookup.result or (yield from self._resolve(lookup))
            for line in route.trace:
                log.debug("%s: route %s: %s", queue_id, route.nexthop, line)
            if route.kind is RouteKind.LOCAL and self.config.lmtp is not None:
                route = yield from self._lmtp_route(route)
                results += yield from self._walk(
                    route, env.sender, rcpts, content, queue_id, handoffs, lmtp=True
                )
            elif route.kind is RouteKind.LOCAL:
                local = yield from self._deliver_local(route, message, content)
                handoffs.update((r.recipient, Handoff.MAILBOX) for r in local)
                results += local
            else:
                results += yield from self._walk(
                    route, env.sender, rcpts, content, queue_id, handoffs
                )
        report = report_from_results(results)
        now = self.clock()
        completion = self._complete(
            delivery,
            report.replies,
            reply=None,
            remote_mta=report.remote_mta,
            failed_conn=report.connection_failed,
            handoffs=handoffs,
        )
        if completion is None:
            return None
        yield from self._after(completion, message, content, now)
        return completion

    def _resolve(self, lookup: RouteLookup) -> Steps[Route]:
        route = yield Resolve(lookup)
        return cast(Route, route)

    def _complete(
        self,
        delivery: Delivery,
        replies: dict[str, Reply],
        *,
        reply: Reply | None,
        remote_mta: str | None,
        failed_conn: bool,
        handoffs: dict[str, Handoff] | None = None,
    ) -> Completion | None:
        with self._lock:
            completion = self.scheduler.complete(
                delivery,
                now=self.clock(),
                replies=replies or None,
                reply=reply,
                remote_mta=remote_mta,
                connection_failed=failed_conn,
                handoffs=handoffs or None,
            )
            if completion is None:
                return None
            self.counters["delivered"] += len(completion.delivered)
            self.counters["bounced"] += len(completion.failed)
            self.counters["deferred"] += len(completion.deferred)
        qid = completion.queue_id
        for state in completion.delivered:
            log.info(
                "%s: to=<%s> relay=%s status=delivered (%s)",
                qid,
                state.recipient.address,
                state.remote_mta or "local",
                reply_text(state.reply),
            )
        for state in completion.failed:
            log.info(
                "%s: to=<%s> relay=%s status=bounced%s (%s)",
                qid,
                state.recipient.address,
                state.remote_mta or "none",
                " (expired)" if state.expired else "",
                reply_text(state.reply),
            )
        for state in completion.deferred:
            log.info(
                "%s: to=<%s> relay=%s status=deferred (%s)",
                qid,
                state.recipient.address,
                state.remote_mta or "none",
                reply_text(state.reply),
            )
        return completion

    def _after(
        self, completion: Completion, message: QueuedMessage, content: bytes, now: float
    ) -> Steps[None]:
        dsns = notifications(
            completion,
            message,
            hostname=self.config.hostname,
            now=now,
            content=content,
            policy=self.scheduler.policy,
        )
        for dsn in dsns:
            try:
                yield from self._queue_dsn(message.queue_id, dsn)
            except Exception:
                # The notification could not be stored: keep the original in the spool, so
                # that the next start delivers it again rather than lose the bounce.
                log.exception("%s: could not queue the %s notice", message.queue_id, dsn.kind)
                return
        final = completion.delivered + completion.failed
        delayed = any(dsn.kind is DSNAction.DELAYED for dsn in dsns)
        # A finished message is removed next; journaling it too costs an fsync and only
        # matters when a notice went out (a crash before the removal must not send it twice).
        if self.journal is not None and (
            delayed or (final and (completion.finished is None or dsns))
        ):
            yield from self._blocking(
                partial(self.journal.record, delay_notice=delayed), message.queue_id, final
            )
        if completion.finished is not None:
            yield from self._remove(message.queue_id)

    def _remove(self, queue_id: str) -> Steps[None]:
        try:
            yield from self._blocking(self.store.delete, queue_id)
        except SpoolError as exc:
            log.warning("%s: could not remove from the spool: %s", queue_id, exc)
        if self.journal is not None:
            yield from self._blocking(self.journal.forget, queue_id)
        log.info("%s: removed", queue_id)

    def _queue_dsn(self, queue_id: str, dsn: DSNMessage) -> Steps[None]:
        # RFC 5321 6.1: the notification "MUST be sent using a null ("<>") reverse-path".
        new_id = yield from self._submit(
            MailFrom(address=dsn.sender), [RcptTo(address=dsn.recipient)], dsn.content
        )
        with self._lock:
            self.counters["dsn_sent"] += 1
        log.info(
            "%s: sender %s notification (%s) queued as %s",
            queue_id,
            dsn.kind.value,
            dsn.recipient,
            new_id,
        )

    def _deliver_local(
        self, route: Route, message: QueuedMessage, content: bytes
    ) -> Steps[list[WalkResult]]:
        out = []
        for rcpt in route.recipients:
            reply: Reply | None
            if self.local is None:
                reply = Reply(code=451, text="4.3.0 No local delivery configured")
            else:
                try:
                    result = yield LocalCall(self.local, message.sender, rcpt, content)
                    reply = cast("Reply | None", result)
                except Exception as exc:  # the callable's failure: try again later
                    log.exception("local delivery to %s failed", rcpt)
                    reply = Reply(code=451, text=f"4.3.0 Local delivery failed: {exc!r}")
            if reply is None:
                reply = Reply(code=250, text="2.0.0 Delivered")
            status = (
                WalkStatus.DELIVERED
                if reply.is_positive
                else WalkStatus.FAILED
                if reply.is_permanent
                else WalkStatus.DEFERRED
            )
            out.append(WalkResult(recipient=rcpt, status=status, reply=reply))
        return out

    # --- connection reuse ---------------------------------------------------------------------

    def _session(
        self,
        target: Target,
        key: CacheKey,
        start: Callable[..., DeliverySession],
        queue_id: str,
    ) -> Steps[DeliverySession | str]:
        """One session with ``target``: on a cached connection when there is one (a dead
        one is replaced by a fresh connection, uncounted), parked afterwards when it can be.
        Returns the finished session, or why no connection could be made."""
        while True:
            with self._lock:
                channel = self.sessions.take(key, self.monotonic())
            if channel is None or channel.setup.conn.state is SessionState.READY:
                break
            yield Close((channel,))  # the server said goodbye while it was parked
        while True:
            reuses = 0 if channel is None else channel.reuses + 1
            keep = (
                self.sessions.idle > 0
                and self.sessions.size > 0
                and reuses < self.config.connection_reuse_limit
                and not self._stopping
            )
            if channel is not None:
                log.info("%s: reusing the connection to %s (reuse %d)", queue_id, target, reuses)
            begin = partial(start, reuse=None if channel is None else channel.setup, keep_open=keep)
            outcome = yield Talk(target, begin, channel)
            if isinstance(outcome, str):
                return outcome
            talked = cast(Talked, outcome)
            session = talked.session
            if channel is not None and session.stale:
                log.info("%s: the cached connection to %s was gone (%s); connecting afresh",
                         queue_id, target, session.error or "421")  # fmt: skip
                channel = None
                continue
            if channel is not None:
                with self._lock:
                    self.counters["connections_reused"] += 1
            if talked.stream is not None:
                parked = Channel(
                    key=key, target=target, stream=talked.stream, setup=session.setup,
                    reuses=reuses,
                )  # fmt: skip
                with self._lock:
                    if self._stopping:
                        to_close = [parked]
                    else:
                        to_close = self.sessions.put(parked, self.monotonic())
                if to_close:
                    yield Close(tuple(to_close))
            return session

    def _expired_channels(self) -> list[Channel]:
        """The cached sessions idle past their time, removed from the cache (to close)."""
        with self._lock:
            return self.sessions.expire(self.monotonic())

    def _channel_delay(self) -> float | None:
        """Seconds until the next cached session expires, or None when none is cached."""
        with self._lock:
            expiry = self.sessions.next_expiry()
        return None if expiry is None else max(0.0, expiry - self.monotonic())

    def _idle_delay(self, idle: float) -> float:
        """How long a run loop may wait for a wake-up: until the next delivery is due or the
        next cached session expires, at most ``idle``; ``idle`` while every delivery slot is
        taken (a finishing delivery wakes the loop)."""
        wakeup = self.scheduler.next_wakeup()
        delay = idle if wakeup is None else max(0.0, min(idle, wakeup - self.clock()))
        if self.scheduler.in_flight >= self.config.max_deliveries:
            delay = idle
        reap = self._channel_delay()
        return delay if reap is None else min(delay, reap)

    def _drain_channels(self) -> list[Channel]:
        """Every cached session, removed from the cache (to close)."""
        with self._lock:
            return self.sessions.drain()

    def _lmtp_route(self, local: Route) -> Steps[Route]:
        """The route of local recipients to the LMTP mailbox server (its address looked up
        like a relay host's, by the same DNS machine)."""
        hop = self.config.lmtp
        assert hop is not None
        destination = Destination(
            local=False,
            domain=local.nexthop,
            nexthop=hop,
            recipients=local.recipients,
            reason=f"{local.nexthop} is a local domain: LMTP to {hop}",
        )
        lookup = RouteLookup(destination, config=self.config.routing, seed=0)
        return lookup.result or (yield from self._resolve(lookup))

    def _walk(
        self,
        route: Route,
        sender: MailFrom,
        rcpts: dict[str, Recipient],
        content: bytes,
        queue_id: str,
        handoffs: dict[str, Handoff],
        *,
        lmtp: bool = False,
    ) -> Steps[list[WalkResult]]:
        walk = DeliveryWalk(route, max_connections=self.config.max_connections)
        handoff_at: dict[Target, Handoff] = {}  # what each target's session offered
        config = self.lmtp_config if lmtp else self.client_config
        opportunistic = self.config.tls is TLSPolicy.OPPORTUNISTIC
        while (target := walk.next_target()) is not None:
            for starttls in (None, False) if opportunistic else (False,):

                def start(
                    now: float,
                    *,
                    starttls: bool | None = starttls,
                    reuse: SessionSetup | None,
                    keep_open: bool,
                ) -> DeliverySession:
                    return DeliverySession(
                        walk,
                        sender=sender,
                        recipients=rcpts,
                        content=content,
                        config=config,
                        starttls=starttls,
                        timeout=self.config.reply_timeout,
                        now=now,
                        reuse=reuse,
                        keep_open=keep_open,
                    )

                key: CacheKey = (str(target.address), target.port, starttls, lmtp)
                outcome = yield from self._session(target, key, start, queue_id)
                if isinstance(outcome, str):
                    walk.feed(ConnectFailed(reason=outcome))
                    break
                session = outcome
                if session.tls_failed and starttls is None:
                    # Opportunistic TLS (RFC 7435): a failed handshake is no reason to give
                    # up on the host; the same host is tried again in clear text at once.
                    log.info("%s: TLS with %s failed (%s); retrying without TLS",
                             queue_id, target, session.error)  # fmt: skip
                    continue
                session.feed_walk()
                handoff_at[target] = session.handoff
                break
        for line in walk.trace:
            log.debug("%s: walk: %s", queue_id, line)
        results = list(walk.results().values())
        for r in results:
            if r.status is WalkStatus.DELIVERED and r.target in handoff_at:
                handoffs[r.recipient] = handoff_at[r.target]
        return results


__all__ = [
    "AgentCore",
    "Blocking",
    "CacheKey",
    "Channel",
    "Close",
    "LocalCall",
    "LocalDeliver",
    "Op",
    "Resolve",
    "SessionCache",
    "Steps",
    "Talk",
    "Talked",
    "drive",
    "drive_async",
    "is_async_callable",
    "reason",
    "reply_text",
]

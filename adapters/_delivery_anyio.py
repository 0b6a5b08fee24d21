# The delivery agent on anyio: one code path for asyncio and trio.
#
# The agent only moves data between the parts that decide (see adapters/_delivery.py):
#
#   Scheduler.pop_due(now)          what is due (per-destination limits and back-off applied)
#     -> store.get(id)              the content, in a worker thread (blocking file I/O)
#     -> group_recipients()         local vs remote, next hops
#     -> loop check, Received       RFC 5321 6.3 / 4.4 (adapters/_delivery.py helpers)
#     -> RouteLookup + dnspython    the Route (resolve_route_async, adapters/_dns.py)
#     -> DeliveryWalk + sessions    one DeliverySession per target until the walk is done
#                                   (a failed opportunistic STARTTLS retries that host in
#                                   clear text); local routes go to the local delivery
#                                   callable, or over LMTP when DeliveryConfig.lmtp is set
#     -> Scheduler.complete()       per-recipient replies, remote MTA, destination back-off
#     -> notifications()            bounces/delay notices, stored and queued as new messages
#                                   from <> to the sender (so they are retried like any mail)
#     -> store.delete(id)           once the Scheduler says the message is finished
#
# Time.  The Scheduler runs on ``clock`` (wall-clock seconds by default, like the arrival
# times in the spool); tests pass a fake clock and call run_once() to step it, so retries
# and expiry are exercised without sleeping.  Network timeouts use the runtime's own clock.
#
# Concurrency.  run() starts each delivery as it comes due in one long-lived task group, at
# most ``max_deliveries`` at a time, so a hung destination never holds up the others (run_once,
# for tests, runs batches to completion).  The Scheduler enforces per-destination concurrency
# and back-off.  Every lease is completed exactly once, even when a delivery crashes (its
# recipients are then deferred with 451 4.3.0), so no recipient is ever lost or stuck.
#
# Not yet: connection reuse across messages to one host, a DNS answer cache, a blocking
# variant for the threads runtime (the MTA runs this agent on asyncio there).
#
# Restart.  start() queues every message the store holds (SpoolHandler's recovery already
# removed unacknowledged leftovers).  The spool keeps no per-recipient state, so final
# results go to a RecipientJournal (adapters/_delivery.py) when one is given: start() restores
# them, and a recipient that had the message is not sent it again.  Without a journal a
# restart delivers again to recipients that already had it (at least once, never lost: RFC
# 5321 6.1 prefers a duplicate to a loss).  Write order after each attempt: notifications
# (into the spool), then the journal, then the removal of a finished message.
from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.streams.tls

from mailwire.adapters._delivery import (
    DeliveryConfig,
    DeliverySession,
    RecipientJournal,
    TLSPolicy,
    delivery_recipients,
    loop_reply,
    notifications,
    opportunistic_context,
    queued_message,
    report_from_results,
    with_received,
)
from mailwire.adapters._dns import make_async_resolver, resolve_route_async
from mailwire.adapters._spool import MessageStore, SpoolEnvelope, SpoolError
from mailwire.protocol._dnsquery import RouteLookup
from mailwire.protocol._dsn import DSNMessage
from mailwire.protocol._events import MailFrom, RcptTo, Reply
from mailwire.protocol._queue import (
    Completion,
    Delivery,
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
    WalkResult,
    group_recipients,
)
from mailwire.protocol._routing import RecipientStatus as WalkStatus

log = logging.getLogger("mailwire.adapters.delivery")

LocalDeliver = Callable[[str, str, bytes], "Reply | None | Awaitable[Reply | None]"]
"""Local delivery: ``fn(sender, recipient, content)`` -> Reply (None: delivered).  Sync
callables run in a worker thread; async ones on the event loop."""

READ_SIZE = 64 * 1024


class DeliveryAgent:
    """Takes due work from a Scheduler and delivers it (see the module comment).

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
        self.resolver = make_async_resolver(
            config.nameservers, timeout=config.dns_timeout, lifetime=config.dns_lifetime
        )
        self.client_config = config.client_config()
        self.lmtp_config = config.client_config(lmtp=True)
        self.tls_context = opportunistic_context()
        self.counters = {"delivered": 0, "deferred": 0, "bounced": 0, "dsn_sent": 0}
        self._wake: anyio.Event | None = None

    # --- feeding the queue --------------------------------------------------------------------

    def enqueue(
        self,
        queue_id: str,
        envelope: SpoolEnvelope,
        *,
        states: Sequence[RecipientState] | None = None,
    ) -> None:
        """Queue a message the store already holds (call on the agent's event loop).

        Args:
            queue_id: its queue ID.
            envelope: its envelope.
            states: recipient states restored from the journal (default: all pending).
        """
        if queue_id in self.scheduler:
            return
        message = self._message(queue_id, envelope)
        self.scheduler.add(message, due=min(message.arrival, self.clock()), states=states)
        log.info("%s: queued from=<%s> nrcpt=%d", queue_id, message.sender, len(message.recipients))
        self.wake()

    async def start(self) -> list[str]:
        """Queue every message in the store (after a restart).  Returns their queue IDs."""
        ids = await anyio.to_thread.run_sync(self.store.list)
        queued = []
        for queue_id in ids:
            try:
                stored = await anyio.to_thread.run_sync(self.store.get, queue_id)
            except Exception as exc:  # SpoolError, or what a damaged spool makes the store raise
                log.error("%s: cannot read from the spool, left there: %s", queue_id, exc)
                continue
            states = None
            if self.journal is not None:
                message = self._message(queue_id, stored.envelope)
                states = await anyio.to_thread.run_sync(self.journal.states, message)
                if all(st.status.is_final for st in states):
                    # finished before the restart, only its removal was missing
                    await self._remove(queue_id)
                    continue
            self.enqueue(queue_id, stored.envelope, states=states)
            queued.append(queue_id)
        return queued

    def _message(self, queue_id: str, envelope: SpoolEnvelope) -> QueuedMessage:
        return queued_message(
            queue_id,
            sender=envelope.sender,
            recipients=envelope.recipients,
            arrival=envelope.arrival or self.clock(),
            size=envelope.size,
        )

    async def submit(self, sender: MailFrom, recipients: Sequence[RcptTo], content: bytes) -> str:
        """Store a message durably and queue it (for embedding and bounces).

        Returns:
            The queue ID.
        """
        envelope = SpoolEnvelope(
            sender=sender, recipients=tuple(recipients), arrival=self.clock(), size=len(content)
        )
        queue_id: str = await anyio.to_thread.run_sync(self.store.put, envelope, [content])
        self.enqueue(queue_id, envelope)
        return queue_id

    # --- queue management (call on the agent's event loop; MTA wraps them for threads) -----

    def queue(self) -> list[MessageState]:
        """Every queued message's state, in arrival order."""
        return list(self.scheduler.messages())

    def flush(self, queue_id: str | None = None) -> None:
        """Retry one message now, or everything (lifting every destination's back-off).

        Raises:
            KeyError: no such queued message.
        """
        if queue_id is None:
            self.scheduler.flush_all(now=self.clock())
        else:
            self.scheduler.flush(queue_id, now=self.clock())
        self.wake()

    def hold(self, queue_id: str) -> None:
        """Stop scheduling a message until release() (KeyError if not queued)."""
        self.scheduler.hold(queue_id)
        log.info("%s: held", queue_id)

    def release(self, queue_id: str) -> None:
        """Resume a held message's schedule (KeyError if not queued)."""
        self.scheduler.release(queue_id)
        log.info("%s: released", queue_id)
        self.wake()

    async def delete(self, queue_id: str) -> MessageState:
        """Remove a message from the queue and the spool, without any notification.

        Raises:
            KeyError: no such queued message.
        """
        state = self.scheduler.delete(queue_id)
        log.info("%s: deleted by the administrator", queue_id)
        await self._remove(queue_id)
        return state

    def wake(self) -> None:
        """Make a waiting run() look at the queue again (call on the agent's event loop)."""
        if self._wake is not None:
            self._wake.set()

    # --- running ------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Run every delivery due now (up to ``max_deliveries`` at a time) to completion,
        including the deliveries that become due meanwhile at the same clock time (bounces).

        Returns:
            The number of deliveries run.
        """
        count = 0
        limit = anyio.CapacityLimiter(self.config.max_deliveries)
        while True:
            due = self.scheduler.pop_due(self.clock())
            if not due:
                return count
            count += len(due)
            async with anyio.create_task_group() as group:
                for delivery in due:
                    group.start_soon(self._guarded, delivery, limit)

    async def run(self, *, idle: float = 60.0) -> None:
        """Deliver forever.  Deliveries start as they come due and run side by side (at most
        ``max_deliveries``): a slow destination never holds up the others.  Between starts it
        sleeps until the next due time, a wake() (new mail, a finished delivery, a queue
        verb), or ``idle`` seconds."""
        limit = self.config.max_deliveries
        async with anyio.create_task_group() as group:
            while True:
                self._wake = anyio.Event()
                free = limit - self.scheduler.in_flight
                if free > 0:
                    for delivery in self.scheduler.pop_due(self.clock(), limit=free):
                        group.start_soon(self._run_one, delivery)
                wakeup = self.scheduler.next_wakeup()
                delay = idle if wakeup is None else max(0.0, min(idle, wakeup - self.clock()))
                if self.scheduler.in_flight >= limit:
                    delay = idle  # a finishing delivery wakes us
                with anyio.move_on_after(delay):
                    await self._wake.wait()

    async def _run_one(self, delivery: Delivery) -> None:
        try:
            await self._guarded(delivery, None)
        finally:
            self.wake()  # a slot, and perhaps a destination, is free again

    async def _guarded(self, delivery: Delivery, limit: anyio.CapacityLimiter | None) -> None:
        async with limit if limit is not None else contextlib.nullcontext():
            try:
                await self.deliver(delivery)
            except Exception as exc:  # never lose a lease: defer and log
                log.exception("%s: delivery failed", delivery.message.queue_id)
                reply = Reply(code=451, text=f"4.3.0 Local error in delivery: {exc!r}")
                with contextlib.suppress(KeyError):  # KeyError: it was completed already
                    self._complete(delivery, {}, reply=reply, remote_mta=None, failed_conn=False)

    # --- one delivery -------------------------------------------------------------------------

    async def deliver(self, delivery: Delivery) -> Completion | None:
        """Run one leased delivery and record its result.

        Returns:
            The Scheduler's Completion (None if the message was deleted meanwhile).
        """
        message = delivery.message
        queue_id = message.queue_id
        try:
            stored = await anyio.to_thread.run_sync(self.store.get, queue_id)
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
        )
        results: list[WalkResult] = []
        if loop is not None:  # RFC 5321 6.3: a mail loop; bounce rather than pass it on
            results = [WalkResult(recipient=r, status=WalkStatus.FAILED, reply=loop) for r in rcpts]
            rcpts = {}
        for destination in group_recipients(rcpts, self.config.routing):
            lookup = RouteLookup(
                destination, config=self.config.routing, seed=self.rng.getrandbits(32)
            )
            route = lookup.result or await resolve_route_async(lookup, self.resolver)
            for line in route.trace:
                log.debug("%s: route %s: %s", queue_id, route.nexthop, line)
            if route.kind is RouteKind.LOCAL and self.config.lmtp is not None:
                route = await self._lmtp_route(route)
                results.extend(
                    await self._walk(
                        route, stored.envelope.sender, rcpts, content, queue_id, lmtp=True
                    )
                )
            elif route.kind is RouteKind.LOCAL:
                results.extend(await self._deliver_local(route, message, content))
            else:
                results.extend(
                    await self._walk(route, stored.envelope.sender, rcpts, content, queue_id)
                )
        report = report_from_results(results)
        now = self.clock()
        completion = self._complete(
            delivery,
            report.replies,
            reply=None,
            remote_mta=report.remote_mta,
            failed_conn=report.connection_failed,
        )
        if completion is None:
            return None
        await self._after(completion, message, content, now)
        return completion

    def _complete(
        self,
        delivery: Delivery,
        replies: dict[str, Reply],
        *,
        reply: Reply | None,
        remote_mta: str | None,
        failed_conn: bool,
    ) -> Completion | None:
        completion = self.scheduler.complete(
            delivery,
            now=self.clock(),
            replies=replies or None,
            reply=reply,
            remote_mta=remote_mta,
            connection_failed=failed_conn,
        )
        if completion is None:
            return None
        qid = completion.queue_id
        for state in completion.delivered:
            self.counters["delivered"] += 1
            log.info(
                "%s: to=<%s> relay=%s status=delivered (%s)",
                qid,
                state.recipient.address,
                state.remote_mta or "local",
                _reply_text(state.reply),
            )
        for state in completion.failed:
            self.counters["bounced"] += 1
            log.info(
                "%s: to=<%s> relay=%s status=bounced%s (%s)",
                qid,
                state.recipient.address,
                state.remote_mta or "none",
                " (expired)" if state.expired else "",
                _reply_text(state.reply),
            )
        for state in completion.deferred:
            self.counters["deferred"] += 1
            log.info(
                "%s: to=<%s> relay=%s status=deferred (%s)",
                qid,
                state.recipient.address,
                state.remote_mta or "none",
                _reply_text(state.reply),
            )
        return completion

    async def _after(
        self, completion: Completion, message: QueuedMessage, content: bytes, now: float
    ) -> None:
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
                await self._queue_dsn(message.queue_id, dsn)
            except Exception:
                # The notification could not be stored: keep the original in the spool, so
                # that the next start delivers it again rather than lose the bounce.
                log.exception("%s: could not queue the %s notice", message.queue_id, dsn.kind)
                return
        final = completion.delivered + completion.failed
        # A finished message is removed next; journaling it too costs an fsync and only
        # matters when a notice went out (a crash before the removal must not send it twice).
        if self.journal is not None and final and (completion.finished is None or dsns):
            await anyio.to_thread.run_sync(self.journal.record, message.queue_id, final)
        if completion.finished is not None:
            await self._remove(message.queue_id)

    async def _remove(self, queue_id: str) -> None:
        try:
            await anyio.to_thread.run_sync(self.store.delete, queue_id)
        except SpoolError as exc:
            log.warning("%s: could not remove from the spool: %s", queue_id, exc)
        if self.journal is not None:
            await anyio.to_thread.run_sync(self.journal.forget, queue_id)
        log.info("%s: removed", queue_id)

    async def _queue_dsn(self, queue_id: str, dsn: DSNMessage) -> None:
        # RFC 5321 6.1: the notification "MUST be sent using a null ("<>") reverse-path".
        new_id = await self.submit(
            MailFrom(address=dsn.sender), [RcptTo(address=dsn.recipient)], dsn.content
        )
        self.counters["dsn_sent"] += 1
        log.info(
            "%s: sender %s notification (%s) queued as %s",
            queue_id,
            dsn.kind.value,
            dsn.recipient,
            new_id,
        )

    async def _deliver_local(
        self, route: Route, message: QueuedMessage, content: bytes
    ) -> list[WalkResult]:
        out = []
        for rcpt in route.recipients:
            if self.local is None:
                reply: Reply | None = Reply(code=451, text="4.3.0 No local delivery configured")
            else:
                try:
                    result: Any = self.local(message.sender, rcpt, content)
                    if isinstance(result, Awaitable):
                        reply = await result
                    else:
                        reply = result
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

    async def _lmtp_route(self, local: Route) -> Route:
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
        return lookup.result or await resolve_route_async(lookup, self.resolver)

    async def _walk(
        self,
        route: Route,
        sender: MailFrom,
        rcpts: dict[str, Recipient],
        content: bytes,
        queue_id: str,
        *,
        lmtp: bool = False,
    ) -> list[WalkResult]:
        walk = DeliveryWalk(route, max_connections=self.config.max_connections)
        config = self.lmtp_config if lmtp else self.client_config
        opportunistic = self.config.tls is TLSPolicy.OPPORTUNISTIC
        while (target := walk.next_target()) is not None:
            for starttls in (None, False) if opportunistic else (False,):
                try:
                    with anyio.fail_after(self.config.connect_timeout):
                        stream: anyio.abc.ByteStream = await anyio.connect_tcp(
                            str(target.address), target.port
                        )
                except (OSError, TimeoutError) as exc:
                    walk.feed(ConnectFailed(reason=_reason(exc)))
                    break
                session = DeliverySession(
                    walk,
                    sender=sender,
                    recipients=rcpts,
                    content=content,
                    config=config,
                    starttls=starttls,
                    timeout=self.config.reply_timeout,
                    now=anyio.current_time(),
                )
                try:
                    stream = await self._converse(session, stream, target.host)
                finally:
                    with anyio.CancelScope(shield=True):
                        await stream.aclose()
                if session.tls_failed and starttls is None:
                    # Opportunistic TLS (RFC 7435): a failed handshake is no reason to give
                    # up on the host; the same host is tried again in clear text at once.
                    log.info("%s: TLS with %s failed (%s); retrying without TLS",
                             queue_id, target, session.error)  # fmt: skip
                    continue
                session.feed_walk()
                break
        for line in walk.trace:
            log.debug("%s: walk: %s", queue_id, line)
        return list(walk.results().values())

    async def _converse(
        self, session: DeliverySession, stream: anyio.abc.ByteStream, host: str
    ) -> anyio.abc.ByteStream:
        while True:
            try:
                while out := session.data_to_send():  # a body comes out chunk by chunk
                    await stream.send(out)
                if session.done:
                    return stream
                if session.wants_tls:
                    session.tls_failed = True  # until the handshake completes
                    with anyio.fail_after(self.config.reply_timeout):
                        stream = await anyio.streams.tls.TLSStream.wrap(
                            stream,
                            hostname=host,
                            ssl_context=self.tls_context,
                            standard_compatible=False,
                        )
                    session.tls_failed = False
                    session.tls_established()
                    continue
                wait = session.wait_time(anyio.current_time())
                with anyio.move_on_after(wait) as scope:
                    data = await stream.receive(READ_SIZE)
                if scope.cancelled_caught:
                    session.check_timeout(anyio.current_time())
                    continue
                session.receive_data(data, now=anyio.current_time())
            except anyio.EndOfStream:
                session.receive_eof()
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                session.connection_failed(_reason(exc))
            if session.done:
                return stream


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "connection timed out"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text


def _reply_text(reply: Reply | None) -> str:
    if reply is None:
        return "no reply"
    return f"{reply.code} " + " ".join(reply.text.split())


__all__ = ["DeliveryAgent", "LocalDeliver"]

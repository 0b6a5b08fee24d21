# The delivery agent on anyio: one code path for asyncio and trio.
#
# Every decision is adapters/_agent.py's AgentCore, shared with the blocking agent of the
# threads runtime (adapters/_delivery_threads.py); this module supplies its I/O -- store and
# journal calls in worker threads (anyio.to_thread), DNS with dnspython's async resolver,
# outbound connections with anyio streams and TLSStream for STARTTLS -- and the scheduling
# loop.  The course of one delivery (written once, in AgentCore):
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
# Connection reuse.  AgentCore decides (see adapters/_agent.py); here a Talk with a Channel
# converses on its open stream instead of connecting, a parked session's stream is handed
# back unclosed, Close writes QUIT (at most a second) and closes, run() closes the sessions
# idle past connection_cache_time as it goes (its sleep is bounded by the next expiry) and
# every cached one when it returns; close_cached() does the same for a caller of run_once().
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
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import anyio
import anyio.abc
import anyio.streams.tls

from mailwire.adapters._agent import (
    AgentCore,
    Blocking,
    Channel,
    Close,
    LocalCall,
    LocalDeliver,
    Op,
    Resolve,
    Talk,
    Talked,
    drive_async,
    is_async_callable,
    reason,
)
from mailwire.adapters._delivery import (
    DeliveryConfig,
    DeliverySession,
    RecipientJournal,
    opportunistic_context,
)
from mailwire.adapters._dns import make_async_resolver, resolve_route_async
from mailwire.adapters._spool import MessageStore
from mailwire.protocol._events import MailFrom, RcptTo
from mailwire.protocol._queue import Completion, Delivery, MessageState, Scheduler

READ_SIZE = 64 * 1024


class DeliveryAgent(AgentCore):
    """Takes due work from a Scheduler and delivers it, on asyncio or trio (see the module
    comment; the arguments are AgentCore's).

    Every method runs on the agent's event loop: the MTA calls them through an anyio
    portal.
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
        super().__init__(
            store, config, local=local, scheduler=scheduler, clock=clock, rng=rng, journal=journal
        )
        self.resolver = make_async_resolver(
            config.nameservers, timeout=config.dns_timeout, lifetime=config.dns_lifetime
        )
        self.tls_context = opportunistic_context()
        self._wake: anyio.Event | None = None
        self._stopping = False

    # --- the public verbs (AgentCore's logic, driven here) -------------------------------------

    async def start(self) -> list[str]:
        """Queue every message in the store (after a restart).  Returns their queue IDs."""
        return await drive_async(self._start(), self._do)

    async def submit(self, sender: MailFrom, recipients: Sequence[RcptTo], content: bytes) -> str:
        """Store a message durably and queue it (for embedding and bounces).

        Returns:
            The queue ID.
        """
        return await drive_async(self._submit(sender, recipients, content), self._do)

    async def delete(self, queue_id: str) -> MessageState:
        """Remove a message from the queue and the spool, without any notification.

        Raises:
            KeyError: no such queued message.
        """
        return await drive_async(self._delete(queue_id), self._do)

    async def deliver(self, delivery: Delivery) -> Completion | None:
        """Run one leased delivery and record its result.

        Returns:
            The Scheduler's Completion (None if the message was deleted meanwhile).
        """
        return await drive_async(self._deliver(delivery), self._do)

    def wake(self) -> None:
        """Make a waiting run() look at the queue again (call on the agent's event loop)."""
        if self._wake is not None:
            self._wake.set()

    def stop(self) -> None:
        """Make run() return, cutting the deliveries in flight (their recipients stay
        queued); run() closes the cached sessions as it returns (without run(), use
        close_cached()).  Call on the agent's event loop."""
        self._stopping = True
        self.wake()

    async def close_cached(self) -> None:
        """Close every cached session now (QUIT, then close)."""
        await self._close_channels(self._drain_channels())

    # --- running ------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Run every delivery due now (up to ``max_deliveries`` at a time) to completion,
        including the deliveries that become due meanwhile at the same clock time (bounces).

        Returns:
            The number of deliveries run.
        """
        count = 0
        limit = anyio.CapacityLimiter(self.config.max_deliveries)
        await self._close_channels(self._expired_channels())
        while True:
            due = self._pop_due()
            if not due:
                return count
            count += len(due)
            async with anyio.create_task_group() as group:
                for delivery in due:
                    group.start_soon(self._limited, delivery, limit)

    async def run(self, *, idle: float = 60.0) -> None:
        """Deliver until stop().  Deliveries start as they come due and run side by side (at
        most ``max_deliveries``): a slow destination never holds up the others.  Between
        starts it sleeps until the next due time, a wake() (new mail, a finished delivery, a
        queue verb), or ``idle`` seconds."""
        limit = self.config.max_deliveries
        try:
            async with anyio.create_task_group() as group:
                while not self._stopping:
                    self._wake = anyio.Event()
                    free = limit - self.scheduler.in_flight
                    if free > 0:
                        for delivery in self._pop_due(limit=free):
                            group.start_soon(self._run_one, delivery)
                    expired = self._expired_channels()
                    if expired:
                        group.start_soon(self._close_channels, expired)
                    delay = self._idle_delay(idle)
                    with anyio.move_on_after(delay):
                        await self._wake.wait()
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._close_channels(self._drain_channels())

    async def _run_one(self, delivery: Delivery) -> None:
        try:
            await drive_async(self._guarded(delivery), self._do)
        finally:
            self.wake()  # a slot, and perhaps a destination, is free again

    async def _limited(self, delivery: Delivery, limit: anyio.CapacityLimiter) -> None:
        async with limit:
            await drive_async(self._guarded(delivery), self._do)

    # --- the I/O of the Ops -------------------------------------------------------------------

    async def _do(self, op: Op) -> object:
        if isinstance(op, Blocking):
            return await anyio.to_thread.run_sync(_call, op.fn, op.args)
        if isinstance(op, Resolve):
            return await resolve_route_async(op.lookup, self.resolver, cache=self.dns_cache)
        if isinstance(op, Talk):
            return await self._talk(op)
        if isinstance(op, LocalCall):
            return await self._local(op)
        if isinstance(op, Close):
            await self._close_channels(op.channels)
            return None
        raise TypeError(f"unknown op {op!r}")

    async def _close_channels(self, channels: Sequence[Channel]) -> None:
        for channel in channels:
            stream = cast(anyio.abc.ByteStream, channel.stream)
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(1.0):
                    with contextlib.suppress(Exception):
                        if goodbye := channel.goodbye():
                            await stream.send(goodbye)
                with contextlib.suppress(Exception):
                    await stream.aclose()

    async def _local(self, op: LocalCall) -> object:
        if is_async_callable(op.fn):
            return await op.fn(op.sender, op.recipient, op.content)  # type: ignore[misc]
        result = await anyio.to_thread.run_sync(op.fn, op.sender, op.recipient, op.content)
        if isinstance(result, Awaitable):
            return await result
        return result

    async def _talk(self, op: Talk) -> Talked | str:
        target = op.target
        stream: anyio.abc.ByteStream
        if op.channel is not None:
            stream = cast(anyio.abc.ByteStream, op.channel.stream)
        else:
            try:
                with anyio.fail_after(self.config.connect_timeout):
                    stream = await anyio.connect_tcp(str(target.address), target.port)
            except (OSError, TimeoutError) as exc:
                return reason(exc)
        keep = False
        try:
            session = op.start(anyio.current_time())
            stream = await self._converse(session, stream, target.host)
            keep = session.parked and not self._stopping
        finally:
            if not keep:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
        return Talked(session, stream if keep else None)

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
                session.connection_failed(reason(exc))
            if session.done:
                return stream


def _call(fn: Callable[..., object], args: tuple[object, ...]) -> object:
    return fn(*args)


__all__ = ["DeliveryAgent", "LocalDeliver"]

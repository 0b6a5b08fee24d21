# The delivery agent on plain threads: blocking sockets, the ssl module, dnspython's sync
# resolver, a bounded pool of worker threads.
#
# Every decision is adapters/_agent.py's AgentCore, shared with the anyio agent
# (adapters/_delivery_anyio.py); this module supplies only the I/O of its Ops and the loop
# that schedules deliveries:
#
#   Blocking   store and journal calls, inline in the delivery's worker thread;
#   Resolve    adapters/_dns.resolve_route with a ``dns.resolver.Resolver`` (the issue's
#              "sync resolver on threads") and the agent's DnsCache; queries of one phase
#              are asked one at a time;
#   Talk       socket.create_connection (connect_timeout), then the DeliverySession loop
#              with socket timeouts: every wait is bounded by the session's wait_time() (the
#              smaller of reply_timeout and the engine's RFC 5321 deadline), every sendall()
#              by reply_timeout; STARTTLS with SSLContext.wrap_socket (opportunistic, RFC
#              7435: no certificate check, a failed handshake retries the host in clear text);
#   LocalCall  the local delivery callable, called in the worker thread.
#
# Concurrency.  run() is the scheduler loop, in the thread that calls it: under the agent's
# lock it pops what is due (at most ``max_deliveries`` in flight), hands each Delivery to a
# ThreadPoolExecutor of ``max_deliveries`` workers, and waits on a Condition (built on the
# same lock) until the next due time, a wake() (new mail, a finished delivery, a queue verb)
# or ``idle`` seconds.  A wake() needs the lock, which the loop holds from pop_due() to
# wait(), so no wake-up is lost.  The Scheduler is not thread-safe: AgentCore takes the lock
# around every use of it, so the queue verbs may be called from any thread (the MTA's control
# socket, the server's commit thread) without a portal.
#
# Connection reuse.  AgentCore decides (see adapters/_agent.py); here a Talk with a Channel
# converses on its open socket (the TLS one after STARTTLS) instead of connecting, a parked
# session's socket is handed back open (and untracked: it is no longer in use), Close writes
# QUIT without blocking and closes, run()'s loop closes the sessions idle past
# connection_cache_time (its wait is bounded by the next expiry), and stop() and
# close_cached() close every cached one at once.
#
# stop() ends run(): the loop stops popping work, the sockets of deliveries in flight are shut
# down (their sessions fail, so their recipients stay queued, as on anyio where the tasks are
# cancelled), and the workers are joined for at most ``join_timeout`` seconds (a DNS query in
# progress ends by its own lifetime).
from __future__ import annotations

import concurrent.futures
import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence

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
    drive,
    reason,
)
from mailwire.adapters._delivery import (
    DeliveryConfig,
    DeliverySession,
    RecipientJournal,
    opportunistic_context,
)
from mailwire.adapters._dns import make_resolver, resolve_route
from mailwire.adapters._spool import MessageStore
from mailwire.protocol._events import MailFrom, RcptTo
from mailwire.protocol._queue import Completion, Delivery, MessageState, Scheduler

READ_SIZE = 64 * 1024


class BlockingDeliveryAgent(AgentCore):
    """Takes due work from a Scheduler and delivers it with blocking sockets and worker
    threads (see the module comment; the arguments are AgentCore's, plus ``join_timeout``:
    how long stop() waits for the workers).  Every method may be called from any thread.
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
        join_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            store, config, local=local, scheduler=scheduler, clock=clock, rng=rng, journal=journal
        )
        self.resolver = make_resolver(
            config.nameservers, timeout=config.dns_timeout, lifetime=config.dns_lifetime
        )
        self.tls_context = opportunistic_context()
        self.join_timeout = join_timeout
        lock = threading.RLock()
        self._lock = lock
        self._cond = threading.Condition(lock)
        self._stopping = False
        self._live: set[socket.socket] = set()  # sockets of sessions in progress

    # --- the public verbs (AgentCore's logic, driven here) -------------------------------------

    def start(self) -> list[str]:
        """Queue every message in the store (after a restart).  Returns their queue IDs."""
        return drive(self._start(), self._do)

    def submit(self, sender: MailFrom, recipients: Sequence[RcptTo], content: bytes) -> str:
        """Store a message durably and queue it (for embedding and bounces).

        Returns:
            The queue ID.
        """
        return drive(self._submit(sender, recipients, content), self._do)

    def delete(self, queue_id: str) -> MessageState:
        """Remove a message from the queue and the spool, without any notification.

        Raises:
            KeyError: no such queued message.
        """
        return drive(self._delete(queue_id), self._do)

    def deliver(self, delivery: Delivery) -> Completion | None:
        """Run one leased delivery and record its result.

        Returns:
            The Scheduler's Completion (None if the message was deleted meanwhile).
        """
        return drive(self._deliver(delivery), self._do)

    def wake(self) -> None:
        """Make a waiting run() look at the queue again."""
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> None:
        """Make run() return: no new deliveries start, the ones in flight are cut (their
        recipients stay queued), the cached sessions are closed, and run() joins the
        workers."""
        with self._cond:
            self._stopping = True
            live = list(self._live)
            cached = self._drain_channels()
            self._cond.notify_all()
        self._close_channels(cached)
        for sock in live:
            with contextlib.suppress(OSError):
                # the plain socket's shutdown, also under an SSLSocket: it wakes the worker
                # blocked in recv() without touching the TLS object another thread uses
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def close_cached(self) -> None:
        """Close every cached session now (QUIT, then close)."""
        self._close_channels(self._drain_channels())

    # --- running ------------------------------------------------------------------------------

    def run_once(self) -> int:
        """Run every delivery due now (up to ``max_deliveries`` at a time) to completion,
        including the deliveries that become due meanwhile at the same clock time (bounces).

        Returns:
            The number of deliveries run.
        """
        count = 0
        self._close_channels(self._expired_channels())
        with concurrent.futures.ThreadPoolExecutor(
            self.config.max_deliveries, thread_name_prefix="mailwire-delivery"
        ) as pool:
            while True:
                due = self._pop_due()
                if not due:
                    return count
                count += len(due)
                futures = [pool.submit(self._guarded_now, d) for d in due]
                for future in futures:
                    future.result()

    def run(self, *, idle: float = 60.0) -> None:
        """Deliver until stop().  Deliveries start as they come due and run side by side in
        worker threads (at most ``max_deliveries``): a slow destination never holds up the
        others.  Between starts it waits until the next due time, a wake(), or ``idle``
        seconds."""
        limit = self.config.max_deliveries
        futures: set[concurrent.futures.Future[None]] = set()
        pool = concurrent.futures.ThreadPoolExecutor(limit, thread_name_prefix="mailwire-delivery")
        try:
            with self._cond:
                while not self._stopping:
                    free = limit - self.scheduler.in_flight
                    if free > 0:
                        for delivery in self._pop_due(limit=free):
                            futures.add(pool.submit(self._run_one, delivery))
                    futures = {f for f in futures if not f.done()}
                    self._close_channels(self._expired_channels())  # non-blocking
                    delay = self._idle_delay(idle)
                    if delay > 0:
                        self._cond.wait(delay)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            concurrent.futures.wait(futures, timeout=self.join_timeout)

    def _run_one(self, delivery: Delivery) -> None:
        try:
            self._guarded_now(delivery)
        finally:
            self.wake()  # a slot, and perhaps a destination, is free again

    def _guarded_now(self, delivery: Delivery) -> None:
        drive(self._guarded(delivery), self._do)

    # --- the I/O of the Ops -------------------------------------------------------------------

    def _do(self, op: Op) -> object:
        if isinstance(op, Blocking):
            return op.fn(*op.args)
        if isinstance(op, Resolve):
            return resolve_route(op.lookup, self.resolver, cache=self.dns_cache)
        if isinstance(op, Talk):
            return self._talk(op)
        if isinstance(op, LocalCall):
            return op.fn(op.sender, op.recipient, op.content)
        if isinstance(op, Close):
            self._close_channels(op.channels)
            return None
        raise TypeError(f"unknown op {op!r}")

    @staticmethod
    def _close_channels(channels: Sequence[Channel]) -> None:
        for channel in channels:
            sock = channel.stream
            assert isinstance(sock, socket.socket)
            with contextlib.suppress(OSError):  # ssl.SSLError included
                sock.setblocking(False)  # a goodbye, not a conversation: never wait
                if goodbye := channel.goodbye():
                    sock.send(goodbye)
            sock.close()

    def _talk(self, op: Talk) -> Talked | str:
        target = op.target
        with self._cond:
            if self._stopping:
                if op.channel is not None:
                    self._close_channels([op.channel])
                return "the delivery agent is stopping"
        if op.channel is not None:
            sock = op.channel.stream
            assert isinstance(sock, socket.socket)
        else:
            try:
                sock = socket.create_connection(
                    (str(target.address), target.port), timeout=self.config.connect_timeout
                )
                # small commands then a wait for the reply: Nagle + delayed ACK would cost
                # ~40 ms per exchange (asyncio and trio set this by themselves)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                return reason(exc)
        current = [sock]  # the socket in use: the TLS one after STARTTLS
        self._track(sock, None)
        keep = False
        try:
            session = op.start(time.monotonic())
            self._converse(session, current, target.host)
            with self._cond:
                keep = session.parked and not self._stopping
        finally:
            self._track(None, current[0])
            if not keep:
                current[0].close()
        return Talked(session, current[0] if keep else None)

    def _track(self, new: socket.socket | None, old: socket.socket | None) -> None:
        with self._cond:
            if old is not None:
                self._live.discard(old)
            if new is not None:
                self._live.add(new)
                if self._stopping:  # stop() came between the connect and now
                    with contextlib.suppress(OSError):
                        socket.socket.shutdown(new, socket.SHUT_RDWR)

    def _converse(self, session: DeliverySession, current: list[socket.socket], host: str) -> None:
        timeout = self.config.reply_timeout
        sock = current[0]
        while True:
            try:
                while out := session.data_to_send():  # a body comes out chunk by chunk
                    sock.settimeout(timeout)
                    sock.sendall(out)
                if session.done:
                    return
                if session.wants_tls:
                    session.tls_failed = True  # until the handshake completes
                    sock.settimeout(timeout)
                    plain = sock
                    sock = current[0] = self.tls_context.wrap_socket(
                        plain, server_hostname=host, do_handshake_on_connect=False
                    )
                    self._track(sock, plain)
                    sock.do_handshake()
                    session.tls_failed = False
                    session.tls_established()
                    continue
                sock.settimeout(max(session.wait_time(time.monotonic()), 0.001))
                try:
                    data = sock.recv(READ_SIZE)
                except TimeoutError:
                    session.check_timeout(time.monotonic())
                    continue
                if data:
                    session.receive_data(data, now=time.monotonic())
                else:
                    session.receive_eof()
            except OSError as exc:  # ssl.SSLError, resets, send timeouts
                session.connection_failed(reason(exc))
            if session.done:
                return


__all__ = ["BlockingDeliveryAgent"]

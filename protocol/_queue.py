# The pure queue model: what every queued message and recipient is waiting for, and when.
#
# Nothing here touches a disk, a clock or a random source.  The caller (a queue runner in an
# adapter) owns the spool files and the SMTP client; it tells the Scheduler what arrived
# (add), asks what is due (pop_due / pop_one with `now`), runs those deliveries, and reports
# each attempt's replies (complete).  Every decision is therefore an exact, repeatable
# function of its arguments, which is what makes the property tests in tests/test_queue.py
# possible.
#
# Units of work.  A message has recipients; recipients are grouped by *destination* (a routing
# key the caller chooses -- by default the recipient's domain, lower-cased).  One delivery is
# one (message, destination) *job*: one SMTP transaction carries all of that message's open
# recipients for that destination.  A handed-out job is *leased*; its Delivery carries the
# lease number and the caller must complete() it exactly once.  A job is in exactly one of
# these states, and that is the "never lose or duplicate a recipient" invariant:
#
#   WAITING  in its destination's heap, due at `job.due`
#   ACTIVE   leased out; in no heap; its recipients are in exactly one outstanding Delivery
#   HELD     the message is on hold; in no heap
#   GONE     finished or deleted; referenced only by stale heap entries
#
# Recipients whose status is final (DELIVERED, FAILED) belong to no job; a job whose
# recipients are all final is GONE; a message all of whose jobs are GONE is finished and leaves
# the scheduler (complete() hands back its final MessageState so the caller can bounce and
# unlink the spool file).
#
# Two-level heaps, lazy deletion.  Each destination keeps a heap of (due, seq, job) for its
# WAITING jobs.  A global heap holds (ready_time, seq, destination), where ready_time is
# max(earliest job due, destination not_before), and holds an entry only for destinations
# that may start another delivery (active < effective limit).  An entry is live only while its
# seq equals the owner's current seq; anything that changes an owner's time bumps the seq and
# pushes a fresh entry, so stale entries are skipped when popped (and the heaps are rebuilt
# when stale entries outnumber live ones).  pop and complete therefore cost O(log n) each:
# O(log destinations) plus O(log jobs of one destination).
#
# Retry schedule (RFC 5321 4.5.4.1).  "Retries continue until the message is transmitted or
# the sender gives up; the give-up time generally needs to be at least 4-5 days."  "In
# general, the retry interval SHOULD be at least 30 minutes; however, more sophisticated and
# variable strategies will be beneficial when the SMTP client can determine the reason for
# non-delivery."  retry_delay() is exponential from `first_retry` (a few minutes: a greylisting
# server usually accepts the second try), and after `fast_retries` attempts never below
# `min_interval` (30 minutes) and never above `max_interval`; next_retry_time() never schedules
# beyond arrival + lifetime (a last try lands exactly on the expiry), and after that the
# still-deferred recipients fail (expired=True; the DSN reports their last 4xx reply, as
# Postfix does).  Jitter is a pre-drawn number in [0, 1) that the caller passes in.
#
# Per-destination back-off.  A connection-level failure (no host answered, a 4xx greeting,
# ...; the caller says connection_failed=True) puts the destination itself in back-off: its
# not_before moves to now + retry_delay(consecutive failures), and while it has failures its
# concurrency drops to one (a single probe, as Postfix does).  Every other message for it
# waits for that one time instead of each hammering the dead host on its own schedule, and no
# other destination is affected.  Any completed attempt without connection failure resets
# the destination.  Deliveries already in flight when a failure is recorded do not count again
# (each lease remembers the failure count it started with).
#
# Handoff (RFC 3461 4.2, 6.2.1).  A DELIVERED recipient records *how* the message left: into
# a mailbox here (Maildir, a callable, LMTP: a final delivery, reported as "delivered" when
# NOTIFY=SUCCESS asked for it), to a next hop that offered DSN (the NOTIFY request went with
# the message, so the next hop reports and this MTA stays silent), or to a next hop without
# DSN ("relayed": the request could not be passed on, so this MTA reports that much).  The
# caller says which (complete(handoffs=...)); protocol/_dsn.py turns it into the Action.
from __future__ import annotations

import enum
import heapq
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from mailwire.protocol._events import MailFrom, RcptTo, Reply

DEFAULT_LIFETIME = 5 * 86400.0  # RFC 5321 4.5.4.1: give-up time "at least 4-5 days"
DEFAULT_DELAY_WARNING = 4 * 3600.0  # the customary first delay notice (Postfix, Exim)
MIN_RETRY_INTERVAL = 1800.0  # RFC 5321 4.5.4.1: "the retry interval SHOULD be at least 30 minutes"


class RecipientStatus(enum.Enum):
    """Where one recipient of a queued message stands."""

    PENDING = "pending"  #: not attempted yet
    DEFERRED = "deferred"  #: attempted, got a transient failure, will be retried
    DELIVERED = "delivered"  #: final: accepted by the next hop (2yz)
    FAILED = "failed"  #: final: permanently refused (5yz) or given up after the lifetime

    @property
    def is_final(self) -> bool:
        """True for DELIVERED and FAILED."""
        return self is RecipientStatus.DELIVERED or self is RecipientStatus.FAILED


class Handoff(enum.Enum):
    """How a delivered recipient's message left this MTA (RFC 3461 4.2 and 6.2.1)."""

    MAILBOX = "mailbox"  #: final delivery (local mailbox, callable, LMTP): "delivered"
    DSN_PASSED = "dsn-passed"  #: to a next hop that offered DSN: it reports, not this MTA
    RELAYED = "relayed"  #: to a next hop without DSN: "relayed" (the request ends here)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipient:
    """One envelope recipient of a queued message, with its DSN parameters (RFC 3461).

    Attributes:
        address: the forward-path mailbox.
        destination: the routing key deliveries are grouped and throttled by; defaults to
            the address's domain in lower case (``""`` for ``<Postmaster>``).
        notify: NOTIFY= as given (``("NEVER",)`` or a subset of SUCCESS/FAILURE/DELAY), or
            None when absent (RFC 3461 4.1: then failures and delays are reported).
        orcpt: ORCPT= as ``"addr-type;address"``, or None.
    """

    address: str
    destination: str = ""
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("a recipient needs an address")
        if not self.destination:
            domain = self.address.rpartition("@")[2].lower() if "@" in self.address else ""
            object.__setattr__(self, "destination", domain)

    @classmethod
    def from_rcpt(cls, rcpt: RcptTo, *, destination: str = "") -> Recipient:
        """The queue record for an accepted RCPT command (keeps NOTIFY and ORCPT)."""
        return cls(
            address=rcpt.address, destination=destination, notify=rcpt.notify, orcpt=rcpt.orcpt
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class QueuedMessage:
    """The envelope of one queued message.  The content lives with the caller (the spool).

    Attributes:
        queue_id: the caller's unique id for the message.
        sender: the reverse-path, ``""`` for the null sender (a bounce: never bounced itself).
        recipients: the recipients, with distinct addresses.
        arrival: when the message was accepted, seconds (the caller's clock).
        size: the content size in octets.
        envid: ENVID= (RFC 3461 4.4), or None.
        ret: RET= (RFC 3461 4.3) ``"FULL"`` / ``"HDRS"``, or None.

    Raises:
        ValueError: on an empty queue id, no recipients, or a repeated recipient address.
    """

    queue_id: str
    sender: str
    recipients: tuple[Recipient, ...]
    arrival: float
    size: int = 0
    envid: str | None = None
    ret: str | None = None

    def __post_init__(self) -> None:
        if not self.queue_id:
            raise ValueError("a queued message needs a queue id")
        if not self.recipients:
            raise ValueError("a queued message needs at least one recipient")
        if len({r.address for r in self.recipients}) != len(self.recipients):
            raise ValueError("recipient addresses must be distinct")
        if self.ret not in (None, "FULL", "HDRS"):
            raise ValueError(f"bad RET {self.ret!r}")
        if self.size < 0:
            raise ValueError(f"bad size {self.size!r}")

    @classmethod
    def from_envelope(
        cls,
        *,
        queue_id: str,
        mail: MailFrom,
        rcpts: Sequence[RcptTo],
        arrival: float,
        size: int = 0,
    ) -> QueuedMessage:
        """The queue record for an accepted transaction (keeps ENVID, RET, NOTIFY, ORCPT)."""
        return cls(
            queue_id=queue_id,
            sender=mail.address,
            recipients=tuple(Recipient.from_rcpt(r) for r in rcpts),
            arrival=arrival,
            size=size,
            envid=mail.envid,
            ret=mail.ret,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipientState:
    """The recorded state of one recipient.

    Attributes:
        recipient: the recipient.
        status: where it stands.
        reply: the reply of the last attempt (None while PENDING).
        attempts: how many attempts reported a result for it.
        last_attempt: when the last attempt completed, or None.
        remote_mta: the host that gave the last reply, if known.
        expired: FAILED because the lifetime ran out while it was deferred.
        handoff: for DELIVERED, how the message left (see Handoff), or None when the caller
            did not say (reported as delivered).
    """

    recipient: Recipient
    status: RecipientStatus = RecipientStatus.PENDING
    reply: Reply | None = None
    attempts: int = 0
    last_attempt: float | None = None
    remote_mta: str | None = None
    expired: bool = False
    handoff: Handoff | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageState:
    """A snapshot of one message in the scheduler (for listings, bounces and the queue CLI).

    Attributes:
        message: the envelope.
        recipients: every recipient's state, in envelope order.
        held: the message is on hold (nothing is scheduled until released).
        active: deliveries of it currently leased out.
        next_attempt: the earliest due time of its waiting deliveries, or None.
        delay_warned: a delay notice was already signalled for it.
    """

    message: QueuedMessage
    recipients: tuple[RecipientState, ...]
    held: bool = False
    active: int = 0
    next_attempt: float | None = None
    delay_warned: bool = False

    @property
    def is_finished(self) -> bool:
        """Every recipient is final (delivered or failed)."""
        return all(r.status.is_final for r in self.recipients)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how long to retry (RFC 5321 4.5.4.1).  All times in seconds.

    Attributes:
        first_retry: the delay after the first transient failure (minutes).
        backoff_factor: each further delay is this much longer (>= 1).
        fast_retries: how many early retries may come sooner than ``min_interval``.
        min_interval: the floor of every later delay (30 minutes per RFC 5321 4.5.4.1).
        max_interval: the longest delay between attempts.
        lifetime: give up this long after arrival (default 5 days).
        delay_warning: signal a delay notice once a message has been queued this long with
            recipients still deferred (default 4 hours); None: never.
        jitter: the spread added to each delay: ``delay * (1 + jitter * draw)`` for a draw in
            [0, 1) passed to the scheduler.
        destination_concurrency: default limit of simultaneous deliveries per destination.

    Raises:
        ValueError: on inconsistent values.
    """

    first_retry: float = 300.0
    backoff_factor: float = 2.0
    fast_retries: int = 3
    min_interval: float = MIN_RETRY_INTERVAL
    max_interval: float = 4 * 3600.0
    lifetime: float = DEFAULT_LIFETIME
    delay_warning: float | None = DEFAULT_DELAY_WARNING
    jitter: float = 0.0
    destination_concurrency: int = 20

    def __post_init__(self) -> None:
        if not 0 < self.first_retry <= self.max_interval:
            raise ValueError("need 0 < first_retry <= max_interval")
        if self.backoff_factor < 1:
            raise ValueError("backoff_factor must be >= 1")
        if self.fast_retries < 0:
            raise ValueError("fast_retries must be >= 0")
        if not 0 < self.min_interval <= self.max_interval:
            raise ValueError("need 0 < min_interval <= max_interval")
        if self.lifetime <= 0:
            raise ValueError("lifetime must be positive")
        if self.delay_warning is not None and self.delay_warning <= 0:
            raise ValueError("delay_warning must be positive or None")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")
        if self.destination_concurrency < 1:
            raise ValueError("destination_concurrency must be >= 1")


def retry_delay(failures: int, policy: RetryPolicy, *, jitter: float = 0.0) -> float:
    """The wait after the ``failures``-th consecutive transient failure.

    Non-decreasing in ``failures`` (for equal jitter); at least ``policy.min_interval`` once
    ``failures > policy.fast_retries``; at most ``policy.max_interval * (1 + policy.jitter)``.

    Args:
        failures: consecutive failures so far, >= 1.
        policy: the retry policy.
        jitter: a pre-drawn number in [0, 1).

    Returns:
        Seconds to wait.

    Raises:
        ValueError: if ``failures < 1`` or the jitter draw is outside [0, 1).
    """
    if failures < 1:
        raise ValueError("failures must be >= 1")
    if not 0 <= jitter < 1:
        raise ValueError("jitter draw must be within [0, 1)")
    try:
        delay = policy.first_retry * policy.backoff_factor ** min(failures - 1, 4096)
    except OverflowError:
        delay = policy.max_interval
    delay = min(delay, policy.max_interval)
    if failures > policy.fast_retries:
        delay = max(delay, policy.min_interval)
    return delay * (1 + policy.jitter * jitter)


def next_retry_time(
    *, arrival: float, failures: int, now: float, policy: RetryPolicy, jitter: float = 0.0
) -> float | None:
    """When to try again after a transient failure, or None to give up.

    Never later than ``arrival + policy.lifetime``: the last try is at the expiry itself, and
    a failure at or after the expiry gives up (RFC 5321 4.5.4.1).

    Args:
        arrival: when the message arrived.
        failures: consecutive failures so far, including the one just seen (>= 1).
        now: the time of that failure.
        policy: the retry policy.
        jitter: a pre-drawn number in [0, 1).

    Returns:
        The next attempt time, or None when the lifetime is over.
    """
    expiry = arrival + policy.lifetime
    if now >= expiry:
        return None
    return min(now + retry_delay(failures, policy, jitter=jitter), expiry)


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """One leased unit of work: deliver ``message`` to ``recipients`` at ``destination``.

    Hand it back with :meth:`Scheduler.complete` exactly once.

    Attributes:
        lease: the lease number (unique within the scheduler).
        message: the envelope (sender, ENVID, RET, ...).
        destination: the routing key shared by the recipients.
        recipients: the open recipients to attempt, in envelope order.
        attempt: 1 for the first attempt of this (message, destination), then 2, 3, ...
    """

    lease: int
    message: QueuedMessage
    destination: str
    recipients: tuple[Recipient, ...]
    attempt: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion:
    """What one completed attempt changed.

    Attributes:
        queue_id: the message.
        delivered: recipients that became DELIVERED (final).
        failed: recipients that became FAILED (final; ``expired`` set if given up).
        deferred: recipients still DEFERRED, to be retried at ``next_attempt``.
        next_attempt: when the deferred recipients are due again, or None.
        delay_warning: True exactly once per message: the first attempt that left recipients
            deferred after ``policy.delay_warning`` -- time for a delay DSN.
        finished: the final state of the message when this attempt finished it (it has left
            the scheduler), else None.
    """

    queue_id: str
    delivered: tuple[RecipientState, ...] = ()
    failed: tuple[RecipientState, ...] = ()
    deferred: tuple[RecipientState, ...] = ()
    next_attempt: float | None = None
    delay_warning: bool = False
    finished: MessageState | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationState:
    """A snapshot of one destination's throttle state.

    Attributes:
        destination: the routing key.
        active: deliveries in flight.
        limit: the configured concurrency (1 while ``failures`` > 0).
        failures: consecutive connection failures.
        not_before: no new delivery starts before this time.
        waiting: deliveries waiting in its queue.
    """

    destination: str
    active: int
    limit: int
    failures: int
    not_before: float
    waiting: int


# --- internal mutable records (never handed out) --------------------------------------------

_WAITING, _ACTIVE, _HELD, _GONE = 0, 1, 2, 3
_DELIVERED, _FAILED, _DEFERRED = (
    RecipientStatus.DELIVERED,
    RecipientStatus.FAILED,
    RecipientStatus.DEFERRED,
)


class _Msg:
    __slots__ = ("message", "states", "jobs", "held", "warned")

    def __init__(self, message: QueuedMessage, states: list[RecipientState]) -> None:
        self.message = message
        self.states = states
        self.jobs: dict[str, _Job] = {}
        self.held = False
        self.warned = False


class _Job:
    __slots__ = ("msg", "dest", "rcpts", "due", "seq", "state", "failures", "attempt", "epoch")

    def __init__(self, msg: _Msg, dest: _Dest, rcpts: list[int], due: float) -> None:
        self.msg = msg
        self.dest = dest
        self.rcpts = rcpts  # indices of the open recipients
        self.due = due
        self.seq = -1
        self.state = _GONE
        self.failures = 0  # consecutive deferrals, drives the retry schedule
        self.attempt = 0
        self.epoch = 0  # the destination's failure count when the lease started


class _Dest:
    __slots__ = (
        "name", "heap", "live", "jobs", "active", "limit", "failures", "not_before", "seq", "ready"
    )  # fmt: skip

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.heap: list[tuple[float, int, _Job]] = []
        self.live = 0  # WAITING jobs (live heap entries)
        self.jobs = 0  # jobs not GONE (waiting, active or held); the record lives while > 0
        self.active = 0
        self.limit = limit
        self.failures = 0
        self.not_before = float("-inf")
        self.seq = -1  # seq of the live global-heap entry, -1 if none
        self.ready = 0.0  # its time


class Scheduler:
    """The queue's brain: which delivery is due, and what each attempt's replies mean.

    Holds any number of messages; :meth:`pop_one`, :meth:`pop_due` (per delivery) and
    :meth:`complete` run in O(log n).  Each recipient is always in exactly one place -- final,
    waiting, held, or in exactly one outstanding :class:`Delivery` -- whatever sequence of
    results is reported.

    Args:
        policy: retry timing and the default destination concurrency.
        concurrency: per-destination concurrency limits overriding the policy's default.
    """

    def __init__(
        self, policy: RetryPolicy | None = None, *, concurrency: Mapping[str, int] | None = None
    ) -> None:
        self.policy = policy or RetryPolicy()
        self._concurrency = dict(concurrency or {})
        if any(v < 1 for v in self._concurrency.values()):
            raise ValueError("concurrency limits must be >= 1")
        self._msgs: dict[str, _Msg] = {}
        self._dests: dict[str, _Dest] = {}
        self._heap: list[tuple[float, int, _Dest]] = []
        self._leases: dict[int, _Job] = {}
        self._seq = 0
        self._next_lease = 1
        # retry_delay(f) for f = 1..64 (index 0 unused), the hot path of complete()
        self._delays = [0.0] + [retry_delay(f, self.policy) for f in range(1, 65)]

    # --- size and lookup ----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._msgs)

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._msgs

    @property
    def in_flight(self) -> int:
        """Deliveries leased out and not yet completed."""
        return len(self._leases)

    # --- heap plumbing ----------------------------------------------------------------------

    def _dest(self, name: str) -> _Dest:
        d = self._dests.get(name)
        if d is None:
            limit = self._concurrency.get(name, self.policy.destination_concurrency)
            d = self._dests[name] = _Dest(name, limit)
        return d

    def _wait(self, job: _Job, due: float) -> None:
        """Put a job (not WAITING now) into its destination's heap."""
        job.due = due
        job.state = _WAITING
        self._seq += 1
        job.seq = self._seq
        d = job.dest
        d.live += 1
        heapq.heappush(d.heap, (due, self._seq, job))
        if len(d.heap) > 2 * d.live + 64:
            d.heap = [e for e in d.heap if e[2].seq == e[1] and e[2].state == _WAITING]
            heapq.heapify(d.heap)

    def _unwait(self, job: _Job) -> None:
        """Take a WAITING job out (its heap entry becomes stale)."""
        job.state = _GONE
        job.dest.live -= 1

    def _refresh(self, d: _Dest) -> None:
        """Make the global heap hold exactly the right entry for destination ``d``."""
        heap = d.heap
        while heap and (heap[0][2].seq != heap[0][1] or heap[0][2].state != _WAITING):
            heapq.heappop(heap)
        limit = 1 if d.failures else d.limit
        if not heap or d.active >= limit:
            d.seq = -1
            if not d.jobs and not d.active and not d.failures and self._dests.get(d.name) is d:
                del self._dests[d.name]
            return
        ready = max(heap[0][0], d.not_before)
        if d.seq >= 0 and d.ready == ready:
            return
        self._seq += 1
        d.seq = self._seq
        d.ready = ready
        heapq.heappush(self._heap, (ready, self._seq, d))
        if len(self._heap) > 2 * len(self._dests) + 64:
            self._heap = [e for e in self._heap if e[2].seq == e[1]]
            heapq.heapify(self._heap)

    # --- adding and taking work -------------------------------------------------------

    def add(
        self,
        message: QueuedMessage,
        *,
        due: float | None = None,
        states: Sequence[RecipientState] | None = None,
        delay_warned: bool = False,
    ) -> None:
        """Queue a message.

        Args:
            message: the envelope.
            due: when its first delivery is due (default: its arrival time).
            states: recorded recipient states when restoring a queue after a restart (final
                recipients are not scheduled again); default: all PENDING.
            delay_warned: a delay notice was already sent for it before a restart (no
                second one is signalled).

        Raises:
            ValueError: if the queue id is already queued, ``states`` does not match the
                recipients, or every restored recipient is already final.
        """
        if message.queue_id in self._msgs:
            raise ValueError(f"queue id {message.queue_id!r} is already queued")
        if states is None:
            st = [RecipientState(recipient=r) for r in message.recipients]
        else:
            st = list(states)
            if [s.recipient for s in st] != list(message.recipients):
                raise ValueError("states must match the message's recipients, in order")
            if all(s.status.is_final for s in st):
                raise ValueError("every recipient is final: nothing to queue")
        msg = _Msg(message, st)
        msg.warned = delay_warned
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(st):
            if not s.status.is_final:
                groups.setdefault(s.recipient.destination, []).append(i)
        self._msgs[message.queue_id] = msg
        when = message.arrival if due is None else due
        for name, rcpts in groups.items():
            d = self._dest(name)
            job = msg.jobs[name] = _Job(msg, d, rcpts, when)
            d.jobs += 1
            self._wait(job, when)
            self._refresh(d)

    def next_wakeup(self) -> float | None:
        """The earliest time at which :meth:`pop_one` could return work, or None.

        Deliveries blocked only by a destination's concurrency limit are not counted: a
        completion frees them.
        """
        heap = self._heap
        while heap and heap[0][2].seq != heap[0][1]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_one(self, now: float) -> Delivery | None:
        """Lease the most overdue delivery that may start at ``now``, if any.

        Respects each destination's concurrency limit and back-off.

        Args:
            now: the current time.

        Returns:
            A Delivery to run and then :meth:`complete`, or None if nothing is due.
        """
        heap = self._heap
        while heap:
            ready, seq, d = heap[0]
            if ready > now:
                return None
            heapq.heappop(heap)
            if d.seq != seq:
                continue
            d.seq = -1
            dheap = d.heap
            while True:
                _, jseq, job = heapq.heappop(dheap)
                if job.seq == jseq and job.state == _WAITING:
                    break
            d.live -= 1
            d.active += 1
            job.state = _ACTIVE
            job.attempt += 1
            job.epoch = d.failures
            lease = self._next_lease
            self._next_lease = lease + 1
            self._leases[lease] = job
            self._refresh(d)
            rcpts = job.msg.message.recipients
            return Delivery(
                lease=lease,
                message=job.msg.message,
                destination=d.name,
                recipients=tuple([rcpts[i] for i in job.rcpts]),
                attempt=job.attempt,
            )
        return None

    def pop_due(self, now: float, *, limit: int | None = None) -> list[Delivery]:
        """Lease every delivery due at ``now`` (at most ``limit``), most overdue first.

        Args:
            now: the current time.
            limit: the most deliveries to lease, or None for all that may start.

        Returns:
            The deliveries, possibly none.
        """
        out: list[Delivery] = []
        while limit is None or len(out) < limit:
            delivery = self.pop_one(now)
            if delivery is None:
                break
            out.append(delivery)
        return out

    # --- results ------------------------------------------------------------------------------

    def complete(
        self,
        delivery: Delivery | int,
        *,
        now: float,
        replies: Mapping[str, Reply] | None = None,
        reply: Reply | None = None,
        remote_mta: str | None = None,
        connection_failed: bool = False,
        jitter: float = 0.0,
        handoffs: Mapping[str, Handoff] | None = None,
    ) -> Completion | None:
        """Record the result of a leased delivery.

        Each recipient's reply is ``replies[address]`` or else ``reply`` (the reply for the
        whole attempt, e.g. a 421 greeting or a 5yz to MAIL FROM).  2yz: DELIVERED; 5yz:
        FAILED; 4yz: DEFERRED until the next retry time, or FAILED (expired) once the
        lifetime is over.

        Args:
            delivery: the Delivery (or its lease number) from pop_one/pop_due.
            now: when the attempt ended.
            replies: per-recipient replies, keyed by address.
            reply: the reply for every recipient not in ``replies``.
            remote_mta: the host that answered, for DSNs (``"mx1.example.net"``).
            connection_failed: no SMTP session could be had with the destination (refused,
                timeout, 4yz greeting): back the destination off as a whole.
            jitter: a pre-drawn number in [0, 1) to spread the next retry.
            handoffs: how each delivered recipient's message left, keyed by address
                (recorded on DELIVERED states only; see Handoff).

        Returns:
            What changed, or None when the message was deleted while in flight.

        Raises:
            KeyError: if the lease is unknown or was already completed.
            ValueError: if a recipient has no reply, a reply names no leased recipient, or a
                reply is not final (1yz/3yz).  Nothing is changed then.
        """
        lease = delivery.lease if type(delivery) is Delivery else delivery
        assert isinstance(lease, int)
        job = self._leases.get(lease)
        if job is None:
            raise KeyError(f"unknown or already completed lease {lease}")
        if not 0 <= jitter < 1:
            raise ValueError("jitter draw must be within [0, 1)")
        msg = job.msg
        recipients = msg.message.recipients
        results: list[Reply] = []
        for i in job.rcpts:
            rep = replies.get(recipients[i].address, reply) if replies else reply
            if rep is None:
                raise ValueError(f"no reply for recipient {recipients[i].address!r}")
            if 300 <= rep.code < 400:
                raise ValueError(f"not a final reply: {rep.code}")
            results.append(rep)
        if replies:
            leased = {recipients[i].address for i in job.rcpts}
            extra = [a for a in replies if a not in leased]
            if extra:
                raise ValueError(f"replies for recipients not in this delivery: {extra!r}")
        del self._leases[lease]

        d = job.dest
        d.active -= 1
        if connection_failed:
            # a parallel delivery that started at the same failure count already counted it
            if job.epoch >= d.failures:
                d.failures += 1
                d.not_before = now + retry_delay(d.failures, self.policy, jitter=jitter)
        else:
            d.failures = 0
            d.not_before = float("-inf")

        if job.state == _GONE:  # the message was deleted while this delivery was in flight
            self._refresh(d)
            return None

        delivered: list[RecipientState] = []
        failed: list[RecipientState] = []
        deferred: list[RecipientState] = []
        open_rcpts: list[int] = []
        states = msg.states
        for i, rep in zip(job.rcpts, results, strict=True):
            old = states[i]
            code = rep.code
            if code < 300:
                status = _DELIVERED
                bucket = delivered
            elif code >= 500:
                status = _FAILED
                bucket = failed
            else:
                status = _DEFERRED
                bucket = deferred
                open_rcpts.append(i)
            new = RecipientState(
                recipient=old.recipient,
                status=status,
                reply=rep,
                attempts=old.attempts + 1,
                last_attempt=now,
                remote_mta=remote_mta,
                handoff=handoffs.get(old.recipient.address)
                if handoffs and status is _DELIVERED
                else None,
            )
            states[i] = new
            bucket.append(new)

        next_attempt: float | None = None
        if open_rcpts:
            job.failures += 1
            # next_retry_time(), with the delays precomputed
            expiry = msg.message.arrival + self.policy.lifetime
            if now < expiry:
                f = job.failures
                if f < len(self._delays) and not jitter:
                    delay = self._delays[f]
                else:
                    delay = retry_delay(f, self.policy, jitter=jitter)
                next_attempt = min(now + delay, expiry)
            else:  # RFC 5321 4.5.4.1: the sender gives up
                for k, i in enumerate(open_rcpts):
                    expired = RecipientState(
                        recipient=deferred[k].recipient,
                        status=RecipientStatus.FAILED,
                        reply=deferred[k].reply,
                        attempts=deferred[k].attempts,
                        last_attempt=now,
                        remote_mta=remote_mta,
                        expired=True,
                    )
                    states[i] = expired
                    failed.append(expired)
                deferred = []
                open_rcpts = []

        warn = False
        if deferred and not msg.warned and self.policy.delay_warning is not None:
            if now - msg.message.arrival >= self.policy.delay_warning:
                msg.warned = warn = True

        finished: MessageState | None = None
        if open_rcpts:
            assert next_attempt is not None
            job.rcpts = open_rcpts
            if msg.held:
                job.state = _HELD
            else:
                self._wait(job, next_attempt)
        else:
            job.state = _GONE
            d.jobs -= 1
            del msg.jobs[d.name]
            if not msg.jobs:
                del self._msgs[msg.message.queue_id]
                finished = MessageState(
                    message=msg.message,
                    recipients=tuple(states),
                    delay_warned=msg.warned,
                )
        self._refresh(d)
        return Completion(
            queue_id=msg.message.queue_id,
            delivered=tuple(delivered),
            failed=tuple(failed),
            deferred=tuple(deferred),
            next_attempt=next_attempt,
            delay_warning=warn,
            finished=finished,
        )

    # --- the queue CLI's verbs -----------------------------------------------------------

    def _msg(self, queue_id: str) -> _Msg:
        msg = self._msgs.get(queue_id)
        if msg is None:
            raise KeyError(f"no queued message {queue_id!r}")
        return msg

    def hold(self, queue_id: str) -> None:
        """Put a message on hold: nothing more of it is scheduled until :meth:`release`.

        Deliveries already in flight finish normally; their deferred recipients stay held.

        Raises:
            KeyError: if the message is not queued.
        """
        msg = self._msg(queue_id)
        msg.held = True
        for job in msg.jobs.values():
            if job.state == _WAITING:
                self._unwait(job)
                job.state = _HELD
                self._refresh(job.dest)

    def release(self, queue_id: str) -> None:
        """Take a message off hold; its deliveries resume their schedule.

        Raises:
            KeyError: if the message is not queued.
        """
        msg = self._msg(queue_id)
        msg.held = False
        for job in msg.jobs.values():
            if job.state == _HELD:
                self._wait(job, job.due)
                self._refresh(job.dest)

    def flush(self, queue_id: str, *, now: float) -> None:
        """Make a message's waiting deliveries due at ``now`` (a held message stays held; a
        destination's back-off and concurrency limit still apply: see :meth:`flush_all`).

        Raises:
            KeyError: if the message is not queued.
        """
        msg = self._msg(queue_id)
        for job in msg.jobs.values():
            if job.state == _WAITING and job.due > now:
                self._unwait(job)
                self._wait(job, now)
                self._refresh(job.dest)

    def flush_all(self, *, now: float) -> None:
        """Retry everything now: every waiting delivery becomes due, every destination's
        back-off is lifted.  O(n)."""
        for d in self._dests.values():
            d.failures = 0
            d.not_before = float("-inf")
        for msg in self._msgs.values():
            for job in msg.jobs.values():
                if job.state == _WAITING and job.due > now:
                    self._unwait(job)
                    self._wait(job, now)
        for d in list(self._dests.values()):
            d.seq = -1
            self._refresh(d)

    def delete(self, queue_id: str) -> MessageState:
        """Remove a message (no DSN is implied; the caller decides).

        Deliveries in flight may still be completed; their completion returns None.

        Returns:
            The message's state at deletion.

        Raises:
            KeyError: if the message is not queued.
        """
        msg = self._msg(queue_id)
        snapshot = self._snapshot(msg)
        for job in msg.jobs.values():
            if job.state == _WAITING:
                self._unwait(job)
            job.state = _GONE
            job.dest.jobs -= 1
            self._refresh(job.dest)
        msg.jobs.clear()
        del self._msgs[queue_id]
        return snapshot

    # --- views -------------------------------------------------------------------------------

    def _snapshot(self, msg: _Msg) -> MessageState:
        waiting = [j.due for j in msg.jobs.values() if j.state == _WAITING]
        return MessageState(
            message=msg.message,
            recipients=tuple(msg.states),
            held=msg.held,
            active=sum(1 for j in msg.jobs.values() if j.state == _ACTIVE),
            next_attempt=min(waiting) if waiting else None,
            delay_warned=msg.warned,
        )

    def message(self, queue_id: str) -> MessageState:
        """The state of one queued message.

        Raises:
            KeyError: if the message is not queued.
        """
        return self._snapshot(self._msg(queue_id))

    def messages(self) -> Iterator[MessageState]:
        """Every queued message's state, in arrival order of :meth:`add` calls."""
        for msg in list(self._msgs.values()):
            yield self._snapshot(msg)

    def destinations(self) -> list[DestinationState]:
        """Every known destination's throttle state, sorted by name."""
        return [
            DestinationState(
                destination=d.name,
                active=d.active,
                limit=1 if d.failures else d.limit,
                failures=d.failures,
                not_before=d.not_before,
                waiting=d.live,
            )
            for d in sorted(self._dests.values(), key=lambda d: d.name)
        ]


__all__ = [
    "DEFAULT_DELAY_WARNING",
    "DEFAULT_LIFETIME",
    "MIN_RETRY_INTERVAL",
    "Completion",
    "Delivery",
    "DestinationState",
    "Handoff",
    "MessageState",
    "QueuedMessage",
    "Recipient",
    "RecipientState",
    "RecipientStatus",
    "RetryPolicy",
    "Scheduler",
    "next_retry_time",
    "retry_delay",
]

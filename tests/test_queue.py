"""The pure queue: retry schedule (RFC 5321 4.5.4.1), per-destination back-off and concurrency,
and the Scheduler's bookkeeping (no recipient lost or duplicated, whatever happens)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mailwire.protocol._events import MailFrom, RcptTo, Reply
from mailwire.protocol._queue import (
    DEFAULT_DELAY_WARNING,
    DEFAULT_LIFETIME,
    MIN_RETRY_INTERVAL,
    Delivery,
    Handoff,
    QueuedMessage,
    Recipient,
    RecipientState,
    RecipientStatus,
    RetryPolicy,
    Scheduler,
    next_retry_time,
    retry_delay,
)

OK = Reply(code=250, text="2.0.0 OK")
LATER = Reply(code=451, text="4.7.1 Greylisted, try again later")
NO = Reply(code=550, text="5.1.1 No such user")
REFUSED = Reply(code=421, text="4.4.1 Connection refused")
DAY = 86400.0


def msg(qid: str, *addresses: str, arrival: float = 0.0, **kw: object) -> QueuedMessage:
    return QueuedMessage(
        queue_id=qid,
        sender="alice@example.org",
        recipients=tuple(Recipient(address=a) for a in addresses),
        arrival=arrival,
        **kw,  # type: ignore[arg-type]
    )


def one(s: Scheduler, now: float) -> Delivery:
    d = s.pop_one(now)
    assert d is not None
    return d


# --- the retry schedule -------------------------------------------------------------------------


def test_defaults_follow_rfc5321_4_5_4_1() -> None:
    policy = RetryPolicy()
    assert policy.lifetime == DEFAULT_LIFETIME == 5 * DAY
    assert policy.min_interval == MIN_RETRY_INTERVAL == 30 * 60
    assert policy.delay_warning == DEFAULT_DELAY_WARNING == 4 * 3600


def test_first_retry_is_within_minutes_then_backs_off_to_at_least_30_minutes() -> None:
    policy = RetryPolicy()
    delays = [retry_delay(n, policy) for n in range(1, 10)]
    assert delays[0] == 300
    assert delays[:3] == [300, 600, 1200]
    assert all(d >= 1800 for d in delays[3:])
    assert delays[-1] == policy.max_interval


def test_retry_delay_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        retry_delay(0, RetryPolicy())
    with pytest.raises(ValueError):
        retry_delay(1, RetryPolicy(), jitter=1.0)


def test_jitter_only_lengthens_by_the_configured_fraction() -> None:
    policy = RetryPolicy(jitter=0.2)
    assert retry_delay(5, policy, jitter=0.0) == 4800
    assert retry_delay(5, policy, jitter=0.5) == pytest.approx(4800 * 1.1)


@pytest.mark.parametrize(
    "kw",
    [{"first_retry": 0}, {"backoff_factor": 0.5}, {"min_interval": 99999},
     {"lifetime": 0}, {"delay_warning": 0}, {"jitter": 2}, {"destination_concurrency": 0},
     {"fast_retries": -1}],
)  # fmt: skip
def test_inconsistent_policies_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kw)  # type: ignore[arg-type]


policies = st.builds(
    RetryPolicy,
    first_retry=st.floats(1, 3600),
    backoff_factor=st.floats(1, 10),
    fast_retries=st.integers(0, 6),
    min_interval=st.floats(600, 3600),
    max_interval=st.floats(3600, 20000),
    lifetime=st.floats(3600, 10 * DAY),
    jitter=st.floats(0, 1),
)


@settings(max_examples=300)
@given(policy=policies, jitter=st.floats(0, 0.999))
def test_retry_delay_is_monotone_floored_and_capped(policy: RetryPolicy, jitter: float) -> None:
    delays = [retry_delay(n, policy, jitter=jitter) for n in range(1, 40)]
    assert delays == sorted(delays)
    scale = 1 + policy.jitter * jitter
    for n, d in enumerate(delays, start=1):
        assert d <= policy.max_interval * scale + 1e-6
        if n > policy.fast_retries:
            assert d >= policy.min_interval
    assert delays[-1] <= retry_delay(10**6, policy, jitter=jitter) <= policy.max_interval * scale
    if policy.backoff_factor >= 1.5:
        assert retry_delay(10**6, policy) == policy.max_interval


@settings(max_examples=100)
@given(
    policy=policies,
    arrival=st.floats(0, 1e9),
    draws=st.lists(st.floats(0, 0.999), min_size=1, max_size=200),
)
def test_retry_times_increase_never_pass_the_lifetime_and_then_give_up(
    policy: RetryPolicy, arrival: float, draws: list[float]
) -> None:
    now, failures, times = arrival, 0, []
    expiry = arrival + policy.lifetime
    for draw in itertools.islice(itertools.cycle(draws), 10**5):
        failures += 1
        nxt = next_retry_time(
            arrival=arrival, failures=failures, now=now, policy=policy, jitter=draw
        )
        if nxt is None:
            assert now >= expiry
            break
        assert now < nxt <= expiry
        if failures > policy.fast_retries and nxt != expiry:
            assert nxt - now >= policy.min_interval - 1e-6  # RFC 5321 4.5.4.1
        times.append(nxt)
        now = nxt
    else:
        pytest.fail("never gave up")
    assert times == sorted(times)
    assert times[-1] == expiry  # the last try lands exactly on the expiry


# --- records -----------------------------------------------------------------------------------


def test_recipient_destination_defaults_to_lowercased_domain() -> None:
    assert Recipient(address="Bob@Example.NET").destination == "example.net"
    assert Recipient(address="Postmaster").destination == ""
    assert Recipient(address="b@x.example", destination="smarthost").destination == "smarthost"


def test_from_envelope_keeps_the_dsn_parameters() -> None:
    mail = MailFrom(address="a@example.org", ret="HDRS", envid="QQ314159")
    rcpt = RcptTo(address="b@example.net", notify=("FAILURE", "DELAY"), orcpt="rfc822;b@ex.net")
    m = QueuedMessage.from_envelope(queue_id="q1", mail=mail, rcpts=[rcpt], arrival=5.0, size=9)
    assert (m.ret, m.envid, m.size, m.arrival) == ("HDRS", "QQ314159", 9, 5.0)
    assert m.recipients == (
        Recipient(address="b@example.net", notify=("FAILURE", "DELAY"), orcpt="rfc822;b@ex.net"),
    )


@pytest.mark.parametrize(
    "kw",
    [{"queue_id": ""}, {"recipients": ()}, {"ret": "ALL"}, {"size": -1},
     {"recipients": (Recipient(address="a@b.c"), Recipient(address="a@b.c"))}],
)  # fmt: skip
def test_bad_messages_are_refused(kw: dict[str, object]) -> None:
    base: dict[str, object] = {
        "queue_id": "q",
        "sender": "",
        "recipients": (Recipient(address="a@b.c"),),
        "arrival": 0.0,
    }
    base.update(kw)
    with pytest.raises(ValueError):
        QueuedMessage(**base)  # type: ignore[arg-type]


# --- the scheduler: basic results -----------------------------------------------------------


def test_recipients_are_grouped_by_destination() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example", "b@y.example", "c@X.example"))
    got = {d.destination: [r.address for r in d.recipients] for d in s.pop_due(0.0)}
    assert got == {"x.example": ["a@x.example", "c@X.example"], "y.example": ["b@y.example"]}
    assert s.pop_due(0.0) == []


def test_nothing_is_due_before_arrival_or_due_time() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example", arrival=100.0))
    s.add(msg("q2", "a@x.example"), due=500.0)
    assert s.next_wakeup() == 100.0
    assert s.pop_one(99.0) is None
    assert one(s, 100.0).message.queue_id == "q1"
    assert s.pop_one(499.0) is None
    assert one(s, 500.0).message.queue_id == "q2"


def test_most_overdue_first() -> None:
    s = Scheduler()
    for i, t in enumerate([30.0, 10.0, 20.0]):
        s.add(msg(f"q{i}", f"a@d{i}.example", arrival=t))
    assert [d.message.queue_id for d in s.pop_due(100.0)] == ["q1", "q2", "q0"]


def test_delivered_and_failed_recipients_finish_the_message() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example", "b@x.example"))
    d = one(s, 0.0)
    done = s.complete(d, now=5.0, replies={"a@x.example": OK, "b@x.example": NO}, remote_mta="mx")
    assert done is not None
    assert [r.recipient.address for r in done.delivered] == ["a@x.example"]
    assert [r.recipient.address for r in done.failed] == ["b@x.example"]
    assert done.finished is not None and done.finished.is_finished
    assert done.finished.recipients[1].reply == NO
    assert done.finished.recipients[1].remote_mta == "mx"
    assert "q1" not in s and len(s) == 0
    assert s.destinations() == []


def test_handoffs_are_recorded_on_delivered_recipients_only() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example", "b@x.example", "c@x.example"))
    d = one(s, 0.0)
    done = s.complete(
        d,
        now=5.0,
        replies={"a@x.example": OK, "b@x.example": OK, "c@x.example": NO},
        handoffs={
            "a@x.example": Handoff.RELAYED,
            "b@x.example": Handoff.DSN_PASSED,
            "c@x.example": Handoff.RELAYED,
        },
    )
    assert done is not None and done.finished is not None
    assert [r.handoff for r in done.delivered] == [Handoff.RELAYED, Handoff.DSN_PASSED]
    assert [r.handoff for r in done.failed] == [None]  # a failure was handed nowhere
    assert [r.handoff for r in done.finished.recipients] == [
        Handoff.RELAYED,
        Handoff.DSN_PASSED,
        None,
    ]


def test_without_handoffs_a_delivered_recipient_records_none() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example"))
    done = s.complete(one(s, 0.0), now=5.0, reply=OK)
    assert done is not None and done.delivered[0].handoff is None


def test_transient_reply_defers_until_the_first_retry() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example"))
    done = s.complete(one(s, 0.0), now=10.0, reply=LATER)
    assert done is not None
    assert done.next_attempt == 310.0
    (state,) = done.deferred
    assert (state.status, state.attempts, state.reply) == (RecipientStatus.DEFERRED, 1, LATER)
    assert s.pop_one(309.0) is None
    d = one(s, 310.0)
    assert d.attempt == 2
    assert s.message("q1").active == 1


def test_only_still_open_recipients_are_retried() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example", "b@x.example", "c@x.example"))
    replies = {"a@x.example": OK, "b@x.example": LATER, "c@x.example": NO}
    s.complete(one(s, 0.0), now=0.0, replies=replies)
    assert [r.address for r in one(s, 1e4).recipients] == ["b@x.example"]


def test_session_reply_applies_to_recipients_without_their_own() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example", "b@x.example"))
    done = s.complete(one(s, 0.0), now=0.0, replies={"a@x.example": OK}, reply=NO)
    assert done is not None and [r.recipient.address for r in done.failed] == ["b@x.example"]


def test_deferred_past_the_lifetime_fails_as_expired() -> None:
    s = Scheduler(RetryPolicy(lifetime=DAY))
    s.add(msg("q1", "a@x.example"))
    now = 0.0
    while True:
        d = one(s, now)
        done = s.complete(d, now=now, reply=LATER)
        assert done is not None
        if done.finished:
            break
        assert done.next_attempt is not None and done.next_attempt <= DAY
        now = done.next_attempt
    assert now == DAY
    (state,) = done.failed
    assert state.expired and state.status is RecipientStatus.FAILED and state.reply == LATER


def test_delay_warning_is_signalled_once_after_four_hours() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example"))
    warnings = []
    now = 0.0
    for _ in range(12):
        done = s.complete(one(s, now), now=now, reply=LATER)
        assert done is not None and done.next_attempt is not None
        warnings.append((now, done.delay_warning))
        now = done.next_attempt
    flagged = [t for t, w in warnings if w]
    assert len(flagged) == 1
    assert flagged[0] >= 4 * 3600
    assert all(t < 4 * 3600 for t, w in warnings if t < flagged[0])
    assert s.message("q1").delay_warned


def test_a_restored_delay_warning_is_not_signalled_again() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example"), delay_warned=True)
    assert s.message("q1").delay_warned
    done = s.complete(one(s, 5 * 3600), now=5 * 3600, reply=LATER)
    assert done is not None and not done.delay_warning
    s.add(msg("q2", "a@y.example"))
    done = s.complete(one(s, 5 * 3600), now=5 * 3600, reply=LATER)
    assert done is not None and done.delay_warning


def test_no_delay_warning_when_disabled() -> None:
    s = Scheduler(RetryPolicy(delay_warning=None))
    s.add(msg("q1", "a@x.example"))
    done = s.complete(one(s, 5 * 3600), now=5 * 3600, reply=LATER)
    assert done is not None and not done.delay_warning


# --- misuse leaves the state untouched ---------------------------------------------------------


def test_completing_twice_or_an_unknown_lease_is_an_error() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example"))
    d = one(s, 0.0)
    s.complete(d, now=0.0, reply=LATER)
    with pytest.raises(KeyError):
        s.complete(d, now=0.0, reply=OK)
    with pytest.raises(KeyError):
        s.complete(12345, now=0.0, reply=OK)


@pytest.mark.parametrize(
    "kw",
    [{}, {"replies": {"a@x.example": OK}}, {"reply": Reply(code=354, text="go")},
     {"reply": OK, "replies": {"z@x.example": OK}}, {"reply": OK, "jitter": 1.5}],
)  # fmt: skip
def test_bad_results_are_refused_without_losing_the_lease(kw: dict[str, object]) -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example", "b@x.example"))
    d = one(s, 0.0)
    with pytest.raises(ValueError):
        s.complete(d, now=0.0, **kw)  # type: ignore[arg-type]
    assert s.in_flight == 1
    done = s.complete(d.lease, now=0.0, reply=OK)
    assert done is not None and done.finished is not None


def test_duplicate_queue_ids_are_refused() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example"))
    with pytest.raises(ValueError):
        s.add(msg("q1", "b@x.example"))


# --- destinations: back-off and concurrency ---------------------------------------------------


def test_concurrency_limit_per_destination() -> None:
    s = Scheduler(RetryPolicy(destination_concurrency=2), concurrency={"big.example": 3})
    for i in range(5):
        s.add(msg(f"s{i}", f"u{i}@small.example"))
        s.add(msg(f"b{i}", f"u{i}@big.example"))
    first = s.pop_due(0.0)
    assert sorted(d.destination for d in first) == ["big.example"] * 3 + ["small.example"] * 2
    assert s.pop_due(0.0) == []
    small = next(d for d in first if d.destination == "small.example")
    s.complete(small, now=0.0, reply=OK)
    (again,) = s.pop_due(0.0)
    assert again.destination == "small.example"


def test_dead_destination_backs_off_as_a_whole_without_slowing_others() -> None:
    s = Scheduler()
    for i in range(10):
        s.add(msg(f"dead{i}", "a@dead.example", arrival=float(i)))
        s.add(msg(f"live{i}", "a@live.example", arrival=float(i)))
    probe = next(d for d in s.pop_due(100.0) if d.destination == "dead.example")
    s.complete(probe, now=100.0, reply=REFUSED, connection_failed=True)
    for d in s.pop_due(100.0):  # the dead domain's other deliveries were already leased
        assert d.destination == "live.example"
    # from now on at most one probe at a time, and not before the destination's own time
    s2 = Scheduler()
    for i in range(10):
        s2.add(msg(f"dead{i}", "a@dead.example"))
        s2.add(msg(f"live{i}", "a@live.example"))
    d0 = one(s2, 0.0)
    assert d0.destination in ("dead.example", "live.example")
    dead = (
        d0
        if d0.destination == "dead.example"
        else next(d for d in s2.pop_due(0.0, limit=1) if d.destination == "dead.example")
    )
    s2.complete(dead, now=0.0, reply=REFUSED, connection_failed=True)
    rest = s2.pop_due(0.0)
    assert all(d.destination == "live.example" for d in rest)
    (state,) = [x for x in s2.destinations() if x.destination == "dead.example"]
    assert (state.failures, state.limit, state.not_before) == (1, 1, 300.0)
    assert s2.pop_one(299.0) is None
    probe = one(s2, 300.0)
    assert probe.destination == "dead.example"
    assert s2.pop_one(300.0) is None  # one probe at a time while failing
    s2.complete(probe, now=300.0, reply=REFUSED, connection_failed=True)
    assert s2.pop_one(300.0 + 599) is None  # second failure: 10 minutes
    probe = one(s2, 900.0)
    s2.complete(probe, now=900.0, reply=OK)  # it came back: full concurrency again
    assert len(s2.pop_due(900.0)) >= 2


def test_parallel_failures_count_once() -> None:
    s = Scheduler()
    for i in range(3):
        s.add(msg(f"q{i}", "a@dead.example"))
    ds = s.pop_due(0.0)
    assert len(ds) == 3
    for d in ds:
        s.complete(d, now=0.0, reply=REFUSED, connection_failed=True)
    (state,) = s.destinations()
    assert state.failures == 1 and state.not_before == 300.0


# --- the queue CLI's verbs -------------------------------------------------------------------


def test_hold_and_release() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example"))
    s.hold("q1")
    assert s.pop_one(0.0) is None and s.message("q1").held
    s.release("q1")
    assert one(s, 0.0).message.queue_id == "q1"


def test_hold_while_in_flight_keeps_deferred_recipients_held() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example"))
    d = one(s, 0.0)
    s.hold("q1")
    s.complete(d, now=0.0, reply=LATER)
    assert s.pop_one(1e6) is None
    s.release("q1")
    assert one(s, 1e6).attempt == 2


def test_flush_makes_a_deferred_message_due_now() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example"))
    s.complete(one(s, 0.0), now=0.0, reply=LATER)
    assert s.pop_one(10.0) is None
    s.flush("q1", now=10.0)
    assert one(s, 10.0).message.queue_id == "q1"


def test_flush_all_lifts_destination_back_off() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example"))
    s.add(msg("q2", "b@x.example"))
    s.complete(one(s, 0.0), now=0.0, reply=REFUSED, connection_failed=True)
    assert s.pop_one(10.0) is None
    s.flush_all(now=10.0)
    assert len(s.pop_due(10.0)) == 2


def test_delete_in_flight_then_complete_returns_none() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example", "b@y.example"))
    d = one(s, 0.0)
    snapshot = s.delete("q1")
    assert snapshot.active == 1 and snapshot.next_attempt == 0.0
    assert s.pop_one(0.0) is None and "q1" not in s
    assert s.complete(d, now=1.0, reply=OK) is None
    assert s.destinations() == [] and s.in_flight == 0
    with pytest.raises(KeyError):
        s.delete("q1")


def test_restore_schedules_only_open_recipients() -> None:
    s = Scheduler()
    m = msg("q1", "a@x.example", "b@x.example")
    states = [
        RecipientState(recipient=m.recipients[0], status=RecipientStatus.DELIVERED, reply=OK),
        RecipientState(recipient=m.recipients[1], status=RecipientStatus.DEFERRED, reply=LATER),
    ]
    s.add(m, due=50.0, states=states)
    d = one(s, 50.0)
    assert [r.address for r in d.recipients] == ["b@x.example"]
    with pytest.raises(ValueError):
        s.add(msg("q2", "a@x.example"), states=states)


def test_listing_shows_every_message() -> None:
    s = Scheduler()
    s.add(msg("q1", "a@x.example"))
    s.add(msg("q2", "a@y.example", arrival=7.0))
    listing = {m.message.queue_id: m for m in s.messages()}
    assert listing.keys() == {"q1", "q2"}
    assert listing["q2"].next_attempt == 7.0
    assert not listing["q2"].is_finished


def test_many_messages_drain_completely() -> None:
    s = Scheduler()
    for i in range(5000):
        s.add(msg(f"q{i}", f"u{i}@d{i % 37}.example", f"v{i}@d{i % 11}.example"))
    finished = 0
    while s.in_flight or len(s):
        for d in s.pop_due(0.0):
            done = s.complete(d, now=0.0, reply=OK)
            finished += done is not None and done.finished is not None
    assert finished == 5000


# --- the stateful model: nothing lost, nothing duplicated --------------------------------------

DESTS = ["a.example", "b.example", "c.example"]
REPLIES = [OK, NO, LATER, Reply(code=452, text="4.2.2 Mailbox full")]


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(limit=st.integers(1, 3), warn=st.booleans())
    def setup(self, limit: int, warn: bool) -> None:
        policy = RetryPolicy(
            destination_concurrency=limit, lifetime=DAY, delay_warning=3600.0 if warn else None
        )
        self.s = Scheduler(policy)
        self.now = 0.0
        self.count = 0
        self.open: dict[tuple[str, str], str] = {}  # (qid, address) -> destination
        self.final: set[tuple[str, str]] = set()
        self.leases: dict[int, Delivery] = {}
        self.leased: set[tuple[str, str]] = set()
        self.due: dict[tuple[str, str], float] = {}  # (qid, destination) -> earliest due
        self.warned: set[str] = set()
        self.held: set[str] = set()

    @rule(
        addresses=st.lists(
            st.tuples(st.sampled_from("uvwxyz"), st.sampled_from(DESTS)),
            min_size=1,
            max_size=4,
            unique=True,
        ),
        delay=st.floats(0, 3600),
    )
    def add(self, addresses: list[tuple[str, str]], delay: float) -> None:
        self.count += 1
        qid = f"q{self.count}"
        rcpts = [f"{u}@{d}" for u, d in addresses]
        self.s.add(msg(qid, *rcpts, arrival=self.now + delay))
        for u, d in addresses:
            self.open[(qid, f"{u}@{d}")] = d
            self.due[(qid, d)] = self.now + delay

    @rule(step=st.one_of(st.floats(0, 4000), st.floats(0, 2 * DAY)))
    def advance(self, step: float) -> None:
        self.now += step

    @rule(limit=st.integers(1, 5))
    def pop(self, limit: int) -> None:
        before = {x.destination: x for x in self.s.destinations()}
        for d in self.s.pop_due(self.now, limit=limit):
            assert before[d.destination].not_before <= self.now  # destination back-off
            assert d.lease not in self.leases
            assert d.message.queue_id not in self.held
            assert self.due[(d.message.queue_id, d.destination)] <= self.now
            for r in d.recipients:
                key = (d.message.queue_id, r.address)
                assert key in self.open, "a final or deleted recipient was handed out"
                assert key not in self.leased, "a recipient was handed out twice"
                assert r.destination == d.destination
                self.leased.add(key)
            self.leases[d.lease] = d

    @precondition(lambda self: bool(self.leases))
    @rule(
        data=st.data(),
        connection_failed=st.booleans(),
        jitter=st.floats(0, 0.99),
    )
    def complete(self, data: st.DataObject, connection_failed: bool, jitter: float) -> None:
        lease = data.draw(st.sampled_from(sorted(self.leases)))
        d = self.leases.pop(lease)
        qid = d.message.queue_id
        replies = {r.address: data.draw(st.sampled_from(REPLIES)) for r in d.recipients}
        done = self.s.complete(
            d,
            now=self.now,
            replies=replies,
            connection_failed=connection_failed,
            jitter=jitter,
        )
        keys = {(qid, r.address) for r in d.recipients}
        self.leased -= keys
        if done is None:  # deleted while in flight
            assert all(k not in self.open for k in keys)
            return
        reported = [r.recipient.address for r in done.delivered + done.failed + done.deferred]
        assert sorted(reported) == sorted(r.address for r in d.recipients)
        for r in done.delivered + done.failed:
            key = (qid, r.recipient.address)
            assert key not in self.final
            self.final.add(key)
            del self.open[key]
            if r.status is RecipientStatus.DELIVERED:
                assert replies[r.recipient.address].is_positive
            elif not r.expired:
                assert replies[r.recipient.address].is_permanent
        for r in done.deferred:
            assert replies[r.recipient.address].is_transient
        if done.deferred:
            assert done.next_attempt is not None
            assert self.now < done.next_attempt <= d.message.arrival + DAY
            self.due[(qid, d.destination)] = done.next_attempt
        if done.delay_warning:
            assert qid not in self.warned
            self.warned.add(qid)
        still_open = any(k[0] == qid for k in self.open)
        assert (done.finished is not None) == (not still_open)

    def _queued(self) -> list[str]:
        return sorted({qid for qid, _ in self.open})

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data())
    def hold_release_or_flush(self, data: st.DataObject) -> None:
        qid = data.draw(st.sampled_from(self._queued()))
        verb = data.draw(st.sampled_from(["hold", "release", "flush"]))
        if verb == "hold":
            self.s.hold(qid)
            self.held.add(qid)
        elif verb == "release":
            self.s.release(qid)
            self.held.discard(qid)
        else:
            self.s.flush(qid, now=self.now)
            for key in self.due:
                if key[0] == qid:
                    self.due[key] = min(self.due[key], self.now)

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        qid = data.draw(st.sampled_from(self._queued()))
        snapshot = self.s.delete(qid)
        open_here = {k for k in self.open if k[0] == qid}
        assert {
            (qid, r.recipient.address) for r in snapshot.recipients if not r.status.is_final
        } == open_here
        for key in open_here:
            del self.open[key]

    @rule()
    def flush_all(self) -> None:
        self.s.flush_all(now=self.now)
        for key in self.due:
            self.due[key] = min(self.due[key], self.now)

    @invariant()
    def every_recipient_is_in_exactly_one_place(self) -> None:
        queued = self._queued()
        assert sorted(m.message.queue_id for m in self.s.messages()) == queued
        assert len(self.s) == len(queued)
        for m in self.s.messages():
            qid = m.message.queue_id
            for r in m.recipients:
                key = (qid, r.recipient.address)
                assert r.status.is_final == (key in self.final)
                assert r.status.is_final != (key in self.open)
        assert self.s.in_flight == len(self.leases)

    @invariant()
    def concurrency_is_respected(self) -> None:
        for dest in self.s.destinations():
            assert dest.active <= max(dest.limit, 1) or dest.failures
            assert dest.active == sum(
                1 for d in self.leases.values() if d.destination == dest.destination
            )

    def teardown(self) -> None:
        # drain: everything that is not deleted ends final, nothing duplicated
        if not hasattr(self, "s"):
            return

        def deliver(d: Delivery) -> None:
            done = self.s.complete(d, now=self.now, reply=OK)
            if done is None:
                return
            for r in d.recipients:
                key = (d.message.queue_id, r.address)
                assert key in self.open and key not in self.final
                self.final.add(key)
                del self.open[key]

        for d in list(self.leases.values()):
            deliver(d)
        for qid in self._queued():
            assert self.s.message(qid).held == (qid in self.held)
            self.s.release(qid)
        self.s.flush_all(now=self.now)
        rounds = 0
        while len(self.s):
            rounds += 1
            assert rounds < 1000
            for d in self.s.pop_due(self.now):
                deliver(d)
            self.now += 1.0
        assert not self.open
        assert self.s.destinations() == []


SchedulerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None
)
TestScheduler = SchedulerMachine.TestCase


def test_failure_of_a_probe_after_flush_all_counts_again() -> None:
    s = Scheduler()
    for i in range(3):
        s.add(msg(f"q{i}", "a@flaky.example"))
    s.complete(one(s, 0.0), now=0.0, reply=REFUSED, connection_failed=True)
    probe = one(s, 300.0)  # started while the destination was failing
    s.flush_all(now=300.0)  # the operator lifts the back-off meanwhile
    s.complete(probe, now=301.0, reply=REFUSED, connection_failed=True)
    (state,) = s.destinations()
    assert state.failures == 1 and state.not_before == 601.0

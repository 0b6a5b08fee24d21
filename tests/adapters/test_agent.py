"""adapters/_agent.py: the generator plumbing the two delivery agents share, and the promise
that both agents offer the same verbs.  (The delivery scenarios themselves run on both
agents in tests/adapters/test_delivery.py.)"""

from __future__ import annotations

import inspect
from collections.abc import Generator

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwire.adapters._agent import (
    AgentCore,
    Blocking,
    CacheKey,
    Channel,
    Op,
    SessionCache,
    Steps,
    drive,
    drive_async,
    is_async_callable,
    reason,
)
from mailwire.adapters._delivery_anyio import DeliveryAgent
from mailwire.adapters._delivery_threads import BlockingDeliveryAgent
from mailwire.protocol._client import ClientConnection
from mailwire.protocol._config import ClientConfig
from mailwire.protocol._routing import Target
from mailwire.protocol._transaction import SessionSetup


def _steps(log: list[str]) -> Steps[str]:
    first = yield Blocking(str.upper, ("a",))
    log.append(f"got {first}")
    try:
        yield Blocking(int, ("not a number",))
    except ValueError:
        log.append("caught at the yield")
    try:
        last = yield Blocking(str.lower, ("B",))
        return f"{first}{last}"
    finally:
        log.append("closed")


def _do(op: Op) -> object:
    assert isinstance(op, Blocking)
    return op.fn(*op.args)


async def _do_async(op: Op) -> object:
    await anyio.sleep(0)
    return _do(op)


def test_drive_sends_results_and_throws_errors_at_the_yield() -> None:
    log: list[str] = []
    assert drive(_steps(log), _do) == "Ab"
    assert log == ["got A", "caught at the yield", "closed"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_drive_async_is_the_same_on_both_event_loops(backend: str) -> None:
    log: list[str] = []
    assert anyio.run(drive_async, _steps(log), _do_async, backend=backend) == "Ab"
    assert log == ["got A", "caught at the yield", "closed"]


def test_an_error_the_steps_do_not_handle_comes_out_of_drive() -> None:
    def steps() -> Generator[Op, object, None]:
        yield Blocking(int, ("x",))

    with pytest.raises(ValueError):
        drive(steps(), _do)


def test_an_interrupted_drive_closes_the_steps() -> None:
    log: list[str] = []

    def interrupt(op: Op) -> object:
        if isinstance(op, Blocking) and op.fn is str.lower:
            raise KeyboardInterrupt  # not an Exception: not thrown into the steps
        return _do(op)

    with pytest.raises(KeyboardInterrupt):
        drive(_steps(log), interrupt)
    assert log[-1] == "closed"


def _public(cls: type) -> dict[str, bool]:
    """Public methods -> is it a coroutine function."""
    return {
        name: inspect.iscoroutinefunction(fn)
        for name, fn in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_both_agents_offer_the_same_verbs() -> None:
    anyio_verbs, thread_verbs = _public(DeliveryAgent), _public(BlockingDeliveryAgent)
    assert set(anyio_verbs) == set(thread_verbs)
    for verb in ("start", "run", "run_once", "queue", "flush", "hold", "release", "delete"):
        assert verb in anyio_verbs
    assert "stop" in anyio_verbs
    # the same verbs; awaitable on anyio where they do I/O, plain calls on threads
    assert not any(thread_verbs.values())
    awaited = {name for name, is_async in anyio_verbs.items() if is_async}
    assert awaited == {"start", "submit", "delete", "deliver", "run", "run_once", "close_cached"}
    shared = {n for n in anyio_verbs if getattr(AgentCore, n, None) is not None}
    assert {"queue", "flush", "hold", "release", "enqueue"} <= shared


def test_async_callables_are_told_apart_from_plain_ones() -> None:
    async def coro(a: str, b: str, c: bytes) -> None:
        return None

    class Box:
        async def __call__(self, a: str, b: str, c: bytes) -> None:
            return None

    assert is_async_callable(coro) and is_async_callable(Box())
    assert not is_async_callable(print)


def test_connection_failures_read_briefly() -> None:
    assert reason(TimeoutError()) == "connection timed out"
    assert reason(ConnectionRefusedError(111, "Connection refused")) == "Connection refused"
    assert reason(OSError()) == "OSError"


# --- the connection cache (pure: no sockets, the caller's clock) ---------------------------------

PLAIN: CacheKey = ("192.0.2.1", 25, False, False)
OPPORTUNISTIC: CacheKey = ("192.0.2.1", 25, None, False)
LMTP: CacheKey = ("192.0.2.1", 25, False, True)


def _ready_setup() -> SessionSetup:
    conn = ClientConnection(ClientConfig(local_hostname="mta.test"), now=0.0)
    setup = SessionSetup(conn, starttls=False, now=0.0)
    setup.receive_data(b"220 mx ESMTP\r\n", now=0.0)
    conn.data_to_send()
    setup.receive_data(b"250 mx\r\n", now=0.0)
    assert setup.result.ok
    return setup


def _channel(key: CacheKey, name: str = "s") -> Channel:
    from ipaddress import ip_address

    target = Target(host="mx.test", address=ip_address(key[0]), port=key[1])
    return Channel(key=key, target=target, stream=name, setup=_ready_setup())


def test_a_cached_session_is_taken_only_for_its_own_key() -> None:
    cache = SessionCache(size=4, idle=2.0)
    plain = _channel(PLAIN)
    assert cache.put(plain, 0.0) == []
    assert cache.take(OPPORTUNISTIC, 1.0) is None  # never across TLS policies
    assert cache.take(LMTP, 1.0) is None  # nor from SMTP to LMTP
    assert cache.take(PLAIN, 1.0) is plain
    assert cache.take(PLAIN, 1.0) is None  # taken means gone
    assert len(cache) == 0


def test_the_newest_session_is_reused_first_and_the_oldest_evicted() -> None:
    cache = SessionCache(size=2, idle=2.0)
    a, b, c = (_channel(PLAIN, n) for n in "abc")
    assert cache.put(a, 0.0) == [] and cache.put(b, 0.1) == []
    assert cache.put(c, 0.2) == [a]  # over the size: the oldest goes, to be closed
    assert cache.take(PLAIN, 0.3) is c
    assert cache.take(PLAIN, 0.3) is b


def test_idle_sessions_expire_in_parking_order() -> None:
    cache = SessionCache(size=8, idle=2.0)
    a, b = _channel(PLAIN, "a"), _channel(OPPORTUNISTIC, "b")
    cache.put(a, 0.0)
    cache.put(b, 1.0)
    assert cache.next_expiry() == 2.0
    assert cache.take(PLAIN, 2.0) is None  # expired: not handed out
    assert cache.expire(2.5) == [a]
    assert cache.next_expiry() == 3.0
    assert cache.drain() == [b]
    assert cache.next_expiry() is None and len(cache) == 0


@pytest.mark.parametrize(("size", "idle"), [(0, 2.0), (4, 0.0)])
def test_a_disabled_cache_hands_every_session_back_to_close(size: int, idle: float) -> None:
    cache = SessionCache(size=size, idle=idle)
    a = _channel(PLAIN)
    assert cache.put(a, 0.0) == [a]
    assert len(cache) == 0


def test_a_channel_says_quit_once_and_then_nothing() -> None:
    channel = _channel(PLAIN)
    assert channel.goodbye() == b"QUIT\r\n"
    assert channel.goodbye() == b""  # the engine refuses a second QUIT: nothing to write


_ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "take", "expire"]),
        st.sampled_from([PLAIN, OPPORTUNISTIC, LMTP]),
        st.floats(min_value=0.0, max_value=1.0),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, size=st.integers(min_value=1, max_value=4))
def test_every_parked_session_is_handed_out_or_closed_exactly_once(
    ops: list[tuple[str, CacheKey, float]], size: int
) -> None:
    """No socket leaks and none is used twice: each parked session ends up exactly once
    taken (for its own key, before its idle time), evicted, expired or drained."""
    cache = SessionCache(size=size, idle=1.0)
    now = 0.0
    parked: list[Channel] = []
    out: list[Channel] = []
    for op, key, step in ops:
        now += step
        if op == "put":
            channel = _channel(key)
            parked.append(channel)
            out += cache.put(channel, now)
        elif op == "take":
            got = cache.take(key, now)
            if got is not None:
                assert got.key == key and got.idle_until > now
                out.append(got)
        else:
            expired = cache.expire(now)
            assert all(c.idle_until <= now for c in expired)
            out += expired
        assert len(cache) <= size
    out += cache.drain()
    assert sorted(map(id, out)) == sorted(map(id, parked))

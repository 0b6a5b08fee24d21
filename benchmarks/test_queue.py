"""Scheduler throughput on a queue of 100,000 messages spread over 1,000 destinations.

One *pair* is pop_one (schedule: lease the most overdue delivery) + complete (record the
attempt).  Each round runs ROUNDS_PAIRS pairs; ops/s counts schedule and complete as one
operation each, pairs/s counts them together.  The figures (from this process's CPU time,
so that other load on a shared machine does not distort them; the best of the rounds) go into
the benchmark's extra_info (``--benchmark-json``) and are printed with ``-s``.  For the same
view in pytest-benchmark's own table, add ``--benchmark-timer=time.process_time``.

    pytest benchmarks/test_queue.py --benchmark-only -s
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from mailwire.protocol._events import Reply
from mailwire.protocol._queue import QueuedMessage, Recipient, RetryPolicy, Scheduler

QUEUED = 100_000
DESTINATIONS = 1_000
ROUNDS_PAIRS = 20_000
LATER = Reply(code=451, text="4.7.1 Try again later")
OK = Reply(code=250, text="2.0.0 OK")


def message(i: int) -> QueuedMessage:
    return QueuedMessage(
        queue_id=f"Q{i:08d}",
        sender="sender@example.org",
        recipients=(Recipient(address=f"user{i}@d{i % DESTINATIONS}.example"),),
        arrival=0.0,
        size=2048,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0


def full_scheduler() -> Scheduler:
    # a lifetime long enough that nothing expires while the benchmark moves the clock on
    scheduler = Scheduler(RetryPolicy(lifetime=1e12))
    for i in range(QUEUED):
        scheduler.add(message(i))
    return scheduler


@pytest.fixture(scope="module")
def queue() -> tuple[Scheduler, Clock]:
    """One 100,000-message scheduler shared by both benchmarks (building it is the slow part);
    each benchmark leaves it holding 100,000 messages."""
    return full_scheduler(), Clock()


def timed(run: Callable[[], object], times: list[float]) -> Callable[[], None]:
    def wrapper() -> None:
        t0 = time.process_time()
        run()
        times.append(time.process_time() - t0)

    return wrapper


def report(benchmark: Any, times: list[float]) -> None:
    pairs = ROUNDS_PAIRS / min(times)
    benchmark.extra_info["pairs_per_s"] = round(pairs)
    benchmark.extra_info["ops_per_s"] = round(2 * pairs)
    print(f"\n{ROUNDS_PAIRS} pairs (best round): {pairs:,.0f} pairs/s = {2 * pairs:,.0f} ops/s")


def test_schedule_and_defer_on_100k_queue(benchmark: Any, queue: tuple[Scheduler, Clock]) -> None:
    scheduler, clock = queue

    def run() -> float:
        pop, complete = scheduler.pop_one, scheduler.complete
        done = 0
        while done < ROUNDS_PAIRS:
            delivery = pop(clock.now)
            if delivery is None:
                wake = scheduler.next_wakeup()
                assert wake is not None
                clock.now = wake
                continue
            complete(delivery, now=clock.now, reply=LATER)
            done += 1
        return clock.now

    times: list[float] = []
    benchmark.pedantic(timed(run, times), rounds=3, iterations=1)
    report(benchmark, times)
    assert len(scheduler) == QUEUED
    assert scheduler.in_flight == 0


def test_schedule_deliver_and_refill_on_100k_queue(
    benchmark: Any, queue: tuple[Scheduler, Clock]
) -> None:
    scheduler, clock = queue
    counter = [10 * QUEUED]  # fresh queue ids

    def run() -> float:
        pop, complete, add = scheduler.pop_one, scheduler.complete, scheduler.add
        done = 0
        while done < ROUNDS_PAIRS:
            delivery = pop(clock.now)
            if delivery is None:
                wake = scheduler.next_wakeup()
                assert wake is not None
                clock.now = wake
                continue
            result = complete(delivery, now=clock.now, reply=OK)
            assert result is not None and result.finished is not None
            add(message(counter[0]))
            counter[0] += 1
            done += 1
        return clock.now

    times: list[float] = []
    benchmark.pedantic(timed(run, times), rounds=3, iterations=1)
    report(benchmark, times)
    assert len(scheduler) == QUEUED

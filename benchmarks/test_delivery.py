"""The delivery agents over loopback, connection reuse on and off (run_delivery.py's setup:
a loopback DNS server and a receiver, each in its own process).

Small runs (well under a second each) so that ``pytest benchmarks --benchmark-disable`` stays
a quick smoke test; the side-by-side table with medians and ratios comes from
``python benchmarks/run_delivery.py``.  The receiver is smtp-sink when installed, else
mailwire's threads server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _peers import Peers
from run_delivery import AGENTS, DNSProcess, default_receiver, deliver

MESSAGES = 20


@pytest.fixture(scope="module")
def mx() -> Iterator[tuple[int, tuple[str, int]]]:
    """(receiver port, DNS nameserver)."""
    peers = Peers()
    dns = DNSProcess()
    try:
        yield peers.start(default_receiver()), dns.nameserver
    finally:
        peers.stop_all()
        dns.stop()


@pytest.mark.parametrize("concurrency", [1, 20])
@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
@pytest.mark.parametrize("kind", AGENTS)
def test_delivery_throughput(  # type: ignore[no-untyped-def]
    benchmark, mx: tuple[int, tuple[str, int]], kind: str, reuse: bool, concurrency: int
) -> None:
    port, nameserver = mx
    benchmark.extra_info.update(messages=MESSAGES, size=1024, concurrency=concurrency)
    # deliver() raises unless every message was delivered (and none over a reused
    # connection with the cache off); the time includes submitting them to the spool
    result = benchmark.pedantic(
        deliver,
        args=(kind,),
        kwargs={
            "reuse": reuse,
            "concurrency": concurrency,
            "messages": MESSAGES,
            "port": port,
            "nameserver": nameserver,
        },
        rounds=3,
        iterations=1,
    )
    if not reuse:
        assert result.reused == 0
    elif concurrency == 1:  # one connection carries them all (the reuse limit is 100)
        assert result.reused == MESSAGES - 1

"""End to end over loopback: Postfix's smtp-source loading each server (issue 4).

Small runs (well under a second each) so that ``pytest benchmarks --benchmark-disable`` stays
a quick smoke test; the side-by-side table with medians and ratios comes from
``python benchmarks/run_e2e.py``.  Skipped when smtp-source is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _peers import Peers, have_smtp_source, have_uvloop, smtp_source

pytestmark = pytest.mark.skipif(
    not have_smtp_source(), reason="Postfix's smtp-source/smtp-sink not installed"
)

SERVERS = [
    "smtp-sink",
    "aiosmtpd",
    "mailwire-asyncio",
    pytest.param(
        "mailwire-asyncio-uvloop",
        marks=pytest.mark.skipif(not have_uvloop(), reason="uvloop (optional extra) missing"),
    ),
    "mailwire-trio",
    "mailwire-threads",
    "mailwire-asyncio-msg",  # MessageHandler: the message hooks run (the others skip them)
    # not mailwire: each runtime's floor, a responder that parses nothing (_floor.py)
    "floor-asyncio",
    "floor-trio",
    "floor-threads-work",
]
# (payload octets, sessions, messages)
CASES = {
    "1k-x1": (1024, 1, 100),
    "1k-x20": (1024, 20, 200),
    "100k-x1": (100 * 1024, 1, 20),
    "100k-x20": (100 * 1024, 20, 40),
}


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    started = Peers()
    yield started
    started.stop_all()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("server", SERVERS)
def test_smtp_source_throughput(benchmark, peers: Peers, server: str, case: str) -> None:  # type: ignore[no-untyped-def]
    port = peers.ports.get(server) or peers.start(server)
    size, sessions, messages = CASES[case]
    benchmark.extra_info.update(messages=messages, size=size, sessions=sessions)
    # smtp-source raises (exit status != 0) unless every message got its 250
    benchmark.pedantic(
        smtp_source,
        args=(port,),
        kwargs={"messages": messages, "size": size, "sessions": sessions},
        rounds=3,
        iterations=1,
    )

"""Durable acceptance through the spool store (fsync on): concurrent writers with and without
group commit.

Each round stores ``WRITERS * PER_WRITER`` 1 KB messages from WRITERS threads (what 20
concurrent SMTP sessions do) and returns once every one of them is durable.  The spool lives
in the system temp directory; on this machine's journal-less ext4, creating files right after
many deletions is slow for minutes, so numbers from a disk that just had a big delete are
"cold" (run twice and keep the second).

    pytest benchmarks/test_spool.py --benchmark-only
    python benchmarks/test_spool.py          # messages/s with and without group commit
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from mailwire.adapters._spool import DirectoryStore, SpoolEnvelope
from mailwire.protocol._events import MailFrom, RcptTo

WRITERS = 20
PER_WRITER = 2
CONTENT = b"Subject: spool benchmark\r\n\r\n" + b"x" * 998 + b"\r\n"
ENVELOPE = SpoolEnvelope(
    sender=MailFrom(address="sender@example.org"),
    recipients=(RcptTo(address="rcpt@example.net"),),
    peer=("127.0.0.1", 40000),
    hello="client.example",
)


def store_concurrently(store: DirectoryStore, writers: int, per_writer: int) -> int:
    """``writers`` threads each put ``per_writer`` messages; returns how many were stored."""
    ids: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(per_writer):
            queue_id = store.put(ENVELOPE, [CONTENT])
            with lock:
                ids.append(queue_id)

    threads = [threading.Thread(target=work) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(set(ids))


@pytest.fixture(params=[64, 1], ids=["group-commit", "one-fsync-round-per-message"])
def store(request: pytest.FixtureRequest) -> Iterator[DirectoryStore]:
    with tempfile.TemporaryDirectory(prefix="mailwire-bench-spool-") as tmp:
        with DirectoryStore(tmp, max_batch=request.param) as s:
            yield s


def test_durable_put_from_20_writers(benchmark, store: DirectoryStore) -> None:  # type: ignore[no-untyped-def]
    stored = benchmark.pedantic(
        store_concurrently, args=(store, WRITERS, PER_WRITER), rounds=3, iterations=1
    )
    assert stored == WRITERS * PER_WRITER
    benchmark.extra_info["messages_per_round"] = stored
    benchmark.extra_info["batches"] = store.batches


def main() -> None:
    """Print messages/s with and without group commit (medians of 5 rounds)."""
    parent = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
    print(f"spool in {parent}; {WRITERS} writer threads; 1 KB messages; fsync on")
    for max_batch in (1, 64):
        with (
            tempfile.TemporaryDirectory(dir=parent) as tmp,
            DirectoryStore(tmp, max_batch=max_batch) as s,
        ):
            rates = []
            for _ in range(5):
                start = time.perf_counter()
                n = store_concurrently(s, WRITERS, 10)
                rates.append(n / (time.perf_counter() - start))
            label = "group commit (max_batch=64)" if max_batch > 1 else "no group commit"
            print(
                f"{label:30} {statistics.median(rates):7.0f} msg/s  "
                f"{s.committed / max(s.batches, 1):5.1f} messages per fsync round"
            )
    os.sync()


if __name__ == "__main__":
    main()

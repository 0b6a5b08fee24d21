"""Durable acceptance through the spool stores (fsync on): concurrent writers with and without
group commit, for both backends -- DirectoryStore ("files": a file per message, file fsync +
rename + directory fsync) and LogStore ("log": appends to a preallocated segment, one
fdatasync per group commit).

Each round stores ``WRITERS * PER_WRITER`` 1 KB messages from WRITERS threads (what 20
concurrent SMTP sessions do) and returns once every one of them is durable.  The spool lives
in the system temp directory; on this machine's journal-less ext4, creating files right after
many deletions is slow for minutes, so numbers from a disk that just had a big delete are
"cold" (run twice and keep the second).  The log store creates no file per message and is
much less sensitive to that.

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

from mailwire.adapters._segstore import LogStore
from mailwire.adapters._spool import DirectoryStore, SpoolEnvelope, open_store
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


Store = DirectoryStore | LogStore


def store_concurrently(store: Store, writers: int, per_writer: int) -> int:
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


def opened(directory: str, store_format: str, max_batch: int) -> Store:
    # small log segments: each benchmark round preallocates less
    options = {"segment_size": 4 << 20} if store_format == "log" else {}
    store = open_store(directory, store_format, max_batch=max_batch, **options)
    assert isinstance(store, (DirectoryStore, LogStore))
    return store


@pytest.fixture(
    params=[("files", 64), ("files", 1), ("log", 256), ("log", 1)],
    ids=["files-group-commit", "files-one-round-per-message", "log-group-commit",
         "log-one-round-per-message"],
)  # fmt: skip
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    with tempfile.TemporaryDirectory(prefix="mailwire-bench-spool-") as tmp:
        with opened(tmp, *request.param) as s:
            yield s


def test_durable_put_from_20_writers(benchmark, store: Store) -> None:  # type: ignore[no-untyped-def]
    stored = benchmark.pedantic(
        store_concurrently, args=(store, WRITERS, PER_WRITER), rounds=3, iterations=1
    )
    assert stored == WRITERS * PER_WRITER
    benchmark.extra_info["messages_per_round"] = stored
    benchmark.extra_info["batches"] = store.batches


def main() -> None:
    """Print messages/s and CPU per message with and without group commit, both backends
    (medians of 5 rounds)."""
    parent = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
    print(f"spool in {parent}; {WRITERS} writer threads; 1 KB messages; fsync on")
    for store_format, max_batch in (("files", 1), ("files", 64), ("log", 1), ("log", 256)):
        with (
            tempfile.TemporaryDirectory(dir=parent) as tmp,
            opened(tmp, store_format, max_batch) as s,
        ):
            rates, cpus = [], []
            for _ in range(5):
                start, cpu = time.perf_counter(), os.times()
                n = store_concurrently(s, WRITERS, 10)
                rates.append(n / (time.perf_counter() - start))
                now = os.times()
                cpus.append((now.user + now.system - cpu.user - cpu.system) / n * 1e6)
            label = f"{store_format}, " + (
                f"group commit (max_batch={max_batch})" if max_batch > 1 else "no group commit"
            )
            print(
                f"{label:38} {statistics.median(rates):7.0f} msg/s  "
                f"{statistics.median(cpus):5.0f} us CPU/msg  "
                f"{s.committed / max(s.batches, 1):5.1f} messages per flush round"
            )
    os.sync()


if __name__ == "__main__":
    main()

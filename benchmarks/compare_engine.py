"""Print mailwire's engine throughput next to aiosmtpd's, fed the same bytes in the same run.

    python benchmarks/compare_engine.py [--repeat N]

Medians of N runs (default 7).  The machines here have 2 shared cores: compare ratios taken
in one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

sys.path.insert(0, os.path.dirname(__file__))

from _transcripts import aiosmtpd_session, chunks, mailwire_session, session  # noqa: E402

from mailwire.protocol import LineEndings, ServerConfig  # noqa: E402


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cores")
    unlimited = ServerConfig(max_message_size=0)
    allow = ServerConfig(max_message_size=0, line_endings=LineEndings.ALLOW)

    n = 500
    stream = chunks(session(n, 1024))
    mw = median_seconds(lambda: mailwire_session(stream), args.repeat)
    ai = median_seconds(lambda: aiosmtpd_session(stream), args.repeat)
    print(f"1 KB stream   mailwire {n / mw:9.0f} msg/s   aiosmtpd {n / ai:8.0f} msg/s"
          f"   ratio {ai / mw:5.1f}x")  # fmt: skip

    for size, count in ((100 * 1024, 50), (10 * 1024 * 1024, 2)):
        data = session(count, size)
        stream = chunks(data)
        mw = median_seconds(partial(mailwire_session, stream, unlimited), args.repeat)
        mwa = median_seconds(partial(mailwire_session, stream, allow), args.repeat)
        ai = median_seconds(partial(aiosmtpd_session, stream), max(1, args.repeat // 2))
        gb = len(data) / 1e9
        print(f"{size // 1024:>6} KB bodies  mailwire {gb / mw:5.2f} GB/s (bare CR/LF check) "
              f"{gb / mwa:5.2f} GB/s (line_endings=ALLOW)   aiosmtpd {gb / ai:5.2f} GB/s   "
              f"ratio {ai / mw:5.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()

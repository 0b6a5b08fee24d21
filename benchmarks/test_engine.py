"""Engine hot paths, in memory, side by side with aiosmtpd fed the same bytes.

pytest benchmarks/test_engine.py --benchmark-only      # timings
python benchmarks/compare_engine.py                    # the same, as ratios
"""

from __future__ import annotations

import pytest
from _transcripts import aiosmtpd_session, chunks, mailwire_session, session

from mailwire.protocol import LineEndings, ServerConfig

MESSAGES_1K = 200
STREAM_1K = chunks(session(MESSAGES_1K, 1024))
STREAM_100K = chunks(session(20, 100 * 1024))
STREAM_10M = chunks(session(1, 10 * 1024 * 1024))
DOTS = chunks(
    b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
    + b"..dot-stuffed line\r\n" * 50_000
    + b".\r\nQUIT\r\n"
)
UNLIMITED = ServerConfig(hostname="mx.example", max_message_size=0)
ALLOW = ServerConfig(hostname="mx.example", max_message_size=0, line_endings=LineEndings.ALLOW)


@pytest.mark.benchmark(group="1 KB message stream")
def test_mailwire_1k_stream(benchmark) -> None:  # type: ignore[no-untyped-def]
    assert benchmark(mailwire_session, STREAM_1K) == MESSAGES_1K


@pytest.mark.benchmark(group="1 KB message stream")
def test_aiosmtpd_1k_stream(benchmark) -> None:  # type: ignore[no-untyped-def]
    assert benchmark(aiosmtpd_session, STREAM_1K) == MESSAGES_1K


@pytest.mark.benchmark(group="DATA path")
def test_mailwire_100k_bodies(benchmark) -> None:  # type: ignore[no-untyped-def]
    assert benchmark(mailwire_session, STREAM_100K, UNLIMITED) == 20


@pytest.mark.benchmark(group="DATA path")
def test_aiosmtpd_100k_bodies(benchmark) -> None:  # type: ignore[no-untyped-def]
    assert benchmark(aiosmtpd_session, STREAM_100K) == 20


@pytest.mark.benchmark(group="DATA path")
def test_mailwire_10m_body(benchmark) -> None:  # type: ignore[no-untyped-def]
    assert benchmark(mailwire_session, STREAM_10M, UNLIMITED) == 1


@pytest.mark.benchmark(group="DATA path")
def test_mailwire_10m_body_bare_lf_allowed(benchmark) -> None:  # type: ignore[no-untyped-def]
    assert benchmark(mailwire_session, STREAM_10M, ALLOW) == 1


@pytest.mark.benchmark(group="DATA path")
def test_mailwire_dot_stuffed_lines(benchmark) -> None:  # type: ignore[no-untyped-def]
    assert benchmark(mailwire_session, DOTS, UNLIMITED) == 1


@pytest.mark.benchmark(group="quadratic traps")
def test_mailwire_fed_byte_by_byte(benchmark) -> None:  # type: ignore[no-untyped-def]
    # 20 messages of 1 KB, one octet per receive_data(): catches buffers that rescan.
    data = session(20, 1024)
    assert benchmark(mailwire_session, [data[i : i + 1] for i in range(len(data))]) == 20


@pytest.mark.benchmark(group="quadratic traps")
def test_mailwire_long_line_in_small_reads(benchmark) -> None:  # type: ignore[no-untyped-def]
    # a 1 MB command "line" in 100-octet reads must not be rescanned from its start
    pieces = [b"EHLO c\r\n"] + [b"x" * 100] * 10_000 + [b"\r\nQUIT\r\n"]
    assert benchmark(mailwire_session, pieces) == 0

"""LogStore, the segment-log spool backend: record framing, the spool's CRC seed (records
framed inside a message's content are not resurrected by recovery), torn tails and damage at
any offset, compaction and segment reclamation, random put/delete/restart sequences against a
model, durability order of a new segment, write failures.  The MessageStore contract and the
SIGKILL tests run over both backends in test_spool.py."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from mailwire.adapters import _segstore
from mailwire.adapters._segstore import (
    HEADER_SIZE,
    MESSAGE,
    TOMBSTONE,
    LogStore,
    decode_record,
    encode_record,
)
from mailwire.adapters._spool import QueueIds, SpoolEnvelope, SpoolError
from mailwire.protocol._events import MailFrom, RcptTo

IDS = QueueIds()
SMALL = 64 << 10  # segment size for tests: recovery reads whole segments


def envelope(n: int = 0) -> SpoolEnvelope:
    return SpoolEnvelope(
        sender=MailFrom(address=f"s{n}@example.org", envid=f"e{n}"),
        recipients=(RcptTo(address=f"r{n}@example.net", notify=("FAILURE",)),),
        peer=("192.0.2.1", 1000 + n),
        arrival=1_800_000_000.0 + n,
    )


def content(n: int, size: int = 0) -> bytes:
    return b"Subject: %d\r\n\r\n" % n + b"line %d\r\n" % n * (size or 1 + n % 40)


def segments(directory: Path) -> list[Path]:
    return sorted((directory / "segments").iterdir())


def spool_seed(directory: Path) -> int:
    """The CRC start value of a spool, from its seed file as documented (0: no seed file)."""
    path = directory / "seed"
    return zlib.crc32(bytes.fromhex(path.read_text())) if path.exists() else 0


def layout(path: Path) -> list[tuple[int, str, int, int]]:
    """(kind, queue ID, start, end) of each record of a segment file, in order."""
    data = path.read_bytes()
    seed = spool_seed(path.parent.parent)
    out, pos = [], 0
    while (record := decode_record(data, pos, seed=seed)) is not None:
        out.append((record.kind, record.queue_id, pos, pos + record.length))
        pos += record.length
    return out


def one_message_then(directory: Path, data: bytes | Callable[[int], bytes]) -> str:
    """A log holding one message, then ``data`` written right after its record (``data``
    may be a function of the store's seed, for a well-framed record)."""
    with LogStore(directory, fsync=False, segment_size=SMALL) as s:
        kept = s.put(envelope(1), [b"kept"])
        seed = s.seed
    (segment,) = segments(directory)
    with open(segment, "r+b") as f:
        f.seek(layout(segment)[-1][3])
        f.write(data if isinstance(data, bytes) else data(seed))
    return kept


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LogStore]:
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        s.recover()
        yield s


# --- framing ------------------------------------------------------------------------------------


def test_record_round_trips_and_ends_at_zeros() -> None:
    queue_id = IDS.new()
    data = encode_record(MESSAGE, queue_id, b'{"a":1}', b"body") + bytes(100)
    record = decode_record(data)
    assert record is not None
    assert (record.kind, record.queue_id, record.envelope_json, record.content) == (
        MESSAGE,
        queue_id,
        b'{"a":1}',
        b"body",
    )
    assert record.length == HEADER_SIZE + 7 + 4
    assert decode_record(data, record.length) is None  # the preallocated zeros: the end


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_changed_byte_makes_a_record_invalid(data: st.DataObject) -> None:
    raw = encode_record(MESSAGE, IDS.new(), b'{"x":"y"}', data.draw(st.binary(max_size=300)))
    at = data.draw(st.integers(0, len(raw) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = raw[:at] + bytes([raw[at] ^ flip]) + raw[at + 1 :]
    assert decode_record(damaged + bytes(64)) is None


def test_tombstone_is_a_bare_header() -> None:
    raw = encode_record(TOMBSTONE, IDS.new(), b"", b"")
    assert len(raw) == HEADER_SIZE
    record = decode_record(raw)
    assert record is not None and record.kind == TOMBSTONE


@settings(max_examples=100, deadline=None)
@given(
    seeds=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=2, unique=True),
    body=st.binary(max_size=200),
    kind=st.sampled_from([MESSAGE, TOMBSTONE]),
)
def test_a_record_framed_with_another_seed_is_invalid(
    seeds: list[int], body: bytes, kind: int
) -> None:
    mine, theirs = seeds
    env, body = (b'{"x":1}', body) if kind == MESSAGE else (b"", b"")
    raw = encode_record(kind, IDS.new(), env, body, seed=mine)
    assert decode_record(raw, seed=mine) is not None
    assert decode_record(raw, seed=theirs) is None


# --- the spool's seed -----------------------------------------------------------------------------

SEED_FILE = re.compile(r"[0-9a-f]{32}\n")


def test_new_spool_gets_a_random_seed_file_that_is_stable_across_reopening(
    tmp_path: Path,
) -> None:
    with LogStore(tmp_path / "a", fsync=False, segment_size=SMALL) as s:
        s.recover()
        assert segments(tmp_path / "a") == []  # the seed comes before any segment
        text = (tmp_path / "a" / "seed").read_text()
        assert SEED_FILE.fullmatch(text)
        assert stat.S_IMODE(os.stat(tmp_path / "a" / "seed").st_mode) == 0o600
        assert s.seed == zlib.crc32(bytes.fromhex(text)) != 0
        first_seed = s.seed
        queue_id = s.put(envelope(1), [b"one"])
    assert sorted(os.listdir(tmp_path / "a")) == ["corrupt", "lock", "seed", "segments", "tmp"]
    with LogStore(tmp_path / "a", fsync=False, segment_size=SMALL) as s:
        assert s.recover() == [queue_id]
        assert s.seed == first_seed
        assert (tmp_path / "a" / "seed").read_text() == text
    with LogStore(tmp_path / "b", fsync=False, segment_size=SMALL) as other:
        assert other.seed != first_seed  # os.urandom: a 2^-32 chance of a collision


def test_seed_file_is_flushed_renamed_and_named_durably_before_the_first_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_sync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append("file")
        real_sync(fd)

    def rename(src: str, dst: str) -> None:
        events.append(f"rename {Path(src).name} {Path(dst).name}")
        real_rename(src, dst)

    def fsync_dir(path: str) -> None:
        events.append(f"dir {Path(path).name}")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(_segstore, "_fsync_dir", fsync_dir)
    with LogStore(tmp_path / "spool", segment_size=SMALL) as s:
        assert events[-3:] == ["file", "rename seed.tmp seed", "dir spool"]
        events.clear()
        s.put(envelope(1), [b"x"])
        assert events[:2] == ["file", "dir segments"]  # the first segment comes after
    events.clear()
    with LogStore(tmp_path / "spool", segment_size=SMALL):
        assert not any(e.startswith("rename") for e in events)  # written once


def forged_record(seed: int) -> bytes:
    """A perfectly framed message record a sender might embed in a body: a relay to
    arbitrary recipients."""
    relay = SpoolEnvelope(
        sender=MailFrom(address="attacker@evil.example"),
        recipients=tuple(RcptTo(address=f"victim{n}@example.com") for n in range(3)),
        peer=("203.0.113.9", 25),
        arrival=1_800_000_000.0,
    )
    return encode_record(
        MESSAGE, IDS.new(), relay.to_json(), b"Subject: spam\r\n\r\nbuy", seed=seed
    )


def damaged_first_record_carrying(
    directory: Path, embedded: Callable[[int], bytes]
) -> tuple[list[str], int]:
    """A spool whose first (sealed) segment starts with a message embedding
    ``embedded(store seed)`` in its content, followed by real messages; the carrier's
    header is then damaged.  Returns the IDs of the real messages (the carrier first) and
    where the first real record after the carrier starts."""
    with LogStore(directory, fsync=False, segment_size=4096) as s:
        body = b"Subject: innocent\r\n\r\n" + embedded(s.seed) + b"\r\nbye\r\n"
        ids = [s.put(envelope(0), [body])]
        ids += [s.put(envelope(n), [content(n, 30)]) for n in range(1, 12)]
    first = segments(directory)[0]
    assert len(segments(directory)) >= 2  # the first segment is sealed
    records = layout(first)
    assert records[0][1] == ids[0] and len(records) >= 2  # real records follow the carrier
    with open(first, "r+b") as f:  # damage before the embedded record
        f.seek(HEADER_SIZE + 3)
        f.write(b"\xff\xfe")
    return ids, records[1][2]


@pytest.mark.parametrize("framing", ["seed 0", "another spool's seed"])
def test_record_embedded_in_a_message_is_not_resurrected_by_recovery_after_damage(
    tmp_path: Path, framing: str
) -> None:
    forged: list[bytes] = []

    def embed(seed: int) -> bytes:
        other = 0 if framing == "seed 0" else (seed ^ 0x5A5A5A5A)
        forged.append(forged_record(other))
        return forged[-1]

    ids, next_real = damaged_first_record_carrying(tmp_path, embed)
    (forgery,) = forged
    forged_id = forgery[12:32].decode()
    first = segments(tmp_path)[0]
    with LogStore(tmp_path, fsync=False, segment_size=4096) as s:
        recovered = s.recover()
        assert forged_id not in recovered
        assert recovered == sorted(ids[1:])  # the real records after the damage still come back
        assert s.quarantined == 1
        # the whole carrier, forged record included, is kept for a human
        quarantined = (tmp_path / "corrupt" / f"{first.name}@0").read_bytes()
        assert len(quarantined) == next_real and forgery in quarantined


def test_a_record_framed_with_the_spools_own_seed_would_be_resurrected(tmp_path: Path) -> None:
    # the control for the test above: what the secret seed denies an attacker
    forged: list[bytes] = []

    def embed(seed: int) -> bytes:
        forged.append(forged_record(seed))
        return forged[-1]

    ids, _ = damaged_first_record_carrying(tmp_path, embed)
    forged_id = forged[0][12:32].decode()
    with LogStore(tmp_path, fsync=False, segment_size=4096) as s:
        assert s.recover() == sorted([*ids[1:], forged_id])


def test_spool_made_before_seed_files_opens_with_seed_zero_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with LogStore(tmp_path, fsync=False, segment_size=SMALL):
        pass  # the directories (and a seed file: removed, as if made before seeds existed)
    (tmp_path / "seed").unlink()
    old, deleted, after = IDS.new(), IDS.new(), IDS.new()
    env = dataclasses.replace(envelope(1), size=3).to_json()
    sealed = (
        encode_record(MESSAGE, old, env, b"old")
        + b"damage" * 5
        + encode_record(MESSAGE, after, env, b"aft")
    )
    active = encode_record(MESSAGE, deleted, env, b"del") + encode_record(
        TOMBSTONE, deleted, b"", b""
    )
    (tmp_path / "segments" / f"{1:016x}.seg").write_bytes(sealed + bytes(100))
    (tmp_path / "segments" / f"{2:016x}.seg").write_bytes(active + bytes(100))
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mailwire.adapters.spool"):
            with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
                assert s.seed == 0
                recovered = s.recover()
                assert old in recovered and after in recovered  # resync after the damage
                assert deleted not in recovered
                assert s.get(old).content == b"old"
                new = s.put(envelope(2), [b"new"])
        assert sum("no seed file" in r.getMessage() for r in caplog.records) == 1
        assert not (tmp_path / "seed").exists()  # never invented for old records
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        assert new in s.recover() and s.get(new).content == b"new"


@pytest.mark.parametrize(
    "text",
    [b"", b"not hex at all\n", b"0" * 31 + b"\n", b"0" * 33 + b"\n", b"AB" * 16 + b"\n"],
    ids=["empty", "garbage", "short", "long", "upper-case"],
)
def test_malformed_seed_file_refuses_to_open(tmp_path: Path, text: bytes) -> None:
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        kept = s.put(envelope(1), [b"kept"])
    good = (tmp_path / "seed").read_bytes()
    (tmp_path / "seed").write_bytes(text)
    with pytest.raises(SpoolError, match="seed"):
        LogStore(tmp_path, fsync=False, segment_size=SMALL)
    assert (tmp_path / "seed").read_bytes() == text  # not rewritten
    (tmp_path / "seed").write_bytes(good)
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:  # the lock was released
        assert s.recover() == [kept]


def test_unreadable_seed_file_refuses_to_open_even_a_spool_without_segments(
    tmp_path: Path,
) -> None:
    with LogStore(tmp_path, fsync=False, segment_size=SMALL):
        pass
    (tmp_path / "seed").unlink()
    (tmp_path / "seed").mkdir()
    with pytest.raises(SpoolError, match="seed file unreadable"):
        LogStore(tmp_path, fsync=False, segment_size=SMALL)


# --- torn tails and damage ------------------------------------------------------------------------


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(0, 400), min_size=1, max_size=8),
    deletes=st.sets(st.integers(0, 7), max_size=4),
    cut=st.floats(0, 1),
)
def test_truncating_the_last_segment_anywhere_recovers_exactly_the_records_before_the_tear(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], deletes: set[int], cut: float
) -> None:
    directory = tmp_path_factory.mktemp("log")
    with LogStore(directory, fsync=False, segment_size=SMALL) as s:
        ids = [s.put(envelope(n), [content(n, size)]) for n, size in enumerate(sizes)]
        for n in sorted(deletes):
            if n < len(ids):
                s.delete(ids[n])
    (segment,) = segments(directory)
    records = layout(segment)
    at = int(cut * records[-1][3])
    os.truncate(segment, at)  # a crash: the disk has the log up to ``at``
    expected = {q for kind, q, _, end in records if kind == MESSAGE and end <= at} - {
        q for kind, q, _, end in records if kind == TOMBSTONE and end <= at
    }
    with LogStore(directory, fsync=False, segment_size=SMALL) as s:
        assert s.recover() == sorted(expected)
        for queue_id in expected:
            n = ids.index(queue_id)
            assert s.get(queue_id).content == content(n, sizes[n])
        assert os.listdir(directory / "corrupt") == []  # a torn tail is not damage
        assert os.path.getsize(segment) >= at  # preallocated again for appends
        new = s.put(envelope(99), [b"after the tear"])
    with LogStore(
        directory, fsync=False, segment_size=SMALL
    ) as s:  # the tail was cleaned: no garbage between
        assert s.recover() == sorted(expected | {new})


def test_garbage_after_a_tear_in_the_last_segment_is_kept_and_not_yielded(
    tmp_path: Path,
) -> None:
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        kept = s.put(envelope(1), [b"kept"])
        torn = s.put(envelope(2), [b"torn"])
        after = s.put(envelope(3), [b"after"])
    (segment,) = segments(tmp_path)
    (_, _, start, _), *_ = [r for r in layout(segment) if r[1] == torn]
    with open(segment, "r+b") as f:  # a tear in the middle, a valid record after it
        f.seek(start + 10)
        f.write(b"\xff")
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        assert s.recover() == [kept]  # 'after' was never acknowledged if 'torn' was torn
        assert after not in s.list()
        assert s.quarantined == 1
        (name,) = os.listdir(tmp_path / "corrupt")
        assert name == f"{segment.name}@{start}"


def test_damage_in_a_sealed_segment_is_quarantined_and_the_rest_recovered(
    tmp_path: Path,
) -> None:
    with LogStore(tmp_path, fsync=False, segment_size=2048) as s:
        ids = [s.put(envelope(n), [content(n, 30)]) for n in range(12)]
    first = segments(tmp_path)[0]
    records = layout(first)
    assert len(segments(tmp_path)) > 2 and len(records) >= 2
    _, victim, start, end = records[0]
    with open(first, "r+b") as f:
        f.seek(start + HEADER_SIZE + 5)
        f.write(b"XX")
    with LogStore(tmp_path, fsync=False, segment_size=2048) as s:
        assert s.recover() == sorted(set(ids) - {victim})
        assert (tmp_path / "corrupt" / f"{first.name}@{start}").read_bytes() == (
            first.read_bytes()[start:end]
        )
    with LogStore(tmp_path, fsync=False, segment_size=2048) as s:  # again: same result
        assert s.recover() == sorted(set(ids) - {victim})
        assert len(os.listdir(tmp_path / "corrupt")) == 1


def test_record_with_a_valid_checksum_but_a_bad_envelope_is_quarantined(tmp_path: Path) -> None:
    kept = one_message_then(
        tmp_path, lambda seed: encode_record(MESSAGE, IDS.new(), b'{"sender": 1}', b"p", seed=seed)
    )
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        assert s.recover() == [kept]
        assert len(os.listdir(tmp_path / "corrupt")) == 1


def test_appends_after_recovery_never_follow_damage_in_the_real_last_segment(
    tmp_path: Path,
) -> None:
    # found by fuzz_spool: a directory named like a higher segment made the real last
    # segment look sealed, its torn tail was quarantined but not cut, the next message went
    # after the garbage, and the recovery after that dropped it as part of a torn tail
    kept = one_message_then(tmp_path, b"torn write")
    (tmp_path / "segments" / "00000000000000ff.seg").mkdir()
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        assert s.recover() == [kept]
        later = s.put(envelope(2), [b"acknowledged after recovery"])
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        assert s.recover() == [kept, later]


def test_junk_in_the_segments_directory_is_ignored_or_moved_aside(tmp_path: Path) -> None:
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        kept = s.put(envelope(1), [b"kept"])
    (tmp_path / "segments" / "notes.txt").write_text("hello")
    (tmp_path / "segments" / "00000000000000ff.seg").mkdir()
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        assert s.recover() == [kept]
        assert os.listdir(tmp_path / "corrupt") == ["00000000000000ff.seg"]


# --- space ----------------------------------------------------------------------------------------


def test_segment_whose_messages_are_all_deleted_is_unlinked(tmp_path: Path) -> None:
    with LogStore(tmp_path, fsync=False, segment_size=2048) as s:
        ids = [s.put(envelope(n), [content(n, 30)]) for n in range(10)]
        before = segments(tmp_path)
        assert len(before) >= 3
        for queue_id in ids:
            s.delete(queue_id)
        s.put(envelope(50), [b"one more batch: collection runs after it"])
        assert s.unlinked >= len(before) - 1
        assert not set(before[:-1]) & set(segments(tmp_path))
    with LogStore(tmp_path, fsync=False, segment_size=2048) as s:
        assert len(s.recover()) == 1


def test_compaction_moves_a_stuck_message_forward_byte_for_byte(tmp_path: Path) -> None:
    with LogStore(
        tmp_path, fsync=False, segment_size=4096, compact_below=0.5, compact_after=0
    ) as s:
        ids = [s.put(envelope(n), [content(n, 20)]) for n in range(30)]
        first = segments(tmp_path)[0]
        stuck = [q for kind, q, _, _ in layout(first) if kind == MESSAGE][0]
        raw = {q: first.read_bytes()[a:b] for _, q, a, b in layout(first)}[stuck]
        for queue_id in ids:
            if queue_id != stuck:
                s.delete(queue_id)
        s.put(envelope(99), [b"x"])  # a batch after the deletes: collection
        assert s.compactions >= 1
        assert first not in segments(tmp_path)  # the stuck message no longer pins it
        assert s.get(stuck).content == content(ids.index(stuck), 20)
        copies = [
            path.read_bytes()[a:b]
            for path in segments(tmp_path)
            for _, q, a, b in layout(path)
            if q == stuck
        ]
        assert copies == [raw]  # the same record (same CRC), once
    with LogStore(tmp_path, fsync=False, segment_size=4096) as s:
        assert stuck in s.recover()
        assert s.get(stuck).envelope == dataclasses.replace(
            envelope(ids.index(stuck)), size=len(content(ids.index(stuck), 20))
        )


def test_young_segments_are_not_compacted(tmp_path: Path) -> None:
    with LogStore(tmp_path, fsync=False, segment_size=4096, compact_after=3600) as s:
        ids = [s.put(envelope(n), [content(n, 20)]) for n in range(30)]
        first = segments(tmp_path)[0]
        for queue_id in ids[1:]:
            s.delete(queue_id)  # the first message is still being delivered, say
        s.put(envelope(99), [b"x"])
        assert s.compactions == 0 and first in segments(tmp_path)
        assert s.unlinked >= 1  # segments with nothing live went at once


def test_crash_between_compaction_copy_and_unlink_keeps_one_message(tmp_path: Path) -> None:
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        moved, other = s.put(envelope(1), [b"moved"]), s.put(envelope(2), [b"other"])
    (segment,) = segments(tmp_path)
    records = layout(segment)
    (start, end) = [(a, b) for _, q, a, b in records if q == moved][0]
    with open(segment, "r+b") as f:  # the copy is durable, the original not yet unlinked
        f.seek(records[-1][3])
        f.write(segment.read_bytes()[start:end])
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        assert s.recover() == [moved, other]
        assert s.get(moved).content == b"moved"
        s.delete(moved)  # one tombstone hides both copies
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        assert s.recover() == [other]


def test_tombstone_outlives_the_segment_it_is_in_while_its_message_exists(
    tmp_path: Path,
) -> None:
    options = {"fsync": False, "segment_size": 1024, "compact_below": 0.0}  # no compaction
    with LogStore(tmp_path, **options) as s:  # type: ignore[arg-type]
        pinned = s.put(envelope(0), [b"pinned"])  # keeps segment 1 alive
        victim = s.put(envelope(1), [b"victim"])  # segment 1
        big = s.put(envelope(2), [b"b" * 700])  # does not fit: segment 2
        s.delete(victim)  # tombstone in segment 2
        s.delete(big)  # segment 2: nothing live, but the victim's tombstone is needed
        s.put(envelope(3), [b"c" * 700])  # segment 3: segment 2 is sealed, collection runs
        first, second = segments(tmp_path)[:2]
        assert [r[1] for r in layout(first)] == [pinned, victim]
        assert second.exists() and victim in [r[1] for r in layout(second)]
    with LogStore(tmp_path, **options) as s:  # type: ignore[arg-type]
        assert victim not in s.recover()  # not resurrected


# --- durability order and failures --------------------------------------------------------------


def test_new_segment_is_named_durably_before_its_first_record_is_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_data, real_sync = os.fdatasync, os.fsync

    def fsync_dir(path: str) -> None:
        events.append(f"dir {Path(path).name}")
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        real_sync(fd)
        os.close(fd)

    def fdatasync(fd: int) -> None:
        events.append("data")
        real_data(fd)

    def fsync(fd: int) -> None:
        events.append("file")
        real_sync(fd)

    monkeypatch.setattr(_segstore, "_fsync_dir", fsync_dir)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    with LogStore(tmp_path, segment_size=1024) as s:
        s.recover()
        events.clear()
        s.put(envelope(1), [b"x" * 2000])  # bigger than a segment: a new one, its own size
        assert events == ["file", "dir segments", "data"]
        events.clear()
        s.put(envelope(2), [b"y"])  # does not fit after it: another new segment
        assert events == ["file", "dir segments", "data"]
        events.clear()
        s.put(envelope(3), [b"z"])  # fits: just the data flush
        assert events == ["data"]


def test_failed_write_answers_an_error_and_seals_the_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        first = s.put(envelope(1), [b"first"])

        real_pwritev = os.pwritev

        def half(fd: int, buffers: list[bytes], offset: int) -> int:
            real_pwritev(fd, buffers, offset)  # the record reaches the file, then EIO
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "pwritev", half)
        with pytest.raises(SpoolError, match="could not write"):
            s.put(envelope(2), [b"lost"])
        monkeypatch.undo()
        assert b"lost" not in segments(tmp_path)[0].read_bytes()  # erased: never yielded
        third = s.put(envelope(3), [b"third"])
        assert len(segments(tmp_path)) == 2  # nothing appended after unknown bytes
        assert s.list() == [first, third]
    with LogStore(tmp_path, fsync=False, segment_size=SMALL) as s:
        assert s.recover() == [first, third]


def test_delete_of_unknown_or_already_deleted_message_is_refused(store: LogStore) -> None:
    queue_id = store.put(envelope(), [b"x"])
    with pytest.raises(SpoolError):
        store.delete(IDS.new())
    store.delete(queue_id)
    with pytest.raises(SpoolError):
        store.delete(queue_id)


# --- random sequences against a model -------------------------------------------------------------


class LogStoreMachine(RuleBasedStateMachine):
    """put / delete / restart / torn-tail sequences never lose an acknowledged message nor
    resurrect a deleted one; small segments make sealing, unlinking and compaction frequent."""

    messages = Bundle("messages")

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.tmp = tempfile.TemporaryDirectory(prefix="mailwire-logstate-")
        self.dir = Path(self.tmp.name)
        self.options = {
            "fsync": False,
            "segment_size": 2048,
            "compact_below": 0.3,
            "compact_after": 0,
        }
        self.store = LogStore(self.dir, **self.options)  # type: ignore[arg-type]
        self.store.recover()
        self.model: dict[str, bytes] = {}
        self.n = 0

    @rule(target=messages, size=st.integers(0, 120))
    def put(self, size: int) -> str:
        self.n += 1
        body = content(self.n, size)
        queue_id = self.store.put(envelope(self.n), [body[:50], body[50:]])
        self.model[queue_id] = body
        return queue_id

    @rule(queue_id=consumes(messages))
    def delete(self, queue_id: str) -> None:
        self.store.delete(queue_id)
        del self.model[queue_id]

    @rule()
    def restart(self) -> None:
        self.store.close()
        self.store = LogStore(self.dir, **self.options)  # type: ignore[arg-type]
        assert self.store.recover() == sorted(self.model)

    @rule(garbage=st.binary(min_size=1, max_size=80))
    def crash_mid_write(self, garbage: bytes) -> None:
        """A crash while an unacknowledged batch was being written: bytes after the end."""
        if not segments(self.dir):
            return
        self.store.close()
        last = segments(self.dir)[-1]
        end = max((r[3] for r in layout(last)), default=0)
        with open(last, "r+b") as f:
            f.seek(end)
            f.write(garbage)
        self.store = LogStore(self.dir, **self.options)  # type: ignore[arg-type]
        assert self.store.recover() == sorted(self.model)

    @invariant()
    def matches_the_model(self) -> None:
        assert self.store.list() == sorted(self.model)
        for queue_id, body in self.model.items():
            assert self.store.get(queue_id).content == body

    def teardown(self) -> None:
        self.store.close()
        self.tmp.cleanup()


LogStoreMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
test_random_put_delete_restart_sequences_match_a_model = LogStoreMachine.TestCase

"""Fuzz target: recovery of a damaged durable spool, both backends: DirectoryStore
(adapters/_spool.py, a file per message) and LogStore (adapters/_segstore.py, a segment log).

    pip install '.[fuzz]'
    python fuzz/fuzz_spool.py fuzz/corpus/spool -max_total_time=600

Each input: write N acknowledged messages (put() returned their queue IDs) to a fresh spool in
a temporary directory, leave an unacknowledged message half-received in tmp/ (a crash during
DATA), then damage the files as the input says -- truncate, overwrite, append garbage, delete,
drop garbage or complete-but-never-renamed messages into tmp/, junk names in queue/, a
directory where a message should be, and well-framed files with arbitrary envelope JSON (what
a format change or manual edit leaves) -- and open the spool again and recover().

Input: byte 0 bit 3 picks the backend.  DirectoryStore (bit 3 clear): byte 0 = message count
(low 2 bits, plus one) and whether a half-received message is left behind (bit 2); then
records of ``op target args...`` (see OPS below).  Invariants:
  * recover() never raises, get() of a recovered ID never raises;
  * a recovered ID was acknowledged (or is a planted well-framed file): nothing that was
    never acknowledged comes back -- not the half-received message, not a complete message
    left in tmp/, not garbage;
  * an acknowledged message comes back byte-identical (content and envelope) or its file is
    in corrupt/ (kept for a human) -- unless the input deleted it; an untouched one always
    comes back;
  * tmp/ is empty afterwards; list() equals what recover() returned; a second recovery
    returns the same IDs.

LogStore (bit 3 set; 2 KiB segments, so messages spread over several): byte 0 bits 4-6 =
message count minus one, bit 2 = a half-received (spilled) message left behind, bit 7 = every
third message deleted (tombstones; small segments make the store unlink and compact while
the messages are written); then records of ``op segment args...`` (LOG_OPS): truncate,
overwrite, garbage written after the last record (a torn, unacknowledged write), segment file
deleted, a well-framed record (CRC started from the store's seed, as the store writes them)
with an arbitrary envelope and queue ID planted after the last record, a new highest segment
holding a torn record, garbage in tmp/, junk names and a directory in segments/, and a forgery:
a record with a valid envelope framed with seed 0 (or another spool's seed) written inside a
message's content (what a sender can put in a body; the write itself damages the carrier, so
recovery resyncs over the forged record).  Invariants:
  * recover() never raises, get() of a recovered ID never raises, IDs come oldest first;
  * nothing comes back that was neither acknowledged nor planted (not the half message); a
    forged record (framed without the spool's seed) never comes back;
  * an acknowledged message comes back byte-identical, and always comes back unless some
    change hit its segment at or before its record's end (for every copy of the record);
  * a deleted message stays deleted unless every one of its tombstones was hit the same way;
  * tmp/ is empty; list() equals recover(); a second recovery returns the same IDs; a message
    put after recovery is there after the next one (the torn tail was cleaned).
"""

from __future__ import annotations

import logging
import os
import tempfile
import zlib
from dataclasses import replace

from mailwire.adapters._segstore import (
    HEADER_SIZE,
    MESSAGE,
    LogStore,
    Record,
    decode_record,
    encode_record,
)
from mailwire.adapters._spool import (
    DirectoryStore,
    QueueIds,
    SpoolEnvelope,
    _footer,
)
from mailwire.protocol._events import MailFrom, RcptTo

IDS = QueueIds()


def _envelope(i: int) -> SpoolEnvelope:
    sender = MailFrom(address=f"sender{i}@example.org", size=100 + i, body="8BITMIME",
                      ret="HDRS", envid=f"env-{i}+é")  # fmt: skip
    recipients = tuple(
        RcptTo(address=f"r{j}@例子.example", notify=("FAILURE",), orcpt=f"rfc822;r{j}@x.example")
        for j in range(1 + i % 3)
    )
    return SpoolEnvelope(sender=sender, recipients=recipients, peer=("192.0.2.1", 40000 + i),
                         hello="client.example", tls=bool(i & 1), session_id=f"s{i}",
                         arrival=1_700_000_000.0 + i)  # fmt: skip


def _content(i: int) -> bytes:
    return b"Subject: message %d\r\n\r\n" % i + b"line of text\r\n" * (i * 7 % 50)


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def word(self) -> int:
        return self.byte() << 8 | self.byte()

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    @property
    def more(self) -> bool:
        return self.pos < len(self.data)


def _framed(content: bytes, envelope_json: bytes) -> bytes:
    body = content + envelope_json
    return body + _footer(len(content), len(envelope_json), zlib.crc32(body))


def run(data: bytes, root: str) -> None:
    if data[0] & 8:
        run_log(data, root)
        return
    count = (data[0] & 3) + 1
    store = DirectoryStore(root, fsync=False, spill=64)
    acked: dict[str, tuple[SpoolEnvelope, bytes]] = {}
    for i in range(count):
        env, content = _envelope(i), _content(i)
        queue_id = store.put(env, [content[:10], content[10:]])
        acked[queue_id] = (replace(env, size=len(content)), content)
    if data[0] & 4:  # a message half-received when the process died: in tmp/, never acked
        writer = store.begin()
        writer.write(b"Subject: unacknowledged\r\n\r\n" + b"x" * 100)
        os.close(writer.fd)
        writer.fd, writer.done = -1, True
    store.close()

    queue, tmp, corrupt = (os.path.join(root, d) for d in ("queue", "tmp", "corrupt"))
    ids = sorted(acked)
    touched: set[str] = set()
    deleted: set[str] = set()
    planted: set[str] = set()
    r = Reader(data[1:])
    while r.more:
        op = r.byte() % len(OPS)
        target = ids[r.byte() % len(ids)]
        path = os.path.join(queue, target)
        name = OPS[op]
        if name in ("truncate", "overwrite", "append", "delete") and target in deleted:
            continue
        if name == "truncate":
            size = os.path.getsize(path)
            os.truncate(path, r.word() % (size + 1))
            touched.add(target)
        elif name == "overwrite":
            size = os.path.getsize(path)
            offset = r.word() % max(size, 1)
            patch = r.take(r.byte() % 16 + 1)
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(patch)
            touched.add(target)
        elif name == "append":
            with open(path, "ab") as f:
                f.write(r.take(r.byte() % 64 + 1))
            touched.add(target)
        elif name == "delete":
            os.unlink(path)
            deleted.add(target)
        elif name == "tmp-garbage":
            with open(os.path.join(tmp, f"g{r.pos}"), "wb") as f:
                f.write(r.take(r.byte()))
        elif name == "tmp-complete":  # fsynced in tmp/, crashed before the rename: not acked
            env, _ = acked[target]
            with open(os.path.join(tmp, f"c{r.pos}"), "wb") as f:
                f.write(_framed(b"never acknowledged\r\n", env.to_json()))
        elif name == "queue-junk-name":
            with open(os.path.join(queue, f"junk-{r.pos}.tmp"), "wb") as f:
                f.write(r.take(r.byte()))
        elif name == "queue-directory":
            os.mkdir(os.path.join(queue, IDS.new()))
        elif name == "plant":  # well-framed, arbitrary envelope: a format change, an edit
            planted_id = IDS.new()
            with open(os.path.join(queue, planted_id), "wb") as f:
                f.write(_framed(b"planted\r\n", r.take(r.word() % 4096)))
            planted.add(planted_id)
    check(root, acked, touched, deleted, planted)


OPS = ["truncate", "overwrite", "append", "delete", "tmp-garbage", "tmp-complete",
       "queue-junk-name", "queue-directory", "plant"]  # fmt: skip


def check_recovered(
    store: DirectoryStore | LogStore,
    acked: dict[str, tuple[SpoolEnvelope, bytes]],
    planted: set[str],
) -> list[str]:
    """recover(): never raises, oldest first, nothing never acknowledged (or planted), every
    acknowledged message it returns byte-identical; returns what it recovered."""
    recovered = store.recover()  # must never raise, whatever the damage
    assert recovered == sorted(recovered), "not oldest first"
    assert set(recovered) <= set(acked) | planted, "recovered a message never acknowledged"
    for queue_id in recovered:
        message = store.get(queue_id)
        if queue_id in acked:
            envelope, content = acked[queue_id]
            assert message.content == content, f"{queue_id}: content changed"
            assert message.envelope == envelope, f"{queue_id}: envelope changed"
    return recovered


def check(
    root: str,
    acked: dict[str, tuple[SpoolEnvelope, bytes]],
    touched: set[str],
    deleted: set[str],
    planted: set[str],
) -> None:
    store = DirectoryStore(root, fsync=False)
    try:
        recovered = check_recovered(store, acked, planted)
        corrupt = set(os.listdir(os.path.join(root, "corrupt")))
        for queue_id in acked:
            if queue_id in deleted:
                assert queue_id not in recovered
            elif queue_id not in touched:
                assert queue_id in recovered, f"{queue_id}: intact but not recovered"
            else:
                assert (queue_id in recovered) != (queue_id in corrupt), queue_id
        leftovers = [n for n in os.listdir(os.path.join(root, "tmp"))]
        assert leftovers == [], f"tmp/ not cleaned: {leftovers}"
        assert store.list() == recovered
        assert store.recover() == recovered, "a second recovery differs"
    finally:
        store.close()


# --- LogStore ------------------------------------------------------------------------------------

SEGMENT = 2048
LOG_OPS = ["truncate", "overwrite", "torn-write", "delete", "plant", "torn-new-segment",
           "tmp-garbage", "junk-name", "directory", "forge"]  # fmt: skip
# a relay to arbitrary recipients: what a forger would want recovery to bring back
FORGED_ENVELOPE = SpoolEnvelope(
    sender=MailFrom(address="a@evil.example"),
    recipients=(RcptTo(address="v@example.com"),),
    peer=("203.0.113.9", 25),
)


def _records(raw: bytes, seed: int) -> list[tuple[int, Record]]:
    """(start, record) of the valid records at the start of a segment's bytes, in order."""
    out, pos = [], 0
    while (record := decode_record(raw, pos, seed=seed)) is not None:
        out.append((pos, record))
        pos += record.length
    return out


def _log_layout(root: str, seed: int) -> dict[str, list[tuple[int, str, int]]]:
    """Per segment file name: (kind, queue ID, end offset) of its records, in order."""
    out: dict[str, list[tuple[int, str, int]]] = {}
    segdir = os.path.join(root, "segments")
    for name in sorted(os.listdir(segdir)):
        records = _records(_read(os.path.join(segdir, name)), seed)
        out[name] = [(rec.kind, rec.queue_id, at + rec.length) for at, rec in records]
    return out


def _records_end(path: str, seed: int) -> int:
    return sum(record.length for _, record in _records(_read(path), seed))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def run_log(data: bytes, root: str) -> None:
    count = (data[0] >> 4 & 7) + 1
    store = LogStore(
        root, fsync=False, spill=64, segment_size=SEGMENT, compact_after=0, compact_below=0.75
    )
    acked: dict[str, tuple[SpoolEnvelope, bytes]] = {}
    deleted: set[str] = set()
    for i in range(count):
        env, content = _envelope(i), _content(i)
        queue_id = store.put(env, [content[:10], content[10:]])
        acked[queue_id] = (replace(env, size=len(content)), content)
        if data[0] & 128 and i % 3 == 0:
            store.delete(queue_id)
            deleted.add(queue_id)
    if data[0] & 4:  # a message half-received when the process died: never acked
        writer = store.begin()
        writer.write(b"Subject: unacknowledged\r\n\r\n" + b"x" * 100)
    store.close()
    seed = store.seed
    assert seed == zlib.crc32(bytes.fromhex(_read(os.path.join(root, "seed")).decode())) != 0

    segdir = os.path.join(root, "segments")
    layout = _log_layout(root, seed)
    hits: dict[str, int] = {}  # segment name -> lowest offset changed (-1: file deleted)
    planted: set[str] = set()
    forged: set[str] = set()
    r = Reader(data[1:])
    while r.more:
        name = LOG_OPS[r.byte() % len(LOG_OPS)]
        segments = sorted(n for n in os.listdir(segdir) if n.endswith(".seg"))
        files = [n for n in segments if os.path.isfile(os.path.join(segdir, n))]
        target = files[r.byte() % len(files)] if files else None
        path = os.path.join(segdir, target) if target else ""

        def hit(offset: int, seg: str | None = target) -> None:
            if seg is not None and hits.get(seg, offset + 1) > offset:
                hits[seg] = offset

        if name == "truncate" and target:
            at = r.word() * 8 % (os.path.getsize(path) + 1)
            os.truncate(path, at)
            hit(at)
        elif name == "overwrite" and target:
            at = r.word() % max(os.path.getsize(path), 1)
            _patch(path, at, r.take(r.byte() % 16 + 1))
            hit(at)
        elif name == "torn-write" and target:  # garbage after the records: unacknowledged
            _patch(path, _records_end(path, seed), r.take(r.byte() % 64 + 1))
        elif name == "delete" and target:
            os.unlink(path)
            hit(-1)
        elif name == "plant" and target:  # a well-framed record after the last one
            planted_id = IDS.new()
            envelope_json = r.take(r.word() % 4096)
            _patch(path, _records_end(path, seed), encode_record(
                MESSAGE, planted_id, envelope_json, b"planted", seed=seed))  # fmt: skip
            planted.add(planted_id)
        elif name == "torn-new-segment":
            seq = max((int(n[:16], 16) for n in segments), default=0) + 1
            record = encode_record(MESSAGE, IDS.new(), acked and next(iter(acked.values()))[0]
                                   .to_json() or b"{}", b"never acknowledged",
                                   seed=seed)  # fmt: skip
            with open(os.path.join(segdir, f"{seq:016x}.seg"), "wb") as f:
                f.write(record[: max(1, r.byte() * len(record) // 256)])
        elif name == "tmp-garbage":
            with open(os.path.join(root, "tmp", f"g{r.pos}"), "wb") as f:
                f.write(r.take(r.byte()))
        elif name == "junk-name":
            with open(os.path.join(segdir, f"junk-{r.pos}.tmp"), "wb") as f:
                f.write(r.take(r.byte()))
        elif name == "directory":
            seq = max((int(n[:16], 16) for n in segments), default=0) + 1 + r.byte() % 3
            os.mkdir(os.path.join(segdir, f"{seq:016x}.seg"))
        elif name == "forge" and target:  # a record a sender framed inside a message's body
            raw = _read(path)
            carriers = [(at, rec) for at, rec in _records(raw, seed) if rec.kind == MESSAGE]
            how, where = r.byte(), r.word()
            if not carriers:
                continue
            at, carrier = carriers[how % len(carriers)]
            content_at = at + HEADER_SIZE + len(carrier.envelope_json)
            offset = content_at + where % max(len(carrier.content), 1)
            framing = 0 if how & 128 else seed ^ (0x9E3779B9 | how)  # seed 0, another spool's
            forged_id = IDS.new()
            _patch(path, offset, encode_record(MESSAGE, forged_id, FORGED_ENVELOPE.to_json(),
                                               b"forged", seed=framing))  # fmt: skip
            forged.add(forged_id)
            hit(offset)  # the carrier's CRC no longer matches: damage before the forgery
    check_log(root, acked, deleted, planted, layout, hits, forged, seed)


def check_log(
    root: str,
    acked: dict[str, tuple[SpoolEnvelope, bytes]],
    deleted: set[str],
    planted: set[str],
    layout: dict[str, list[tuple[int, str, int]]],
    hits: dict[str, int],
    forged: set[str],
    seed: int,
) -> None:
    def places(queue_id: str, kind: int) -> list[tuple[str, int]]:
        return [(seg, end) for seg, records in layout.items() for k, q, end in records
                if q == queue_id and k == kind]  # fmt: skip

    def intact(seg: str, end: int) -> bool:
        return seg not in hits or hits[seg] >= end

    store = LogStore(root, fsync=False, segment_size=SEGMENT)
    try:
        assert store.seed == seed, "the seed changed across a reopen"
        recovered = check_recovered(store, acked, planted)
        assert not forged & set(recovered), "a forged record was resurrected"
        for queue_id in acked:
            if queue_id in deleted:
                if queue_id in recovered:
                    tombs = places(queue_id, 2)
                    assert tombs and not any(intact(*t) for t in tombs), f"{queue_id} resurrected"
            elif any(intact(*place) for place in places(queue_id, MESSAGE)):
                assert queue_id in recovered, f"{queue_id}: intact but not recovered"
            else:
                assert places(queue_id, MESSAGE) or queue_id not in recovered
        assert os.listdir(os.path.join(root, "tmp")) == [], "tmp/ not cleaned"
        assert store.list() == recovered
        assert store.recover() == recovered, "a second recovery differs"
        extra = store.put(_envelope(9), [b"after recovery"])
    finally:
        store.close()
    store = LogStore(root, fsync=False, segment_size=SEGMENT)
    try:
        assert store.recover() == sorted([*recovered, extra]), "recovery after a put differs"
    finally:
        store.close()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    with tempfile.TemporaryDirectory(prefix="mailwire-fuzz-spool-") as root:
        run(data, root)


def main() -> None:
    from _atheris import fuzz  # atheris only for real fuzzing runs

    logging.getLogger("mailwire.adapters.spool").setLevel(logging.ERROR)  # damage is expected
    fuzz(test_one_input)


if __name__ == "__main__":
    main()

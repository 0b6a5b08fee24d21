# The segment-log backend of the durable spool: LogStore appends every message (and every
# deletion) as a record to a preallocated segment file, so accepting a message costs one
# append and a share of one fdatasync() -- no inode, no directory entry per message.
#
# Why.  On this machine's journal-less ext4 creating a file costs ~0.7 ms of kernel CPU
# (inode allocation), more than all of mailwire's SMTP work for a 1 KB message; a
# file-per-message store (DirectoryStore, Postfix) is capped by it.  Appending to an open,
# preallocated file and fdatasync()ing it costs a few microseconds of CPU per message:
# benchmarks/test_spool.py measured ~15 000 durable 1 KB messages/s from 20 threads at
# ~50 us CPU each (DirectoryStore: ~1 100/s at ~1 ms), and end to end over SMTP the log store
# accepts 4-6x what Postfix does (benchmarks/run_e2e.py).
#
# Layout (one directory per store):
#     <dir>/lock                flock()ed for the store's lifetime: one process per spool.
#     <dir>/seed                the spool's secret CRC seed (see Records): 16 random bytes as
#                               32 lowercase hex digits and a newline, mode 0600; written once,
#                               when the spool is created, before any segment.
#     <dir>/segments/<N>.seg    the log: N is 16 hex digits, increasing; the highest is the
#                               active segment (appended to), the others are sealed.
#     <dir>/tmp/                anonymous (O_TMPFILE) spill files of large messages being
#                               received; never a message.
#     <dir>/corrupt/            bytes recovery found damaged, "<segment>@<offset>" (kept for a
#                               human, never deleted).
# The segments/ directory marks the format: a spool with queue/ is DirectoryStore's and
# LogStore refuses to open it (and vice versa; see _spool.detect_format/open_store).
#
# Records.  A 44-byte header, then the envelope JSON, then the content:
#     magic "MWL1" | kind (1 message, 2 tombstone) | 3 zero bytes | envelope length (u32) |
#     queue ID (20 ASCII) | content length (u64) | CRC-32 (u32)           (little-endian)
# The CRC covers the content, then the envelope, then the header's first 40 bytes (that
# order lets the writer checksum the content as it arrives), and starts not from 0 but from
# crc32(seed) (``LogStore.seed``): the CRC-32 of seed || content || envelope || header prefix.
# Why a seed: recovery after damage looks for the next record by its magic and CRC (see
# Recovery), and anyone who can send us mail chooses a message's content -- with an unkeyed
# CRC they could frame a perfect record inside it (any envelope: a relay to arbitrary
# recipients, say) that damage before it would bring back as a message of its own.  The seed
# is drawn from os.urandom() when the spool is created; a record framed without it fails the
# CRC.  It is not a MAC: CRC-32 is linear, so anyone who saw one stored record and its CRC
# could forge others of the same length.  But an attacker who only sends mail never sees a
# CRC the store computes (not in replies, bounces or logs), so each record embedded in a
# message is a blind 2^-32 guess -- a message stuffed with k candidate records gets k guesses,
# and only if damage lands before them in a sealed segment.  It protects nothing against
# whoever can read the spool directory (the seed is there in the clear), nor against damage
# itself.  Compaction copies records unchanged, which stays valid within one spool; records
# cannot be moved to another spool byte for byte.  A spool with segments and no seed file
# (made before seeds existed) is read and written with seed 0 (a warning at start-up: the
# attack above works on it; drain it and start a new spool); a seed file that is unreadable
# or malformed makes LogStore refuse to open the spool rather than guess.
#
# A tombstone is a header alone (both lengths 0) naming the queue ID it deletes.  A queue ID
# is live when some segment holds a valid message record for it and no segment holds a
# tombstone for it: recovery does not depend on the order of records or segments (queue IDs
# are never reused).
#
# Segments are preallocated with posix_fallocate() (``segment_size``, 32 MiB by default; a
# bigger record gets a segment of its own size), so an append does not change the file size
# and fdatasync() need not write the inode's size.  A new segment file is fallocated,
# fsync()ed and its directory entry fsync()ed before a record in it is acknowledged.  The
# bytes after the last record are zeros (unwritten extents read as zeros): the end of a
# segment is the first all-zero header.
#
# Durability (RFC 5321 4.2.5 and 6.1: after 250 the server MUST NOT lose the message "because
# of a system crash").  A MessageWriter keeps the content in memory (the server bounds it by
# max_message_size); above ``spill`` octets it moves to an anonymous temporary file.  commit()
# hands the record to the committer thread (GroupCommitter in _spool.py, shared with
# DirectoryStore): it takes every waiting request, writes their records with one pwritev()
# (no joined copy), fdatasync()s the segment once, then updates the index and releases every
# waiter -- concurrent sessions share one write and one flush.  A batch that does not fit the active
# segment is written and flushed up to the end of that segment before the next segment is
# created, so only the highest segment can ever hold a torn record.  If a write or flush
# fails, the batch is answered with errors (451 to the client), its records are overwritten
# with zeros (best effort: if that fails too, a restart may bring them back, as duplicates of
# messages the clients will send again) and the segment is sealed: nothing more is appended
# after bytes of unknown state.
#
# Deletion appends a tombstone through the same group commit (delete() returns once it is on
# disk).  Delivery is at-least-once: a message whose delete() had not returned when the
# process or machine crashed is delivered again after the restart.  Likewise a message whose
# record was written but not yet acknowledged when the process died can come back (the client
# saw no 250 and will send it again: the classic SMTP duplicate, as with DirectoryStore).
#
# Space.  A sealed segment with no live message and no needed tombstone is unlinked (a
# tombstone is needed while a record of the message it deletes still exists in another
# segment and no other segment repeats the tombstone).  A sealed segment whose live bytes fall
# below ``compact_below`` of its used bytes, ``compact_after`` seconds (5 minutes) or more
# after it was created (or found at start-up), is compacted: its live records are copied
# unchanged (same bytes, same CRC) to the active segment together with its needed tombstones,
# flushed, and only then is the old segment unlinked -- so one stuck message cannot pin a
# whole segment.  A crash between the copy and the unlink leaves the same record twice, which
# recovery accepts (identical bytes; the index keeps one).  Segments are unlinked one at a
# time, each unlink made durable (directory fsync) before the index forgets the segment's
# records, so a tombstone is never dropped while the record it deletes can still reappear.
# Collection runs on the committer thread after a batch that deleted something or sealed a
# segment, at most one compaction per batch (it delays that batch's successors by the copy:
# at most ``compact_below`` of a segment, 8 MiB with the defaults).
#
# Recovery (at construction; recover() reports).  Every segment is scanned and every record's
# lengths, CRC, queue ID and envelope JSON verified; the index maps queue ID -> (segment,
# offset, length).  In the highest segment that opens, the first bad record starts the torn
# tail of the last, unacknowledged group commit: the file is truncated there and preallocated
# again, so appends never follow bytes of unknown state.  When a valid record follows the
# tear (the rest of that batch reached the disk before its beginning did -- or damage), the
# bytes from the tear on are first copied to corrupt/ for a human; they are not yielded.  In
# any other segment bad bytes are damage: they are copied to corrupt/, logged, and the scan
# resumes at the next valid record (found by its magic and its CRC started from the seed: a
# record someone framed inside a message's content is taken for one only with a 2^-32 guess
# per embedded record -- or certainly, in a pre-seed spool; see Records).  A valid record whose
# envelope does not parse is quarantined the same way.  Nothing is yielded that did not pass
# the CRC.  Recovery reads every segment whole: start-up time grows with the queue's size.
#
# Threads.  The committer thread alone writes; get(), list() and delete() come from any
# thread.  ``_lock`` guards the index and the segment table (reads pread() under it, so a
# segment is never closed under a reader); it is never held across a write or a flush.
from __future__ import annotations

import builtins
import concurrent.futures
import logging
import os
import re
import stat
import struct
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field, replace

from mailwire.adapters._spool import (
    GroupCommitter,
    QueueIds,
    SpoolEnvelope,
    SpoolError,
    StoredMessage,
    WriterBase,
    _fsync_dir,
    _Request,
    _valid_id,
    open_spool_directory,
)

log = logging.getLogger("mailwire.adapters.spool")

MAGIC = b"MWL1"
MESSAGE = 1
TOMBSTONE = 2
_HEADER = struct.Struct("<4sB3xI20sQI")  # magic, kind, envelope length, ID, content length, CRC
HEADER_SIZE = _HEADER.size  # 44
_CRC_AT = HEADER_SIZE - 4
_SEGMENT_NAME = re.compile(r"^([0-9a-f]{16})\.seg$")
_COPY_CHUNK = 1 << 20
SEED_NAME = "seed"
_SEED_FORMAT = re.compile(rb"[0-9a-f]{32}\n?")


def encode_record(
    kind: int, queue_id: str, envelope_json: bytes, content: bytes, *, seed: int = 0
) -> bytes:
    """One framed record (header, envelope JSON, content), for tests and tools.

    Args:
        kind: MESSAGE or TOMBSTONE.
        queue_id: the message it stores or deletes.
        envelope_json: the envelope (empty for a tombstone).
        content: the message content (empty for a tombstone).
        seed: the CRC's start value: a store's ``LogStore.seed`` (0: a pre-seed spool).

    Returns:
        The record's bytes.
    """
    head = _HEADER.pack(MAGIC, kind, len(envelope_json), queue_id.encode(), len(content), 0)
    crc = zlib.crc32(head[:_CRC_AT], zlib.crc32(envelope_json, zlib.crc32(content, seed)))
    return head[:_CRC_AT] + struct.pack("<I", crc) + envelope_json + content


def _header(kind: int, queue_id: str, env: bytes, content_len: int, content_crc: int) -> bytes:
    """A record's header; ``content_crc`` is the CRC of the content started from the seed."""
    head = _HEADER.pack(MAGIC, kind, len(env), queue_id.encode(), content_len, 0)[:_CRC_AT]
    return head + struct.pack("<I", zlib.crc32(head, zlib.crc32(env, content_crc)))


def _tombstone(queue_id: str, seed: int) -> bytes:
    return _header(TOMBSTONE, queue_id, b"", 0, seed)  # crc32(b"", seed) == seed


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """A record read back from a segment.

    Attributes:
        kind: MESSAGE or TOMBSTONE.
        queue_id: the message it stores or deletes.
        envelope_json: the envelope (empty for a tombstone).
        content: the message content (empty for a tombstone).
        length: the record's length on disk.
    """

    kind: int
    queue_id: str
    envelope_json: bytes
    content: bytes
    length: int


def decode_record(data: bytes | memoryview, offset: int = 0, *, seed: int = 0) -> Record | None:
    """The valid record at ``offset`` of ``data``.

    Args:
        data: segment bytes.
        offset: where the record starts.
        seed: the CRC's start value: the store's ``LogStore.seed`` (0: a pre-seed spool).

    Returns:
        The record, or None (no magic, bad kind, lengths past the end, bad CRC -- which
        includes a CRC computed from another seed -- or a queue ID that is not one).
    """
    if len(data) - offset < HEADER_SIZE:
        return None
    magic, kind, env_len, raw_id, content_len, crc = _HEADER.unpack_from(data, offset)
    if magic != MAGIC or kind not in (MESSAGE, TOMBSTONE):
        return None
    length = HEADER_SIZE + env_len + content_len
    if offset + length > len(data) or (kind == TOMBSTONE and length != HEADER_SIZE):
        return None
    env_at = offset + HEADER_SIZE
    env = bytes(data[env_at : env_at + env_len])
    content = bytes(data[env_at + env_len : offset + length])
    head = bytes(data[offset : offset + _CRC_AT])
    if zlib.crc32(head, zlib.crc32(env, zlib.crc32(content, seed))) != crc:
        return None
    try:
        queue_id = raw_id.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not _valid_id(queue_id):
        return None
    return Record(kind=kind, queue_id=queue_id, envelope_json=env, content=content, length=length)


@dataclass(slots=True, eq=False)
class _Segment:
    seq: int
    path: str
    fd: int
    capacity: int
    end: int = 0  # bytes used (the append position)
    ids: set[str] = field(default_factory=set)  # message records here (live or not)
    tombs: set[str] = field(default_factory=set)  # tombstones here
    live_bytes: int = 0
    checked: int = -1  # LogStore._generation when its tombstones were last found needed
    born: float = 0.0  # time.monotonic() when created or found by recovery
    broken: bool = False  # a write or flush failed: append nothing more


class _LogWriter(WriterBase):
    """A LogStore message in progress: content in memory, or in an anonymous temporary file
    once it exceeds the store's ``spill``."""

    __slots__ = ("chunks", "size", "crc", "spill_fd")

    def __init__(self, store: LogStore) -> None:
        self.store = store
        self.chunks: list[bytes] = []
        self.size = 0
        self.crc = store.seed  # DirectoryStore's writer (same WriterBase) starts at 0
        self.spill_fd = -1
        self.done = False

    def write(self, data: bytes) -> None:
        if self.done:
            raise SpoolError("message already committed or aborted")
        self.size += len(data)
        self.crc = zlib.crc32(data, self.crc)
        if self.spill_fd >= 0:
            _write_all(self.spill_fd, data)
            return
        self.chunks.append(data)
        if self.size > self.store.spill:
            # unnamed when the kernel has O_TMPFILE: nothing is left behind by a crash
            with tempfile.TemporaryFile(dir=self.store.tmp_dir) as f:
                self.spill_fd = os.dup(f.fileno())
            _write_all(self.spill_fd, b"".join(self.chunks))
            self.chunks = []

    def release(self) -> None:
        self.chunks = []
        if self.spill_fd >= 0:
            os.close(self.spill_fd)
            self.spill_fd = -1


@dataclass(slots=True)
class _Pending:
    """A record placed in a segment, not yet flushed."""

    request: _Request | None  # None: a compaction copy
    kind: int
    queue_id: str
    parts: list[bytes | tuple[int, int]]  # bytes, or (spill fd, length)
    length: int
    offset: int = 0


class LogStore(GroupCommitter):
    """The segment-log backend of MessageStore, with group commit (see the module comment).

    Args:
        directory: the spool directory (created if missing).
        segment_size: bytes preallocated per segment file.
        max_batch: most requests per group commit; 1 disables group commit.
        fsync: False skips every flush (NOT durable; for benchmarks and tests only).
        spill: content above this many bytes goes to a temporary file as it arrives.
        compact_below: a sealed segment whose live bytes fall below this fraction of its
            used bytes is compacted...
        compact_after: ...once it is this many seconds old (its messages are usually
            delivered and deleted by then: copying them would be wasted).

    Raises:
        SpoolError: the directory is locked by another process, or is a DirectoryStore spool,
            or its seed file is unreadable or malformed.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_size: int = 32 << 20,
        max_batch: int = 256,
        fsync: bool = True,
        spill: int = 1 << 20,
        compact_below: float = 0.25,
        compact_after: float = 300.0,
    ) -> None:
        self.directory = os.fspath(directory)
        self.segments_dir = os.path.join(self.directory, "segments")
        self.tmp_dir = os.path.join(self.directory, "tmp")
        self.corrupt_dir = os.path.join(self.directory, "corrupt")
        self.segment_size = max(segment_size, 1024)
        self.fsync = fsync
        self.spill = spill
        self.compact_below = compact_below
        self.compact_after = compact_after
        self.ids = QueueIds()
        self._lock_fd = open_spool_directory(
            self.directory, "log", ("segments", "tmp", "corrupt"), fsync=fsync
        )
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._index: dict[str, tuple[int, int, int]] = {}  # live ID -> (segment, offset, length)
        self._records: dict[str, set[int]] = {}  # ID -> segments holding a message record
        self._tombs: dict[str, set[int]] = {}  # ID -> segments holding a tombstone
        self._deleting: set[str] = set()  # tombstones submitted, not yet on disk
        self._gc_due = True  # the first batch collects what recovery left
        self._generation = 0  # bumped whenever a segment goes or a tombstone is copied
        self.quarantined = 0  # statistics: damaged regions copied to corrupt/
        self.compactions = 0
        self.unlinked = 0
        try:
            self._seed = self._load_seed()
            self._recovered = self._scan()
        except BaseException:
            self._close_fds()
            raise
        self._start_committer(max_batch, "mailwire-log-committer")

    @property
    def seed(self) -> int:
        """The start value of every record's CRC in this spool: crc32() of the bytes in
        ``<dir>/seed``, or 0 for a spool made before seed files existed (read-only)."""
        return self._seed

    def _load_seed(self) -> int:
        """Read ``<dir>/seed``; write a new one if the spool has no segment yet.

        Raises:
            SpoolError: the seed file is unreadable or malformed.
        """
        path = os.path.join(self.directory, SEED_NAME)
        try:
            with open(path, "rb") as f:
                raw = f.read(64)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SpoolError(f"spool {self.directory}: seed file unreadable: {exc}") from exc
        else:
            if _SEED_FORMAT.fullmatch(raw) is None:
                raise SpoolError(
                    f"spool {self.directory}: seed file {path} is malformed (want 32 hex "
                    "digits): refusing to guess, its records could not be verified"
                )
            return zlib.crc32(bytes.fromhex(raw[:32].decode("ascii")))
        if any(_SEGMENT_NAME.match(name) for name in os.listdir(self.segments_dir)):
            log.warning(
                "spool %s has segments but no seed file (made before seed files): records "
                "are checksummed from 0, so after damage in a sealed segment a record framed "
                "inside a message's content could be taken for a real one; drain this spool "
                "and start a new one to get a seed",
                self.directory,
            )
            return 0
        return _write_seed(self.directory, fsync=self.fsync)

    # --- writing ----------------------------------------------------------------------------

    def begin(self) -> _LogWriter:
        """Start receiving a message.

        Returns:
            A MessageWriter.
        """
        return _LogWriter(self)

    def _submit(
        self, writer: _LogWriter, envelope: SpoolEnvelope
    ) -> concurrent.futures.Future[str]:
        try:
            return self._enqueue(_Request(writer, envelope, self.ids.new(envelope.arrival or None)))
        except SpoolError:
            writer.release()
            raise

    def _discard(self, request: _Request) -> None:
        if request.writer is not None:
            request.writer.release()
        else:
            with self._lock:
                self._deleting.discard(request.queue_id)

    def delete(self, queue_id: str) -> None:
        """Remove a committed message durably (a tombstone, group-committed).

        Raises:
            SpoolError: unknown message, or the tombstone could not be written.
        """
        with self._lock:
            if queue_id not in self._index or queue_id in self._deleting:
                raise SpoolError(f"no message {queue_id!r}")
            self._deleting.add(queue_id)
        try:
            future = self._enqueue(_Request(None, None, queue_id))
        except SpoolError:
            with self._lock:
                self._deleting.discard(queue_id)
            raise
        future.result()

    def _commit(self, batch: list[_Request]) -> None:
        pending: list[_Pending] = []
        for r in batch:
            if r.writer is None:
                pending.append(
                    _Pending(
                        r, TOMBSTONE, r.queue_id, [_tombstone(r.queue_id, self._seed)], HEADER_SIZE
                    )
                )
                continue
            w: _LogWriter = r.writer
            assert r.envelope is not None
            env = replace(r.envelope, size=w.size).to_json()
            parts: list[bytes | tuple[int, int]] = [
                _header(MESSAGE, r.queue_id, env, w.size, w.crc)
            ]
            if w.spill_fd >= 0:
                parts += [env, (w.spill_fd, w.size)]
            else:
                parts.append(env)
                parts += w.chunks
            pending.append(_Pending(r, MESSAGE, r.queue_id, parts, HEADER_SIZE + len(env) + w.size))
        try:
            self._append(pending)
        finally:
            for r in batch:
                if r.writer is not None:
                    r.writer.release()
        self.batches += 1
        if self._gc_due:
            self._gc_due = False
            try:
                self._collect()
            except OSError as exc:
                log.error("spool: segment collection failed: %s", exc)

    def _append(self, pending: list[_Pending]) -> None:
        """Place, write and flush records; settle their requests.  Records go to the active
        segment until one does not fit; that run is flushed before the next segment is
        created, so a torn record can only be in the highest segment."""
        run: list[_Pending] = []
        active = self._active()
        for i, p in enumerate(pending):
            if active is None or active.broken or active.end + p.length > active.capacity:
                if active is not None and run:
                    if not self._flush(active, run):
                        self._fail(pending[i:], "earlier records of the batch failed")
                        return
                    run = []
                try:
                    active = self._new_segment(max(self.segment_size, p.length))
                except OSError as exc:
                    self._fail(pending[i:], f"could not create a segment: {exc}")
                    return
            p.offset = active.end
            active.end += p.length
            run.append(p)
        if active is not None and run:
            self._flush(active, run)

    def _flush(self, seg: _Segment, run: list[_Pending]) -> bool:
        try:
            offset = run[0].offset
            buf: list[bytes] = []
            for p in run:
                for part in p.parts:
                    if isinstance(part, bytes):
                        buf.append(part)
                        continue
                    offset = _pwritev_all(seg.fd, buf, offset)
                    buf = []
                    offset = _copy(part[0], part[1], seg.fd, offset)
            _pwritev_all(seg.fd, buf, offset)
            if self.fsync:
                _datasync(seg.fd)
        except OSError as exc:
            seg.broken = True  # unknown bytes on disk: append nothing more here
            self._gc_due = True
            self._erase(seg, run[0].offset, seg.end)  # before the waiters hear of it
            self._fail(run, f"could not write segment: {exc}")
            return False
        done: list[tuple[_Request, str]] = []
        with self._lock:
            for p in run:
                if p.kind == MESSAGE:
                    self._index[p.queue_id] = (seg.seq, p.offset, p.length)
                    self._records.setdefault(p.queue_id, set()).add(seg.seq)
                    seg.ids.add(p.queue_id)
                    seg.live_bytes += p.length
                else:
                    self._kill(p.queue_id)
                    self._deleting.discard(p.queue_id)
                    self._tombs.setdefault(p.queue_id, set()).add(seg.seq)
                    seg.tombs.add(p.queue_id)
                    self._gc_due = True
                if p.request is not None:
                    done.append((p.request, p.queue_id))
        self.committed += len(done)
        for request, queue_id in done:
            request.future.set_result(queue_id)
        return True

    def _erase(self, seg: _Segment, start: int, stop: int) -> None:
        """Best effort after a failed write: zeros over the records that were answered with an
        error, so a restart cannot yield them (zeros end a segment's scan; nothing follows)."""
        try:
            _pwrite_all(seg.fd, bytes(stop - start), start)
            if self.fsync:
                _datasync(seg.fd)
        except OSError as exc:
            log.error("spool: could not erase failed records in %s: %s", seg.path, exc)

    def _kill(self, queue_id: str) -> None:
        """Forget a live message (its tombstone is on disk)."""
        where = self._index.pop(queue_id, None)
        if where is not None:
            seg = self._segments.get(where[0])
            if seg is not None:
                seg.live_bytes -= where[2]

    def _fail(self, pending: list[_Pending], why: str) -> None:
        with self._lock:
            for p in pending:
                if p.kind == TOMBSTONE:
                    self._deleting.discard(p.queue_id)
        for p in pending:
            if p.request is not None and not p.request.future.done():
                p.request.future.set_exception(SpoolError(why))
        log.error("spool: %s", why)

    def _active(self) -> _Segment | None:
        return self._segments[max(self._segments)] if self._segments else None

    def _new_segment(self, capacity: int) -> _Segment:
        """Create, preallocate and durably name the next segment (before any record in it
        is acknowledged)."""
        seq = max(self._segments, default=0) + 1
        path = os.path.join(self.segments_dir, f"{seq:016x}.seg")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _preallocate_file(fd, capacity)
            if self.fsync:
                os.fsync(fd)
                _fsync_dir(self.segments_dir)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        seg = _Segment(seq, path, fd, capacity, born=time.monotonic())
        with self._lock:
            self._segments[seq] = seg
        self._gc_due = True  # the previous segment is sealed now
        return seg

    # --- space: unlinking and compaction ------------------------------------------------------

    def _needed_tombs(self, seg: _Segment) -> list[str]:
        """Tombstones in ``seg`` that still hide a record elsewhere and are not repeated."""
        return [
            t
            for t in seg.tombs
            if self._records.get(t, set()) - {seg.seq} and not self._tombs.get(t, set()) - {seg.seq}
        ]

    def _collect(self) -> None:
        """Unlink dead sealed segments (one durable unlink at a time), then compact the
        sealed segment with the lowest live fraction if it is below ``compact_below``."""
        active = self._active()
        while True:
            dead = None
            for s in list(self._segments.values()):
                if s is active or s.live_bytes > 0 or s.checked == self._generation:
                    continue
                if self._needed_tombs(s):
                    s.checked = self._generation  # rechecked after the next unlink or copy
                    continue
                dead = s
                break
            if dead is None:
                break
            self._unlink(dead)
        candidates = [
            s
            for s in self._segments.values()
            if s is not active
            and s.end
            and s.live_bytes < self.compact_below * s.end
            and time.monotonic() - s.born >= self.compact_after
        ]
        if candidates:
            self._compact(min(candidates, key=lambda s: s.live_bytes / s.end))

    def _unlink(self, seg: _Segment) -> None:
        os.unlink(seg.path)
        if self.fsync:
            _fsync_dir(self.segments_dir)  # durable before the index forgets its records
        with self._lock:
            del self._segments[seg.seq]
            os.close(seg.fd)
            for ids, where in ((seg.ids, self._records), (seg.tombs, self._tombs)):
                for queue_id in ids:
                    holders = where.get(queue_id)
                    if holders is not None:
                        holders.discard(seg.seq)
                        if not holders:
                            del where[queue_id]
        self.unlinked += 1
        self._generation += 1
        log.info("spool: segment %s unlinked (no live message)", os.path.basename(seg.path))

    def _compact(self, seg: _Segment) -> None:
        """Copy ``seg``'s live records and needed tombstones to the active segment, flush,
        then unlink ``seg``."""
        copies: list[_Pending] = []
        with self._lock:
            live = [(q, self._index[q]) for q in seg.ids if self._index.get(q, (0,))[0] == seg.seq]
            for queue_id, (_, offset, length) in sorted(live, key=lambda x: x[1][1]):
                data = os.pread(seg.fd, length, offset)
                copies.append(_Pending(None, MESSAGE, queue_id, [data], length))
        for t in self._needed_tombs(seg):
            copies.append(_Pending(None, TOMBSTONE, t, [_tombstone(t, self._seed)], HEADER_SIZE))
        if copies:
            self._append(copies)
            with self._lock:  # every copy must be durable before the original goes
                moved = all(
                    self._index.get(c.queue_id, (seg.seq,))[0] != seg.seq
                    for c in copies
                    if c.kind == MESSAGE
                )
            if not moved:
                return
            with self._lock:
                seg.live_bytes = 0  # the copies carry the live bytes now
        self.compactions += 1
        self._generation += 1
        log.info(
            "spool: segment %s compacted (%d records copied)",
            os.path.basename(seg.path),
            len(copies),
        )
        if not self._needed_tombs(seg):
            self._unlink(seg)

    # --- reading --------------------------------------------------------------------------------

    def get(self, queue_id: str) -> StoredMessage:
        """Read a committed message.

        Raises:
            SpoolError: unknown or damaged.
        """
        with self._lock:
            where = self._index.get(queue_id)
            if where is None:
                raise SpoolError(f"no message {queue_id!r}")
            seq, offset, length = where
            try:
                data = os.pread(self._segments[seq].fd, length, offset)
            except OSError as exc:
                raise SpoolError(f"{queue_id}: unreadable ({exc.strerror})") from exc
        record = decode_record(data, seed=self._seed)
        if record is None or record.queue_id != queue_id or record.kind != MESSAGE:
            raise SpoolError(f"{queue_id}: damaged record in segment {seq:016x}")
        try:
            envelope = SpoolEnvelope.from_json(record.envelope_json)
        except ValueError as exc:
            raise SpoolError(f"{queue_id}: {exc}") from exc
        return StoredMessage(id=queue_id, envelope=envelope, content=record.content)

    def list(self) -> builtins.list[str]:
        """The queue IDs of committed messages, oldest first."""
        with self._lock:
            return sorted(self._index)

    # --- recovery --------------------------------------------------------------------------------

    def recover(self) -> builtins.list[str]:
        """Report what the scan at construction found (the store is usable only after it).

        Returns:
            The committed queue IDs, oldest first.
        """
        log.info(
            "spool %s recovered: %d messages in %d segments, %d damaged regions quarantined",
            self.directory,
            len(self._index),
            len(self._segments),
            self.quarantined,
        )
        return self.list()

    def _scan(self) -> builtins.list[str]:
        names: list[tuple[int, str]] = []
        for name in os.listdir(self.segments_dir):
            m = _SEGMENT_NAME.match(name)
            path = os.path.join(self.segments_dir, name)
            if m is None:
                log.warning("spool: %s is not a segment, ignored", path)
                continue
            names.append((int(m.group(1), 16), path))
        for name in os.listdir(self.tmp_dir):  # named spill files (no O_TMPFILE): never acked
            _unlink_quietly(os.path.join(self.tmp_dir, name))
        opened: list[_Segment] = []
        for seq, path in sorted(names):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError as exc:  # e.g. a directory where a segment should be
                log.warning("spool: %s unreadable (%s), moved to corrupt/", path, exc.strerror)
                os.rename(path, os.path.join(self.corrupt_dir, os.path.basename(path)))
                continue
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                os.close(fd)
                log.warning("spool: %s is not a regular file, moved to corrupt/", path)
                os.rename(path, os.path.join(self.corrupt_dir, os.path.basename(path)))
                continue
            opened.append(_Segment(seq, path, fd, max(info.st_size, 1), born=time.monotonic()))
        # only the highest segment can hold a torn tail, and only it is appended to: it is
        # scanned as the last one (tail truncated, preallocated again), so appends never
        # follow bytes of unknown state
        for seg in opened:
            self._segments[seg.seq] = seg
            size = os.fstat(seg.fd).st_size
            data = os.pread(seg.fd, size, 0) if size else b""
            self._scan_segment(seg, data, seg is opened[-1])
        tombstoned = self._tombs.keys()
        for queue_id in [q for q in self._index if q in tombstoned]:
            self._kill(queue_id)
        return self.list()

    def _scan_segment(self, seg: _Segment, data: bytes, last: bool) -> None:
        end = len(data.rstrip(b"\0"))
        pos = 0
        while pos < end:
            record = decode_record(data, pos, seed=self._seed)
            if record is None:
                bad = pos
                pos = _resync(data, pos + 1, end, self._seed)
                if last and pos >= end:  # the torn tail of the last group commit
                    self._truncate(seg, bad)
                    return
                if last:  # a valid record after a tear: unacknowledged, kept for a human
                    self._quarantine(seg, data, bad, end)
                    self._truncate(seg, bad)
                    return
                self._quarantine(seg, data, bad, pos)
                continue
            if record.kind == MESSAGE:
                try:
                    SpoolEnvelope.from_json(record.envelope_json)
                except ValueError as exc:
                    log.warning("spool: %s: %s", record.queue_id, exc)
                    self._quarantine(seg, data, pos, pos + record.length)
                    pos += record.length
                    continue
                old = self._index.get(record.queue_id)
                if old is not None:  # a compaction copy (or a planted duplicate): keep one
                    self._segments[old[0]].live_bytes -= old[2]
                self._index[record.queue_id] = (seg.seq, pos, record.length)
                self._records.setdefault(record.queue_id, set()).add(seg.seq)
                seg.ids.add(record.queue_id)
                seg.live_bytes += record.length
            else:
                self._tombs.setdefault(record.queue_id, set()).add(seg.seq)
                seg.tombs.add(record.queue_id)
            pos += record.length
        seg.end = pos
        if last:
            self._preallocate(seg)

    def _truncate(self, seg: _Segment, at: int) -> None:
        log.warning(
            "spool: segment %s: torn tail at %d truncated (an unacknowledged commit)",
            os.path.basename(seg.path),
            at,
        )
        os.ftruncate(seg.fd, at)
        seg.end = at
        self._preallocate(seg)

    def _preallocate(self, seg: _Segment) -> None:
        seg.capacity = max(seg.capacity, self.segment_size, seg.end)
        _preallocate_file(seg.fd, seg.capacity)
        if self.fsync:
            os.fsync(seg.fd)

    def _quarantine(self, seg: _Segment, data: bytes, start: int, stop: int) -> None:
        name = f"{os.path.basename(seg.path)}@{start}"
        path = os.path.join(self.corrupt_dir, name)
        log.warning(
            "spool: segment %s: %d damaged bytes at %d copied to corrupt/%s",
            os.path.basename(seg.path),
            stop - start,
            start,
            name,
        )
        self.quarantined += 1
        if os.path.exists(path):  # found again by a later recovery
            return
        with open(path, "wb") as f:
            f.write(data[start:stop])
            if self.fsync:
                os.fsync(f.fileno())
        if self.fsync:
            _fsync_dir(self.corrupt_dir)

    # --- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Commit what is pending, stop the committer, release the lock."""
        if not self._stop_committer():
            return
        self._close_fds()

    def _close_fds(self) -> None:
        with self._lock:
            for seg in self._segments.values():
                os.close(seg.fd)
            self._segments.clear()
        os.close(self._lock_fd)


def _resync(data: bytes, start: int, end: int, seed: int) -> int:
    """The offset of the next valid record (framed with ``seed``) at or after ``start``, or
    ``end``."""
    pos = data.find(MAGIC, start, end)
    while pos >= 0:
        if decode_record(data, pos, seed=seed) is not None:
            return pos
        pos = data.find(MAGIC, pos + 1, end)
    return end


def _write_seed(directory: str, *, fsync: bool) -> int:
    """Create ``<directory>/seed`` (16 random bytes as 32 hex digits and a newline, mode
    0600): written to a temporary name, flushed, renamed, the directory flushed -- before
    any segment exists.

    Returns:
        The CRC start value it defines.
    """
    while True:
        raw = os.urandom(16)
        start = zlib.crc32(raw)
        if start:  # 0 would be the pre-seed framing (a 2^-32 chance)
            break
    tmp = os.path.join(directory, SEED_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        _write_all(fd, raw.hex().encode("ascii") + b"\n")
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(directory, SEED_NAME))
    if fsync:
        _fsync_dir(directory)
    return start


def _datasync(fd: int) -> None:
    """fdatasync(), or fsync() where there is none (macOS)."""
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - not Linux
        os.fsync(fd)


def _preallocate_file(fd: int, size: int) -> None:
    """Reserve ``size`` bytes (posix_fallocate); where there is none (macOS), extend the file
    with a hole: appends then allocate, and the flush writes that metadata too -- slower,
    still durable."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    elif os.fstat(fd).st_size < size:  # pragma: no cover - not Linux
        os.ftruncate(fd, size)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pwrite_all(fd: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]
    return offset


_IOV_MAX = 512


def _pwritev_all(fd: int, buffers: list[bytes], offset: int) -> int:
    """Write ``buffers`` back to back at ``offset`` (pwritev: no joined copy)."""
    if not hasattr(os, "pwritev"):  # pragma: no cover - older macOS
        return _pwrite_all(fd, b"".join(buffers), offset)
    for start in range(0, len(buffers), _IOV_MAX):
        group = buffers[start : start + _IOV_MAX]
        want = sum(map(len, group))
        done = os.pwritev(fd, group, offset)
        if done < want:  # a short write (rare on a regular file): finish the slow way
            _pwrite_all(fd, b"".join(group)[done:], offset + done)
        offset += want
    return offset


def _copy(src: int, length: int, dst: int, offset: int) -> int:
    """Copy ``length`` bytes from the start of ``src`` to ``dst`` at ``offset``."""
    at = 0
    while at < length:
        chunk = os.pread(src, min(_COPY_CHUNK, length - at), at)
        if not chunk:
            raise OSError(f"spill file shorter than {length} bytes")
        offset = _pwrite_all(dst, chunk, offset)
        at += len(chunk)
    return offset


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

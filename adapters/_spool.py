# The durable spool: a message store on the local file system, and SpoolHandler, the Handler
# that answers 250 to the end of a message only once the message and its envelope are on disk.
#
# Layout (one directory per store):
#     <dir>/lock          flock()ed for the store's lifetime: one process per spool.
#     <dir>/tmp/          messages being received or committed; never a message.
#     <dir>/queue/<ID>    committed messages, one file each: the content, then the envelope
#                         (JSON), then a fixed-size footer with both lengths and a CRC-32.
#     <dir>/corrupt/      files recovery found damaged (kept for a human, never deleted).
#     <dir>/free/         empty files kept for reuse; never a message.
#
# Durability (RFC 5321 4.2.5 and 6.1: once the server answers 250 to the end of data it has
# accepted responsibility for the message; it MUST NOT lose it "because of a system crash").
# A message is written to tmp/, fsync()ed, renamed into queue/, and queue/ is fsync()ed; only
# then is the queue ID returned and 250 sent.  rename() is atomic, so queue/ only ever holds
# complete files; the footer's lengths and CRC-32 still let recovery reject a file that a
# crash on a journal-less file system (this machine's ext4) left with stale blocks.  A
# leftover in tmp/ was never acknowledged: recovery deletes it.
#
# Backends.  MessageStore/MessageWriter are the interface; DirectoryStore (this module, format
# "files") and LogStore (adapters/_segstore.py, format "log": a segment log, no file per
# message) implement it.  open_store(directory, store_format) picks one; each format marks
# its directory (queue/ or segments/), detect_format() reads the mark, and a store refuses a
# directory of the other format (a spool is never converted implicitly).
#
# Group commit (GroupCommitter, shared by both backends).  fsync() costs milliseconds here
# (~5-10 ms on this virtual disk when it is "cold") whatever the size of the file, so one
# fsync per message caps acceptance near 100 messages/s.  A single committer thread takes
# every commit request that is waiting and hands the batch to the backend.  DirectoryStore
# fsyncs the batch's files in parallel on a small thread pool (the device merges concurrent
# flushes), renames them all and fsyncs queue/ once, then releases the waiters.  While a batch
# is on disk the next one gathers, so concurrent sessions share flushes and a lone session
# pays one round.  ``max_batch=1`` gives the classic one-message-at-a-time behaviour (for
# comparison).  SpoolHandler wakes an event loop once per batch, not once per message
# (adapters/_futures.py's when_done).
#
# Inode reuse.  On this machine's journal-less ext4, creating a file costs ~0.7 ms of system
# CPU (inode allocation; appending to a file costs ~2 us, renaming one ~20 us), more than all
# of mailwire's SMTP work for a 1 KB message.  So delete() truncates a message and renames it
# into free/ instead of unlinking it, and a new message takes a file from free/ (rename into
# tmp/, open with O_TRUNC) when there is one; ``preallocate`` fills free/ at start-up.  Safety
# is unchanged: a file only becomes a message by the fsync + rename into queue/ above, and
# recovery treats tmp/ leftovers as free files.
#
# Runtimes.  Handler methods run on the event loop on asyncio/trio and in the connection's
# thread on threads.  Content is kept in memory up to ``spill`` bytes (the file is created
# and written by the committer, off the event loop); bigger messages spill to a tmp file as
# they arrive.  on_message_end returns an awaitable on asyncio and trio (the event loop keeps
# serving other sessions while the batch is on disk) and blocks on threads.
#
# Queue IDs: 11 base-32 digits of microseconds since the epoch (strictly increasing within
# a process) then 9 random base-32 digits (45 bits) - unique and sortable by arrival time.
from __future__ import annotations

import builtins
import concurrent.futures
import errno
import fcntl
import json
import logging
import os
import random
import secrets
import threading
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import Any, Protocol, Self, runtime_checkable

from mailwire.adapters._driver import Handler, Session
from mailwire.adapters._futures import when_done
from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._events import MailFrom, RcptTo, Reply

log = logging.getLogger("mailwire.adapters.spool")

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base 32: sorts like the numbers
_FOOTER_MAGIC = b"MWSPOOL1"
# footer: magic, content length, envelope length, CRC-32 of content+envelope, newline
_FOOTER_LEN = len(_FOOTER_MAGIC) + 1 + 16 + 1 + 8 + 1 + 8 + 1


class SpoolError(Exception):
    """The store could not do what was asked (I/O error, unknown or damaged message)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolEnvelope:
    """Everything known about a message besides its content.

    Attributes:
        sender: the accepted MAIL command (address, SIZE, BODY, SMTPUTF8, RET, ENVID, AUTH).
        recipients: the accepted RCPT commands (address, NOTIFY, ORCPT).
        peer: the client's address.
        hello: the client's EHLO/HELO/LHLO argument.
        authenticated_as: the AUTH identity, if any.
        tls: the message came over TLS.
        session_id: the connection id (for logs).
        arrival: arrival time, seconds since the epoch.
        size: content length in octets (set by the store).
    """

    sender: MailFrom
    recipients: tuple[RcptTo, ...]
    peer: tuple[str, int] = ("", 0)
    hello: str | None = None
    authenticated_as: str | None = None
    tls: bool = False
    session_id: str = ""
    arrival: float = 0.0
    size: int = 0

    def to_json(self) -> bytes:
        """The envelope as UTF-8 JSON (what ``json.dumps(dataclasses.asdict(self))`` gives,
        built shallowly: asdict's deep copy costs more than the rest of a commit)."""
        d = {name: getattr(self, name) for name in _ENVELOPE_FIELDS}
        d["sender"] = {name: getattr(self.sender, name) for name in _SENDER_FIELDS}
        d["recipients"] = [
            {name: getattr(r, name) for name in _RCPT_FIELDS} for r in self.recipients
        ]
        return _ENCODER.encode(d).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SpoolEnvelope:
        """Parse what to_json() wrote.

        Raises:
            ValueError: not a valid envelope.
        """
        try:
            d = json.loads(data)
            s = d["sender"]
            sender = MailFrom(**{**s, "extra": _pairs(s["extra"])})
            recipients = tuple(
                RcptTo(
                    **{
                        **r,
                        "notify": None if r["notify"] is None else tuple(r["notify"]),
                        "extra": _pairs(r["extra"]),
                    }
                )
                for r in d["recipients"]
            )
            return cls(
                sender=sender,
                recipients=recipients,
                peer=(str(d["peer"][0]), int(d["peer"][1])),
                hello=d["hello"],
                authenticated_as=d["authenticated_as"],
                tls=bool(d["tls"]),
                session_id=str(d["session_id"]),
                arrival=float(d["arrival"]),
                size=int(d["size"]),
            )
        except (KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
            # RecursionError: json refuses absurdly nested input (found by fuzz_spool)
            raise ValueError(f"bad envelope: {exc!r}") from exc
        except LocalProtocolError as exc:  # the event constructors refuse a damaged field
            raise ValueError(f"bad envelope: {exc}") from exc


_ENVELOPE_FIELDS = tuple(f.name for f in fields(SpoolEnvelope))
_SENDER_FIELDS = tuple(f.name for f in fields(MailFrom))
_RCPT_FIELDS = tuple(f.name for f in fields(RcptTo))
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def _pairs(items: Sequence[Sequence[str | None]]) -> tuple[tuple[str, str | None], ...]:
    return tuple((str(k), v) for k, v in items)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredMessage:
    """A committed message.

    Attributes:
        id: the queue ID.
        envelope: its envelope.
        content: the message content (headers and body, as received, un-dot-stuffed).
    """

    id: str
    envelope: SpoolEnvelope
    content: bytes


class MessageWriter(Protocol):
    """A message being received: write() its content, then commit() or abort()."""

    size: int  # content octets written so far

    def write(self, data: bytes) -> None:
        """Append content."""

    def commit(self, envelope: SpoolEnvelope) -> concurrent.futures.Future[str]:
        """Make the message durable; the future gives its queue ID once it is on disk."""

    def abort(self) -> None:
        """Forget the message."""


@runtime_checkable
class MessageStore(Protocol):
    """The interface of a durable message store (the spool directory is one backend).

    put() and commit() return only once the message is durable: a crash after that must not
    lose it.  recover() is called once at start-up, before anything else.
    """

    def begin(self) -> MessageWriter:
        """Start receiving a message."""

    def put(self, envelope: SpoolEnvelope, chunks: Iterable[bytes]) -> str:
        """Store a whole message durably; returns its queue ID."""

    def get(self, queue_id: str) -> StoredMessage:
        """Read a committed message (SpoolError if unknown or damaged)."""

    def list(self) -> builtins.list[str]:
        """The queue IDs of committed messages, oldest first."""

    def delete(self, queue_id: str) -> None:
        """Remove a committed message durably."""

    def recover(self) -> builtins.list[str]:
        """Discard unacknowledged leftovers; returns the committed queue IDs, oldest first."""

    def close(self) -> None:
        """Finish pending commits and release the store."""


class QueueIds:
    """Queue ID source: unique, and sorting as strings sorts by creation time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0
        # the random part only has to differ between processes: seeded from the OS once,
        # then a cheap generator (secrets.randbits reads /dev/urandom: a syscall per ID)
        self._random = random.Random(secrets.randbits(128))

    def new(self, now: float | None = None) -> str:
        """A fresh queue ID (20 characters of Crockford base 32)."""
        micros = int((time.time() if now is None else now) * 1_000_000)
        with self._lock:
            micros = max(micros, self._last + 1)
            self._last = micros
            salt = self._random.getrandbits(45)
        return _b32(micros, 11) + _b32(salt, 9)


def _b32(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        out.append(_ALPHABET[n & 31])
        n >>= 5
    return "".join(reversed(out))


def _valid_id(queue_id: str) -> bool:
    return len(queue_id) == 20 and all(c in _ALPHABET for c in queue_id)


# The subdirectory that marks each store format (see detect_format).
FORMAT_MARKERS = {"files": "queue", "log": "segments"}


def detect_format(directory: str | os.PathLike[str]) -> str | None:
    """The store format of an existing spool directory.

    Returns:
        "files" (DirectoryStore), "log" (LogStore), or None when the directory holds neither
        (missing or new).

    Raises:
        SpoolError: the directory holds both (a damaged or hand-made spool).
    """
    found = [
        fmt
        for fmt, marker in FORMAT_MARKERS.items()
        if os.path.isdir(os.path.join(os.fspath(directory), marker))
    ]
    if len(found) > 1:
        raise SpoolError(f"spool {os.fspath(directory)} holds both store formats")
    return found[0] if found else None


def open_spool_directory(
    directory: str, store_format: str, subdirs: Sequence[str], *, fsync: bool
) -> int:
    """Create (or open) a spool directory of ``store_format`` and lock it for this process.

    Returns:
        The file descriptor holding the flock() (close it to release the spool).

    Raises:
        SpoolError: the directory is another format's spool, or is locked by another process.
    """
    existing = detect_format(directory)
    if existing is not None and existing != store_format:
        raise SpoolError(
            f"spool {directory} is in the {existing!r} format, not {store_format!r}: open it "
            f"with store_format={existing!r}"
        )
    for d in ("", *subdirs):
        os.makedirs(os.path.join(directory, d), mode=0o700, exist_ok=True)
    lock_fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        raise SpoolError(f"spool {directory} is in use by another process") from exc
    if fsync:  # the subdirectories themselves must survive a crash
        _fsync_dir(directory)
    return lock_fd


def _footer(content_len: int, env_len: int, crc: int) -> bytes:
    return b"%s %016x %08x %08x\n" % (_FOOTER_MAGIC, content_len, env_len, crc)


class WriterBase:
    """The commit()/abort() protocol shared by the backends' MessageWriters: one of them,
    once; commit() hands the writer to its store's ``_submit``, abort() to ``release``."""

    __slots__ = ("store", "done")
    store: Any
    done: bool

    def commit(self, envelope: SpoolEnvelope) -> concurrent.futures.Future[str]:
        """Make the message durable; the future gives its queue ID once it is on disk.

        Raises:
            SpoolError: already committed or aborted, or the store is closed.
        """
        if self.done:
            raise SpoolError("message already committed or aborted")
        self.done = True
        future: concurrent.futures.Future[str] = self.store._submit(self, envelope)
        return future

    def abort(self) -> None:
        """Forget the message (nothing if already committed or aborted)."""
        if self.done:
            return
        self.done = True
        self.release()

    def release(self) -> None:
        """Free what holds the content (memory, temporary file)."""
        raise NotImplementedError


class _Writer(WriterBase):
    """A DirectoryStore message in progress (content in memory until it spills)."""

    __slots__ = ("chunks", "size", "fd", "path", "crc")

    def __init__(self, store: DirectoryStore) -> None:
        self.store = store
        self.chunks: list[bytes] = []
        self.size = 0
        self.fd = -1
        self.path = ""
        self.crc = 0
        self.done = False

    def write(self, data: bytes) -> None:
        if self.done:
            raise SpoolError("message already committed or aborted")
        self.size += len(data)
        if self.fd >= 0:
            self.crc = zlib.crc32(data, self.crc)
            _write_all(self.fd, data)
            return
        self.chunks.append(data)
        if self.size > self.store.spill:
            self._open()
            for chunk in self.chunks:
                self.crc = zlib.crc32(chunk, self.crc)
                _write_all(self.fd, chunk)
            self.chunks = []

    def _open(self) -> None:
        self.path = os.path.join(self.store.tmp_dir, secrets.token_hex(12))
        if self.store._reuse(self.path):
            self.fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self.fd = os.open(self.path, flags, 0o600)

    def release(self) -> None:
        self.chunks = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.store._recycle(self.path)

    # called on the committer's pool: everything but the rename and the directory fsync
    def finish(self, queue_id: str, envelope: SpoolEnvelope, fsync: bool) -> None:
        if self.fd < 0:
            self._open()
            for chunk in self.chunks:
                self.crc = zlib.crc32(chunk, self.crc)
            data = b"".join(self.chunks)
            self.chunks = []
        else:
            data = b""
        env = replace(envelope, size=self.size).to_json()
        crc = zlib.crc32(env, self.crc)
        try:
            _write_all(self.fd, data + env + _footer(self.size, len(env), crc))
            if fsync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1


@dataclass(slots=True)
class _Request:
    writer: Any  # the backend's writer; None for a request that is not a new message
    envelope: SpoolEnvelope | None
    queue_id: str
    future: concurrent.futures.Future[str] = field(default_factory=concurrent.futures.Future)


class GroupCommitter:
    """The group-commit machinery shared by the store backends.

    One committer thread takes every request waiting (at most ``max_batch``), drops those
    whose waiter gave up (their message was never acknowledged), and hands the rest to the
    backend's ``_commit(batch)``, which makes them durable together and settles each request's
    future.  While a batch is on disk the next one gathers, so concurrent sessions share
    flushes and a lone session pays one round.

    Backends call ``_start_committer`` in their constructor, ``_enqueue`` to submit and
    ``_stop_committer`` from close(); they implement ``_commit`` and ``_discard``.
    """

    max_batch: int
    batches: int  # statistics: group commits done, requests committed
    committed: int

    def _start_committer(self, max_batch: int, name: str) -> None:
        self.max_batch = max(1, max_batch)
        self.batches = 0
        self.committed = 0
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._closing = False
        self._committer = threading.Thread(target=self._commit_loop, name=name, daemon=True)
        self._committer.start()

    def _enqueue(self, request: _Request) -> concurrent.futures.Future[str]:
        """Queue a request for the next group commit.

        Raises:
            SpoolError: the store is closed.
        """
        with self._cond:
            if self._closing:
                raise SpoolError("store is closed")
            self._pending.append(request)
            self._cond.notify()
        return request.future

    def _commit_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
            live = []
            for r in batch:  # a cancelled waiter was never acknowledged: drop its message
                if r.future.set_running_or_notify_cancel():
                    live.append(r)
                else:
                    self._discard(r)
            if live:
                try:
                    self._commit(live)
                except Exception as exc:  # a bug: fail the batch rather than the thread
                    log.exception("spool: group commit failed")
                    for r in live:
                        if not r.future.done():
                            r.future.set_exception(SpoolError(f"could not store: {exc}"))

    def _stop_committer(self) -> bool:
        """Commit what is pending and stop the committer; False if it was already stopped."""
        with self._cond:
            if self._closing:
                return False
            self._closing = True
            self._cond.notify()
        self._committer.join()
        return True

    def begin(self) -> MessageWriter:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def put(self, envelope: SpoolEnvelope, chunks: Iterable[bytes]) -> str:
        """Store a whole message durably.

        Returns:
            The queue ID.

        Raises:
            SpoolError: the message could not be stored.
        """
        writer = self.begin()
        try:
            for chunk in chunks:
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.commit(envelope).result()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _commit(self, batch: list[_Request]) -> None:
        raise NotImplementedError

    def _discard(self, request: _Request) -> None:
        raise NotImplementedError


class DirectoryStore(GroupCommitter):
    """The spool directory backend of MessageStore, with group commit.

    Args:
        directory: the spool directory (created if missing).
        max_batch: most messages per group commit; 1 disables group commit.
        fsync: False skips every fsync (NOT durable; for benchmarks and tests only).
        spill: content above this many bytes goes to a tmp file as it arrives.
        workers: threads that fsync a batch's files in parallel.
        preallocate: empty files to create in free/ at start-up (see the module comment).
        max_free: most files kept in free/ for reuse.

    Raises:
        SpoolError: the directory is locked by another process.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_batch: int = 64,
        fsync: bool = True,
        spill: int = 1 << 20,
        workers: int = 16,
        preallocate: int = 0,
        max_free: int = 10_000,
    ) -> None:
        self.directory = os.fspath(directory)
        self.free_dir = os.path.join(self.directory, "free")
        self.max_free = max_free
        self._free: builtins.list[str] = []
        self._free_lock = threading.Lock()
        self.tmp_dir = os.path.join(self.directory, "tmp")
        self.queue_dir = os.path.join(self.directory, "queue")
        self.corrupt_dir = os.path.join(self.directory, "corrupt")
        self.fsync = fsync
        self.spill = spill
        self.ids = QueueIds()
        self._lock_fd = open_spool_directory(
            self.directory, "files", ("tmp", "queue", "corrupt", "free"), fsync=fsync
        )
        self._queue_fd = os.open(self.queue_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._free = [n for n in os.listdir(self.free_dir) if not n.startswith(".")]
        for _ in range(max(0, preallocate - len(self._free))):
            name = secrets.token_hex(12)
            os.close(os.open(os.path.join(self.free_dir, name), os.O_WRONLY | os.O_CREAT, 0o600))
            self._free.append(name)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max(1, workers), thread_name_prefix="mailwire-spool-fsync"
        )
        self._start_committer(max_batch, "mailwire-spool-committer")

    # --- writing ----------------------------------------------------------------------------

    def begin(self) -> _Writer:
        """Start receiving a message.

        Returns:
            A MessageWriter.
        """
        return _Writer(self)

    def _submit(self, writer: _Writer, envelope: SpoolEnvelope) -> concurrent.futures.Future[str]:
        try:
            return self._enqueue(_Request(writer, envelope, self.ids.new(envelope.arrival or None)))
        except SpoolError:
            writer.done = False
            writer.abort()
            raise

    def _discard(self, request: _Request) -> None:
        request.writer.done = False
        request.writer.abort()

    def _commit(self, batch: list[_Request]) -> None:
        def finish(r: _Request) -> None:
            r.writer.finish(r.queue_id, r.envelope, self.fsync)

        if len(batch) == 1:
            results: list[BaseException | None] = [_capture(finish, batch[0])]
        else:
            results = list(self._pool.map(lambda r: _capture(finish, r), batch))
        done: list[_Request] = []
        for r, error in zip(batch, results, strict=True):
            if error is None:
                try:
                    os.rename(r.writer.path, os.path.join(self.queue_dir, r.queue_id))
                except OSError as exc:
                    error = exc
            if error is None:
                done.append(r)
            else:
                self._recycle(r.writer.path)
                r.future.set_exception(SpoolError(f"could not store message: {error}"))
        if not done:
            return
        try:
            if self.fsync:
                os.fsync(self._queue_fd)
        except OSError as exc:
            for r in done:  # not durable: take them back (the client will retry)
                _unlink_quietly(os.path.join(self.queue_dir, r.queue_id))
                r.future.set_exception(SpoolError(f"could not sync spool directory: {exc}"))
            return
        self.batches += 1
        self.committed += len(done)
        for r in done:
            r.future.set_result(r.queue_id)

    # --- reading and maintenance --------------------------------------------------------------

    def get(self, queue_id: str) -> StoredMessage:
        """Read a committed message.

        Raises:
            SpoolError: unknown or damaged.
        """
        if not _valid_id(queue_id):
            raise SpoolError(f"not a queue ID: {queue_id!r}")
        try:
            with open(os.path.join(self.queue_dir, queue_id), "rb") as f:
                data = f.read()
        except FileNotFoundError as exc:
            raise SpoolError(f"no message {queue_id}") from exc
        except OSError as exc:  # e.g. a directory where a message should be (fuzz_spool)
            raise SpoolError(f"{queue_id}: unreadable ({exc.strerror})") from exc
        envelope, content = _parse(data, queue_id)
        return StoredMessage(id=queue_id, envelope=envelope, content=content)

    def list(self) -> builtins.list[str]:
        """The queue IDs of committed messages, oldest first."""
        return sorted(n for n in os.listdir(self.queue_dir) if _valid_id(n))

    def delete(self, queue_id: str) -> None:
        """Remove a committed message durably.

        Raises:
            SpoolError: unknown message.
        """
        if not _valid_id(queue_id):
            raise SpoolError(f"not a queue ID: {queue_id!r}")
        path = os.path.join(self.queue_dir, queue_id)
        try:
            os.truncate(path, 0)  # the content does not linger in free/
        except FileNotFoundError as exc:
            raise SpoolError(f"no message {queue_id}") from exc
        self._recycle(path)
        if self.fsync:
            os.fsync(self._queue_fd)

    # --- inode reuse ------------------------------------------------------------------------------

    def _reuse(self, path: str) -> bool:
        """Move a file from free/ to ``path``; False if there is none."""
        while True:
            with self._free_lock:
                if not self._free:
                    return False
                name = self._free.pop()
            try:
                os.rename(os.path.join(self.free_dir, name), path)
                return True
            except FileNotFoundError:
                continue

    def _recycle(self, path: str) -> None:
        """Keep the file at ``path`` (content irrelevant) in free/ for reuse, or unlink it."""
        with self._free_lock:
            keep = len(self._free) < self.max_free
        if not keep:
            _unlink_quietly(path)
            return
        name = secrets.token_hex(12)
        try:
            os.rename(path, os.path.join(self.free_dir, name))
        except OSError:
            _unlink_quietly(path)
            return
        with self._free_lock:
            self._free.append(name)

    def recover(self) -> builtins.list[str]:
        """Delete tmp/ leftovers (never acknowledged), move damaged queue files to corrupt/.

        Returns:
            The committed queue IDs, oldest first.
        """
        removed = 0
        for name in os.listdir(self.tmp_dir):
            self._recycle(os.path.join(self.tmp_dir, name))
            removed += 1
        good = []
        for queue_id in self.list():
            path = os.path.join(self.queue_dir, queue_id)
            try:
                self.get(queue_id)
            except SpoolError as exc:
                log.warning("spool: %s is damaged (%s), moved to corrupt/", queue_id, exc)
                os.rename(path, os.path.join(self.corrupt_dir, queue_id))
                continue
            good.append(queue_id)
        if self.fsync:
            _fsync_dir(self.tmp_dir)
            os.fsync(self._queue_fd)
        log.info(
            "spool %s recovered: %d messages, %d unacknowledged leftovers removed",
            self.directory,
            len(good),
            removed,
        )
        return good

    def close(self) -> None:
        """Commit what is pending, stop the committer, release the lock."""
        if not self._stop_committer():
            return
        self._pool.shutdown()
        os.close(self._queue_fd)
        os.close(self._lock_fd)


def _parse(data: bytes, queue_id: str) -> tuple[SpoolEnvelope, bytes]:
    if len(data) < _FOOTER_LEN or not data.endswith(b"\n"):
        raise SpoolError(f"{queue_id}: truncated")
    footer = data[-_FOOTER_LEN:]
    parts = footer.split()
    if len(parts) != 4 or parts[0] != _FOOTER_MAGIC:
        raise SpoolError(f"{queue_id}: no footer")
    try:
        size, env_len, crc = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError as exc:
        raise SpoolError(f"{queue_id}: bad footer") from exc
    if size + env_len + _FOOTER_LEN != len(data):
        raise SpoolError(f"{queue_id}: length mismatch")
    body = data[: size + env_len]
    if zlib.crc32(body) != crc:
        raise SpoolError(f"{queue_id}: checksum mismatch")
    try:
        envelope = SpoolEnvelope.from_json(body[size:])
    except ValueError as exc:
        raise SpoolError(f"{queue_id}: {exc}") from exc
    return envelope, body[:size]


def _capture(fn: object, arg: _Request) -> BaseException | None:
    try:
        fn(arg)  # type: ignore[operator]
    except Exception as exc:
        return exc
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("spool: could not remove %s: %s", path, exc)


STORE_FORMATS = ("files", "log", "auto")


def open_store(
    directory: str | os.PathLike[str], store_format: str = "files", **options: Any
) -> MessageStore:
    """Open the spool directory with the chosen backend.

    Args:
        directory: the spool directory (created if missing).
        store_format: "files" (DirectoryStore), "log" (LogStore, adapters/_segstore.py) or
            "auto" (whatever the directory already holds; "log" for a new one: the
            faster of the two, see adapters/_segstore.py).
        **options: keyword arguments of that backend's constructor.

    Returns:
        The store; call recover() before using it.

    Raises:
        SpoolError: the directory holds the other format (a spool is never converted
            implicitly), or is in use by another process.
        ValueError: unknown store_format.
    """
    if store_format not in STORE_FORMATS:
        raise ValueError(f"store_format must be one of {STORE_FORMATS}, not {store_format!r}")
    if store_format == "auto":
        store_format = detect_format(directory) or "log"
    if store_format == "log":
        from mailwire.adapters._segstore import LogStore  # imports this module

        return LogStore(directory, **options)
    return DirectoryStore(directory, **options)


# --- the Handler --------------------------------------------------------------------------------


_WRITER = "_mailwire_spool_writer"


class SpoolHandler(Handler):
    """Accepts every sender and recipient and stores each message durably before 250.

    Answers ``250 2.0.0 Ok: queued as <ID>`` once the message and its envelope are on disk
    (``451 4.3.0`` if they could not be stored), and logs one line per accepted message on
    ``mailwire.adapters.spool``.  On LMTP the one reply is repeated for every recipient.
    Subclass and override the decision methods (on_rcpt_to ...) for policy.

    Args:
        directory: the spool directory, or a ready MessageStore.
        store_format: "files" (DirectoryStore, one file per message), "log" (LogStore, a
            segment log) or "auto" (an existing spool's format, else "files"); see open_store.
        **options: passed to the store (max_batch, fsync, spill, ...).

    Raises:
        SpoolError: the directory is another format's spool, or in use.
        ValueError: unknown store_format.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | MessageStore,
        store_format: str = "files",
        **options: int,
    ) -> None:
        if isinstance(directory, (str, os.PathLike)):
            self.store: MessageStore = open_store(directory, store_format, **options)
        else:
            self.store = directory
        self.recovered = self.store.recover()

    def close(self) -> None:
        """Release the store."""
        self.store.close()

    def on_message_start(self, session: Session) -> None:
        session.extra[_WRITER] = self.store.begin()

    def on_message_data(self, session: Session, data: bytes) -> None:
        writer = session.extra[_WRITER]
        writer.write(data)  # type: ignore[attr-defined]

    def on_message_aborted(self, session: Session) -> None:
        writer = session.extra.pop(_WRITER, None)
        if writer is not None:
            writer.abort()  # type: ignore[attr-defined]

    def on_message_end(self, session: Session) -> Any:  # Reply, or Awaitable[Reply]
        writer = session.extra.pop(_WRITER)
        sender = session.envelope.sender
        assert sender is not None  # the engine only ends a message inside a transaction
        envelope = SpoolEnvelope(
            size=writer.size,  # type: ignore[attr-defined]
            sender=sender,
            recipients=session.envelope.recipients,
            peer=session.peer,
            hello=session.hello,
            authenticated_as=session.authenticated_as,
            tls=session.tls,
            session_id=session.id,
            arrival=time.time(),
        )
        try:
            future = writer.commit(envelope)  # type: ignore[attr-defined]
        except Exception as exc:
            return self._failed(session, exc)
        return when_done(future, partial(self._settle, session, envelope))

    def _settle(
        self, session: Session, env: SpoolEnvelope, future: concurrent.futures.Future[str]
    ) -> Reply:
        try:
            queue_id = future.result()
        except Exception as exc:
            return self._failed(session, exc)
        log.info(
            "%s: accepted from=<%s> nrcpt=%d size=%d client=%s session=%s",
            queue_id,
            env.sender.address,
            len(env.recipients),
            env.size,
            env.peer[0],
            session.id,
        )
        return Reply(code=250, text=f"2.0.0 Ok: queued as {queue_id}")

    def _failed(self, session: Session, exc: BaseException) -> Reply:
        log.error("%s could not store message: %s", session.id, exc)
        return Reply(code=451, text="4.3.0 Local error: message not stored, try again later")

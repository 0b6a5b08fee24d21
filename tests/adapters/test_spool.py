"""The durable spool: the MessageStore contract over both backends (DirectoryStore, "files";
LogStore, "log"), crash recovery with a SIGKILLed writer, format detection, SpoolHandler over
real servers on every runtime.  LogStore's own properties (torn tails, compaction, random
put/delete/restart sequences) are in test_segstore.py."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import signal
import smtplib
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwire.adapters._segstore import LogStore
from mailwire.adapters._spool import (
    DirectoryStore,
    MessageStore,
    QueueIds,
    SpoolEnvelope,
    SpoolError,
    SpoolHandler,
    detect_format,
    open_store,
)
from mailwire.protocol import ServerConfig
from mailwire.protocol._events import MailFrom, RcptTo


def envelope(n: int = 0, **kw: object) -> SpoolEnvelope:
    base = SpoolEnvelope(
        sender=MailFrom(address=f"s{n}@example.org", ret="HDRS", envid=f"env{n}", size=10),
        recipients=(
            RcptTo(address=f"r{n}@example.net", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;x@y"),
            RcptTo(address="Postmaster"),
        ),
        peer=("192.0.2.7", 40000 + n),
        hello="client.example",
        authenticated_as="alice",
        tls=True,
        session_id=f"sess{n}",
        arrival=1_800_000_000.25 + n,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


FORMATS = ["files", "log"]


@pytest.fixture(params=FORMATS)
def fmt(request: pytest.FixtureRequest) -> str:
    """Each store backend: "files" (DirectoryStore) and "log" (LogStore)."""
    return str(request.param)


Store = DirectoryStore | LogStore


def opened(directory: Path, fmt: str, **options: object) -> Store:
    store = open_store(directory, fmt, **options)
    assert isinstance(store, (DirectoryStore, LogStore))
    return store


@pytest.fixture
def store(tmp_path: Path, fmt: str) -> Iterator[Store]:
    s = opened(tmp_path / "spool", fmt)
    s.recover()
    yield s
    s.close()


def test_every_backend_implements_the_store_interface(store: Store) -> None:
    assert isinstance(store, MessageStore)


def test_put_then_get_round_trips_content_and_full_envelope(store: Store) -> None:
    env = envelope(
        sender=MailFrom(
            address="ünï@exämple.org",
            smtputf8=True,
            body="8BITMIME",
            ret="FULL",
            envid="abc+2Bdef",
            auth="<>",
            extra=(("XFOO", "1"), ("XBAR", None)),
        )
    )
    content = b"Subject: hi\r\n\r\n" + bytes(range(256)) * 50
    queue_id = store.put(env, [content[:1000], content[1000:]])
    got = store.get(queue_id)
    assert got.content == content
    assert got.envelope == dataclasses.replace(env, size=len(content))
    assert store.list() == [queue_id]


def test_spilled_message_round_trips(tmp_path: Path) -> None:
    with DirectoryStore(tmp_path, spill=100) as s:
        chunks = [b"x" * 70, b"y" * 70, b"z" * 70]
        writer = s.begin()
        writer.write(chunks[0])
        assert os.listdir(s.tmp_dir) == []  # still in memory
        writer.write(chunks[1])
        assert len(os.listdir(s.tmp_dir)) == 1  # spilled to a tmp file
        assert s.list() == []  # ...which is not a message
        writer.write(chunks[2])
        queue_id = writer.commit(envelope()).result()
        assert s.get(queue_id).content == b"".join(chunks)
        assert os.listdir(s.tmp_dir) == []


def test_aborted_message_leaves_nothing(tmp_path: Path, fmt: str) -> None:
    with opened(tmp_path, fmt, spill=10) as s:
        writer = s.begin()
        writer.write(b"a" * 100)  # spilled to a temporary file
        writer.abort()
        assert os.listdir(tmp_path / "tmp") == [] and s.list() == []
    with opened(tmp_path, fmt) as s:
        assert s.recover() == []


def test_large_spilled_message_round_trips_and_survives_reopening(tmp_path: Path, fmt: str) -> None:
    content = bytes(range(256)) * 4000  # ~1 MB in 1000-octet chunks, spill at 10 KB
    with opened(tmp_path, fmt, spill=10_000) as s:
        queue_id = s.put(envelope(), [content[i : i + 1000] for i in range(0, len(content), 1000)])
        assert s.get(queue_id).content == content
        assert os.listdir(tmp_path / "tmp") == []
    with opened(tmp_path, fmt) as s:
        assert s.recover() == [queue_id]
        assert s.get(queue_id).content == content


def test_queue_ids_are_unique_and_sort_by_time() -> None:
    ids = QueueIds()
    same_instant = [ids.new(1_800_000_000.0) for _ in range(1000)]
    assert len(set(same_instant)) == 1000
    assert same_instant == sorted(same_instant)  # strictly increasing within a process
    ids_ = same_instant
    later = QueueIds().new(1_800_000_001.0)  # another process, a second later
    assert later > max(same_instant)
    assert all(len(i) == 20 and set(i) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ") for i in ids_)


@settings(max_examples=50, deadline=None)
@given(st.floats(min_value=0, max_value=4e9), st.floats(min_value=0, max_value=4e9))
def test_queue_ids_of_different_generators_order_like_their_times(a: float, b: float) -> None:
    ia, ib = QueueIds().new(a), QueueIds().new(b)
    if int(a * 1e6) < int(b * 1e6):
        assert ia < ib
    elif int(a * 1e6) > int(b * 1e6):
        assert ia > ib


def test_concurrent_puts_get_distinct_ids_and_share_commits(tmp_path: Path, fmt: str) -> None:
    with opened(tmp_path, fmt) as s:
        ids: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(16)

        def worker(n: int) -> None:
            barrier.wait()
            for i in range(5):
                queue_id = s.put(envelope(n), [f"{n}-{i}".encode()])
                with lock:
                    ids.append(queue_id)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(ids)) == 80
        assert sorted(ids) == s.list()
        assert s.committed == 80
        assert s.batches < 80  # some acceptances shared a group commit
        assert {s.get(i).content for i in ids} == {
            f"{n}-{i}".encode() for n in range(16) for i in range(5)
        }


def test_without_group_commit_each_message_is_its_own_batch(tmp_path: Path, fmt: str) -> None:
    with opened(tmp_path, fmt, max_batch=1) as s:
        for i in range(3):
            s.put(envelope(i), [b"x"])
        assert (s.batches, s.committed) == (3, 3)


def test_delete_removes_message(store: Store) -> None:
    queue_id = store.put(envelope(), [b"x"])
    kept = store.put(envelope(1), [b"y"])
    store.delete(queue_id)
    assert store.list() == [kept]
    with pytest.raises(SpoolError):
        store.get(queue_id)
    with pytest.raises(SpoolError):
        store.delete(queue_id)
    assert store.get(kept).content == b"y"


def test_deleted_message_stays_deleted_after_reopening(tmp_path: Path, fmt: str) -> None:
    with opened(tmp_path, fmt) as s:
        gone, kept = s.put(envelope(1), [b"gone"]), s.put(envelope(2), [b"kept"])
        s.delete(gone)
    with opened(tmp_path, fmt) as s:
        assert s.recover() == [kept]


def test_get_rejects_path_like_ids(store: Store) -> None:
    with pytest.raises(SpoolError):
        store.get("../lock")
    with pytest.raises(SpoolError):
        store.delete("../lock")


def test_second_process_on_same_spool_is_refused(tmp_path: Path, fmt: str) -> None:
    with opened(tmp_path, fmt):
        code = (
            "import sys; from mailwire.adapters._spool import open_store, SpoolError\n"
            "try: open_store(sys.argv[1], sys.argv[2])\n"
            "except SpoolError: sys.exit(3)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), fmt], timeout=60)
        assert proc.returncode == 3


def test_recovery_removes_leftover_temp_files_and_lists_messages(tmp_path: Path, fmt: str) -> None:
    with opened(tmp_path, fmt) as s:
        kept = [s.put(envelope(i), [b"m%d" % i]) for i in range(3)]
        Path(tmp_path, "tmp", "leftover").write_bytes(b"half a message")
    with opened(tmp_path, fmt) as s:
        assert s.recover() == kept
        assert os.listdir(tmp_path / "tmp") == []


@pytest.mark.parametrize(("fmt", "other"), [("files", "log"), ("log", "files")])
def test_a_spool_is_never_opened_as_the_other_format(tmp_path: Path, fmt: str, other: str) -> None:
    with opened(tmp_path, fmt) as s:
        queue_id = s.put(envelope(), [b"x"])
    assert detect_format(tmp_path) == fmt
    with pytest.raises(SpoolError, match=f"store_format='{fmt}'"):
        open_store(tmp_path, other)
    with pytest.raises(SpoolError):
        SpoolHandler(tmp_path, store_format=other)
    with opened(tmp_path, "auto") as s:
        kinds: dict[str, type] = {"files": DirectoryStore, "log": LogStore}
        assert type(s) is kinds[fmt]
        assert s.recover() == [queue_id]


def test_new_spool_format_follows_the_choice(tmp_path: Path) -> None:
    assert detect_format(tmp_path / "missing") is None
    with opened(tmp_path / "a", "auto") as s:
        assert isinstance(s, LogStore)  # a new spool is a segment log
    handler = SpoolHandler(tmp_path / "b", store_format="log")
    handler.close()
    assert detect_format(tmp_path / "b") == "log"
    with pytest.raises(ValueError):
        open_store(tmp_path / "c", "sqlite")


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b"X" + b[1:],  # content changed: checksum
        lambda b: b"",  # empty (a crash before the data reached the disk)
        lambda b: b[:-5] + b"zzzz\n",  # footer garbled
    ],
)
def test_recovery_quarantines_damaged_messages(tmp_path: Path, damage) -> None:  # type: ignore[no-untyped-def]
    with DirectoryStore(tmp_path) as s:
        good = s.put(envelope(1), [b"good"])
        bad = s.put(envelope(2), [b"bad message content"])
        path = Path(s.queue_dir, bad)
        path.write_bytes(damage(path.read_bytes()))
    with DirectoryStore(tmp_path) as s:
        assert s.recover() == [good]
        assert os.listdir(s.corrupt_dir) == [bad]


_WRITER_CHILD = textwrap.dedent(
    """
    import sys, threading
    from mailwire.adapters._spool import SpoolEnvelope, open_store
    from mailwire.protocol._events import MailFrom, RcptTo
    store = open_store(sys.argv[1], sys.argv[3], spill=4096, **eval(sys.argv[4]))
    store.recover()
    mode = sys.argv[2]
    out_lock = threading.Lock()
    def env(n):
        return SpoolEnvelope(sender=MailFrom(address="a@b.example"),
                             recipients=(RcptTo(address="c@d.example"),), arrival=1.0 + n)
    def ack(queue_id, n):
        with out_lock:
            sys.stdout.write(f"{queue_id} {n}\\n"); sys.stdout.flush()
    if mode == "partial":
        for n in range(5):
            ack(store.put(env(n), [b"%d" % n * 10000]), n)
        w = store.begin()
        w.write(b"P" * 10000)          # spilled: a half-written tmp file exists
        sys.stdout.write("PARTIAL\\n"); sys.stdout.flush()
        sys.stdin.readline()           # wait to be killed
    else:
        def loop(t):
            n = t * 1_000_000
            while True:
                ack(store.put(env(n), [b"%d" % n * (100 + n % 9000)]), n)
                n += 1
        for t in range(8):
            threading.Thread(target=loop, args=(t,), daemon=True).start()
        threading.Event().wait()
    """
)


def _kill_writer(
    spool: Path, mode: str, stop_after: int, fmt: str, options: str = "{}"
) -> dict[str, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER_CHILD, str(spool), mode, fmt, options],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    acked: dict[str, int] = {}
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if line.strip() == "PARTIAL" or len(acked) >= stop_after:
                break
            queue_id, n = line.split()
            acked[queue_id] = int(n)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return acked


def test_sigkill_with_half_written_message_loses_nothing_acknowledged(
    tmp_path: Path, fmt: str
) -> None:
    acked = _kill_writer(tmp_path, "partial", stop_after=10**9, fmt=fmt)
    assert len(acked) == 5
    # the half message: a tmp file (the log's spill file is anonymous), never a queue entry
    assert len(os.listdir(tmp_path / "tmp")) == (fmt == "files")
    with opened(tmp_path, fmt) as s:
        assert s.recover() == sorted(acked)
        assert os.listdir(tmp_path / "tmp") == []
        for queue_id, n in acked.items():
            assert s.get(queue_id).content == b"%d" % n * 10000


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("files", "{}"), ("log", "{}"), ("log", "{'segment_size': 200_000}")],
    ids=["files", "log", "log-small-segments"],
)
def test_sigkill_during_concurrent_writes_recovers_every_acknowledged_message(
    tmp_path: Path, fmt: str, options: str
) -> None:
    acked = _kill_writer(tmp_path, "busy", stop_after=200, fmt=fmt, options=options)
    with opened(tmp_path, fmt) as s:
        recovered = s.recover()
        assert os.listdir(tmp_path / "corrupt") == []  # no half message was ever accepted
        assert set(acked) <= set(recovered)
        for queue_id in recovered:  # including committed-but-unacknowledged ones: whole
            msg = s.get(queue_id)
            assert msg.content == b"%d" % (n := int(msg.envelope.arrival - 1)) * (100 + n % 9000)


_SERVER_CHILD = textwrap.dedent(
    """
    import sys, threading
    from mailwire.adapters._spool import SpoolHandler
    from mailwire.adapters.threads import Controller
    from mailwire.protocol import ServerConfig
    handler = SpoolHandler(sys.argv[1], store_format=sys.argv[2])
    ctl = Controller(handler, ServerConfig(hostname="mx.test"))
    ctl.start()
    print(ctl.addresses[0][1], flush=True)
    threading.Event().wait()
    """
)


def test_sigkill_of_a_busy_server_loses_no_message_it_answered_250(
    tmp_path: Path, fmt: str
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER_CHILD, str(tmp_path), fmt],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    enough = threading.Event()

    def client(n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                smtp.ehlo("client.test")
                for i in range(10**6):
                    body = b"Subject: %d-%d\r\n\r\n" % (n, i) + b"x" * (i * 37 % 3000) + b"\r\n"
                    smtp.sendmail("a@b.example", ["c@d.example"], body)  # raises unless 250
                    with lock:
                        acked[f"{n}-{i}"] = body
                        if len(acked) >= 150:
                            enough.set()
        except (smtplib.SMTPException, OSError):
            pass  # the server was killed

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    try:
        assert enough.wait(60)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        for t in threads:
            t.join(30)
        proc.stdout.close()
    with opened(tmp_path, fmt) as s:
        stored = {s.get(q).content for q in s.recover()}
    with lock:
        assert set(acked.values()) <= stored  # every 250 survived; at most a few extra


def test_fsync_of_a_closed_store_is_refused(tmp_path: Path, fmt: str) -> None:
    s = opened(tmp_path, fmt)
    writer = s.begin()
    writer.write(b"x")
    s.close()
    with pytest.raises(SpoolError):
        writer.commit(envelope())


# --- SpoolHandler over real servers -------------------------------------------------------------


@pytest.mark.parametrize("max_batch", [64, 1])
def test_spool_handler_stores_before_250_on_every_runtime(
    runtime: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, max_batch: int, fmt: str
) -> None:
    adapter = importlib.import_module(f"mailwire.adapters.{runtime}")
    handler = SpoolHandler(tmp_path, store_format=fmt, max_batch=max_batch)
    caplog.set_level(logging.INFO, logger="mailwire.adapters.spool")
    try:
        with adapter.Controller(handler, ServerConfig(hostname="mx.test")) as ctl:
            host, port = ctl.addresses[0]
            with smtplib.SMTP(host, port, timeout=10) as client:
                client.ehlo("client.test")
                queued = []
                for i in range(3):
                    client.mail("from@example.org", ["RET=HDRS", f"ENVID=e{i}"])
                    client.rcpt("to@example.net", ["NOTIFY=FAILURE"])
                    code, text = client.data(b"Subject: %d\r\n\r\nbody\r\n" % i)
                    assert code == 250
                    assert text.startswith(b"2.0.0 Ok: queued as ")
                    queued.append(text.split()[-1].decode())
                    # acknowledged means already on disk and complete:
                    msg = handler.store.get(queued[-1])
                    assert msg.content == b"Subject: %d\r\n\r\nbody\r\n" % i
                    assert msg.envelope.sender.envid == f"e{i}"
                    assert msg.envelope.recipients[0].notify == ("FAILURE",)
                    assert msg.envelope.hello == "client.test"
                    assert msg.envelope.peer[0] == "127.0.0.1"
    finally:
        handler.close()
    assert handler.store.list() == sorted(queued)
    lines = [r.getMessage() for r in caplog.records if "accepted" in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == queued


def test_spool_handler_answers_451_when_the_store_fails(
    runtime: str, tmp_path: Path, fmt: str
) -> None:
    adapter = importlib.import_module(f"mailwire.adapters.{runtime}")
    handler = SpoolHandler(tmp_path, store_format=fmt)
    handler.store.close()  # commits now fail
    with adapter.Controller(handler, ServerConfig()) as ctl:
        host, port = ctl.addresses[0]
        with smtplib.SMTP(host, port, timeout=10) as client:
            client.ehlo("c")
            client.mail("a@b.example")
            client.rcpt("c@d.example")
            code, text = client.data(b"x\r\n")
    assert code == 451
    with opened(tmp_path, fmt) as s:
        assert s.recover() == []


def test_spool_handler_discards_aborted_message(runtime: str, tmp_path: Path, fmt: str) -> None:
    adapter = importlib.import_module(f"mailwire.adapters.{runtime}")
    handler = SpoolHandler(tmp_path, store_format=fmt, spill=10)
    try:
        with adapter.Controller(handler, ServerConfig(max_message_size=1000)) as ctl:
            host, port = ctl.addresses[0]
            with smtplib.SMTP(host, port, timeout=10) as client:
                client.ehlo("c")
                client.mail("a@b.example")
                client.rcpt("c@d.example")
                code, _ = client.data(b"x" * 50 + b"\r\n" + b"y" * 2000 + b"\r\n")
                assert code == 552
    finally:
        handler.close()
    assert handler.store.list() == [] and os.listdir(tmp_path / "tmp") == []


def test_deleted_message_file_is_reused_without_stale_bytes(tmp_path: Path) -> None:
    with DirectoryStore(tmp_path) as s:
        old = s.put(envelope(1), [b"a long message " * 100])
        inode = os.stat(Path(s.queue_dir, old)).st_ino
        s.delete(old)
        assert s.list() == []
        (free,) = os.listdir(s.free_dir)
        assert os.path.getsize(Path(s.free_dir, free)) == 0  # content removed at delete
        new = s.put(envelope(2), [b"short"])
        assert os.stat(Path(s.queue_dir, new)).st_ino == inode
        assert s.get(new).content == b"short"
        assert os.listdir(s.free_dir) == []


def test_preallocated_files_are_used_and_never_listed(tmp_path: Path) -> None:
    with DirectoryStore(tmp_path, preallocate=3) as s:
        assert len(os.listdir(s.free_dir)) == 3
        assert s.recover() == []
        queue_id = s.put(envelope(), [b"x"])
        assert len(os.listdir(s.free_dir)) == 2
        assert s.list() == [queue_id]
    with DirectoryStore(tmp_path, preallocate=3) as s:  # reopened: the pool is found again
        assert len(os.listdir(s.free_dir)) == 3
        assert s.recover() == [queue_id]


# --- the public module ----------------------------------------------------------------------


def test_public_spool_module_exports_the_stores_and_the_handler() -> None:
    import mailwire.adapters._segstore as segstore
    import mailwire.adapters._spool as spool_impl
    import mailwire.adapters.spool as public

    assert sorted(public.__all__) == [
        "DirectoryStore",
        "LogStore",
        "MessageStore",
        "MessageWriter",
        "SpoolEnvelope",
        "SpoolError",
        "SpoolHandler",
        "StoredMessage",
        "detect_format",
        "open_store",
    ]
    for name in public.__all__:
        origin = segstore if name == "LogStore" else spool_impl
        assert getattr(public, name) is getattr(origin, name), name


def test_importing_the_spool_loads_no_event_loop_library() -> None:
    code = (
        "import sys, mailwire.adapters.spool; "
        "print(sorted(m for m in ('asyncio', 'trio', 'anyio') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_spool_handler_on_asyncio_imported_after_the_spool(tmp_path: Path) -> None:
    """when_done() finds the running asyncio loop although asyncio was imported after it."""
    code = textwrap.dedent(
        """
        import inspect, smtplib, sys
        from mailwire.adapters.spool import SpoolHandler
        from mailwire.adapters.asyncio import Controller
        from mailwire.protocol import ServerConfig
        awaited = []
        class Handler(SpoolHandler):  # records whether the loop was found (an awaitable)
            def on_message_end(self, session):
                result = super().on_message_end(session)
                awaited.append(inspect.isawaitable(result))
                return result
        handler = Handler(sys.argv[1], store_format="log")
        with Controller(handler, ServerConfig(hostname="mx.test")) as server:
            with smtplib.SMTP(*server.addresses[0], timeout=10) as client:
                body = b"Subject: x\\r\\n\\r\\nhi\\r\\n"
                client.sendmail("a@example.org", ["b@example.net"], body)
        ids = handler.store.list()
        print(len(ids), awaited, handler.store.get(ids[0]).content)
        handler.close()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "spool")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out.strip() == "1 [True] b'Subject: x\\r\\n\\r\\nhi\\r\\n'"

"""SMTP servers to benchmark, each in its own process, and Postfix's smtp-source to load them.

Every server under test runs in a child process (``python _peers.py serve NAME [DIR]``) that
binds 127.0.0.1 on a kernel-assigned port and prints ``PORT <n>``: the harness process stays
out of their way (no shared GIL, no shared garbage collector), and all of them can be up at
once so repetitions can be interleaved.

    peers = Peers()
    port = peers.start("mailwire-asyncio")
    seconds = smtp_source(port, messages=2000, size=1024, sessions=20)
    peers.stop_all()

Servers (NAMES): Postfix's ``smtp-sink`` (C, discards), ``aiosmtpd`` with a do-nothing
handler, mailwire on each runtime with the base Handler, which discards the message
(``mailwire-asyncio``, ``mailwire-asyncio-uvloop``, ``mailwire-trio``, ``mailwire-threads``;
the driver skips the message hooks a handler leaves as Handler's own, so this is mailwire's
floor), mailwire with a real handler, ``MessageHandler`` with a no-op callback, which
overrides the message hooks and collects the content (``mailwire-<runtime>-msg``: what an
application pays), and mailwire with the durable spool, fsync on:
``mailwire-spool-<runtime>`` with the one-file-per-message DirectoryStore,
``mailwire-log-<runtime>`` with the segment-log LogStore (adapters/_segstore.py); the spool
directory is the optional DIR.  ``floor-<runtime>`` is not mailwire: a responder that parses
nothing (_floor.py), each runtime's own cost per message; ``floor-<runtime>-work`` adds
``MAILWIRE_FLOOR_WORK_US`` (default 12) microseconds of pure-Python work per read.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
RUNTIMES = ("asyncio", "trio", "threads")
NAMES = (
    "smtp-sink",
    "aiosmtpd",
    "mailwire-asyncio",
    "mailwire-asyncio-uvloop",
    "mailwire-trio",
    "mailwire-threads",
    "mailwire-threads-unpinned",
    *(f"mailwire-{r}-msg" for r in RUNTIMES),
    *(f"mailwire-spool-{r}" for r in RUNTIMES),
    *(f"mailwire-log-{r}" for r in RUNTIMES),
    *(f"floor-{r}" for r in RUNTIMES),
    *(f"floor-{r}-work" for r in RUNTIMES),
)
SENDER = "from@source.example"
RECIPIENT = "to@sink.example"


def have_smtp_source() -> bool:
    """True when Postfix's smtp-source (and smtp-sink) are installed."""
    return os.access(SMTP_SOURCE, os.X_OK) and os.access(SMTP_SINK, os.X_OK)


def have_postfix() -> bool:
    """True when a private Postfix instance can be started (postfix installed, running as
    root, a ``postfix`` user exists)."""
    import pwd

    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return False
    return os.geteuid() == 0 and os.access(POSTFIX, os.X_OK)


_POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.bench
mydomain = bench
mydestination =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_client_message_rate_limit = 0
default_process_limit = 100
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
default_transport = discard
local_transport = discard
relay_transport = discard
"""
_POSTFIX_MASTER = """\
127.0.0.1:{port} inet n - n - 100 smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
proxymap  unix  - - n - - proxymap
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
discard   unix  - - n - - discard
postlog   unix-dgram n - n - 1 postlogd
"""


def _postfix(directory: str, command: str) -> None:
    # postfix only reports on a terminal or to syslog; `script` gives it a terminal
    cmd = f"{POSTFIX} -c {directory}/etc {command}"
    proc = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        raise RuntimeError(f"postfix {command} failed: {proc.stdout.strip()[-300:]}")


def have_uvloop() -> bool:
    """True when the optional uvloop extra is installed."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def smtp_source(
    port: int, *, messages: int, size: int, sessions: int, reuse: bool = True, timeout: float = 300
) -> float:
    """Send ``messages`` messages of ``size`` payload octets over ``sessions`` parallel
    sessions with smtp-source; returns the wall-clock seconds (see smtp_source_timed)."""
    seconds, _ = smtp_source_timed(
        port, messages=messages, size=size, sessions=sessions, reuse=reuse, timeout=timeout
    )
    return seconds


def smtp_source_timed(
    port: int, *, messages: int, size: int, sessions: int, reuse: bool = True, timeout: float = 300
) -> tuple[float, float]:
    """Send ``messages`` messages of ``size`` payload octets over ``sessions`` parallel
    sessions with smtp-source; returns (wall-clock seconds, smtp-source's CPU seconds).

    smtp-source's CPU (user + system) is the growth of this process's RUSAGE_CHILDREN
    across the run: it counts every child reaped meanwhile, which is smtp-source alone as
    long as no other child of the caller exits during the run (the servers stay up).

    Args:
        port: the server's port on 127.0.0.1.
        messages: total messages (smtp-source's -m).
        size: payload octets per message (smtp-source's -l; headers come on top).
        sessions: parallel sessions (-s).
        reuse: send every message of a session over one connection (-d); otherwise one
            connection per message.

    Raises:
        RuntimeError: smtp-source failed (a server answered something unexpected).
    """
    cmd = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    cmd += ["-f", SENDER, "-t", RECIPIENT, "-M", "source.example"]
    if reuse:
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{port}")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({proc.returncode}): {proc.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


@dataclass
class Peers:
    """Started servers, by name; stop_all() ends them."""

    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    tmpdirs: list[tempfile.TemporaryDirectory[str]] = field(default_factory=list)
    postfix_dir: str | None = None

    def start(
        self, name: str, spool_dir: str | None = None, env: dict[str, str] | None = None
    ) -> int:
        """Start server ``name`` (one of NAMES) and return its port.

        Raises:
            RuntimeError: it did not come up.
        """
        if name == "postfix":
            return self._start_postfix(spool_dir)
        if name == "smtp-sink":
            port = _free_port()
            cmd = [SMTP_SINK]
            if os.geteuid() == 0:
                cmd += ["-u", "nobody"]
            cmd += [f"127.0.0.1:{port}", "1024"]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, text=True)
            _wait_listening(port, proc)
        else:
            if _durable(name) and spool_dir is None:
                tmp = tempfile.TemporaryDirectory(prefix="mailwire-bench-spool-")
                self.tmpdirs.append(tmp)
                spool_dir = tmp.name
            cmd = [sys.executable, os.path.abspath(__file__), "serve", name]
            if spool_dir is not None:
                cmd.append(spool_dir)
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                text=True,
                env=None if env is None else {**os.environ, **env},
            )
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("PORT "):
                proc.kill()
                raise RuntimeError(f"{name} did not start: {line!r}")
            port = int(line.split()[1])
        self.procs[name] = proc
        self.ports[name] = port
        return port

    def _start_postfix(self, parent: str | None) -> int:
        """A private Postfix (smtpd, cleanup with its fsync, qmgr, discard delivery) in a
        temporary directory: the durable-acceptance reference for issue 6."""
        tmp = tempfile.TemporaryDirectory(prefix="mailwire-bench-postfix-", dir=parent)
        self.tmpdirs.append(tmp)
        d = tmp.name
        os.chmod(d, 0o755)
        for sub in ("etc", "queue", "data"):
            os.makedirs(os.path.join(d, sub))
        for extra in ("dynamicmaps.cf", "dynamicmaps.cf.d", "postfix-files", "postfix-files.d"):
            src = os.path.join("/etc/postfix", extra)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(d, "etc", extra))
            elif os.path.exists(src):
                shutil.copy(src, os.path.join(d, "etc", extra))
        port = _free_port()
        with open(os.path.join(d, "etc", "main.cf"), "w") as f:
            f.write(_POSTFIX_MAIN.format(dir=d))
        with open(os.path.join(d, "etc", "master.cf"), "w") as f:
            f.write(_POSTFIX_MASTER.format(port=port))
        shutil.chown(os.path.join(d, "data"), user="postfix")
        _postfix(d, "post-install create-missing")
        _postfix(d, "start")
        self.postfix_dir = d
        self.ports["postfix"] = port
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.recv(100)
                    s.sendall(b"QUIT\r\n")
                    break
            except OSError:
                time.sleep(0.05)  # startup poll of the daemon, not a test sleep
        return port

    def postfix_cpu_seconds(self) -> float:
        """CPU seconds used so far by every process of the private Postfix instance."""
        d = self.postfix_dir
        assert d is not None
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if d.encode() in cmdline or _postfix_child(pid, d):
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def stop(self, name: str) -> None:
        """Stop one server."""
        if name == "postfix":
            if self.postfix_dir is not None:
                _postfix(self.postfix_dir, "stop")
                self.postfix_dir = None
            self.ports.pop(name, None)
            return
        proc = self.procs.pop(name, None)
        self.ports.pop(name, None)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def stop_all(self) -> None:
        """Stop every server and remove temporary spools."""
        for name in list(self.procs) + (["postfix"] if self.postfix_dir else []):
            self.stop(name)
        for tmp in self.tmpdirs:
            tmp.cleanup()
        self.tmpdirs.clear()

    def pid(self, name: str) -> int:
        """The process id of a started server (for profilers)."""
        return self.procs[name].pid

    def cpu_seconds(self, name: str) -> float:
        """User + system CPU time the server process (all its threads) has used so far."""
        if name == "postfix":
            return self.postfix_cpu_seconds()
        user, system = self.cpu_split(name)
        return user + system

    def cpu_split(self, name: str) -> tuple[float, float]:
        """(user, system) CPU seconds the server process has used so far (Linux /proc)."""
        with open(f"/proc/{self.pid(name)}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick


def _postfix_child(pid: str, directory: str) -> bool:
    # Postfix daemons do not show the config directory on their command line; they inherit
    # MAIL_CONFIG from master.
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"MAIL_CONFIG={directory}/etc".encode() in f.read()
    except OSError:
        return False


def _durable(name: str) -> bool:
    """A mailwire server with a durable store (spool or log)."""
    return name.startswith(("mailwire-spool-", "mailwire-log-"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[str], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(100)  # the greeting
                s.sendall(b"QUIT\r\n")
                return
        except OSError:
            time.sleep(0.02)  # startup poll of a child process, not a test sleep
    proc.kill()
    raise RuntimeError(f"nothing listening on port {port}")


# --- the child side: `python _peers.py serve NAME [DIR]` ----------------------------------------


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


def _announce(sock: socket.socket) -> None:
    sys.stdout.write(f"PORT {sock.getsockname()[1]}\n")
    sys.stdout.flush()


def _serve_aiosmtpd() -> None:
    import asyncio

    from aiosmtpd.smtp import SMTP

    class DoNothing:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 OK"

    async def main() -> None:
        sock = _listening_socket()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(DoNothing(), hostname="aiosmtpd.bench"), sock=sock
        )
        _announce(sock)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _time_engine(path: str) -> None:
    """Accumulate the wall time spent inside ServerConnection's entry points (the engine) and
    write it to ``path`` at SIGTERM: engine vs adapter split for profiling."""
    import json
    from collections.abc import Callable
    from typing import Any

    from mailwire.protocol._server import ServerConnection

    total = [0.0, 0]
    clock = time.perf_counter

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                total[0] += clock() - start
                total[1] += 1

        return timed

    for attr in ("receive_data", "receive_eof", "next_event", "send", "data_to_send"):
        setattr(ServerConnection, attr, wrap(getattr(ServerConnection, attr)))

    def dump(*_: object) -> None:
        with open(path, "w") as f:
            json.dump({"engine_seconds": total[0], "calls": total[1]}, f)
        os._exit(0)

    signal.signal(signal.SIGTERM, dump)


def _profile(path: str) -> None:
    """cProfile the server from SIGUSR1 (after a warm-up) to SIGTERM, then write the stats to
    ``path`` (``python -m pstats PATH``).  Call counts are exact; times are inflated by the
    profiler, more so for call-heavy code: compare runtimes by counts, not seconds."""
    import cProfile

    prof = cProfile.Profile()

    def dump(*_: object) -> None:
        prof.disable()
        prof.dump_stats(path)
        os._exit(0)

    signal.signal(signal.SIGTERM, dump)
    signal.signal(signal.SIGUSR1, lambda *_: prof.enable())


def _serve_mailwire(name: str, spool_dir: str | None) -> None:
    import importlib

    if os.environ.get("MAILWIRE_BENCH_ENGINE_TIMES"):
        _time_engine(os.environ["MAILWIRE_BENCH_ENGINE_TIMES"])

    from mailwire.adapters._driver import Handler, MessageHandler
    from mailwire.protocol import ServerConfig

    runtime = name.rsplit("-", 1)[-1] if _durable(name) else name.split("-")[1]
    handler: Handler
    if name.startswith("mailwire-log-"):
        from mailwire.adapters._spool import SpoolHandler

        assert spool_dir is not None
        handler = SpoolHandler(spool_dir, store_format="log")
    elif _durable(name):
        from mailwire.adapters._spool import SpoolHandler

        assert spool_dir is not None
        prealloc = int(os.environ.get("MAILWIRE_BENCH_SPOOL_PREALLOCATE", "0"))
        handler = SpoolHandler(spool_dir, preallocate=prealloc)
    elif name.endswith("-msg"):
        # a real handler: the message hooks are overridden, so the driver calls them for
        # every message (and chunk) and the content is joined for the callback
        handler = MessageHandler(lambda data, envelope: None)
    else:
        handler = Handler()  # the base Handler discards every message
    config = ServerConfig(hostname="mailwire.bench")
    adapter = importlib.import_module(f"mailwire.adapters.{runtime}")
    sock = _listening_socket()
    _announce(sock)
    if runtime == "asyncio":
        import asyncio

        coro = adapter.serve(handler, config, sockets=[sock])
        if name.endswith("uvloop"):
            import uvloop

            uvloop.run(coro)
        else:
            asyncio.run(coro)
    elif runtime == "trio":
        import trio

        trio.run(lambda: adapter.serve(handler, config, sockets=[sock]))
    else:  # session threads share one CPU unless "-unpinned" (adapters/threads.py)
        pin = not name.endswith("-unpinned")
        adapter.serve(handler, config, sockets=[sock], pin_sessions=pin)


def main(argv: list[str]) -> None:
    """Child entry point: ``serve NAME [DIR]``."""
    if len(argv) < 2 or argv[0] != "serve" or argv[1] not in NAMES or argv[1] == "smtp-sink":
        raise SystemExit("usage: _peers.py serve NAME [SPOOL_DIR]")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if os.environ.get("MAILWIRE_BENCH_PROFILE"):
        _profile(os.environ["MAILWIRE_BENCH_PROFILE"])
    if argv[1] == "aiosmtpd":
        _serve_aiosmtpd()
    elif argv[1].startswith("floor-"):
        runtime, _, work = argv[1][6:].partition("-")
        if work:  # Python work per read standing in for parsing (default: about mailwire's)
            os.environ.setdefault("MAILWIRE_FLOOR_WORK_US", "12")
        else:
            os.environ["MAILWIRE_FLOOR_WORK_US"] = "0"
        import _floor

        sock = _listening_socket()
        _announce(sock)
        getattr(_floor, f"serve_{runtime}")(sock)
    else:
        _serve_mailwire(argv[1], argv[2] if len(argv) > 2 else None)


if __name__ == "__main__":
    main(sys.argv[1:])

"""End-to-end SMTP throughput, side by side in one run: Postfix's smtp-source as the load
generator against smtp-sink, aiosmtpd and mailwire on each runtime (issue 4), and the durable
spool with fsync on (issue 6).

    python benchmarks/run_e2e.py [--repeat 3] [--scale 1.0] [--no-spool | --spool-only]
        [--spool-preallocate N] [--no-postfix] [--no-reuse] [--spool-dir DIR]
        [--stores files,log] [--msg-all] [--floor]

The discard table runs mailwire twice on asyncio: ``asyncio`` with the base Handler (the
driver skips the message hooks it does not override: mailwire's floor) and ``asyncio-msg``
with MessageHandler and a no-op callback (the hooks are called and the content is joined:
what an application pays; compare it with aiosmtpd, whose handle_DATA gets the content too).
``--msg-all`` adds ``trio-msg`` and ``threads-msg``.  ``threads-unpinned`` is the threads
adapter with ``pin_sessions=False`` (its session threads spread over the cores; see
adapters/threads.py for why they share one by default).

``--floor`` adds each runtime's floor (_floor.py: a responder that parses nothing, its I/O
done the way mailwire's adapter does it) bare and with 12 us of pure-Python work per read
(about what mailwire's engine and driver spend): what the runtime itself costs, and how that
grows when every read holds the GIL for a while.  Their ratios show which part of a
runtime-to-runtime ratio belongs to the runtime and which to the adapter.

Besides each server's CPU per message, the tables show smtp-source's own (user + system, from
RUSAGE_CHILDREN): the load generator shares the 2 cores with the server under test.

The durable table compares both spool backends with Postfix: ``spool-*`` is DirectoryStore
(a file per message), ``log-*`` is LogStore (a segment log, adapters/_segstore.py).  Before
it, a probe measures the disk's state where the spools live (kernel CPU to create an empty
file, latency of a 1 KB append + fdatasync) and calls it warm or cold: on this machine's
journal-less ext4, creating files right after many deletions is slow for minutes, which
hurts any file-per-message store (DirectoryStore, Postfix) but not the log.

Each server runs in its own process; repetitions are interleaved (every server once per
round) and the table shows the median messages/s of the rounds and ratios computed from those
medians.  The machines here have 2 shared cores, shared with smtp-source: compare ratios
from one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _peers import (  # noqa: E402
    RUNTIMES,
    Peers,
    have_postfix,
    have_smtp_source,
    have_uvloop,
    smtp_source_timed,
)

Results = dict[tuple[str, str], float | str]

# (label, payload octets, sessions, messages per measurement at scale 1)
CASES = [
    ("1 KB, 1 session", 1024, 1, 2000),
    ("1 KB, 20 sessions", 1024, 20, 3000),
    ("100 KB, 1 session", 100 * 1024, 1, 400),
    ("100 KB, 20 sessions", 100 * 1024, 20, 400),
]
SPOOL_CASES = [
    ("1 KB, 1 session", 1024, 1, 200),
    ("1 KB, 20 sessions", 1024, 20, 1000),
    ("100 KB, 20 sessions", 100 * 1024, 20, 400),
]
SHORT = {
    "smtp-sink": "sink",
    "aiosmtpd": "aiosmtpd",
    "mailwire-asyncio": "asyncio",
    "mailwire-asyncio-uvloop": "uvloop",
    "mailwire-trio": "trio",
    "mailwire-threads": "threads",
    "mailwire-threads-unpinned": "threads-unpinned",
    "mailwire-asyncio-msg": "asyncio-msg",
    "mailwire-trio-msg": "trio-msg",
    "mailwire-threads-msg": "threads-msg",
    "mailwire-spool-asyncio": "spool-asyncio",
    "mailwire-spool-trio": "spool-trio",
    "mailwire-spool-threads": "spool-threads",
    "mailwire-log-asyncio": "log-asyncio",
    "mailwire-log-trio": "log-trio",
    "mailwire-log-threads": "log-threads",
    **{f"floor-{r}{w}": f"floor-{r}{w}" for w in ("", "-work") for r in RUNTIMES},
    "postfix": "postfix",
}


def measure(
    peers: Peers,
    names: list[str],
    cases: list[tuple[str, int, int, int]],
    repeat: int,
    scale: float,
    reuse: bool,
) -> tuple[Results, Results, Results]:
    """Per (case label, server): median messages/s, median server CPU microseconds per
    message (user + system, all threads of the server process) and median smtp-source CPU
    microseconds per message; a string when it failed."""
    rates: dict[tuple[str, str], list[float]] = {}
    cpus: dict[tuple[str, str], list[float]] = {}
    source_cpus: dict[tuple[str, str], list[float]] = {}
    failed: dict[tuple[str, str], str] = {}
    for _ in range(repeat):
        for label, size, sessions, messages in cases:
            n = max(sessions, int(messages * scale))
            for name in names:
                key = (label, name)
                if key in failed or name not in peers.ports:
                    continue
                cpu = peers.cpu_seconds(name)
                try:
                    seconds, source_cpu = smtp_source_timed(
                        peers.ports[name], messages=n, size=size, sessions=sessions, reuse=reuse
                    )
                except RuntimeError as exc:
                    failed[key] = str(exc).splitlines()[0][:60]
                    continue
                rates.setdefault(key, []).append(n / seconds)
                cpus.setdefault(key, []).append((peers.cpu_seconds(name) - cpu) / n * 1e6)
                source_cpus.setdefault(key, []).append(source_cpu / n * 1e6)
    out_rates: Results = dict(failed)
    out_cpus: Results = dict(failed)
    out_source: Results = dict(failed)
    for key, values in rates.items():
        out_rates[key] = statistics.median(values)
        out_cpus[key] = statistics.median(cpus[key])
        out_source[key] = statistics.median(source_cpus[key])
    return out_rates, out_cpus, out_source


SOURCE_HEADER = """\
## smtp-source's own CPU per message against each server, microseconds (user + system of the
## load generator, from RUSAGE_CHILDREN). It shares the 2 cores with the server under test:
## messages/s <= 2 s / (server + smtp-source CPU per message), and with one session (the two
## take turns) about 1 s / their sum.
"""


def ratio(a: float | str | None, b: float | str | None) -> str:
    if isinstance(a, float) and isinstance(b, float) and b > 0:
        return f"{a / b:.2f}x"
    return "-"


def table(
    names: list[str],
    cases: list[tuple[str, int, int, int]],
    results: dict[tuple[str, str], float | str],
    ratios: list[tuple[str, str, str]],
    digits: int = 0,
) -> str:
    head = ["case"] + [SHORT[n] for n in names] + [r[0] for r in ratios]
    rows = [head]
    for label, *_ in cases:
        row = [label]
        for name in names:
            v = results.get((label, name))
            row.append(f"{v:.{digits}f}" if isinstance(v, float) else "failed" if v else "-")
        for _, num, den in ratios:
            row.append(ratio(results.get((label, num)), results.get((label, den))))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        " | ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    errors = [f"  {k[1]} on {k[0]}: {v}" for k, v in results.items() if isinstance(v, str)]
    return "\n".join(lines + (["failures:"] + errors if errors and not digits else []))


def disk_probe(parent: str, files: int = 1000) -> str:
    """One line on the state of the disk under ``parent``: kernel CPU per file creation
    (fsync of the directory included), median 1 KB append + fdatasync, and warm/cold (cold:
    creating a file costs >= 300 us of kernel CPU, the slow state after mass deletions)."""
    d = tempfile.mkdtemp(prefix="mailwire-probe-", dir=parent)
    try:
        before = os.times()
        for i in range(files):
            os.close(os.open(os.path.join(d, f"f{i}"), os.O_WRONLY | os.O_CREAT, 0o600))
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
        create_us = (os.times().system - before.system) / files * 1e6
        fd = os.open(os.path.join(d, "f0"), os.O_WRONLY | os.O_APPEND)
        lat = []
        for _ in range(50):
            os.write(fd, b"x" * 1024)
            t = time.perf_counter()
            os.fdatasync(fd)
            lat.append(time.perf_counter() - t)
        os.close(fd)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    state = "cold" if create_us >= 300 else "warm"
    return (
        f"disk probe in {parent}: {create_us:.0f} us kernel CPU per file creation, "
        f"{statistics.median(lat) * 1e3:.2f} ms per 1 KB append + fdatasync (median): {state}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds (median is reported)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    parser.add_argument("--no-spool", action="store_true", help="skip the durable spool table")
    parser.add_argument("--spool-only", action="store_true", help="only the durable spool table")
    parser.add_argument("--no-reuse", action="store_true", help="one connection per message")
    parser.add_argument("--spool-dir", help="parent directory for spools (default: $TMPDIR)")
    parser.add_argument(
        "--spool-preallocate",
        type=int,
        default=0,
        metavar="N",
        help="empty files the spool creates at start-up for reuse (default 0)",
    )
    parser.add_argument(
        "--no-postfix", action="store_true", help="skip the private Postfix instance"
    )
    parser.add_argument(
        "--msg-all",
        action="store_true",
        help="MessageHandler peers on trio and threads too (default: asyncio only)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="add each runtime's floor: a responder that parses nothing (bare and with work)",
    )
    parser.add_argument(
        "--stores",
        default="files,log",
        help="spool backends in the durable table: files (DirectoryStore), log (LogStore)",
    )
    args = parser.parse_args()
    if not have_smtp_source():
        raise SystemExit("smtp-source/smtp-sink not installed (Debian package postfix)")

    names = ["smtp-sink", "aiosmtpd", "mailwire-asyncio"]
    if have_uvloop():
        names.append("mailwire-asyncio-uvloop")
    names += ["mailwire-trio", "mailwire-threads", "mailwire-threads-unpinned"]
    names.append("mailwire-asyncio-msg")
    if args.msg_all:
        names += ["mailwire-trio-msg", "mailwire-threads-msg"]
    if args.floor:
        names += [f"floor-{r}{w}" for w in ("", "-work") for r in RUNTIMES]
    print(
        f"# {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs (shared with smtp-source), {platform.platform()}"
    )
    mode = "one connection per message" if args.no_reuse else "-d (messages back to back)"
    print(
        f"# smtp-source {mode}; HELO, no pipelining; "
        f"median of {args.repeat} interleaved rounds; messages/s"
    )
    peers = Peers()
    try:
        if not args.spool_only:
            for name in names:
                peers.start(name)
            start = time.perf_counter()
            results, cpu, source = measure(
                peers, names, CASES, args.repeat, args.scale, not args.no_reuse
            )
            ratios = [
                ("asyncio/aiosmtpd", "mailwire-asyncio", "aiosmtpd"),
                ("trio/asyncio", "mailwire-trio", "mailwire-asyncio"),
                ("threads/asyncio", "mailwire-threads", "mailwire-asyncio"),
                ("unpinned/asyncio", "mailwire-threads-unpinned", "mailwire-asyncio"),
            ]
            if "mailwire-asyncio-uvloop" in names:
                ratios += [
                    ("uvloop/aiosmtpd", "mailwire-asyncio-uvloop", "aiosmtpd"),
                    ("uvloop/sink", "mailwire-asyncio-uvloop", "smtp-sink"),
                ]
            ratios.append(("asyncio/sink", "mailwire-asyncio", "smtp-sink"))
            ratios += [
                ("asyncio-msg/asyncio", "mailwire-asyncio-msg", "mailwire-asyncio"),
                ("asyncio-msg/aiosmtpd", "mailwire-asyncio-msg", "aiosmtpd"),
            ]
            if args.floor:
                ratios += [
                    (f"floor{w} {r}/asyncio", f"floor-{r}{w}", f"floor-asyncio{w}")
                    for w in ("", "-work")
                    for r in ("trio", "threads")
                ]
            print("\n## discard handler (targets: asyncio >= 2.5x aiosmtpd; trio, threads >= 0.8x")
            print("## asyncio; uvloop >= 0.8x smtp-sink on 1 KB); *-msg: MessageHandler with a")
            print("## no-op callback (the message hooks run, the content is collected)\n")
            print(table(names, CASES, results, ratios))
            print("\n## server CPU per message, microseconds (user + system; lower is better;")
            print("## ratios are CPU-efficiency ratios: den/num, i.e. how many times cheaper;")
            print("## smtp-source's own CPU, on the same 2 cores, is in the next table)\n")
            print(table(names, CASES, cpu, [(n, d, m) for n, m, d in ratios], digits=1))
            print("\n" + SOURCE_HEADER)
            print(table(names, CASES, source, [], digits=1))
            print(f"\n({time.perf_counter() - start:.0f} s)")
            peers.stop_all()

        if not args.no_spool:
            spool_parent = args.spool_dir or tempfile.gettempdir()
            stores = args.stores.split(",")
            spool_names = [
                f"mailwire-{prefix}-{r}"
                for store, prefix in (("files", "spool"), ("log", "log"))
                if store in stores
                for r in ("asyncio", "trio", "threads")
            ]
            tmp = tempfile.TemporaryDirectory(prefix="mailwire-spools-", dir=spool_parent)
            env = {"MAILWIRE_BENCH_SPOOL_PREALLOCATE": str(args.spool_preallocate)}
            for name in spool_names:
                peers.start(name, os.path.join(tmp.name, name), env=env)
            spool_ratios: list[tuple[str, str, str]] = []
            if have_postfix() and not args.no_postfix:
                peers.start("postfix", spool_parent)
                spool_names.append("postfix")
                spool_ratios = [(f"{SHORT[n]}/postfix", n, "postfix") for n in spool_names[:-1]]
            probe_before = disk_probe(spool_parent)
            start = time.perf_counter()
            results, cpu, source = measure(
                peers, spool_names, SPOOL_CASES, args.repeat, args.scale, True
            )
            print(f"\n## durable acceptance, fsync on, in {spool_parent}: mailwire's spool-* (file")
            print("## per message + directory fsync, group commit) and log-* (segment log, one")
            print("## fdatasync per group commit) vs Postfix (smtpd -> cleanup, fsync per file;")
            print("## qmgr to discard). Target (issue 6): >= 3x Postfix on 1 KB, 20 sessions.")
            print(f"## Spool preallocation (spool-* only): {args.spool_preallocate} files.")
            print(f"## before: {probe_before}")
            print(f"## after:  {disk_probe(spool_parent)}\n")
            print(table(spool_names, SPOOL_CASES, results, spool_ratios))
            print(
                "\nserver CPU us/message (Postfix: all its processes, delivery to discard too):\n"
            )
            cpu_ratios = [(n, d, m) for n, m, d in spool_ratios]
            print(table(spool_names, SPOOL_CASES, cpu, cpu_ratios, digits=1))
            print("\n" + SOURCE_HEADER)
            print(table(spool_names, SPOOL_CASES, source, [], digits=1))
            print(f"\n({time.perf_counter() - start:.0f} s)")
            peers.stop_all()
            tmp.cleanup()
    finally:
        peers.stop_all()


if __name__ == "__main__":
    main()

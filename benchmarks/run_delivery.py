"""Delivery throughput with connection reuse on and off: mailwire's delivery agents (anyio on
asyncio, anyio on trio, threads) sending 1 KB messages to one MX over loopback.

    python benchmarks/run_delivery.py [--repeat 5] [--messages 200] [--quick]
        [--receiver smtp-sink|mailwire-threads]

Setup, all on 127.0.0.1:

* DNS: tests/dnsserver.py's authoritative server in a child process (``run_delivery.py dns``)
  answers ``bench.test MX 10 mx.bench.test.`` and ``mx.bench.test A 127.0.0.1``; the agent
  routes by MX (no transport map), with ``routing.smtp_port`` set to the receiver's port.
  The agent's DNS cache means one MX and one address lookup per measurement.
* Receiver: a separate process, Postfix's ``smtp-sink`` (C, discards) when installed,
  otherwise mailwire's threads server with the base Handler (``_peers.py``).
* Agent: in this process, a fresh DirectoryStore spool (fsync off) per measurement; the
  messages (one recipient each, ``u<i>@bench.test``) are submitted first, then one timed
  ``run_once()`` delivers them all.  Reuse on is the default connection cache
  (``connection_cache_time=2.0``, ``connection_reuse_limit=100``: a session carries 101
  messages at most); off is ``connection_cache_time=0`` (a connection, greeting, EHLO and
  QUIT per message).  Concurrency is the destination's ``destination_concurrency`` (1 or 20
  deliveries in flight to the MX).  Outbound STARTTLS is off (neither receiver offers it).

Every round runs every (agent, concurrency, reuse) once, interleaved, the reuse order
alternating between rounds; the tables show medians of the rounds and ratios of those
medians.  Three metrics: messages/s (wall clock of run_once), the agent's CPU per message
(this process, all threads: ``time.process_time``) and the receiver's (its process, from
/proc).  The machine has 2 shared cores: the agent, the receiver and the DNS server share
them, so compare ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _peers import Peers, have_smtp_source  # noqa: E402

AGENTS = ("anyio-asyncio", "anyio-trio", "threads")
CONCURRENCY = (1, 20)
SENDER = "a@sender.test"
DOMAIN = "bench.test"
ZONE = {
    DOMAIN: {"MX": [f"10 mx.{DOMAIN}."]},
    f"mx.{DOMAIN}": {"A": ["127.0.0.1"]},
}


def message(size: int = 1024) -> bytes:
    """A message of exactly ``size`` octets, CRLF lines of at most 80 octets."""
    head = f"From: {SENDER}\r\nTo: u@{DOMAIN}\r\nSubject: bench\r\n\r\n".encode()
    lines = []
    left = size - len(head)
    while left > 0:
        n = min(80, left) if left != 81 else 79  # never a 1-octet last line
        lines.append(b"x" * (n - 2) + b"\r\n")
        left -= n
    body = head + b"".join(lines)
    assert len(body) == size
    return body


def default_receiver() -> str:
    """smtp-sink when Postfix's tools are installed, else mailwire's threads server."""
    return "smtp-sink" if have_smtp_source() else "mailwire-threads"


# --- the DNS server, a child process ----------------------------------------------------------


class DNSProcess:
    """tests/dnsserver.py's DNSServer serving ZONE in a child process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "dns"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"the DNS server did not start: {line!r}")
        self.nameserver = ("127.0.0.1", int(line.split()[1]))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _serve_dns() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from dnsserver import DNSServer  # type: ignore[import-not-found,unused-ignore]

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    with DNSServer(ZONE) as server:
        sys.stdout.write(f"PORT {server.port}\n")
        sys.stdout.flush()
        while True:
            signal.pause()


# --- one measurement --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """One timed run_once(): wall seconds, agent CPU seconds, connections reused."""

    seconds: float
    cpu: float
    reused: int


def deliver(
    kind: str,
    *,
    reuse: bool,
    concurrency: int,
    messages: int,
    port: int,
    nameserver: tuple[str, int],
    content: bytes | None = None,
) -> Result:
    """Submit ``messages`` messages to a fresh agent of ``kind`` (one of AGENTS), then time
    one run_once() that delivers them all.

    Raises:
        RuntimeError: not every message was delivered.
    """
    from mailwire.adapters._delivery import DeliveryConfig, TLSPolicy
    from mailwire.adapters._delivery_anyio import DeliveryAgent
    from mailwire.adapters._delivery_threads import BlockingDeliveryAgent
    from mailwire.adapters._spool import DirectoryStore
    from mailwire.protocol._events import MailFrom, RcptTo
    from mailwire.protocol._queue import RetryPolicy
    from mailwire.protocol._routing import AddressPreference, RoutingConfig

    body = content if content is not None else message()
    config = DeliveryConfig(
        hostname="mta.test",
        routing=RoutingConfig(
            hostname="mta.test",
            smtp_port=port,
            address_preference=AddressPreference.PREFER_IPV4,
        ),
        nameservers=(nameserver,),
        retry=RetryPolicy(destination_concurrency=concurrency),
        tls=TLSPolicy.NONE,
        connect_timeout=10.0,
        reply_timeout=30.0,
        connection_cache_time=2.0 if reuse else 0.0,
    )
    sender = MailFrom(address=SENDER)
    rcpts = [[RcptTo(address=f"u{i}@{DOMAIN}")] for i in range(messages)]
    with tempfile.TemporaryDirectory(prefix="mailwire-bench-delivery-") as tmp:
        store = DirectoryStore(tmp, fsync=False)
        try:
            if kind == "threads":
                blocking = BlockingDeliveryAgent(store, config)
                for r in rcpts:
                    blocking.submit(sender, r, body)
                cpu0, t0 = time.process_time(), time.perf_counter()
                done = blocking.run_once()
                seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                blocking.close_cached()
                counters = blocking.counters
            else:
                import anyio

                agent = DeliveryAgent(store, config)

                async def main() -> tuple[int, float, float]:
                    for r in rcpts:
                        await agent.submit(sender, r, body)
                    cpu0, t0 = time.process_time(), time.perf_counter()
                    n = await agent.run_once()
                    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                    await agent.close_cached()
                    return n, seconds, cpu

                backend = "trio" if kind == "anyio-trio" else "asyncio"
                done, seconds, cpu = anyio.run(main, backend=backend)
                counters = agent.counters
        finally:
            store.close()
    if done != messages or counters["delivered"] != messages:
        raise RuntimeError(f"{kind}: {done} of {messages} delivered: {counters}")
    if not reuse and counters["connections_reused"]:
        raise RuntimeError(f"{kind}: a connection was reused with the cache off: {counters}")
    return Result(seconds=seconds, cpu=cpu, reused=counters["connections_reused"])


# --- the table --------------------------------------------------------------------------------

Key = tuple[str, int, bool]  # agent, concurrency, reuse


def measure(
    peers: Peers,
    receiver: str,
    nameserver: tuple[str, int],
    *,
    repeat: int,
    messages: int,
) -> tuple[dict[Key, list[Result]], dict[Key, list[float]]]:
    """Interleaved rounds: per key, the agent's results and the receiver's CPU seconds."""
    port = peers.ports[receiver]
    results: dict[Key, list[Result]] = {}
    receiver_cpu: dict[Key, list[float]] = {}
    for kind in AGENTS:  # warm-up (imports, first connections), not recorded
        deliver(kind, reuse=True, concurrency=1, messages=10, port=port, nameserver=nameserver)
    for round_ in range(repeat):
        for concurrency in CONCURRENCY:
            for i, kind in enumerate(AGENTS):
                order = (True, False) if (round_ + i) % 2 else (False, True)
                for reuse in order:
                    before = peers.cpu_seconds(receiver)
                    r = deliver(
                        kind,
                        reuse=reuse,
                        concurrency=concurrency,
                        messages=messages,
                        port=port,
                        nameserver=nameserver,
                    )
                    key = (kind, concurrency, reuse)
                    receiver_cpu.setdefault(key, []).append(peers.cpu_seconds(receiver) - before)
                    results.setdefault(key, []).append(r)
    return results, receiver_cpu


def format_table(rows: list[list[str]]) -> str:
    """Columns padded, the first left-aligned, a rule under the header (run_e2e's style)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def tables(
    results: dict[Key, list[Result]], receiver_cpu: dict[Key, list[float]], messages: int
) -> str:
    """The three tables: messages/s (and connections reused), agent CPU, receiver CPU."""
    med = statistics.median

    def case(kind: str, c: int) -> str:
        return f"{kind}, {c} deliver{'y' if c == 1 else 'ies'}"

    cases = [(k, c) for c in CONCURRENCY for k in AGENTS]
    rate = [["case", "reuse on", "reuse off", "on/off", "reused (on)"]]
    agent = [["case", "reuse on", "reuse off", "off/on"]]
    recv = [["case", "reuse on", "reuse off", "off/on"]]
    for kind, c in cases:
        on, off = results[(kind, c, True)], results[(kind, c, False)]
        r_on = med(messages / r.seconds for r in on)
        r_off = med(messages / r.seconds for r in off)
        reused = med(r.reused for r in on)
        rate.append(
            [case(kind, c), f"{r_on:.0f}", f"{r_off:.0f}", f"{r_on / r_off:.2f}x", f"{reused:.0f}"]
        )
        a_on = med(r.cpu for r in on) / messages * 1e6
        a_off = med(r.cpu for r in off) / messages * 1e6
        agent.append([case(kind, c), f"{a_on:.0f}", f"{a_off:.0f}", f"{a_off / a_on:.2f}x"])
        s_on = med(receiver_cpu[(kind, c, True)]) / messages * 1e6
        s_off = med(receiver_cpu[(kind, c, False)]) / messages * 1e6
        ratio = f"{s_off / s_on:.2f}x" if s_on > 0 else "-"
        recv.append([case(kind, c), f"{s_on:.0f}", f"{s_off:.0f}", ratio])
    return "\n".join(
        [
            "## messages/s (wall clock of run_once; on/off > 1: reuse is faster); 'reused':",
            "## connections_reused counter with reuse on (median)\n",
            format_table(rate),
            "\n## agent CPU per message, microseconds (this process, all threads; user + system;",
            "## off/on: how many times cheaper reuse is)\n",
            format_table(agent),
            "\n## receiver CPU per message, microseconds (its process; clock tick 10 ms, i.e.",
            f"## {1e4 / messages:.0f} us/message resolution at {messages} messages)\n",
            format_table(recv),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["dns"]:
        _serve_dns()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds (median is reported)")
    parser.add_argument("--messages", type=int, default=200, help="messages per measurement")
    parser.add_argument(
        "--receiver",
        choices=("smtp-sink", "mailwire-threads"),
        default=default_receiver(),
        help="the MX (default: smtp-sink when installed)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, 50 messages")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.messages = 1, 50
    if args.receiver == "smtp-sink" and not have_smtp_source():
        raise SystemExit("smtp-sink not installed (Debian package postfix)")
    print(
        f"# {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs (shared by the agent, the receiver and the DNS server), "
        f"{platform.platform()}"
    )
    print(
        f"# {args.messages} x 1 KB messages (one recipient each) to one MX ({args.receiver}, "
        f"own process) found through a loopback DNS server; median of {args.repeat} "
        "interleaved rounds"
    )
    peers = Peers()
    dns = DNSProcess()
    try:
        peers.start(args.receiver)
        start = time.perf_counter()
        results, receiver_cpu = measure(
            peers, args.receiver, dns.nameserver, repeat=args.repeat, messages=args.messages
        )
        print()
        print(tables(results, receiver_cpu, args.messages))
        print(f"\n({time.perf_counter() - start:.0f} s)")
    finally:
        peers.stop_all()
        dns.stop()


if __name__ == "__main__":
    main()

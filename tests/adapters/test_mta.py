"""The whole MTA over real parts: SMTP in (smtplib), the durable spool, DNS from a loopback
authoritative server, SMTP out to a receiver on 127.0.0.x, Maildir for local domains; and
kill -9 right after the 250 -> delivered after the restart."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mailwire.adapters._delivery_anyio import DeliveryAgent
from mailwire.adapters._delivery_threads import BlockingDeliveryAgent
from mailwire.adapters._maildir import MaildirDelivery
from mailwire.adapters._spool import open_store
from mailwire.adapters.cli import Settings
from mailwire.adapters.mta import (
    MTA,
    DeliverySettings,
    add_delivery_options,
    delivery_settings,
    queue_command,
    queue_main,
    queue_total,
)
from mailwire.adapters.threads import Controller
from mailwire.protocol._config import ServerConfig
from mailwire.protocol._events import Reply

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dnsserver import DNSServer  # type: ignore[import-not-found,unused-ignore]  # noqa: E402
from test_delivery import Receiver, _free_port  # noqa: E402

ZONE = {
    "remote.test": {"MX": ["10 mx.remote.test."]},
    "mx.remote.test": {"A": ["127.0.0.3"]},
    "later.test": {"MX": ["10 mx.later.test."]},
    "mx.later.test": {"A": ["127.0.0.5"]},
}
MESSAGE = b"From: a@sender.test\r\nSubject: mta\r\n\r\nhello\r\n"


def spooled(where: MTA | Path | str) -> list[str]:
    """The queue IDs in the spool, whatever its format: through the running MTA's store, or
    by opening a stopped server's spool directory."""
    if isinstance(where, MTA):
        assert where.controller is not None
        return sorted(where.controller.handler.store.list())  # type: ignore[attr-defined]
    store = open_store(where, "auto")
    try:
        store.recover()
        return sorted(store.list())
    finally:
        store.close()


def eventually(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Wait (bounded) until ``cond()`` holds; no timing is asserted."""
    tick = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if cond():
            return True
        tick.wait(0.02)
    return cond()


class Net:
    def __init__(self, port: int, dns: DNSServer) -> None:
        self.port = port
        self.dns = dns
        self.controllers: list[Controller] = []

    def receiver(self, host: str) -> Receiver:
        r = Receiver()
        c = Controller(r, ServerConfig(hostname="rx.test"), listen=[(host, self.port)])
        c.start()
        self.controllers.append(c)
        return r


@pytest.fixture
def net() -> Iterator[Net]:
    port = _free_port(["127.0.0.3", "127.0.0.5"])
    with DNSServer(ZONE) as dns:
        n = Net(port, dns)
        try:
            yield n
        finally:
            for c in n.controllers:
                c.stop()


over_runtimes = pytest.mark.parametrize("runtime", ["asyncio", "trio", "threads"])
"""The MTA delivers on its server's runtime: the anyio agent on asyncio and trio, the blocking
agent on threads; every behaviour below must be the same on all three."""


def settings(tmp_path: Path, runtime: str = "asyncio") -> Settings:
    return Settings(
        runtime=runtime,
        listen=["127.0.0.1:0"],
        hostname="mta.test",
        spool=str(tmp_path / "spool"),
        local_domains=["local.test"],
        grace=1.0,
    )


def delivery(net: Net, tmp_path: Path) -> DeliverySettings:
    return DeliverySettings(
        delivery_port=net.port,
        nameservers=[f"127.0.0.1:{net.dns.port}"],
        maildir=str(tmp_path / "mail"),
        connect_timeout=5.0,
        reply_timeout=5.0,
    )


@over_runtimes
def test_mta_relays_by_mx_and_delivers_local_mail_to_maildir(
    net: Net, tmp_path: Path, runtime: str
) -> None:
    remote = net.receiver("127.0.0.3")
    maildir = MaildirDelivery(tmp_path / "mail", fsync=False)
    local_done = threading.Event()

    def local(sender: str, rcpt: str, content: bytes) -> Reply:
        reply = maildir(sender, rcpt, content)
        local_done.set()
        return reply

    mta = MTA(settings(tmp_path, runtime), delivery(net, tmp_path), local=local, fsync=False)
    mta.start()
    try:
        host, port = mta.addresses[0]
        with smtplib.SMTP(host, port, timeout=10) as client:
            refused = client.sendmail(
                "a@sender.test", ["bob@remote.test", "ivy@local.test"], MESSAGE
            )
        assert refused == {}
        assert eventually(lambda: len(remote.messages) == 1 and local_done.is_set())
        got = remote.messages[0]
        assert got.recipients == ["bob@remote.test"] and got.sender == "a@sender.test"
        assert got.content.endswith(MESSAGE)
        # the trace field of our hop, added when the message left (RFC 5321 4.4)
        assert got.content.startswith(b"Received: from ")
        assert b"by mta.test" in got.content.split(MESSAGE)[0]
        (path,) = (tmp_path / "mail" / "local.test" / "ivy" / "new").iterdir()
        assert path.read_bytes().endswith(MESSAGE)
        assert eventually(lambda: spooled(mta) == [])
    finally:
        mta.stop()


@pytest.mark.parametrize(
    ("runtime", "override", "agent"),
    [
        ("asyncio", "", DeliveryAgent),
        ("trio", "", DeliveryAgent),
        ("threads", "", BlockingDeliveryAgent),
        ("threads", "asyncio", DeliveryAgent),
        ("asyncio", "threads", BlockingDeliveryAgent),
    ],
)
def test_mta_delivers_on_the_servers_runtime_unless_delivery_says_otherwise(
    net: Net, tmp_path: Path, runtime: str, override: str, agent: type
) -> None:
    d = delivery(net, tmp_path)
    d.runtime = override
    mta = MTA(settings(tmp_path, runtime), d, fsync=False)
    mta.start()
    try:
        assert type(mta.agent) is agent
        assert mta.queue() == []
    finally:
        mta.stop()
    with pytest.raises(RuntimeError, match="not running"):
        mta.queue()


def test_an_unknown_delivery_runtime_is_refused(net: Net, tmp_path: Path) -> None:
    d = delivery(net, tmp_path)
    d.runtime = "curio"
    mta = MTA(settings(tmp_path), d, fsync=False)
    with pytest.raises(ValueError, match="delivery runtime must be one of"):
        mta.start()
    assert mta.controller is None  # refused before anything was started


@over_runtimes
def test_stop_cuts_a_hung_delivery_and_keeps_its_message(
    net: Net, tmp_path: Path, runtime: str
) -> None:
    silent = socket.socket()  # accepts connections (backlog) and never says a word
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(("127.0.0.5", net.port))
    silent.listen(8)
    d = delivery(net, tmp_path)
    d.reply_timeout = 300.0
    mta = MTA(settings(tmp_path, runtime), d, fsync=False)
    mta.start()
    try:
        host, port = mta.addresses[0]
        with smtplib.SMTP(host, port, timeout=10) as client:
            client.sendmail("a@sender.test", ["hung@later.test"], MESSAGE)
        assert eventually(lambda: [m.active for m in mta.queue()] == [True])
        stopper = threading.Thread(target=mta.stop)
        stopper.start()
        stopper.join(30)  # a bound, not a timing assertion: the session would wait 300 s
        assert not stopper.is_alive()
        conn, _ = silent.accept()  # the agent's connection, waiting for a greeting ...
        with conn:
            conn.settimeout(30)
            assert conn.recv(1024) == b""  # ... was closed by stop(), not left hanging
    finally:
        mta.stop()
        silent.close()
    assert len(spooled(tmp_path / "spool")) == 1  # still owned by the queue


def test_mta_refuses_to_relay_for_strangers_but_accepts_local_domains(
    net: Net, tmp_path: Path
) -> None:
    s = settings(tmp_path)
    s.relay_networks = []
    mta = MTA(s, delivery(net, tmp_path), fsync=False)
    mta.start()
    try:
        host, port = mta.addresses[0]
        with smtplib.SMTP(host, port, timeout=10) as client:
            client.ehlo()
            client.mail("a@sender.test")
            assert client.rcpt("bob@remote.test")[0] == 554
            assert client.rcpt("ivy@local.test")[0] == 250
    finally:
        mta.stop()


CHILD = """
import logging, sys
from mailwire.adapters.cli import Settings
from mailwire.adapters.mta import DeliverySettings, run_mta
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
spool, dns, port, mail, runtime = sys.argv[1], sys.argv[2], int(sys.argv[3]), *sys.argv[4:6]
settings = Settings(listen=["127.0.0.1:0"], hostname="mta.test", spool=spool, runtime=runtime)
sys.exit(run_mta(settings, DeliverySettings(delivery_port=port, nameservers=[dns],
                 maildir=mail, connect_timeout=2.0)))
"""


@over_runtimes
def test_kill_9_right_after_the_250_loses_nothing(
    net: Net, tmp_path: Path, runtime: str, caplog: pytest.LogCaptureFixture
) -> None:
    spool = str(tmp_path / "spool")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            spool,
            f"127.0.0.1:{net.dns.port}",
            str(net.port),
            "m",
            runtime,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stderr is not None
        address = None
        for line in child.stderr:
            if "mailwire serving on " in line:
                address = line.split("mailwire serving on ")[1].split()[0]
                break
        assert address is not None, "the child MTA did not start"
        host, _, port = address.rpartition(":")
        with smtplib.SMTP(host, int(port), timeout=10) as client:
            code, text = client.ehlo()
            client.mail("a@sender.test")
            client.rcpt("zoe@later.test")  # its MX (127.0.0.5) is down for now
            code, text = client.data(MESSAGE)
            assert code == 250
            os.kill(child.pid, signal.SIGKILL)  # right after the 250
    finally:
        child.kill()
        child.wait(10)
        if child.stderr is not None:
            child.stderr.close()
    assert len(spooled(spool)) == 1
    later = net.receiver("127.0.0.5")  # the MX comes back
    mta = MTA(settings(tmp_path, runtime), delivery(net, tmp_path), fsync=False)
    with caplog.at_level(logging.INFO, logger="mailwire.adapters.mta"):
        mta.start()
    try:
        assert any("recovered 1 message in " in r.getMessage() for r in caplog.records)
        assert eventually(lambda: len(later.messages) == 1)
        assert later.messages[0].recipients == ["zoe@later.test"]
        assert later.messages[0].content.endswith(MESSAGE)
        assert eventually(lambda: spooled(mta) == [])
    finally:
        mta.stop()


@over_runtimes
def test_queue_verbs_work_while_the_mta_runs(net: Net, tmp_path: Path, runtime: str) -> None:
    mta = MTA(settings(tmp_path, runtime), delivery(net, tmp_path), fsync=False)
    mta.start()
    try:
        host, port = mta.addresses[0]
        with smtplib.SMTP(host, port, timeout=10) as client:
            client.sendmail("a@sender.test", ["keep@later.test"], MESSAGE)
            client.sendmail("a@sender.test", ["drop@later.test"], MESSAGE)

        def deferred() -> list[str]:
            return [
                m.message.queue_id
                for m in mta.queue()
                if all(r.status.value == "deferred" for r in m.recipients)
            ]

        def settled() -> bool:
            queue = mta.queue()
            return len(queue) == 2 and not any(m.active for m in queue) and len(deferred()) >= 1

        # 127.0.0.5 is down: an attempt fails, and the destination backs off for the other
        # (nothing in flight any more, so nothing is delivered before the flush below)
        assert eventually(settled)
        drop, keep = (
            m.message.queue_id
            for m in sorted(mta.queue(), key=lambda m: m.message.recipients[0].address)
        )
        mta.delete(drop)
        assert [m.message.queue_id for m in mta.queue()] == [keep]
        assert spooled(mta) == [keep]
        mta.hold(keep)
        assert [m.held for m in mta.queue()] == [True]
        later = net.receiver("127.0.0.5")  # the MX is back
        mta.release(keep)
        mta.flush()
        assert eventually(lambda: len(later.messages) == 1)
        assert later.messages[0].recipients == ["keep@later.test"]
        assert eventually(lambda: mta.queue() == [])
        with pytest.raises(KeyError):
            mta.hold(keep)
    finally:
        mta.stop()


@over_runtimes
def test_queue_verbs_over_the_control_socket(net: Net, tmp_path: Path, runtime: str) -> None:
    mta = MTA(settings(tmp_path, runtime), delivery(net, tmp_path), fsync=False)
    mta.start()
    sock = str(tmp_path / "spool" / "control.sock")
    try:
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        host, port = mta.addresses[0]
        with smtplib.SMTP(host, port, timeout=10) as client:
            client.sendmail("a@sender.test", ["zed@later.test"], MESSAGE)
        assert eventually(lambda: len(queue_command(sock, "list")) == 1)
        (entry,) = queue_command(sock, "list")
        qid = entry["id"]
        assert entry["sender"] == "a@sender.test"
        assert entry["recipients"][0]["address"] == "zed@later.test"
        queue_command(sock, "hold", qid)
        assert queue_command(sock, "show", qid)["held"] is True
        queue_command(sock, "release", qid)
        queue_command(sock, "flush")
        queue_command(sock, "delete", qid)
        assert queue_command(sock, "list") == []
        with pytest.raises(KeyError):
            queue_command(sock, "show", qid)
        with pytest.raises(ValueError, match="unknown verb"):
            queue_command(sock, "explode", qid)
    finally:
        mta.stop()
    assert not os.path.exists(sock)


@over_runtimes
def test_counters_are_served_in_openmetrics_text(net: Net, tmp_path: Path, runtime: str) -> None:
    remote = net.receiver("127.0.0.3")
    d = delivery(net, tmp_path)
    d.metrics_listen = "127.0.0.1:0"
    d.connection_cache_time = 60.0  # long enough for the second message on a slow machine
    mta = MTA(settings(tmp_path, runtime), d, fsync=False)
    mta.start()
    try:
        host, port = mta.addresses[0]
        with smtplib.SMTP(host, port, timeout=10) as client:
            client.sendmail("a@sender.test", ["bob@remote.test"], MESSAGE)
            assert eventually(lambda: len(remote.messages) == 1)
            client.sendmail("a@sender.test", ["bob@remote.test"], MESSAGE)
        assert eventually(lambda: len(remote.messages) == 2)
        assert eventually(lambda: "mailwire_queue_messages 0\n" in mta.metrics_text())
        address = mta.metrics_address
        assert address is not None
        url = f"http://{address[0]}:{address[1]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            text = response.read().decode()
        assert "mailwire_messages_accepted_total 2\n" in text
        assert "mailwire_recipients_delivered_total 2\n" in text
        # the second message went over the first one's cached session
        assert "mailwire_connections_reused_total 1\n" in text
        assert "mailwire_recipients_bounced_total 0\n" in text
        assert text.endswith("# EOF\n")
    finally:
        mta.stop()


def test_cli_glue_reads_delivery_options_and_the_toml_table() -> None:
    parser = argparse.ArgumentParser()
    add_delivery_options(parser)
    options = vars(
        parser.parse_args(
            ["--delivery-port", "2525", "--nameserver", "127.0.0.1:5353", "--maildir", "/m"]
        )
    )
    options["hostname"] = "kept.test"  # a server option: left for Settings.update
    deliver, d = delivery_settings({"first_retry": 60, "aliases": {"a": "b@c"}}, options)
    assert deliver is True
    assert (d.delivery_port, d.nameservers, d.maildir) == (2525, ["127.0.0.1:5353"], "/m")
    assert d.first_retry == 60.0 and d.aliases == {"a": "b@c"}
    assert options == {"hostname": "kept.test"}
    assert delivery_settings({"enabled": False}, {})[0] is False
    assert delivery_settings({}, vars(parser.parse_args(["--no-deliver"])))[0] is False
    with pytest.raises(ValueError, match="unknown setting"):
        delivery_settings({"port": 25}, {})
    with pytest.raises(ValueError, match="delivery_port must be a int"):
        delivery_settings({"delivery_port": "25"}, {})


@over_runtimes
def test_queue_main_prints_a_mailq_table_and_json(
    net: Net, tmp_path: Path, capsys: pytest.CaptureFixture[str], runtime: str
) -> None:
    spool = str(tmp_path / "spool")
    assert queue_main(spool, "list", None) == 3  # nothing running
    mta = MTA(settings(tmp_path, runtime), delivery(net, tmp_path), fsync=False)
    mta.start()
    try:
        capsys.readouterr()
        assert queue_main(spool, "list", None) == 0
        assert capsys.readouterr().out == "Mail queue is empty\n"
        host, port = mta.addresses[0]
        with smtplib.SMTP(host, port, timeout=10) as client:
            client.sendmail("a@sender.test", ["zed@later.test"], MESSAGE)
        assert eventually(lambda: len(mta.queue()) == 1)
        assert queue_main(spool, "list", None) == 0
        out = capsys.readouterr().out
        assert "<a@sender.test>" in out and "<zed@later.test>" in out
        assert out.endswith("-- 1 KB in 1 message.\n")  # Postfix's mailq total line
        qid = mta.queue()[0].message.queue_id
        assert queue_main(spool, "show", qid, as_json=True) == 0
        assert f'"id": "{qid}"' in capsys.readouterr().out
        assert queue_main(spool, "hold", "NOSUCHID") == 1
        # the verbs that change the queue say what they did
        steps = [("hold", qid), ("flush", None), ("release", qid), ("flush", None)]
        steps += [("flush", qid), ("delete", qid)]
        for verb, arg in steps:
            assert queue_main(spool, verb, arg) == 0
        assert capsys.readouterr().out.splitlines() == [
            f"{qid}: held",
            "flushed 0 messages: delivery is tried again now",
            f"{qid}: released",
            "flushed 1 message: delivery is tried again now",
            f"{qid}: flushed",
            f"{qid}: deleted (from <a@sender.test>, 1 recipient, 1 KB)",
        ]
        assert mta.queue() == []
    finally:
        mta.stop()


def test_queue_total_counts_kilobytes_rounded_up_and_messages() -> None:
    entries = [{"size": 4096}, {"size": 4096}, {"size": 4000}]
    assert queue_total(entries) == "-- 12 KB in 3 messages."
    assert queue_total([{"size": 1}]) == "-- 1 KB in 1 message."

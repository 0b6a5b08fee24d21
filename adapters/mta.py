"""The reference MTA: the ``mailwire serve`` server, its durable spool, the delivery agent and
local Maildir delivery, as one object.

    mta = MTA(Settings(listen=["0.0.0.0:25"], local_domains=["example.org"]),
              DeliverySettings(maildir="/var/mail/mailwire"))
    mta.start()          # server + delivery agent in background threads
    ...
    mta.stop(grace=30)

Data flow: the server (adapters/cli.py's build(): runtime, TLS, limits, relay policy in front
of SpoolHandler) stores every accepted message durably before 250; the store is wrapped so
that each commit also hands (queue ID, envelope) to the delivery agent, which runs on the
server's runtime (``--runtime``; DeliverySettings.runtime may override it): on asyncio or trio
the anyio agent (adapters/_delivery_anyio.py) on its own event loop thread, reached through an
anyio portal; on threads the blocking agent (adapters/_delivery_threads.py) in a plain thread,
called directly (it is thread-safe).  Both run the same decisions (adapters/_agent.py), so
queue control, metrics and stop() behave the same.  Local domains
are delivered to ``<maildir>/<domain>/<local part>/`` (adapters/_maildir.py) or to a callable
given when embedding; every other domain by MX (DNS through dnspython, nameservers
configurable) on ``delivery_port``.  At start-up every message left in the spool is queued
again (kill -9 right after a 250 loses nothing).

:func:`run_mta` is the blocking entry point a command line calls: start, wait for SIGTERM or
SIGINT, stop gracefully.
"""

from __future__ import annotations

import argparse
import builtins
import concurrent.futures
import contextlib
import http.server
import json
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import anyio.from_thread

from mailwire.adapters._agent import AgentCore, LocalDeliver
from mailwire.adapters._delivery import DeliveryConfig, RecipientJournal, TLSPolicy
from mailwire.adapters._delivery_anyio import DeliveryAgent
from mailwire.adapters._delivery_threads import BlockingDeliveryAgent
from mailwire.adapters._driver import BaseController
from mailwire.adapters._maildir import MaildirDelivery
from mailwire.adapters._spool import (
    MessageStore,
    MessageWriter,
    SpoolEnvelope,
    SpoolHandler,
    StoredMessage,
)
from mailwire.adapters.cli import Settings, build, local_domains, parse_listen
from mailwire.protocol._queue import MessageState, RetryPolicy
from mailwire.protocol._routing import NextHop, RoutingConfig

log = logging.getLogger("mailwire.adapters.mta")
T = TypeVar("T")

Committed = Callable[[str, SpoolEnvelope], None]
DELIVERY_RUNTIMES = ("asyncio", "trio", "threads")


class _NotifyingWriter:
    def __init__(self, writer: MessageWriter, notify: Committed) -> None:
        self._writer = writer
        self._notify = notify

    @property
    def size(self) -> int:
        return self._writer.size

    @size.setter
    def size(self, value: int) -> None:
        self._writer.size = value

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    def commit(self, envelope: SpoolEnvelope) -> concurrent.futures.Future[str]:
        future = self._writer.commit(envelope)

        def done(f: concurrent.futures.Future[str]) -> None:
            if not f.cancelled() and f.exception() is None:
                self._notify(f.result(), envelope)

        future.add_done_callback(done)
        return future

    def abort(self) -> None:
        self._writer.abort()


class NotifyingStore:
    """A MessageStore that reports every message committed through begin()/commit() (the
    server's path) to ``notify(queue_id, envelope)``, called in the committing thread once
    the message is durable.  put() (the agent's own path, e.g. bounces) is not reported.

    Args:
        store: the real store.
        notify: the callback.
    """

    def __init__(self, store: MessageStore, notify: Committed) -> None:
        self.inner = store
        self.notify = notify

    def begin(self) -> MessageWriter:
        return _NotifyingWriter(self.inner.begin(), self.notify)

    def put(self, envelope: SpoolEnvelope, chunks: Iterable[bytes]) -> str:
        return self.inner.put(envelope, chunks)

    def get(self, queue_id: str) -> StoredMessage:
        return self.inner.get(queue_id)

    def list(self) -> builtins.list[str]:
        return self.inner.list()

    def delete(self, queue_id: str) -> None:
        self.inner.delete(queue_id)

    def recover(self) -> builtins.list[str]:
        return self.inner.recover()

    def close(self) -> None:
        self.inner.close()


@dataclass(kw_only=True)
class DeliverySettings:
    """The delivery side of the MTA.

    Attributes:
        delivery_port: the TCP port of MX delivery (25; tests use another).
        nameservers: ``["127.0.0.1:53", "[::1]:5353"]``; empty: the system's resolv.conf.
        maildir: the root of local Maildirs (``<root>/<domain>/<local part>/``).
        relayhost: send all non-local mail through this smarthost (``"[host]:587"``), or "".
        outbound_tls: opportunistic STARTTLS on outbound connections.
        runtime: where delivery runs: "asyncio" or "trio" (the anyio agent), "threads" (the
            blocking agent); "" : the server's runtime.
        lifetime, first_retry, delay_warning: the retry policy, seconds (RFC 5321 4.5.4.1).
        connect_timeout, reply_timeout: outbound timeouts, seconds.
        destination_concurrency: simultaneous deliveries per destination domain.
        aliases: local recipient -> mailbox address.
        lmtp: deliver local domains over LMTP to this server (``"[127.0.0.1]:24"``) instead
            of the Maildirs; "" : Maildirs.
        control_socket: the Unix socket of the queue verbs (see queue_command); "" :
            ``<spool>/control.sock``; "-": none.
        metrics_listen: ``"127.0.0.1:9325"``: serve the counters in OpenMetrics text over
            HTTP there (GET /metrics); "" : not at all.
        journal: the directory of the recipient journal (final results kept across restarts;
            "" : ``<spool>/journal``).
        connection_cache_time: seconds an outbound SMTP session stays open after a message,
            for the next message to the same host (0: no connection reuse).
        connection_cache_size, connection_reuse_limit: at most this many idle sessions kept,
            each reused at most this many times.
    """

    delivery_port: int = 25
    nameservers: list[str] = field(default_factory=list)
    maildir: str = "./mail"
    relayhost: str = ""
    outbound_tls: bool = True
    runtime: str = ""
    lifetime: float = 5 * 86400.0
    first_retry: float = 300.0
    delay_warning: float = 4 * 3600.0
    connect_timeout: float = 30.0
    reply_timeout: float = 300.0
    destination_concurrency: int = 20
    aliases: dict[str, str] = field(default_factory=dict)
    lmtp: str = ""
    journal: str = ""
    control_socket: str = ""
    metrics_listen: str = ""
    connection_cache_time: float = 2.0
    connection_cache_size: int = 32
    connection_reuse_limit: int = 100


def _nameserver(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return text.strip("[]"), 53
    return host.strip("[]"), int(port)


class _AgentHost:
    """Where the delivery agent runs, and how other threads reach it (the MTA's only
    difference between the runtimes)."""

    agent: AgentCore

    def start(self) -> builtins.list[str]:
        """Queue the spool's messages, then run the agent in the background."""
        raise NotImplementedError

    def call(self, fn: Callable[[], T]) -> T:
        """Run a synchronous agent method where the agent may be touched."""
        raise NotImplementedError

    def delete(self, queue_id: str) -> MessageState:
        raise NotImplementedError

    def enqueue(self, queue_id: str, envelope: SpoolEnvelope) -> None:
        """Queue a committed message without waiting (RuntimeError once stopped)."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the agent (deliveries in flight are cut; their messages stay queued)."""
        raise NotImplementedError


class _PortalHost(_AgentHost):
    """The anyio agent on its own event loop thread, reached through a blocking portal."""

    def __init__(self, agent: DeliveryAgent, runtime: str) -> None:
        self.agent = self._agent = agent
        self._cm = anyio.from_thread.start_blocking_portal(
            "trio" if runtime == "trio" else "asyncio"
        )
        self._portal = self._cm.__enter__()
        self._run: concurrent.futures.Future[None] | None = None

    def start(self) -> builtins.list[str]:
        ids = self._portal.call(self._agent.start)
        self._run = self._portal.start_task_soon(self._agent.run)
        return ids

    def call(self, fn: Callable[[], T]) -> T:
        return self._portal.call(_sync, fn)

    def delete(self, queue_id: str) -> MessageState:
        return self._portal.call(self._agent.delete, queue_id)

    def enqueue(self, queue_id: str, envelope: SpoolEnvelope) -> None:
        self._portal.start_task_soon(_enqueue, self._agent, queue_id, envelope)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._portal.call(_sync, self._agent.stop)
            if self._run is not None:
                self._run.result(timeout=10)
        if self._run is not None:
            self._run.cancel()
        with contextlib.suppress(Exception):
            self._cm.__exit__(None, None, None)


class _ThreadHost(_AgentHost):
    """The blocking agent: run() in a plain thread, every other method called directly."""

    def __init__(self, agent: BlockingDeliveryAgent) -> None:
        self.agent = self._agent = agent
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> builtins.list[str]:
        ids = self._agent.start()
        self._thread = threading.Thread(
            target=self._agent.run, name="mailwire-delivery-scheduler", daemon=True
        )
        self._thread.start()
        return ids

    def call(self, fn: Callable[[], T]) -> T:
        return fn()

    def delete(self, queue_id: str) -> MessageState:
        return self._agent.delete(queue_id)

    def enqueue(self, queue_id: str, envelope: SpoolEnvelope) -> None:
        if self._stopped:
            raise RuntimeError("the delivery agent is stopped")
        self._agent.enqueue(queue_id, envelope)

    def stop(self) -> None:
        self._stopped = True
        self._agent.stop()
        if self._thread is not None:
            self._thread.join(self._agent.join_timeout + 5)


class MTA:
    """Server + spool + delivery agent + local delivery (see the module docstring).

    Args:
        settings: the server settings (adapters/cli.py).
        delivery: the delivery settings.
        local: an embedded local delivery callable (replaces the Maildirs), or None.
        fsync: False only for tests (the spool is then NOT durable).
    """

    def __init__(
        self,
        settings: Settings,
        delivery: DeliverySettings | None = None,
        *,
        local: LocalDeliver | None = None,
        fsync: bool = True,
    ) -> None:
        self.settings = settings
        self.delivery = delivery or DeliverySettings()
        self.local = local
        self.fsync = fsync
        self.controller: BaseController | None = None
        self.agent: AgentCore | None = None
        self._host: _AgentHost | None = None
        self._control: _ControlServer | None = None
        self._metrics: _MetricsServer | None = None
        self.accepted = 0

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The addresses the server listens on (after start())."""
        return [] if self.controller is None else self.controller.addresses

    def delivery_config(self, hostname: str) -> DeliveryConfig:
        """The DeliveryConfig the settings describe."""
        d = self.delivery
        transport = {"*": NextHop.parse(d.relayhost)} if d.relayhost else {}
        routing = RoutingConfig(
            hostname=hostname,
            local_domains=local_domains(self.settings, hostname),
            transport=transport,
            smtp_port=d.delivery_port,
        )
        retry = RetryPolicy(
            first_retry=d.first_retry,
            lifetime=d.lifetime,
            delay_warning=d.delay_warning or None,
            destination_concurrency=d.destination_concurrency,
            max_interval=max(4 * 3600.0, d.first_retry),
        )
        return DeliveryConfig(
            hostname=hostname,
            routing=routing,
            nameservers=tuple(_nameserver(n) for n in d.nameservers) or None,
            retry=retry,
            tls=TLSPolicy.OPPORTUNISTIC if d.outbound_tls else TLSPolicy.NONE,
            connect_timeout=d.connect_timeout,
            reply_timeout=d.reply_timeout,
            lmtp=NextHop.parse(d.lmtp) if d.lmtp else None,
            connection_cache_time=d.connection_cache_time,
            connection_cache_size=d.connection_cache_size,
            connection_reuse_limit=d.connection_reuse_limit,
            add_missing_headers=self.settings.add_missing_headers,
        )

    def start(self) -> None:
        """Recover the spool, start the delivery agent, then the server.

        Raises:
            ValueError: inconsistent settings.
            OSError, RuntimeError: the server could not start.
        """
        runtime = self.delivery.runtime or self.settings.runtime
        if runtime not in DELIVERY_RUNTIMES:
            raise ValueError(f"delivery runtime must be one of {', '.join(DELIVERY_RUNTIMES)}")
        controller, settings = build(self.settings)
        handler = controller.handler
        assert isinstance(handler, SpoolHandler)
        if not self.fsync:
            handler.store.fsync = False  # type: ignore[attr-defined]
        self.controller = controller
        config = self.delivery_config(controller.config.hostname)
        local = self.local
        if local is None:
            local = MaildirDelivery(
                self.delivery.maildir,
                hostname=config.hostname,
                fsync=self.fsync,
                aliases=self.delivery.aliases,
            )
        journal = RecipientJournal(
            self.delivery.journal or os.path.join(settings.spool, "journal"), fsync=self.fsync
        )
        host: _AgentHost
        if runtime == "threads":
            host = _ThreadHost(
                BlockingDeliveryAgent(
                    handler.store, config, local=local, clock=time.time, journal=journal
                )
            )
        else:
            host = _PortalHost(
                DeliveryAgent(handler.store, config, local=local, clock=time.time, journal=journal),
                runtime,
            )
        self.agent, self._host = host.agent, host
        handler.store = NotifyingStore(handler.store, self._committed)
        try:
            began = time.monotonic()
            ids = host.start()
            log.info(
                "delivery agent on %s: recovered %s in %.2f s",
                runtime,
                _plural(len(ids), "message"),
                time.monotonic() - began,
            )
            path = self.delivery.control_socket or os.path.join(settings.spool, "control.sock")
            if path != "-":
                try:
                    self._control = _ControlServer(path, self)
                except OSError as exc:  # e.g. a path over the 107-byte limit of AF_UNIX
                    log.warning("no control socket at %s: %s", path, exc)
            if self.delivery.metrics_listen:
                self._metrics = _MetricsServer(parse_listen(self.delivery.metrics_listen), self)
            controller.start()
        except BaseException:
            self.stop()
            raise

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where the metrics HTTP server listens (after start()), or None."""
        if self._metrics is None:
            return None
        host, port = self._metrics.server.server_address[:2]
        return str(host), int(port)

    def metrics_text(self) -> str:
        """The counters in OpenMetrics text format."""
        agent = self.agent
        counters = dict(agent.counters) if agent is not None else {}
        queued = len(agent.scheduler) if agent is not None else 0
        lines = []
        for name, value, help_text in (
            ("messages_accepted", self.accepted, "Messages accepted (250) since start"),
            ("recipients_delivered", counters.get("delivered", 0), "Recipients delivered"),
            ("recipients_deferred", counters.get("deferred", 0), "Delivery attempts deferred"),
            ("recipients_bounced", counters.get("bounced", 0), "Recipients failed (bounced)"),
            ("notifications_sent", counters.get("dsn_sent", 0), "DSNs queued to senders"),
            (
                "connections_reused",
                counters.get("connections_reused", 0),
                "Outbound SMTP sessions reused from the connection cache",
            ),
        ):
            lines += [
                f"# TYPE mailwire_{name} counter",
                f"# HELP mailwire_{name} {help_text}.",
                f"mailwire_{name}_total {value}",
            ]
        lines += [
            "# TYPE mailwire_queue_messages gauge",
            "# HELP mailwire_queue_messages Messages in the queue.",
            f"mailwire_queue_messages {queued}",
            "# EOF",
        ]
        return "\n".join(lines) + "\n"

    def _committed(self, queue_id: str, envelope: SpoolEnvelope) -> None:
        self.accepted += 1
        host = self._host
        if host is None:
            return  # stopping: the message stays in the spool for the next start
        try:
            host.enqueue(queue_id, envelope)
        except RuntimeError:
            log.warning("%s: not queued (delivery agent stopped); kept in the spool", queue_id)

    def stop(self, grace: float = 0.0) -> None:
        """Stop the server (``grace`` seconds for transactions in progress), then the
        delivery agent (deliveries in flight are cut; their messages stay queued), then
        release the spool."""
        controller, self.controller = self.controller, None
        control, self._control = self._control, None
        if control is not None:
            control.close()
        metrics, self._metrics = self._metrics, None
        if metrics is not None:
            metrics.close()
        if controller is not None:
            controller.stop(grace=grace)
        host, self._host = self._host, None
        if host is not None:
            host.stop()
        if controller is not None and isinstance(controller.handler, SpoolHandler):
            controller.handler.close()

    # --- queue management, callable from any thread (the queue CLI's verbs) --------------

    def _running(self) -> _AgentHost:
        if self._host is None:
            raise RuntimeError("the MTA is not running")
        return self._host

    def queue(self) -> list[MessageState]:
        """Every queued message's state."""
        host = self._running()
        return host.call(host.agent.queue)

    def flush(self, queue_id: str | None = None) -> int:
        """Retry one message (or all) now; returns how many (held ones are not).  KeyError if
        not queued."""
        host = self._running()
        return host.call(partial(host.agent.flush, queue_id))

    def hold(self, queue_id: str) -> None:
        """Hold a message.  KeyError if not queued."""
        host = self._running()
        host.call(partial(host.agent.hold, queue_id))

    def release(self, queue_id: str) -> None:
        """Release a held message.  KeyError if not queued."""
        host = self._running()
        host.call(partial(host.agent.release, queue_id))

    def delete(self, queue_id: str) -> MessageState:
        """Delete a message from the queue and the spool.  KeyError if not queued."""
        return self._running().delete(queue_id)

    def __enter__(self) -> MTA:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _MetricsServer:
    def __init__(self, address: tuple[str, int], mta: MTA) -> None:
        def do_get(handler: http.server.BaseHTTPRequestHandler) -> None:
            if handler.path.split("?")[0] != "/metrics":
                handler.send_error(404)
                return
            body = mta.metrics_text().encode()
            handler.send_response(200)
            handler.send_header("Content-Type", OPENMETRICS_TYPE)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)

        def log_message(handler: http.server.BaseHTTPRequestHandler, *args: object) -> None:
            pass

        handler = type(
            "_Metrics",
            (http.server.BaseHTTPRequestHandler,),
            {"do_GET": do_get, "log_message": log_message},
        )
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        server_class = type(
            "_MetricsHTTP", (http.server.ThreadingHTTPServer,), {"address_family": family}
        )
        self.server = server_class(address, handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
            name="mailwire-metrics",
        )  # fmt: skip
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


# --- the control socket: queue verbs from another process -----------------------------------
#
# One JSON object per line each way over a Unix socket (mode 0600, so only the MTA's user may
# manage its queue): {"verb": "list"} / {"verb": "flush", "id": null} / {"verb": "hold",
# "id": "..."} / release / delete / show  ->  {"ok": true, "result": ...} or {"ok": false,
# "error": "..."}.  The verbs run on the agent's event loop (MTA.queue() etc.), so they see
# and change the live queue while the server runs.

VERBS = ("list", "show", "flush", "hold", "release", "delete")


def message_json(state: MessageState) -> dict[str, Any]:
    """A queued message's state as JSON-ready data (for ``mailwire queue list --json``)."""
    m = state.message
    return {
        "id": m.queue_id,
        "sender": m.sender,
        "arrival": m.arrival,
        "size": m.size,
        "held": state.held,
        "active": state.active,
        "next_attempt": state.next_attempt,
        "recipients": [
            {
                "address": r.recipient.address,
                "status": r.status.value,
                "attempts": r.attempts,
                "reply": None if r.reply is None else f"{r.reply.code} {r.reply.text}",
                "remote_mta": r.remote_mta,
            }
            for r in state.recipients
        ],
    }


class _ControlServer:
    def __init__(self, path: str, mta: MTA) -> None:
        self.path = path
        self.mta = mta
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a previous run (the spool lock is ours)
        handler = type("_Handler", (socketserver.StreamRequestHandler,), {"handle": _serve_one})
        self.server = socketserver.ThreadingUnixStreamServer(path, handler)
        self.server.daemon_threads = True
        self.server.mta = mta  # type: ignore[attr-defined]
        os.chmod(path, 0o600)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
            name="mailwire-control",
        )  # fmt: skip
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _serve_one(self: socketserver.StreamRequestHandler) -> None:
    mta: MTA = self.server.mta  # type: ignore[attr-defined]
    for line in self.rfile:
        try:
            request = json.loads(line)
            result = _run_verb(mta, str(request.get("verb")), request.get("id"))
            answer: dict[str, Any] = {"ok": True, "result": result}
        except KeyError as exc:
            answer = {"ok": False, "error": f"no queued message {exc.args[0] if exc.args else ''}"}
        except Exception as exc:  # noqa: BLE001 - reported to the client
            answer = {"ok": False, "error": str(exc) or type(exc).__name__}
        self.wfile.write(json.dumps(answer).encode() + b"\n")
        self.wfile.flush()


def _run_verb(mta: MTA, verb: str, queue_id: object) -> Any:
    if queue_id is not None and not isinstance(queue_id, str):
        raise ValueError("id must be a string")
    if verb == "list":
        return [message_json(m) for m in mta.queue()]
    if verb == "flush":
        return {"flushed": mta.flush(queue_id)}
    if queue_id is None:
        raise ValueError(f"{verb} needs an id")
    if verb == "show":
        for m in mta.queue():
            if m.message.queue_id == queue_id:
                return message_json(m)
        raise KeyError(queue_id)
    if verb == "hold":
        mta.hold(queue_id)
    elif verb == "release":
        mta.release(queue_id)
    elif verb == "delete":
        return message_json(mta.delete(queue_id))
    else:
        raise ValueError(f"unknown verb {verb!r}; one of {', '.join(VERBS)}")
    return None


def queue_command(
    path: str, verb: str, queue_id: str | None = None, *, timeout: float = 10.0
) -> Any:
    """Run a queue verb on a running MTA through its control socket.

    Args:
        path: the control socket (``<spool>/control.sock`` by default).
        verb: list, show, flush, hold, release or delete.
        queue_id: the message (None: every message, for flush).
        timeout: seconds to wait.

    Returns:
        The verb's result (list: a list of message_json() dicts; show: one).

    Raises:
        OSError: no MTA is listening.
        KeyError: no such queued message.
        ValueError: a bad verb or argument.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps({"verb": verb, "id": queue_id}).encode() + b"\n")
        with sock.makefile("rb") as f:
            answer = json.loads(f.readline())
    if answer.get("ok"):
        return answer.get("result")
    error = str(answer.get("error"))
    if error.startswith("no queued message"):
        raise KeyError(queue_id)
    raise ValueError(error)


# --- glue for the command line (adapters/cli.py) ----------------------------------------------

_OPTIONS = {  # option -> DeliverySettings field
    "--delivery-port": ("delivery_port", int, "PORT", "TCP port of MX delivery (25)"),
    "--nameserver": ("nameservers", str, "HOST:PORT", "DNS server to ask (repeatable)"),
    "--maildir": ("maildir", str, "DIR", "root of the local Maildirs"),
    "--relayhost": ("relayhost", str, "[HOST]:PORT", "send all remote mail via this host"),
    "--lmtp": ("lmtp", str, "[HOST]:PORT", "deliver local domains over LMTP"),
    "--metrics-listen": ("metrics_listen", str, "HOST:PORT", "serve OpenMetrics over HTTP"),
}


def add_delivery_options(parser: argparse.ArgumentParser) -> None:
    """Add the delivery options (and ``--no-deliver``) to the ``serve`` parser."""
    for option, (dest, kind, metavar, text) in _OPTIONS.items():
        action = "append" if dest == "nameservers" else "store"
        parser.add_argument(option, dest=dest, type=kind, metavar=metavar, action=action, help=text)
    parser.add_argument(
        "--no-deliver", dest="deliver", action="store_false", default=None,
        help="only accept and spool (no delivery agent)",
    )  # fmt: skip


def delivery_settings(
    table: dict[str, Any] | None, options: dict[str, Any]
) -> tuple[bool, DeliverySettings]:
    """The delivery settings from the TOML file's ``[delivery]`` table and the options.

    Pops the delivery options out of ``options`` (so the rest can go to Settings.update).

    Args:
        table: the ``[delivery]`` table (keys as in DeliverySettings, plus ``enabled``).
        options: the parsed command-line options as a dict (``vars(args)``).

    Returns:
        (deliver, settings): whether to run the delivery agent, and its settings.

    Raises:
        ValueError: an unknown key or a value of the wrong type.
    """
    values = dict(table or {})
    deliver = values.pop("enabled", True)
    if not isinstance(deliver, bool):
        raise ValueError("[delivery] enabled must be true or false")
    for dest, *_ in _OPTIONS.values():
        value = options.pop(dest, None)
        if value is not None:
            values[dest] = value
    flag = options.pop("deliver", None)
    if flag is not None:
        deliver = flag
    defaults = DeliverySettings()
    for key, value in values.items():
        if not hasattr(defaults, key):
            raise ValueError(f"[delivery]: unknown setting {key!r}")
        current = getattr(defaults, key)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            values[key] = value = float(value)
        if type(value) is not type(current) or (
            isinstance(value, list) and not all(isinstance(v, str) for v in value)
        ):
            raise ValueError(f"[delivery]: {key} must be a {type(current).__name__}")
    return deliver, DeliverySettings(**values)


def format_queue(entries: list[dict[str, Any]], *, now: float | None = None) -> str:
    """A mailq-style table of message_json() entries."""
    if not entries:
        return "Mail queue is empty\n"
    lines = [f"{'Queue ID':<22}{'Size':>8}  {'Arrival (UTC)':<20} Sender/Recipient"]
    for e in entries:
        arrival = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["arrival"]))
        held = "!" if e["held"] else ("*" if e["active"] else " ")
        lines.append(f"{e['id'] + held:<22}{e['size']:>8}  {arrival:<20} <{e['sender']}>")
        for r in e["recipients"]:
            if r["status"] in ("delivered", "failed"):
                continue
            reason = f" ({r['reply']})" if r["reply"] else ""
            lines.append(f"{'':<52}<{r['address']}>{reason}")
    lines.append(queue_total(entries))
    return "\n".join(lines) + "\n"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _kilobytes(size: int) -> int:
    return (size + 1023) // 1024  # rounded up, as Postfix's mailq


def queue_total(entries: list[dict[str, Any]]) -> str:
    """The total line of a queue listing, as Postfix's mailq: ``-- 12 KB in 3 messages.``"""
    size = sum(int(e["size"]) for e in entries)
    return f"-- {_kilobytes(size)} KB in {_plural(len(entries), 'message')}."


def verb_summary(verb: str, queue_id: str | None, result: Any) -> str:
    """One line saying what a queue verb did (``mailwire queue flush|delete|hold|release``)."""
    if verb == "flush":
        flushed = int(result["flushed"]) if isinstance(result, dict) else 0
        if queue_id is not None:
            return f"{queue_id}: {'flushed' if flushed else 'held, not flushed'}"
        return f"flushed {_plural(flushed, 'message')}: delivery is tried again now"
    if verb == "delete" and isinstance(result, dict):
        rcpts = len(result["recipients"])
        return (
            f"{queue_id}: deleted (from <{result['sender']}>, {_plural(rcpts, 'recipient')}, "
            f"{_kilobytes(int(result['size']))} KB)"
        )
    done = {"hold": "held", "release": "released"}.get(verb, verb)
    return f"{queue_id}: {done}"


def queue_main(spool: str, verb: str, queue_id: str | None, *, as_json: bool = False) -> int:
    """``mailwire queue VERB [ID]``: print the result; returns the exit status (0 ok, 1 no such
    message, 2 usage, 3 no running MTA)."""
    path = os.path.join(spool, "control.sock")
    try:
        result = queue_command(path, verb, queue_id)
    except KeyError:
        print(f"mailwire: no queued message {queue_id}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"mailwire: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mailwire: no MTA running on spool {spool} ({exc})", file=sys.stderr)
        return 3
    if as_json:
        print(json.dumps(result, indent=2))
    elif verb == "list":
        sys.stdout.write(format_queue(result))
    elif verb == "show":
        sys.stdout.write(format_queue([result]))
    else:
        print(verb_summary(verb, queue_id, result))
    return 0


async def _sync(fn: Callable[[], T]) -> T:
    return fn()


async def _enqueue(agent: AgentCore, queue_id: str, envelope: SpoolEnvelope) -> None:
    agent.enqueue(queue_id, envelope)


def run_mta(
    settings: Settings,
    delivery: DeliverySettings | None = None,
    *,
    stop: threading.Event | None = None,
    **options: Any,
) -> int:
    """Run the MTA until SIGTERM/SIGINT (or ``stop`` is set), then stop gracefully.

    Args:
        settings: the server settings.
        delivery: the delivery settings.
        stop: an event that ends the run (signal handlers are installed when None; they can
            only be installed from the main thread).
        **options: passed to MTA.

    Returns:
        0 after a graceful stop, 1 if the server could not start or stopped unexpectedly.
    """
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    mta = MTA(settings, delivery, **options)
    try:
        mta.start()
    except (OSError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    log.info(
        "mailwire serving on %s (%s runtime, spool %s, pid %d, with delivery)",
        " ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in mta.addresses),
        settings.runtime,
        os.path.abspath(settings.spool),
        os.getpid(),
    )
    status = 0
    while not stop.wait(0.5):
        if mta.controller is None or not mta.controller.running:
            log.error("the server stopped unexpectedly")
            status = 1
            break
    log.info("stopping: letting transactions finish (grace %.1f s)", settings.grace)
    mta.stop(grace=settings.grace)
    log.info("stopped")
    return status


__all__ = [
    "MTA",
    "VERBS",
    "add_delivery_options",
    "delivery_settings",
    "format_queue",
    "queue_main",
    "DeliverySettings",
    "NotifyingStore",
    "message_json",
    "queue_command",
    "queue_total",
    "run_mta",
    "verb_summary",
]

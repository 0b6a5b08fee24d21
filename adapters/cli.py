"""``mailwire serve``: the reference SMTP server.

Runs with no configuration at all (listen on 127.0.0.1:2525, spool in ./spool); options and a
TOML file (``--config``) override the embedded defaults, options winning over the file.
Every accepted message is stored durably in the spool (adapters/_spool.py's SpoolHandler:
written and fsynced, with its directory, before the 250).  SIGTERM and SIGINT stop the server
gracefully: it stops accepting and lets transactions in progress finish within ``grace``.

TOML keys (all optional)::

    runtime = "asyncio"              # or "trio", "threads"
    listen = ["127.0.0.1:2525", "[::1]:2525"]
    hostname = "mx.example.org"
    spool = "./spool"
    tls_cert = "cert.pem"            # with tls_key: STARTTLS (or implicit TLS, see below)
    tls_key = "key.pem"
    implicit_tls = false             # TLS from the first byte (port 465 style)
    max_message_size = 10485760      # octets, 0 = no limit
    max_recipients = 1000
    max_connections = 1000
    command_timeout = 300.0
    data_timeout = 180.0
    grace = 30.0                     # seconds transactions get to finish on shutdown
    relay_networks = ["127.0.0.0/8", "::1/128"]   # clients that may relay anywhere
    local_domains = ["example.org"]  # domains accepted from anyone
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from mailwire.adapters._driver import BaseController, Session
from mailwire.adapters._spool import SpoolHandler
from mailwire.protocol._config import ServerConfig
from mailwire.protocol._events import RcptTo
from mailwire.protocol._policy import RelayPolicy as RelayRules
from mailwire.protocol._policy import check_relay

log = logging.getLogger("mailwire.adapters.cli")
RUNTIMES = ("asyncio", "trio", "threads")


@dataclass(kw_only=True)
class Settings:
    """The reference server's settings: embedded defaults, then the TOML file, then options."""

    runtime: str = "asyncio"
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:2525"])
    hostname: str = ""  # empty: this host's FQDN
    spool: str = "./spool"
    tls_cert: str | None = None
    tls_key: str | None = None
    implicit_tls: bool = False
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 1000
    max_connections: int = 1000
    command_timeout: float = 300.0
    data_timeout: float = 180.0
    grace: float = 30.0
    relay_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    local_domains: list[str] = field(default_factory=list)

    def update(self, values: dict[str, Any], origin: str) -> None:
        """Apply ``values`` (from the TOML file or the options), checking names and types.

        Raises:
            ValueError: an unknown key or a value of the wrong type.
        """
        known = {f.name: f for f in fields(self)}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"{origin}: unknown setting {key!r}")
            current = getattr(self, name)
            if isinstance(current, bool) and not isinstance(value, bool):
                raise ValueError(f"{origin}: {key} must be true or false")
            if isinstance(current, float) and isinstance(value, int):
                value = float(value)
            if isinstance(current, list) and (
                not isinstance(value, list) or not all(isinstance(v, str) for v in value)
            ):
                raise ValueError(f"{origin}: {key} must be a list of strings")
            if current is None and not isinstance(value, str):
                raise ValueError(f"{origin}: {key} must be a string")
            if current is not None and not isinstance(value, type(current)):
                raise ValueError(f"{origin}: {key} must be a {type(current).__name__}")
            setattr(self, name, value)


def parse_listen(text: str) -> tuple[str, int]:
    """``"127.0.0.1:25"`` or ``"[::1]:25"`` -> (host, port).

    Raises:
        ValueError: not HOST:PORT.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"listen address must be HOST:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


class RelayPolicy:
    """Mixin in front of the spool handler: the core's relay decision (``check_relay``) for
    every recipient; refused ones get its 554 5.7.1 (RFC 5321 3.6.2: no open relay)."""

    relay: RelayRules = RelayRules()

    def on_rcpt_to(self, session: Session, event: RcptTo) -> Any:
        decision = check_relay(
            self.relay,
            recipient=event.address,
            client_address=session.peer[0].split("%", 1)[0],
            authenticated_user=session.authenticated_as,
        )
        if not decision.allowed:
            return decision.reply
        return super().on_rcpt_to(session, event)  # type: ignore[misc]


def local_domains(settings: Settings, hostname: str) -> frozenset[str]:
    """The configured local domains plus this server's own name and ``localhost``: mail to
    postmaster@ the server itself must be delivered here (RFC 5321 4.5.1)."""
    names = {*settings.local_domains, hostname, "localhost"}
    return frozenset(d.lower().rstrip(".") for d in names)


def build(settings: Settings) -> tuple[BaseController, Settings]:
    """The Controller for ``settings`` (not started).

    Raises:
        ValueError: inconsistent settings.
        OSError: the TLS files cannot be read.
    """
    if settings.runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ValueError("tls_cert and tls_key go together")
    if settings.implicit_tls and settings.tls_cert is None:
        raise ValueError("implicit_tls needs tls_cert and tls_key")
    tls: ssl.SSLContext | None = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(settings.tls_cert, settings.tls_key)
    config = ServerConfig(
        hostname=settings.hostname or _fqdn(),
        max_message_size=settings.max_message_size,
        max_recipients=settings.max_recipients,
        starttls=tls is not None and not settings.implicit_tls,
        command_timeout=settings.command_timeout,
        data_timeout=settings.data_timeout,
    )
    policy = type("SpoolServer", (RelayPolicy, SpoolHandler), {})
    handler: SpoolHandler = policy(settings.spool)
    handler.relay = RelayRules(  # type: ignore[attr-defined]
        local_domains=local_domains(settings, config.hostname),
        trusted_networks=tuple(
            ipaddress.ip_network(n, strict=False) for n in settings.relay_networks
        ),
    )
    module = importlib.import_module(f"mailwire.adapters.{settings.runtime}")
    controller: BaseController = module.Controller(
        handler,
        config,
        listen=[parse_listen(a) for a in settings.listen],
        tls_context=tls,
        implicit_tls=settings.implicit_tls,
        max_connections=settings.max_connections,
    )
    return controller, settings


def _close_store(controller: BaseController) -> None:
    if isinstance(controller.handler, SpoolHandler):
        controller.handler.close()


def _fqdn() -> str:
    name = socket.getfqdn()
    return name if name and not any(c.isspace() for c in name) else "localhost"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailwire", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the SMTP server")
    add = serve.add_argument
    add("--config", "-c", help="TOML configuration file")
    add("--runtime", choices=RUNTIMES)
    add("--listen", "-l", action="append", metavar="HOST:PORT", help="repeatable")
    add("--hostname")
    add("--spool", metavar="DIR")
    add("--tls-cert", metavar="PEM")
    add("--tls-key", metavar="PEM")
    add("--implicit-tls", action="store_true", default=None)
    add("--max-message-size", type=int, metavar="OCTETS")
    add("--max-recipients", type=int)
    add("--max-connections", type=int)
    add("--command-timeout", type=float, metavar="SECONDS")
    add("--data-timeout", type=float, metavar="SECONDS")
    add("--grace", type=float, metavar="SECONDS")
    add("--relay-network", dest="relay_networks", action="append", metavar="CIDR")
    add("--local-domain", dest="local_domains", action="append", metavar="DOMAIN")
    add("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # mta imports this module (it builds its server with build()), hence the late import
    from mailwire.adapters.mta import VERBS, add_delivery_options

    add_delivery_options(serve)
    queue = commands.add_parser("queue", help="manage the queue of a running server")
    queue.add_argument("verb", choices=VERBS)
    queue.add_argument("id", nargs="?")
    queue.add_argument("--spool", default="./spool", metavar="DIR")
    queue.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``mailwire`` console script.

    Returns:
        The exit status: 0 after a graceful stop, 2 for bad settings, 1 if the server failed.
    """
    from mailwire.adapters.mta import delivery_settings, queue_main, run_mta

    parser = _parser()
    args = vars(parser.parse_args(argv))
    if args["command"] == "queue":
        return queue_main(args["spool"], args["verb"], args["id"], as_json=args["json"])
    logging.basicConfig(
        level=args.pop("log_level"), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    settings = Settings()
    try:
        path = args.pop("config")
        table: dict[str, Any] = {}
        if path is not None:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        deliver, delivery = delivery_settings(table.pop("delivery", None), args)
        if path is not None:
            settings.update(table, path)
        del args["command"]
        settings.update({k: v for k, v in args.items() if v is not None}, "options")
        controller, settings = build(settings)
    except (ValueError, OSError, tomllib.TOMLDecodeError) as exc:
        parser.error(str(exc))
    if deliver:
        _close_store(controller)  # run_mta builds its own server on the same spool
        return run_mta(settings, delivery)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        controller.start()
    except (OSError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        _close_store(controller)
        return 1
    addresses = " ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in controller.addresses)
    log.info(
        "mailwire serving on %s (%s runtime, spool %s, pid %d)",
        addresses,
        settings.runtime,
        os.path.abspath(settings.spool),
        os.getpid(),
    )
    while not stop.wait(1.0):
        if not controller.running:
            log.error("the server stopped unexpectedly")
            _close_store(controller)
            return 1
    log.info("stopping: letting transactions finish (grace %.1f s)", settings.grace)
    controller.stop(grace=settings.grace)
    _close_store(controller)
    log.info("stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``mailwire serve``: the reference SMTP server.

Runs with no configuration at all (listen on 127.0.0.1:2525, spool in ./spool); options and a
TOML file (``--config``) override the embedded defaults, options winning over the file.
Every accepted message is stored durably in the spool (adapters/_spool.py's SpoolHandler:
written and fsynced, with its directory, before the 250).  SIGTERM and SIGINT stop the server
gracefully: it stops accepting and lets transactions in progress finish within ``grace``.

TOML keys (all optional)::

    runtime = "asyncio"              # or "trio", "threads"
    pin_session_threads = true       # threads: session threads share one CPU (the GIL
                                     # hand-offs between cores cost more than they give)
    listen = ["127.0.0.1:2525", "[::1]:2525"]
    hostname = "mx.example.org"
    spool = "./spool"
    spool_format = "auto"            # "log" (segment log), "files" (one file per message),
                                     # "auto": what the spool holds, "log" for a new one
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
    credentials = "/etc/mailwire/users"  # salted scrypt hashes (``mailwire passwd``):
                                     # AUTH PLAIN LOGIN offered; authenticated clients relay
    submission_listen = ["0.0.0.0:587"]  # message submission (RFC 6409): AUTH before MAIL;
                                     # needs credentials, and TLS unless allow_plaintext_auth
    submission_implicit_tls = false  # the submission listener speaks TLS first (port 465)
    allow_plaintext_auth = false     # offer AUTH without TLS (tests on loopback only)
    auth_failure_delay = 1.0         # seconds before a failed AUTH is answered
    add_missing_headers = true       # mail from authenticated clients gets the Date and
                                     # Message-ID it lacks as it leaves (RFC 6409 8.2, 8.3)

    [limits]                         # sender limits; none by default (choose your own)
    period = 3600                    # seconds, for the tables below that give none
    max_buckets = 100000             # counters kept in memory
    [limits.per_client]              # per client IP address
    messages = 100                   # MAIL commands granted per period
    recipients = 1000                # RCPT commands granted per period
    [limits.per_user]                # per authenticated user (same keys, and period)
    [limits.per_sender]              # per envelope sender (the null sender is never limited)

Limits are token buckets (protocol/_policy.py): up to ``messages`` at once, refilled evenly
over ``period``; one RateLimiter is shared by every listener.  Over a limit MAIL or RCPT gets
``450 4.7.1 ... try again in N seconds``.  Options: ``--limit per_client.messages=100``.

``mailwire passwd FILE USER`` adds a user to a credentials file or changes their password
(read with getpass, or one line from standard input with ``--stdin``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import getpass
import importlib
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mailwire.adapters._credentials import (
    SCRYPT_LN,
    CredentialsFile,
    add_user,
    remove_user,
    user_key,
)
from mailwire.adapters._driver import BaseController, Session
from mailwire.adapters._futures import when_done
from mailwire.adapters._spool import STORE_FORMATS, SpoolError, SpoolHandler
from mailwire.protocol._config import ServerConfig
from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._events import AuthCredentials, MailFrom, RcptTo, Reply
from mailwire.protocol._policy import Limit, Rate, RateLimiter, SenderLimits, check_relay
from mailwire.protocol._policy import RelayPolicy as RelayRules

log = logging.getLogger("mailwire.adapters.cli")
RUNTIMES = ("asyncio", "trio", "threads")


@dataclass(kw_only=True)
class Settings:
    """The reference server's settings: embedded defaults, then the TOML file, then options."""

    runtime: str = "asyncio"
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:2525"])
    hostname: str = ""  # empty: this host's FQDN
    spool: str = "./spool"
    spool_format: str = "auto"
    tls_cert: str | None = None
    tls_key: str | None = None
    implicit_tls: bool = False
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 1000
    max_connections: int = 1000
    pin_session_threads: bool = True
    command_timeout: float = 300.0
    data_timeout: float = 180.0
    grace: float = 30.0
    relay_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    local_domains: list[str] = field(default_factory=list)
    credentials: str | None = None
    submission_listen: list[str] = field(default_factory=list)
    submission_implicit_tls: bool = False
    allow_plaintext_auth: bool = False
    auth_failure_delay: float = 1.0
    add_missing_headers: bool = True
    limits: dict[str, Any] = field(default_factory=dict)  # the [limits] table

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
            if isinstance(current, dict):  # [limits]: options refine the file's table
                value = _merged(current, value)
            setattr(self, name, value)


def _merged(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        old = out.get(key)
        both = isinstance(old, Mapping) and isinstance(value, Mapping)
        out[key] = _merged(old, value) if both else value  # type: ignore[arg-type]
    return out


# --- sender limits ----------------------------------------------------------------------------

LIMIT_KINDS = ("per_client", "per_user", "per_sender")
_LIMIT_COUNTS = ("messages", "recipients")


def _positive(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"[limits] {where} must be a positive number")
    return float(value)


def sender_limits(table: Mapping[str, Any]) -> SenderLimits | None:
    """The core's SenderLimits for a ``[limits]`` table (see the module docstring).

    Returns:
        None when the table sets no limit (the default: no RateLimiter at all).

    Raises:
        ValueError: unknown keys, or counts and periods that are not positive numbers.
    """
    unknown = set(table) - {"period", "max_buckets", *LIMIT_KINDS}
    if unknown:
        raise ValueError(f"[limits]: unknown key {sorted(unknown)[0]!r}")
    period = _positive(table.get("period", 3600.0), "period")
    kinds: dict[str, Limit] = {}
    for kind in LIMIT_KINDS:
        sub = table.get(kind, {})
        if not isinstance(sub, Mapping):
            raise ValueError(f"[limits] {kind} must be a table")
        unknown = set(sub) - {"period", *_LIMIT_COUNTS}
        if unknown:
            raise ValueError(f"[limits.{kind}]: unknown key {sorted(unknown)[0]!r}")
        interval = _positive(sub.get("period", period), f"{kind}.period")
        rates = {
            what: Rate(count=_positive(sub[what], f"{kind}.{what}"), interval=interval)
            for what in _LIMIT_COUNTS
            if what in sub
        }
        kinds[kind] = Limit(**rates)
    if not any(limit.messages or limit.recipients for limit in kinds.values()):
        return None
    buckets = table.get("max_buckets", 100_000)
    if isinstance(buckets, bool) or not isinstance(buckets, int):
        raise ValueError("[limits] max_buckets must be an integer")
    try:
        return SenderLimits(**kinds, max_buckets=buckets)
    except LocalProtocolError as exc:
        raise ValueError(f"[limits]: {exc}") from None


def limit_options(items: Sequence[str]) -> dict[str, Any]:
    """``["per_client.messages=100", "period=60"]`` (``--limit``) -> a ``[limits]`` table.

    Raises:
        ValueError: not KEY=NUMBER.
    """
    table: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        try:
            value: float = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"--limit must be KEY=NUMBER, not {item!r}") from None
        if not sep or not key:
            raise ValueError(f"--limit must be KEY=NUMBER, not {item!r}")
        *path, last = key.replace("-", "_").split(".")
        node = table
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return table


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
            client_address=_client(session),
            authenticated_user=session.authenticated_as,
        )
        if not decision.allowed:
            return decision.reply
        return super().on_rcpt_to(session, event)  # type: ignore[misc]


class RateLimitPolicy:
    """Mixin in front of the spool handler: the core's RateLimiter (``SenderLimits``) charged
    one message per MAIL FROM and one recipient per RCPT TO, keyed by client address,
    authenticated user and envelope sender; refused requests get its ``450 4.7.1`` with the
    retry time.  Place it after RelayPolicy, so refused recipients cost nothing.

    ``limiter`` may be shared by several handlers and threads (``lock`` guards it); the clock
    is ``time.monotonic`` unless replaced."""

    limiter: RateLimiter | None = None
    lock: threading.Lock = threading.Lock()
    clock: Callable[[], float] = time.monotonic

    def on_mail_from(self, session: Session, event: MailFrom) -> Any:
        limiter = self.limiter
        if limiter is not None:
            with self.lock:
                decision = limiter.admit_message(
                    self.clock(),
                    client_address=_client(session),
                    user=_identity(session),
                    sender=event.address,
                )
            if not decision.allowed:
                assert decision.reply is not None
                log.info("%s MAIL refused: %s", session.id, decision.reply.text)
                return decision.reply
        return super().on_mail_from(session, event)  # type: ignore[misc]

    def on_rcpt_to(self, session: Session, event: RcptTo) -> Any:
        limiter = self.limiter
        if limiter is not None:
            sender = session.envelope.sender
            with self.lock:
                decision = limiter.admit_recipients(
                    self.clock(),
                    client_address=_client(session),
                    user=_identity(session),
                    sender=None if sender is None else sender.address,
                )
            if not decision.allowed:
                assert decision.reply is not None
                log.info("%s RCPT refused: %s", session.id, decision.reply.text)
                return decision.reply
        return super().on_rcpt_to(session, event)  # type: ignore[misc]


_AUTH_OK = Reply(code=235, text="2.7.0 Authentication successful")
_AUTH_FAILED = Reply(code=535, text="5.7.8 Authentication credentials invalid")
_AUTH_TEMPFAIL = Reply(code=454, text="4.7.0 Temporary authentication failure")


class AuthPolicy:
    """Mixin: AUTH PLAIN/LOGIN checked against a CredentialsFile (``235 2.7.0``, or ``535
    5.7.8``, RFC 4954 6).  The scrypt check runs on the file's thread pool: on asyncio and
    trio the handler returns an awaitable (the loop serves other sessions meanwhile), on
    threads it blocks the connection's own thread.  A PLAIN authorization identity other than
    the user itself is refused (no proxy authorization).  ``close()`` stops the pool."""

    credentials: CredentialsFile | None = None

    def on_auth(self, session: Session, event: AuthCredentials) -> Any:
        credentials = self.credentials
        if credentials is None:
            return super().on_auth(session, event)  # type: ignore[misc]
        authzid = event.authorization_id
        if authzid and user_key(authzid) != user_key(event.username):
            log.info("%s AUTH refused: authorization identity differs", session.id)
            return _AUTH_FAILED
        try:
            future = credentials.submit(event.username, event.password)
        except RuntimeError:
            return _AUTH_TEMPFAIL
        return when_done(future, lambda done: _auth_reply(session, event, done))

    def close(self) -> None:
        if self.credentials is not None:
            self.credentials.close()
        super().close()  # type: ignore[misc]


def _auth_reply(
    session: Session, event: AuthCredentials, future: concurrent.futures.Future[bool]
) -> Reply:
    shown = "".join(c if c.isprintable() else "?" for c in event.username)[:100]
    try:
        ok = future.result()
    except Exception as exc:
        log.error("%s AUTH check failed: %s", session.id, exc)
        return _AUTH_TEMPFAIL
    if ok:
        log.info("%s AUTH %s as %s from %s", session.id, event.mechanism, shown, session.peer[0])
        return _AUTH_OK
    log.info("%s AUTH failed for %s from %s", session.id, shown, session.peer[0])
    return _AUTH_FAILED


def _identity(session: Session) -> str | None:
    # the per-user limit's key: every spelling that logs in as a user is that user
    # ("b\u00adob" is "bob"; adapters/_credentials.py)
    user = session.authenticated_as
    return None if user is None else user_key(user)


def _client(session: Session) -> str:
    return session.peer[0].split("%", 1)[0]


def local_domains(settings: Settings, hostname: str) -> frozenset[str]:
    """The configured local domains plus this server's own name and ``localhost``: mail to
    postmaster@ the server itself must be delivered here (RFC 5321 4.5.1)."""
    names = {*settings.local_domains, hostname, "localhost"}
    return frozenset(d.lower().rstrip(".") for d in names)


class Listeners(BaseController):
    """Several Controllers (the main listener and the submission listener) run as one: they
    share ONE handler (so replacing ``handler.store`` reaches all of them), ``config`` is the
    first one's, ``addresses`` all of theirs in order; start() starts all or none, stop()
    stops them side by side (each gets the whole ``grace``).

    Args:
        controllers: the Controllers, main listener first; all with the same handler.
    """

    def __init__(self, controllers: Sequence[BaseController]) -> None:
        first = controllers[0]
        if any(c.handler is not first.handler for c in controllers):
            raise ValueError("the listeners must share one handler")
        super().__init__(first.handler, first.config, listen=first.listen)
        self.controllers = list(controllers)

    def start(self) -> None:
        started: list[BaseController] = []
        try:
            for controller in self.controllers:
                controller.start()
                started.append(controller)
        except BaseException:
            for controller in started:
                controller.stop()
            raise
        self.addresses = [a for c in self.controllers for a in c.addresses]

    @property
    def running(self) -> bool:
        """True while every listener runs."""
        return all(c.running for c in self.controllers)

    def stop(self, grace: float = 0.0) -> None:
        others = [
            threading.Thread(target=c.stop, args=(grace,), name="mailwire-stop")
            for c in self.controllers[1:]
        ]
        for thread in others:
            thread.start()
        self.controllers[0].stop(grace)
        for thread in others:
            thread.join()


def build(settings: Settings) -> tuple[BaseController, Settings]:
    """The server for ``settings`` (not started): one runtime Controller, or with
    ``submission_listen`` a Listeners group whose controllers share one handler.

    Raises:
        ValueError: inconsistent settings.
        OSError: the TLS files or the credentials file cannot be read.
    """
    if settings.runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}")
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ValueError("tls_cert and tls_key go together")
    if settings.implicit_tls and settings.tls_cert is None:
        raise ValueError("implicit_tls needs tls_cert and tls_key")
    if settings.submission_listen and settings.credentials is None:
        raise ValueError("submission_listen needs credentials (the users who may submit)")
    if settings.submission_implicit_tls and settings.tls_cert is None:
        raise ValueError("submission_implicit_tls needs tls_cert and tls_key")
    if settings.submission_listen and settings.tls_cert is None:
        if not settings.allow_plaintext_auth:
            raise ValueError(
                "submission_listen needs tls_cert and tls_key (AUTH is only offered over TLS),"
                " or allow_plaintext_auth = true"
            )
    limits = sender_limits(settings.limits)
    main_listen = [parse_listen(a) for a in settings.listen]
    submission_listen = [parse_listen(a) for a in settings.submission_listen]
    networks = tuple(ipaddress.ip_network(n, strict=False) for n in settings.relay_networks)
    tls: ssl.SSLContext | None = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(settings.tls_cert, settings.tls_key)
    try:
        config = ServerConfig(
            hostname=settings.hostname or _fqdn(),
            max_message_size=settings.max_message_size,
            max_recipients=settings.max_recipients,
            starttls=tls is not None and not settings.implicit_tls,
            command_timeout=settings.command_timeout,
            data_timeout=settings.data_timeout,
            # RFC 4954 4: AUTH only over TLS unless explicitly allowed
            auth_mechanisms=("PLAIN", "LOGIN") if settings.credentials is not None else (),
            auth_requires_tls=not settings.allow_plaintext_auth,
            auth_failure_delay=settings.auth_failure_delay,
        )
        # RFC 6409 4.3 and 5: a submission server authenticates its clients before MAIL
        submission = replace(
            config,
            starttls=tls is not None and not settings.submission_implicit_tls,
            auth_required=True,
        ) if submission_listen else config  # fmt: skip
    except LocalProtocolError as exc:
        raise ValueError(str(exc)) from None
    credentials = None
    if settings.credentials is not None:
        credentials = CredentialsFile(settings.credentials)
    if config.auth_mechanisms and tls is None and config.auth_requires_tls:
        log.warning("credentials given but no TLS: AUTH is never offered on the main listener")
    policy = type("SpoolServer", (AuthPolicy, RelayPolicy, RateLimitPolicy, SpoolHandler), {})
    try:
        handler: SpoolHandler = policy(settings.spool, store_format=settings.spool_format)
    except BaseException:
        if credentials is not None:
            credentials.close()
        raise
    handler.relay = RelayRules(  # type: ignore[attr-defined]
        local_domains=local_domains(settings, config.hostname),
        trusted_networks=networks,
    )
    handler.credentials = credentials  # type: ignore[attr-defined]
    handler.limiter = None if limits is None else RateLimiter(limits)  # type: ignore[attr-defined]
    handler.lock = threading.Lock()  # type: ignore[attr-defined]
    module = importlib.import_module(f"mailwire.adapters.{settings.runtime}")
    extra = {"pin_sessions": settings.pin_session_threads} if settings.runtime == "threads" else {}
    controller: BaseController = module.Controller(
        handler,
        config,
        listen=main_listen,
        tls_context=tls,
        implicit_tls=settings.implicit_tls,
        max_connections=settings.max_connections,
        **extra,
    )
    if not submission_listen:
        return controller, settings
    second: BaseController = module.Controller(
        handler,
        submission,
        listen=submission_listen,
        tls_context=tls,
        implicit_tls=settings.submission_implicit_tls,
        max_connections=settings.max_connections,
        **extra,
    )
    return Listeners([controller, second]), settings


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
    add("--spool-format", choices=STORE_FORMATS, help="auto (default): the spool's own, log if new")
    add("--tls-cert", metavar="PEM")
    add("--tls-key", metavar="PEM")
    add("--implicit-tls", action="store_true", default=None)
    add("--max-message-size", type=int, metavar="OCTETS")
    add("--max-recipients", type=int)
    add("--max-connections", type=int)
    add("--no-pin-session-threads", dest="pin_session_threads", action="store_false",
        default=None, help="threads runtime: let session threads run on every CPU")  # fmt: skip
    add("--command-timeout", type=float, metavar="SECONDS")
    add("--data-timeout", type=float, metavar="SECONDS")
    add("--grace", type=float, metavar="SECONDS")
    add("--relay-network", dest="relay_networks", action="append", metavar="CIDR")
    add("--local-domain", dest="local_domains", action="append", metavar="DOMAIN")
    add("--credentials", metavar="FILE", help="users for AUTH (see: mailwire passwd)")
    add("--submission-listen", action="append", metavar="HOST:PORT", help="repeatable")
    add("--submission-implicit-tls", action="store_true", default=None)
    add("--allow-plaintext-auth", action="store_true", default=None)
    add("--auth-failure-delay", type=float, metavar="SECONDS")
    add("--no-add-missing-headers", dest="add_missing_headers", action="store_false",
        default=None, help="leave submitted mail without Date or Message-ID as it is")  # fmt: skip
    add("--limit", dest="limits", action="append", metavar="KEY=NUMBER",
        help="sender limit, e.g. per_client.messages=100 (repeatable)")  # fmt: skip
    add("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # mta imports this module (it builds its server with build()), hence the late import
    from mailwire.adapters.mta import VERBS, add_delivery_options

    add_delivery_options(serve)
    passwd = commands.add_parser(
        "passwd", help="add a user to a credentials file, or change their password"
    )
    passwd.add_argument("file", help="the credentials file (created if missing, mode 0600)")
    passwd.add_argument("user")
    passwd.add_argument("--stdin", action="store_true", help="read the password from stdin")
    passwd.add_argument("--delete", action="store_true", help="remove the user instead")
    passwd.add_argument("--cost", type=int, default=SCRYPT_LN, metavar="LN",
                        help=f"log2 of the scrypt cost N (default {SCRYPT_LN})")  # fmt: skip
    queue = commands.add_parser("queue", help="manage the queue of a running server")
    queue.add_argument("verb", choices=VERBS)
    queue.add_argument("id", nargs="?")
    queue.add_argument("--spool", default="./spool", metavar="DIR")
    queue.add_argument("--json", action="store_true")
    return parser


def passwd_main(path: str, user: str, args: Mapping[str, Any]) -> int:
    """``mailwire passwd FILE USER``: add or change (or ``--delete``) a user.

    Returns:
        The exit status: 0 done, 1 no such user to delete, 2 bad input or unwritable file.
    """
    try:
        if args.get("delete"):
            if remove_user(path, user):
                print(f"mailwire: {user} removed from {path}", file=sys.stderr)
                return 0
            print(f"mailwire: no user {user} in {path}", file=sys.stderr)
            return 1
        if args.get("stdin"):
            line = sys.stdin.readline()
            password = line[:-1] if line.endswith("\n") else line
            password = password[:-1] if password.endswith("\r") else password
        else:
            password = getpass.getpass(f"Password for {user}: ")
            if getpass.getpass("Again: ") != password:
                print("mailwire: the passwords differ", file=sys.stderr)
                return 2
        changed = add_user(path, user, password, ln=int(args.get("cost", SCRYPT_LN)))
    except (ValueError, OSError) as exc:
        print(f"mailwire: {exc}", file=sys.stderr)
        return 2
    print(f"mailwire: {user} {'changed' if changed else 'added'} in {path}", file=sys.stderr)
    return 0


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
    if args["command"] == "passwd":
        return passwd_main(args["file"], args["user"], args)
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
        if args["limits"] is not None:
            args["limits"] = limit_options(args["limits"])
        settings.update({k: v for k, v in args.items() if v is not None}, "options")
        controller, settings = build(settings)
    except (ValueError, OSError, SpoolError, tomllib.TOMLDecodeError) as exc:
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

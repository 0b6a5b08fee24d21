# The delivery agent's runtime-free half: one SMTP session toward one target as an I/O-free
# job, the translation of that session into the DeliveryWalk's outcomes, and the small pieces
# that turn queue records, walk results and completions into the next thing to store or send.
#
# Strategy.  Every protocol decision already lives in the pure core:
#   * protocol/_routing.py + _dnsquery.py decide where a recipient goes (local, which MX
#     hosts in which order, null MX, NXDOMAIN ...) and DeliveryWalk decides, outcome by
#     outcome, which recipient is final and when the next target gets the rest;
#   * protocol/_transaction.py's SessionSetup and MailTransaction speak SMTP;
#   * protocol/_queue.py's Scheduler decides when to try again and when to give up;
#   * protocol/_dsn.py writes the bounce.
# This module only connects them.  DeliverySession chains SessionSetup, a MailTransaction
# whose envelope is fitted to what the server offers, and QUIT, behind the loop every runtime
# runs (adapters/_delivery_anyio.py on asyncio/trio, adapters/_delivery_threads.py on blocking
# sockets; the agent logic around it is adapters/_agent.py's, written once):
#
#     job = DeliverySession(walk, ...)
#     while True:
#         while out := job.data_to_send(): write(out)  # content comes out chunk by chunk
#         if job.done: break
#         if job.wants_tls: handshake(); job.tls_established(); continue
#         data = read(timeout=job.wait_time(now))    # timeout -> job.check_timeout(now)
#         job.receive_data(data, now=now) if data else job.receive_eof()
#     job.feed_walk()                                  # the walk learns what happened
#
# and a connection that cannot be made is ConnectFailed fed to the walk directly.
#
# The envelope sent to the next hop (RFC 3461 4, RFC 6152, RFC 6531, RFC 1870):
#   * SIZE= is declared when the server offers SIZE;
#   * BODY=8BITMIME is kept only when the server offers 8BITMIME (Postfix's behaviour: the
#     content is sent as it is otherwise);
#   * SMTPUTF8: "If the SMTPUTF8 extension is not offered ... the message MUST NOT be
#     transmitted" unchanged (RFC 6531 3.2): the recipients fail with 553 5.6.7;
#   * RET/ENVID and NOTIFY/ORCPT go out only when the server offers DSN (RFC 3461 4: the
#     parameters are relayed to a DSN-capable server, dropped otherwise).  Whether it offered
#     DSN (``offers_dsn``) becomes each delivered recipient's Handoff (protocol/_queue.py):
#     DSN_PASSED (the next hop reports success) or RELAYED (RFC 3461 4.2: this MTA sends the
#     "relayed" notice NOTIFY=SUCCESS asked for); LMTP and local delivery are MAILBOX.
#
# Opportunistic STARTTLS (RFC 3207, RFC 7435): used whenever the server offers it, without
# certificate verification (an MX host name comes from unauthenticated DNS, so verifying it
# proves nothing without DANE or MTA-STS; encryption still defeats passive eavesdropping).
#
# Connection reuse: with ``keep_open`` a clean transaction ends with RSET rather than QUIT,
# and a 250 leaves the session ``parked`` for the agent's connection cache
# (adapters/_agent.py); a session built with ``reuse=`` (a parked session's SessionSetup)
# sends MAIL at once.  If it dies before MAIL is answered (EOF, reset, 421: the server closed
# it while idle) it is ``stale``: nothing was offered, so the agent connects afresh and the
# walk never hears of it.  Once MAIL is answered the session is a normal one.
#
# The classic duplicate (RFC 1047, RFC 5321 6.1): when the connection breaks after the final
# dot and before the reply, the message may or may not have been taken; the agent cannot know
# and must not lose it, so the recipients stay queued (ConnectionLost) and are tried again.
from __future__ import annotations

import dataclasses
import enum
import json
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mailwire.adapters._client_driver import ClientSession
from mailwire.protocol._client import ClientConnection
from mailwire.protocol._config import ClientConfig
from mailwire.protocol._dsn import DSNMessage, build_dsn
from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._events import (
    MailFrom,
    RcptTo,
    Reply,
)
from mailwire.protocol._queue import (
    Completion,
    Delivery,
    Handoff,
    QueuedMessage,
    Recipient,
    RecipientState,
    RetryPolicy,
)
from mailwire.protocol._queue import RecipientStatus as QueueStatus
from mailwire.protocol._routing import (
    ConnectionLost,
    DeliveryWalk,
    MessageReply,
    NextHop,
    RecipientReply,
    RecipientStatus,
    RoutingConfig,
    SessionReply,
    Stage,
    Target,
    WalkResult,
)
from mailwire.protocol._submission import missing_fields
from mailwire.protocol._trace import (
    DEFAULT_MAX_RECEIVED,
    TraceInfo,
    check_hop_count,
    count_received,
    received_header,
    with_protocol,
)
from mailwire.protocol._transaction import MailTransaction, SessionSetup

Nameservers = Sequence[tuple[str, int]]


class TLSPolicy(enum.Enum):
    """Outbound STARTTLS."""

    OPPORTUNISTIC = "opportunistic"  #: STARTTLS when offered, no certificate check
    NONE = "none"  #: never


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryConfig:
    """How the delivery agent delivers.

    Attributes:
        hostname: this MTA's name: the EHLO argument, and the Reporting-MTA of bounces.
        routing: routing tables; ``routing.smtp_port`` is the delivery port (25 by default).
        nameservers: (address, port) pairs to ask (None: the system resolver configuration).
        retry: the retry policy of the queue.
        tls: outbound STARTTLS policy.
        connect_timeout: seconds to wait for a TCP connection.
        reply_timeout: seconds to wait for any single reply (the engine's RFC 5321 4.5.3.2
            timeouts apply too).
        dns_timeout: seconds per DNS server; dns_lifetime: per query in all.
        dns_cache_size: answers the agent's DNS cache keeps, shared by every delivery and
            kept as long as their TTLs allow (adapters/_dns.DnsCache); 0: no cache.
        max_connections: targets tried per attempt at most (None: all of them).
        max_deliveries: deliveries in flight at once, all destinations together.
        client: the client engine's configuration (None: derived from ``hostname``).
        lmtp: deliver local domains over LMTP (RFC 2033) to this mailbox server (a
            NextHop without MX lookup, e.g. ``NextHop.parse("[127.0.0.1]:24")``) instead of
            the local delivery callable; None: the callable.
        connection_cache_time: seconds a session stays open (after RSET) once its message
            is done, for the next message to the same target (address, port, TLS policy,
            SMTP or LMTP) to reuse without a new connection, greeting and EHLO (Postfix's
            connection cache); 0: never cached.
        connection_cache_size: sessions kept open at most, all targets together (the
            oldest is closed to make room).
        connection_reuse_limit: transactions a session carries after its first at most;
            then it ends with QUIT.
        add_missing_headers: give a message from an authenticated client the Date and
            Message-ID fields it lacks as it leaves (RFC 6409 8.2, 8.3; see with_received).
    """

    hostname: str = "localhost"
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    nameservers: tuple[tuple[str, int], ...] | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    tls: TLSPolicy = TLSPolicy.OPPORTUNISTIC
    connect_timeout: float = 30.0
    reply_timeout: float = 300.0
    dns_timeout: float = 5.0
    dns_lifetime: float = 15.0
    dns_cache_size: int = 10_000
    max_connections: int | None = None
    max_deliveries: int = 100
    client: ClientConfig | None = None
    lmtp: NextHop | None = None
    connection_cache_time: float = 2.0
    connection_cache_size: int = 32
    connection_reuse_limit: int = 100
    add_missing_headers: bool = True

    def __post_init__(self) -> None:
        for name in ("connection_cache_time", "connection_cache_size", "connection_reuse_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    def client_config(self, *, lmtp: bool = False) -> ClientConfig:
        """The client engine configuration to use (for SMTP, or for LMTP)."""
        config = self.client or ClientConfig(local_hostname=self.hostname)
        return dataclasses.replace(config, lmtp=lmtp) if config.lmtp != lmtp else config


def opportunistic_context() -> ssl.SSLContext:
    """The SSLContext of opportunistic STARTTLS: encryption without authentication."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --- one session toward one target ------------------------------------------------------------


class DeliverySession(ClientSession):
    """One SMTP session with the walk's current target; no I/O (see the module comment).

    The session mechanics (setup, timeouts, QUIT) are ClientSession's, shared with
    ``send_message``; this class chooses what is offered and reports to the walk.

    Args:
        walk: the delivery walk; its ``current`` target is the one connected to, and its
            ``pending`` recipients are offered.
        sender: the stored MAIL command (address, BODY, SMTPUTF8, RET, ENVID).
        recipients: the queue records by address (for NOTIFY and ORCPT).
        content: the message content (CRLF line endings, not dot-stuffed).
        config: the client engine configuration.
        starttls: None: STARTTLS when offered; False: never.
        timeout: the longest wait for any single reply, seconds.
        now: the current (monotonic) time.
        reuse: the setup of a cached open session with the same target (connection reuse:
            the transaction starts at once, on that session's connection), or None.
        keep_open: end a clean transaction with RSET and leave the session open (``parked``)
            instead of QUIT.

    Raises:
        LocalProtocolError: the walk has no session in progress.
    """

    def __init__(
        self,
        walk: DeliveryWalk,
        *,
        sender: MailFrom,
        recipients: Mapping[str, Recipient],
        content: bytes,
        config: ClientConfig,
        starttls: bool | None,
        timeout: float,
        now: float,
        reuse: SessionSetup | None = None,
        keep_open: bool = False,
    ) -> None:
        if walk.current is None:
            raise LocalProtocolError("the walk has no session in progress")
        conn = ClientConnection(config, now=now) if reuse is None else reuse.conn
        super().__init__(
            conn,
            starttls=starttls,
            sasl=None,
            timeout=timeout,
            now=now,
            setup=reuse,
            keep_open=keep_open,
        )
        self.walk = walk
        self.target: Target = walk.current
        self.offered = walk.pending
        self.refusal: Reply | None = None  # our own refusal to send (SMTPUTF8)
        self.tls_failed = False  # set by the runtime when the STARTTLS handshake failed
        self.reused = reuse is not None
        self._sender = sender
        self._recipients = recipients
        self._content = content
        if reuse is not None:
            self._advance()  # no greeting to wait for: MAIL goes out at once

    def _start_transaction(self) -> MailTransaction | None:
        if self._sender.smtputf8 and not self.conn.has_extension("SMTPUTF8"):
            # RFC 6531 3.2: without SMTPUTF8 at the server the message MUST NOT go out as it
            # is; "553 5.6.7" is the code RFC 6531 3.7.1 suggests for the refusal.
            self.refusal = Reply(
                code=553, text=f"5.6.7 {self.target.host} does not support SMTPUTF8"
            )
            return None
        return MailTransaction(
            self.conn,
            sender=self._mail_from(),
            recipients=[self._rcpt_to(a) for a in self.offered],
            body=[self._content],
            now=self._now,
        )

    def _mail_from(self) -> MailFrom:
        stored, conn = self._sender, self.conn
        dsn = conn.has_extension("DSN")
        body = stored.body
        if body is not None and not conn.has_extension(body):  # 8BITMIME / BINARYMIME
            body = None
        return MailFrom(
            address=stored.address,
            size=len(self._content) if conn.has_extension("SIZE") else None,
            body=body,
            smtputf8=stored.smtputf8,
            ret=stored.ret if dsn else None,
            envid=stored.envid if dsn else None,
        )

    def _rcpt_to(self, address: str) -> RcptTo:
        rcpt = self._recipients.get(address)
        if rcpt is None or not self.conn.has_extension("DSN"):
            return RcptTo(address=address)
        return RcptTo(address=address, notify=rcpt.notify, orcpt=rcpt.orcpt)

    # -- the outcome ---------------------------------------------------------------------------

    @property
    def stale(self) -> bool:
        """A reused session that turned out dead before the server answered MAIL (closed
        while idle, reset, or a 421): nothing was decided, so the caller connects afresh
        without counting an attempt, and does not feed the walk."""
        if not self.reused or self.refusal is not None:
            return False
        if self.transaction is None:  # the cached engine could not start one (closed)
            return True
        mail = self.transaction.result.mail
        return mail is None or mail.code == 421

    @property
    def offers_dsn(self) -> bool:
        """The server offered DSN (RFC 3461) in its (last) EHLO reply."""
        return self.conn.has_extension("DSN")

    @property
    def handoff(self) -> Handoff:
        """How a recipient this session delivered left: MAILBOX for LMTP (final delivery),
        else DSN_PASSED or RELAYED as the server offered DSN or not (RFC 3461 4.2)."""
        if self.conn.config.lmtp:
            return Handoff.MAILBOX
        return Handoff.DSN_PASSED if self.offers_dsn else Handoff.RELAYED

    def feed_walk(self) -> None:
        """Tell the walk what this session decided (call once, when ``done``)."""
        walk, setup = self.walk, self.setup.result
        reason = self.error or "the session ended early"
        if not setup.ok:
            reply = setup.reply
            if reply is not None and reply.code >= 400:
                if setup.greeting is None or reply is setup.greeting:
                    stage = Stage.GREETING
                elif setup.hello is None:
                    stage = Stage.HELLO
                elif self.conn.tls_active or self.setup.wants_tls:
                    stage = Stage.AUTH
                else:
                    stage = Stage.STARTTLS
                walk.feed(SessionReply(stage=stage, reply=reply))
            else:
                walk.feed(ConnectionLost(reason=setup.error or reason))
            return
        if self.refusal is not None:
            walk.feed(SessionReply(stage=Stage.MAIL, reply=self.refusal))
            return
        if self.transaction is None:
            walk.feed(ConnectionLost(reason=reason))
            return
        result = self.transaction.result
        reason = self.error or result.error or reason
        if result.mail is None:
            walk.feed(ConnectionLost(reason=reason))
            return
        if not result.mail.is_positive:
            walk.feed(SessionReply(stage=Stage.MAIL, reply=result.mail))
            return
        for rcpt in result.recipients:
            if walk.current is None:
                return  # a 421 ended the session
            if rcpt.reply is None:
                walk.feed(ConnectionLost(reason=reason))
                return
            walk.feed(RecipientReply(recipient=rcpt.command.address, reply=rcpt.reply))
        if walk.current is None or not walk.accepted:
            return
        if self.conn.config.lmtp:
            for rcpt in result.recipients:
                if walk.current is None:
                    return
                if rcpt.accepted:
                    if rcpt.final is None:
                        walk.feed(ConnectionLost(reason=reason))
                        return
                    walk.feed(MessageReply(reply=rcpt.final, recipient=rcpt.command.address))
            return
        if result.data is None or result.data.code < 200 or result.data.code == 354:
            # RFC 5321 6.1: no reply after the data -- perhaps delivered, perhaps not; the
            # message must not be lost, so it stays queued (a duplicate is the lesser harm).
            walk.feed(ConnectionLost(reason=reason))
            return
        walk.feed(MessageReply(reply=result.data))


# --- from walk results to scheduler input -----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptReport:
    """What one delivery attempt tells the Scheduler.

    Attributes:
        replies: the deciding reply per recipient address.
        remote_mta: the host that gave the replies (for DSNs), if any did.
        connection_failed: no host could be talked to at all (the destination backs off).
    """

    replies: dict[str, Reply]
    remote_mta: str | None = None
    connection_failed: bool = False


def report_from_results(results: Sequence[WalkResult]) -> AttemptReport:
    """Fold DeliveryWalk results (of one or more routes) into scheduler input.

    ``connection_failed`` is True when every recipient was deferred without any target
    giving it a reply: the whole destination was unreachable (or its DNS failed), so the
    Scheduler backs the destination off instead of each message on its own.
    """
    replies = {r.recipient: r.reply for r in results}
    hosts = [r.target.host for r in results if r.target is not None]
    failed = bool(results) and all(
        r.status is RecipientStatus.DEFERRED and r.target is None for r in results
    )
    return AttemptReport(
        replies=replies, remote_mta=hosts[0] if hosts else None, connection_failed=failed
    )


def queued_message(
    queue_id: str,
    *,
    sender: MailFrom,
    recipients: Sequence[RcptTo],
    arrival: float,
    size: int,
) -> QueuedMessage:
    """The queue record of a stored message (duplicate recipient addresses kept once)."""
    seen: dict[str, Recipient] = {}
    for rcpt in recipients:
        seen.setdefault(rcpt.address, Recipient.from_rcpt(rcpt))
    return QueuedMessage(
        queue_id=queue_id,
        sender=sender.address,
        recipients=tuple(seen.values()),
        arrival=arrival,
        size=size,
        envid=sender.envid,
        ret=sender.ret,
    )


def notifications(
    completion: Completion,
    message: QueuedMessage,
    *,
    hostname: str,
    now: float,
    content: bytes | None,
    policy: RetryPolicy,
) -> list[DSNMessage]:
    """The DSNs one completed attempt owes the sender: a bounce for the recipients that
    failed in it, a delay notice when the Scheduler says it is time for one, and a success
    notice for recipients delivered in it that asked NOTIFY=SUCCESS ("delivered" into a
    mailbox, "relayed" to a next hop without DSN; nothing for a next hop that took the
    request over: RFC 3461 4.2, 6.2.1; build_dsn decides).  Empty for a null sender (RFC 5321
    6.1: never a bounce for a bounce) and as NOTIFY says.

    Args:
        completion: from Scheduler.complete.
        message: the queued message.
        hostname: the Reporting-MTA.
        now: the time of the notification.
        content: the original content (returned as RET says), or None.
        policy: the retry policy (for Will-Retry-Until).
    """
    out: list[DSNMessage] = []
    if completion.failed:
        dsn = build_dsn(message, completion.failed, hostname=hostname, now=now, original=content)
        if dsn is not None:
            out.append(dsn)
    if completion.delay_warning and completion.deferred:
        dsn = build_dsn(
            message,
            completion.deferred,
            hostname=hostname,
            now=now,
            original=content,
            will_retry_until=message.arrival + policy.lifetime,
        )
        if dsn is not None:
            out.append(dsn)
    if completion.delivered:
        dsn = build_dsn(message, completion.delivered, hostname=hostname, now=now, original=content)
        if dsn is not None:
            out.append(dsn)
    return out


def delivery_recipients(delivery: Delivery) -> dict[str, Recipient]:
    """The leased recipients by address."""
    return {r.address: r for r in delivery.recipients}


def with_received(
    content: bytes,
    *,
    peer: str,
    hello: str | None,
    tls: bool,
    authenticated: bool,
    smtputf8: bool,
    recipients: Sequence[str],
    queue_id: str,
    hostname: str,
    arrival: float,
    add_missing_headers: bool = False,
) -> bytes:
    """Prepend the Received field of the hop that accepted the message (RFC 5321 4.4: the
    server "MUST insert trace ... information at the beginning of the message content"), and
    for a submitted message the Date and Message-ID it lacks (RFC 6409 8.2, 8.3).

    The spool stores the content as received; the agent adds the trace field when the message
    leaves (relay or final delivery), from the facts the spool kept.  A message without a peer
    (generated here: a bounce) gets none.  ``for`` names the recipient only when there is
    exactly one (RFC 5321 7.2: listing several would leak Bcc recipients).  With
    ``add_missing_headers`` and an ``authenticated`` client, protocol/_submission.py's
    missing_fields() follow the Received field: the Date of the arrival, the Message-ID
    ``<queue_id@hostname>`` (the same on every attempt and after a restart).
    """
    if not peer:
        return content
    added = b""
    if add_missing_headers and authenticated:
        added = missing_fields(content, arrival=arrival, queue_id=queue_id, hostname=hostname)
    try:
        header = received_header(
            TraceInfo(
                helo=hello or f"[{peer}]",
                client_address=peer.split("%", 1)[0],
                by=hostname,
                protocol=with_protocol(tls=tls, authenticated=authenticated, smtputf8=smtputf8),
                queue_id=queue_id,
                recipient=recipients[0] if len(recipients) == 1 else None,
                timestamp=arrival,
            )
        )
    except (ValueError, LocalProtocolError):
        return added + content
    return header + added + content


def loop_reply(content: bytes, *, limit: int = DEFAULT_MAX_RECEIVED) -> Reply | None:
    """554 5.4.6 when the message already carries more than ``limit`` Received fields (RFC
    5321 6.3), else None."""
    return check_hop_count(count_received(content), limit=limit)


# --- recipient journal: final results survive a restart ------------------------------------


class RecipientJournal:
    """Which recipients of a spooled message are final already, on disk.

    The spool stores a message and its envelope once, at acceptance; the journal adds one
    append-only file per message (``<directory>/<queue ID>``), one JSON line per recipient that
    became DELIVERED or FAILED, fsync()ed before the agent goes on.  After a crash, start()
    restores those states into the Scheduler, so a recipient that got the message is not sent
    it again, and one that bounced is not bounced twice.  A torn last line (a crash mid-append)
    is ignored: that recipient is simply tried again (at least once, never lost).

    Order of the agent's writes after an attempt: notifications (stored in the spool) first,
    then the journal, then the removal of a finished message -- so each crash point leaves
    either a repeatable step or nothing to do.

    A sent delay notice is journaled too (a ``{"notice": "delayed"}`` line): the Scheduler
    forgets across a restart that it signalled one, and RFC 3464's delay notice is sent once
    per message, not once per process lifetime.

    Args:
        directory: where the journal files live (created if missing).
        fsync: flush each append (False only for tests).
    """

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.directory = os.fspath(directory)
        self.fsync = fsync
        os.makedirs(self.directory, mode=0o700, exist_ok=True)

    def _path(self, queue_id: str) -> str:
        if not queue_id or not queue_id.isalnum():
            raise ValueError(f"not a queue ID: {queue_id!r}")
        return os.path.join(self.directory, queue_id)

    def record(
        self, queue_id: str, states: Sequence[RecipientState], *, delay_notice: bool = False
    ) -> None:
        """Append the final ``states`` (others are ignored) durably, and the fact that a
        delay notice was sent when ``delay_notice``."""
        lines = []
        for st in states:
            if not st.status.is_final:
                continue
            reply = st.reply
            entry = {
                "address": st.recipient.address,
                "status": st.status.value,
                "code": None if reply is None else reply.code,
                "text": None if reply is None else reply.text,
                "remote_mta": st.remote_mta,
                "expired": st.expired,
                "attempts": st.attempts,
                "last_attempt": st.last_attempt,
            }
            lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
        if delay_notice:
            lines.append(json.dumps({"notice": "delayed"}) + "\n")
        if not lines:
            return
        fd = os.open(
            self._path(queue_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            data = "".join(lines).encode("utf-8", "surrogatepass")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def states(self, message: QueuedMessage) -> list[RecipientState]:
        """The recorded states of ``message``'s recipients (PENDING when none)."""
        found: dict[str, RecipientState] = {}
        by_address = {r.address: r for r in message.recipients}
        for line in self._read(message.queue_id).split(b"\n"):
            try:
                entry = json.loads(line)
                rcpt = by_address[entry["address"]]
                reply = (
                    None
                    if entry["code"] is None
                    else Reply(code=int(entry["code"]), text=str(entry["text"]))
                )
                found[rcpt.address] = RecipientState(
                    recipient=rcpt,
                    status=QueueStatus(entry["status"]),
                    reply=reply,
                    remote_mta=entry["remote_mta"],
                    expired=bool(entry["expired"]),
                    attempts=int(entry["attempts"]),
                    last_attempt=entry["last_attempt"],
                )
            except (ValueError, KeyError, TypeError, LocalProtocolError):
                continue  # a torn or foreign line: that recipient is tried again
        return [found.get(r.address, RecipientState(recipient=r)) for r in message.recipients]

    def delay_notice_sent(self, queue_id: str) -> bool:
        """True if a delay notice was recorded for the message."""
        for line in self._read(queue_id).split(b"\n"):
            try:
                if json.loads(line).get("notice") == "delayed":
                    return True
            except (ValueError, AttributeError):
                continue  # a torn line
        return False

    def _read(self, queue_id: str) -> bytes:
        try:
            with open(self._path(queue_id), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def forget(self, queue_id: str) -> None:
        """Remove a finished message's journal."""
        try:
            os.unlink(self._path(queue_id))
        except FileNotFoundError:
            pass

    def list(self) -> list[str]:
        """The queue IDs that have a journal."""
        return sorted(os.listdir(self.directory))


__all__ = [
    "AttemptReport",
    "DeliveryConfig",
    "DeliverySession",
    "Nameservers",
    "RecipientJournal",
    "TLSPolicy",
    "delivery_recipients",
    "loop_reply",
    "with_received",
    "notifications",
    "opportunistic_context",
    "queued_message",
    "report_from_results",
]

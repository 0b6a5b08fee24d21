# The client side shared by the three runtimes: turning a message into an envelope and bytes,
# and one session's whole course (setup, transaction, QUIT) as a single I/O-free job.
#
# Strategy.  protocol/_transaction.py already has the two pure drivers a submission needs:
# SessionSetup (greeting, EHLO/HELO, STARTTLS, EHLO again, AUTH) and MailTransaction (MAIL,
# RCPT..., DATA or BDAT, content, replies).  SendJob chains them and ends the session with
# QUIT, behind the one loop every runtime adapter runs:
#
#     job = SendJob(...)
#     while True:
#         write(job.data_to_send())
#         if job.done: break
#         if job.wants_tls: handshake(); job.tls_established(); continue
#         data = read(timeout=job.wait_time(now))      # TimeoutError -> job.check_timeout
#         job.receive_data(data, now) if data else job.receive_eof()
#     return job.outcome()                              # SendResult, or SendError raised
#
# The envelope of an EmailMessage follows smtplib.send_message: the sender from Sender: or
# From:, the recipients from To:, Cc: and Bcc: (Resent-* when the message is a resend), and
# Bcc:/Resent-Bcc: are removed from the copy that is sent.  The content is generated with
# CRLF line endings (RFC 5321 2.3.8); BODY=8BITMIME is declared when it has 8-bit octets (RFC
# 6152), SMTPUTF8 when an address is not ASCII (RFC 6531 3.4), SIZE when offered (RFC 1870).
#
# TLS: "starttls" requires STARTTLS (the session fails rather than send in clear text),
# "opportunistic" uses it when offered, "implicit" speaks TLS from the first byte (RFC 8314
# 3.3, port 465), "none" never.  The default SSLContext verifies the certificate and the host
# name (ssl.create_default_context()).  AUTH happens only over TLS unless the ClientConfig
# says otherwise (RFC 4954 4).
from __future__ import annotations

import email.generator
import email.policy
import email.utils
import io
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from typing import Literal, TypeAlias

from mailwire.protocol._client import (
    ClientConnection,
    LoginAuth,
    PlainAuth,
    SaslMechanism,
)
from mailwire.protocol._config import ClientConfig
from mailwire.protocol._errors import LocalProtocolError, RemoteProtocolError
from mailwire.protocol._events import (
    NEED_DATA,
    PAUSED,
    Auth,
    AuthResponse,
    ConnectionClosed,
    MailFrom,
    Quit,
    RcptTo,
    Reply,
    Rset,
)
from mailwire.protocol._state import SessionState
from mailwire.protocol._transaction import (
    MailTransaction,
    SessionSetup,
    SetupResult,
    TransactionResult,
)

TLSMode: TypeAlias = Literal["starttls", "opportunistic", "implicit", "none"]
Credentials: TypeAlias = "tuple[str, str] | SaslMechanism | None"
READ_SIZE = 64 * 1024
DEFAULT_PORTS = {"implicit": 465, "starttls": 587, "opportunistic": 25, "none": 25}


class SendError(Exception):
    """The message reached no recipient (refused, or the session failed).

    Attributes:
        result: what happened, step by step.
    """

    def __init__(self, message: str, result: SendResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True, slots=True, kw_only=True)
class SendResult:
    """The outcome of send_message().

    Attributes:
        setup: the session setup (greeting, EHLO, STARTTLS, AUTH).
        transaction: the mail transaction, or None if it never started.
        error: why the submission failed before a reply decided it, or None.
    """

    setup: SetupResult
    transaction: TransactionResult | None = None
    error: str | None = None

    @property
    def delivered(self) -> tuple[str, ...]:
        """The recipients the server took the message for."""
        if self.transaction is None:
            return ()
        return tuple(r.address for r in self.transaction.delivered)

    @property
    def rejected(self) -> dict[str, Reply | None]:
        """Recipients the message did not reach, with the reply that refused each (None when
        no reply did: the session failed first)."""
        if self.transaction is None:
            return {}
        out: dict[str, Reply | None] = {}
        for r in self.transaction.rejected:
            reply = r.reply if (r.reply is None or not r.reply.is_positive) else r.final
            if reply is None and self.transaction.data is not None:
                reply = self.transaction.data
            out[r.command.address] = reply
        return out

    @property
    def ok(self) -> bool:
        """True if every recipient got the message."""
        return self.error is None and self.transaction is not None and self.transaction.ok


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A message ready to send: the envelope (without server-dependent parameters) and the
    content with CRLF line endings."""

    sender: MailFrom
    recipients: tuple[RcptTo, ...]
    content: bytes
    eight_bit: bool
    international: bool


def prepare(
    message: Message | bytes,
    *,
    sender: str | MailFrom | None = None,
    recipients: Sequence[str | RcptTo] | str | None = None,
) -> Prepared:
    """Work out the envelope and the bytes to send.

    Args:
        message: an email.message.(Email)Message, or the content as bytes.
        sender: the reverse-path (or a MailFrom with DSN parameters); from the headers of a
            Message when None ("" is the null sender).
        recipients: the forward-paths (or RcptTo commands); from To/Cc/Bcc when None.

    Returns:
        The Prepared message.

    Raises:
        ValueError: no sender or no recipient could be found, or bytes without both.
    """
    if isinstance(recipients, str):
        recipients = [recipients]
    if isinstance(message, Message):
        resent = message.get_all("Resent-Date")
        if resent is not None and len(resent) > 1:
            raise ValueError("message has more than one Resent- header block")
        prefix = "Resent-" if resent else ""
        if sender is None:
            header = message[prefix + "Sender"] or message[prefix + "From"]
            if header is None:
                raise ValueError("no sender: give sender= or a From: header")
            sender = email.utils.getaddresses([str(header)])[0][1]
        if recipients is None:
            values = [
                str(v)
                for name in ("To", "Cc", "Bcc")
                for v in (message.get_all(prefix + name) or [])
            ]
            recipients = [addr for _, addr in email.utils.getaddresses(values) if addr]
        copy = _copy_without_bcc(message)
        addresses = [sender if isinstance(sender, str) else sender.address]
        addresses += [r if isinstance(r, str) else r.address for r in recipients]
        international = not all(a.isascii() for a in addresses)
        content = _generate(copy, international)
    else:
        if sender is None or recipients is None:
            raise ValueError("sending bytes needs sender= and recipients=")
        content = bytes(message)
        addresses = [sender if isinstance(sender, str) else sender.address]
        addresses += [r if isinstance(r, str) else r.address for r in recipients]
        international = not all(a.isascii() for a in addresses)
    if not recipients:
        raise ValueError("no recipients")
    mail = sender if isinstance(sender, MailFrom) else MailFrom(address=sender)
    rcpts = tuple(r if isinstance(r, RcptTo) else RcptTo(address=r) for r in recipients)
    return Prepared(
        sender=mail,
        recipients=rcpts,
        content=content,
        eight_bit=not content.isascii(),
        international=international,
    )


def _copy_without_bcc(message: Message) -> Message:
    if message.get("Bcc") is None and message.get("Resent-Bcc") is None:
        return message
    copy: Message = email.message_from_bytes(
        message.as_bytes(policy=message.policy), policy=message.policy
    )
    del copy["Bcc"]
    del copy["Resent-Bcc"]
    return copy


def _generate(message: Message, international: bool) -> bytes:
    buf = io.BytesIO()
    policy = message.policy.clone(linesep="\r\n")
    if international and isinstance(policy, email.policy.EmailPolicy):
        policy = policy.clone(utf8=True)
    email.generator.BytesGenerator(buf, policy=policy, mangle_from_=False).flatten(message)
    return buf.getvalue()


class _AutoLogin(SaslMechanism):
    """PLAIN when the server offers it, else LOGIN (decided after EHLO)."""

    def __init__(self, conn: ClientConnection, username: str, password: str) -> None:
        self._conn = conn
        self._plain = PlainAuth(username=username, password=password)
        self._login = LoginAuth(username=username, password=password)

    def __repr__(self) -> str:
        return "_AutoLogin(...)"

    @property  # type: ignore[override,unused-ignore]
    def mechanism(self) -> str:  # type: ignore[override]
        offered = self._conn.auth_mechanisms
        return "LOGIN" if "PLAIN" not in offered and "LOGIN" in offered else "PLAIN"

    def _chosen(self) -> SaslMechanism:
        return self._login if self.mechanism == "LOGIN" else self._plain

    def start(self) -> Auth:
        return self._chosen().start()

    def respond(self, challenge: Reply) -> AuthResponse:
        return self._chosen().respond(challenge)


def client_context(tls_context: ssl.SSLContext | None) -> ssl.SSLContext:
    """The given context, or a verifying default one (certificate and host name)."""
    return tls_context if tls_context is not None else ssl.create_default_context()


def check_tls_mode(tls: str) -> TLSMode:
    """Validate ``tls``.

    Raises:
        ValueError: not one of starttls, opportunistic, implicit, none.
    """
    if tls not in DEFAULT_PORTS:
        raise ValueError(f"tls must be one of {sorted(DEFAULT_PORTS)}, not {tls!r}")
    return tls  # type: ignore[return-value]


class ClientSession:
    """One client session without I/O: SessionSetup, the one transaction a subclass makes in
    ``_start_transaction``, then QUIT (or, with ``keep_open``, RSET and the session left open
    for the next transaction: the delivery agent's connection cache).  Shared by
    ``send_message`` (SendJob) and the MTA's delivery (adapters/_delivery.DeliverySession);
    the runtimes only move bytes.

    Args:
        conn: a fresh client engine.
        starttls: as SessionSetup's (True: required, None: when offered, False: never).
        sasl: the SASL mechanism for SessionSetup, or None.
        timeout: longest wait for any single reply, seconds (on top of the engine's RFC 5321
            deadlines, which are minutes long).
        now: the current time (monotonic clock).
        setup: the finished, successful SessionSetup of an open session to carry this
            transaction (connection reuse: no greeting, no EHLO); ``conn`` must be its
            connection.  The subclass starts the transaction with ``_advance()`` once it is
            ready.  None: a fresh session.
        keep_open: after a clean transaction, end with RSET instead of QUIT and, when the
            server accepts it, leave the session open (``parked``) for the next one.
    """

    def __init__(
        self,
        conn: ClientConnection,
        *,
        starttls: bool | None,
        sasl: SaslMechanism | None,
        timeout: float,
        now: float,
        setup: SessionSetup | None = None,
        keep_open: bool = False,
    ) -> None:
        self.conn = conn
        if setup is None:
            setup = SessionSetup(conn, starttls=starttls, sasl=sasl, now=now)
        elif setup.conn is not conn or not setup.result.ok:
            raise LocalProtocolError("a reused session needs its own successful setup")
        self.setup = setup
        self.transaction: MailTransaction | None = None
        self.timeout = timeout
        self.error: str | None = None
        self.done = False
        self.keep_open = keep_open
        self.parked = False  # done, and left open after RSET for another transaction
        self._parking = False
        self._quitting = False
        self._now = now
        self._last_progress = now

    # --- what the adapter asks ------------------------------------------------------------------

    @property
    def wants_tls(self) -> bool:
        """Do the STARTTLS handshake now, then call tls_established()."""
        return not self.done and self.setup.wants_tls

    def data_to_send(self) -> bytes:
        """Bytes to write to the server (pulls message content when it is time)."""
        try:
            if self.transaction is not None and not self.transaction.done:
                out = self.transaction.data_to_send()
            else:
                out = self.conn.data_to_send()
        except LocalProtocolError as exc:
            self._fail(f"client engine stopped: {exc}")
            return b""
        if out:
            self._last_progress = self._now
        return out

    def wait_time(self, now: float) -> float:
        """Seconds to wait for input before check_timeout() is due."""
        limit = self._last_progress + self.timeout
        deadline = self.conn.deadline
        if deadline is not None:
            limit = min(limit, deadline)
        return max(limit - now, 0.0)

    # --- what the adapter reports -------------------------------------------------------------

    def receive_data(self, data: bytes, *, now: float) -> None:
        """Bytes read from the server."""
        self._now = self._last_progress = now
        try:
            if self.transaction is not None and not self.transaction.done:
                self.transaction.receive_data(data, now=now)
            elif not self.setup.done:
                self.setup.receive_data(data, now=now)
            else:
                self.conn.receive_data(data, now=now)
        except RemoteProtocolError as exc:
            self._fail(f"protocol error from the server: {exc}")
            return
        except LocalProtocolError as exc:  # the engine refused to go on: replies so far decide
            self._fail(f"client engine stopped: {exc}")
            return
        self._advance()

    def receive_eof(self) -> None:
        """The server closed the connection."""
        if self.transaction is not None and not self.transaction.done:
            self.transaction.receive_eof()
        elif not self.setup.done:
            self.setup.receive_eof()
        else:
            self.conn.receive_eof()
        self._advance()
        if not self.done:
            self._fail("connection closed by the server")

    def tls_established(self) -> None:
        """The STARTTLS handshake succeeded."""
        self.setup.tls_established()
        self._advance()

    def check_timeout(self, now: float) -> bool:
        """Give up if the server has been silent too long; True if the session ended."""
        self._now = now
        if self.done:
            return True
        expired = now >= self._last_progress + self.timeout or self.conn.check_timeout(now)
        if not expired:
            return False
        if self._quitting:
            self.done = True  # no 221: the message's fate was decided already
        else:
            self._fail("timeout waiting for the server")
        return True

    def connection_failed(self, reason: object) -> None:
        """The connection broke (reset, TLS error); ``reason`` is an exception or text."""
        if self.done:
            return
        if self._quitting:
            self.done = True
        else:
            text = reason if isinstance(reason, str) else repr(reason)
            self._fail(f"connection failed: {text}")

    # --- the course of the session ---------------------------------------------------------------

    def _start_transaction(self) -> MailTransaction | None:
        """The transaction to run once the session is set up, or None to just QUIT."""
        raise NotImplementedError

    def _fail(self, error: str) -> None:
        if self.error is None:
            self.error = error
        self.done = True
        self.conn.send_failed()

    def _advance(self) -> None:
        if self.done:
            return
        if self.transaction is None:
            if not self.setup.done:
                return
            if not self.setup.result.ok:
                self._quit()
                return
            try:
                transaction = self._start_transaction()
            except LocalProtocolError as exc:
                self.error = f"cannot send this message to this server: {exc}"
                transaction = None
            if transaction is None:
                self._quit()
                return
            self.transaction = transaction
        if not self.transaction.done:
            return
        if not self._quitting:
            if not self._park():
                self._quit()
            return
        while True:  # waiting for the reply to QUIT (or to the RSET that parks the session)
            event = self.conn.next_event()
            if event is NEED_DATA:
                return
            if self._parking and isinstance(event, Reply) and isinstance(event.command, Rset):
                self._parking = False
                if event.is_positive and self.conn.state is SessionState.READY:
                    self.parked = self.done = True
                    return
                self._quit()  # not fit for another transaction after all
                if self.done:
                    return
                continue
            if event is PAUSED or isinstance(event, (ConnectionClosed, Reply)):
                self.done = True
                return

    def _park(self) -> bool:
        """RSET a clean session to keep it open (``keep_open``); False: QUIT instead."""
        conn, transaction = self.conn, self.transaction
        if (
            not self.keep_open
            or self.error is not None
            or transaction is None
            or transaction.result.error is not None
            or conn.state is not SessionState.READY
            or conn.pending
        ):
            return False
        self._quitting = self._parking = True  # a timeout or a broken connection just ends it
        try:
            conn.send(Rset(), now=self._now)
        except LocalProtocolError:
            self._quitting = self._parking = False
            return False
        return True

    def _quit(self) -> None:
        self._quitting = True
        try:
            self.conn.send(Quit(), now=self._now)
        except LocalProtocolError:
            self.done = True  # the session is over already


class SendJob(ClientSession):
    """One submission: session setup, one mail transaction, QUIT; no I/O.

    Args:
        prepared: the message (see prepare()).
        tls: the TLS mode (implicit TLS is done by the adapter before the greeting).
        auth: (username, password), a SaslMechanism, or None.
        config: the client engine configuration.
        timeout: longest wait for any single reply, seconds.
        now: the current time (monotonic clock).
    """

    def __init__(
        self,
        prepared: Prepared,
        *,
        tls: TLSMode,
        auth: Credentials,
        config: ClientConfig,
        timeout: float,
        now: float,
    ) -> None:
        conn = ClientConnection(config, tls_active=tls == "implicit", now=now)
        sasl: SaslMechanism | None
        if auth is None or isinstance(auth, SaslMechanism):
            sasl = auth
        else:
            username, password = auth
            sasl = _AutoLogin(conn, username, password)
        starttls = {"starttls": True, "opportunistic": None}.get(tls, False)
        super().__init__(conn, starttls=starttls, sasl=sasl, timeout=timeout, now=now)
        self.prepared = prepared

    def _start_transaction(self) -> MailTransaction | None:
        return MailTransaction(
            self.conn,
            sender=self._mail_from(),
            recipients=self.prepared.recipients,
            body=[self.prepared.content],
            now=self._now,
        )

    def _mail_from(self) -> MailFrom:
        mail, p, conn = self.prepared.sender, self.prepared, self.conn
        changes: dict[str, object] = {}
        if mail.size is None and conn.has_extension("SIZE"):
            changes["size"] = len(p.content)
        if mail.body is None and p.eight_bit and conn.has_extension("8BITMIME"):
            changes["body"] = "8BITMIME"
        if p.international and not mail.smtputf8:
            changes["smtputf8"] = True
        if not changes:
            return mail
        fields = {f: getattr(mail, f) for f in MailFrom.__dataclass_fields__}
        return MailFrom(**{**fields, **changes})

    # --- the result -------------------------------------------------------------------------------

    def result(self) -> SendResult:
        """What happened."""
        setup = self.setup.result
        error = self.error
        if error is None and not setup.ok:
            error = setup.error or "session setup failed"
        if error is None and self.transaction is not None and self.transaction.result.error:
            error = self.transaction.result.error
        return SendResult(
            setup=setup,
            transaction=None if self.transaction is None else self.transaction.result,
            error=error,
        )

    def outcome(self) -> SendResult:
        """The result when at least one recipient got the message.

        Raises:
            SendError: nobody did.
        """
        result = self.result()
        if result.delivered:
            return result
        reason = result.error
        if reason is None and result.transaction is not None:
            t = result.transaction
            for reply in (t.mail, t.data, *(r.reply for r in t.recipients)):
                if reply is not None and not reply.is_positive:
                    reason = f"{reply.code} {reply.text}"
                    break
        raise SendError(f"message not sent: {reason or 'refused'}", result)

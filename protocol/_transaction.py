# One mail transaction as one call: a small pure driver over a greeted ClientConnection.
#
# Given an envelope (MailFrom with its SIZE/BODY/SMTPUTF8/DSN parameters, RcptTo commands with
# their DSN parameters) and the message content in chunks, MailTransaction issues the commands,
# streams the content and collects one result per recipient.  It does no I/O: an adapter's
# loop is
#
#     tx = MailTransaction(conn, sender=..., recipients=[...], body=chunks)
#     while not tx.done:
#         out = tx.data_to_send()
#         if out:
#             write(out)
#             continue
#         data = read()
#         tx.receive_data(data) if data else tx.receive_eof()
#     result = tx.result
#
# (with ``body=None`` the caller feeds content itself with send_body()/end_body() whenever
# ``wants_body`` is True).
#
# Strategy.
#   * Before anything is sent: a declared SIZE over the server's SIZE limit ends the
#     transaction at once with ``result.error`` (RFC 1870 6.1); envelope parameters the server
#     does not offer raise LocalProtocolError from the constructor (the engine's checks).
#   * RFC 2920: with PIPELINING, MAIL, every RCPT and (in DATA mode) DATA go out in one write
#     and every reply is matched to its command by order; without it, one command at a time,
#     and DATA is not sent when no RCPT was accepted (RSET instead).  A 354 despite no
#     accepted recipient is answered with an empty message (RFC 2920 3.1: the client "SHOULD
#     send ... a single dot") and nobody is reported delivered.
#   * After a refused DATA, or when no recipient was accepted, RSET returns the session to
#     READY (RFC 5321 4.1.1.5), so the connection can carry the next transaction.  A session
#     left in a transaction by someone else is RSET first.
#   * BDAT (RFC 3030) is used when the server offers CHUNKING (``use_bdat=None``) and always for
#     BODY=BINARYMIME.  Content is collected into chunks of ``bdat_chunk_size``, normalised to
#     CRLF (except BINARYMIME) with a final CRLF, and ended with ``BDAT n LAST``.  BDAT chunks
#     are pipelined when PIPELINING is offered.
#   * LMTP (RFC 2033 4.2): one final reply per accepted recipient, in RCPT order.
#   * A 421, the connection closing or a timeout ends the transaction with ``result.error``.
#
# SessionSetup (at the end of this file) is the same kind of driver for what comes before:
# greeting, EHLO with the HELO fallback, STARTTLS, AUTH.
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from mailwire.protocol._client import ClientConnection, LineNormalizer, SaslMechanism
from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._events import (
    NEED_DATA,
    PAUSED,
    Auth,
    AuthResponse,
    Bdat,
    Command,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfMessage,
    Helo,
    Lhlo,
    MailFrom,
    MessageData,
    RcptTo,
    Reply,
    Rset,
    StartTLS,
    TLSEstablished,
)
from mailwire.protocol._state import SessionState

S = SessionState


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipientResult:
    """What happened to one recipient.

    Attributes:
        command: the RCPT command.
        reply: the reply to RCPT, or None if none arrived.
        final: the reply that settled the message for this recipient after the content (in
            SMTP the one end-of-data reply, in LMTP this recipient's own), or None.
    """

    command: RcptTo
    reply: Reply | None = None
    final: Reply | None = None

    @property
    def accepted(self) -> bool:
        """True if RCPT was accepted (2yz)."""
        return self.reply is not None and self.reply.is_positive

    @property
    def delivered(self) -> bool:
        """True if the server took responsibility for the message for this recipient."""
        return self.accepted and self.final is not None and self.final.is_positive


@dataclass(frozen=True, slots=True, kw_only=True)
class TransactionResult:
    """The outcome of a :class:`MailTransaction`.

    Attributes:
        mail: the reply to MAIL, or None if MAIL was never answered (or never sent).
        recipients: one result per RCPT, in order.
        data: the reply that settled the content as a whole: the refusal of DATA or of a BDAT
            chunk, or the SMTP end-of-data reply; None in LMTP (see ``recipients[i].final``).
        error: why the transaction stopped without a reply deciding it (SIZE over the
            server's limit, connection closed, timeout), or None.
    """

    mail: Reply | None
    recipients: tuple[RecipientResult, ...]
    data: Reply | None = None
    error: str | None = None

    @property
    def delivered(self) -> tuple[RcptTo, ...]:
        """The recipients the server took the message for."""
        return tuple(r.command for r in self.recipients if r.delivered)

    @property
    def rejected(self) -> tuple[RecipientResult, ...]:
        """The recipients the message did not reach."""
        return tuple(r for r in self.recipients if not r.delivered)

    @property
    def ok(self) -> bool:
        """True if every recipient got the message."""
        return bool(self.recipients) and all(r.delivered for r in self.recipients)


class MailTransaction:
    """Sends one message over a greeted ClientConnection (see the module comment).

    Args:
        conn: a ClientConnection after a successful EHLO/HELO/LHLO, with no transaction of
            someone else's pending.
        sender: the MAIL command (with its parameters).
        recipients: the RCPT commands, at least one.
        body: the content in chunks (LF or CRLF line endings, not dot-stuffed), pulled as
            needed; or None to feed it with :meth:`send_body` / :meth:`end_body`.
        use_bdat: True/False to force BDAT/DATA; None uses BDAT when CHUNKING is offered.
        now: the current time, for the engine's deadlines.

    Raises:
        LocalProtocolError: the session cannot start a transaction, there is no recipient,
            or the envelope needs an extension the server did not offer.
    """

    def __init__(
        self,
        conn: ClientConnection,
        *,
        sender: MailFrom,
        recipients: Sequence[RcptTo],
        body: Iterable[bytes] | None = None,
        use_bdat: bool | None = None,
        now: float | None = None,
    ) -> None:
        if not recipients:
            raise LocalProtocolError("a mail transaction needs at least one recipient")
        if conn.pending or conn.state not in (S.READY, S.MAIL, S.RCPT):
            raise LocalProtocolError(f"cannot start a transaction in state {conn.state.name}")
        self.conn = conn
        self._now = now
        self._sender = sender
        self._rcpts = list(recipients)
        self._rcpt_replies: list[Reply | None] = [None] * len(self._rcpts)
        self._finals: list[Reply | None] = [None] * len(self._rcpts)
        self._mail_reply: Reply | None = None
        self._data_reply: Reply | None = None
        self._error: str | None = None
        self._body: Iterator[bytes] | None = iter(body) if body is not None else None
        binary = sender.body == "BINARYMIME"
        if use_bdat is None:
            use_bdat = binary or conn.has_extension("CHUNKING")
        elif binary and not use_bdat:
            raise LocalProtocolError("BODY=BINARYMIME requires BDAT (RFC 3030 3)")
        self._bdat = use_bdat
        self._normalizer = None if binary else LineNormalizer()
        self._chunk: list[bytes] = []
        self._chunk_size = 0
        self._bdat_pending = 0  # BDAT commands awaiting their reply
        self._pipelining = conn.has_extension("PIPELINING")
        self._queue: deque[Command] = deque()
        self._rcpt_index = 0
        self._final_index = 0
        self._phase = "envelope"  # envelope, body, final, reset, done
        self._body_ended = False
        self._done = False
        limit = conn.max_message_size
        if sender.size is not None and limit is not None and sender.size > limit:
            self._finish(f"message size {sender.size} exceeds the server's limit {limit}")
            return
        if use_bdat and not conn.has_extension("CHUNKING"):
            raise LocalProtocolError("the server does not offer CHUNKING (RFC 3030)")
        if conn.state is not S.READY:
            self._queue.append(Rset())
        self._queue.append(sender)
        self._queue.extend(self._rcpts)
        if not use_bdat and self._pipelining:
            self._queue.append(Data())
        self._pump()

    # --- state --------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the transaction is over (``result`` is final)."""
        return self._done

    @property
    def wants_body(self) -> bool:
        """True when content can be given to :meth:`send_body` / :meth:`end_body`."""
        if self._phase != "body" or self._body_ended:
            return False
        if not self._bdat:
            return True
        return self._pipelining or not self.conn.pending

    @property
    def result(self) -> TransactionResult:
        """The outcome so far (final once ``done``)."""
        return TransactionResult(
            mail=self._mail_reply,
            recipients=tuple(
                RecipientResult(command=c, reply=r, final=f)
                for c, r, f in zip(self._rcpts, self._rcpt_replies, self._finals, strict=True)
            ),
            data=self._data_reply,
            error=self._error,
        )

    @property
    def deadline(self) -> float | None:
        """The engine's deadline (see ClientConnection.deadline)."""
        return None if self._done else self.conn.deadline

    # --- I/O-facing calls -------------------------------------------------------------------

    def receive_data(self, data: bytes, *, now: float | None = None) -> None:
        """Feed bytes received from the server, and act on the replies.

        Raises:
            RemoteProtocolError: the server broke the protocol (from the engine).
        """
        if now is not None:
            self._now = now
        self.conn.receive_data(data, now=now)
        self._process()

    def receive_eof(self) -> None:
        """The server closed the connection."""
        self.conn.receive_eof()
        self._process()

    def check_timeout(self, now: float) -> bool:
        """End the transaction if the engine's deadline passed.

        Returns:
            True if it timed out (the adapter should close the connection).
        """
        if self._done or not self.conn.check_timeout(now):
            return False
        self._finish("timeout waiting for the server")
        return True

    def data_to_send(self) -> bytes:
        """The bytes to write; pulls the next body chunk from ``body`` when it is time."""
        out = self.conn.data_to_send()
        while not out and self._body is not None and self.wants_body:
            chunk = next(self._body, None)
            if chunk is None:
                self.end_body()
            else:
                self.send_body(chunk)
            out = self.conn.data_to_send()
        return out

    def send_body(self, chunk: bytes) -> None:
        """Send a chunk of content (only while ``wants_body``).

        Raises:
            LocalProtocolError: not the time for content, or 8-bit content the server or
                the envelope does not allow.
        """
        if not self.wants_body:
            raise LocalProtocolError("the transaction does not want content now")
        if not self._bdat:
            self.conn.send(MessageData(data=chunk), now=self._now)
            return
        if self._normalizer is not None:
            chunk = self._normalizer.feed(chunk)
        if chunk:
            self._chunk.append(chunk)
            self._chunk_size += len(chunk)
        if self._chunk_size >= self.conn.config.bdat_chunk_size:
            self._send_chunk(last=False)

    def end_body(self) -> None:
        """End the content (only while ``wants_body``)."""
        if not self.wants_body:
            raise LocalProtocolError("the transaction does not want content now")
        self._body_ended = True
        if not self._bdat:
            self.conn.send(EndOfMessage(), now=self._now)
            self._phase = "final"
            return
        if self._normalizer is not None:
            tail = self._normalizer.end(final_crlf=True)
            if tail:
                self._chunk.append(tail)
                self._chunk_size += len(tail)
        self._send_chunk(last=True)
        self._phase = "final"

    # --- internals ----------------------------------------------------------------------------

    def _send_chunk(self, *, last: bool) -> None:
        data = b"".join(self._chunk)
        self._chunk, self._chunk_size = [], 0
        self.conn.send(Bdat(size=len(data), last=last), now=self._now)
        self._bdat_pending += 1
        if data:
            self.conn.send(MessageData(data=data), now=self._now)

    def _pump(self) -> None:
        """Send queued commands: all at once when pipelining, else one per reply."""
        conn = self.conn
        while self._queue and (self._pipelining or not conn.pending):
            conn.send(self._queue.popleft(), now=self._now)

    def _any_accepted(self) -> bool:
        return any(r is not None and r.is_positive for r in self._rcpt_replies)

    def _reset(self) -> None:
        if self.conn.state in (S.MAIL, S.RCPT, S.CHUNKING):
            self._phase = "reset"
            self.conn.send(Rset(), now=self._now)
        else:
            self._finish(None)

    def _finish(self, error: str | None) -> None:
        if error is not None and self._error is None:
            self._error = error
        self._phase = "done"
        self._done = True

    def _process(self) -> None:
        conn = self.conn
        while not self._done:
            event = conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            if isinstance(event, ConnectionClosed):
                self._finish("connection closed by the server")
                break
            if isinstance(event, TLSEstablished):
                continue
            assert isinstance(event, Reply)
            self._on_reply(event)
        if self._done:
            return
        if conn.state is S.CLOSED:
            self._finish("connection closed by the server")
            return
        self._pump()
        self._maybe_advance()

    def _on_reply(self, reply: Reply) -> None:
        command = reply.command
        if command is None:  # an unsolicited 421: the engine closed the session
            self._finish(f"server closing the connection: {reply.code} {reply.text}")
            return
        if reply.code == 421:
            self._record(command, reply)
            self._finish(f"server closing the connection: {reply.code} {reply.text}")
            return
        self._record(command, reply)

    def _record(self, command: Command, reply: Reply) -> None:
        match command:
            case MailFrom():
                self._mail_reply = reply
                if not reply.is_positive and not self._pipelining:
                    self._queue.clear()  # step by step: no RCPT after a refused MAIL
            case RcptTo():
                if self._rcpt_index < len(self._rcpts):
                    self._rcpt_replies[self._rcpt_index] = reply
                    self._rcpt_index += 1
            case Data():
                if self._phase == "final":
                    self._final(reply)
                elif reply.code == 354:
                    self._phase = "body"
                    if not self._any_accepted():
                        self.conn.send(EndOfMessage(), now=self._now)  # RFC 2920 3.1
                        self._body_ended = True
                        self._phase = "final"
                elif reply.code != 421:
                    self._data_reply = reply
            case Bdat():
                self._bdat_pending -= 1
                if command.last and self._data_reply is None:
                    self._final(reply)
                elif not reply.is_positive and self._data_reply is None:
                    self._data_reply = reply  # the transaction is over (RFC 3030 2)
                    self._body_ended = True
            case Rset():
                if self._phase == "reset":
                    self._finish(None)
            case _:
                pass

    def _final(self, reply: Reply) -> None:
        accepted = [i for i, r in enumerate(self._rcpt_replies) if r is not None and r.is_positive]
        if not self.conn.config.lmtp:
            self._data_reply = reply
            for i in accepted:
                self._finals[i] = reply
            return
        if self._final_index < len(accepted):
            self._finals[accepted[self._final_index]] = reply
        self._final_index += 1

    def _maybe_advance(self) -> None:
        """Decide what comes next once the replies in flight are in."""
        conn = self.conn
        if self._done or self._queue:
            return
        if self._phase == "envelope" and not conn.pending:
            if self._mail_reply is None or not self._mail_reply.is_positive:
                self._reset()  # MAIL refused: the pipelined rest was refused too
            elif not self._any_accepted() or self._data_reply is not None:
                self._reset()  # nobody accepted, or DATA refused
            elif self._bdat:
                self._phase = "body"
            else:
                conn.send(Data(), now=self._now)  # step by step: DATA after the RCPTs
        elif self._phase == "body" and self._bdat and self._data_reply is not None:
            if not conn.pending:
                self._reset()  # a BDAT chunk failed (RFC 3030 2): make sure it is over
        elif self._phase == "final" and not conn.pending:
            if self._bdat and self._data_reply is not None and conn.state is not S.READY:
                self._reset()
            else:
                self._finish(None)


# --- opening a session ----------------------------------------------------------------------------
#
# SessionSetup drives a fresh ClientConnection from the greeting to "ready for MAIL":
#
#     greeting (220; 554/421 end it, RFC 5321 3.1)
#     EHLO (LHLO in LMTP) -- 5yz: HELO instead (RFC 5321 3.2)
#     STARTTLS when offered (``starttls=None``, opportunistic) or demanded (``True``), then the
#         adapter's handshake (``wants_tls``), then EHLO again (RFC 3207 4.2)
#     AUTH with the given SaslMechanism (PLAIN/LOGIN/XOAUTH2), 334 challenges answered
#
# The adapter loop is the MailTransaction one, plus: when ``wants_tls``, do the handshake and
# call ``tls_established()``.


@dataclass(frozen=True, slots=True, kw_only=True)
class SetupResult:
    """The outcome of a :class:`SessionSetup`.

    Attributes:
        greeting: the server's greeting, if one arrived.
        hello: the accepted reply to the last EHLO/HELO/LHLO, if any.
        reply: the reply that made the setup fail, if a reply did.
        error: why the setup failed, or None when the session is ready for mail.
    """

    greeting: Reply | None = None
    hello: Reply | None = None
    reply: Reply | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True if the session is ready for a mail transaction."""
        return self.error is None and self.hello is not None


class SessionSetup:
    """Opens a session on a fresh ClientConnection (see the comment above).

    Args:
        conn: a ClientConnection that has not received its greeting yet.
        starttls: None to use STARTTLS when offered, True to require it, False never.
        sasl: the SASL mechanism to authenticate with, or None.
        now: the current time, for the engine's deadlines.

    Raises:
        LocalProtocolError: ``conn`` is past its greeting.
    """

    def __init__(
        self,
        conn: ClientConnection,
        *,
        starttls: bool | None = None,
        sasl: SaslMechanism | None = None,
        now: float | None = None,
    ) -> None:
        if conn.state is not S.GREETING:
            raise LocalProtocolError("SessionSetup needs a connection awaiting its greeting")
        self.conn = conn
        self._starttls = starttls
        self._sasl = sasl
        self._now = now
        self._greeting: Reply | None = None
        self._hello: Reply | None = None
        self._reply: Reply | None = None
        self._error: str | None = None
        self._done = False

    @property
    def done(self) -> bool:
        """True once the session is ready, or the setup failed (see ``result``)."""
        return self._done

    @property
    def wants_tls(self) -> bool:
        """True when the adapter must do the TLS handshake, then call tls_established()."""
        return not self._done and self.conn.state is S.STARTTLS

    @property
    def result(self) -> SetupResult:
        """The outcome so far."""
        return SetupResult(
            greeting=self._greeting, hello=self._hello, reply=self._reply, error=self._error
        )

    @property
    def deadline(self) -> float | None:
        """The engine's deadline (see ClientConnection.deadline)."""
        return None if self._done else self.conn.deadline

    def receive_data(self, data: bytes, *, now: float | None = None) -> None:
        """Feed bytes received from the server and act on the replies.

        Raises:
            RemoteProtocolError: the server broke the protocol (from the engine).
        """
        if now is not None:
            self._now = now
        self.conn.receive_data(data, now=now)
        self._process()

    def receive_eof(self) -> None:
        """The server closed the connection."""
        self.conn.receive_eof()
        self._process()

    def data_to_send(self) -> bytes:
        """The bytes to write to the server."""
        return self.conn.data_to_send()

    def tls_established(self) -> None:
        """The TLS handshake succeeded; the session restarts with EHLO."""
        self.conn.tls_established()
        self._process()

    def check_timeout(self, now: float) -> bool:
        """End the setup if the engine's deadline passed; True if it did."""
        if self._done or not self.conn.check_timeout(now):
            return False
        self._fail("timeout waiting for the server")
        return True

    def _fail(self, error: str, reply: Reply | None = None) -> None:
        self._error = error
        self._reply = reply
        self._done = True

    def _send(self, command: Command) -> None:
        self.conn.send(command, now=self._now)

    def _hello_command(self) -> Command:
        name = self.conn.config.local_hostname
        return Lhlo(domain=name) if self.conn.config.lmtp else Ehlo(domain=name)

    def _process(self) -> None:
        conn = self.conn
        while not self._done:
            event = conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            if isinstance(event, ConnectionClosed):
                self._fail("connection closed by the server", self._reply)
                break
            if isinstance(event, TLSEstablished):
                self._hello = None
                self._send(self._hello_command())
                continue
            assert isinstance(event, Reply)
            self._on_reply(event)

    def _on_reply(self, reply: Reply) -> None:
        conn, command = self.conn, reply.command
        if reply.code == 421:
            self._fail(f"server closing the connection: {reply.code} {reply.text}", reply)
            return
        match command:
            case None:
                self._greeting = reply
                if reply.code != 220:
                    self._fail(f"session refused: {reply.code} {reply.text}", reply)
                    return
                self._send(self._hello_command())
            case Ehlo() | Lhlo() | Helo():
                if reply.is_positive:
                    self._hello = reply
                    self._after_hello()
                elif conn.ehlo_rejected:
                    self._send(Helo(domain=conn.config.local_hostname))
                else:
                    self._fail(f"{type(command).__name__.upper()} refused", reply)
            case StartTLS():
                if reply.is_positive:
                    return  # wants_tls: the adapter's turn
                if self._starttls:
                    self._fail("STARTTLS refused", reply)
                else:
                    self._after_tls()  # opportunistic: carry on in clear text
            case Auth() | AuthResponse():
                assert self._sasl is not None
                if reply.code == 334:
                    self._send(self._sasl.respond(reply))
                elif reply.code == 235:
                    self._done = True
                else:
                    self._fail("authentication failed", reply)
            case _:
                pass

    def _after_hello(self) -> None:
        conn = self.conn
        if not conn.tls_active and self._starttls is not False:
            if conn.has_extension("STARTTLS"):
                self._send(StartTLS())
                return
            if self._starttls:
                self._fail("the server does not offer STARTTLS", self._hello)
                return
        self._after_tls()

    def _after_tls(self) -> None:
        conn, sasl = self.conn, self._sasl
        if sasl is None:
            self._done = True
            return
        if sasl.mechanism not in conn.auth_mechanisms:
            self._fail(f"the server does not offer AUTH {sasl.mechanism}", self._hello)
            return
        if not conn.tls_active and not conn.config.allow_plaintext_auth:
            self._fail("AUTH refused: the connection is not encrypted", self._hello)
            return
        self._send(sasl.start())

# The server side of an SMTP (or LMTP) session, as a pure state machine.
#
# Shape (h11's): bytes go in with receive_data()/receive_eof(), events come out of
# next_event(), replies go in with send(), bytes come out of data_to_send().  Nothing here does
# I/O, reads a clock or draws a random number; the time is passed in as ``now`` where
# deadlines matter.
#
# Who answers what.  The engine answers by itself everything that SMTP and the configuration
# fully determine -- syntax (500/501/555), sequence (503), limits (452, 552), NOOP, RSET, HELP,
# QUIT, EXPN, DATA's 354, BDAT's intermediate 250s, STARTTLS's 220, the SASL exchange -- and
# yields an informational event for it (CommandRejected for rejections).  It *pauses* and
# waits for the application wherever a policy decision is needed:
#
#     greeting (220 or 554)   EHLO/HELO/LHLO   MAIL   RCPT   VRFY
#     AuthCredentials (235/535)   EndOfMessage (250 once stored; LMTP: one per recipient)
#
# While paused, next_event() returns PAUSED and parses nothing, so pipelined commands
# (RFC 2920) wait in the buffer: every reply is produced in command order and no command is
# decided before the ones it follows.  That single rule is the whole PIPELINING implementation.
#
# Invariants (fuzzed in tests/test_properties.py and fuzz/fuzz_server.py):
#   * next_event() raises only RemoteProtocolError; send() raises only LocalProtocolError.
#   * Every complete command line gets exactly one final reply, in order.
#   * Memory is bounded by the configuration: the buffer never holds more than one command
#     line (command_line_limit) or one body chunk (max_chunk_size) plus one read's worth.
#
# The body.  After 354 the engine yields MessageData chunks (dot-unstuffed, at most
# max_chunk_size octets) and then EndOfMessage; it never holds the message.  Only CRLF.CRLF
# ends it (see _readers.BodyReader).  Limits broken along the way (SIZE, bare CR/LF, long
# lines) are remembered and answered at the end with MessageRejected, so the session stays in
# step with the client.
#
# Security notes.
#   * STARTTLS: on sending 220 the rest of the buffer is discarded (CVE-2011-0411: commands
#     pipelined in plaintext after STARTTLS must never run inside the TLS session), and so is
#     anything fed before tls_established().  RFC 3207 4.2: after the handshake the server
#     "MUST discard any knowledge obtained from the client", so the session restarts at HELLO.
#   * Bare LF in a command line gets 500 instead of being taken as a line end.
#   * HTTP verbs (cross-protocol requests from browsers) close the session at once.
from __future__ import annotations

import base64
import binascii
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from mailwire.protocol._config import ServerConfig
from mailwire.protocol._errors import LocalProtocolError, RemoteProtocolError
from mailwire.protocol._events import (
    NEED_DATA,
    PAUSED,
    Auth,
    AuthCredentials,
    Bdat,
    Command,
    CommandRejected,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfMessage,
    Expn,
    Helo,
    Help,
    Lhlo,
    MailFrom,
    MessageData,
    MessageRejected,
    Noop,
    Quit,
    RcptTo,
    Reply,
    Rset,
    Sentinel,
    ServerEvent,
    StartTLS,
    Vrfy,
)
from mailwire.protocol._grammar import GrammarError
from mailwire.protocol._readers import VERBS, BodyReader, decode_line
from mailwire.protocol._state import GREETED_STATES, TRANSITIONS, SessionState
from mailwire.protocol._writers import format_reply

S = SessionState
_HTTP_VERBS = frozenset({b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS"})
_ENDED = frozenset({S.CLOSED, S.ERROR})
_WAITING = frozenset({S.STARTTLS})
_NOT_PARSING = frozenset({S.CLOSED, S.ERROR, S.STARTTLS, S.GREETING})
_DATA_REPLY = format_reply(354, ["End data with <CR><LF>.<CR><LF>"])  # RFC 2034: none on 3yz
_EHLO_TYPES = frozenset({Ehlo, Lhlo})  # decisions whose 2yz reply lists the extensions
_HELLO_TYPES = frozenset({Ehlo, Helo, Lhlo})  # RFC 2034: no enhanced code on their replies
Decision: TypeAlias = Helo | Ehlo | Lhlo | MailFrom | RcptTo | Vrfy | AuthCredentials | EndOfMessage
# Enhanced status codes (RFC 3463) used when the application's reply carries none.
_DEFAULT_ENHANCED: dict[tuple[type[object], int], str] = {
    (MailFrom, 2): "2.1.0",
    (RcptTo, 2): "2.1.5",
    (Vrfy, 2): "2.5.0",
    (AuthCredentials, 2): "2.7.0",
    (AuthCredentials, 5): "5.7.8",
}
_WIRE_CACHE: dict[tuple[int, str, bool, type], bytes] = {}
_MAX_REPLY_TEXT = 512 - 6  # RFC 5321 4.5.3.1.5: reply line incl. code, separator and CRLF
_LOGIN_USER = "VXNlcm5hbWU6"  # base64("Username:"), the de-facto LOGIN challenges
_LOGIN_PASS = "UGFzc3dvcmQ6"  # base64("Password:")


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """The accepted envelope of the current mail transaction.

    Attributes:
        sender: the accepted MAIL command, or None outside a transaction.
        recipients: the accepted RCPT commands, in order.
    """

    sender: MailFrom | None = None
    recipients: tuple[RcptTo, ...] = ()


class ServerConnection:
    """The server side of one SMTP/LMTP session.

    Start by sending the greeting: ``conn.send(Reply(code=220, text="mx.example ESMTP"))``
    (or 554 to refuse the session, RFC 5321 3.1).

    Args:
        config: the engine configuration.
        tls_active: True when the connection is already encrypted (implicit TLS, port 465).
        now: the current time in seconds (any monotonic clock), to start the deadlines.
    """

    def __init__(
        self, config: ServerConfig, *, tls_active: bool = False, now: float | None = None
    ) -> None:
        self.config = config
        self._state = S.GREETING
        self._buf = bytearray()
        self._pos = 0  # start of unparsed bytes in _buf
        self._scan = 0  # where the LF search resumes (never rescans a partial line)
        self._eof = False
        self._closed_reported = False
        self._out: list[bytes] = []
        self._events: deque[ServerEvent] = deque()
        self._owed: Decision | None = None
        self._owed_count = 0
        self._refused = False  # greeted with 554: only QUIT is accepted (RFC 5321 3.1)
        self._esmtp = False
        self._tls_active = tls_active
        self._authenticated: str | None = None
        self._peer_domain: str | None = None
        self._sender: MailFrom | None = None
        self._recipients: list[RcptTo] = []
        self._bad_commands = 0
        self._auth_failures = 0
        self._progress = 0  # body octets since the data deadline last restarted
        self._discarding = False  # inside an over-long command line
        self._body: BodyReader | None = None
        self._bdat: Bdat | None = None  # the BDAT command whose octets are being read
        self._bdat_remaining = 0
        self._bdat_reject: tuple[int, str, str] | None = None
        self._bdat_size = 0
        self._bdat_line = b""
        self._sasl: list[str] = []  # mechanism, then the responses collected so far
        self._now = now
        self._timer_start = now

    # --- read-only views --------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """The session state (see :class:`SessionState`)."""
        return self._state

    @property
    def envelope(self) -> Envelope:
        """The accepted sender and recipients of the current transaction."""
        return Envelope(sender=self._sender, recipients=tuple(self._recipients))

    @property
    def peer_domain(self) -> str | None:
        """The argument of the accepted EHLO/HELO/LHLO, if any."""
        return self._peer_domain

    @property
    def tls_active(self) -> bool:
        """True once the session runs over TLS."""
        return self._tls_active

    @property
    def authenticated_as(self) -> str | None:
        """The username accepted by AUTH (235), or None."""
        return self._authenticated

    @property
    def owes_reply(self) -> bool:
        """True while the application owes a reply (next_event() returns PAUSED)."""
        if self._owed is not None:
            return not self._events  # owed once the decision event has been handed out
        return self._state is S.GREETING and not self._refused

    @property
    def deadline(self) -> float | None:
        """When the peer's time runs out (RFC 5321 4.5.3.2), on the clock passed as ``now``;
        None while the application owes a reply, after the session ended, or without a clock.
        When it passes, call :meth:`check_timeout`."""
        if self._timer_start is None:
            return None
        if self._owed is not None:  # owes_reply, inline (called on every read)
            if not self._events:
                return None
        elif self._state is S.GREETING and not self._refused:
            return None
        if self._state in (S.CLOSED, S.ERROR):
            return None
        if self._state is S.DATA or self._bdat is not None:
            return self._timer_start + self.config.data_timeout
        return self._timer_start + self.config.command_timeout

    # --- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes, *, now: float | None = None) -> None:
        """Feed bytes received from the client (``b""`` is a no-op; use receive_eof()).

        Raises:
            LocalProtocolError: after receive_eof().
        """
        if now is not None:
            self._now = now
        if self._eof:
            raise LocalProtocolError("receive_data() after receive_eof()")
        if not data or self._state in (S.CLOSED, S.ERROR):
            return
        if self._state is S.STARTTLS:
            return  # plaintext sent before the handshake: discarded (CVE-2011-0411)
        if self._pos:
            if self._pos >= len(self._buf):
                self._buf.clear()
            else:
                del self._buf[: self._pos]
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    def receive_eof(self) -> None:
        """Tell the engine the client closed its side of the connection."""
        self._eof = True

    def check_timeout(self, now: float) -> bool:
        """If the deadline has passed, queue ``421 4.4.2`` and close the session.

        Returns:
            True if the session timed out (the adapter should flush and close).
        """
        self._now = now
        deadline = self.deadline
        if deadline is None or now < deadline:
            return False
        self._queue(421, "4.4.2", f"{self.config.hostname} Error: timeout exceeded")
        self._state = S.CLOSED
        return True

    # --- events -----------------------------------------------------------------------------

    def next_event(self) -> ServerEvent | Sentinel:
        """The next event, or NEED_DATA (feed more bytes) or PAUSED (send the owed reply, or
        finish the TLS handshake and call tls_established(); after the session ended, once
        ConnectionClosed has been returned, PAUSED means there is nothing more).

        Raises:
            RemoteProtocolError: the client broke the protocol beyond recovery (too many bad
                commands, an HTTP request, a malformed BDAT); ``reply_hint`` is queued in
                data_to_send() and the state is ERROR.  Nothing else is ever raised.
        """
        if self._events:
            return self._events.popleft()
        if self._state is S.ERROR:
            raise RemoteProtocolError("the session is in the ERROR state")
        if self._state is S.CLOSED:
            return self._closed()
        state = self._state
        # owes_reply inlined (no event is pending here)
        if self._owed is not None or (state is S.GREETING and not self._refused):
            return PAUSED
        if state is S.STARTTLS:
            return PAUSED
        events = self._events
        try:
            # The hot loop: _parsing() and owes_reply inlined.  While the loop runs no event
            # is pending (it exits as soon as one is queued), so owes_reply reduces to
            # ``_owed is None`` here (GREETING is in _NOT_PARSING).
            while self._state not in _NOT_PARSING and self._owed is None:
                pos, state, bdat = self._pos, self._state, self._bdat
                if state is S.DATA:
                    self._read_body()
                elif bdat is not None:
                    self._read_bdat()
                else:
                    self._read_line()
                if events:
                    break
                if pos == self._pos and state is self._state and bdat == self._bdat:
                    break  # no progress: more bytes are needed
        except RemoteProtocolError:
            self._state = S.ERROR
            raise
        except Exception as exc:  # pragma: no cover - a bug; keep the invariant anyway
            self._state = S.ERROR
            reply = Reply(code=421, text="4.3.0 Internal error, closing connection")
            self._out.append(format_reply(421, reply.lines))
            raise RemoteProtocolError(f"internal error: {exc!r}", reply_hint=reply) from exc
        if self._events:
            return self._events.popleft()
        if self._owed is not None or self._state in _WAITING:  # owes_reply, inlined
            return PAUSED
        if self._state is S.GREETING and not self._refused:
            return PAUSED
        if self._eof or self._state in _ENDED:
            if self._state not in _ENDED:
                self._state = S.CLOSED
            self._body = None
            return self._closed()
        return NEED_DATA

    def _closed(self) -> ConnectionClosed | Sentinel:
        # ConnectionClosed is reported once; after it there is nothing left to wait for, so
        # PAUSED ends any "until NEED_DATA or PAUSED" loop instead of spinning on it.
        if self._closed_reported:
            return PAUSED
        self._closed_reported = True
        return ConnectionClosed()

    def _parsing(self) -> bool:
        return self._state not in _NOT_PARSING and not self.owes_reply

    # --- output -----------------------------------------------------------------------------

    def send(self, reply: Reply, *, now: float | None = None) -> None:
        """Answer the decision the engine is paused on (or send the greeting first).

        Args:
            reply: the reply.  An enhanced status code is prepended when the configuration
                enables them and the text has none (RFC 2034: not on greeting and EHLO).
                A 2yz to EHLO/LHLO gets the extension keywords appended by the engine.
            now: the current time, to restart the peer's deadline.

        Raises:
            LocalProtocolError: no reply is owed, the code does not fit the decision
                (e.g. 3yz to RCPT, 5yz to ``<Postmaster>``), or a line is too long.
                The session moves to ERROR.
        """
        try:
            self._send(reply)
        except LocalProtocolError:
            self._state = S.ERROR
            raise
        if now is not None:
            self._now = now
        self._timer_start = self._now

    def data_to_send(self) -> bytes:
        """The bytes to write to the client, removed from the engine's output buffer."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def tls_established(self, now: float | None = None) -> None:
        """The TLS handshake after STARTTLS succeeded: the session restarts (RFC 3207 4.2).

        Args:
            now: the current time, on the clock of ``receive_data``'s ``now``: the client's
                time for its next command starts here, after the handshake (without it, at
                the last time the engine saw, before the handshake).

        Raises:
            LocalProtocolError: no STARTTLS was accepted.
        """
        if self._state is not S.STARTTLS:
            raise LocalProtocolError("tls_established() outside STARTTLS")
        self._tls_active = True
        self._state = S.HELLO
        self._esmtp = False
        self._peer_domain = None
        self._authenticated = None
        self._reset_transaction()
        if now is not None:
            self._now = now
        self._timer_start = self._now

    def close(self, reply: Reply | None = None) -> None:
        """End the session from the server's side, e.g. ``421 4.3.2`` at shutdown.

        Queues ``reply`` (a 4yz or 5yz; the enhanced status code is added as for any reply)
        unless the session already ended, and moves to CLOSED; next_event() then reports
        ConnectionClosed.  An unsolicited 421 is the one reply RFC 5321 3.8 allows at any
        time.  Safe to call in any state, also after an error.

        Raises:
            LocalProtocolError: ``reply`` is not a 4yz or 5yz.
        """
        if reply is not None and reply.code < 400:
            raise LocalProtocolError("a closing reply must be 4yz or 5yz (usually 421)")
        if self._state is S.CLOSED:
            return
        if reply is not None:
            self._out.append(self._format(reply, enhanced=True, owed=None))
        self._owed = None
        self._events.clear()
        if self._state is not S.ERROR:
            self._state = S.CLOSED

    def send_failed(self) -> None:
        """The adapter could not write to the peer: the session is over (ERROR)."""
        self._state = S.ERROR

    # --- internals: replies -----------------------------------------------------------------

    def _queue(self, code: int, enhanced: str, text: str) -> Reply:
        if self.config.enhanced_status_codes and code // 100 != 3:  # RFC 2034: not on 3yz
            text = f"{enhanced} {text}"
        reply = Reply(code=code, text=text)
        self._out.append(format_reply(code, reply.lines))
        return reply

    def _reject(
        self, line: bytes, code: int, enhanced: str, text: str, *, bad: bool = True
    ) -> None:
        reply = self._queue(code, enhanced, text)
        self._events.append(CommandRejected(line=line[:1000], reply=reply))
        if bad:
            self._bad_commands += 1
            if self._bad_commands >= self.config.max_bad_commands:
                hint = self._queue(421, "4.7.0", f"{self.config.hostname} Too many errors")
                self._state = S.ERROR
                raise RemoteProtocolError("too many bad commands", reply_hint=hint)

    def _send(self, reply: Reply) -> None:
        code, cls = reply.code, reply.code // 100
        if self._state is S.GREETING and not self._refused:
            if code not in (220, 421, 554):
                raise LocalProtocolError("the greeting must be 220, 554 or 421 (RFC 5321 3.1)")
            self._emit(reply, enhanced=False)
            if code == 421:
                self._state = S.CLOSED
            else:
                self._state = S.HELLO
                self._refused = code == 554
            return
        owed = self._owed
        if owed is None or self._events:
            raise LocalProtocolError("send() called but no reply is owed")
        if cls == 3:
            raise LocalProtocolError(f"a 3yz reply cannot answer {type(owed).__name__}")
        # Cheap tests first: isinstance() runs only for the rare codes it matters for.
        if cls == 5 and isinstance(owed, RcptTo) and owed.is_postmaster:
            raise LocalProtocolError("<Postmaster> MUST be accepted (RFC 5321 4.5.1)")
        kind = type(owed)
        if cls == 2 and code != 235 and kind is AuthCredentials:
            raise LocalProtocolError("successful AUTH is answered with 235 (RFC 4954 6)")
        if cls == 2 and kind in _EHLO_TYPES:
            self._emit(self._ehlo_reply(reply), enhanced=False)
        else:
            # _emit() inlined: the wire form of a (code, text) pair is cached
            enhanced = kind not in _HELLO_TYPES
            key = (code, reply.text, enhanced and self.config.enhanced_status_codes, kind)
            wire = _WIRE_CACHE.get(key)
            if wire is None:
                self._emit(reply, enhanced=enhanced, owed=owed)
            else:
                self._out.append(wire)
        if code == 421:
            self._owed = None
            self._state = S.CLOSED
            return
        match owed:  # the commonest decisions first
            case MailFrom():
                if cls == 2:
                    self._sender = owed
                    self._state = S.MAIL
            case RcptTo():
                if cls == 2:
                    self._recipients.append(owed)
                    self._state = S.RCPT
            case Ehlo() | Helo() | Lhlo():
                if cls == 2:
                    self._reset_transaction()
                    self._peer_domain = owed.domain
                    self._esmtp = kind is not Helo
                    self._state = S.READY
            case AuthCredentials():
                self._state = S.READY
                if code == 235:
                    self._authenticated = owed.username
                else:
                    self._auth_failures += 1
                    if self._auth_failures >= self.config.max_auth_failures:
                        self._owed = None
                        self._queue(421, "4.7.0", "Too many authentication failures")
                        self._state = S.CLOSED
                        return
            case EndOfMessage():
                self._owed_count -= 1
                if self._owed_count > 0:
                    return  # LMTP: more replies owed (RFC 2033 4.2)
                self._reset_transaction()
                self._state = S.READY
            case _:
                pass
        self._owed = None

    def _emit(self, reply: Reply, *, enhanced: bool, owed: object = None) -> None:
        # Applications answer with a handful of constant replies; cache their wire form.
        key = (reply.code, reply.text, enhanced and self.config.enhanced_status_codes, type(owed))
        wire = _WIRE_CACHE.get(key)
        if wire is None:
            wire = self._format(reply, enhanced=enhanced, owed=owed)
            if len(_WIRE_CACHE) >= 512:
                _WIRE_CACHE.clear()
            _WIRE_CACHE[key] = wire
        self._out.append(wire)

    def _format(self, reply: Reply, *, enhanced: bool, owed: object) -> bytes:
        lines = reply.lines
        if enhanced and self.config.enhanced_status_codes and reply.enhanced is None:
            cls = reply.code // 100
            code = _DEFAULT_ENHANCED.get((type(owed), cls), f"{cls}.0.0")
            lines = [f"{code} {line}" if line else code for line in lines]
        for line in lines:
            if len(line.encode()) > _MAX_REPLY_TEXT:
                raise LocalProtocolError(f"reply line longer than 512 octets: {line[:40]!r}...")
        return format_reply(reply.code, lines)

    def _ehlo_reply(self, reply: Reply) -> Reply:
        c = self.config
        first, *rest = reply.text.split("\n") if reply.text else [c.hostname]
        if first.split(" ", 1)[0] != c.hostname:
            first = f"{c.hostname} {first}".rstrip()
        ext = list(rest)
        if c.pipelining:
            ext.append("PIPELINING")
        ext.append(f"SIZE {c.max_message_size}" if c.max_message_size else "SIZE")
        if c.starttls and not self._tls_active:
            ext.append("STARTTLS")
        if self._auth_offered():
            ext.append("AUTH " + " ".join(c.auth_mechanisms))
        if c.enhanced_status_codes:
            ext.append("ENHANCEDSTATUSCODES")
        if c.eightbitmime:
            ext.append("8BITMIME")
        if c.dsn:
            ext.append("DSN")
        if c.smtputf8:
            ext.append("SMTPUTF8")
        if c.chunking:
            ext.append("CHUNKING")
        if c.binarymime:
            ext.append("BINARYMIME")
        return Reply(code=reply.code, text="\n".join([first, *ext]))

    def _auth_offered(self) -> bool:
        c = self.config
        return bool(c.auth_mechanisms) and (self._tls_active or not c.auth_requires_tls)

    def _reset_transaction(self) -> None:
        self._sender = None
        self._recipients = []
        self._body = None
        self._bdat_size = 0

    # --- internals: command lines -----------------------------------------------------------

    def _read_line(self) -> None:
        """Parse one command line (if complete) and act on it."""
        # Take the next complete line (LF removed, CR kept), or wait for more bytes.
        buf = self._buf
        end = buf.find(b"\n", self._scan)
        limit = self.config.command_line_limit
        if end < 0:
            if len(buf) - self._pos > limit:
                self._discarding = True  # an over-long line: drop it, answer at its LF
                self._pos = self._scan = len(buf)
            else:
                self._scan = len(buf)
            return
        line = bytes(buf[self._pos : end])
        self._pos = self._scan = end + 1
        if len(line) + 1 > limit:
            self._discarding = True
        if self._discarding:
            self._discarding = False
            self._reject(line, 500, "5.5.2", "Syntax error: line too long")
            return
        if line[-1:] != b"\r":
            self._reject(line, 500, "5.5.2", "Syntax error: bare LF in command")
            return
        line = line[:-1]
        if self._state is S.AUTH:
            self._sasl_step(line)
            return
        verb, _, raw_arg = line.partition(b" ")  # split_verb() inlined
        verb = verb.upper()
        parse = VERBS.get(verb)
        if parse is None:
            if verb in _HTTP_VERBS:
                hint = self._queue(421, "4.7.0", "This is an SMTP server, closing connection")
                raise RemoteProtocolError("HTTP request on SMTP port", reply_hint=hint)
            self._reject(line, 500, "5.5.2", "Syntax error: command unrecognized")
            return
        utf8 = self._sender is not None and self._sender.smtputf8
        try:
            # decode_line() inlined for plain ASCII; it still reports every error
            if raw_arg.isascii():
                arg = raw_arg.decode("ascii")
                if "\x00" in arg or "\r" in arg:
                    arg = decode_line(raw_arg)
            else:
                arg = decode_line(raw_arg)
            if verb == b"BDAT":
                # Known before any check: how many octets follow, so they are never executed.
                command = parse(arg, self.config, utf8)
            elif self._refused and verb != b"QUIT":
                self._reject(line, 503, "5.5.1", "Bad sequence of commands", bad=False)
                return
            else:
                command = parse(arg, self.config, utf8)
        except LocalProtocolError:
            # An event constructor refused a decoded value (e.g. ENVID=+0D decodes to CR).
            exc = GrammarError(501, "5.5.4", "Syntax error in parameters")
            if verb == b"BDAT":
                raise RemoteProtocolError("malformed BDAT", reply_hint=None) from None
            self._reject(line, exc.code, exc.enhanced, exc.text)
            return
        except GrammarError as exc:
            if verb == b"BDAT":
                hint = self._queue(exc.code, exc.enhanced, f"{exc.text}; closing connection")
                raise RemoteProtocolError("malformed BDAT", reply_hint=hint) from None
            self._reject(line, exc.code, exc.enhanced, exc.text)
            return
        _ON_COMMAND[type(command)](self, line, command)  # _dispatch() inlined

    def _sequence_error(self, line: bytes, command: Command) -> None:
        if self._state is S.HELLO and not isinstance(command, (Helo, Ehlo, Lhlo)):
            text = "Send LHLO first" if self.config.lmtp else "Send HELO/EHLO first"
        elif isinstance(command, MailFrom):
            text = "Nested MAIL command"
        elif isinstance(command, RcptTo):
            text = "Need MAIL before RCPT"
        elif isinstance(command, (Data, Bdat)) and self._state is S.MAIL:
            self._reject(line, 554, "5.5.1", "No valid recipients", bad=False)
            return
        elif isinstance(command, (Data, Bdat)):
            text = "Need MAIL and RCPT before DATA"
        elif isinstance(command, (StartTLS, Auth)) and self._state in GREETED_STATES:
            text = "Not allowed during a mail transaction"
        else:
            text = "Bad sequence of commands"
        # Not counted as a bad command: a 503 usually follows a failed pipelined command
        # (RFC 2920), and a long pipelined session must not reach "too many errors" by it.
        self._reject(line, 503, "5.5.1", text, bad=False)

    def _dispatch(self, line: bytes, command: Command) -> None:
        # One method per command, found by type: no chain of isinstance() on the hot path.
        _ON_COMMAND[type(command)](self, line, command)

    def _in_sequence(self, line: bytes, command: Command) -> bool:
        if (self._state, type(command)) in TRANSITIONS:  # is_legal() inlined
            return True
        self._sequence_error(line, command)
        return False

    def _on_hello(self, line: bytes, command: Helo | Ehlo | Lhlo) -> None:
        if self.config.lmtp and not isinstance(command, Lhlo):
            self._reject(line, 500, "5.5.1", "This is LMTP: use LHLO")
        elif not self.config.lmtp and isinstance(command, Lhlo):
            self._reject(line, 500, "5.5.2", "Syntax error: command unrecognized")
        elif self._in_sequence(line, command):
            self._decide(command)

    def _on_vrfy(self, line: bytes, command: Vrfy) -> None:
        if self._in_sequence(line, command):
            self._decide(command)

    def _on_mail(self, line: bytes, command: MailFrom) -> None:
        c = self.config
        if (self._state, MailFrom) not in TRANSITIONS:  # _in_sequence() inlined
            self._sequence_error(line, command)
            return
        if c.tls_required and not self._tls_active:
            self._reject(line, 530, "5.7.0", "Must issue a STARTTLS command first")
        elif c.auth_required and self._authenticated is None:
            self._reject(line, 530, "5.7.0", "Authentication required")
        elif not self._esmtp and _has_params(command):
            self._reject(line, 555, "5.5.4", "Parameters not allowed after HELO")
        else:
            self._owed = command  # _decide() inlined
            self._events.append(command)

    def _on_rcpt(self, line: bytes, command: RcptTo) -> None:
        if (self._state, RcptTo) not in TRANSITIONS:  # _in_sequence() inlined
            self._sequence_error(line, command)
            return
        if len(self._recipients) >= self.config.max_recipients:
            # RFC 5321 4.5.3.1.10; a 452 is not a syntax error: not counted as bad
            self._reject(line, 452, "4.5.3", "Too many recipients", bad=False)
        elif not self._esmtp and _has_params(command):
            self._reject(line, 555, "5.5.4", "Parameters not allowed after HELO")
        else:
            self._owed = command  # _decide() inlined
            self._events.append(command)

    def _on_data(self, line: bytes, command: Data) -> None:
        if (self._state, Data) not in TRANSITIONS:  # _in_sequence() inlined
            self._sequence_error(line, command)
            return
        if self._sender is not None and self._sender.body == "BINARYMIME":
            self._reject(line, 503, "5.5.1", "BODY=BINARYMIME requires BDAT")
            return
        self._out.append(_DATA_REPLY)  # what _queue(354, ...) sends: no enhanced code on 3yz
        self._state = S.DATA
        self._body = BodyReader(self.config)
        self._timer_start = self._now
        self._progress = 0
        self._events.append(command)

    def _on_rset(self, line: bytes, command: Rset) -> None:
        if self._in_sequence(line, command):
            self._reset_transaction()
            self._state = S.READY if self._state in GREETED_STATES else S.HELLO
            self._auto(command, 250, "2.0.0", "OK")

    def _on_noop(self, line: bytes, command: Noop) -> None:
        if self._in_sequence(line, command):
            self._auto(command, 250, "2.0.0", "OK")

    def _on_help(self, line: bytes, command: Help) -> None:
        if self._in_sequence(line, command):
            reply = Reply(code=214, text=self.config.help_text)
            self._out.append(format_reply(214, reply.lines))
            self._events.append(command)

    def _on_expn(self, line: bytes, command: Expn) -> None:
        if self._in_sequence(line, command):
            self._auto(command, 502, "5.5.1", "EXPN not supported")

    def _on_quit(self, line: bytes, command: Quit) -> None:
        if self._in_sequence(line, command):
            self._auto(command, 221, "2.0.0", f"{self.config.hostname} closing connection")
            self._state = S.CLOSED

    def _on_starttls(self, line: bytes, command: StartTLS) -> None:
        if self._tls_active:
            self._reject(line, 503, "5.5.1", "TLS already active")
        elif not self.config.starttls:
            self._reject(line, 502, "5.5.1", "STARTTLS not available")
        elif self._in_sequence(line, command):
            self._auto(command, 220, "2.0.0", "Ready to start TLS")
            self._state = S.STARTTLS
            # CVE-2011-0411: nothing received before the handshake may be executed
            self._pos = self._scan = len(self._buf)

    def _on_auth(self, line: bytes, command: Auth) -> None:
        if not self.config.auth_mechanisms:
            self._reject(line, 502, "5.5.1", "AUTH not available")
        elif self._in_sequence(line, command):
            self._start_auth(line, command)

    def _auto(self, command: ServerEvent, code: int, enhanced: str, text: str) -> None:
        self._queue(code, enhanced, text)
        self._timer_start = self._now
        self._events.append(command)

    def _decide(self, command: Decision) -> None:
        self._owed = command
        self._events.append(command)

    # --- internals: AUTH (RFC 4954) ---------------------------------------------------------

    def _start_auth(self, line: bytes, command: Auth) -> None:
        c = self.config
        if self._authenticated is not None:
            self._reject(line, 503, "5.5.1", "Already authenticated")
            return
        if c.tls_required and not self._tls_active:
            self._reject(line, 530, "5.7.0", "Must issue a STARTTLS command first")
            return
        if not self._auth_offered():
            self._reject(line, 538, "5.7.11", "Encryption required for requested mechanism")
            return
        if command.mechanism not in c.auth_mechanisms:
            self._reject(line, 504, "5.5.4", "Unrecognized authentication type")
            return
        self._sasl = [command.mechanism]
        self._state = S.AUTH
        if command.initial_response is not None:
            self._sasl_step(command.initial_response.encode())
        else:
            self._challenge()

    def _challenge(self) -> None:
        mech, got = self._sasl[0], len(self._sasl) - 1
        challenge = "" if mech == "PLAIN" else (_LOGIN_USER if got == 0 else _LOGIN_PASS)
        self._out.append(f"334 {challenge}\r\n".encode())
        self._timer_start = self._now

    def _sasl_fail(self, line: bytes, code: int, enhanced: str, text: str) -> None:
        self._sasl = []
        self._state = S.READY
        self._reject(line, code, enhanced, text)

    def _sasl_step(self, line: bytes) -> None:
        if line == b"*":
            self._sasl_fail(line, 501, "5.0.0", "Authentication cancelled")
            return
        try:
            decoded = b"" if line == b"=" else base64.b64decode(line, validate=True)
            text = decoded.decode("utf-8")
        except (binascii.Error, ValueError):
            self._sasl_fail(b"<sasl>", 501, "5.5.2", "Cannot decode response")
            return
        self._sasl.append(text)
        mech = self._sasl[0]
        if mech == "PLAIN":
            parts = text.split("\x00")
            if len(parts) != 3 or not parts[1]:
                self._sasl_fail(b"<sasl>", 501, "5.5.2", "Malformed PLAIN response")
                return
            authzid, user, password = parts
        elif len(self._sasl) < 3:
            self._challenge()
            return
        else:
            authzid, user, password = "", self._sasl[1], self._sasl[2]
        self._sasl = []
        self._decide(
            AuthCredentials(
                mechanism=mech, authorization_id=authzid, username=user, password=password
            )
        )

    # --- internals: DATA and BDAT -----------------------------------------------------------

    def _read_body(self) -> None:
        body = self._body
        assert body is not None
        start = self._pos
        data, self._pos, finished = body.read(self._buf, self._pos)
        if data is None:
            self._scan = self._pos
            return
        self._scan = self._pos
        config = self.config
        # _data_progress() inlined
        self._progress += self._pos - start
        if self._progress >= config.min_data_progress:
            self._progress = 0
            self._timer_start = self._now
        too_big = bool(config.max_message_size) and body.size > config.max_message_size
        broken = body.violation  # a property: read once
        if data and not too_big and broken is None:
            self._events.append(MessageData(data=data))
        if finished:
            violation = (552, "5.3.4", "Message size exceeds fixed maximum") if too_big else None
            self._end_message(violation or broken)

    def _data_progress(self, octets: int) -> None:
        """Restart the data-block deadline (RFC 5321 4.5.3.2.5) once enough arrived.

        Counting blocks alone would let a client trickle three octets per data_timeout and
        hold its connection for as long as the size limit allows; the deadline restarts only
        after ``min_data_progress`` octets, so a trickle runs out of time.
        """
        self._progress += octets
        if self._progress >= self.config.min_data_progress:
            self._progress = 0
            self._timer_start = self._now

    def _end_message(self, violation: tuple[int, str, str] | None) -> None:
        if violation is not None:
            reply = self._queue(*violation)
            if self.config.lmtp:  # RFC 2033 4.2: one reply per accepted recipient
                for _ in self._recipients[1:]:
                    self._queue(*violation)
            self._events.append(MessageRejected(reply=reply))
            self._reset_transaction()
            self._state = S.READY
            return
        self._owed_count = len(self._recipients) if self.config.lmtp else 1
        self._state = S.DATA
        self._decide(EndOfMessage())

    def _start_bdat(self, line: bytes, command: Bdat) -> None:
        c = self.config
        self._bdat = command
        self._bdat_remaining = command.size
        self._bdat_reject = None
        if not c.chunking:
            self._bdat_reject = (502, "5.5.1", "BDAT not available")
        elif self._state not in (S.RCPT, S.CHUNKING):
            if self._state is S.MAIL:
                self._bdat_reject = (554, "5.5.1", "No valid recipients")
            else:
                self._bdat_reject = (503, "5.5.1", "Need MAIL and RCPT before BDAT")
        else:
            self._events.append(command)
            self._state = S.CHUNKING
        self._timer_start = self._now
        self._progress = 0
        self._bdat_line = line
        if command.size == 0:
            self._finish_bdat()

    def _read_bdat(self) -> None:
        available = len(self._buf) - self._pos
        if available <= 0:
            return
        take = min(available, self._bdat_remaining, self.config.max_chunk_size)
        end = self._pos + take
        if self._bdat_reject is None:
            self._bdat_size += take
            limit = self.config.max_message_size
            if limit and self._bdat_size > limit:
                self._bdat_reject = (552, "5.3.4", "Message size exceeds fixed maximum")
            else:
                self._events.append(MessageData(data=bytes(self._buf[self._pos : end])))
        self._pos = self._scan = end
        self._bdat_remaining -= take
        self._data_progress(take)
        if self._bdat_remaining == 0:
            self._finish_bdat()

    def _finish_bdat(self) -> None:
        command, reject = self._bdat, self._bdat_reject
        assert command is not None
        self._bdat = None
        if reject is not None:
            # RFC 3030 2: a failed chunk ends the transaction; the octets were consumed.
            in_transaction = self._state in (S.CHUNKING, S.RCPT)
            self._reject(self._bdat_line, *reject, bad=reject[0] == 502)
            if in_transaction and command.last and self.config.lmtp:
                for _ in self._recipients[1:]:  # RFC 2033 4.2, as for DATA
                    self._queue(*reject)
            if in_transaction:
                self._reset_transaction()
                self._state = S.READY
            return
        if not command.last:
            self._auto_quiet(250, "2.0.0", f"{command.size} octets received")
            return
        self._end_message(None)

    def _auto_quiet(self, code: int, enhanced: str, text: str) -> None:
        self._queue(code, enhanced, text)
        self._timer_start = self._now


# Every command the reader can produce (see _readers.VERBS) has its method here.
_ON_COMMAND: dict[type[Command], Callable[..., object]] = {
    Helo: ServerConnection._on_hello,
    Ehlo: ServerConnection._on_hello,
    Lhlo: ServerConnection._on_hello,
    Vrfy: ServerConnection._on_vrfy,
    MailFrom: ServerConnection._on_mail,
    RcptTo: ServerConnection._on_rcpt,
    Data: ServerConnection._on_data,
    Bdat: ServerConnection._start_bdat,
    Rset: ServerConnection._on_rset,
    Noop: ServerConnection._on_noop,
    Help: ServerConnection._on_help,
    Expn: ServerConnection._on_expn,
    Quit: ServerConnection._on_quit,
    StartTLS: ServerConnection._on_starttls,
    Auth: ServerConnection._on_auth,
}


def _has_params(command: MailFrom | RcptTo) -> bool:
    if isinstance(command, MailFrom):
        c = command
        return bool(
            c.size is not None or c.body or c.smtputf8 or c.ret or c.envid or c.auth or c.extra
        )
    return command.notify is not None or command.orcpt is not None or bool(command.extra)

# The client side of an SMTP (or LMTP) session, as a pure state machine.
#
# Shape: the mirror image of ServerConnection.  The application hands commands and message
# content to send(); bytes come out of data_to_send(); bytes from the server go in with
# receive_data()/receive_eof(); replies come out of next_event() as Reply events whose
# ``command`` says which command they answer.  Nothing here does I/O or reads a clock: ``now``
# is passed in wherever a deadline starts.
#
# Correlation.  Every command sent waits in a FIFO (``pending``).  A complete reply answers
# the oldest pending command (RFC 5321 4.2: "exactly one reply for each command", in order --
# RFC 2920 3.1 keeps that order when pipelining).  Two commands owe more than one reply:
#   * DATA owes the 354 and, after the content, the final reply.  send(EndOfMessage) puts
#     the DATA command back into the FIFO, so the final reply's ``command`` is that DATA (RFC
#     5321 4.3.2 lists both replies under DATA).
#   * In LMTP (RFC 2033 4.2) the end of the data owes one reply per accepted recipient: the
#     DATA command enters the FIFO once per accepted RCPT.  For ``BDAT ... LAST`` the count is
#     settled when its first reply arrives (the RCPT replies, which precede it, are known).
# A reply with nothing pending is a protocol violation -- except 421, which a server may send
# at any time before closing (RFC 5321 3.8): it becomes an event and the state CLOSED.
#
# The state is the shared SessionState, moved by the shared table (_state.next_state) when a
# reply arrives (one exception: a BDAT refused before any RCPT was accepted leaves MAIL as
# it is, like DATA's 554, which is what the server engine does).  Pipelining (RFC 2920) is
# checked against a *predicted* state: the state the session reaches if every pending
# command succeeds (_state.expected_success).  MAIL, RCPT..., DATA can therefore be sent in
# one go.  When a reply is not the success the prediction
# assumed, the prediction is recomputed from the real state and the remaining FIFO.  The
# engine also enforces RFC 2920 3.1: no pipelining unless PIPELINING was offered, and EHLO,
# HELO, LHLO, DATA, VRFY, EXPN, NOOP, QUIT, AUTH and STARTTLS end a group.
#
# Refused up front (LocalProtocolError from send(), before any byte is queued), because the
# server said it cannot take them:
#   * ESMTP parameters after HELO, or parameters whose extension was not offered: SIZE (RFC
#     1870), BODY=8BITMIME (RFC 6152), BODY=BINARYMIME (RFC 3030, needs CHUNKING too),
#     SMTPUTF8 (RFC 6531), RET/ENVID/NOTIFY/ORCPT (RFC 3461), AUTH= (RFC 4954 5).
#   * A declared SIZE over the server's limit (RFC 1870 6.1: the client "SHOULD NOT" send it).
#   * Non-ASCII addresses without SMTPUTF8 (RFC 6531 3.4).
#   * 8-bit message content unless the server offers 8BITMIME (or BINARYMIME, for BDAT)
#     and the MAIL command declared it (BODY=8BITMIME/BINARYMIME, or SMTPUTF8).
#   * BDAT when CHUNKING was not offered; DATA after BODY=BINARYMIME (RFC 3030 3).
#   * AUTH without TLS unless ClientConfig.allow_plaintext_auth (RFC 4954 4: clients SHOULD
#     NOT send credentials in the clear); STARTTLS/AUTH not offered.
#   * ENVID that is not printable ASCII or longer than 100 characters as xtext (RFC 3461
#     4.4), ORCPT over 500 (4.2); command lines over 512 octets (RFC 5321 4.5.3.1.4; MAIL and
#     RCPT get the extensions' allowances, SASL responses 12288, RFC 4954 4).
#
# The body.  In DATA mode MessageData is plain content; the engine normalises line endings to
# CRLF (a bare LF or bare CR becomes CRLF, RFC 5321 2.3.8), dot-stuffs (4.5.2) and, at
# EndOfMessage, guarantees the terminator sits on its own line: CRLF "." CRLF follows a CRLF
# even when the content did not end with one.  All of it works on whole chunks with bytes
# methods (count/replace in C); the only state carried between chunks is "a CR ended the last
# chunk" (held back: it may be the first half of a CRLF) and "the next byte starts a line".
# In BDAT mode MessageData is sent as is (RFC 3030: no stuffing, binary allowed) and must add
# up to the announced size exactly; LineNormalizer is there for callers that want CRLF.
#
# STARTTLS (RFC 3207).  A 220 moves to STARTTLS; next_event() returns PAUSED until the
# application has done the handshake and called tls_established(), which forgets the
# extensions (RFC 3207 4.2: the client "MUST discard any knowledge obtained from the server")
# and yields TLSEstablished; the application then sends EHLO again.  Bytes that arrive after
# the 220 but before the handshake are an injection attempt (the client-side twin of
# CVE-2011-0411) and raise RemoteProtocolError.
#
# Deadlines (RFC 5321 4.5.3.2): while a reply is awaited, the deadline is the time the wait
# started (the command sent on an idle connection, or the previous reply received) plus the
# timeout for the oldest pending command: greeting 5 min, MAIL 5, RCPT 5, DATA initiation 2,
# each BDAT chunk 3, end of data 10, anything else ``command_timeout``.  While the
# application streams content, each MessageData restarts a data-block deadline (3 min): the
# engine cannot see TCP writes complete, so adapters should also bound every write by it.
#
# Invariants: next_event() raises only RemoteProtocolError and send() only
# LocalProtocolError; a failed send() changes nothing (it validates before queuing bytes).
from __future__ import annotations

import base64
import binascii
import re
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType
from typing import NoReturn, TypeAlias

from mailwire.protocol._config import (
    _MAIL_PARAM_ALLOWANCE,
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    ClientConfig,
)
from mailwire.protocol._errors import LocalProtocolError, RemoteProtocolError
from mailwire.protocol._events import (
    NEED_DATA,
    PAUSED,
    Auth,
    AuthResponse,
    Bdat,
    ClientEvent,
    Command,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfMessage,
    Expn,
    Helo,
    Lhlo,
    MailFrom,
    MessageData,
    Noop,
    Quit,
    RcptTo,
    Reply,
    Sentinel,
    StartTLS,
    TLSEstablished,
    Vrfy,
)
from mailwire.protocol._grammar import GrammarError, xtext_encode
from mailwire.protocol._readers import parse_reply_line
from mailwire.protocol._state import (
    SUCCESS_CLASS,
    SessionState,
    expected_success,
    is_legal,
    next_state,
)
from mailwire.protocol._writers import command_bytes

S = SessionState
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_ENVID = 100  # RFC 3461 4.4: ENVID, xtext-encoded, at most 100 characters
_MAX_ORCPT = 500  # RFC 3461 4.2: ORCPT, xtext-encoded, at most 500 characters
#: Longest MAIL/RCPT line, CRLF included: RFC 5321 4.5.3.1.4 plus the extension allowances.
_MAIL_LINE_LIMIT = MAX_COMMAND_LINE + _MAIL_PARAM_ALLOWANCE
ClientInput: TypeAlias = Command | MessageData | EndOfMessage
#: Commands that must end a pipelined group (RFC 2920 3.1), plus AUTH's continuation lines.
_GROUP_ENDERS = (Ehlo, Helo, Lhlo, Data, Vrfy, Expn, Noop, Quit, Auth, AuthResponse, StartTLS)
_ENDED = frozenset({S.CLOSED, S.ERROR})
_CRLF = b"\r\n"


class LineNormalizer:
    """Streams content to CRLF line endings: bare LF and bare CR each become CRLF.

    Feed chunks with :meth:`feed`; :meth:`end` returns what is still held back (a final CR
    becomes CRLF) and, with ``final_crlf``, a CRLF when the content does not end with one.
    """

    __slots__ = ("_held_cr", "at_line_start", "empty")

    def __init__(self) -> None:
        self._held_cr = False
        self.at_line_start = True  #: True if the output so far ends a line (or is empty)
        self.empty = True  #: True until some content came out

    def feed(self, data: bytes) -> bytes:
        """Normalise ``data``; a trailing CR is held back until the next chunk.

        Returns:
            The normalised bytes (possibly empty).
        """
        if self._held_cr:
            data = b"\r" + data
            self._held_cr = False
        if data[-1:] == b"\r":
            data = data[:-1]
            self._held_cr = True
        if not data:
            return b""
        crlf = data.count(_CRLF)
        if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
            data = data.replace(_CRLF, b"\n").replace(b"\r", b"\n").replace(b"\n", _CRLF)
        self.at_line_start = data[-2:] == _CRLF
        self.empty = False
        return data

    def end(self, *, final_crlf: bool = True) -> bytes:
        """Flush: the held CR as CRLF, then CRLF if the content ended mid-line."""
        tail = b""
        if self._held_cr:
            self._held_cr = False
            tail = _CRLF
            self.at_line_start = True
            self.empty = False
        if final_crlf and not self.at_line_start:
            tail += _CRLF
            self.at_line_start = True
        return tail


# --- SASL helpers (RFC 4954) -------------------------------------------------------------------
#
# Each helper turns credentials into the Auth command and answers 334 challenges with
# AuthResponse lines; the ClientConnection refuses to send them without TLS unless the
# configuration allows it.  Usage:
#
#     sasl = PlainAuth(username="u", password="p")
#     conn.send(sasl.start())
#     ... on Reply 334: conn.send(sasl.respond(reply)) ... until 235 (or 5yz).


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class SaslMechanism:
    """A client-side SASL exchange: :meth:`start` gives the AUTH command, :meth:`respond`
    answers each 334 challenge."""

    mechanism = ""

    def start(self) -> Auth:
        """The AUTH command that opens the exchange."""
        raise NotImplementedError

    def respond(self, challenge: Reply) -> AuthResponse:
        """The answer to a 334 challenge.

        Raises:
            LocalProtocolError: ``challenge`` is not a 334 reply.
        """
        raise NotImplementedError

    @staticmethod
    def _check(challenge: Reply) -> str:
        if challenge.code != 334:
            raise LocalProtocolError(f"not a SASL challenge: {challenge.code}")
        return challenge.text.strip()

    @staticmethod
    def _opening(mechanism: str, message: str) -> Auth:
        """AUTH with ``message`` as the initial response if the line stays within 512 octets;
        RFC 4954 4: otherwise the client "MUST NOT use the initial response parameter" and
        sends it after the server's empty 334 instead."""
        if len(mechanism) + len(message) + 8 > MAX_COMMAND_LINE:  # "AUTH m r\r\n"
            return Auth(mechanism=mechanism)
        return Auth(mechanism=mechanism, initial_response=message)


class PlainAuth(SaslMechanism):
    """AUTH PLAIN (RFC 4616) with the credentials as the initial response (RFC 4954 4).

    Args:
        username: the authentication identity.
        password: the password.
        authzid: the identity to act as; empty to act as ``username``.
    """

    mechanism = "PLAIN"

    def __init__(self, *, username: str, password: str, authzid: str = "") -> None:
        if "\x00" in username + password + authzid:
            raise LocalProtocolError("PLAIN credentials must not contain NUL (RFC 4616 2)")
        self._message = _b64(f"{authzid}\x00{username}\x00{password}")
        self._pending = True  # the credentials still have to be sent after a 334

    def __repr__(self) -> str:
        return "PlainAuth(...)"

    def start(self) -> Auth:
        auth = self._opening("PLAIN", self._message)
        self._pending = auth.initial_response is None
        return auth

    def respond(self, challenge: Reply) -> AuthResponse:
        self._check(challenge)
        if self._pending:  # the credentials were too long for the AUTH line
            self._pending = False
            return AuthResponse(data=self._message)
        return AuthResponse(data="*")  # PLAIN has one step: cancel (RFC 4954 4)


class LoginAuth(SaslMechanism):
    """AUTH LOGIN (draft-murchison-sasl-login): username, then password, each answering a
    334 challenge (``Username:`` / ``Password:``, base64)."""

    mechanism = "LOGIN"

    def __init__(self, *, username: str, password: str) -> None:
        self._username = _b64(username)
        self._password = _b64(password)
        self._step = 0

    def __repr__(self) -> str:
        return "LoginAuth(...)"

    def start(self) -> Auth:
        self._step = 0
        return Auth(mechanism="LOGIN")

    def respond(self, challenge: Reply) -> AuthResponse:
        text = self._check(challenge)
        try:
            prompt = base64.b64decode(text, validate=True).decode("utf-8", "replace").lower()
        except (binascii.Error, ValueError):
            prompt = ""
        if "user" in prompt:
            step = 0
        elif "pass" in prompt:
            step = 1
        else:
            step = self._step
        self._step = step + 1
        if step > 1:
            return AuthResponse(data="*")  # a third challenge: cancel (RFC 4954 4)
        return AuthResponse(data=self._username if step == 0 else self._password)


class XOAuth2Auth(SaslMechanism):
    """AUTH XOAUTH2 (Google/Microsoft OAuth 2.0 bearer tokens).  A 334 carries a base64 JSON
    error; it is answered with an empty line, and the server then sends the final 5yz."""

    mechanism = "XOAUTH2"

    def __init__(self, *, username: str, token: str) -> None:
        if "\x01" in username + token:
            raise LocalProtocolError("XOAUTH2 user and token must not contain ^A")
        self._message = _b64(f"user={username}\x01auth=Bearer {token}\x01\x01")
        self._pending = True

    def __repr__(self) -> str:
        return "XOAuth2Auth(...)"

    def start(self) -> Auth:
        # Access tokens are often longer than an AUTH line may be (RFC 4954 4).
        auth = self._opening("XOAUTH2", self._message)
        self._pending = auth.initial_response is None
        return auth

    def respond(self, challenge: Reply) -> AuthResponse:
        self._check(challenge)
        if self._pending:
            self._pending = False
            return AuthResponse(data=self._message)
        return AuthResponse(data="")  # the error challenge: an empty line, then the 5yz


def parse_extensions(reply: Reply) -> dict[str, str]:
    """The EHLO/LHLO keywords of a positive reply (RFC 5321 4.1.1.1), upper-cased, mapped to
    their parameters (``""`` when there are none).

    The obsolete ``AUTH=MECHS`` form (sent by old Microsoft clients' servers) counts as AUTH.
    """
    extensions: dict[str, str] = {}
    for line in reply.lines[1:]:
        line = line.strip()
        if not line:
            continue
        keyword, _, params = line.partition(" ")
        if keyword[:5].upper() == "AUTH=":
            keyword, params = "AUTH", f"{keyword[5:]} {params}".strip()
            if "AUTH" in extensions:
                merged = dict.fromkeys(extensions["AUTH"].split() + params.split())
                extensions["AUTH"] = " ".join(merged)
                continue
        keyword = keyword.upper()
        if keyword == "AUTH" and "AUTH" in extensions:
            merged = dict.fromkeys(extensions["AUTH"].split() + params.split())
            extensions["AUTH"] = " ".join(merged)
            continue
        extensions.setdefault(keyword, params.strip())
    return extensions


class ClientConnection:
    """The client side of one SMTP/LMTP session.

    Wait for the greeting (``next_event()`` yields it as a Reply), then send EHLO (LHLO in
    LMTP).  If EHLO gets a 5yz (500/502 from a server that only speaks RFC 821), the state
    stays HELLO and ``ehlo_rejected`` is True: send ``Helo`` instead (RFC 5321 3.2).

    ``next_event()`` returns NEED_DATA while replies are awaited and PAUSED when it is the
    application's turn (nothing awaited: send a command or content, or, in STARTTLS, do the
    handshake and call ``tls_established()``).

    Args:
        config: the client configuration.
        tls_active: True when the connection is already encrypted (implicit TLS, port 465).
        now: the current time (any monotonic clock) to start the greeting deadline.
    """

    def __init__(
        self, config: ClientConfig, *, tls_active: bool = False, now: float | None = None
    ) -> None:
        self.config = config
        self._state = S.GREETING
        self._predicted = S.GREETING
        self._pending: deque[Command] = deque()
        self._lmtp_settled = True  # False while a BDAT LAST's LMTP reply count is unknown
        self._buf = bytearray()
        self._scan = 0
        self._lines: list[str] = []
        self._code = 0
        self._out: list[bytes] = []
        self._events: deque[ClientEvent] = deque()
        self._eof = False
        self._closed_reported = False
        self._injected = False
        self._tls_active = tls_active
        self._extensions: dict[str, str] = {}
        self._esmtp = False
        self._ehlo_rejected = False
        self._refused = False
        self._authenticated = False
        self._sender: MailFrom | None = None  # MAIL of the current (predicted) transaction
        self._accepted = 0  # RCPTs accepted in the current transaction
        self._body = LineNormalizer()
        self._bdat_remaining = 0
        self._data_command = Data()
        self._now = now
        self._timer_start = now
        self._timed_out = False

    # --- read-only views --------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """The session state, moved by the replies received."""
        return self._state

    @property
    def pending(self) -> tuple[Command, ...]:
        """The commands still awaiting a reply, oldest first (DATA appears again, once per
        owed final reply, after EndOfMessage)."""
        return tuple(self._pending)

    @property
    def extensions(self) -> Mapping[str, str]:
        """The ESMTP extensions of the accepted EHLO/LHLO: KEYWORD -> parameters."""
        return MappingProxyType(self._extensions)

    @property
    def max_message_size(self) -> int | None:
        """The server's SIZE limit in octets (RFC 1870), or None if it declared none."""
        value = self._extensions.get("SIZE", "")
        if not (value.isascii() and value.isdigit()) or int(value) == 0:
            return None
        return int(value)

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        """The SASL mechanisms the server offers (RFC 4954), upper-cased."""
        return frozenset(m.upper() for m in self._extensions.get("AUTH", "").split())

    @property
    def esmtp(self) -> bool:
        """True once EHLO (or LHLO) was accepted."""
        return self._esmtp

    @property
    def ehlo_rejected(self) -> bool:
        """True after EHLO got a 5yz: fall back to HELO (RFC 5321 3.2)."""
        return self._ehlo_rejected

    @property
    def refused(self) -> bool:
        """True if the server refused the session with a 554 greeting (only QUIT is left)."""
        return self._refused

    @property
    def tls_active(self) -> bool:
        """True once the session runs over TLS."""
        return self._tls_active

    @property
    def authenticated(self) -> bool:
        """True after AUTH succeeded (235)."""
        return self._authenticated

    @property
    def timed_out(self) -> bool:
        """True if :meth:`check_timeout` ended the session."""
        return self._timed_out

    @property
    def accepted_recipients(self) -> int:
        """How many RCPT commands of the current transaction were accepted."""
        return self._accepted

    @property
    def bdat_remaining(self) -> int:
        """Octets of the last BDAT still to be given as MessageData."""
        return self._bdat_remaining

    def has_extension(self, keyword: str) -> bool:
        """True if the server advertised ``keyword`` (case-insensitive)."""
        return keyword.upper() in self._extensions

    @property
    def deadline(self) -> float | None:
        """When the server's time runs out (RFC 5321 4.5.3.2), on the clock passed as
        ``now``; None without a clock, when nothing is awaited, or after the session ended.
        When it passes, call :meth:`check_timeout`."""
        if self._timer_start is None or self._state in _ENDED or self._state is S.STARTTLS:
            return None
        c = self.config
        if self._state is S.GREETING:
            return self._timer_start + c.greeting_timeout
        if not self._pending:
            if self._state is S.DATA or self._bdat_remaining:
                return self._timer_start + c.data_block_timeout
            return None
        head = self._pending[0]
        match head:
            case MailFrom():
                timeout = c.mail_timeout
            case RcptTo():
                timeout = c.rcpt_timeout
            case Data():
                timeout = c.data_end_timeout if self._state is S.DATA else c.data_init_timeout
            case Bdat():
                timeout = c.data_end_timeout if head.last else c.data_block_timeout
            case _:
                timeout = c.command_timeout
        return self._timer_start + timeout

    # --- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes, *, now: float | None = None) -> None:
        """Feed bytes received from the server (``b""`` is a no-op; use receive_eof()).

        Raises:
            LocalProtocolError: after receive_eof().
        """
        if now is not None:
            self._now = now
        if self._eof:
            raise LocalProtocolError("receive_data() after receive_eof()")
        if not data or self._state in _ENDED:
            return
        if self._state is S.STARTTLS:
            self._injected = True  # plaintext between 220 and the handshake
            return
        self._buf += data

    def receive_eof(self) -> None:
        """Tell the engine the server closed its side of the connection."""
        self._eof = True

    def check_timeout(self, now: float) -> bool:
        """If the deadline has passed, end the session (state CLOSED, ``timed_out``).

        Returns:
            True if the session timed out: the adapter should close the connection.
        """
        self._now = now
        deadline = self.deadline
        if deadline is None or now < deadline:
            return False
        self._timed_out = True
        self._close()
        return True

    # --- events -----------------------------------------------------------------------------

    def next_event(self) -> ClientEvent | Sentinel:
        """The next event: a Reply (``.command`` = the command it answers, None for the
        greeting and an unsolicited 421), TLSEstablished, ConnectionClosed (reported once);
        or NEED_DATA (replies are awaited: feed bytes) or PAUSED (the application's turn, or
        nothing more to come after ConnectionClosed).

        Raises:
            RemoteProtocolError: a malformed or over-long reply line, a multi-line reply whose
                codes disagree, a reply when none is awaited, bytes injected before the TLS
                handshake.  The state becomes ERROR.
        """
        if self._events:
            return self._events.popleft()
        state = self._state
        if state is S.ERROR:
            raise RemoteProtocolError("the session is in the ERROR state")
        if state is S.CLOSED:
            return self._closed()
        if state is S.STARTTLS:
            if self._injected:
                return self._fail("data received after 220 to STARTTLS, before TLS")
            return PAUSED
        try:
            reply = self._read_reply()
        except RemoteProtocolError:
            self._state = S.ERROR
            raise
        if reply is not None:
            return self._handle(reply)
        if self._eof:
            self._close()
            return self._closed()
        if self._state is S.STARTTLS:
            return PAUSED
        if self._pending or self._state is S.GREETING:
            return NEED_DATA
        return PAUSED

    def _closed(self) -> ConnectionClosed | Sentinel:
        # As on the server: ConnectionClosed once, then PAUSED (nothing more will happen).
        if self._closed_reported:
            return PAUSED
        self._closed_reported = True
        return ConnectionClosed()

    def _fail(self, message: str) -> NoReturn:
        self._state = S.ERROR
        raise RemoteProtocolError(message)

    def _close(self) -> None:
        self._state = self._predicted = S.CLOSED
        self._pending.clear()
        self._bdat_remaining = 0

    def _read_reply(self) -> Reply | None:
        """Take one complete reply out of the buffer, or None if more bytes are needed."""
        buf = self._buf
        limit = self.config.max_reply_line
        while True:
            end = buf.find(b"\n", self._scan)
            if end < 0:
                if len(buf) > limit:
                    raise RemoteProtocolError(f"reply line longer than {limit} octets")
                self._scan = len(buf)
                return None
            stop = end - 1 if end and buf[end - 1] == 0x0D else end  # tolerate a bare LF
            if end + 1 > limit:
                raise RemoteProtocolError(f"reply line longer than {limit} octets")
            line = bytes(buf[:stop])
            del buf[: end + 1]
            self._scan = 0
            try:
                code, last, text = parse_reply_line(line)
            except GrammarError as exc:
                raise RemoteProtocolError(exc.text) from None
            if self._lines and code != self._code:
                raise RemoteProtocolError(
                    f"multi-line reply changes its code from {self._code} to {code}"
                )
            self._code = code
            self._lines.append(text)
            if last:
                lines, self._lines = self._lines, []
                return Reply(code=code, text="\n".join(lines))
            if len(self._lines) >= self.config.max_reply_lines:
                raise RemoteProtocolError("multi-line reply has too many lines")

    def _handle(self, reply: Reply) -> ClientEvent:
        """Correlate a complete reply with the oldest pending command and move the state."""
        self._timer_start = self._now
        code = reply.code
        if self._state is S.GREETING:
            # RFC 5321 3.1: 220 opens the session, 554 refuses it (only QUIT remains);
            # 421 (3.8) closes it at once.
            if code == 421:
                self._close()
            elif code == 220 or code >= 400:
                self._state = self._predicted = S.HELLO
                self._refused = code != 220
            else:
                self._fail(f"greeting with reply code {code}")
            return reply
        if not self._pending:
            if code == 421:  # RFC 5321 3.8: the server is shutting down
                self._close()
                return reply
            self._fail(f"reply {code} received when no command was pending")
        command = self._pending.popleft()
        reply = Reply(code=code, text=reply.text, command=command)
        if code == 421:
            self._close()
            return reply
        state = self._state
        new: SessionState
        more = state is S.DATA and bool(self._pending) and self._pending[0] is command
        if isinstance(command, Bdat) and command.last and self.config.lmtp:
            more = self._settle_lmtp(command)
        if more:
            new = state  # LMTP: more final replies owed for this message (RFC 2033 4.2)
        elif state is S.DATA and isinstance(command, Data):
            new = S.READY  # the final reply to the content, whatever its class
        elif isinstance(command, Data) and code // 100 == 3:
            new = S.DATA  # the server waits for content, whatever we thought of it
        elif isinstance(command, Bdat) and state is S.MAIL and code >= 300:
            new = state  # no recipient yet: refused like DATA, the sender stays (4.1.1.4)
        elif isinstance(command, Bdat) or is_legal(state, type(command)):
            new = next_state(state, command, code)
        else:
            new = state  # a pipelined command the server had to refuse (503)
        self._state = new
        self._after_reply(command, reply)
        return reply

    def _settle_lmtp(self, command: Bdat) -> bool:
        """RFC 2033 4.2 for BDAT LAST: one reply per accepted recipient, counted when the
        first arrives.  Returns True if more replies to ``command`` are owed."""
        if self._lmtp_settled:
            self._lmtp_settled = False
            for _ in range(self._accepted - 1):
                self._pending.appendleft(command)
        more = bool(self._pending) and self._pending[0] is command
        self._lmtp_settled = not more
        return more

    def _after_reply(self, command: Command, reply: Reply) -> None:
        cls = reply.code // 100
        match command:
            case Ehlo() | Lhlo() | Helo():
                if cls == 2:
                    self._esmtp = not isinstance(command, Helo)
                    self._extensions = parse_extensions(reply) if self._esmtp else {}
                    self._ehlo_rejected = False
                elif isinstance(command, Ehlo) and cls == 5:
                    self._ehlo_rejected = True
            case MailFrom():
                self._accepted = 0
            case RcptTo():
                if cls == 2 and self._state is S.RCPT:
                    self._accepted += 1
            case Auth() | AuthResponse():
                if reply.code == 235:
                    self._authenticated = True
            case _:
                pass
        if self._state is S.STARTTLS and self._buf:
            self._fail("data pipelined after 220 to STARTTLS (response injection)")
        if cls != SUCCESS_CLASS.get(type(command), 2) or isinstance(command, (Data, Bdat)):
            self._repredict()

    def _repredict(self) -> None:
        """Recompute the predicted state from the real one and the pending commands."""
        state = self._state
        pending = list(self._pending)
        if state is S.DATA:
            finals = 0
            while finals < len(pending) and isinstance(pending[finals], Data):
                finals += 1
            if not finals:
                self._predicted = S.DATA
                return
            state, pending = S.READY, pending[finals:]
        for command in pending:
            if isinstance(command, Bdat) or is_legal(state, type(command)):
                state = expected_success(state, command)
        self._predicted = state

    # --- output -----------------------------------------------------------------------------

    def send(self, event: ClientInput, *, now: float | None = None) -> None:
        """Send a command, a chunk of message content, or the end of the content.

        Args:
            event: a command (pipelined behind pending ones if the server offers PIPELINING
                and the session would be in the right state if they all succeed);
                MessageData (in DATA: content, normalised and dot-stuffed here; after BDAT:
                the chunk's octets, sent as they are); EndOfMessage (ends DATA content).
            now: the current time, to start the reply deadline.

        Raises:
            LocalProtocolError: the event is not legal now (see the module comment); nothing
                was queued and the state is unchanged.
        """
        if now is not None:
            self._now = now
        if isinstance(event, MessageData):
            self._send_content(event.data)
            return
        if isinstance(event, EndOfMessage):
            self._send_end()
            return
        self._check_command(event)
        line = command_bytes(event)
        self._check_line(event, line)
        if not self._pending:
            self._timer_start = self._now
        match event:
            case MailFrom():
                self._sender = event
            case Data():
                self._data_command = event
            case Bdat():
                self._bdat_remaining = event.size
            case _:
                pass
        self._out.append(line)
        self._pending.append(event)
        if isinstance(event, Bdat) or is_legal(self._predicted, type(event)):
            self._predicted = expected_success(self._predicted, event)

    def _check_command(self, command: Command) -> None:
        state, predicted = self._state, self._predicted
        name = type(command).__name__
        if state in _ENDED:
            raise LocalProtocolError(f"cannot send {name}: the session is {state.name}")
        if state is S.GREETING:
            raise LocalProtocolError(f"cannot send {name} before the greeting (RFC 5321 3.1)")
        if self._bdat_remaining:
            raise LocalProtocolError(f"{self._bdat_remaining} BDAT octets are still owed")
        if self._refused and not isinstance(command, Quit):
            raise LocalProtocolError("the server refused the session (554): only QUIT")
        if self._pending:
            if not self.has_extension("PIPELINING"):
                raise LocalProtocolError("the server does not offer PIPELINING (RFC 2920)")
            last = self._pending[-1]
            if isinstance(last, _GROUP_ENDERS) and not (isinstance(last, Data) and state is S.DATA):
                raise LocalProtocolError(
                    f"{type(last).__name__} must be the last command of a group (RFC 2920 3.1)"
                )
        if isinstance(command, (Ehlo, Helo)) and self.config.lmtp:
            raise LocalProtocolError("LMTP uses LHLO (RFC 2033 4.1)")
        if isinstance(command, Lhlo) and not self.config.lmtp:
            raise LocalProtocolError("LHLO is LMTP only; set ClientConfig.lmtp")
        if not is_legal(predicted, type(command)):
            raise LocalProtocolError(f"{name} is not allowed in state {predicted.name}")
        match command:
            case MailFrom():
                self._check_mail(command)
            case RcptTo():
                self._check_rcpt(command)
            case Data():
                if self._sender is not None and self._sender.body == "BINARYMIME":
                    raise LocalProtocolError("BODY=BINARYMIME requires BDAT (RFC 3030 3)")
            case Bdat():
                if not self.has_extension("CHUNKING"):
                    raise LocalProtocolError("the server does not offer CHUNKING (RFC 3030)")
            case StartTLS():
                if self._tls_active:
                    raise LocalProtocolError("TLS is already active")
                if not self.has_extension("STARTTLS"):
                    raise LocalProtocolError("the server does not offer STARTTLS")
            case Auth():
                if not self._tls_active and not self.config.allow_plaintext_auth:
                    raise LocalProtocolError(
                        "AUTH without TLS would send credentials in clear text "
                        "(set ClientConfig.allow_plaintext_auth to allow it)"
                    )
                if command.mechanism.upper() not in self.auth_mechanisms:
                    raise LocalProtocolError(f"the server does not offer AUTH {command.mechanism}")
                if self._authenticated:
                    raise LocalProtocolError("already authenticated (RFC 4954 4)")
            case _:
                pass

    @staticmethod
    def _check_line(command: Command, line: bytes) -> None:
        """RFC 5321 4.5.3.1.4: command lines of at most 512 octets, CRLF included; MAIL and
        RCPT get the extensions' allowances; SASL response lines 12288, while the AUTH
        command itself "is still subject to the line length limitations" (RFC 4954 4)."""
        if isinstance(command, AuthResponse):
            limit = MAX_AUTH_LINE
        elif isinstance(command, (MailFrom, RcptTo)):
            limit = _MAIL_LINE_LIMIT
        else:
            limit = MAX_COMMAND_LINE
        if len(line) > limit:
            raise LocalProtocolError(
                f"{type(command).__name__} line of {len(line)} octets exceeds {limit}"
            )

    def _need(self, keyword: str, what: str) -> None:
        if keyword not in self._extensions:
            raise LocalProtocolError(f"{what} needs the {keyword} extension, not offered")

    def _check_mail(self, mail: MailFrom) -> None:
        has_params = bool(
            mail.size is not None
            or mail.body
            or mail.smtputf8
            or mail.ret
            or mail.envid
            or mail.auth
            or mail.extra
        )
        if has_params and not self._esmtp:
            raise LocalProtocolError("MAIL parameters need EHLO (ESMTP), not HELO")
        if mail.size is not None:
            self._need("SIZE", "SIZE=")
            limit = self.max_message_size
            if limit is not None and mail.size > limit:
                raise LocalProtocolError(
                    f"declared SIZE {mail.size} exceeds the server's limit {limit} (RFC 1870)"
                )
        if mail.body == "8BITMIME":
            self._need("8BITMIME", "BODY=8BITMIME")
        elif mail.body == "BINARYMIME":
            self._need("BINARYMIME", "BODY=BINARYMIME")
            self._need("CHUNKING", "BODY=BINARYMIME")
        if mail.smtputf8:
            self._need("SMTPUTF8", "the SMTPUTF8 parameter")
        elif not mail.address.isascii():
            raise LocalProtocolError("a non-ASCII sender needs SMTPUTF8 (RFC 6531)")
        if mail.ret is not None or mail.envid is not None:
            self._need("DSN", "RET=/ENVID=")
        if mail.envid is not None:
            # RFC 3461 4.4: printable US-ASCII, at most 100 characters as xtext
            if not mail.envid.isascii() or _CONTROL.search(mail.envid):
                raise LocalProtocolError("ENVID must be printable US-ASCII (RFC 3461 4.4)")
            if len(xtext_encode(mail.envid)) > _MAX_ENVID:
                raise LocalProtocolError("ENVID longer than 100 characters (RFC 3461 4.4)")
        if mail.auth is not None:
            self._need("AUTH", "AUTH=")

    def _check_rcpt(self, rcpt: RcptTo) -> None:
        has_params = rcpt.notify is not None or rcpt.orcpt is not None or bool(rcpt.extra)
        if has_params and not self._esmtp:
            raise LocalProtocolError("RCPT parameters need EHLO (ESMTP), not HELO")
        if rcpt.notify is not None or rcpt.orcpt is not None:
            self._need("DSN", "NOTIFY=/ORCPT=")
        if rcpt.orcpt is not None:
            kind, _, address = rcpt.orcpt.partition(";")
            if _CONTROL.search(rcpt.orcpt) or not kind:
                raise LocalProtocolError("ORCPT must be addr-type;address without controls")
            if len(kind) + 1 + len(xtext_encode(address)) > _MAX_ORCPT:
                raise LocalProtocolError("ORCPT longer than 500 characters (RFC 3461 4.2)")
        utf8 = self._sender is not None and self._sender.smtputf8
        if not utf8 and not rcpt.address.isascii():
            raise LocalProtocolError("a non-ASCII recipient needs MAIL ... SMTPUTF8 (RFC 6531)")

    def _check_8bit(self, data: bytes) -> None:
        if data.isascii():
            return
        sender = self._sender
        bdat = self._state is not S.DATA
        offered = self.has_extension("8BITMIME") or (bdat and self.has_extension("BINARYMIME"))
        if not offered:
            raise LocalProtocolError("8-bit content, but the server does not offer 8BITMIME")
        declared = sender is not None and (
            sender.smtputf8 or sender.body in ("8BITMIME", "BINARYMIME")
        )
        if not declared:
            raise LocalProtocolError(
                "8-bit content must be declared with BODY=8BITMIME (RFC 6152) or SMTPUTF8"
            )

    def _send_content(self, data: bytes) -> None:
        if not data and (
            self._state is S.DATA or (self._pending and isinstance(self._pending[-1], Bdat))
        ):
            return  # nothing to send (e.g. after BDAT 0)
        if self._bdat_remaining:
            if len(data) > self._bdat_remaining:
                raise LocalProtocolError(
                    f"MessageData of {len(data)} octets, but only {self._bdat_remaining} "
                    "remain in this BDAT chunk"
                )
            self._check_8bit(data)
            self._bdat_remaining -= len(data)
            self._out.append(data)
            if not self._pending:
                self._timer_start = self._now
            return
        if self._state is not S.DATA or self._pending:
            raise LocalProtocolError("MessageData outside DATA (wait for 354) or BDAT")
        self._check_8bit(data)
        body = self._body
        at_line_start = body.at_line_start
        data = body.feed(data)
        if data:
            # Dot-stuffing (RFC 5321 4.5.2): one more "." on every line that starts with "."
            if at_line_start and data[:1] == b".":
                data = b"." + data
            self._out.append(data.replace(b"\r\n.", b"\r\n.."))
        self._timer_start = self._now

    def _send_end(self) -> None:
        if self._state is not S.DATA or self._pending:
            raise LocalProtocolError("EndOfMessage outside DATA content")
        tail = self._body.end(final_crlf=True)
        self._body = LineNormalizer()
        self._out.append(tail + b".\r\n")
        command = self._data_command
        count = max(self._accepted, 1) if self.config.lmtp else 1
        self._pending.extend([command] * count)
        self._predicted = S.READY
        self._timer_start = self._now

    # --- output: buffers and the connection ---------------------------------------------------

    def data_to_send(self) -> bytes:
        """The bytes to write to the server, removed from the engine's output buffer."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def tls_established(self) -> None:
        """The TLS handshake after STARTTLS succeeded: the session restarts at HELLO and a
        TLSEstablished event is queued (RFC 3207 4.2: send EHLO again).

        Raises:
            LocalProtocolError: no 220 to STARTTLS was received.
        """
        if self._state is not S.STARTTLS:
            raise LocalProtocolError("tls_established() outside STARTTLS")
        self._tls_active = True
        self._state = self._predicted = S.HELLO
        self._extensions = {}
        self._esmtp = False
        self._authenticated = False
        self._sender = None
        self._timer_start = self._now
        self._events.append(TLSEstablished())

    def send_failed(self) -> None:
        """The adapter could not write to the server: the session is over (ERROR)."""
        self._state = self._predicted = S.ERROR

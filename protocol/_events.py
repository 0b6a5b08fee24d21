# Every event the engines exchange with applications.
#
# Events are frozen, slotted, keyword-only dataclasses with immutable fields.  The *same*
# classes flow in both directions: what a ClientConnection is given to send is exactly what the
# ServerConnection yields after parsing the bytes, so "client event == server event" is a
# one-line test (tests/test_pair.py does it under hypothesis).
#
# Constructors validate what would otherwise let an application inject protocol: CR, LF and
# NUL in any text field, address syntax (RFC 5321 4.1.2), ESMTP keyword syntax.  Violations
# raise LocalProtocolError -- building a bad event is the application's mistake.
#
# Parsed ESMTP parameters are typed fields (MailFrom.size, RcptTo.notify, ...) rather than a
# dict, so applications never parse strings; parameters the engine does not know stay in
# ``extra`` as (KEYWORD, value) pairs, in order.
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar

from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._grammar import is_valid_mailbox

_E = TypeVar("_E")
_BAD_CHARS = re.compile(r"[\r\n\x00]")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
_BODY_TYPES = frozenset({"7BIT", "8BITMIME", "BINARYMIME"})
_NOTIFY = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def trusted(cls: type[_E], **fields: object) -> _E:
    """Build an event from values the parser has already validated, skipping __post_init__.

    The server's command parser checks every field while parsing; validating again in the
    constructor doubled the cost of the command path.  Missing fields take their defaults.
    """
    obj = object.__new__(cls)
    for name, f in cls.__dataclass_fields__.items():  # type: ignore[attr-defined]
        object.__setattr__(obj, name, fields[name] if name in fields else f.default)
    return obj


def _check_text(name: str, value: str) -> None:
    if _BAD_CHARS.search(value):
        raise LocalProtocolError(f"{name} must not contain CR, LF or NUL: {value!r}")
    _check_encodable(name, value)


def _check_encodable(name: str, value: str) -> None:
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise LocalProtocolError(f"{name} is not valid Unicode: {value!r}") from None


def _check_extra(extra: tuple[tuple[str, str | None], ...]) -> None:
    for key, value in extra:
        if not _KEYWORD.fullmatch(key):
            raise LocalProtocolError(f"bad ESMTP keyword {key!r}")
        if value is not None and (not value or " " in value or "=" in value):
            raise LocalProtocolError(f"bad ESMTP value {value!r}")
        if value is not None:
            _check_text(key, value)


def _check_hello_domain(domain: str) -> None:
    if not domain or any(c.isspace() for c in domain):
        raise LocalProtocolError(f"bad HELO/EHLO argument {domain!r}")
    _check_text("domain", domain)


# --- commands (client -> server) -------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Helo:
    """``HELO domain`` (RFC 5321 4.1.1.1).  A decision: the server application replies."""

    domain: str

    def __post_init__(self) -> None:
        _check_hello_domain(self.domain)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ehlo:
    """``EHLO domain`` (RFC 5321 4.1.1.1).  A decision: the application accepts (2yz, and the
    engine appends the extension keywords from the configuration) or rejects."""

    domain: str

    def __post_init__(self) -> None:
        _check_hello_domain(self.domain)


@dataclass(frozen=True, slots=True, kw_only=True)
class Lhlo:
    """``LHLO domain``: the LMTP greeting (RFC 2033 4.1).  A decision, like EHLO."""

    domain: str

    def __post_init__(self) -> None:
        _check_hello_domain(self.domain)


@dataclass(frozen=True, slots=True, kw_only=True)
class MailFrom:
    """``MAIL FROM:<address> [params]`` (RFC 5321 4.1.1.2).  A decision.

    Attributes:
        address: the reverse-path mailbox, ``""`` for the null sender ``<>``.
        size: SIZE= (RFC 1870), the client's estimate of the message size in octets.
        body: BODY= (RFC 6152 / RFC 3030): ``"7BIT"``, ``"8BITMIME"`` or ``"BINARYMIME"``.
        smtputf8: the SMTPUTF8 parameter (RFC 6531).
        ret: RET= (RFC 3461): ``"FULL"`` or ``"HDRS"``.
        envid: ENVID= (RFC 3461), xtext-decoded.
        auth: AUTH= (RFC 4954 5), xtext-decoded; ``"<>"`` when the client says unknown.
        extra: any other parameters as (KEYWORD, value) pairs.
    """

    address: str
    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None
    extra: tuple[tuple[str, str | None], ...] = ()

    def __post_init__(self) -> None:
        if self.address and not is_valid_mailbox(self.address, utf8=True):
            raise LocalProtocolError(f"bad sender address {self.address!r}")
        if self.size is not None and not 0 <= self.size < 10**20:
            raise LocalProtocolError(f"bad SIZE {self.size!r}")
        if self.body is not None and self.body not in _BODY_TYPES:
            raise LocalProtocolError(f"bad BODY {self.body!r}")
        if self.ret is not None and self.ret not in ("FULL", "HDRS"):
            raise LocalProtocolError(f"bad RET {self.ret!r}")
        for name in ("envid", "auth"):
            value = getattr(self, name)
            if value is not None:
                _check_text(name, value)
        _check_extra(self.extra)


@dataclass(frozen=True, slots=True, kw_only=True)
class RcptTo:
    """``RCPT TO:<address> [params]`` (RFC 5321 4.1.1.3).  A decision.

    Attributes:
        address: the forward-path mailbox; ``"Postmaster"`` for the domain-less
            ``<Postmaster>`` that every server MUST accept (RFC 5321 4.5.1).
        notify: NOTIFY= (RFC 3461 4.1): ``("NEVER",)`` or a subset of SUCCESS/FAILURE/DELAY.
        orcpt: ORCPT= (RFC 3461 4.2) as ``"addr-type;address"``, xtext-decoded.
        extra: any other parameters as (KEYWORD, value) pairs.
    """

    address: str
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    extra: tuple[tuple[str, str | None], ...] = ()

    def __post_init__(self) -> None:
        if self.address.lower() != "postmaster" and not is_valid_mailbox(self.address):
            raise LocalProtocolError(f"bad recipient address {self.address!r}")
        if self.notify is not None:
            values = set(self.notify)
            if not self.notify or not (values == {"NEVER"} or values <= _NOTIFY):
                raise LocalProtocolError(f"bad NOTIFY {self.notify!r}")
        if self.orcpt is not None:
            _check_text("orcpt", self.orcpt)
            if ";" not in self.orcpt:
                raise LocalProtocolError(f"ORCPT needs addr-type;address: {self.orcpt!r}")
        _check_extra(self.extra)

    @property
    def is_postmaster(self) -> bool:
        """True for the domain-less ``<Postmaster>`` recipient."""
        return self.address.lower() == "postmaster"


@dataclass(frozen=True, slots=True, kw_only=True)
class Data:
    """``DATA`` (RFC 5321 4.1.1.4).  The server engine answers 354 (or 554/503) itself."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Bdat:
    """``BDAT size [LAST]`` (RFC 3030).  The chunk's octets follow as MessageData events."""

    size: int
    last: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.size < 10**20:
            raise LocalProtocolError(f"bad BDAT size {self.size!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Rset:
    """``RSET`` (RFC 5321 4.1.1.5): abort the mail transaction.  Answered by the engine."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Noop:
    """``NOOP`` (RFC 5321 4.1.1.9).  Answered by the engine."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Quit:
    """``QUIT`` (RFC 5321 4.1.1.10).  Answered by the engine with 221; the session closes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Help:
    """``HELP [topic]`` (RFC 5321 4.1.1.8).  Answered by the engine with 214."""

    topic: str = ""

    def __post_init__(self) -> None:
        _check_text("topic", self.topic)


@dataclass(frozen=True, slots=True, kw_only=True)
class Vrfy:
    """``VRFY string`` (RFC 5321 4.1.1.6).  A decision; 252 is the usual answer (3.5.3)."""

    argument: str

    def __post_init__(self) -> None:
        if not self.argument:
            raise LocalProtocolError("VRFY needs an argument")
        _check_text("argument", self.argument)


@dataclass(frozen=True, slots=True, kw_only=True)
class Expn:
    """``EXPN string`` (RFC 5321 4.1.1.7).  The engine answers 502 (disabled, 7.3)."""

    argument: str

    def __post_init__(self) -> None:
        if not self.argument:
            raise LocalProtocolError("EXPN needs an argument")
        _check_text("argument", self.argument)


@dataclass(frozen=True, slots=True, kw_only=True)
class StartTLS:
    """``STARTTLS`` (RFC 3207).  After the 220 the TLS handshake is due."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    """``AUTH mechanism [initial-response]`` (RFC 4954 4), as sent on the wire.

    ``initial_response`` is the base64 text (``"="`` for an empty response).  The server engine
    runs the PLAIN and LOGIN exchanges itself and yields :class:`AuthCredentials` instead.
    """

    mechanism: str
    initial_response: str | None = None

    def __post_init__(self) -> None:
        if not _KEYWORD.fullmatch(self.mechanism.replace("_", "-")):
            raise LocalProtocolError(f"bad SASL mechanism {self.mechanism!r}")
        if self.initial_response is not None:
            _check_text("initial_response", self.initial_response)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthResponse:
    """One client line of a SASL exchange: base64 text, or ``"*"`` to cancel (RFC 4954 4)."""

    data: str

    def __post_init__(self) -> None:
        _check_text("data", self.data)


# --- the message body ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageData:
    """A chunk of the message content: un-dot-stuffed, CRLF line endings, bounded size.

    The client engine stuffs and normalises what it is given; the server engine yields the
    content exactly as the client application provided it.
    """

    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfMessage:
    """The end of the message content (``CRLF.CRLF``, or ``BDAT ... LAST``).  A decision: reply
    250 only once the message is durably stored.  In LMTP mode one reply is owed per accepted
    recipient, in the order of the recipients (RFC 2033 4.2)."""


# --- server-side decision and notice events -------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthCredentials:
    """A completed PLAIN or LOGIN exchange: check the credentials and reply 235 or 535.

    Attributes:
        mechanism: ``"PLAIN"`` or ``"LOGIN"``.
        authorization_id: the identity to act as (PLAIN's authzid), ``""`` if not given.
        username: the authentication identity.
        password: the password.
    """

    mechanism: str
    authorization_id: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandRejected:
    """The engine rejected a command line by itself; ``reply`` is already queued."""

    line: bytes
    reply: Reply


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageRejected:
    """The engine rejected the message at its end (too big, bare LF/CR, line too long);
    ``reply`` is already queued.  Discard the MessageData of this message."""

    reply: Reply


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed:
    """The peer closed the connection (or the session ended with QUIT or 421)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSEstablished:
    """Emitted by the client engine once ``tls_established()`` was called (not used by the
    server)."""


# --- replies (server -> client) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """An SMTP reply (RFC 5321 4.2).

    Attributes:
        code: the three-digit reply code, 200 to 599.
        text: the reply text; ``"\\n"`` separates the lines of a multi-line reply.  It starts
            with an enhanced status code (RFC 3463) where the server uses them.
        command: on the client, the command this reply answers (not part of equality).
    """

    code: int
    text: str = ""
    command: Command | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise LocalProtocolError(f"bad reply code {self.code!r}")
        if "\r" in self.text or "\x00" in self.text:
            raise LocalProtocolError(f"reply text must not contain CR or NUL: {self.text!r}")
        _check_encodable("reply text", self.text)

    @property
    def lines(self) -> list[str]:
        """The text lines of the reply."""
        return self.text.split("\n")

    @property
    def enhanced(self) -> str | None:
        """The enhanced status code (RFC 3463) at the start of the text, e.g. ``"2.1.0"``."""
        m = _ENHANCED.match(self.text)
        if m is None or int(m.group(1)) != self.code // 100:
            return None
        return m.group(0).rstrip()

    @property
    def is_positive(self) -> bool:
        """2yz: the command succeeded."""
        return self.code < 300

    @property
    def is_intermediate(self) -> bool:
        """3yz: more input is expected (354 to DATA, 334 in AUTH)."""
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        """4yz: failed, try again later."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5yz: failed, do not retry."""
        return self.code >= 500


Command: TypeAlias = (
    Helo
    | Ehlo
    | Lhlo
    | MailFrom
    | RcptTo
    | Data
    | Bdat
    | Rset
    | Noop
    | Quit
    | Help
    | Vrfy
    | Expn
    | StartTLS
    | Auth
    | AuthResponse
)
"""Every command a client sends."""

ServerEvent: TypeAlias = (
    Helo
    | Ehlo
    | Lhlo
    | MailFrom
    | RcptTo
    | Data
    | Bdat
    | Rset
    | Noop
    | Quit
    | Help
    | Vrfy
    | Expn
    | StartTLS
    | AuthCredentials
    | MessageData
    | EndOfMessage
    | CommandRejected
    | MessageRejected
    | ConnectionClosed
)
"""What ``ServerConnection.next_event()`` yields (besides NEED_DATA and PAUSED)."""

ClientEvent: TypeAlias = Reply | TLSEstablished | ConnectionClosed
"""What ``ClientConnection.next_event()`` yields (besides NEED_DATA and PAUSED)."""


class Sentinel(enum.Enum):
    """The two non-event results of ``next_event()``."""

    NEED_DATA = "NEED_DATA"  #: feed more bytes (receive_data / receive_eof)
    PAUSED = "PAUSED"  #: the engine waits on the application: send the owed reply, or
    #: finish the TLS handshake and call tls_established()

    def __repr__(self) -> str:
        return self.value


NEED_DATA = Sentinel.NEED_DATA
PAUSED = Sentinel.PAUSED

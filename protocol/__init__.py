"""mailwire.protocol: a Sans-I/O SMTP engine.

Bytes in, events out, bytes to send.  Nothing in this package performs I/O, reads a clock or
draws random numbers: time and randomness are arguments.  See ``ServerConnection`` (the
server side), the event classes, and ``SessionState``.

Errors: ``LocalProtocolError`` means the local application used the engine wrongly (raised by
``send()`` and event constructors); ``RemoteProtocolError`` means the peer broke SMTP beyond
recovery (raised only by ``next_event()``).
"""

from mailwire.protocol._config import LineEndings, ServerConfig
from mailwire.protocol._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from mailwire.protocol._events import (
    NEED_DATA,
    PAUSED,
    Auth,
    AuthCredentials,
    AuthResponse,
    Bdat,
    ClientEvent,
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
    TLSEstablished,
    Vrfy,
)
from mailwire.protocol._grammar import is_valid_domain, is_valid_mailbox, split_mailbox
from mailwire.protocol._server import Envelope, ServerConnection
from mailwire.protocol._state import SessionState

__version__ = "0.1.0"

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "Auth",
    "AuthCredentials",
    "AuthResponse",
    "Bdat",
    "ClientEvent",
    "Command",
    "CommandRejected",
    "ConnectionClosed",
    "Data",
    "Ehlo",
    "EndOfMessage",
    "Envelope",
    "Expn",
    "Helo",
    "Help",
    "LineEndings",
    "Lhlo",
    "LocalProtocolError",
    "MailFrom",
    "MessageData",
    "MessageRejected",
    "Noop",
    "ProtocolError",
    "Quit",
    "RcptTo",
    "RemoteProtocolError",
    "Reply",
    "Rset",
    "Sentinel",
    "ServerConfig",
    "ServerConnection",
    "ServerEvent",
    "SessionState",
    "StartTLS",
    "TLSEstablished",
    "Vrfy",
    "is_valid_domain",
    "is_valid_mailbox",
    "split_mailbox",
]

# Engine configuration: frozen, keyword-only, validated once in __post_init__, never mutated.
#
# Every limit cites the RFC section that sets its minimum.  Limits that depend on the enabled
# extensions (the command-line length) are computed here, not adjusted at run time.
from __future__ import annotations

import enum
from dataclasses import dataclass

from mailwire.protocol._errors import LocalProtocolError

MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4, including CRLF
MAX_TEXT_LINE = 1000  # RFC 5321 4.5.3.1.6, including CRLF
MAX_REPLY_LINE = 512  # RFC 5321 4.5.3.1.5, including CRLF
MIN_RECIPIENTS = 100  # RFC 5321 4.5.3.1.8: "MUST be able to accept ... at least 100"
MAX_AUTH_LINE = 12288  # RFC 4954 4: AUTH command lines up to 12288 octets
COMMAND_TIMEOUT = 300.0  # RFC 5321 4.5.3.2.7: server timeout, 5 minutes
DATA_BLOCK_TIMEOUT = 180.0  # RFC 5321 4.5.3.2.5: data block, 3 minutes
# Extension line-length increments: RFC 1870 3 (SIZE, +26), RFC 3461 4 (DSN: ENVID 100,
# ORCPT 500, NOTIFY/RET), RFC 4954 5 (AUTH=, +500), RFC 6531 (SMTPUTF8, +10), RFC 6152 (BODY=).
_MAIL_PARAM_ALLOWANCE = 26 + 100 + 500 + 30 + 500 + 10 + 20


class LineEndings(enum.Enum):
    """What the server does with a bare CR or bare LF inside a DATA body.

    A bare LF or CR never ends the data: only ``CRLF.CRLF`` does (SMTP smuggling,
    CVE-2023-51764 and relatives).  This setting decides what happens to the message.
    """

    REJECT = "reject"  #: reject the message at its end with 550 5.6.2 (the default)
    NORMALIZE = "normalize"  #: turn bare CR and bare LF into CRLF
    ALLOW = "allow"  #: pass them through unchanged


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Configuration of a :class:`ServerConnection`.

    Attributes:
        hostname: this server's name, used in the greeting helpers and replies.
        lmtp: speak LMTP (RFC 2033): LHLO instead of EHLO/HELO, one reply per recipient.
        max_message_size: the SIZE limit in octets (RFC 1870); 0 means no limit.
        max_recipients: recipients per transaction; more get 452 4.5.3 (RFC 5321 4.5.3.1.10).
        max_bad_commands: rejected commands tolerated before 421 4.7.0 and close.
        max_line_length: longest DATA text line accepted, CRLF included, or None for no
            limit.  RFC 5321 4.5.3.1.6 sets 1000 as the minimum every server must accept.
        line_endings: what to do with bare CR/LF in a DATA body (see :class:`LineEndings`).
        max_chunk_size: the largest MessageData chunk the engine yields.
        pipelining, eightbitmime, smtputf8, chunking, binarymime, dsn, enhanced_status_codes:
            advertise and accept these ESMTP extensions.
        starttls: offer STARTTLS (the adapter must be able to do TLS).
        tls_required: refuse MAIL (and AUTH) until TLS is active (530 5.7.0); needs
            ``starttls`` or a connection that started with TLS (implicit TLS).
        auth_mechanisms: SASL mechanisms to offer: any of "PLAIN", "LOGIN".
        auth_requires_tls: offer AUTH only over TLS (RFC 4954 4 strongly suggests it).
        auth_required: refuse MAIL until the client has authenticated (submission, RFC 6409).
        max_auth_failures: failed AUTH attempts (non-235 answers to credentials) tolerated per
            session before 421 4.7.0 and close: password guessing costs a new connection.
        auth_failure_delay: seconds the adapters hold back a failed AUTH's reply, 1 s by
            default (Dovecot's is 2 s); the engine itself never waits, mailwire.adapters sleep
            without blocking other sessions.
        command_timeout: seconds to wait for a command line.
        data_timeout: seconds to wait for each block of message data.
        min_data_progress: octets that make a "block": the data deadline restarts only after
            this much arrived, so a client trickling a few octets per data_timeout is cut off.
        help_text: the text of the 214 reply to HELP.
    """

    hostname: str = "localhost"
    lmtp: bool = False
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 1000
    max_bad_commands: int = 20
    max_line_length: int | None = MAX_TEXT_LINE
    line_endings: LineEndings = LineEndings.REJECT
    max_chunk_size: int = 256 * 1024
    pipelining: bool = True
    eightbitmime: bool = True
    smtputf8: bool = True
    chunking: bool = True
    binarymime: bool = True
    dsn: bool = True
    enhanced_status_codes: bool = True
    starttls: bool = False
    tls_required: bool = False
    auth_mechanisms: tuple[str, ...] = ()
    auth_requires_tls: bool = True
    auth_required: bool = False
    max_auth_failures: int = 3
    auth_failure_delay: float = 1.0
    command_timeout: float = COMMAND_TIMEOUT
    data_timeout: float = DATA_BLOCK_TIMEOUT
    min_data_progress: int = 1024
    help_text: str = "2.0.0 See RFC 5321 (https://www.rfc-editor.org/rfc/rfc5321)"

    def __post_init__(self) -> None:
        if not self.hostname or any(c.isspace() for c in self.hostname):
            raise LocalProtocolError(f"bad hostname {self.hostname!r}")
        if self.max_message_size < 0:
            raise LocalProtocolError("max_message_size must be >= 0")
        if self.max_recipients < MIN_RECIPIENTS:
            raise LocalProtocolError(
                f"max_recipients must be at least {MIN_RECIPIENTS} (RFC 5321 4.5.3.1.8)"
            )
        if self.auth_failure_delay < 0:
            raise LocalProtocolError("auth_failure_delay must be >= 0")
        if self.max_auth_failures < 1:
            raise LocalProtocolError("max_auth_failures must be >= 1")
        if self.max_bad_commands < 1:
            raise LocalProtocolError("max_bad_commands must be >= 1")
        if self.max_line_length is not None and self.max_line_length < MAX_TEXT_LINE:
            raise LocalProtocolError(
                f"max_line_length must be at least {MAX_TEXT_LINE} (RFC 5321 4.5.3.1.6)"
            )
        if self.max_chunk_size < 1024:
            raise LocalProtocolError("max_chunk_size must be >= 1024")
        for mech in self.auth_mechanisms:
            if mech not in ("PLAIN", "LOGIN"):
                raise LocalProtocolError(f"unsupported SASL mechanism {mech!r}")
        if self.binarymime and not self.chunking:
            raise LocalProtocolError("BINARYMIME requires CHUNKING (RFC 3030 3)")
        if self.auth_required and not self.auth_mechanisms:
            raise LocalProtocolError("auth_required needs at least one auth mechanism")
        if self.min_data_progress < 1:
            raise LocalProtocolError("min_data_progress must be >= 1")
        if self.command_timeout <= 0 or self.data_timeout <= 0:
            raise LocalProtocolError("timeouts must be positive")

    @property
    def command_line_limit(self) -> int:
        """Longest command line accepted, CRLF included (RFC 5321 4.5.3.1.4 plus the
        extensions' allowances; AUTH lines have their own limit, RFC 4954 4)."""
        limit = MAX_COMMAND_LINE + _MAIL_PARAM_ALLOWANCE
        if self.auth_mechanisms:
            limit = MAX_AUTH_LINE
        return limit


# --- the client side ------------------------------------------------------------------------
# RFC 5321 4.5.3.2 client timeouts, in seconds: how long to wait for each reply.
GREETING_TIMEOUT = 300.0  # 4.5.3.2.1: initial 220 message, 5 minutes
MAIL_TIMEOUT = 300.0  # 4.5.3.2.2: MAIL command, 5 minutes
RCPT_TIMEOUT = 300.0  # 4.5.3.2.3: RCPT command, 5 minutes
DATA_INIT_TIMEOUT = 120.0  # 4.5.3.2.4: DATA initiation (the 354), 2 minutes
DATA_END_TIMEOUT = 600.0  # 4.5.3.2.6: DATA termination (the 250 after "."), 10 minutes


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """Configuration of a :class:`ClientConnection`.

    Attributes:
        local_hostname: this client's name, the argument of EHLO/HELO/LHLO.
        lmtp: speak LMTP (RFC 2033): LHLO, one final reply per accepted recipient.
        allow_plaintext_auth: allow AUTH on a connection without TLS (off by default: the
            credentials would cross the network in clear text).
        max_reply_line: longest reply line accepted, CRLF included.  RFC 5321 4.5.3.1.5
            sets 512; real servers exceed it, so the default is more lenient.
        max_reply_lines: most lines in one multi-line reply (bounds memory).
        bdat_chunk_size: octets per BDAT chunk the transaction helper aims for.
        greeting_timeout, mail_timeout, rcpt_timeout, data_init_timeout,
        data_block_timeout, data_end_timeout: RFC 5321 4.5.3.2 timeouts, in seconds.
        command_timeout: timeout for the replies to every other command.
    """

    local_hostname: str = "localhost"
    lmtp: bool = False
    allow_plaintext_auth: bool = False
    max_reply_line: int = 4 * MAX_REPLY_LINE
    max_reply_lines: int = 1000
    bdat_chunk_size: int = 64 * 1024
    greeting_timeout: float = GREETING_TIMEOUT
    mail_timeout: float = MAIL_TIMEOUT
    rcpt_timeout: float = RCPT_TIMEOUT
    data_init_timeout: float = DATA_INIT_TIMEOUT
    data_block_timeout: float = DATA_BLOCK_TIMEOUT
    data_end_timeout: float = DATA_END_TIMEOUT
    command_timeout: float = COMMAND_TIMEOUT

    def __post_init__(self) -> None:
        name = self.local_hostname
        if not name or any(c.isspace() or c in "\r\n\x00" for c in name):
            raise LocalProtocolError(f"bad local_hostname {name!r}")
        if self.max_reply_line < MAX_REPLY_LINE:
            raise LocalProtocolError(
                f"max_reply_line must be at least {MAX_REPLY_LINE} (RFC 5321 4.5.3.1.5)"
            )
        if self.max_reply_lines < 1:
            raise LocalProtocolError("max_reply_lines must be >= 1")
        if self.bdat_chunk_size < 1:
            raise LocalProtocolError("bdat_chunk_size must be >= 1")
        timeouts = (
            self.greeting_timeout,
            self.mail_timeout,
            self.rcpt_timeout,
            self.data_init_timeout,
            self.data_block_timeout,
            self.data_end_timeout,
            self.command_timeout,
        )
        if any(t <= 0 for t in timeouts):
            raise LocalProtocolError("timeouts must be positive")

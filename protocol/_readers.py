# Bytes -> events: command lines, reply lines, and the DATA body.
#
# Command lines (RFC 5321 4.1.1): the verb is found by a dict lookup on the upper-cased first
# word; each verb has one small parse function.  Parse functions raise GrammarError with the
# exact reply (code, enhanced code, text) the server must send; they never touch the session
# state -- sequence checks are the engine's, from the state table.
#
# The DATA body (RFC 5321 4.5.2) is the hot path.  BodyReader never looks at a byte from
# Python: it works on whole segments with bytes.find/rfind/count/replace, which run in C.
#   * The terminator is CRLF "." CRLF and nothing else.  A bare LF or CR next to a dot never
#     ends the data (SMTP smuggling, CVE-2023-51764): we search only for b"\r\n.\r\n".
#   * A segment is cut right after its last CRLF (or, for a line longer than a chunk, anywhere
#     but between CR and LF), so "CRLF ." never straddles two segments: un-stuffing is one
#     ``replace(b"\r\n.", b"\r\n")`` plus a look at the first byte when a line starts there.
#   * Bare CR/LF: a segment never splits a CRLF, so "the CR positions shifted by one are the
#     LF positions" is exactly "no bare LF or CR"; see _crlf_paired.
#   * Line length: ``rfind(b"\n", p, p + limit)`` hops to the last LF within reach; if there is
#     none, a line is too long.  One call per ~limit octets, not one per line.
# Memory: the reader holds no data; the engine's buffer keeps at most one unfinished line
# (bounded by max_chunk_size) plus what the adapter fed in one read.
from __future__ import annotations

import re
from collections.abc import Callable

from mailwire.protocol._config import LineEndings, ServerConfig
from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._events import (
    Auth,
    Bdat,
    Command,
    Data,
    Ehlo,
    Expn,
    Helo,
    Help,
    Lhlo,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Rset,
    StartTLS,
    Vrfy,
    trusted,
)
from mailwire.protocol._grammar import (
    MAX_LABEL,
    MAX_LOCAL_PART,
    GrammarError,
    parse_params,
    parse_path,
    xtext_decode,
)

# --- command lines ----------------------------------------------------------------------------

_PATH_TOKEN = re.compile(r'<(?:[^<>"]|"(?:[^"\\]|\\.)*")*>')
_BDAT = re.compile(r"(\d{1,19})(?: +(LAST))? *", re.IGNORECASE | re.ASCII)
_TOKEN = re.compile(r"[\x21-\x7e\u0080-\ud7ff\ue000-\U0010ffff]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_ENVID = 100  # RFC 3461 4.4
# Fast path for the common plain form ``FROM:<local@domain>`` / ``TO:<local@domain>``: ASCII,
# a dot-string local part, a domain of LDH labels, no source route, no parameters.  Every
# string these match is also matched by the full grammar (_grammar._build), whose ASCII and
# UTF-8 variants agree on ASCII text, so the result is the same; the length limits are checked
# by the caller and anything else falls back to the full parser (a hypothesis property in
# tests/test_grammar.py compares the two).
_ATOM = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_PLAIN = rf" *<({_ATOM}(?:\.{_ATOM})*)@({_LABEL}(?:\.{_LABEL})*)>"
_PLAIN_MAIL = re.compile(rf"FROM:{_PLAIN}", re.IGNORECASE | re.ASCII)
_PLAIN_RCPT = re.compile(rf"TO:{_PLAIN}", re.IGNORECASE | re.ASCII)
_MAX_ORCPT = 500  # RFC 3461 4.2


def _xtext(value: str) -> str:
    """xtext-decode a parameter value; decoded control characters are a syntax error."""
    decoded = xtext_decode(value)
    if _CONTROL.search(decoded):
        raise _syntax("Syntax error: control character in parameter")
    return decoded


def _syntax(text: str = "Syntax error") -> GrammarError:
    return GrammarError(501, "5.5.4", text)


def _no_args(
    cls: type[Data | Rset | Quit | StartTLS],
) -> Callable[[str, ServerConfig, bool], Command]:
    def parse(arg: str, config: ServerConfig, utf8: bool) -> Command:
        if arg.strip():
            raise _syntax("Syntax error (no parameters allowed)")
        return cls()

    return parse


def _hello(cls: type[Helo | Ehlo | Lhlo]) -> Callable[[str, ServerConfig, bool], Command]:
    def parse(arg: str, config: ServerConfig, utf8: bool) -> Command:
        domain = arg.strip(" ")
        if not domain or not _TOKEN.fullmatch(domain):
            raise _syntax("Syntax error: a domain name is required")
        return cls(domain=domain)

    return parse


def _split_path(arg: str, prefix: str) -> tuple[str, str]:
    """Split ``FROM:<path> params`` into the path and the parameter text."""
    if arg[: len(prefix)].upper() != prefix:
        raise _syntax(f"Syntax error: expected {prefix}<address>")
    rest = arg[len(prefix) :].lstrip(" ")  # "MAIL FROM: <a@b>" is common; tolerate it
    m = _PATH_TOKEN.match(rest)
    if m is None:
        raise _syntax("Syntax error: address must be in angle brackets")
    params = rest[m.end() :]
    if params and params[0] != " ":
        raise _syntax()
    return m.group(0), params


def _parse_mail(arg: str, config: ServerConfig, utf8: bool) -> Command:
    m = _PLAIN_MAIL.fullmatch(arg)
    if m is not None:
        local, domain = m.groups()
        # RFC 5321 4.5.3.1: a local part of at most 64 octets; a domain of at most 63 octets
        # cannot break the domain or label limits, and the path stays under 256.
        if len(local) <= MAX_LOCAL_PART and len(domain) <= MAX_LABEL:
            return trusted(
                MailFrom,
                address=f"{local}@{domain}",
                size=None,
                body=None,
                smtputf8=False,
                ret=None,
                envid=None,
                auth=None,
                extra=(),
            )
    return _parse_mail_full(arg, config, utf8)


def _parse_mail_full(arg: str, config: ServerConfig, utf8: bool) -> Command:
    path, param_text = _split_path(arg, "FROM:")
    params = parse_params(param_text, utf8=config.smtputf8) if param_text else {}
    smtputf8 = False
    if "SMTPUTF8" in params:
        if not config.smtputf8 or params.pop("SMTPUTF8") is not None:
            raise GrammarError(555, "5.5.4", "SMTPUTF8 parameter not supported")
        smtputf8 = True
    if path == "<>":
        address = ""
    else:
        address = parse_path(path, utf8=smtputf8, recipient=False)
    if not smtputf8 and not param_text.isascii():
        raise GrammarError(553, "5.6.7", "Non-ASCII parameters require SMTPUTF8")
    size = body = ret = envid = auth = None
    extra: list[tuple[str, str | None]] = []
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise _syntax("Syntax error in SIZE parameter")
            size = int(value)
            if config.max_message_size and size > config.max_message_size:
                # RFC 1870 6.1: declared size over the fixed limit
                raise GrammarError(552, "5.3.4", "Message size exceeds fixed maximum")
        elif key == "BODY":
            body = (value or "").upper()
            allowed = {"7BIT"}
            if config.eightbitmime:
                allowed.add("8BITMIME")
            if config.binarymime:
                allowed.add("BINARYMIME")
            if body not in allowed:
                raise GrammarError(555, "5.5.4", f"Unsupported BODY type {value}")
        elif key == "RET" and config.dsn:
            ret = (value or "").upper()
            if ret not in ("FULL", "HDRS"):
                raise _syntax("Syntax error in RET parameter")
        elif key == "ENVID" and config.dsn:
            if value is None:
                raise _syntax("Syntax error in ENVID parameter")
            envid = _xtext(value)
            if len(value) > _MAX_ENVID:
                raise _syntax("ENVID too long")
        elif key == "AUTH" and config.auth_mechanisms:
            if value is None:
                raise _syntax("Syntax error in AUTH parameter")
            auth = value if value == "<>" else _xtext(value)
        else:
            raise GrammarError(555, "5.5.4", f"Unsupported parameter {key}")
    return trusted(
        MailFrom,
        address=address,
        size=size,
        body=body,
        smtputf8=smtputf8,
        ret=ret,
        envid=envid,
        auth=auth,
        extra=tuple(extra),
    )


def _parse_rcpt(arg: str, config: ServerConfig, utf8: bool) -> Command:
    m = _PLAIN_RCPT.fullmatch(arg)
    if m is not None:
        local, domain = m.groups()
        if len(local) <= MAX_LOCAL_PART and len(domain) <= MAX_LABEL:  # as in _parse_mail
            return trusted(RcptTo, address=f"{local}@{domain}", notify=None, orcpt=None, extra=())
    return _parse_rcpt_full(arg, config, utf8)


def _parse_rcpt_full(arg: str, config: ServerConfig, utf8: bool) -> Command:
    path, param_text = _split_path(arg, "TO:")
    address = parse_path(path, utf8=utf8, recipient=True)
    params = parse_params(param_text, utf8=utf8) if param_text else {}
    notify: tuple[str, ...] | None = None
    orcpt = None
    for key, value in params.items():
        if key == "NOTIFY" and config.dsn:
            words = tuple((value or "").upper().split(","))
            if not value or not (
                words == ("NEVER",) or set(words) <= {"SUCCESS", "FAILURE", "DELAY"}
            ):
                raise _syntax("Syntax error in NOTIFY parameter")
            notify = tuple(dict.fromkeys(words))
        elif key == "ORCPT" and config.dsn:
            kind, sep, xtext = (value or "").partition(";")
            if not sep or not kind or len(value or "") > _MAX_ORCPT:
                raise _syntax("Syntax error in ORCPT parameter")
            orcpt = f"{kind};{_xtext(xtext)}"
        else:
            raise GrammarError(555, "5.5.4", f"Unsupported parameter {key}")
    return trusted(RcptTo, address=address, notify=notify, orcpt=orcpt, extra=())


def _parse_bdat(arg: str, config: ServerConfig, utf8: bool) -> Command:
    m = _BDAT.fullmatch(arg)
    if m is None:
        raise _syntax("Syntax error in BDAT")
    return Bdat(size=int(m.group(1)), last=m.group(2) is not None)


def _parse_vrfy(cls: type[Vrfy | Expn]) -> Callable[[str, ServerConfig, bool], Command]:
    def parse(arg: str, config: ServerConfig, utf8: bool) -> Command:
        arg = arg.strip(" ")
        if not arg:
            raise _syntax("Syntax error: an argument is required")
        return cls(argument=arg)

    return parse


def _parse_noop(arg: str, config: ServerConfig, utf8: bool) -> Command:
    return Noop()  # RFC 5321 4.1.1.9: "NOOP" [ SP String ], the string is ignored


def _parse_help(arg: str, config: ServerConfig, utf8: bool) -> Command:
    return Help(topic=arg.strip(" "))


def _parse_auth(arg: str, config: ServerConfig, utf8: bool) -> Command:
    words = arg.split(" ")
    if not 1 <= len(words) <= 2 or not words[0]:
        raise _syntax("Syntax error in AUTH")
    try:
        initial = words[1] if len(words) == 2 else None
        return Auth(mechanism=words[0].upper(), initial_response=initial)
    except LocalProtocolError:
        raise _syntax("Syntax error in AUTH") from None


VERBS: dict[bytes, Callable[[str, ServerConfig, bool], Command]] = {
    b"HELO": _hello(Helo),
    b"EHLO": _hello(Ehlo),
    b"LHLO": _hello(Lhlo),
    b"MAIL": _parse_mail,
    b"RCPT": _parse_rcpt,
    b"DATA": _no_args(Data),
    b"BDAT": _parse_bdat,
    b"RSET": _no_args(Rset),
    b"NOOP": _parse_noop,
    b"QUIT": _no_args(Quit),
    b"HELP": _parse_help,
    b"VRFY": _parse_vrfy(Vrfy),
    b"EXPN": _parse_vrfy(Expn),
    b"STARTTLS": _no_args(StartTLS),
    b"AUTH": _parse_auth,
}


def split_verb(line: bytes) -> tuple[bytes, bytes]:
    """Split a command line (CRLF removed) into the upper-cased verb and its argument."""
    verb, _, arg = line.partition(b" ")
    return verb.upper(), arg


def decode_line(raw: bytes) -> str:
    """Decode a command argument: ASCII, or UTF-8 (RFC 6531).  Raises GrammarError 500 5.5.2
    for invalid UTF-8 and for control characters (NUL, bare CR)."""
    try:
        text = raw.decode("ascii") if raw.isascii() else raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GrammarError(500, "5.5.2", "Syntax error: invalid UTF-8") from None
    if "\x00" in text or "\r" in text:
        raise GrammarError(500, "5.5.2", "Syntax error: NUL or bare CR in command")
    return text


# --- reply lines (for the client) -------------------------------------------------------------

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)(.*)", re.DOTALL)


def parse_reply_line(line: bytes) -> tuple[int, bool, str]:
    """Parse one reply line (CRLF removed) into (code, is_last, text) (RFC 5321 4.2).

    Raises:
        GrammarError: the line is not ``Reply-code [("-" / SP) textstring]``.
    """
    m = _REPLY_LINE.fullmatch(line)
    if m is None:
        raise GrammarError(500, "5.5.2", f"malformed reply line {line[:80]!r}")
    try:
        text = m.group(3).decode("utf-8")
    except UnicodeDecodeError:
        text = m.group(3).decode("latin-1")
    if "\r" in text or "\n" in text or "\x00" in text:
        raise GrammarError(500, "5.5.2", f"control character in reply line {line[:80]!r}")
    return int(m.group(1)), m.group(2) != b"-", text


# --- the DATA body ----------------------------------------------------------------------------

_TERMINATOR = b"\r\n.\r\n"
_CR_MASK = bytes(1 if i == 0x0D else 0 for i in range(256))
_LF_MASK = bytes(1 if i == 0x0A else 0 for i in range(256))


def _crlf_paired(raw: bytes) -> bool:
    """True if every CR in ``raw`` is followed by LF and every LF preceded by CR.

    Two translate() passes turn the CR and LF positions into 0/1 masks; the CRs shifted by
    one must equal the LFs.  That is ~40% cheaper than counting CRLF, LF and CR separately,
    because a two-octet search is slow when one of its octets is as common as LF.
    """
    if b"\r" not in raw and b"\n" not in raw:
        return True
    cr, lf = raw.translate(_CR_MASK), raw.translate(_LF_MASK)
    return cr[:-1] == lf[1:] and lf[0] == 0 and cr[-1] == 0


class BodyReader:
    """Turns the bytes after a 354 into un-stuffed content segments (see the module comment).

    ``read(buf, pos)`` returns ``(content, new_pos, finished)``; ``content`` is ``None`` when
    more bytes are needed.  The reader records, without stopping, whether the message broke
    a limit: ``size`` (un-stuffed octets), ``bare_line_ending``, ``line_too_long``.
    """

    __slots__ = (
        "at_line_start",
        "bare_line_ending",
        "line_length",
        "line_too_long",
        "max_chunk",
        "max_line",
        "policy",
        "size",
    )

    def __init__(self, config: ServerConfig) -> None:
        self.max_chunk = config.max_chunk_size
        self.max_line = config.max_line_length
        self.policy = config.line_endings
        self.at_line_start = True
        self.line_length = 0  # octets of the current unfinished line, CR/LF not counted
        self.size = 0
        self.bare_line_ending = False
        self.line_too_long = False

    def read(self, buf: bytearray, pos: int) -> tuple[bytes | None, int, bool]:
        n = len(buf)
        if self.at_line_start and pos < n and buf[pos] == 0x2E:  # "."
            if n - pos < 3 and _TERMINATOR[2 : 2 + n - pos] == buf[pos:n]:
                return None, pos, False  # "." or ".\r": cannot tell yet
            if buf[pos + 1 : pos + 3] == b"\r\n":
                self.at_line_start = True
                return b"", pos + 3, True
        limit = min(n, pos + self.max_chunk)
        # One search serves both jobs: every CRLF "." is either the terminator or a stuffed
        # dot, and in real mail both are rare, so the common segment needs no replace().
        dot = buf.find(b"\r\n.", pos, limit + 3)
        end = -1 if dot < 0 else buf.find(_TERMINATOR, dot, limit + 3)
        if end >= 0:
            cut, new_pos, finished = end + 2, end + 5, True
        else:
            last = buf.rfind(b"\r\n", pos, limit)
            if last >= 0:
                cut = last + 2
            elif limit == n and n - pos < 3:
                return None, pos, False  # too little to decide anything
            else:
                cut = limit - 1 if buf[limit - 1] == 0x0D else limit
            new_pos, finished = cut, False
        if cut == pos:
            return None, pos, False
        with memoryview(buf) as view:
            raw = bytes(view[pos:cut])
        starts_line = self.at_line_start
        self.at_line_start = raw[-2:] == b"\r\n"
        stuffed = 0 <= dot and dot + 2 < cut
        if self.policy is not LineEndings.ALLOW and not _crlf_paired(raw):
            self.bare_line_ending = True
            if self.policy is LineEndings.NORMALIZE:
                raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
                stuffed = True
        if self.max_line is not None:
            self._check_lines(raw)
        if starts_line and raw[:1] == b".":
            raw = raw[1:]
        data = raw.replace(b"\r\n.", b"\r\n") if stuffed else raw
        self.size += len(data)
        return data, new_pos, finished

    def _check_lines(self, raw: bytes) -> None:
        assert self.max_line is not None
        limit = self.max_line - 2  # the limit counts the CRLF
        first = raw.find(b"\n")
        if first < 0:
            self.line_length += len(raw)
            if self.line_length > limit:
                self.line_too_long = True
            return
        if self.line_length + first - 1 > limit:
            self.line_too_long = True
        pos, n = first + 1, len(raw)
        while n - pos > limit + 1:
            last = raw.rfind(b"\n", pos, pos + limit + 2)
            if last < 0:
                self.line_too_long = True
                break
            pos = last + 1
        self.line_length = n - (raw.rfind(b"\n") + 1)
        if self.line_length > limit:
            self.line_too_long = True

    @property
    def violation(self) -> tuple[int, str, str] | None:
        """The (code, enhanced, text) that rejects this message at its end, if any."""
        if self.bare_line_ending and self.policy is LineEndings.REJECT:
            return 550, "5.6.0", "Message contains bare CR or LF (RFC 5321 2.3.8)"
        if self.line_too_long:
            return 550, "5.6.0", f"Message has a line longer than {self.max_line} octets"
        return None

# Events -> bytes: reply and command formatting, and dot-stuffing.
#
# Formatting never validates grammar again (the event constructors did); it only lays out
# the bytes.  Text is UTF-8 (ASCII unless the application put non-ASCII in, which RFC 6531
# allows only in SMTPUTF8 sessions; that check belongs to the caller).
from __future__ import annotations

from typing import assert_never

from mailwire.protocol._events import (
    Auth,
    AuthResponse,
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
    Reply,
    Rset,
    StartTLS,
    Vrfy,
)
from mailwire.protocol._grammar import xtext_encode


def format_reply(code: int, lines: list[str]) -> bytes:
    """Lay out a (possibly multi-line) reply: ``250-first``, ..., ``250 last`` (RFC 5321 4.2.1)."""
    prefix = str(code)
    if len(lines) == 1:
        return f"{prefix} {lines[0]}\r\n".encode()
    out = [f"{prefix}-{line}\r\n" for line in lines[:-1]]
    out.append(f"{prefix} {lines[-1]}\r\n")
    return "".join(out).encode()


def reply_bytes(reply: Reply) -> bytes:
    """The wire form of ``reply``."""
    return format_reply(reply.code, reply.lines)


def _params(pairs: list[tuple[str, str | None]]) -> str:
    return "".join(f" {k}" if v is None else f" {k}={v}" for k, v in pairs)


def command_bytes(command: Command) -> bytes:
    """The wire form of ``command`` (RFC 5321 4.1.1), CRLF included."""
    match command:
        case MailFrom():
            pairs: list[tuple[str, str | None]] = []
            if command.size is not None:
                pairs.append(("SIZE", str(command.size)))
            if command.body is not None:
                pairs.append(("BODY", command.body))
            if command.smtputf8:
                pairs.append(("SMTPUTF8", None))
            if command.ret is not None:
                pairs.append(("RET", command.ret))
            if command.envid is not None:
                pairs.append(("ENVID", xtext_encode(command.envid)))
            if command.auth is not None:
                auth = command.auth if command.auth == "<>" else xtext_encode(command.auth)
                pairs.append(("AUTH", auth))
            pairs.extend(command.extra)
            line = f"MAIL FROM:<{command.address}>{_params(pairs)}"
        case RcptTo():
            pairs = []
            if command.notify is not None:
                pairs.append(("NOTIFY", ",".join(command.notify)))
            if command.orcpt is not None:
                kind, _, addr = command.orcpt.partition(";")
                pairs.append(("ORCPT", f"{kind};{xtext_encode(addr)}"))
            pairs.extend(command.extra)
            line = f"RCPT TO:<{command.address}>{_params(pairs)}"
        case Ehlo():
            line = f"EHLO {command.domain}"
        case Helo():
            line = f"HELO {command.domain}"
        case Lhlo():
            line = f"LHLO {command.domain}"
        case Data():
            line = "DATA"
        case Bdat():
            line = f"BDAT {command.size} LAST" if command.last else f"BDAT {command.size}"
        case Rset():
            line = "RSET"
        case Noop():
            line = "NOOP"
        case Quit():
            line = "QUIT"
        case Help():
            line = f"HELP {command.topic}" if command.topic else "HELP"
        case Vrfy():
            line = f"VRFY {command.argument}"
        case Expn():
            line = f"EXPN {command.argument}"
        case StartTLS():
            line = "STARTTLS"
        case Auth():
            if command.initial_response is None:
                line = f"AUTH {command.mechanism}"
            else:
                line = f"AUTH {command.mechanism} {command.initial_response}"
        case AuthResponse():
            line = command.data
        case _:
            assert_never(command)
    return f"{line}\r\n".encode()


def dot_stuff(data: bytes, at_line_start: bool) -> bytes:
    """Dot-stuff CRLF-normalised ``data`` (RFC 5321 4.5.2): every line starting with ``.``
    gets one more.  ``at_line_start`` says whether ``data`` begins a line."""
    if at_line_start and data[:1] == b".":
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")

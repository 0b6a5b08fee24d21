"""Fuzz target: the address/path grammar, the ESMTP parameter parser and xtext.

    pip install '.[fuzz]'
    python fuzz/fuzz_address.py fuzz/corpus/address -max_total_time=600

Input: the first byte holds flags (bit 0: the SMTPUTF8 grammar, bit 1: parse as a recipient /
RCPT TO, bit 2: the server offers SMTPUTF8); the rest is decoded as UTF-8 (invalid UTF-8 is
what ``decode_line`` refuses, so the command path sees it and the text parsers see the
latin-1 reading).  Every input goes through every parser.  Invariants, beyond "no crash":
  * only GrammarError escapes parse_path, parse_params, xtext_decode and the MAIL/RCPT
    command parsers; is_valid_mailbox/is_valid_domain answer a bool;
  * whatever parses round-trips through the writers: parse(format(x)) == x for paths
    (``<mailbox>``), parameter lists, xtext (both ways: decode(encode(s)) == s for any text)
    and whole MAIL/RCPT commands (reader -> event -> command_bytes -> reader == event);
  * a parsed path is within the RFC 5321 4.5.3.1 lengths, a parsed mailbox is valid for
    is_valid_mailbox, its domain for is_valid_domain;
  * the event a reader builds is one its own constructor accepts (the reader skips the
    constructor's checks for speed), and the writer never makes a command line longer than the
    line the reader accepted (so a relayed command never grows past a limit).
"""

from __future__ import annotations

import dataclasses

from mailwire.protocol._config import ServerConfig
from mailwire.protocol._events import MailFrom, RcptTo
from mailwire.protocol._grammar import (
    MAX_LOCAL_PART,
    MAX_PATH,
    GrammarError,
    is_valid_domain,
    is_valid_mailbox,
    parse_params,
    parse_path,
    split_mailbox,
    xtext_decode,
    xtext_encode,
)
from mailwire.protocol._readers import VERBS, decode_line, split_verb
from mailwire.protocol._writers import command_bytes

CONFIGS = {
    smtputf8: ServerConfig(hostname="mx.fuzz", max_message_size=0, auth_mechanisms=("PLAIN",),
                           auth_requires_tls=False, smtputf8=smtputf8, dsn=True)
    for smtputf8 in (False, True)
}  # fmt: skip


def check_path(text: str, *, utf8: bool, recipient: bool) -> None:
    try:
        mailbox = parse_path(text, utf8=utf8, recipient=recipient)
    except GrammarError as exc:
        assert exc.code in (501, 553), exc
        return
    if recipient and mailbox == "Postmaster":
        assert text.lower() == "<postmaster>", text  # RFC 5321 4.5.1: only the bare form
        return
    assert utf8 or mailbox.isascii(), mailbox
    path = f"<{mailbox}>"
    assert len(path.encode("utf-8")) <= MAX_PATH, path
    local, domain = split_mailbox(mailbox)
    assert local and domain, mailbox
    assert len(local.encode("utf-8")) <= MAX_LOCAL_PART, local
    assert parse_path(path, utf8=utf8, recipient=recipient) == mailbox, "path round trip"
    assert is_valid_mailbox(mailbox, utf8=utf8), mailbox
    assert is_valid_domain(domain, utf8=utf8), domain


def check_params(text: str, *, utf8: bool) -> None:
    try:
        params = parse_params(text, utf8=utf8)
    except GrammarError as exc:
        assert exc.code == 501, exc
        return
    formatted = " ".join(k if v is None else f"{k}={v}" for k, v in params.items())
    again = parse_params(formatted, utf8=utf8)
    assert list(again.items()) == list(params.items()), "params round trip"


def check_xtext(text: str) -> None:
    encoded = xtext_encode(text)
    assert encoded.isascii() and "=" not in encoded and " " not in encoded, encoded
    assert xtext_decode(encoded) == text, "xtext encode/decode round trip"
    try:
        decoded = xtext_decode(text)
    except GrammarError as exc:
        assert exc.code == 501, exc
        return
    assert xtext_decode(xtext_encode(decoded)) == decoded, "xtext decode/encode round trip"
    assert len(xtext_encode(decoded)) <= len(text), "canonical xtext is never longer"


def check_command(raw: bytes, *, recipient: bool, utf8: bool, smtputf8: bool) -> None:
    verb = b"RCPT" if recipient else b"MAIL"
    config = CONFIGS[smtputf8]
    try:
        event = VERBS[verb](decode_line(raw), config, utf8)
    except GrammarError as exc:
        assert 500 <= exc.code < 600, exc
        return
    assert isinstance(event, RcptTo if recipient else MailFrom), event
    fields = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    assert type(event)(**fields) == event, "the constructor refuses what the reader built"
    line = command_bytes(event)
    assert line.endswith(b"\r\n") and not any(c in line[:-2] for c in b"\r\n\x00"), line
    assert len(line) <= len(verb) + 1 + len(raw) + 2, "the writer lengthened the command"
    verb2, arg2 = split_verb(line[:-2])
    assert verb2 == verb, line
    utf8_again = utf8 or (isinstance(event, MailFrom) and event.smtputf8)
    again = VERBS[verb2](decode_line(arg2), config, utf8_again)
    assert again == event, f"command round trip: {event!r} -> {line!r} -> {again!r}"


def test_one_input(data: bytes) -> None:
    if not data:
        return
    flags, raw = data[0], data[1:]
    utf8, recipient, smtputf8 = bool(flags & 1), bool(flags & 2), bool(flags & 4)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    check_path(text, utf8=utf8, recipient=recipient)
    check_params(text, utf8=utf8)
    check_xtext(text)
    assert isinstance(is_valid_mailbox(text, utf8=utf8), bool)
    assert isinstance(is_valid_domain(text, utf8=utf8), bool)
    check_command(raw, recipient=recipient, utf8=utf8, smtputf8=smtputf8)


def main() -> None:
    from _atheris import fuzz  # atheris only for real fuzzing runs

    fuzz(test_one_input)


if __name__ == "__main__":
    main()

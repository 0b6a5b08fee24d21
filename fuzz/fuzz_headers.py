"""Fuzz target: the header fields an MSA adds (protocol/_submission.py) and SASLprep
(protocol/_saslprep.py), two pure functions on untrusted input.

    pip install '.[fuzz]'
    python fuzz/fuzz_headers.py fuzz/corpus/headers -max_total_time=600

Input: bit 0 of byte 0 picks the function.

Even: ``missing_fields``.  Bytes 1-5 give the arrival second (any second of the years
1970-9999: "seconds since the epoch", and parse_date reads 4-digit years only) and
byte 6 its fraction; bytes 7 and 8 pick the host name and the queue id from a list of awkward
ones (empty, trailing dot, IDNA, bad IDNA, lone surrogate, 253, 263 and 967 octets ...) or,
past the list, take them from the input (length in the next byte, UTF-8 with lone
surrogates allowed).  Bits 1-2 of byte 0 put filler in front of the rest (header lines,
folded lines, or one long unterminated line) so that it ends 600 octets either side of
SCAN_LIMIT: the rest of the input then straddles the limit.  Invariants:
  * nothing escapes, for any content, host name and queue id (no exception is documented);
  * the result is CRLF-terminated lines, a Date then a Message-ID (each optional), then an
    empty line exactly when the content starts with a line that is not a field (the
    documented no-header case: then both fields are there); every line is ASCII and at most
    998 octets (RFC 5322 2.1.1);
  * the result equals an independent reimplementation of the module comment's rules (which
    fields the header section has, where it ends, when it runs past SCAN_LIMIT); octets past
    SCAN_LIMIT never change the answer;
  * the Date is the arrival second, in UTC, spelled as datetime spells it, and
    protocol/_trace.py's parse_date reads it back; the Message-ID is an RFC 5322 3.6.4
    ``<dot-atom-text@dot-atom-text>`` and the same as message_id() says;
  * idempotence: ``missing_fields(result + content)`` is empty; the content is unchanged.

Odd: ``saslprep``.  Bit 0 of byte 1 is ``allow_unassigned``; bit 1 picks how the rest
becomes text: UTF-8 (lone surrogates through "surrogatepass", other bad octets become lone
surrogates through "surrogateescape"), or three octets per code point (any plane: tags,
private use, non-characters, unassigned).  Invariants:
  * only SASLprepError (a ValueError) escapes; its ``reason`` and its message are ASCII, so
    they never echo a character of the password, and ``reason`` never names the code point
    (the module's promise: "safe to show for a password"); the error is justified: the code
    point it names is in the prepared string and in the table its reason names, or the
    prepared string really breaks the bidi rules (RFC 3454 6);
  * on success the output equals an independent preparation (map, NFKC with Unicode 3.2),
    contains nothing RFC 4013 2.3 prohibits (checked with the stdlib stringprep tables C.1.2,
    C.2.1, C.2.2, C.3-C.9, and A.1 for stored strings), passes the bidi rules, is NFKC-stable
    under Unicode 3.2 and idempotent (same flag);
  * a stored string (strict) that prepares prepares the same as a query (lenient); a string
    only the query accepts was refused for an unassigned code point;
  * printable ASCII comes back unchanged; other ASCII is refused as a control character.
"""

from __future__ import annotations

import datetime
import re
import stringprep
import unicodedata
from collections.abc import Callable

from mailwire.protocol._saslprep import SASLprepError, saslprep
from mailwire.protocol._submission import SCAN_LIMIT, message_id, missing_fields
from mailwire.protocol._trace import parse_date

# --- missing_fields ---------------------------------------------------------------------------

FIRST_SECOND = 0  # 1970-01-01T00:00:00Z
LAST_SECOND = 253402300799  # 9999-12-31T23:59:59Z
HOSTS = (
    "mx.example.org",
    "mx.example.org.",
    "MX.Example.ORG",
    "b\u00fccher.example",
    "xn--bcher-kva.example",
    "",
    ".",
    "a..b",
    "host name",
    "[192.0.2.1]",
    "mx_1.example",
    "\udcff.example",
    "\u00fc" * 70 + ".example",  # an IDNA label over 63 octets
    "\u4f8b\u3048.\u30c6\u30b9\u30c8",
    ("a" * 63 + ".") * 4 + "example",  # 263 octets
    ("a" * 63 + ".") * 15 + "example",  # 967 octets: the Message-ID line passes 998
    ("a" * 63 + ".") * 3 + "a" * 61,  # 253 octets, a DNS name's limit
    ("a" * 63 + ".") * 3 + "a" * 61 + ".",  # the same with the root's dot
)
QUEUE_IDS = (
    "0KQ3V8Z7M2C4XB1RT9A6",
    "",
    "a.b",
    ".a",
    "a b",
    "<x>",
    "\u00e9t\u00e9",
    "\ud800",
    "q" * 100,
    "q" * 990,  # dot-atom-text: the Message-ID line passes 998
    "q" * 64,
    "q.q" * 22,  # 66 characters
)
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"  # RFC 5322 3.2.3, written out again
MSG_ID = re.compile(rf"<{ATEXT}+(?:\.{ATEXT}+)*@{ATEXT}+(?:\.{ATEXT}+)*>".encode())
FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")  # RFC 5322 3.6.8 field-name, 4.5 obs WSP
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
FILLER_SPAN = 600


def decode(raw: bytes) -> str:
    """UTF-8 with lone surrogates: encoded ones pass, other bad octets become U+DC80-U+DCFF."""
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape")


def pick(choices: tuple[str, ...], index: int, rest: bytes) -> tuple[str, bytes]:
    """A fixed choice, or (past the list) a string taken from the input."""
    if index < len(choices):
        return choices[index], rest
    size = rest[0] if rest else 0
    return decode(rest[1 : 1 + size]), rest[1 + size :]


def filler(kind: int, size: int) -> bytes:
    """Exactly ``size`` octets of header section: field lines, one field folded over many
    lines, or one unterminated field line."""
    if kind == 1:
        lines = [b"X-Pad: " + b"a" * 71 + b"\r\n"] * (size // 80)
        left = size % 80
        if 0 < left < 9:
            lines[-1] = b"X-Pad: " + b"a" * (71 + left) + b"\r\n"
        elif left:
            lines.append(b"X-Pad: " + b"a" * (left - 9) + b"\r\n")
        return b"".join(lines)
    if kind == 2:
        head = b"X-Folded: a\r\n"
        size -= len(head)
        lines = [b" " + b"a" * 77 + b"\r\n"] * (size // 80)
        left = size % 80
        if 0 < left < 3:
            lines[-1] = b" " + b"a" * (77 + left) + b"\r\n"
        elif left:
            lines.append(b" " + b"a" * (left - 3) + b"\r\n")
        return head + b"".join(lines)
    return b"X-Long: " + b"a" * (size - 8)


LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def expected_fields(content: bytes) -> tuple[set[bytes], bool] | None:
    """The module comment's rules, written again over whole lines: the wanted field names
    in the header section and whether the content has no header section at all; None when
    the line that decides this does not end within SCAN_LIMIT octets."""
    found: set[bytes] = set()
    fields = 0
    pos = 0
    while True:
        brk = LINE_BREAK.search(content, pos)  # CRLF, LF or a lone CR
        nl = -1 if brk is None else brk.start()
        if nl < 0:
            end = len(content)
            decided = len(content) <= SCAN_LIMIT
        else:
            end = nl
            decided = nl < SCAN_LIMIT
        line = content[pos:end]
        verdict: bool | None = None
        if not line:
            verdict = False  # an empty line, or the end of the content
        elif line[:1] in (b" ", b"\t"):
            if not fields:
                verdict = True  # continues nothing: no header section
        else:
            m = FIELD.match(line)
            if m is None:
                verdict = fields == 0  # not a field: the header section ended before it
            else:
                fields += 1
                name = m.group(1).lower()
                if name in (b"date", b"message-id"):
                    found.add(name)
                    if len(found) == 2:
                        verdict = False
        if verdict is not None or nl < 0:
            if not decided:
                return None
            return found, bool(verdict)
        if not decided:
            return None
        assert brk is not None
        pos = brk.end()


def expected_date(arrival: float) -> bytes:
    second = int(arrival // 1)
    when = EPOCH + datetime.timedelta(seconds=second)
    return (
        f"Date: {DAYS[when.weekday()]}, {when.day:02d} {MONTHS[when.month - 1]} "
        f"{when.year:04d} {when.hour:02d}:{when.minute:02d}:{when.second:02d} +0000\r\n"
    ).encode("ascii")


def check_missing_fields(content: bytes, *, arrival: float, queue_id: str, hostname: str) -> None:
    original = bytes(content)
    result = missing_fields(content, arrival=arrival, queue_id=queue_id, hostname=hostname)
    assert content == original, "the content changed"
    assert isinstance(result, bytes), result
    assert result.isascii(), result
    lines = result.split(b"\r\n")
    assert lines.pop() == b"", f"not CRLF-terminated: {result!r}"
    assert all(len(line) <= 998 for line in lines), "a line is over 998 octets (RFC 5322 2.1.1)"
    assert all(b"\r" not in line and b"\n" not in line for line in lines), result

    # which fields, in which order, from an independent reading of the header section
    scanned = expected_fields(content)
    date = expected_date(arrival)
    msgid = f"Message-ID: {message_id(queue_id=queue_id, hostname=hostname)}\r\n".encode()
    if scanned is None:
        expected = b""
    else:
        found, headerless = scanned
        expected = (
            (b"" if b"date" in found else date)
            + (b"" if b"message-id" in found else msgid)
            + (b"\r\n" if headerless else b"")
        )
        assert not headerless or expected == date + msgid + b"\r\n", "header-less with fields"
    assert result == expected, f"{result!r} != {expected!r}"

    for line in lines:
        if line.startswith(b"Date: "):
            assert parse_date(line[6:].decode()) == arrival // 1, line
        elif line.startswith(b"Message-ID: "):
            assert MSG_ID.fullmatch(line[12:]), line
        else:
            assert line == b"" and lines[-1] == b"", result

    # octets past SCAN_LIMIT never matter
    if len(content) > SCAN_LIMIT:
        for tail in (b"\n", b"Date: x\r\nMessage-ID: <a@b>\r\n\r\n"):
            other = content[:SCAN_LIMIT] + tail
            again = missing_fields(other, arrival=arrival, queue_id=queue_id, hostname=hostname)
            assert again == result, "an octet past SCAN_LIMIT changed the answer"

    # idempotence: once the fields are there, nothing more is added
    if result:
        twice = missing_fields(
            result + content, arrival=arrival, queue_id=queue_id, hostname=hostname
        )
        assert twice == b"", f"added again: {twice!r}"


def fuzz_missing_fields(data: bytes) -> None:
    head, rest = data[:9].ljust(9, b"\0"), data[9:]
    second = FIRST_SECOND + int.from_bytes(head[1:6], "big") % (LAST_SECOND - FIRST_SECOND + 1)
    arrival = second + head[6] / 256
    hostname, rest = pick(HOSTS, head[7], rest)
    queue_id, rest = pick(QUEUE_IDS, head[8], rest)
    kind = (data[0] >> 1) & 3
    if kind and len(rest) >= 2:
        size = SCAN_LIMIT - FILLER_SPAN + int.from_bytes(rest[:2], "big") % (2 * FILLER_SPAN)
        rest = filler(kind, size) + rest[2:]
    check_missing_fields(rest, arrival=arrival, queue_id=queue_id, hostname=hostname)


# --- saslprep ---------------------------------------------------------------------------------

TABLES: dict[str, Callable[[str], bool]] = {
    "C.1.2": stringprep.in_table_c12,
    "C.2.1": stringprep.in_table_c21,
    "C.2.2": stringprep.in_table_c22,
    "C.3": stringprep.in_table_c3,
    "C.4": stringprep.in_table_c4,
    "C.5": stringprep.in_table_c5,
    "C.6": stringprep.in_table_c6,
    "C.7": stringprep.in_table_c7,
    "C.8": stringprep.in_table_c8,
    "C.9": stringprep.in_table_c9,
}


def prepare(text: str) -> str:
    """RFC 4013 2.1 and 2.2, written again: map, then NFKC with Unicode 3.2."""
    mapped = []
    for c in text:
        if stringprep.in_table_b1(c):
            continue
        mapped.append(" " if stringprep.in_table_c12(c) else c)
    return unicodedata.ucd_3_2_0.normalize("NFKC", "".join(mapped))


def bidi_ok(text: str) -> bool:
    """RFC 3454 6, items 2 and 3."""
    if not any(stringprep.in_table_d1(c) for c in text):
        return True
    if any(stringprep.in_table_d2(c) for c in text):
        return False
    return stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])


def check_error(text: str, exc: SASLprepError, *, allow_unassigned: bool) -> None:
    assert isinstance(exc, ValueError)
    message = str(exc)
    assert isinstance(exc.reason, str) and exc.reason, exc
    # the promise: reason is safe to show for a password; nothing echoes a character of it
    assert exc.reason.isascii() and message.isascii(), ascii(message)
    assert "U+" not in exc.reason, exc.reason
    assert all(c not in message for c in text if not c.isascii()), ascii(message)
    prepared = prepare(text)
    cp = exc.code_point
    if cp is None:
        assert "6)" in exc.reason and not bidi_ok(prepared), (ascii(text), exc.reason)
        return
    assert isinstance(cp, str) and len(cp) == 1 and cp in prepared, (ascii(text), ascii(cp))
    assert f"(U+{ord(cp):04X})" in message, ascii(message)
    for name, in_table in TABLES.items():
        if f"({name})" in exc.reason.replace("RFC 3454 ", ""):
            assert in_table(cp), (name, ascii(cp))
            return
    assert "(RFC 3454 A.1)" in exc.reason, exc.reason
    assert not allow_unassigned and stringprep.in_table_a1(cp), ascii(cp)


def check_output(text: str, out: str, *, allow_unassigned: bool) -> None:
    assert isinstance(out, str)
    assert out == prepare(text), (ascii(text), ascii(out))
    for c in out:
        for name, in_table in TABLES.items():
            assert not in_table(c), f"{ascii(c)} in table {name}"
        assert allow_unassigned or not stringprep.in_table_a1(c), ascii(c)
    assert bidi_ok(out), ascii(out)
    assert unicodedata.ucd_3_2_0.normalize("NFKC", out) == out, ascii(out)
    assert saslprep(out, allow_unassigned=allow_unassigned) == out, f"not idempotent: {out!a}"


def run_saslprep(text: str, *, allow_unassigned: bool) -> str | SASLprepError:
    try:
        out = saslprep(text, allow_unassigned=allow_unassigned)
    except SASLprepError as exc:
        check_error(text, exc, allow_unassigned=allow_unassigned)
        return exc
    check_output(text, out, allow_unassigned=allow_unassigned)
    return out


def check_saslprep(text: str, *, allow_unassigned: bool) -> None:
    result = run_saslprep(text, allow_unassigned=allow_unassigned)
    other = run_saslprep(text, allow_unassigned=not allow_unassigned)
    strict, lenient = (other, result) if allow_unassigned else (result, other)
    if isinstance(strict, str):
        assert lenient == strict, "a stored string prepares differently as a query"
    elif isinstance(lenient, str):
        assert "A.1" in strict.reason, strict.reason
    if text.isascii():
        if text.isprintable():
            assert result == text, "printable ASCII changed"
        else:
            assert isinstance(result, SASLprepError) and "C.2.1" in result.reason, result


def fuzz_saslprep(data: bytes) -> None:
    flags = data[1] if len(data) > 1 else 0
    raw = data[2:]
    if flags & 2:
        text = "".join(
            chr(int.from_bytes(raw[i : i + 3], "big") % 0x110000) for i in range(0, len(raw), 3)
        )
    else:
        text = decode(raw)
    check_saslprep(text, allow_unassigned=bool(flags & 1))


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        fuzz_saslprep(data)
    else:
        fuzz_missing_fields(data)


def main() -> None:
    from _atheris import fuzz  # atheris only for real fuzzing runs

    fuzz(test_one_input)


if __name__ == "__main__":
    main()

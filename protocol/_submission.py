# Message submission (RFC 6409): the header fields an MSA adds to a message that lacks them.
#
# RFC 6409 8.2: "The MSA MAY add a 'Date' field to the submitted message, if it lacks it".
# RFC 6409 8.3: "The MSA SHOULD add or replace the 'Message-ID' field, if it lacks it, or it is
# not valid syntax ...  Note that a number of clients still do not generate 'Message-ID'
# fields."  Large receivers junk or refuse mail without a Message-ID, so the MTA adds both to
# mail from authenticated clients (adapters/_agent.py, as the message leaves; Postfix does the
# same for its local and SASL-authenticated clients).  missing_fields() decides what to add:
#
#   * Date (RFC 5322 3.3, 3.6.1): the message's arrival time, in UTC, from
#     protocol/_trace.py's format_date (the protocol package may not read a clock).
#   * Message-ID (RFC 5322 3.6.4): ``msg-id = "<" id-left "@" id-right ">"``, both parts
#     dot-atom-text.  id-left is the queue id, id-right this host's name, so the id is the
#     same on every attempt and after a restart (a retried relay must not look like a second
#     message).  A host name that is not dot-atom-text is IDNA-encoded when it is non-ASCII
#     and otherwise replaced by "localhost"; a queue id that is not dot-atom-text is replaced
#     by a digest of itself (never the case for the spool's ids).
#
# Only missing fields are added and the content is never changed other than by prepending: a
# field that is present is kept even when its syntax is bad (correcting it would mean
# rewriting the client's header section, and would break a DKIM signature over it).
#
# Reading the header section (RFC 5322 2.2, 2.2.3, 3.6.8): a field is ``field-name ":"``,
# field-name being printable US-ASCII but ":" (with RFC 5322 4.5's obsolete white space before
# the colon tolerated); names compare case-insensitively; a line starting with SP or HTAB
# continues the previous field (a folded line, never a new field).  The section ends at the
# first empty line, at the end of the content, or at the first line that is not a field at
# all (an mbox "From " line, a body sent without any header): only the fields before it
# count.  CRLF, bare LF and a lone CR all end a line, as mail parsers split them (BDAT
# content may hold lone CRs).  When the content has no header field at all and goes on with
# something else, the added fields are followed by an empty line, so that what the client
# sent becomes the body instead of a broken header section.
#
# Bounded work: only the first SCAN_LIMIT (64 KiB) octets are read.  A header section that
# runs past them is undecided, and nothing is added (a second Date or Message-ID would make
# the message invalid: RFC 5322 3.6 allows each at most once).
from __future__ import annotations

import hashlib
import re

from mailwire.protocol._trace import format_date

SCAN_LIMIT = 64 * 1024  # octets of the content missing_fields() reads at most

_FIELD_NAME = re.compile(rb"[!-9;-~]+")  # RFC 5322 3.6.8: ftext = %d33-57 / %d59-126
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"  # RFC 5322 3.2.3
_DOT_ATOM_TEXT = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")  # 1*atext *("." 1*atext)
_DATE = b"date"
_MESSAGE_ID = b"message-id"
FALLBACK_HOSTNAME = "localhost"
# the arrival times a Date can show: years 1 to 9999 (RFC 5322 3.3 date-time, 4-digit years
# as parse_date reads them); an arrival outside (NaN, infinite, a damaged envelope) gets none
_FIRST_SECOND = -62135596800.0  # 0001-01-01T00:00:00Z
_AFTER_LAST = 253402300800.0  # 10000-01-01T00:00:00Z
# bounds that keep "Message-ID: <left@right>" far below RFC 5322 2.1.1's 998 octets per line
_MAX_LEFT = 64
_MAX_HOST = 253


def _scan(content: bytes, limit: int) -> tuple[set[bytes], bool] | None:
    """The wanted field names present in the header section, and whether the content goes
    on, after no field at all, with a line that is not a field; None when undecided."""
    found: set[bytes] = set()
    fields = 0
    size = len(content)
    window = min(size, limit)
    pos = 0
    while pos < window:
        # a line ends at CRLF, LF or a lone CR: mail parsers (Python's email among them)
        # split at each, so a field after a lone CR is a field to them (found by review: a
        # BDAT body "Subject: x\rDate: ..." got a second Date)
        nl = content.find(b"\n", pos, window)
        cr = content.find(b"\r", pos, window if nl < 0 else nl)
        brk = nl if cr < 0 else cr
        if brk < 0 and size > window:
            return None  # the line runs past the window
        end = window if brk < 0 else brk
        line = content[pos:end]
        if not line:  # the empty line that ends the header section
            return found, False
        if line[0] in b" \t":  # a folded line: part of the previous field
            if fields == 0:
                return found, True  # nothing to continue: not a header section at all
        else:
            colon = line.find(b":")
            name = line[:colon].rstrip(b" \t") if colon > 0 else b""
            if not _FIELD_NAME.fullmatch(name):
                return found, fields == 0  # not a field: the header section ended before it
            fields += 1
            name = name.lower()
            if name == _DATE or name == _MESSAGE_ID:
                found.add(name)
                if len(found) == 2:
                    return found, False
        pos = end + (2 if content[end : end + 2] == b"\r\n" else 1)
    if size > window:
        return None  # the header section goes on past the window
    return found, False


def _dot_atom(text: str) -> bool:
    return _DOT_ATOM_TEXT.fullmatch(text) is not None


def message_id_host(hostname: str) -> str:
    """The id-right of a Message-ID for ``hostname``: dot-atom-text (RFC 5322 3.6.4).

    Args:
        hostname: this host's name (a trailing dot is dropped, a non-ASCII name is
            IDNA-encoded).

    Returns:
        The name, or ``"localhost"`` when it cannot be made dot-atom-text of at most 253
        octets (a DNS name's limit, RFC 1035 2.3.4; it keeps the field's line well under
        RFC 5322 2.1.1's 998).
    """
    name = hostname.rstrip(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return FALLBACK_HOSTNAME
    return name if len(name) <= _MAX_HOST and _dot_atom(name) else FALLBACK_HOSTNAME


def message_id(*, queue_id: str, hostname: str) -> str:
    """The Message-ID an MSA gives a message: ``<queue_id@hostname>`` (RFC 5322 3.6.4).

    The same for the same arguments (a retry or a restart gives the same id).

    Args:
        queue_id: the message's queue id (used as id-left when it is dot-atom-text of at
            most 64 characters, else a digest of it).
        hostname: this host's name (see :func:`message_id_host`).

    Returns:
        The msg-id, angle brackets included.
    """
    left = queue_id
    if len(left) > _MAX_LEFT or not _dot_atom(left):
        left = "mw." + hashlib.sha256(queue_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"<{left}@{message_id_host(hostname)}>"


def missing_fields(content: bytes, *, arrival: float, queue_id: str, hostname: str) -> bytes:
    """The ``Date`` and ``Message-ID`` fields a submitted message lacks (RFC 6409 8.2, 8.3).

    Prepend the result to the content (after any trace field).  Applying it twice adds
    nothing the second time.  Reads at most :data:`SCAN_LIMIT` octets of ``content``.

    Args:
        content: the message as the client sent it (CRLF or bare LF line ends).
        arrival: when the message arrived, seconds since the epoch (the Date, in UTC; no
            Date is added for a time outside the years 1 to 9999, NaN or infinite).
        queue_id: the message's queue id (the Message-ID's left part).
        hostname: this host's name (its right part).

    Returns:
        The fields to add, each ending with CRLF (Date first), followed by an empty line
        when the content has no header section of its own (see the module comment); ``b""``
        when neither is missing, or when the header section runs past SCAN_LIMIT.
    """
    scanned = _scan(content, SCAN_LIMIT)
    if scanned is None:
        return b""
    found, headerless = scanned
    out = []
    if _DATE not in found and _FIRST_SECOND <= arrival < _AFTER_LAST:  # False for NaN
        out.append(f"Date: {format_date(arrival)}\r\n")
    if _MESSAGE_ID not in found:
        out.append(f"Message-ID: {message_id(queue_id=queue_id, hostname=hostname)}\r\n")
    if headerless:
        out.append("\r\n")
    return "".join(out).encode("ascii")


__all__ = ["SCAN_LIMIT", "message_id", "message_id_host", "missing_fields"]

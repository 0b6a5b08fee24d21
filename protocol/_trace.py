# Trace information: the Received header, RFC 5322 dates, and hop counting for loop detection.
#
# RFC 5321 4.4: "When an SMTP server receives a message for delivery or further processing, it
# MUST insert trace ("time stamp" or "Received") information at the beginning of the message
# content".  received_header() builds that field from facts the caller passes in (the client's
# HELO argument, its address and reverse-DNS name, our host name, the protocol, the queue id,
# the single recipient if there is exactly one, and the time as a Unix timestamp).  The grammar:
#
#   Stamp      = From-domain By-domain Opt-info [CFWS] ";" FWS date-time
#   From-domain = "FROM" FWS Extended-Domain
#   Extended-Domain = Domain / ( Domain FWS "(" TCP-info ")" ) /
#                     ( address-literal FWS "(" TCP-info ")" )
#   TCP-info   = address-literal / ( Domain FWS address-literal )
#   Opt-info   = [Via] [With] [ID] [For] [Additional-Registered-Clauses]
#
# The HELO argument is client-controlled and need not be a domain at all.  When it is a valid
# Domain or address-literal it becomes the From-domain; otherwise the client's address literal
# does, and the HELO text goes into a comment with "(", ")" and "\" quoted (RFC 5322 3.2.2
# ctext), so a hostile HELO can never add clauses of its own or break the header.  Protocol
# names come from RFC 3848 (ESMTPA, ESMTPS, ESMTPSA, LMTP...) and RFC 6531 (UTF8SMTP...).
#
# Dates: the protocol package may not read the clock, nor import datetime (tests/test_purity.py),
# so format_date() turns a given Unix timestamp into an RFC 5322 3.3 date-time with plain
# proleptic-Gregorian arithmetic, and parse_date() reads one back (the DSN parser uses it).
#
# Loops, RFC 5321 6.3: "Simple counting of the number of "Received:" header fields in a message
# has proven to be an effective, although rarely optimal, technique for detecting loops in mail
# systems.  SMTP servers using this technique SHOULD use a large rejection threshold, normally
# at least 100 Received entries."  ReceivedCounter counts Received fields in the header block as
# the message streams in (chunks may split lines anywhere; folded continuation lines are not
# new fields; counting stops at the blank line that ends the headers, so a Received line in the
# body is never counted).  check_hop_count() answers 554 5.4.6 (RFC 3463: "Routing loop
# detected") when the count is above the limit.
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mailwire.protocol._events import Reply
from mailwire.protocol._grammar import is_valid_domain

DEFAULT_MAX_RECEIVED = 100  # RFC 5321 6.3: "normally at least 100 Received entries"

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_INDEX = {name.lower(): i + 1 for i, name in enumerate(_MONTHS)}
# RFC 5322 4.3 obsolete zone names, in minutes east of UTC
_OBS_ZONES = {
    "UT": 0, "GMT": 0, "Z": 0,
    "EST": -300, "EDT": -240, "CST": -360, "CDT": -300,
    "MST": -420, "MDT": -360, "PST": -480, "PDT": -420,
}  # fmt: skip


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """Days since 1970-01-01 -> (year, month, day), proleptic Gregorian (H. Hinnant)."""
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if m <= 2 else y), m, d


def _days_from_civil(y: int, m: int, d: int) -> int:
    """(year, month, day) -> days since 1970-01-01 (inverse of _civil_from_days)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def format_date(timestamp: float, *, utc_offset_minutes: int = 0) -> str:
    """Format a Unix timestamp as an RFC 5322 3.3 date-time.

    Args:
        timestamp: seconds since the Unix epoch (fractions are truncated).
        utc_offset_minutes: the zone to express the time in, minutes east of UTC.

    Returns:
        For example ``"Sun, 29 Nov 2026 04:11:28 +0000"``.

    Raises:
        ValueError: if the offset is not within +-99:59.
    """
    if not -5999 <= utc_offset_minutes <= 5999:
        raise ValueError(f"bad UTC offset {utc_offset_minutes!r}")
    local = int(timestamp // 1) + utc_offset_minutes * 60
    days, secs = divmod(local, 86400)
    y, m, d = _civil_from_days(days)
    hh, rest = divmod(secs, 3600)
    mm, ss = divmod(rest, 60)
    sign = "+" if utc_offset_minutes >= 0 else "-"
    oh, om = divmod(abs(utc_offset_minutes), 60)
    wday = _DAYS[(days + 3) % 7]  # 1970-01-01 was a Thursday
    zone = f"{sign}{oh:02d}{om:02d}"
    return f"{wday}, {d:02d} {_MONTHS[m - 1]} {y:04d} {hh:02d}:{mm:02d}:{ss:02d} {zone}"


_DATE = re.compile(
    r"\s*(?:[A-Za-z]{3}\s*,\s*)?(\d{1,2})\s+([A-Za-z]{3})\s+(\d{2,4})\s+"
    r"(\d{1,2}):(\d{2})(?::(\d{2}))?\s+([+-]\d{4}|[A-Za-z]{1,3})\s*(?:\([^()]*\)\s*)?"
)


def parse_date(text: str) -> float | None:
    """Parse an RFC 5322 date-time (including the obsolete forms of 4.3) to a Unix timestamp.

    Args:
        text: the field body, e.g. ``"Sun, 29 Nov 2026 04:11:28 +0000"``.

    Returns:
        Seconds since the epoch, or ``None`` when the text is not a date.
    """
    m = _DATE.fullmatch(text)
    if m is None:
        return None
    day, mon, year = int(m.group(1)), _MONTH_INDEX.get(m.group(2).lower()), int(m.group(3))
    hh, mm, ss = int(m.group(4)), int(m.group(5)), int(m.group(6) or 0)
    if len(m.group(3)) == 2:  # RFC 5322 4.3: 00-49 -> 20xx, 50-99 -> 19xx
        year += 2000 if year < 50 else 1900
    elif len(m.group(3)) == 3:
        year += 1900
    if mon is None or not 1 <= day <= 31 or hh > 23 or mm > 59 or ss > 60:
        return None
    zone = m.group(7)
    if zone[0] in "+-":
        offset = int(zone[1:3]) * 60 + int(zone[3:5])
        offset = -offset if zone[0] == "-" else offset
    else:
        # RFC 5322 4.3: unknown military zones "SHOULD all be considered equivalent to -0000"
        offset = _OBS_ZONES.get(zone.upper(), 0)
    days = _days_from_civil(year, mon, day)
    return float(days * 86400 + hh * 3600 + mm * 60 + min(ss, 59) - offset * 60)


# --- the Received header ---------------------------------------------------------------------


def with_protocol(
    *,
    esmtp: bool = True,
    tls: bool = False,
    authenticated: bool = False,
    lmtp: bool = False,
    smtputf8: bool = False,
) -> str:
    """The ``with`` protocol name of a Received header (RFC 3848, RFC 6531 3.7.3).

    Args:
        esmtp: the client said EHLO (False: HELO, plain ``SMTP``).
        tls: the session was protected by STARTTLS or implicit TLS.
        authenticated: the client authenticated (AUTH).
        lmtp: the session is LMTP (RFC 2033).
        smtputf8: the transaction used SMTPUTF8.

    Returns:
        ``"SMTP"``, ``"ESMTP"``, ``"ESMTPS"``, ``"ESMTPA"``, ``"ESMTPSA"``, ``"LMTP"``,
        ``"LMTPSA"``, ``"UTF8SMTPS"``, ...
    """
    if lmtp:
        base = "UTF8LMTP" if smtputf8 else "LMTP"
    elif smtputf8:
        base = "UTF8SMTP"
    elif esmtp or tls or authenticated:
        base = "ESMTP"
    else:
        return "SMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


def address_literal(address: str) -> str:
    """RFC 5321 4.1.3 address literal for an IP address: ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``.

    Raises:
        ValueError: if ``address`` is not an IP address.
    """
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"[{ip.ipv4_mapped}]"
        return f"[IPv6:{ip.compressed}]"
    return f"[{ip}]"


def _comment_text(text: str) -> str:
    # RFC 5322 3.2.2: ctext excludes "(", ")" and "\"; they travel as quoted-pairs.  Controls
    # (CR, LF, NUL...) cannot come from an engine event but are replaced anyway.
    out = []
    for ch in text:
        if ch in "()\\":
            out.append("\\" + ch)
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append("?")
        else:
            out.append(ch)
    return "".join(out)


def _is_literal(text: str) -> bool:
    if not (text.startswith("[") and text.endswith("]")):
        return False
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
        try:
            return isinstance(ipaddress.ip_address(inner), ipaddress.IPv6Address)
        except ValueError:
            return False
    try:
        return isinstance(ipaddress.ip_address(inner), ipaddress.IPv4Address)
    except ValueError:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceInfo:
    """Facts about one accepted message, for its Received header (RFC 5321 4.4).

    Attributes:
        helo: the client's HELO/EHLO/LHLO argument, as given (may be anything).
        client_address: the client's IP address (``"192.0.2.1"``), or None if unknown.
        client_name: the verified reverse-DNS name of the client, or None.
        by: this server's host name.
        protocol: the ``with`` value, see :func:`with_protocol`.
        queue_id: the queue id given to the message (an RFC 5322 atom), or None.
        recipient: the one recipient, when the message has exactly one (RFC 5321 7.2 warns
            that listing recipients in ``for`` may leak Bcc addresses), else None.
        timestamp: the time of receipt, seconds since the epoch.
        utc_offset_minutes: the zone of the date, minutes east of UTC.
        tls_comment: e.g. ``"TLSv1.3 TLS_AES_256_GCM_SHA384"``, appended as a comment.
    """

    helo: str
    client_address: str | None
    client_name: str | None = None
    by: str
    protocol: str = "ESMTP"
    queue_id: str | None = None
    recipient: str | None = None
    timestamp: float
    utc_offset_minutes: int = 0
    tls_comment: str | None = None


_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]+")
_PROTOCOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


def received_header(info: TraceInfo) -> bytes:
    """Build the ``Received:`` header field for an accepted message (RFC 5321 4.4).

    The result is folded at the clause boundaries and ends with CRLF; prepend it to the
    message content.

    Args:
        info: the facts to record.

    Returns:
        The header field as bytes (UTF-8 only if the HELO argument or a name is non-ASCII,
        which the engine admits only under SMTPUTF8).

    Raises:
        ValueError: if ``by``, ``protocol`` or ``queue_id`` is malformed, or
            ``client_address`` is not an IP address.
    """
    if not is_valid_domain(info.by):
        raise ValueError(f"bad host name {info.by!r}")
    if not _PROTOCOL.fullmatch(info.protocol):
        raise ValueError(f"bad protocol name {info.protocol!r}")
    if info.queue_id is not None and not _ATOM.fullmatch(info.queue_id):
        raise ValueError(f"queue id must be an atom: {info.queue_id!r}")
    literal = address_literal(info.client_address) if info.client_address else None
    helo_ok = bool(info.helo) and (is_valid_domain(info.helo) or _is_literal(info.helo))
    tcp: list[str] = []
    if info.client_name and is_valid_domain(info.client_name):
        tcp.append(info.client_name)
    if literal:
        tcp.append(literal)
    if helo_ok:
        from_part = f"from {info.helo}"
        if tcp:
            from_part += f" ({' '.join(tcp)})"
    else:
        # Extended-Domain needs a Domain or literal first; keep the bogus HELO as a comment
        first = literal or "unknown"
        from_part = f"from {first} (HELO {_comment_text(info.helo)!s})"
        if info.client_name and is_valid_domain(info.client_name):
            from_part += f" ({info.client_name})"
    lines = [f"Received: {from_part}"]
    clause = f"by {info.by} (mailwire) with {info.protocol}"
    if info.tls_comment:
        clause += f" ({_comment_text(info.tls_comment)})"
    if info.queue_id is not None:
        clause += f" id {info.queue_id}"
    lines.append(clause)
    date = format_date(info.timestamp, utc_offset_minutes=info.utc_offset_minutes)
    if info.recipient is not None:
        if any(c in info.recipient for c in "\r\n<>") or not info.recipient:
            raise ValueError(f"bad recipient {info.recipient!r}")
        lines.append(f"for <{info.recipient}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(date)
    return ("\r\n\t".join(lines) + "\r\n").encode("utf-8")


# --- hop counting (RFC 5321 6.3) ---------------------------------------------------------------

_RECEIVED = re.compile(rb"received[ \t]*:", re.IGNORECASE)


class ReceivedCounter:
    """Count ``Received:`` fields in a message's header block as its content streams in.

    Feed the content (un-dot-stuffed, as MessageData events carry it) chunk by chunk; counting
    stops at the end of the headers (the first empty line), so the body is never scanned.
    Bare-LF line endings are tolerated.  Memory is bounded by one header line.

    Attributes:
        count: Received fields seen so far.
        done: True once the end of the header block was seen.
    """

    __slots__ = ("count", "done", "_line")

    def __init__(self) -> None:
        self.count = 0
        self.done = False
        self._line = bytearray()  # the start of the current, unfinished line (at most 32 bytes)

    def feed(self, data: bytes) -> None:
        """Scan one more chunk of the message content."""
        pos = 0
        n = len(data)
        while pos < n and not self.done:
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl
            if len(self._line) < 32:
                self._line += data[pos : min(end, pos + 32 - len(self._line))]
            if nl < 0:
                return
            self._end_line()
            pos = nl + 1

    def _end_line(self) -> None:
        line = bytes(self._line).rstrip(b"\r")
        self._line.clear()
        if not line:
            self.done = True
        elif _RECEIVED.match(line):
            self.count += 1

    def close(self) -> None:
        """The content ended: a last line without a line ending is still counted."""
        if self._line and not self.done:
            self._end_line()
        self.done = True


def count_received(header_block: bytes) -> int:
    """Count the ``Received:`` fields of a message (only in its header block).

    Args:
        header_block: the message content, or just its headers.

    Returns:
        The number of Received fields before the first empty line.
    """
    counter = ReceivedCounter()
    counter.feed(header_block)
    counter.close()
    return counter.count


LOOP_REPLY = Reply(code=554, text="5.4.6 Routing loop detected: too many Received headers")


def check_hop_count(received: int, *, limit: int = DEFAULT_MAX_RECEIVED) -> Reply | None:
    """Decide whether a message has travelled too many hops (RFC 5321 6.3).

    Args:
        received: the number of Received fields (see :class:`ReceivedCounter`), not counting
            the one this server adds.
        limit: the most Received fields a message may carry (default 100).

    Returns:
        ``554 5.4.6 Routing loop detected`` when ``received > limit``, else ``None``.
    """
    return LOOP_REPLY if received > limit else None

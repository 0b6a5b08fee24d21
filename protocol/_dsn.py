# Delivery status notifications: bounces, delay notices and success reports (RFC 3464, 3461).
#
# build_dsn() turns a queued message's recipient states (from mailwire.protocol._queue) into
# the notification to send back to the envelope sender, or None when none is owed.  The rules
# it enforces:
#
# * Never a bounce for a bounce.  RFC 5321 6.1: "If there is a delivery failure after
#   acceptance of a message, the receiver-SMTP MUST formulate and mail a notification message.
#   This notification MUST be sent using a null ("<>") reverse-path in the envelope." and
#   4.5.5: notifications for a message with a null reverse-path are never sent.  A null sender
#   gets no DSN; every DSN goes out with the null sender.
# * NOTIFY (RFC 3461 4.1): NEVER means no DSN at all; otherwise a recipient is reported only
#   for the conditions it asked for (FAILURE, DELAY, SUCCESS).  Without NOTIFY the MTA
#   behaves as if NOTIFY=FAILURE,DELAY had been given.
# * Success (RFC 3461 4.2, 6.2.1): a delivered recipient whose message went into a mailbox
#   here (Handoff.MAILBOX, or an unknown handoff) is reported as "delivered"; one relayed to
#   a next hop that does not offer DSN as "relayed" ("the MTA ... MUST issue a 'relayed' DSN
#   for that recipient" when NOTIFY=SUCCESS cannot be passed on); one passed to a next hop
#   that offered DSN is not reported at all -- the NOTIFY parameter went with it, and that
#   hop (or the one after it) reports.
# * RET (RFC 3461 4.3): FULL returns the whole message as message/rfc822, HDRS only its
#   headers as text/rfc822-headers; without RET the implementation chooses (here: the whole
#   message up to `default_full_size`, headers beyond).  "If a DSN contains no indications of
#   delivery failure, the MTA SHOULD return only the headers", so delay and success notices
#   carry headers only; and the MTA "MAY return only the headers even if the RET parameter
#   specified FULL" for messages above an implementation limit (`max_full_size`).
# * ENVID (RFC 3461 4.4) comes back as Original-Envelope-Id, ORCPT (4.2) as
#   Original-Recipient.
# * UTF-8 (SMTPUTF8) addresses or diagnostics make the report part
#   message/global-delivery-status (RFC 6533 3), and a returned message with non-ASCII
#   headers message/global or message/global-headers (RFC 6532 3.7, RFC 6533 3).
#
# The message is RFC 3464 2 / RFC 6522 multipart/report; report-type=delivery-status: a
# human-readable text/plain part, a message/delivery-status part (one group of per-message
# fields, then one group per recipient, separated by blank lines), then the returned content.
#
# Why not the stdlib `email` package?  Importing any of email.message / email.parser /
# email.policy loads socket, random, datetime, selectors and urllib.parse (through
# email.utils), which tests/test_purity.py forbids once mailwire.protocol re-exports this
# module; and its generator draws random MIME boundaries.  The format is small and fixed, so
# it is written out directly: deterministic bytes (the boundary and Message-ID are hashes of
# the inputs, re-hashed until the boundary occurs in no part), and the tests check the result
# with the stdlib parser as an independent reader.
#
# parse_dsn() / parse_delivery_status() read a report back into DSNReport records (the round
# trip build -> parse is property-tested) and take arbitrary bytes: they return a report or
# raise DSNParseError, nothing else, so a fuzz target can drive them.
from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mailwire.protocol._queue import Handoff, QueuedMessage, RecipientState, RecipientStatus
from mailwire.protocol._trace import format_date, parse_date

DEFAULT_FULL_SIZE = 100_000  # RET absent: return the whole message up to this size
MAX_FULL_SIZE = 10 * 1024 * 1024  # RET=FULL: above this, headers only (RFC 3461 4.3 MAY)


class DSNParseError(ValueError):
    """The bytes are not a delivery status notification mailwire can read."""


class DSNAction(enum.Enum):
    """The Action field of a per-recipient group (RFC 3464 2.3.3)."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"
    EXPANDED = "expanded"


_NOTIFY_KEYWORD = {
    DSNAction.FAILED: "FAILURE",
    DSNAction.DELAYED: "DELAY",
    DSNAction.DELIVERED: "SUCCESS",
    DSNAction.RELAYED: "SUCCESS",
    DSNAction.EXPANDED: "SUCCESS",
}
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _typed(name: str, value: str | None) -> str | None:
    """Normalise ``type ; value`` to ``type;value`` (RFC 3464 2.1.2 / 2.3.1 / 2.3.2)."""
    if value is None:
        return None
    kind, sep, rest = value.partition(";")
    kind, rest = kind.strip(), rest.strip()
    if not sep or not kind or any(c.isspace() for c in kind):
        raise ValueError(f"{name} must be 'type;value': {value!r}")
    if any(c in rest for c in "\r\n\x00"):
        raise ValueError(f"{name} must not contain CR, LF or NUL")
    return f"{kind};{rest}"


@dataclass(frozen=True, slots=True, kw_only=True)
class DSNRecipient:
    """One per-recipient group of a delivery-status report (RFC 3464 2.3).

    Typed values are kept as ``"type;value"`` (spaces around ``;`` are dropped).  Times are
    whole seconds since the epoch (RFC 5322 dates have no fractions).

    Attributes:
        final_recipient: e.g. ``"rfc822;bob@example.net"``.
        action: what happened.
        status: the RFC 3463 status code, e.g. ``"5.1.1"``.
        original_recipient: from ORCPT, e.g. ``"rfc822;bob@example.net"``, or None.
        remote_mta: e.g. ``"dns;mx1.example.net"``, or None.
        diagnostic_code: e.g. ``"smtp;550 5.1.1 No such user"``, or None.
        last_attempt_date: when the last attempt was made, or None.
        will_retry_until: for ``delayed``: when the MTA gives up, or None.

    Raises:
        ValueError: on a malformed field.
    """

    final_recipient: str
    action: DSNAction
    status: str
    original_recipient: str | None = None
    remote_mta: str | None = None
    diagnostic_code: str | None = None
    last_attempt_date: float | None = None
    will_retry_until: float | None = None

    def __post_init__(self) -> None:
        for name in ("final_recipient", "original_recipient", "remote_mta", "diagnostic_code"):
            object.__setattr__(self, name, _typed(name, getattr(self, name)))
        if not _STATUS.fullmatch(self.status):
            raise ValueError(f"bad status {self.status!r}")
        for name in ("last_attempt_date", "will_retry_until"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(int(value // 1)))


@dataclass(frozen=True, slots=True, kw_only=True)
class DSNReport:
    """The content of a message/delivery-status part (RFC 3464 2.2 and 2.3).

    Attributes:
        reporting_mta: e.g. ``"dns;mx.example"``.
        recipients: one group per reported recipient.
        original_envelope_id: ENVID of the original message, or None.
        arrival_date: when the original message arrived, or None.

    Raises:
        ValueError: on a malformed field.
    """

    reporting_mta: str
    recipients: tuple[DSNRecipient, ...]
    original_envelope_id: str | None = None
    arrival_date: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "reporting_mta", _typed("reporting_mta", self.reporting_mta))
        envid = self.original_envelope_id
        if envid is not None:
            envid = envid.strip()
            if not envid or any(c in envid for c in "\r\n\x00"):
                raise ValueError(f"bad envelope id {self.original_envelope_id!r}")
            object.__setattr__(self, "original_envelope_id", envid)
        if self.arrival_date is not None:
            object.__setattr__(self, "arrival_date", float(int(self.arrival_date // 1)))


@dataclass(frozen=True, slots=True, kw_only=True)
class DSNMessage:
    """A notification ready to queue: send ``content`` from ``<>`` to ``recipient``.

    Attributes:
        sender: always ``""``, the null reverse-path (RFC 5321 6.1).
        recipient: the original message's envelope sender.
        content: the whole message (headers and body, CRLF line endings).
        report: what it reports.
        kind: the most severe action it reports (FAILED, DELAYED, DELIVERED, RELAYED).
    """

    sender: str = ""
    recipient: str
    content: bytes
    report: DSNReport
    kind: DSNAction


def wants_notification(notify: tuple[str, ...] | None, action: DSNAction) -> bool:
    """Whether a recipient's NOTIFY parameter asks to report ``action`` (RFC 3461 4.1).

    Args:
        notify: the NOTIFY values, or None when the parameter was absent.
        action: the action to report.

    Returns:
        False for NEVER; the FAILURE/DELAY/SUCCESS selection otherwise; without NOTIFY,
        failures and delays only.
    """
    if notify is None:
        return action is DSNAction.FAILED or action is DSNAction.DELAYED
    if "NEVER" in notify:
        return False
    return _NOTIFY_KEYWORD[action] in notify


def _status_of(state: RecipientState) -> str:
    reply = state.reply
    if reply is None:
        return "4.0.0" if not state.status.is_final else "5.0.0"
    return reply.enhanced or f"{reply.code // 100}.0.0"


def _action_of(state: RecipientState) -> DSNAction:
    if state.status is RecipientStatus.DELIVERED:
        # RFC 3461 6.2.1: "relayed" when the next hop could not take the SUCCESS request
        return DSNAction.RELAYED if state.handoff is Handoff.RELAYED else DSNAction.DELIVERED
    if state.status is RecipientStatus.FAILED:
        return DSNAction.FAILED
    return DSNAction.DELAYED


def dsn_recipient(state: RecipientState, *, will_retry_until: float | None = None) -> DSNRecipient:
    """The per-recipient group for one recipient's recorded state.

    Args:
        state: the recipient's state (its status gives the action).
        will_retry_until: for a delayed recipient, when the queue gives up.

    Returns:
        The group: Final-Recipient, Action, Status (the reply's enhanced code, else its
        class ``X.0.0``), Original-Recipient from ORCPT, Remote-MTA, Diagnostic-Code
        ``smtp;<reply>``, Last-Attempt-Date, Will-Retry-Until.
    """
    action = _action_of(state)
    address = state.recipient.address
    reply = state.reply
    diagnostic = None
    if reply is not None:
        diagnostic = f"smtp;{reply.code} " + " ".join(
            line.strip() for line in reply.text.split("\n") if line.strip()
        )
    return DSNRecipient(
        # RFC 6533 3: a non-ASCII address is of type utf-8, not rfc822
        final_recipient=f"{'rfc822' if address.isascii() else 'utf-8'};{address}",
        action=action,
        status=_status_of(state),
        original_recipient=state.recipient.orcpt,
        remote_mta=f"dns;{state.remote_mta}" if state.remote_mta else None,
        diagnostic_code=diagnostic.rstrip() if diagnostic else None,
        last_attempt_date=state.last_attempt,
        will_retry_until=will_retry_until if action is DSNAction.DELAYED else None,
    )


# --- rendering --------------------------------------------------------------------------------


def _fold(name: str, value: str) -> str:
    """``Name: value`` folded before spaces so lines stay under 78 characters where possible
    (RFC 5322 2.2.3); unfolding (removing each CRLF) restores ``value`` exactly.

    A fold goes only before a space that follows visible text and has visible text after it,
    so no line is ever all white space (a parser reads such a line as the end of the group;
    the remote server's reply text, which lands in Diagnostic-Code, could otherwise force it).
    """
    line = f"{name}: {value}"
    if len(line) <= 78:
        return line
    out: list[str] = []
    while len(line) > 78:
        cut = _fold_point(line, len(name) + 2)
        if cut < 0:
            break
        out.append(line[:cut])
        line = line[cut:]
    out.append(line)
    return "\r\n".join(out)


def _fold_point(line: str, start: int) -> int:
    def good(i: int) -> bool:
        return not line[i - 1].isspace() and bool(line[i:].strip(" \t"))

    cut = line.rfind(" ", start, 78)
    while cut > start and not good(cut):
        cut = line.rfind(" ", start, cut)
    if cut > start:
        return cut
    cut = line.find(" ", 78)
    while cut >= 0 and not good(cut):
        cut = line.find(" ", cut + 1)
    return cut


def _typed_out(value: str) -> str:
    kind, _, rest = value.partition(";")
    return f"{kind}; {rest}" if rest else f"{kind};"


def render_delivery_status(report: DSNReport) -> bytes:
    """The body of the message/delivery-status part (RFC 3464 2.1).

    Returns:
        Per-message fields, a blank line, then each recipient's fields, CRLF line endings.
    """
    lines = [_fold("Reporting-MTA", _typed_out(report.reporting_mta))]
    if report.original_envelope_id is not None:
        lines.append(_fold("Original-Envelope-Id", report.original_envelope_id))
    if report.arrival_date is not None:
        lines.append(f"Arrival-Date: {format_date(report.arrival_date)}")
    for r in report.recipients:
        lines.append("")
        if r.original_recipient is not None:
            lines.append(_fold("Original-Recipient", _typed_out(r.original_recipient)))
        lines.append(_fold("Final-Recipient", _typed_out(r.final_recipient)))
        lines.append(f"Action: {r.action.value}")
        lines.append(f"Status: {r.status}")
        if r.remote_mta is not None:
            lines.append(_fold("Remote-MTA", _typed_out(r.remote_mta)))
        if r.diagnostic_code is not None:
            lines.append(_fold("Diagnostic-Code", _typed_out(r.diagnostic_code)))
        if r.last_attempt_date is not None:
            lines.append(f"Last-Attempt-Date: {format_date(r.last_attempt_date)}")
        if r.will_retry_until is not None:
            lines.append(f"Will-Retry-Until: {format_date(r.will_retry_until)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def header_block(content: bytes) -> bytes:
    """The header section of a message: everything before the first empty line, with its
    final line ending (CRLF or bare LF tolerated)."""
    ends = [(pos, sep) for sep in (b"\r\n\r\n", b"\n\n") if (pos := content.find(sep)) >= 0]
    if ends:
        pos, sep = min(ends)
        return content[: pos + len(sep) // 2]
    return content if content.endswith(b"\n") or not content else content + b"\r\n"


_SUBJECTS = {
    DSNAction.FAILED: "Undelivered Mail Returned to Sender",
    DSNAction.DELAYED: "Delayed Mail (still being retried)",
    DSNAction.DELIVERED: "Successful Mail Delivery Report",
    DSNAction.RELAYED: "Successful Mail Delivery Report",
}
_EXPLAIN = {
    DSNAction.FAILED: (
        "Your message could not be delivered to one or more recipients.\r\n"
        "The mail system gave up on:"
    ),
    DSNAction.DELAYED: (
        "Your message could not be delivered yet to one or more recipients.\r\n"
        "Delivery will be retried; you do not need to resend it.  Delayed:"
    ),
    DSNAction.DELIVERED: "Your message was delivered to the following recipients:",
    DSNAction.RELAYED: (
        "Your message was relayed to the following recipients' mail systems, which do\r\n"
        "not offer delivery notifications: no further notice of its delivery will come,\r\n"
        "but their mail systems may still report a failure.  Relayed:"
    ),
}


def _human_text(report: DSNReport, kind: DSNAction, hostname: str) -> bytes:
    lines = [f"This is the mail system at host {hostname}.", "", _EXPLAIN[kind], ""]
    for r in report.recipients:
        address = r.final_recipient.partition(";")[2]
        lines.append(f"<{address}>: {r.action.value} ({r.status})")
        if r.diagnostic_code:
            lines.append("    " + r.diagnostic_code.partition(";")[2])
        if r.will_retry_until is not None:
            lines.append(f"    will retry until {format_date(r.will_retry_until)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _crlf_terminated(data: bytes) -> bytes:
    return data if data.endswith(b"\n") or not data else data + b"\r\n"


def render_dsn(
    report: DSNReport,
    *,
    to: str,
    hostname: str,
    date: float,
    kind: DSNAction,
    returned: bytes | None,
    headers_only: bool,
    message_id: str | None = None,
    utc_offset_minutes: int = 0,
) -> bytes:
    """Write a complete multipart/report DSN message (RFC 3464 2, RFC 6522).

    Args:
        report: the delivery-status content.
        to: the address it goes to (the original envelope sender).
        hostname: this MTA's host name (From: MAILER-DAEMON@hostname).
        date: the Date of the notification, seconds since the epoch.
        kind: FAILED, DELAYED or DELIVERED (subject and explanation).
        returned: the original message content, or None to return nothing.
        headers_only: return only its header block (text/rfc822-headers).
        message_id: the Message-ID without brackets; default: a hash of the inputs.
        utc_offset_minutes: the zone of the Date field.

    Returns:
        The message as bytes with CRLF line endings.

    Raises:
        ValueError: if ``to`` or ``hostname`` contains CR, LF or angle brackets.
    """
    for name, value in (("to", to), ("hostname", hostname)):
        if not value or any(c in value for c in "\r\n\x00<>"):
            raise ValueError(f"bad {name} {value!r}")
    status_part = render_delivery_status(report)
    human = _human_text(report, kind, hostname)
    original: bytes | None = None
    if returned is not None:
        original = header_block(returned) if headers_only else _crlf_terminated(returned)
    seed = hashlib.sha256(status_part + to.encode("utf-8") + repr(date).encode()).hexdigest()
    if message_id is None:
        message_id = f"{seed[:24]}.dsn@{hostname}"
    counter = 0
    while True:
        boundary = f"=_mailwire_{seed[:16]}_{counter}"
        marker = b"--" + boundary.encode("ascii")
        if not any(marker in part for part in (human, status_part, original or b"")):
            break
        counter += 1
        seed = hashlib.sha256(seed.encode("ascii")).hexdigest()
    ascii_human = human.isascii()
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{to}>",
        f"Subject: {_SUBJECTS[kind]}",
        f"Date: {format_date(date, utc_offset_minutes=utc_offset_minutes)}",
        f"Message-ID: <{message_id}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 5
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        f"Content-Type: text/plain; charset={'us-ascii' if ascii_human else 'utf-8'}",
        f"Content-Transfer-Encoding: {'7bit' if ascii_human else '8bit'}",
        "",
    ]
    out = bytearray(("\r\n".join(head) + "\r\n").encode("utf-8"))
    out += human
    # RFC 6533 3: UTF-8 addresses need message/global-delivery-status (and RFC 6532 3.7
    # message/global for a returned message whose headers are not ASCII)
    status_type = (
        "message/delivery-status" if status_part.isascii() else ("message/global-delivery-status")
    )
    out += (
        f"\r\n--{boundary}\r\n"
        "Content-Description: Delivery report\r\n"
        f"Content-Type: {status_type}\r\n"
        f"Content-Transfer-Encoding: {'7bit' if status_part.isascii() else '8bit'}\r\n\r\n"
    ).encode("ascii")
    out += status_part
    if original is not None:
        if header_block(original).isascii():
            ctype = "text/rfc822-headers" if headers_only else "message/rfc822"
        else:
            ctype = "message/global-headers" if headers_only else "message/global"
        desc = "Undelivered Message Headers" if headers_only else "Undelivered Message"
        if kind is DSNAction.DELIVERED or kind is DSNAction.RELAYED:
            desc = "Delivered Message Headers"
        out += (
            f"\r\n--{boundary}\r\n"
            f"Content-Description: {desc}\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Transfer-Encoding: {'7bit' if original.isascii() else '8bit'}\r\n\r\n"
        ).encode("ascii")
        out += original
    out += f"\r\n--{boundary}--\r\n".encode("ascii")
    return bytes(out)


def build_dsn(
    message: QueuedMessage,
    recipients: Sequence[RecipientState],
    *,
    hostname: str,
    now: float,
    original: bytes | None,
    will_retry_until: float | None = None,
    default_full_size: int = DEFAULT_FULL_SIZE,
    max_full_size: int = MAX_FULL_SIZE,
    message_id: str | None = None,
    utc_offset_minutes: int = 0,
) -> DSNMessage | None:
    """The DSN owed to the sender of ``message`` about ``recipients``, if any.

    Each recipient is reported as failed (FAILED), delayed (PENDING/DEFERRED), delivered
    (DELIVERED into a mailbox) or relayed (DELIVERED to a next hop without DSN), only when
    its NOTIFY asks for that; a recipient passed to a next hop that offered DSN is not
    reported (that hop took the request over); a null sender gets nothing.

    Args:
        message: the original envelope (sender, ENVID, RET, arrival).
        recipients: the recipient states to consider (e.g. ``Completion.failed``, or the
            deferred ones for a delay notice).
        hostname: this MTA's name (Reporting-MTA, MAILER-DAEMON@hostname).
        now: the time of the notification (its Date).
        original: the original content to return (per RET), or None to return nothing.
        will_retry_until: for delayed recipients, when the queue gives up (arrival +
            lifetime).
        default_full_size: without RET, return the full message only up to this size.
        max_full_size: with RET=FULL, return only headers above this size.
        message_id: the DSN's Message-ID (default: derived from the inputs).
        utc_offset_minutes: the zone for the Date field.

    Returns:
        The notification to send from ``<>`` to the original sender, or None when none is
        owed (null sender, NOTIFY excludes everything, no recipients).
    """
    if not message.sender:  # RFC 5321 6.1 / 4.5.5: never a bounce for a bounce
        return None
    groups = []
    for state in recipients:
        if state.handoff is Handoff.DSN_PASSED and state.status is RecipientStatus.DELIVERED:
            continue  # RFC 3461 4.2: the next hop got NOTIFY and reports, not this MTA
        action = _action_of(state)
        if wants_notification(state.recipient.notify, action):
            groups.append(dsn_recipient(state, will_retry_until=will_retry_until))
    if not groups:
        return None
    actions = {g.action for g in groups}
    kind = next(
        a
        for a in (DSNAction.FAILED, DSNAction.DELAYED, DSNAction.DELIVERED, DSNAction.RELAYED)
        if a in actions
    )
    report = DSNReport(
        reporting_mta=f"dns;{hostname}",
        recipients=tuple(groups),
        original_envelope_id=message.envid if message.envid and message.envid.strip() else None,
        arrival_date=message.arrival,
    )
    headers_only = True  # RFC 3461 4.3: no failure reported -> headers only
    if original is not None and kind is DSNAction.FAILED:
        if message.ret == "FULL":
            headers_only = len(original) > max_full_size
        elif message.ret is None:
            headers_only = len(original) > default_full_size
    content = render_dsn(
        report,
        to=message.sender,
        hostname=hostname,
        date=now,
        kind=kind,
        returned=original,
        headers_only=headers_only,
        message_id=message_id,
        utc_offset_minutes=utc_offset_minutes,
    )
    return DSNMessage(recipient=message.sender, content=content, report=report, kind=kind)


# --- parsing ----------------------------------------------------------------------------------

_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^\s;]+))', re.IGNORECASE)


def _fields(block: str, *, strict: bool) -> list[tuple[str, str]]:
    """Unfold and split header fields (RFC 5322 2.2); names lower-cased."""
    out: list[tuple[str, str]] = []
    for line in block.split("\n"):
        line = line.rstrip("\r")
        if line[:1] in (" ", "\t"):
            if not out:
                if strict:
                    raise DSNParseError("continuation line before any field")
                continue
            name, value = out[-1]
            out[-1] = (name, value + line)
            continue
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or any(c.isspace() for c in name.strip()):
            if strict:
                raise DSNParseError(f"not a field: {line[:60]!r}")
            continue
        out.append((name.strip().lower(), value))
    return [(n, v.strip()) for n, v in out]


def _typed_in(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return _typed(name, value)
    except ValueError as exc:
        raise DSNParseError(str(exc)) from None


def _date_in(value: str | None) -> float | None:
    if value is None:
        return None
    ts = parse_date(value)
    if ts is None:
        raise DSNParseError(f"bad date {value!r}")
    return ts


def _groups(text: str) -> list[str]:
    groups: list[list[str]] = [[]]
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.strip(" \t"):  # only SP/HTAB make a blank line (an NBSP is text)
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
    return ["\n".join(g) for g in groups if g]


def parse_delivery_status(body: bytes) -> DSNReport:
    """Parse the body of a message/delivery-status part (RFC 3464 2.1).

    Args:
        body: the part's (decoded) body.

    Returns:
        The report.  Unknown fields (extension and X- fields) are ignored; of repeated
        fields the first counts.

    Raises:
        DSNParseError: when required fields are missing or malformed.
    """
    groups = _groups(body.decode("utf-8", errors="replace"))
    if len(groups) < 2:
        raise DSNParseError("a delivery-status needs per-message and per-recipient fields")
    per_message: dict[str, str] = {}
    for name, value in _fields(groups[0], strict=True):
        per_message.setdefault(name, value)
    if "reporting-mta" not in per_message:
        raise DSNParseError("no Reporting-MTA")
    recipients = []
    for group in groups[1:]:
        f: dict[str, str] = {}
        for name, value in _fields(group, strict=True):
            f.setdefault(name, value)
        for required in ("final-recipient", "action", "status"):
            if required not in f:
                raise DSNParseError(f"recipient group without {required}")
        try:
            action = DSNAction(f["action"].split("(")[0].strip().lower())
        except ValueError:
            raise DSNParseError(f"bad Action {f['action']!r}") from None
        status = f["status"].split("(")[0].strip()
        if not _STATUS.fullmatch(status):
            raise DSNParseError(f"bad Status {f['status']!r}")
        try:
            recipients.append(
                DSNRecipient(
                    final_recipient=_typed_in("Final-Recipient", f["final-recipient"]) or "",
                    action=action,
                    status=status,
                    original_recipient=_typed_in("Original-Recipient", f.get("original-recipient")),
                    remote_mta=_typed_in("Remote-MTA", f.get("remote-mta")),
                    diagnostic_code=_typed_in("Diagnostic-Code", f.get("diagnostic-code")),
                    last_attempt_date=_date_in(f.get("last-attempt-date")),
                    will_retry_until=_date_in(f.get("will-retry-until")),
                )
            )
        except ValueError as exc:
            raise DSNParseError(str(exc)) from None
    envid = per_message.get("original-envelope-id")
    try:
        return DSNReport(
            reporting_mta=_typed_in("Reporting-MTA", per_message["reporting-mta"]) or "",
            recipients=tuple(recipients),
            original_envelope_id=envid or None,
            arrival_date=_date_in(per_message.get("arrival-date")),
        )
    except ValueError as exc:
        raise DSNParseError(str(exc)) from None


def _decode(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    try:
        if encoding == "base64":
            return base64.b64decode(b"".join(body.split()), validate=False)
        if encoding == "quoted-printable":
            return binascii.a2b_qp(body)
    except (binascii.Error, ValueError):
        raise DSNParseError(f"bad {encoding} body") from None
    return body


def _split_message(data: bytes) -> tuple[list[tuple[str, str]], bytes]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        pos = data.find(sep)
        if pos >= 0:
            head, body = data[:pos], data[pos + len(sep) :]
            break
    else:
        head, body = data, b""
    return _fields(head.decode("utf-8", errors="replace"), strict=False), body


def parse_dsn(content: bytes) -> DSNReport:
    """Parse a multipart/report DSN message and return its delivery-status report.

    Args:
        content: the whole message (headers and body).

    Returns:
        The report of its message/delivery-status (or message/global-delivery-status) part.

    Raises:
        DSNParseError: if the message is not a multipart/report with a readable
            delivery-status part.
    """
    headers, body = _split_message(content)
    ctype = next((v for n, v in headers if n == "content-type"), "")
    if not ctype.lower().startswith("multipart/report"):
        raise DSNParseError("not a multipart/report message")
    m = _BOUNDARY.search(ctype)
    if m is None:
        raise DSNParseError("multipart/report without a boundary")
    marker = b"--" + (m.group(1) or m.group(2)).encode("utf-8", errors="replace")
    lines = body.split(b"\n")
    parts: list[list[bytes]] = []
    current: list[bytes] | None = None
    for line in lines:
        stripped = line.rstrip(b"\r").rstrip(b" \t")
        if stripped == marker or stripped == marker + b"--":
            if current is not None:
                parts.append(current)
            if stripped.endswith(b"--") and stripped != marker:
                current = None
                break
            current = []
        elif current is not None:
            current.append(line)
    if current is not None:
        parts.append(current)
    for part_lines in parts:
        part = b"\n".join(part_lines)
        part_headers, part_body = _split_message(part)
        ptype = next((v for n, v in part_headers if n == "content-type"), "text/plain")
        kind = ptype.split(";")[0].strip().lower()
        if kind in ("message/delivery-status", "message/global-delivery-status"):
            cte = next((v for n, v in part_headers if n == "content-transfer-encoding"), "7bit")
            return parse_delivery_status(_decode(part_body, cte))
    raise DSNParseError("no message/delivery-status part")


__all__ = [
    "DEFAULT_FULL_SIZE",
    "MAX_FULL_SIZE",
    "DSNAction",
    "DSNMessage",
    "DSNParseError",
    "DSNRecipient",
    "DSNReport",
    "build_dsn",
    "dsn_recipient",
    "header_block",
    "parse_delivery_status",
    "parse_dsn",
    "render_delivery_status",
    "render_dsn",
    "wants_notification",
]

"""Fuzz target: the DSN parser (protocol/_dsn.py) on arbitrary bytes and on mutated DSNs.

    pip install '.[fuzz]'
    python fuzz/fuzz_dsn.py fuzz/corpus/dsn -max_total_time=600

Input: byte 0 picks the mode.  Odd: the rest is a whole message for parse_dsn() and a
delivery-status body for parse_delivery_status().  Even: the rest, split at 0xFF, gives the
fields of a report (Reporting-MTA, Final-Recipient, Original-Recipient, Remote-MTA,
Diagnostic-Code, ENVID, returned content, action/status/date bytes), which is built and
rendered with render_dsn(); the last piece is a list of mutations (flip, insert, delete,
duplicate a line) applied to the rendered bytes.  Invariants:
  * the parsers raise only DSNParseError, their documented error; building raises only
    ValueError (the constructors' documented error);
  * a report that was built parses back from its rendering exactly (render -> parse is the
    identity), both as a whole message and as the delivery-status part alone;
  * whatever parses -- from any bytes, mutated or not -- renders and parses back to itself
    (parse(render(parse(x))) == parse(x)), so a relayed or re-issued report never drifts.
"""

from __future__ import annotations

from mailwire.protocol._dsn import (
    DSNAction,
    DSNParseError,
    DSNRecipient,
    DSNReport,
    parse_delivery_status,
    parse_dsn,
    render_delivery_status,
    render_dsn,
)

ACTIONS = list(DSNAction)
KINDS = [DSNAction.FAILED, DSNAction.DELAYED, DSNAction.DELIVERED]


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def check_parsed(report: DSNReport) -> None:
    """A report that parsed renders and parses back to itself."""
    again = parse_delivery_status(render_delivery_status(report))
    assert again == report, f"re-rendering changed the report:\n{report}\n{again}"


def parse_any(data: bytes) -> None:
    for parse in (parse_dsn, parse_delivery_status):
        try:
            report = parse(data)
        except DSNParseError:
            continue
        check_parsed(report)


def build(pieces: list[bytes]) -> tuple[DSNReport, bytes] | None:
    mta, final, orcpt, remote, diag, envid, returned, numbers = (pieces + [b""] * 8)[:8]
    nums = numbers.ljust(12, b"\x00")
    date = float(int.from_bytes(nums[4:8], "big"))
    try:
        recipient = DSNRecipient(
            final_recipient=f"rfc822;{_text(final)}",
            action=ACTIONS[nums[0] % len(ACTIONS)],
            status=f"{(2, 4, 5)[nums[1] % 3]}.{nums[2] % 8}.{nums[3]}",
            original_recipient=f"rfc822;{_text(orcpt)}" if orcpt else None,
            remote_mta=f"dns;{_text(remote)}" if remote else None,
            diagnostic_code=f"smtp;{_text(diag)}" if diag else None,
            last_attempt_date=date if nums[8] & 1 else None,
            will_retry_until=date + 86400 if nums[8] & 2 else None,
        )
        report = DSNReport(
            reporting_mta=f"dns;{_text(mta) or 'mx.example'}",
            recipients=(recipient,) * (1 + nums[9] % 3),
            original_envelope_id=_text(envid) or None,
            arrival_date=date if nums[8] & 4 else None,
        )
        content = render_dsn(
            report, to="sender@example.org", hostname="mx.example", date=date,
            kind=KINDS[nums[10] % 3], returned=returned or None, headers_only=bool(nums[11] & 1),
        )  # fmt: skip
    except ValueError:
        return None  # the builders' documented error for a malformed field
    return report, content


def mutate(content: bytes, ops: bytes) -> bytes:
    data = bytearray(content)
    for i in range(0, min(len(ops), 300) - 2, 3):
        if len(data) > 1 << 16:
            break  # duplicating lines doubles a line-less message: keep inputs small
        op, pos = ops[i] % 4, int.from_bytes(ops[i + 1 : i + 3], "big") % max(len(data), 1)
        if op == 0 and data:
            data[pos] ^= 1 << (ops[i] >> 5)
        elif op == 1:
            data[pos:pos] = bytes([ops[i] >> 2])
        elif op == 2:
            del data[pos : pos + 1 + (ops[i] >> 5)]
        else:
            start = data.rfind(b"\n", 0, pos) + 1
            end = data.find(b"\n", pos)
            end = len(data) if end < 0 else end + 1
            data[start:start] = data[start:end]
    return bytes(data)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] & 1:
        parse_any(data[1:])
        return
    pieces = data[1:].split(b"\xff")
    ops = pieces.pop() if len(pieces) > 8 else b""
    built = build(pieces)
    if built is None:
        return
    report, content = built
    assert parse_dsn(content) == report, "a rendered DSN does not parse back"
    assert parse_delivery_status(render_delivery_status(report)) == report
    if ops:
        parse_any(mutate(content, ops))


def main() -> None:
    from _atheris import fuzz  # atheris only for real fuzzing runs

    fuzz(test_one_input)


if __name__ == "__main__":
    main()

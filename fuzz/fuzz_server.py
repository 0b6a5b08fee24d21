"""Fuzz target: the server engine against any byte stream, split anywhere.

    pip install '.[fuzz]'
    python fuzz/fuzz_server.py fuzz/corpus/server -max_total_time=600

``test_one_input`` needs only the stdlib and mailwire, so tests/test_fuzz_corpus.py runs it
over the corpus in the normal test suite.  Invariants checked, beyond "no crash":
  * only RemoteProtocolError escapes next_event(), never an internal error;
  * every reply line is well-formed and at most 512 octets (RFC 5321 4.5.3.1.5);
  * feeding the input whole or in chunks gives the same events and the same replies (the
    content of a message the engine rejects is not compared: it is discarded);
  * the engine's buffer stays bounded (no more than a line limit or a chunk plus one read).
"""

from __future__ import annotations

import re

from mailwire.protocol import (
    AuthCredentials,
    ConnectionClosed,
    Ehlo,
    EndOfMessage,
    Helo,
    Lhlo,
    MailFrom,
    MessageData,
    RcptTo,
    RemoteProtocolError,
    Reply,
    Sentinel,
    ServerConfig,
    ServerConnection,
    ServerEvent,
    Vrfy,
)

REPLY_LINE = re.compile(rb"[2-5]\d\d[ -][^\r\n]*|334 [^\r\n]*")
CONFIGS = [
    ServerConfig(hostname="mx.fuzz", auth_mechanisms=("PLAIN", "LOGIN"), auth_requires_tls=False,
                 starttls=True, max_message_size=4096, max_chunk_size=1024, max_bad_commands=50),
    ServerConfig(hostname="lmtp.fuzz", lmtp=True, max_chunk_size=1024),
]  # fmt: skip


def _answer(event: ServerEvent, conn: ServerConnection) -> None:
    match event:
        case Ehlo() | Helo() | Lhlo() | MailFrom() | RcptTo():
            conn.send(Reply(code=250, text="ok"))
        case Vrfy():
            conn.send(Reply(code=252, text="maybe"))
        case AuthCredentials():
            conn.send(Reply(code=535, text="no"))
        case EndOfMessage():
            for _ in range(len(conn.envelope.recipients) if conn.config.lmtp else 1):
                conn.send(Reply(code=250, text="stored"))


def run(chunks: list[bytes], config: ServerConfig) -> tuple[list[object], bytes]:
    conn = ServerConnection(config)
    conn.send(Reply(code=220, text="fuzz"))
    events: list[object] = []
    out = bytearray(conn.data_to_send())
    bound = config.command_line_limit + config.max_chunk_size + max(map(len, chunks), default=0)
    for chunk in [*chunks, None]:
        if chunk is None:
            conn.receive_eof()
        else:
            conn.receive_data(chunk)
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                if str(exc).startswith("internal error"):
                    raise
                events.append("error")
                out += conn.data_to_send()
                return _completed(events), bytes(out)
            if isinstance(event, Sentinel):
                break
            if isinstance(event, MessageData) and events and isinstance(events[-1], MessageData):
                events[-1] = MessageData(data=events[-1].data + event.data)
            else:
                events.append(event)
            if isinstance(event, ConnectionClosed):
                break
            if conn.owes_reply:
                _answer(event, conn)
        assert len(conn._buf) - conn._pos <= bound, "engine buffer grew without bound"
        out += conn.data_to_send()
    return _completed(events), bytes(out)


def _completed(events: list[object]) -> list[object]:
    """Drop the content of messages that did not end with EndOfMessage.

    How much of a doomed message (rejected at its end, or cut off by EOF) was streamed before
    the engine knew depends on the reads; that content is discarded, so it is not compared.
    """
    return [
        e
        for i, e in enumerate(events)
        if not isinstance(e, MessageData)
        or (i + 1 < len(events) and isinstance(events[i + 1], EndOfMessage))
    ]


def check_replies(out: bytes) -> None:
    lines = out.split(b"\r\n")
    assert lines[-1] == b"", "output does not end with CRLF"
    for line in lines[:-1]:
        assert REPLY_LINE.fullmatch(line), line
        assert len(line) + 2 <= 512, len(line)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    size = data[0] % 64 + 1
    body = data[1:]
    config = CONFIGS[data[0] % len(CONFIGS)]
    whole = run([body], config)
    pieces = run([body[i : i + size] for i in range(0, len(body), size)], config)
    check_replies(whole[1])
    assert whole == pieces, "chunking changed the outcome"


def main() -> None:
    from _atheris import fuzz  # atheris only for real fuzzing runs

    fuzz(test_one_input)


if __name__ == "__main__":
    main()

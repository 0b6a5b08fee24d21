"""Hypothesis properties of the server engine: chunking invariance, hostile bytes, round trips,
and a stateful model of the session."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mailwire.protocol import (
    AuthCredentials,
    ConnectionClosed,
    Ehlo,
    EndOfMessage,
    Helo,
    LineEndings,
    MailFrom,
    MessageData,
    RcptTo,
    RemoteProtocolError,
    Reply,
    Sentinel,
    ServerConfig,
    ServerConnection,
    ServerEvent,
    SessionState,
    Vrfy,
)
from mailwire.protocol._writers import dot_stuff

REPLY_LINE = re.compile(rb"[2-5]\d\d[ -][^\r\n]*")


def accept(event: ServerEvent) -> Reply | None:
    match event:
        case Ehlo() | Helo() | MailFrom() | RcptTo() | EndOfMessage():
            return Reply(code=250, text="ok")
        case Vrfy():
            return Reply(code=252, text="maybe")
        case AuthCredentials():
            return Reply(code=535, text="no")
    return None


def run(chunks: list[bytes], config: ServerConfig) -> tuple[list[ServerEvent], bytes]:
    """Feed chunks (then EOF), accepting every decision; merge adjacent MessageData."""
    conn = ServerConnection(config)
    conn.send(Reply(code=220, text="hi"))
    events: list[ServerEvent] = []
    chunks = [*chunks, b""]
    for i, chunk in enumerate(chunks):
        if i == len(chunks) - 1:
            conn.receive_eof()
        else:
            conn.receive_data(chunk)
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                assert not str(exc).startswith("internal error"), exc
                return events, conn.data_to_send()
            if isinstance(event, Sentinel):
                break
            if isinstance(event, MessageData) and events and isinstance(events[-1], MessageData):
                events[-1] = MessageData(data=events[-1].data + event.data)
            else:
                events.append(event)
            if isinstance(event, ConnectionClosed):
                return events, conn.data_to_send()
            reply = accept(event)
            if conn.owes_reply and reply is not None:
                conn.send(reply)
            elif conn.owes_reply:
                return events, conn.data_to_send()
    return events, conn.data_to_send()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return [p for p in pieces if p]


body_lines = st.lists(
    st.sampled_from([b"", b".", b"..", b".x", b"hello", b"a" * 80, b"\xff\x00", b". "]),
    max_size=12,
)


@st.composite
def sessions(draw: st.DrawFn) -> bytes:
    """A valid session transcript, with pipelining and arbitrary bodies."""
    out = [b"EHLO client.example\r\n"]
    for _ in range(draw(st.integers(0, 3))):
        rcpts = draw(st.integers(1, 3))
        out.append(b"MAIL FROM:<a@b.example>\r\n")
        out.extend(b"RCPT TO:<r%d@c.example>\r\n" % i for i in range(rcpts))
        lines = draw(body_lines)
        out.append(b"DATA\r\n" + dot_stuff(b"".join(line + b"\r\n" for line in lines), True))
        out.append(b".\r\n")
        out.append(draw(st.sampled_from([b"NOOP\r\n", b"RSET\r\n", b"", b"HELP\r\n"])))
    out.append(b"QUIT\r\n")
    return b"".join(out)


CONFIG = ServerConfig(hostname="mx.example")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=sessions(), cuts=st.lists(st.integers(0, 4000), max_size=30))
def test_events_do_not_depend_on_how_bytes_are_split(data: bytes, cuts: list[int]) -> None:
    whole = run([data], CONFIG)
    pieces = run(split(data, cuts), CONFIG)
    assert pieces == whole
    assert isinstance(whole[0][-1], ConnectionClosed)


@settings(max_examples=300)
@given(body=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3100), max_size=10))
def test_dot_stuffing_round_trips_any_crlf_body(body: bytes, cuts: list[int]) -> None:
    body = body.replace(b"\r", b"").replace(b"\n", b"\r\n")
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    wire = (
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
        + dot_stuff(body, True)
        + b".\r\n"
    )
    config = ServerConfig(max_line_length=None, max_chunk_size=1024)
    events, _ = run(split(wire, cuts), config)
    received = b"".join(e.data for e in events if isinstance(e, MessageData))
    assert received == body
    assert EndOfMessage() in events


VERBS = [b"HELO", b"EHLO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"BDAT", b"RSET", b"NOOP",
         b"QUIT", b"VRFY", b"EXPN", b"HELP", b"STARTTLS", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN",
         b"LHLO", b"", b".", b"GET"]  # fmt: skip


@st.composite
def hostile_lines(draw: st.DrawFn) -> bytes:
    verb = draw(st.sampled_from(VERBS))
    sep = draw(st.sampled_from([b" ", b"", b"  ", b":", b"\t"]))
    arg = draw(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from(
                [
                    b"<a@b.example>",
                    b"<>",
                    b"<\xc3\xa9@x.example> SMTPUTF8",
                    b"<a@b.example> SIZE=99999999999",
                    b"100 LAST",
                    b"5",
                    b"=",
                    b"AGFsaWNlAHNlY3JldA==",
                ]
            ),  # fmt: skip
        )
    )
    end = draw(st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\r\n.\r\n"]))
    return verb + sep + arg + end


@settings(max_examples=500)
@given(lines=st.lists(hostile_lines(), max_size=25), cuts=st.lists(st.integers(0, 600)))
def test_hostile_bytes_get_replies_and_never_crash(lines: list[bytes], cuts: list[int]) -> None:
    config = ServerConfig(
        hostname="mx.example", auth_mechanisms=("PLAIN", "LOGIN"), auth_requires_tls=False,
        starttls=True, max_bad_commands=10,
    )  # fmt: skip
    _, out = run(split(b"".join(lines), cuts), config)
    for line in out.split(b"\r\n")[:-1]:
        assert REPLY_LINE.fullmatch(line) or line.startswith(b"334"), line
        assert len(line) + 2 <= 512


@settings(max_examples=200)
@given(data=st.binary(max_size=2000), policy=st.sampled_from(list(LineEndings)))
def test_any_bytes_in_data_never_crash_and_end_only_at_crlf_dot_crlf(
    data: bytes, policy: LineEndings
) -> None:
    prefix = b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
    events, _ = run([prefix + data], ServerConfig(line_endings=policy))
    ended = any(isinstance(e, EndOfMessage) for e in events) or any(
        type(e).__name__ == "MessageRejected" for e in events
    )
    assert ended == (b"\r\n.\r\n" in b"\r\n" + data)


class SessionModel(RuleBasedStateMachine):
    """Random command sequences, accepted or rejected at random, each fed in random pieces.

    Invariants: the engine's state equals the model's; every command gets exactly one
    final reply, whose class is the one the model predicts.
    """

    def __init__(self) -> None:
        super().__init__()
        config = ServerConfig(hostname="mx.example", max_bad_commands=1000, starttls=True)
        self.conn = ServerConnection(config)
        self.conn.send(Reply(code=220, text="hi"))
        self.conn.data_to_send()
        self.state = SessionState.HELLO
        self.rcpts = 0
        self.sender = False
        self.tls = False

    @initialize()
    def start(self) -> None:
        pass

    def exchange(self, line: bytes, decision: int | None, cuts: list[int]) -> int:
        for piece in split(line, cuts):
            self.conn.receive_data(piece)
        replies = 0
        while not isinstance(event := self.conn.next_event(), Sentinel):
            if self.conn.owes_reply:
                assert decision is not None, event
                self.conn.send(Reply(code=decision, text="decided"))
        out = self.conn.data_to_send()
        finals = [ln for ln in out.split(b"\r\n") if ln[3:4] == b" "]
        replies = len(finals)
        assert replies == 1, out
        return int(finals[0][:3])

    @rule(ok=st.booleans(), cuts=st.lists(st.integers(0, 30), max_size=3))
    def ehlo(self, ok: bool, cuts: list[int]) -> None:
        code = self.exchange(b"EHLO c.example\r\n", 250 if ok else 550, cuts)
        assert code == (250 if ok else 550)
        if ok:
            self.state, self.rcpts, self.sender = SessionState.READY, 0, False

    @rule(ok=st.booleans(), cuts=st.lists(st.integers(0, 40), max_size=3))
    def mail(self, ok: bool, cuts: list[int]) -> None:
        code = self.exchange(b"MAIL FROM:<a@b.example>\r\n", 250 if ok else 550, cuts)
        if self.state is SessionState.READY:
            assert code == (250 if ok else 550)
            if ok:
                self.state, self.sender = SessionState.MAIL, True
        else:
            assert code == 503

    @rule(ok=st.booleans(), cuts=st.lists(st.integers(0, 40), max_size=3))
    def rcpt(self, ok: bool, cuts: list[int]) -> None:
        code = self.exchange(b"RCPT TO:<c@d.example>\r\n", 250 if ok else 550, cuts)
        if self.state in (SessionState.MAIL, SessionState.RCPT):
            assert code == (250 if ok else 550)
            if ok:
                self.state, self.rcpts = SessionState.RCPT, self.rcpts + 1
        else:
            assert code == 503

    @precondition(lambda self: self.state is SessionState.RCPT)
    @rule(ok=st.booleans(), body=body_lines, cuts=st.lists(st.integers(0, 200), max_size=5))
    def data(self, ok: bool, body: list[bytes], cuts: list[int]) -> None:
        assert self.exchange(b"DATA\r\n", None, []) == 354
        assert self.conn.state is SessionState.DATA
        text = dot_stuff(b"".join(line + b"\r\n" for line in body), True) + b".\r\n"
        assert self.exchange(text, 250 if ok else 451, cuts) == (250 if ok else 451)
        self.state, self.rcpts, self.sender = SessionState.READY, 0, False

    @rule(cuts=st.lists(st.integers(0, 10), max_size=2))
    def rset(self, cuts: list[int]) -> None:
        assert self.exchange(b"RSET\r\n", None, cuts) == 250
        if self.state is not SessionState.HELLO:
            self.state = SessionState.READY
        self.rcpts, self.sender = 0, False

    @rule(pipelined=st.booleans())
    def starttls(self, pipelined: bool) -> None:
        # anything pipelined after STARTTLS is discarded (CVE-2011-0411), never answered
        will_switch = self.state is SessionState.READY and not self.tls
        extra = b"MAIL FROM:<evil@x.example>\r\n" if pipelined and will_switch else b""
        code = self.exchange(b"STARTTLS\r\n" + extra, None, [])
        if self.tls:
            assert code == 503
        elif self.state is SessionState.READY:
            assert code == 220
            self.conn.tls_established()
            self.state, self.tls, self.rcpts, self.sender = SessionState.HELLO, True, 0, False
        else:
            assert code == 503

    @rule(line=st.sampled_from([b"NOOP\r\n", b"HELP\r\n", b"BOGUS\r\n", b"DATA x\r\n"]))
    def other(self, line: bytes) -> None:
        code = self.exchange(line, None, [])
        expected = {b"NOOP\r\n": 250, b"HELP\r\n": 214, b"BOGUS\r\n": 500, b"DATA x\r\n": 501}
        assert code == expected[line]

    @invariant()
    def states_agree(self) -> None:
        assert self.conn.state is self.state
        assert self.conn.tls_active is self.tls

    @invariant()
    def no_envelope_leaks(self) -> None:
        envelope = self.conn.envelope
        assert (envelope.sender is not None) is self.sender
        assert len(envelope.recipients) == self.rcpts


TestSessionModel = SessionModel.TestCase
TestSessionModel.settings = settings(max_examples=150, stateful_step_count=25, deadline=None)

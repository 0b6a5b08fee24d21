"""Fuzz target: the client engine against any server reply stream, split anywhere.

    pip install '.[fuzz]'
    python fuzz/fuzz_client.py fuzz/corpus/client -max_total_time=600

Input: byte 0 = chunk size (low 6 bits) and LMTP (bit 6); byte 1 = what the scripted client
tries (STARTTLS, AUTH, BDAT, pipelining, recipient count, RSET/NOOP/VRFY, QUIT); byte 2 = the
ENVID length and byte 3 its character (the application's input, to probe the line limits);
the rest is what the "server" sends.  The client acts the way an application does: after
every event it sends what its script says next (pipelining when the server offers it), answers
334 challenges, and falls back to HELO after a refused EHLO.  Invariants, beyond "no crash":
  * next_event() raises only RemoteProtocolError, send() only LocalProtocolError; a refused
    send() changes nothing (state, pending commands, output);
  * every reply is well-formed (code 200-599, no CR/NUL in its text) and answers a command
    this client sent, in the order sent (RFC 5321 4.2, RFC 2920 3.1);
  * every command line the client writes is within the line limits (RFC 5321 4.5.3.1.4;
    MAIL/RCPT with the extension allowances; AUTH: RFC 4954 4) and is read back, by the
    server engine's own parser, as the very command the application gave;
  * the states stay consistent: after ConnectionClosed the session is CLOSED with nothing
    pending and stays closed; after RemoteProtocolError it is ERROR and stays there; nothing
    can be sent after either; the receive buffer stays bounded;
  * feeding the replies whole or in chunks gives the same events and the same bytes sent (up
    to STARTTLS, where what arrives before the handshake legitimately depends on the reads).
"""

from __future__ import annotations

from collections.abc import Callable

from mailwire.protocol._client import ClientConnection, LoginAuth, PlainAuth, SaslMechanism
from mailwire.protocol._config import MAX_AUTH_LINE, MAX_COMMAND_LINE, ClientConfig, ServerConfig
from mailwire.protocol._errors import LocalProtocolError, RemoteProtocolError
from mailwire.protocol._events import (
    NEED_DATA,
    PAUSED,
    Auth,
    AuthResponse,
    Bdat,
    Command,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfMessage,
    Helo,
    Lhlo,
    MailFrom,
    MessageData,
    Noop,
    Quit,
    RcptTo,
    Reply,
    Rset,
    StartTLS,
    TLSEstablished,
    Vrfy,
)
from mailwire.protocol._grammar import GrammarError
from mailwire.protocol._readers import VERBS, decode_line, split_verb
from mailwire.protocol._state import SessionState
from mailwire.protocol._writers import command_bytes

S = SessionState
CONFIGS = {
    lmtp: ClientConfig(local_hostname="client.fuzz", lmtp=lmtp, allow_plaintext_auth=True,
                       max_reply_lines=64)
    for lmtp in (False, True)
}  # fmt: skip
# The server engine's parser, with everything on, reads back what the client wrote.
READER = ServerConfig(hostname="mx.fuzz", max_message_size=0, auth_mechanisms=("PLAIN", "LOGIN"),
                      auth_requires_tls=False, dsn=True, smtputf8=True)  # fmt: skip
MAIL_LIMIT = ServerConfig(hostname="mx.fuzz").command_line_limit  # 512 + extension allowances
ENVID_CHARS = "xé+\x01"
NAME = "client.fuzz"
BODY = b"From: alice@client.example\r\nSubject: fuzz\r\n\r\n.leading dot\r\nbare\nlf\r\n"
BDAT = Bdat(size=len(BODY), last=True)
Step = Callable[[ClientConnection], "Command | MessageData | EndOfMessage | None"]


class Script:
    """What the application tries, in order; built from the input's header bytes."""

    def __init__(self, flags: int, envid: str | None) -> None:
        self.flags = flags
        self.envid = envid
        self.steps: list[tuple[bool, Step]] = []  # (may be pipelined, step)
        self.index = 0
        self.sasl: SaslMechanism | None = None
        self.bdat_sent = False
        add = self.steps.append
        add((False, lambda c: Lhlo(domain=NAME) if c.config.lmtp else Ehlo(domain=NAME)))
        add((False, lambda c: Helo(domain=NAME) if c.ehlo_rejected else None))
        if flags & 1:
            add((False, lambda c: StartTLS() if c.has_extension("STARTTLS") else None))
            add((False, lambda c: Ehlo(domain=NAME) if c.tls_active and not c.esmtp else None))
        if flags & 2:
            add((False, self._auth))
        add((False, self._mail))
        for i in range(1 + (flags >> 4 & 3)):
            add((True, lambda c, i=i: self._rcpt(c, i)))  # type: ignore[misc]
        if flags & 4:
            add((True, lambda c: BDAT if c.has_extension("CHUNKING") else None))
            add((True, lambda c: MessageData(data=BODY) if c.bdat_remaining else None))
        add((True, lambda c: None if self.bdat_sent else Data()))
        add((False, lambda c: MessageData(data=BODY) if c.state is S.DATA else None))
        add((False, lambda c: EndOfMessage() if c.state is S.DATA else None))
        if flags & 64:
            add((False, lambda c: Rset()))
            add((False, lambda c: Noop()))
            add((False, lambda c: Vrfy(argument="postmaster")))
        if flags & 128:
            add((False, lambda c: Quit()))

    def _auth(self, conn: ClientConnection) -> Auth | None:
        mechanisms = conn.auth_mechanisms
        if "PLAIN" in mechanisms and not self.flags & 8:
            self.sasl = PlainAuth(username="user", password="secret")
        elif "LOGIN" in mechanisms:
            self.sasl = LoginAuth(username="user", password="secret")
        else:
            return None
        return self.sasl.start()

    def _mail(self, conn: ClientConnection) -> MailFrom:
        params: dict[str, object] = {}
        if conn.has_extension("SIZE"):
            params["size"] = len(BODY)
        if conn.has_extension("8BITMIME"):
            params["body"] = "8BITMIME"
        if conn.has_extension("DSN"):
            params["ret"] = "HDRS"
            if self.envid:
                params["envid"] = self.envid
        if conn.has_extension("SMTPUTF8") and self.flags & 8:
            params["smtputf8"] = True
        return MailFrom(address="alice@client.example", **params)  # type: ignore[arg-type]

    def _rcpt(self, conn: ClientConnection, i: int) -> RcptTo:
        if conn.has_extension("DSN"):
            return RcptTo(address=f"rcpt{i}@mx.example", notify=("FAILURE", "DELAY"),
                          orcpt=f"rfc822;rcpt{i}@mx.example")  # fmt: skip
        return RcptTo(address=f"rcpt{i}@mx.example")


class Run:
    def __init__(self, config: ClientConfig, script: Script) -> None:
        self.conn = ClientConnection(config, now=0.0)
        self.script = script
        self.log: list[object] = []
        self.sent: list[Command | AuthResponse] = []
        self.answered = 0  # index in self.sent of the command answered last
        self.utf8 = False

    def snapshot(self) -> tuple[object, ...]:
        c = self.conn
        return (c.state, c.pending, c._predicted, len(c._out), c.bdat_remaining, c._sender)

    def try_send(self, event: Command | MessageData | EndOfMessage) -> bool:
        before = self.snapshot()
        try:
            self.conn.send(event)
        except LocalProtocolError:
            assert self.snapshot() == before, "a refused send() changed the engine"
            return False
        out = self.conn.data_to_send()
        self.log.append(("sent", out))
        if isinstance(event, (MessageData, EndOfMessage)):
            return True
        if isinstance(event, AuthResponse):
            assert len(out) <= MAX_AUTH_LINE, len(out)
            assert out == f"{event.data}\r\n".encode(), out
            self.sent.append(event)
            return True
        self.check_command_line(event, out)
        self.sent.append(event)
        self.script.bdat_sent |= isinstance(event, Bdat)
        if isinstance(event, MailFrom):
            self.utf8 = event.smtputf8
        if isinstance(event, StartTLS):
            self.log.append("STARTTLS")  # the end of the chunking-invariant part
        return True

    def check_command_line(self, command: Command, out: bytes) -> None:
        if isinstance(command, Auth):
            limit = MAX_AUTH_LINE  # RFC 4954 4
        elif isinstance(command, (MailFrom, RcptTo)):
            limit = MAIL_LIMIT
        else:
            limit = MAX_COMMAND_LINE  # RFC 5321 4.5.3.1.4
        assert out.endswith(b"\r\n") and len(out) <= limit, f"line over the limit: {out!r}"
        assert out == command_bytes(command), out
        verb, arg = split_verb(out[:-2])
        try:
            again = VERBS[verb](decode_line(arg), READER, self.utf8)
        except GrammarError as exc:
            raise AssertionError(f"a mailwire server refuses {out!r}: {exc}") from None
        assert again == command, f"the server reads {out!r} as {again!r}, not {command!r}"

    def act(self, event: object) -> None:
        """After an event: answer a challenge, finish STARTTLS, or run the script on."""
        conn, script = self.conn, self.script
        if isinstance(event, Reply) and event.code == 334 and script.sasl is not None:
            if isinstance(event.command, (Auth, AuthResponse)):
                try:
                    response = script.sasl.respond(event)
                except LocalProtocolError:  # pragma: no cover - only for non-334
                    raise AssertionError("respond() refused a 334") from None
                self.try_send(response)
                return
        if conn.state is S.STARTTLS:
            conn.tls_established()
            return
        while script.index < len(script.steps):
            pipelined, step = script.steps[script.index]
            if conn.pending and not (pipelined and conn.has_extension("PIPELINING")):
                return  # wait for the replies first
            choice = step(conn)
            if choice is not None and not self.try_send(choice) and conn.pending:
                return  # not now: try again after the next reply
            script.index += 1

    def check_event(self, event: object) -> None:
        conn = self.conn
        assert isinstance(conn.state, SessionState)
        assert conn.state is not S.GREETING or not conn.pending
        deadline = conn.deadline
        assert deadline is None or deadline >= 0.0
        if isinstance(event, Reply):
            assert 200 <= event.code <= 599, event
            assert "\r" not in event.text and "\x00" not in event.text, event
            command = event.command
            if command is not None:
                index = next(i for i in range(len(self.sent)) if self.sent[i] is command)
                assert index >= self.answered, "replies out of order"
                self.answered = index
            self.log.append(("reply", event.code, event.text, type(command).__name__))
        elif isinstance(event, ConnectionClosed):
            assert conn.state is S.CLOSED and not conn.pending, conn.state
            assert conn.next_event() is PAUSED  # reported once, as on the server
            self.log.append("closed")
        elif isinstance(event, TLSEstablished):
            self.log.append("tls")
        else:
            raise AssertionError(f"unexpected event {event!r}")

    def check_error(self) -> None:
        conn = self.conn
        assert conn.state is S.ERROR, conn.state
        try:
            conn.next_event()
        except RemoteProtocolError:
            pass
        else:
            raise AssertionError("next_event() after an error did not raise")
        self.log.append("error")

    def check_ended(self) -> None:
        before = self.snapshot()
        try:
            self.conn.send(Noop())
        except LocalProtocolError:
            assert self.snapshot() == before
        else:
            raise AssertionError("send() accepted a command after the session ended")

    def feed(self, chunks: list[bytes]) -> list[object]:
        conn = self.conn
        for n, chunk in enumerate([*chunks, None]):
            if chunk is None:
                conn.receive_eof()
            else:
                conn.receive_data(chunk, now=float(n))
            while True:
                try:
                    event = conn.next_event()
                except RemoteProtocolError:
                    self.check_error()
                    self.check_ended()
                    return self.log
                if event is NEED_DATA or event is PAUSED:
                    # no complete line is left, and an unfinished one is bounded
                    assert len(conn._buf) <= conn.config.max_reply_line, "buffer unbounded"
                    break
                self.check_event(event)
                if isinstance(event, ConnectionClosed):
                    self.check_ended()
                    return self.log
                self.act(event)
        raise AssertionError("EOF did not end the session")


def _prefix(log: list[object]) -> list[object]:
    return log[: log.index("STARTTLS")] if "STARTTLS" in log else log


def test_one_input(data: bytes) -> None:
    if len(data) < 4:
        return
    size = data[0] % 64 + 1
    config = CONFIGS[bool(data[0] & 64)]
    envid = ENVID_CHARS[data[3] % len(ENVID_CHARS)] * data[2] or None
    stream = data[4:]
    whole = Run(config, Script(data[1], envid)).feed([stream])
    pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
    chunked = Run(config, Script(data[1], envid)).feed(pieces)
    assert _prefix(whole) == _prefix(chunked), "chunking changed the outcome"


def main() -> None:
    from _atheris import fuzz  # atheris only for real fuzzing runs

    fuzz(test_one_input)


if __name__ == "__main__":
    main()

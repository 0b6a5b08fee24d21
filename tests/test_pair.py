"""The client engine against the real server engine, in memory, with every transfer cut at
random points by hypothesis (tests/helpers.py: ConnectionPair).

Invariants checked:
  * the server yields exactly the events the client application sent (same classes both
    ways; DATA content after CRLF normalisation and a final CRLF);
  * the body round-trips byte for byte through stuffing and un-stuffing, for arbitrary bytes;
  * whenever no bytes are in flight and the server owes no reply, both states are equal and
    the client has nothing pending;
  * every reply reaches the client correlated with the command it answers.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from helpers import (
    ConnectionPair,
    expected_server_view,
    merge_data,
    normalize_body,
    random_splitter,
)
from hypothesis import event as note_event
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mailwire.protocol._client import LoginAuth, PlainAuth
from mailwire.protocol._config import ClientConfig, ServerConfig
from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._events import (
    AuthCredentials,
    Bdat,
    Command,
    CommandRejected,
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
    ServerEvent,
    StartTLS,
    TLSEstablished,
    Vrfy,
)
from mailwire.protocol._server import ServerConnection
from mailwire.protocol._state import SessionState
from mailwire.protocol._transaction import MailTransaction

S = SessionState
SERVER = ServerConfig(
    hostname="mx.example",
    max_line_length=None,
    starttls=True,
    auth_mechanisms=("PLAIN", "LOGIN"),
    max_message_size=0,
)
CLIENT = ClientConfig(local_hostname="client.example", allow_plaintext_auth=True)
SENDER = MailFrom(address="alice@client.example", body="8BITMIME")


def pair_for(rng: random.Random) -> ConnectionPair:
    pair = ConnectionPair(client_config=CLIENT, server_config=SERVER, split=random_splitter(rng))
    pair.run()
    return pair


def assert_in_step(pair: ConnectionPair) -> None:
    if not pair.server.owes_reply:
        assert pair.client.state is pair.server.state
        assert not pair.client.pending


@settings(max_examples=60, deadline=None)
@given(rng=st.randoms(use_true_random=False), body=st.lists(st.binary(max_size=300), max_size=6))
def test_a_whole_session_arrives_as_sent(rng: random.Random, body: list[bytes]) -> None:
    pair = pair_for(rng)
    pair.send(Ehlo(domain="client.example"))
    pair.run()
    assert_in_step(pair)
    # a pipelined DATA transaction
    pair.send(SENDER, RcptTo(address="bob@mx.example"), RcptTo(address="carol@mx.example"))
    pair.send(Data())
    replies = pair.run()
    assert [r.code for r in replies if isinstance(r, Reply)] == [250, 250, 250, 354]
    for chunk in body:
        pair.send(MessageData(data=chunk))
    pair.send(EndOfMessage())
    pair.run()
    assert_in_step(pair)
    # a BDAT transaction, binary content
    pair.send(MailFrom(address="alice@client.example", body="BINARYMIME"))
    pair.send(RcptTo(address="bob@mx.example"))
    raw = b"".join(body)
    pair.send(Bdat(size=len(raw)), MessageData(data=raw), Bdat(size=0, last=True))
    pair.run()
    assert_in_step(pair)
    pair.send(
        Noop(),
    )
    pair.run()
    pair.send(Rset())
    pair.run()
    pair.send(Quit())
    pair.run()
    assert pair.client.state is S.CLOSED and pair.server.state is S.CLOSED
    seen = [e for e in pair.server_events if not isinstance(e, ConnectionClosed)]
    assert merge_data(seen) == expected_server_view(pair.sent)
    every = [e for e in pair.client_events if isinstance(e, Reply)]
    answered = [r.command for r in every[1:]]  # the greeting answers nothing
    assert all(c is not None for c in answered)


@settings(max_examples=150, deadline=None)
@given(
    rng=st.randoms(use_true_random=False),
    chunks=st.lists(st.binary(max_size=200), max_size=8),
    bdat=st.booleans(),
)
def test_body_round_trips_byte_for_byte(
    rng: random.Random, chunks: list[bytes], bdat: bool
) -> None:
    pair = pair_for(rng)
    pair.send(Ehlo(domain="client.example"))
    pair.run()
    sender = MailFrom(address="alice@client.example", body="BINARYMIME" if bdat else "8BITMIME")
    tx = MailTransaction(
        pair.client,
        sender=sender,
        recipients=[RcptTo(address="bob@mx.example")],
        body=chunks,
        use_bdat=bdat,
    )
    drive(pair, tx)
    assert tx.result.ok, tx.result
    got = b"".join(e.data for e in pair.server_events if isinstance(e, MessageData))
    raw = b"".join(chunks)
    assert got == (raw if bdat else normalize_body(raw))
    assert_in_step(pair)


def drive(pair: ConnectionPair, tx: MailTransaction) -> None:
    """The adapters' loop, with the server engine as the peer."""
    while not tx.done:
        out = tx.data_to_send()
        if out:
            for piece in pair.split(out):
                pair.server.receive_data(piece)
                pair._drain_server()
            continue
        pair._drain_server()
        data = pair.server.data_to_send()
        assert data, "deadlock: nothing to send either way"
        for piece in pair.split(data):
            tx.receive_data(piece)


@settings(max_examples=40, deadline=None)
@given(rng=st.randoms(use_true_random=False))
def test_starttls_and_auth_through_the_server_engine(rng: random.Random) -> None:
    pair = pair_for(rng)
    pair.send(Ehlo(domain="client.example"))
    pair.run()
    assert pair.client.has_extension("STARTTLS")
    pair.send(StartTLS())
    pair.run()
    assert pair.client.state is S.STARTTLS and pair.server.state is S.STARTTLS
    pair.starttls()
    assert pair.run() == [TLSEstablished()]
    pair.send(Ehlo(domain="client.example"))
    pair.run()
    assert pair.client.auth_mechanisms == {"PLAIN", "LOGIN"}
    sasl = LoginAuth(username="alice", password="pw")
    pair.send(sasl.start())
    for _ in range(2):
        [challenge] = pair.run()
        assert isinstance(challenge, Reply) and challenge.code == 334
        pair.client.send(sasl.respond(challenge))
    [done] = pair.run()
    assert isinstance(done, Reply) and done.code == 235 and pair.client.authenticated
    creds = [e for e in pair.server_events if isinstance(e, AuthCredentials)]
    assert creds == [
        AuthCredentials(mechanism="LOGIN", authorization_id="", username="alice", password="pw")
    ]
    assert_in_step(pair)


def test_auth_plain_reaches_the_server_as_credentials() -> None:
    pair = ConnectionPair(
        client_config=CLIENT, server_config=replace(SERVER, auth_requires_tls=False)
    )
    pair.run()
    pair.send(Ehlo(domain="client.example"))
    pair.run()
    pair.send(PlainAuth(username="bob", password="pw", authzid="admin").start())
    pair.run()
    assert pair.server_events[-1] == AuthCredentials(
        mechanism="PLAIN", authorization_id="admin", username="bob", password="pw"
    )
    assert pair.client.authenticated


@settings(max_examples=40, deadline=None)
@given(
    rng=st.randoms(use_true_random=False),
    accept=st.lists(st.booleans(), min_size=1, max_size=5),
    bdat=st.booleans(),
)
def test_lmtp_per_recipient_replies_through_the_server_engine(
    rng: random.Random, accept: list[bool], bdat: bool
) -> None:
    answers = iter(range(1000))

    def app(server: ServerConnection, event: ServerEvent) -> Reply | None:
        if isinstance(event, RcptTo):
            return Reply(code=250 if accept[int(event.address[1:].split("@")[0])] else 550)
        if isinstance(event, EndOfMessage):
            return Reply(code=250, text=f"2.0.0 delivered {next(answers)}")
        return Reply(code=250, text="lmtp.example")

    pair = ConnectionPair(
        client_config=ClientConfig(lmtp=True),
        server_config=ServerConfig(hostname="lmtp.example", lmtp=True),
        server_app=app,
        split=random_splitter(rng),
    )
    pair.run()
    pair.send(Lhlo(domain="client.example"))
    pair.run()
    rcpts = [RcptTo(address=f"u{i}@mx.example") for i in range(len(accept))]
    tx = MailTransaction(
        pair.client, sender=MailFrom(address="a@client.example"), recipients=rcpts,
        body=[b"hello\n"], use_bdat=bdat,
    )  # fmt: skip
    drive(pair, tx)
    result = tx.result
    assert [r.accepted for r in result.recipients] == accept
    finals = [r.final.text for r in result.recipients if r.final is not None]
    assert finals == [f"2.0.0 delivered {i}" for i in range(sum(accept))]
    assert result.delivered == tuple(r for r, ok in zip(rcpts, accept, strict=True) if ok)
    assert pair.client.state is S.READY and pair.server.state is S.READY


# --- the pair machine ---------------------------------------------------------------------------

ADDRESSES = st.sampled_from(["bob@mx.example", "carol@mx.example", "Postmaster"])
ENVELOPE: st.SearchStrategy[list[Command]] = st.tuples(
    st.builds(MailFrom, address=st.just("alice@client.example"), body=st.just("8BITMIME")),
    st.lists(st.builds(RcptTo, address=ADDRESSES), min_size=1, max_size=3),
    st.lists(st.builds(Data), max_size=1),
).map(lambda t: [t[0], *t[1], *t[2]])
COMMANDS: st.SearchStrategy[Command] = st.one_of(
    st.builds(Ehlo, domain=st.just("client.example")),
    st.builds(Helo, domain=st.just("client.example")),
    st.builds(
        MailFrom,
        address=st.sampled_from(["", "alice@client.example"]),
        size=st.none() | st.integers(0, 10**6),
        body=st.none() | st.sampled_from(["7BIT", "8BITMIME"]),
    ),
    st.builds(RcptTo, address=ADDRESSES, notify=st.none() | st.just(("FAILURE",))),
    st.builds(Data),
    st.builds(Rset),
    st.builds(Noop),
    st.builds(Vrfy, argument=st.just("bob")),
    st.builds(StartTLS),
)


def manual(server: ServerConnection, event: ServerEvent) -> Reply | None:
    return None  # the machine's rules make the server application's decisions


class PairMachine(RuleBasedStateMachine):
    """Client-application actions and server-application decisions, in any legal order."""

    pair: ConnectionPair
    first_reply: dict[int, Reply]

    @initialize(rng=st.randoms(use_true_random=False))
    def start(self, rng: random.Random) -> None:
        self.pair = ConnectionPair(
            client_config=CLIENT,
            server_config=SERVER,
            server_app=manual,
            split=random_splitter(rng),
        )
        self.first_reply = {}
        self.pump()
        self.pair.send(Ehlo(domain="client.example"))  # most sessions start this way
        self.pump()
        self.pair.server.send(Reply(code=250, text="mx.example"))
        self.pump()

    def pump(self) -> None:
        self.pair.run()
        note_event(f"client {self.pair.client.state.name}")
        for event in self.pair.client_events:
            if isinstance(event, Reply) and event.command is not None:
                self.first_reply.setdefault(id(event.command), event)

    def client_busy(self) -> bool:
        c = self.pair.client
        return c.state in (S.CLOSED, S.ERROR, S.STARTTLS) or c.bdat_remaining > 0

    @precondition(lambda self: not self.client_busy())
    @rule(commands=st.lists(COMMANDS, min_size=1, max_size=4))
    def client_sends(self, commands: list[Command]) -> None:
        client = self.pair.client
        for command in commands:
            before = (client.pending, client.state)
            try:
                self.pair.send(command)
            except LocalProtocolError:
                assert (client.pending, client.state) == before
                break
        self.pump()

    @precondition(lambda self: not self.client_busy())
    @rule(commands=ENVELOPE)
    def client_pipelines_an_envelope(self, commands: list[Command]) -> None:
        self.client_sends(commands)

    @precondition(lambda self: not self.client_busy())
    @rule(data=st.binary(max_size=50), last=st.booleans())
    def client_sends_bdat(self, data: bytes, last: bool) -> None:
        try:
            self.pair.send(Bdat(size=len(data), last=last))
        except LocalProtocolError:
            return
        if data:
            try:
                self.pair.send(MessageData(data=data))
            except LocalProtocolError:  # 8-bit content the envelope did not declare
                self.pair.send(MessageData(data=b"x" * len(data)))
        self.pump()

    @precondition(lambda self: self.pair.client.state is S.DATA and not self.pair.client.pending)
    @rule(data=st.binary(max_size=80))
    def client_sends_content(self, data: bytes) -> None:
        try:
            self.pair.send(MessageData(data=data))
        except LocalProtocolError:  # 8-bit content the envelope did not declare
            assert not data.isascii()
            self.pair.send(MessageData(data=data.decode("latin-1").encode("ascii", "replace")))
        self.pump()

    @precondition(lambda self: self.pair.client.state is S.DATA and not self.pair.client.pending)
    @rule()
    def client_ends_content(self) -> None:
        self.pair.send(EndOfMessage())
        self.pump()

    @precondition(lambda self: self.pair.client.state in (S.CLOSED, S.ERROR))
    @rule(rng=st.randoms(use_true_random=False))
    def reconnect(self, rng: random.Random) -> None:
        self.start(rng)

    @precondition(lambda self: self.pair.client.state is S.STARTTLS)
    @rule()
    def handshake(self) -> None:
        self.pair.starttls()
        self.pump()

    @precondition(lambda self: self.pair.server.owes_reply)
    @rule(kind=st.sampled_from([2, 2, 2, 2, 4, 5]))
    def server_decides(self, kind: int) -> None:
        server = self.pair.server
        owed = self.pair.server_events[-1]
        if isinstance(owed, RcptTo) and owed.is_postmaster and kind == 5:
            kind = 4
        if isinstance(owed, (Ehlo, Helo)):
            code = {2: 250, 4: 421, 5: 502}[kind]
        elif isinstance(owed, Vrfy):
            code = {2: 252, 4: 450, 5: 550}[kind]
        else:
            code = {2: 250, 4: 451, 5: 550}[kind]
        server.send(Reply(code=code, text="app decision"))
        self.pump()

    @invariant()
    def states_agree_when_nothing_is_in_flight(self) -> None:
        pair = self.pair
        if pair.server.owes_reply:
            return
        if pair.server_error is not None:  # the server gave up on us (too many 503s)
            assert pair.server.state is S.ERROR and pair.client.state in (S.CLOSED, S.ERROR)
            return
        assert pair.client.state is pair.server.state
        assert not pair.client.pending or pair.client.state is S.CLOSED

    @invariant()
    def server_saw_what_the_client_sent(self) -> None:
        # Commands the server engine refused by itself (503, 554 to DATA with no recipient)
        # surface as CommandRejected; take them, and BDAT octets they swallowed, out.
        sent: list[object] = []
        skip_octets = 0
        for event in self.pair.sent:
            if isinstance(event, MessageData) and skip_octets:
                skip_octets -= len(event.data)
                continue
            reply = self.first_reply.get(id(event))
            if reply is not None and reply.code >= 400 and "app decision" not in reply.text:
                if isinstance(event, Bdat):
                    skip_octets = event.size
                continue
            sent.append(event)
        seen = [e for e in self.pair.server_events if not isinstance(e, CommandRejected)]
        expected = expected_server_view(sent)
        got = merge_data(seen)
        if self.pair.client.state is S.DATA or self.pair.client.bdat_remaining:
            return  # content still streaming: compared once it has ended
        # replies to the last commands may still be owed: compare the common prefix
        assert got == expected[: len(got)] or got[: len(expected)] == expected, (got, expected)


PairMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
test_pair_machine = PairMachine.TestCase


@pytest.mark.parametrize("split_seed", range(5))
def test_everything_pipelined_in_one_write_is_answered_in_order(split_seed: int) -> None:
    pair = pair_for(random.Random(split_seed))
    pair.send(Ehlo(domain="client.example"))
    pair.run()
    rcpts = [RcptTo(address=f"user{i}@mx.example") for i in range(50)]
    pair.send(SENDER, *rcpts, Data())
    replies = [r for r in pair.run() if isinstance(r, Reply)]
    assert [r.command for r in replies] == [SENDER, *rcpts, Data()]
    assert pair.client.accepted_recipients == 50


def test_long_plain_credentials_reach_the_server_after_the_empty_challenge() -> None:
    pair = ConnectionPair(
        client_config=CLIENT, server_config=replace(SERVER, auth_requires_tls=False)
    )
    pair.run()
    pair.send(Ehlo(domain="client.example"))
    pair.run()
    sasl = PlainAuth(username="bob", password="p" * 700)
    pair.send(sasl.start())
    [challenge] = pair.run()
    assert isinstance(challenge, Reply) and challenge.code == 334
    pair.client.send(sasl.respond(challenge))
    pair.run()
    assert pair.server_events[-1] == AuthCredentials(
        mechanism="PLAIN", authorization_id="", username="bob", password="p" * 700
    )
    assert pair.client.authenticated
    assert_in_step(pair)

"""Test helpers: a ClientConnection and a ServerConnection joined by an in-memory pipe.

``ConnectionPair`` moves bytes both ways (cut into chunks by an optional ``split`` callable,
which hypothesis drives in the property tests), lets a small server application answer the
server's decisions, and records what each side sent and received, so a test can say "the
server saw exactly what the client sent" in one line.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mailwire.protocol._client import ClientConnection
from mailwire.protocol._config import ClientConfig, ServerConfig
from mailwire.protocol._errors import RemoteProtocolError
from mailwire.protocol._events import (
    NEED_DATA,
    PAUSED,
    AuthCredentials,
    Bdat,
    ClientEvent,
    Ehlo,
    EndOfMessage,
    Helo,
    Lhlo,
    MessageData,
    Reply,
    Sentinel,
    ServerEvent,
    Vrfy,
)
from mailwire.protocol._server import ServerConnection
from mailwire.protocol._state import SessionState

ServerApp = Callable[[ServerConnection, ServerEvent], Reply | None]
Splitter = Callable[[bytes], list[bytes]]


def accept_all(server: ServerConnection, event: ServerEvent) -> Reply | None:
    """A server application that accepts every decision."""
    if not server.owes_reply:
        return None
    if isinstance(event, AuthCredentials):
        return Reply(code=235, text="2.7.0 Authentication successful")
    if isinstance(event, EndOfMessage):
        return Reply(code=250, text="2.0.0 queued")
    if isinstance(event, (Ehlo, Helo, Lhlo)):
        return Reply(code=250, text="mx.example")
    if isinstance(event, Vrfy):
        return Reply(code=252, text="2.5.0 Cannot verify, will attempt delivery")
    return Reply(code=250, text="OK")


def random_splitter(rng: random.Random, max_pieces: int = 8) -> Splitter:
    """Cut bytes at random points (a hypothesis-controlled Random makes it shrinkable)."""

    def split(data: bytes) -> list[bytes]:
        if len(data) < 2:
            return [data]
        cuts = sorted(
            rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, max_pieces)))
        )
        edges = [0, *cuts, len(data)]
        return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]

    return split


def whole(data: bytes) -> list[bytes]:
    return [data]


@dataclass
class ConnectionPair:
    """A client engine and a server engine in memory.

    Attributes:
        client, server: the engines.
        server_app: answers the server's decisions (default: accept everything).
        split: cuts each transfer into chunks.
        sent: what the client application sent (commands, MessageData, EndOfMessage).
        server_events: every event the server yielded.
        server_error: the RemoteProtocolError the server raised, if any (its reply hint is
            delivered to the client, which then sees the connection close).
        client_events: every event the client yielded.
        replies_sent: every reply the server application sent.
    """

    client_config: ClientConfig = field(default_factory=ClientConfig)
    server_config: ServerConfig = field(default_factory=lambda: ServerConfig(hostname="mx.example"))
    server_app: ServerApp = accept_all
    split: Splitter = whole
    greeting: Reply = field(default_factory=lambda: Reply(code=220, text="mx.example ESMTP"))
    client: ClientConnection = field(init=False)
    server: ServerConnection = field(init=False)
    sent: list[object] = field(default_factory=list, init=False)
    server_events: list[ServerEvent] = field(default_factory=list, init=False)
    client_events: list[ClientEvent] = field(default_factory=list, init=False)
    server_error: RemoteProtocolError | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.client = ClientConnection(self.client_config, now=0.0)
        self.server = ServerConnection(self.server_config, now=0.0)
        self.server.send(self.greeting)

    def send(self, *events: object) -> None:
        """The client application sends ``events`` (recorded in ``sent``)."""
        for event in events:
            self.client.send(event)  # type: ignore[arg-type]
            self.sent.append(event)

    def run(self) -> list[ClientEvent]:
        """Move bytes both ways until neither side has anything to say; returns the client
        events of this run."""
        start = len(self.client_events)
        while True:
            moved = False
            out = self.client.data_to_send()
            if out:
                moved = True
                for piece in self.split(out):
                    self.server.receive_data(piece)
                    self._drain_server()
            self._drain_server()
            out = self.server.data_to_send()
            if out:
                moved = True
                for piece in self.split(out):
                    self.client.receive_data(piece)
                    self._drain_client()
            self._drain_client()
            if not moved:
                return self.client_events[start:]

    def _drain_server(self) -> None:
        server = self.server
        while True:
            try:
                event = server.next_event()
            except RemoteProtocolError as exc:
                # The adapter's part: the hint is already queued; send it, then close.
                self.server_error = exc
                self.client.receive_data(server.data_to_send())
                self.client.receive_eof()
                return
            if event is NEED_DATA:
                return
            if event is PAUSED:
                if server.state is SessionState.STARTTLS or not server.owes_reply:
                    return
                last = self.server_events[-1] if self.server_events else None
                assert last is not None
                reply = self.server_app(server, last)
                if reply is None:
                    return
                server.send(reply)
                continue
            assert not isinstance(event, Sentinel)
            self.server_events.append(event)
            if server.state in (SessionState.CLOSED, SessionState.ERROR):
                return

    def _drain_client(self) -> None:
        while True:
            event = self.client.next_event()
            if event is NEED_DATA or event is PAUSED:
                return
            assert not isinstance(event, Sentinel)
            self.client_events.append(event)
            if self.client.state in (SessionState.CLOSED, SessionState.ERROR):
                return

    def starttls(self) -> None:
        """Both sides finish the (imaginary) TLS handshake."""
        self.server.tls_established()
        self.client.tls_established()


def merge_data(events: Iterable[object]) -> list[object]:
    """Consecutive MessageData events merged into one (chunking is not part of the meaning)."""
    merged: list[object] = []
    for event in events:
        if isinstance(event, MessageData) and merged and isinstance(merged[-1], MessageData):
            merged[-1] = MessageData(data=merged[-1].data + event.data)
        else:
            merged.append(event)
    return merged


def normalize_body(data: bytes) -> bytes:
    """What the server should see for DATA content ``data``: CRLF line endings, and a final
    CRLF unless empty."""
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def expected_server_view(sent: Sequence[object]) -> list[object]:
    """What the server yields for what the client application sent: DATA content normalised,
    BDAT LAST followed by EndOfMessage, MessageData merged."""
    out: list[object] = []
    body = b""
    last_bdat = False
    remaining = 0
    for event in sent:
        if isinstance(event, MessageData):
            if remaining:
                remaining -= len(event.data)
                out.append(event)
                if not remaining and last_bdat:
                    out.append(EndOfMessage())
                continue
            body += event.data
            continue
        if isinstance(event, EndOfMessage):
            norm = normalize_body(body)
            if norm:
                out.append(MessageData(data=norm))
            out.append(event)
            body = b""
            continue
        out.append(event)
        if isinstance(event, Bdat):
            remaining, last_bdat = event.size, event.last
            if not remaining and last_bdat:
                out.append(EndOfMessage())
    return merge_data(out)

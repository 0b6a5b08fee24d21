# The SMTP session state machine, shared by the client and the server engines.
#
# Theory.  An SMTP session is a sequence of (command, reply) pairs; the state changes only when
# a reply is known, and the new state depends on the command and on the reply's class
# (2yz/3yz/4yz/5yz), never on its text.  That makes the whole protocol one table:
#
#     TRANSITIONS[(state, command type)] = {reply class: next state}
#
# * A key that is present means "this command is legal in this state".  The server answers a
#   command whose key is missing with 503 (bad sequence, RFC 5321 4.1.4); the client refuses to
#   send it (LocalProtocolError).
# * A reply class missing from the entry leaves the state unchanged (a 5yz to RCPT keeps the
#   transaction as it was: RFC 5321 3.3 "the SMTP transaction ... is unaffected by a failed
#   RCPT").
# * The client pipelines (RFC 2920): it checks legality against the state reached "as if every
#   pending command succeeds", via ``expected_success``.
#
# Cross-cutting rules too general for the table are written as code right below it, in
# ``next_state``:
#   - 421 to anything closes the session (RFC 5321 3.8: "the SMTP server ... MUST ... close").
#   - BDAT (RFC 3030) moves to CHUNKING, or back to READY after "BDAT n LAST"; a failed chunk
#     ends the transaction (the client is expected to RSET); a BDAT refused before any
#     recipient was accepted (554) leaves the state alone, as DATA's 554 does.
#   - RSET (RFC 5321 4.1.1.5) always succeeds into READY, or HELLO if no EHLO/HELO was
#     accepted yet.
#
# The server engine and the client engine do all bookkeeping beyond the state (the envelope,
# owed replies, extensions) themselves; this module knows nothing about client versus server.
from __future__ import annotations

import enum

from mailwire.protocol._events import (
    Auth,
    AuthResponse,
    Bdat,
    Command,
    Data,
    Ehlo,
    Expn,
    Helo,
    Help,
    Lhlo,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Rset,
    StartTLS,
    Vrfy,
)


class SessionState(enum.Enum):
    """Where an SMTP session is.  Both engines use the same states."""

    GREETING = "greeting"  #: nothing exchanged yet; the server owes its 220 (or 554) greeting
    HELLO = "hello"  #: greeted; EHLO/HELO/LHLO expected
    READY = "ready"  #: after EHLO/HELO, no mail transaction open
    MAIL = "mail"  #: a sender was accepted, no recipient yet
    RCPT = "rcpt"  #: at least one recipient accepted
    DATA = "data"  #: the message body (after 354) is being transferred
    CHUNKING = "chunking"  #: inside a BDAT transaction, after a non-LAST chunk (RFC 3030)
    STARTTLS = "starttls"  #: 220 to STARTTLS sent/received: the TLS handshake is due
    AUTH = "auth"  #: inside a SASL exchange (RFC 4954), 334 sent/received
    CLOSED = "closed"  #: QUIT/421/EOF: nothing more may be exchanged
    ERROR = "error"  #: a protocol error made the session unusable

    # Enum.__hash__ is Python code (hash of the name); members compare by identity, so the
    # C-level identity hash is equivalent and keeps the per-command table lookups cheap.
    __hash__ = object.__hash__


S = SessionState
#: States in which an ordinary command line is read.
COMMAND_STATES = frozenset({S.HELLO, S.READY, S.MAIL, S.RCPT, S.CHUNKING})
#: States in which a client has been greeted with EHLO/HELO.
GREETED_STATES = frozenset({S.READY, S.MAIL, S.RCPT, S.CHUNKING})

TRANSITIONS: dict[tuple[SessionState, type[Command]], dict[int, SessionState]] = {}

for _s in COMMAND_STATES:
    for _hello in (Ehlo, Helo, Lhlo):
        TRANSITIONS[(_s, _hello)] = {2: S.READY}  # RFC 5321 4.1.4: EHLO also resets
    for _any in (Noop, Help, Vrfy, Expn):
        TRANSITIONS[(_s, _any)] = {}
    TRANSITIONS[(_s, Quit)] = {2: S.CLOSED}
    TRANSITIONS[(_s, Rset)] = {2: S.READY if _s in GREETED_STATES else S.HELLO}

TRANSITIONS.update(
    {
        (S.READY, MailFrom): {2: S.MAIL},
        (S.MAIL, RcptTo): {2: S.RCPT},
        (S.RCPT, RcptTo): {2: S.RCPT},
        (S.RCPT, Data): {3: S.DATA},
        (S.RCPT, Bdat): {},  # see next_state
        (S.CHUNKING, Bdat): {},
        (S.READY, StartTLS): {2: S.STARTTLS},
        (S.READY, Auth): {2: S.READY, 3: S.AUTH},
        (S.AUTH, AuthResponse): {2: S.READY, 3: S.AUTH, 4: S.READY, 5: S.READY},
    }
)
del _s, _hello, _any

#: The reply class that counts as success for each command, used to predict the state of a
#: pipelined client (RFC 2920).  DATA succeeds with 354; everything else with 2yz.
SUCCESS_CLASS: dict[type[Command], int] = {Data: 3}


def is_legal(state: SessionState, command: type[Command]) -> bool:
    """True if ``command`` may be sent in ``state``."""
    return (state, command) in TRANSITIONS


def next_state(state: SessionState, command: Command, code: int) -> SessionState:
    """The state after ``command`` (legal in ``state``) received a reply with ``code``."""
    if code == 421:
        return S.CLOSED
    cls = code // 100
    if isinstance(command, Bdat):
        if cls != 2 and state not in (S.RCPT, S.CHUNKING):
            return state  # refused outside a transaction with recipients (554/503)
        if command.last or cls != 2:
            return S.READY
        return S.CHUNKING
    return TRANSITIONS[(state, type(command))].get(cls, state)


def expected_success(state: SessionState, command: Command) -> SessionState:
    """The state ``command`` leads to if it succeeds (for pipelining predictions)."""
    return next_state(state, command, SUCCESS_CLASS.get(type(command), 2) * 100 + 50)


def mermaid() -> str:
    """The transition table as a Mermaid state diagram (the README embeds this output;
    tests/test_state.py checks that it is current)."""
    edges: dict[tuple[str, str], list[str]] = {}
    for (state, command), outcomes in TRANSITIONS.items():
        for cls, target in sorted(outcomes.items()):
            if target is state:
                continue
            label = f"{command.__name__} {cls}xx"
            edges.setdefault((state.name, target.name), []).append(label)
    edges.setdefault((S.RCPT.name, S.CHUNKING.name), []).append("Bdat 2xx")
    edges.setdefault((S.CHUNKING.name, S.READY.name), []).append("Bdat LAST / 4xx / 5xx")
    edges.setdefault((S.DATA.name, S.READY.name), []).append("end of data, any reply")
    edges.setdefault((S.GREETING.name, S.HELLO.name), []).append("220 greeting")
    edges.setdefault((S.STARTTLS.name, S.HELLO.name), []).append("TLS established")
    lines = ["stateDiagram-v2", "    [*] --> GREETING"]
    for (src, dst), labels in sorted(edges.items()):
        lines.append(f"    {src} --> {dst}: {', '.join(sorted(set(labels)))}")
    lines.append("    note right of CLOSED: 421 from any state also leads here")
    return "\n".join(lines)

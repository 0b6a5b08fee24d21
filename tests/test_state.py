"""The shared state table: totality, cross-cutting rules, and the README's diagram."""

from __future__ import annotations

import pathlib

import pytest

from mailwire.protocol import Bdat, Data, Ehlo, MailFrom, Quit, RcptTo, Rset, SessionState
from mailwire.protocol._events import Command
from mailwire.protocol._state import (
    COMMAND_STATES,
    TRANSITIONS,
    expected_success,
    is_legal,
    mermaid,
    next_state,
)

S = SessionState
ROOT = pathlib.Path(__file__).resolve().parent.parent
SAMPLES: list[Command] = [Ehlo(domain="c"), MailFrom(address="a@b.example"), Rset(), Quit()]


@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("code", [250, 354, 450, 550])
def test_every_legal_pair_has_a_defined_next_state(state: SessionState, code: int) -> None:
    for (s, _command), outcomes in TRANSITIONS.items():
        if s is state:
            assert all(isinstance(v, SessionState) for v in outcomes.values())
    for command in SAMPLES:
        if is_legal(state, type(command)):
            assert isinstance(next_state(state, command, code), SessionState)


@pytest.mark.parametrize("state", sorted(COMMAND_STATES, key=str))
def test_421_closes_from_any_command_state(state: SessionState) -> None:
    assert next_state(state, Rset(), 421) is S.CLOSED


def test_failed_rcpt_leaves_the_transaction_alone() -> None:
    assert next_state(S.RCPT, RcptTo(address="a@b.example"), 550) is S.RCPT
    assert next_state(S.MAIL, RcptTo(address="a@b.example"), 450) is S.MAIL


def test_rset_goes_to_hello_before_ehlo_and_ready_after() -> None:
    assert next_state(S.HELLO, Rset(), 250) is S.HELLO
    assert next_state(S.RCPT, Rset(), 250) is S.READY


def test_bdat_rules() -> None:
    assert next_state(S.RCPT, Bdat(size=5), 250) is S.CHUNKING
    assert next_state(S.CHUNKING, Bdat(size=5, last=True), 250) is S.READY
    assert next_state(S.CHUNKING, Bdat(size=5), 552) is S.READY


def test_pipelining_prediction_assumes_success() -> None:
    state = S.READY
    for command in (MailFrom(address="a@b.example"), RcptTo(address="c@d.example"), Data()):
        assert is_legal(state, type(command))
        state = expected_success(state, command)
    assert state is S.DATA


def test_data_is_not_legal_before_a_recipient() -> None:
    assert not is_legal(S.MAIL, Data) and not is_legal(S.READY, RcptTo)


def test_readme_state_diagram_is_generated_from_the_table() -> None:
    assert mermaid() in (ROOT / "README.md").read_text()


def test_bdat_refused_before_a_recipient_leaves_the_state() -> None:
    assert next_state(S.MAIL, Bdat(size=5), 554) is S.MAIL

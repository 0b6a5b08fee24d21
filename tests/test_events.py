"""Event constructors refuse what would inject protocol; Reply helpers."""

from __future__ import annotations

import pytest

from mailwire.protocol import (
    Auth,
    Bdat,
    Ehlo,
    LocalProtocolError,
    MailFrom,
    RcptTo,
    Reply,
    Vrfy,
)
from mailwire.protocol._writers import command_bytes


@pytest.mark.parametrize(
    "build",
    [
        lambda: Ehlo(domain="a\r\nMAIL FROM:<x@y>"),
        lambda: Ehlo(domain=""),
        lambda: MailFrom(address="not an address"),
        lambda: MailFrom(address="a@b.example", envid="x\ry"),
        lambda: MailFrom(address="a@b.example", body="9BIT"),
        lambda: RcptTo(address="a@b.example", notify=("NEVER", "SUCCESS")),
        lambda: RcptTo(address="a@b.example", orcpt="no-type"),
        lambda: RcptTo(address="a@b.example", extra=(("X", "a b"),)),
        lambda: Vrfy(argument="x\n"),
        lambda: Auth(mechanism="PLAIN X"),
        lambda: Bdat(size=-1),
        lambda: Reply(code=199, text="x"),
        lambda: Reply(code=250, text="a\rb"),
    ],
)
def test_constructors_refuse_injection_and_bad_values(build: object) -> None:
    with pytest.raises(LocalProtocolError):
        build()  # type: ignore[operator]


def test_reply_helpers() -> None:
    reply = Reply(code=550, text="5.1.1 no such user\nsecond line")
    assert reply.enhanced == "5.1.1" and reply.lines == ["5.1.1 no such user", "second line"]
    assert reply.is_permanent and not reply.is_transient
    assert Reply(code=250, text="4.1.1 mismatched class").enhanced is None
    assert Reply(code=354, text="go").is_intermediate


def test_reply_equality_ignores_the_command() -> None:
    assert Reply(code=250, text="ok", command=Ehlo(domain="c")) == Reply(code=250, text="ok")


@pytest.mark.parametrize(
    ("command", "wire"),
    [
        (
            MailFrom(address="a@b.example", size=10, body="8BITMIME", smtputf8=True, ret="HDRS",
                     envid="id+1", auth="<>"),
            b"MAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id+2B1"
            b" AUTH=<>\r\n",
        ),
        (MailFrom(address=""), b"MAIL FROM:<>\r\n"),
        (
            RcptTo(address="c@d.example", notify=("SUCCESS", "DELAY"), orcpt="rfc822;c+x@d"),
            b"RCPT TO:<c@d.example> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;c+2Bx@d\r\n",
        ),
        (Bdat(size=12, last=True), b"BDAT 12 LAST\r\n"),
        (Auth(mechanism="PLAIN", initial_response="="), b"AUTH PLAIN =\r\n"),
    ],
)  # fmt: skip
def test_command_wire_format(command: object, wire: bytes) -> None:
    assert command_bytes(command) == wire  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "build",
    [
        lambda: Reply(code=250, text="\udcff"),
        lambda: Vrfy(argument="\ud800x"),
        lambda: MailFrom(address="\udcff@example.org"),
        lambda: Ehlo(domain="\udcff"),
    ],
)
def test_lone_surrogates_are_refused_by_constructors(build: object) -> None:
    with pytest.raises(LocalProtocolError):
        build()  # type: ignore[operator]

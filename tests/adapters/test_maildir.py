"""Maildir local delivery: tmp/ -> new/, unique names, safe mailbox names, trace headers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwire.adapters._maildir import (
    Maildir,
    MaildirDelivery,
    MaildirError,
    mailbox_name,
    unique_name,
    with_trace_headers,
)

CONTENT = b"Subject: hi\r\n\r\nbody\r\n"


def test_deliver_leaves_the_message_in_new_and_nothing_in_tmp(tmp_path: Path) -> None:
    box = Maildir(path=str(tmp_path / "box"))
    path = box.deliver(CONTENT, hostname="mx.test")
    assert os.path.dirname(path) == str(tmp_path / "box" / "new")
    assert Path(path).read_bytes() == CONTENT
    assert os.listdir(tmp_path / "box" / "tmp") == []
    assert os.path.isdir(tmp_path / "box" / "cur")
    assert box.messages() == [path]


def test_unique_names_do_not_collide_and_escape_slash_and_colon() -> None:
    names = {unique_name("a/b:c", now=1.5) for _ in range(2000)}
    assert len(names) == 2000
    assert all("/" not in n and ":" not in n for n in names)
    assert all(n.startswith("1.M500000P") and n.endswith(".a\\057b\\072c") for n in names)


def test_recipients_get_a_maildir_each_under_domain_and_local_part(tmp_path: Path) -> None:
    deliver = MaildirDelivery(tmp_path, fsync=False)
    assert deliver("s@x.test", "Bob@Example.ORG", CONTENT).code == 250
    assert deliver("s@x.test", "carol@example.org", CONTENT).code == 250
    bob = list((tmp_path / "example.org" / "bob" / "new").iterdir())
    carol = list((tmp_path / "example.org" / "carol" / "new").iterdir())
    assert len(bob) == len(carol) == 1
    assert bob[0].read_bytes() == (
        b"Return-Path: <s@x.test>\r\nDelivered-To: Bob@Example.ORG\r\n" + CONTENT
    )


def test_aliases_redirect_to_another_mailbox(tmp_path: Path) -> None:
    deliver = MaildirDelivery(tmp_path, fsync=False, aliases={"Postmaster": "admin@ex.test"})
    assert deliver("", "postmaster", CONTENT).code == 250
    assert len(list((tmp_path / "ex.test" / "admin" / "new").iterdir())) == 1


@pytest.mark.parametrize(
    "rcpt", ["../x@ex.test", "a/b@ex.test", "x@../../etc", ".hidden@ex.test", "@ex.test", "\x00@e"]
)
def test_unsafe_names_are_refused_with_550_and_nothing_is_written(
    tmp_path: Path, rcpt: str
) -> None:
    reply = MaildirDelivery(tmp_path / "root", fsync=False)("s@x.test", rcpt, CONTENT)
    assert reply.code == 550 and reply.enhanced == "5.1.1"
    assert not (tmp_path / "root").exists()


def test_a_write_failure_is_transient(tmp_path: Path) -> None:
    (tmp_path / "root").write_bytes(b"not a directory")
    reply = MaildirDelivery(tmp_path / "root", fsync=False)("s@x.test", "a@ex.test", CONTENT)
    assert reply.code == 451 and reply.enhanced == "4.3.0"


def test_trace_headers_come_first() -> None:
    assert with_trace_headers(b"X: y\r\n\r\n", sender="", recipient="a@b") == (
        b"Return-Path: <>\r\nDelivered-To: a@b\r\nX: y\r\n\r\n"
    )


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_recipient_maps_inside_the_root_or_is_refused(rcpt: str) -> None:
    root = "/srv/mail"
    try:
        domain, local = mailbox_name(rcpt)
    except MaildirError:
        return
    path = os.path.normpath(os.path.join(root, domain or "_", local))
    assert local
    assert os.path.dirname(os.path.dirname(path)) == root  # exactly <root>/<domain>/<local>

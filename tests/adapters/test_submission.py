"""``mailwire serve`` with AUTH, a submission listener and sender limits, over real loopback
sockets on every runtime (asyncio, trio, threads): adapters/cli.py's build() with
adapters/_credentials.py, real smtplib and aiosmtplib clients, real TLS (trustme) over
STARTTLS."""

from __future__ import annotations

import asyncio
import base64
import re
import smtplib
import ssl
import threading
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import trustme
from conftest import CLIENT_TIMEOUT

from mailwire.adapters import cli
from mailwire.adapters._credentials import add_user
from mailwire.adapters._driver import BaseController
from mailwire.adapters._spool import SpoolHandler
from mailwire.protocol._trace import parse_date

USER, PASSWORD = "alice@example.org", "correct horse"
MESSAGE = b"From: alice@example.org\r\nSubject: submitted\r\n\r\nhello\r\n"
Start = Callable[..., BaseController]


@pytest.fixture
def users(tmp_path: Path) -> str:
    path = tmp_path / "users"
    add_user(path, USER, PASSWORD, ln=4)  # cheap scrypt for tests
    add_user(path, "bob", "hunter2", ln=4)
    return str(path)


@pytest.fixture(scope="module")
def cert_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tls") / "server.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def start(runtime: str, tmp_path: Path, users: str) -> Iterator[Start]:
    """``start(**settings)``: build() and start a server (main listener first, then the
    submission listener when asked); loopback is NOT a relay network here."""
    before = set(threading.enumerate())
    started: list[BaseController] = []

    def run(**values: Any) -> BaseController:
        settings = cli.Settings()
        defaults = {
            "runtime": runtime,
            "listen": ["127.0.0.1:0"],
            "hostname": "mx.test",
            "spool": str(tmp_path / "spool"),
            "relay_networks": [],
            "local_domains": ["example.org"],
            "credentials": users,
            "auth_failure_delay": 0.0,
        }
        settings.update({**defaults, **values}, "test")
        controller, _ = cli.build(settings)
        controller.start()
        started.append(controller)
        return controller

    yield run
    for controller in started:
        controller.stop()
        assert isinstance(controller.handler, SpoolHandler)
        controller.handler.close()
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for thread in leaked:
        thread.join(5)
    assert [t for t in leaked if t.is_alive()] == []


def smtp(address: tuple[str, int]) -> smtplib.SMTP:
    return smtplib.SMTP(address[0], address[1], timeout=CLIENT_TIMEOUT)


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def stored(controller: BaseController, reply: bytes) -> Any:
    """The spooled message a ``250 ... queued as ID`` reply names."""
    queue_id = reply.decode().rsplit(" ", 1)[1]
    handler = controller.handler
    assert isinstance(handler, SpoolHandler)
    return handler.store.get(queue_id)


PLAINTEXT = {"submission_listen": ["127.0.0.1:0"], "allow_plaintext_auth": True}


# --- submission (RFC 6409) ----------------------------------------------------------------------


def test_submission_refuses_mail_before_auth(start: Start) -> None:
    server = start(**PLAINTEXT)
    with smtp(server.addresses[1]) as client:
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        code, text = client.mail("alice@example.org")
        assert (code, text) == (530, b"5.7.0 Authentication required")
        code, _ = client.rcpt("friend@remote.test")
        assert code == 503  # no transaction


def test_wrong_password_gets_535_and_the_right_one_235_and_may_relay(start: Start) -> None:
    server = start(**PLAINTEXT)
    with smtp(server.addresses[1]) as client:
        client.ehlo()
        code, text = client.docmd("AUTH", "PLAIN " + plain(USER, "wrong"))
        assert (code, text) == (535, b"5.7.8 Authentication credentials invalid")
        code, text = client.docmd("AUTH", "PLAIN " + plain("nobody@example.org", PASSWORD))
        assert (code, text) == (535, b"5.7.8 Authentication credentials invalid")
        code, text = client.docmd("AUTH", "PLAIN " + plain(USER, PASSWORD))
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        client.mail("alice@example.org")
        code, _ = client.rcpt("friend@remote.test")  # a remote domain: relayed for a user
        assert code == 250
        code, reply = client.data(MESSAGE)
        assert code == 250
    message = stored(server, reply)
    assert message.envelope.authenticated_as == USER
    assert [r.address for r in message.envelope.recipients] == ["friend@remote.test"]


def test_auth_login_with_smtplib(start: Start) -> None:
    server = start(**PLAINTEXT)
    with smtp(server.addresses[1]) as client:
        client.ehlo()
        client.user, client.password = "bob", "hunter2"
        code, _ = client.auth("LOGIN", client.auth_login)
        assert code == 235
        assert client.sendmail("bob@example.org", ["x@remote.test"], MESSAGE) == {}


def test_proxy_authorization_identity_is_refused(start: Start) -> None:
    server = start(**PLAINTEXT)
    with smtp(server.addresses[1]) as client:
        client.ehlo()
        response = base64.b64encode(f"bob\0{USER}\0{PASSWORD}".encode()).decode()
        code, _ = client.docmd("AUTH", "PLAIN " + response)
        assert code == 535


def test_authorization_identity_in_another_spelling_of_the_user_is_accepted(
    start: Start,
) -> None:
    # SASLprep (RFC 4013) maps the soft hyphen to nothing: "b\u00adob" is the user "bob",
    # so naming it as the authorization identity is no proxy authorization
    server = start(**PLAINTEXT)
    with smtp(server.addresses[1]) as client:
        client.ehlo()
        response = base64.b64encode("b\u00adob\0bob\0hunter2".encode()).decode()
        code, _ = client.docmd("AUTH", "PLAIN " + response)
        assert code == 235


def test_main_listener_relays_only_for_authenticated_clients(start: Start) -> None:
    server = start(allow_plaintext_auth=True)  # credentials: AUTH offered on port 25 too
    with smtp(server.addresses[0]) as client:
        client.ehlo()
        client.mail("someone@remote.test")
        assert client.rcpt("user@example.org")[0] == 250  # local domain: from anyone
        assert client.rcpt("friend@remote.test") == (554, b"5.7.1 Relay access denied")
        client.rset()
        client.login(USER, PASSWORD)
        client.mail("alice@example.org")
        assert client.rcpt("friend@remote.test")[0] == 250


def test_a_password_change_takes_effect_without_restart(start: Start, users: str) -> None:
    server = start(**PLAINTEXT)
    add_user(users, "bob", "new secret", ln=4)
    with smtp(server.addresses[1]) as client:
        client.ehlo()
        assert client.docmd("AUTH", "PLAIN " + plain("bob", "hunter2"))[0] == 535
        assert client.docmd("AUTH", "PLAIN " + plain("bob", "new secret"))[0] == 235


# --- TLS ----------------------------------------------------------------------------------------


def test_auth_is_offered_only_after_starttls(
    start: Start, cert_file: str, client_tls: ssl.SSLContext
) -> None:
    server = start(tls_cert=cert_file, tls_key=cert_file, submission_listen=["127.0.0.1:0"])
    for address in server.addresses:  # main listener and submission listener
        with smtp(address) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            assert not client.has_extn("auth")  # RFC 4954 4: not in clear text
            code, text = client.docmd("AUTH", "PLAIN " + plain(USER, PASSWORD))
            assert (code, text[:6]) == (538, b"5.7.11")
            client.starttls(context=client_tls)
            client.ehlo()
            assert client.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
            client.login(USER, PASSWORD)
            assert client.sendmail("alice@example.org", ["friend@remote.test"], MESSAGE) == {}


def _aiosmtplib_submits(
    address: tuple[str, int],
    client_tls: ssl.SSLContext,
    *,
    timeout: float = CLIENT_TIMEOUT,
    use_tls: bool = False,
    start_tls: bool = False,
) -> None:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = USER, "friend@remote.test", "aio"
    message.set_content("hello over TLS\n")

    async def send(password: str) -> tuple[dict[str, Any], str]:
        return await aiosmtplib.send(
            message, hostname=address[0], port=address[1], tls_context=client_tls,
            username=USER, password=password, timeout=timeout, use_tls=use_tls,
            start_tls=start_tls,
        )  # fmt: skip

    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as denied:
        asyncio.run(send("wrong"))
    assert denied.value.code == 535
    refused, reply = asyncio.run(send(PASSWORD))
    assert refused == {} and "queued as" in reply


def test_submission_over_starttls_with_aiosmtplib(
    start: Start,
    cert_file: str,
    client_tls: ssl.SSLContext,
    runtime: str,
) -> None:
    # aiosmtplib sends EHLO right behind its TLS Finished, often in the same read: the
    # adapter must keep those bytes for after the handshake (asyncio once discarded them
    # as pre-TLS plaintext, and the client waited forever).
    server = start(tls_cert=cert_file, tls_key=cert_file, submission_listen=["127.0.0.1:0"])
    timeout = CLIENT_TIMEOUT
    _aiosmtplib_submits(server.addresses[1], client_tls, start_tls=True, timeout=timeout)


def test_submission_over_implicit_tls_with_aiosmtplib(
    start: Start, cert_file: str, client_tls: ssl.SSLContext
) -> None:
    server = start(
        tls_cert=cert_file, tls_key=cert_file, submission_listen=["127.0.0.1:0"],
        submission_implicit_tls=True,
    )  # fmt: skip
    _aiosmtplib_submits(server.addresses[1], client_tls, use_tls=True)


def test_submission_without_tls_needs_allow_plaintext_auth(users: str) -> None:
    settings = cli.Settings(credentials=users, submission_listen=["127.0.0.1:0"])
    with pytest.raises(ValueError, match="allow_plaintext_auth"):
        cli.build(settings)


# --- sender limits ------------------------------------------------------------------------------


def test_rate_limit_refuses_the_next_message_with_450_and_a_retry_hint(start: Start) -> None:
    server = start(limits={"per_client": {"messages": 2, "period": 600}})
    with smtp(server.addresses[0]) as client:
        for _ in range(2):
            assert client.sendmail("a@remote.test", ["user@example.org"], MESSAGE) == {}
        code, text = client.mail("a@remote.test")
    assert code == 450
    match = re.fullmatch(
        rb"4\.7\.1 Message rate limit exceeded for client address 127\.0\.0\.1; "
        rb"try again in (\d+) seconds?",
        text,
    )
    assert match is not None, text
    assert 1 <= int(match.group(1)) <= 300  # one token refills in 600/2 s


def test_one_rate_limiter_serves_every_listener(start: Start) -> None:
    server = start(limits={"per_client": {"messages": 2}}, **PLAINTEXT)
    main, submission = server.addresses
    with smtp(main) as client:
        assert client.sendmail("a@remote.test", ["user@example.org"], MESSAGE) == {}
    with smtp(submission) as client:
        client.login(USER, PASSWORD)
        assert client.sendmail(USER, ["friend@remote.test"], MESSAGE) == {}
    with smtp(main) as client:
        client.ehlo()
        assert client.mail("a@remote.test")[0] == 450


def test_per_user_recipient_limit(start: Start) -> None:
    server = start(limits={"per_user": {"recipients": 3}}, **PLAINTEXT)
    with smtp(server.addresses[1]) as client:
        client.login(USER, PASSWORD)
        client.mail(USER)
        for n in range(3):
            assert client.rcpt(f"r{n}@remote.test")[0] == 250
        code, text = client.rcpt("r3@remote.test")
        assert code == 450
        assert text.startswith(b"4.7.1 Recipient rate limit exceeded for user " + USER.encode())
        client.rset()
    with smtp(server.addresses[0]) as client:  # not authenticated: no per-user limit
        client.ehlo()
        client.mail("a@remote.test")
        assert [client.rcpt(f"u{n}@example.org")[0] for n in range(4)] == [250] * 4


def test_refused_relay_costs_no_recipient_token(start: Start) -> None:
    server = start(limits={"per_client": {"recipients": 1}})
    with smtp(server.addresses[0]) as client:
        client.ehlo()
        client.mail("a@remote.test")
        assert client.rcpt("friend@remote.test")[0] == 554
        assert client.rcpt("user@example.org")[0] == 250
        assert client.rcpt("user2@example.org")[0] == 450


def test_limits_refill_on_the_clock_passed_in(start: Start) -> None:
    server = start(limits={"per_client": {"messages": 1, "period": 60}})
    now = [1000.0]
    server.handler.clock = lambda: now[0]  # type: ignore[attr-defined]
    with smtp(server.addresses[0]) as client:
        client.ehlo()
        assert client.mail("a@remote.test")[0] == 250
        client.rset()
        assert client.mail("a@remote.test")[0] == 450
        now[0] += 60.0
        assert client.mail("a@remote.test")[0] == 250


def test_no_limits_by_default(start: Start) -> None:
    server = start()
    assert server.handler.limiter is None  # type: ignore[attr-defined]
    with smtp(server.addresses[0]) as client:
        client.ehlo()
        for _ in range(20):
            assert client.mail("a@remote.test")[0] == 250
            client.rset()


# --- the build() contract adapters/mta.py relies on ------------------------------------------


class Recording:
    """A MessageStore wrapper counting commits (as mta.py's NotifyingStore does)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.begun = 0

    def begin(self) -> Any:
        self.begun += 1
        return self.inner.begin()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_listeners_share_one_handler_so_a_store_replacement_reaches_both(start: Start) -> None:
    server = start(**PLAINTEXT)
    assert isinstance(server, cli.Listeners)
    assert server.running and server.config.hostname == "mx.test"
    main, submission = server.controllers
    assert main.handler is submission.handler is server.handler
    assert submission.config.auth_required and not main.config.auth_required
    assert server.addresses == main.addresses + submission.addresses
    handler = server.handler
    assert isinstance(handler, SpoolHandler)
    handler.store = recording = Recording(handler.store)
    with smtp(server.addresses[0]) as client:
        assert client.sendmail("a@remote.test", ["user@example.org"], MESSAGE) == {}
    with smtp(server.addresses[1]) as client:
        client.login(USER, PASSWORD)
        assert client.sendmail(USER, ["friend@remote.test"], MESSAGE) == {}
    assert recording.begun == 2
    server.stop()
    assert not server.running and not main.running and not submission.running


def test_the_mta_takes_submitted_mail_through_the_shared_handler(
    runtime: str, tmp_path: Path, users: str
) -> None:
    # adapters/mta.py wraps controller.handler.store after build(): mail submitted on the
    # second listener must reach its delivery agent too
    from mailwire.adapters.mta import MTA, DeliverySettings

    settings = cli.Settings(
        runtime=runtime, listen=["127.0.0.1:0"], hostname="mx.test", spool=str(tmp_path / "q"),
        relay_networks=[], local_domains=["example.org"], credentials=users,
        submission_listen=["127.0.0.1:0"], allow_plaintext_auth=True, auth_failure_delay=0.0,
    )  # fmt: skip
    maildir = tmp_path / "mail"
    mta = MTA(settings, DeliverySettings(maildir=str(maildir), control_socket="-"), fsync=False)
    mta.start()
    try:
        assert len(mta.addresses) == 2
        with smtp(mta.addresses[1]) as client:
            client.login(USER, PASSWORD)
            assert client.sendmail(USER, ["bob@example.org"], MESSAGE) == {}
        assert mta.accepted == 1
        delivered = threading.Event()
        for _ in range(500):  # bounded wait for the delivery agent; no timing asserted
            if any(p.is_file() for p in (maildir / "example.org" / "bob").rglob("*")):
                break
            delivered.wait(0.02)
        assert any(b"submitted" in p.read_bytes() for p in maildir.rglob("*") if p.is_file())
    finally:
        mta.stop()


# --- Date and Message-ID added to submitted mail (RFC 6409 8.2, 8.3) ---------------------------

BARE = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: bare\r\n\r\nhello\r\n"
DATED = (
    b"From: alice@example.org\r\nDate: Mon, 02 Nov 2026 10:00:00 +0100\r\n"
    b"Message-ID: <own.id@client.example>\r\nSubject: dated\r\n\r\nhello\r\n"
)
# what Maildir and the agent put in front: Return-Path, Delivered-To, one folded Received
TRACE = re.compile(
    rb"Return-Path: <[^>\r\n]*>\r\nDelivered-To: [^\r\n]+\r\n"
    rb"(Received: [^\r\n]*(?:\r\n\t[^\r\n]*)*; ?(?:\r\n\t)?([^\r\n;]+)\r\n)"
)


def _queued(client: smtplib.SMTP, sender: str, rcpt: str, content: bytes) -> str:
    """Send one message; the queue id of its ``250 ... queued as ID``."""
    assert client.mail(sender)[0] == 250
    assert client.rcpt(rcpt)[0] == 250
    code, reply = client.data(content)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def _mailbox(maildir: Path, user: str) -> bytes:
    """The one message delivered to ``user@example.org`` (waited for, bounded)."""
    new = maildir / "example.org" / user / "new"
    tick = threading.Event()
    for _ in range(750):  # bounded wait for the delivery agent; no timing asserted
        if new.is_dir() and any(new.iterdir()):
            break
        tick.wait(0.02)
    (path,) = new.iterdir()
    return path.read_bytes()


def _split(delivered: bytes, original: bytes) -> tuple[bytes, str, bytes]:
    """(Received field, its date, what came between it and the original content)."""
    assert delivered.endswith(original)
    match = TRACE.match(delivered)
    assert match is not None, delivered
    assert match.end() <= len(delivered) - len(original)
    return match.group(1), match.group(2).decode(), delivered[match.end() : -len(original)]


def _mta(
    tmp_path: Path, users: str, cert_file: str, runtime: str = "asyncio", **values: Any
) -> Any:
    from mailwire.adapters.mta import MTA, DeliverySettings

    settings = cli.Settings(
        runtime=runtime, listen=["127.0.0.1:0"], hostname="mx.test", spool=str(tmp_path / "q"),
        relay_networks=[], local_domains=["example.org"], credentials=users,
        submission_listen=["127.0.0.1:0"], tls_cert=cert_file, tls_key=cert_file,
        auth_failure_delay=0.0, **values,
    )  # fmt: skip
    delivery = DeliverySettings(maildir=str(tmp_path / "mail"), control_socket="-")
    return MTA(settings, delivery, fsync=False)


def test_submitted_mail_leaves_with_the_date_and_message_id_it_lacks(
    runtime: str, tmp_path: Path, users: str, cert_file: str, client_tls: ssl.SSLContext
) -> None:
    mta = _mta(tmp_path, users, cert_file, runtime)
    mta.start()
    try:
        main, submission = mta.addresses
        with smtp(submission) as client:
            client.starttls(context=client_tls)
            client.login(USER, PASSWORD)
            bare_id = _queued(client, USER, "bob@example.org", BARE)
            _queued(client, USER, "carol@example.org", DATED)
        with smtp(main) as client:  # port 25, not authenticated: left as it is
            client.ehlo()
            _queued(client, "someone@remote.test", "dave@example.org", BARE)
        maildir = tmp_path / "mail"
        received, date, added = _split(_mailbox(maildir, "bob"), BARE)
        assert b"with ESMTPSA" in received and f"id {bare_id}".encode() in received
        # Received first, then Date (the arrival, as in the Received field), then Message-ID
        assert added == f"Date: {date}\r\nMessage-ID: <{bare_id}@mx.test>\r\n".encode()
        assert parse_date(date) is not None
        received, _, added = _split(_mailbox(maildir, "carol"), DATED)
        assert b"with ESMTPSA" in received and added == b""
        received, _, added = _split(_mailbox(maildir, "dave"), BARE)
        assert b"with ESMTP " in received and added == b""
    finally:
        mta.stop()


def test_with_add_missing_headers_off_submitted_mail_is_left_as_it_is(
    tmp_path: Path, users: str, cert_file: str, client_tls: ssl.SSLContext
) -> None:
    mta = _mta(tmp_path, users, cert_file, add_missing_headers=False)
    mta.start()
    try:
        with smtp(mta.addresses[1]) as client:
            client.starttls(context=client_tls)
            client.login(USER, PASSWORD)
            _queued(client, USER, "bob@example.org", BARE)
        received, _, added = _split(_mailbox(tmp_path / "mail", "bob"), BARE)
        assert b"with ESMTPSA" in received and added == b""
    finally:
        mta.stop()


def test_add_missing_headers_is_on_by_default_and_off_by_option_or_file(tmp_path: Path) -> None:
    from mailwire.adapters.mta import MTA

    assert cli.Settings().add_missing_headers is True
    assert MTA(cli.Settings()).delivery_config("mx.test").add_missing_headers is True
    options = vars(cli._parser().parse_args(["serve", "--no-add-missing-headers"]))
    assert options["add_missing_headers"] is False
    assert vars(cli._parser().parse_args(["serve"]))["add_missing_headers"] is None  # no say
    settings = cli.Settings()
    settings.update({"add_missing_headers": False}, "mailwire.toml")
    assert MTA(settings).delivery_config("mx.test").add_missing_headers is False
    with pytest.raises(ValueError, match="true or false"):
        settings.update({"add_missing_headers": "no"}, "mailwire.toml")

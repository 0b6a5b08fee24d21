"""Unit tests of adapters/_driver.py: the handler plumbing, without sockets."""

from __future__ import annotations

import logging
from collections.abc import Coroutine, Generator
from typing import Any

import pytest

from mailwire.adapters._driver import (
    Driver,
    Handler,
    Live,
    MessageHandler,
    Session,
    new_session,
    refusal,
    run_async,
    run_sync,
)
from mailwire.protocol import AuthCredentials, Envelope, MailFrom, RcptTo, Reply, ServerConfig

CONFIG = ServerConfig(hostname="mx.test")
HELLO = b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder(Handler):
    """Records every handler call by name."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.data = b""

    def on_hello(self, session: Session, event: Any) -> Reply | None:
        self.calls.append("hello")
        return None

    def on_mail_from(self, session: Session, event: MailFrom) -> Reply | None:
        self.calls.append("mail")
        return None

    def on_rcpt_to(self, session: Session, event: RcptTo) -> Reply | None:
        self.calls.append("rcpt")
        return None

    def on_message_start(self, session: Session) -> None:
        self.calls.append("start")

    def on_message_data(self, session: Session, data: bytes) -> None:
        self.calls.append("data")
        self.data += data

    def on_message_end(self, session: Session) -> Any:
        self.calls.append("end")
        return None

    def on_message_aborted(self, session: Session) -> None:
        self.calls.append("aborted")

    def on_disconnect(self, session: Session) -> None:
        self.calls.append("disconnect")


def make(
    handler: Handler | None = None, config: ServerConfig = CONFIG, clock: Clock | None = None
) -> Driver:
    session = new_session(("192.0.2.1", 4000), ("192.0.2.2", 25), tls=False)
    return Driver(
        handler or Handler(),
        config,
        session,
        clock=clock or Clock(),
        logger=logging.getLogger("test"),
    )


def step(driver: Driver, data: bytes | None = None) -> tuple[str, list[bytes]]:
    """Feed ``data`` (None: nothing; b"": EOF), run the handlers, return outcome and lines."""
    if data is not None:
        driver.receive(data)
    outcome = run_sync(driver.process())
    return outcome, driver.data_to_send().split(b"\r\n")[:-1]


def codes(lines: list[bytes]) -> list[int]:
    return [int(line[:3]) for line in lines if line[3:4] == b" "]


def run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that awaits nothing real (no event loop needed)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the coroutine suspended")


# --- defaults ---------------------------------------------------------------------------------


def test_default_handler_greets_and_answers_with_contract_defaults() -> None:
    driver = make()
    outcome, lines = step(driver)
    assert (outcome, lines) == ("READ", [b"220 mx.test ESMTP mailwire"])
    _, lines = step(driver, HELLO + b"VRFY bob\r\n")
    assert lines[0] == b"250-mx.test Hello c.test"
    assert lines[-3:] == [b"250 2.1.0 OK", b"250 2.1.5 OK", lines[-1]]
    assert lines[-1].startswith(b"252 2.5.0 ")


def test_default_helo_reply_names_both_hosts() -> None:
    driver = make()
    step(driver)
    assert step(driver, b"HELO c.test\r\n")[1] == [b"250 mx.test Hello c.test"]


def test_default_auth_decision_is_deny() -> None:
    config = ServerConfig(hostname="mx.test", auth_mechanisms=("PLAIN",), auth_requires_tls=False)
    driver = make(config=config)
    step(driver)
    _, lines = step(driver, b"EHLO c.test\r\nAUTH PLAIN AHVzZXIAcGFzcw==\r\n")
    assert lines[-1] == b"535 5.7.8 Authentication credentials invalid"
    assert driver.session.authenticated_as is None


def test_accepted_auth_updates_the_session() -> None:
    class Accept(Handler):
        def on_auth(self, session: Session, event: AuthCredentials) -> Reply | None:
            return Reply(code=235, text="OK") if event.password == "pass" else None

    config = ServerConfig(hostname="mx.test", auth_mechanisms=("PLAIN",), auth_requires_tls=False)
    driver = make(Accept(), config)
    step(driver)
    _, lines = step(driver, b"EHLO c.test\r\nAUTH PLAIN AHVzZXIAcGFzcw==\r\n")
    assert lines[-1] == b"235 2.7.0 OK"
    assert driver.session.authenticated_as == "user"


def test_session_tracks_hello_and_envelope() -> None:
    driver = make()
    step(driver)
    step(driver, HELLO)
    session = driver.session
    assert session.hello == "c.test"
    assert session.envelope.sender == MailFrom(address="a@example.org")
    assert [r.address for r in session.envelope.recipients] == ["b@example.net"]


def test_handler_reply_overrides_default() -> None:
    class Refuse(Handler):
        def on_connect(self, session: Session) -> Reply | None:
            return Reply(code=554, text="mx.test go away")

    driver = make(Refuse())
    assert step(driver)[1] == [b"554 mx.test go away"]
    assert codes(step(driver, b"EHLO c.test\r\n")[1]) == [503]


def calls_made(driver: Driver) -> list[str]:
    """Run process() by hand, answering every Call with None; the names of the calls."""
    names: list[str] = []
    steps = driver.process()
    try:
        call = next(steps)
        while True:
            names.append(call.fn.__name__)
            call = steps.send(call.fn(*call.args))
    except StopIteration:
        return names


def test_default_hooks_are_not_called_but_overridden_and_instance_hooks_are() -> None:
    class OnlyRcpt(Handler):
        def on_rcpt_to(self, session: Session, event: RcptTo) -> Reply | None:
            return None

    def on_message_data(session: Session, data: bytes) -> None:
        received.append(data)

    received: list[bytes] = []
    handler = OnlyRcpt()
    handler.on_message_data = on_message_data  # type: ignore[method-assign]
    driver = make(handler)
    assert calls_made(driver) == []  # on_connect is Handler's: the greeting needs no call
    driver.receive(HELLO + b"DATA\r\nhi\r\n.\r\n")
    assert calls_made(driver) == ["on_rcpt_to", "on_message_data"]
    assert received == [b"hi\r\n"]
    assert codes(driver.data_to_send().split(b"\r\n")[:-1]) == [220, 250, 250, 250, 354, 250]


def test_skipped_default_hooks_give_the_same_replies_as_called_ones() -> None:
    class Explicit(Handler):  # overrides every hook with Handler's behaviour
        def on_connect(self, session: Session) -> Reply | None:
            return None

        def on_hello(self, session: Session, event: Any) -> Reply | None:
            return None

        def on_mail_from(self, session: Session, event: MailFrom) -> Reply | None:
            return None

        def on_rcpt_to(self, session: Session, event: RcptTo) -> Reply | None:
            return None

        def on_vrfy(self, session: Session, event: Any) -> Reply | None:
            return None

        def on_message_start(self, session: Session) -> None:
            pass

        def on_message_data(self, session: Session, data: bytes) -> None:
            pass

        def on_message_end(self, session: Session) -> Any:
            return None

    dialogue = HELLO + b"DATA\r\nhi\r\n.\r\nVRFY x\r\nMAIL FROM:<>\r\nRSET\r\n"
    dialogue += b"MAIL FROM:<>\r\nRCPT TO:<c@x.test>\r\nDATA\r\n.\r\nQUIT\r\n"
    transcripts = []
    for handler in (Handler(), Explicit()):
        driver = make(handler)
        first = step(driver)
        transcripts.append((first, step(driver, dialogue)))
    assert transcripts[0] == transcripts[1]
    assert transcripts[0][1][0] == "CLOSE"


# --- messages ---------------------------------------------------------------------------------


def test_message_calls_are_bracketed_start_data_end() -> None:
    handler = Recorder()
    driver = make(handler)
    step(driver)
    _, lines = step(driver, HELLO + b"DATA\r\nSubject: x\r\n\r\n..hi\r\n.\r\n")
    assert codes(lines) == [250, 250, 250, 354, 250]
    assert handler.calls == ["hello", "mail", "rcpt", "start", "data", "end"]
    assert handler.data == b"Subject: x\r\n\r\n.hi\r\n"
    assert driver.session.envelope == Envelope()  # the transaction is over


def test_engine_rejected_message_is_reported_aborted() -> None:
    handler = Recorder()
    driver = make(handler)
    step(driver)
    _, lines = step(driver, HELLO + b"DATA\r\nbare\nLF\r\n.\r\n")
    assert codes(lines)[-1] == 550
    assert handler.calls[-2:] == ["start", "aborted"]
    assert "end" not in handler.calls


def test_failing_data_handler_discards_message_and_answers_451() -> None:
    class Failing(Recorder):
        def on_message_data(self, session: Session, data: bytes) -> None:
            super().on_message_data(session, data)
            raise OSError("disk full")

    handler = Failing()
    driver = make(handler)
    step(driver)
    _, lines = step(driver, HELLO + b"DATA\r\nhello\r\n.\r\nNOOP\r\n")
    assert lines[-2:] == [b"451 4.3.0 Local error in processing", b"250 2.0.0 OK"]
    assert handler.calls[-3:] == ["start", "data", "aborted"]


def test_failing_decision_handler_answers_451() -> None:
    class Failing(Handler):
        def on_mail_from(self, session: Session, event: MailFrom) -> Reply | None:
            raise RuntimeError("database down")

    driver = make(Failing())
    step(driver)
    _, lines = step(driver, b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n")
    assert lines[-1] == b"451 4.3.0 Local error in processing"


def test_failing_greeting_handler_closes_with_421() -> None:
    class Failing(Handler):
        def on_connect(self, session: Session) -> Reply | None:
            raise RuntimeError("boom")

    outcome, lines = step(make(Failing()))
    assert outcome == "CLOSE" and lines == [b"421 mx.test 4.3.0 Local error"]


def test_wrong_result_type_answers_451() -> None:
    class Wrong(Handler):
        def on_rcpt_to(self, session: Session, event: RcptTo) -> Any:
            return 250

    driver = make(Wrong())
    step(driver)
    assert step(driver, HELLO)[1][-1] == b"451 4.3.0 Local error in processing"


def test_reply_the_engine_refuses_closes_with_421() -> None:
    class Wrong(Handler):
        def on_rcpt_to(self, session: Session, event: RcptTo) -> Reply | None:
            return Reply(code=550, text="no")  # 5yz to <Postmaster> is forbidden

    driver = make(Wrong())
    step(driver)
    outcome, lines = step(driver, b"EHLO c.test\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n")
    assert outcome == "CLOSE"
    assert lines[-1] == b"421 4.3.0 Local error, closing connection"


def test_bdat_chunks_are_one_message_and_rset_aborts_it() -> None:
    handler = Recorder()
    driver = make(handler)
    step(driver)
    step(driver, HELLO + b"BDAT 3\r\nabcBDAT 2\r\nde")
    assert handler.calls.count("start") == 1 and handler.data == b"abcde"
    _, lines = step(driver, b"RSET\r\n")
    assert lines == [b"250 2.0.0 OK"]
    assert handler.calls[-1] == "aborted"


def test_lmtp_replies_per_recipient() -> None:
    class PerRecipient(Handler):
        def __init__(self, result: Any) -> None:
            self.result = result

        def on_message_end(self, session: Session) -> Any:
            return self.result

    config = ServerConfig(hostname="mx.test", lmtp=True)
    two = b"LHLO c.test\r\nMAIL FROM:<>\r\nRCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n"
    two += b"DATA\r\nhi\r\n.\r\n"
    cases: list[tuple[Any, list[bytes]]] = [
        (None, [b"250 2.0.0 OK", b"250 2.0.0 OK"]),
        (Reply(code=452, text="4.2.2 full"), [b"452 4.2.2 full"] * 2),
        ([Reply(code=250, text="2.0.0 a"), Reply(code=550, text="5.1.1 b")],
         [b"250 2.0.0 a", b"550 5.1.1 b"]),
        ([Reply(code=250)], [b"451 4.3.0 Local error in processing"] * 2),  # wrong count
    ]  # fmt: skip
    for result, expected in cases:
        driver = make(PerRecipient(result), config)
        step(driver)
        assert step(driver, two)[1][-2:] == expected


# --- connection lifecycle ---------------------------------------------------------------------


def test_finish_reports_abort_mid_message_then_disconnect_once() -> None:
    handler = Recorder()
    driver = make(handler)
    step(driver)
    step(driver, HELLO + b"DATA\r\npartial")
    assert step(driver, b"")[0] == "CLOSE"
    run_sync(driver.finish())
    run_sync(driver.finish())
    assert handler.calls[-2:] == ["aborted", "disconnect"]
    assert handler.calls.count("disconnect") == 1


def test_quit_closes() -> None:
    driver = make()
    step(driver)
    outcome, lines = step(driver, b"QUIT\r\n")
    assert outcome == "CLOSE" and codes(lines) == [221]


def test_starttls_outcome_and_session_restart() -> None:
    driver = make(config=ServerConfig(hostname="mx.test", starttls=True))
    step(driver)
    outcome, lines = step(driver, b"EHLO c.test\r\nSTARTTLS\r\nMAIL FROM:<evil@x.test>\r\n")
    assert outcome == "STARTTLS" and codes(lines) == [250, 220]
    driver.tls_established()
    assert driver.session.tls and driver.session.hello is None
    assert step(driver) == ("READ", [])  # the injected MAIL was discarded


def test_timeout_queues_421_when_deadline_passes() -> None:
    clock = Clock()
    driver = make(config=ServerConfig(hostname="mx.test", command_timeout=10), clock=clock)
    step(driver)
    assert driver.deadline == clock.now + 10
    clock.now += 9
    assert not driver.check_timeout()
    clock.now += 1
    assert driver.check_timeout()
    assert driver.data_to_send().startswith(b"421 4.4.2 ")


def test_shutdown_queues_421_and_ends_the_session() -> None:
    driver = make()
    step(driver)
    driver.shutdown()
    assert (
        driver.data_to_send() == b"421 4.3.2 mx.test Service shutting down, closing connection\r\n"
    )
    assert step(driver)[0] == "CLOSE"


def test_idle_only_between_transactions() -> None:
    driver = make()
    step(driver)
    assert driver.idle
    step(driver, b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n")
    assert not driver.idle
    step(driver, b"RSET\r\n")
    assert driver.idle


def test_kick_wakes_a_reader_only_when_allowed() -> None:
    woken: list[int] = []
    driver = make()
    step(driver)
    step(driver, b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n")
    live = Live(driver=driver, wake=lambda: woken.append(1), reading=True)
    live.kick(force=False)  # in a transaction: left alone
    assert not live.kicked and woken == []
    live.kick(force=True)
    assert live.kicked and woken == [1]
    live.kick(force=True)
    assert woken == [1]
    idle = Live(driver=make(), wake=lambda: woken.append(2), reading=False)
    run_sync(idle.driver.process())
    idle.kick(force=False)  # idle, but not reading: marked, not woken
    assert idle.kicked and woken == [1]


def test_refusal_is_a_421_greeting() -> None:
    assert refusal(CONFIG) == b"421 4.7.0 Too many connections, try again later\r\n"


def test_new_session_normalises_addresses_and_ids_differ() -> None:
    a = new_session(("::1", 25, 0, 0), ("::1", 2525, 0, 0), tls=True)
    b = new_session("/tmp/sock", "", tls=False)
    assert a.peer == ("::1", 25) and a.tls
    assert b.peer == ("/tmp/sock", 0)
    assert a.id != b.id


# --- async handlers ---------------------------------------------------------------------------


class AsyncHandler(Handler):
    def __init__(self) -> None:
        self.data = b""

    async def on_rcpt_to(self, session: Session, event: RcptTo) -> Reply | None:  # type: ignore[override]
        return Reply(code=550, text="5.1.1 no") if event.address.startswith("x") else None

    async def on_message_data(self, session: Session, data: bytes) -> None:  # type: ignore[override]
        self.data += data

    async def on_message_end(self, session: Session) -> Any:  # type: ignore[override]
        raise RuntimeError("async failure")


def test_run_async_awaits_handlers_and_maps_exceptions() -> None:
    handler = AsyncHandler()
    driver = make(handler)
    run_coroutine(run_async(driver.process()))
    driver.data_to_send()
    driver.receive(HELLO + b"RCPT TO:<x@example.net>\r\nDATA\r\nhi\r\n.\r\n")
    assert run_coroutine(run_async(driver.process())) == "READ"
    lines = driver.data_to_send().split(b"\r\n")[:-1]
    assert codes(lines) == [250, 250, 250, 550, 354, 451]
    assert handler.data == b"hi\r\n"


def test_message_handler_hands_message_and_envelope_to_callback() -> None:
    got: list[tuple[bytes, Envelope]] = []
    driver = make(MessageHandler(lambda data, env: got.append((data, env))))
    step(driver)
    step(driver, HELLO + b"DATA\r\nhello\r\n.\r\n")
    [(data, envelope)] = got
    assert data == b"hello\r\n" and envelope.recipients[0].address == "b@example.net"


def test_message_handler_async_callback_reply_is_used() -> None:
    async def callback(data: bytes, envelope: Envelope) -> Reply:
        return Reply(code=250, text="2.0.0 queued as X")

    driver = make(MessageHandler(callback))
    run_coroutine(run_async(driver.process()))
    driver.receive(HELLO + b"DATA\r\nhello\r\n.\r\n")
    run_coroutine(run_async(driver.process()))
    assert driver.data_to_send().endswith(b"250 2.0.0 queued as X\r\n")


def test_run_sync_returns_the_generator_value_without_calls() -> None:
    def gen() -> Generator[Any, object, str]:
        return "done"
        yield  # pragma: no cover

    assert run_sync(gen()) == "done"


@pytest.mark.parametrize("bad", [b"GET / HTTP/1.1\r\n"])
def test_protocol_error_closes(bad: bytes) -> None:
    driver = make()
    step(driver)
    outcome, lines = step(driver, bad)
    assert outcome == "CLOSE" and codes(lines) == [421]


def test_failed_auth_reply_waits_for_the_configured_delay_through_the_runtime_sleep() -> None:
    slept: list[float] = []
    config = ServerConfig(auth_mechanisms=("PLAIN",), auth_requires_tls=False,
                          auth_failure_delay=1.5)  # fmt: skip
    session = Session(id="t", peer=("127.0.0.1", 1), local=("127.0.0.1", 25))
    driver = Driver(Handler(), config, session, clock=lambda: 0.0, logger=logging.getLogger("t"),
                    sleep=slept.append)  # fmt: skip
    run_sync(driver.process())
    driver.receive(b"EHLO c\r\nAUTH PLAIN AGEAYg==\r\n")
    run_sync(driver.process())
    assert slept == [1.5]
    assert driver.data_to_send().endswith(b"535 5.7.8 Authentication credentials invalid\r\n")

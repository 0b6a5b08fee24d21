"""Tests of adapters/cli.py: settings, relay policy, and `mailwire serve` as a real process."""

from __future__ import annotations

import getpass
import importlib.util
import io
import ipaddress
import os
import queue
import re
import signal
import smtplib
import stat
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import CLIENT_TIMEOUT, RUNTIMES

from mailwire.adapters import cli
from mailwire.adapters._credentials import CredentialsFile, add_user
from mailwire.adapters._driver import Handler, Session
from mailwire.adapters._spool import SpoolError, SpoolHandler, detect_format
from mailwire.protocol import MailFrom, RcptTo, Reply
from mailwire.protocol._policy import Limit, Rate, RateLimiter, SenderLimits
from mailwire.protocol._policy import RelayPolicy as RelayRules

HAVE_SPOOL = importlib.util.find_spec("mailwire.adapters._spool") is not None


# --- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:2525", ("127.0.0.1", 2525)), ("[::1]:25", ("::1", 25)), ("mx:0", ("mx", 0))],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert cli.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", ":25", "host:port", "[::1]"])
def test_parse_listen_rejects_non_host_port(text: str) -> None:
    with pytest.raises(ValueError):
        cli.parse_listen(text)


def test_embedded_defaults_match_the_issue() -> None:
    settings = cli.Settings()
    assert settings.listen == ["127.0.0.1:2525"]
    assert settings.spool == "./spool"
    assert settings.runtime == "asyncio"


@pytest.mark.parametrize(
    "values",
    [{"lsiten": ["x:1"]}, {"listen": "127.0.0.1:25"}, {"implicit_tls": 1},
     {"max_recipients": "100"}, {"tls_cert": 5}],
)  # fmt: skip
def test_settings_reject_unknown_keys_and_wrong_types(values: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        cli.Settings().update(values, "test")


def test_settings_accept_toml_values() -> None:
    settings = cli.Settings()
    settings.update({"grace": 5, "local-domains": ["example.org"], "implicit_tls": True}, "t")
    assert settings.grace == 5.0 and isinstance(settings.grace, float)
    assert settings.local_domains == ["example.org"] and settings.implicit_tls


def test_build_rejects_inconsistent_settings() -> None:
    for values in ({"runtime": "gevent"}, {"tls_cert": "c.pem"}, {"implicit_tls": True}):
        settings = cli.Settings()
        settings.update(values, "t")
        with pytest.raises(ValueError):
            cli.build(settings)


# --- relay policy -----------------------------------------------------------------------------


class _Accept(Handler):
    def on_rcpt_to(self, session: Session, event: RcptTo) -> Reply | None:
        return Reply(code=250, text="inner")


def _policy(peer: str, authenticated: str | None = None) -> tuple[Any, Session]:
    cls = type("Policy", (cli.RelayPolicy, _Accept), {})
    handler = cls()
    handler.relay = RelayRules(
        local_domains=frozenset({"example.org"}),
        trusted_networks=(ipaddress.ip_network("10.0.0.0/8"),),
    )
    session = Session(id="t", peer=(peer, 1), local=("127.0.0.1", 25))
    session.authenticated_as = authenticated
    return handler, session


@pytest.mark.parametrize(
    ("peer", "user", "address", "accepted"),
    [
        ("192.0.2.1", None, "u@example.org", True),  # local domain: from anyone
        ("192.0.2.1", None, "u@EXAMPLE.org", True),
        ("192.0.2.1", None, "u@example.net", False),  # not an open relay
        ("10.1.2.3", None, "u@example.net", True),  # relay network
        ("::ffff:10.1.2.3", None, "u@example.net", True),  # IPv4-mapped
        ("192.0.2.1", "alice", "u@example.net", True),  # authenticated submission
        ("192.0.2.1", None, "Postmaster", True),  # RFC 5321 4.5.1
    ],
)
def test_relay_policy(peer: str, user: str | None, address: str, accepted: bool) -> None:
    handler, session = _policy(peer, user)
    reply = handler.on_rcpt_to(session, RcptTo(address=address))
    denied = Reply(code=554, text="5.7.1 Relay access denied")
    assert reply == (Reply(code=250, text="inner") if accepted else denied)


# --- the real process -------------------------------------------------------------------------


def _lines(stream: IO[str], out: queue.Queue[str]) -> None:
    for line in stream:
        out.put(line)


def _wait_for(lines: queue.Queue[str], pattern: str, seen: list[str]) -> re.Match[str]:
    while True:
        try:
            line = lines.get(timeout=CLIENT_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no {pattern!r} in server output: {seen}") from None
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match


@pytest.mark.skipif(not HAVE_SPOOL, reason="adapters/_spool.py (SpoolHandler) not there yet")
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_mailwire_serve_spools_message_and_stops_gracefully_on_sigterm(
    tmp_path: Path, runtime: str
) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailwire.adapters.cli", "serve", "--runtime", runtime,
         "--listen", "127.0.0.1:0", "--hostname", "mx.test", "--grace", "5"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, lines), daemon=True).start()
    seen: list[str] = []
    try:
        port = int(_wait_for(lines, r"serving on 127\.0\.0\.1:(\d+)", seen).group(1))
        body = b"Subject: spooled\r\n\r\nhello from the cli test\r\n"
        with smtplib.SMTP("127.0.0.1", port, timeout=CLIENT_TIMEOUT) as client:
            client.ehlo()
            client.mail("a@example.org")
            client.rcpt("b@example.net")
            code, text = client.data(body)
        assert code == 250, text
        queue_id = text.decode().rsplit(" ", 1)[1]
        # one log line per accepted message, with its queue ID
        _wait_for(lines, re.escape(queue_id) + r".*from=<a@example\.org>", seen)
        files = [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]
        assert any(b"hello from the cli test" in p.read_bytes() for p in files), files
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(CLIENT_TIMEOUT) == 0, seen
        _wait_for(lines, "stopped", seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_new_spools_are_segment_logs_and_existing_ones_keep_their_format(
    tmp_path: Path,
) -> None:
    def opened(**values: Any) -> str:
        settings = cli.Settings(listen=["127.0.0.1:0"], hostname="mx.test")
        settings.update(values, "test")
        controller, _ = cli.build(settings)
        try:
            return type(controller.handler.store).__name__  # type: ignore[attr-defined]
        finally:
            controller.handler.close()  # type: ignore[attr-defined]

    assert opened(spool=str(tmp_path / "new")) == "LogStore"
    assert detect_format(tmp_path / "new") == "log"
    assert opened(spool=str(tmp_path / "old"), spool_format="files") == "DirectoryStore"
    assert opened(spool=str(tmp_path / "old")) == "DirectoryStore"  # auto keeps it
    with pytest.raises(SpoolError, match="files"):
        opened(spool=str(tmp_path / "old"), spool_format="log")  # never converted implicitly
    with pytest.raises(SystemExit) as exit_:  # ... and the command line says so cleanly
        cli.main(["serve", "--no-deliver", "--spool", str(tmp_path / "old"),
                  "--spool-format", "log", "--listen", "127.0.0.1:0"])  # fmt: skip
    assert exit_.value.code == 2


def test_bad_config_file_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "mailwire.toml"
    path.write_text('listen = ["127.0.0.1:2525"]\nmax_recipient = 100\n')
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--config", str(path)])
    assert exit_.value.code == 2
    path.write_text("listen = [")
    with pytest.raises(SystemExit):
        cli.main(["serve", "--config", str(path)])


def test_options_override_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "mailwire.toml"
    path.write_text('runtime = "trio"\nhostname = "file.example"\nmax_recipients = 200\n')
    settings = cli.Settings()
    with path.open("rb") as f:
        settings.update(tomllib.load(f), str(path))
    settings.update({"hostname": "option.example"}, "options")
    assert (settings.runtime, settings.hostname, settings.max_recipients) == (
        "trio",
        "option.example",
        200,
    )


def test_the_server_itself_and_localhost_are_always_local() -> None:
    # mail to postmaster@ the server must be delivered here (RFC 5321 4.5.1), not looked up
    settings = cli.Settings(local_domains=["Example.ORG."])
    assert cli.local_domains(settings, "mx.example.net") == {
        "example.org",
        "mx.example.net",
        "localhost",
    }


# --- AUTH, submission and limits settings ---------------------------------------------------


def test_new_settings_have_safe_defaults() -> None:
    settings = cli.Settings()
    assert settings.credentials is None and settings.submission_listen == []
    assert not settings.allow_plaintext_auth and settings.limits == {}
    assert cli.sender_limits(settings.limits) is None  # no limits unless configured


def test_sender_limits_map_onto_the_core() -> None:
    table = {
        "period": 600,
        "per_client": {"messages": 10, "recipients": 100},
        "per_user": {"messages": 50, "period": 86400},
        "per_sender": {"recipients": 7.5},
        "max_buckets": 500,
    }
    limits = cli.sender_limits(table)
    assert limits == SenderLimits(
        per_client=Limit(
            messages=Rate(count=10, interval=600), recipients=Rate(count=100, interval=600)
        ),
        per_user=Limit(messages=Rate(count=50, interval=86400)),
        per_sender=Limit(recipients=Rate(count=7.5, interval=600)),
        max_buckets=500,
    )  # fmt: skip


def test_per_user_limit_counts_every_spelling_of_a_user_as_one() -> None:
    # SASLprep lets "b\u00adob" (soft hyphen) and "bo\u200db" log in as "bob" (adapters/
    # _credentials.py): the per-user allowance must be theirs together, not one each
    class Limited(cli.RateLimitPolicy, Handler):
        pass

    policy = Limited()
    policy.limiter = RateLimiter(
        SenderLimits(per_user=Limit(messages=Rate(count=1, interval=3600)))
    )
    policy.lock = threading.Lock()
    policy.clock = lambda: 1000.0
    replies = []
    for i, user in enumerate(["bob", "b\u00adob", "bo\u200db", "alice"]):
        session = Session(id=f"s{i}", peer=(f"192.0.2.{i}", 1), local=("127.0.0.1", 587))
        session.authenticated_as = user
        replies.append(policy.on_mail_from(session, MailFrom(address="a@example.org")))
    assert replies[0] is None and replies[3] is None  # bob's first message; alice's own
    for refused in replies[1:3]:
        assert isinstance(refused, Reply) and refused.code == 450


@pytest.mark.parametrize(
    "table",
    [{"per_clinet": {"messages": 1}}, {"per_client": {"mesages": 1}},
     {"per_client": {"messages": 0}}, {"per_client": {"messages": -5}},
     {"per_client": {"messages": True}}, {"per_client": {"messages": "10"}},
     {"per_client": 10}, {"period": 0, "per_user": {"messages": 1}},
     {"per_user": {"messages": 1}, "max_buckets": 0}],
)  # fmt: skip
def test_bad_limits_are_refused(table: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        cli.sender_limits(table)


def test_limit_options_refine_the_file_table() -> None:
    settings = cli.Settings()
    settings.update({"limits": {"period": 60, "per_client": {"messages": 5}}}, "file")
    options = cli.limit_options(["per_client.recipients=50", "per-user.messages=2.5"])
    assert options == {"per_client": {"recipients": 50}, "per_user": {"messages": 2.5}}
    settings.update({"limits": options}, "options")
    assert settings.limits == {
        "period": 60,
        "per_client": {"messages": 5, "recipients": 50},
        "per_user": {"messages": 2.5},
    }


@pytest.mark.parametrize("item", ["per_client.messages", "per_client.messages=ten", "=5"])
def test_limit_options_must_be_key_number(item: str) -> None:
    with pytest.raises(ValueError):
        cli.limit_options([item])


def test_bad_limit_option_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--limit", "per_client.messages=-1"])
    assert exit_.value.code == 2


def test_build_rejects_inconsistent_auth_settings(tmp_path: Path) -> None:
    users = tmp_path / "users"
    add_user(users, "bob", "pw", ln=4)
    bad: list[dict[str, Any]] = [
        {"submission_listen": ["127.0.0.1:0"]},  # no credentials
        {"submission_listen": ["127.0.0.1:0"], "credentials": str(users)},  # no TLS
        {"submission_implicit_tls": True, "credentials": str(users)},  # no TLS
    ]
    for values in bad:
        settings = cli.Settings(spool=str(tmp_path / "spool"))
        settings.update(values, "t")
        with pytest.raises(ValueError):
            cli.build(settings)
    settings = cli.Settings(spool=str(tmp_path / "spool"), credentials=str(tmp_path / "none"))
    with pytest.raises(OSError):
        cli.build(settings)
    assert not (tmp_path / "spool").exists()  # refused before the spool was opened


def test_credentials_alone_offer_auth_on_the_main_listener(tmp_path: Path) -> None:
    users = tmp_path / "users"
    add_user(users, "bob", "pw", ln=4)
    settings = cli.Settings(spool=str(tmp_path / "spool"), credentials=str(users))
    controller, _ = cli.build(settings)
    try:
        assert not isinstance(controller, cli.Listeners)  # one listener
        assert controller.config.auth_mechanisms == ("PLAIN", "LOGIN")
        assert controller.config.auth_requires_tls and not controller.config.auth_required
    finally:
        assert isinstance(controller.handler, SpoolHandler)
        controller.handler.close()


@pytest.mark.parametrize("pinned", [True, False])
def test_threads_runtime_pins_session_threads_unless_told_not_to(
    tmp_path: Path, pinned: bool
) -> None:
    option = [] if pinned else ["--no-pin-session-threads"]
    given = vars(cli._parser().parse_args(["serve", *option]))["pin_session_threads"]
    assert given is (None if pinned else False)  # None: the setting's default, True
    settings = cli.Settings(spool=str(tmp_path / "spool"), runtime="threads")
    if given is not None:
        settings.update({"pin_session_threads": given}, "options")
    controller, _ = cli.build(settings)
    try:
        assert controller.options["pin_sessions"] is pinned
    finally:
        assert isinstance(controller.handler, SpoolHandler)
        controller.handler.close()


# --- mailwire passwd --------------------------------------------------------------------------


def test_passwd_stdin_adds_and_changes_a_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "users"
    monkeypatch.setattr(sys, "stdin", io.StringIO("first secret\n"))
    assert cli.main(["passwd", "--stdin", "--cost", "4", str(path), "bob@example.org"]) == 0
    assert "added" in capsys.readouterr().err
    text = path.read_text()
    assert "first secret" not in text and "bob@example.org:$scrypt$ln=4,r=8,p=1$" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    creds = CredentialsFile(path)
    assert creds.verify("bob@example.org", "first secret")
    monkeypatch.setattr(sys, "stdin", io.StringIO("second secret\r\n"))
    assert cli.main(["passwd", "--stdin", "--cost", "4", str(path), "bob@example.org"]) == 0
    assert "changed" in capsys.readouterr().err
    assert creds.verify("bob@example.org", "second secret")  # reloaded, no restart
    assert not creds.verify("bob@example.org", "first secret")
    assert cli.main(["passwd", "--delete", str(path), "bob@example.org"]) == 0
    assert creds.users == frozenset()
    assert cli.main(["passwd", "--delete", str(path), "bob@example.org"]) == 1


def test_passwd_prompts_twice_and_refuses_a_mismatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users"
    answers = iter(["one", "two"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert cli.main(["passwd", "--cost", "4", str(path), "bob"]) == 2
    assert not path.exists()
    answers = iter(["same", "same"])
    assert cli.main(["passwd", "--cost", "4", str(path), "bob"]) == 0
    assert CredentialsFile(path).verify("bob", "same")


@pytest.mark.parametrize(("user", "stdin"), [("bad:name", "pw\n"), ("bob", "\n"), ("bob", "")])
def test_passwd_refuses_bad_names_and_empty_passwords(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user: str, stdin: str
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert cli.main(["passwd", "--stdin", "--cost", "4", str(tmp_path / "u"), user]) == 2
    assert not (tmp_path / "u").exists()


def test_mailwire_serve_with_submission_auth_and_limits_from_the_command_line(
    tmp_path: Path,
) -> None:
    users = tmp_path / "users"
    add_user(users, "bob", "pw", ln=4)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailwire.adapters.cli", "serve", "--runtime", "trio",
         "--listen", "127.0.0.1:0", "--submission-listen", "127.0.0.1:0",
         "--credentials", str(users), "--allow-plaintext-auth", "--auth-failure-delay", "0",
         "--relay-network", "192.0.2.0/24", "--limit", "per_user.messages=1",
         "--hostname", "mx.test", "--grace", "5"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stderr, lines), daemon=True).start()
    seen: list[str] = []
    try:
        match = _wait_for(lines, r"serving on 127\.0\.0\.1:(\d+) 127\.0\.0\.1:(\d+)", seen)
        main_port, submission_port = int(match.group(1)), int(match.group(2))
        with smtplib.SMTP("127.0.0.1", submission_port, timeout=CLIENT_TIMEOUT) as client:
            client.ehlo()
            assert client.mail("bob@example.org")[0] == 530
            client.login("bob", "pw")
            message = b"Subject: s\r\n\r\nhi\r\n"
            assert client.sendmail("bob@example.org", ["x@localhost"], message) == {}
            code, text = client.mail("bob@example.org")
            assert code == 450 and text.startswith(b"4.7.1 Message rate limit"), text
        with smtplib.SMTP("127.0.0.1", main_port, timeout=CLIENT_TIMEOUT) as client:
            client.ehlo()
            client.mail("a@remote.test")
            assert client.rcpt("x@remote.test")[0] == 554  # not a relay for strangers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(CLIENT_TIMEOUT) == 0, seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not any("bob:" in line or "pw" in line.split() for line in seen)

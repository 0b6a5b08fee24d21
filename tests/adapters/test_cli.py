"""Tests of adapters/cli.py: settings, relay policy, and `mailwire serve` as a real process."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import queue
import re
import signal
import smtplib
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import CLIENT_TIMEOUT, RUNTIMES

from mailwire.adapters import cli
from mailwire.adapters._driver import Handler, Session
from mailwire.protocol import RcptTo, Reply
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

"""A short fuzz run in the normal test suite: hypothesis drives the atheris targets' entry
functions (fuzz/fuzz_client.py, fuzz/fuzz_address.py) with structured inputs, so every
invariant those targets check runs on every test run, with shrinking when one breaks.

The long coverage-guided runs are in fuzz/README.md; this keeps each property under ~3 s.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailwire.protocol._config import ServerConfig
from mailwire.protocol._events import MailFrom, RcptTo
from mailwire.protocol._grammar import GrammarError, is_valid_mailbox, parse_path
from mailwire.protocol._readers import VERBS, decode_line, split_verb
from mailwire.protocol._writers import command_bytes

FUZZ = pathlib.Path(__file__).resolve().parent.parent / "fuzz"
FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load(name: str) -> ModuleType:
    path = FUZZ / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fuzz_client = _load("fuzz_client")
fuzz_address = _load("fuzz_address")

# --- the client engine against hostile servers -----------------------------------------------

EHLO = (
    b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250-DSN\r\n"
    b"250-CHUNKING\r\n250-SMTPUTF8\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"
)
REPLY_PIECES = [
    b"220 mx.example ESMTP\r\n", EHLO, b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n",
    b"354 go ahead\r\n", b"250 2.0.0 queued\r\n", b"221 bye\r\n", b"334 VXNlcm5hbWU6\r\n",
    b"334 UGFzc3dvcmQ6\r\n", b"235 ok\r\n", b"535 no\r\n", b"220 2.0.0 TLS go\r\n",
    b"421 4.3.2 shutting down\r\n", b"450 4.2.0 busy\r\n", b"550 5.1.1 unknown\r\n",
    b"502 5.5.2 what\r\n", b"554 5.7.1 refused\r\n", b"452 4.5.3 too many\r\n",
    b"250-multi\r\n", b"251-other code\r\n", b"250 bare lf\n", b"\r\n", b"\n",
    b"2", b"25", b"250", b"-", b" ", b"\x00", b"\xff\xfe", b"999 bad\r\n", b"HTTP/1.1 200\r\n",
]  # fmt: skip
header = st.tuples(st.integers(0, 127), st.integers(0, 255), st.integers(0, 120),
                   st.integers(0, 3))  # fmt: skip
stream = st.lists(st.sampled_from(REPLY_PIECES) | st.binary(max_size=12), max_size=24)


@FAST
@given(header, stream)
def test_client_engine_keeps_its_invariants_against_any_reply_stream(
    head: tuple[int, int, int, int], pieces: list[bytes]
) -> None:
    fuzz_client.test_one_input(bytes(head) + b"".join(pieces))


@FAST
@given(st.binary(max_size=600))
@example(b"\x07\x80\x00\x00220 mx\r\n250-mx\r\n250 PIPELINING\r\n250 ok\r\n")
def test_client_engine_keeps_its_invariants_against_raw_bytes(data: bytes) -> None:
    fuzz_client.test_one_input(data)


# --- addresses, parameters, xtext --------------------------------------------------------------

ADDRESS_ALPHABET = st.sampled_from(
    list("abcXYZ019.-_+=@<>[]:;,\"\\ ()!#$%&'*/?^`{|}~") + ["é", "例", "\x00", "\r", "\t", "\x7f"]
)
address_text = st.text(ADDRESS_ALPHABET, max_size=60)


@FAST
@given(st.integers(0, 7), address_text)
@example(2, "<user@[IPv7:2<a@b.eFe>a.co00:::1]>")  # the split_mailbox finding
@example(4, "FROM:<a@b.example> SIZE=0005 ret=full ENVID=a+2Bb AUTH=+3C+3E")
def test_address_parsers_round_trip_through_the_writers(flags: int, text: str) -> None:
    fuzz_address.test_one_input(bytes([flags]) + text.encode("utf-8"))


@FAST
@given(st.integers(0, 7), st.sampled_from(["FROM:", "TO:"]), address_text)
def test_mail_and_rcpt_commands_round_trip(flags: int, prefix: str, text: str) -> None:
    fuzz_address.test_one_input(bytes([flags]) + (prefix + text).encode("utf-8"))


atom = st.text("abcdefghijklmnopqrstuvwxyzABC0123456789!#$%&'*+-/=?^_`{|}~", min_size=1,
               max_size=10)  # fmt: skip
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
domain = st.lists(label, min_size=1, max_size=4).map(".".join)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: f"[{'.'.join(map(str, t))}]")
ipv6 = st.ip_addresses(v=6).map(lambda a: f"[IPv6:{a}]")
quoted = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=10).map(
    lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
)
local_part = st.lists(atom, min_size=1, max_size=3).map(".".join) | quoted
mailbox = (
    st.tuples(local_part, domain | ipv4 | ipv6)
    .map("@".join)
    .filter(lambda m: len(m.rpartition("@")[0]) <= 64 and len(m) <= 254)
)


@FAST
@given(mailbox, st.booleans())
def test_every_rfc5321_mailbox_is_accepted_and_round_trips(address: str, recipient: bool) -> None:
    assert is_valid_mailbox(address, utf8=False), address
    assert parse_path(f"<{address}>", utf8=False, recipient=recipient) == address
    event = RcptTo(address=address) if recipient else MailFrom(address=address)
    line = command_bytes(event)
    verb, arg = split_verb(line[:-2])
    config = ServerConfig(hostname="mx.test")
    assert VERBS[verb](decode_line(arg), config, False) == event


# Found by this module's fuzzing (lone surrogates used to escape as UnicodeEncodeError).
def test_lone_surrogates_are_a_grammar_error_not_a_crash() -> None:
    with pytest.raises(GrammarError):
        parse_path("<\udcff@example.org>", utf8=True, recipient=False)

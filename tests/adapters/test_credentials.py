"""Tests of adapters/_credentials.py: the file of salted scrypt hashes behind AUTH."""

from __future__ import annotations

import base64
import fcntl
import io
import logging
import multiprocessing
import os
import smtplib
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CLIENT_TIMEOUT
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailwire.adapters import _credentials, cli
from mailwire.adapters._credentials import (
    CredentialsFile,
    ScryptHash,
    add_user,
    hash_password,
    parse_credentials,
    remove_user,
    verify_password,
)

LN = 4  # cheap scrypt for tests (the default, 14, costs tens of ms per check)


class Counter:
    """Wraps _credentials._scrypt and counts the hashes computed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[int] = []
        real = _credentials._scrypt

        def counting(password: bytes, salt: bytes, ln: int, r: int, p: int) -> bytes:
            self.calls.append(ln)
            return real(password, salt, ln, r, p)

        monkeypatch.setattr(_credentials, "_scrypt", counting)


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    add_user(path, "alice@example.org", "correct horse", ln=LN)
    add_user(path, "bob", "hunter2", ln=LN)
    return path


# --- hashes -----------------------------------------------------------------------------------


def test_hash_has_the_documented_form_and_verifies() -> None:
    encoded = hash_password("pw", ln=LN)
    assert encoded.startswith(f"$scrypt$ln={LN},r=8,p=1$")
    parsed = ScryptHash.parse(encoded)
    assert len(parsed.salt) == 16 and len(parsed.digest) == 32
    assert verify_password("pw", encoded)
    assert not verify_password("pW", encoded)


def test_default_cost_is_ln_14() -> None:
    assert _credentials.SCRYPT_LN == 14
    salt = bytes(16)
    expected = "$scrypt$ln=14,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$"  # 16 zero octets
    assert hash_password("pw", salt=salt).startswith(expected)


def test_same_password_gets_a_different_salt_each_time() -> None:
    a, b = hash_password("pw", ln=LN), hash_password("pw", ln=LN)
    assert a != b
    assert ScryptHash.parse(a).salt != ScryptHash.parse(b).salt


def test_hash_matches_rfc_7914_test_vector() -> None:
    # RFC 7914 12: scrypt("password", "NaCl", N=1024, r=8, p=16, dkLen=64), first 32 octets
    expected = bytes.fromhex("fdbabe1c9d3472007856e7190d01e9fe7c6ad7cbc8237830e77376634b373162")
    assert _credentials._scrypt(b"password", b"NaCl", 10, 8, 16) == expected


@pytest.mark.parametrize(
    "text",
    [
        "$scrypt$ln=4,r=8$AAAA$" + "A" * 43,  # missing p
        "$scrypt$ln=4,r=8,p=1,ln=4$AAAA$" + "A" * 43,  # repeated
        "$scrypt$ln=40,r=8,p=1$AAAA$" + "A" * 43,  # out of range
        "$scrypt$ln=4,r=8,p=1$AAAA$AAAA",  # short hash
        "$scrypt$ln=4,r=8,p=1$$" + "A" * 43,  # empty salt
        "$scrypt$ln=4,r=8,p=1$A!A$" + "A" * 43,  # not base64
        "$2b$12$abcdefghijklmnopqrstuv",  # bcrypt: not supported
        "plaintext-password",
    ],
)
def test_malformed_hashes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        ScryptHash.parse(text)


def _same_scrypt_key(a: str, b: str) -> bool:
    # scrypt's PBKDF2-HMAC-SHA256 pads a key of up to 64 octets with zero octets (RFC 2104),
    # so such keys that differ only in trailing NULs are the same key
    ka, kb = a.encode(), b.encode()
    if len(ka) <= 64 and len(kb) <= 64:
        return ka.rstrip(b"\0") == kb.rstrip(b"\0")
    return ka == kb


@settings(max_examples=25, deadline=None)
@given(password=st.text(max_size=40), other=st.text(max_size=40))
@example(password="", other="\x00")  # found by hypothesis: the HMAC key padding
def test_verify_accepts_only_the_password_it_was_made_from(password: str, other: str) -> None:
    encoded = hash_password(password, ln=1)
    assert verify_password(password, encoded)
    assert verify_password(other, encoded) == _same_scrypt_key(other, password)
    assert ScryptHash.parse(encoded).format() == encoded


def test_a_password_with_a_trailing_nul_never_logs_in(tmp_path: Path) -> None:
    # the raw hash cannot tell "secret" from "secret\0" (HMAC key padding), but SASLprep
    # prohibits control characters (RFC 4013 2.3, C.2.1), so AUTH refuses the second
    assert verify_password("secret\0", hash_password("secret", ln=1))
    path = tmp_path / "users"
    add_user(path, "bob", "secret", ln=1)
    users = CredentialsFile(path)
    try:
        assert users.verify("bob", "secret")
        assert not users.verify("bob", "secret\0")
    finally:
        users.close()


# --- the file ---------------------------------------------------------------------------------


def test_file_never_contains_the_password(users: Path) -> None:
    text = users.read_text()
    assert "correct horse" not in text and "hunter2" not in text
    assert b"correct horse".hex() not in text
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert [line.split(":", 1)[0] for line in lines] == ["alice@example.org", "bob"]
    assert all(":$scrypt$ln=4,r=8,p=1$" in line for line in lines)


def test_add_user_writes_mode_0600(users: Path) -> None:
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    os.chmod(users, 0o644)
    add_user(users, "carol", "pw", ln=LN)
    assert stat.S_IMODE(users.stat().st_mode) == 0o600


def test_verify(users: Path) -> None:
    creds = CredentialsFile(users)
    assert creds.users == {"alice@example.org", "bob"}
    assert creds.verify("alice@example.org", "correct horse")
    assert not creds.verify("alice@example.org", "correct horse ")
    assert not creds.verify("bob", "correct horse")
    assert not creds.verify("mallory", "hunter2")
    assert not creds.verify("Bob", "hunter2")  # exact names: no case folding


def test_unknown_user_costs_one_hash_like_a_known_one(
    users: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = CredentialsFile(users)
    counter = Counter(monkeypatch)
    assert not creds.verify("bob", "wrong")
    assert counter.calls == [LN]
    assert not creds.verify("nobody", "wrong")
    # the dummy hash has the costs of the file's entries: same work, same time
    assert counter.calls == [LN, LN]


def test_dummy_hash_uses_the_default_cost_for_an_empty_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users"
    path.write_text("# nobody yet\n")
    creds = CredentialsFile(path)
    counter = Counter(monkeypatch)
    assert not creds.verify("nobody", "pw")
    assert counter.calls == [14]


def test_changes_are_picked_up_without_restart(users: Path) -> None:
    creds = CredentialsFile(users)
    assert creds.verify("bob", "hunter2")
    assert add_user(users, "bob", "new password", ln=LN) is True  # replaced
    assert not creds.verify("bob", "hunter2")
    assert creds.verify("bob", "new password")
    assert add_user(users, "carol", "pw", ln=LN) is False  # added
    assert creds.verify("carol", "pw")
    assert remove_user(users, "alice@example.org") is True
    assert not creds.verify("alice@example.org", "correct horse")
    assert remove_user(users, "alice@example.org") is False
    assert creds.users == {"bob", "carol"}


def test_add_user_keeps_comments_order_and_other_users(users: Path) -> None:
    users.write_text("# site users\n" + users.read_text() + "\n# trailing comment\n")
    add_user(users, "alice@example.org", "changed", ln=LN)
    text = users.read_text()
    assert text.startswith("# site users\n") and "# trailing comment" in text
    names = [ln.split(":")[0] for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert names == ["alice@example.org", "bob"]
    assert CredentialsFile(users).verify("alice@example.org", "changed")


def test_add_user_leaves_no_temporary_files_only_the_lock_file(users: Path) -> None:
    add_user(users, "carol", "pw", ln=LN)
    remove_user(users, "carol")
    assert sorted(p.name for p in users.parent.iterdir()) == ["users", "users.lock"]
    lock = users.parent / "users.lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600 and lock.stat().st_size == 0


@pytest.mark.parametrize("user", ["", "a:b", "a b", "#root", "tab\there", "nl\n"])
def test_bad_user_names_are_refused(tmp_path: Path, user: str) -> None:
    with pytest.raises(ValueError):
        add_user(tmp_path / "users", user, "pw", ln=LN)
    assert not (tmp_path / "users").exists()


def test_empty_password_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        add_user(tmp_path / "users", "bob", "", ln=LN)


def test_utf8_names_and_passwords(tmp_path: Path) -> None:
    path = tmp_path / "users"
    add_user(path, "jörg@例え.jp", "pässwörd✓", ln=LN)
    creds = CredentialsFile(path)
    assert creds.verify("jörg@例え.jp", "pässwörd✓")
    # SASLprep (NFKC): the decomposed forms are the same name and password
    assert creds.verify("jo\u0308rg@例え.jp", "pa\u0308sswo\u0308rd✓")
    assert not creds.verify("jörg@例え.jp", "passwörd✓")


def test_bad_lines_are_skipped_with_a_warning_that_does_not_echo_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = "bob:" + hash_password("pw", ln=LN)
    text = f"{good}\nmallory:plaintext-secret\nno colon here\n\n# c\n"
    with caplog.at_level(logging.WARNING, "mailwire.adapters.credentials"):
        entries = parse_credentials(text, origin="f")
    assert list(entries) == ["bob"]
    assert "line 2" in caplog.text and "line 3" in caplog.text
    assert "plaintext-secret" not in caplog.text


def test_group_readable_file_is_loaded_with_a_warning(
    users: Path, caplog: pytest.LogCaptureFixture
) -> None:
    os.chmod(users, 0o640)
    with caplog.at_level(logging.WARNING, "mailwire.adapters.credentials"):
        creds = CredentialsFile(users)
    assert creds.verify("bob", "hunter2")
    assert "chmod 600" in caplog.text


def test_missing_file_is_an_error_at_start_but_not_later(users: Path) -> None:
    with pytest.raises(OSError):
        CredentialsFile(users.parent / "absent")
    creds = CredentialsFile(users)
    users.unlink()
    assert creds.verify("bob", "hunter2")  # the last good contents stay in force


def test_submit_runs_on_the_pool_and_close_stops_it(users: Path) -> None:
    creds = CredentialsFile(users)
    good = creds.submit("bob", "hunter2")
    bad = creds.submit("bob", "nope")
    assert good.result(10) is True and bad.result(10) is False
    pool = creds._pool
    assert pool is not None
    creds.close()
    assert creds._pool is None
    with pytest.raises(RuntimeError):
        creds.submit("bob", "hunter2")


def test_remove_user_of_a_missing_user_leaves_the_file_alone(users: Path) -> None:
    before = users.stat()
    assert remove_user(users, "nobody") is False
    after = users.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert remove_user(users.parent / "absent", "bob") is False
    assert not (users.parent / "absent").exists()


# --- concurrent updates: the lock file ----------------------------------------------------------


def test_concurrent_writers_lose_no_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The race made certain: every writer, between reading the file and renaming its new
    # version into place, waits until each of the others has either read the file as well
    # (possible only without the lock: then all of them read the same old file and all but
    # one update are lost) or is about to wait for the lock (then they queue behind it).
    path = tmp_path / "users"
    add_user(path, "first", "pw", ln=LN)
    writers = 6
    arrived = 0
    cond = threading.Condition()
    local = threading.local()
    real_flock, real_replace = fcntl.flock, _credentials._replace

    def arrive() -> None:
        nonlocal arrived
        if not getattr(local, "arrived", False):
            local.arrived = True
            with cond:
                arrived += 1
                cond.notify_all()

    def flock(fd: Any, operation: int) -> None:
        if operation & fcntl.LOCK_EX:
            arrive()  # about to wait for the lock
        real_flock(fd, operation)

    def replace(target: str, data: bytes) -> None:
        arrive()  # has read the file (a no-op if it came through the lock)
        with cond:
            assert cond.wait_for(lambda: arrived == writers, timeout=30)  # a guard, not a timing
        real_replace(target, data)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(_credentials, "_replace", replace)
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            add_user(path, f"user{n}", f"pw{n}", ln=LN)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and arrived == writers
    creds = CredentialsFile(path)
    assert creds.users == {"first"} | {f"user{n}" for n in range(writers)}
    assert all(creds.verify(f"user{n}", f"pw{n}") for n in range(writers))


def _add_users(path: str, names: list[str], barrier: Any) -> None:
    barrier.wait()
    for name in names:
        add_user(path, name, "pw", ln=1)
    remove_user(path, names[0])


def test_concurrent_processes_lose_no_update(tmp_path: Path) -> None:
    # real processes, released together by a barrier, each adding ten users and removing one
    path = str(tmp_path / "users")
    processes, per_process = 4, 10
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(processes)
    names = [[f"p{p}u{u}" for u in range(per_process)] for p in range(processes)]
    workers = [
        context.Process(target=_add_users, args=(path, names[p], barrier)) for p in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [worker.exitcode for worker in workers] == [0] * processes
    expected = {name for group in names for name in group[1:]}
    assert CredentialsFile(path).users == expected


def test_the_lock_is_held_from_read_to_rename_and_readers_do_not_need_it(
    users: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = _credentials._replace
    seen: list[bool] = []

    def replace(target: str, data: bytes) -> None:
        fd = os.open(f"{users}.lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by the writer
        finally:
            os.close(fd)
        # a reader meanwhile: no lock needed, it sees the old file
        seen.append(CredentialsFile(users).verify("bob", "hunter2"))
        real_replace(target, data)

    monkeypatch.setattr(_credentials, "_replace", replace)
    add_user(users, "bob", "changed", ln=LN)
    assert seen == [True]
    assert CredentialsFile(users).verify("bob", "changed")
    fd = os.open(f"{users}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released afterwards
    finally:
        os.close(fd)


def test_a_reader_loads_the_file_while_another_tool_holds_the_lock(users: Path) -> None:
    fd = os.open(f"{users}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        creds = CredentialsFile(users)
        assert creds.verify("bob", "hunter2")
    finally:
        os.close(fd)


# --- SASLprep (RFC 4013) ------------------------------------------------------------------------


def _lines_of(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_add_user_stores_the_prepared_name_and_hashes_the_prepared_password(
    tmp_path: Path,
) -> None:
    path = tmp_path / "users"
    assert add_user(path, "I\u00adX", "pa\u0308ss\u00a0word", ln=LN) is False
    [line] = _lines_of(path)
    assert line.startswith("IX:$scrypt$")
    assert verify_password("p\u00e4ss word", line.split(":", 1)[1])  # prepared, hashed
    creds = CredentialsFile(path)
    assert creds.users == {"IX"}
    for name in ("IX", "I\u00adX", "\u2168"):  # RFC 4013 3: all the same user
        assert creds.verify(name, "p\u00e4ss word")
        assert creds.verify(name, "pa\u0308ss\u2000word")
    assert not creds.verify("ix", "p\u00e4ss word")  # no case folding
    assert add_user(path, "\u2168", "other", ln=LN) is True  # the same user: changed
    assert len(_lines_of(path)) == 1


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("zq\u0007zq", "ASCII control character"),
        ("zq\ue000zq", "private use"),
        ("\u0627zq", "right-to-left"),
        ("zq\U0001f600", "unassigned"),  # a stored string: RFC 3454 7
        ("\u00ad\u200d", "empty after SASLprep"),
    ],
)
def test_add_user_refuses_passwords_saslprep_prohibits_without_echoing_them(
    tmp_path: Path, password: str, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        add_user(tmp_path / "users", "bob", password, ln=LN)
    assert "U+" not in str(info.value) and "zq" not in str(info.value)
    assert not (tmp_path / "users").exists()


@pytest.mark.parametrize(
    ("user", "reason"),
    [
        ("bob\ue000", r"private use .*U\+E000"),
        ("\u0627b", "right-to-left"),
        ("bob\U0001f600", "unassigned"),
        ("a\u00a0b", "white space"),  # mapped to " ", then refused by check_user_name
    ],
)
def test_add_user_refuses_user_names_saslprep_prohibits(
    tmp_path: Path, user: str, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        add_user(tmp_path / "users", user, "pw", ln=LN)
    assert not (tmp_path / "users").exists()


def test_auth_allows_unassigned_code_points_where_passwd_refuses_them(tmp_path: Path) -> None:
    path = tmp_path / "users"
    encoded = hash_password("pw\U0001f600", ln=LN)  # written by another tool
    path.write_text(f"bob:{encoded}\n")
    assert CredentialsFile(path).verify("bob", "pw\U0001f600")


def test_passwords_saslprep_prohibits_fail_at_auth_at_the_cost_of_one_hash(
    users: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = CredentialsFile(users)
    counter = Counter(monkeypatch)
    for user in ("bob", "nobody", "bob\ue000", "\u0627b"):
        for password in ("hunter2\u0007", "\ud800", "\u0627x", "\ufffe"):
            assert creds.verify(user, password) is False
    assert counter.calls == [LN] * 16
    assert creds.submit("bob", "hunter\u00002").result(10) is False  # no exception either


def test_unknown_users_cost_what_known_ones_do_with_a_password_saslprep_changes(
    users: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = CredentialsFile(users)
    counter = Counter(monkeypatch)
    # "w\u00f6rd" is its own SASLprep: one try.  "wo\u0308rd" prepares to it: the prepared
    # form, then the raw one (the fallback for old hashes) -- for unknown users as well
    for password, tries in (("w\u00f6rd", 1), ("wo\u0308rd", 2)):
        for user in ("bob", "nobody", "bo\u00adb"):
            del counter.calls[:]
            assert not creds.verify(user, password)
            assert counter.calls == [LN] * tries, (user, password)


# files written before SASLprep: raw names and hashes of raw passwords


def _legacy(path: Path, *entries: tuple[str, str]) -> Path:
    path.write_text("".join(f"{user}:{hash_password(pw, ln=LN)}\n" for user, pw in entries))
    return path


def test_hashes_of_raw_passwords_still_verify(tmp_path: Path) -> None:
    path = _legacy(tmp_path / "users", ("bob", "pa\u0308ss"), ("carol", "x\u2168"))
    creds = CredentialsFile(path)
    assert creds.verify("bob", "pa\u0308ss")  # as set: the raw fallback
    assert creds.verify("carol", "x\u2168")
    assert creds.verify("carol", "xIX") is False  # the fallback is the raw string only
    assert creds.verify("bob", "pass") is False


def test_names_stored_before_saslprep_are_found_under_their_prepared_form(
    tmp_path: Path,
) -> None:
    path = _legacy(tmp_path / "users", ("jo\u0308rg", "a"), ("\u2168", "b"), ("IX", "c"))
    creds = CredentialsFile(path)
    assert creds.verify("j\u00f6rg", "a") and creds.verify("jo\u0308rg", "a")
    # an exact prepared name wins over an old name that prepares to the same
    assert creds.verify("\u2168", "c") and creds.verify("IX", "c")
    assert not creds.verify("IX", "b")


def test_add_user_rewrites_an_old_line_of_the_same_user_in_place(tmp_path: Path) -> None:
    path = _legacy(tmp_path / "users", ("a", "1"), ("jo\u0308rg", "2"), ("z", "3"))
    assert add_user(path, "j\u00f6rg", "new", ln=LN) is True
    assert [line.split(":")[0] for line in _lines_of(path)] == ["a", "j\u00f6rg", "z"]
    assert CredentialsFile(path).verify("jo\u0308rg", "new")
    assert remove_user(path, "jo\u0308rg") is True  # either form names the user
    assert [line.split(":")[0] for line in _lines_of(path)] == ["a", "z"]
    _legacy(path, ("a", "1"), ("\u2168", "2"))
    assert remove_user(path, "IX") is True
    assert [line.split(":")[0] for line in _lines_of(path)] == ["a"]


def test_stored_names_saslprep_prohibits_are_reported_and_cannot_log_in(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _legacy(tmp_path / "users", ("\u0627b", "pw"), ("bob", "pw"))
    with caplog.at_level(logging.WARNING, "mailwire.adapters.credentials"):
        creds = CredentialsFile(path)
    assert "1 user name(s) that SASLprep" in caplog.text
    assert creds.users == {"\u0627b", "bob"}
    assert not creds.verify("\u0627b", "pw") and creds.verify("bob", "pw")
    assert remove_user(path, "\u0627b") is True  # but they can be removed


# --- mailwire passwd ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "password", "message"),
    [
        ("bob", "secret\u200e", "prohibits this password: it contains a display property"),
        ("bob", "secret\U0001f600", "prohibits this password: it contains a code point unassig"),
        ("bob\u0007", "pw", "prohibits this user name: it contains an ASCII control"),
        ("\u05d0b", "pw", "prohibits this user name: it mixes right-to-left"),
    ],
)
def test_passwd_refuses_what_saslprep_prohibits_with_status_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    user: str,
    password: str,
    message: str,
) -> None:
    path = tmp_path / "users"
    monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
    assert cli.main(["passwd", "--stdin", "--cost", "4", str(path), user]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mailwire: SASLprep (RFC 4013) ") and message in err
    assert "secret" not in err
    assert not path.exists()


def test_passwd_stores_prepared_names_and_passwords(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users"
    monkeypatch.setattr(sys, "stdin", io.StringIO("\u2163\u00a0pa\u0308ss\n"))
    assert cli.main(["passwd", "--stdin", "--cost", "4", str(path), "I\u00adX"]) == 0
    assert CredentialsFile(path).verify("IX", "IV p\u00e4ss")
    assert cli.main(["passwd", "--delete", str(path), "\u2168"]) == 0
    assert CredentialsFile(path).users == frozenset()


# --- over SMTP ----------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, int]]:
    users = tmp_path / "users"
    add_user(users, "j\u00f6rg", "pa\u0308ss \u2168", ln=LN)
    settings = cli.Settings()
    settings.update(
        {"runtime": "threads", "listen": ["127.0.0.1:0"], "hostname": "mx.test",
         "spool": str(tmp_path / "spool"), "relay_networks": [], "credentials": str(users),
         "submission_listen": ["127.0.0.1:0"], "allow_plaintext_auth": True,
         "auth_failure_delay": 0.0},
        "test",
    )  # fmt: skip
    controller, _ = cli.build(settings)
    controller.start()
    try:
        yield controller.addresses[1]
    finally:
        controller.stop()
        close = getattr(controller.handler, "close", None)
        if close is not None:
            close()


def _auth_plain(address: tuple[str, int], user: str, password: str) -> int:
    with smtplib.SMTP(address[0], address[1], timeout=CLIENT_TIMEOUT) as client:
        client.ehlo()
        response = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        code, _ = client.docmd("AUTH", f"PLAIN {response}")
        assert client.noop()[0] == 250  # the session goes on either way
        return code


def test_auth_plain_prepares_name_and_password_and_prohibited_ones_get_535(
    server: tuple[str, int],
) -> None:
    assert _auth_plain(server, "jo\u0308rg", "p\u00e4ss\u00a0IX") == 235
    assert _auth_plain(server, "j\u00f6rg", "pa\u0308ss \u2168") == 235
    assert _auth_plain(server, "j\u00f6rg", "p\u00e4ss IX\u200e") == 535  # C.8
    assert _auth_plain(server, "j\u00f6rg\ue000", "p\u00e4ss IX") == 535
    assert _auth_plain(server, "j\u00f6rg", "pass IX") == 535


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs a process allowed on two CPUs or more",
)
def test_the_hashing_pool_runs_on_every_cpu_even_when_started_from_a_pinned_thread(
    tmp_path: Path,
) -> None:
    # On the threads runtime the first AUTH comes from a session thread pinned to one CPU
    # (adapters/threads.py); threads inherit their creator's mask, and the pool is started
    # by the first submit().
    path = tmp_path / "users"
    add_user(path, "bob", "pw", ln=LN)
    users = CredentialsFile(path)
    allowed = os.sched_getaffinity(0)
    seen: list[set[int]] = []

    def pinned_session() -> None:
        os.sched_setaffinity(0, {min(allowed)})
        assert users.submit("bob", "pw").result()
        seen.append(users._pool.submit(os.sched_getaffinity, 0).result())  # type: ignore[union-attr]

    try:
        thread = threading.Thread(target=pinned_session)
        thread.start()
        thread.join()
        assert seen == [allowed]
    finally:
        users.close()

"""Tests of adapters/_credentials.py: the file of salted scrypt hashes behind AUTH."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwire.adapters import _credentials
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


@settings(max_examples=25, deadline=None)
@given(password=st.text(max_size=40), other=st.text(max_size=40))
def test_verify_accepts_only_the_password_it_was_made_from(password: str, other: str) -> None:
    encoded = hash_password(password, ln=1)
    assert verify_password(password, encoded)
    assert verify_password(other, encoded) == (other == password)
    assert ScryptHash.parse(encoded).format() == encoded


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


def test_add_user_leaves_no_temporary_files(users: Path) -> None:
    add_user(users, "carol", "pw", ln=LN)
    assert sorted(p.name for p in users.parent.iterdir()) == ["users"]


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
    # no SASLprep/normalisation: the decomposed form is a different password
    assert not creds.verify("jörg@例え.jp", "pa\u0308sswo\u0308rd✓")


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

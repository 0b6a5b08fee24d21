# The credentials file behind SMTP AUTH (RFC 4954) on the reference server: user names with
# salted, deliberately slow password hashes, never the passwords themselves.
#
# Format.  A UTF-8 text file, one user per line:
#
#     # comment lines start with "#"; blank lines are ignored
#     alice@example.org:$scrypt$ln=14,r=8,p=1$<salt>$<hash>
#
# ``ln`` is log2 of scrypt's CPU/memory cost N, ``r`` its block size, ``p`` its parallelism
# (RFC 7914); ``<salt>`` (16 bytes from os.urandom) and ``<hash>`` (32 bytes of scrypt output)
# are standard base64 without padding.  The user name is everything before the first ":"
# (so it cannot contain ":"; it may be an address).  Lines that do not parse are skipped with
# a warning naming the line number (never its content).  A later line for the same user
# replaces an earlier one.  ``add_user``/``remove_user`` (``mailwire passwd``) are the
# intended way to edit it; another tool that edits it should hold the same lock (below).
#
# Strategy.  scrypt (RFC 7914, hashlib.scrypt) is memory-hard: ln=14, r=8 takes 16 MiB and
# ~30-50 ms of CPU per check, which makes an offline dictionary attack on a stolen file
# expensive.  The costs are stored per line, so they can be raised later without
# invalidating existing entries.
#
# SASLprep.  User names and passwords are prepared with SASLprep (RFC 4013,
# protocol/_saslprep.py) before they are hashed or stored (add_user: as "stored strings",
# code points unassigned in Unicode 3.2 refused) and before they are checked (verify: as
# "queries", unassigned code points allowed), as RFC 4616 2 requires for PLAIN; LOGIN gets
# the same.  So "I\u00adX", "\u2168" and "IX" are one user name, and a password typed
# decomposed (NFD) matches one set composed.  No case folding: "Bob" and "bob" differ.
#   Compatibility fallbacks.  Files written before SASLprep hold names and hashes of the raw
# strings.  For printable ASCII SASLprep is the identity, so nothing changes there.  For the
# rest: (1) a stored name is looked up under its prepared form too, so "jo\u0308rg" in the
# file is found when "j\u00f6rg" logs in (an exact prepared name wins over such an alias);
# (2) when the hash does not match the prepared password and the password as received
# differs from it, the raw password is tried as well -- without this, a user whose old
# non-ASCII password was hashed raw would be locked out until an admin reset it.  That
# second try is one more scrypt, which an unknown user pays too (two dummy hashes), so the
# response time still does not tell which user names exist.  A password or name that
# SASLprep prohibits at AUTH time simply fails (one dummy hash, then 535), never an error:
# an old password that SASLprep now prohibits (a control character, a bidi violation) has
# to be set again.  add_user() rewrites an old unprepared line of the same user in place.
#   Identity.  Many strings now log in as one user ("b\u00adob" is "bob"), but the engine
# records the name as received (Session.authenticated_as): anything keyed per user (the
# per-user rate limits) must key on user_key(name) (SASLprep as a query), or a user gets a
# fresh bucket per spelling.
#
# Invariants.
#   * The file never holds a password, only (salt, scrypt(password, salt)).
#   * verify() costs the same scrypt work whether or not the user exists (one hash; two
#     for a password SASLprep changes): an unknown user is checked against a dummy hash
#     with the same costs as the file's first entry, so the response time does not tell
#     which user names exist.  The digest comparison is
#     hmac.compare_digest (constant time).
#   * The file is re-read when its inode, size or mtime change (checked by one stat() per
#     verification), so ``mailwire passwd`` takes effect without a restart.  If it cannot be
#     read any more, the last good contents stay in force and an error is logged.
#   * A file readable by group or others is loaded anyway, with a warning in the log: the
#     hashes are salted and slow, and refusing to start would turn a permission slip into an
#     outage.  add_user() always writes mode 0600.
#   * add_user() replaces the file atomically: a temporary file in the same directory,
#     written, fsync()ed, renamed over the old one, then the directory fsync()ed.
#   * Read-modify-write is serialized: add_user()/remove_user() hold an exclusive
#     fcntl.flock() on ``FILE.lock`` (created 0600 next to the file, never deleted -- deleting
#     a lock file lets two writers lock different inodes) from before they read the file
#     until after the rename, so two ``mailwire passwd`` runs at the same moment both land.
#     The data file itself is not locked: each rename replaces its inode.  Readers
#     (CredentialsFile) take no lock: the rename is atomic, they see the old or the new file.
#     The scrypt hash is computed before the lock is taken (it is the slow part).
#
# Event loops.  A check costs tens of milliseconds of CPU, far too long for an asyncio or
# trio event loop.  submit() runs verify() on a small thread pool (hashlib.scrypt releases
# the GIL) and returns a concurrent.futures.Future; the handler (adapters/cli.py) awaits it
# without blocking the loop.
from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from mailwire.protocol._saslprep import SASLprepError, saslprep

log = logging.getLogger("mailwire.adapters.credentials")

SCRYPT_LN = 14  # N = 2**14: 16 MiB with r = 8, ~30-50 ms of CPU
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
_PREFIX = "$scrypt$"
_LOCK_SUFFIX = ".lock"  # FILE.lock: the lock add_user()/remove_user() hold while editing FILE
_HEADER = """\
# mailwire credentials: one user per line, "user:$scrypt$ln=N,r=R,p=P$<salt>$<hash>"
# (salted scrypt hashes, base64; never passwords).  Edit with: mailwire passwd FILE USER
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class ScryptHash:
    """One salted scrypt password hash.

    Attributes:
        ln: log2 of the CPU/memory cost N (1..20).
        r: the block size (1..32).
        p: the parallelism (1..16).
        salt: the random salt.
        digest: scrypt(password, salt), HASH_BYTES long.
    """

    ln: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> ScryptHash:
        """Parse ``$scrypt$ln=14,r=8,p=1$<salt>$<hash>``.

        Raises:
            ValueError: not in that form, or parameters out of range.
        """
        if not text.startswith(_PREFIX):
            raise ValueError("not a $scrypt$ hash")
        parts = text[len(_PREFIX) :].split("$")
        if len(parts) != 3:
            raise ValueError("a $scrypt$ hash has parameters, salt and hash")
        params: dict[str, int] = {}
        for item in parts[0].split(","):
            name, sep, value = item.partition("=")
            if not sep or name not in ("ln", "r", "p") or name in params or not value.isdigit():
                raise ValueError("bad scrypt parameters")
            params[name] = int(value)
        if set(params) != {"ln", "r", "p"}:
            raise ValueError("scrypt parameters ln, r and p are all needed")
        return cls(
            ln=params["ln"], r=params["r"], p=params["p"], salt=_b64d(parts[1]),
            digest=_b64d(parts[2]),
        )  # fmt: skip

    def __post_init__(self) -> None:
        if not (1 <= self.ln <= 20 and 1 <= self.r <= 32 and 1 <= self.p <= 16):
            raise ValueError("scrypt parameters out of range (ln 1-20, r 1-32, p 1-16)")
        if not self.salt or len(self.digest) != HASH_BYTES:
            raise ValueError("empty salt or wrong hash length")

    def format(self) -> str:
        """The text form, as stored in the file."""
        return (
            f"{_PREFIX}ln={self.ln},r={self.r},p={self.p}${_b64e(self.salt)}${_b64e(self.digest)}"
        )

    def matches(self, password: str) -> bool:
        """True if ``password`` hashes to this digest (one scrypt, constant-time compare)."""
        computed = _scrypt(password.encode("utf-8"), self.salt, self.ln, self.r, self.p)
        return hmac.compare_digest(computed, self.digest)


def _scrypt(password: bytes, salt: bytes, ln: int, r: int, p: int) -> bytes:
    # The one place a hash is computed (tests count the calls).  maxmem: OpenSSL needs
    # 128*r*(N + 2 + p) bytes; its default cap (32 MiB) would refuse ln >= 15.
    n = 1 << ln
    maxmem = 128 * r * (n + 2 + p) + 65536
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=HASH_BYTES, maxmem=maxmem)


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64d(text: str) -> bytes:
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("bad base64") from None


def _query_form(text: str) -> str | None:
    """SASLprep as a query (the AUTH side), or None if SASLprep prohibits ``text``."""
    try:
        return saslprep(text, allow_unassigned=True)
    except SASLprepError:
        return None


def user_key(user: str) -> str:
    """The user ``user`` logs in as, for anything kept per user (limits, the PLAIN
    authorization identity): SASLprep'd as a query, the key verify() looks up; ``user``
    itself when SASLprep prohibits it (such a name never logs in)."""
    key = _query_form(user)
    return user if key is None else key


def _stored_name(user: str) -> str:
    """``user`` as add_user() stores it: SASLprep'd as a stored string, then checked."""
    try:
        name = saslprep(user, allow_unassigned=False)
    except SASLprepError as exc:
        shown = f" (U+{ord(exc.code_point):04X})" if exc.code_point is not None else ""
        raise ValueError(
            f"SASLprep (RFC 4013) prohibits this user name: it {exc.reason}{shown}"
        ) from None
    check_user_name(name)
    return name


def _stored_password(password: str) -> str:
    """``password`` as add_user() hashes it; errors never show any of its characters."""
    if not password:
        raise ValueError("the password must not be empty")
    try:
        prepared = saslprep(password, allow_unassigned=False)
    except SASLprepError as exc:
        raise ValueError(f"SASLprep (RFC 4013) prohibits this password: it {exc.reason}") from None
    if not prepared:
        raise ValueError("the password is empty after SASLprep (RFC 4013)")
    return prepared


def hash_password(
    password: str,
    *,
    salt: bytes | None = None,
    ln: int = SCRYPT_LN,
    r: int = SCRYPT_R,
    p: int = SCRYPT_P,
) -> str:
    """Hash a password for the credentials file.

    Args:
        password: the password, hashed as UTF-8 exactly as given (add_user() applies
            SASLprep before it calls this).
        salt: the salt; default SALT_BYTES fresh bytes from os.urandom.
        ln: log2 of the scrypt cost N (default 14; tests use ~4).
        r: scrypt block size.
        p: scrypt parallelism.

    Returns:
        ``$scrypt$ln=..,r=..,p=..$<salt>$<hash>``.

    Raises:
        ValueError: parameters out of range or an empty salt.
    """
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    if not salt:
        raise ValueError("the salt must not be empty")
    ScryptHash(ln=ln, r=r, p=p, salt=salt, digest=bytes(HASH_BYTES))  # validates the costs
    digest = _scrypt(password.encode("utf-8"), salt, ln, r, p)
    return ScryptHash(ln=ln, r=r, p=p, salt=salt, digest=digest).format()


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches ``encoded`` (a hash_password() result).

    The password is compared exactly as given (no SASLprep: CredentialsFile.verify does that).
    Like every PBKDF2/HMAC-based hash, scrypt pads a key of up to 64 octets with zero
    octets, so "pw" and "pw\0" match the same hash; SASLprep, which prohibits control
    characters, keeps the second out of AUTH.

    Raises:
        ValueError: ``encoded`` is not a valid hash.
    """
    return ScryptHash.parse(encoded).matches(password)


def check_user_name(user: str) -> None:
    """Check that ``user`` can be stored in a credentials file.

    Raises:
        ValueError: empty, or contains ":", white space or control characters, or starts
            with "#".
    """
    if not user or user.startswith("#"):
        raise ValueError("a user name must not be empty or start with '#'")
    if ":" in user or any(c.isspace() or not c.isprintable() for c in user):
        raise ValueError("a user name must not contain ':', white space or control characters")


def parse_credentials(text: str, *, origin: str = "credentials") -> dict[str, ScryptHash]:
    """The entries of a credentials file's text; bad lines are skipped with a warning.

    Args:
        text: the file's contents.
        origin: the file name, for the warnings.

    Returns:
        user -> hash, in file order.
    """
    entries: dict[str, ScryptHash] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        try:
            if not sep:
                raise ValueError("no ':'")
            check_user_name(user)
            parsed = ScryptHash.parse(encoded)
        except ValueError as exc:
            log.warning("%s line %d skipped: %s", origin, number, exc)
            continue
        if user in entries:
            log.warning("%s line %d: user repeated, this line wins", origin, number)
        entries[user] = parsed
    return entries


class CredentialsFile:
    """The users of a credentials file, re-read when the file changes.

    Args:
        path: the file (see the format at the top of adapters/_credentials.py).
        workers: threads of the pool submit() uses.

    Raises:
        OSError: the file cannot be read (at construction only; later failures keep the last
            good contents).
    """

    def __init__(self, path: str | os.PathLike[str], *, workers: int = 2) -> None:
        self.path = os.fspath(path)
        self.workers = workers
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, ScryptHash] = {}
        self._lookup: dict[str, ScryptHash] = {}  # by SASLprep'd name (see _lookup_table)
        self._dummy = ScryptHash(
            ln=SCRYPT_LN, r=SCRYPT_R, p=SCRYPT_P, salt=os.urandom(SALT_BYTES),
            digest=os.urandom(HASH_BYTES),
        )  # fmt: skip
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # the CPUs the pool's threads may use: those of the thread that made this object.
        # The pool is started by the first submit(), on the threads runtime from a session
        # thread pinned to one CPU (adapters/threads.py), whose mask new threads inherit;
        # hashing belongs on every core.
        self._cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        self._closed = False
        self._refresh(initial=True)

    @property
    def users(self) -> frozenset[str]:
        """The user names currently loaded."""
        self._refresh()
        return frozenset(self._entries)

    def verify(self, user: str, password: str) -> bool:
        """True if ``user`` exists and ``password`` is theirs.  Blocks for one scrypt (two
        for a wrong password that SASLprep changes: the raw form is tried too).

        Both are prepared with SASLprep (RFC 4013) as queries first; either one being
        prohibited makes it False.  An unknown user costs the same scrypt work (against a
        dummy hash) and returns False.
        """
        self._refresh()
        name = _query_form(user)
        entry = self._lookup.get(name) if name is not None else None
        prepared = _query_form(password)
        if prepared is None:  # RFC 4013 2.3: not a password at all -- but the same cost
            self._dummy.matches("")  # (it might not even encode: a lone surrogate)
            return False
        # the raw form second: hashes stored before SASLprep was applied (see the top)
        tries = (prepared,) if prepared == password else (prepared, password)
        if entry is None:
            for candidate in tries:
                self._dummy.matches(candidate)
            return False
        return any(entry.matches(candidate) for candidate in tries)

    def submit(self, user: str, password: str) -> concurrent.futures.Future[bool]:
        """verify() on the pool, for callers that must not block (event loops).

        Raises:
            RuntimeError: after close().
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("credentials file closed")
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.workers, thread_name_prefix="mailwire-scrypt", initializer=self._unpin
                )
            pool = self._pool
        return pool.submit(self.verify, user, password)

    def _unpin(self) -> None:
        if self._cpus is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, self._cpus)

    def close(self) -> None:
        """Stop the pool (waits for checks in progress)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _refresh(self, *, initial: bool = False) -> None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            if initial:
                raise
            with self._lock:
                if self._stamp is not None:
                    log.error("credentials %s unreadable, keeping the last: %s", self.path, exc)
                    self._stamp = None
            return
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        with self._lock:
            if stamp == self._stamp:
                return
            try:
                with open(self.path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                if initial:
                    raise OSError(f"cannot read credentials {self.path}: {exc}") from exc
                log.error("credentials %s unreadable, keeping the last: %s", self.path, exc)
                return
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning(
                    "credentials %s is accessible to group/others (mode %o): chmod 600 it",
                    self.path,
                    stat.S_IMODE(st.st_mode),
                )
            entries = parse_credentials(text, origin=self.path)
            first = next(iter(entries.values()), None)
            if first is not None and (first.ln, first.r, first.p) != (
                self._dummy.ln,
                self._dummy.r,
                self._dummy.p,
            ):
                self._dummy = ScryptHash(
                    ln=first.ln, r=first.r, p=first.p, salt=self._dummy.salt,
                    digest=self._dummy.digest,
                )  # fmt: skip
            lookup, unusable = _lookup_table(entries)
            if unusable:
                log.warning(
                    "credentials %s: %d user name(s) that SASLprep (RFC 4013) prohibits "
                    "cannot log in",
                    self.path,
                    unusable,
                )
            self._entries = entries
            self._lookup = lookup
            self._stamp = stamp
            log.info("credentials %s: %d user(s) loaded", self.path, len(entries))


def _lookup_table(entries: dict[str, ScryptHash]) -> tuple[dict[str, ScryptHash], int]:
    # SASLprep'd name -> hash.  A name stored in prepared form is its own key; a name stored
    # before SASLprep (e.g. decomposed) is an alias under its prepared form unless a
    # prepared name already has that key.  Returns the table and how many stored names
    # SASLprep prohibits (nobody can log in as those).
    lookup: dict[str, ScryptHash] = {}
    aliases: dict[str, ScryptHash] = {}
    unusable = 0
    for name, entry in entries.items():
        key = _query_form(name)
        if key is None:
            unusable += 1
        elif key == name:
            lookup[key] = entry
        else:
            aliases.setdefault(key, entry)
    for key, entry in aliases.items():
        lookup.setdefault(key, entry)
    return lookup, unusable


def add_user(
    path: str | os.PathLike[str], user: str, password: str, *, ln: int = SCRYPT_LN
) -> bool:
    """Add ``user`` to the credentials file (created if missing), or change their password.

    The user name and the password are prepared with SASLprep (RFC 4013) as stored strings
    first; the prepared name is stored and the prepared password hashed.  The file is
    replaced atomically (mode 0600) under the file's lock; comments and other users are
    kept.  A line of the same user stored before SASLprep (a name that prepares to the same)
    is replaced in place.

    Args:
        path: the credentials file.
        user: the user name (see check_user_name).
        password: the new password (must not be empty).
        ln: log2 of the scrypt cost.

    Returns:
        True if the user existed (password changed), False if added.

    Raises:
        ValueError: a bad user name, an empty password, or one SASLprep prohibits (the
            message names the kind of character; for a password never the character).
        OSError: the file could not be read, written or locked.
    """
    name = _stored_name(user)
    line = f"{name}:{hash_password(_stored_password(password), ln=ln)}"  # before the lock
    return _rewrite(path, name, line)


def remove_user(path: str | os.PathLike[str], user: str) -> bool:
    """Remove ``user`` from the credentials file (atomically and locked, as add_user).

    Lines whose name is ``user`` or prepares (SASLprep) to the same as ``user`` go.  The
    file is not written (nor created) if there is no such user.

    Returns:
        True if the user was there.

    Raises:
        OSError: the file could not be read, written or locked.
    """
    return _rewrite(path, user, None)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    # flock() locks belong to the open file description: every call opens its own, so two
    # threads of one process exclude each other as two processes do.  Closing unlocks.
    fd = os.open(path + _LOCK_SUFFIX, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _rewrite(path: str | os.PathLike[str], user: str, line: str | None) -> bool:
    path = os.fspath(path)
    keys = {user}
    prepared = _query_form(user)
    if prepared is not None:
        keys.add(prepared)

    def same_user(name: str) -> bool:
        if name in keys:
            return True
        form = _query_form(name)
        return form is not None and form in keys

    with _locked(path):  # from the read to the rename: no update is lost
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            if line is None:
                return False
            lines = _HEADER.splitlines()
        kept: list[str] = []
        found = False
        for existing in lines:
            stripped = existing.strip()
            if stripped and not stripped.startswith("#") and same_user(stripped.partition(":")[0]):
                if not found and line is not None:
                    kept.append(line)  # in place: the file's order is kept
                found = True
                continue
            kept.append(existing)
        if line is None and not found:
            return False  # nothing to remove: the file stays as it is
        if not found and line is not None:
            kept.append(line)
        _replace(path, ("\n".join(kept) + "\n").encode("utf-8"))
    return found


def _replace(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".credentials-", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


__all__ = [
    "CredentialsFile",
    "ScryptHash",
    "add_user",
    "check_user_name",
    "hash_password",
    "parse_credentials",
    "remove_user",
    "user_key",
    "verify_password",
]

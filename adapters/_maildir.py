# Local delivery: a Maildir per recipient, and a Python callable when embedded.
#
# Maildir (D. J. Bernstein's maildir(5) specification, as Postfix, Dovecot and Courier use it):
# a mailbox is a directory with tmp/, new/ and cur/.  A message is written to tmp/<unique>,
# flushed to disk, then moved to new/<unique>; a reader only ever looks at new/ and cur/, so
# it never sees a half-written message, and no lock is needed.  Durability: the file is
# fsync()ed before the rename and new/ is fsync()ed after it, so once deliver() returns the
# message survives a crash (the agent then removes it from its queue: RFC 5321 6.1, the
# responsibility passes to the mailbox).  rename() is used rather than link()+unlink(): a
# unique name never exists in new/ already, and rename is one step.
#
# Unique names: "<seconds>.M<microseconds>P<pid>Q<counter>R<random>.<host>" -- the modern
# form of the specification's "time.pid_or_delivery_id.hostname"; the counter makes names
# unique within a process, the pid across processes, and the random part across pid reuse
# after a restart within the same microsecond.  "/" and ":" in the host name are replaced, as
# the specification asks.
#
# At final delivery the Return-Path header records the envelope sender (RFC 5321 4.4: "When
# the delivery SMTP server makes the 'final delivery' of a message, it inserts a return-path
# line at the beginning of the mail data"), and Delivered-To the envelope recipient (the
# Postfix convention, which also lets loops be detected).
#
# Recipient -> mailbox: <root>/<domain>/<local part>/ (lower case).  A local part that would
# escape the root ("..", "/", NUL, a leading ".") is refused with 550 5.1.1, never written.
from __future__ import annotations

import itertools
import os
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mailwire.protocol._events import Reply

LocalCallable = Callable[[str, str, bytes], "Reply | None | Awaitable[Reply | None]"]
"""An embedded local delivery: ``fn(sender, recipient, content)``; None means delivered."""

_counter = itertools.count(1)
_counter_lock = threading.Lock()


def unique_name(hostname: str | None = None, *, now: float | None = None) -> str:
    """A Maildir file name unique across time, processes and hosts."""
    t = time.time() if now is None else now
    seconds = int(t)
    micros = int((t - seconds) * 1_000_000)
    with _counter_lock:
        n = next(_counter)
    host = (hostname or socket.gethostname() or "localhost").replace("/", "\\057")
    host = host.replace(":", "\\072")
    return f"{seconds}.M{micros}P{os.getpid()}Q{n}R{secrets.token_hex(4)}.{host}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MaildirError(Exception):
    """The recipient has no valid mailbox name."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Maildir:
    """One Maildir.

    Attributes:
        path: the Maildir's directory (tmp/, new/, cur/ are created inside).
        fsync: flush the file and new/ (False only for tests and benchmarks).
    """

    path: str
    fsync: bool = True

    def create(self) -> None:
        """Make the directory and its tmp/, new/ and cur/ (mode 0700)."""
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.path, sub), mode=0o700, exist_ok=True)

    def deliver(self, content: bytes, *, hostname: str | None = None) -> str:
        """Write a message: tmp/ -> fsync -> new/ -> fsync of new/.

        Args:
            content: the whole message.
            hostname: for the unique name.

        Returns:
            The path of the delivered file in new/.

        Raises:
            OSError: the message could not be written (nothing is left in new/).
        """
        self.create()
        name = unique_name(hostname)
        tmp = os.path.join(self.path, "tmp", name)
        new = os.path.join(self.path, "new", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        try:
            os.rename(tmp, new)
        except BaseException:
            os.unlink(tmp)
            raise
        if self.fsync:
            _fsync_dir(os.path.join(self.path, "new"))
        return new

    def messages(self) -> list[str]:
        """Paths of the messages in new/ and cur/, sorted by name."""
        out: list[str] = []
        for sub in ("new", "cur"):
            d = os.path.join(self.path, sub)
            if os.path.isdir(d):
                out.extend(os.path.join(d, n) for n in sorted(os.listdir(d)))
        return out


def mailbox_name(recipient: str) -> tuple[str, str]:
    """(domain, local part), lower case, checked safe for use as directory names.

    Raises:
        MaildirError: a name that could escape the root or is empty.
    """
    local, at, domain = recipient.rpartition("@")
    if not at:
        local, domain = recipient, ""
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        local = local[1:-1]
    local, domain = local.lower(), domain.lower().rstrip(".")
    for part in (local, domain):
        if part.startswith(".") or "/" in part or "\x00" in part or "\\" in part:
            raise MaildirError(f"unsafe mailbox name {recipient!r}")
    if not local:
        raise MaildirError(f"no local part in {recipient!r}")
    return domain, local


def with_trace_headers(content: bytes, *, sender: str, recipient: str) -> bytes:
    """Prepend Return-Path (RFC 5321 4.4) and Delivered-To to ``content``."""
    return (
        f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode(
            "utf-8", "surrogateescape"
        )
        + content
    )


class MaildirDelivery:
    """Local delivery into ``<root>/<domain>/<local part>/`` Maildirs.

    Called as ``delivery(sender, recipient, content)`` (a LocalCallable, blocking: the agent
    runs it in a worker thread).

    Args:
        root: the directory holding every mailbox.
        hostname: for unique names.
        fsync: see Maildir.
        aliases: recipient address (lower case) -> the mailbox address to deliver to
            (e.g. ``{"postmaster": "admin@example.org"}``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        hostname: str | None = None,
        fsync: bool = True,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.root = os.fspath(root)
        self.hostname = hostname
        self.fsync = fsync
        self.aliases = {k.lower(): v for k, v in (aliases or {}).items()}

    def maildir(self, recipient: str) -> Maildir:
        """The Maildir of ``recipient`` (after aliases).

        Raises:
            MaildirError: an unsafe or empty name.
        """
        target = self.aliases.get(recipient.lower(), recipient)
        domain, local = mailbox_name(target)
        path = os.path.join(self.root, domain or "_", local)
        return Maildir(path=path, fsync=self.fsync)

    def __call__(self, sender: str, recipient: str, content: bytes) -> Reply:
        try:
            box = self.maildir(recipient)
        except MaildirError as exc:
            return Reply(code=550, text=f"5.1.1 {exc}")
        try:
            path = box.deliver(
                with_trace_headers(content, sender=sender, recipient=recipient),
                hostname=self.hostname,
            )
        except OSError as exc:
            # RFC 3463 4.3.0 / 4.2.2 (mailbox full): keep it queued and try again later
            code = "4.2.2" if getattr(exc, "errno", None) in (28, 122) else "4.3.0"
            return Reply(code=451, text=f"{code} Local delivery failed: {exc.strerror or exc}")
        return Reply(code=250, text=f"2.0.0 Delivered to maildir as {os.path.basename(path)}")


__all__ = [
    "LocalCallable",
    "Maildir",
    "MaildirDelivery",
    "MaildirError",
    "mailbox_name",
    "unique_name",
    "with_trace_headers",
]

# The error model (see the package docstring).
#
# Two kinds of mistakes, two exception classes, never mixed:
#
# * LocalProtocolError: *this* side's application broke the rules -- it called send() when no
#   reply was owed, built an event with a CR/LF in a field, answered 5yz to <Postmaster>.  It is
#   raised by send() and by event constructors, and means "fix your code".
# * RemoteProtocolError: the *peer* broke SMTP so badly that the session cannot go on.  It is
#   raised only by next_event().  Everyday peer mistakes (a typo, a command out of sequence) are
#   not errors at all on the server side: the engine answers them itself (500/501/503) and
#   yields a CommandRejected event.  When an error has a reply the peer should still see
#   (421 4.7.0 too many errors, say), it is attached as ``reply_hint`` and the adapter sends it
#   before closing.
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mailwire.protocol._events import Reply


class ProtocolError(Exception):
    """Base class of mailwire's protocol errors; never raised itself.

    Attributes:
        reply_hint: a reply the adapter should send to the peer before it closes the
            connection, or ``None``.  Already queued in ``data_to_send()`` when the error
            comes from a ServerConnection.
    """

    def __init__(self, msg: str, *, reply_hint: Reply | None = None) -> None:
        super().__init__(msg)
        self.reply_hint = reply_hint


class LocalProtocolError(ProtocolError):
    """The local application used the engine wrongly (raised by ``send()`` and constructors)."""


class RemoteProtocolError(ProtocolError):
    """The peer violated SMTP beyond recovery (raised only by ``next_event()``)."""

"""I/O adapters around :mod:`mailwire.protocol`.

Import the runtime you use directly — ``mailwire.adapters.asyncio``, ``mailwire.adapters.trio``
or ``mailwire.adapters.threads``; each offers the same names: ``serve``, ``Controller``
(a server in a background thread) and ``send_message``.  This package itself imports no
runtime, so asyncio users never load trio and vice versa.

The application-facing API shared by all three runtimes lives here: ``Handler`` (subclass it;
every method has a sensible default and may be ``async`` on asyncio and trio), ``Session``
(what a handler learns about the connection) and ``MessageHandler`` (accept everything and
hand each complete message to a callback).
"""

from mailwire.adapters._driver import Handler, MessageHandler, Session

__all__ = ["Handler", "MessageHandler", "Session"]

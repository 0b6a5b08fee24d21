"""The durable spool, for applications that accept mail themselves.

``SpoolHandler`` is a :class:`mailwire.adapters.Handler` that answers ``250`` to the end of a
message only once the message and its envelope are on disk (written, fdatasynced, with group
commit across sessions), and ``451 4.3.0`` when they could not be stored.  Subclass it and
override the decision methods (``on_mail_from``, ``on_rcpt_to`` ...) for your policy; serve it
with any runtime's ``Controller`` or ``serve``::

    from mailwire.adapters.asyncio import Controller
    from mailwire.adapters.spool import SpoolHandler
    from mailwire.protocol import ServerConfig

    handler = SpoolHandler("/var/spool/myapp", store_format="log")
    with Controller(handler, ServerConfig(hostname="mx.example")):
        ...
    for queue_id in handler.store.list():
        message = handler.store.get(queue_id)   # StoredMessage: envelope + content
        ...                                     # hand it on, then
        handler.store.delete(queue_id)

Two backends implement :class:`MessageStore`: ``DirectoryStore`` ("files": one file per
message) and ``LogStore`` ("log": records appended to preallocated segments, one fdatasync per
group commit); ``open_store`` picks one and ``detect_format`` tells which one a directory
holds (a spool is never converted implicitly).  ``mailwire serve`` uses the same store, so
``mailwire queue`` can inspect a spool your application wrote.

Importing this module loads no event loop library; the handler works on asyncio, trio and
threads alike.
"""

from mailwire.adapters._segstore import LogStore
from mailwire.adapters._spool import (
    DirectoryStore,
    MessageStore,
    MessageWriter,
    SpoolEnvelope,
    SpoolError,
    SpoolHandler,
    StoredMessage,
    detect_format,
    open_store,
)

__all__ = [
    "DirectoryStore",
    "LogStore",
    "MessageStore",
    "MessageWriter",
    "SpoolEnvelope",
    "SpoolError",
    "SpoolHandler",
    "StoredMessage",
    "detect_format",
    "open_store",
]

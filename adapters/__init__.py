"""I/O adapters around :mod:`mailwire.protocol`.

Import the runtime you use directly (``mailwire.adapters.asyncio``, ``mailwire.adapters.trio``,
``mailwire.adapters.threads``); this package imports none of them, so asyncio users never load
trio and vice versa.
"""

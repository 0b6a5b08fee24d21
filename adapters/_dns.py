"""Drive the sans-I/O RouteLookup (mailwire.protocol._dnsquery) with dnspython.

Two drivers over the same machine:

* :func:`resolve_route` -- blocking, with ``dns.resolver.Resolver`` (threads adapter).
* :func:`resolve_route_async` -- ``dns.asyncresolver.Resolver``; each query names the
  dnspython backend of the running library (sniffio), so the same coroutine runs under
  asyncio and under trio, even in one process that uses both (see current_backend).  The
  outstanding A/AAAA queries of one phase run concurrently in an anyio task group (anyio
  works on both runtimes too).

Both take a resolver built by :func:`make_resolver` / :func:`make_async_resolver`, which
accept explicit nameservers as (address, port) pairs, for a private DNS (tests use a
loopback server, see tests/dnsserver.py); without them the system configuration
(/etc/resolv.conf) is used.

dnspython outcomes map onto DnsStatus one to one: an Answer -> OK (records as
``rdata.to_text()``), NXDOMAIN -> NXDOMAIN, NoAnswer -> NODATA, NoNameservers (every server
answered SERVFAIL/REFUSED or failed) -> SERVFAIL, LifetimeTimeout -> TIMEOUT.  Names are
always queried as absolute names, so search domains never apply.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
from dns._asyncbackend import Backend  # dns.asyncbackend uses it without re-exporting it

from mailwire.protocol._dnsquery import Query, RouteLookup
from mailwire.protocol._routing import DnsAnswer, DnsStatus, Route

Nameservers = Sequence[tuple[str, int]]
"""Nameservers as (address, port) pairs."""


def _configure(
    resolver: dns.resolver.BaseResolver,
    nameservers: Nameservers | None,
    timeout: float,
    lifetime: float,
) -> None:
    if nameservers is not None:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(a, p) for a, p in nameservers]
    resolver.timeout = timeout
    resolver.lifetime = lifetime
    resolver.cache = None  # routing must see fresh answers; a caching resolver sits below


def make_resolver(
    nameservers: Nameservers | None = None, *, timeout: float = 5.0, lifetime: float = 15.0
) -> dns.resolver.Resolver:
    """A blocking resolver.

    Args:
        nameservers: (address, port) pairs to ask; None: the system configuration.
        timeout: seconds to wait for one server.
        lifetime: seconds for a whole query (all servers and retries); then TIMEOUT.

    Returns:
        A configured ``dns.resolver.Resolver``.
    """
    resolver = dns.resolver.Resolver(configure=nameservers is None)
    _configure(resolver, nameservers, timeout, lifetime)
    return resolver


def make_async_resolver(
    nameservers: Nameservers | None = None, *, timeout: float = 5.0, lifetime: float = 15.0
) -> dns.asyncresolver.Resolver:
    """An async resolver (asyncio or trio; the backend is chosen when a query runs).

    Args:
        nameservers: (address, port) pairs to ask; None: the system configuration.
        timeout: seconds to wait for one server.
        lifetime: seconds for a whole query; then TIMEOUT.

    Returns:
        A configured ``dns.asyncresolver.Resolver``.
    """
    resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
    _configure(resolver, nameservers, timeout, lifetime)
    return resolver


def _qname(query: Query) -> dns.name.Name:
    return dns.name.from_text(query.name + ".")


def answer_from_dnspython(answer: dns.resolver.Answer) -> DnsAnswer:
    """Convert a dnspython Answer (records in presentation format)."""
    return DnsAnswer(status=DnsStatus.OK, records=tuple(rdata.to_text() for rdata in answer))


def answer_from_exception(exc: dns.exception.DNSException) -> DnsAnswer:
    """Convert a dnspython resolution failure into a DnsAnswer status."""
    if isinstance(exc, dns.resolver.NXDOMAIN | dns.resolver.YXDOMAIN):
        return DnsAnswer(status=DnsStatus.NXDOMAIN)
    if isinstance(exc, dns.resolver.NoAnswer):
        return DnsAnswer(status=DnsStatus.NODATA)
    if isinstance(exc, dns.exception.Timeout):
        return DnsAnswer(status=DnsStatus.TIMEOUT)
    return DnsAnswer(status=DnsStatus.SERVFAIL)  # NoNameservers and anything else


def query_sync(resolver: dns.resolver.Resolver, query: Query) -> DnsAnswer:
    """Ask one query with a blocking resolver."""
    try:
        answer = resolver.resolve(_qname(query), query.rdtype.value, search=False)
    except dns.exception.DNSException as exc:
        return answer_from_exception(exc)
    return answer_from_dnspython(answer)


def current_backend() -> Backend:
    """dnspython's backend for the async library running now (asyncio or trio).

    dnspython's *default* backend is process-global and fixed by the first runtime that
    asks: after one query under asyncio, a query under trio would use the asyncio backend
    and fail ("no running event loop").  So every query names its backend explicitly.
    """
    return dns.asyncbackend.get_backend(dns.asyncbackend.sniff())


async def query_async(resolver: dns.asyncresolver.Resolver, query: Query) -> DnsAnswer:
    """Ask one query with an async resolver, on the backend of the running async library."""
    try:
        answer = await resolver.resolve(
            _qname(query), query.rdtype.value, search=False, backend=current_backend()
        )
    except dns.exception.DNSException as exc:
        return answer_from_exception(exc)
    return answer_from_dnspython(answer)


def resolve_route(lookup: RouteLookup, resolver: dns.resolver.Resolver) -> Route:
    """Run a RouteLookup to its Route with blocking queries (one at a time).

    Args:
        lookup: a fresh RouteLookup.
        resolver: from make_resolver.

    Returns:
        The Route.
    """
    while (route := lookup.result) is None:
        for query in lookup.outstanding():
            lookup.receive(query, query_sync(resolver, query))
    return route


async def _ask_into(
    answers: dict[Query, DnsAnswer], resolver: dns.asyncresolver.Resolver, query: Query
) -> None:
    answers[query] = await query_async(resolver, query)


async def resolve_route_async(
    lookup: RouteLookup, resolver: dns.asyncresolver.Resolver, *, concurrent: bool = True
) -> Route:
    """Run a RouteLookup to its Route with async queries, under asyncio or trio.

    Args:
        lookup: a fresh RouteLookup.
        resolver: from make_async_resolver.
        concurrent: ask the queries of one phase (the A/AAAA of every MX host) at once.

    Returns:
        The Route.
    """
    while (route := lookup.result) is None:
        queries = lookup.outstanding()
        if not concurrent or len(queries) == 1:
            for query in queries:
                lookup.receive(query, await query_async(resolver, query))
            continue
        answers: dict[Query, DnsAnswer] = {}
        async with anyio.create_task_group() as group:
            for query in queries:
                group.start_soon(_ask_into, answers, resolver, query)
        for query in queries:  # feed in the machine's order: results do not depend on timing
            lookup.receive(query, answers[query])
    return route

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

Caching.  dnspython's own cache is switched off (its expiry runs on the wall clock, and it
keeps no negative answers by default); instead every driver takes an optional
:class:`DnsCache`, which a delivery agent shares between all its deliveries (and threads).
It keeps what the TTLs allow, on a clock it is given (tests step a fake one):

* a positive answer for the smallest TTL in its answer section (a CNAME chain expires with
  its shortest link; RFC 2181 5.2 makes the TTLs of one RRset equal);
* NXDOMAIN and NODATA for the negative-caching TTL of RFC 2308 5 -- the smaller of the SOA
  record's TTL and its MINIMUM field -- when the reply's authority section carries the SOA
  ("Negative responses without SOA records SHOULD NOT be cached", RFC 2308 5);
* never SERVFAIL or a timeout: they are transient, and a retry should ask again;
* no TTL is trusted beyond ``max_ttl`` (a day by default), and a TTL of 0 is not cached
  (RFC 1035 3.2.1: "zero values are interpreted to mean that the RR can only be used for the
  transaction in progress").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
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
    resolver.cache = None  # DnsCache does the caching, on its own clock (see above)


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


@dataclass(frozen=True, slots=True)
class _Entry:
    answer: DnsAnswer
    expires: float


class DnsCache:
    """DNS answers kept for as long as their TTLs say (see the module docstring); safe to
    share between threads and deliveries.

    Args:
        clock: seconds, monotonic (``time.monotonic`` by default; tests pass a fake).
        max_entries: the most answers kept; the oldest stored is dropped first.
        max_ttl: the longest any answer is kept, seconds.

    Attributes:
        hits, misses: lookups answered from the cache, and not.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10_000,
        max_ttl: float = 86400.0,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.clock = clock
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.hits = 0
        self.misses = 0
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(query: Query) -> tuple[str, str]:
        return query.name.lower(), query.rdtype.value

    def get(self, query: Query) -> DnsAnswer | None:
        """The cached answer to ``query`` if it has not expired, else None."""
        now = self.clock()
        key = self._key(query)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires <= now:
                del self._entries[key]
                entry = None
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            return entry.answer

    def put(self, query: Query, answer: DnsAnswer, ttl: float | None) -> None:
        """Keep ``answer`` for ``ttl`` seconds (None or <= 0: not at all; SERVFAIL and
        TIMEOUT never)."""
        if ttl is None or ttl <= 0 or answer.status in (DnsStatus.SERVFAIL, DnsStatus.TIMEOUT):
            return
        expires = self.clock() + min(ttl, self.max_ttl)
        key = self._key(query)
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = _Entry(answer=answer, expires=expires)
            while len(self._entries) > self.max_entries:
                del self._entries[next(iter(self._entries))]

    def clear(self) -> None:
        """Forget every answer."""
        with self._lock:
            self._entries.clear()


def negative_ttl(message: dns.message.Message | None) -> float | None:
    """RFC 2308 5: the negative-caching TTL of a reply -- min(SOA TTL, SOA MINIMUM) of the
    SOA in its authority section -- or None without one (then it is not cached)."""
    if message is None:
        return None
    for rrset in message.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            minimum = min(int(getattr(rdata, "minimum", 0)) for rdata in rrset)
            return float(min(rrset.ttl, minimum))
    return None


def answer_from_dnspython(answer: dns.resolver.Answer) -> DnsAnswer:
    """Convert a dnspython Answer (records in presentation format)."""
    return DnsAnswer(status=DnsStatus.OK, records=tuple(rdata.to_text() for rdata in answer))


def answer_ttl(answer: dns.resolver.Answer) -> float | None:
    """How long a positive answer may be cached: the smallest TTL of its answer section."""
    rrsets = answer.response.answer if answer.response is not None else []
    ttls = [rrset.ttl for rrset in rrsets]
    if not ttls and answer.rrset is not None:
        ttls = [answer.rrset.ttl]
    return float(min(ttls)) if ttls else None


def answer_from_exception(exc: dns.exception.DNSException) -> DnsAnswer:
    """Convert a dnspython resolution failure into a DnsAnswer status."""
    if isinstance(exc, dns.resolver.NXDOMAIN | dns.resolver.YXDOMAIN):
        return DnsAnswer(status=DnsStatus.NXDOMAIN)
    if isinstance(exc, dns.resolver.NoAnswer):
        return DnsAnswer(status=DnsStatus.NODATA)
    if isinstance(exc, dns.exception.Timeout):
        return DnsAnswer(status=DnsStatus.TIMEOUT)
    return DnsAnswer(status=DnsStatus.SERVFAIL)  # NoNameservers and anything else


def exception_ttl(exc: dns.exception.DNSException) -> float | None:
    """How long a negative answer may be cached (RFC 2308 5), or None."""
    try:
        if isinstance(exc, dns.resolver.NXDOMAIN):
            replies = exc.responses()  # type: ignore[no-untyped-call]
            ttls = [negative_ttl(m) for m in replies.values()]
            known = [t for t in ttls if t is not None]
            return min(known) if known else None
        if isinstance(exc, dns.resolver.NoAnswer):
            return negative_ttl(exc.response())  # type: ignore[no-untyped-call]
    except (KeyError, AttributeError, TypeError):  # a reply dnspython did not keep
        return None
    return None


def _ask_sync(resolver: dns.resolver.Resolver, query: Query) -> tuple[DnsAnswer, float | None]:
    try:
        answer = resolver.resolve(_qname(query), query.rdtype.value, search=False)
    except dns.exception.DNSException as exc:
        return answer_from_exception(exc), exception_ttl(exc)
    return answer_from_dnspython(answer), answer_ttl(answer)


def query_sync(
    resolver: dns.resolver.Resolver, query: Query, cache: DnsCache | None = None
) -> DnsAnswer:
    """Ask one query with a blocking resolver (from ``cache`` while it holds the answer)."""
    if cache is not None and (hit := cache.get(query)) is not None:
        return hit
    answer, ttl = _ask_sync(resolver, query)
    if cache is not None:
        cache.put(query, answer, ttl)
    return answer


def current_backend() -> Backend:
    """dnspython's backend for the async library running now (asyncio or trio).

    dnspython's *default* backend is process-global and fixed by the first runtime that
    asks: after one query under asyncio, a query under trio would use the asyncio backend
    and fail ("no running event loop").  So every query names its backend explicitly.
    """
    return dns.asyncbackend.get_backend(dns.asyncbackend.sniff())


async def query_async(
    resolver: dns.asyncresolver.Resolver, query: Query, cache: DnsCache | None = None
) -> DnsAnswer:
    """Ask one query with an async resolver, on the backend of the running async library
    (from ``cache`` while it holds the answer)."""
    if cache is not None and (hit := cache.get(query)) is not None:
        return hit
    try:
        result = await resolver.resolve(
            _qname(query), query.rdtype.value, search=False, backend=current_backend()
        )
    except dns.exception.DNSException as exc:
        answer, ttl = answer_from_exception(exc), exception_ttl(exc)
    else:
        answer, ttl = answer_from_dnspython(result), answer_ttl(result)
    if cache is not None:
        cache.put(query, answer, ttl)
    return answer


def resolve_route(
    lookup: RouteLookup, resolver: dns.resolver.Resolver, *, cache: DnsCache | None = None
) -> Route:
    """Run a RouteLookup to its Route with blocking queries (one at a time).

    Args:
        lookup: a fresh RouteLookup.
        resolver: from make_resolver.
        cache: answers shared with other lookups, or None.

    Returns:
        The Route.
    """
    while (route := lookup.result) is None:
        for query in lookup.outstanding():
            lookup.receive(query, query_sync(resolver, query, cache))
    return route


async def _ask_into(
    answers: dict[Query, DnsAnswer],
    resolver: dns.asyncresolver.Resolver,
    query: Query,
    cache: DnsCache | None,
) -> None:
    answers[query] = await query_async(resolver, query, cache)


async def resolve_route_async(
    lookup: RouteLookup,
    resolver: dns.asyncresolver.Resolver,
    *,
    concurrent: bool = True,
    cache: DnsCache | None = None,
) -> Route:
    """Run a RouteLookup to its Route with async queries, under asyncio or trio.

    Args:
        lookup: a fresh RouteLookup.
        resolver: from make_async_resolver.
        concurrent: ask the queries of one phase (the A/AAAA of every MX host) at once.
        cache: answers shared with other lookups, or None.

    Returns:
        The Route.
    """
    while (route := lookup.result) is None:
        queries = lookup.outstanding()
        if not concurrent or len(queries) == 1:
            for query in queries:
                lookup.receive(query, await query_async(resolver, query, cache))
            continue
        answers: dict[Query, DnsAnswer] = {}
        async with anyio.create_task_group() as group:
            for query in queries:
                group.start_soon(_ask_into, answers, resolver, query, cache)
        for query in queries:  # feed in the machine's order: results do not depend on timing
            lookup.receive(query, answers[query])
    return route

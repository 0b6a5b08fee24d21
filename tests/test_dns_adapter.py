"""adapters/_dns.py against a real authoritative DNS server on loopback (tests/dnsserver.py),
driven blocking, on asyncio and on trio."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from ipaddress import ip_address

import dns.exception
import dns.message
import dns.resolver
import pytest
import trio
from dnsserver import TTL, DNSServer

from mailwire.adapters._dns import (
    DnsCache,
    answer_from_exception,
    make_async_resolver,
    make_resolver,
    negative_ttl,
    query_async,
    query_sync,
    resolve_route,
    resolve_route_async,
)
from mailwire.protocol._dnsquery import Query, RouteLookup, RRType
from mailwire.protocol._routing import (
    DnsAnswer,
    DnsStatus,
    Route,
    RouteKind,
    RoutingConfig,
    group_recipients,
)

ZONE = {
    "d.test": {"MX": ["10 mx1.d.test.", "20 mx2.d.test."]},
    "mx1.d.test": {"A": ["127.0.0.11"], "AAAA": ["::1"]},
    "mx2.d.test": {"A": ["127.0.0.12"]},
    "plain.test": {"A": ["127.0.0.20"]},
    "nomail.test": {"MX": ["0 ."]},
    "flaky.test": {"MX": ["10 mx.flaky.test."]},
    "aliased.test": {"MX": ["10 mail.aliased.test."]},
    "mail.aliased.test": {"CNAME": ["real.aliased.test."]},
    "real.aliased.test": {"A": ["127.0.0.30"]},
    "backup.test": {"MX": ["10 broken.backup.test.", "20 ok.backup.test."]},
    "ok.backup.test": {"A": ["127.0.0.40"]},
    "many.test": {"A": [f"127.0.1.{i}" for i in range(1, 60)]},
    "deep.sub.empty.test": {"A": ["127.0.0.50"]},
}
SERVFAIL = ["flaky.test", "broken.backup.test"]
SOA_MINIMUM = 60  # the MINIMUM field of tests/dnsserver.py's SOA (its TTL is 300)
DROP = ["slow.test"]

Runner = Callable[[str, RoutingConfig, tuple[str, int]], Route]


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DNSServer]:
    with DNSServer(ZONE, servfail=SERVFAIL, drop=DROP) as server:
        yield server


@pytest.fixture(scope="module")
def tcp_only_server() -> Iterator[DNSServer]:
    with DNSServer(ZONE, truncate_udp=True) as server:
        yield server


def _lookup(rcpt: str, config: RoutingConfig) -> RouteLookup:
    (dest,) = group_recipients([rcpt], config)
    return RouteLookup(dest, config=config, seed=1)


def run_sync(rcpt: str, config: RoutingConfig, ns: tuple[str, int]) -> Route:
    return resolve_route(_lookup(rcpt, config), make_resolver([ns], timeout=0.5, lifetime=1.0))


def run_asyncio(rcpt: str, config: RoutingConfig, ns: tuple[str, int]) -> Route:
    resolver = make_async_resolver([ns], timeout=0.5, lifetime=1.0)
    return asyncio.run(resolve_route_async(_lookup(rcpt, config), resolver))


def run_trio(rcpt: str, config: RoutingConfig, ns: tuple[str, int]) -> Route:
    resolver = make_async_resolver([ns], timeout=0.5, lifetime=1.0)

    async def main() -> Route:
        return await resolve_route_async(_lookup(rcpt, config), resolver)

    return trio.run(main)


@pytest.fixture(params=["sync", "asyncio", "trio"])
def run(request: pytest.FixtureRequest) -> Runner:
    runners: dict[str, Runner] = {"sync": run_sync, "asyncio": run_asyncio, "trio": run_trio}
    return runners[request.param]


CONFIG = RoutingConfig(hostname="mx.us.test")


def addresses(route: Route) -> list[str]:
    return [str(t.address) for t in route.targets]


def test_mx_route_over_real_dns(run: Runner, dns_server: DNSServer) -> None:
    route = run("a@d.test", CONFIG, dns_server.nameserver)
    assert route.kind is RouteKind.REMOTE
    assert addresses(route) == ["::1", "127.0.0.11", "127.0.0.12"]
    assert [t.preference for t in route.targets] == [10, 10, 20]


def test_nxdomain_over_real_dns_fails_permanently(run: Runner, dns_server: DNSServer) -> None:
    route = run("a@nowhere.test", CONFIG, dns_server.nameserver)
    assert route.kind is RouteKind.FAILED and route.reply is not None
    assert route.reply.enhanced == "5.1.2"


def test_implicit_mx_over_real_dns(run: Runner, dns_server: DNSServer) -> None:
    route = run("a@plain.test", CONFIG, dns_server.nameserver)
    assert addresses(route) == ["127.0.0.20"] and route.targets[0].preference == 0


def test_null_mx_over_real_dns(run: Runner, dns_server: DNSServer) -> None:
    route = run("a@nomail.test", CONFIG, dns_server.nameserver)
    assert route.kind is RouteKind.FAILED and route.reply is not None
    assert (route.reply.code, route.reply.enhanced) == (556, "5.1.10")


def test_servfail_over_real_dns_defers(run: Runner, dns_server: DNSServer) -> None:
    route = run("a@flaky.test", CONFIG, dns_server.nameserver)
    assert route.kind is RouteKind.DEFERRED and route.reply is not None
    assert route.reply.enhanced == "4.4.3"


def test_servfail_on_one_mx_host_falls_back_to_the_next(run: Runner, dns_server: DNSServer) -> None:
    route = run("a@backup.test", CONFIG, dns_server.nameserver)
    assert addresses(route) == ["127.0.0.40"]


def test_cname_mx_target_is_followed(run: Runner, dns_server: DNSServer) -> None:
    route = run("a@aliased.test", CONFIG, dns_server.nameserver)
    assert addresses(route) == ["127.0.0.30"]
    assert route.targets[0].host == "mail.aliased.test"


def test_empty_non_terminal_is_nodata_not_nxdomain(dns_server: DNSServer) -> None:
    resolver = make_resolver([dns_server.nameserver], timeout=0.5, lifetime=1.0)
    assert query_sync(resolver, Query(name="sub.empty.test", rdtype=RRType.A)) == DnsAnswer(
        status=DnsStatus.NODATA
    )
    assert query_sync(resolver, Query(name="none.empty.test", rdtype=RRType.A)) == DnsAnswer(
        status=DnsStatus.NXDOMAIN
    )


def test_self_mx_by_address_over_real_dns(run: Runner, dns_server: DNSServer) -> None:
    config = RoutingConfig(hostname="x.test", local_addresses=frozenset({ip_address("127.0.0.12")}))
    route = run("a@d.test", config, dns_server.nameserver)
    assert addresses(route) == ["::1", "127.0.0.11"]


def test_unanswered_query_times_out_and_defers(dns_server: DNSServer) -> None:
    resolver = make_resolver([dns_server.nameserver], timeout=0.2, lifetime=0.3)
    answer = query_sync(resolver, Query(name="slow.test", rdtype=RRType.MX))
    assert answer.status is DnsStatus.TIMEOUT
    route = resolve_route(_lookup("a@slow.test", CONFIG), resolver)
    assert route.kind is RouteKind.DEFERRED


def test_async_timeout_under_trio(dns_server: DNSServer) -> None:
    resolver = make_async_resolver([dns_server.nameserver], timeout=0.2, lifetime=0.3)

    async def main() -> DnsAnswer:
        return await query_async(resolver, Query(name="slow.test", rdtype=RRType.A))

    assert trio.run(main).status is DnsStatus.TIMEOUT


def test_truncated_udp_replies_are_retried_over_tcp(
    run: Runner, tcp_only_server: DNSServer
) -> None:
    before = len(tcp_only_server.log)
    route = run("a@d.test", CONFIG, tcp_only_server.nameserver)
    assert addresses(route) == ["::1", "127.0.0.11", "127.0.0.12"]
    transports = {t for _, _, t in tcp_only_server.log[before:]}
    assert transports == {"udp", "tcp"}


def test_large_answer_arrives_whole(run: Runner, tcp_only_server: DNSServer) -> None:
    route = run("a@many.test", RoutingConfig(max_targets=100), tcp_only_server.nameserver)
    assert len(route.targets) == 59


def test_async_driver_asks_every_address_query_of_a_phase(dns_server: DNSServer) -> None:
    before = len(dns_server.log)
    run_trio("a@d.test", CONFIG, dns_server.nameserver)
    asked = sorted((n, t) for n, t, _ in dns_server.log[before:])
    assert asked == sorted(
        [
            ("d.test", "MX"),
            ("mx1.d.test", "A"),
            ("mx1.d.test", "AAAA"),
            ("mx2.d.test", "A"),
            ("mx2.d.test", "AAAA"),
        ]
    )


def test_sequential_async_mode_gives_the_same_route(dns_server: DNSServer) -> None:
    resolver = make_async_resolver([dns_server.nameserver], timeout=0.5, lifetime=1.0)
    one = asyncio.run(resolve_route_async(_lookup("a@d.test", CONFIG), resolver, concurrent=False))
    assert one == run_asyncio("a@d.test", CONFIG, dns_server.nameserver)


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (dns.resolver.NXDOMAIN(), DnsStatus.NXDOMAIN),  # type: ignore[no-untyped-call]
        (dns.resolver.NoAnswer(), DnsStatus.NODATA),  # type: ignore[no-untyped-call]
        (dns.resolver.NoNameservers(), DnsStatus.SERVFAIL),  # type: ignore[no-untyped-call]
        (dns.resolver.LifetimeTimeout(timeout=1.0, errors=[]), DnsStatus.TIMEOUT),  # type: ignore[no-untyped-call]
        (dns.exception.DNSException(), DnsStatus.SERVFAIL),  # type: ignore[no-untyped-call]
    ],
)
def test_dnspython_failures_map_to_statuses(
    exc: dns.exception.DNSException, status: DnsStatus
) -> None:
    assert answer_from_exception(exc).status is status


def test_system_resolver_is_used_without_nameservers() -> None:
    try:
        resolver = make_resolver()
    except dns.resolver.NoResolverConfiguration:  # pragma: no cover - no /etc/resolv.conf
        pytest.skip("no system resolver configuration")
    assert resolver.nameservers


def test_trio_after_asyncio_in_one_process_uses_the_trio_backend(dns_server: DNSServer) -> None:
    # dnspython's default async backend is process-global and sticky; the driver must pick
    # the backend of the running library for each query (regression: "no running event loop")
    first = run_asyncio("a@d.test", CONFIG, dns_server.nameserver)
    assert run_trio("a@d.test", CONFIG, dns_server.nameserver) == first
    assert run_asyncio("a@d.test", CONFIG, dns_server.nameserver) == first


# --- the answer cache ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


CachedRunner = Callable[[str, DnsCache, tuple[str, int]], Route]


def cached_sync(rcpt: str, cache: DnsCache, ns: tuple[str, int]) -> Route:
    resolver = make_resolver([ns], timeout=0.5, lifetime=1.0)
    return resolve_route(_lookup(rcpt, CONFIG), resolver, cache=cache)


def cached_asyncio(rcpt: str, cache: DnsCache, ns: tuple[str, int]) -> Route:
    resolver = make_async_resolver([ns], timeout=0.5, lifetime=1.0)
    return asyncio.run(resolve_route_async(_lookup(rcpt, CONFIG), resolver, cache=cache))


def cached_trio(rcpt: str, cache: DnsCache, ns: tuple[str, int]) -> Route:
    resolver = make_async_resolver([ns], timeout=0.5, lifetime=1.0)

    async def main() -> Route:
        return await resolve_route_async(_lookup(rcpt, CONFIG), resolver, cache=cache)

    return trio.run(main)


@pytest.fixture(params=["sync", "asyncio", "trio"])
def cached(request: pytest.FixtureRequest) -> CachedRunner:
    runners: dict[str, CachedRunner] = {
        "sync": cached_sync,
        "asyncio": cached_asyncio,
        "trio": cached_trio,
    }
    return runners[request.param]


def test_cached_route_asks_nothing_until_the_ttl_runs_out(
    cached: CachedRunner, dns_server: DNSServer
) -> None:
    clock = FakeClock()
    start = clock.now
    cache = DnsCache(clock=clock)
    first = addresses(cached("a@d.test", cache, dns_server.nameserver))
    asked = len(dns_server.log)
    clock.now = start + SOA_MINIMUM - 1
    assert addresses(cached("b@d.test", cache, dns_server.nameserver)) == first
    assert len(dns_server.log) == asked  # every answer came from the cache
    assert cache.hits > 0
    clock.now = start + SOA_MINIMUM  # only the NODATA answer (mx2 has no AAAA) is over
    assert addresses(cached("c@d.test", cache, dns_server.nameserver)) == first
    assert [(n, t) for n, t, _ in dns_server.log[asked:]] == [("mx2.d.test", "AAAA")]
    asked = len(dns_server.log)
    clock.now = start + TTL  # now the positive answers (TTL 300) are over too
    assert addresses(cached("d@d.test", cache, dns_server.nameserver)) == first
    assert {(n, t) for n, t, _ in dns_server.log[asked:]} >= {("d.test", "MX")}


def test_nxdomain_is_cached_for_the_soa_minimum(
    cached: CachedRunner, dns_server: DNSServer
) -> None:
    clock = FakeClock()
    cache = DnsCache(clock=clock)
    assert cached("x@gone.test", cache, dns_server.nameserver).kind is RouteKind.FAILED
    asked = len(dns_server.log)
    clock.now += SOA_MINIMUM - 1  # RFC 2308 5: min(SOA TTL 300, MINIMUM 60)
    assert cached("y@gone.test", cache, dns_server.nameserver).kind is RouteKind.FAILED
    assert len(dns_server.log) == asked
    clock.now += 1
    cached("z@gone.test", cache, dns_server.nameserver)
    assert len(dns_server.log) > asked


def test_servfail_is_never_cached(cached: CachedRunner, dns_server: DNSServer) -> None:
    cache = DnsCache(clock=FakeClock())
    cached("a@flaky.test", cache, dns_server.nameserver)
    asked = len(dns_server.log)
    route = cached("b@flaky.test", cache, dns_server.nameserver)
    assert route.kind is RouteKind.DEFERRED
    assert len(dns_server.log) > asked


def test_cache_keeps_at_most_max_entries_and_no_zero_ttl() -> None:
    clock = FakeClock()
    cache = DnsCache(clock=clock, max_entries=2, max_ttl=100.0)
    ok = DnsAnswer(status=DnsStatus.OK, records=("127.0.0.1",))
    queries = [Query(name=f"h{i}.test", rdtype=RRType.A) for i in range(3)]
    for q in queries:
        cache.put(q, ok, 1000.0)
    assert len(cache) == 2
    assert cache.get(queries[0]) is None  # the oldest went first
    assert cache.get(queries[2]) == ok
    clock.now += 100.0  # max_ttl caps the 1000 s TTL
    assert cache.get(queries[2]) is None
    cache.put(queries[0], ok, 0.0)
    cache.put(queries[1], DnsAnswer(status=DnsStatus.TIMEOUT), 300.0)
    assert cache.get(queries[0]) is None and cache.get(queries[1]) is None


def test_negative_ttl_needs_an_soa() -> None:
    assert negative_ttl(None) is None
    assert negative_ttl(dns.message.make_query("a.test.", "A")) is None

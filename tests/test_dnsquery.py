"""The sans-I/O DNS lookup machine: which queries it asks, in which order, and when it is done."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwire.protocol._dnsquery import Query, RouteLookup, RRType, route_from_answers
from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._routing import (
    AddressPreference,
    DnsAnswer,
    DnsStatus,
    NextHop,
    RouteKind,
    RoutingConfig,
    group_recipients,
)

CONFIG = RoutingConfig(hostname="mx.us.test", local_domains=frozenset({"us.test"}))


def lookup_for(rcpt: str, config: RoutingConfig = CONFIG, seed: int = 0) -> RouteLookup:
    (dest,) = group_recipients([rcpt], config)
    return RouteLookup(dest, config=config, seed=seed)


def q(name: str, rdtype: str) -> Query:
    return Query(name=name, rdtype=RRType(rdtype))


def test_asks_mx_first_then_the_addresses_of_every_mx_host() -> None:
    lookup = lookup_for("a@d.test")
    assert lookup.outstanding() == (q("d.test", "MX"),)
    lookup.receive(q("d.test", "MX"), DnsAnswer.of("20 b.d.test.", "10 a.d.test."))
    assert lookup.outstanding() == (
        q("a.d.test", "AAAA"),
        q("a.d.test", "A"),
        q("b.d.test", "AAAA"),
        q("b.d.test", "A"),
    )
    assert lookup.result is None
    lookup.receive(q("b.d.test", "A"), DnsAnswer.of("192.0.2.2"))
    lookup.receive(q("a.d.test", "AAAA"), DnsAnswer(status=DnsStatus.NODATA))
    lookup.receive(q("b.d.test", "AAAA"), DnsAnswer(status=DnsStatus.NODATA))
    assert lookup.result is None  # one answer still missing
    lookup.receive(q("a.d.test", "A"), DnsAnswer.of("192.0.2.1"))
    assert lookup.outstanding() == ()
    route = lookup.result
    assert route is not None and route.kind is RouteKind.REMOTE
    assert [str(t.address) for t in route.targets] == ["192.0.2.1", "192.0.2.2"]
    assert route.recipients == ("a@d.test",)


def test_answers_may_arrive_in_any_order() -> None:
    answers = {
        ("d.test", "MX"): DnsAnswer.of("10 a.d.test.", "10 b.d.test."),
        ("a.d.test", "A"): DnsAnswer.of("192.0.2.1"),
        ("b.d.test", "AAAA"): DnsAnswer.of("2001:db8::2"),
    }
    forward = route_from_answers(
        group_recipients(["x@d.test"], CONFIG)[0], answers, config=CONFIG, seed=3
    )
    lookup = lookup_for("x@d.test", seed=3)
    lookup.receive(q("d.test", "MX"), answers[("d.test", "MX")])
    for query in reversed(lookup.outstanding()):
        key = (query.name, query.rdtype.value)
        lookup.receive(query, answers.get(key, DnsAnswer(status=DnsStatus.NODATA)))
    assert lookup.result == forward


def test_ipv4_only_never_asks_for_aaaa() -> None:
    config = RoutingConfig(address_preference=AddressPreference.IPV4_ONLY)
    lookup = lookup_for("a@d.test", config)
    lookup.receive(q("d.test", "MX"), DnsAnswer.of("10 a.d.test."))
    assert lookup.outstanding() == (q("a.d.test", "A"),)


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (DnsAnswer(status=DnsStatus.NXDOMAIN), RouteKind.FAILED),
        (DnsAnswer(status=DnsStatus.SERVFAIL), RouteKind.DEFERRED),
        (DnsAnswer(status=DnsStatus.TIMEOUT), RouteKind.DEFERRED),
        (DnsAnswer.of("0 ."), RouteKind.FAILED),
    ],
)
def test_final_mx_answers_end_the_lookup_without_address_queries(
    answer: DnsAnswer, kind: RouteKind
) -> None:
    lookup = lookup_for("a@d.test")
    lookup.receive(q("d.test", "MX"), answer)
    assert lookup.outstanding() == ()
    assert lookup.result is not None and lookup.result.kind is kind


def test_local_destination_needs_no_query() -> None:
    lookup = lookup_for("a@us.test")
    assert lookup.outstanding() == ()
    assert lookup.result is not None and lookup.result.kind is RouteKind.LOCAL


def test_relay_host_skips_mx_and_asks_only_for_its_addresses() -> None:
    config = RoutingConfig(transport={"d.test": NextHop.parse("[relay.test]:587")})
    lookup = lookup_for("a@d.test", config)
    assert lookup.outstanding() == (q("relay.test", "AAAA"), q("relay.test", "A"))


def test_relay_by_ip_address_needs_no_query() -> None:
    config = RoutingConfig(transport={"*": NextHop.parse("[192.0.2.7]:2525")})
    lookup = lookup_for("a@d.test", config)
    assert lookup.outstanding() == ()
    route = lookup.result
    assert route is not None and route.targets[0].address == ip_address("192.0.2.7")
    assert route.targets[0].port == 2525


def test_relay_host_with_mx_flag_asks_for_mx() -> None:
    config = RoutingConfig(transport={"*": NextHop.parse("relay.test")})
    assert lookup_for("a@d.test", config).outstanding() == (q("relay.test", "MX"),)


def test_mx_naming_an_invalid_host_is_never_asked_about() -> None:
    lookup = lookup_for("a@d.test")
    lookup.receive(q("d.test", "MX"), DnsAnswer.of("10 bad_host!.test.", "20 ok.d.test."))
    assert {x.name for x in lookup.outstanding()} == {"ok.d.test"}


def test_unasked_or_repeated_answers_are_refused() -> None:
    lookup = lookup_for("a@d.test")
    with pytest.raises(LocalProtocolError):
        lookup.receive(q("other.test", "MX"), DnsAnswer.of("10 x.test."))
    lookup.receive(q("d.test", "MX"), DnsAnswer(status=DnsStatus.NXDOMAIN))
    with pytest.raises(LocalProtocolError):
        lookup.receive(q("d.test", "MX"), DnsAnswer(status=DnsStatus.NXDOMAIN))


def test_route_from_answers_treats_missing_types_of_known_names_as_nodata() -> None:
    (dest,) = group_recipients(["a@d.test"], CONFIG)
    route = route_from_answers(
        dest, {("d.test", "A"): DnsAnswer.of("192.0.2.1")}, config=CONFIG, seed=0
    )
    # MX missing -> NODATA -> implicit MX; had d.test been absent altogether it would be NXDOMAIN
    assert route.kind is RouteKind.REMOTE
    missing = route_from_answers(dest, {}, config=CONFIG, seed=0)
    assert missing.kind is RouteKind.FAILED


def test_rrtype_is_a_plain_string_for_dnspython() -> None:
    assert RRType.AAAA == "AAAA" and isinstance(RRType.MX, str)
    assert str(q("d.test", "MX")) == "d.test/MX"


@settings(max_examples=100, deadline=None)
@given(
    nhosts=st.integers(0, 30),
    limit=st.integers(1, 12),
    statuses=st.lists(st.sampled_from(list(DnsStatus)), min_size=1),
)
def test_queries_are_bounded_and_never_repeated(
    nhosts: int, limit: int, statuses: list[DnsStatus]
) -> None:
    config = RoutingConfig(max_mx_hosts=limit)
    lookup = lookup_for("a@d.test", config)
    mx = DnsAnswer.of(*(f"{i % 5} h{i}.test." for i in range(nhosts)))
    lookup.receive(q("d.test", "MX"), mx)
    asked = [q("d.test", "MX")]
    i = 0
    while lookup.result is None:
        for query in lookup.outstanding():
            status = statuses[i % len(statuses)]
            i += 1
            answer = (
                DnsAnswer.of("192.0.2.1") if status is DnsStatus.OK else DnsAnswer(status=status)
            )
            asked.append(query)
            lookup.receive(query, answer)
    assert len(asked) == len(set(asked)) <= 1 + 2 * limit

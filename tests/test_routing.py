"""Routing rules: recipient grouping, transport map, MX ordering, RFC 5321 5.1 / RFC 7505
rules, address preference, and the delivery walk."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwire.protocol._dnsquery import route_from_answers
from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._events import Reply
from mailwire.protocol._routing import (
    AddressPreference,
    ConnectFailed,
    ConnectionLost,
    DeliveryWalk,
    DnsAnswer,
    DnsStatus,
    MessageReply,
    MXPlan,
    MXRecord,
    NextHop,
    RecipientReply,
    RecipientStatus,
    Route,
    RouteKind,
    RoutingConfig,
    SessionReply,
    Stage,
    Target,
    explain,
    group_recipients,
    normalize_domain,
    order_mx,
    parse_mx,
    plan_mx,
)

OK = DnsAnswer.of
NX = DnsAnswer(status=DnsStatus.NXDOMAIN)
NODATA = DnsAnswer(status=DnsStatus.NODATA)
SERVFAIL = DnsAnswer(status=DnsStatus.SERVFAIL)
TIMEOUT = DnsAnswer(status=DnsStatus.TIMEOUT)

CONFIG = RoutingConfig(
    hostname="mx.us.test",
    local_domains=frozenset({"us.test"}),
    local_addresses=frozenset({ip_address("192.0.2.99"), ip_address("2001:db8::99")}),
)


def route(domain: str, answers: dict[tuple[str, str], DnsAnswer], **kw: object) -> Route:
    config = kw.pop("config", CONFIG)
    assert isinstance(config, RoutingConfig)
    seed = kw.pop("seed", 0)
    assert isinstance(seed, int) and not kw
    (dest,) = group_recipients([f"user@{domain}"], config)
    return route_from_answers(dest, answers, config=config, seed=seed)


def hosts(r: Route) -> list[str]:
    return list(dict.fromkeys(t.host for t in r.targets))


# --- grouping -----------------------------------------------------------------------------


def test_local_and_remote_recipients_are_grouped_by_destination() -> None:
    dests = group_recipients(
        ["a@example.com", "b@us.test", "c@EXAMPLE.com.", "d@other.test", "e@US.TEST"], CONFIG
    )
    assert [(d.local, d.domain, d.recipients) for d in dests] == [
        (False, "example.com", ("a@example.com", "c@EXAMPLE.com.")),
        (True, "us.test", ("b@us.test", "e@US.TEST")),
        (False, "other.test", ("d@other.test",)),
    ]
    assert dests[0].nexthop == NextHop(host="example.com", mx=True)
    assert dests[1].nexthop is None


def test_domainless_postmaster_is_local() -> None:
    (dest,) = group_recipients(["Postmaster"], CONFIG)
    assert dest.local and dest.recipients == ("Postmaster",)


def test_duplicate_recipients_are_kept_once() -> None:
    (dest,) = group_recipients(["a@example.com", "a@example.com"], CONFIG)
    assert dest.recipients == ("a@example.com",)


def test_transport_map_overrides_mx_most_specific_key_wins() -> None:
    config = RoutingConfig(
        transport={
            "*": NextHop.parse("[smarthost.test]:587"),
            ".corp.test": NextHop.parse("[gw.corp.test]"),
            "special.corp.test": NextHop.parse("direct.test"),
        }
    )
    dests = group_recipients(
        ["a@x.corp.test", "b@special.corp.test", "c@gmail.test", "d@yahoo.test", "e@corp.test"],
        config,
    )
    got = {d.nexthop: d.recipients for d in dests}
    assert got == {
        NextHop(host="gw.corp.test"): ("a@x.corp.test",),
        NextHop(host="direct.test", mx=True): ("b@special.corp.test",),
        # one smarthost carries every domain that the wildcard sends to it
        NextHop(host="smarthost.test", port=587): ("c@gmail.test", "d@yahoo.test", "e@corp.test"),
    }
    assert "transport map entry '*'" in dests[-1].reason


def test_a_relay_group_of_many_domains_keeps_its_reason_short() -> None:
    config = RoutingConfig(transport={"*": NextHop.parse("[relay.test]")})
    (dest,) = group_recipients([f"a@d{i}.test" for i in range(40)], config)
    assert len(dest.recipients) == 40
    assert dest.reason.count("transport map entry") == 5 and dest.reason.endswith("and 35 more")


def test_smarthost_route_looks_up_only_the_relay_addresses() -> None:
    config = RoutingConfig(transport={"*": NextHop.parse("[relay.test]:2525")})
    (dest,) = group_recipients(["a@example.com"], config)
    r = route_from_answers(dest, {("relay.test", "A"): OK("198.51.100.7")}, config=config, seed=0)
    assert r.kind is RouteKind.REMOTE
    assert r.targets == (
        Target(host="relay.test", address=ip_address("198.51.100.7"), port=2525, preference=None),
    )


def test_smarthost_that_is_this_server_is_a_loop_error() -> None:
    config = RoutingConfig(hostname="mx.us.test", transport={"*": NextHop.parse("[MX.us.test]")})
    (dest,) = group_recipients(["a@example.com"], config)
    answers = {("mx.us.test", "A"): OK("192.0.2.1")}
    r = route_from_answers(dest, answers, config=config, seed=0)
    assert r.kind is RouteKind.FAILED and r.reply is not None and r.reply.enhanced == "5.4.6"


@settings(max_examples=100, deadline=None)
@given(
    rcpts=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "Postmaster", "c.d"]),
            st.sampled_from(
                ["us.test", "US.test", "x.test", "[192.0.2.99]", "[192.0.2.1]", "y.test"]
            ),
        ).map(lambda p: p[0] if p[0] == "Postmaster" else f"{p[0]}@{p[1]}"),
        max_size=20,
    ),
    wildcard=st.booleans(),
)
def test_grouping_loses_and_duplicates_no_recipient(rcpts: list[str], wildcard: bool) -> None:
    transport = {"*": NextHop.parse("[relay.test]")} if wildcard else {}
    config = RoutingConfig(
        hostname="mx.us.test",
        local_domains=frozenset({"us.test"}),
        local_addresses=frozenset({ip_address("192.0.2.99")}),
        transport=transport,
    )
    dests = group_recipients(rcpts, config)
    flat = [r for d in dests for r in d.recipients]
    assert sorted(flat) == sorted(set(rcpts))
    for d in dests:
        if d.local:
            assert d.nexthop is None
        elif wildcard:
            assert d.nexthop == NextHop(host="relay.test")


def test_address_literal_of_ours_is_local_and_others_connect_directly() -> None:
    dests = group_recipients(["a@[192.0.2.99]", "b@[IPv6:2001:db8::5]"], CONFIG)
    assert dests[0].local
    r = route_from_answers(dests[1], {}, config=CONFIG, seed=0)
    assert [str(t) for t in r.targets] == ["2001:db8::5[2001:db8::5]:25"]


def test_invalid_domain_fails_with_5_1_2_without_lookup() -> None:
    (dest,) = group_recipients(['"x"@[foo:bar]'], CONFIG)
    r = route_from_answers(dest, {}, config=CONFIG, seed=0)
    assert r.kind is RouteKind.FAILED and r.reply is not None
    assert r.reply.code == 550 and r.reply.enhanced == "5.1.2"


def test_internationalised_domain_is_routed_by_its_a_label() -> None:
    assert normalize_domain("Bücher.Example.") == "xn--bcher-kva.example"
    (dest,) = group_recipients(["a@bücher.example"], CONFIG)
    assert dest.nexthop is not None and dest.nexthop.host == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("text", "hop"),
    [
        ("relay.test", NextHop(host="relay.test", port=25, mx=True)),
        ("relay.test:587", NextHop(host="relay.test", port=587, mx=True)),
        ("[relay.test]", NextHop(host="relay.test", port=25, mx=False)),
        ("[192.0.2.1]:2525", NextHop(host="192.0.2.1", port=2525, mx=False)),
        ("[IPv6:2001:db8::1]:26", NextHop(host="2001:db8::1", port=26, mx=False)),
    ],
)
def test_next_hop_parses_postfix_syntax(text: str, hop: NextHop) -> None:
    assert NextHop.parse(text) == hop
    assert NextHop.parse(str(hop)) == hop


@pytest.mark.parametrize("text", ["[relay.test", "relay.test:x", "[a]b", "bad host", "[x]:0"])
def test_next_hop_rejects_malformed_text(text: str) -> None:
    with pytest.raises(LocalProtocolError):
        NextHop.parse(text)


# --- MX answer rules -------------------------------------------------------------------------


def test_parse_mx_reads_dnspython_presentation_text() -> None:
    assert parse_mx("10 MX1.Example.COM.") == MXRecord(preference=10, exchange="mx1.example.com")
    assert parse_mx("0 .").is_null
    for bad in ("x mx.test.", "70000 mx.test.", "10", "10 a b"):
        with pytest.raises(ValueError):
            parse_mx(bad)


def test_null_mx_fails_permanently_without_connecting() -> None:
    r = route("nomail.test", {("nomail.test", "MX"): OK("0 .")})
    assert r.kind is RouteKind.FAILED and r.targets == ()
    assert r.reply == Reply(code=556, text=r.reply.text if r.reply else "")
    assert r.reply is not None and r.reply.enhanced == "5.1.10"
    assert "null MX" in "\n".join(explain(r))


def test_null_mx_mixed_with_real_records_uses_the_real_ones() -> None:
    answers = {
        ("mixed.test", "MX"): OK("0 .", "10 mx.mixed.test."),
        ("mx.mixed.test", "A"): OK("192.0.2.1"),
    }
    r = route("mixed.test", answers)
    assert r.kind is RouteKind.REMOTE and hosts(r) == ["mx.mixed.test"]


def test_no_mx_records_means_implicit_mx_on_the_domain_itself() -> None:
    answers = {("plain.test", "MX"): NODATA, ("plain.test", "A"): OK("192.0.2.10")}
    r = route("plain.test", answers)
    assert r.kind is RouteKind.REMOTE
    assert r.targets == (
        Target(host="plain.test", address=ip_address("192.0.2.10"), port=25, preference=0),
    )
    assert any("implicit MX" in line for line in r.trace)


def test_implicit_mx_without_addresses_fails_with_5_4_4() -> None:
    r = route("bare.test", {("bare.test", "MX"): NODATA, ("bare.test", "A"): NODATA})
    assert r.kind is RouteKind.FAILED and r.reply is not None
    assert (r.reply.code, r.reply.enhanced) == (550, "5.4.4")


def test_nxdomain_is_permanent_5_1_2() -> None:
    r = route("gone.test", {("gone.test", "MX"): NX})
    assert r.kind is RouteKind.FAILED and r.reply is not None
    assert (r.reply.code, r.reply.enhanced) == (550, "5.1.2")


@pytest.mark.parametrize("answer", [SERVFAIL, TIMEOUT])
def test_servfail_or_timeout_is_temporary_4_4_3(answer: DnsAnswer) -> None:
    r = route("flaky.test", {("flaky.test", "MX"): answer})
    assert r.kind is RouteKind.DEFERRED and r.reply is not None
    assert (r.reply.code, r.reply.enhanced) == (451, "4.4.3")


def test_mx_hosts_whose_lookups_fail_temporarily_defer_instead_of_bouncing() -> None:
    answers = {
        ("d.test", "MX"): OK("10 a.d.test.", "20 b.d.test."),
        ("a.d.test", "A"): NX,
        ("b.d.test", "A"): SERVFAIL,
    }
    r = route(
        "d.test", answers, config=RoutingConfig(address_preference=AddressPreference.IPV4_ONLY)
    )
    assert r.kind is RouteKind.DEFERRED and r.reply is not None and r.reply.enhanced == "4.4.3"


def test_mx_hosts_that_all_do_not_exist_fail_permanently() -> None:
    answers = {("d.test", "MX"): OK("10 a.d.test.", "20 b.d.test.")}
    r = route("d.test", answers)
    assert r.kind is RouteKind.FAILED and r.reply is not None and r.reply.enhanced == "5.4.4"


def test_unresolvable_mx_host_is_skipped_for_the_next() -> None:
    answers = {
        ("d.test", "MX"): OK("10 a.d.test.", "20 b.d.test."),
        ("b.d.test", "A"): OK("192.0.2.2"),
    }
    r = route("d.test", answers)
    assert hosts(r) == ["b.d.test"]
    assert any(line.startswith("skip a.d.test") for line in r.trace)


def test_self_mx_by_name_drops_its_preference_level_and_worse() -> None:
    answers = {
        ("d.test", "MX"): OK(
            "10 primary.d.test.", "20 MX.US.TEST.", "20 peer.d.test.", "30 z.test."
        ),
        ("primary.d.test", "A"): OK("192.0.2.1"),
        ("peer.d.test", "A"): OK("192.0.2.2"),
        ("z.test", "A"): OK("192.0.2.3"),
    }
    r = route("d.test", answers)
    # RFC 5321 5.1: "all records at that preference level and higher-numbered ones MUST be
    # discarded" -- so the equal-preference peer goes too
    assert hosts(r) == ["primary.d.test"]


def test_self_mx_by_address_drops_its_preference_level_and_worse() -> None:
    answers = {
        ("d.test", "MX"): OK("10 primary.d.test.", "20 alias-of-us.d.test.", "30 z.test."),
        ("primary.d.test", "A"): OK("192.0.2.1"),
        ("alias-of-us.d.test", "AAAA"): OK("2001:db8::99"),
        ("z.test", "A"): OK("192.0.2.3"),
    }
    r = route("d.test", answers)
    assert hosts(r) == ["primary.d.test"]
    assert any("resolves to this server" in line for line in r.trace)


def test_being_the_best_mx_for_a_non_local_domain_is_a_loop_error() -> None:
    answers = {("d.test", "MX"): OK("10 mx.us.test.", "20 backup.d.test.")}
    r = route("d.test", answers)
    assert r.kind is RouteKind.FAILED and r.reply is not None
    assert (r.reply.code, r.reply.enhanced) == (554, "5.4.6")
    assert "loops back to myself" in r.reply.text


def test_best_mx_by_address_is_also_a_loop_error() -> None:
    answers = {("d.test", "MX"): OK("10 a.d.test."), ("a.d.test", "A"): OK("192.0.2.99")}
    r = route("d.test", answers)
    assert r.kind is RouteKind.FAILED and r.reply is not None and r.reply.enhanced == "5.4.6"


def test_best_mx_can_be_configured_to_deliver_locally() -> None:
    config = RoutingConfig(hostname="mx.us.test", best_mx_is_local=True)
    r = route("d.test", {("d.test", "MX"): OK("10 mx.us.test.")}, config=config)
    assert r.kind is RouteKind.LOCAL


def test_max_mx_hosts_bounds_the_hosts_looked_up() -> None:
    records = tuple(f"{i} h{i}.test." for i in range(30))
    r = plan_mx("d.test", OK(*records), config=RoutingConfig(max_mx_hosts=3), seed=0)
    assert isinstance(r, MXPlan) and [h for _, h in r.hosts] == ["h0.test", "h1.test", "h2.test"]


# --- ordering ---------------------------------------------------------------------------------


def _mx(*pairs: tuple[int, str]) -> list[MXRecord]:
    return [MXRecord(preference=p, exchange=h) for p, h in pairs]


def test_mx_hosts_are_ordered_by_preference() -> None:
    ordered = order_mx(_mx((30, "c"), (10, "a"), (20, "b")), seed=0)
    assert [r.exchange for r in ordered] == ["a", "b", "c"]


def test_equal_preference_shuffle_is_deterministic_per_seed() -> None:
    records = _mx(*((10, f"mx{i}.test") for i in range(8)))
    assert order_mx(records, seed=42) == order_mx(list(reversed(records)), seed=42)


def test_equal_preference_shuffle_varies_across_seeds() -> None:
    records = _mx(*((10, f"mx{i}.test") for i in range(4)))
    orders = {order_mx(records, seed=s) for s in range(50)}
    assert len(orders) > 10  # 24 permutations exist; 50 seeds hit many of them
    firsts = {o[0].exchange for o in orders}
    assert firsts == {f"mx{i}.test" for i in range(4)}  # every host gets to go first


def test_a_host_listed_twice_keeps_its_best_preference() -> None:
    ordered = order_mx(_mx((20, "a"), (10, "a"), (15, "b")), seed=0)
    assert [(r.preference, r.exchange) for r in ordered] == [(10, "a"), (15, "b")]


mx_lists = st.lists(
    st.builds(
        MXRecord,
        preference=st.integers(0, 5),
        exchange=st.sampled_from([f"h{i}.test" for i in range(8)]),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(records=mx_lists, seed=st.integers())
def test_order_respects_preference_and_lists_every_host_once(
    records: list[MXRecord], seed: int
) -> None:
    ordered = order_mx(records, seed=seed)
    prefs = [r.preference for r in ordered]
    assert prefs == sorted(prefs)
    names = [r.exchange for r in ordered]
    assert len(names) == len(set(names))
    assert set(names) == {r.exchange for r in records}
    for r in ordered:
        assert r.preference == min(x.preference for x in records if x.exchange == r.exchange)


@settings(max_examples=200, deadline=None)
@given(
    names=st.lists(st.sampled_from([f"h{i}.test" for i in range(10)]), unique=True),
    seed=st.integers(),
)
def test_shuffle_is_a_permutation(names: list[str], seed: int) -> None:
    ordered = order_mx(_mx(*((7, n) for n in names)), seed=seed)
    assert sorted(r.exchange for r in ordered) == sorted(names)


@settings(max_examples=100, deadline=None)
@given(
    records=mx_lists,
    seed=st.integers(),
    v4=st.dictionaries(st.sampled_from([f"h{i}.test" for i in range(8)]), st.integers(1, 5)),
)
def test_route_targets_follow_preference_and_repeat_no_address(
    records: list[MXRecord], seed: int, v4: dict[str, int]
) -> None:
    answers = {("d.test", "MX"): OK(*(f"{r.preference} {r.exchange}." for r in records))}
    for host, last in v4.items():
        answers[(host, "A")] = OK(f"192.0.2.{last}")
    r = route("d.test", answers, seed=seed)
    prefs = [t.preference or 0 for t in r.targets]
    assert prefs == sorted(prefs)
    assert len({t.address for t in r.targets}) == len(r.targets)


# --- addresses -----------------------------------------------------------------------------

DUAL = {
    ("d.test", "MX"): OK("10 a.d.test.", "20 b.d.test."),
    ("a.d.test", "A"): OK("192.0.2.1"),
    ("a.d.test", "AAAA"): OK("2001:db8::1"),
    ("b.d.test", "A"): OK("192.0.2.2"),
    ("b.d.test", "AAAA"): OK("2001:db8::2"),
}


@pytest.mark.parametrize(
    ("preference", "expected"),
    [
        (AddressPreference.PREFER_IPV6, ["2001:db8::1", "192.0.2.1", "2001:db8::2", "192.0.2.2"]),
        (AddressPreference.PREFER_IPV4, ["192.0.2.1", "2001:db8::1", "192.0.2.2", "2001:db8::2"]),
        (AddressPreference.IPV6_ONLY, ["2001:db8::1", "2001:db8::2"]),
        (AddressPreference.IPV4_ONLY, ["192.0.2.1", "192.0.2.2"]),
    ],
)
def test_address_family_preference_orders_each_hosts_addresses(
    preference: AddressPreference, expected: list[str]
) -> None:
    r = route("d.test", DUAL, config=RoutingConfig(address_preference=preference))
    assert [str(t.address) for t in r.targets] == expected


def test_one_family_failing_still_uses_the_other() -> None:
    answers = {**DUAL, ("a.d.test", "AAAA"): SERVFAIL}
    r = route("d.test", answers)
    assert [str(t.address) for t in r.targets][:2] == ["192.0.2.1", "2001:db8::2"]
    assert any("AAAA servfail" in line for line in r.trace)


def test_an_address_shared_by_two_hosts_is_tried_once() -> None:
    answers = {
        ("d.test", "MX"): OK("10 a.d.test.", "20 b.d.test."),
        ("a.d.test", "A"): OK("192.0.2.1"),
        ("b.d.test", "A"): OK("192.0.2.1"),
    }
    r = route("d.test", answers)
    assert [t.host for t in r.targets] == ["a.d.test"]


def test_malformed_address_records_are_ignored() -> None:
    answers = {
        ("d.test", "MX"): NODATA,
        ("d.test", "A"): OK("2001:db8::1", "nonsense", "192.0.2.4"),
    }
    r = route("d.test", answers)
    assert [str(t.address) for t in r.targets] == ["192.0.2.4"]


def test_max_targets_truncates_the_address_list() -> None:
    answers = {("d.test", "MX"): NODATA, ("d.test", "A"): OK(*(f"192.0.2.{i}" for i in range(9)))}
    r = route("d.test", answers, config=RoutingConfig(max_targets=4))
    assert len(r.targets) == 4


def test_route_port_comes_from_the_configured_smtp_port() -> None:
    answers = {("d.test", "MX"): NODATA, ("d.test", "A"): OK("127.0.0.1")}
    r = route("d.test", answers, config=RoutingConfig(smtp_port=2525))
    assert r.targets[0].port == 2525


def test_explain_says_why_each_host_was_chosen_or_skipped() -> None:
    answers = {
        ("d.test", "MX"): OK("10 a.d.test.", "10 b.d.test.", "20 mx.us.test."),
        ("a.d.test", "A"): OK("192.0.2.1"),
    }
    text = "\n".join(explain(route("d.test", answers)))
    assert text.startswith("route for d.test: remote")
    assert "skip MX mx.us.test (preference 20): is this server" in text
    assert "skip b.d.test: no usable address" in text
    assert "try 1: a.d.test[192.0.2.1]:25 (preference 10)" in text


def test_config_rejects_bad_limits_and_ports() -> None:
    with pytest.raises(LocalProtocolError):
        RoutingConfig(max_mx_hosts=0)
    with pytest.raises(LocalProtocolError):
        RoutingConfig(smtp_port=70000)


def test_dns_answer_with_records_must_be_ok() -> None:
    with pytest.raises(LocalProtocolError):
        DnsAnswer(status=DnsStatus.NXDOMAIN, records=("192.0.2.1",))
    assert DnsAnswer.of().status is DnsStatus.NODATA


# --- the delivery walk ------------------------------------------------------------------------

T = [Target(host=f"h{i}.test", address=ip_address(f"192.0.2.{i}")) for i in range(1, 4)]


def remote(*rcpts: str, targets: tuple[Target, ...] = tuple(T)) -> Route:
    return Route(kind=RouteKind.REMOTE, nexthop="d.test", recipients=rcpts, targets=targets)


def R(code: int, text: str = "") -> Reply:  # noqa: N802
    return Reply(code=code, text=text)


def statuses(walk: DeliveryWalk) -> dict[str, str]:
    return {r: res.status.value for r, res in walk.results().items()}


def test_refused_connection_moves_to_the_next_host_and_delivers() -> None:
    walk = DeliveryWalk(remote("a@d.test"))
    assert walk.next_target() == T[0]
    walk.feed(ConnectFailed(reason="connection refused"))
    assert walk.next_target() == T[1]
    walk.feed(RecipientReply(recipient="a@d.test", reply=R(250)))
    walk.feed(MessageReply(reply=R(250, "2.0.0 queued")))
    assert walk.next_target() is None and walk.is_finished
    result = walk.results()["a@d.test"]
    assert result.status is RecipientStatus.DELIVERED and result.target == T[1]


@pytest.mark.parametrize("stage", [Stage.GREETING, Stage.HELLO, Stage.MAIL])
def test_4xx_at_greeting_ehlo_or_mail_moves_to_the_next_host(stage: Stage) -> None:
    walk = DeliveryWalk(remote("a@d.test"))
    walk.next_target()
    walk.feed(SessionReply(stage=stage, reply=R(451, "4.3.0 try later")))
    assert walk.next_target() == T[1]


def test_5xx_to_mail_from_is_final_for_every_recipient() -> None:
    walk = DeliveryWalk(remote("a@d.test", "b@d.test"))
    walk.next_target()
    walk.feed(SessionReply(stage=Stage.MAIL, reply=R(550, "5.7.1 sender refused")))
    assert walk.next_target() is None
    assert statuses(walk) == {"a@d.test": "failed", "b@d.test": "failed"}


def test_per_recipient_5xx_is_final_and_4xx_stays_queued() -> None:
    walk = DeliveryWalk(remote("ok@d.test", "bad@d.test", "busy@d.test"))
    walk.next_target()
    walk.feed(RecipientReply(recipient="ok@d.test", reply=R(250)))
    walk.feed(RecipientReply(recipient="bad@d.test", reply=R(550, "5.1.1 no such user")))
    walk.feed(RecipientReply(recipient="busy@d.test", reply=R(452, "4.2.2 mailbox full")))
    walk.feed(MessageReply(reply=R(250)))
    assert walk.next_target() is None
    assert statuses(walk) == {
        "ok@d.test": "delivered",
        "bad@d.test": "failed",
        "busy@d.test": "deferred",
    }
    assert walk.results()["busy@d.test"].reply.enhanced == "4.2.2"


def test_every_recipient_refused_ends_the_session_without_data() -> None:
    walk = DeliveryWalk(remote("a@d.test"))
    walk.next_target()
    walk.feed(RecipientReply(recipient="a@d.test", reply=R(550)))
    assert walk.is_finished and walk.next_target() is None
    with pytest.raises(LocalProtocolError):
        walk.feed(MessageReply(reply=R(250)))


def test_running_out_of_hosts_defers_with_the_last_reason() -> None:
    walk = DeliveryWalk(remote("a@d.test"))
    while walk.next_target() is not None:
        walk.feed(ConnectFailed(reason="timed out"))
    result = walk.results()["a@d.test"]
    assert result.status is RecipientStatus.DEFERRED
    assert result.reply.enhanced == "4.4.1" and "h3.test" in result.reply.text


def test_5xx_greeting_tries_backups_and_fails_only_when_every_host_refused() -> None:
    walk = DeliveryWalk(remote("a@d.test"))
    while walk.next_target() is not None:
        walk.feed(SessionReply(stage=Stage.GREETING, reply=R(554, "5.7.1 no service")))
    assert statuses(walk) == {"a@d.test": "failed"}
    mixed = DeliveryWalk(remote("a@d.test"))
    mixed.next_target()
    mixed.feed(ConnectFailed(reason="refused"))
    while mixed.next_target() is not None:
        mixed.feed(SessionReply(stage=Stage.HELLO, reply=R(554)))
    assert statuses(mixed) == {"a@d.test": "deferred"}


def test_connection_lost_after_rcpt_retries_accepted_recipients_elsewhere() -> None:
    walk = DeliveryWalk(remote("a@d.test", "b@d.test"))
    walk.next_target()
    walk.feed(RecipientReply(recipient="a@d.test", reply=R(250)))
    walk.feed(RecipientReply(recipient="b@d.test", reply=R(550)))
    walk.feed(ConnectionLost(reason="reset"))
    assert walk.next_target() == T[1]
    assert walk.pending == ("a@d.test",)
    walk.feed(RecipientReply(recipient="a@d.test", reply=R(250)))
    walk.feed(MessageReply(reply=R(250)))
    assert statuses(walk) == {"a@d.test": "delivered", "b@d.test": "failed"}


def test_421_to_rcpt_moves_the_open_recipients_to_the_next_host() -> None:
    walk = DeliveryWalk(remote("a@d.test", "b@d.test"))
    walk.next_target()
    walk.feed(RecipientReply(recipient="a@d.test", reply=R(550)))
    walk.feed(RecipientReply(recipient="b@d.test", reply=R(421, "4.3.2 closing")))
    assert walk.next_target() == T[1] and walk.pending == ("b@d.test",)


def test_message_reply_4xx_defers_and_5xx_fails_the_accepted_recipients() -> None:
    for code, expected in ((451, "deferred"), (554, "failed")):
        walk = DeliveryWalk(remote("a@d.test"))
        walk.next_target()
        walk.feed(RecipientReply(recipient="a@d.test", reply=R(250)))
        walk.feed(MessageReply(reply=R(code)))
        assert walk.next_target() is None and statuses(walk) == {"a@d.test": expected}


def test_lmtp_per_recipient_final_replies() -> None:
    walk = DeliveryWalk(remote("a@d.test", "b@d.test"))
    walk.next_target()
    for rcpt in ("a@d.test", "b@d.test"):
        walk.feed(RecipientReply(recipient=rcpt, reply=R(250)))
    walk.feed(MessageReply(recipient="a@d.test", reply=R(250)))
    assert not walk.is_finished
    walk.feed(MessageReply(recipient="b@d.test", reply=R(452)))
    assert statuses(walk) == {"a@d.test": "delivered", "b@d.test": "deferred"}


def test_recipients_not_offered_in_a_session_get_the_same_host_again() -> None:
    walk = DeliveryWalk(remote("a@d.test", "b@d.test"))
    walk.next_target()
    walk.feed(RecipientReply(recipient="a@d.test", reply=R(250)))
    walk.feed(MessageReply(reply=R(250)))  # the client's per-session limit left b out
    assert walk.next_target() == T[0] and walk.pending == ("b@d.test",)


def test_max_connections_limits_the_targets_tried_and_defers() -> None:
    walk = DeliveryWalk(remote("a@d.test"), max_connections=2)
    tried = []
    while (target := walk.next_target()) is not None:
        tried.append(target)
        walk.feed(SessionReply(stage=Stage.GREETING, reply=R(554)))
    assert tried == T[:2]
    assert statuses(walk) == {"a@d.test": "deferred"}  # not every host said no


def test_failed_and_deferred_routes_finish_at_once_with_the_route_reply() -> None:
    reply = R(556, "5.1.10 null MX")
    walk = DeliveryWalk(Route(kind=RouteKind.FAILED, nexthop="d", recipients=("a@d",), reply=reply))
    assert walk.is_finished and walk.next_target() is None
    assert walk.results()["a@d"].reply == reply


def test_walk_misuse_raises_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError):
        DeliveryWalk(Route(kind=RouteKind.LOCAL, nexthop="d"))
    walk = DeliveryWalk(remote("a@d.test"))
    with pytest.raises(LocalProtocolError):
        walk.feed(ConnectFailed(reason="x"))  # before next_target
    walk.next_target()
    walk.feed(RecipientReply(recipient="a@d.test", reply=R(250)))
    with pytest.raises(LocalProtocolError):
        walk.next_target()  # a message reply is owed
    with pytest.raises(LocalProtocolError):
        walk.feed(SessionReply(stage=Stage.GREETING, reply=R(220)))
    with pytest.raises(LocalProtocolError):
        walk.feed(RecipientReply(recipient="stranger@d.test", reply=R(250)))


RCPTS = ("a@d.test", "b@d.test", "c@d.test")


@settings(max_examples=300, deadline=None)
@given(data=st.data(), ntargets=st.integers(0, 4), limit=st.none() | st.integers(1, 4))
def test_walk_gives_every_recipient_exactly_one_final_result(
    data: st.DataObject, ntargets: int, limit: int | None
) -> None:
    targets = tuple(
        Target(host=f"h{i}.test", address=ip_address(f"192.0.2.{i + 1}")) for i in range(ntargets)
    )
    walk = DeliveryWalk(remote(*RCPTS, targets=targets), max_connections=limit)
    connections = 0
    while (target := walk.next_target()) is not None:
        connections += 1
        assert connections <= 2 * ntargets * len(RCPTS)
        assert walk.current == target and walk.pending
        kind = data.draw(st.sampled_from(["connect", "lost", "session", "rcpts"]))
        if kind == "connect":
            walk.feed(ConnectFailed(reason="refused"))
        elif kind == "lost":
            walk.feed(ConnectionLost(reason="reset"))
        elif kind == "session":
            stage = data.draw(st.sampled_from(list(Stage)))
            walk.feed(
                SessionReply(stage=stage, reply=R(data.draw(st.sampled_from([421, 451, 554]))))
            )
        else:
            offered = data.draw(st.integers(1, len(walk.pending)))
            for rcpt in walk.pending[:offered]:
                code = data.draw(st.sampled_from([250, 250, 451, 550, 421]))
                walk.feed(RecipientReply(recipient=rcpt, reply=R(code)))
                if code == 421:
                    break
            if walk.current is not None and walk.accepted:
                if data.draw(st.booleans()):
                    walk.feed(
                        MessageReply(reply=R(data.draw(st.sampled_from([250, 451, 554, 421]))))
                    )
                else:
                    walk.feed(ConnectionLost(reason="reset"))
    assert walk.is_finished
    results = walk.results()
    assert set(results) == set(RCPTS)
    assert walk.pending == ()
    for res in results.values():
        delivered = res.status is RecipientStatus.DELIVERED
        assert delivered == res.reply.is_positive

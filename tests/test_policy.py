"""Relay policy (no open relay by default) and token-bucket sender limits."""

from __future__ import annotations

import math
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._policy import (
    Limit,
    LimitKey,
    Rate,
    RateLimiter,
    RelayPolicy,
    RelayVerdict,
    SenderLimits,
    check_relay,
)

POLICY = RelayPolicy(
    local_domains=frozenset({"us.test"}),
    relay_domains=frozenset({"backup-for.test"}),
    local_addresses=frozenset({ip_address("192.0.2.99")}),
    trusted_networks=(ip_network("10.0.0.0/8"), ip_network("2001:db8:1::/48")),
)


def verdict(
    recipient: str,
    client: str | IPv4Address | IPv6Address | None = "198.51.100.1",
    user: str | None = None,
) -> str:
    return check_relay(
        POLICY, recipient=recipient, client_address=client, authenticated_user=user
    ).verdict.value


# --- relay -----------------------------------------------------------------------------------


def test_default_policy_is_not_an_open_relay() -> None:
    decision = check_relay(
        RelayPolicy(), recipient="victim@elsewhere.test", client_address="10.1.2.3"
    )
    assert not decision.allowed and decision.verdict is RelayVerdict.DENIED
    assert decision.reply is not None
    assert (decision.reply.code, decision.reply.text) == (554, "5.7.1 Relay access denied")
    assert decision.reply.enhanced == "5.7.1"


def test_local_domains_are_open_to_anyone() -> None:
    assert verdict("a@us.test", client=None) == "local"
    assert verdict("a@US.Test.") == "local"
    assert verdict("a@[192.0.2.99]") == "local"
    assert verdict("Postmaster") == "local"  # RFC 5321 4.5.1


def test_relay_domains_are_open_to_anyone() -> None:
    assert verdict("a@backup-for.test") == "relay-domain"


def test_subdomains_of_local_domains_are_not_local() -> None:
    assert verdict("a@sub.us.test") == "denied"


def test_trusted_networks_may_relay_anywhere() -> None:
    assert verdict("a@elsewhere.test", client="10.9.8.7") == "trusted-network"
    assert verdict("a@elsewhere.test", client="2001:db8:1::5") == "trusted-network"
    assert verdict("a@elsewhere.test", client=ip_address("10.0.0.1")) == "trusted-network"
    # a dual-stack socket reports IPv4 clients as v4-mapped IPv6
    assert verdict("a@elsewhere.test", client="::ffff:10.0.0.1") == "trusted-network"


def test_untrusted_unauthenticated_clients_may_not_relay() -> None:
    assert verdict("a@elsewhere.test") == "denied"
    assert verdict("a@elsewhere.test", client=None) == "denied"
    assert verdict("a@[192.0.2.1]") == "denied"
    assert verdict("a@elsewhere.test", client="not an address") == "denied"


def test_percent_hack_and_bang_paths_do_not_open_relaying() -> None:
    # the domain after the last "@" decides; the local part is the local delivery's business
    assert verdict('"victim%elsewhere.test"@us.test') == "local"
    assert verdict("us.test!victim@elsewhere.test") == "denied"
    assert verdict('"x@us.test"@elsewhere.test') == "denied"


def test_authenticated_clients_may_relay_unless_disabled() -> None:
    assert verdict("a@elsewhere.test", user="alice") == "authenticated"
    strict = RelayPolicy(allow_authenticated=False)
    decision = check_relay(
        strict, recipient="a@elsewhere.test", client_address=None, authenticated_user="alice"
    )
    assert not decision.allowed


def test_reject_code_can_be_550_but_nothing_else() -> None:
    policy = RelayPolicy(reject_code=550)
    decision = check_relay(policy, recipient="a@x.test", client_address=None)
    assert decision.reply is not None and decision.reply.code == 550
    with pytest.raises(LocalProtocolError):
        RelayPolicy(reject_code=450)


# --- rate limits -----------------------------------------------------------------------------


NO_LIMIT = Limit()


def limiter(
    *, per_client: Limit = NO_LIMIT, per_user: Limit = NO_LIMIT, per_sender: Limit = NO_LIMIT
) -> RateLimiter:
    return RateLimiter(
        SenderLimits(per_client=per_client, per_user=per_user, per_sender=per_sender)
    )


def test_message_limit_per_client_refuses_with_450_4_7_1_and_a_retry_time() -> None:
    rl = limiter(per_client=Limit(messages=Rate(count=3, interval=60)))
    for _ in range(3):
        assert rl.admit_message(0.0, client_address="192.0.2.1").allowed
    refused = rl.admit_message(0.0, client_address="192.0.2.1")
    assert not refused.allowed and refused.limited_by is LimitKey.CLIENT
    assert refused.reply is not None and refused.reply.code == 450
    assert refused.reply.enhanced == "4.7.1"
    assert refused.retry_after == 20  # one token per 20 s
    assert "try again in 20 seconds" in refused.reply.text
    assert "192.0.2.1" in refused.reply.text
    # another client is not affected
    assert rl.admit_message(0.0, client_address="192.0.2.2").allowed


def test_tokens_refill_with_time() -> None:
    rl = limiter(per_client=Limit(messages=Rate(count=1, interval=10)))
    assert rl.admit_message(100.0, client_address="192.0.2.1").allowed
    assert not rl.admit_message(109.0, client_address="192.0.2.1").allowed
    assert rl.admit_message(110.0, client_address="192.0.2.1").allowed


def test_burst_sets_capacity_separately_from_rate() -> None:
    rl = limiter(per_user=Limit(messages=Rate(count=1, interval=10, burst=5)))
    granted = [rl.admit_message(0.0, client_address=None, user="u").allowed for _ in range(7)]
    assert granted == [True] * 5 + [False] * 2


def test_recipient_limits_per_sender_are_case_insensitive() -> None:
    rl = limiter(per_sender=Limit(recipients=Rate(count=10, interval=60)))
    assert rl.admit_recipients(0.0, client_address=None, sender="Bob@x.test", count=6).allowed
    refused = rl.admit_recipients(0.0, client_address=None, sender="bob@X.TEST", count=6)
    assert not refused.allowed and refused.limited_by is LimitKey.SENDER
    assert refused.reply is not None and "Recipient rate limit" in refused.reply.text
    assert rl.admit_recipients(0.0, client_address=None, sender="bob@x.test", count=4).allowed


def test_null_sender_and_anonymous_users_are_not_keyed() -> None:
    rl = limiter(per_sender=Limit(messages=Rate(count=1)), per_user=Limit(messages=Rate(count=1)))
    for _ in range(5):
        assert rl.admit_message(0.0, client_address=None, sender="", user=None).allowed
    assert len(rl) == 0


def test_a_request_larger_than_the_bucket_is_never_granted() -> None:
    rl = limiter(per_client=Limit(recipients=Rate(count=5)))
    refused = rl.admit_recipients(0.0, client_address="192.0.2.1", count=6)
    assert not refused.allowed and math.isinf(refused.retry_after)


def test_a_refused_request_charges_no_bucket() -> None:
    rl = limiter(
        per_client=Limit(messages=Rate(count=10, interval=10)),
        per_user=Limit(messages=Rate(count=1, interval=10)),
    )
    assert rl.admit_message(0.0, client_address="192.0.2.1", user="u").allowed
    for _ in range(5):  # refused by the user limit: the client bucket keeps its tokens
        assert not rl.admit_message(0.0, client_address="192.0.2.1", user="u").allowed
    granted = [rl.admit_message(0.0, client_address="192.0.2.1").allowed for _ in range(10)]
    assert granted.count(True) == 9


def test_the_strictest_limit_decides_the_retry_time() -> None:
    rl = limiter(
        per_client=Limit(messages=Rate(count=1, interval=10)),
        per_user=Limit(messages=Rate(count=1, interval=100)),
    )
    rl.admit_message(0.0, client_address="192.0.2.1", user="u")
    refused = rl.admit_message(0.0, client_address="192.0.2.1", user="u")
    assert refused.limited_by is LimitKey.USER and refused.retry_after == 100


def test_a_clock_stepping_back_refills_nothing() -> None:
    rl = limiter(per_client=Limit(messages=Rate(count=2, interval=10)))
    assert rl.admit_message(100.0, client_address="192.0.2.1").allowed
    assert rl.admit_message(50.0, client_address="192.0.2.1").allowed  # no refill, 1 token left
    assert not rl.admit_message(50.0, client_address="192.0.2.1").allowed
    # the bucket was last charged at 100 (not 50): by 101 only 0.2 tokens have come back
    assert not rl.admit_message(101.0, client_address="192.0.2.1").allowed
    assert rl.admit_message(105.0, client_address="192.0.2.1").allowed


def test_memory_is_bounded_and_idle_buckets_are_dropped() -> None:
    rl = RateLimiter(
        SenderLimits(per_client=Limit(messages=Rate(count=2, interval=10)), max_buckets=100)
    )
    for i in range(1000):
        rl.admit_message(0.0, client_address=f"10.0.{i // 250}.{i % 250}")
        assert len(rl) <= 100
    rl.prune(10.0)  # every bucket has refilled by then
    assert len(rl) == 0
    for i in range(50):
        rl.admit_message(float(i * 10), client_address=f"10.1.0.{i}")
    assert len(rl) <= 2  # refilled buckets at the cold end go as new ones arrive


def test_rates_must_be_positive_and_finite() -> None:
    for kw in ({"count": 0}, {"count": 1, "interval": 0}, {"count": 1, "burst": -1}):
        with pytest.raises(LocalProtocolError):
            Rate(**kw)
    with pytest.raises(LocalProtocolError):
        Rate(count=math.inf)
    with pytest.raises(LocalProtocolError):
        SenderLimits(max_buckets=0)
    with pytest.raises(LocalProtocolError):
        RateLimiter(SenderLimits()).admit_recipients(0.0, client_address=None, count=-1)


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 20),
    interval=st.floats(0.5, 100.0),
    burst=st.none() | st.integers(1, 30),
    steps=st.lists(st.tuples(st.floats(0.0, 30.0), st.integers(0, 5)), min_size=1, max_size=60),
)
def test_never_allows_more_than_capacity_plus_rate_times_elapsed(
    count: int, interval: float, burst: int | None, steps: list[tuple[float, int]]
) -> None:
    rate = Rate(count=count, interval=interval, burst=burst)
    rl = limiter(per_client=Limit(recipients=rate))
    now = 0.0
    granted: list[tuple[float, int]] = []
    for gap, cost in steps:
        now += gap
        if rl.admit_recipients(now, client_address="192.0.2.1", count=cost).allowed:
            granted.append((now, cost))
    # over every window [t_i, t_j] of grants: tokens <= capacity + rate * (t_j - t_i)
    for i in range(len(granted)):
        total = 0
        for j in range(i, len(granted)):
            total += granted[j][1]
            elapsed = granted[j][0] - granted[i][0]
            assert total <= rate.capacity + rate.per_second * elapsed + 1e-6


@settings(max_examples=100, deadline=None)
@given(gaps=st.lists(st.integers(0, 5), min_size=1, max_size=40))
def test_a_steady_sender_within_the_rate_is_never_refused(gaps: list[int]) -> None:
    rl = limiter(per_client=Limit(messages=Rate(count=1, interval=1.0)))
    now = 0.0
    for gap in gaps:
        now += 1.0 + gap  # at most one per second
        assert rl.admit_message(now, client_address="192.0.2.1").allowed

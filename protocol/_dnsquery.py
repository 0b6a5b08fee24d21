# The DNS lookups of routing as a sans-I/O machine.
#
# Strategy.  A RouteLookup is built for one Destination.  It asks for (name, rdtype) queries
# through ``outstanding()``, takes each answer through ``receive()``, and once it has what it
# needs exposes the final Route as ``result``.  It never performs a lookup itself, so the
# asyncio, trio and thread adapters (adapters/_dns.py) drive the very same machine with
# dnspython, and the tests drive it with a dict.
#
# Phases:
#   1. MX      for an MX-routed next hop: one query, (domain, MX).  Its answer goes through
#              _routing.plan_mx: NXDOMAIN, SERVFAIL/TIMEOUT, null MX and "we are the best MX"
#              end here without further queries; otherwise the surviving MX hosts are known.
#   2. ADDRESS (host, AAAA) and/or (host, A) for every surviving host, in the configured family
#              order, all outstanding at once so that an async driver may run them in
#              parallel.  A relay host (transport map, no MX) starts here; an IP address
#              needs no query at all.
#   3. DONE    _routing.finish_route builds the Route.
#
# CNAMEs: the machine assumes a recursive resolver that follows CNAME chains (dnspython's
# Resolver does, and reports the final records), so it never asks for CNAME itself.  RFC 5321
# 5.1 says MX names "MUST NOT" be aliases, but following one, as every resolver does, is the
# robust reading.
#
# Invariants: every query is asked once; an answer to a query that was not asked (or was
# already answered) is the caller's bug and raises LocalProtocolError; the number of queries
# is bounded by 1 + 2 * RoutingConfig.max_mx_hosts.
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._events import Reply
from mailwire.protocol._grammar import is_valid_domain
from mailwire.protocol._routing import (
    Destination,
    DnsAnswer,
    DnsStatus,
    MXPlan,
    Route,
    RouteKind,
    RoutingConfig,
    finish_route,
    parse_ip,
    plan_mx,
)


class RRType(enum.StrEnum):
    """The record types routing asks for (a ``str``, so it can go straight to dnspython)."""

    MX = "MX"
    A = "A"
    AAAA = "AAAA"


@dataclass(frozen=True, slots=True, kw_only=True)
class Query:
    """One DNS question.

    Attributes:
        name: the domain name, normalised (lower case, A-labels, no trailing dot).  Drivers
            should query it as an absolute name (append ``"."``) without search domains.
        rdtype: the record type.
    """

    name: str
    rdtype: RRType

    def __str__(self) -> str:
        return f"{self.name}/{self.rdtype.value}"


class _Phase(enum.Enum):
    MX = "mx"
    ADDRESS = "address"
    DONE = "done"


class RouteLookup:
    """The DNS lookups for one Destination, as a machine that asks and is answered.

    Usage (a synchronous driver; adapters/_dns.py has the real ones)::

        lookup = RouteLookup(destination, config=config, seed=seed)
        while lookup.result is None:
            for query in lookup.outstanding():
                lookup.receive(query, ask_dns(query))
        route = lookup.result

    Args:
        destination: from group_recipients.
        config: routing configuration.
        seed: the shuffle seed for equal-preference MX hosts and addresses.
    """

    def __init__(self, destination: Destination, *, config: RoutingConfig, seed: int) -> None:
        self._config = config
        self._seed = seed
        self._destination = destination
        self._asked: dict[Query, DnsAnswer | None] = {}
        self._answers: dict[tuple[str, str], DnsAnswer] = {}
        self._plan: MXPlan | None = None
        self._result: Route | None = None
        self._phase = _Phase.MX
        recipients = destination.recipients
        hop = destination.nexthop
        if destination.local:
            self._finish(
                Route(
                    kind=RouteKind.LOCAL,
                    nexthop=destination.domain,
                    recipients=recipients,
                    trace=(destination.reason,),
                )
            )
        elif hop is None:
            self._finish(
                Route(
                    kind=RouteKind.FAILED,
                    nexthop=destination.domain,
                    recipients=recipients,
                    reply=Reply(
                        code=550, text=f"5.1.2 Bad destination domain {destination.domain!r}"
                    ),
                    trace=(destination.reason, "not a valid domain: no DNS lookup"),
                )
            )
        elif hop.address is not None:
            self._start_addresses(MXPlan(hosts=((None, hop.host),), trace=(destination.reason,)))
        elif hop.mx:
            if not is_valid_domain(hop.host, utf8=False):  # pragma: no cover - NextHop checks
                raise LocalProtocolError(f"bad next hop {hop.host!r}")
            self._ask(Query(name=hop.host, rdtype=RRType.MX))
        else:
            plan = MXPlan(hosts=((None, hop.host),), trace=(destination.reason,))
            self._start_addresses(plan)

    # -- public --------------------------------------------------------------------------------

    @property
    def result(self) -> Route | None:
        """The Route once all needed answers are in, else None."""
        return self._result

    def outstanding(self) -> tuple[Query, ...]:
        """The queries asked and not yet answered, in the order to ask them (empty once the
        result is known)."""
        return tuple(q for q, a in self._asked.items() if a is None)

    def receive(self, query: Query, answer: DnsAnswer) -> None:
        """Take the answer to an outstanding query.

        Args:
            query: one of ``outstanding()``.
            answer: its answer.

        Raises:
            LocalProtocolError: the query was not asked or was already answered.
        """
        if self._asked.get(query, answer) is not None:
            raise LocalProtocolError(f"query {query} is not outstanding")
        self._asked[query] = answer
        if self._phase is _Phase.MX:
            self._after_mx(answer)
        else:
            self._answers[(query.name, query.rdtype.value)] = answer
            if not self.outstanding():
                self._after_addresses()

    # -- internals -----------------------------------------------------------------------------

    def _ask(self, query: Query) -> None:
        self._asked.setdefault(query, None)

    def _finish(self, route: Route) -> None:
        self._result = route
        self._phase = _Phase.DONE

    def _after_mx(self, answer: DnsAnswer) -> None:
        hop = self._destination.nexthop
        assert hop is not None
        outcome = plan_mx(
            hop.host,
            answer,
            config=self._config,
            seed=self._seed,
            recipients=self._destination.recipients,
        )
        if isinstance(outcome, Route):
            self._finish(outcome)
            return
        trace = (self._destination.reason, *outcome.trace)
        self._start_addresses(MXPlan(hosts=outcome.hosts, implicit=outcome.implicit, trace=trace))

    def _start_addresses(self, plan: MXPlan) -> None:
        self._plan = plan
        self._phase = _Phase.ADDRESS
        for _, host in plan.hosts:
            if parse_ip(host) is not None:
                continue  # an address needs no lookup (finish_route uses it as it is)
            valid = is_valid_domain(host, utf8=False)
            for rdtype in self._config.address_preference.rdtypes:
                if valid:
                    self._ask(Query(name=host, rdtype=RRType(rdtype)))
                else:  # an MX naming no valid host: as good as NXDOMAIN, never asked
                    self._answers[(host, rdtype)] = DnsAnswer(status=DnsStatus.NXDOMAIN)
        if not self.outstanding():
            self._after_addresses()

    def _after_addresses(self) -> None:
        assert self._plan is not None
        hop = self._destination.nexthop
        assert hop is not None
        self._finish(
            finish_route(
                hop.host,
                self._plan,
                self._answers,
                config=self._config,
                seed=self._seed,
                port=hop.port,
                recipients=self._destination.recipients,
            )
        )


def route_from_answers(
    destination: Destination,
    answers: Mapping[tuple[str, str], DnsAnswer],
    *,
    config: RoutingConfig,
    seed: int,
) -> Route:
    """Run a RouteLookup against a table of answers (tests, caches, replaying a trace).

    Args:
        destination: from group_recipients.
        answers: (name, rdtype) -> answer.  A query missing from the table gets NODATA when
            the table has another type for that name, NXDOMAIN otherwise.
        config: routing configuration.
        seed: shuffle seed.

    Returns:
        The Route.
    """
    names = {name for name, _ in answers}
    lookup = RouteLookup(destination, config=config, seed=seed)
    while lookup.result is None:
        for query in lookup.outstanding():
            missing = DnsStatus.NODATA if query.name in names else DnsStatus.NXDOMAIN
            answer = answers.get((query.name, query.rdtype.value), DnsAnswer(status=missing))
            lookup.receive(query, answer)
    return lookup.result

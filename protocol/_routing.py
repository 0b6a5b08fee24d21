# Pure routing: where does a recipient's mail go next, and in which order are hosts tried.
#
# Strategy.  Routing is split into small pure steps so that every RFC rule is one function
# with one test, and so that the DNS lookups can be driven by any runtime (see _dnsquery.py,
# the sans-I/O lookup machine that feeds these steps):
#
#   group_recipients()  envelope recipients -> Destinations: one per local domain, one per
#                       next hop (an MX-routed domain, or a smarthost from the transport map,
#                       which may carry several domains at once).
#   plan_mx()           the MX answer for a domain -> the MX hosts still worth looking up, or a
#                       final Route (null MX, NXDOMAIN, SERVFAIL, we are the best MX...).
#   finish_route()      the A/AAAA answers of those hosts -> the ordered connection Targets.
#   DeliveryWalk        one delivery attempt walking the Targets while the caller feeds it
#                       the outcome of each connection and each reply.
#   explain()           a readable account of why each host was chosen or skipped.
#
# No clock, no randomness, no I/O: the equal-preference shuffle takes a ``seed`` and orders
# hosts by a keyed BLAKE2 hash of (seed, domain, host).  Sorting by a hash key is a permutation
# by construction, is the same for the same seed (reproducible tests and traces) and varies
# across seeds (load spreading across a domain's equal MX hosts, RFC 5321 5.1: "the sender-SMTP
# MUST randomize them to spread the load across multiple mail exchangers").
#
# RFC rules implemented here (sections quoted where the code enforces them):
#   RFC 5321 5.1   MX ordering by preference, randomised ties, implicit MX, self-MX pruning,
#                  trying every address of every host in order.
#   RFC 7505       null MX ("MX 0 .") means the domain accepts no mail: 556 5.1.10 without
#                  any connection.
#   RFC 3463       enhanced codes: 5.1.2 (bad destination system), 4.4.3 (routing server
#                  failure), 5.4.4 (unable to route), 5.4.6 (routing loop), 4.4.1 (no answer
#                  from host), 4.4.2 (bad connection).
#
# Invariants (property-tested): MX hosts come out in non-decreasing preference; no host and no
# address appears twice; the shuffle is a permutation of the input; a DeliveryWalk gives every
# recipient exactly one final result, and never hands out a target once all recipients are
# final.
from __future__ import annotations

import enum
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeAlias

from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._events import Reply
from mailwire.protocol._grammar import is_valid_domain, split_mailbox
from mailwire.protocol._queue import RecipientStatus as RecipientStatus  # one vocabulary

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
SMTP_PORT = 25  # RFC 5321 4.5.4.2 (and the IANA registry)


# --- DNS answer vocabulary (what the adapter fetched) ----------------------------------------


class DnsStatus(enum.Enum):
    """How a DNS query ended, as far as routing cares.

    The mapping from dnspython is direct: an ``Answer`` -> OK, ``NXDOMAIN`` -> NXDOMAIN,
    ``NoAnswer`` -> NODATA, ``NoNameservers`` (SERVFAIL/REFUSED everywhere) -> SERVFAIL,
    ``LifetimeTimeout`` -> TIMEOUT.
    """

    OK = "ok"  #: records of the requested type exist
    NODATA = "nodata"  #: the name exists but has no records of that type
    NXDOMAIN = "nxdomain"  #: the name does not exist (permanent)
    SERVFAIL = "servfail"  #: the servers failed to answer (temporary)
    TIMEOUT = "timeout"  #: no answer in time (temporary)

    @property
    def is_temporary(self) -> bool:
        """True for outcomes that may change on a later try (SERVFAIL, TIMEOUT)."""
        return self in (DnsStatus.SERVFAIL, DnsStatus.TIMEOUT)


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsAnswer:
    """The answer to one (name, type) query.

    Records are in DNS presentation format, exactly what dnspython's ``rdata.to_text()``
    returns: ``"10 mx.example.com."`` for MX, ``"192.0.2.1"`` for A, ``"2001:db8::1"`` for
    AAAA.  Converting a dnspython Answer is therefore
    ``DnsAnswer(status=DnsStatus.OK, records=tuple(r.to_text() for r in answer))``.

    Attributes:
        status: how the query ended.
        records: the records (only with ``OK``; an OK answer without records is NODATA).

    Raises:
        LocalProtocolError: records given with a status other than OK.
    """

    status: DnsStatus
    records: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.records and self.status is not DnsStatus.OK:
            raise LocalProtocolError(f"a {self.status.value} answer carries no records")
        if self.status is DnsStatus.OK and not self.records:
            object.__setattr__(self, "status", DnsStatus.NODATA)

    @classmethod
    def of(cls, *records: str) -> DnsAnswer:
        """An OK answer with these records (NODATA if none)."""
        return cls(status=DnsStatus.OK, records=records)


@dataclass(frozen=True, slots=True, kw_only=True)
class MXRecord:
    """One MX record: ``exchange`` normalised (lower case, no trailing dot; ``""`` is the
    root, i.e. the null MX of RFC 7505)."""

    preference: int
    exchange: str

    @property
    def is_null(self) -> bool:
        """True for the RFC 7505 null MX target ``"."``."""
        return self.exchange == ""


def parse_mx(text: str) -> MXRecord:
    """Parse an MX record in presentation format (``"10 mx.example.com."``).

    Raises:
        ValueError: not ``preference exchange`` with a preference in 0..65535.
    """
    pref_text, _, exchange = text.strip().partition(" ")
    exchange = exchange.strip()
    pref = int(pref_text)
    if not 0 <= pref <= 65535 or not exchange or " " in exchange:
        raise ValueError(f"bad MX record {text!r}")
    return MXRecord(preference=pref, exchange=normalize_domain(exchange))


def normalize_domain(domain: str) -> str:
    """Lower-case ``domain``, drop one trailing dot, and turn U-labels into A-labels.

    ``"."`` (the root) becomes ``""``.  Address literals (``[...]``) are returned lower-cased.

    Raises:
        ValueError: an internationalised name that IDNA cannot encode.
    """
    d = domain.strip()
    if d.endswith("."):
        d = d[:-1]
    if not d.isascii():
        try:
            d = d.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"cannot IDNA-encode {domain!r}") from exc
    return d.lower()


def parse_ip(text: str) -> IPAddress | None:
    """Return the IP address written in ``text`` (bare, ``[v4]`` or ``[IPv6:v6]``), or None."""
    t = text.strip()
    if not t or (t[0] not in "[0123456789" and ":" not in t):
        return None  # a host name: skip the costly failed parse
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
        if t[:5].lower() == "ipv6:":
            t = t[5:]
    try:
        return ipaddress.ip_address(t)
    except ValueError:
        return None


# --- configuration ---------------------------------------------------------------------------


class AddressPreference(enum.Enum):
    """Which address family a host's addresses are tried in first (or only)."""

    PREFER_IPV6 = "prefer-ipv6"  #: AAAA addresses first, then A
    PREFER_IPV4 = "prefer-ipv4"  #: A addresses first, then AAAA
    IPV6_ONLY = "ipv6-only"  #: never connect over IPv4 (A is not even looked up)
    IPV4_ONLY = "ipv4-only"  #: never connect over IPv6 (AAAA is not even looked up)

    @property
    def rdtypes(self) -> tuple[str, ...]:
        """The address record types to look up, in preference order."""
        return _RDTYPES[self.value]


_RDTYPES = {
    "prefer-ipv6": ("AAAA", "A"),
    "prefer-ipv4": ("A", "AAAA"),
    "ipv6-only": ("AAAA",),
    "ipv4-only": ("A",),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class NextHop:
    """Where to send: a domain routed by MX, or a relay host (smarthost).

    Attributes:
        host: a domain name, or an IP address (bare, ``[v4]`` or ``[IPv6:v6]``).
        port: the TCP port to connect to.
        mx: look up MX records for ``host`` (normal delivery, Postfix's unbracketed
            ``host``); False: connect to ``host``'s own addresses (Postfix's ``[host]``, the
            usual smarthost form).  Ignored when ``host`` is an IP address.

    Raises:
        LocalProtocolError: an invalid host name or port.
    """

    host: str
    port: int = SMTP_PORT
    mx: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise LocalProtocolError(f"bad port {self.port!r}")
        ip = parse_ip(self.host)
        if ip is not None:
            object.__setattr__(self, "host", str(ip))
            return
        try:
            host = normalize_domain(self.host)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
        if not host or not is_valid_domain(host, utf8=False):
            raise LocalProtocolError(f"bad next-hop host {self.host!r}")
        object.__setattr__(self, "host", host)

    @property
    def address(self) -> IPAddress | None:
        """The host as an IP address, or None when it is a name."""
        return parse_ip(self.host)

    @classmethod
    def parse(cls, text: str) -> NextHop:
        """Parse Postfix-style ``host``, ``host:port``, ``[host]``, ``[host]:port`` or
        ``[IPv6:addr]:port``: brackets mean "no MX lookup".

        Raises:
            LocalProtocolError: malformed text.
        """
        t = text.strip()
        port = SMTP_PORT
        if t.startswith("["):
            close = t.find("]")
            if close < 0:
                raise LocalProtocolError(f"bad next hop {text!r}")
            host, rest, mx = t[1:close], t[close + 1 :], False
            if host[:5].lower() == "ipv6:":
                host = host[5:]
        else:
            host, _, port_text = t.partition(":")
            rest, mx = (":" + port_text) if port_text else "", True
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise LocalProtocolError(f"bad next hop {text!r}")
            port = int(rest[1:])
        return cls(host=host, port=port, mx=mx)

    def __str__(self) -> str:
        host = self.host if self.mx and self.address is None else f"[{self.host}]"
        return host if self.port == SMTP_PORT else f"{host}:{self.port}"


def _transport_key(key: str) -> str:
    if key == "*":
        return key
    if key.startswith("."):
        return "." + normalize_domain(key[1:])
    return normalize_domain(key)


def _ip_set(values: Iterable[IPAddress]) -> frozenset[IPAddress]:
    return frozenset(values)


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingConfig:
    """Routing tables and preferences.  Frozen; domains are normalised on construction.

    Attributes:
        hostname: this server's own name (an MX pointing at it is "us", RFC 5321 5.1).
        local_domains: domains delivered here (handed to the local delivery callback).
        local_names: other names by which this server is known (also "us").
        local_addresses: this server's addresses; an MX host resolving to one is "us".
        transport: a transport map, domain -> NextHop, overriding MX routing.  Keys are a
            domain (exact match), ``".example.com"`` (any subdomain of example.com) or ``"*"``
            (every domain not matched otherwise); the most specific key wins.
        address_preference: address family order for each host.
        smtp_port: the port for MX-routed delivery (25; tests use another).
        max_mx_hosts: MX hosts looked up at most (bounds DNS work for a hostile domain).
        max_targets: connection targets (host, address) in a route at most.
        best_mx_is_local: when this server is the best MX for a domain that is not in
            ``local_domains``, deliver locally instead of failing with "loops back to myself".

    Raises:
        LocalProtocolError: invalid domains, keys or limits.
    """

    hostname: str = "localhost"
    local_domains: frozenset[str] = frozenset()
    local_names: frozenset[str] = frozenset()
    local_addresses: frozenset[IPAddress] = frozenset()
    transport: Mapping[str, NextHop] = field(default_factory=lambda: MappingProxyType({}))
    address_preference: AddressPreference = AddressPreference.PREFER_IPV6
    smtp_port: int = SMTP_PORT
    max_mx_hosts: int = 10
    max_targets: int = 20
    best_mx_is_local: bool = False

    def __post_init__(self) -> None:
        try:
            norm = {normalize_domain(d) for d in self.local_domains}
            names = {normalize_domain(n) for n in (self.hostname, *self.local_names)}
            transport = {_transport_key(k): v for k, v in self.transport.items()}
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
        if self.max_mx_hosts < 1 or self.max_targets < 1:
            raise LocalProtocolError("max_mx_hosts and max_targets must be at least 1")
        if not 0 < self.smtp_port < 65536:
            raise LocalProtocolError(f"bad port {self.smtp_port!r}")
        object.__setattr__(self, "local_domains", frozenset(norm))
        object.__setattr__(self, "local_names", frozenset(names))
        object.__setattr__(self, "local_addresses", _ip_set(self.local_addresses))
        object.__setattr__(self, "transport", MappingProxyType(transport))

    def is_local_domain(self, domain: str) -> bool:
        """True if mail for ``domain`` is delivered here (a local domain, or an address
        literal naming one of our addresses)."""
        ip = parse_ip(domain) if domain.startswith("[") else None
        if ip is not None:
            return ip in self.local_addresses
        try:
            return normalize_domain(domain) in self.local_domains
        except ValueError:
            return False

    def is_self(self, name: str) -> bool:
        """True if ``name`` (a host name or an address) is this server."""
        ip = parse_ip(name)
        if ip is not None:
            return ip in self.local_addresses
        try:
            return normalize_domain(name) in self.local_names
        except ValueError:
            return False

    def transport_for(self, domain: str) -> tuple[str, NextHop] | None:
        """The transport-map entry for ``domain`` as (matching key, next hop), or None."""
        if domain in self.transport:
            return domain, self.transport[domain]
        labels = domain.split(".")
        for i in range(1, len(labels)):
            key = "." + ".".join(labels[i:])
            if key in self.transport:
                return key, self.transport[key]
        if "*" in self.transport:
            return "*", self.transport["*"]
        return None


# --- destinations: recipients grouped by where they go ----------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    """A group of recipients that share one delivery path.

    Attributes:
        local: delivered here (no SMTP); ``domain`` says which local domain.
        domain: the recipient domain (for a relay group, the first domain seen).
        nexthop: where to send (None when local).
        recipients: the recipient addresses, in envelope order, each once.
        reason: one line saying why this path was chosen.
    """

    local: bool
    domain: str
    nexthop: NextHop | None
    recipients: tuple[str, ...]
    reason: str


def _classify(recipient: str, config: RoutingConfig) -> tuple[str, str, NextHop | None, str]:
    """One recipient -> (kind, domain, next hop, reason); kind is local, remote or invalid."""
    if "@" not in recipient:  # RFC 5321 4.5.1: <Postmaster> without a domain is always local
        return "local", normalize_domain(config.hostname), None, "domain-less postmaster"
    _, raw = split_mailbox(recipient)
    if config.is_local_domain(raw):
        domain = raw.lower() if raw.startswith("[") else normalize_domain(raw)
        return "local", domain, None, f"{domain} is a local domain"
    literal = parse_ip(raw) if raw.startswith("[") else None
    if literal is not None:
        relay = config.transport.get("*")
        if relay is not None:
            return "remote", raw, relay, f"address literal {raw} via '*' -> {relay}"
        hop = NextHop(host=str(literal), port=config.smtp_port, mx=False)
        return "remote", raw, hop, f"address literal {raw}: connect to {hop}"
    try:
        domain = normalize_domain(raw)
    except ValueError:
        domain = raw.lower()
    entry = config.transport_for(domain)
    if entry is not None:
        key, hop = entry
        return "remote", domain, hop, f"{domain}: transport map entry {key!r} -> {hop}"
    if not domain or not is_valid_domain(domain, utf8=False):
        # Not routable; the lookup machine fails it with 5.1.2 without asking DNS.
        return "invalid", domain, None, f"{raw!r} is not a valid domain"
    hop = NextHop(host=domain, port=config.smtp_port, mx=True)
    return "remote", domain, hop, f"{domain} routed by MX"


_MAX_REASONS = 5


def group_recipients(recipients: Iterable[str], config: RoutingConfig) -> tuple[Destination, ...]:
    """Group envelope recipients by delivery path.

    Local domains become one local Destination each.  Remote recipients are grouped by next
    hop: all recipients of one MX-routed domain together, and all recipients whose domains a
    transport-map entry sends to the same relay together (one SMTP transaction carries them).
    A recipient whose domain is not a valid domain gets a Destination without a next hop
    (its lookup fails with 5.1.2 at once).  Exact duplicate addresses are kept once.

    Args:
        recipients: the envelope's forward-paths, as accepted by RCPT TO.
        config: the routing tables.

    Returns:
        The destinations, in the order their first recipient appears.
    """
    Group = tuple[str, str, NextHop | None, list[str], dict[str, None]]
    groups: dict[tuple[str, object], Group] = {}
    seen: set[str] = set()
    for rcpt in recipients:
        if rcpt in seen:
            continue
        seen.add(rcpt)
        kind, domain, hop, reason = _classify(rcpt, config)
        group_key: tuple[str, object] = (kind, hop if kind == "remote" else domain)
        group = groups.setdefault(group_key, (kind, domain, hop, [], {}))
        group[3].append(rcpt)
        group[4][reason] = None
    out = []
    for kind, domain, hop, rcpts, reason_set in groups.values():
        reasons = list(reason_set)
        why = "; ".join(reasons[:_MAX_REASONS])
        if len(reasons) > _MAX_REASONS:
            why += f"; and {len(reasons) - _MAX_REASONS} more"
        out.append(
            Destination(
                local=kind == "local",
                domain=domain,
                nexthop=hop,
                recipients=tuple(rcpts),
                reason=why,
            )
        )
    return tuple(out)


# --- routes --------------------------------------------------------------------------------


class RouteKind(enum.Enum):
    """What to do with a destination's recipients."""

    LOCAL = "local"  #: deliver here (the local delivery callback)
    REMOTE = "remote"  #: connect to the targets in order (see DeliveryWalk)
    FAILED = "failed"  #: permanent failure: bounce every recipient with ``reply``
    DEFERRED = "deferred"  #: temporary failure: keep queued, retry later


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One place to connect to: a host name (for TLS and traces), an address and a port.

    Attributes:
        host: the MX or relay host name (the address itself for literals).
        address: the IP address to connect to.
        port: the TCP port.
        preference: the MX preference, or None when the next hop was not MX-routed.
    """

    host: str
    address: IPAddress
    port: int = SMTP_PORT
    preference: int | None = None

    def __str__(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """The routing decision for one Destination.

    Attributes:
        kind: LOCAL, REMOTE, FAILED or DEFERRED.
        nexthop: the domain or relay host the decision is about.
        recipients: the destination's recipients.
        targets: for REMOTE, the connection targets in the order to try them.
        reply: for FAILED/DEFERRED, the reply to record for every recipient (its enhanced
            code goes into the DSN).
        trace: lines explaining each decision (see :func:`explain`).
    """

    kind: RouteKind
    nexthop: str
    recipients: tuple[str, ...] = ()
    targets: tuple[Target, ...] = ()
    reply: Reply | None = None
    trace: tuple[str, ...] = ()


def explain(route: Route) -> list[str]:
    """Return a readable account of a route: the decision, then why each host was chosen or
    skipped, then the targets in order.

    Args:
        route: a route from the lookup machine (or finish_route / plan_mx).

    Returns:
        Text lines, without line endings.
    """
    head = f"route for {route.nexthop}: {route.kind.value}"
    if route.reply is not None:
        head += f" ({route.reply.code} {route.reply.text})"
    lines = [head, *(f"  {line}" for line in route.trace)]
    for i, target in enumerate(route.targets, 1):
        pref = "" if target.preference is None else f" (preference {target.preference})"
        lines.append(f"  try {i}: {target}{pref}")
    return lines


def _reply(code: int, text: str) -> Reply:
    return Reply(code=code, text=text)


def nxdomain_reply(name: str) -> Reply:
    """550 5.1.2: the destination domain does not exist (RFC 3463 X.1.2)."""
    return _reply(550, f"5.1.2 Domain {name} does not exist (NXDOMAIN)")


def dns_failure_reply(name: str, rdtype: str, status: DnsStatus) -> Reply:
    """451 4.4.3: DNS lookup failed temporarily (RFC 3463 X.4.3, routing server failure)."""
    what = "timed out" if status is DnsStatus.TIMEOUT else "failed (SERVFAIL)"
    return _reply(451, f"4.4.3 DNS lookup of {name}/{rdtype} {what}")


def shuffle_key(seed: int, salt: str, item: str) -> bytes:
    """A deterministic pseudo-random sort key for ``item``: BLAKE2b of (seed, salt, item)."""
    data = f"{seed}\x00{salt}\x00{item}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=8).digest()


def order_mx(records: Iterable[MXRecord], *, seed: int, domain: str = "") -> tuple[MXRecord, ...]:
    """Order MX records for delivery (RFC 5321 5.1).

    "Multiple MX records contain a preference indication that MUST be used in sorting ...
    If there are multiple destinations with the same preference and there is no clear reason
    to favor one ... the sender-SMTP MUST randomize them to spread the load across multiple
    mail exchangers for a specific organization."  Ties are ordered by a keyed hash of
    ``seed`` (see shuffle_key): a permutation, the same for the same seed.  A host listed
    twice is kept once, at its most preferred (lowest) preference.

    Args:
        records: the MX records (null-MX records are passed through like any other).
        seed: the shuffle seed (draw one per delivery attempt outside the pure core).
        domain: salt, so that two domains sharing MX hosts are not shuffled alike.

    Returns:
        The records, ascending by preference, each exchange once.
    """
    best: dict[str, MXRecord] = {}
    for rec in records:
        old = best.get(rec.exchange)
        if old is None or rec.preference < old.preference:
            best[rec.exchange] = rec
    return tuple(
        sorted(
            best.values(),
            key=lambda r: (r.preference, shuffle_key(seed, domain, r.exchange), r.exchange),
        )
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class MXPlan:
    """The MX hosts still worth resolving after the MX answer was read.

    Attributes:
        hosts: (preference, host name) in delivery order; preference None for a relay host.
        implicit: True when the domain had no MX records (RFC 5321 5.1 implicit MX).
        trace: what was decided so far.
    """

    hosts: tuple[tuple[int | None, str], ...]
    implicit: bool = False
    trace: tuple[str, ...] = ()


def _self_route(
    domain: str, config: RoutingConfig, recipients: tuple[str, ...], trace: list[str]
) -> Route:
    if config.best_mx_is_local:
        trace.append("this server is the best MX: delivering locally (best_mx_is_local)")
        return Route(
            kind=RouteKind.LOCAL, nexthop=domain, recipients=recipients, trace=tuple(trace)
        )
    # RFC 5321 5.1: "If there are no records left at that point, it is an error condition,
    # and the message MUST be returned as undeliverable."
    trace.append("no MX host is more preferred than this server: mail loops back to myself")
    return Route(
        kind=RouteKind.FAILED,
        nexthop=domain,
        recipients=recipients,
        reply=_reply(554, f"5.4.6 Mail for {domain} loops back to myself"),
        trace=tuple(trace),
    )


def plan_mx(
    domain: str,
    answer: DnsAnswer,
    *,
    config: RoutingConfig,
    seed: int,
    recipients: tuple[str, ...] = (),
) -> MXPlan | Route:
    """Read the MX answer for ``domain``: either the hosts to resolve next, or a final Route.

    Rules, in order:
      * NXDOMAIN -> FAILED 550 5.1.2; SERVFAIL/TIMEOUT -> DEFERRED 451 4.4.3.
      * No MX records (NODATA) -> implicit MX: RFC 5321 5.1 "If an empty list of MXs is
        returned, the address is treated as if it was associated with an implicit MX RR,
        with a preference of 0, pointing to that host."
      * Null MX -> FAILED 556 5.1.10 at once, no connection: the record says the domain
        accepts no mail, so delivery "fails immediately" (RFC 7505 1); 556 is RFC 7504's
        "domain does not accept mail" and X.1.10 RFC 7505's "recipient address has null MX".
        Root-exchange records mixed with real ones violate RFC 7505 3 ("MUST NOT advertise
        any other MX RR"); the real ones are used and the null ones skipped.
      * Hosts sorted (see order_mx); a host that is this server, by name, and every host at
        its preference or worse are dropped (RFC 5321 5.1); if none is left, this server is
        the best MX (see RoutingConfig.best_mx_is_local).
      * At most ``config.max_mx_hosts`` hosts are kept.

    Args:
        domain: the (normalised) domain.
        answer: the MX answer.
        config: routing configuration.
        seed: the equal-preference shuffle seed.
        recipients: copied into a final Route.

    Returns:
        An MXPlan, or a final Route.
    """
    trace: list[str] = []
    if answer.status is DnsStatus.NXDOMAIN:
        trace.append(f"MX lookup of {domain}: NXDOMAIN, the domain does not exist")
        return Route(
            kind=RouteKind.FAILED,
            nexthop=domain,
            recipients=recipients,
            reply=nxdomain_reply(domain),
            trace=tuple(trace),
        )
    if answer.status.is_temporary:
        trace.append(f"MX lookup of {domain}: {answer.status.value}, will retry later")
        return Route(
            kind=RouteKind.DEFERRED,
            nexthop=domain,
            recipients=recipients,
            reply=dns_failure_reply(domain, "MX", answer.status),
            trace=tuple(trace),
        )
    records: list[MXRecord] = []
    for text in answer.records:
        try:
            records.append(parse_mx(text))
        except ValueError:
            trace.append(f"ignored malformed MX record {text!r}")
    if not records:
        trace.append(f"{domain} has no MX records: implicit MX, preference 0 (RFC 5321 5.1)")
        return MXPlan(hosts=((0, domain),), implicit=True, trace=tuple(trace))
    real = [r for r in records if not r.is_null]
    if not real:
        trace.append(f"{domain} publishes a null MX: it accepts no mail (RFC 7505)")
        return Route(
            kind=RouteKind.FAILED,
            nexthop=domain,
            recipients=recipients,
            reply=_reply(556, f"5.1.10 Recipient domain {domain} has a null MX (RFC 7505)"),
            trace=tuple(trace),
        )
    if len(real) < len(records):
        trace.append("ignored null MX records published beside real ones (RFC 7505 3)")
    ordered = order_mx(real, seed=seed, domain=domain)
    cutoff = min((r.preference for r in ordered if config.is_self(r.exchange)), default=None)
    if cutoff is not None:
        # RFC 5321 5.1: "If a matching record is found, all records at that preference level
        # and higher-numbered ones MUST be discarded from consideration."
        for r in ordered:
            if r.preference >= cutoff:
                why = "is this server" if config.is_self(r.exchange) else "is not better than us"
                trace.append(f"skip MX {r.exchange} (preference {r.preference}): {why}")
        ordered = tuple(r for r in ordered if r.preference < cutoff)
        if not ordered:
            return _self_route(domain, config, recipients, trace)
    for r in ordered[config.max_mx_hosts :]:
        trace.append(f"skip MX {r.exchange} (preference {r.preference}): over max_mx_hosts")
    ordered = ordered[: config.max_mx_hosts]
    for r in ordered:
        trace.append(f"MX {r.exchange} preference {r.preference}")
    return MXPlan(hosts=tuple((r.preference, r.exchange) for r in ordered), trace=tuple(trace))


def _order_addresses(addresses: list[IPAddress], seed: int, host: str) -> list[IPAddress]:
    return sorted(addresses, key=lambda a: (shuffle_key(seed, host, str(a)), str(a)))


def finish_route(
    nexthop: str,
    plan: MXPlan,
    answers: Mapping[tuple[str, str], DnsAnswer],
    *,
    config: RoutingConfig,
    seed: int,
    port: int,
    recipients: tuple[str, ...] = (),
) -> Route:
    """Turn the resolved hosts of a plan into a Route.

    For each host, its addresses are taken from ``answers[(host, "AAAA")]`` and
    ``answers[(host, "A")]`` in the configured family order (addresses of one family are
    shuffled by ``seed``, as resolvers no longer rotate them reliably).  A host with an address
    of this server is "us": it and every host at its preference or worse are dropped (RFC 5321
    5.1, "names or addresses by which it might be known").  Hosts without addresses are
    skipped.  An address already listed for a better host is not repeated.

    Args:
        nexthop: the domain or relay host being routed.
        plan: from plan_mx (or a single relay host).
        answers: the A/AAAA answers by (host, rdtype); missing ones count as TIMEOUT.
        config: routing configuration.
        seed: shuffle seed.
        port: the port of every target.
        recipients: copied into the Route.

    Returns:
        REMOTE with targets; FAILED 550 5.4.4 when no host has an address and every lookup
        failed permanently; DEFERRED 451 4.4.3 when some lookup failed temporarily; or the
        self-MX outcome.
    """
    trace = list(plan.trace)
    families = config.address_preference.rdtypes
    resolved: list[tuple[int | None, str, list[IPAddress]]] = []
    temporary: list[tuple[str, str, DnsStatus]] = []
    for pref, host in plan.hosts:
        addrs: list[IPAddress] = []
        notes: list[str] = []
        literal = parse_ip(host)
        if literal is not None:
            addrs.append(literal)
        for rdtype in families if literal is None else ():
            answer = answers.get((host, rdtype), DnsAnswer(status=DnsStatus.TIMEOUT))
            if answer.status is DnsStatus.OK:
                family: list[IPAddress] = []
                for text in answer.records:
                    ip = parse_ip(text)
                    want = 6 if rdtype == "AAAA" else 4
                    if ip is None or ip.version != want:
                        notes.append(f"ignored bad {rdtype} record {text!r}")
                    else:
                        family.append(ip)
                addrs.extend(_order_addresses(family, seed, host))
            else:
                notes.append(f"{rdtype} {answer.status.value}")
                if answer.status.is_temporary:
                    temporary.append((host, rdtype, answer.status))
        resolved.append((pref, host, addrs))
        label = host if pref is None else f"{host} (preference {pref})"
        if notes:
            trace.append(f"{label}: " + ", ".join(notes))
    self_prefs = [
        (pref or 0)
        for pref, host, addrs in resolved
        if config.is_self(host) or any(a in config.local_addresses for a in addrs)
    ]
    if self_prefs:
        cutoff = min(self_prefs)
        for pref, host, addrs in resolved:
            if (pref or 0) >= cutoff:
                mine = [str(a) for a in addrs if a in config.local_addresses]
                why = (
                    f"resolves to this server ({', '.join(mine)})"
                    if mine
                    else "is this server"
                    if config.is_self(host)
                    else "not better"
                )
                trace.append(f"skip {host}: {why}")
        resolved = [r for r in resolved if (r[0] or 0) < cutoff]
        if not resolved:
            return _self_route(nexthop, config, recipients, trace)
    targets: list[Target] = []
    seen: set[IPAddress] = set()
    for pref, host, addrs in resolved:
        fresh = [a for a in addrs if a not in seen]
        if not addrs:
            trace.append(f"skip {host}: no usable address")
            continue
        if not fresh:
            trace.append(f"skip {host}: its addresses are already listed")
            continue
        trace.append(f"use {host}: " + ", ".join(str(a) for a in fresh))
        for a in fresh:
            seen.add(a)
            targets.append(Target(host=host, address=a, port=port, preference=pref))
    if len(targets) > config.max_targets:
        trace.append(f"kept the first {config.max_targets} of {len(targets)} addresses")
        targets = targets[: config.max_targets]
    if targets:
        return Route(
            kind=RouteKind.REMOTE,
            nexthop=nexthop,
            recipients=recipients,
            targets=tuple(targets),
            trace=tuple(trace),
        )
    if temporary:
        host, rdtype, status = temporary[0]
        return Route(
            kind=RouteKind.DEFERRED,
            nexthop=nexthop,
            recipients=recipients,
            reply=dns_failure_reply(host, rdtype, status),
            trace=tuple(trace),
        )
    what = "the domain" if plan.implicit else "no mail host"
    return Route(
        kind=RouteKind.FAILED,
        nexthop=nexthop,
        recipients=recipients,
        reply=_reply(550, f"5.4.4 Unable to route: {what} of {nexthop} has an address"),
        trace=tuple(trace),
    )


# --- one delivery attempt: walking the targets --------------------------------------------------


class Stage(enum.Enum):
    """Where in an SMTP session a session-ending reply came."""

    GREETING = "greeting"
    HELLO = "hello"  #: EHLO, or HELO after EHLO failed
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL = "mail"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectFailed:
    """The connection to the current target could not be made (refused, unreachable, timed
    out, TLS handshake failed)."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionLost:
    """The connection broke (or timed out) after it was made, before every accepted
    recipient had its final reply."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionReply:
    """A non-2xx reply that ends the session before any RCPT: to the greeting, EHLO/HELO,
    STARTTLS, AUTH or MAIL FROM."""

    stage: Stage
    reply: Reply


@dataclass(frozen=True, slots=True, kw_only=True)
class RecipientReply:
    """The reply to ``RCPT TO:<recipient>``."""

    recipient: str
    reply: Reply


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageReply:
    """A reply about the message: to DATA (when not 354) or at the end of the data, for every
    accepted recipient; or, with ``recipient`` set, LMTP's per-recipient final reply."""

    reply: Reply
    recipient: str | None = None


AttemptOutcome: TypeAlias = (
    ConnectFailed | ConnectionLost | SessionReply | RecipientReply | MessageReply
)
"""What the caller feeds a DeliveryWalk."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WalkResult:
    """The outcome of one delivery attempt for one recipient (what DeliveryWalk.results holds).

    Attributes:
        recipient: the address.
        status: delivered, failed or deferred.
        reply: the reply that decided it (real or synthesised, e.g. 451 4.4.1).
        target: the target that gave the reply, or None when none did.
    """

    recipient: str
    status: RecipientStatus
    reply: Reply
    target: Target | None = None


class _Rcpt(enum.Enum):
    OPEN = "open"  # needs a host
    ACCEPTED = "accepted"  # 2xx to RCPT in the current session, message reply pending


class DeliveryWalk:
    """One delivery attempt over a route's targets, fed the outcomes one by one.

    The rules (RFC 5321 5.1: the client "MUST be able to try (and retry) each of the relevant
    addresses in this list in order, until a delivery attempt succeeds"):

    * Connection refused or timed out, a broken connection, a 4xx (or any 421) at the
      greeting, EHLO, STARTTLS, AUTH or MAIL: the next target gets the recipients that are
      not final yet.
    * A 5xx at the greeting/EHLO/STARTTLS/AUTH also moves on (the next MX may work); only when
      every target was tried and all of them refused that way do the recipients fail.
    * A 5xx to MAIL FROM is final for every open recipient (the sender was refused).
    * A per-recipient 5xx (RCPT or LMTP final reply) is final for that recipient; a
      per-recipient 4xx keeps it queued (DEFERRED), it is not retried on a backup host.
    * A reply to the message applies to every accepted recipient (2xx delivered, 4xx
      deferred, 5xx failed).
    * When targets run out, open recipients are DEFERRED with the last transient reason.

    Usage::

        walk = DeliveryWalk(route)
        while (target := walk.next_target()) is not None:
            ...connect, and feed every outcome: walk.feed(RecipientReply(...)) ...
        results = walk.results()

    Args:
        route: the route; FAILED/DEFERRED routes finish at once with the route's reply.
        max_connections: try at most this many targets in this attempt (None: all); RFC
            5321 5.1 allows "a configurable limit on the number of alternate addresses".

    Raises:
        LocalProtocolError: a LOCAL route (nothing to connect to).
    """

    def __init__(self, route: Route, *, max_connections: int | None = None) -> None:
        if route.kind is RouteKind.LOCAL:
            raise LocalProtocolError("a local route has no targets to walk")
        self._targets = route.targets
        self._limit = len(route.targets) if max_connections is None else max_connections
        self._index = -1
        self._current: Target | None = None
        self._in_session = False
        self._open: dict[str, _Rcpt] = dict.fromkeys(route.recipients, _Rcpt.OPEN)
        self._final: dict[str, WalkResult] = {}
        self._last: Reply = _reply(451, "4.4.0 No route to deliver over")
        self._transient = False
        self._finished = False
        self.trace: list[str] = []
        if route.kind is not RouteKind.REMOTE:
            assert route.reply is not None
            status = (
                RecipientStatus.FAILED
                if route.kind is RouteKind.FAILED
                else (RecipientStatus.DEFERRED)
            )
            for rcpt in list(self._open):
                self._settle(rcpt, status, route.reply)
            self.trace.append(f"route {route.kind.value}: {route.reply.text}")
            self._finished = True

    # -- queries -------------------------------------------------------------------------------

    @property
    def is_finished(self) -> bool:
        """True once every recipient has its result for this attempt."""
        return self._finished

    @property
    def current(self) -> Target | None:
        """The target of the session in progress, or None."""
        return self._current if self._in_session else None

    @property
    def pending(self) -> tuple[str, ...]:
        """The recipients without a final result yet (to send in the current session)."""
        return tuple(self._open)

    @property
    def accepted(self) -> tuple[str, ...]:
        """The recipients accepted (2xx to RCPT) in the current session, awaiting the message
        reply."""
        return tuple(r for r, state in self._open.items() if state is _Rcpt.ACCEPTED)

    def results(self) -> dict[str, WalkResult]:
        """The result for each recipient that has one (all of them once finished)."""
        return dict(self._final)

    # -- driving -------------------------------------------------------------------------------

    def next_target(self) -> Target | None:
        """End the finished session and return the next target, or None when the attempt is
        over (every recipient then has a result).

        Called while a session is still open with recipients that were never offered in it
        (a per-session recipient limit), it returns the same target again for them.

        Raises:
            LocalProtocolError: accepted recipients still await the message reply.
        """
        if self._finished:
            return None
        if self._in_session:
            if self.accepted:
                raise LocalProtocolError(
                    f"the session with {self._current} owes a message reply for "
                    f"{len(self.accepted)} accepted recipient(s)"
                )
            # Recipients still open were never offered in this session (the caller hit a
            # per-session recipient limit): the same target gets them in a new session.
            self.trace.append(f"reconnect to {self._current} for {len(self._open)} recipient(s)")
            return self._current
        self._index += 1
        if self._index >= min(self._limit, len(self._targets)):
            exhausted = self._index >= len(self._targets) and len(self._targets) > 0
            permanent = exhausted and not self._transient and self._last.is_permanent
            status = RecipientStatus.FAILED if permanent else RecipientStatus.DEFERRED
            count = len(self._open)
            self.trace.append(f"no more targets: {count} open recipient(s) {status.value}")
            for rcpt in list(self._open):
                self._settle(rcpt, status, self._last)
            self._finished = True
            return None
        self._current = self._targets[self._index]
        self._in_session = True
        self.trace.append(f"connect to {self._current} for {len(self._open)} recipient(s)")
        return self._current

    def feed(self, outcome: AttemptOutcome) -> None:
        """Record what happened in the current session.

        Args:
            outcome: one connection event or reply.

        Raises:
            LocalProtocolError: no session in progress, a 2xx/3xx SessionReply, or a
                recipient that is not open in this session.
        """
        if not self._in_session:
            raise LocalProtocolError("no session in progress: call next_target() first")
        target = self._current
        if isinstance(outcome, ConnectFailed):
            self._move_on(_reply(451, f"4.4.1 No answer from {target}: {outcome.reason}"))
        elif isinstance(outcome, ConnectionLost):
            self._move_on(_reply(451, f"4.4.2 Connection to {target} lost: {outcome.reason}"))
        elif isinstance(outcome, SessionReply):
            self._session_reply(outcome)
        elif isinstance(outcome, RecipientReply):
            self._recipient_reply(outcome)
        else:
            self._message_reply(outcome)

    # -- internals -----------------------------------------------------------------------------

    def _settle(self, rcpt: str, status: RecipientStatus, reply: Reply) -> None:
        del self._open[rcpt]
        target = self._current if self._in_session else None
        self._final[rcpt] = WalkResult(recipient=rcpt, status=status, reply=reply, target=target)

    def _end_session(self) -> None:
        self._in_session = False
        if not self._open:
            self._finished = True

    def _move_on(self, reply: Reply, *, transient: bool = True) -> None:
        self._last = reply
        self._transient = self._transient or transient
        for rcpt in self._open:
            self._open[rcpt] = _Rcpt.OPEN
        self.trace.append(f"{self._current}: {reply.code} {reply.text}; next target")
        self._end_session()

    def _session_reply(self, outcome: SessionReply) -> None:
        reply = outcome.reply
        if reply.code < 400:
            raise LocalProtocolError(f"a {reply.code} does not end a session")
        if reply.is_transient:
            self._move_on(reply)
        elif outcome.stage is Stage.MAIL:
            self.trace.append(f"{self._current}: sender refused: {reply.code} {reply.text}")
            for rcpt in list(self._open):
                self._settle(rcpt, RecipientStatus.FAILED, reply)
            self._end_session()
        else:
            self._move_on(reply, transient=False)

    def _check_open(self, rcpt: str, state: _Rcpt | None) -> None:
        if rcpt not in self._open or (state is not None and self._open[rcpt] is not state):
            raise LocalProtocolError(f"{rcpt!r} is not awaiting that reply in this session")

    def _recipient_reply(self, outcome: RecipientReply) -> None:
        rcpt, reply = outcome.recipient, outcome.reply
        self._check_open(rcpt, _Rcpt.OPEN)
        if reply.code == 421:
            self._move_on(reply)
            return
        if reply.is_positive:
            self._open[rcpt] = _Rcpt.ACCEPTED
        elif reply.is_transient:
            self._settle(rcpt, RecipientStatus.DEFERRED, reply)
        elif reply.is_permanent:
            self._settle(rcpt, RecipientStatus.FAILED, reply)
        else:
            raise LocalProtocolError(f"a {reply.code} is not an answer to RCPT")
        if not self._open:
            self._end_session()  # every recipient refused or deferred: no DATA, session over

    def _message_reply(self, outcome: MessageReply) -> None:
        reply = outcome.reply
        if outcome.recipient is None:
            rcpts = [r for r, s in self._open.items() if s is _Rcpt.ACCEPTED]
            if not rcpts:
                raise LocalProtocolError("no recipient was accepted in this session")
        else:
            self._check_open(outcome.recipient, _Rcpt.ACCEPTED)
            rcpts = [outcome.recipient]
        if reply.code == 421:
            self._move_on(reply)
            return
        if reply.is_intermediate:
            raise LocalProtocolError(f"a {reply.code} is not a final message reply")
        status = (
            RecipientStatus.DELIVERED
            if reply.is_positive
            else RecipientStatus.DEFERRED
            if reply.is_transient
            else RecipientStatus.FAILED
        )
        for rcpt in rcpts:
            self._settle(rcpt, status, reply)
        if not self._open:
            self._end_session()

# Server-side policy: who may relay, and how much a sender may send.
#
# Relay policy.  An MTA that accepts mail for any destination from anyone is an open relay, the
# spammers' favourite tool.  RFC 5321 leaves relaying to local policy (3.6), and BCP 30 (RFC
# 2505, anti-spam recommendations for MTAs) asks for unauthorised relaying to be refused.  The
# standard answer: accept a recipient if its domain is ours (or one we relay for, e.g. as
# backup MX), or if the *client* is trusted (its address is in a configured network) or
# authenticated (RFC 4954 / RFC 6409 submission).  Everything else is refused.  The default
# RelayPolicy trusts no network and no one: no open relay by default.
#
# The refusal is 554 5.7.1 "Relay access denied" by default: 5.7.1 is RFC 3463's "Delivery not
# authorized, message refused", and 554 is what Postfix (the most deployed MTA) answers, so it
# is what operators and log parsers recognise.  RFC 5321 4.2.2 lists 550 as the code for a
# command "rejected for policy reasons", which sendmail uses; both are permanent and clients
# treat them alike, so the code is configurable (``reject_code``).
#
# Only the domain after the last "@" counts.  Percent-hack and bang paths in the local part
# ("user%victim.example@our.domain", "victim!user@our.domain") are the local delivery's
# business: this policy never relays on their say-so.
#
# Sender limits.  Token buckets (capacity C tokens, refilled at R tokens per second, never
# above C): a request costing k tokens is allowed iff the bucket holds at least k, and then k
# are taken.  Over any window of length T a bucket therefore grants at most C + R*T tokens --
# the property the tests check.  Buckets are kept per key: the client address, the
# authenticated user and the envelope sender, each with a message limit (one token per MAIL)
# and a recipient limit (one token per RCPT).  A request is granted only if every applicable
# bucket has enough, and then it is charged to all of them (all or nothing, so a refused
# request costs nothing).
#
# Time is an argument (``now``, in seconds from any fixed origin); a clock that steps back is
# treated as no time passing.  Memory is bounded: buckets live in an LRU order; a bucket that
# has refilled to capacity is indistinguishable from a new one and is dropped for free, and if
# the table still exceeds ``max_buckets`` the least recently used bucket is dropped (which can
# only make the limiter more lenient for that key, never stricter).
#
# Over a limit the reply is 450 4.7.1: RFC 5321 4.2.2 gives 450 for a mailbox "temporarily
# blocked for policy reasons", and 4.7.1 is the policy class of RFC 3463.  Its text says which
# limit was hit and in how many seconds a retry can succeed.
from __future__ import annotations

import enum
import ipaddress
import math
from collections import OrderedDict
from dataclasses import dataclass

from mailwire.protocol._errors import LocalProtocolError
from mailwire.protocol._events import Reply
from mailwire.protocol._routing import IPAddress, normalize_domain, parse_ip

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# --- relay policy ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayPolicy:
    """Which recipients a client may send to.

    Attributes:
        local_domains: domains delivered here; anyone may send to them.
        relay_domains: other domains anyone may send to (this server is their backup MX or
            inbound gateway).
        local_addresses: this server's addresses; ``user@[addr]`` for one is local.
        trusted_networks: clients in these networks may relay anywhere (e.g. the LAN).
        allow_authenticated: authenticated clients may relay anywhere (submission).
        reject_code: the reply code for a refused recipient (554 or 550, see above).

    Raises:
        LocalProtocolError: a bad domain or reject code.
    """

    local_domains: frozenset[str] = frozenset()
    relay_domains: frozenset[str] = frozenset()
    local_addresses: frozenset[IPAddress] = frozenset()
    trusted_networks: tuple[IPNetwork, ...] = ()
    allow_authenticated: bool = True
    reject_code: int = 554

    def __post_init__(self) -> None:
        if self.reject_code not in (550, 554):
            raise LocalProtocolError("reject_code must be 550 or 554")
        try:
            local = frozenset(normalize_domain(d) for d in self.local_domains)
            relay = frozenset(normalize_domain(d) for d in self.relay_domains)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
        object.__setattr__(self, "local_domains", local)
        object.__setattr__(self, "relay_domains", relay)


class RelayVerdict(enum.Enum):
    """Why a recipient was accepted or refused."""

    LOCAL = "local"  #: the recipient's domain is ours
    RELAY_DOMAIN = "relay-domain"  #: a domain we accept for anyone
    TRUSTED_NETWORK = "trusted-network"  #: the client is in a trusted network
    AUTHENTICATED = "authenticated"  #: the client authenticated
    DENIED = "denied"  #: relaying refused


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayDecision:
    """The outcome of check_relay.

    Attributes:
        allowed: True if the recipient may be accepted (as far as relaying goes).
        verdict: the rule that decided.
        reply: the reply to send when refused, else None.
    """

    allowed: bool
    verdict: RelayVerdict
    reply: Reply | None = None


def _client_ip(client: str | IPAddress | None) -> IPAddress | None:
    if client is None or isinstance(client, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return client
    ip = parse_ip(client)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:192.0.2.1 from a dual-stack socket is 192.0.2.1
    return ip


def check_relay(
    policy: RelayPolicy,
    *,
    recipient: str,
    client_address: str | IPAddress | None,
    authenticated_user: str | None = None,
) -> RelayDecision:
    """Decide whether a client may send to ``recipient``.

    Args:
        policy: the relay policy.
        recipient: the RCPT TO address (``"Postmaster"`` without a domain is always local,
            RFC 5321 4.5.1).
        client_address: the client's IP address (None: unknown, never trusted).
        authenticated_user: the SASL identity if the client authenticated, else None.

    Returns:
        A RelayDecision; when refused its reply is ``554 5.7.1 Relay access denied``.
    """
    if "@" not in recipient:
        return RelayDecision(allowed=True, verdict=RelayVerdict.LOCAL)
    raw = recipient.rpartition("@")[2]
    literal = parse_ip(raw) if raw.startswith("[") else None
    if literal is not None:
        if literal in policy.local_addresses:
            return RelayDecision(allowed=True, verdict=RelayVerdict.LOCAL)
        domain = None
    else:
        try:
            domain = normalize_domain(raw)
        except ValueError:
            domain = None
    if domain is not None and domain in policy.local_domains:
        return RelayDecision(allowed=True, verdict=RelayVerdict.LOCAL)
    if domain is not None and domain in policy.relay_domains:
        return RelayDecision(allowed=True, verdict=RelayVerdict.RELAY_DOMAIN)
    ip = _client_ip(client_address)
    if ip is not None and any(ip in net for net in policy.trusted_networks):
        return RelayDecision(allowed=True, verdict=RelayVerdict.TRUSTED_NETWORK)
    if authenticated_user is not None and policy.allow_authenticated:
        return RelayDecision(allowed=True, verdict=RelayVerdict.AUTHENTICATED)
    return RelayDecision(
        allowed=False,
        verdict=RelayVerdict.DENIED,
        reply=Reply(code=policy.reject_code, text="5.7.1 Relay access denied"),
    )


# --- sender limits -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Rate:
    """A token-bucket limit: ``count`` per ``interval`` seconds, bursts up to ``burst``.

    Attributes:
        count: tokens refilled per interval.
        interval: the interval in seconds.
        burst: the bucket capacity (default: ``count``).

    Raises:
        LocalProtocolError: non-positive values.
    """

    count: float
    interval: float = 3600.0
    burst: float | None = None

    def __post_init__(self) -> None:
        if not (self.count > 0 and self.interval > 0) or (
            self.burst is not None and not self.burst > 0
        ):
            raise LocalProtocolError("a rate needs positive count, interval and burst")
        if not all(map(math.isfinite, (self.count, self.interval, self.burst or 1.0))):
            raise LocalProtocolError("a rate must be finite")

    @property
    def capacity(self) -> float:
        """The bucket size."""
        return self.count if self.burst is None else self.burst

    @property
    def per_second(self) -> float:
        """The refill rate in tokens per second."""
        return self.count / self.interval


@dataclass(frozen=True, slots=True, kw_only=True)
class Limit:
    """The limits for one kind of key.

    Attributes:
        messages: messages (MAIL commands granted) allowed, or None for no limit.
        recipients: recipients (RCPT commands granted) allowed, or None for no limit.
    """

    messages: Rate | None = None
    recipients: Rate | None = None


class LimitKey(enum.Enum):
    """What a bucket is keyed by."""

    CLIENT = "client address"
    USER = "user"
    SENDER = "sender"


@dataclass(frozen=True, slots=True, kw_only=True)
class SenderLimits:
    """Rate limits per client address, per authenticated user and per envelope sender.

    Attributes:
        per_client: limits keyed by the client's IP address.
        per_user: limits keyed by the authenticated identity (unauthenticated: not applied).
        per_sender: limits keyed by the envelope sender, lower-cased (the null sender is not
            limited: bounces must flow).
        max_buckets: most buckets kept in memory.
    """

    per_client: Limit = Limit()
    per_user: Limit = Limit()
    per_sender: Limit = Limit()
    max_buckets: int = 100_000

    def __post_init__(self) -> None:
        if self.max_buckets < 1:
            raise LocalProtocolError("max_buckets must be at least 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class RateDecision:
    """The outcome of a rate check.

    Attributes:
        allowed: the request was granted (and charged).
        retry_after: seconds until the same request could be granted (0 when allowed; inf if
            it never could, i.e. it asks for more than a bucket holds).
        limited_by: the key kind that refused, or None.
        reply: ``450 4.7.1 ...`` when refused, else None.
    """

    allowed: bool
    retry_after: float = 0.0
    limited_by: LimitKey | None = None
    reply: Reply | None = None


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class RateLimiter:
    """Token-bucket sender limits with the clock passed in.

    Call ``admit_message`` for each MAIL FROM and ``admit_recipients`` for each RCPT TO (or
    once with a count); a refused request charges nothing.

    Args:
        limits: the configured limits.
    """

    def __init__(self, limits: SenderLimits) -> None:
        self._limits = limits
        self._buckets: OrderedDict[tuple[str, str, str], _Bucket] = OrderedDict()

    def __len__(self) -> int:
        """The number of buckets held (bounded by ``limits.max_buckets``)."""
        return len(self._buckets)

    def admit_message(
        self,
        now: float,
        *,
        client_address: str | IPAddress | None,
        user: str | None = None,
        sender: str | None = None,
    ) -> RateDecision:
        """Check and charge one message against every applicable message limit.

        Args:
            now: the current time in seconds (any fixed origin; monotonic preferred).
            client_address: the client's IP address, or None.
            user: the authenticated identity, or None.
            sender: the envelope sender (``""`` for the null sender), or None.

        Returns:
            A RateDecision; when refused, its reply is ``450 4.7.1`` with the retry time.
        """
        return self._admit(now, "messages", 1.0, client_address, user, sender)

    def admit_recipients(
        self,
        now: float,
        *,
        client_address: str | IPAddress | None,
        user: str | None = None,
        sender: str | None = None,
        count: int = 1,
    ) -> RateDecision:
        """Check and charge ``count`` recipients against every applicable recipient limit.

        Args:
            now: the current time in seconds.
            client_address: the client's IP address, or None.
            user: the authenticated identity, or None.
            sender: the envelope sender, or None.
            count: recipients to charge.

        Returns:
            A RateDecision.

        Raises:
            LocalProtocolError: a negative count.
        """
        if count < 0:
            raise LocalProtocolError("count must not be negative")
        return self._admit(now, "recipients", float(count), client_address, user, sender)

    def prune(self, now: float) -> None:
        """Drop every bucket that has refilled to capacity (they carry no information)."""
        for key in [k for k, b in self._buckets.items() if self._is_full(k, b, now)]:
            del self._buckets[key]

    # -- internals -----------------------------------------------------------------------------

    def _keys(
        self,
        what: str,
        client: str | IPAddress | None,
        user: str | None,
        sender: str | None,
    ) -> list[tuple[tuple[str, str, str], Rate, LimitKey]]:
        out = []
        ip = _client_ip(client) if client is not None else None
        candidates = (
            (LimitKey.CLIENT, self._limits.per_client, None if ip is None else str(ip)),
            (LimitKey.USER, self._limits.per_user, user),
            (LimitKey.SENDER, self._limits.per_sender, sender.lower() if sender else None),
        )
        for kind, limit, name in candidates:
            rate = limit.messages if what == "messages" else limit.recipients
            if rate is not None and name is not None:
                out.append(((kind.value, what, name), rate, kind))
        return out

    def _rate_of(self, key: tuple[str, str, str]) -> Rate:
        limit = {
            LimitKey.CLIENT.value: self._limits.per_client,
            LimitKey.USER.value: self._limits.per_user,
            LimitKey.SENDER.value: self._limits.per_sender,
        }[key[0]]
        rate = limit.messages if key[1] == "messages" else limit.recipients
        assert rate is not None
        return rate

    def _level(self, bucket: _Bucket, rate: Rate, now: float) -> float:
        elapsed = max(0.0, now - bucket.stamp)
        return min(rate.capacity, bucket.tokens + elapsed * rate.per_second)

    def _is_full(self, key: tuple[str, str, str], bucket: _Bucket, now: float) -> bool:
        rate = self._rate_of(key)
        return self._level(bucket, rate, now) >= rate.capacity

    def _admit(
        self,
        now: float,
        what: str,
        cost: float,
        client: str | IPAddress | None,
        user: str | None,
        sender: str | None,
    ) -> RateDecision:
        keys = self._keys(what, client, user, sender)
        levels: list[float] = []
        worst: tuple[float, LimitKey, str] | None = None
        for key, rate, kind in keys:
            bucket = self._buckets.get(key)
            level = rate.capacity if bucket is None else self._level(bucket, rate, now)
            levels.append(level)
            if level < cost:
                wait = (
                    math.inf
                    if cost > rate.capacity
                    else math.ceil((cost - level) / rate.per_second)
                )
                if worst is None or wait > worst[0]:
                    worst = (wait, kind, key[2])
        if worst is not None:
            wait, kind, name = worst
            unit = "Message" if what == "messages" else "Recipient"
            shown = "".join(c if c.isprintable() else "?" for c in name)[:100]
            text = f"4.7.1 {unit} rate limit exceeded for {kind.value} {shown}"
            if math.isinf(wait):
                text += "; the request exceeds the limit itself"
            else:
                seconds = max(1, int(wait))
                text += f"; try again in {seconds} second{'s' if seconds != 1 else ''}"
            return RateDecision(
                allowed=False,
                retry_after=wait,
                limited_by=kind,
                reply=Reply(code=450, text=text),
            )
        for (key, _, _), level in zip(keys, levels, strict=True):
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(level - cost, now)
            else:
                bucket.tokens = level - cost
                bucket.stamp = max(bucket.stamp, now)
                self._buckets.move_to_end(key)
        self._evict(now)
        return RateDecision(allowed=True)

    def _evict(self, now: float) -> None:
        # Full buckets at the cold end go for free; amortised O(1) per request.
        while self._buckets:
            key, bucket = next(iter(self._buckets.items()))
            if not self._is_full(key, bucket, now):
                break
            del self._buckets[key]
        while len(self._buckets) > self._limits.max_buckets:
            self._buckets.popitem(last=False)

"""A tiny authoritative DNS server (UDP and TCP) on loopback, for tests.

It answers from a zone dict, using dnspython's message and rrset classes for the wire format:

    zone = {
        "example.test": {"MX": ["10 mx.example.test."]},
        "mx.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        "alias.example.test": {"CNAME": ["mx.example.test."]},
    }
    with DNSServer(zone) as server:      # binds 127.0.0.1 on a kernel-chosen port
        resolver = make_resolver(nameservers=[(server.host, server.port)])

Semantics, as an authoritative server for every name:
  * a name in the zone with records of the asked type -> NOERROR with them (AA set);
  * a name with a CNAME -> the CNAME, followed inside the zone (as authoritative servers do);
  * a name in the zone (or with descendants in it) without that type -> NOERROR, no answer
    (NODATA), with an SOA in the authority section;
  * anything else -> NXDOMAIN with an SOA;
  * names in ``servfail`` -> SERVFAIL; names in ``drop`` -> no reply at all (client timeout);
  * ``truncate_udp=True`` -> every UDP reply is an empty one with TC set, which forces
    resolvers to retry over TCP (RFC 7766).

``server.log`` records (name, rdtype, "udp"|"tcp") for every query.  The server runs in two
daemon threads and stops (sockets closed, threads joined) on exit from the ``with`` block.
MTA tests can reuse it to point routing at a private DNS.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = Mapping[str, Mapping[str, Sequence[str]]]
TTL = 300
SOA = "ns.test. hostmaster.test. 1 3600 600 86400 60"


def _norm(name: str) -> str:
    return name.rstrip(".").lower()


class DNSServer:
    """An authoritative UDP+TCP DNS server answering from ``zone`` on 127.0.0.1.

    Args:
        zone: name -> rdtype -> records in presentation format.
        servfail: names answered with SERVFAIL.
        drop: names never answered.
        truncate_udp: answer every UDP query with TC set (forces TCP).
        host: the loopback address to bind.
    """

    def __init__(
        self,
        zone: Zone,
        *,
        servfail: Iterable[str] = (),
        drop: Iterable[str] = (),
        truncate_udp: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        self.zone = {
            _norm(k): {t.upper(): list(v) for t, v in rr.items()} for k, rr in zone.items()
        }
        self.servfail = {_norm(n) for n in servfail}
        self.drop = {_norm(n) for n in drop}
        self.truncate_udp = truncate_udp
        self.host = host
        self.port = 0
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> DNSServer:
        """Bind UDP and TCP on the same kernel-chosen port and start serving."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(50):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            break
        else:  # pragma: no cover - 50 collisions in a row
            raise OSError("no port free for both UDP and TCP")
        tcp.listen(16)
        udp.settimeout(0.05)
        tcp.settimeout(0.05)
        self._udp, self._tcp, self.port = udp, tcp, port
        for target in (self._serve_udp, self._serve_tcp):
            thread = threading.Thread(target=target, daemon=True, name=f"dns-{target.__name__}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop serving, join the threads and close the sockets."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def nameserver(self) -> tuple[str, int]:
        """(address, port), as adapters/_dns.py takes nameservers."""
        return (self.host, self.port)

    # -- answering -----------------------------------------------------------------------------

    def _exists(self, name: str) -> bool:
        return name in self.zone or any(k.endswith("." + name) for k in self.zone)

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """Build the reply to one query message (None: send nothing)."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - garbage in, no reply out
            return None
        if not query.question:
            return None
        question = query.question[0]
        qname = _norm(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.log.append((qname, rdtype, transport))
        if qname in self.drop:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        if qname in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        if transport == "udp" and self.truncate_udp:
            response.flags |= dns.flags.TC
            return response.to_wire()
        name, seen = qname, set()
        while name not in seen:
            seen.add(name)
            records = self.zone.get(name, {})
            if rdtype in records:
                response.answer.append(self._rrset(name, rdtype, records[rdtype]))
                break
            if "CNAME" in records and rdtype != "CNAME":
                response.answer.append(self._rrset(name, "CNAME", records["CNAME"]))
                name = _norm(records["CNAME"][0])
                continue
            if not response.answer and not self._exists(name):
                response.set_rcode(dns.rcode.NXDOMAIN)
            break
        if not response.answer or response.rcode() == dns.rcode.NXDOMAIN:
            response.authority.append(self._rrset("test", "SOA", [SOA]))
        return response.to_wire()

    @staticmethod
    def _rrset(name: str, rdtype: str, texts: Sequence[str]) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(
            dns.name.from_text(name + "."), TTL, dns.rdataclass.IN, rdtype, list(texts)
        )

    # -- transports ------------------------------------------------------------------------------

    def _serve_udp(self) -> None:
        assert self._udp is not None
        while not self._stop.is_set():
            try:
                wire, peer = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self.answer(wire, "udp")
            if reply is not None:
                with contextlib.suppress(OSError):
                    self._udp.sendto(reply, peer)

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._tcp_connection, args=(conn,), daemon=True)
            thread.start()

    def _tcp_connection(self, conn: socket.socket) -> None:
        # RFC 1035 4.2.2 / RFC 7766: each message is preceded by a two-octet length.
        conn.settimeout(2.0)
        with conn:
            while not self._stop.is_set():
                header = _recv_exactly(conn, 2)
                if header is None:
                    return
                wire = _recv_exactly(conn, struct.unpack("!H", header)[0])
                if wire is None:
                    return
                reply = self.answer(wire, "tcp")
                if reply is not None:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)


def _recv_exactly(conn: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        try:
            chunk = conn.recv(size - len(data))
        except OSError:
            return None
        if not chunk:
            return None
        data += chunk
    return data

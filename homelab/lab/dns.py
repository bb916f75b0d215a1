"""LabDns: a small authoritative DNS server for the lab twin, answering from data (dnspython, asyncio).

The lab has no route out, so the server never recurses: it answers for the zones of a *view* and
refuses everything else. Each listening address is bound to one view, so one server can give the
home network its internal names (e.g. at 192.168.7.1) and show the outside a public view (e.g. at an
edge address) from the same event loop, next to an aiohttp server::

    views = {
        'internal': View(['int.jigga.xyz'], {'ichigo.int.jigga.xyz': {'A': '192.168.7.223'}}),
        'public': View(['jigga.xyz'], {'jigga.xyz': {'A': '192.0.2.10'}}),
    }
    dns = LabDns(views)
    await dns.start([('192.168.7.1', 53, 'internal'), ('192.0.2.10', 53, 'public')])
    dns.set_records('internal', 'grafana.int.jigga.xyz', 'A', ['192.168.7.230'])
    ...
    await dns.stop()

Behaviour (RFC 1034/1035, 2181, 2308, 6604, 6891, 7766):

- AA=1 for names inside a zone of the listener's view, RA=0 always; REFUSED (AA=0) outside every zone;
- NXDOMAIN with the zone's SOA in the authority section for unknown names; NOERROR/NODATA with the SOA
  for names (including empty non-terminals) that exist without the asked type; the SOA is given the
  negative-caching TTL min(SOA TTL, SOA minimum);
- CNAMEs are followed inside the view (the answer holds the CNAME and the target's records; the rcode
  is the last name's); a CNAME to a name outside the view ends the chain;
- names are case-insensitive; the answer's owner keeps the case of the question;
- EDNS(0) via `dns.message.make_response`; an EDNS version above 0 gets BADVERS;
- UDP answers larger than the client's payload (512 without EDNS, else min(its payload, `udp_payload`))
  lose the additional section, and if still too large all records with TC=1; TCP uses the 2-byte length
  prefix, answers pipelined queries in order and closes idle connections;
- packets that do not parse (or are responses) are dropped on UDP and end the connection on TCP;
- no zone transfers (AXFR/IXFR: REFUSED), no wildcards, no delegations, no DNSSEC, no TSIG.

Threading: the server and its views belong to the event loop they were started on. Change records from
the loop's thread (a coroutine or callback on that loop); from any other thread hand the call to the loop,
e.g. ``loop.call_soon_threadsafe(dns.set_records, 'internal', name, 'A', [address])`` or run a coroutine
doing it with `homelab.lab.serving.Background.run`. Every change replaces whole rdatasets, so a query
always sees a name either before or after a change, never half of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.ANY.NS import NS
from dns.rdtypes.ANY.SOA import SOA

__all__ = ['DEFAULT_TTL', 'Answer', 'LabDns', 'Listener', 'QueryEvent', 'View']

logger = logging.getLogger(__name__)

DEFAULT_TTL = 60
UDP_PAYLOAD = 1232  # the DNS flag day 2020 recommendation; what we advertise and the most we send over UDP
CLASSIC_UDP = 512  # RFC 1035 limit for clients without EDNS
TCP_IDLE = 10.0  # seconds a TCP connection may wait between queries (RFC 7766 suggests "a few seconds")
MAX_CHAIN = 8  # CNAMEs followed in one answer
BIND_ATTEMPTS = 20  # for port 0: UDP picks a free port, TCP may find it taken

IN = dns.rdataclass.IN
RdType = dns.rdatatype.RdataType
Values = str | Iterable[str]
Node = dict[RdType, dns.rdataset.Rdataset]
RecordSpec = Mapping[str, Mapping[str, Values]]


def _name(name: str | dns.name.Name) -> dns.name.Name:
    return name if isinstance(name, dns.name.Name) else dns.name.from_text(name)


def _rdtype(rrtype: str | RdType) -> RdType:
    rdtype = RdType.make(rrtype)
    if dns.rdatatype.is_metatype(rdtype):
        raise ValueError(f'{rdtype.name} is a query type, not a record type')
    return rdtype


@dataclass
class Answer:
    """What a view answers for one question: rcode, AA, and the three record sections."""

    rcode: dns.rcode.Rcode
    authoritative: bool
    answer: list[dns.rrset.RRset] = field(default_factory=list)
    authority: list[dns.rrset.RRset] = field(default_factory=list)
    additional: list[dns.rrset.RRset] = field(default_factory=list)


class View:
    """The zones (apex names) a view is authoritative for and their records: name -> type -> rdataset.

    `records` maps names to {type: value or values}, values in zone-file text (`'192.168.7.223'`,
    `'grafana.int.jigga.xyz'`, `'10 mail.jigga.xyz'`); names are absolute whether or not they end in a dot.
    Every zone gets an SOA and NS records (`nameservers`, default ``ns.<apex>``) unless `records` gives
    its own; the SOA serial goes up by one with every change made through `set` or `remove`.
    """

    def __init__(self, zones: Iterable[str], records: RecordSpec | None = None, *, ttl: int = DEFAULT_TTL,
                 nameservers: Iterable[str] | None = None) -> None:
        if ttl < 0:
            raise ValueError(f'negative TTL {ttl}')
        self.ttl = ttl
        self._zones: dict[dns.name.Name, None] = {}
        self._nodes: dict[dns.name.Name, Node] = {}
        self._serials: dict[dns.name.Name, int] = {}
        for text in zones:
            apex = _name(text)
            if apex in self._zones:
                raise ValueError(f'zone {apex} given twice')
            self._zones[apex] = None
            servers = [str(_name(ns)) for ns in nameservers] if nameservers is not None else [f'ns.{apex}']
            if not servers:
                raise ValueError('a zone needs at least one name server')
            self._put(apex, RdType.SOA, [f'{servers[0]} hostmaster.{apex} 1 3600 600 86400 {ttl}'], ttl)
            self._put(apex, RdType.NS, servers, ttl)
        if not self._zones:
            raise ValueError('a view needs at least one zone')
        for name, types in (records or {}).items():
            for rrtype, values in types.items():
                self._put(_name(name), _rdtype(rrtype), values, ttl)

    # ------------------------------------------------------------------ data

    @property
    def zones(self) -> tuple[str, ...]:
        return tuple(apex.to_text() for apex in self._zones)

    def zone_of(self, name: str | dns.name.Name) -> dns.name.Name | None:
        """The closest enclosing apex of `name` among this view's zones, or None."""
        found: dns.name.Name | None = None
        qname = _name(name)
        for apex in self._zones:
            if qname.is_subdomain(apex) and (found is None or len(apex) > len(found)):
                found = apex
        return found

    def get(self, name: str | dns.name.Name, rrtype: str | RdType) -> list[str]:
        """The values of one record set in text form ([] if there is none)."""
        rdataset = self._nodes.get(_name(name), {}).get(_rdtype(rrtype))
        return [rdata.to_text() for rdata in rdataset] if rdataset is not None else []

    def set(self, name: str | dns.name.Name, rrtype: str | RdType, values: Values, ttl: int | None = None) -> None:
        """Replace the `rrtype` records of `name` (no values: remove them); bumps the zone's serial."""
        owner, rdtype = _name(name), _rdtype(rrtype)
        self._put(owner, rdtype, values, self.ttl if ttl is None else ttl)
        self._bump(owner, rdtype)

    def remove(self, name: str | dns.name.Name, rrtype: str | RdType | None = None) -> None:
        """Remove the records of `name` (all of them, or one type). An apex keeps its SOA and NS."""
        owner = _name(name)
        apex = self._require_zone(owner)
        node = self._nodes.get(owner)
        if node is None:
            return
        if rrtype is not None:
            self._put(owner, _rdtype(rrtype), [], 0)
        elif owner == apex:
            self._nodes[owner] = {t: r for t, r in node.items() if t in (RdType.SOA, RdType.NS)}
        else:
            del self._nodes[owner]
        self._bump(owner, None)

    def _require_zone(self, owner: dns.name.Name) -> dns.name.Name:
        apex = self.zone_of(owner)
        if apex is None:
            raise ValueError(f'{owner} is outside the zones of this view ({", ".join(self.zones)})')
        return apex

    def _put(self, owner: dns.name.Name, rdtype: RdType, values: Values, ttl: int) -> None:
        apex = self._require_zone(owner)
        texts = [values] if isinstance(values, str) else list(values)
        rdatas = [dns.rdata.from_text(IN, rdtype, text, origin=dns.name.root, relativize=False) for text in texts]
        node = dict(self._nodes.get(owner, {}))
        if rdtype in (RdType.SOA, RdType.NS) and owner != apex:
            raise ValueError(f'{rdtype.name} records only at a zone apex (no delegations): {owner}')
        if not rdatas:
            if rdtype in (RdType.SOA, RdType.NS) and owner == apex:
                raise ValueError(f'the apex {apex} cannot lose its {rdtype.name} records')
            node.pop(rdtype, None)
        else:
            if dns.rdatatype.is_singleton(rdtype) and len(rdatas) > 1:
                raise ValueError(f'{owner} can have only one {rdtype.name} record')
            others = set(node) - {rdtype}
            if rdtype == RdType.CNAME and (owner == apex or others):
                raise ValueError(f'{owner} has other records; a CNAME must stand alone')
            if RdType.CNAME in others:
                raise ValueError(f'{owner} is a CNAME; it cannot have {rdtype.name} records')
            node[rdtype] = dns.rdataset.from_rdata_list(ttl, rdatas)
        if node:
            self._nodes[owner] = node  # a new dict: readers see the old node or the new one
        else:
            self._nodes.pop(owner, None)

    def _bump(self, owner: dns.name.Name, rdtype: RdType | None) -> None:
        apex = self._require_zone(owner)
        if rdtype == RdType.SOA and owner == apex:
            return  # an SOA set explicitly keeps the serial it was given
        soa = self._nodes[apex][RdType.SOA]
        old = soa[0]
        assert isinstance(old, SOA)
        bumped = old.replace(serial=(old.serial + 1) % 2 ** 32)
        self._nodes[apex] = {**self._nodes[apex], RdType.SOA: dns.rdataset.from_rdata_list(soa.ttl, [bumped])}

    # ------------------------------------------------------------- answers

    def exists(self, name: dns.name.Name) -> bool:
        """Whether `name` owns records or is an empty non-terminal (has a descendant that does)."""
        return name in self._nodes or any(owner.is_subdomain(name) for owner in self._nodes)

    def lookup(self, qname: str | dns.name.Name, rrtype: str | RdType) -> Answer:
        """Answer a question for class IN as an authoritative server without recursion would."""
        qname = _name(qname)
        rdtype = RdType.make(rrtype)
        if self.zone_of(qname) is None or rdtype in (RdType.AXFR, RdType.IXFR):
            return Answer(dns.rcode.REFUSED, authoritative=False)
        if dns.rdatatype.is_metatype(rdtype) and rdtype != RdType.ANY:
            return Answer(dns.rcode.NOTIMP if rdtype in (RdType.MAILA, RdType.MAILB) else dns.rcode.FORMERR,
                          authoritative=False)
        result = Answer(dns.rcode.NOERROR, authoritative=True)
        name: dns.name.Name | None = qname
        seen = {qname}
        for _ in range(MAX_CHAIN + 1):
            if name is None:
                break
            name = self._step(name, rdtype, result)
            if name in seen:
                break
            if name is not None:
                seen.add(name)
        return result  # past MAX_CHAIN CNAMEs (or a loop) the client follows the last CNAME itself

    def _step(self, name: dns.name.Name, rdtype: RdType, result: Answer) -> dns.name.Name | None:
        """Add what `name` has for `rdtype` to `result`; the CNAME target to follow next, if any."""
        node = self._nodes.get(name)
        if node is None:
            if not self.exists(name):
                result.rcode = dns.rcode.NXDOMAIN
            result.authority.append(self._negative_soa(name))
        elif rdtype == RdType.ANY:
            result.answer.extend(self._rrset(name, t, r) for t, r in node.items())
        elif rdtype in node:
            result.answer.append(self._rrset(name, rdtype, node[rdtype]))
            result.additional.extend(self._glue(rdtype, node[rdtype]))
        elif RdType.CNAME in node:
            cname = node[RdType.CNAME]
            result.answer.append(self._rrset(name, RdType.CNAME, cname))
            target = cname[0]
            assert isinstance(target, CNAME)
            return target.target if self.zone_of(target.target) is not None else None
        else:
            result.authority.append(self._negative_soa(name))
        return None

    def _rrset(self, owner: dns.name.Name, rdtype: RdType, rdataset: dns.rdataset.Rdataset) -> dns.rrset.RRset:
        assert rdataset.rdtype == rdtype
        return dns.rrset.from_rdata_list(owner, rdataset.ttl, list(rdataset))

    def _negative_soa(self, name: dns.name.Name) -> dns.rrset.RRset:
        apex = self._require_zone(name)
        soa = self._nodes[apex][RdType.SOA]
        rdata = soa[0]
        assert isinstance(rdata, SOA)
        return dns.rrset.from_rdata_list(apex, min(soa.ttl, rdata.minimum), [rdata])

    def _glue(self, rdtype: RdType, rdataset: dns.rdataset.Rdataset) -> list[dns.rrset.RRset]:
        if rdtype != RdType.NS:
            return []
        glue: list[dns.rrset.RRset] = []
        for rdata in rdataset:
            assert isinstance(rdata, NS)
            node = self._nodes.get(rdata.target, {})
            glue.extend(self._rrset(rdata.target, t, node[t]) for t in (RdType.A, RdType.AAAA) if t in node)
        return glue


@dataclass(frozen=True)
class Listener:
    """One address the server answers on (UDP and TCP, same port) and the view it serves there."""

    address: str
    port: int
    view: str


@dataclass(frozen=True)
class QueryEvent:
    """One answered query, given to `LabDns.on_query`."""

    view: str
    client: str
    transport: str  # 'udp' or 'tcp'
    name: str
    rdtype: str
    rcode: str
    truncated: bool


@dataclass
class _Gate:
    open: bool = True  # False once stopping: a TCP connection accepted just before then is not served


@dataclass
class _Bound:
    listener: Listener
    udp: asyncio.DatagramTransport
    tcp: asyncio.Server
    gate: _Gate


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: LabDns, view: str) -> None:
        self.server, self.view = server, view
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # selector transports are not subclasses

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        wire = self.server.respond(self.view, data, str(addr[0]), 'udp')
        if wire is not None and self.transport is not None:
            self.transport.sendto(wire, addr)

    def error_received(self, exc: Exception) -> None:
        logger.debug('lab dns: UDP error on view %s: %s', self.view, exc)


class LabDns:
    """An authoritative DNS server for the lab: views of records served on addresses, over UDP and TCP.

    `queries` counts answered queries and `dropped` the packets (or TCP connections) given up as malformed;
    `on_query`, if set, is called with a `QueryEvent` for every answered query. The views are served as
    given (not copied). Change records on the loop's thread; from another thread use
    ``loop.call_soon_threadsafe(dns.set_records, view, name, rrtype, values)`` (see the module docstring).
    """

    def __init__(self, views: Mapping[str, View], *, udp_payload: int = UDP_PAYLOAD,
                 tcp_idle: float = TCP_IDLE, on_query: Callable[[QueryEvent], None] | None = None) -> None:
        self.views: dict[str, View] = dict(views)
        self.udp_payload = max(CLASSIC_UDP, min(udp_payload, 65535))
        self.tcp_idle = tcp_idle
        self.on_query = on_query
        self.queries = 0
        self.dropped = 0
        self._bound: list[_Bound] = []
        self._connections: set[asyncio.Task[Any]] = set()

    @property
    def listeners(self) -> list[Listener]:
        return [bound.listener for bound in self._bound]

    def port(self, address: str) -> int:
        """The port the server listens on at `address` (useful after binding port 0)."""
        for listener in self.listeners:
            if listener.address == address:
                return listener.port
        raise KeyError(f'not listening on {address}')

    # -------------------------------------------------------------- records

    def set_records(self, view: str, name: str, rrtype: str | RdType, values: Values, ttl: int | None = None) -> None:
        """Replace the `rrtype` records of `name` in `view` (empty `values`: remove them). Loop thread only."""
        self.views[view].set(name, rrtype, values, ttl)

    def remove(self, view: str, name: str, rrtype: str | RdType | None = None) -> None:
        """Remove all records of `name` in `view` (or only those of `rrtype`). Loop thread only."""
        self.views[view].remove(name, rrtype)

    # ------------------------------------------------------------ lifecycle

    async def start(self, listen: Sequence[tuple[str, int, str]]) -> list[Listener]:
        """Listen on each (address, port, view) over UDP and TCP; port 0 picks a free port for both."""
        for _, _, view in listen:
            if view not in self.views:
                raise KeyError(f'no view named {view!r}')
        started: list[_Bound] = []
        try:
            for address, port, view in listen:
                started.append(await self._bind(address, port, view))
        except BaseException:
            for bound in started:
                await self._close(bound)
            raise
        self._bound.extend(started)
        for bound in started:
            logger.info('lab dns: view %s on %s port %d (udp+tcp)', bound.listener.view, bound.listener.address,
                        bound.listener.port)
        return [bound.listener for bound in started]

    async def stop(self) -> None:
        """Stop listening everywhere and end open TCP connections."""
        bound, self._bound = self._bound, []
        for each in bound:
            each.gate.open = False
            each.udp.close()
            each.tcp.close()
        connections, self._connections = list(self._connections), set()
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        for each in bound:
            await each.tcp.wait_closed()

    async def _bind(self, address: str, port: int, view: str) -> _Bound:
        loop = asyncio.get_running_loop()
        gate = _Gate()
        for attempt in range(BIND_ATTEMPTS):
            udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self, view), local_addr=(address, port))
            actual = int(udp.get_extra_info('sockname')[1])
            try:
                tcp = await asyncio.start_server(lambda r, w: self._tcp(view, gate, r, w), address, actual)
            except OSError:
                udp.close()
                if port != 0 or attempt == BIND_ATTEMPTS - 1:
                    raise
                continue
            return _Bound(Listener(address, actual, view), udp, tcp, gate)
        raise AssertionError('unreachable')

    @staticmethod
    async def _close(bound: _Bound) -> None:
        bound.gate.open = False
        bound.udp.close()
        bound.tcp.close()
        await bound.tcp.wait_closed()

    # -------------------------------------------------------------- serving

    async def _tcp(self, view: str, gate: _Gate, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        peer = writer.get_extra_info('peername')
        client = str(peer[0]) if peer else '?'
        try:
            while gate.open:
                try:
                    prefix = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle)
                except (asyncio.IncompleteReadError, TimeoutError):
                    return  # the client is done, or idle too long
                (length,) = struct.unpack('!H', prefix)
                data = await asyncio.wait_for(reader.readexactly(length), self.tcp_idle)
                wire = self.respond(view, data, client, 'tcp')
                if wire is None:
                    return  # malformed: give up on the connection
                writer.write(struct.pack('!H', len(wire)) + wire)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            logger.debug('lab dns: TCP connection from %s ended: %s', client, exc)
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def respond(self, view: str, data: bytes, client: str = '?', transport: str = 'udp') -> bytes | None:
        """The wire answer of `view` to the query `data`, or None to drop it. Never raises."""
        try:
            query = dns.message.from_wire(data)
        except Exception as exc:  # anything a malformed packet can raise
            self.dropped += 1
            logger.debug('lab dns: dropped a malformed packet from %s: %s', client, exc)
            return None
        if query.flags & dns.flags.QR:
            self.dropped += 1
            logger.debug('lab dns: dropped a response from %s', client)
            return None
        try:
            response = self._response(self.views[view], query)
        except Exception:
            logger.exception('lab dns: failed to answer %s from %s', query.question, client)
            response = dns.message.make_response(query, our_payload=self.udp_payload)
            response.set_rcode(dns.rcode.SERVFAIL)
        if transport == 'udp':
            limit = CLASSIC_UDP if query.edns < 0 else max(CLASSIC_UDP, min(query.payload, self.udp_payload))
        else:
            limit = 65535
        wire = self._render(response, limit)
        if wire is None:
            self.dropped += 1
            return None
        self.queries += 1
        self._notify(view, client, transport, query, response)
        return wire

    def _response(self, view: View, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query, our_payload=self.udp_payload)
        if query.edns > 0:
            response.set_rcode(dns.rcode.BADVERS)
        elif query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
        elif len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
        elif query.question[0].rdclass != IN:
            response.set_rcode(dns.rcode.REFUSED)
        else:
            question = query.question[0]
            answer = view.lookup(question.name, question.rdtype)  # owners keep the question's case
            response.set_rcode(answer.rcode)
            if answer.authoritative:
                response.flags |= dns.flags.AA
            response.answer = answer.answer
            response.authority = answer.authority
            response.additional = answer.additional
        return response

    @staticmethod
    def _render(response: dns.message.Message, limit: int) -> bytes | None:
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            pass
        if response.additional:  # RFC 2181 9: dropping additional data does not need TC
            response.additional = []
            try:
                return response.to_wire(max_size=limit)
            except dns.exception.TooBig:
                pass
        response.answer, response.authority = [], []
        response.flags |= dns.flags.TC
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            return None

    def _notify(self, view: str, client: str, transport: str, query: dns.message.Message,
                response: dns.message.Message) -> None:
        if self.on_query is None:
            return
        question = query.question[0] if query.question else None  # an RRset without rdatas is falsy
        event = QueryEvent(view, client, transport,
                           question.name.to_text() if question is not None else '',
                           dns.rdatatype.to_text(question.rdtype) if question is not None else '',
                           dns.rcode.to_text(response.rcode()),
                           bool(response.flags & dns.flags.TC))
        try:
            self.on_query(event)
        except Exception:
            logger.exception('lab dns: on_query hook failed')

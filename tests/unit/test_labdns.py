"""LabDns through the wire (dnspython's client over UDP and TCP on loopback), one behaviour per test."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from homelab.lab.dns import LabDns, QueryEvent, View
from homelab.lab.serving import Background

INTERNAL, PUBLIC = '127.0.0.53', '127.0.0.54'
TIMEOUT = 3.0
BIG = [f'10.0.0.{i}' for i in range(1, 61)]  # 60 A records: ~1 kB, over 512 and under 1232 bytes


def views() -> dict[str, View]:
    return {
        'internal': View(['int.jigga.xyz'], {
            'ns.int.jigga.xyz': {'A': INTERNAL},
            'ichigo.int.jigga.xyz': {'A': '192.168.7.223'},
            'pve-alpha.int.jigga.xyz': {'A': '192.168.7.233'},
            'grafana.int.jigga.xyz': {'A': '192.168.7.230'},
            'dashboards.int.jigga.xyz': {'CNAME': 'grafana.int.jigga.xyz'},
            'www.int.jigga.xyz': {'CNAME': 'dashboards.int.jigga.xyz'},
            'docs.int.jigga.xyz': {'CNAME': 'docs.example.org.'},
            'broken.int.jigga.xyz': {'CNAME': 'missing.int.jigga.xyz'},
            'loop-a.int.jigga.xyz': {'CNAME': 'loop-b.int.jigga.xyz'},
            'loop-b.int.jigga.xyz': {'CNAME': 'loop-a.int.jigga.xyz'},
            'api.k3s.int.jigga.xyz': {'A': '192.168.7.240'},
            'big.int.jigga.xyz': {'A': BIG},
        }),
        'public': View(['jigga.xyz'], {
            'jigga.xyz': {'A': '203.0.113.10'},
            'www.jigga.xyz': {'CNAME': 'jigga.xyz'},
        }, ttl=300),
    }


@dataclass
class Lab:
    server: LabDns
    loop: Background
    events: list[QueryEvent] = field(default_factory=list)

    def port(self, address: str = INTERNAL) -> int:
        return self.server.port(address)

    def ask(self, name: str, rdtype: str = 'A', *, where: str = INTERNAL, tcp: bool = False,
            rdclass: str = 'IN', use_edns: int | None = None, payload: int | None = None) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, rdclass, use_edns=use_edns, payload=payload)
        if tcp:
            return dns.query.tcp(query, where, timeout=TIMEOUT, port=self.port(where))
        return dns.query.udp(query, where, timeout=TIMEOUT, port=self.port(where))

    def on_loop(self, fn: Callable[..., object], *args: object) -> None:
        """Call fn(*args) on the server's loop from this thread, as homelab.lab.dns documents, and wait."""
        self.loop.loop.call_soon_threadsafe(fn, *args)
        self.loop.run(asyncio.sleep(0))  # callbacks run in order: fn has run once this returns


@pytest.fixture
def lab() -> Iterator[Lab]:
    loop = Background('lab-dns-test')
    server = LabDns(views())
    result = Lab(server, loop)
    server.on_query = result.events.append
    loop.run(server.start([(INTERNAL, 0, 'internal'), (PUBLIC, 0, 'public')]))
    try:
        yield result
    finally:
        loop.run(server.stop())
        loop.close()


def addresses(response: dns.message.Message, name: str) -> list[str]:
    rrset = response.get_rrset(response.answer, dns.name.from_text(name), dns.rdataclass.IN, dns.rdatatype.A)
    return sorted(rdata.to_text() for rdata in rrset) if rrset is not None else []


def soa_in_authority(response: dns.message.Message, apex: str) -> dns.rrset.RRset:
    assert len(response.authority) == 1
    soa = response.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.name == dns.name.from_text(apex)
    return soa


def flags(response: dns.message.Message) -> set[str]:
    return set(dns.flags.to_text(response.flags).split())


# ------------------------------------------------------------------------------ answers


@pytest.mark.parametrize('tcp', [False, True], ids=['udp', 'tcp'])
def test_a_record_is_authoritative_without_recursion(lab: Lab, tcp: bool) -> None:
    response = lab.ask('ichigo.int.jigga.xyz', tcp=tcp)
    assert response.rcode() == dns.rcode.NOERROR
    assert addresses(response, 'ichigo.int.jigga.xyz') == ['192.168.7.223']
    assert flags(response) == {'QR', 'AA', 'RD'}  # RD echoed, RA never set
    assert response.answer[0].ttl == 60
    assert response.authority == [] and response.additional == []


def test_names_are_case_insensitive_and_the_question_case_is_echoed(lab: Lab) -> None:
    response = lab.ask('GraFana.INT.Jigga.xyz')
    assert addresses(response, 'grafana.int.jigga.xyz') == ['192.168.7.230']
    assert response.answer[0].name.to_text() == 'GraFana.INT.Jigga.xyz.'


def test_aaaa_of_an_ipv4_only_name_is_nodata_with_soa(lab: Lab) -> None:
    response = lab.ask('pve-alpha.int.jigga.xyz', 'AAAA')
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert 'AA' in flags(response)
    soa = soa_in_authority(response, 'int.jigga.xyz')
    assert soa.ttl == 60  # min(SOA TTL, SOA minimum): the negative-caching TTL (RFC 2308)


def test_unknown_name_in_zone_is_nxdomain_with_soa(lab: Lab) -> None:
    response = lab.ask('nope.int.jigga.xyz')
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.answer == []
    assert 'AA' in flags(response)
    soa_in_authority(response, 'int.jigga.xyz')


def test_empty_non_terminal_is_nodata_not_nxdomain(lab: Lab) -> None:
    response = lab.ask('k3s.int.jigga.xyz')  # only api.k3s.int.jigga.xyz has records
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    soa_in_authority(response, 'int.jigga.xyz')


@pytest.mark.parametrize('name', ['example.com', 'jigga.xyz', 'xyz', '.'])
def test_names_outside_the_views_zones_are_refused(lab: Lab, name: str) -> None:
    response = lab.ask(name)
    assert response.rcode() == dns.rcode.REFUSED
    assert response.answer == [] and response.authority == []
    assert flags(response) == {'QR', 'RD'}  # neither AA nor RA


def test_apex_has_soa_and_ns_with_glue(lab: Lab) -> None:
    soa = lab.ask('int.jigga.xyz', 'SOA')
    assert soa.rcode() == dns.rcode.NOERROR
    assert soa.answer[0].rdtype == dns.rdatatype.SOA
    assert soa.answer[0][0].mname.to_text() == 'ns.int.jigga.xyz.'
    ns = lab.ask('int.jigga.xyz', 'NS')
    assert [rdata.to_text() for rdata in ns.answer[0]] == ['ns.int.jigga.xyz.']
    glue = ns.get_rrset(ns.additional, dns.name.from_text('ns.int.jigga.xyz'), dns.rdataclass.IN,
                        dns.rdatatype.A)
    assert glue is not None and [rdata.to_text() for rdata in glue] == [INTERNAL]
    assert lab.ask('int.jigga.xyz').rcode() == dns.rcode.NOERROR  # apex without A: NODATA


def test_cname_chain_is_followed_inside_the_view(lab: Lab) -> None:
    response = lab.ask('www.int.jigga.xyz')
    assert response.rcode() == dns.rcode.NOERROR
    assert [(rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype)) for rrset in response.answer] == [
        ('www.int.jigga.xyz.', 'CNAME'),
        ('dashboards.int.jigga.xyz.', 'CNAME'),
        ('grafana.int.jigga.xyz.', 'A'),
    ]
    assert addresses(response, 'grafana.int.jigga.xyz') == ['192.168.7.230']
    assert 'AA' in flags(response)


def test_cname_query_type_returns_only_the_cname(lab: Lab) -> None:
    response = lab.ask('dashboards.int.jigga.xyz', 'CNAME')
    assert len(response.answer) == 1
    assert response.answer[0][0].to_text() == 'grafana.int.jigga.xyz.'


def test_cname_out_of_the_view_ends_the_chain(lab: Lab) -> None:
    response = lab.ask('docs.int.jigga.xyz')
    assert response.rcode() == dns.rcode.NOERROR
    assert [rrset.rdtype for rrset in response.answer] == [dns.rdatatype.CNAME]
    assert response.authority == []


def test_cname_to_a_missing_name_is_nxdomain_with_the_cname(lab: Lab) -> None:
    response = lab.ask('broken.int.jigga.xyz')
    assert response.rcode() == dns.rcode.NXDOMAIN  # the rcode of the last name in the chain (RFC 6604)
    assert [rrset.rdtype for rrset in response.answer] == [dns.rdatatype.CNAME]
    soa_in_authority(response, 'int.jigga.xyz')


def test_cname_loop_terminates(lab: Lab) -> None:
    response = lab.ask('loop-a.int.jigga.xyz')
    assert response.rcode() == dns.rcode.NOERROR
    assert [rrset.name.to_text() for rrset in response.answer] == ['loop-a.int.jigga.xyz.', 'loop-b.int.jigga.xyz.']


def test_any_returns_every_record_set_of_the_name(lab: Lab) -> None:
    response = lab.ask('int.jigga.xyz', 'ANY')
    assert {rrset.rdtype for rrset in response.answer} == {dns.rdatatype.SOA, dns.rdatatype.NS}


@pytest.mark.parametrize(('rdtype', 'rcode'), [('AXFR', dns.rcode.REFUSED), ('IXFR', dns.rcode.REFUSED),
                                               ('MAILB', dns.rcode.NOTIMP)])
def test_transfers_and_mail_meta_types_are_not_served(lab: Lab, rdtype: str, rcode: dns.rcode.Rcode) -> None:
    query = dns.message.make_query('int.jigga.xyz', rdtype)
    response = dns.query.udp(query, INTERNAL, timeout=TIMEOUT, port=lab.port())
    assert response.rcode() == rcode
    assert response.answer == []


def test_other_classes_are_refused(lab: Lab) -> None:
    response = lab.ask('version.bind', 'TXT', rdclass='CH')
    assert response.rcode() == dns.rcode.REFUSED


def test_other_opcodes_are_not_implemented(lab: Lab) -> None:
    query = dns.message.make_query('int.jigga.xyz', 'SOA')
    query.set_opcode(dns.opcode.NOTIFY)
    response = dns.query.udp(query, INTERNAL, timeout=TIMEOUT, port=lab.port())
    assert response.rcode() == dns.rcode.NOTIMP


# -------------------------------------------------------------------------------- views


def test_two_views_answer_differently_for_the_same_name(lab: Lab) -> None:
    assert {listener.address: listener.view for listener in lab.server.listeners} == {INTERNAL: 'internal',
                                                                                    PUBLIC: 'public'}
    inside = lab.ask('ichigo.int.jigga.xyz', where=INTERNAL)
    outside = lab.ask('ichigo.int.jigga.xyz', where=PUBLIC)
    assert addresses(inside, 'ichigo.int.jigga.xyz') == ['192.168.7.223']
    assert outside.rcode() == dns.rcode.NXDOMAIN  # the public view owns jigga.xyz but has no internal names
    soa_in_authority(outside, 'jigga.xyz')
    assert addresses(lab.ask('jigga.xyz', where=PUBLIC), 'jigga.xyz') == ['203.0.113.10']
    assert lab.ask('jigga.xyz', where=INTERNAL).rcode() == dns.rcode.REFUSED


def test_view_ttl_applies_to_its_records(lab: Lab) -> None:
    response = lab.ask('www.jigga.xyz', where=PUBLIC)
    assert [rrset.ttl for rrset in response.answer] == [300, 300]
    assert addresses(response, 'jigga.xyz') == ['203.0.113.10']


# ------------------------------------------------------------------------ runtime changes


def test_record_changes_are_visible_in_the_next_query(lab: Lab) -> None:
    serial = lab.ask('int.jigga.xyz', 'SOA').answer[0][0].serial
    lab.on_loop(lab.server.set_records, 'internal', 'longhorn.int.jigga.xyz', 'A', ['192.168.7.231'])
    assert addresses(lab.ask('longhorn.int.jigga.xyz'), 'longhorn.int.jigga.xyz') == ['192.168.7.231']
    lab.on_loop(lab.server.set_records, 'internal', 'ichigo.int.jigga.xyz', 'A', ['192.168.7.224', '192.168.7.225'])
    assert addresses(lab.ask('ichigo.int.jigga.xyz'), 'ichigo.int.jigga.xyz') == ['192.168.7.224',
                                                                                  '192.168.7.225']
    lab.on_loop(lab.server.remove, 'internal', 'longhorn.int.jigga.xyz')
    assert lab.ask('longhorn.int.jigga.xyz').rcode() == dns.rcode.NXDOMAIN
    assert lab.ask('int.jigga.xyz', 'SOA').answer[0][0].serial == serial + 3
    assert lab.ask('longhorn.int.jigga.xyz', where=PUBLIC).rcode() == dns.rcode.NXDOMAIN  # other view untouched


def test_set_records_from_a_coroutine_with_a_custom_ttl(lab: Lab) -> None:
    async def change() -> None:
        lab.server.set_records('internal', 'ichigo.int.jigga.xyz', 'AAAA', 'fd00::223', ttl=5)

    lab.loop.run(change())
    response = lab.ask('ichigo.int.jigga.xyz', 'AAAA', tcp=True)
    assert [rdata.to_text() for rdata in response.answer[0]] == ['fd00::223']
    assert response.answer[0].ttl == 5
    lab.on_loop(lab.server.remove, 'internal', 'ichigo.int.jigga.xyz', 'AAAA')
    assert lab.ask('ichigo.int.jigga.xyz', 'AAAA').answer == []
    assert addresses(lab.ask('ichigo.int.jigga.xyz'), 'ichigo.int.jigga.xyz') == ['192.168.7.223']


# ---------------------------------------------------------------------- EDNS, truncation


def test_edns_is_answered_with_our_payload(lab: Lab) -> None:
    response = lab.ask('grafana.int.jigga.xyz', use_edns=0, payload=4096)
    assert response.edns == 0
    assert response.payload == 1232
    assert lab.ask('grafana.int.jigga.xyz').edns == -1  # no EDNS asked, none answered


def test_unknown_edns_version_gets_badvers(lab: Lab) -> None:
    response = lab.ask('grafana.int.jigga.xyz', use_edns=1)
    assert response.rcode() == dns.rcode.BADVERS
    assert response.answer == []


def test_big_udp_answer_is_truncated_and_complete_over_tcp(lab: Lab) -> None:
    small = lab.ask('big.int.jigga.xyz')  # no EDNS: 512 bytes
    assert 'TC' in flags(small)
    assert small.answer == []
    assert small.rcode() == dns.rcode.NOERROR
    assert lab.events[-1].truncated
    also_small = lab.ask('big.int.jigga.xyz', use_edns=0, payload=512)
    assert 'TC' in flags(also_small)
    whole = lab.ask('big.int.jigga.xyz', tcp=True)
    assert 'TC' not in flags(whole)
    assert addresses(whole, 'big.int.jigga.xyz') == sorted(BIG)
    roomy = lab.ask('big.int.jigga.xyz', use_edns=0, payload=1232)  # fits in the client's payload
    assert 'TC' not in flags(roomy)
    assert addresses(roomy, 'big.int.jigga.xyz') == sorted(BIG)
    query = dns.message.make_query('big.int.jigga.xyz', 'A')
    response, used_tcp = dns.query.udp_with_fallback(query, INTERNAL, timeout=TIMEOUT, port=lab.port())
    assert used_tcp
    assert addresses(response, 'big.int.jigga.xyz') == sorted(BIG)


def test_tcp_answers_pipelined_queries_on_one_connection(lab: Lab) -> None:
    names = ['ichigo.int.jigga.xyz', 'grafana.int.jigga.xyz', 'nope.int.jigga.xyz']
    queries = [dns.message.make_query(name, 'A') for name in names]
    with socket.create_connection((INTERNAL, lab.port()), timeout=TIMEOUT) as sock:
        sock.sendall(b''.join(query.to_wire(prepend_length=True) for query in queries))
        stream = sock.makefile('rb')
        for query in queries:
            (length,) = struct.unpack('!H', stream.read(2))
            response = dns.message.from_wire(stream.read(length))
            assert query.is_response(response)
    assert [event.rcode for event in lab.events] == ['NOERROR', 'NOERROR', 'NXDOMAIN']
    assert {event.transport for event in lab.events} == {'tcp'}


# ------------------------------------------------------------------------------ robustness


@pytest.mark.parametrize('packet', [
    b'',
    b'\x12',
    b'\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00',  # claims a question it does not have
    b'\xff' * 64,
    bytes(range(256)) * 4,
], ids=['empty', 'one-byte', 'short-question', 'ones', 'noise'])
def test_garbage_udp_is_dropped_and_the_server_keeps_answering(lab: Lab, packet: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        sock.sendto(packet, (INTERNAL, lab.port()))
        with pytest.raises(TimeoutError):
            sock.recvfrom(4096)
    assert lab.server.dropped == 1
    assert addresses(lab.ask('ichigo.int.jigga.xyz'), 'ichigo.int.jigga.xyz') == ['192.168.7.223']


def test_responses_are_not_answered(lab: Lab) -> None:
    query = dns.message.make_query('ichigo.int.jigga.xyz', 'A')
    query.flags |= dns.flags.QR
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.3)
        sock.sendto(query.to_wire(), (INTERNAL, lab.port()))
        with pytest.raises(TimeoutError):
            sock.recvfrom(4096)
    assert lab.server.dropped == 1
    assert lab.server.queries == 0


def test_garbage_over_tcp_closes_only_that_connection(lab: Lab) -> None:
    with socket.create_connection((INTERNAL, lab.port()), timeout=TIMEOUT) as sock:
        sock.sendall(struct.pack('!H', 5) + b'\xde\xad\xbe\xef\x00')
        assert sock.recv(100) == b''  # closed without an answer
    with socket.create_connection((INTERNAL, lab.port()), timeout=TIMEOUT) as sock:
        sock.sendall(b'\x00')  # half a length prefix, then gone
    assert lab.server.dropped == 1
    assert addresses(lab.ask('ichigo.int.jigga.xyz', tcp=True), 'ichigo.int.jigga.xyz') == ['192.168.7.223']
    assert addresses(lab.ask('ichigo.int.jigga.xyz'), 'ichigo.int.jigga.xyz') == ['192.168.7.223']


def test_query_hook_and_counter(lab: Lab) -> None:
    lab.ask('Ichigo.int.jigga.xyz')
    lab.ask('example.com', 'AAAA', tcp=True)
    assert lab.server.queries == 2
    assert lab.events == [
        QueryEvent('internal', '127.0.0.1', 'udp', 'Ichigo.int.jigga.xyz.', 'A', 'NOERROR', False),
        QueryEvent('internal', '127.0.0.1', 'tcp', 'example.com.', 'AAAA', 'REFUSED', False),
    ]


def test_a_failing_hook_does_not_stop_answers(lab: Lab) -> None:
    def fail(event: QueryEvent) -> None:
        raise RuntimeError(event.name)

    lab.server.on_query = fail
    assert addresses(lab.ask('ichigo.int.jigga.xyz'), 'ichigo.int.jigga.xyz') == ['192.168.7.223']


# ------------------------------------------------------------------------------- lifecycle


def test_udp_and_tcp_share_the_port_and_stop_frees_it(lab: Lab) -> None:
    port = lab.port()
    with socket.create_connection((INTERNAL, port), timeout=TIMEOUT) as idle:  # an open connection ends too
        idle.sendall(dns.message.make_query('ichigo.int.jigga.xyz', 'A').to_wire(prepend_length=True))
        stream = idle.makefile('rb')
        (length,) = struct.unpack('!H', stream.read(2))
        assert len(stream.read(length)) == length
        lab.loop.run(lab.server.stop())
        assert lab.server.listeners == []
        assert idle.recv(10) == b''
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        udp.bind((INTERNAL, port))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((INTERNAL, port))


def test_start_on_an_unknown_view_fails_before_binding() -> None:
    loop = Background('lab-dns-test')
    try:
        server = LabDns(views())
        with pytest.raises(KeyError, match='nope'):
            loop.run(server.start([(INTERNAL, 0, 'nope')]))
        assert server.listeners == []
    finally:
        loop.close()


def test_a_taken_port_fails_start_and_leaves_nothing_bound(lab: Lab) -> None:
    server = LabDns(views())
    with pytest.raises(OSError):
        lab.loop.run(server.start([(PUBLIC, 0, 'public'), (INTERNAL, lab.port(), 'internal')]))
    assert server.listeners == []


# ----------------------------------------------------------------------------- view data


def test_view_lookup_without_a_server() -> None:
    view = views()['internal']
    answer = view.lookup('ICHIGO.int.jigga.xyz.', 'A')
    assert (answer.rcode, answer.authoritative) == (dns.rcode.NOERROR, True)
    assert view.get('ichigo.int.jigga.xyz', 'A') == ['192.168.7.223']
    assert view.zone_of('a.b.int.jigga.xyz') == dns.name.from_text('int.jigga.xyz')
    assert view.zone_of('jigga.xyz') is None


def test_nested_zones_use_the_closest_apex() -> None:
    view = View(['jigga.xyz', 'int.jigga.xyz'], {'grafana.int.jigga.xyz': {'A': '192.168.7.230'}})
    answer = view.lookup('nope.int.jigga.xyz', 'A')
    assert answer.rcode == dns.rcode.NXDOMAIN
    assert answer.authority[0].name == dns.name.from_text('int.jigga.xyz')
    assert view.lookup('nope.jigga.xyz', 'A').authority[0].name == dns.name.from_text('jigga.xyz')


@pytest.mark.parametrize(('name', 'rrtype', 'values', 'message'), [
    ('example.com', 'A', ['192.0.2.1'], 'outside the zones'),
    ('ichigo.int.jigga.xyz', 'CNAME', ['grafana.int.jigga.xyz'], 'must stand alone'),
    ('www.int.jigga.xyz', 'A', ['192.0.2.1'], 'is a CNAME'),
    ('new.int.jigga.xyz', 'CNAME', ['a.int.jigga.xyz', 'b.int.jigga.xyz'], 'only one CNAME'),
    ('sub.int.jigga.xyz', 'NS', ['ns.elsewhere.org'], 'no delegations'),
    ('int.jigga.xyz', 'NS', [], 'cannot lose'),
    ('int.jigga.xyz', 'CNAME', ['grafana.int.jigga.xyz'], 'must stand alone'),
    ('x.int.jigga.xyz', 'ANY', ['192.0.2.1'], 'query type'),
])
def test_invalid_record_changes_are_rejected(name: str, rrtype: str, values: list[str], message: str) -> None:
    view = views()['internal']
    with pytest.raises(ValueError, match=message):
        view.set(name, rrtype, values)


def test_bad_rdata_is_rejected() -> None:
    with pytest.raises(dns.exception.SyntaxError):
        View(['lab.test'], {'x.lab.test': {'A': 'not-an-address'}})


def test_removing_an_apex_keeps_soa_and_ns() -> None:
    view = View(['jigga.xyz'], {'jigga.xyz': {'A': '203.0.113.10'}})
    view.remove('jigga.xyz')
    assert view.get('jigga.xyz', 'A') == []
    assert view.get('jigga.xyz', 'NS') == ['ns.jigga.xyz.']
    assert view.get('jigga.xyz', 'SOA')[0].split()[2] == '2'  # serial bumped once
    view.remove('nothing.jigga.xyz')  # nothing there: no error

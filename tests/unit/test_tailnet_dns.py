"""The tailnet resolver (100.100.100.100's stand-in) forwards a split-DNS domain only while an online device
has an enabled route to its nameserver; on 127.0.0.1 with an authoritative LabDns as the nameserver."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from homelab.lab.dns import LabDns, View
from homelab.lab.serving import Background
from homelab.lab.tailscale import LabTailscale, TailnetResolver

HOST = "127.0.0.1"
NAMESERVER = "192.168.7.231"
ROUTES = ["192.168.7.230/32", "192.168.7.231/32"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Net:
    lab: LabTailscale
    resolver: TailnetResolver
    clock: Clock
    loop: Background

    def ask(self, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype)
        assert self.resolver.port is not None
        send = dns.query.tcp if tcp else dns.query.udp
        return send(query, HOST, timeout=5, port=self.resolver.port)

    def call(self, fn: object, *args: object) -> object:
        async def go() -> object:
            return fn(*args)  # type: ignore[operator]

        return self.loop.run(go())


@pytest.fixture
def net() -> Iterator[Net]:
    clock = Clock()
    lab = LabTailscale(clock=clock)
    view = View(["int.jigga.xyz"], {"grafana.int.jigga.xyz": {"A": "192.168.7.230"},
                                    "split.int.jigga.xyz": {"A": ["192.168.7.230", "192.168.7.50"]}})
    upstream = LabDns({"internal": view})
    loop = Background("tailnet-dns-test")
    loop.run(upstream.start([(HOST, 0, "internal")]))
    port = upstream.port(HOST)
    resolver = TailnetResolver(lab, timeout=1.0, upstream=lambda ns: (HOST, port) if ns == NAMESERVER else (ns, 53))
    loop.run(resolver.start(HOST, 0))
    try:
        yield Net(lab, resolver, clock, loop)
    finally:
        loop.run(resolver.stop())
        loop.run(upstream.stop())
        loop.close()


def _device(net: Net, routes: list[str]) -> str:
    async def go() -> str:
        net.lab.add_api_key("tskey-api-x")
        key = net.lab._create_key({"capabilities": {"devices": {"create": {"preauthorized": True,
                                                                             "tags": ["tag:k8s"]}}}},
                                  net.lab.tokens["tskey-api-x"])
        return net.lab.register(key["key"], "homelab-subnet-router", routes).id

    return net.loop.run(go())


def _a(answer: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in answer.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset)


def test_forwards_only_through_an_enabled_route_of_an_online_device(net: Net) -> None:
    assert net.ask("grafana.int.jigga.xyz").rcode() == dns.rcode.SERVFAIL  # no split DNS: no upstream
    net.lab.split_dns = {"int.jigga.xyz": [NAMESERVER]}
    assert net.ask("grafana.int.jigga.xyz").rcode() == dns.rcode.SERVFAIL  # no device routes to .231
    device_id = _device(net, ROUTES)
    assert net.ask("grafana.int.jigga.xyz").rcode() == dns.rcode.SERVFAIL  # advertised, not approved
    assert net.resolver.forwarded == 0
    net.lab.devices[device_id].enabled = tuple(ROUTES)
    answer = net.ask("grafana.int.jigga.xyz")
    assert answer.rcode() == dns.rcode.NOERROR and _a(answer) == ["192.168.7.230"]
    assert _a(net.ask("grafana.int.jigga.xyz", tcp=True)) == ["192.168.7.230"]
    assert net.ask("nothing.int.jigga.xyz").rcode() == dns.rcode.NXDOMAIN  # the nameserver's own answer
    assert net.ask("www.example.org").rcode() == dns.rcode.SERVFAIL  # outside every split domain

    net.clock.now += net.lab.online_expiry + 1  # heartbeats stopped: the device is offline
    assert net.ask("grafana.int.jigga.xyz").rcode() == dns.rcode.SERVFAIL
    net.call(net.lab.heartbeat, device_id, net.lab.devices[device_id].heartbeat_token)
    assert _a(net.ask("grafana.int.jigga.xyz")) == ["192.168.7.230"]

    net.lab.devices[device_id].enabled = ("192.168.7.230/32",)  # the nameserver's route withdrawn
    assert net.ask("grafana.int.jigga.xyz").rcode() == dns.rcode.SERVFAIL


def test_removing_split_dns_stops_resolution(net: Net) -> None:
    net.lab.split_dns = {"int.jigga.xyz": [NAMESERVER]}
    device_id = _device(net, ROUTES)
    net.lab.devices[device_id].enabled = tuple(ROUTES)
    assert _a(net.ask("grafana.int.jigga.xyz")) == ["192.168.7.230"]
    net.lab.split_dns = {}
    assert net.ask("grafana.int.jigga.xyz").rcode() == dns.rcode.SERVFAIL


def test_answers_are_unfiltered_unless_asked_and_magicdns_names_resolve(net: Net) -> None:
    net.lab.split_dns = {"int.jigga.xyz": [NAMESERVER]}
    device_id = _device(net, ROUTES)
    net.lab.devices[device_id].enabled = tuple(ROUTES)
    assert _a(net.ask("split.int.jigga.xyz")) == ["192.168.7.230", "192.168.7.50"]  # as tailscaled: unchanged
    net.resolver.filter_unrouted = True
    assert _a(net.ask("split.int.jigga.xyz")) == ["192.168.7.230"]
    net.lab.devices[device_id].enabled = ("192.168.7.231/32",)
    answer = net.ask("grafana.int.jigga.xyz")
    assert answer.rcode() == dns.rcode.NOERROR and _a(answer) == []

    device = net.lab.devices[device_id]
    assert _a(net.ask(device.name)) == [device.addresses[0]]
    assert net.ask(f"nobody.{net.lab.magic_suffix}").rcode() == dns.rcode.NXDOMAIN

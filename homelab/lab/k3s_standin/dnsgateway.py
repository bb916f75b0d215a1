"""A k8s_gateway double: the LoadBalancer address of a `k8s-gateway` chart's Service answers DNS for the cluster's
Ingress hosts, as the CoreDNS plugin k8s_gateway (https://github.com/ori-edge/k8s_gateway, chart `k8s-gateway`
from https://ori-edge.github.io/k8s_gateway/) does.

Chart values read (charts/k8s-gateway/values.yaml and templates/configmap.yaml of that repository):
`domain` (one or more delegated zones, space-separated), `ttl` (default 300), `apex` (default
`<fullname>.<namespace>`, the stand-in's release name), `watchedResources` (default all; "Ingress" and
"Service" are served), `service.port` (default 53). The Service itself (type, `service.loadBalancerIP`,
`service.annotations` such as metallb.io/loadBalancerIPs) is shaped by the stand-in's HelmChart controller.

Answers (RFC 1035, UDP and TCP on the Service port of the LoadBalancer address this node announces):
- A/AAAA for Ingress hosts (spec.rules[].host) under a domain: the Ingress's status.loadBalancer.ingress[].ip,
  as k8s_gateway does. The stand-in's ingress double writes no Ingress status, so when there is none the
  address is what Traefik would have published there (its `publishedService`): the LoadBalancer address of the
  ingress-controller chart (charts/ingress.json) whose class the Ingress names (or the default class);
- A/AAAA for LoadBalancer Services as `<name>.<namespace>.<domain>` and for the hostname in their annotation
  `coredns.io/hostname`;
- SOA and NS at each zone apex (NS `<apex>.<zone>`, whose A is the gateway's own address); AA is set;
- NXDOMAIN with the SOA for unknown names in a zone; NOERROR without answers (and the SOA) for a known name
  without the asked type; REFUSED for names outside every zone; NOTIMP for opcodes other than QUERY;
- over UDP an answer above 512 bytes is truncated (TC=1, no records); EDNS options are ignored.

Off unless the announcer is active or the ingress double's bind hook is set (tests: `bind(ip, port)` ->
(127.0.0.x, 0); the port actually bound is in `bound[(ip, port)]`). Standard library only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .ingress import INSTANCE_LABEL, load_index

if TYPE_CHECKING:
    from .controllers import Controllers

JSONObj = dict[str, Any]
CHART = "k8s-gateway"
HOSTNAME_ANNOTATION = "coredns.io/hostname"
TYPE_A, TYPE_NS, TYPE_SOA, TYPE_AAAA, TYPE_ANY = 1, 2, 6, 28, 255
RCODE_NOERROR, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_NOTIMP, RCODE_REFUSED = 0, 1, 2, 3, 4, 5
UDP_LIMIT = 512


class FormatError(Exception):
    pass


def _dig(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            raw = label.encode("ascii", "replace")[:63]
            out += bytes([len(raw)]) + raw
    return out + b"\0"


def decode_name(data: bytes, offset: int) -> tuple[str, int]:
    """A (possibly compressed) name at offset: (name without the final dot, offset after it)."""
    labels: list[str] = []
    end = None
    jumps = 0
    while True:
        if offset >= len(data):
            raise FormatError("name runs past the packet")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(data) or jumps > 16:
                raise FormatError("bad compression pointer")
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            jumps += 1
            continue
        if length & 0xC0:
            raise FormatError("bad label type")
        offset += 1
        if length == 0:
            break
        labels.append(data[offset:offset + length].decode("ascii", "replace"))
        offset += length
    return ".".join(labels), end if end is not None else offset


def _rr(name: str, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return encode_name(name) + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


class Zone:
    """The records of one gateway at one moment: names (lowercase, no final dot) -> addresses."""

    def __init__(self, zones: list[str], apex: str, ttl: int, own_ip: str, hosts: dict[str, list[str]]) -> None:
        self.zones = sorted({z.lower().strip(".") for z in zones if z.strip(".")}, key=len, reverse=True)
        self.apex, self.ttl, self.own_ip, self.hosts = apex.strip("."), ttl, own_ip, hosts

    def zone_of(self, name: str) -> str | None:
        return next((z for z in self.zones if name == z or name.endswith("." + z)), None)

    def ns_name(self, zone: str) -> str:
        return f"{self.apex}.{zone}"

    def soa(self, zone: str) -> bytes:
        rdata = (encode_name(self.ns_name(zone)) + encode_name(f"hostmaster.{self.ns_name(zone)}")
                 + struct.pack("!IIIII", int(time.time()) & 0xFFFFFFFF, 7200, 1800, 86400, self.ttl))
        return _rr(zone, TYPE_SOA, self.ttl, rdata)

    def addresses(self, name: str, zone: str) -> list[str] | None:
        if name == self.ns_name(zone):
            return [self.own_ip]
        return self.hosts.get(name)

    def answer(self, query: bytes) -> bytes | None:  # noqa: PLR0911, PLR0912
        """The wire answer to a query, or None to drop it (a response, or too short to answer)."""
        if len(query) < 12:
            return None
        qid, flags, qdcount = struct.unpack("!HHH", query[:6])
        if flags & 0x8000:
            return None
        opcode = (flags >> 11) & 0xF
        rd = flags & 0x0100
        try:
            if qdcount != 1:
                raise FormatError("one question expected")
            qname, offset = decode_name(query, 12)
            if offset + 4 > len(query):
                raise FormatError("short question")
            qtype, qclass = struct.unpack("!HH", query[offset:offset + 4])
            question = query[12:offset + 4] if qname == "" or query[12] & 0xC0 == 0 else \
                encode_name(qname) + query[offset:offset + 4]
        except FormatError:
            return struct.pack("!HHHHHH", qid, 0x8000 | (opcode << 11) | rd | RCODE_FORMERR, 0, 0, 0, 0)

        def reply(rcode: int, answers: list[bytes], authority: list[bytes], aa: bool) -> bytes:
            head = struct.pack("!HHHHHH", qid, 0x8000 | (opcode << 11) | (0x0400 if aa else 0) | rd | rcode, 1,
                               len(answers), len(authority), 0)
            return head + question + b"".join(answers) + b"".join(authority)

        if opcode != 0:
            return reply(RCODE_NOTIMP, [], [], False)
        name = qname.lower().rstrip(".")
        zone = self.zone_of(name)
        if zone is None or qclass not in (1, 255):
            return reply(RCODE_REFUSED, [], [], False)
        answers: list[bytes] = []
        if name == zone and qtype in (TYPE_SOA, TYPE_ANY):
            answers.append(self.soa(zone))
        if name == zone and qtype in (TYPE_NS, TYPE_ANY):
            answers.append(_rr(zone, TYPE_NS, self.ttl, encode_name(self.ns_name(zone))))
        found = self.addresses(name, zone)
        for ip in found or []:
            version = ipaddress.ip_address(ip).version
            if qtype in (TYPE_A, TYPE_ANY) and version == 4:
                answers.append(_rr(qname, TYPE_A, self.ttl, ipaddress.ip_address(ip).packed))
            if qtype in (TYPE_AAAA, TYPE_ANY) and version == 6:
                answers.append(_rr(qname, TYPE_AAAA, self.ttl, ipaddress.ip_address(ip).packed))
        if answers:
            return reply(RCODE_NOERROR, answers, [], True)
        exists = name == zone or found is not None or any(h.endswith("." + name) for h in self.hosts)
        return reply(RCODE_NOERROR if exists else RCODE_NXDOMAIN, [], [self.soa(zone)], True)


def truncate(wire: bytes, limit: int = UDP_LIMIT) -> bytes:
    """An answer cut to the header and question with TC set when it is larger than `limit`."""
    if len(wire) <= limit:
        return wire
    _, offset = decode_name(wire, 12)
    qid, flags = struct.unpack("!HH", wire[:4])
    return struct.pack("!HHHHHH", qid, flags | 0x0200, 1, 0, 0, 0) + wire[12:offset + 4]


class Gateway:
    """One k8s-gateway release serving on its LoadBalancer address: a UDP and a TCP listener."""

    def __init__(self, owner: DnsGateway, ip: str, port: int, chart_key: str) -> None:
        self.owner, self.ip, self.port, self.chart_key = owner, ip, port, chart_key
        self.servers: list[socketserver.BaseServer] = []
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        host, bind_port = self.owner.bind(self.ip, self.port)
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        gateway = self
        try:
            udp_cls = type("Udp", (socketserver.ThreadingUDPServer,), {"address_family": family,
                                                                         "daemon_threads": True,
                                                                         "allow_reuse_address": True})
            udp = udp_cls((host, bind_port), type("UdpHandler", (_UdpHandler,), {"gateway": gateway}))
            self.servers.append(udp)
            actual = udp.server_address[1]
            tcp_cls = type("Tcp", (socketserver.ThreadingTCPServer,), {"address_family": family,
                                                                         "daemon_threads": True,
                                                                         "allow_reuse_address": True})
            tcp = tcp_cls((host, actual), type("TcpHandler", (_TcpHandler,), {"gateway": gateway}))
            self.servers.append(tcp)
        except OSError:
            self.stop()
            raise
        for server in self.servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                      name=f"k3s-standin-dns-{self.ip}", daemon=True)
            thread.start()
            self.threads.append(thread)
        self.owner.bound[(self.ip, self.port)] = int(actual)
        self.owner.ctl.log.info(f"k8s-gateway (stand-in): {self.chart_key} answering DNS on {self.ip}:{self.port}")

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        for thread in self.threads:
            thread.join(timeout=5)
        self.servers, self.threads = [], []
        self.owner.bound.pop((self.ip, self.port), None)

    def respond(self, query: bytes) -> bytes | None:
        try:
            zone = self.owner.zone(self.chart_key, self.ip)
            if zone is None:
                return None
            return zone.answer(query)
        except Exception as exc:  # answer SERVFAIL rather than nothing
            self.owner.ctl.log.error(f"k8s-gateway (stand-in): {type(exc).__name__}: {exc}")
            if len(query) < 12:
                return None
            qid, flags = struct.unpack("!HH", query[:4])
            return struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x7900) | RCODE_SERVFAIL, 0, 0, 0, 0)


class _UdpHandler(socketserver.BaseRequestHandler):
    gateway: Gateway

    def handle(self) -> None:
        data, sock = self.request
        wire = self.gateway.respond(data)
        if wire is not None:
            sock.sendto(truncate(wire), self.client_address)


class _TcpHandler(socketserver.BaseRequestHandler):
    gateway: Gateway

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(10)
        with contextlib.suppress(OSError):
            while True:
                prefix = _read(conn, 2)
                if prefix is None:
                    return
                data = _read(conn, struct.unpack("!H", prefix)[0])
                wire = self.gateway.respond(data) if data is not None else None
                if wire is None:
                    return
                conn.sendall(struct.pack("!H", len(wire)) + wire)


def _read(conn: socket.socket, size: int) -> bytes | None:
    buf = b""
    while len(buf) < size:
        chunk = conn.recv(size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class DnsGateway:
    def __init__(self, ctl: Controllers, env: Mapping[str, str]) -> None:
        self.ctl, self.env = ctl, env
        self.gateways: dict[tuple[str, str], Gateway] = {}  # (ip, chart key) -> listeners
        self.bound: dict[tuple[str, int], int] = {}  # (LB ip, Service port) -> the port actually listened on
        self._failed: set[tuple[str, str]] = set()

    @property
    def enabled(self) -> bool:
        return self.ctl.ingress.enabled

    def bind(self, ip: str, port: int) -> tuple[str, int]:
        return self.ctl.ingress.bind(ip, port)

    # --- store lookups
    def _charts(self, name: str) -> list[JSONObj]:
        from .controllers import _chart_name

        return [c for c in self.ctl.list_of("helm.cattle.io", "v1", "helmcharts")
                if _chart_name(c.get("spec") or {}) == name and not c["metadata"].get("deletionTimestamp")]

    @staticmethod
    def _target(chart: JSONObj) -> str:
        return str((chart.get("spec") or {}).get("targetNamespace") or chart["metadata"]["namespace"])

    def _lb_ips(self, namespace: str, name: str) -> list[str]:
        svc = self.ctl.get_of("", "v1", "services", namespace, name)
        if svc is None or (svc.get("spec") or {}).get("type") != "LoadBalancer":
            return []
        return [str(i["ip"]) for i in _dig(svc, "status", "loadBalancer", "ingress") or []
                if isinstance(i, dict) and i.get("ip")]

    # --- reconcile (the controllers' thread)
    def reconcile(self) -> None:
        desired: dict[tuple[str, str], int] = {}
        if self.enabled:
            for chart in self._charts(CHART):
                meta = chart["metadata"]
                key = f"{meta['namespace']}/{meta['name']}"
                target = self._target(chart)
                values = self.ctl.helm_values(chart)
                port = _dig(values, "service", "port")
                port = port if isinstance(port, int) and not isinstance(port, bool) else 53
                svc = self.ctl.get_of("", "v1", "services", target, meta["name"])
                if svc is None or (svc["metadata"].get("labels") or {}).get(INSTANCE_LABEL) != meta["name"]:
                    continue
                for ip in self._lb_ips(target, meta["name"]):
                    if self.ctl.announced.get(ip) == f"{target}/{meta['name']}":
                        desired[(ip, key)] = port
        for current, gateway in list(self.gateways.items()):
            if desired.get(current) != gateway.port:
                gateway.stop()
                del self.gateways[current]
                self.ctl.log.info(f"k8s-gateway (stand-in): {gateway.chart_key} stopped answering on {gateway.ip}")
        for (ip, key), port in desired.items():
            if (ip, key) in self.gateways:
                continue
            gateway = Gateway(self, ip, port, key)
            try:
                gateway.start()
            except OSError as exc:
                if (ip, key) not in self._failed:
                    self._failed.add((ip, key))
                    self.ctl.log.error(f"k8s-gateway (stand-in): cannot listen for {key} on {ip}:{port}: {exc}")
                continue
            self._failed.discard((ip, key))
            self.gateways[(ip, key)] = gateway

    def stop(self) -> None:
        for gateway in self.gateways.values():
            gateway.stop()
        self.gateways.clear()

    # --- records (the listeners' threads, per query)
    def zone(self, chart_key: str, own_ip: str) -> Zone | None:
        namespace, _, name = chart_key.partition("/")
        chart = self.ctl.get_of("helm.cattle.io", "v1", "helmcharts", namespace, name)
        if chart is None:
            return None
        values = self.ctl.helm_values(chart)
        domains = str(values.get("domain") or "").split()
        if not domains:
            return None
        ttl = values.get("ttl")
        ttl = ttl if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl >= 0 else 300
        apex = str(values.get("apex") or f"{name}.{self._target(chart)}")
        watched = {str(w) for w in values.get("watchedResources") or []}
        zone = Zone(domains, apex, ttl, own_ip, {})
        hosts: dict[str, list[str]] = {}

        def add(host: str, ips: list[str]) -> None:
            host = host.lower().rstrip(".")
            if ips and zone.zone_of(host) is not None:
                hosts.setdefault(host, [])
                hosts[host].extend(ip for ip in ips if ip not in hosts[host])

        if not watched or "Ingress" in watched:
            for ing in self.ctl.list_of("networking.k8s.io", "v1", "ingresses"):
                if ing["metadata"].get("deletionTimestamp"):
                    continue
                ips = [str(i["ip"]) for i in _dig(ing, "status", "loadBalancer", "ingress") or []
                       if isinstance(i, dict) and i.get("ip")] or self._published(ing)
                for rule in (ing.get("spec") or {}).get("rules") or []:
                    if rule.get("host") and not str(rule["host"]).startswith("*"):
                        add(str(rule["host"]), ips)
        if not watched or "Service" in watched:
            for svc in self.ctl.list_of("", "v1", "services"):
                meta = svc["metadata"]
                ips = self._lb_ips(meta["namespace"], meta["name"])
                for domain in zone.zones:
                    add(f"{meta['name']}.{meta['namespace']}.{domain}", ips)
                annotated = (meta.get("annotations") or {}).get(HOSTNAME_ANNOTATION)
                if annotated:
                    add(str(annotated), ips)
        zone.hosts = hosts
        return zone

    def _published(self, ing: JSONObj) -> list[str]:
        """What the ingress controller would publish in the Ingress status: its Service's LoadBalancer IPs."""
        from .controllers import _chart_name

        spec = ing.get("spec") or {}
        cls = spec.get("ingressClassName") or (ing["metadata"].get("annotations") or {}).get(
            "kubernetes.io/ingress.class")
        index = load_index(self.ctl.env)
        out: list[str] = []
        for chart in self.ctl.list_of("helm.cattle.io", "v1", "helmcharts"):
            traits = index.get(_chart_name(chart.get("spec") or {}))
            if traits is None or chart["metadata"].get("deletionTimestamp"):
                continue
            if cls not in (None, "", str(traits.get("ingress_class") or ""), chart["metadata"]["name"]):
                continue
            out.extend(self._lb_ips(self._target(chart), chart["metadata"]["name"]))
        return out

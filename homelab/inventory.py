"""The inventory: every fact of the homelab as typed, frozen data, checked as a whole.

`load(path)` reads inventory/homelab.yaml, refuses unknown and duplicate keys, and runs the
whole-inventory checks below. Any problem raises InventoryInvalid with one line per problem,
naming the field path(s), their lines, and the values in conflict.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from homelab import yamlpos
from homelab.errors import InventoryInvalid

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "inventory" / "homelab.yaml"
ENV_VAR = "HOMELAB_INVENTORY"

DnsLabel = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
DnsName = Annotated[str, StringConstraints(pattern=r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")]
# PVE's SDN ids: a letter, then letters or digits, at most 8 (pve-network's schema).
SdnId = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z][a-zA-Z0-9]*[a-zA-Z0-9]$", max_length=8)]
VmId = Annotated[int, Field(strict=True, ge=100, le=999_999_999)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PveNode(Model):
    name: DnsLabel
    address: IPv4Address


class Ceph(Model):
    pool: Annotated[str, StringConstraints(pattern=r"^[^:/\s]+$")]
    application: Literal["rbd", "cephfs", "rgw"]
    size: Annotated[int, Field(strict=True, ge=1, le=7)]
    min_size: Annotated[int, Field(strict=True, ge=1, le=7)]
    pg_autoscale_mode: Literal["on", "off", "warn"]
    storage: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9\-_.]*[a-z0-9]$")]


class SdnZone(Model):
    name: SdnId
    type: Literal["vxlan"]
    mtu: Annotated[int, Field(strict=True, ge=576, le=65520)]


class SdnVnet(Model):
    name: SdnId
    tag: Annotated[int, Field(strict=True, ge=1, le=16_777_215)]


class SdnSubnet(Model):
    cidr: IPv4Network
    gateway: IPv4Address


class Sdn(Model):
    zone: SdnZone
    vnet: SdnVnet
    subnet: SdnSubnet


class CloudImage(Model):
    url: Annotated[str, StringConstraints(pattern=r"^https?://\S+$")]
    filename: Annotated[str, StringConstraints(pattern=r"^[\w.+-]+\.(qcow2|raw|img)$")]
    storage: str
    checksum: Annotated[str, StringConstraints(pattern=r"^(sha256|sha512):[0-9a-f]+$")] | None = None


class Template(Model):
    name: DnsLabel
    vmid: VmId
    node: DnsLabel
    image: CloudImage


class Proxmox(Model):
    cluster: DnsLabel
    api_port: Annotated[int, Field(strict=True, ge=1, le=65535)]
    nodes: Annotated[list[PveNode], Field(min_length=1)]
    ceph: Ceph
    sdn: Sdn
    template: Template


class Network(Model):
    home: IPv4Network
    gateway: IPv4Address
    nameservers: Annotated[list[IPv4Address], Field(min_length=1)]
    bridge: Annotated[str, StringConstraints(pattern=r"^[a-zA-Z][a-zA-Z0-9_.-]{0,14}$")]
    pod_cidr: IPv4Network
    service_cidr: IPv4Network
    cluster_dns: IPv4Address
    metallb_pool: Annotated[list[str], Field(min_length=1)]
    traefik: IPv4Address
    # The internal domain's DNS server (k8s-gateway), a LoadBalancer address from the pool.
    internal_dns: IPv4Address
    # The ClusterIssuer the wildcard certificates come from (staging while trying things out).
    cert_issuer: Literal["letsencrypt-production", "letsencrypt-staging"] = "letsencrypt-production"

    @field_validator("metallb_pool")
    @classmethod
    def _ranges(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_range(item)
        return value

    def pool_ranges(self) -> list[tuple[IPv4Address, IPv4Address]]:
        return [parse_range(item) for item in self.metallb_pool]

    def pool_addresses(self) -> Iterator[IPv4Address]:
        for first, last in self.pool_ranges():
            for n in range(int(first), int(last) + 1):
                yield IPv4Address(n)


def parse_range(text: str) -> tuple[IPv4Address, IPv4Address]:
    """MetalLB's address forms: A.B.C.D-E.F.G.H, a CIDR, or one address."""
    try:
        if "-" in text:
            first, last = (IPv4Address(p.strip()) for p in text.split("-", 1))
        elif "/" in text:
            net = IPv4Network(text, strict=True)
            first, last = net[0], net[-1]
        else:
            first = last = IPv4Address(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an address range ({exc})") from None
    if first > last:
        raise ValueError(f"range {text!r} ends before it starts")
    return first, last


class Vm(Model):
    name: DnsLabel
    role: Literal["server", "agent"]
    vmid: VmId
    address: IPv4Address
    cores: Annotated[int, Field(strict=True, ge=1, le=512)]
    memory_mib: Annotated[int, Field(strict=True, ge=512)]
    disk_gib: Annotated[int, Field(strict=True, ge=8)]
    pve_node: DnsLabel


class K3s(Model):
    version: Annotated[str, StringConstraints(pattern=r"^v\d+\.\d+\.\d+\+k3s\d+$")]
    user: DnsLabel
    ssh_public_key: str
    search_domain: DnsName
    vms: Annotated[list[Vm], Field(min_length=1)]

    @property
    def servers(self) -> list[Vm]:
        return [vm for vm in self.vms if vm.role == "server"]


class Domain(Model):
    name: DnsName
    access: Literal["cloudflare-tunnel", "tailscale"]


class Domains(Model):
    public: Domain
    internal: Domain


class App(Model):
    name: DnsLabel
    group: Literal["infrastructure", "monitoring", "apps"]
    namespace: DnsLabel
    access: Literal["public", "internal", "loadbalancer", "cluster"]
    hostname: DnsName | None = None


Url = Annotated[str, StringConstraints(pattern=r"^https?://\S+$")]
HttpsUrl = Annotated[str, StringConstraints(pattern=r"^https://\S+$")]


class Cloudflare(Model):
    # The Cloudflare Tunnel's name in the account (the account id and API token come from the environment).
    tunnel: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
    # Where cloudflared sends the public apps' requests: Traefik's in-cluster Service.
    origin: HttpsUrl


class Tailscale(Model):
    tailnet: Annotated[str, StringConstraints(pattern=r"^(-|[A-Za-z0-9.@_-]+)$")]
    connector: DnsLabel
    tags: Annotated[list[Annotated[str, StringConstraints(pattern=r"^tag:[A-Za-z0-9-]+$")]], Field(min_length=1)]


class Access(Model):
    cloudflare: Cloudflare
    tailscale: Tailscale


class Gitops(Model):
    repo_url: HttpsUrl
    revision: Annotated[str, StringConstraints(pattern=r"^[\w./-]+$")]
    path: Annotated[str, StringConstraints(pattern=r"^[\w-]+(/[\w-]+)*$")]


class Target(Model):
    description: str
    image_mirror: Url | None = None
    k3s_release_url: Url
    # Releases the target's mirror offers besides the inventory's own version (the lab's, for upgrades).
    k3s_versions: list[Annotated[str, StringConstraints(pattern=r"^v\d+\.\d+\.\d+\+k3s\d+$")]] = []
    # The outside world's endpoints: Cloudflare's and Tailscale's APIs, the resolver the public uses,
    # and the resolver a tailnet client uses (MagicDNS, which applies split DNS).
    cloudflare_api: HttpsUrl = "https://api.cloudflare.com/client/v4"
    tailscale_api: HttpsUrl = "https://api.tailscale.com"
    public_resolver: IPv4Address = IPv4Address("1.1.1.1")
    tailnet_resolver: IPv4Address = IPv4Address("100.100.100.100")


class Targets(Model):
    live: Target
    lab: Target


class Inventory(Model):
    proxmox: Proxmox
    network: Network
    k3s: K3s
    domains: Domains
    access: Access
    gitops: Gitops
    apps: list[App]
    targets: Targets

    def vm(self, name: str) -> Vm:
        for vm in self.k3s.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)

    def pve_node(self, name: str) -> PveNode:
        for node in self.proxmox.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Problem:
    """One contradiction: the paths involved and what is wrong, in words."""

    paths: tuple[str, ...]
    message: str


def _hosts(inv: Inventory) -> list[tuple[str, str, IPv4Address]]:
    """(path, label, address) of every address a machine holds."""
    out = [(f"proxmox.nodes[{i}].address", n.name, n.address) for i, n in enumerate(inv.proxmox.nodes)]
    out += [(f"k3s.vms[{i}].address", v.name, v.address) for i, v in enumerate(inv.k3s.vms)]
    out.append(("network.gateway", "gateway", inv.network.gateway))
    return out


def _dupes(items: Sequence[tuple[str, object]], what: str) -> Iterator[Problem]:
    seen: dict[object, str] = {}
    for path, value in items:
        if value in seen:
            yield Problem((seen[value], path), f"{what} {value} is used twice: {seen[value]} and {path}")
        else:
            seen[value] = path


def check(inv: Inventory) -> list[Problem]:  # noqa: PLR0912, PLR0915 - one flat list of rules reads best
    """Every whole-inventory rule; an empty list means the inventory is consistent."""
    net = inv.network
    problems: list[Problem] = []
    add = problems.append
    hosts = _hosts(inv)

    # Addresses inside the home subnet.
    # Nameservers may be anywhere (a public resolver is fine); machines and Traefik are at home.
    placed = [*hosts, ("network.traefik", "traefik", net.traefik)]
    for path, label, addr in placed:
        if addr not in net.home:
            add(Problem((path, "network.home"), f"{label} address {addr} is outside the home network {net.home}"))
    for i, (first, last) in enumerate(net.pool_ranges()):
        if first not in net.home or last not in net.home:
            add(Problem((f"network.metallb_pool[{i}]", "network.home"),
                        f"MetalLB pool range {first}-{last} is not inside the home network {net.home}"))
    for i, (first, last) in enumerate(net.pool_ranges()):
        for special in (net.home.network_address, net.home.broadcast_address):
            if first <= special <= last:
                add(Problem((f"network.metallb_pool[{i}]", "network.home"),
                            f"MetalLB pool range {first}-{last} contains {special}, the network or broadcast "
                            f"address of {net.home}"))
    for path, label, addr in hosts:
        if addr in (net.home.network_address, net.home.broadcast_address):
            add(Problem((path,), f"{label} address {addr} is the network or broadcast address of {net.home}"))

    # No address held twice.
    problems += _dupes([(p, a) for p, _, a in hosts], "address")

    # The pool is free of host addresses, and its ranges do not overlap.
    pool = net.pool_ranges()
    host_addrs = {addr for _, _, addr in hosts}
    resolvers = [(f"network.nameservers[{k}]", "nameserver", a) for k, a in enumerate(net.nameservers)
                 if a not in host_addrs]
    for i, (first, last) in enumerate(pool):
        for path, label, addr in [*hosts, *resolvers]:
            if first <= addr <= last:
                add(Problem((f"network.metallb_pool[{i}]", path),
                            f"MetalLB pool {first}-{last} contains {addr}, the address of {label} ({path})"))
        for j in range(i):
            other_first, other_last = pool[j]
            if first <= other_last and other_first <= last:
                add(Problem((f"network.metallb_pool[{j}]", f"network.metallb_pool[{i}]"),
                            f"MetalLB pool ranges {other_first}-{other_last} and {first}-{last} overlap"))

    # Traefik's and the internal DNS's addresses come from the pool, one each.
    for path, label, addr in (("network.traefik", "Traefik", net.traefik),
                              ("network.internal_dns", "the internal DNS", net.internal_dns)):
        if not any(first <= addr <= last for first, last in pool):
            add(Problem((path, "network.metallb_pool"),
                        f"{label}'s address {addr} is not in the MetalLB pool {', '.join(net.metallb_pool)}"))
    if net.traefik == net.internal_dns:
        add(Problem(("network.traefik", "network.internal_dns"),
                    f"Traefik and the internal DNS both have {net.traefik}; each LoadBalancer needs its own"))

    # Networks disjoint.
    nets = [("network.home", net.home), ("network.pod_cidr", net.pod_cidr),
            ("network.service_cidr", net.service_cidr), ("proxmox.sdn.subnet.cidr", inv.proxmox.sdn.subnet.cidr)]
    for i, (path_a, a) in enumerate(nets):
        for path_b, b in nets[:i]:
            if a.overlaps(b):
                add(Problem((path_b, path_a), f"networks {b} ({path_b}) and {a} ({path_a}) overlap"))
    if net.cluster_dns not in net.service_cidr:
        add(Problem(("network.cluster_dns", "network.service_cidr"),
                    f"cluster DNS {net.cluster_dns} is outside the service network {net.service_cidr}"))
    sdn = inv.proxmox.sdn.subnet
    if sdn.gateway not in sdn.cidr:
        add(Problem(("proxmox.sdn.subnet.gateway",), f"SDN gateway {sdn.gateway} is outside its subnet {sdn.cidr}"))

    # Names and VMIDs unique; references resolve.
    problems += _dupes([(f"proxmox.nodes[{i}].name", n.name) for i, n in enumerate(inv.proxmox.nodes)],
                       "PVE node name")
    problems += _dupes([(f"k3s.vms[{i}].name", v.name) for i, v in enumerate(inv.k3s.vms)]
                       + [("proxmox.template.name", inv.proxmox.template.name)], "VM name")
    problems += _dupes([(f"k3s.vms[{i}].vmid", v.vmid) for i, v in enumerate(inv.k3s.vms)]
                       + [("proxmox.template.vmid", inv.proxmox.template.vmid)], "VMID")
    problems += _dupes([(f"apps[{i}].name", a.name) for i, a in enumerate(inv.apps)], "app name")
    problems += _dupes([(f"apps[{i}].hostname", a.hostname) for i, a in enumerate(inv.apps) if a.hostname],
                       "hostname")
    node_names = {n.name for n in inv.proxmox.nodes}
    for i, vm in enumerate(inv.k3s.vms):
        if vm.pve_node not in node_names:
            add(Problem((f"k3s.vms[{i}].pve_node", "proxmox.nodes"),
                        f"VM {vm.name} is placed on {vm.pve_node!r}, which is not a PVE node "
                        f"({', '.join(sorted(node_names))})"))
    if inv.proxmox.template.node not in node_names:
        add(Problem(("proxmox.template.node", "proxmox.nodes"),
                    f"template node {inv.proxmox.template.node!r} is not a PVE node"))
    if not inv.k3s.servers:
        add(Problem(("k3s.vms",), "no VM has role server: K3s needs a control plane"))
    ceph = inv.proxmox.ceph
    if ceph.min_size > ceph.size:
        add(Problem(("proxmox.ceph.min_size", "proxmox.ceph.size"),
                    f"Ceph min_size {ceph.min_size} is larger than size {ceph.size}"))
    if ceph.size > len(inv.proxmox.nodes):
        add(Problem(("proxmox.ceph.size", "proxmox.nodes"),
                    f"Ceph size {ceph.size} needs more hosts than the {len(inv.proxmox.nodes)} PVE nodes"))

    # Hostnames under the configured domains, each with its access path.
    public, internal = inv.domains.public.name, inv.domains.internal.name
    if public == internal:
        add(Problem(("domains.public.name", "domains.internal.name"),
                    f"the public and internal domains are both {public}"))
    if not _under(inv.k3s.search_domain, public) and not _under(inv.k3s.search_domain, internal):
        add(Problem(("k3s.search_domain",), f"search domain {inv.k3s.search_domain} is under neither {public} "
                                            f"nor {internal}"))
    for i, app in enumerate(inv.apps):
        path = f"apps[{i}]"
        if app.access in ("public", "internal") and not app.hostname:
            add(Problem((f"{path}.hostname",), f"{app.name} has access {app.access} but no hostname"))
        if app.access in ("cluster", "loadbalancer") and app.hostname:
            add(Problem((f"{path}.hostname", f"{path}.access"),
                        f"{app.name} has hostname {app.hostname} but access {app.access} publishes no name"))
        if not app.hostname:
            continue
        in_internal = _under(app.hostname, internal)
        if app.access == "public" and (in_internal or not _under(app.hostname, public)):
            add(Problem((f"{path}.hostname", "domains.public.name"),
                        f"public app {app.name}: hostname {app.hostname} is not under the public domain {public}"
                        + (f" (it is internal, under {internal})" if in_internal else "")))
        if app.access == "internal" and not in_internal:
            add(Problem((f"{path}.hostname", "domains.internal.name"),
                        f"internal app {app.name}: hostname {app.hostname} is not under the internal domain "
                        f"{internal}"))
    return problems


def _under(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)


# ---------------------------------------------------------------------------- loading


def default_path() -> Path:
    """HOMELAB_INVENTORY if set, else the repository's inventory/homelab.yaml."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)


def _path_text(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _parse_path(text: str) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    for piece in text.replace("]", "").split("."):
        name, *indexes = piece.split("[")
        parts.append(name)
        parts += [int(i) for i in indexes]
    return tuple(parts)


def parse(text: str, source: str = "<inventory>") -> Inventory:
    """Parse and check inventory text; raise InventoryInvalid listing every problem."""
    try:
        doc = yamlpos.load(text)
    except yamlpos.YamlProblem as exc:
        where = f":{exc.line}:{exc.column}" if exc.line is not None else ""
        raise InventoryInvalid(source, [f"{source}{where}: {exc.message}"]) from None
    if not isinstance(doc.data, dict):
        raise InventoryInvalid(source, [f"{source}: the inventory must be a mapping, not {type(doc.data).__name__}"])

    def at(path: tuple[str | int, ...]) -> str:
        line = doc.line_of(path)
        return f"{source}:{line}" if line else source

    try:
        inv = Inventory.model_validate(doc.data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "lax-"))))
            shown = "" if err["type"] == "missing" else f" (got {err['input']!r})"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{at(loc)}: {_path_text(loc)}: {msg}{shown}")
        raise InventoryInvalid(source, lines) from None
    problems = check(inv)
    if problems:
        raise InventoryInvalid(source, [f"{at(_parse_path(p.paths[0]))}: {', '.join(p.paths)}: {p.message}"
                                        for p in problems])
    return inv


def load(path: Path | str | None = None) -> Inventory:
    """Read, parse and check the inventory file (default: default_path())."""
    path = Path(path) if path is not None else default_path()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise InventoryInvalid(str(path), [f"{path}: cannot read the inventory: {reason}"]) from None
    return parse(text, str(path))


def summary(inv: Inventory) -> list[str]:
    """A one-screen description of a valid inventory."""
    net = inv.network
    lines = [
        f"Proxmox cluster {inv.proxmox.cluster}: "
        + ", ".join(f"{n.name} {n.address}" for n in inv.proxmox.nodes),
        f"  Ceph pool {inv.proxmox.ceph.pool} ({inv.proxmox.ceph.application}, size {inv.proxmox.ceph.size}/"
        f"{inv.proxmox.ceph.min_size}) as storage {inv.proxmox.ceph.storage}",
        f"  SDN {inv.proxmox.sdn.zone.type} zone {inv.proxmox.sdn.zone.name}, vnet {inv.proxmox.sdn.vnet.name} "
        f"(tag {inv.proxmox.sdn.vnet.tag}), subnet {inv.proxmox.sdn.subnet.cidr}",
        f"  template {inv.proxmox.template.name} ({inv.proxmox.template.vmid}) on {inv.proxmox.template.node}",
        f"K3s {inv.k3s.version}:",
    ]
    for vm in inv.k3s.vms:
        lines.append(f"  {vm.name:<10} {vm.role:<6} {vm.address!s:<15} {vm.cores} vCPU, "
                     f"{vm.memory_mib // 1024} GiB, {vm.disk_gib} GiB disk, VM {vm.vmid} on {vm.pve_node}")
    lines += [
        f"Networks: home {net.home} (gateway {net.gateway}), pods {net.pod_cidr}, services {net.service_cidr}",
        f"  MetalLB pool {', '.join(net.metallb_pool)}, Traefik at {net.traefik}",
        f"Domains: public {inv.domains.public.name} ({inv.domains.public.access}), "
        f"internal {inv.domains.internal.name} ({inv.domains.internal.access})",
        f"Apps ({len(inv.apps)}):",
    ]
    for app in inv.apps:
        lines.append(f"  {app.name:<13} {app.namespace:<15} {app.access:<12} {app.hostname or ''}".rstrip())
    return lines


def address_in(addr: str, network: str) -> bool:
    """True if addr lies in network (helper for callers that hold strings)."""
    return ipaddress.ip_address(addr) in ipaddress.ip_network(network)

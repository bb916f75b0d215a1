"""The inventory: the shipped file holds the seed and is consistent; every rule rejects what it must.

Invalid inventories are built by mutating the parsed shipped file, so each case breaks exactly the
rule it names, and each asserts that one problem line names the field path, the value in conflict
and the rule (so the case fails if that rule were removed, even when a neighbouring rule also fires).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from homelab import inventory
from homelab.errors import InventoryInvalid

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "inventory" / "homelab.yaml"
SHIPPED_TEXT = SHIPPED.read_text(encoding="utf-8")
BASE: dict[str, Any] = yaml.safe_load(SHIPPED_TEXT)
APP = {app["name"]: i for i, app in enumerate(BASE["apps"])}

# The seed's two literal MetalLB pools (architecture-overview.md: the diagram, the CIDR table).
DIAGRAM_POOL = "[192.168.7.230-192.168.7.235]"
TABLE_POOL = "[192.168.7.224/29]"
POOL_LINE = re.compile(r"^(\s*metallb_pool:\s*)\[[^\]]*\]", re.MULTILINE)

Doc = dict[str, Any]
Mutation = Callable[[Doc], None]


# --------------------------------------------------------------------------- helpers


def _keys(path: str) -> list[str | int]:
    """'k3s.vms[1].address' -> ['k3s', 'vms', 1, 'address'] (the form problem lines use)."""
    keys: list[str | int] = []
    for piece in path.split("."):
        name, *indexes = piece.replace("]", "").split("[")
        keys.append(name)
        keys += [int(i) for i in indexes]
    return keys


def _parent(doc: Doc, path: str) -> tuple[Any, str | int]:
    *head, last = _keys(path)
    node: Any = doc
    for key in head:
        node = node[key]
    return node, last


def setting(path: str, value: Any) -> Mutation:
    def mutate(doc: Doc) -> None:
        node, key = _parent(doc, path)
        node[key] = value
    return mutate


def removing(path: str) -> Mutation:
    def mutate(doc: Doc) -> None:
        node, key = _parent(doc, path)
        del node[key]
    return mutate


def renaming(path: str, new_key: str) -> Mutation:
    def mutate(doc: Doc) -> None:
        node, key = _parent(doc, path)
        node[new_key] = node.pop(key)
    return mutate


def all_of(*mutations: Mutation) -> Mutation:
    def mutate(doc: Doc) -> None:
        for m in mutations:
            m(doc)
    return mutate


def mutated(mutation: Mutation) -> str:
    doc = copy.deepcopy(BASE)
    mutation(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def problems_of(text: str, source: str = "case.yaml") -> list[str]:
    """The problem lines parse() reports; fails the test if the text is accepted."""
    with pytest.raises(InventoryInvalid) as info:
        inventory.parse(text, source)
    assert info.value.source == source
    assert info.value.problems, "InventoryInvalid without problem lines"
    assert str(info.value).startswith(f"{source}: {len(info.value.problems)} problem(s)\n")
    return info.value.problems


def line_with(problems: list[str], *fragments: str) -> str:
    """The one problem line that holds every fragment (the path, the value, the rule's words)."""
    hits = [p for p in problems if all(f in p for f in fragments)]
    assert hits, f"no problem line holds all of {fragments!r}; got:\n" + "\n".join(problems)
    return hits[0]


def with_pool(pool: str) -> str:
    """The shipped file, comments and all, with another metallb_pool value."""
    text, n = POOL_LINE.subn(lambda m: m.group(1) + pool, SHIPPED_TEXT)
    assert n == 1
    return text


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def line_no(text: str, needle: str) -> int:
    """1-based number of the first line that contains needle."""
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in the text")


# ------------------------------------------------------------------- 1. the shipped file


@pytest.fixture(scope="module")
def shipped() -> inventory.Inventory:
    return inventory.load(SHIPPED)


def test_shipped_inventory_loads_and_is_consistent(shipped: inventory.Inventory) -> None:
    assert inventory.check(shipped) == []
    assert inventory.parse(SHIPPED_TEXT, "shipped.yaml") == shipped


def test_default_path_is_the_shipped_file_unless_the_env_var_says_otherwise(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(inventory.ENV_VAR, raising=False)
    assert inventory.default_path() == SHIPPED
    other = tmp_path / "other.yaml"
    other.write_text(with_pool(DIAGRAM_POOL), encoding="utf-8")
    monkeypatch.setenv(inventory.ENV_VAR, str(other))
    assert inventory.default_path() == other
    with pytest.raises(InventoryInvalid) as info:
        inventory.load()
    assert info.value.source == str(other)


def test_seed_proxmox(shipped: inventory.Inventory) -> None:
    assert [(n.name, str(n.address)) for n in shipped.proxmox.nodes] == [
        ("pve-alpha", "192.168.7.233"), ("pve-beta", "192.168.7.234"), ("pve-gamma", "192.168.7.235")]
    assert (shipped.proxmox.ceph.pool, shipped.proxmox.ceph.application) == ("kubernetes", "rbd")
    assert shipped.proxmox.sdn.zone.type == "vxlan"


@pytest.mark.parametrize(("name", "address", "role", "cores"), [
    ("ichigo", "192.168.7.223", "server", 8),
    ("naruto", "192.168.7.224", "agent", 8),
    ("tanjiro", "192.168.7.225", "agent", 4),
])
def test_seed_vms(shipped: inventory.Inventory, name: str, address: str, role: str, cores: int) -> None:
    vm = shipped.vm(name)
    assert (str(vm.address), vm.role, vm.cores, vm.memory_mib, vm.disk_gib) == (address, role, cores, 16384, 128)
    assert vm.pve_node in {n.name for n in shipped.proxmox.nodes}


def test_seed_networks_and_domains(shipped: inventory.Inventory) -> None:
    net = shipped.network
    assert net.home == IPv4Network("192.168.7.0/24")
    assert net.pod_cidr == IPv4Network("10.42.0.0/16")
    assert net.service_cidr == IPv4Network("10.43.0.0/16")
    assert net.traefik == IPv4Address("192.168.7.230")
    assert net.traefik in set(net.pool_addresses())
    assert [s.name for s in shipped.k3s.servers] == ["ichigo"]
    assert (shipped.domains.public.name, shipped.domains.internal.name) == ("jigga.xyz", "int.jigga.xyz")
    assert (shipped.domains.public.access, shipped.domains.internal.access) == ("cloudflare-tunnel", "tailscale")


@pytest.mark.parametrize(("name", "namespace", "access", "hostname"), [
    ("argocd", "argocd", "internal", "argocd.int.jigga.xyz"),
    ("grafana", "monitoring", "internal", "grafana.int.jigga.xyz"),
    ("vaultwarden", "vaultwarden", "public", "passwords.jigga.xyz"),
    ("homepage", "web", "public", "jigga.xyz"),
    ("vault", "vault", "internal", None),
    ("prometheus", "monitoring", None, None),
    ("loki", "monitoring", None, None),
    ("alertmanager", "monitoring", None, None),
    ("cert-manager", "cert-manager", None, None),
    ("metallb", "metallb-system", None, None),
    ("traefik", "kube-system", "loadbalancer", None),
])
def test_seed_apps(shipped: inventory.Inventory, name: str, namespace: str, access: str | None,
                   hostname: str | None) -> None:
    apps = {a.name: a for a in shipped.apps}
    app = apps[name]
    assert app.namespace == namespace
    if access:
        assert app.access == access
    else:  # the seed says "Internal" without a name: not exposed to the public side
        assert app.access in ("cluster", "internal")
    if hostname:
        assert app.hostname == hostname
    if app.access == "internal":
        assert app.hostname and app.hostname.endswith(".int.jigga.xyz")


def test_models_are_frozen(shipped: inventory.Inventory) -> None:
    with pytest.raises(ValidationError, match="frozen"):
        shipped.k3s.vms[0].cores = 2  # type: ignore[misc]


def test_summary_shows_the_seed(shipped: inventory.Inventory) -> None:
    text = "\n".join(inventory.summary(shipped))
    for fragment in ("pve-alpha 192.168.7.233", "ichigo", "192.168.7.223", "Traefik at 192.168.7.230",
                     "pods 10.42.0.0/16", "services 10.43.0.0/16", "passwords.jigga.xyz", "Ceph pool kubernetes"):
        assert fragment in text


# ------------------------------------------------------------- 2. the seed's two pools


SEED_POOLS = [
    pytest.param(DIAGRAM_POOL, [("pve-alpha", "192.168.7.233", "proxmox.nodes[0].address"),
                                ("pve-beta", "192.168.7.234", "proxmox.nodes[1].address"),
                                ("pve-gamma", "192.168.7.235", "proxmox.nodes[2].address")], id="diagram"),
    pytest.param(TABLE_POOL, [("naruto", "192.168.7.224", "k3s.vms[1].address"),
                              ("tanjiro", "192.168.7.225", "k3s.vms[2].address")], id="cidr-table"),
]


@pytest.mark.parametrize(("pool", "collisions"), SEED_POOLS)
def test_seed_pools_are_rejected_naming_every_collision(pool: str, collisions: list[tuple[str, str, str]]) -> None:
    text = with_pool(pool)
    problems = problems_of(text)
    assert len(problems) == len(collisions), "\n".join(problems)
    pool_line = line_no(text, "metallb_pool:")
    for name, address, path in collisions:
        line = line_with(problems, "network.metallb_pool[0]", path, f"contains {address}", name)
        assert line.startswith(f"case.yaml:{pool_line}: ")
    # Each line names one collision; the addresses the seed agrees on are not blamed.
    for other in ("ichigo", "192.168.7.223", "gateway"):
        assert not any(other in p for p in problems)


def test_shipped_pool_is_where_the_seed_pools_agree(shipped: inventory.Inventory) -> None:
    """The resolution keeps Traefik's .230 and only addresses both seed pools contain."""
    def addresses(first: IPv4Address, last: IPv4Address) -> set[IPv4Address]:
        return {IPv4Address(n) for n in range(int(first), int(last) + 1)}

    both = (addresses(*inventory.parse_range(DIAGRAM_POOL.strip("[]")))
            & addresses(*inventory.parse_range(TABLE_POOL.strip("[]"))))
    assert shipped.network.traefik in set(shipped.network.pool_addresses()) <= both


# ------------------------------------------------------- 3. one broken rule per case


CASES: list[Any] = [
    # Addresses inside the home subnet, never its network or broadcast address.
    ("vm-outside-home", setting("k3s.vms[1].address", "192.168.8.224"),
     ("k3s.vms[1].address", "192.168.8.224", "outside the home network 192.168.7.0/24")),
    ("pve-node-outside-home", setting("proxmox.nodes[2].address", "10.0.0.235"),
     ("proxmox.nodes[2].address", "10.0.0.235", "outside the home network")),
    ("gateway-outside-home", setting("network.gateway", "192.168.8.1"),
     ("network.gateway", "192.168.8.1", "outside the home network")),
    ("traefik-outside-home", all_of(setting("network.traefik", "10.0.0.230"),
                                    setting("network.metallb_pool", ["10.0.0.230-10.0.0.231"])),
     ("network.traefik", "10.0.0.230", "outside the home network")),
    ("pool-range-outside-home", setting("network.metallb_pool", ["192.168.7.230-192.168.7.231",
                                                                 "192.168.8.10-192.168.8.20"]),
     ("network.metallb_pool[1]", "192.168.8.10-192.168.8.20", "not inside the home network")),
    ("pool-range-straddles-home", setting("network.metallb_pool", ["192.168.7.230-192.168.8.5"]),
     ("network.metallb_pool[0]", "192.168.7.230-192.168.8.5", "not inside the home network")),
    ("network-address-as-host", setting("k3s.vms[0].address", "192.168.7.0"),
     ("k3s.vms[0].address", "192.168.7.0", "network or broadcast address")),
    ("broadcast-address-as-host", setting("proxmox.nodes[0].address", "192.168.7.255"),
     ("proxmox.nodes[0].address", "192.168.7.255", "network or broadcast address")),
    # No address held twice.
    ("address-vm-vs-pve-node", setting("k3s.vms[2].address", "192.168.7.235"),
     ("address 192.168.7.235 is used twice", "proxmox.nodes[2].address", "k3s.vms[2].address")),
    ("address-vm-vs-gateway", setting("k3s.vms[0].address", "192.168.7.1"),
     ("address 192.168.7.1 is used twice", "k3s.vms[0].address", "network.gateway")),
    ("address-vm-vs-vm", setting("k3s.vms[2].address", "192.168.7.224"),
     ("address 192.168.7.224 is used twice", "k3s.vms[1].address", "k3s.vms[2].address")),
    # The pool: free of hosts, ranges disjoint and well formed, Traefik inside it.
    ("pool-contains-gateway", setting("network.metallb_pool", ["192.168.7.230-192.168.7.231", "192.168.7.1"]),
     ("network.metallb_pool[1]", "network.gateway", "contains 192.168.7.1")),
    ("pool-contains-server", setting("network.metallb_pool", ["192.168.7.223-192.168.7.231"]),
     ("network.metallb_pool[0]", "k3s.vms[0].address", "contains 192.168.7.223", "ichigo")),
    ("pool-ranges-overlap", setting("network.metallb_pool", ["192.168.7.230-192.168.7.231",
                                                             "192.168.7.231-192.168.7.232"]),
     ("network.metallb_pool[0], network.metallb_pool[1]",
      "192.168.7.230-192.168.7.231 and 192.168.7.231-192.168.7.232 overlap")),
    ("pool-range-reversed", setting("network.metallb_pool", ["192.168.7.231-192.168.7.230"]),
     ("network.metallb_pool", "192.168.7.231-192.168.7.230", "ends before it starts")),
    ("pool-range-not-an-address", setting("network.metallb_pool", ["192.168.7.300"]),
     ("network.metallb_pool", "192.168.7.300", "not an address range")),
    ("traefik-outside-pool", setting("network.traefik", "192.168.7.240"),
     ("network.traefik", "192.168.7.240", "not in the MetalLB pool 192.168.7.230-192.168.7.231")),
    ("internal-dns-outside-pool", setting("network.internal_dns", "192.168.7.240"),
     ("network.internal_dns", "192.168.7.240", "internal DNS", "not in the MetalLB pool")),
    ("internal-dns-is-traefik", setting("network.internal_dns", "192.168.7.230"),
     ("network.traefik, network.internal_dns", "both have 192.168.7.230")),
    # Networks disjoint; cluster DNS and SDN gateway inside their networks.
    ("pod-overlaps-service", setting("network.service_cidr", "10.42.128.0/17"),
     ("10.42.0.0/16 (network.pod_cidr)", "10.42.128.0/17 (network.service_cidr)", "overlap")),
    ("pod-overlaps-home", setting("network.pod_cidr", "192.168.0.0/16"),
     ("192.168.7.0/24 (network.home)", "192.168.0.0/16 (network.pod_cidr)", "overlap")),
    ("sdn-overlaps-service", all_of(setting("proxmox.sdn.subnet.cidr", "10.43.100.0/24"),
                                    setting("proxmox.sdn.subnet.gateway", "10.43.100.1")),
     ("10.43.0.0/16 (network.service_cidr)", "10.43.100.0/24 (proxmox.sdn.subnet.cidr)", "overlap")),
    ("sdn-gateway-outside-subnet", setting("proxmox.sdn.subnet.gateway", "10.101.0.1"),
     ("proxmox.sdn.subnet.gateway", "10.101.0.1", "outside its subnet 10.100.0.0/24")),
    ("cluster-dns-outside-service", setting("network.cluster_dns", "10.42.0.10"),
     ("network.cluster_dns", "10.42.0.10", "outside the service network 10.43.0.0/16")),
    # Names and VMIDs unique; references resolve.
    ("duplicate-vm-name", setting("k3s.vms[2].name", "naruto"),
     ("VM name naruto is used twice", "k3s.vms[1].name", "k3s.vms[2].name")),
    ("vm-named-like-template", setting("k3s.vms[1].name", "debian-12-cloud"),
     ("VM name debian-12-cloud is used twice", "k3s.vms[1].name", "proxmox.template.name")),
    ("duplicate-pve-node-name", setting("proxmox.nodes[1].name", "pve-alpha"),
     ("PVE node name pve-alpha is used twice", "proxmox.nodes[0].name", "proxmox.nodes[1].name")),
    ("duplicate-vmid", setting("k3s.vms[2].vmid", 202),
     ("VMID 202 is used twice", "k3s.vms[1].vmid", "k3s.vms[2].vmid")),
    ("vmid-of-template", setting("k3s.vms[0].vmid", 9000),
     ("VMID 9000 is used twice", "k3s.vms[0].vmid", "proxmox.template.vmid")),
    ("vmid-below-100", setting("k3s.vms[0].vmid", 99),
     ("k3s.vms[0].vmid", "greater than or equal to 100", "got 99")),
    ("vm-on-unknown-node", setting("k3s.vms[2].pve_node", "pve-delta"),
     ("k3s.vms[2].pve_node", "'pve-delta'", "not a PVE node")),
    ("template-on-unknown-node", setting("proxmox.template.node", "pve-omega"),
     ("proxmox.template.node", "'pve-omega'", "not a PVE node")),
    ("no-server", setting("k3s.vms[0].role", "agent"),
     ("k3s.vms", "no VM has role server")),
    ("ceph-min-size-above-size", all_of(setting("proxmox.ceph.size", 2), setting("proxmox.ceph.min_size", 3)),
     ("proxmox.ceph.min_size", "min_size 3 is larger than size 2")),
    ("ceph-size-above-node-count", setting("proxmox.ceph.size", 4),
     ("proxmox.ceph.size", "Ceph size 4", "3 PVE nodes")),
    # Hostnames under the configured domains, each with its access path.
    ("public-app-internal-hostname", setting(f"apps[{APP['vaultwarden']}].hostname", "vw.int.jigga.xyz"),
     (f"apps[{APP['vaultwarden']}].hostname", "vw.int.jigga.xyz", "not under the public domain", "it is internal")),
    ("public-app-foreign-hostname", setting(f"apps[{APP['vaultwarden']}].hostname", "passwords.example.com"),
     (f"apps[{APP['vaultwarden']}].hostname", "passwords.example.com", "not under the public domain jigga.xyz")),
    ("internal-app-public-hostname", setting(f"apps[{APP['grafana']}].hostname", "grafana.jigga.xyz"),
     (f"apps[{APP['grafana']}].hostname", "grafana.jigga.xyz", "not under the internal domain int.jigga.xyz")),
    ("internal-app-without-hostname", removing(f"apps[{APP['argocd']}].hostname"),
     (f"apps[{APP['argocd']}].hostname", "argocd has access internal but no hostname")),
    ("cluster-app-with-hostname", setting(f"apps[{APP['prometheus']}].hostname", "prometheus.int.jigga.xyz"),
     (f"apps[{APP['prometheus']}].hostname", "prometheus.int.jigga.xyz", "access cluster publishes no name")),
    ("duplicate-hostname", setting(f"apps[{APP['vault']}].hostname", "grafana.int.jigga.xyz"),
     ("hostname grafana.int.jigga.xyz is used twice", f"apps[{APP['grafana']}].hostname",
      f"apps[{APP['vault']}].hostname")),
    ("duplicate-app-name", setting(f"apps[{APP['loki']}].name", "grafana"),
     ("app name grafana is used twice", f"apps[{APP['grafana']}].name", f"apps[{APP['loki']}].name")),
    ("public-equals-internal-domain", setting("domains.internal.name", "jigga.xyz"),
     ("domains.public.name, domains.internal.name", "both jigga.xyz")),
    ("search-domain-foreign", setting("k3s.search_domain", "example.com"),
     ("k3s.search_domain", "example.com", "under neither jigga.xyz nor int.jigga.xyz")),
    # Shape: unknown keys, types, formats, required sections.
    ("unknown-top-level-key", renaming("network", "netwrok"),
     ("case.yaml:", ": netwrok: unknown key")),
    ("unknown-nested-key", renaming("k3s.vms[0].memory_mib", "memory_mb"),
     ("k3s.vms[0].memory_mb: unknown key", "got 16384")),
    ("wrong-type-cores", setting("k3s.vms[0].cores", "eight"),
     ("k3s.vms[0].cores", "valid integer", "'eight'")),
    ("bool-is-not-an-int", setting("proxmox.ceph.size", True),
     ("proxmox.ceph.size", "valid integer", "True")),
    ("bad-address", setting("k3s.vms[1].address", "192.168.7.300"),
     ("k3s.vms[1].address", "IPv4", "'192.168.7.300'")),
    ("bad-k3s-version", setting("k3s.version", "1.33.5"),
     ("k3s.version", "should match pattern", "'1.33.5'")),
    ("sdn-zone-name-too-long", setting("proxmox.sdn.zone.name", "k3szone01"),
     ("proxmox.sdn.zone.name", "at most 8 characters", "'k3szone01'")),
    ("sdn-zone-not-vxlan", setting("proxmox.sdn.zone.type", "vlan"),
     ("proxmox.sdn.zone.type", "'vxlan'", "'vlan'")),
    ("vm-name-not-a-dns-label", setting("k3s.vms[0].name", "Ichigo_1"),
     ("k3s.vms[0].name", "should match pattern", "'Ichigo_1'")),
    ("unknown-app-access", setting(f"apps[{APP['vault']}].access", "private"),
     (f"apps[{APP['vault']}].access", "'private'")),
    ("missing-section", removing("domains"),
     ("case.yaml:", ": domains: Field required")),
    ("missing-vm-field", removing("k3s.vms[1].address"),
     ("k3s.vms[1].address: Field required",)),
    ("no-vms", setting("k3s.vms", []),
     ("k3s.vms", "at least 1 item")),
]

MISSING_RULES = [
    pytest.param("pool-contains-broadcast",
                 setting("network.metallb_pool", ["192.168.7.230-192.168.7.231", "192.168.7.255"]),
                 ("network.metallb_pool[1]", "192.168.7.255", "broadcast"),
                 id="pool-contains-broadcast"),
    pytest.param("pool-contains-nameserver",
                 setting("network.nameservers", ["192.168.7.231"]),
                 ("network.metallb_pool[0]", "network.nameservers[0]", "contains 192.168.7.231"),
                 id="pool-contains-nameserver"),
]


def test_cases_break_distinct_rules() -> None:
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)) >= 24


@pytest.mark.parametrize(("case_id", "mutation", "expected"), [*CASES, *MISSING_RULES],
                         ids=[*(case[0] for case in CASES), *(p.id for p in MISSING_RULES)])
def test_invalid_inventory_is_rejected(case_id: str, mutation: Mutation, expected: tuple[str, ...]) -> None:
    line = line_with(problems_of(mutated(mutation)), *expected)
    assert re.match(r"case\.yaml:\d+: ", line), f"{case_id}: no file:line prefix in {line!r}"


def test_problem_line_points_at_the_offending_line() -> None:
    text = SHIPPED_TEXT.replace("cores: 4", "cores: four", 1)
    problems = problems_of(text)
    assert problems == [f"case.yaml:{line_no(text, 'cores: four')}: k3s.vms[2].cores: "
                        "Input should be a valid integer (got 'four')"]


def test_every_problem_is_reported_at_once() -> None:
    text = mutated(all_of(setting("k3s.vms[2].vmid", 202), setting("network.cluster_dns", "10.42.0.10"),
                          setting("proxmox.ceph.size", 4)))
    problems = problems_of(text)
    assert len(problems) == 3
    line_with(problems, "VMID 202")
    line_with(problems, "cluster DNS 10.42.0.10")
    line_with(problems, "Ceph size 4")


# ----------------------------------------------------------------- 4. text and files


def test_duplicate_key_names_both_lines() -> None:
    first = line_no(SHIPPED_TEXT, "memory_mib: 16384")  # ichigo's
    lines = SHIPPED_TEXT.splitlines(keepends=True)
    lines.insert(first, "      memory_mib: 8192\n")
    problems = problems_of("".join(lines))
    assert problems == [f"case.yaml:{first + 1}:7: duplicate key 'memory_mib' (first on line {first})"]


def test_duplicate_top_level_key() -> None:
    text = SHIPPED_TEXT + "network:\n  home: 10.0.0.0/8\n"
    first = line_no(SHIPPED_TEXT, "network:")
    assert problems_of(text) == [f"case.yaml:{len(SHIPPED_TEXT.splitlines()) + 1}:1: duplicate key 'network' "
                                 f"(first on line {first})"]


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("proxmox:\n  cluster: homelab\n   api_port: 8006\n", "case.yaml:3:12: mapping values are not allowed",
                 id="bad-indent"),
    pytest.param("proxmox:\n\tcluster: x\n", "case.yaml:2:1: ", id="tab"),
    pytest.param("network:\n  metallb_pool: [192.168.7.230\n  traefik: 192.168.7.230\n", "case.yaml:3:10: ",
                 id="unclosed-flow-sequence"),
    pytest.param("a: 'unterminated\n", "case.yaml:2:1: ", id="unterminated-quote"),
    pytest.param("a: !!python/object:os.system x\n", "case.yaml:1:4: could not determine a constructor",
                 id="unsafe-tag"),
    pytest.param("a: 1\n<<: {b: 2}\n", "case.yaml:2:1: merge keys", id="merge-key"),
])
def test_broken_yaml_shows_line_and_column(text: str, expected: str) -> None:
    problems = problems_of(text)
    assert len(problems) == 1
    assert problems[0].startswith(expected), problems[0]


@pytest.mark.parametrize(("text", "kind"), [
    pytest.param("", "NoneType", id="empty"),
    pytest.param("# only a comment\n", "NoneType", id="comment-only"),
    pytest.param("- proxmox\n- network\n", "list", id="top-level-list"),
    pytest.param("homelab\n", "str", id="top-level-scalar"),
])
def test_not_a_mapping(text: str, kind: str) -> None:
    assert problems_of(text) == [f"case.yaml: the inventory must be a mapping, not {kind}"]


def test_control_character_is_a_problem_not_a_crash() -> None:
    assert "special characters are not allowed" in problems_of("a: \x00\n")[0]


@pytest.mark.parametrize("text", [
    pytest.param("? [a, b]\n: 1\n", id="sequence-as-key"),
    pytest.param("a: &x [*x]\n", id="alias-to-its-own-ancestor"),
    pytest.param("a: " + "[" * 3000 + "]" * 3000 + "\n", id="deep-nesting"),
])
def test_hostile_yaml_is_a_problem_not_a_crash(text: str) -> None:
    assert problems_of(text)


@pytest.mark.parametrize(("make", "reason"), [
    pytest.param(lambda d: d / "missing.yaml", "No such file or directory", id="nonexistent"),
    pytest.param(lambda d: d, "Is a directory", id="directory"),
    pytest.param(lambda d: written(d / "latin1.yaml", b"a: caf\xe9\n"), "utf-8", id="not-utf8"),
])
def test_unreadable_path(tmp_path: Path, make: Callable[[Path], Path], reason: str) -> None:
    path = make(tmp_path)
    with pytest.raises(InventoryInvalid) as info:
        inventory.load(path)
    assert info.value.source == str(path)
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{path}: cannot read the inventory: ")
    assert reason in info.value.problems[0]


# ------------------------------------------------------------------- 5. invoke check


def invoke_check(*args: str, env_inventory: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != inventory.ENV_VAR}
    if env_inventory is not None:
        env[inventory.ENV_VAR] = str(env_inventory)
    return subprocess.run([sys.executable, "-m", "invoke", "check", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def assert_clean_exit(result: subprocess.CompletedProcess[str], code: int) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output


def test_invoke_check_shipped() -> None:
    result = invoke_check("--inventory", str(SHIPPED))
    assert_clean_exit(result, 0)
    for fragment in ("pve-alpha 192.168.7.233", "ichigo", "Traefik at 192.168.7.230", "passwords.jigga.xyz",
                     f"ok: {SHIPPED} is consistent"):
        assert fragment in result.stdout


@pytest.mark.parametrize(("pool", "collisions"), SEED_POOLS)
def test_invoke_check_seed_pool(tmp_path: Path, pool: str, collisions: list[tuple[str, str, str]]) -> None:
    path = tmp_path / "seed-pool.yaml"
    path.write_text(with_pool(pool), encoding="utf-8")
    result = invoke_check("--inventory", str(path))
    assert_clean_exit(result, 2)
    assert "is consistent" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{path}:")]
    assert len(lines) == len(collisions), result.stderr
    assert f"{len(collisions)} problem(s)" in result.stderr
    for name, address, path_text in collisions:
        line_with(lines, name, address, path_text, "network.metallb_pool[0]")


@pytest.mark.parametrize(("make", "fragment"), [
    pytest.param(lambda d: d / "missing.yaml", "cannot read the inventory", id="nonexistent"),
    pytest.param(lambda d: d, "cannot read the inventory", id="directory"),
    pytest.param(lambda d: written(d / "b.yaml", b"a: [1\n"), "b.yaml:2:1:", id="broken-yaml"),
])
def test_invoke_check_unreadable(tmp_path: Path, make: Callable[[Path], Path], fragment: str) -> None:
    path = make(tmp_path)
    result = invoke_check("--inventory", str(path))
    assert_clean_exit(result, 2)
    assert fragment in result.stderr


def test_invoke_check_honours_env_var(tmp_path: Path) -> None:
    bad = tmp_path / "diagram.yaml"
    bad.write_text(with_pool(DIAGRAM_POOL), encoding="utf-8")
    result = invoke_check(env_inventory=bad)
    assert_clean_exit(result, 2)
    assert "pve-alpha" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text(SHIPPED_TEXT, encoding="utf-8")
    result = invoke_check(env_inventory=good)
    assert_clean_exit(result, 0)
    assert f"ok: {good} is consistent" in result.stdout
    # The flag wins over the environment.
    assert_clean_exit(invoke_check("--inventory", str(good), env_inventory=bad), 0)


def test_invoke_check_prints_problems_verbatim(tmp_path: Path) -> None:
    path = tmp_path / "markup.yaml"
    path.write_text(SHIPPED_TEXT + "x[/y]: 1\n", encoding="utf-8")
    result = invoke_check("--inventory", str(path))
    assert_clean_exit(result, 2)
    assert "x[/y]: unknown key" in result.stderr


def test_a_public_nameserver_is_accepted() -> None:
    data = yaml.safe_load(SHIPPED_TEXT)
    data["network"]["nameservers"] = ["192.168.7.1", "1.1.1.1"]
    inv = inventory.parse(yaml.safe_dump(data), "case.yaml")
    assert [str(a) for a in inv.network.nameservers] == ["192.168.7.1", "1.1.1.1"]

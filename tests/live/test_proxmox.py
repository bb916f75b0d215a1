"""Proxmox VE through its API (token auth, TLS verified): nodes online, quorum, Ceph, the pool and its storage,
the SDN zone and vnet applied."""

from __future__ import annotations

import re
from typing import Any

import pytest

from homelab import inventory, live
from homelab.layers import ceph, sdn

from .conftest import Live, fail_unless

pytestmark = pytest.mark.proxmox


def _status(homelab: Live) -> list[dict[str, Any]]:
    return list(homelab.pve("/cluster/status"))


def test_pve_node_online(homelab: Live, pve_node: inventory.PveNode, measured: Any) -> None:
    entry = next((e for e in _status(homelab) if e.get("type") == "node" and e.get("name") == pve_node.name), None)
    names = [str(e.get("name")) for e in _status(homelab) if e.get("type") == "node"]
    fail_unless(entry is not None, f"PVE node {pve_node.name} is not a member of the cluster (members: "
                                   f"{live.listing(names) or 'none'}); see `pvecm status` on a PVE host")
    assert entry is not None
    state = "online" if str(entry.get("online")) == "1" else "offline"
    measured(state)
    fail_unless(state == "online", live.mismatch(f"PVE node {pve_node.name} ({pve_node.address})", state, "online",
                                                 "`pvecm status` and the node's console", source="expected"))


def test_cluster_quorate(homelab: Live, inv: inventory.Inventory, measured: Any) -> None:
    cluster = next((e for e in _status(homelab) if e.get("type") == "cluster"), None)
    fail_unless(cluster is not None, f"PVE reports no cluster (expected {inv.proxmox.cluster}); see `pvecm status`")
    assert cluster is not None
    quorate = str(cluster.get("quorate")) == "1"
    online = sum(1 for e in _status(homelab) if e.get("type") == "node" and str(e.get("online")) == "1")
    measured(f"{'quorate' if quorate else 'no quorum'}, {online}/{cluster.get('nodes')} nodes online")
    fail_unless(quorate, f"PVE cluster {cluster.get('name')} has no quorum ({online} of {cluster.get('nodes')} "
                         "nodes online), expected quorate; /etc/pve is read-only until it is back; see `pvecm status`")
    fail_unless(cluster.get("name") == inv.proxmox.cluster,
                live.mismatch("the PVE cluster's name", cluster.get("name"), inv.proxmox.cluster, "`pvecm status`"))


def test_ceph_health_ok(homelab: Live, measured: Any) -> None:
    status = homelab.pve("/cluster/ceph/status")
    health = status.get("health") or {}
    state = str(health.get("status", "unknown"))
    checks = health.get("checks") or {}
    details = [f"{name}: {((c.get('summary') or {}).get('message') or '')}".rstrip(": ")
               for name, c in sorted(checks.items())]
    measured(state + (f" ({live.listing(checks)})" if checks else ""))
    fail_unless(state == "HEALTH_OK", f"Ceph health is {state}, expected HEALTH_OK"
                + (f": {'; '.join(details)}" if details else "") + "; see `ceph health detail` on a PVE host")


def test_ceph_pool_and_storage(homelab: Live, inv: inventory.Inventory, measured: Any) -> None:
    want = inv.proxmox.ceph
    # Ceph's pool list is per node: ask the first PVE node of the inventory that is online.
    online = {str(e.get("name")) for e in _status(homelab) if e.get("type") == "node" and str(e.get("online")) == "1"}
    node = next((n.name for n in inv.proxmox.nodes if n.name in online), inv.proxmox.nodes[0].name)
    pools = homelab.pve(f"/nodes/{node}/ceph/pool")
    pool = next((p for p in pools if p.get("pool_name", p.get("name")) == want.pool), None)
    storages = homelab.pve("/storage")
    storage = next((s for s in storages if s.get("storage") == want.storage), None)
    problems = []
    if pool is None:
        problems.append(f"Ceph has no pool {want.pool} (pools: "
                        f"{live.listing(p.get('pool_name', p.get('name')) for p in pools) or 'none'})")
    else:
        have, expected = ceph.actual_pool(pool), ceph.desired_pool(inv)
        problems += [f"pool {want.pool}'s {key} is {have[key]}, the inventory says {value}"
                     for key, value in expected.items() if have[key] != value]
    if storage is None:
        problems.append(f"PVE has no storage {want.storage}")
    else:
        have, expected = ceph.actual_storage(storage), ceph.desired_storage(inv)
        problems += [f"storage {want.storage}'s {key} is {have[key]}, the inventory says {value}"
                     for key, value in expected.items() if have[key] != value]
        if storage.get("disable"):
            problems.append(f"storage {want.storage} is disabled")
        states = {str(r.get("node")): str(r.get("status")) for r in homelab.pve("/cluster/resources", type="storage")
                  if r.get("storage") == want.storage and str(r.get("node")) in online}
        inactive = [f"{node} ({state})" for node, state in sorted(states.items()) if state != "available"]
        if inactive:
            problems.append(f"storage {want.storage} is not available on {live.listing(inactive)}")
        if not states:
            problems.append(f"storage {want.storage} is available on no online PVE node")
    measured(f"pool {want.pool}: {'present' if pool else 'absent'}; storage {want.storage}: "
             f"{'present' if storage else 'absent'}")
    fail_unless(not problems, "; ".join(problems) + "; see `invoke ceph.plan` (proxmox.ceph in the inventory)")


def _sdn_problems(kind: str, name: str, entry: dict[str, Any] | None, expected: dict[str, str]) -> list[str]:
    if entry is None:
        return [f"SDN {kind} {name} does not exist"]
    if entry.get("state"):
        return [f"SDN {kind} {name} is {entry['state']} but not applied (pending: "
                f"{live.listing(f'{k}={v}' for k, v in (entry.get('pending') or {}).items()) or 'nothing'})"]
    running = {k: v for k, v in entry.items() if k not in ("pending", "state", "digest")}
    out = []
    for key, value in expected.items():
        have, want = str(running.get(key, "")), str(value)
        if key == "peers":
            have, want = (",".join(sorted(p for p in re.split(r"[,;\s]+", v) if p)) for v in (have, want))
        if have != want:
            out.append(f"SDN {kind} {name}'s {key} is {have or '(none)'}, the inventory says {want}")
    return out


def test_sdn_zone_and_vnet_applied(homelab: Live, inv: inventory.Inventory, measured: Any) -> None:
    want, expected = inv.proxmox.sdn, sdn.desired(inv)
    zones = homelab.pve("/cluster/sdn/zones", pending=1)
    vnets = homelab.pve("/cluster/sdn/vnets", pending=1)
    zone = next((z for z in zones if z.get("zone") == want.zone.name), None)
    vnet = next((v for v in vnets if v.get("vnet") == want.vnet.name), None)
    problems = _sdn_problems("zone", want.zone.name, zone, expected["zone"])
    problems += _sdn_problems("vnet", want.vnet.name, vnet, expected["vnet"])
    measured(f"zone {want.zone.name}: {'absent' if zone is None else zone.get('state') or 'applied'}; "
             f"vnet {want.vnet.name}: {'absent' if vnet is None else vnet.get('state') or 'applied'}")
    fail_unless(not problems, "; ".join(problems) + "; see `invoke sdn.plan` and Datacenter > SDN in PVE")

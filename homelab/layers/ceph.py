"""The ceph layer: the RBD pool for VM disks and K8s volumes, and its PVE storage entry.

Reads: Ceph status (health, shown in the plan), the pool list and storage.cfg. Only fields
that differ are sent; the pool's type of storage cannot change in place and is reported.
"""

from __future__ import annotations

from typing import Any

from homelab.context import Run
from homelab.errors import Conflict, ProxmoxError
from homelab.inventory import Inventory
from homelab.plan import Change, FieldDiff, LayerPlan
from homelab.plan import diff_fields as diff

LAYER = "ceph"


def desired_pool(inv: Inventory) -> dict[str, str]:
    ceph = inv.proxmox.ceph
    return {"size": str(ceph.size), "min_size": str(ceph.min_size), "application": ceph.application,
            "pg_autoscale_mode": ceph.pg_autoscale_mode}


def actual_pool(entry: dict[str, Any]) -> dict[str, str]:
    apps = sorted((entry.get("application_metadata") or {}).keys())
    return {"size": str(entry.get("size")), "min_size": str(entry.get("min_size")),
            "application": ",".join(apps) if apps else "(none)",
            "pg_autoscale_mode": str(entry.get("pg_autoscale_mode"))}


def desired_storage(inv: Inventory) -> dict[str, str]:
    # Hyperconverged Ceph: PVE finds the monitors itself, so no monhost or keyring.
    return {"type": "rbd", "pool": inv.proxmox.ceph.pool, "content": "images", "krbd": "0"}


def actual_storage(entry: dict[str, Any]) -> dict[str, str]:
    content = ",".join(sorted(p for p in str(entry.get("content", "")).split(",") if p))
    krbd = entry.get("krbd")
    return {"type": str(entry.get("type")), "pool": str(entry.get("pool", "")), "content": content,
            "krbd": "1" if str(krbd) in ("1", "true") else "0"}


def _ceph_node(run: Run) -> str:
    """The node whose Ceph API answers the pool calls: the first online PVE node."""
    resources = run.proxmox.get("/cluster/resources", type="node")
    online = {r.get("node") for r in resources if r.get("status") == "online"}
    for node in run.inv.proxmox.nodes:
        if node.name in online:
            return node.name
    raise ProxmoxError("no PVE node of the inventory is online: " + ", ".join(n.name for n in run.inv.proxmox.nodes))


class CephLayer:
    name = LAYER

    def _read(self, run: Run) -> tuple[str, dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
        pve = run.proxmox
        status = pve.get("/cluster/ceph/status")
        node = run.inv.proxmox.template.node
        try:
            pools = pve.get(f"/nodes/{node}/ceph/pool")
        except ProxmoxError as exc:
            if exc.status != 595:
                raise
            node = _ceph_node(run)
            pools = pve.get(f"/nodes/{node}/ceph/pool")
        storages = pve.get("/storage")
        return node, status, pools, storages

    def plan_up(self, run: Run) -> LayerPlan:
        inv, pve = run.inv, run.proxmox
        ceph = inv.proxmox.ceph
        node, status, pools, storages = self._read(run)
        plan = LayerPlan(LAYER)
        health = (status.get("health") or {}).get("status", "unknown")
        checks = sorted(((status.get("health") or {}).get("checks") or {}).keys())
        plan.facts.append(f"Ceph health {health}" + (f" ({', '.join(checks)})" if checks else "")
                          + f", read through {node}")
        if health != "HEALTH_OK":
            plan.warnings.append(f"Ceph reports {health}; RBD operations may be slow or fail")

        pool = next((p for p in pools if p.get("pool_name", p.get("name")) == ceph.pool), None)
        want_pool = desired_pool(inv)
        if pool is None:
            plan.add(Change(LAYER, "pool", ceph.pool, "create",
                            f"RBD pool, size {ceph.size}/{ceph.min_size}, autoscale {ceph.pg_autoscale_mode}",
                            tuple(FieldDiff(k, None, v) for k, v in want_pool.items()),
                            apply=lambda: pve.run_task("post", f"/nodes/{node}/ceph/pool", f"create pool {ceph.pool}",
                                                       run.progress,
                                                       {"name": ceph.pool, "add_storages": 0, **want_pool})))
        else:
            changed = diff(actual_pool(pool), want_pool)
            if changed:
                send = {d.name: d.new for d in changed}
                plan.add(Change(LAYER, "pool", ceph.pool, "update", "pool settings differ", changed,
                                apply=lambda: pve.run_task("put", f"/nodes/{node}/ceph/pool/{ceph.pool}",
                                                           f"update pool {ceph.pool}", run.progress, send)))
            else:
                plan.add(Change(LAYER, "pool", ceph.pool, "noop",
                                f"exists, size {ceph.size}/{ceph.min_size}, application {ceph.application}"))

        storage = next((s for s in storages if s.get("storage") == ceph.storage), None)
        want_storage = desired_storage(inv)
        if storage is None:
            plan.add(Change(LAYER, "storage", ceph.storage, "create", f"PVE storage on RBD pool {ceph.pool}",
                            tuple(FieldDiff(k, None, v) for k, v in want_storage.items()),
                            apply=lambda: pve.write("post", "/storage", storage=ceph.storage, **want_storage)))
        else:
            have = actual_storage(storage)
            if have["type"] != "rbd":
                raise Conflict(f"storage {ceph.storage} exists with type {have['type']}, the inventory needs rbd",
                               hint="choose another proxmox.ceph.storage id or remove that storage")
            changed = diff(have, want_storage)
            if changed:
                send = {d.name: d.new for d in changed if d.name != "type"}
                plan.add(Change(LAYER, "storage", ceph.storage, "update", "storage settings differ", changed,
                                apply=lambda: pve.write("put", f"/storage/{ceph.storage}", **send)))
            else:
                plan.add(Change(LAYER, "storage", ceph.storage, "noop", f"rbd storage on pool {ceph.pool}"))
        return plan

    def plan_down(self, run: Run) -> LayerPlan:
        inv, pve = run.inv, run.proxmox
        ceph = inv.proxmox.ceph
        node, _status, pools, storages = self._read(run)
        plan = LayerPlan(LAYER)
        if any(s.get("storage") == ceph.storage for s in storages):
            plan.add(Change(LAYER, "storage", ceph.storage, "delete", "remove the PVE storage entry",
                            apply=lambda: pve.write("delete", f"/storage/{ceph.storage}")))
        else:
            plan.add(Change(LAYER, "storage", ceph.storage, "noop", "absent"))
        if any(p.get("pool_name", p.get("name")) == ceph.pool for p in pools):
            plan.add(Change(LAYER, "pool", ceph.pool, "delete", "destroy the pool and every image in it",
                            note="irreversible: the data in the pool is lost",
                            apply=lambda: pve.run_task("delete", f"/nodes/{node}/ceph/pool/{ceph.pool}",
                                                       f"destroy pool {ceph.pool}", run.progress)))
        else:
            plan.add(Change(LAYER, "pool", ceph.pool, "noop", "absent"))
        return plan

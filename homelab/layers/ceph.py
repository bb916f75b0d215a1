"""The ceph layer: the RBD pool for VM disks and K8s volumes, its PVE storage entry, and the
Ceph CSI driver's client key.

Reads: Ceph status (health, shown in the plan), the pool list and storage.cfg through the PVE
API; the client key through `ceph auth get` over SSH on a PVE host, because PVE's API has no
endpoint for Ceph auth. Only fields that differ are sent; the pool's type of storage cannot
change in place and is reported. The key's caps are rbd-only for the one pool, as ceph-csi's
documentation asks (https://docs.ceph.com/en/latest/rbd/rbd-kubernetes/); the key itself
never reaches the plan, a log or a command line.
"""

from __future__ import annotations

import json
from typing import Any

from homelab.clients.ssh import Hosts, SshError, SshUnreachable
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


CSI_USER = "kubernetes"


def csi_entity(inv: Inventory) -> str:
    return f"client.{CSI_USER}"


def desired_caps(inv: Inventory) -> dict[str, str]:
    """rbd-only caps for the pool (ceph-csi: mon 'profile rbd', osd and mgr 'profile rbd pool=...')."""
    pool = inv.proxmox.ceph.pool
    return {"mon": "profile rbd", "osd": f"profile rbd pool={pool}", "mgr": f"profile rbd pool={pool}"}


def _caps_argv(caps: dict[str, str]) -> list[str]:
    return [part for daemon in ("mon", "osd", "mgr") for part in (daemon, caps[daemon])]


class CephAuth:
    """`ceph auth` over SSH on the first PVE host that answers; one connection per run."""

    def __init__(self, run: Run) -> None:
        self.run = run
        if run.pve_ssh is None:
            target = run.target
            run.pve_ssh = Hosts("root", target.ssh_private_key, target.known_hosts, guard=run.guard)
        self.hosts: Hosts = run.pve_ssh
        self._address: str | None = None

    def _ceph(self, argv: list[str]) -> tuple[int, str, str]:
        errors = []
        override = self.run.target.proxmox.ssh_endpoint
        addresses = ([self._address] if self._address else [f"{override[0]}:{override[1]}"] if override
                     else [str(n.address) for n in self.run.inv.proxmox.nodes])
        for address in addresses:
            try:
                done = self.hosts.run(address, ["ceph", *argv], check=False, timeout=60)
            except SshUnreachable as exc:
                errors.append(exc.message)
                continue
            self._address = address
            return done.code, done.stdout, done.stderr
        raise SshUnreachable("no PVE host answers SSH for `ceph auth`: " + "; ".join(errors),
                             hint="the ceph layer runs `ceph auth` as root on a PVE host; check SSH access and "
                                  "known_hosts (HOMELAB_KNOWN_HOSTS)")

    def get(self, entity: str) -> dict[str, Any] | None:
        """{"entity", "key", "caps"} of the entity, or None when Ceph has no such entity."""
        code, out, err = self._ceph(["auth", "get", entity, "--format", "json"])
        if code == 2 and "ENOENT" in err:
            return None
        if code != 0:
            raise SshError(f"`ceph auth get {entity}` exited {code}: {err.strip()[-300:]}")
        return _entry(out, f"ceph auth get {entity}")

    def create(self, entity: str, caps: dict[str, str]) -> str:
        code, out, err = self._ceph(["auth", "get-or-create", entity, *_caps_argv(caps), "--format", "json"])
        if code != 0:
            raise SshError(f"`ceph auth get-or-create {entity}` exited {code}: {err.strip()[-300:]}")
        return str(_entry(out, f"ceph auth get-or-create {entity}")["key"])

    def set_caps(self, entity: str, caps: dict[str, str]) -> None:
        code, _out, err = self._ceph(["auth", "caps", entity, *_caps_argv(caps)])
        if code != 0:
            raise SshError(f"`ceph auth caps {entity}` exited {code}: {err.strip()[-300:]}")

    def remove(self, entity: str) -> None:
        code, _out, err = self._ceph(["auth", "rm", entity])
        if code != 0 and "ENOENT" not in err:
            raise SshError(f"`ceph auth rm {entity}` exited {code}: {err.strip()[-300:]}")


def _entry(out: str, command: str) -> dict[str, Any]:
    """The one entity of `ceph auth ... --format json` output; its text is never quoted (it holds a key)."""
    try:
        entries = json.loads(out)
    except ValueError:
        raise SshError(f"`{command}` printed no JSON") from None
    entry = entries[0] if isinstance(entries, list) and entries else entries
    if not isinstance(entry, dict) or "key" not in entry:
        raise SshError(f"`{command}` answered without a key")
    return entry


def csi_key(run: Run) -> str | None:
    """The CSI client's key, read once per run (None when Ceph has no such client yet)."""
    if "ceph_csi_key" not in run.memo:
        entry = CephAuth(run).get(csi_entity(run.inv))
        run.memo["ceph_csi_key"] = str(entry["key"]) if entry else None
    value = run.memo["ceph_csi_key"]
    return str(value) if value else None


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
        self._plan_key(run, plan)
        return plan

    def _plan_key(self, run: Run, plan: LayerPlan) -> None:
        """The Ceph CSI driver's client: rbd-only caps on the pool; its key is kept for the network layer."""
        auth, entity, caps = CephAuth(run), csi_entity(run.inv), desired_caps(run.inv)
        entry = auth.get(entity)
        if entry is None:
            run.memo["ceph_csi_key"] = None

            def create() -> None:
                run.memo["ceph_csi_key"] = auth.create(entity, caps)

            plan.add(Change(LAYER, "auth", entity, "create", "Ceph CSI client key, rbd-only caps",
                            tuple(FieldDiff(f"caps.{k}", None, v) for k, v in caps.items()), apply=create))
            return
        run.memo["ceph_csi_key"] = str(entry["key"])
        have = {k: str(v) for k, v in (entry.get("caps") or {}).items()}
        changed = diff({k: have.get(k, "(none)") for k in (*caps, *have)}, {**{k: "(none)" for k in have}, **caps})
        if changed:
            plan.add(Change(LAYER, "auth", entity, "update", "caps differ (the key stays)", changed,
                            apply=lambda: auth.set_caps(entity, caps)))
        else:
            plan.add(Change(LAYER, "auth", entity, "noop", "exists with rbd-only caps on " + run.inv.proxmox.ceph.pool))

    def plan_down(self, run: Run) -> LayerPlan:
        inv, pve = run.inv, run.proxmox
        ceph = inv.proxmox.ceph
        node, _status, pools, storages = self._read(run)
        plan = LayerPlan(LAYER)
        auth, entity = CephAuth(run), csi_entity(inv)
        if auth.get(entity) is not None:
            plan.add(Change(LAYER, "auth", entity, "delete", "remove the Ceph CSI client",
                            apply=lambda: auth.remove(entity)))
        else:
            plan.add(Change(LAYER, "auth", entity, "noop", "absent"))
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

"""The sdn layer: a VXLAN zone with the PVE hosts as peers, its vnet and subnet.

PVE keeps SDN edits pending until `PUT /cluster/sdn` applies them to every node, and that
reload touches the network of the whole cluster: it is sent only when one of our objects
changed or still has unapplied changes. Reads use `pending=1`, which shows both.
"""

from __future__ import annotations

import re
from typing import Any

from homelab.context import Run
from homelab.inventory import Inventory
from homelab.plan import Change, FieldDiff, LayerPlan, diff_fields

LAYER = "sdn"


def subnet_id(inv: Inventory) -> str:
    """PVE's id of a subnet: <zone>-<network>-<prefix length>."""
    sdn = inv.proxmox.sdn
    return f"{sdn.zone.name}-{sdn.subnet.cidr.network_address}-{sdn.subnet.cidr.prefixlen}"


def desired(inv: Inventory) -> dict[str, dict[str, str]]:
    sdn = inv.proxmox.sdn
    return {
        "zone": {"type": sdn.zone.type, "peers": ",".join(str(n.address) for n in inv.proxmox.nodes),
                 "mtu": str(sdn.zone.mtu)},
        "vnet": {"zone": sdn.zone.name, "tag": str(sdn.vnet.tag)},
        "subnet": {"gateway": str(sdn.subnet.gateway)},
    }


def written(entry: dict[str, Any]) -> dict[str, str]:
    """An object as written to the SDN config: running values overlaid with pending ones."""
    values = {k: v for k, v in entry.items() if k not in ("pending", "state", "digest")}
    for key, value in (entry.get("pending") or {}).items():
        if value == "deleted":
            values.pop(key, None)
        else:
            values[key] = value
    return {k: _norm(k, v) for k, v in values.items()}


def _norm(key: str, value: Any) -> str:
    if key == "peers":
        return ",".join(sorted(p for p in re.split(r"[,;\s]+", str(value)) if p))
    return str(value)


def _diff(actual: dict[str, str], want: dict[str, str]) -> tuple[FieldDiff, ...]:
    return diff_fields(actual, {k: _norm(k, v) for k, v in want.items()})


class SdnLayer:
    name = LAYER

    def _read(self, run: Run) -> tuple[dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None,
                                       list[str]]:
        pve, sdn = run.proxmox, run.inv.proxmox.sdn
        zones = pve.get("/cluster/sdn/zones", pending=1)
        vnets = pve.get("/cluster/sdn/vnets", pending=1)
        zone = next((z for z in zones if z.get("zone") == sdn.zone.name), None)
        vnet = next((v for v in vnets if v.get("vnet") == sdn.vnet.name), None)
        subnet = None
        if vnet is not None:
            subnets = pve.get(f"/cluster/sdn/vnets/{sdn.vnet.name}/subnets", pending=1)
            subnet = next((s for s in subnets if s.get("subnet") == subnet_id(run.inv)), None)
        ours = {sdn.zone.name, sdn.vnet.name}
        foreign = sorted(f"{kind} {item.get(kind)}" for kind, items in (("zone", zones), ("vnet", vnets))
                         for item in items if item.get("state") and item.get(kind) not in ours)
        return zone, vnet, subnet, foreign

    def plan_up(self, run: Run) -> LayerPlan:
        inv, pve = run.inv, run.proxmox
        sdn = inv.proxmox.sdn
        want = desired(inv)
        zone, vnet, subnet, foreign = self._read(run)
        plan = LayerPlan(LAYER)
        unapplied: list[str] = []
        sid = subnet_id(inv)
        objects = (
            ("zone", sdn.zone.name, zone, "/cluster/sdn/zones", {"zone": sdn.zone.name}),
            ("vnet", sdn.vnet.name, vnet, "/cluster/sdn/vnets", {"vnet": sdn.vnet.name}),
            ("subnet", sid, subnet, f"/cluster/sdn/vnets/{sdn.vnet.name}/subnets",
             {"subnet": str(sdn.subnet.cidr), "type": "subnet"}),
        )
        for kind, name, entry, path, ident in objects:
            fields = want[kind]
            if entry is None:
                plan.add(Change(LAYER, kind, name, "create", f"new {kind}",
                                tuple(FieldDiff(k, None, v) for k, v in fields.items()),
                                apply=_writer(pve, "post", path, {**ident, **fields})))
                continue
            if entry.get("state"):
                unapplied.append(f"{kind} {name} ({entry['state']})")
            changed = _diff(written(entry), fields)
            if changed:
                send = {d.name: fields[d.name] for d in changed if d.name != "type"}
                plan.add(Change(LAYER, kind, name, "update", f"{kind} settings differ", changed,
                                apply=_writer(pve, "put", f"{path}/{name}", send)))
            else:
                plan.add(Change(LAYER, kind, name, "noop", "matches" + (" (not applied yet)" if entry.get("state")
                                                                        else ", applied")))
        if plan.pending or unapplied:
            if foreign:
                plan.warnings.append("applying SDN also applies pending edits the inventory does not manage: "
                                     + ", ".join(foreign))
            reason = "after the changes above" if plan.pending else "pending: " + ", ".join(unapplied)
            plan.add(Change(LAYER, "config", "cluster", "update", f"apply the SDN configuration ({reason})",
                            note="reloads the network configuration on every PVE node",
                            apply=lambda: pve.run_task("put", "/cluster/sdn", "apply SDN configuration",
                                                       run.progress)))
        return plan

    def plan_down(self, run: Run) -> LayerPlan:
        inv, pve = run.inv, run.proxmox
        sdn = inv.proxmox.sdn
        zone, vnet, subnet, _foreign = self._read(run)
        plan = LayerPlan(LAYER)
        sid = subnet_id(inv)
        for kind, name, entry, path in (
            ("subnet", sid, subnet, f"/cluster/sdn/vnets/{sdn.vnet.name}/subnets/{sid}"),
            ("vnet", sdn.vnet.name, vnet, f"/cluster/sdn/vnets/{sdn.vnet.name}"),
            ("zone", sdn.zone.name, zone, f"/cluster/sdn/zones/{sdn.zone.name}"),
        ):
            if entry is None or entry.get("state") == "deleted":
                plan.add(Change(LAYER, kind, name, "noop", "absent"))
            else:
                plan.add(Change(LAYER, kind, name, "delete", f"remove the {kind}",
                                apply=_writer(pve, "delete", path, {})))
        if plan.pending:
            plan.add(Change(LAYER, "config", "cluster", "update", "apply the SDN configuration",
                            apply=lambda: pve.run_task("put", "/cluster/sdn", "apply SDN configuration",
                                                       run.progress)))
        return plan


def _writer(pve: Any, method: str, path: str, params: dict[str, str]) -> Any:
    return lambda: pve.write(method, path, **params)

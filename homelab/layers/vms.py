"""The vms layer: a cloud-image template and the K3s VMs, full clones placed on their PVE nodes.

Reads: one `/cluster/resources` for every VM's name, id, node and power state, and one
`/pending` per managed VM (current config and pending changes in one answer). A VM is found by
name, and that lookup fails loudly on duplicates or a VMID held by another name.

A running VM takes most config changes only at its next boot (PVE keeps them pending), and
this layer does not reboot K3s nodes on its own: it sends the change once and says so.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from homelab.clients.proxmox import Proxmox, config_value, parse_props
from homelab.context import Run
from homelab.errors import ConfigError, Conflict, ProxmoxError
from homelab.inventory import Inventory, Vm
from homelab.plan import Change, FieldDiff, LayerPlan
from homelab.wait import poll

LAYER = "vms"
DISK = "scsi0"
NET_MODELS = ("virtio", "e1000", "e1000e", "vmxnet3", "rtl8139")
# Config keys a running VM takes at once; everything else waits for the next boot.
HOT_KEYS = {"name", "description", "onboot", "tags", "protection", "agent"}
UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


# ------------------------------------------------------------------------ desired state (pure)


def vm_tags(vm: Vm) -> str:
    return f"homelab;k3s-{vm.role}"


def desired_config(inv: Inventory, vm: Vm, ssh_key: str) -> dict[str, str]:
    """The config keys this layer manages on a K3s VM, as PVE stores them."""
    net = inv.network
    return {
        "cores": str(vm.cores),
        "memory": str(vm.memory_mib),
        "agent": "enabled=1",
        "onboot": "1",
        "tags": vm_tags(vm),
        "net1": f"virtio,bridge={inv.proxmox.sdn.vnet.name}",
        "ciuser": inv.k3s.user,
        "sshkeys": urllib.parse.quote(ssh_key.strip() + "\n", safe=""),
        "ipconfig0": f"ip={vm.address}/{net.home.prefixlen},gw={net.gateway}",
        # Packages are the k3s layer's business (pinned, idempotent), not a first-boot upgrade.
        "ciupgrade": "0",
        "nameserver": " ".join(str(a) for a in net.nameservers),
        "searchdomain": inv.k3s.search_domain,
    }


def template_config(inv: Inventory, volid: str) -> dict[str, str]:
    """The template: the imported cloud image on Ceph, a cloud-init drive, serial console, guest agent."""
    px = inv.proxmox
    return {
        "vmid": str(px.template.vmid),
        "name": px.template.name,
        "ostype": "l26",
        "cores": "2",
        "memory": "2048",
        "scsihw": "virtio-scsi-single",
        DISK: f"{px.ceph.storage}:0,import-from={volid},discard=on",
        "ide2": f"{px.ceph.storage}:cloudinit",
        "boot": f"order={DISK}",
        "serial0": "socket",
        "vga": "serial0",
        "agent": "enabled=1",
        "net0": f"virtio,bridge={inv.network.bridge}",
        "tags": "homelab;template",
    }


def normalise(key: str, value: Any) -> str:
    """A config value in a form where equal meanings compare equal."""
    text = config_value(value)
    if key == "agent":
        first = text.split(",")[0]
        enabled = parse_props(text).get("enabled", first if "=" not in first else "0")
        return "enabled=1" if enabled in ("1", "true") else "enabled=0"
    if key.startswith("net"):
        props = parse_props(text)
        model = next((m for m in NET_MODELS if m in props), props.get("model", "?"))
        return f"{model},bridge={props.get('bridge', '')}"
    if key == "sshkeys":
        return urllib.parse.unquote(text).strip()
    if key == "tags":
        return ";".join(sorted(t.lower() for t in re.split(r"[;, ]+", text) if t))
    if key == "ipconfig0":
        return ",".join(f"{k}={v}" for k, v in sorted(parse_props(text).items()))
    return text


def disk_bytes(drive: str | None) -> int | None:
    """The size= of a drive value in bytes, or None."""
    if not drive:
        return None
    size = parse_props(drive).get("size")
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", size or "")
    return int(float(found.group(1)) * UNITS[found.group(2)]) if found else None


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 1024**3:g}G"


def config_diff(effective: dict[str, Any], want: dict[str, str]) -> tuple[FieldDiff, ...]:
    out = []
    for key, value in want.items():
        have = effective.get(key)
        if have is None or normalise(key, have) != normalise(key, value):
            shown_old = None if have is None else ("(key)" if key == "sshkeys" else normalise(key, have))
            shown_new = "(key)" if key == "sshkeys" else normalise(key, value)
            out.append(FieldDiff(key, shown_old, shown_new))
    return tuple(out)


# ------------------------------------------------------------------------------- actual state


@dataclass
class Found:
    vmid: int
    name: str
    node: str
    status: str
    template: bool


def index_guests(resources: list[dict[str, Any]]) -> tuple[dict[str, list[Found]], dict[int, Found]]:
    by_name: dict[str, list[Found]] = {}
    by_id: dict[int, Found] = {}
    for r in resources:
        if r.get("type") != "qemu":
            continue
        found = Found(int(r["vmid"]), str(r.get("name", "")), str(r["node"]), str(r.get("status")),
                      str(r.get("template", 0)) in ("1", "True", "true"))
        by_name.setdefault(found.name, []).append(found)
        by_id[found.vmid] = found
    return by_name, by_id


def lookup(name: str, vmid: int, by_name: dict[str, list[Found]], by_id: dict[int, Found]) -> Found | None:
    """The VM called name, or None; Conflict when the name is ambiguous or the ids disagree."""
    matches = by_name.get(name, [])
    if len(matches) > 1:
        raise Conflict(f"{len(matches)} VMs are named {name}: "
                       + ", ".join(f"{m.vmid} on {m.node}" for m in matches),
                       hint="rename or remove all but one; the layer will not guess")
    if matches and matches[0].vmid != vmid:
        raise Conflict(f"VM {name} is VMID {matches[0].vmid} on {matches[0].node}, the inventory says {vmid}",
                       hint="fix the inventory's vmid or the VM")
    other = by_id.get(vmid)
    if other is not None and other.name != name:
        raise Conflict(f"VMID {vmid} is taken by {other.name!r} on {other.node}, the inventory gives it to {name}",
                       hint="choose another vmid in the inventory")
    return matches[0] if matches else None


def split_pending(entries: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(current config, config after the pending changes) from GET .../pending."""
    current = {e["key"]: e["value"] for e in entries if "value" in e}
    effective = dict(current)
    for e in entries:
        if e.get("delete"):
            effective.pop(e["key"], None)
        elif "pending" in e:
            effective[e["key"]] = e["pending"]
    return current, effective


def agent_addresses(result: Any) -> set[str]:
    """IPv4 addresses from the guest agent's network-get-interfaces answer."""
    interfaces = result.get("result", []) if isinstance(result, dict) else result
    return {str(a.get("ip-address")) for i in interfaces or [] for a in i.get("ip-addresses", [])
            if a.get("ip-address-type") == "ipv4"}


# ------------------------------------------------------------------------------------- layer


class VmsLayer:
    name = LAYER

    def plan_up(self, run: Run) -> LayerPlan:
        inv, pve = run.inv, run.proxmox
        ssh_key = _read_key(run)
        by_name, by_id = index_guests(pve.get("/cluster/resources", type="vm"))
        plan = LayerPlan(LAYER)
        started: list[Vm] = []
        tpl = inv.proxmox.template
        template = lookup(tpl.name, tpl.vmid, by_name, by_id)
        if template is None:
            _plan_template(run, plan)
        elif not template.template:
            plan.add(Change(LAYER, "template", tpl.name, "update", "VM exists but is not a template yet",
                            (FieldDiff("template", "0", "1"),),
                            apply=lambda: pve.run_task("post", f"/nodes/{template.node}/qemu/{tpl.vmid}/template",
                                                       f"convert {tpl.name} to a template", run.progress)))
        else:
            plan.add(Change(LAYER, "template", tpl.name, "noop", f"template {tpl.vmid} on {template.node}"))

        for vm in inv.k3s.vms:
            found = lookup(vm.name, vm.vmid, by_name, by_id)
            want = desired_config(inv, vm, ssh_key)
            if found is None:
                plan.add(_create(run, vm, want, started))
            else:
                _plan_existing(run, plan, vm, found, want, started)

        def finish() -> None:
            for vm in started:
                wait_for_address(run, vm)

        plan.finish = finish
        return plan

    def plan_down(self, run: Run) -> LayerPlan:
        inv, pve = run.inv, run.proxmox
        by_name, by_id = index_guests(pve.get("/cluster/resources", type="vm"))
        plan = LayerPlan(LAYER)
        tpl = inv.proxmox.template
        guests = [(vm.name, vm.vmid, "vm") for vm in reversed(inv.k3s.vms)] + [(tpl.name, tpl.vmid, "template")]
        for name, vmid, kind in guests:
            found = lookup(name, vmid, by_name, by_id)
            if found is None:
                plan.add(Change(LAYER, kind, name, "noop", "absent"))
                continue
            plan.add(Change(LAYER, kind, name, "delete", f"destroy VM {vmid} on {found.node} and its disks",
                            note="stopped first" if found.status == "running" else None,
                            apply=_destroyer(run, found)))
        return plan


def _read_key(run: Run) -> str:
    path = run.target.ssh_public_key
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the SSH public key for the VMs at {path}: {exc.strerror}",
                          hint="create one with `ssh-keygen -t ed25519`, or set HOMELAB_SSH_PUBLIC_KEY") from None
    if not re.match(r"^(ssh-(ed25519|rsa)|ecdsa-sha2-nistp\d+) [A-Za-z0-9+/=]+", key):
        raise ConfigError(f"{path} does not hold an OpenSSH public key")
    return key


def _plan_template(run: Run, plan: LayerPlan) -> None:
    inv, pve = run.inv, run.proxmox
    tpl = inv.proxmox.template
    image = tpl.image
    volid = f"{image.storage}:import/{image.filename}"
    content = pve.get(f"/nodes/{tpl.node}/storage/{image.storage}/content", content="import")
    if not any(item.get("volid") == volid for item in content):
        url = f"{run.target.image_mirror.rstrip('/')}/{image.filename}" if run.target.image_mirror else image.url
        params: dict[str, Any] = {"content": "import", "filename": image.filename, "url": url}
        if image.checksum:
            algorithm, _, digest = image.checksum.partition(":")
            params.update({"checksum": digest, "checksum-algorithm": algorithm})
        plan.add(Change(LAYER, "image", image.filename, "create", f"download to {image.storage} on {tpl.node}",
                        (FieldDiff("url", None, url),),
                        note=None if image.checksum else "no checksum in the inventory: the download is not verified",
                        apply=lambda: pve.run_task("post", f"/nodes/{tpl.node}/storage/{image.storage}/download-url",
                                                   f"download {image.filename}", run.progress,
                                                   params, timeout=run.timeouts.task)))
    else:
        plan.add(Change(LAYER, "image", image.filename, "noop", f"present on {image.storage}"))
    config = template_config(inv, volid)

    def make_template() -> None:
        pve.run_task("post", f"/nodes/{tpl.node}/qemu", f"create template VM {tpl.vmid}", run.progress, config)
        pve.run_task("post", f"/nodes/{tpl.node}/qemu/{tpl.vmid}/template", f"convert {tpl.name} to a template",
                     run.progress)

    plan.add(Change(LAYER, "template", tpl.name, "create",
                    f"VM {tpl.vmid} on {tpl.node} from {image.filename}, disk on {inv.proxmox.ceph.storage}",
                    tuple(FieldDiff(k, None, v) for k, v in config.items() if k not in ("vmid", "name")),
                    apply=make_template))


def _create(run: Run, vm: Vm, want: dict[str, str], started: list[Vm]) -> Change:
    inv, pve = run.inv, run.proxmox
    tpl = inv.proxmox.template

    def apply() -> None:
        clone: dict[str, Any] = {"newid": vm.vmid, "name": vm.name, "full": 1}
        if vm.pve_node != tpl.node:
            clone["target"] = vm.pve_node
        pve.run_task("post", f"/nodes/{tpl.node}/qemu/{tpl.vmid}/clone", f"clone {tpl.name} to {vm.name}",
                     run.progress, clone, timeout=run.timeouts.task)
        base = f"/nodes/{vm.pve_node}/qemu/{vm.vmid}"
        pve.write("put", f"{base}/config", **want)
        pve.run_task("put", f"{base}/resize", f"grow {vm.name}'s disk to {vm.disk_gib}G", run.progress,
                     {"disk": DISK, "size": f"{vm.disk_gib}G"})
        pve.run_task("post", f"{base}/status/start", f"start {vm.name}", run.progress)
        started.append(vm)

    shown = tuple(FieldDiff(k, None, normalise(k, v) if k != "sshkeys" else "(key)") for k, v in want.items())
    return Change(LAYER, "vm", vm.name, "create",
                  f"VM {vm.vmid} on {vm.pve_node}: full clone of {tpl.name}, {vm.cores} cores, "
                  f"{vm.memory_mib} MiB, {vm.disk_gib}G disk, {vm.address}",
                  (*shown, FieldDiff("disk", None, f"{vm.disk_gib}G")), apply=apply)


def _plan_existing(run: Run, plan: LayerPlan, vm: Vm, found: Found, want: dict[str, str], started: list[Vm]) -> None:
    pve = run.proxmox
    node = found.node
    base = f"/nodes/{node}/qemu/{vm.vmid}"
    if node != vm.pve_node:
        plan.warnings.append(f"{vm.name} runs on {node}, the inventory places it on {vm.pve_node}; migrate it "
                             f"(not done automatically: moving a K3s node is an operator's decision)")
    current, effective = split_pending(pve.get(f"{base}/pending"))
    running = found.status == "running"
    changed = config_diff(effective, want)
    waiting = [d.name for d in config_diff(current, want) if d.name not in {c.name for c in changed}]
    if changed:
        send = {d.name: want[d.name] for d in changed}
        cold = sorted(k for k in send if k not in HOT_KEYS)
        note = (f"{vm.name} is running: {', '.join(cold)} take effect at its next reboot"
                if running and cold else None)
        plan.add(Change(LAYER, "vm", vm.name, "update", "config differs", changed, note=note,
                        apply=lambda: pve.write("put", f"{base}/config", **send)))
    size = disk_bytes(effective.get(DISK))
    want_size = vm.disk_gib * 1024**3
    if size is not None and size < want_size:
        plan.add(Change(LAYER, "disk", f"{vm.name}/{DISK}", "update", "grow the disk",
                        (FieldDiff("size", gib(size), gib(want_size)),),
                        apply=lambda: pve.run_task("put", f"{base}/resize", f"grow {vm.name}'s disk", run.progress,
                                                   {"disk": DISK, "size": f"{vm.disk_gib}G"})))
    elif size is not None and size > want_size:
        plan.warnings.append(f"{vm.name}'s disk is {gib(size)}, larger than the inventory's {vm.disk_gib}G; "
                             "PVE cannot shrink disks, so it stays")
    if not running:
        def start() -> None:
            pve.run_task("post", f"{base}/status/start", f"start {vm.name}", run.progress)
            started.append(vm)

        plan.add(Change(LAYER, "power", vm.name, "update", f"start (it is {found.status})",
                        (FieldDiff("status", found.status, "running"),), apply=start))
    if not changed and running and not (size is not None and size < want_size):
        reason = f"running on {node}, config matches"
        if waiting:
            reason += f"; pending until its next reboot: {', '.join(waiting)}"
        plan.add(Change(LAYER, "vm", vm.name, "noop", reason))


def _destroyer(run: Run, found: Found) -> Callable[[], None]:
    pve = run.proxmox
    base = f"/nodes/{found.node}/qemu/{found.vmid}"

    def apply() -> None:
        if found.status == "running":
            pve.run_task("post", f"{base}/status/stop", f"stop {found.name}", run.progress)
        pve.run_task("delete", base, f"destroy {found.name}", run.progress,
                     {"purge": 1, "destroy-unreferenced-disks": 1})

    return apply


def wait_for_address(run: Run, vm: Vm) -> None:
    """Poll the guest agent until it reports the VM's address (boot and cloud-init take a while)."""
    pve: Proxmox = run.proxmox
    path = f"/nodes/{vm.pve_node}/qemu/{vm.vmid}/agent/network-get-interfaces"

    def probe() -> tuple[bool | None, str]:
        try:
            addresses = agent_addresses(pve.get(path))
        except ProxmoxError as exc:  # the agent answers only once the guest has booted
            return None, exc.message.splitlines()[0][-120:]
        if str(vm.address) in addresses:
            return True, f"{vm.address} is up"
        return None, "agent reports " + (", ".join(sorted(addresses)) or "no address")

    poll(f"{vm.name}'s guest agent to report {vm.address}", probe, timeout=run.timeouts.guest_agent,
         progress=run.progress, first=0.2, maximum=3.0)

"""The K3s VMs as PVE sees them: on their node, running, their address from the guest agent, cores and memory."""

from __future__ import annotations

from typing import Any

import pytest

from homelab import inventory, live
from homelab.errors import ProxmoxError
from homelab.layers.vms import agent_addresses, split_pending

from .conftest import Live, fail_unless

pytestmark = pytest.mark.vms
MIB = 1024 * 1024


def _guest(homelab: Live, vm: inventory.Vm) -> dict[str, Any]:
    """The VM's entry in /cluster/resources (by name; its VMID must match too)."""
    guests = [g for g in homelab.pve("/cluster/resources", type="vm") if not g.get("template")]
    found = [g for g in guests if g.get("name") == vm.name]
    fail_unless(bool(found), f"PVE has no VM named {vm.name} (VMs: {live.listing(g.get('name') for g in guests)}); "
                             "see `invoke vms.plan`")
    fail_unless(len(found) == 1, f"PVE has {len(found)} VMs named {vm.name} (VMIDs "
                                 f"{live.listing(g.get('vmid') for g in found)}); see the PVE web UI")
    guest = found[0]
    fail_unless(int(guest.get("vmid", 0)) == vm.vmid,
                live.mismatch(f"VM {vm.name}'s VMID", guest.get("vmid"), vm.vmid, "`invoke vms.plan`"))
    return dict(guest)


def test_vm_running_on_its_node(homelab: Live, vm: inventory.Vm, measured: Any) -> None:
    guest = _guest(homelab, vm)
    measured(f"{guest.get('status')} on {guest.get('node')}")
    fail_unless(guest.get("node") == vm.pve_node,
                live.mismatch(f"VM {vm.name}'s PVE node", guest.get("node"), vm.pve_node,
                              "the VM's Migrate history in PVE (the vms layer does not move VMs)"))
    fail_unless(guest.get("status") == "running",
                f"VM {vm.name} ({vm.vmid}) on {guest.get('node')} is {guest.get('status')}, expected running; "
                f"see its task log in PVE, or start it with `invoke vms.up`")


def test_vm_address_from_guest_agent(homelab: Live, vm: inventory.Vm, measured: Any) -> None:
    guest = _guest(homelab, vm)
    path = f"/nodes/{guest.get('node')}/qemu/{vm.vmid}/agent/network-get-interfaces"
    try:
        addresses = sorted(agent_addresses(homelab.pve(path)))
    except ProxmoxError as exc:
        measured("no answer")
        pytest.fail(f"VM {vm.name}'s guest agent does not answer ({exc.message.splitlines()[0]}), expected it to "
                    f"report {vm.address}; see qemu-guest-agent on the VM", pytrace=False)
    measured(live.listing(addresses) or "none")
    fail_unless(str(vm.address) in addresses,
                live.mismatch(f"the address the guest agent reports for {vm.name}", addresses, vm.address,
                              "the VM's ipconfig0 (cloud-init) in PVE and `ip addr` on the VM"))


def test_vm_cores_and_memory(homelab: Live, vm: inventory.Vm, measured: Any) -> None:
    guest = _guest(homelab, vm)
    current, effective = split_pending(homelab.pve(f"/nodes/{guest.get('node')}/qemu/{vm.vmid}/pending"))
    cores, memory = str(current.get("cores", "1")), str(current.get("memory", "512")).split("=")[-1]
    sockets = str(current.get("sockets", "1"))
    measured(f"{cores} cores x {sockets} socket(s), {memory} MiB")
    problems = []
    if cores != str(vm.cores) or sockets != "1":
        problems.append(f"VM {vm.name} has {cores} cores x {sockets} socket(s), the inventory says {vm.cores} cores")
    if memory != str(vm.memory_mib):
        problems.append(f"VM {vm.name} has {memory} MiB of memory, the inventory says {vm.memory_mib}")
    for key, want in (("cores", str(vm.cores)), ("memory", str(vm.memory_mib))):
        pending = str(effective.get(key, "")).split("=")[-1]
        if pending and pending != str(current.get(key, "")).split("=")[-1] and pending != want:
            problems.append(f"VM {vm.name} has {key} {pending} pending (at its next reboot), the inventory says {want}")
    fail_unless(not problems, "; ".join(problems) + "; see `invoke vms.plan` (k3s.vms in the inventory)")

"""The K3s nodes over SSH with testinfra (one connection per node, host keys checked): hostname, address,
k3s units, the API server's port, swap, time, the token and kubeconfig files. Commands only read."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from homelab import inventory, live
from homelab.layers.k3s import KUBECONFIG_REMOTE, TOKEN, unit_name

from .conftest import Live, fail_unless

pytestmark = pytest.mark.nodes
# Services that discipline the clock (the k3s layer enables systemd-timesyncd; others are fine too).
TIME_SERVICES = ("systemd-timesyncd", "chrony", "chronyd", "ntpsec", "ntp")
MAX_SKEW = 2.0


def test_hostname(node: Any, vm: inventory.Vm, measured: Any) -> None:
    name = node.check_output("hostname")
    measured(name)
    fail_unless(name == vm.name, live.mismatch(f"{vm.address}'s hostname", name, vm.name,
                                               "the VM's cloud-init (hostname) and /etc/hostname"))


def test_address_on_interface(node: Any, inv: inventory.Inventory, vm: inventory.Vm, measured: Any) -> None:
    links = json.loads(node.check_output("ip -j -4 addr show"))
    want = f"{vm.address}/{inv.network.home.prefixlen}"
    found = {f"{a.get('local')}/{a.get('prefixlen')}": link for link in links for a in link.get("addr_info") or []}
    link = found.get(want)
    measured(f"{want} on {link.get('ifname')} ({link.get('operstate')})" if link else
             live.listing(f"{a} on {lk.get('ifname')}" for a, lk in found.items() if not a.startswith("127.")))
    fail_unless(link is not None, live.mismatch(f"{vm.name}'s IPv4 addresses", [a for a in found
                                                if not a.startswith("127.")], want, "cloud-init's ipconfig0 "
                                                "(the VM's network config) and `ip addr` on the node"))
    assert link is not None
    fail_unless("UP" in (link.get("flags") or []),
                f"{vm.name}: {want} is on {link.get('ifname')}, which is down (flags {link.get('flags')}), "
                "expected up; see `ip link` on the node")


def _unit(node: Any, unit: str) -> dict[str, str]:
    out = node.check_output("systemctl show -p ActiveState -p SubState -p UnitFileState -p LoadState -- %s", unit)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_k3s_unit_active_and_enabled(node: Any, vm: inventory.Vm, measured: Any) -> None:
    unit = unit_name(vm)
    state = _unit(node, unit)
    measured(f"{unit} {state.get('ActiveState')} ({state.get('SubState')}), {state.get('UnitFileState') or '-'}")
    fail_unless(state.get("LoadState") == "loaded", f"{vm.name}: {unit} is {state.get('LoadState')}, expected loaded "
                                                    f"(the {vm.role} unit); see `invoke k3s.plan`")
    fail_unless(state.get("ActiveState") == "active" and state.get("SubState") == "running",
                f"{vm.name}: {unit} is {state.get('ActiveState')} ({state.get('SubState')}), expected active "
                f"(running); see `journalctl -u {unit}` on the node")
    fail_unless(state.get("UnitFileState") == "enabled",
                f"{vm.name}: {unit} is {state.get('UnitFileState')}, expected enabled (it must start at boot); "
                f"see `systemctl is-enabled {unit}` and `invoke k3s.plan`")


def test_apiserver_listening(homelab: Live, inv: inventory.Inventory, measured: Any) -> None:
    seen, problems = [], []
    for vm in inv.k3s.servers:
        sockets = homelab.host(vm).socket.get_listening_sockets()
        on = [s for s in sockets if s.startswith("tcp://") and s.rsplit(":", 1)[-1] == "6443"]
        seen.append(f"{vm.name}: {live.listing(on) or 'nothing on 6443'}")
        wanted = {"tcp://0.0.0.0:6443", "tcp://:::6443", f"tcp://{vm.address}:6443"}
        if not wanted & set(on):
            problems.append(f"{vm.name} listens on {live.listing(on) or 'nothing'} for port 6443, expected the API "
                            f"server on {vm.address}:6443 (or every address)")
    measured("; ".join(seen))
    fail_unless(not problems, "; ".join(problems) + "; see `journalctl -u k3s` on the control plane")


def test_swap_off(node: Any, vm: inventory.Vm, measured: Any) -> None:
    lines = node.check_output("cat /proc/swaps").splitlines()[1:]
    swaps = [line.split()[0] for line in lines if line.strip()]
    measured(live.listing(swaps) or "off")
    fail_unless(not swaps, f"{vm.name} has swap on ({live.listing(swaps)}), expected off (the kubelet requires it); "
                           "see /etc/fstab and `swapon --show` on the node")


def test_time_synchronised(node: Any, vm: inventory.Vm, measured: Any) -> None:
    before = time.time()
    remote = float(node.check_output("date +%s.%N"))
    skew = remote - (before + time.time()) / 2
    shown = node.run("timedatectl show -p NTPSynchronized -p NTP")
    sync = dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line) if shown.rc == 0 else {}
    units = node.run("systemctl show -p Id -p UnitFileState -- " + " ".join(["%s"] * len(TIME_SERVICES)),
                     *TIME_SERVICES).stdout
    blocks = [dict(line.split("=", 1) for line in block.splitlines() if "=" in line) for block in units.split("\n\n")]
    states = {b.get("Id", "").removesuffix(".service"): b.get("UnitFileState", "") for b in blocks}
    enabled = {s: states.get(s, "") for s in TIME_SERVICES}
    service = next((s for s, state in enabled.items() if state == "enabled"), None)
    virt = node.run("systemd-detect-virt --container").stdout.strip() or "none"
    synced = sync.get("NTPSynchronized") == "yes"
    measured(f"NTPSynchronized={sync.get('NTPSynchronized', '?')}, {service or 'no time service'} enabled, "
             f"skew {skew:+.2f} s" + (f", container ({virt}): the host's clock" if virt != "none" else ""))
    fail_unless(abs(skew) <= MAX_SKEW, f"{vm.name}'s clock is {skew:+.1f} s off this machine's, expected within "
                                       f"{MAX_SKEW:.0f} s; see `timedatectl timesync-status` on the node")
    seen = ", ".join(f"{s} {st or 'absent'}" for s, st in enabled.items())
    fail_unless(service is not None, f"{vm.name} has no time synchronisation service enabled ({seen}), expected "
                                     "systemd-timesyncd (the k3s layer enables it); see `invoke k3s.plan`")
    # A container's clock is its host's: the kernel's discipline is the host's business, not the node's.
    fail_unless(synced or virt != "none",
                f"{vm.name}: NTPSynchronized={sync.get('NTPSynchronized', '?')}, expected yes ({service} is enabled "
                f"but has not synchronised); see `timedatectl timesync-status` on the node")


def test_secret_files_private(node: Any, vm: inventory.Vm, measured: Any) -> None:
    paths = [TOKEN] + ([KUBECONFIG_REMOTE] if vm.role == "server" else [])
    seen, problems = [], []
    for path in paths:
        done = node.run("sudo -n stat -c %s -- %s", "%a %U:%G", path)
        if done.rc != 0:
            seen.append(f"{path} absent")
            problems.append(f"{vm.name}: {path} cannot be read ({done.stderr.strip() or 'absent'}), expected a file "
                            "mode 0600 owned by root")
            continue
        mode, owner = done.stdout.split()
        seen.append(f"{path} {int(mode, 8):04o} {owner}")
        if int(mode, 8) & 0o077 or owner.split(":")[0] != "root":
            problems.append(f"{vm.name}: {path} is mode {int(mode, 8):04o} owned by {owner}, expected 0600 "
                            "(nothing for group or others) owned by root")
    measured("; ".join(seen))
    fail_unless(not problems, "; ".join(problems) + "; see `invoke k3s.plan` (it sets the token file and "
                                                     "write-kubeconfig-mode)")

"""End to end on the lab: lab.up, the Proxmox layers create the VMs, SSH finds real hosts, lab.down.

The lab tests run in file order and share one lab (session fixture); test_9_teardown takes it down.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from homelab import inventory
from homelab.lab import control, layout, netns

from .conftest import PROXMOX, Lab, host, invoke

INV = inventory.load()


def test_lab_up_starts_the_lab(lab: Lab) -> None:
    assert control.running()
    assert netns.exists(layout.NETNS)
    env = lab.env
    assert set(env) >= {"PROXMOX_TOKEN_ID", "PROXMOX_TOKEN_SECRET", "PROXMOX_CA_BUNDLE", "HOMELAB_SSH_PUBLIC_KEY"}
    assert (layout.STATE / layout.TARGET_ENV).stat().st_mode & 0o777 == 0o600
    assert env["PROXMOX_TOKEN_SECRET"] not in lab.up.text


def test_a_second_lab_up_changes_nothing(lab: Lab) -> None:
    pid = control.supervisor_pid()
    again = invoke("lab.up")
    assert again.code == 0, again.text
    assert "already running" in again.text
    assert control.supervisor_pid() == pid


def test_the_lab_network_has_no_way_out(lab: Lab) -> None:
    assert [r for r in netns.routes(layout.NETNS) if r.get("dst") == "default"] == []
    bridge = {a["local"] for link in netns.interfaces(layout.NETNS) for a in link.get("addr_info", [])
              if link["ifname"] == INV.network.bridge}
    assert str(INV.network.gateway) in bridge
    assert {str(n.address) for n in INV.proxmox.nodes} <= bridge
    # From inside the namespace, nothing outside the lab is reachable: no route, so no packet leaves.
    probe = ("import socket,sys\n"
             "for addr in sys.argv[1:]:\n"
             "    s = socket.socket(); s.settimeout(2)\n"
             "    print(addr, s.connect_ex((addr, 443)))\n")
    done = subprocess.run(["ip", "netns", "exec", layout.NETNS, sys.executable, "-c", probe,
                           "1.1.1.1", "10.0.0.1", "172.16.0.1"], capture_output=True, text=True, check=True)
    codes = dict(line.split() for line in done.stdout.splitlines())
    assert codes == {"1.1.1.1": str(errno.ENETUNREACH), "10.0.0.1": str(errno.ENETUNREACH),
                     "172.16.0.1": str(errno.ENETUNREACH)}


def test_up_creates_the_three_vms(built: Lab) -> None:
    status = control.status()
    names = {vm["name"]: vm for vm in status.vms}
    assert set(names) == {"ichigo", "naruto", "tanjiro"}
    assert all(vm["running"] for vm in names.values())


@pytest.mark.parametrize("name", ["ichigo", "naruto", "tanjiro"])
def test_vm_is_a_real_host_configured_by_cloud_init(name: str, ssh_config: Path) -> None:
    vm = INV.vm(name)
    h = host(name, ssh_config)
    assert h.run("hostname").stdout.strip() == name
    addresses = h.interface("eth0").addresses
    assert str(vm.address) in addresses
    assert h.service("ssh").is_running
    assert h.process.get(comm="systemd", pid=1)
    status = h.run("cloud-init status --wait")
    assert "status: done" in status.stdout, status.stdout + status.stderr
    assert h.user().name == INV.k3s.user
    route = h.run("ip -j route show default").stdout
    assert str(INV.network.gateway) in route
    resolv = h.run("resolvectl dns eth0").stdout
    assert str(INV.network.nameservers[0]) in resolv


def test_a_second_up_changes_nothing(built: Lab) -> None:
    plan = invoke("plan", "--only", PROXMOX, "--json")
    assert plan.code == 0, plan.text
    changes = json.loads(plan.out)
    assert [c for c in changes if c["action"] != "noop"] == []
    again = invoke("up", "--only", PROXMOX)
    assert again.code == 0, again.text
    assert again.text.count("changed=0") == 3, again.text

"""End to end on the lab: lab.up, the Proxmox layers create the VMs, SSH finds real hosts, lab.down.

The tests run in file order and share one lab (session fixture); the last one takes it down.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import testinfra

from homelab import inventory
from homelab.lab import control, layout, netns
from homelab.wait import Silent, poll

from .conftest import Lab, invoke

INV = inventory.load()
PROXMOX = "ceph,sdn,vms"


@pytest.fixture(scope="module")
def built(lab: Lab) -> Lab:
    """The lab after `invoke up --target lab` of the Proxmox layers."""
    result = invoke("up", "--only", PROXMOX, timeout=900)
    assert result.code == 0, result.text
    lab.timings["up"] = result.seconds
    lab.up_finished = time.monotonic()
    return lab


@pytest.fixture(scope="module")
def ssh_config(built: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SSH settings for the VMs, once each VM's host keys are recorded and sshd answers (boot, cloud-init)."""
    config = built.ssh_config(tmp_path_factory.mktemp("ssh") / "config")
    known_hosts = Path(built.env["HOMELAB_KNOWN_HOSTS"])

    def probe(vm: inventory.Vm) -> tuple[bool | None, str]:
        if not known_hosts.exists() or str(vm.address) not in known_hosts.read_text():
            return None, "host keys not recorded yet"
        done = subprocess.run(["ssh", "-F", str(config), str(vm.address), "true"], capture_output=True, text=True,
                              timeout=30, check=False)
        return (True if done.returncode == 0 else None), done.stderr.strip()[-120:]

    for vm in INV.k3s.vms:
        poll(f"SSH on {vm.name}", lambda vm=vm: probe(vm), timeout=300, progress=Silent(), first=0.5, maximum=3)
        built.timings[f"ssh {vm.name}"] = time.monotonic() - built.up_finished
    return config


def host(name: str, ssh_config: Path) -> testinfra.host.Host:
    vm = INV.vm(name)
    return testinfra.get_host(f"ssh://{vm.address}", ssh_config=str(ssh_config))


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


def test_lab_down_leaves_nothing_behind(built: Lab) -> None:
    down = invoke("lab.down")
    assert down.code == 0, down.text
    assert control.leftovers() == []
    assert netns.names(layout.NETNS_PREFIX) == []
    assert not layout.STATE.exists() and not layout.VAR.exists()
    with Path("/proc/self/mounts").open() as mounts:
        assert not [line for line in mounts if "homelab" in line]
    status = invoke("lab.status")
    assert status.code == 3 and "not running" in status.text

"""Pure planners: desired state and diffs as plain data, tested without a network."""

from __future__ import annotations

import urllib.parse

import pytest

from homelab import inventory, pipeline
from homelab.errors import Conflict, HomelabError
from homelab.layers import ceph, sdn, vms

INV = inventory.load()
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExample operator@example"


def test_desired_vm_config_comes_from_the_inventory() -> None:
    ichigo = INV.vm("ichigo")
    want = vms.desired_config(INV, ichigo, KEY)
    assert want["cores"] == "8"
    assert want["memory"] == "16384"
    assert want["ipconfig0"] == "ip=192.168.7.223/24,gw=192.168.7.1"
    assert want["nameserver"] == "192.168.7.1"
    assert want["searchdomain"] == "int.jigga.xyz"
    assert want["net1"] == "virtio,bridge=k3snet"
    # PVE wants sshkeys URL-encoded, spaces as %20 (not +), newline included.
    assert "+" not in want["sshkeys"] and "%20" in want["sshkeys"]
    assert urllib.parse.unquote(want["sshkeys"]).strip() == KEY
    assert vms.desired_config(INV, INV.vm("tanjiro"), KEY)["cores"] == "4"


@pytest.mark.parametrize(("key", "actual", "desired"), [
    ("agent", "1", "enabled=1"),
    ("agent", "enabled=1,fstrim_cloned_disks=1", "enabled=1"),
    ("memory", 16384, "16384"),
    ("net1", "virtio=BC:24:11:00:00:01,bridge=k3snet", "virtio,bridge=k3snet"),
    ("tags", "k3s-server;homelab", "homelab;k3s-server"),
    ("ipconfig0", "gw=192.168.7.1,ip=192.168.7.223/24", "ip=192.168.7.223/24,gw=192.168.7.1"),
    ("sshkeys", urllib.parse.quote(KEY, safe=""), urllib.parse.quote(KEY + "\n", safe="")),
])
def test_equal_meanings_compare_equal(key: str, actual: object, desired: str) -> None:
    assert vms.normalise(key, actual) == vms.normalise(key, desired)


@pytest.mark.parametrize(("key", "actual", "desired"), [
    ("agent", "0", "enabled=1"),
    ("agent", "enabled=0", "enabled=1"),
    ("net1", "virtio=BC:24:11:00:00:01,bridge=vmbr0", "virtio,bridge=k3snet"),
    ("net1", "e1000=BC:24:11:00:00:01,bridge=k3snet", "virtio,bridge=k3snet"),
    ("memory", "8192", "16384"),
])
def test_different_meanings_differ(key: str, actual: object, desired: str) -> None:
    assert vms.normalise(key, actual) != vms.normalise(key, desired)


def test_config_diff_names_only_what_differs_and_hides_keys() -> None:
    want = vms.desired_config(INV, INV.vm("naruto"), KEY)
    actual = dict(want, memory="8192", sshkeys="ssh-rsa%20AAAA%20old")
    diffs = {d.name: d for d in vms.config_diff(actual, want)}
    assert set(diffs) == {"memory", "sshkeys"}
    assert (diffs["memory"].old, diffs["memory"].new) == ("8192", "16384")
    assert "AAAA" not in str(diffs["sshkeys"])


def test_pending_changes_count_as_sent() -> None:
    entries = [{"key": "memory", "value": "8192", "pending": "16384"}, {"key": "cores", "value": 8},
               {"key": "net1", "value": "virtio,bridge=x", "delete": 1}]
    current, effective = vms.split_pending(entries)
    assert current == {"memory": "8192", "cores": 8, "net1": "virtio,bridge=x"}
    assert effective == {"memory": "16384", "cores": 8}


@pytest.mark.parametrize(("drive", "size"), [
    ("kubernetes:vm-201-disk-0,discard=on,size=128G", 128 * 1024**3),
    ("kubernetes:vm-201-disk-0,size=2252M", 2252 * 1024**2),
    ("kubernetes:vm-201-disk-0", None),
    (None, None),
])
def test_disk_size(drive: str | None, size: int | None) -> None:
    assert vms.disk_bytes(drive) == size


def test_lookup_fails_loudly_on_duplicate_names() -> None:
    by_name, by_id = vms.index_guests([
        {"type": "qemu", "vmid": 201, "name": "ichigo", "node": "pve-alpha", "status": "running"},
        {"type": "qemu", "vmid": 301, "name": "ichigo", "node": "pve-beta", "status": "stopped"},
    ])
    with pytest.raises(Conflict, match=r"2 VMs are named ichigo: 201 on pve-alpha, 301 on pve-beta"):
        vms.lookup("ichigo", 201, by_name, by_id)


def test_lookup_refuses_a_vmid_held_by_another_name() -> None:
    by_name, by_id = vms.index_guests([{"type": "qemu", "vmid": 201, "name": "other", "node": "pve-alpha"}])
    with pytest.raises(Conflict, match=r"VMID 201 is taken by 'other'"):
        vms.lookup("ichigo", 201, by_name, by_id)
    by_name, by_id = vms.index_guests([{"type": "qemu", "vmid": 305, "name": "ichigo", "node": "pve-alpha"}])
    with pytest.raises(Conflict, match=r"ichigo is VMID 305 .* inventory says 201"):
        vms.lookup("ichigo", 201, by_name, by_id)


def test_sdn_desired_state_names_every_pve_host_as_peer() -> None:
    want = sdn.desired(INV)
    assert want["zone"] == {"type": "vxlan", "peers": "192.168.7.233,192.168.7.234,192.168.7.235", "mtu": "1450"}
    assert want["vnet"] == {"zone": "k3s", "tag": "4200"}
    assert sdn.subnet_id(INV) == "k3s-10.100.0.0-24"


def test_sdn_written_state_overlays_pending_values() -> None:
    entry = {"zone": "k3s", "type": "vxlan", "peers": "192.168.7.233", "mtu": 1450, "state": "changed",
             "pending": {"peers": "192.168.7.235, 192.168.7.234,192.168.7.233", "mtu": "deleted"}}
    assert sdn.written(entry) == {"zone": "k3s", "type": "vxlan",
                                  "peers": "192.168.7.233,192.168.7.234,192.168.7.235"}


def test_ceph_pool_diff() -> None:
    actual = ceph.actual_pool({"pool_name": "kubernetes", "size": 2, "min_size": 2, "pg_autoscale_mode": "on",
                               "application_metadata": {"rbd": {}}})
    diffs = ceph.diff(actual, ceph.desired_pool(INV))
    assert [(d.name, d.old, d.new) for d in diffs] == [("size", "2", "3")]


@pytest.mark.parametrize(("only", "from_", "to", "expected"), [
    ([], None, None, list(pipeline.ORDER)),
    (["vms", "ceph"], None, None, ["ceph", "vms"]),
    ([], "sdn", "k3s", ["sdn", "vms", "k3s"]),
    ([], None, "vms", ["ceph", "sdn", "vms"]),
    ([], "network", None, ["network", "access", "monitoring", "apps"]),
])
def test_layer_selection(only: list[str], from_: str | None, to: str | None, expected: list[str]) -> None:
    assert pipeline.select(only, from_, to) == expected


@pytest.mark.parametrize(("only", "from_", "to", "message"), [
    (["vm"], None, None, "unknown layer 'vm'"),
    ([], "k3s", "ceph", "comes after"),
    (["ceph"], "ceph", None, "cannot be combined"),
])
def test_layer_selection_errors(only: list[str], from_: str | None, to: str | None, message: str) -> None:
    with pytest.raises(HomelabError, match=message):
        pipeline.select(only, from_, to)

"""The Proxmox layers (ceph, sdn, vms) against a fake PVE 9 cluster over HTTPS.

The fake validates every request against PVE's own API schema, so each test also asserts that
the layers sent nothing PVE would refuse.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from typing import Any

from homelab import pipeline
from homelab.context import Run
from homelab.inventory import Inventory
from homelab.lab.pve import LabPve
from homelab.lab.pvessh import CephAuth

from .conftest import SSH_KEY, Cluster, output

GiB = 1024**3


def accepted(run: Run, allow: tuple[str, ...] = ()) -> None:
    """No request was refused, except those whose path contains one of `allow`."""
    refused = [r for r in run.proxmox.stats.refused if not any(a in r[1] for a in allow)]
    assert refused == [], refused


def writes(run: Run) -> int:
    return sum(n for method, n in run.proxmox.stats.requests.items() if method != "GET")


def actions(outcome: pipeline.Outcome) -> list[tuple[str, str, str, str]]:
    return [(c.layer, c.kind, c.name, c.action) for p in outcome.plans for c in p.changes if c.action != "noop"]


# ------------------------------------------------------------------------------ converge


def test_converges_a_bare_cluster_to_the_inventory(cluster: Cluster) -> None:
    outcome, run = cluster.up()
    text = output(run)
    assert [(r.layer, r.status) for r in outcome.rows] == [("ceph", "ok"), ("sdn", "ok"), ("vms", "ok")], text
    accepted(run)
    pve = cluster.pve

    pool = pve.ceph_pools["kubernetes"]
    assert (pool["size"], pool["min_size"], pool["pg_autoscale_mode"]) == (3, 2, "on")
    assert "rbd" in pool["application_metadata"]
    storage = pve.storages["kubernetes"]
    assert (storage["type"], storage["pool"], storage["content"]) == ("rbd", "kubernetes", "images")
    # The Ceph CSI client, made over SSH (`ceph auth get-or-create`): rbd-only caps on the pool.
    client = CephAuth.of(pve).get("client.kubernetes")
    assert client is not None
    assert client.caps == {"mon": "profile rbd", "osd": "profile rbd pool=kubernetes",
                           "mgr": "profile rbd pool=kubernetes"}
    assert run.memo["ceph_csi_key"] == client.key and client.key not in text  # kept for ceph-csi, never shown

    zone = pve.sdn_running["zones"]["k3s"]
    assert zone["type"] == "vxlan"
    assert set(zone["peers"].split(",")) == {"192.168.7.233", "192.168.7.234", "192.168.7.235"}
    assert pve.sdn_running["vnets"]["k3snet"]["zone"] == "k3s"
    assert "k3s-10.100.0.0-24" in pve.sdn_running["subnets"]

    template = cluster.vm("debian-12-cloud")
    assert template.template and template.vmid == 9000 and template.node == "pve-alpha"
    assert template.config["scsi0"].startswith("kubernetes:")
    assert "import-from" not in template.config["scsi0"]
    assert template.config["serial0"] == "socket" and template.config["ide2"].startswith("kubernetes:")

    expected = {"ichigo": (201, "pve-alpha", "8", "192.168.7.223"), "naruto": (202, "pve-beta", "8", "192.168.7.224"),
                "tanjiro": (203, "pve-gamma", "4", "192.168.7.225")}
    for name, (vmid, node, cores, address) in expected.items():
        vm = cluster.vm(name)
        assert (vm.vmid, vm.node, vm.status) == (vmid, node, "running"), name
        cfg = vm.config
        assert str(cfg["cores"]) == cores and str(cfg["memory"]) == "16384"
        assert cfg["ipconfig0"] == f"ip={address}/24,gw=192.168.7.1"
        assert cfg["nameserver"] == "192.168.7.1" and cfg["searchdomain"] == "int.jigga.xyz"
        assert cfg["ciuser"] == "homelab"
        assert urllib.parse.unquote(cfg["sshkeys"]).strip() == SSH_KEY
        assert "size=128G" in cfg["scsi0"] and cfg["scsi0"].startswith(f"kubernetes:vm-{vmid}-")
        assert cfg["ide2"].startswith(f"kubernetes:vm-{vmid}-cloudinit")
        assert "bridge=k3snet" in cfg["net1"]
        assert vm.pending == {}, f"{name} has pending changes: {vm.pending}"

    assert "RECAP" in text and "changed=" in text
    assert "+ vm ichigo" in text and "+ pool kubernetes" in text


def test_second_run_changes_nothing(converged: Cluster) -> None:
    outcome, run = converged.up()
    assert actions(outcome) == []
    assert writes(run) == 0
    accepted(run)
    assert all(r.changed == 0 for r in outcome.rows)
    text = output(run)
    assert "running on pve-alpha, config matches" in text
    assert "Ceph health HEALTH_OK" in text


def test_noop_reads_stay_within_budget(converged: Cluster) -> None:
    """Reads grow with kinds and hosts: one /pending per VM, nothing per field or per task."""
    _, run = converged.up()
    assert run.proxmox.stats.requests == {"GET": 7 + len(converged.inv.k3s.vms)}


def test_dry_run_writes_nothing(cluster: Cluster) -> None:
    outcome, run = cluster.up(dry_run=True)
    assert writes(run) == 0
    assert [r.status for r in outcome.rows] == ["planned"] * 3
    planned = actions(outcome)
    assert ("vms", "vm", "ichigo", "create") in planned and ("ceph", "pool", "kubernetes", "create") in planned
    assert cluster.pve.ceph_pools.keys() == {".mgr"} and not [vm for vm in cluster.pve.vms]


def test_one_changed_value_plans_exactly_one_update(converged: Cluster, edit: Callable[..., Inventory]) -> None:
    inv = edit((("k3s", "vms", 1, "memory_mib"), 32768))
    outcome, run = converged.up(inv, dry_run=True)
    changes = [c for p in outcome.plans for c in p.pending]
    assert len(changes) == 1
    change = changes[0]
    assert (change.layer, change.kind, change.name, change.action) == ("vms", "vm", "naruto", "update")
    assert [(f.name, f.old, f.new) for f in change.fields] == [("memory", "16384", "32768")]
    assert change.note and "next reboot" in change.note

    outcome, run = converged.up(inv)
    assert not outcome.failed, output(run)
    accepted(run)
    assert converged.vm("naruto").pending == {"memory": "32768"}
    # Sent once: the next run sees it pending and changes nothing.
    outcome, run = converged.up(inv)
    assert actions(outcome) == [] and writes(run) == 0
    assert "pending until its next reboot: memory" in output(run)


def test_drift_is_shown_as_an_update_and_applied(converged: Cluster) -> None:
    vm = converged.vm("tanjiro")
    converged.call(_stop(converged.pve, vm))
    vm.config["cores"] = "2"
    vm.config["ipconfig0"] = "ip=192.168.7.99/24,gw=192.168.7.1"
    outcome, run = converged.up()
    assert not outcome.failed, output(run)
    planned = actions(outcome)
    assert ("vms", "vm", "tanjiro", "update") in planned and ("vms", "power", "tanjiro", "update") in planned
    fields = {f.name for p in outcome.plans for c in p.pending if c.kind == "vm" for f in c.fields}
    assert fields == {"cores", "ipconfig0"}
    assert str(vm.config["cores"]) == "4" and vm.status == "running"
    assert converged.up()[0].plans[2].pending == []


def test_grows_a_disk_and_refuses_to_shrink(converged: Cluster, edit: Callable[..., Inventory]) -> None:
    outcome, run = converged.up(edit((("k3s", "vms", 0, "disk_gib"), 200)))
    assert ("vms", "disk", "ichigo/scsi0", "update") in actions(outcome)
    assert "size=200G" in converged.vm("ichigo").config["scsi0"]
    outcome, run = converged.up(dry_run=True)
    assert actions(outcome) == []
    assert "PVE cannot shrink disks" in output(run)


def test_plan_json_lists_every_change(cluster: Cluster) -> None:
    outcome, _ = cluster.up(dry_run=True)
    data = json.loads(json.dumps([c.as_json() for p in outcome.plans for c in p.changes]))
    ichigo = next(c for c in data if c["name"] == "ichigo")
    assert set(ichigo) >= {"layer", "kind", "name", "action", "fields"}
    assert (ichigo["layer"], ichigo["kind"], ichigo["action"]) == ("vms", "vm", "create")
    assert {"name": "cores", "old": None, "new": "8"} in ichigo["fields"]
    assert "AAAAC3" not in json.dumps(data)


def test_down_removes_the_vms_and_a_second_down_does_nothing(converged: Cluster) -> None:
    run = converged.run()
    outcome = pipeline.execute(run, "down", ["vms"], dry_run=False)
    assert not outcome.failed, output(run)
    accepted(run)
    assert converged.pve.vms == []
    run = converged.run()
    outcome = pipeline.execute(run, "down", ["vms"], dry_run=False)
    assert actions(outcome) == [] and writes(run) == 0


# ---------------------------------------------------------------------------- conflicts


def test_duplicate_vm_names_stop_the_run(converged: Cluster) -> None:
    converged.pve.add_vm(301, "naruto", node="pve-gamma")
    outcome, run = converged.up()
    assert outcome.failed
    assert "2 VMs are named naruto: 202 on pve-beta, 301 on pve-gamma" in output(run)
    assert writes(run) == 0


def test_a_vmid_taken_by_another_vm_stops_the_run(cluster: Cluster) -> None:
    cluster.pve.add_vm(202, "someone-else", node="pve-beta")
    outcome, run = cluster.up(layers=["vms"])
    assert outcome.failed
    assert "VMID 202 is taken by 'someone-else'" in output(run)


# -------------------------------------------------------------------------------- faults


def _stop(pve: LabPve, vm: Any) -> Any:
    async def stop() -> None:
        await pve.task(vm.node, "qmstop", vm.vmid, "root@pam", _set_stopped(vm), vm=vm)
    return stop()


def _set_stopped(vm: Any) -> Callable[[], Any]:
    async def body() -> None:
        vm.status = vm.qmpstatus = "stopped"
    return body


def test_config_lock_is_reported_then_a_rerun_converges(converged: Cluster, edit: Callable[..., Inventory]) -> None:
    inv = edit((("k3s", "vms", 2, "cores"), 6))
    vm = converged.vm("tanjiro")
    converged.call(converged.pve.hold_config_lock(vm.vmid, None))
    outcome, run = converged.up(inv)
    assert outcome.failed
    text = output(run)
    assert "vm tanjiro" in text and "can't lock file '/var/lock/qemu-server/lock-203.conf'" in text
    converged.pve.release_config_lock(vm.vmid)
    outcome, run = converged.up(inv)
    assert not outcome.failed, output(run)
    assert vm.pending.get("cores") == "6" or str(vm.config.get("cores")) == "6"


def test_task_error_stops_with_pves_message_then_a_rerun_converges(cluster: Cluster) -> None:
    cluster.pve.fail("POST", "/nodes/pve-beta/qemu/202/status/start", error="qemu_exited_code", times=1)
    outcome, run = cluster.up()
    assert outcome.failed
    text = output(run)
    assert "vm naruto" in text and "QEMU exited with code 1" in text
    assert [r.status for r in outcome.rows] == ["ok", "ok", "failed"]
    outcome, run = cluster.up()
    assert not outcome.failed, output(run)
    assert ("vms", "power", "naruto", "update") in actions(outcome)
    assert cluster.vm("naruto").status == "running"
    assert actions(cluster.up()[0]) == []


def test_lost_quorum_is_explained_then_a_rerun_converges(cluster: Cluster) -> None:
    cluster.pve.lose_quorum()
    outcome, run = cluster.up()
    assert outcome.failed
    text = output(run)
    assert "no quorum" in text and "lost quorum" in text
    assert [r.status for r in outcome.rows] == ["failed", "not run", "not run"]
    cluster.pve.regain_quorum()
    outcome, run = cluster.up()
    assert not outcome.failed, output(run)


def test_offline_node_is_named_then_a_rerun_converges(cluster: Cluster) -> None:
    cluster.pve.set_node_offline("pve-gamma")
    outcome, run = cluster.up()
    assert outcome.failed
    text = output(run)
    assert "595" in text and "pve-gamma" in text and "offline" in text
    cluster.pve.set_node_offline("pve-gamma", offline=False)
    outcome, run = cluster.up()
    assert not outcome.failed, output(run)
    assert cluster.vm("tanjiro").status == "running"


def test_ceph_down_is_reported(cluster: Cluster) -> None:
    cluster.pve.ceph_down()
    outcome, run = cluster.up()
    assert outcome.failed
    assert "rados_connect failed" in output(run)


def test_flaky_network_is_retried_or_reported_and_reruns_converge(cluster: Cluster) -> None:
    cluster.pve.flaky_network(drop_rate=0.15, seed=7)
    results = []
    for _ in range(12):
        outcome, run = cluster.up()
        results.append(outcome.failed)
        if not outcome.failed:
            break
        text = output(run)
        # A failure says what happened and that a re-run resumes.
        assert "connection" in text.lower(), text
    assert results[-1] is False, "never converged on a flaky network"
    cluster.pve.flaky_network(drop_rate=0.0)
    outcome, run = cluster.up()
    assert actions(outcome) == []
    for vm in cluster.inv.k3s.vms:
        assert cluster.vm(vm.name).status == "running"


def test_unbuilt_layers_say_so(cluster: Cluster) -> None:
    run = cluster.run()
    registry = {"later": pipeline.NotBuiltLayer("later", "issue 99")}
    outcome = pipeline.execute(run, "up", ["later"], dry_run=False, registry=registry)
    assert outcome.rows[0].status == "not built"
    assert "not built yet (issue 99)" in output(run)


def test_down_passes_over_unbuilt_layers(converged: Cluster) -> None:
    run = converged.run()
    registry = {**pipeline.layers(), "later": pipeline.NotBuiltLayer("later", "issue 99")}
    outcome = pipeline.execute(run, "down", ["vms", "later"], dry_run=False, registry=registry)
    rows = {r.layer: r.status for r in outcome.rows}
    assert rows == {"later": "not built", "vms": "ok"}, output(run)
    assert converged.pve.vms == []


def test_csi_client_caps_drift_is_fixed_and_down_removes_the_client(converged: Cluster) -> None:
    auth = CephAuth.of(converged.pve)
    before = auth.get("client.kubernetes")
    assert before is not None
    with auth.lock:  # someone widened the caps by hand
        auth.entities["client.kubernetes"].caps = {"mon": "allow *", "osd": "allow *"}
    outcome, run = converged.up(layers=["ceph"])
    assert ("ceph", "auth", "client.kubernetes", "update") in actions(outcome), output(run)
    after = auth.get("client.kubernetes")
    assert after is not None and after.key == before.key  # the key stays; the caps are the inventory's again
    assert after.caps == {"mon": "profile rbd", "osd": "profile rbd pool=kubernetes",
                          "mgr": "profile rbd pool=kubernetes"}

    run = converged.run()
    pipeline.execute(run, "down", ["ceph", "sdn", "vms"], dry_run=False)
    assert auth.get("client.kubernetes") is None, output(run)

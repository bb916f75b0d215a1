"""The k3s layer on the lab: real SSH, systemd and files on the VMs; the stand-in k3s serves the API."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from homelab import inventory
from homelab.lab import layout

from .conftest import INV, REPO, Lab, Result, host, invoke

TO_K3S = ("--to", "k3s")
UPGRADE = "v1.33.6+k3s1"


def in_lab(code: str) -> Any:
    """Run Python inside the lab's namespace (the only place its addresses exist); returns its JSON output."""
    env = {**os.environ, "KUBECONFIG": str(layout.STATE / "operator" / "kubeconfig")}
    done = subprocess.run(["ip", "netns", "exec", layout.NETNS, sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120, check=False, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


NODES = """
import json
from kubernetes import client, config
config.load_kube_config(context="homelab")
core = client.CoreV1Api()
out = {"nodes": {}, "kubernetes": core.read_namespaced_service("kubernetes", "default").spec.cluster_ip}
for n in core.list_node().items:
    out["nodes"][n.metadata.name] = {
        "ip": [a.address for a in n.status.addresses if a.type == "InternalIP"],
        "ready": [c.status for c in n.status.conditions if c.type == "Ready"],
        "podCIDRs": n.spec.pod_cidrs or [], "version": n.status.node_info.kubelet_version,
        "unschedulable": bool(n.spec.unschedulable)}
print(json.dumps(out))
"""


class TokenWatch:
    """Scans every process's argv on this machine (the VMs' processes included) while a run goes on."""

    def __init__(self) -> None:
        self.token_file = layout.STATE / "operator" / "k3s-token"
        self.seen: list[str] = []
        self.scans = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            token = self.token_file.read_bytes().strip() if self.token_file.exists() else b""
            if token:
                for proc in Path("/proc").iterdir():
                    if proc.name.isdigit():
                        try:
                            if token in (proc / "cmdline").read_bytes():
                                self.seen.append(proc.name)
                        except OSError:
                            continue
                self.scans += 1
            self._stop.wait(0.1)

    def __enter__(self) -> TokenWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def k3s(built: Lab, ssh_config: Path) -> Iterator[Result]:
    with TokenWatch() as watch:
        result = invoke("up", *TO_K3S, timeout=900)
    assert result.code == 0, result.text
    assert watch.scans > 0, "the token watch never ran while the layer did"
    assert watch.seen == [], f"the token was in the argv of processes {watch.seen}"
    built.timings["k3s cold"] = result.seconds
    yield result


def test_three_ready_nodes_with_the_inventorys_addresses(k3s: Result) -> None:
    state = in_lab(NODES)
    nodes = state["nodes"]
    assert set(nodes) == {"ichigo", "naruto", "tanjiro"}
    pods = ipaddress.ip_network(str(INV.network.pod_cidr))
    cidrs = set()
    for vm in INV.k3s.vms:
        node = nodes[vm.name]
        assert node["ready"] == ["True"], vm.name
        assert node["ip"] == [str(vm.address)], vm.name
        assert node["podCIDRs"] and all(ipaddress.ip_network(c).subnet_of(pods) for c in node["podCIDRs"])
        cidrs.update(node["podCIDRs"])
    assert len(cidrs) == 3
    assert state["kubernetes"] == "10.43.0.1"


def test_units_run_on_the_nodes(k3s: Result, ssh_config: Path) -> None:
    server = host("ichigo", ssh_config)
    assert server.service("k3s").is_running and server.service("k3s").is_enabled
    assert server.socket("tcp://0.0.0.0:6443").is_listening
    for name in ("naruto", "tanjiro"):
        agent = host(name, ssh_config)
        assert agent.service("k3s-agent").is_running and agent.service("k3s-agent").is_enabled
        assert not agent.service("k3s").is_running
    config = yaml.safe_load(server.check_output("sudo cat /etc/rancher/k3s/config.yaml"))
    assert server.file("/etc/rancher/k3s/config.yaml").mode == 0o600
    assert config["cluster-cidr"] == "10.42.0.0/16" and config["service-cidr"] == "10.43.0.0/16"
    assert config["node-ip"] == "192.168.7.223" and "192.168.7.223" in config["tls-san"]
    assert set(config["disable"]) == {"servicelb", "traefik", "local-storage"}


def test_the_token_leaks_nowhere(k3s: Result, ssh_config: Path) -> None:
    token = (layout.STATE / "operator" / "k3s-token").read_text().strip()
    assert len(token) >= 32
    assert token not in k3s.text
    operator = layout.STATE / "operator"
    for path in (operator / "k3s-token", operator / "kubeconfig"):
        assert path.stat().st_mode & 0o077 == 0, path
    assert token not in (layout.STATE / layout.LOG).read_text(errors="replace")
    for vm in INV.k3s.vms:
        h = host(vm.name, ssh_config)
        # The pattern comes from the node's token file, so the token is not in this grep's argv either.
        found = h.run("sudo grep -rlsF -f /etc/rancher/k3s/token /etc /var/lib/rancher /run /tmp /home /var/log"
                      ).stdout.split()
        assert found, f"{vm.name}: the token file itself should be found"
        for path in found:
            mode = int(h.run("sudo stat -c %%a %s", path).stdout.strip(), 8)
            assert mode & 0o077 == 0, f"{vm.name}:{path} holds the token and is mode {oct(mode)}"
        journal = h.run("sudo journalctl --no-pager -q -o cat").stdout
        assert token not in journal, f"{vm.name}: the token is in the journal"
        unit = "k3s" if vm.role == "server" else "k3s-agent"
        assert token not in h.file(f"/etc/systemd/system/{unit}.service").content_string


def test_kubeconfig_is_named_and_points_at_the_control_plane(k3s: Result) -> None:
    doc = yaml.safe_load((layout.STATE / "operator" / "kubeconfig").read_text())
    assert doc["current-context"] == "homelab"
    assert doc["clusters"][0]["cluster"]["server"] == "https://192.168.7.223:6443"


def test_a_second_run_changes_nothing(k3s: Result) -> None:
    plan = invoke("plan", *TO_K3S, "--json")
    assert plan.code == 0, plan.text
    assert [c for c in json.loads(plan.out) if c["action"] != "noop"] == []
    again = invoke("up", *TO_K3S)
    assert again.code == 0, again.text
    assert again.text.count("changed=0 ") == 4, again.text


def _invocations(ssh_config: Path) -> dict[str, str]:
    out = {}
    for vm in INV.k3s.vms:
        unit = "k3s" if vm.role == "server" else "k3s-agent"
        out[vm.name] = host(vm.name, ssh_config).run(f"systemctl show -p InvocationID --value {unit}").stdout.strip()
    return out


def test_a_changed_input_restarts_only_that_nodes_unit(k3s: Result, ssh_config: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(inventory.DEFAULT_PATH.read_text())
    data["k3s"]["vms"][1]["pve_node"] = "pve-gamma"  # naruto's node-label changes, nothing else's
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(data))
    before = _invocations(ssh_config)
    result = invoke("up", "--only", "k3s", "--inventory", str(edited))
    assert result.code == 0, result.text
    after = _invocations(ssh_config)
    assert after["naruto"] != before["naruto"]
    assert after["ichigo"] == before["ichigo"] and after["tanjiro"] == before["tanjiro"]
    assert "config naruto" in result.text and "config ichigo" not in result.text
    restored = invoke("up", "--only", "k3s")
    assert restored.code == 0, restored.text


def test_upgrade_rolls_one_node_at_a_time_control_plane_first(k3s: Result) -> None:
    result = invoke("k3s.upgrade", "--version", UPGRADE, timeout=900)
    assert result.code == 0, result.text
    order = [line.split(":")[0].strip() for line in result.out.splitlines() if line.endswith(f"now K3s {UPGRADE}")]
    assert order == ["ichigo", "naruto", "tanjiro"], result.out
    state = in_lab(NODES)
    assert {n["version"] for n in state["nodes"].values()} == {UPGRADE}
    assert not any(n["unschedulable"] for n in state["nodes"].values())
    assert all(n["ready"] == ["True"] for n in state["nodes"].values())


def test_uninstall_removes_k3s_from_every_node(k3s: Result, ssh_config: Path) -> None:
    refused = invoke("k3s.uninstall")
    assert refused.code == 1 and "--yes" in refused.text  # prints the plan, changes nothing
    assert host("ichigo", ssh_config).service("k3s").is_running
    result = invoke("k3s.uninstall", "--yes")
    assert result.code == 0, result.text
    for vm in INV.k3s.vms:
        h = host(vm.name, ssh_config)
        unit = "k3s" if vm.role == "server" else "k3s-agent"
        assert not h.service(unit).is_running
        assert not h.file("/usr/local/bin/k3s").exists
        assert not h.file(f"/etc/systemd/system/{unit}.service").exists
        assert not h.file("/etc/rancher/k3s").exists
    assert not (layout.STATE / "operator" / "kubeconfig").exists()
    plan = invoke("k3s.plan", "--json")
    assert plan.code == 0, plan.text
    assert {c["kind"] for c in json.loads(plan.out) if c["action"] == "create"} >= {"binary", "config", "token"}

"""What the kubelet inside K3s does for the API: register the Node, post its status, renew its Lease.

Both `k3s server` (in process) and `k3s agent` (over HTTPS) use it through a `call` function.
"""

from __future__ import annotations

import json
import os
import platform
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .log import Log

# (method, path, body, content type) -> (HTTP status, decoded JSON body)
Call = Callable[[str, str, Any, str], tuple[int, Any]]
LEASE_DURATION = 40
DEFAULT_NODE_GRACE = 20.0
HEARTBEAT_INTERVAL = 5.0


def node_grace(env: Mapping[str, str]) -> float:
    try:
        return float(env.get("K3S_STANDIN_NODE_GRACE", "") or DEFAULT_NODE_GRACE)
    except ValueError:
        return DEFAULT_NODE_GRACE


def heartbeat_interval(env: Mapping[str, str]) -> float:
    """How often a kubelet posts its status: every 5 s, or a third of a shorter grace period."""
    return min(HEARTBEAT_INTERVAL, node_grace(env) / 3)


class KubeletError(Exception):
    pass


def _read(path: str, default: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip() or default
    except OSError:
        return default


def _os_image() -> str:
    for line in _read("/etc/os-release", "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.partition("=")[2].strip().strip('"')
    return "Linux"


def _memory_ki() -> int:
    for line in _read("/proc/meminfo", "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 4 * 1024 * 1024


def arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm"}.get(
        machine, machine or "amd64")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class NodeParams:
    name: str
    internal_ip: str
    external_ip: str | None
    version: str
    control_plane: bool
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)
    node_args: list[str] = field(default_factory=list)


def node_labels(p: NodeParams) -> dict[str, str]:
    labels = {
        "beta.kubernetes.io/arch": arch(), "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/instance-type": "k3s", "kubernetes.io/arch": arch(),
        "kubernetes.io/hostname": p.name, "kubernetes.io/os": "linux", "node.kubernetes.io/instance-type": "k3s",
    }
    if p.control_plane:
        labels["node-role.kubernetes.io/control-plane"] = "true"
        labels["node-role.kubernetes.io/master"] = "true"
    labels.update(p.labels)
    return labels


def node_annotations(p: NodeParams) -> dict[str, str]:
    out = {"alpha.kubernetes.io/provided-node-ip": p.internal_ip, "k3s.io/hostname": p.name,
           "k3s.io/internal-ip": p.internal_ip, "k3s.io/node-args": json.dumps(p.node_args),
           "node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true"}
    if p.external_ip:
        out["k3s.io/external-ip"] = p.external_ip
    return out


def node_status(p: NodeParams, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status a healthy kubelet posts; transition times are kept when a condition does not change."""
    stamp = now()
    old = {c.get("type"): c for c in ((previous or {}).get("conditions") or []) if isinstance(c, dict)}

    def cond(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
        prev = old.get(kind)
        transition = prev.get("lastTransitionTime", stamp) if prev and prev.get("status") == status else stamp
        return {"type": kind, "status": status, "lastHeartbeatTime": stamp, "lastTransitionTime": transition,
                "reason": reason, "message": message}

    addresses = [{"type": "InternalIP", "address": p.internal_ip}]
    if p.external_ip:
        addresses.append({"type": "ExternalIP", "address": p.external_ip})
    addresses.append({"type": "Hostname", "address": p.name})
    capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{_memory_ki()}Ki", "pods": "110",
                "ephemeral-storage": "61202244Ki", "hugepages-1Gi": "0", "hugepages-2Mi": "0"}
    return {
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ],
        "addresses": addresses,
        "capacity": capacity,
        "allocatable": dict(capacity),
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "machineID": _read("/etc/machine-id", uuid.uuid5(uuid.NAMESPACE_DNS, p.name).hex),
            "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, "system/" + p.name)),
            "bootID": _read("/proc/sys/kernel/random/boot_id", str(uuid.uuid4())),
            "kernelVersion": platform.release(),
            "osImage": _os_image(),
            "containerRuntimeVersion": "stand-in://" + p.version,
            "kubeletVersion": p.version,
            "kubeProxyVersion": p.version,
            "operatingSystem": "linux",
            "architecture": arch(),
        },
    }


class Kubelet:
    def __init__(self, call: Call, params: NodeParams, log: Log) -> None:
        self.call, self.p, self.log = call, params, log
        self.registered = False

    def _node_path(self) -> str:
        return f"/api/v1/nodes/{self.p.name}"

    def register(self) -> None:
        status, existing = self.call("GET", self._node_path(), None, "")
        if status == 404:
            body = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": self.p.name, "labels": node_labels(self.p),
                                 "annotations": node_annotations(self.p)},
                    "spec": {"taints": self.p.taints} if self.p.taints else {},
                    "status": node_status(self.p)}
            status, created = self.call("POST", "/api/v1/nodes", body, "application/json")
            if status == 409:
                return self.register()
            if status != 201:
                raise KubeletError(f"registering node {self.p.name}: HTTP {status}: {_message(created)}")
            self.log.info(f"Successfully registered node {self.p.name}")
        elif status == 200:
            annotations = node_annotations(self.p)
            patch = {"metadata": {"annotations": annotations}}
            status, updated = self.call("PATCH", self._node_path(), patch, "application/merge-patch+json")
            if status != 200:
                raise KubeletError(f"updating node {self.p.name}: HTTP {status}: {_message(updated)}")
            self.log.info(f"Node {self.p.name} already registered; updating its status")
            self.heartbeat(existing)
        else:
            raise KubeletError(f"reading node {self.p.name}: HTTP {status}: {_message(existing)}")
        self.registered = True
        self.renew_lease()
        return None

    def heartbeat(self, current: Any = None) -> None:
        if current is None:
            status, current = self.call("GET", self._node_path(), None, "")
            if status == 404:
                self.log.warning(f"Node {self.p.name} not found; registering it again")
                self.register()
                return
            if status != 200:
                raise KubeletError(f"reading node {self.p.name}: HTTP {status}: {_message(current)}")
        new_status = node_status(self.p, (current or {}).get("status"))
        status, body = self.call("PATCH", self._node_path() + "/status", {"status": new_status},
                                 "application/merge-patch+json")
        if status == 404:
            self.register()
            return
        if status != 200:
            raise KubeletError(f"updating node status of {self.p.name}: HTTP {status}: {_message(body)}")
        self.renew_lease()

    def renew_lease(self) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1000000:06d}Z"
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.p.name, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": self.p.name, "leaseDurationSeconds": LEASE_DURATION, "renewTime": stamp}}
        path = (f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.p.name}"
                "?fieldManager=k3s&force=true")
        status, body = self.call("PATCH", path, lease, "application/apply-patch+yaml")
        if status not in (200, 201):
            self.log.warning(f"renewing the node lease of {self.p.name}: HTTP {status}: {_message(body)}")


def _message(body: Any) -> str:
    if isinstance(body, dict):
        return str(body.get("message") or body)
    return str(body)[:200]

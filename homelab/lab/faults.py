"""The lab's fault catalog: `invoke lab.fault NAME` breaks one thing, `invoke lab.fault --clear` mends it.

Every fault names the live-suite checks it must trip (node ids of tests/live/CHECKS.md, relative to
tests/live/; a parametrised check without `[..]` means any of its params), so that the catalog proves
each check can fail. A fault works only on the lab: inside the lab's network namespace (PVE API, SSH,
the cluster's API, the fake Cloudflare and Tailscale) or on the lab's own processes (the supervisor's
control socket, the VM containers).

One fault at a time. Injecting first reads what it will change and records it in the lab's state
directory (`faults.json`, 0600); clearing restores exactly those values (no `invoke up` needed) and
polls, with a deadline, until the thing is mended. Where a fault takes effect through a controller
(a Node turning NotReady, a connector dropping), injecting waits until it has.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

from homelab.errors import HomelabError
from homelab.lab import layout
from homelab.wait import Progress, poll

if TYPE_CHECKING:
    from rich.console import Console

    from homelab.clients.cloudflare import Cloudflare
    from homelab.clients.kube import Kube
    from homelab.clients.proxmox import Proxmox
    from homelab.clients.ssh import Done, Hosts
    from homelab.clients.tailscale import Tailscale
    from homelab.context import Run
    from homelab.inventory import Inventory, Vm
    from homelab.lab.faultctl import ControlClient

STATE_FILE = "faults.json"
# The live suite's markers (tests/live/CHECKS.md); a fault's layer is one of them.
LAYERS = ("proxmox", "vms", "nodes", "k3s", "network", "storage", "tls", "dns", "access", "apps", "monitoring")
FAULT_LABEL = "lab.homelab.jigga.xyz/fault"
FAULT_COMMENT = "homelab lab fault"
# The stand-in's data dir on the control plane (homelab/lab/k3s_standin/config.py DEFAULT_DATA_DIR) and
# where it keeps each issuer's CA (k3s_standin/certs.py).
STANDIN_ACME = "/var/lib/rancher/k3s/server/tls/standin-acme"
# An address nothing answers at (TEST-NET-2, RFC 5737): "a public record pointing elsewhere".
ELSEWHERE = "198.51.100.80"

Record = dict[str, Any]
Probe = tuple[bool | None, str]


class FaultError(HomelabError):
    """A fault cannot be injected or cleared."""

    exit_code = 2


# =========================================================================================== mechanisms


class NothingToInject(FaultError):
    """The thing is broken already: refused before anything changed, and never recorded as active."""


class Mechanism:
    """How one fault is made and mended. `inject` fills `record` with the originals before it changes
    anything; `clear` restores them; `mended` and `effect` are poll probes: (True, detail) when done."""

    effect_timeout: ClassVar[float] = 60.0
    mend_timeout: ClassVar[float] = 180.0

    def inject(self, lab: LabAccess, record: Record) -> None:
        raise NotImplementedError

    def clear(self, lab: LabAccess, record: Record) -> None:
        raise NotImplementedError

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        raise NotImplementedError

    def effect(self, lab: LabAccess, record: Record) -> Probe:
        return True, "in effect"


def _done(ok: bool, detail: str) -> Probe:
    return (True if ok else None), detail


# ----------------------------------------------------------------------------------------- Proxmox


def _pve_cluster(lab: LabAccess) -> dict[str, Any]:
    items = lab.proxmox.get("/cluster/status")
    return next((i for i in items if i.get("type") == "cluster"), {})


@dataclass(frozen=True)
class QuorumLost(Mechanism):
    def inject(self, lab: LabAccess, record: Record) -> None:
        record["before"] = lab.control.state()
        if not record["before"]["quorate"]:
            raise NothingToInject("the PVE cluster has no quorum already; nothing to inject")
        lab.control.switch("lose-quorum")

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.control.switch("regain-quorum")

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        quorate = _pve_cluster(lab).get("quorate")
        return _done(quorate == 1, f"/cluster/status quorate={quorate}")


@dataclass(frozen=True)
class NodeOffline(Mechanism):
    node: str

    def inject(self, lab: LabAccess, record: Record) -> None:
        lab.require_pve_node(self.node)
        record["before"] = lab.control.state()
        if not record["before"]["nodes"].get(self.node, True):
            raise NothingToInject(f"PVE node {self.node} is offline already; nothing to inject")
        lab.control.switch("node-offline", node=self.node)

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.control.switch("node-online", node=self.node)

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        status = next((n.get("status") for n in lab.proxmox.get("/nodes") if n.get("node") == self.node), None)
        return _done(status == "online", f"/nodes says {self.node} is {status}")


@dataclass(frozen=True)
class CephTrouble(Mechanism):
    switch: str  # ceph-warn or ceph-down

    def inject(self, lab: LabAccess, record: Record) -> None:
        record["before"] = lab.control.state()
        ceph = record["before"]["ceph"]
        if ceph["health"] != "HEALTH_OK" or ceph["down"]:
            raise NothingToInject(f"Ceph is {ceph['health']} already; nothing to inject")
        lab.control.switch(self.switch)

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.control.switch("ceph-recover")

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        try:
            health = (lab.proxmox.get("/cluster/ceph/status").get("health") or {}).get("status")
        except HomelabError as exc:
            return None, str(exc)[:120]
        return _done(health == "HEALTH_OK", f"Ceph {health}")


@dataclass(frozen=True)
class SdnPending(Mechanism):
    """The vnet's VXLAN tag edited and not applied: PVE keeps it pending until PUT /cluster/sdn."""

    def _vnet(self, lab: LabAccess) -> str:
        return lab.inv.proxmox.sdn.vnet.name

    def _pending(self, lab: LabAccess) -> dict[str, Any]:
        vnets = lab.proxmox.get("/cluster/sdn/vnets", pending=1)
        return next((v for v in vnets if v.get("vnet") == self._vnet(lab)), {})

    def inject(self, lab: LabAccess, record: Record) -> None:
        vnet = self._vnet(lab)
        current = lab.proxmox.get(f"/cluster/sdn/vnets/{vnet}")
        if self._pending(lab).get("state"):
            raise NothingToInject(f"vnet {vnet} has pending changes already; nothing to inject")
        record["tag"] = int(current["tag"])
        lab.proxmox.write("put", f"/cluster/sdn/vnets/{vnet}", tag=record["tag"] + 1)

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.proxmox.write("put", f"/cluster/sdn/vnets/{self._vnet(lab)}", tag=record["tag"])

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        state = self._pending(lab).get("state")
        return _done(not state, f"vnet state {state or 'applied'}")


# --------------------------------------------------------------------------------------------- VMs


def _node_ready(lab: LabAccess, name: str) -> bool | None:
    """The Node's Ready condition (None when the API does not answer or the Node is missing)."""
    try:
        node = lab.kget("v1", "Node", "", name)
    except HomelabError:
        return None
    if node is None:
        return None
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


@dataclass(frozen=True)
class VmStopped(Mechanism):
    vm: str
    effect_timeout: ClassVar[float] = 180.0
    mend_timeout: ClassVar[float] = 300.0

    def _path(self, lab: LabAccess) -> str:
        vm = lab.vm(self.vm)
        return f"/nodes/{vm.pve_node}/qemu/{vm.vmid}"

    def inject(self, lab: LabAccess, record: Record) -> None:
        status = lab.proxmox.get(self._path(lab) + "/status/current").get("status")
        if status != "running":
            raise NothingToInject(f"VM {self.vm} is {status} already; nothing to inject")
        record["status"] = status
        lab.proxmox.run_task("post", self._path(lab) + "/status/stop", f"stop VM {self.vm}", lab.progress)

    def effect(self, lab: LabAccess, record: Record) -> Probe:
        ready = _node_ready(lab, self.vm)
        return _done(ready is False, f"Node {self.vm} Ready={ready}")

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.proxmox.run_task("post", self._path(lab) + "/status/start", f"start VM {self.vm}", lab.progress)

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        status = lab.proxmox.get(self._path(lab) + "/status/current").get("status")
        if status != "running":
            return None, f"VM {status}"
        answers, detail = lab.ssh_answers(self.vm)
        if not answers:
            return None, detail
        ready = _node_ready(lab, self.vm)
        return _done(bool(ready), f"Node {self.vm} Ready={ready}")


@dataclass(frozen=True)
class GuestAgentOff(Mechanism):
    """The VM's guest agent option off (the lab applies it at once; real PVE at the next boot)."""

    vm: str

    def _path(self, lab: LabAccess) -> str:
        vm = lab.vm(self.vm)
        return f"/nodes/{vm.pve_node}/qemu/{vm.vmid}"

    def inject(self, lab: LabAccess, record: Record) -> None:
        config = lab.proxmox.get(self._path(lab) + "/config")
        record["agent"] = None if config.get("agent") is None else str(config["agent"])
        lab.proxmox.write("put", self._path(lab) + "/config", agent="0")

    def clear(self, lab: LabAccess, record: Record) -> None:
        if record.get("agent") is None:
            lab.proxmox.write("put", self._path(lab) + "/config", delete="agent")
        else:
            lab.proxmox.write("put", self._path(lab) + "/config", agent=record["agent"])

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        try:
            lab.proxmox.get(self._path(lab) + "/agent/network-get-interfaces")
        except HomelabError as exc:
            return None, str(exc)[:120]
        return True, "the guest agent answers"


# ------------------------------------------------------------------------------------------- nodes


def _stdout(done: Done) -> str:
    return done.stdout.strip()


@dataclass(frozen=True)
class UnitStopped(Mechanism):
    vm: str
    unit: str
    # What proves the fault is in effect and mended besides the unit: the Node's readiness (an agent),
    # or the API answering (the server).
    watch: str = "node"  # node | api
    effect_timeout: ClassVar[float] = 180.0

    def _active(self, lab: LabAccess) -> str:
        return _stdout(lab.ssh(self.vm, ["systemctl", "is-active", self.unit], check=False))

    def inject(self, lab: LabAccess, record: Record) -> None:
        record["active"] = self._active(lab)
        if record["active"] != "active":
            raise NothingToInject(f"{self.unit} on {self.vm} is {record['active']} already; nothing to inject")
        lab.ssh(self.vm, ["systemctl", "stop", self.unit])

    def effect(self, lab: LabAccess, record: Record) -> Probe:
        if self.watch == "node":
            ready = _node_ready(lab, self.vm)
            return _done(ready is False, f"Node {self.vm} Ready={ready}")
        state = self._active(lab)
        return _done(state != "active", f"{self.unit} {state}")

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.ssh(self.vm, ["systemctl", "start", self.unit])

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        state = self._active(lab)
        if state != "active":
            return None, f"{self.unit} {state}"
        if self.watch == "node":
            ready = _node_ready(lab, self.vm)
            return _done(bool(ready), f"Node {self.vm} Ready={ready}")
        try:
            lab.kube.request("GET", "/version")
        except HomelabError as exc:
            return None, str(exc)[:120]
        return True, "the Kubernetes API answers"


@dataclass(frozen=True)
class SshdStopped(Mechanism):
    """sshd stopped inside the VM; made and mended from the container itself (SSH cannot mend it)."""

    vm: str

    def inject(self, lab: LabAccess, record: Record) -> None:
        record["unit"] = "ssh.service"
        lab.guest(self.vm, ["systemctl", "stop", "ssh.service"])

    def effect(self, lab: LabAccess, record: Record) -> Probe:
        answers, detail = lab.ssh_answers(self.vm)
        return _done(not answers, detail)

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.guest(self.vm, ["systemctl", "start", "ssh.service"])

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        return lab.ssh_answers(self.vm)


@dataclass(frozen=True)
class WrongHostname(Mechanism):
    vm: str
    wrong: str

    def _hostname(self, lab: LabAccess) -> str:
        return _stdout(lab.ssh(self.vm, ["hostname"]))

    def inject(self, lab: LabAccess, record: Record) -> None:
        record["hostname"] = self._hostname(lab)
        record["etc_hostname"] = lab.ssh(self.vm, ["cat", "/etc/hostname"]).stdout
        record["mode"] = _stdout(lab.ssh(self.vm, ["stat", "-c", "%a", "/etc/hostname"]))
        lab.ssh(self.vm, ["hostname", self.wrong])
        lab.hosts.put(str(lab.vm(self.vm).address), (self.wrong + "\n").encode(), "/etc/hostname", "0644")

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.ssh(self.vm, ["hostname", record["hostname"]])
        lab.hosts.put(str(lab.vm(self.vm).address), record["etc_hostname"].encode(), "/etc/hostname",
                      "0" + record["mode"])

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        now = self._hostname(lab)
        return _done(now == record["hostname"], f"hostname {now}")


@dataclass(frozen=True)
class TimeSyncOff(Mechanism):
    """systemd-timesyncd disabled and stopped (`timedatectl set-ntp false` does the same)."""

    vm: str
    unit: str = "systemd-timesyncd.service"

    def _states(self, lab: LabAccess) -> tuple[str, str]:
        enabled = _stdout(lab.ssh(self.vm, ["systemctl", "is-enabled", self.unit], check=False))
        active = _stdout(lab.ssh(self.vm, ["systemctl", "is-active", self.unit], check=False))
        return enabled, active

    def inject(self, lab: LabAccess, record: Record) -> None:
        record["enabled"], record["active"] = self._states(lab)
        if record["enabled"] != "enabled":
            raise NothingToInject(f"{self.unit} on {self.vm} is {record['enabled']} already; nothing to inject")
        lab.ssh(self.vm, ["systemctl", "disable", "--now", self.unit])

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.ssh(self.vm, ["systemctl", "enable", self.unit])
        if record["active"] == "active":
            lab.ssh(self.vm, ["systemctl", "start", self.unit])

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        enabled, active = self._states(lab)
        ok = enabled == record["enabled"] and (active == "active") == (record["active"] == "active")
        return _done(ok, f"{self.unit} {enabled}, {active}")


@dataclass(frozen=True)
class FileMode(Mechanism):
    vm: str
    path: str
    mode: str = "644"

    def _mode(self, lab: LabAccess) -> str:
        return _stdout(lab.ssh(self.vm, ["stat", "-c", "%a", self.path]))

    def inject(self, lab: LabAccess, record: Record) -> None:
        record["mode"] = self._mode(lab)
        if record["mode"] == self.mode:
            raise NothingToInject(f"{self.path} on {self.vm} is {self.mode} already; nothing to inject")
        lab.ssh(self.vm, ["chmod", self.mode, self.path])

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.ssh(self.vm, ["chmod", record["mode"], self.path])

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        mode = self._mode(lab)
        return _done(mode == record["mode"], f"{self.path} mode {mode}")


# -------------------------------------------------------------------------------------- Kubernetes


def _lb_ip(service: dict[str, Any] | None) -> str | None:
    ingress = (((service or {}).get("status") or {}).get("loadBalancer") or {}).get("ingress") or [{}]
    ip = ingress[0].get("ip")
    return str(ip) if ip else None


LB_ANNOTATION = "metallb.io/loadBalancerIPs"


@dataclass(frozen=True)
class HelmLbAddress(Mechanism):
    """A chart's requested LoadBalancer address changed in its HelmChart's values (the chart double writes
    the annotation on the Service from them), to `to`: another address of the inventory."""

    chart: str
    service_namespace: str
    to: str  # an attribute of inventory.network: traefik or internal_dns

    def _chart(self, lab: LabAccess) -> dict[str, Any]:
        chart = lab.kget("helm.cattle.io/v1", "HelmChart", "kube-system", self.chart)
        if chart is None:
            raise FaultError(f"HelmChart kube-system/{self.chart} does not exist", hint="run `invoke up` first")
        return chart

    def _service(self, lab: LabAccess) -> dict[str, Any] | None:
        return lab.kget("v1", "Service", self.service_namespace, self.chart)

    def inject(self, lab: LabAccess, record: Record) -> None:
        values_text = str((self._chart(lab).get("spec") or {}).get("valuesContent") or "")
        values = yaml.safe_load(values_text) or {}
        annotations = values.setdefault("service", {}).setdefault("annotations", {})
        record["values"] = values_text
        record["address"] = str(annotations.get(LB_ANNOTATION) or "")
        record["wanted"] = str(getattr(lab.inv.network, self.to))
        annotations[LB_ANNOTATION] = record["wanted"]
        lab.kpatch("helm.cattle.io/v1", "HelmChart", "kube-system", self.chart,
                   {"spec": {"valuesContent": yaml.safe_dump(values, sort_keys=False)}})

    def effect(self, lab: LabAccess, record: Record) -> Probe:
        service = self._service(lab)
        asked = ((service or {}).get("metadata", {}).get("annotations") or {}).get(LB_ANNOTATION)
        ip = _lb_ip(service)
        return _done(asked == record["wanted"] and ip != record["address"], f"asks {asked}, has {ip or 'none'}")

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.kpatch("helm.cattle.io/v1", "HelmChart", "kube-system", self.chart,
                   {"spec": {"valuesContent": record["values"]}})

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        ip = _lb_ip(self._service(lab))
        return _done(ip == record["address"], f"Service {self.service_namespace}/{self.chart} has {ip or 'none'}")


@dataclass(frozen=True)
class MetallbPoolChanged(Mechanism):
    """The IPAddressPool grown by one address past the inventory's range."""

    def _pool(self, lab: LabAccess) -> dict[str, Any]:
        wanted = [str(r) for r in lab.inv.network.metallb_pool]
        pools = lab.klist("metallb.io/v1beta1", "IPAddressPool", "metallb-system")
        found = [p for p in pools if (p.get("spec") or {}).get("addresses") == wanted]
        if not found:
            raise FaultError(f"no IPAddressPool in metallb-system has the inventory's addresses {wanted}")
        return found[0]

    def inject(self, lab: LabAccess, record: Record) -> None:
        import ipaddress

        pool = self._pool(lab)
        record["name"] = pool["metadata"]["name"]
        record["addresses"] = list(pool["spec"]["addresses"])
        last = str(record["addresses"][-1]).split("-")[-1].split("/")[0]
        extra = str(ipaddress.ip_address(last) + 1)
        lab.kpatch("metallb.io/v1beta1", "IPAddressPool", "metallb-system", record["name"],
                   {"spec": {"addresses": [*record["addresses"], f"{extra}/32"]}})

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.kpatch("metallb.io/v1beta1", "IPAddressPool", "metallb-system", record["name"],
                   {"spec": {"addresses": record["addresses"]}})

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        pool = lab.kget("metallb.io/v1beta1", "IPAddressPool", "metallb-system", record["name"]) or {}
        have = (pool.get("spec") or {}).get("addresses")
        return _done(have == record["addresses"], f"addresses {have}")


def _app_sync(lab: LabAccess, namespace: str, name: str) -> str | None:
    app = lab.kget("argoproj.io/v1alpha1", "Application", namespace, name)
    return (((app or {}).get("status") or {}).get("sync") or {}).get("status")


@dataclass(frozen=True)
class GitopsDrift(Mechanism):
    """An object Argo CD syncs from gitops/ edited in the cluster: the app of apps (no self-heal) reports
    OutOfSync and leaves it."""

    application: str = "homelab"

    def _object(self, lab: LabAccess) -> dict[str, Any]:
        from homelab.target import REPO

        for path in sorted((REPO / lab.inv.gitops.path).glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
                if isinstance(doc, dict) and doc.get("kind") == "ConfigMap" and doc.get("data"):
                    return doc
        raise FaultError(f"no ConfigMap with data in {lab.inv.gitops.path} to drift")

    def _namespace(self, lab: LabAccess) -> str:
        return next(app.namespace for app in lab.inv.apps if app.name == "argocd")

    def inject(self, lab: LabAccess, record: Record) -> None:
        obj = self._object(lab)
        ns = obj["metadata"].get("namespace") or self._namespace(lab)
        live = lab.kget("v1", "ConfigMap", ns, obj["metadata"]["name"])
        if live is None:
            raise FaultError(f"ConfigMap {ns}/{obj['metadata']['name']} is not in the cluster (is Argo CD synced?)")
        record.update(namespace=ns, name=obj["metadata"]["name"], data=live.get("data") or {})
        key = sorted(record["data"])[0]
        lab.kpatch("v1", "ConfigMap", ns, record["name"], {"data": {key: "drifted by invoke lab.fault"}})

    def effect(self, lab: LabAccess, record: Record) -> Probe:
        sync = _app_sync(lab, self._namespace(lab), self.application)
        return _done(sync == "OutOfSync", f"Application {self.application} sync {sync}")

    def clear(self, lab: LabAccess, record: Record) -> None:
        live = lab.kget("v1", "ConfigMap", record["namespace"], record["name"]) or {}
        data: dict[str, Any] = {k: None for k in (live.get("data") or {}) if k not in record["data"]}
        data.update(record["data"])
        lab.kpatch("v1", "ConfigMap", record["namespace"], record["name"], {"data": data})

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        sync = _app_sync(lab, self._namespace(lab), self.application)
        return _done(sync == "Synced", f"Application {self.application} sync {sync}")


def _helm_failed(chart: dict[str, Any] | None) -> bool:
    conditions = ((chart or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Failed" and c.get("status") == "True" for c in conditions)


@dataclass(frozen=True)
class HelmChartFailing(Mechanism):
    """A HelmChart whose install job fails: its target namespace does not exist."""

    chart: str
    missing: str = "homelab-fault-missing"

    def inject(self, lab: LabAccess, record: Record) -> None:
        chart = lab.kget("helm.cattle.io/v1", "HelmChart", "kube-system", self.chart)
        if chart is None:
            raise FaultError(f"HelmChart kube-system/{self.chart} does not exist", hint="run `invoke up` first")
        record["target"] = (chart.get("spec") or {}).get("targetNamespace")
        lab.kpatch("helm.cattle.io/v1", "HelmChart", "kube-system", self.chart,
                   {"spec": {"targetNamespace": self.missing}})

    def effect(self, lab: LabAccess, record: Record) -> Probe:
        failed = _helm_failed(lab.kget("helm.cattle.io/v1", "HelmChart", "kube-system", self.chart))
        return _done(failed, "install job failed" if failed else "install job not failed yet")

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.kpatch("helm.cattle.io/v1", "HelmChart", "kube-system", self.chart,
                   {"spec": {"targetNamespace": record["target"]}})

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        chart = lab.kget("helm.cattle.io/v1", "HelmChart", "kube-system", self.chart)
        job = lab.kget("batch/v1", "Job", "kube-system", f"helm-install-{self.chart}")
        succeeded = bool(((job or {}).get("status") or {}).get("succeeded"))
        return _done(not _helm_failed(chart) and succeeded, f"failed={_helm_failed(chart)}, job succeeded={succeeded}")


@dataclass(frozen=True)
class PvcPending(Mechanism):
    """A claim on a StorageClass whose provisioner no CSI driver serves: it stays Pending."""

    namespace: str = "default"
    name: str = "homelab-fault-pending"

    def inject(self, lab: LabAccess, record: Record) -> None:
        record.update(storageclass=self.name, namespace=self.namespace, claim=self.name)
        labels = {FAULT_LABEL: "pvc-pending"}
        lab.kcreate({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                     "metadata": {"name": self.name, "labels": labels},
                     "provisioner": "lab.homelab.jigga.xyz/no-provisioner", "volumeBindingMode": "Immediate"})
        lab.kcreate({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                     "metadata": {"name": self.name, "namespace": self.namespace, "labels": labels},
                     "spec": {"storageClassName": self.name, "accessModes": ["ReadWriteOnce"],
                              "resources": {"requests": {"storage": "1Gi"}}}})

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.kdelete("v1", "PersistentVolumeClaim", record["namespace"], record["claim"])
        lab.kdelete("storage.k8s.io/v1", "StorageClass", "", record["storageclass"])

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        left = [what for what, obj in (
            ("claim", lab.kget("v1", "PersistentVolumeClaim", record["namespace"], record["claim"])),
            ("StorageClass", lab.kget("storage.k8s.io/v1", "StorageClass", "", record["storageclass"]))) if obj]
        return _done(not left, "still there: " + ", ".join(left) if left else "gone")


DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"


@dataclass(frozen=True)
class DefaultClassUnset(Mechanism):
    def inject(self, lab: LabAccess, record: Record) -> None:
        classes = lab.klist("storage.k8s.io/v1", "StorageClass", "")
        default = [c for c in classes if (c["metadata"].get("annotations") or {}).get(DEFAULT_CLASS) == "true"]
        if not default:
            raise NothingToInject("no StorageClass is the default already; nothing to inject")
        record["names"] = [c["metadata"]["name"] for c in default]
        for name in record["names"]:
            lab.kpatch("storage.k8s.io/v1", "StorageClass", "", name,
                       {"metadata": {"annotations": {DEFAULT_CLASS: "false"}}})

    def clear(self, lab: LabAccess, record: Record) -> None:
        for name in record["names"]:
            lab.kpatch("storage.k8s.io/v1", "StorageClass", "", name,
                       {"metadata": {"annotations": {DEFAULT_CLASS: "true"}}})

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        values = {n: ((lab.kget("storage.k8s.io/v1", "StorageClass", "", n) or {}).get("metadata", {})
                      .get("annotations") or {}).get(DEFAULT_CLASS) for n in record["names"]}
        return _done(all(v == "true" for v in values.values()), f"default: {values}")


# ---------------------------------------------------------------------------------------------- TLS


def _domain_of(lab: LabAccess, host: str) -> str:
    for domain in sorted([lab.inv.domains.internal.name, lab.inv.domains.public.name], key=len, reverse=True):
        if host == domain or host.endswith("." + domain):
            return domain
    raise FaultError(f"{host} is under neither domain of the inventory")


def make_certificate(ca_pem: bytes, ca_key_pem: bytes, names: Sequence[str], *, not_before: datetime.datetime,
                     not_after: datetime.datetime) -> tuple[bytes, bytes]:
    """A server certificate for `names` signed by the CA, valid between the two times: (chain PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise FaultError("the issuer's CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM) + ca_pem, key_pem


@dataclass(frozen=True)
class IngressCertificate(Mechanism):
    """The app's Ingress names a TLS Secret of its own (Traefik prefers it to the default store's wildcard)
    holding a certificate from the same issuer's CA that is expired, or made for another name."""

    app: str
    kind: str  # expired | wrong-name
    secret: str = "homelab-fault-tls"  # noqa: S105 - a Secret's name

    def _app(self, lab: LabAccess) -> Any:
        app = next((a for a in lab.inv.apps if a.name == self.app and a.hostname), None)
        if app is None:
            raise FaultError(f"the inventory has no app {self.app} with a hostname")
        return app

    def _certificate(self, lab: LabAccess, host: str) -> tuple[bytes, bytes]:
        issuer = lab.inv.network.cert_issuer
        server = lab.vm_by_role("server").name
        ca_pem = lab.ssh(server, ["cat", f"{STANDIN_ACME}/{issuer}.crt"]).stdout.encode()
        ca_key = lab.ssh(server, ["cat", f"{STANDIN_ACME}/{issuer}.key"]).stdout.encode()
        now = datetime.datetime.now(datetime.UTC)
        domain = _domain_of(lab, host)
        if self.kind == "expired":
            return make_certificate(ca_pem, ca_key, [f"*.{domain}", domain], not_before=now - datetime.timedelta(
                days=100), not_after=now - datetime.timedelta(days=10))
        return make_certificate(ca_pem, ca_key, [f"wrong-name.{domain}"], not_before=now - datetime.timedelta(hours=1),
                                not_after=now + datetime.timedelta(days=60))

    def inject(self, lab: LabAccess, record: Record) -> None:
        app = self._app(lab)
        ingress = lab.kget("networking.k8s.io/v1", "Ingress", app.namespace, app.name)
        if ingress is None:
            raise FaultError(f"Ingress {app.namespace}/{app.name} does not exist", hint="run `invoke up` first")
        tls = (ingress.get("spec") or {}).get("tls") or []
        record.update(namespace=app.namespace, ingress=app.name, tls=tls, secret=self.secret)
        crt, key = self._certificate(lab, str(app.hostname))
        lab.kcreate({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                     "metadata": {"name": self.secret, "namespace": app.namespace,
                                  "labels": {FAULT_LABEL: f"certificate-{self.kind}"}},
                     "data": {"tls.crt": base64.b64encode(crt).decode(), "tls.key": base64.b64encode(key).decode()}})
        lab.kpatch("networking.k8s.io/v1", "Ingress", app.namespace, app.name,
                   {"spec": {"tls": [{"hosts": [str(app.hostname)], "secretName": self.secret}]}})

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.kpatch("networking.k8s.io/v1", "Ingress", record["namespace"], record["ingress"],
                   {"spec": {"tls": record["tls"] or None}})
        lab.kdelete("v1", "Secret", record["namespace"], record["secret"])

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        ingress = lab.kget("networking.k8s.io/v1", "Ingress", record["namespace"], record["ingress"]) or {}
        tls = (ingress.get("spec") or {}).get("tls") or []
        secret = lab.kget("v1", "Secret", record["namespace"], record["secret"])
        return _done(tls == record["tls"] and secret is None, f"tls {tls}, fault Secret {'left' if secret else 'gone'}")


@dataclass(frozen=True)
class CertificateIssuer(Mechanism):
    """The public wildcard Certificate switched to another ClusterIssuer; cert-manager re-issues it."""

    issuer: str = "letsencrypt-staging"
    effect_timeout: ClassVar[float] = 120.0

    def _certificate(self, lab: LabAccess) -> dict[str, Any]:
        domain = lab.inv.domains.public.name
        for cert in lab.klist("cert-manager.io/v1", "Certificate", "kube-system"):
            if f"*.{domain}" in ((cert.get("spec") or {}).get("dnsNames") or []):
                return cert
        raise FaultError(f"no Certificate in kube-system for *.{domain}", hint="run `invoke up` first")

    def _secret_issuer(self, lab: LabAccess, record: Record) -> str | None:
        secret = lab.kget("v1", "Secret", "kube-system", record["secret"]) or {}
        return ((secret.get("metadata") or {}).get("annotations") or {}).get("cert-manager.io/issuer-name")

    def inject(self, lab: LabAccess, record: Record) -> None:
        cert = self._certificate(lab)
        spec = cert.get("spec") or {}
        record.update(name=cert["metadata"]["name"], secret=spec["secretName"],
                      issuer=(spec.get("issuerRef") or {}).get("name"))
        if record["issuer"] == self.issuer:
            raise NothingToInject(f"Certificate {record['name']} is issued by {self.issuer} already; nothing to inject")
        lab.kpatch("cert-manager.io/v1", "Certificate", "kube-system", record["name"],
                   {"spec": {"issuerRef": {"name": self.issuer}}})

    def effect(self, lab: LabAccess, record: Record) -> Probe:
        now = self._secret_issuer(lab, record)
        return _done(now == self.issuer, f"Secret {record['secret']} issued by {now}")

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.kpatch("cert-manager.io/v1", "Certificate", "kube-system", record["name"],
                   {"spec": {"issuerRef": {"name": record["issuer"]}}})

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        now = self._secret_issuer(lab, record)
        return _done(now == record["issuer"], f"Secret {record['secret']} issued by {now}")


# ---------------------------------------------------------------------------------------------- apps


FAULT_ANNOTATION = "lab.homelab.jigga.xyz/fault"  # homelab/lab/k3s_standin/apps.py


def _ingress_backend(lab: LabAccess, app_name: str) -> tuple[str, str]:
    app = next((a for a in lab.inv.apps if a.name == app_name and a.hostname), None)
    if app is None:
        raise FaultError(f"the inventory has no app {app_name} with a hostname")
    ingress = lab.kget("networking.k8s.io/v1", "Ingress", app.namespace, app.name)
    if ingress is None:
        raise FaultError(f"Ingress {app.namespace}/{app.name} does not exist", hint="run `invoke up` first")
    for rule in (ingress.get("spec") or {}).get("rules") or []:
        for path in (rule.get("http") or {}).get("paths") or []:
            name = ((path.get("backend") or {}).get("service") or {}).get("name")
            if name:
                return app.namespace, str(name)
    raise FaultError(f"Ingress {app.namespace}/{app.name} has no Service backend")


@dataclass(frozen=True)
class AppAnswers(Mechanism):
    """The app double behind the app's Ingress answers `status` (the stand-in's fault annotation)."""

    app: str
    status: str = "502"

    def _annotation(self, lab: LabAccess, record: Record) -> str | None:
        svc = lab.kget("v1", "Service", record["namespace"], record["service"]) or {}
        return ((svc.get("metadata") or {}).get("annotations") or {}).get(FAULT_ANNOTATION)

    def inject(self, lab: LabAccess, record: Record) -> None:
        record["namespace"], record["service"] = _ingress_backend(lab, self.app)
        record["before"] = self._annotation(lab, record)
        lab.kpatch("v1", "Service", record["namespace"], record["service"],
                   {"metadata": {"annotations": {FAULT_ANNOTATION: self.status}}})

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.kpatch("v1", "Service", record["namespace"], record["service"],
                   {"metadata": {"annotations": {FAULT_ANNOTATION: record["before"]}}})

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        now = self._annotation(lab, record)
        return _done(now == record["before"], f"fault annotation {now}")


def _deployment_ready(lab: LabAccess, namespace: str, name: str) -> int:
    dep = lab.kget("apps/v1", "Deployment", namespace, name) or {}
    return int((dep.get("status") or {}).get("readyReplicas") or 0)


@dataclass(frozen=True)
class ConfigMapMissing(Mechanism):
    """A ConfigMap an app's pods mount deleted: its Deployment cannot become Ready."""

    app: str
    configmap: str
    deployment: str

    def _namespace(self, lab: LabAccess) -> str:
        return next(a.namespace for a in lab.inv.apps if a.name == self.app)

    def inject(self, lab: LabAccess, record: Record) -> None:
        ns = self._namespace(lab)
        live = lab.kget("v1", "ConfigMap", ns, self.configmap)
        if live is None:
            raise NothingToInject(f"ConfigMap {ns}/{self.configmap} does not exist already; nothing to inject")
        meta = {k: v for k, v in live["metadata"].items() if k in ("name", "namespace", "labels", "annotations")}
        record["object"] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
                            **{k: live[k] for k in ("data", "binaryData", "immutable") if k in live}}
        lab.kdelete("v1", "ConfigMap", ns, self.configmap)

    def effect(self, lab: LabAccess, record: Record) -> Probe:
        ready = _deployment_ready(lab, self._namespace(lab), self.deployment)
        return _done(ready == 0, f"Deployment {self.deployment} ready replicas {ready}")

    def clear(self, lab: LabAccess, record: Record) -> None:
        meta = record["object"]["metadata"]
        if lab.kget("v1", "ConfigMap", meta["namespace"], meta["name"]) is None:
            lab.kcreate(record["object"])

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        ready = _deployment_ready(lab, self._namespace(lab), self.deployment)
        return _done(ready > 0, f"Deployment {self.deployment} ready replicas {ready}")


# ------------------------------------------------------------------------------ Cloudflare, Tailscale


def _tunnel_live(lab: LabAccess) -> bool:
    """The tunnel is healthy: Cloudflare sees a live connector."""
    return lab.cloudflare.tunnel(lab.account_id, lab.tunnel_id()).get("status") == "healthy"


@dataclass(frozen=True)
class ScaledToZero(Mechanism):
    """cloudflared scaled to 0: the tunnel loses its connectors, the edge answers 530."""

    app: str = "cloudflared"
    effect_timeout: ClassVar[float] = 120.0

    def _where(self, lab: LabAccess) -> tuple[str, str]:
        return next(a.namespace for a in lab.inv.apps if a.name == self.app), self.app

    def inject(self, lab: LabAccess, record: Record) -> None:
        ns, name = self._where(lab)
        dep = lab.kget("apps/v1", "Deployment", ns, name)
        if dep is None:
            raise FaultError(f"Deployment {ns}/{name} does not exist", hint="run `invoke up` first")
        record["replicas"] = int((dep.get("spec") or {}).get("replicas", 1))
        if record["replicas"] == 0:
            raise NothingToInject(f"Deployment {ns}/{name} has 0 replicas already; nothing to inject")
        lab.kpatch("apps/v1", "Deployment", ns, name, {"spec": {"replicas": 0}})

    def effect(self, lab: LabAccess, record: Record) -> Probe:
        live = _tunnel_live(lab)
        return _done(not live, "the tunnel still has connectors" if live else "the tunnel has no connector")

    def clear(self, lab: LabAccess, record: Record) -> None:
        ns, name = self._where(lab)
        lab.kpatch("apps/v1", "Deployment", ns, name, {"spec": {"replicas": record["replicas"]}})

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        live = _tunnel_live(lab)
        return _done(live, "the tunnel has a connector" if live else "no connector yet")


RECORD_FIELDS = ("type", "name", "content", "proxied", "ttl", "comment")


def _public_answers(lab: LabAccess, host: str) -> list[str]:
    """What the public resolver answers for host (A records, following CNAMEs); [] for none."""
    import dns.exception
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [lab.run.target.public_resolver]
    resolver.lifetime = 3.0
    try:
        return [r.to_text() for r in resolver.resolve(host, "A")]
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
        return []
    except dns.exception.Timeout:
        return ["(timeout)"]


@dataclass(frozen=True)
class RecordChange(Mechanism):
    """A public DNS record deleted (to=None) or replaced by a DNS-only A record to `to`."""

    host: str
    to: str | None = None

    def _records(self, lab: LabAccess) -> list[dict[str, Any]]:
        return [r for r in lab.cloudflare.dns_records(lab.zone_id, name=self.host)
                if r.get("type") in ("A", "AAAA", "CNAME")]

    def inject(self, lab: LabAccess, record: Record) -> None:
        found = self._records(lab)
        if len(found) != 1:
            raise FaultError(f"{self.host} has {len(found)} address records in Cloudflare; expected 1",
                             hint="run `invoke up` first")
        record["record"] = {k: found[0].get(k) for k in ("id", *RECORD_FIELDS)}
        if self.to is None:
            lab.cloudflare.delete_dns_record(lab.zone_id, found[0]["id"])
        else:
            lab.cloudflare.request("PUT", f"/zones/{lab.zone_id}/dns_records/{found[0]['id']}", body={
                "type": "A", "name": self.host, "content": self.to, "proxied": False, "ttl": 1,
                "comment": found[0].get("comment") or ""})

    def clear(self, lab: LabAccess, record: Record) -> None:
        original = {k: v for k, v in record["record"].items() if k != "id" and v is not None}
        if self.to is None:
            if not self._records(lab):
                lab.cloudflare.create_dns_record(lab.zone_id, original)
        else:
            lab.cloudflare.request("PUT", f"/zones/{lab.zone_id}/dns_records/{record['record']['id']}",
                                   body=original)

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        want = record["record"]
        found = self._records(lab)
        if [(r.get("type"), r.get("content"), r.get("proxied")) for r in found] != \
                [(want["type"], want["content"], want["proxied"])]:
            return None, f"Cloudflare has {[(r.get('type'), r.get('content')) for r in found]}"
        answers = _public_answers(lab, self.host)
        return _done(bool(answers) and ELSEWHERE not in answers and "(timeout)" not in answers,
                     f"public DNS answers {answers}")


@dataclass(frozen=True)
class InternalPublished(Mechanism):
    """An internal name published in the public zone: a proxied CNAME to the tunnel, as a public app has."""

    host: str

    def inject(self, lab: LabAccess, record: Record) -> None:
        from homelab.clients.cloudflare import tunnel_target

        if lab.cloudflare.dns_records(lab.zone_id, name=self.host):
            raise NothingToInject(f"{self.host} is in the public zone already; nothing to inject")
        made = lab.cloudflare.create_dns_record(lab.zone_id, {
            "type": "CNAME", "name": self.host, "content": tunnel_target(lab.tunnel_id()), "proxied": True,
            "ttl": 1, "comment": FAULT_COMMENT})
        record["id"] = made["id"]

    def clear(self, lab: LabAccess, record: Record) -> None:
        for found in lab.cloudflare.dns_records(lab.zone_id, name=self.host):
            if found["id"] == record.get("id") or found.get("comment") == FAULT_COMMENT:
                lab.cloudflare.delete_dns_record(lab.zone_id, found["id"])

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        left = lab.cloudflare.dns_records(lab.zone_id, name=self.host)
        answers = _public_answers(lab, self.host) if not left else []
        return _done(not left and not answers, f"records {len(left)}, public DNS answers {answers}")


@dataclass(frozen=True)
class TunnelRuleRemoved(Mechanism):
    host: str

    def _config(self, lab: LabAccess) -> dict[str, Any]:
        return dict(lab.cloudflare.tunnel_configuration(lab.account_id, lab.tunnel_id()).get("config") or {})

    def inject(self, lab: LabAccess, record: Record) -> None:
        config = self._config(lab)
        rules = list(config.get("ingress") or [])
        if not any(r.get("hostname") == self.host for r in rules):
            raise NothingToInject(f"the tunnel has no ingress rule for {self.host} already; nothing to inject")
        record["config"] = config
        lab.cloudflare.put_tunnel_configuration(lab.account_id, lab.tunnel_id(), {
            **config, "ingress": [r for r in rules if r.get("hostname") != self.host]})

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.cloudflare.put_tunnel_configuration(lab.account_id, lab.tunnel_id(), record["config"])

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        rules = self._config(lab).get("ingress") or []
        return _done(rules == record["config"].get("ingress"), f"{len(rules)} ingress rules")


@dataclass(frozen=True)
class SplitDnsRemoved(Mechanism):
    def inject(self, lab: LabAccess, record: Record) -> None:
        domain = lab.inv.domains.internal.name
        current = lab.tailscale.get_split_dns()
        if domain not in current:
            raise NothingToInject(f"the tailnet has no split DNS for {domain} already; nothing to inject")
        record.update(domain=domain, nameservers=current[domain])
        lab.tailscale.remove_split_dns(domain)

    def clear(self, lab: LabAccess, record: Record) -> None:
        lab.tailscale.set_split_dns(record["domain"], record["nameservers"])

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        now = lab.tailscale.get_split_dns().get(record["domain"])
        return _done(now == record["nameservers"], f"split DNS {record['domain']}: {now}")


@dataclass(frozen=True)
class RoutesUnapproved(Mechanism):
    """The subnet router's routes unapproved (advertised, not enabled)."""

    def _devices(self, lab: LabAccess) -> list[Any]:
        return lab.tailscale.devices_named(lab.inv.access.tailscale.connector)

    def inject(self, lab: LabAccess, record: Record) -> None:
        devices = [d for d in self._devices(lab) if d.routes.enabled]
        if not devices:
            raise FaultError(f"{lab.inv.access.tailscale.connector} has no approved routes already; nothing to "
                             "inject")
        record["enabled"] = {d.id: list(d.routes.enabled) for d in devices}
        for device in devices:
            lab.tailscale.set_routes(device.id, [])

    def clear(self, lab: LabAccess, record: Record) -> None:
        present = {d.id for d in self._devices(lab)}
        for device_id, routes in record["enabled"].items():
            if device_id in present:
                lab.tailscale.set_routes(device_id, routes)

    def mended(self, lab: LabAccess, record: Record) -> Probe:
        devices = {d.id: d for d in self._devices(lab)}
        missing = [i for i, routes in record["enabled"].items()
                   if i in devices and not set(routes) <= set(devices[i].routes.enabled)]
        wanted = set().union(*map(set, record["enabled"].values()))
        # At least one current router has the routes again (a re-registered one included).
        served = any(wanted <= set(d.routes.enabled) for d in devices.values())
        ok = not missing and served
        return _done(ok, "routes approved" if ok else f"devices without their routes: {missing or list(devices)}")


# ============================================================================================ catalog


@dataclass(frozen=True)
class Fault:
    name: str
    layer: str
    description: str
    # Node ids relative to tests/live/ (CHECKS.md): `test_vms.py::test_vm_running_on_its_node[naruto]`;
    # a parametrised check without [..] means any of its params.
    trips: tuple[str, ...]
    mechanism: Mechanism = field(repr=False, compare=False)


def _f(name: str, layer: str, description: str, trips: Sequence[str], mechanism: Mechanism) -> Fault:
    return Fault(name, layer, description, tuple(trips), mechanism)


CATALOG: tuple[Fault, ...] = (
    # --- proxmox
    _f("pve-quorum-lost", "proxmox", "the PVE cluster loses quorum (/etc/pve read-only)",
       ["test_proxmox.py::test_cluster_quorate"], QuorumLost()),
    _f("pve-node-offline", "proxmox", "PVE node pve-gamma goes offline (its API answers 595, its VM unknown)",
       ["test_proxmox.py::test_pve_node_online[pve-gamma]", "test_vms.py::test_vm_running_on_its_node[tanjiro]"],
       NodeOffline("pve-gamma")),
    _f("ceph-health-warn", "proxmox", "Ceph reports HEALTH_WARN (slow OSDs)",
       ["test_proxmox.py::test_ceph_health_ok"], CephTrouble("ceph-warn")),
    _f("ceph-down", "proxmox", "Ceph unreachable: HEALTH_ERR, RBD storage inactive, pools unreadable",
       ["test_proxmox.py::test_ceph_health_ok", "test_proxmox.py::test_ceph_pool_and_storage"],
       CephTrouble("ceph-down")),
    _f("sdn-pending", "proxmox", "the vnet's VXLAN tag edited and never applied (SDN changes pending)",
       ["test_proxmox.py::test_sdn_zone_and_vnet_applied"], SdnPending()),
    # --- vms
    _f("vm-stopped", "vms", "VM naruto stopped through the PVE API",
       ["test_vms.py::test_vm_running_on_its_node[naruto]", "test_vms.py::test_vm_address_from_guest_agent[naruto]",
        "test_nodes.py::test_hostname[naruto]", "test_k3s.py::test_node_ready_with_inventory_ip[naruto]"],
       VmStopped("naruto")),
    _f("vm-guest-agent-off", "vms", "VM tanjiro's guest agent option turned off",
       ["test_vms.py::test_vm_address_from_guest_agent[tanjiro]"], GuestAgentOff("tanjiro")),
    # --- nodes
    _f("k3s-agent-stopped", "nodes", "k3s-agent stopped on worker tanjiro (its Node turns NotReady)",
       ["test_nodes.py::test_k3s_unit_active_and_enabled[tanjiro]",
        "test_k3s.py::test_node_ready_with_inventory_ip[tanjiro]"],
       UnitStopped("tanjiro", "k3s-agent.service")),
    _f("apiserver-down", "nodes", "the k3s server stopped on the control plane ichigo (:6443 closed)",
       ["test_nodes.py::test_apiserver_listening", "test_nodes.py::test_k3s_unit_active_and_enabled[ichigo]"],
       UnitStopped("ichigo", "k3s.service", watch="api")),
    _f("sshd-stopped", "nodes", "sshd stopped on worker naruto (mended from inside its container)",
       [f"test_nodes.py::{check}[naruto]" for check in (
           "test_hostname", "test_address_on_interface", "test_k3s_unit_active_and_enabled", "test_swap_off",
           "test_time_synchronised", "test_secret_files_private")],
       SshdStopped("naruto")),
    _f("hostname-wrong", "nodes", "worker naruto renamed naruto-impostor (hostname and /etc/hostname)",
       ["test_nodes.py::test_hostname[naruto]"], WrongHostname("naruto", "naruto-impostor")),
    _f("timesync-off", "nodes", "systemd-timesyncd disabled and stopped on worker tanjiro",
       ["test_nodes.py::test_time_synchronised[tanjiro]"], TimeSyncOff("tanjiro")),
    _f("token-file-readable", "nodes", "the k3s token file on worker naruto made 0644",
       ["test_nodes.py::test_secret_files_private[naruto]"], FileMode("naruto", "/etc/rancher/k3s/token")),
    _f("kubeconfig-readable", "nodes", "the kubeconfig on the control plane ichigo made 0644",
       ["test_nodes.py::test_secret_files_private[ichigo]"], FileMode("ichigo", "/etc/rancher/k3s/k3s.yaml")),
    # --- k3s
    _f("argocd-out-of-sync", "k3s", "an object Argo CD syncs from gitops/ edited in the cluster (OutOfSync)",
       ["test_k3s.py::test_argocd_apps_synced_and_healthy"], GitopsDrift()),
    _f("helmchart-failing", "k3s", "HelmChart loki's install job fails (its target namespace does not exist)",
       ["test_k3s.py::test_helmchart_installed[loki]"], HelmChartFailing("loki")),
    # --- network
    _f("traefik-address-changed", "network",
       "Traefik's HelmChart asks MetalLB for 192.168.7.231 (k8s-gateway's) instead of .230",
       ["test_network.py::test_traefik_loadbalancer_address"], HelmLbAddress("traefik", "kube-system", "internal_dns")),
    _f("internal-dns-address-changed", "network",
       "k8s-gateway's HelmChart asks MetalLB for 192.168.7.230 (Traefik's) instead of .231",
       ["test_network.py::test_internal_dns_loadbalancer_address",
        "test_dns.py::test_internal_name_resolves_in_tailnet[grafana.int.jigga.xyz]"],
       HelmLbAddress("k8s-gateway", "k8s-gateway", "traefik")),
    _f("metallb-pool-changed", "network", "MetalLB's IPAddressPool grown by one address past the inventory's",
       ["test_network.py::test_metallb_pool_matches_inventory"], MetallbPoolChanged()),
    # --- storage
    _f("pvc-pending", "storage", "a PVC on a StorageClass no provisioner serves stays Pending",
       ["test_storage.py::test_every_pvc_bound"], PvcPending()),
    _f("default-storageclass-unset", "storage", "ceph-rbd is no longer the default StorageClass",
       ["test_storage.py::test_default_storageclass"], DefaultClassUnset()),
    # --- tls
    _f("certificate-expired", "tls", "passwords.jigga.xyz served an expired certificate from the same issuer",
       ["test_tls.py::test_certificate[passwords.jigga.xyz]"], IngressCertificate("vaultwarden", "expired")),
    _f("certificate-wrong-name", "tls",
       "grafana.int.jigga.xyz served a certificate for wrong-name.int.jigga.xyz from the same issuer",
       ["test_tls.py::test_certificate[grafana.int.jigga.xyz]"], IngressCertificate("grafana", "wrong-name")),
    _f("certificate-staging", "tls", "the public wildcard Certificate issued by letsencrypt-staging",
       ["test_tls.py::test_certificate[passwords.jigga.xyz]", "test_tls.py::test_certificate[jigga.xyz]",
        # cloudflared checks the origin against public roots: staging certificates break the public apps
        "test_apps.py::test_app_health[vaultwarden]", "test_apps.py::test_app_health[homepage]"],
       CertificateIssuer()),
    # --- dns
    _f("public-record-missing", "dns", "the public DNS record of passwords.jigga.xyz deleted in Cloudflare",
       ["test_dns.py::test_public_name_resolves_to_edge[passwords.jigga.xyz]",
        "test_apps.py::test_app_health[vaultwarden]"], RecordChange("passwords.jigga.xyz")),
    _f("public-record-elsewhere", "dns", f"jigga.xyz points at {ELSEWHERE} (DNS only) instead of the tunnel",
       ["test_dns.py::test_public_name_resolves_to_edge[jigga.xyz]", "test_apps.py::test_app_health[homepage]"],
       RecordChange("jigga.xyz", ELSEWHERE)),
    _f("internal-name-public", "dns", "grafana.int.jigga.xyz published in the public zone (proxied, to the tunnel)",
       ["test_dns.py::test_internal_name_not_public[grafana.int.jigga.xyz]"],
       InternalPublished("grafana.int.jigga.xyz")),
    # --- access
    _f("tunnel-rule-removed", "access", "the tunnel's ingress rule for passwords.jigga.xyz removed",
       ["test_access.py::test_tunnel_routes_public_names", "test_apps.py::test_app_health[vaultwarden]"],
       TunnelRuleRemoved("passwords.jigga.xyz")),
    _f("cloudflared-scaled-to-zero", "access", "cloudflared scaled to 0 replicas: the tunnel has no connector",
       ["test_access.py::test_tunnel_routes_public_names", "test_apps.py::test_app_health[vaultwarden]",
        "test_apps.py::test_app_health[homepage]"], ScaledToZero()),
    _f("split-dns-removed", "access", "the tailnet's split DNS for int.jigga.xyz removed",
       ["test_access.py::test_split_dns_points_at_internal_dns",
        "test_dns.py::test_internal_name_resolves_in_tailnet[grafana.int.jigga.xyz]"], SplitDnsRemoved()),
    _f("subnet-routes-unapproved", "access", "the subnet router's advertised routes unapproved",
       ["test_access.py::test_subnet_routes_approved",
        "test_dns.py::test_internal_name_resolves_in_tailnet[grafana.int.jigga.xyz]"], RoutesUnapproved()),
    # --- apps, monitoring
    _f("vaultwarden-502", "apps", "the Vaultwarden double answers 502",
       ["test_apps.py::test_app_health[vaultwarden]"], AppAnswers("vaultwarden")),
    _f("homepage-config-missing", "apps", "Homepage's ConfigMap deleted: its Deployment never becomes Ready",
       ["test_apps.py::test_workload_ready[homepage]", "test_apps.py::test_app_health[homepage]"],
       ConfigMapMissing("homepage", "homepage", "homepage")),
    _f("grafana-502", "monitoring", "the Grafana double answers 502",
       ["test_apps.py::test_app_health[grafana]"], AppAnswers("grafana")),
)


def find(name: str, catalog: Sequence[Fault] = CATALOG) -> Fault:
    for fault in catalog:
        if fault.name == name:
            return fault
    raise FaultError(f"no fault {name!r}", hint="`invoke lab.fault --list` shows the catalog")


def markdown_table(catalog: Sequence[Fault] = CATALOG) -> str:
    """The catalog as a Markdown table: fault, layer, what it does, the checks it must trip."""
    lines = ["| fault | layer | what it breaks | checks it must trip |", "|---|---|---|---|"]
    for fault in catalog:
        checks = "<br>".join(f"`{trip}`" for trip in fault.trips)
        lines.append(f"| `{fault.name}` | {fault.layer} | {fault.description.replace('|', '/')} | {checks} |")
    return "\n".join(lines) + "\n"


# ========================================================================================= the state


def state_path(state_dir: Path | None = None) -> Path:
    return (state_dir or layout.STATE) / STATE_FILE


def active(state_dir: Path | None = None) -> dict[str, Any] | None:
    """The recorded active fault ({"name", "since", "record"}), or None."""
    path = state_path(state_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise FaultError(f"cannot read {path}: {exc}", hint="if no fault is active, remove the file") from None
    return data if isinstance(data, dict) and data.get("name") else None


def _save(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
    tmp.replace(path)


def inject(name: str, lab: LabAccess, *, catalog: Sequence[Fault] = CATALOG, state_dir: Path | None = None,
           out: Console | None = None) -> Fault:
    """Break one thing: refused while another fault is active. Returns once the fault is in effect."""
    fault = find(name, catalog)
    current = active(state_dir)
    if current is not None:
        raise FaultError(f"fault {current['name']} is active; only one fault at a time",
                         hint="`invoke lab.fault --clear` mends it first")
    path = state_path(state_dir)
    record: Record = {}
    data = {"name": fault.name, "since": time.time(), "record": record}
    try:
        fault.mechanism.inject(lab, record)
    except NothingToInject:
        raise
    except BaseException:
        # What was read (and perhaps changed) is kept, so that --clear can restore it.
        if record:
            _save(path, data)
        raise
    _save(path, data)
    poll(f"fault {fault.name} in effect", lambda: fault.mechanism.effect(lab, record),
         timeout=fault.mechanism.effect_timeout, progress=lab.progress, first=0.2, maximum=2.0)
    if out is not None:
        out.print(f"[yellow]fault {fault.name}[/] injected: {fault.description}")
        out.print("  must trip: " + ", ".join(fault.trips))
    return fault


def clear(lab: LabAccess, *, catalog: Sequence[Fault] = CATALOG, state_dir: Path | None = None,
          out: Console | None = None) -> Fault | None:
    """Mend the active fault from its record and wait until it is mended; None when none is active."""
    current = active(state_dir)
    if current is None:
        if out is not None:
            out.print("no fault is active; nothing to clear")
        return None
    fault = find(str(current["name"]), catalog)
    record: Record = current.get("record") or {}
    fault.mechanism.clear(lab, record)
    poll(f"fault {fault.name} mended", lambda: fault.mechanism.mended(lab, record),
         timeout=fault.mechanism.mend_timeout, progress=lab.progress, first=0.2, maximum=3.0)
    state_path(state_dir).unlink(missing_ok=True)
    if out is not None:
        out.print(f"[green]fault {fault.name} cleared[/] and checked mended")
    return fault


# ====================================================================================== lab access


class LabAccess:
    """What the faults reach, opened lazily; only from inside the lab's namespace (see `open_lab`)."""

    def __init__(self, run: Run, control: ControlClient) -> None:
        self.run = run
        self.inv: Inventory = run.inv
        self.progress: Progress = run.progress
        self.control = control
        self._hosts: Hosts | None = None
        self._memo: dict[str, Any] = {}

    # --- PVE and the VMs
    @property
    def proxmox(self) -> Proxmox:
        return self.run.proxmox

    def vm(self, name: str) -> Vm:
        for vm in self.inv.k3s.vms:
            if vm.name == name:
                return vm
        raise FaultError(f"the inventory has no VM {name}")

    def vm_by_role(self, role: str) -> Vm:
        return next(vm for vm in self.inv.k3s.vms if vm.role == role)

    def require_pve_node(self, name: str) -> None:
        if name not in {n.name for n in self.inv.proxmox.nodes}:
            raise FaultError(f"the inventory has no PVE node {name}")

    # --- SSH and the containers
    @property
    def hosts(self) -> Hosts:
        if self._hosts is None:
            from homelab.clients.ssh import Hosts

            target = self.run.target
            self._hosts = Hosts(self.inv.k3s.user, target.ssh_private_key, target.known_hosts,
                                guard=self.run.guard)
        return self._hosts

    def ssh(self, vm: str, argv: Sequence[str], *, check: bool = True) -> Done:
        """argv as root on the VM (sudo), over SSH."""
        return self.hosts.run(str(self.vm(vm).address), argv, sudo=True, check=check, timeout=60)

    def ssh_answers(self, vm: str) -> Probe:
        """Whether a fresh SSH connection to the VM opens (and runs `true`)."""
        from homelab.clients.ssh import Hosts, SshError

        target = self.run.target
        probe = Hosts(self.inv.k3s.user, target.ssh_private_key, target.known_hosts, timeout=5.0,
                      guard=self.run.guard)
        try:
            probe.run(str(self.vm(vm).address), ["true"], timeout=10)
        except SshError as exc:
            return None, exc.message[:120]
        finally:
            probe.close()
        return True, "SSH answers"

    def guest(self, vm: str, argv: Sequence[str]) -> str:
        """argv inside the VM's container, entered from the host (nsenter into its init's namespaces)."""
        pid = container_init(self.vm(vm).vmid)
        done = subprocess.run(["nsenter", f"--target={pid}", "--mount", "--uts", "--ipc", "--net", "--pid", "--",
                               *argv], capture_output=True, text=True, check=False, timeout=60)
        if done.returncode != 0:
            raise FaultError(f"{vm}: `{' '.join(argv)}` in its container exited {done.returncode}: "
                             f"{done.stderr.strip()[-300:]}")
        return done.stdout

    # --- the cluster
    @property
    def kube(self) -> Kube:
        from homelab.layers import kubernetes

        return kubernetes.kube(self.run)

    def kpath(self, api_version: str, kind: str, namespace: str, name: str = "") -> str:
        found = self.kube.resource(api_version, kind) or self.kube.resource(api_version, kind, refresh=True)
        if found is None:
            raise FaultError(f"the cluster does not serve {api_version} {kind}", hint="run `invoke up` first")
        base, namespaced = found
        if namespaced:
            prefix, _, plural = base.rpartition("/")
            base = f"{prefix}/namespaces/{namespace or 'default'}/{plural}"
        return f"{base}/{name}" if name else base

    def kget(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        data = self.kube.request("GET", self.kpath(api_version, kind, namespace, name))
        return dict(data) if data else None

    def klist(self, api_version: str, kind: str, namespace: str) -> list[dict[str, Any]]:
        data = self.kube.request("GET", self.kpath(api_version, kind, namespace)) or {}
        return [dict(item) for item in data.get("items") or []]

    def kpatch(self, api_version: str, kind: str, namespace: str, name: str, body: dict[str, Any]) -> None:
        self.kube.request("PATCH", self.kpath(api_version, kind, namespace, name), body=body,
                          query={"fieldManager": "homelab-lab-fault"}, content_type="application/merge-patch+json")

    def kcreate(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        self.kube.request("POST", self.kpath(obj["apiVersion"], obj["kind"], meta.get("namespace", "")), body=obj,
                          query={"fieldManager": "homelab-lab-fault"})

    def kdelete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        if self.kget(api_version, kind, namespace, name) is not None:
            self.kube.request("DELETE", self.kpath(api_version, kind, namespace, name))

    # --- the outside world
    @property
    def cloudflare(self) -> Cloudflare:
        from homelab.layers import access

        return access.cloudflare(self.run)

    @property
    def account_id(self) -> str:
        from homelab.layers import access

        return access.account_id(self.run)

    @property
    def zone_id(self) -> str:
        if "zone" not in self._memo:
            self._memo["zone"] = str(self.cloudflare.zone(self.inv.domains.public.name)["id"])
        return str(self._memo["zone"])

    def tunnel_id(self) -> str:
        if "tunnel" not in self._memo:
            name = self.inv.access.cloudflare.tunnel
            tunnel = self.cloudflare.find_tunnel(self.account_id, name)
            if tunnel is None:
                raise FaultError(f"no Cloudflare tunnel {name}", hint="run `invoke up` first")
            self._memo["tunnel"] = str(tunnel["id"])
        return str(self._memo["tunnel"])

    @property
    def tailscale(self) -> Tailscale:
        from homelab.layers import access

        return access.tailscale(self.run)

    def close(self) -> None:
        if self._hosts is not None:
            self._hosts.close()
        self.run.close()


def container_init(vmid: int, state_dir: Path | None = None) -> int:
    """The host pid of the VM container's init (PID 1 inside it), from the supervisor's status file."""
    status = (state_dir or layout.STATE) / layout.STATUS_JSON
    try:
        vms = json.loads(status.read_text(encoding="utf-8")).get("vms", [])
    except (OSError, ValueError) as exc:
        raise FaultError(f"cannot read the lab's VM status {status}: {exc}") from None
    nspawn = next((vm.get("pid") for vm in vms if vm.get("vmid") == vmid and vm.get("running")), None)
    if not nspawn:
        raise FaultError(f"VM {vmid}'s container is not running")
    try:
        cmdline = Path(f"/proc/{nspawn}/cmdline").read_bytes()
    except OSError:
        cmdline = b""
    # Only a container the lab started: systemd-nspawn on a directory under the lab's VAR.
    if b"systemd-nspawn" not in cmdline or str(layout.VAR).encode() not in cmdline:
        raise FaultError(f"pid {nspawn} recorded for VM {vmid} is not the lab's systemd-nspawn")
    pid = init_below(int(nspawn))
    if pid is None:
        raise FaultError(f"VM {vmid}: no init process under its systemd-nspawn (pid {nspawn})")
    return pid


def init_below(root: int, proc: Path = Path("/proc")) -> int | None:
    """The first process below `root` that is PID 1 of its own PID namespace (NSpid ends in 1)."""
    queue, seen = [root], set()
    while queue:
        pid = queue.pop(0)
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(OSError):
            for line in (proc / str(pid) / "status").read_text(encoding="utf-8").splitlines():
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    if pid != root and len(ids) > 1 and ids[-1] == "1":
                        return pid
        for task in sorted((proc / str(pid) / "task").glob("*/children")):
            with contextlib.suppress(OSError):
                queue.extend(int(child) for child in task.read_text(encoding="utf-8").split())
    return None


def open_lab(inv: Inventory, out: Console, argv: Sequence[str]) -> LabAccess:
    """Enter the lab's namespace (refused when the lab is not running) and open access to it."""
    from homelab import target as targets
    from homelab.context import Run
    from homelab.lab import control
    from homelab.lab.faultctl import SOCKET, ControlClient

    if not control.running():
        raise FaultError("the lab is not running", hint="start it with `invoke lab.up`")
    control.enter(list(argv))
    run = Run(inv=inv, target=targets.resolve("lab", inv), console=out, progress=Progress(out))
    return LabAccess(run, ControlClient(layout.STATE / SOCKET))


def describe(catalog: Sequence[Fault] = CATALOG) -> list[tuple[str, str, str, str]]:
    """Rows for `--list`: name, layer, description, checks."""
    return [(f.name, f.layer, f.description, "\n".join(f.trips)) for f in catalog]


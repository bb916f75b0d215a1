"""The server's generic controllers, run by `k3s server` in one background thread.

The thread wakes on every store change (and resyncs every RESYNC seconds) and reconciles, level-triggered:

- helm: HelmChart (helm.cattle.io/v1) -> a completed Job helm-install-<name> in kube-system, and in the
  target namespace a Deployment and a Service named after the release; deletion runs helm-delete-<name>.
- lb: LoadBalancer IPAM after MetalLB, from metallb.io/v1beta1 IPAddressPools (only while that CRD exists).
- certs: cert-manager.io/v1 Certificates issued by a per-issuer CA of the stand-in (see certs.py).
- volumes: PersistentVolumeClaims provisioned when their StorageClass's provisioner has a CSIDriver object.
- argocd: Applications sync from the lab's snapshot of their repository (argocd.py).
- workloads: Deployments applied as manifests turn Ready when what their pods mount exists (workloads.py).
- ingress: an ingress controller double on the LoadBalancer addresses this node announces (see ingress.py).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from .api import Api, ApiError, WriteOptions, rfc3339
from .apps import APP_ANNOTATION, HEALTH_ANNOTATION, load_apps
from .argocd import ArgoCd
from .certs import CertificateController
from .dnsgateway import DnsGateway
from .ingress import IngressBind, IngressController, charts_dir, load_index
from .log import Log
from .resources import ResourceType
from .tsoperator import TailscaleOperator
from .tunnel import TunnelController
from .workloads import WorkloadController

JSONObj = dict[str, Any]
LbHook = Callable[[str, str, bool], None]
RESYNC = 10.0
HELM_FINALIZER = "wrangler.cattle.io/on-helm-chart-remove"
HELM_CHART_ANNOTATION = "helmcharts.helm.cattle.io/chart"  # <namespace>/<name> of the HelmChart that made it
HELM_HASH_ANNOTATION = "helmcharts.helm.cattle.io/configHash"
JOB_IMAGE = "rancher/klipper-helm:v0.9.4-build20250113"
LB_POOL_ANNOTATIONS = ("metallb.io/address-pool", "metallb.universe.tf/address-pool")
LB_IP_ANNOTATIONS = ("metallb.io/loadBalancerIPs", "metallb.universe.tf/loadBalancerIPs")
DEFAULT_CLASS_ANNOTATIONS = ("storageclass.kubernetes.io/is-default-class",
                             "storageclass.beta.kubernetes.io/is-default-class")


# ------------------------------------------------------------------------------------------ helpers
def deep_merge(base: Any, over: Any) -> Any:
    """Helm's values merge: maps merge recursively, anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = deep_merge(base.get(key), value) if key in base else copy.deepcopy(value)
        return out
    return copy.deepcopy(over)


def _set_value(value: Any) -> Any:
    """A `helm --set` value: true/false are booleans, integers numbers, anything else a string."""
    if isinstance(value, str):
        if value in ("true", "false"):
            return value == "true"
        with contextlib.suppress(ValueError):
            return int(value)
    return value


def apply_set(values: JSONObj, sets: Mapping[str, Any]) -> JSONObj:
    out = copy.deepcopy(values)
    for dotted, value in sets.items():
        parts = [p.replace("\0", ".") for p in str(dotted).replace("\\.", "\0").split(".")]
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = _set_value(value)
    return out


def _yaml_map(text: Any) -> JSONObj:
    if not isinstance(text, str) or not text.strip():
        return {}
    loaded = yaml.safe_load(text)
    return loaded if isinstance(loaded, dict) else {}


def _dig(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _subset(desired: Any, current: Any) -> bool:
    if isinstance(desired, dict):
        return isinstance(current, dict) and all(_subset(v, current.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        return isinstance(current, list) and len(desired) == len(current) and all(
            _subset(d, c) for d, c in zip(desired, current, strict=True))
    return bool(desired == current)


def _overlay(current: Any, desired: Any) -> Any:
    if isinstance(desired, dict) and isinstance(current, dict):
        out = dict(current)
        for key, value in desired.items():
            out[key] = _overlay(current.get(key), value)
        return out
    if isinstance(desired, list) and isinstance(current, list) and len(desired) == len(current):
        return [_overlay(c, d) for c, d in zip(current, desired, strict=True)]
    return copy.deepcopy(desired)


def _dns_label(text: str) -> str:
    out = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    return out[:63].strip("-") or "chart"


def _chart_name(spec: JSONObj) -> str:
    chart = str(spec.get("chart") or "")
    base = chart.rstrip("/").rsplit("/", 1)[-1]
    if base.endswith(".tgz"):
        base = base[:-4]
        version = str(spec.get("version") or "")
        if version and base.endswith(f"-{version}"):
            base = base[: -len(version) - 1]
    return base or "chart"


def _cond(kind: str, status: str, reason: str, message: str, previous: list[Any] | None) -> JSONObj:
    old = next((c for c in previous or [] if isinstance(c, dict) and c.get("type") == kind), None)
    stamp = old.get("lastTransitionTime") if old and old.get("status") == status else None
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": stamp or rfc3339()}


# ------------------------------------------------------------------------------- the LB announcer
class LinkAnnouncer:
    """MetalLB's L2 speaker, roughly: put each LoadBalancer address on eth0 as a /32 so the host answers ARP.

    Active only as root on Linux with an eth0, and unless K3S_STANDIN_ANNOUNCE=0.
    """

    def __init__(self, env: Mapping[str, str], log: Log, device: str = "eth0") -> None:
        self.log, self.device = log, device
        self.enabled = (env.get("K3S_STANDIN_ANNOUNCE", "1") != "0" and sys.platform.startswith("linux")
                        and hasattr(os, "geteuid") and os.geteuid() == 0
                        and Path(f"/sys/class/net/{device}").exists())

    def __call__(self, ip: str, service: str, present: bool) -> None:
        if not self.enabled:
            return
        verb = "add" if present else "del"
        try:
            proc = subprocess.run(["ip", "addr", verb, f"{ip}/32", "dev", self.device], capture_output=True,
                                  text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            self.log.error(f"could not {verb} LoadBalancer address {ip} on {self.device}: {exc}")
            return
        quiet = "File exists" in proc.stderr if present else "Cannot assign" in proc.stderr
        if proc.returncode != 0 and not quiet:
            self.log.error(f"ip addr {verb} {ip}/32 dev {self.device}: {proc.stderr.strip()}")
            return
        if present:
            self.log.info(f"Announcing LoadBalancer IP {ip} of service {service} on {self.device}")
        else:
            self.log.info(f"Withdrew LoadBalancer IP {ip} of service {service} from {self.device}")


# ------------------------------------------------------------------------------------- the runner
class StaleRead(ApiError):
    """A controller wrote from an old read; the next pass reads again (no Event: it is not a failure)."""

    def __init__(self, conflict: ApiError) -> None:
        super().__init__(conflict.code, conflict.reason, conflict.message, conflict.details)


class Controllers:
    def __init__(self, api: Api, data_dir: Path, log: Log, env: Mapping[str, str],
                 on_lb_change: LbHook | None = None, ingress_bind: IngressBind | None = None) -> None:
        self.api, self.store, self.registry, self.log = api, api.store, api.registry, log
        self.env = env
        self.on_lb_change: LbHook = on_lb_change or (lambda _ip, _svc, _present: None)
        self.announcer = LinkAnnouncer(env, log)
        self.announced: dict[str, str] = {}  # ip -> namespace/name
        self.certs = CertificateController(self, data_dir / "server" / "tls" / "standin-acme")
        self.ingress = IngressController(self, data_dir, env, ingress_bind)
        self.tunnels = TunnelController(self, env)
        self.tsoperator = TailscaleOperator(self, env)
        self.dnsgateway = DnsGateway(self, env)
        self.workloads = WorkloadController(self)
        self.argocd = ArgoCd(self, charts_dir(env))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._errors: dict[str, str] = {}

    # --- lifecycle
    def start(self) -> None:
        self.api.public_routes["/standin/acme-roots"] = self.certs.roots_response
        self._thread = threading.Thread(target=self._loop, name="k3s-standin-controllers", daemon=True)
        self._thread.start()
        self.tsoperator.start()

    def stop(self) -> None:
        self._stop.set()
        with self.store.lock:
            self.store.changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.ingress.stop()
        self.tsoperator.stop()
        self.dnsgateway.stop()
        self.tunnels.stop()
        for ip, svc in sorted(self.announced.items()):
            self._announce(ip, svc, False)
        self.announced.clear()

    def _loop(self) -> None:
        import time

        seen = -1
        last = 0.0
        while not self._stop.is_set():
            with self.store.lock:
                if self.store.rv == seen and not self.store.closed:
                    self.store.changed.wait(timeout=max(0.05, RESYNC - (time.monotonic() - last)))
                if self.store.closed or self._stop.is_set():
                    return
                rv = self.store.rv
            if rv == seen and time.monotonic() - last < RESYNC:
                continue
            seen, last = rv, time.monotonic()
            self.reconcile()

    def reconcile(self) -> None:
        for name, step in (("helm", self.reconcile_helm), ("lb", self.reconcile_lb),
                           ("certificates", self.certs.reconcile), ("volumes", self.reconcile_volumes),
                           ("workloads", self.workloads.reconcile), ("argocd", self.argocd.reconcile),
                           ("ingress", self.ingress.reconcile), ("tailscale-operator", self.tsoperator.reconcile),
                           ("dns-gateway", self.dnsgateway.reconcile), ("tunnels", self.tunnels.reconcile)):
            try:
                step()
                self._errors.pop(name, None)
            except StaleRead:  # someone changed an object under this step: the next pass reads it again
                continue
            except Exception as exc:  # keep running; say why (once per distinct error)
                text = f"{type(exc).__name__}: {exc}"
                if self._errors.get(name) != text:
                    self._errors[name] = text
                    self.log.error(f"{name} controller: {text}")

    # --- store helpers
    def rt(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self.registry.get(group, version, plural)

    def list_of(self, group: str, version: str, plural: str, namespace: str | None = None) -> list[JSONObj]:
        """The objects of a kind (in a namespace), [] while the API does not serve that kind."""
        rt = self.rt(group, version, plural)
        return self.store.list_objects(rt.storage_key, namespace) if rt is not None else []

    def get_of(self, group: str, version: str, plural: str, namespace: str, name: str) -> JSONObj | None:
        """One object, None when it (or its kind) does not exist."""
        rt = self.rt(group, version, plural)
        return self.store.get(rt.storage_key, namespace, name) if rt is not None else None

    def must_rt(self, group: str, version: str, plural: str) -> ResourceType:
        rt = self.registry.get(group, version, plural)
        assert rt is not None, plural
        return rt

    def opts(self, manager: str) -> WriteOptions:
        return WriteOptions(manager=manager, dry_run=False, field_validation="Ignore")

    def create(self, rt: ResourceType, obj: JSONObj, manager: str) -> JSONObj:
        return self.api.create_object(rt, obj, self.opts(manager))

    def update(self, rt: ResourceType, old: JSONObj, new: JSONObj, manager: str, sub: str = "") -> JSONObj:
        """An update from what this controller read; refused (409, as the API server does) when the object changed
        since, so a stale read can never undo someone's change, such as the deletionTimestamp a DELETE set."""
        meta = old["metadata"]
        with self.store.lock:
            current = self.store.get(rt.storage_key, meta.get("namespace", ""), meta["name"])
            if current is None:
                raise ApiError(404, "NotFound", f'{rt.qualified_resource} "{meta["name"]}" not found')
            if current["metadata"].get("resourceVersion") != meta.get("resourceVersion"):
                raise StaleRead(self.api._conflict(rt, meta["name"]))
            return self.api.update_object(rt, current, new, self.opts(manager), sub)

    def set_status(self, rt: ResourceType, obj: JSONObj, status: JSONObj, manager: str) -> JSONObj:
        if obj.get("status") == status:
            return obj
        new = copy.deepcopy(obj)
        new["status"] = status
        return self.update(rt, obj, new, manager, "status" if rt.status else "")

    def delete(self, rt: ResourceType, namespace: str, name: str) -> None:
        with self.store.lock, self.store.batch():
            obj = self.store.get(rt.storage_key, namespace, name)
            if obj is not None:
                self.api._remove(rt, obj, "Background")

    def ensure(self, rt: ResourceType, desired: JSONObj, manager: str) -> JSONObj:
        """Create `desired`, or overlay it on the live object when that does not already contain it."""
        meta = desired["metadata"]
        with self.store.lock:
            current = self.store.get(rt.storage_key, meta.get("namespace", ""), meta["name"])
            if current is None:
                return self.create(rt, copy.deepcopy(desired), manager)
            if _subset({k: v for k, v in desired.items() if k != "status"}, current):
                return current
            return self.update(rt, current, _overlay(current, desired), manager)

    def event(self, obj: JSONObj, kind: str, reason: str, message: str, source: str) -> None:
        """Record an Event about `obj` once (the same reason and message are not repeated)."""
        meta = obj["metadata"]
        namespace = meta.get("namespace") or "default"
        digest = hashlib.sha256(f"{meta.get('uid')}|{reason}|{message}".encode()).hexdigest()[:16]
        name = f"{meta['name']}.{digest}"
        ev_rt = self.must_rt("", "v1", "events")
        if self.store.get(ev_rt.storage_key, namespace, name) is not None:
            return
        stamp = rfc3339()
        with contextlib.suppress(ApiError):
            self.create(ev_rt, {"metadata": {"name": name, "namespace": namespace},
                                "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                                                   "name": meta["name"], "namespace": meta.get("namespace"),
                                                   "uid": meta.get("uid"),
                                                   "resourceVersion": meta.get("resourceVersion")},
                                "reason": reason, "message": message, "type": kind, "count": 1,
                                "firstTimestamp": stamp, "lastTimestamp": stamp,
                                "source": {"component": source}, "reportingComponent": source}, source)

    # ================================================================================== HelmChart
    def reconcile_helm(self) -> None:
        chart_rt = self.rt("helm.cattle.io", "v1", "helmcharts")
        charts = self.store.list_objects(chart_rt.storage_key) if chart_rt else []
        live = set()
        for chart in charts:
            meta = chart["metadata"]
            live.add(f"{meta['namespace']}/{meta['name']}")
            assert chart_rt is not None
            try:
                if meta.get("deletionTimestamp"):
                    self._helm_remove(chart_rt, chart)
                else:
                    self._helm_install(chart_rt, chart)
            except StaleRead:
                continue
            except ApiError as exc:
                self.event(chart, "Warning", "Failed", exc.message, "helm-controller")
        self._helm_sweep(live)

    def helm_values(self, chart: JSONObj) -> JSONObj:
        spec = chart.get("spec") or {}
        values = _yaml_map(spec.get("valuesContent"))
        config_rt = self.rt("helm.cattle.io", "v1", "helmchartconfigs")
        if config_rt is not None:
            config = self.store.get(config_rt.storage_key, chart["metadata"]["namespace"], chart["metadata"]["name"])
            if config is not None:
                values = deep_merge(values, _yaml_map((config.get("spec") or {}).get("valuesContent")))
        sets = spec.get("set")
        return apply_set(values, sets) if isinstance(sets, dict) else values

    def _helm_install(self, chart_rt: ResourceType, chart: JSONObj) -> None:  # noqa: PLR0915 - one install, step by step
        meta, spec = chart["metadata"], chart.get("spec") or {}
        name, namespace = meta["name"], meta["namespace"]
        if HELM_FINALIZER not in (meta.get("finalizers") or []):
            new = copy.deepcopy(chart)
            new["metadata"].setdefault("finalizers", []).append(HELM_FINALIZER)
            chart = self.update(chart_rt, chart, new, "helm-controller")
            meta = chart["metadata"]
        target = str(spec.get("targetNamespace") or namespace)
        values = self.helm_values(chart)
        chart_name = _chart_name(spec)
        version = str(spec.get("version") or "latest")
        config_hash = "SHA256=" + hashlib.sha256(json.dumps(
            {"chart": spec.get("chart"), "repo": spec.get("repo"), "version": spec.get("version"),
             "values": values, "target": target}, sort_keys=True).encode()).hexdigest().upper()
        job_name = f"helm-install-{name}"
        job_rt = self.must_rt("batch", "v1", "jobs")
        job = self.store.get(job_rt.storage_key, "kube-system", job_name)
        if job is not None and (job["metadata"].get("annotations") or {}).get(HELM_HASH_ANNOTATION) != config_hash:
            self.delete(job_rt, "kube-system", job_name)  # the chart changed: run the install again
            job = None
        ns_rt = self.must_rt("", "v1", "namespaces")
        target_missing = self.store.get(ns_rt.storage_key, "", target) is None
        if target_missing and spec.get("createNamespace"):
            self.create(ns_rt, {"metadata": {"name": target}}, "helm")
            target_missing = False
        if job is None:
            self._chart_crds(str(spec.get("chart") or ""))
            job = self.create(job_rt, self._helm_job(chart, job_name, "install", target, config_hash),
                              "helm-controller")
            self.log.info(f"helm-controller: running {job_name} for HelmChart {namespace}/{name}")
        previous = (chart.get("status") or {}).get("conditions")
        if target_missing:
            message = f'namespaces "{target}" not found'
            self._job_status(job_rt, job, failed=message)
            self.set_status(chart_rt, chart, {"jobName": job_name, "conditions": [
                _cond("JobCreated", "True", "", "", previous),
                _cond("Failed", "True", "Error", message, previous)]}, "helm-controller")
            self.event(chart, "Warning", "ApplyJob", f"Helm install job {job_name} failed: {message}",
                       "helm-controller")
            return
        labels = {"app.kubernetes.io/instance": name, "app.kubernetes.io/name": chart_name,
                  "app.kubernetes.io/managed-by": "Helm", "helm.sh/chart": f"{chart_name}-{version}"}
        annotations = {"meta.helm.sh/release-name": name, "meta.helm.sh/release-namespace": target,
                       HELM_CHART_ANNOTATION: f"{namespace}/{name}"}
        selector = {"app.kubernetes.io/instance": name, "app.kubernetes.io/name": chart_name}
        replicas = values.get("replicaCount")
        replicas = replicas if isinstance(replicas, int) and not isinstance(replicas, bool) and replicas >= 0 else 1
        image = _dig(values, "image", "repository")
        image = f"{image}:{_dig(values, 'image', 'tag') or version}" if isinstance(image, str) and image else \
            f"{chart_name}:{version}"
        deploy_rt = self.must_rt("apps", "v1", "deployments")
        deployment = self.ensure(deploy_rt, {
            "metadata": {"name": name, "namespace": target, "labels": labels, "annotations": annotations},
            "spec": {"replicas": replicas, "selector": {"matchLabels": selector},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": _dns_label(chart_name), "image": image}]}}}},
            "helm")
        generation = deployment["metadata"].get("generation", 1)
        if not _subset({"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
                        "observedGeneration": generation}, deployment.get("status") or {}):
            stamp = rfc3339()
            old_conds = (deployment.get("status") or {}).get("conditions")
            self.set_status(deploy_rt, deployment, {
                "observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
                "readyReplicas": replicas, "availableReplicas": replicas, "conditions": [
                    {**_cond("Available", "True", "MinimumReplicasAvailable", "Deployment has minimum availability.",
                             old_conds), "lastUpdateTime": stamp},
                    {**_cond("Progressing", "True", "NewReplicaSetAvailable",
                             f'ReplicaSet "{name}" has successfully progressed.', old_conds),
                     "lastUpdateTime": stamp}]}, "kube-controller-manager")
        self._helm_service(chart, values, target, labels, annotations, selector)
        self._helm_app_services(chart, values, target, labels, annotations, selector)
        if not (job.get("status") or {}).get("succeeded"):
            self._job_status(job_rt, job)
        self.set_status(chart_rt, chart, {"jobName": job_name, "conditions": [
            _cond("JobCreated", "True", "", "", previous)]}, "helm-controller")

    def _helm_service(self, chart: JSONObj, values: JSONObj, target: str, labels: dict[str, str],
                      annotations: dict[str, str], selector: dict[str, str]) -> None:
        name = chart["metadata"]["name"]
        service = values.get("service") if isinstance(values.get("service"), dict) else {}
        assert isinstance(service, dict)
        svc_spec = service.get("spec") if isinstance(service.get("spec"), dict) else {}
        assert isinstance(svc_spec, dict)
        lb_ip = svc_spec.get("loadBalancerIP") or service.get("loadBalancerIP")
        kind = svc_spec.get("type") or service.get("type") or ("LoadBalancer" if lb_ip else "ClusterIP")
        extra = service.get("annotations") if isinstance(service.get("annotations"), dict) else {}
        assert isinstance(extra, dict)
        port = service.get("port") if isinstance(service.get("port"), int) else 80
        ports = [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}]
        ingress = load_index(self.env).get(_chart_name(chart.get("spec") or {}))
        if ingress is not None:  # an ingress controller's chart exposes its HTTP and HTTPS entry points
            ports = [{"name": str(ingress.get(f"{kind_}_port_name") or name_), "port": int(ingress.get(
                f"{kind_}_port") or number), "targetPort": str(ingress.get(f"{kind_}_port_name") or name_),
                "protocol": "TCP"} for kind_, name_, number in (("http", "web", 80), ("https", "websecure", 443))]
        spec: JSONObj = {"type": str(kind), "selector": selector, "ports": ports}
        managed = ("loadBalancerIP", "externalTrafficPolicy", "loadBalancerClass", "loadBalancerSourceRanges")
        for key in managed:
            value = svc_spec.get(key) if key in svc_spec else service.get(key)
            if value not in (None, "", []):
                spec[key] = value
        svc_rt = self.must_rt("", "v1", "services")
        desired_ann = {**{str(k): str(v) for k, v in extra.items()}, **annotations}
        with self.store.lock:
            current = self.store.get(svc_rt.storage_key, target, name)
            if current is None:
                self.create(svc_rt, {"metadata": {"name": name, "namespace": target, "labels": labels,
                                                  "annotations": desired_ann}, "spec": spec}, "helm")
                return
            new = copy.deepcopy(current)
            new["metadata"]["labels"] = {**(current["metadata"].get("labels") or {}), **labels}
            # Others' annotations stay (helm's three-way merge keeps them): replacing them all dropped the app
            # marks _helm_app_services writes, and the two rewrote the Service on every pass.
            new["metadata"]["annotations"] = {**(current["metadata"].get("annotations") or {}), **desired_ann}
            live = new.setdefault("spec", {})
            for key in (*managed, "type", "selector"):
                live.pop(key, None)
            node_ports = {p.get("port"): p.get("nodePort") for p in live.get("ports") or []}
            live.update(copy.deepcopy(spec))
            for p in live["ports"]:
                if spec["type"] in ("NodePort", "LoadBalancer") and node_ports.get(p["port"]):
                    p["nodePort"] = node_ports[p["port"]]
            if new != current:
                self.update(svc_rt, current, new, "helm")

    def _helm_app_services(self, chart: JSONObj, values: JSONObj, target: str, labels: dict[str, str],
                           annotations: dict[str, str], selector: dict[str, str]) -> None:
        """The Services the real chart makes that our manifests reference (charts/apps.json "services"),
        named as the chart names them ({fullname}: values.fullnameOverride, else the release name), each
        marked with the app it serves and that app's health path for the app doubles."""
        entries = (load_apps(charts_dir(self.env)).get("services") or {}).get(_chart_name(chart.get("spec") or {}))
        if not entries:
            return
        release = chart["metadata"]["name"]
        fullname = values.get("fullnameOverride") if isinstance(values.get("fullnameOverride"), str) else None
        svc_rt = self.must_rt("", "v1", "services")
        for entry in entries:
            name = str(entry.get("name") or "{fullname}").format(fullname=fullname or release, release=release)
            port = int(entry.get("port") or 80)
            marks = {APP_ANNOTATION: str(entry.get("app") or ""), HEALTH_ANNOTATION: str(entry.get("health") or "/")}
            current = self.store.get(svc_rt.storage_key, target, name)
            if current is not None and name == release:  # the release's own Service: mark it only
                self.ensure(svc_rt, {"metadata": {"name": name, "namespace": target, "annotations": marks}}, "helm")
                continue
            self.ensure(svc_rt, {"metadata": {"name": name, "namespace": target, "labels": labels,
                                              "annotations": {**annotations, **marks}},
                                 "spec": {"type": "ClusterIP", "selector": selector, "ports": [
                                     {"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}]}},
                        "helm")

    def _chart_crds(self, chart: str) -> None:
        """Install the cluster-scoped objects the chart ships (CRDs, CSI drivers), from the lab's chart
        index in the release, as helm does."""
        index = charts_dir(self.env) / f"{chart.rsplit('/', 1)[-1]}.json"
        if not index.is_file():
            return
        objects = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(objects, list):  # charts/ingress.json is the ingress-controller index, not a chart
            return
        kinds = {"CustomResourceDefinition": ("apiextensions.k8s.io", "v1", "customresourcedefinitions"),
                 "CSIDriver": ("storage.k8s.io", "v1", "csidrivers")}
        for obj in objects:
            rt = self.must_rt(*kinds[obj["kind"]])
            if self.store.get(rt.storage_key, "", obj["metadata"]["name"]) is None:
                self.create(rt, obj, "helm-controller")
                self.log.info(f"helm-controller: chart {chart} installed {obj['kind']} {obj['metadata']['name']}")

    def _helm_job(self, chart: JSONObj, job_name: str, action: str, target: str, config_hash: str) -> JSONObj:
        meta, spec = chart["metadata"], chart.get("spec") or {}
        env = [{"name": "NAME", "value": meta["name"]}, {"name": "VERSION", "value": str(spec.get("version") or "")},
               {"name": "REPO", "value": str(spec.get("repo") or "")}, {"name": "HELM_DRIVER", "value": "secret"},
               {"name": "CHART_NAMESPACE", "value": meta["namespace"]}, {"name": "CHART",
                                                                          "value": str(spec.get("chart") or "")},
               {"name": "HELM_VERSION", "value": str(spec.get("helmVersion") or "")},
               {"name": "TARGET_NAMESPACE", "value": target}]
        return {"metadata": {
            "name": job_name, "namespace": "kube-system",
            "labels": {"helmcharts.helm.cattle.io/chart": meta["name"]},
            "annotations": {HELM_HASH_ANNOTATION: config_hash, HELM_CHART_ANNOTATION:
                            f"{meta['namespace']}/{meta['name']}"},
            "ownerReferences": [{"apiVersion": "helm.cattle.io/v1", "kind": "HelmChart", "name": meta["name"],
                                 "uid": meta["uid"]}] if meta["namespace"] == "kube-system" else []},
            "spec": {"backoffLimit": int(spec.get("backOffLimit") or 1000), "template": {
                "metadata": {"labels": {"helmcharts.helm.cattle.io/chart": meta["name"]}},
                "spec": {"restartPolicy": "OnFailure", "serviceAccountName": f"helm-{meta['name']}",
                         "containers": [{"name": "helm", "image": str(spec.get("jobImage") or JOB_IMAGE),
                                         "args": [action], "env": env}]}}}}

    def _job_status(self, job_rt: ResourceType, job: JSONObj, failed: str = "") -> None:
        stamp = rfc3339()
        status: JSONObj
        if failed:
            status = {"failed": 1, "startTime": stamp, "conditions": [
                {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": failed,
                 "lastProbeTime": stamp, "lastTransitionTime": stamp}]}
            if (job.get("status") or {}).get("failed"):
                return
        else:
            status = {"succeeded": 1, "ready": 0, "startTime": stamp, "completionTime": stamp, "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                 "message": "Reached expected number of succeeded pods", "lastProbeTime": stamp,
                 "lastTransitionTime": stamp},
                {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                 "message": "Reached expected number of succeeded pods", "lastProbeTime": stamp,
                 "lastTransitionTime": stamp}]}
        self.set_status(job_rt, job, status, "kube-controller-manager")

    def _helm_remove(self, chart_rt: ResourceType, chart: JSONObj) -> None:
        meta = chart["metadata"]
        name, namespace = meta["name"], meta["namespace"]
        job_rt = self.must_rt("batch", "v1", "jobs")
        target = str((chart.get("spec") or {}).get("targetNamespace") or namespace)
        self.delete(job_rt, "kube-system", f"helm-install-{name}")
        delete_name = f"helm-delete-{name}"
        job = self.store.get(job_rt.storage_key, "kube-system", delete_name)
        if job is None:
            job = self.create(job_rt, self._helm_job(chart, delete_name, "delete", target, ""), "helm-controller")
            self.log.info(f"helm-controller: running {delete_name} for HelmChart {namespace}/{name}")
        self._job_status(job_rt, job)
        self._helm_delete_release(f"{namespace}/{name}")
        self.delete(job_rt, "kube-system", delete_name)
        current = self.store.get(chart_rt.storage_key, namespace, name)
        if current is not None:
            new = copy.deepcopy(current)
            new["metadata"]["finalizers"] = [f for f in current["metadata"].get("finalizers") or []
                                             if f != HELM_FINALIZER]
            if not new["metadata"]["finalizers"]:
                del new["metadata"]["finalizers"]
            self.update(chart_rt, current, new, "helm-controller")

    def _helm_delete_release(self, chart_key: str) -> None:
        for rt in (self.must_rt("apps", "v1", "deployments"), self.must_rt("", "v1", "services")):
            for obj in self.store.list_objects(rt.storage_key):
                if (obj["metadata"].get("annotations") or {}).get(HELM_CHART_ANNOTATION) == chart_key:
                    self.delete(rt, obj["metadata"]["namespace"], obj["metadata"]["name"])

    def _helm_sweep(self, live: set[str]) -> None:
        """What a HelmChart made outlives it only when the chart went before its finalizer was set."""
        for rt in (self.must_rt("apps", "v1", "deployments"), self.must_rt("", "v1", "services"),
                   self.must_rt("batch", "v1", "jobs")):
            for obj in self.store.list_objects(rt.storage_key):
                key = (obj["metadata"].get("annotations") or {}).get(HELM_CHART_ANNOTATION)
                if key and key not in live:
                    self.delete(rt, obj["metadata"]["namespace"], obj["metadata"]["name"])

    # ======================================================================= LoadBalancer IPAM
    def _pools(self) -> list[JSONObj] | None:
        pool_rt = self.rt("metallb.io", "v1beta1", "ipaddresspools")
        if pool_rt is None:
            return None
        pools = []
        for pool in self.store.list_objects(pool_rt.storage_key):
            spec = pool.get("spec") or {}
            ranges: list[tuple[int, int]] = []
            for text in spec.get("addresses") or []:
                with contextlib.suppress(ValueError):
                    ranges.append(parse_range(str(text)))
            pools.append({"name": pool["metadata"]["name"], "ranges": ranges,
                          "auto": spec.get("autoAssign", True) is not False,
                          "avoid_buggy": bool(spec.get("avoidBuggyIPs")),
                          "namespaces": list(_dig(spec, "serviceAllocation", "namespaces") or [])})
        return sorted(pools, key=lambda p: str(p["name"]))

    def reconcile_lb(self) -> None:  # noqa: PLR0912, PLR0915
        pools = self._pools()
        svc_rt = self.must_rt("", "v1", "services")
        services = self.store.list_objects(svc_rt.storage_key)
        allocation: dict[str, str] = {}  # ip -> ns/name
        if pools is None:
            self._sync_announcements(allocation)
            return

        def pool_of(ip: str) -> JSONObj | None:
            value = int(ipaddress.ip_address(ip))
            return next((p for p in pools if any(a <= value <= b for a, b in p["ranges"])), None)

        def allowed(pool: JSONObj, svc: JSONObj) -> bool:
            wanted = next((a for k, v in (svc["metadata"].get("annotations") or {}).items()
                           if k in LB_POOL_ANNOTATIONS for a in [v]), None)
            if wanted and wanted != pool["name"]:
                return False
            return not pool["namespaces"] or svc["metadata"]["namespace"] in pool["namespaces"]

        lb_services = []
        for svc in services:
            spec = svc.get("spec") or {}
            current = (_dig(svc, "status", "loadBalancer", "ingress") or [{}])[0].get("ip")
            if spec.get("type") != "LoadBalancer" or spec.get("loadBalancerClass"):
                if current and _is_ip(current) and pool_of(current) is not None:
                    self.set_status(svc_rt, svc, {**(svc.get("status") or {}), "loadBalancer": {}},
                                    "metallb-controller")
                continue
            lb_services.append(svc)
        lb_services.sort(key=lambda s: (s["metadata"].get("creationTimestamp", ""), s["metadata"]["namespace"],
                                        s["metadata"]["name"]))

        def requested(svc: JSONObj) -> str | None:
            ann = svc["metadata"].get("annotations") or {}
            for key in LB_IP_ANNOTATIONS:
                if ann.get(key):
                    return str(ann[key]).split(",")[0].strip()
            return str((svc.get("spec") or {}).get("loadBalancerIP") or "") or None

        decided: dict[str, tuple[str | None, str]] = {}  # ns/name -> (ip, why not)
        for svc in lb_services:  # keep what is already assigned and still valid
            key = f"{svc['metadata']['namespace']}/{svc['metadata']['name']}"
            current = (_dig(svc, "status", "loadBalancer", "ingress") or [{}])[0].get("ip")
            want = requested(svc)
            if not current or not _is_ip(current) or current in allocation or (want and want != current):
                continue
            pool = pool_of(current)
            if pool is None or not allowed(pool, svc) or (not pool["auto"] and not want):
                continue
            allocation[current] = key
            decided[key] = (current, "")
        for svc in lb_services:
            key = f"{svc['metadata']['namespace']}/{svc['metadata']['name']}"
            if key in decided:
                continue
            want = requested(svc)
            if want:
                pool = pool_of(want) if _is_ip(want) else None
                if pool is None or not allowed(pool, svc):
                    decided[key] = (None, f'Failed to allocate IP for "{key}": ["{want}"] is not allowed in config')
                elif want in allocation:
                    decided[key] = (None, f'Failed to allocate IP for "{key}": can\'t change sharing key for '
                                          f'"{key}", address also in use by {allocation[want]}')
                else:
                    allocation[want] = key
                    decided[key] = (want, "")
                continue
            chosen = None
            for pool in pools:
                if not pool["auto"] or not allowed(pool, svc):
                    continue
                chosen = next((ip for ip in _addresses(pool) if ip not in allocation), None)
                if chosen:
                    break
            if chosen is None:
                reason = "no available IPs" if any(p["auto"] and allowed(p, svc) for p in pools) else \
                    "no available IPs: no IPAddressPool can serve this service"
                decided[key] = (None, f'Failed to allocate IP for "{key}": {reason}')
            else:
                allocation[chosen] = key
                decided[key] = (chosen, "")
        for svc in lb_services:
            key = f"{svc['metadata']['namespace']}/{svc['metadata']['name']}"
            ip, why = decided[key]
            status = copy.deepcopy(svc.get("status") or {})
            if ip is None:
                status["loadBalancer"] = {}
                self.set_status(svc_rt, svc, status, "metallb-controller")
                self.event(svc, "Warning", "AllocationFailed", why, "metallb-controller")
            else:
                status["loadBalancer"] = {"ingress": [{"ip": ip, "ipMode": "VIP"}]}
                if status != svc.get("status"):
                    self.set_status(svc_rt, svc, status, "metallb-controller")
                    self.event(svc, "Normal", "IPAllocated", f'Assigned IP ["{ip}"]', "metallb-controller")
        self._sync_announcements(allocation)

    def _sync_announcements(self, allocation: dict[str, str]) -> None:
        for ip, svc in sorted(self.announced.items()):
            if allocation.get(ip) != svc:
                self._announce(ip, svc, False)
                del self.announced[ip]
        for ip, svc in sorted(allocation.items()):
            if ip not in self.announced:
                self._announce(ip, svc, True)
                self.announced[ip] = svc

    def _announce(self, ip: str, svc: str, present: bool) -> None:
        for hook in (self.announcer, self.on_lb_change):
            try:
                hook(ip, svc, present)
            except Exception as exc:
                self.log.error(f"LoadBalancer hook for {ip} ({svc}, present={present}) failed: {exc}")

    # ============================================================================ volumes
    def reconcile_volumes(self) -> None:
        pvc_rt, pv_rt = self.must_rt("", "v1", "persistentvolumeclaims"), self.must_rt("", "v1", "persistentvolumes")
        sc_rt, csi_rt = self.must_rt("storage.k8s.io", "v1", "storageclasses"), self.must_rt("storage.k8s.io", "v1",
                                                                                             "csidrivers")
        classes = {c["metadata"]["name"]: c for c in self.store.list_objects(sc_rt.storage_key)}
        drivers = {d["metadata"]["name"] for d in self.store.list_objects(csi_rt.storage_key)}
        default = next((n for n, c in sorted(classes.items())
                        if any((c["metadata"].get("annotations") or {}).get(a) == "true"
                               for a in DEFAULT_CLASS_ANNOTATIONS)), None)
        claims = self.store.list_objects(pvc_rt.storage_key)
        claim_uids = {c["metadata"]["uid"] for c in claims}
        for pv in self.store.list_objects(pv_rt.storage_key):  # claims that went away
            ref = (pv.get("spec") or {}).get("claimRef") or {}
            if not ref.get("uid") or ref["uid"] in claim_uids:
                continue
            if (pv.get("spec") or {}).get("persistentVolumeReclaimPolicy", "Delete") == "Delete":
                self.delete(pv_rt, "", pv["metadata"]["name"])
            else:
                self.set_status(pv_rt, pv, {"phase": "Released"}, "persistent-volume-binder")
        for claim in claims:
            if claim["metadata"].get("deletionTimestamp"):
                continue
            spec = claim.get("spec") or {}
            if spec.get("volumeName"):
                bound = self.store.get(pv_rt.storage_key, "", spec["volumeName"])
                if bound is not None:
                    self._bind(pvc_rt, pv_rt, claim, bound)
                else:
                    self.event(claim, "Warning", "ClaimLost",
                               "Bound claim has lost its PersistentVolume. Data on the volume is lost!",
                               "persistentvolume-controller")
                continue
            class_name = spec.get("storageClassName", default) if "storageClassName" in spec else default
            if not class_name:
                self.event(claim, "Normal", "FailedBinding",
                           "no persistent volumes available for this claim and no storage class is set",
                           "persistentvolume-controller")
                continue
            sc = classes.get(class_name)
            if sc is None:
                self.event(claim, "Warning", "ProvisioningFailed",
                           f'storageclass.storage.k8s.io "{class_name}" not found', "persistentvolume-controller")
                continue
            provisioner = str(sc.get("provisioner") or "")
            if provisioner not in drivers:
                self.event(claim, "Normal", "ExternalProvisioning",
                           f"Waiting for a volume to be created either by the external provisioner '{provisioner}' "
                           "or manually by the system administrator. If volume creation is delayed, please verify "
                           "that the provisioner is running and correctly registered.", "persistentvolume-controller")
                continue
            self._provision(pvc_rt, pv_rt, claim, sc)

    def _provision(self, pvc_rt: ResourceType, pv_rt: ResourceType, claim: JSONObj, sc: JSONObj) -> None:
        meta, spec = claim["metadata"], claim.get("spec") or {}
        provisioner = str(sc.get("provisioner"))
        pv_name = f"pvc-{meta['uid']}"
        size = _dig(spec, "resources", "requests", "storage") or "1Gi"
        pv = self.store.get(pv_rt.storage_key, "", pv_name)
        if pv is None:
            pv_spec: JSONObj = {
                "capacity": {"storage": size}, "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": sc.get("reclaimPolicy") or "Delete",
                "storageClassName": sc["metadata"]["name"], "volumeMode": spec.get("volumeMode") or "Filesystem",
                "claimRef": {"kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": meta["namespace"],
                             "name": meta["name"], "uid": meta["uid"],
                             "resourceVersion": meta.get("resourceVersion")},
                "csi": {"driver": provisioner, "volumeHandle": pv_name,
                        "volumeAttributes": {str(k): str(v) for k, v in (sc.get("parameters") or {}).items()}}}
            if sc.get("mountOptions"):
                pv_spec["mountOptions"] = sc["mountOptions"]
            pv = self.create(pv_rt, {"metadata": {"name": pv_name, "annotations": {
                "pv.kubernetes.io/provisioned-by": provisioner,
                "volume.kubernetes.io/provisioner-deletion-secret-name": "",
                "volume.kubernetes.io/provisioner-deletion-secret-namespace": ""},
                "finalizers": ["kubernetes.io/pv-protection"]}, "spec": pv_spec}, "csi-provisioner")
            self.event(claim, "Normal", "ProvisioningSucceeded", f"Successfully provisioned volume {pv_name}",
                       f"{provisioner}_csi-provisioner")
        new = copy.deepcopy(claim)
        new["spec"]["volumeName"] = pv_name
        new["metadata"].setdefault("annotations", {}).update({
            "pv.kubernetes.io/bind-completed": "yes", "pv.kubernetes.io/bound-by-controller": "yes",
            "volume.beta.kubernetes.io/storage-provisioner": provisioner,
            "volume.kubernetes.io/storage-provisioner": provisioner})
        claim = self.update(pvc_rt, claim, new, "kube-controller-manager")
        self._bind(pvc_rt, pv_rt, claim, pv)

    def _bind(self, pvc_rt: ResourceType, pv_rt: ResourceType, claim: JSONObj, pv: JSONObj) -> None:
        pv_spec = pv.get("spec") or {}
        self.set_status(pv_rt, pv, {"phase": "Bound"}, "kube-controller-manager")
        status = {"phase": "Bound", "accessModes": pv_spec.get("accessModes") or ["ReadWriteOnce"],
                  "capacity": pv_spec.get("capacity") or {}}
        self.set_status(pvc_rt, claim, status, "kube-controller-manager")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_range(text: str) -> tuple[int, int]:
    """An IPAddressPool address: `a-b`, a CIDR or a single IP -> (first, last) as integers."""
    text = text.strip()
    if "-" in text:
        first, _, last = text.partition("-")
        a, b = int(ipaddress.ip_address(first.strip())), int(ipaddress.ip_address(last.strip()))
        if b < a:
            raise ValueError(f"bad range {text}")
        return a, b
    net = ipaddress.ip_network(text, strict=False)
    return int(net.network_address), int(net.broadcast_address)


def _addresses(pool: JSONObj) -> Iterator[str]:
    for a, b in pool["ranges"]:
        for value in range(a, b + 1):
            addr = ipaddress.ip_address(value)
            if pool["avoid_buggy"] and addr.version == 4 and value % 256 in (0, 255):
                continue
            yield str(addr)

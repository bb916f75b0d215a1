"""Kubernetes layers: manifests rendered from the inventory, applied server-side, pruned by label.

Reads are one list per kind, selected by our labels. A desired object is a no-op when the
cluster's copy already holds every field we set; otherwise it is applied (server-side apply,
one field manager). Custom resources wait until their CRD is served (no "sleep 60"); objects
with our labels that the manifests no longer declare are deleted. `down` deletes in reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from homelab.clients.kube import COMPONENT, MANAGED_BY, Kube, contains, describe, identity
from homelab.context import Run
from homelab.layers.k3s import CONTEXT, kubeconfig_path, operator_dir
from homelab.manifests import crd_group
from homelab.plan import Change, FieldDiff, LayerPlan
from homelab.wait import poll

BUILTIN_GROUPS = {"v1", "apps/v1", "batch/v1", "networking.k8s.io/v1", "storage.k8s.io/v1",
                  "rbac.authorization.k8s.io/v1", "policy/v1", "apiextensions.k8s.io/v1", "helm.cattle.io/v1"}


def kube(run: Run) -> Kube:
    if run.kube is None:
        k = Kube(kubeconfig_path(run), CONTEXT, operator_dir(run))
        run.guard(urlsplit(k.api.configuration.host).hostname or "")
        run.kube = k
    return run.kube  # type: ignore[no-any-return]


def field_diff(actual: dict[str, Any] | None, desired: dict[str, Any], prefix: str = "") -> list[FieldDiff]:
    """The paths (two levels deep at most) whose desired value the actual object does not hold."""
    out = []
    for key, value in desired.items():
        if key in ("apiVersion", "kind"):
            continue
        have = (actual or {}).get(key)
        if contains(have, value):
            continue
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(have, dict) and not prefix:
            out += field_diff(have, value, prefix=f"{path}.")
        else:
            out.append(FieldDiff(path, _short(have), _short(value)))
    return out


def _redacted(obj: dict[str, Any], diffs: list[FieldDiff]) -> list[FieldDiff]:
    """A Secret's values never reach the plan, its JSON or a log: only that they change."""
    if obj.get("kind") != "Secret":
        return diffs
    hidden = ("data", "stringData")
    return [FieldDiff(d.name, None if d.old is None else "(secret)", "(secret)")
            if d.name.split(".")[0] in hidden else d for d in diffs]


def _short(value: Any) -> Any:
    text = str(value)
    return value if len(text) <= 80 else text[:77] + "..."


class ManifestLayer:
    def __init__(self, name: str, components: Sequence[str], render: Callable[[Run, str], Any],
                 late: Callable[[Run, dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.name = name
        self.components = tuple(components)
        self._render = render
        # Fills in, at apply time, what only an earlier change of the same run can know (a new tunnel's token).
        self._late = late

    def _selector(self) -> str:
        return f"{MANAGED_BY}=homelab,{COMPONENT} in ({','.join(self.components)})"

    def _desired(self, run: Run, plan: LayerPlan) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for component in self.components:
            result = self._render(run, component)
            plan.warnings.extend(result.warnings)
            out += [(component, obj) for obj in result.objects]
        return out

    def _actual(self, run: Run, kinds: Sequence[tuple[str, str]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
        k = kube(run)
        found = {}
        for api_version, kind in kinds:
            for obj in k.list(api_version, kind, self._selector()):
                found[identity(obj)] = obj
        return found

    def plan_up(self, run: Run) -> LayerPlan:
        plan = LayerPlan(self.name)
        desired = self._desired(run, plan)
        kinds = list(dict.fromkeys((obj["apiVersion"], obj["kind"]) for _, obj in desired))
        actual = self._actual(run, kinds)
        k = kube(run)
        for component, obj in desired:
            current = actual.pop(identity(obj), None)
            if current is not None and (current.get("metadata") or {}).get("deletionTimestamp"):
                # Applying to an object being deleted changes nothing: wait until it is gone, then create.
                plan.add(Change(self.name, obj["kind"], _name(obj), "create",
                                f"{component}: still being deleted; created again once it is gone",
                                tuple(_redacted(obj, field_diff(None, obj))),
                                apply=self._after_deletion(run, obj)))
                continue
            if current is not None and contains(current, obj):
                plan.add(Change(self.name, obj["kind"], _name(obj), "noop", f"{component}: up to date"))
                continue
            fields = tuple(_redacted(obj, field_diff(current, obj)))
            plan.add(Change(self.name, obj["kind"], _name(obj), "create" if current is None else "update",
                            f"{component}: server-side apply", fields, apply=self._applier(run, obj)))
        for obj in actual.values():
            plan.add(Change(self.name, obj["kind"], _name(obj), "delete",
                            f"{obj['metadata'].get('labels', {}).get(COMPONENT, '?')}: no longer declared (prune)",
                            apply=_deleter(k, obj, run)))

        def finish() -> None:
            wait_ready(run, [obj for _, obj in desired])

        plan.finish = finish
        return plan

    def _after_deletion(self, run: Run, obj: dict[str, Any]) -> Callable[[], None]:
        apply = self._applier(run, obj)

        def wait_then_apply() -> None:
            wait_gone(run, kube(run), obj)
            apply()

        return wait_then_apply

    def _applier(self, run: Run, obj: dict[str, Any]) -> Callable[[], None]:
        def apply() -> None:
            k = kube(run)
            if obj["apiVersion"] not in BUILTIN_GROUPS:
                k.wait_served([(obj["apiVersion"], obj["kind"])], run.progress, run.timeouts.k3s)
            k.apply(self._late(run, obj) if self._late else obj)

        return apply

    def plan_down(self, run: Run) -> LayerPlan:
        plan = LayerPlan(self.name)
        if not kubeconfig_path(run).exists():
            plan.add(Change(self.name, "cluster", "-", "noop", "no kubeconfig: no cluster to remove anything from"))
            return plan
        desired = self._desired(run, plan)
        kinds = list(dict.fromkeys((obj["apiVersion"], obj["kind"]) for _, obj in desired))
        actual = self._actual(run, kinds)
        k = kube(run)
        for obj in reversed([o for _, o in desired if identity(o) in actual] + [
                o for ident, o in actual.items() if ident not in {identity(d) for _, d in desired}]):
            plan.add(Change(self.name, obj["kind"], _name(obj), "delete", "remove", apply=_deleter(k, obj, run)))
        return plan


def _deleter(k: Kube, obj: dict[str, Any], run: Run | None = None) -> Callable[[], None]:
    """DELETE; a custom resource is then awaited until it is gone, because its finalizer needs its controller,
    which a later change of the same `down` may uninstall (the Connector before the Tailscale operator)."""
    def delete() -> None:
        k.delete(obj)
        if run is not None and crd_group(obj) is not None:
            wait_gone(run, k, obj)

    return delete


def wait_gone(run: Run, k: Kube, obj: dict[str, Any]) -> None:
    def probe() -> tuple[bool | None, str]:
        current = k.get(obj)
        if current is None:
            return True, "gone"
        return None, "finalizers still running: " + ", ".join((current.get("metadata") or {}).get("finalizers") or [])

    poll(f"{describe(obj)} deleted", probe, timeout=run.timeouts.k3s, progress=run.progress, first=0.2, maximum=2)


def _name(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else str(meta["name"])


def wait_ready(run: Run, objects: Sequence[dict[str, Any]]) -> None:
    """Per component: each HelmChart's release Deployment Available, LoadBalancers with an address,
    Certificates Ready."""
    k = kube(run)
    checks: list[tuple[str, Callable[[], str | None]]] = []
    for obj in objects:
        kind, meta = obj["kind"], obj["metadata"]
        if kind == "HelmChart":
            ns = obj.get("spec", {}).get("targetNamespace") or meta.get("namespace", "kube-system")
            checks.append((f"HelmChart {meta['name']} installed", _install_check(k, obj)))
            checks.append((f"HelmChart {meta['name']}'s Deployments available",
                           _deployment_check(k, ns, str(meta["name"]))))
        elif kind == "Certificate":
            checks.append((f"Certificate {meta['namespace']}/{meta['name']} Ready", _condition_check(k, obj, "Ready")))
    for what, check in checks:
        def probe(check: Callable[[], str | None] = check) -> tuple[bool | None, str]:
            problem = check()
            return (True if problem is None else None), problem or "ready"
        poll(what, probe, timeout=run.timeouts.k3s, progress=run.progress, first=0.3, maximum=3)


def _deployment_check(k: Kube, namespace: str, name: str) -> Callable[[], str | None]:
    return lambda: _deployment_ready(k, namespace, name)


def _condition_check(k: Kube, obj: dict[str, Any], kind: str) -> Callable[[], str | None]:
    return lambda: _condition(k, obj, kind)


def _install_check(k: Kube, chart: dict[str, Any]) -> Callable[[], str | None]:
    return lambda: _installed(k, chart)


def _installed(k: Kube, chart: dict[str, Any]) -> str | None:
    """K3s's helm controller ran the chart's install Job (status.jobName) to completion."""
    current = k.get(chart)
    job_name = ((current or {}).get("status") or {}).get("jobName")
    if not job_name:
        return "no install Job yet"
    job = k.get({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": job_name,
                                                                        "namespace": chart["metadata"]["namespace"]}})
    conditions = {c.get("type"): c for c in ((job or {}).get("status") or {}).get("conditions") or []}
    if (conditions.get("Complete") or {}).get("status") == "True":
        return None
    failed = conditions.get("Failed") or {}
    if failed.get("status") == "True":
        return f"install Job {job_name} failed: {failed.get('message', '')}"
    return f"install Job {job_name} running"


def _deployment_ready(k: Kube, namespace: str, release: str) -> str | None:
    """Every Deployment of the Helm release that carries app.kubernetes.io/instance is available (charts that
    label otherwise, or run StatefulSets only, are judged by their install Job alone)."""
    found = [d for d in k.list("apps/v1", "Deployment", f"app.kubernetes.io/instance={release}")
             if d["metadata"].get("namespace") == namespace]
    if not found:
        return None
    waiting = []
    for dep in found:
        wanted = (dep.get("spec") or {}).get("replicas", 1)
        available = (dep.get("status") or {}).get("availableReplicas", 0)
        if available < wanted:
            waiting.append(f"{dep['metadata']['name']} {available}/{wanted} available")
    return "; ".join(waiting) or None


def _condition(k: Kube, obj: dict[str, Any], kind: str) -> str | None:
    current = k.get(obj)
    if current is None:
        return f"{describe(obj)} not found"
    for condition in (current.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return None if condition.get("status") == "True" else condition.get("message", "not ready")
    return f"no {kind} condition yet"


def target_secrets(run: Run) -> dict[str, str]:
    """The render secrets the target holds (environment or lab state), by name."""
    from homelab import manifests

    return {name: value for name in manifests.SECRET_ENV if (value := run.target.secret(name))}


def render(run: Run, component: str) -> Any:
    """A layer's manifests with the target's secrets (monitoring, apps)."""
    from homelab import manifests

    return manifests.render(run.inv, component=component, secrets=target_secrets(run),
                            issuer=run.inv.network.cert_issuer)


def network_render(run: Run, component: str) -> Any:
    """The network layer's manifests: the Ceph fsid from PVE, the CSI client's key from the ceph layer."""
    from homelab import manifests
    from homelab.layers.ceph import csi_key

    if "ceph_fsid" not in run.memo:
        run.memo["ceph_fsid"] = run.proxmox.get("/cluster/ceph/status").get("fsid") or manifests.PLACEHOLDER_FSID
    secrets = target_secrets(run)
    if component == "ceph-csi":
        # An SSH failure stops the layer: rendering without the key would prune the CSI Secret.
        key = csi_key(run)
        if key:
            secrets[manifests.CEPH_KEY] = key
    return manifests.render(run.inv, component=component, secrets=secrets, ceph_fsid=run.memo["ceph_fsid"],
                            issuer=run.inv.network.cert_issuer)

"""An Argo CD application-controller double: Applications sync from the lab's snapshot of their repository.

The lab has no route to GitHub, so the release carries a snapshot of what the repositories hold
(`charts/gitops.json`: {repoURL: {path: [object, ...]}}, written by lab.up from this repository's
gitops folder). While the argo-cd release's Deployments are Ready, for each Application
(argoproj.io/v1alpha1) whose directory source is in the snapshot:

- compare: every object of the source path exists and holds the source's fields -> sync status
  Synced, else OutOfSync (with the differing resources listed in status.resources);
- automated sync (spec.syncPolicy.automated) applies the missing or differing objects once per
  revision, as the controller's auto-sync does; with selfHeal false, drift made after that sync is
  reported (OutOfSync) and left alone, as Argo CD does;
- health: Healthy when every object exists (this double knows no richer health), Missing otherwise;
- a source not in the snapshot: sync Unknown with a ComparisonError condition naming it.
Status fields follow the CRD (status.sync.status/revision, status.health.status, status.resources,
status.conditions, status.reconciledAt). https://argo-cd.readthedocs.io/en/stable/user-guide/auto_sync/
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .api import ApiError, rfc3339

if TYPE_CHECKING:
    from .controllers import Controllers

JSONObj = dict[str, Any]
SNAPSHOT = "gitops.json"
INSTANCE = "app.kubernetes.io/instance"
REVISION = "lab-snapshot"


def _contains(have: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(have, dict) and all(_contains(have.get(k), v) for k, v in want.items())
    return bool(have == want)


class ArgoCd:
    def __init__(self, ctl: Controllers, charts: Path) -> None:
        self.ctl = ctl
        self.charts = charts
        self._synced: dict[str, str] = {}  # app uid -> revision auto-synced

    def _snapshot(self) -> JSONObj:
        try:
            data = json.loads((self.charts / SNAPSHOT).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _argocd_ready(self, namespace: str) -> bool:
        rt = self.ctl.must_rt("apps", "v1", "deployments")
        found = [d for d in self.ctl.store.list_objects(rt.storage_key, namespace)
                 if (d["metadata"].get("annotations") or {}).get("helmcharts.helm.cattle.io/chart")]
        return bool(found) and all(((d.get("status") or {}).get("readyReplicas") or 0) >= 1 for d in found)

    def _rt_of(self, obj: JSONObj) -> Any:
        group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
        kind = obj.get("kind")
        for rt in self.ctl.registry.all():
            if rt.group == group and rt.version == version and rt.kind == kind:
                return rt
        return None

    def reconcile(self) -> None:
        app_rt = self.ctl.rt("argoproj.io", "v1alpha1", "applications")
        if app_rt is None:
            return
        snapshot = self._snapshot()
        for app in self.ctl.store.list_objects(app_rt.storage_key):
            meta = app["metadata"]
            if meta.get("deletionTimestamp") or not self._argocd_ready(meta["namespace"]):
                continue
            self._reconcile_app(app_rt, app, snapshot)

    def _reconcile_app(self, app_rt: Any, app: JSONObj, snapshot: JSONObj) -> None:
        spec = app.get("spec") or {}
        source = spec.get("source") or {}
        repo, path = str(source.get("repoURL") or ""), str(source.get("path") or "")
        destination = str((spec.get("destination") or {}).get("namespace") or app["metadata"]["namespace"])
        objects = ((snapshot.get(repo) or {}).get(path)) if isinstance(snapshot.get(repo), dict) else None
        stamp = rfc3339()
        if objects is None:
            self.ctl.set_status(app_rt, app, {**(app.get("status") or {}), "sync": {"status": "Unknown"},
                                              "health": {"status": "Unknown"}, "conditions": [
                {"type": "ComparisonError", "message": f"repository {repo} path {path} is not in the lab's snapshot",
                 "lastTransitionTime": stamp}]}, "argocd-application-controller")
            return
        uid = app["metadata"].get("uid", "")
        automated = (spec.get("syncPolicy") or {}).get("automated") is not None
        if automated and self._synced.get(uid) != REVISION:
            for obj in objects:
                self._apply(obj, destination, app["metadata"]["name"])
            self._synced[uid] = REVISION
        resources, in_sync, present = [], True, True
        for obj in objects:
            rt = self._rt_of(obj)
            namespace = (obj.get("metadata") or {}).get("namespace") or (destination if rt and rt.namespaced else "")
            live = self.ctl.store.get(rt.storage_key, namespace, obj["metadata"]["name"]) if rt else None
            desired = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
            synced = live is not None and _contains(live, desired)
            in_sync, present = in_sync and synced, present and live is not None
            resources.append({"group": str(obj.get("apiVersion", "")).rpartition("/")[0], "kind": obj.get("kind"),
                              "namespace": namespace, "name": obj["metadata"]["name"],
                              "status": "Synced" if synced else "OutOfSync",
                              "health": {"status": "Healthy" if live is not None else "Missing"}})
        status = {"sync": {"status": "Synced" if in_sync else "OutOfSync", "revision": REVISION,
                           "comparedTo": {"source": source, "destination": spec.get("destination") or {}}},
                  "health": {"status": "Healthy" if present else "Missing"}, "resources": resources,
                  "sourceType": "Directory", "reconciledAt": (app.get("status") or {}).get("reconciledAt") or stamp}
        old = app.get("status") or {}
        if {k: old.get(k) for k in ("sync", "health", "resources")} != {k: status[k] for k in
                                                                        ("sync", "health", "resources")}:
            status["reconciledAt"] = stamp
            self.ctl.set_status(app_rt, app, status, "argocd-application-controller")

    def _apply(self, obj: JSONObj, destination: str, app_name: str) -> None:
        rt = self._rt_of(obj)
        if rt is None:
            return
        desired = copy.deepcopy(obj)
        meta = desired.setdefault("metadata", {})
        if rt.namespaced:
            meta.setdefault("namespace", destination)
        meta.setdefault("labels", {})[INSTANCE] = app_name
        try:
            self.ctl.ensure(rt, desired, "argocd-controller")
        except ApiError as exc:
            self.ctl.log.error(f"argocd (stand-in): {app_name}: {obj.get('kind')} {meta.get('name')}: {exc.message}")

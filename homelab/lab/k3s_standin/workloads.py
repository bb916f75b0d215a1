"""The Deployment controller and kubelet of the stand-in, for Deployments applied as manifests.

The stand-in runs no containers. A Deployment that a HelmChart double made is Ready at once (see
controllers.py); one applied directly (cloudflared, Vaultwarden, Homepage) becomes Ready the way
its pods would start on a real node: only when everything its pod template mounts or reads exists.

- volumes: persistentVolumeClaim -> the claim exists and is Bound; secret / configMap -> the object
  exists (unless `optional: true`); projected sources likewise;
- env valueFrom secretKeyRef / configMapKeyRef -> the object exists and holds the key (unless optional);
  envFrom secretRef / configMapRef -> the object exists (unless optional).

Otherwise the Deployment reports 0 ready replicas with Available=False and the reason a pod would
show (`persistentvolumeclaim "data" not bound`, `secret "token" not found`, ...), so a waiting
`invoke up` and a live check both see why. spec.replicas 0 is Ready with 0 replicas.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from .api import rfc3339

if TYPE_CHECKING:
    from .controllers import Controllers

JSONObj = dict[str, Any]
HELM_CHART_ANNOTATION = "helmcharts.helm.cattle.io/chart"


def _cond(kind: str, status: str, reason: str, message: str, previous: list[Any] | None, stamp: str) -> JSONObj:
    old = next((c for c in previous or [] if c.get("type") == kind), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") \
        else stamp
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": since,
            "lastUpdateTime": old.get("lastUpdateTime", stamp) if old and old.get("status") == status else stamp}


class WorkloadController:
    def __init__(self, ctl: Controllers) -> None:
        self.ctl = ctl

    def _get(self, plural: str, namespace: str, name: str) -> JSONObj | None:
        rt = self.ctl.must_rt("", "v1", plural)
        return self.ctl.store.get(rt.storage_key, namespace, name)

    def _missing(self, plural: str, namespace: str, ref: JSONObj | None, key: str = "name") -> list[str]:
        if not ref or ref.get("optional") or self._get(plural, namespace, str(ref.get(key))) is not None:
            return []
        return [f'{plural[:-1]} "{ref.get(key)}" not found']

    def _volume_blockers(self, namespace: str, volume: JSONObj) -> list[str]:
        out: list[str] = []
        claim = volume.get("persistentVolumeClaim")
        if claim:
            pvc = self._get("persistentvolumeclaims", namespace, str(claim.get("claimName")))
            if pvc is None:
                out.append(f'persistentvolumeclaim "{claim.get("claimName")}" not found')
            elif (pvc.get("status") or {}).get("phase") != "Bound":
                out.append(f'pod has unbound immediate PersistentVolumeClaims ({claim.get("claimName")})')
        out += self._missing("secrets", namespace, volume.get("secret"), "secretName")
        out += self._missing("configmaps", namespace, volume.get("configMap"))
        for item in (volume.get("projected") or {}).get("sources") or []:
            out += self._missing("secrets", namespace, item.get("secret"))
            out += self._missing("configmaps", namespace, item.get("configMap"))
        return out

    def _env_blockers(self, namespace: str, container: JSONObj) -> list[str]:
        out: list[str] = []
        for env in container.get("env") or []:
            source = env.get("valueFrom") or {}
            for ref_key, plural in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
                ref = source.get(ref_key)
                if not ref or ref.get("optional"):
                    continue
                obj = self._get(plural, namespace, str(ref.get("name")))
                if obj is None:
                    out.append(f'{plural[:-1]} "{ref.get("name")}" not found')
                elif str(ref.get("key")) not in {**(obj.get("data") or {}), **(obj.get("stringData") or {})}:
                    out.append(f"couldn't find key {ref.get('key')} in {plural[:-1].capitalize()} "
                               f"{namespace}/{ref.get('name')}")
        for source in container.get("envFrom") or []:
            out += self._missing("secrets", namespace, source.get("secretRef"))
            out += self._missing("configmaps", namespace, source.get("configMapRef"))
        return out

    def blockers(self, namespace: str, pod: JSONObj) -> list[str]:
        """Why a pod of this template could not start on a node, in the words kubelet uses."""
        out: list[str] = []
        for volume in pod.get("volumes") or []:
            out += self._volume_blockers(namespace, volume)
        for container in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]:
            out += self._env_blockers(namespace, container)
        return list(dict.fromkeys(out))

    def reconcile(self) -> None:
        rt = self.ctl.must_rt("apps", "v1", "deployments")
        for dep in self.ctl.store.list_objects(rt.storage_key):
            meta = dep["metadata"]
            if meta.get("deletionTimestamp") or HELM_CHART_ANNOTATION in (meta.get("annotations") or {}):
                continue
            spec = dep.get("spec") or {}
            replicas = spec.get("replicas", 1)
            replicas = replicas if isinstance(replicas, int) and replicas >= 0 else 1
            pod = (spec.get("template") or {}).get("spec") or {}
            problems = self.blockers(meta["namespace"], pod) if replicas else []
            ready = 0 if problems else replicas
            generation = meta.get("generation", 1)
            old = dep.get("status") or {}
            stamp = rfc3339()
            previous = old.get("conditions")
            if problems:
                available = _cond("Available", "False", "MinimumReplicasUnavailable",
                                  "Deployment does not have minimum availability. Pods cannot start: "
                                  + "; ".join(problems), previous, stamp)
            else:
                available = _cond("Available", "True", "MinimumReplicasAvailable",
                                  "Deployment has minimum availability.", previous, stamp)
            progressing = _cond("Progressing", "True", "NewReplicaSetAvailable" if not problems else
                                "ReplicaSetUpdated", f'ReplicaSet "{meta["name"]}" has '
                                + ("successfully progressed." if not problems else "pods pending."), previous, stamp)
            status: JSONObj = {"observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
                               "conditions": [available, progressing]}
            if ready:
                status.update({"readyReplicas": ready, "availableReplicas": ready})
            else:
                status["unavailableReplicas"] = replicas
            if {k: v for k, v in old.items() if k != "conditions"} == \
                    {k: v for k, v in status.items() if k != "conditions"} and \
                    [(c.get("type"), c.get("status"), c.get("message")) for c in old.get("conditions") or []] == \
                    [(c["type"], c["status"], c["message"]) for c in status["conditions"]]:
                continue
            self.ctl.set_status(rt, dep, status, "kube-controller-manager")
            if problems:
                self.ctl.event(dep, "Warning", "FailedScheduling", "; ".join(problems), "default-scheduler")


def secret_value(secret: JSONObj | None, key: str) -> str | None:
    """A Secret's value for key, decoded (None when absent)."""
    data = (secret or {}).get("data") or {}
    if key in data:
        try:
            return base64.b64decode(str(data[key])).decode()
        except ValueError:
            return None
    value = ((secret or {}).get("stringData") or {}).get(key)
    return str(value) if value is not None else None

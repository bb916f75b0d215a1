"""The API's resource types: the built-in ones and those CustomResourceDefinitions add."""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from typing import Any

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    status: bool = False  # has a /status subresource
    generation: bool = False  # metadata.generation tracks spec changes
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    crd: str | None = None  # the CRD's name, for custom resources
    schema: Any = field(default=None, compare=False, hash=False)  # a CRD version's openAPIV3Schema

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def storage_key(self) -> str:
        """Objects of all versions of a resource share one store."""
        return f"{self.group}/{self.plural}"

    @property
    def qualified_kind(self) -> str:
        """Kind.group as in API error messages (Deployment.apps, ConfigMap)."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    @property
    def qualified_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


def _rt(group: str, version: str, plural: str, kind: str, namespaced: bool = True, short: tuple[str, ...] = (),
        status: bool = False, generation: bool = False, categories: tuple[str, ...] = (),
        verbs: tuple[str, ...] = ALL_VERBS) -> ResourceType:
    return ResourceType(group, version, plural, kind, namespaced, short, status, generation, categories, verbs)


_ALL = ("all",)
BUILTIN: tuple[ResourceType, ...] = (
    # core/v1
    _rt("", "v1", "namespaces", "Namespace", False, ("ns",), status=True,
        verbs=("create", "delete", "get", "list", "patch", "update", "watch")),
    _rt("", "v1", "nodes", "Node", False, ("no",), status=True),
    _rt("", "v1", "pods", "Pod", True, ("po",), status=True, categories=_ALL),
    _rt("", "v1", "services", "Service", True, ("svc",), status=True, categories=_ALL,
        verbs=("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")),
    _rt("", "v1", "endpoints", "Endpoints", True, ("ep",)),
    _rt("", "v1", "configmaps", "ConfigMap", True, ("cm",)),
    _rt("", "v1", "secrets", "Secret", True),
    _rt("", "v1", "serviceaccounts", "ServiceAccount", True, ("sa",)),
    _rt("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", True, ("pvc",), status=True),
    _rt("", "v1", "persistentvolumes", "PersistentVolume", False, ("pv",), status=True),
    _rt("", "v1", "events", "Event", True, ("ev",)),
    _rt("", "v1", "limitranges", "LimitRange", True, ("limits",)),
    _rt("", "v1", "resourcequotas", "ResourceQuota", True, ("quota",), status=True),
    _rt("", "v1", "replicationcontrollers", "ReplicationController", True, ("rc",), status=True,
        generation=True, categories=_ALL),
    # apps/v1
    _rt("apps", "v1", "deployments", "Deployment", True, ("deploy",), True, True, _ALL),
    _rt("apps", "v1", "daemonsets", "DaemonSet", True, ("ds",), True, True, _ALL),
    _rt("apps", "v1", "statefulsets", "StatefulSet", True, ("sts",), True, True, _ALL),
    _rt("apps", "v1", "replicasets", "ReplicaSet", True, ("rs",), True, True, _ALL),
    _rt("apps", "v1", "controllerrevisions", "ControllerRevision", True),
    # batch/v1
    _rt("batch", "v1", "jobs", "Job", True, (), True, True, _ALL),
    _rt("batch", "v1", "cronjobs", "CronJob", True, ("cj",), True, True, _ALL),
    # autoscaling/v2
    _rt("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", True, ("hpa",), True, True,
        _ALL),
    # networking.k8s.io/v1
    _rt("networking.k8s.io", "v1", "ingresses", "Ingress", True, ("ing",), True, True),
    _rt("networking.k8s.io", "v1", "ingressclasses", "IngressClass", False, (), generation=True),
    _rt("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, ("netpol",), generation=True),
    # rbac.authorization.k8s.io/v1
    _rt("rbac.authorization.k8s.io", "v1", "roles", "Role", True),
    _rt("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True),
    _rt("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
    _rt("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    # storage.k8s.io/v1
    _rt("storage.k8s.io", "v1", "storageclasses", "StorageClass", False, ("sc",)),
    _rt("storage.k8s.io", "v1", "csidrivers", "CSIDriver", False),
    _rt("storage.k8s.io", "v1", "csinodes", "CSINode", False),
    _rt("storage.k8s.io", "v1", "volumeattachments", "VolumeAttachment", False, (), status=True),
    # policy/v1
    _rt("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True, ("pdb",), True, True),
    # coordination.k8s.io/v1
    _rt("coordination.k8s.io", "v1", "leases", "Lease", True),
    # apiextensions.k8s.io/v1
    _rt("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False,
        ("crd", "crds"), True, True, ("api-extensions",)),
    # discovery.k8s.io/v1
    _rt("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    # admissionregistration.k8s.io/v1
    _rt("admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations", "ValidatingWebhookConfiguration",
        False, (), generation=True, categories=("api-extensions",)),
    _rt("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", "MutatingWebhookConfiguration",
        False, (), generation=True, categories=("api-extensions",)),
    # scheduling.k8s.io/v1
    _rt("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass", False, ("pc",)),
    # events.k8s.io/v1
    _rt("events.k8s.io", "v1", "events", "Event", True, ("ev",)),
)

# Subresources that are not /status: (group, plural, name) -> APIResource fields
EXTRA_SUBRESOURCES: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("", "pods"): [{"name": "pods/eviction", "group": "policy", "version": "v1", "kind": "Eviction",
                    "verbs": ["create"]}],
}

_VERSION_RE = re.compile(r"^v(\d+)(?:(alpha|beta)(\d+))?$")


def version_priority(version: str) -> tuple[int, int, int, str]:
    """Kubernetes's version ordering: GA > beta > alpha, higher numbers first; others last."""
    match = _VERSION_RE.match(version)
    if not match:
        return (3, 0, 0, version)
    major, stage, minor = int(match.group(1)), match.group(2), int(match.group(3) or 0)
    rank = {None: 0, "beta": 1, "alpha": 2}[stage]
    return (rank, -major, -minor, version)


def storage_version_hash(rt: ResourceType) -> str:
    import base64

    digest = hashlib.sha256(f"{rt.group}/{rt.version}/{rt.kind}".encode()).digest()
    return base64.b64encode(digest[:8]).decode()


class Registry:
    """Resource types by group/version/plural, with CRD-defined ones added and removed at run time."""

    def __init__(self) -> None:
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        for rt in BUILTIN:
            self._types[(rt.group, rt.version, rt.plural)] = rt
        self._crd_types: dict[str, list[ResourceType]] = {}
        self._lock = threading.RLock()  # CRDs change the table while requests read it

    def get(self, group: str, version: str, plural: str) -> ResourceType | None:
        with self._lock:
            return self._types.get((group, version, plural))

    def all(self) -> list[ResourceType]:
        with self._lock:
            return list(self._types.values())

    def types_of(self, storage_key: str) -> list[ResourceType]:
        return [rt for rt in self.all() if rt.storage_key == storage_key]

    def groups(self) -> dict[str, list[str]]:
        """group -> served versions, preferred first."""
        out: dict[str, set[str]] = {}
        for rt in self.all():
            out.setdefault(rt.group, set()).add(rt.version)
        return {g: sorted(v, key=version_priority) for g, v in out.items()}

    def resources(self, group: str, version: str) -> list[ResourceType]:
        return sorted((rt for rt in self.all() if rt.group == group and rt.version == version),
                      key=lambda rt: rt.plural)

    def set_crd(self, crd: dict[str, Any]) -> list[ResourceType]:
        """Register (or re-register) the served versions of a CRD; returns them."""
        with self._lock:
            return self._set_crd(crd)

    def _set_crd(self, crd: dict[str, Any]) -> list[ResourceType]:
        name = crd["metadata"]["name"]
        self.remove_crd(name)
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        types: list[ResourceType] = []
        for ver in spec.get("versions") or []:
            if not ver.get("served", True):
                continue
            subresources = ver.get("subresources") or {}
            schema = (ver.get("schema") or {}).get("openAPIV3Schema")
            rt = ResourceType(
                group=spec.get("group", ""), version=ver["name"], plural=names.get("plural", ""),
                kind=names.get("kind", ""), namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                short_names=tuple(names.get("shortNames") or ()), status="status" in subresources,
                generation=True, categories=tuple(names.get("categories") or ()), crd=name, schema=schema)
            key = (rt.group, rt.version, rt.plural)
            if key in self._types and self._types[key].crd is None:
                continue  # never shadow a built-in
            self._types[key] = rt
            types.append(rt)
        self._crd_types[name] = types
        return types

    def remove_crd(self, name: str) -> list[ResourceType]:
        with self._lock:
            types = self._crd_types.pop(name, [])
            for rt in types:
                self._types.pop((rt.group, rt.version, rt.plural), None)
            return types

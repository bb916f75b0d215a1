"""What the apiserver adds and checks beyond the schema: defaults, names, a few semantic rules."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from .resources import ResourceType
from .schemas import FieldError, go_repr
from .selectors import SelectorError, label_selector_to_requirements

_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1035 = r"[a-z]([-a-z0-9]*[a-z0-9])?"
_QUALIFIED = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"

SUBDOMAIN_MSG = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                 "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
                 f"validation is '{_SUBDOMAIN}')")
LABEL_MSG = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start "
             f"and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
             f"'{_LABEL}')")
DNS1035_MSG = ("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
               "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex "
               f"used for validation is '{_DNS1035}')")

_POD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "apps/deployments": ("spec", "template"), "apps/replicasets": ("spec", "template"),
    "apps/daemonsets": ("spec", "template"), "apps/statefulsets": ("spec", "template"),
    "batch/jobs": ("spec", "template"), "/replicationcontrollers": ("spec", "template"),
}


def _invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError("invalid", path, "FieldValueInvalid", f"{path}: Invalid value: {go_repr(value)}: {detail}")


def _required(path: str) -> FieldError:
    return FieldError("required", path, "FieldValueRequired", f"{path}: Required value")


def validate_name(rt: ResourceType, name: str, path: str = "metadata.name") -> list[FieldError]:  # noqa: PLR0911
    if rt.group == "rbac.authorization.k8s.io" or rt.storage_key in ("/events", "events.k8s.io/events"):
        if name in (".", "..") or "/" in name or "%" in name:
            return [_invalid(path, name, "may not contain '/' or '%' and may not be '.' or '..'")]
        return []
    if rt.storage_key == "/namespaces":
        if len(name) > 63 or not re.fullmatch(_LABEL, name):
            return [_invalid(path, name, LABEL_MSG)]
        return []
    if rt.storage_key == "/services":
        if len(name) > 63 or not re.fullmatch(_DNS1035, name):
            return [_invalid(path, name, DNS1035_MSG)]
        return []
    if len(name) > 253 or not re.fullmatch(_SUBDOMAIN, name):
        return [_invalid(path, name, SUBDOMAIN_MSG)]
    return []


def _qualified_name_ok(key: str) -> bool:
    prefix, sep, name = key.rpartition("/")
    if sep and (not prefix or len(prefix) > 253 or not re.fullmatch(_SUBDOMAIN, prefix)):
        return False
    return 0 < len(name) <= 63 and re.fullmatch(_QUALIFIED, name) is not None


def validate_metadata(meta: dict[str, Any]) -> list[FieldError]:
    errors: list[FieldError] = []
    for key, value in (meta.get("labels") or {}).items():
        if not _qualified_name_ok(key):
            errors.append(_invalid("metadata.labels", key, "name part must consist of alphanumeric characters, "
                                   "'-', '_' or '.', and must start and end with an alphanumeric character"))
        if not isinstance(value, str) or len(value) > 63 or not re.fullmatch(_LABEL_VALUE, value):
            errors.append(_invalid("metadata.labels", value, "a valid label must be an empty string or consist of "
                                   "alphanumeric characters, '-', '_' or '.', and must start and end with an "
                                   "alphanumeric character"))
    for key in (meta.get("annotations") or {}):
        if not _qualified_name_ok(key):
            errors.append(_invalid("metadata.annotations", key, "name part must consist of alphanumeric characters, "
                                   "'-', '_' or '.', and must start and end with an alphanumeric character"))
    return errors


# --- defaults --------------------------------------------------------------------------------------


def _pod_spec_defaults(spec: dict[str, Any], restart_default: str | None = "Always") -> None:
    if restart_default and "restartPolicy" not in spec:
        spec["restartPolicy"] = restart_default
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    for key in ("initContainers", "containers"):
        for container in spec.get(key) or []:
            if not isinstance(container, dict):
                continue
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            container.setdefault("resources", {})
            image = str(container.get("image") or "")
            if "imagePullPolicy" not in container and image:
                tag = image.rsplit("/", 1)[-1]
                container["imagePullPolicy"] = "Always" if ("@" not in tag and (":" not in tag or tag.endswith(
                    ":latest"))) else "IfNotPresent"
            for port in container.get("ports") or []:
                if isinstance(port, dict):
                    port.setdefault("protocol", "TCP")


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def apply_defaults(rt: ResourceType, obj: dict[str, Any]) -> None:  # noqa: PLR0912, PLR0915
    key = rt.storage_key
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else None
    if key == "/pods" and spec is not None:
        _pod_spec_defaults(spec)
        spec.setdefault("enableServiceLinks", True)
    template_path = _POD_TEMPLATE_PATHS.get(key)
    if template_path:
        template = _get(obj, *template_path)
        if isinstance(template, dict) and isinstance(template.get("spec"), dict):
            _pod_spec_defaults(template["spec"], None if key == "batch/jobs" else "Always")
    if key == "batch/cronjobs" and spec is not None:
        spec.setdefault("concurrencyPolicy", "Allow")
        spec.setdefault("suspend", False)
        spec.setdefault("successfulJobsHistoryLimit", 3)
        spec.setdefault("failedJobsHistoryLimit", 1)
        tspec = _get(spec, "jobTemplate", "spec", "template", "spec")
        if isinstance(tspec, dict):
            _pod_spec_defaults(tspec, None)
    if spec is None:
        spec = {}
    if key == "apps/deployments" and obj.get("spec") is not None:
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        strategy = spec.setdefault("strategy", {})
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            rolling = strategy.setdefault("rollingUpdate", {})
            rolling.setdefault("maxUnavailable", "25%")
            rolling.setdefault("maxSurge", "25%")
    elif key == "apps/replicasets" and obj.get("spec") is not None:
        spec.setdefault("replicas", 1)
    elif key == "apps/daemonsets" and obj.get("spec") is not None:
        spec.setdefault("revisionHistoryLimit", 10)
        strategy = spec.setdefault("updateStrategy", {})
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            rolling = strategy.setdefault("rollingUpdate", {})
            rolling.setdefault("maxUnavailable", 1)
            rolling.setdefault("maxSurge", 0)
    elif key == "apps/statefulsets" and obj.get("spec") is not None:
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("podManagementPolicy", "OrderedReady")
        strategy = spec.setdefault("updateStrategy", {})
        strategy.setdefault("type", "RollingUpdate")
        if strategy["type"] == "RollingUpdate":
            strategy.setdefault("rollingUpdate", {}).setdefault("partition", 0)
        retention = spec.setdefault("persistentVolumeClaimRetentionPolicy", {})
        retention.setdefault("whenDeleted", "Retain")
        retention.setdefault("whenScaled", "Retain")
    elif key == "batch/jobs" and obj.get("spec") is not None:
        spec.setdefault("parallelism", 1)
        spec.setdefault("completions", 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
    elif key == "/services":
        obj.setdefault("spec", spec)
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        if spec["type"] != "ExternalName":
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
            spec.setdefault("internalTrafficPolicy", "Cluster")
        if spec["type"] in ("NodePort", "LoadBalancer"):
            spec.setdefault("externalTrafficPolicy", "Cluster")
        if spec["type"] == "LoadBalancer":
            spec.setdefault("allocateLoadBalancerNodePorts", True)
        for port in spec.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")
                if "port" in port:
                    port.setdefault("targetPort", port["port"])
    elif key == "/namespaces":
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        name = _get(obj, "metadata", "name")
        if name:
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
    elif key == "/secrets":
        obj.setdefault("type", "Opaque")
        string_data = obj.pop("stringData", None)
        if isinstance(string_data, dict):
            data = obj.setdefault("data", {}) or {}
            obj["data"] = data
            for k, v in string_data.items():
                data[k] = base64.b64encode(str(v).encode()).decode()
    elif key == "/persistentvolumeclaims" and obj.get("spec") is not None:
        spec.setdefault("volumeMode", "Filesystem")
    elif key == "/persistentvolumes" and obj.get("spec") is not None:
        spec.setdefault("persistentVolumeReclaimPolicy", "Retain")
        spec.setdefault("volumeMode", "Filesystem")
    elif key == "storage.k8s.io/storageclasses":
        obj.setdefault("reclaimPolicy", "Delete")
        obj.setdefault("volumeBindingMode", "Immediate")
    elif key in ("rbac.authorization.k8s.io/rolebindings", "rbac.authorization.k8s.io/clusterrolebindings"):
        for subject in obj.get("subjects") or []:
            if isinstance(subject, dict) and subject.get("kind") in ("User", "Group"):
                subject.setdefault("apiGroup", "rbac.authorization.k8s.io")
    elif key == "apiextensions.k8s.io/customresourcedefinitions" and obj.get("spec") is not None:
        names = spec.get("names") or {}
        if names.get("kind"):
            names.setdefault("singular", str(names["kind"]).lower())
            names.setdefault("listKind", f"{names['kind']}List")
        spec.setdefault("conversion", {"strategy": "None"})


# --- semantic validation ---------------------------------------------------------------------------


def _selector_matches_template(obj: dict[str, Any], errors: list[FieldError]) -> None:
    selector = _get(obj, "spec", "selector")
    labels = _get(obj, "spec", "template", "metadata", "labels") or {}
    if not isinstance(selector, dict):
        return
    try:
        reqs = label_selector_to_requirements(selector)
    except SelectorError as exc:
        errors.append(_invalid("spec.selector", selector, str(exc)))
        return
    if not reqs:
        errors.append(_invalid("spec.selector", selector, "empty selector is invalid for deployment"))
        return
    if not all(r.matches(labels) for r in reqs):
        errors.append(_invalid("spec.template.metadata.labels", labels, "`selector` does not match template `labels`"))


def _enum(errors: list[FieldError], value: Any, path: str, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        errors.append(FieldError("unsupported", path, "FieldValueNotSupported",
                                 f"{path}: Unsupported value: {go_repr(value)}: supported values: "
                                 + ", ".join(f'"{a}"' for a in allowed)))


def _pod_spec_enums(spec: dict[str, Any], path: str, errors: list[FieldError]) -> None:
    _enum(errors, spec.get("restartPolicy"), f"{path}.restartPolicy", ("Always", "OnFailure", "Never"))
    _enum(errors, spec.get("dnsPolicy"), f"{path}.dnsPolicy",
          ("ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"))
    for key in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(key) or []):
            if not isinstance(container, dict):
                continue
            cpath = f"{path}.{key}[{i}]"
            _enum(errors, container.get("imagePullPolicy"), f"{cpath}.imagePullPolicy",
                  ("Always", "IfNotPresent", "Never"))
            for j, port in enumerate(container.get("ports") or []):
                if isinstance(port, dict):
                    _enum(errors, port.get("protocol"), f"{cpath}.ports[{j}].protocol", ("SCTP", "TCP", "UDP"))


def _enum_checks(key: str, obj: dict[str, Any], errors: list[FieldError]) -> None:  # noqa: PLR0912
    raw_spec = obj.get("spec")
    spec: dict[str, Any] = raw_spec if isinstance(raw_spec, dict) else {}
    if key == "/services":
        _enum(errors, spec.get("type"), "spec.type", ("ClusterIP", "ExternalName", "LoadBalancer", "NodePort"))
        _enum(errors, spec.get("sessionAffinity"), "spec.sessionAffinity", ("ClientIP", "None"))
        _enum(errors, spec.get("externalTrafficPolicy"), "spec.externalTrafficPolicy", ("Cluster", "Local"))
        _enum(errors, spec.get("internalTrafficPolicy"), "spec.internalTrafficPolicy", ("Cluster", "Local"))
        for i, port in enumerate(spec.get("ports") or []):
            if isinstance(port, dict):
                _enum(errors, port.get("protocol"), f"spec.ports[{i}].protocol", ("SCTP", "TCP", "UDP"))
    elif key == "/pods":
        _pod_spec_enums(spec, "spec", errors)
    elif key in _POD_TEMPLATE_PATHS:
        template_spec = _get(obj, "spec", "template", "spec")
        if isinstance(template_spec, dict):
            _pod_spec_enums(template_spec, "spec.template.spec", errors)
        if key == "apps/deployments":
            _enum(errors, _get(spec, "strategy", "type"), "spec.strategy.type", ("Recreate", "RollingUpdate"))
    elif key == "/persistentvolumeclaims":
        for i, mode in enumerate(spec.get("accessModes") or []):
            _enum(errors, mode, f"spec.accessModes[{i}]", ("ReadOnlyMany", "ReadWriteMany", "ReadWriteOnce",
                                                           "ReadWriteOncePod"))
    elif key == "networking.k8s.io/ingresses":
        for i, rule in enumerate(spec.get("rules") or []):
            for j, ipath in enumerate(_get(rule, "http", "paths") or []):
                where = f"spec.rules[{i}].http.paths[{j}].pathType"
                if isinstance(ipath, dict) and ipath.get("pathType") is None:
                    errors.append(_required(where))
                elif isinstance(ipath, dict):
                    _enum(errors, ipath.get("pathType"), where, ("Exact", "ImplementationSpecific", "Prefix"))
    elif key == "/nodes":
        for i, taint in enumerate(spec.get("taints") or []):
            if isinstance(taint, dict):
                _enum(errors, taint.get("effect"), f"spec.taints[{i}].effect",
                      ("NoExecute", "NoSchedule", "PreferNoSchedule"))


def validate_semantics(rt: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None) -> list[FieldError]:  # noqa: PLR0912
    errors: list[FieldError] = []
    key = rt.storage_key
    _enum_checks(key, obj, errors)
    if key in ("apps/deployments", "apps/replicasets", "apps/daemonsets", "apps/statefulsets"):
        _selector_matches_template(obj, errors)
        if old is not None and _get(old, "spec", "selector") != _get(obj, "spec", "selector"):
            errors.append(_invalid("spec.selector", _get(obj, "spec", "selector"), "field is immutable"))
    pod_spec: Any = None
    path = ""
    if key == "/pods":
        pod_spec, path = obj.get("spec"), "spec"
    elif key in _POD_TEMPLATE_PATHS:
        pod_spec, path = _get(obj, "spec", "template", "spec"), "spec.template.spec"
    if isinstance(pod_spec, dict):
        for i, container in enumerate(pod_spec.get("containers") or []):
            if isinstance(container, dict) and not container.get("image"):
                errors.append(_required(f"{path}.containers[{i}].image"))
        if key == "batch/jobs" and pod_spec.get("restartPolicy") not in ("OnFailure", "Never"):
            errors.append(FieldError("unsupported", f"{path}.restartPolicy", "FieldValueNotSupported",
                                     f"{path}.restartPolicy: Unsupported value: "
                                     f"{go_repr(pod_spec.get('restartPolicy', ''))}: supported values: "
                                     '"OnFailure", "Never"'))
    if key == "/services":
        spec = obj.get("spec") or {}
        if spec.get("type") != "ExternalName" and spec.get("clusterIP") != "None" and not spec.get("ports"):
            errors.append(_required("spec.ports"))
        if old is not None:
            old_ip = _get(old, "spec", "clusterIP")
            if old_ip and spec.get("clusterIP") not in (None, "", old_ip) and spec.get("type") != "ExternalName":
                errors.append(_invalid("spec.clusterIP", spec.get("clusterIP"), "field is immutable"))
    if key == "/persistentvolumeclaims" and old is None:
        requests = _get(obj, "spec", "resources", "requests") or {}
        if "storage" not in requests:
            errors.append(_required("spec.resources[storage]"))
    if key == "/secrets" and old is not None and old.get("type") != obj.get("type"):
        errors.append(_invalid("type", obj.get("type"), "field is immutable"))
    if key in ("/secrets", "/configmaps") and old is not None and old.get("immutable") is True and (
            old.get("data") != obj.get("data") or old.get("binaryData") != obj.get("binaryData")):
        errors.append(FieldError("forbidden", "data", "FieldValueForbidden",
                                 "data: Forbidden: field is immutable when `immutable` is set"))
    if key == "apiextensions.k8s.io/customresourcedefinitions":
        spec = obj.get("spec") or {}
        names = spec.get("names") or {}
        want = f"{names.get('plural', '')}.{spec.get('group', '')}"
        name = _get(obj, "metadata", "name")
        if name != want:
            errors.append(_invalid("metadata.name", name, 'must be spec.names.plural+"."+spec.group'))
        versions = spec.get("versions") or []
        if sum(1 for v in versions if isinstance(v, dict) and v.get("storage")) != 1:
            errors.append(_invalid("spec.versions", versions,
                                   "must have exactly one version marked as storage version"))
        if old is not None:
            if _get(old, "spec", "group") != spec.get("group"):
                errors.append(_invalid("spec.group", spec.get("group"), "field is immutable"))
            if _get(old, "spec", "scope") != spec.get("scope"):
                errors.append(_invalid("spec.scope", spec.get("scope"), "field is immutable"))
    return errors


def check_secret_data(obj: dict[str, Any]) -> str | None:
    """A decode error message for a Secret whose data is not base64 (the apiserver answers 400)."""
    for key, value in (obj.get("data") or {}).items():
        if not isinstance(value, str):
            continue
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return f"illegal base64 data at input byte 0 (data key {key!r})"
    return None

"""Label selectors (=, ==, !=, in, notin, exists, !exists) and field selectors (=, ==, !=)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class SelectorError(ValueError):
    pass


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!"
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and labels[self.key] in self.values
        if self.op in ("!=", "notin"):
            return not present or labels[self.key] not in self.values
        raise SelectorError(f"unknown operator {self.op}")


_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError("unbalanced parentheses")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise SelectorError("unbalanced parentheses")
    parts.append(cur)
    return [p.strip() for p in parts]


def _check_key(key: str) -> str:
    if not re.fullmatch(_KEY, key) or len(key.rpartition("/")[2]) > 63:
        raise SelectorError(f"invalid label key {key!r}")
    return key


def _check_value(value: str) -> str:
    if len(value) > 63 or not re.fullmatch(_VALUE, value):
        raise SelectorError(f"invalid label value: {value!r}")
    return value


def parse_labels(text: str | None) -> list[Requirement]:
    if not text or not text.strip():
        return []
    reqs: list[Requirement] = []
    for part in _split_top(text):
        if not part:
            raise SelectorError(f"unable to parse requirement: empty term in {text!r}")
        match = re.fullmatch(r"(\S+)\s+(in|notin)\s*\((.*)\)", part)
        if match:
            values = tuple(_check_value(v.strip()) for v in match.group(3).split(","))
            reqs.append(Requirement(_check_key(match.group(1)), match.group(2), values))
            continue
        if part.startswith("!"):
            reqs.append(Requirement(_check_key(part[1:].strip()), "!"))
            continue
        match = re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*(.*)", part)
        if match:
            op = "!=" if match.group(2) == "!=" else "="
            reqs.append(Requirement(_check_key(match.group(1)), op, (_check_value(match.group(3).strip()),)))
            continue
        if re.fullmatch(r"\S+", part):
            reqs.append(Requirement(_check_key(part), "exists"))
            continue
        raise SelectorError(f"unable to parse requirement: {part!r}")
    return reqs


def match_labels(reqs: list[Requirement], obj: dict[str, Any]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(r.matches(labels) for r in reqs)


def label_selector_to_requirements(selector: dict[str, Any] | None) -> list[Requirement] | None:
    """A metav1.LabelSelector as requirements; None matches nothing (a nil selector)."""
    if selector is None:
        return None
    reqs = [Requirement(k, "=", (str(v),)) for k, v in (selector.get("matchLabels") or {}).items()]
    ops = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}
    for expr in selector.get("matchExpressions") or []:
        op = ops.get(expr.get("operator", ""))
        if op is None:
            raise SelectorError(f"{expr.get('operator')!r} is not a valid label selector operator")
        reqs.append(Requirement(expr.get("key", ""), op, tuple(str(v) for v in expr.get("values") or ())))
    return reqs


# --- field selectors -------------------------------------------------------------------------------

FieldGetter = Callable[[dict[str, Any]], str]


def _path_getter(path: str) -> FieldGetter:
    parts = path.split(".")

    def get(obj: dict[str, Any]) -> str:
        cur: Any = obj
        for part in parts:
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is None:
            return ""
        if isinstance(cur, bool):
            return "true" if cur else "false"
        return str(cur)

    return get


_COMMON = ("metadata.name", "metadata.namespace")
# Field labels the apiserver supports per resource (group/plural); others are a 400 BadRequest.
FIELDS: dict[str, tuple[str, ...]] = {
    "/pods": ("spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
              "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName"),
    "/nodes": ("spec.unschedulable",),
    "/namespaces": ("status.phase",),
    "/secrets": ("type",),
    "/events": ("involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
                "involvedObject.apiVersion", "involvedObject.resourceVersion", "involvedObject.fieldPath",
                "reason", "reportingComponent", "source", "type"),
    "/replicationcontrollers": ("status.replicas",),
    "/persistentvolumeclaims": (),
    "batch/jobs": ("status.successful",),
    "apps/replicasets": ("status.replicas",),
    "certificates.k8s.io/certificatesigningrequests": ("spec.signerName",),
}


@dataclass(frozen=True)
class FieldRequirement:
    field: str
    op: str  # "=" or "!="
    value: str


def parse_fields(text: str | None, storage_key: str) -> list[FieldRequirement]:
    if not text or not text.strip():
        return []
    allowed = set(_COMMON) | set(FIELDS.get(storage_key, ()))
    reqs = []
    for raw_part in text.split(","):
        part = raw_part.strip()
        match = re.fullmatch(r"([^=!]+?)\s*(==|=|!=)\s*(.*)", part)
        if not match:
            raise SelectorError(f"invalid selector: {text!r}; can't understand {part!r}")
        name = match.group(1).strip()
        if name not in allowed:
            raise SelectorError(f'field label not supported: {name}')
        reqs.append(FieldRequirement(name, "!=" if match.group(2) == "!=" else "=", match.group(3).strip()))
    return reqs


def match_fields(reqs: list[FieldRequirement], obj: dict[str, Any]) -> bool:
    for req in reqs:
        value = _path_getter(req.field)(obj)
        if req.field == "source" and not value:
            value = _path_getter("source.component")(obj)
        if (value == req.value) != (req.op == "="):
            return False
    return True

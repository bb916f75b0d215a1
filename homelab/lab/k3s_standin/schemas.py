"""Object schemas: Kubernetes's own (the JSON schemas bundled in kubernetes-validate) and CRDs'.

kubernetes-validate ships the OpenAPI schemas of every Kubernetes minor as JSON Schema files
(`kubernetes-json-schema/v1.NN.0-local-strict/<kind>-<group>-<version>.json` plus one
`_definitions.json`). The stand-in reads those files (found without importing the package, so it
runs without kubernetes-validate's own dependencies) and evaluates the small JSON-Schema subset
they use (type, enum, required, properties, additionalProperties, items, oneOf, $ref) itself,
collecting every error and unknown field as the apiserver does. The same schema nodes tell the
server-side apply and strategic-merge code about list types and merge keys
(x-kubernetes-list-type, -list-map-keys, -map-type, -patch-merge-key, -patch-strategy).

CRD schemas (openAPIV3Schema) are evaluated by the same walker in "structural schema" mode:
unknown fields are pruned unless x-kubernetes-preserve-unknown-fields, defaults are applied, nulls
of non-nullable fields are dropped, and the value validations (minimum, maximum, minLength,
maxLength, pattern, minItems, maxItems, allOf/anyOf/oneOf/not) are checked. CEL rules
(x-kubernetes-validations) are not evaluated.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .resources import ResourceType

JSON = Any


def _schema_root() -> Path | None:
    spec = importlib.util.find_spec("kubernetes_validate")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        root = Path(location) / "kubernetes-json-schema"
        if root.is_dir():
            return root
    return None


def available_minors(root: Path | None = None) -> list[tuple[int, int]]:
    root = root or _schema_root()
    if root is None:
        return []
    out = []
    for entry in root.iterdir():
        match = re.match(r"^v(\d+)\.(\d+)\.\d+-local-strict$", entry.name)
        if match:
            out.append((int(match.group(1)), int(match.group(2))))
    return sorted(out)


class BuiltinSchemas:
    """The strict schemas of one Kubernetes minor, loaded lazily and cached."""

    def __init__(self, minor: tuple[int, int]) -> None:
        self.root = _schema_root()
        minors = available_minors(self.root)
        usable = [m for m in minors if m <= minor]
        chosen = usable[-1] if usable else (minors[0] if minors else None)
        self.minor = chosen
        self._dir = self.root / f"v{chosen[0]}.{chosen[1]}.0-local-strict" if (self.root and chosen) else None
        self._defs: dict[str, Any] | None = None
        self._kinds: dict[tuple[str, str, str], Node | None] = {}
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self._dir is not None

    @property
    def version(self) -> str:
        return f"{self.minor[0]}.{self.minor[1]}" if self.minor else "none"

    def defs(self) -> dict[str, Any]:
        with self._lock:
            if self._defs is None:
                if self._dir is None:
                    self._defs = {}
                else:
                    data = json.loads((self._dir / "_definitions.json").read_text(encoding="utf-8"))
                    self._defs = data.get("$defs") or data.get("definitions") or {}
            return self._defs

    def kind(self, rt: ResourceType) -> Node | None:
        key = (rt.group, rt.version, rt.kind)
        if key in self._kinds:
            return self._kinds[key]
        node: Node | None = None
        if self._dir is not None and rt.crd is None:
            short = rt.group.split(".")[0]
            kind = rt.kind.lower()
            name = f"{kind}-{short}-{rt.version}.json" if rt.group else f"{kind}-{rt.version}.json"
            path = self._dir / name
            if path.exists():
                node = Node(json.loads(path.read_text(encoding="utf-8")), self.defs(), crd=False)
        self._kinds[key] = node
        return node


@dataclass
class Node:
    """A schema node; `$ref`s are followed on access."""

    raw: dict[str, Any]
    defs: dict[str, Any] | None = None
    crd: bool = False
    root: bool = False

    def __post_init__(self) -> None:
        seen = 0
        while isinstance(self.raw, dict) and "$ref" in self.raw and self.defs is not None and seen < 50:
            name = str(self.raw["$ref"]).rsplit("/", 1)[-1]
            self.raw = self.defs.get(name, {})
            seen += 1
        if not isinstance(self.raw, dict):
            self.raw = {}

    def _make(self, raw: Any) -> Node:
        return Node(raw if isinstance(raw, dict) else {}, self.defs, self.crd)

    # --- types
    def types(self) -> set[str]:
        raw = self.raw
        if self.crd and raw.get("x-kubernetes-int-or-string"):
            return {"integer", "string"}
        t = raw.get("type")
        out: set[str] = set()
        if isinstance(t, str):
            out.add(t)
        elif isinstance(t, list):
            out.update(x for x in t if isinstance(x, str))
        if not out and "oneOf" in raw and not self.crd:
            for branch in raw["oneOf"]:
                out |= self._make(branch).types()
        out.discard("null")
        return out

    def nullable(self) -> bool:
        t = self.raw.get("type")
        if isinstance(t, list) and "null" in t:
            return True
        return bool(self.raw.get("nullable"))

    # --- objects
    def properties(self) -> dict[str, Any]:
        props = self.raw.get("properties")
        return props if isinstance(props, dict) else {}

    def is_struct(self) -> bool:
        return bool(self.properties())

    def preserves_unknown(self) -> bool:
        if self.crd:
            return bool(self.raw.get("x-kubernetes-preserve-unknown-fields"))
        # a built-in object without properties and without additionalProperties: false holds anything
        return not self.properties() and self.raw.get("additionalProperties") is not False and \
            "additionalProperties" not in self.raw

    def child(self, key: str) -> Node | None:
        """The schema of field `key`, ANY for free-form values, None for an unknown field."""
        props = self.properties()
        if key in props:
            return self._make(props[key])
        extra = self.raw.get("additionalProperties")
        if isinstance(extra, dict):
            return self._make(extra)
        if extra is True or self.preserves_unknown():
            return any_node(self.crd)
        if self.crd and self.raw.get("x-kubernetes-embedded-resource") and key in ("apiVersion", "kind", "metadata"):
            return any_node(True)
        if self.root and key in ("apiVersion", "kind", "metadata"):
            return any_node(self.crd)
        return None

    def is_map(self) -> bool:
        """A map[string]X (granular, items owned one by one) rather than a struct."""
        return not self.is_struct()

    def atomic(self) -> bool:
        return self.raw.get("x-kubernetes-map-type") == "atomic"

    # --- lists
    def items(self) -> Node:
        items = self.raw.get("items")
        return self._make(items) if isinstance(items, dict) else any_node(self.crd)

    def list_type(self) -> str:
        return str(self.raw.get("x-kubernetes-list-type") or "atomic")

    def list_keys(self) -> list[str]:
        keys = self.raw.get("x-kubernetes-list-map-keys")
        return [str(k) for k in keys] if isinstance(keys, list) else []

    def patch_merge_key(self) -> str | None:
        key = self.raw.get("x-kubernetes-patch-merge-key")
        return str(key) if key else None

    def patch_strategy(self) -> str:
        return str(self.raw.get("x-kubernetes-patch-strategy") or "")


def any_node(crd: bool = False) -> Node:
    return Node({"x-kubernetes-preserve-unknown-fields": True} if crd else {}, None, crd)


def crd_root(schema: dict[str, Any] | None) -> Node:
    if not schema:
        return Node({"type": "object", "x-kubernetes-preserve-unknown-fields": True}, None, crd=True, root=True)
    return Node(schema, None, crd=True, root=True)


# --- validation ------------------------------------------------------------------------------------


@dataclass
class FieldError:
    kind: str  # "type" | "required" | "unsupported" | "invalid"
    path: str
    reason: str
    message: str


@dataclass
class Result:
    errors: list[FieldError] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def _jtype(value: Any) -> str:  # noqa: PLR0911
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _fits(value: Any, types: set[str]) -> bool:
    if not types:
        return True
    jt = _jtype(value)
    if jt in types:
        return True
    if jt == "integer" and "number" in types:
        return True
    return jt == "number" and "integer" in types and float(value).is_integer()


def go_repr(value: Any) -> str:
    """A value as the apiserver prints it in 'Invalid value: ...'."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "map[string]interface {}{" + ", ".join(f"{json.dumps(k)}:{go_repr(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[]interface {}{" + ", ".join(go_repr(v) for v in value) + "}"
    if value is None:
        return "null"
    return json.dumps(value)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def validate(value: Any, node: Node, *, prune: bool, defaults: bool) -> Result:
    """Check `value` against `node`; with prune, unknown fields are deleted from `value` in place."""
    result = Result()
    _walk(value, node, "", result, prune, defaults)
    return result


def _walk(value: Any, node: Node, path: str, res: Result, prune: bool, defaults: bool) -> None:  # noqa: PLR0912
    raw = node.raw
    types = node.types()
    if value is None:
        return
    if not _fits(value, types):
        want = " or ".join(sorted(types))
        if node.crd:
            msg = (f"{path or '<root>'}: Invalid value: \"{_jtype(value)}\": {path or 'body'} in body must be of type "
                   f"{want}: {go_repr(value)}")
        else:
            msg = f"{path}: Invalid value: {go_repr(value)}: must be of type {want}"
        res.errors.append(FieldError("type", path, "FieldValueTypeInvalid", msg))
        return
    enum = raw.get("enum")
    if isinstance(enum, list) and enum and value not in enum:
        supported = ", ".join(go_repr(v) for v in enum)
        res.errors.append(FieldError("unsupported", path, "FieldValueNotSupported",
                                     f"{path}: Unsupported value: {go_repr(value)}: supported values: {supported}"))
    if node.crd:
        _value_checks(value, node, path, res)
    if isinstance(value, dict):
        required = raw.get("required")
        if isinstance(required, list):
            for key in required:
                if key not in value or value.get(key) is None:
                    res.errors.append(FieldError("required", join(path, key), "FieldValueRequired",
                                                 f"{join(path, key)}: Required value"))
        if defaults and node.crd:
            for key, sub in node.properties().items():
                if key not in value and isinstance(sub, dict) and "default" in sub:
                    value[key] = copy.deepcopy(sub["default"])
        for key in list(value):
            sub_node = node.child(key)
            sub_path = join(path, key)
            if sub_node is None:
                res.unknown.append(sub_path)
                if prune:
                    del value[key]
                continue
            if value[key] is None and node.crd and not sub_node.nullable():
                del value[key]
                continue
            if node.root and key == "metadata" and node.crd:
                continue
            _walk(value[key], sub_node, sub_path, res, prune, defaults)
    elif isinstance(value, list):
        item_node = node.items()
        for i, item in enumerate(value):
            _walk(item, item_node, f"{path}[{i}]", res, prune, defaults)


def _value_checks(value: Any, node: Node, path: str, res: Result) -> None:  # noqa: PLR0912
    raw = node.raw

    def bad(detail: str) -> None:
        res.errors.append(FieldError("invalid", path, "FieldValueInvalid",
                                     f"{path}: Invalid value: {go_repr(value)}: {detail}"))

    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in raw:
            low = raw["minimum"]
            if value < low or (raw.get("exclusiveMinimum") is True and value == low):
                bad(f"{path} in body should be greater than or equal to {low}")
        if "maximum" in raw:
            high = raw["maximum"]
            if value > high or (raw.get("exclusiveMaximum") is True and value == high):
                bad(f"{path} in body should be less than or equal to {high}")
    if isinstance(value, str):
        if "minLength" in raw and len(value) < raw["minLength"]:
            bad(f"{path} in body should be at least {raw['minLength']} chars long")
        if "maxLength" in raw and len(value) > raw["maxLength"]:
            bad(f"{path} in body may not be more than {raw['maxLength']} chars long")
        if "pattern" in raw:
            try:
                if not re.search(str(raw["pattern"]), value):
                    bad(f"{path} in body should match '{raw['pattern']}'")
            except re.error:
                pass
    if isinstance(value, list):
        if "minItems" in raw and len(value) < raw["minItems"]:
            bad(f"{path} in body should have at least {raw['minItems']} items")
        if "maxItems" in raw and len(value) > raw["maxItems"]:
            bad(f"{path} in body should have at most {raw['maxItems']} items")
    if isinstance(value, dict):
        if "minProperties" in raw and len(value) < raw["minProperties"]:
            bad(f"{path} in body should have at least {raw['minProperties']} properties")
        if "maxProperties" in raw and len(value) > raw["maxProperties"]:
            bad(f"{path} in body should have at most {raw['maxProperties']} properties")

    def passes(sub: Any) -> bool:
        trial = Result()
        _walk(copy.deepcopy(value), Node(sub if isinstance(sub, dict) else {}, None, True), path, trial, False, False)
        return not trial.errors

    for sub in raw.get("allOf") or []:
        if not passes(sub):
            bad("must validate all the schemas (allOf)")
            break
    if raw.get("anyOf") and not any(passes(s) for s in raw["anyOf"]):
        bad("must validate at least one schema (anyOf)")
    if raw.get("oneOf") and sum(1 for s in raw["oneOf"] if passes(s)) != 1:
        bad("must validate one and only one schema (oneOf)")
    if isinstance(raw.get("not"), dict) and passes(raw["not"]):
        bad("must not validate the schema (not)")

"""managedFields and server-side apply, after sigs.k8s.io/structured-merge-diff.

A field set is a set of paths; a path is a tuple of fieldsV1 path elements: "f:<field>",
"k:<json of the list-map keys>", "v:<json of a set item>". Struct fields are members only when
they are empty leaves; maps (map[string]X), list-map items and set items are members themselves;
scalars, atomic lists and atomic maps are leaves, compared by value for conflicts.
"""

from __future__ import annotations

import copy
import datetime
import json
from dataclasses import dataclass, field
from typing import Any

from .schemas import Node, any_node

Path = tuple[str, ...]

_IDENTITY_META = {"name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
                  "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink", "generateName"}
META_NODE = Node({"type": "object", "properties": {
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    "finalizers": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
    "ownerReferences": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["uid"],
                        "items": {"type": "object", "properties": {
                            "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                            "uid": {"type": "string"}, "controller": {"type": "boolean"},
                            "blockOwnerDeletion": {"type": "boolean"}}}},
}})


def _key_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def collect(obj: dict[str, Any], root: Node) -> tuple[set[Path], dict[Path, Any]]:
    """The field set of an object, and the values of its leaves."""
    members: set[Path] = set()
    leaves: dict[Path, Any] = {}
    for key, value in obj.items():
        if key in ("apiVersion", "kind") or value is None:
            continue
        if key == "metadata" and isinstance(value, dict):
            meta = {k: v for k, v in value.items() if k not in _IDENTITY_META}
            _walk(meta, META_NODE, ("f:metadata",), members, leaves, top=True)
            continue
        _walk(value, root.child(key) or any_node(root.crd), (f"f:{key}",), members, leaves)
    return members, leaves


def _walk(value: Any, node: Node, path: Path, members: set[Path], leaves: dict[Path, Any],  # noqa: PLR0912
          top: bool = False) -> None:
    if isinstance(value, dict) and not node.atomic():
        if not value:
            if not top:
                members.add(path)  # an empty map merges into the live one: owned, but it changes no value
            return
        if not node.is_struct() and not top:
            members.add(path)
        for key, sub in value.items():
            if sub is None:
                continue
            _walk(sub, node.child(key) or any_node(node.crd), (*path, f"f:{key}"), members, leaves)
        return
    if isinstance(value, list):
        list_type, keys = node.list_type(), node.list_keys()
        if list_type == "map" and keys and all(isinstance(i, dict) for i in value):
            item_node = node.items()
            for item in value:
                item_path = (*path, "k:" + _key_json({k: item[k] for k in keys if k in item}))
                members.add(item_path)
                for key, sub in item.items():
                    if sub is not None:
                        _walk(sub, item_node.child(key) or any_node(node.crd), (*item_path, f"f:{key}"), members,
                              leaves)
            return
        if list_type == "set" and all(not isinstance(i, dict | list) for i in value):
            for item in value:
                item_path = (*path, "v:" + _key_json(item))
                members.add(item_path)
                leaves[item_path] = item
            return
    members.add(path)
    leaves[path] = value


def to_fields_v1(paths: set[Path]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in sorted(paths):
        node = tree
        for element in path:
            node = node.setdefault(element, {})
    def mark(node: dict[str, Any], prefix: Path) -> None:
        for key, sub in node.items():
            if key == ".":
                continue
            here = (*prefix, key)
            if sub and here in paths:
                sub["."] = {}
            mark(sub, here)
    mark(tree, ())
    return _sorted_tree(tree)


def _sorted_tree(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _sorted_tree(tree[k]) for k in sorted(tree)}


def from_fields_v1(tree: Any, prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    if not isinstance(tree, dict):
        return out
    for key, sub in tree.items():
        if key == ".":
            continue
        here = (*prefix, key)
        if not sub or (isinstance(sub, dict) and "." in sub):
            out.add(here)
        out |= from_fields_v1(sub, here)
    return out


def format_path(path: Path) -> str:
    out = ""
    for element in path:
        kind, _, rest = element.partition(":")
        if kind == "f":
            out += f".{rest}"
        elif kind == "k":
            try:
                keys = json.loads(rest)
                out += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in keys.items()) + "]"
            except ValueError:
                out += f"[{rest}]"
        elif kind == "v":
            out += f"[={rest}]"
        else:
            out += f"[{rest}]"
    return out


def get_at(obj: Any, path: Path) -> tuple[bool, Any]:
    cur = obj
    for element in path:
        kind, _, rest = element.partition(":")
        if kind == "f":
            if not isinstance(cur, dict) or rest not in cur:
                return False, None
            cur = cur[rest]
        elif kind == "k":
            keys = json.loads(rest)
            if not isinstance(cur, list):
                return False, None
            match = next((i for i in cur if isinstance(i, dict) and all(i.get(k) == v for k, v in keys.items())),
                         None)
            if match is None:
                return False, None
            cur = match
        elif kind == "v":
            value = json.loads(rest)
            if not isinstance(cur, list) or value not in cur:
                return False, None
            cur = value
        else:
            return False, None
    return True, cur


def _remove_at(obj: Any, path: Path) -> None:
    """Remove a path: a leaf, a list item, or a map member that has become empty."""
    found, parent = get_at(obj, path[:-1])
    if not found:
        return
    kind, _, rest = path[-1].partition(":")
    if kind == "f" and isinstance(parent, dict) and rest in parent:
        value = parent[rest]
        if isinstance(value, dict) and value:
            return
        del parent[rest]
    elif kind == "k" and isinstance(parent, list):
        keys = json.loads(rest)
        parent[:] = [i for i in parent if not (isinstance(i, dict) and all(i.get(k) == v for k, v in keys.items()))]
    elif kind == "v" and isinstance(parent, list):
        value = json.loads(rest)
        parent[:] = [i for i in parent if i != value]


def apply_merge(current: Any, applied: Any, node: Node) -> Any:
    if isinstance(applied, dict) and isinstance(current, dict) and not node.atomic():
        result = copy.deepcopy(current)
        for key, value in applied.items():
            if value is None:
                result.pop(key, None)
                continue
            child = node.child(key) or any_node(node.crd)
            if key == "metadata" and node.root:
                child = META_NODE
            result[key] = apply_merge(current.get(key), value, child)
        return result
    if isinstance(applied, list) and isinstance(current, list):
        list_type, keys = node.list_type(), node.list_keys()
        if list_type == "map" and keys and all(isinstance(i, dict) for i in applied + current):
            out = [copy.deepcopy(i) for i in current]
            item_node = node.items()
            for item in applied:
                ident = {k: item.get(k) for k in keys}
                index = next((n for n, cur in enumerate(out) if all(cur.get(k) == v for k, v in ident.items())), None)
                if index is None:
                    out.append(apply_merge({}, item, item_node))
                else:
                    out[index] = apply_merge(out[index], item, item_node)
            return out
        if list_type == "set":
            out = list(current)
            for item in applied:
                if item not in out:
                    out.append(copy.deepcopy(item))
            return out
    return _strip_nulls(copy.deepcopy(applied))


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


# --- managedFields entries -------------------------------------------------------------------------


@dataclass
class Entry:
    manager: str
    operation: str
    api_version: str
    time: str
    subresource: str = ""
    fields: set[Path] = field(default_factory=set)

    def same_owner(self, manager: str, operation: str, subresource: str) -> bool:
        return (self.manager, self.operation, self.subresource) == (manager, operation, subresource)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"manager": self.manager, "operation": self.operation, "apiVersion": self.api_version,
                               "time": self.time, "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(self.fields)}
        if self.subresource:
            out["subresource"] = self.subresource
        return out


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_entries(obj: dict[str, Any] | None) -> list[Entry]:
    out: list[Entry] = []
    for raw in ((obj or {}).get("metadata") or {}).get("managedFields") or []:
        if not isinstance(raw, dict) or (not raw.get("manager") and not raw.get("operation")):
            continue
        out.append(Entry(str(raw.get("manager", "")), str(raw.get("operation", "Update")),
                         str(raw.get("apiVersion", "")), str(raw.get("time", "")), str(raw.get("subresource", "")),
                         from_fields_v1(raw.get("fieldsV1") or {})))
    return out


def write_entries(obj: dict[str, Any], entries: list[Entry]) -> None:
    kept = [e.to_json() for e in entries if e.fields]
    meta = obj.setdefault("metadata", {})
    if kept:
        meta["managedFields"] = kept
    else:
        meta.pop("managedFields", None)


def record_update(old: dict[str, Any] | None, new: dict[str, Any], root: Node, manager: str, api_version: str,
                  subresource: str = "") -> None:
    """Give `manager` (operation Update) the fields it changed from `old` to `new`; others lose them."""
    new_fields, new_leaves = collect(new, root)
    old_fields: set[Path] = set()
    old_leaves: dict[Path, Any] = {}
    if old is not None:
        old_fields, old_leaves = collect(old, root)
    changed = {p for p in new_fields
               if p not in old_fields or (p in new_leaves and _key_json(new_leaves[p]) != _key_json(old_leaves.get(p)))}
    entries = read_entries(old)
    mine = next((e for e in entries if e.same_owner(manager, "Update", subresource)), None)
    stamp = now_rfc3339()
    for entry in entries:
        if entry is mine:
            continue
        entry.fields = (entry.fields - changed) & new_fields
    if changed:
        if mine is None:
            mine = Entry(manager, "Update", api_version, stamp, subresource)
            entries.append(mine)
        mine.fields = (mine.fields | changed) & new_fields
        mine.time, mine.api_version = stamp, api_version
    elif mine is not None:
        mine.fields &= new_fields
    write_entries(new, entries)


@dataclass
class Conflict:
    manager: str
    operation: str
    subresource: str
    api_version: str
    path: Path


class ApplyConflict(Exception):
    def __init__(self, conflicts: list[Conflict]) -> None:
        super().__init__("apply conflict")
        self.conflicts = conflicts


def server_side_apply(current: dict[str, Any], applied: dict[str, Any], root: Node, manager: str, api_version: str,  # noqa: PLR0912
                      *, force: bool, subresource: str = "") -> dict[str, Any]:
    """The object after `manager` applies `applied` to `current` (which may be a bare identity object).

    Raises ApplyConflict when another manager owns a field applied with a different value (unless force).
    """
    applied = dict(applied)
    applied_fields, applied_leaves = collect(_strip_nulls(applied), root)
    entries = read_entries(current)
    mine = next((e for e in entries if e.same_owner(manager, "Apply", subresource)), None)
    conflicts: list[Conflict] = []
    for entry in entries:
        if entry is mine:
            continue
        for path in sorted(entry.fields & applied_fields):
            if path not in applied_leaves:
                continue
            found, value = get_at(current, path)
            if found and _key_json(value) != _key_json(applied_leaves[path]):
                conflicts.append(Conflict(entry.manager, entry.operation, entry.subresource, entry.api_version, path))
    if conflicts and not force:
        raise ApplyConflict(conflicts)
    for conflict in conflicts:
        for entry in entries:
            if entry is not mine and entry.same_owner(conflict.manager, conflict.operation, conflict.subresource):
                entry.fields.discard(conflict.path)
    merged = apply_merge(current, applied, root)
    previous = mine.fields if mine else set()
    others: set[Path] = set()
    for entry in entries:
        if entry is not mine:
            others |= entry.fields
    for path in sorted(previous - applied_fields, key=len, reverse=True):
        if path in others or any(o[:len(path)] == path for o in others):
            continue
        _remove_at(merged, path)
    merged_fields, _ = collect(merged, root)
    for entry in entries:
        if entry is not mine:
            entry.fields &= merged_fields
    if mine is None:
        mine = Entry(manager, "Apply", api_version, now_rfc3339(), subresource)
        entries.append(mine)
    if mine.fields != applied_fields or mine.api_version != api_version:
        mine.time = now_rfc3339()
    mine.fields, mine.api_version = applied_fields & merged_fields, api_version
    # keep the old time stamps of unchanged entries so that a no-op apply changes nothing
    old_json = {(e.manager, e.operation, e.subresource): e for e in read_entries(current)}
    for entry in entries:
        before = old_json.get((entry.manager, entry.operation, entry.subresource))
        if before is not None and before.fields == entry.fields and before.api_version == entry.api_version:
            entry.time = before.time
    write_entries(merged, entries)
    out: dict[str, Any] = merged
    return out

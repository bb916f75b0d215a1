"""The Kubernetes API: routing, discovery, verbs, Status errors. Transport-free (see server.py)."""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import secrets
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import defaults, managed, patch, schemas, selectors
from .log import Log
from .resources import EXTRA_SUBRESOURCES, Registry, ResourceType, storage_version_hash
from .store import Store

JSONObj = dict[str, Any]
PROTECTED_NAMESPACES = ("default", "kube-system", "kube-public")
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"
PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json",
               "application/strategic-merge-patch+json", "application/apply-patch+yaml")


def rfc3339(ts: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if ts is None else ts))


def parse_rfc3339(text: str) -> float:
    import calendar

    try:
        return float(calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")))
    except (ValueError, TypeError):
        return 0.0


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: JSONObj | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> JSONObj:
        out: JSONObj = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            out["details"] = self.details
        return out


def _details(rt: ResourceType, name: str | None, kind: str | None = None) -> JSONObj:
    out: JSONObj = {}
    if name:
        out["name"] = name
    if rt.group:
        out["group"] = rt.group
    out["kind"] = kind or rt.plural
    return out


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{rt.qualified_resource} "{name}" not found', _details(rt, name))


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def invalid(rt: ResourceType, name: str, errors: list[schemas.FieldError]) -> ApiError:
    msgs = [e.message for e in errors]
    text = msgs[0] if len(msgs) == 1 else "[" + ", ".join(msgs) + "]"
    details = _details(rt, name, rt.kind)
    details["causes"] = [{"reason": e.reason, "message": e.message.partition(": ")[2] or e.message, "field": e.path}
                         for e in errors]
    return ApiError(422, "Invalid", f'{rt.qualified_kind} "{name}" is invalid: {text}', details)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes = b""

    def q(self, name: str, default: str | None = None) -> str | None:
        vals = self.query.get(name)
        return vals[-1] if vals else default

    def header(self, name: str) -> str:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return ""


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: Iterator[bytes] | None = None


def json_response(status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":")).encode(), headers=headers or [])


@dataclass
class ClusterInfo:
    version: str
    ca_pem: bytes
    service_cidr: ipaddress.IPv4Network
    cluster_cidr: ipaddress.IPv4Network
    advertise: str  # host:port for serverAddressByClientCIDRs
    authenticate: Callable[[str], bool]


@dataclass
class WriteOptions:
    manager: str
    dry_run: bool
    field_validation: str  # Strict | Warn | Ignore
    warnings: list[str] = field(default_factory=list)


class Api:
    def __init__(self, store: Store, registry: Registry, builtin: schemas.BuiltinSchemas, info: ClusterInfo,
                 log: Log) -> None:
        self.store, self.registry, self.builtin, self.info, self.log = store, registry, builtin, info, log
        self.stopping = False
        self.public_routes: dict[str, Callable[[], Response]] = {}  # unauthenticated GET paths (the controllers')

    # ================================================================================== entry point
    def handle(self, req: Request) -> Response:
        try:
            return self._handle(req)
        except ApiError as err:
            return json_response(err.code, err.status())
        except Exception as exc:  # a bug: answer like the apiserver would, and log it
            self.log.error(f"internal error serving {req.method} {req.path}: {type(exc).__name__}: {exc}")
            return json_response(500, ApiError(500, "InternalError", f"Internal error occurred: {exc}").status())

    def _handle(self, req: Request) -> Response:  # noqa: PLR0911, PLR0912
        path = req.path.rstrip("/") or "/"
        if path == "/cacerts":
            return Response(200, self.info.ca_pem, content_type="text/plain")
        if path == "/ping":
            return Response(200, b"pong", content_type="text/plain")
        if path in self.public_routes and req.method == "GET":
            return self.public_routes[path]()
        auth = req.header("Authorization")
        if not self.info.authenticate(auth):
            return json_response(401, ApiError(401, "Unauthorized", "Unauthorized").status())
        if path in ("/healthz", "/livez", "/readyz"):
            return Response(200, b"ok", content_type="text/plain")
        if path == "/version":
            return json_response(200, self._version())
        if path == "/":
            return json_response(200, {"paths": sorted({"/api", "/api/v1", "/apis", "/version", "/healthz",
                                                        "/livez", "/readyz"}
                                                       | {f"/apis/{g}" for g in self.registry.groups() if g})})
        if path.startswith("/openapi"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        if parts[0] == "api":
            if len(parts) == 1:
                return json_response(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": self.info.advertise}]})
            if parts[1] != "v1":
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return self._group_version(req, "", "v1", parts[2:])
        if parts[0] == "apis":
            if len(parts) == 1:
                return json_response(200, self._group_list())
            group = parts[1]
            versions = self.registry.groups().get(group)
            if not group or not versions:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if len(parts) == 2:
                return json_response(200, self._group(group, versions))
            if parts[2] not in versions:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return self._group_version(req, group, parts[2], parts[3:])
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    # ==================================================================================== discovery
    def _version(self) -> JSONObj:
        from .version import kube_minor

        major, minor = kube_minor(self.info.version)
        return {"major": str(major), "minor": str(minor), "emulationMajor": str(major),
                "emulationMinor": str(minor), "gitVersion": self.info.version,
                "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
                "buildDate": "1970-01-01T00:00:00Z", "goVersion": "python3", "compiler": "gc",
                "platform": "linux/amd64"}

    def _group(self, group: str, versions: list[str]) -> JSONObj:
        gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": gvs, "preferredVersion": gvs[0]}

    def _group_list(self) -> JSONObj:
        groups = self.registry.groups()
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [self._group(g, groups[g]) for g in sorted(groups) if g]}

    def _resource_list(self, group: str, version: str) -> JSONObj:
        resources: list[JSONObj] = []
        for rt in self.registry.resources(group, version):
            entry: JSONObj = {"name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
                              "kind": rt.kind, "verbs": list(rt.verbs),
                              "storageVersionHash": storage_version_hash(rt)}
            if rt.short_names:
                entry["shortNames"] = list(rt.short_names)
            if rt.categories:
                entry["categories"] = list(rt.categories)
            resources.append(entry)
            if rt.status:
                resources.append({"name": f"{rt.plural}/status", "singularName": "", "namespaced": rt.namespaced,
                                  "kind": rt.kind, "verbs": ["get", "patch", "update"]})
            for extra in EXTRA_SUBRESOURCES.get((rt.group, rt.plural), []):
                resources.append({"singularName": "", "namespaced": rt.namespaced, **extra})
        gv = f"{group}/{version}" if group else version
        out: JSONObj = {"kind": "APIResourceList", "groupVersion": gv, "resources": resources}
        if group:
            out["apiVersion"] = "v1"
        return out

    # ====================================================================================== routing
    def _group_version(  # noqa: PLR0911, PLR0912
            self, req: Request, group: str, version: str, rest: list[str]) -> Response:
        if not rest:
            if req.method != "GET":
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                                                        "resource")
            return json_response(200, self._resource_list(group, version))
        watch = False
        if rest[0] == "watch":
            watch, rest = True, rest[1:]
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            candidate = self.registry.get(group, version, rest[2])
            if candidate is not None and candidate.namespaced:
                namespace, rest = rest[1], rest[2:]
        if not rest:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        rt = self.registry.get(group, version, rest[0])
        if rt is None or len(rest) > 3:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if namespace is not None and not rt.namespaced:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        if rt.namespaced and name is not None and namespace is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if sub is not None and not (sub == "status" and rt.status) and not (sub == "eviction" and
                                                                              rt.storage_key == "/pods"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        method = req.method
        if watch or (req.q("watch") or "").lower() in ("1", "true"):
            if method != "GET" or sub is not None:
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested "
                                                        "resource")
            return self._watch(req, rt, namespace, name)
        ns = namespace or ""
        if name is None:
            if method == "GET":
                return json_response(200, self._list(req, rt, namespace))
            if method == "POST":
                return self._create(req, rt, ns)
            if method == "DELETE" and "deletecollection" in rt.verbs:
                return self._delete_collection(req, rt, namespace)
        elif sub is None:
            if method == "GET":
                return json_response(200, self._out(rt, self._get_or_404(rt, ns, name)))
            if method == "PUT":
                return self._update(req, rt, ns, name, "")
            if method == "PATCH":
                return self._patch(req, rt, ns, name, "")
            if method == "DELETE":
                return self._delete(req, rt, ns, name)
        elif sub == "status":
            if method == "GET":
                return json_response(200, self._out(rt, self._get_or_404(rt, ns, name)))
            if method == "PUT":
                return self._update(req, rt, ns, name, "status")
            if method == "PATCH":
                return self._patch(req, rt, ns, name, "status")
        elif sub == "eviction" and method == "POST":
            return self._evict(req, rt, ns, name)
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    # ======================================================================================== reads
    def _get_or_404(self, rt: ResourceType, ns: str, name: str) -> JSONObj:
        obj = self.store.get(rt.storage_key, ns, name)
        if obj is None:
            raise not_found(rt, name)
        return obj

    def _out(self, rt: ResourceType, obj: JSONObj, in_list: bool = False) -> JSONObj:
        if in_list and rt.crd is None:
            obj.pop("apiVersion", None)
            obj.pop("kind", None)
            return obj
        out = {"apiVersion": rt.api_version, "kind": rt.kind}
        out.update({k: v for k, v in obj.items() if k not in ("apiVersion", "kind")})
        return out

    def _selectors(self, req: Request, rt: ResourceType) -> tuple[list[selectors.Requirement],
                                                                  list[selectors.FieldRequirement]]:
        try:
            return (selectors.parse_labels(req.q("labelSelector")),
                    selectors.parse_fields(req.q("fieldSelector"), rt.storage_key))
        except selectors.SelectorError as exc:
            raise bad_request(str(exc)) from exc

    def _list(self, req: Request, rt: ResourceType, namespace: str | None) -> JSONObj:
        labels, fields = self._selectors(req, rt)
        with self.store.lock:
            rv = self.store.rv
            items = [o for o in self.store.list_objects(rt.storage_key, namespace)
                     if selectors.match_labels(labels, o) and selectors.match_fields(fields, o)]
        meta: JSONObj = {"resourceVersion": str(rv)}
        cont = req.q("continue")
        if cont:
            try:
                token = json.loads(base64.urlsafe_b64decode(cont.encode()).decode())
                start = str(token["start"])
            except (ValueError, KeyError, TypeError) as exc:
                raise bad_request(f"invalid continue token: {exc}") from exc
            items = [o for o in items if _sort_key(o) > start]
        limit_text = req.q("limit")
        if limit_text and limit_text.isdigit() and 0 < int(limit_text) < len(items):
            limit = int(limit_text)
            last = _sort_key(items[limit - 1])
            meta["continue"] = base64.urlsafe_b64encode(json.dumps({"rv": rv, "start": last}).encode()).decode()
            meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version, "metadata": meta,
                "items": [self._out(rt, o, in_list=True) for o in items]}

    def _watch(self, req: Request, rt: ResourceType, namespace: str | None, name: str | None) -> Response:
        labels, fields = self._selectors(req, rt)
        if name:
            fields.append(selectors.FieldRequirement("metadata.name", "=", name))
        timeout_text = req.q("timeoutSeconds")
        timeout = float(timeout_text) if timeout_text and timeout_text.isdigit() else 1800.0
        rv_text = req.q("resourceVersion")

        def matches(obj: JSONObj) -> bool:
            meta = obj.get("metadata") or {}
            if namespace is not None and meta.get("namespace") != namespace:
                return False
            return selectors.match_labels(labels, obj) and selectors.match_fields(fields, obj)

        def line(kind: str, obj: JSONObj) -> bytes:
            return json.dumps({"type": kind, "object": self._out(rt, obj)}, separators=(",", ":")).encode() + b"\n"

        store = self.store
        with store.lock:
            initial: list[JSONObj] = []
            if not rv_text or rv_text == "0":
                initial = [o for o in store.list_objects(rt.storage_key, namespace) if matches(o)]
                last = store.rv
            else:
                try:
                    last = int(rv_text)
                except ValueError as exc:
                    raise bad_request(f"invalid resource version {rv_text!r}") from exc
                if last < store.oldest_event_rv:
                    expired = ApiError(410, "Expired", f"too old resource version: {last} ({store.oldest_event_rv})")
                    body = json.dumps({"type": "ERROR", "object": expired.status()}).encode() + b"\n"
                    return Response(200, stream=iter([body]))

        def events() -> Iterator[bytes]:
            nonlocal last
            for obj in initial:
                yield line("ADDED", obj)
            deadline = time.monotonic() + timeout
            while True:
                batch: list[bytes] = []
                with store.lock:
                    while not store.closed and not self.stopping and (not store.events or
                                                                      store.events[-1].rv <= last):
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return
                        store.changed.wait(min(remaining, 1.0))
                    if store.closed or self.stopping:
                        return
                    for event in store.events:
                        if event.rv <= last:
                            continue
                        last = event.rv
                        if event.storage_key == rt.storage_key and matches(event.obj):
                            batch.append(line(event.type, copy.deepcopy(event.obj)))
                yield from batch
                if time.monotonic() >= deadline:
                    return

        return Response(200, stream=events())

    # ======================================================================================= writes
    def _options(self, req: Request) -> WriteOptions:
        manager = req.q("fieldManager")
        if not manager:
            agent = req.header("User-Agent")
            manager = agent.split("/", 1)[0] if agent else "unknown"
        validation = req.q("fieldValidation") or "Strict"
        if validation not in ("Strict", "Warn", "Ignore"):
            raise bad_request(f'fieldValidation: Unsupported value: "{validation}": supported values: "Ignore", '
                              '"Strict", "Warn"')
        dry = req.query.get("dryRun") or []
        if any(d != "All" for d in dry):
            raise bad_request(f'dryRun: Unsupported value: "{dry[0]}": supported values: "All"')
        return WriteOptions(manager=manager[:128], dry_run=bool(dry), field_validation=validation)

    def _decode(self, req: Request, *, allow_list: bool = False) -> Any:
        if not req.body.strip():
            raise bad_request("the body of the request was empty")
        ctype = req.header("Content-Type").split(";")[0].strip().lower()
        try:
            text = req.body.decode("utf-8")
            # JSON also when sent as YAML: the kubernetes client sends apply bodies as JSON
            as_yaml = "yaml" in ctype and not text.lstrip().startswith("{")
            data = yaml.safe_load(text) if as_yaml else json.loads(text)
        except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
            raise bad_request(f"error decoding the request body: {exc}") from exc
        if not isinstance(data, dict) and not (allow_list and isinstance(data, list)):
            raise bad_request("the body of the request must be a JSON object")
        return data

    def _root(self, rt: ResourceType) -> schemas.Node:
        if rt.crd is not None:
            return schemas.crd_root(rt.schema)
        node = self.builtin.kind(rt)
        if node is None:
            return schemas.Node({}, None, crd=False, root=True)
        node.root = True
        return node

    def _check_type(self, rt: ResourceType, obj: JSONObj, what: str = "") -> None:
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if api_version is not None and api_version != rt.api_version:
            raise bad_request(f"the API version in the data ({api_version}) does not match the expected API "
                              f"version ({rt.api_version})")
        if kind is not None and kind != rt.kind:
            raise bad_request(f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})")
        if not isinstance(obj.get("metadata", {}), dict):
            raise bad_request(f"{rt.kind} in version \"{rt.version}\" cannot be handled as a {rt.kind}: "
                              "metadata must be an object")

    def _decode_check(self, rt: ResourceType, obj: JSONObj, opts: WriteOptions, name: str) -> None:
        """Types and unknown fields, as the apiserver's (strict) decoder sees them; prunes per fieldValidation."""
        result = schemas.validate(obj, self._root(rt), prune=opts.field_validation != "Strict", defaults=False)
        type_errors = [e for e in result.errors if e.kind == "type"]
        if type_errors:
            if rt.crd is not None:
                raise invalid(rt, name, type_errors)
            first = type_errors[0]
            raise bad_request(f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                              f"json: cannot unmarshal into Go struct field {first.path} ({first.message})")
        if result.unknown:
            if opts.field_validation == "Strict":
                raise bad_request(f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                                  "strict decoding error: " + ", ".join(f'unknown field "{p}"' for p in result.unknown))
            if opts.field_validation == "Warn":
                opts.warnings += [f'unknown field "{p}"' for p in result.unknown]
        if rt.storage_key == "/secrets":
            problem = defaults.check_secret_data(obj)
            if problem:
                raise bad_request(f'Secret in version "v1" cannot be handled as a Secret: {problem}')

    def _validate(self, rt: ResourceType, obj: JSONObj, old: JSONObj | None) -> None:
        name = (obj.get("metadata") or {}).get("name", "")
        if rt.crd is not None:
            schemas.validate(obj, self._root(rt), prune=True, defaults=True)
        else:
            defaults.apply_defaults(rt, obj)
        result = schemas.validate(obj, self._root(rt), prune=True, defaults=False)
        errors = [e for e in result.errors if e.kind != "type"] + ([e for e in result.errors if e.kind == "type"]
                                                                   if rt.crd is not None else [])
        if old is None:
            errors += defaults.validate_name(rt, name)
        errors += defaults.validate_metadata(obj.get("metadata") or {})
        errors += defaults.validate_semantics(rt, obj, old)
        if errors:
            raise invalid(rt, name, errors)

    def _namespace_must_exist(self, rt: ResourceType, ns: str) -> None:
        if rt.namespaced and self.store.get("/namespaces", "", ns) is None:
            ns_rt = self.registry.get("", "v1", "namespaces")
            assert ns_rt is not None
            raise not_found(ns_rt, ns)

    def _create(self, req: Request, rt: ResourceType, ns: str) -> Response:
        opts = self._options(req)
        obj = self._decode(req)
        self._check_type(rt, obj)
        meta = obj.setdefault("metadata", {}) or {}
        obj["metadata"] = meta
        if rt.namespaced:
            if meta.get("namespace") not in (None, "", ns):
                raise bad_request("the namespace of the provided object does not match the namespace sent on the "
                                  "request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = str(meta["generateName"]) + "".join(secrets.choice(_NAME_CHARS) for _ in range(5))
            else:
                raise invalid(rt, "", [schemas.FieldError("required", "metadata.name", "FieldValueRequired",
                                                          "metadata.name: Required value: name or generateName is "
                                                          "required")])
        created = self.create_object(rt, obj, opts)
        return json_response(201, self._out(rt, created), self._warning_headers(opts))

    def _warning_headers(self, opts: WriteOptions) -> list[tuple[str, str]]:
        return [("Warning", f'299 - {json.dumps(w)}') for w in opts.warnings]

    def create_object(self, rt: ResourceType, obj: JSONObj, opts: WriteOptions, *,
                      managed_done: bool = False) -> JSONObj:
        """Validate, default, complete and store a new object (also used by the server's own controllers)."""
        meta = obj["metadata"]
        name = meta["name"]
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        self._decode_check(rt, obj, opts, name)
        with self.store.lock:
            self._namespace_must_exist(rt, meta.get("namespace", ""))
            if self.store.get(rt.storage_key, meta.get("namespace", ""), name) is not None:
                raise ApiError(409, "AlreadyExists", f'{rt.qualified_resource} "{name}" already exists',
                               _details(rt, name))
            if rt.status and rt.storage_key not in ("/nodes",):
                obj.pop("status", None)
            self._validate(rt, obj, None)
            for key in ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp", "generation",
                        "selfLink", "deletionGracePeriodSeconds"):
                meta.pop(key, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = rfc3339()
            if rt.generation:
                meta["generation"] = 1
            self._on_create(rt, obj)
            if not managed_done:
                meta.pop("managedFields", None)
                managed.record_update(None, obj, self._root(rt), opts.manager, rt.api_version)
            if opts.dry_run:
                return obj
            with self.store.batch():
                stored = self.store.put(rt.storage_key, obj, "ADDED")
                self._after_create(rt, stored)
            return stored

    def _update(self, req: Request, rt: ResourceType, ns: str, name: str, sub: str) -> Response:
        opts = self._options(req)
        obj = self._decode(req)
        self._check_type(rt, obj)
        meta = obj.get("metadata") or {}
        if meta.get("name") not in (None, name):
            raise bad_request(f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                              f"({name})")
        if rt.namespaced and meta.get("namespace") not in (None, "", ns):
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        with self.store.lock:
            old = self._get_or_404(rt, ns, name)
            rv = meta.get("resourceVersion")
            if rv not in (None, "") and rv != old["metadata"].get("resourceVersion"):
                raise self._conflict(rt, name)
            updated = self.update_object(rt, old, obj, opts, sub)
        return json_response(200, self._out(rt, updated), self._warning_headers(opts))

    def _conflict(self, rt: ResourceType, name: str) -> ApiError:
        return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rt.qualified_resource} "{name}": the '
                        "object has been modified; please apply your changes to the latest version and try again",
                        _details(rt, name))

    def update_object(self, rt: ResourceType, old: JSONObj, new: JSONObj, opts: WriteOptions, sub: str, *,  # noqa: PLR0912
                      managed_done: bool = False) -> JSONObj:
        """Store `new` as the next version of `old` (sub "status": only its status counts)."""
        name = old["metadata"]["name"]
        new = copy.deepcopy(new)
        new["apiVersion"], new["kind"] = rt.api_version, rt.kind
        new.setdefault("metadata", {})
        self._decode_check(rt, new, opts, name)
        if sub == "status":
            status = new.get("status")
            metadata = new["metadata"]
            new = copy.deepcopy(old)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
            if managed_done:
                new["metadata"]["managedFields"] = metadata.get("managedFields", [])
        elif rt.status:
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        meta = new["metadata"]
        old_meta = old["metadata"]
        for key in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                    "deletionGracePeriodSeconds", "generation", "selfLink"):
            if key in old_meta:
                meta[key] = old_meta[key]
            else:
                meta.pop(key, None)
        if not managed_done:
            meta["managedFields"] = copy.deepcopy(old_meta.get("managedFields", []))
        with self.store.lock:
            self._validate(rt, new, old)
            self._on_update(rt, old, new)
            if rt.generation and _spec_part(old) != _spec_part(new):
                meta["generation"] = int(old_meta.get("generation", 1)) + 1
            if not managed_done:
                managed.record_update(old, new, self._root(rt), opts.manager, rt.api_version, sub)
            meta["resourceVersion"] = old_meta.get("resourceVersion")
            if _same(old, new):
                return old
            if opts.dry_run:
                return new
            with self.store.batch():
                if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                    return self._remove(rt, new, "Background")
                return self.store.put(rt.storage_key, new, "MODIFIED")

    def _patch(self, req: Request, rt: ResourceType, ns: str, name: str, sub: str) -> Response:
        opts = self._options(req)
        ctype = req.header("Content-Type").split(";")[0].strip().lower()
        if ctype not in PATCH_TYPES:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - "
                           f"accepted media types include: {', '.join(PATCH_TYPES)}")
        if ctype == "application/apply-patch+yaml":
            return self._apply(req, rt, ns, name, sub, opts)
        if ctype == "application/strategic-merge-patch+json" and rt.crd is not None:
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an unknown format - "
                           "accepted media types include: application/json-patch+json, application/merge-patch+json, "
                           "application/apply-patch+yaml")
        body = self._decode(req, allow_list=ctype == "application/json-patch+json")
        with self.store.lock:
            old = self._get_or_404(rt, ns, name)
            current = self._out(rt, copy.deepcopy(old))
            try:
                if ctype == "application/json-patch+json":
                    patched = patch.json_patch(current, body)
                elif ctype == "application/merge-patch+json":
                    patched = patch.merge_patch(current, body)
                else:
                    patched = patch.strategic_merge_patch(current, body, self._root(rt))
            except patch.PatchError as exc:
                if exc.invalid:
                    raise ApiError(422, "Invalid", str(exc)) from exc
                raise bad_request(str(exc)) from exc
            if not isinstance(patched, dict):
                raise bad_request("the patch did not produce an object")
            self._check_type(rt, patched)
            rv = (patched.get("metadata") or {}).get("resourceVersion")
            if rv not in (None, "") and rv != old["metadata"].get("resourceVersion"):
                raise self._conflict(rt, name)
            if (patched.get("metadata") or {}).get("name") != name:
                raise bad_request("metadata.name: Invalid value: the name of the object does not match the name on "
                                  "the URL")
            updated = self.update_object(rt, old, patched, opts, sub)
        return json_response(200, self._out(rt, updated), self._warning_headers(opts))

    def _apply(self, req: Request, rt: ResourceType, ns: str, name: str, sub: str, opts: WriteOptions) -> Response:
        if not req.q("fieldManager"):
            raise ApiError(422, "Invalid", 'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is '
                                           "required for apply patch",
                           {"group": "meta.k8s.io", "kind": "PatchOptions",
                            "causes": [{"reason": "FieldValueRequired", "message": "Required value: is required for "
                                        "apply patch", "field": "fieldManager"}]})
        force = (req.q("force") or "").lower() in ("true", "1")
        applied = self._decode(req)
        if applied.get("apiVersion") is None or applied.get("kind") is None:
            raise bad_request("error decoding YAML: Object 'Kind' is missing in the applied configuration"
                              if applied.get("kind") is None else
                              "error decoding YAML: Object 'apiVersion' is missing in the applied configuration")
        self._check_type(rt, applied)
        meta = applied.get("metadata") or {}
        if meta.get("name") not in (None, name):
            raise bad_request(f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                              f"({name})")
        if rt.namespaced and meta.get("namespace") not in (None, "", ns):
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        self._decode_check(rt, applied, opts, name)
        if sub == "status":
            applied = {k: v for k, v in applied.items() if k in ("apiVersion", "kind", "metadata", "status")}
        elif rt.status:
            applied.pop("status", None)
        applied_meta = applied.setdefault("metadata", {})
        applied_meta["name"] = name
        if rt.namespaced:
            applied_meta["namespace"] = ns
        for key in ("uid", "resourceVersion", "creationTimestamp", "managedFields", "generation"):
            applied_meta.pop(key, None)
        root = self._root(rt)
        with self.store.lock:
            old = self.store.get(rt.storage_key, ns, name)
            if old is None:
                if sub:
                    raise not_found(rt, name)
                base: JSONObj = {"apiVersion": rt.api_version, "kind": rt.kind, "metadata": {"name": name}}
                if rt.namespaced:
                    base["metadata"]["namespace"] = ns
                merged = self._ssa(rt, base, applied, root, opts, force, sub)
                created = self.create_object(rt, merged, opts, managed_done=True)
                return json_response(201, self._out(rt, created), self._warning_headers(opts))
            current = self._out(rt, copy.deepcopy(old))
            merged = self._ssa(rt, current, applied, root, opts, force, sub)
            updated = self.update_object(rt, old, merged, opts, sub, managed_done=True)
        return json_response(200, self._out(rt, updated), self._warning_headers(opts))

    def _ssa(self, rt: ResourceType, current: JSONObj, applied: JSONObj, root: schemas.Node, opts: WriteOptions,
             force: bool, sub: str) -> JSONObj:
        try:
            return managed.server_side_apply(current, applied, root, opts.manager, rt.api_version, force=force,
                                             subresource=sub)
        except managed.ApplyConflict as exc:
            causes = []
            texts = []
            for c in exc.conflicts:
                who = f'conflict with "{c.manager}"'
                if c.operation == "Update" and c.api_version and c.api_version != rt.api_version:
                    who += f" using {c.api_version}"
                if c.subresource:
                    who += f' with subresource "{c.subresource}"'
                field_path = managed.format_path(c.path)
                causes.append({"reason": "FieldManagerConflict", "message": who, "field": field_path})
                texts.append(f"{who}: {field_path}")
            count = len(exc.conflicts)
            message = f"Apply failed with {count} conflict{'s' if count != 1 else ''}: " + "\n".join(texts)
            raise ApiError(409, "Conflict", message, {"causes": causes}) from exc

    # ====================================================================================== deletes
    def _delete(self, req: Request, rt: ResourceType, ns: str, name: str) -> Response:
        opts = self._options(req)
        body: JSONObj = {}
        if req.body.strip():
            body = self._decode(req)
        policy = req.q("propagationPolicy") or body.get("propagationPolicy") or "Background"
        if req.q("orphanDependents") == "true" or body.get("orphanDependents") is True:
            policy = "Orphan"
        with self.store.lock:
            obj = self._get_or_404(rt, ns, name)
            pre = body.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != obj["metadata"].get("uid"):
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rt.qualified_resource} "{name}": '
                               f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: "
                               f"{obj['metadata'].get('uid')}", _details(rt, name))
            if pre.get("resourceVersion") and pre["resourceVersion"] != obj["metadata"].get("resourceVersion"):
                raise self._conflict(rt, name)
            if rt.storage_key == "/namespaces" and name in PROTECTED_NAMESPACES:
                raise ApiError(403, "Forbidden", f'namespaces "{name}" is forbidden: this namespace may not be '
                               "deleted", _details(rt, name))
            if opts.dry_run:
                return json_response(200, self._deleted_response(rt, obj))
            with self.store.batch():
                if obj["metadata"].get("finalizers"):
                    if not obj["metadata"].get("deletionTimestamp"):
                        obj["metadata"]["deletionTimestamp"] = rfc3339()
                        obj["metadata"]["deletionGracePeriodSeconds"] = 0
                        obj = self.store.put(rt.storage_key, obj, "MODIFIED")
                    return json_response(200, self._out(rt, obj))
                gone = self._remove(rt, obj, policy)
        return json_response(200, self._deleted_response(rt, gone))

    def _deleted_response(self, rt: ResourceType, obj: JSONObj) -> JSONObj:
        if rt.crd is not None or rt.storage_key in ("/pods", "/namespaces", "/services", "/persistentvolumeclaims",
                                                    "/persistentvolumes",
                                                    "apiextensions.k8s.io/customresourcedefinitions"):
            out = self._out(rt, obj)
            if rt.storage_key == "/namespaces":
                out.setdefault("status", {})["phase"] = "Terminating"
                out["metadata"].setdefault("deletionTimestamp", rfc3339())
            return out
        details = _details(rt, obj["metadata"]["name"])
        details["uid"] = obj["metadata"].get("uid")
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}

    def _remove(self, rt: ResourceType, obj: JSONObj, policy: str) -> JSONObj:
        """Delete an object now, with what hangs on it: a namespace's contents, a CRD's objects, dependents."""
        meta = obj["metadata"]
        ns, name = meta.get("namespace", ""), meta["name"]
        if rt.storage_key == "/namespaces":
            seen: set[str] = set()
            for other in self.registry.all():
                if other.namespaced and other.storage_key not in seen:
                    seen.add(other.storage_key)
                    for child in self.store.list_objects(other.storage_key, name):
                        self._remove(other, child, "Background")
        if rt.storage_key == "apiextensions.k8s.io/customresourcedefinitions":
            types = self.registry.remove_crd(name)
            keys = {t.storage_key for t in types}
            for key in keys:
                for child in self.store.list_objects(key):
                    self.store.remove(key, (child["metadata"].get("namespace") or ""), child["metadata"]["name"])
        gone = self.store.remove(rt.storage_key, ns, name) or obj
        if policy != "Orphan" and meta.get("uid"):
            self._collect_dependents(meta["uid"])
        return gone

    def _collect_dependents(self, uid: str) -> None:
        for key in self.store.storage_keys():
            types = self.registry.types_of(key)
            if not types:
                continue
            for child in self.store.list_objects(key):
                refs = child["metadata"].get("ownerReferences") or []
                if any(r.get("uid") == uid for r in refs if isinstance(r, dict)):
                    self._remove(types[0], child, "Background")

    def _delete_collection(self, req: Request, rt: ResourceType, namespace: str | None) -> Response:
        opts = self._options(req)
        labels, fields = self._selectors(req, rt)
        with self.store.lock, self.store.batch():
            items = [o for o in self.store.list_objects(rt.storage_key, namespace)
                     if selectors.match_labels(labels, o) and selectors.match_fields(fields, o)]
            if rt.storage_key == "/namespaces":
                items = [o for o in items if o["metadata"]["name"] not in PROTECTED_NAMESPACES]
            if not opts.dry_run:
                for obj in items:
                    self._remove(rt, obj, "Background")
        return json_response(200, {"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                                   "metadata": {"resourceVersion": str(self.store.rv)},
                                   "items": [self._out(rt, o, in_list=True) for o in items]})

    def _evict(self, req: Request, rt: ResourceType, ns: str, name: str) -> Response:
        body = self._decode(req)
        if body.get("kind") not in (None, "Eviction"):
            raise bad_request(f"the kind in the data ({body.get('kind')}) does not match the expected kind (Eviction)")
        with self.store.lock, self.store.batch():
            pod = self._get_or_404(rt, ns, name)
            self._remove(rt, pod, "Background")
        return json_response(201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                   "code": 201})

    # ============================================================================ controller hooks
    def _on_create(self, rt: ResourceType, obj: JSONObj) -> None:
        key = rt.storage_key
        meta = obj["metadata"]
        if key == "/namespaces":
            obj["status"] = {"phase": "Active"}
        elif key == "/pods":
            obj["status"] = {"phase": "Pending", "qosClass": _qos_class(obj)}
        elif key in ("/persistentvolumeclaims", "/persistentvolumes"):
            obj["status"] = {"phase": "Pending"}
            spec = obj.setdefault("spec", {})
            if key == "/persistentvolumeclaims" and "storageClassName" not in spec:
                # The DefaultStorageClass admission plugin: a claim without a class gets the default one.
                default = [sc["metadata"]["name"] for sc in self.store.list_objects("storage.k8s.io/storageclasses")
                           if (sc["metadata"].get("annotations") or {}).get(
                               "storageclass.kubernetes.io/is-default-class") == "true"]
                if default:
                    spec["storageClassName"] = sorted(default)[0]
        elif key == "/services":
            self._allocate_service(obj, None)
            obj["status"] = {"loadBalancer": {}}
        elif key == "/nodes":
            self._allocate_pod_cidr(obj)
        elif key == "batch/jobs":
            uid = meta["uid"]
            spec = obj.setdefault("spec", {})
            job_labels = {"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": meta["name"],
                          "controller-uid": uid, "job-name": meta["name"]}
            if not spec.get("manualSelector"):
                spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
                template_meta = spec.setdefault("template", {}).setdefault("metadata", {})
                template_meta.setdefault("labels", {}).update(job_labels)
        elif key == "apiextensions.k8s.io/customresourcedefinitions":
            obj["status"] = _crd_status(obj)
        if rt.status and rt.crd is None:
            # A built-in kind's status is a Go struct, which encoding/json never omits: the API server answers
            # `status: {}` for a Deployment no controller has looked at yet, where a custom resource has none.
            obj.setdefault("status", {})

    def _after_create(self, rt: ResourceType, obj: JSONObj) -> None:
        key = rt.storage_key
        if key == "/namespaces":
            self.ensure_namespace_defaults(obj["metadata"]["name"])
        elif key == "apiextensions.k8s.io/customresourcedefinitions":
            self.registry.set_crd(obj)

    def ensure_namespace_defaults(self, ns: str) -> None:
        """What controllers put in every namespace: the default ServiceAccount and kube-root-ca.crt."""
        opts = WriteOptions(manager="kube-controller-manager", dry_run=False, field_validation="Strict")
        sa_rt, cm_rt = self.registry.get("", "v1", "serviceaccounts"), self.registry.get("", "v1", "configmaps")
        assert sa_rt is not None and cm_rt is not None
        if self.store.get(sa_rt.storage_key, ns, "default") is None:
            self.create_object(sa_rt, {"metadata": {"name": "default", "namespace": ns}}, opts)
        if self.store.get(cm_rt.storage_key, ns, "kube-root-ca.crt") is None:
            self.create_object(cm_rt, {"metadata": {"name": "kube-root-ca.crt", "namespace": ns,
                                                    "annotations": {"kubernetes.io/description": (
                                                        "Contains a CA bundle that can be used to verify the "
                                                        "kube-apiserver when using internal endpoints such as the "
                                                        "internal service IP or kubernetes.default.svc. No other "
                                                        "usage is guaranteed across distributions of Kubernetes "
                                                        "clusters.")}},
                                       "data": {"ca.crt": self.info.ca_pem.decode()}}, opts)

    def _on_update(self, rt: ResourceType, old: JSONObj, new: JSONObj) -> None:
        key = rt.storage_key
        if key == "/services":
            self._allocate_service(new, old)
        elif key == "/nodes":
            spec = new.setdefault("spec", {})
            old_spec = old.get("spec") or {}
            if old_spec.get("podCIDR") and not spec.get("podCIDR"):
                spec["podCIDR"], spec["podCIDRs"] = old_spec["podCIDR"], old_spec.get("podCIDRs",
                                                                                     [old_spec["podCIDR"]])
            if not spec.get("podCIDR"):
                self._allocate_pod_cidr(new)
        elif key == "apiextensions.k8s.io/customresourcedefinitions":
            new["status"] = _crd_status(new, old.get("status"))
            self.registry.set_crd(new)
        elif key == "batch/jobs":
            old_spec = old.get("spec") or {}
            spec = new.setdefault("spec", {})
            if "selector" in old_spec and "selector" not in spec:
                spec["selector"] = old_spec["selector"]

    def _allocate_pod_cidr(self, node: JSONObj) -> None:
        spec = node.setdefault("spec", {})
        if spec.get("podCIDR"):
            spec.setdefault("podCIDRs", [spec["podCIDR"]])
            return
        name = node["metadata"]["name"]
        ipam: dict[str, str] = self.store.extra.setdefault("nodeIPAM", {})
        cidr = ipam.get(name)
        if cidr is None:
            used = set(ipam.values())
            for nobj in self.store.list_objects("/nodes"):
                used.add(str((nobj.get("spec") or {}).get("podCIDR", "")))
            subnets = self.info.cluster_cidr.subnets(new_prefix=24) if self.info.cluster_cidr.prefixlen <= 24 else \
                iter([self.info.cluster_cidr])
            cidr = next((str(s) for s in subnets if str(s) not in used), None)
            if cidr is None:
                raise ApiError(500, "InternalError", f"no pod CIDR left in {self.info.cluster_cidr} for node {name}")
            ipam[name] = cidr
            self.store.mark_dirty()
        spec["podCIDR"], spec["podCIDRs"] = cidr, [cidr]

    def _allocate_service(self, svc: JSONObj, old: JSONObj | None) -> None:  # noqa: PLR0912, PLR0915
        rt = self.registry.get("", "v1", "services")
        assert rt is not None
        spec = svc.setdefault("spec", {})
        name = svc["metadata"]["name"]
        if spec.get("type") == "ExternalName":
            spec.pop("clusterIP", None)
            spec.pop("clusterIPs", None)
            return
        old_spec = (old or {}).get("spec") or {}
        if old is not None and old_spec.get("clusterIP") and not spec.get("clusterIP"):
            spec["clusterIP"] = old_spec["clusterIP"]
        used_ips: set[str] = set()
        used_ports: set[int] = set()
        for other in self.store.list_objects("/services"):
            if other["metadata"].get("uid") == svc["metadata"].get("uid"):
                continue
            ospec = other.get("spec") or {}
            used_ips.update(ospec.get("clusterIPs") or [ospec.get("clusterIP", "")])
            used_ports.update(int(p.get("nodePort")) for p in ospec.get("ports") or [] if p.get("nodePort"))
        cidr = self.info.service_cidr
        ip = spec.get("clusterIP")
        if ip and ip != "None":
            if old_spec.get("clusterIP") != ip:
                try:
                    addr = ipaddress.ip_address(ip)
                except ValueError:
                    addr = None
                if addr is None or addr not in cidr:
                    raise invalid(rt, name, [schemas.FieldError(
                        "invalid", "spec.clusterIPs", "FieldValueInvalid",
                        f"spec.clusterIPs: Invalid value: []string{{\"{ip}\"}}: failed to allocate IP {ip}: the "
                        f"provided IP ({ip}) is not in the valid range. The range of valid IPs is {cidr}")])
                if ip in used_ips:
                    raise invalid(rt, name, [schemas.FieldError(
                        "invalid", "spec.clusterIPs", "FieldValueInvalid",
                        f"spec.clusterIPs: Invalid value: []string{{\"{ip}\"}}: failed to allocate IP {ip}: "
                        "provided IP is already allocated")])
        elif not ip:
            static_band = min(max(16, cidr.num_addresses // 16), 256)
            start = int(cidr.network_address) + static_band
            chosen = None
            for value in range(start, int(cidr.broadcast_address)):
                candidate = str(ipaddress.IPv4Address(value))
                if candidate not in used_ips:
                    chosen = candidate
                    break
            if chosen is None:
                raise ApiError(500, "InternalError", "failed to allocate a serviceIP: range is full")
            spec["clusterIP"] = ip = chosen
        spec["clusterIPs"] = [ip]
        if spec.get("type") in ("NodePort", "LoadBalancer") and spec.get("allocateLoadBalancerNodePorts", True):
            old_ports = {(p.get("port"), p.get("protocol")): p.get("nodePort") for p in old_spec.get("ports") or []}
            next_port = 30000
            for port in spec.get("ports") or []:
                if port.get("nodePort"):
                    continue
                previous = old_ports.get((port.get("port"), port.get("protocol")))
                if previous:
                    port["nodePort"] = previous
                    continue
                while next_port in used_ports:
                    next_port += 1
                port["nodePort"] = next_port
                used_ports.add(next_port)


def _spec_part(obj: JSONObj) -> str:
    return json.dumps({k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")},
                      sort_keys=True)


def _same(a: JSONObj, b: JSONObj) -> bool:
    def norm(o: JSONObj) -> str:
        o = copy.deepcopy(o)
        o.pop("apiVersion", None)
        o.pop("kind", None)
        o.get("metadata", {}).pop("resourceVersion", None)
        return json.dumps(o, sort_keys=True)

    return norm(a) == norm(b)


def _sort_key(obj: JSONObj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


def _qos_class(pod: JSONObj) -> str:
    containers = ((pod.get("spec") or {}).get("containers")) or []
    resources = [c.get("resources") or {} for c in containers if isinstance(c, dict)]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    if all(r.get("limits") and (not r.get("requests") or r.get("requests") == r.get("limits")) for r in resources):
        return "Guaranteed"
    return "Burstable"


def _crd_status(crd: JSONObj, old_status: JSONObj | None = None) -> JSONObj:
    spec = crd.get("spec") or {}
    names = copy.deepcopy(spec.get("names") or {})
    if names.get("kind"):
        names.setdefault("singular", str(names["kind"]).lower())
        names.setdefault("listKind", f"{names['kind']}List")
    stored = list((old_status or {}).get("storedVersions") or [])
    for ver in spec.get("versions") or []:
        if isinstance(ver, dict) and ver.get("storage") and ver.get("name") not in stored:
            stored.append(ver["name"])
    now = rfc3339()
    old_conditions = {c.get("type"): c for c in (old_status or {}).get("conditions") or [] if isinstance(c, dict)}

    def cond(kind: str, reason: str, message: str) -> JSONObj:
        previous = old_conditions.get(kind)
        return {"type": kind, "status": "True", "lastTransitionTime":
                previous.get("lastTransitionTime", now) if previous else now, "reason": reason, "message": message}

    return {"conditions": [cond("NamesAccepted", "NoConflicts", "no conflicts found"),
                           cond("Established", "InitialNamesAccepted", "the initial names have been accepted")],
            "acceptedNames": names, "storedVersions": stored}

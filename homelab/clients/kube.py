"""The cluster through the official kubernetes client: server-side apply, listing by label, CRD waits.

Reads are one list per kind (label-selected), so API calls grow with the kinds a layer uses,
not with its objects. Writes are server-side apply under one field manager.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from homelab.errors import ConfigError, HomelabError
from homelab.wait import Progress, poll

FIELD_MANAGER = "homelab"
MANAGED_BY = "app.kubernetes.io/managed-by"
COMPONENT = "homelab.jigga.xyz/component"


class KubeError(HomelabError):
    """The Kubernetes API refused a request or did not answer."""


def identity(obj: dict[str, Any]) -> tuple[str, str, str, str]:
    meta = obj.get("metadata", {})
    return obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"]


def describe(obj: dict[str, Any]) -> str:
    _, kind, ns, name = identity(obj)
    return f"{kind} {ns + '/' if ns else ''}{name}"


def contains(actual: Any, desired: Any) -> bool:
    """True if every field the desired object sets has that value in the actual one (lists: same length,
    elementwise); fields the server adds (status, defaults, managedFields) do not count."""
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(contains(actual.get(k), v) for k, v in desired.items())
    if isinstance(desired, list):
        return (isinstance(actual, list) and len(actual) == len(desired)
                and all(contains(a, d) for a, d in zip(actual, desired, strict=True)))
    return bool(actual == desired) or (isinstance(desired, int | float) and str(actual) == str(desired))


class Kube:
    """REST calls through the official client's ApiClient (auth, TLS, retries), with a discovery cache.

    Each kind's path comes from its group version's resource list, fetched once and cached on
    the operator's side, so a no-op run costs one list per kind and nothing else.
    """

    def __init__(self, kubeconfig: Path, context: str, cache_dir: Path) -> None:
        from kubernetes import config

        try:
            self.api = config.new_client_from_config(config_file=str(kubeconfig), context=context)  # type: ignore[no-untyped-call, unused-ignore]
        except Exception as exc:  # ConfigException and friends
            raise ConfigError(f"cannot use the kubeconfig {kubeconfig}: {exc}",
                              hint="run the k3s layer first (invoke up --to k3s)") from None
        self.calls = 0
        self._cache_file = cache_dir / "kinds.json"
        try:
            self._kinds: dict[str, list[Any]] = json.loads(self._cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._kinds = {}

    # ------------------------------------------------------------------ REST

    def request(self, method: str, path: str, *, query: dict[str, str] | None = None, body: Any = None,
                content_type: str = "application/json") -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        self.calls += 1
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            method, url, headers, payload, _ = self.api.param_serialize(
                method=method, resource_path=path, query_params=list((query or {}).items()), header_params=headers,
                body=body, auth_settings=["BearerToken"])
            response = self.api.call_api(method, url, header_params=headers, body=payload, _request_timeout=30)
            response.read()
        except ApiException as exc:
            raise KubeError(f"{method} {path}: {exc.status} {_reason(exc)}") from None
        except (HTTPError, OSError) as exc:
            raise KubeError(f"the Kubernetes API does not answer: {str(exc).splitlines()[0]}") from None
        if response.status == 404 and method == "GET":
            return None
        text = response.data.decode("utf-8", "replace") if response.data else ""
        if not 200 <= response.status < 300:
            raise KubeError(f"{method} {path}: {response.status} {_message(text)}")
        return json.loads(text) if text else None

    def resource(self, api_version: str, kind: str, refresh: bool = False) -> tuple[str, bool] | None:
        """(collection path prefix, namespaced) of a kind, or None when the API does not serve it."""
        key = f"{api_version}/{kind}"
        if key in self._kinds and not refresh:
            base, namespaced = self._kinds[key]
            return str(base), bool(namespaced)
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        listing = self.request("GET", base)
        for item in (listing or {}).get("resources", []):
            if item.get("kind") == kind and "/" not in item.get("name", ""):
                self._kinds[key] = [f"{base}/{item['name']}", bool(item.get("namespaced"))]
                with contextlib.suppress(OSError):
                    self._cache_file.write_text(json.dumps(self._kinds), encoding="utf-8")
                return f"{base}/{item['name']}", bool(item.get("namespaced"))
        return None

    def _path(self, obj: dict[str, Any]) -> str:
        api_version, kind, ns, name = identity(obj)
        found = self.resource(api_version, kind)
        if found is None:
            found = self.resource(api_version, kind, refresh=True)
        if found is None:
            raise KubeError(f"{describe(obj)}: the cluster does not serve {api_version} {kind}",
                            hint="its CRD is missing: is the chart that brings it installed?")
        base, namespaced = found
        if namespaced:
            group, _, plural = base.rpartition("/")
            return f"{group}/namespaces/{ns or 'default'}/{plural}/{name}"
        return f"{base}/{name}"

    # --------------------------------------------------------------- verbs

    def list(self, api_version: str, kind: str, selector: str) -> list[dict[str, Any]]:
        found = self.resource(api_version, kind)
        if found is None:
            return []
        data = self.request("GET", found[0], query={"labelSelector": selector})
        if data is None:  # a cached kind whose CRD went away
            self._kinds.pop(f"{api_version}/{kind}", None)
            return []
        return [dict(item, apiVersion=api_version, kind=kind) for item in data.get("items", [])]

    def get(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        data = self.request("GET", self._path(obj))
        return dict(data) if data else None

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        data = self.request("PATCH", self._path(obj), query={"fieldManager": FIELD_MANAGER, "force": "true"},
                            body=obj, content_type="application/apply-patch+yaml")
        return dict(data or {})

    def delete(self, obj: dict[str, Any]) -> None:
        try:
            path = self._path(obj)
        except KubeError:
            return
        with contextlib.suppress(KubeError):
            self.request("DELETE", path)
        # Gone, or going (finalizers, such as a HelmChart's uninstall, still run): both are fine.
        current = self.get(obj)
        if current is not None and not (current.get("metadata") or {}).get("deletionTimestamp"):
            raise KubeError(f"{describe(obj)} is still there after DELETE")

    def wait_served(self, kinds: Iterable[tuple[str, str]], progress: Progress, timeout: float) -> None:
        """Wait until the API serves every (apiVersion, kind): their CRDs are established."""
        missing = list(dict.fromkeys(kinds))

        def probe() -> tuple[bool | None, str]:
            left = [f"{v} {k}" for v, k in missing if self.resource(v, k, refresh=True) is None]
            return (True if not left else None), "not served yet: " + ", ".join(left)

        if missing and any(self.resource(v, k) is None for v, k in missing):
            poll("CRDs established: " + ", ".join(k for _, k in missing), probe, timeout=timeout, progress=progress,
                 first=0.5, maximum=3)


def _message(text: str) -> str:
    try:
        return str(json.loads(text).get("message", text))[:400]
    except (ValueError, AttributeError):
        return text[:400]


def _reason(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if body:
        import json

        try:
            return str(json.loads(body).get("message", body))[:400]
        except (ValueError, AttributeError):
            return str(body)[:400]
    return str(exc).splitlines()[0][:400] if str(exc) else type(exc).__name__

"""App doubles: what answers behind an Ingress backend in the stand-in, since it runs no containers.

The ingress double (ingress.py) routes a request to a backend Service; this module answers for the
app behind it:

- which app: the Service's annotations `lab.homelab.jigga.xyz/app` and `.../health`, which the HelmChart
  double writes on the Services a chart makes (data: charts/apps.json "services"), or else the image of
  the Deployment the Service selects (charts/apps.json "images": repository -> app and health path);
- whether it is up: a Deployment selected by the Service has a ready replica; otherwise 503 "no
  available server", as Traefik answers for a Service without ready endpoints;
- its health endpoint: 200 with the app's usual body (Vaultwarden /alive, Grafana /api/health, ArgoCD
  /healthz, Prometheus and Alertmanager /-/healthy, Loki /ready, Homepage /); other paths of a known app
  404, so a wrong path or a backend of the wrong app shows; an unknown backend answers a small JSON page;
- Vault's seal lifecycle (https://developer.hashicorp.com/vault/api-docs/system/init, .../unseal,
  .../health): GET /v1/sys/health is 501 until initialised, 503 while sealed, 200 when unsealed;
  PUT /v1/sys/init gives key shares and a root token once; PUT /v1/sys/unseal takes shares until the
  threshold. The double keeps only SHA-256 hashes of keys and token, under the data dir, so that a
  restart of the node keeps the state (a real Vault's storage is on its PVC).
- a fault: the Service annotation `lab.homelab.jigga.xyz/fault: "502"` makes the app answer 502 (the
  lab's fault catalog uses it for "an app double answering 502").
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ingress import IngressController
    from .log import Log

JSONObj = dict[str, Any]
APP_ANNOTATION = "lab.homelab.jigga.xyz/app"
HEALTH_ANNOTATION = "lab.homelab.jigga.xyz/health"
FAULT_ANNOTATION = "lab.homelab.jigga.xyz/fault"
Reply = tuple[int, bytes, str]


def load_apps(charts: Path) -> JSONObj:
    path = charts / "apps.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"services": {}, "images": {}}
    return data if isinstance(data, dict) else {"services": {}, "images": {}}


def _json(status: int, body: Any) -> Reply:
    return status, json.dumps(body).encode(), "application/json"


def _text(status: int, body: str) -> Reply:
    return status, body.encode(), "text/plain; charset=utf-8"


HOMEPAGE = "<!doctype html><html><head><title>Homepage</title></head><body>homepage</body></html>"
# app -> (content type, body) of its health endpoint when up; None: computed (Vaultwarden's timestamp).
HEALTH_BODIES: dict[str, tuple[str, str] | None] = {
    "vaultwarden": None,
    "grafana": ("application/json", json.dumps({"database": "ok", "version": "standin", "commit": "standin"})),
    "argocd": ("text/plain; charset=utf-8", "ok"),
    "prometheus": ("text/plain; charset=utf-8", "Prometheus Server is Healthy.\n"),
    "alertmanager": ("text/plain; charset=utf-8", "OK"),
    "loki": ("text/plain; charset=utf-8", "ready\n"),
    "homepage": ("text/html; charset=utf-8", HOMEPAGE),
}


def health_reply(app: str, path: str) -> Reply:
    """What each app's health endpoint answers when it is up (its real body, shortened)."""
    if app not in HEALTH_BODIES:
        return _json(200, {"status": "ok", "app": app, "path": path})
    known = HEALTH_BODIES[app]
    if known is None:  # Vaultwarden's /alive: the current time as a JSON string
        return _json(200, datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
    content_type, body = known
    return 200, body.encode(), content_type


class Vault:
    """One Vault server's seal state (per backend Service), persisted as hashes."""

    def __init__(self, path: Path, log: Log) -> None:
        self.path = path
        self.log = log
        self.lock = threading.Lock()

    def _load(self) -> JSONObj:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:  # a new Vault: its storage is empty
            return {}
        except (OSError, ValueError) as exc:  # unreadable storage reads as uninitialised, as Vault's would: say so
            self.log.error(f"vault double: cannot read {self.path.name}: {type(exc).__name__}: {exc}")
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, state: JSONObj) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        tmp.replace(self.path)

    @staticmethod
    def _seal_status(state: JSONObj) -> JSONObj:
        return {"type": "shamir", "initialized": bool(state.get("initialized")),
                "sealed": state.get("sealed", True), "t": state.get("threshold", 0), "n": state.get("shares", 0),
                "progress": len(state.get("progress", [])), "nonce": "", "version": "1.20.4",
                "build_date": "2025-09-23T00:00:00Z", "migration": False, "recovery_seal": False,
                "storage_type": "file"}

    def handle(self, method: str, path: str, body: bytes) -> Reply:  # noqa: PLR0911, PLR0912 - one branch per endpoint
        with self.lock:
            state = self._load()
            if path == "/v1/sys/health":
                if not state.get("initialized"):
                    return _json(501, {"initialized": False, "sealed": True, "standby": True})
                if state.get("sealed", True):
                    return _json(503, {"initialized": True, "sealed": True, "standby": True})
                return _json(200, {"initialized": True, "sealed": False, "standby": False,
                                   "performance_standby": False, "replication_performance_mode": "disabled",
                                   "replication_dr_mode": "disabled", "server_time_utc": 0,
                                   "version": "1.20.4", "cluster_name": "vault-cluster-standin"})
            if path == "/v1/sys/seal-status" and method == "GET":
                return _json(200, self._seal_status(state))
            if path == "/v1/sys/init" and method == "GET":
                return _json(200, {"initialized": bool(state.get("initialized"))})
            try:
                request = json.loads(body or b"{}")
            except ValueError:
                return _json(400, {"errors": ["failed to parse JSON input"]})
            if path == "/v1/sys/init" and method in ("PUT", "POST"):
                if state.get("initialized"):
                    return _json(400, {"errors": ["Vault is already initialized"]})
                shares, threshold = request.get("secret_shares"), request.get("secret_threshold")
                if not isinstance(shares, int) or not isinstance(threshold, int) or not 1 <= threshold <= shares:
                    return _json(400, {"errors": ["invalid seal configuration: threshold must be between 1 and "
                                                  "the number of shares"]})
                keys = [secrets.token_bytes(32) for _ in range(shares)]
                token = "hvs." + secrets.token_urlsafe(18)
                self._save({"initialized": True, "sealed": True, "shares": shares, "threshold": threshold,
                            "keys": [hashlib.sha256(k).hexdigest() for k in keys],
                            "root": hashlib.sha256(token.encode()).hexdigest(), "progress": []})
                self.log.info(f"vault double: {self.path.name}: initialised ({shares} shares, threshold {threshold})")
                return _json(200, {"keys": [k.hex() for k in keys],
                                   "keys_base64": [base64.b64encode(k).decode() for k in keys], "root_token": token})
            if path == "/v1/sys/unseal" and method in ("PUT", "POST"):
                if not state.get("initialized"):
                    return _json(400, {"errors": ["Vault is not initialized"]})
                if request.get("reset"):
                    state["progress"] = []
                    self._save(state)
                    return _json(200, self._seal_status(state))
                if not state.get("sealed", True):
                    return _json(200, self._seal_status(state))
                raw = str(request.get("key") or "")
                try:
                    key = bytes.fromhex(raw) if len(raw) == 64 else base64.b64decode(raw, validate=True)
                except ValueError:
                    return _json(400, {"errors": ["'key' must be a valid hex or base64 string"]})
                digest = hashlib.sha256(key).hexdigest()
                if digest not in state.get("keys", []):
                    return _json(400, {"errors": ["Error unsealing: failed to decrypt keys from storage"]})
                if digest not in state["progress"]:
                    state["progress"].append(digest)
                if len(state["progress"]) >= int(state["threshold"]):
                    state["sealed"], state["progress"] = False, []
                    self.log.info(f"vault double: {self.path.name}: unsealed")
                self._save(state)
                return _json(200, self._seal_status(state))
            if path == "/v1/sys/seal" and method in ("PUT", "POST"):
                state["sealed"], state["progress"] = True, []
                self._save(state)
                return 204, b"", "application/json"
            return _json(404, {"errors": []})


class AppDoubles:
    def __init__(self, owner: IngressController, data_dir: Path, charts: Path) -> None:
        self.owner = owner
        self.data_dir = data_dir
        self.charts = charts
        self._vaults: dict[str, Vault] = {}
        self._lock = threading.Lock()

    def _index(self) -> JSONObj:
        return load_apps(self.charts)

    def identify(self, service: JSONObj) -> tuple[str | None, str | None, list[JSONObj]]:
        """(app, health path, the Deployments the Service selects) for a backend Service."""
        meta = service["metadata"]
        annotations: Mapping[str, str] = meta.get("annotations") or {}
        selector = (service.get("spec") or {}).get("selector") or {}
        deployments = []
        if selector:
            for dep in self.owner.ctl.list_of("apps", "v1", "deployments", meta["namespace"]):
                labels = ((dep.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels") or {}
                if all(labels.get(k) == v for k, v in selector.items()):
                    deployments.append(dep)
        if annotations.get(APP_ANNOTATION):
            return annotations[APP_ANNOTATION], annotations.get(HEALTH_ANNOTATION), deployments
        images = self._index().get("images") or {}
        for dep in deployments:
            for container in ((dep.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []:
                repo = str(container.get("image") or "").rsplit("@", 1)[0]
                repo = repo.rsplit(":", 1)[0] if ":" in repo.rsplit("/", 1)[-1] else repo
                for known, traits in images.items():
                    if repo in (known, f"docker.io/{known}", f"docker.io/library/{known}"):
                        return str(traits.get("app")), str(traits.get("health") or "/"), deployments
        return None, None, deployments

    def respond(self, backend: JSONObj, method: str, path: str, body: bytes) -> Reply:  # noqa: PLR0911 - one per outcome
        service = self.owner.ctl.get_of("", "v1", "services", backend["namespace"], backend["name"])
        if service is None:
            return _text(503, "no available server")
        app, health, deployments = self.identify(service)
        if not any(((d.get("status") or {}).get("readyReplicas") or 0) > 0 for d in deployments):
            return _text(503, "no available server")
        fault = ((service["metadata"].get("annotations") or {}).get(FAULT_ANNOTATION) or "").strip()
        if fault.isdigit():
            return _text(int(fault), f"{fault} (lab fault)")
        if app == "vault" and path.startswith("/v1/"):
            # Vault's storage lives on its volume: a reinstalled Vault (a new Service) starts uninitialised.
            return self._vault({**backend, "uid": service["metadata"].get("uid", "")}).handle(method, path, body)
        if app and health and path == health:
            return health_reply(app, path)
        if app:  # a known app answers its health endpoint only: a wrong path or backend shows as 404
            return _text(404, f"404 page not found ({app} double: only {health})")
        return _json(200, {"app": app, "path": path, "method": method, "service": backend})

    def _vault(self, backend: JSONObj) -> Vault:
        key = f"{backend['namespace']}-{backend['name']}" + (f"-{backend['uid'][:8]}" if backend.get("uid") else "")
        with self._lock:
            if key not in self._vaults:
                path = self.data_dir / "server" / "standin-apps" / f"vault-{key}.json"
                self.owner.log_info(f"vault double: Service {backend['namespace']}/{backend['name']} "
                                    f"(uid {backend.get('uid') or '-'}) keeps its state in {path.name} "
                                    f"({'present' if path.exists() else 'new'})")
                self._vaults[key] = Vault(path, self.owner.ctl.log)
            return self._vaults[key]

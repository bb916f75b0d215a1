"""The Proxmox VE API through proxmoxer: API-token auth, verified TLS, typed errors, task waits.

Reads (GET) are retried on connection trouble because they change nothing; writes are not,
since a lost answer does not say whether PVE acted. A re-run of the layer resumes instead.
Every worker task is awaited by its UPID and judged by its exitstatus.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import requests
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException
from proxmoxer.tools import Tasks
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from homelab.errors import ProxmoxError, ProxmoxTaskFailed
from homelab.wait import Progress, poll

# Statuses PVE's proxy uses when a node is unreachable (595) or a request hit a busy node.
TRANSIENT = (requests.ConnectionError, requests.Timeout)


@dataclass
class Endpoint:
    host: str
    port: int = 8006
    label: str = ""

    def __str__(self) -> str:
        return f"{self.label or self.host} ({self.host}:{self.port})"


@dataclass
class Stats:
    """Requests sent, by method, for the recap and the benchmark."""

    requests: dict[str, int] = field(default_factory=dict)
    # (method, path, status) of every answer that was an error.
    refused: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.requests.values())


class Proxmox:
    """One API session to the first PVE host that answers; the others are tried in order."""

    def __init__(self, endpoints: list[Endpoint], token_id: str, token_secret: str, ca_bundle: str | bool,
                 timeout: float = 30.0, read_attempts: int = 4) -> None:
        if "!" not in token_id:
            raise ProxmoxError(f"API token id {token_id!r} is not of the form user@realm!name")
        self.endpoints = endpoints
        self._user, self._token_name = token_id.split("!", 1)
        self._secret = token_secret
        self._ca = ca_bundle
        self._timeout = timeout
        self._read_attempts = read_attempts
        self.stats = Stats()
        self._api: ProxmoxAPI | None = None
        self.endpoint: Endpoint | None = None

    # ------------------------------------------------------------------ session

    def _connect(self, endpoint: Endpoint) -> ProxmoxAPI:
        api = ProxmoxAPI(endpoint.host, port=endpoint.port, user=self._user, token_name=self._token_name,
                         token_value=self._secret, verify_ssl=self._ca, timeout=self._timeout, service="PVE")
        session = api._store["session"]
        session.hooks["response"].append(self._count)
        return api

    def _count(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        method = response.request.method or "?"
        self.stats.requests[method] = self.stats.requests.get(method, 0) + 1
        if response.status_code >= 400:
            path = urllib.parse.urlsplit(response.url).path
            self.stats.refused.append((method, path, response.status_code))

    @property
    def api(self) -> ProxmoxAPI:
        if self._api is None:
            self._api = self._connect(self.endpoints[0])
            self.endpoint = self.endpoints[0]
        return self._api

    def _failover(self) -> bool:
        """Move to the next endpoint; False when none is left."""
        index = self.endpoints.index(self.endpoint) if self.endpoint in self.endpoints else -1
        if index + 1 >= len(self.endpoints):
            return False
        self.endpoint = self.endpoints[index + 1]
        self._api = self._connect(self.endpoint)
        return True

    # ---------------------------------------------------------------- requests

    def _call(self, method: str, path: str, params: dict[str, Any]) -> Any:
        resource = self.api(path.lstrip("/"))
        try:
            return getattr(resource, method)(**params)
        except ResourceException as exc:
            raise _error(method, path, exc) from None
        except requests.exceptions.SSLError as exc:
            raise ProxmoxError(f"TLS verification of {self.endpoint} failed: {_short(exc)}",
                               hint="check the CA bundle of the target (PVE's pve-root-ca.pem)") from None

    def get(self, path: str, **params: Any) -> Any:
        """A read, retried with back-off on connection trouble, then tried on the next PVE host."""
        while True:
            try:
                for attempt in Retrying(retry=retry_if_exception_type(TRANSIENT), reraise=True,
                                        stop=stop_after_attempt(self._read_attempts),
                                        wait=wait_exponential(multiplier=0.2, max=3)):
                    with attempt:
                        return self._call("get", path, params)
            except TRANSIENT as exc:
                failed = self.endpoint
                if not self._failover():
                    raise ProxmoxError(f"no PVE host answers ({', '.join(map(str, self.endpoints))}): "
                                       f"{_short(exc)}") from None
                del failed

    def write(self, method: str, path: str, **params: Any) -> Any:
        """POST, PUT or DELETE, sent once: a lost answer is reported, never retried blindly."""
        params = {k: v for k, v in params.items() if v is not None}
        try:
            return self._call(method, path, params)
        except TRANSIENT as exc:
            raise ProxmoxError(f"{method.upper()} {path}: the connection to {self.endpoint} failed before PVE "
                               f"answered ({_short(exc)})",
                               hint="PVE may or may not have acted; run again: the layer reads the state "
                                    "and does only what is still missing") from None

    # ------------------------------------------------------------------- tasks

    def wait_task(self, upid: str, what: str, progress: Progress, timeout: float = 600.0) -> None:
        """Wait for a worker task; raise ProxmoxTaskFailed with PVE's message unless it ends OK."""
        node = Tasks.decode_upid(upid)["node"]

        def probe() -> tuple[dict[str, Any] | None, str]:
            status = self.get(f"/nodes/{node}/tasks/{upid}/status")
            if status.get("status") == "stopped":
                return status, "stopped"
            return None, str(status.get("status", "?"))

        status = poll(f"{what} (task on {node})", probe, timeout=timeout, progress=progress)
        exitstatus = str(status.get("exitstatus", ""))
        if exitstatus != "OK" and not exitstatus.startswith("WARNINGS"):
            log = self.get(f"/nodes/{node}/tasks/{upid}/log", start=0, limit=500)
            lines = [str(entry.get("t", "")) for entry in log][-8:]
            raise ProxmoxTaskFailed(upid, exitstatus, lines)

    def run_task(self, method: str, path: str, what: str, progress: Progress,
                 params: dict[str, Any] | None = None, *, timeout: float = 600.0) -> None:
        """Send a write that starts a worker task and wait for it to end OK."""
        upid = self.write(method, path, **(params or {}))
        if isinstance(upid, str) and upid.startswith("UPID:"):
            self.wait_task(upid, what, progress, timeout)


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."


def _error(method: str, path: str, exc: ResourceException) -> ProxmoxError:
    details = ""
    errors = getattr(exc, "errors", None)
    if isinstance(errors, dict) and errors:
        details = " (" + "; ".join(f"{k}: {str(v).strip()}" for k, v in sorted(errors.items())) + ")"
    message = (exc.content or exc.status_message or "").strip()
    hint = None
    if exc.status_code == 595:
        hint = "the PVE node in the path is offline or unreachable from the API host"
    elif exc.status_code == 401:
        hint = "check the API token id and secret of the target"
    elif "no quorum" in message:
        hint = "the PVE cluster has lost quorum; /etc/pve is read-only until it is back"
    return ProxmoxError(f"{method.upper()} {path}: {exc.status_code} {message}{details}",
                        status=exc.status_code, hint=hint)


def config_value(value: Any) -> str:
    """PVE config values as strings: fakepve and PVE disagree on numbers, so compare text."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def parse_props(value: str) -> dict[str, str]:
    """`virtio=AA:BB,bridge=vmbr0,firewall=1` -> {'virtio': 'AA:BB', 'bridge': 'vmbr0', ...}."""
    out: dict[str, str] = {}
    for part in str(value).split(","):
        if not part:
            continue
        key, sep, val = part.partition("=")
        out[key] = val if sep else ""
    return out


def join_props(items: Iterable[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v}" if v != "" else k for k, v in items)

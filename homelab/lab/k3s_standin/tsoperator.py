"""A Tailscale Kubernetes operator double: Connectors become devices of the (lab) tailnet through its API.

What the real operator (tailscale/tailscale cmd/k8s-operator, chart `tailscale-operator` from
https://pkgs.tailscale.com/helmcharts; https://tailscale.com/kb/1441/kubernetes-operator-connector) does, and
this double does without pods:

- It runs when a HelmChart of chart `tailscale-operator` is installed and its Deployment is available, with
  OAuth client credentials as the chart takes them: values `oauth.clientId` / `oauth.clientSecret` (the chart
  renders them into Secret `operator-oauth`), else a pre-created Secret `operator-oauth` (keys `client_id`,
  `client_secret`) in the release namespace. Without them the real operator cannot start: nothing happens.
- API endpoints as cmd/k8s-operator/tsclient.go: the token from `<base>/api/v2/oauth/token` and API calls to
  `<base>/api/v2/...`, where base is the chart value `loginServer` when set; otherwise the token comes from
  https://controlplane.tailscale.com (ipn.DefaultControlURL) and the API is https://api.tailscale.com.
  Names are resolved by the node's resolver; TLS is verified against `tailscale_api.ca_pem` of the release's
  `charts/outside.json` ($K3S_STANDIN_OUTSIDE overrides the file), else the system trust store.
- Per Connector (tailscale.com/v1alpha1, cluster-scoped): finalizer `tailscale.com/finalizer`; an auth key
  (POST /api/v2/tailnet/-/keys: reusable false, preauthorized true, tags = spec.tags or [tag:k8s]); the
  proxy's login, here POST <control>/lab/register with the key, hostname (spec.hostname, default
  `<name>-connector`) and spec.subnetRouter.advertiseRoutes (plus 0.0.0.0/0 and ::/0 for spec.exitNode); then
  heartbeats (POST <control>/lab/heartbeat) every few seconds while the Connector exists and the operator runs.
  The device's identity is kept, as the proxy's state Secret keeps it, in Secret `ts-<name>-connector-0` of the
  release namespace (keys device_id, device_fqdn, device_ips and the lab's heartbeat token).
- Status as connector.go: condition ConnectorReady True/ConnectorCreated (False/ConnectorCreationFailed with
  "Failed creating Connector: ..." when the API refuses, False/ConnectorInvalid for a spec without a subnet
  router or exit node), subnetRoutes (the routes joined by ","), isExitNode, hostname (the device's MagicDNS
  FQDN), tailnetIPs and devices[] (hostname, tailnetIPs).
- Deleting the Connector deletes its device (DELETE /api/v2/device/{id}) before the finalizer goes; so does
  uninstalling the chart here (the real proxies would linger until their Connectors go: the lab keeps no
  orphans). A device deleted from the tailnet behind the operator's back is registered anew.

Heartbeat interval: $K3S_STANDIN_TS_HEARTBEAT seconds (default 5; the lab API counts a device online for 15 s).
Standard library only; never disables TLS verification; secrets are registered with the log's redaction.
"""

from __future__ import annotations

import base64
import copy
import json
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .ingress import charts_dir

if TYPE_CHECKING:
    from .controllers import Controllers
    from .resources import ResourceType

JSONObj = dict[str, Any]
CHART = "tailscale-operator"
GROUP, VERSION, PLURAL = "tailscale.com", "v1alpha1", "connectors"
FINALIZER = "tailscale.com/finalizer"
MANAGER = "tailscale-operator"
DEFAULT_API = "https://api.tailscale.com"
DEFAULT_CONTROL = "https://controlplane.tailscale.com"
DEFAULT_TAGS = ("tag:k8s",)
READY = "ConnectorReady"
TIMEOUT = 5.0


class TsApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}" if status else message)
        self.status = status


def outside_file(env: Mapping[str, str]) -> Path:
    """$K3S_STANDIN_OUTSIDE, else charts/outside.json of the package (written by the lab's release)."""
    return Path(env.get("K3S_STANDIN_OUTSIDE") or charts_dir(env) / "outside.json")


def tailscale_ca(env: Mapping[str, str]) -> str | None:
    """`tailscale_api.ca_pem` of the outside file, or None (then the system trust store)."""
    try:
        data = json.loads(outside_file(env).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = data.get("tailscale_api") if isinstance(data, dict) else None
    pem = entry.get("ca_pem") if isinstance(entry, dict) else None
    return pem if isinstance(pem, str) and pem.strip() else None


class TsClient:
    """The operator's Tailscale API client: OAuth client credentials, token cached for its lifetime."""

    def __init__(self, api: str, control: str, client_id: str, client_secret: str, ca_pem: str | None) -> None:
        self.api, self.control = api.rstrip("/"), control.rstrip("/")
        self.client_id, self._secret = client_id, client_secret
        self._ctx = ssl.create_default_context(cadata=ca_pem) if ca_pem else ssl.create_default_context()
        self._token: tuple[str, float] | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.api, self.control, self.client_id, self._secret

    def _call(self, method: str, url: str, body: Any = None, form: Mapping[str, str] | None = None,
              token: str | None = None) -> Any:
        headers = {"Accept": "application/json", "User-Agent": "tailscale-k8s-operator"}
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - https only
        if not url.startswith("https://"):
            raise TsApiError(0, f"refusing a non-HTTPS Tailscale URL {url}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT, context=self._ctx) as resp:  # noqa: S310
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read() or b"{}")
            except ValueError:
                detail = {}
            text = detail.get("message") or detail.get("error") or exc.reason if isinstance(detail, dict) else ""
            raise TsApiError(exc.code, str(text)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TsApiError(0, f"{urllib.parse.urlsplit(url).netloc} unreachable: {reason}") from None
        return json.loads(raw) if raw.strip() else None

    def _bearer(self) -> str:
        if self._token is None or time.monotonic() >= self._token[1]:
            answer = self._call("POST", f"{self.control}/api/v2/oauth/token",
                                form={"client_id": self.client_id, "client_secret": self._secret})
            if not isinstance(answer, dict) or not answer.get("access_token"):
                raise TsApiError(0, "the token endpoint gave no access token")
            lifetime = float(answer.get("expires_in") or 3600)
            self._token = (str(answer["access_token"]), time.monotonic() + lifetime - min(60.0, lifetime / 10))
        return self._token[0]

    def api_call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            return self._call(method, self.api + path, body, token=self._bearer())
        except TsApiError as exc:
            if exc.status == 401:
                self._token = None
            raise

    def lab_call(self, path: str, body: JSONObj) -> Any:
        return self._call("POST", self.control + path, body)


class TailscaleOperator:
    """Reconciles Connectors while the tailscale-operator chart runs; a thread keeps the devices' heartbeats."""

    def __init__(self, ctl: Controllers, env: Mapping[str, str]) -> None:
        self.ctl, self.env = ctl, env
        self.interval = max(0.05, float(env.get("K3S_STANDIN_TS_HEARTBEAT") or 5.0))
        self.client: TsClient | None = None
        self.namespace: str | None = None
        self.devices: dict[str, JSONObj] = {}  # connector name -> {id, token, fqdn, ips, routes}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._said: dict[str, str] = {}

    # --- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat_loop, name="k3s-standin-tsoperator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _say(self, key: str, text: str, error: bool = False) -> None:
        if self._said.get(key) != text:
            self._said[key] = text
            (self.ctl.log.error if error else self.ctl.log.info)(f"tailscale-operator (stand-in): {text}")

    # --- the operator's own configuration
    def _chart(self) -> JSONObj | None:
        from .controllers import _chart_name

        rt = self.ctl.rt("helm.cattle.io", "v1", "helmcharts")
        charts = self.ctl.store.list_objects(rt.storage_key) if rt is not None else []
        return next((c for c in charts if _chart_name(c.get("spec") or {}) == CHART
                     and not c["metadata"].get("deletionTimestamp")), None)

    def _running_client(self) -> TsClient | None:
        chart = self._chart()
        if chart is None:
            return None
        meta, spec = chart["metadata"], chart.get("spec") or {}
        namespace = str(spec.get("targetNamespace") or meta["namespace"])
        deploy_rt = self.ctl.must_rt("apps", "v1", "deployments")
        deployment = self.ctl.store.get(deploy_rt.storage_key, namespace, meta["name"])
        if deployment is None or not ((deployment.get("status") or {}).get("availableReplicas") or 0):
            return None
        values = self.ctl.helm_values(chart)
        oauth = values.get("oauth")
        oauth = oauth if isinstance(oauth, dict) else {}
        client_id, secret = str(oauth.get("clientId") or ""), str(oauth.get("clientSecret") or "")
        if not client_id:
            stored = self.ctl.store.get(self.ctl.must_rt("", "v1", "secrets").storage_key, namespace, "operator-oauth")
            data = (stored or {}).get("data") or {}
            try:
                client_id = base64.b64decode(data.get("client_id") or "").decode().strip()
                secret = base64.b64decode(data.get("client_secret") or "").decode().strip()
            except ValueError:
                client_id = ""
        if not client_id or not secret:
            self._say("creds", f"no OAuth client: neither values oauth.clientId/clientSecret nor Secret "
                               f"{namespace}/operator-oauth (client_id, client_secret); the operator cannot start",
                      error=True)
            return None
        self.ctl.log.add_secrets([secret])
        login = str(values.get("loginServer") or "").rstrip("/")
        api, control = (login, login) if login else (DEFAULT_API, DEFAULT_CONTROL)
        self.namespace = namespace
        key = (api, control, client_id, secret)
        if self.client is None or self.client.key != key:
            self.client = TsClient(api, control, client_id, secret, tailscale_ca(self.env))
            self._say("creds", f"running with OAuth client {client_id} against {api}")
        return self.client

    # --- reconcile (the controllers' thread)
    def reconcile(self) -> None:
        rt = self.ctl.rt(GROUP, VERSION, PLURAL)
        client = self._running_client()
        connectors = self.ctl.store.list_objects(rt.storage_key) if rt is not None else []
        if client is None:
            if self.devices and self.client is not None:  # the chart went: its devices go too
                for name in list(self.devices):
                    self._delete_device(self.client, name)
            return
        assert rt is not None
        live = set()
        for cn in connectors:
            name = cn["metadata"]["name"]
            live.add(name)
            if cn["metadata"].get("deletionTimestamp"):
                self._finalize(rt, client, cn)
            else:
                self._provision(rt, client, cn)
        for name in list(self.devices):
            if name not in live:
                self._delete_device(client, name)

    def _finalize(self, rt: ResourceType, client: TsClient, cn: JSONObj) -> None:
        name = cn["metadata"]["name"]
        if FINALIZER not in (cn["metadata"].get("finalizers") or []):
            return
        self._load_state(name)
        if name in self.devices and not self._delete_device(client, name):
            return
        with self.ctl.store.lock:
            current = self.ctl.store.get(rt.storage_key, "", name)
            if current is None:
                return
            new = copy.deepcopy(current)
            new["metadata"]["finalizers"] = [f for f in current["metadata"].get("finalizers") or []
                                             if f != FINALIZER]
            self.ctl.update(rt, current, new, MANAGER)
        self.ctl.log.info(f"tailscale-operator (stand-in): Connector {name} resources cleaned up")

    def _provision(self, rt: ResourceType, client: TsClient, cn: JSONObj) -> None:
        meta, spec = cn["metadata"], cn.get("spec") or {}
        name = meta["name"]
        if FINALIZER not in (meta.get("finalizers") or []):
            new = copy.deepcopy(cn)
            new["metadata"].setdefault("finalizers", []).append(FINALIZER)
            cn = self.ctl.update(rt, cn, new, MANAGER)
        subnet = spec.get("subnetRouter") if isinstance(spec.get("subnetRouter"), dict) else None
        exit_node = spec.get("exitNode") is True
        routes = [str(r) for r in (subnet or {}).get("advertiseRoutes") or []]
        if subnet is None and not exit_node:
            message = ("Connector is invalid: invalid spec: a Connector must expose subnet routes or act as an exit "
                       "node (or both)")
            self._status(rt, cn, "False", "ConnectorInvalid", message, None)
            return
        advertised = routes + (["0.0.0.0/0", "::/0"] if exit_node else [])
        hostname = str(spec.get("hostname") or f"{name}-connector")
        tags = [str(t) for t in spec.get("tags") or DEFAULT_TAGS]
        self._load_state(name)
        state = self.devices.get(name)
        try:
            if state is not None and state["routes"] != advertised:
                client.lab_call("/lab/heartbeat", {"id": state["id"], "heartbeatToken": state["token"],
                                                   "advertiseRoutes": advertised})
                state["routes"] = advertised
            if state is None:
                state = self._register(client, name, hostname, tags, advertised)
        except TsApiError as exc:
            if exc.status == 404 and state is not None:  # deleted behind our back: log in again next time
                self._forget(name)
            message = f"Failed creating Connector: {exc}"
            self.ctl.event(cn, "Warning", "ConnectorCreationFailed", message, MANAGER)
            self._status(rt, cn, "False", "ConnectorCreationFailed", message, None)
            return
        self._status(rt, cn, "True", "ConnectorCreated", "ConnectorCreated", state, routes, exit_node)

    def _register(self, client: TsClient, name: str, hostname: str, tags: list[str],
                  routes: list[str]) -> JSONObj:
        key = client.api_call("POST", "/api/v2/tailnet/-/keys", {"capabilities": {"devices": {"create": {
            "reusable": False, "ephemeral": False, "preauthorized": True, "tags": tags}}},
            "description": f"tailscale-operator connector {name}"})
        auth_key = str((key or {}).get("key") or "")
        self.ctl.log.add_secrets([auth_key])
        device = client.lab_call("/lab/register", {"authKey": auth_key, "hostname": hostname,
                                                   "advertiseRoutes": routes})
        if not isinstance(device, dict) or not device.get("id"):
            raise TsApiError(0, "the login answered no device")
        token = str(device.get("heartbeatToken") or "")
        self.ctl.log.add_secrets([token])
        state = {"id": str(device["id"]), "token": token, "fqdn": str(device.get("name") or hostname),
                 "ips": [str(a) for a in device.get("addresses") or []], "routes": routes}
        with self._lock:
            self.devices[name] = state
        self._save_state(name, state)
        self.ctl.log.info(f"tailscale-operator (stand-in): Connector {name} is device {state['fqdn']} "
                          f"({state['id']}), advertising {', '.join(routes) or 'no routes'}")
        return state

    def _delete_device(self, client: TsClient, name: str) -> bool:
        state = self.devices.get(name)
        if state is None:
            return True
        try:
            client.api_call("DELETE", f"/api/v2/device/{urllib.parse.quote(state['id'], safe='')}")
        except TsApiError as exc:
            if exc.status != 404:
                self._say(f"delete/{name}", f"cannot delete device {state['id']} of Connector {name}: {exc}",
                          error=True)
                return False
        self.ctl.log.info(f"tailscale-operator (stand-in): deleted device {state['fqdn']} ({state['id']}) of "
                          f"Connector {name}")
        self._forget(name)
        return True

    def _forget(self, name: str, device_id: str | None = None) -> None:
        """Forget the Connector's device (only `device_id`, when given: a newer registration stays)."""
        with self._lock:
            current = self.devices.get(name)
            if device_id is not None and (current is None or current.get("id") != device_id):
                return
            self.devices.pop(name, None)
        if self.namespace is not None:
            self.ctl.delete(self.ctl.must_rt("", "v1", "secrets"), self.namespace, _state_name(name))

    def _status(self, rt: ResourceType, cn: JSONObj, status: str, reason: str, message: str,
                state: JSONObj | None, routes: list[str] | None = None, exit_node: bool = False) -> None:
        from .controllers import _cond

        previous = (cn.get("status") or {}).get("conditions")
        cond = {**_cond(READY, status, reason, message, previous),
                "observedGeneration": cn["metadata"].get("generation", 1)}
        new: JSONObj = {"conditions": [cond], "isExitNode": exit_node}
        if routes:
            new["subnetRoutes"] = ",".join(routes)
        if state is not None:
            new.update(hostname=state["fqdn"], tailnetIPs=list(state["ips"]),
                       devices=[{"hostname": state["fqdn"], "tailnetIPs": list(state["ips"])}])
        with self.ctl.store.lock:
            current = self.ctl.store.get(rt.storage_key, "", cn["metadata"]["name"])
            if current is not None:
                self.ctl.set_status(rt, current, new, MANAGER)

    # --- the state Secret (as the proxy's state Secret keeps device_id, device_fqdn, device_ips)
    def _load_state(self, name: str) -> None:
        if name in self.devices or self.namespace is None:
            return
        secret = self.ctl.store.get(self.ctl.must_rt("", "v1", "secrets").storage_key, self.namespace,
                                    _state_name(name))
        data = (secret or {}).get("data") or {}
        try:
            fields = {k: base64.b64decode(v).decode() for k, v in data.items()}
            state = {"id": fields["device_id"], "token": fields["lab_heartbeat_token"], "fqdn": fields["device_fqdn"],
                     "ips": json.loads(fields["device_ips"]), "routes": json.loads(fields["lab_routes"])}
        except (KeyError, ValueError):
            return
        self.ctl.log.add_secrets([state["token"]])
        with self._lock:
            self.devices[name] = state

    def _save_state(self, name: str, state: JSONObj) -> None:
        if self.namespace is None:
            return
        fields = {"device_id": state["id"], "device_fqdn": state["fqdn"], "device_ips": json.dumps(state["ips"]),
                  "lab_heartbeat_token": state["token"], "lab_routes": json.dumps(state["routes"])}
        self.ctl.ensure(self.ctl.must_rt("", "v1", "secrets"), {
            "metadata": {"name": _state_name(name), "namespace": self.namespace, "labels": {
                "tailscale.com/managed": "true", "tailscale.com/parent-resource": name,
                "tailscale.com/parent-resource-type": "connector"}},
            "type": "Opaque", "data": {k: base64.b64encode(v.encode()).decode() for k, v in fields.items()}}, MANAGER)

    # --- heartbeats (own thread)
    def _beat_loop(self) -> None:
        while not self._stop.wait(self.interval):
            client = self.client
            with self._lock:
                devices = list(self.devices.items())
            if client is None:
                continue
            for name, state in devices:
                try:
                    client.lab_call("/lab/heartbeat", {"id": state["id"], "heartbeatToken": state["token"]})
                except TsApiError as exc:
                    if exc.status == 404:  # the device was deleted from the tailnet: log in anew
                        self.ctl.log.info(f"tailscale-operator (stand-in): device {state['fqdn']} of Connector "
                                          f"{name} is gone from the tailnet; registering again")
                        self._forget(name, state["id"])
                    else:
                        self._say(f"beat/{name}", f"heartbeat of {state['fqdn']} failed: {exc}", error=True)
                    continue
                self._said.pop(f"beat/{name}", None)


def _state_name(connector: str) -> str:
    return f"ts-{connector}-connector-0"[:253]

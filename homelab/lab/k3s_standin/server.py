"""`k3s server`: TLS, tokens, kubeconfig, the API, the server's own Node, and the node lifecycle controller."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from . import config as cfg
from . import pki, systemd, tokens
from .api import Api, ApiError, ClusterInfo, Request, Response, WriteOptions, parse_rfc3339, rfc3339
from .controllers import Controllers, LbHook
from .helmcrds import helm_crds
from .ingress import IngressBind
from .kubelet import Kubelet, NodeParams, heartbeat_interval, node_grace
from .log import Log
from .resources import Registry
from .schemas import BuiltinSchemas
from .store import Store
from .transport import HttpsServer
from .version import kube_minor, read_version

UNREACHABLE_TAINT = "node.kubernetes.io/unreachable"


class StartupError(Exception):
    """K3s would log this as fatal and exit 1."""


def _ensure_secret_file(path: Path, make: str) -> str:
    if path.exists():
        text = path.read_text(encoding="utf-8").strip()
        if text:
            return text
    pki.write_private(path, (make + "\n").encode())
    return make


def kubeconfig(server_url: str, ca_pem: bytes, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Config", "preferences": {}, "current-context": "default",
        "clusters": [{"name": "default", "cluster": {
            "certificate-authority-data": base64.b64encode(ca_pem).decode(), "server": server_url}}],
        "contexts": [{"name": "default", "context": {"cluster": "default", "user": "default"}}],
        "users": [{"name": "default", "user": {"token": token}}],
    }


@dataclass
class ServerHandle:
    """A running server: `port`, `url`, `kubeconfig`, `ca_file`, `token`; `stop()` ends it."""

    port: int
    url: str
    kubeconfig: Path
    ca_file: Path
    data_dir: Path
    node_name: str
    token: str  # the cluster token in K3s's secure format, as in <data-dir>/server/token
    _server: Server

    def stop(self) -> None:
        self._server.stop()

    def ingress_port(self, ip: str, port: int) -> int | None:
        """The port the ingress double listens on for LoadBalancer `ip`:`port` (None: not listening)."""
        controllers = self._server.controllers
        return controllers.ingress.bound.get((ip, port)) if controllers is not None else None

    def wait(self) -> None:
        self._server.stopped.wait()


class Server:
    def __init__(self, settings: cfg.ServerSettings, raw: cfg.RawConfig, log: Log, env: Mapping[str, str],
                 on_lb_change: LbHook | None = None, ingress_bind: IngressBind | None = None) -> None:
        self.s, self.raw, self.log, self.env = settings, raw, log, env
        self.on_lb_change = on_lb_change
        self.ingress_bind = ingress_bind
        self.controllers: Controllers | None = None
        self.version = read_version()
        self.grace = node_grace(env)
        self.stopped = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.https: HttpsServer | None = None

    # ------------------------------------------------------------------------------------ start
    def start(self) -> ServerHandle:
        s, log = self.s, self.log
        log.info(f"Starting k3s {self.version} (stand-in)")
        for key in self.raw.unknown:
            log.warning(f"Unknown flag --{key} found in config.yaml, skipping")
        for key in sorted(set(self.raw.ignored)):
            log.debug(f"Flag --{key} has no effect on the k3s stand-in")
        if s.disable:
            log.info(f"Disabled packaged components: {', '.join(s.disable)} (the stand-in runs no add-ons)")
        server_dir = s.data_dir / "server"
        server_dir.mkdir(parents=True, exist_ok=True)
        server_dir.chmod(0o700)
        sans = ["127.0.0.1", "::1", "localhost", s.node_ip, s.advertise_address, *s.tls_sans, s.node_name,
                "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                f"kubernetes.default.svc.{s.cluster_domain}", s.first_service_ip]
        if s.node_external_ip:
            sans.append(s.node_external_ip)
        ca_file, cert_file, key_file = pki.ensure(s.data_dir, sans)
        self.ca_pem = ca_file.read_bytes()
        self.password, full_token = self._tokens(server_dir)
        self.admin_token = _ensure_secret_file(server_dir / "admin-token", secrets.token_urlsafe(32))
        log.add_secrets([self.password, full_token, self.admin_token])

        self.store = Store(server_dir / "db" / "state.json")
        loaded = self.store.load()
        self.registry = Registry()
        for crd in self.store.list_objects("apiextensions.k8s.io/customresourcedefinitions"):
            self.registry.set_crd(crd)
        schemas = BuiltinSchemas(kube_minor(self.version))
        if not schemas.available:
            log.warning("kubernetes-validate's schemas are not available: built-in kinds are not validated")
        else:
            log.info(f"Validating built-in kinds with the Kubernetes {schemas.version} schemas")
        self.https = HttpsServer(s.bind_address, s.port, self._handle, str(cert_file),
                                 str(key_file))
        port = self.https.port
        if s.port == 0:  # a free port was asked for: advertise the one we got
            s.port = port
            if s.advertise_port == 0:
                s.advertise_port = port
        advertise = f"{s.advertise_address}:{s.advertise_port}"
        info = ClusterInfo(version=self.version, ca_pem=self.ca_pem, service_cidr=s.service_cidr,
                           cluster_cidr=s.cluster_cidr, advertise=advertise, authenticate=self._authenticate)
        self.api = Api(self.store, self.registry, schemas, info, log)
        log.info(("Loaded" if loaded else "Initialized new") + f" cluster state in {self.store.path}")
        self._bootstrap()

        self.kubelet = Kubelet(self._local_call, NodeParams(
            name=s.node_name, internal_ip=s.node_ip, external_ip=s.node_external_ip, version=self.version,
            control_plane=True, labels=s.node_labels, taints=s.node_taints, node_args=s.node_args), log)
        self.kubelet.register()

        self.https.start()
        log.info(f"Running kube-apiserver (stand-in) on https://{s.bind_address}:{port}")
        kube_url = f"https://127.0.0.1:{port}"
        self._write_kubeconfig(kube_url)
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._lifecycle_loop, "node-lifecycle")):
            thread = threading.Thread(target=target, name=f"k3s-standin-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.controllers = Controllers(self.api, s.data_dir, log, self.env, self.on_lb_change, self.ingress_bind)
        self.controllers.start()
        systemd.notify("READY=1")
        log.info("k3s is up and running")
        return ServerHandle(port=port, url=kube_url, kubeconfig=s.write_kubeconfig, ca_file=ca_file,
                            data_dir=s.data_dir, node_name=s.node_name, token=full_token, _server=self)

    def _tokens(self, server_dir: Path) -> tuple[str, str]:
        token_file = server_dir / "token"
        configured = tokens.parse(self.s.token) if self.s.token else None
        stored = tokens.parse(token_file.read_text(encoding="utf-8")) if token_file.exists() else None
        if configured and configured.secure and configured.ca_hash != tokens.ca_hash(self.ca_pem):
            raise StartupError("token CA hash does not match the Cluster CA certificate hash")
        if configured and stored and not tokens.same(configured.password, stored.password):
            raise StartupError("bootstrap data already found and encrypted with different token")
        known = configured or stored
        password = known.password if known is not None else tokens.generate_password()
        full = tokens.secure(self.ca_pem, password)
        pki.write_private(token_file, (full + "\n").encode())
        node_token = server_dir / "node-token"
        if not node_token.is_symlink() and not node_token.exists():
            node_token.symlink_to("token")
        return password, full

    def _handle(self, req: Request) -> Response:
        return self.api.handle(req)

    def _authenticate(self, header: str) -> bool:  # noqa: PLR0911
        scheme, _, cred = header.strip().partition(" ")
        cred = cred.strip()
        if not cred:
            return False
        if scheme.lower() == "bearer":
            if tokens.same(cred, self.admin_token):
                return True
            tok = tokens.parse(cred)
            if tok.secure and tok.ca_hash != tokens.ca_hash(self.ca_pem):
                return False
            return tokens.same(tok.password, self.password)
        if scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(cred).decode().partition(":")
            except ValueError:
                return False
            return tokens.same(password, self.password)
        return False

    def _write_kubeconfig(self, url: str) -> None:
        path = self.s.write_kubeconfig
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(kubeconfig(url, self.ca_pem, self.admin_token), default_flow_style=False)
        pki.write_private(path, text.encode(), self.s.write_kubeconfig_mode)
        self.log.info(f"Wrote kubeconfig {path}")

    def _local_call(self, method: str, path: str, body: Any, content_type: str) -> tuple[int, Any]:
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(path)
        req = Request(method=method, path=parts.path, query=parse_qs(parts.query),
                      headers={"Authorization": f"Bearer {self.admin_token}", "Content-Type": content_type,
                               "User-Agent": f"k3s/{self.version}"},
                      body=json.dumps(body).encode() if body is not None else b"")
        resp = self.api.handle(req)
        try:
            return resp.status, json.loads(resp.body) if resp.body else None
        except ValueError:
            return resp.status, resp.body.decode(errors="replace")

    # -------------------------------------------------------------------------- built-in objects
    def _bootstrap(self) -> None:
        api, s = self.api, self.s
        opts = WriteOptions(manager="k3s", dry_run=False, field_validation="Strict")
        ns_rt = self.registry.get("", "v1", "namespaces")
        svc_rt = self.registry.get("", "v1", "services")
        ep_rt = self.registry.get("", "v1", "endpoints")
        eps_rt = self.registry.get("discovery.k8s.io", "v1", "endpointslices")
        assert ns_rt and svc_rt and ep_rt and eps_rt
        with self.store.lock, self.store.batch():
            for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
                if self.store.get(ns_rt.storage_key, "", ns) is None:
                    api.create_object(ns_rt, {"metadata": {"name": ns}}, opts)
                else:
                    api.ensure_namespace_defaults(ns)
                    cm = self.store.get("/configmaps", ns, "kube-root-ca.crt")
                    if cm is not None and (cm.get("data") or {}).get("ca.crt") != self.ca_pem.decode():
                        cm["data"] = {"ca.crt": self.ca_pem.decode()}
                        cm_rt = self.registry.get("", "v1", "configmaps")
                        assert cm_rt is not None
                        api.update_object(cm_rt, self.store.get("/configmaps", ns, "kube-root-ca.crt") or cm, cm,
                                          WriteOptions("kube-controller-manager", False, "Strict"), "")
            service = {"metadata": {"name": "kubernetes", "namespace": "default",
                                    "labels": {"component": "apiserver", "provider": "kubernetes"}},
                       "spec": {"clusterIP": s.first_service_ip, "type": "ClusterIP", "sessionAffinity": "None",
                                "ports": [{"name": "https", "port": 443, "protocol": "TCP",
                                           "targetPort": s.advertise_port}]}}
            if self.store.get(svc_rt.storage_key, "default", "kubernetes") is None:
                api.create_object(svc_rt, service, opts)
            endpoints = {"metadata": {"name": "kubernetes", "namespace": "default",
                                      "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
                         "subsets": [{"addresses": [{"ip": s.advertise_address}],
                                      "ports": [{"name": "https", "port": s.advertise_port, "protocol": "TCP"}]}]}
            slice_ = {"metadata": {"name": "kubernetes", "namespace": "default",
                                   "labels": {"kubernetes.io/service-name": "kubernetes"}},
                      "addressType": "IPv4",
                      "endpoints": [{"addresses": [s.advertise_address], "conditions": {"ready": True}}],
                      "ports": [{"name": "https", "port": s.advertise_port, "protocol": "TCP"}]}
            crd_rt = self.registry.get("apiextensions.k8s.io", "v1", "customresourcedefinitions")
            assert crd_rt is not None
            for crd in helm_crds():  # K3s registers the helm-controller's CRDs at start
                current = self.store.get(crd_rt.storage_key, "", crd["metadata"]["name"])
                if current is None:
                    api.create_object(crd_rt, crd, opts)
                else:
                    merged = dict(current)
                    merged["spec"] = crd["spec"]
                    api.update_object(crd_rt, current, merged, opts, "")
            for rt, body in ((ep_rt, endpoints), (eps_rt, slice_)):
                current = self.store.get(rt.storage_key, "default", "kubernetes")
                if current is None:
                    api.create_object(rt, body, opts)
                else:
                    merged = dict(current)
                    merged.update({k: v for k, v in body.items() if k != "metadata"})
                    api.update_object(rt, current, merged, opts, "")

    # ------------------------------------------------------------------------------- controllers
    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(heartbeat_interval(self.env)):
            try:
                self.kubelet.heartbeat()
            except Exception as exc:  # keep beating; say why this one failed
                self.log.error(f"node heartbeat failed: {exc}")

    def _lifecycle_loop(self) -> None:
        interval = max(0.2, min(1.0, self.grace / 4))
        while not self._stop.wait(interval):
            try:
                self.check_nodes()
            except Exception as exc:
                self.log.error(f"node lifecycle controller: {exc}")

    def check_nodes(self) -> None:
        """Ready=Unknown (and the unreachable taints) for nodes whose heartbeat is older than the grace period."""
        node_rt = self.registry.get("", "v1", "nodes")
        assert node_rt is not None
        opts = WriteOptions(manager="kube-controller-manager", dry_run=False, field_validation="Ignore")
        now = time.time()
        for node in self.store.list_objects(node_rt.storage_key):
            name = node["metadata"]["name"]
            conditions = (node.get("status") or {}).get("conditions") or []
            ready = next((c for c in conditions if c.get("type") == "Ready"), None)
            if ready is None:
                continue
            stale = now - parse_rfc3339(str(ready.get("lastHeartbeatTime", ""))) > self.grace
            taints = (node.get("spec") or {}).get("taints") or []
            has_taint = any(t.get("key") == UNREACHABLE_TAINT for t in taints)
            with self.store.lock, contextlib.suppress(ApiError):
                current = self.store.get(node_rt.storage_key, "", name)
                if current is None:
                    continue
                if stale and ready.get("status") != "Unknown":
                    stamp = rfc3339()
                    new = json.loads(json.dumps(current))
                    for cond in new["status"]["conditions"]:
                        cond.update(status="Unknown", reason="NodeStatusUnknown",
                                    message="Kubelet stopped posting node status.", lastTransitionTime=stamp)
                    self.api.update_object(node_rt, current, new, opts, "status")
                    self.log.info(f"Node {name} is NotReady: its kubelet stopped posting node status")
                    current = self.store.get(node_rt.storage_key, "", name) or current
                    if not has_taint:
                        new = json.loads(json.dumps(current))
                        new.setdefault("spec", {}).setdefault("taints", []).extend([
                            {"key": UNREACHABLE_TAINT, "effect": "NoSchedule", "timeAdded": stamp},
                            {"key": UNREACHABLE_TAINT, "effect": "NoExecute", "timeAdded": stamp}])
                        self.api.update_object(node_rt, current, new, opts, "")
                elif not stale and ready.get("status") == "True" and has_taint:
                    new = json.loads(json.dumps(current))
                    new["spec"]["taints"] = [t for t in taints if t.get("key") != UNREACHABLE_TAINT]
                    if not new["spec"]["taints"]:
                        del new["spec"]["taints"]
                    self.api.update_object(node_rt, current, new, opts, "")

    # ------------------------------------------------------------------------------------- stop
    def stop(self) -> None:
        if self.stopped.is_set():
            return
        self._stop.set()
        if self.controllers is not None:
            self.controllers.stop()
        self.api.stopping = True
        self.store.close()
        if self.https is not None:
            self.https.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        with self.store.lock:
            self.store.mark_dirty()
        self.log.info("k3s server stopped")
        self.stopped.set()


def serve(config: Mapping[str, object], *, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
          log_stream: TextIO | None = None, on_lb_change: LbHook | None = None,
          ingress_bind: IngressBind | None = None) -> ServerHandle:
    """Start `k3s server` with `config` as the content of its config file; returns once it serves.

    config uses K3s's config-file keys, e.g. {"data-dir": ..., "https-listen-port": 0, "node-ip": "127.0.0.1"}.
    Port 0 picks a free port (the kubeconfig names the real one). `on_lb_change(ip, "namespace/name", present)`
    is called when a LoadBalancer address is assigned (present=True) or released (False); see controllers.py.
    `ingress_bind(ip, port) -> (host, port)` turns the ingress double on without the announcer and says where
    it listens (tests: 127.0.0.x, port 0; `ServerHandle.ingress_port` tells the port); see ingress.py.
    """
    env = os.environ if env is None else env
    raw = cfg.load("server", args, env, overrides=config)
    settings = cfg.server_settings(raw)
    log = Log(log_stream, debug=settings.debug)
    if settings.token:
        log.add_secrets([settings.token, tokens.parse(settings.token).password])
    return Server(settings, raw, log, env, on_lb_change, ingress_bind).start()


def run(args: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """The `k3s server` command: serve until SIGTERM or SIGINT, then exit 0."""
    env = os.environ if env is None else env
    log = Log()
    try:
        raw = cfg.load("server", args, env)
        settings = cfg.server_settings(raw)
        log = Log(debug=settings.debug)
        if settings.token:
            log.add_secrets([settings.token, tokens.parse(settings.token).password])
        server = Server(settings, raw, log, env)
        handle = server.start()
    except (cfg.ConfigError, StartupError, OSError) as exc:
        log.fatal(str(exc))
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info(f"Received {signal.Signals(signum).name}, shutting down")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(1.0):
        pass
    handle.stop()
    return 0

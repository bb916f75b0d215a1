"""An ingress controller double: the LoadBalancer address of an ingress-controller chart's Service answers
HTTP and HTTPS on this node, as the real controller (Traefik) would.

Which charts are ingress controllers, and how they behave, is data: `charts/ingress.json` in the package (the
release writes it from homelab.lab.chartcrds.INGRESS_CONTROLLERS), or in `$K3S_STANDIN_CHARTS`.

Per LoadBalancer Service of such a release (label `app.kubernetes.io/instance` = the HelmChart) whose address
this node announces (LinkAnnouncer), two threaded listeners on address:<http port> and address:<https port>:

- HTTPS: the certificate is picked by SNI from the TLS Secrets named in Ingress spec.tls whose hosts match
  (a wildcard matches one label), else the TLS store's default certificate (e.g. TLSStore `default` in the
  release namespace), else a self-signed "TRAEFIK DEFAULT CERT". Requests are routed by Host to the Ingress
  rule's backend Service, answered by a tiny app double (200, JSON naming ingress/host/backend); 404 otherwise.
- HTTP: when the release values turn the redirect on (e.g. ports.web.redirections.entryPoint.scheme: https),
  301 (308 for methods other than GET/HEAD; 302/307 when not permanent) to https://host/path; else as HTTPS.

Off unless the announcer is active (root, Linux, eth0, K3S_STANDIN_ANNOUNCE != 0) or a bind hook is given:
`bind(ip, port) -> (host, port)` chooses where to listen instead (tests: 127.0.0.x, port 0).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import ipaddress
import json
import os
import ssl
import tempfile
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .apps import AppDoubles

if TYPE_CHECKING:
    from .controllers import Controllers

JSONObj = dict[str, Any]
IngressBind = Callable[[str, int], tuple[str, int]]
INSTANCE_LABEL = "app.kubernetes.io/instance"
NOT_FOUND = b"404 page not found\n"


def _sans(pem: bytes) -> list[str]:
    """The DNS names of a PEM certificate's SAN extension ([] when it has none or does not parse)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
        return [str(n) for n in cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)]
    except (ValueError, x509.ExtensionNotFound):
        return []


def charts_dir(env: Mapping[str, str]) -> Path:
    """Where the chart index files are: $K3S_STANDIN_CHARTS, else `charts/` in this package."""
    return Path(env.get("K3S_STANDIN_CHARTS") or Path(__file__).resolve().parent / "charts")


def load_index(env: Mapping[str, str]) -> dict[str, JSONObj]:
    """{chart name: ingress-controller traits} from charts/ingress.json ({} when there is none)."""
    path = charts_dir(env) / "ingress.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def host_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def _dig(obj: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _fallback_cert(cn: str) -> tuple[bytes, bytes]:
    """A self-signed certificate as Traefik's default (CN "TRAEFIK DEFAULT CERT", SAN <hex>.<hex>.traefik.default)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    san = f"{os.urandom(16).hex()}.{os.urandom(16).hex()}.traefik.default"
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(10)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            self.RequestHandlerClass(conn, client_address, self)  # type: ignore[arg-type]
        except (ssl.SSLError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()


class Release:
    """One ingress-controller Service address on this node: its listeners and what they serve."""

    def __init__(self, owner: IngressController, ip: str, service: str, chart_key: str, traits: JSONObj,
                 ports: tuple[int, int]) -> None:
        self.owner, self.ip, self.service, self.chart_key, self.traits = owner, ip, service, chart_key, traits
        self.ports = ports  # (http, https) Service ports
        self.namespace = service.split("/", 1)[0]
        self.servers: list[_Server] = []
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        try:
            for port, tls in ((self.ports[0], False), (self.ports[1], True)):
                host, bind_port = self.owner.bind(self.ip, port)
                server_cls = type("Server", (_Server,), {
                    "address_family": 10 if ipaddress.ip_address(host).version == 6 else 2})
                handler = type("Handler", (_Handler,), {"release": self, "tls": tls})
                server = server_cls((host, bind_port), handler)
                if tls:
                    server.tls = self.owner.server_context(self)
                self.servers.append(server)
                self.owner.bound[(self.ip, port)] = server.server_address[1]
                thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                          name=f"k3s-standin-ingress-{self.ip}:{port}", daemon=True)
                thread.start()
                self.threads.append(thread)
        except OSError:
            self.stop()
            raise
        self.owner.log_info(f"ingress (stand-in): {self.service} serving on {self.ip}:{self.ports[0]} and "
                            f"{self.ip}:{self.ports[1]}")

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        for thread in self.threads:
            thread.join(timeout=5)
        for port in self.ports:
            self.owner.bound.pop((self.ip, port), None)
        self.servers, self.threads = [], []


class _Handler(BaseHTTPRequestHandler):
    release: Release
    tls: bool
    protocol_version = "HTTP/1.1"
    server_version = "traefik-standin"

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        payload = self.rfile.read(min(length, 1 << 20)) if length else b""
        host = (self.headers.get("Host") or self.release.ip).strip()
        host = host.rsplit(":", 1)[0] if not host.endswith("]") and host.count(":") == 1 else host
        owner = self.release.owner
        if not self.tls:
            redirect = owner.redirect(self.release)
            if redirect is not None:
                permanent = redirect
                status = (301 if permanent else 302) if self.command in ("GET", "HEAD") else (308 if permanent else 307)
                location = f"https://{host}{self.path}"
                self._send(status, f"{'Moved Permanently' if permanent else 'Found'}".encode(), "text/plain",
                           {"Location": location})
                return
        path = self.path.split("?", 1)[0]
        found = owner.route(self.release, host, path)
        if found is None:
            self._send(404, NOT_FOUND, "text/plain; charset=utf-8")
            return
        status, body, content_type = owner.apps.respond(found["service"], self.command, path, payload)
        self._send(status, body, content_type, {"X-Standin-Ingress": found["ingress"]})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve


class IngressController:
    def __init__(self, ctl: Controllers, data_dir: Path, env: Mapping[str, str],
                 bind: IngressBind | None = None) -> None:
        self.ctl, self.env = ctl, env
        self.bind_hook = bind
        self.tls_dir = data_dir / "server" / "tls" / "standin-ingress"
        self.apps = AppDoubles(self, data_dir, charts_dir(env))
        self.releases: dict[tuple[str, str], Release] = {}  # (ip, ns/name) -> listeners
        self.bound: dict[tuple[str, int], int] = {}  # (LB ip, Service port) -> the port actually listened on
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._fallback: tuple[bytes, bytes] | None = None
        self._lock = threading.Lock()
        self._failed: set[tuple[str, str]] = set()

    @property
    def enabled(self) -> bool:
        return self.bind_hook is not None or self.ctl.announcer.enabled

    def bind(self, ip: str, port: int) -> tuple[str, int]:
        return self.bind_hook(ip, port) if self.bind_hook is not None else (ip, port)

    def log_info(self, text: str) -> None:
        self.ctl.log.info(text)

    # --- store lookups
    def _chart(self, release: Release) -> JSONObj | None:
        namespace, _, name = release.chart_key.partition("/")
        return self.ctl.get_of("helm.cattle.io", "v1", "helmcharts", namespace, name)

    # --- reconcile
    def reconcile(self) -> None:
        desired: dict[tuple[str, str], tuple[str, JSONObj, tuple[int, int]]] = {}
        if self.enabled:
            index = load_index(self.env)
            for ip, svc_key in sorted(self.ctl.announced.items()):
                found = self._release_of(ip, svc_key, index) if index else None
                if found is not None:
                    desired[(ip, svc_key)] = found
        for current, release in list(self.releases.items()):
            want = desired.get(current)
            if want is None or (want[0], want[1], want[2]) != (release.chart_key, release.traits, release.ports):
                release.stop()
                del self.releases[current]
                self.log_info(f"ingress (stand-in): {release.service} stopped serving on {release.ip}")
        for key, (chart_key, traits, ports) in desired.items():
            if key in self.releases:
                continue
            release = Release(self, key[0], key[1], chart_key, traits, ports)
            try:
                release.start()
            except OSError as exc:
                if key not in self._failed:
                    self._failed.add(key)
                    self.ctl.log.error(f"ingress (stand-in): cannot listen for {key[1]} on {key[0]}: {exc}")
                continue
            self._failed.discard(key)
            self.releases[key] = release

    def _release_of(self, ip: str, key: str, index: dict[str, JSONObj]) -> tuple[str, JSONObj, tuple[int, int]] | None:
        from .controllers import HELM_CHART_ANNOTATION, _chart_name

        namespace, _, name = key.partition("/")
        svc = self.ctl.get_of("", "v1", "services", namespace, name)
        if svc is None or (svc.get("spec") or {}).get("type") != "LoadBalancer":
            return None
        ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        if not any(isinstance(i, dict) and i.get("ip") == ip for i in ingress):
            return None
        instance = (svc["metadata"].get("labels") or {}).get(INSTANCE_LABEL)
        if not instance:
            return None
        chart_key = (svc["metadata"].get("annotations") or {}).get(HELM_CHART_ANNOTATION)
        chart = None
        if chart_key and chart_key.rpartition("/")[2] == instance:
            chart = self.ctl.get_of("helm.cattle.io", "v1", "helmcharts", *chart_key.split("/", 1))
        if chart is None:
            chart = next((c for c in self.ctl.list_of("helm.cattle.io", "v1", "helmcharts") if c["metadata"]["name"] ==
                          instance and ((c.get("spec") or {}).get("targetNamespace") or c["metadata"]["namespace"])
                          == namespace), None)
        if chart is None or chart["metadata"].get("deletionTimestamp"):
            return None
        traits = index.get(_chart_name(chart.get("spec") or {}))
        if traits is None:
            return None
        ports = {str(p.get("name")): p.get("port") for p in (svc.get("spec") or {}).get("ports") or []}
        http = ports.get(str(traits.get("http_port_name", "web"))) or traits.get("http_port", 80)
        https = ports.get(str(traits.get("https_port_name", "websecure"))) or traits.get("https_port", 443)
        chart_key = f"{chart['metadata']['namespace']}/{chart['metadata']['name']}"
        return chart_key, traits, (int(http), int(https))

    def stop(self) -> None:
        for release in self.releases.values():
            release.stop()
        self.releases.clear()

    # --- HTTP behaviour
    def redirect(self, release: Release) -> bool | None:
        """None: no HTTP -> HTTPS redirect; else whether it is permanent."""
        path = str(release.traits.get("redirect_values") or "")
        chart = self._chart(release)
        if not path or chart is None:
            return None
        values = self.ctl.helm_values(chart)
        if str(_dig(values, path) or "").lower() != "https":
            return None
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        permanent = _dig(values, f"{parent}.permanent" if parent else "permanent")
        return permanent is not False

    def _ingresses(self, release: Release) -> list[JSONObj]:
        classes = {None, "", str(release.traits.get("ingress_class") or ""), release.chart_key.rpartition("/")[2]}
        out = []
        for ing in self.ctl.list_of("networking.k8s.io", "v1", "ingresses"):
            spec = ing.get("spec") or {}
            cls = spec.get("ingressClassName") or (ing["metadata"].get("annotations") or {}).get(
                "kubernetes.io/ingress.class")
            if cls in classes and not ing["metadata"].get("deletionTimestamp"):
                out.append(ing)
        return sorted(out, key=lambda i: (i["metadata"].get("creationTimestamp", ""), i["metadata"]["namespace"],
                                          i["metadata"]["name"]))

    def route(self, release: Release, host: str, path: str) -> JSONObj | None:
        best: tuple[tuple[int, int], JSONObj] | None = None
        for ing in self._ingresses(release):
            namespace = ing["metadata"]["namespace"]
            for rule in (ing.get("spec") or {}).get("rules") or []:
                rule_host = str(rule.get("host") or "")
                if rule_host and not host_matches(rule_host, host):
                    continue
                host_rank = 2 if rule_host and not rule_host.startswith("*") else (1 if rule_host else 0)
                for item in ((rule.get("http") or {}).get("paths")) or []:
                    want = str(item.get("path") or "/")
                    kind = item.get("pathType") or "ImplementationSpecific"
                    if kind == "Exact":
                        ok = path == want
                    elif kind == "Prefix":
                        ok = want == "/" or path == want.rstrip("/") or path.startswith(want.rstrip("/") + "/")
                    else:
                        ok = path.startswith(want)
                    backend = (item.get("backend") or {}).get("service") or {}
                    if not ok or not backend.get("name"):
                        continue
                    if self.ctl.get_of("", "v1", "services", namespace, str(backend["name"])) is None:
                        continue
                    rank = (host_rank, len(want))
                    if best is None or rank > best[0]:
                        port = backend.get("port") or {}
                        best = (rank, {"ingress": f"{namespace}/{ing['metadata']['name']}",
                                       "service": {"namespace": namespace, "name": backend["name"],
                                                   "port": port.get("number") or port.get("name")}})
        return best[1] if best else None

    # --- TLS
    def server_context(self, release: Release) -> ssl.SSLContext:
        ctx = self._context(*self._fallback_pair(release))

        def pick(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            try:
                chosen = self.context_for(release, name)
            except Exception as exc:  # never break the handshake over a lookup
                self.ctl.log.error(f"ingress (stand-in): certificate lookup for {name}: {exc}")
                return
            if chosen is not None:
                sslobj.context = chosen

        ctx.sni_callback = pick
        return ctx

    def _fallback_pair(self, release: Release) -> tuple[bytes, bytes]:
        with self._lock:
            if self._fallback is None:
                self._fallback = _fallback_cert(str(release.traits.get("default_cert_cn") or "TRAEFIK DEFAULT CERT"))
            return self._fallback

    def _secret_pair(self, namespace: str, name: str) -> tuple[bytes, bytes] | None:
        secret = self.ctl.get_of("", "v1", "secrets", namespace, name)
        data = (secret or {}).get("data") or {}
        try:
            crt, key = base64.b64decode(data.get("tls.crt") or ""), base64.b64decode(data.get("tls.key") or "")
        except ValueError:
            return None
        return (crt, key) if crt and key else None

    def context_for(self, release: Release, sni: str | None) -> ssl.SSLContext | None:
        if sni:
            for ing in self._ingresses(release):
                for tls in (ing.get("spec") or {}).get("tls") or []:
                    hosts = [str(h) for h in tls.get("hosts") or []]
                    if tls.get("secretName") and any(host_matches(h, sni) for h in hosts):
                        pair = self._secret_pair(ing["metadata"]["namespace"], str(tls["secretName"]))
                        if pair is not None:
                            return self._context(*pair)
        store = release.traits.get("tls_store") or {}
        if store:
            obj = self.ctl.get_of(str(store.get("group")), str(store.get("version")), str(store.get("plural")),
                            release.namespace, str(store.get("name") or "default"))
            spec = (obj or {}).get("spec") or {}
            # Traefik picks among the store's certificates by SAN for the SNI, then its default.
            if sni:
                for entry in spec.get("certificates") or []:
                    pair = self._secret_pair(release.namespace, str((entry or {}).get("secretName") or ""))
                    if pair is not None and any(host_matches(san, sni) for san in _sans(pair[0])):
                        return self._context(*pair)
            secret = (spec.get("defaultCertificate") or {}).get("secretName")
            if secret:
                pair = self._secret_pair(release.namespace, str(secret))
                if pair is not None:
                    return self._context(*pair)
        return self._context(*self._fallback_pair(release))

    def _context(self, crt: bytes, key: bytes) -> ssl.SSLContext:
        digest = hashlib.sha256(crt + b"\0" + key).hexdigest()
        with self._lock:
            ctx = self._contexts.get(digest)
            if ctx is not None:
                return ctx
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.tls_dir, suffix=".pem")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(key.rstrip(b"\n") + b"\n" + crt)
                ctx.load_cert_chain(name)
            finally:
                Path(name).unlink()
            if len(self._contexts) > 64:
                self._contexts.clear()
            self._contexts[digest] = ctx
            return ctx

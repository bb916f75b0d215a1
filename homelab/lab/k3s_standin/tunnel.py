"""A cloudflared double: Deployments that run `cloudflare/cloudflared ... tunnel ... run` connect their tunnel
to the lab's Cloudflare edge and carry its requests to the origin services, as remotely-managed cloudflared does.

Which Deployments: a container whose image is `cloudflare/cloudflared[:tag]` (any registry prefix) and whose
command + args hold `tunnel` and, after it, `run`. While the Deployment is Ready (status.readyReplicas >= 1, no
deletionTimestamp) one connector runs for it; it stops when the Deployment stops being Ready, is deleted, or its
token changes (a new Secret value). The token is `--token <t>` in the args, else the container's TUNNEL_TOKEN
(`value`, or `valueFrom.secretKeyRef` -> the Secret's data, base64). It is cloudflared's TunnelToken:
base64 of JSON {"a": account tag, "t": tunnel id, "s": base64 tunnel secret} (cloudflared connection.TunnelToken).

Where the edge is: `charts/outside.json` in this package (the release writes it; `$K3S_STANDIN_OUTSIDE` names
another file, else `$K3S_STANDIN_CHARTS/outside.json`):

    {"edge_hostname": "region1.v2.argotunnel.com", "edge_port": 7844, "ca_pem": "<the outside world's CA>",
     "edge_address": "<optional: skip the resolver>"}

The hostname is resolved with the node's resolver (cloudflared finds region1/region2.v2.argotunnel.com through
SRV _v2-origintunneld._tcp.argotunnel.com); TLS to the edge is verified against `ca_pem` for that hostname.
Without the file, connectors are off (logged once).

The wire protocol with the edge (register, long-poll, respond, unregister: JSON over HTTPS, outbound only) is
described in homelab/lab/cloudflare_edge.py. Ingress rules are matched here, in the connector, as cloudflared
does with the configuration the edge pushes: hostname (exact, or `*.` matching any deeper name), then `path`
(a regular expression searched in the path), first match wins; the last rule is the catch-all.
Services: `http_status:NNN` answers NNN; `hello_world` 200; `http(s)://host[:port]` is proxied. A host
`<svc>.<ns>.svc.cluster.local`, `<svc>.<ns>.svc` or `<svc>.<ns>` means that Service's LoadBalancer address
(status.loadBalancer.ingress[0].ip) at the same port: the only address that listens in the lab. HTTPS origins
are verified (never skipped) for originRequest.originServerName (else the service's host) against the
stand-in's issuer CAs (certs.py `roots()`) and the system roots. An origin that cannot be reached or verified
gives 502, as cloudflared's "Bad Gateway".

Hooks for tests: `TunnelController.resolve(host, port) -> (address, port)` replaces the resolver for the edge;
`TunnelController.dial(ip, port) -> (host, port)` says where an origin address listens (by default the port
the stand-in's ingress double really bound for that LoadBalancer address).
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import http.client
import ipaddress
import json
import re
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .ingress import charts_dir

if TYPE_CHECKING:
    from .controllers import Controllers

JSONObj = dict[str, Any]
Resolve = Callable[[str, int], tuple[str, int]]
OUTSIDE_FILE = "outside.json"
EDGE_HOSTNAME = "region1.v2.argotunnel.com"
EDGE_PORT = 7844
VERSION = "2025.9.1 (k3s stand-in)"
IMAGE = re.compile(r"(?:.+/)?cloudflare/cloudflared(?::[\w.+-]+)?(?:@sha256:[0-9a-f]{64})?")
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "content-length"})
MAX_BODY = 16 << 20
DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
SERVICE_HOST = re.compile(rf"({DNS_LABEL})\.({DNS_LABEL})(?:\.svc(?:\.cluster\.local)?)?")


# ------------------------------------------------------------------------------------ the data file

def outside_index(edge_hostname: str, ca_pem: str, *, edge_port: int = EDGE_PORT,
                  edge_address: str | None = None) -> bytes:
    """The content of charts/outside.json (the release writes it: the edge's name and the outside CA)."""
    data: JSONObj = {"edge_hostname": edge_hostname, "edge_port": edge_port, "ca_pem": ca_pem}
    if edge_address:
        data["edge_address"] = edge_address
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def load_outside(env: Mapping[str, str]) -> JSONObj | None:
    path = Path(env.get("K3S_STANDIN_OUTSIDE") or charts_dir(env) / OUTSIDE_FILE)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not data.get("edge_hostname") or not data.get("ca_pem"):
        return None
    return data


def decode_token(token: str) -> tuple[str, str, bytes]:
    """(account tag, tunnel id, secret) of a tunnel token; ValueError when it is not one."""
    try:
        data = json.loads(base64.b64decode(token.strip(), validate=True))
        return str(data["a"]), str(uuid.UUID(str(data["t"]))), base64.b64decode(str(data["s"]), validate=True)
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise ValueError("TUNNEL_TOKEN is not a Cloudflare Tunnel token") from exc


def host_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return pattern == host


def match_rule(config: JSONObj | None, host: str, path: str) -> JSONObj | None:
    """The first ingress rule matching host and path (cloudflared's order), or None without a config."""
    for rule in (config or {}).get("ingress") or []:
        if not isinstance(rule, dict):
            continue
        if rule.get("hostname") and not host_matches(str(rule["hostname"]), host):
            continue
        if rule.get("path"):
            try:
                if not re.search(str(rule["path"]), path.split("?", 1)[0]):
                    continue
            except re.error:
                continue
        return rule
    return None


# ------------------------------------------------------------------------------------- HTTPS calls

def _https(address: str, port: int, server_name: str, ctx: ssl.SSLContext, method: str, path: str,
           headers: list[tuple[str, str]], body: bytes | None, timeout: float) -> tuple[int, list[tuple[str, str]],
                                                                                      bytes]:
    raw = socket.create_connection((address, port), timeout=timeout)
    try:
        sock = ctx.wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise
    conn = http.client.HTTPSConnection(server_name, port, context=ctx, timeout=timeout)
    conn.sock = sock
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        sent = {k.lower() for k, _ in headers}
        for key, value in headers:
            conn.putheader(key, value)
        if "host" not in sent:
            conn.putheader("Host", server_name)
        if body is not None or method in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        data = resp.read(MAX_BODY)
        return resp.status, list(resp.getheaders()), data
    finally:
        conn.close()


class EdgeRefused(Exception):
    """The edge answered 401: the connector must register again (or its secret is wrong)."""


@dataclass(frozen=True)
class Edge:
    hostname: str
    port: int
    context: ssl.SSLContext
    address: str | None


# ------------------------------------------------------------------------------------- a connector

class Connector:
    """One cloudflared: registers with the edge, long-polls for requests, answers them from the origins."""

    def __init__(self, owner: TunnelController, key: str, token: str, edge: Edge) -> None:
        self.owner, self.key, self.edge = owner, key, edge
        self.account, self.tunnel_id, self._secret = decode_token(token)
        self.client_id = str(uuid.uuid4())
        self.digest = hashlib.sha256(token.encode()).hexdigest()
        self.session: str | None = None
        self.config: JSONObj | None = None
        self.config_version = 0
        self.registered = threading.Event()
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"cloudflared-{key}")
        self._thread = threading.Thread(target=self._run, name=f"k3s-standin-cloudflared-{key}", daemon=True)
        self._last_error = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Graceful shutdown: unregister at once (the edge drops the connection), then let the thread end."""
        self._stop.set()
        session, self.session = self.session, None
        if session:
            with contextlib.suppress(OSError, ssl.SSLError, http.client.HTTPException, EdgeRefused, ValueError):
                self._call("/unregister", {}, session, timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._thread.join(timeout=0.2)

    # --- the edge
    def _address(self) -> tuple[str, int]:
        if self.edge.address:
            return self.edge.address, self.edge.port
        return self.owner.resolve_edge(self.edge.hostname, self.edge.port)

    def _call(self, path: str, body: JSONObj, session: str | None, timeout: float) -> JSONObj:
        address, port = self._address()
        headers = [("Host", self.edge.hostname), ("Content-Type", "application/json"),
                   ("User-Agent", f"cloudflared/{VERSION}")]
        if session:
            headers.append(("Authorization", f"Bearer {session}"))
        status, _, data = _https(address, port, self.edge.hostname, self.edge.context, "POST", path, headers,
                                 json.dumps(body).encode(), timeout)
        if status == 401:
            raise EdgeRefused(_error_text(data))
        if status >= 400:
            raise ValueError(f"edge answered {status} to {path}: {_error_text(data)}")
        return json.loads(data) if data else {}

    def _say(self, level: str, text: str) -> None:
        if text != self._last_error:
            self._last_error = text
            getattr(self.owner.ctl.log, level)(f"cloudflared (stand-in) {self.key}: {text}")

    def _run(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            try:
                answer = self._call("/register", {
                    "account_tag": self.account, "tunnel_id": self.tunnel_id,
                    "tunnel_secret": base64.b64encode(self._secret).decode(), "client_id": self.client_id,
                    "version": VERSION, "arch": "linux_amd64"}, None, timeout=10)
                if self._stop.is_set():
                    with contextlib.suppress(Exception):
                        self._call("/unregister", {}, str(answer.get("session")), timeout=5)
                    return
                self.session = str(answer["session"])
                if self._stop.is_set():  # stop() ran between the check above and now: it saw no session
                    with contextlib.suppress(Exception):
                        self._call("/unregister", {}, self.session, timeout=5)
                    return
                self.config, self.config_version = answer.get("config"), int(answer.get("config_version") or 0)
                self.registered.set()
                self._say("info", f"Registered tunnel connection connIndex=0 connection={answer.get('connection_id')} "
                                  f"location={answer.get('colo_name')} tunnel={self.tunnel_id}")
                backoff = 0.2
                self._serve(float(answer.get("poll_seconds") or 5.0))
            except EdgeRefused as exc:
                self.registered.clear()
                self.session = None
                if self._stop.is_set():
                    return
                if "Unauthorized" in str(exc) and "connection" not in str(exc):
                    self._say("error", f"Register tunnel error from server side error=\"{exc}\"")
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 10.0)
            except (OSError, ssl.SSLError, http.client.HTTPException, ValueError, KeyError) as exc:
                self.registered.clear()
                self._say("error", f"Unable to establish connection with Cloudflare edge error=\"{exc}\"")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _serve(self, poll_seconds: float) -> None:
        while not self._stop.is_set():
            session = self.session
            if session is None:
                return
            answer = self._call("/poll", {"config_version": self.config_version}, session,
                                timeout=poll_seconds + 15)
            if "config" in answer:
                self.config = answer["config"]
                self.config_version = int(answer.get("config_version") or 0)
                self._say("info", f"Updated to new configuration version={self.config_version}")
            for item in answer.get("requests") or []:
                if isinstance(item, dict):
                    with contextlib.suppress(RuntimeError):  # the pool is shut down: we are stopping
                        self._pool.submit(self._answer, session, item)

    def _answer(self, session: str, item: JSONObj) -> None:
        try:
            status, headers, body = self.handle(item)
        except Exception as exc:  # an answer must go back whatever happened
            self._say("error", f"request failed: {type(exc).__name__}: {exc}")
            status, headers, body = 502, [("Content-Type", "text/plain")], b"Bad Gateway\n"
        with contextlib.suppress(OSError, ssl.SSLError, http.client.HTTPException, EdgeRefused, ValueError):
            self._call("/respond", {"id": item.get("id"), "status": status, "headers": [list(h) for h in headers],
                                    "body": base64.b64encode(body).decode()}, session, timeout=15)

    # --- the origin side
    def handle(self, item: JSONObj) -> tuple[int, list[tuple[str, str]], bytes]:  # noqa: PLR0911 - one per outcome
        host, path = str(item.get("host") or ""), str(item.get("path") or "/")
        rule = match_rule(self.config, host, path)
        if rule is None:
            return 503, [("Content-Type", "text/plain")], b"no ingress configuration\n"
        service = str(rule.get("service") or "")
        status_match = re.fullmatch(r"http_status:(\d{3})", service)
        if status_match:
            return int(status_match.group(1)), [("Content-Length", "0")], b""
        if service == "hello_world":
            return 200, [("Content-Type", "text/plain")], b"Hello from the cloudflared stand-in\n"
        scheme, _, rest = service.partition("://")
        if scheme not in ("http", "https") or not rest:
            return 502, [("Content-Type", "text/plain")], f"unsupported service {service}\n".encode()
        hostport = rest.split("/", 1)[0]
        origin_host, _, port_text = hostport.rpartition(":") if re.search(r":\d+$", hostport) else (hostport, "", "")
        port = int(port_text) if port_text else (443 if scheme == "https" else 80)
        options = {**((self.config or {}).get("originRequest") or {}), **(rule.get("originRequest") or {})}
        address = self.owner.origin_address(origin_host)
        if address is None:
            self._say("error", f"origin {service}: no address (a Service without a LoadBalancer address?)")
            return 502, [("Content-Type", "text/plain")], b"Bad Gateway\n"
        dial_host, dial_port = self.owner.dial_origin(address, port)
        server_name = str(options.get("originServerName") or origin_host)
        headers = [(str(k), str(v)) for k, v in item.get("headers") or [] if str(k).lower() not in HOP_BY_HOP
                   and str(k).lower() != "host"]
        headers.insert(0, ("Host", str(options.get("httpHostHeader") or host)))
        body = base64.b64decode(str(item.get("body") or ""))
        method = str(item.get("method") or "GET")
        try:
            if scheme == "https":
                status, resp_headers, data = _https(dial_host, dial_port, server_name, self.owner.origin_context(),
                                                    method, path, headers, body if body else None, 30)
            else:
                conn = http.client.HTTPConnection(dial_host, dial_port, timeout=30)
                try:
                    conn.request(method, path, body=body or None, headers=dict(headers))
                    resp = conn.getresponse()
                    status, resp_headers, data = resp.status, list(resp.getheaders()), resp.read(MAX_BODY)
                finally:
                    conn.close()
        except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
            self._say("error", f"Unable to reach the origin service {service}: {exc}")
            return 502, [("Content-Type", "text/plain")], b"Bad Gateway\n"
        return status, [(k, v) for k, v in resp_headers if k.lower() not in HOP_BY_HOP], data


def _error_text(data: bytes) -> str:
    try:
        return str(json.loads(data).get("error") or data[:200].decode(errors="replace"))
    except (ValueError, AttributeError):
        return data[:200].decode(errors="replace")


# ------------------------------------------------------------------------------------ the controller

class TunnelController:
    """Starts and stops one Connector per Ready cloudflared Deployment (see the module docstring)."""

    def __init__(self, ctl: Controllers, env: Mapping[str, str]) -> None:
        self.ctl, self.env = ctl, env
        self.connectors: dict[str, Connector] = {}
        self.resolve: Resolve | None = None
        self.dial: Resolve | None = None
        self._lock = threading.Lock()
        self._said: dict[str, str] = {}
        self._edge: tuple[str, Edge] | None = None

    def _say(self, key: str, text: str) -> None:
        if self._said.get(key) != text:
            self._said[key] = text
            self.ctl.log.info(text)

    # --- hooks and trust
    def resolve_edge(self, hostname: str, port: int) -> tuple[str, int]:
        if self.resolve is not None:
            return self.resolve(hostname, port)
        infos = socket.getaddrinfo(hostname, port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"cannot resolve {hostname}")
        return str(infos[0][4][0]), port

    def dial_origin(self, ip: str, port: int) -> tuple[str, int]:
        if self.dial is not None:
            return self.dial(ip, port)
        return ip, self.ctl.ingress.bound.get((ip, port), port)

    def origin_context(self) -> ssl.SSLContext:
        """System roots plus the lab's stand-ins for publicly trusted CAs; a staging issuer is not trusted
        (real cloudflared checks the origin against the system roots, which hold no staging root)."""
        ctx = ssl.create_default_context()
        cadata = "".join(pem for issuer, pem in self.ctl.certs.roots().items() if "staging" not in issuer.lower())
        if cadata:
            ctx.load_verify_locations(cadata=cadata)
        return ctx

    def origin_address(self, host: str) -> str | None:
        """The address a service host stands for: a Service's LoadBalancer address, an IP, or a resolved name."""
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(host))
        found = SERVICE_HOST.fullmatch(host.lower().rstrip("."))
        if found:
            rt = self.ctl.rt("", "v1", "services")
            with self.ctl.store.lock:
                svc = self.ctl.store.get(rt.storage_key, found.group(2), found.group(1)) if rt else None
            if svc is not None:
                ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
                ip = ingress[0].get("ip") if ingress and isinstance(ingress[0], dict) else None
                return str(ip) if ip else None
            if host.endswith((".svc", ".svc.cluster.local")):
                return None
        try:
            return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
        except (OSError, IndexError):
            return None

    def _edge_info(self) -> Edge | None:
        data = load_outside(self.env)
        if data is None:
            return None
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        if self._edge is not None and self._edge[0] == digest:
            return self._edge[1]
        ctx = ssl.create_default_context(cadata=str(data["ca_pem"]))
        edge = Edge(str(data["edge_hostname"]), int(data.get("edge_port") or EDGE_PORT), ctx,
                    str(data["edge_address"]) if data.get("edge_address") else None)
        self._edge = (digest, edge)
        return edge

    # --- reconcile
    def _token(self, namespace: str, container: JSONObj, argv: list[str]) -> str | None:  # noqa: PLR0911
        for index, arg in enumerate(argv):
            if arg == "--token" and index + 1 < len(argv):
                return argv[index + 1]
            if arg.startswith("--token="):
                return arg.split("=", 1)[1]
        for env in container.get("env") or []:
            if not isinstance(env, dict) or env.get("name") != "TUNNEL_TOKEN":
                continue
            if env.get("value"):
                return str(env["value"])
            ref = (env.get("valueFrom") or {}).get("secretKeyRef") or {}
            rt = self.ctl.rt("", "v1", "secrets")
            if not ref.get("name") or rt is None:
                return None
            with self.ctl.store.lock:
                secret = self.ctl.store.get(rt.storage_key, namespace, str(ref["name"]))
            value = ((secret or {}).get("data") or {}).get(str(ref.get("key") or ""))
            if not value:
                return None
            try:
                return base64.b64decode(str(value), validate=True).decode().strip()
            except (binascii.Error, UnicodeDecodeError):
                return None
        return None

    def desired(self) -> dict[str, str]:
        """{namespace/name: token} of every Ready cloudflared Deployment whose token can be read."""
        rt = self.ctl.rt("apps", "v1", "deployments")
        if rt is None:
            return {}
        with self.ctl.store.lock:
            deployments = self.ctl.store.list_objects(rt.storage_key)
        out: dict[str, str] = {}
        for deploy in deployments:
            meta = deploy.get("metadata") or {}
            key = f"{meta.get('namespace')}/{meta.get('name')}"
            if meta.get("deletionTimestamp") or int((deploy.get("status") or {}).get("readyReplicas") or 0) < 1:
                continue
            spec = ((deploy.get("spec") or {}).get("template") or {}).get("spec") or {}
            for container in spec.get("containers") or []:
                if not isinstance(container, dict) or not IMAGE.fullmatch(str(container.get("image") or "")):
                    continue
                argv = [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]
                if "tunnel" not in argv or "run" not in argv[argv.index("tunnel"):]:
                    continue
                token = self._token(str(meta.get("namespace")), container, argv)
                if token is None:
                    self._say(key, f"cloudflared (stand-in) {key}: no tunnel token (--token or TUNNEL_TOKEN)")
                    continue
                out[key] = token
                break
        return out

    def reconcile(self) -> None:
        desired = self.desired()
        edge = self._edge_info() if desired else None
        if desired and edge is None:
            self._say("outside", "cloudflared (stand-in): no charts/outside.json (edge and CA): connectors are off")
            desired = {}
        self.ctl.log.add_secrets(desired.values())
        with self._lock:
            for key, conn in list(self.connectors.items()):
                token = desired.get(key)
                if token is None or hashlib.sha256(token.encode()).hexdigest() != conn.digest or conn.edge is not edge:
                    conn.stop()
                    del self.connectors[key]
                    self.ctl.log.info(f"cloudflared (stand-in) {key}: stopped (tunnel {conn.tunnel_id})")
            for key, token in desired.items():
                if key in self.connectors or edge is None:
                    continue
                try:
                    conn = Connector(self, key, token, edge)
                except ValueError as exc:
                    self._say(key, f"cloudflared (stand-in) {key}: {exc}")
                    continue
                self.connectors[key] = conn
                conn.start()
                self.ctl.log.info(f"cloudflared (stand-in) {key}: starting for tunnel {conn.tunnel_id}")

    def stop(self) -> None:
        with self._lock:
            for conn in self.connectors.values():
                conn.stop()
            self.connectors.clear()

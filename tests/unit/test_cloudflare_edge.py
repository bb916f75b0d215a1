"""The lab's Cloudflare edge with the k3s stand-in's cloudflared double, in process on 127.0.0.x: a request reaches
the origin only through a proxied record, a tunnel ingress rule and a live connector; otherwise Cloudflare's errors."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from homelab.clients.cloudflare import Cloudflare, ingress_config, tunnel_cname, tunnel_target
from homelab.lab import pki
from homelab.lab.cloudflare import LabCloudflare
from homelab.lab.cloudflare_edge import EDGE_NAMES, LabCloudflareEdge
from homelab.lab.k3s_standin import ServerHandle, serve
from homelab.lab.k3s_standin.tunnel import outside_index
from homelab.lab.serving import Background

from .polling import wait_for

EDGE_IP = "127.0.0.1"
LB_IP = "127.0.0.88"  # Traefik's LoadBalancer address, where the fake origin listens
ZONE = "jigga.xyz"
APP = f"app.{ZONE}"
ORIGIN_SERVICE = "https://traefik.kube-system.svc.cluster.local:443"
TOKEN = "edge-test-token-" + "z" * 30


class _Origin(ThreadingHTTPServer):
    daemon_threads = True
    seen_sni: list[str | None]


class _OriginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Origin

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        body = json.dumps({"host": self.headers.get("Host"), "path": self.path,
                           "sni": self.server.seen_sni[-1] if self.server.seen_sni else None,
                           "cf_connecting_ip": self.headers.get("CF-Connecting-IP")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@dataclass
class World:
    loop: Background
    api: LabCloudflare
    edge: LabCloudflareEdge
    cf: Cloudflare
    account: str
    zone_id: str
    ca_pem: Path
    handle: ServerHandle
    kube: client.ApiClient
    origin: _Origin

    def get(self, host: str, path: str = "/", *, port: str = "https") -> tuple[int, dict[str, str], bytes]:
        ctx = ssl.create_default_context(cafile=str(self.ca_pem))
        raw = socket.create_connection((EDGE_IP, self.edge.ports[port]), timeout=10)
        if port == "https":
            sock: socket.socket = ctx.wrap_socket(raw, server_hostname=host)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, self.edge.ports[port], context=ctx,
                                                                           timeout=10)
        else:
            sock = raw
            conn = http.client.HTTPConnection(host, self.edge.ports[port], timeout=10)
        conn.sock = sock
        try:
            conn.request("GET", path, headers={"Host": host})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def live(self, tunnel_id: str) -> bool:
        return bool(self.loop.run(_live(self.api, tunnel_id)))


async def _live(api: LabCloudflare, tunnel_id: str) -> int:
    return len(api.live_connectors(tunnel_id))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("cfedge")
    ca_pem, ca_key = pki.make_ca(tmp)
    api_cert, api_key = pki.issue(ca_pem, ca_key, tmp, "api", [EDGE_IP])
    api_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    api_ctx.load_cert_chain(api_cert, api_key)

    api = LabCloudflare([EDGE_IP], connector_ttl=3.0)
    account = api.add_account("homelab")
    zone = api.add_zone(ZONE, account)
    api.add_token(TOKEN, ("Zone Read", "DNS Write", "Cloudflare Tunnel Write"))
    edge = LabCloudflareEdge(api, ca_pem, ca_key, tmp / "edge", poll_seconds=0.5, request_timeout=10)
    loop = Background("cfedge-loop")
    loop.run(api.start(EDGE_IP, 0, api_ctx))
    loop.run(edge.start(EDGE_IP, https_port=0, http_port=0, tunnel_port=0))

    # the origin: Traefik's address, with a certificate from a CA the stand-in trusts as an issuer's
    origin_dir = tmp / "origin"
    origin_dir.mkdir()
    origin_ca, origin_ca_key = pki.make_ca(origin_dir)
    origin_cert, origin_key = pki.issue(origin_ca, origin_ca_key, origin_dir, "origin", [APP, f"*.{ZONE}"])
    origin = _Origin((LB_IP, 0), _OriginHandler)
    origin.seen_sni = []
    octx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    octx.load_cert_chain(origin_cert, origin_key)
    octx.sni_callback = lambda _sock, name, _ctx: origin.seen_sni.append(name)  # type: ignore[func-returns-value]
    origin.socket = octx.wrap_socket(origin.socket, server_side=True)
    threading.Thread(target=origin.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    charts = tmp / "charts"
    charts.mkdir()
    (charts / "outside.json").write_bytes(outside_index(EDGE_NAMES[0], ca_pem.read_text(), edge_address=EDGE_IP,
                                                        edge_port=edge.ports["tunnel"]))
    data = tmp / "data"
    acme = data / "server" / "tls" / "standin-acme"
    acme.mkdir(parents=True)
    (acme / "letsencrypt.crt").write_bytes(origin_ca.read_bytes())
    handle = serve({"data-dir": str(data), "https-listen-port": 0, "bind-address": "127.0.0.1",
                    "node-ip": "127.0.0.1", "node-name": "cp", "write-kubeconfig": str(tmp / "k3s.yaml"),
                    "token": "edge-test-cluster-token"},
                   env={"K3S_STANDIN_ANNOUNCE": "0", "K3S_STANDIN_CHARTS": str(charts)})
    controllers = handle._server.controllers
    assert controllers is not None
    origin_port = origin.server_address[1]
    controllers.tunnels.dial = lambda ip, port: (ip, origin_port) if (ip, port) == (LB_IP, 443) else (ip, port)
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(handle.kubeconfig), client_configuration=configuration)
    kube = client.ApiClient(configuration)
    cf = Cloudflare(TOKEN, base_url=api.url, ca_bundle=str(ca_pem))
    world = World(loop, api, edge, cf, account, zone.id, ca_pem, handle, kube, origin)
    try:
        yield world
    finally:
        cf.close()
        kube.close()
        handle.stop()
        origin.shutdown()
        loop.run(edge.stop())
        loop.run(api.stop())
        loop.close()


def _traefik_service(kube: client.ApiClient) -> None:
    core = client.CoreV1Api(kube)
    core.create_namespaced_service("kube-system", {"metadata": {"name": "traefik"}, "spec": {
        "type": "LoadBalancer", "selector": {"app": "traefik"}, "ports": [{"name": "websecure", "port": 443}]}})
    core.patch_namespaced_service_status("traefik", "kube-system",
                                         {"status": {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}})


def _cloudflared(kube: client.ApiClient, token: str, namespace: str = "cloudflared") -> None:
    core, apps = client.CoreV1Api(kube), client.AppsV1Api(kube)
    core.create_namespace({"metadata": {"name": namespace}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "tunnel-token"},
                                              "data": {"token": base64.b64encode(token.encode()).decode()}})
    apps.create_namespaced_deployment(namespace, {
        "metadata": {"name": "cloudflared"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "cloudflared"}}, "template": {
            "metadata": {"labels": {"app": "cloudflared"}},
            "spec": {"containers": [{
                "name": "cloudflared", "image": "cloudflare/cloudflared:2025.9.1",
                "args": ["tunnel", "--no-autoupdate", "--metrics", "0.0.0.0:2000", "run"],
                "env": [{"name": "TUNNEL_TOKEN", "valueFrom": {"secretKeyRef": {"name": "tunnel-token",
                                                                                "key": "token"}}}]}]}}}})


def _ready(world: World, namespace: str = "cloudflared") -> None:
    """The stand-in's workload controller makes the Deployment Ready once its Secret exists."""
    apps = client.AppsV1Api(world.kube)

    def ready() -> bool:
        status = apps.read_namespaced_deployment_status("cloudflared", namespace).status
        return status is not None and (status.ready_replicas or 0) >= 1

    wait_for("cloudflared Ready", ready)


def test_requests_reach_the_origin_only_through_record_rule_and_live_connector(world: World) -> None:
    cf, account = world.cf, world.account
    tunnel = cf.create_tunnel(account, "homelab")
    tunnel_id = tunnel["id"]
    cf.put_tunnel_configuration(account, tunnel_id, ingress_config({APP: ORIGIN_SERVICE}))

    # a host in the zone without a record: DNS would not resolve it; the edge has nothing to serve
    status, _, body = world.get(APP)
    assert status == 530 and b"1001" in body

    cf.create_dns_record(world.zone_id, tunnel_cname(APP, tunnel_id))
    cf.create_dns_record(world.zone_id, tunnel_cname(f"norule.{ZONE}", tunnel_id))
    cf.create_dns_record(world.zone_id, tunnel_cname(f"stale.{ZONE}", str(uuid.uuid4())))

    # record and rule, but no connector yet: Cloudflare Tunnel error 1033
    status, headers, body = world.get(APP)
    assert status == 530 and b"1033" in body and headers["server"] == "cloudflare"
    # a record pointing at no tunnel: Origin DNS error 1016
    status, _, body = world.get(f"stale.{ZONE}")
    assert status == 530 and b"1016" in body

    _traefik_service(world.kube)
    _cloudflared(world.kube, cf.tunnel_token(account, tunnel_id))
    _ready(world)
    wait_for("the connector registered", lambda: world.live(tunnel_id))
    assert cf.tunnel(account, tunnel_id)["status"] == "healthy"
    assert len(cf.tunnel_connections(account, tunnel_id)) == 1

    status, headers, body = world.get(APP, "/api/health?x=1")
    assert status == 200, body
    seen = json.loads(body)
    assert seen["host"] == APP and seen["path"] == "/api/health?x=1" and seen["sni"] == APP
    assert seen["cf_connecting_ip"] == "127.0.0.1" and headers["cf-ray"].endswith("-LAB")

    # a routed host without an ingress rule falls to the catch-all
    status, _, _ = world.get(f"norule.{ZONE}")
    assert status == 404

    # plain HTTP is redirected (Always Use HTTPS)
    status, headers, _ = world.get(APP, "/login?next=/", port="http")
    assert status == 301 and headers["location"] == f"https://{APP}/login?next=/"

    # a name in no zone of the account: the edge cannot show a certificate for it
    with pytest.raises(ssl.SSLCertVerificationError):
        world.get("www.example.org")

    # the Deployment scaled to zero: the connector shuts down, the tunnel has no connection
    client.AppsV1Api(world.kube).patch_namespaced_deployment("cloudflared", "cloudflared", {"spec": {"replicas": 0}})
    wait_for("the connector gone", lambda: not world.live(tunnel_id))
    status, _, body = world.get(APP)
    assert status == 530 and b"1033" in body

    # back to one replica: it connects again; then the tunnel can only be deleted once its connections are cleaned
    client.AppsV1Api(world.kube).patch_namespaced_deployment("cloudflared", "cloudflared", {"spec": {"replicas": 1}})
    wait_for("the connector back", lambda: world.live(tunnel_id))
    wait_for("served again", lambda: world.get(APP)[0] == 200)
    client.AppsV1Api(world.kube).delete_namespaced_deployment("cloudflared", "cloudflared")
    wait_for("the connector gone after the delete", lambda: not world.live(tunnel_id))
    cf.clean_tunnel_connections(account, tunnel_id)
    cf.delete_tunnel(account, tunnel_id)
    status, _, body = world.get(APP)
    assert status == 530 and b"1016" in body


def _register(world: World, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    ctx = ssl.create_default_context(cafile=str(world.ca_pem))
    raw = socket.create_connection((EDGE_IP, world.edge.ports["tunnel"]), timeout=10)
    conn = http.client.HTTPSConnection(EDGE_NAMES[0], world.edge.ports["tunnel"], context=ctx, timeout=10)
    conn.sock = ctx.wrap_socket(raw, server_hostname=EDGE_NAMES[0])
    try:
        conn.request("POST", "/register", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_wrong_secret_is_refused_and_silent_connectors_expire(world: World) -> None:
    cf, account = world.cf, world.account
    tunnel_id = cf.create_tunnel(account, "other")["id"]
    token = json.loads(base64.b64decode(cf.tunnel_token(account, tunnel_id)))
    wrong = base64.b64encode(b"w" * 32).decode()
    status, body = _register(world, {"account_tag": token["a"], "tunnel_id": tunnel_id, "tunnel_secret": wrong,
                                     "client_id": str(uuid.uuid4())})
    assert status == 401 and body["error"] == "Unauthorized: Invalid tunnel secret"
    assert not world.live(tunnel_id)

    # a cloudflared Deployment holding a token with the wrong secret never connects
    bad = base64.b64encode(json.dumps({"a": token["a"], "t": tunnel_id, "s": wrong}).encode()).decode()
    _cloudflared(world.kube, bad, namespace="wrong")
    _ready(world, "wrong")
    controllers = world.handle._server.controllers
    assert controllers is not None
    wait_for("the wrong connector started", lambda: "wrong/cloudflared" in controllers.tunnels.connectors)
    assert not controllers.tunnels.connectors["wrong/cloudflared"].registered.wait(1.0)
    assert not world.live(tunnel_id)

    # the right secret registers; without polls the connection lapses after the TTL
    status, body = _register(world, {"account_tag": token["a"], "tunnel_id": tunnel_id,
                                     "tunnel_secret": token["s"], "client_id": str(uuid.uuid4())})
    assert status == 200 and body["ttl_seconds"] == 3.0
    assert world.live(tunnel_id)
    wait_for("the silent connector expired", lambda: not world.live(tunnel_id), timeout=8)
    cf.create_dns_record(world.zone_id, tunnel_cname(f"other.{ZONE}", tunnel_id))
    status, _, page = world.get(f"other.{ZONE}")
    assert status == 530 and b"1033" in page
    assert tunnel_target(tunnel_id) in {r["content"] for r in cf.dns_records(world.zone_id)}

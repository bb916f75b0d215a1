"""LabCloudflareEdge: Cloudflare's edge for the lab, in front of tunnels made through LabCloudflare.

Three listeners on the edge address (aiohttp, one event loop with the API):

- HTTPS (:443): the certificate is chosen by SNI per zone (apex and wildcard, issued from the CA given, as
  Cloudflare's Universal SSL covers `example.com` and `*.example.com`); a name in no zone gets the edge's own
  certificate, which the client cannot verify for that name (real DNS would not have led it here at all).
  A request for host H is served only when H has a proxied record in a zone (a wildcard record counts when
  no exact name exists) whose CNAME chain, inside the account's zones, ends at `<tunnel id>.cfargotunnel.com`
  of an existing tunnel of that account, and that tunnel has a live connector. The connector (cloudflared)
  then applies the tunnel's ingress rules, as real cloudflared does with a remotely-managed configuration.
  Otherwise the answer is Cloudflare's (https://developers.cloudflare.com/support/troubleshooting/
  http-status-codes/cloudflare-1xxx-errors/, .../cloudflare-5xx-errors/): HTTP 530 with error 1033 (Cloudflare
  Tunnel error: the tunnel has no active connector), 530 with 1016 (Origin DNS error: the record's target
  resolves to nothing, e.g. a deleted tunnel), 530 with 1001 (DNS resolution error: no proxied record),
  523 (origin unreachable: a proxied A/AAAA, the lab has no route to it), 524 (the connector did not answer
  in time), 502 (the connector went away with the request).
- HTTP (:80): 301 to https://H/path for names served as above (the "Always Use HTTPS" setting), else the
  same errors.
- The tunnel endpoint (:7844, TLS, names `region1.v2.argotunnel.com` and `region2.v2.argotunnel.com`, the
  names cloudflared finds through the SRV record _v2-origintunneld._tcp.argotunnel.com).

Connector protocol (the lab's stand-in for cloudflared's QUIC/HTTP2 + Cap'n Proto RPC; outbound only from
the connector, like cloudflared: the cluster opens no port). JSON over HTTPS on :7844:

    POST /register    {"account_tag", "tunnel_id", "tunnel_secret": base64, "client_id", "version", "arch"}
                      -> 200 {"session", "connection_id", "colo_name", "poll_seconds", "ttl_seconds",
                              "config", "config_version"}
                      -> 401 {"error": "Unauthorized: Invalid tunnel secret"} (or "... Tunnel not found")
    POST /poll        Authorization: Bearer <session>; {"config_version": n}
                      long-polls up to poll_seconds -> 200 {"requests": [...], "config_version": n,
                      "config": {...} only when newer than the connector's}; 401: register again.
                      Each poll is the connector's heartbeat: it is live until ttl_seconds (15 s) after its last.
    POST /respond     Authorization: Bearer <session>; {"id", "status", "headers": [[k, v]], "body": base64}
    POST /unregister  Authorization: Bearer <session> (graceful shutdown; the connector is gone at once)

A request is {"id", "method", "host", "path" (with the query), "headers": [[k, v]], "body": base64,
"client_ip"}. The tunnel secret crosses only inside TLS and is never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import secrets
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from homelab.lab import pki
from homelab.lab.cloudflare import TUNNEL_DOMAIN, Connector, LabCloudflare, Tunnel, Zone
from homelab.lab.serving import serve_app

__all__ = ['EDGE_NAMES', 'LabCloudflareEdge']

log = logging.getLogger("homelab.lab.cloudflare_edge")

EDGE_NAMES = ("region1.v2.argotunnel.com", "region2.v2.argotunnel.com")
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "content-length", "host"})
MAX_CHAIN = 8
ERRORS = {
    1001: (530, "DNS resolution error"),
    1016: (530, "Origin DNS error"),
    1033: (530, "Cloudflare Tunnel error"),
    502: (502, "Bad gateway"),
    523: (523, "Origin is unreachable"),
    524: (524, "A timeout occurred"),
}
Json = dict[str, Any]


@dataclass
class _Pending:
    item: Json
    future: asyncio.Future[Json] = field(repr=False)


@dataclass
class _Route:
    """Where a host goes: a tunnel, an origin address, or an error code."""

    tunnel: Tunnel | None = None
    address: str | None = None
    error: int | None = None


class LabCloudflareEdge:
    """The edge in front of `api`'s zones and tunnels. `ports` has the bound ports once started."""

    def __init__(self, api: LabCloudflare, ca_pem: Path, ca_key: Path, workdir: Path, *,
                 tunnel_names: Sequence[str] = EDGE_NAMES, poll_seconds: float = 5.0,
                 request_timeout: float = 30.0) -> None:
        self.api = api
        self.ca_pem, self.ca_key, self.workdir = ca_pem, ca_key, workdir
        self.tunnel_names = list(tunnel_names)
        self.poll_seconds = poll_seconds
        self.request_timeout = request_timeout
        self.ports: dict[str, int] = {}
        self.host: str | None = None
        self._runners: list[web.AppRunner] = []
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._queues: dict[str, asyncio.Queue[_Pending]] = {}
        self._pending: dict[str, _Pending] = {}

    # -------------------------------------------------------------------------------- TLS

    def _context(self, stem: str, names: Sequence[str]) -> ssl.SSLContext:
        ctx = self._contexts.get(stem)
        if ctx is None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            cert, key = pki.issue(self.ca_pem, self.ca_key, self.workdir, stem, names)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(cert, key)
            self._contexts[stem] = ctx
        return ctx

    def zone_context(self, zone: Zone) -> ssl.SSLContext:
        """The zone's edge certificate: the apex and its wildcard (Universal SSL)."""
        return self._context(f"zone-{zone.name}", [zone.name, f"*.{zone.name}"])

    def _edge_context(self) -> ssl.SSLContext:
        names = [*self.tunnel_names, *([self.host] if self.host else [])]
        return self._context("edge", names)

    def _https_context(self) -> ssl.SSLContext:
        self._edge_context()  # issues edge.pem/edge.key: the certificate for names in no zone

        def pick(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            zone = self.zone_of(name or "")
            if zone is not None:
                try:
                    sslobj.context = self.zone_context(zone)
                except Exception:  # never break the handshake over issuing; the client sees the edge cert
                    log.exception("lab edge: certificate for %s", zone.name)

        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.minimum_version = ssl.TLSVersion.TLSv1_2
        edge_cert = self.workdir / "edge.pem"
        server.load_cert_chain(edge_cert, self.workdir / "edge.key")
        server.sni_callback = pick
        return server

    # ---------------------------------------------------------------------------- serving

    async def start(self, host: str, *, https_port: int = 443, http_port: int = 80, tunnel_port: int = 7844) -> None:
        """Listen on host: HTTPS, HTTP and the tunnel endpoint (a port 0 picks a free one; see `ports`)."""
        self.host = host
        self._edge_context()
        try:
            for name, port, handler, ctx in (
                    ("https", https_port, self._https, self._https_context()),
                    ("http", http_port, self._http, None),
                    ("tunnel", tunnel_port, self._tunnel_endpoint, self._edge_context())):
                runner, self.ports[name] = await serve_app(handler, host, port, ctx, max_body=16 << 20)
                self._runners.append(runner)
        except BaseException:
            await self.stop()
            raise
        log.info("Cloudflare edge (lab) on %s: https %d, http %d, tunnels %d", host, self.ports["https"],
                 self.ports["http"], self.ports["tunnel"])

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.cancel()
        self._pending.clear()

    # ---------------------------------------------------------------------------- routing

    def zone_of(self, host: str) -> Zone | None:
        host = host.lower().rstrip(".")
        found = [z for z in self.api.zones.values() if host == z.name or host.endswith("." + z.name)]
        return max(found, key=lambda z: len(z.name)) if found else None

    def route(self, host: str) -> _Route:  # noqa: PLR0911 - each way a name fails to resolve
        """Follow H's proxied record to a tunnel (or origin address), as the edge resolves it."""
        host = host.lower().rstrip(".")
        zone = self.zone_of(host)
        if zone is None:
            return _Route(error=1001)
        records = self._records_at(zone, host)
        if not records or not any(r["proxied"] for r in records):
            return _Route(error=1001)
        name, seen = host, {host}
        for _ in range(MAX_CHAIN):
            cnames = [r for r in records if r["type"] == "CNAME"]
            if not cnames:
                addresses = [r["content"] for r in records if r["type"] in ("A", "AAAA")]
                return _Route(address=addresses[0]) if addresses else _Route(error=1016)
            target = cnames[0]["content"].lower().rstrip(".")
            if target.endswith("." + TUNNEL_DOMAIN):
                tunnel = self.api.tunnels.get(target[: -len(TUNNEL_DOMAIN) - 1])
                if tunnel is None or tunnel.deleted_at or tunnel.account_id != zone.account_id:
                    return _Route(error=1016)
                return _Route(tunnel=tunnel)
            next_zone = self.zone_of(target)
            if next_zone is None or next_zone.account_id != zone.account_id or target in seen:
                return _Route(error=1016)
            name, zone = target, next_zone
            seen.add(name)
            records = self._records_at(zone, name)
            if not records:
                return _Route(error=1016)
        return _Route(error=1016)

    def _records_at(self, zone: Zone, name: str) -> list[Json]:
        exact = [r for r in zone.records.values() if r["name"] == name and r["type"] in ("A", "AAAA", "CNAME")]
        if exact or name == zone.name:
            return exact
        if any(r["name"] == name for r in zone.records.values()):
            return []  # the name exists with other types: no wildcard synthesis (RFC 4592)
        wildcard = "*." + name.split(".", 1)[1]
        return [r for r in zone.records.values() if r["name"] == wildcard and r["type"] in ("A", "AAAA", "CNAME")]

    # ------------------------------------------------------------------------- visitors

    async def _http(self, request: web.Request) -> web.StreamResponse:
        host = _host(request)
        found = self.route(host)
        if found.error == 1001:
            return _error_page(1001, host)
        location = f"https://{host}{request.rel_url}"
        return web.Response(status=301, headers={"Location": location, "Server": "cloudflare",
                                                 "CF-RAY": _ray()})

    async def _https(self, request: web.Request) -> web.StreamResponse:
        host = _host(request)
        self.api.expire_connectors()
        found = self.route(host)
        if found.error is not None:
            return _error_page(found.error, host)
        if found.tunnel is None:
            return _error_page(523, host)
        if not self.api.live_connectors(found.tunnel.id):
            return _error_page(1033, host)
        ray = _ray()
        body = await request.read()
        client_ip = request.remote or ""
        headers = [[k, v] for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        headers += [["CF-Connecting-IP", client_ip], ["X-Forwarded-For", client_ip], ["X-Forwarded-Proto", "https"],
                    ["CF-RAY", ray], ["CF-Visitor", '{"scheme":"https"}']]
        item: Json = {"id": uuid.uuid4().hex, "method": request.method, "host": host, "path": str(request.rel_url),
                "headers": headers, "body": base64.b64encode(body).decode(), "client_ip": client_ip}
        pending = _Pending(item, asyncio.get_running_loop().create_future())
        request_id = str(item["id"])
        self._pending[request_id] = pending
        await self._queue(found.tunnel.id).put(pending)
        try:
            answer = await asyncio.wait_for(asyncio.shield(pending.future), self.request_timeout)
        except TimeoutError:
            return _error_page(524, host)
        except asyncio.CancelledError:
            if pending.future.cancelled():
                return _error_page(502, host)
            raise
        finally:
            self._pending.pop(request_id, None)
            if not pending.future.done():  # the visitor got 524 or left: no connector may replay it later
                pending.future.cancel()
        out = web.Response(status=int(answer.get("status") or 502), body=_b64(answer.get("body")))
        for key, value in answer.get("headers") or []:
            if str(key).lower() not in HOP_BY_HOP and str(key).lower() not in ("server", "cf-ray"):
                out.headers.add(str(key), str(value))
        out.headers["Server"] = "cloudflare"
        out.headers["CF-RAY"] = ray
        return out

    def _queue(self, tunnel_id: str) -> asyncio.Queue[_Pending]:
        queue = self._queues.get(tunnel_id)
        if queue is None:
            queue = self._queues[tunnel_id] = asyncio.Queue()
        return queue

    # ------------------------------------------------------------------------- connectors

    async def _tunnel_endpoint(self, request: web.Request) -> web.StreamResponse:  # noqa: PLR0911 - a dispatcher
        if request.method != "POST":
            return web.json_response({"error": "method not allowed"}, status=405)
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            return web.json_response({"error": "malformed JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "malformed JSON"}, status=400)
        if request.path == "/register":
            return self._register(body, request.remote or "")
        session = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        conn = self.api.connectors.get(session)
        self.api.expire_connectors()
        if conn is None or session not in self.api.connectors:
            return web.json_response({"error": "Unauthorized: unknown or expired connection"}, status=401)
        if request.path == "/poll":
            return await self._poll(conn, body)
        if request.path == "/respond":
            pending = self._pending.get(str(body.get("id")))
            if pending is None or pending.future.done():
                return web.json_response({"error": "no such request"}, status=404)
            pending.future.set_result(body)
            return web.Response(status=204)
        if request.path == "/unregister":
            self.api.drop_connector(session)
            log.info("lab edge: connector %s of tunnel %s unregistered", conn.client_id, conn.tunnel_id)
            return web.Response(status=204)
        return web.json_response({"error": "not found"}, status=404)

    def _register(self, body: Json, remote: str) -> web.Response:
        tunnel = self.api.tunnels.get(str(body.get("tunnel_id") or ""))
        if tunnel is None or tunnel.deleted_at or tunnel.account_id != body.get("account_tag"):
            return web.json_response({"error": "Unauthorized: Tunnel not found"}, status=401)
        try:
            secret = base64.b64decode(str(body.get("tunnel_secret") or ""), validate=True)
        except binascii.Error:
            secret = b""
        if not hmac.compare_digest(secret, tunnel.secret):
            log.info("lab edge: refused a connector for tunnel %s: invalid tunnel secret", tunnel.id)
            return web.json_response({"error": "Unauthorized: Invalid tunnel secret"}, status=401)
        client_id = str(body.get("client_id") or uuid.uuid4())
        for session, old in list(self.api.connectors.items()):
            if old.client_id == client_id and old.tunnel_id == tunnel.id:
                self.api.drop_connector(session)
        conn = self.api.attach(tunnel, client_id, remote, str(body.get("version") or "?"),
                               str(body.get("arch") or "linux_amd64"))
        log.info("lab edge: connector %s registered for tunnel %s (%s)", client_id, tunnel.name, tunnel.id)
        return web.json_response({"session": conn.session, "connection_id": conn.connection_id, "colo_name": "LAB",
                                  "poll_seconds": self.poll_seconds, "ttl_seconds": self.api.connector_ttl,
                                  "config": tunnel.config, "config_version": tunnel.version})

    async def _poll(self, conn: Connector, body: Json) -> web.Response:
        conn.last_seen = time.monotonic()
        tunnel = self.api.tunnels.get(conn.tunnel_id)
        queue = self._queue(conn.tunnel_id)
        taken: list[_Pending] = []
        try:
            first = await asyncio.wait_for(queue.get(), self.poll_seconds)
            taken.append(first)
            while len(taken) < 16 and not queue.empty():
                taken.append(queue.get_nowait())
        except TimeoutError:
            pass
        if conn.session not in self.api.connectors:  # cleaned or unregistered meanwhile: hand the work back
            for pending in taken:
                queue.put_nowait(pending)
            return web.json_response({"error": "Unauthorized: unknown or expired connection"}, status=401)
        conn.last_seen = time.monotonic()
        answer: Json = {"requests": [p.item for p in taken if not p.future.done()]}
        version = tunnel.version if tunnel is not None else 0
        answer["config_version"] = version
        if tunnel is not None and int(body.get("config_version") or 0) < version:
            answer["config"] = tunnel.config
        return web.json_response(answer)


def _host(request: web.Request) -> str:
    host = request.host or ""
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


def _ray() -> str:
    return f"{secrets.token_hex(8)}-LAB"


def _b64(value: Any) -> bytes:
    try:
        return base64.b64decode(str(value or ""), validate=True)
    except binascii.Error:
        return b""


def _error_page(code: int, host: str) -> web.Response:
    """Cloudflare's error page, with the status it is served with (1xxx errors are HTTP 530)."""
    status, title = ERRORS[code]
    ray = _ray()
    page = (f"<!DOCTYPE html>\n<html><head><title>{title} | {host} | Cloudflare</title></head><body>"
            f"<h1><span>Error</span> <span>{code}</span></h1><h2>{title}</h2>"
            f"<p>Cloudflare Ray ID: {ray}</p></body></html>\n")
    return web.Response(status=status, text=page, content_type="text/html",
                        headers={"Server": "cloudflare", "CF-RAY": ray})

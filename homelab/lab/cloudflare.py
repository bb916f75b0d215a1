"""LabCloudflare: the parts of the Cloudflare API v4 that the access layer uses, with Cloudflare's shapes.

Served over HTTPS by aiohttp (`await start(host, port, ssl_context)`), every answer is the v4 envelope
`{"success", "errors": [{"code", "message"}], "messages", "result", "result_info"}`
(https://developers.cloudflare.com/fundamentals/api/how-to/make-api-calls/). What is emulated:

- tokens, configured by the lab with `add_token(value, permissions={...}, zones=[...])`, permissions being
  API permission-group names ("Zone Read", "DNS Write", "Cloudflare Tunnel Write", "API Tokens Read", ...;
  https://developers.cloudflare.com/fundamentals/api/reference/permissions/). A request the token's groups
  or resources do not cover gets HTTP 403 `{"code": 10000, "message": "Authentication error"}`; an unknown
  token HTTP 401 code 1000 "Invalid API Token"; no or a malformed Authorization header HTTP 400 code 6003
  "Invalid request headers" (error_chain 6111 "Invalid format for Authorization header").
- GET /user/tokens/verify and /accounts/{id}/tokens/verify ({"id", "status", ...}; message 10000 "This API
  Token is valid and active"); an account-owned token is refused (401) by the user endpoint.
  GET /user/tokens/{id} (needs "API Tokens Read") and /accounts/{id}/tokens/{id} ("Account API Tokens Read")
  show the token's policies ({"effect", "permission_groups": [{"id", "name"}], "resources"}).
- GET /accounts, /accounts/{id}; GET /zones (filters name, account.id, status; page/per_page 5..50) and
  /zones/{id}. Zones carry the legacy `permissions` array ("#zone:read", "#dns_records:edit", ...) for the
  token asking, which is how a token can see what it may do on a zone.
- DNS records (https://developers.cloudflare.com/api/resources/dns/subresources/records/): list with filters
  name, type, content, proxied, comment (and comment.present/absent/startswith/contains), order/direction,
  page/per_page (default 100, at least 5); create, get, PATCH, PUT, DELETE. Names are made absolute as
  Cloudflare does ("@" is the apex, a name outside the zone gets the zone appended). Validation errors are
  HTTP 400 code 1004 "DNS Validation Error" with an error_chain: 9005/9006 bad A/AAAA content, 9007 "Content
  for CNAME record is invalid.", 9004 "This kind of record cannot be proxied" (only A, AAAA, CNAME can be),
  9041 for proxied private addresses. Name clashes: 81053 "An A, AAAA, or CNAME record with that host
  already exists." (a CNAME where A/AAAA/CNAME are), 81054 "A CNAME record with that host already exists."
  (A/AAAA where a CNAME is), 81057 "Record already exists." (an identical record); a missing record is
  HTTP 404 code 81044 "Record does not exist.".
- faults: `inject(429, retry_after=...)` answers the next requests with the rate limit (HTTP 429, code 971,
  Retry-After; https://developers.cloudflare.com/fundamentals/api/reference/limits/) or a 5xx.
- Cloudflare Tunnel (https://developers.cloudflare.com/api/resources/zero_trust/subresources/tunnels/):
  /accounts/{id}/cfd_tunnel create (name, config_src, tunnel_secret >= 32 bytes; the answer has
  `credentials_file` and `token`), list (name, is_deleted, uuid, page/per_page), get, delete (refused with
  code 1022 while connectors are active, after which the tunnel shows `deleted_at`), .../token (base64 of
  JSON {"a": account tag, "t": tunnel id, "s": base64 secret}, cloudflared's connection.TunnelToken),
  .../configurations get/put (version counts up; the last ingress rule must be a catch-all), and
  .../connections list/delete (`client_id` for one connector). A duplicate name is HTTP 409 code 1013.
  Codes not found in Cloudflare's documentation (invalid tunnel config, invalid tunnel secret) use 1001.

Connectors (cloudflared) attach through the edge (homelab.lab.cloudflare_edge), which shares this state:
`connectors` per tunnel, live while they keep polling (`connector_ttl`, 15 s).

The public DNS view: after every change to a zone's records `on_dns(zone_name, {fqdn: {type: [values]}})`
is called with the zone's whole public answer set: proxied records resolve to `edge_addresses` (as Cloudflare
answers proxied names with its anycast addresses), DNS-only records to their content. `dns_sync(labdns,
view)` makes a callback that applies it to a `homelab.lab.dns.LabDns` view. Callbacks run on the loop thread.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import ipaddress
import json
import logging
import re
import secrets
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from homelab.lab.k3s_standin.tunnel import decode_token as decode_tunnel_token  # cloudflared's reading
from homelab.lab.serving import serve_app

if TYPE_CHECKING:
    from homelab.lab.dns import LabDns

__all__ = [
    'TUNNEL_DOMAIN',
    'Connector',
    'LabCloudflare',
    'LabToken',
    'decode_tunnel_token',
    'dns_sync',
    'encode_tunnel_token',
]

log = logging.getLogger("homelab.lab.cloudflare")

Json = dict[str, Any]
DnsCallback = Callable[[str, dict[str, dict[str, list[str]]]], None]
TUNNEL_DOMAIN = "cfargotunnel.com"
PROXIABLE = ("A", "AAAA", "CNAME")
RECORD_TYPES = ("A", "AAAA", "CNAME", "TXT", "MX", "NS", "CAA", "SRV")
ZONE_GROUPS = ("Zone Read", "Zone Write", "DNS Read", "DNS Write")
TUNNEL_READ = ("Cloudflare Tunnel Read", "Cloudflare Tunnel Write")
TUNNEL_WRITE = ("Cloudflare Tunnel Write",)
# Legacy zone permission strings each group shows in a zone's `permissions` array.
LEGACY = {"Zone Read": ("#zone:read",), "Zone Write": ("#zone:read", "#zone:edit"),
          "DNS Read": ("#dns_records:read",), "DNS Write": ("#dns_records:read", "#dns_records:edit")}
HEX32 = re.compile(r"[0-9a-f]{32}")
LABEL = re.compile(r"(\*|[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)")
PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8",
                                             "169.254.0.0/16", "100.64.0.0/10", "fc00::/7", "fe80::/10", "::1/128")]
DEFAULT_TTL = 15.0  # seconds a connector stays live after its last poll


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _hex_id() -> str:
    return secrets.token_hex(16)


class ApiError(Exception):
    """An answer with success: false: HTTP status and Cloudflare's errors."""

    def __init__(self, status: int, code: int, message: str, chain: Iterable[tuple[int, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        error: Json = {"code": code, "message": message}
        chained = [{"code": c, "message": m} for c, m in chain]
        if chained:
            error["error_chain"] = chained
        self.errors = [error]


def forbidden() -> ApiError:
    return ApiError(403, 10000, "Authentication error")


def validation(code: int, message: str) -> ApiError:
    return ApiError(400, 1004, "DNS Validation Error", [(code, message)])


def encode_tunnel_token(account_tag: str, tunnel_id: str, secret: bytes) -> str:
    """cloudflared's TunnelToken: base64(JSON {"a": account tag, "s": base64 secret, "t": tunnel id})."""
    body = {"a": account_tag, "s": base64.b64encode(secret).decode(), "t": tunnel_id}
    return base64.b64encode(json.dumps(body, separators=(",", ":")).encode()).decode()


# ------------------------------------------------------------------------------------------ state

@dataclass
class LabToken:
    value: str = field(repr=False)
    id: str
    permissions: frozenset[str]
    zones: frozenset[str] | None  # zone names; None: every zone of its accounts
    accounts: frozenset[str] | None  # account ids; None: every account
    owner: str | None  # an account id for account-owned tokens, else None (a user token)
    status: str = "active"


@dataclass
class Zone:
    id: str
    name: str
    account_id: str
    created_on: str = field(default_factory=_now)
    records: dict[str, Json] = field(default_factory=dict)


@dataclass
class Tunnel:
    id: str
    name: str
    account_id: str
    secret: bytes = field(repr=False)
    config_src: str
    created_at: str = field(default_factory=_now)
    deleted_at: str | None = None
    config: Json | None = None
    version: int = 0
    config_at: str | None = None
    ever_connected: bool = False
    conns_active_at: str | None = None
    conns_inactive_at: str | None = None


@dataclass
class Connector:
    """One cloudflared instance attached through the edge (one session = one connection here)."""

    client_id: str
    tunnel_id: str
    session: str = field(repr=False)
    connection_id: str
    origin_ip: str
    version: str
    arch: str
    opened_at: str = field(default_factory=_now)
    last_seen: float = field(default_factory=time.monotonic)


class LabCloudflare:
    """The API state and its HTTPS server. `edge_addresses`: what proxied names resolve to."""

    def __init__(self, edge_addresses: Iterable[str] = (), on_dns: DnsCallback | None = None, *,
                 connector_ttl: float = DEFAULT_TTL) -> None:
        self.edge_addresses = list(edge_addresses)
        self.on_dns = on_dns
        self.connector_ttl = connector_ttl
        self.accounts: dict[str, str] = {}  # id -> name
        self.zones: dict[str, Zone] = {}
        self.tunnels: dict[str, Tunnel] = {}
        self.tokens: dict[str, LabToken] = {}
        self.connectors: dict[str, Connector] = {}  # session -> connector
        self.requests = 0
        self.faults: list[tuple[int, float | None]] = []  # (status, Retry-After) answered to the next requests
        self.writes = 0  # successful POST/PUT/PATCH/DELETE, so tests can prove a check wrote nothing
        self.host: str | None = None
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------------ lab set-up

    def add_account(self, name: str = "homelab", account_id: str | None = None) -> str:
        account_id = account_id or _hex_id()
        self.accounts[account_id] = name
        return account_id

    def add_zone(self, name: str, account_id: str, zone_id: str | None = None) -> Zone:
        zone = Zone(zone_id or _hex_id(), name.lower().rstrip("."), account_id)
        self.zones[zone.id] = zone
        self._publish(zone)
        return zone

    def add_token(self, value: str, permissions: Iterable[str], *, zones: Iterable[str] | None = None,
                  accounts: Iterable[str] | None = None, account_owned: str | None = None,
                  status: str = "active") -> LabToken:
        """A token with these permission groups on these zones (names) and accounts (ids); None: all."""
        token = LabToken(value, _hex_id(), frozenset(permissions),
                         None if zones is None else frozenset(z.lower() for z in zones),
                         None if accounts is None else frozenset(accounts), account_owned, status)
        self.tokens[value] = token
        return token

    def zone_by_name(self, name: str) -> Zone | None:
        return next((z for z in self.zones.values() if z.name == name.lower().rstrip(".")), None)

    # ------------------------------------------------------------------------ connectors

    def live_connectors(self, tunnel_id: str) -> list[Connector]:
        now = time.monotonic()
        return [c for c in self.connectors.values()
                if c.tunnel_id == tunnel_id and now - c.last_seen <= self.connector_ttl]

    def expire_connectors(self) -> None:
        """Forget connectors past their TTL (a cloudflared that died without unregistering)."""
        now = time.monotonic()
        for session, conn in list(self.connectors.items()):
            if now - conn.last_seen > self.connector_ttl:
                self.drop_connector(session)

    def drop_connector(self, session: str) -> None:
        conn = self.connectors.pop(session, None)
        if conn is None:
            return
        tunnel = self.tunnels.get(conn.tunnel_id)
        if tunnel is not None and not self.live_connectors(tunnel.id):
            tunnel.conns_inactive_at = _now()

    def attach(self, tunnel: Tunnel, client_id: str, origin_ip: str, version: str, arch: str) -> Connector:
        conn = Connector(client_id, tunnel.id, secrets.token_urlsafe(32), str(uuid.uuid4()), origin_ip, version, arch)
        self.connectors[conn.session] = conn
        tunnel.ever_connected = True
        tunnel.conns_active_at = tunnel.conns_active_at or conn.opened_at
        return conn

    # --------------------------------------------------------------------------- serving

    @property
    def url(self) -> str:
        if self.host is None or self.port is None:
            raise RuntimeError("the Cloudflare API is not running")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}/client/v4"

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        """Listen on host:port (0: a free port, then in `self.port`); the API is under /client/v4."""
        self._runner, self.port = await serve_app(self._handle, host, port, ssl_context)
        self.host = host
        log.info("Cloudflare API (lab) at %s", self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def inject(self, status: int, *, retry_after: float | None = None, times: int = 1) -> None:
        """Answer the next `times` requests with `status` (429: Cloudflare's rate limit, code 971; else 500s)."""
        self.faults.extend([(status, retry_after)] * times)

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.faults:
            status, after = self.faults.pop(0)
            error = (ApiError(429, 971, "Please wait and consider throttling your request speed") if status == 429
                     else ApiError(status, 10001, "Internal server error"))
            response = _answer(error)
            if after is not None:
                response.headers["Retry-After"] = str(int(after)) if after == int(after) else str(after)
            return response
        path = request.path
        if not path.startswith("/client/v4/"):
            return _answer(ApiError(404, 7000, "No route for that URI"))
        parts = [p for p in path[len("/client/v4/"):].split("/") if p]
        try:
            token = self._authenticate(request.headers.get("Authorization"), parts)
            body = await _body(request)
            found = self._route(request.method, parts)
            if found is None:
                raise ApiError(404, 7000, "No route for that URI")
            handler, args = found
            result = await handler(token, request.query, body, *args)
        except ApiError as exc:
            return _answer(exc)
        if request.method != "GET":
            self.writes += 1
        if isinstance(result, web.Response):
            return result
        return _ok(result)

    def _authenticate(self, header: str | None, parts: list[str]) -> LabToken:
        if not header:
            raise ApiError(400, 9106, "Missing X-Auth-Key, X-Auth-Email or Authorization headers")
        scheme, _, value = header.partition(" ")
        if scheme != "Bearer" or not re.fullmatch(r"[A-Za-z0-9_\-]{20,}", value):
            raise ApiError(400, 6003, "Invalid request headers", [(6111, "Invalid format for Authorization header")])
        token = self.tokens.get(value)
        if token is None:
            raise ApiError(401, 1000, "Invalid API Token")
        verify = parts[-2:] == ["tokens", "verify"]
        if token.status != "active" and not verify:
            raise ApiError(401, 1000, "Invalid API Token")
        return token

    Handler = Callable[..., Awaitable[Any]]

    def _route(self, method: str, parts: list[str]) -> tuple[Handler, tuple[str, ...]] | None:  # noqa: PLR0911, PLR0912
        n = len(parts)
        if parts[:1] == ["user"] and n >= 3 and parts[1] == "tokens":
            if n == 3 and parts[2] == "verify":
                return self._method(method, {"GET": self._verify_user}, ())
            if n == 3:
                return self._method(method, {"GET": self._token_details}, (parts[2], ""))
        if parts[:1] == ["accounts"]:
            if n == 1:
                return self._method(method, {"GET": self._accounts}, ())
            account = parts[1]
            if n == 2:
                return self._method(method, {"GET": self._account}, (account,))
            if n == 4 and parts[2] == "tokens":
                if parts[3] == "verify":
                    return self._method(method, {"GET": self._verify_account}, (account,))
                return self._method(method, {"GET": self._token_details}, (parts[3], account))
            if parts[2] == "cfd_tunnel":
                if n == 3:
                    return self._method(method, {"GET": self._tunnel_list, "POST": self._tunnel_create}, (account,))
                tunnel = parts[3]
                if n == 4:
                    return self._method(method, {"GET": self._tunnel_get, "DELETE": self._tunnel_delete},
                                        (account, tunnel))
                if n == 5 and parts[4] == "token":
                    return self._method(method, {"GET": self._tunnel_token}, (account, tunnel))
                if n == 5 and parts[4] == "configurations":
                    return self._method(method, {"GET": self._config_get, "PUT": self._config_put},
                                        (account, tunnel))
                if n == 5 and parts[4] == "connections":
                    return self._method(method, {"GET": self._conns_get, "DELETE": self._conns_delete},
                                        (account, tunnel))
        if parts[:1] == ["zones"]:
            if n == 1:
                return self._method(method, {"GET": self._zone_list}, ())
            zone = parts[1]
            if n == 2:
                return self._method(method, {"GET": self._zone_get}, (zone,))
            if parts[2] == "dns_records":
                if n == 3:
                    return self._method(method, {"GET": self._record_list, "POST": self._record_create}, (zone,))
                if n == 4:
                    return self._method(method, {"GET": self._record_get, "PATCH": self._record_patch,
                                                 "PUT": self._record_put, "DELETE": self._record_delete},
                                        (zone, parts[3]))
        return None

    def _method(self, method: str, table: Mapping[str, Handler],
                args: tuple[str, ...]) -> tuple[Handler, tuple[str, ...]]:
        handler = table.get(method)
        if handler is None:
            raise ApiError(405, 7001, "Method not allowed for this endpoint.")
        return handler, args

    # ---------------------------------------------------------------------- permissions

    def _account_ok(self, token: LabToken, account_id: str, groups: Iterable[str]) -> bool:
        if account_id not in self.accounts:
            return False
        if token.owner is not None and token.owner != account_id:
            return False
        if token.accounts is not None and account_id not in token.accounts:
            return False
        return bool(token.permissions & set(groups))

    def _zone_ok(self, token: LabToken, zone: Zone, groups: Iterable[str]) -> bool:
        if token.owner is not None and token.owner != zone.account_id:
            return False
        if token.accounts is not None and zone.account_id not in token.accounts:
            return False
        if token.zones is not None and zone.name not in token.zones:
            return False
        return bool(token.permissions & set(groups))

    def _zone(self, token: LabToken, zone_id: str, groups: Iterable[str]) -> Zone:
        if not HEX32.fullmatch(zone_id):
            raise ApiError(400, 7003, f"Could not route to /zones/{zone_id}, perhaps your object identifier is "
                                      "invalid?")
        zone = self.zones.get(zone_id)
        if zone is None or not self._zone_ok(token, zone, groups):
            raise forbidden()
        return zone

    def _account_of(self, token: LabToken, account_id: str, groups: Iterable[str]) -> str:
        if not HEX32.fullmatch(account_id):
            raise ApiError(400, 7003, f"Could not route to /accounts/{account_id}, perhaps your object identifier "
                                      "is invalid?")
        if not self._account_ok(token, account_id, groups):
            raise forbidden()
        return account_id

    # ---------------------------------------------------------------------------- tokens

    async def _verify_user(self, token: LabToken, _q: Any, _b: Any) -> web.Response:
        if token.owner is not None:
            raise ApiError(401, 1000, "Invalid API Token")
        return self._verify_result(token)

    async def _verify_account(self, token: LabToken, _q: Any, _b: Any, account_id: str) -> web.Response:
        if token.owner != account_id:
            raise ApiError(401, 1000, "Invalid API Token")
        return self._verify_result(token)

    def _verify_result(self, token: LabToken) -> web.Response:
        result = {"id": token.id, "status": token.status, "not_before": None, "expires_on": None}
        message = ("This API Token is valid and active" if token.status == "active"
                   else f"This API Token is {token.status}")
        return _ok(result, messages=[{"code": 10000, "message": message, "type": None}])

    async def _token_details(self, token: LabToken, _q: Any, _b: Any, token_id: str, account_id: str) -> Json:
        group = "Account API Tokens Read" if account_id else "API Tokens Read"
        target = next((t for t in self.tokens.values() if t.id == token_id), None)
        if group not in token.permissions or (account_id and token.owner != account_id):
            raise forbidden()
        if target is None or (target.owner or "") != account_id:
            raise ApiError(404, 1003, "Token not found")  # code not documented; 1003 assumed
        return self._token_object(target)

    def _token_object(self, token: LabToken) -> Json:
        zone_groups = sorted(token.permissions & set(ZONE_GROUPS))
        account_groups = sorted(token.permissions - set(ZONE_GROUPS))
        policies: list[Json] = []
        if zone_groups:
            if token.zones is None:
                zone_res: Json = {"com.cloudflare.api.account.zone.*": "*"}
            else:
                zone_res = {f"com.cloudflare.api.account.zone.{z.id}": "*" for z in self.zones.values()
                            if z.name in token.zones}
            policies.append({"id": _hex_id(), "effect": "allow", "resources": zone_res,
                             "permission_groups": [{"id": _group_id(g), "name": g} for g in zone_groups]})
        if account_groups:
            accounts = sorted(token.accounts) if token.accounts is not None else None
            account_res: Json = ({"com.cloudflare.api.account.*": "*"} if accounts is None
                                 else {f"com.cloudflare.api.account.{a}": "*" for a in accounts})
            policies.append({"id": _hex_id(), "effect": "allow", "resources": account_res,
                             "permission_groups": [{"id": _group_id(g), "name": g} for g in account_groups]})
        return {"id": token.id, "name": "lab token", "status": token.status, "issued_on": _now(),
                "modified_on": _now(), "policies": policies, "condition": {}}

    # -------------------------------------------------------------------- accounts, zones

    async def _accounts(self, token: LabToken, query: Mapping[str, str], _b: Any) -> web.Response:
        if token.owner is not None:
            raise ApiError(400, 1001, "List accounts endpoint does not support account owned tokens.")
        items = [{"id": a, "name": n, "type": "standard", "settings": {}, "created_on": _now()}
                 for a, n in sorted(self.accounts.items())
                 if token.accounts is None or a in token.accounts]
        return _paged(items, query, default=20, maximum=50)

    async def _account(self, token: LabToken, _q: Any, _b: Any, account_id: str) -> Json:
        groups = set(token.permissions) | {"any"}
        self._account_of(token, account_id, groups)
        return {"id": account_id, "name": self.accounts[account_id], "type": "standard", "settings": {}}

    def _zone_object(self, token: LabToken, zone: Zone) -> Json:
        legacy = sorted({p for g in token.permissions & set(ZONE_GROUPS) for p in LEGACY.get(g, ())})
        return {"id": zone.id, "name": zone.name, "status": "active", "paused": False, "type": "full",
                "development_mode": 0, "name_servers": ["ada.ns.cloudflare.com", "bob.ns.cloudflare.com"],
                "original_name_servers": None, "original_registrar": None, "original_dnshost": None,
                "created_on": zone.created_on, "modified_on": zone.created_on, "activated_on": zone.created_on,
                "meta": {}, "owner": {"id": None, "type": "user", "email": None},
                "account": {"id": zone.account_id, "name": self.accounts.get(zone.account_id, "")},
                "permissions": legacy, "plan": {"id": "0feeeeeeeeeeeeeeeeeeeeeeeeeeeeee", "name": "Free Website",
                                                "price": 0, "currency": "USD", "frequency": "", "is_subscribed": False,
                                                "can_subscribe": False, "legacy_id": "free",
                                                "legacy_discount": False, "externally_managed": False}}

    async def _zone_list(self, token: LabToken, query: Mapping[str, str], _b: Any) -> web.Response:
        zones = [z for z in self.zones.values() if self._zone_ok(token, z, ZONE_GROUPS)]
        name = query.get("name")
        if name is not None:
            zones = [z for z in zones if z.name == name.lower().rstrip(".")]
        account = query.get("account.id")
        if account is not None:
            zones = [z for z in zones if z.account_id == account]
        if query.get("status") not in (None, "active"):
            zones = []
        items = [self._zone_object(token, z) for z in sorted(zones, key=lambda z: z.name)]
        return _paged(items, query, default=20, maximum=50)

    async def _zone_get(self, token: LabToken, _q: Any, _b: Any, zone_id: str) -> Json:
        return self._zone_object(token, self._zone(token, zone_id, ZONE_GROUPS))

    # ------------------------------------------------------------------------ DNS records

    async def _record_list(self, token: LabToken, query: Mapping[str, str], _b: Any, zone_id: str) -> web.Response:
        zone = self._zone(token, zone_id, ("DNS Read", "DNS Write"))
        records = list(zone.records.values())
        for key, field_name in (("name", "name"), ("name.exact", "name")):
            if key in query:
                want = _absolute(query[key], zone.name)
                records = [r for r in records if r[field_name] == want]
        if "type" in query:
            records = [r for r in records if r["type"] == query["type"].upper()]
        for key in ("content", "content.exact"):
            if key in query:
                records = [r for r in records if r["content"].lower() == query[key].lower()]
        if "proxied" in query:
            records = [r for r in records if r["proxied"] == (query["proxied"].lower() == "true")]
        records = _comment_filter(records, query)
        order = query.get("order", "type")
        if order not in ("type", "name", "content", "ttl", "proxied"):
            order = "type"
        records.sort(key=lambda r: (str(r.get(order)), r["name"], r["created_on"]),
                     reverse=query.get("direction") == "desc")
        return _paged(records, query, default=100, maximum=5_000_000)

    async def _record_get(self, token: LabToken, _q: Any, _b: Any, zone_id: str, record_id: str) -> Json:
        zone = self._zone(token, zone_id, ("DNS Read", "DNS Write"))
        return dict(self._record(zone, record_id))

    def _record(self, zone: Zone, record_id: str) -> Json:
        record = zone.records.get(record_id)
        if record is None:
            raise ApiError(404, 81044, "Record does not exist.")
        return record

    async def _record_create(self, token: LabToken, _q: Any, body: Any, zone_id: str) -> Json:
        zone = self._zone(token, zone_id, ("DNS Write",))
        record = self._validated(zone, _object(body), None)
        zone.records[record["id"]] = record
        self._publish(zone)
        log.info("lab cloudflare: created %s %s -> %s (proxied=%s)", record["type"], record["name"],
                 record["content"], record["proxied"])
        return dict(record)

    async def _record_patch(self, token: LabToken, _q: Any, body: Any, zone_id: str, record_id: str) -> Json:
        zone = self._zone(token, zone_id, ("DNS Write",))
        old = self._record(zone, record_id)
        merged = {**old, **_object(body)}
        record = self._validated(zone, merged, old)
        zone.records[record_id] = record
        self._publish(zone)
        return dict(record)

    async def _record_put(self, token: LabToken, _q: Any, body: Any, zone_id: str, record_id: str) -> Json:
        zone = self._zone(token, zone_id, ("DNS Write",))
        old = self._record(zone, record_id)
        record = self._validated(zone, _object(body), old)
        zone.records[record_id] = record
        self._publish(zone)
        return dict(record)

    async def _record_delete(self, token: LabToken, _q: Any, _b: Any, zone_id: str, record_id: str) -> Json:
        zone = self._zone(token, zone_id, ("DNS Write",))
        self._record(zone, record_id)
        del zone.records[record_id]
        self._publish(zone)
        return {"id": record_id}

    def _validated(self, zone: Zone, data: Json, old: Json | None) -> Json:  # noqa: PLR0912
        rtype = str(data.get("type") or "").upper()
        if rtype not in RECORD_TYPES:
            raise ApiError(400, 1004, "DNS Validation Error", [(9000, f"Invalid record type {rtype or '(none)'}")])
        name = _absolute(str(data.get("name") or ""), zone.name)
        if not all(LABEL.fullmatch(label) for label in name.split(".")) or len(name) > 253 or \
                "*" in name.split(".")[1:]:
            raise validation(9000, "DNS name is invalid.")
        content = str(data.get("content") or "").strip()
        proxied = data.get("proxied", False)
        if not isinstance(proxied, bool):  # the API's schema: a boolean, never "false"
            raise ApiError(400, 1004, "DNS Validation Error", [(9000, "proxied must be a boolean")])
        if rtype == "A":
            if not _is_ip(content, 4):
                raise validation(9005, "Content for A record is invalid. Must be a valid IPv4 address")
        elif rtype == "AAAA":
            if not _is_ip(content, 6):
                raise validation(9006, "Content for AAAA record is invalid. Must be a valid IPv6 address")
        elif rtype == "CNAME":
            content = content.lower().rstrip(".")
            labels = content.split(".")
            if _is_ip(content, 4) or _is_ip(content, 6) or len(labels) < 2 or content == name or \
                    not all(LABEL.fullmatch(label) and label != "*" for label in labels):
                raise validation(9007, "Content for CNAME record is invalid.")
        elif not content:
            raise validation(9008, f"Content for {rtype} record is invalid.")  # code assumed
        if proxied and rtype not in PROXIABLE:
            raise validation(9004, "This kind of record cannot be proxied")
        if proxied and rtype in ("A", "AAAA") and any(ipaddress.ip_address(content) in n for n in PRIVATE
                                                      if n.version == ipaddress.ip_address(content).version):
            raise validation(9041, "This DNS record cannot be proxied - click the cloud icon to turn it gray to "
                                   "proceed")
        ttl = data.get("ttl", 1)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not (ttl == 1 or 60 <= ttl <= 86400):
            raise ApiError(400, 1004, "DNS Validation Error",
                           [(9021, "TTL must be between 60 and 86400 seconds, or 1 for Automatic.")])
        if proxied:
            ttl = 1
        comment = data.get("comment")
        if comment is not None and not isinstance(comment, str):
            raise ApiError(400, 1004, "DNS Validation Error", [(9100, "comment must be a string")])
        others = [r for r in zone.records.values() if r["name"] == name and (old is None or r["id"] != old["id"])]
        for other in others:
            if other["type"] == rtype and other["content"].lower() == content.lower():
                raise ApiError(400, 81057, "Record already exists.")
        if rtype == "CNAME" and any(o["type"] in ("A", "AAAA", "CNAME") for o in others):
            raise ApiError(400, 81053, "An A, AAAA, or CNAME record with that host already exists. For more "
                                       "details, refer to <https://developers.cloudflare.com/dns/manage-dns-records/"
                                       "troubleshooting/records-with-same-name/>.")
        if rtype in ("A", "AAAA") and any(o["type"] == "CNAME" for o in others):
            raise ApiError(400, 81054, "A CNAME record with that host already exists. For more details, refer to "
                                       "<https://developers.cloudflare.com/dns/manage-dns-records/troubleshooting/"
                                       "records-with-same-name/>.")
        now = _now()
        record: Json = {
            "id": old["id"] if old else _hex_id(), "zone_id": zone.id, "zone_name": zone.name, "name": name,
            "type": rtype, "content": content, "proxiable": rtype in PROXIABLE, "proxied": proxied, "ttl": ttl,
            "settings": {}, "meta": {}, "comment": comment, "tags": list(data.get("tags") or []),
            "created_on": old["created_on"] if old else now, "modified_on": now,
        }
        if comment is not None and (old is None or old.get("comment") != comment):
            record["comment_modified_on"] = now
        elif old is not None and old.get("comment_modified_on"):
            record["comment_modified_on"] = old["comment_modified_on"]
        if rtype == "MX":
            record["priority"] = int(data.get("priority") or 10)
        return record

    # -------------------------------------------------------------------- public DNS view

    def public_records(self, zone: Zone) -> dict[str, dict[str, list[str]]]:
        """The zone as the world resolves it: proxied names -> the edge's addresses, others as they are."""
        out: dict[str, dict[str, list[str]]] = {}
        for record in sorted(zone.records.values(), key=lambda r: (r["name"], r["type"], r["content"])):
            name, rtype = record["name"], record["type"]
            node = out.setdefault(name, {})
            if record["proxied"]:
                for address in self.edge_addresses:
                    kind = "AAAA" if ":" in address else "A"
                    values = node.setdefault(kind, [])
                    if address not in values:
                        values.append(address)
            elif rtype == "TXT":
                text = record["content"]
                node.setdefault("TXT", []).append(text if text.startswith('"') else json.dumps(text))
            elif rtype == "MX":
                node.setdefault("MX", []).append(f"{record.get('priority', 10)} {record['content'].rstrip('.')}.")
            elif rtype in ("CNAME", "NS"):
                node.setdefault(rtype, []).append(record["content"].rstrip(".") + ".")
            else:
                node.setdefault(rtype, []).append(record["content"])
        return {name: types for name, types in out.items() if types}

    def _publish(self, zone: Zone) -> None:
        if self.on_dns is None:
            return
        try:
            self.on_dns(zone.name, self.public_records(zone))
        except Exception:  # the API's answer must not depend on the lab's DNS wiring
            log.exception("lab cloudflare: public DNS update for %s failed", zone.name)

    # ---------------------------------------------------------------------------- tunnels

    def _tunnel(self, token: LabToken, account_id: str, tunnel_id: str, groups: Iterable[str]) -> Tunnel:
        self._account_of(token, account_id, groups)
        try:
            key = str(uuid.UUID(tunnel_id))
        except ValueError:
            raise ApiError(400, 1001, f"Invalid tunnel id {tunnel_id}") from None  # code assumed
        tunnel = self.tunnels.get(key)
        if tunnel is None or tunnel.account_id != account_id:
            raise ApiError(404, 1003, "Tunnel not found")  # code assumed
        return tunnel

    def _tunnel_object(self, tunnel: Tunnel) -> Json:
        live = self.live_connectors(tunnel.id)
        if tunnel.deleted_at:
            status = "deleted"
        elif live:
            status = "healthy"
        elif tunnel.ever_connected:
            status = "down"
        else:
            status = "inactive"
        return {"id": tunnel.id, "account_tag": tunnel.account_id, "created_at": tunnel.created_at,
                "deleted_at": tunnel.deleted_at, "name": tunnel.name,
                "connections": [self._conn_object(c) for c in live],
                "conns_active_at": tunnel.conns_active_at if live else None,
                "conns_inactive_at": None if live else (tunnel.conns_inactive_at or tunnel.created_at),
                "tun_type": "cfd_tunnel", "metadata": {}, "status": status,
                "remote_config": tunnel.config_src == "cloudflare"}

    def _conn_object(self, conn: Connector) -> Json:
        return {"id": conn.connection_id, "client_id": conn.client_id, "client_version": conn.version,
                "colo_name": "LAB", "is_pending_reconnect": False, "opened_at": conn.opened_at,
                "origin_ip": conn.origin_ip, "uuid": conn.connection_id}

    async def _tunnel_list(self, token: LabToken, query: Mapping[str, str], _b: Any, account_id: str) -> web.Response:
        self._account_of(token, account_id, TUNNEL_READ)
        tunnels = [t for t in self.tunnels.values() if t.account_id == account_id]
        if "name" in query:
            tunnels = [t for t in tunnels if t.name == query["name"]]
        if "is_deleted" in query:
            deleted = query["is_deleted"].lower() == "true"
            tunnels = [t for t in tunnels if bool(t.deleted_at) == deleted]
        if "uuid" in query:
            tunnels = [t for t in tunnels if t.id == query["uuid"]]
        items = [self._tunnel_object(t) for t in sorted(tunnels, key=lambda t: t.created_at)]
        return _paged(items, query, default=20, maximum=1000)

    async def _tunnel_get(self, token: LabToken, _q: Any, _b: Any, account_id: str, tunnel_id: str) -> Json:
        return self._tunnel_object(self._tunnel(token, account_id, tunnel_id, TUNNEL_READ))

    async def _tunnel_create(self, token: LabToken, _q: Any, body: Any, account_id: str) -> Json:
        self._account_of(token, account_id, TUNNEL_WRITE)
        data = _object(body)
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, 1001, "Tunnel name is required")  # code assumed
        config_src = str(data.get("config_src") or "local")
        if config_src not in ("local", "cloudflare"):
            raise ApiError(400, 1001, f"Invalid config_src {config_src}")  # code assumed
        raw = data.get("tunnel_secret")
        if raw is None and config_src == "cloudflare":
            secret = secrets.token_bytes(32)
        else:
            try:
                secret = base64.b64decode(str(raw or ""), validate=True)
            except binascii.Error:
                secret = b""
            if len(secret) < 32:
                raise ApiError(400, 1001, "tunnel_secret must be base64 of at least 32 bytes")  # code assumed
        if any(t.name == name and t.account_id == account_id and not t.deleted_at for t in self.tunnels.values()):
            raise ApiError(409, 1013, "You already have a tunnel with this name. Delete the existing tunnel, or "
                                      "choose a different name for your new tunnel")
        tunnel = Tunnel(str(uuid.uuid4()), name, account_id, secret, config_src)
        self.tunnels[tunnel.id] = tunnel
        log.info("lab cloudflare: created tunnel %s (%s)", tunnel.name, tunnel.id)
        out = self._tunnel_object(tunnel)
        out["credentials_file"] = {"AccountTag": account_id, "TunnelID": tunnel.id, "TunnelName": name,
                                   "TunnelSecret": base64.b64encode(secret).decode()}
        out["token"] = encode_tunnel_token(account_id, tunnel.id, secret)
        return out

    async def _tunnel_delete(self, token: LabToken, _q: Any, _b: Any, account_id: str, tunnel_id: str) -> Json:
        tunnel = self._tunnel(token, account_id, tunnel_id, TUNNEL_WRITE)
        if tunnel.deleted_at:
            raise ApiError(404, 1003, "Tunnel not found")  # code assumed
        if self.live_connectors(tunnel.id):
            raise ApiError(400, 1022, "Cannot delete tunnel because it has active connections")
        tunnel.deleted_at = _now()
        log.info("lab cloudflare: deleted tunnel %s (%s)", tunnel.name, tunnel.id)
        return self._tunnel_object(tunnel)

    async def _tunnel_token(self, token: LabToken, _q: Any, _b: Any, account_id: str, tunnel_id: str) -> str:
        tunnel = self._tunnel(token, account_id, tunnel_id, TUNNEL_READ)
        if tunnel.deleted_at:
            raise ApiError(404, 1003, "Tunnel not found")  # code assumed
        return encode_tunnel_token(account_id, tunnel.id, tunnel.secret)

    def _config_object(self, tunnel: Tunnel) -> Json:
        return {"tunnel_id": tunnel.id, "account_id": tunnel.account_id, "config": tunnel.config,
                "source": tunnel.config_src, "version": tunnel.version, "created_at": tunnel.config_at}

    async def _config_get(self, token: LabToken, _q: Any, _b: Any, account_id: str, tunnel_id: str) -> Json:
        return self._config_object(self._tunnel(token, account_id, tunnel_id, TUNNEL_READ))

    async def _config_put(self, token: LabToken, _q: Any, body: Any, account_id: str, tunnel_id: str) -> Json:
        tunnel = self._tunnel(token, account_id, tunnel_id, TUNNEL_WRITE)
        if tunnel.deleted_at:
            raise ApiError(404, 1003, "Tunnel not found")  # code assumed
        config = _object(body).get("config")
        if not isinstance(config, dict):
            raise ApiError(400, 1001, "config is required")  # code assumed
        problem = check_ingress(config.get("ingress"))
        if problem:
            raise ApiError(400, 1001, f"Invalid tunnel configuration: {problem}")  # code assumed
        tunnel.config = json.loads(json.dumps(config))
        tunnel.version += 1
        tunnel.config_at = _now()
        return self._config_object(tunnel)

    async def _conns_get(self, token: LabToken, _q: Any, _b: Any, account_id: str, tunnel_id: str) -> list[Json]:
        tunnel = self._tunnel(token, account_id, tunnel_id, TUNNEL_READ)
        clients: dict[str, Json] = {}
        for conn in self.live_connectors(tunnel.id):
            client = clients.setdefault(conn.client_id, {
                "id": conn.client_id, "arch": conn.arch, "version": conn.version, "config_version": tunnel.version,
                "run_at": conn.opened_at, "features": [], "conns": []})
            client["conns"].append(self._conn_object(conn))
        return list(clients.values())

    async def _conns_delete(self, token: LabToken, query: Mapping[str, str], _b: Any, account_id: str,
                            tunnel_id: str) -> Json:
        tunnel = self._tunnel(token, account_id, tunnel_id, TUNNEL_WRITE)
        client_id = query.get("client_id")
        for session, conn in list(self.connectors.items()):
            if conn.tunnel_id == tunnel.id and (client_id is None or conn.client_id == client_id):
                self.drop_connector(session)
        return {}


# ----------------------------------------------------------------------------------- helpers

def check_ingress(ingress: Any) -> str | None:  # noqa: PLR0911 - one reason per check
    """cloudflared's ingress validation: rules with a service, hostnames without ports or paths, the last
    rule (and only it) matching everything. None when fine."""
    if not isinstance(ingress, list) or not ingress:
        return "ingress must be a non-empty list of rules"
    for index, rule in enumerate(ingress):
        if not isinstance(rule, dict) or not isinstance(rule.get("service"), str) or not rule["service"]:
            return f"rule #{index + 1} has no service"
        service = rule["service"]
        if not re.match(r"(https?|tcp|ssh|rdp|unix|unix\+tls|smb)://|http_status:\d{3}$|hello_world$|bastion$",
                        service):
            return f"rule #{index + 1}: unknown service {service}"
        host = rule.get("hostname")
        if host is not None and (not isinstance(host, str) or ":" in host or "/" in host):
            return f"rule #{index + 1}: hostname {host!r} must be a plain hostname"
        last = index == len(ingress) - 1
        catch_all = not host and not rule.get("path")
        if last and not catch_all:
            return "The last ingress rule must match all URLs (i.e. it should not have a hostname or path filter)"
        if not last and catch_all:
            return f"Rule #{index + 1} is matching all URLs, but isn't the last rule"
    return None


def _group_id(name: str) -> str:
    return uuid.uuid5(uuid.NAMESPACE_DNS, name).hex


def _absolute(name: str, zone: str) -> str:
    name = name.strip().lower().rstrip(".")
    if name in ("", "@"):
        return zone
    if name == zone or name.endswith("." + zone):
        return name
    return f"{name}.{zone}"


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _comment_filter(records: list[Json], query: Mapping[str, str]) -> list[Json]:
    for key in ("comment", "comment.exact"):
        if key in query:
            records = [r for r in records if (r.get("comment") or "") == query[key]]
    if "comment.present" in query:
        records = [r for r in records if r.get("comment")]
    if "comment.absent" in query:
        records = [r for r in records if not r.get("comment")]
    if "comment.startswith" in query:
        records = [r for r in records if (r.get("comment") or "").startswith(query["comment.startswith"])]
    if "comment.contains" in query:
        records = [r for r in records if query["comment.contains"] in (r.get("comment") or "")]
    return records


def _object(body: Any) -> Json:
    if not isinstance(body, dict):
        raise ApiError(400, 6007, "Malformed JSON in request body")
    return body


async def _body(request: web.Request) -> Any:
    if request.method in ("GET", "HEAD") or not request.can_read_body:
        return None
    raw = await request.read()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiError(400, 6007, "Malformed JSON in request body") from None


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _paged(items: list[Json], query: Mapping[str, str], *, default: int, maximum: int) -> web.Response:
    per_page = min(max(_int(query.get("per_page"), default), 5), maximum)
    page = max(_int(query.get("page"), 1), 1)
    total_pages = max(1, -(-len(items) // per_page))
    chunk = items[(page - 1) * per_page: page * per_page]
    info = {"page": page, "per_page": per_page, "count": len(chunk), "total_count": len(items),
            "total_pages": total_pages}
    return _ok(chunk, result_info=info)


def _ok(result: Any, *, messages: list[Json] | None = None, result_info: Json | None = None) -> web.Response:
    body: Json = {"success": True, "errors": [], "messages": messages or [], "result": result}
    if result_info is not None:
        body["result_info"] = result_info
    return web.json_response(body)


def _answer(exc: ApiError) -> web.Response:
    return web.json_response({"success": False, "errors": exc.errors, "messages": [], "result": None},
                             status=exc.status)


# --------------------------------------------------------------------------- public DNS wiring

def dns_sync(labdns: LabDns, view: str) -> DnsCallback:
    """A callback for `LabCloudflare(on_dns=...)` that keeps `view` of `labdns` equal to the zones' public
    answers: names that are gone are removed, the others replaced type by type. Run on the DNS loop."""
    previous: dict[str, dict[str, dict[str, list[str]]]] = {}

    def apply(zone: str, records: dict[str, dict[str, list[str]]]) -> None:
        old = previous.get(zone, {})
        for name, types in old.items():
            for rtype in types:
                if rtype not in records.get(name, {}):
                    with contextlib.suppress(ValueError):
                        labdns.remove(view, name, rtype)
        for name, types in records.items():
            for rtype, values in types.items():
                try:
                    labdns.set_records(view, name, rtype, values)
                except ValueError as exc:  # e.g. a DNS-only CNAME beside a TXT record: BIND would refuse it too
                    log.warning("lab cloudflare: public DNS cannot hold %s %s: %s", name, rtype, exc)
        previous[zone] = records

    return apply

"""LabTailscale: the Tailscale control plane's API for the lab, and the tailnet's resolver (100.100.100.100).

The API (aiohttp, HTTPS) answers the documented shapes of https://tailscale.com/api for what the homelab
uses; see homelab/clients/tailscale.py for the list:

- OAuth client credentials (https://tailscale.com/kb/1215/oauth-clients): POST /api/v2/oauth/token with a
  form client_id/client_secret (optional `scope`: a space-separated subset) answers
  {"access_token", "token_type": "Bearer", "expires_in": 3600, "scope": "<granted scopes>"}; a bad client is
  401 {"error": "invalid_client"}. API keys (`add_api_key`) have every scope.
- Scopes as https://tailscale.com/kb/1623/trust-credentials: dns[:read] for /dns/*, devices:core[:read] for
  the device list and deletion, devices:routes[:read] for /device/{id}/routes, auth_keys[:read] for /keys;
  a write scope implies its read scope, `all` / `all:read` cover everything / every read. A request beyond
  the token's scopes is 403 {"message": ...}; no or a bad token is 401.
- Split DNS: GET answers {domain: [nameservers]}; PATCH merges (a domain mapped to null or [] is removed),
  PUT replaces the whole map; both answer the new map. Domains must be DNS names and nameservers IPs (400).
- Devices: GET /tailnet/{t}/devices (`fields=all` adds advertisedRoutes/enabledRoutes), GET/DELETE
  /device/{id}, GET /device/{id}/routes, POST /device/{id}/routes {"routes": [...]} replaces the enabled
  (approved) routes and answers {advertisedRoutes, enabledRoutes}. Advertised routes are never enabled by
  themselves: the lab models a tailnet without autoApprovers, where an admin (the access layer) approves.
- Auth keys: POST /tailnet/{t}/keys {capabilities: {devices: {create: {reusable, ephemeral, preauthorized,
  tags}}}, expirySeconds, description} answers {id, key: "tskey-auth-...", created, expires, capabilities}.
  Keys made by an OAuth client must be tagged, with tags among the client's own (if it was given any).
- The tailnet path segment is "-" or the lab tailnet's name; anything else is 404.

Lab only, standing in for tailscaled's login and its control connection (no such public API exists):

    POST /lab/register  {"authKey", "hostname", "advertiseRoutes": [...]}  -> {"id", "name", "addresses",
                                                                             "heartbeatToken", ...}
    POST /lab/heartbeat {"id", "heartbeatToken", "advertiseRoutes"?}      -> 200, or 404 once deleted

A device is online (connectedToControl) while its last heartbeat is younger than `online_expiry` (15 s).
A hostname already taken gets "-1", "-2", ... as real control does.

`TailnetResolver` is a tailnet client's view of DNS at 100.100.100.100:53 (MagicDNS's address), as
tailscaled's resolver (tailscale/tailscale net/dns/resolver) behaves:

- names under the MagicDNS suffix (`<hostname>.<suffix>`) are answered from the device list (A/AAAA);
- a name under a split-DNS domain (longest match) is forwarded over UDP (TCP after TC) to that domain's
  nameservers, tried in order, but only to a nameserver the client can reach: one covered by an enabled
  route of an online device (or a tailnet address of an online device). Unreachable nameservers are skipped,
  as packets to them would go nowhere;
- no reachable nameserver, or every one timed out: SERVFAIL. That is what tailscaled answers when it has no
  upstream for a name ("no upstream resolvers set, returning SERVFAIL") or its forwards fail; it neither
  says REFUSED nor invents NXDOMAIN. Names outside every split domain have no upstream in the lab (no global
  nameservers, no OS resolver behind it), so they are SERVFAIL too;
- the forwarded answer is returned unchanged, as tailscaled does: it does not filter A records by routes.
  With `filter_unrouted=True` the resolver drops A/AAAA records no enabled route covers (a stricter
  "internal view" in which a name resolves only to where the client can connect).

Threading: the state belongs to the event loop the servers run on; set it up before `start` or from that
loop (see homelab.lab.serving.Background).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import itertools
import logging
import re
import secrets
import ssl
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
from aiohttp import web

from homelab.lab.dns import View
from homelab.lab.serving import serve_app

__all__ = ['LabDevice', 'LabTailscale', 'TailnetResolver']

logger = logging.getLogger(__name__)

Json = dict[str, Any]
TOKEN_LIFETIME = 3600
ONLINE_EXPIRY = 15.0
MAGICDNS_IP = '100.100.100.100'
ALL_SCOPES = ('all',)
DOMAIN = re.compile(r'^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$')
HOSTNAME = re.compile(r'^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$')
TAG = re.compile(r'^tag:[a-zA-Z][a-zA-Z0-9-]*$')
FORBIDDEN = 'calling actor does not have enough permissions to perform this function'


def _stamp(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')


def covers(granted: Iterable[str], needed: str) -> bool:
    """Whether `granted` scopes allow `needed` (write implies read; all; all:read)."""
    have = set(granted)
    if 'all' in have or needed in have:
        return True
    return needed.endswith(':read') and ('all:read' in have or needed.removesuffix(':read') in have)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class OAuthClientEntry:
    secret: str = field(repr=False)
    scopes: frozenset[str]
    tags: frozenset[str]


@dataclass
class Token:
    scopes: frozenset[str]
    expires: float
    client: str | None  # None for an API key
    tags: frozenset[str] = frozenset()


@dataclass
class AuthKey:
    id: str
    key: str = field(repr=False)
    reusable: bool
    ephemeral: bool
    preauthorized: bool
    tags: tuple[str, ...]
    created: float
    expires: float
    description: str
    used: int = 0
    revoked: bool = False

    def view(self) -> Json:
        return {'id': self.id, 'created': _stamp(self.created), 'expires': _stamp(self.expires),
                'description': self.description, 'invalid': self.revoked,
                'capabilities': {'devices': {'create': {
                    'reusable': self.reusable, 'ephemeral': self.ephemeral, 'preauthorized': self.preauthorized,
                    'tags': list(self.tags)}}}}


@dataclass
class LabDevice:
    """One node of the lab tailnet."""

    id: str
    hostname: str
    name: str  # the MagicDNS FQDN
    addresses: tuple[str, ...]
    tags: tuple[str, ...]
    advertised: tuple[str, ...]
    enabled: tuple[str, ...]
    created: float
    last_seen: float
    authorized: bool
    ephemeral: bool
    heartbeat_token: str = field(repr=False)
    node_key: str = ''

    def online(self, now: float, expiry: float) -> bool:
        return now - self.last_seen <= expiry

    def view(self, fields_all: bool, now: float, expiry: float) -> Json:
        online = self.online(now, expiry)
        out: Json = {
            'addresses': list(self.addresses), 'id': self.id, 'nodeId': f'n{self.id}CNTRL',
            'user': 'tagged-devices' if self.tags else 'lab@example.com', 'name': self.name,
            'hostname': self.hostname, 'clientVersion': '1.90.0-lab', 'updateAvailable': False, 'os': 'linux',
            'created': _stamp(self.created), 'lastSeen': _stamp(now if online else self.last_seen),
            'connectedToControl': online, 'keyExpiryDisabled': bool(self.tags),
            'expires': '0001-01-01T00:00:00Z' if self.tags else _stamp(self.created + 180 * 86400),
            'authorized': self.authorized, 'isExternal': False, 'machineKey': f'mkey:{self.id:0>64}',
            'nodeKey': self.node_key, 'blocksIncomingConnections': False, 'tags': list(self.tags),
            'tailnetLockError': '', 'tailnetLockKey': ''}
        if fields_all:
            out['advertisedRoutes'] = list(self.advertised)
            out['enabledRoutes'] = list(self.enabled)
            out['clientConnectivity'] = {'endpoints': [], 'latency': {}, 'mappingVariesByDestIP': False,
                                         'clientSupports': {'ipv6': False, 'pcp': False, 'pmp': False,
                                                            'udp': True, 'upnp': False, 'hairPinning': False}}
        return out


def _cidr(text: Any) -> str:
    try:
        return str(ipaddress.ip_network(str(text), strict=True))
    except ValueError:
        raise ApiError(400, f'invalid route {text!r}: not a CIDR prefix') from None


class LabTailscale:
    """The lab's Tailscale API and tailnet state. `writes` counts accepted changes, `requests` every request
    as (method, path, status); `fail_next(status, n)` answers the next n API requests with `status`."""

    def __init__(self, *, tailnet: str = 'homelab.lab', magic_suffix: str = 'tail-lab.ts.net',
                 online_expiry: float = ONLINE_EXPIRY, clock: Callable[[], float] = time.time) -> None:
        self.tailnet = tailnet
        self.magic_suffix = magic_suffix
        self.online_expiry = online_expiry
        self.clock = clock
        self.oauth_clients: dict[str, OAuthClientEntry] = {}
        self.tokens: dict[str, Token] = {}
        self.auth_keys: dict[str, AuthKey] = {}
        self.devices: dict[str, LabDevice] = {}
        self.split_dns: dict[str, list[str]] = {}
        self.writes = 0
        self.requests: list[tuple[str, str, int]] = []
        self._failures: list[int] = []
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.host: str | None = None
        self.port: int | None = None

    # ----------------------------------------------------------- lab set-up

    def add_oauth_client(self, client_id: str, secret: str, scopes: Iterable[str],
                         tags: Iterable[str] = ()) -> None:
        """An OAuth client as made in the admin console: its scopes and the tags it may give (empty: any)."""
        self.oauth_clients[client_id] = OAuthClientEntry(secret, frozenset(scopes), frozenset(tags))

    def add_api_key(self, key: str) -> None:
        """An API access token with full access (tskey-api-...)."""
        self.tokens[key] = Token(frozenset(ALL_SCOPES), float('inf'), None)

    def fail_next(self, status: int, count: int = 1) -> None:
        self._failures.extend([status] * count)

    @property
    def url(self) -> str:
        if self.host is None or self.port is None:
            raise RuntimeError('the Tailscale API is not running')
        host = f'[{self.host}]' if ':' in self.host else self.host
        return f'https://{host}:{self.port}'

    # ---------------------------------------------------------------- state

    def now(self) -> float:
        return self.clock()

    def online(self, device: LabDevice) -> bool:
        return device.online(self.now(), self.online_expiry)

    def device_by_hostname(self, hostname: str) -> LabDevice | None:
        return next((d for d in self.devices.values() if d.hostname == hostname), None)

    def routed(self, address: str) -> bool:
        """Whether a tailnet client can reach `address`: an online device's address, or inside an enabled
        route of an online, authorized device."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        for device in self.devices.values():
            if not self.online(device) or not device.authorized:
                continue
            if address in device.addresses:
                return True
            for route in device.enabled:
                if route in device.advertised and ip in ipaddress.ip_network(route):
                    return True
        return False

    def _address(self, number: int) -> tuple[str, str]:
        v4 = ipaddress.ip_address(int(ipaddress.ip_address('100.64.0.0')) + number)
        if str(v4) == MAGICDNS_IP:
            raise ApiError(500, 'address pool exhausted')
        return str(v4), f'fd7a:115c:a1e0::{number:x}'

    def register(self, auth_key: str, hostname: str, advertise_routes: Iterable[str] = ()) -> LabDevice:
        """What tailscaled's login with an auth key does: a new node, tagged as the key says."""
        now = self.now()
        key = next((k for k in self.auth_keys.values() if secrets.compare_digest(k.key, auth_key)), None)
        if key is None or key.revoked or now > key.expires or (key.used and not key.reusable):
            raise ApiError(401, 'invalid key: unable to validate API key' if key is None else
                           'invalid key: key has expired, been revoked, or already used')
        hostname = hostname.lower()
        if not HOSTNAME.match(hostname):
            raise ApiError(400, f'invalid hostname {hostname!r}')
        routes = tuple(_cidr(r) for r in advertise_routes)
        taken = {d.hostname for d in self.devices.values()}
        base, suffix = hostname, 0
        while hostname in taken:
            suffix += 1
            hostname = f'{base}-{suffix}'
        number = next(self._ids)
        device_id = str(7000000000000000 + number)
        device = LabDevice(
            id=device_id, hostname=hostname, name=f'{hostname}.{self.magic_suffix}', addresses=self._address(number),
            tags=key.tags, advertised=routes, enabled=(), created=now, last_seen=now,
            authorized=key.preauthorized, ephemeral=key.ephemeral, heartbeat_token=secrets.token_urlsafe(24),
            node_key=f'nodekey:{secrets.token_hex(32)}')
        key.used += 1
        self.devices[device_id] = device
        self.writes += 1
        logger.info('lab tailscale: device %s (%s) registered, advertising %s', device.hostname, device_id,
                    ', '.join(routes) or 'no routes')
        return device

    def heartbeat(self, device_id: str, token: str, advertise_routes: Iterable[str] | None = None) -> LabDevice:
        device = self.devices.get(device_id)
        if device is None or not secrets.compare_digest(device.heartbeat_token, token):
            raise ApiError(404, 'node not found')
        device.last_seen = self.now()
        if advertise_routes is not None:
            device.advertised = tuple(_cidr(r) for r in advertise_routes)
        return device

    # -------------------------------------------------------------- serving

    async def start(self, host: str, port: int, certfile: str, keyfile: str) -> None:
        """Serve the API on https://host:port (port 0: a free one, then in `self.port`)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certfile, keyfile)
        self._runner, self.port = await serve_app(self._handle, host, port, ctx)
        self.host = host
        logger.info('lab tailscale: API at %s (tailnet %s)', self.url, self.tailnet)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        try:
            if self._failures and not path.startswith('/lab/'):
                status = self._failures.pop(0)
                raise ApiError(status, 'rate limited' if status == 429 else 'lab fault')
            response = await self._route(request, path)
        except ApiError as exc:
            response = web.json_response({'message': exc.message}, status=exc.status)
        except (ValueError, UnicodeDecodeError):
            response = web.json_response({'message': 'invalid request body'}, status=400)
        self.requests.append((request.method, path, response.status))
        logger.debug('lab tailscale: %s %s: %d', request.method, path, response.status)
        return response

    async def _route(self, request: web.Request, path: str) -> web.StreamResponse:  # noqa: PLR0911, PLR0912
        method = request.method
        if path == '/api/v2/oauth/token' and method == 'POST':
            return await self._oauth_token(request)
        if path == '/lab/register' and method == 'POST':
            body = await request.json()
            device = self.register(str(body.get('authKey') or ''), str(body.get('hostname') or ''),
                                   body.get('advertiseRoutes') or [])
            return web.json_response({**device.view(True, self.now(), self.online_expiry),
                                      'heartbeatToken': device.heartbeat_token})
        if path == '/lab/heartbeat' and method == 'POST':
            body = await request.json()
            routes = body.get('advertiseRoutes')
            device = self.heartbeat(str(body.get('id') or ''), str(body.get('heartbeatToken') or ''),
                                    routes if isinstance(routes, list) else None)
            return web.json_response({'id': device.id, 'online': True})
        parts = path.strip('/').split('/')
        if parts[:2] != ['api', 'v2'] or len(parts) < 4:
            raise ApiError(404, 'not found')
        token = self._authenticate(request)
        match parts[2:]:
            case ['tailnet', tailnet, 'dns', 'split-dns']:
                self._tailnet(tailnet)
                return await self._split_dns(request, token)
            case ['tailnet', tailnet, 'devices'] if method == 'GET':
                self._tailnet(tailnet)
                self._allow(token, 'devices:core:read')
                fields_all = request.query.get('fields') == 'all'
                now = self.now()
                return web.json_response({'devices': [d.view(fields_all, now, self.online_expiry)
                                                      for d in self.devices.values()]})
            case ['tailnet', tailnet, 'keys'] if method == 'POST':
                self._tailnet(tailnet)
                self._allow(token, 'auth_keys')
                return web.json_response(self._create_key(await request.json(), token))
            case ['device', device_id] if method in ('GET', 'DELETE'):
                device = self._device(device_id)
                if method == 'GET':
                    self._allow(token, 'devices:core:read')
                    return web.json_response(device.view(request.query.get('fields') == 'all', self.now(),
                                                         self.online_expiry))
                self._allow(token, 'devices:core')
                del self.devices[device.id]
                self.writes += 1
                logger.info('lab tailscale: device %s (%s) deleted', device.hostname, device.id)
                return web.Response(status=200)
            case ['device', device_id, 'routes'] if method in ('GET', 'POST'):
                device = self._device(device_id)
                if method == 'POST':
                    self._allow(token, 'devices:routes')
                    body = await request.json()
                    routes = body.get('routes') if isinstance(body, dict) else None
                    if not isinstance(routes, list):
                        raise ApiError(400, 'routes must be a list of CIDR prefixes')
                    device.enabled = tuple(dict.fromkeys(_cidr(r) for r in routes))
                    self.writes += 1
                    logger.info('lab tailscale: device %s routes enabled: %s', device.hostname,
                                ', '.join(device.enabled) or 'none')
                else:
                    self._allow(token, 'devices:routes:read')
                return web.json_response({'advertisedRoutes': list(device.advertised),
                                          'enabledRoutes': list(device.enabled)})
        raise ApiError(404 if method in ('GET', 'POST', 'PUT', 'PATCH', 'DELETE') else 405, 'not found')

    # ------------------------------------------------------------------ auth

    async def _oauth_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        client_id, secret = str(form.get('client_id') or ''), str(form.get('client_secret') or '')
        header = request.headers.get('Authorization', '')
        if not client_id and header.lower().startswith('basic '):  # client_secret_basic, RFC 6749 2.3.1
            with contextlib.suppress(ValueError):
                client_id, _, secret = base64.b64decode(header[6:]).decode().partition(':')
        grant = str(form.get('grant_type') or 'client_credentials')
        if grant != 'client_credentials':
            return web.json_response({'error': 'unsupported_grant_type'}, status=400)
        client = self.oauth_clients.get(client_id)
        if client is None or not secrets.compare_digest(client.secret, secret):
            return web.json_response({'error': 'invalid_client', 'error_description': 'invalid client credentials'},
                                     status=401)
        scopes = client.scopes
        asked = str(form.get('scope') or '').split()
        if asked:
            if not all(covers(client.scopes, s) for s in asked):
                return web.json_response({'error': 'invalid_scope'}, status=400)
            scopes = frozenset(asked)
        access = f'tskey-api-{secrets.token_hex(6)}CNTRL-{secrets.token_urlsafe(24)}'
        self.tokens[access] = Token(scopes, self.now() + TOKEN_LIFETIME, client_id, client.tags)
        return web.json_response({'access_token': access, 'token_type': 'Bearer', 'expires_in': TOKEN_LIFETIME,
                                  'scope': ' '.join(sorted(scopes))})

    def _authenticate(self, request: web.Request) -> Token:
        header = request.headers.get('Authorization', '')
        scheme, _, cred = header.partition(' ')
        if scheme.lower() == 'basic':
            with contextlib.suppress(ValueError):
                cred = base64.b64decode(cred).decode().partition(':')[0]
        elif scheme.lower() != 'bearer':
            cred = ''
        token = self.tokens.get(cred.strip()) if cred else None
        if token is None or self.now() > token.expires:
            raise ApiError(401, 'API token invalid')
        return token

    @staticmethod
    def _allow(token: Token, scope: str) -> None:
        if not covers(token.scopes, scope):
            raise ApiError(403, FORBIDDEN)

    def _tailnet(self, name: str) -> None:
        if name not in ('-', self.tailnet):
            raise ApiError(404, f'tailnet {name!r} not found')

    def _device(self, device_id: str) -> LabDevice:
        device = self.devices.get(device_id) or next(
            (d for d in self.devices.values() if f'n{d.id}CNTRL' == device_id), None)
        if device is None:
            raise ApiError(404, 'device not found')
        return device

    # ----------------------------------------------------------- split DNS

    async def _split_dns(self, request: web.Request, token: Token) -> web.Response:
        if request.method == 'GET':
            self._allow(token, 'dns:read')
            return web.json_response(self.split_dns)
        if request.method not in ('PATCH', 'PUT'):
            raise ApiError(405, 'method not allowed')
        self._allow(token, 'dns')
        body = await request.json()
        if not isinstance(body, dict):
            raise ApiError(400, 'the body must be an object of domain -> nameservers')
        checked: dict[str, list[str] | None] = {}
        for domain, servers in body.items():
            name = str(domain).lower().rstrip('.')
            if not DOMAIN.match(name):
                raise ApiError(400, f'invalid domain {domain!r}')
            if servers is None or servers == []:
                checked[name] = None
                continue
            if not isinstance(servers, list):
                raise ApiError(400, f'nameservers of {domain} must be a list')
            for server in servers:
                try:
                    ipaddress.ip_address(str(server))
                except ValueError:
                    raise ApiError(400, f'invalid nameserver {server!r} for {domain}') from None
            checked[name] = [str(s) for s in servers]
        new = dict(self.split_dns) if request.method == 'PATCH' else {}
        for name, servers in checked.items():
            if servers is None:
                new.pop(name, None)
            else:
                new[name] = servers
        self.split_dns = new
        self.writes += 1
        logger.info('lab tailscale: split DNS now %s', new or '{}')
        return web.json_response(new)

    # ---------------------------------------------------------------- keys

    def _create_key(self, body: Any, token: Token) -> Json:
        create = (((body or {}).get('capabilities') or {}).get('devices') or {}).get('create') or {}
        tags = [str(t) for t in create.get('tags') or []]
        for tag in tags:
            if not TAG.match(tag):
                raise ApiError(400, f'invalid tag {tag!r}')
        if token.client is not None:
            if not tags:
                raise ApiError(400, 'auth keys created by an OAuth client must be tagged')
            if token.tags and not set(tags) <= token.tags:
                raise ApiError(403, f'requested tags {sorted(set(tags) - token.tags)} are invalid or not permitted')
        expiry = int(body.get('expirySeconds') or 90 * 86400)
        now = self.now()
        key_id = f'k{secrets.token_hex(6)}CNTRL'
        key = AuthKey(id=key_id, key=f'tskey-auth-{key_id}-{secrets.token_urlsafe(24)}',
                      reusable=bool(create.get('reusable')), ephemeral=bool(create.get('ephemeral')),
                      preauthorized=bool(create.get('preauthorized')), tags=tuple(tags), created=now,
                      expires=now + expiry, description=str(body.get('description') or ''))
        self.auth_keys[key_id] = key
        self.writes += 1
        return {**key.view(), 'key': key.key}


# ================================================================================ the tailnet resolver

Upstream = Callable[[str], tuple[str, int]]


class TailnetResolver:
    """A tailnet client's resolver (100.100.100.100) over the state of a LabTailscale; see the module docstring.

    `upstream(nameserver) -> (host, port)` says where to send a query meant for `nameserver`:53 (tests: a
    local port); `timeout` bounds each forward. `forwarded` counts queries sent upstream.
    """

    def __init__(self, tailnet: LabTailscale, *, timeout: float = 2.0, upstream: Upstream | None = None,
                 filter_unrouted: bool = False) -> None:
        self.tailnet = tailnet
        self.timeout = timeout
        self.upstream: Upstream = upstream or (lambda ns: (ns, 53))
        self.filter_unrouted = filter_unrouted
        self.forwarded = 0
        self.host: str | None = None
        self.port: int | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, host: str = MAGICDNS_IP, port: int = 53) -> None:
        """Listen on host:port over UDP and TCP (port 0: a free one for both, then in `self.port`)."""
        loop = asyncio.get_running_loop()
        for attempt in range(20):
            udp, _ = await loop.create_datagram_endpoint(lambda: _ResolverUdp(self), local_addr=(host, port))
            actual = int(udp.get_extra_info('sockname')[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, actual)
            except OSError:
                udp.close()
                if port or attempt == 19:
                    raise
                continue
            self._udp = udp
            self.host, self.port = host, actual
            logger.info('lab tailscale: tailnet resolver on %s port %d', host, actual)
            return

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
            self._tcp = None
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                prefix = await asyncio.wait_for(reader.readexactly(2), 10)
                data = await asyncio.wait_for(reader.readexactly(struct.unpack('!H', prefix)[0]), 10)
                wire = await self.answer(data, 65535)
                if wire is None:
                    return
                writer.write(struct.pack('!H', len(wire)) + wire)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            return
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # ------------------------------------------------------------ answering

    def split_domain(self, qname: dns.name.Name) -> tuple[str, list[str]] | None:
        """The longest split-DNS domain containing qname, with its nameservers."""
        best: tuple[str, list[str]] | None = None
        for domain, servers in self.tailnet.split_dns.items():
            if qname.is_subdomain(dns.name.from_text(domain)) and (best is None or len(domain) > len(best[0])):
                best = (domain, servers)
        return best

    async def answer(self, data: bytes, limit: int = 512) -> bytes | None:
        """The wire answer to the query `data` (None: drop it)."""
        try:
            query = dns.message.from_wire(data)
        except Exception:  # anything a malformed packet raises
            return None
        if query.flags & dns.flags.QR or len(query.question) != 1:
            return None
        question = query.question[0]
        response = await self._resolve(query, question.name, question.rdtype)
        if limit < 65535 and query.edns >= 0:
            limit = max(512, min(query.payload, 1232))
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer, response.authority, response.additional = [], [], []
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)

    async def _resolve(self, query: dns.message.Message, qname: dns.name.Name,
                       rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        suffix = dns.name.from_text(self.tailnet.magic_suffix)
        if qname.is_subdomain(suffix):
            return self._magic(query, suffix, qname, rdtype)
        split = self.split_domain(qname)
        servers = split[1] if split is not None else []
        for server in servers:
            if not self.tailnet.routed(server):
                logger.debug('lab tailscale resolver: %s unreachable (no enabled route), skipped for %s', server,
                             qname)
                continue
            host, port = self.upstream(server)
            try:
                self.forwarded += 1
                answer = await dns.asyncquery.udp(query, host, timeout=self.timeout, port=port,
                                                  ignore_unexpected=True)
                if answer.flags & dns.flags.TC:
                    answer = await dns.asyncquery.tcp(query, host, timeout=self.timeout, port=port)
            except (dns.exception.DNSException, OSError) as exc:
                logger.debug('lab tailscale resolver: forward of %s to %s failed: %s', qname, server, exc)
                continue
            answer.id = query.id
            if self.filter_unrouted:
                self._drop_unrouted(answer)
            return answer
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        response.set_rcode(dns.rcode.SERVFAIL)
        return response

    def _drop_unrouted(self, answer: dns.message.Message) -> None:
        kept: list[dns.rrset.RRset] = []
        for rrset in answer.answer:
            if rrset.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
                kept.append(rrset)
                continue
            reachable = [rd for rd in rrset if self.tailnet.routed(rd.to_text())]
            if reachable:
                kept.append(dns.rrset.from_rdata_list(rrset.name, rrset.ttl, reachable))
        answer.answer = kept

    def _magic(self, query: dns.message.Message, suffix: dns.name.Name, qname: dns.name.Name,
               rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        records: dict[str, dict[str, list[str]]] = {}
        for device in self.tailnet.devices.values():
            v4 = [a for a in device.addresses if ':' not in a]
            v6 = [a for a in device.addresses if ':' in a]
            records[device.name] = {k: v for k, v in (('A', v4), ('AAAA', v6)) if v}
        view = View([suffix.to_text()], records, ttl=600)
        found = view.lookup(qname, rdtype)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA | dns.flags.AA
        response.set_rcode(found.rcode)
        response.answer = found.answer
        response.authority = found.authority
        return response


class _ResolverUdp(asyncio.DatagramProtocol):
    def __init__(self, resolver: TailnetResolver) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.resolver._spawn(self._reply(data, addr))

    async def _reply(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        wire = await self.resolver.answer(data, 512)
        if wire is not None and self.transport is not None:
            self.transport.sendto(wire, addr)


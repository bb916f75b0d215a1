"""The Tailscale API (v2) through requests: OAuth client credentials or an API key, scope checks, typed errors.

Endpoints used (https://tailscale.com/api, https://tailscale.com/kb/1215/oauth-clients):

    POST  /api/v2/oauth/token                        client credentials -> {access_token, expires_in, scope}
    GET   /api/v2/tailnet/{tailnet}/dns/split-dns    {domain: [nameserver, ...]}
    PATCH /api/v2/tailnet/{tailnet}/dns/split-dns    merge: listed domains replaced, `null` removes one
    PUT   /api/v2/tailnet/{tailnet}/dns/split-dns    replace the whole map ({} clears it)
    GET   /api/v2/tailnet/{tailnet}/devices?fields=all
    GET   /api/v2/device/{id}/routes                 {advertisedRoutes, enabledRoutes}
    POST  /api/v2/device/{id}/routes                 {routes: [...]} replaces the enabled routes
    DELETE /api/v2/device/{id}
    POST  /api/v2/tailnet/{tailnet}/keys             an auth key with capabilities.devices.create

An OAuth client's access token lives an hour and carries the scopes granted to the client (the token
endpoint says which, space-separated, in `scope`); it is cached until shortly before it expires. Scopes
(https://tailscale.com/kb/1623/trust-credentials): a write scope implies its read scope (`dns` covers
`dns:read`), `all` covers everything and `all:read` every read. An API key has full access, so no scope
check applies to it. `require()` checks scopes before any change and names every missing one at once.

Reads (GET) are retried with back-off on 429, 5xx and connection trouble; writes are sent once, except
after a 429, which says the request was not acted on. Secrets (client secret, API key, tokens) never
appear in exceptions, reprs or logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from homelab.errors import ConfigError, HomelabError, NotFound
from homelab.target import Secret

log = logging.getLogger("homelab.clients.tailscale")

DEFAULT_BASE_URL = "https://api.tailscale.com"
DEFAULT_TAILNET = "-"  # the tailnet of the credentials
TOKEN_MARGIN = 60.0  # seconds before expiry at which a cached access token is renewed
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})

# What each operation needs (write scopes imply their read scope).
SCOPE_DNS_READ = "dns:read"
SCOPE_DNS = "dns"
SCOPE_DEVICES_READ = "devices:core:read"
SCOPE_DEVICES = "devices:core"
SCOPE_ROUTES_READ = "devices:routes:read"
SCOPE_ROUTES = "devices:routes"
SCOPE_AUTH_KEYS = "auth_keys"


class TailscaleError(HomelabError):
    """The Tailscale API refused a request, or could not be reached; `status` is the HTTP status if any."""

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class TailscaleAuthError(TailscaleError):
    """The credentials were refused (401, or the token endpoint said invalid_client)."""


class TailscalePermissionError(TailscaleError):
    """The credentials lack scopes an operation needs; `missing` names them (checked before any change)."""

    def __init__(self, message: str, *, missing: Sequence[str] = (), status: int | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, status=status, hint=hint)
        self.missing = tuple(missing)


class TailscaleNotFound(TailscaleError, NotFound):
    """404: the device (or tailnet) does not exist."""


class _Transient(Exception):
    """A GET answered 429/5xx: retried, then turned into a TailscaleError."""

    def __init__(self, error: TailscaleError) -> None:
        super().__init__(str(error))
        self.error = error


def scope_covers(granted: Iterable[str], needed: str) -> bool:
    """Whether `granted` scopes allow `needed` (write implies read; all / all:read)."""
    have = set(granted)
    if "all" in have or needed in have:
        return True
    if needed.endswith(":read"):
        return "all:read" in have or needed.removesuffix(":read") in have
    return False


@dataclass(frozen=True)
class Routes:
    """A device's subnet routes: what it advertises and what the tailnet has enabled (approved)."""

    advertised: tuple[str, ...]
    enabled: tuple[str, ...]

    @property
    def pending(self) -> tuple[str, ...]:
        """Advertised but not yet approved."""
        return tuple(r for r in self.advertised if r not in self.enabled)


@dataclass(frozen=True)
class Device:
    """One device of the tailnet (GET .../devices?fields=all); `raw` has the whole answer."""

    id: str
    hostname: str
    name: str
    addresses: tuple[str, ...]
    tags: tuple[str, ...]
    routes: Routes
    last_seen: str
    connected: bool | None
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Device:
        return cls(id=str(data.get("id") or data.get("nodeId") or ""), hostname=str(data.get("hostname") or ""),
                   name=str(data.get("name") or ""), addresses=tuple(data.get("addresses") or ()),
                   tags=tuple(data.get("tags") or ()),
                   routes=Routes(tuple(data.get("advertisedRoutes") or ()), tuple(data.get("enabledRoutes") or ())),
                   last_seen=str(data.get("lastSeen") or ""),
                   connected=data.get("connectedToControl") if isinstance(data.get("connectedToControl"), bool)
                   else None, raw=dict(data))


@dataclass(frozen=True)
class OAuthClient:
    """An OAuth client's id and secret (https://tailscale.com/kb/1215/oauth-clients)."""

    client_id: str
    client_secret: Secret


@dataclass
class _Token:
    value: Secret
    renew_at: float  # a little before it expires
    scopes: frozenset[str]


class Tailscale:
    """A session with the Tailscale API for one tailnet (default "-": the credentials' own).

    Give either `oauth` (preferred: scoped, short-lived tokens) or `api_key`. `verify` is a CA bundle path
    or True for the system trust store; False is refused. `calls` counts HTTP requests sent (token requests
    included) and `writes` the changes among them.
    """

    def __init__(self, *, oauth: OAuthClient | None = None, api_key: Secret | None = None,
                 base_url: str = DEFAULT_BASE_URL, tailnet: str = DEFAULT_TAILNET, verify: str | bool = True,
                 timeout: float = 30.0, read_attempts: int = 4, retry_wait: float = 0.2,
                 session: requests.Session | None = None) -> None:
        if (oauth is None) == (api_key is None):
            raise ConfigError("the Tailscale client needs exactly one of an OAuth client or an API key")
        if verify is False:
            raise ConfigError("TLS verification of the Tailscale API cannot be turned off",
                              hint="give the CA bundle that signed the API's certificate")
        self.base_url = base_url.rstrip("/")
        self.tailnet = tailnet
        self._oauth = oauth
        self._api_key = api_key
        self._verify: str | bool = verify
        self._timeout = timeout
        self._read_attempts = max(1, read_attempts)
        self._retry_wait = retry_wait
        self._session = session or requests.Session()
        self._token: _Token | None = None
        self.calls = 0
        self.writes = 0

    def __repr__(self) -> str:
        auth = f"oauth client {self._oauth.client_id}" if self._oauth else "API key"
        return f"Tailscale({self.base_url}, tailnet={self.tailnet!r}, {auth})"

    def close(self) -> None:
        self._session.close()

    # ------------------------------------------------------------------ auth

    def _fetch_token(self) -> _Token:
        assert self._oauth is not None
        url = f"{self.base_url}/api/v2/oauth/token"
        try:
            self.calls += 1
            response = self._session.post(url, data={"client_id": self._oauth.client_id,
                                                     "client_secret": self._oauth.client_secret.value,
                                                     "grant_type": "client_credentials"},
                                          timeout=self._timeout, verify=self._verify)
        except requests.exceptions.SSLError as exc:
            raise TailscaleError(f"TLS verification of {self.base_url} failed: {_short(exc)}",
                                 hint="check the CA bundle given for the Tailscale API") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TailscaleError(f"POST /api/v2/oauth/token: {self.base_url} is unreachable: {_short(exc)}") from None
        except requests.RequestException as exc:
            raise TailscaleError(f"POST /api/v2/oauth/token: {type(exc).__name__}: {_short(exc)}",
                                 hint="check the target's tailscale_api URL") from None
        log.debug("POST /api/v2/oauth/token: %d", response.status_code)
        body = _json(response)
        if response.status_code in (400, 401) or (isinstance(body, dict) and body.get("error")):
            code = str(body.get("error") or response.status_code) if isinstance(body, dict) else response.status_code
            raise TailscaleAuthError(f"the Tailscale OAuth client {self._oauth.client_id} was refused ({code})",
                                     status=response.status_code,
                                     hint="check the OAuth client id and secret (they may have been revoked)")
        if response.status_code >= 400 or not isinstance(body, dict) or not body.get("access_token"):
            raise TailscaleError(f"POST /api/v2/oauth/token: {response.status_code} {_message(body)}",
                                 status=response.status_code)
        lifetime = float(body.get("expires_in") or 3600)
        scopes = frozenset(str(body.get("scope") or "").split())
        margin = min(TOKEN_MARGIN, lifetime / 10)
        return _Token(Secret(str(body["access_token"])), time.monotonic() + lifetime - margin, scopes)

    def _access_token(self) -> _Token:
        token = self._token
        if token is None or time.monotonic() >= token.renew_at:
            token = self._token = self._fetch_token()
        return token

    def _auth_header(self) -> dict[str, str]:
        if self._api_key is not None:
            return {"Authorization": f"Bearer {self._api_key.value}"}
        return {"Authorization": f"Bearer {self._access_token().value.value}"}

    @property
    def granted_scopes(self) -> frozenset[str]:
        """The scopes of the current access token ({"all"} for an API key, which has full access)."""
        if self._api_key is not None:
            return frozenset({"all"})
        return self._access_token().scopes

    def missing_scopes(self, *needed: str) -> list[str]:
        granted = self.granted_scopes
        return [scope for scope in dict.fromkeys(needed) if not scope_covers(granted, scope)]

    def require(self, *needed: str) -> None:
        """Raise TailscalePermissionError naming every scope of `needed` the credentials lack (sends no change)."""
        missing = self.missing_scopes(*needed)
        if missing:
            who = f"OAuth client {self._oauth.client_id}" if self._oauth else "API key"
            raise TailscalePermissionError(
                f"the Tailscale {who} lacks scope(s) {', '.join(missing)} "
                f"(granted: {', '.join(sorted(self.granted_scopes)) or 'none'})", missing=missing,
                hint="edit the OAuth client's scopes in the admin console (Settings > Trust credentials)")

    # -------------------------------------------------------------- requests

    def _tailnet_path(self, *parts: str) -> str:
        return "/api/v2/tailnet/" + "/".join(quote(p, safe="") for p in (self.tailnet, *parts))

    def _send(self, method: str, path: str, *, json: Any = None, params: Mapping[str, str] | None = None) -> Any:
        headers = {"Accept": "application/json", **self._auth_header()}
        try:
            self.calls += 1
            response = self._session.request(method, self.base_url + path, json=json, params=params,
                                             headers=headers, timeout=self._timeout, verify=self._verify)
        except requests.exceptions.SSLError as exc:
            raise TailscaleError(f"TLS verification of {self.base_url} failed: {_short(exc)}",
                                 hint="check the CA bundle given for the Tailscale API") from None
        except (requests.ConnectionError, requests.Timeout):
            raise  # the callers retry reads and report writes
        except requests.RequestException as exc:  # a bad URL, a broken answer, redirects
            raise TailscaleError(f"{method} {path}: {type(exc).__name__}: {_short(exc)}",
                                 hint="check the target's tailscale_api URL") from None
        log.debug("%s %s: %d", method, path, response.status_code)
        if response.status_code < 400:
            return _json(response) if response.content else None
        body = _json(response)
        status = response.status_code
        text = f"{method} {path}: {status} {_message(body)}".rstrip()
        if status == 401:
            self._token = None
            raise TailscaleAuthError(text, status=status, hint="the token or API key was refused")
        if status == 403:
            raise TailscalePermissionError(text, status=status,
                                           hint="the credentials may lack a scope or own no tag this needs")
        if status == 404:
            raise TailscaleNotFound(text, status=status)
        error = TailscaleError(text, status=status)
        if status in TRANSIENT_STATUS:
            raise _Transient(error)
        raise error

    def _retrying(self, method: str, path: str, retry_on: type[BaseException] | tuple[type[BaseException], ...],
                  **kwargs: Any) -> Any:
        def retryable(exc: BaseException) -> bool:
            if method != "GET":
                return isinstance(exc, _Transient) and exc.error.status == 429
            return isinstance(exc, retry_on)

        try:
            for attempt in Retrying(retry=retry_if_exception(retryable), reraise=True,
                                    stop=stop_after_attempt(self._read_attempts),
                                    wait=wait_exponential(multiplier=self._retry_wait, max=5)):
                with attempt:
                    return self._send(method, path, **kwargs)
        except _Transient as exc:
            raise exc.error from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            if method == "GET":
                raise TailscaleError(f"GET {path}: {self.base_url} is unreachable: {_short(exc)}") from None
            raise TailscaleError(f"{method} {path}: the connection failed before Tailscale answered "
                                 f"({_short(exc)})", hint="Tailscale may or may not have acted; run again: the "
                                                          "layer reads the state first") from None
        raise AssertionError("unreachable")

    def get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """A read, retried with back-off on 429, 5xx and connection trouble."""
        return self._retrying("GET", path, (_Transient, requests.ConnectionError, requests.Timeout), params=params)

    def write(self, method: str, path: str, json: Any = None, *, scope: str | None = None) -> Any:
        """POST, PATCH, PUT or DELETE after checking `scope`; sent once (again only after a 429)."""
        if scope is not None:
            self.require(scope)
        result = self._retrying(method, path, _Transient, json=json)
        self.writes += 1
        return result

    # ------------------------------------------------------------- split DNS

    def get_split_dns(self) -> dict[str, list[str]]:
        """{domain: [nameserver, ...]} of the tailnet."""
        self.require(SCOPE_DNS_READ)
        return _split_map(self.get(self._tailnet_path("dns", "split-dns")))

    def update_split_dns(self, changes: Mapping[str, Sequence[str] | None]) -> dict[str, list[str]]:
        """PATCH: set the listed domains' nameservers (None removes a domain); others stay. Returns the new map."""
        body = {domain: (list(servers) if servers is not None else None) for domain, servers in changes.items()}
        return _split_map(self.write("PATCH", self._tailnet_path("dns", "split-dns"), body, scope=SCOPE_DNS))

    def replace_split_dns(self, config: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        """PUT: the whole split DNS map becomes `config` ({} removes every domain). Returns the new map."""
        body = {domain: list(servers) for domain, servers in config.items()}
        return _split_map(self.write("PUT", self._tailnet_path("dns", "split-dns"), body, scope=SCOPE_DNS))

    def set_split_dns(self, domain: str, nameservers: Sequence[str]) -> dict[str, list[str]]:
        return self.update_split_dns({domain: nameservers})

    def remove_split_dns(self, domain: str) -> dict[str, list[str]]:
        return self.update_split_dns({domain: None})

    # --------------------------------------------------------------- devices

    def list_devices(self) -> list[Device]:
        """Every device of the tailnet with all fields (routes included)."""
        self.require(SCOPE_DEVICES_READ)
        body = self.get(self._tailnet_path("devices"), params={"fields": "all"})
        devices = body.get("devices") if isinstance(body, dict) else None
        return [Device.parse(d) for d in devices or [] if isinstance(d, dict)]

    def devices_named(self, hostname: str) -> list[Device]:
        """The devices whose hostname is `hostname` (a re-registered node may appear twice)."""
        return [d for d in self.list_devices() if d.hostname == hostname]

    def get_routes(self, device_id: str) -> Routes:
        self.require(SCOPE_ROUTES_READ)
        return _routes(self.get(f"/api/v2/device/{quote(device_id, safe='')}/routes"))

    def set_routes(self, device_id: str, routes: Sequence[str]) -> Routes:
        """Replace the device's enabled (approved) subnet routes with `routes`."""
        return _routes(self.write("POST", f"/api/v2/device/{quote(device_id, safe='')}/routes",
                                  {"routes": list(routes)}, scope=SCOPE_ROUTES))

    def delete_device(self, device_id: str) -> None:
        self.write("DELETE", f"/api/v2/device/{quote(device_id, safe='')}", scope=SCOPE_DEVICES)

    # ------------------------------------------------------------------ keys

    def create_auth_key(self, tags: Sequence[str], *, reusable: bool = False, ephemeral: bool = False,
                        preauthorized: bool = True, expiry_seconds: int | None = None,
                        description: str = "") -> tuple[str, Secret]:
        """A new auth key: (key id, the key). Keys made by an OAuth client must carry tags."""
        create: dict[str, Any] = {"reusable": reusable, "ephemeral": ephemeral, "preauthorized": preauthorized,
                                  "tags": list(tags)}
        body: dict[str, Any] = {"capabilities": {"devices": {"create": create}}, "description": description}
        if expiry_seconds is not None:
            body["expirySeconds"] = expiry_seconds
        answer = self.write("POST", self._tailnet_path("keys"), body, scope=SCOPE_AUTH_KEYS)
        if not isinstance(answer, dict) or not answer.get("key"):
            raise TailscaleError("POST keys: the answer holds no key")
        return str(answer.get("id") or ""), Secret(str(answer["key"]))


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _message(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("message", "error_description", "error"):
            if body.get(key):
                return _short(str(body[key]))
    return ""


def _short(exc: BaseException | str) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."


def _split_map(body: Any) -> dict[str, list[str]]:
    if not isinstance(body, dict):
        return {}
    return {str(domain): [str(s) for s in servers] for domain, servers in body.items() if isinstance(servers, list)}


def _routes(body: Any) -> Routes:
    body = body if isinstance(body, dict) else {}
    return Routes(tuple(str(r) for r in body.get("advertisedRoutes") or ()),
                  tuple(str(r) for r in body.get("enabledRoutes") or ()))

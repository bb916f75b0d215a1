"""The Cloudflare API v4 through `requests`: Bearer token, verified TLS, typed errors, paged lists.

What it speaks (https://developers.cloudflare.com/api/):

- every answer is the v4 envelope `{"success", "errors": [{"code", "message"}], "messages", "result",
  "result_info": {"page", "per_page", "count", "total_count", "total_pages"}}`; an answer with
  `success: false` (or a status >= 400) becomes a `CloudflareError` carrying Cloudflare's codes;
- token checks: `GET /user/tokens/verify` (user tokens) or `GET /accounts/{account_id}/tokens/verify`
  (account-owned tokens, which the user endpoint refuses), then what the token may do (see
  `Cloudflare.check_token`);
- zones: `GET /zones?name=`; DNS records: `GET|POST /zones/{zone_id}/dns_records`,
  `PATCH|DELETE /zones/{zone_id}/dns_records/{id}`;
- Cloudflare Tunnel (remotely managed, https://developers.cloudflare.com/cloudflare-one/connections/
  connect-networks/get-started/create-remote-tunnel-api/): `POST|GET /accounts/{account_id}/cfd_tunnel`,
  `GET|DELETE .../cfd_tunnel/{id}`, `GET .../token`, `GET|PUT .../configurations`,
  `GET|DELETE .../connections`.

Reads (GET) are retried on connection trouble, 429 and 5xx, waiting what Retry-After says (capped);
writes are sent once, because a lost answer does not say whether Cloudflare acted: a re-run of the
layer reads the state and does only what is still missing.

The token lives in the session's Authorization header only: never in a URL, an exception, a repr or
a log line.
"""

from __future__ import annotations

import base64
import collections
import email.utils
import logging
import os
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt

from homelab.errors import ConfigError, Conflict, HomelabError, NotFound

log = logging.getLogger("homelab.clients.cloudflare")

DEFAULT_BASE_URL = "https://api.cloudflare.com/client/v4"
OWNER_COMMENT = "managed-by: homelab"
TUNNEL_DOMAIN = "cfargotunnel.com"  # a tunnel's DNS target is <tunnel id>.cfargotunnel.com
CATCH_ALL = {"service": "http_status:404"}
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
AUTH_ERROR = 10000  # "Authentication error": the token may not do this (HTTP 403)
RECORD_MISSING = 81044  # "Record does not exist."
TUNNEL_NAME_TAKEN = 1013  # "You already have a tunnel with this name. ..."

Json = dict[str, Any]


# ----------------------------------------------------------------------------------------- errors

@dataclass(frozen=True)
class ApiMessage:
    """One entry of the envelope's `errors` (or `messages`): Cloudflare's code and text."""

    code: int
    message: str

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"


class CloudflareError(HomelabError):
    """Cloudflare refused a request or could not be reached; `status` and `errors` say how."""

    def __init__(self, message: str, *, status: int | None = None, errors: Sequence[ApiMessage] = (),
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.errors = tuple(errors)

    @property
    def codes(self) -> tuple[int, ...]:
        return tuple(e.code for e in self.errors)


class CloudflareAuthError(CloudflareError):
    """401/403: the token is invalid, not active, or lacks a permission for this request."""


class CloudflareNotFound(CloudflareError, NotFound):
    """404, or an object looked up by name that does not exist."""


class CloudflareConflict(CloudflareError, Conflict):
    """The request contradicts existing state (a name taken, a record of another kind at that name, ...)."""


class TokenPermissionsMissing(ConfigError):
    """The API token cannot do what the layer needs; `missing` names each permission as the dashboard does."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        super().__init__("the Cloudflare API token lacks: " + ", ".join(self.missing),
                         hint="edit the token at dash.cloudflare.com > My Profile > API Tokens and add "
                              "these permissions, or set CLOUDFLARE_API_TOKEN to one that has them")


# ------------------------------------------------------------------------------------ permissions

@dataclass(frozen=True)
class Permission:
    """A permission as the dashboard names it, and how the API shows that a token holds it.

    `groups`: names of API permission groups that grant it (token policies, GET /user/tokens/{id});
    `legacy`: entries of a zone's `permissions` array that grant it (e.g. "#dns_records:edit").
    Names: https://developers.cloudflare.com/fundamentals/api/reference/permissions/
    """

    label: str
    scope: str  # "zone" or "account"
    groups: tuple[str, ...]
    legacy: tuple[str, ...] = ()


ZONE_READ = Permission("Zone Zone Read", "zone", ("Zone Read", "Zone Write", "DNS Read", "DNS Write"),
                       ("#zone:read", "#zone:edit", "#dns_records:read", "#dns_records:edit"))
DNS_READ = Permission("Zone DNS Read", "zone", ("DNS Read", "DNS Write"), ("#dns_records:read", "#dns_records:edit"))
DNS_EDIT = Permission("Zone DNS Edit", "zone", ("DNS Write",), ("#dns_records:edit",))
# The create-tunnel reference accepts any of these groups ("Cloudflare Tunnel Write" is the dashboard's
# Account > Cloudflare Tunnel > Edit).
TUNNEL_READ = Permission("Account Cloudflare Tunnel Read", "account", (
    "Cloudflare Tunnel Read", "Cloudflare Tunnel Write", "Cloudflare One Connectors Read",
    "Cloudflare One Connectors Write", "Cloudflare One Connector: cloudflared Read",
    "Cloudflare One Connector: cloudflared Write"))
TUNNEL_EDIT = Permission("Account Cloudflare Tunnel Edit", "account", (
    "Cloudflare Tunnel Write", "Cloudflare One Connectors Write", "Cloudflare One Connector: cloudflared Write"))
NEEDED = (ZONE_READ, DNS_EDIT, TUNNEL_READ, TUNNEL_EDIT)


@dataclass(frozen=True)
class TokenCheck:
    """What the token check found. `missing` and `unverified` are dashboard names with their scope.

    `source` says how permissions were learnt: "token policies" (the token may read itself), or
    "zone permissions and reads" (the zone's permissions array, then read-only probes).
    `unverified` lists permissions no read can prove; the first write would be the test.
    """

    token_id: str
    owner: str  # "user" or "account"
    zone: Json | None
    missing: tuple[str, ...]
    unverified: tuple[str, ...]
    source: str

    @property
    def ok(self) -> bool:
        return not self.missing


# ------------------------------------------------------------------------------------ the client

@dataclass
class _Retry(Exception):
    """A read worth trying again; `after` is what Retry-After asked for (seconds), if anything."""

    reason: str
    after: float | None = None
    response: requests.Response | None = field(default=None, repr=False)


class Cloudflare:
    """One API session with one token. `calls` counts requests sent (`calls_by_method` by method)."""

    def __init__(self, token: str, *, base_url: str = DEFAULT_BASE_URL, ca_bundle: str | bool = True,
                 timeout: float = 30.0, read_attempts: int = 5, max_retry_wait: float = 30.0) -> None:
        if ca_bundle is False:
            raise ConfigError("TLS verification of the Cloudflare API cannot be turned off",
                              hint="give a CA bundle path, or True for the system trust store")
        if not token:
            raise ConfigError("no Cloudflare API token", hint="set CLOUDFLARE_API_TOKEN")
        self.base_url = base_url.rstrip("/")
        self.ca_bundle = ca_bundle
        self.timeout = timeout
        self.read_attempts = read_attempts
        self.max_retry_wait = max_retry_wait
        self.calls = 0
        self.calls_by_method: collections.Counter[str] = collections.Counter()
        self._session = requests.Session()
        self._session.headers.update({"Authorization": f"Bearer {token}", "Accept": "application/json",
                                      "User-Agent": "homelab"})

    def __repr__(self) -> str:
        return f"Cloudflare(base_url={self.base_url!r}, calls={self.calls})"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Cloudflare:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------- requests

    def _send(self, method: str, path: str, params: Mapping[str, Any] | None, body: Any) -> requests.Response:
        url = self.base_url + path
        self.calls += 1
        self.calls_by_method[method] += 1
        try:
            # verify per request: a session-level value loses to REQUESTS_CA_BUNDLE in the environment
            return self._session.request(method, url, params=params, json=body, timeout=self.timeout,
                                         verify=self.ca_bundle)
        except requests.exceptions.SSLError as exc:
            raise CloudflareError(f"{method} {path}: TLS verification of {self.base_url} failed: {_short(exc)}",
                                  hint="check the CA bundle of the target") from None
        except (requests.ConnectionError, requests.Timeout):
            raise  # the callers retry reads and report writes
        except requests.RequestException as exc:  # a bad URL, a broken answer, redirects
            raise CloudflareError(f"{method} {path}: {type(exc).__name__}: {_short(exc)}",
                                  hint="check the target's cloudflare_api URL" if method == "GET" else
                                  "Cloudflare may or may not have acted; run again") from None

    def request(self, method: str, path: str, *, params: Mapping[str, Any] | None = None,
                body: Any = None) -> Json:
        """One request; the whole envelope back, or a CloudflareError. GETs are retried (see module doc)."""
        if method != "GET":
            try:
                response = self._send(method, path, params, body)
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise CloudflareError(f"{method} {path}: the connection to {self.base_url} failed before "
                                      f"Cloudflare answered ({_short(exc)})",
                                      hint="Cloudflare may or may not have acted; run again: the layer reads "
                                           "the state and does only what is still missing") from None
            return self._envelope(method, path, response)

        def once() -> requests.Response:
            try:
                response = self._send(method, path, params, body)
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise _Retry(_short(exc)) from None
            if response.status_code in RETRY_STATUSES:
                raise _Retry(f"HTTP {response.status_code}", _retry_after(response), response)
            return response

        try:
            for attempt in Retrying(retry=retry_if_exception_type(_Retry), reraise=True,
                                    stop=stop_after_attempt(self.read_attempts), wait=self._wait):
                with attempt:
                    response = once()
        except _Retry as exc:
            if exc.response is not None:
                return self._envelope(method, path, exc.response)
            raise CloudflareError(f"GET {path}: {self.base_url} did not answer after {self.read_attempts} "
                                  f"attempts ({exc.reason})") from None
        return self._envelope(method, path, response)

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        after = exc.after if isinstance(exc, _Retry) else None
        if after is not None:
            return float(min(max(after, 0.0), self.max_retry_wait))
        return min(0.2 * 2.0 ** (state.attempt_number - 1), 5.0)

    def _envelope(self, method: str, path: str, response: requests.Response) -> Json:
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise CloudflareError(f"{method} {path}: HTTP {response.status_code}, not a Cloudflare API answer",
                                  status=response.status_code,
                                  hint="is the base URL of the Cloudflare API right?")
        if response.status_code < 400 and data.get("success", True) is not False:
            return data
        errors = [ApiMessage(int(e.get("code") or 0), str(e.get("message") or "")) for e in data.get("errors") or []
                  if isinstance(e, dict)]
        detail = "; ".join(map(str, errors)) or "no error detail"
        message = f"{method} {path}: HTTP {response.status_code}: {detail}"
        status = response.status_code
        if status in (401, 403):
            hint = ("the token may not do this: check its permissions and resources"
                    if AUTH_ERROR in {e.code for e in errors} else "check CLOUDFLARE_API_TOKEN")
            raise CloudflareAuthError(message, status=status, errors=errors, hint=hint)
        if status == 404 or RECORD_MISSING in {e.code for e in errors}:
            raise CloudflareNotFound(message, status=status, errors=errors)
        if status == 409 or {e.code for e in errors} & {TUNNEL_NAME_TAKEN, 81053, 81054, 81057}:
            raise CloudflareConflict(message, status=status, errors=errors)
        raise CloudflareError(message, status=status, errors=errors)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None).get("result")

    def pages(self, path: str, *, per_page: int = 100, **params: Any) -> Iterator[Json]:
        """Every item of a paged list, page after page, until result_info says there is no more."""
        page = 1
        while True:
            data = self.request("GET", path, params={**params, "page": page, "per_page": per_page})
            items = data.get("result") or []
            yield from items
            info = data.get("result_info") or {}
            total_pages = info.get("total_pages")
            if total_pages is not None:
                if page >= int(total_pages):
                    return
            elif len(items) < int(info.get("per_page") or per_page):
                return
            if not items:
                return
            page += 1

    # ---------------------------------------------------------------------------------- tokens

    def verify(self, account_id: str | None = None) -> tuple[Json, str]:
        """The token's id and status, and whose it is ("user" or "account"): GET .../tokens/verify.

        An account-owned token is refused by /user/tokens/verify, so that is tried second.
        """
        try:
            return self.get("/user/tokens/verify"), "user"
        except CloudflareAuthError:
            if not account_id:
                raise
        return self.get(f"/accounts/{_seg(account_id)}/tokens/verify"), "account"

    def token_details(self, token_id: str, owner: str, account_id: str | None) -> Json | None:
        """The token's own policies (GET /user/tokens/{id}), or None when it may not read itself."""
        path = (f"/accounts/{_seg(account_id or '')}/tokens/{_seg(token_id)}" if owner == "account"
                else f"/user/tokens/{_seg(token_id)}")
        try:
            result = self.get(path)
        except (CloudflareAuthError, CloudflareNotFound):
            return None
        return result if isinstance(result, dict) else None

    def check_token(self, zone_name: str, account_id: str) -> TokenCheck:
        """Is the token active, and may it read `zone_name`, edit its DNS, and read and edit tunnels?

        Read-only, so it runs before any change. In order of faithfulness:
        1. the token's own policies (GET /user/tokens/{id}, when it holds "API Tokens Read"): each
           permission group on the zone's or account's resource, `deny` policies subtracted;
        2. else the zone object's `permissions` array (e.g. "#dns_records:edit") for the zone's
           permissions, and read probes (403 with code 10000 means missing) for the rest; tunnel Edit
           is then `unverified`, since only a write could prove it.
        Raises CloudflareAuthError if the token is not valid or not active.
        """
        result, owner = self.verify(account_id)
        status = str(result.get("status") or "")
        token_id = str(result.get("id") or "")
        if status != "active":
            raise CloudflareAuthError(f"the Cloudflare API token is {status or 'not active'}",
                                      hint="create a new token, or re-enable this one, in the dashboard")
        zone = self.find_zone(zone_name, account_id)
        details = self.token_details(token_id, owner, account_id)
        where = {"zone": f"zone {zone_name}", "account": f"account {account_id}"}
        if details is not None:
            missing: list[str] = []
            zone_id = str(zone["id"]) if zone else ""
            for perm in NEEDED:
                if not _granted(details, perm, zone_id=zone_id, account_id=account_id):
                    missing.append(f"{perm.label} ({where[perm.scope]})")
            if zone is None and f"{ZONE_READ.label} ({where['zone']})" not in missing:
                missing.insert(0, f"{ZONE_READ.label} ({where['zone']}: no such zone in the account)")
            return TokenCheck(token_id, owner, zone, tuple(missing), (), "token policies")
        missing, unverified = self._probe(zone, where, account_id)
        return TokenCheck(token_id, owner, zone, tuple(missing), tuple(unverified), "zone permissions and reads")

    def _probe(self, zone: Json | None, where: Mapping[str, str], account_id: str) -> tuple[list[str], list[str]]:
        """(missing, unverified) from the zone's `permissions` array and read-only probes."""
        missing: list[str] = []
        unverified: list[str] = []
        dns_edit = f"{DNS_EDIT.label} ({where['zone']})"
        if zone is None:
            missing += [f"{ZONE_READ.label} ({where['zone']})", dns_edit]
        else:
            legacy = self.permissions(zone)
            if legacy is not None:
                if not set(DNS_EDIT.legacy) & set(legacy):
                    missing.append(dns_edit)
            elif not self._can_read(f"/zones/{_seg(str(zone['id']))}/dns_records"):
                missing.append(dns_edit)
            else:
                unverified.append(dns_edit)
        if self._can_read(f"/accounts/{_seg(account_id)}/cfd_tunnel", is_deleted="false"):
            unverified.append(f"{TUNNEL_EDIT.label} ({where['account']})")
        else:
            missing += [f"{TUNNEL_READ.label} ({where['account']})", f"{TUNNEL_EDIT.label} ({where['account']})"]
        return missing, unverified

    def require(self, zone_name: str, account_id: str) -> TokenCheck:
        """check_token, raising TokenPermissionsMissing (naming each permission) when anything is missing."""
        check = self.check_token(zone_name, account_id)
        if check.missing:
            raise TokenPermissionsMissing(check.missing)
        return check

    def _can_read(self, path: str, **params: Any) -> bool:
        try:
            self.request("GET", path, params={**params, "per_page": 5})
        except CloudflareAuthError as exc:
            if AUTH_ERROR in exc.codes or exc.status == 403:
                return False
            raise
        return True

    # ----------------------------------------------------------------------------------- zones

    def find_zone(self, name: str, account_id: str | None = None) -> Json | None:
        """The zone called `name` (GET /zones?name=), or None when the token sees no such zone."""
        params: dict[str, Any] = {"name": name}
        if account_id:
            params["account.id"] = account_id
        found = [z for z in self.pages("/zones", per_page=50, **params) if str(z.get("name")) == name]
        return found[0] if found else None

    def permissions(self, zone: str | Mapping[str, Any]) -> list[str] | None:
        """The zone's `permissions` array for this token ("#zone:read", "#dns_records:edit", ...), or None when
        Cloudflare's answer has none (the field is legacy; check_token then falls back to read probes)."""
        found = self.zone(zone) if isinstance(zone, str) else zone
        value = found.get("permissions")
        return [str(p) for p in value] if isinstance(value, list) else None

    def zone(self, name: str, account_id: str | None = None) -> Json:
        found = self.find_zone(name, account_id)
        if found is None:
            raise CloudflareNotFound(f"zone {name} is not visible to the token",
                                     hint="it is not in the account, or the token lacks Zone Zone Read for it")
        return found

    # ----------------------------------------------------------------------------- DNS records

    def dns_records(self, zone_id: str, *, name: str | None = None, type: str | None = None,
                    comment: str | None = None, per_page: int = 100) -> list[Json]:
        """DNS records of the zone, all pages; `name` (full name), `type`, `comment` filter exactly."""
        params = {k: v for k, v in (("name", name), ("type", type), ("comment", comment)) if v is not None}
        return list(self.pages(f"/zones/{_seg(zone_id)}/dns_records", per_page=per_page, **params))

    def create_dns_record(self, zone_id: str, record: Mapping[str, Any]) -> Json:
        result = self.request("POST", f"/zones/{_seg(zone_id)}/dns_records", body=dict(record))["result"]
        return dict(result)

    def patch_dns_record(self, zone_id: str, record_id: str, changes: Mapping[str, Any]) -> Json:
        path = f"/zones/{_seg(zone_id)}/dns_records/{_seg(record_id)}"
        return dict(self.request("PATCH", path, body=dict(changes))["result"])

    def delete_dns_record(self, zone_id: str, record_id: str) -> None:
        self.request("DELETE", f"/zones/{_seg(zone_id)}/dns_records/{_seg(record_id)}")

    # --------------------------------------------------------------------------------- tunnels

    def tunnels(self, account_id: str, *, name: str | None = None, include_deleted: bool = False) -> list[Json]:
        """Cloudflare Tunnels (cfd_tunnel) of the account; deleted ones only when asked."""
        params: dict[str, Any] = {"is_deleted": "true" if include_deleted else "false"}
        if name is not None:
            params["name"] = name
        return list(self.pages(f"/accounts/{_seg(account_id)}/cfd_tunnel", per_page=50, **params))

    def find_tunnel(self, account_id: str, name: str) -> Json | None:
        found = [t for t in self.tunnels(account_id, name=name) if t.get("name") == name and not t.get("deleted_at")]
        return found[0] if found else None

    def tunnel(self, account_id: str, tunnel_id: str) -> Json:
        return dict(self.get(f"/accounts/{_seg(account_id)}/cfd_tunnel/{_seg(tunnel_id)}"))

    def create_tunnel(self, account_id: str, name: str) -> Json:
        """A remotely-managed tunnel (config_src "cloudflare") with a fresh 32-byte secret.

        The answer holds `credentials_file` and `token`; neither is logged or kept by this client.
        """
        secret = base64.b64encode(os.urandom(32)).decode()
        body = {"name": name, "config_src": "cloudflare", "tunnel_secret": secret}
        return dict(self.request("POST", f"/accounts/{_seg(account_id)}/cfd_tunnel", body=body)["result"])

    def tunnel_token(self, account_id: str, tunnel_id: str) -> str:
        """The token cloudflared runs with (`cloudflared tunnel run --token`, or TUNNEL_TOKEN)."""
        result = self.get(f"/accounts/{_seg(account_id)}/cfd_tunnel/{_seg(tunnel_id)}/token")
        if not isinstance(result, str) or not result:
            raise CloudflareError(f"no token for tunnel {tunnel_id} in Cloudflare's answer")
        return result

    def tunnel_configuration(self, account_id: str, tunnel_id: str) -> Json:
        path = f"/accounts/{_seg(account_id)}/cfd_tunnel/{_seg(tunnel_id)}/configurations"
        return dict(self.get(path) or {})

    def put_tunnel_configuration(self, account_id: str, tunnel_id: str, config: Mapping[str, Any]) -> Json:
        path = f"/accounts/{_seg(account_id)}/cfd_tunnel/{_seg(tunnel_id)}/configurations"
        return dict(self.request("PUT", path, body={"config": dict(config)})["result"])

    def tunnel_connections(self, account_id: str, tunnel_id: str) -> list[Json]:
        """The tunnel's connectors (cloudflared instances), each with its `conns` to the edge."""
        result = self.get(f"/accounts/{_seg(account_id)}/cfd_tunnel/{_seg(tunnel_id)}/connections")
        return list(result or [])

    def clean_tunnel_connections(self, account_id: str, tunnel_id: str, client_id: str | None = None) -> None:
        """Remove the tunnel's connectors (all, or one by client_id), as Cloudflare requires before deleting."""
        params = {"client_id": client_id} if client_id else None
        self.request("DELETE", f"/accounts/{_seg(account_id)}/cfd_tunnel/{_seg(tunnel_id)}/connections",
                     params=params)

    def delete_tunnel(self, account_id: str, tunnel_id: str) -> Json:
        return dict(self.request("DELETE", f"/accounts/{_seg(account_id)}/cfd_tunnel/{_seg(tunnel_id)}")["result"])


# ------------------------------------------------------------------------------- pure helpers

def tunnel_target(tunnel_id: str) -> str:
    """The DNS target of a tunnel: <id>.cfargotunnel.com."""
    return f"{tunnel_id}.{TUNNEL_DOMAIN}"


def tunnel_cname(fqdn: str, tunnel_id: str, comment: str = OWNER_COMMENT) -> Json:
    """The record that routes `fqdn` to a tunnel: a proxied CNAME, TTL automatic, ownership in the comment."""
    return {"type": "CNAME", "name": fqdn, "content": tunnel_target(tunnel_id), "proxied": True, "ttl": 1,
            "comment": comment}


def owned(record: Mapping[str, Any], comment: str = OWNER_COMMENT) -> bool:
    """Whether we made the record (its comment is ours): records of anyone else are never touched."""
    return str(record.get("comment") or "") == comment


def ingress_config(routes: Mapping[str, str] | Sequence[tuple[str, str]]) -> Json:
    """A remotely-managed tunnel configuration: one rule per public hostname -> origin service, the origin's
    TLS name set to that hostname (originRequest.originServerName), then the catch-all 404 rule."""
    items = list(routes.items()) if isinstance(routes, Mapping) else list(routes)
    ingress: list[Json] = [{"hostname": host, "service": service, "originRequest": {"originServerName": host}}
                           for host, service in items]
    return {"ingress": [*ingress, dict(CATCH_ALL)]}


def _granted(details: Mapping[str, Any], perm: Permission, *, zone_id: str, account_id: str) -> bool:
    """Whether the token's policies allow `perm` on the zone (or account) and no deny policy takes it away."""
    allowed = denied = False
    for policy in details.get("policies") or []:
        if not isinstance(policy, dict):
            continue
        groups = {str(g.get("name")) for g in policy.get("permission_groups") or [] if isinstance(g, dict)}
        if not groups & set(perm.groups):
            continue
        if not _covers(policy.get("resources") or {}, perm.scope, zone_id=zone_id, account_id=account_id):
            continue
        if policy.get("effect") == "deny":
            denied = True
        else:
            allowed = True
    return allowed and not denied


def _covers(resources: Mapping[str, Any], scope: str, *, zone_id: str, account_id: str) -> bool:
    """Resource keys as the API writes them: com.cloudflare.api.account.zone.<id>, ...account.<id>, with `*`,
    and an account key whose value nests the zone keys ("all zones of an account")."""
    zone_keys = {"com.cloudflare.api.account.zone.*", f"com.cloudflare.api.account.zone.{zone_id}"} if zone_id \
        else {"com.cloudflare.api.account.zone.*"}
    account_keys = {"com.cloudflare.api.account.*", f"com.cloudflare.api.account.{account_id}"}
    for key, value in resources.items():
        if scope == "account" and key in account_keys:
            return True
        if scope == "zone":
            if key in zone_keys:
                return True
            if key in account_keys and isinstance(value, Mapping) and \
                    _covers(value, scope, zone_id=zone_id, account_id=account_id):
                return True
    return False


def _retry_after(response: requests.Response) -> float | None:
    """Retry-After in seconds (delta-seconds, or an HTTP date)."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _seg(value: str) -> str:
    """One path segment, quoted, so an id can never change the path."""
    return urllib.parse.quote(str(value), safe="")


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."

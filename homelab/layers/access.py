"""The access layer: the public apps through a Cloudflare Tunnel, the internal ones through Tailscale.

Plan, in the order changes are applied:

1. credentials, checked before anything changes: the Cloudflare token must be active and hold Zone
   Read and DNS Edit on the public zone and Cloudflare Tunnel Read/Edit on the account; the Tailscale
   OAuth client must hold the dns, devices:core and devices:routes scopes. Anything missing stops the
   layer with the permissions named;
2. Cloudflare: the named, remotely-managed tunnel; its configuration (one ingress rule per public app,
   to Traefik with the app's name as the origin's TLS name, then a catch-all 404); proxied CNAMEs of
   the public names to the tunnel. Records carry our comment: stale ones we made are removed, records
   we did not make are never touched, and one of theirs on a name we need stops the layer;
3. Kubernetes (server-side apply, as the other layers): cloudflared with the tunnel's token, the
   Tailscale operator with its Connector (a subnet router for Traefik and the internal DNS), and
   k8s_gateway answering the internal domain at its MetalLB address;
4. Tailscale: the Connector's device gets its advertised routes approved (once it joins), and split
   DNS sends the internal domain to the internal DNS.

`down` removes the objects, then our DNS records, the tunnel and our split DNS entry.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from homelab import manifests
from homelab.clients import cloudflare as cflib
from homelab.clients import tailscale as tslib
from homelab.context import Run
from homelab.errors import ConfigError, Conflict
from homelab.layers import kubernetes
from homelab.plan import Change, FieldDiff, LayerPlan
from homelab.wait import poll

LAYER = "access"
PENDING_TOKEN = "pending: the tunnel is made in this run"  # noqa: S105 - a marker, not a token
TS_SCOPES = (tslib.SCOPE_DNS, tslib.SCOPE_DEVICES, tslib.SCOPE_ROUTES)


def cloudflare(run: Run) -> cflib.Cloudflare:
    if "cloudflare" not in run.memo:
        token = run.target.secret("CLOUDFLARE_API_TOKEN")
        if not token:
            raise ConfigError("CLOUDFLARE_API_TOKEN is not set", hint="the access layer needs a Cloudflare API "
                              "token (Zone Read, DNS Edit, Cloudflare Tunnel Edit); see README, Configuration")
        run.guard(_host(run.target.cloudflare_api))
        run.memo["cloudflare"] = cflib.Cloudflare(token, base_url=run.target.cloudflare_api,
                                                  ca_bundle=run.target.outside_ca)
    client: cflib.Cloudflare = run.memo["cloudflare"]
    return client


def tailscale(run: Run) -> tslib.Tailscale:
    if "tailscale" not in run.memo:
        client_id, secret = run.target.secret("TS_OAUTH_CLIENT_ID"), run.target.secret("TS_OAUTH_CLIENT_SECRET")
        if not client_id or not secret:
            raise ConfigError("TS_OAUTH_CLIENT_ID and TS_OAUTH_CLIENT_SECRET are not set",
                              hint="the access layer needs a Tailscale OAuth client (scopes dns, devices:core, "
                                   "devices:routes, auth_keys); see README, Configuration")
        from homelab.target import Secret

        run.guard(_host(run.target.tailscale_api))
        run.memo["tailscale"] = tslib.Tailscale(oauth=tslib.OAuthClient(client_id, Secret(secret)),
                                                base_url=run.target.tailscale_api,
                                                tailnet=run.inv.access.tailscale.tailnet,
                                                verify=run.target.outside_ca)
    client: tslib.Tailscale = run.memo["tailscale"]
    return client


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


def account_id(run: Run) -> str:
    value = run.target.secret("CLOUDFLARE_ACCOUNT_ID")
    if not value:
        raise ConfigError("CLOUDFLARE_ACCOUNT_ID is not set", hint="the account that holds the tunnel; see "
                                                                   "README, Configuration")
    return value


def public_hosts(run: Run) -> list[str]:
    return [str(app.hostname) for app in run.inv.apps if app.access == "public" and app.hostname]


def desired_ingress(run: Run) -> dict[str, Any]:
    origin = run.inv.access.cloudflare.origin
    return cflib.ingress_config([(host, origin) for host in public_hosts(run)])


def render(run: Run, component: str) -> Any:
    """The access layer's manifests: the target's secrets, and the tunnel's token read from Cloudflare."""
    secrets = kubernetes.target_secrets(run)
    if component == "cloudflared":
        secrets[manifests.TUNNEL_TOKEN] = run.memo.get("tunnel_token") or PENDING_TOKEN
    result = manifests.render(run.inv, component=component, secrets=secrets, issuer=run.inv.network.cert_issuer)
    if component == "tailscale" and not any(o["kind"] == "Secret" for o in result.objects):
        result.warnings.append("tailscale: TS_OAUTH_CLIENT_ID/SECRET are not set, so the operator has no "
                               "credentials and the Connector will not join")
    return result


def late_token(run: Run, obj: dict[str, Any]) -> dict[str, Any]:
    """At apply time, a Secret planned before its tunnel existed gets the tunnel's token."""
    if obj.get("kind") != "Secret" or obj["metadata"].get("name") != "cloudflared-token":
        return obj
    token = run.memo.get("tunnel_token")
    if not token:
        raise ConfigError("the tunnel's token is not known yet")
    return {**obj, "data": {"token": manifests._b64(token)}}


class AccessLayer:
    name = LAYER

    def __init__(self) -> None:
        self.manifests = kubernetes.ManifestLayer(LAYER, manifests.LAYERS[LAYER], render, late=late_token)

    # ---------------------------------------------------------------------------------- up

    def plan_up(self, run: Run) -> LayerPlan:
        inv = run.inv
        cf, account = cloudflare(run), account_id(run)
        check = cf.require(inv.domains.public.name, account)  # before any change, every missing one named
        ts = tailscale(run)
        ts.require(*TS_SCOPES)
        plan = LayerPlan(LAYER)
        if check.unverified:
            plan.facts.append("Cloudflare token: " + ", ".join(check.unverified) + " cannot be proved by a read")
        zone = check.zone
        assert zone is not None
        self._plan_tunnel(run, plan, cf, account, str(zone["id"]))
        self._plan_records(run, plan, cf, str(zone["id"]))
        k8s = self.manifests.plan_up(run)
        plan.warnings += k8s.warnings
        for change in k8s.changes:
            plan.add(change)
        self._plan_tailnet(run, plan, ts)
        plan.finish = k8s.finish
        return plan

    def _plan_tunnel(self, run: Run, plan: LayerPlan, cf: cflib.Cloudflare, account: str, zone_id: str) -> None:
        name = run.inv.access.cloudflare.tunnel
        tunnel = cf.find_tunnel(account, name)
        want = desired_ingress(run)
        if tunnel is None:
            def create() -> None:
                made = cf.create_tunnel(account, name)
                run.memo["tunnel_id"] = str(made["id"])
                run.memo["tunnel_token"] = cf.tunnel_token(account, str(made["id"]))

            plan.add(Change(LAYER, "tunnel", name, "create", "remotely-managed Cloudflare Tunnel", apply=create))
            plan.add(Change(LAYER, "tunnel-config", name, "create", f"{len(want['ingress']) - 1} public rule(s) "
                            "and a catch-all 404",
                            tuple(FieldDiff(f"ingress[{i}]", None, _rule(r)) for i, r in enumerate(want["ingress"])),
                            apply=lambda: cf.put_tunnel_configuration(account, run.memo["tunnel_id"], want)))
            return
        tunnel_id = str(tunnel["id"])
        run.memo["tunnel_id"] = tunnel_id
        run.memo["tunnel_token"] = cf.tunnel_token(account, tunnel_id)
        plan.add(Change(LAYER, "tunnel", name, "noop", f"exists ({tunnel_id[:8]}...)"))
        have = (cf.tunnel_configuration(account, tunnel_id).get("config") or {}).get("ingress") or []
        have_rules = [_rule(r) for r in have]
        want_rules = [_rule(r) for r in want["ingress"]]
        if have_rules == want_rules:
            plan.add(Change(LAYER, "tunnel-config", name, "noop", f"{len(want_rules) - 1} public rule(s)"))
        else:
            diffs = tuple(FieldDiff(f"ingress[{i}]", have_rules[i] if i < len(have_rules) else None,
                                    want_rules[i] if i < len(want_rules) else None)
                          for i in range(max(len(have_rules), len(want_rules)))
                          if (have_rules[i] if i < len(have_rules) else None)
                          != (want_rules[i] if i < len(want_rules) else None))
            plan.add(Change(LAYER, "tunnel-config", name, "update", "ingress rules differ", diffs,
                            apply=lambda: cf.put_tunnel_configuration(account, tunnel_id, want)))

    def _plan_records(self, run: Run, plan: LayerPlan, cf: cflib.Cloudflare, zone_id: str) -> None:
        records = list(cf.dns_records(zone_id))
        by_name: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            by_name.setdefault(str(record.get("name")), []).append(record)
        wanted = public_hosts(run)
        for host in wanted:
            present = by_name.get(host, [])
            theirs = [r for r in present if not cflib.owned(r)]
            if theirs:
                raise Conflict(f"Cloudflare already has a {theirs[0].get('type')} record for {host} that homelab "
                               "did not make (no 'managed-by: homelab' comment); it is left alone",
                               hint=f"remove or rename it in the dashboard if {host} should go through the tunnel")
            ours = present[0] if present else None

            def desired(host: str = host) -> dict[str, Any]:
                return cflib.tunnel_cname(host, str(run.memo["tunnel_id"]))

            if ours is None:
                plan.add(Change(LAYER, "dns", host, "create", "proxied CNAME to the tunnel",
                                (FieldDiff("content", None, "<tunnel>.cfargotunnel.com"),),
                                apply=functools.partial(_create_record, cf, zone_id, desired)))
                continue
            want = desired() if "tunnel_id" in run.memo else None
            fields = {k: ours.get(k) for k in ("type", "content", "proxied")}
            if want is not None and fields == {k: want[k] for k in fields}:
                plan.add(Change(LAYER, "dns", host, "noop", "proxied CNAME to the tunnel"))
                continue
            diffs = tuple(FieldDiff(k, fields[k], (want or {}).get(k, "(the new tunnel)"))
                          for k in fields if want is None or fields[k] != want[k])
            record_id = str(ours["id"])
            plan.add(Change(LAYER, "dns", host, "update", "record differs", diffs,
                            apply=functools.partial(_patch_record, cf, zone_id, record_id, desired)))
        for record in records:
            if cflib.owned(record) and str(record.get("name")) not in wanted:
                record_id = str(record["id"])
                plan.add(Change(LAYER, "dns", str(record.get("name")), "delete", "no longer a public app (prune)",
                                apply=functools.partial(cf.delete_dns_record, zone_id, record_id)))

    def _plan_tailnet(self, run: Run, plan: LayerPlan, ts: tslib.Tailscale) -> None:
        inv = run.inv
        domain, server = inv.domains.internal.name, str(inv.network.internal_dns)
        split = ts.get_split_dns()
        if split.get(domain) == [server]:
            plan.add(Change(LAYER, "split-dns", domain, "noop", f"-> {server}"))
        else:
            plan.add(Change(LAYER, "split-dns", domain, "update" if domain in split else "create",
                            f"tailnet resolves {domain} at {server}",
                            (FieldDiff("nameservers", split.get(domain), [server]),),
                            apply=lambda: ts.set_split_dns(domain, [server])))
        routes = [f"{inv.network.traefik}/32", f"{inv.network.internal_dns}/32"]
        hostname = inv.access.tailscale.connector
        devices = _routers(ts, hostname, routes)
        approved = bool(devices) and all(r in d.routes.enabled for d in devices for r in routes)
        if approved:
            plan.add(Change(LAYER, "routes", hostname, "noop", "subnet routes approved: " + ", ".join(routes)))
            return
        plan.add(Change(LAYER, "routes", hostname, "update" if devices else "create",
                        "approve the subnet router's routes" + ("" if devices else " once it joins the tailnet"),
                        (FieldDiff("enabledRoutes", [list(d.routes.enabled) for d in devices] or None, routes),),
                        apply=self._approver(run, ts, hostname, routes)))

    def _approver(self, run: Run, ts: tslib.Tailscale, hostname: str, routes: list[str]) -> Callable[[], None]:
        def approve() -> None:
            def joined() -> tuple[list[tslib.Device] | None, str]:
                found = _routers(ts, hostname, routes)
                return (found or None), f"waiting for {hostname} to join the tailnet and advertise its routes"

            for device in poll(f"the subnet router {hostname}", joined, timeout=run.timeouts.k3s,
                               progress=run.progress, first=0.5, maximum=3.0):
                ts.set_routes(device.id, sorted(set(device.routes.enabled) | set(routes)))

        return approve

    # -------------------------------------------------------------------------------- down

    def plan_down(self, run: Run) -> LayerPlan:
        inv = run.inv
        cf, ts = cloudflare(run), tailscale(run)
        account = account_id(run)
        plan = LayerPlan(LAYER)
        k8s = self.manifests.plan_down(run)
        for change in k8s.changes:
            plan.add(change)
        zone = cf.find_zone(inv.domains.public.name, account)
        if zone is not None:
            for record in cf.dns_records(str(zone["id"])):
                if cflib.owned(record):
                    record_id = str(record["id"])
                    plan.add(Change(LAYER, "dns", str(record.get("name")), "delete", "our record",
                                    apply=functools.partial(cf.delete_dns_record, str(zone["id"]), record_id)))
        tunnel = cf.find_tunnel(account, inv.access.cloudflare.tunnel)
        if tunnel is not None:
            tunnel_id = str(tunnel["id"])

            def delete() -> None:
                cf.clean_tunnel_connections(account, tunnel_id)
                cf.delete_tunnel(account, tunnel_id)

            plan.add(Change(LAYER, "tunnel", inv.access.cloudflare.tunnel, "delete",
                            "its connections cleaned first", apply=delete))
        else:
            plan.add(Change(LAYER, "tunnel", inv.access.cloudflare.tunnel, "noop", "absent"))
        domain, server = inv.domains.internal.name, str(inv.network.internal_dns)
        if ts.get_split_dns().get(domain) == [server]:
            plan.add(Change(LAYER, "split-dns", domain, "delete", "our entry",
                            apply=lambda: ts.remove_split_dns(domain)))
        for device in ts.devices_named(inv.access.tailscale.connector):
            plan.add(Change(LAYER, "device", device.hostname, "delete", "the subnet router left behind",
                            apply=functools.partial(_delete_device, ts, device.id)))
        return plan


def _routers(ts: tslib.Tailscale, hostname: str, routes: list[str]) -> list[tslib.Device]:
    """The subnet router's devices: named so and advertising the routes (one predicate for plan and apply);
    connected ones first, when the tailnet says which are."""
    found = [d for d in ts.devices_named(hostname) if all(r in d.routes.advertised for r in routes)]
    connected = [d for d in found if d.connected]
    return connected or found


def _create_record(cf: cflib.Cloudflare, zone_id: str, desired: Callable[[], dict[str, Any]]) -> None:
    cf.create_dns_record(zone_id, desired())


def _patch_record(cf: cflib.Cloudflare, zone_id: str, record_id: str, desired: Callable[[], dict[str, Any]]) -> None:
    want = desired()
    cf.patch_dns_record(zone_id, record_id, {k: want[k] for k in ("type", "content", "proxied", "comment")})


def _delete_device(ts: tslib.Tailscale, device_id: str) -> None:
    try:
        ts.delete_device(device_id)
    except tslib.TailscaleNotFound:  # the operator removed it when its Connector went
        return


def _rule(rule: dict[str, Any]) -> dict[str, Any]:
    """The fields of an ingress rule we set (Cloudflare adds defaults to what it returns)."""
    out = {k: rule[k] for k in ("hostname", "path", "service") if rule.get(k)}
    server = (rule.get("originRequest") or {}).get("originServerName")
    if server:
        out["originServerName"] = server
    return out

"""The access paths through their providers' APIs (reads only): the Cloudflare Tunnel routes each public name,
Tailscale's split DNS sends the internal domain to the internal DNS, and the subnet router's routes are approved."""

from __future__ import annotations

from typing import Any

import pytest

from homelab import inventory, live
from homelab.clients import cloudflare as cflib
from homelab.layers import access

from .conftest import Live, fail_unless

pytestmark = pytest.mark.access


def _rule(rule: dict[str, Any]) -> str:
    server = (rule.get("originRequest") or {}).get("originServerName")
    text = f"{rule.get('hostname') or '*'}{rule.get('path') or ''} -> {rule.get('service')}"
    return text + (f" (origin name {server})" if server else "")


def test_tunnel_routes_public_names(homelab: Live, inv: inventory.Inventory, measured: Any) -> None:
    cf = homelab.cloudflare
    account = str(homelab.target.secret("CLOUDFLARE_ACCOUNT_ID"))
    name = inv.access.cloudflare.tunnel
    where = "`invoke access.plan` and Zero Trust > Networks > Tunnels in Cloudflare's dashboard"
    tunnel = cf.find_tunnel(account, name)
    fail_unless(tunnel is not None, f"Cloudflare has no tunnel {name} in the account, expected one routing "
                                    f"{live.listing(access.public_hosts(homelab.run))}; see {where}")
    assert tunnel is not None
    tunnel_id = str(tunnel["id"])
    connectors = cf.tunnel_connections(account, tunnel_id)
    conns = sum(len(c.get("conns") or []) for c in connectors)
    have = [_rule(r) for r in (cf.tunnel_configuration(account, tunnel_id).get("config") or {}).get("ingress") or []]
    want = [_rule(r) for r in access.desired_ingress(homelab.run)["ingress"]]
    zone = cf.find_zone(inv.domains.public.name, account)
    records = cf.dns_records(str(zone["id"])) if zone else []
    measured(f"{tunnel.get('status')}, {len(connectors)} connector(s) with {conns} connection(s), {len(have)} rule(s)")
    problems = []
    if tunnel.get("status") != "healthy":
        problems.append(f"its status is {tunnel.get('status')}, expected healthy")
    if not conns:
        problems.append("it has no connection from cloudflared, expected at least one (is the cloudflared "
                        "Deployment running? manifests/cloudflared)")
    if have != want:
        problems.append(f"its ingress rules are [{'; '.join(have) or 'none'}], expected [{'; '.join(want)}] "
                        "(one per public name, then the catch-all 404)")
    if zone is None:
        problems.append(f"the zone {inv.domains.public.name} is not visible to the token")
    for host in access.public_hosts(homelab.run):
        found = [r for r in records if r.get("name") == host]
        target = cflib.tunnel_target(tunnel_id)
        if not any(r.get("type") == "CNAME" and r.get("content") == target and r.get("proxied") for r in found):
            seen = live.listing(f"{r.get('type')} {r.get('content')} proxied={r.get('proxied')}" for r in found)
            problems.append(f"{host}'s DNS record is {seen or 'missing'}, expected a proxied CNAME to {target}")
    fail_unless(not problems, f"Cloudflare tunnel {name} ({tunnel_id[:8]}...): " + "; ".join(problems)
                + f"; see {where}")


def test_split_dns_points_at_internal_dns(homelab: Live, inv: inventory.Inventory, measured: Any) -> None:
    split = homelab.tailscale.get_split_dns()
    domain, server = inv.domains.internal.name, str(inv.network.internal_dns)
    measured(live.listing(f"{d} -> {live.listing(s)}" for d, s in sorted(split.items())) or "none")
    fail_unless(split.get(domain) == [server],
                live.mismatch(f"the tailnet's split DNS for {domain}", split.get(domain), [server],
                              "`invoke access.plan` and DNS > Nameservers in Tailscale's admin console",
                              source="the inventory (network.internal_dns) says"))


def test_subnet_routes_approved(homelab: Live, inv: inventory.Inventory, measured: Any) -> None:
    hostname = inv.access.tailscale.connector
    routes = [f"{inv.network.traefik}/32", f"{inv.network.internal_dns}/32"]
    devices = homelab.tailscale.devices_named(hostname)
    measured(live.listing(f"{d.name or d.hostname}: enabled {live.listing(d.routes.enabled) or 'none'}, "
                          f"{'online' if d.connected else 'offline' if d.connected is False else 'online ?'}"
                          for d in devices) or "no device")
    where = "the Connector in manifests/tailscale, `invoke access.plan` and Machines in Tailscale's admin console"
    fail_unless(bool(devices), f"the tailnet has no device {hostname}, expected the subnet router advertising "
                               f"{live.listing(routes)}; see {where}")
    approved = [d for d in devices if all(r in d.routes.enabled for r in routes)]
    fail_unless(bool(approved), f"{hostname}'s approved routes are "
                                f"{live.listing(r for d in devices for r in d.routes.enabled) or 'none'} (advertised: "
                                f"{live.listing(r for d in devices for r in d.routes.advertised) or 'none'}), "
                                f"expected {live.listing(routes)}; see {where}")
    fail_unless(any(d.connected is not False for d in approved),
                f"{hostname} has its routes approved but is offline (last seen "
                f"{live.listing(d.last_seen for d in approved)}), expected online; see the tailscale operator's "
                "pods (namespace tailscale)")

"""The whole seed homelab on the lab: access (Cloudflare Tunnel and DNS, Tailscale), monitoring and apps.

Every check looks from inside the lab's namespace, as a user would: public names through the public
resolver and the Cloudflare edge, internal names through a tailnet client's resolver and Traefik.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from typing import Any

import pytest

from homelab.lab import layout

from .conftest import INV, Lab, Result, invoke
from .test_3_k3s import in_lab

REACH = """
import base64, http.client, json, socket, ssl, time, urllib.request
import dns.resolver
from kubernetes import client, config
config.load_kube_config(context="homelab")
api = client.ApiClient()
lab_ca = open("/run/homelab-lab/pki/ca.pem").read()
# The ACME issuers' roots of the lab's cert-manager double: what Traefik's certificates chain to.
cfg = api.configuration
roots = json.loads(urllib.request.urlopen(cfg.host + "/standin/acme-roots",
                   context=ssl.create_default_context(cafile=cfg.ssl_ca_cert)).read())

def resolve(name, server):
    r = dns.resolver.Resolver(configure=False)
    r.nameservers, r.lifetime = [server], 5
    try:
        return sorted(a.to_text() for a in r.resolve(name, "A"))
    except dns.resolver.NXDOMAIN:
        return "NXDOMAIN"
    except Exception as exc:
        return type(exc).__name__

def get(name, ip, path, cadata):
    ctx = ssl.create_default_context(cadata=cadata)  # verifies the chain and the name
    try:
        sock = ctx.wrap_socket(socket.create_connection((ip, 443), timeout=10), server_hostname=name)
        conn = http.client.HTTPSConnection(name, 443, context=ctx, timeout=10)
        conn.sock = sock
        conn.request("GET", path, headers={"Host": name})
        resp = conn.getresponse()
        return {"status": resp.status, "body": resp.read(200).decode(errors="replace")}
    except (OSError, ssl.SSLError) as exc:
        return {"error": str(exc)[:200]}

CHECKS = json.loads(%(checks)r)
out = {}
for name, path, kind in CHECKS:
    public, tailnet = resolve(name, %(public)r), resolve(name, %(tailnet)r)
    entry = {"public": public, "tailnet": tailnet}
    if kind == "public" and isinstance(public, list):
        entry["https"] = get(name, public[0], path, lab_ca)
    if kind == "internal" and isinstance(tailnet, list):
        entry["https"] = get(name, tailnet[0], path, "".join(roots.values()))
        entry["via_edge"] = get(name, %(edge)r, path, lab_ca)
    out[name] = entry
print(json.dumps(out))
"""
HEALTH = {"vaultwarden": "/alive", "homepage": "/", "grafana": "/api/health", "argocd": "/healthz",
          "vault": "/v1/sys/health"}
EDGE = "203.0.113.20"


def reach() -> dict[str, Any]:
    checks = [(str(a.hostname), HEALTH[a.name], a.access) for a in INV.apps if a.hostname]
    lab = INV.targets.lab
    code = REACH % {"checks": json.dumps(checks), "public": str(lab.public_resolver),
                    "tailnet": str(lab.tailnet_resolver), "edge": EDGE}
    result: dict[str, Any] = in_lab(code)
    return result


@pytest.fixture(scope="module")
def homelab(built: Lab) -> Iterator[Result]:
    result = invoke("up", timeout=900)
    assert result.code == 0, result.text
    built.timings["whole pipeline cold (after network down)"] = result.seconds
    yield result


def test_every_layer_converges_and_a_second_run_changes_nothing(built: Lab, homelab: Result) -> None:
    again = invoke("up")
    assert again.code == 0, again.text
    built.timings["whole pipeline no-op"] = again.seconds
    plan = invoke("plan", "--json")
    assert plan.code == 0, plan.text
    changes = json.loads(plan.out)
    assert [c for c in changes if c["action"] != "noop"] == []
    layers = {c["layer"] for c in changes}
    assert layers >= {"access", "monitoring", "apps"}
    kinds = {(c["layer"], c["kind"]) for c in changes}
    assert {("access", "tunnel"), ("access", "dns"), ("access", "split-dns"), ("access", "routes")} <= kinds


def test_public_apps_through_the_tunnel_and_internal_apps_through_tailscale(homelab: Result) -> None:
    found = reach()
    for app in INV.apps:
        if not app.hostname:
            continue
        entry = found[app.hostname]
        if app.access == "public":
            assert entry["public"] == [EDGE], entry  # a proxied record: Cloudflare's edge answers
            assert entry["https"]["status"] == 200, entry  # through the tunnel, cloudflared, Traefik, the app
        else:
            assert entry["public"] == "NXDOMAIN", entry  # no internal name in the public view
            assert entry["tailnet"] == [str(INV.network.traefik)], entry  # split DNS -> k8s_gateway -> Traefik
            assert entry["https"]["status"] == 200, entry  # Vault too: the apps layer initialised and unsealed it
            assert "status" not in entry["via_edge"] or entry["via_edge"]["status"] != 200, entry  # refused publicly
    assert '"database": "ok"' in found["grafana.int.jigga.xyz"]["https"]["body"]
    assert found["argocd.int.jigga.xyz"]["https"]["body"] == "ok"


def test_vaults_keys_are_kept_private_and_never_printed(homelab: Result) -> None:
    keys = layout.STATE / "operator" / "vault-init.json"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    stored = json.loads(keys.read_text(encoding="utf-8"))
    assert len(stored["keys_base64"]) == 5 and stored["root_token"]
    for secret in [*stored["keys_base64"], stored["root_token"]]:
        assert secret not in homelab.text


def test_down_removes_the_access_layer_including_cloudflare(homelab: Result) -> None:
    down = invoke("down", "--from", "access", "--yes")
    assert down.code == 0, down.text
    found = reach()
    for app in INV.apps:
        if app.hostname and app.access == "public":
            # our records are gone (the apex still exists as the zone, without an A record)
            assert found[app.hostname]["public"] in ("NXDOMAIN", "NoAnswer"), found[app.hostname]
    plan = invoke("plan", "--only", "access", "--json")
    assert plan.code == 0, plan.text
    kinds = {(c["kind"], c["action"]) for c in json.loads(plan.out)}
    assert ("tunnel", "create") in kinds and ("dns", "create") in kinds  # the tunnel went too
    again = invoke("down", "--from", "access", "--yes")
    assert again.code == 0 and "changed=0" in again.out, again.text

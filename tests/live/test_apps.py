"""The apps as their users reach them, each through its own access path, and their workloads.

- public apps: the public resolver -> Cloudflare's edge (TLS checked against the outside CA) -> the tunnel
  -> cloudflared -> Traefik -> the app's health endpoint, 200 expected;
- internal apps: the tailnet's resolver -> Traefik (TLS checked against the cluster's issuer) -> the app;
  and the public edge must not serve them;
- every app with a Deployment/StatefulSet the manifests declare or a chart makes: Available.

Each check carries the marker of its app's group (monitoring, else apps).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from homelab import inventory, live

from .conftest import Live, fail_unless

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")


def _health_path(app: inventory.App) -> str:
    path = live.HEALTH.get(app.name)
    fail_unless(path is not None, f"no health endpoint is known for app {app.name}; add it to homelab.live.HEALTH")
    return str(path)


def test_app_health(homelab: Live, exposed_app: inventory.App, measured: Any) -> None:
    app, host = exposed_app, str(exposed_app.hostname)
    path = _health_path(app)
    public = app.access == "public"
    view = "public" if public else "tailnet"
    route = ("the public resolver -> Cloudflare's edge -> the tunnel -> cloudflared -> Traefik" if public
             else "the tailnet's resolver -> Traefik")
    answer = homelab.resolve(host, view)
    if not answer.addresses:
        measured(f"{host}: {answer}")
        pytest.fail(f"{host} does not resolve in the {view} view ({answer.server}: {answer}), so {app.name} cannot be "
                    "reached through its access path; see the dns checks for this name", pytrace=False)
    address = answer.addresses[0]
    homelab.run.guard(address)
    ctx = homelab.outside_context() if public else homelab.ingress_context()
    down = homelab.unreachable(address)
    reply = live.Reply(address, host, error=down) if down else live.https_get(address, host, path, ctx)
    measured(f"{reply} from {address}")
    where = (f"the {app.name} workloads (`kubectl -n {app.namespace} get deploy,sts,pods`), its Ingress "
             f"(manifests/{app.name}) and Traefik" + (", the tunnel's rules and cloudflared" if public else ""))
    fail_unless(reply.status == 200, f"GET https://{host}{path} through {route} ({address}) answered {reply}, "
                                     f"expected HTTP 200; see {where}")
    if app.name == "vault":  # a 200 from anything but Vault (a default backend, a wrong Service) is no pass
        try:
            health = json.loads(reply.body)
        except (ValueError, TypeError):
            health = None
        fail_unless(isinstance(health, dict) and health.get("initialized") is True and health.get("sealed") is False,
                    f"{host}{path} answered 200 but not with Vault's health body (initialized: true, sealed: "
                    f"false): {str(reply.body)[:120]!r}; see its Ingress (manifests/vault) and Service")
    if app.name == "grafana":
        try:
            database = json.loads(reply.body).get("database")
        except (ValueError, AttributeError):
            database = None
        fail_unless(database == "ok", f"Grafana's /api/health says database {database!r}, expected 'ok'; see "
                                      "Grafana's logs (namespace monitoring)")


def _edge(homelab: Live, inv: inventory.Inventory, target_name: str) -> str:
    """An address of the public edge: the lab's edge double, or where the public resolver sends a public app."""
    if target_name == "lab":
        from homelab.lab.control import EDGE_ADDRESS

        return EDGE_ADDRESS
    for app in inv.apps:
        if app.access == "public" and app.hostname:
            answer = homelab.resolve(str(app.hostname), "public")
            if answer.addresses:
                return answer.addresses[0]
    pytest.fail("no public app resolves at the public resolver, so the edge cannot be asked; see the dns checks",
                pytrace=False)


def test_internal_app_refused_publicly(homelab: Live, inv: inventory.Inventory, target_name: str,
                                       internal_app: inventory.App, measured: Any) -> None:
    host = str(internal_app.hostname)
    path = _health_path(internal_app)
    edge = _edge(homelab, inv, target_name)
    down = homelab.unreachable(edge)
    reply = live.Reply(edge, host, error=down) if down else live.https_get(edge, host, path, homelab.outside_context())
    if reply.status is None and (reply.error or "").startswith("TLS"):
        # The edge's certificate does not cover the name: would it route the request all the same?
        routed = live.https_get(edge, host, path, live.unverified())
        if routed.status is not None and routed.status < 400:
            reply = routed
    measured(f"{reply} from the edge {edge}")
    fail_unless(reply.status is None or reply.status >= 400,
                f"the public edge ({edge}) answers {reply} for https://{host}{path}: internal app {internal_app.name} "
                "is reachable from the public side, expected a refusal; see the tunnel's ingress rules and Cloudflare "
                f"DNS for {host} (`invoke access.plan`)")


def test_workload_ready(homelab: Live, workload_app: tuple[inventory.App, str | None, str, list[tuple[str, str]]],
                        measured: Any) -> None:
    app, release, namespace, declared = workload_app
    workloads = [w for kind in WORKLOAD_KINDS for w in homelab.items("apps/v1", kind)]
    chosen, missing = live.app_workloads(app.name, namespace, release, declared, workloads)
    states = [live.workload_state(w) for w in chosen]
    measured(live.listing(text for _, text in states) or "none")
    source = f"HelmChart {release}" if release else "the manifests"
    where = f"`kubectl -n {namespace} get deploy,sts,ds,pods` and {source}"
    fail_unless(not missing, f"{app.name}: {live.listing(missing)} does not exist, the manifests declare it; see "
                             f"{where}")
    fail_unless(bool(chosen), f"{app.name}: no Deployment, StatefulSet or DaemonSet of {source} in {namespace}, "
                              f"expected at least one Available; see {where}")
    waiting = [text for ok, text in states if not ok]
    fail_unless(not waiting, f"{app.name}: {live.listing(waiting)}, expected every replica available; see {where}")

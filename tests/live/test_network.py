"""MetalLB's pool and the LoadBalancer addresses the inventory fixes: Traefik's and the internal DNS's."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

import pytest

from homelab import inventory, live

from .conftest import Live, fail_unless

pytestmark = pytest.mark.network


def test_metallb_pool_matches_inventory(homelab: Live, inv: inventory.Inventory, measured: Any) -> None:
    declared = next(o for o in homelab.rendered if o["kind"] == "IPAddressPool")
    pools = homelab.items(declared["apiVersion"], "IPAddressPool")
    name, namespace = declared["metadata"]["name"], declared["metadata"]["namespace"]
    pool = next((p for p in pools if p["metadata"]["name"] == name and p["metadata"].get("namespace") == namespace),
                None)
    measured("; ".join(f"{p['metadata']['name']}: {live.listing((p.get('spec') or {}).get('addresses') or [])}"
                       for p in pools) or "no pool")
    fail_unless(pool is not None, f"MetalLB has no IPAddressPool {namespace}/{name} (pools: "
                                  f"{live.listing(p['metadata']['name'] for p in pools) or 'none'}), expected "
                                  f"{live.listing(inv.network.metallb_pool)}; see manifests/metallb")
    assert pool is not None
    spec = pool.get("spec") or {}
    fail_unless(list(spec.get("addresses") or []) == list(inv.network.metallb_pool),
                live.mismatch(f"MetalLB pool {name}", spec.get("addresses"), inv.network.metallb_pool,
                              "manifests/metallb (network.metallb_pool)"))
    fail_unless(spec.get("autoAssign") is False,
                f"MetalLB pool {name} has autoAssign {spec.get('autoAssign')}, the manifests say false (only Services "
                "that ask get an address, so nothing can take Traefik's); see manifests/metallb")
    others = [f"{p['metadata']['name']} ({live.listing((p.get('spec') or {}).get('addresses') or [])})"
              for p in pools if p is not pool]
    fail_unless(not others, f"MetalLB has pools the inventory does not declare: {live.listing(others)}; expected only "
                            f"{name}; see `kubectl get ipaddresspools -A`")


def _loadbalancer(homelab: Live, release: str, what: str, want: IPv4Address, measured: Any) -> None:
    chart = next(o for o in homelab.rendered if o["kind"] == "HelmChart" and o["metadata"]["name"] == release)
    namespace = chart["spec"].get("targetNamespace", chart["metadata"]["namespace"])
    component = chart["metadata"]["labels"]["homelab.jigga.xyz/component"]
    service = homelab.get(f"/api/v1/namespaces/{namespace}/services/{release}")
    fail_unless(service is not None, f"{what}: the Service {namespace}/{release} does not exist, expected a "
                                     f"LoadBalancer at {want}; see manifests/{component}")
    kind = (service.get("spec") or {}).get("type")
    ips = [i.get("ip") for i in ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []]
    measured(f"{kind} {live.listing(ips) or 'pending'}")
    fail_unless(kind == "LoadBalancer", live.mismatch(f"{what}'s Service type", kind, "LoadBalancer",
                                                      f"manifests/{component}", source="the manifests say"))
    fail_unless(ips == [str(want)], live.mismatch(f"{what} LoadBalancer", ips or "pending (no address)", want,
                                                  f"manifests/{component} and `kubectl -n {namespace} describe "
                                                  f"service {release}` (MetalLB's events)"))


def test_traefik_loadbalancer_address(homelab: Live, inv: inventory.Inventory, measured: Any) -> None:
    _loadbalancer(homelab, "traefik", "Traefik", inv.network.traefik, measured)


def test_internal_dns_loadbalancer_address(homelab: Live, inv: inventory.Inventory, measured: Any) -> None:
    _loadbalancer(homelab, "k8s-gateway", "the internal DNS (k8s_gateway)", inv.network.internal_dns, measured)

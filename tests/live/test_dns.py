"""DNS as users see it: public names through the public resolver to Cloudflare's edge; internal names through a
tailnet client's resolver (split DNS -> k8s_gateway) to Traefik, and not at all in the public view."""

from __future__ import annotations

from typing import Any

import pytest

from homelab import inventory, live

from .conftest import Live, fail_unless

pytestmark = pytest.mark.dns


def test_public_name_resolves_to_edge(homelab: Live, target_name: str, public_app: inventory.App,
                                      measured: Any) -> None:
    host = str(public_app.hostname)
    answer = homelab.resolve(host, "public")
    networks = live.edge_networks(target_name)
    edge = "Cloudflare's edge" + (f" ({live.listing(networks)})" if target_name == "lab" else "")
    measured(answer)
    fail_unless(bool(answer.addresses), f"{host} does not resolve at the public resolver {answer.server} "
                                        f"({answer}), expected {edge}; see its proxied CNAME to the tunnel in "
                                        "Cloudflare DNS (`invoke access.plan`)")
    elsewhere = live.outside_edge(answer.addresses, networks)
    fail_unless(not elsewhere, f"{host} resolves to {live.listing(elsewhere)} at the public resolver {answer.server}, "
                               f"expected {edge} (a proxied record); see the record for {host} in Cloudflare DNS "
                               "(`invoke access.plan`)")


def test_internal_name_resolves_in_tailnet(homelab: Live, inv: inventory.Inventory, internal_app: inventory.App,
                                           measured: Any) -> None:
    host = str(internal_app.hostname)
    answer = homelab.resolve(host, "tailnet")
    measured(answer)
    fail_unless(list(answer.addresses) == [str(inv.network.traefik)],
                live.mismatch(f"{host} in the tailnet's view ({answer.server})", answer, inv.network.traefik,
                              f"split DNS for {inv.domains.internal.name} -> {inv.network.internal_dns} (Tailscale), "
                              "k8s_gateway (manifests/k8s-gateway) and the app's Ingress"))


def test_internal_name_not_public(homelab: Live, internal_app: inventory.App, measured: Any) -> None:
    host = str(internal_app.hostname)
    answer = homelab.resolve(host, "public")
    measured(answer)
    fail_unless(answer.absent, f"the public resolver {answer.server} answers {answer} for {host}, expected no such "
                               "name (NXDOMAIN): internal names stay off public DNS; see Cloudflare DNS for a record "
                               f"of {host} and the tunnel's ingress rules")

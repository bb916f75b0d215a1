"""TLS for every app name: the certificate the cluster serves for it (Traefik, by SNI) chains to the expected
issuer (Let's Encrypt production on the live target), its names cover the app's, and it has >= 14 days left.

Public names are served to the world by Cloudflare's edge with Cloudflare's certificate; the one checked here
is the cluster's own, which cloudflared verifies behind the edge (test_app_health checks the edge's)."""

from __future__ import annotations

from typing import Any

import pytest

from homelab import inventory, live

from .conftest import Live, fail_unless

pytestmark = pytest.mark.tls


def _certificate_for(homelab: Live, hostname: str) -> str:
    """kube-system/<name> of the Certificate whose names cover hostname (for the hint)."""
    for obj in homelab.rendered:
        if obj["kind"] == "Certificate" and any(live.name_matches(n, hostname) for n in obj["spec"]["dnsNames"]):
            return f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
    return "(none declared)"


def test_certificate(homelab: Live, inv: inventory.Inventory, target_name: str, hostname_app: inventory.App,
                     measured: Any) -> None:
    host, address = str(hostname_app.hostname), str(inv.network.traefik)
    homelab.run.guard(address)
    issuer = inv.network.cert_issuer
    expected = live.expected_issuer(target_name, issuer)
    where = (f"Certificate {_certificate_for(homelab, host)} (manifests/cert-manager; `kubectl describe certificate "
             f"-n kube-system`) and the TLSStore in manifests/traefik")
    der = homelab.unreachable(address) or live.presented(address, host)
    if isinstance(der, str):
        measured("no certificate")
        pytest.fail(f"Traefik ({address}) presents no certificate for {host}: {der}; expected one from {expected}; "
                    "see manifests/traefik", pytrace=False)
    cert = live.parse_certificate(der)
    days = cert.days_left()
    measured(f"{cert.issuer_cn or cert.issuer}; {days} days left; {live.listing(cert.names) or 'no names'}")
    problems = []
    if not cert.covers(host):
        problems.append(f"its names ({live.listing(cert.names) or 'none'}) do not cover {host}")
    wrong_issuer = live.issuer_problem(cert, target_name, issuer)
    if wrong_issuer:
        problems.append(wrong_issuer)
    if days < live.MIN_DAYS_LEFT:
        problems.append(f"it has {days} days left (not after {cert.not_after:%Y-%m-%d %H:%M} UTC), expected at least "
                        f"{live.MIN_DAYS_LEFT}")
    refused = live.verify(address, host, homelab.ingress_context())
    if refused:
        problems.append(f"its chain does not verify against {expected} ({refused})")
    fail_unless(not problems, f"the certificate Traefik ({address}) serves for {host}: " + "; ".join(problems)
                + f"; expected one from {expected} covering {host} with at least {live.MIN_DAYS_LEFT} days left; "
                f"see {where}")

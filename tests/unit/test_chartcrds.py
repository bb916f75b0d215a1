"""The CRDs the lab's chart doubles install, built from the shared CRDs catalog."""

from __future__ import annotations

import pytest

from homelab.lab import chartcrds


def test_each_chart_brings_its_groups_crds() -> None:
    names = {chart: sorted(c["metadata"]["name"] for c in chartcrds.crds_for(chart)) for chart in chartcrds.CHARTS}
    assert names["metallb"] == ["ipaddresspools.metallb.io", "l2advertisements.metallb.io"]
    assert "certificates.cert-manager.io" in names["cert-manager"]
    assert "tlsstores.traefik.io" in names["traefik"]
    assert chartcrds.crds_for("ceph-csi-rbd") == []  # a chart without CRDs


@pytest.mark.parametrize("chart", sorted(chartcrds.CHARTS))
def test_crds_are_structural_and_scoped(chart: str) -> None:
    for crd in chartcrds.crds_for(chart):
        spec = crd["spec"]
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
        assert sum(1 for v in spec["versions"] if v["storage"]) == 1
        assert "additionalProperties': False" not in str(spec["versions"])
    scopes = {c["spec"]["names"]["kind"]: c["spec"]["scope"] for c in chartcrds.crds_for("cert-manager")}
    assert scopes == {"Certificate": "Namespaced", "ClusterIssuer": "Cluster", "Issuer": "Namespaced"}

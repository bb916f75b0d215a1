"""The CRDs the lab's chart doubles bring, as the real charts do, built from ../shared/crd-schemas.

A real chart installs its CRDs (MetalLB's metallb.io, cert-manager's cert-manager.io, ...). The
stand-in's HelmChart controller does the same from `k3s_standin/charts/<chart>.json`, which the
release build writes from this chart index and the CRDs catalog's schemas.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

# chart name -> the API groups whose CRDs that chart ships.
CHARTS: dict[str, tuple[str, ...]] = {
    "metallb": ("metallb.io",),
    "traefik": ("traefik.io",),
    "cert-manager": ("cert-manager.io",),
    "kube-prometheus-stack": ("monitoring.coreos.com",),
    "argo-cd": ("argoproj.io",),
    "tailscale-operator": ("tailscale.com",),
}
# chart name -> the CSI drivers it registers (a CSIDriver object per provisioner).
CSI_DRIVERS: dict[str, tuple[str, ...]] = {
    "ceph-csi-rbd": ("rbd.csi.ceph.com",),
}
# chart name -> how its real chart behaves as an ingress controller (the stand-in's ingress double reads this
# from `charts/ingress.json`): the Service port names for HTTP and HTTPS, the values path that turns on the
# HTTP -> HTTPS redirect (with `permanent` beside it), and the CR holding the default certificate.
INGRESS_CONTROLLERS: dict[str, dict[str, Any]] = {
    "traefik": {
        "http_port_name": "web", "http_port": 80, "https_port_name": "websecure", "https_port": 443,
        "redirect_values": "ports.web.redirections.entryPoint.scheme",
        "tls_store": {"group": "traefik.io", "version": "v1alpha1", "plural": "tlsstores", "kind": "TLSStore",
                      "name": "default"},
        "ingress_class": "traefik",
        "default_cert_cn": "TRAEFIK DEFAULT CERT",
    },
}
# lowercase kind in the catalog's file names -> (Kind, plural, namespaced)
KINDS: dict[str, tuple[str, str, bool]] = {
    "ipaddresspool": ("IPAddressPool", "ipaddresspools", True),
    "l2advertisement": ("L2Advertisement", "l2advertisements", True),
    "certificate": ("Certificate", "certificates", True),
    "issuer": ("Issuer", "issuers", True),
    "clusterissuer": ("ClusterIssuer", "clusterissuers", False),
    "ingressroute": ("IngressRoute", "ingressroutes", True),
    "middleware": ("Middleware", "middlewares", True),
    "tlsoption": ("TLSOption", "tlsoptions", True),
    "tlsstore": ("TLSStore", "tlsstores", True),
    "servicemonitor": ("ServiceMonitor", "servicemonitors", True),
    "podmonitor": ("PodMonitor", "podmonitors", True),
    "prometheusrule": ("PrometheusRule", "prometheusrules", True),
    "connector": ("Connector", "connectors", False),
    "dnsconfig": ("DNSConfig", "dnsconfigs", False),
    "proxyclass": ("ProxyClass", "proxyclasses", False),
    "application": ("Application", "applications", True),
    "applicationset": ("ApplicationSet", "applicationsets", True),
    "appproject": ("AppProject", "appprojects", True),
}


def shared_dir() -> Path:
    return Path(os.environ.get("HOMELAB_SHARED") or REPO.parent / "shared")


def _structural(schema: Any) -> Any:
    """The catalog closes objects with additionalProperties: false, which a CRD schema may not say."""
    if isinstance(schema, dict):
        return {k: _structural(v) for k, v in schema.items()
                if not (k == "additionalProperties" and v is False)}
    if isinstance(schema, list):
        return [_structural(v) for v in schema]
    return schema


def crds_for(chart: str, schemas: Path | None = None) -> list[dict[str, Any]]:
    """The CustomResourceDefinitions the chart brings (empty for a chart with none, or no catalog)."""
    root = (schemas or shared_dir() / "crd-schemas")
    out = []
    for group in CHARTS.get(chart, ()):
        versions: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for path in sorted((root / group).glob("*_*.json")):
            lower, version = path.stem.rsplit("_", 1)
            if lower in KINDS:
                versions.setdefault(lower, []).append((version, json.loads(path.read_text(encoding="utf-8"))))
        for lower, found in sorted(versions.items()):
            kind, plural, namespaced = KINDS[lower]
            spec_versions = []
            for i, (version, schema) in enumerate(found):
                entry: dict[str, Any] = {"name": version, "served": True, "storage": i == len(found) - 1,
                                         "schema": {"openAPIV3Schema": _structural(schema)}}
                if "status" in schema.get("properties", {}):
                    entry["subresources"] = {"status": {}}
                spec_versions.append(entry)
            out.append({
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": f"{plural}.{group}",
                             "labels": {"app.kubernetes.io/managed-by": "Helm", "homelab.jigga.xyz/lab-chart": chart}},
                "spec": {"group": group, "scope": "Namespaced" if namespaced else "Cluster",
                         "names": {"kind": kind, "plural": plural, "singular": lower, "listKind": f"{kind}List"},
                         "versions": spec_versions},
            })
    return out


def csidrivers_for(chart: str) -> list[dict[str, Any]]:
    return [{"apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver",
             "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "Helm",
                                                   "homelab.jigga.xyz/lab-chart": chart}},
             "spec": {"attachRequired": True, "podInfoOnMount": False}} for name in CSI_DRIVERS.get(chart, ())]


def chart_files(schemas: Path | None = None) -> dict[str, bytes]:
    """`charts/<chart>.json` members for the stand-in's package: the cluster-scoped objects (CRDs, CSI
    drivers) each chart double installs, as its real chart does."""
    out = {f"charts/{chart}.json": json.dumps(crds_for(chart, schemas) + csidrivers_for(chart),
                                              sort_keys=True).encode()
           for chart in sorted(set(CHARTS) | set(CSI_DRIVERS))}
    out["charts/ingress.json"] = ingress_index()
    # The app doubles' index (k3s_standin/apps.py): the Services each chart makes, apps by image.
    out["charts/apps.json"] = json.dumps({"services": SERVICES, "images": IMAGES}, sort_keys=True).encode()
    return out


def ingress_index() -> bytes:
    """`charts/ingress.json`: {chart: ingress-controller traits} (see INGRESS_CONTROLLERS)."""
    return json.dumps(INGRESS_CONTROLLERS, sort_keys=True).encode()


# chart name -> the Services of the real chart that our manifests name (Ingress backends, Grafana's Loki
# datasource, Alloy's push URL), with the port and the health path each answers. Names follow each chart's
# own fullname helper: "{fullname}" is values.fullnameOverride, else the release name (the HelmChart's name)
# when it contains the chart name, else "<release>-<chart>" (our releases all contain theirs, or set the
# override). "{release}" is the release name: a subchart names its objects by its own helper, so Grafana's
# Service in kube-prometheus-stack is "<release>-grafana", whatever the parent's fullnameOverride says.
SERVICES: dict[str, list[dict[str, Any]]] = {
    "kube-prometheus-stack": [
        {"name": "{fullname}-prometheus", "port": 9090, "app": "prometheus", "health": "/-/healthy"},
        {"name": "{fullname}-alertmanager", "port": 9093, "app": "alertmanager", "health": "/-/healthy"},
        {"name": "{release}-grafana", "port": 80, "app": "grafana", "health": "/api/health"},
    ],
    "loki": [
        # SingleBinary mode without the gateway: the single binary's Service is the chart's fullname.
        {"name": "{fullname}", "port": 3100, "app": "loki", "health": "/ready"},
    ],
    "vault": [
        # 200 only when initialised and unsealed; 501 uninitialised, 503 sealed.
        {"name": "{fullname}", "port": 8200, "app": "vault", "health": "/v1/sys/health"},
    ],
    "argo-cd": [
        {"name": "{fullname}-server", "port": 80, "app": "argocd", "health": "/healthz"},
    ],
}
# image repository -> the app a plain Deployment of it serves (manifests/<app>/) and its health path, on the
# container port the Deployment declares.
IMAGES: dict[str, dict[str, Any]] = {
    "vaultwarden/server": {"app": "vaultwarden", "health": "/alive"},
    "ghcr.io/gethomepage/homepage": {"app": "homepage", "health": "/"},
}

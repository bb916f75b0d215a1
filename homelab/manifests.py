"""Kubernetes manifests rendered from the inventory: manifests/<component>/*.yaml.j2.

`render(inv)` turns the templates of the network layer's components into plain objects, in
apply order: Namespaces, then other built-in kinds (Secrets, StorageClasses), then the
HelmCharts that bring the CRDs, then the custom resources that need those CRDs. Every object
carries the labels the engine prunes by. Charts are pinned below; the charts pin their images.

Secrets never live in the repository: they are passed in (see SECRET_ENV and secrets_from_env)
and the objects that would hold a missing one are left out, with a warning that says so.
"""

from __future__ import annotations

import base64
import json
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from homelab.inventory import Inventory
from homelab.target import SECRETS as TARGET_SECRETS

MANIFESTS_DIR = Path(__file__).resolve().parent.parent / "manifests"
MANAGED_BY = "app.kubernetes.io/managed-by"
COMPONENT = "homelab.jigga.xyz/component"

# Each Kubernetes layer's components, in the order their objects are applied within a phase.
LAYERS: Mapping[str, tuple[str, ...]] = {
    "network": ("metallb", "traefik", "cert-manager", "ceph-csi"),
    "access": ("cloudflared", "tailscale", "k8s-gateway"),
    "monitoring": ("kube-prometheus-stack", "loki", "alloy"),
    "apps": ("vaultwarden", "homepage", "vault", "argocd"),
}
COMPONENTS = tuple(c for components in LAYERS.values() for c in components)


@dataclass(frozen=True)
class Chart:
    """A Helm chart pinned to one released version."""

    repo: str
    chart: str
    version: str


CHARTS: Mapping[str, Chart] = {
    # MetalLB 0.15.3, released 2025-12-04 (https://metallb.io/release-notes/#version-0153).
    "metallb": Chart("https://metallb.github.io/metallb", "metallb", "0.15.3"),
    # traefik-helm-chart v37.3.0 (Traefik Proxy v3); `ports.web.redirections` since chart v34.0.0.
    "traefik": Chart("https://traefik.github.io/charts", "traefik", "37.3.0"),
    # cert-manager v1.19.4 (https://github.com/cert-manager/cert-manager/releases/tag/v1.19.4).
    "cert-manager": Chart("https://charts.jetstack.io", "cert-manager", "v1.19.4"),
    # Ceph-CSI v3.15.1 (https://github.com/ceph/ceph-csi/releases/tag/v3.15.1).
    "ceph-csi": Chart("https://ceph.github.io/csi-charts", "ceph-csi-rbd", "3.15.1"),
    # Tailscale operator 1.102.4 (https://pkgs.tailscale.com/helmcharts); k8s_gateway chart 2.4.0
    # (https://ori-edge.github.io/k8s_gateway/, CoreDNS with the k8s_gateway plugin).
    "tailscale": Chart("https://pkgs.tailscale.com/helmcharts", "tailscale-operator", "1.102.4"),
    "k8s-gateway": Chart("https://ori-edge.github.io/k8s_gateway/", "k8s-gateway", "2.4.0"),
    # kube-prometheus-stack 81.4.5 (Prometheus Operator v0.88.0, Grafana chart 10.5.12): version in
    # charts/kube-prometheus-stack/Chart.yaml of prometheus-community/helm-charts.
    "kube-prometheus-stack": Chart("https://prometheus-community.github.io/helm-charts", "kube-prometheus-stack",
                                   "81.4.5"),
    # Loki chart 6.42.0 (tag helm-loki-6.42.0). Since 2026-03-16 the chart lives on in
    # grafana-community/helm-charts with a new numbering; grafana.github.io keeps serving 6.x.
    "loki": Chart("https://grafana.github.io/helm-charts", "loki", "6.42.0"),
    # Alloy chart 1.9.0 = Grafana Alloy v1.16.3 (https://github.com/grafana/alloy/releases/tag/helm-chart%2F1.9.0).
    # Alloy replaces Promtail, which reached end of life on 2026-03-02.
    "alloy": Chart("https://grafana.github.io/helm-charts", "alloy", "1.9.0"),
    # Vault chart 0.32.0 = Vault 1.21.2 (https://developer.hashicorp.com/vault/docs/platform/k8s/helm).
    "vault": Chart("https://helm.releases.hashicorp.com", "vault", "0.32.0"),
    # Argo CD chart 9.4.17, released 2026-03-27 (https://artifacthub.io/packages/helm/argo/argo-cd/9.4.17).
    "argocd": Chart("https://argoproj.github.io/argo-helm", "argo-cd", "9.4.17"),
}

# API groups whose CRDs a component's chart installs: their objects wait until the CRD is served.
CRD_GROUPS: Mapping[str, str] = {
    "metallb.io": "metallb",
    "traefik.io": "traefik",
    "cert-manager.io": "cert-manager",
    "monitoring.coreos.com": "kube-prometheus-stack",
    "argoproj.io": "argocd",
    "tailscale.com": "tailscale",
}
# Images the manifests run directly (charts pin their own).
IMAGES: Mapping[str, str] = {
    "cloudflared": "cloudflare/cloudflared:2025.11.1",
}

ISSUERS = ("letsencrypt-staging", "letsencrypt-production")
ACME_SERVERS = {
    "server": "https://acme-v02.api.letsencrypt.org/directory",
    "staging_server": "https://acme-staging-v02.api.letsencrypt.org/directory",
}
# Keys `acme` may hold: the two directories, the account e-mail, a CA bundle (base64 PEM) for a
# directory that is not publicly trusted (the lab's).
ACME_KEYS = (*ACME_SERVERS, "email", "ca_bundle")

# The secrets a render may carry: the target's (homelab.target.SECRETS, from the environment or the
# lab's state) and those the layers read at run time (the Ceph CSI key, the tunnel's token).
CLOUDFLARE_TOKEN = "CLOUDFLARE_API_TOKEN"  # noqa: S105 - the variable's name, not a token
CEPH_KEY = "HOMELAB_CEPH_CSI_KEY"
TUNNEL_TOKEN = "CLOUDFLARE_TUNNEL_TOKEN"  # noqa: S105 - a name
SECRET_ENV = (*TARGET_SECRETS, CEPH_KEY, TUNNEL_TOKEN)

CEPH_USER = "kubernetes"
CEPH_MON_PORT = 6789
PLACEHOLDER_FSID = "00000000-0000-0000-0000-000000000000"


class ManifestError(ValueError):
    """A template or an argument cannot give valid manifests."""


@dataclass(frozen=True)
class RenderResult:
    objects: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def by_component(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for obj in self.objects:
            out.setdefault(obj["metadata"]["labels"][COMPONENT], []).append(obj)
        return out


def secrets_from_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The render secrets that are set (and not empty) in the environment."""
    env = os.environ if environ is None else environ
    return {name: env[name] for name in SECRET_ENV if env.get(name)}


def phase(obj: Mapping[str, Any]) -> int:
    """Apply order: 0 Namespace, 1 other built-in kinds, 2 HelmChart (brings CRDs), 3 custom resources."""
    if obj["kind"] == "Namespace":
        return 0
    if obj["kind"] == "HelmChart":
        return 2
    return 3 if crd_group(obj) is not None else 1


def crd_group(obj: Mapping[str, Any]) -> str | None:
    """The API group of a custom resource whose CRD a chart brings, else None."""
    group = str(obj["apiVersion"]).rpartition("/")[0]
    return group if group in CRD_GROUPS else None


def required_crds(objects: list[dict[str, Any]]) -> list[str]:
    """CRD names (plural.group) the objects need served before they can be applied."""
    out = []
    for obj in objects:
        group = crd_group(obj)
        if group is not None:
            out.append(f"{str(obj['kind']).lower()}s.{group}")
    return list(dict.fromkeys(out))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; a template that says a key twice is a bug."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_documents(text: str, source: str) -> list[dict[str, Any]]:
    """Every non-empty document of a YAML stream; each must be a mapping."""
    try:
        docs = list(yaml.load_all(text, Loader=_UniqueKeyLoader))
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: not valid YAML: {exc}") from None
    out = []
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ManifestError(f"{source}: a document is a {type(doc).__name__}, not a mapping")
        out.append(doc)
    return out


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def _environment(directory: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(directory),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - YAML, not HTML; values go in through the json filter
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    # JSON is YAML: every value goes in quoted and escaped, so no value can change the structure.
    env.filters["json"] = json.dumps
    env.filters["b64"] = _b64
    return env


def _slug(domain: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", domain.lower()).strip("-")


def _tls_secret(inv: Inventory, hostname: str) -> str:
    """The wildcard certificate's Secret covering hostname (its domain's: apex or one label below)."""
    for domain in sorted([inv.domains.internal.name, inv.domains.public.name], key=len, reverse=True):
        if hostname == domain or hostname.endswith("." + domain):
            return f"wildcard-{_slug(domain)}-tls"
    raise ManifestError(f"{hostname} is under neither domain")


def _context(inv: Inventory, secrets: Mapping[str, str], issuer: str, acme: Mapping[str, str],
             ceph_fsid: str) -> dict[str, Any]:
    domains = list(dict.fromkeys([inv.domains.public.name, inv.domains.internal.name]))
    servers = {key: acme.get(key) or default for key, default in ACME_SERVERS.items()}
    return {
        "charts": CHARTS,
        "pool": list(inv.network.metallb_pool),
        "traefik_address": str(inv.network.traefik),
        "issuer": issuer,
        "issuers": [
            {"name": "letsencrypt-staging", "label": "staging", "server": servers["staging_server"]},
            {"name": "letsencrypt-production", "label": "production", "server": servers["server"]},
        ],
        "acme_email": acme.get("email"),
        "acme_ca_bundle": acme.get("ca_bundle"),
        "dns_zones": domains,
        "certificates": [{"domain": d, "name": f"wildcard-{_slug(d)}", "secret": f"wildcard-{_slug(d)}-tls"}
                         for d in domains],
        "cloudflare_token": secrets.get(CLOUDFLARE_TOKEN) or None,
        "secrets": {name: secrets.get(name) or None for name in SECRET_ENV},
        "apps": {app.name: app for app in inv.apps},
        "public_apps": [app for app in inv.apps if app.access == "public"],
        "domains": inv.domains,
        "access": inv.access,
        "gitops": inv.gitops,
        "internal_dns_address": str(inv.network.internal_dns),
        "tailnet_routes": [f"{inv.network.traefik}/32", f"{inv.network.internal_dns}/32"],
        "images": IMAGES,
        "wildcard_secret": {d: f"wildcard-{_slug(d)}-tls" for d in domains},
        "tls_secret": {app.name: _tls_secret(inv, app.hostname) for app in inv.apps if app.hostname},
        "ceph": {
            "fsid": ceph_fsid,
            "monitors": [f"{node.address}:{CEPH_MON_PORT}" for node in inv.proxmox.nodes],
            "pool": inv.proxmox.ceph.pool,
            "user_id": CEPH_USER,
            "user_key": secrets.get(CEPH_KEY) or None,
        },
    }


def _check_arguments(component: str | None, secrets: Mapping[str, str], issuer: str, acme: Mapping[str, str],
                     ceph_fsid: str) -> None:
    if component is not None and component not in COMPONENTS:
        raise ManifestError(f"unknown component {component!r}; the components are {', '.join(COMPONENTS)}")
    if issuer not in ISSUERS:
        raise ManifestError(f"unknown issuer {issuer!r}; choose {' or '.join(ISSUERS)}")
    unknown = sorted(set(acme) - set(ACME_KEYS))
    if unknown:
        raise ManifestError(f"unknown ACME setting(s) {', '.join(unknown)}; known: {', '.join(ACME_KEYS)}")
    for key in ACME_SERVERS:
        if acme.get(key) and not re.match(r"^https://\S+$", acme[key]):
            raise ManifestError(f"ACME {key} {acme[key]!r} is not an https URL")
    unknown = sorted(set(secrets) - set(SECRET_ENV))
    if unknown:
        raise ManifestError(f"unknown secret(s) {', '.join(unknown)}; known: {', '.join(SECRET_ENV)}")
    try:
        uuid.UUID(ceph_fsid)
    except ValueError:
        raise ManifestError(f"Ceph fsid {ceph_fsid!r} is not a UUID (see `ceph fsid` on a PVE node)") from None


def _warnings(component: str, context: Mapping[str, Any], ceph_fsid: str) -> list[str]:
    out = []
    if component == "cert-manager" and context["cloudflare_token"] is None:
        out.append(f"cert-manager: {CLOUDFLARE_TOKEN} is not set, so the Secret cert-manager/cloudflare-api-token "
                   "is not rendered; the ClusterIssuers cannot solve DNS-01 challenges until it exists")
    if component == "ceph-csi" and context["ceph"]["user_key"] is None:
        out.append(f"ceph-csi: Ceph has no client.{CEPH_USER} yet (the ceph layer makes it), so the Secret "
                   "ceph-csi-rbd/csi-rbd-secret is not rendered; volumes cannot be provisioned until it holds "
                   "the client's key")
    if component == "ceph-csi" and ceph_fsid == PLACEHOLDER_FSID:
        out.append("ceph-csi: no Ceph fsid given; clusterID is the placeholder " + PLACEHOLDER_FSID)
    if component == "kube-prometheus-stack" and context["secrets"]["GRAFANA_ADMIN_PASSWORD"] is None:
        out.append("kube-prometheus-stack: GRAFANA_ADMIN_PASSWORD is not set, so the Secret monitoring/grafana-admin "
                   "is not rendered; Grafana does not start until it exists")
    if component == "vaultwarden" and context["secrets"]["VAULTWARDEN_ADMIN_TOKEN"] is None:
        out.append("vaultwarden: VAULTWARDEN_ADMIN_TOKEN is not set, so the Secret vaultwarden/vaultwarden-admin "
                   "is not rendered and the admin page (/admin) stays disabled")
    return out


def render(
    inv: Inventory,
    *,
    component: str | None = None,
    secrets: Mapping[str, str] | None = None,
    issuer: str = "letsencrypt-production",
    acme: Mapping[str, str] | None = None,
    ceph_fsid: str = PLACEHOLDER_FSID,
    directory: Path = MANIFESTS_DIR,
) -> RenderResult:
    """Render one component (or all) from the inventory, in apply order.

    secrets: by environment variable name (SECRET_ENV); a Secret whose value is missing is left
    out and a warning says so. issuer: the ClusterIssuer the wildcard Certificates use. acme:
    overrides of ACME_KEYS (the lab's ACME directory). ceph_fsid: the Ceph cluster's fsid.
    """
    secrets = secrets or {}
    acme = acme or {}
    _check_arguments(component, secrets, issuer, acme, ceph_fsid)
    context = _context(inv, secrets, issuer, acme, ceph_fsid)
    env = _environment(directory)
    keyed: list[tuple[int, int, int, dict[str, Any]]] = []
    warnings: list[str] = []
    for index, name in enumerate(COMPONENTS):
        if component is not None and name != component:
            continue
        folder = directory / name
        templates = sorted(p.name for p in folder.glob("*.yaml.j2")) if folder.is_dir() else []
        if not templates:
            raise ManifestError(f"component {name}: no templates in {folder}")
        warnings += _warnings(name, context, ceph_fsid)
        for template in templates:
            source = f"{name}/{template}"
            try:
                text = env.get_template(source).render(context)
            except jinja2.TemplateError as exc:
                raise ManifestError(f"{source}: {exc}") from None
            for obj in load_documents(text, source):
                _label(obj, name, source)
                keyed.append((phase(obj), index, len(keyed), obj))
    keyed.sort(key=lambda item: item[:3])
    return RenderResult([obj for *_, obj in keyed], warnings)


def _label(obj: dict[str, Any], component: str, source: str) -> None:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or "kind" not in obj or "apiVersion" not in obj:
        raise ManifestError(f"{source}: every object needs apiVersion, kind and metadata")
    labels = meta.setdefault("labels", {})
    labels[MANAGED_BY] = "homelab"
    labels[COMPONENT] = component


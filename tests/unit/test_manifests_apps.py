"""The monitoring and apps layers' manifests: Ingresses from the app table, secrets, pinned charts and images.

Each of these components is rendered alone, with and without the secrets it can carry, and validated
offline like the network layer's.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from homelab import inventory, manifests, validate
from homelab.inventory import Inventory
from homelab.lab import chartcrds

REPO = Path(__file__).resolve().parents[2]
GRAFANA_PASSWORD = "grafana-unit-test-pw-5e1d"
ADMIN_TOKEN = "vw-unit-test-token-8c2b"
SECRETS = {"GRAFANA_ADMIN_PASSWORD": GRAFANA_PASSWORD, "VAULTWARDEN_ADMIN_TOKEN": ADMIN_TOKEN}
MONITORING = ("kube-prometheus-stack", "loki", "alloy")
APPS = ("vaultwarden", "homepage", "vault", "argocd")
MINE = MONITORING + APPS
VERSION = re.compile(r"^v?\d+\.\d+\.\d+$")


@pytest.fixture(scope="module")
def inv() -> Inventory:
    return inventory.load(REPO / "inventory" / "homelab.yaml")


def render_mine(inv: Inventory, secrets: dict[str, str] | None = None,
                names: tuple[str, ...] = MINE) -> manifests.RenderResult:
    objects: list[dict[str, Any]] = []
    warnings: list[str] = []
    for name in names:
        result = manifests.render(inv, component=name, secrets=secrets)
        objects += result.objects
        warnings += result.warnings
    return manifests.RenderResult(objects, warnings)


@pytest.fixture(scope="module")
def full(inv: Inventory) -> manifests.RenderResult:
    return render_mine(inv, SECRETS)


@pytest.fixture(scope="module")
def bare(inv: Inventory) -> manifests.RenderResult:
    return render_mine(inv)


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def values(objects: list[dict[str, Any]], release: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(find(objects, "HelmChart", release)["spec"]["valuesContent"])
    return loaded


def container(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    pod = find(objects, "Deployment", name)["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    out: dict[str, Any] = pod["containers"][0]
    return out


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# ---------------------------------------------------------------------------- rendering


def test_components_render_and_validate(full: manifests.RenderResult, bare: manifests.RenderResult) -> None:
    assert set(full.by_component) == set(MINE)
    assert validate.validate_all(full.objects) == []
    assert validate.validate_all(bare.objects) == []


def test_the_monitoring_namespace_is_declared_once(full: manifests.RenderResult) -> None:
    namespaces = [o for o in of_kind(full.objects, "Namespace") if o["metadata"]["name"] == "monitoring"]
    assert len(namespaces) == 1
    assert namespaces[0]["metadata"]["labels"][manifests.COMPONENT] == "kube-prometheus-stack"
    for release in MONITORING:
        assert find(full.objects, "HelmChart", release)["spec"]["targetNamespace"] == "monitoring"


def test_custom_resources_wait_for_their_crds(full: manifests.RenderResult) -> None:
    app = find(full.objects, "Application", "homelab")
    assert manifests.crd_group(app) == "argoproj.io"
    assert manifests.CRD_GROUPS["argoproj.io"] == "argocd"
    assert manifests.CRD_GROUPS["monitoring.coreos.com"] == "kube-prometheus-stack"
    assert manifests.required_crds(full.objects) == ["applications.argoproj.io"]
    assert manifests.phase(app) == 3


# ---------------------------------------------------------------------------- Ingresses


def test_every_app_with_a_hostname_gets_exactly_one_ingress(inv: Inventory, full: manifests.RenderResult) -> None:
    ingresses = of_kind(full.objects, "Ingress")
    exposed = [app for app in inv.apps if app.hostname]
    assert exposed, "the inventory exposes apps"
    for app in exposed:
        matches = [i for i in ingresses if any(r["host"] == app.hostname for r in i["spec"]["rules"])]
        assert len(matches) == 1, f"{app.hostname}: {len(matches)} Ingresses"
        ing = matches[0]
        assert (ing["metadata"]["name"], ing["metadata"]["namespace"]) == (app.name, app.namespace)
        assert ing["spec"]["ingressClassName"] == "traefik"
        assert ing["metadata"]["annotations"] == {"traefik.ingress.kubernetes.io/router.entrypoints": "websecure"}
        assert ing["spec"]["tls"] == [{"hosts": [app.hostname]}], "no secretName: Traefik's TLSStore serves it"
        [rule] = ing["spec"]["rules"]
        [path] = rule["http"]["paths"]
        assert (path["path"], path["pathType"]) == ("/", "Prefix")
    assert len(ingresses) == len(exposed)


def test_no_ingress_for_cluster_only_apps(inv: Inventory, full: manifests.RenderResult) -> None:
    names = {i["metadata"]["name"] for i in of_kind(full.objects, "Ingress")}
    hidden = {app.name for app in inv.apps if not app.hostname}
    assert {"prometheus", "alertmanager", "loki"} <= hidden
    assert not names & hidden
    kps = values(full.objects, "kube-prometheus-stack")
    assert kps["grafana"]["ingress"]["enabled"] is False
    assert values(full.objects, "vault")["server"]["ingress"]["enabled"] is False
    assert values(full.objects, "argocd")["server"]["ingress"]["enabled"] is False


def test_an_app_without_a_hostname_gets_no_ingress(inv: Inventory) -> None:
    apps = [app.model_copy(update={"hostname": None}) if app.name == "grafana" else app for app in inv.apps]
    objects = manifests.render(inv.model_copy(update={"apps": apps}), component="kube-prometheus-stack").objects
    assert not of_kind(objects, "Ingress")


def resolve(name: str, release: str, chart_values: dict[str, Any]) -> str:
    return name.format(fullname=chart_values.get("fullnameOverride") or release, release=release)


def test_ingress_backends_exist(full: manifests.RenderResult) -> None:
    """Each backend is a Service we declare, or one the chart makes (chartcrds.SERVICES, as the lab fakes it)."""
    services = {(s["metadata"]["namespace"], s["metadata"]["name"]): [p["port"] for p in s["spec"]["ports"]]
                for s in of_kind(full.objects, "Service")}
    for chart in of_kind(full.objects, "HelmChart"):
        release, spec = chart["metadata"]["name"], chart["spec"]
        chart_values = yaml.safe_load(spec["valuesContent"])
        for svc in chartcrds.SERVICES.get(spec["chart"], []):
            services[(spec["targetNamespace"], resolve(svc["name"], release, chart_values))] = [svc["port"]]
    for ing in of_kind(full.objects, "Ingress"):
        backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        key = (ing["metadata"]["namespace"], backend["name"])
        assert key in services, f"Ingress {ing['metadata']['name']}: no Service {key}"
        assert backend["port"]["number"] in services[key]


# ---------------------------------------------------------------------------- secrets


def test_missing_secrets_leave_out_only_the_secret(bare: manifests.RenderResult) -> None:
    assert not of_kind(bare.objects, "Secret")
    assert any("GRAFANA_ADMIN_PASSWORD is not set" in w for w in bare.warnings)
    assert any("VAULTWARDEN_ADMIN_TOKEN is not set" in w for w in bare.warnings)
    vaultwarden = container(bare.objects, "vaultwarden")
    assert "ADMIN_TOKEN" not in env(vaultwarden)
    assert env(vaultwarden)["SIGNUPS_ALLOWED"] == "false"
    # Grafana keeps naming its Secret: a chart-made random password would be stored for good on first start.
    assert values(bare.objects, "kube-prometheus-stack")["grafana"]["admin"]["existingSecret"] == "grafana-admin"


def test_secrets_when_given(full: manifests.RenderResult) -> None:
    assert not [w for w in full.warnings if "not set" in w]
    grafana = find(full.objects, "Secret", "grafana-admin")
    admin = values(full.objects, "kube-prometheus-stack")["grafana"]["admin"]
    assert grafana["metadata"]["namespace"] == "monitoring"
    assert base64.b64decode(grafana["data"][admin["passwordKey"]]).decode() == GRAFANA_PASSWORD
    assert base64.b64decode(grafana["data"][admin["userKey"]]).decode() == "admin"
    token = find(full.objects, "Secret", "vaultwarden-admin")
    assert base64.b64decode(token["data"]["admin-token"]).decode() == ADMIN_TOKEN
    ref = env(container(full.objects, "vaultwarden"))["ADMIN_TOKEN"]
    assert ref == {"secretKeyRef": {"name": "vaultwarden-admin", "key": "admin-token"}}


@pytest.mark.parametrize(("name", "value", "holder"), [
    ("GRAFANA_ADMIN_PASSWORD", GRAFANA_PASSWORD, "grafana-admin"),
    ("VAULTWARDEN_ADMIN_TOKEN", ADMIN_TOKEN, "vaultwarden-admin"),
])
def test_secret_values_only_in_their_secret(full: manifests.RenderResult, name: str, value: str,
                                            holder: str) -> None:
    encoded = base64.b64encode(value.encode()).decode()
    holders = [o for o in full.objects if value in json.dumps(o) or encoded in json.dumps(o)]
    assert [(o["kind"], o["metadata"]["name"]) for o in holders] == [("Secret", holder)], name
    assert value not in "\n".join(full.warnings)


# ---------------------------------------------------------------------------- pinned charts and images


def test_charts_are_pinned(full: manifests.RenderResult) -> None:
    charts = of_kind(full.objects, "HelmChart")
    assert {c["metadata"]["name"] for c in charts} == {"kube-prometheus-stack", "loki", "alloy", "vault", "argocd"}
    for chart in charts:
        pinned = manifests.CHARTS[chart["metadata"]["name"]]
        spec = chart["spec"]
        assert (spec["repo"], spec["chart"], spec["version"]) == (pinned.repo, pinned.chart, pinned.version)
        assert spec["repo"].startswith("https://")
        assert VERSION.match(spec["version"]), spec["version"]
        assert "latest" not in spec["valuesContent"]


def images(objects: list[dict[str, Any]]) -> list[str]:
    return [c["image"] for d in of_kind(objects, "Deployment")
            for c in d["spec"]["template"]["spec"]["containers"] + d["spec"]["template"]["spec"].get(
                "initContainers", [])]


def test_images_are_pinned(full: manifests.RenderResult) -> None:
    found = images(full.objects)
    assert len(found) == 2
    for image in found:
        repository, _, tag = image.rpartition(":")
        assert repository and "/" in repository, image
        assert VERSION.match(tag), f"{image}: not pinned to a release"
        assert repository in chartcrds.IMAGES, f"{image}: the lab does not know how it answers"


def test_lab_data_names_every_app_with_a_health_path() -> None:
    apps = {s["app"]: s for services in chartcrds.SERVICES.values() for s in services}
    apps.update({image["app"]: image for image in chartcrds.IMAGES.values()})
    expected = {"vaultwarden": "/alive", "grafana": "/api/health", "vault": "/v1/sys/health", "argocd": "/healthz",
                "homepage": "/", "prometheus": "/-/healthy", "alertmanager": "/-/healthy", "loki": "/ready"}
    assert {app: apps[app]["health"] for app in expected} == expected
    assert set(chartcrds.SERVICES) <= {c.chart for c in manifests.CHARTS.values()}


# ---------------------------------------------------------------------------- storage


def test_storage_is_on_ceph_rbd(full: manifests.RenderResult) -> None:
    pvcs = of_kind(full.objects, "PersistentVolumeClaim")
    assert [p["metadata"]["name"] for p in pvcs] == ["vaultwarden-data"]
    assert pvcs[0]["spec"]["storageClassName"] == "ceph-rbd"
    volumes = find(full.objects, "Deployment", "vaultwarden")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "vaultwarden-data"}} in volumes
    kps = values(full.objects, "kube-prometheus-stack")
    prometheus = kps["prometheus"]["prometheusSpec"]["storageSpec"]["volumeClaimTemplate"]["spec"]
    alertmanager = kps["alertmanager"]["alertmanagerSpec"]["storage"]["volumeClaimTemplate"]["spec"]
    assert prometheus["storageClassName"] == alertmanager["storageClassName"] == "ceph-rbd"
    assert kps["grafana"]["persistence"]["enabled"] is True
    assert kps["grafana"]["persistence"]["storageClassName"] == "ceph-rbd"
    loki = values(full.objects, "loki")["singleBinary"]["persistence"]
    assert loki["enabled"] is True and loki["storageClass"] == "ceph-rbd"
    vault = values(full.objects, "vault")["server"]["dataStorage"]
    assert vault["enabled"] is True and vault["storageClass"] == "ceph-rbd"


# ---------------------------------------------------------------------------- monitoring


def test_k3s_control_plane_targets_are_off(full: manifests.RenderResult) -> None:
    kps = values(full.objects, "kube-prometheus-stack")
    for component in ("kubeControllerManager", "kubeScheduler", "kubeProxy", "kubeEtcd"):
        assert kps[component]["enabled"] is False, component
    assert kps["fullnameOverride"] == "kube-prometheus-stack"


def test_logs_flow_to_the_loki_service(full: manifests.RenderResult) -> None:
    loki = values(full.objects, "loki")
    assert loki["deploymentMode"] == "SingleBinary"
    assert loki["singleBinary"]["replicas"] == 1
    assert loki["loki"]["commonConfig"]["replication_factor"] == 1
    assert loki["loki"]["auth_enabled"] is False
    assert loki["loki"]["storage"]["type"] == "filesystem"
    assert {loki[target]["replicas"] for target in ("read", "write", "backend")} == {0}
    assert loki["gateway"]["enabled"] is False
    [svc] = chartcrds.SERVICES["loki"]
    url = f"http://{resolve(svc['name'], 'loki', loki)}.monitoring.svc.cluster.local:{svc['port']}"
    datasources = values(full.objects, "kube-prometheus-stack")["grafana"]["additionalDataSources"]
    assert [d["url"] for d in datasources if d["type"] == "loki"] == [url]
    alloy = values(full.objects, "alloy")["alloy"]["configMap"]["content"]
    assert f'url = "{url}/loki/api/v1/push"' in alloy
    assert "loki.source.kubernetes" in alloy


# ---------------------------------------------------------------------------- apps


def test_vaultwarden(inv: Inventory, full: manifests.RenderResult) -> None:
    c = container(full.objects, "vaultwarden")
    [app] = [a for a in inv.apps if a.name == "vaultwarden"]
    assert env(c)["DOMAIN"] == f"https://{app.hostname}" == "https://passwords.jigga.xyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/alive"
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    pod = find(full.objects, "Deployment", "vaultwarden")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    service = find(full.objects, "Service", "vaultwarden")
    assert service["spec"]["ports"][0]["port"] == 80


def test_homepage_lists_the_exposed_apps(inv: Inventory, full: manifests.RenderResult) -> None:
    config = find(full.objects, "ConfigMap", "homepage")["data"]
    groups = yaml.safe_load(config["services.yaml"])
    listed = {name: (group, entry["href"]) for g in groups for group, members in g.items()
              for m in members for name, entry in m.items()}
    assert listed == {app.name: (app.group.capitalize(), f"https://{app.hostname}")
                      for app in inv.apps if app.hostname and app.name != "homepage"}
    assert yaml.safe_load(config["settings.yaml"])["title"] == "jigga.xyz"
    assert isinstance(yaml.safe_load(config["widgets.yaml"]), list)
    c = container(full.objects, "homepage")
    assert env(c)["HOMEPAGE_ALLOWED_HOSTS"] == "jigga.xyz"
    mounted = {m["subPath"] for m in c["volumeMounts"] if "subPath" in m}
    assert mounted == set(config)


def test_vault_is_a_standalone_server(full: manifests.RenderResult) -> None:
    vault = values(full.objects, "vault")
    assert vault["server"]["dev"]["enabled"] is False
    assert vault["server"]["standalone"]["enabled"] is True
    assert 'storage "file"' in vault["server"]["standalone"]["config"]
    assert vault["injector"]["enabled"] is False
    assert vault["ui"]["enabled"] is True


def test_argocd_behind_traefik(full: manifests.RenderResult) -> None:
    argocd = values(full.objects, "argocd")
    assert argocd["fullnameOverride"] == "argocd"
    assert argocd["configs"]["params"]["server.insecure"] is True
    assert argocd["dex"]["enabled"] is False
    assert argocd["global"]["domain"] == "argocd.int.jigga.xyz"


def test_app_of_apps_follows_the_inventory(inv: Inventory, full: manifests.RenderResult) -> None:
    app = find(full.objects, "Application", "homelab")
    assert app["metadata"]["namespace"] == "argocd"
    assert app["spec"]["source"] == {"repoURL": inv.gitops.repo_url, "targetRevision": inv.gitops.revision,
                                     "path": inv.gitops.path}
    assert app["spec"]["destination"]["server"] == "https://kubernetes.default.svc"
    assert app["spec"]["syncPolicy"]["automated"]["prune"] is False


def test_app_of_apps_follows_a_changed_inventory(inv: Inventory) -> None:
    gitops = inv.gitops.model_copy(update={"repo_url": "https://git.example/x.git", "revision": "v1",
                                           "path": "deploy/apps"})
    objects = manifests.render(inv.model_copy(update={"gitops": gitops}), component="argocd").objects
    source = find(objects, "Application", "homelab")["spec"]["source"]
    assert source == {"repoURL": "https://git.example/x.git", "targetRevision": "v1", "path": "deploy/apps"}


def test_gitops_folder_is_what_argocd_can_read(inv: Inventory) -> None:
    folder = REPO / inv.gitops.path
    assert (folder / "README.md").is_file()
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization"
    for resource in kustomization["resources"]:
        text = (folder / resource).read_text(encoding="utf-8")
        objects = manifests.load_documents(text, resource)
        assert validate.validate_all(objects) == []
        for obj in objects:
            # The pipeline prunes what carries its label and it no longer declares.
            assert manifests.MANAGED_BY not in obj["metadata"].get("labels", {})

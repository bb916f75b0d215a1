"""The stand-in's workloads and app doubles: plain Deployments turn Ready only when what their pods need
exists, and the app behind an Ingress backend answers its own health endpoint (Vault its seal lifecycle)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, config

from homelab.lab.k3s_standin import ServerHandle, serve
from homelab.lab.k3s_standin.apps import FAULT_ANNOTATION

from .polling import wait_for

APPS = {"services": {"kube-prometheus-stack": [
            {"name": "{fullname}-grafana", "port": 80, "app": "grafana", "health": "/api/health"}],
                     "vault": [{"name": "{fullname}", "port": 8200, "app": "vault", "health": "/v1/sys/health"}]},
        "images": {"vaultwarden/server": {"app": "vaultwarden", "health": "/alive"},
                   "hashicorp/vault": {"app": "vault", "health": "/v1/sys/health"}}}


REPO = "https://example.org/homelab.git"
GITOPS_OBJECT = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "from-git", "namespace": "apps"},
                 "data": {"a": "b"}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, client.ApiClient]]:
    tmp = tmp_path_factory.mktemp("k3sapps")
    charts = tmp / "charts"
    charts.mkdir()
    (charts / "apps.json").write_text(json.dumps(APPS), encoding="utf-8")
    (charts / "gitops.json").write_text(json.dumps({REPO: {"gitops/apps": [GITOPS_OBJECT]}}), encoding="utf-8")
    handle = serve({"data-dir": str(tmp / "data"), "https-listen-port": 0, "bind-address": "127.0.0.1",
                    "node-ip": "127.0.0.1", "node-name": "apps", "write-kubeconfig": str(tmp / "k3s.yaml"),
                    "token": "apps-test-token"},
                   env={"K3S_STANDIN_ANNOUNCE": "0", "K3S_STANDIN_CHARTS": str(charts)},
                   ingress_bind=lambda ip, _port: (ip, 0))
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(handle.kubeconfig), client_configuration=configuration)
    api = client.ApiClient(configuration)
    client.CoreV1Api(api).create_namespace({"metadata": {"name": "apps"}})
    yield handle, api
    api.close()
    handle.stop()


def _deployment(name: str, image: str, pod: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
        "metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": name, "image": image,
                                                                        **pod.get("container", {})}],
                                                        **pod.get("pod", {})}}}}


def _available(apps: client.AppsV1Api, name: str) -> tuple[int, str]:
    dep = apps.read_namespaced_deployment(name, "apps")
    cond = next((c for c in dep.status.conditions or [] if c.type == "Available"), None)
    return dep.status.ready_replicas or 0, (cond.message if cond else "")


def _respond(handle: ServerHandle, service: str, method: str = "GET", path: str = "/",
             body: bytes = b"") -> tuple[int, bytes]:
    controllers = handle._server.controllers
    assert controllers is not None
    status, payload, _ = controllers.ingress.apps.respond({"namespace": "apps", "name": service, "port": 80},
                                                          method, path, body)
    return status, payload


def test_deployment_waits_for_its_secret_and_app_answers_health(cluster: tuple[ServerHandle, client.ApiClient]) -> None:
    handle, api = cluster
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    apps.create_namespaced_deployment("apps", _deployment("vaultwarden", "vaultwarden/server:1.34.3", {
        "container": {"env": [{"name": "ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": "vw", "key": "t"}}}]}}))
    core.create_namespaced_service("apps", {"metadata": {"name": "vaultwarden"}, "spec": {
        "selector": {"app": "vaultwarden"}, "ports": [{"port": 80}]}})
    message = wait_for("unavailable with a reason", lambda: (m := _available(apps, "vaultwarden")[1])
                       and "not found" in m and m)
    assert 'secret "vw" not found' in message
    assert _respond(handle, "vaultwarden", path="/alive")[0] == 503  # no ready endpoint: Traefik's 503

    core.create_namespaced_secret("apps", {"metadata": {"name": "vw"}, "data": {"other": "eA=="}})
    wait_for("missing key named", lambda: "couldn't find key t" in _available(apps, "vaultwarden")[1])
    core.patch_namespaced_secret("vw", "apps", {"data": {"t": "eA=="}})
    wait_for("ready", lambda: _available(apps, "vaultwarden")[0] == 1)
    status, body = _respond(handle, "vaultwarden", path="/alive")
    assert status == 200 and json.loads(body).endswith("Z")  # Vaultwarden's /alive: a timestamp

    core.patch_namespaced_service("vaultwarden", "apps", {"metadata": {"annotations": {FAULT_ANNOTATION: "502"}}})
    assert _respond(handle, "vaultwarden", path="/alive")[0] == 502


def test_deployment_waits_for_a_bound_claim(cluster: tuple[ServerHandle, client.ApiClient]) -> None:
    _handle, api = cluster
    apps = client.AppsV1Api(api)
    apps.create_namespaced_deployment("apps", _deployment("data", "busybox:1", {"pod": {"volumes": [
        {"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]}}))
    wait_for("claim named", lambda: 'persistentvolumeclaim "data" not found' in _available(apps, "data")[1])
    client.CoreV1Api(api).create_namespaced_persistent_volume_claim("apps", {
        "metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "none",
                                               "resources": {"requests": {"storage": "1Gi"}}}})
    wait_for("unbound named", lambda: "unbound immediate PersistentVolumeClaims" in _available(apps, "data")[1])
    assert _available(apps, "data")[0] == 0


def test_vault_double_follows_init_and_unseal(cluster: tuple[ServerHandle, client.ApiClient]) -> None:
    handle, api = cluster
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    apps.create_namespaced_deployment("apps", _deployment("vault", "hashicorp/vault:1.20.4", {}))
    core.create_namespaced_service("apps", {"metadata": {"name": "vault"}, "spec": {
        "selector": {"app": "vault"}, "ports": [{"port": 80}]}})
    wait_for("vault ready", lambda: _available(apps, "vault")[0] == 1)
    assert _respond(handle, "vault", path="/v1/sys/health")[0] == 501
    status, body = _respond(handle, "vault", "PUT", "/v1/sys/init", b'{"secret_shares": 3, "secret_threshold": 2}')
    assert status == 200
    init = json.loads(body)
    assert len(init["keys"]) == 3 and init["root_token"].startswith("hvs.")
    assert _respond(handle, "vault", "PUT", "/v1/sys/init", b'{"secret_shares": 1, "secret_threshold": 1}')[0] == 400
    assert _respond(handle, "vault", path="/v1/sys/health")[0] == 503
    assert _respond(handle, "vault", "PUT", "/v1/sys/unseal", json.dumps({"key": "00" * 32}).encode())[0] == 400
    status, body = _respond(handle, "vault", "PUT", "/v1/sys/unseal", json.dumps({"key": init["keys"][0]}).encode())
    assert json.loads(body)["sealed"] is True and json.loads(body)["progress"] == 1
    status, body = _respond(handle, "vault", "PUT", "/v1/sys/unseal",
                            json.dumps({"key": init["keys_base64"][2]}).encode())
    assert json.loads(body)["sealed"] is False
    assert _respond(handle, "vault", path="/v1/sys/health")[0] == 200
    [state_file] = (handle.data_dir / "server" / "standin-apps").glob("vault-apps-vault-*.json")
    state = state_file.read_text(encoding="utf-8")
    assert init["root_token"] not in state and init["keys"][0] not in state  # only hashes are kept


def test_chart_double_makes_the_charts_named_services(cluster: tuple[ServerHandle, client.ApiClient]) -> None:
    handle, api = cluster
    client.CustomObjectsApi(api).create_namespaced_custom_object("helm.cattle.io", "v1", "apps", "helmcharts", {
        "apiVersion": "helm.cattle.io/v1", "kind": "HelmChart", "metadata": {"name": "monitoring"},
        "spec": {"chart": "kube-prometheus-stack", "repo": "https://prometheus-community.github.io/helm-charts",
                 "version": "79.0.0", "targetNamespace": "apps",
                 "valuesContent": "fullnameOverride: kube-prometheus-stack\n"}})
    core = client.CoreV1Api(api)
    svc = wait_for("grafana service", lambda: [s for s in core.list_namespaced_service("apps").items
                                               if s.metadata.name == "kube-prometheus-stack-grafana"])
    assert svc[0].spec.ports[0].port == 80
    wait_for("release ready", lambda: (client.AppsV1Api(api).read_namespaced_deployment("monitoring", "apps")
                                       .status.ready_replicas or 0) == 1)
    status, body = _respond(handle, "kube-prometheus-stack-grafana", path="/api/health")
    assert status == 200 and json.loads(body)["database"] == "ok"


def test_argocd_double_syncs_from_the_snapshot_and_reports_drift(
        cluster: tuple[ServerHandle, client.ApiClient]) -> None:
    from homelab.lab import chartcrds

    _handle, api = cluster
    crds = chartcrds.crds_for("argo-cd")
    if not crds:
        pytest.skip("no CRDs catalog (../shared/crd-schemas)")
    ext = client.ApiextensionsV1Api(api)
    for body in crds:
        ext.create_custom_resource_definition(body)
    co, core = client.CustomObjectsApi(api), client.CoreV1Api(api)

    def app(name: str, path: str) -> dict[str, Any]:
        return {"apiVersion": "argoproj.io/v1alpha1", "kind": "Application", "metadata": {"name": name},
                "spec": {"project": "default", "source": {"repoURL": REPO, "path": path, "targetRevision": "main"},
                         "destination": {"server": "https://kubernetes.default.svc", "namespace": "apps"},
                         "syncPolicy": {"automated": {"prune": False, "selfHeal": False}}}}

    def status(name: str) -> dict[str, Any]:
        got = co.get_namespaced_custom_object("argoproj.io", "v1alpha1", "apps", "applications", name)
        return dict(got.get("status") or {})

    wait_for("Application served", lambda: co.list_namespaced_custom_object("argoproj.io", "v1alpha1", "apps",
                                                                            "applications") is not None)
    co.create_namespaced_custom_object("argoproj.io", "v1alpha1", "apps", "applications", app("homelab", "gitops/apps"))
    co.create_namespaced_custom_object("argoproj.io", "v1alpha1", "apps", "applications", app("nowhere", "nope"))
    co.create_namespaced_custom_object("helm.cattle.io", "v1", "apps", "helmcharts", {
        "apiVersion": "helm.cattle.io/v1", "kind": "HelmChart", "metadata": {"name": "argocd"},
        "spec": {"chart": "argo-cd", "repo": "https://argoproj.github.io/argo-helm", "version": "9.4.17",
                 "targetNamespace": "apps"}})
    wait_for("Synced and Healthy", lambda: status("homelab").get("sync", {}).get("status") == "Synced"
             and status("homelab").get("health", {}).get("status") == "Healthy")
    synced = core.read_namespaced_config_map("from-git", "apps")
    assert synced.metadata.labels["app.kubernetes.io/instance"] == "homelab"
    wait_for("a source the lab does not have", lambda: status("nowhere").get("sync", {}).get("status") == "Unknown")
    core.delete_namespaced_config_map("from-git", "apps")  # drift; selfHeal is off, so it stays
    wait_for("OutOfSync", lambda: status("homelab")["sync"]["status"] == "OutOfSync"
             and status("homelab")["health"]["status"] == "Missing")


def test_a_controller_cannot_write_from_a_stale_read(cluster: tuple[ServerHandle, client.ApiClient]) -> None:
    """A DELETE that a finalizer holds sets deletionTimestamp; a controller's update from an earlier read is
    refused (409) instead of silently bringing the object back, as the API server refuses it."""
    from homelab.lab.k3s_standin.controllers import StaleRead

    handle, api = cluster
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map("apps", {"metadata": {"name": "held", "finalizers": ["example.org/hold"]},
                                               "data": {"a": "1"}})
    controllers = handle._server.controllers
    assert controllers is not None
    rt = controllers.must_rt("", "v1", "configmaps")
    stale = controllers.store.get(rt.storage_key, "apps", "held")
    core.delete_namespaced_config_map("held", "apps")
    with pytest.raises(StaleRead):
        controllers.update(rt, stale, {**stale, "data": {"a": "2"}}, "some-controller")
    held = core.read_namespaced_config_map("held", "apps")
    assert held.metadata.deletion_timestamp is not None and held.data == {"a": "1"}
    core.patch_namespaced_config_map("held", "apps", {"metadata": {"finalizers": None}})


def test_vault_double_reports_storage_it_cannot_read(tmp_path: Any) -> None:
    """Unreadable storage answers as an uninitialised Vault would (501), and says why in the server log; a
    missing file is simply a new Vault."""
    import io

    from homelab.lab.k3s_standin.apps import Vault
    from homelab.lab.k3s_standin.log import Log

    stream = io.StringIO()
    vault = Vault(tmp_path / "vault-x.json", Log(stream))
    assert vault.handle("GET", "/v1/sys/health", b"")[0] == 501 and stream.getvalue() == ""
    status, body, _ = vault.handle("PUT", "/v1/sys/init", b'{"secret_shares": 1, "secret_threshold": 1}')
    assert status == 200 and "initialised" in stream.getvalue()
    vault.handle("PUT", "/v1/sys/unseal", json.dumps({"key": json.loads(body)["keys"][0]}).encode())
    assert vault.handle("GET", "/v1/sys/health", b"")[0] == 200 and "unsealed" in stream.getvalue()
    (tmp_path / "vault-x.json").write_text("{not json", encoding="utf-8")
    assert vault.handle("GET", "/v1/sys/health", b"")[0] == 501
    assert "cannot read vault-x.json: JSONDecodeError" in stream.getvalue()


def test_a_release_service_keeps_its_app_marks_and_is_not_rewritten(
        cluster: tuple[ServerHandle, client.ApiClient]) -> None:
    """The release's own Service (Vault's) carries the app marks, and reconcile passes leave it alone: the chart
    double once replaced its annotations on every pass, so a request could find it unmarked and get the
    unknown-backend page (200) instead of Vault's health."""
    from homelab.lab.k3s_standin.apps import APP_ANNOTATION

    _, api = cluster
    charts, core = client.CustomObjectsApi(api), client.CoreV1Api(api)

    def chart(name: str, chart_name: str) -> dict[str, Any]:
        return {"apiVersion": "helm.cattle.io/v1", "kind": "HelmChart", "metadata": {"name": name},
                "spec": {"chart": chart_name, "repo": "https://example.org/charts", "version": "1.0.0",
                         "targetNamespace": "apps"}}

    charts.create_namespaced_custom_object("helm.cattle.io", "v1", "apps", "helmcharts", chart("secrets", "vault"))
    marked = wait_for("the marked vault Service", lambda: (s := core.read_namespaced_service("secrets", "apps")) and
                      (s.metadata.annotations or {}).get(APP_ANNOTATION) == "vault" and s)
    # another chart's install shows that the controllers made further passes
    charts.create_namespaced_custom_object("helm.cattle.io", "v1", "apps", "helmcharts", chart("later", "other"))
    wait_for("the later release", lambda: client.AppsV1Api(api).read_namespaced_deployment("later", "apps"))
    wait_for("the later release's install job", lambda: client.BatchV1Api(api).read_namespaced_job(
        "helm-install-later", "kube-system").status.succeeded)
    again = core.read_namespaced_service("secrets", "apps")
    assert again.metadata.resource_version == marked.metadata.resource_version
    assert (again.metadata.annotations or {}).get(APP_ANNOTATION) == "vault"

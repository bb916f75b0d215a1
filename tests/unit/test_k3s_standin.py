"""The lab's k3s stand-in, driven only through the official kubernetes Python client (and its CLI).

Servers run in process on 127.0.0.1 with a free port; the client verifies TLS against the CA in the
kubeconfig the server wrote, as it would against a real K3s.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from homelab.lab import k3s_standin
from homelab.lab.k3s_standin import ServerHandle, serve, start_agent

TOKEN = "unit-test-cluster-token-7f3a9c"
GRACE = "2"
PACKAGE_DIR = Path(k3s_standin.__file__).resolve().parent


def server_config(tmp: Path, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "data-dir": str(tmp / "data"), "https-listen-port": 0, "bind-address": "127.0.0.1", "node-ip": "127.0.0.1",
        "node-name": "ichigo", "write-kubeconfig": str(tmp / "k3s.yaml"), "write-kubeconfig-mode": "0640",
        "token": TOKEN, "tls-san": ["ichigo.int.jigga.xyz"], "disable": ["servicelb", "traefik"],
        "cluster-cidr": "10.42.0.0/16", "service-cidr": "10.43.0.0/16",
    }
    cfg.update(extra)
    return cfg


def env() -> dict[str, str]:
    return {"K3S_STANDIN_NODE_GRACE": GRACE}


def api_client(kubeconfig: Path) -> client.ApiClient:
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    assert configuration.verify_ssl
    return client.ApiClient(configuration)


def status_of(exc: ApiException) -> dict[str, Any]:
    body = json.loads(exc.body)
    assert body["kind"] == "Status"
    assert body["code"] == exc.status
    return body


def wait_for(what: str, check: Callable[[], Any], timeout: float = 8.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, client.ApiClient, io.StringIO]]:
    tmp = tmp_path_factory.mktemp("k3s")
    log = io.StringIO()
    handle = serve(server_config(tmp), env=env(), log_stream=log)
    api = api_client(handle.kubeconfig)
    yield handle, api, log
    api.close()
    handle.stop()
    assert TOKEN not in log.getvalue()


@pytest.fixture
def api(cluster: tuple[ServerHandle, client.ApiClient, io.StringIO]) -> client.ApiClient:
    return cluster[1]


@pytest.fixture
def dyn(api: client.ApiClient, tmp_path: Path) -> DynamicClient:
    return DynamicClient(api, cache_file=str(tmp_path / "discovery.json"))


def deployment(name: str, replicas: int = 1, image: str = "nginx:1.27") -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "web", "image": image}]}}}}


# --- validation against kubernetes-validate's schemas ----------------------------------------------------


@pytest.mark.parametrize("doc", [
    deployment("ok"),
    {**deployment("unknown"), "spec": {**deployment("unknown")["spec"], "replicaz": 1}},
    {**deployment("type"), "spec": {**deployment("type")["spec"], "replicas": "two"}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
     "spec": {"ports": [{"port": 80, "targetPort": "http"}, {"port": 81, "targetPort": 8081}]}},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": "80"}]}},
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [
        {"name": "c", "image": "i", "resources": {"limits": {"cpu": "100m", "memory": 64}}}]}},
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"image": "i"}]}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": 1}},
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "labelz": {}}},
    {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "i"}, "spec": {"rules": [
        {"host": "a.example", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {
            "service": {"name": "s", "port": {"number": 80}}}}]}}]}},
], ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_schema_walker_agrees_with_kubernetes_validate(doc: dict[str, Any]) -> None:
    """The stand-in evaluates kubernetes-validate's bundled schemas itself; it must judge as the library does."""
    import kubernetes_validate

    from homelab.lab.k3s_standin import resources, schemas

    rt = next(r for r in resources.BUILTIN if r.kind == doc["kind"] and r.api_version == doc["apiVersion"])
    node = schemas.BuiltinSchemas((1, 33)).kind(rt)
    assert node is not None
    node.root = True
    ours = schemas.validate(json.loads(json.dumps(doc)), node, prune=False, defaults=False)
    try:
        kubernetes_validate.validate(doc, "1.33", strict=True)
        theirs_ok = True
    except kubernetes_validate.ValidationError:
        theirs_ok = False
    assert (not ours.errors and not ours.unknown) == theirs_ok, (ours, theirs_ok)


# --- server basics -----------------------------------------------------------------------------------


def test_kubeconfig_files_and_tokens(cluster: tuple[ServerHandle, client.ApiClient, io.StringIO]) -> None:
    handle = cluster[0]
    kubeconfig = yaml.safe_load(handle.kubeconfig.read_text())
    assert kubeconfig["clusters"][0]["name"] == "default"
    assert kubeconfig["clusters"][0]["cluster"]["server"] == f"https://127.0.0.1:{handle.port}"
    assert "token" in kubeconfig["users"][0]["user"]
    assert handle.kubeconfig.stat().st_mode & 0o777 == 0o640
    server_dir = handle.data_dir / "server"
    assert (server_dir / "admin-token").stat().st_mode & 0o777 == 0o600
    token_text = (server_dir / "node-token").read_text().strip()
    assert token_text.startswith("K10") and token_text.endswith(f"::server:{TOKEN}")
    assert (server_dir / "db" / "state.json").exists()
    assert (server_dir / "tls" / "server-ca.crt").read_bytes() == urllib.request.urlopen(
        urllib.request.Request(f"https://127.0.0.1:{handle.port}/cacerts"),
        context=__import__("ssl").create_default_context(cafile=str(handle.ca_file))).read()


def test_unauthenticated_requests_get_401(cluster: tuple[ServerHandle, client.ApiClient, io.StringIO]) -> None:
    handle = cluster[0]
    for token in (None, "wrong-token"):
        configuration = client.Configuration()
        config.load_kube_config(config_file=str(handle.kubeconfig), client_configuration=configuration)
        configuration.refresh_api_key_hook = None  # it would put the kubeconfig's token back
        configuration.api_key = {"BearerToken": f"Bearer {token}"} if token else {}
        with client.ApiClient(configuration) as anon, pytest.raises(ApiException) as err:
            client.CoreV1Api(anon).list_namespace()
        assert err.value.status == 401
        assert status_of(err.value)["reason"] == "Unauthorized"


def test_cluster_token_is_accepted(cluster: tuple[ServerHandle, client.ApiClient, io.StringIO]) -> None:
    handle = cluster[0]
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(handle.kubeconfig), client_configuration=configuration)
    configuration.refresh_api_key_hook = None
    configuration.api_key = {"BearerToken": f"Bearer {TOKEN}"}
    with client.ApiClient(configuration) as agent_client:
        assert client.CoreV1Api(agent_client).read_node("ichigo").metadata.name == "ichigo"


def test_version_and_discovery(api: client.ApiClient, dyn: DynamicClient) -> None:
    info = client.VersionApi(api).get_code()
    assert info.git_version == k3s_standin.read_version()
    deploy = dyn.resources.get(api_version="apps/v1", kind="Deployment")
    assert deploy.namespaced and "patch" in deploy.verbs and deploy.short_names == ["deploy"]
    assert "status" in deploy.subresources
    pods = dyn.resources.get(api_version="v1", kind="Pod")
    assert {"status", "eviction"} <= set(pods.subresources)
    for api_version, kind in [("batch/v1", "Job"), ("networking.k8s.io/v1", "Ingress"),
                              ("networking.k8s.io/v1", "IngressClass"), ("rbac.authorization.k8s.io/v1", "ClusterRole"),
                              ("storage.k8s.io/v1", "StorageClass"), ("policy/v1", "PodDisruptionBudget"),
                              ("coordination.k8s.io/v1", "Lease"), ("discovery.k8s.io/v1", "EndpointSlice"),
                              ("apiextensions.k8s.io/v1", "CustomResourceDefinition"), ("v1", "PersistentVolume"),
                              ("v1", "Event"), ("apps/v1", "StatefulSet"), ("apps/v1", "DaemonSet")]:
        assert dyn.resources.get(api_version=api_version, kind=kind).kind == kind
    groups = {g.name for g in client.ApisApi(api).get_api_versions().groups}
    assert {"apps", "batch", "networking.k8s.io", "apiextensions.k8s.io", "discovery.k8s.io"} <= groups
    resources = {r.name for r in client.CoreV1Api(api).get_api_resources().resources}
    assert {"namespaces", "nodes", "pods", "pods/eviction", "services/status", "configmaps", "secrets",
            "persistentvolumeclaims/status", "events"} <= resources


def test_builtin_objects(cluster: tuple[ServerHandle, client.ApiClient, io.StringIO]) -> None:
    handle, api, _ = cluster
    v1 = client.CoreV1Api(api)
    assert {"default", "kube-system", "kube-public", "kube-node-lease"} <= {
        n.metadata.name for n in v1.list_namespace().items}
    svc = v1.read_namespaced_service("kubernetes", "default")
    assert svc.spec.cluster_ip == "10.43.0.1"
    # 443 -> 6443 in K3s; here the server listens on a free port, and that is what the service points at
    assert (svc.spec.ports[0].port, svc.spec.ports[0].target_port) == (443, handle.port)
    endpoints = v1.read_namespaced_endpoints("kubernetes", "default")
    assert endpoints.subsets[0].addresses[0].ip == "127.0.0.1"
    assert endpoints.subsets[0].ports[0].port == handle.port
    eps = client.DiscoveryV1Api(api).read_namespaced_endpoint_slice("kubernetes", "default")
    assert eps.endpoints[0].addresses == ["127.0.0.1"]
    assert v1.read_namespaced_service_account("default", "default").metadata.name == "default"
    assert "BEGIN CERTIFICATE" in v1.read_namespaced_config_map("kube-root-ca.crt", "kube-system").data["ca.crt"]


def test_server_node(api: client.ApiClient) -> None:
    node = client.CoreV1Api(api).read_node("ichigo")
    labels = node.metadata.labels
    assert labels["node-role.kubernetes.io/control-plane"] == "true"
    assert labels["node-role.kubernetes.io/master"] == "true"
    assert labels["kubernetes.io/hostname"] == "ichigo" and labels["kubernetes.io/os"] == "linux"
    assert labels["node.kubernetes.io/instance-type"] == "k3s"
    assert {(a.type, a.address) for a in node.status.addresses} == {("InternalIP", "127.0.0.1"),
                                                                     ("Hostname", "ichigo")}
    assert node.status.node_info.kubelet_version == k3s_standin.read_version()
    assert ipaddress.ip_network(node.spec.pod_cidr).subnet_of(ipaddress.ip_network("10.42.0.0/16"))
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    assert ready.status == "True"
    args = json.loads(node.metadata.annotations["k3s.io/node-args"])
    assert "servicelb" in args and TOKEN not in args


# --- CRUD and errors ---------------------------------------------------------------------------------


def test_configmap_crud_and_errors(api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    body = {"metadata": {"name": "settings", "labels": {"app": "demo"}}, "data": {"mode": "fast"}}
    created = v1.create_namespaced_config_map("default", body)
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.managed_fields[0].operation == "Update"
    with pytest.raises(ApiException) as err:
        v1.create_namespaced_config_map("default", body)
    assert err.value.status == 409 and status_of(err.value)["reason"] == "AlreadyExists"

    got = v1.read_namespaced_config_map("settings", "default")
    got.data["mode"] = "slow"
    replaced = v1.replace_namespaced_config_map("settings", "default", got)
    assert replaced.data == {"mode": "slow"}
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version)
    got.metadata.resource_version = created.metadata.resource_version  # stale
    with pytest.raises(ApiException) as err:
        v1.replace_namespaced_config_map("settings", "default", got)
    assert err.value.status == 409 and status_of(err.value)["reason"] == "Conflict"

    patched = v1.patch_namespaced_config_map("settings", "default", {"data": {"extra": "1"}},
                                             _content_type="application/merge-patch+json")
    assert patched.data == {"mode": "slow", "extra": "1"}
    patched = v1.patch_namespaced_config_map("settings", "default", [
        {"op": "remove", "path": "/data/extra"}], _content_type="application/json-patch+json")
    assert patched.data == {"mode": "slow"}

    deleted = v1.delete_namespaced_config_map("settings", "default")
    assert deleted["status"] == "Success"
    with pytest.raises(ApiException) as err:
        v1.read_namespaced_config_map("settings", "default")
    assert err.value.status == 404
    status = status_of(err.value)
    assert status["reason"] == "NotFound" and status["message"] == 'configmaps "settings" not found'
    with pytest.raises(ApiException) as err:
        v1.create_namespaced_config_map("no-such-namespace", {"metadata": {"name": "x"}})
    assert err.value.status == 404


def test_schema_validation_errors(api: client.ApiClient, dyn: DynamicClient) -> None:
    # The typed client (pydantic models) refuses bodies without required fields before sending them,
    # so invalid objects go through the DynamicClient, as raw dicts.
    deployments = dyn.resources.get(api_version="apps/v1", kind="Deployment")
    broken = deployment("broken")
    del broken["spec"]["selector"]
    with pytest.raises(ApiException) as err:
        deployments.create(body=broken, namespace="default")
    assert err.value.status == 422
    status = status_of(err.value)
    assert status["reason"] == "Invalid"
    assert status["message"].startswith('Deployment.apps "broken" is invalid: ')
    assert {c["field"] for c in status["details"]["causes"]} >= {"spec.selector"}
    assert status["details"]["causes"][0]["reason"] == "FieldValueRequired"

    nameless = deployment("nameless")
    del nameless["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ApiException) as err:
        deployments.create(body=nameless, namespace="default")
    assert err.value.status == 422
    assert "spec.template.spec.containers[0].name" in {c["field"] for c in status_of(err.value)["details"]["causes"]}

    mismatch = deployment("mismatch")
    mismatch["spec"]["selector"]["matchLabels"] = {"app": "other"}
    with pytest.raises(ApiException) as err:
        deployments.create(body=mismatch, namespace="default")
    assert err.value.status == 422
    assert status_of(err.value)["details"]["causes"][0]["field"] == "spec.template.metadata.labels"

    with pytest.raises(ApiException) as err:
        client.CoreV1Api(api).create_namespaced_service("default", {
            "metadata": {"name": "bad-type"}, "spec": {"type": "Sideways", "ports": [{"port": 80}]}})
    assert err.value.status == 422
    assert status_of(err.value)["details"]["causes"][0]["reason"] == "FieldValueNotSupported"

    typo = deployment("typo")
    typo["spec"]["replicaz"] = 2
    with pytest.raises(ApiException) as err:
        deployments.create(body=typo, namespace="default")
    assert err.value.status == 400  # strict field validation: unknown fields are a BadRequest
    assert 'unknown field "spec.replicaz"' in status_of(err.value)["message"]
    wrong_type = deployment("wrong-type")
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(ApiException) as err:
        deployments.create(body=wrong_type, namespace="default")
    assert err.value.status == 400 and status_of(err.value)["reason"] == "BadRequest"
    lenient = deployments.create(body=typo, namespace="default", query_params=[("fieldValidation", "Ignore")])
    assert "replicaz" not in lenient.to_dict()["spec"]

    with pytest.raises(ApiException) as err:
        client.CoreV1Api(api).create_namespaced_config_map("default", {"metadata": {"name": "Not_Valid"}})
    assert err.value.status == 422 and status_of(err.value)["details"]["causes"][0]["field"] == "metadata.name"


def test_namespace_and_deployment_crud(api: client.ApiClient) -> None:
    v1, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    ns = v1.create_namespace({"metadata": {"name": "web"}})
    assert ns.status.phase == "Active" and ns.metadata.labels["kubernetes.io/metadata.name"] == "web"
    wait_for("the default service account", lambda: v1.read_namespaced_service_account("default", "web"))
    created = apps.create_namespaced_deployment("web", deployment("site", replicas=2))
    assert created.metadata.generation == 1
    assert created.status is not None and created.status.replicas is None  # `status: {}` as from the API server
    assert created.spec.strategy.type == "RollingUpdate"  # defaulted as the apiserver does
    assert created.spec.template.spec.containers[0].image_pull_policy == "IfNotPresent"
    scaled = apps.patch_namespaced_deployment("site", "web", {"spec": {"replicas": 3}})
    assert scaled.spec.replicas == 3 and scaled.metadata.generation == 2
    labelled = apps.patch_namespaced_deployment("site", "web", {"metadata": {"labels": {"tier": "front"}}})
    assert labelled.metadata.generation == 2  # metadata changes do not bump the generation
    # strategic merge patch: containers merge by name
    patched = apps.patch_namespaced_deployment("site", "web", {"spec": {"template": {"spec": {"containers": [
        {"name": "sidecar", "image": "busybox:1.36"}]}}}})
    assert [c.name for c in patched.spec.template.spec.containers] == ["web", "sidecar"]
    # status changes through the main resource are ignored; /status takes them
    ignored = apps.patch_namespaced_deployment("site", "web", {"status": {"replicas": 7}},
                                               _content_type="application/merge-patch+json")
    assert ignored.status.replicas != 7
    with_status = apps.patch_namespaced_deployment_status("site", "web", {"status": {"replicas": 3,
                                                                                     "readyReplicas": 3}},
                                                          _content_type="application/merge-patch+json")
    assert with_status.status.ready_replicas == 3 and with_status.metadata.generation == 3
    assert apps.read_namespaced_deployment_status("site", "web").status.replicas == 3

    v1.delete_namespace("web")
    with pytest.raises(ApiException) as err:
        apps.read_namespaced_deployment("site", "web")
    assert err.value.status == 404
    with pytest.raises(ApiException) as err:
        v1.delete_namespace("kube-system")
    assert err.value.status == 403


def test_selectors(api: client.ApiClient) -> None:
    v1 = client.CoreV1Api(api)
    v1.create_namespace({"metadata": {"name": "sel"}})
    for name, labels in [("a", {"app": "web", "tier": "front"}), ("b", {"app": "web", "tier": "back"}),
                         ("c", {"app": "db"}), ("d", {})]:
        v1.create_namespaced_config_map("sel", {"metadata": {"name": name, "labels": labels}})

    def names(**kw: Any) -> list[str]:
        result = v1.list_namespaced_config_map("sel", **kw)
        assert int(result.metadata.resource_version) > 0
        return sorted(i.metadata.name for i in result.items if i.metadata.name != "kube-root-ca.crt")

    assert names(label_selector="app=web") == ["a", "b"]
    assert names(label_selector="app==web,tier!=back") == ["a"]
    assert names(label_selector="app in (web, db)") == ["a", "b", "c"]
    assert names(label_selector="app notin (web)") == ["c", "d"]
    assert names(label_selector="tier") == ["a", "b"]
    assert names(label_selector="!tier,app") == ["c"]
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(field_selector="metadata.name!=c", label_selector="app") == ["a", "b"]
    all_ns = v1.list_config_map_for_all_namespaces(field_selector="metadata.namespace=sel", label_selector="app")
    assert len(all_ns.items) == 3
    page = v1.list_namespaced_config_map("sel", limit=2)
    assert len(page.items) == 2 and page.metadata._continue
    rest = v1.list_namespaced_config_map("sel", limit=10, _continue=page.metadata._continue)
    assert len(rest.items) == 3
    with pytest.raises(ApiException) as err:
        v1.list_namespaced_config_map("sel", field_selector="data.x=1")
    assert err.value.status == 400

    v1.create_namespaced_pod("sel", {"metadata": {"name": "p1"}, "spec": {
        "nodeName": "ichigo", "containers": [{"name": "c", "image": "busybox"}]}})
    pods = v1.list_pod_for_all_namespaces(field_selector="spec.nodeName=ichigo,status.phase=Pending")
    assert [p.metadata.name for p in pods.items] == ["p1"]
    v1.create_namespaced_pod_eviction("p1", "sel", {"apiVersion": "policy/v1", "kind": "Eviction",
                                                   "metadata": {"name": "p1", "namespace": "sel"}})
    assert v1.list_namespaced_pod("sel").items == []


# --- server-side apply --------------------------------------------------------------------------------


def test_server_side_apply(api: client.ApiClient, dyn: DynamicClient) -> None:
    cms = dyn.resources.get(api_version="v1", kind="ConfigMap")
    desired = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied", "namespace": "default",
                                                                    "labels": {"owner": "layer"}},
               "data": {"a": "1", "b": "2"}}
    first = cms.server_side_apply(body=desired, field_manager="homelab")
    assert first.to_dict()["data"] == {"a": "1", "b": "2"}
    entry = first.to_dict()["metadata"]["managedFields"][0]
    assert (entry["manager"], entry["operation"]) == ("homelab", "Apply")
    assert entry["fieldsV1"]["f:data"] == {".": {}, "f:a": {}, "f:b": {}}
    again = cms.server_side_apply(body=desired, field_manager="homelab")
    assert again.metadata.resourceVersion == first.metadata.resourceVersion  # nothing changed, nothing written

    # another manager that sets a field to a different value conflicts ...
    other = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "applied", "namespace": "default"},
             "data": {"a": "changed"}}
    with pytest.raises(ApiException) as err:
        cms.server_side_apply(body=other, field_manager="intruder")
    assert err.value.status == 409
    status = status_of(err.value)
    assert status["reason"] == "Conflict"
    assert status["details"]["causes"] == [{"reason": "FieldManagerConflict", "message": 'conflict with "homelab"',
                                           "field": ".data.a"}]
    # ... sharing a field with the same value does not; force takes the field over
    shared = cms.server_side_apply(body={**other, "data": {"b": "2"}}, field_manager="sharer")
    assert shared.to_dict()["data"] == {"a": "1", "b": "2"}
    forced = cms.server_side_apply(body=other, field_manager="intruder", force_conflicts=True)
    assert forced.data["a"] == "changed"
    owners = {e["manager"]: e["fieldsV1"] for e in forced.to_dict()["metadata"]["managedFields"]}
    assert "f:a" not in owners["homelab"]["f:data"] and "f:a" in owners["intruder"]["f:data"]

    # fields a manager stops applying go away, unless someone else owns them
    trimmed = cms.server_side_apply(body={**desired, "data": {}}, field_manager="homelab")
    assert trimmed.to_dict()["data"] == {"a": "changed", "b": "2"}  # a: intruder's, b: shared with "sharer"
    trimmed = cms.server_side_apply(body={**desired, "metadata": {"name": "applied", "namespace": "default"},
                                          "data": {}}, field_manager="homelab")
    assert not (trimmed.metadata.labels or {}).get("owner")

    # typed client, apply of a Deployment: create, then change one field
    apps = client.AppsV1Api(api)
    made = apps.patch_namespaced_deployment("applied", "default", deployment("applied"), field_manager="homelab",
                                            _content_type="application/apply-patch+yaml")
    assert made.metadata.generation == 1
    changed = apps.patch_namespaced_deployment("applied", "default", deployment("applied", image="nginx:1.28"),
                                               field_manager="homelab", _content_type="application/apply-patch+yaml")
    assert changed.spec.template.spec.containers[0].image == "nginx:1.28" and changed.metadata.generation == 2
    with pytest.raises(ApiException) as err:
        apps.patch_namespaced_deployment("applied", "default", deployment("applied", replicas=5),
                                         field_manager="someone-else", _content_type="application/apply-patch+yaml")
    assert err.value.status == 409
    assert status_of(err.value)["details"]["causes"][0]["field"] == ".spec.replicas"
    with pytest.raises(ApiException) as err:
        apps.patch_namespaced_deployment("applied", "default", deployment("applied"),
                                         _content_type="application/apply-patch+yaml")
    assert err.value.status == 422  # fieldManager is required for apply


# --- CRDs ----------------------------------------------------------------------------------------------


WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.lab.example.com"},
    "spec": {"group": "lab.example.com", "scope": "Namespaced",
             "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
             "versions": [{"name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
                           "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                               "spec": {"type": "object", "required": ["size"], "properties": {
                                   "size": {"type": "integer", "minimum": 1},
                                   "color": {"type": "string", "enum": ["red", "blue"], "default": "red"}}},
                               "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}}}}]},
}


def test_custom_resources(api: client.ApiClient, dyn: DynamicClient) -> None:
    ext = client.ApiextensionsV1Api(api)
    crd = ext.create_custom_resource_definition(WIDGET_CRD)
    conditions = {c.type: c.status for c in crd.status.conditions}
    assert conditions == {"Established": "True", "NamesAccepted": "True"}
    custom = client.CustomObjectsApi(api)
    group, version, plural = "lab.example.com", "v1", "widgets"
    made = custom.create_namespaced_custom_object(group, version, "default", plural, {
        "apiVersion": "lab.example.com/v1", "kind": "Widget", "metadata": {"name": "w1"},
        "spec": {"size": 2}, "status": {"ready": True}})
    assert made["spec"] == {"size": 2, "color": "red"}  # defaulted from the schema
    assert "status" not in made  # a status subresource: create ignores status
    assert made["metadata"]["generation"] == 1

    status = custom.patch_namespaced_custom_object_status(group, version, "default", plural, "w1",
                                                          {"status": {"ready": True}})
    assert status["status"] == {"ready": True} and status["metadata"]["generation"] == 1
    updated = custom.patch_namespaced_custom_object(group, version, "default", plural, "w1", {"spec": {"size": 3}})
    assert updated["spec"]["size"] == 3 and updated["metadata"]["generation"] == 2

    for bad, field in [({"size": "big"}, "spec.size"), ({}, "spec.size"), ({"size": 0}, "spec.size"),
                       ({"size": 1, "color": "green"}, "spec.color")]:
        with pytest.raises(ApiException) as err:
            custom.create_namespaced_custom_object(group, version, "default", plural, {
                "apiVersion": "lab.example.com/v1", "kind": "Widget", "metadata": {"name": "bad"}, "spec": bad})
        assert err.value.status == 422, bad
        assert status_of(err.value)["details"]["causes"][0]["field"] == field
    with pytest.raises(ApiException) as err:  # unknown fields: rejected under strict field validation ...
        custom.create_namespaced_custom_object(group, version, "default", plural, {
            "apiVersion": "lab.example.com/v1", "kind": "Widget", "metadata": {"name": "w2"},
            "spec": {"size": 1, "shape": "round"}})
    assert err.value.status == 400 and 'unknown field "spec.shape"' in status_of(err.value)["message"]
    pruned = custom.create_namespaced_custom_object(group, version, "default", plural, {  # ... pruned otherwise
        "apiVersion": "lab.example.com/v1", "kind": "Widget", "metadata": {"name": "w2"},
        "spec": {"size": 1, "shape": "round"}}, field_validation="Ignore")
    assert pruned["spec"] == {"size": 1, "color": "red"}

    widgets = dyn.resources.get(api_version="lab.example.com/v1", kind="Widget")
    assert widgets.short_names == ["wd"]
    assert sorted(w.metadata.name for w in widgets.get(namespace="default").items) == ["w1", "w2"]
    applied = widgets.server_side_apply(body={"apiVersion": "lab.example.com/v1", "kind": "Widget",
                                              "metadata": {"name": "w3", "namespace": "default"},
                                              "spec": {"size": 5}}, field_manager="homelab")
    assert applied.spec.size == 5
    widgets.delete(name="w3", namespace="default")
    with pytest.raises(ApiException) as err:
        custom.get_namespaced_custom_object(group, version, "default", plural, "w3")
    assert err.value.status == 404

    ext.delete_custom_resource_definition("widgets.lab.example.com")
    with pytest.raises(ApiException) as err:
        custom.list_namespaced_custom_object(group, version, "default", plural)
    assert err.value.status == 404


def test_watch_streams_changes(api: client.ApiClient) -> None:
    from kubernetes import watch

    v1 = client.CoreV1Api(api)
    start = v1.list_namespaced_config_map("default").metadata.resource_version
    v1.create_namespaced_config_map("default", {"metadata": {"name": "watched"}})
    v1.patch_namespaced_config_map("watched", "default", {"data": {"x": "1"}})
    v1.delete_namespaced_config_map("watched", "default")
    seen = []
    for event in watch.Watch().stream(v1.list_namespaced_config_map, "default", resource_version=start,
                                      timeout_seconds=1):
        seen.append((event["type"], event["object"].metadata.name))
    assert seen == [("ADDED", "watched"), ("MODIFIED", "watched"), ("DELETED", "watched")]


# --- restarts and agents -------------------------------------------------------------------------------


def test_state_survives_restart(tmp_path: Path) -> None:
    log = io.StringIO()
    handle = serve(server_config(tmp_path), env=env(), log_stream=log)
    try:
        with api_client(handle.kubeconfig) as api:
            v1 = client.CoreV1Api(api)
            v1.create_namespace({"metadata": {"name": "keep"}})
            cm = v1.create_namespaced_config_map("keep", {"metadata": {"name": "kept"}, "data": {"k": "v"}})
            ca = handle.ca_file.read_bytes()
            node_cidr = v1.read_node("ichigo").spec.pod_cidr
    finally:
        handle.stop()
    handle = serve(server_config(tmp_path), env=env(), log_stream=log)
    try:
        assert handle.ca_file.read_bytes() == ca
        with api_client(handle.kubeconfig) as api:
            v1 = client.CoreV1Api(api)
            again = v1.read_namespaced_config_map("kept", "keep")
            assert again.metadata.uid == cm.metadata.uid and again.data == {"k": "v"}
            assert v1.read_node("ichigo").spec.pod_cidr == node_cidr
            assert int(v1.list_namespace().metadata.resource_version) > int(cm.metadata.resource_version)
    finally:
        handle.stop()
    assert TOKEN not in log.getvalue()


def test_changed_token_is_refused_after_first_start(tmp_path: Path) -> None:
    handle = serve(server_config(tmp_path), env=env(), log_stream=io.StringIO())
    handle.stop()
    with pytest.raises(k3s_standin.server.StartupError, match="different token"):
        serve(server_config(tmp_path, token="another-token"), env=env(), log_stream=io.StringIO())


def _ready(v1: client.CoreV1Api, name: str) -> str:
    node = v1.read_node(name)
    return next(c.status for c in node.status.conditions if c.type == "Ready")


def test_agents_register_and_go_not_ready(cluster: tuple[ServerHandle, client.ApiClient, io.StringIO],
                                          tmp_path: Path) -> None:
    handle, api, _ = cluster
    v1 = client.CoreV1Api(api)
    logs = io.StringIO()
    secure_token = (handle.data_dir / "server" / "token").read_text().strip()
    agents = []
    for name, ip, token in [("suika", "127.0.0.2", secure_token), ("kiwi", "127.0.0.3", TOKEN)]:
        agents.append(start_agent({"server": f"https://127.0.0.1:{handle.port}", "token": token,
                                   "node-name": name, "node-ip": ip, "data-dir": str(tmp_path / name),
                                   "node-label": ["homelab/role=worker"],
                                   "node-taint": ["dedicated=apps:NoSchedule"]}, env=env(), log_stream=logs))
    try:
        for agent in agents:
            assert agent.wait_registered(10), logs.getvalue()
        cidrs = set()
        for name, ip in [("suika", "127.0.0.2"), ("kiwi", "127.0.0.3")]:
            node = v1.read_node(name)
            assert ("InternalIP", ip) in {(a.type, a.address) for a in node.status.addresses}
            assert node.metadata.labels["homelab/role"] == "worker"
            assert node.metadata.labels["kubernetes.io/hostname"] == name
            assert "node-role.kubernetes.io/control-plane" not in node.metadata.labels
            assert [(t.key, t.value, t.effect) for t in node.spec.taints] == [("dedicated", "apps", "NoSchedule")]
            cidr = ipaddress.ip_network(node.spec.pod_cidr)
            assert cidr.prefixlen == 24 and cidr.subnet_of(ipaddress.ip_network("10.42.0.0/16"))
            cidrs.add(cidr)
            assert _ready(v1, name) == "True"
        assert len(cidrs) == 2 and ipaddress.ip_network(v1.read_node("ichigo").spec.pod_cidr) not in cidrs
        assert (tmp_path / "suika" / "agent" / "server-ca.crt").read_bytes() == handle.ca_file.read_bytes()
        lease = client.CoordinationV1Api(api).read_namespaced_lease("suika", "kube-node-lease")
        assert lease.spec.holder_identity == "suika"
    finally:
        agents[0].stop()
    wait_for("suika to turn NotReady", lambda: _ready(v1, "suika") == "Unknown", timeout=10)
    node = v1.read_node("suika")
    ready = next(c for c in node.status.conditions if c.type == "Ready")
    assert ready.reason == "NodeStatusUnknown"
    assert "node.kubernetes.io/unreachable" in {t.key for t in node.spec.taints}
    assert _ready(v1, "kiwi") == "True"  # still beating
    assert _ready(v1, "ichigo") == "True"
    agents[1].stop()
    assert TOKEN not in logs.getvalue() and secure_token not in logs.getvalue()


def test_agent_refuses_a_server_with_another_ca(cluster: tuple[ServerHandle, client.ApiClient, io.StringIO],
                                                tmp_path: Path) -> None:
    handle = cluster[0]
    logs = io.StringIO()
    bad = "K10" + "0" * 64 + "::server:" + TOKEN
    agent = start_agent({"server": f"https://127.0.0.1:{handle.port}", "token": bad, "node-name": "mallory",
                         "node-ip": "127.0.0.9", "data-dir": str(tmp_path)}, env=env(), log_stream=logs)
    try:
        wait_for("the CA hash complaint", lambda: "CA hash" in logs.getvalue())
        assert not agent.wait_registered(0.1)
    finally:
        agent.stop()
    assert TOKEN not in logs.getvalue()


# --- the command line ------------------------------------------------------------------------------------


def test_version_cli_of_a_release_copy(tmp_path: Path) -> None:
    """The package runs on its own (python3 -m k3s_standin) and reads VERSION from its release."""
    shutil.copytree(PACKAGE_DIR, tmp_path / "k3s_standin", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "k3s_standin" / "VERSION").write_text("v1.33.5+k3s1\n")
    for flag in ("--version", "-v"):
        out = subprocess.run([sys.executable, "-m", "k3s_standin", flag], cwd=tmp_path, capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
        assert out.stdout == "k3s version v1.33.5+k3s1 (stand-in)\n"


def test_server_cli_with_config_file(tmp_path: Path) -> None:
    import socket

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(15)
    shutil.copytree(PACKAGE_DIR, tmp_path / "pkg" / "k3s_standin", ignore=shutil.ignore_patterns("__pycache__"))
    cfg = server_config(tmp_path)
    cfg["unknown-setting"] = "x"
    cfg["flannel-backend"] = "none"  # a real K3s key the stand-in has no use for
    del cfg["token"]
    (tmp_path / "token").write_text(TOKEN + "\n")
    cfg["token-file"] = str(tmp_path / "token")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "config.yaml.d").mkdir()
    (tmp_path / "config.yaml.d" / "10-extra.yaml").write_text("node-label+:\n  - extra=yes\n")
    proc = subprocess.Popen([sys.executable, "-m", "k3s_standin", "server", "--config", str(tmp_path / "config.yaml")],
                            cwd=tmp_path / "pkg", stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "pkg"),
                                 "NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        assert notify.recv(64) == b"READY=1"  # K3s's server unit is Type=notify
        wait_for("the kubeconfig", lambda: (tmp_path / "k3s.yaml").exists() and
                 "server:" in (tmp_path / "k3s.yaml").read_text(), timeout=15)
        with api_client(tmp_path / "k3s.yaml") as api:
            node = wait_for("the node", lambda: client.CoreV1Api(api).read_node("ichigo"))
            assert node.metadata.labels["extra"] == "yes"
    finally:
        notify.close()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 0, stderr
    assert 'level=warning msg="Unknown flag --unknown-setting found in config.yaml, skipping"' in stderr
    assert "flannel-backend" not in stderr
    assert "k3s is up and running" in stderr and TOKEN not in stderr


def test_unknown_command_fails() -> None:
    out = subprocess.run([sys.executable, "-m", "homelab.lab.k3s_standin", "ctr"], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 1 and "not provided by the stand-in" in out.stderr


def test_openapi_is_not_served(cluster: tuple[ServerHandle, client.ApiClient, io.StringIO]) -> None:
    handle = cluster[0]
    admin = yaml.safe_load(handle.kubeconfig.read_text())["users"][0]["user"]["token"]
    request = urllib.request.Request(f"https://127.0.0.1:{handle.port}/openapi/v2",
                                     headers={"Authorization": f"Bearer {admin}"})
    import ssl

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(handle.ca_file)))
    assert err.value.code == 404

"""The k3s stand-in's generic controllers (HelmChart, LoadBalancer IPAM, cert-manager Certificates, PVCs),
driven through the official kubernetes client against an in-process server."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from homelab.lab.k3s_standin import ServerHandle, serve

from .polling import wait_for

LbCalls = list[tuple[str, str, bool]]


def crd(group: str, version: str, plural: str, kind: str, namespaced: bool = True) -> dict[str, Any]:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {"group": group, "scope": "Namespaced" if namespaced else "Cluster",
                     "names": {"plural": plural, "kind": kind, "singular": kind.lower()},
                     "versions": [{"name": version, "served": True, "storage": True, "subresources": {"status": {}},
                                   "schema": {"openAPIV3Schema": {"type": "object",
                                                                  "x-kubernetes-preserve-unknown-fields": True}}}]}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, client.ApiClient, LbCalls]]:
    tmp = tmp_path_factory.mktemp("k3sctl")
    calls: LbCalls = []
    handle = serve({"data-dir": str(tmp / "data"), "https-listen-port": 0, "bind-address": "127.0.0.1",
                    "node-ip": "127.0.0.1", "node-name": "ctl", "write-kubeconfig": str(tmp / "k3s.yaml"),
                    "token": "controllers-test-token"},
                   env={"K3S_STANDIN_ANNOUNCE": "0"}, on_lb_change=lambda ip, svc, up: calls.append((ip, svc, up)))
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(handle.kubeconfig), client_configuration=configuration)
    api = client.ApiClient(configuration)
    ext = client.ApiextensionsV1Api(api)
    for body in (crd("metallb.io", "v1beta1", "ipaddresspools", "IPAddressPool"),
                 crd("cert-manager.io", "v1", "certificates", "Certificate"),
                 crd("cert-manager.io", "v1", "clusterissuers", "ClusterIssuer", namespaced=False),
                 crd("cert-manager.io", "v1", "issuers", "Issuer")):
        ext.create_custom_resource_definition(body)
    yield handle, api, calls
    api.close()
    handle.stop()


@pytest.fixture
def api(cluster: tuple[ServerHandle, client.ApiClient, LbCalls]) -> client.ApiClient:
    return cluster[1]


def events_for(api: client.ApiClient, namespace: str, name: str) -> list[tuple[str, str]]:
    items = client.CoreV1Api(api).list_namespaced_event(namespace).items
    return [(e.reason, e.message) for e in items if e.involved_object.name == name]


# --- HelmChart ---------------------------------------------------------------------------------------------


def test_helm_crds_are_registered_at_start(api: client.ApiClient) -> None:
    names = {c.metadata.name for c in client.ApiextensionsV1Api(api).list_custom_resource_definition().items}
    assert {"helmcharts.helm.cattle.io", "helmchartconfigs.helm.cattle.io"} <= names


def test_helmchart_installs_a_release_and_deletion_removes_it(api: client.ApiClient) -> None:
    co, core, apps, batch = client.CustomObjectsApi(api), client.CoreV1Api(api), client.AppsV1Api(api), \
        client.BatchV1Api(api)
    core.create_namespace({"metadata": {"name": "web"}})
    co.create_namespaced_custom_object("helm.cattle.io", "v1", "kube-system", "helmcharts", {
        "apiVersion": "helm.cattle.io/v1", "kind": "HelmChart", "metadata": {"name": "podinfo"},
        "spec": {"chart": "podinfo/podinfo", "version": "6.7.0", "targetNamespace": "web",
                 "valuesContent": "service:\n  type: ClusterIP\n  annotations:\n    a: b\n",
                 "set": {"service.port": "9898"}}})
    co.create_namespaced_custom_object("helm.cattle.io", "v1", "kube-system", "helmchartconfigs", {
        "apiVersion": "helm.cattle.io/v1", "kind": "HelmChartConfig", "metadata": {"name": "podinfo"},
        "spec": {"valuesContent": "service:\n  annotations:\n    extra: from-config\n"}})
    job = wait_for("install job", lambda: (j := batch.read_namespaced_job("helm-install-podinfo", "kube-system"))
                   .status and j.status.succeeded == 1 and j)
    assert any(c.type == "Complete" and c.status == "True" for c in job.status.conditions)
    dep = wait_for("deployment", lambda: (d := apps.read_namespaced_deployment("podinfo", "web"))
                   .status.available_replicas and d)
    assert dep.status.ready_replicas == dep.status.replicas == dep.status.available_replicas == 1
    assert any(c.type == "Available" and c.status == "True" for c in dep.status.conditions)
    assert dep.metadata.labels["app.kubernetes.io/instance"] == "podinfo"
    assert dep.metadata.labels["helm.sh/chart"] == "podinfo-6.7.0"
    svc = wait_for("service annotations", lambda: (s := core.read_namespaced_service("podinfo", "web"))
                   .metadata.annotations.get("extra") == "from-config" and s)
    assert svc.spec.type == "ClusterIP" and svc.spec.ports[0].port == 9898
    assert svc.metadata.annotations["a"] == "b"
    chart = co.get_namespaced_custom_object("helm.cattle.io", "v1", "kube-system", "helmcharts", "podinfo")
    assert chart["status"]["jobName"] == "helm-install-podinfo"

    co.delete_namespaced_custom_object("helm.cattle.io", "v1", "kube-system", "helmcharts", "podinfo")

    def gone() -> bool:
        names = {d.metadata.name for d in apps.list_namespaced_deployment("web").items}
        names |= {s.metadata.name for s in core.list_namespaced_service("web").items}
        charts = co.list_namespaced_custom_object("helm.cattle.io", "v1", "kube-system", "helmcharts")["items"]
        return "podinfo" not in names and not any(c["metadata"]["name"] == "podinfo" for c in charts)

    wait_for("release removal", gone)
    jobs = {j.metadata.name for j in batch.list_namespaced_job("kube-system").items}
    assert not {"helm-install-podinfo", "helm-delete-podinfo"} & jobs


def test_helmchart_with_a_missing_target_namespace_fails(api: client.ApiClient) -> None:
    co = client.CustomObjectsApi(api)
    co.create_namespaced_custom_object("helm.cattle.io", "v1", "default", "helmcharts", {
        "apiVersion": "helm.cattle.io/v1", "kind": "HelmChart", "metadata": {"name": "lost"},
        "spec": {"chart": "x/lost", "targetNamespace": "nowhere"}})

    def failed() -> bool:
        chart = co.get_namespaced_custom_object("helm.cattle.io", "v1", "default", "helmcharts", "lost")
        return any(c["type"] == "Failed" and c["status"] == "True"
                   for c in (chart.get("status") or {}).get("conditions") or [])

    wait_for("Failed condition", failed)
    with pytest.raises(ApiException):
        client.AppsV1Api(api).read_namespaced_deployment("lost", "nowhere")


# --- LoadBalancer IPAM ---------------------------------------------------------------------------------------


def lb_service(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "annotations": annotations or {}},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}], "selector": {"app": name}}}


def lb_ip(core: client.CoreV1Api, name: str, namespace: str = "default") -> str | None:
    ingress = core.read_namespaced_service(name, namespace).status.load_balancer.ingress
    return ingress[0].ip if ingress else None


def test_loadbalancer_ipam(cluster: tuple[ServerHandle, client.ApiClient, LbCalls]) -> None:
    _, api, calls = cluster
    core, co = client.CoreV1Api(api), client.CustomObjectsApi(api)
    core.create_namespaced_service("default", lb_service("early"))
    wait_for("AllocationFailed without pools",
             lambda: any(r == "AllocationFailed" for r, _ in events_for(api, "default", "early")))
    assert lb_ip(core, "early") is None
    co.create_namespaced_custom_object("metallb.io", "v1beta1", "default", "ipaddresspools", {
        "apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool", "metadata": {"name": "pool"},
        "spec": {"addresses": ["192.0.2.10-192.0.2.11", "198.51.100.7/32"]}})
    co.create_namespaced_custom_object("metallb.io", "v1beta1", "default", "ipaddresspools", {
        "apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool", "metadata": {"name": "manual"},
        "spec": {"addresses": ["203.0.113.5"], "autoAssign": False}})
    assert wait_for("early gets an IP", lambda: lb_ip(core, "early")) == "192.0.2.10"
    core.create_namespaced_service("default", lb_service("wanted", {"metallb.io/loadBalancerIPs": "203.0.113.5"}))
    assert wait_for("requested IP", lambda: lb_ip(core, "wanted")) == "203.0.113.5"
    core.create_namespaced_service("default", lb_service("outside", {"metallb.io/loadBalancerIPs": "10.9.9.9"}))
    wait_for("not-allowed event", lambda: any("not allowed" in m for _, m in events_for(api, "default", "outside")))
    assert lb_ip(core, "outside") is None
    core.create_namespaced_service("default", lb_service("second"))
    core.create_namespaced_service("default", lb_service("third"))
    assert wait_for("second", lambda: lb_ip(core, "second")) == "192.0.2.11"
    assert wait_for("third", lambda: lb_ip(core, "third")) == "198.51.100.7"
    core.create_namespaced_service("default", lb_service("fourth"))
    wait_for("pool exhausted", lambda: any("no available IPs" in m for _, m in events_for(api, "default", "fourth")))
    assert wait_for("hook", lambda: ("203.0.113.5", "default/wanted", True) in calls)
    core.delete_namespaced_service("second", "default")
    assert wait_for("freed address reused", lambda: lb_ip(core, "fourth")) == "192.0.2.11"
    core.patch_namespaced_service("third", "default", {"spec": {"type": "ClusterIP"}})
    wait_for("type change releases", lambda: ("198.51.100.7", "default/third", False) in calls)
    assert lb_ip(core, "third") is None


# --- cert-manager Certificates --------------------------------------------------------------------------------


def test_certificate_is_issued_by_the_issuers_ca(cluster: tuple[ServerHandle, client.ApiClient, LbCalls]) -> None:
    handle, api, _ = cluster
    co, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    co.create_cluster_custom_object("cert-manager.io", "v1", "clusterissuers", {
        "apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer", "metadata": {"name": "le-staging"},
        "spec": {"acme": {"server": "https://acme-staging-v02.api.letsencrypt.org/directory"}}})
    cert = {"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "web"},
            "spec": {"secretName": "web-tls", "dnsNames": ["a.example.test"],
                     "issuerRef": {"name": "le-staging", "kind": "ClusterIssuer"}}}
    co.create_namespaced_custom_object("cert-manager.io", "v1", "default", "certificates", cert)

    def ready() -> dict[str, Any] | None:
        obj = co.get_namespaced_custom_object("cert-manager.io", "v1", "default", "certificates", "web")
        conds = (obj.get("status") or {}).get("conditions") or []
        return obj if any(c["type"] == "Ready" and c["status"] == "True" for c in conds) else None

    obj = wait_for("Ready certificate", ready, timeout=10)
    assert {"notBefore", "notAfter", "renewalTime"} <= set(obj["status"])
    secret = core.read_namespaced_secret("web-tls", "default")
    assert secret.type == "kubernetes.io/tls"
    assert secret.metadata.annotations["cert-manager.io/issuer-name"] == "le-staging"
    assert secret.metadata.annotations["cert-manager.io/issuer-kind"] == "ClusterIssuer"
    assert secret.metadata.annotations["cert-manager.io/alt-names"] == "a.example.test"
    leaf = x509.load_pem_x509_certificate(base64.b64decode(secret.data["tls.crt"]))
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret.data["ca.crt"]))
    ca_cn = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert ca_cn == "(STAGING) le-staging (homelab lab ACME)"
    assert leaf.issuer == ca.subject
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 90
    ctx = ssl.create_default_context(cafile=str(handle.ca_file))
    with urllib.request.urlopen(f"{handle.url}/standin/acme-roots", context=ctx, timeout=5) as resp:
        roots = json.loads(resp.read())
    assert roots["le-staging"].strip() == base64.b64decode(secret.data["ca.crt"]).decode().strip()

    co.patch_namespaced_custom_object("cert-manager.io", "v1", "default", "certificates", "web",
                                      {"spec": {"dnsNames": ["a.example.test", "b.example.test"]}})

    def reissued() -> bool:
        data = core.read_namespaced_secret("web-tls", "default").data["tls.crt"]
        new = x509.load_pem_x509_certificate(base64.b64decode(data))
        names = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return sorted(names.get_values_for_type(x509.DNSName)) == ["a.example.test", "b.example.test"]

    wait_for("re-issued for new names", reissued, timeout=10)


def test_certificate_with_a_missing_issuer_stays_pending(api: client.ApiClient) -> None:
    co, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    co.create_namespaced_custom_object("cert-manager.io", "v1", "default", "certificates", {
        "apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "orphan"},
        "spec": {"secretName": "orphan-tls", "dnsNames": ["o.example.test"],
                 "issuerRef": {"name": "nope", "kind": "ClusterIssuer"}}})

    def not_ready() -> bool:
        obj = co.get_namespaced_custom_object("cert-manager.io", "v1", "default", "certificates", "orphan")
        return any(c["type"] == "Ready" and c["status"] == "False"
                   for c in (obj.get("status") or {}).get("conditions") or [])

    wait_for("Ready=False", not_ready)
    with pytest.raises(ApiException):
        core.read_namespaced_secret("orphan-tls", "default")


# --- PersistentVolumeClaims ------------------------------------------------------------------------------------


def pvc(name: str, storage_class: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"storageClassName": storage_class, "accessModes": ["ReadWriteOnce"],
                                                 "resources": {"requests": {"storage": "1Gi"}}}}


def test_pvc_is_bound_when_its_provisioner_has_a_csidriver(api: client.ApiClient) -> None:
    core, storage = client.CoreV1Api(api), client.StorageV1Api(api)
    storage.create_storage_class({"metadata": {"name": "fast"}, "provisioner": "fast.csi.example"})
    core.create_namespaced_persistent_volume_claim("default", pvc("waiting", "fast"))
    wait_for("ExternalProvisioning event",
             lambda: any(r == "ExternalProvisioning" for r, _ in events_for(api, "default", "waiting")))
    assert core.read_namespaced_persistent_volume_claim("waiting", "default").status.phase == "Pending"
    core.create_namespaced_persistent_volume_claim("default", pvc("nosc", "missing"))
    wait_for("ProvisioningFailed event",
             lambda: any(r == "ProvisioningFailed" for r, _ in events_for(api, "default", "nosc")))

    storage.create_csi_driver({"metadata": {"name": "fast.csi.example"}, "spec": {}})
    claim = wait_for("Bound claim", lambda: (c := core.read_namespaced_persistent_volume_claim("waiting", "default"))
                     .status.phase == "Bound" and c)
    pv = core.read_persistent_volume(claim.spec.volume_name)
    assert pv.status.phase == "Bound" and pv.spec.claim_ref.name == "waiting"
    assert pv.spec.csi.driver == "fast.csi.example"
    core.delete_namespaced_persistent_volume_claim("waiting", "default")
    wait_for("PV deleted with its claim",
             lambda: claim.spec.volume_name not in {v.metadata.name for v in core.list_persistent_volume().items})


"""The k3s stand-in's ingress controller double: Traefik's LoadBalancer address answers HTTPS with the
certificate cert-manager issued and redirects HTTP, on 127.0.0.x in process."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from kubernetes import client, config

from homelab.lab import chartcrds
from homelab.lab.k3s_standin import ServerHandle, serve

from .polling import wait_for

LB_IP = "127.0.0.77"
HOSTS = ("app.int.jigga.xyz", "www.jigga.xyz")  # one test host under each domain
VALUES = f"""service:
  type: LoadBalancer
  annotations:
    metallb.io/loadBalancerIPs: "{LB_IP}"
ports:
  web:
    redirections:
      entryPoint:
        to: websecure
        scheme: https
        permanent: true
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, client.ApiClient]]:
    crds = [c for chart in ("metallb", "traefik", "cert-manager") for c in chartcrds.crds_for(chart)]
    if not crds:
        pytest.skip("no CRDs catalog (../shared/crd-schemas)")
    tmp = tmp_path_factory.mktemp("k3sing")
    charts = tmp / "charts"
    charts.mkdir()
    (charts / "ingress.json").write_bytes(chartcrds.ingress_index())
    handle = serve({"data-dir": str(tmp / "data"), "https-listen-port": 0, "bind-address": "127.0.0.1",
                    "node-ip": "127.0.0.1", "node-name": "ing", "write-kubeconfig": str(tmp / "k3s.yaml"),
                    "token": "ingress-test-token"},
                   env={"K3S_STANDIN_ANNOUNCE": "0", "K3S_STANDIN_CHARTS": str(charts)},
                   ingress_bind=lambda ip, _port: (ip, 0))
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(handle.kubeconfig), client_configuration=configuration)
    api = client.ApiClient(configuration)
    ext = client.ApiextensionsV1Api(api)
    for body in crds:
        ext.create_custom_resource_definition(body)
    yield handle, api
    api.close()
    handle.stop()


def _roots(handle: ServerHandle) -> dict[str, str]:
    ctx = ssl.create_default_context(cafile=str(handle.ca_file))
    with urllib.request.urlopen(f"{handle.url}/standin/acme-roots", context=ctx, timeout=5) as resp:
        return dict(json.loads(resp.read()))


def _https(port: int, host: str, ctx: ssl.SSLContext, path: str = "/") -> tuple[int, bytes, x509.Certificate]:
    raw = socket.create_connection((LB_IP, port), timeout=5)
    sock = ctx.wrap_socket(raw, server_hostname=host)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=5)
    conn.sock = sock
    conn.request("GET", path, headers={"Host": host})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body, x509.load_der_x509_certificate(der)


def test_traefik_address_serves_https_and_redirects_http(cluster: tuple[ServerHandle, client.ApiClient]) -> None:
    handle, api = cluster
    co, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": "metallb-system"}})
    co.create_namespaced_custom_object("metallb.io", "v1beta1", "metallb-system", "ipaddresspools", {
        "apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool", "metadata": {"name": "lab"},
        "spec": {"addresses": [f"{LB_IP}/32"]}})
    co.create_cluster_custom_object("cert-manager.io", "v1", "clusterissuers", {
        "apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer", "metadata": {"name": "letsencrypt"},
        "spec": {"acme": {"server": "https://acme-v02.api.letsencrypt.org/directory", "email": "lab@jigga.xyz",
                          "privateKeySecretRef": {"name": "letsencrypt-account"},
                          "solvers": [{"dns01": {"cloudflare": {"apiTokenSecretRef": {"name": "cf",
                                                                                      "key": "token"}}}}]}}})
    co.create_namespaced_custom_object("cert-manager.io", "v1", "kube-system", "certificates", {
        "apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "wildcard"},
        "spec": {"secretName": "wildcard-tls", "dnsNames": ["*.jigga.xyz", "*.int.jigga.xyz"],
                 "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}}})
    co.create_namespaced_custom_object("traefik.io", "v1alpha1", "kube-system", "tlsstores", {
        "apiVersion": "traefik.io/v1alpha1", "kind": "TLSStore", "metadata": {"name": "default"},
        "spec": {"defaultCertificate": {"secretName": "wildcard-tls"}}})
    core.create_namespaced_service("kube-system", {"metadata": {"name": "app"}, "spec": {
        "selector": {"app": "app"}, "ports": [{"name": "http", "port": 8080}]}})
    client.AppsV1Api(api).create_namespaced_deployment("kube-system", {
        "metadata": {"name": "app"}, "spec": {"selector": {"matchLabels": {"app": "app"}}, "template": {
            "metadata": {"labels": {"app": "app"}}, "spec": {"containers": [{"name": "app", "image": "app:1"}]}}}})
    client.NetworkingV1Api(api).create_namespaced_ingress("kube-system", {
        "metadata": {"name": "app"}, "spec": {
            "ingressClassName": "traefik",
            "tls": [{"hosts": ["app.int.jigga.xyz"], "secretName": "wildcard-tls"}],
            "rules": [{"host": "app.int.jigga.xyz", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {
                "service": {"name": "app", "port": {"number": 8080}}}}]}}]}})
    co.create_namespaced_custom_object("helm.cattle.io", "v1", "kube-system", "helmcharts", {
        "apiVersion": "helm.cattle.io/v1", "kind": "HelmChart", "metadata": {"name": "traefik"},
        "spec": {"repo": "https://traefik.github.io/charts", "chart": "traefik", "version": "37.3.0",
                 "targetNamespace": "kube-system", "valuesContent": VALUES}})

    wait_for("wildcard-tls", lambda: core.read_namespaced_secret("wildcard-tls", "kube-system"))
    https_port = wait_for("HTTPS listener", lambda: handle.ingress_port(LB_IP, 443))
    http_port = wait_for("HTTP listener", lambda: handle.ingress_port(LB_IP, 80))
    svc = core.read_namespaced_service("traefik", "kube-system")
    assert {(p.name, p.port) for p in svc.spec.ports} == {("web", 80), ("websecure", 443)}
    assert svc.status.load_balancer.ingress[0].ip == LB_IP

    ca_pem = _roots(handle)["letsencrypt"]
    ctx = ssl.create_default_context(cadata=ca_pem)  # verifies the chain and the host name
    for host in HOSTS:
        status, body, cert = _https(https_port, host, ctx, "/healthz")
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
        assert {"*.jigga.xyz", "*.int.jigga.xyz"} <= set(sans)
        if host == "app.int.jigga.xyz":
            assert status == 200
            doc = json.loads(body)
            assert doc["path"] == "/healthz" and doc["method"] == "GET"
            assert doc["service"] == {"namespace": "kube-system", "name": "app", "port": 8080}
        else:
            assert status == 404  # covered by the TLSStore's default certificate, but no rule

    # no SNI match at all: still the TLSStore default; an unknown host is 404
    loose = ssl.create_default_context(cadata=ca_pem)
    loose.check_hostname = False
    status, _, cert = _https(https_port, "nothing.example.org", loose)
    assert status == 404 and "letsencrypt" in cert.issuer.rfc4514_string()

    conn = http.client.HTTPConnection(LB_IP, http_port, timeout=5)
    conn.request("GET", "/some/path?x=1", headers={"Host": "app.int.jigga.xyz"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status in (301, 308)
    assert resp.getheader("Location") == "https://app.int.jigga.xyz/some/path?x=1"

    co.delete_namespaced_custom_object("helm.cattle.io", "v1", "kube-system", "helmcharts", "traefik")
    wait_for("listeners gone", lambda: handle.ingress_port(LB_IP, 443) is None
             and handle.ingress_port(LB_IP, 80) is None)
    for port in (https_port, http_port):
        with pytest.raises(OSError):
            socket.create_connection((LB_IP, port), timeout=2).close()


def test_chart_index_names_traefik_as_an_ingress_controller(tmp_path: Path) -> None:
    files = chartcrds.chart_files(tmp_path)  # no catalog here: the ingress index does not need one
    index = json.loads(files["charts/ingress.json"])
    assert index["traefik"]["http_port_name"] == "web" and index["traefik"]["https_port_name"] == "websecure"
    assert isinstance(json.loads(files["charts/traefik.json"]), list)


def test_wildcards_match_one_label() -> None:
    from homelab.lab.k3s_standin.ingress import host_matches

    assert host_matches("*.int.jigga.xyz", "app.int.jigga.xyz")
    assert not host_matches("*.int.jigga.xyz", "a.b.int.jigga.xyz")
    assert not host_matches("*.int.jigga.xyz", "int.jigga.xyz")
    assert host_matches("App.Jigga.xyz", "app.jigga.xyz.")

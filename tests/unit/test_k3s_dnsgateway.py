"""The k3s stand-in's k8s_gateway double: the k8s-gateway chart's LoadBalancer address answers DNS for Ingress
hosts with the ingress controller's address, on 127.0.0.x in process."""

from __future__ import annotations

from collections.abc import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from kubernetes import client, config

from homelab.lab import chartcrds
from homelab.lab.k3s_standin import ServerHandle, serve

from .polling import wait_for

TRAEFIK_IP, GATEWAY_IP = "127.0.0.87", "127.0.0.88"
ZONE = "int.jigga.xyz"
GATEWAY_VALUES = f"""domain: {ZONE}
ttl: 60
watchedResources: ["Ingress", "Service"]
service:
  type: LoadBalancer
  port: 53
  annotations:
    metallb.io/loadBalancerIPs: "{GATEWAY_IP}"
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, client.ApiClient]]:
    crds = chartcrds.crds_for("metallb")
    if not crds:
        pytest.skip("no CRDs catalog (../shared/crd-schemas)")
    tmp = tmp_path_factory.mktemp("k3sdns")
    charts = tmp / "charts"
    charts.mkdir()
    (charts / "ingress.json").write_bytes(chartcrds.ingress_index())
    handle = serve({"data-dir": str(tmp / "data"), "https-listen-port": 0, "bind-address": "127.0.0.1",
                    "node-ip": "127.0.0.1", "node-name": "dns", "write-kubeconfig": str(tmp / "k3s.yaml"),
                    "token": "dns-gateway-test-token"},
                   env={"K3S_STANDIN_ANNOUNCE": "0", "K3S_STANDIN_CHARTS": str(charts)},
                   ingress_bind=lambda ip, _port: (ip, 0))
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(handle.kubeconfig), client_configuration=configuration)
    api = client.ApiClient(configuration)
    for body in crds:
        client.ApiextensionsV1Api(api).create_custom_resource_definition(body)
    yield handle, api
    api.close()
    handle.stop()


def _port(handle: ServerHandle) -> int | None:
    controllers = handle._server.controllers
    return controllers.dnsgateway.bound.get((GATEWAY_IP, 53)) if controllers is not None else None


def _ask(port: int, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return (dns.query.tcp if tcp else dns.query.udp)(query, GATEWAY_IP, timeout=5, port=port)


def _a(answer: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in answer.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset)


def test_gateway_answers_ingress_hosts_with_the_ingress_address(cluster: tuple[ServerHandle,
                                                                                client.ApiClient]) -> None:
    handle, api = cluster
    co, core, net = client.CustomObjectsApi(api), client.CoreV1Api(api), client.NetworkingV1Api(api)
    core.create_namespace({"metadata": {"name": "metallb-system"}})
    co.create_namespaced_custom_object("metallb.io", "v1beta1", "metallb-system", "ipaddresspools", {
        "apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool", "metadata": {"name": "lab"},
        "spec": {"addresses": [f"{TRAEFIK_IP}/32", f"{GATEWAY_IP}/32"]}})
    for name, chart, values in (
            ("traefik", "traefik", f"service:\n  annotations:\n    metallb.io/loadBalancerIPs: \"{TRAEFIK_IP}\"\n"
                                   "  type: LoadBalancer\n"),
            ("k8s-gateway", "k8s-gateway", GATEWAY_VALUES)):
        co.create_namespaced_custom_object("helm.cattle.io", "v1", "kube-system", "helmcharts", {
            "apiVersion": "helm.cattle.io/v1", "kind": "HelmChart", "metadata": {"name": name},
            "spec": {"chart": chart, "version": "2.4.0" if chart == "k8s-gateway" else "37.3.0",
                     "targetNamespace": "kube-system", "valuesContent": values}})
    core.create_namespaced_service("default", {"metadata": {"name": "grafana"}, "spec": {
        "selector": {"app": "grafana"}, "ports": [{"name": "http", "port": 80}]}})
    net.create_namespaced_ingress("default", {"metadata": {"name": "grafana"}, "spec": {
        "ingressClassName": "traefik",
        "rules": [{"host": f"grafana.{ZONE}", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {
            "service": {"name": "grafana", "port": {"number": 80}}}}]}},
                  {"host": "grafana.jigga.xyz", "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": {
                      "service": {"name": "grafana", "port": {"number": 80}}}}]}}]}})

    port = wait_for("the DNS listener", lambda: _port(handle))
    answer = wait_for("grafana's A record", lambda: (a := _ask(port, f"grafana.{ZONE}")) and _a(a) and a)
    assert _a(answer) == [TRAEFIK_IP]  # no Ingress status: what Traefik publishes, its LB address
    assert answer.flags & dns.flags.AA and answer.answer[0].ttl == 60
    assert _a(_ask(port, f"GRAFANA.{ZONE}", tcp=True)) == [TRAEFIK_IP]
    assert _ask(port, f"grafana.{ZONE}", "AAAA").rcode() == dns.rcode.NOERROR
    missing = _ask(port, f"nothing.{ZONE}")
    assert missing.rcode() == dns.rcode.NXDOMAIN and missing.authority[0].rdtype == dns.rdatatype.SOA
    assert _ask(port, "grafana.jigga.xyz").rcode() == dns.rcode.REFUSED  # outside the domain
    soa = _ask(port, ZONE, "SOA")
    assert soa.rcode() == dns.rcode.NOERROR and soa.answer[0].rdtype == dns.rdatatype.SOA
    ns = _ask(port, ZONE, "NS")
    ns_name = ns.answer[0][0].to_text()
    assert ns_name == f"k8s-gateway.kube-system.{ZONE}."
    assert _a(_ask(port, ns_name)) == [GATEWAY_IP]
    assert _a(_ask(port, f"traefik.kube-system.{ZONE}")) == [TRAEFIK_IP]  # LoadBalancer Services too

    # the Ingress's own status wins, as k8s_gateway reads status.loadBalancer.ingress
    net.patch_namespaced_ingress_status("grafana", "default", {"status": {"loadBalancer": {
        "ingress": [{"ip": "127.0.0.99"}]}}})
    wait_for("the status address", lambda: _a(_ask(port, f"grafana.{ZONE}")) == ["127.0.0.99"])

    net.delete_namespaced_ingress("grafana", "default")
    wait_for("NXDOMAIN after the Ingress went",
             lambda: _ask(port, f"grafana.{ZONE}").rcode() == dns.rcode.NXDOMAIN)

    co.delete_namespaced_custom_object("helm.cattle.io", "v1", "kube-system", "helmcharts", "k8s-gateway")
    wait_for("the DNS listener to close", lambda: _port(handle) is None)

"""The cluster through its API: nodes Ready at the inventory's addresses, pod CIDRs, the kubernetes Service,
every HelmChart the manifests declare installed, Argo CD's Applications Synced and Healthy."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from homelab import inventory, live

from .conftest import Live, fail_unless

pytestmark = pytest.mark.k3s


def _node(homelab: Live, vm: inventory.Vm) -> dict[str, Any]:
    nodes = homelab.items("v1", "Node")
    found = next((n for n in nodes if n["metadata"]["name"] == vm.name), None)
    fail_unless(found is not None, f"the cluster has no node {vm.name} (nodes: "
                                   f"{live.listing(n['metadata']['name'] for n in nodes) or 'none'}); see "
                                   f"`journalctl -u {'k3s' if vm.role == 'server' else 'k3s-agent'}` on {vm.name}")
    assert found is not None
    return found


def test_node_ready_with_inventory_ip(homelab: Live, vm: inventory.Vm, measured: Any) -> None:
    node = _node(homelab, vm)
    ready = live.condition(node, "Ready") or {}
    ips = [a.get("address") for a in (node.get("status") or {}).get("addresses") or [] if a.get("type") == "InternalIP"]
    measured(f"Ready={ready.get('status', '?')}, InternalIP {live.listing(ips) or 'none'}")
    fail_unless(ready.get("status") == "True",
                f"node {vm.name} is Ready={ready.get('status', 'unknown')} ({ready.get('reason') or 'no reason'}: "
                f"{ready.get('message') or ''}), expected Ready=True; see `kubectl describe node {vm.name}`")
    fail_unless(ips == [str(vm.address)],
                live.mismatch(f"node {vm.name}'s InternalIP", ips, vm.address,
                              "node-ip in /etc/rancher/k3s/config.yaml (invoke k3s.plan)"))


def test_pod_cidr_inside_pod_network(homelab: Live, inv: inventory.Inventory, vm: inventory.Vm, measured: Any) -> None:
    node = _node(homelab, vm)
    cidrs = list((node.get("spec") or {}).get("podCIDRs") or [])
    measured(live.listing(cidrs) or "none")
    pods = inv.network.pod_cidr
    fail_unless(bool(cidrs), f"node {vm.name} has no podCIDR, expected one inside {pods}; see cluster-cidr in "
                             "/etc/rancher/k3s/config.yaml on the control plane")
    outside = [c for c in cidrs if not ipaddress.ip_network(c).subnet_of(pods)]  # type: ignore[arg-type]
    fail_unless(not outside, f"node {vm.name}'s podCIDRs {live.listing(outside)} are outside the pod network {pods} "
                             "(network.pod_cidr); see cluster-cidr in /etc/rancher/k3s/config.yaml")
    others = {c: n["metadata"]["name"] for n in homelab.items("v1", "Node") if n["metadata"]["name"] != vm.name
              for c in (n.get("spec") or {}).get("podCIDRs") or []}
    shared = [f"{c} (also {others[o]})" for c in cidrs for o in others
              if ipaddress.ip_network(c).overlaps(ipaddress.ip_network(o))]
    fail_unless(not shared, f"node {vm.name}'s podCIDRs overlap another node's: {live.listing(shared)}; each node "
                            "needs its own; see `kubectl get nodes -o wide`")


def test_kubernetes_service_address(homelab: Live, inv: inventory.Inventory, measured: Any) -> None:
    service = homelab.get("/api/v1/namespaces/default/services/kubernetes")
    fail_unless(service is not None, "the Service default/kubernetes does not exist; see the API server's log")
    address = (service.get("spec") or {}).get("clusterIP")
    want = str(inv.network.service_cidr[1])
    measured(address)
    fail_unless(address == want, live.mismatch("the kubernetes Service's clusterIP", address, want,
                                               "service-cidr in /etc/rancher/k3s/config.yaml",
                                               source=f"the service network {inv.network.service_cidr} puts it at"))


def test_helmchart_installed(homelab: Live, helmchart: dict[str, Any], measured: Any) -> None:
    meta = helmchart["metadata"]
    charts = homelab.items("helm.cattle.io/v1", "HelmChart")
    chart = next((c for c in charts if c["metadata"]["name"] == meta["name"]
                  and c["metadata"].get("namespace") == meta["namespace"]), None)
    job_name = ((chart or {}).get("status") or {}).get("jobName") or f"helm-install-{meta['name']}"
    job = next((j for j in homelab.items("batch/v1", "Job")
                if j["metadata"]["name"] == job_name and j["metadata"].get("namespace") == meta["namespace"]), None)
    spec = (chart or {}).get("spec") or {}
    measured(f"{spec.get('chart')} {spec.get('version')}, job "
             + ("absent" if job is None else "succeeded" if (job.get("status") or {}).get("succeeded") else "not done")
             if chart else "absent")
    problems = live.helmchart_problems(chart, job, helmchart)
    component = meta["labels"].get("homelab.jigga.xyz/component", meta["name"])
    fail_unless(not problems, f"HelmChart {meta['namespace']}/{meta['name']}: " + "; ".join(problems)
                + f"; expected chart {helmchart['spec'].get('chart')} {helmchart['spec'].get('version')} installed; "
                f"see manifests/{component} and `kubectl -n {meta['namespace']} logs job/{job_name}`")


def test_argocd_apps_synced_and_healthy(homelab: Live, measured: Any) -> None:
    declared = [o for o in homelab.rendered if o["kind"] == "Application"]
    apps = homelab.items("argoproj.io/v1alpha1", "Application")
    names = {(a["metadata"].get("namespace"), a["metadata"]["name"]) for a in apps}
    missing = [f"{o['metadata'].get('namespace')}/{o['metadata']['name']}" for o in declared
               if (o["metadata"].get("namespace"), o["metadata"]["name"]) not in names]
    measured(live.listing(f"{a['metadata']['name']}: {((a.get('status') or {}).get('sync') or {}).get('status')}/"
                          f"{((a.get('status') or {}).get('health') or {}).get('status')}" for a in apps) or "none")
    fail_unless(not missing, f"Argo CD has no Application {live.listing(missing)}, the manifests declare it; see "
                             "manifests/argocd and `invoke apps.plan`")
    problems = [p for a in apps for p in live.application_problems(a)]
    fail_unless(not problems, "; ".join(problems) + "; see `argocd app get <name>` or the Application's "
                                                     "status.conditions (gitops/apps)")

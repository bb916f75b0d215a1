"""The live suite's pure parts, offline: target choice and the CI refusal, pytest's argv, the report and its
counts, failure messages, the catalogue (markers, functions, ids) as collected, and the probes' judgements
against a local HTTPS server."""

from __future__ import annotations

import datetime
import http.server
import os
import re
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from homelab import inventory, live, manifests
from homelab.errors import ConfigError
from homelab.lab import pki

REPO = Path(__file__).resolve().parents[2]
INV = inventory.load()

# ------------------------------------------------------------------------------ target and task


def test_the_target_defaults_to_lab_and_follows_the_environment() -> None:
    assert live.choose_target(None, {}) == "lab"
    assert live.choose_target(None, {"HOMELAB_TARGET": "live"}) == "live"
    assert live.choose_target("lab", {"HOMELAB_TARGET": "live", "CI": "true"}) == "lab"
    with pytest.raises(ConfigError, match="unknown target 'prod'"):
        live.choose_target("prod", {})


@pytest.mark.parametrize("how", [{"flag": "live"}, {"flag": None, "HOMELAB_TARGET": "live"}])
def test_the_live_target_is_refused_under_ci_with_exit_code_2(how: dict[str, Any]) -> None:
    env = {"CI": "1", **{k: v for k, v in how.items() if k != "flag"}}
    with pytest.raises(ConfigError, match="refuses to run when CI is set") as caught:
        live.choose_target(how["flag"], env)
    assert caught.value.exit_code == 2


def test_invoke_test_live_refuses_the_live_target_under_ci() -> None:
    done = subprocess.run([sys.executable, "-m", "invoke", "test.live", "--target", "live"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "CI": "true"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refuses to run when CI is set" in done.stderr
    assert "test session starts" not in done.stdout  # refused before pytest ran


def test_invoke_test_live_help_explains_every_option() -> None:
    done = subprocess.run([sys.executable, "-m", "invoke", "test.live", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    for flag in ("--target", "--marker", "-k", "--junitxml", "--report", "--inventory", "CI", "after `--`"):
        assert flag in done.stdout, flag


def test_pytest_args_always_write_junit_and_the_report_and_keep_no_cache() -> None:
    args = live.pytest_args(target="lab")
    assert args[0] == str(REPO / "tests" / "live")
    assert f"--junitxml={REPO / 'reports' / 'live.xml'}" in args
    assert f"--live-report={REPO / 'reports' / 'live.md'}" in args
    assert "--live-target=lab" in args
    assert args[args.index("-p") + 1] == "no:cacheprovider"
    assert "-m" not in args and "-k" not in args


def test_pytest_args_pass_selections_paths_and_extra_options(tmp_path: Path) -> None:
    args = live.pytest_args(target="live", marker="dns or tls", k="naruto", junitxml=tmp_path / "j.xml",
                            report=tmp_path / "r.md", inventory=str(tmp_path / "inv.yaml"), extra=["-x", "--tb=line"])
    assert args[args.index("-m") + 1] == "dns or tls"
    assert args[args.index("-k") + 1] == "naruto"
    assert f"--junitxml={tmp_path / 'j.xml'}" in args and f"--live-report={tmp_path / 'r.md'}" in args
    assert f"--live-inventory={tmp_path / 'inv.yaml'}" in args
    assert args[-2:] == ["-x", "--tb=line"]


def test_remainder_is_what_follows_the_double_dash() -> None:
    assert live.remainder(["invoke", "test.live", "--target", "lab"]) == []
    assert live.remainder(["invoke", "test.live", "--", "-x", "--", "y"]) == ["-x", "--", "y"]


# ----------------------------------------------------------------------------------- messages


def test_a_mismatch_says_what_was_found_what_was_expected_and_where_to_look() -> None:
    assert live.mismatch("Traefik LoadBalancer", "192.168.7.231", "192.168.7.230", "manifests/traefik") == (
        "Traefik LoadBalancer is 192.168.7.231, the inventory says 192.168.7.230; see manifests/traefik")
    assert live.mismatch("pool", [], ["a", "b"], "x", source="the manifests say") == (
        "pool is (none), the manifests say a, b; see x")
    assert live.listing(range(10), limit=3) == "0, 1, 2 and 7 more"


# ------------------------------------------------------------------------------------- report


def _records() -> list[live.Record]:
    return [
        live.Record("tests/live/test_network.py::test_traefik_loadbalancer_address", "network", "passed",
                    "LoadBalancer 192.168.7.230"),
        live.Record("tests/live/test_proxmox.py::test_cluster_quorate", "proxmox", "failed", "no quorum",
                    "PVE cluster homelab has no quorum | 1 of 3\nsecond line"),
        live.Record("tests/live/test_access.py::test_subnet_routes_approved", "access", "skipped", "",
                    "the Tailscale API: TS_OAUTH_CLIENT_ID not set"),
        live.Record("tests/live/test_k3s.py::test_kubernetes_service_address", "k3s", "error", "",
                    "could not read what this check needs: the Kubernetes API does not answer"),
    ]


def test_the_report_has_one_line_per_check_grouped_by_layer_with_measured_values() -> None:
    started = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    text = live.render_report(_records(), target="lab", seconds=12.34, started=started)
    assert "Target **lab**, started 2026-01-02 03:04:05 UTC, 12.3 s." in text
    assert "**4 checks: 1 passed, 2 failed, 1 skipped.**" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "::" in line]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == ["proxmox", "k3s", "network", "access"]
    assert "| network | test_network.py::test_traefik_loadbalancer_address | LoadBalancer 192.168.7.230 | pass |" \
        in rows
    assert ("| proxmox | test_proxmox.py::test_cluster_quorate | no quorum | FAIL: PVE cluster homelab has no quorum "
            "\\| 1 of 3 |") in rows
    assert any(row.startswith("| k3s |") and "| - | ERROR: could not read" in row for row in rows)
    assert "| access | 0 | 0 | 1 |" in text
    failures = text.split("## Failures", 1)[1]
    assert "### test_proxmox.py::test_cluster_quorate" in failures and "second line" in failures
    assert "test_subnet_routes_approved" not in failures


def test_the_summary_counts_per_layer_and_errors_count_as_failed() -> None:
    lines = live.summary(_records())
    assert lines[0] == "live suite: 4 checks, 1 passed, 2 failed, 1 skipped"
    assert [line.split()[0] for line in lines[1:]] == ["proxmox", "k3s", "network", "access"]
    assert "failed=1" in next(line for line in lines if line.strip().startswith("k3s"))


def test_the_report_is_written_where_asked(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "live.md"
    live.write_report(path, "# x\n")
    assert path.read_text() == "# x\n"


def test_the_layer_is_the_first_layer_marker() -> None:
    assert live.layer_of(["parametrize", "monitoring", "apps"]) == "monitoring"
    assert live.layer_of(["parametrize"]) == "?"


# ------------------------------------------------------------------------------- the catalogue


class _Collector:
    def __init__(self) -> None:
        self.items: list[tuple[str, list[str]]] = []

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = [(item.nodeid, [m.name for m in item.iter_markers()]) for item in session.items]


@pytest.fixture(scope="module")
def collected() -> list[tuple[str, list[str]]]:
    """tests/live as pytest collects it, with --strict-markers (pyproject's addopts): nothing is contacted."""
    collector = _Collector()
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "live")],
                       plugins=[collector])
    assert code == 0
    return collector.items


def _catalogue() -> list[tuple[str, str, str]]:
    """(file, marker, function) rows of tests/live/CHECKS.md (blank cells repeat the row above)."""
    rows, file, marker = [], "", ""
    for line in (REPO / "tests" / "live" / "CHECKS.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[2].startswith("test_"):
            continue
        file, marker = cells[0] or file, cells[1] or marker
        rows.append((file, marker, cells[2]))
    return rows


def test_every_marker_is_registered_and_every_check_has_one_layer(collected: list[tuple[str, list[str]]]) -> None:
    assert len(collected) >= 60
    for nodeid, markers in collected:
        layers = [m for m in markers if m in live.MARKERS]
        assert len(layers) == 1, (nodeid, markers)


def test_the_collected_checks_are_the_catalogues(collected: list[tuple[str, list[str]]]) -> None:
    rows = _catalogue()
    assert len(rows) == 35
    found: dict[tuple[str, str], set[str]] = {}
    for nodeid, markers in collected:
        path, _, name = nodeid.partition("::")
        key = (Path(path).name, name.split("[")[0])
        found.setdefault(key, set()).update(m for m in markers if m in live.MARKERS)
    assert set(found) == {(file, function) for file, _, function in rows}
    for file, marker, function in rows:
        assert found[(file, function)] <= {m.strip() for m in marker.split("/")}, (file, function)


def _ids(collected: list[tuple[str, list[str]]], function: str) -> list[str]:
    return [re.sub(r".*\[(.*)\]$", r"\1", nodeid) for nodeid, _ in collected if f"::{function}[" in nodeid]


def test_parameters_are_the_inventorys_entities_by_name(collected: list[tuple[str, list[str]]]) -> None:
    vms = [vm.name for vm in INV.k3s.vms]
    named = [a for a in INV.apps if a.hostname]
    assert _ids(collected, "test_pve_node_online") == [n.name for n in INV.proxmox.nodes]
    for function in ("test_vm_running_on_its_node", "test_hostname", "test_node_ready_with_inventory_ip"):
        assert _ids(collected, function) == vms
    charts = [o["metadata"]["name"] for o in manifests.render(INV).objects if o["kind"] == "HelmChart"]
    assert _ids(collected, "test_helmchart_installed") == charts
    assert _ids(collected, "test_certificate") == [a.hostname for a in named]
    assert _ids(collected, "test_public_name_resolves_to_edge") == [a.hostname for a in named if a.access == "public"]
    assert _ids(collected, "test_internal_name_not_public") == [a.hostname for a in named if a.access == "internal"]
    assert sorted(_ids(collected, "test_app_health")) == sorted(a.name for a in named)
    workloads = _ids(collected, "test_workload_ready")
    assert "coredns" not in workloads and {"traefik", "vaultwarden", "grafana", "vault"} <= set(workloads)
    grafana = next(m for nodeid, m in collected if nodeid.endswith("test_app_health[grafana]"))
    assert "monitoring" in grafana and "apps" not in grafana


# ------------------------------------------------------------------------------- judgements


def test_wildcards_cover_one_label_only() -> None:
    assert live.name_matches("*.jigga.xyz", "passwords.jigga.xyz")
    assert not live.name_matches("*.jigga.xyz", "vault.int.jigga.xyz")
    assert not live.name_matches("*.jigga.xyz", "jigga.xyz")
    assert live.name_matches("jigga.xyz", "JIGGA.xyz.")


def _cert(issuer: str, org: str = "homelab lab") -> live.Certificate:
    return live.Certificate(subject="CN=x", issuer=f"CN={issuer},O={org}", issuer_cn=issuer, issuer_org=org,
                            names=("*.int.jigga.xyz", "int.jigga.xyz"),
                            not_after=datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=20, hours=1))


def test_the_expected_issuer_on_each_target() -> None:
    prod, stage = "letsencrypt-production", "letsencrypt-staging"
    assert live.issuer_problem(_cert(f"{prod} (homelab lab ACME)"), "lab", prod) is None
    assert "not by the lab's CA for" in str(live.issuer_problem(_cert(f"(STAGING) {stage} (homelab lab ACME)"),
                                                                 "lab", prod))
    assert live.issuer_problem(_cert(f"(STAGING) {stage} (homelab lab ACME)"), "lab", stage) is None
    assert live.issuer_problem(_cert("R12", "Let's Encrypt"), "live", prod) is None
    assert "not by Let's Encrypt production" in str(live.issuer_problem(
        _cert("(STAGING) Ersatz Edamame E1", "(STAGING) Let's Encrypt"), "live", prod))
    assert "needs Let's Encrypt production" in str(live.issuer_problem(_cert("R12", "Let's Encrypt"), "live", stage))
    assert _cert("x").days_left() == 20 and _cert("x").covers("vault.int.jigga.xyz")


def test_addresses_outside_the_edge() -> None:
    assert live.outside_edge(["203.0.113.20"], live.edge_networks("lab")) == []
    assert live.outside_edge(["104.21.3.4", "192.0.2.9"], live.edge_networks("live")) == ["192.0.2.9"]


def _helmchart(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "traefik", "namespace": "kube-system"},
            "spec": {"chart": "traefik", "version": "37.3.0", "targetNamespace": "kube-system"}, "status": status}


def test_a_helmchart_is_installed_when_its_job_completed_as_declared() -> None:
    desired = _helmchart()
    done = {"status": {"succeeded": 1}}
    assert live.helmchart_problems(_helmchart(jobName="helm-install-traefik"), done, desired) == []
    assert live.helmchart_problems(None, None, desired) == ["HelmChart traefik does not exist"]
    other = {**_helmchart(), "spec": {**_helmchart()["spec"], "version": "36.0.0"}}
    assert live.helmchart_problems(other, done, desired) == ["spec.version is '36.0.0', the manifests say '37.3.0'"]
    failed = _helmchart(conditions=[{"type": "Failed", "status": "True", "message": "namespaces \"x\" not found"}])
    assert "condition Failed" in live.helmchart_problems(failed, done, desired)[0]
    assert "has not completed" in live.helmchart_problems(_helmchart(), {"status": {"active": 1}}, desired)[0]
    assert "does not exist" in live.helmchart_problems(_helmchart(), None, desired)[0]


def _deployment(name: str, want: int, have: int, **labels: str) -> dict[str, Any]:
    return {"kind": "Deployment", "metadata": {"name": name, "namespace": "monitoring", "labels": labels},
            "spec": {"replicas": want}, "status": {"availableReplicas": have}}


def test_workload_state() -> None:
    assert live.workload_state(_deployment("a", 2, 2)) == (True, "Deployment monitoring/a 2/2 available")
    assert live.workload_state(_deployment("a", 2, 1))[0] is False
    assert live.workload_state(_deployment("a", 0, 0)) == (False, "Deployment monitoring/a 0/0 available (scaled to 0)")
    sts = {"kind": "StatefulSet", "metadata": {"name": "v", "namespace": "vault"}, "spec": {"replicas": 1},
           "status": {"readyReplicas": 0}}
    assert live.workload_state(sts) == (False, "StatefulSet vault/v 0/1 ready")
    ds = {"kind": "DaemonSet", "metadata": {"name": "s", "namespace": "m"},
          "status": {"desiredNumberScheduled": 3, "numberReady": 3}}
    assert live.workload_state(ds)[0] is True


def test_an_apps_workloads_by_release_name_or_declaration() -> None:
    release = _deployment("kube-prometheus-stack", 1, 1, **{live.INSTANCE: "kube-prometheus-stack"})
    grafana = _deployment("kps-grafana", 1, 1, **{live.INSTANCE: "kube-prometheus-stack", live.NAME: "grafana"})
    other = _deployment("loki", 1, 1, **{live.INSTANCE: "loki"})
    everything = [release, grafana, other]
    chosen, missing = live.app_workloads("grafana", "monitoring", "kube-prometheus-stack", [], everything)
    assert [w["metadata"]["name"] for w in chosen] == ["kps-grafana"] and missing == []
    chosen, _ = live.app_workloads("prometheus", "monitoring", "kube-prometheus-stack", [], [release, other])
    assert [w["metadata"]["name"] for w in chosen] == ["kube-prometheus-stack"]
    # Where the chart labels its parts, a missing part is missing: the release does not stand in for it.
    prometheus = _deployment("kps-prometheus", 1, 1, **{live.INSTANCE: "kube-prometheus-stack",
                                                         live.NAME: "prometheus"})
    chosen, missing = live.app_workloads("grafana", "monitoring", "kube-prometheus-stack", [],
                                         [release, prometheus, other])
    assert chosen == [] and missing == [f"a workload labelled {live.NAME}=grafana in monitoring "
                                        "(release kube-prometheus-stack)"]
    traefik = {**_deployment("traefik", 1, 1, **{live.INSTANCE: "traefik-monitoring"})}
    assert live.app_workloads("traefik", "monitoring", "traefik", [], [traefik])[0] == [traefik]
    loki = _deployment("loki", 1, 1, **{live.INSTANCE: "loki", live.NAME: "loki"})
    assert live.app_workloads("loki", "monitoring", "loki", [], [loki])[0] == [loki]  # once, though matched twice
    chosen, missing = live.app_workloads("homepage", "monitoring", None, [("Deployment", "homepage")], [other])
    assert chosen == [] and missing == ["Deployment monitoring/homepage"]


def test_argocd_applications_must_be_synced_and_healthy() -> None:
    app = {"metadata": {"namespace": "argocd", "name": "homelab"},
           "status": {"sync": {"status": "Synced"}, "health": {"status": "Healthy"}}}
    assert live.application_problems(app) == []
    assert live.application_problems({"metadata": {"namespace": "argocd", "name": "homelab"}}) == [
        "Application argocd/homelab sync status is (not set), expected Synced",
        "Application argocd/homelab health is (not set), expected Healthy"]


# ---------------------------------------------------------------------- probes, against 127.0.0.1


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """An HTTPS server on 127.0.0.1 with a certificate for app.example.test from a CA of its own: (port, CA)."""
    directory = tmp_path_factory.mktemp("https")
    ca_pem, ca_key = pki.make_ca(directory)
    pem, key = pki.issue(ca_pem, ca_key, directory, "app", ["app.example.test"], days=40)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"{self.headers['Host']} {self.path}".encode()
            self.send_response(200 if self.path == "/alive" else 503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pem, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], ca_pem
    server.shutdown()


def test_https_get_sends_the_name_and_checks_trust(https: tuple[int, Path]) -> None:
    port, ca = https
    ok = live.https_get("127.0.0.1", "app.example.test", "/alive", live.context(str(ca)), port=port)
    assert (ok.status, ok.body) == (200, "app.example.test /alive") and ok.certificate
    assert live.https_get("127.0.0.1", "app.example.test", "/", live.context(str(ca)), port=port).status == 503
    untrusted = live.https_get("127.0.0.1", "app.example.test", "/alive", live.context(True), port=port)
    assert untrusted.status is None and str(untrusted.error).startswith("TLS: unable to get local issuer")
    wrong = live.https_get("127.0.0.1", "other.example.test", "/alive", live.context(str(ca)), port=port)
    assert wrong.status is None and "other.example.test" in str(wrong.error)
    refused = live.https_get("127.0.0.1", "app.example.test", "/", live.context(str(ca)), port=1)
    assert refused.status is None and "cannot connect" in str(refused.error)


def test_the_presented_certificate_is_read_and_judged(https: tuple[int, Path]) -> None:
    port, ca = https
    der = live.presented("127.0.0.1", "app.example.test", port=port)
    assert isinstance(der, bytes)
    cert = live.parse_certificate(der)
    assert cert.names == ("app.example.test",) and cert.issuer_cn == "homelab lab CA"
    assert 38 <= cert.days_left() <= 40 and cert.covers("app.example.test") and not cert.covers("x.example.test")
    assert "not by the lab's CA for letsencrypt-production" in str(live.issuer_problem(cert, "lab",
                                                                                        "letsencrypt-production"))
    assert live.verify("127.0.0.1", "app.example.test", live.context(str(ca)), port=port) is None
    assert "Hostname mismatch" in str(live.verify("127.0.0.1", "x.example.test", live.context(str(ca)), port=port))
    assert isinstance(live.presented("127.0.0.1", "app.example.test", port=1), str)

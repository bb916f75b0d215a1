"""The network layer's manifests: they render from the inventory, validate offline, and carry its facts.

The validator is tested the other way too: a manifest with an unknown field (built-in kind and
custom resource), an unknown kind or a wrong type must fail, in the library and on the command line.
"""

from __future__ import annotations

import base64
import copy
import json
import subprocess
import sys
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import yaml

from homelab import inventory, manifests, validate
from homelab.inventory import Inventory

REPO = Path(__file__).resolve().parents[2]
TOKEN = "cf-token-unit-test-7f3a9c"
CEPH_KEY = "AQDunitTestKeyunitTestKeyunitTestKey0=="
FSID = "3f0c6a2e-1d4b-4c8e-9a7f-2b5d6e8f0a1c"


@pytest.fixture(scope="module")
def inv() -> Inventory:
    return inventory.load(REPO / "inventory" / "homelab.yaml")


@pytest.fixture(scope="module")
def full(inv: Inventory) -> manifests.RenderResult:
    return manifests.render(inv, secrets={"CLOUDFLARE_API_TOKEN": TOKEN, "HOMELAB_CEPH_CSI_KEY": CEPH_KEY,
                                          "GRAFANA_ADMIN_PASSWORD": "grafana-pw",
                                          "VAULTWARDEN_ADMIN_TOKEN": "vaultwarden-token"},
                            ceph_fsid=FSID)


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def values(chart: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(chart["spec"]["valuesContent"])
    return loaded


# ---------------------------------------------------------------------------- rendering


def test_every_component_renders_and_validates(full: manifests.RenderResult) -> None:
    assert set(full.by_component) == set(manifests.COMPONENTS)
    assert validate.validate_all(full.objects) == []
    kinds = {(o["kind"], o["metadata"]["name"]) for o in full.objects}
    assert {("Secret", "cloudflare-api-token"), ("Secret", "csi-rbd-secret"), ("StorageClass", "ceph-rbd"),
            ("IPAddressPool", "homelab"), ("L2Advertisement", "homelab"), ("ClusterIssuer", "letsencrypt-staging"),
            ("ClusterIssuer", "letsencrypt-production"), ("Certificate", "wildcard-jigga-xyz"),
            ("Certificate", "wildcard-int-jigga-xyz")} <= kinds


@pytest.mark.parametrize("component", manifests.COMPONENTS)
def test_each_component_alone(inv: Inventory, component: str) -> None:
    result = manifests.render(inv, component=component)
    assert result.objects
    assert set(result.by_component) == {component}
    assert validate.validate_all(result.objects) == []


def test_every_object_carries_the_labels(full: manifests.RenderResult) -> None:
    for component, objects in full.by_component.items():
        for obj in objects:
            labels = obj["metadata"]["labels"]
            assert labels[manifests.MANAGED_BY] == "homelab", obj
            assert labels[manifests.COMPONENT] == component, obj


def test_apply_order_namespaces_then_helmcharts_then_custom_resources(full: manifests.RenderResult) -> None:
    phases = [manifests.phase(o) for o in full.objects]
    assert phases == sorted(phases)
    kinds = [o["kind"] for o in full.objects]
    last_namespace = max(i for i, k in enumerate(kinds) if k == "Namespace")
    first_chart = kinds.index("HelmChart")
    last_chart = max(i for i, k in enumerate(kinds) if k == "HelmChart")
    assert last_namespace < first_chart
    for i, obj in enumerate(full.objects):
        if manifests.crd_group(obj):
            assert i > last_chart, obj["kind"]
    assert set(manifests.required_crds(full.objects)) == {
        "ipaddresspools.metallb.io", "l2advertisements.metallb.io", "tlsstores.traefik.io",
        "clusterissuers.cert-manager.io", "certificates.cert-manager.io", "applications.argoproj.io",
        "connectors.tailscale.com"}


def test_every_chart_is_pinned(full: manifests.RenderResult) -> None:
    charts = [o for o in full.objects if o["kind"] == "HelmChart"]
    # Every pinned chart is installed once; vaultwarden and homepage are plain Deployments, no chart.
    assert sorted(c["spec"]["chart"] for c in charts) == sorted(c.chart for c in manifests.CHARTS.values())
    for chart in charts:
        spec = chart["spec"]
        assert spec["repo"].startswith("https://")
        assert spec["version"][0].isdigit() or spec["version"].startswith("v")
        assert not any(c in spec["version"] for c in "*^~><x "), spec["version"]
    by_name = {c["metadata"]["name"]: c["spec"] for c in charts}
    assert by_name["metallb"]["targetNamespace"] == "metallb-system"
    assert by_name["traefik"]["targetNamespace"] == "kube-system"
    assert by_name["cert-manager"]["targetNamespace"] == "cert-manager"
    assert by_name["ceph-csi-rbd"]["targetNamespace"] == "ceph-csi-rbd"
    assert values({"spec": by_name["cert-manager"]})["crds"]["enabled"] is True


# ---------------------------------------------------------------------------- inventory facts


def test_pool_is_the_inventorys(inv: Inventory, full: manifests.RenderResult) -> None:
    pool = find(full.objects, "IPAddressPool", "homelab")
    assert pool["spec"]["addresses"] == inv.network.metallb_pool
    assert find(full.objects, "L2Advertisement", "homelab")["spec"]["ipAddressPools"] == ["homelab"]


def test_traefik_asks_for_its_address_inside_the_pool(inv: Inventory, full: manifests.RenderResult) -> None:
    chart = values(find(full.objects, "HelmChart", "traefik"))
    address = chart["service"]["annotations"]["metallb.io/loadBalancerIPs"]
    assert address == "192.168.7.230" == str(inv.network.traefik)
    assert chart["service"]["type"] == "LoadBalancer"
    assert any(first <= IPv4Address(address) <= last for first, last in inv.network.pool_ranges())
    redirect = chart["ports"]["web"]["redirections"]["entryPoint"]
    assert redirect == {"to": "websecure", "scheme": "https", "permanent": True}


def test_ceph_csi_uses_the_pve_hosts_and_the_pool(inv: Inventory, full: manifests.RenderResult) -> None:
    config = values(find(full.objects, "HelmChart", "ceph-csi-rbd"))["csiConfig"]
    assert config == [{"clusterID": FSID, "monitors": ["192.168.7.233:6789", "192.168.7.234:6789",
                                                         "192.168.7.235:6789"]}]
    sc = find(full.objects, "StorageClass", "ceph-rbd")
    assert sc["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    assert sc["provisioner"] == "rbd.csi.ceph.com"
    assert sc["parameters"]["pool"] == inv.proxmox.ceph.pool
    assert sc["parameters"]["clusterID"] == FSID
    assert sc["parameters"]["imageFeatures"] == "layering"
    assert sc["reclaimPolicy"] == "Delete"
    assert sc["allowVolumeExpansion"] is True
    secret = find(full.objects, "Secret", "csi-rbd-secret")
    assert base64.b64decode(secret["data"]["userID"]).decode() == "kubernetes"
    assert base64.b64decode(secret["data"]["userKey"]).decode() == CEPH_KEY


def test_wildcards_for_both_domains_in_kube_system(full: manifests.RenderResult) -> None:
    public = find(full.objects, "Certificate", "wildcard-jigga-xyz")
    internal = find(full.objects, "Certificate", "wildcard-int-jigga-xyz")
    assert public["spec"]["dnsNames"] == ["*.jigga.xyz", "jigga.xyz"]
    assert internal["spec"]["dnsNames"] == ["*.int.jigga.xyz", "int.jigga.xyz"]
    assert public["spec"]["secretName"] == "wildcard-jigga-xyz-tls"
    assert {public["metadata"]["namespace"], internal["metadata"]["namespace"]} == {"kube-system"}
    store = find(full.objects, "TLSStore", "default")
    assert store["spec"]["defaultCertificate"]["secretName"] == "wildcard-jigga-xyz-tls"


def test_issuers_solve_dns01_with_the_cloudflare_secret(full: manifests.RenderResult) -> None:
    for name, server in (("letsencrypt-staging", "https://acme-staging-v02.api.letsencrypt.org/directory"),
                         ("letsencrypt-production", "https://acme-v02.api.letsencrypt.org/directory")):
        acme = find(full.objects, "ClusterIssuer", name)["spec"]["acme"]
        assert acme["server"] == server
        ref = acme["solvers"][0]["dns01"]["cloudflare"]["apiTokenSecretRef"]
        assert ref == {"name": "cloudflare-api-token", "key": "api-token"}
    secret = find(full.objects, "Secret", "cloudflare-api-token")
    assert secret["metadata"]["namespace"] == "cert-manager"
    assert base64.b64decode(secret["data"]["api-token"]).decode() == TOKEN


def test_issuer_switch(inv: Inventory) -> None:
    for issuer in manifests.ISSUERS:
        objects = manifests.render(inv, component="cert-manager", issuer=issuer).objects
        refs = {o["spec"]["issuerRef"]["name"] for o in objects if o["kind"] == "Certificate"}
        assert refs == {issuer}
    with pytest.raises(manifests.ManifestError, match="unknown issuer"):
        manifests.render(inv, issuer="letsencrypt")


def test_acme_directory_override(inv: Inventory) -> None:
    acme = {"server": "https://acme.lab.test/dir", "staging_server": "https://acme.lab.test/staging",
            "email": "ops@jigga.xyz", "ca_bundle": base64.b64encode(b"PEM").decode()}
    objects = manifests.render(inv, component="cert-manager", acme=acme).objects
    prod = find(objects, "ClusterIssuer", "letsencrypt-production")["spec"]["acme"]
    staging = find(objects, "ClusterIssuer", "letsencrypt-staging")["spec"]["acme"]
    assert (prod["server"], staging["server"]) == (acme["server"], acme["staging_server"])
    assert prod["email"] == "ops@jigga.xyz" and prod["caBundle"] == acme["ca_bundle"]
    assert validate.validate_all(objects) == []
    with pytest.raises(manifests.ManifestError, match="unknown ACME"):
        manifests.render(inv, acme={"directory": "https://x"})
    with pytest.raises(manifests.ManifestError, match="not an https URL"):
        manifests.render(inv, acme={"server": "http://plain"})


# ---------------------------------------------------------------------------- secrets


def test_no_secret_without_a_value(inv: Inventory) -> None:
    result = manifests.render(inv)
    text = json.dumps(result.objects)
    assert not [o for o in result.objects if o["kind"] == "Secret"]
    for value in (TOKEN, CEPH_KEY):
        assert value not in text
        assert base64.b64encode(value.encode()).decode() not in text
    assert any("CLOUDFLARE_API_TOKEN is not set" in w for w in result.warnings)
    assert any("Ceph has no client.kubernetes yet" in w for w in result.warnings)
    assert any("placeholder" in w for w in result.warnings)


def test_secret_values_only_where_passed(inv: Inventory, full: manifests.RenderResult) -> None:
    token_b64 = base64.b64encode(TOKEN.encode()).decode()
    holders = [o for o in full.objects if token_b64 in json.dumps(o) or TOKEN in json.dumps(o)]
    assert [(o["kind"], o["metadata"]["name"]) for o in holders] == [("Secret", "cloudflare-api-token")]
    assert not [w for w in full.warnings if "not set" in w]


def test_secrets_from_env() -> None:
    env = {"CLOUDFLARE_API_TOKEN": "t", "HOMELAB_CEPH_CSI_KEY": "", "PATH": "/bin"}
    assert manifests.secrets_from_env(env) == {"CLOUDFLARE_API_TOKEN": "t"}


def test_no_secret_value_in_the_repository() -> None:
    for path in (REPO / "manifests").rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            assert "stringData" not in text
            if "kind: Secret" not in text:
                continue  # chart values name Secret keys (grafana.admin.userKey), never hold their values
            for line in text.splitlines():
                if any(key in line for key in ("api-token:", "userKey:", "admin-password:", "admin-token:")):
                    assert "{{" in line, f"{path}: {line}"


def test_values_cannot_change_the_structure(inv: Inventory) -> None:
    nasty = 'x"\nkind: Pod\n# '
    secret = find(manifests.render(inv, secrets={"CLOUDFLARE_API_TOKEN": nasty}).objects,
                  "Secret", "cloudflare-api-token")
    assert base64.b64decode(secret["data"]["api-token"]).decode() == nasty
    assert secret["kind"] == "Secret"


def test_bad_arguments(inv: Inventory) -> None:
    with pytest.raises(manifests.ManifestError, match="unknown component"):
        manifests.render(inv, component="flannel")
    with pytest.raises(manifests.ManifestError, match="not a UUID"):
        manifests.render(inv, ceph_fsid="abc")
    with pytest.raises(manifests.ManifestError, match="unknown secret"):
        manifests.render(inv, secrets={"CLOUDFLARE_TOKEN": "x"})


def test_duplicate_keys_in_a_template_are_refused() -> None:
    with pytest.raises(manifests.ManifestError, match="duplicate key 'name'"):
        manifests.load_documents("metadata:\n  name: a\n  name: b\n", "t.yaml")


# ---------------------------------------------------------------------------- the validator fails


CONFIGMAP = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default"},
             "data": {"k": "v"}}


def pool_of(full: manifests.RenderResult) -> dict[str, Any]:
    return copy.deepcopy(find(full.objects, "IPAddressPool", "homelab"))


def test_validator_accepts_a_plain_object() -> None:
    assert validate.validate(CONFIGMAP) == []


def test_validator_refuses_an_unknown_field_of_a_builtin_kind() -> None:
    bad = {**CONFIGMAP, "bogus": 1}
    assert any("'bogus' was unexpected" in p for p in validate.validate(bad))
    sc = {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "s"},
          "provisioner": "x", "parameters": {}, "reclaimPolicy": "Delete", "frobnicate": True}
    assert any("frobnicate" in p for p in validate.validate(sc))


def test_validator_refuses_an_unknown_field_of_a_custom_resource(full: manifests.RenderResult) -> None:
    bad = pool_of(full)
    bad["spec"]["autoassign"] = True  # a misspelling is the usual unknown field
    problems = validate.validate(bad)
    assert problems and all("spec" in p for p in problems)
    assert any("'autoassign' was unexpected" in p for p in problems)
    top = pool_of(full)
    top["specs"] = {}
    assert any("'specs' was unexpected" in p for p in validate.validate(top))
    meta = pool_of(full)
    meta["metadata"]["label"] = {"a": "b"}
    assert any("'label' was unexpected" in p for p in validate.validate(meta))
    chart = copy.deepcopy(find(full.objects, "HelmChart", "traefik"))
    chart["spec"]["values_content"] = "x"
    assert any("values_content" in p for p in validate.validate(chart))


def test_validator_refuses_a_wrong_type(full: manifests.RenderResult) -> None:
    bad = pool_of(full)
    bad["spec"]["autoAssign"] = "false"
    assert any("spec.autoAssign" in p and "boolean" in p for p in validate.validate(bad))
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
           "spec": {"ports": [{"port": "eighty"}]}}
    assert any("spec.ports[0].port" in p and "integer" in p for p in validate.validate(svc))
    labels = pool_of(full)
    labels["metadata"]["labels"]["n"] = 1
    assert any("metadata.labels.n" in p for p in validate.validate(labels))


def test_validator_refuses_an_unknown_kind() -> None:
    for obj in ({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
                {"apiVersion": "v1", "kind": "Widget", "metadata": {"name": "w"}},
                {"apiVersion": "metallb.io/v1", "kind": "IPAddressPool", "metadata": {"name": "w"}}):
        problems = validate.validate(obj)
        assert len(problems) == 1 and "unknown kind" in problems[0], problems


def test_validator_refuses_what_is_no_object() -> None:
    assert validate.validate(["a"]) == ["not an object but a list"]
    assert "apiVersion and kind" in validate.validate({"kind": "ConfigMap", "metadata": {"name": "x"}})[0]
    assert "metadata.name" in validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}})[0]


def test_validate_all_names_the_object(full: manifests.RenderResult) -> None:
    bad = pool_of(full)
    bad["spec"]["autoassign"] = True
    problems = validate.validate_all([*full.objects, bad])
    assert problems and all(p.startswith("IPAddressPool metallb-system/homelab (metallb.io/v1beta1): ")
                            for p in problems)


def test_shared_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOMELAB_SHARED", str(tmp_path))
    assert validate.shared_dir() == tmp_path
    monkeypatch.delenv("HOMELAB_SHARED")
    assert validate.shared_dir() == REPO.parent / "shared"


# ---------------------------------------------------------------------------- the command line


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "homelab.validate", *args], cwd=REPO, capture_output=True,
                          text=True, check=False, timeout=120)


def test_cli_passes_on_the_shipped_manifests() -> None:
    done = run_cli()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].endswith(" 0 problems")
    assert "placeholder-cloudflare-token" not in done.stdout


@pytest.mark.parametrize(("document", "expected"), [
    ({**CONFIGMAP, "bogus": 1}, "'bogus' was unexpected"),
    ({"apiVersion": "metallb.io/v1beta1", "kind": "IPAddressPool",
      "metadata": {"name": "p", "namespace": "metallb-system"},
      "spec": {"addresses": ["192.168.7.230/32"], "autoassign": True}}, "'autoassign' was unexpected"),
    ({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}, "unknown kind Widget"),
    ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": "80"}]}},
     "is not of type 'integer'"),
])
def test_cli_fails_on_a_bad_extra_manifest(tmp_path: Path, document: dict[str, Any], expected: str) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump_all([CONFIGMAP, document]), encoding="utf-8")
    done = run_cli("--extra", str(extra))
    assert done.returncode == 1, done.stdout + done.stderr
    problems = [line for line in done.stdout.splitlines() if expected in line]
    assert len(problems) == 1, done.stdout
    assert done.stdout.strip().splitlines()[-1].endswith(" 1 problem")


def test_the_inventory_chooses_the_issuer() -> None:
    import yaml as _yaml

    from homelab import inventory as _inventory
    from homelab import manifests as _manifests

    data = _yaml.safe_load(_inventory.DEFAULT_PATH.read_text(encoding="utf-8"))
    assert _inventory.load().network.cert_issuer == "letsencrypt-production"
    data["network"]["cert_issuer"] = "letsencrypt-staging"
    staging = _inventory.parse(_yaml.safe_dump(data), "staging.yaml")
    result = _manifests.render(staging, component="cert-manager", issuer=staging.network.cert_issuer)
    certs = [o for o in result.objects if o["kind"] == "Certificate"]
    assert certs and {c["spec"]["issuerRef"]["name"] for c in certs} == {"letsencrypt-staging"}

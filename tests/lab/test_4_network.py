"""The network layer on the lab: MetalLB, Traefik at 192.168.7.230, cert-manager, Ceph CSI, applied server-side."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from homelab.lab import layout
from homelab.wait import Silent, poll

from .conftest import INV, Lab, Result, invoke
from .test_3_k3s import in_lab

TO_NETWORK = ("--to", "network")

STATE = """
import base64, json
from cryptography import x509
from kubernetes import client, config
config.load_kube_config(context="homelab")
core = client.CoreV1Api()
out = {}
try:
    svc = core.read_namespaced_service("traefik", "kube-system")
    out["traefik"] = {"type": svc.spec.type, "ips": [i.ip for i in (svc.status.load_balancer.ingress or [])]}
except client.ApiException as exc:
    out["traefik"] = {"status": exc.status}
certs = {}
for name in ("wildcard-jigga-xyz-tls", "wildcard-int-jigga-xyz-tls"):
    try:
        secret = core.read_namespaced_secret(name, "kube-system")
    except client.ApiException:
        continue
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret.data["tls.crt"]))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    certs[name] = {"sans": sans, "issuer": cert.issuer.rfc4514_string(),
                   "annotation": (secret.metadata.annotations or {}).get("cert-manager.io/issuer-name")}
out["certs"] = certs
print(json.dumps(out))
"""


def answers(address: str, port: int) -> bool:
    """A TCP connection from inside the lab's namespace (the only place the address exists)."""
    done = subprocess.run(["ip", "netns", "exec", layout.NETNS, "nc", "-z", "-w", "3", address, str(port)],
                          capture_output=True, check=False, timeout=30)
    return done.returncode == 0


@pytest.fixture(scope="module")
def network(built: Lab) -> Iterator[Result]:
    result = invoke("up", *TO_NETWORK, timeout=900)
    assert result.code == 0, result.text
    built.timings["network cold"] = result.seconds
    yield result


def test_traefik_takes_the_inventorys_address_from_metallb(network: Result) -> None:
    state = in_lab(STATE)
    assert state["traefik"] == {"type": "LoadBalancer", "ips": [str(INV.network.traefik)]}
    # The address answers on the lab bridge (announced by the node, as MetalLB's L2 mode does).
    assert answers(str(INV.network.traefik), 22)


def test_wildcard_certificates_from_the_chosen_issuer(network: Result) -> None:
    certs = in_lab(STATE)["certs"]
    public = certs["wildcard-jigga-xyz-tls"]
    internal = certs["wildcard-int-jigga-xyz-tls"]
    assert set(public["sans"]) == {"jigga.xyz", "*.jigga.xyz"}
    assert set(internal["sans"]) == {"int.jigga.xyz", "*.int.jigga.xyz"}
    for cert in (public, internal):
        assert cert["annotation"] == "letsencrypt-production"
        assert "STAGING" not in cert["issuer"]


PVC = """
import json, time
from kubernetes import client, config
config.load_kube_config(context="homelab")
core = client.CoreV1Api()
body = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "lab-test-claim"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}
core.create_namespaced_persistent_volume_claim("default", body)
deadline = time.monotonic() + 60
phase, pvc = None, None
while time.monotonic() < deadline:
    pvc = core.read_namespaced_persistent_volume_claim("lab-test-claim", "default")
    phase = pvc.status.phase
    if phase == "Bound":
        break
    time.sleep(0.5)  # a poll with the deadline above
classes = [c.metadata.name for c in client.StorageV1Api().list_storage_class().items
           if (c.metadata.annotations or {}).get("storageclass.kubernetes.io/is-default-class") == "true"]
core.delete_namespaced_persistent_volume_claim("lab-test-claim", "default")
print(json.dumps({"phase": phase, "class": pvc.spec.storage_class_name, "defaults": classes}))
"""


def test_a_claim_binds_on_the_default_ceph_class(network: Result) -> None:
    result = in_lab(PVC)
    assert result == {"phase": "Bound", "class": "ceph-rbd", "defaults": ["ceph-rbd"]}


CSI_SECRET = """
import base64, json
from kubernetes import client, config
config.load_kube_config(context="homelab")
secret = client.CoreV1Api().read_namespaced_secret("csi-rbd-secret", "ceph-csi-rbd")
print(json.dumps({k: base64.b64decode(v).decode() for k, v in secret.data.items()}))
"""


def test_the_csi_secret_holds_the_key_the_ceph_layer_made(built: Lab, network: Result) -> None:
    """client.kubernetes exists on the PVE hosts with rbd-only caps, and ceph-csi's Secret holds its key."""
    env = built.env
    done = subprocess.run(["ip", "netns", "exec", layout.NETNS, "ssh", "-i", env["HOMELAB_SSH_PRIVATE_KEY"],
                           "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={env['HOMELAB_KNOWN_HOSTS']}",
                           "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                           f"root@{INV.proxmox.nodes[1].address}",
                           "ceph auth get client.kubernetes --format json"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    entry = json.loads(done.stdout)[0]
    assert entry["caps"] == {"mon": "profile rbd", "osd": "profile rbd pool=kubernetes",
                             "mgr": "profile rbd pool=kubernetes"}
    secret = in_lab(CSI_SECRET)
    assert secret == {"userID": "kubernetes", "userKey": entry["key"]}
    assert entry["key"] not in network.text  # never printed by the run


HTTPS = """
import http.client, json, socket, ssl, time, urllib.request
from kubernetes import client, config
config.load_kube_config(context="homelab")
api = client.ApiClient()
net = client.NetworkingV1Api(api)
# The int wildcard is served for names an Ingress routes (as Traefik picks certificates from Ingress TLS).
ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
           "metadata": {"name": "lab-test", "namespace": "kube-system"},
           "spec": {"tls": [{"hosts": ["test.int.jigga.xyz"], "secretName": "wildcard-int-jigga-xyz-tls"}],
                    "rules": [{"host": "test.int.jigga.xyz", "http": {"paths": [{"path": "/", "pathType": "Prefix",
                        "backend": {"service": {"name": "traefik", "port": {"number": 443}}}}]}}]}}
net.create_namespaced_ingress("kube-system", ingress)
cfg = api.configuration
roots = json.loads(urllib.request.urlopen(cfg.host + "/standin/acme-roots",
                   context=ssl.create_default_context(cafile=cfg.ssl_ca_cert)).read())
ctx = ssl.create_default_context(cadata="".join(roots.values()))
out = {}
deadline = time.monotonic() + 30
for host in ("test.jigga.xyz", "test.int.jigga.xyz"):
    while True:
        try:
            with socket.create_connection(("192.168.7.230", 443), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname=host) as tls:
                    cert = tls.getpeercert()
            out[host] = {"verified": True, "issuer": dict(x[0] for x in cert["issuer"])["commonName"]}
            break
        except (OSError, ssl.SSLError) as exc:
            if time.monotonic() > deadline:
                out[host] = {"verified": False, "error": str(exc)}
                break
            time.sleep(0.5)  # a poll with the deadline above
conn = http.client.HTTPConnection("192.168.7.230", 80, timeout=5)
conn.request("GET", "/some/path", headers={"Host": "test.jigga.xyz"})
response = conn.getresponse()
out["http"] = {"status": response.status, "location": response.getheader("Location")}
net.delete_namespaced_ingress("lab-test", "kube-system")
print(json.dumps(out))
"""


def test_the_loadbalancer_answers_https_for_each_domain_and_redirects_http(network: Result) -> None:
    result = in_lab(HTTPS)
    for host in ("test.jigga.xyz", "test.int.jigga.xyz"):
        assert result[host]["verified"], result[host]
        assert "STAGING" not in result[host]["issuer"]
    assert result["http"]["status"] in (301, 308)
    assert result["http"]["location"] == "https://test.jigga.xyz/some/path"


def test_a_second_run_changes_nothing(network: Result) -> None:
    plan = invoke("plan", *TO_NETWORK, "--json")
    assert plan.code == 0, plan.text
    changes = json.loads(plan.out)
    assert [c for c in changes if c["action"] != "noop"] == []
    assert {c["name"] for c in changes if c["layer"] == "network"} >= {"kube-system/traefik", "metallb-system/homelab"}


def test_down_removes_what_the_layer_made(network: Result) -> None:
    refused = invoke("down", "--only", "network")
    assert refused.code == 1
    down = invoke("down", "--only", "network", "--yes")
    assert down.code == 0, down.text
    # The chart's uninstall runs after the HelmChart's DELETE answers (its finalizer): poll for it.
    def gone() -> tuple[bool | None, str]:
        state = in_lab(STATE)["traefik"]
        quiet = not answers(str(INV.network.traefik), 22)
        return (True if state == {"status": 404} and quiet else None), f"traefik {state}, .230 answers: {not quiet}"

    poll("Traefik's Service and address to go", gone, timeout=60, progress=Silent(), first=0.5, maximum=2)
    plan = invoke("plan", "--only", "network", "--json")
    assert {c["action"] for c in json.loads(plan.out)} == {"create"}

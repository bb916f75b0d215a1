"""The lab's fault catalog: its contract with the live suite (CHECKS.md), one fault at a time with its record
in the state file, the supervisor's control socket, and the helpers the mechanisms use (no lab needed)."""

from __future__ import annotations

import datetime
import json
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest

from homelab import inventory, manifests
from homelab.errors import Timeout
from homelab.lab import faults
from homelab.lab.faultctl import SWITCHES, ControlClient, ControlError, ControlServer
from homelab.lab.pve import LabPve
from homelab.lab.serving import Background
from homelab.wait import Silent

CHECKS = Path(__file__).resolve().parents[2] / "tests" / "live" / "CHECKS.md"
TRIP = re.compile(r"^(?P<file>test_\w+\.py)::(?P<func>test_\w+)(?:\[(?P<param>[^\]]+)\])?$")


# ------------------------------------------------------------------------------------ CHECKS.md


@dataclass(frozen=True)
class Check:
    file: str
    marker: str
    func: str
    params: str


def checks_table() -> dict[tuple[str, str], Check]:
    """(file, function) -> the check's row of CHECKS.md's table (blank file/marker cells repeat the last)."""
    rows: dict[tuple[str, str], Check] = {}
    file = marker = ""
    for line in CHECKS.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "file":
            continue
        file, marker = cells[0] or file, cells[1] or marker
        rows[(file, cells[2])] = Check(file, marker, cells[2], cells[3])
    return rows


def markers() -> set[str]:
    return {m.strip() for check in checks_table().values() for m in check.marker.split("/")}


def _hosts(inv: inventory.Inventory, access: str | None = None) -> set[str]:
    return {str(a.hostname) for a in inv.apps if a.hostname and access in (None, a.access)}


# CHECKS.md's params cell (its start) -> the ids the check is parametrised with, from the inventory.
UNIVERSES: list[tuple[str, Any]] = [
    ("each PVE node", lambda inv: {n.name for n in inv.proxmox.nodes}),
    ("each VM", lambda inv: {vm.name for vm in inv.k3s.vms}),
    ("each HelmChart", lambda inv: {o["metadata"]["name"] for o in manifests.render(inv).objects
                                    if o["kind"] == "HelmChart"}),
    ("each public app hostname", lambda inv: _hosts(inv, "public")),
    ("each internal app hostname", lambda inv: _hosts(inv, "internal")),
    ("each app hostname", _hosts),
    ("each app with a hostname", lambda inv: {a.name for a in inv.apps if a.hostname}),
    ("each app of the inventory", lambda inv: {a.name for a in inv.apps}),
]


def param_universe(params: str, inv: inventory.Inventory) -> set[str] | None:
    """The ids a check is parametrised with, from its params cell and the inventory; None: not parametrised."""
    if params.startswith("-"):
        return None
    for prefix, universe in UNIVERSES:
        if params.startswith(prefix):
            return set(universe(inv))
    raise AssertionError(f"CHECKS.md params {params!r}: teach UNIVERSES what they are")


@pytest.fixture(scope="module")
def inv() -> inventory.Inventory:
    return inventory.load(None)


def test_the_catalog_is_big_enough_and_named_once() -> None:
    names = [f.name for f in faults.CATALOG]
    assert len(names) >= 22
    assert len(set(names)) == len(names), "fault names must be unique"
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", n) for n in names)
    for fault in faults.CATALOG:
        assert fault.description and "\n" not in fault.description
        assert fault.trips, f"{fault.name} names no check"
        assert isinstance(fault.mechanism, faults.Mechanism)


def test_every_layer_of_the_live_suite_has_a_fault() -> None:
    layers = {f.layer for f in faults.CATALOG}
    assert layers <= set(faults.LAYERS)
    assert markers() == set(faults.LAYERS), "faults.LAYERS must be CHECKS.md's markers"
    assert markers() <= layers, f"layers without a fault: {sorted(markers() - layers)}"


def test_every_named_check_is_in_checks_md_with_a_real_param(inv: inventory.Inventory) -> None:
    table = checks_table()
    for fault in faults.CATALOG:
        for trip in fault.trips:
            found = TRIP.match(trip)
            assert found, f"{fault.name}: {trip!r} is not a node id like test_vms.py::test_x[param]"
            check = table.get((found["file"], found["func"]))
            assert check is not None, f"{fault.name}: {trip} is not in CHECKS.md"
            universe = param_universe(check.params, inv)
            if found["param"] is not None:
                assert universe is not None, f"{fault.name}: {trip}: the check is not parametrised"
                assert found["param"] in universe, f"{fault.name}: {trip}: param not in {sorted(universe)}"


def test_the_markdown_table_lists_every_fault_and_check() -> None:
    table = faults.markdown_table()
    lines = table.strip().splitlines()
    assert lines[0] == "| fault | layer | what it breaks | checks it must trip |"
    assert len(lines) == 2 + len(faults.CATALOG)
    for fault, line in zip(faults.CATALOG, lines[2:], strict=True):
        assert line.startswith(f"| `{fault.name}` | {fault.layer} |")
        assert all(f"`{trip}`" in line for trip in fault.trips)
        assert line.count("|") == 5


def test_the_objects_faults_touch_are_what_the_manifests_declare(inv: inventory.Inventory) -> None:
    objects = manifests.render(inv).objects
    have = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objects}
    apps = {a.name: a for a in inv.apps}
    for fault in faults.CATALOG:
        m = fault.mechanism
        if isinstance(m, faults.HelmLbAddress | faults.HelmChartFailing):
            assert ("HelmChart", "kube-system", m.chart) in have, fault.name
        if isinstance(m, faults.IngressCertificate | faults.AppAnswers):
            app = apps[m.app]
            assert ("Ingress", app.namespace, app.name) in have, fault.name
        if isinstance(m, faults.ConfigMapMissing):
            ns = apps[m.app].namespace
            assert ("ConfigMap", ns, m.configmap) in have and ("Deployment", ns, m.deployment) in have, fault.name
        for vm in [getattr(m, "vm", None)]:
            assert vm is None or vm in {v.name for v in inv.k3s.vms}, fault.name
        if isinstance(m, faults.NodeOffline):
            assert m.node in {n.name for n in inv.proxmox.nodes}
        if isinstance(m, faults.RecordChange | faults.InternalPublished | faults.TunnelRuleRemoved):
            hosts = {str(a.hostname) for a in inv.apps if a.hostname}
            assert m.host in hosts, fault.name
    # the VM a node goes offline under is the one whose placement check the fault names
    offline = faults.find("pve-node-offline")
    assert isinstance(offline.mechanism, faults.NodeOffline)
    on_it = [vm.name for vm in inv.k3s.vms if vm.pve_node == offline.mechanism.node]
    assert [f"test_vms.py::test_vm_running_on_its_node[{v}]" for v in on_it] == [
        t for t in offline.trips if "test_vm_running_on_its_node" in t]


# ------------------------------------------------------------------- one fault at a time, state file


@dataclass
class World:
    """What the fake mechanisms break: a dict of values."""

    values: dict[str, str]


@dataclass
class FakeLab:
    world: World
    progress: Silent


@dataclass(frozen=True)
class SetValue(faults.Mechanism):
    key: str
    bad: str
    fail_after_record: bool = False
    fail_before_record: bool = False
    mend_timeout: ClassVar[float] = 0.5
    effect_timeout: ClassVar[float] = 2.0

    def inject(self, lab: Any, record: faults.Record) -> None:
        if self.fail_before_record:
            raise RuntimeError("refused before anything was read")
        record["before"] = lab.world.values[self.key]
        if record["before"] == self.bad:
            raise faults.NothingToInject(f"{self.key} is {self.bad} already; nothing to inject")
        if self.fail_after_record:
            lab.world.values[self.key] = "half-broken"
            raise RuntimeError("failed half way")
        lab.world.values[self.key] = self.bad

    def effect(self, lab: Any, record: faults.Record) -> faults.Probe:
        return (True if lab.world.values[self.key] == self.bad else None), lab.world.values[self.key]

    def clear(self, lab: Any, record: faults.Record) -> None:
        lab.world.values[self.key] = record["before"]

    def mended(self, lab: Any, record: faults.Record) -> faults.Probe:
        ok = lab.world.values[self.key] == record["before"]
        return (True if ok else None), lab.world.values[self.key]


@dataclass(frozen=True)
class NeverMends(SetValue):
    def clear(self, lab: Any, record: faults.Record) -> None:
        pass


FAKE = (
    faults.Fault("quorum", "proxmox", "quorum lost", ("test_proxmox.py::test_cluster_quorate",),
                 SetValue("quorum", "lost")),
    faults.Fault("hostname", "nodes", "wrong hostname", ("test_nodes.py::test_hostname[naruto]",),
                 SetValue("hostname", "impostor")),
    faults.Fault("half", "nodes", "fails half way", ("test_nodes.py::test_hostname[naruto]",),
                 SetValue("hostname", "x", fail_after_record=True)),
    faults.Fault("early", "nodes", "fails at once", ("test_nodes.py::test_hostname[naruto]",),
                 SetValue("hostname", "x", fail_before_record=True)),
    faults.Fault("stuck", "nodes", "never mends", ("test_nodes.py::test_hostname[naruto]",),
                 NeverMends("hostname", "impostor")),
)


@pytest.fixture
def lab() -> FakeLab:
    return FakeLab(World({"quorum": "ok", "hostname": "naruto"}), Silent())


def test_inject_records_the_original_in_a_private_state_file(lab: FakeLab, tmp_path: Path) -> None:
    faults.inject("hostname", lab, catalog=FAKE, state_dir=tmp_path)  # type: ignore[arg-type]
    assert lab.world.values["hostname"] == "impostor"
    path = tmp_path / faults.STATE_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["name"] == "hostname" and data["record"] == {"before": "naruto"}
    assert faults.active(tmp_path) == data


def test_only_one_fault_at_a_time_and_the_refusal_names_it(lab: FakeLab, tmp_path: Path) -> None:
    faults.inject("hostname", lab, catalog=FAKE, state_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(faults.FaultError, match="fault hostname is active"):
        faults.inject("quorum", lab, catalog=FAKE, state_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(faults.FaultError, match="hostname is active"):
        faults.inject("hostname", lab, catalog=FAKE, state_dir=tmp_path)  # type: ignore[arg-type]
    assert lab.world.values == {"quorum": "ok", "hostname": "impostor"}


def test_clear_restores_the_record_checks_it_and_forgets_the_fault(lab: FakeLab, tmp_path: Path) -> None:
    faults.inject("hostname", lab, catalog=FAKE, state_dir=tmp_path)  # type: ignore[arg-type]
    mended = faults.clear(lab, catalog=FAKE, state_dir=tmp_path)  # type: ignore[arg-type]
    assert mended is not None and mended.name == "hostname"
    assert lab.world.values["hostname"] == "naruto"
    assert not (tmp_path / faults.STATE_FILE).exists()
    # then another fault may come
    faults.inject("quorum", lab, catalog=FAKE, state_dir=tmp_path)  # type: ignore[arg-type]
    assert faults.active(tmp_path)["name"] == "quorum"  # type: ignore[index]


def test_clear_without_an_active_fault_is_a_no_op(lab: FakeLab, tmp_path: Path) -> None:
    assert faults.clear(lab, catalog=FAKE, state_dir=tmp_path) is None  # type: ignore[arg-type]
    assert lab.world.values == {"quorum": "ok", "hostname": "naruto"}


def test_a_half_made_fault_stays_recorded_so_clear_can_restore(lab: FakeLab, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="half way"):
        faults.inject("half", lab, catalog=FAKE, state_dir=tmp_path)  # type: ignore[arg-type]
    assert faults.active(tmp_path)["name"] == "half"  # type: ignore[index]
    faults.clear(lab, catalog=FAKE, state_dir=tmp_path)  # type: ignore[arg-type]
    assert lab.world.values["hostname"] == "naruto" and faults.active(tmp_path) is None


def test_a_fault_refused_before_reading_anything_leaves_no_state(lab: FakeLab, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        faults.inject("early", lab, catalog=FAKE, state_dir=tmp_path)  # type: ignore[arg-type]
    assert faults.active(tmp_path) is None


def test_a_fault_already_in_place_is_refused_and_not_recorded(lab: FakeLab, tmp_path: Path) -> None:
    lab.world.values["hostname"] = "impostor"
    with pytest.raises(faults.NothingToInject):
        faults.inject("hostname", lab, catalog=FAKE, state_dir=tmp_path)  # type: ignore[arg-type]
    assert faults.active(tmp_path) is None  # a later --clear must not "restore" what it never changed


def test_a_clear_that_does_not_mend_times_out_and_keeps_the_fault(lab: FakeLab, tmp_path: Path) -> None:
    faults.inject("stuck", lab, catalog=FAKE, state_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(Timeout, match="stuck mended"):
        faults.clear(lab, catalog=FAKE, state_dir=tmp_path)  # type: ignore[arg-type]
    assert faults.active(tmp_path)["name"] == "stuck"  # type: ignore[index]


def test_unknown_faults_are_refused_with_a_hint(lab: FakeLab, tmp_path: Path) -> None:
    with pytest.raises(faults.FaultError, match="no fault 'nope'") as err:
        faults.inject("nope", lab, catalog=FAKE, state_dir=tmp_path)  # type: ignore[arg-type]
    assert "--list" in str(err.value)


def test_open_lab_refuses_when_the_lab_is_not_running(monkeypatch: pytest.MonkeyPatch, inv: Any) -> None:
    from homelab.lab import control

    monkeypatch.setattr(control, "running", lambda: False)
    with pytest.raises(faults.FaultError, match="the lab is not running"):
        faults.open_lab(inv, Silent().console, [])


# --------------------------------------------------------------------------------- control socket


NODES = {"pve-alpha": "192.168.7.233", "pve-beta": "192.168.7.234", "pve-gamma": "192.168.7.235"}


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[LabPve, ControlServer, ControlClient]]:
    pve = LabPve(node_ips=NODES)
    server = ControlServer(pve, tmp_path / "control.sock")
    loop = Background("control-test")
    loop.run(server.start())
    try:
        yield pve, server, ControlClient(server.path)
    finally:
        loop.run(server.stop())
        loop.close()


def test_the_control_socket_is_private_and_reports_the_pve_state(control: Any) -> None:
    _pve, server, client = control
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
    assert client.state() == {"quorate": True, "nodes": dict.fromkeys(sorted(NODES), True),
                              "ceph": {"health": "HEALTH_OK", "down": False, "slow": 0.0}}


def test_the_switches_work_on_the_supervisors_pve(control: Any) -> None:
    pve, _server, client = control
    assert client.switch("lose-quorum")["quorate"] is False and pve.quorate is False
    assert client.switch("regain-quorum")["quorate"] is True
    assert client.switch("node-offline", node="pve-gamma")["nodes"]["pve-gamma"] is False
    assert pve.nodes["pve-gamma"]["online"] is False
    assert client.switch("node-online", node="pve-gamma")["nodes"]["pve-gamma"] is True
    assert client.switch("ceph-warn")["ceph"]["health"] == "HEALTH_WARN"
    assert client.switch("ceph-recover")["ceph"]["health"] == "HEALTH_OK"
    down = client.switch("ceph-down")["ceph"]
    assert down["down"] is True and down["health"] == "HEALTH_ERR"
    assert client.switch("ceph-recover")["ceph"] == {"health": "HEALTH_OK", "down": False, "slow": 0.0}


def test_only_the_allow_listed_switches_exist(control: Any) -> None:
    pve, _server, client = control
    for name in ("fail", "flaky_network", "hold_config_lock", "..%2Fstate", "stop"):
        with pytest.raises(ControlError, match="404"):
            client.switch(name)
    with pytest.raises(ControlError, match="400 node must be one of pve-alpha"):
        client.switch("node-offline", node="pve-omega")
    with pytest.raises(ControlError, match="400"):
        client.switch("ceph-warn", health="HEALTH_OK")
    assert set(SWITCHES) == {"lose-quorum", "regain-quorum", "node-offline", "node-online", "ceph-warn",
                             "ceph-down", "ceph-recover"}
    assert pve.quorate and all(n["online"] for n in pve.nodes.values())


def test_the_control_socket_refuses_other_users(control: Any) -> None:
    _pve, server, client = control
    server.allowed_uids = {4242}  # neither root nor this test's user
    with pytest.raises(ControlError, match="403"):
        client.state()


def test_a_missing_control_socket_says_to_restart_the_lab(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no control socket") as err:
        ControlClient(tmp_path / "control.sock").state()
    assert "lab.up" in str(err.value)


# ------------------------------------------------------------------------------------------ helpers


def test_the_container_init_is_found_below_nspawn(tmp_path: Path) -> None:
    def proc(pid: int, nspid: str, children: list[int]) -> None:
        (tmp_path / str(pid) / "task" / str(pid)).mkdir(parents=True)
        (tmp_path / str(pid) / "status").write_text(f"Name:\tx\nNSpid:\t{nspid}\n", encoding="utf-8")
        (tmp_path / str(pid) / "task" / str(pid) / "children").write_text(" ".join(map(str, children)))

    proc(100, "100", [101])       # nsenter -> systemd-nspawn
    proc(101, "101", [102])       # nspawn's helper
    proc(102, "102\t1", [103])    # the container's systemd: PID 1 inside
    proc(103, "103\t57", [])
    assert faults.init_below(100, tmp_path) == 102
    assert faults.init_below(103, tmp_path) is None


def test_certificates_made_for_tls_faults_chain_to_the_issuer() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "letsencrypt-production (homelab lab ACME)")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=10))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA256()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    chain, leaf_key = faults.make_certificate(ca_pem, key_pem, ["*.jigga.xyz", "jigga.xyz"],
                                              not_before=now - datetime.timedelta(days=100),
                                              not_after=now - datetime.timedelta(days=10))
    leaf = x509.load_pem_x509_certificates(chain)[0]
    assert leaf.issuer == ca.subject and leaf.not_valid_after_utc < now
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["*.jigga.xyz", "jigga.xyz"]
    assert x509.load_pem_x509_certificates(chain)[1] == ca
    assert serialization.load_pem_private_key(leaf_key, None).public_key() == leaf.public_key()


# ------------------------------------------------------------------------ mechanisms against fakes


class FakeKube:
    """kget/kpatch/klist over a dict of objects, merge patches as RFC 7386 says."""

    def __init__(self, objects: dict[tuple[str, str, str], dict[str, Any]]) -> None:
        self.objects = objects

    @staticmethod
    def merge(target: Any, patch: Any) -> Any:
        if not isinstance(patch, dict):
            return patch
        out = dict(target) if isinstance(target, dict) else {}
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = FakeKube.merge(out.get(key), value)
        return out

    def kget(self, _v: str, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, ns, name))

    def klist(self, _v: str, kind: str, ns: str) -> list[dict[str, Any]]:
        return [o for (k, n, _), o in self.objects.items() if k == kind and n == ns]

    def kpatch(self, _v: str, kind: str, ns: str, name: str, body: dict[str, Any]) -> None:
        self.objects[(kind, ns, name)] = self.merge(self.objects[(kind, ns, name)], body)


def test_an_app_answering_502_is_mended_to_exactly_what_was_there(inv: Any) -> None:
    lab = FakeKube({
        ("Ingress", "vaultwarden", "vaultwarden"): {"spec": {"rules": [{"http": {"paths": [
            {"backend": {"service": {"name": "vaultwarden", "port": {"number": 80}}}}]}}]}},
        ("Service", "vaultwarden", "vaultwarden"): {"metadata": {"annotations": {"keep": "me"}}}})
    lab.inv = inv  # type: ignore[attr-defined]
    mechanism, record = faults.AppAnswers("vaultwarden"), {}
    mechanism.inject(lab, record)  # type: ignore[arg-type]
    assert lab.objects[("Service", "vaultwarden", "vaultwarden")]["metadata"]["annotations"] == {
        "keep": "me", faults.FAULT_ANNOTATION: "502"}
    assert json.loads(json.dumps(record)) == record  # the record survives the state file
    mechanism.clear(lab, record)  # type: ignore[arg-type]
    assert lab.objects[("Service", "vaultwarden", "vaultwarden")] == {"metadata": {"annotations": {"keep": "me"}}}
    assert mechanism.mended(lab, record)[0] is True  # type: ignore[arg-type]


def test_the_metallb_pool_grows_by_one_address_and_comes_back(inv: Any) -> None:
    pool = [str(r) for r in inv.network.metallb_pool]
    lab = FakeKube({("IPAddressPool", "metallb-system", "homelab"): {
        "metadata": {"name": "homelab"}, "spec": {"addresses": pool, "autoAssign": False}}})
    lab.inv = inv  # type: ignore[attr-defined]
    mechanism, record = faults.MetallbPoolChanged(), {}
    mechanism.inject(lab, record)  # type: ignore[arg-type]
    assert lab.objects[("IPAddressPool", "metallb-system", "homelab")]["spec"]["addresses"] == [
        *pool, "192.168.7.232/32"]
    mechanism.clear(lab, record)  # type: ignore[arg-type]
    assert lab.objects[("IPAddressPool", "metallb-system", "homelab")]["spec"] == {"addresses": pool,
                                                                                    "autoAssign": False}


def test_traefiks_requested_address_is_changed_in_the_chart_values_and_restored_verbatim(inv: Any) -> None:
    objects = manifests.render(inv, component="traefik").objects
    chart = next(o for o in objects if o["kind"] == "HelmChart")
    original = chart["spec"]["valuesContent"]
    lab = FakeKube({("HelmChart", "kube-system", "traefik"): chart})
    lab.inv = inv  # type: ignore[attr-defined]
    mechanism, record = faults.find("traefik-address-changed").mechanism, {}
    mechanism.inject(lab, record)  # type: ignore[arg-type]
    import yaml

    values = yaml.safe_load(lab.objects[("HelmChart", "kube-system", "traefik")]["spec"]["valuesContent"])
    assert values["service"]["annotations"][faults.LB_ANNOTATION] == str(inv.network.internal_dns)
    assert values["ports"]["web"]["redirections"]["entryPoint"]["to"] == "websecure"
    assert record["address"] == str(inv.network.traefik)
    mechanism.clear(lab, record)  # type: ignore[arg-type]
    assert lab.objects[("HelmChart", "kube-system", "traefik")]["spec"]["valuesContent"] == original

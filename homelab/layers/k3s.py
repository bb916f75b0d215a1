"""The k3s layer: K3s on the VMs over SSH, as facts and idempotent operations.

Per node, one SSH command gathers every fact (packages, kernel modules, sysctls, swap, time
sync, the managed files' hashes and modes, the unit's state, the binary's version). Desired
files are rendered from the inventory; an operation exists only where a fact differs. A node's
unit restarts only when its own binary, config, token or unit changed; a new binary on a running
cluster rolls one node at a time (cordon, drain, replace, restart, wait Ready, uncordon), the
control plane first.

The cluster token is generated once, kept 0600 on the operator's side and on the nodes, and
travels only on stdin; the plan shows that it differs, never what it is.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import requests
import yaml

from homelab.clients.ssh import Hosts, SshUnreachable
from homelab.context import Run
from homelab.errors import ConfigError, HomelabError, Timeout
from homelab.inventory import Inventory, Vm
from homelab.plan import Change, FieldDiff, LayerPlan
from homelab.wait import poll

LAYER = "k3s"
FILES = Path(__file__).resolve().parents[2] / "files" / "k3s"
BINARY = "/usr/local/bin/k3s"
CONFIG = "/etc/rancher/k3s/config.yaml"
TOKEN = "/etc/rancher/k3s/token"  # noqa: S105 - a path
KUBECONFIG_REMOTE = "/etc/rancher/k3s/k3s.yaml"
MODULES_FILE = "/etc/modules-load.d/k3s.conf"
SYSCTL_FILE = "/etc/sysctl.d/90-k3s.conf"
PACKAGES = ("ca-certificates", "curl", "iptables", "conntrack", "socat")
MODULES = ("overlay", "br_netfilter")
SYSCTLS = {"net.ipv4.ip_forward": "1", "net.bridge.bridge-nf-call-iptables": "1",
           "net.bridge.bridge-nf-call-ip6tables": "1"}
TIMESYNC = "systemd-timesyncd"
CONTEXT = "homelab"


def unit_name(vm: Vm) -> str:
    return "k3s.service" if vm.role == "server" else "k3s-agent.service"


def unit_path(vm: Vm) -> str:
    return f"/etc/systemd/system/{unit_name(vm)}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------- desired state (pure)


def _templates() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(FILES), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, autoescape=False)  # noqa: S701 - YAML and unit files, not HTML


def render_config(inv: Inventory, vm: Vm) -> str:
    server = inv.k3s.servers[0]
    sans = [str(vm.address), vm.name, f"{vm.name}.{inv.domains.internal.name}"]
    return _templates().get_template("config.yaml.j2").render(
        role=vm.role, vm=vm, net=inv.network, server=server, token_file=TOKEN, tls_sans=sans)


def render_unit(vm: Vm) -> str:
    return _templates().get_template("k3s.service.j2").render(mode="server" if vm.role == "server" else "agent")


def modules_file() -> str:
    return "# Managed by homelab: kernel modules K3s needs.\n" + "".join(f"{m}\n" for m in MODULES)


def sysctl_file() -> str:
    return "# Managed by homelab: forwarding and bridged traffic through iptables, for K3s.\n" + "".join(
        f"{k} = {v}\n" for k, v in SYSCTLS.items())


@dataclass
class NodeFacts:
    vm: Vm
    raw: dict[str, Any]

    def file(self, path: str) -> dict[str, Any] | None:
        value = self.raw["files"].get(path)
        return value if isinstance(value, dict) else None

    def same(self, path: str, data: bytes, mode: str) -> bool:
        found = self.file(path)
        return found is not None and found["sha256"] == sha(data) and found["mode"] == mode and found["uid"] == 0

    @property
    def unit(self) -> dict[str, str]:
        return dict(self.raw["units"].get(unit_name(self.vm), {}))


# ------------------------------------------------------------------------ release (operator)


@dataclass
class Release:
    version: str
    base_url: str
    cache: Path

    @property
    def url(self) -> str:
        return f"{self.base_url.rstrip('/')}/{urllib.parse.quote(self.version, safe='')}"

    def checksum(self) -> str:
        """The binary's sha256 from the release's sha256sum-amd64.txt."""
        try:
            response = requests.get(f"{self.url}/sha256sum-amd64.txt", timeout=30)
            response.raise_for_status()
        except requests.RequestException as exc:
            raise HomelabError(f"cannot read the K3s {self.version} checksums at {self.url}: {exc}") from None
        for line in response.text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].lstrip("*") == "k3s":
                return parts[0].lower()
        raise HomelabError(f"{self.url}/sha256sum-amd64.txt lists no checksum for k3s")

    def binary(self, expected: str) -> bytes:
        """The binary, downloaded once per version and verified against the release's checksum."""
        path = self.cache / f"k3s-{self.version}"
        if path.exists() and sha(path.read_bytes()) == expected:
            return path.read_bytes()
        try:
            response = requests.get(f"{self.url}/k3s", timeout=300)
            response.raise_for_status()
        except requests.RequestException as exc:
            raise HomelabError(f"cannot download K3s {self.version} from {self.url}: {exc}") from None
        data = response.content
        if sha(data) != expected:
            raise HomelabError(f"K3s {self.version} from {self.url} does not match its sha256 file "
                               f"({sha(data)[:12]} != {expected[:12]}); refusing to install it")
        self.cache.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data


# --------------------------------------------------------------------------- operator state


def operator_dir(run: Run) -> Path:
    path = run.target.state_dir
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _write_private(path: Path, data: bytes) -> None:
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def kubeconfig_path(run: Run) -> Path:
    return operator_dir(run) / "kubeconfig"


def rewrite_kubeconfig(text: str, server_address: str) -> str:
    """k3s.yaml with its server at the control plane's address and everything named `homelab`."""
    doc = yaml.safe_load(text)
    cluster = doc["clusters"][0]["cluster"]
    cluster["server"] = f"https://{server_address}:6443"
    user = doc["users"][0]["user"]
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": CONTEXT, "cluster": cluster}],
        "users": [{"name": CONTEXT, "user": user}],
        "contexts": [{"name": CONTEXT, "context": {"cluster": CONTEXT, "user": CONTEXT}}],
        "current-context": CONTEXT,
    }, sort_keys=False)


# ------------------------------------------------------------------------------------ layer


@dataclass
class Node:
    vm: Vm
    facts: NodeFacts
    changed: list[str] = field(default_factory=list)


class K3sLayer:
    name = LAYER

    def __init__(self, version: str | None = None) -> None:
        # Set by `k3s.upgrade --version`; otherwise the inventory's version.
        self.version = version

    def _hosts(self, run: Run) -> Hosts:
        if run.ssh is None:
            target = run.target
            run.ssh = Hosts(run.inv.k3s.user, target.ssh_private_key, target.known_hosts, guard=run.guard)
        return run.ssh

    def gather(self, run: Run, vms: Sequence[Vm], wait: bool = True) -> dict[str, NodeFacts]:
        """Facts of each node; with wait=False a node that does not take SSH is left out."""
        hosts = self._hosts(run)
        script = (FILES / "facts.py").read_bytes()
        out = {}
        for vm in vms:
            if wait:
                hosts.wait(str(vm.address), run.timeouts.ssh, run.progress)
            else:
                try:
                    hosts.connect(str(vm.address))
                except SshUnreachable:
                    continue
            wanted = {"packages": PACKAGES, "modules": MODULES, "sysctl": list(SYSCTLS), "timesync": TIMESYNC,
                      "files": [BINARY, CONFIG, TOKEN, unit_path(vm), MODULES_FILE, SYSCTL_FILE],
                      "units": [unit_name(vm)], "binary": BINARY}
            done = hosts.run(str(vm.address), ["python3", "-", json.dumps(wanted)], sudo=True, stdin=script)
            out[vm.name] = NodeFacts(vm, json.loads(done.stdout))
        return out

    def token(self, run: Run, server_facts: NodeFacts) -> tuple[bytes, str | None]:
        """The cluster token and, when the operator has no copy yet, where it comes from.

        The operator's copy wins; else the control plane's; else a new one. Nothing is written
        here: keeping the operator's copy (0600) is a change of the plan like any other.
        """
        path = operator_dir(run) / "k3s-token"
        if path.exists():
            return path.read_bytes().strip(), None
        if server_facts.file(TOKEN):
            token = self._hosts(run).run(str(server_facts.vm.address), ["cat", TOKEN], sudo=True).stdout.strip()
            return token.encode(), f"copied from {server_facts.vm.name}"
        return secrets.token_hex(32).encode(), "generated"

    def plan_up(self, run: Run) -> LayerPlan:
        inv = run.inv
        version = self.version or inv.k3s.version
        release = Release(version, run.target.k3s_release_url, operator_dir(run) / "releases")
        plan = LayerPlan(LAYER)
        servers, agents = inv.k3s.servers, [vm for vm in inv.k3s.vms if vm.role == "agent"]
        facts = self.gather(run, [*servers, *agents])
        token, origin = self.token(run, facts[servers[0].name])
        if origin:
            path = operator_dir(run) / "k3s-token"
            plan.add(Change(LAYER, "token", "operator", "create",
                            f"the operator's copy of the cluster token ({origin})",
                            (FieldDiff("path", None, str(path)),),
                            apply=lambda: _write_private(path, token + b"\n")))
        checksum = release.checksum()
        plan.facts.append(f"K3s {version}, binary sha256 {checksum[:12]} ({release.url})")
        cluster_running = facts[servers[0].name].unit.get("active") == "active"
        kube = _Kube(run) if cluster_running and kubeconfig_path(run).exists() else None
        restarts: list[Node] = []
        for vm in [*servers, *agents]:
            node = Node(vm, facts[vm.name])
            self._plan_node(run, plan, node, token + b"\n", release, checksum, kube)
            if vm.role == "server":
                plan.add(self._kubeconfig_change(run, vm))
            restarts.append(node)
        names = [vm.name for vm in inv.k3s.vms]
        ready = kube.ready_nodes() if kube is not None else {}
        for name in names:
            if ready.get(name):
                plan.add(Change(LAYER, "node", name, "noop", "Ready"))

        def finish() -> None:
            wait_ready(run, names, version if self.version else None)

        plan.finish = finish
        if any(not ready.get(n) for n in names) and not plan.pending:
            plan.add(Change(LAYER, "node", ",".join(n for n in names if not ready.get(n)), "update",
                            "wait until every node is Ready", apply=finish))
        return plan

    # --------------------------------------------------------------------------- per node

    def _plan_node(self, run: Run, plan: LayerPlan, node: Node, token: bytes, release: Release, checksum: str,
                   kube: _Kube | None) -> None:
        vm, facts, hosts = node.vm, node.facts, self._hosts(run)
        address = str(vm.address)
        add = plan.add

        missing = [p for p, ok in facts.raw["packages"].items() if not ok]
        if missing:
            add(Change(LAYER, "packages", vm.name, "update", f"install {', '.join(missing)}",
                       tuple(FieldDiff(p, "absent", "installed") for p in missing),
                       apply=lambda: hosts.run(address, ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get",
                                                         "install", "-y", "--no-install-recommends", *missing],
                                               sudo=True, timeout=900)))
        absent = [m for m, ok in facts.raw["modules"].items() if not ok]
        modules = modules_file().encode()
        if absent or not facts.same(MODULES_FILE, modules, "0644"):
            def load() -> None:
                hosts.put(address, modules, MODULES_FILE)
                for module in absent:
                    hosts.run(address, ["modprobe", module], sudo=True)
            add(Change(LAYER, "modules", vm.name, "update", "kernel modules " + ", ".join(MODULES),
                       tuple(FieldDiff(m, "not loaded", "loaded") for m in absent), apply=load))
        wrong = {k: v for k, v in SYSCTLS.items() if facts.raw["sysctl"].get(k) != v}
        sysctls = sysctl_file().encode()
        if wrong or not facts.same(SYSCTL_FILE, sysctls, "0644"):
            def tune() -> None:
                hosts.put(address, sysctls, SYSCTL_FILE)
                hosts.run(address, ["sysctl", "-q", *(f"{k}={v}" for k, v in SYSCTLS.items())], sudo=True)
            add(Change(LAYER, "sysctl", vm.name, "update", "forwarding and bridge netfilter",
                       tuple(FieldDiff(k, facts.raw["sysctl"].get(k), v) for k, v in wrong.items()), apply=tune))
        if facts.raw["swap"]:
            def swapoff() -> None:
                hosts.run(address, ["swapoff", "-a"], sudo=True)
                hosts.run(address, ["sed", "-i", "-E", r"s@^([^#].*\sswap\s.*)$@# \1  # off for K3s@", "/etc/fstab"],
                          sudo=True)
            add(Change(LAYER, "swap", vm.name, "update", "turn swap off (kubelet requirement)",
                       (FieldDiff("swap", ", ".join(facts.raw["swap"]), "off"),), apply=swapoff))
        if facts.raw["timesync"] != "enabled":
            add(Change(LAYER, "timesync", vm.name, "update", f"enable {TIMESYNC}",
                       (FieldDiff(TIMESYNC, facts.raw["timesync"] or "absent", "enabled"),),
                       apply=lambda: hosts.run(address, ["systemctl", "enable", "--now", TIMESYNC], sudo=True)))

        if not facts.same(TOKEN, token, "0600"):
            node.changed.append("token")
            add(Change(LAYER, "token", vm.name, "create" if facts.file(TOKEN) is None else "update",
                       "the cluster token (0600, from the operator's copy)",
                       (FieldDiff("token", "(absent)" if facts.file(TOKEN) is None else "(differs)", "(set)"),),
                       apply=lambda: hosts.put(address, token, TOKEN, "0600", secret=True)))
        config = render_config(run.inv, vm).encode()
        if not facts.same(CONFIG, config, "0600"):
            node.changed.append("config")
            add(Change(LAYER, "config", vm.name, "create" if facts.file(CONFIG) is None else "update",
                       f"{CONFIG} from the inventory", _config_diff(hosts, address, facts, config),
                       apply=lambda: hosts.put(address, config, CONFIG, "0600")))
        unit = render_unit(vm).encode()
        if not facts.same(unit_path(vm), unit, "0644"):
            node.changed.append("unit")

            def write_unit() -> None:
                hosts.put(address, unit, unit_path(vm))
                hosts.run(address, ["systemctl", "daemon-reload"], sudo=True)
            add(Change(LAYER, "unit", vm.name, "create" if facts.file(unit_path(vm)) is None else "update",
                       f"{unit_name(vm)} (our own unit)", apply=write_unit))
        binary = facts.file(BINARY)
        if binary is None or binary["sha256"] != checksum or binary["mode"] != "0755":
            node.changed.append("binary")
            rolling = kube is not None and facts.unit.get("active") == "active"
            add(Change(LAYER, "binary", vm.name, "create" if binary is None else "update",
                       f"K3s {release.version} from the release, sha256 verified"
                       + (" (rolling: cordon, drain, replace, restart, Ready, uncordon)" if rolling else ""),
                       (FieldDiff("version", facts.raw.get("version") or None, release.version),),
                       apply=_installer(run, hosts, node, release, checksum, rolling)))
        self._plan_service(plan, hosts, node)

    def _plan_service(self, plan: LayerPlan, hosts: Hosts, node: Node) -> None:
        vm, unit = node.vm, node.facts.unit
        address, name = str(vm.address), unit_name(vm)
        restart = [c for c in node.changed if c != "binary" or unit.get("active") != "active"]
        if unit.get("enabled") != "enabled" or unit.get("active") != "active" or restart:
            verb = "restart" if unit.get("active") == "active" else "start"
            why = f"{verb}: {', '.join(restart)} changed" if restart and verb == "restart" else verb

            def service() -> None:
                hosts.run(address, ["systemctl", "enable", name], sudo=True)
                hosts.run(address, ["systemctl", verb, name], sudo=True)
            plan.add(Change(LAYER, "service", f"{vm.name}/{name}", "update", why,
                            (FieldDiff("active", unit.get("active") or "inactive", "active"),
                             FieldDiff("enabled", unit.get("enabled") or "disabled", "enabled")), apply=service))
        else:
            plan.add(Change(LAYER, "service", f"{vm.name}/{name}", "noop", "active and enabled, nothing changed"))

    def _kubeconfig_change(self, run: Run, server: Vm) -> Change:
        path = kubeconfig_path(run)
        hosts = self._hosts(run)

        def fetch() -> None:
            def probe() -> tuple[str | None, str]:
                done = hosts.run(str(server.address), ["cat", KUBECONFIG_REMOTE], sudo=True, check=False)
                return (done.stdout if done.ok and done.stdout.strip() else None), "k3s has not written it yet"
            text = poll(f"{server.name}'s kubeconfig", probe, timeout=run.timeouts.k3s, progress=run.progress)
            _write_private(path, rewrite_kubeconfig(text, str(server.address)).encode())

        if path.exists() and _kubeconfig_ok(path, str(server.address)):
            return Change(LAYER, "kubeconfig", str(path), "noop", f"context {CONTEXT} at {server.address}:6443")
        return Change(LAYER, "kubeconfig", str(path), "create" if not path.exists() else "update",
                      f"fetched from {server.name}, server https://{server.address}:6443, context {CONTEXT}, 0600",
                      apply=fetch)

    def plan_down(self, run: Run) -> LayerPlan:
        plan = LayerPlan(LAYER)
        hosts = self._hosts(run)
        vms = list(reversed(run.inv.k3s.vms))
        facts = self.gather(run, vms, wait=False)
        for vm in vms:
            if vm.name not in facts:
                plan.add(Change(LAYER, "node", vm.name, "noop", "does not take SSH (no VM?): nothing to uninstall"))
                continue
            f, address = facts[vm.name], str(vm.address)
            present = [p for p in (BINARY, CONFIG, TOKEN, unit_path(vm)) if f.file(p)]
            if not present and f.unit.get("active") != "active":
                plan.add(Change(LAYER, "node", vm.name, "noop", "K3s is not installed"))
                continue

            def remove(vm: Vm = vm, address: str = address) -> None:
                hosts.run(address, ["systemctl", "disable", "--now", unit_name(vm)], sudo=True, check=False)
                hosts.run(address, ["rm", "-rf", BINARY, "/etc/rancher/k3s", unit_path(vm), "/var/lib/rancher/k3s"],
                          sudo=True)
                hosts.run(address, ["systemctl", "daemon-reload"], sudo=True)
            plan.add(Change(LAYER, "node", vm.name, "delete", f"uninstall K3s ({unit_name(vm)}, binary, config, "
                            "token, data)", apply=remove))
        local = [p for p in (kubeconfig_path(run), operator_dir(run) / "k3s-token") if p.exists()]
        if local:
            def forget() -> None:
                for path in local:
                    path.unlink(missing_ok=True)
            plan.add(Change(LAYER, "operator", "files", "delete", "remove the kubeconfig and the token copy",
                            apply=forget))
        return plan


def _kubeconfig_ok(path: Path, address: str) -> bool:
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        return bool(doc["current-context"] == CONTEXT
                    and doc["clusters"][0]["cluster"]["server"] == f"https://{address}:6443"
                    and path.stat().st_mode & 0o077 == 0)
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return False


def _config_diff(hosts: Hosts, address: str, facts: NodeFacts, config: bytes) -> tuple[FieldDiff, ...]:
    """Keys of config.yaml that differ (the current file read only when it exists and differs)."""
    new = yaml.safe_load(config) or {}
    if facts.file(CONFIG) is None:
        return tuple(FieldDiff(k, None, v) for k, v in new.items())
    done = hosts.run(address, ["cat", CONFIG], sudo=True, check=False)
    try:
        old = yaml.safe_load(done.stdout) or {} if done.ok else {}
    except yaml.YAMLError:
        old = {}
    diffs = tuple(FieldDiff(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
    return diffs or (FieldDiff("mode/owner", facts.file(CONFIG), "0600 root"),)


def _installer(run: Run, hosts: Hosts, node: Node, release: Release, checksum: str,
               rolling: bool) -> Callable[[], None]:
    vm = node.vm
    address = str(vm.address)

    def install() -> None:
        data = release.binary(checksum)
        if not rolling:
            hosts.put(address, data, BINARY, "0755")
            return
        kube = _Kube(run)
        kube.cordon(vm.name, True)
        kube.drain(vm.name)
        hosts.put(address, data, BINARY, "0755")
        hosts.run(address, ["systemctl", "restart", unit_name(vm)], sudo=True)
        wait_ready(run, [vm.name], release.version)
        kube.cordon(vm.name, False)
        run.console.print(f"  {vm.name}: now K3s {release.version}")

    return install


# --------------------------------------------------------------------------------- cluster


class _Kube:
    """The cluster through the official kubernetes client, from the operator's kubeconfig."""

    def __init__(self, run: Run) -> None:
        from kubernetes import client, config

        path = kubeconfig_path(run)
        try:
            api = config.new_client_from_config(config_file=str(path), context=CONTEXT)  # type: ignore[no-untyped-call]
        except Exception as exc:  # the client raises ConfigException and friends
            raise ConfigError(f"cannot use the kubeconfig {path}: {exc}") from None
        self.core = client.CoreV1Api(api)
        self.policy = client.PolicyV1Api(api)
        self.client = client

    def nodes(self) -> list[Any]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return list(self.core.list_node(_request_timeout=10).items)
        except (ApiException, HTTPError, OSError) as exc:
            raise HomelabError(f"the Kubernetes API does not answer: {str(exc).splitlines()[0]}") from None

    def ready_nodes(self) -> dict[str, bool]:
        try:
            return {n.metadata.name: _is_ready(n) for n in self.nodes()}
        except HomelabError:
            return {}

    def cordon(self, name: str, on: bool) -> None:
        self.core.patch_node(name, {"spec": {"unschedulable": on or None}})

    def drain(self, name: str) -> None:
        pods: list[Any] = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}").items
        for pod in pods:
            owners = pod.metadata.owner_references or []
            if any(o.kind == "DaemonSet" for o in owners):
                continue
            body = self.client.V1Eviction(metadata=self.client.V1ObjectMeta(name=pod.metadata.name,
                                                                             namespace=pod.metadata.namespace))
            self.core.create_namespaced_pod_eviction(pod.metadata.name, pod.metadata.namespace, body)


def _is_ready(node: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))


def wait_ready(run: Run, names: list[str], version: str | None = None) -> None:
    """Wait until the named nodes are Ready (and run `version`, when given)."""
    kube = _Kube(run)

    def probe() -> tuple[bool | None, str]:
        try:
            nodes = {n.metadata.name: n for n in kube.nodes()}
        except HomelabError as exc:
            return None, exc.message
        waiting = []
        for name in names:
            node = nodes.get(name)
            if node is None:
                waiting.append(f"{name}: not registered")
            elif not _is_ready(node):
                waiting.append(f"{name}: NotReady")
            elif version and node.status.node_info.kubelet_version != version:
                waiting.append(f"{name}: {node.status.node_info.kubelet_version}")
        return (True if not waiting else None), "; ".join(waiting) or "all Ready"

    try:
        poll(f"node(s) {', '.join(names)} Ready", probe, timeout=run.timeouts.k3s, progress=run.progress,
             first=0.5, maximum=3)
    except Timeout as exc:
        raise Timeout(exc.message, hint="look at `journalctl -u k3s` / `-u k3s-agent` on the nodes") from None

"""The live suite's fixtures: the inventory's entities as parameters, and one client of each kind per session.

Everything here only reads. The PVE API, the cluster's API, Cloudflare and Tailscale are opened once,
through the project's own clients (token auth, TLS verified, `homelab.safety` asked first); each
node gets one SSH connection (host keys checked against the target's known_hosts, never added),
shared by every node check through testinfra. Answers read by several checks are read once.

Options: --live-target lab|live (default HOMELAB_TARGET, else lab), --live-inventory PATH,
--live-report PATH (the Markdown report; see report.py). `invoke test.live` sets them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from homelab import inventory, live, manifests
from homelab.errors import HomelabError

from .report import LiveReport

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("live", "the homelab live suite (tests/live)")
    group.addoption("--live-target", default=None, help="lab or live (default HOMELAB_TARGET, else lab)")
    group.addoption("--live-inventory", default=None, help="inventory file (default inventory/homelab.yaml)")
    group.addoption("--live-report", default=str(live.REPO / live.DEFAULT_REPORT),
                    help="where the Markdown report goes (default reports/live.md)")


def pytest_configure(config: pytest.Config) -> None:
    for name, description in live.MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    try:
        target = live.choose_target(config.getoption("--live-target"))
    except HomelabError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[TARGET] = target
    config.pluginmanager.register(LiveReport(config, target), "homelab-live-report")


TARGET = pytest.StashKey[str]()


def _ours(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if _ours(item)]
    unmarked = [item.nodeid for item in mine if live.layer_of(m.name for m in item.iter_markers()) == "?"]
    if unmarked:
        raise pytest.UsageError("live checks without a layer marker: " + ", ".join(unmarked))
    # Run the layers bottom up (proxmox first, apps last), as the report lists them.
    layers = list(live.MARKERS)
    rank = {id(item): layers.index(live.layer_of(m.name for m in item.iter_markers())) for item in mine}
    items.sort(key=lambda item: rank.get(id(item), len(layers)))
    if mine and config.stash[TARGET] == "lab" and not config.option.collectonly:
        try:
            live.join_lab()  # before any fixture opens a connection; pytest is still single-threaded
        except HomelabError as exc:
            raise pytest.UsageError(str(exc)) from None


# ---------------------------------------------------------------------------------- parameters


@functools.cache
def _inventory(path: str | None) -> inventory.Inventory:
    return inventory.load(path)


@functools.cache
def _rendered(path: str | None) -> tuple[dict[str, Any], ...]:
    inv = _inventory(path)
    return tuple(manifests.render(inv, issuer=inv.network.cert_issuer).objects)


def _workload_apps(path: str | None) -> list[tuple[inventory.App, str | None, str, list[tuple[str, str]]]]:
    """(app, its chart's release, namespace, declared (kind, name)) of each app with workloads to check."""
    inv, objects = _inventory(path), _rendered(path)
    charts = [o for o in objects if o["kind"] == "HelmChart"]
    out = []
    for app in inv.apps:
        component = live.BUNDLED.get(app.name) or (app.name if app.name in manifests.COMPONENTS else None)
        if component is None:
            component = next((c["metadata"]["labels"][manifests.COMPONENT] for c in charts
                              if c["spec"].get("chart") == app.name), None)
        if component is None:
            continue  # not ours: K3s's bundled CoreDNS comes from neither our manifests nor a chart of ours
        chart = next((c for c in charts if c["metadata"]["labels"][manifests.COMPONENT] == component), None)
        declared = [(o["kind"], o["metadata"]["name"]) for o in objects
                    if o["kind"] in ("Deployment", "StatefulSet")
                    and o["metadata"]["labels"][manifests.COMPONENT] == component
                    and o["metadata"].get("namespace") == app.namespace]
        if chart is None and not declared:
            continue
        namespace = chart["spec"].get("targetNamespace", app.namespace) if chart else app.namespace
        out.append((app, chart["metadata"]["name"] if chart else None, namespace, declared))
    return out


def _group_mark(app: inventory.App) -> pytest.MarkDecorator:
    return pytest.mark.monitoring if app.group == "monitoring" else pytest.mark.apps


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    path = metafunc.config.getoption("--live-inventory")
    inv = _inventory(path)
    # A module without a layer marker of its own (test_apps.py) marks each app by its group.
    by_group = not getattr(metafunc.module, "pytestmark", None)

    def apps(values: list[inventory.App], ident: Callable[[inventory.App], str]) -> list[Any]:
        return [pytest.param(a, id=ident(a), marks=[_group_mark(a)] if by_group else []) for a in values]

    named = [a for a in inv.apps if a.hostname]
    table: dict[str, list[Any]] = {
        "pve_node": [pytest.param(n, id=n.name) for n in inv.proxmox.nodes],
        "vm": [pytest.param(vm, id=vm.name) for vm in inv.k3s.vms],
        "helmchart": [pytest.param(o, id=o["metadata"]["name"]) for o in _rendered(path) if o["kind"] == "HelmChart"],
        "hostname_app": apps(named, lambda a: str(a.hostname)),
        "public_app": apps([a for a in named if a.access == "public"], lambda a: str(a.hostname)),
        "internal_app": apps([a for a in named if a.access == "internal"], lambda a: str(a.hostname)),
        "exposed_app": apps(named, lambda a: a.name),
        "workload_app": [pytest.param(entry, id=entry[0].name, marks=[_group_mark(entry[0])] if by_group else [])
                         for entry in _workload_apps(path)],
    }
    for name, params in table.items():
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, params)


# ------------------------------------------------------------------------------------ sessions


class Live:
    """The target, the run and its clients, opened on first use and closed at the end of the session."""

    def __init__(self, config: pytest.Config) -> None:
        self.inventory_path: str | None = config.getoption("--live-inventory")
        self.inv = _inventory(self.inventory_path)
        self.rendered = _rendered(self.inventory_path)
        self.target_name = config.stash[TARGET]
        self._cache: dict[Any, Any] = {}
        self._scratch: Any = None

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """Each answer read once per session; a failure is remembered too, so every check reports it fast."""
        if key not in self._cache:
            try:
                self._cache[key] = ("ok", make())
            except HomelabError as exc:
                self._cache[key] = ("error", exc)
        kind, value = self._cache[key]
        if kind == "error":
            raise value
        return value

    @functools.cached_property
    def run(self) -> Any:
        from rich.console import Console

        from homelab import target
        from homelab.context import Run
        from homelab.wait import Silent

        return Run(inv=self.inv, target=target.resolve(self.target_name, self.inv),
                   console=Console(quiet=True), progress=Silent())

    @property
    def target(self) -> Any:
        return self.memo("target", lambda: self.run.target)

    # --- Proxmox
    def pve(self, path: str, **params: Any) -> Any:
        return self.memo(("pve", path, tuple(sorted(params.items()))), lambda: self.run.proxmox.get(path, **params))

    # --- Kubernetes
    @property
    def kube(self) -> Any:
        """The cluster's API with the target's kubeconfig; its discovery cache goes to a private temporary
        directory, so the suite writes nothing into the operator's state that a concurrent run uses."""

        def make() -> Any:
            import tempfile
            from urllib.parse import urlsplit

            from homelab.clients.kube import Kube
            from homelab.errors import ConfigError
            from homelab.layers.k3s import CONTEXT

            path = self.target.state_dir / "kubeconfig"
            if not path.is_file():
                raise ConfigError(f"no kubeconfig at {path}", hint="the k3s layer fetches it: invoke up --to k3s")
            self._scratch = tempfile.TemporaryDirectory(prefix="homelab-live-")
            k = Kube(path, CONTEXT, Path(self._scratch.name))
            self.run.guard(urlsplit(k.api.configuration.host).hostname or "")
            self.run.kube = k
            return k

        return self.memo("kube", make)

    def items(self, api_version: str, kind: str) -> list[dict[str, Any]]:
        """Every object of a kind in every namespace (one list, read once)."""
        return list(self.memo(("list", api_version, kind), lambda: self.kube.list(api_version, kind, "")))

    def get(self, path: str) -> Any:
        return self.memo(("get", path), lambda: self.kube.request("GET", path))

    # --- the outside world
    def secrets_or_skip(self, *names: str, what: str) -> None:
        missing = [n for n in names if not self.target.secret(n)]
        if missing:
            pytest.skip(f"{what}: {', '.join(missing)} not set for target {self.target_name} (see README, "
                        "Configuration)")

    @property
    def cloudflare(self) -> Any:
        from homelab.layers import access

        self.secrets_or_skip("CLOUDFLARE_API_TOKEN", "CLOUDFLARE_ACCOUNT_ID", what="the Cloudflare API")
        return self.memo("cloudflare", lambda: access.cloudflare(self.run))

    @property
    def tailscale(self) -> Any:
        from homelab.layers import access

        self.secrets_or_skip("TS_OAUTH_CLIENT_ID", "TS_OAUTH_CLIENT_SECRET", what="the Tailscale API")
        return self.memo("tailscale", lambda: access.tailscale(self.run))

    def resolve(self, name: str, view: str) -> live.Answer:
        """A records of name in the public view or the tailnet's (MagicDNS: split DNS applies)."""
        server = self.target.public_resolver if view == "public" else self.target.tailnet_resolver
        self.run.guard(server)
        answer: live.Answer = self.memo(("dns", name, server), lambda: live.resolve(name, server))
        if view == "tailnet" and self.target_name == "live" and answer.error and answer.error.startswith("timeout"):
            pytest.skip(f"the tailnet resolver {server} does not answer: this machine is not on the tailnet "
                        "(run the live suite from a tailnet member)")
        return answer

    # --- TLS
    def unreachable(self, address: str, port: int = 443) -> str | None:
        """Why address:port takes no TCP connection (asked once per session), or None."""
        import socket

        def probe() -> str | None:
            self.run.guard(address)
            try:
                socket.create_connection((address, port), timeout=5).close()
            except OSError as exc:
                return f"{address}:{port} takes no connection ({exc.strerror or exc})"
            return None

        problem: str | None = self.memo(("tcp", address, port), probe)
        return problem

    def outside_context(self) -> Any:
        """Trust for the outside world (Cloudflare's edge): the target's outside CA, else the system's roots."""
        return live.context(self.target.outside_ca)

    def ingress_roots(self) -> str:
        """PEM of what the cluster's certificates must chain to: live, the system's roots (empty here);
        lab, the k3s stand-in's CA for the inventory's issuer (GET /standin/acme-roots)."""
        if self.target_name != "lab":
            return ""
        roots = self.get("/standin/acme-roots") or {}
        issuer = self.inv.network.cert_issuer
        if issuer not in roots:
            raise HomelabError(f"the lab's cert-manager double has no CA for issuer {issuer} (it has "
                               f"{live.listing(roots) or 'none'}); see manifests/cert-manager")
        return str(roots[issuer])

    def ingress_context(self) -> Any:
        roots = self.ingress_roots()
        return live.context(True) if not roots else live.context(cadata=roots)

    # --- nodes
    @functools.cached_property
    def ssh(self) -> Any:
        from homelab.clients.ssh import Hosts

        t = self.target
        # A node on the LAN answers SSH in well under a second; 5 s keeps a stopped one from stalling the suite.
        return Hosts(self.inv.k3s.user, t.ssh_private_key, t.known_hosts, timeout=5.0, guard=self.run.guard)

    def host(self, vm: inventory.Vm) -> Any:
        """testinfra's Host for a VM, on the session's one SSH connection to it."""

        def make() -> Any:
            try:
                return _testinfra_host(self.ssh, str(vm.address))
            except HomelabError as exc:
                raise HomelabError(f"{exc.message} (as {self.inv.k3s.user}, VM {vm.name})",
                                   hint=exc.hint or f"is {vm.name} running (the vms checks) and its sshd up? host "
                                                    f"keys are checked against {self.target.known_hosts}") from None

        return self.memo(("host", vm.name), make)

    def close(self) -> None:
        if "ssh" in self.__dict__:
            self.ssh.close()
        if "run" in self.__dict__:
            self.run.close()
        if self._scratch is not None:
            self._scratch.cleanup()


def _testinfra_host(hosts: Any, address: str) -> Any:
    """A testinfra Host whose paramiko client is homelab's: host keys checked against the target's known_hosts
    with RejectPolicy. (testinfra's own paramiko backend reads no known_hosts and accepts any key with a
    warning, even on a reconnect; this backend reconnects through homelab's client as well.)"""
    import testinfra.host
    from testinfra.backend.paramiko import ParamikoBackend

    class CheckedParamiko(ParamikoBackend):
        @functools.cached_property
        def client(self) -> Any:
            return hosts.connect(address).client

    hosts.connect(address)  # connect now: an unreachable node or a wrong host key fails here, with homelab's words
    return testinfra.host.Host(CheckedParamiko(f"paramiko://{hosts.user}@{address}", timeout=int(hosts.timeout)))


@pytest.fixture(scope="session")
def homelab(pytestconfig: pytest.Config) -> Iterator[Live]:
    """The session's view of the homelab, on either target."""
    session = Live(pytestconfig)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture(scope="session")
def inv(homelab: Live) -> inventory.Inventory:
    return homelab.inv


@pytest.fixture(scope="session")
def target_name(homelab: Live) -> str:
    return homelab.target_name


@pytest.fixture
def node(homelab: Live, vm: inventory.Vm) -> Any:
    return homelab.host(vm)


@pytest.fixture
def measured(request: pytest.FixtureRequest) -> Callable[[object], None]:
    """Record the value a check measured; it goes to the Markdown report and the JUnit XML."""

    def record(value: object) -> None:
        request.node.user_properties.append(("measured", str(value)))

    return record


def fail_unless(ok: bool, message: str) -> None:
    """Fail with exactly this message (no assertion rewriting, no traceback): expected, found, where to look."""
    if not ok:
        pytest.fail(message, pytrace=False)

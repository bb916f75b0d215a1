"""Fixtures for the end-to-end lab tests: a running lab, the pipeline run against it, SSH into the VMs.

Everything that talks to the inventory's addresses runs inside the lab's network namespace:
`invoke` re-executes itself there, and SSH reaches the VMs through a ProxyCommand that opens
the TCP connection from inside the namespace. The test process itself never sends a packet to
192.168.7.0/24.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import testinfra

from homelab import inventory
from homelab.lab import layout
from homelab.target import read_env_file
from homelab.wait import Silent, poll

REPO = Path(__file__).resolve().parents[2]
NEEDS = {"ip": "iproute2", "nsenter": "util-linux", "systemd-nspawn": "systemd-container",
         "debootstrap": "debootstrap", "ssh": "openssh-client", "nc": "netcat-openbsd"}


def _prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "the lab tests need root (network namespaces, mounts, containers)"
    missing = sorted({pkg for tool, pkg in NEEDS.items() if shutil.which(tool) is None})
    if missing:
        return f"the lab tests need the Debian packages {', '.join(missing)} (apt-get install {' '.join(missing)})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problem = _prerequisites()
    if problem is None:
        return
    if os.environ.get("CI"):
        # Under CI the lab tests run, never skip: a missing prerequisite is a failure.
        raise pytest.UsageError(f"CI: {problem}")
    for item in items:
        item.add_marker(pytest.mark.skip(reason=problem))


def _journal(vmid: int, lines: int) -> str:
    """The last lines of a VM's journal (the containers keep it under their rootfs), or why there are none."""
    journal = layout.VAR / "vms" / str(vmid) / "root" / "var" / "log" / "journal"
    if not journal.is_dir() or shutil.which("journalctl") is None:
        return f"(no journal at {journal})"
    done = subprocess.run(["journalctl", "-D", str(journal), "-n", str(lines), "--no-pager", "-o", "short-precise"],
                          capture_output=True, text=True, timeout=30, check=False)
    return done.stdout or done.stderr


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed lab test (or fixture) carries the supervisor's log and the control plane's journal: CI keeps
    nothing else."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "teardown" or not report.failed:  # a fixture's failure shows at setup
        return
    log = layout.STATE / layout.LOG
    if log.is_file():
        tail = log.read_text(errors="replace").splitlines()[-40:]
        report.sections.append(("lab supervisor log (tail)", "\n".join(tail)))
    for vm in INV.k3s.vms:
        if vm.role == "server":
            report.sections.append((f"journal of {vm.name} (tail)", _journal(vm.vmid, 120)))


@dataclass
class Result:
    argv: list[str]
    code: int
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err


def invoke(*args: str, timeout: float = 900) -> Result:
    argv = [sys.executable, "-m", "invoke", *args]
    started = time.monotonic()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "HOMELAB_TARGET": "lab"})
    return Result(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - started)


@dataclass
class Lab:
    up: Result
    timings: dict[str, float] = field(default_factory=dict)
    up_finished: float = 0.0

    @property
    def env(self) -> dict[str, str]:
        return read_env_file(layout.STATE / layout.TARGET_ENV)

    def ssh_config(self, path: Path) -> Path:
        env = self.env
        path.write_text("\n".join([
            "Host *",
            f"  User {inventory.load().k3s.user}",
            f"  IdentityFile {env['HOMELAB_SSH_PRIVATE_KEY']}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {env['HOMELAB_KNOWN_HOSTS']}",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 10",
            f"  ProxyCommand ip netns exec {layout.NETNS} nc %h %p",
            "",
        ]), encoding="utf-8")
        return path


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """A running lab for the session; torn down at the end whatever happened."""
    result = invoke("lab.up", timeout=1800)
    try:
        assert result.code == 0, result.text
        yield Lab(result)
    finally:
        down = invoke("lab.down")
        assert down.code == 0, down.text



PROXMOX = "ceph,sdn,vms"
INV = inventory.load()


@pytest.fixture(scope="session")
def built(lab: Lab) -> Lab:
    """The lab after `invoke up --target lab` of the Proxmox layers."""
    result = invoke("up", "--only", PROXMOX, timeout=900)
    assert result.code == 0, result.text
    lab.timings["up"] = result.seconds
    lab.up_finished = time.monotonic()
    return lab


@pytest.fixture(scope="session")
def ssh_config(built: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SSH settings for the VMs, once each VM's host keys are recorded and sshd answers (boot, cloud-init)."""
    config = built.ssh_config(tmp_path_factory.mktemp("ssh") / "config")
    known_hosts = Path(built.env["HOMELAB_KNOWN_HOSTS"])

    def probe(vm: inventory.Vm) -> tuple[bool | None, str]:
        if not known_hosts.exists() or str(vm.address) not in known_hosts.read_text():
            return None, "host keys not recorded yet"
        done = subprocess.run(["ssh", "-F", str(config), str(vm.address), "true"], capture_output=True, text=True,
                              timeout=30, check=False)
        return (True if done.returncode == 0 else None), done.stderr.strip()[-120:]

    for vm in INV.k3s.vms:
        poll(f"SSH on {vm.name}", lambda vm=vm: probe(vm), timeout=300, progress=Silent(), first=0.5, maximum=3)
        built.timings[f"ssh {vm.name}"] = time.monotonic() - built.up_finished
    return config


def host(name: str, ssh_config: Path) -> testinfra.host.Host:
    vm = INV.vm(name)
    return testinfra.get_host(f"ssh://{vm.address}", ssh_config=str(ssh_config))

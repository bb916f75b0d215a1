"""Fixtures: a LabPve served over HTTPS on 127.0.0.1, and runs of the pipeline against it."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fakepve.certs import make_cert
from rich.console import Console

from homelab import inventory, pipeline
from homelab.context import Run, Timeouts
from homelab.inventory import Inventory
from homelab.lab.pve import LabPve
from homelab.lab.pvessh import LabPveSsh
from homelab.lab.serving import Background
from homelab.target import ProxmoxAccess, Secret, Target
from homelab.wait import Progress

# cloud-init's own parser, where it can be imported from (the lab session points this at the lab
# rootfs's Debian cloud-init, so the seed is checked by the cloud-init that will read it).
if os.environ.get("HOMELAB_CLOUDINIT_PATH"):
    sys.path.append(os.environ["HOMELAB_CLOUDINIT_PATH"])

HOST = "127.0.0.1"
TOKEN_ID, TOKEN_SECRET = "root@pam!homelab", "unit-test-token-secret"
PROXMOX_LAYERS = ["ceph", "sdn", "vms"]
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHomelabUnitTestKeyHomelabUnitTestKey01 operator@test"


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Unit tests never write the operator's home: its state dir, keys and known_hosts live in a temporary one."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        mp.delenv("HOMELAB_STATE", raising=False)
        yield home


@pytest.fixture(scope="session")
def ssh_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An operator key pair for SSH to the PVE hosts: (private key file, public key line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path_factory.mktemp("operator-ssh") / "id_ed25519"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return path, public.decode() + " operator@test"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    certfile, keyfile, _ = make_cert(str(tmp_path_factory.mktemp("pve-pki")), hosts=(HOST,))
    return certfile, keyfile


@dataclass
class Cluster:
    """A fake PVE cluster shaped like the inventory's: pve-alpha, pve-beta, pve-gamma, Ceph, SDN."""

    pve: LabPve
    loop: Background
    cafile: str
    key_path: Path
    inv: Inventory
    ssh: LabPveSsh
    ssh_key: Path
    known_hosts: Path

    def run(self, inv: Inventory | None = None, agent_timeout: float = 20.0) -> Run:
        target = Target("lab", ProxmoxAccess(TOKEN_ID, Secret(TOKEN_SECRET), self.cafile, (HOST, self.pve.port),
                                             ssh_endpoint=(HOST, self.ssh.port)),
                        ssh_public_key=self.key_path, ssh_private_key=self.ssh_key, known_hosts=self.known_hosts)
        out = Console(file=io.StringIO(), width=200, highlight=False, soft_wrap=True)
        return Run(inv or self.inv, target, out, Progress(out), Timeouts(task=60, guest_agent=agent_timeout))

    def up(self, inv: Inventory | None = None, dry_run: bool = False,
           layers: list[str] | None = None) -> tuple[pipeline.Outcome, Run]:
        run = self.run(inv)
        return pipeline.execute(run, "up", layers or PROXMOX_LAYERS, dry_run=dry_run), run

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run(coro)

    def vm(self, name: str) -> Any:
        found = [vm for vm in self.pve.vms if vm.name == name]
        assert len(found) == 1, f"{len(found)} VMs named {name}"
        return found[0]


@pytest.fixture
def cluster(pki: tuple[str, str], ssh_pair: tuple[Path, str], tmp_path: Path) -> Iterator[Cluster]:
    inv = inventory.load()
    pve = LabPve(host=HOST, port=0, node_ips={n.name: str(n.address) for n in inv.proxmox.nodes},
                 simulate_guests=True)
    pve.time_scale = 0
    pve.apitokens[TOKEN_ID] = TOKEN_SECRET
    loop = Background()
    loop.run(pve.start(*pki))
    key = tmp_path / "id_ed25519.pub"
    key.write_text(SSH_KEY + "\n", encoding="utf-8")
    (tmp_path / "pve-ssh").mkdir(mode=0o700)
    ssh = LabPveSsh(pve, ssh_pair[1], tmp_path / "pve-ssh" / "host_key")
    ssh.start([HOST], 0)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("\n".join(ssh.known_hosts_lines()) + "\n", encoding="utf-8")
    try:
        yield Cluster(pve, loop, pki[0], key, inv, ssh, ssh_pair[0], known_hosts)
    finally:
        ssh.stop()
        loop.run(pve.stop())
        loop.close()


@pytest.fixture
def converged(cluster: Cluster) -> Cluster:
    """The cluster after one successful `up` of the Proxmox layers."""
    outcome, run = cluster.up()
    assert not outcome.failed, output(run)
    return cluster


def output(run: Run) -> str:
    file = run.console.file
    assert isinstance(file, io.StringIO)
    return file.getvalue()


@pytest.fixture
def edit() -> Callable[..., Inventory]:
    """The shipped inventory with some values changed: edit(("k3s", "vms", 1, "memory_mib"), 32768)."""
    import yaml

    def change(*edits: tuple[tuple[str | int, ...], Any]) -> Inventory:
        data = yaml.safe_load(inventory.DEFAULT_PATH.read_text(encoding="utf-8"))
        for path, value in edits:
            node = data
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        return inventory.parse(yaml.safe_dump(data), "edited.yaml")

    return change

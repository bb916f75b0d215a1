"""One run of the pipeline: the inventory, the target, the console and the clients, opened lazily."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from homelab.clients.proxmox import Endpoint, Proxmox
from homelab.clients.ssh import Hosts
from homelab.inventory import Inventory
from homelab.target import Target
from homelab.wait import Progress


@dataclass
class Timeouts:
    """Deadlines in seconds for the waits of a run."""

    task: float = 900.0
    guest_agent: float = 600.0
    k3s: float = 600.0
    ssh: float = 600.0


@dataclass
class Run:
    inv: Inventory
    target: Target
    console: Console
    progress: Progress
    timeouts: Timeouts = field(default_factory=Timeouts)
    _proxmox: Proxmox | None = None
    # SSH connections to the nodes, opened by the first layer that needs them and closed at the end.
    ssh: Hosts | None = None
    # SSH to the PVE hosts as root (Ceph auth has no REST endpoint), opened on first use.
    pve_ssh: Hosts | None = None
    # The cluster's API (homelab.clients.kube.Kube), opened by the first Kubernetes layer.
    kube: Any = None
    # Facts read once per run and shared between layers (e.g. the Ceph fsid).
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def proxmox(self) -> Proxmox:
        """The PVE API, reached at the PVE hosts' addresses in inventory order (or the target's override)."""
        if self._proxmox is None:
            access = self.target.proxmox
            if access.endpoint:
                endpoints = [Endpoint(access.endpoint[0], access.endpoint[1], "override")]
            else:
                endpoints = [Endpoint(str(n.address), self.inv.proxmox.api_port, n.name)
                             for n in self.inv.proxmox.nodes]
            for endpoint in endpoints:
                self.guard(endpoint.host)
            self._proxmox = Proxmox(endpoints, access.token_id, access.token_secret.value, access.ca_bundle)
        return self._proxmox

    def guard(self, host: str) -> None:
        """Refuse a destination the target must not reach from here (see homelab.safety)."""
        from homelab import safety

        safety.check(self.target.name, host)

    def api_requests(self) -> int:
        return self._proxmox.stats.total if self._proxmox else 0

    def kube_requests(self) -> int:
        return int(self.kube.calls) if self.kube is not None else 0

    def ssh_connections(self) -> int:
        return (self.ssh.opened if self.ssh else 0) + (self.pve_ssh.opened if self.pve_ssh else 0)

    def close(self) -> None:
        for hosts in (self.ssh, self.pve_ssh):
            if hosts is not None:
                hosts.close()

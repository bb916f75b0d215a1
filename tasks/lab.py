"""The lab twin: the inventory's home network, Proxmox cluster and VMs on this machine."""

from __future__ import annotations

from invoke.collection import Collection
from invoke.context import Context
from invoke.tasks import task

from homelab import cli
from homelab.errors import NotBuilt


@task
@cli.exits
def up(c: Context) -> None:
    """Start the lab: network namespace, fakepve at the PVE hosts' addresses, DNS, VM containers."""
    raise NotBuilt("lab.up is not built yet (issue 3: the lab twin)")


@task(help={"purge": "also remove the cached Debian rootfs"})
@cli.exits
def down(c: Context, purge: bool = False) -> None:
    """Stop the lab and remove every namespace, mount, container and process it started."""
    raise NotBuilt("lab.down is not built yet (issue 3: the lab twin)")


@task
@cli.exits
def status(c: Context) -> None:
    """Show whether the lab runs, its addresses, and the state of each VM container."""
    raise NotBuilt("lab.status is not built yet (issue 3: the lab twin)")


ns = Collection("lab", up, down, status)

"""The lab twin: the inventory's home network, Proxmox cluster and VMs on this machine (needs root)."""

from __future__ import annotations

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from homelab import cli


@task(help={"inventory": "inventory file (default inventory/homelab.yaml; env HOMELAB_INVENTORY)"})
@cli.exits
def up(c: Context, inventory: str | None = None) -> None:
    """Start the lab: a network namespace holding the home network (no route out), fakepve at the PVE
    hosts' addresses with a lab CA and an API token, the lab DNS, and a container for each VM fakepve
    starts. Builds the Debian rootfs once (a few minutes). A second lab.up while one runs changes nothing.
    """
    from homelab.lab import control

    control.up(cli.load_inventory(inventory), cli.console())


@task(help={"purge": "also remove the cached Debian rootfs"})
@cli.exits
def down(c: Context, purge: bool = False) -> None:
    """Stop the lab: halt every VM container, stop fakepve and DNS, remove every namespace, mount,
    cgroup and file the lab made, and check that nothing is left. The rootfs cache stays (see --purge).
    """
    from homelab.lab import control

    if control.down(cli.console(), purge=purge):
        raise Exit(code=1)


@task
@cli.exits
def status(c: Context) -> None:
    """Show whether the lab runs, its supervisor, namespaces and VM containers."""
    from homelab.lab import control, layout

    st = control.status()
    out = cli.console()
    if not st.running:
        out.print("the lab is not running" + (": leftovers " + "; ".join(st.leftovers) if st.leftovers else ""))
        raise Exit(code=3)
    out.print(f"the lab is running: supervisor pid {st.pid}, state in {layout.STATE}")
    out.print(f"  namespaces: {', '.join(st.namespaces)}")
    for vm in st.vms:
        state = f"running (nspawn pid {vm['pid']})" if vm["running"] else "stopped"
        out.print(f"  VM {vm['vmid']} {vm['name']}: {state}")


ns = Collection("lab", up, down, status)

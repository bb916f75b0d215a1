"""The lab twin: the inventory's home network, Proxmox cluster and VMs on this machine (needs root)."""

from __future__ import annotations

from typing import Any

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.parser.argument import Argument
from invoke.tasks import Task, task

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


class _NameArgument(Argument):
    """A positional NAME that is not required once one of the task's mode flags is given."""

    def __init__(self, modes: list[Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.modes = modes

    @property
    def value(self) -> Any:
        if self._value is None and any(mode.value for mode in self.modes):
            return ""
        return self._value if self._value is not None else self.default

    @value.setter
    def value(self, arg: str) -> None:
        self.set_value(arg, cast=True)


class _FaultTask(Task[Any]):
    """`lab.fault NAME | --list | --clear | --markdown`: Invoke has no optional positional arguments."""

    def get_arguments(self, ignore_unknown_help: bool | None = None) -> list[Any]:
        args: list[Any] = super().get_arguments(ignore_unknown_help)
        modes = [a for a in args if a.attr_name in ("list_", "clear", "markdown") or a.name in ("clear", "markdown")]
        return [_NameArgument(modes, names=a.names, kind=str, help=a.help, positional=True, attr_name=a.attr_name)
                if a.name == "name" else a for a in args]


@task(klass=_FaultTask, positional=["name"],
      help={"name": "the fault to inject (see --list)", "list_": "print the catalog: name, layer, what it breaks, "
            "the live checks it must trip", "clear": "mend the active fault and check it is mended (no-op when "
            "none is)", "markdown": "print the catalog as a Markdown table (for the README)",
            "inventory": "inventory file (default inventory/homelab.yaml; env HOMELAB_INVENTORY)"})
@cli.exits
def fault(c: Context, name: str | None = None, list_: bool = False, clear: bool = False, markdown: bool = False,
          inventory: str | None = None) -> None:
    """Break one thing in the running lab on purpose (one fault at a time), or mend it with --clear.

    Each fault names the live-suite checks it must trip. Injecting records the original values in the
    lab's state (faults.json); --clear restores exactly those and waits until the lab is mended.
    """
    import sys

    from homelab.lab import faults

    out = cli.console()
    if markdown:
        sys.stdout.write(faults.markdown_table())
        return
    if list_:
        from rich.table import Table

        table = Table("fault", "layer", "what it breaks", "checks it must trip", show_lines=True)
        for row in faults.describe():
            table.add_row(*row)
        out.print(table)
        return
    if clear == bool(name):
        raise Exit("give a fault NAME, --list or --clear (see `invoke --help lab.fault`)", code=2)
    if name:
        faults.find(name)
    elif faults.active() is None:
        out.print("no fault is active; nothing to clear")
        return
    lab = faults.open_lab(cli.load_inventory(inventory), out, sys.argv[1:])
    try:
        if name:
            faults.inject(name, lab, out=out)
        else:
            faults.clear(lab, out=out)
    finally:
        lab.close()


ns = Collection("lab", up, down, status, fault)

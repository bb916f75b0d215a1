"""The root tasks: the whole pipeline (up, down, plan) and the inventory check."""

from __future__ import annotations

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from homelab import cli

COMMON_HELP = {
    "only": "comma-separated layers to run, e.g. --only ceph,sdn,vms",
    "from_": "start at this layer (inclusive)",
    "to": "stop after this layer (inclusive)",
    "target": "where to realise the inventory: lab (default; env HOMELAB_TARGET) or live",
    "inventory": "inventory file (default inventory/homelab.yaml; env HOMELAB_INVENTORY)",
}


@task(help={**COMMON_HELP, "dry_run": "print the plan and change nothing"})
@cli.exits
def up(c: Context, only: str | None = None, from_: str | None = None, to: str | None = None,
       dry_run: bool = False, target: str | None = None, inventory: str | None = None) -> None:
    """Build the homelab: ceph -> sdn -> vms -> k3s -> network -> access -> monitoring -> apps.

    Each layer reads the actual state, diffs it against the inventory and applies only the
    difference; a second run changes nothing. Ends with a recap per layer.
    """
    from homelab import pipeline

    code = pipeline.run_task("up", cli.load_inventory(inventory), cli.target_name(target),
                             pipeline.select(cli.split_names(only), from_, to), dry_run=dry_run)
    if code:
        raise Exit(code=code)


@task(help={**COMMON_HELP, "dry_run": "print what would be removed and change nothing",
            "yes": "really remove (without it, down only prints its plan)"})
@cli.exits
def down(c: Context, only: str | None = None, from_: str | None = None, to: str | None = None,
         dry_run: bool = False, yes: bool = False, target: str | None = None, inventory: str | None = None) -> None:
    """Remove what `up` made, in reverse order (apps first, Ceph last). Needs --yes to act."""
    from homelab import pipeline

    code = pipeline.run_task("down", cli.load_inventory(inventory), cli.target_name(target),
                             pipeline.select(cli.split_names(only), from_, to), dry_run=dry_run or not yes,
                             refuse_without_yes=not yes and not dry_run)
    if code:
        raise Exit(code=code)


@task(help={**COMMON_HELP, "json": "print the plan as JSON: a list of changes with layer, kind, name, action, fields"})
@cli.exits
def plan(c: Context, only: str | None = None, from_: str | None = None, to: str | None = None,
         json: bool = False, target: str | None = None, inventory: str | None = None) -> None:
    """Show what `up` would change, layer by layer (reads only, writes nothing)."""
    from homelab import pipeline

    code = pipeline.run_task("plan", cli.load_inventory(inventory), cli.target_name(target),
                             pipeline.select(cli.split_names(only), from_, to), dry_run=True, as_json=json)
    if code:
        raise Exit(code=code)


@task(help={"inventory": COMMON_HELP["inventory"]})
@cli.exits
def check(c: Context, inventory: str | None = None) -> None:
    """Validate the inventory as a whole and print a summary.

    Exit 0 when valid; exit 2 with one line per problem (file:line, field paths, values) when not.
    """
    from homelab import inventory as inv_mod

    inv = cli.load_inventory(inventory)
    out = cli.console()
    for line in inv_mod.summary(inv):
        out.print(line, markup=False)
    out.print(f"[green]ok[/]: {inv_mod.default_path() if inventory is None else inventory} is consistent")

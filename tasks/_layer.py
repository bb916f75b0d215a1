"""Builds the namespace of one pipeline layer: `<layer>.up`, `<layer>.plan`, `<layer>.down`.

Every layer module calls `collection(...)` with its own description, so `invoke --list` and
`invoke <layer>.up --help` explain the layer in its own words.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import Task, task

from homelab import cli

HELP = {
    "dry_run": "print the plan and change nothing",
    "target": "lab (default; env HOMELAB_TARGET) or live",
    "inventory": "inventory file (default inventory/homelab.yaml; env HOMELAB_INVENTORY)",
}


def _run(layer: str, verb: str, **kw: Any) -> None:
    from homelab import pipeline

    code = pipeline.run_task(verb, cli.load_inventory(kw.pop("inventory")), cli.target_name(kw.pop("target")),
                             [layer], **kw)
    if code:
        raise Exit(code=code)


def collection(layer: str, what: str, extra: tuple[Task[Callable[..., Any]], ...] = ()) -> Collection:
    """The `layer` namespace: up, plan and down for this layer alone, plus any extra tasks."""

    def up(c: Context, dry_run: bool = False, target: str | None = None, inventory: str | None = None) -> None:
        _run(layer, "up", dry_run=dry_run, target=target, inventory=inventory)

    def plan(c: Context, json: bool = False, target: str | None = None, inventory: str | None = None) -> None:
        _run(layer, "plan", dry_run=True, as_json=json, target=target, inventory=inventory)

    def down(c: Context, dry_run: bool = False, yes: bool = False, target: str | None = None,
             inventory: str | None = None) -> None:
        _run(layer, "down", dry_run=dry_run or not yes, refuse_without_yes=not yes and not dry_run,
             target=target, inventory=inventory)

    up.__doc__ = f"Converge the {layer} layer: {what}"
    plan.__doc__ = f"Show what `{layer}.up` would change ({what}); writes nothing."
    down.__doc__ = f"Remove what `{layer}.up` made ({what}). Needs --yes to act."
    ns = Collection(layer)
    ns.add_task(task(help=HELP)(cli.exits(up)), name="up", default=True)
    plan_help = {k: v for k, v in HELP.items() if k != "dry_run"}
    ns.add_task(task(help={**plan_help, "json": "print the plan as JSON"})(cli.exits(plan)), name="plan")
    ns.add_task(task(help={**HELP, "yes": "really remove"})(cli.exits(down)), name="down")
    for extra_task in extra:
        ns.add_task(extra_task)
    return ns

"""The k3s layer.

K3s server and agents over SSH: node preparation, the pinned binary (sha256 verified), our own
systemd units and config, the shared token, and the kubeconfig.
"""

from __future__ import annotations

from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from homelab import cli
from tasks._layer import HELP, collection


@task(help={"version": "the K3s release to roll out, e.g. v1.33.6+k3s1", "target": HELP["target"],
            "inventory": HELP["inventory"], "dry_run": HELP["dry_run"]})
@cli.exits
def upgrade(c: Context, version: str, dry_run: bool = False, target: str | None = None,
            inventory: str | None = None) -> None:
    """Roll K3s to another version, one node at a time, control plane first.

    Each node is cordoned, drained, gets the new binary (sha256 verified), restarts, and is
    uncordoned once Ready on the new version; the roll stops at the first node that does not
    come back. Set k3s.version in the inventory to the same version afterwards, or the next
    `invoke up` rolls back.
    """
    import re

    from homelab import pipeline
    from homelab.layers.k3s import K3sLayer

    if not re.fullmatch(r"v\d+\.\d+\.\d+\+k3s\d+", version):
        raise Exit(f"{version!r} is not a K3s version (like v1.33.6+k3s1)", code=2)
    registry = {**pipeline.layers(), "k3s": K3sLayer(version=version)}
    code = pipeline.run_task("up", cli.load_inventory(inventory), cli.target_name(target), ["k3s"],
                             dry_run=dry_run, registry=registry)
    if code:
        raise Exit(code=code)


@task(help={"target": HELP["target"], "inventory": HELP["inventory"], "yes": "really uninstall",
            "dry_run": HELP["dry_run"]})
@cli.exits
def uninstall(c: Context, yes: bool = False, dry_run: bool = False, target: str | None = None,
              inventory: str | None = None) -> None:
    """Uninstall K3s from every node (agents first): units, binary, config, token, data, kubeconfig."""
    from homelab import pipeline

    code = pipeline.run_task("down", cli.load_inventory(inventory), cli.target_name(target), ["k3s"],
                             dry_run=dry_run or not yes, refuse_without_yes=not yes and not dry_run)
    if code:
        raise Exit(code=code)


ns = collection(
    "k3s",
    "K3s server and agents over SSH, the shared token and the kubeconfig",
    extra=(upgrade, uninstall),
)

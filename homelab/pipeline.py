"""The pipeline: the layers in dependency order, run as plan -> apply, with a recap at the end.

    ceph -> sdn -> vms -> k3s -> network -> access -> monitoring -> apps

The VMs' disks live on the Ceph pool's storage and their second NIC on the SDN vnet, so the
Proxmox layers come first; `down` runs the same list backwards.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Protocol

from rich.console import Console
from rich.markup import escape

from homelab import plan as planlib
from homelab.context import Run
from homelab.errors import HomelabError, NotBuilt
from homelab.inventory import Inventory
from homelab.wait import Progress

ORDER = ("ceph", "sdn", "vms", "k3s", "network", "access", "monitoring", "apps")


class Layer(Protocol):
    name: str

    def plan_up(self, run: Run) -> planlib.LayerPlan: ...

    def plan_down(self, run: Run) -> planlib.LayerPlan: ...


class NotBuiltLayer:
    """A layer of the pipeline whose implementation does not exist yet: it says so, loudly."""

    def __init__(self, name: str, issue: str) -> None:
        self.name = name
        self.issue = issue

    def _refuse(self, run: Run) -> planlib.LayerPlan:
        raise NotBuilt(f"layer {self.name} is not built yet ({self.issue}); nothing was done for it")

    plan_up = plan_down = _refuse


def layers() -> dict[str, Layer]:
    from homelab.layers import access, ceph, k3s, kubernetes, sdn, vault, vms
    from homelab.manifests import LAYERS

    return {
        "ceph": ceph.CephLayer(),
        "sdn": sdn.SdnLayer(),
        "vms": vms.VmsLayer(),
        "k3s": k3s.K3sLayer(),
        "network": kubernetes.ManifestLayer("network", LAYERS["network"], kubernetes.network_render),
        "access": access.AccessLayer(),
        "monitoring": kubernetes.ManifestLayer("monitoring", LAYERS["monitoring"], kubernetes.render),
        "apps": vault.AppsLayer(),
    }


def select(only: list[str], from_: str | None = None, to: str | None = None) -> list[str]:
    """The layers to run, in pipeline order: --only, or the span --from .. --to."""
    for name in [*only, *(n for n in (from_, to) if n)]:
        if name not in ORDER:
            raise HomelabError(f"unknown layer {name!r}; the layers are {', '.join(ORDER)}")
    if only and (from_ or to):
        raise HomelabError("--only cannot be combined with --from/--to")
    if only:
        return [n for n in ORDER if n in only]
    start = ORDER.index(from_) if from_ else 0
    stop = ORDER.index(to) if to else len(ORDER) - 1
    if start > stop:
        raise HomelabError(f"--from {from_} comes after --to {to} in the pipeline ({' -> '.join(ORDER)})")
    return list(ORDER[start:stop + 1])


@dataclass
class Row:
    layer: str
    status: str  # ok, planned, failed, not built, not run
    changed: int = 0
    unchanged: int = 0
    failed: int = 0
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Outcome:
    rows: list[Row]
    plans: list[planlib.LayerPlan]

    @property
    def failed(self) -> bool:
        return any(r.status == "failed" for r in self.rows)

    @property
    def incomplete(self) -> bool:
        return any(r.status in ("not built", "not run") for r in self.rows)


def execute(run: Run, verb: str, names: list[str], *, dry_run: bool, show: bool = True,
            registry: dict[str, Layer] | None = None) -> Outcome:
    """Plan each layer and, unless dry_run, apply its changes; stop at the first failure."""
    registry = registry or layers()
    order = list(reversed(names)) if verb == "down" else list(names)
    rows: list[Row] = []
    plans: list[planlib.LayerPlan] = []
    out = run.console
    stopped = False
    for name in order:
        if stopped:
            rows.append(Row(name, "not run", detail="an earlier layer did not finish"))
            continue
        started = time.monotonic()
        row = Row(name, "planned" if dry_run else "ok")
        current: planlib.Change | None = None
        waiting = False
        try:
            layer = registry[name]
            lp = layer.plan_down(run) if verb == "down" else layer.plan_up(run)
            plans.append(lp)
            row.unchanged = lp.count("noop")
            if show:
                planlib.render(lp, out)
            if not dry_run:
                for current in lp.pending:
                    if current.apply is None:
                        raise HomelabError(f"{current.kind} {current.name} has no apply step")
                    current.apply()
                    row.changed += 1
                current = None
                if lp.finish and row.changed:
                    waiting = True
                    lp.finish()
            elif lp.pending:
                row.changed = len(lp.pending)
        except NotBuilt as exc:
            row.status, row.detail = "not built", exc.message
            # Going up, later layers depend on this one; going down, a layer never built made nothing.
            stopped = verb != "down"
        except HomelabError as exc:
            row.status, row.failed = "failed", 1
            where = (f"{current.kind} {current.name}" if current else
                     "waiting for what was applied to be ready" if waiting else "reading the actual state")
            row.detail = f"{where}: {exc.message}"
            out.print(f"[bold red]failed[/] {name}: {escape(where)}: {escape(str(exc))}")
            stopped = True
        row.seconds = time.monotonic() - started
        rows.append(row)
    if show:
        recap(run, rows, dry_run)
    return Outcome(rows, plans)


def recap(run: Run, rows: list[Row], dry_run: bool) -> None:
    """Ansible-style recap: one line per layer with changed, unchanged, failed and seconds."""
    out = run.console
    title = "PLAN RECAP" if dry_run else "RECAP"
    outside = "".join(f", {int(client.calls)} {label} API requests"
                      for key, label in (("cloudflare", "Cloudflare"), ("tailscale", "Tailscale"))
                      if (client := run.memo.get(key)) is not None)
    out.print(f"\n[bold]{title}[/] (target {run.target.name}, {run.api_requests()} Proxmox API requests, "
              f"{run.ssh_connections()} SSH connections, {run.kube_requests()} Kubernetes API requests"
              f"{outside})")
    for r in rows:
        verb = "to change" if dry_run else "changed"
        if r.status in ("ok", "planned", "failed"):
            colour = "red" if r.status == "failed" else ("yellow" if r.changed else "green")
            out.print(f"  [{colour}]{r.layer:<11}[/] {verb}={r.changed:<3} unchanged={r.unchanged:<3} "
                      f"failed={r.failed}  {r.seconds:6.2f}s")
        else:
            out.print(f"  [magenta]{r.layer:<11}[/] {r.status}: {escape(r.detail)}")


def run_task(verb: str, inv: Inventory, target_name: str, names: list[str], *, dry_run: bool,
             as_json: bool = False, refuse_without_yes: bool = False,
             registry: dict[str, Layer] | None = None) -> int:
    """What `invoke up/down/plan` do: open the run, execute, and return the exit code."""
    from homelab import cli, target

    if target_name == "lab":
        from homelab.lab import control

        control.enter(sys.argv[1:])
    out = Console(stderr=True, highlight=False, soft_wrap=True) if as_json else cli.console()
    run = Run(inv=inv, target=target.resolve(target_name, inv), console=out, progress=Progress(out))
    try:
        outcome = execute(run, verb, names, dry_run=dry_run, registry=registry)
    finally:
        run.close()
    if as_json:
        cli.print_json([c.as_json() for p in outcome.plans for c in p.changes])
    if refuse_without_yes and any(p.pending for p in outcome.plans):
        out.print("[yellow]nothing removed:[/] `down` acts only with --yes")
        return 1
    if outcome.failed:
        return 1
    if outcome.incomplete and verb != "down":
        print("stopped: a layer is not built yet; the layers before it are done", file=sys.stderr)
        return 3
    return 0

"""Tests: `test.live` checks a running homelab (read-only); `test.unit` runs the offline tests."""

from __future__ import annotations

import sys

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.tasks import task

from homelab import cli


@task(help={
    "target": "lab (default; env HOMELAB_TARGET) or live; live refuses to run when CI is set (exit code 2)",
    "marker": "pytest -m expression over the layers: proxmox, vms, nodes, k3s, network, storage, tls, dns, "
              "access, monitoring, apps (e.g. -m 'dns or tls')",
    "k": "pytest -k expression over check names and their entities (e.g. -k naruto)",
    "junitxml": "JUnit XML file (default reports/live.xml; always written)",
    "report": "Markdown report: one line per check with its measured value (default reports/live.md)",
    "inventory": "inventory file (default inventory/homelab.yaml; env HOMELAB_INVENTORY)",
})
@cli.exits
def live(c: Context, target: str | None = None, marker: str | None = None, k: str | None = None,
         junitxml: str | None = None, report: str | None = None, inventory: str | None = None) -> None:
    """Check the running homelab, read-only: Proxmox, VMs, nodes, cluster, TLS, DNS, access, every app.

    Runs the pytest + testinfra suite in tests/live (catalogue: tests/live/CHECKS.md) against the target,
    inside the lab's network namespace for `lab`. Options for pytest itself go after `--`, e.g.
    `invoke test.live -- -x --tb=line`. Exits with pytest's code (0 all passed, 1 a check failed).
    """
    from homelab import live as suite

    code = suite.main(target, inventory=inventory, marker=marker, k=k, junitxml=junitxml, report=report,
                      extra=suite.remainder(sys.argv))
    if code:
        raise Exit(code=code)


@task(help={"k": "pytest -k expression"})
def unit(c: Context, k: str | None = None) -> None:
    """Run the offline unit tests (no network, no root)."""
    import shlex

    args = [sys.executable, "-m", "pytest", "tests/unit", "-q"] + (["-k", k] if k else [])
    c.run(shlex.join(args), pty=False)


ns = Collection("test", live, unit)

"""Tests: `test.live` checks a running homelab (read-only); `test.unit` runs the offline tests."""

from __future__ import annotations

import sys

from invoke.collection import Collection
from invoke.context import Context
from invoke.tasks import task

from homelab import cli
from homelab.errors import NotBuilt


@task(help={"target": "lab (default; env HOMELAB_TARGET) or live", "marker": "pytest -m expression",
            "k": "pytest -k expression"})
@cli.exits
def live(c: Context, target: str | None = None, marker: str | None = None, k: str | None = None) -> None:
    """Validate the running homelab read-only: IPs, CIDRs, LoadBalancer, TLS, DNS, every app."""
    cli.target_name(target)
    raise NotBuilt("test.live is not built yet (issue 7: the live suite)")


@task(help={"k": "pytest -k expression"})
def unit(c: Context, k: str | None = None) -> None:
    """Run the offline unit tests (no network, no root)."""
    import shlex

    args = [sys.executable, "-m", "pytest", "tests/unit", "-q"] + (["-k", k] if k else [])
    c.run(shlex.join(args), pty=False)


ns = Collection("test", live, unit)

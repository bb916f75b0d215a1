"""nox sessions: lint, typecheck, unit (the default run, and CI's); live is opt-in.

Each session installs from pyproject's dependency groups, so versions live in one place.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["lint", "typecheck", "unit"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
PYTHON = "3.11"


def install(session: nox.Session, *groups: str, project: bool = True) -> None:
    deps = [d for g in groups for d in nox.project.dependency_groups(PYPROJECT, g)]
    session.install(*(["-e", "."] if project else []), *deps)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    install(session, "lint", project=False)
    session.run("ruff", "check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over homelab/, tasks/ and this file."""
    install(session, "typecheck")
    session.run("mypy")


@nox.session(python=PYTHON)
def unit(session: nox.Session) -> None:
    """Offline tests: inventory, planners, and the Proxmox layers against fakepve over HTTPS."""
    install(session, "test")
    session.run("pytest", "tests/unit", *session.posargs)


@nox.session(python=PYTHON, default=False)
def live(session: nox.Session) -> None:
    """The live suite against a real homelab (never in CI)."""
    if os.environ.get("CI"):
        session.error("the live session is for a real homelab and refuses to run when CI is set")
    install(session, "test")
    session.run("invoke", "test.live", "--target", "live", *session.posargs)

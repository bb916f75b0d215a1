"""nox sessions: lint, typecheck, unit, manifests, lab (the default run, and CI's); live is opt-in.

Each session installs from pyproject's dependency groups, so versions live in one place.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["lint", "typecheck", "unit", "manifests", "lab"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
PYTHON = "3.11"
# What the lab needs from Debian: namespaces, containers, the rootfs builder, SSH through the namespace.
LAB_DEBIAN = ["iproute2", "util-linux", "systemd-container", "debootstrap", "openssh-client", "netcat-openbsd"]


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


@nox.session(python=PYTHON)
def manifests(session: nox.Session) -> None:
    """Render every component's manifests and validate them offline (schemas, unknown fields refused)."""
    install(session, "manifests")
    session.run("python", "-m", "homelab.validate", *session.posargs)


def ensure_debian(session: nox.Session, packages: list[str]) -> None:
    """Install missing Debian packages (as root); elsewhere say what is missing and skip, or fail under CI."""
    missing = [p for p in packages if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                                       text=True, check=False).stdout != "install ok installed"]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        message = f"missing Debian packages {' '.join(missing)}; as root: apt-get install {' '.join(missing)}"
        if os.environ.get("CI"):
            session.error(message)
        session.skip(message)
    session.run("apt-get", "update", "-qq", external=True)
    session.run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, external=True,
                env={"DEBIAN_FRONTEND": "noninteractive"})


@nox.session(python=PYTHON)
def lab(session: nox.Session) -> None:
    """End to end on the lab twin (needs root): lab.up, the Proxmox layers, SSH into the VMs, lab.down."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            session.error("the lab session needs root under CI")
        session.skip("the lab session needs root (network namespaces, mounts, containers)")
    ensure_debian(session, LAB_DEBIAN)
    install(session, "test", "lab")
    session.run("pytest", "tests/lab", *session.posargs)
    # The lab's rootfs carries Debian's cloud-init: check the NoCloud seeds with its own parser.
    rootfs = session.run("python", "-c", "from homelab.lab import rootfs; print(rootfs.path())", silent=True)
    packages = f"{str(rootfs).strip()}/usr/lib/python3/dist-packages"
    session.run("pytest", "tests/unit/test_cloudinit.py", "-q", env={"HOMELAB_CLOUDINIT_PATH": packages})


@nox.session(python=PYTHON, default=False)
def live(session: nox.Session) -> None:
    """The live suite against a real homelab (never in CI)."""
    if os.environ.get("CI"):
        session.error("the live session is for a real homelab and refuses to run when CI is set")
    install(session, "test")
    session.run("invoke", "test.live", "--target", "live", *session.posargs)

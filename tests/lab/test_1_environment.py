"""A bad environment stops lab.up with a message saying what to fix, and leaves no half-built lab.

These run before test_lab.py (file order), while no lab is up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from homelab import inventory
from homelab.lab import control, layout

from .conftest import REPO


def lab_up(env: dict[str, str], *prefix: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "invoke", "lab.up"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False, env={**os.environ, **env})


def assert_nothing_left() -> None:
    assert control.leftovers() == []
    assert not control.running()


def test_lab_up_without_root_says_so() -> None:
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    done = lab_up({"HOME": "/nonexistent"}, *nobody)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "needs root" in done.stderr and "Traceback" not in done.stderr
    assert_nothing_left()


def test_lab_up_names_the_missing_debian_packages(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ip", "nsenter", "mount", "debootstrap", "ssh-keygen", "chroot"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    done = lab_up({"PATH": str(bin_dir)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "missing Debian packages: systemd-container" in done.stderr
    assert "apt-get install systemd-container" in done.stderr
    assert_nothing_left()


def test_an_address_in_use_fails_cleanly_and_leaves_nothing(tmp_path: Path) -> None:
    """The resolver on a PVE host's address with the API on port 53: the DNS server cannot bind."""
    data = yaml.safe_load(inventory.DEFAULT_PATH.read_text(encoding="utf-8"))
    data["proxmox"]["api_port"] = 53
    data["network"]["nameservers"] = ["192.168.7.233"]
    path = tmp_path / "clash.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    inventory.load(path)  # a valid inventory: the clash is the lab's, not the homelab's
    done = lab_up({"HOMELAB_INVENTORY": str(path)})
    assert done.returncode == 2, done.stdout + done.stderr
    text = done.stdout + done.stderr
    assert "supervisor exited" in text and "address already in use" in text.lower()
    assert "removing what it made" in text
    assert_nothing_left()
    assert not layout.STATE.exists()

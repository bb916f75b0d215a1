#!/usr/bin/env python3
"""Benchmark the lab (root): lab.up, the Proxmox layers, boot to SSH, the whole pipeline, the live suite.

    python benchmarks/lab.py [--cold]    # --cold removes the rootfs cache first (debootstrap again)

Prints wall times and numbers; asserts nothing. Leaves no lab running.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from homelab import inventory  # noqa: E402
from homelab.lab import layout  # noqa: E402
from homelab.target import read_env_file  # noqa: E402

LAST = {"out": ""}


def invoke(*args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 3):
        raise SystemExit(f"invoke {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    LAST["out"] = done.stdout + done.stderr
    return seconds


def recap() -> str:
    """The recap's header: API requests and SSH connections of the last run."""
    return next((line.strip() for line in LAST["out"].splitlines() if "RECAP" in line), "")


def ssh_ready(address: str, env: dict[str, str]) -> bool:
    argv = ["ssh", "-i", env["HOMELAB_SSH_PRIVATE_KEY"], "-o", f"UserKnownHostsFile={env['HOMELAB_KNOWN_HOSTS']}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
            "-o", f"ProxyCommand=ip netns exec {layout.NETNS} nc %h %p",
            f"{inventory.load().k3s.user}@{address}", "true"]
    return subprocess.run(argv, capture_output=True, check=False, timeout=30).returncode == 0


def rss_tree_mib(pid: int) -> float:
    """RSS of a process and all its descendants (shared pages counted once per process)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split()
    try:
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        rss = 0
    return rss / 1024 + sum(rss_tree_mib(int(c)) for c in children)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold", action="store_true", help="remove the rootfs cache first (debootstrap again)")
    args = parser.parse_args()
    inv = inventory.load()
    invoke("lab.down", *(["--purge"] if args.cold else []))
    try:
        print(f"lab.up ({'cold, building the rootfs' if args.cold else 'cached rootfs'}): {invoke('lab.up'):.1f} s")
        invoke("lab.down")
        print(f"lab.up (cached rootfs): {invoke('lab.up'):.2f} s")
        print(f"invoke up --only ceph,sdn,vms (cold, until every guest agent reports its address): "
              f"{invoke('up', '--only', 'ceph,sdn,vms'):.2f} s")
        started = time.perf_counter()
        env = read_env_file(layout.STATE / layout.TARGET_ENV)
        pending = {vm.name: str(vm.address) for vm in inv.k3s.vms}
        deadline = started + 300
        while pending and time.perf_counter() < deadline:
            for name, address in list(pending.items()):
                if ssh_ready(address, env):
                    print(f"  {name}: SSH answers {time.perf_counter() - started:.1f} s after `up` returned")
                    del pending[name]
        times = [invoke("up", "--only", "ceph,sdn,vms") for _ in range(3)]
        print(f"invoke up --only ceph,sdn,vms (no-op): {', '.join(f'{t:.2f}' for t in times)} s")
        print(f"invoke up --to k3s (cold k3s: to three Ready nodes): {invoke('up', '--to', 'k3s'):.1f} s; {recap()}")
        times = [invoke("up", "--to", "k3s") for _ in range(3)]
        print(f"invoke up --to k3s (no-op): {', '.join(f'{t:.2f}' for t in times)} s; {recap()}")
        print(f"invoke up (whole pipeline, cold from k3s on): {invoke('up'):.1f} s; {recap()}")
        times = [invoke("up") for _ in range(3)]
        print(f"invoke up (whole pipeline, no-op): {', '.join(f'{t:.2f}' for t in times)} s; {recap()}")
        times = [invoke("test.live", "--target", "lab") for _ in range(3)]
        summary = next((line.strip() for line in LAST["out"].splitlines() if line.startswith("live suite:")), "")
        print(f"invoke test.live --target lab: {', '.join(f'{t:.2f}' for t in times)} s; {summary}")
        status = json.loads((layout.STATE / layout.STATUS_JSON).read_text())
        for vm in status["vms"]:
            if vm.get("pid"):
                print(f"  {vm['name']}: {rss_tree_mib(vm['pid']):.0f} MiB RSS (container process tree)")
    finally:
        print(f"lab.down: {invoke('lab.down'):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The lab's VMs: each one a systemd-nspawn container booting real systemd, sshd and cloud-init.

When fakepve starts a VM, the lab mounts an overlay of the cached rootfs (the VM's disk: kept
across stop and start, removed with the VM), writes the NoCloud seed PVE's cloud-init drive
would carry, gives the VM a network namespace whose eth0 (net0's MAC) sits on the home bridge,
and boots it. The guest agent then reports the container's real interfaces.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from homelab.lab import cloudinit, netns

log = logging.getLogger("homelab.lab.guests")

NETNS_PREFIX = "homelab-vm"
MAC = re.compile(r"(?:^|,)(?:virtio|e1000e?|vmxnet3|rtl8139)=([0-9A-Fa-f:]{17})")


@dataclass
class Guest:
    vmid: int
    name: str
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.vmid}"

    @property
    def root(self) -> Path:
        return self.dir / "root"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def mac_of(net: str) -> str:
    found = MAC.search(net or "")
    if not found:
        raise ValueError(f"no MAC address in net0 {net!r}")
    return found.group(1).lower()


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with Path("/proc/self/mounts").open(encoding="utf-8") as mounts:
        return any(line.split()[1] == target for line in mounts)


class Guests:
    """Every VM container of the lab; thread-safe per VM."""

    def __init__(self, *, lab_netns: str, bridge: str, rootfs: Path, var_dir: Path,
                 host_dns: tuple[list[str], list[str]] = ([], [])) -> None:
        self.lab_netns = lab_netns
        self.bridge = bridge
        self.rootfs = rootfs
        self.var_dir = var_dir
        self.host_dns = host_dns
        self.guests: dict[int, Guest] = {}
        self._lock = threading.Lock()

    def guest(self, vmid: int, name: str = "") -> Guest:
        with self._lock:
            if vmid not in self.guests:
                self.guests[vmid] = Guest(vmid, name or f"vm{vmid}", self.var_dir / str(vmid))
            if name:
                self.guests[vmid].name = name
            return self.guests[vmid]

    # ------------------------------------------------------------------ start

    def start(self, vmid: int, name: str, config: dict[str, Any]) -> None:
        """Boot the VM's container (its disk kept from an earlier run, if any)."""
        guest = self.guest(vmid, name)
        with guest.lock:
            if guest.running:
                return
            self._mount(guest)
            cloudinit.write_seed(guest.root, cloudinit.seed_files(vmid, name, config, host_dns=self.host_dns))
            self._network(guest, mac_of(str(config.get("net0", ""))))
            console = (guest.dir / "console.log").open("ab")
            argv = ["nsenter", f"--net={netns.NETNS_DIR / guest.netns}", "systemd-nspawn", "--quiet",
                    "--register=no", "--keep-unit", "--capability=CAP_NET_ADMIN", "--resolv-conf=off",
                    "--link-journal=no", "--timezone=off", f"--machine={_machine(name)}",
                    f"--directory={guest.root}", "--boot"]
            limits = _limits(vmid, config)
            # A VM's root may tune its own network stack (ip_forward for K3s): /proc/sys/net is per
            # namespace, and the VM has a namespace of its own.
            env = {**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}
            guest.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                          start_new_session=True, preexec_fn=limits, env=env)  # noqa: PLW1509 - only writes cgroup files
            console.close()
            guest.started = time.monotonic()
            log.info("VM %s (%s) booting, nspawn pid %s", vmid, name, guest.proc.pid)

    def _mount(self, guest: Guest) -> None:
        for sub in ("upper", "work", "root"):
            (guest.dir / sub).mkdir(parents=True, exist_ok=True)
        if is_mounted(guest.root):
            return
        options = f"lowerdir={self.rootfs},upperdir={guest.dir / 'upper'},workdir={guest.dir / 'work'}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(guest.root)], check=True,
                       capture_output=True)

    def _network(self, guest: Guest, mac: str) -> None:
        netns.delete(guest.netns)
        netns.add(guest.netns)
        netns.connect(self.lab_netns, self.bridge, guest.netns, f"vh{guest.vmid}", mac)

    # ------------------------------------------------------------------- stop

    def stop(self, vmid: int, timeout: float = 30.0) -> None:
        """Power the container off (SIGTERM makes nspawn halt it), then release its network and mount."""
        guest = self.guests.get(vmid)
        if guest is None:
            return
        with guest.lock:
            proc = guest.proc
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("VM %s did not halt in %ss; killing it", vmid, timeout)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            guest.proc = None
            netns.delete(guest.netns)
            if is_mounted(guest.root):
                subprocess.run(["umount", str(guest.root)], check=False, capture_output=True)

    def destroy(self, vmid: int) -> None:
        """Stop the container and delete its disk."""
        self.stop(vmid)
        guest = self.guests.pop(vmid, None)
        if guest is not None:
            shutil.rmtree(guest.dir, ignore_errors=True)

    def stop_all(self) -> None:
        for vmid in list(self.guests):
            self.stop(vmid)

    # ------------------------------------------------------------------ state

    def interfaces(self, vmid: int) -> list[dict[str, Any]] | None:
        """The guest agent's network-get-interfaces answer, or None while the guest is not up."""
        guest = self.guests.get(vmid)
        if guest is None or not guest.running:
            return None
        out = []
        for link in netns.interfaces(guest.netns):
            addresses = [{"ip-address": a["local"], "ip-address-type": "ipv4" if a["family"] == "inet" else "ipv6",
                          "prefix": a["prefixlen"]} for a in link.get("addr_info", []) if "local" in a]
            out.append({"name": link["ifname"], "hardware-address": link.get("address", ""),
                        "ip-addresses": addresses})
        return out

    def host_keys(self, vmid: int) -> list[str]:
        """The SSH host public keys the guest generated at first boot."""
        guest = self.guests.get(vmid)
        if guest is None:
            return []
        keys = []
        for pub in sorted((guest.root / "etc/ssh").glob("ssh_host_*_key.pub")):
            with contextlib.suppress(OSError):
                keys.append(" ".join(pub.read_text(encoding="utf-8").split()[:2]))
        return keys


def _machine(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9-]", "-", name)[:64] or "vm"


def _limits(vmid: int, config: dict[str, Any]) -> Any:
    """A preexec function that puts the container into cgroups limited to the VM's cores and memory.

    cgroup v1 (cpu, memory) or v2; where the machine does not allow it, the VM runs unlimited.
    """
    cores = int(str(config.get("cores", 1))) * int(str(config.get("sockets", 1)))
    memory = int(str(config.get("memory", 2048)).split("=")[-1]) * 1024**2
    plans: list[tuple[Path, dict[str, str]]] = []
    for parent in cgroup_parents():
        if parent.parts[3:4] == ("cpu",):
            values = {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": str(cores * 100000)}
        elif parent.parts[3:4] == ("memory",):
            values = {"memory.limit_in_bytes": str(memory)}
        else:
            values = {"cpu.max": f"{cores * 100000} 100000", "memory.max": str(memory)}
        plans.append((parent / f"homelab-vm{vmid}", values))
    ready: list[Path] = []
    for path, values in plans:
        try:
            path.mkdir(exist_ok=True)
            for name, value in values.items():
                (path / name).write_text(value)
            ready.append(path)
        except OSError as exc:
            log.warning("VM %s: no cgroup limit at %s (%s)", vmid, path, exc.strerror)

    def enter() -> None:
        for path in ready:
            with contextlib.suppress(OSError):
                (path / "cgroup.procs").write_text(str(os.getpid()))

    return enter


def _own_cgroup(controller: str) -> str:
    """This process's cgroup path in the hierarchy of controller ('' for v2)."""
    for line in Path("/proc/self/cgroup").read_text(encoding="utf-8").splitlines():
        _, names, cgpath = line.split(":", 2)
        if (controller and controller in names.split(",")) or (not controller and names == ""):
            return cgpath
    return "/"


def cgroup_parents() -> list[Path]:
    """Where this process makes the VMs' cgroups: its own cgroup in each hierarchy the lab uses."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return [base / _own_cgroup("").lstrip("/")]
    return [base / c / _own_cgroup(c).lstrip("/") for c in ("cpu", "memory") if (base / c).is_dir()]


def remove_cgroups() -> list[Path]:
    """Remove the lab's cgroups (empty once their containers ended); returns those that remain."""
    left = []
    for parent in cgroup_parents():
        for found in parent.glob("homelab-vm*"):
            try:
                found.rmdir()
            except OSError:
                left.append(found)
    return left

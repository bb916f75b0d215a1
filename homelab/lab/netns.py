"""Network namespaces, bridges and veth pairs for the lab, through iproute2 (argv lists only).

The lab's home network lives in one namespace with no default route, so nothing sent to the
inventory's addresses can leave the machine. Each VM gets a namespace of its own, joined to
the home bridge by a veth pair whose VM end is eth0 with the MAC PVE gave its net0.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from homelab.errors import HomelabError

NETNS_DIR = Path("/run/netns")


class NetnsError(HomelabError):
    """An iproute2 command failed."""


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}")
    return done


def ip_json(*args: str, netns: str | None = None) -> Any:
    return json.loads(ip("-j", *args, netns=netns).stdout or "[]")


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def names(prefix: str) -> list[str]:
    """Namespaces whose name starts with prefix."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def add(name: str) -> None:
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", netns=name)


def delete(name: str) -> None:
    if exists(name):
        ip("netns", "delete", name)


def inside(name: str) -> bool:
    """True if this process runs in the named namespace."""
    try:
        return Path("/proc/self/ns/net").stat().st_ino == (NETNS_DIR / name).stat().st_ino
    except OSError:
        return False


CLONE_NEWNET = 0x40000000


def setns(name: str) -> bool:
    """Move the calling thread (and the threads it starts later) into the named namespace."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return bool(libc.setns(fd, CLONE_NEWNET) == 0) and inside(name)
    finally:
        os.close(fd)


def make_bridge(netns: str, bridge: str, addresses: list[str]) -> None:
    """A bridge with the given CIDR addresses, up, and no default route anywhere."""
    ip("link", "add", bridge, "type", "bridge", netns=netns)
    for address in addresses:
        ip("addr", "add", address, "dev", bridge, netns=netns)
    ip("link", "set", bridge, "up", netns=netns)


def add_address(netns: str, device: str, address: str) -> None:
    ip("addr", "add", address, "dev", device, netns=netns)


def connect(lab: str, bridge: str, vm_netns: str, host_end: str, mac: str) -> None:
    """A veth pair: host_end on the lab bridge, eth0 (with the VM's MAC) in the VM's namespace."""
    ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", vm_netns, netns=lab)
    ip("link", "set", "eth0", "address", mac, netns=vm_netns)
    ip("link", "set", host_end, "master", bridge, "up", netns=lab)


def routes(netns: str) -> list[dict[str, Any]]:
    result = ip_json("route", "show", "table", "all", netns=netns)
    return list(result) if isinstance(result, list) else []


def interfaces(netns: str) -> list[dict[str, Any]]:
    """`ip -j addr` of a namespace: name, address (MAC), addr_info."""
    result = ip_json("addr", "show", netns=netns)
    return list(result) if isinstance(result, list) else []

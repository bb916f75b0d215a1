"""The rule that is never bent: the lab target's traffic stays inside the lab's network namespace.

Every client of a run (SSH, the PVE API, the cluster's API, Cloudflare, Tailscale) asks `check`
before it connects. For the lab target an address that is not loopback may only be reached from
inside the lab's namespace, where those addresses exist and nothing routes out; from anywhere
else it would be the host's own network, which must never see a packet for them.
"""

from __future__ import annotations

import ipaddress

from homelab.errors import HomelabError
from homelab.lab import layout, netns


class UnsafeDestination(HomelabError):
    """A lab run tried to reach a non-loopback address from outside the lab's namespace."""


def check(target_name: str, host: str) -> None:
    if target_name != "lab":
        return
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if address is not None and address.is_loopback:
        return
    if not netns.inside(layout.NETNS):
        raise UnsafeDestination(f"refusing to reach {host} for the lab target from outside the lab's namespace "
                                f"{layout.NETNS}", hint="lab runs enter the namespace first (`invoke ... "
                                                        "--target lab` does); tests use loopback endpoints")

"""The lab target never reaches its (real) addresses from outside the lab's namespace."""

from __future__ import annotations

from pathlib import Path

import pytest

from homelab import safety
from homelab.clients.ssh import Hosts
from homelab.lab import layout, netns


@pytest.mark.skipif(netns.inside(layout.NETNS), reason="runs outside the lab's namespace only")
@pytest.mark.parametrize("host", ["192.168.7.233", "192.168.7.230", "203.0.113.10", "100.100.100.100", "[::2]"])
def test_lab_refuses_non_loopback_outside_its_namespace(host: str) -> None:
    with pytest.raises(safety.UnsafeDestination, match="outside the lab's namespace"):
        safety.check("lab", host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.77", "::1", "[::1]"])
def test_loopback_is_always_allowed(host: str) -> None:
    safety.check("lab", host)


def test_live_is_not_limited() -> None:
    safety.check("live", "192.168.7.233")


@pytest.mark.skipif(netns.inside(layout.NETNS), reason="runs outside the lab's namespace only")
def test_ssh_asks_the_guard_before_connecting(tmp_path: Path) -> None:
    hosts = Hosts("root", tmp_path / "key", tmp_path / "known_hosts", guard=lambda h: safety.check("lab", h))
    with pytest.raises(safety.UnsafeDestination):
        hosts.connect("192.168.7.233:22")
    assert hosts.opened == 0

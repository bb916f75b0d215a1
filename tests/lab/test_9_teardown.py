"""The last lab test: lab.down leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

from homelab.lab import control, layout, netns
from homelab.wait import Silent, poll

from .conftest import Lab, invoke


def test_down_removes_the_homelab_and_a_second_down_changes_nothing(built: Lab) -> None:
    down = invoke("down", "--yes")
    assert down.code == 0, down.text
    assert "vm ichigo: destroy VM 201" in down.text and "pool kubernetes: destroy" in down.text
    # The lab halts each container after PVE's destroy task ends (as QEMU exits after the task's answer).
    def halted() -> tuple[bool | None, str]:
        running = [vm["name"] for vm in control.status().vms if vm["running"]]
        return (True if not running else None), f"still running: {running}"

    poll("the VM containers to halt", halted, timeout=120, progress=Silent(), first=0.2, maximum=2)
    again = invoke("down", "--yes")
    assert again.code == 0, again.text
    assert "to delete" not in again.text.replace("0 to delete", "")


def test_lab_down_leaves_nothing_behind(built: Lab) -> None:
    down = invoke("lab.down")
    assert down.code == 0, down.text
    assert control.leftovers() == []
    assert netns.names(layout.NETNS_PREFIX) == []
    assert not layout.STATE.exists() and not layout.VAR.exists()
    with Path("/proc/self/mounts").open() as mounts:
        assert not [line for line in mounts if "homelab" in line]
    status = invoke("lab.status")
    assert status.code == 3 and "not running" in status.text

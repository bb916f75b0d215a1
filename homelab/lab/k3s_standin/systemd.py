"""sd_notify(3) without libsystemd: K3s's units are Type=notify (the server) and wait for READY=1."""

from __future__ import annotations

import os
import socket


def notify(state: str = "READY=1") -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True

"""The SSH client's errors: a node that hangs up is "unreachable" (a skip for `down`, a retry for a wait), never a
traceback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fabric import Connection

from homelab.clients.ssh import Hosts, SshUnreachable


@pytest.fixture
def hangs_up() -> Iterator[int]:
    """A TCP port on 127.0.0.1 that accepts and closes at once, as sshd of a node going down does."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not on Linux
        listener.close()
        thread.join(timeout=5)


def _hosts(tmp_path: Path) -> Hosts:
    known = tmp_path / "known_hosts"
    known.write_text("", encoding="utf-8")
    return Hosts("root", tmp_path / "key", known, timeout=5)


def test_a_peer_that_hangs_up_is_unreachable(tmp_path: Path, hangs_up: int) -> None:
    hosts = _hosts(tmp_path)
    with pytest.raises(SshUnreachable, match=r"SSH to 127\.0\.0\.1"):
        hosts.connect(f"127.0.0.1:{hangs_up}")
    assert hosts.opened == 0 and not hosts.connections


def test_eof_during_the_handshake_is_unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """paramiko raises a bare EOFError when the peer closes while it writes its banner (seen on `down` right
    after the VMs halted); it must read as unreachable like a refused connection."""

    def eof(self: Connection) -> None:
        raise EOFError

    monkeypatch.setattr(Connection, "open", eof)
    with pytest.raises(SshUnreachable, match="closed during the SSH handshake"):
        _hosts(tmp_path).connect("127.0.0.1:22")

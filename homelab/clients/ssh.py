"""SSH to the nodes through Fabric: one connection per host, reused for the whole run, host keys checked.

Commands are built from argv lists with shlex.join, never by formatting strings. Secrets travel
on stdin (`in_stream`), never in a command line, and command output is captured, not echoed.
"""

from __future__ import annotations

import io
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
from fabric import Connection

from homelab.errors import HomelabError


class SshError(HomelabError):
    """A command on a node failed, or the node could not be reached."""


@dataclass
class Done:
    host: str
    command: str
    code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.code == 0


@dataclass
class Hosts:
    """Connections to the nodes, opened on first use and kept until close()."""

    user: str
    key_file: Path
    known_hosts: Path
    timeout: float = 15.0
    connections: dict[str, Connection] = field(default_factory=dict)
    opened: int = 0

    def connect(self, address: str) -> Connection:
        conn = self.connections.get(address)
        if conn is not None and conn.is_connected:
            return conn
        conn = Connection(address, user=self.user, connect_timeout=int(self.timeout),
                          connect_kwargs={"key_filename": str(self.key_file), "look_for_keys": False,
                                          "allow_agent": False})
        # Fabric trusts unknown host keys by default; a node must match the recorded key.
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            conn.client.load_host_keys(str(self.known_hosts))
        except OSError as exc:
            raise SshError(f"cannot read the known hosts file {self.known_hosts}: {exc.strerror}",
                           hint="the lab records its VMs' keys; for live, ssh-keyscan them after checking") from None
        try:
            conn.open()
        except paramiko.SSHException as exc:
            raise SshError(f"SSH to {address}: {exc}",
                           hint=f"is {address}'s host key in {self.known_hosts}, and does it match?") from None
        except OSError as exc:
            raise SshError(f"SSH to {address}: {exc.strerror or exc}") from None
        self.opened += 1
        self.connections[address] = conn
        return conn

    def run(self, address: str, argv: Sequence[str], *, sudo: bool = False, stdin: bytes | None = None,
            check: bool = True, timeout: float | None = 300) -> Done:
        """Run argv on the host (as root with sudo=True); stdin bytes are sent on the command's stdin."""
        command = shlex.join(["sudo", "-n", *argv] if sudo else list(argv))
        conn = self.connect(address)
        kwargs: dict[str, Any] = {"hide": True, "warn": True, "pty": False, "timeout": timeout}
        if stdin is not None:
            kwargs["in_stream"] = io.BytesIO(stdin)
        else:
            kwargs["in_stream"] = False
        try:
            result = conn.run(command, **kwargs)
        except Exception as exc:  # invoke's CommandTimedOut, paramiko errors: all end this step
            raise SshError(f"{address}: `{_shown(argv)}` failed: {exc}") from None
        done = Done(address, command, int(result.exited), str(result.stdout), str(result.stderr))
        if check and not done.ok:
            raise SshError(f"{address}: `{_shown(argv)}` exited {done.code}: {done.stderr.strip()[-300:]}")
        return done

    def put(self, address: str, data: bytes, path: str, mode: str = "0644") -> None:
        """Write data to path as root with the given mode, through stdin (never in argv or a world-readable file)."""
        self.run(address, ["install", "-D", "-m", mode, "-o", "root", "-g", "root", "/dev/stdin", path], sudo=True,
                 stdin=data)

    def close(self) -> None:
        for conn in self.connections.values():
            conn.close()
        self.connections.clear()


def _shown(argv: Sequence[str]) -> str:
    text = shlex.join(list(argv))
    return text if len(text) < 160 else text[:160] + "..."

"""SSH to the nodes through Fabric: one connection per host, reused for the whole run, host keys checked.

Commands are built from argv lists with shlex.join, never by formatting strings. Secrets travel
on stdin (`in_stream`), never in a command line, and command output is captured, not echoed.
"""

from __future__ import annotations

import secrets
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from fabric import Connection

from homelab.errors import HomelabError
from homelab.wait import Progress, poll


class SshError(HomelabError):
    """A command on a node failed, or the node could not be reached."""


class SshUnreachable(SshError):
    """The node does not accept SSH (yet): refused, timed out, or its host key is not known yet."""


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
    # Asked before every new connection (homelab.safety.check for the run's target).
    guard: Callable[[str], None] | None = None

    def connect(self, address: str) -> Connection:
        conn = self.connections.get(address)
        if conn is not None and conn.is_connected:
            return conn
        if self.guard is not None:
            self.guard(address.rsplit(":", 1)[0] if address.count(":") == 1 else address)
        conn = Connection(address, user=self.user, connect_timeout=int(self.timeout),
                          connect_kwargs={"key_filename": str(self.key_file), "look_for_keys": False,
                                          "allow_agent": False})
        # Fabric trusts unknown host keys by default; a node must match the recorded key.
        conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            conn.client.load_host_keys(str(self.known_hosts))
        except FileNotFoundError:
            raise SshUnreachable(f"SSH to {address}: no known hosts file {self.known_hosts} yet",
                                 hint="the lab records its VMs' keys; for live, add them after checking") from None
        except OSError as exc:
            raise SshError(f"cannot read the known hosts file {self.known_hosts}: {exc.strerror}") from None
        try:
            conn.open()
        except paramiko.BadHostKeyException as exc:
            raise SshError(f"SSH to {address}: the host key does not match {self.known_hosts} ({exc})",
                           hint="someone may be in the middle; if the VM was rebuilt, remove its old key") from None
        except paramiko.SSHException as exc:
            raise SshUnreachable(f"SSH to {address}: {exc}",
                                 hint=f"is {address}'s host key in {self.known_hosts}?") from None
        except OSError as exc:
            raise SshUnreachable(f"SSH to {address}: {exc.strerror or exc}") from None
        except EOFError:  # paramiko's word for a peer that hung up mid-handshake (a node going down, sshd stopping)
            raise SshUnreachable(f"SSH to {address}: the connection was closed during the SSH handshake") from None
        self.opened += 1
        self.connections[address] = conn
        return conn

    def wait(self, address: str, timeout: float, progress: Progress) -> None:
        """Connect, waiting while the node boots (refused, timed out, host key not recorded yet)."""

        def probe() -> tuple[bool | None, str]:
            try:
                self.connect(address)
            except SshUnreachable as exc:
                return None, exc.message.removeprefix(f"SSH to {address}: ")[:120]
            return True, "connected"

        if address not in self.connections:
            poll(f"SSH on {address}", probe, timeout=timeout, progress=progress, first=0.5, maximum=3.0)

    def run(self, address: str, argv: Sequence[str], *, sudo: bool = False, stdin: bytes | None = None,
            check: bool = True, timeout: float | None = 300) -> Done:
        """Run argv on the host (as root with sudo=True); stdin bytes are sent on the command's stdin."""
        command = shlex.join(["sudo", "-n", *argv] if sudo else list(argv))
        conn = self.connect(address)
        # paramiko's exec channel directly: invoke's runner feeds stdin one byte per 10 ms.
        try:
            stdin_f, stdout_f, stderr_f = conn.client.exec_command(command, timeout=timeout)
            if stdin is not None:
                stdin_f.write(stdin)
                stdin_f.flush()
            stdin_f.channel.shutdown_write()
            out = stdout_f.read()
            err = stderr_f.read()
            code = stdout_f.channel.recv_exit_status()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SshError(f"{address}: `{_shown(argv)}` failed: {exc or type(exc).__name__}") from None
        done = Done(address, command, code, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and not done.ok:
            raise SshError(f"{address}: `{_shown(argv)}` exited {done.code}: {done.stderr.strip()[-300:]}")
        return done

    def put(self, address: str, data: bytes, path: str, mode: str = "0644", *, secret: bool = False) -> None:
        """Write data to path as root with the given mode.

        Secrets (small) go through the command's stdin, never into argv or a file others can read;
        anything else over SFTP into a private temporary file, then moved into place.
        """
        install = ["install", "-D", "-m", mode, "-o", "root", "-g", "root"]
        if secret or len(data) < 1024 * 1024:
            self.run(address, [*install, "/dev/stdin", path], sudo=True, stdin=data)
            return
        conn = self.connect(address)
        tmp = f".homelab-upload-{secrets.token_hex(8)}"
        sftp = conn.sftp()
        with sftp.open(tmp, "wb") as fh:
            fh.chmod(0o600)
            fh.set_pipelined(True)
            fh.write(data)
        try:
            self.run(address, [*install, tmp, path], sudo=True)
        finally:
            sftp.remove(tmp)

    def close(self) -> None:
        for conn in self.connections.values():
            conn.close()
        self.connections.clear()


def _shown(argv: Sequence[str]) -> str:
    text = shlex.join(list(argv))
    return text if len(text) < 160 else text[:160] + "..."

"""LabPveSsh: SSH as root on the lab's PVE hosts, answering `ceph auth ...` as Ceph Squid does."""

from __future__ import annotations

import base64
import json
import logging
import socket
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from homelab.lab.pve import LabPve
from homelab.lab.pvessh import HOST_KEY, NOT_INITIALISED, TIMED_OUT, CephAuth, CephCli, LabPveSsh, ceph_key
from homelab.lab.serving import Background

HOST = "127.0.0.1"
NODE_IPS = {"pve-alpha": "192.168.7.233", "pve-beta": "192.168.7.234", "pve-gamma": "192.168.7.235"}
CAPS = ["mon", "profile rbd", "osd", "profile rbd pool=kubernetes", "mgr", "profile rbd pool=kubernetes"]
GET = ["ceph", "auth", "get", "client.kubernetes", "--format", "json"]
CREATE = ["ceph", "auth", "get-or-create", "client.kubernetes", *CAPS, "--format", "json"]


def keypair(directory: Path, name: str) -> tuple[Path, str]:
    """An Ed25519 key pair as ssh-keygen writes it: (private key file, public key line)."""
    key = Ed25519PrivateKey.generate()
    private = directory / name
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public.decode() + " operator@test"


@dataclass
class Done:
    code: int
    stdout: str
    stderr: str


@dataclass
class Node:
    pve: LabPve
    ssh: LabPveSsh
    key: Path
    known_hosts: Path

    def connect(self, key: Path | None = None, user: str = "root",
                known_hosts: Path | None = None) -> paramiko.SSHClient:
        """As homelab.clients.ssh.Hosts connects: the given key only, host key checked against known_hosts."""
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.load_host_keys(str(known_hosts or self.known_hosts))
        client.connect(HOST, port=self.ssh.port, username=user, key_filename=str(key or self.key),
                       look_for_keys=False, allow_agent=False, timeout=5)
        return client

    def run(self, argv: list[str], client: paramiko.SSHClient | None = None) -> Done:
        import shlex

        own = client is None
        client = client or self.connect()
        try:
            _stdin, stdout, stderr = client.exec_command(shlex.join(argv), timeout=5)
            out, err = stdout.read().decode(), stderr.read().decode()
            return Done(stdout.channel.recv_exit_status(), out, err)
        finally:
            if own:
                client.close()


@pytest.fixture
def node(pki: tuple[str, str], tmp_path: Path) -> Iterator[Node]:
    pve = LabPve(host=HOST, port=0, node_ips=NODE_IPS)
    pve.time_scale = 0
    loop = Background()
    loop.run(pve.start(*pki))
    key, public = keypair(tmp_path, "id_ed25519")
    ssh = LabPveSsh(pve, public, tmp_path / HOST_KEY)
    ssh.start([HOST], 0)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("\n".join(ssh.known_hosts_lines()) + "\n", encoding="utf-8")
    try:
        yield Node(pve, ssh, key, known_hosts)
    finally:
        ssh.stop(timeout=5)
        loop.run(pve.stop())
        loop.close()


def decoded(stdout: str) -> Any:
    assert stdout.startswith("\n"), "ceph prints a blank line before JSON output"
    return json.loads(stdout)


# ------------------------------------------------------------------------- ceph auth


def test_get_of_a_missing_entity_is_enoent(node: Node) -> None:
    done = node.run(GET)
    assert (done.code, done.stdout) == (2, "")
    assert done.stderr == "Error ENOENT: failed to find client.kubernetes in keyring\n"


def test_get_or_create_creates_once_and_get_reads_it(node: Node) -> None:
    with node.connect() as client:  # one connection for every command, as the layer does
        made = node.run(CREATE, client)
        assert made.code == 0, made.stderr
        assert made.stderr == ""
        [entity] = decoded(made.stdout)
        assert entity["entity"] == "client.kubernetes"
        assert entity["caps"] == {"mgr": "profile rbd pool=kubernetes", "mon": "profile rbd",
                                  "osd": "profile rbd pool=kubernetes"}
        blob = base64.b64decode(entity["key"])
        assert len(entity["key"]) == 40 and entity["key"].startswith("AQ")
        kind, _secs, _nsecs, length = struct.unpack("<HIIH", blob[:12])
        assert (kind, length, len(blob)) == (1, 16, 28)

        again = node.run(CREATE, client)
        assert again.code == 0 and decoded(again.stdout) == [entity]
        read = node.run(GET, client)
        assert read.code == 0 and decoded(read.stdout) == [entity]
        key = node.run(["ceph", "auth", "get-key", "client.kubernetes"], client)
        assert (key.code, key.stdout) == (0, entity["key"])


def test_get_or_create_with_other_caps_is_einval(node: Node) -> None:
    assert node.run(CREATE).code == 0
    done = node.run(["ceph", "auth", "get-or-create", "client.kubernetes", "mon", "allow r", "--format", "json"])
    assert (done.code, done.stdout) == (22, "")
    assert done.stderr == "Error EINVAL: key for client.kubernetes exists but cap mon does not match\n"
    # Only the caps asked for are compared: a subset that matches returns the entity with all its caps.
    subset = node.run(["ceph", "auth", "get-or-create", "client.kubernetes", "mon", "profile rbd", "-f", "json"])
    assert subset.code == 0 and len(decoded(subset.stdout)[0]["caps"]) == 3


def test_plain_get_or_create_prints_a_keyring_without_caps(node: Node) -> None:
    done = node.run(CREATE[:-2])
    key = node.pve.ceph_auth.get("client.kubernetes").key
    assert (done.code, done.stdout) == (0, f"[client.kubernetes]\n\tkey = {key}\n")
    plain = node.run(GET[:-2])
    assert plain.stdout == (f'[client.kubernetes]\n\tkey = {key}\n\tcaps mgr = "profile rbd pool=kubernetes"\n'
                            '\tcaps mon = "profile rbd"\n\tcaps osd = "profile rbd pool=kubernetes"\n')


def test_caps_replaces_every_cap(node: Node) -> None:
    assert node.run(["ceph", "auth", "caps", "client.kubernetes", "mon", "profile rbd"]).stderr == \
        "Error ENOENT: couldn't find entry client.kubernetes\n"
    key = decoded(node.run(CREATE).stdout)[0]["key"]
    done = node.run(["ceph", "auth", "caps", "client.kubernetes", "mon", "profile rbd",
                     "osd", "profile rbd pool=other"])
    assert (done.code, done.stdout, done.stderr) == (0, "", "updated caps for client.kubernetes\n")
    assert decoded(node.run(GET).stdout) == [{"entity": "client.kubernetes", "key": key,
                                               "caps": {"mon": "profile rbd", "osd": "profile rbd pool=other"}}]


def test_rm_removes_and_is_silent_when_absent(node: Node) -> None:
    assert node.run(CREATE).code == 0
    with node.connect() as client:
        for _ in range(2):
            done = node.run(["ceph", "auth", "rm", "client.kubernetes"], client)
            assert (done.code, done.stdout, done.stderr) == (0, "", "")
        assert node.run(GET, client).code == 2


def test_fsid_and_ls(node: Node) -> None:
    assert node.run(["ceph", "fsid"]).stdout == "00000000-0000-4000-8000-000000000000"
    node.pve.ceph_fsid = "b9127830-b0cc-4e34-aa47-9d1a2e9949a8"
    assert decoded(node.run(["ceph", "fsid", "--format=json"]).stdout) == {"fsid": node.pve.ceph_fsid}
    dump = decoded(node.run(["ceph", "auth", "ls", "--format", "json"]).stdout)
    names = [e["entity"] for e in dump["auth_dump"]]
    assert names[:3] == ["osd.0", "osd.1", "osd.2"] and "client.admin" in names and "mgr.pve-alpha" in names


def test_other_commands_are_not_found(node: Node) -> None:
    assert node.run(["ls", "/"]) == Done(127, "", "bash: line 1: ls: command not found\n")
    assert node.run(["sudo", "-n", "ceph", "fsid"]).code == 127  # PVE ships no sudo
    piped = node.run(["ceph", "fsid", "|", "cat"])
    assert piped.code == 127 and "no shell operators" in piped.stderr


# ------------------------------------------------------------------------------ faults


def test_monitors_down_and_ceph_not_initialised(node: Node) -> None:
    node.pve.ceph_down()
    assert node.run(GET) == Done(1, "", TIMED_OUT)
    node.pve.ceph_recover()
    node.pve.ceph_auth.initialised = False
    assert node.run(["ceph", "fsid"]) == Done(1, "", NOT_INITIALISED)


# ------------------------------------------------------------------------------- SSH


def test_a_wrong_key_or_user_is_refused(node: Node, tmp_path: Path) -> None:
    other, _ = keypair(tmp_path, "other")
    with pytest.raises(paramiko.AuthenticationException):
        node.connect(key=other)
    with pytest.raises(paramiko.AuthenticationException):
        node.connect(user="admin")


def test_an_unknown_host_key_is_refused_by_the_client(node: Node, tmp_path: Path) -> None:
    _, stranger = keypair(tmp_path, "stranger")
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[{HOST}]:{node.ssh.port} {' '.join(stranger.split()[:2])}\n", encoding="utf-8")
    with pytest.raises(paramiko.BadHostKeyException):
        node.connect(known_hosts=wrong)


def test_only_exec_is_allowed(node: Node) -> None:
    with node.connect() as client:
        transport = client.get_transport()
        assert transport is not None
        with pytest.raises(paramiko.SSHException):
            client.invoke_shell()
        with pytest.raises(paramiko.SSHException):
            client.open_sftp()
        with pytest.raises(paramiko.ChannelException):
            transport.open_channel("direct-tcpip", ("127.0.0.1", 8006), ("127.0.0.1", 0))
        with pytest.raises(paramiko.SSHException):
            transport.request_port_forward("127.0.0.1", 0)
        channel = transport.open_session()
        with pytest.raises(paramiko.SSHException):
            channel.get_pty()
        channel.close()
        assert node.run(["ceph", "fsid"], client).code == 0  # the connection is still good


def test_no_secret_key_is_logged(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = decoded(node.run(CREATE).stdout)[0]["key"]
    node.run(["ceph", "auth", "get-key", "client.kubernetes"])
    node.run(["ceph", "auth", "get-or-create", "client.x", "mon", key])  # a key in a command line too
    assert any("exited" in r.getMessage() for r in caplog.records)
    assert all(key not in r.getMessage() for r in caplog.records)
    assert key not in caplog.text


def test_stop_closes_listeners_and_sessions(node: Node) -> None:
    client = node.connect()
    node.ssh.stop(timeout=5)
    transport = client.get_transport()
    assert transport is None or not transport.is_active() or not _usable(client)
    with pytest.raises(OSError), socket.create_connection((HOST, node.ssh.port), timeout=2):
        pass
    client.close()


def _usable(client: paramiko.SSHClient) -> bool:
    try:
        client.exec_command("ceph fsid", timeout=2)[1].read()
    except (paramiko.SSHException, OSError, EOFError):
        return False
    return True


def test_host_key_is_made_once_and_private(node: Node, tmp_path: Path) -> None:
    path = tmp_path / HOST_KEY
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = LabPveSsh(node.pve, next(iter(node.known_hosts.read_text().split("\n"))).split(" ", 1)[1] + " x",
                      path)
    assert again.host_key_line() == node.ssh.host_key_line()
    assert again.auth is node.pve.ceph_auth  # one auth database per cluster
    assert node.ssh.host_key_line().startswith("ssh-ed25519 AAAA")


# --------------------------------------------------------------------- CLI, no SSH

CLI_CASES: list[tuple[list[str], int, str]] = [
    (["auth", "get"], 22, "Invalid command: missing required parameter entity(<string>)\n"
                          "auth get <entity> :  write keyring file with requested key\n"
                          "Error EINVAL: invalid command\n"),
    (["auth", "get", "nonsense"], 22, "Error EINVAL: invalid entity_auth nonsense\n"),
    (["auth", "get-or-create", "nonsense"], 22, "Error EINVAL: bad entity name\n"),
    (["auth", "get-or-create", "client.k", "mon"], 22,
     "Error EINVAL: bad capabilities request; odd number of arguments\n"),
    (["auth", "get-or-create", "client.k", "foo", "allow r"], 22, "Error EINVAL: unknown cap type 'foo'\n"),
    (["auth", "get-or-create", "client.k", "mon", "rbd"], 22,
     "Error EINVAL: mon capability parse failed, stopped at 'rbd' of 'rbd'\n"),
    (["auth", "get-key", "client.nobody"], 2, "Error ENOENT: don't have client.nobody\n"),
    (["osd", "pool", "ls"], 22, "no valid command found\nError EINVAL: invalid command\n"),
    (["--id", "kubernetes", "fsid"], 1, "[errno 2] RADOS object not found (error connecting to the cluster)\n"),
    (["fsid", "--format", "toml"], 2, "ceph: error: argument -f/--format: invalid choice: 'toml' (choose from "
                                      "'json', 'json-pretty', 'xml', 'xml-pretty', 'plain', 'yaml')\n"),
]


@pytest.mark.parametrize(("args", "code", "stderr"), CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_errors(args: list[str], code: int, stderr: str) -> None:
    pve = LabPve(node_ips=NODE_IPS)
    result = CephCli(pve).run(args)
    assert (result.status, result.stdout, result.stderr) == (code, "", stderr)


def test_ceph_key_format() -> None:
    key = ceph_key(bytes(range(16)), created=1_700_000_000.5)
    blob = base64.b64decode(key)
    assert struct.unpack("<HIIH", blob[:12]) == (1, 1_700_000_000, 500_000_000, 16) and blob[12:] == bytes(range(16))
    assert len(key) == 40 and key.startswith("AQ")


def test_auth_state_is_shared_per_pve() -> None:
    pve = LabPve(node_ips=NODE_IPS)
    assert CephAuth.of(pve) is CephAuth.of(pve)
    run: Callable[[list[str]], object] = CephCli(pve).run
    run(["auth", "get-or-create", "client.k", "mon", "profile rbd"])
    assert CephCli(pve).run(["auth", "get-key", "client.k"]).status == 0

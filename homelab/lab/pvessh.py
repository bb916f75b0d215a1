"""LabPveSsh: SSH as root on the lab's PVE hosts, answering the `ceph` commands the ceph layer runs there.

PVE's REST API has no Ceph auth endpoint, so the ceph layer creates the Ceph CSI client key over SSH on a
PVE node (`ceph auth get-or-create client.kubernetes mon 'profile rbd' ...`). This module is that SSH server
for the lab: a paramiko server on port 22 of every PVE address, sharing one Ceph auth database per cluster
(a real cluster's monitors hold one), kept beside the LabPve it is given.

What is emulated, and where each answer comes from:

- SSH: publickey only, user root, one authorized key (the lab's key pair); an Ed25519 host key made once per
  lab state dir. Only `exec` requests on `session` channels; shells, PTYs, subsystems (SFTP), environment,
  X11, agent and port forwarding are all refused. The command runs as `bash -c` would start it: anything but
  `ceph` is `bash: line 1: NAME: command not found`, exit 127 (PVE has no sudo either); shell operators
  (pipes, redirections, `;`, `&&`, `$(...)`) are refused with exit 127 and a LabPveSsh message.
- `ceph` CLI (src/ceph.in, Ceph 19.2 "Squid" as PVE 9 ships it): on success the monitor's status text goes
  to stderr and its data to stdout, preceded by a blank line for `--format json*`; a failure prints
  `Error <ERRNO>: <text>` on stderr and exits with the errno (ENOENT 2, EINVAL 22).
  https://docs.ceph.com/en/squid/man/8/ceph/
- `ceph auth get|get-key|print-key|get-or-create|caps|rm|del|ls|list` (src/mon/AuthMonitor.cc, KeyRing.cc,
  KeyServer.cc): `auth get --format json` is a list of {"entity", "key", "caps"}; a missing entity is
  `Error ENOENT: failed to find client.x in keyring`; `get-or-create` with caps that differ from the
  existing entity's is `Error EINVAL: key for client.x exists but cap mon does not match` (only the caps
  asked for are compared); `auth caps` replaces every cap and says `updated caps for client.x`;
  `auth rm` of a missing entity succeeds silently (Reef and later).
  https://docs.ceph.com/en/squid/rados/operations/user-management/
- The ceph-csi client these commands make (caps `mon 'profile rbd' osd 'profile rbd pool=kubernetes'
  mgr 'profile rbd pool=kubernetes'`): https://docs.ceph.com/en/latest/rbd/rbd-kubernetes/
- Keys as CryptoKey::encode_base64 writes them: le16 type (1, AES), le32 seconds, le32 nanoseconds,
  le16 length (16), 16 random bytes; base64, 40 characters starting "AQ" (src/auth/Crypto.cc).
- `ceph fsid` and `ceph -s` / `ceph status`: the fsid is LabPve's `ceph_fsid` if it has one, else the one
  its /cluster/ceph/status serves (fakepve's), so both APIs agree. Plain `ceph -s` is abbreviated.
- Faults, as the CLI reports them (exit 1): Ceph not initialised on the node (`pveceph init` never ran, no
  /etc/ceph/ceph.conf): `Error initializing cluster client: ObjectNotFound('RADOS object not found (error
  calling conf_read_file)')`; monitors unreachable (LabPve's `ceph_down()`): after --connect-timeout
  (client_mount_timeout, 300 s; scaled by LabPve's time_scale, so at once in the lab) `[errno 110] RADOS
  timed out (error connecting to the cluster)`; `--id`/`--name` of an entity with no keyring on the node:
  `[errno 2] RADOS object not found (error connecting to the cluster)`. librados's own log lines before
  these are left out.

Not modelled (answered with a clear `LabPveSsh: ... not modelled` message, never a fake success): other
`ceph` commands, `--format xml|yaml`, unknown options, key import (`auth add/import -i`), pending keys.
Secret keys are never logged: commands are logged with anything shaped like a key redacted.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import selectors
import shlex
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from homelab.errors import HomelabError

__all__ = ['HOST_KEY', 'CephAuth', 'CephCli', 'LabPveSsh', 'Result', 'ceph_key']

logger = logging.getLogger(__name__)

# The PVE hosts' SSH host key, relative to the lab state dir (beside layout.SSH_KEY and layout.KNOWN_HOSTS).
HOST_KEY = 'ssh/pve_host_ed25519_key'
# fakepve's /cluster/ceph/status fsid (fakepve.shapes.ceph_status), used when LabPve has no `ceph_fsid`.
FAKEPVE_FSID = '00000000-0000-4000-8000-000000000000'

ENOENT, EINVAL = 2, 22
CEPH_CRYPTO_AES = 1
CLIENT_MOUNT_TIMEOUT = 300.0  # seconds; ceph's client_mount_timeout, what --connect-timeout overrides
FORMATS = ('json', 'json-pretty', 'xml', 'xml-pretty', 'plain', 'yaml')
# EntityName types (src/common/entity_name.cc) in the order a std::map<EntityName, ...> sorts them.
ENTITY_TYPES = {'mon': 1, 'mds': 2, 'osd': 4, 'client': 8, 'mgr': 16, 'auth': 32}
CAP_TYPES = ('mon', 'mgr', 'osd', 'mds')
GRANT = re.compile(r'(allow(\s|\*|$)|profile\s+\S)')
KEY_SHAPED = re.compile(r'AQ[A-Za-z0-9+/]{36,}={0,2}')
SHELL_OPERATORS = set('|&;<>()`$')
REPLY_WAIT = 5.0  # seconds a finished command waits for its exec request's reply to be sent

NOT_INITIALISED = ("Error initializing cluster client: ObjectNotFound('RADOS object not found "
                   "(error calling conf_read_file)')\n")
TIMED_OUT = '[errno 110] RADOS timed out (error connecting to the cluster)\n'
NO_KEYRING = '[errno 2] RADOS object not found (error connecting to the cluster)\n'

# MonCommands.h signatures of what is modelled: prefix -> (usage, minimum words after the prefix).
USAGE = {
    'auth get': 'auth get <entity> :  write keyring file with requested key',
    'auth get-key': 'auth get-key <entity> :  display requested key',
    'auth print-key': 'auth print-key <entity> :  display requested key',
    'auth print_key': 'auth print_key <entity> :  display requested key',
    'auth get-or-create': 'auth get-or-create <entity> [<caps>...] :  add auth info for <entity> from input '
                          'file, or random key if no input is given, and/or any caps specified in the command',
    'auth caps': 'auth caps <entity> <caps>... :  update caps for <name> from caps specified in the command',
    'auth rm': 'auth rm <entity> :  remove all caps for <name>',
    'auth del': 'auth del <entity> :  delete all caps for <name>',
    'auth ls': 'auth ls :  list authentication state',
    'auth list': 'auth list :  list authentication state',
    'fsid': 'fsid :  show cluster FSID/UUID',
    'status': 'status :  show cluster status',
}


def ceph_key(secret: bytes | None = None, created: float | None = None) -> str:
    """A cephx secret as `ceph auth` prints it: base64 of the encoded CryptoKey (40 characters, "AQ...")."""
    secret = secrets.token_bytes(16) if secret is None else secret
    when = time.time() if created is None else created
    secs, nsecs = int(when), int((when % 1) * 1e9)
    blob = struct.pack('<HIIH', CEPH_CRYPTO_AES, secs, nsecs, len(secret)) + secret
    return base64.b64encode(blob).decode('ascii')


def redact(text: str) -> str:
    """The text with anything shaped like a Ceph key replaced, for logs."""
    return KEY_SHAPED.sub('<key>', text)


class Result(NamedTuple):
    """What a command left: its exit status and what it wrote."""

    status: int
    stdout: str = ''
    stderr: str = ''


@dataclass
class Entity:
    key: str
    caps: dict[str, str] = field(default_factory=dict)


class CephAuth:
    """The cluster's cephx auth database, shared by every PVE node (a real cluster's monitors hold one).

    Its own lock guards it: the SSH threads read and change it, LabPve's event loop never touches it.
    `initialised=False` models a cluster where `pveceph init` never ran.
    """

    def __init__(self, nodes: Sequence[str] = ()) -> None:
        self.lock = threading.Lock()
        self.initialised = True
        self.entities: dict[str, Entity] = {}
        # What `pveceph init` / mon / mgr / osd create leave in a PVE cluster's auth database.
        self.entities['client.admin'] = Entity(ceph_key(), dict.fromkeys(CAP_TYPES, 'allow *'))
        for role in ('mds', 'mgr', 'osd', 'rbd', 'rbd-mirror', 'rgw'):
            self.entities[f'client.bootstrap-{role}'] = Entity(ceph_key(), {'mon': f'allow profile bootstrap-{role}'})
        for index, node in enumerate(nodes):
            self.entities[f'mgr.{node}'] = Entity(ceph_key(), {'mds': 'allow *', 'mon': 'allow profile mgr',
                                                               'osd': 'allow *'})
            self.entities[f'osd.{index}'] = Entity(ceph_key(), {'mgr': 'allow profile osd',
                                                                'mon': 'allow profile osd', 'osd': 'allow *'})

    @classmethod
    def of(cls, pve: Any) -> CephAuth:
        """The auth database kept on this LabPve (attribute `ceph_auth`), made on first use."""
        found = getattr(pve, 'ceph_auth', None)
        if isinstance(found, CephAuth):
            return found
        auth = cls(sorted(getattr(pve, 'node_ips', None) or getattr(pve, 'nodes', {}) or ()))
        pve.ceph_auth = auth
        return auth

    def get(self, name: str) -> Entity | None:
        with self.lock:
            found = self.entities.get(name)
            return Entity(found.key, dict(found.caps)) if found else None


def _entity_ok(name: str) -> bool:
    """EntityName::from_str: `<type>.<id>` with a known type."""
    kind, dot, _ = name.partition('.')
    return bool(dot) and kind in ENTITY_TYPES


def _entity_order(name: str) -> tuple[int, str]:
    kind, _, ident = name.partition('.')
    return ENTITY_TYPES.get(kind, 99), ident


def _cap_error(kind: str, cap: str) -> str | None:
    """AuthMonitor::valid_caps, simplified: each grant must start with `allow` or `profile <name>`."""
    if kind not in CAP_TYPES:
        return f"unknown cap type '{kind}'"
    offset = 0
    for grant in re.split(r'[,;]', cap):
        stripped = grant.strip()
        if not GRANT.match(stripped):
            rest = cap[offset + len(grant) - len(grant.lstrip()):]
            return f"{kind} capability parse failed, stopped at '{rest}' of '{cap}'"
        offset += len(grant) + 1
    return None


def _json(data: Any, fmt: str) -> str:
    """Ceph's JSONFormatter: compact for json, 4-space indented with a final newline for json-pretty."""
    if fmt == 'json-pretty':
        return json.dumps(data, indent=4, ensure_ascii=False) + '\n'
    return json.dumps(data, separators=(',', ':'), ensure_ascii=False)


class CephCli:
    """The `ceph` command of a PVE node, as root with client.admin's keyring, against LabPve's cluster."""

    def __init__(self, pve: Any, auth: CephAuth | None = None, stopping: threading.Event | None = None) -> None:
        self.pve = pve
        self.auth = auth or CephAuth.of(pve)
        self.stopping = stopping or threading.Event()

    # ----------------------------------------------------------- the shell

    def run_line(self, command: str) -> Result:
        """A command line as sshd hands it to root's shell (`bash -c COMMAND`)."""
        try:
            lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = list(lexer)
        except ValueError as exc:  # unbalanced quotes: bash's own complaint differs; say what it is
            return Result(2, stderr=f'bash: -c: line 1: syntax error ({exc})\n')
        if any(word and set(word) <= SHELL_OPERATORS for word in words) or '$(' in command or '`' in command:
            return Result(127, stderr='LabPveSsh: only simple commands are emulated, no shell operators: '
                                      f'{redact(command)}\n')
        if not words:
            return Result(0)
        if words[0] != 'ceph':
            return Result(127, stderr=f'bash: line 1: {words[0]}: command not found\n')
        return self.run(words[1:])

    # ------------------------------------------------------------- the CLI

    def run(self, args: list[str]) -> Result:
        """`ceph ARGS...`."""
        parsed = self._options(args)
        if isinstance(parsed, Result):
            return parsed
        fmt, timeout, name, words = parsed
        fault = self._connect(timeout, name)
        if fault is not None:
            return fault
        return self._command(words, fmt)

    @staticmethod
    def _options(args: list[str]) -> Result | tuple[str, float, str, list[str]]:  # noqa: PLR0911, PLR0912
        """ceph.in's argparse of the global options: (format, connect timeout, client name, command words)."""
        fmt, timeout, name = 'plain', CLIENT_MOUNT_TIMEOUT, 'client.admin'
        words: list[str] = []
        values = iter(args)
        for arg in values:
            option, eq, inline = arg.partition('=')
            takes = option in ('--format', '-f', '--connect-timeout', '--id', '--user', '--name', '-n',
                               '--cluster', '--conf', '-c')
            if takes:
                value = inline if eq else next(values, None)
                if value is None:
                    return Result(2, stderr=f'ceph: error: argument {option}: expected one argument\n')
                if option in ('--format', '-f'):
                    if value not in FORMATS:
                        choices = ', '.join(f"'{f}'" for f in FORMATS)
                        return Result(2, stderr=f"ceph: error: argument -f/--format: invalid choice: '{value}' "
                                                f'(choose from {choices})\n')
                    if value.startswith(('xml', 'yaml')):
                        return Result(EINVAL, stderr=f'LabPveSsh: ceph --format {value} is not modelled\n')
                    fmt = value
                elif option == '--connect-timeout':
                    try:
                        timeout = float(value)
                    except ValueError:
                        return Result(2, stderr=f"ceph: error: argument --connect-timeout: invalid int value: "
                                                f"'{value}'\n")
                elif option in ('--id', '--user'):
                    name = f'client.{value}'
                elif option in ('--name', '-n'):
                    name = value
                elif (option == '--cluster' and value != 'ceph') or option in ('--conf', '-c'):
                    return Result(EINVAL, stderr=f'LabPveSsh: ceph {option} {value} is not modelled\n')
            elif arg in ('-s', '--status'):
                words.insert(0, 'status')
            elif arg.startswith('-') and arg != '--':
                return Result(EINVAL, stderr=f'LabPveSsh: ceph option {option} is not modelled\n')
            elif arg != '--':
                words.append(arg)
        return fmt, timeout, name, words

    def _connect(self, timeout: float, name: str) -> Result | None:
        """librados connect(): the faults the CLI reports before it can send a command."""
        if not self.auth.initialised:
            return Result(1, stderr=NOT_INITIALISED)
        if name != 'client.admin':  # root's node only has /etc/pve/priv/ceph.client.admin.keyring
            return Result(1, stderr=NO_KEYRING)
        if self.pve.ceph.get('down'):
            scale = float(getattr(self.pve, 'time_scale', 0) or 0)
            if timeout > 0 and scale:
                self.stopping.wait(timeout * scale)
            return Result(1, stderr=TIMED_OUT)
        return None

    def _command(self, words: list[str], fmt: str) -> Result:
        prefix, nwords = next(((p, len(p.split())) for p in sorted(USAGE, key=len, reverse=True)
                               if words[:len(p.split())] == p.split()), (None, 0))
        if prefix is None:
            return Result(EINVAL, stderr='no valid command found\nError EINVAL: invalid command\n')
        rest = words[nwords:]
        takes_entity = prefix.startswith('auth ') and prefix not in ('auth ls', 'auth list')
        if takes_entity and not rest:
            return self._invalid(prefix, 'missing required parameter entity(<string>)')
        if prefix == 'auth caps' and len(rest) < 2:
            return self._invalid(prefix, 'missing required parameter caps(<string>)')
        extra = rest[1:] if takes_entity else rest
        if extra and prefix not in ('auth get-or-create', 'auth caps'):
            return self._invalid(prefix, f'unused arguments: {extra!r}')
        result = self._dispatch(prefix, rest, fmt)
        if result.status:
            return result
        # ceph.in prints a blank line before the data of every --format json* command.
        return result._replace(stdout=('\n' if fmt.startswith('json') else '') + result.stdout)

    @staticmethod
    def _invalid(prefix: str, why: str) -> Result:
        return Result(EINVAL, stderr=f'Invalid command: {why}\n{USAGE[prefix]}\nError EINVAL: invalid command\n')

    def _dispatch(self, prefix: str, rest: list[str], fmt: str) -> Result:  # noqa: PLR0911
        if prefix == 'fsid':
            fsid = self.fsid()
            return Result(0, _json({'fsid': fsid}, fmt) if fmt != 'plain' else fsid)
        if prefix == 'status':
            return self._status(fmt)
        if prefix in ('auth ls', 'auth list'):
            return self._auth_ls(fmt)
        entity, caps = rest[0], rest[1:]
        if prefix == 'auth get':
            return self._auth_get(entity, fmt)
        if prefix in ('auth get-key', 'auth print-key', 'auth print_key'):
            return self._auth_get_key(entity, fmt)
        # AuthMonitor::prepare_command: the caps' arity, then the entity's name, then the command.
        if len(caps) % 2:
            return Result(EINVAL, stderr='Error EINVAL: bad capabilities request; odd number of arguments\n')
        if not _entity_ok(entity):
            return Result(EINVAL, stderr='Error EINVAL: bad entity name\n')
        if prefix == 'auth get-or-create':
            return self._auth_get_or_create(entity, caps, fmt)
        if prefix == 'auth caps':
            return self._auth_caps(entity, caps)
        return self._auth_rm(entity)

    # ---------------------------------------------------------- read-only

    def fsid(self) -> str:
        return str(getattr(self.pve, 'ceph_fsid', None) or FAKEPVE_FSID)

    def _status(self, fmt: str) -> Result:
        from fakepve import shapes

        nodes = sorted(getattr(self.pve, 'node_ips', None) or list(self.pve.nodes))
        health = str(self.pve.ceph.get('health', 'HEALTH_OK'))
        data = shapes.ceph_status(health, nodes[0] if nodes else 'pve1')
        data['fsid'] = self.fsid()
        if fmt != 'plain':
            return Result(0, _json(data, fmt))
        mons = data['quorum_names']
        text = (f"  cluster:\n    id:     {data['fsid']}\n    health: {health}\n \n  services:\n"
                f"    mon: {len(mons)} daemons, quorum {','.join(mons)}\n")
        return Result(0, text)

    def _auth_get(self, name: str, fmt: str) -> Result:
        if not _entity_ok(name):
            return Result(EINVAL, stderr=f'Error EINVAL: invalid entity_auth {name}\n')
        found = self.auth.get(name)
        if found is None:
            return Result(ENOENT, stderr=f'Error ENOENT: failed to find {name} in keyring\n')
        return Result(0, self._keyring(name, found, fmt, with_caps=True))

    def _auth_get_key(self, name: str, fmt: str) -> Result:
        if not _entity_ok(name):
            return Result(EINVAL, stderr=f'Error EINVAL: invalid entity_auth {name}\n')
        found = self.auth.get(name)
        if found is None:
            return Result(ENOENT, stderr=f"Error ENOENT: don't have {name}\n")
        return Result(0, _json({'key': found.key}, fmt) if fmt != 'plain' else found.key)

    def _auth_ls(self, fmt: str) -> Result:
        with self.auth.lock:
            entities = {n: Entity(e.key, dict(e.caps)) for n, e in self.auth.entities.items()}
        names = sorted(entities, key=_entity_order)
        if fmt != 'plain':
            dump = [{'entity': n, 'key': entities[n].key, 'caps': dict(sorted(entities[n].caps.items()))}
                    for n in names]
            return Result(0, _json({'auth_dump': dump}, fmt))
        text = ''.join(f'{n}\n\tkey: {entities[n].key}\n'
                       + ''.join(f'\tcaps: [{k}] {v}\n' for k, v in sorted(entities[n].caps.items()))
                       for n in names)
        return Result(0, text)

    @staticmethod
    def _keyring(name: str, entity: Entity, fmt: str, with_caps: bool) -> str:
        """KeyRing::encode_formatted / encode_plaintext of one entity."""
        caps = dict(sorted(entity.caps.items()))
        if fmt != 'plain':
            return _json([{'entity': name, 'key': entity.key, 'caps': caps}], fmt)
        text = f'[{name}]\n\tkey = {entity.key}\n'
        if with_caps:
            text += ''.join(f'\tcaps {k} = "{v.replace(chr(34), chr(92) + chr(34))}"\n' for k, v in caps.items())
        return text

    # -------------------------------------------------------------- writes

    @staticmethod
    def _caps(words: list[str]) -> tuple[dict[str, str], str | None]:
        caps: dict[str, str] = {}
        for kind, cap in zip(words[::2], words[1::2], strict=True):
            error = _cap_error(kind, cap)
            if error:
                return {}, error
            caps[kind] = cap
        return caps, None

    def _auth_get_or_create(self, name: str, words: list[str], fmt: str) -> Result:
        wanted, error = self._caps(words)
        if error:
            return Result(EINVAL, stderr=f'Error EINVAL: {error}\n')
        with self.auth.lock:
            found = self.auth.entities.get(name)
            if found is not None:
                for kind, cap in sorted(wanted.items()):
                    if found.caps.get(kind) != cap:
                        return Result(EINVAL, stderr=f'Error EINVAL: key for {name} exists but cap {kind} '
                                                     'does not match\n')
                entity = Entity(found.key, dict(found.caps))
            else:
                entity = Entity(ceph_key(), dict(wanted))
                self.auth.entities[name] = Entity(entity.key, dict(wanted))
        # A plain keyring from get-or-create carries only the key (AuthMonitor sets caps for formatted output).
        return Result(0, self._keyring(name, entity, fmt, with_caps=False))

    def _auth_caps(self, name: str, words: list[str]) -> Result:
        with self.auth.lock:
            found = self.auth.entities.get(name)
            if found is None:
                return Result(ENOENT, stderr=f"Error ENOENT: couldn't find entry {name}\n")
            caps, error = self._caps(words)
            if error:
                return Result(EINVAL, stderr=f'Error EINVAL: {error}\n')
            found.caps = caps
        return Result(0, stderr=f'updated caps for {name}\n')

    def _auth_rm(self, name: str) -> Result:
        with self.auth.lock:
            self.auth.entities.pop(name, None)
        return Result(0)


# ------------------------------------------------------------------ SSH server


def host_key(path: Path) -> paramiko.PKey:
    """The Ed25519 host key at path, made (0600) the first time."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use that one
            pass
        else:
            with os.fdopen(fd, 'wb') as out:
                out.write(pem)
    if path.stat().st_mode & 0o077:
        raise HomelabError(f'the lab PVE host key {path} is readable by others', hint=f'chmod 600 {path}')
    return paramiko.Ed25519Key(filename=str(path))


def public_key(line: str) -> paramiko.PKey:
    """An OpenSSH public key line ("ssh-ed25519 AAAA... comment") as a paramiko key."""
    parts = line.split()
    if len(parts) < 2:
        raise HomelabError(f'not an SSH public key: {line[:40]!r}')
    return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))


class _Transport(paramiko.Transport):  # type: ignore[misc]
    """A server transport that says when it has answered a channel request.

    paramiko sends the reply to an `exec` request only after check_channel_exec_request returns, from the
    transport's thread; a command that ends (and closes its channel) before that reply makes the client see
    "Channel closed" instead of a result. The worker waits for `replied(chanid)` before it closes.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self._replies: dict[int, threading.Event] = {}

    def expect_reply(self, channel: paramiko.Channel) -> threading.Event:
        event = threading.Event()
        self._replies[int(channel.remote_chanid)] = event
        return event

    def _send_user_message(self, data: Any) -> None:
        try:
            super()._send_user_message(data)
        finally:
            raw = data.asbytes() if hasattr(data, 'asbytes') else bytes(data)
            if raw[:1] in (paramiko.common.cMSG_CHANNEL_SUCCESS, paramiko.common.cMSG_CHANNEL_FAILURE):
                event = self._replies.pop(struct.unpack('>I', raw[1:5])[0], None)
                if event is not None:
                    event.set()


class _Server(paramiko.ServerInterface):  # type: ignore[misc]
    """One connection's policy: root by public key, exec on a session channel, nothing else."""

    def __init__(self, owner: LabPveSsh, peer: str) -> None:
        self.owner = owner
        self.peer = peer
        self.execs: set[int] = set()

    def get_allowed_auths(self, username: str) -> str:
        return 'publickey'

    def check_auth_none(self, username: str) -> int:
        return int(paramiko.AUTH_FAILED)

    def check_auth_password(self, username: str, password: str) -> int:
        return int(paramiko.AUTH_FAILED)

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        wanted = self.owner.authorized
        if username == 'root' and key.get_name() == wanted.get_name() and key.asbytes() == wanted.asbytes():
            return int(paramiko.AUTH_SUCCESSFUL)
        logger.info('PVE SSH from %s: public key refused for %s', self.peer, username)
        return int(paramiko.AUTH_FAILED)

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == 'session':
            return int(paramiko.OPEN_SUCCEEDED)
        return int(paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED)

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        if channel.get_id() in self.execs or self.owner.stopping.is_set():
            return False
        self.execs.add(channel.get_id())
        transport = channel.get_transport()
        replied = transport.expect_reply(channel) if isinstance(transport, _Transport) else None
        self.owner.spawn(channel, command.decode('utf-8', errors='replace'), self.peer, replied)
        return True

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        return False

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        return False

    def check_channel_pty_request(self, *args: Any) -> bool:
        return False

    def check_channel_env_request(self, channel: paramiko.Channel, name: bytes, value: bytes) -> bool:
        return False

    def check_channel_x11_request(self, *args: Any) -> bool:
        return False

    def check_channel_forward_agent_request(self, channel: paramiko.Channel) -> bool:
        return False

    def check_channel_direct_tcpip_request(self, chanid: int, origin: Any, destination: Any) -> int:
        return int(paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED)

    def check_port_forward_request(self, address: str, port: int) -> bool:
        return False

    def check_global_request(self, kind: str, msg: Any) -> bool:
        return False


class LabPveSsh:
    """SSH (port 22) on every PVE address of the lab, root by the lab's key, running `ceph` against LabPve.

    pve: the LabPve (its `ceph` faults and fsid are read, never changed; the auth database is kept in
    `pve.ceph_auth`, a CephAuth with its own lock). authorized_key: the lab's public key line
    (state/ssh/id_ed25519.pub). host_key_file: where the Ed25519 host key lives (state/HOST_KEY); made once.
    """

    def __init__(self, pve: Any, authorized_key: str, host_key_file: Path) -> None:
        self.pve = pve
        self.authorized = public_key(authorized_key)
        self.host_key = host_key(host_key_file)
        self.auth = CephAuth.of(pve)
        self.stopping = threading.Event()
        self.cli = CephCli(pve, self.auth, self.stopping)
        self.addresses: list[str] = []
        self.port = 0
        self._listeners: list[socket.socket] = []
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._transports: set[paramiko.Transport] = set()
        self._workers: set[threading.Thread] = set()

    @classmethod
    def for_state(cls, pve: Any, state: Path) -> LabPveSsh:
        """The lab's server: the key pair `lab.up` made in state, the host key kept beside it."""
        from homelab.lab import layout

        line = Path(f'{state / layout.SSH_KEY}.pub').read_text(encoding='utf-8').strip()
        return cls(pve, line, state / HOST_KEY)

    def host_key_line(self) -> str:
        """The host key as known_hosts wants it after the address: "ssh-ed25519 AAAA..."."""
        return f'{self.host_key.get_name()} {self.host_key.get_base64()}'

    def known_hosts_lines(self) -> list[str]:
        """One known_hosts line per address served ("[addr]:port key" off port 22)."""
        def host(address: str) -> str:
            return address if self.port == 22 else f'[{address}]:{self.port}'
        return [f'{host(a)} {self.host_key_line()}' for a in self.addresses]

    # ------------------------------------------------------------ serving

    def start(self, addresses: Sequence[str], port: int = 22) -> None:
        """Listen on each address:port and accept in a daemon thread; port 0 (any) only with one address."""
        if not addresses or (not port and len(addresses) > 1):
            raise ValueError('LabPveSsh.start needs at least one address, and a fixed port for several')
        if self._accept_thread is not None:
            raise RuntimeError('LabPveSsh is already started')
        self.stopping.clear()
        selector = selectors.DefaultSelector()
        try:
            for address in addresses:
                family = socket.AF_INET6 if ':' in address else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                self._listeners.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((address, port))
                sock.listen(16)
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
        except BaseException:
            for sock in self._listeners:
                sock.close()
            self._listeners.clear()
            selector.close()
            raise
        self._wake_r, self._wake_w = socket.socketpair()
        selector.register(self._wake_r, selectors.EVENT_READ)
        self._selector = selector
        self.addresses = list(addresses)
        self.port = port or self._listeners[0].getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name='lab-pve-ssh', daemon=True)
        self._accept_thread.start()
        logger.info('PVE SSH at %s, port %s', ', '.join(self.addresses), self.port)

    def _accept_loop(self) -> None:
        assert self._selector is not None
        while not self.stopping.is_set():
            for ready, _ in self._selector.select():
                if ready.fileobj is self._wake_r or self.stopping.is_set():
                    return
                listener = ready.fileobj
                assert isinstance(listener, socket.socket)
                try:
                    conn, peer = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    if self.stopping.is_set():
                        return
                    logger.exception('PVE SSH: accept failed')
                    continue
                self._serve(conn, f'{peer[0]}:{peer[1]}')

    def _serve(self, conn: socket.socket, peer: str) -> None:
        conn.setblocking(True)
        try:
            transport = _Transport(conn)
            transport.add_server_key(self.host_key)
            # With an event start_server returns at once; the transport's own thread negotiates.
            transport.start_server(event=threading.Event(), server=_Server(self, peer))
        except (paramiko.SSHException, OSError, EOFError):
            logger.warning('PVE SSH from %s: could not start the session', peer, exc_info=True)
            conn.close()
            return
        with self._lock:
            self._transports = {t for t in self._transports if t.is_alive()}
            self._transports.add(transport)

    def spawn(self, channel: paramiko.Channel, command: str, peer: str, replied: threading.Event | None) -> None:
        """Run an exec request's command in a worker thread (never in the transport's thread)."""
        worker = threading.Thread(target=self._exec, args=(channel, command, peer, replied),
                                  name='lab-pve-ssh-exec', daemon=True)
        with self._lock:
            self._workers = {w for w in self._workers if w.is_alive()}
            self._workers.add(worker)
        worker.start()

    def _exec(self, channel: paramiko.Channel, command: str, peer: str, replied: threading.Event | None) -> None:
        started = time.monotonic()
        try:
            result = self.cli.run_line(command)
        except Exception:  # a bug here must still end the command, as a crashed process would
            logger.exception('PVE SSH from %s: `%s` failed', peer, redact(command))
            result = Result(1, stderr='LabPveSsh: internal error\n')
        try:
            if result.stdout:
                channel.sendall(result.stdout.encode())
            if result.stderr:
                channel.sendall_stderr(result.stderr.encode())
            channel.send_exit_status(result.status)
        except (OSError, EOFError, paramiko.SSHException):
            logger.info('PVE SSH from %s: the client left before `%s` ended', peer, redact(command))
        finally:
            if replied is not None:  # close only after the client was told the exec request succeeded
                replied.wait(REPLY_WAIT)
            channel.close()
        logger.info('PVE SSH from %s: `%s` exited %d (%.2fs)', peer, redact(command), result.status,
                    time.monotonic() - started)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listeners and every session, and join the threads; raises TimeoutError if some linger."""
        deadline = time.monotonic() + timeout
        self.stopping.set()
        if self._wake_w is not None:
            self._wake_w.send(b'x')
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for wake in (self._wake_r, self._wake_w):
            if wake is not None:
                wake.close()
        self._wake_r = self._wake_w = None
        with self._lock:
            transports, workers = list(self._transports), list(self._workers)
            self._transports.clear()
            self._workers.clear()
        for transport in transports:
            transport.close()
        threads: list[threading.Thread] = [*transports, *workers]
        if self._accept_thread is not None:
            threads.append(self._accept_thread)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._accept_thread = None
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            raise TimeoutError(f'LabPveSsh.stop: {len(alive)} thread(s) still running after {timeout}s: '
                               + ', '.join(alive))
        logger.info('PVE SSH stopped')

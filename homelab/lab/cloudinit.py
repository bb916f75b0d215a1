"""The NoCloud seed Proxmox VE 9 puts on a VM's cloud-init drive, for the lab's nspawn guests.

A lab VM boots as a systemd-nspawn container, which has no CD-ROM for PVE's `cidata` ISO. The lab
writes the same files into the container's /var/lib/cloud/seed/nocloud/ instead, so cloud-init in the
guest sees exactly what it would see on the real cluster: same hostname, user, keys, network and, as
cloud-init's per-instance state is keyed on it, the same instance-id.

Upstream followed, function by function: qemu-server `src/PVE/QemuServer/Cloudinit.pm` at commit
03f2fbafc2b67819e089dbed809aca174edb2309 (github.com/proxmox/qemu-server, the PVE 9 `src/` layout with
PVE::QemuServer::Network):

- `get_cloudinit_format`: `citype`, else configdrive2 for Windows `ostype`, else nocloud;
- `get_hostname_fqdn`, `get_dns_conf`, `cloudinit_userdata`, `split_ip4`;
- `nocloud_network` (network-config v1; `nocloud_network_v2` is not used by PVE), `nocloud_metadata`,
  `nocloud_gen_metadata` (instance-id = sha1_hex(user-data . network-config));
- `generate_nocloud`: the four files, `vendor-data` always written (empty without cicustom vendor=),
  and the 3 MiB limit on their sum;
- `get_custom_cloudinit_files`: cicustom snippets are not available in the lab (NotImplementedError).

Helpers from elsewhere in PVE, reproduced as far as the files above depend on them:
`parse_net`, `parse_ipconfig` (qemu-server src/PVE/QemuServer/Network.pm), `parse_property_string`,
`pve_verify_ipv4_config` (pve-common PVE/JSONSchema.pm), `$ipv4_reverse_mask` (pve-common
PVE/Network.pm), `read_etc_resolv_conf` (pve-common PVE/INotify.pm), `encrypt_pw` (pve-common
PVE/Tools.pm) and the `cipassword` handling of `update_vm_api` (qemu-server PVE/API2/Qemu.pm).

What depends on the PVE host is an argument: the host's resolv.conf (for `nameserver`/`searchdomain`
left unset) is `host_dns`, as (search domains, nameservers), get_dns_conf's order. Secrets
(`cipassword`, `sshkeys`) are never logged.

Where the lab cannot or should not do what PVE does:
- a plain-text `cipassword` (PVE's API would have stored it hashed) is hashed as encrypt_pw does
  ($5$, 8-character salt), but with a salt derived from vmid and password rather than the clock, so the
  seed, and with it the instance-id, stays the same from one start to the next;
- a netN without a MAC: parse_net would make up a random one per generation; ValueError instead;
- cicustom snippets, and citypes other than nocloud (configdrive2, opennebula): NotImplementedError;
- parse_ipconfig's warnings go to this module's logger; the output is PVE's (no subnets for that NIC).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    'SEED_DIR',
    'HostDns',
    'encrypt_pw',
    'instance_id',
    'read_resolv_conf',
    'seed_files',
    'sha256_crypt',
    'write_seed',
]

logger = logging.getLogger(__name__)

SEED_DIR = Path('var/lib/cloud/seed/nocloud')
# The files generate_nocloud puts on the drive, and the mode write_seed gives each.
SEED_MODES = {'meta-data': 0o644, 'user-data': 0o600, 'network-config': 0o644, 'vendor-data': 0o644}
MAX_SEED_BYTES = 3 * 1024 * 1024  # generate_nocloud: "Cloud-Init sum of snippets too big (> 3 MiB)"

# qemu-server src/PVE/QemuServer/Network.pm: $nic_model_list, and the other keys of $net_fmt.
NIC_MODELS = ('e1000', 'e1000-82540em', 'e1000-82544gc', 'e1000-82545em', 'e1000e', 'i82551', 'i82557b',
              'i82559er', 'ne2k_isa', 'ne2k_pci', 'pcnet', 'rtl8139', 'virtio', 'vmxnet3')
NET_KEYS = frozenset({'macaddr', 'model', 'bridge', 'queues', 'rate', 'tag', 'trunks', 'firewall', 'link_down',
                      'mtu'})
IPCONFIG_KEYS = frozenset({'ip', 'gw', 'ip6', 'gw6'})
CICUSTOM_KEYS = ('meta', 'network', 'user', 'vendor')
MAC = re.compile(r'[0-9a-f]{2}(?::[0-9a-f]{2}){5}', re.IGNORECASE)
# PVE::API2::Qemu update_vm_api: a cipassword matching this is stored as is, anything else is hashed.
CRYPTED = re.compile(r'^\$(?:[156]|2[ay])(\$.+){2}', re.DOTALL)
# The GET .../config API answer hides the password behind this.
REDACTED = '**********'
NON_SPACE = re.compile(r'\S', re.ASCII)
SPACES = re.compile(r'\s+', re.ASCII)

Config = Mapping[str, Any]


class HostDns(NamedTuple):
    """What PVE reads from the host's /etc/resolv.conf: the order of get_dns_conf's return value."""

    search: list[str]
    nameservers: list[str]


# ----------------------------------------------------------------------------------- Perl semantics


def _text(value: Any) -> str:
    """A config value as Perl interpolates it (API answers may carry ints)."""
    if isinstance(value, bool):
        return '1' if value else ''
    return str(value)


def _truthy(value: Any) -> bool:
    """Perl truth of a scalar: undef, '' and '0' are false."""
    return value is not None and _text(value) not in ('', '0')


def _split_ws(text: str) -> list[str]:
    """Perl `split(/\\s+/, $text)`: a leading empty field stays, trailing empty fields go."""
    fields = SPACES.split(text)
    while fields and fields[-1] == '':
        fields.pop()
    return fields


def _property_string(data: str, keys: frozenset[str], default_key: str | None = None) -> dict[str, str]:
    """PVE::JSONSchema::parse_property_string for the flat formats used here (raises ValueError)."""
    res: dict[str, str] = {}
    seen_default = False
    for part in data.split(','):
        if not part.strip():
            continue
        found = re.fullmatch(r'([^=]+)=(.+)', part, re.DOTALL)
        if found:
            key, value = found.group(1), found.group(2)
            if key in res:
                raise ValueError(f'duplicate key in comma-separated list property: {key}')
            if default_key == 'model' and key in NIC_MODELS:  # keyAlias => 'model', alias => 'macaddr'
                if 'model' in res:
                    raise ValueError("key alias 'model' is already defined")
                res['model'] = key
                key = 'macaddr'
            if key not in keys:
                raise ValueError(f'invalid key in comma-separated list property: {key}')
            res[key] = value
        elif '=' not in part:
            if default_key is None:
                raise ValueError('value without key, but schema does not define a default key')
            if seen_default or default_key in res:
                raise ValueError(f'duplicate key in comma-separated list property: {default_key}')
            seen_default = True
            res[default_key] = part
        else:
            raise ValueError('missing key in comma-separated list property')
    return res


# ------------------------------------------------------------------------------------ config parsing


def _parse_net(iface: str, data: str) -> str:
    """The lower-cased MAC of netN (parse_net, then `lc($net->{macaddr}) or die` of nocloud_network)."""
    no_mac = f"network interface '{iface}' has no mac address"
    try:
        net = _property_string(data, NET_KEYS, default_key='model')
        if 'model' not in net:
            raise ValueError('model: property is missing and it is not optional')
        if net['model'] not in NIC_MODELS:
            raise ValueError(f"model: value '{net['model']}' does not have a value in the enumeration")
        if 'macaddr' in net and not MAC.fullmatch(net['macaddr']):
            raise ValueError('macaddr: value does not look like a valid MAC address')
    except ValueError as exc:  # parse_net warns and returns undef: no MAC
        raise ValueError(f'{no_mac} ({iface}: {exc})') from None
    if 'macaddr' not in net:
        # parse_net would make up a random one on every generation; PVE's API stores one on create.
        raise ValueError(f'{no_mac} (PVE would generate a random one per boot; give {iface} a MAC)')
    return net['macaddr'].lower()


def _valid_cidr(value: str, version: int) -> bool:
    """pve_verify_cidrv4/v6: an address and a prefix of 8..32 (8..128)."""
    addr, slash, mask = value.partition('/')
    if not slash or not mask.isdigit():
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return ip.version == version and 7 < int(mask) <= ip.max_prefixlen


def _valid_ip(value: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(value).version == version
    except ValueError:
        return False


def _ipconfig_value_ok(key: str, value: str) -> bool:
    """The formats of $ipconfig_fmt: pve-ipv4-config, pve-ipv6-config, ipv4, ipv6."""
    if key == 'ip':
        return value in ('dhcp', 'manual') or _valid_cidr(value, 4)
    if key == 'ip6':
        return value in ('dhcp', 'auto', 'manual') or _valid_cidr(value, 6)
    return _valid_ip(value, 4 if key == 'gw' else 6)


def _parse_ipconfig(data: str) -> dict[str, str] | None:
    """parse_ipconfig: None where PVE warns and returns undef."""
    try:
        res = _property_string(data, IPCONFIG_KEYS)
        for key, value in res.items():
            if not _ipconfig_value_ok(key, value):
                raise ValueError(f'{key}: value does not have the {key} format')
    except ValueError as exc:
        logger.warning('ipconfig %r: %s', data, exc)
        return None
    problem = None
    if _truthy(res.get('gw')) and not _truthy(res.get('ip')):
        problem = 'gateway specified without specifying an IP address'
    elif _truthy(res.get('gw6')) and not _truthy(res.get('ip6')):
        problem = 'IPv6 gateway specified without specifying an IPv6 address'
    elif _truthy(res.get('gw')) and res.get('ip') == 'dhcp':
        problem = 'gateway specified together with DHCP'
    elif _truthy(res.get('gw6')) and not _valid_ip(res.get('ip6', '').split('/')[0], 6):
        problem = f"IPv6 gateway specified together with {res.get('ip6')} address"
    if problem:
        logger.warning('ipconfig %r: %s', data, problem)
        return None
    if not _truthy(res.get('ip')) and not _truthy(res.get('ip6')):
        return {'ip': 'dhcp', 'ip6': 'dhcp'}
    return res


def _split_ip4(ip: str) -> tuple[str, str]:
    """split_ip4: address and dotted netmask ($PVE::Network::ipv4_reverse_mask->[$mask])."""
    addr, slash, mask = ip.partition('/')
    if not slash:
        raise ValueError(f'not a CIDR: {ip}')
    return addr, str(ipaddress.IPv4Network(f'0.0.0.0/{int(mask)}').netmask)


def _windows_version(ostype: str | None) -> int:
    """PVE::QemuServer::Helpers::windows_version."""
    if not ostype:
        return 0
    if ostype in ('wxp', 'w2k3', 'w2k'):
        return 5
    if ostype in ('w2k8', 'wvista'):
        return 6
    found = re.fullmatch(r'win(\d+)', ostype)
    return int(found.group(1)) if found else 0


def _cloudinit_format(config: Config) -> str:
    """get_cloudinit_format."""
    if config.get('citype') is not None:
        return _text(config['citype'])
    if config.get('ostype') is not None and _windows_version(_text(config['ostype'])):
        return 'configdrive2'
    return 'nocloud'


def _check_cicustom(config: Config) -> None:
    """get_custom_cloudinit_files, as far as the lab can go: it has no snippet storage."""
    cicustom = config.get('cicustom')
    if not _truthy(cicustom):
        return
    files = _property_string(_text(cicustom), frozenset(CICUSTOM_KEYS))
    if wanted := [f'{k}={v}' for k, v in files.items() if v]:
        raise NotImplementedError(
            f"cicustom {', '.join(wanted)}: the lab has no snippet storage to read cloud-init snippets from; "
            'drop cicustom from the VM config')


# ------------------------------------------------------------------------------------ the files


def _hostname_fqdn(config: Config, vmid: int, name: str) -> tuple[str, str]:
    """get_hostname_fqdn: the name (else VM<vmid>), and name.searchdomain unless the name has a dot."""
    hostname = name or f'VM{vmid}'
    if '.' in hostname:
        return hostname.split('.', 1)[0], hostname
    search = config.get('searchdomain')
    if _truthy(search):
        return hostname, f'{hostname}.{_text(search)}'
    return hostname, hostname


def _dns_conf(config: Config, host_dns: tuple[list[str], list[str]]) -> tuple[list[str], list[str]]:
    """get_dns_conf: config searchdomain/nameserver, else the host's resolv.conf (read_etc_resolv_conf).

    read_etc_resolv_conf keeps one search domain (the first of the line: `(\\S+)`) and three nameservers.
    """
    host_search, host_servers = host_dns
    if config.get('searchdomain') is not None:
        search = _split_ws(_text(config['searchdomain']))
    else:
        search = _split_ws(host_search[0]) if host_search else []
    if config.get('nameserver') is not None:
        servers = _split_ws(_text(config['nameserver']))
    else:
        servers = [s for s in host_servers[:3] if _truthy(s)]
    return search, servers


def _password(config: Config, vmid: int) -> str | None:
    """The cipassword as PVE stores it: a crypt hash (update_vm_api hashes anything else)."""
    value = config.get('cipassword')
    if value is None:
        return None
    password = _text(value)
    if password == REDACTED:
        raise ValueError('cipassword is the API\'s redacted placeholder; pass the stored VM config')
    if CRYPTED.match(password):
        return password
    return encrypt_pw(password, _stable_salt(vmid, password))


def _ssh_keys(value: Any) -> list[str]:
    """URI::Escape::uri_unescape, one key a line, blank lines dropped (cloudinit_userdata)."""
    keys = urllib.parse.unquote(_text(value))
    return [k for k in keys.split('\n') if NON_SPACE.search(k)]


def _user_data(config: Config, vmid: int, name: str) -> str:
    """cloudinit_userdata."""
    hostname, fqdn = _hostname_fqdn(config, vmid, name)
    out = ['#cloud-config', f'hostname: {hostname}', 'manage_etc_hosts: true', f'fqdn: {fqdn}']
    username = _text(config['ciuser']) if config.get('ciuser') is not None else None
    password = _password(config, vmid)
    if username is not None:
        out.append(f'user: {username}')
        if username == 'root':
            out.append('disable_root: False')
    if password is not None:
        out.append(f'password: {password}')
    if config.get('sshkeys') is not None:
        out.append('ssh_authorized_keys:')
        out.extend(f'  - {key}' for key in _ssh_keys(config['sshkeys']))
    out += ['chpasswd:', '  expire: False']
    if username != 'root':
        out += ['users:', '  - default']
    if config.get('ciupgrade') is None or _truthy(config['ciupgrade']):
        out.append('package_upgrade: true')
    return '\n'.join(out) + '\n'


def _subnets(ipconfig: Mapping[str, str], j: str) -> list[str]:
    """nocloud_network's subnets of one interface, indented by `j`."""
    out = []
    if (ip := ipconfig.get('ip')) is not None:
        if ip == 'dhcp':
            out.append(f'{j}- type: dhcp4')
        else:
            addr, mask = _split_ip4(ip)
            out += [f'{j}- type: static', f"{j}  address: '{addr}'", f"{j}  netmask: '{mask}'"]
            if (gw := ipconfig.get('gw')) is not None:
                out.append(f"{j}  gateway: '{gw}'")
    if (ip6 := ipconfig.get('ip6')) is not None:
        if ip6 == 'dhcp':
            out.append(f'{j}- type: dhcp6')
        elif ip6 == 'auto':  # "SLAAC is only supported by cloud-init since 19.4"
            out.append(f'{j}- type: ipv6_slaac')
        else:
            out += [f'{j}- type: static6', f"{j}  address: '{ip6}'"]
            if (gw6 := ipconfig.get('gw6')) is not None:
                out.append(f"{j}  gateway: '{gw6}'")
    return out


def _network_config(config: Config, host_dns: tuple[list[str], list[str]]) -> str:
    """nocloud_network: network config v1, one physical entry per netN with an ipconfigN."""
    out = ['version: 1', 'config:']
    i = '    '
    for iface in sorted(k for k in config if re.fullmatch(r'net\d+', k)):  # Perl `sort`: string order
        nid = iface[3:]
        ipconfig_value = config.get(f'ipconfig{nid}')
        if not _truthy(ipconfig_value):
            continue
        mac = _parse_net(iface, _text(config[iface]))
        ipconfig = _parse_ipconfig(_text(ipconfig_value)) or {}
        out += [f'{i}- type: physical', f'{i}  name: eth{nid}', f"{i}  mac_address: '{mac}'", f'{i}  subnets:']
        out += _subnets(ipconfig, i + '  ')
    search, servers = _dns_conf(config, host_dns)
    # `if ($searchdomains || $nameservers)` tests two array refs: always true.
    out.append(f'{i}- type: nameserver')
    if servers:
        out.append(f'{i}  address:')
        out.extend(f"{i}  - '{s}'" for s in servers)
    if search:
        out.append(f'{i}  search:')
        out.extend(f"{i}  - '{s}'" for s in search)
    return '\n'.join(out) + '\n'


def instance_id(user_data: str, network_config: str) -> str:
    """nocloud_gen_metadata's uuid: sha1_hex of user-data followed by network-config."""
    return hashlib.sha1((user_data + network_config).encode(), usedforsecurity=False).hexdigest()


def seed_files(vmid: int, name: str, config: Mapping[str, Any], *,
               host_dns: tuple[list[str], list[str]] = ([], [])) -> dict[str, str]:
    """The files generate_nocloud writes on VM `vmid`'s cloud-init drive, by name.

    `name` is the VM's name (config `name`; empty means unset, giving VM<vmid>). `config` is the VM's
    config as PVE stores it (API values as str or int). `host_dns` is the PVE host's resolv.conf as
    (search domains, nameservers), see read_resolv_conf, used where the config has no searchdomain or
    nameserver. Returns meta-data, user-data, network-config and vendor-data (empty, as PVE writes it).

    Raises NotImplementedError for cicustom snippets or a citype/ostype PVE would not serve as nocloud,
    ValueError where PVE would die (a NIC without MAC, `ip=manual`, over 3 MiB).
    """
    fmt = _cloudinit_format(config)
    if fmt != 'nocloud':
        raise NotImplementedError(f"cloud-init format '{fmt}': the lab only writes NoCloud seeds")
    _check_cicustom(config)
    user = _user_data(config, vmid, name)
    network = _network_config(config, host_dns)
    meta = f'instance-id: {instance_id(user, network)}\n'  # nocloud_metadata
    vendor = ''
    files = {'meta-data': meta, 'user-data': user, 'network-config': network, 'vendor-data': vendor}
    if sum(len(v.encode()) for v in files.values()) > MAX_SEED_BYTES:
        raise ValueError('Cloud-Init sum of snippets too big (> 3 MiB)')
    return files


def read_resolv_conf(text: str) -> HostDns:
    """PVE::INotify::read_etc_resolv_conf: the last search/domain line's first domain, three nameservers."""
    search: list[str] = []
    servers: list[str] = []
    for line in text.splitlines():
        if found := re.match(r'(?:search|domain)\s+(\S+)', line):
            search = [found.group(1)]
        elif (found := re.match(r'\s*nameserver\s+(\S+)', line)) and _valid_any_ip(found.group(1)):
            servers.append(found.group(1))
    return HostDns(search, servers[:3])


def _valid_any_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------ passwords

CRYPT64 = './0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
# The byte order of glibc's SHA-256 crypt output (sha256-crypt.c, b64_from_24bit calls).
SHA256_ORDER = ((0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14), (15, 25, 5), (6, 16, 26),
                (27, 7, 17), (18, 28, 8), (9, 19, 29))


def _repeat(digest: bytes, length: int) -> bytes:
    return (digest * (length // len(digest) + 1))[:length]


def sha256_crypt(password: bytes, salt: str, rounds: int = 5000) -> str:
    """crypt(3) with a `$5$salt$` setting (Drepper's SHA-crypt, default rounds), as glibc computes it."""
    salt = salt.split('$', 1)[0][:16]
    s = salt.encode()
    p = password
    b = hashlib.sha256(p + s + p).digest()
    a = hashlib.sha256(p + s + _repeat(b, len(p)))
    n = len(p)
    while n:
        a.update(b if n & 1 else p)
        n >>= 1
    digest = a.digest()
    p_bytes = _repeat(hashlib.sha256(p * len(p)).digest(), len(p))
    s_bytes = _repeat(hashlib.sha256(s * (16 + digest[0])).digest(), len(s))
    for r in range(rounds):
        c = hashlib.sha256(p_bytes if r & 1 else digest)
        if r % 3:
            c.update(s_bytes)
        if r % 7:
            c.update(p_bytes)
        c.update(digest if r & 1 else p_bytes)
        digest = c.digest()

    def b64(b2: int, b1: int, b0: int, count: int) -> str:
        w = (b2 << 16) | (b1 << 8) | b0
        out = ''
        for _ in range(count):
            out += CRYPT64[w & 0x3F]
            w >>= 6
        return out

    encoded = ''.join(b64(digest[x], digest[y], digest[z], 4) for x, y, z in SHA256_ORDER)
    encoded += b64(0, digest[31], digest[30], 3)
    prefix = '$5$' if rounds == 5000 else f'$5$rounds={rounds}$'
    return f'{prefix}{salt}${encoded}'


def encrypt_pw(password: str, salt: str) -> str:
    """PVE::Tools::encrypt_pw: SHA-256 crypt of the UTF-8 password with an 8-character salt."""
    return sha256_crypt(password.encode(), salt)


def _stable_salt(vmid: int, password: str) -> str:
    """A salt shaped like encrypt_pw's (8 chars of a SHA-1 base64, '+' as 'X'), but stable.

    PVE hashes once, when the password is set, and keeps the hash; the seed is generated at every
    start. A fresh random salt would change user-data, hence the instance-id, on every boot.
    """
    digest = hashlib.sha1(f'{vmid}\0{password}'.encode(), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode()[:8].replace('+', 'X')


# ------------------------------------------------------------------------------------ writing


def _mkdir(path: Path) -> None:
    """Create one directory 0755 (whatever the umask); refuse a symlink where a directory should be."""
    if path.is_symlink():
        raise ValueError(f'{path} is a symlink; refusing to write a cloud-init seed through it')
    if not path.exists():
        path.mkdir(mode=0o755)
        path.chmod(0o755)
    elif not path.is_dir():
        raise ValueError(f'{path} exists and is not a directory')


def write_seed(root: Path, files: Mapping[str, str]) -> Path:
    """Write `files` (from seed_files) into root/var/lib/cloud/seed/nocloud; return that directory.

    Directories are 0755, user-data 0600 (it may hold a password hash), the rest 0644. Seed files not
    in `files` are removed, as a regenerated PVE drive would not have them either.
    """
    unknown = sorted(set(files) - set(SEED_MODES))
    if unknown:
        raise ValueError(f'not NoCloud seed files: {", ".join(unknown)}')
    if not root.is_dir():
        raise ValueError(f'{root} is not a directory')
    path = root
    for part in SEED_DIR.parts:
        path /= part
        _mkdir(path)
    path.chmod(0o755)
    for fname, mode in SEED_MODES.items():
        target = path / fname
        if fname not in files:
            if target.is_symlink() or target.exists():
                target.unlink()
            continue
        tmp = path / f'.{fname}.tmp'
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        with os.fdopen(fd, 'wb') as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(files[fname].encode())
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(target)
    logger.info('wrote NoCloud seed %s (%s)', path, ', '.join(sorted(files)))
    return path

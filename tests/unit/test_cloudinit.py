"""homelab.lab.cloudinit: the NoCloud seed PVE 9 writes, checked against qemu-server's Cloudinit.pm.

Expected texts are written out by hand from qemu-server src/PVE/QemuServer/Cloudinit.pm (commit
03f2fbafc2b67819e089dbed809aca174edb2309); each comment names the upstream function and statement a
line comes from. `$i` in nocloud_network is four spaces, and two more inside an interface's subnets.
"""

from __future__ import annotations

import hashlib
import logging
import stat
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from homelab.lab.cloudinit import (
    SEED_DIR,
    HostDns,
    encrypt_pw,
    instance_id,
    read_resolv_conf,
    seed_files,
    sha256_crypt,
    write_seed,
)

VMID = 201
KEY = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHomelabUnitTestKeyHomelabUnitTestKey01 operator@test'
KEY2 = 'ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC+/x9= backup@host'
HASH = '$6$rounds=4096$Salt1234$Rz0gSLkYvF3c7q1qQ9hYg2tQmW4p8yU1mJ7o5Nn3xKk0bHfT6dE2aC9sL4vZ8wX1yR5uI3oP7eA6.'


def lab_config(**overrides: Any) -> dict[str, Any]:
    """A K3s VM as homelab.layers.vms configures it (the clone of the template, with MACs from PVE)."""
    config: dict[str, Any] = {
        'name': 'ichigo',
        'ostype': 'l26',
        'ide2': 'ceph-vm:vm-201-cloudinit,media=cdrom',
        'net0': 'virtio=BC:24:11:AA:BB:01,bridge=vmbr0',
        'net1': 'virtio=BC:24:11:AA:BB:02,bridge=k3snet',
        'ciuser': 'homelab',
        'sshkeys': urllib.parse.quote(KEY + '\n', safe=''),  # what the vms layer sends
        'ipconfig0': 'ip=192.168.7.223/24,gw=192.168.7.1',
        'ciupgrade': 0,
        'nameserver': '192.168.7.1',
        'searchdomain': 'int.jigga.xyz',
    }
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


def seed(config: dict[str, Any], **kwargs: Any) -> dict[str, str]:
    return seed_files(VMID, str(config.get('name', '')), config, **kwargs)


# --------------------------------------------------------------------------------- exact texts


def test_lab_vm_seed_is_what_pve_writes() -> None:
    files = seed(lab_config())

    assert files['user-data'].splitlines() == [
        '#cloud-config',                      # cloudinit_userdata: $content = "#cloud-config\n"
        'hostname: ichigo',                   # "hostname: $hostname\n" (get_hostname_fqdn: name)
        'manage_etc_hosts: true',             # "manage_etc_hosts: true\n"
        'fqdn: ichigo.int.jigga.xyz',         # "fqdn: $fqdn\n" ("$hostname.$search" with searchdomain)
        'user: homelab',                      # "user: $username\n" if defined($username)
        # no disable_root (ciuser ne 'root'), no password (cipassword undefined)
        'ssh_authorized_keys:',               # "ssh_authorized_keys:\n" if defined(sshkeys)
        f'  - {KEY}',                         # "  - $k\n" per uri_unescape'd, non-blank line
        'chpasswd:',                          # "chpasswd:\n"
        '  expire: False',                    # "  expire: False\n"
        'users:',                             # "users:\n" if !defined($username) || $username ne 'root'
        '  - default',                        # "  - default\n"
        # no package_upgrade: ciupgrade is defined and false
    ]
    assert files['user-data'].endswith('  - default\n')

    assert files['network-config'].splitlines() == [
        'version: 1',                         # nocloud_network: "version: 1\n"
        'config:',                            # . "config:\n"
        '    - type: physical',               # "${i}- type: physical\n" for net0 (it has ipconfig0)
        '      name: eth0',                   # "${i}  name: eth$id\n"
        "      mac_address: 'bc:24:11:aa:bb:01'",  # "${i}  mac_address: '$mac'\n", $mac = lc($net->{macaddr})
        '      subnets:',                     # "${i}  subnets:\n", then $i .= '  '
        '      - type: static',               # ip is a CIDR: "${i}- type: static\n"
        "        address: '192.168.7.223'",   # "${i}  address: '$addr'\n" (split_ip4)
        "        netmask: '255.255.255.0'",   # "${i}  netmask: '$mask'\n" ($ipv4_reverse_mask->[24])
        "        gateway: '192.168.7.1'",     # "${i}  gateway: '$gw'\n" if defined gw
        # net1 has no ipconfig1: `next if !$conf->{"ipconfig$id"}`
        '    - type: nameserver',             # my $i = '    '; "${i}- type: nameserver\n"
        '      address:',                     # "${i}  address:\n" if @$nameservers
        "      - '192.168.7.1'",              # "${i}  - '$_'\n" foreach split(/\s+/, nameserver)
        '      search:',                      # "${i}  search:\n" if @$searchdomains
        "      - 'int.jigga.xyz'",            # "${i}  - '$_'\n" foreach split(/\s+/, searchdomain)
    ]
    assert files['network-config'].endswith("'int.jigga.xyz'\n")

    # nocloud_gen_metadata: sha1_hex($user . $network); nocloud_metadata: "instance-id: $uuid\n"
    uuid = hashlib.sha1((files['user-data'] + files['network-config']).encode()).hexdigest()
    assert files['meta-data'] == f'instance-id: {uuid}\n'
    # generate_nocloud: $vendor_data = '' if !defined($vendor_data), written as /vendor-data
    assert files['vendor-data'] == ''
    assert set(files) == {'meta-data', 'user-data', 'network-config', 'vendor-data'}


def test_dhcp() -> None:
    files = seed(lab_config(ipconfig0='ip=dhcp'))
    net = files['network-config'].splitlines()
    # nocloud_network: if ($ip eq 'dhcp') { "${i}- type: dhcp4\n" }; no ip6 key, so no v6 subnet
    assert net[2:7] == [
        '    - type: physical',
        '      name: eth0',
        "      mac_address: 'bc:24:11:aa:bb:01'",
        '      subnets:',
        '      - type: dhcp4',
    ]
    assert net[7] == '    - type: nameserver'


def test_static_without_gateway() -> None:
    net = seed(lab_config(ipconfig0='ip=10.20.30.40/16'))['network-config']
    assert "        address: '10.20.30.40'\n        netmask: '255.255.0.0'\n    - type: nameserver\n" in net
    assert 'gateway' not in net  # only `if (defined(my $gw = $ipconfig->{gw}))`


def test_ipconfig_without_addresses_means_dhcp_on_both() -> None:
    # parse_ipconfig: `if (!$res->{ip} && !$res->{ip6}) { return { ip => 'dhcp', ip6 => 'dhcp' } }`;
    # an ipconfig with neither is skipped as empty, so use one PVE can only store via the config file.
    net = seed(lab_config(ipconfig0=','))['network-config']
    assert '      - type: dhcp4\n      - type: dhcp6\n' in net


def test_ipv6_variants() -> None:
    slaac = seed(lab_config(ipconfig0='ip6=auto'))['network-config']
    assert '      subnets:\n      - type: ipv6_slaac\n    - type: nameserver\n' in slaac  # no ip: no v4
    static6 = seed(lab_config(ipconfig0='ip=dhcp,ip6=fd00::5/64,gw6=fd00::1'))['network-config']
    assert ("      - type: dhcp4\n      - type: static6\n        address: 'fd00::5/64'\n"
            "        gateway: 'fd00::1'\n") in static6  # static6 keeps the CIDR as its address


def test_multiple_keys() -> None:
    # uri_unescape, split(/\n/), chomp, grep { /\S/ }: blank and whitespace-only lines are dropped
    keys = urllib.parse.quote(f'{KEY}\n\n   \n{KEY2}\n', safe='')
    user = seed(lab_config(sshkeys=keys))['user-data']
    assert f'ssh_authorized_keys:\n  - {KEY}\n  - {KEY2}\nchpasswd:\n' in user


def test_sshkeys_with_only_spaces_encoded() -> None:
    user = seed(lab_config(sshkeys=KEY.replace(' ', '%20')))['user-data']
    assert f'  - {KEY}\n' in user


def test_ciupgrade_default_upgrades_packages() -> None:
    user = seed(lab_config(ciupgrade=None))['user-data']
    # "package_upgrade: true\n" if !defined($conf->{ciupgrade}) || $conf->{ciupgrade}
    assert user.endswith('users:\n  - default\npackage_upgrade: true\n')
    assert seed(lab_config(ciupgrade='1'))['user-data'] == user
    assert 'package_upgrade' not in seed(lab_config(ciupgrade='0'))['user-data']


def test_unset_nameserver_and_searchdomain_fall_back_to_host_dns() -> None:
    config = lab_config(nameserver=None, searchdomain=None)
    host = HostDns(search=['lan.example'], nameservers=['10.0.0.1', '10.0.0.2', '10.0.0.3', '10.0.0.4'])
    files = seed(config, host_dns=host)
    # get_dns_conf: searchdomain // $host_resolv_conf->{search}; grep { $_ } dns1 dns2 dns3
    assert files['network-config'].endswith(
        "    - type: nameserver\n"
        "      address:\n      - '10.0.0.1'\n      - '10.0.0.2'\n      - '10.0.0.3'\n"
        "      search:\n      - 'lan.example'\n")
    # get_hostname_fqdn only looks at the config's searchdomain, not the host's
    assert 'fqdn: ichigo\n' in files['user-data']
    # a configured nameserver wins over the host, each independently
    mixed = seed(lab_config(searchdomain=None), host_dns=host)['network-config']
    assert mixed.endswith("      address:\n      - '192.168.7.1'\n      search:\n      - 'lan.example'\n")


def test_no_dns_anywhere_still_writes_the_nameserver_entry() -> None:
    # `if ($searchdomains || $nameservers)` tests two array refs, which are always true
    net = seed(lab_config(nameserver=None, searchdomain=None))['network-config']
    assert net.endswith("gateway: '192.168.7.1'\n    - type: nameserver\n")


def test_space_separated_nameservers_and_search_domains() -> None:
    net = seed(lab_config(nameserver='1.1.1.1 9.9.9.9', searchdomain='a.example b.example'))['network-config']
    assert net.endswith("      address:\n      - '1.1.1.1'\n      - '9.9.9.9'\n"
                        "      search:\n      - 'a.example'\n      - 'b.example'\n")


def test_second_nic_with_ipconfig1() -> None:
    net = seed(lab_config(ipconfig1='ip=10.42.0.11/16'))['network-config'].splitlines()
    assert net[10:17] == [
        '    - type: physical',
        '      name: eth1',
        "      mac_address: 'bc:24:11:aa:bb:02'",
        '      subnets:',
        '      - type: static',
        "        address: '10.42.0.11'",
        "        netmask: '255.255.0.0'",
    ]
    assert net[17] == '    - type: nameserver'


def test_interfaces_in_perl_string_order() -> None:
    # foreach my $iface (sort @ifaces): a string sort, so net10 comes before net2
    config = lab_config(net2='e1000=02:00:00:00:00:02,bridge=vmbr0', ipconfig2='ip=dhcp',
                        net10='virtio=02:00:00:00:00:0A,bridge=vmbr0', ipconfig10='ip=dhcp')
    names = [line.strip() for line in seed(config)['network-config'].splitlines() if 'name: eth' in line]
    assert names == ['name: eth0', 'name: eth10', 'name: eth2']


def test_instance_id_follows_the_config() -> None:
    first = seed(lab_config())['meta-data']
    assert seed(lab_config())['meta-data'] == first
    assert seed(dict(reversed(list(lab_config().items()))))['meta-data'] == first  # key order is irrelevant
    assert seed(lab_config(memory='4096', cores=4))['meta-data'] == first  # not cloud-init keys
    changed = [lab_config(ipconfig0='ip=192.168.7.224/24,gw=192.168.7.1'), lab_config(ciupgrade=1),
               lab_config(sshkeys=KEY2.replace(' ', '%20')), lab_config(name='nashi'),
               lab_config(nameserver='1.1.1.1'), lab_config(ipconfig1='ip=dhcp')]
    ids = {seed(c)['meta-data'] for c in changed}
    assert first not in ids
    assert len(ids) == len(changed)
    files = seed(lab_config())
    assert first == f"instance-id: {instance_id(files['user-data'], files['network-config'])}\n"


# --------------------------------------------------------------------------------- hostnames, users


def test_hostname_with_dot_and_without_name() -> None:
    user = seed(lab_config(name='ichigo.lab.example'))['user-data']
    assert 'hostname: ichigo\nmanage_etc_hosts: true\nfqdn: ichigo.lab.example\n' in user
    unnamed = seed_files(VMID, '', lab_config(name=None, searchdomain=None))['user-data']
    assert 'hostname: VM201\nmanage_etc_hosts: true\nfqdn: VM201\n' in unnamed


def test_root_user_and_no_user() -> None:
    root = seed(lab_config(ciuser='root'))['user-data']
    assert 'user: root\ndisable_root: False\nssh_authorized_keys:' in root
    assert 'users:' not in root
    nouser = seed(lab_config(ciuser=None))['user-data']
    assert 'user:' not in nouser
    assert 'chpasswd:\n  expire: False\nusers:\n  - default\n' in nouser


def test_hashed_password_is_written_as_stored() -> None:
    user = seed(lab_config(cipassword=HASH))['user-data']
    assert f'user: homelab\npassword: {HASH}\nssh_authorized_keys:' in user


def test_plain_password_is_hashed_like_the_pve_api_does() -> None:
    # update_vm_api: encrypt_pw($cipassword) if $cipassword !~ /^\$(?:[156]|2[ay])(\$.+){2}/
    user = seed(lab_config(cipassword='hunter2'))['user-data']
    line = next(x for x in user.splitlines() if x.startswith('password: '))
    hashed = line.removeprefix('password: ')
    assert hashed.startswith('$5$')
    assert 'hunter2' not in user
    salt = hashed.split('$')[2]
    assert len(salt) == 8
    assert encrypt_pw('hunter2', salt) == hashed
    assert seed(lab_config(cipassword='hunter2'))['user-data'] == user  # stable: same instance-id each boot
    # yescrypt does not match PVE's regex, so PVE hashes it as if it were a password
    assert '$y$' not in seed(lab_config(cipassword='$y$j9T$abc$def'))['user-data']


def test_redacted_password_is_refused() -> None:
    with pytest.raises(ValueError, match='redacted'):
        seed(lab_config(cipassword='**********'))


def test_sha256_crypt_matches_glibc() -> None:
    # `openssl passwd -5 -salt ...` and Perl's crypt() (glibc) give these
    assert sha256_crypt(b'Hello world!', 'saltstring') == '$5$saltstring$5B8vYYiY.CVt1RlTTf8KbXBH3hsxY/GNooZaBBGWEc5'
    assert encrypt_pw('secret', 'Ab/cXd12') == '$5$Ab/cXd12$UXz3imsQolHUxDrBJzu3AF2EJGcrpYXpfV5JVovrVB4'
    assert encrypt_pw('', 'Ab/cXd12') == '$5$Ab/cXd12$UtAqBHkw5K64q5Jpdm3SWNA.D6IyOCGyrNKCoW4riF5'


# --------------------------------------------------------------------------------- errors


def test_cicustom_snippets_are_not_available() -> None:
    for value in ('user=local:snippets/user.yaml', 'network=local:snippets/n.yaml,meta=local:snippets/m.yaml',
                  'vendor=local:snippets/vendor.yaml'):
        with pytest.raises(NotImplementedError, match='snippet'):
            seed(lab_config(cicustom=value))
    assert seed(lab_config(cicustom=''))['user-data'] == seed(lab_config())['user-data']


def test_only_nocloud() -> None:
    with pytest.raises(NotImplementedError, match='configdrive2'):
        seed(lab_config(citype='configdrive2'))
    with pytest.raises(NotImplementedError, match='configdrive2'):
        seed(lab_config(ostype='win11'))  # get_cloudinit_format: Windows defaults to configdrive2
    assert seed(lab_config(citype='nocloud')) == seed(lab_config())


def test_nic_without_mac() -> None:
    with pytest.raises(ValueError, match="network interface 'net0' has no mac address"):
        seed(lab_config(net0='virtio,bridge=vmbr0'))
    with pytest.raises(ValueError, match="network interface 'net0' has no mac address"):
        seed(lab_config(net0='virtio=,bridge=vmbr0'))
    seed(lab_config(net1='virtio,bridge=k3snet'))  # no ipconfig1: net1 is never parsed


def test_broken_ipconfig_gives_an_interface_without_subnets() -> None:
    # parse_ipconfig warns and returns undef; nocloud_network then writes no subnet lines
    for bad in ('ip=dhcp,gw=192.168.7.1', 'gw=192.168.7.1', 'ip=300.1.1.1/24', 'foo=bar'):
        net = seed(lab_config(ipconfig0=bad))['network-config']
        assert "      subnets:\n    - type: nameserver\n" in net, bad


def test_manual_ipv4_dies_like_split_ip4() -> None:
    with pytest.raises(ValueError, match='not a CIDR: manual'):
        seed(lab_config(ipconfig0='ip=manual'))


# --------------------------------------------------------------------------------- parsers


def test_user_data_is_cloud_config_yaml() -> None:
    user = seed(lab_config(cipassword=HASH, ciupgrade=None))['user-data']
    assert user.startswith('#cloud-config\n')
    data = yaml.safe_load(user)
    assert data == {
        'hostname': 'ichigo', 'manage_etc_hosts': True, 'fqdn': 'ichigo.int.jigga.xyz', 'user': 'homelab',
        'password': HASH, 'ssh_authorized_keys': [KEY], 'chpasswd': {'expire': False}, 'users': ['default'],
        'package_upgrade': True,
    }


def test_network_config_is_yaml_v1() -> None:
    data = yaml.safe_load(seed(lab_config(ipconfig1='ip=dhcp'))['network-config'])
    assert data == {'version': 1, 'config': [
        {'type': 'physical', 'name': 'eth0', 'mac_address': 'bc:24:11:aa:bb:01', 'subnets': [
            {'type': 'static', 'address': '192.168.7.223', 'netmask': '255.255.255.0', 'gateway': '192.168.7.1'}]},
        {'type': 'physical', 'name': 'eth1', 'mac_address': 'bc:24:11:aa:bb:02', 'subnets': [{'type': 'dhcp4'}]},
        {'type': 'nameserver', 'address': ['192.168.7.1'], 'search': ['int.jigga.xyz']},
    ]}


@pytest.mark.parametrize('overrides', [
    {'ipconfig1': 'ip=dhcp'},
    {'ipconfig0': 'ip6=auto'},
    {'ipconfig0': 'ip=dhcp,ip6=fd00::5/64,gw6=fd00::1'},
    {'ipconfig0': ','},
    {'ipconfig0': 'ip=dhcp,gw=192.168.7.1'},  # no subnets at all
])
def test_network_config_passes_cloud_inits_parser(overrides: dict[str, Any]) -> None:
    network_state = pytest.importorskip('cloudinit.net.network_state')
    data = yaml.safe_load(seed(lab_config(**overrides))['network-config'])
    state = network_state.parse_net_config_data(data, skip_broken=False)
    interfaces = {i['name']: i for i in state.iter_interfaces()}
    assert set(interfaces) == ({'eth0', 'eth1'} if 'ipconfig1' in overrides else {'eth0'})
    assert interfaces['eth0']['mac_address'] == 'bc:24:11:aa:bb:01'
    assert state.dns_nameservers == ['192.168.7.1']
    assert state.dns_searchdomains == ['int.jigga.xyz']


def test_cloud_init_skips_pves_nameserver_entry_without_address() -> None:
    # A PVE quirk, reproduced: no nameserver anywhere gives `- type: nameserver` without `address`,
    # which cloud-init's strict parser rejects and its default (skip_broken) parse drops, search too.
    network_state = pytest.importorskip('cloudinit.net.network_state')
    data = yaml.safe_load(seed(lab_config(nameserver=None))['network-config'])
    with pytest.raises(network_state.InvalidCommand):
        network_state.parse_net_config_data(data, skip_broken=False)
    state = network_state.parse_net_config_data(data)
    assert [i['name'] for i in state.iter_interfaces()] == ['eth0']
    assert state.dns_searchdomains == []


def test_read_resolv_conf_like_pve() -> None:
    text = ('# generated\nsearch int.jigga.xyz other.example\nnameserver 192.168.7.1\nnameserver fe80::1\n'
            'nameserver not-an-ip\nnameserver 1.1.1.1\nnameserver 9.9.9.9\n')
    assert read_resolv_conf(text) == (['int.jigga.xyz'], ['192.168.7.1', 'fe80::1', '1.1.1.1'])
    assert read_resolv_conf('') == ([], [])


# --------------------------------------------------------------------------------- writing


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_seed(tmp_path: Path) -> None:
    files = seed(lab_config(cipassword=HASH))
    directory = write_seed(tmp_path, files)
    assert directory == tmp_path / 'var/lib/cloud/seed/nocloud' == tmp_path / SEED_DIR
    for name, text in files.items():
        assert (directory / name).read_text() == text
    assert mode(directory / 'user-data') == 0o600
    assert mode(directory / 'meta-data') == mode(directory / 'network-config') == 0o644
    for parent in (tmp_path / 'var', tmp_path / 'var/lib/cloud', directory):
        assert mode(parent) == 0o755
    assert sorted(p.name for p in directory.iterdir()) == sorted(files)  # no temporary files left

    # rewriting replaces, and drops seed files no longer generated
    smaller = {k: v for k, v in seed(lab_config(ciupgrade=None)).items() if k != 'vendor-data'}
    write_seed(tmp_path, smaller)
    assert sorted(p.name for p in directory.iterdir()) == sorted(smaller)
    assert (directory / 'user-data').read_text() == smaller['user-data']
    assert mode(directory / 'user-data') == 0o600


def test_write_seed_refuses_symlinks_and_strange_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='not NoCloud seed files'):
        write_seed(tmp_path, {'../../etc/passwd': 'x'})
    outside = tmp_path / 'outside'
    outside.mkdir()
    root = tmp_path / 'root'
    (root / 'var/lib/cloud').mkdir(parents=True)
    (root / 'var/lib/cloud/seed').symlink_to(outside)
    with pytest.raises(ValueError, match='symlink'):
        write_seed(root, seed(lab_config()))
    assert list(outside.iterdir()) == []


def test_secrets_are_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger='homelab')
    files = seed(lab_config(cipassword='hunter2', ipconfig1='ip=dhcp,gw=10.0.0.1'))
    write_seed(tmp_path, files)
    hashed = next(x for x in files['user-data'].splitlines() if x.startswith('password: '))[10:]
    assert caplog.records  # the broken ipconfig1 and the write were logged...
    for secret in ('hunter2', hashed, KEY.split()[1]):
        assert secret not in caplog.text  # ...without a secret

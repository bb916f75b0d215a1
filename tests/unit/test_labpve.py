"""LabPve through the real HTTP API (proxmoxer, API token, HTTPS), one behaviour per test."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from fakepve.certs import make_cert
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException

from homelab.lab.pve import LabPve, clear_agent, simulated_agent

HOST, HOST2 = '127.0.0.1', '127.0.0.2'
TOKEN, SECRET = 'root@pam!homelab', 'lab-token-secret'
NODE_IPS = {'pve-alpha': '192.168.7.233', 'pve-beta': '192.168.7.234', 'pve-gamma': '192.168.7.235'}
NODE = 'pve-alpha'
PEERS = '192.168.7.233,192.168.7.234,192.168.7.235'
IMAGE = 'debian-12-genericcloud-amd64.qcow2'
SOURCE = f'local:import/{IMAGE}'
GiB = 1024 ** 3


class Loop:
    """An event loop in a daemon thread: the lab serves there while the test talks to it over HTTPS."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def client(host: str, port: int, cafile: str) -> ProxmoxAPI:
    return ProxmoxAPI(host, port=port, user='root@pam', token_name='homelab', token_value=SECRET, verify_ssl=cafile)


@dataclass
class Lab:
    pve: LabPve
    api: ProxmoxAPI

    def status(self, upid: str) -> dict[str, Any]:
        return dict(self.api.nodes(upid.split(':')[1]).tasks(upid).status.get())

    def ok(self, upid: str) -> None:
        assert self.status(upid)['exitstatus'] == 'OK', self.status(upid)

    def failed(self, upid: str) -> str:
        status = self.status(upid)['exitstatus']
        assert status != 'OK'
        return str(status)

    @property
    def node(self) -> Any:
        return self.api.nodes(NODE)


@pytest.fixture(scope='session')
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    certfile, keyfile, _ = make_cert(str(tmp_path_factory.mktemp('labpve-pki')), hosts=(HOST, HOST2))
    return certfile, keyfile


@pytest.fixture
def make_lab(pki: tuple[str, str]) -> Iterator[Callable[..., Lab]]:
    """LabPve(**kwargs) served on its own loop at 127.0.0.1 (a free port), time_scale 0, with the token."""
    served: list[tuple[Loop, LabPve]] = []

    def make(**kwargs: Any) -> Lab:
        kwargs.setdefault('node_ips', NODE_IPS)
        pve = LabPve(host=HOST, port=0, **kwargs)
        pve.time_scale = 0
        pve.apitokens[TOKEN] = SECRET
        loop = Loop()
        loop.run(pve.start(*pki))
        served.append((loop, pve))
        return Lab(pve, client(HOST, pve.port, pki[0]))
    yield make
    for loop, pve in served:
        loop.run(pve.stop())
        loop.close()


@pytest.fixture
def lab(make_lab: Callable[..., Lab]) -> Lab:
    lab = make_lab()
    lab.pve.add_ceph_storage('kubernetes', pool='kubernetes')
    return lab


def refused(call: Callable[[], Any]) -> ResourceException:
    with pytest.raises(ResourceException) as info:
        call()
    return info.value


def with_image(lab: Lab, size: int = 3 * GiB) -> None:
    """The cloud image, downloaded as PVE 9 does it: download-url with content=import (size is fakepve's own)."""
    upid = lab.node.storage('local')('download-url').post(
        url=f'https://cloud.debian.org/images/cloud/bookworm/latest/{IMAGE}', filename=IMAGE, content='import',
        size=size)
    lab.ok(upid)


# ------------------------------------------------------------------------ SDN

def zone_k3s(lab: Lab) -> None:
    lab.api.cluster.sdn.zones.post(zone='k3s', type='vxlan', peers=PEERS, mtu=1450)


def test_sdn_zone_reads_back_as_written(lab: Lab) -> None:
    zone_k3s(lab)
    zone = lab.api.cluster.sdn.zones('k3s').get()
    assert zone == {'zone': 'k3s', 'type': 'vxlan', 'peers': PEERS, 'mtu': 1450, 'digest': zone['digest']}
    assert len(zone['digest']) == 40
    assert lab.api.cluster.sdn.zones.get() == [zone]


def test_sdn_changes_are_pending_until_applied(lab: Lab) -> None:
    sdn = lab.api.cluster.sdn
    zone_k3s(lab)
    assert sdn.zones.get(pending=1) == [{'zone': 'k3s', 'type': 'vxlan', 'state': 'new', 'digest': None,
                                         'pending': {'peers': PEERS, 'mtu': 1450}}]
    assert sdn.zones.get(running=1) == []
    upid = sdn.put()
    assert ':reloadnetworkall:' in upid
    lab.ok(upid)
    assert sdn.zones.get(pending=1) == [{'zone': 'k3s', 'type': 'vxlan', 'peers': PEERS, 'mtu': 1450,
                                         'digest': None}]
    sdn.zones('k3s').put(mtu=1400)
    assert sdn.zones('k3s').get()['mtu'] == 1400
    assert sdn.zones('k3s').get(pending=1) == {'zone': 'k3s', 'type': 'vxlan', 'peers': PEERS, 'mtu': 1450,
                                               'state': 'changed', 'pending': {'mtu': 1400}, 'digest': None}
    sdn.zones('k3s').delete()
    assert sdn.zones.get() == []
    assert sdn.zones.get(pending=1)[0]['state'] == 'deleted'
    lab.ok(sdn.put())
    assert sdn.zones.get(pending=1) == []


def test_sdn_apply_reloads_every_node(lab: Lab) -> None:
    upid = lab.api.cluster.sdn.put()
    lines = [entry['t'] for entry in lab.api.nodes(upid.split(':')[1]).tasks(upid).log.get()]
    assert lines[:3] == [f'{node}: reloading network config' for node in sorted(NODE_IPS)]


def test_sdn_vnet_and_subnet_shapes(lab: Lab) -> None:
    sdn = lab.api.cluster.sdn
    zone_k3s(lab)
    sdn.vnets.post(vnet='k3snet', zone='k3s', tag=100)
    sdn.vnets('k3snet').subnets.post(subnet='10.100.0.0/24', type='subnet', gateway='10.100.0.1', snat=1)
    vnet = sdn.vnets('k3snet').get()
    assert vnet == {'vnet': 'k3snet', 'type': 'vnet', 'zone': 'k3s', 'tag': 100, 'digest': vnet['digest']}
    [subnet] = sdn.vnets('k3snet').subnets.get()
    assert subnet == {'subnet': 'k3s-10.100.0.0-24', 'id': 'k3s-10.100.0.0-24', 'type': 'subnet', 'vnet': 'k3snet',
                      'zone': 'k3s', 'cidr': '10.100.0.0/24', 'network': '10.100.0.0', 'mask': '24',
                      'gateway': '10.100.0.1', 'snat': 1, 'dhcp-range': [], 'digest': subnet['digest']}
    assert sdn.vnets('k3snet').subnets('k3s-10.100.0.0-24').get() == subnet
    [pending] = sdn.vnets('k3snet').subnets.get(pending=1)
    assert (pending['state'], pending['vnet'], pending['pending']) == (
        'new', 'k3snet', {'gateway': '10.100.0.1', 'snat': 1})
    assert sdn.vnets.get(pending=1)[0]['pending'] == {'zone': 'k3s', 'tag': 100}


def test_sdn_refusals_use_pves_words(lab: Lab) -> None:
    sdn = lab.api.cluster.sdn
    zone_k3s(lab)
    err = refused(lambda: zone_k3s(lab))
    assert (err.status_code, err.content) == (
        500, "create sdn zone object failed: sdn zone object ID 'k3s' already defined")
    assert refused(lambda: sdn.zones('nope').get()).content == "sdn 'nope' does not exist"
    err = refused(lambda: sdn.zones.post(zone='bare', type='vxlan'))
    assert err.content == 'create sdn zone object failed: 400 Parameter verification failed.'
    assert refused(lambda: sdn.zones.post(zone='odd', type='vxlan', peers=PEERS, bridge='vmbr0')).content == \
        "unexpected property 'bridge'"
    assert refused(lambda: sdn.vnets.post(vnet='lost', zone='nozone', tag=1)).content == \
        'create sdn vnet object failed: cannot lookup undefined type!'
    assert refused(lambda: sdn.vnets.post(vnet='untag', zone='k3s')).content == \
        'create sdn vnet object failed: 400 Parameter verification failed.'
    assert refused(lambda: sdn.vnets('nope').get()).content == "sdn vnet 'nope' does not exist"


def test_sdn_subnet_and_delete_refusals(lab: Lab) -> None:
    sdn = lab.api.cluster.sdn
    zone_k3s(lab)
    sdn.vnets.post(vnet='k3snet', zone='k3s', tag=100)
    err = refused(lambda: sdn.vnets('k3snet').subnets.post(subnet='10.100.0.0/24', type='subnet', gateway='10.9.0.1'))
    assert err.content == 'create sdn subnet object failed: 400 Parameter verification failed.'
    sdn.vnets('k3snet').subnets.post(subnet='10.100.0.0/24', type='subnet', gateway='10.100.0.1')
    assert refused(lambda: sdn.vnets('k3snet').subnets('k3s-10.9.0.0-24').get()).content == \
        "sdn subnet 'k3s-10.9.0.0-24' does not exist"
    assert refused(lambda: sdn.zones('k3s').delete()).content == \
        'delete sdn zone object failed: zone k3s is used by vnet k3snet'
    assert refused(lambda: sdn.vnets('k3snet').delete()).content == \
        'delete sdn vnet object failed: 400 Parameter verification failed.'
    sdn.vnets('k3snet').subnets('k3s-10.100.0.0-24').delete()
    sdn.vnets('k3snet').delete()
    sdn.zones('k3s').delete()
    assert lab.pve.sdn == {'zones': {}, 'vnets': {}, 'subnets': {}}


def test_sdn_writes_need_quorum(lab: Lab) -> None:
    lab.pve.lose_quorum()
    assert refused(lambda: zone_k3s(lab)).content == 'cluster not ready - no quorum?'


# ----------------------------------------------------------------------- Ceph

def test_ceph_pool_create_with_storage(lab: Lab) -> None:
    pools = lab.node.ceph.pool
    assert [p['pool_name'] for p in pools.get()] == ['.mgr']
    upid = pools.post(name='k3s', add_storages=1, pg_autoscale_mode='on')
    assert ':cephcreatepool:k3s:' in upid
    lab.ok(upid)
    pool = pools.get()[1]
    assert {k: pool[k] for k in ('pool', 'pool_name', 'size', 'min_size', 'pg_num', 'pg_autoscale_mode',
                                 'crush_rule', 'crush_rule_name', 'application_metadata', 'type', 'bytes_used',
                                 'percent_used')} == {
        'pool': 2, 'pool_name': 'k3s', 'size': 3, 'min_size': 2, 'pg_num': 128, 'pg_autoscale_mode': 'on',
        'crush_rule': 0, 'crush_rule_name': 'replicated_rule', 'application_metadata': {'rbd': {}},
        'type': 'replicated', 'bytes_used': 0, 'percent_used': 0.0}
    storage = lab.api.storage('k3s').get()
    assert {k: storage[k] for k in ('type', 'pool', 'content', 'shared', 'krbd')} == {
        'type': 'rbd', 'pool': 'k3s', 'content': 'images,rootdir', 'shared': 1, 'krbd': 0}


def test_ceph_pool_status_and_index(lab: Lab) -> None:
    lab.ok(lab.node.ceph.pool.post(name='k3s'))
    assert lab.node.ceph.pool('k3s').get() == [{'name': 'status'}]
    status = lab.node.ceph.pool('k3s').status.get(verbose=1)
    assert {k: status[k] for k in ('name', 'size', 'min_size', 'pg_num', 'pgp_num', 'crush_rule', 'nodelete',
                                   'application_list')} == {
        'name': 'k3s', 'size': 3, 'min_size': 2, 'pg_num': 128, 'pgp_num': 128, 'crush_rule': 'replicated_rule',
        'nodelete': '0', 'application_list': ['rbd']}
    assert refused(lab.node.ceph.pool('nope').status.get).content == \
        "error with 'osd pool get': mon_cmd failed - unrecognized pool 'nope'"


def test_ceph_pool_set_and_recreate(lab: Lab) -> None:
    pool = lab.node.ceph.pool
    lab.ok(pool.post(name='k3s', add_storages=1))
    upid = pool('k3s').put(size=2, min_size=1)
    assert ':cephsetpool:k3s:' in upid
    lab.ok(upid)
    assert (lab.pve.ceph_pools['k3s']['size'], lab.pve.ceph_pools['k3s']['min_size']) == (2, 1)
    assert lab.failed(pool('k3s').put(min_size=3)) == 'Could not set: min_size'
    # Ceph's `osd pool create` accepts a pool that exists: PVE re-applies its settings, defaults included.
    lab.ok(pool.post(name='k3s', pg_num=64))
    assert (lab.pve.ceph_pools['k3s']['pool'], lab.pve.ceph_pools['k3s']['size']) == (2, 3)
    assert lab.failed(pool.post(name='k3s', add_storages=1)) == \
        "adding PVE storage for ceph pool 'k3s' failed: create storage failed: storage ID 'k3s' already defined"


def test_ceph_pool_destroy(lab: Lab) -> None:
    pool = lab.node.ceph.pool
    lab.ok(pool.post(name='k3s', add_storages=1))
    lab.pve.storages['k3s'].setdefault('volumes', {})['vm-100-disk-0'] = {'content': 'images', 'size': GiB,
                                                                           'vmid': 100, 'format': 'raw'}
    upid = pool('k3s').delete(remove_storages=1)
    assert ':cephdestroypool:k3s:' in upid
    assert lab.failed(upid) == "ceph pool 'k3s' still in use by storage 'k3s'"
    lab.ok(pool('k3s').delete(remove_storages=1, force=1))
    assert 'k3s' not in lab.pve.ceph_pools
    assert 'k3s' not in lab.pve.storages
    assert lab.failed(pool('k3s').delete()) == "error with 'osd pool get': mon_cmd failed - unrecognized pool 'k3s'"


def test_ceph_down(lab: Lab) -> None:
    lab.ok(lab.node.ceph.pool.post(name='k3s'))
    lab.pve.ceph_down()
    rados = 'rados_connect failed - Connection timed out'
    assert refused(lab.node.ceph.pool.get).content == rados
    assert refused(lambda: lab.node.ceph.pool.post(name='other')).content == rados
    assert refused(lab.node.ceph.pool('k3s').status.get).content == rados
    assert lab.failed(lab.node.ceph.pool('k3s').put(size=2)) == rados
    assert lab.failed(lab.node.ceph.pool('k3s').delete()) == rados
    assert lab.node.ceph.pool('k3s').get() == [{'name': 'status'}]


# ------------------------------------------------------------------ storage

def test_local_takes_import_content(lab: Lab) -> None:
    assert 'import' in lab.api.storage('local').get()['content'].split(',')
    with_image(lab)
    [volume] = lab.node.storage('local').content.get(content='import')
    assert (volume['volid'], volume['size'], volume['format']) == (SOURCE, 3 * GiB, 'qcow2')


def test_rbd_storage_added_through_the_api_is_shared(lab: Lab) -> None:
    lab.api.storage.post(storage='extra', type='rbd', pool='extra', content='images')
    assert lab.api.storage('extra').get()['shared'] == 1


# ------------------------------------------------------------------- resize

def vm_100(lab: Lab, **extra: Any) -> Any:
    lab.ok(lab.node.qemu.post(vmid=100, name='k3s-1', scsi0='kubernetes:32', **extra))
    return lab.pve.vm(100)


def test_resize_grows_relative_and_absolute(lab: Lab) -> None:
    vm = vm_100(lab)
    upid = lab.node.qemu(100).resize.put(disk='scsi0', size='+10G')
    assert ':resize:100:' in upid
    lab.ok(upid)
    assert vm.config['scsi0'] == 'kubernetes:vm-100-disk-0,size=42G'
    lab.ok(lab.node.qemu(100).resize.put(disk='scsi0', size='128G'))
    assert lab.node.qemu(100).config.get()['scsi0'] == 'kubernetes:vm-100-disk-0,size=128G'
    assert lab.pve.storages['kubernetes']['volumes']['vm-100-disk-0']['size'] == 128 * GiB


def test_resize_refuses_to_shrink(lab: Lab) -> None:
    vm = vm_100(lab)
    assert lab.failed(lab.node.qemu(100).resize.put(disk='scsi0', size='16G')) == 'shrinking disks is not supported'
    assert lab.failed(lab.node.qemu(100).resize.put(disk='scsi5', size='+1G')) == "disk 'scsi5' does not exist"
    assert vm.config['scsi0'] == 'kubernetes:vm-100-disk-0,size=32G'


def test_resize_of_a_running_vm_is_not_pending(lab: Lab) -> None:
    vm = vm_100(lab, start=1)
    assert vm.status == 'running'
    lab.ok(lab.node.qemu(100).resize.put(disk='scsi0', size='+8G'))
    assert vm.config['scsi0'] == 'kubernetes:vm-100-disk-0,size=40G'
    assert vm.pending == {}


# -------------------------------------------------------------- import-from

def test_create_imports_from_an_import_volume(lab: Lab) -> None:
    with_image(lab)
    lab.ok(lab.node.qemu.post(vmid=9000, name='debian-12', scsi0=f'kubernetes:0,import-from={SOURCE}',
                              ide2='kubernetes:cloudinit'))
    config = lab.node.qemu(9000).config.get()
    assert config['scsi0'] == 'kubernetes:vm-9000-disk-0,size=3G'
    assert config['ide2'] == 'kubernetes:vm-9000-cloudinit,media=cdrom'
    assert lab.pve.storages['kubernetes']['volumes']['vm-9000-disk-0']['size'] == 3 * GiB
    assert lab.pve.storages['local']['volumes'][f'import/{IMAGE}']['size'] == 3 * GiB  # the source stays


def test_create_refuses_a_missing_or_wrong_source(lab: Lab) -> None:
    upid = lab.node.qemu.post(vmid=9001, scsi0='kubernetes:0,import-from=local:import/missing.qcow2')
    assert lab.failed(upid) == "unable to create VM 9001 - failed to stat '/var/lib/vz/import/missing.qcow2'"
    assert lab.pve.vm(9001) is None
    assert lab.pve.storages['kubernetes'].get('volumes', {}) == {}
    lab.pve.store_file('local', 'debian.iso', GiB)
    err = refused(lambda: lab.node.qemu.post(vmid=9002, scsi0='kubernetes:0,import-from=local:iso/debian.iso'))
    assert err.status_code == 400
    assert err.errors == {'scsi0': "local:iso/debian.iso has wrong type 'iso' - needs to be 'images' or 'import'"}
    err = refused(lambda: lab.node.qemu.post(vmid=9003, scsi0=f'kubernetes:8,import-from={SOURCE}'))
    assert err.errors == {'scsi0': "'import-from' requires special syntax - use <storage ID>:0,import-from=<source>"}


def test_config_update_imports_too(lab: Lab) -> None:
    with_image(lab, 2 * GiB)
    vm_100(lab)
    lab.node.qemu(100).config.put(scsi1=f'kubernetes:0,import-from={SOURCE}')
    config = lab.node.qemu(100).config.get()
    assert config['scsi1'] == 'kubernetes:vm-100-disk-1,size=2G'
    assert 'import-from' not in str(config)
    lab.node.qemu(100).config.put(scsi2='kubernetes:4')  # the same create_disks: a new disk is allocated
    assert lab.node.qemu(100).config.get()['scsi2'] == 'kubernetes:vm-100-disk-2,size=4G'


# -------------------------------------------------------------------- clone

def template(lab: Lab, storage: str, vmid: int = 9000) -> None:
    with_image(lab)
    lab.ok(lab.node.qemu.post(vmid=vmid, name='debian-12', scsi0=f'{storage}:0,import-from={SOURCE}',
                              ide2=f'{storage}:cloudinit'))
    lab.ok(lab.node.qemu(vmid).template.post())


def test_clone_to_another_node_needs_shared_storage(lab: Lab) -> None:
    template(lab, 'local-lvm')
    err = refused(lambda: lab.node.qemu(9000).clone.post(newid=101, target='pve-beta', full=1, storage='kubernetes'))
    assert (err.status_code, err.content) == (500, "can't clone VM to node 'pve-beta' (VM uses local storage)")
    assert lab.pve.vm(101) is None


def test_clone_of_a_shared_template_lands_on_the_target(lab: Lab) -> None:
    template(lab, 'kubernetes')
    lab.ok(lab.node.qemu(9000).clone.post(newid=102, name='k3s-2', target='pve-beta'))
    clone = lab.pve.vm(102)
    assert clone.node == 'pve-beta'
    assert clone.config['ide2'] == 'kubernetes:vm-102-cloudinit,media=cdrom,size=4M'


def test_clone_gets_its_own_cloudinit_volume(lab: Lab) -> None:
    template(lab, 'local-lvm')
    lab.ok(lab.node.qemu(9000).clone.post(newid=101, name='k3s-1', full=1, storage='kubernetes'))
    assert lab.pve.vm(101).config['ide2'] == 'kubernetes:vm-101-cloudinit,media=cdrom,size=4M'
    assert 'vm-101-cloudinit' in lab.pve.storages['kubernetes']['volumes']
    lab.ok(lab.node.qemu(101).delete())
    assert 'vm-9000-cloudinit' in lab.pve.storages['local-lvm']['volumes']  # the template keeps its own
    assert 'vm-101-cloudinit' not in lab.pve.storages['kubernetes']['volumes']


# -------------------------------------------------------------------- hooks

def test_hooks_follow_the_guest(make_lab: Callable[..., Lab]) -> None:
    events: list[tuple[str, int]] = []
    lab = make_lab(on_start=lambda vm: events.append(('start', vm.vmid)),
                   on_stop=lambda vm: events.append(('stop', vm.vmid)))
    qemu = lab.node.qemu(100)
    lab.ok(lab.node.qemu.post(vmid=100, start=1))
    lab.ok(qemu.status.stop.post())
    lab.ok(qemu.status.start.post())
    lab.ok(qemu.status.reboot.post())
    lab.ok(qemu.status.shutdown.post())
    lab.ok(qemu.delete())
    assert events == [('start', 100), ('stop', 100), ('start', 100), ('start', 100), ('stop', 100), ('stop', 100)]


def test_hooks_skip_failed_starts_and_follow_ha(make_lab: Callable[..., Lab]) -> None:
    events: list[str] = []
    lab = make_lab(on_start=lambda vm: events.append('start'), on_stop=lambda vm: events.append('stop'))
    vm = lab.pve.add_vm(100, 'k3s-1', node=NODE)
    vm.start_error = 'start failed: QEMU exited with code 1'
    lab.failed(lab.node.qemu(100).status.start.post())
    assert events == []
    vm.start_error, vm.ha_state = None, 'stopped'
    lab.ok(lab.node.qemu(100).status.start.post())
    assert (vm.status, events) == ('running', ['start'])


def test_hooks_wait_for_the_ha_manager(make_lab: Callable[..., Lab]) -> None:
    events: list[str] = []
    lab = make_lab(on_start=lambda vm: events.append('start'))
    lab.pve.time_scale = 0.001  # the HA manager acts ha_delay (10 PVE seconds) after the request
    vm = lab.pve.add_vm(100, 'k3s-1', node=NODE)
    vm.ha_state = 'stopped'
    upid = lab.node.qemu(100).status.start.post()
    assert ':hastart:' in upid
    deadline = time.monotonic() + 5
    while not events and time.monotonic() < deadline:
        time.sleep(0.005)
    assert (events, vm.status, vm.ha_state) == (['start'], 'running', 'started')


def guest(**config: str) -> dict[str, str]:
    return {'net0': 'virtio=BC:24:11:0A:0B:0C,bridge=vmbr0', 'ipconfig0': 'ip=192.168.7.221/24,gw=192.168.7.1',
            **config}


def test_simulated_guest_agent_answers_with_the_cloud_init_address(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(simulate_guests=True)
    lab.pve.add_vm(100, 'k3s-1', node=NODE, config=guest(agent='enabled=1'))
    agent = lab.node.qemu(100).agent
    assert refused(lambda: agent.get('network-get-interfaces')).content == 'QEMU guest agent is not running'
    lab.ok(lab.node.qemu(100).status.start.post())
    lo, eth0 = agent.get('network-get-interfaces')['result']
    assert lo['name'] == 'lo'
    assert eth0 == {'name': 'eth0', 'hardware-address': 'bc:24:11:0a:0b:0c',
                    'ip-addresses': [{'ip-address': '192.168.7.221', 'ip-address-type': 'ipv4', 'prefix': 24}]}
    lab.ok(lab.node.qemu(100).status.stop.post())
    assert refused(lambda: agent.get('network-get-interfaces')).content == 'QEMU guest agent is not running'


def test_simulated_agent_needs_the_agent_enabled() -> None:
    class Vm:
        config = guest(agent='0')
        agent: Any = 'stale'
    vm = Vm()
    simulated_agent(vm)
    assert vm.agent is None
    vm.config = guest(agent='1,fstrim_cloned_disks=1')
    simulated_agent(vm)
    assert vm.agent['interfaces'][1]['ip-addresses'][0]['ip-address'] == '192.168.7.221'
    clear_agent(vm)
    assert vm.agent is None


# ------------------------------------------------------ cluster and serving

def test_cluster_status_shows_the_node_addresses(lab: Lab) -> None:
    nodes = {n['name']: n['ip'] for n in lab.api.cluster.status.get() if n['type'] == 'node'}
    assert nodes == NODE_IPS
    assert sorted(n['node'] for n in lab.api.nodes.get()) == sorted(NODE_IPS)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def test_start_many_serves_one_state_on_each_address(pki: tuple[str, str]) -> None:
    pve = LabPve(node_ips={'pve-alpha': HOST, 'pve-beta': HOST2})
    pve.time_scale = 0
    pve.apitokens[TOKEN] = SECRET
    port, loop = free_port(), Loop()
    try:
        loop.run(pve.start_many([HOST, HOST2], port, *pki))
        alpha, beta = client(HOST, port, pki[0]), client(HOST2, port, pki[0])
        alpha.cluster.sdn.zones.post(zone='k3s', type='vxlan', peers=f'{HOST},{HOST2}')
        assert [z['zone'] for z in beta.cluster.sdn.zones.get()] == ['k3s']
        local = {host: next(n['name'] for n in api.cluster.status.get() if n.get('local'))
                 for host, api in ((HOST, alpha), (HOST2, beta))}
        assert local == {HOST: 'pve-alpha', HOST2: 'pve-beta'}
        loop.run(pve.stop())
        for host in (HOST, HOST2):
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.get(f'https://{host}:{port}/api2/json/version', verify=pki[0], timeout=5)
    finally:
        loop.run(pve.stop())
        loop.close()

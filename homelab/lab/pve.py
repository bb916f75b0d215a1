"""LabPve: fakepve with the parts of real Proxmox VE 9 that the homelab's Proxmox layers rely on.

fakepve validates every request against PVE's schema, but several endpoints we use are answered with
synthesised, stateless data, and a few stateful ones differ from PVE. The lab must behave like the real
cluster, or `invoke up` would pass in the lab and fail live. LabPve closes those gaps:

- SDN zones, vnets and subnets with PVE's pending/running split (pve-network PVE/API2/Network/SDN/*.pm);
- Ceph pools (pve-manager PVE/API2/Ceph/Pool.pm), including `add_storages`;
- disk resize and `import-from` (qemu-server PVE/API2/Qemu.pm);
- clone fidelity: the local-storage check for another node, a fresh cloud-init volume per clone;
- guest hooks, so the lab can start and stop a real guest (and a simulated guest agent) with the VM;
- /cluster/status with the nodes' real addresses, and one state served on several addresses.

Error texts are PVE's, found in the sources named above; where PVE appends a Perl location
(`... at /usr/share/perl5/... line N.`) it is left out.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import ipaddress
import itertools
import json
import logging
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import fakepve
from aiohttp import web
from fakepve import PveError, TaskError
from fakepve.lxc import SIZE_UNITS, format_size, split_props
from fakepve.qemu import DRIVE_KEY, NET_MODELS, NEW_DISK, drives_of, is_cdrom, join_drive, split_drive, volume_ref
from fakepve.routing import check_digest, die, param_error, split_list
from fakepve.storage import _exists_message, _is_file

__all__ = ['LabPve', 'clear_agent', 'simulated_agent']

logger = logging.getLogger(__name__)

Json = dict[str, Any]
Hook = Callable[[Any], None]

# --------------------------------------------------------------------------- SDN

SDN_KINDS = ('zones', 'vnets', 'subnets')
# Options of the zone plugins we model strictly (PVE::Network::SDN::Zones::*Plugin::options);
# other zone types accept whatever the schema allows.
ZONE_OPTIONS = {
    'simple': ('nodes', 'mtu', 'dns', 'reversedns', 'dnszone', 'ipam', 'dhcp'),
    'vxlan': ('nodes', 'peers', 'vxlan-port', 'mtu', 'dns', 'reversedns', 'dnszone', 'ipam', 'fabric'),
}
VNET_OPTIONS = ('zone', 'tag', 'alias', 'vlanaware', 'isolate-ports')
SUBNET_OPTIONS = ('vnet', 'gateway', 'snat', 'dnszoneprefix', 'dhcp-range', 'dhcp-dns-server')
REQUIRED = {'vnet': ('zone',), 'subnet': ('vnet',)}
VXLAN_TAG_MAX = 16777216
PEERS_OR_FABRIC = 'must have exactly one of peers / fabric defined'

# -------------------------------------------------------------------------- Ceph

RADOS_DOWN = 'rados_connect failed - Connection timed out'
CRUSH_RULE = 'replicated_rule'
POOL_DEFAULTS = {'pg_num': 128, 'size': 3, 'min_size': 2, 'application': 'rbd', 'pg_autoscale_mode': 'warn'}
STORAGE_ID = re.compile(r'^[a-z][a-z0-9\-_.]*[a-z0-9]$', re.IGNORECASE)

# --------------------------------------------------------------------------- VMs

# PVE::Storage's @SHARED_STORAGE: types that are shared whatever storage.cfg says.
SHARED_TYPES = ('iscsi', 'nfs', 'cifs', 'rbd', 'cephfs', 'iscsidirect', 'glusterfs', 'zfs', 'drbd', 'pbs')
CLOUDINIT_SIZE = 4 * 1024 ** 2  # PVE::QemuServer::Cloudinit::CLOUDINIT_DISK_SIZE
CLOUDINIT_VOLUME = re.compile(r'(?:^|/)(?:vm|base)-\d+-cloudinit(?:\.\w+)?$')
RESIZE = re.compile(r'^(\+)?(\d+(?:\.\d+)?)([KMGT])?$')
# Tasks after which a guest may have started or stopped; the hooks run when one ends well.
GUEST_TASKS = ('qmstart', 'qmstop', 'qmshutdown', 'qmreboot', 'qmreset', 'qmsuspend', 'qmcreate', 'qmdestroy',
               'qmrollback')
# Tasks that restart a running guest without it ever showing as stopped.
RESTARTS = ('qmreboot', 'qmreset', 'qmrollback')
LOOPBACK = {'name': 'lo', 'hardware-address': '00:00:00:00:00:00',
            'ip-addresses': [{'ip-address': '127.0.0.1', 'ip-address-type': 'ipv4', 'prefix': 8},
                             {'ip-address': '::1', 'ip-address-type': 'ipv6', 'prefix': 128}]}


def param_exc_text(errors: Mapping[str, str]) -> str:
    """A raise_param_exc as it reads once a `die "$errmsg: $err"` stringified it (PVE::Exception::stringify)."""
    return '400 Parameter verification failed.\n' + ''.join(f'{k}: {v}\n' for k, v in errors.items())


def locked(errmsg: str, error: PveError) -> PveError:
    """PVE::Network::SDN::lock_sdn_config: an error inside the lock, prefixed with what failed."""
    text = param_exc_text(error.errors) if error.status == 400 and error.errors else str(error.message)
    return PveError(500, f'{errmsg}: {text}'.rstrip('\n'))


def size_bytes(text: str | None) -> int:
    """A size as PVE writes it ('32G', '4M', bytes) in bytes; 0 when there is none."""
    found = re.fullmatch(r'(\d+(?:\.\d+)?)([KMGT])?', str(text or ''))
    if not found:
        return 0
    return int(float(found.group(1)) * SIZE_UNITS.get(found.group(2) or '', 1))


def _truthy(value: Any) -> bool:
    return str(value).lower() in ('1', 'yes', 'on', 'true')


# ------------------------------------------------------------------ guest agent

def agent_enabled(value: Any) -> bool:
    """The VM's `agent` option says the QEMU guest agent is enabled ('1', 'enabled=1,...')."""
    if value is None:
        return False
    first, props = split_props(str(value))
    return _truthy(props.get('enabled', first))


def _mac(net: str) -> str:
    for part in net.split(','):
        key, _, value = part.partition('=')
        if key in NET_MODELS or key == 'macaddr':
            return value.lower()
    return '00:00:00:00:00:00'


def _addresses(ipconfig: str) -> list[Json]:
    """The static addresses of a cloud-init ipconfigN ('ip=A.B.C.D/NN,gw=...,ip6=...')."""
    out = []
    _, props = split_props(ipconfig)
    for key, kind in (('ip', 'ipv4'), ('ip6', 'ipv6')):
        value = props.get(key, '')
        if '/' in value:
            iface = ipaddress.ip_interface(value)
            out.append({'ip-address': str(iface.ip), 'ip-address-type': kind, 'prefix': iface.network.prefixlen})
    return out


def simulated_agent(vm: Any) -> None:
    """Let the VM's guest agent answer as a cloud-init guest would: lo, then ethN per netN with ipconfigN.

    The agent only runs when the VM's config enables it, as in a real guest with qemu-guest-agent.
    """
    if not agent_enabled(vm.config.get('agent')):
        vm.agent = None
        return
    nics = sorted((k for k in vm.config if re.fullmatch(r'net\d+', k)), key=lambda k: int(k[3:]))
    interfaces = [copy.deepcopy(LOOPBACK)]
    for key in nics:
        index = key[3:]
        interfaces.append({'name': f'eth{index}', 'hardware-address': _mac(str(vm.config[key])),
                           'ip-addresses': _addresses(str(vm.config.get(f'ipconfig{index}', '')))})
    vm.agent = {'interfaces': interfaces}


def clear_agent(vm: Any) -> None:
    """The guest is off: its agent does not answer."""
    vm.agent = None


class LabPve(fakepve.FakePve):  # type: ignore[misc]
    """A fake PVE 9 cluster for the lab; see the module docstring for what it adds to fakepve.

    node_ips: node name -> address; the cluster then has exactly these nodes, and /cluster/status shows
    the addresses. on_start/on_stop: called with the FakeVm after a guest started (start, reboot, reset,
    create with start=1, HA start, rollback with start) or stopped (stop, shutdown, suspend to disk,
    destroy). simulate_guests: the guest agent answers with the cloud-init addresses while the VM runs.
    password: for ticket logins; random unless given (use API tokens).
    """

    def __init__(self, user: str = 'root@pam', password: str | None = None, host: str | None = None,
                 port: int = fakepve.PORT, *, node_ips: Mapping[str, str] | None = None,
                 on_start: Hook | None = None, on_stop: Hook | None = None, simulate_guests: bool = False) -> None:
        super().__init__(user, password or secrets.token_urlsafe(16), host, port)
        # PVE 9 allows `import` content (disk images for import-from) on directory storages.
        self.storages['local']['content'] = 'iso,vztmpl,backup,import'
        self.node_ips = dict(node_ips or {})
        if self.node_ips:
            self.nodes: dict[str, Json] = {}
            for name in self.node_ips:
                self.add_node(name)
        self.start_hooks: list[Hook] = ([simulated_agent] if simulate_guests else []) + ([on_start] if on_start else [])
        self.stop_hooks: list[Hook] = ([clear_agent] if simulate_guests else []) + ([on_stop] if on_stop else [])
        # SDN: the configuration as written (sdn/*.cfg) and as last applied (sdn/.running-config).
        self.sdn: dict[str, dict[str, Json]] = {kind: {} for kind in SDN_KINDS}
        self.sdn_running: dict[str, dict[str, Json]] = {kind: {} for kind in SDN_KINDS}
        self.sdn_version = 0
        # Ceph pools by name; every cluster with a manager has the .mgr pool.
        self.ceph_pools: dict[str, Json] = {}
        self._pool_ids = itertools.count(1)
        self.ceph_raw_bytes = 3 * 1024 ** 4
        self._ceph_add_pool('.mgr', {'pg_num': 1, 'size': 3, 'min_size': 2, 'pg_autoscale_mode': 'on',
                                     'application': 'mgr'})
        # newid -> `storage` of a clone in progress: where its cloud-init volume goes.
        self._clone_storage: dict[int, str | None] = {}
        self._background: set[asyncio.Future[Any]] = set()

    # ------------------------------------------------------------ serving

    async def start_many(self, hosts: Sequence[str], port: int, certfile: str, keyfile: str) -> None:
        """Serve one state on each host:port (the lab answers at every PVE host's address); stop() ends all.

        One AppRunner with a TCPSite per host, so every address shares the cluster state, as a real cluster's
        nodes share /etc/pve. port 0 (any free port) is only allowed with a single host.
        """
        if not hosts or (not port and len(hosts) > 1):
            raise ValueError('start_many needs at least one host, and a fixed port for several')
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(certfile, keyfile)
        if self.network.get('seed') is not None:
            self._random.seed(self.network['seed'])
        self.host, self.port = hosts[0], port
        self.runner = runner = web.AppRunner(self._build_app())
        await runner.setup()
        try:
            for host in hosts:
                await web.TCPSite(runner, host, port, ssl_context=ctx).start()
        except BaseException:
            await self.stop()
            raise
        if not port:
            self.port = runner.addresses[0][1]

    async def _cluster_status(self, request: web.Request) -> web.Response:
        """fakepve's /cluster/status with the nodes' addresses; `local` is the node whose address was asked."""
        response = await super()._cluster_status(request)
        if not self.node_ips:
            return response  # type: ignore[no-any-return]
        data = json.loads(response.text)['data']
        sockname = request.transport.get_extra_info('sockname') if request.transport else None
        here = next((n for n, ip in self.node_ips.items() if sockname and ip == sockname[0]), None)
        for item in data:
            if item.get('type') == 'node':
                item['ip'] = self.node_ips.get(item['name'], item['ip'])
                if here:
                    item['local'] = 1 if item['name'] == here else 0
        return web.json_response({'data': data})

    # -------------------------------------------------------------- hooks

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _run_hooks(self, hooks: list[Hook], vm: Any) -> None:
        for hook in hooks:
            try:
                hook(vm)
            except Exception:  # a broken hook must not leave the task running for ever
                logger.exception('guest hook %r failed for VM %s', hook, vm.vmid)

    def _guest_changed(self, ttype: str, vm: Any, was: str | None) -> None:
        """Run the hooks for what a finished task did to the guest."""
        now = vm.status
        if ttype == 'qmdestroy':
            self._run_hooks(self.stop_hooks, vm)
        elif now == 'running' and (was != 'running' or ttype in RESTARTS):
            self._run_hooks(self.start_hooks, vm)
        elif was == 'running' and now != 'running':
            self._run_hooks(self.stop_hooks, vm)

    async def task(self, node: str, ttype: str, tid: Any, user: str, body: Callable[[], Awaitable[Any]],
                   vm: Any = None, lock: bool = True, log: Sequence[str] = ()) -> str:
        """Model.task, plus the guest hooks after guest tasks and the cloud-init volume of a clone."""
        if vm is None or ttype not in (*GUEST_TASKS, 'qmclone'):
            return str(await super().task(node, ttype, tid, user, body, vm=vm, lock=lock, log=log))

        async def watched() -> Any:
            was = vm.status
            try:
                note = await body()
            finally:
                storage = self._clone_storage.pop(vm.vmid, None) if ttype == 'qmclone' else None
            if ttype == 'qmclone':
                self._clone_cloudinit(vm, storage)
            else:
                self._guest_changed(ttype, vm, was)
            return note
        return str(await super().task(node, ttype, tid, user, watched, vm=vm, lock=lock, log=log))

    async def _ha_request(self, vm: Any, user: str, state: str) -> str:
        """fakepve's HA request, with the guest hooks once the HA manager acted."""
        async def body() -> None:
            async def later() -> None:
                await self.pause(self.ha_delay)
                was = vm.status
                if state == 'started':
                    vm.apply_pending()
                    vm.status = vm.qmpstatus = 'running'
                    vm.started_at = time.time()
                else:
                    vm.status = vm.qmpstatus = 'stopped'
                vm.ha_state = state
                self._guest_changed('ha' + state, vm, was)
            if self.time_scale:
                self._spawn(later())
            else:
                await later()
        verb = 'start' if state == 'started' else 'stop'
        return str(await self.task(vm.node, 'ha' + verb, vm.vmid, user, body, lock=False,
                                   log=[f'Requesting HA {verb} for VM {vm.vmid}']))

    # =============================================================== SDN

    def _routes_lab_sdn(self) -> list[tuple[str, str, Callable[..., Awaitable[Any]]]]:
        zone, vnet = '/cluster/sdn/zones/{zone}', '/cluster/sdn/vnets/{vnet}'
        subnets = vnet + '/subnets'
        return [('PUT', '/cluster/sdn', self._sdn_apply),
                ('GET', '/cluster/sdn/zones', self._zone_list), ('POST', '/cluster/sdn/zones', self._zone_create),
                ('GET', zone, self._zone_read), ('PUT', zone, self._zone_update), ('DELETE', zone, self._zone_delete),
                ('GET', '/cluster/sdn/vnets', self._vnet_list), ('POST', '/cluster/sdn/vnets', self._vnet_create),
                ('GET', vnet, self._vnet_read), ('PUT', vnet, self._vnet_update), ('DELETE', vnet, self._vnet_delete),
                ('GET', subnets, self._subnet_list), ('POST', subnets, self._subnet_create),
                ('GET', subnets + '/{subnet}', self._subnet_read), ('PUT', subnets + '/{subnet}', self._subnet_update),
                ('DELETE', subnets + '/{subnet}', self._subnet_delete)]

    def sdn_digest(self, kind: str) -> str:
        """The digest of sdn/<kind>.cfg as written."""
        return hashlib.sha1(json.dumps(self.sdn[kind], sort_keys=True).encode(), usedforsecurity=False).hexdigest()

    def sdn_pending(self, kind: str) -> dict[str, Json]:
        """PVE::Network::SDN::pending_config: running values, and what changes with `state` and `pending`."""
        running, config = self.sdn_running[kind], self.sdn[kind]
        out: dict[str, Json] = {}
        for oid in sorted(running):
            self._pending_running(out.setdefault(oid, {}), running[oid], config.get(oid) or {})
        for oid in sorted(config):
            self._pending_written(out.setdefault(oid, {}), running.get(oid) or {}, config[oid])
        return out

    @staticmethod
    def _pending_running(entry: Json, robj: Json, cobj: Json) -> None:
        """pending_config's first pass: the running values; what is gone or differs marks a state."""
        for key in sorted(robj):
            entry[key] = robj[key]
            if not cobj:
                entry['state'] = 'deleted'
            elif key not in cobj:
                entry.setdefault('pending', {})[key] = 'deleted'
                entry['state'] = 'changed'
            elif str(robj[key]) != str(cobj[key]):
                entry['state'] = 'changed'
        if entry.get('state'):
            entry.setdefault('pending', {})

    @staticmethod
    def _pending_written(entry: Json, robj: Json, cobj: Json) -> None:
        """pending_config's second pass: new and changed values go under `pending` (type and vnet stay on top)."""
        for key in sorted(cobj):
            value, before = cobj[key], robj.get(key)
            if key in ('type', 'vnet'):
                entry[key] = value
            elif before is None or str(value) != str(before):
                entry.setdefault('pending', {})[key] = value
            if not robj:
                entry['state'] = 'new'
            elif before is None:
                entry['state'] = 'changed'
        if entry.get('state'):
            entry.setdefault('pending', {})

    def _sdn_view(self, kind: str, v: Json) -> tuple[dict[str, Json], str | None]:
        """The objects a GET reads (pending=1, running=1 or as written) and the digest it shows."""
        if v.get('pending'):
            return self.sdn_pending(kind), None
        if v.get('running'):
            return self.sdn_running[kind], None
        return self.sdn[kind], self.sdn_digest(kind)

    def _sdn_object(self, kind: str, objects: Mapping[str, Json], oid: str) -> Json:
        if oid not in objects:
            label = {'zones': 'sdn', 'vnets': 'sdn vnet', 'subnets': 'sdn subnet'}[kind]
            raise die(f"{label} '{oid}' does not exist")
        return objects[oid]

    def _sdn_check_options(self, allowed: Sequence[str] | None, opts: Json, create: bool, kind: str) -> None:
        """SectionConfig::check_config: known options only; on create, the required ones present."""
        for key in sorted(opts):
            if allowed is not None and key not in allowed:
                raise die(f"unexpected property '{key}'")
        for key in REQUIRED.get(kind, ()) if create else ():
            if opts.get(key) is None:
                raise die(f"missing value for required option '{key}'")

    def _sdn_delete_options(self, data: Json, allowed: Sequence[str] | None, opts: Json, delete: str | None,
                        kind: str) -> None:
        """SectionConfig::delete_from_config."""
        for key in split_list(delete):
            if allowed is not None and key not in allowed:
                raise die(f"no such option '{key}'")
            if key in REQUIRED.get(kind, ()):
                raise die(f"unable to delete required option '{key}'")
            if opts.get(key) is not None:
                raise die(f"cannot set and delete property '{key}' at the same time!")
            data.pop(key, None)

    @staticmethod
    def _sdn_options(v: Json, *drop: str) -> Json:
        return {k: x for k, x in v.items() if k not in ('lock-token', 'digest', 'delete', *drop)}

    def _api_object(self, kind: str, oid: str, obj: Json, digest: str | None) -> Json:
        """An object as the API shows it: its id under the kind's name, and the file's digest."""
        data = copy.deepcopy(obj)
        data[kind[:-1]] = oid
        data['digest'] = digest
        if kind == 'subnets':
            zone, network, mask = [*oid.split('-'), '', ''][:3]
            data.update(id=oid, cidr=f'{network}/{mask}', zone=zone, network=network, mask=mask)
            data['dhcp-range'] = [dict(p.split('=', 1) for p in split_list(r) if '=' in p)
                                  for r in (obj.get('dhcp-range') or [])]
        return data

    async def _sdn_apply(self, v: Json, user: str) -> str:
        """PUT /cluster/sdn: commit the written config as the running one, then reload every node."""
        self.need_quorum()
        self.sdn_running = copy.deepcopy(self.sdn)
        self.sdn_version += 1

        async def body() -> None:
            return None
        lines = [f'{node}: reloading network config' for node in sorted(self.nodes)]
        return str(await self.task(sorted(self.nodes)[0], 'reloadnetworkall', '', user, body, log=lines))

    # ---------------------------------------------------------------- zones

    async def _zone_list(self, v: Json, user: str) -> list[Json]:
        objects, digest = self._sdn_view('zones', v)
        out = []
        for oid in sorted(objects):
            if not (self.allowed(user, f'/sdn/zones/{oid}', 'SDN.Audit')
                    or self.allowed(user, f'/sdn/zones/{oid}', 'SDN.Allocate')):
                continue
            if v.get('type') and objects[oid].get('type') != v['type']:
                continue
            out.append(self._api_object('zones', oid, objects[oid], digest))
        return out

    async def _zone_read(self, v: Json, user: str) -> Json:
        objects, digest = self._sdn_view('zones', v)
        return self._api_object('zones', v['zone'], self._sdn_object('zones', objects, v['zone']), digest)

    def _zone_checks(self, zone: Json) -> None:
        """The references a zone makes (dns, ipam) and the plugin's on_update_hook."""
        if zone.get('dns'):
            raise PveError(400, 'Parameter verification failed.', {'dns': f"{zone['dns']} don't exist"})
        if zone.get('reversedns'):
            raise PveError(400, 'Parameter verification failed.',
                           {'reversedns': f"{zone['reversedns']} don't exist"})
        if zone.get('dnszone'):
            raise PveError(400, 'Parameter verification failed.', {'dnszone': 'missing dns server'})
        if zone.get('ipam') and zone['ipam'] != 'pve':
            raise PveError(400, 'Parameter verification failed.', {'ipam': f"{zone['ipam']} not existing"})
        if zone.get('type') == 'vxlan' and bool(zone.get('peers')) == bool(zone.get('fabric')):
            raise PveError(400, 'Parameter verification failed.', {'peers': PEERS_OR_FABRIC,
                                                                    'fabric': PEERS_OR_FABRIC})

    async def _zone_create(self, v: Json, user: str) -> None:
        oid, kind = v['zone'], v['type']
        opts = self._sdn_options(v, 'zone')
        allowed = ZONE_OPTIONS.get(kind)
        self._sdn_check_options(('type', *allowed) if allowed else None, opts, True, 'zone')
        self.need_quorum()
        try:
            if oid in self.sdn['zones']:
                raise die(f"sdn zone object ID '{oid}' already defined")
            self._zone_checks(opts)
        except PveError as e:
            raise locked('create sdn zone object failed', e) from e
        self.sdn['zones'][oid] = opts

    async def _zone_update(self, v: Json, user: str) -> None:
        oid = v['zone']
        self.need_quorum()
        try:
            check_digest(self.sdn_digest('zones'), v.get('digest'))
            zone = copy.deepcopy(self._sdn_object('zones', self.sdn['zones'], oid))
            allowed = ZONE_OPTIONS.get(zone['type'])
            opts = self._sdn_options(v, 'zone')
            self._sdn_check_options(allowed, opts, False, 'zone')
            self._sdn_delete_options(zone, allowed, opts, v.get('delete'), 'zone')
            zone.update(opts)
            self._zone_checks(zone)
        except PveError as e:
            raise locked('update sdn zone object failed', e) from e
        self.sdn['zones'][oid] = zone

    async def _zone_delete(self, v: Json, user: str) -> None:
        oid = v['zone']
        self.need_quorum()
        try:
            self._sdn_object('zones', self.sdn['zones'], oid)
            for vnet, obj in sorted(self.sdn['vnets'].items()):
                if obj.get('zone') == oid:
                    raise die(f'zone {oid} is used by vnet {vnet}')
        except PveError as e:
            raise locked('delete sdn zone object failed', e) from e
        del self.sdn['zones'][oid]

    # ---------------------------------------------------------------- vnets

    async def _vnet_list(self, v: Json, user: str) -> list[Json]:
        objects, digest = self._sdn_view('vnets', v)
        out = []
        for oid in sorted(objects):
            zone = objects[oid].get('zone') or (objects[oid].get('pending') or {}).get('zone')
            path = f'/sdn/zones/{zone}/{oid}'
            if self.allowed(user, path, 'SDN.Audit') or self.allowed(user, path, 'SDN.Allocate'):
                out.append(self._api_object('vnets', oid, objects[oid], digest))
        return out

    async def _vnet_read(self, v: Json, user: str) -> Json:
        self._sdn_object('vnets', self.sdn['vnets'], v['vnet'])  # check_vnet_access reads the written config
        objects, digest = self._sdn_view('vnets', v)
        return self._api_object('vnets', v['vnet'], self._sdn_object('vnets', objects, v['vnet']), digest)

    def _vnet_checks(self, oid: str, vnets: Mapping[str, Json]) -> None:
        """The zone plugin's vnet_update_hook (VXLAN tags) and VnetPlugin::on_update_hook."""
        vnet = vnets[oid]
        zone = self.sdn['zones'].get(str(vnet.get('zone')))
        if zone is None:
            raise die('cannot lookup undefined type!')
        tag = vnet.get('tag')
        if zone.get('type') in ('vxlan', 'evpn'):
            if tag is None:
                raise PveError(400, 'Parameter verification failed.', {'tag': 'missing vxlan tag'})
            if int(tag) > VXLAN_TAG_MAX:
                raise PveError(400, 'Parameter verification failed.', {'tag': 'vxlan tag max value is 16777216'})
            for other, obj in sorted(vnets.items()):
                other_zone = self.sdn['zones'].get(str(obj.get('zone'))) or {}
                if other != oid and other_zone.get('type') in ('vxlan', 'evpn') and str(obj.get('tag')) == str(tag):
                    raise PveError(400, 'Parameter verification failed.', {
                        'tag': f"vxlan tag {tag} already exist in vnet {other} in zone {obj.get('zone')} "})
        if vnet.get('vlanaware') and self._subnets_of(oid):
            raise PveError(400, 'Parameter verification failed.',
                           {'vlanaware': 'vlanaware vnet is not compatible with subnets'})

    def _subnets_of(self, vnet: str) -> list[str]:
        return [sid for sid, obj in sorted(self.sdn['subnets'].items()) if obj.get('vnet') == vnet]

    async def _vnet_create(self, v: Json, user: str) -> None:
        oid = v['vnet']
        self.need_quorum()
        try:
            opts = self._sdn_options(v, 'vnet')
            opts['type'] = 'vnet'
            self._sdn_check_options(('type', *VNET_OPTIONS), opts, True, 'vnet')
            if oid in self.sdn['vnets']:
                raise die(f"sdn vnet object ID '{oid}' already defined")
            vnets = dict(self.sdn['vnets'], **{oid: opts})
            self._vnet_checks(oid, vnets)
        except PveError as e:
            raise locked('create sdn vnet object failed', e) from e
        self.sdn['vnets'][oid] = opts

    async def _vnet_update(self, v: Json, user: str) -> None:
        oid = v['vnet']
        old = self._sdn_object('vnets', self.sdn['vnets'], oid)
        self.need_quorum()
        try:
            check_digest(self.sdn_digest('vnets'), v.get('digest'))
            opts = self._sdn_options(v, 'vnet')
            self._sdn_check_options(VNET_OPTIONS, opts, False, 'vnet')
            vnet = copy.deepcopy(old)
            self._sdn_delete_options(vnet, VNET_OPTIONS, opts, v.get('delete'), 'vnet')
            vnet.update(opts)
            if not vnet.get('zone'):
                raise PveError(400, 'Parameter verification failed.', {'zone': 'cannot delete zone'})
            if self._subnets_of(oid) and old.get('zone') != vnet['zone']:
                raise PveError(400, 'Parameter verification failed.', {'zone': "can't change zone if subnets exist"})
            self._vnet_checks(oid, dict(self.sdn['vnets'], **{oid: vnet}))
        except PveError as e:
            raise locked('update sdn vnet object failed', e) from e
        self.sdn['vnets'][oid] = vnet

    async def _vnet_delete(self, v: Json, user: str) -> None:
        oid = v['vnet']
        self._sdn_object('vnets', self.sdn['vnets'], oid)
        self.need_quorum()
        if self._subnets_of(oid):
            raise locked('delete sdn vnet object failed', PveError(
                400, 'Parameter verification failed.', {'vnet': "Can't delete vnet if subnets exists"}))
        del self.sdn['vnets'][oid]

    # -------------------------------------------------------------- subnets

    async def _subnet_list(self, v: Json, user: str) -> list[Json]:
        self._sdn_object('vnets', self.sdn['vnets'], v['vnet'])
        objects, digest = self._sdn_view('subnets', v)
        return [self._api_object('subnets', oid, objects[oid], digest) for oid in sorted(objects)
                if objects[oid].get('vnet') == v['vnet']]

    async def _subnet_read(self, v: Json, user: str) -> Json:
        self._sdn_object('vnets', self.sdn['vnets'], v['vnet'])
        objects, digest = self._sdn_view('subnets', v)
        data = self._api_object('subnets', v['subnet'], self._sdn_object('subnets', objects, v['subnet']), digest)
        if data.get('vnet') != v['vnet']:
            raise param_error(vnet='wrong vnet')
        return data

    def _subnet_checks(self, oid: str, subnet: Json) -> None:
        """SubnetPlugin::on_update_hook: the vnet exists and is not VLAN-aware, the gateway is inside."""
        vnet = self.sdn['vnets'].get(str(subnet.get('vnet')))
        if vnet is None:
            raise PveError(400, 'Parameter verification failed.', {'vnet': f"{subnet.get('vnet')} don't exist"})
        if vnet.get('vlanaware'):
            raise PveError(400, 'Parameter verification failed.',
                           {'vnet': "you can't add a subnet on a vlanaware vnet"})
        _, network, mask = oid.split('-', 2)
        cidr = ipaddress.ip_network(f'{network}/{mask}', strict=False)
        gateway = subnet.get('gateway')
        if gateway and ipaddress.ip_address(gateway) not in cidr and not (cidr.version == 4 and mask == '32'):
            raise PveError(400, 'Parameter verification failed.',
                           {'gateway': f'{gateway} is not in subnet {network}/{mask}'})

    async def _subnet_create(self, v: Json, user: str) -> None:
        vnet = self._sdn_object('vnets', self.sdn['vnets'], v['vnet'])
        self.need_quorum()
        oid = f"{vnet.get('zone')}-{v['subnet'].replace('/', '-', 1)}"
        try:
            opts = self._sdn_options(v, 'subnet')
            self._sdn_check_options(('type', *SUBNET_OPTIONS), opts, True, 'subnet')
            if oid in self.sdn['subnets']:
                raise die(f"sdn subnet object ID '{oid}' already defined")
            self._subnet_checks(oid, opts)
        except PveError as e:
            raise locked('create sdn subnet object failed', e) from e
        self.sdn['subnets'][oid] = opts

    async def _subnet_update(self, v: Json, user: str) -> None:
        oid = v['subnet']
        self._sdn_object('vnets', self.sdn['vnets'], v['vnet'])
        self.need_quorum()
        try:
            subnet = copy.deepcopy(self._sdn_object('subnets', self.sdn['subnets'], oid))
            check_digest(self.sdn_digest('subnets'), v.get('digest'))
            opts = self._sdn_options(v, 'subnet')
            self._sdn_check_options(SUBNET_OPTIONS, opts, False, 'subnet')
            self._sdn_delete_options(subnet, SUBNET_OPTIONS, opts, v.get('delete'), 'subnet')
            subnet.update(opts)
            self._subnet_checks(oid, subnet)
        except PveError as e:
            raise locked('update sdn subnet object failed', e) from e
        self.sdn['subnets'][oid] = subnet

    async def _subnet_delete(self, v: Json, user: str) -> None:
        # PVE looks the subnet up with noerr: deleting one that is not there succeeds.
        self._sdn_object('vnets', self.sdn['vnets'], v['vnet'])
        self.need_quorum()
        self.sdn['subnets'].pop(v['subnet'], None)

    # ============================================================== Ceph

    def _routes_lab_ceph(self) -> list[tuple[str, str, Callable[..., Awaitable[Any]]]]:
        pools, pool = '/nodes/{node}/ceph/pool', '/nodes/{node}/ceph/pool/{name}'
        return [('GET', pools, self._ceph_pool_list), ('POST', pools, self._ceph_pool_create),
                ('GET', pool, self._ceph_pool_index), ('GET', pool + '/status', self._ceph_pool_status),
                ('PUT', pool, self._ceph_pool_set), ('DELETE', pool, self._ceph_pool_destroy)]

    def _rados(self) -> None:
        """PVE::RADOS->new(): fails when the monitors cannot be reached."""
        if self.ceph['down']:
            raise die(RADOS_DOWN)

    def _rados_in_task(self) -> None:
        if self.ceph['down']:
            raise TaskError(RADOS_DOWN)

    def _ceph_add_pool(self, name: str, settings: Json) -> None:
        """`osd pool create`, then PVE's set_pool; raises TaskError naming the settings Ceph refused."""
        self.ceph_pools[name] = {
            'pool': next(self._pool_ids), 'pool_name': name, 'size': 3, 'min_size': 2, 'pg_num': 32,
            'pg_num_min': None, 'crush_rule': 0, 'pg_autoscale_mode': 'on', 'application_metadata': {},
            'target_size_bytes': None, 'target_size_ratio': None}
        self._ceph_set_pool(name, settings)

    def _ceph_set_pool(self, name: str, settings: Json) -> None:
        """PVE::Ceph::Tools::set_pool: one monitor command per setting; those that fail are named at the end."""
        pool, failed = self.ceph_pools.get(name), []
        for key in sorted(settings, key=lambda k: (k != 'size', k)):  # size first: min_size is checked against it
            value = settings[key]
            if pool is None:
                failed.append(key)
            elif key == 'application':
                apps = pool['application_metadata']
                if apps and value not in apps:  # Ceph wants --yes-i-really-mean-it for a second application
                    failed.append(key)
                else:
                    apps.setdefault(value, {})
            elif (key == 'crush_rule' and value != CRUSH_RULE) or \
                    (key == 'min_size' and not 1 <= int(value) <= int(pool['size'])):
                failed.append(key)
            elif key != 'crush_rule':
                pool[key] = value
        if failed:
            raise TaskError('Could not set: ' + ', '.join(failed))

    def _ceph_pool_storages(self, name: str) -> list[str]:
        return [sid for sid, store in sorted(self.storages.items()) if store.get('type') == 'rbd'
                and name in (store.get('pool', 'rbd'), store.get('data-pool'))]

    def _ceph_pool_usage(self, name: str) -> tuple[int, int]:
        """(stored, used) bytes: the images on the pool's RBD storages, and that times the replicas."""
        stored = sum(int(vol.get('size') or 0) for sid in self._ceph_pool_storages(name)
                     for vol in self._volumes(sid).values())
        return stored, stored * int(self.ceph_pools[name]['size'])

    @staticmethod
    def _ceph_autoscale(pool: Json) -> Json:
        return {'pool_name': pool['pool_name'], 'pool_id': pool['pool'], 'pg_autoscale_mode': pool['pg_autoscale_mode'],
                'pg_num_target': pool['pg_num'], 'pg_num_final': pool['pg_num'], 'pg_num_ideal': pool['pg_num'],
                'raw_used_rate': float(pool['size']), 'target_bytes': pool['target_size_bytes'] or 0,
                'target_ratio': pool['target_size_ratio'] or 0.0, 'bias': 1.0, 'crush_root_id': -1,
                'would_adjust': False, 'bulk': False}

    async def _ceph_pool_list(self, v: Json, user: str) -> list[Json]:
        self._rados()
        out = []
        for name, pool in sorted(self.ceph_pools.items(), key=lambda item: int(item[1]['pool'])):
            _, used = self._ceph_pool_usage(name)
            item = {k: pool[k] for k in ('pool', 'pool_name', 'size', 'min_size', 'pg_num', 'crush_rule',
                                         'pg_autoscale_mode', 'application_metadata', 'pg_num_min')}
            item.update(autoscale_status=self._ceph_autoscale(pool), pg_num_final=pool['pg_num'],
                        target_size=pool['target_size_bytes'], target_size_ratio=pool['target_size_ratio'],
                        crush_rule_name=CRUSH_RULE, bytes_used=used, percent_used=used / self.ceph_raw_bytes,
                        type='replicated')
            out.append(item)
        return out

    async def _ceph_pool_index(self, v: Json, user: str) -> list[Json]:
        # PVE answers the index without asking Ceph, whether the pool exists or not.
        return [{'name': 'status'}]

    async def _ceph_pool_status(self, v: Json, user: str) -> Json:
        self._rados()
        name = v['name']
        pool = self.ceph_pools.get(name)
        if pool is None:
            raise die(f"error with 'osd pool get': mon_cmd failed - unrecognized pool '{name}'")
        # PVE stringifies Ceph's JSON booleans: "0" and "1".
        flags = dict.fromkeys(('noscrub', 'nodeep-scrub', 'nodelete', 'nopgchange', 'nosizechange',
                               'write_fadvise_dontneed', 'fast_read'), '0')
        data = {'id': pool['pool'], 'name': name, 'size': pool['size'], 'min_size': pool['min_size'],
                'pg_num': pool['pg_num'], 'pg_num_min': pool['pg_num_min'], 'pgp_num': pool['pg_num'],
                'crush_rule': CRUSH_RULE, 'pg_autoscale_mode': pool['pg_autoscale_mode'], **flags,
                'hashpspool': '1', 'use_gmt_hitset': '1', 'target_size': pool['target_size_bytes'],
                'target_size_ratio': pool['target_size_ratio']}
        if v.get('verbose'):
            stored, used = self._ceph_pool_usage(name)
            data.update(autoscale_status=self._ceph_autoscale(pool),
                        application_list=sorted(pool['application_metadata']),
                        statistics={'stored': stored, 'bytes_used': used, 'kb_used': used // 1024, 'objects': 0,
                                    'percent_used': used / self.ceph_raw_bytes,
                                    'max_avail': (self.ceph_raw_bytes - used) // int(pool['size'])})
        return data

    @staticmethod
    def _ceph_pool_settings(v: Json) -> Json:
        settings = {k: x for k, x in v.items() if k not in ('node', 'name', 'add_storages', 'erasure-coding')}
        if settings.get('target_size') is not None:  # Ceph takes target_size_bytes
            settings['target_size_bytes'] = size_bytes(settings.pop('target_size'))
        return settings

    async def _ceph_pool_create(self, v: Json, user: str) -> str:
        """POST .../ceph/pool (task cephcreatepool). Ceph's `osd pool create` succeeds for a pool that
        exists, so PVE then only applies the settings (defaults included) to it."""
        self.need_quorum()
        name, add_storages = v['name'], v.get('add_storages')
        self._rados()
        if v.get('erasure-coding'):
            raise PveError(501, 'LabPve: erasure-coded pools are not modelled')
        if add_storages:
            self.require(user, '/storage', 'Datastore.Allocate')
            if not STORAGE_ID.match(name):
                raise die('pool name contains characters which are illegal for storage naming')
        settings = dict(POOL_DEFAULTS, **self._ceph_pool_settings(v))

        async def body() -> None:
            self._rados_in_task()
            if name in self.ceph_pools:
                self._ceph_set_pool(name, settings)
            else:
                self._ceph_add_pool(name, settings)
            if add_storages:
                try:
                    await self._sc_create({'type': 'rbd', 'storage': name, 'pool': name, 'krbd': 0,
                                           'content': 'images,rootdir'}, user)
                except PveError as e:
                    raise TaskError(f"adding PVE storage for ceph pool '{name}' failed: {e.message}") from e
        return str(await self.task(v['node'], 'cephcreatepool', name, user, body))

    async def _ceph_pool_set(self, v: Json, user: str) -> str:
        """PUT .../ceph/pool/{name} (task cephsetpool)."""
        name, settings = v['name'], self._ceph_pool_settings(v)

        async def body() -> None:
            self._rados_in_task()
            self._ceph_set_pool(name, settings)
        return str(await self.task(v['node'], 'cephsetpool', name, user, body))

    async def _ceph_pool_destroy(self, v: Json, user: str) -> str:
        """DELETE .../ceph/pool/{name} (task cephdestroypool): refused while the pool's storages hold images."""
        name = v['name']
        if v.get('remove_storages'):
            self.require(user, '/storage', 'Datastore.Allocate')
        storages = self._ceph_pool_storages(name)

        async def body() -> None:
            if not v.get('force'):
                for sid in storages:
                    if self.ceph['down']:
                        raise TaskError('rbd error: rbd: listing images failed: (110) Connection timed out')
                    if self._volumes(sid):
                        raise TaskError(f"ceph pool '{name}' still in use by storage '{sid}'")
            self._rados_in_task()
            if name not in self.ceph_pools:
                raise TaskError(f"error with 'osd pool get': mon_cmd failed - unrecognized pool '{name}'")
            del self.ceph_pools[name]
            if v.get('remove_storages'):
                for sid in storages:
                    if sid in self.storages and not self.storages[sid].get('monhost'):  # external: not pveceph's
                        await self._sc_delete({'storage': sid}, user)
        checks = [] if v.get('force') else [f"checking storage '{sid}' for RBD images.." for sid in storages]
        return str(await self.task(v['node'], 'cephdestroypool', name, user, body, log=checks))

    # ============================================================ storage

    async def _sc_create(self, v: Json, user: str) -> Json:
        """POST /storage: storages of the shared types are shared, as storage.cfg's parser makes them."""
        result = await super()._sc_create(v, user)
        if v['type'] in SHARED_TYPES:
            self.storages[v['storage']]['shared'] = 1
        return result  # type: ignore[no-any-return]

    def _shared(self, sid: str) -> bool:
        store = self.storages.get(sid) or {}
        return bool(store.get('shared')) or store.get('type') in SHARED_TYPES

    # ============================================================= resize

    def _routes_lab_resize(self) -> list[tuple[str, str, Callable[..., Awaitable[Any]]]]:
        return [('PUT', '/nodes/{node}/qemu/{vmid}/resize', self._qm_resize)]

    async def _qm_resize(self, v: Json, user: str) -> str:
        """PUT .../resize: grow a disk at once (never a pending change), as qemu-server's resize_vm worker does."""
        vm = self.find(v['node'], v['vmid'])
        if v.get('skiplock') and user != 'root@pam':
            raise param_error(skiplock='Only root may use this option.')
        self.need_quorum()

        async def body() -> None:
            if v.get('digest') and v['digest'] != vm.digest():
                raise TaskError('checksum missmatch (file change by other user?)')
            if vm.lock and not v.get('skiplock'):
                raise TaskError(f'VM is locked ({vm.lock})')
            await self._resize_disk(vm, v['disk'], v['size'], user)
        return str(await self.task(vm.node, 'resize', vm.vmid, user, body, vm=vm))

    async def _resize_disk(self, vm: Any, disk: str, wanted: str, user: str) -> None:
        if not vm.config.get(disk):
            raise TaskError(f"disk '{disk}' does not exist")
        volume, props = split_drive(vm.config[disk])
        if not volume or volume == 'none':
            raise TaskError(f"disk '{disk}' has no associated volume")
        if is_cdrom(volume, props):
            raise TaskError("you can't resize a cdrom")
        sid = volume_ref(volume)[0]
        if sid is not None and not self.allowed(user, f'/storage/{sid}', 'Datastore.AllocateSpace'):
            raise TaskError(f'Permission check failed (/storage/{sid}, Datastore.AllocateSpace)')
        await self.ceph_io(vm, [disk])
        vol = self._qm_volume(volume)
        size = int(vol.get('size') or 0) if vol else size_bytes(props.get('size'))
        if not size:
            raise TaskError(f"Could not determine current size of volume '{volume}'")
        found = RESIZE.match(wanted)
        if not found:
            raise TaskError('internal error')
        new = float(found.group(2)) * SIZE_UNITS.get(found.group(3) or '', 1)
        new = int(new + size if found.group(1) else new)
        if new < size:
            raise TaskError('shrinking disks is not supported')
        if new == size:
            return
        if vol is not None:
            store = self.storages[sid]
            if 'avail' in store:
                store['avail'] -= new - size
            vol['size'] = new
        props['size'] = format_size(new)
        vm.config[disk] = join_drive(volume, props)

    # ======================================================== import-from

    def _qm_check_drive(self, user: str, vmid: int, pool: str | None, key: str, value: str,
                        default: str | None) -> None:
        """check_drive_param and check_storage_access for `import-from`, then fakepve's own checks."""
        volume, props = split_drive(value)
        source = props.get('import-from')
        if source is not None:
            found = NEW_DISK.match(volume)
            if not found or float(found.group(2)) != 0:
                raise param_error(**{key: "'import-from' requires special syntax - use <storage ID>:0,"
                                          'import-from=<source>'})
            sid, name = volume_ref(source)
            if sid is not None:
                vtype, owner, _fmt = self._parse_volname(self._store(sid), name)
                if vtype not in ('images', 'import'):
                    raise param_error(**{key: f"{source} has wrong type '{vtype}' - needs to be 'images' or 'import'"})
                self._check_access(user, sid, vtype, owner, source)
        super()._qm_check_drive(user, vmid, pool, key, value, default)

    def _import_size(self, source: str) -> int:
        """The size of an import-from source, or the error create_disks dies with."""
        sid, name = volume_ref(source)
        if sid is None:
            raise die(f'could not get file size of {source}')
        vtype = self._parse_volname(self._store(sid), name)[0]
        vol = self._volumes(sid).get(name)
        if vtype == 'import' and vol is None:
            # An `import` volume is untrusted: PVE stats the file before anything else.
            raise die(f"failed to stat '{self._volume_path(sid, name, 'import')}'")
        if vol is None or not vol.get('size'):
            raise die(f"cannot import from '{source}' - could not get size of {source}")
        if CLOUDINIT_VOLUME.search(name):
            raise die(f"cannot import from '{source}' - cannot import from cloudinit disk")
        return int(vol['size'])

    def _qm_new_drive(self, vmid: int, key: str, value: str, default: str | None) -> tuple[str, list[str]]:
        """create_disks for one drive: import-from copies the source, a cloud-init drive is vm-<id>-cloudinit."""
        volume, props = split_drive(value)
        props = dict(props)
        source = props.pop('import-from', None)
        if source is not None:
            found = NEW_DISK.match(volume)
            sid = found.group(1) or default
            if not sid:
                raise die('no storage ID specified (and no default storage)')
            size = self._import_size(source)
            volid, _fmt = self._qm_alloc(sid, vmid, props.pop('format', None), size)
            props['size'] = format_size(size)
            return join_drive(volid, props), [volid]
        if volume == 'cloudinit' or volume.endswith(':cloudinit'):
            sid = volume_ref(volume)[0] or default
            if not sid:
                raise die('no storage ID specified (and no default storage)')
            volid = self._alloc_cloudinit(sid, vmid, props.pop('format', None))
            props['media'] = 'cdrom'
            props.pop('size', None)
            return join_drive(volid, props), [volid]
        drive, made = super()._qm_new_drive(vmid, key, value, default)
        return str(drive), list(made)

    def _alloc_cloudinit(self, sid: str, vmid: int, fmt: str | None) -> str:
        """vdisk_alloc of vm-<vmid>-cloudinit (.qcow2 on file storages), 4 MiB."""
        store = self._store(sid)
        if not store.get('active', 1):
            raise die(f"storage '{sid}' is not online")
        name = f'vm-{vmid}-cloudinit'
        if _is_file(store):
            fmt = fmt or 'qcow2'
            volname = f'{vmid}/{name}.{fmt}'
        else:
            fmt, volname = fmt or 'raw', name
        volumes = store.setdefault('volumes', {})
        if volname in volumes:
            raise die(str(_exists_message(store, volname)) if not _is_file(store) else
                      f"disk image '{self._volume_path(sid, volname, 'images')}' already exists")
        if 'avail' in store:
            if store['avail'] < CLOUDINIT_SIZE:
                raise die(f"unable to write to storage '{sid}': No space left on device")
            store['avail'] -= CLOUDINIT_SIZE
        volumes[volname] = {'content': 'images', 'format': fmt, 'size': CLOUDINIT_SIZE, 'vmid': vmid,
                            'ctime': int(time.time())}
        return f'{sid}:{volname}'

    @staticmethod
    def _allocates(value: str) -> bool:
        """The drive value asks create_disks for a new volume (a size, import-from, or a cloud-init drive)."""
        volume, props = split_drive(value)
        if volume == 'cloudinit' or volume.endswith(':cloudinit'):
            return True
        return bool(NEW_DISK.match(volume)) and not is_cdrom(volume, props)

    async def _apply_config(self, vm: Any, user: str, p: Json) -> None:
        """A config update: new drives are allocated (or imported) first, as update_vm_api's create_disks does."""
        fresh = {k: str(x) for k, x in p.items() if DRIVE_KEY.match(k) and self._allocates(str(x))}
        if not fresh:
            await super()._apply_config(vm, user, p)
            return
        self.need_quorum()
        for key, value in sorted(fresh.items()):
            self._qm_check_drive(user, vm.vmid, None, key, value, None)
        updates, made = dict(p), []
        try:
            for key, value in sorted(fresh.items()):
                updates[key], volids = self._qm_new_drive(vm.vmid, key, value, None)
                made.extend(volids)
            await super()._apply_config(vm, user, updates)
        except BaseException:
            for volid in made:
                self._qm_free(volid)
            raise

    # ============================================================== clone

    def _all_shared(self, config: Mapping[str, Any]) -> bool:
        """check_storage_access_clone's $sharedvm: every volume (CD-ROMs too) is on shared storage."""
        for _key, volume, _props in drives_of(config):
            sid = volume_ref(volume)[0]
            if volume in ('none', 'cdrom') or sid is None:
                continue
            if not self._shared(sid):
                return False
        return True

    async def _qm_clone(self, v: Json, user: str) -> str:
        """POST .../clone, refusing another node when the VM uses local storage (whatever `storage` says)."""
        node, vmid, target, storage = v['node'], int(v['vmid']), v.get('target'), v.get('storage')
        src = self.vm(vmid)
        cross = target and target not in (node, 'localhost') and target in self.nodes
        storage_ok = not storage or (storage in self.storages and self._shared(storage))
        if cross and storage_ok and self.quorate and src is not None and src.node == node and not src.lock:
            snapname = v.get('snapname')
            old = src.snapshots.get(snapname) if snapname else src.config
            if old is not None and not self._all_shared(old):
                raise die(f"can't clone VM to node '{target}' (VM uses local storage)")
        self._clone_storage[int(v['newid'])] = storage
        try:
            return str(await super()._qm_clone(v, user))
        except BaseException:  # refused before its task ran
            self._clone_storage.pop(int(v['newid']), None)
            raise

    def _clone_cloudinit(self, new: Any, storage: str | None) -> None:
        """clone_disk for a cloud-init drive: the clone gets its own vm-<newid>-cloudinit, never the source's."""
        try:
            for key, volume, props in drives_of(new.config):
                sid, name = volume_ref(volume)
                if sid is not None and CLOUDINIT_VOLUME.search(name):
                    volid = self._alloc_cloudinit(storage or sid, new.vmid, None)
                    new.config[key] = join_drive(volid, dict(props, size=format_size(CLOUDINIT_SIZE)))
        except PveError as e:
            # As a failed clone does: free what was made for the new VM and forget it.
            for _key, volume, _props in drives_of(new.config):
                if (self._qm_volume(volume) or {}).get('vmid') == new.vmid:
                    self._qm_free(volume)
            if new in self.vms:
                self.vms.remove(new)
            raise TaskError(f'clone failed: {e.message}') from e

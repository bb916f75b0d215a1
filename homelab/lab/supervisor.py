"""The lab's long-running process, started by `invoke lab.up` inside the lab's network namespace.

It serves the PVE API (LabPve) at every PVE host's address on :8006 with a certificate from
the lab CA, the lab's DNS at the nameserver address, and boots or stops a VM container
whenever fakepve starts or stops that VM. SIGTERM stops every container and exits.

    python -m homelab.lab.supervisor STATE_DIR
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from homelab.lab import layout
from homelab.lab.guests import Guests
from homelab.lab.pve import LabPve, agent_enabled
from homelab.target import read_env_file
from homelab.wait import Silent, poll

log = logging.getLogger("homelab.lab.supervisor")


class LabGuestPve(LabPve):
    """LabPve whose guest agent reports the real interfaces of the VM's container."""

    guests: Guests

    async def _agent_call(self, match: Any, values: dict[str, Any]) -> Any:
        from fakepve import PveError

        vm = self.find(values["node"], values["vmid"])
        if vm.status != "running" or not agent_enabled(vm.config.get("agent")):
            raise PveError(500, "QEMU guest agent is not running")
        interfaces = await asyncio.get_running_loop().run_in_executor(None, self.guests.interfaces, vm.vmid)
        if interfaces is None:
            raise PveError(500, "QEMU guest agent is not running")
        vm.agent = {"interfaces": interfaces}
        return await super()._agent_call(match, values)


class Supervisor:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.config = json.loads((state / layout.LAB_JSON).read_text(encoding="utf-8"))
        secrets = read_env_file(state / layout.TARGET_ENV)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="guest")
        self.guests = Guests(lab_netns=self.config["netns"], bridge=self.config["bridge"],
                             rootfs=Path(self.config["rootfs"]), var_dir=Path(self.config["var_dir"]),
                             host_dns=([self.config["search_domain"]], self.config["nameservers"]))
        self.pve = LabGuestPve(node_ips=self.config["pve_nodes"], on_start=self._on_start, on_stop=self._on_stop)
        self.pve.guests = self.guests
        self.pve.time_scale = 0
        self.pve.apitokens[secrets["PROXMOX_TOKEN_ID"]] = secrets["PROXMOX_TOKEN_SECRET"]
        self.pve.cluster_name = self.config["cluster"]
        self.dns: Any = None
        self.mirror: Any = None
        self.pve_ssh: Any = None
        self.control: Any = None  # the fault switches' control socket (homelab/lab/faultctl.py)
        self.outside: list[Any] = []
        self.secrets = secrets
        self._known_hosts_lock = threading.Lock()
        self._status_lock = threading.Lock()

    # -------------------------------------------------------------- guests

    def _on_start(self, vm: Any) -> None:
        config = dict(vm.config)
        self.pool.submit(self._guarded, "start", vm.vmid, self._boot, vm.vmid, vm.name, config)

    def _boot(self, vmid: int, name: str, config: dict[str, Any]) -> None:
        started = time.monotonic()
        self.guests.start(vmid, name, config)
        self._write_status()
        address = ipconfig_address(str(config.get("ipconfig0", "")))
        if address is None:
            return

        def probe() -> tuple[list[str] | None, str]:
            if not self.guests.guests.get(vmid) or not self.guests.guests[vmid].running:
                raise RuntimeError(f"VM {vmid} stopped while booting")
            keys = self.guests.host_keys(vmid)
            return (keys or None), "waiting for cloud-init to make the SSH host keys"

        keys = poll(f"VM {vmid}'s SSH host keys", probe, timeout=300, progress=Silent(), first=0.2, maximum=1.0)
        self._record_known_hosts(address, keys)
        log.info("VM %s (%s): host keys recorded %.1fs after start", vmid, name, time.monotonic() - started)

    def _record_known_hosts(self, address: str, keys: list[str]) -> None:
        """The lab records each VM's host keys, so SSH clients can check them strictly."""
        with self._known_hosts_lock:
            path = self.state / layout.KNOWN_HOSTS
            lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
            lines = [line for line in lines if line.split(" ", 1)[0] != address]
            lines += [f"{address} {key}" for key in keys]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
            tmp.replace(path)

    async def _start_outside(self) -> None:
        """The outside world: Cloudflare's API and edge (with the public DNS view), Tailscale's API and a
        tailnet client's resolver. Each accepts exactly the credentials lab.up wrote to target.env."""
        import ssl

        from homelab.lab.cloudflare import LabCloudflare, dns_sync
        from homelab.lab.cloudflare_edge import LabCloudflareEdge
        from homelab.lab.dns import View
        from homelab.lab.tailscale import LabTailscale, TailnetResolver

        world, pki, secrets = self.config["outside"], self.state / "pki", self.secrets
        self.dns.views["public"] = View(zones=[world["public_zone"]])
        await self.dns.start([(world["public_resolver"], 53, "public")])
        cf = LabCloudflare([world["edge"]], on_dns=dns_sync(self.dns, "public"))
        account = cf.add_account("homelab", account_id=secrets["CLOUDFLARE_ACCOUNT_ID"])
        cf.add_zone(world["public_zone"], account)
        cf.add_token(secrets["CLOUDFLARE_API_TOKEN"], {"Zone Read", "DNS Write", "Cloudflare Tunnel Write"},
                     zones=[world["public_zone"]])
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(pki / "cloudflare-api.pem"), str(pki / "cloudflare-api.key"))
        await cf.start(world["cloudflare_api"], 443, context)
        self.outside.append(cf)
        self.cloudflare = cf
        (pki / "edge").mkdir(mode=0o700, exist_ok=True)
        edge = LabCloudflareEdge(cf, pki / "ca.pem", pki / "ca.key", pki / "edge")
        await edge.start(world["edge"])
        self.outside.append(edge)
        ts = LabTailscale()
        ts.add_oauth_client(secrets["TS_OAUTH_CLIENT_ID"], secrets["TS_OAUTH_CLIENT_SECRET"],
                            ["dns", "devices:core", "devices:routes", "auth_keys"])
        await ts.start(world["tailscale_api"], 443, str(pki / "tailscale-api.pem"), str(pki / "tailscale-api.key"))
        self.outside.append(ts)
        self.tailscale = ts
        resolver = TailnetResolver(ts)
        await resolver.start(world["tailnet_resolver"], 53)
        self.outside.append(resolver)
        log.info("outside world: Cloudflare API %s, edge %s, public DNS %s, Tailscale API %s, tailnet DNS %s",
                 world["cloudflare_api"], world["edge"], world["public_resolver"], world["tailscale_api"],
                 world["tailnet_resolver"])

    def _start_pve_ssh(self) -> Any:
        """SSH on every PVE host (root, the lab's key) for `ceph auth`, its host key recorded as known."""
        from homelab.lab.pvessh import LabPveSsh

        ssh = LabPveSsh.for_state(self.pve, self.state)
        addresses = list(self.config["pve_nodes"].values())
        ssh.start(addresses, 22)
        for address in addresses:
            self._record_known_hosts(address, [ssh.host_key_line()])
        return ssh

    def _on_stop(self, vm: Any) -> None:
        destroyed = vm not in self.pve.vms
        action = self.guests.destroy if destroyed else self.guests.stop
        self.pool.submit(self._guarded, "destroy" if destroyed else "stop", vm.vmid, action, vm.vmid)

    def _guarded(self, what: str, vmid: int, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
            log.info("VM %s: %s done", vmid, what)
        except Exception:
            log.exception("VM %s: %s failed", vmid, what)
        self._write_status()

    def _write_status(self) -> None:
        with self._status_lock:
            self._write_status_locked()

    def _write_status_locked(self) -> None:
        vms = [{"vmid": g.vmid, "name": g.name, "running": g.running, "pid": g.proc.pid if g.proc else None,
                "netns": g.netns, "dir": str(g.dir)} for g in list(self.guests.guests.values())]
        tmp = self.state / (layout.STATUS_JSON + ".tmp")
        tmp.write_text(json.dumps({"updated": time.time(), "vms": vms}, indent=2), encoding="utf-8")
        tmp.replace(self.state / layout.STATUS_JSON)

    # ------------------------------------------------------------- serving

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        pki = self.state / "pki"
        try:
            await self.pve.start_many(list(self.config["pve_nodes"].values()), self.config["api_port"],
                                      str(pki / "pve.pem"), str(pki / "pve.key"))
            log.info("PVE API at %s, port %s", ", ".join(self.config["pve_nodes"].values()),
                     self.config["api_port"])
            self.control = await _start_control(self.pve, self.state)
            self.pve_ssh = await loop.run_in_executor(None, self._start_pve_ssh)
            self.dns = await _start_dns(self.config)
            if self.config.get("outside"):
                await self._start_outside()
            if self.config.get("mirror"):
                self.mirror = await _start_mirror(self.config["mirror"])
        except OSError as exc:
            # One clear line for lab.up to show: which address and port, and why.
            log.error("cannot listen: %s", exc)
            if self.pve_ssh is not None:
                self.pve_ssh.stop()
            await self.pve.stop()
            raise SystemExit(1) from None
        self._write_status()
        (self.state / layout.READY).write_text(str(time.time()), encoding="utf-8")
        log.info("lab ready")
        await stop.wait()
        log.info("stopping: %d VM container(s)", sum(1 for g in self.guests.guests.values() if g.running))
        (self.state / layout.READY).unlink(missing_ok=True)
        await loop.run_in_executor(None, self.guests.stop_all)
        if self.pve_ssh is not None:
            await loop.run_in_executor(None, self.pve_ssh.stop)
        for server in reversed(self.outside):
            await server.stop()
        if self.dns is not None:
            await self.dns.stop()
        if self.mirror is not None:
            await self.mirror.stop()
        if self.control is not None:
            await self.control.stop()
        await self.pve.stop()
        self.pool.shutdown(wait=True)
        self._write_status()
        log.info("stopped")


async def _start_dns(config: dict[str, Any]) -> Any:
    from homelab.lab.dns import LabDns, View

    records: dict[str, list[str]] = dict(config["dns_records"])
    view = View(zones=list(config["dns_zones"]), records={name: {"A": values} for name, values in records.items()})
    dns = LabDns({"internal": view})
    await dns.start([(address, 53, "internal") for address in config["dns_listen"]])
    log.info("DNS at %s for %s", ", ".join(config["dns_listen"]), ", ".join(config["dns_zones"]))
    return dns


async def _start_control(pve: Any, state: Path) -> Any:
    """`invoke lab.fault`'s switches for the PVE state (root only); the lab runs without them if this fails."""
    from homelab.lab.faultctl import SOCKET, ControlServer

    server = ControlServer(pve, state / SOCKET)
    try:
        await server.start()
    except OSError as exc:
        log.error("no control socket for lab faults at %s: %s", state / SOCKET, exc)
        return None
    log.info("fault control socket at %s", state / SOCKET)
    return server


async def _start_mirror(config: dict[str, Any]) -> Any:
    from homelab.lab.mirror import Mirror

    mirror = Mirror(Path(config["releases"]), Path(config["images"]))
    await mirror.start(config["address"], config["port"])
    log.info("release and image mirror at http://%s:%s", config["address"], config["port"])
    return mirror


def ipconfig_address(ipconfig: str) -> str | None:
    """The static address of an ipconfig0 value (`ip=192.168.7.223/24,gw=...`), or None for dhcp/none."""
    for part in ipconfig.split(","):
        key, _, value = part.partition("=")
        if key == "ip" and "/" in value:
            return value.split("/")[0]
    return None


def main(argv: list[str]) -> int:
    state = Path(argv[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    asyncio.run(Supervisor(state).serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""`lab.up`, `lab.down`, `lab.status`: start, stop and describe the lab twin.

lab.up builds (once) the rootfs, makes the lab namespace with the home bridge and no route out,
a CA and the PVE certificate, the API token and an SSH key pair, then starts the supervisor
inside the namespace and waits until it serves. Any failure undoes what was done. lab.down
stops the supervisor (which halts every VM container) and removes every namespace, mount,
cgroup and file the lab made, then checks that nothing is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console

from homelab.errors import HomelabError
from homelab.inventory import Inventory
from homelab.lab import layout, netns, pki, release, rootfs
from homelab.wait import Progress, poll

TOOLS = {"ip": "iproute2", "nsenter": "util-linux", "mount": "mount", "systemd-nspawn": "systemd-container",
         "debootstrap": "debootstrap", "ssh-keygen": "openssh-client", "chroot": "coreutils"}
TOKEN_ID = "root@pam!homelab"  # noqa: S105 - the token's id; its secret is random per lab


class LabError(HomelabError):
    exit_code = 2


@dataclass
class Status:
    running: bool
    pid: int | None
    namespaces: list[str]
    vms: list[dict[str, Any]]
    leftovers: list[str]


# ------------------------------------------------------------------------------- checks


def preflight() -> None:
    """Refuse early, with what to install or free, before anything is made."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, mounts, containers)",
                       hint="run as root, e.g. `sudo .venv/bin/invoke lab.up`")
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise LabError(f"missing Debian packages: {', '.join(missing)}",
                       hint=f"apt-get install {' '.join(missing)}")
    for path in (layout.VAR.parent, layout.STATE.parent):
        free = shutil.disk_usage(path).free
        if free < 1024**3:
            raise LabError(f"only {free / 1024**2:.0f} MiB free at {path}; the lab's VMs need 1 GiB",
                           hint="free some space")


def supervisor_pid() -> int | None:
    """The recorded pid of the lab's supervisor, if that process still runs it."""
    try:
        pid = int((layout.STATE / layout.PID).read_text(encoding="utf-8"))
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"homelab.lab.supervisor" in cmdline else None


def running() -> bool:
    return supervisor_pid() is not None and netns.exists(layout.NETNS)


# ----------------------------------------------------------------------------------- up


def mirror_host(inv: Inventory) -> tuple[str, int] | None:
    """The lab's release and image mirror (from the lab target's URLs), on the home bridge."""
    url = inv.targets.lab.k3s_release_url
    parts = urlsplit(url)
    return (parts.hostname, parts.port or 80) if parts.hostname else None


def release_versions(inv: Inventory) -> list[str]:
    return list(dict.fromkeys([inv.k3s.version, *inv.targets.lab.k3s_versions]))


def lab_config(inv: Inventory, root: Path) -> dict[str, Any]:
    """What the supervisor needs: addresses, names and paths (no secrets)."""
    internal = inv.domains.internal.name
    records = {f"{n.name}.{internal}": [str(n.address)] for n in inv.proxmox.nodes}
    records.update({f"{vm.name}.{internal}": [str(vm.address)] for vm in inv.k3s.vms})
    # What the cluster's doubles look up through the home resolver: the tunnel edge, Tailscale's API.
    world = outside(inv)
    records.update({name: [EDGE_ADDRESS] for name in EDGE_NAMES})
    records.update({name: [str(world["tailscale_api"])] for name in TAILSCALE_NAMES})
    return {
        "netns": layout.NETNS,
        "bridge": inv.network.bridge,
        "rootfs": str(root),
        "var_dir": str(layout.VAR / "vms"),
        "cluster": inv.proxmox.cluster,
        "api_port": inv.proxmox.api_port,
        "pve_nodes": {n.name: str(n.address) for n in inv.proxmox.nodes},
        "nameservers": [str(a) for a in inv.network.nameservers],
        "search_domain": inv.k3s.search_domain,
        "dns_listen": [str(a) for a in inv.network.nameservers if a in inv.network.home],
        "dns_zones": [internal, "argotunnel.com", "tailscale.com"],
        "dns_records": records,
        "mirror": {"address": mirror[0], "port": mirror[1], "releases": str(rootfs.CACHE / "releases"),
                   "images": str(rootfs.CACHE / "images")} if (mirror := mirror_host(inv)) else None,
        "outside": outside(inv),
    }


# The lab's Cloudflare edge (what proxied names resolve to) and the names the cluster's doubles look up.
EDGE_ADDRESS = "203.0.113.20"
EDGE_NAMES = ("region1.v2.argotunnel.com", "region2.v2.argotunnel.com")
TAILSCALE_NAMES = ("api.tailscale.com", "controlplane.tailscale.com")


def outside(inv: Inventory) -> dict[str, Any]:
    """The outside world's addresses in the lab, from the lab target's endpoints (documentation addresses)."""
    lab = inv.targets.lab
    return {
        "cloudflare_api": urlsplit(lab.cloudflare_api).hostname,
        "tailscale_api": urlsplit(lab.tailscale_api).hostname,
        "public_resolver": str(lab.public_resolver),
        "tailnet_resolver": str(lab.tailnet_resolver),
        "edge": EDGE_ADDRESS,
        "public_zone": inv.domains.public.name,
    }


def outside_addresses(inv: Inventory) -> list[str]:
    found = outside(inv)
    return list(dict.fromkeys(str(found[k]) for k in ("cloudflare_api", "tailscale_api", "public_resolver",
                                                      "tailnet_resolver", "edge")))


def bridge_addresses(inv: Inventory) -> list[str]:
    """The addresses the lab answers at on the home bridge: the gateway, the resolvers, the PVE hosts."""
    prefix = inv.network.home.prefixlen
    mirror = mirror_host(inv)
    wanted = [inv.network.gateway, *(a for a in inv.network.nameservers if a in inv.network.home),
              *(n.address for n in inv.proxmox.nodes), *([ip_address(mirror[0])] if mirror else [])]
    return [f"{a}/{prefix}" for a in dict.fromkeys(wanted)]


def gitops_snapshot(inv: Inventory) -> bytes:
    """charts/gitops.json: what Argo CD would find at the inventory's repository and path, read from this
    checkout (the lab cannot reach the repository's host): {repo_url: {path: [objects]}}."""
    import yaml

    folder = Path(__file__).resolve().parents[2] / inv.gitops.path
    files = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    kustomization = folder / "kustomization.yaml"
    if kustomization.is_file():
        listed = (yaml.safe_load(kustomization.read_text(encoding="utf-8")) or {}).get("resources") or []
        files = [folder / str(name) for name in listed]
    objects = [doc for path in files for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
               if isinstance(doc, dict)]
    return json.dumps({inv.gitops.repo_url: {inv.gitops.path: objects}}, sort_keys=True).encode()


def outside_json(ca_pem: str) -> bytes:
    """charts/outside.json for the stand-in: where the Cloudflare edge is, and the CA the outside world's
    TLS is signed by (the Tailscale API's too)."""
    from homelab.lab.k3s_standin.tunnel import outside_index

    data = json.loads(outside_index(EDGE_NAMES[0], ca_pem))
    data["tailscale_api"] = {"ca_pem": ca_pem}
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def up(inv: Inventory, out: Console, timeout: float = 60.0) -> bool:
    """Start the lab; False (and nothing changed) if it already runs."""
    preflight()
    if running():
        out.print(f"the lab is already running (supervisor pid {supervisor_pid()}); nothing changed")
        return False
    if netns.names(layout.NETNS_PREFIX) or layout.STATE.exists():
        out.print("[yellow]cleaning up the remains of an earlier lab first[/]")
        down(out, quiet=True)
    progress = Progress(out)
    started = time.monotonic()
    root = rootfs.ensure(progress)
    layout.STATE.mkdir(mode=0o700, parents=True, exist_ok=True)
    (layout.STATE / "pki").mkdir(mode=0o700, exist_ok=True)
    ca_pem, _ = pki.make_ca(layout.STATE / "pki")
    extra = {"charts/outside.json": outside_json(ca_pem.read_text(encoding="utf-8")),
             "charts/gitops.json": gitops_snapshot(inv)}
    for version in release_versions(inv):
        with progress.waiting(f"the k3s stand-in release {version} (vendoring from PyPI the first time)"):
            release.build(version, rootfs.CACHE / "releases", cache=rootfs.CACHE, extra=extra)
    (rootfs.CACHE / "images").mkdir(parents=True, exist_ok=True)
    try:
        _make(inv, root, out, progress, timeout)
    except BaseException:
        out.print("[red]lab.up failed; removing what it made[/]")
        down(out, quiet=True)
        raise
    out.print(f"[green]lab up[/] in {time.monotonic() - started:.1f}s: PVE API at "
              + ", ".join(f"https://{n.address}:{inv.proxmox.api_port}" for n in inv.proxmox.nodes)
              + f" inside namespace {layout.NETNS}; run `invoke up` (target lab)")
    return True


def _make(inv: Inventory, root: Path, out: Console, progress: Progress, timeout: float) -> None:
    state = layout.STATE
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    (state / "pki").mkdir(mode=0o700, exist_ok=True)
    (state / "ssh").mkdir(mode=0o700, exist_ok=True)
    (layout.VAR / "vms").mkdir(parents=True, exist_ok=True)

    ca_pem, ca_key = state / "pki" / "ca.pem", state / "pki" / "ca.key"
    names = [str(n.address) for n in inv.proxmox.nodes] + [n.name for n in inv.proxmox.nodes]
    pki.issue(ca_pem, ca_key, state / "pki", "pve", names)
    world = outside(inv)
    pki.issue(ca_pem, ca_key, state / "pki", "cloudflare-api", [str(world["cloudflare_api"]), "api.cloudflare.com"])
    pki.issue(ca_pem, ca_key, state / "pki", "tailscale-api", [str(world["tailscale_api"]), *TAILSCALE_NAMES])
    key = state / layout.SSH_KEY
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "homelab-lab", "-f", str(key)],
                   check=True, capture_output=True)
    _write_private(state / layout.TARGET_ENV, "\n".join([
        "# Written by `invoke lab.up`; removed by `invoke lab.down`.",
        f"PROXMOX_TOKEN_ID={TOKEN_ID}",
        f"PROXMOX_TOKEN_SECRET={secrets.token_urlsafe(32)}",
        f"PROXMOX_CA_BUNDLE={ca_pem}",
        f"HOMELAB_SSH_PUBLIC_KEY={key}.pub",
        f"HOMELAB_SSH_PRIVATE_KEY={key}",
        f"HOMELAB_KNOWN_HOSTS={state / layout.KNOWN_HOSTS}",
        # The outside world's credentials in the lab (its Cloudflare and Tailscale accept exactly these),
        # and the apps' secrets.
        f"HOMELAB_OUTSIDE_CA_BUNDLE={ca_pem}",
        f"CLOUDFLARE_API_TOKEN={secrets.token_urlsafe(30)}",
        f"CLOUDFLARE_ACCOUNT_ID={secrets.token_hex(16)}",
        f"TS_OAUTH_CLIENT_ID=k{secrets.token_hex(8)}CNTRL",
        f"TS_OAUTH_CLIENT_SECRET=tskey-client-{secrets.token_hex(24)}",
        f"GRAFANA_ADMIN_PASSWORD={secrets.token_urlsafe(18)}",
        f"VAULTWARDEN_ADMIN_TOKEN={secrets.token_urlsafe(32)}",
        "",
    ]))
    (state / layout.LAB_JSON).write_text(json.dumps(lab_config(inv, root), indent=2), encoding="utf-8")

    netns.add(layout.NETNS)
    netns.make_bridge(layout.NETNS, inv.network.bridge, bridge_addresses(inv))
    # The outside world (Cloudflare, Tailscale, public resolvers) on the namespace's loopback (the machine may
    # have no dummy driver): the VMs reach it through their gateway, and nothing routes further.
    netns.ip("link", "set", "lo", "up", netns=layout.NETNS)
    for address in outside_addresses(inv):
        netns.add_address(layout.NETNS, "lo", f"{address}/32")
    etc = Path("/etc/netns") / layout.NETNS
    etc.mkdir(parents=True, exist_ok=True)
    resolvers = [str(a) for a in inv.network.nameservers if a in inv.network.home]
    (etc / "resolv.conf").write_text("".join(f"nameserver {a}\n" for a in resolvers)
                                     + f"search {inv.k3s.search_domain}\n", encoding="utf-8")

    log = (state / layout.LOG).open("ab")
    proc = subprocess.Popen(["nsenter", f"--net={netns.NETNS_DIR / layout.NETNS}", sys.executable, "-m",
                             "homelab.lab.supervisor", str(state)],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=str(Path(__file__).resolve().parents[2]))
    log.close()
    (state / layout.PID).write_text(str(proc.pid), encoding="utf-8")

    def probe() -> tuple[bool | None, str]:
        if (state / layout.READY).exists():
            return True, "ready"
        if proc.poll() is not None:
            raise LabError(f"the lab supervisor exited with {proc.returncode}:\n" + _tail(state / layout.LOG))
        return None, "starting"

    poll("the lab's PVE API and DNS", probe, timeout=timeout, progress=progress)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------- down


def down(out: Console, purge: bool = False, quiet: bool = False, timeout: float = 90.0) -> list[str]:
    """Stop everything the lab started and remove what it made; returns what is left (should be [])."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root to stop", hint="run as root")
    _stop_supervisor(out, quiet, timeout)
    _kill_recorded_containers()
    vms = layout.VAR / "vms"
    if vms.is_dir():
        for root in sorted(vms.glob("*/root")):
            subprocess.run(["umount", "-l", str(root)], check=False, capture_output=True)
    for name in netns.names(layout.NETNS_PREFIX):
        netns.delete(name)
    shutil.rmtree(Path("/etc/netns") / layout.NETNS, ignore_errors=True)
    from homelab.lab.guests import remove_cgroups

    remove_cgroups()
    shutil.rmtree(layout.VAR, ignore_errors=True)
    shutil.rmtree(layout.STATE, ignore_errors=True)
    if purge:
        for removed in rootfs.purge():
            out.print(f"removed the cached {removed}")
    left = leftovers()
    if not quiet:
        if left:
            out.print("[red]left behind:[/] " + "; ".join(left))
        else:
            out.print("[green]lab down[/]: no namespace, mount, container or process of the lab remains"
                      + ("" if purge else f" (rootfs cache kept in {rootfs.CACHE}; --purge removes it)"))
    return left


def _stop_supervisor(out: Console, quiet: bool, timeout: float) -> None:
    pid = supervisor_pid()
    if pid is None:
        return
    if not quiet:
        out.print(f"stopping the lab supervisor (pid {pid}) and its VM containers")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        _wait_exit(pid, 0.5)
    if _alive(pid):
        out.print(f"[yellow]supervisor pid {pid} did not stop in {timeout:.0f}s; killing it[/]")
        os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _wait_exit(pid: int, seconds: float) -> None:
    """Block up to `seconds` for pid to exit (poll on a pidfd: no fixed sleep)."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], seconds)
    finally:
        os.close(fd)


def _kill_recorded_containers() -> None:
    """Containers whose supervisor died: end the nspawn processes the lab started, by their pid."""
    status = layout.STATE / layout.STATUS_JSON
    try:
        vms = json.loads(status.read_text(encoding="utf-8")).get("vms", [])
    except (OSError, ValueError):
        return
    for vm in vms:
        pid = vm.get("pid")
        if not pid or not _alive(pid):
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"systemd-nspawn" in cmdline or b"nsenter" in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            _wait_exit(pid, 20)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


def leftovers() -> list[str]:
    """Anything of the lab's that still exists: namespaces, mounts, processes, state."""
    found = [f"network namespace {n}" for n in netns.names(layout.NETNS_PREFIX)]
    with Path("/proc/self/mounts").open(encoding="utf-8") as mounts:
        found += [f"mount {line.split()[1]}" for line in mounts
                  if line.split()[1].startswith((str(layout.VAR), str(layout.STATE)))]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"homelab.lab.supervisor" in cmdline or (b"systemd-nspawn" in cmdline and str(layout.VAR).encode()
                                                     in cmdline):
            found.append(f"process {proc.name}: {cmdline.decode(errors='replace').strip()[:80]}")
    found += [f"directory {p}" for p in (layout.STATE, layout.VAR) if p.exists()]
    return found


# ------------------------------------------------------------------------------- status


def status() -> Status:
    pid = supervisor_pid()
    vms: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, ValueError):
        vms = json.loads((layout.STATE / layout.STATUS_JSON).read_text(encoding="utf-8")).get("vms", [])
    return Status(running=running(), pid=pid, namespaces=netns.names(layout.NETNS_PREFIX), vms=vms,
                  leftovers=[] if pid else leftovers())


def enter(argv: list[str]) -> None:
    """Move this process into the lab's network namespace (the only place the lab's addresses exist).

    While the process is single-threaded, setns(2) moves it in place; otherwise it re-executes
    itself under `ip netns exec`. Either way no packet for the lab's addresses leaves from the
    host's own network stack.
    """
    if netns.inside(layout.NETNS):
        return
    if not running():
        raise LabError("the lab is not running", hint="start it with `invoke lab.up`")
    if os.geteuid() != 0:
        raise LabError("the lab target needs root (it runs inside the lab's network namespace)")
    if threading.active_count() == 1 and netns.setns(layout.NETNS):
        return
    os.execvp("ip", ["ip", "netns", "exec", layout.NETNS, sys.executable, "-m", "invoke", *argv])

"""The Debian bookworm root filesystem the lab boots its VMs from, built once with debootstrap.

The cache is keyed by the suite, the package list and the setup steps, so a change to any of
them builds a new one; `lab.down` keeps it and `lab.down --purge` removes it. VMs never write
to it: each boots from an overlay of its own.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from homelab.errors import HomelabError
from homelab.wait import Progress

CACHE = Path(os.environ.get("HOMELAB_LAB_CACHE", "/var/cache/homelab-lab"))
SUITE = "bookworm"
MIRROR = os.environ.get("HOMELAB_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What a Debian cloud image brings that matters here (systemd, sshd, cloud-init, python3), and what
# the k3s layer's node preparation installs, so that it finds them present and changes nothing.
# python3-cffi-backend: debootstrap does not resolve virtual packages, and cryptography needs it.
PACKAGES = (
    "systemd", "systemd-sysv", "systemd-resolved", "systemd-timesyncd", "dbus", "openssh-server", "sudo",
    "python3", "python3-cffi-backend", "cloud-init", "locales", "iproute2", "netbase", "ca-certificates",
    "curl", "iptables", "kmod", "procps", "conntrack", "socat",
)
SETUP_VERSION = "3"
CLOUD_CFG = """\
# The lab hands cloud-init a NoCloud seed; skip probing for other clouds.
datasource_list: [NoCloud, None]
"""


def cache_key() -> str:
    blob = "\n".join([SUITE, SETUP_VERSION, *PACKAGES, CLOUD_CFG])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def path() -> Path:
    return CACHE / f"rootfs-{SUITE}-{cache_key()}"


def ready(root: Path | None = None) -> bool:
    return ((root or path()) / ".homelab-ready").exists()


def _chroot(root: Path, *argv: str) -> None:
    done = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise HomelabError(f"setting up the lab rootfs: `{' '.join(argv)}` failed: {done.stderr.strip()}")


def _setup(root: Path) -> None:
    """What turns a debootstrap tree into a cloud image: networkd for cloud-init, a locale, no host keys."""
    _chroot(root, "systemctl", "enable", "systemd-networkd.service", "systemd-resolved.service", "ssh.service")
    locale_gen = root / "etc/locale.gen"
    locale_gen.write_text(locale_gen.read_text().replace("# en_US.UTF-8 UTF-8", "en_US.UTF-8 UTF-8"))
    _chroot(root, "locale-gen")
    (root / "etc/cloud/cloud.cfg.d/90-homelab-lab.cfg").write_text(CLOUD_CFG)
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
    # Every VM gets its own identity at first boot, as a cloud image does.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")


def ensure(progress: Progress, timeout: float = 1800.0) -> Path:
    """The cached rootfs, built first if missing (minutes; output shown as progress)."""
    root = path()
    if ready(root):
        return root
    for tool in ("debootstrap", "chroot"):
        if shutil.which(tool) is None:
            raise HomelabError(f"{tool} is not installed", hint="apt-get install debootstrap")
    CACHE.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(CACHE).free
    if free < 2 * 1024**3:
        raise HomelabError(f"only {free / 1024**3:.1f} GiB free in {CACHE}; the lab's rootfs needs 2 GiB",
                           hint="free some space or set HOMELAB_LAB_CACHE to a roomier place")
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    argv = ["debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES), SUITE, str(tmp), MIRROR]
    deadline = time.monotonic() + timeout
    with progress.waiting(f"building the lab's Debian {SUITE} rootfs (debootstrap, once)") as update:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            tail = [*tail[-20:], line.rstrip()]
            update(line.strip()[:100])
            if time.monotonic() > deadline:
                proc.kill()
                break
        code = proc.wait()
        if code != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise HomelabError("debootstrap failed:\n  " + "\n  ".join(tail[-8:]),
                               hint=f"check that {MIRROR} is reachable")
        _setup(tmp)
    (tmp / ".homelab-ready").write_text(f"{SUITE} {cache_key()} {' '.join(PACKAGES)}\n")
    tmp.rename(root)
    for old in CACHE.glob(f"rootfs-{SUITE}-*"):
        if old != root:
            shutil.rmtree(old, ignore_errors=True)
    return root


def purge() -> list[Path]:
    """Remove every cached rootfs, release and vendored package set; returns what was removed."""
    removed = sorted([*CACHE.glob("rootfs-*"), *CACHE.glob("vendor-*"), *CACHE.glob("releases"),
                      *CACHE.glob("images")]) if CACHE.is_dir() else []
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    return removed

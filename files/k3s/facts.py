"""Facts about a node for the k3s layer, printed as one JSON document (run as root, read-only)."""

import hashlib
import json
import os
import subprocess
import sys

wanted = json.loads(sys.argv[1]) if len(sys.argv) > 1 else json.load(sys.stdin)


def sha256(path):
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


def meta(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"sha256": sha256(path), "mode": oct(st.st_mode & 0o7777)[2:].zfill(4), "uid": st.st_uid}


def run(*argv):
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def present(module):
    """Loaded or built in: /sys/module lists modules with parameters; the rest show by what they add."""
    if os.path.isdir("/sys/module/" + module):
        return True
    if module == "br_netfilter":
        return os.path.isdir("/proc/sys/net/bridge")
    if module == "overlay":
        with open("/proc/filesystems") as fh:
            return "overlay" in fh.read().split()
    return False


def sysctl(key):
    try:
        with open("/proc/sys/" + key.replace(".", "/")) as fh:
            return fh.read().strip()
    except OSError:
        return None


status = run("dpkg-query", "-W", "-f=${Package} ${Status}\n", *wanted["packages"])
installed = {line.split()[0] for line in status.splitlines() if line.endswith("install ok installed")}
with open("/proc/swaps") as fh:
    swaps = [line.split()[0] for line in fh.read().splitlines()[1:] if line.strip()]
print(json.dumps({
    "hostname": run("hostname"),
    "packages": {p: p in installed for p in wanted["packages"]},
    "modules": {m: present(m) for m in wanted["modules"]},
    "sysctl": {k: sysctl(k) for k in wanted["sysctl"]},
    "swap": swaps,
    "timesync": run("systemctl", "is-enabled", wanted["timesync"]),
    "files": {path: meta(path) for path in wanted["files"]},
    "units": {u: {"active": run("systemctl", "is-active", u), "enabled": run("systemctl", "is-enabled", u)}
              for u in wanted["units"]},
    "version": (run(wanted["binary"], "--version").splitlines() or [None])[0]
    if os.access(wanted["binary"], os.X_OK) else None,
}))

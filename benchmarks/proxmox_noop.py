#!/usr/bin/env python3
"""Benchmark the Proxmox layers (ceph, sdn, vms) on fakepve: cold run, then no-op runs.

Prints wall time, API requests (token auth: there is no login request) and changes per run.
Runs the engine in-process against a LabPve on 127.0.0.1 over HTTPS, as the unit tests do.

    python benchmarks/proxmox_noop.py [--runs 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from fakepve.certs import make_cert
from rich.console import Console

from homelab import inventory, pipeline
from homelab.context import Run, Timeouts
from homelab.lab.pve import LabPve
from homelab.lab.pvessh import LabPveSsh
from homelab.lab.serving import Background
from homelab.target import ProxmoxAccess, Secret, Target
from homelab.wait import Progress

LAYERS = ["ceph", "sdn", "vms"]
TOKEN_ID = "root@pam!homelab"  # noqa: S105 - an id, not a secret


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="no-op runs to time (default 5)")
    args = parser.parse_args()
    inv = inventory.load()
    secret = "benchmark-" + str(time.time_ns())
    with tempfile.TemporaryDirectory() as tmp:
        cert, key, _ = make_cert(tmp, hosts=("127.0.0.1",))
        pubkey = Path(tmp) / "id.pub"
        pubkey.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchmarkBenchmarkBenchmarkBenchmark00 b@b\n")
        pve = LabPve(host="127.0.0.1", port=0, node_ips={n.name: str(n.address) for n in inv.proxmox.nodes},
                     simulate_guests=True)
        pve.time_scale = 0
        pve.apitokens[TOKEN_ID] = secret
        loop = Background()
        loop.run(pve.start(cert, key))
        # SSH on the PVE host for `ceph auth` (the CSI client key), with an operator key pair of its own.
        private = Path(tmp) / "id_ed25519"
        operator = ed25519.Ed25519PrivateKey.generate()
        private.write_bytes(operator.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()))
        private.chmod(0o600)
        line = operator.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH).decode()
        (Path(tmp) / "ssh").mkdir(mode=0o700)
        ssh = LabPveSsh(pve, line + " bench", Path(tmp) / "ssh" / "host_key")
        ssh.start(["127.0.0.1"], 0)
        known = Path(tmp) / "known_hosts"
        known.write_text("\n".join(ssh.known_hosts_lines()) + "\n", encoding="utf-8")
        target = Target("lab", ProxmoxAccess(TOKEN_ID, Secret(secret), cert, ("127.0.0.1", pve.port),
                                             ssh_endpoint=("127.0.0.1", ssh.port)), pubkey,
                        ssh_private_key=private, known_hosts=known)

        def once() -> tuple[float, int, int, dict[str, int]]:
            out = Console(file=io.StringIO(), width=200)
            run = Run(inv, target, out, Progress(out), Timeouts(task=60, guest_agent=30))
            started = time.perf_counter()
            outcome = pipeline.execute(run, "up", LAYERS, dry_run=False)
            seconds = time.perf_counter() - started
            if outcome.failed:
                raise SystemExit(out.file.getvalue())  # type: ignore[attr-defined]
            changes = sum(r.changed for r in outcome.rows)
            run.close()
            return seconds, run.api_requests(), changes, dict(run.proxmox.stats.requests)

        try:
            seconds, requests, changes, methods = once()
            print(f"cold run:  {seconds:6.3f} s  {requests:3d} API requests  {changes:2d} changes  {methods}")
            times = []
            for i in range(args.runs):
                seconds, requests, changes, methods = once()
                times.append(seconds)
                print(f"no-op #{i + 1}: {seconds:6.3f} s  {requests:3d} API requests  {changes:2d} changes  {methods}")
            print(f"no-op median {statistics.median(times):.3f} s, max {max(times):.3f} s "
                  f"(in-process; add the interpreter start of `invoke` for the CLI)")
        finally:
            ssh.stop()
            loop.run(pve.stop())
            loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

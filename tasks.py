"""homelab: build and verify a K3s homelab on Proxmox. `invoke --list` shows the tasks.

The pipeline is `up` (and `down`, `plan`): ceph -> sdn -> vms -> k3s -> network -> access ->
monitoring -> apps. Each layer also has its own namespace (`invoke vms.up`, ...).
"""

from __future__ import annotations

from pathlib import Path

# tasks/ holds one module per layer; this file is the root. A tasks/__init__.py would shadow
# this module, so the folder is made this module's package path instead.
__path__ = [str(Path(__file__).with_suffix(""))]

from invoke.collection import Collection

from tasks import access, apps, ceph, k3s, lab, monitoring, network, pipeline, sdn, test, vms

ns = Collection(pipeline.up, pipeline.down, pipeline.plan, pipeline.check)
for module in (ceph, sdn, vms, k3s, network, access, monitoring, apps, test, lab):
    ns.add_collection(module.ns)
ns.configure({"run": {"echo": False}})

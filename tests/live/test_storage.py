"""Storage: the default StorageClass is the one the manifests declare (Ceph RBD), and every claim is Bound."""

from __future__ import annotations

from typing import Any

import pytest

from homelab import inventory, live

from .conftest import Live, fail_unless

pytestmark = pytest.mark.storage
DEFAULT = "storageclass.kubernetes.io/is-default-class"


def test_default_storageclass(homelab: Live, inv: inventory.Inventory, measured: Any) -> None:
    declared = [o for o in homelab.rendered if o["kind"] == "StorageClass"
                and (o["metadata"].get("annotations") or {}).get(DEFAULT) == "true"]
    want = declared[0]
    classes = homelab.items("storage.k8s.io/v1", "StorageClass")
    defaults = [c for c in classes if (c["metadata"].get("annotations") or {}).get(DEFAULT) == "true"]
    measured(live.listing(f"{c['metadata']['name']} ({c.get('provisioner')})" for c in defaults) or "no default")
    names = [c["metadata"]["name"] for c in defaults]
    fail_unless(names == [want["metadata"]["name"]],
                live.mismatch("the default StorageClass", names or "none", want["metadata"]["name"],
                              "manifests/ceph-csi and `kubectl get storageclass`", source="the manifests say"))
    have = defaults[0]
    for key in ("provisioner", "reclaimPolicy", "volumeBindingMode"):
        if key in want:
            fail_unless(str(have.get(key)) == str(want[key]),
                        live.mismatch(f"StorageClass {names[0]}'s {key}", have.get(key), want[key],
                                      "manifests/ceph-csi", source="the manifests say"))
    params = have.get("parameters") or {}
    fail_unless(params.get("pool") == inv.proxmox.ceph.pool,
                live.mismatch(f"StorageClass {names[0]}'s Ceph pool", params.get("pool"), inv.proxmox.ceph.pool,
                              "manifests/ceph-csi (proxmox.ceph.pool)"))
    fsid = homelab.pve("/cluster/ceph/status").get("fsid")
    fail_unless(params.get("clusterID") == fsid,
                live.mismatch(f"StorageClass {names[0]}'s clusterID", params.get("clusterID"), fsid,
                              "manifests/ceph-csi and `ceph fsid` on a PVE host", source="Ceph's fsid is"))


def test_every_pvc_bound(homelab: Live, measured: Any) -> None:
    claims = homelab.items("v1", "PersistentVolumeClaim")
    found = {(c["metadata"].get("namespace"), c["metadata"]["name"]): c for c in claims}
    declared = [(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in homelab.rendered
                if o["kind"] == "PersistentVolumeClaim"]
    missing = [f"{ns}/{name}" for ns, name in declared if (ns, name) not in found]
    unbound = [f"{ns}/{name} is {(c.get('status') or {}).get('phase') or 'unknown'} (class "
               f"{(c.get('spec') or {}).get('storageClassName') or 'none'})"
               for (ns, name), c in sorted(found.items()) if (c.get("status") or {}).get("phase") != "Bound"]
    measured(f"{len(claims) - len(unbound)}/{len(claims)} Bound")
    fail_unless(not missing, f"the claims {live.listing(missing)} that the manifests declare do not exist; see "
                             "`invoke apps.plan`")
    fail_unless(not unbound, f"expected every PersistentVolumeClaim Bound: {live.listing(unbound)}; see "
                             "`kubectl describe pvc -A` (events) and the ceph-csi-rbd provisioner")

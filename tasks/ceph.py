"""The ceph layer: the Ceph pool 'kubernetes' (RBD) and its PVE storage entry; Ceph health is shown in the plan."""

from tasks._layer import collection

ns = collection(
    "ceph",
    "the Ceph pool 'kubernetes' (RBD) and its PVE storage entry; Ceph health is shown in the plan",
)

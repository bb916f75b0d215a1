"""The vms layer.

the cloud-image template and the K3s VMs cloned from it, configured by cloud-init, started and reachable.
"""

from tasks._layer import collection

ns = collection(
    "vms",
    "the cloud-image template and the K3s VMs cloned from it, configured by cloud-init, started and reachable",
)

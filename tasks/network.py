"""The network layer: MetalLB, Traefik at the LoadBalancer address, cert-manager and Ceph CSI."""

from tasks._layer import collection

ns = collection(
    "network",
    "MetalLB, Traefik at the LoadBalancer address, cert-manager and Ceph CSI",
)

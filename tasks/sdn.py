"""The sdn layer.

the VXLAN zone with the PVE hosts as peers, its vnet and subnet (applied only when something changed).
"""

from tasks._layer import collection

ns = collection(
    "sdn",
    "the VXLAN zone with the PVE hosts as peers, its vnet and subnet (applied only when something changed)",
)

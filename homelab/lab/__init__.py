"""The lab: a local twin of the homelab (Proxmox API, network, guests) for `invoke up` and the live suite."""

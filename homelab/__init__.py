"""homelab: build and verify a K3s homelab on Proxmox (the engine; importable without Invoke)."""

"""The access layer: the Cloudflare Tunnel, Cloudflare DNS and Tailscale."""

from tasks._layer import collection

ns = collection("access", "the Cloudflare Tunnel, Cloudflare DNS and Tailscale")

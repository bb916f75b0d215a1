"""Targets: where the inventory is realised (`live` or `lab`), with the credentials to get there.

A target supplies endpoints of the outside world, trust anchors and secrets, never a cluster
fact. Secrets come from the environment or a git-ignored `.env` (live), or from the lab's own
state file (lab), and are never printed or put in process arguments.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from homelab.errors import ConfigError
from homelab.inventory import Inventory
from homelab.lab import layout

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Secret:
    """A value that never shows itself in repr, logs or tracebacks."""

    value: str = field(repr=False)

    def __str__(self) -> str:
        return "***"


@dataclass(frozen=True)
class ProxmoxAccess:
    token_id: str
    token_secret: Secret
    # A CA bundle path, or True for the system trust store. Never False.
    ca_bundle: str | bool
    # Overrides the PVE hosts' addresses (tests and benchmarks against a local fakepve only).
    endpoint: tuple[str, int] | None = None
    # Overrides the PVE hosts' SSH address (tests and benchmarks against a local LabPveSsh only).
    ssh_endpoint: tuple[str, int] | None = None


@dataclass(frozen=True)
class Target:
    name: str
    proxmox: ProxmoxAccess
    # The public key cloud-init puts on the VMs (the lab brings its own pair).
    ssh_public_key: Path
    image_mirror: str | None = None
    k3s_release_url: str = "https://github.com/k3s-io/k3s/releases/download"
    # The private key for SSH to the nodes, and the known host keys they must match.
    ssh_private_key: Path = Path("~/.ssh/id_ed25519")
    known_hosts: Path = Path("~/.ssh/known_hosts")
    # Where the operator's copies live: the cluster token and the kubeconfig (0600, in a 0700 dir).
    state_dir: Path = Path("~/.local/state/homelab/live")
    # The outside world's APIs and resolvers, and the CA bundle their TLS is checked against (True:
    # the system's trust store).
    cloudflare_api: str = "https://api.cloudflare.com/client/v4"
    tailscale_api: str = "https://api.tailscale.com"
    outside_ca: str | bool = True
    public_resolver: str = "1.1.1.1"
    tailnet_resolver: str = "100.100.100.100"
    # Credentials of the outside world and the apps, by variable name (SECRETS); only those set.
    secrets: dict[str, Secret] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The defaults (and a caller's "~/...") name the operator's home, never a "~" folder in the cwd.
        for name in ("ssh_public_key", "ssh_private_key", "known_hosts", "state_dir"):
            object.__setattr__(self, name, getattr(self, name).expanduser())

    def secret(self, name: str) -> str | None:
        value = self.secrets.get(name)
        return value.value if value is not None else None


# The secrets a target may hold, by the environment variable (or lab state file key) they come from.
SECRETS = {
    "CLOUDFLARE_API_TOKEN": "Cloudflare API token: Zone DNS Edit, Zone Read, Account Cloudflare Tunnel Edit",
    "CLOUDFLARE_ACCOUNT_ID": "the Cloudflare account that holds the tunnel",
    "TS_OAUTH_CLIENT_ID": "Tailscale OAuth client id (scopes: dns, devices:core, devices:routes, auth_keys)",
    "TS_OAUTH_CLIENT_SECRET": "Tailscale OAuth client secret",
    "GRAFANA_ADMIN_PASSWORD": "Grafana's admin password",
    "VAULTWARDEN_ADMIN_TOKEN": "Vaultwarden's admin token (an Argon2 PHC string is best)",
}


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blanks ignored); refused unless only the owner can read it."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path} holds secrets but is readable by others (mode {stat.filemode(mode)})",
                          hint=f"chmod 600 {path}")
    out: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":  # one matching pair of quotes only
            value = value[1:-1]
        out[key.strip().removeprefix("export ").strip()] = value
    return out


def _settings(name: str) -> dict[str, str]:
    if name == "lab":
        state = layout.STATE / layout.TARGET_ENV
        if not state.exists():
            raise ConfigError("the lab is not running (no lab credentials at " + str(state) + ")",
                              hint="start it with `invoke lab.up`")
        return read_env_file(state)
    env_file = REPO / ".env"
    values = read_env_file(env_file) if env_file.exists() else {}
    values.update({k: v for k, v in os.environ.items()
                   if k.startswith(("PROXMOX_", "HOMELAB_SSH_", "HOMELAB_KNOWN_HOSTS", "HOMELAB_OUTSIDE_CA"))
                   or k in SECRETS})
    return values


def resolve(name: str, inv: Inventory) -> Target:
    """The target's settings: lab from the lab's state file; live from the environment or .env."""
    values = _settings(name)
    missing = [k for k in ("PROXMOX_TOKEN_ID", "PROXMOX_TOKEN_SECRET") if not values.get(k)]
    if missing:
        raise ConfigError(f"target {name}: {', '.join(missing)} not set",
                          hint="export them or put them in .env (mode 0600); see README, Configuration")
    ca = values.get("PROXMOX_CA_BUNDLE")
    if ca and not Path(ca).is_file():
        raise ConfigError(f"target {name}: PROXMOX_CA_BUNDLE {ca} does not exist")
    settings = inv.targets.lab if name == "lab" else inv.targets.live
    # Target expands "~" in these paths.
    public = Path(values.get("HOMELAB_SSH_PUBLIC_KEY") or inv.k3s.ssh_public_key)
    private = Path(values.get("HOMELAB_SSH_PRIVATE_KEY") or str(public).removesuffix(".pub"))
    known = Path(values.get("HOMELAB_KNOWN_HOSTS") or "~/.ssh/known_hosts")
    state = (layout.STATE / "operator" if name == "lab"
             else Path(os.environ.get("HOMELAB_STATE") or "~/.local/state/homelab") / name)
    outside_ca = values.get("HOMELAB_OUTSIDE_CA_BUNDLE")
    if outside_ca and not Path(outside_ca).is_file():
        raise ConfigError(f"target {name}: HOMELAB_OUTSIDE_CA_BUNDLE {outside_ca} does not exist")
    return Target(name=name,
                  proxmox=ProxmoxAccess(values["PROXMOX_TOKEN_ID"], Secret(values["PROXMOX_TOKEN_SECRET"]),
                                        ca or True),
                  ssh_public_key=public, image_mirror=settings.image_mirror,
                  k3s_release_url=settings.k3s_release_url, ssh_private_key=private, known_hosts=known,
                  state_dir=state, cloudflare_api=settings.cloudflare_api, tailscale_api=settings.tailscale_api,
                  outside_ca=outside_ca or True, public_resolver=str(settings.public_resolver),
                  tailnet_resolver=str(settings.tailnet_resolver),
                  secrets={k: Secret(v) for k, v in values.items() if k in SECRETS and v})

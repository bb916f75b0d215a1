"""Where the lab keeps things. One place, so `lab.down` can prove it left nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

# Runtime state: credentials (0600), PKI, the supervisor's pid, log and status. Gone after lab.down.
STATE = Path(os.environ.get("HOMELAB_LAB_STATE", "/run/homelab-lab"))
# The VMs' disks (overlay upper dirs) and consoles. Gone after lab.down.
VAR = Path(os.environ.get("HOMELAB_LAB_VAR", "/var/lib/homelab-lab"))
NETNS = "homelab-lab"
NETNS_PREFIX = "homelab-"

TARGET_ENV = "target.env"
LAB_JSON = "lab.json"
STATUS_JSON = "status.json"
READY = "ready"
PID = "supervisor.pid"
LOG = "supervisor.log"
SSH_KEY = "ssh/id_ed25519"
KNOWN_HOSTS = "ssh/known_hosts"

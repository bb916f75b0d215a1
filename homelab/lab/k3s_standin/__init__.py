"""A stand-in for the k3s binary in the lab: `k3s server` serves a small Kubernetes API, `k3s agent` registers
its Node. Self-contained: the standard library plus PyYAML, cryptography and kubernetes-validate's schemas.

In-process entry points for tests: `serve(config)` and `start_agent(config)`.
"""

from __future__ import annotations

from .agent import AgentHandle, start_agent
from .server import ServerHandle, serve
from .version import read_version

__all__ = ["AgentHandle", "ServerHandle", "read_version", "serve", "start_agent"]

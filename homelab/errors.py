"""Domain errors. Library code raises these with the object and a hint; only tasks turn them into exits."""

from __future__ import annotations


class HomelabError(Exception):
    """Base of every error the engine raises on purpose; its message is meant for the operator."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message + (f"\n  hint: {self.hint}" if self.hint else "")


class InventoryInvalid(HomelabError):
    """The inventory cannot be read or contradicts itself; `problems` has one line each."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(problems))


class ConfigError(HomelabError):
    """Something the run needs is missing: a secret, a CA bundle, a target setting."""

    exit_code = 2


class NotFound(HomelabError):
    """An object the step needs does not exist."""


class Conflict(HomelabError):
    """The actual state contradicts the inventory in a way the layer must not resolve on its own."""


class ProxmoxError(HomelabError):
    """The Proxmox API refused a request (status and PVE's own message)."""

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class ProxmoxTaskFailed(ProxmoxError):
    """A Proxmox worker task ended with an exit status other than OK."""

    def __init__(self, upid: str, exitstatus: str, log_tail: list[str]) -> None:
        self.upid = upid
        self.exitstatus = exitstatus
        self.log_tail = log_tail
        super().__init__(f"Proxmox task {upid} failed: {exitstatus}")


class Timeout(HomelabError):
    """A wait passed its deadline; the message says what was awaited and what was last seen."""


class NotBuilt(HomelabError):
    """A layer that exists in the pipeline but has no implementation yet."""

    exit_code = 3

"""What every task shares: option defaults from flags and environment, and clean exits.

Tasks call `exits()` around their work: a HomelabError becomes `Exit(message, code)` (never a
traceback), Ctrl-C becomes exit 130.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from invoke.exceptions import Exit
from rich.console import Console
from rich.markup import escape

from homelab import inventory
from homelab.errors import HomelabError

P = ParamSpec("P")
R = TypeVar("R")

TARGETS = ("lab", "live")


def console() -> Console:
    """Output for people: colour on a terminal, plain text in CI logs and pipes."""
    return Console(highlight=False, soft_wrap=True)


def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def exits(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn domain errors into clean exits with the error's own exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except HomelabError as exc:
            err_console().print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            err_console().print("interrupted; a re-run resumes where this one stopped")
            raise Exit(code=130) from None

    return wrapper


def target_name(flag: str | None) -> str:
    """--target, else HOMELAB_TARGET, else lab; `live` is refused under CI."""
    name = flag or os.environ.get("HOMELAB_TARGET") or "lab"
    if name not in TARGETS:
        raise HomelabError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    if name == "live" and os.environ.get("CI"):
        raise HomelabError("the live target is for a real homelab and refuses to run when CI is set",
                           hint="CI runs the lab target only")
    return name


def load_inventory(flag: str | None) -> inventory.Inventory:
    """--inventory, else HOMELAB_INVENTORY, else inventory/homelab.yaml."""
    return inventory.load(Path(flag) if flag else None)


def split_names(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def print_json(data: Any) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")

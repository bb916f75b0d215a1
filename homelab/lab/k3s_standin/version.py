"""The stand-in's version: the `VERSION` file written into a release, or a development default."""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_VERSION = "v0.0.0+standin"
# The Kubernetes minor whose schemas validate objects when the version names none we know.
DEFAULT_KUBE_MINOR = (1, 33)

_HERE = Path(__file__).resolve().parent


def read_version() -> str:
    """The version from `VERSION` in the package (or beside it); the default when there is none."""
    for candidate in (_HERE / "VERSION", _HERE.parent / "VERSION"):
        try:
            text = candidate.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if text:
            return text.splitlines()[0].strip()
    return DEFAULT_VERSION


def kube_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a k3s version like v1.33.5+k3s1; DEFAULT_KUBE_MINOR when it names none."""
    match = re.match(r"^v?(\d+)\.(\d+)", version)
    if not match:
        return DEFAULT_KUBE_MINOR
    major, minor = int(match.group(1)), int(match.group(2))
    if major < 1:
        return DEFAULT_KUBE_MINOR
    return major, minor


def version_line(version: str) -> str:
    """What `k3s --version` prints."""
    return f"k3s version {version} (stand-in)"

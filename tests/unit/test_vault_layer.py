"""The apps layer reads Vault's state only from Vault's own health body: a 200 from anything else is not
"unsealed" (it would skip the initialisation)."""

from __future__ import annotations

from typing import Any

import pytest

from homelab.layers.vault import Vault

SEALED = {"initialized": True, "sealed": True, "standby": True}


@pytest.mark.parametrize(("status", "body", "state"), [
    (200, {"initialized": True, "sealed": False, "standby": False}, "unsealed"),
    (501, {"initialized": False, "sealed": True}, "uninitialised"),
    (503, SEALED, "sealed"),
    (200, {"app": None, "path": "/v1/sys/health"}, "unavailable: HTTP 200 without Vault's health body"),
    (200, None, "unavailable: HTTP 200 without Vault's health body"),
    (501, None, "unavailable: HTTP 501 without Vault's health body"),
    (503, None, "unavailable: HTTP 503 without Vault's health body"),
])
def test_state_comes_from_vaults_health_body(status: int, body: Any, state: str) -> None:
    vault = Vault.__new__(Vault)  # no Run: only call() is exercised
    vault.call = lambda method, path, data=None: (status, body)  # type: ignore[method-assign]
    assert vault.state() == state

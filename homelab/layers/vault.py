"""The apps layer, and Vault's initialisation and unsealing.

The apps' manifests are applied as in every Kubernetes layer. Then Vault, reached through Traefik at
its own name (https://<vault hostname>, TLS checked), is brought to "initialised and unsealed":

- /v1/sys/health 200: nothing to do;
- 501 (not initialised): PUT /v1/sys/init with 5 key shares and a threshold of 3 (Vault's defaults);
  the answer (unseal keys and root token) is written at once to `<state dir>/vault-init.json`, mode
  0600 in a 0700 directory outside the repository, and never printed; then unsealed as below;
- 503 with a Vault body (sealed): PUT /v1/sys/unseal with stored keys until it reports unsealed;
  without the file, the layer stops and says where the keys were expected.

https://developer.hashicorp.com/vault/api-docs/system/health, .../init, .../unseal.
All keys in one file on the operator's machine is a homelab's trade-off (one operator, one machine);
move them into a password manager and delete the file if that does not suit you.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import requests

from homelab import manifests
from homelab.context import Run
from homelab.errors import ConfigError, HomelabError
from homelab.layers import kubernetes
from homelab.layers.k3s import operator_dir
from homelab.plan import Action, Change, LayerPlan
from homelab.wait import poll

LAYER = "apps"
KEYS_FILE = "vault-init.json"
SHARES, THRESHOLD = 5, 3


class VaultError(HomelabError):
    """Vault answered something the apps layer cannot work with."""


class Vault:
    """Vault's sys API through Traefik: the LoadBalancer address, Vault's name for SNI and Host."""

    def __init__(self, run: Run) -> None:
        app = next(a for a in run.inv.apps if a.name == "vault")
        if not app.hostname:
            raise ConfigError("the vault app has no hostname in the inventory")
        self.run = run
        self.host = str(app.hostname)
        self.address = str(run.inv.network.traefik)
        run.guard(self.address)
        self.session = requests.Session()
        self._verify = _ingress_trust(run)
        self.calls = 0

    def _url(self, path: str) -> str:
        return f"https://{self.address}{path}"

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON body or None); TLS is checked for Vault's name, not the address."""
        from requests.adapters import HTTPAdapter

        class _Sni(HTTPAdapter):
            def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
                kwargs["server_hostname"] = host
                kwargs["assert_hostname"] = host
                super().init_poolmanager(*args, **kwargs)

        host = self.host
        self.session.mount(f"https://{self.address}", _Sni())
        self.calls += 1
        try:
            response = self.session.request(method, self._url(path), json=body, headers={"Host": self.host},
                                            verify=self._verify, timeout=15)
        except requests.exceptions.SSLError as exc:
            raise VaultError(f"TLS to {self.host} at {self.address} failed: {str(exc)[:200]}") from None
        except requests.RequestException as exc:
            raise VaultError(f"{self.host} at {self.address} does not answer: {str(exc)[:200]}") from None
        try:
            data = response.json()
        except ValueError:
            data = None
        return response.status_code, data

    def state(self) -> str:
        """"unsealed", "uninitialised", "sealed", or "unavailable: <why>" (not served yet)."""
        status, data = self.call("GET", "/v1/sys/health")
        # Only Vault's own health body counts: a 200 from whatever else the route reaches (a default backend,
        # a wrong Service) must not pass for "unsealed" and skip the initialisation.
        body = data if isinstance(data, dict) else {}
        if status == 200 and body.get("initialized") is True and body.get("sealed") is False:
            return "unsealed"
        if status == 501 and body.get("initialized") is False:
            return "uninitialised"
        if status == 503 and body.get("initialized") is True and body.get("sealed") is True:
            return "sealed"
        return f"unavailable: HTTP {status}" + ("" if "initialized" in body else " without Vault's health body")


def _ingress_trust(run: Run) -> str | bool:
    """What the apps' certificates chain to: public roots live; the lab's ACME stand-in's roots in the lab."""
    if run.target.name != "lab":
        return True
    roots = kubernetes.kube(run).request("GET", "/standin/acme-roots") or {}
    path = operator_dir(run) / "ingress-roots.pem"
    path.write_text("".join(str(v) for v in roots.values()), encoding="utf-8")
    return str(path)


def keys_path(run: Run) -> Path:
    return operator_dir(run) / KEYS_FILE


def _write_private(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".vault-init.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        Path(tmp).chmod(0o600)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def initialise_and_unseal(run: Run, vault: Vault) -> None:
    def served() -> tuple[str | None, str]:
        try:
            state = vault.state()
        except VaultError as exc:  # not routed or not serving its certificate yet: only the deadline fails
            return None, exc.message
        return (None, state) if state.startswith("unavailable") else (state, state)

    state = poll(f"Vault at https://{vault.host}", served, timeout=run.timeouts.k3s, progress=run.progress,
                 first=0.5, maximum=3.0)
    path = keys_path(run)
    if state == "uninitialised":
        if path.exists():  # keys of an earlier Vault (its volume went with `down`): kept, never overwritten
            kept = path.with_name(f"vault-init.{int(path.stat().st_mtime)}.json")
            path.replace(kept)
            run.console.print(f"[yellow]Vault is new; the keys of the earlier one were moved to {kept}[/]")
        status, data = vault.call("PUT", "/v1/sys/init", {"secret_shares": SHARES, "secret_threshold": THRESHOLD})
        if status != 200 or not isinstance(data, dict) or "keys_base64" not in data:
            raise VaultError(f"PUT /v1/sys/init answered HTTP {status}")
        _write_private(path, {"keys_base64": data["keys_base64"], "root_token": data["root_token"],
                              "threshold": THRESHOLD, "host": vault.host})
        run.console.print(f"Vault initialised; its unseal keys and root token are in {path} (0600)")
        state = "sealed"
    if state == "sealed":
        unseal(vault, path)


def unseal(vault: Vault, path: Path) -> None:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VaultError(f"Vault is sealed and there are no unseal keys at {path}",
                         hint="unseal it by hand (vault operator unseal) or put the init file back") from None
    for key in stored.get("keys_base64", []):
        status, data = vault.call("PUT", "/v1/sys/unseal", {"key": key})
        if status != 200 or not isinstance(data, dict):
            raise VaultError(f"PUT /v1/sys/unseal answered HTTP {status} (is {path} this Vault's?)")
        if data.get("sealed") is False:
            return
    raise VaultError(f"Vault is still sealed after every key in {path}")


class AppsLayer:
    name = LAYER

    def __init__(self) -> None:
        self.manifests = kubernetes.ManifestLayer(LAYER, manifests.LAYERS[LAYER], kubernetes.render)

    def plan_up(self, run: Run) -> LayerPlan:
        plan = self.manifests.plan_up(run)
        deployed = not any(c.kind == "HelmChart" and c.name.endswith("/vault") and c.action == "create"
                           for c in plan.changes)
        state = Vault(run).state() if deployed else "not deployed yet"
        if state == "unsealed":
            plan.add(Change(LAYER, "vault", "init/unseal", "noop", "initialised and unsealed"))
        else:
            action: Action = "create" if state in ("uninitialised", "not deployed yet") else "update"
            what = (f"Vault is {state}: initialise (keys to {keys_path(run)}, 0600) and unseal" if action == "create"
                    else f"Vault is {state}: unseal with the stored keys" if state == "sealed"
                    else f"Vault is {state}: initialise or unseal it once it answers")
            plan.add(Change(LAYER, "vault", "init/unseal", action, what,
                            apply=lambda: initialise_and_unseal(run, Vault(run))))
        return plan

    def plan_down(self, run: Run) -> LayerPlan:
        plan = self.manifests.plan_down(run)
        if keys_path(run).exists():
            plan.facts.append(f"Vault's unseal keys stay in {keys_path(run)}: the data they open may still exist "
                              "on its volume; remove the file yourself once it does not")
        return plan

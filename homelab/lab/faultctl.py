"""The lab supervisor's control socket: fakepve's fault switches, for `invoke lab.fault`.

The PVE state lives in the supervisor process, so PVE-side faults (lost quorum, a node offline, Ceph
trouble) are switched there. The supervisor serves a small HTTP API on a unix socket in the lab's state
directory (`control.sock`, mode 0600 in a 0700 directory; a peer must be root or the server's own user):

    GET  /pve/state            {"quorate": bool, "nodes": {name: online}, "ceph": {"health", "down", "slow"}}
    POST /pve/<switch>         one of SWITCHES, with a JSON body for its parameters ({"node": "pve-beta"})

Nothing else is reachable: a switch outside the allow-list is 404, a bad parameter 400.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from homelab.errors import HomelabError

log = logging.getLogger("homelab.lab.faultctl")

SOCKET = "control.sock"


class ControlError(HomelabError):
    """The control socket refused a request or is not there."""


def _node(pve: Any, params: dict[str, Any]) -> str:
    node = params.get("node")
    if not isinstance(node, str) or node not in pve.nodes:
        raise web.HTTPBadRequest(text=f"node must be one of {', '.join(sorted(pve.nodes))}")
    return node


def _health(params: dict[str, Any]) -> str:
    health = params.get("health", "HEALTH_WARN")
    if health not in ("HEALTH_WARN", "HEALTH_ERR"):
        raise web.HTTPBadRequest(text="health must be HEALTH_WARN or HEALTH_ERR")
    return str(health)


# The allow-list: switch -> what it does to the LabPve (fakepve's scenario methods, see fakepve/model.py).
SWITCHES: dict[str, Callable[[Any, dict[str, Any]], None]] = {
    "lose-quorum": lambda pve, _p: pve.lose_quorum(),
    "regain-quorum": lambda pve, _p: pve.regain_quorum(),
    "node-offline": lambda pve, p: pve.set_node_offline(_node(pve, p), True),
    "node-online": lambda pve, p: pve.set_node_offline(_node(pve, p), False),
    # Slow OSDs with no added latency (the lab runs PVE time at scale 0): only the health changes.
    "ceph-warn": lambda pve, p: pve.ceph_slow(0.0, _health(p)),
    "ceph-down": lambda pve, _p: pve.ceph_down(),
    "ceph-recover": lambda pve, _p: pve.ceph_recover(),
}


def pve_state(pve: Any) -> dict[str, Any]:
    return {"quorate": bool(pve.quorate),
            "nodes": {name: bool(state.get("online", True)) for name, state in sorted(pve.nodes.items())},
            "ceph": {"health": pve.ceph.get("health"), "down": bool(pve.ceph.get("down")),
                     "slow": float(pve.ceph.get("slow") or 0.0)}}


def peer_uid(transport: Any) -> int | None:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED), None if unknown."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


class ControlServer:
    """The control API for one LabPve, on a unix socket; `start()` and `stop()` from the supervisor's loop."""

    def __init__(self, pve: Any, path: Path) -> None:
        self.pve = pve
        self.path = path
        self.runner: web.AppRunner | None = None
        self.allowed_uids = {0, os.geteuid()}

    def app(self) -> web.Application:
        @web.middleware
        async def only_root(request: web.Request, handler: Any) -> web.StreamResponse:
            uid = peer_uid(request.transport)
            if uid not in self.allowed_uids:
                raise web.HTTPForbidden(text="the lab's control socket answers root only")
            response: web.StreamResponse = await handler(request)
            return response

        app = web.Application(middlewares=[only_root])
        app.router.add_get("/pve/state", self._state)
        app.router.add_post("/pve/{switch}", self._switch)
        return app

    async def _state(self, _request: web.Request) -> web.Response:
        return web.json_response(pve_state(self.pve))

    async def _switch(self, request: web.Request) -> web.Response:
        name = request.match_info["switch"]
        action = SWITCHES.get(name)
        if action is None:
            raise web.HTTPNotFound(text=f"no switch {name!r}; the switches are {', '.join(sorted(SWITCHES))}")
        params: dict[str, Any] = {}
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                raise web.HTTPBadRequest(text="the body must be a JSON object") from None
            if not isinstance(body, dict):
                raise web.HTTPBadRequest(text="the body must be a JSON object")
            params = body
        action(self.pve, params)
        log.warning("fault switch %s %s", name, json.dumps(params, sort_keys=True) if params else "")
        return web.json_response(pve_state(self.pve))

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        # The state directory is 0700; the socket is made 0600 at once for good measure.
        await web.UnixSite(self.runner, str(self.path)).start()
        self.path.chmod(0o600)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ client


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.unix_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass
class ControlClient:
    """Calls to the supervisor's control socket (root only)."""

    path: Path
    timeout: float = 10.0

    def _call(self, method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        conn = _UnixConnection(self.path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, url, body=payload, headers=headers)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        except FileNotFoundError:
            raise ControlError(f"the lab supervisor has no control socket at {self.path}",
                               hint="restart the lab (invoke lab.down && invoke lab.up) so its supervisor "
                                    "serves the control socket") from None
        except OSError as exc:
            raise ControlError(f"the lab's control socket {self.path} does not answer: {exc}") from None
        finally:
            conn.close()
        if response.status != 200:
            raise ControlError(f"{method} {url} on the lab's control socket: {response.status} {text.strip()}")
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ControlError(f"{method} {url}: the control socket answered {text[:100]!r}")
        return data

    def state(self) -> dict[str, Any]:
        return self._call("GET", "/pve/state")

    def switch(self, name: str, **params: str) -> dict[str, Any]:
        return self._call("POST", f"/pve/{name}", params or None)

"""`k3s agent`: fetch and check the cluster CA, register this Node, keep it Ready until stopped."""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from . import config as cfg
from . import pki, systemd, tokens
from .kubelet import Kubelet, KubeletError, NodeParams, heartbeat_interval
from .log import Log
from .version import read_version

MAX_BACKOFF = 10.0


class AgentError(Exception):
    pass


class Agent:
    def __init__(self, settings: cfg.AgentSettings, raw: cfg.RawConfig, log: Log, env: Mapping[str, str]) -> None:
        self.s, self.raw, self.log = settings, raw, log
        self.version = read_version()
        self.token = tokens.parse(settings.token)
        url = urllib.parse.urlsplit(settings.server)
        self.host, self.port = url.hostname or "", url.port or 6443
        self.interval = heartbeat_interval(env)
        self.stop_event = threading.Event()
        self.registered = threading.Event()
        self.context: ssl.SSLContext | None = None
        self.kubelet = Kubelet(self._call, NodeParams(
            name=settings.node_name, internal_ip=settings.node_ip, external_ip=settings.node_external_ip,
            version=self.version, control_plane=False, labels=settings.node_labels, taints=settings.node_taints,
            node_args=settings.node_args), log)

    # -------------------------------------------------------------------------------- transport
    def _connection(self, context: ssl.SSLContext) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(self.host, self.port, context=context, timeout=10)

    def fetch_ca(self) -> bytes:
        """GET /cacerts without verification, then check it against the token's CA hash (secure tokens)."""
        insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        conn = self._connection(insecure)
        try:
            conn.request("GET", "/cacerts")
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise AgentError(f"GET /cacerts: HTTP {resp.status}")
        if self.token.secure and tokens.ca_hash(body) != self.token.ca_hash:
            raise AgentError(f"token CA hash does not match the server CA hash (server {self.s.server})")
        agent_dir = self.s.data_dir / "agent"
        agent_dir.mkdir(parents=True, exist_ok=True)
        pki.write_private(agent_dir / "server-ca.crt", body, 0o644)
        return body

    def _verified_context(self, ca_pem: bytes) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=ca_pem.decode())
        # The chain is checked against the cluster CA; like K3s's agent, any address of the server will do
        # (K3s's server adds SANs for the names clients use).
        context.check_hostname = False
        return context

    def _call(self, method: str, path: str, body: Any, content_type: str) -> tuple[int, Any]:
        if self.context is None:
            raise AgentError("no connection to the server yet")
        conn = self._connection(self.context)
        headers = {"Authorization": f"Bearer {self.token.password}", "Accept": "application/json",
                   "User-Agent": f"k3s/{self.version}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        if resp.status == 401:
            raise AgentError("the server refused the token (401 Unauthorized)")
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode(errors="replace")

    # ------------------------------------------------------------------------------------- loop
    def run(self) -> None:
        self.log.info(f"Starting k3s agent {self.version} (stand-in)")
        for key in self.raw.unknown:
            self.log.warning(f"Unknown flag --{key} found in config.yaml, skipping")
        backoff = 0.5
        while not self.stop_event.is_set():
            try:
                if self.context is None:
                    self.context = self._verified_context(self.fetch_ca())
                if not self.kubelet.registered:
                    self.kubelet.register()
                    self.registered.set()
                    systemd.notify("READY=1")
                    self.log.info(f"Node {self.s.node_name} is Ready (server {self.s.server})")
                else:
                    self.kubelet.heartbeat()
                backoff = 0.5
                self.stop_event.wait(self.interval)
            except ssl.SSLCertVerificationError as exc:
                self.context = None  # the server's CA changed: fetch it again
                self._retry(f"verifying the server's certificate: {exc}", backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            except (OSError, AgentError, KubeletError, http.client.HTTPException) as exc:
                if isinstance(exc, AgentError) and "CA hash" in str(exc):
                    self.context = None
                self._retry(str(exc) or type(exc).__name__, backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        self.log.info("k3s agent stopped")

    def _retry(self, why: str, backoff: float) -> None:
        self.log.info(f"Waiting to retrieve agent configuration; server is not ready: {why}")
        self.stop_event.wait(backoff)

    def stop(self) -> None:
        self.stop_event.set()


@dataclass
class AgentHandle:
    """A running agent loop in a thread: `stop()` ends it (the Node stays, and turns NotReady)."""

    agent: Agent
    thread: threading.Thread

    @property
    def node_name(self) -> str:
        return self.agent.s.node_name

    def wait_registered(self, timeout: float) -> bool:
        return self.agent.registered.wait(timeout)

    def stop(self) -> None:
        self.agent.stop()
        self.thread.join(timeout=15)


def start_agent(config: Mapping[str, object], *, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                log_stream: TextIO | None = None) -> AgentHandle:
    """Run `k3s agent` with `config` as its config file's content, in a background thread."""
    env = os.environ if env is None else env
    raw = cfg.load("agent", args, env, overrides=config)
    settings = cfg.agent_settings(raw)
    log = Log(log_stream, debug=settings.debug)
    log.add_secrets([settings.token, tokens.parse(settings.token).password])
    agent = Agent(settings, raw, log, env)
    thread = threading.Thread(target=agent.run, name=f"k3s-agent-{settings.node_name}", daemon=True)
    thread.start()
    return AgentHandle(agent, thread)


def run(args: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """The `k3s agent` command: runs until SIGTERM or SIGINT, then exits 0."""
    env = os.environ if env is None else env
    log = Log()
    try:
        raw = cfg.load("agent", args, env)
        settings = cfg.agent_settings(raw)
    except cfg.ConfigError as exc:
        log.fatal(str(exc))
        return 1
    log = Log(debug=settings.debug)
    log.add_secrets([settings.token, tokens.parse(settings.token).password])
    agent = Agent(settings, raw, log, env)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info(f"Received {signal.Signals(signum).name}, shutting down")
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()
    return 0

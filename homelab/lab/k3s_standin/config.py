"""K3s configuration: /etc/rancher/k3s/config.yaml (+ config.yaml.d/*.yaml), K3S_* env, CLI flags.

Keys are K3s's CLI flag names without the leading `--`
(https://docs.k3s.io/installation/configuration#configuration-file). As in K3s, a key ending in
`+` appends to the value set so far, later drop-in files win, flags on the command line win over
the files, and the files over the K3S_* environment variables. Keys K3s knows but the stand-in has
no use for are accepted silently; unknown keys get K3s's own warning.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = "/etc/rancher/k3s/config.yaml"
DEFAULT_DATA_DIR = "/var/lib/rancher/k3s"
DEFAULT_KUBECONFIG = "/etc/rancher/k3s/k3s.yaml"


class ConfigError(Exception):
    """A configuration K3s would refuse to start with."""


# key -> "str" | "list" | "bool"
SERVER_KEYS: dict[str, str] = {
    "config": "str", "debug": "bool", "token": "str", "token-file": "str", "data-dir": "str",
    "cluster-cidr": "list", "service-cidr": "list", "cluster-dns": "list", "cluster-domain": "str",
    "node-ip": "list", "node-external-ip": "list", "node-name": "str", "node-label": "list",
    "node-taint": "list", "tls-san": "list", "disable": "list", "write-kubeconfig": "str",
    "write-kubeconfig-mode": "str", "bind-address": "str", "https-listen-port": "str",
    "advertise-address": "str", "advertise-port": "str",
}
AGENT_KEYS: dict[str, str] = {
    "config": "str", "debug": "bool", "server": "str", "token": "str", "token-file": "str",
    "data-dir": "str", "node-ip": "list", "node-external-ip": "list", "node-name": "str",
    "node-label": "list", "node-taint": "list",
}
# Real K3s keys that mean nothing to the stand-in (no containerd, flannel, etcd, add-ons, ...).
_COMMON_IGNORED = {
    "log", "alsologtostderr", "v", "vmodule", "with-node-id", "kubelet-arg", "kube-proxy-arg",
    "protect-kernel-defaults", "selinux", "lb-server-port", "resolv-conf", "flannel-iface",
    "flannel-conf", "flannel-cni-conf", "container-runtime-endpoint", "default-runtime",
    "image-service-endpoint", "pause-image", "snapshotter", "private-registry", "system-default-registry",
    "prefer-bundled-bin", "airgap-extra-registry", "image-credential-provider-bin-dir",
    "image-credential-provider-config", "node-external-dns", "node-internal-dns", "disable-default-registry-endpoint",
    "nonroot-devices", "docker", "rootless",
}
SERVER_IGNORED = _COMMON_IGNORED | {
    "cluster-init", "cluster-reset", "cluster-reset-restore-path", "flannel-backend", "flannel-ipv6-masq",
    "flannel-external-ip", "disable-network-policy", "disable-kube-proxy", "disable-cloud-controller",
    "disable-helm-controller", "disable-scheduler", "disable-etcd", "disable-apiserver",
    "disable-controller-manager", "kube-apiserver-arg", "kube-controller-manager-arg", "kube-scheduler-arg",
    "kube-cloud-controller-manager-arg", "etcd-arg", "etcd-expose-metrics", "etcd-disable-snapshots",
    "etcd-snapshot-schedule-cron", "etcd-snapshot-retention", "etcd-snapshot-dir", "etcd-snapshot-compress",
    "etcd-s3", "secrets-encryption", "secrets-encryption-provider", "embedded-registry", "egress-selector-mode",
    "servicelb-namespace", "default-local-storage-path", "agent-token", "agent-token-file", "datastore-endpoint",
    "datastore-cafile", "datastore-certfile", "datastore-keyfile", "tls-san-security", "supervisor-metrics",
    "helm-job-image", "service-node-port-range", "cluster-domain", "kine-tls", "disable-agent",
    "write-kubeconfig-group", "enable-pprof", "service-lb-namespace", "vpn-auth", "vpn-auth-file",
    "kubelet-certificate-authority", "server",
}
AGENT_IGNORED = _COMMON_IGNORED | {"disable-apiserver-lb", "vpn-auth", "vpn-auth-file", "node-external-ip"}

ENV_KEYS = {
    "K3S_TOKEN": "token", "K3S_TOKEN_FILE": "token-file", "K3S_URL": "server", "K3S_NODE_NAME": "node-name",
    "K3S_DATA_DIR": "data-dir", "K3S_KUBECONFIG_OUTPUT": "write-kubeconfig",
    "K3S_KUBECONFIG_MODE": "write-kubeconfig-mode", "K3S_CONFIG_FILE": "config",
}
SHORT_FLAGS = {"c": "config", "d": "data-dir", "i": "node-ip", "t": "token", "s": "server",
               "o": "write-kubeconfig"}


def _as_strings(value: object) -> list[str]:
    """A config value as K3s's flag strings: lists stay lists, scalars become one string."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        out: list[str] = []
        for item in value:
            out.extend(_as_strings(item))
        return out
    if isinstance(value, bool):
        return ["true" if value else "false"]
    return [str(value)]


@dataclass
class RawConfig:
    """Key -> list of string values, in the order K3s would see them as flags."""

    values: dict[str, list[str]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def get(self, key: str, default: str | None = None) -> str | None:
        vals = self.values.get(key)
        return vals[-1] if vals else default

    def get_list(self, key: str) -> list[str]:
        out: list[str] = []
        for val in self.values.get(key, []):
            out.extend(part.strip() for part in val.split(",") if part.strip())
        return out


def _merge(target: dict[str, list[str]], source: Mapping[str, object], keys: Mapping[str, str],
           ignored: set[str], raw: RawConfig) -> None:
    for key, value in source.items():
        append = key.endswith("+")
        name = key[:-1] if append else key
        if name not in keys:
            if name in ignored:
                raw.ignored.append(name)
            else:
                raw.unknown.append(name)
            continue
        vals = _as_strings(value)
        if append and keys[name] == "list":
            target[name] = target.get(name, []) + vals
        elif append:
            target[name] = [(target.get(name, [""])[-1] if target.get(name) else "") + "".join(vals)]
        else:
            target[name] = vals


def read_config_files(path: str, *, explicit: bool) -> list[dict[str, Any]]:
    """The config file and its drop-ins (<file>.d/*.yaml, sorted), each as a mapping of strings."""
    docs: list[dict[str, Any]] = []
    files = [path, *sorted(str(p) for p in Path(path + ".d").glob("*.yaml"))]
    for index, name in enumerate(files):
        try:
            text = Path(name).read_text(encoding="utf-8")
        except FileNotFoundError:
            if index == 0 and explicit:
                raise ConfigError(f"open {name}: no such file or directory") from None
            continue
        except OSError as exc:
            raise ConfigError(f"reading {name}: {exc.strerror}") from exc
        try:
            # BaseLoader keeps every scalar a string, as K3s turns config values into flag strings:
            # write-kubeconfig-mode: 0644 stays "0644".
            doc = yaml.load(text, Loader=yaml.BaseLoader)  # noqa: S506 - BaseLoader builds only str/list/dict
        except yaml.YAMLError as exc:
            raise ConfigError(f"parsing {name}: {exc}") from exc
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ConfigError(f"parsing {name}: the config file must be a mapping of flag names to values")
        docs.append(doc)
    return docs


def parse_args(args: Sequence[str], keys: Mapping[str, str]) -> tuple[dict[str, list[str]], list[str]]:
    """--key value / --key=value / -c value flags; returns (values, unknown flags)."""
    values: dict[str, list[str]] = {}
    unknown: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-") or arg == "-":
            unknown.append(arg)
            continue
        name, sep, val = arg.lstrip("-").partition("=")
        name = SHORT_FLAGS.get(name, name) if not arg.startswith("--") else name
        kind = keys.get(name)
        if kind is None:
            unknown.append(arg)
            continue
        if kind == "bool" and not sep:
            val = "true"
        elif not sep:
            if i >= len(args):
                raise ConfigError(f"flag needs an argument: --{name}")
            val = args[i]
            i += 1
        if kind == "list":
            values.setdefault(name, []).append(val)
        else:
            values[name] = [val]
    return values, unknown


def load(command: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
         overrides: Mapping[str, object] | None = None) -> RawConfig:
    """The effective configuration of `k3s <command>`: env < config files < flags (< overrides)."""
    env = os.environ if env is None else env
    keys = SERVER_KEYS if command == "server" else AGENT_KEYS
    ignored = SERVER_IGNORED if command == "server" else AGENT_IGNORED
    raw = RawConfig()
    flag_values, unknown_flags = parse_args(args, keys)
    if unknown_flags:
        raise ConfigError(f"flag provided but not defined: {unknown_flags[0]}")
    values: dict[str, list[str]] = {}
    for var, key in ENV_KEYS.items():
        if env.get(var) and key in keys:
            values[key] = [env[var]]
    if overrides is None or "config" in flag_values:
        explicit = "config" in flag_values or bool(env.get("K3S_CONFIG_FILE"))
        path = (flag_values.get("config") or values.get("config") or [DEFAULT_CONFIG])[-1]
        for doc in read_config_files(path, explicit=explicit):
            _merge(values, doc, keys, ignored, raw)
    if overrides is not None:
        _merge(values, overrides, keys, ignored, raw)
    values.update(flag_values)
    raw.values = values
    return raw


# --- typed settings --------------------------------------------------------------------------------


def _first_ipv4_net(values: list[str], default: str) -> ipaddress.IPv4Network:
    for val in values or [default]:
        try:
            net = ipaddress.ip_network(val, strict=False)
        except ValueError as exc:
            raise ConfigError(f"invalid CIDR {val!r}: {exc}") from exc
        if isinstance(net, ipaddress.IPv4Network):
            return net
    raise ConfigError(f"no IPv4 CIDR in {values!r}")


def _first_ip(values: list[str]) -> str | None:
    for val in values:
        try:
            return str(ipaddress.ip_address(val))
        except ValueError as exc:
            raise ConfigError(f"invalid IP address {val!r}") from exc
    return None


def _parse_mode(text: str | None, default: int) -> int:
    if text is None or text == "":
        return default
    try:
        return int(text, 8)
    except ValueError as exc:
        raise ConfigError(f"invalid file mode {text!r} for write-kubeconfig-mode") from exc


def parse_labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise ConfigError(f"invalid node-label {item!r}: want key=value")
        labels[key.strip()] = value.strip()
    return labels


def parse_taints(items: list[str]) -> list[dict[str, str]]:
    taints: list[dict[str, str]] = []
    for item in items:
        keyval, sep, effect = item.rpartition(":")
        if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ConfigError(f"invalid node-taint {item!r}: want key[=value]:NoSchedule|PreferNoSchedule|NoExecute")
        key, _, value = keyval.partition("=")
        taint = {"key": key, "effect": effect}
        if value:
            taint["value"] = value
        taints.append(taint)
    return taints


def _read_token(raw: RawConfig, what: str) -> str | None:
    token = raw.get("token")
    token_file = raw.get("token-file")
    if token:
        return token.strip()
    if token_file:
        try:
            text = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"reading {what} token file {token_file}: {exc.strerror}") from exc
        if not text:
            raise ConfigError(f"{what} token file {token_file} is empty")
        return text
    return None


def default_node_ip() -> str:
    """The first non-loopback IPv4 address of this host, without sending a packet; else 127.0.0.1."""
    try:
        import fcntl
        import struct

        for _index, name in socket.if_nameindex():
            if name == "lo":
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                try:
                    packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
                except OSError:
                    continue
                return socket.inet_ntoa(packed[20:24])
    except (ImportError, OSError):
        pass
    return "127.0.0.1"


@dataclass
class ServerSettings:
    data_dir: Path
    token: str | None
    cluster_cidr: ipaddress.IPv4Network
    service_cidr: ipaddress.IPv4Network
    cluster_dns: str
    cluster_domain: str
    node_ip: str
    node_external_ip: str | None
    node_name: str
    node_labels: dict[str, str]
    node_taints: list[dict[str, str]]
    tls_sans: list[str]
    disable: list[str]
    write_kubeconfig: Path
    write_kubeconfig_mode: int
    bind_address: str
    port: int
    advertise_address: str
    advertise_port: int
    debug: bool
    node_args: list[str]

    @property
    def first_service_ip(self) -> str:
        return str(self.service_cidr.network_address + 1)


@dataclass
class AgentSettings:
    server: str
    token: str
    data_dir: Path
    node_ip: str
    node_external_ip: str | None
    node_name: str
    node_labels: dict[str, str]
    node_taints: list[dict[str, str]]
    debug: bool
    node_args: list[str]


def node_args(command: str, raw: RawConfig) -> list[str]:
    """K3s's k3s.io/node-args annotation: the effective flags, secrets shown as ********."""
    args = [command]
    for key in sorted(raw.values):
        if key == "config":
            continue
        for val in raw.values[key]:
            args += [f"--{key}", "********" if key in ("token", "agent-token") else val]
    return args


def server_settings(raw: RawConfig) -> ServerSettings:
    data_dir = Path(raw.get("data-dir") or DEFAULT_DATA_DIR)
    service_cidr = _first_ipv4_net(raw.get_list("service-cidr"), "10.43.0.0/16")
    cluster_dns = _first_ip(raw.get_list("cluster-dns")) or str(service_cidr.network_address + 10)
    node_ip = _first_ip(raw.get_list("node-ip")) or default_node_ip()
    port_text = raw.get("https-listen-port") or "6443"
    try:
        port = int(port_text)
    except ValueError as exc:
        raise ConfigError(f"invalid https-listen-port {port_text!r}") from exc
    adv_port_text = raw.get("advertise-port")
    advertise_port = int(adv_port_text) if adv_port_text else port
    return ServerSettings(
        data_dir=data_dir,
        token=_read_token(raw, "server"),
        cluster_cidr=_first_ipv4_net(raw.get_list("cluster-cidr"), "10.42.0.0/16"),
        service_cidr=service_cidr,
        cluster_dns=cluster_dns,
        cluster_domain=raw.get("cluster-domain") or "cluster.local",
        node_ip=node_ip,
        node_external_ip=_first_ip(raw.get_list("node-external-ip")),
        node_name=(raw.get("node-name") or socket.gethostname()).lower(),
        node_labels=parse_labels(raw.get_list("node-label")),
        node_taints=parse_taints(raw.get_list("node-taint")),
        tls_sans=raw.get_list("tls-san"),
        disable=raw.get_list("disable"),
        write_kubeconfig=Path(raw.get("write-kubeconfig") or DEFAULT_KUBECONFIG),
        write_kubeconfig_mode=_parse_mode(raw.get("write-kubeconfig-mode"), 0o600),
        bind_address=raw.get("bind-address") or "0.0.0.0",  # noqa: S104 - K3s listens on all addresses
        port=port,
        advertise_address=_first_ip([raw.get("advertise-address") or ""] if raw.get("advertise-address") else [])
        or node_ip,
        advertise_port=advertise_port,
        debug=(raw.get("debug") or "false").lower() == "true",
        node_args=node_args("server", raw),
    )


def agent_settings(raw: RawConfig) -> AgentSettings:
    server = raw.get("server")
    if not server:
        raise ConfigError("--server is required (config key server, or K3S_URL)")
    if not server.startswith("https://"):
        raise ConfigError(f"server {server!r} must be an https:// URL")
    token = _read_token(raw, "agent")
    if not token:
        raise ConfigError("--token is required (config key token or token-file, or K3S_TOKEN/K3S_TOKEN_FILE)")
    return AgentSettings(
        server=server.rstrip("/"),
        token=token,
        data_dir=Path(raw.get("data-dir") or DEFAULT_DATA_DIR),
        node_ip=_first_ip(raw.get_list("node-ip")) or default_node_ip(),
        node_external_ip=_first_ip(raw.get_list("node-external-ip")),
        node_name=(raw.get("node-name") or socket.gethostname()).lower(),
        node_labels=parse_labels(raw.get_list("node-label")),
        node_taints=parse_taints(raw.get_list("node-taint")),
        debug=(raw.get("debug") or "false").lower() == "true",
        node_args=node_args("agent", raw),
    )

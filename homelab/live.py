"""The live suite's engine: `invoke test.live`, its report, and the plain functions its checks judge with.

The checks themselves live in tests/live/ (the catalogue is tests/live/CHECKS.md); this module holds
what they share and what can be tested offline:

- the task: which target, refused under CI, the lab's namespace joined, pytest run in-process;
- the report: one line per check, grouped by layer, with the value each check measured;
- probes that only read: DNS through a chosen resolver, TLS and HTTPS to an address with the
  app's name for SNI, the certificate's issuer, names and days left;
- judgements over what the cluster's API answers (HelmCharts, workloads, Argo CD Applications).

Every failure message says what was expected, what was found, and where to look.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import os
import socket
import ssl
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from homelab.errors import ConfigError, HomelabError

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "tests" / "live"
DEFAULT_REPORT = Path("reports/live.md")
DEFAULT_JUNIT = Path("reports/live.xml")
TARGETS = ("lab", "live")

# The layers, as pytest markers, in the order the report lists them.
MARKERS: Mapping[str, str] = {
    "proxmox": "Proxmox VE: nodes online, quorum, Ceph health, the pool and its storage, the SDN",
    "vms": "the K3s VMs in PVE: placement, power, guest agent address, cores and memory",
    "nodes": "the VMs over SSH (testinfra): hostname, address, k3s units, ports, swap, time, secret files",
    "k3s": "the cluster's API: nodes, pod CIDRs, the kubernetes Service, HelmCharts, Argo CD apps",
    "network": "MetalLB's pool and the LoadBalancer addresses of Traefik and the internal DNS",
    "storage": "the default StorageClass and every PersistentVolumeClaim",
    "tls": "the certificate served for each app name: issuer, names, days left",
    "dns": "public names in the public view, internal names only in the tailnet's view",
    "access": "Cloudflare Tunnel and Tailscale, read through their APIs",
    "monitoring": "the monitoring stack's apps: health and workloads",
    "apps": "the apps: health through their own access path, workloads Available",
}

# A certificate needs at least this many days left (Let's Encrypt renews at 30 of 90).
MIN_DAYS_LEFT = 14
# Each app's health endpoint (tests/live/CHECKS.md).
HEALTH: Mapping[str, str] = {"vaultwarden": "/alive", "homepage": "/", "grafana": "/api/health",
                             "argocd": "/healthz", "vault": "/v1/sys/health"}
# Apps that a chart of another component makes (kube-prometheus-stack brings Prometheus, Alertmanager and
# Grafana); every other app with workloads is a component of its own (manifests.COMPONENTS) or a chart's name.
BUNDLED: Mapping[str, str] = {"prometheus": "kube-prometheus-stack", "alertmanager": "kube-prometheus-stack",
                              "grafana": "kube-prometheus-stack"}
# Cloudflare's edge (https://www.cloudflare.com/ips-v4/, unchanged since 2023): proxied names resolve here.
CLOUDFLARE_IPV4 = ("173.245.48.0/20", "103.21.244.0/22", "103.22.200.0/22", "103.31.4.0/22", "141.101.64.0/18",
                   "108.162.192.0/18", "190.93.240.0/20", "188.114.96.0/20", "197.234.240.0/22", "198.41.128.0/17",
                   "162.158.0.0/15", "104.16.0.0/13", "104.24.0.0/14", "172.64.0.0/13", "131.0.72.0/22")


# ------------------------------------------------------------------------------------ the task


def choose_target(flag: str | None, environ: Mapping[str, str] | None = None) -> str:
    """--target, else HOMELAB_TARGET, else lab; `live` is refused when CI is set (exit code 2)."""
    env = os.environ if environ is None else environ
    name = flag or env.get("HOMELAB_TARGET") or "lab"
    if name not in TARGETS:
        raise ConfigError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    if name == "live" and env.get("CI"):
        raise ConfigError("the live suite against the live target checks a real homelab and refuses to run when "
                          "CI is set", hint="CI runs the lab target only: invoke test.live --target lab")
    return name


def remainder(argv: Sequence[str]) -> list[str]:
    """The arguments after the first `--` (invoke keeps them for the task: extra pytest options)."""
    return list(argv[list(argv).index("--") + 1:]) if "--" in argv else []


def pytest_args(*, target: str, inventory: str | None = None, marker: str | None = None, k: str | None = None,
                junitxml: str | Path | None = None, report: str | Path | None = None,
                extra: Sequence[str] = ()) -> list[str]:
    """pytest's argv for the suite: always JUnit XML and the Markdown report, no cache written."""
    args = [str(SUITE), "--rootdir", str(REPO), "-p", "no:cacheprovider", "-o", "junit_suite_name=homelab-live",
            f"--junitxml={_path(junitxml, DEFAULT_JUNIT)}", f"--live-report={_path(report, DEFAULT_REPORT)}",
            f"--live-target={target}"]
    if inventory:
        args.append(f"--live-inventory={Path(inventory).resolve()}")
    if marker:
        args += ["-m", marker]
    if k:
        args += ["-k", k]
    return args + list(extra)


def _path(value: str | Path | None, default: Path) -> Path:
    """A path given on the command line is relative to the working directory; the defaults to the repository."""
    return Path(value).resolve() if value else REPO / default


def main(target_flag: str | None, *, inventory: str | None = None, marker: str | None = None, k: str | None = None,
         junitxml: str | None = None, report: str | None = None, extra: Sequence[str] = (),
         argv: Sequence[str] | None = None) -> int:
    """What `invoke test.live` does: choose the target, join the lab's namespace, run pytest; pytest's exit code."""
    target = choose_target(target_flag)
    try:
        import pytest
    except ImportError:
        raise ConfigError("the live suite needs pytest and testinfra", hint="pip install --group test .") from None
    if target == "lab":
        from homelab.lab import control

        # Before pytest starts any thread: setns(2) moves this very process (or invoke is re-run inside).
        control.enter(list(sys.argv[1:] if argv is None else argv))
    return int(pytest.main(pytest_args(target=target, inventory=inventory, marker=marker, k=k, junitxml=junitxml,
                                       report=report, extra=extra)))


def join_lab() -> None:
    """Move this process into the lab's namespace (pytest run directly, not through invoke); raise if it cannot."""
    import threading

    from homelab.lab import control, layout, netns

    if netns.inside(layout.NETNS):
        return
    if not control.running():
        raise ConfigError("the lab is not running", hint="start it with `invoke lab.up`")
    if os.geteuid() != 0:
        raise ConfigError("the lab target needs root: its addresses exist only in the lab's network namespace")
    if threading.active_count() != 1 or not netns.setns(layout.NETNS):
        raise ConfigError(f"cannot join the lab's namespace {layout.NETNS} from this process",
                          hint="run `invoke test.live --target lab`")


# ------------------------------------------------------------------------------------ messages


def mismatch(subject: str, found: object, expected: object, where: str, source: str = "the inventory says") -> str:
    """`<subject> is <found>, <source> <expected>; see <where>`: what was found, what was expected, where to look."""
    return f"{subject} is {_shown(found)}, {source} {_shown(expected)}; see {where}"


def _shown(value: object) -> str:
    if value is None or value in ("", []):
        return "(none)"
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else list(value)
        return ", ".join(str(v) for v in items)
    return str(value)


def listing(items: Iterable[object], limit: int = 8) -> str:
    """Up to `limit` items, then how many more."""
    values = [str(v) for v in items]
    shown = ", ".join(values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


# -------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Record:
    """One check's outcome: passed, failed, error (its setup failed) or skipped."""

    nodeid: str
    layer: str
    outcome: str
    measured: str = ""
    message: str = ""
    seconds: float = 0.0

    @property
    def check(self) -> str:
        """The node id without the directory: `test_vms.py::test_vm_running_on_its_node[naruto]`."""
        return self.nodeid.rpartition("tests/live/")[2] or self.nodeid

    @property
    def result(self) -> str:
        return {"passed": "pass", "failed": "FAIL", "error": "ERROR", "skipped": "skip"}.get(self.outcome,
                                                                                            self.outcome)


def layer_of(markers: Iterable[str]) -> str:
    """The layer of a check: its first marker that names a layer (`?` when none does)."""
    return next((m for m in markers if m in MARKERS), "?")


def tally(records: Iterable[Record]) -> dict[str, Counter[str]]:
    """Outcomes per layer, layers in MARKERS order; an error counts as failed."""
    out: dict[str, Counter[str]] = {}
    for record in sorted(records, key=_order):
        outcome = "failed" if record.outcome == "error" else record.outcome
        out.setdefault(record.layer, Counter())[outcome] += 1
    return out


def _order(record: Record) -> int:
    layers = list(MARKERS)
    return layers.index(record.layer) if record.layer in layers else len(layers)


def summary(records: Sequence[Record]) -> list[str]:
    """Counts for the terminal: the whole run, then one line per layer."""
    totals: Counter[str] = Counter()
    per_layer = tally(records)
    for counts in per_layer.values():
        totals.update(counts)
    lines = [f"live suite: {len(records)} checks, {totals['passed']} passed, {totals['failed']} failed, "
             f"{totals['skipped']} skipped"]
    for layer, counts in per_layer.items():
        lines.append(f"  {layer:<11} passed={counts['passed']:<3} failed={counts['failed']:<3} "
                     f"skipped={counts['skipped']}")
    return lines


def _cell(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    line = line if len(line) <= limit else line[:limit - 3] + "..."
    return line.replace("|", "\\|")


def render_report(records: Sequence[Record], *, target: str, seconds: float, started: datetime.datetime,
                  inventory: str = "") -> str:
    """The Markdown report: a header with counts, one table line per check grouped by layer, then the failures."""
    ordered = sorted(records, key=lambda r: (_order(r), r.nodeid))
    totals: Counter[str] = Counter()
    for counts in tally(records).values():
        totals.update(counts)
    lines = ["# Live suite", "",
             f"Target **{target}**" + (f", inventory `{inventory}`" if inventory else "")
             + f", started {started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()}, {seconds:.1f} s.", "",
             f"**{len(records)} checks: {totals['passed']} passed, {totals['failed']} failed, "
             f"{totals['skipped']} skipped.**", "",
             "| layer | passed | failed | skipped |", "|---|---|---|---|"]
    for layer, counts in tally(records).items():
        lines.append(f"| {layer} | {counts['passed']} | {counts['failed']} | {counts['skipped']} |")
    lines += ["", "| layer | check | measured | result |", "|---|---|---|---|"]
    for record in ordered:
        result = record.result
        if record.outcome != "passed" and record.message:
            result += ": " + record.message.strip().splitlines()[0]
        lines.append(f"| {record.layer} | {_cell(record.check)} | {_cell(record.measured or '-')} | "
                     f"{_cell(result, 240)} |")
    failed = [r for r in ordered if r.outcome in ("failed", "error")]
    if failed:
        lines += ["", "## Failures", ""]
        for record in failed:
            lines += [f"### {record.check}", "", "```", record.message.strip() or "(no message)", "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------- DNS


@dataclass(frozen=True)
class Answer:
    """What a resolver said about a name's A records: addresses, or why there are none."""

    name: str
    server: str
    addresses: tuple[str, ...] = ()
    # None, or NXDOMAIN, NoAnswer, SERVFAIL, timeout, ...
    error: str | None = None

    def __str__(self) -> str:
        return ", ".join(self.addresses) if self.addresses else (self.error or "no address")

    @property
    def absent(self) -> bool:
        """The resolver says the name has no A record at all (not: it could not tell)."""
        return not self.addresses and self.error in ("NXDOMAIN", "NoAnswer")


def resolve(name: str, server: str, timeout: float = 5.0) -> Answer:
    """A records of `name` asked of `server` only (no search list, no system resolver)."""
    import dns.exception
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [server]
    resolver.lifetime = timeout
    try:
        answer = resolver.resolve(name, "A", search=False)
    except dns.resolver.NXDOMAIN:
        return Answer(name, server, error="NXDOMAIN")
    except dns.resolver.NoAnswer:
        return Answer(name, server, error="NoAnswer")
    except dns.resolver.NoNameservers:
        return Answer(name, server, error="SERVFAIL")
    except dns.exception.Timeout:
        return Answer(name, server, error=f"timeout ({server} did not answer in {timeout:.0f} s)")
    except dns.exception.DNSException as exc:
        return Answer(name, server, error=type(exc).__name__)
    return Answer(name, server, tuple(sorted(rr.to_text() for rr in answer)))


def edge_networks(target: str) -> list[ipaddress.IPv4Network]:
    """Where proxied public names resolve: Cloudflare's edge (live), the lab's edge double (lab)."""
    if target == "lab":
        from homelab.lab.control import EDGE_ADDRESS

        return [ipaddress.IPv4Network(f"{EDGE_ADDRESS}/32")]
    return [ipaddress.IPv4Network(n) for n in CLOUDFLARE_IPV4]


def outside_edge(addresses: Iterable[str], networks: Sequence[ipaddress.IPv4Network]) -> list[str]:
    """The addresses that are not in the edge's networks."""
    return [a for a in addresses if not any(ipaddress.ip_address(a) in n for n in networks)]


# ------------------------------------------------------------------------------- TLS and HTTPS


@dataclass(frozen=True)
class Certificate:
    """The parts of a leaf certificate the checks judge."""

    subject: str
    issuer: str
    issuer_cn: str
    issuer_org: str
    names: tuple[str, ...]
    not_after: datetime.datetime

    def days_left(self, now: datetime.datetime | None = None) -> int:
        now = now or datetime.datetime.now(datetime.UTC)
        return (self.not_after - now).days

    def covers(self, hostname: str) -> bool:
        return any(name_matches(pattern, hostname) for pattern in self.names)


def parse_certificate(der: bytes) -> Certificate:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)

    def attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
        found = name.get_attributes_for_oid(oid)
        return str(found[0].value) if found else ""

    try:
        sans = tuple(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                     .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        sans = ()
    return Certificate(subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
                       issuer_cn=attr(cert.issuer, NameOID.COMMON_NAME),
                       issuer_org=attr(cert.issuer, NameOID.ORGANIZATION_NAME), names=sans,
                       not_after=cert.not_valid_after_utc)


def name_matches(pattern: str, hostname: str) -> bool:
    """RFC 6125: exact, or a wildcard standing for exactly one leftmost label."""
    pattern, hostname = pattern.lower().rstrip("."), hostname.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = hostname.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == hostname


def issuer_problem(cert: Certificate, target: str, issuer: str) -> str | None:
    """Why the certificate does not come from the expected issuer, or None.

    live: Let's Encrypt production whatever the inventory says (staging is for trying things out);
    lab: the k3s stand-in's CA for the inventory's issuer (its CN names the issuer; a staging CA says STAGING).
    """
    staging = "STAGING" in cert.issuer.upper()
    if target == "live":
        if issuer != "letsencrypt-production":
            return (f"the inventory's network.cert_issuer is {issuer}; the live target needs Let's Encrypt "
                    "production")
        if "let's encrypt" not in cert.issuer_org.lower() or staging:
            return f"issued by {cert.issuer}, not by Let's Encrypt production"
        return None
    if issuer not in cert.issuer_cn or staging != ("staging" in issuer):
        return f"issued by {cert.issuer}, not by the lab's CA for {issuer}"
    return None


def expected_issuer(target: str, issuer: str) -> str:
    return "Let's Encrypt production" if target == "live" else f"the lab's CA for {issuer}"


def context(trust: str | bool | None = True, *, cadata: str | None = None) -> ssl.SSLContext:
    """A verifying client context: a CA file, PEM text, or (True) the system's roots."""
    if cadata is not None:
        return ssl.create_default_context(cadata=cadata)
    if isinstance(trust, str):
        return ssl.create_default_context(cafile=trust)
    return ssl.create_default_context()


def unverified() -> ssl.SSLContext:
    """Only to read what a server presents (so a failure can say what it was); never to trust it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(frozen=True)
class Reply:
    """An HTTPS exchange with `address` for `hostname`: the status and the start of the body, or the error."""

    address: str
    hostname: str
    status: int | None = None
    body: str = ""
    error: str | None = None
    certificate: bytes | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"HTTP {self.status}" if self.status is not None else f"no answer ({self.error})"


def https_get(address: str, hostname: str, path: str, ctx: ssl.SSLContext, timeout: float = 10.0,
              port: int = 443) -> Reply:
    """GET https://<hostname><path> from `address`: SNI and Host are the name; the context decides trust."""
    try:
        raw = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        return Reply(address, hostname, error=f"cannot connect to {address}:{port}: {exc.strerror or exc}")
    try:
        sock = ctx.wrap_socket(raw, server_hostname=hostname)
    except ssl.SSLCertVerificationError as exc:
        raw.close()
        return Reply(address, hostname, error=f"TLS: {exc.verify_message or exc.reason}")
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        return Reply(address, hostname, error=f"TLS: {exc}")
    der = sock.getpeercert(binary_form=True)
    conn = http.client.HTTPSConnection(hostname, port, context=ctx, timeout=timeout)
    conn.sock = sock
    try:
        conn.request("GET", path, headers={"Host": hostname, "User-Agent": "homelab-live-suite"})
        response = conn.getresponse()
        body = response.read(4096).decode("utf-8", "replace")
        return Reply(address, hostname, status=response.status, body=body, certificate=der)
    except (OSError, http.client.HTTPException) as exc:
        return Reply(address, hostname, error=f"HTTP: {exc}", certificate=der)
    finally:
        conn.close()


def presented(address: str, hostname: str, timeout: float = 10.0, port: int = 443) -> bytes | str:
    """The leaf certificate `address` presents for SNI `hostname` (DER), or why none could be read."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as raw, \
                unverified().wrap_socket(raw, server_hostname=hostname) as sock:
            der = sock.getpeercert(binary_form=True)
    except (ssl.SSLError, OSError) as exc:
        return f"no TLS answer from {address}:{port} for {hostname}: {exc}"
    return der if der else f"{address}:{port} presented no certificate for {hostname}"


def verify(address: str, hostname: str, ctx: ssl.SSLContext, timeout: float = 10.0, port: int = 443) -> str | None:
    """None when the chain verifies against `ctx` and covers the name; else the verifier's words."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=hostname):
            return None
    except ssl.SSLCertVerificationError as exc:
        return str(exc.verify_message or exc.reason)
    except (ssl.SSLError, OSError) as exc:
        return str(exc)


# ------------------------------------------------------------------------- cluster judgements


def condition(obj: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(cond, Mapping) and cond.get("type") == kind:
            return cond
    return None


def helmchart_problems(chart: Mapping[str, Any] | None, job: Mapping[str, Any] | None,
                       desired: Mapping[str, Any]) -> list[str]:
    """Why a HelmChart is not installed as the manifests declare: absent, another chart or version, a Failed
    condition, or its install Job (helm-install-<name>) missing, failed or not complete."""
    name = desired["metadata"]["name"]
    if chart is None:
        return [f"HelmChart {name} does not exist"]
    problems = []
    spec, want = chart.get("spec") or {}, desired.get("spec") or {}
    for key in ("chart", "version", "repo", "targetNamespace"):
        if want.get(key) is not None and str(spec.get(key)) != str(want[key]):
            problems.append(f"spec.{key} is {spec.get(key)!r}, the manifests say {want[key]!r}")
    failed = condition(chart, "Failed")
    if failed is not None and failed.get("status") == "True":
        problems.append(f"condition Failed: {failed.get('message') or failed.get('reason') or 'True'}")
    job_name = (chart.get("status") or {}).get("jobName") or f"helm-install-{name}"
    if job is None:
        problems.append(f"its install Job {job_name} does not exist")
    else:
        status = job.get("status") or {}
        job_failed = condition(job, "Failed")
        if job_failed is not None and job_failed.get("status") == "True":
            problems.append(f"install Job {job_name} failed: {job_failed.get('message') or job_failed.get('reason')}")
        elif not status.get("succeeded"):
            problems.append(f"install Job {job_name} has not completed (active {status.get('active', 0)}, "
                            f"failed {status.get('failed', 0)})")
    return problems


def workload_state(obj: Mapping[str, Any]) -> tuple[bool, str]:
    """(ready, "Deployment ns/name 2/2 available") for a Deployment, StatefulSet or DaemonSet."""
    kind, meta = obj.get("kind", "?"), obj.get("metadata") or {}
    label = f"{kind} {meta.get('namespace')}/{meta.get('name')}"
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    if kind == "DaemonSet":
        want, have = int(status.get("desiredNumberScheduled") or 0), int(status.get("numberReady") or 0)
        return want > 0 and have >= want, f"{label} {have}/{want} ready"
    want = int(spec.get("replicas", 1) if spec.get("replicas") is not None else 1)
    if kind == "StatefulSet":
        have = int(status.get("readyReplicas") or 0)
        return want > 0 and have >= want, f"{label} {have}/{want} ready"
    have = int(status.get("availableReplicas") or 0)
    available = condition(obj, "Available")
    ok = want > 0 and have >= want and (available is None or available.get("status") == "True")
    return ok, f"{label} {have}/{want} available" + ("" if want else " (scaled to 0)")


def application_problems(app: Mapping[str, Any]) -> list[str]:
    """Why an Argo CD Application is not Synced and Healthy (its own status words)."""
    status = app.get("status") or {}
    sync = (status.get("sync") or {}).get("status")
    health = (status.get("health") or {}).get("status")
    meta = app.get("metadata") or {}
    name = f"{meta.get('namespace')}/{meta.get('name')}"
    problems = []
    if sync != "Synced":
        problems.append(f"Application {name} sync status is {sync or '(not set)'}, expected Synced")
    if health != "Healthy":
        message = (status.get("health") or {}).get("message")
        problems.append(f"Application {name} health is {health or '(not set)'}, expected Healthy"
                        + (f" ({message})" if message else ""))
    return problems


INSTANCE = "app.kubernetes.io/instance"
NAME = "app.kubernetes.io/name"


def app_workloads(app: str, namespace: str, release: str | None, declared: Iterable[tuple[str, str]],
                  workloads: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[str]]:
    """(the app's workloads found in its namespace, the declared ones missing).

    declared: (kind, name) of the Deployments/StatefulSets the manifests declare for the app. A chart's
    workloads carry `app.kubernetes.io/instance` = the release (Traefik's chart: release-namespace); an app
    that shares its release with others (BUNDLED) is picked by `app.kubernetes.io/name` where the chart
    labels it so, else the whole release stands for it.
    """
    here = [w for w in workloads if (w.get("metadata") or {}).get("namespace") == namespace]

    def labels(w: Mapping[str, Any]) -> Mapping[str, str]:
        return (w.get("metadata") or {}).get("labels") or {}

    def ident(w: Mapping[str, Any]) -> tuple[str, str]:
        return str(w.get("kind")), str((w.get("metadata") or {}).get("name"))

    wanted = list(declared)
    chosen = [w for w in here if ident(w) in wanted]
    missing = [f"{kind} {namespace}/{name}" for kind, name in wanted if (kind, name) not in {ident(w) for w in here}]
    if release:
        by_release = [w for w in here if labels(w).get(INSTANCE) in (release, f"{release}-{namespace}")]
        by_name = [w for w in here if labels(w).get(NAME) == app]
        if app in BUNDLED:
            # The release stands for the app only where its chart names none of its parts (the lab's double);
            # where the chart labels its parts, the app's own workloads must be there.
            named = any(labels(w).get(NAME) in BUNDLED for w in by_release)
            picked = by_name if named else (by_name or by_release)
            if named and not by_name:
                missing.append(f"a workload labelled {NAME}={app} in {namespace} (release {release})")
        else:
            picked = by_release + by_name
        for w in picked:
            if ident(w) not in {ident(c) for c in chosen}:
                chosen.append(w)
    return chosen, missing


def describe_error(exc: BaseException) -> str:
    """A client's failure in one readable line (domain errors carry their hint)."""
    if isinstance(exc, HomelabError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"

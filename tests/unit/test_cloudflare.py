"""The Cloudflare client against LabCloudflare over HTTPS on 127.0.0.1: token checks, zones, tunnels, DNS records."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from homelab.clients.cloudflare import (
    Cloudflare,
    CloudflareAuthError,
    CloudflareConflict,
    CloudflareError,
    CloudflareNotFound,
    TokenPermissionsMissing,
    ingress_config,
    owned,
    tunnel_cname,
    tunnel_target,
)
from homelab.errors import ConfigError
from homelab.lab import pki
from homelab.lab.cloudflare import LabCloudflare, decode_tunnel_token
from homelab.lab.serving import Background

HOST = "127.0.0.1"
EDGE = "198.51.100.7"
ZONE = "jigga.xyz"
FULL = ("Zone Read", "DNS Write", "Cloudflare Tunnel Write")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ssl.SSLContext]:
    directory = tmp_path_factory.mktemp("cf-pki")
    ca_pem, ca_key = pki.make_ca(directory)
    cert, key = pki.issue(ca_pem, ca_key, directory, "api", [HOST])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return str(ca_pem), ctx


@pytest.fixture(scope="module")
def loop() -> Iterator[Background]:
    background = Background("cf-test-loop")
    yield background
    background.close()


@dataclass
class Lab:
    api: LabCloudflare
    ca: str
    account: str
    published: dict[str, dict[str, dict[str, list[str]]]]

    def client(self, token: str, **kwargs: object) -> Cloudflare:
        return Cloudflare(token, base_url=self.api.url, ca_bundle=self.ca, **kwargs)  # type: ignore[arg-type]

    def token(self, name: str, permissions: tuple[str, ...], **kwargs: object) -> str:
        value = f"{name}-{'x' * 40}"
        self.api.add_token(value, permissions, **kwargs)  # type: ignore[arg-type]
        return value


@pytest.fixture
def lab(tls: tuple[str, ssl.SSLContext], loop: Background) -> Iterator[Lab]:
    published: dict[str, dict[str, dict[str, list[str]]]] = {}
    api = LabCloudflare([EDGE], on_dns=published.__setitem__)
    account = api.add_account("homelab")
    api.add_zone(ZONE, account)
    api.add_zone("other.example", account)
    loop.run(api.start(HOST, 0, tls[1]))
    try:
        yield Lab(api, tls[0], account, published)
    finally:
        loop.run(api.stop())


# ----------------------------------------------------------------------------------------- tokens

def test_token_that_reads_its_own_policies_passes(lab: Lab) -> None:
    with lab.client(lab.token("full", (*FULL, "API Tokens Read"), zones=[ZONE])) as cf:
        check = cf.require(ZONE, lab.account)
    assert check.ok and check.source == "token policies" and check.unverified == ()
    assert check.zone is not None and check.zone["name"] == ZONE and check.owner == "user"


def test_token_without_self_read_uses_the_zone_permissions(lab: Lab) -> None:
    with lab.client(lab.token("plain", FULL)) as cf:
        check = cf.check_token(ZONE, lab.account)
    assert check.ok and check.source == "zone permissions and reads"
    assert check.unverified == (f"Account Cloudflare Tunnel Edit (account {lab.account})",)


@pytest.mark.parametrize("self_read", [False, True], ids=["zone-permissions", "token-policies"])
def test_missing_dns_edit_is_found_before_any_write(lab: Lab, self_read: bool) -> None:
    groups = ("Zone Read", "DNS Read", "Cloudflare Tunnel Write", *(("API Tokens Read",) if self_read else ()))
    with lab.client(lab.token("nodns", groups)) as cf:
        check = cf.check_token(ZONE, lab.account)
        assert check.missing == (f"Zone DNS Edit (zone {ZONE})",)
        with pytest.raises(TokenPermissionsMissing) as raised:
            cf.require(ZONE, lab.account)
        assert cf.calls_by_method.keys() == {"GET"}
    assert "Zone DNS Edit (zone jigga.xyz)" in str(raised.value)
    assert raised.value.exit_code == 2
    assert lab.api.writes == 0


def test_missing_tunnel_and_zone_permissions_are_named(lab: Lab) -> None:
    with lab.client(lab.token("dnsonly", ("DNS Write",), zones=["other.example"])) as cf:
        check = cf.check_token(ZONE, lab.account)
    assert check.zone is None
    assert check.missing == (f"Zone Zone Read (zone {ZONE})", f"Zone DNS Edit (zone {ZONE})",
                             f"Account Cloudflare Tunnel Read (account {lab.account})",
                             f"Account Cloudflare Tunnel Edit (account {lab.account})")


def test_account_owned_token_is_verified_on_the_account(lab: Lab) -> None:
    token = lab.token("acct", FULL, account_owned=lab.account)
    with lab.client(token) as cf:
        check = cf.check_token(ZONE, lab.account)
    assert check.owner == "account" and check.ok


def test_invalid_or_disabled_token_is_refused_without_showing_it(lab: Lab) -> None:
    secret = "not-a-known-token-" + "y" * 30
    cf = lab.client(secret)
    with pytest.raises(CloudflareAuthError) as raised:
        cf.check_token(ZONE, lab.account)
    assert raised.value.status == 401 and raised.value.codes == (1000,)
    assert secret not in str(raised.value) and secret not in repr(cf) and secret not in repr(raised.value)
    disabled = lab.token("off", FULL, status="disabled")
    with lab.client(disabled) as off, pytest.raises(CloudflareAuthError, match="disabled"):
        off.check_token(ZONE, lab.account)


def test_tls_verification_cannot_be_turned_off(lab: Lab) -> None:
    with pytest.raises(ConfigError):
        Cloudflare("t" * 40, base_url=lab.api.url, ca_bundle=False)
    with pytest.raises(CloudflareError, match="TLS verification"):
        Cloudflare(lab.token("tls", FULL), base_url=lab.api.url, read_attempts=1).find_zone(ZONE)


# ------------------------------------------------------------------------------------------ zones

def test_zone_lookup(lab: Lab) -> None:
    with lab.client(lab.token("zones", FULL)) as cf:
        zone = cf.zone(ZONE, lab.account)
        assert zone["name"] == ZONE and zone["account"]["id"] == lab.account
        assert "#dns_records:edit" in (cf.permissions(zone) or [])
        assert cf.permissions(ZONE) == ["#dns_records:edit", "#dns_records:read", "#zone:read"]
        assert cf.find_zone("nope.example") is None
        with pytest.raises(CloudflareNotFound, match="not visible"):
            cf.zone("nope.example")


def test_forbidden_answers_have_cloudflares_shape(lab: Lab) -> None:
    with lab.client(lab.token("ro", ("Zone Read",))) as cf:
        zone = cf.zone(ZONE)
        with pytest.raises(CloudflareAuthError) as raised:
            cf.create_dns_record(zone["id"], {"type": "A", "name": "x", "content": "192.0.2.1"})
    assert raised.value.status == 403 and raised.value.codes == (10000,)
    assert "Authentication error (10000)" in str(raised.value)


# ---------------------------------------------------------------------------------------- tunnels

def test_tunnel_lifecycle(lab: Lab) -> None:
    with lab.client(lab.token("tun", FULL)) as cf:
        assert cf.find_tunnel(lab.account, "homelab") is None
        made = cf.create_tunnel(lab.account, "homelab")
        tunnel_id = made["id"]
        assert made["remote_config"] is True and made["status"] == "inactive"
        with pytest.raises(CloudflareConflict) as taken:
            cf.create_tunnel(lab.account, "homelab")
        assert taken.value.codes == (1013,)
        assert cf.find_tunnel(lab.account, "homelab")["id"] == tunnel_id  # type: ignore[index]

        token = cf.tunnel_token(lab.account, tunnel_id)
        account_tag, decoded_id, secret = decode_tunnel_token(token)
        raw = json.loads(base64.b64decode(token))
        assert set(raw) == {"a", "s", "t"} and (account_tag, decoded_id) == (lab.account, tunnel_id)
        assert len(secret) >= 32

        config = ingress_config({"app.jigga.xyz": "https://traefik.kube-system.svc.cluster.local:443"})
        put = cf.put_tunnel_configuration(lab.account, tunnel_id, config)
        assert put["version"] == 1 and put["config"]["ingress"][-1] == {"service": "http_status:404"}
        assert put["config"]["ingress"][0]["originRequest"] == {"originServerName": "app.jigga.xyz"}
        assert cf.tunnel_configuration(lab.account, tunnel_id)["config"] == config
        with pytest.raises(CloudflareError, match="last ingress rule"):
            cf.put_tunnel_configuration(lab.account, tunnel_id, {"ingress": [{"hostname": "a.jigga.xyz",
                                                                              "service": "http://x:80"}]})

        tunnel = lab.api.tunnels[tunnel_id]
        lab.api.attach(tunnel, "client-1", "192.0.2.9", "test", "linux_amd64")
        assert cf.tunnel(lab.account, tunnel_id)["status"] == "healthy"
        assert [c["id"] for c in cf.tunnel_connections(lab.account, tunnel_id)] == ["client-1"]
        with pytest.raises(CloudflareError) as busy:
            cf.delete_tunnel(lab.account, tunnel_id)
        assert busy.value.codes == (1022,)
        cf.clean_tunnel_connections(lab.account, tunnel_id)
        assert cf.tunnel_connections(lab.account, tunnel_id) == []
        assert cf.delete_tunnel(lab.account, tunnel_id)["deleted_at"]
        assert cf.find_tunnel(lab.account, "homelab") is None
        assert [t["id"] for t in cf.tunnels(lab.account, include_deleted=True)] == [tunnel_id]


# ------------------------------------------------------------------------------------ DNS records

def test_dns_records_owned_by_comment(lab: Lab) -> None:
    tunnel_id = "6f9e1c1e-3d5f-4d5b-9d0e-8b8b1f0c2a11"
    with lab.client(lab.token("dns", FULL)) as cf:
        zone_id = cf.zone(ZONE)["id"]
        theirs = cf.create_dns_record(zone_id, {"type": "TXT", "name": "@", "content": "v=spf1 -all"})
        mail = cf.create_dns_record(zone_id, {"type": "A", "name": "mail", "content": "192.0.2.25", "comment": "x"})
        ours = cf.create_dns_record(zone_id, tunnel_cname("app.jigga.xyz", tunnel_id))
        assert ours["name"] == "app.jigga.xyz" and ours["proxied"] and ours["ttl"] == 1
        assert ours["content"] == tunnel_target(tunnel_id)

        mine = [r for r in cf.dns_records(zone_id) if owned(r)]
        assert [r["id"] for r in mine] == [ours["id"]]
        assert [r["id"] for r in cf.dns_records(zone_id, comment="managed-by: homelab")] == [ours["id"]]
        assert [r["id"] for r in cf.dns_records(zone_id, name="app.jigga.xyz", type="CNAME")] == [ours["id"]]

        patched = cf.patch_dns_record(zone_id, ours["id"], {"content": tunnel_target("7" + tunnel_id[1:])})
        assert patched["content"].startswith("7") and patched["comment"] == "managed-by: homelab"

        # the public view: proxied names answer with the edge, DNS-only ones as they are
        public = lab.published[ZONE]
        assert public["app.jigga.xyz"] == {"A": [EDGE]}
        assert public["mail.jigga.xyz"] == {"A": ["192.0.2.25"]}
        assert public["jigga.xyz"] == {"TXT": ['"v=spf1 -all"']}

        cf.delete_dns_record(zone_id, ours["id"])
        with pytest.raises(CloudflareNotFound) as gone:
            cf.delete_dns_record(zone_id, ours["id"])
        assert gone.value.codes == (81044,)
        assert "app.jigga.xyz" not in lab.published[ZONE]
        left = {r["id"] for r in cf.dns_records(zone_id)}
        assert left == {theirs["id"], mail["id"]}


@pytest.mark.parametrize(("record", "code"), [
    ({"type": "CNAME", "name": "mail", "content": "x.cfargotunnel.com"}, 81053),
    ({"type": "A", "name": "app", "content": "192.0.2.1"}, 81054),
    ({"type": "CNAME", "name": "app", "content": "t.cfargotunnel.com", "proxied": True}, 81057),
    ({"type": "CNAME", "name": "bad", "content": "192.0.2.1"}, 1004),
    ({"type": "TXT", "name": "txt", "content": "hello", "proxied": True}, 1004),
    ({"type": "A", "name": "lan", "content": "192.168.7.230", "proxied": True}, 1004),
])
def test_dns_record_validation(lab: Lab, record: dict[str, object], code: int) -> None:
    with lab.client(lab.token("val", FULL)) as cf:
        zone_id = cf.zone(ZONE)["id"]
        cf.create_dns_record(zone_id, {"type": "A", "name": "mail", "content": "192.0.2.25"})
        cf.create_dns_record(zone_id, {"type": "CNAME", "name": "app", "content": "t.cfargotunnel.com",
                                       "proxied": True})
        with pytest.raises(CloudflareError) as raised:
            cf.create_dns_record(zone_id, record)
    assert raised.value.codes == (code,) and raised.value.status == 400


def test_names_outside_the_zone_get_the_zone_appended(lab: Lab) -> None:
    with lab.client(lab.token("rel", FULL)) as cf:
        zone_id = cf.zone(ZONE)["id"]
        made = cf.create_dns_record(zone_id, {"type": "A", "name": "www.example.com", "content": "192.0.2.3"})
    assert made["name"] == "www.example.com.jigga.xyz"


def test_pagination_reads_every_page(lab: Lab) -> None:
    with lab.client(lab.token("pages", FULL)) as cf:
        zone_id = cf.zone(ZONE)["id"]
        for n in range(12):
            cf.create_dns_record(zone_id, {"type": "A", "name": f"h{n:02d}", "content": f"192.0.2.{n + 1}"})
        before = cf.calls_by_method["GET"]
        records = cf.dns_records(zone_id, per_page=5)
        assert cf.calls_by_method["GET"] - before == 3
    assert sorted(r["name"] for r in records) == [f"h{n:02d}.jigga.xyz" for n in range(12)]


# ------------------------------------------------------------------------------------------ retries

def test_reads_are_retried_after_rate_limit_and_writes_are_not(lab: Lab) -> None:
    with lab.client(lab.token("retry", FULL)) as cf:
        lab.api.inject(429, retry_after=0, times=2)
        calls = cf.calls
        assert cf.zone(ZONE)["name"] == ZONE
        assert cf.calls - calls == 3
        zone_id = cf.zone(ZONE)["id"]
        lab.api.inject(503)
        calls = cf.calls
        with pytest.raises(CloudflareError) as raised:
            cf.create_dns_record(zone_id, {"type": "A", "name": "w", "content": "192.0.2.4"})
        assert cf.calls - calls == 1 and raised.value.status == 503
        lab.api.inject(429, retry_after=0, times=10)
        with pytest.raises(CloudflareError) as limited:
            cf.zone(ZONE)
        assert limited.value.status == 429 and limited.value.codes == (971,)
        lab.api.faults.clear()


def test_client_repr_and_errors_never_show_the_token(lab: Lab, tmp_path: Path) -> None:
    token = lab.token("quiet", ("Zone Read",))
    cf = lab.client(token)
    with pytest.raises(CloudflareError) as raised:
        cf.tunnels(lab.account)
    for text in (repr(cf), str(raised.value), repr(raised.value), str(raised.value.hint)):
        assert token not in text


def test_dns_sync_keeps_a_labdns_view_equal_to_the_public_answers(tls: tuple[str, ssl.SSLContext],
                                                                 loop: Background) -> None:
    from homelab.lab.cloudflare import dns_sync
    from homelab.lab.dns import LabDns, View

    labdns = LabDns({"public": View([ZONE])})
    api = LabCloudflare([EDGE], on_dns=dns_sync(labdns, "public"))
    account = api.add_account()
    api.add_zone(ZONE, account)
    api.add_token("sync-" + "s" * 40, FULL)
    loop.run(api.start(HOST, 0, tls[1]))
    try:
        with Cloudflare("sync-" + "s" * 40, base_url=api.url, ca_bundle=tls[0]) as cf:
            zone_id = cf.zone(ZONE)["id"]
            made = cf.create_dns_record(zone_id, tunnel_cname("app.jigga.xyz", "0" * 8 + "-0000-4000-8000-" + "0" * 12))
            cf.create_dns_record(zone_id, {"type": "A", "name": "direct", "content": "192.0.2.44"})
            view = labdns.views["public"]
            assert view.get("app.jigga.xyz", "A") == [EDGE]
            assert view.get("direct.jigga.xyz", "A") == ["192.0.2.44"]
            cf.delete_dns_record(zone_id, made["id"])
            assert view.get("app.jigga.xyz", "A") == []
    finally:
        loop.run(api.stop())


# ------------------------------------------------------------------------------ the access layer

@pytest.mark.parametrize("self_read", [False, True], ids=["zone-permissions", "token-policies"])
def test_access_layer_stops_before_any_change_without_dns_edit(lab: Lab, tmp_path: Path, self_read: bool) -> None:
    """`invoke up --only access` with a token lacking DNS Edit: the layer fails naming the permission,
    and neither Cloudflare nor anything else saw a write (the check runs before every other read)."""
    import io

    from rich.console import Console

    from homelab import inventory, pipeline
    from homelab.context import Run
    from homelab.target import ProxmoxAccess, Secret, Target
    from homelab.wait import Progress

    extra = ("API Tokens Read",) if self_read else ()
    token = lab.token("nodns", ("Zone Read", "DNS Read", "Cloudflare Tunnel Write", *extra), zones=[ZONE])
    target = Target("lab", ProxmoxAccess("root@pam!x", Secret("unused"), True, ("127.0.0.1", 1)),
                    ssh_public_key=tmp_path / "k.pub", cloudflare_api=lab.api.url, outside_ca=lab.ca,
                    secrets={"CLOUDFLARE_API_TOKEN": Secret(token), "CLOUDFLARE_ACCOUNT_ID": Secret(lab.account),
                             "TS_OAUTH_CLIENT_ID": Secret("k123"), "TS_OAUTH_CLIENT_SECRET": Secret("s")})
    out = Console(file=io.StringIO(), width=200, highlight=False, soft_wrap=True)
    run = Run(inventory.load(), target, out, Progress(out))
    outcome = pipeline.execute(run, "up", ["access"], dry_run=False)
    text = out.file.getvalue()  # type: ignore[attr-defined]
    assert outcome.rows[0].status == "failed", text
    assert "Zone DNS Edit (zone jigga.xyz)" in text
    assert lab.api.writes == 0 and token not in text


def test_access_layer_records_owned_by_comment(lab: Lab, tmp_path: Path) -> None:
    """Missing public names are created, stale records we made are pruned, records we did not make are left
    alone, and one of theirs on a name we need stops the layer before any change."""
    import io

    from rich.console import Console

    from homelab import inventory
    from homelab.clients.cloudflare import OWNER_COMMENT
    from homelab.context import Run
    from homelab.errors import Conflict
    from homelab.layers.access import AccessLayer
    from homelab.plan import LayerPlan
    from homelab.target import ProxmoxAccess, Secret, Target
    from homelab.wait import Progress

    token = lab.token("records", FULL, zones=[ZONE])
    target = Target("lab", ProxmoxAccess("root@pam!x", Secret("unused"), True, ("127.0.0.1", 1)),
                    ssh_public_key=tmp_path / "k.pub")
    out = Console(file=io.StringIO(), width=200)
    run = Run(inventory.load(), target, out, Progress(out))
    run.memo["tunnel_id"] = "0" * 8 + "-1111-2222-3333-" + "4" * 12
    with lab.client(token) as cf:
        zone = cf.require(ZONE, lab.account).zone
        assert zone is not None
        zone_id = str(zone["id"])
        stale = cf.create_dns_record(zone_id, {"type": "CNAME", "name": f"old.{ZONE}", "content": "x.example.org",
                                               "proxied": True, "comment": OWNER_COMMENT})
        theirs = cf.create_dns_record(zone_id, {"type": "A", "name": f"mail.{ZONE}", "content": "198.51.100.9"})
        plan = LayerPlan("access")
        AccessLayer()._plan_records(run, plan, cf, zone_id)
        planned = {(c.name, c.action) for c in plan.changes}
        assert planned == {("passwords.jigga.xyz", "create"), ("jigga.xyz", "create"), (f"old.{ZONE}", "delete")}
        writes = lab.api.writes
        for change in plan.pending:
            assert change.apply is not None
            change.apply()
        assert lab.api.writes == writes + 3
        names = {r["name"]: r for r in cf.dns_records(zone_id)}
        assert stale["id"] not in {r["id"] for r in names.values()} and names[f"mail.{ZONE}"]["id"] == theirs["id"]
        assert names["passwords.jigga.xyz"]["content"] == f"{run.memo['tunnel_id']}.cfargotunnel.com"
        assert names["passwords.jigga.xyz"]["proxied"] is True

        again = LayerPlan("access")
        AccessLayer()._plan_records(run, again, cf, zone_id)
        assert {c.action for c in again.changes} == {"noop"}

        cf.delete_dns_record(zone_id, str(names["jigga.xyz"]["id"]))
        cf.create_dns_record(zone_id, {"type": "A", "name": ZONE, "content": "198.51.100.10"})  # someone else's
        writes = lab.api.writes
        with pytest.raises(Conflict, match="did not make"):
            AccessLayer()._plan_records(run, LayerPlan("access"), cf, zone_id)
        assert lab.api.writes == writes

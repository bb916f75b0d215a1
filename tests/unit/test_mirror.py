"""The lab's release mirror over HTTP on 127.0.0.1: GitHub-like k3s release paths, images, refusals."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from homelab.lab.mirror import Mirror
from homelab.lab.serving import Background

VERSION = "v1.33.5+k3s1"
BINARY = b"#!/bin/sh\necho k3s\n" + bytes(range(256)) * 4096  # 1 MiB and a bit: more than one chunk
SUMS = "0123456789abcdef" * 4 + "  k3s\n"
IMAGE = b"QFI\xfb" + b"\0" * 5000
SECRET = "root:x:0:0:not for the mirror\n"


@dataclass
class Served:
    mirror: Mirror
    root: Path

    @property
    def url(self) -> str:
        return self.mirror.url

    def raw(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        """A request with the path sent as written (requests would normalise `..` away)."""
        assert self.mirror.port is not None
        conn = http.client.HTTPConnection("127.0.0.1", self.mirror.port, timeout=10)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            conn.endheaders()
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    releases, images = tmp_path / "releases", tmp_path / "images"
    (releases / VERSION).mkdir(parents=True)
    (releases / VERSION / "k3s").write_bytes(BINARY)
    (releases / VERSION / "sha256sum-amd64.txt").write_text(SUMS, encoding="utf-8")
    (releases / VERSION / ".k3s.123.tmp").write_bytes(b"half a build")
    images.mkdir()
    (images / "debian-12-genericcloud-amd64.qcow2").write_bytes(IMAGE)
    (images / "subdir").mkdir()
    (images / "subdir" / "inner.img").write_bytes(b"inner")
    (tmp_path / "secret.txt").write_text(SECRET, encoding="utf-8")
    (images / "escape.img").symlink_to(tmp_path / "secret.txt")
    (images / "alias.qcow2").symlink_to("debian-12-genericcloud-amd64.qcow2")
    (releases / "latest").symlink_to(VERSION)
    (releases / "outside").symlink_to(tmp_path)

    mirror = Mirror(releases, images)
    loop = Background("mirror-test")
    loop.run(mirror.start("127.0.0.1", 0))
    try:
        yield Served(mirror, tmp_path)
    finally:
        loop.run(mirror.stop())
        loop.close()


def test_serves_a_k3s_release_like_github(served: Served) -> None:
    got = requests.get(f"{served.url}/k3s/{VERSION}/k3s", timeout=10)
    assert got.status_code == 200
    assert got.content == BINARY
    assert got.headers["Content-Type"] == "application/octet-stream"
    assert got.headers["Content-Length"] == str(len(BINARY))

    sums = requests.get(f"{served.url}/k3s/{VERSION}/sha256sum-amd64.txt", timeout=10)
    assert sums.status_code == 200
    assert sums.text == SUMS
    assert sums.headers["Content-Type"].startswith("text/plain")


@pytest.mark.parametrize("version", ["v1.33.5%2Bk3s1", "v1.33.5%2bk3s1", "%761.33.5%2Bk3s1"])
def test_version_may_be_percent_encoded(served: Served, version: str) -> None:
    got = requests.get(f"{served.url}/k3s/{version}/k3s", timeout=10)
    assert got.status_code == 200
    assert got.content == BINARY


def test_head_gives_the_headers_without_a_body(served: Served) -> None:
    got = requests.head(f"{served.url}/k3s/{VERSION}/k3s", timeout=10)
    assert got.status_code == 200
    assert got.headers["Content-Length"] == str(len(BINARY))
    assert got.content == b""
    assert served.raw(f"/k3s/{VERSION}/k3s", "HEAD") == (200, b"")
    assert requests.head(f"{served.url}/k3s/{VERSION}/missing", timeout=10).status_code == 404


def test_serves_images(served: Served) -> None:
    got = requests.get(f"{served.url}/images/debian-12-genericcloud-amd64.qcow2", timeout=10)
    assert got.status_code == 200
    assert got.content == IMAGE
    # Symlinks that stay inside the root are followed.
    assert requests.get(f"{served.url}/images/alias.qcow2", timeout=10).content == IMAGE
    assert requests.get(f"{served.url}/k3s/latest/k3s", timeout=10).content == BINARY
    # The query string is ignored, as GitHub ignores it.
    assert requests.get(f"{served.url}/images/debian-12-genericcloud-amd64.qcow2?x=1", timeout=10).content == IMAGE


@pytest.mark.parametrize("path", [
    "/", "/k3s", "/k3s/", f"/k3s/{VERSION}", f"/k3s/{VERSION}/", "/k3s/v9.9.9+k3s1/k3s", f"/k3s/{VERSION}/missing",
    f"/k3s/{VERSION}/k3s/extra", f"/k3s/{VERSION}//k3s", "/images", "/images/", "/images/missing.qcow2",
    "/images/subdir", "/images/subdir/", "/images/subdir/inner.img", f"/releases/{VERSION}/k3s",
    f"/K3S/{VERSION}/k3s", f"/k3s/{VERSION}/.k3s.123.tmp",
])
def test_anything_else_is_404_and_nothing_is_listed(served: Served, path: str) -> None:
    got = requests.get(served.url + path, timeout=10)
    assert got.status_code == 404
    assert VERSION.encode() not in got.content and b"k3s" not in got.content.lower().replace(b"not found", b"")


@pytest.mark.parametrize("path", [
    "/k3s/../../etc/passwd",
    "/k3s/../../../../../../etc/passwd",
    "/images/../secret.txt",
    "/images/../../secret.txt",
    "/k3s/%2e%2e/%2e%2e/etc/passwd",
    "/k3s/%2E%2E/secret.txt/x",
    "/k3s/..%2f..%2f..%2fetc%2fpasswd/k3s",
    "/k3s/..%2F..%2Fsecret.txt/k3s",
    "/images/..%2fsecret.txt",
    "/images/%2e%2e%2fsecret.txt",
    "/images/%252e%252e%252fsecret.txt",
    "/images/..%5csecret.txt",
    "/images/..\\secret.txt",
    "/images/secret.txt%00.qcow2",
    "/images/%2fetc%2fpasswd",
    "/images//etc/passwd",
    "/images/escape.img",
    "/k3s/outside/secret.txt",
    f"/k3s/{VERSION}/..%2f..%2f..%2fsecret.txt",
    f"/k3s/{VERSION}/%2e%2e",
    "/k3s/%ff%fe/k3s",
])
def test_traversal_is_refused(served: Served, path: str) -> None:
    status, body = served.raw(path)
    assert status in (400, 404), (status, body[:100])
    assert b"root:" not in body and SECRET.encode() not in body
    got = requests.get(served.url + path, timeout=10)  # and as requests sends it (normalised)
    assert got.status_code in (400, 404)
    assert b"root:" not in got.content


def test_only_get_and_head(served: Served) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        got = requests.request(method, f"{served.url}/k3s/{VERSION}/k3s", timeout=10)
        assert got.status_code == 405, method
        assert set(got.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}


def test_stop_releases_the_port(tmp_path: Path) -> None:
    mirror = Mirror(tmp_path, tmp_path)
    loop = Background("mirror-stop")
    try:
        loop.run(mirror.start("127.0.0.1", 0))
        port = mirror.port
        assert requests.get(f"{mirror.url}/", timeout=10).status_code == 404
        loop.run(mirror.stop())
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/", timeout=10)
        loop.run(mirror.stop())  # a second stop is harmless
    finally:
        loop.close()

"""The lab's release mirror: plain HTTP downloads laid out like GitHub's release paths.

    GET|HEAD /k3s/<version>/<file>    <releases>/<version>/<file>   (k3s, sha256sum-amd64.txt, ...)
    GET|HEAD /images/<file>           <images>/<file>               (cloud images)

`<version>` may be percent-encoded (`v1.33.5%2Bk3s1`), as GitHub's links are. Only regular files
directly at those places are served: no directory listings, no `.`/`..` or hidden segments, no
encoded slashes, nothing that resolves (through symlinks) outside its root. Everything else is
404; methods other than GET and HEAD are 405.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
from email.utils import formatdate
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote

from aiohttp import web

from homelab.lab.serving import serve_app

log = logging.getLogger("homelab.lab.mirror")

CHUNK = 1 << 20
# One path segment after percent-decoding: no slash, backslash, NUL or control character, not hidden.
SEGMENT = re.compile(r"[0-9A-Za-z_+~-][0-9A-Za-z._+~-]{0,254}")
CONTENT_TYPES = {".txt": "text/plain; charset=utf-8"}


class Mirror:
    """Serves `releases` under /k3s/ and `images` under /images/ once `start`ed."""

    def __init__(self, releases: Path, images: Path) -> None:
        self.releases = releases
        self.images = images
        self.host: str | None = None
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """http://host:port of the running mirror."""
        if self.host is None or self.port is None:
            raise RuntimeError("the mirror is not running")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self, host: str, port: int) -> None:
        """Listen on http://host:port (port 0: a free one, then in `self.port`)."""
        self._runner, self.port = await serve_app(self._handle, host, port)
        self.host = host
        log.info("release mirror at %s: /k3s/ from %s, /images/ from %s", self.url, self.releases, self.images)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------------ requests

    def resolve(self, raw_path: str) -> Path | None:
        """The file a raw (still percent-encoded) request path names, or None if it names none we serve."""
        if not raw_path.startswith("/"):
            return None
        segments = [_decode(s) for s in raw_path[1:].split("/")]
        parts: tuple[str, ...]
        match segments:
            case ["k3s", str(version), str(name)]:
                root, parts = self.releases, (version, name)
            case ["images", str(name)]:
                root, parts = self.images, (name,)
            case _:
                return None
        try:
            base = root.resolve(strict=True)
            path = base.joinpath(*parts).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        return path if path.is_relative_to(base) else None  # else a symlink led out of the root

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        path = self.resolve(request.rel_url.raw_path)
        loop = asyncio.get_running_loop()
        opened = None if path is None else await loop.run_in_executor(None, _open_regular, path)
        if opened is None:
            log.info("%s %s: 404", request.method, request.raw_path)
            raise web.HTTPNotFound()
        fh, st = opened
        try:
            response = web.StreamResponse(headers={
                "Content-Type": CONTENT_TYPES.get(Path(fh.name).suffix, "application/octet-stream"),
                "Last-Modified": formatdate(st.st_mtime, usegmt=True),
            })
            response.content_length = st.st_size
            await response.prepare(request)
            if request.method == "GET":
                sent = 0
                while sent < st.st_size:
                    chunk = await loop.run_in_executor(None, fh.read, min(CHUNK, st.st_size - sent))
                    if not chunk:
                        break  # the file shrank while being sent; the client sees a short body
                    await response.write(chunk)
                    sent += len(chunk)
            await response.write_eof()
        finally:
            await loop.run_in_executor(None, fh.close)
        log.info("%s %s: 200, %d bytes", request.method, request.raw_path, st.st_size)
        return response


def _decode(segment: str) -> str | None:
    """A percent-decoded path segment we would serve from, or None (bad encoding, slash, dot, hidden, ...)."""
    try:
        decoded = unquote(segment, errors="strict")
    except UnicodeDecodeError:
        return None
    return decoded if SEGMENT.fullmatch(decoded) else None


def _open_regular(path: Path) -> tuple[BinaryIO, os.stat_result] | None:
    try:
        fh = path.open("rb")
    except OSError:
        return None
    st = os.fstat(fh.fileno())
    if not stat.S_ISREG(st.st_mode):
        fh.close()
        return None
    return fh, st

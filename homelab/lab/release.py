"""A "k3s release" of the lab's k3s stand-in, laid out like K3s's own GitHub releases.

Real K3s publishes `https://github.com/k3s-io/k3s/releases/download/<version>/k3s` (one static,
self-extracting binary) and `sha256sum-amd64.txt` (`<sha256>  k3s` lines). `build` writes the
same two files for the stand-in (`python3 -m k3s_standin`), so the k3s layer downloads, checks
and installs it exactly as it would the real one:

    <out_dir>/<version>/k3s                   mode 0755: a POSIX sh header + a tar.gz payload
    <out_dir>/<version>/sha256sum-amd64.txt   "<sha256>  k3s"

Like the real binary, `k3s` unpacks itself on first run to
`${K3S_DATA_DIR:-/var/lib/rancher/k3s}/data/<sha256 of the payload>/` (into a temporary
directory, then one rename, so concurrent first runs are safe) and then runs
`python3 -m k3s_standin "$@"` with that directory first on PYTHONPATH.

The payload holds the stand-in package (with a `VERSION` file holding the version) and its
third-party dependencies, vendored with pip for CPython 3.11 on manylinux x86_64 (Debian
bookworm's python3). PyYAML and cryptography are not vendored: the VMs have python3-yaml and
python3-cryptography from Debian. Vendoring needs PyPI once; it is cached in `cache` under a key
of the requirement list, and so is its compressed part of the payload, so later builds take a
fraction of a second. The same inputs give byte-identical files (sorted members, fixed mtime,
uid, gid and modes, no gzip timestamp), hence the same sha256.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from homelab.errors import HomelabError

PACKAGE = "k3s_standin"
PACKAGE_DIR = Path(__file__).resolve().parent / PACKAGE
BINARY = "k3s"
SUMS = "sha256sum-amd64.txt"
VERSION_FILE = "VERSION"
DATA_DIR = "/var/lib/rancher/k3s"

# The stand-in reads only kubernetes-validate's bundled schemas (it checks them itself and never
# imports the library), so the package goes in alone (--no-deps), and only the schema folders of
# the K3s minor the release is for (the other minors are 69 MB the VMs would unpack for nothing).
KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"
REQUIREMENTS: tuple[str, ...] = (KUBERNETES_VALIDATE,)
SCHEMAS = "kubernetes_validate/kubernetes-json-schema/"
# What Debian provides on the VMs; a vendored copy would shadow it (and be built for another ABI).
FROM_DEBIAN = frozenset({"yaml", "_yaml", "cryptography"})
PIP_TARGET = ("--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
              "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64")
PIP_TIMEOUT = 900.0

FORMAT = "1"             # bump when the payload or the header changes shape (part of the vendor cache key)
COMPRESSLEVEL = 6        # 9 saves 2% for twice the time
MTIME = 0                # every member's mtime; the gzip header has none either
MARKER = "__K3S_STANDIN_PAYLOAD_FOLLOWS__"
VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]{0,127}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")

HEADER = """\
#!/bin/sh
# k3s {version}: the homelab lab's stand-in for the k3s binary (python3 -m {package}), not the real K3s.
# Built by homelab/lab/release.py. Like k3s, on first run it unpacks its payload (the tar.gz after the
# marker line below) to ${{K3S_DATA_DIR:-{data_dir}}}/data/<payload sha256>/, then runs from there.
set -eu
sha256={sha256}
skip={skip}
data="${{K3S_DATA_DIR:-{data_dir}}}/data"
dir="$data/$sha256"
if [ ! -d "$dir" ]; then
    mkdir -p "$data"
    tmp=$(mktemp -d "$data/.$sha256.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 143' TERM
    actual=$(tail -n "+$skip" "$0" | sha256sum)
    if [ "${{actual%% *}}" != "$sha256" ]; then
        echo "k3s: $0 is damaged: payload sha256 ${{actual%% *}}, expected $sha256" >&2
        exit 1
    fi
    tail -n "+$skip" "$0" | tar -xzf - -C "$tmp"
    chmod 755 "$tmp"
    # One rename publishes it; if another first run got there before us, use theirs.
    if ! mv -T "$tmp" "$dir" 2>/dev/null; then
        rm -rf "$tmp"
        if [ ! -d "$dir" ]; then
            echo "k3s: cannot create $dir" >&2
            exit 1
        fi
    fi
    trap - EXIT HUP INT TERM
fi
PYTHONPATH="$dir${{PYTHONPATH:+:$PYTHONPATH}}"
export PYTHONPATH
exec python3 -s -P -m {package} "$@"
exit 127
{marker}
"""


class ReleaseError(HomelabError):
    """A stand-in release cannot be built, or a downloaded one does not match its checksum."""


# ------------------------------------------------------------------------------------ API


def build(version: str, out_dir: Path, *, cache: Path, package_dir: Path = PACKAGE_DIR,
          requirements: Sequence[str] = REQUIREMENTS, extra: Mapping[str, bytes] | None = None) -> Path:
    """Write `out_dir/<version>/k3s` and `sha256sum-amd64.txt`; returns `out_dir/<version>`.

    `requirements` are vendored into the payload (pip, cached in `cache`); `()` vendors nothing.
    """
    if not VERSION_RE.fullmatch(version):
        raise ReleaseError(f"bad k3s version {version!r}", hint="a release tag such as v1.33.5+k3s1")
    if not (package_dir / "__main__.py").is_file():
        raise ReleaseError(f"no k3s stand-in package at {package_dir} (it needs a __main__.py)")
    minor = ".".join(version.lstrip("v").split(".")[:2])
    vendored = vendor(requirements, cache, minor=minor) if requirements else None
    release = out_dir / version
    release.mkdir(parents=True, exist_ok=True)
    tmp = release / f".{BINARY}.{os.getpid()}.tmp"
    try:
        with tmp.open("wb") as out:
            _write_binary(out, version, vendored, _package_part(package_dir, version, extra or {}))
        tmp.chmod(0o755)
        digest = sha256_file(tmp)
        tmp.replace(release / BINARY)
    finally:
        tmp.unlink(missing_ok=True)
    _write_atomic(release / SUMS, f"{digest}  {BINARY}\n".encode())
    return release


def verify(binary: Path, sums: Path, *, name: str | None = None) -> None:
    """Raise ReleaseError unless `binary`'s sha256 is the one `sums` lists for `name` (default: its file name)."""
    name = name or binary.name
    try:
        lines = sums.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReleaseError(f"cannot read the checksums {sums}: {exc}") from None
    expected = [fields[0].lower() for fields in (line.split() for line in lines)
                if len(fields) == 2 and fields[1].removeprefix("*") == name]
    if len(expected) != 1 or not SHA256_RE.fullmatch(expected[0]):
        raise ReleaseError(f"{sums} has {'no' if not expected else 'no single valid'} sha256 for {name}")
    try:
        actual = sha256_file(binary)
    except OSError as exc:
        raise ReleaseError(f"cannot read {binary}: {exc}") from None
    if actual != expected[0]:
        raise ReleaseError(f"{binary}: sha256 {actual} does not match {expected[0]} in {sums}",
                           hint="the download is damaged or not the release it claims to be; fetch it again")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def payload_sha256(binary: Path) -> str:
    """The name of the directory under `<data dir>/data/` that `binary` unpacks to."""
    for line in binary.read_bytes()[:4096].splitlines():
        if line.startswith(b"sha256="):
            return line.removeprefix(b"sha256=").decode()
    raise ReleaseError(f"{binary} is not a k3s stand-in release")


def vendor(requirements: Sequence[str], cache: Path, minor: str = "") -> Path:
    """The compressed, cached payload part holding `requirements` (built with pip on first use).

    With `minor` (like "1.33"), only that Kubernetes minor's schema folders are kept.
    """
    blob = "\n".join([FORMAT, str(COMPRESSLEVEL), *PIP_TARGET, *sorted(requirements), minor])
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    final = cache / f"vendor-{key}"
    part = final / "payload.part.gz"
    if part.is_file():
        return part
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".vendor-{key}.", dir=cache))
    tmp.chmod(0o755)
    try:
        lib = tmp / "lib"
        _pip_install(requirements, lib)
        clash = sorted(p.name for p in lib.iterdir() if p.name in FROM_DEBIAN or p.name == PACKAGE)
        if clash:
            raise ReleaseError(f"vendoring {' '.join(requirements)} brought {', '.join(clash)}, "
                               "which must come from Debian (or is the stand-in itself)",
                               hint="drop it from the requirement list")
        (tmp / "requirements.txt").write_text("".join(f"{r}\n" for r in requirements), encoding="utf-8")
        with (tmp / part.name).open("wb") as out:
            gz = _Gzip(out)
            _write_members(gz, _tree(lib, "", skip=lambda rel: _not_vendored(rel) or _other_minor(rel, minor)))
            gz.close()
        try:
            tmp.rename(final)
        except OSError:
            if not part.is_file():  # not a concurrent build that won: something else is in the way
                raise ReleaseError(f"cannot store the vendored packages at {final}",
                                   hint=f"remove {final}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return part


# ---------------------------------------------------------------------------- internals


def _pip_install(requirements: Sequence[str], target: Path) -> None:
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-input", "--disable-pip-version-check",
            "--no-deps", "--no-compile", "--target", str(target), *PIP_TARGET, "--", *requirements]
    what = " ".join(requirements)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ReleaseError(f"vendoring {what} for the k3s stand-in: pip did not finish in {PIP_TIMEOUT:.0f}s",
                           hint="check the network to PyPI") from None
    if done.returncode == 0:
        return
    tail = "\n  ".join(line for line in done.stderr.splitlines()[-8:] if line.strip())
    offline = ("NewConnectionError", "Failed to establish a new connection", "Network is unreachable",
               "Name or service not known", "Temporary failure in name resolution", "Max retries exceeded",
               "ConnectTimeout", "ReadTimeout", "ProxyError", "SSLError", "Could not fetch URL")
    # Pinned releases that exist: "(from versions: none)" means the index answered nothing at all.
    if "(from versions: none)" in done.stderr or any(word in done.stderr for word in offline):
        raise ReleaseError(f"vendoring {what} for the k3s stand-in needs PyPI, which could not be reached:\n  {tail}",
                           hint="check the network (or PIP_INDEX_URL / pip.conf); it is needed once, "
                                "then the cache is used")
    if "No module named pip" in done.stderr:
        raise ReleaseError(f"{sys.executable} has no pip", hint="install pip into that environment")
    raise ReleaseError(f"vendoring {what} for the k3s stand-in failed (pip exit {done.returncode}):\n  {tail}")


def _not_vendored(rel: str) -> bool:
    """Files pip writes that do not belong in the payload or differ from one machine to the next."""
    parts = rel.split("/")
    return (parts[0] == "bin" or "__pycache__" in parts or rel.endswith((".pyc", ".pyo"))
            or (len(parts) == 2 and parts[0].endswith(".dist-info")
                and parts[1] in {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}))


def _other_minor(rel: str, minor: str) -> bool:
    """A schema folder of another Kubernetes minor than the release's."""
    if not minor or not rel.startswith(SCHEMAS):
        return False
    folder = rel[len(SCHEMAS):].split("/", maxsplit=1)[0]
    return bool(folder) and not folder.startswith(f"v{minor}.")


def _not_packaged(rel: str) -> bool:
    parts = rel.split("/")
    return (any(p.startswith(".") or p == "__pycache__" for p in parts) or rel.endswith((".pyc", ".pyo"))
            or rel == VERSION_FILE)


def _package_part(package_dir: Path, version: str, extra: Mapping[str, bytes]) -> bytes:
    """The stand-in package as a gzip member: its files, under `k3s_standin/`, plus VERSION; then the tar end."""
    sink = io.BytesIO()
    gz = _Gzip(sink)
    from homelab.lab import chartcrds

    members = [*_tree(package_dir, PACKAGE + "/", skip=_not_packaged),
               (f"{PACKAGE}/{VERSION_FILE}", version.encode(), 0o644),
               # The CRDs the lab's chart doubles install, as the real charts would.
               *((f"{PACKAGE}/{name}", data, 0o644) for name, data in chartcrds.chart_files().items()),
               # Lab data of this lab (charts/outside.json: the outside world's names and CA).
               *((f"{PACKAGE}/{name}", data, 0o644) for name, data in extra.items())]
    members += [(f"{PACKAGE}/charts", None, 0o755)]
    _write_members(gz, sorted(members, key=lambda m: m[0]))
    gz.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))  # end of archive
    gz.close()
    return sink.getvalue()


def _tree(root: Path, prefix: str, *, skip: Callable[[str], bool]) -> Iterator[tuple[str, bytes | None, int]]:
    """(name, contents or None for a directory, mode) of every member under root, sorted by name."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in [*dirnames, *filenames]:
            path = base / name
            rel = path.relative_to(root).as_posix()
            if skip(rel):
                continue
            if path.is_symlink():
                raise ReleaseError(f"{path} is a symlink; the stand-in release holds plain files only")
            found.append((rel, path))
        dirnames[:] = sorted(d for d in dirnames if not skip((base / d).relative_to(root).as_posix()))
    if prefix:
        yield prefix.rstrip("/"), None, 0o755
    for rel, path in sorted(found):
        if path.is_dir():
            yield prefix + rel, None, 0o755
        else:
            mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            yield prefix + rel, path.read_bytes(), mode


def _write_members(out: _Gzip, members: Iterable[tuple[str, bytes | None, int]]) -> None:
    """Tar headers and data, without the end-of-archive blocks (parts are concatenated)."""
    for name, data, mode in members:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
        info.size = 0 if data is None else len(data)
        info.mode = mode
        info.mtime = MTIME
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if data:
            out.write(data)
            remainder = len(data) % tarfile.BLOCKSIZE
            if remainder:
                out.write(tarfile.NUL * (tarfile.BLOCKSIZE - remainder))


def _write_binary(out: BinaryIO, version: str, vendored: Path | None, package_part: bytes) -> None:
    """Header, then the payload: the vendored part (one gzip member) and the package part (another).

    Concatenated gzip members decompress to the concatenated tar streams, which is one tar archive
    because only the last part ends with the end-of-archive blocks.
    """
    digest = hashlib.sha256()
    if vendored is not None:
        with vendored.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    digest.update(package_part)
    header = _header(version, digest.hexdigest())
    out.write(header.encode())
    if vendored is not None:
        with vendored.open("rb") as fh:
            shutil.copyfileobj(fh, out, 1 << 20)
    out.write(package_part)


def _header(version: str, sha256: str) -> str:
    text = HEADER.format(version=version, package=PACKAGE, data_dir=DATA_DIR, sha256=sha256, skip="{skip}",
                         marker=MARKER)
    return text.replace("{skip}", str(text.count("\n") + 1))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.chmod(0o644)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


class _Gzip:
    """One gzip member (no name, mtime 0) written to `sink` as data comes."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink = sink
        self._zlib = zlib.compressobj(COMPRESSLEVEL, zlib.DEFLATED, 31)

    def write(self, data: bytes) -> None:
        self._sink.write(self._zlib.compress(data))

    def close(self) -> None:
        self._sink.write(self._zlib.flush())

"""The k3s stand-in release: layout, the self-extracting binary (run for real), checksums, reproducibility.

All but one test build from a tiny fake `k3s_standin` package without vendoring; the `network` test
vendors kubernetes-validate from PyPI for real and runs it with Debian's python3.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from homelab.errors import HomelabError
from homelab.lab import release

VERSION = "v1.33.5+k3s1"
# Debian's python3 is what the VMs run; the venv's stands in where there is none.
PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

MAIN = '''\
import json, sys
from pathlib import Path

here = Path(__file__).resolve().parent
version = (here / "VERSION").read_text()
if sys.argv[1:] == ["--version"]:
    print(f"k3s version {version} (stand-in)")
elif sys.argv[1:] == ["validate"]:
    # As the stand-in does: read kubernetes-validate's bundled schemas without importing the library.
    import importlib.util, yaml
    doc = yaml.safe_load(sys.stdin)
    root = Path(importlib.util.find_spec("kubernetes_validate").origin).parent / "kubernetes-json-schema"
    schema = json.loads((root / "v1.33.0-local-strict" / "deployment-apps-v1.json").read_text())
    print(json.dumps({"kind": doc["kind"], "schema_props": sorted(schema["properties"]),
                      "minors": sorted(p.name for p in root.iterdir()),
                      "yaml": yaml.__file__, "kubernetes_validate": str(root)}))
else:
    print(json.dumps({"version": version, "argv": sys.argv[1:], "stdin": sys.stdin.read(),
                      "package": str(here), "path": sys.path}))
'''

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: nginx}]
"""


@pytest.fixture
def package(tmp_path: Path) -> Path:
    pkg = tmp_path / "src" / "k3s_standin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "__main__.py").write_text(MAIN, encoding="utf-8")
    (pkg / "data").mkdir()
    (pkg / "data" / "note.txt").write_text("kept\n", encoding="utf-8")
    return pkg


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """PATH with `python3` as PYTHON first; the data dir in tmp; no inherited PYTHONPATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").symlink_to(PYTHON)
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**environ, "PATH": f"{bindir}{os.pathsep}{environ.get('PATH', '')}",
            "K3S_DATA_DIR": str(tmp_path / "k3s")}


def build(package: Path, out: Path, version: str = VERSION) -> Path:
    return release.build(version, out, cache=out.parent / "cache", package_dir=package, requirements=())


def run(binary: Path, *argv: str, env: dict[str, str], stdin: str = "", cwd: Path | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *argv], input=stdin, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def data_entries(env: dict[str, str]) -> list[str]:
    data = Path(env["K3S_DATA_DIR"]) / "data"
    return sorted(p.name for p in data.iterdir()) if data.exists() else []


def test_release_has_the_layout_of_a_k3s_github_release(package: Path, tmp_path: Path) -> None:
    out = build(package, tmp_path / "out")

    assert out == tmp_path / "out" / VERSION
    assert sorted(p.name for p in out.iterdir()) == ["k3s", "sha256sum-amd64.txt"]
    binary = out / "k3s"
    assert binary.stat().st_mode & 0o777 == 0o755
    assert binary.read_bytes().startswith(b"#!/bin/sh\n")
    digest = release.sha256_file(binary)
    assert (out / "sha256sum-amd64.txt").read_text(encoding="utf-8") == f"{digest}  k3s\n"
    release.verify(binary, out / "sha256sum-amd64.txt")


def test_first_run_unpacks_to_the_data_dir_then_runs_from_it(package: Path, tmp_path: Path,
                                                             env: dict[str, str]) -> None:
    binary = build(package, tmp_path / "out") / "k3s"
    payload = release.payload_sha256(binary)

    done = run(binary, "--version", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"k3s version {VERSION} (stand-in)\n"
    assert data_entries(env) == [payload]  # no temporary directory left over
    unpacked = Path(env["K3S_DATA_DIR"]) / "data" / payload
    assert (unpacked / "k3s_standin" / "VERSION").read_text(encoding="utf-8") == VERSION
    assert (unpacked / "k3s_standin" / "data" / "note.txt").read_text(encoding="utf-8") == "kept\n"
    inode = unpacked.stat().st_ino

    again = run(binary, "--version", env=env)
    assert again.returncode == 0, again.stderr
    assert unpacked.stat().st_ino == inode  # used as it is, not unpacked again


def test_argv_stdin_and_pythonpath_pass_through_untouched(package: Path, tmp_path: Path,
                                                         env: dict[str, str]) -> None:
    binary = build(package, tmp_path / "out") / "k3s"
    work = tmp_path / "work"
    # A package of the same name in the working directory must not shadow the release's.
    (work / "k3s_standin").mkdir(parents=True)
    (work / "k3s_standin" / "__main__.py").write_text("raise SystemExit('shadowed')\n", encoding="utf-8")
    argv = ["server", "--node-name=a b", "", "$(touch pwned)", "`touch pwned`", "*", "--token='x\"y'", "a\nb"]

    done = run(binary, *argv, env={**env, "PYTHONPATH": "/opt/extra"}, stdin="line 1\nline 2\n", cwd=work)

    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["argv"] == argv
    assert seen["stdin"] == "line 1\nline 2\n"
    unpacked = str(Path(env["K3S_DATA_DIR"]) / "data" / release.payload_sha256(binary))
    assert seen["package"] == unpacked + "/k3s_standin"
    assert seen["path"][0] == unpacked
    assert "/opt/extra" in seen["path"]
    assert not (work / "pwned").exists()
    assert not (tmp_path / "pwned").exists()


def test_concurrent_first_runs_all_succeed(package: Path, tmp_path: Path, env: dict[str, str]) -> None:
    # Some megabytes that do not compress, so the first runs' unpacking overlaps and all but one lose the rename.
    (package / "data" / "blob").write_bytes(os.urandom(4 << 20))
    binary = build(package, tmp_path / "out") / "k3s"

    procs = [subprocess.Popen([str(binary), "--version"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(6)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]

    for code, out, err in results:
        assert code == 0, err
        assert out == f"k3s version {VERSION} (stand-in)\n"
    assert data_entries(env) == [release.payload_sha256(binary)]


def test_verify_catches_a_flipped_byte_and_the_binary_refuses_to_unpack(package: Path, tmp_path: Path,
                                                                       env: dict[str, str]) -> None:
    out = build(package, tmp_path / "out")
    sums = out / "sha256sum-amd64.txt"
    for offset in (-100, 20):  # in the payload, in the header
        damaged = tmp_path / "dl" / str(offset) / "k3s"
        damaged.parent.mkdir(parents=True)
        data = bytearray((out / "k3s").read_bytes())
        data[offset] ^= 0x01
        damaged.write_bytes(bytes(data))
        damaged.chmod(0o755)
        with pytest.raises(HomelabError, match="does not match"):
            release.verify(damaged, sums)

    done = run(tmp_path / "dl" / "-100" / "k3s", "--version", env=env)
    assert done.returncode != 0
    assert "is damaged" in done.stderr
    assert data_entries(env) == []


def test_verify_needs_a_single_valid_line_for_the_file(package: Path, tmp_path: Path) -> None:
    out = build(package, tmp_path / "out")
    sums = tmp_path / "sums.txt"
    digest = release.sha256_file(out / "k3s")
    # Real sums files list every artifact; the binary-mode marker `*` is allowed.
    sums.write_text(f"{'0' * 64}  k3s-airgap-images-amd64.tar\n{digest} *k3s\n", encoding="utf-8")
    release.verify(out / "k3s", sums)
    release.verify(out / "k3s", sums, name="k3s")
    with pytest.raises(HomelabError, match="no sha256 for k3s-arm64"):
        release.verify(out / "k3s", sums, name="k3s-arm64")
    sums.write_text("not-a-digest  k3s\n", encoding="utf-8")
    with pytest.raises(HomelabError, match="no single valid"):
        release.verify(out / "k3s", sums)
    with pytest.raises(HomelabError, match="cannot read"):
        release.verify(out / "k3s", tmp_path / "missing.txt")


def test_same_inputs_give_the_same_file(package: Path, tmp_path: Path) -> None:
    first = build(package, tmp_path / "a") / "k3s"
    # A copy with other mtimes and modes of directories, bytecode and an editor's swap file: none of it counts.
    copy = tmp_path / "elsewhere" / "k3s_standin"
    shutil.copytree(package, copy)
    for path in copy.rglob("*"):
        os.utime(path, (1_000_000_000, 1_000_000_000))
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "__main__.cpython-311.pyc").write_bytes(b"\0")
    (copy / ".__main__.py.swp").write_bytes(b"\0")
    (copy / "VERSION").write_text("v0.0.0-from-the-source-tree", encoding="utf-8")
    second = build(copy, tmp_path / "b") / "k3s"

    assert first.read_bytes() == second.read_bytes()
    assert release.sha256_file(first) == release.sha256_file(second)


def test_another_version_gives_another_file(package: Path, tmp_path: Path, env: dict[str, str]) -> None:
    old = build(package, tmp_path / "out") / "k3s"
    new = build(package, tmp_path / "out", "v1.34.1+k3s1") / "k3s"

    assert new.parent.name == "v1.34.1+k3s1"
    assert release.sha256_file(old) != release.sha256_file(new)
    assert release.payload_sha256(old) != release.payload_sha256(new)
    assert run(old, "--version", env=env).stdout == f"k3s version {VERSION} (stand-in)\n"
    assert run(new, "--version", env=env).stdout == "k3s version v1.34.1+k3s1 (stand-in)\n"
    assert len(data_entries(env)) == 2


@pytest.mark.parametrize("version", ["", "../v1", "v1/2", ".v1", "v1\nrm -rf /", "v1 2", "v1;id", "v1$(id)"])
def test_bad_version_is_refused(package: Path, tmp_path: Path, version: str) -> None:
    with pytest.raises(HomelabError, match="bad k3s version"):
        build(package, tmp_path / "out", version)
    assert not (tmp_path / "out").exists()


def test_missing_package_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HomelabError, match="no k3s stand-in package"):
        build(tmp_path / "nowhere" / "k3s_standin", tmp_path / "out")


def test_unreachable_pypi_is_a_clear_error(package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a local port nothing listens on: offline-safe
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    cache = tmp_path / "cache"

    with pytest.raises(HomelabError, match="needs PyPI, which could not be reached"):
        release.build(VERSION, tmp_path / "out", cache=cache, package_dir=package,
                      requirements=(release.KUBERNETES_VALIDATE,))
    assert list(cache.iterdir()) == []  # nothing half-made is left in the cache
    assert not (tmp_path / "out").exists()


@pytest.mark.network
def test_vendored_kubernetes_validate_runs_on_debian_python(package: Path, tmp_path: Path, env: dict[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    started = time.monotonic()
    try:
        out = release.build(VERSION, tmp_path / "out", cache=cache, package_dir=package)
    except HomelabError as exc:
        if "could not be reached" in str(exc) and not os.environ.get("CI"):
            pytest.skip(f"PyPI is not reachable: {exc}")
        raise
    first = time.monotonic() - started

    # The second build uses the cache: pip is not run again.
    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip ran although the vendored packages are cached")

    monkeypatch.setattr(release.subprocess, "run", no_pip)
    started = time.monotonic()
    again = release.build(VERSION, tmp_path / "again", cache=cache, package_dir=package)
    second = time.monotonic() - started
    monkeypatch.undo()
    assert (again / "k3s").read_bytes() == (out / "k3s").read_bytes()
    assert second < 2.0, f"cached build took {second:.2f}s (first {first:.1f}s)"

    done = run(out / "k3s", "validate", env=env, stdin=DEPLOYMENT)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["kind"] == "Deployment" and {"spec", "metadata", "status"} <= set(seen["schema_props"])
    # Only the release's Kubernetes minor is shipped (the other minors are 69 MB of schemas).
    assert seen["minors"] and all(m.startswith("v1.33.") for m in seen["minors"])
    unpacked = Path(env["K3S_DATA_DIR"]) / "data" / release.payload_sha256(out / "k3s")
    assert Path(seen["kubernetes_validate"]).is_relative_to(unpacked)
    assert not Path(seen["yaml"]).is_relative_to(unpacked)  # PyYAML comes from the system (Debian)
    if PYTHON == "/usr/bin/python3":
        assert seen["yaml"].startswith("/usr/lib/python3/dist-packages/")
    names = {p.name for p in unpacked.iterdir()}
    assert not names & {"yaml", "_yaml", "cryptography", "bin", "__pycache__"}
    assert {"kubernetes_validate", "k3s_standin"} <= names
    assert not names & {"jsonschema", "referencing", "rpds"}  # the stand-in needs only the schemas

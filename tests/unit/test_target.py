"""Target settings: the env file keeps secrets exactly as written (one pair of quotes comes off, nothing else)."""

from __future__ import annotations

from pathlib import Path

import pytest

from homelab.errors import ConfigError
from homelab.target import read_env_file


def test_env_file_values_keep_their_quote_characters(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("A=p4ss\"\nB='abc'\nexport C=\"x y\"\nD='it'\"s'\n# comment\nE=\n", encoding="utf-8")
    path.chmod(0o600)
    assert read_env_file(path) == {"A": 'p4ss"', "B": "abc", "C": "x y", "D": "it'\"s", "E": ""}


def test_env_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\n", encoding="utf-8")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        read_env_file(path)


def test_default_paths_are_in_the_operators_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Target's default state dir, key and known_hosts are under $HOME, not a "~" folder in the cwd."""
    from homelab.target import ProxmoxAccess, Secret, Target

    monkeypatch.setenv("HOME", str(tmp_path))
    target = Target("lab", ProxmoxAccess("root@pam!x", Secret("unused"), True), ssh_public_key=Path("~/k.pub"))
    assert target.state_dir == tmp_path / ".local/state/homelab/live"
    assert target.ssh_public_key == tmp_path / "k.pub"
    assert target.ssh_private_key == tmp_path / ".ssh/id_ed25519"
    assert target.known_hosts == tmp_path / ".ssh/known_hosts"

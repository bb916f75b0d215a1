"""Logging in K3s's (logrus) text format: time="..." level=info msg="..."."""

from __future__ import annotations

import datetime
import sys
import threading
from collections.abc import Iterable
from typing import TextIO

REDACTED = "********"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class Log:
    """A logger writing K3s-style lines to a stream (stderr, looked up at each write, by default).

    Every registered secret is replaced by ******** in every line, as a last line of defence;
    the code never logs a secret on purpose.
    """

    def __init__(self, stream: TextIO | None = None, *, debug: bool = False) -> None:
        self._stream = stream
        self.debug_enabled = debug
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add_secrets(self, secrets: Iterable[str]) -> None:
        with self._lock:
            self._secrets.update(s for s in secrets if s and len(s) >= 4)

    def _write(self, level: str, msg: str) -> None:
        with self._lock:
            for secret in sorted(self._secrets, key=len, reverse=True):
                msg = msg.replace(secret, REDACTED)
            now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            line = f'time="{now}" level={level} msg={_quote(msg)}\n'
            stream = self._stream or sys.stderr
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass

    def debug(self, msg: str) -> None:
        if self.debug_enabled:
            self._write("debug", msg)

    def info(self, msg: str) -> None:
        self._write("info", msg)

    def warning(self, msg: str) -> None:
        self._write("warning", msg)

    def error(self, msg: str) -> None:
        self._write("error", msg)

    def fatal(self, msg: str) -> None:
        self._write("fatal", msg)

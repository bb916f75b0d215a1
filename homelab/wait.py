"""Waiting the honest way: poll with back-off until a deadline, show progress, raise on timeout."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from tenacity import RetryError, Retrying, retry_if_result, stop_after_delay, wait_exponential

from homelab.errors import Timeout

T = TypeVar("T")


class Progress:
    """Shows what is being waited for: a live spinner on a terminal, one line each way elsewhere."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextmanager
    def waiting(self, what: str, every: float = 10.0) -> Iterator[Callable[[str], None]]:
        """Live status on a terminal; elsewhere a line every `every` seconds of waiting, and one at the end."""
        started = time.monotonic()
        if self.console.is_terminal:
            with self.console.status(f"{what} ...") as status:
                yield lambda detail: status.update(f"{what} ... {detail} ({time.monotonic() - started:.0f}s)")
        else:
            said = [started]

            def update(detail: str) -> None:
                now = time.monotonic()
                if now - said[0] >= every:
                    said[0] = now
                    self.console.print(f"  still waiting ({now - started:.0f}s): {what}: {detail}")

            yield update
        self.console.print(f"  [dim]done: {what} ({time.monotonic() - started:.1f}s)[/]")


class Silent(Progress):
    """No output (for callers that report progress themselves, and for tests)."""

    def __init__(self) -> None:
        super().__init__(Console(quiet=True))


def poll(what: str, probe: Callable[[], tuple[T | None, str]], *, timeout: float, progress: Progress,
         first: float = 0.05, maximum: float = 2.0) -> T:
    """Call probe until it returns (value, detail) with a value that is not None.

    The delay between calls grows from `first` to `maximum` seconds. Past `timeout` seconds this
    raises Timeout naming what was awaited and the last detail the probe reported.
    """
    last = ["nothing yet"]
    with progress.waiting(what) as update:

        def attempt() -> T | None:
            value, detail = probe()
            last[0] = detail
            update(detail)
            return value

        retrying = Retrying(retry=retry_if_result(lambda value: value is None), stop=stop_after_delay(timeout),
                            wait=wait_exponential(multiplier=first, min=first, max=maximum))
        try:
            result: T | None = retrying(attempt)
        except RetryError:
            raise Timeout(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last[0]}") from None
        assert result is not None
        return result

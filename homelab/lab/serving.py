"""Serving the lab's servers: an asyncio loop in a daemon thread of a synchronous program (LabPve, the DNS),
and one aiohttp handler on host:port (the mirror, Cloudflare's API and edge, Tailscale's API)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve_app(handler: Handler, host: str, port: int, ssl_context: Any = None, *,
                    max_body: int = 1 << 20) -> tuple[web.AppRunner, int]:
    """Serve `handler` for every path on host:port (0: a free port); (the runner to clean up, the port bound)."""
    app = web.Application(client_max_size=max_body)
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


class Background:
    """An event loop running in a daemon thread; `run()` executes a coroutine on it and waits."""

    def __init__(self, name: str = "lab-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        if not self.thread.is_alive():
            self.loop.close()

"""An asyncio service on an event loop of its own, in a daemon thread.

The controller's main loop is uvicorn's; the DNS server and the access gateway each run on a
loop of their own so that neither waits for the other (nor for the API's handlers), and tests,
benchmarks and the CLI use them from plain threads. One runner serves every such service.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

STOP_TIMEOUT_S = 10.0
"""How long stopping waits for the service, then for its thread."""


class AsyncService(Protocol):
    """A service started and stopped on the loop it runs on."""

    async def start(self) -> Any: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=AsyncService)


class LoopThread(Generic[S]):
    """`service` on a loop of `loop_factory`'s in a daemon thread named `name`; as a context
    manager, started on entry and stopped on exit, even on errors."""

    def __init__(
        self,
        service: S,
        *,
        name: str,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    ) -> None:
        self.service = service
        self._name = name
        self._loop_factory = loop_factory
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> S:
        """Start the loop and the service on it; raises what the service's start raised (e.g.
        OSError: its address is taken), with the loop closed again."""
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop = self._loop_factory()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.service.start())
            except BaseException as error:
                ready.set_exception(error)
                loop.close()
                return
            ready.set_result(None)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        ready.result()
        return self.service

    def stop(self) -> None:
        """Stop the service, then its loop, and wait for the thread (each at most
        `STOP_TIMEOUT_S`: a service that hangs must not keep the process from ending)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        stopping = asyncio.run_coroutine_threadsafe(self.service.stop(), loop)
        with contextlib.suppress(concurrent.futures.TimeoutError):
            stopping.result(timeout=STOP_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=STOP_TIMEOUT_S)
        self._loop = self._thread = None

    def __enter__(self) -> S:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

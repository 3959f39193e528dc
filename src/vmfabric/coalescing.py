"""Turning bursts of change into few runs of the work that applies them.

The DHCP driver's batches and reloads and the DNS publisher's zone rebuilds all cost much more
per run than per change they carry, so each change asks for a run and the runs are spaced.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Coalescer:
    """Turns a burst of requests for one key into few runs of `action`, spaced by a window.

    Keys are what runs apply to (a network, a zone). A request after a quiet spell runs
    at once; one within a window of the last run waits for the window's end, joined by every
    request until then. The window is asked for when a request starts to wait, so it can follow
    what a run costs then. A background thread runs what is due; `flush` runs it all at once.
    """

    def __init__(
        self, action: Callable[[str], None], window: Callable[[str], float], name: str
    ) -> None:
        self._action = action
        self._window = window
        self._due: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.runs = 0
        self._thread = threading.Thread(target=self._run, name=f"vmfabric-{name}", daemon=True)
        self._thread.start()

    def request(self, key: str) -> None:
        """Ask for a run; joins the one already pending for this key, if any."""
        with self._cond:
            if key not in self._due:
                last = self._last.get(key)
                now = time.monotonic()
                self._due[key] = now if last is None else max(now, last + self._window(key))
                self._cond.notify()

    def cancel(self, key: str) -> None:
        """Forget a pending run (what the key names is going away)."""
        with self._cond:
            self._due.pop(key, None)

    def pending(self) -> set[str]:
        """Keys waiting for their run."""
        with self._cond:
            return set(self._due)

    def flush(self) -> None:
        """Run everything pending now."""
        with self._cond:
            keys = list(self._due)
            self._due.clear()
        self._deliver(keys)

    def close(self) -> None:
        """Run what is pending, then stop the thread."""
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _take_due(self) -> list[str] | None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                due = [n for n, at in self._due.items() if at <= now]
                if due:
                    for key in due:
                        del self._due[key]
                    return due
                timeout = min(self._due.values(), default=now + 3600) - now
                self._cond.wait(timeout)
            return None

    def _run(self) -> None:
        while (due := self._take_due()) is not None:
            self._deliver(due)

    def _deliver(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self._action(key)
                self.runs += 1
            except Exception:
                log.exception("%s for %s failed", self._thread.name, key)
            with self._cond:
                self._last[key] = time.monotonic()

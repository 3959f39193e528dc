"""Webhooks: a JSON document POSTed to the operator's URLs when something changes state.

Deliveries run on a thread of their own, so a slow or dead receiver never holds up a sweep;
each is retried with exponential backoff (0.5 s doubling to 30 s, for up to
`MAX_DELIVERY_S`) on connection errors, 429 and 5xx answers, and given up on other 4xx.
Each request is signed like Stripe's or GitHub's: `X-Vmfabric-Signature: t=<unix time>,
sha256=<hex HMAC-SHA256 of "<t>.<body>" with the shared secret>`, so a receiver checks the body
and refuses replays of old ones; `X-Vmfabric-Event` names the event and `X-Vmfabric-Delivery`
is a unique id, the same on every retry, so a receiver can drop duplicates.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

log = logging.getLogger(__name__)

MAX_DELIVERY_S = 300.0
TIMEOUT_S = 5.0


class _Retry(Exception):
    """A delivery to try again: the receiver is unreachable, busy or failing."""


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header's value for a body sent at `timestamp` (receivers recompute it)."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},sha256={mac}"


class WebhookSender:
    """Sends events to every URL, in order, from a background thread."""

    def __init__(
        self, urls: Sequence[str], secret: bytes, *, max_delivery_s: float = MAX_DELIVERY_S
    ) -> None:
        self._urls = list(urls)
        self._secret = secret
        self._max_delivery_s = max_delivery_s
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._client = httpx.Client(timeout=TIMEOUT_S)
        self._thread = threading.Thread(target=self._run, name="vmfabric-webhooks", daemon=True)
        self._thread.start()

    def send(self, event: str, document: dict[str, Any]) -> None:
        """Queue `document` for every URL; returns at once."""
        if self._urls:
            self._queue.put((event, document))

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (for up to `timeout` seconds), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)
        self._client.close()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            event, document = item
            body = json.dumps(document, default=str).encode()
            delivery = str(uuid.uuid4())
            for url in self._urls:
                self._deliver(url, event, delivery, body)

    def _deliver(self, url: str, event: str, delivery: str, body: bytes) -> None:
        retrying = Retrying(
            retry=retry_if_exception(lambda error: isinstance(error, _Retry)),
            wait=wait_exponential(multiplier=0.5, max=30),
            stop=stop_after_delay(self._max_delivery_s),
        )
        try:
            retrying(self._post, url, event, delivery, body)
        except RetryError as error:
            log.error("webhook %s to %s given up: %s", event, url, error.last_attempt.exception())
        except httpx.HTTPStatusError as error:
            log.error("webhook %s to %s refused: %s", event, url, error)

    def _post(self, url: str, event: str, delivery: str, body: bytes) -> None:
        headers = {
            "Content-Type": "application/json",
            "X-Vmfabric-Event": event,
            "X-Vmfabric-Delivery": delivery,
            "X-Vmfabric-Signature": signature(self._secret, int(time.time()), body),
        }
        try:
            response = self._client.post(url, content=body, headers=headers)
        except httpx.TransportError as error:
            raise _Retry(f"{type(error).__name__}: {error}") from error
        if response.status_code == 429 or response.status_code >= 500:
            raise _Retry(f"HTTP {response.status_code}")
        response.raise_for_status()

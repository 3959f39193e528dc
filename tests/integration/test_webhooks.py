"""Webhooks over real HTTP: signed, retried with backoff on 5xx, given up on other 4xx."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from vmfabric.lab.testing import WebhookReceiver
from vmfabric.webhooks import WebhookSender, signature

SECRET = b"a-shared-secret-of-32-bytes-....."


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[WebhookReceiver]:
    with WebhookReceiver(list(request.param)) as server:
        yield server


def wait_for(check: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)


@pytest.mark.parametrize("receiver", [[503, 500]], indirect=True)
def test_a_failing_receiver_gets_the_same_signed_delivery_again(receiver: WebhookReceiver) -> None:
    sender = WebhookSender([receiver.url], SECRET)
    sender.send("vm.check.changed", {"vm": "web1", "current": {"agent": "unreachable"}})
    wait_for(lambda: len(receiver.received) == 3)
    sender.close()
    assert len(receiver.received) == 3  # two failures, then delivered
    deliveries = {headers["X-Vmfabric-Delivery"] for headers, _ in receiver.received}
    assert len(deliveries) == 1
    headers, body = receiver.received[-1]
    assert headers["X-Vmfabric-Event"] == "vm.check.changed"
    assert json.loads(body) == {"vm": "web1", "current": {"agent": "unreachable"}}
    stamp = int(headers["X-Vmfabric-Signature"].split(",")[0].removeprefix("t="))
    assert headers["X-Vmfabric-Signature"] == signature(SECRET, stamp, body)
    assert abs(stamp - time.time()) < 30
    assert headers["X-Vmfabric-Signature"] != signature(b"another secret", stamp, body)


@pytest.mark.parametrize("receiver", [[400]], indirect=True)
def test_a_refusing_receiver_is_not_asked_again(receiver: WebhookReceiver) -> None:
    sender = WebhookSender([receiver.url], SECRET)
    sender.send("vm.check.changed", {"vm": "web1"})
    sender.send("vm.check.changed", {"vm": "web2"})
    wait_for(lambda: len(receiver.received) == 2)
    sender.close()
    assert [json.loads(body)["vm"] for _, body in receiver.received] == ["web1", "web2"]


def test_an_unreachable_receiver_is_given_up_after_the_delivery_time() -> None:
    sender = WebhookSender(["http://127.0.0.1:9/nothing"], SECRET, max_delivery_s=1.0)
    started = time.monotonic()
    sender.send("vm.check.changed", {"vm": "web1"})
    sender.close(timeout=10)
    assert time.monotonic() - started < 5

"""The host gateway, the first proxy (CN107273186A): the HTTP front on 127.0.0.1:8751 and the
channels to the VMs' guest proxies, on an asyncio loop of their own.

`Gateway` puts together `channels.ChannelPool` (one channel per VM, found through the store
and the VM's host agent) and `http_front.HttpFront`; `gateway_thread` runs it beside the
controller's API, started and stopped with the app. The routes, credentials and errors are in
docs/access.md, the channel's protocol in docs/access-protocol.md.
"""

from __future__ import annotations

import asyncio
import logging

import uvloop

from vmfabric.access.channels import ChannelPool, Locate
from vmfabric.access.http_front import HttpFront
from vmfabric.access.splice import READ_SIZE
from vmfabric.loop_thread import LoopThread
from vmfabric.services.access import channel_socket
from vmfabric.services.context import Controller

log = logging.getLogger(__name__)


class Gateway:
    """The HTTP front and the channel pool, on the loop that runs `start`."""

    def __init__(
        self, ctl: Controller, listen: tuple[str, int], locate: Locate | None = None
    ) -> None:
        """`locate` finds a VM's channel socket; by default the VM's host agent is asked,
        from a worker thread (the store and the hypervisor block)."""
        self.listen = listen
        self.pool = ChannelPool(locate or (lambda vm: asyncio.to_thread(channel_socket, ctl, vm)))
        self.front = HttpFront(ctl, self.pool)
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the port chosen when `listen` asked for port 0)."""
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        """Listen (raises OSError when the address is taken)."""
        host, port = self.listen
        self._server = await asyncio.start_server(self.front.handle, host, port, limit=READ_SIZE)

    async def stop(self) -> None:
        """Stop listening, end the client connections, close the channels."""
        if self._server is not None:
            self._server.close()
        await self.front.close()
        await self.pool.close()
        if self._server is not None:
            await self._server.wait_closed()


def gateway_thread(gateway: Gateway) -> LoopThread[Gateway]:
    """`gateway` on a uvloop loop in a daemon thread, for a process whose main loop is
    someone else's (the API's)."""
    return LoopThread(gateway, name="vmfabric-gateway", loop_factory=uvloop.new_event_loop)

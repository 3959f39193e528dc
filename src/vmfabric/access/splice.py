"""Copying bytes both ways between two byte streams until both have ended.

The access gateway splices a user's connection with a channel stream once a TCP tunnel or a
WebSocket is set up, and `vmfabric access forward` splices a local connection with its tunnel
through the gateway: both are `splice` over two `Pipe`s, so half-closes, resets and
backpressure are handled the same way in both places.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Sequence
from typing import Protocol

READ_SIZE = 256 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)


class Pipe(Protocol):
    """One end of a bidirectional byte stream."""

    async def read(self) -> bytes:
        """The next bytes; b"" once the other side finished sending. Raises ConnectionError
        when the stream broke."""
        ...

    async def write(self, data: bytes) -> None:
        """Send `data`, waiting while too much is queued (backpressure)."""
        ...

    def write_eof(self) -> None:
        """Half-close: no more data from this side (TCP FIN)."""
        ...

    def abort(self) -> None:
        """Break the stream (TCP RST): the other side sees an error, not an orderly end."""
        ...

    def close(self) -> None:
        """Release the stream once both directions have ended."""
        ...


class SocketPipe:
    """A TCP connection as a `Pipe`; `pending` is what was read past an HTTP head on it and is
    read first."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: bytes = b""
    ) -> None:
        self.reader = reader
        self.writer = writer
        self._pending = pending

    async def read(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        return await self.reader.read(READ_SIZE)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def write_eof(self) -> None:
        if not self.writer.is_closing() and self.writer.can_write_eof():
            with contextlib.suppress(OSError):
                self.writer.write_eof()

    def abort(self) -> None:
        reset(self.writer.transport)

    def close(self) -> None:
        self.writer.close()


def reset(transport: asyncio.WriteTransport) -> None:
    """Close a TCP connection with a reset (SO_LINGER 0), so the peer knows it was cut."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


async def splice(a: Pipe, b: Pipe) -> tuple[int, int]:
    """Copy a→b and b→a until both directions have ended, passing each end of data on as a
    half-close; when either side breaks (or the splice is cancelled), abort both, so each
    peer sees a reset rather than a clean end. Returns the bytes copied a→b and b→a."""
    counts = [0, 0]
    copies = [
        asyncio.ensure_future(_copy(a, b, counts, 0)),
        asyncio.ensure_future(_copy(b, a, counts, 1)),
    ]
    try:
        await asyncio.gather(*copies)
    except OSError:
        _abort(a, b, copies)
        await asyncio.gather(*copies, return_exceptions=True)
    except asyncio.CancelledError:
        _abort(a, b, copies)
        raise
    else:
        a.close()
        b.close()
    return counts[0], counts[1]


def _abort(a: Pipe, b: Pipe, copies: Sequence[asyncio.Future[None]]) -> None:
    a.abort()
    b.abort()
    for copy in copies:
        copy.cancel()


async def _copy(source: Pipe, target: Pipe, counts: list[int], index: int) -> None:
    while data := await source.read():
        await target.write(data)
        counts[index] += len(data)
    target.write_eof()

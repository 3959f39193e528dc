"""An asyncio client of the QEMU guest agent (QGA) on the unix socket of its channel.

QGA speaks JSON without framing over a channel that outlives its clients: a previous client,
or a call of ours that timed out, may have left half a request in the agent's parser and
unread answers in the channel. So, as the QGA reference asks, the client re-synchronizes on
connect and after every failure: a 0xFF byte (invalid in JSON, it resets the agent's parser),
then `guest-sync-delimited` with a random id, whose answer the agent precedes with a 0xFF byte.
Everything before that byte is stale, and so is every answer until the one returning the id.

qemu-ga serves one connection at a time: while another client holds the channel, a new one
connects but gets no answer, so `connect` then fails with `AgentUnreachable` at its timeout.
Within this process, clients of one channel therefore take turns: `connect` waits (within its
timeout) until the channel's previous client of this process closed.

The guest is not trusted: one answer may hold at most `MAX_MESSAGE` characters, a call never
waits longer than its timeout, and answers are checked before they become typed values.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import contextlib
import ipaddress
import json
import secrets
import threading
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from vmfabric.domain.errors import InvalidInput
from vmfabric.domain.names import normalize_mac
from vmfabric.guest import (
    AgentUnreachable,
    CommandFailed,
    ExecResult,
    GuestAddress,
    GuestAgentError,
    GuestInterface,
    ProgramTimeout,
)

SENTINEL = b"\xff"
"""Sent, it flushes the agent's JSON parser; received, it starts the answer to a sync."""
MAX_MESSAGE = 16 * 1024 * 1024
"""Characters one answer may take; a guest sending more without ending it is cut off."""
READ_SIZE = 1024 * 1024
"""Bytes read at once: large, so a big answer is parsed a few times, not once per 64 KiB."""
JSON_WHITESPACE = " \t\r\n"
CHANNEL_POLL_S = 0.005
"""How often a client waiting for its turn on a channel looks again."""
EXEC_POLL_FIRST = 0.02
EXEC_POLL_MAX = 0.2
"""Seconds between asking whether a program ended: soon at first (a ping answered at once
ends in milliseconds), then less often."""
NO_MAC = "00:00:00:00:00:00"
"""What qemu-ga reports for interfaces without hardware address, such as lo."""

_INCOMPLETE = object()
"""What decoding returns while the buffer holds no complete value yet."""

T = TypeVar("T")


class _BrokenStream(Exception):
    """The agent's output cannot be used: it ended, is not JSON, or is too long."""


class _Replies:
    """The JSON values in the agent's output, each decoded once it is complete."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._decoder = json.JSONDecoder()
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._text = ""
        self._skipping = False

    def skip_to_sentinel(self) -> None:
        """Drop what is buffered and what arrives until the next 0xFF byte: all of it is stale."""
        self._clear()
        self._skipping = True

    async def next(self) -> Any:
        """The next value; `_BrokenStream` at the end of the stream or on garbage."""
        while True:
            value = self._decode()
            if value is not _INCOMPLETE:
                return value
            await self._fill()

    def _decode(self) -> Any:
        """A complete value from the buffer, or `_INCOMPLETE` while more may make one.

        A value still arriving never has a newline after the point where decoding stopped
        (JSON strings cannot hold raw newlines, and numbers and keywords none at all), while
        qemu-ga ends every answer with one: so an error before a newline means garbage.
        """
        self._text = self._text.lstrip(JSON_WHITESPACE)
        if not self._text:
            return _INCOMPLETE
        try:
            value, end = self._decoder.raw_decode(self._text)
        except json.JSONDecodeError as err:
            if self._text.find("\n", err.pos) < 0:
                return _INCOMPLETE
            raise self._broken(f"the guest agent sent invalid JSON ({err.msg})") from None
        except RecursionError:
            raise self._broken("the guest agent sent JSON nested too deeply") from None
        self._text = self._text[end:]
        return value

    async def _fill(self) -> None:
        """Read what the agent sent; a 0xFF byte in it restarts the buffer after it."""
        chunk = await self._reader.read(READ_SIZE)
        if not chunk:
            raise _BrokenStream("the guest agent closed the connection")
        _stale, sentinel, chunk = chunk.rpartition(SENTINEL)
        if sentinel:
            self._clear()
            self._skipping = False
        elif self._skipping:
            return
        self._text += self._utf8.decode(chunk)
        if len(self._text) > MAX_MESSAGE:
            raise self._broken(
                f"the guest agent sent {MAX_MESSAGE >> 20} Mi characters without ending its answer"
            )

    def _clear(self) -> None:
        self._text = ""
        self._utf8.reset()

    def _broken(self, reason: str) -> _BrokenStream:
        """The error for unusable output; the buffer is dropped so a flood holds no memory."""
        self._clear()
        return _BrokenStream(reason)


@contextlib.asynccontextmanager
async def _reaching(what: str, timeout: float) -> AsyncIterator[None]:
    """Run the body within `timeout` seconds; a timeout, a socket error or unusable output
    becomes `AgentUnreachable` saying `what` was attempted."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError as err:
        raise AgentUnreachable(f"{what}: no answer within {timeout:g} s") from err
    except (OSError, _BrokenStream) as err:
        raise AgentUnreachable(f"{what}: {err}") from err


_CHANNELS: dict[str, threading.Lock] = {}
_CHANNELS_GUARD = threading.Lock()


def _channel(path: str) -> threading.Lock:
    """The lock of one agent channel in this process (threads run checks and sweeps apart)."""
    with _CHANNELS_GUARD:
        return _CHANNELS.setdefault(path, threading.Lock())


async def _take_turn(channel: threading.Lock) -> None:
    """Wait for the channel without holding up the event loop."""
    while not channel.acquire(blocking=False):
        await asyncio.sleep(CHANNEL_POLL_S)


class QgaClient:
    """One connection to a guest agent. Calls are serialized: QGA answers in order, untagged."""

    def __init__(
        self,
        path: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        channel: threading.Lock,
    ):
        self.path = path
        self._writer = writer
        self._replies = _Replies(reader)
        self._lock = asyncio.Lock()
        self._in_sync = False
        self._channel: threading.Lock | None = channel

    @classmethod
    async def connect(cls, path: str, *, timeout: float = 2.0) -> QgaClient:
        """Open the agent's socket and sync with it, both within `timeout` seconds (waiting
        for this process's previous client of the channel included)."""
        channel = _channel(path)
        async with _reaching(f"cannot reach the guest agent at {path}", timeout):
            await _take_turn(channel)
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=READ_SIZE)
                client = cls(path, reader, writer, channel)
                try:
                    await client._sync()
                except BaseException:
                    writer.close()
                    raise
            except BaseException:
                channel.release()
                raise
        return client

    async def close(self) -> None:
        """Close the connection, so the agent serves its next client."""
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.release()

    async def __aenter__(self) -> QgaClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def call(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 5.0
    ) -> Any:
        """Run `command` in the guest and return its `return` value.

        `timeout` covers the wait for earlier calls too. `CommandFailed` when the agent answers
        with an error, `AgentUnreachable` when it does not answer usably.
        """
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        async with _reaching(f"guest agent at {self.path}, {command}", timeout), self._lock:
            return await self._exchange(request)

    async def commands(self) -> dict[str, bool]:
        """Each command the agent knows, and whether it is enabled (not blocked by its
        configuration), to check before relying on one."""
        info = _shaped(_INFO, await self.call("guest-info"), "guest-info")
        return {command.name: command.enabled for command in info.supported_commands}

    async def network_interfaces(self) -> list[GuestInterface]:
        """The guest's interfaces with MAC and addresses, as the guest itself configured them."""
        command = "guest-network-get-interfaces"
        interfaces = _shaped(_INTERFACES, await self.call(command), command)
        return [_interface(interface) for interface in interfaces]

    async def os_info(self) -> dict[str, Any]:
        """What the guest says about its OS and kernel (`id`, `version-id`, `kernel-release`...)."""
        return _shaped(_OS_INFO, await self.call("guest-get-osinfo"), "guest-get-osinfo")

    async def run(self, path: str, args: Sequence[str] = (), *, timeout: float = 5.0) -> ExecResult:
        """Run a program in the guest and wait for it to end, within `timeout` seconds.

        `guest-exec` starts it with its output captured, then `guest-exec-status` is asked,
        more slowly as time goes by, until it exited. `CommandFailed` when the agent refuses
        to run programs (guest-exec disabled by its policy) or cannot start this one (such
        as a program the guest does not have); `ProgramTimeout` when it is still running.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        arguments = {"path": path, "arg": list(args), "capture-output": True}
        started = _shaped(
            _EXEC, await self.call("guest-exec", arguments, timeout=timeout), "guest-exec"
        )
        pause = EXEC_POLL_FIRST
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise ProgramTimeout(f"{path} still running in the guest after {timeout:g} s")
            status = _shaped(
                _EXEC_STATUS,
                await self.call("guest-exec-status", {"pid": started.pid}, timeout=left),
                "guest-exec-status",
            )
            if status.exited:
                return ExecResult(
                    status.exitcode,
                    status.signal,
                    _decoded(status.out_data, "out-data"),
                    _decoded(status.err_data, "err-data"),
                )
            await asyncio.sleep(min(pause, max(deadline - loop.time(), 0)))
            pause = min(pause * 2, EXEC_POLL_MAX)

    async def _exchange(self, request: dict[str, Any]) -> Any:
        """Send one request and read its answer. Until the answer is read whole, the stream
        counts as out of sync, so a call cut short makes the next one re-sync first."""
        if not self._in_sync:
            await self._sync()
        self._in_sync = False
        await self._send(request)
        reply = await self._replies.next()
        if not _is_reply(reply):
            raise _BrokenStream(f"the guest agent sent {_excerpt(reply)} instead of an answer")
        self._in_sync = True
        if "return" in reply:
            return reply["return"]
        error = reply["error"]
        raise CommandFailed(str(error.get("class", "")), str(error.get("desc", "")))

    async def _sync(self) -> None:
        """Flush the agent's parser and skip its stale output (see the module's docstring)."""
        token = secrets.randbelow(2**31)
        self._replies.skip_to_sentinel()
        sync = {"execute": "guest-sync-delimited", "arguments": {"id": token}}
        await self._send(sync, prefix=SENTINEL)
        while not _returns(await self._replies.next(), token):
            pass
        self._in_sync = True

    async def _send(self, request: dict[str, Any], prefix: bytes = b"") -> None:
        self._writer.write(prefix + json.dumps(request).encode() + b"\n")
        await self._writer.drain()


def _is_reply(value: Any) -> bool:
    """Whether `value` is a QGA answer: a `return`, or an `error` object."""
    if not isinstance(value, dict):
        return False
    return "return" in value or isinstance(value.get("error"), dict)


def _returns(value: Any, token: int) -> bool:
    """Whether `value` answers the sync with `token` (`true` is not the id 1)."""
    if not isinstance(value, dict):
        return False
    returned = value.get("return")
    return type(returned) is int and returned == token


def _excerpt(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Command(BaseModel):
    name: str
    enabled: bool


class _Info(BaseModel):
    supported_commands: list[_Command]


class _Address(BaseModel):
    address: str = Field(alias="ip-address")
    kind: Literal["ipv4", "ipv6"] = Field(alias="ip-address-type")
    prefix: int


class _Interface(BaseModel):
    name: str
    mac: str | None = Field(default=None, alias="hardware-address")
    addresses: list[_Address] = Field(default_factory=list, alias="ip-addresses")


class _ExecStarted(BaseModel):
    pid: int


class _ExecStatus(BaseModel):
    exited: bool
    exitcode: int | None = None
    signal: int | None = None
    out_data: str = Field(default="", alias="out-data")
    err_data: str = Field(default="", alias="err-data")


_EXEC = TypeAdapter(_ExecStarted)
_EXEC_STATUS = TypeAdapter(_ExecStatus)
_INFO = TypeAdapter(_Info)
_INTERFACES = TypeAdapter(list[_Interface])
_OS_INFO = TypeAdapter(dict[str, Any])


def _shaped(adapter: TypeAdapter[T], value: Any, command: str) -> T:
    """`value` as `adapter` wants it; a guest answering otherwise gets a short, clear error."""
    try:
        return adapter.validate_python(value)
    except ValidationError as err:
        first = err.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "the answer"
        raise GuestAgentError(
            f"the guest agent's answer to {command} is not as QGA documents it: "
            f"{where}: {first['msg']} ({err.error_count()} problem(s))"
        ) from None


def _decoded(data: str, field: str) -> bytes:
    """Captured output, which QGA sends in base64."""
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error:
        raise GuestAgentError(f"the guest agent's {field} is not base64") from None


def _interface(raw: _Interface) -> GuestInterface:
    return GuestInterface(
        name=raw.name,
        mac=_mac(raw.mac, raw.name),
        addresses=tuple(_address(address, raw.name) for address in raw.addresses),
    )


def _mac(raw: str | None, interface: str) -> str | None:
    """The MAC in the lower-case colon form used everywhere else; None when there is none."""
    if raw is None:
        return None
    try:
        mac = normalize_mac(raw)
    except InvalidInput as err:
        raise GuestAgentError(f"the guest agent reports for {interface}: {err.detail}") from None
    return None if mac == NO_MAC else mac


def _address(raw: _Address, interface: str) -> GuestAddress:
    """A checked address: a guest's strings end up compared with what IPAM handed out."""
    try:
        parsed = ipaddress.ip_interface(f"{raw.address}/{raw.prefix}")
    except ValueError as err:
        raise GuestAgentError(f"the guest agent reports for {interface}: {err}") from None
    version = 4 if raw.kind == "ipv4" else 6
    if parsed.version != version:
        raise GuestAgentError(f"the guest agent reports {raw.address} on {interface} as {raw.kind}")
    return GuestAddress(str(parsed.ip), raw.prefix, version)

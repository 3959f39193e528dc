"""The QGA client against a fake agent that misbehaves on purpose.

The fake agent is an asyncio unix-socket server in the test's directory. It reads the client's
requests line by line (the client ends each with a newline; a 0xFF byte before a sync is
dropped) and hands each to the test's handler, which writes whatever bytes it likes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from vmfabric.guest import (
    AgentUnreachable,
    CommandFailed,
    ExecResult,
    GuestAddress,
    GuestAgentError,
    GuestInterface,
    ProgramTimeout,
)
from vmfabric.guest.double import serving
from vmfabric.guest.qga import MAX_MESSAGE, QgaClient

pytestmark = pytest.mark.anyio

Request = dict[str, Any]
Handler = Callable[[Request, asyncio.StreamWriter], Awaitable[None]]

INTERFACES = [
    {
        "name": "lo",
        "hardware-address": "00:00:00:00:00:00",
        "ip-addresses": [
            {"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8},
            {"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128},
        ],
    },
    {
        "name": "eth0",
        "hardware-address": "52:54:00:AB:CD:EF",
        "ip-addresses": [
            {"ip-address-type": "ipv4", "ip-address": "10.1.0.5", "prefix": 24},
            {"ip-address-type": "ipv6", "ip-address": "fe80:0::5054:ff:feab:cdef", "prefix": 64},
        ],
        "statistics": {"rx-bytes": 0},
    },
    {"name": "tun0"},
]
INFO = {
    "version": "7.2.22",
    "supported_commands": [
        {"enabled": True, "name": "guest-ping", "success-response": True},
        {"enabled": False, "name": "guest-shutdown", "success-response": False},
    ],
}
OS_INFO = {"id": "debian", "version-id": "12", "kernel-release": "6.1.0"}
ANSWERS: dict[str, Any] = {
    "guest-ping": {},
    "guest-info": INFO,
    "guest-network-get-interfaces": INTERFACES,
    "guest-get-osinfo": OS_INFO,
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sock(tmp_path: Path) -> str:
    return str(tmp_path / "qga.sock")


def message(document: Any) -> bytes:
    return json.dumps(document).encode() + b"\n"


async def send(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def answer(request: Request, writer: asyncio.StreamWriter) -> None:
    """What a well-behaved qemu-ga answers, including its error for the 0xFF byte of a sync."""
    command, arguments = request["execute"], request.get("arguments", {})
    if command == "guest-sync-delimited":
        stray = {"error": {"class": "GenericError", "desc": "JSON parse error, stray '\ufffd'"}}
        await send(writer, message(stray) + b"\xff" + message({"return": arguments["id"]}))
    elif command == "echo":
        await send(writer, message({"return": arguments}))
    elif command in ANSWERS:
        await send(writer, message({"return": ANSWERS[command]}))
    else:
        error = {"class": "CommandNotFound", "desc": f"The command {command} has not been found"}
        await send(writer, message({"error": error}))


class FakeAgent:
    """A QGA server whose answers come from `handler`; it records every request it read."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.connections = 0

    @property
    def syncs(self) -> int:
        return sum(r["execute"] == "guest-sync-delimited" for r in self.requests)

    @property
    def commands(self) -> list[str]:
        return [r["execute"] for r in self.requests if r["execute"] != "guest-sync-delimited"]

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while line := await reader.readline():
                request = json.loads(line.lstrip(b"\xff"))
                self.requests.append(request)
                await self.handler(request, writer)
        except (ConnectionError, RuntimeError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def fake_agent(path: str, handler: Handler = answer) -> AsyncIterator[FakeAgent]:
    agent = FakeAgent(handler)
    async with serving(path, agent.serve):
        yield agent


async def test_normal_answers_and_typed_helpers(sock: str) -> None:
    async with fake_agent(sock) as agent, await QgaClient.connect(sock) as client:
        assert await client.call("guest-ping") == {}
        assert await client.call("echo", {"n": [1, "two"]}) == {"n": [1, "two"]}
        assert await client.commands() == {"guest-ping": True, "guest-shutdown": False}
        assert await client.os_info() == OS_INFO
        assert await client.network_interfaces() == [
            GuestInterface(
                "lo", None, (GuestAddress("127.0.0.1", 8, 4), GuestAddress("::1", 128, 6))
            ),
            GuestInterface(
                "eth0",
                "52:54:00:ab:cd:ef",
                (GuestAddress("10.1.0.5", 24, 4), GuestAddress("fe80::5054:ff:feab:cdef", 64, 6)),
            ),
            GuestInterface("tun0", None, ()),
        ]
    assert agent.syncs == 1


async def test_an_error_answer_raises_command_failed_and_keeps_the_connection(sock: str) -> None:
    async with fake_agent(sock) as agent, await QgaClient.connect(sock) as client:
        with pytest.raises(CommandFailed) as failed:
            await client.call("guest-nope")
        assert failed.value.klass == "CommandNotFound"
        assert failed.value.desc == "The command guest-nope has not been found"
        assert await client.call("guest-ping") == {}
    assert agent.syncs == 1


async def test_garbage_before_the_sync_answer_is_skipped(sock: str) -> None:
    async def noisy(request: Request, writer: asyncio.StreamWriter) -> None:
        if request["execute"] == "guest-sync-delimited":
            await send(writer, b'garbage {"return": 1} \x00\x01 {"unfinished": "')
        await answer(request, writer)

    async with fake_agent(sock, noisy), await QgaClient.connect(sock) as client:
        assert await client.call("echo", {"n": 1}) == {"n": 1}


async def test_stale_answers_with_another_id_are_skipped(sock: str) -> None:
    async def stale(request: Request, writer: asyncio.StreamWriter) -> None:
        if request["execute"] != "guest-sync-delimited":
            await answer(request, writer)
            return
        token = request["arguments"]["id"]
        await send(writer, b"\xff" + message({"return": token + 1}))
        await send(writer, message({"return": True}) + message({"return": [token]}))
        await send(writer, message({"return": token}))

    async with fake_agent(sock, stale), await QgaClient.connect(sock) as client:
        assert await client.call("echo", {"n": 2}) == {"n": 2}


async def test_a_silent_agent_times_out_quickly(sock: str) -> None:
    async def silent(request: Request, writer: asyncio.StreamWriter) -> None:
        pass

    async with fake_agent(sock, silent):
        started = time.monotonic()
        with pytest.raises(AgentUnreachable, match=r"no answer within 0\.2 s"):
            await QgaClient.connect(sock, timeout=0.2)
        assert time.monotonic() - started < 1.0


async def test_a_call_without_answer_times_out_quickly(sock: str) -> None:
    async def mute(request: Request, writer: asyncio.StreamWriter) -> None:
        if request["execute"] == "guest-sync-delimited":
            await answer(request, writer)

    async with fake_agent(sock, mute), await QgaClient.connect(sock) as client:
        started = time.monotonic()
        with pytest.raises(AgentUnreachable, match=r"guest-ping: no answer within 0\.2 s"):
            await client.call("guest-ping", timeout=0.2)
        assert time.monotonic() - started < 1.0


async def test_an_agent_closing_mid_answer_is_unreachable_and_a_new_connect_works(
    sock: str,
) -> None:
    async def dies_once(request: Request, writer: asyncio.StreamWriter) -> None:
        if request["execute"] == "echo" and agent.connections == 1:
            await send(writer, b'{"return": {"n": ')
            writer.close()
            return
        await answer(request, writer)

    async with fake_agent(sock, dies_once) as agent:
        async with await QgaClient.connect(sock) as client:
            with pytest.raises(AgentUnreachable, match="closed the connection"):
                await client.call("echo", {"n": 3})
            with pytest.raises(AgentUnreachable):
                await client.call("echo", {"n": 3})
        async with await QgaClient.connect(sock) as client:
            assert await client.call("echo", {"n": 3}) == {"n": 3}


def slow_command(seconds: float) -> Callable[[Request, asyncio.StreamWriter], Awaitable[None]]:
    """An agent that answers `slow` after `seconds`, and everything else at once."""

    async def handle(request: Request, writer: asyncio.StreamWriter) -> None:
        if request["execute"] == "slow":
            await asyncio.sleep(seconds)
            await send(writer, message({"return": "late"}))
        else:
            await answer(request, writer)

    return handle


async def test_a_late_answer_is_never_taken_for_a_later_call(sock: str) -> None:
    async with (
        fake_agent(sock, slow_command(0.3)) as agent,
        await QgaClient.connect(sock) as client,
    ):
        with pytest.raises(AgentUnreachable):
            await client.call("slow", timeout=0.1)
        assert await client.call("echo", {"n": 4}) == {"n": 4}
        assert await client.call("echo", {"n": 5}) == {"n": 5}
    assert agent.syncs == 2


async def test_a_sync_that_timed_out_is_not_taken_for_the_next_one(sock: str) -> None:
    async with (
        fake_agent(sock, slow_command(0.4)) as agent,
        await QgaClient.connect(sock) as client,
    ):
        with pytest.raises(AgentUnreachable):
            await client.call("slow", timeout=0.1)
        with pytest.raises(AgentUnreachable):
            await client.call("echo", {"n": 6}, timeout=0.1)
        assert await client.call("echo", {"n": 7}) == {"n": 7}
    assert agent.syncs == 3
    assert agent.commands == ["slow", "echo"]


async def test_garbage_instead_of_an_answer_fails_at_once_and_the_next_call_resyncs(
    sock: str,
) -> None:
    async def garbled(request: Request, writer: asyncio.StreamWriter) -> None:
        if request["execute"] == "garble":
            await send(writer, b"}not json{\n")
        elif request["execute"] == "wrong":
            await send(writer, message(["an", "array"]))
        else:
            await answer(request, writer)

    async with fake_agent(sock, garbled) as agent, await QgaClient.connect(sock) as client:
        started = time.monotonic()
        with pytest.raises(AgentUnreachable, match="invalid JSON"):
            await client.call("garble")
        with pytest.raises(AgentUnreachable, match="instead of an answer"):
            await client.call("wrong")
        assert time.monotonic() - started < 1.0
        assert await client.call("echo", {"n": 8}) == {"n": 8}
    assert agent.syncs == 3


async def test_answers_split_anywhere_are_put_together(sock: str) -> None:
    async def dribbling(request: Request, writer: asyncio.StreamWriter) -> None:
        if request["execute"] == "echo":
            data = json.dumps({"return": request["arguments"]}, indent=2).encode()
            for byte in range(len(data)):
                await send(writer, data[byte : byte + 1])
                await asyncio.sleep(0)
        else:
            await answer(request, writer)

    async with fake_agent(sock, dribbling), await QgaClient.connect(sock) as client:
        arguments = {"s": 'a}\u00e9\U0001f600\\n\\"', "n": -12.5e3, "t": [True, None]}
        assert await client.call("echo", arguments) == arguments
        assert await client.call("echo", {"n": 9}) == {"n": 9}


async def test_concurrent_calls_each_get_their_own_answer(sock: str) -> None:
    async with fake_agent(sock) as agent, await QgaClient.connect(sock) as client:
        answers = await asyncio.gather(*(client.call("echo", {"n": n}) for n in range(20)))
    assert answers == [{"n": n} for n in range(20)]
    assert agent.syncs == 1


async def test_a_flood_without_end_is_cut_off_with_bounded_memory(sock: str) -> None:
    chunk = b"x" * (1 << 20)

    async def flood(request: Request, writer: asyncio.StreamWriter) -> None:
        if request["execute"] != "flood":
            await answer(request, writer)
            return
        await send(writer, b'{"return": "')
        for _ in range(4 * MAX_MESSAGE // len(chunk)):
            await send(writer, chunk)

    async with fake_agent(sock, flood), await QgaClient.connect(sock) as client:
        tracemalloc.start()
        try:
            started = time.monotonic()
            with pytest.raises(AgentUnreachable, match="without ending its answer"):
                await client.call("flood", timeout=30)
            elapsed = time.monotonic() - started
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 3 * MAX_MESSAGE
    assert elapsed < 10


async def test_malformed_answers_to_typed_helpers_raise_guest_agent_error(sock: str) -> None:
    bad = {
        "guest-info": {"supported_commands": "all of them"},
        "guest-network-get-interfaces": [
            {"name": "eth0", "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "::1"}]}
        ],
        "guest-get-osinfo": ["debian"],
    }

    async def malformed(request: Request, writer: asyncio.StreamWriter) -> None:
        if request["execute"] in bad:
            await send(writer, message({"return": bad[request["execute"]]}))
        else:
            await answer(request, writer)

    async with fake_agent(sock, malformed), await QgaClient.connect(sock) as client:
        with pytest.raises(GuestAgentError, match=r"guest-info .*supported_commands"):
            await client.commands()
        with pytest.raises(GuestAgentError, match="prefix"):
            await client.network_interfaces()
        with pytest.raises(GuestAgentError, match="guest-get-osinfo"):
            await client.os_info()
        bad["guest-network-get-interfaces"] = [
            {
                "name": "eth0",
                "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "::1", "prefix": 64}],
            }
        ]
        with pytest.raises(GuestAgentError, match="reports ::1 on eth0 as ipv4"):
            await client.network_interfaces()
        bad["guest-network-get-interfaces"] = [{"name": "eth0", "hardware-address": "nope"}]
        with pytest.raises(GuestAgentError, match="invalid MAC address 'nope'"):
            await client.network_interfaces()
        assert await client.call("guest-ping") == {}


async def test_connecting_where_no_agent_listens_is_unreachable(sock: str) -> None:
    with pytest.raises(AgentUnreachable, match="cannot reach the guest agent"):
        await QgaClient.connect(sock)
    Path(sock).touch()
    with pytest.raises(AgentUnreachable, match="cannot reach the guest agent"):
        await QgaClient.connect(sock)


def exec_agent(polls_before_exit: int, exitcode: int = 0) -> Handler:
    """An agent that runs programs: `ping` ends after some status polls, `cmd.exe` is missing."""
    asked: list[int] = []

    async def handle(request: Request, writer: asyncio.StreamWriter) -> None:
        command, arguments = request["execute"], request.get("arguments", {})
        if command == "guest-exec" and arguments["path"] == "cmd.exe":
            desc = "Failed to execute child process “cmd.exe” (No such file or directory)"
            await send(writer, message({"error": {"class": "GenericError", "desc": desc}}))
        elif command == "guest-exec":
            assert arguments["capture-output"] is True
            await send(writer, message({"return": {"pid": 4242}}))
        elif command == "guest-exec-status":
            assert arguments == {"pid": 4242}
            asked.append(1)
            if len(asked) <= polls_before_exit:
                await send(writer, message({"return": {"exited": False}}))
            else:
                out = base64.b64encode(b"1 packets transmitted, 1 received\n").decode()
                done = {"exited": True, "exitcode": exitcode, "out-data": out}
                await send(writer, message({"return": done}))
        else:
            await answer(request, writer)

    return handle


async def test_a_program_runs_to_its_end_with_its_output(sock: str) -> None:
    ends = exec_agent(polls_before_exit=3, exitcode=1)
    async with fake_agent(sock, ends) as agent, await QgaClient.connect(sock) as client:
        result = await client.run("ping", ["-c", "1", "10.0.0.1"], timeout=5)
    assert result == ExecResult(1, None, b"1 packets transmitted, 1 received\n", b"")
    assert agent.commands == ["guest-exec", *["guest-exec-status"] * 4]


async def test_a_program_the_guest_lacks_or_a_refused_exec_fails_clearly(sock: str) -> None:
    async with fake_agent(sock, exec_agent(0)), await QgaClient.connect(sock) as client:
        with pytest.raises(CommandFailed, match="No such file") as missing:
            await client.run("cmd.exe", ["-h"])
        assert missing.value.klass == "GenericError"
    async with fake_agent(sock, answer), await QgaClient.connect(sock) as client:
        with pytest.raises(CommandFailed) as refused:  # guest-exec blocked by the agent's policy
            await client.run("ping")
        assert refused.value.klass == "CommandNotFound"


async def test_a_program_that_does_not_end_times_out_and_the_agent_stays_usable(
    sock: str,
) -> None:
    async with (
        fake_agent(sock, exec_agent(polls_before_exit=10**6)),
        await QgaClient.connect(sock) as client,
    ):
        started = time.monotonic()
        with pytest.raises(ProgramTimeout, match="still running"):
            await client.run("ping", timeout=0.3)
        assert time.monotonic() - started < 0.6
        assert await client.call("echo", {"n": 8}) == {"n": 8}


async def test_clients_of_one_channel_in_this_process_take_turns(sock: str) -> None:
    async with fake_agent(sock) as agent:
        first = await QgaClient.connect(sock)
        waiting = asyncio.create_task(QgaClient.connect(sock, timeout=2))
        await asyncio.sleep(0.2)
        assert not waiting.done() and agent.connections == 1  # not even connected yet
        await first.close()
        second = await waiting
        assert await second.call("echo", {"n": 9}) == {"n": 9}
        await second.close()
        with pytest.raises(AgentUnreachable, match=r"no answer within 0\.2 s"):
            async with await QgaClient.connect(sock):
                await QgaClient.connect(sock, timeout=0.2)
        async with await QgaClient.connect(sock) as third:  # every turn was given back
            assert await third.call("echo", {"n": 10}) == {"n": 10}

"""A guest agent that answers as a Windows guest's qemu-ga does, for what cannot run here.

No Windows VM runs on this machine, so the checker's Windows branch is proven against this
stand-in: it speaks QGA on a unix socket (sync with the 0xFF delimiter, guest-info,
guest-get-osinfo when `with_osinfo`, guest-exec and guest-exec-status), runs `cmd.exe` (the
patent's probe) and answers `ping.exe` in Windows syntax only (`-n 1 -w MS TARGET`): the
targets in `reachable` answer (exit code 0), others do not (1), and a Linux-style `-c` is
refused as Windows' ping refuses it (exit code 1, with its message). With `hang`, it accepts
connections and never answers, like a hung agent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

WINDOWS_OS_INFO = {
    "id": "mswindows",
    "name": "Microsoft Windows",
    "pretty-name": "Windows Server 2022 Standard",
    "version": "Microsoft Windows Server 2022",
    "version-id": "2022",
    "kernel-version": "10.0",
    "kernel-release": "20348",
    "machine": "x86_64",
}


@dataclass
class WindowsAgent:
    """The state of one stand-in agent; `programs` records every program it was asked to run."""

    reachable: set[str] = field(default_factory=set)
    with_osinfo: bool = True
    hang: bool = False
    programs: list[tuple[str, list[str]]] = field(default_factory=list)
    _runs: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    _pids: Iterator[int] = field(default_factory=lambda: itertools.count(1000))

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one client's requests, one JSON object per line, until it goes."""
        try:
            while line := await reader.readline():
                if self.hang:
                    continue
                writer.write(self._answer(json.loads(line.lstrip(b"\xff"))))
                await writer.drain()
        except (ConnectionError, json.JSONDecodeError):
            pass
        finally:
            writer.close()

    def _answer(self, request: dict[str, Any]) -> bytes:
        command, arguments = request.get("execute"), request.get("arguments", {})
        if command == "guest-sync-delimited":
            return b"\xff" + _reply({"return": arguments["id"]})
        if command == "guest-info":
            return _reply({"return": {"version": "108.0.2", "supported_commands": self._info()}})
        if command == "guest-get-osinfo" and self.with_osinfo:
            return _reply({"return": WINDOWS_OS_INFO})
        if command == "guest-exec":
            return self._start(str(arguments["path"]), [str(a) for a in arguments.get("arg", [])])
        if command == "guest-exec-status" and arguments.get("pid") in self._runs:
            code, out = self._runs.pop(arguments["pid"])
            status = {"exited": True, "exitcode": code, "out-data": base64.b64encode(out).decode()}
            return _reply({"return": status})
        error = {"class": "CommandNotFound", "desc": f"The command {command} has not been found"}
        return _reply({"error": error})

    def _info(self) -> list[dict[str, Any]]:
        names = ["guest-sync-delimited", "guest-info", "guest-exec", "guest-exec-status"]
        names += ["guest-get-osinfo"] if self.with_osinfo else []
        return [{"name": name, "enabled": True, "success-response": True} for name in names]

    def _start(self, path: str, args: list[str]) -> bytes:
        self.programs.append((path, args))
        program = path.lower().removesuffix(".exe")
        if program == "cmd":
            code, out = 1, b"Starts a new instance of the Windows command interpreter\r\n"
        elif program == "ping":
            code, out = _ping(args, self.reachable)
        else:
            desc = f"Failed to execute child process \u201c{path}\u201d (No such file)"
            return _reply({"error": {"class": "GenericError", "desc": desc}})
        pid = next(self._pids)
        self._runs[pid] = (code, out)
        return _reply({"return": {"pid": pid}})


def _ping(args: list[str], reachable: Iterable[str]) -> tuple[int, bytes]:
    """Windows' ping: `-n COUNT -w MILLISECONDS TARGET`; other options are refused."""
    if len(args) != 5 or args[0] != "-n" or args[2] != "-w":
        return 1, f"Option {args[0] if args else ''} is incorrect.\r\n".encode()
    target = args[4]
    if target in set(reachable):
        return 0, f"Reply from {target}: bytes=32 time<1ms TTL=64\r\n".encode()
    return 1, b"Request timed out.\r\n"


def _reply(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode() + b"\n"


@contextlib.asynccontextmanager
async def serving(
    path: str,
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[None]:
    """A unix socket server at `path` running `serve` per client while the block runs."""
    server = await asyncio.start_unix_server(serve, path)
    try:
        yield
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def windows_agent(path: str, agent: WindowsAgent) -> AsyncIterator[WindowsAgent]:
    """Serve `agent` on the unix socket `path` while the block runs."""
    async with serving(path, agent.serve):
        yield agent

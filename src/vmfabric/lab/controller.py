"""The controller the lab works with: find one at `VMFABRIC_URL`, or start one in lab mode.

A controller the lab started is recorded like every other lab process and stopped by `down`;
one that was already running is left alone.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from vmfabric.config import api_token, api_url
from vmfabric.lab import proc
from vmfabric.lab.errors import LabError
from vmfabric.lab.names import host_bridge
from vmfabric.lab.state import LabStore, ProcessRecord, lab_dir

CONTROLLER = "vmf-controller"
INFO_PATH = "/api/v1/info"
HOSTS_PATH = "/api/v1/hosts"
START_TIMEOUT = 30.0
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ControllerStatus:
    """The controller the lab registered its hosts with."""

    url: str
    started_by_lab: bool
    pid: int | None


def controller_argv(url: str) -> list[str]:
    """`vmfabric serve --lab` listening where the CLI will look for it."""
    return [sys.executable, "-m", "vmfabric.cli.main", "serve", "--lab", "--listen", _listen(url)]


def ensure_controller(store: LabStore) -> ControllerStatus:
    """Use the controller at `VMFABRIC_URL`; start one in the background when none answers.

    A controller that answers but is not in lab mode cannot drive lab hosts, so it is refused.
    """
    url = api_url()
    info = probe(url)
    if info is None:
        return _start(store, url)
    _require_lab_mode(info, url)
    ours = store.read().processes.get(CONTROLLER)
    pid = proc.live_pid(ours) if ours is not None else None
    return ControllerStatus(url=url, started_by_lab=pid is not None, pid=pid)


def probe(url: str) -> dict[str, Any] | None:
    """The controller's info document, or None when nothing listens at `url`."""
    try:
        response = httpx.get(url + INFO_PATH, headers=_headers(), timeout=2.0)
    except httpx.TransportError:
        return None
    if response.status_code != 200:
        raise LabError(
            f"{url}{INFO_PATH} answered HTTP {response.status_code}; is it a vmfabric controller?"
        )
    try:
        info = response.json()
    except ValueError as err:
        raise LabError(
            f"{url}{INFO_PATH} did not answer JSON; is it a vmfabric controller?"
        ) from err
    return info if isinstance(info, dict) else {}


def register_hosts(hosts: list[str], url: str) -> None:
    """Register the lab hosts with the controller; hosts it already knows are fine."""
    with httpx.Client(base_url=url, headers=_headers(), timeout=10.0) as client:
        for host in hosts:
            body = {"name": host, "driver": "lab", "bridge": host_bridge(host)}
            try:
                response = client.post(HOSTS_PATH, json=body)
            except httpx.TransportError as err:
                raise LabError(f"cannot register host {host} at {url}: {err}") from err
            if response.status_code not in (200, 201, 409):
                raise LabError(
                    f"registering host {host} at {url} failed: HTTP {response.status_code} "
                    f"{_problem(response)}"
                )


def stop_controller(store: LabStore) -> bool:
    """Stop the controller if the lab started it (same pid and start time); tell whether.

    Done without the record's lock: the controller may be waiting for it to finish a request.
    """
    process = store.read().processes.get(CONTROLLER)
    if process is None:
        return False
    was_running = proc.is_alive(process)
    proc.stop(process, grace=10.0)
    _forget(store)
    return was_running


def _start(store: LabStore, url: str) -> ControllerStatus:
    log = lab_dir() / "controller.log"
    with store.edit() as record:
        known = record.state.processes.get(CONTROLLER)
        if known is None or not proc.is_alive(known):
            process = ProcessRecord(name=CONTROLLER, argv=controller_argv(url), log=str(log))
            record.remember_process(process)
            known = proc.spawn(process)
            record.remember_process(known)
    running = known
    proc.wait_until(
        lambda: not proc.is_alive(running) or probe(url) is not None, timeout=START_TIMEOUT
    )
    if not proc.is_alive(running):
        _forget(store)
        raise LabError(f"the controller exited at start; {log} ends with:\n{proc.log_tail(log)}")
    info = probe(url)
    if info is None:
        stop_controller(store)
        raise LabError(
            f"the controller did not answer at {url} within {START_TIMEOUT:g} s; "
            f"{log} ends with:\n{proc.log_tail(log)}"
        )
    _require_lab_mode(info, url)
    return ControllerStatus(url=url, started_by_lab=True, pid=proc.live_pid(running))


def _forget(store: LabStore) -> None:
    with store.edit() as record:
        record.forget_process(CONTROLLER)


def _require_lab_mode(info: dict[str, Any], url: str) -> None:
    if info.get("lab") is False:
        raise LabError(
            f"the controller at {url} is not in lab mode and cannot drive lab hosts; "
            "stop it and run `vmfabric lab up` again (it starts `vmfabric serve --lab`), "
            "or point VMFABRIC_URL at a controller started with --lab"
        )


def _listen(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
        raise LabError(
            f"no controller answers at {url}, and the lab can only start one on this "
            "machine's loopback over http; start it yourself or fix VMFABRIC_URL"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port or 80}"


def _headers() -> dict[str, str]:
    token = api_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _problem(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body)[:200]
    return str(body)[:200]

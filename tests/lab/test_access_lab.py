"""Issue 7 end to end in the lab: real clients (curl, ssh, scp) reach the web server and the
sshd inside lab VMs through the controller's access gateway, `vmfabric access forward` and
each VM's guest proxy, while the VMs' own network is down (`nic-down`).

One controller lab for the module (`lab up`, the controller and its gateway on free ports):
`app` on hv1 and `other` on hv2, both running the lab's web server and sshd on their
127.0.0.1. Tests that break something mend it before they end.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from vmfabric.cli.client import ApiClient
from vmfabric.lab import faults, lifecycle, services
from vmfabric.lab.proc import wait_until
from vmfabric.lab.state import LabStore, VmRecord
from vmfabric.lab.testing import controller_lab, wait_for_ipv4

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

SSH_OPTIONS = [
    *("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"),
    *("-o", "BatchMode=yes", "-o", "LogLevel=ERROR"),
]
MB = 1024 * 1024


@dataclass(frozen=True)
class Cloud:
    """The lab's API and where its access gateway answers."""

    api: ApiClient
    gateway: str

    def grant(self, vm: str, port: int) -> dict[str, Any]:
        body = {"vm": vm, "port": port, "ttl": "10m", "for": "tester", "by": "lab test"}
        grant = self.api.post("/access", body)
        assert isinstance(grant, dict)
        return grant

    def url(self, vm: str, port: int, path: str = "") -> str:
        return f"{self.gateway}/vm/{vm}/{port}/{path}"


@pytest.fixture(scope="module")
def cloud() -> Iterator[Cloud]:
    """`app` (hv1) and `other` (hv2) with their leases, serving web and ssh, then cut off
    from their network."""
    with controller_lab(2, {services.SERVICES_ENV: "web,ssh"}) as lab:
        api = ApiClient(lab.url)
        api.post("/networks", {"name": "acc", "cidrs": ["10.83.0.0/24"]})
        for name, host in (("app", "hv1"), ("other", "hv2")):
            api.post("/vms", {"name": name, "host": host, "nics": [{"network": "acc"}]})
        for name in ("app", "other"):
            assert wait_for_ipv4(name), name
            faults.inject(name, "nic-down")
        yield Cloud(api, lab.gateway_url)


def vm_record(name: str) -> VmRecord:
    return next(vm for vm in LabStore().read().vms.values() if vm.name == name)


def link_state(vm: str) -> str:
    shown = lifecycle.run_in_vm(vm, ["ip", "-br", "link", "show", "eth0"]).stdout
    return shown.split()[1]


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=60, check=False)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(MB):
            digest.update(chunk)
    return digest.hexdigest()


def random_file(path: Path, size: int) -> Path:
    with path.open("wb") as file:
        for _ in range(size // MB):
            file.write(os.urandom(MB))
    return path


@pytest.fixture
def forward(cloud: Cloud) -> Iterator[int]:
    """`vmfabric access forward app --port 22` in a process of its own (it asks the
    controller for a grant itself); its local port."""
    command = [sys.executable, "-m", "vmfabric.cli.main", "access", "forward", "app"]
    process = subprocess.Popen(
        [*command, "--port", "22", "--json"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline()]
        while lines[-1] and lines[-1].rstrip() != "}":
            lines.append(process.stdout.readline())
        document = json.loads("".join(lines))
        assert document["grant"] is not None and document["gateway"] == cloud.gateway
        yield int(document["local"].rsplit(":", 1)[1])
    finally:
        process.terminate()
        process.wait(10)


def ssh(port: int, command: str) -> str:
    """`command` run as root in the VM by the real ssh client through the forwarded port."""
    key = str(services.lab_key_path())
    argv = ["ssh", "-i", key, "-p", str(port), *SSH_OPTIONS, "root@127.0.0.1", command]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def scp(port: int, source: str, target: str) -> None:
    """The real scp client copies through the forwarded port."""
    key = str(services.lab_key_path())
    argv = ["scp", "-q", "-i", key, "-P", str(port), *SSH_OPTIONS, source, target]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


def test_curl_gets_the_vm_page_through_the_gateway_with_the_vm_network_down(
    cloud: Cloud,
) -> None:
    assert link_state("app") == "DOWN"
    credential = cloud.grant("app", 80)["credential"]
    page = curl("-f", "-H", f"Authorization: Bearer {credential}", cloud.url("app", 80))
    assert page.returncode == 0, page.stderr
    assert b"<p>lab VM app</p>" in page.stdout

    jar = Path(vm_record("app").directory) / "cookies.txt"
    first = cloud.url("app", 80, f"?access={credential}")
    browser = curl("-f", "-L", "-c", str(jar), "-b", str(jar), first)
    assert browser.returncode == 0, browser.stderr
    assert b"<p>lab VM app</p>" in browser.stdout
    again = curl("-f", "-b", str(jar), cloud.url("app", 80))
    assert b"<p>lab VM app</p>" in again.stdout


def test_ssh_runs_a_command_and_scp_copies_100_mb_through_access_forward(
    cloud: Cloud, forward: int, tmp_path: Path
) -> None:
    app = vm_record("app")
    assert ssh(forward, "ip netns identify; cat /sys/class/net/eth0/operstate") == (
        f"{app.netns}\ndown\n"
    )
    sent = random_file(tmp_path / "big.bin", 100 * MB)
    target = services.web_root(app) / "big.bin"
    scp(forward, str(sent), f"root@127.0.0.1:{target}")
    assert ssh(forward, f"sha256sum {target}").split()[0] == sha256(sent)

    back = tmp_path / "back.bin"
    scp(forward, f"root@127.0.0.1:{target}", str(back))
    assert sha256(back) == sha256(sent)


def test_fifty_concurrent_downloads_arrive_whole(cloud: Cloud, tmp_path: Path) -> None:
    served = random_file(services.web_root(vm_record("app")) / "two.bin", 2 * MB)
    credential = cloud.grant("app", 80)["credential"]
    command = ["curl", "-sSf", "-H", f"Authorization: Bearer {credential}"]
    url = cloud.url("app", 80, "two.bin")
    downloads = [
        subprocess.Popen([*command, "-o", str(tmp_path / f"{n}.bin"), url], stderr=subprocess.PIPE)
        for n in range(50)
    ]
    failed = [d.stderr.read() for d in downloads if d.wait(120) != 0 and d.stderr]
    assert failed == []
    expected = sha256(served)
    assert [n for n in range(50) if sha256(tmp_path / f"{n}.bin") != expected] == []


def status(response: httpx.Response) -> tuple[int, str]:
    assert response.headers["content-type"] == "application/problem+json"
    return response.status_code, response.json()["detail"]


def test_bad_credentials_and_names_are_refused(cloud: Cloud) -> None:
    grant = cloud.grant("app", 80)
    good = grant["credential"]
    with httpx.Client(timeout=10) as client:

        def get(url: str, credential: str | None = good) -> httpx.Response:
            headers = {"Authorization": f"Bearer {credential}"} if credential else {}
            return client.get(url, headers=headers)

        assert get(cloud.url("nosuch", 80)).status_code == 404
        assert get(cloud.url("app", 80), None).status_code == 401
        forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
        assert get(cloud.url("app", 80), forged).status_code == 401
        assert get(cloud.url("app", 22)).status_code == 403
        other = cloud.grant("other", 80)["credential"]
        assert get(cloud.url("app", 80), other).status_code == 403
        assert b"lab VM other" in get(cloud.url("other", 80), other).content

        cloud.api.post(f"/access/{grant['id']}/revoke", {"by": "lab test"})
        code, detail = status(get(cloud.url("app", 80)))
        assert code == 401 and "revoked" in detail


def test_guest_proxy_down_is_503_until_it_runs_again(cloud: Cloud) -> None:
    def bearer(vm: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {cloud.grant(vm, 80)['credential']}"}

    app, other = bearer("app"), bearer("other")
    with httpx.Client(timeout=10) as client:
        faults.inject("app", "access-down")
        try:
            code, detail = status(client.get(cloud.url("app", 80), headers=app))
            assert code == 503, detail
            assert client.get(cloud.url("other", 80), headers=other).status_code == 200
        finally:
            faults.heal("app")
            faults.inject("app", "nic-down")

        def served() -> bool:
            return client.get(cloud.url("app", 80), headers=app).status_code == 200

        assert wait_until(served, 15, interval=0.2)


def test_access_follows_the_vm_when_it_migrates(cloud: Cloud, forward: int) -> None:
    assert ssh(forward, "echo before") == "before\n"
    cloud.api.post("/vms/app/migrate", {"to": "hv2"})
    moved = wait_until(lambda: cloud.api.get("/vms/app")["host"] == "hv2", 30, interval=0.2)
    assert moved, cloud.api.get("/migrations")
    credential = cloud.grant("app", 80)["credential"]
    page = curl("-f", "-H", f"Authorization: Bearer {credential}", cloud.url("app", 80))
    assert b"<p>lab VM app</p>" in page.stdout, page.stderr
    assert ssh(forward, "echo after") == "after\n"

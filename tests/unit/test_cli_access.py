"""`vmfabric access`: what grant, list, show and revoke print (on a controller served in this
process), and bad options exiting 2 in one line before anything is asked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cli_process import vmfabric
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from vmfabric.cli import client
from vmfabric.cli.access import usage_lines
from vmfabric.cli.main import app
from vmfabric.domain.access import verify


@pytest.fixture
def cli(api: TestClient, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """The CLI talking to the test's controller: its HTTP client is the API's test client;
    one VM, web1."""
    monkeypatch.setattr(client.httpx, "Client", lambda **_options: api)
    api.post("/api/v1/hosts", json={"name": "hv1", "driver": "noop", "bridge": "br0"})
    api.post("/api/v1/networks", json={"name": "net1", "cidrs": ["10.0.0.0/24"]})
    body = {"name": "web1", "host": "hv1", "nics": [{"network": "net1"}]}
    assert api.post("/api/v1/vms", json=body).status_code == 201
    return CliRunner()


def invoke(cli: CliRunner, *args: str) -> Any:
    done = cli.invoke(app, ["access", *args])
    assert done.exit_code == 0, done.output
    return done


def test_grant_prints_the_credential_once_on_one_line_and_how_to_use_it(
    cli: CliRunner, state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMFABRIC_GATEWAY_URL", "http://gw.example:8751")
    lines = invoke(cli, "grant", "web1", "--port", "80", "--for", "alice").output.splitlines()
    assert lines[0].startswith("access ") and "to port 80 of web1 for alice, until " in lines[0]
    assert lines[1] == "credential (shown only now; keep it secret):"
    credential = lines[2]
    claims = verify((state / "access.key").read_bytes(), credential, time.time())
    assert (claims.vm, claims.port, claims.sub) == ("web1", 80, "alice")
    assert lines[4] == (
        f'  curl -H "Authorization: Bearer {credential}" http://gw.example:8751/vm/web1/80/'
    )
    assert lines[5] == f"  http://gw.example:8751/vm/web1/80/?access={credential}"


def test_json_output_is_the_api_document(cli: CliRunner) -> None:
    issued = json.loads(invoke(cli, "grant", "web1", "--port", "22", "--json").output)
    assert issued["vm"] == "web1" and issued["credential"].startswith("vmfa1.")
    assert issued["granted_by"].count("@") == 1
    listed = json.loads(invoke(cli, "list", "--vm", "web1", "--json").output)
    assert [g["id"] for g in listed] == [issued["id"]] and "credential" not in listed[0]
    shown = json.loads(invoke(cli, "show", issued["id"], "--json").output)
    assert shown["latest_uses"] == [] and shown["state"] == "active"
    revoked = json.loads(invoke(cli, "revoke", issued["id"], "--json").output)
    assert revoked["state"] == "revoked" and revoked["revoked_by"] == issued["granted_by"]
    assert json.loads(invoke(cli, "list", "--json").output) == []
    everything = json.loads(invoke(cli, "list", "--all", "--json").output)
    assert [g["state"] for g in everything] == ["revoked"]


def test_tables_show_grants_and_their_uses(cli: CliRunner) -> None:
    issued = json.loads(invoke(cli, "grant", "web1", "--port", "80", "--json").output)
    listed = invoke(cli, "list").output
    assert "Access grants" in listed and issued["id"] in listed and "active" in listed
    shown = invoke(cli, "show", issued["id"]).output
    assert f"Latest uses of {issued['id']}" in shown and "granted by " in shown
    revoked = invoke(cli, "revoke", issued["id"]).output
    assert revoked.startswith(f"access {issued['id']} to port 80 of web1 revoked by ")


def test_refusals_of_the_controller_exit_2_in_one_line(cli: CliRunner) -> None:
    for args, message in (
        (["grant", "nope", "--port", "80"], "error: unknown VM 'nope'"),
        (["show", "nope"], "error: unknown access grant 'nope'"),
        (["revoke", "what?"], "error: unknown access grant 'what?'"),
    ):
        done = cli.invoke(app, ["access", *args])
        assert done.exit_code == 2, done.output
        assert done.output.strip() == message


def test_usage_names_the_header_and_the_query_parameter() -> None:
    curl, url = usage_lines({"vm": "db1", "port": 5432, "credential": "vmfa1.a.b"})
    assert curl == 'curl -H "Authorization: Bearer vmfa1.a.b" http://127.0.0.1:8751/vm/db1/5432/'
    assert url == "http://127.0.0.1:8751/vm/db1/5432/?access=vmfa1.a.b"


def access(args: list[str], state: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`vmfabric access ARGS` against a controller that is not there."""
    return vmfabric(["access", *args], state, **env)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["grant", "web1", "--port", "0"], "error: invalid port 0: between 1 and 65535"),
        (["grant", "web1", "--port", "70000"], "error: invalid port 70000"),
        (["grant", "web1", "--port", "80", "--ttl", "5x"], "error: invalid ttl '5x': expected"),
        (["grant", "web1", "--port", "80", "--ttl", "30s"], "error: invalid ttl 30s: between"),
        (["grant", "web1", "--port", "80", "--ttl", "8d"], "error: ttl '8d' is too long"),
        (["forward", "web1", "--port", "0"], "error: invalid port 0: between 1 and 65535"),
        (["forward", "Web_1", "--port", "22"], "error: invalid VM name 'Web_1': use 1-63"),
        (
            ["forward", "web1", "--port", "22", "--local-port", "70000"],
            "error: invalid --local-port 70000: between 0 (any free port) and 65535",
        ),
        (
            ["forward", "web1", "--port", "22", "--credential", "secret"],
            "error: invalid --credential: expected vmfa1.<claims>.<signature>",
        ),
    ],
)
def test_bad_options_exit_2_in_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    done = access(args, tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(message)
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_absent_controller_exits_1_in_one_line(tmp_path: Path) -> None:
    done = access(["list"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("error: cannot reach the vmfabric controller")
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "error: invalid --access-key-file: cannot read the access key file "),
        (b"short", "error: invalid --access-key-file: the access key file "),
    ],
)
def test_serve_refuses_an_access_key_file_it_cannot_use(
    content: bytes | None, message: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "access.key"
    if content is not None:
        key_file.write_bytes(content)
    done = subprocess.run(
        [sys.executable, "-m", "vmfabric.cli.main", "serve", "--access-key-file", str(key_file)],
        env={**os.environ, "VMFABRIC_STATE": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(message)
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "vmfabric.db").exists()


def test_forward_refuses_a_gateway_url_it_cannot_use(tmp_path: Path) -> None:
    done = access(
        ["forward", "web1", "--port", "22"], tmp_path, VMFABRIC_GATEWAY_URL="https://gw:8751"
    )
    assert done.returncode == 2
    assert done.stderr == (
        "error: invalid VMFABRIC_GATEWAY_URL: expected http://HOST:PORT, not 'https://gw:8751'\n"
    )


def test_forward_exits_1_when_its_local_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = access(["forward", "web1", "--port", "22", "--local-port", str(port)], tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
    assert len(done.stderr.strip().splitlines()) == 1


def test_forward_without_a_credential_asks_the_controller_for_one(tmp_path: Path) -> None:
    done = access(["forward", "web1", "--port", "22"], tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith(
        "error: cannot reach the vmfabric controller at http://127.0.0.1:9"
    )
    assert len(done.stderr.strip().splitlines()) == 1

"""Access credentials through the API and the gateway's check: grant, list, show, revoke,
verification outcomes, the log of uses, bad input, the key file.

The gateway itself is not here: a stand-in route (`/vm/{vm}/{port}/`) calls
`services.access.access_use` as the gateway does, so its refusals are checked as HTTP answers.
"""

from __future__ import annotations

import base64
import json
import stat
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi import Request
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, func, select

from vmfabric.domain.access import KEY_BYTES, Claims, Refusal, UseKind, sign, verify
from vmfabric.domain.errors import (
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthorized,
    Unavailable,
    VmfabricError,
)
from vmfabric.services import access
from vmfabric.services.context import Controller
from vmfabric.store.tables import AccessGrant, AccessUse


@pytest.fixture
def cloud(api: TestClient) -> TestClient:
    """Two VMs, web1 and web2, on a noop host; the API."""
    api.post("/api/v1/hosts", json={"name": "hv1", "driver": "noop", "bridge": "br0"})
    api.post("/api/v1/networks", json={"name": "net1", "cidrs": ["10.0.0.0/24"]})
    for name in ("web1", "web2"):
        body = {"name": name, "host": "hv1", "nics": [{"network": "net1"}]}
        assert api.post("/api/v1/vms", json=body).status_code == 201
    return api


@pytest.fixture
def gateway(cloud: TestClient, controller: Controller) -> TestClient:
    """The API with a stand-in for the gateway's check of `/vm/{vm}/{port}/`: a credential
    from `Authorization: Bearer` or `?access=`, checked and logged by `access_use`."""

    def forward(vm: str, port: int, request: Request) -> dict[str, str]:
        header = request.headers.get("authorization", "")
        token = header.removeprefix("Bearer ") or request.query_params.get("access")
        client = request.client.host if request.client else None
        with access.access_use(controller, token, vm, port, client=client, kind=UseKind.HTTP):
            return {"forwarded": f"{vm}:{port}"}

    cloud.app.add_api_route("/vm/{vm}/{port}/", forward)  # type: ignore[attr-defined]
    return cloud


def grant(api: TestClient, **body: Any) -> dict[str, Any]:
    response = api.post("/api/v1/access", json={"vm": "web1", "port": 80, **body})
    assert response.status_code == 201, response.text
    return response.json()


def uses_of(api: TestClient, grant_id: str) -> list[str]:
    """The outcomes of a grant's logged uses, oldest first."""
    shown = api.get(f"/api/v1/access/{grant_id}").json()
    return [use["outcome"] for use in reversed(shown["latest_uses"])]


def counter(api: TestClient, name: str, **labels: str) -> float:
    """A counter's `_total` as `/metrics` shows it (0 before the first)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(api.get("/metrics").text)
        if family.name == name
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels == labels
    )


def stored(controller: Controller) -> int:
    with controller.uow() as uow:
        return int(uow.session.scalar(select(func.count()).select_from(AccessGrant)) or 0)


def test_a_grant_returns_a_credential_signed_with_the_state_directorys_key(
    cloud: TestClient, state: Path
) -> None:
    issued = grant(cloud, ttl="2h", **{"for": "alice@example.com"})
    assert issued.keys() >= {
        "id",
        "vm",
        "port",
        "user",
        "created_at",
        "expires_at",
        "revoked_at",
        "credential",
    }
    assert (issued["vm"], issued["port"], issued["user"]) == ("web1", 80, "alice@example.com")
    assert (issued["state"], issued["uses"], issued["revoked_at"]) == ("active", 0, None)
    key_file = state / "access.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes()) == KEY_BYTES
    claims = verify(key_file.read_bytes(), issued["credential"], time.time())
    assert (claims.id, claims.vm, claims.port, claims.sub) == (
        issued["id"],
        "web1",
        80,
        "alice@example.com",
    )
    assert claims.exp - claims.iat == 7200
    assert claims.expires_at.isoformat().replace("+00:00", "Z") == issued["expires_at"]


def test_the_default_ttl_is_15_minutes_and_the_credential_is_shown_once(
    cloud: TestClient,
) -> None:
    issued = grant(cloud)
    claims = Claims(**_claims_of(issued["credential"]))
    assert claims.exp - claims.iat == 900
    assert "credential" not in cloud.get(f"/api/v1/access/{issued['id']}").json()
    assert all("credential" not in g for g in cloud.get("/api/v1/access").json())


def _claims_of(credential: str) -> dict[str, Any]:
    body = credential.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))))


def test_list_gives_grants_in_force_and_all_of_them_on_request(cloud: TestClient) -> None:
    first = grant(cloud)
    second = grant(cloud, vm="web2", port=22)
    assert {g["id"] for g in cloud.get("/api/v1/access").json()} == {first["id"], second["id"]}
    assert [g["id"] for g in cloud.get("/api/v1/access?vm=web2").json()] == [second["id"]]
    revoked = cloud.post(f"/api/v1/access/{first['id']}/revoke", json={"by": "bob"})
    assert revoked.status_code == 200, revoked.text
    assert [g["id"] for g in cloud.get("/api/v1/access").json()] == [second["id"]]
    everything = {g["id"]: g["state"] for g in cloud.get("/api/v1/access?all=true").json()}
    assert everything == {first["id"]: "revoked", second["id"]: "active"}
    unknown = cloud.get("/api/v1/access?vm=nope")
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/problem+json"


def test_revoke_records_who_and_refuses_twice_or_an_unknown_id(cloud: TestClient) -> None:
    issued = grant(cloud)
    revoked = cloud.post(f"/api/v1/access/{issued['id']}/revoke", json={"by": "bob"}).json()
    assert (revoked["state"], revoked["revoked_by"]) == ("revoked", "bob")
    assert revoked["revoked_at"] is not None
    again = cloud.post(f"/api/v1/access/{issued['id']}/revoke", json={})
    assert again.status_code == 409
    assert "revoked already" in again.json()["detail"]
    missing = cloud.post("/api/v1/access/nope/revoke", json={})
    assert missing.status_code == 404
    assert missing.json()["detail"] == "unknown access grant 'nope'"
    assert cloud.get("/api/v1/access/nope").status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"vm": "web1", "port": 0}, 400, "invalid port 0: between 1 and 65535"),
        ({"vm": "web1", "port": 65536}, 400, "invalid port 65536"),
        ({"vm": "web1", "port": 80, "ttl": "5x"}, 400, "invalid ttl '5x'"),
        ({"vm": "web1", "port": 80, "ttl": "30s"}, 400, "invalid ttl 30s: between 1m and 7d"),
        ({"vm": "web1", "port": 80, "ttl": "8d"}, 400, "ttl '8d' is too long: at most 7d"),
        ({"vm": "web1", "port": 80, "for": "a b"}, 400, "invalid user 'a b'"),
        ({"vm": "web1", "port": 80, "by": ""}, 400, "invalid actor ''"),
        ({"vm": "web1"}, 400, "port: Field required"),
        ({"vm": "web1", "port": 80, "colour": "red"}, 400, "colour"),
        ({"vm": "nope", "port": 80}, 404, "unknown VM 'nope'"),
    ],
)
def test_bad_grants_are_refused_as_problems_and_nothing_is_stored(
    cloud: TestClient, controller: Controller, body: dict[str, Any], status: int, detail: str
) -> None:
    refused = counter(cloud, "vmfabric_access_grants", outcome="error")
    response = cloud.post("/api/v1/access", json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert detail in response.json()["detail"]
    assert stored(controller) == 0
    validated_by_fastapi = "colour" in body or "port" not in body
    expected = refused if validated_by_fastapi else refused + 1
    assert counter(cloud, "vmfabric_access_grants", outcome="error") == expected


def test_grants_are_counted_in_the_metrics(cloud: TestClient) -> None:
    before = counter(cloud, "vmfabric_access_grants", outcome="ok")
    grant(cloud)
    assert counter(cloud, "vmfabric_access_grants", outcome="ok") == before + 1


def test_the_gateway_check_answers_each_refusal_with_its_status_and_logs_every_use(
    gateway: TestClient, controller: Controller, state: Path
) -> None:
    issued = grant(gateway)
    credential = issued["credential"]
    key = (state / "access.key").read_bytes()
    claims = verify(key, credential, time.time())
    expired = sign(key, replace(claims, iat=claims.iat - 900, exp=int(time.time()) - 1))
    forged = sign(b"x" * KEY_BYTES, claims)
    bearer = {"Authorization": f"Bearer {credential}"}
    uses_before = counter(gateway, "vmfabric_access_uses", kind="http", outcome="forbidden")

    cases: list[tuple[str, dict[str, str], int, str | None]] = [
        ("/vm/web1/80/", bearer, 200, None),
        (f"/vm/web1/80/?access={credential}", {}, 200, None),
        ("/vm/nope/80/", bearer, 404, None),
        ("/vm/web1/80/", {}, 401, Refusal.MISSING),
        ("/vm/web1/80/", {"Authorization": "Bearer vmfa1.garbage"}, 401, Refusal.MALFORMED),
        ("/vm/web1/80/", {"Authorization": f"Bearer {forged}"}, 401, Refusal.FORGED),
        ("/vm/web1/80/", {"Authorization": f"Bearer {expired}"}, 401, Refusal.EXPIRED),
        ("/vm/web2/80/", bearer, 403, Refusal.OTHER_VM),
        ("/vm/web1/22/", bearer, 403, Refusal.OTHER_PORT),
    ]
    for path, headers, status, reason in cases:
        response = gateway.get(path, headers=headers)
        assert response.status_code == status, (path, response.text)
        if status != 200:
            problem = response.json()
            assert response.headers["content-type"] == "application/problem+json"
            assert problem["status"] == status and problem["detail"]
            assert problem.get("reason") == reason
        if status == 401:
            challenge = response.headers["www-authenticate"]
            assert challenge.startswith('Bearer realm="vmfabric"')
            assert ("invalid_token" in challenge) == (reason != Refusal.MISSING)

    gateway.post(f"/api/v1/access/{issued['id']}/revoke", json={"by": "bob"})
    revoked = gateway.get("/vm/web1/80/", headers=bearer)
    assert revoked.status_code == 401 and revoked.json()["reason"] == Refusal.REVOKED

    # Uses of the grant are those whose credential was authentic; every one is logged.
    assert uses_of(gateway, issued["id"]) == [
        "ok",
        "ok",
        "unauthorized",
        "forbidden",
        "forbidden",
        "unauthorized",
    ]
    with controller.uow() as uow:
        logged = uow.session.execute(select(AccessUse.vm, AccessUse.outcome)).all()
    assert len(logged) == len(cases) + 1
    assert ("nope", "not-found") in logged
    assert all(client == "testclient" for client in _clients(controller))
    assert counter(gateway, "vmfabric_access_uses", kind="http", outcome="forbidden") == (
        uses_before + 2
    )
    listed = gateway.get("/api/v1/access?all=true").json()[0]
    assert listed["uses"] == 6 and listed["last_used_at"] is not None


def _clients(controller: Controller) -> list[str | None]:
    with controller.uow() as uow:
        return list(uow.session.scalars(select(AccessUse.client)))


def test_a_failed_forward_is_logged_as_unavailable(
    cloud: TestClient, controller: Controller
) -> None:
    issued = grant(cloud)
    with (
        pytest.raises(Unavailable),
        access.access_use(
            controller, issued["credential"], "web1", 80, client="192.0.2.7:5000", kind=UseKind.TCP
        ),
    ):
        raise Unavailable("the guest's proxy does not answer")
    (use,) = cloud.get(f"/api/v1/access/{issued['id']}").json()["latest_uses"]
    assert (use["outcome"], use["kind"], use["client"]) == ("unavailable", "tcp", "192.0.2.7:5000")
    assert use["detail"] == "the guest's proxy does not answer"


@pytest.mark.parametrize(
    ("token", "vm", "port", "error"),
    [
        (None, "nope", 80, NotFound),
        (None, "web1", 80, Unauthorized),
        ("vmfa1.x.y", "web1", 80, Unauthorized),
        ("good", "web2", 80, Forbidden),
        ("good", "web1", 443, Forbidden),
    ],
)
def test_verify_access_tells_the_refusals_apart(
    cloud: TestClient,
    controller: Controller,
    token: str | None,
    vm: str,
    port: int,
    error: type[VmfabricError],
) -> None:
    credential = grant(cloud)["credential"]
    with pytest.raises(error):
        access.verify_access(controller, credential if token == "good" else token, vm, port)
    verified = access.verify_access(controller, credential, "web1", 80)
    assert (verified.vm, verified.port) == ("web1", 80)
    with pytest.raises(Unauthorized) as expired:
        access.verify_access(controller, credential, "web1", 80, now=time.time() + 3600)
    assert expired.value.extra["reason"] == Refusal.EXPIRED


@pytest.fixture
def statements(controller: Controller) -> Iterator[list[str]]:
    """The SQL statements run on the controller's database while the test runs."""
    seen: list[str] = []
    engine = controller.sessions.kw["bind"]

    def count(*args: Any) -> None:
        seen.append(args[2])

    event.listen(engine, "before_cursor_execute", count)
    yield seen
    event.remove(engine, "before_cursor_execute", count)


def test_verification_reads_the_store_at_most_once_a_second_and_sees_revocations_at_once(
    cloud: TestClient, controller: Controller, statements: list[str]
) -> None:
    issued = grant(cloud)
    access.verify_access(controller, issued["credential"], "web1", 80)
    statements.clear()
    for _ in range(1000):
        access.verify_access(controller, issued["credential"], "web1", 80)
    assert len(statements) <= 2  # a refresh, if a second passed
    access.revoke_grant(controller, issued["id"], "bob")
    with pytest.raises(Unauthorized) as refused:
        access.verify_access(controller, issued["credential"], "web1", 80)
    assert refused.value.extra["reason"] == Refusal.REVOKED


def test_the_gateway_can_do_the_checks_reads_beforehand_off_its_loop(
    cloud: TestClient,
    controller: Controller,
    statements: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    issued = grant(cloud)
    assert not access.access_checks_ready(controller)  # granting invalidated the snapshot
    access.prepare_access_checks(controller)
    assert access.access_checks_ready(controller)
    statements.clear()
    access.verify_access(controller, issued["credential"], "web1", 80)
    assert statements == []

    later = time.monotonic() + access.REFRESH_S
    monkeypatch.setattr(access.time, "monotonic", lambda: later)
    assert not access.access_checks_ready(controller)
    access.prepare_access_checks(controller)
    assert access.access_checks_ready(controller)
    assert statements != []


def test_uses_are_written_in_batches_without_waiting(
    cloud: TestClient, controller: Controller, statements: list[str]
) -> None:
    issued = grant(cloud)
    statements.clear()
    use = access.Use("web1", 80, "192.0.2.1", UseKind.HTTP, access.Outcome.OK, None, issued["id"])
    for _ in range(200):
        access.record_use(controller, use)
    assert statements == []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _logged(controller) < 200:
        time.sleep(0.05)
    assert _logged(controller) == 200
    assert len([s for s in statements if s.lstrip().upper().startswith("INSERT")]) == 1


def _logged(controller: Controller) -> int:
    with controller.uow() as uow:
        return int(uow.session.scalar(select(func.count()).select_from(AccessUse)) or 0)


def test_a_deleted_vm_takes_its_grants_along_and_its_credentials_open_nothing(
    cloud: TestClient, controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access, "REFRESH_S", 0.0)
    issued = grant(cloud)
    with access.access_use(
        controller, issued["credential"], "web1", 80, client=None, kind=UseKind.HTTP
    ):
        pass
    assert access.flush_uses(controller) == 1
    assert cloud.delete("/api/v1/vms/web1").status_code == 204
    with pytest.raises(NotFound):
        access.verify_access(controller, issued["credential"], "web1", 80)
    body = {"name": "web1", "host": "hv1", "nics": [{"network": "net1"}]}
    assert cloud.post("/api/v1/vms", json=body).status_code == 201
    with pytest.raises(Unauthorized) as refused:
        access.verify_access(controller, issued["credential"], "web1", 80)
    assert refused.value.extra["reason"] == Refusal.UNKNOWN
    assert stored(controller) == 0
    with controller.uow() as uow:
        logged = uow.session.execute(select(AccessUse.vm, AccessUse.grant_id, AccessUse.outcome))
        assert logged.all() == [("web1", None, "ok")]


def test_a_configured_key_signs_and_a_short_key_file_is_refused(
    controller: Controller, cloud: TestClient, tmp_path: Path
) -> None:
    key = b"k" * KEY_BYTES
    access.configure_access(controller, key)
    issued = grant(cloud)
    assert verify(key, issued["credential"], time.time()).id == issued["id"]
    short = tmp_path / "short.key"
    short.write_bytes(b"too short")
    with pytest.raises(InvalidInput, match="holds 9 bytes: it needs at least 32"):
        access.read_key(short)
    with pytest.raises(InvalidInput, match="cannot read the access key file"):
        access.read_key(tmp_path / "missing.key")

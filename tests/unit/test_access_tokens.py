"""Access credentials (`domain.access`): the format, what is refused and why, the ttl syntax.

The property tests hold the signature to its purpose: no change of any character of a
credential, nor any other key, yields a credential that is accepted.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
import string
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmfabric.domain.access import (
    KEY_BYTES,
    MAX_TOKEN,
    Claims,
    Outcome,
    Refusal,
    check_port,
    check_scope,
    check_user,
    describe_ttl,
    new_claims,
    new_grant_id,
    outcome_of,
    parse_ttl,
    sign,
    verify,
)
from vmfabric.domain.errors import Forbidden, InvalidInput, NotFound, Unauthorized, Unavailable

KEY = bytes(range(KEY_BYTES))
NOW = 1_700_000_000
CLAIMS = Claims("AAAAAAAAAAAAAAAAAAAAAA", "web1", 80, "alice", NOW, NOW + 900)
TOKEN = sign(KEY, CLAIMS)
TOKEN_CHARS = string.ascii_letters + string.digits + "-_."


def refusal(token: str | None, key: bytes = KEY, now: float = NOW) -> Refusal:
    with pytest.raises(Unauthorized) as refused:
        verify(key, token, now)
    reason = refused.value.extra["reason"]
    assert isinstance(reason, Refusal)
    return reason


def test_a_credential_is_prefix_claims_and_signature_in_base64url() -> None:
    prefix, body, signature = TOKEN.split(".")
    assert prefix == "vmfa1"
    assert re.fullmatch(r"[A-Za-z0-9_-]+", body) and re.fullmatch(r"[A-Za-z0-9_-]{43}", signature)
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert claims == {
        "id": CLAIMS.id,
        "vm": "web1",
        "port": 80,
        "sub": "alice",
        "iat": NOW,
        "exp": NOW + 900,
    }
    assert verify(KEY, TOKEN, NOW) == CLAIMS
    assert verify(KEY, TOKEN, NOW + 899) == CLAIMS


def test_the_documented_test_vector() -> None:
    assert TOKEN == (
        "vmfa1.eyJpZCI6IkFBQUFBQUFBQUFBQUFBQUFBQUFBQUEiLCJ2bSI6IndlYjEiLCJwb3J0Ijo4MCwic3ViIjoi"
        "YWxpY2UiLCJpYXQiOjE3MDAwMDAwMDAsImV4cCI6MTcwMDAwMDkwMH0."
        "Ngxz0Pk1Yd4p0M9GWrJm5-Zxuk3Snc3zRN0Hpder5yk"
    )


def test_new_claims_have_a_random_22_character_id_and_the_ttl() -> None:
    first = new_claims("web1", 22, timedelta(hours=2), None, NOW + 0.7)
    second = new_claims("web1", 22, timedelta(hours=2), None, NOW)
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", first.id) and first.id != second.id
    assert (first.iat, first.exp, first.sub) == (NOW, NOW + 7200, None)
    assert verify(KEY, sign(KEY, first), NOW) == first


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, Refusal.MISSING),
        ("", Refusal.MISSING),
        ("garbage", Refusal.MALFORMED),
        ("vmfa1.abc", Refusal.MALFORMED),
        (TOKEN.replace("vmfa1.", "vmfa2.", 1), Refusal.MALFORMED),
        (TOKEN + ".x", Refusal.MALFORMED),
        (TOKEN + "A", Refusal.MALFORMED),
        (TOKEN.replace(".", ".+", 1), Refusal.MALFORMED),
        ("vmfa1." + "A" * MAX_TOKEN + "." + "A" * 43, Refusal.MALFORMED),
    ],
)
def test_missing_and_malformed_credentials_are_refused(token: str | None, reason: Refusal) -> None:
    assert refusal(token) == reason


def test_another_keys_credential_is_forged() -> None:
    assert refusal(sign(b"k" * KEY_BYTES, CLAIMS)) == Refusal.FORGED


def test_changed_claims_with_the_old_signature_are_forged() -> None:
    _, _, signature = TOKEN.split(".")
    other = sign(KEY, Claims(CLAIMS.id, "web2", 80, "alice", NOW, NOW + 900)).split(".")[1]
    assert refusal(f"vmfa1.{other}.{signature}") == Refusal.FORGED


def test_a_credential_expires_at_its_exp() -> None:
    with pytest.raises(Unauthorized) as refused:
        verify(KEY, TOKEN, NOW + 900)
    assert refused.value.extra == {"reason": Refusal.EXPIRED, "grant": CLAIMS.id}
    assert "expired at 2023-11-14T22:28:20+00:00" in refused.value.detail


def test_claims_the_key_signed_that_are_not_claims_are_malformed() -> None:
    body = _encode(b'{"id":"x","vm":"web1","port":true}')
    signature = _encode(hmac.digest(KEY, f"vmfa1.{body}".encode(), "sha256"))
    assert refusal(f"vmfa1.{body}.{signature}") == Refusal.MALFORMED


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@given(st.data())
def test_any_change_of_any_character_is_refused(data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(TOKEN) - 1))
    replacement = data.draw(st.sampled_from(TOKEN_CHARS).filter(lambda c: c != TOKEN[position]))
    tampered = TOKEN[:position] + replacement + TOKEN[position + 1 :]
    with pytest.raises(Unauthorized):
        verify(KEY, tampered, NOW)


@given(st.text(alphabet=TOKEN_CHARS, max_size=300))
def test_no_other_text_is_accepted(token: str) -> None:
    if token != TOKEN:
        with pytest.raises(Unauthorized):
            verify(KEY, token, NOW)


@given(st.integers(0, len(TOKEN) - 1), st.integers(1, 20))
def test_cut_or_lengthened_credentials_are_refused(position: int, extra: int) -> None:
    for changed in (TOKEN[:position], TOKEN[:position] + "A" * extra + TOKEN[position:]):
        with pytest.raises(Unauthorized):
            verify(KEY, changed, NOW)


@given(st.binary(min_size=KEY_BYTES, max_size=64).filter(lambda key: key != KEY))
def test_no_other_key_verifies(key: bytes) -> None:
    with pytest.raises(Unauthorized):
        verify(key, TOKEN, NOW)


def test_the_scope_is_the_vm_and_the_port() -> None:
    check_scope(CLAIMS, "web1", 80)
    with pytest.raises(Forbidden) as other_vm:
        check_scope(CLAIMS, "web2", 80)
    assert other_vm.value.extra["reason"] == Refusal.OTHER_VM
    with pytest.raises(Forbidden) as other_port:
        check_scope(CLAIMS, "web1", 22)
    assert other_port.value.extra["reason"] == Refusal.OTHER_PORT


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1m", 60),
        ("90s", 90),
        ("15m", 900),
        ("2h", 7200),
        ("1d", 86400),
        ("7d", 7 * 86400),
        ("1h30m", 5400),
        (" 2H ", 7200),
    ],
)
def test_ttls_read_as_durations(text: str, seconds: int) -> None:
    assert parse_ttl(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid ttl '': expected a number and a unit"),
        ("15", "invalid ttl '15': expected a number and a unit"),
        ("5x", "invalid ttl '5x'"),
        ("-5m", "invalid ttl '-5m'"),
        ("1.5h", "invalid ttl '1.5h'"),
        ("m", "invalid ttl 'm'"),
        ("30s", "invalid ttl 30s: between 1m and 7d"),
        ("0m", "invalid ttl 0s: between 1m and 7d"),
        ("8d", "ttl '8d' is too long: at most 7d"),
        ("999999999d", "ttl '999999999d' is too long"),
        ("1" * 20 + "s", "invalid ttl"),
    ],
)
def test_bad_ttls_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        parse_ttl(text)
    assert refused.value.detail.startswith(message)


def test_durations_are_described_as_they_are_written() -> None:
    assert describe_ttl(timedelta(hours=1, minutes=30)) == "1h30m"
    assert describe_ttl(timedelta(days=7)) == "7d"


@pytest.mark.parametrize("port", [0, -1, 65536, True])
def test_ports_outside_1_to_65535_are_refused(port: int) -> None:
    with pytest.raises(InvalidInput):
        check_port(port)


@pytest.mark.parametrize("user", ["", "a b", "x" * 129, "tab\there", "nl\n"])
def test_users_must_be_printable_words(user: str) -> None:
    with pytest.raises(InvalidInput):
        check_user(user)


def test_users_may_be_logins_or_addresses() -> None:
    assert check_user("alice@example.com") == "alice@example.com"
    assert check_user(None) is None


def test_errors_become_the_outcomes_of_the_log() -> None:
    assert outcome_of(Unauthorized("x")) == Outcome.UNAUTHORIZED
    assert outcome_of(Forbidden("x")) == Outcome.FORBIDDEN
    assert outcome_of(NotFound("x")) == Outcome.NOT_FOUND
    assert outcome_of(Unavailable("x")) == Outcome.UNAVAILABLE
    assert outcome_of(ConnectionResetError()) == Outcome.UNAVAILABLE


def test_a_401_names_the_bearer_scheme_and_an_invalid_token() -> None:
    assert Unauthorized("x", reason="missing").challenge == 'Bearer realm="vmfabric"'
    assert Unauthorized("x", reason="expired").challenge.endswith('error="invalid_token"')


def test_grant_ids_never_start_with_a_dash() -> None:
    """`access show ID` would read such an id as an option (one id in 64 did)."""
    ids = [new_grant_id() for _ in range(2000)]
    assert not [grant_id for grant_id in ids if grant_id.startswith("-")]
    assert len(set(ids)) == len(ids)

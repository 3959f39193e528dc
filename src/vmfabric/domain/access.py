"""Access credentials for a server inside a VM (issue 7; CN107273186A, step 1): their format,
their signature and what makes one valid for a request.

A credential is a compact signed token, `vmfa1.<claims>.<signature>`: `claims` is the
base64url (unpadded) of a JSON object `{"id", "vm", "port", "sub", "iat", "exp"}` (the grant's
id, the VM and port it opens, the user it was issued for or null, issue and expiry time in
unix seconds), `signature` the base64url of HMAC-SHA256 under the controller's key of the
text `vmfa1.<claims>`. The controller checks it with nothing but the key: no database lookup
is needed to know that a credential is authentic and unexpired, which keeps the check cheap
enough for every request through the access gateway. Revocation is the services' part.

Checks, in the order the gateway's answers depend on (`docs/access.md`): the form (malformed),
the signature (forged), the expiry (expired), all 401 (`Unauthorized`, `extra["reason"]`
naming which); then the scope (`check_scope`: another VM or port, 403 `Forbidden`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from vmfabric.domain.errors import Forbidden, InvalidInput, NotFound, Unauthorized

PREFIX = "vmfa1"
"""Names the format and its version; a new format gets a new prefix, so both can be told
apart while old credentials run out."""

KEY_BYTES = 32
"""Length of a generated signing key, and the least a key file must hold (HMAC-SHA256's
block of security)."""

ID_BYTES = 16
"""Random bytes of a grant's id (22 characters of base64url): unguessable, so an id seen in a
log or a listing gives nothing away, and never reused."""

MAX_TOKEN = 2048
"""Longest text taken for a credential: more is refused before any decoding."""

MIN_TTL = timedelta(minutes=1)
MAX_TTL = timedelta(days=7)
DEFAULT_TTL = "15m"
"""A credential is short-lived by default: access through the gateway is for a task at hand."""

MAX_USER = 128
QUERY_PARAMETER = "access"
"""The query parameter of a gateway URL that may carry the credential (`?access=...`), for
clients that cannot set an `Authorization` header (a browser)."""

_SIGNATURE_CHARS = 43
"""base64url of a 32-byte HMAC-SHA256, unpadded."""
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_TTL_PART = re.compile(r"(\d{1,9})([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_CLAIM_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "vm": (str,),
    "port": (int,),
    "sub": (str, type(None)),
    "iat": (int,),
    "exp": (int,),
}


class Refusal(StrEnum):
    """Why a credential does not open a request: the `reason` of the problem document."""

    MISSING = "missing"
    MALFORMED = "malformed"
    FORGED = "forged"
    EXPIRED = "expired"
    REVOKED = "revoked"
    UNKNOWN = "unknown"
    OTHER_VM = "other-vm"
    OTHER_PORT = "other-port"


class UseKind(StrEnum):
    """How a credential was used at the gateway."""

    HTTP = "http"
    TCP = "tcp"


class Outcome(StrEnum):
    """How one use of a credential ended, as the log of uses keeps it."""

    OK = "ok"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not-found"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Claims:
    """What a credential says: grant `id`, `vm` and `port` it opens, the user (`sub`) it was
    issued for, issued-at and expiry in unix seconds."""

    id: str
    vm: str
    port: int
    sub: str | None
    iat: int
    exp: int

    @property
    def expires_at(self) -> datetime:
        """The expiry as a time (UTC)."""
        return datetime.fromtimestamp(self.exp, UTC)

    @property
    def issued_at(self) -> datetime:
        """The issue time (UTC)."""
        return datetime.fromtimestamp(self.iat, UTC)


def new_grant_id() -> str:
    """A random url-safe id that does not start with `-`: operators type it after a command
    (`access revoke ID`), where a leading `-` would read as an option."""
    while True:
        grant_id = secrets.token_urlsafe(ID_BYTES)
        if not grant_id.startswith("-"):
            return grant_id


def new_claims(vm: str, port: int, ttl: timedelta, user: str | None, now: float) -> Claims:
    """The claims of a new grant with a fresh random id, valid `ttl` from `now`."""
    issued = int(now)
    return Claims(new_grant_id(), vm, port, user, issued, issued + int(ttl.total_seconds()))


def sign(key: bytes, claims: Claims) -> str:
    """The credential of `claims` under `key`."""
    text = json.dumps(asdict(claims), separators=(",", ":"), ensure_ascii=False)
    body = _encode(text.encode())
    return f"{PREFIX}.{body}.{_signature(key, body)}"


def verify(key: bytes, token: str | None, now: float) -> Claims:
    """The claims of an authentic credential valid at `now` (unix seconds).

    Raises `Unauthorized` with `reason` missing, malformed, forged or expired. The signature
    is checked on the text as given, before anything of it is decoded (so no variant
    spelling of the same bytes passes), and compared in constant time.
    """
    if not token:
        raise _refused(Refusal.MISSING, "no access credential was given")
    parts = token.split(".")
    if (
        len(token) > MAX_TOKEN
        or len(parts) != 3
        or parts[0] != PREFIX
        or len(parts[2]) != _SIGNATURE_CHARS
        or not all(_BASE64URL.fullmatch(part) for part in parts[1:])
    ):
        raise _refused(
            Refusal.MALFORMED,
            f"the access credential is malformed: expected {PREFIX}.<claims>.<signature>",
        )
    if not hmac.compare_digest(parts[2], _signature(key, parts[1])):
        raise _refused(Refusal.FORGED, "the access credential's signature is not valid")
    claims = _decode_claims(parts[1])
    if now >= claims.exp:
        raise _refused(
            Refusal.EXPIRED,
            f"the access credential expired at {claims.expires_at.isoformat()}",
            grant=claims.id,
        )
    return claims


def check_scope(claims: Claims, vm: str, port: int) -> None:
    """Raise `Forbidden` unless the credential opens `port` of `vm`."""
    if claims.vm != vm:
        raise Forbidden(
            f"the access credential is for VM {claims.vm!r}, not {vm!r}",
            reason=Refusal.OTHER_VM,
            grant=claims.id,
        )
    if claims.port != port:
        raise Forbidden(
            f"the access credential is for port {claims.port} of {vm}, not port {port}",
            reason=Refusal.OTHER_PORT,
            grant=claims.id,
        )


def parse_ttl(text: str) -> timedelta:
    """A credential's validity from `30s`, `15m`, `2h`, `1d` (or sums such as `1h30m`),
    between `MIN_TTL` and `MAX_TTL`."""
    spec = text.strip().lower()
    parts = _TTL_PART.findall(spec)
    if not spec or "".join(number + unit for number, unit in parts) != spec:
        raise InvalidInput(
            f"invalid ttl {text!r}: expected a number and a unit (s, m, h or d), "
            "e.g. 30s, 15m, 2h, 1d or 1h30m"
        )
    seconds = sum(int(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    if seconds > MAX_TTL.total_seconds():
        raise InvalidInput(f"ttl {text!r} is too long: at most {describe_ttl(MAX_TTL)}")
    return check_ttl(timedelta(seconds=seconds))


def check_ttl(ttl: timedelta) -> timedelta:
    """`ttl` if a credential may be valid that long, else `InvalidInput` giving the bounds."""
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise InvalidInput(
            f"invalid ttl {describe_ttl(ttl)}: between {describe_ttl(MIN_TTL)} and "
            f"{describe_ttl(MAX_TTL)}"
        )
    return ttl


def describe_ttl(ttl: timedelta) -> str:
    """A duration in the units `parse_ttl` reads, largest first (`1h30m`)."""
    seconds = int(ttl.total_seconds())
    if seconds <= 0:
        return f"{seconds}s"
    parts = []
    for unit, size in sorted(_UNIT_SECONDS.items(), key=lambda item: -item[1]):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def check_port(port: int) -> int:
    """`port` if it is a TCP port a credential can open (1-65535)."""
    if isinstance(port, bool) or not 1 <= port <= 0xFFFF:
        raise InvalidInput(f"invalid port {port}: between 1 and 65535")
    return port


def check_user(user: str | None) -> str | None:
    """The user a credential is issued for: any printable text without spaces (a login, an
    e-mail address), up to `MAX_USER` characters; None for nobody in particular."""
    if user is None:
        return None
    if not 0 < len(user) <= MAX_USER or not user.isprintable() or any(c.isspace() for c in user):
        raise InvalidInput(
            f"invalid user {user!r}: 1-{MAX_USER} printable characters without spaces"
        )
    return user


def outcome_of(error: BaseException) -> Outcome:
    """The logged outcome of a use that ended with `error`: a refusal by its kind, anything
    else (the guest's proxy down, the client gone) as unavailable."""
    if isinstance(error, Unauthorized):
        return Outcome.UNAUTHORIZED
    if isinstance(error, Forbidden):
        return Outcome.FORBIDDEN
    if isinstance(error, NotFound):
        return Outcome.NOT_FOUND
    return Outcome.UNAVAILABLE


def _refused(reason: Refusal, detail: str, **extra: object) -> Unauthorized:
    return Unauthorized(detail, reason=reason, **extra)


def _signature(key: bytes, body: str) -> str:
    return _encode(hmac.digest(key, f"{PREFIX}.{body}".encode(), "sha256"))


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode_claims(body: str) -> Claims:
    """The claims of an authentic credential; malformed when they are not what `sign` writes
    (possible only for a credential signed by something else with the same key)."""
    try:
        document = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError):
        document = None
    if (
        not isinstance(document, dict)
        or document.keys() != _CLAIM_TYPES.keys()
        or any(
            isinstance(document[name], bool) or not isinstance(document[name], types)
            for name, types in _CLAIM_TYPES.items()
        )
    ):
        raise _refused(Refusal.MALFORMED, "the access credential's claims are malformed")
    return Claims(**document)

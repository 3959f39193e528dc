"""Errors the use cases raise; the API maps each kind to one HTTP status.

Every error carries a `detail` written for the operator: what was wrong and, where it helps,
what would be accepted instead.
"""

from __future__ import annotations


class VmfabricError(Exception):
    """Base of the errors an operator can act on."""

    status = 500
    title = "Internal error"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidInput(VmfabricError, ValueError):
    """The request itself is wrong (a bad name, an address outside the subnet, ...).

    Also a ValueError, so code that checks values with the domain rules can catch it as one.
    """

    status = 400
    title = "Invalid input"


class Unauthorized(VmfabricError):
    """The request carries no credential, or one that is not (or no longer) valid: malformed,
    forged, expired or revoked (`extra["reason"]` says which)."""

    status = 401
    title = "Unauthorized"

    @property
    def challenge(self) -> str:
        """The answer's `WWW-Authenticate` (RFC 6750): a credential that was presented but is
        not valid is an `invalid_token`; a missing one only names the scheme."""
        if self.extra.get("reason") in (None, "missing"):
            return 'Bearer realm="vmfabric"'
        return 'Bearer realm="vmfabric", error="invalid_token"'


class Forbidden(VmfabricError):
    """The credential is valid but does not cover what the request asks for (another VM or
    another port)."""

    status = 403
    title = "Forbidden"


class NotFound(VmfabricError):
    """The request names something that does not exist."""

    status = 404
    title = "Not found"


class Conflict(VmfabricError):
    """The request clashes with the current state (a name or address already taken)."""

    status = 409
    title = "Conflict"


class Exhausted(Conflict):
    """No free address is left in the subnets the request could use."""

    title = "Subnet exhausted"


class Unavailable(VmfabricError):
    """A host, driver or server needed for the request did not do its part."""

    status = 503
    title = "Unavailable"

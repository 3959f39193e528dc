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

"""Names of VMs, hosts, networks and images.

They become DNS labels (`<vm>.<zone>`, `<host>-<image>.<zone>`), so they must be valid labels.
"""

from __future__ import annotations

import re

from vmfabric.domain.errors import InvalidInput

MAX_LABEL = 63
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_name(kind: str, name: str) -> str:
    """Return `name` if it is a DNS label, else raise InvalidInput saying what a name may be."""
    if not _LABEL.match(name):
        raise InvalidInput(
            f"invalid {kind} name {name!r}: use 1-63 characters a-z, 0-9 and '-', "
            "not starting or ending with '-'"
        )
    return name


def is_label(text: str) -> bool:
    """Whether `text` may be a name (a DNS label)."""
    return _LABEL.match(text) is not None


def normalize_mac(mac: str) -> str:
    """Lower-case colon form, so a MAC compares equal however the hypervisor spelled it."""
    parts = re.split(r"[:-]", mac.strip())
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9a-fA-F]{2}", p) for p in parts):
        raise InvalidInput(
            f"invalid MAC address {mac!r}: expected six hex pairs like 52:54:00:12:34:56"
        )
    return ":".join(p.lower() for p in parts)

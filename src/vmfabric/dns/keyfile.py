"""The TSIG key of zone transfers and NOTIFY, read from the file `tsig-keygen` writes.

One file then configures both ends: `serve --dns-tsig-key-file` here, and an `include` of
the same file in a BIND secondary's named.conf (or its `key` clause copied into Knot's).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.name
import dns.tsig

_KEY = re.compile(
    r'key\s+"(?P<name>[^"]+)"\s*\{\s*algorithm\s+(?P<algorithm>[\w.-]+)\s*;'
    r'\s*secret\s+"(?P<secret>[^"]+)"\s*;\s*\}\s*;'
)


@dataclass(frozen=True)
class TsigKey:
    """A shared secret for signing DNS messages (RFC 8945)."""

    name: str
    algorithm: str
    secret: str


def read_key_file(path: Path) -> TsigKey:
    """The first `key` clause of a file in named.conf syntax.

    Raises OSError when the file cannot be read and ValueError saying what is wrong with it.
    """
    found = _KEY.search(path.read_text())
    if found is None:
        raise ValueError(
            f'{path} holds no key clause like `key "NAME" {{ algorithm hmac-sha256; '
            'secret "BASE64"; };` (what `tsig-keygen NAME` prints)'
        )
    key = TsigKey(found["name"], found["algorithm"].lower(), found["secret"])
    try:
        base64.b64decode(key.secret, validate=True)
    except binascii.Error:
        raise ValueError(f"{path}: the secret of key {key.name!r} is not base64") from None
    try:
        algorithm = dns.name.from_text(key.algorithm)
        dns.name.from_text(key.name)
    except dns.exception.DNSException as error:
        raise ValueError(f"{path}: key {key.name!r} is unusable: {error}") from None
    if algorithm not in dns.tsig.mac_sizes:
        known = ", ".join(sorted(a.to_text(omit_final_dot=True) for a in dns.tsig.mac_sizes))
        raise ValueError(f"{path}: unknown TSIG algorithm {key.algorithm!r}; use one of {known}")
    return key

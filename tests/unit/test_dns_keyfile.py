"""The TSIG key file: what `tsig-keygen` writes is read; anything else is refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmfabric.dns.keyfile import TsigKey, read_key_file

GENERATED = """key "xfr-key" {
\talgorithm hmac-sha256;
\tsecret "7oUe3xJpEI/H1iYefsGb0Hh+leQS16naj7xmJddF4J4=";
};
"""


def test_tsig_keygen_output_is_read(tmp_path: Path) -> None:
    path = tmp_path / "xfr.key"
    path.write_text(GENERATED)
    assert read_key_file(path) == TsigKey(
        "xfr-key", "hmac-sha256", "7oUe3xJpEI/H1iYefsGb0Hh+leQS16naj7xmJddF4J4="
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("secret", "holds no key clause like"),
        (GENERATED.replace("hmac-sha256", "hmac-foo"), "unknown TSIG algorithm 'hmac-foo'"),
        (GENERATED.replace("7oUe3x", "7o!e3x"), "is not base64"),
    ],
)
def test_bad_key_files_are_refused_saying_why(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "xfr.key"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_key_file(path)

"""Where vmfabric keeps its state and how its parts find each other.

Every process (controller, CLI, lease hook, lab) reads the same environment variables, so a
test or an operator moves a whole installation by setting `VMFABRIC_STATE` once.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8750"
DEFAULT_STATE = "/var/lib/vmfabric"
DEFAULT_ZONE = "vmfabric.test"
DEFAULT_DNS_LISTEN = "127.0.0.1:5353"
DEFAULT_GATEWAY_URL = "http://127.0.0.1:8751"
DEFAULT_GATEWAY_LISTEN = "127.0.0.1:8751"


def state_dir() -> Path:
    """The directory holding the database, dnsmasq files, sockets and the lab's record."""
    return Path(os.environ.get("VMFABRIC_STATE", DEFAULT_STATE))


def api_url() -> str:
    """The controller the CLI talks to."""
    return os.environ.get("VMFABRIC_URL", DEFAULT_URL).rstrip("/")


def dns_listen() -> str:
    """Where `serve` answers DNS unless told otherwise (`VMFABRIC_DNS_LISTEN`, HOST:PORT or
    `off`): lets a lab or a test run its controller's DNS server on a port of its own."""
    return os.environ.get("VMFABRIC_DNS_LISTEN", DEFAULT_DNS_LISTEN)


def gateway_listen() -> str | None:
    """Where `serve` runs the access gateway when told (`VMFABRIC_GATEWAY_LISTEN`, HOST:PORT
    or `off`), so that a lab or a test can run its controller's gateway on a port of its own;
    None when not told (then `DEFAULT_GATEWAY_LISTEN`, if free)."""
    return os.environ.get("VMFABRIC_GATEWAY_LISTEN") or None


def webhooks() -> list[str]:
    """Webhook URLs of `serve` unless given as options (`VMFABRIC_WEBHOOKS`, space-separated),
    so a controller started by the lab can have them."""
    return os.environ.get("VMFABRIC_WEBHOOKS", "").split()


def webhook_secret_file() -> Path | None:
    """The file with the webhooks' signing secret (`VMFABRIC_WEBHOOK_SECRET_FILE`)."""
    found = os.environ.get("VMFABRIC_WEBHOOK_SECRET_FILE")
    return Path(found) if found else None


def api_token() -> str | None:
    """Bearer token sent by the CLI, when the operator set one."""
    return os.environ.get("VMFABRIC_TOKEN") or None


def default_db_url() -> str:
    """SQLite in the state directory unless the operator names another database."""
    return os.environ.get("VMFABRIC_DB", f"sqlite:///{state_dir() / 'vmfabric.db'}")


def lease_socket() -> Path:
    """Unix datagram socket on which the controller hears dnsmasq lease events.

    A unix socket, not TCP, because dnsmasq (and so its lease script) may run inside a network
    namespace where the controller's loopback address does not exist.
    """
    return state_dir() / "run" / "lease-events.sock"


def access_key_file() -> Path:
    """The key access credentials are signed with, unless `serve --access-key-file` names
    another: created (32 random bytes, mode 0600) when missing."""
    return state_dir() / "access.key"


def gateway_url() -> str:
    """The access gateway that `access grant` shows how to use (`VMFABRIC_GATEWAY_URL`)."""
    return os.environ.get("VMFABRIC_GATEWAY_URL", DEFAULT_GATEWAY_URL).rstrip("/")

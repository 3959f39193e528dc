"""Access to a server inside a VM (issue 7; CN107273186A, step 1): grants, revocations, the
check the access gateway makes of every request, and the log of uses.

`grant_access` stores a grant and returns its signed credential (`domain.access`), the only
time the credential is given; `revoke_grant` ends a grant before its expiry. The gateway,
which runs in the controller's process, calls `access_use` for each HTTP request and each TCP
stream it forwards: `verify_access` (unknown VM 404; missing, malformed, forged, expired,
revoked or unknown credential 401; another VM or port 403), then one `record_use` with how the
use ended.

The gateway may check thousands of requests a second (many concurrent downloads, a
benchmark), so a check does no I/O in the common case:

- the signature and expiry need only the key, read once per process (`configure_access`, or
  the state directory's key at the first use);
- the VM names and the grants in force are read from the store into a snapshot at most once a
  second, and again at once after a grant or a revocation made in this process: a revocation
  takes effect at once here, and within `REFRESH_S` in another controller process sharing the
  database, as do a deleted VM and its grants; the gateway has that read done in a worker
  thread before the check (`prepare_access_checks`), not on its event loop;
- uses are queued and written in batches by a timer thread `FLUSH_DELAY_S` after the first of
  a batch, through the group committer (one transaction per batch, on the connection the other
  writes use, retried when the database is busy), so a request never waits for a commit;
  `flush_uses` writes what is queued now (at shutdown, and before uses are read).
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeGuard

from sqlalchemy import Connection, bindparam, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from vmfabric import config
from vmfabric.domain.access import (
    DEFAULT_TTL,
    KEY_BYTES,
    Outcome,
    Refusal,
    UseKind,
    check_port,
    check_scope,
    check_ttl,
    check_user,
    new_claims,
    outcome_of,
    parse_ttl,
    sign,
    verify,
)
from vmfabric.domain.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    Unauthorized,
    Unavailable,
    VmfabricError,
)
from vmfabric.domain.model import VmState
from vmfabric.services.context import Controller, transaction
from vmfabric.services.hosts import host_ref
from vmfabric.services.views import as_utc
from vmfabric.store import repository
from vmfabric.store.group_commit import GroupCommitter
from vmfabric.store.tables import AccessGrant, AccessUse, Host, Vm, utcnow
from vmfabric.store.unit_of_work import UnitOfWork

log = logging.getLogger(__name__)

REFRESH_S = 1.0
"""Age at which the snapshot of VM names and grants is read again: how late a change made by
another process (a VM deleted, a grant revoked by another controller) reaches the check."""

FLUSH_DELAY_S = 0.5
"""How long a use waits in memory for others to share its transaction."""

LATEST_USES = 20
"""Uses `show_grant` gives, newest first."""

MAX_ACTOR = 255

_FIELD_SIZES = {"vm": 63, "client": 64, "detail": 1024}
"""Column sizes of `access_uses`: what a request names is cut to fit (an unknown VM's name
comes from the request path, of any length)."""


@dataclass(frozen=True)
class GrantView:
    """A grant as `access list` shows it: for what, for whom, until when, its state (active,
    expired or revoked) and how often it was used."""

    id: str
    vm: str
    port: int
    user: str | None
    granted_by: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None
    state: str
    uses: int
    last_used_at: datetime | None


@dataclass(frozen=True)
class IssuedGrant(GrantView):
    """A new grant with its credential, given this once."""

    credential: str


@dataclass(frozen=True)
class UseView:
    """One logged use of a credential."""

    at: datetime
    vm: str
    port: int
    client: str | None
    kind: str
    outcome: str
    detail: str | None


@dataclass(frozen=True)
class GrantDetail(GrantView):
    """A grant with its latest uses, newest first."""

    latest_uses: list[UseView]


@dataclass(frozen=True)
class Grant:
    """What a verified credential opens, for the gateway."""

    id: str
    vm: str
    port: int
    user: str | None
    expires_at: datetime


@dataclass(frozen=True)
class Use:
    """One use of a credential at the gateway; `grant_id` is the credential's id when it was
    authentic (a forged one names nothing)."""

    vm: str
    port: int
    client: str | None
    kind: UseKind
    outcome: Outcome
    detail: str | None = None
    grant_id: str | None = None
    at: datetime = field(default_factory=utcnow)


def grant_access(
    ctl: Controller,
    vm: str,
    port: int,
    ttl: timedelta | None = None,
    *,
    user: str | None = None,
    by: str = "api",
) -> IssuedGrant:
    """Grant access to `port` of `vm` for `ttl` (default `DEFAULT_TTL`): the stored grant with
    its signed credential. Unknown VM 404; bad port, ttl, user or actor 400, nothing stored."""
    check_port(port)
    valid_for = check_ttl(parse_ttl(DEFAULT_TTL) if ttl is None else ttl)
    check_user(user)
    _check_actor(by)
    guard = _guard(ctl)
    key = guard.key

    def store() -> IssuedGrant:
        with ctl.uow() as uow:
            vm_id = repository.get_vm_id(uow.session, vm)
            claims = new_claims(vm, port, valid_for, user, time.time())
            row = AccessGrant(
                id=claims.id,
                vm_id=vm_id,
                vm=vm,
                port=port,
                user=user,
                granted_by=by,
                created_at=claims.issued_at,
                expires_at=claims.expires_at,
            )
            uow.session.add(row)
            uow.commit()
            view = _view(row, 0, None)
            return IssuedGrant(**vars(view), credential=sign(key, claims))

    issued = transaction(store)
    guard.invalidate()
    return issued


def list_grants(
    ctl: Controller, vm: str | None = None, include_expired: bool = False
) -> list[GrantView]:
    """The grants in force (or all, expired and revoked too), of every VM or of one, newest
    first, each with its number of uses and the last one's time."""
    _guard(ctl).uses.flush()
    with ctl.uow() as uow:
        session = uow.session
        query = select(AccessGrant).order_by(AccessGrant.created_at.desc(), AccessGrant.id)
        if vm is not None:
            repository.get_vm_id(session, vm)
            query = query.where(AccessGrant.vm == vm)
        if not include_expired:
            query = query.where(AccessGrant.revoked_at.is_(None), AccessGrant.expires_at > utcnow())
        return _views(session, list(session.scalars(query)))


def show_grant(ctl: Controller, grant_id: str) -> GrantDetail:
    """One grant (in force or not) with its latest uses."""
    _guard(ctl).uses.flush()
    with ctl.uow() as uow:
        session = uow.session
        [view] = _views(session, [_grant_row(session, grant_id)])
        uses = session.scalars(
            select(AccessUse)
            .where(AccessUse.grant_id == grant_id)
            .order_by(AccessUse.at.desc(), AccessUse.id.desc())
            .limit(LATEST_USES)
        )
        latest = [_use_view(use) for use in uses]
        return GrantDetail(**vars(view), latest_uses=latest)


def revoke_grant(ctl: Controller, grant_id: str, by: str = "api") -> GrantView:
    """End a grant now: its credential opens nothing any more (at once in this process).
    Unknown id 404; a grant revoked already 409. An expired grant may still be revoked, which
    records who ended it."""
    _check_actor(by)
    _guard(ctl).uses.flush()

    def store() -> GrantView:
        with ctl.uow() as uow:
            session = uow.session
            row = _grant_row(session, grant_id)
            if row.revoked_at is not None:
                raise Conflict(
                    f"access {grant_id} was revoked already, at "
                    f"{as_utc(row.revoked_at).isoformat()} by {row.revoked_by}",
                    grant=grant_id,
                )
            row.revoked_at = utcnow()
            row.revoked_by = by
            [view] = _views(session, [row])
            uow.commit()
            return view

    revoked = transaction(store)
    _guard(ctl).invalidate()
    return revoked


def verify_access(
    ctl: Controller, token: str | None, vm: str, port: int, now: float | None = None
) -> Grant:
    """What `token` opens if it opens `port` of `vm` at `now` (unix seconds, default now).

    In this order: an unknown VM is NotFound (404); a missing, malformed, forged or expired
    credential, then a revoked one or one whose grant is gone (its VM was deleted, or another
    controller's key made it), is Unauthorized (401, `extra["reason"]` naming which); a
    credential for another VM or port is Forbidden (403). Errors after the signature check
    carry the grant's id as `extra["grant"]`. No I/O but a read of the store at most once a
    `REFRESH_S` (see the module's text); it logs nothing: `access_use` does.
    """
    guard = _guard(ctl)
    known = guard.snapshot()
    if vm not in known.vms:
        raise repository.unknown_vm(vm)
    claims = verify(guard.key, token, time.time() if now is None else now)
    if claims.id in known.revoked:
        raise Unauthorized(
            f"the access credential {claims.id} was revoked",
            reason=Refusal.REVOKED,
            grant=claims.id,
        )
    if claims.id not in known.active:
        raise Unauthorized(
            f"the access credential {claims.id} is unknown to this controller: its VM was "
            "deleted, or another controller issued it",
            reason=Refusal.UNKNOWN,
            grant=claims.id,
        )
    check_scope(claims, vm, port)
    return Grant(claims.id, claims.vm, claims.port, claims.sub, claims.expires_at)


def access_checks_ready(ctl: Controller) -> bool:
    """Whether `verify_access` would do no I/O now. The gateway asks before each check and,
    when not, has `prepare_access_checks` read in a worker thread, so that its event loop
    (every VM's streams) never waits for the store."""
    return _guard(ctl).ready()


def prepare_access_checks(ctl: Controller) -> None:
    """Load the key and read the snapshot of VMs and grants if they are due."""
    guard = _guard(ctl)
    _ = guard.key
    guard.snapshot()


@contextmanager
def access_use(
    ctl: Controller,
    token: str | None,
    vm: str,
    port: int,
    *,
    client: str | None,
    kind: UseKind,
) -> Iterator[Grant]:
    """The gateway's check of one request or stream, logged as exactly one use.

    A refused credential is logged with its refusal and the error raised; an accepted one
    yields the grant, and the use is logged when the block ends: ok, or unavailable (with
    the error) when the block raises, e.g. because the guest's proxy does not answer. Wrap
    the check and the forwarding of an HTTP request, or the check and the opening of a TCP
    stream's channel (not the whole stream, so its use is logged when it starts).
    """
    at = utcnow()
    try:
        grant = verify_access(ctl, token, vm, port)
    except VmfabricError as error:
        claimed = error.extra.get("grant")
        refusal = Use(
            vm,
            port,
            client,
            kind,
            outcome_of(error),
            error.detail,
            claimed if isinstance(claimed, str) else None,
            at,
        )
        record_use(ctl, refusal)
        raise
    outcome, detail = Outcome.OK, None
    try:
        yield grant
    except BaseException as error:
        outcome, detail = outcome_of(error), _describe(error)
        raise
    finally:
        record_use(ctl, Use(vm, port, client, kind, outcome, detail, grant.id, at))


def channel_socket(ctl: Controller, vm: str) -> str | None:
    """Where the gateway reaches the guest proxy of `vm`: the unix socket of its access
    channel, as its host's hypervisor gives it; None when it has none (a noop host, a VM the
    hypervisor does not know). Unknown VM 404; a VM that does not run 503. Blocks (the store,
    the hypervisor): the gateway calls it from a worker thread, once per connection attempt,
    so a VM that moved to another host is found there."""
    with ctl.uow() as uow:
        found = uow.session.execute(
            select(Host, Vm.state).join(Vm, Vm.host_id == Host.id).where(Vm.name == vm)
        ).first()
        if found is None:
            raise repository.unknown_vm(vm)
        host, state = found
        if state != VmState.RUNNING:
            raise Unavailable(f"VM {vm} is {state}: its guest proxy runs only while it runs", vm=vm)
        ref = host_ref(host)
    return ctl.agents.hypervisor(ref).access_socket(vm)


def record_use(ctl: Controller, use: Use) -> None:
    """Log one use (queued, written within `FLUSH_DELAY_S`) and count it for the metrics."""
    _guard(ctl).uses.add(use)
    with _COUNTS_LOCK:
        _COUNTS[str(use.kind), str(use.outcome)] += 1


def flush_uses(ctl: Controller) -> int:
    """Write the queued uses now (at shutdown, before the database writer closes); how many."""
    return _guard(ctl).uses.flush()


def use_counts() -> dict[tuple[str, str], int]:
    """Uses logged by this process since it started, by (kind, outcome)."""
    with _COUNTS_LOCK:
        return dict(_COUNTS)


def configure_access(ctl: Controller, key: bytes | None = None) -> None:
    """Give `ctl` its signing key (`serve --access-key-file`), else the state directory's,
    read (or made) now, so that a key that cannot be read stops the start rather than the
    first grant."""
    _install(ctl, key if key is not None else default_key())


def read_key(path: Path) -> bytes:
    """The signing key in `path`: all its bytes, at least `KEY_BYTES` of them."""
    try:
        key = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as error:
        raise InvalidInput(
            f"cannot read the access key file {path}: {error.strerror or error}"
        ) from None
    if len(key) < KEY_BYTES:
        raise InvalidInput(
            f"the access key file {path} holds {len(key)} bytes: it needs at least {KEY_BYTES}"
        )
    if mode & 0o077:
        log.warning("the access key file %s may be read by others than its owner", path)
    return key


def default_key() -> bytes:
    """The key in the state directory (`config.access_key_file`), made when missing:
    `KEY_BYTES` random bytes, mode 0600. The file is written aside and linked into place,
    so that processes starting together all read the one key that won."""
    path = config.access_key_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(secrets.token_bytes(KEY_BYTES))
                file.flush()
                os.fsync(file.fileno())
            os.link(draft, path)
            log.info("made a new access key in %s", path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return read_key(path)


@dataclass(frozen=True)
class _Snapshot:
    """What the check reads from the store: VM names and the unexpired grants' ids."""

    generation: int
    loaded: float
    vms: frozenset[str]
    active: frozenset[str]
    revoked: frozenset[str]


class _UseLog:
    """Uses waiting for their batch; a timer thread writes it `FLUSH_DELAY_S` after the first
    use queued (threads start only when there is something to write, so an idle controller
    has none)."""

    def __init__(self, writes: GroupCommitter) -> None:
        self._writes = writes
        self._lock = threading.Lock()
        self._pending: list[dict[str, Any]] = []
        self._timer: threading.Timer | None = None

    def add(self, use: Use) -> None:
        """Queue one use."""
        row = _use_row(use)
        with self._lock:
            self._pending.append(row)
            if self._timer is None:
                self._timer = threading.Timer(FLUSH_DELAY_S, self._flush_logged)
                self._timer.name = "vmfabric-access-uses"
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> int:
        """Write what is queued now; how many uses."""
        rows = self._take()
        self._write(rows)
        return len(rows)

    def _take(self) -> list[dict[str, Any]]:
        with self._lock:
            rows, self._pending = self._pending, []
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        return rows

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._writes.run(lambda conn: _insert_uses(conn, rows))

    def _flush_logged(self) -> None:
        rows = self._take()
        try:
            self._write(rows)
        except Exception:
            log.exception("%d uses of access credentials could not be logged", len(rows))


class _Guard:
    """A controller's access state: its key, the snapshot the check reads, its queued uses."""

    def __init__(
        self, sessions: sessionmaker[Session], writes: GroupCommitter, key: bytes | None
    ) -> None:
        self.uses = _UseLog(writes)
        self._sessions = sessions
        self._key = key
        self._lock = threading.Lock()
        self._generations = itertools.count(1)
        self._generation = 0
        self._snapshot: _Snapshot | None = None

    @property
    def key(self) -> bytes:
        """The signing key; the state directory's, read at the first use, unless configured."""
        if self._key is None:
            with self._lock:
                if self._key is None:
                    self._key = _load_default_key()
        return self._key

    def invalidate(self) -> None:
        """Make the next check read the store again (after a grant or a revocation)."""
        self._generation = next(self._generations)

    def snapshot(self) -> _Snapshot:
        """The current snapshot, read again when it is older than `REFRESH_S` or invalidated;
        one thread reads, the others wait for it."""
        found = self._snapshot
        if self._fresh(found):
            return found
        with self._lock:
            found = self._snapshot
            if not self._fresh(found):
                found = self._snapshot = self._load()
            return found

    def ready(self) -> bool:
        """Whether a check now needs no read: the key is loaded and the snapshot fresh."""
        return self._key is not None and self._fresh(self._snapshot)

    def _fresh(self, snapshot: _Snapshot | None) -> TypeGuard[_Snapshot]:
        return (
            snapshot is not None
            and snapshot.generation == self._generation
            and time.monotonic() - snapshot.loaded < REFRESH_S
        )

    def _load(self) -> _Snapshot:
        generation, loaded = self._generation, time.monotonic()
        with UnitOfWork(self._sessions) as uow:
            vms = frozenset(uow.session.scalars(select(Vm.name)))
            grants = uow.session.execute(
                select(AccessGrant.id, AccessGrant.revoked_at).where(
                    AccessGrant.expires_at > utcnow()
                )
            ).all()
        active = frozenset(grant_id for grant_id, revoked in grants if revoked is None)
        revoked = frozenset(grant_id for grant_id, revoked in grants if revoked is not None)
        return _Snapshot(generation, loaded, vms, active, revoked)


_GUARDS: weakref.WeakKeyDictionary[Controller, _Guard] = weakref.WeakKeyDictionary()
"""Each controller's access state; an entry leaves with its controller."""
_GUARDS_LOCK = threading.Lock()
_COUNTS: Counter[tuple[str, str]] = Counter()
_COUNTS_LOCK = threading.Lock()

_INSERT_USE = insert(AccessUse).values(
    grant_id=select(AccessGrant.id).where(AccessGrant.id == bindparam("claimed")).scalar_subquery(),
    vm=bindparam("vm"),
    port=bindparam("port"),
    at=bindparam("at"),
    client=bindparam("client"),
    kind=bindparam("kind"),
    outcome=bindparam("outcome"),
    detail=bindparam("detail"),
)
"""A use names its grant only if the grant is still there (one deleted with its VM is not),
so that one such use cannot fail the batch on the foreign key."""


def _guard(ctl: Controller) -> _Guard:
    found = _GUARDS.get(ctl)
    if found is not None:
        return found
    with _GUARDS_LOCK:
        found = _GUARDS.get(ctl)
        return found if found is not None else _install(ctl, None)


def _install(ctl: Controller, key: bytes | None) -> _Guard:
    guard = _Guard(ctl.sessions, ctl.writes, key)
    _GUARDS[ctl] = guard
    return guard


def _load_default_key() -> bytes:
    try:
        return default_key()
    except (OSError, InvalidInput) as error:
        detail = error.detail if isinstance(error, InvalidInput) else str(error)
        raise Unavailable(f"no access key: {detail}") from None


def _insert_uses(conn: Connection, rows: list[dict[str, Any]]) -> None:
    conn.execute(_INSERT_USE, rows)


def _use_row(use: Use) -> dict[str, Any]:
    return {
        "claimed": use.grant_id,
        "vm": _fit(use.vm, "vm"),
        "port": use.port,
        "at": use.at,
        "client": _fit(use.client, "client"),
        "kind": str(use.kind),
        "outcome": str(use.outcome),
        "detail": _fit(use.detail, "detail"),
    }


def _fit(text: str | None, column: str) -> str | None:
    return None if text is None else text[: _FIELD_SIZES[column]]


def _describe(error: BaseException) -> str:
    if isinstance(error, VmfabricError):
        return error.detail
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _check_actor(by: str) -> None:
    if not 0 < len(by) <= MAX_ACTOR or not by.isprintable():
        raise InvalidInput(f"invalid actor {by!r}: 1-{MAX_ACTOR} printable characters")


def _grant_row(session: Session, grant_id: str) -> AccessGrant:
    row = session.get(AccessGrant, grant_id)
    if row is None:
        raise NotFound(f"unknown access grant {grant_id!r}", grant=grant_id)
    return row


def _views(session: Session, rows: Sequence[AccessGrant]) -> list[GrantView]:
    """The grants as shown, each with how often it was used and when last (one query)."""
    if not rows:
        return []
    counted = session.execute(
        select(AccessUse.grant_id, func.count(), func.max(AccessUse.at))
        .where(AccessUse.grant_id.in_([row.id for row in rows]))
        .group_by(AccessUse.grant_id)
    )
    uses = {
        str(grant_id): (int(count), None if last is None else as_utc(last))
        for grant_id, count, last in counted
    }
    return [_view(row, *uses.get(row.id, (0, None))) for row in rows]


def _view(row: AccessGrant, uses: int, last_used_at: datetime | None) -> GrantView:
    expires_at = as_utc(row.expires_at)
    revoked_at = None if row.revoked_at is None else as_utc(row.revoked_at)
    if revoked_at is not None:
        state = "revoked"
    elif expires_at <= utcnow():
        state = "expired"
    else:
        state = "active"
    return GrantView(
        id=row.id,
        vm=row.vm,
        port=row.port,
        user=row.user,
        granted_by=row.granted_by,
        created_at=as_utc(row.created_at),
        expires_at=expires_at,
        revoked_at=revoked_at,
        revoked_by=row.revoked_by,
        state=state,
        uses=uses,
        last_used_at=last_used_at,
    )


def _use_view(use: AccessUse) -> UseView:
    return UseView(
        at=as_utc(use.at),
        vm=use.vm,
        port=use.port,
        client=use.client,
        kind=use.kind,
        outcome=use.outcome,
        detail=use.detail,
    )

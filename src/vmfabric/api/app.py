"""The FastAPI application of the controller."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from vmfabric import __version__
from vmfabric.api import problems
from vmfabric.api.routes import metrics_router, router
from vmfabric.services.checks import Checker, CheckSettings
from vmfabric.services.context import Controller
from vmfabric.services.migrations import MigrationEngine


def create_app(
    ctl: Controller,
    *,
    lab: bool = False,
    token: str | None = None,
    background: Callable[[], Callable[[], None]] | None = None,
    checker: Checker | None = None,
    migrations: MigrationEngine | None = None,
) -> FastAPI:
    """The API over `ctl`.

    `background` starts the controller's background work (the lease listener) when the app
    starts and returns the function that stops it; `checker` runs connectivity checks and
    `migrations` moves VMs with their rules (with default settings when not given).
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        stop = background() if background is not None else None
        try:
            yield
        finally:
            if stop is not None:
                stop()

    app = FastAPI(
        title="vmfabric",
        version=__version__,
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.controller = ctl
    app.state.lab = lab
    app.state.checker = checker or Checker(CheckSettings())
    app.state.migrations = migrations or MigrationEngine(ctl)
    problems.install(app)
    if token:
        _require_token(app, token)
    app.include_router(router)
    app.include_router(metrics_router)
    return app


def _require_token(app: FastAPI, token: str) -> None:
    expected = f"Bearer {token}".encode()

    @app.middleware("http")
    async def check_token(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path.startswith("/api/v1/") and request.url.path != "/api/v1/info":
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return problems.problem(
                    401, "Unauthorized", "missing or wrong token (set VMFABRIC_TOKEN)"
                )
        return await call_next(request)

"""Errors as RFC 9457 problem details (`application/problem+json`)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from vmfabric.domain.errors import Unauthorized, VmfabricError

log = logging.getLogger(__name__)

PROBLEM_TYPE = "application/problem+json"


def problem(status: int, title: str, detail: str, **extra: object) -> JSONResponse:
    """A problem-details response."""
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_TYPE)


def error_problem(error: VmfabricError) -> JSONResponse:
    """The problem document of a domain error; a 401 names its scheme (`WWW-Authenticate`),
    as RFC 9110 requires. The access gateway can answer its refusals with it."""
    response = problem(error.status, error.title, error.detail, **error.extra)
    if isinstance(error, Unauthorized):
        response.headers["WWW-Authenticate"] = error.challenge
    return response


def install(app: FastAPI) -> None:
    """Make every error the API returns a problem document with a readable `detail`."""

    @app.exception_handler(VmfabricError)
    async def domain_error(_request: Request, error: VmfabricError) -> JSONResponse:
        return error_problem(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        return problem(400, "Invalid input", _describe(error))

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        return problem(error.status_code, str(error.detail), str(error.detail))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return problem(500, "Internal error", f"{type(error).__name__}: {error}")


def _describe(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body")
        parts.append(f"{where}: {item.get('msg', 'invalid')}" if where else item.get("msg", ""))
    return "; ".join(parts) or "invalid request"

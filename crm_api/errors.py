"""The CRM's error tree and the handlers that turn every failure into JSON ``{"detail": …}``:
our own errors keep their status, validation errors become 422 with the first problem spelled
out, database conflicts 409, and anything unexpected a 500 whose body names no internals (the
traceback goes to the log, never to the client).

```
CRMError (status, detail)
├── BadRequest 400 · Unauthorized 401 · Forbidden 403 · NotFound 404
├── Conflict 409 · PayloadTooLarge 413 · Unprocessable 422
```
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("crm_api")


class CRMError(Exception):
    status = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(CRMError):
    status = 400


class Unauthorized(CRMError):
    status = 401


class Forbidden(CRMError):
    status = 403


class NotFound(CRMError):
    status = 404


class Conflict(CRMError):
    status = 409


class PayloadTooLarge(CRMError):
    status = 413


class Unprocessable(CRMError):
    status = 422


def _json(status: int, detail: object, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _crm_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CRMError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return _json(exc.status, exc.detail, headers)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _json(exc.status_code, exc.detail, exc.headers)


def describe_validation(errors: list[dict[str, object]]) -> str:
    """``body.contacts.0.address: value is not a valid email`` for the first problem."""
    if not errors:
        return "invalid request"
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if isinstance(p, str | int))  # type: ignore[attr-defined]
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc}: {msg}{more}" if loc else f"{msg}{more}"


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [dict(e) for e in exc.errors()]
    for e in errors:
        e.pop("ctx", None)  # may hold exception objects that are not JSON
        e.pop("input", None)  # echoes the client's (possibly large) input back
    return JSONResponse({"detail": describe_validation(errors), "errors": errors}, status_code=422)


async def _integrity_error(_request: Request, exc: Exception) -> JSONResponse:
    # Reached only when two requests race past our own checks (PostgreSQL, concurrent writers).
    log.info("integrity error: %s", exc)
    return _json(409, "conflicts with a record stored concurrently; retry the request")


async def _operational_error(_request: Request, exc: Exception) -> JSONResponse:
    log.error("database unavailable: %s", exc)
    return _json(503, "database unavailable or busy; retry shortly")


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error", exc_info=exc)
    return _json(500, "internal error; the CRM's log has the details")


def install(app: FastAPI) -> None:
    app.add_exception_handler(CRMError, _crm_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(IntegrityError, _integrity_error)
    app.add_exception_handler(OperationalError, _operational_error)
    app.add_exception_handler(Exception, _unexpected)

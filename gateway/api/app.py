"""The admin API: the queue as resources, ``/healthz`` and ``/metrics``, behind admin tokens.

It runs in the gateway's own event loop (a uvicorn server beside the SMTP doors) and uses the same
:class:`Store` as the worker, so a retry asked for here wakes the worker at once. Everything the
app needs arrives in :func:`create_api`'s arguments and lives on ``app.state``; nothing is read at
import time, so tests can build as many apps as they like. Every error is JSON with a ``detail``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.api.deps import Admin, ApiContext, Context, LinkOrAdmin
from gateway.errors import StoreError
from gateway.message import attachment_of, outgoing
from gateway.store.models import MessageState


def create_api(context: ApiContext, routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The app; feature packages (capture, IMAP) add their routes as ``routers``."""
    app = FastAPI(title="Mailgate admin API", version="1")
    app.state.context = context
    _install_error_handlers(app)
    for router in routers:
        app.include_router(router)

    @app.get("/healthz")
    async def healthz(context: Context) -> dict[str, Any]:
        """200 when the database answers; 503 otherwise (the load balancer stops sending)."""
        started = time.perf_counter()

        def ping(connection: Any) -> None:
            connection.execute(text("SELECT 1"))

        try:
            await context.store.committer.read(ping)
        except StoreError as exc:
            raise HTTPException(503, f"database unavailable: {exc}") from None
        return {"status": "ok", "database_ms": round((time.perf_counter() - started) * 1000, 2)}

    @app.get("/metrics")
    async def metrics(context: Context) -> Response:
        """Prometheus text format; queue depth is read from the store at each scrape."""
        # The counters are still worth serving when the database is down; healthz reports that.
        with contextlib.suppress(StoreError):
            context.metrics.set_queue_depth(await context.store.counts())
        return Response(context.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/api/v1/queue")
    async def list_queue(
        context: Context,
        _admin: Admin,
        state: Annotated[MessageState | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        before: Annotated[str | None, Query(max_length=32)] = None,
    ) -> dict[str, Any]:
        """Messages newest first; page with ``before=<the last id you saw>``."""
        rows = await context.store.list_messages(
            state=state.value if state else None, limit=limit, before=before
        )
        return {"messages": rows, "next_before": rows[-1]["id"] if len(rows) == limit else None}

    @app.get("/api/v1/queue/{message_id}")
    async def show(context: Context, _admin: Admin, message_id: str) -> dict[str, Any]:
        row = await context.store.get_message(message_id)
        if row is None:
            raise HTTPException(404, f"no message {message_id} in the queue")
        return row

    @app.post("/api/v1/queue/{message_id}/retry")
    async def retry(context: Context, _admin: Admin, message_id: str) -> dict[str, Any]:
        if not await context.store.retry_now(message_id):
            raise HTTPException(404, f"no message {message_id} that can be retried")
        context.wake(message_id)
        return {"id": message_id, "state": "queued"}

    @app.get("/api/v1/messages/{message_id}/raw")
    async def raw(context: Context, _who: LinkOrAdmin, message_id: str) -> Response:
        """The message as it went out (our added headers, no Bcc), as message/rfc822."""
        row = await context.store.get_message(message_id, with_raw=True)
        if row is None:
            raise HTTPException(404, f"no message {message_id}")
        return Response(outgoing(row["raw"], row["prepend"]), media_type="message/rfc822")

    @app.get("/api/v1/messages/{message_id}/attachments/{index}")
    async def attachment(
        context: Context, _who: LinkOrAdmin, message_id: str, index: int
    ) -> Response:
        """Attachment number ``index`` (0-based, in MIME order), decoded."""
        row = await context.store.get_message(message_id, with_raw=True)
        if row is None:
            raise HTTPException(404, f"no message {message_id}")
        found = attachment_of(row["raw"], index)
        if found is None:
            raise HTTPException(404, f"message {message_id} has no attachment {index}")
        filename, content_type, data = found
        disposition = f"attachment; filename*=UTF-8''{quote(filename)}"
        return Response(data, media_type=content_type, headers={"content-disposition": disposition})

    @app.delete("/api/v1/queue/{message_id}")
    async def delete(context: Context, _admin: Admin, message_id: str) -> dict[str, Any]:
        if not await context.store.delete(message_id):
            raise HTTPException(404, f"no message {message_id} in the queue")
        return {"id": message_id, "deleted": True}

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.detail},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        ]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    @app.exception_handler(StoreError)
    async def store_error(_request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": f"database unavailable: {exc}"}, status_code=503)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); see the gateway's log"},
            status_code=500,
        )

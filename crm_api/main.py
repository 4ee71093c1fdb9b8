"""The CRM application's composition root: ``create_app(settings)`` builds the database handle,
runs the migrations (when ``auto_migrate``), seeds the organisation's policy, installs the JSON
error handlers and the request-size cap, and mounts the routes; everything hangs on
``app.state`` so two apps can live side by side in one process. ``create_app_from_env`` is the
factory for ``uvicorn --factory crm_api.main:create_app_from_env``."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlmodel import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crm_api import crud, errors
from crm_api.db import Database, migrate
from crm_api.ingest import GroupCommitter
from crm_api.routes import api_router, health, webhooks
from crm_api.settings import ConfigError, Settings, load_settings

log = logging.getLogger("crm_api")


class BodySizeLimit:
    """Refuse request bodies over ``limit`` bytes with 413, by Content-Length up front and by
    counting for chunked bodies, before a route buffers them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        framed = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    await self._reply(send, 400, "Content-Length is not a number")
                    return
                if int(value) > self.limit:
                    await self._reply(send, 413, self._detail())
                    return
                framed = True
            elif name == b"transfer-encoding":  # which beats Content-Length (RFC 9112 §6.3)
                framed = False
                break
        if framed:
            # The server delivers exactly Content-Length bytes: nothing left to count, so the
            # request goes through unwrapped (the webhook hot path saves two wrappers).
            await self.app(scope, receive, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # Raised inside the route's body read; the error handlers answer 413.
                    raise errors.PayloadTooLarge(self._detail())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except errors.PayloadTooLarge:
            if not started:
                await self._reply(send, 413, self._detail())

    def _detail(self) -> str:
        return f"request body exceeds {self.limit} bytes (max_body_bytes in crm.toml)"

    @staticmethod
    async def _reply(send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app(settings: Settings) -> FastAPI:
    db = Database(settings.database_url)
    committer = GroupCommitter(db.engine, db.writer, offload=not db.sqlite)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.auto_migrate:
            migrate(db.engine)
        with Session(db.engine) as session:
            crud.seed_org(session=session, policy=settings.policy)
            session.commit()
        log.info("CRM ready on its database (%s)", db.engine.url.get_backend_name())
        yield
        await committer.close()
        db.dispose()

    app = FastAPI(
        title="Mailgate CRM",
        summary="Contacts, threaded emails and sharing rules; the CRM side of Mailgate's contract.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.db = db
    app.state.webhook_keys = settings.webhooks.secret_keys()
    app.state.ingest = committer
    errors.install(app)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.include_router(webhooks.router, prefix="/api/v1")  # first: the hot path matches at once
    app.include_router(health.router)
    app.include_router(api_router)
    return app


def create_app_from_env() -> FastAPI:
    """Settings from ``$MAILGATE_CRM_CONFIG`` (or conf/crm.toml) and ``MAILGATE_CRM_…``; a
    configuration mistake prints one line and exits instead of a traceback."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"mailgate crm: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    logging.basicConfig(level=settings.log_level.upper())
    return create_app(settings)

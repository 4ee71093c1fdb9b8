"""``POST /api/v1/webhooks/gateway``: the gateway's signed events. No token: the Standard
Webhooks signature authenticates the sender. The body is verified, then parsed, then stored in
one transaction off the event loop; a replay answers 200 ``duplicate`` without storing again."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from sqlmodel import SQLModel

from crm_api import ingest
from crm_api.deps import DbDep, SettingsDep
from crm_api.errors import CRMError
from crm_api.models import Message
from crm_api.signatures import WebhookError, verify

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookAck(SQLModel):
    status: str  # "stored" or "duplicate"
    type: str


class _Rejected(CRMError):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


@router.post(
    "/gateway",
    response_model=WebhookAck,
    responses={400: {"model": Message}, 401: {"model": Message}, 413: {"model": Message}},
)
async def receive_gateway_webhook(request: Request, db: DbDep, settings: SettingsDep) -> WebhookAck:
    body = await request.body()
    try:
        webhook_id, timestamp = verify(
            keys=request.app.state.webhook_keys,
            headers=request.headers,
            body=body,
            now=time.time(),
            tolerance=settings.webhooks.tolerance_seconds,
        )
    except WebhookError as exc:
        raise _Rejected(exc.status, exc.detail) from None
    event = ingest.parse(body)
    async with db.writer():
        outcome = await run_in_threadpool(
            ingest.store, engine=db.engine, webhook_id=webhook_id, timestamp=timestamp, event=event
        )
    return WebhookAck(status=outcome, type=event.type)

"""``POST /api/v1/webhooks/gateway``: the gateway's signed events. No token: the Standard
Webhooks signature authenticates the sender. The body is verified, then parsed, then handed to
the group committer, and the reply waits for the commit that stored it; a replay answers 200
``duplicate`` without storing again. This is the hot path, so it reads ``app.state`` directly
and answers with pre-encoded JSON instead of going through dependency injection and response
validation."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlmodel import SQLModel

from crm_api import ingest
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
async def receive_gateway_webhook(request: Request) -> Response:
    state = request.app.state
    committer: ingest.GroupCommitter = state.ingest
    with committer.arrival():
        body = await request.body()
        try:
            webhook_id, timestamp = verify(
                keys=state.webhook_keys,
                headers=request.headers,
                body=body,
                now=time.time(),
                tolerance=state.settings.webhooks.tolerance_seconds,
            )
        except WebhookError as exc:
            raise _Rejected(exc.status, exc.detail) from None
        event = ingest.parse(body)
        stored = committer.submit(ingest.Item(webhook_id, timestamp, event))
    ack = WebhookAck(status=await stored, type=event.type)
    return Response(ack.model_dump_json(), media_type="application/json")

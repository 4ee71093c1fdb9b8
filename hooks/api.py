"""The admin API's webhook routes: events (list, show, replay) and subscribers (list, add, remove).

Included by the composition root beside the queue routes; the same admin tokens apply.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from gateway.api.deps import Admin, Context
from hooks import admin
from hooks.events import EVENT_TYPES, json_schema
from hooks.subscribers import SubscriberError, add_subscriber, list_subscribers, remove_subscriber
from hooks.webhooks import replay


class SubscriberCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str = Field(min_length=8, max_length=2000)
    secret: str = Field(min_length=10, max_length=200)
    event_types: list[str] = Field(default_factory=list, description="empty: every type")
    allow_private: bool = False


def router() -> APIRouter:
    routes = APIRouter(prefix="/api/v1")

    @routes.get("/webhooks")
    async def events(
        context: Context,
        _admin: Admin,
        state: Annotated[str | None, Query(pattern="^(pending|delivered|dead)$")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        return {
            "events": await admin.list_events(context.store.committer, state=state, limit=limit)
        }

    @routes.get("/webhooks/schema")
    async def schema(_admin: Admin) -> dict[str, Any]:
        return json_schema()

    @routes.get("/webhooks/{event_id}")
    async def show(context: Context, _admin: Admin, event_id: str) -> dict[str, Any]:
        event = await admin.show_event(context.store.committer, event_id)
        if event is None:
            raise HTTPException(404, f"no webhook event {event_id}")
        return event

    @routes.post("/webhooks/{event_id}/replay")
    async def replay_event(context: Context, _admin: Admin, event_id: str) -> dict[str, Any]:
        count = await replay(context.store.committer, event_id)
        if not count:
            raise HTTPException(404, f"no delivered or dead-lettered event {event_id} to replay")
        dispatcher = context.services.get("dispatcher")
        if dispatcher is not None:
            dispatcher.wake()
        return {"id": event_id, "requeued": count}

    @routes.get("/subscribers")
    async def subscribers(context: Context, _admin: Admin) -> dict[str, Any]:
        return {
            "subscribers": await list_subscribers(context.store.committer),
            "event_types": list(EVENT_TYPES),
        }

    @routes.post("/subscribers", status_code=201)
    async def add(context: Context, _admin: Admin, body: SubscriberCreate) -> dict[str, Any]:
        try:
            new_id = await add_subscriber(
                context.store.committer,
                name=body.name,
                url=body.url,
                secret=body.secret,
                event_types=body.event_types,
                allow_private=body.allow_private,
            )
        except SubscriberError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"id": new_id, "name": body.name}

    @routes.delete("/subscribers/{name}")
    async def remove(context: Context, _admin: Admin, name: str) -> dict[str, Any]:
        if not await remove_subscriber(context.store.committer, name):
            raise HTTPException(404, f"no subscriber {name}")
        return {"name": name, "deleted": True}

    return routes

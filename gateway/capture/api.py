"""The capture door's admin API routes: the quarantine, secret addresses, and the DNS check.

``router()`` is included by the admin app; its routes need ``services["capture"]``, a
:class:`CaptureService` the composition root builds from the settings. Like every admin route
they take an admin's bearer token, and every error is JSON with a ``detail``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException
from sqlmodel import Session

from gateway.api.deps import Admin, ApiContext, Context, service
from gateway.dnscheck import Report, check_domain
from gateway.settings import Settings
from gateway.users import UserError


@dataclass(frozen=True, slots=True)
class CaptureService:
    """What the capture routes need beyond the shared context."""

    settings: Settings


def run_dns_check(settings: Settings, domain: str) -> Report:
    """``check_domain`` with the resolver from ``[dns]`` and the keys under ``dkim.key_dir``."""
    from gateway.authenticity import CachingResolver
    from gateway.dkim import load_keys
    from gateway.dns import make_sync_resolver

    return check_domain(
        domain,
        resolver=CachingResolver(make_sync_resolver(settings.dns)),
        keys=load_keys(settings.dkim.key_dir),
        relay=settings.relay,
        hostname=settings.server.hostname,
    )


def _service(context: ApiContext) -> CaptureService:
    return service(
        context, "capture", CaptureService, "the capture service is not configured in this gateway"
    )


def router() -> APIRouter:
    api = APIRouter(prefix="/api/v1", tags=["capture"])

    @api.get("/capture/quarantine")
    async def quarantine_list(context: Context, _admin: Admin) -> dict[str, Any]:
        """Captured messages held for an admin, oldest first."""
        from gateway.capture.quarantine import held

        return {"messages": await held(context.store)}

    @api.post("/capture/quarantine/{message_id}/release")
    async def quarantine_release(
        context: Context,
        admin: Admin,
        message_id: str,
        owner: Annotated[str | None, Body(embed=True)] = None,
    ) -> dict[str, Any]:
        """Log a held message after all, as ``owner`` (default: the user its From is)."""
        from gateway.capture.quarantine import QuarantineError, release

        try:
            chosen = await release(
                context.store, message_id, admin=admin, owner=owner, wake=context.wake
            )
        except QuarantineError as exc:
            raise HTTPException(404, str(exc)) from None
        return {"id": message_id, "released_as": chosen, "state": "queued"}

    @api.delete("/capture/quarantine/{message_id}")
    async def quarantine_delete(context: Context, _admin: Admin, message_id: str) -> dict[str, Any]:
        from gateway.capture.quarantine import QuarantineError, delete

        try:
            await delete(context.store, message_id)
        except QuarantineError as exc:
            raise HTTPException(404, str(exc)) from None
        return {"id": message_id, "deleted": True}

    @api.get("/capture/addresses/{email}")
    async def address_show(context: Context, _admin: Admin, email: str) -> dict[str, str]:
        """The user's secret capture address (made on first use)."""
        return await _address(context, email, rotate=False)

    @api.post("/capture/addresses/{email}/rotate")
    async def address_rotate(context: Context, _admin: Admin, email: str) -> dict[str, str]:
        """A new secret capture address; the old one stops working."""
        return await _address(context, email, rotate=True)

    @api.get("/dns/check/{domain}")
    async def dns_check(context: Context, _admin: Admin, domain: str) -> dict[str, Any]:
        """SPF, DKIM and DMARC of ``domain``, line by line; ``ok`` false if delivery suffers."""
        settings = _service(context).settings
        try:
            report = await asyncio.to_thread(run_dns_check, settings, domain)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return report.as_dict()

    return api


async def _address(context: ApiContext, email: str, *, rotate: bool) -> dict[str, str]:
    from gateway.capture.directory import capture_address

    settings = _service(context).settings.capture

    def work() -> str:
        with Session(context.engine) as session:
            address = capture_address(session, email=email, settings=settings, rotate=rotate)
            session.commit()
            return address

    try:
        address = await asyncio.to_thread(work)
    except UserError as exc:
        raise HTTPException(404, str(exc)) from None
    return {"email": email, "address": address}

"""The CRM's HTTP routes, one module per concern; ``api_router`` gathers those under
``/api/v1`` (the health check stays at the root for load balancers). The webhook receiver is
mounted on its own, first, because routes are matched in order and it carries most requests."""

from __future__ import annotations

from fastapi import APIRouter

from crm_api.routes import contacts, emails, outbound, settings, users

api_router = APIRouter(prefix="/api/v1")
api_router.include_router(users.router)
api_router.include_router(settings.router)
api_router.include_router(contacts.router)
api_router.include_router(emails.router)
api_router.include_router(outbound.router)

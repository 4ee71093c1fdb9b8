"""``GET /healthz``: the process answers and its database does (no token needed)."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter

from crm_api.deps import SessionDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(session: SessionDep) -> dict[str, str]:
    session.execute(sa.text("SELECT 1"))
    return {"status": "ok"}

"""Settings: the organisation's policy (auto-create, company and excluded domains,
assigned-records-only, the rule for excluded-domain mail), which admins edit, and each user's
own threading order, returned together."""

from __future__ import annotations

from fastapi import APIRouter

from crm_api import crud
from crm_api.deps import AdminUser, CurrentUser, SessionDep
from crm_api.models import OrgSettingsPublic, OrgSettingsUpdate, SettingsPublic, UserPublic

router = APIRouter(prefix="/settings", tags=["settings"])


@router.get("", response_model=SettingsPublic)
def read_settings(session: SessionDep, user: CurrentUser) -> SettingsPublic:
    return SettingsPublic(
        organisation=crud.org_public(crud.get_org(session=session)),
        user=UserPublic.model_validate(user, from_attributes=True),
    )


@router.patch("", response_model=OrgSettingsPublic)
def update_settings(
    session: SessionDep, _admin: AdminUser, update: OrgSettingsUpdate
) -> OrgSettingsPublic:
    org = crud.update_org(session=session, org=crud.get_org(session=session), update=update)
    session.commit()
    return crud.org_public(org)

"""First-run set-up of the bundled CRM, for ``mailgate init``: bring the schema to the newest
migration, store the organisation's policy, and make sure the admin exists with an API token
(the gateway's token for ``/contacts/match``). Running it again changes nothing and issues no
new token, so ``init`` can be repeated safely."""

from __future__ import annotations

from sqlmodel import Session

from crm_api import crud
from crm_api.db import Database, migrate
from crm_api.models import Role, UserCreate
from crm_api.settings import Settings


def bootstrap(settings: Settings, *, admin_email: str) -> tuple[str, str | None]:
    """``(admin's normalised email, new token or None when the admin already existed)``."""
    db = Database(settings.database_url)
    try:
        migrate(db.engine)
        with Session(db.engine, expire_on_commit=False) as session:
            crud.seed_org(session=session, policy=settings.policy)
            user = crud.get_user_by_email(session=session, email=admin_email)
            token = None
            if user is None:
                user = crud.create_user(
                    session=session,
                    user_in=UserCreate(email=admin_email, role=Role.admin, name="Administrator"),
                )
                token = crud.create_token(session=session, user=user)
            session.commit()
            return user.email, token
    finally:
        db.dispose()

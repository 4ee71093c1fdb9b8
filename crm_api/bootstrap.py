"""First-run set-up of the bundled CRM, for ``mailgate init``: schema, policy, an admin, a token.

The gateway's installer calls this so a fresh install has a CRM the gateway can already talk to:
the admin user exists and the returned API token is what the gateway puts in its config for
``/contacts/match``. Nothing here is specific to the gateway; it is the same as running
``mailgate crm migrate``, ``crm user add`` and ``crm token create`` by hand.
"""

from __future__ import annotations

from sqlmodel import Session

from crm_api import crud
from crm_api.db import Database, migrate
from crm_api.models import Role, UserCreate
from crm_api.settings import Settings


def bootstrap(settings: Settings, *, admin_email: str) -> tuple[str, str | None]:
    """Make the CRM ready; returns ``(admin email, new token or None if the admin existed)``."""
    db = Database(settings.database_url)
    try:
        migrate(db.engine)
        with Session(db.engine) as session:
            crud.seed_org(session=session, policy=settings.policy)
            user = crud.get_user_by_email(session=session, email=admin_email)
            if user is not None:
                session.commit()
                return user.email, None
            user = crud.create_user(
                session=session,
                user_in=UserCreate(email=admin_email, role=Role.admin, name="Administrator"),
            )
            token = crud.create_token(session=session, user=user)
            session.commit()
            return user.email, token
    finally:
        db.dispose()

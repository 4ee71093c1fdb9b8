"""Reading mail: the list (filter by contact, direction, text), one email, the user's inbox of
their own logged mail, a thread, an attachment's download link, and a combined search. Every
path goes through ``visibility``, which applies the sharing rules."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from sqlmodel import SQLModel

from crm_api import crud, visibility
from crm_api.deps import SessionDep, ViewerDep
from crm_api.models import AttachmentPublic, ContactsPublic, EmailPublic, EmailsPublic, ThreadPublic

router = APIRouter(tags=["emails"])
Offset = Annotated[int, Query(ge=0)]
Limit = Annotated[int, Query(ge=1, le=200)]


class SearchResults(SQLModel):
    contacts: ContactsPublic
    emails: EmailsPublic


@router.get("/emails", response_model=EmailsPublic)
def list_emails(
    session: SessionDep,
    viewer: ViewerDep,
    q: Annotated[str | None, Query(max_length=200, description="subject or text")] = None,
    contact_id: int | None = None,
    direction: Literal["inbound", "outbound"] | None = None,
    offset: Offset = 0,
    limit: Limit = 50,
) -> EmailsPublic:
    data, count = visibility.list_emails(
        session=session,
        viewer=viewer,
        q=q,
        contact_id=contact_id,
        direction=direction,
        offset=offset,
        limit=limit,
    )
    return EmailsPublic(data=data, count=count)


@router.get("/emails/{email_id}", response_model=EmailPublic)
def read_email(session: SessionDep, viewer: ViewerDep, email_id: int) -> EmailPublic:
    return visibility.get_email(session=session, viewer=viewer, email_id=email_id)


@router.get("/inbox", response_model=EmailsPublic)
def inbox(
    session: SessionDep, viewer: ViewerDep, offset: Offset = 0, limit: Limit = 50
) -> EmailsPublic:
    data, count = visibility.list_emails(
        session=session, viewer=viewer, inbox=True, offset=offset, limit=limit
    )
    return EmailsPublic(data=data, count=count)


@router.get("/threads/{thread_id}", response_model=ThreadPublic)
def read_thread(session: SessionDep, viewer: ViewerDep, thread_id: int) -> ThreadPublic:
    return visibility.get_thread(session=session, viewer=viewer, thread_id=thread_id)


@router.get("/attachments/{attachment_id}", response_model=AttachmentPublic)
def read_attachment(session: SessionDep, viewer: ViewerDep, attachment_id: int) -> AttachmentPublic:
    """The attachment's metadata and its download URL on the gateway."""
    return visibility.get_attachment(session=session, viewer=viewer, attachment_id=attachment_id)


@router.get("/search", response_model=SearchResults)
def search(
    session: SessionDep,
    viewer: ViewerDep,
    q: Annotated[str, Query(min_length=1, max_length=200)],
    offset: Offset = 0,
    limit: Limit = 20,
) -> SearchResults:
    contacts, ccount = crud.list_contacts(session=session, q=q, offset=offset, limit=limit)
    emails, ecount = visibility.list_emails(
        session=session, viewer=viewer, q=q, offset=offset, limit=limit
    )
    return SearchResults(
        contacts=ContactsPublic(
            data=crud.contacts_public(session=session, contacts=contacts), count=ccount
        ),
        emails=EmailsPublic(data=emails, count=ecount),
    )

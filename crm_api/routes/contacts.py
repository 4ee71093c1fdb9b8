"""Contacts: CRUD, search and pagination, addresses added and removed one at a time, a contact's
threaded timeline, and ``POST /contacts/match``, the gateway's batch lookup."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from crm_api import crud, visibility
from crm_api.deps import CurrentUser, SessionDep, ViewerDep
from crm_api.errors import Forbidden
from crm_api.models import (
    AddressAdd,
    Contact,
    ContactCreate,
    ContactPublic,
    ContactsPublic,
    ContactUpdate,
    MatchRequest,
    MatchResponse,
    Role,
    TimelinePublic,
    User,
)

router = APIRouter(prefix="/contacts", tags=["contacts"])


def _may_edit(user: User, contact: Contact) -> None:
    # Reps edit their own contacts and unassigned ones; admins edit all.
    if user.role == Role.admin or contact.owner_id in (None, user.id):
        return
    raise Forbidden(f"contact {contact.id} belongs to another rep; ask them or an admin")


def _public(session: SessionDep, contact: Contact) -> ContactPublic:
    return crud.contacts_public(session=session, contacts=[contact])[0]


@router.get("", response_model=ContactsPublic)
def list_contacts(
    session: SessionDep,
    _user: CurrentUser,
    q: Annotated[str | None, Query(max_length=200, description="name, company or address")] = None,
    owner: Annotated[str | None, Query(max_length=320)] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> ContactsPublic:
    rows, count = crud.list_contacts(session=session, q=q, owner=owner, offset=offset, limit=limit)
    return ContactsPublic(data=crud.contacts_public(session=session, contacts=rows), count=count)


@router.post("", response_model=ContactPublic, status_code=201)
def create_contact(
    session: SessionDep, user: CurrentUser, contact_in: ContactCreate
) -> ContactPublic:
    if contact_in.owner is None and user.role == Role.rep:
        contact_in.owner = user.email  # a rep's new contact is theirs unless they say otherwise
    contact = crud.create_contact(session=session, contact_in=contact_in)
    session.commit()
    return _public(session, contact)


@router.post("/match", response_model=MatchResponse)
def match_contacts(session: SessionDep, _user: CurrentUser, request: MatchRequest) -> MatchResponse:
    # POST only to carry a body; it stores nothing (so it takes no writer lock: see deps).
    return crud.match(session=session, request=request, org=crud.get_org(session=session))


@router.get("/{contact_id}", response_model=ContactPublic)
def read_contact(session: SessionDep, _user: CurrentUser, contact_id: int) -> ContactPublic:
    return _public(session, crud.get_contact(session=session, contact_id=contact_id))


@router.patch("/{contact_id}", response_model=ContactPublic)
def update_contact(
    session: SessionDep, user: CurrentUser, contact_id: int, update: ContactUpdate
) -> ContactPublic:
    contact = crud.get_contact(session=session, contact_id=contact_id)
    _may_edit(user, contact)
    crud.update_contact(session=session, contact=contact, update=update)
    session.commit()
    return _public(session, contact)


@router.delete("/{contact_id}", status_code=204)
def delete_contact(session: SessionDep, user: CurrentUser, contact_id: int) -> Response:
    contact = crud.get_contact(session=session, contact_id=contact_id)
    _may_edit(user, contact)
    crud.delete_contact(session=session, contact=contact)
    session.commit()
    return Response(status_code=204)


@router.post("/{contact_id}/addresses", response_model=ContactPublic, status_code=201)
def add_address(
    session: SessionDep, user: CurrentUser, contact_id: int, body: AddressAdd
) -> ContactPublic:
    contact = crud.get_contact(session=session, contact_id=contact_id)
    _may_edit(user, contact)
    crud.add_address(session=session, contact=contact, address=body.address, primary=body.primary)
    session.commit()
    return _public(session, contact)


@router.delete("/{contact_id}/addresses/{address}", response_model=ContactPublic)
def remove_address(
    session: SessionDep, user: CurrentUser, contact_id: int, address: str
) -> ContactPublic:
    contact = crud.get_contact(session=session, contact_id=contact_id)
    _may_edit(user, contact)
    crud.remove_address(session=session, contact=contact, address=address)
    session.commit()
    return _public(session, contact)


@router.get("/{contact_id}/timeline", response_model=TimelinePublic)
def contact_timeline(
    session: SessionDep,
    viewer: ViewerDep,
    contact_id: int,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> TimelinePublic:
    crud.get_contact(session=session, contact_id=contact_id)  # 404 for an unknown contact
    return visibility.timeline(
        session=session, viewer=viewer, contact_id=contact_id, offset=offset, limit=limit
    )

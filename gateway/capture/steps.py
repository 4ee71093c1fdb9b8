"""The capture pipeline's own steps: who sent it (identify-owner), what it means (unwrap-forward).

They run after the door stored the message with its verdicts, and before the hooks'
``match-contacts`` and ``emit``, which need only ``item.sighting``. ``identify-owner`` is the
authoritative re-check of the door's decision against the users as they are now (a user
disabled since is not logged), and holds unproven mail in the quarantine or drops it: it never
bounces, because a DSN would go to an envelope sender nobody has proven (the door already
refused what it could while the sender was connected). ``unwrap-forward`` drops bounces and
auto-replies, and turns the rest into a :class:`Sighting`: a BCC is the rep's outbound mail; a
forward is unwrapped and its original logged. Both are pure enough to repeat after a crash.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Connection
from sqlmodel import Session

from gateway.authenticity import authserv_id_of, remove_our_results
from gateway.capture import policy
from gateway.capture.directory import Directory, load_directory
from gateway.capture.meaning import automatic, names_capture_address, unwrap
from gateway.capture.policy import Decision, Verdict
from gateway.capture.quarantine import holding, released_owner
from gateway.capture.settings import CaptureSettings
from gateway.errors import Discard
from gateway.message import parse_headers
from gateway.sighting import AccountRef, Sighting
from gateway.store.queue import QueuedMessage, Store

log = logging.getLogger(__name__)


class IdentifyOwner:
    """Settle as whom a captured message is logged; hold or drop it when nothing proves it."""

    name = "identify-owner"
    durable = False

    def __init__(self, *, store: Store, settings: CaptureSettings) -> None:
        self.store = store
        self.settings = settings

    async def __call__(self, item: QueuedMessage) -> None:
        capture: dict[str, Any] = item.meta.get("capture") or {}
        auth: dict[str, Any] = item.meta.get("authentication") or {}

        def read(connection: Connection) -> tuple[Directory, str | None]:
            return load_directory(Session(bind=connection)), released_owner(connection, item.id)

        directory, released = await self.store.committer.read(read)
        if released is not None:
            decision = Decision(Verdict.ACCEPT, owner=released, via="release")
            if released not in directory.own:
                raise Discard(f"not logged: {released}, to whom it was released, is no user now")
        else:
            decision = self._decide(capture, auth, directory)
        if decision.verdict is Verdict.UNPROVEN and self.settings.on_unverified == "quarantine":
            headers = parse_headers(item.raw)
            await self.store.committer.write(
                holding(
                    item.id,
                    from_address=str(capture.get("from", "")),
                    subject=str(headers.get("Subject", "")),
                    claimed_owner=decision.claimed_owner,
                    reason=decision.reason,
                )
            )
            raise Discard(f"quarantined: {decision.reason}")
        if not decision.proven or decision.owner is None:
            raise Discard(f"not logged: {decision.reason or decision.verdict.value}")
        item.facts["capture"] = {
            "owner": decision.owner,
            "via": decision.via,
            "addresses": sorted(directory.addresses_of(decision.owner)),
        }

    def _decide(
        self, capture: dict[str, Any], auth: dict[str, Any], directory: Directory
    ) -> Decision:
        token_owner = capture.get("token_owner")
        owners = {token_owner} if token_owner and token_owner in directory.own else set()
        from_address = str(capture.get("from", ""))
        claim = policy.claimant(from_address, owner_of=directory.owner_of, token_owners=owners)
        return policy.proven(
            claim,
            aligned=list(auth.get("aligned") or []),
            temporary=False,  # the door answered 451 for these; what is stored is final
            words={k: str(v) for k, v in auth.items() if isinstance(v, str)},
            from_domain=from_address.rpartition("@")[2],
        )


class UnwrapForward:
    """Turn a proven capture into the sighting to log: the BCC as it is, or a forward's original."""

    name = "unwrap-forward"
    durable = False

    def __init__(self, *, settings: CaptureSettings) -> None:
        self.settings = settings

    async def __call__(self, item: QueuedMessage) -> None:
        facts = item.facts.get("capture")
        if not facts:
            raise RuntimeError("unwrap-forward needs identify-owner to run before it")
        reason = automatic(item.raw, item.mail_from)
        if reason is not None:
            raise Discard(f"not logged: {reason}")
        owner = str(facts["owner"])
        own = frozenset(facts["addresses"])
        account = AccountRef(id=f"capture:{owner}", owner=owner, sharing=self.settings.sharing)
        auth: dict[str, Any] = item.meta.get("authentication") or {}
        if names_capture_address(
            item.raw, local_part=self.settings.local_part, domain=self.settings.domain
        ):
            original = unwrap(item.raw)
            if original is None:
                raise Discard(
                    "not logged: it was written to the capture address, but no forwarded "
                    "message was found in it"
                )
            item.sighting = Sighting(
                raw=original.raw,
                account=account,
                direction="outbound" if original.sender in own else "inbound",
                source="capture",
                # The verdicts prove the rep's forward, not the original's author: none here.
                authentication={},
                own_addresses=own,
            )
            log.info("capture %s: %s forward from %s unwrapped", item.id, original.form, owner)
            return
        results = str(item.meta.get("authentication_results", ""))
        raw = item.raw
        if results:
            # RFC 8601 §5: our own header on top, any forged one claiming our name removed.
            authserv_id = authserv_id_of(results.partition(":")[2])
            raw = results.encode("ascii") + remove_our_results(raw, authserv_id)
        item.sighting = Sighting(
            raw=raw,
            account=account,
            direction="outbound",
            source="capture",
            authentication={k: str(auth[k]) for k in ("spf", "dkim", "dmarc", "arc") if k in auth},
            own_addresses=own,
        )

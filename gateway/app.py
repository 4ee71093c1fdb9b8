"""The composition root: settings in, a running gateway out.

This is the only module that knows every part: it builds the engine and store, the relay and
signer, the pipeline steps, the worker, the SMTP doors and the admin API, wires them together, and
starts and stops them in order. Everything else receives what it needs as arguments. Start order
is store → worker → API → SMTP (doors open last, once everything behind them runs); stop order is
the reverse, so no door accepts a message that nothing could store.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn
from sqlmodel import Session, select

from gateway.api.app import create_api
from gateway.api.deps import ApiContext
from gateway.api.send import router as send_routes
from gateway.capture.api import CaptureService
from gateway.capture.api import router as capture_routes
from gateway.capture.door import CaptureListener, build_capture_listener
from gateway.capture.steps import IdentifyOwner, UnwrapForward
from gateway.dkim import DkimSigner
from gateway.dns import make_resolver
from gateway.errors import ConfigError
from gateway.imap.accounts import account_ref, own_addresses
from gateway.imap.api import push_router as imap_push_routes
from gateway.imap.api import router as imap_routes
from gateway.imap.models import MailAccount
from gateway.imap.presets import load_providers
from gateway.imap.service import ImapService
from gateway.metrics import Metrics
from gateway.outgoing import AccountRoutes, AppendSent, Outgoing
from gateway.pipeline import Step, build_pipelines
from gateway.relay import Relay
from gateway.settings import Settings
from gateway.sighting import AccountRef
from gateway.smtp.handlers import SubmissionHandler
from gateway.smtp.server import SmtpListener, check_aiosmtpd_version, server_tls_context
from gateway.steps import DkimSign, IdentifyAccount, IdentifySender, Normalise, RelayUpstream
from gateway.store.db import make_engine, migrate
from gateway.store.queue import GroupCommitter, Store
from gateway.users import Authenticator, UserError, get_user, identity_of
from gateway.worker import Worker
from hooks.api import router as webhook_routes
from hooks.crm_client import CrmClient
from hooks.emit import EmitLogged
from hooks.match import MatchContacts
from hooks.subscribers import ensure_crm_subscriber
from hooks.webhooks import Dispatcher, Outbox

log = logging.getLogger(__name__)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our loop: the gateway owns the signals, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Mailgate:
    """The whole gateway process."""

    def __init__(self, settings: Settings, *, reuse_port: bool = False) -> None:
        check_aiosmtpd_version()
        self.settings = settings
        self.reuse_port = reuse_port  # other gateway processes serve the same SMTP ports
        self.engine = make_engine(settings.database.url)
        self.metrics = Metrics()
        self.listener: SmtpListener | None = None
        self.capture: CaptureListener | None = None
        self.imap: ImapService | None = None
        self._identity_cache: dict[str, tuple[float, tuple[frozenset[str], AccountRef | None]]] = {}
        self.http: list[_EmbeddedUvicorn] = []
        self._http_tasks: list[asyncio.Task[None]] = []
        self.extra_apps: list[tuple[Any, str, int]] = []  # (ASGI app, host, port), e.g. the CRM

    async def start(self) -> None:
        settings = self.settings
        await asyncio.to_thread(migrate, self.engine)
        self.committer = GroupCommitter(
            self.engine,
            window=settings.database.group_commit_window_ms / 1000,
            max_batch=settings.database.group_commit_max_batch,
        )
        await self.committer.start()
        self.store = Store(
            self.engine, self.committer, lease_seconds=settings.database.lease_seconds
        )
        # After a crash and a restart, our predecessor's messages go on now, not at lease expiry.
        if freed := await self.store.reclaim():
            log.info("took back %d messages a stopped gateway process had leased", freed)
        self.relay = Relay(
            settings.relay,
            hostname=settings.server.hostname,
            resolver=make_resolver(settings.dns),
        )
        self.account_routes = AccountRoutes(
            service=lambda: self.imap,
            relay_settings=settings.relay,
            hostname=settings.server.hostname,
        )
        signer = DkimSigner.from_settings(settings.dkim) if settings.dkim.enabled else None
        hooks = await self._start_hooks()
        pipelines = build_pipelines(
            normalise=Normalise(hostname=settings.server.hostname),
            sign=DkimSign(signer),
            relay=RelayUpstream(self.relay, route=self.account_routes.relay_for),
            identify_sender=IdentifySender(
                sharing=settings.hooks.submission_sharing, identity_of=self._identity_of
            ),
            identify_account=IdentifyAccount(),
            append_sent=AppendSent(lambda: self.imap.append_sent if self.imap else None),
            capture=(
                IdentifyOwner(store=self.store, settings=settings.capture),
                UnwrapForward(settings=settings.capture),
            ),
            hooks=hooks,
        )
        self.worker = Worker(
            store=self.store,
            pipelines=pipelines,
            settings=settings.worker,
            relay_settings=settings.relay,
            hostname=settings.server.hostname,
            metrics=self.metrics,
        )
        await self.worker.start()
        if settings.imap.enabled:
            self.imap = ImapService(
                settings=settings,
                store=self.store,
                engine=self.engine,
                crm=self.crm,
                outbox=self.outbox,
                metrics=self.metrics,
                on_accepted=self.worker.wake,
            )
            await self.imap.start()

        if settings.api.enabled:
            api = create_api(
                ApiContext(
                    store=self.store,
                    engine=self.engine,
                    metrics=self.metrics,
                    wake=self.worker.wake,
                    link_secret=settings.hooks.link_secret,
                    services={
                        "dispatcher": self.dispatcher,
                        "imap": self.imap,
                        "capture": CaptureService(settings=settings),
                        "outgoing": Outgoing(
                            store=self.store,
                            engine=self.engine,
                            max_message_size=settings.submission.max_message_size,
                            max_recipients=settings.submission.max_recipients,
                            wake=self.worker.wake,
                            saves_sent=frozenset(
                                key
                                for key, preset in load_providers(
                                    settings.imap.providers_file
                                ).items()
                                if preset.saves_sent
                            ),
                        ),
                    },
                ),
                routers=[
                    webhook_routes(),
                    capture_routes(),
                    imap_routes(),
                    imap_push_routes(),
                    send_routes(),
                ],
            )
            await self._serve_http(api, settings.api.listen, settings.api.port)
        for app, host, port in self.extra_apps:
            await self._serve_http(app, host, port)

        if settings.submission.enabled:
            handler = SubmissionHandler(
                store=self.store,
                authenticator=Authenticator(self.engine),
                settings=settings.submission,
                metrics=self.metrics,
                trusted_networks=[
                    ipaddress.ip_network(n, strict=False)
                    for n in settings.submission.trusted_networks
                ],
                on_accepted=self.worker.wake,
            )
            self.listener = SmtpListener(
                handler,
                settings=settings.submission,
                hostname=settings.server.hostname,
                tls_context=server_tls_context(
                    settings.submission.cert_file, settings.submission.key_file
                ),
            )
            await self.listener.start(reuse_port=self.reuse_port)
        if settings.capture.enabled:
            cert = settings.submission
            self.capture = build_capture_listener(
                settings,
                self.store,
                self.engine,
                self.metrics,
                self.worker.wake,
                server_tls_context(cert.cert_file, cert.key_file)
                if cert.cert_file.exists()
                else None,
            )
            await self.capture.start()
        self.worker.wake()  # anything left from before a restart starts now

    async def _start_hooks(self) -> tuple[Step, ...]:
        """Contact matching and webhooks; returns the pipeline's (match, emit) steps."""
        hooks = self.settings.hooks
        # Webhooks never follow redirects and ignore proxy variables: the target is checked.
        self.webhook_client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_connections=hooks.dispatch_concurrency),
        )
        self.crm_http = httpx.AsyncClient(timeout=hooks.request_timeout_seconds, trust_env=False)
        self.crm = CrmClient(
            self.crm_http,
            base_url=self.settings.crm.url,
            token=hooks.crm_token,
            cache_seconds=hooks.match_cache_seconds,
            batch_size=hooks.match_batch_size,
        )
        self.outbox = Outbox()
        self.dispatcher = Dispatcher(
            committer=self.committer,
            client=self.webhook_client,
            schedule=hooks.retry_schedule_seconds,
            concurrency=hooks.dispatch_concurrency,
            timeout=hooks.request_timeout_seconds,
            max_response_bytes=hooks.max_response_bytes,
            poll_seconds=self.settings.worker.poll_interval_seconds,
        )
        if not hooks.enabled:
            return ()
        if not hooks.webhook_secrets:
            log.warning(
                "hooks are on but hooks.webhook_secrets is empty (run `mailgate init`, or set "
                "it): mail is relayed but not logged to the CRM"
            )
            return ()
        await ensure_crm_subscriber(self.committer, self.settings)
        await self.dispatcher.start()
        emit = EmitLogged(
            committer=self.committer,
            outbox=self.outbox,
            settings=hooks,
            on_emitted=self.dispatcher.wake,
        )
        return (MatchContacts(self.crm), emit)

    async def _identity_of(self, login: str) -> tuple[frozenset[str], AccountRef | None]:
        """A rep's own addresses and primary mailbox, cached for a minute (asked for every
        submitted message)."""
        cached = self._identity_cache.get(login)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]

        def read() -> tuple[frozenset[str], AccountRef | None]:
            with Session(self.engine) as session:
                primary = session.exec(
                    select(MailAccount).where(MailAccount.owner == login, MailAccount.is_primary)
                ).first()
                ref = account_ref(primary) if primary is not None else None
                mailbox = own_addresses(primary) if primary is not None else frozenset()
                try:
                    user = get_user(session, login)
                except UserError:
                    return frozenset({login}) | mailbox, ref
                identity = identity_of(session, user)
                return identity.addresses | {login} | mailbox, ref

        found = await asyncio.to_thread(read)
        if len(self._identity_cache) > 10_000:
            self._identity_cache.clear()
        self._identity_cache[login] = (now + 60, found)
        return found

    async def _serve_http(self, app: Any, host: str, port: int) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        server = _EmbeddedUvicorn(config)
        task = asyncio.create_task(server.serve(), name=f"http-{port}")
        # Wait until it listens (or fails), so "started" means reachable.
        deadline = asyncio.get_running_loop().time() + 30
        while not server.started:
            if task.done() or asyncio.get_running_loop().time() > deadline:
                # uvicorn logs the reason (usually: the port is in use) and exits its task.
                raise ConfigError(
                    f"cannot serve HTTP on {host}:{port} (see the log above); "
                    "free the port or change it in the config"
                )
            await asyncio.sleep(0.01)
        self.http.append(server)
        self._http_tasks.append(task)

    async def stop(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        if self.capture is not None:
            await self.capture.stop()
        if self.imap is not None:
            await self.imap.stop()
        for server in self.http:
            server.should_exit = True
        if self._http_tasks:
            await asyncio.wait(self._http_tasks, timeout=10)
        await self.worker.stop()
        await self.dispatcher.stop()
        await self.webhook_client.aclose()
        await self.crm_http.aclose()
        await self.relay.aclose()
        await self.account_routes.aclose()
        await self.committer.stop()
        self.engine.dispose()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        log.info("Mailgate running")
        try:
            await stop.wait()
        finally:
            await self.stop()

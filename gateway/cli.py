"""The ``mailgate`` command: set up, run and operate the gateway (and the bundled CRM).

Each sub-command is a small function that loads the settings once and calls the library; every
failure an admin can cause (a bad option, a missing file, an unknown user, a database that is
down) ends as one line on stderr that says what to do, with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import getpass
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cryptography.fernet import Fernet
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from gateway import users
from gateway.errors import GatewayError
from gateway.settings import Settings, config_path, load_settings, render_toml
from gateway.store.db import make_engine, migrate
from gateway.store.offline import with_session, with_store
from gateway.store.queue import Store

T = TypeVar("T")
Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """One line for the admin, with the fix."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per webhook is noise
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command
    logging.basicConfig(
        level=logging.INFO if args.command == "serve" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result: int = args.func(args)
        return result
    except (CliError, GatewayError, users.UserError, ValueError) as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return 2
    except OperationalError as exc:
        print(
            f"mailgate: the database is unreachable ({exc.orig}); check database.url",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("MAILGATE_DEBUG"):
            raise
        print(
            f"mailgate: unexpected error ({type(exc).__name__}: {exc}); "
            "run again with MAILGATE_DEBUG=1 to see where, and report it",
            file=sys.stderr,
        )
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailgate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", help="config file (default: $MAILGATE_CONFIG or ./mailgate.toml)"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    init = commands.add_parser(
        "init", help="write a config, create the database, a TLS certificate and an admin user"
    )
    init.add_argument("--admin", default="", help="the admin's email (default: admin@HOSTNAME)")
    init.add_argument(
        "--hostname", default="", help="this server's name (default: mailgate.localhost)"
    )
    init.set_defaults(func=cmd_init)

    commands.add_parser("serve", help="run the gateway").set_defaults(func=cmd_serve)
    commands.add_parser("migrate", help="upgrade the database schema").set_defaults(
        func=cmd_migrate
    )

    config = commands.add_parser("config", help="show or check the configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    config_commands.add_parser("check", help="validate the config file").set_defaults(
        func=cmd_config_check
    )
    config_commands.add_parser("show", help="print the effective config as TOML").set_defaults(
        func=cmd_config_show
    )

    user = commands.add_parser("user", help="manage the people who may send")
    user_commands = user.add_subparsers(dest="user_command", required=True)
    add = user_commands.add_parser("add", help="add a user")
    add.add_argument("email")
    add.add_argument("--admin", action="store_true", help="may use the admin API")
    add.add_argument(
        "--alias",
        action="append",
        default=[],
        help="another address they may send as (repeatable; @domain for all)",
    )
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.set_defaults(func=cmd_user_add)
    passwd = user_commands.add_parser("passwd", help="set a user's password")
    passwd.add_argument("email")
    passwd.add_argument("--password-stdin", action="store_true")
    passwd.set_defaults(func=cmd_user_passwd)
    user_commands.add_parser("list", help="list users").set_defaults(func=cmd_user_list)
    for name, disabled in (("disable", True), ("enable", False)):
        toggle = user_commands.add_parser(name, help=f"{name} a user")
        toggle.add_argument("email")
        toggle.set_defaults(func=cmd_user_toggle, disabled=disabled)
    alias = user_commands.add_parser("alias", help="let a user send as another address")
    alias.add_argument("email")
    alias.add_argument("address")
    alias.set_defaults(func=cmd_user_alias)

    token = commands.add_parser("token", help="admin API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="create a token for an admin")
    create.add_argument("email")
    create.add_argument("--label", default="")
    create.set_defaults(func=cmd_token_create)

    dkim = commands.add_parser("dkim", help="DKIM signing keys")
    dkim_commands = dkim.add_subparsers(dest="dkim_command", required=True)
    keygen = dkim_commands.add_parser("keygen", help="create a key and print its DNS record")
    keygen.add_argument("domain")
    keygen.add_argument("--selector", default="")
    keygen.add_argument("--ed25519", action="store_true", help="an Ed25519 key (RFC 8463)")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size")
    keygen.add_argument("--force", action="store_true", help="replace an existing key")
    keygen.set_defaults(func=cmd_dkim_keygen)
    dkim_commands.add_parser("list", help="list keys and their DNS records").set_defaults(
        func=cmd_dkim_list
    )

    queue = commands.add_parser("queue", help="inspect and act on the mail queue")
    queue_commands = queue.add_subparsers(dest="queue_command", required=True)
    listing = queue_commands.add_parser("list", help="messages, newest first")
    listing.add_argument("--state", choices=["queued", "done", "bounced", "discarded", "shunted"])
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_queue_list)
    for name, func, text in (
        ("show", cmd_queue_show, "one message and its deliveries"),
        ("retry", cmd_queue_retry, "retry now (failed recipients too)"),
        ("delete", cmd_queue_delete, "delete for good"),
    ):
        sub = queue_commands.add_parser(name, help=text)
        sub.add_argument("id")
        sub.set_defaults(func=func)

    webhooks = commands.add_parser("webhooks", help="events sent to the CRM and other subscribers")
    webhook_commands = webhooks.add_subparsers(dest="webhooks_command", required=True)
    events = webhook_commands.add_parser("list", help="events, newest first")
    events.add_argument("--state", choices=["pending", "delivered", "dead"])
    events.add_argument("--limit", type=int, default=50)
    events.set_defaults(func=cmd_webhooks_list)
    for name, func, text in (
        ("show", cmd_webhooks_show, "one event: payload and each delivery"),
        ("replay", cmd_webhooks_replay, "send a delivered or dead-lettered event again"),
    ):
        sub = webhook_commands.add_parser(name, help=text)
        sub.add_argument("id")
        sub.set_defaults(func=func)
    webhook_commands.add_parser("schema", help="the JSON Schema of every event").set_defaults(
        func=cmd_webhooks_schema
    )

    subscriber = commands.add_parser("subscriber", help="who receives webhooks")
    subscriber_commands = subscriber.add_subparsers(dest="subscriber_command", required=True)
    sub_add = subscriber_commands.add_parser("add", help="add a webhook receiver")
    sub_add.add_argument("name")
    sub_add.add_argument("url")
    sub_add.add_argument("--secret", default="", help="whsec_… (default: a new one, printed)")
    sub_add.add_argument("--event", action="append", default=[], help="event type (repeatable)")
    sub_add.add_argument(
        "--allow-private",
        action="store_true",
        help="allow a loopback/private address (an internal service)",
    )
    sub_add.set_defaults(func=cmd_subscriber_add)
    subscriber_commands.add_parser("list", help="list subscribers").set_defaults(
        func=cmd_subscriber_list
    )
    sub_remove = subscriber_commands.add_parser("remove", help="remove a subscriber")
    sub_remove.add_argument("name")
    sub_remove.set_defaults(func=cmd_subscriber_remove)

    from gateway.capture.cli import add_commands as add_capture_commands
    from gateway.imap.cli import add_commands as add_imap_commands

    add_capture_commands(commands)
    add_imap_commands(commands)
    try:
        from crm_api.cli import add_commands
    except ImportError:  # the CRM is optional for a gateway-only install
        pass
    else:
        add_commands(commands)
    return parser


# -- helpers ---------------------------------------------------------------------------------


def settings_of(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Again: "):
            raise CliError("the two passwords differ; nothing was changed")
        return first
    raise CliError("no terminal to ask for a password: pass --password-stdin and pipe it in")


def _with_session(args: argparse.Namespace, fn: Callable[[Session], T]) -> T:
    return with_session(settings_of(args), fn)


def _with_store(args: argparse.Namespace, fn: Callable[[Store], Awaitable[T]]) -> T:
    return with_store(settings_of(args), fn)


# -- commands --------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    defaults = Settings()
    hostname = args.hostname or defaults.server.hostname
    admin = args.admin or f"admin@{hostname}"
    if path.exists():
        print(f"kept the existing config {path}")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        hooks = _init_crm(path, defaults, admin)
        text = render_toml(
            defaults.model_copy(
                update={
                    "server": defaults.server.model_copy(update={"hostname": hostname}),
                    "hooks": hooks,
                    # Mailbox passwords are encrypted at rest with this key (Fernet).
                    "imap": defaults.imap.model_copy(
                        update={"secret_key": Fernet.generate_key().decode("ascii")}
                    ),
                }
            )
        )
        path.write_text(text, encoding="utf-8")
        path.chmod(0o600)  # it holds the webhook secret and the CRM token
        print(f"wrote {path} (every option is listed there with its default)")
    settings = load_settings(path)
    engine = make_engine(settings.database.url)
    migrate(engine)
    print(f"database ready: {settings.database.url}")
    sub = settings.submission
    if not sub.cert_file.exists():
        from gateway.tls import write_self_signed

        write_self_signed(sub.cert_file, sub.key_file, hostname=settings.server.hostname)
        print(f"wrote a self-signed TLS certificate {sub.cert_file} (replace it with a real one)")
    with Session(engine) as session:
        existing = [u for u, _ in users.list_users(session) if u.is_admin]
        if existing:
            print(f"admin exists already: {existing[0].email}")
        else:
            password = secrets.token_urlsafe(12)
            users.add_user(session, email=admin, password=password, is_admin=True)
            token = users.create_token(session, email=admin, label="init")
            crm_token = users.create_token(session, email=admin, label="bundled CRM")
            session.commit()
            print(f"admin user: {admin}  password: {password}")
            print(f"admin API token (shown once): {token}")
            _link_crm_to_gateway(path.parent / settings.crm.config, settings, crm_token)
    engine.dispose()
    print(
        "\nNext:\n"
        f"  mailgate user add rep@{settings.server.hostname}      # a sender, asks a password\n"
        f"  mailgate dkim keygen {settings.server.hostname}         # then publish the record\n"
        f"  set [relay] host/port in {path} to your upstream SMTP server\n"
        "  mailgate serve\n"
        f"Mail clients: SMTP {sub.listen}:{sub.port} (STARTTLS) or :{sub.tls_port} (TLS), "
        f"with AUTH. The bundled CRM: {settings.crm.url}/docs"
    )
    return 0


def _init_crm(path: Path, defaults: Settings, admin: str) -> Any:
    """Secrets for webhooks and links; the bundled CRM's config, schema, admin and token."""
    from hooks.webhooks import new_secret

    secret = new_secret()
    token = ""
    try:
        from crm_api.bootstrap import bootstrap
        from crm_api.settings import load_settings as load_crm_settings
    except ImportError:
        print("the bundled CRM is not installed; set [crm] url and hooks.crm_token by hand")
    else:
        crm_path = path.parent / defaults.crm.config
        if not crm_path.exists():
            crm_path.write_text(
                "# The bundled CRM's settings; conf/crm.toml documents every option.\n"
                "[webhooks]\n# Shared with the gateway (hooks.webhook_secrets in mailgate.toml).\n"
                f'secrets = ["{secret}"]\n',
                encoding="utf-8",
            )
            crm_path.chmod(0o600)
            print(f"wrote {crm_path} (the bundled CRM's config)")
        email, new_token = bootstrap(load_crm_settings(crm_path), admin_email=admin)
        token = new_token or ""
        print(f"CRM ready: admin {email}" + ("" if new_token else " (existed; token unchanged)"))
    return defaults.hooks.model_copy(
        update={
            "webhook_secrets": [secret],
            "crm_token": token,
            "link_secret": secrets.token_hex(32),
        }
    )


def _link_crm_to_gateway(crm_path: Path, settings: Settings, token: str) -> None:
    """Let the bundled CRM send mail through this gateway (its ``[gateway]`` table)."""
    if not crm_path.exists() or "[gateway]" in crm_path.read_text(encoding="utf-8"):
        return
    api = settings.api
    host = "127.0.0.1" if api.listen in ("", "0.0.0.0", "::") else api.listen
    host = f"[{host}]" if ":" in host else host
    with crm_path.open("a", encoding="utf-8") as out:
        out.write(
            "\n[gateway]\n# The gateway the CRM sends mail through: its admin API and a token.\n"
            f'url = "http://{host}:{api.port}"\ntoken = "{token}"\n'
        )
    print(f"the bundled CRM sends mail through this gateway ({crm_path} [gateway])")


# Set in the environment of the extra processes `serve` starts for `server.processes > 1`: they
# share the supervisor's ports, and their stdin is a pipe from it that it never writes to. End
# of file on it means the supervisor is gone, however it went (SIGKILL, the OOM killer), and the
# process stops instead of serving on as an orphan beside the supervisor's successor.
_SUPERVISED = "MAILGATE_SUPERVISED"


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import Mailgate

    settings = settings_of(args)
    logging.getLogger().setLevel(settings.server.log_level.upper())
    extra_processes = settings.server.processes - 1
    supervised = os.environ.get(_SUPERVISED) == "1"
    shared = extra_processes > 0 or supervised
    app = Mailgate(settings, reuse_port=shared)
    _add_embedded_crm(app, settings, args)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if supervised:
            _stop_with_supervisor(loop, stop)
        await app.start()
        _tune_gc()
        # Only now (schema migrated, ports bound) may the other processes start beside us.
        supervisor = asyncio.create_task(_supervise(args, extra_processes, stop))
        try:
            await stop.wait()
        finally:
            await app.stop()
            await supervisor

    try:
        asyncio.run(run())
    except OSError as exc:
        raise CliError(
            f"cannot listen: {exc.strerror} ({exc}); change the port in the config"
        ) from None
    return 0


def _tune_gc() -> None:
    """Set the cyclic garbage collector for a long-running server.

    Each message allocates a few hundred containers (coroutines, futures, handles, dicts), so
    the default young-generation threshold of 700 ran a collection every message or two: 4 %
    of the gateway's CPU at 1,000 messages/s. Most of that garbage is freed by reference
    counting before a collection sees it, so collecting every 20,000 allocations costs about
    the same per collection, twenty-eight times less often. The objects made at start-up
    (SQLAlchemy, pydantic, FastAPI: some 160,000) live as long as the process: they are frozen,
    so a full collection scans only what came after them.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _stop_with_supervisor(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Set ``stop`` when stdin, the supervisor's pipe, reaches end of file (see _SUPERVISED)."""

    def readable() -> None:
        try:
            data = os.read(0, 512)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            logging.getLogger(__name__).warning("the supervising process is gone; stopping")
            stop.set()

    os.set_blocking(0, False)
    loop.add_reader(0, readable)


async def _supervise(args: argparse.Namespace, count: int, stop: asyncio.Event) -> None:
    """Run ``count`` more gateway processes (SMTP doors, worker, dispatcher; no admin API or
    CRM, which this process serves) until ``stop``; one that dies is started again."""
    if count <= 0:
        return
    argv = [sys.executable, "-m", "gateway"]
    if args.config:
        argv += ["--config", str(args.config)]
    env = {
        **os.environ,
        _SUPERVISED: "1",
        "MAILGATE_SERVER__PROCESSES": "1",
        "MAILGATE_API__ENABLED": "false",
        "MAILGATE_CRM__EMBEDDED": "false",
    }
    log = logging.getLogger(__name__)

    async def keep_running(index: int) -> None:
        while not stop.is_set():
            child = await asyncio.create_subprocess_exec(
                *argv, "serve", env=env, stdin=asyncio.subprocess.PIPE
            )
            log.info("gateway process %d started (pid %d)", index, child.pid)
            stopping = asyncio.create_task(stop.wait())
            exited = asyncio.create_task(child.wait())
            await asyncio.wait({stopping, exited}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                stopping.cancel()
                assert child.stdin is not None
                child.stdin.close()  # its end of the pipe (see _SUPERVISED), not kept per restart
                if not stop.is_set():
                    log.error(
                        "gateway process %d exited (%s); starting it again", index, child.returncode
                    )
                    await asyncio.sleep(1)  # do not spin if it dies at once
                continue
            child.terminate()
            try:
                await asyncio.wait_for(exited, 60)
            except TimeoutError:
                child.kill()
                await exited

    await asyncio.gather(*(keep_running(i + 1) for i in range(count)))


def _add_embedded_crm(app: Any, settings: Settings, args: argparse.Namespace) -> None:
    if not settings.crm.embedded:
        return
    try:
        from crm_api.embed import embedded_app
    except ImportError:
        logging.getLogger(__name__).warning("crm.embedded is on but crm_api is not installed")
        return
    config = config_path(args.config).parent / settings.crm.config  # beside mailgate.toml
    app.extra_apps.append(embedded_app(settings.crm.url, str(config) if config.exists() else None))


def cmd_migrate(args: argparse.Namespace) -> int:
    engine = make_engine(settings_of(args).database.url)
    migrate(engine)
    engine.dispose()
    print("database schema is up to date")
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    settings_of(args)
    print(f"{config_path(args.config)}: OK")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    print(render_toml(settings_of(args)), end="")
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    generated = not args.password_stdin and not sys.stdin.isatty()
    password = secrets.token_urlsafe(12) if generated else _read_password(args.password_stdin)
    _with_session(
        args,
        lambda s: users.add_user(
            s, email=args.email, password=password, is_admin=args.admin, aliases=args.alias
        ),
    )
    print(f"added {args.email}" + (f"  password: {password}" if generated else ""))
    return 0


def cmd_user_passwd(args: argparse.Namespace) -> int:
    password = _read_password(args.password_stdin)
    _with_session(args, lambda s: users.set_password(s, email=args.email, password=password))
    print(f"password changed for {args.email}")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    rows = _with_session(args, users.list_users)
    for user, addresses in rows:
        flags = ",".join(
            f for f, on in (("admin", user.is_admin), ("disabled", user.disabled)) if on
        )
        print(f"{user.email:40} {flags or '-':16} {' '.join(addresses)}")
    return 0


def cmd_user_toggle(args: argparse.Namespace) -> int:
    _with_session(args, lambda s: users.set_disabled(s, email=args.email, disabled=args.disabled))
    print(f"{args.email} {'disabled' if args.disabled else 'enabled'}")
    return 0


def cmd_user_alias(args: argparse.Namespace) -> int:
    _with_session(
        args,
        lambda s: users.add_address(s, user=users.get_user(s, args.email), address=args.address),
    )
    print(f"{args.email} may now send as {args.address}")
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    token = _with_session(args, lambda s: users.create_token(s, email=args.email, label=args.label))
    print(token)
    return 0


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    from gateway.dkim import generate_key

    settings = settings_of(args)
    key = generate_key(
        settings.dkim.key_dir,
        args.domain,
        selector=args.selector or settings.dkim.selector,
        algorithm="ed25519-sha256" if args.ed25519 else "rsa-sha256",
        bits=args.bits,
        force=args.force,
    )
    print(f"wrote the key for {key.domain} (selector {key.selector}); publish this DNS record:")
    print(key.txt_record())
    return 0


def cmd_dkim_list(args: argparse.Namespace) -> int:
    from gateway.dkim import load_keys

    for key in load_keys(settings_of(args).dkim.key_dir):
        print(key.txt_record())
    return 0


def cmd_queue_list(args: argparse.Namespace) -> int:
    rows = _with_store(args, lambda s: s.list_messages(state=args.state, limit=args.limit))
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        when = datetime.fromtimestamp(row["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{row['id']}  {when}  {row['state']:9} {row['size']:>9}  {row['mail_from'] or '<>'}"
            f" -> {', '.join(row['rcpt_tos'])}"
        )
    if not rows:
        print("the queue is empty" if not args.state else f"no {args.state} messages")
    return 0


def cmd_queue_show(args: argparse.Namespace) -> int:
    row = _with_store(args, lambda s: s.get_message(args.id))
    if row is None:
        raise CliError(f"no message {args.id}; `mailgate queue list` shows the ids")
    print(json.dumps(row, indent=2, default=str))
    return 0


def cmd_queue_retry(args: argparse.Namespace) -> int:
    if not _with_store(args, lambda s: s.retry_now(args.id)):
        raise CliError(f"no message {args.id} that can be retried (done or unknown)")
    print(f"{args.id} will be retried within a second by the running gateway")
    return 0


def cmd_queue_delete(args: argparse.Namespace) -> int:
    if not _with_store(args, lambda s: s.delete(args.id)):
        raise CliError(f"no message {args.id}; `mailgate queue list` shows the ids")
    print(f"{args.id} deleted")
    return 0


def cmd_webhooks_list(args: argparse.Namespace) -> int:
    from hooks.admin import list_events

    rows = _with_store(args, lambda s: list_events(s.committer, state=args.state, limit=args.limit))
    for row in rows:
        when = datetime.fromtimestamp(row["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        states = " ".join(f"{k}={v}" for k, v in sorted(row["deliveries"].items()))
        print(f"{row['id']}  {when}  {row['event_type']:24} {states or 'no subscribers'}")
    if not rows:
        print("no events" + (f" with {args.state} deliveries" if args.state else ""))
    return 0


def cmd_webhooks_show(args: argparse.Namespace) -> int:
    from hooks.admin import show_event

    event = _with_store(args, lambda s: show_event(s.committer, args.id))
    if event is None:
        raise CliError(f"no webhook event {args.id}; `mailgate webhooks list` shows the ids")
    print(json.dumps(event, indent=2, default=str))
    return 0


def cmd_webhooks_replay(args: argparse.Namespace) -> int:
    from hooks.webhooks import replay

    if not _with_store(args, lambda s: replay(s.committer, args.id)):
        raise CliError(f"no delivered or dead-lettered event {args.id} to replay")
    print(f"{args.id} queued again; the running gateway sends it within a second")
    return 0


def cmd_webhooks_schema(args: argparse.Namespace) -> int:
    from hooks.events import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_subscriber_add(args: argparse.Namespace) -> int:
    from hooks.subscribers import add_subscriber
    from hooks.webhooks import new_secret

    secret = args.secret or new_secret()
    _with_store(
        args,
        lambda s: add_subscriber(
            s.committer,
            name=args.name,
            url=args.url,
            secret=secret,
            event_types=args.event,
            allow_private=args.allow_private,
        ),
    )
    print(f"added subscriber {args.name} -> {args.url}")
    if not args.secret:
        print(f"its signing secret (give it to the receiver): {secret}")
    return 0


def cmd_subscriber_list(args: argparse.Namespace) -> int:
    from hooks.subscribers import list_subscribers

    for row in _with_store(args, lambda s: list_subscribers(s.committer)):
        state = "enabled" if row["enabled"] else f"disabled ({row['disabled_reason']})"
        types = ",".join(row["event_types"]) or "all events"
        print(f"{row['name']:16} {row['url']}  {types}  {state}")
    return 0


def cmd_subscriber_remove(args: argparse.Namespace) -> int:
    from hooks.subscribers import remove_subscriber

    if not _with_store(args, lambda s: remove_subscriber(s.committer, args.name)):
        raise CliError(f"no subscriber {args.name}; `mailgate subscriber list` shows them")
    print(f"removed {args.name}")
    return 0

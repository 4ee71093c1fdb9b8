"""The ``mailgate crm …`` commands: ``serve``, ``migrate``, ``user add`` / ``user list``,
``token create`` and ``secret``. ``gateway/cli.py`` owns the ``mailgate`` command and calls
:func:`add_commands`; ``python -m crm_api …`` runs the same commands without the gateway. Every
handler returns an exit code and turns known failures into one line with the fix, never a
traceback."""

from __future__ import annotations

import argparse
import base64
import secrets
import sys
from collections.abc import Callable, Sequence

from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Session

from crm_api import crud
from crm_api.db import Database, migrate
from crm_api.errors import CRMError
from crm_api.models import Role, UserCreate
from crm_api.settings import ConfigError, Settings, load_settings

Handler = Callable[[argparse.Namespace], int]


def _fail(message: str) -> int:
    print(f"mailgate crm: {message}", file=sys.stderr)
    return 1


def _guarded(handler: Handler) -> Handler:
    """Map the failures a user can cause (config, database, our own 4xx) to one clear line."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ConfigError as exc:
            return _fail(str(exc))
        except CRMError as exc:
            return _fail(exc.detail)
        except OperationalError as exc:
            reason = str(exc.orig).splitlines()[0] if exc.orig else str(exc).splitlines()[0]
            return _fail(
                f"cannot use the database ({reason}); check database_url in crm.toml "
                "or MAILGATE_CRM_DATABASE_URL"
            )
        except SQLAlchemyError as exc:
            return _fail(f"database error: {str(exc).splitlines()[0]}; run `mailgate crm migrate`")

    return run


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "crm_config", None))


def _prepared_db(settings: Settings) -> Database:
    db = Database(settings.database_url)
    migrate(db.engine)  # the CLI may run before the server ever did
    with Session(db.engine) as session:
        crud.seed_org(session=session, policy=settings.policy)
        session.commit()
    return db


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from crm_api.main import create_app

    settings = _settings(args)
    host = args.host or settings.host
    port = args.port or settings.port
    uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level)
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    db = _prepared_db(_settings(args))
    db.dispose()
    print("database is at the newest schema")
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    db = _prepared_db(_settings(args))
    with Session(db.engine) as session:
        user = crud.create_user(
            session=session,
            user_in=UserCreate(email=args.email, role=Role(args.role), name=args.name or ""),
        )
        session.commit()
        print(f"added {user.role} {user.email} (id {user.id})")
    db.dispose()
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    db = _prepared_db(_settings(args))
    with Session(db.engine) as session:
        users, _count = crud.list_users(session=session, limit=100_000)
        for user in users:
            print(f"{user.id}\t{user.role}\t{user.email}\t{user.name}")
    db.dispose()
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    db = _prepared_db(_settings(args))
    with Session(db.engine) as session:
        user = crud.get_user_by_email(session=session, email=args.email)
        if user is None:
            return _fail(f"no user {args.email}; add one with `mailgate crm user add EMAIL`")
        token = crud.create_token(session=session, user=user)
        session.commit()
    db.dispose()
    print(token)
    print("(shown once: only its hash is stored)", file=sys.stderr)
    return 0


def cmd_secret(_args: argparse.Namespace) -> int:
    print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii"))
    return 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``crm`` and its sub-commands on the ``mailgate`` parser's subparsers."""
    crm = subparsers.add_parser("crm", help="the bundled CRM", description=__doc__)
    crm.add_argument(
        "--config",
        dest="crm_config",
        metavar="PATH",
        help="CRM config file (default: $MAILGATE_CRM_CONFIG, else conf/crm.toml if present)",
    )
    commands = crm.add_subparsers(dest="crm_command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the CRM's HTTP API (uvicorn)")
    serve.add_argument("--host", help="listen address (default: host in crm.toml, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: port in crm.toml, 8025)")
    serve.set_defaults(func=_guarded(cmd_serve))

    mig = commands.add_parser("migrate", help="bring the database to the newest schema")
    mig.set_defaults(func=_guarded(cmd_migrate))

    user = commands.add_parser("user", help="manage CRM users")
    user_cmds = user.add_subparsers(dest="user_command", metavar="COMMAND", required=True)
    add = user_cmds.add_parser("add", help="add a user")
    add.add_argument("email")
    add.add_argument("--role", choices=[r.value for r in Role], required=True)
    add.add_argument("--name", default="")
    add.set_defaults(func=_guarded(cmd_user_add))
    lst = user_cmds.add_parser("list", help="list users")
    lst.set_defaults(func=_guarded(cmd_user_list))

    token = commands.add_parser("token", help="manage API tokens")
    token_cmds = token.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    create = token_cmds.add_parser("create", help="create an API token (printed once)")
    create.add_argument("email")
    create.set_defaults(func=_guarded(cmd_token_create))

    secret = commands.add_parser("secret", help="print a new webhook secret (whsec_…)")
    secret.set_defaults(func=_guarded(cmd_secret))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m crm_api ARGS`` = ``mailgate crm ARGS``."""
    parser = argparse.ArgumentParser(prog="python -m crm_api")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["crm", *(sys.argv[1:] if argv is None else argv)])
    func: Handler = args.func
    return func(args)

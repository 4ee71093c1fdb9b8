"""The ``mailgate crm`` commands (run as ``python -m crm_api``, which is the same parser that
``gateway/cli.py`` mounts): users, tokens shown once and stored hashed, migrate, and one-line
errors with the fix instead of tracebacks. Also: the migrations match the models exactly."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import Session, SQLModel, select

from crm_api import crud
from crm_api.cli import add_commands
from crm_api.db import Database, migrate
from crm_api.models import ApiToken
from tests.crm_api.conftest import CRM, REPO


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crm_api", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_users_and_tokens_from_the_command_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {"MAILGATE_CRM_DATABASE_URL": url, "MAILGATE_CRM_CONFIG": str(REPO / "conf" / "crm.toml")}
    added = run("user", "add", "Dana@Acme.Example", "--role", "admin", "--name", "Dana", env=env)
    assert added.returncode == 0, added.stderr
    assert "dana@acme.example" in added.stdout
    again = run("user", "add", "dana@acme.example", "--role", "rep", env=env)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and "already exists" in again.stderr
    assert "dana@acme.example" in run("user", "list", env=env).stdout
    created = run("token", "create", "dana@acme.example", env=env)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("mgc_") and len(token) > 40
    db = Database(url)
    with Session(db.engine) as session:
        user = crud.user_for_token(session=session, token=token)
        assert user is not None and user.email == "dana@acme.example"
        hashes = session.exec(select(ApiToken.token_hash)).all()
        assert token not in hashes and crud.hash_token(token) in hashes  # stored hashed only
    db.dispose()
    missing = run("token", "create", "nobody@acme.example", env=env)
    assert missing.returncode == 1 and "crm user add" in missing.stderr


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        (["migrate"], {"MAILGATE_CRM_PORT": "eighty"}, "option 'port'"),
        (["--config", "/nonexistent/crm.toml", "migrate"], {}, "no such config file"),
        (["migrate"], {"MAILGATE_CRM_DATABASE_URL": "sqlite:////proc/nope/crm.db"}, "database_url"),
        (["user", "add", "not-an-email", "--role", "rep"], {}, "not an email address"),
    ],
)
def test_cli_errors_are_one_line_with_the_fix(
    tmp_path: Path, args: list[str], env: dict[str, str], words: str
) -> None:
    env = {"MAILGATE_CRM_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}", **env}
    result = run(*args, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("mailgate crm: ") and result.stderr.count("\n") == 1
    assert words in result.stderr


def test_add_commands_registers_crm_on_any_parser() -> None:
    parser = argparse.ArgumentParser(prog="mailgate")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["crm", "--config", "x.toml", "user", "add", "a@b.example", "--role", "rep"]
    )
    assert args.crm_config == "x.toml" and args.email == "a@b.example" and callable(args.func)
    for argv in (
        ["crm", "serve"],
        ["crm", "migrate"],
        ["crm", "user", "list"],
        ["crm", "token", "create", "a@b.c"],
    ):
        assert callable(parser.parse_args(argv).func)


def test_migrations_match_the_models(crm: CRM) -> None:
    db = Database(crm.database_url)
    migrate(db.engine)  # idempotent on an up-to-date database
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []
    db.dispose()


def test_bootstrap_creates_the_admin_once(tmp_path: Path) -> None:
    from crm_api.bootstrap import bootstrap
    from crm_api.settings import Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'boot.db'}")
    email, token = bootstrap(settings, admin_email="Boss@Acme.Example")
    assert email == "boss@acme.example" and token is not None and token.startswith("mgc_")
    assert bootstrap(settings, admin_email="boss@acme.example") == ("boss@acme.example", None)
    db = Database(settings.database_url)
    with Session(db.engine) as session:
        user = crud.user_for_token(session=session, token=token)
        assert user is not None and user.role == "admin"
    db.dispose()


def test_embedded_app_listens_where_the_gateway_says(tmp_path: Path) -> None:
    from crm_api.embed import embedded_app

    config = tmp_path / "crm.toml"
    config.write_text(f'database_url = "sqlite:///{tmp_path / "e.db"}"\n')
    app, host, port = embedded_app("http://127.0.0.1:18025", str(config))
    assert (host, port) == ("127.0.0.1", 18025)
    assert app.state.settings.database_url.endswith("e.db")

"""Configuration: the documented file, environment overrides, and one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.settings import Settings, load_settings, render_toml

ROOT = Path(__file__).resolve().parents[2]


def test_documented_config_lists_every_option_with_its_default() -> None:
    documented = (ROOT / "conf" / "mailgate.toml").read_text()
    # The file is generated from the model: if an option is added, the file must be regenerated.
    assert documented == render_toml(), "regenerate conf/mailgate.toml with render_toml()"
    assert Settings(**tomllib.loads(documented)) == Settings()
    for line in documented.splitlines():
        if "=" in line and not line.startswith("#"):
            key = line.split("=")[0].strip()
            previous = documented.splitlines()[documented.splitlines().index(line) - 1]
            assert previous.startswith("# "), f"{key} has no comment"


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text('[relay]\nhost = "smtp.example.com"\nport = 587\n')
    monkeypatch.setenv("MAILGATE_RELAY__PORT", "2525")
    settings = load_settings(path)
    assert settings.relay.host == "smtp.example.com"
    assert settings.relay.port == 2525


def test_unknown_option_names_the_key_and_a_fix(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text('[relay]\nhots = "x"\n')
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert str(error.value) == f"{path}: unknown option `relay.hots`; did you mean `relay.host`?"


def test_bad_value_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text('[submission]\nport = "submission"\ntrusted_networks = ["10.0.0.0/33"]\n')
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    message = str(error.value)
    assert "`submission.port` = 'submission'" in message
    assert "`submission.trusted_networks`" in message
    assert "Traceback" not in message


def test_broken_toml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text("[relay\n")
    with pytest.raises(ConfigError, match=r"not valid TOML .*fix the syntax"):
        load_settings(path)


def test_missing_explicit_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mailgate init"):
        load_settings(tmp_path / "nope.toml")


@pytest.mark.parametrize("section", ["relay", "hooks", "imap"])
def test_every_retry_schedule_needs_a_positive_wait(tmp_path: Path, section: str) -> None:
    path = tmp_path / "mailgate.toml"
    path.write_text(f"[{section}]\nretry_schedule_seconds = []\n")
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert f"`{section}.retry_schedule_seconds`" in str(error.value)
    assert "at least one positive number of seconds" in str(error.value)

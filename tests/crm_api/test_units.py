"""Pure parts of the CRM without a server: the Standard Webhooks verifier against the
published test vector, address / Message-ID / subject normalisation, and the settings loader's
one-line errors."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from crm_api.addresses import (
    InvalidAddress,
    in_domains,
    is_group_address,
    normalise_address,
    normalise_message_id,
    subject_key,
)
from crm_api.settings import ConfigError, load_settings
from crm_api.signatures import WebhookError, sign, verify

# The Standard Webhooks reference libraries' test vector.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
KEY = base64.b64decode(VECTOR_SECRET.removeprefix("whsec_"))
OTHER_KEY = b"x" * 32


def headers(
    sig: str = VECTOR_SIG, ts: str = str(VECTOR_TS), msg_id: str = VECTOR_ID
) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": ts, "webhook-signature": sig}


def test_sign_reproduces_the_published_vector() -> None:
    assert sign(KEY, VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIG


def test_verify_accepts_the_vector_with_any_configured_secret() -> None:
    got = verify(keys=[OTHER_KEY, KEY], headers=headers(), body=VECTOR_BODY, now=VECTOR_TS + 299)
    assert got == (VECTOR_ID, VECTOR_TS)
    # Several signatures in the header (the sender rotating): one valid is enough.
    multi = headers(sig=f"v1,bm9wZQ== {VECTOR_SIG}")
    assert verify(keys=[KEY], headers=multi, body=VECTOR_BODY, now=VECTOR_TS)[0] == VECTOR_ID


@pytest.mark.parametrize(
    ("hdrs", "body", "now", "status", "words"),
    [
        (headers(), VECTOR_BODY + b" ", VECTOR_TS, 401, "does not match"),
        (headers(), VECTOR_BODY, VECTOR_TS + 301, 401, "300 s"),
        (headers(), VECTOR_BODY, VECTOR_TS - 301, 401, "300 s"),
        (headers(ts=f"{VECTOR_TS}.0"), VECTOR_BODY, VECTOR_TS, 400, "integer"),
        (headers(ts="1e9"), VECTOR_BODY, VECTOR_TS, 400, "integer"),
        (headers(sig="v1a,abc"), VECTOR_BODY, VECTOR_TS, 400, "v1,"),
        ({"webhook-id": VECTOR_ID}, VECTOR_BODY, VECTOR_TS, 401, "missing"),
        (headers(msg_id="other"), VECTOR_BODY, VECTOR_TS, 401, "does not match"),
    ],
)
def test_verify_rejects(
    hdrs: dict[str, str], body: bytes, now: int, status: int, words: str
) -> None:
    with pytest.raises(WebhookError) as caught:
        verify(keys=[KEY], headers=hdrs, body=body, now=now)
    assert caught.value.status == status
    assert words in caught.value.detail


def test_verify_with_the_wrong_secret_only_fails() -> None:
    with pytest.raises(WebhookError, match="does not match"):
        verify(keys=[OTHER_KEY], headers=headers(), body=VECTOR_BODY, now=VECTOR_TS)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Ann@Example.COM ", "ann@example.com"),
        ("jörg@Bücher.example", "jörg@xn--bcher-kva.example"),
        ("x@münchen.de.", "x@xn--mnchen-3ya.de"),
    ],
)
def test_addresses_are_normalised(raw: str, expected: str) -> None:
    assert normalise_address(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "ann",
        "@example.com",
        "ann@",
        "a b@example.com",
        "ann@localhost",
        "ann@exa mple.com",
        "a..b@example.com",
        "ann@-example.com",
        "<ann@example.com>",
    ],
)
def test_invalid_addresses_are_refused(raw: str) -> None:
    with pytest.raises(InvalidAddress):
        normalise_address(raw)


def test_message_ids_and_subjects_normalise_for_threading() -> None:
    assert normalise_message_id(" <ABC.123@Host.Example> ") == "abc.123@host.example"
    assert subject_key("Re: AW: Fwd[2]:  SV: Quote   for Q3") == "quote for q3"
    assert subject_key("RE:re: Fw: hello") == "hello"
    assert subject_key("Review: re-run") == "review: re-run"  # words, not prefixes


def test_group_addresses_and_domains() -> None:
    groups = {"info", "support"}
    assert is_group_address("info@x.com", groups)
    assert is_group_address("no-reply-billing@x.com", groups)
    assert not is_group_address("ann@x.com", groups)
    assert in_domains("a@eu.mail.acme.com", {"acme.com"})
    assert not in_domains("a@notacme.com", {"acme.com"})


def test_settings_read_the_file_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "crm.toml"
    conf.write_text('port = 9000\ndatabase_url = "sqlite:///a.db"\n[webhooks]\nsecrets = []\n')
    monkeypatch.setenv("MAILGATE_CRM_PORT", "9100")
    monkeypatch.setenv("MAILGATE_CRM_WEBHOOKS__SECRETS", f'["{VECTOR_SECRET}"]')
    settings = load_settings(conf)
    assert settings.port == 9100
    assert settings.database_url == "sqlite:///a.db"
    assert settings.webhooks.secret_keys() == [KEY]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("prot = 1\n", "unknown option 'prot'"),
        ("[webhooks]\nsecret = []\n", "unknown option 'webhooks.secret'"),
        ('[webhooks]\nsecrets = ["abc"]\n', "must start with 'whsec_'"),
        ('[policy]\nauto_create = "always"\n', "policy.auto_create"),
        ("port = \n", "not valid TOML"),
    ],
)
def test_settings_errors_are_one_line_naming_the_key(tmp_path: Path, text: str, words: str) -> None:
    conf = tmp_path / "crm.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(conf)
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_shipped_config_loads_and_documents_every_option() -> None:
    from crm_api.settings import GatewaySettings, PolicySettings, Settings, WebhookSettings

    shipped = Path(__file__).resolve().parents[2] / "conf" / "crm.toml"
    assert load_settings(shipped).port == 8025
    text = shipped.read_text()
    sections = {"webhooks": WebhookSettings, "gateway": GatewaySettings, "policy": PolicySettings}
    for name in Settings.model_fields:
        wanted = f"[{name}]" if name in sections else f"# {name} = "
        assert wanted in text, f"conf/crm.toml does not document {name}"
    for model in sections.values():
        for name in model.model_fields:
            assert f"# {name} = " in text, f"conf/crm.toml does not document {name}"

"""settings.py: defaults from DESIGN.md, one ConfigError naming each bad variable, and how the commands report it."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest

from helpers import TOKEN_KEYS
from settings import DEFAULT_COMPATIBILITY_DATE, MAX_LOG_LINE, ConfigError, Settings, redact_url, settings_from

ROOT = Path(__file__).resolve().parent.parent
TODAY = date(2026, 11, 29)
ESI_ENV = {"ESI_USER_AGENT": "killmail-worker/1.0 (ops@example.org)", "EVE_CLIENT_ID": "id",
           "EVE_CLIENT_SECRET": "secret"}


def load(**env: str) -> Settings:
    return settings_from({**ESI_ENV, **env}, today=TODAY)


def config_error(env: dict, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        settings_from(env, today=TODAY, **kwargs)
    return caught.value


# ------------------------------------------------------------------------------------------------ defaults

@pytest.mark.parametrize("attribute, default", [      # the table in DESIGN.md
    ("database_url", "postgresql:///killmails"),
    ("rabbitmq_url", "amqp://guest:guest@localhost:5672/%2F"),
    ("queue_name", "killmail_sync_queue"),
    ("prefetch_count", 5),
    ("esi_base_url", "https://esi.evetech.net"),
    ("sso_token_url", "https://login.eveonline.com/v2/oauth/token"),
    ("sync_interval_seconds", 300),
    ("esi_compatibility_date", "2026-08-18"),
    ("notify_max_age_seconds", 3600),
    ("zkillboard_push", False),
    ("zkillboard_url", "https://zkillboard.com/api/killmail/add"),
])
def test_defaults(attribute, default):
    assert getattr(load(), attribute) == default
    assert getattr(Settings(), attribute) == default


def test_esi_values_are_read():
    settings = load()
    assert (settings.esi_user_agent, settings.eve_client_id, settings.eve_client_secret) == \
        ("killmail-worker/1.0 (ops@example.org)", "id", "secret")


@pytest.mark.parametrize("variable, raw, attribute, value", [
    ("DATABASE_URL", "postgresql://u@db.example:5432/km", "database_url", "postgresql://u@db.example:5432/km"),
    ("DATABASE_URL", "postgres:///km", "database_url", "postgres:///km"),
    ("RABBITMQ_URL", "amqps://u:p@mq.example/vh", "rabbitmq_url", "amqps://u:p@mq.example/vh"),
    ("QUEUE_NAME", "test.queue-1:a", "queue_name", "test.queue-1:a"),
    ("PREFETCH_COUNT", "1", "prefetch_count", 1),
    ("PREFETCH_COUNT", " 12 ", "prefetch_count", 12),
    ("ESI_BASE_URL", "http://127.0.0.1:8080/", "esi_base_url", "http://127.0.0.1:8080"),   # no double slash
    ("ESI_BASE_URL", "https://esi.evetech.net/latest/", "esi_base_url", "https://esi.evetech.net/latest"),
    ("SSO_TOKEN_URL", "http://127.0.0.1:8080/v2/oauth/token", "sso_token_url",
     "http://127.0.0.1:8080/v2/oauth/token"),
    ("SYNC_INTERVAL_SECONDS", "600", "sync_interval_seconds", 600),
    ("ESI_COMPATIBILITY_DATE", "2025-01-01", "esi_compatibility_date", "2025-01-01"),
    ("ESI_COMPATIBILITY_DATE", TODAY.isoformat(), "esi_compatibility_date", TODAY.isoformat()),
    ("HTTP_TIMEOUT_SECONDS", "5", "http_timeout_seconds", 5.0),
    ("STATUS_BASIC_AUTH", "ops:pw", "status_basic_auth", "ops:pw"),
    ("STATUS_AUTH_BY_PROXY", "1", "status_auth_by_proxy", True),
    ("EVE_CALLBACK_URL", "http://localhost:8000/callback", "eve_callback_url", "http://localhost:8000/callback"),
    ("PREFETCH_COUNT", "", "prefetch_count", 5),     # empty is the default, as in a copied .env.example
    ("NOTIFY_MAX_AGE_SECONDS", "0", "notify_max_age_seconds", 0),
    ("ZKILLBOARD_PUSH", "1", "zkillboard_push", True),
    ("ZKILLBOARD_PUSH", "0", "zkillboard_push", False),
    ("ZKILLBOARD_URL", "http://127.0.0.1:9/add/", "zkillboard_url", "http://127.0.0.1:9/add"),
])
def test_values_are_read_and_normalised(variable, raw, attribute, value):
    login = {"FLASK_SECRET_KEY": "k" * 32} if variable == "EVE_CALLBACK_URL" else {}  # login needs a session key
    assert getattr(load(**login, **{variable: raw}), attribute) == value


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("variable", ["ESI_USER_AGENT", "EVE_CLIENT_ID", "EVE_CLIENT_SECRET"])
@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_esi_value_names_the_variable(variable, value):
    env = dict(ESI_ENV)
    if value is None:
        del env[variable]
    else:
        env[variable] = value
    error = config_error(env)
    assert error.variable == variable
    assert variable in str(error)


def test_requests_default_user_agent_is_refused():
    error = config_error({**ESI_ENV, "ESI_USER_AGENT": "python-requests/2.32.0"})
    assert error.variable == "ESI_USER_AGENT"


@pytest.mark.parametrize("variable, raw", [
    ("PREFETCH_COUNT", "abc"),
    ("PREFETCH_COUNT", "0"),
    ("PREFETCH_COUNT", "-1"),
    ("PREFETCH_COUNT", "1.5"),
    ("PREFETCH_COUNT", "65"),
    ("SYNC_INTERVAL_SECONDS", "five minutes"),
    ("SYNC_INTERVAL_SECONDS", "1"),
    ("DETAIL_CONCURRENCY", "0"),
    ("MAX_ATTEMPTS", "x"),
    ("RETRY_BASE_SECONDS", "0"),
    ("HTTP_TIMEOUT_SECONDS", "0"),
    ("ESI_BASE_URL", "esi.evetech.net"),
    ("ESI_BASE_URL", "ftp://esi.evetech.net"),
    ("ESI_BASE_URL", "https://"),
    ("SSO_TOKEN_URL", "not a url"),
    ("DATABASE_URL", "mysql://localhost/km"),
    ("DATABASE_URL", "killmails"),
    ("RABBITMQ_URL", "http://localhost:5672"),
    ("RABBITMQ_URL", "amqp://"),
    ("QUEUE_NAME", "has space"),
    ("QUEUE_NAME", "a/b"),
    ("ESI_COMPATIBILITY_DATE", "2026-11-30"),      # tomorrow: never send a future date
    ("ESI_COMPATIBILITY_DATE", "2099-01-01"),
    ("ESI_COMPATIBILITY_DATE", "2026-13-01"),
    ("ESI_COMPATIBILITY_DATE", "18.08.2026"),
    ("STATUS_BASIC_AUTH", "no-colon"),
    ("NOTIFY_MAX_AGE_SECONDS", "-1"),
    ("NOTIFY_MAX_AGE_SECONDS", "an hour"),
    ("ZKILLBOARD_PUSH", "maybe"),
    ("ZKILLBOARD_URL", "http://zkillboard.com/api/killmail/add/"),
])
def test_bad_value_names_the_variable(variable, raw):
    error = config_error({**ESI_ENV, variable: raw})
    assert error.variable == variable
    assert str(error).startswith(f"{variable}:")
    assert "\n" not in str(error)


PASSWORD = "pw-hunter2-0xC0FFEE"


@pytest.mark.parametrize("variable, raw", [
    ("DATABASE_URL", f"mysql://km:{PASSWORD}@db.example/km"),
    ("DATABASE_URL", f"postgresql://km:{PASSWORD}%ZZ@db.example/km"),      # libpq quotes the bad token
    ("DATABASE_URL", f"postgresql://km:{PASSWORD}%C3%28@db.example/km"),   # percent-encoded, not UTF-8
    ("DATABASE_URL", f"postgresql://km:{PASSWORD} x@db.example/km"),
    ("DATABASE_URL", f"postgresql://km:{PASSWORD}@[::1/km"),               # libpq would quote the whole URL
    ("DATABASE_URL", f"postgresql://km:{PASSWORD}@db.example/km?bad option=1"),
    ("DATABASE_URL", f"host=db.example password={PASSWORD}"),
    ("RABBITMQ_URL", f"http://km:{PASSWORD}@mq.example/vh"),
    ("RABBITMQ_URL", f"amqp://km:{PASSWORD}@mq.example:port/vh"),
    ("RABBITMQ_URL", f"amqp://km:{PASSWORD}@mq.example/vh?heartbeat=soon"),
    ("RABBITMQ_URL", f"amqps://km:{PASSWORD}@mq.example/vh?ssl_options=%7B"),
    ("ESI_BASE_URL", f"http://km:{PASSWORD}@esi.example"),
])
def test_a_bad_url_is_named_without_its_password(variable, raw):
    error = config_error({**ESI_ENV, variable: raw})
    assert error.variable == variable
    assert PASSWORD not in str(error) and "hunter2" not in str(error)
    assert "\n" not in str(error)


@pytest.mark.parametrize("url, shown", [
    ("postgresql://km:secret@db.example:5432/km", "postgresql://km:***@db.example:5432/km"),
    ("postgresql://km:se/cr@et@db.example/km", "postgresql://km:***@db.example/km"),
    ("amqps://km:secret@mq.example/%2F", "amqps://km:***@mq.example/%2F"),
    ("postgresql://km@db.example/km", "postgresql://km@db.example/km"),
    ("postgresql://db.example/km?password=secret&sslmode=verify-full",
     "postgresql://db.example/km?password=***&sslmode=verify-full"),
    ("host=db.example password='se cret' user=km", "host=db.example password=*** user=km"),
    ("https://esi.evetech.net", "https://esi.evetech.net"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize("variable", ["ESI_BASE_URL", "SSO_TOKEN_URL", "SSO_AUTHORIZE_URL", "SSO_JWKS_URL",
                                      "SSO_REVOKE_URL", "ZKILLBOARD_URL"])
@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1:8080", True), ("127.0.0.53", True), ("localhost:8080", True), ("[::1]:8080", True),
    ("esi.evetech.net", False), ("10.0.0.5:8080", False), ("localhost.example.org", False), ("0.0.0.0", False),
])
def test_esi_and_sso_urls_are_https_but_to_a_loopback_host(variable, host, allowed):
    assert load(**{variable: f"https://{host}/x"})  # https anywhere
    if allowed:
        assert getattr(load(**{variable: f"http://{host}/x"}), variable.lower()) == f"http://{host}/x"
    else:
        error = config_error({**ESI_ENV, variable: f"http://{host}/x"})
        assert (error.variable, "https" in str(error)) == (variable, True)


def test_basic_auth_refuses_the_deploy_kits_placeholder():
    error = config_error({**ESI_ENV, "STATUS_BASIC_AUTH": "ops:CHANGE-ME"})
    assert (error.variable, "placeholder" in str(error)) == ("STATUS_BASIC_AUTH", True)


@pytest.mark.parametrize("raw", [":", "ops:", ":s3cret", " : "])
def test_basic_auth_needs_a_user_and_a_password(raw):
    error = config_error({**ESI_ENV, "STATUS_BASIC_AUTH": raw})
    assert str(error) == "STATUS_BASIC_AUTH: must look like user:password, neither of them empty"


def test_the_default_compatibility_date_is_not_in_the_future_of_the_spec():
    assert date.fromisoformat(DEFAULT_COMPATIBILITY_DATE) == date(2026, 8, 18)


def test_need_esi_false_does_not_need_the_esi_values():
    settings = settings_from({}, today=TODAY, need_esi=False)
    assert (settings.esi_user_agent, settings.eve_client_id, settings.eve_client_secret) == ("", "", "")
    assert settings.prefetch_count == 5


def test_need_esi_false_still_checks_everything_else():
    assert config_error({"PREFETCH_COUNT": "abc"}, need_esi=False).variable == "PREFETCH_COUNT"


# ------------------------------------------------------------------------------------------------ the object

@pytest.mark.parametrize("env, routes", [
    ({}, {}),
    ({"HTTPS_PROXY": "http://proxy:3128"},
     {"https://esi.evetech.net": "http://proxy:3128", "https://login.eveonline.com": "http://proxy:3128"}),
    ({"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": ".evetech.net"},
     {"https://login.eveonline.com": "http://proxy:3128"}),
    ({"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2", "no_proxy": "login.eveonline.com"},
     {"https://esi.evetech.net": "http://lower:2"}),
    ({"ALL_PROXY": "socks5://s:1080", "ESI_BASE_URL": "http://127.0.0.1:8080", "NO_PROXY": "127.0.0.1"},
     {"https://login.eveonline.com": "socks5://s:1080"}),
    ({"HTTP_PROXY": "http://proxy:3128"}, {}),          # ESI and SSO are https
], ids=["none", "https", "no_proxy_suffix", "lower_case_wins", "all_proxy", "http_only"])
def test_proxy_variables_are_read_once_per_host(env, routes):
    assert dict(load(**env).http_proxies) == routes


def test_a_ca_bundle_variable_is_kept():
    assert load().ca_bundle == ""
    assert load(REQUESTS_CA_BUNDLE="/etc/ssl/corp.pem").ca_bundle == "/etc/ssl/corp.pem"
    assert load(CURL_CA_BUNDLE="/etc/ssl/curl.pem").ca_bundle == "/etc/ssl/curl.pem"


def test_settings_is_frozen():
    settings = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.prefetch_count = 10


def test_repr_shows_no_secret():
    settings = load(EVE_CLIENT_SECRET="client-SECRET", STATUS_BASIC_AUTH="ops:basic-SECRET",
                    APP_API_TOKEN="api-SECRET", DATABASE_URL="postgresql://app:db-SECRET@db.internal/killmails",
                    RABBITMQ_URL="amqp://app:broker-SECRET@mq.internal/%2F",
                    HTTPS_PROXY="http://proxy-user:proxy-SECRET@proxy.internal:3128")
    assert settings.http_proxies and "SECRET" not in repr(settings) and "SECRET" not in str(settings)


def test_token_key_is_unset_by_default_and_read_as_keys_in_order():
    assert load().token_keys == ()
    assert load(TOKEN_KEY=f" {TOKEN_KEYS[0]} ").token_keys == (TOKEN_KEYS[0],)
    assert load(TOKEN_KEY=f"{TOKEN_KEYS[1]}, {TOKEN_KEYS[0]},").token_keys == (TOKEN_KEYS[1], TOKEN_KEYS[0])


@pytest.mark.parametrize("raw, words", [
    ("not-a-fernet-key", "the key is not a Fernet key"),
    (f"{TOKEN_KEYS[0]},{TOKEN_KEYS[1][:-3]}", "key 2 of 2 is not a Fernet key"),
    ("CHANGE-ME", "placeholder"),
])
def test_a_bad_token_key_names_the_variable_and_never_the_key(raw, words):
    error = config_error({**ESI_ENV, "TOKEN_KEY": raw})
    assert error.variable == "TOKEN_KEY" and words in str(error)
    assert all(part not in str(error) for part in raw.split(",") if part != "CHANGE-ME")


def test_repr_shows_no_token_key():
    settings = load(TOKEN_KEY=",".join(TOKEN_KEYS))
    assert not any(key in repr(settings) or key in str(settings) for key in TOKEN_KEYS)


LOGS = """
import logging, sys
from settings import setup_logging
setup_logging(verbose=sys.argv[1] == "verbose")
log = logging.getLogger("worker")
log.warning("ESI said: %s", "oops\\n✅ Synced 1000 killmails\\r\\n\\x1b[2J\\u2028 done")
log.info("x" * 10000)
try:
    raise ValueError("a\\nfake line")
except ValueError:
    log.exception("job crashed")
"""


@pytest.mark.parametrize("verbose", ["verbose", "plain"])
def test_a_log_record_is_one_line_with_whitespace_collapsed_and_a_capped_length(verbose):
    result = subprocess.run([sys.executable, "-c", LOGS, verbose], cwd=ROOT, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    body, long, crash = result.stdout.splitlines()
    assert body.endswith("ESI said: oops ✅ Synced 1000 killmails [2J done")  # ESC gone, the rest is text
    assert len(long) == MAX_LOG_LINE - 1 and " … " in long
    assert "job crashed Traceback (most recent call last):" in crash and crash.endswith("ValueError: a fake line")


# ------------------------------------------------------------------------------------------------ the commands

def clean_env(**overrides: str) -> dict[str, str]:
    """The test's environment without any project variable, then the overrides.

    Every variable the check reaches is set explicitly (possibly empty), so a stray `.env` cannot fill it in:
    load_dotenv(override=False) leaves set variables alone.
    """
    prefixes = ("ESI_", "EVE_", "DATABASE_", "RABBITMQ_", "QUEUE_", "PREFETCH_", "SSO_", "SYNC_", "DETAIL_",
                "MAX_", "RETRY_", "HTTP_", "STATUS_", "APP_", "HEALTH_", "FLASK_", "TOKEN_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update({"DATABASE_URL": "postgresql:///killmails", "RABBITMQ_URL": "amqp://guest:guest@localhost:5672/%2F",
                "QUEUE_NAME": "killmail_sync_queue", "PREFETCH_COUNT": "5", "ESI_COMPATIBILITY_DATE": "2026-08-18",
                **ESI_ENV, "PYTHONUNBUFFERED": "1"})
    env.update(overrides)
    return env


@pytest.mark.parametrize("script, overrides, variable", [
    ("killmail_worker.py", {"ESI_USER_AGENT": ""}, "ESI_USER_AGENT"),
    ("killmail_worker.py", {"EVE_CLIENT_ID": ""}, "EVE_CLIENT_ID"),
    ("killmail_worker.py", {"PREFETCH_COUNT": "abc"}, "PREFETCH_COUNT"),
    ("queue_killmails.py", {"PREFETCH_COUNT": "abc"}, "PREFETCH_COUNT"),
    ("queue_killmails.py", {"DATABASE_URL": "mysql://localhost/km"}, "DATABASE_URL"),
    ("killmail_worker.py", {"TOKEN_KEY": "not-a-fernet-key"}, "TOKEN_KEY"),
    ("status_app.py", {"TOKEN_KEY": f"{TOKEN_KEYS[0]},not-a-fernet-key"}, "TOKEN_KEY"),
])
def test_a_bad_setting_stops_the_command_with_one_line_and_exit_2(script, overrides, variable):
    result = subprocess.run([sys.executable, str(ROOT / script)], env=clean_env(**overrides), cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("script", ["killmail_worker.py", "queue_killmails.py", "status_app.py"])
def test_a_url_libpq_cannot_parse_stops_the_command_without_its_password(script):
    result = subprocess.run([sys.executable, str(ROOT / script)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=clean_env(DATABASE_URL=f"postgresql://km:{PASSWORD}%ZZ@127.0.0.1/km"))
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", 'configuration error: DATABASE_URL: is not a valid connection URL: invalid percent-encoded token: '
               '"…"\n')


def test_queue_killmails_does_not_need_the_esi_values():
    """The producer never calls ESI: with no ESI values it gets past the settings (and fails later, not with 2)."""
    env = clean_env(ESI_USER_AGENT="", EVE_CLIENT_ID="", EVE_CLIENT_SECRET="",
                    DATABASE_URL="postgresql://nobody@127.0.0.1:9/none")
    result = subprocess.run([sys.executable, str(ROOT / "queue_killmails.py")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------ login


def test_login_is_off_by_default_with_sso_defaults():
    settings = load()
    assert settings.eve_callback_url == "" and settings.login_allowed_corporations == () == \
        settings.login_allowed_alliances
    assert (settings.sso_authorize_url, settings.sso_jwks_url, settings.sso_revoke_url) == (
        "https://login.eveonline.com/v2/oauth/authorize", "https://login.eveonline.com/oauth/jwks",
        "https://login.eveonline.com/v2/oauth/revoke")


SECRET_KEY = "k" * 32


def test_login_values_are_read():
    settings = load(EVE_CALLBACK_URL="https://km.example.org/km/callback", LOGIN_ALLOWED_CORPORATIONS="98000001, 2",
                    LOGIN_ALLOWED_ALLIANCES="99000001", SSO_JWKS_URL="http://127.0.0.1:8089/oauth/jwks/",
                    FLASK_SECRET_KEY=SECRET_KEY)
    assert settings.flask_secret_key == SECRET_KEY and SECRET_KEY not in repr(settings)
    assert settings.eve_callback_url == "https://km.example.org/km/callback"
    assert settings.login_allowed_corporations == (98000001, 2) and settings.login_allowed_alliances == (99000001,)
    assert settings.sso_jwks_url == "http://127.0.0.1:8089/oauth/jwks"


@pytest.mark.parametrize("variable, raw", [
    ("EVE_CALLBACK_URL", "km.example.org/callback"),
    ("EVE_CALLBACK_URL", "https://km.example.org/login"),
    ("EVE_CALLBACK_URL", "https://km.example.org/callback?x=1"),
    ("EVE_CALLBACK_URL", "http://km.example.org/callback"),  # a login's code and cookie in the clear
    ("STATUS_AUTH_BY_PROXY", "maybe"),
    ("SSO_AUTHORIZE_URL", "login.eveonline.com/v2/oauth/authorize"),
    ("SSO_JWKS_URL", "ftp://login.eveonline.com/oauth/jwks"),
    ("SSO_REVOKE_URL", "revoke"),
    ("LOGIN_ALLOWED_CORPORATIONS", "98000001;98000002"),
    ("LOGIN_ALLOWED_ALLIANCES", "-5"),
])
def test_a_bad_login_value_names_the_variable(variable, raw):
    assert config_error({**ESI_ENV, "FLASK_SECRET_KEY": SECRET_KEY, variable: raw}).variable == variable


@pytest.mark.parametrize("raw, words", [("", "is required but not set"), ("short-key", "at least 32 characters"),
                                        ("CHANGE-ME", "placeholder")])
def test_login_needs_a_good_flask_secret_key(raw, words):
    env = {**ESI_ENV, "EVE_CALLBACK_URL": "https://km.example.org/callback", "FLASK_SECRET_KEY": raw}
    error = config_error(env, need_esi=False)
    assert error.variable == "FLASK_SECRET_KEY" and words in str(error)


def test_without_login_no_flask_secret_key_is_needed():
    assert load().flask_secret_key == ""


def test_the_status_app_refuses_to_start_without_the_secret_key_in_one_line():
    env = clean_env(EVE_CALLBACK_URL="http://127.0.0.1:8000/callback", FLASK_SECRET_KEY="")
    result = subprocess.run([sys.executable, str(ROOT / "status_app.py")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["configuration error: FLASK_SECRET_KEY: is required but not set"]


@pytest.mark.parametrize("variable", ["ESI_USER_AGENT", "EVE_CLIENT_ID", "EVE_CLIENT_SECRET"])
def test_login_needs_the_app_credentials_even_where_esi_is_not_needed(variable):
    env = {**ESI_ENV, "EVE_CALLBACK_URL": "http://127.0.0.1:8000/callback", "FLASK_SECRET_KEY": SECRET_KEY,
           variable: ""}
    assert config_error(env, need_esi=False).variable == variable

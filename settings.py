"""Configuration: read the environment once, validate every value, return a frozen Settings."""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from urllib.parse import ParseResult, urlparse
from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]  # there, but not in typeshed

import pika
import psycopg
from dotenv import load_dotenv
from psycopg.conninfo import conninfo_to_dict

import tokens

# The date of the spec in ../shared/esi (the one this client was built and tested against).
DEFAULT_COMPATIBILITY_DATE = "2026-08-18"
SSO_AUTHORIZE_URL = "https://login.eveonline.com/v2/oauth/authorize"
SSO_JWKS_URL = "https://login.eveonline.com/oauth/jwks"     # SSO's metadata names it as jwks_uri
SSO_REVOKE_URL = "https://login.eveonline.com/v2/oauth/revoke"
ZKILLBOARD_URL = "https://zkillboard.com/api/killmail/add"  # + {killmail_id}/{killmail_hash}/
PLACEHOLDER = "CHANGE-ME"  # the deploy kit's examples' stand-in for a password
MIN_SECRET_KEY = 32         # characters of FLASK_SECRET_KEY


class ConfigError(Exception):
    """A configuration value is missing or invalid; the message names the variable."""

    def __init__(self, variable: str, problem: str):
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class Settings:
    """Everything the programs need from the environment, validated."""

    database_url: str = field(default="postgresql:///killmails", repr=False)  # may hold a password
    rabbitmq_url: str = field(default="amqp://guest:guest@localhost:5672/%2F", repr=False)
    queue_name: str = "killmail_sync_queue"
    prefetch_count: int = 5
    esi_base_url: str = "https://esi.evetech.net"
    sso_token_url: str = "https://login.eveonline.com/v2/oauth/token"
    eve_client_id: str = ""
    eve_client_secret: str = field(default="", repr=False)
    esi_user_agent: str = ""
    sync_interval_seconds: int = 300
    esi_compatibility_date: str = DEFAULT_COMPATIBILITY_DATE
    detail_concurrency: int = 32
    max_attempts: int = 8
    retry_base_seconds: int = 30
    http_timeout_seconds: float = 20.0
    status_basic_auth: str = field(default="", repr=False)
    status_auth_by_proxy: bool = False  # a proxy in front asks for a password: the pages answer beyond loopback
    app_api_token: str = field(default="", repr=False)
    health_max_sync_age_seconds: int = 1800
    esi_egress: str = ""
    # Read here once rather than by requests on every call: {"scheme://host": proxy URL} for the ESI and SSO
    # hosts that the standard *_PROXY / NO_PROXY variables route through a proxy, and a CA bundle if one is set.
    http_proxies: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # a proxy URL may hold a password
    ca_bundle: str = ""
    # Adding pilots from a browser (web/login.py): enabled by the callback URL, as registered with the EVE application.
    eve_callback_url: str = ""
    sso_authorize_url: str = SSO_AUTHORIZE_URL
    sso_jwks_url: str = SSO_JWKS_URL
    sso_revoke_url: str = SSO_REVOKE_URL
    login_allowed_corporations: tuple[int, ...] = ()   # empty: any corporation (unless the alliances say no)
    login_allowed_alliances: tuple[int, ...] = ()
    # Signs a pilot's session cookie (web/pilot.py); required with login, which is what makes sessions.
    flask_secret_key: str = field(default="", repr=False)
    # Notifications (send_notifications.py): a killmail older than this when stored is announced nowhere.
    notify_max_age_seconds: int = 3600
    worker_stop_grace_seconds: int = 30     # SIGTERM ends a worker within this; its jobs finish or are released
    job_stall_seconds: int = 300            # a job with no progress for this long is killed with its process
    job_deadline_seconds: int = 1800        # a job still running then fails into the retry queue
    zkillboard_push: bool = False
    zkillboard_url: str = ZKILLBOARD_URL
    # Seal refresh tokens at rest (tokens.py): the first key seals, every key opens. Empty: stored as given.
    token_keys: tuple[str, ...] = field(default=(), repr=False)


def _text(env: Mapping[str, str], name: str, default: str | None) -> str:
    value = env.get(name, "").strip()
    if value:
        return value
    if default is None:
        raise ConfigError(name, "is required but not set")
    return default


def _integer(env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be a whole number, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(name, f"must be between {minimum} and {maximum}, got {value}")
    return value


def redact_url(url: str) -> str:
    """A URL (or libpq key=value string) fit for a message: any password replaced by ***."""
    text = re.sub(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s&]*)", r"\1***", url)
    scheme, sep, rest = text.partition("://")
    userinfo, at, host = rest.rpartition("@")  # the last '@': a raw '@' or '/' in a password stays before it
    if sep and at and ":" in userinfo:
        return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}"
    return text


def _unquoted(message: str) -> str:
    """A parser's error message without the quoted parts of what it parsed (libpq quotes a bad password token, or
    the whole URI), bare names such as an option's kept."""
    return re.sub(r"""(["'])(?![A-Za-z_]{1,40}\1)[^"']*\1""", r"\1…\1", " ".join(message.split()))


def _parse_url(name: str, value: str) -> ParseResult:
    try:
        return urlparse(value)
    except ValueError as exc:  # an unclosed [ of an IPv6 host
        raise ConfigError(name, f"is not a valid URL ({exc}): {redact_url(value)!r}") from None


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    value = _text(env, name, default)
    parsed = _parse_url(name, value)
    if parsed.scheme not in schemes or (not parsed.netloc and parsed.scheme not in ("postgresql", "postgres")):
        raise ConfigError(name, f"must be a {' or '.join(schemes)} URL, got {redact_url(value)!r}")
    return value.rstrip("/") if parsed.scheme.startswith("http") else value


def is_loopback(host: str | None) -> bool:
    """Whether a URL's host is this machine (localhost, 127.0.0.0/8, ::1)."""
    if host is None:
        return False
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _https_url(env: Mapping[str, str], name: str, default: str) -> str:
    """An https URL; plain http only to a loopback host (the local simulator of the tests and the demo): tokens
    and the client secret travel on these."""
    return destination_url(name, _url(env, name, default, ("http", "https")))


def destination_url(name: str, value: str) -> str:
    """A URL secrets travel to (tokens, a webhook's own): https, or http to a loopback host; ConfigError naming
    only the scheme and host otherwise (the rest of a webhook's URL is its secret)."""
    parsed = _parse_url(name, value)
    if parsed.scheme == "https" and parsed.hostname or parsed.scheme == "http" and is_loopback(parsed.hostname):
        return value
    shown = f"{parsed.scheme}://{parsed.hostname}" if parsed.hostname else f"a {parsed.scheme or 'relative'} URL"
    raise ConfigError(name, f"must be an https URL (http only to localhost), got {shown}")


def _database_url(env: Mapping[str, str]) -> str:
    value = _url(env, "DATABASE_URL", "postgresql:///killmails", ("postgresql", "postgres"))
    try:
        conninfo_to_dict(value)  # libpq's own parser: every later connect would fail the same way
    except UnicodeDecodeError:
        raise ConfigError("DATABASE_URL", "a percent-encoded part is not UTF-8") from None
    except psycopg.Error as exc:  # its text quotes the bad token (the password perhaps) or the whole URL
        raise ConfigError("DATABASE_URL", f"is not a valid connection URL: {_unquoted(str(exc))}") from None
    return value


def _rabbitmq_url(env: Mapping[str, str]) -> str:
    value = _url(env, "RABBITMQ_URL", "amqp://guest:guest@localhost:5672/%2F", ("amqp", "amqps"))
    try:
        pika.URLParameters(value)  # pika's parser, ssl_options included: each connect would fail the same way
    except (ValueError, SyntaxError, OSError) as exc:  # SyntaxError: ssl_options; OSError: a certificate file
        raise ConfigError("RABBITMQ_URL", f"is not a valid AMQP URL: {type(exc).__name__}: "
                                          f"{_unquoted(str(exc))}") from None
    return value


def _compatibility_date(env: Mapping[str, str], today: date) -> str:
    value = _text(env, "ESI_COMPATIBILITY_DATE", DEFAULT_COMPATIBILITY_DATE)
    try:
        parsed = date.fromisoformat(value)
    except ValueError:
        raise ConfigError("ESI_COMPATIBILITY_DATE", f"must be a date like 2026-08-18, got {value!r}") from None
    if parsed > today:
        raise ConfigError("ESI_COMPATIBILITY_DATE", f"must not be in the future, got {value}")
    return value


def _basic_auth(env: Mapping[str, str]) -> str:
    value = env.get("STATUS_BASIC_AUTH", "").strip()
    if value and ":" not in value:
        raise ConfigError("STATUS_BASIC_AUTH", "must look like user:password")
    user, _, password = value.partition(":")
    if value and not (user and password):
        raise ConfigError("STATUS_BASIC_AUTH", "must look like user:password, neither of them empty")
    if password == PLACEHOLDER:
        raise ConfigError("STATUS_BASIC_AUTH", f"still has the example's placeholder password {PLACEHOLDER}")
    return value


def _egress(env: Mapping[str, str]) -> str:
    value = env.get("ESI_EGRESS", "").strip()
    if value and not re.fullmatch(r"[A-Za-z0-9_.:-]{1,100}", value):
        raise ConfigError("ESI_EGRESS", f"may hold only letters, digits and _.:- , got {value!r}")
    return value


def _callback_url(env: Mapping[str, str]) -> str:
    value = env.get("EVE_CALLBACK_URL", "").strip()
    if not value:
        return ""
    parsed = _parse_url("EVE_CALLBACK_URL", value)
    # Kept exactly as given (no trailing slash dropped): SSO compares it with the registered one character by
    # character. The status app serves /callback, so the URL's path must end there (a proxy may add a prefix).
    if parsed.scheme not in ("http", "https") or not parsed.netloc or not parsed.path.endswith("/callback") \
            or parsed.query or parsed.fragment:
        raise ConfigError("EVE_CALLBACK_URL", f"must be an http or https URL ending in /callback, got {value!r}")
    if parsed.scheme != "https" and not is_loopback(parsed.hostname):  # a login's code and cookie travel on it
        raise ConfigError("EVE_CALLBACK_URL", f"must be https (http only to localhost), got {value!r}")
    return value


def _secret_key(env: Mapping[str, str], *, required: bool) -> str:
    value = _text(env, "FLASK_SECRET_KEY", None if required else "")
    if value == PLACEHOLDER:
        raise ConfigError("FLASK_SECRET_KEY", f"still has the example's placeholder {PLACEHOLDER}")
    if value and len(value) < MIN_SECRET_KEY:
        # A short key can be guessed offline from one cookie, and then any pilot's session forged.
        raise ConfigError("FLASK_SECRET_KEY", f"must be at least {MIN_SECRET_KEY} characters long (python -c "
                                              "'import secrets; print(secrets.token_urlsafe(32))' makes one)")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ConfigError(name, f"must be 1 or 0, got {value!r}")
    return value in ("1", "true", "yes")


def _ids(env: Mapping[str, str], name: str) -> tuple[int, ...]:
    raw = env.get(name, "").strip()
    try:
        ids = tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ConfigError(name, f"must be comma-separated ids like 98000001,98000002, got {raw!r}") from None
    if any(i <= 0 for i in ids):
        raise ConfigError(name, f"ids must be positive, got {raw!r}")
    return ids


def _token_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """TOKEN_KEY: one Fernet key, or several separated by commas while rotating (the first seals)."""
    keys = tuple(part.strip() for part in env.get("TOKEN_KEY", "").split(",") if part.strip())
    for number, key in enumerate(keys, 1):
        if key == PLACEHOLDER:
            raise ConfigError("TOKEN_KEY", f"still has the example's placeholder {PLACEHOLDER}")
        try:
            tokens.check_key(key)
        except ValueError:  # the key itself is never quoted: it may be a real one mistyped
            which = f"key {number} of {len(keys)}" if len(keys) > 1 else "the key"
            raise ConfigError("TOKEN_KEY", f"{which} is not a Fernet key (32 bytes in url-safe base64; python -c "
                                           "'from cryptography.fernet import Fernet; "
                                           "print(Fernet.generate_key().decode())' makes one)") from None
    return keys


def _proxies(env: Mapping[str, str], urls: list[str]) -> tuple[tuple[str, str], ...]:
    """Which of these URLs' hosts go through a proxy, as curl and requests read HTTPS_PROXY, HTTP_PROXY,
    ALL_PROXY and NO_PROXY (the lower-case name wins)."""
    found: dict[str, str] = {}
    for name in sorted(env, key=lambda n: n.islower()):  # upper-case first, so lower-case overrides
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy") and env[name].strip():
            found[name.lower()[:-len("_proxy")]] = env[name].strip()
    routes = {}
    for url in urls:
        parsed = urlparse(url)
        proxy = found.get(parsed.scheme) or found.get("all")
        if proxy and not proxy_bypass_environment(parsed.hostname or "", found):
            routes[f"{parsed.scheme}://{parsed.hostname}"] = proxy
    return tuple(routes.items())


def settings_from(env: Mapping[str, str], *, today: date | None = None, need_esi: bool = True) -> Settings:
    """Build Settings from a mapping of environment variables, raising ConfigError on the first bad value."""
    today = today or date.today()
    queue = _text(env, "QUEUE_NAME", "killmail_sync_queue")
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,200}", queue):
        raise ConfigError("QUEUE_NAME", f"may hold only letters, digits and _.:- , got {queue!r}")
    need_esi = need_esi or bool(env.get("EVE_CALLBACK_URL", "").strip())  # the login routes call SSO and ESI
    user_agent = _text(env, "ESI_USER_AGENT", None if need_esi else "")
    if need_esi and user_agent.lower().startswith("python-requests"):
        raise ConfigError("ESI_USER_AGENT", "must name the app, its version and a contact, not requests' default")
    esi_base_url = _https_url(env, "ESI_BASE_URL", "https://esi.evetech.net")
    sso_token_url = _https_url(env, "SSO_TOKEN_URL", "https://login.eveonline.com/v2/oauth/token")
    callback_url = _callback_url(env)
    sso_jwks_url = _https_url(env, "SSO_JWKS_URL", SSO_JWKS_URL)
    sso_revoke_url = _https_url(env, "SSO_REVOKE_URL", SSO_REVOKE_URL)
    return Settings(
        database_url=_database_url(env),
        rabbitmq_url=_rabbitmq_url(env),
        queue_name=queue,
        prefetch_count=_integer(env, "PREFETCH_COUNT", 5, 1, 64),
        esi_base_url=esi_base_url,
        sso_token_url=sso_token_url,
        eve_client_id=_text(env, "EVE_CLIENT_ID", None if need_esi else ""),
        eve_client_secret=_text(env, "EVE_CLIENT_SECRET", None if need_esi else ""),
        esi_user_agent=user_agent,
        sync_interval_seconds=_integer(env, "SYNC_INTERVAL_SECONDS", 300, 30, 86400 * 7),
        esi_compatibility_date=_compatibility_date(env, today),
        detail_concurrency=_integer(env, "DETAIL_CONCURRENCY", 32, 1, 64),
        max_attempts=_integer(env, "MAX_ATTEMPTS", 8, 1, 50),
        retry_base_seconds=_integer(env, "RETRY_BASE_SECONDS", 30, 1, 3600),
        http_timeout_seconds=float(_integer(env, "HTTP_TIMEOUT_SECONDS", 20, 1, 300)),
        status_basic_auth=_basic_auth(env),
        status_auth_by_proxy=_flag(env, "STATUS_AUTH_BY_PROXY"),
        app_api_token=env.get("APP_API_TOKEN", "").strip(),
        health_max_sync_age_seconds=_integer(env, "HEALTH_MAX_SYNC_AGE_SECONDS", 1800, 10, 86400 * 7),
        esi_egress=_egress(env),
        http_proxies=_proxies(env, [esi_base_url, sso_token_url, sso_jwks_url, sso_revoke_url]),
        ca_bundle=(env.get("REQUESTS_CA_BUNDLE") or env.get("CURL_CA_BUNDLE") or "").strip(),
        eve_callback_url=callback_url,
        sso_authorize_url=_https_url(env, "SSO_AUTHORIZE_URL", SSO_AUTHORIZE_URL),
        sso_jwks_url=sso_jwks_url,
        sso_revoke_url=sso_revoke_url,
        login_allowed_corporations=_ids(env, "LOGIN_ALLOWED_CORPORATIONS"),
        login_allowed_alliances=_ids(env, "LOGIN_ALLOWED_ALLIANCES"),
        flask_secret_key=_secret_key(env, required=bool(callback_url)),
        notify_max_age_seconds=_integer(env, "NOTIFY_MAX_AGE_SECONDS", 3600, 0, 86400 * 365),
        worker_stop_grace_seconds=_integer(env, "WORKER_STOP_GRACE_SECONDS", 30, 1, 3600),
        job_stall_seconds=_integer(env, "JOB_STALL_SECONDS", 300, 10, 86400),
        job_deadline_seconds=_integer(env, "JOB_DEADLINE_SECONDS", 1800, 10, 86400),
        zkillboard_push=_flag(env, "ZKILLBOARD_PUSH"),
        zkillboard_url=_https_url(env, "ZKILLBOARD_URL", ZKILLBOARD_URL),
        token_keys=_token_keys(env),
    )


def load_settings(*, need_esi: bool = True) -> Settings:
    """Read `.env` (without overriding the real environment) and the environment into Settings."""
    load_dotenv(override=False)
    return settings_from(os.environ, need_esi=need_esi)


def load_settings_or_exit(*, need_esi: bool = True) -> Settings:
    """load_settings for a command's start: a bad or missing value prints one line naming the variable and exits
    2, never a traceback."""
    try:
        return load_settings(need_esi=need_esi)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


MAX_LOG_LINE = 4000  # characters of one log line; a longer one keeps its start and its end (a traceback's last line)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # newlines, escapes that move a terminal's cursor, ...


class OneLineFormatter(logging.Formatter):
    """One line per record, whitespace and control characters collapsed, the length capped: text from outside
    (an error body, a header) cannot write a log line of its own."""

    def format(self, record: logging.LogRecord) -> str:
        text = " ".join(_CONTROL.sub(" ", super().format(record)).split())
        if len(text) <= MAX_LOG_LINE:
            return text
        half = (MAX_LOG_LINE - 3) // 2
        return f"{text[:half]} … {text[-half:]}"


def setup_logging(*, verbose: bool) -> None:
    """Log INFO records to stdout, one line each: the bare message for operators, or with time, level and pid
    when verbose."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
                                          if verbose else "%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("pika").setLevel(logging.WARNING)  # pika narrates every connection at INFO


def describe(exc: BaseException) -> str:
    """An exception as one short line for a log or a page (never carries a URL's password: pika and libpq
    do not put it in their messages)."""
    text = " ".join(str(exc).split()) or repr(exc)
    return f"{type(exc).__name__}: {text}"[:300]

"""What the tests share besides fixtures: the services' URLs and the test secrets, settings for a test, running the
project's commands, polling with a deadline, reading queues, and the record of what the secret-leak check reads.

The fixtures are in conftest.py; tests import these as `from helpers import ...` (pytest puts tests/ on sys.path
for conftest.py; pyproject.toml's pythonpath adds the project's modules and devtools/). Always by that name: a
second copy of this module (`tests.helpers`) would have a list of watched secrets of its own that the leak check
never reads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pika
from psycopg import pq

from screenshot import ACCESS_TOKEN, REFRESH_TOKEN
from settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEVTOOLS = ROOT / "devtools"

ADMIN_URL = os.environ.get("TEST_ADMIN_DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
CLIENT_ID, CLIENT_SECRET = "test-client", "test-client-secret-5c0e"
USER_AGENT = "killmail-worker-tests/1.0 (tests@example.org)"
# The test databases' URLs carry this password (trust authentication ignores it) so that a URL printed whole is
# found out; the admin URL's own password, where it has one, is watched instead.
DATABASE_PASSWORD = "test-database-password-81d4"
# TOKEN_KEY's keys of the tests (tokens.py): watched like every secret, whichever test uses them.
TOKEN_KEYS = ("qYk44BBQN3hGrczweYUtIY6Shtdte2y-EjLSz4GAHL4=", "ryXaL6MLFoG1iBTgd5DUk9tEvvCeT_QXVsEXkzRW4dU=")


def _password(url: str) -> str | None:
    userinfo, at, _ = url.partition("://")[2].rpartition("@")
    return userinfo.partition(":")[2] or None if at else None


def with_password(url: str, password: str) -> str:
    """The URL with this password, unless it has one already."""
    scheme, _, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" in userinfo:
        return url
    return f"{scheme}://{userinfo}:{password}@{host}"


def _fixed_secrets() -> set[str]:
    """The secrets every test may hold: the app's client secret, the database password, the broker's user:password
    (the broker's password alone, "guest", is also its user name), the status rows' tokens, TOKEN_KEY's keys."""
    broker_userinfo = RABBITMQ_URL.partition("://")[2].rpartition("@")[0]
    return {CLIENT_SECRET, _password(ADMIN_URL) or DATABASE_PASSWORD, ACCESS_TOKEN, REFRESH_TOKEN, *TOKEN_KEYS,
            *([f"{broker_userinfo}@"] if ":" in broker_userinfo else [])} - {None}


FIXED_SECRETS = _fixed_secrets()
MIN_SECRET = 8
_watched: list[Iterable[str]] = []  # this test's other secrets (read at its end: a simulator issues tokens as it goes)
_seen: list[str] = []  # the text this test read from commands, apps and queues, for the leak check at its end


def watch_secrets(secrets: Iterable[str]) -> None:
    """Have the running test fail should any of these secrets show (a live collection is read at the test's end)."""
    _watched.append(secrets)


def record_output(*parts: str | bytes | None) -> None:
    """Hand text the test read to the secret-leak check (the fixture records what it patches; a test that reads a
    child's pipe itself, line by line, records each line here)."""
    _seen.extend(p.decode(errors="replace") if isinstance(p, bytes) else str(p) for p in parts if p)


def url_secrets(url: str) -> set[str]:
    """What a webhook's URL holds that only its owner may see: everything after the host (a Discord token is the
    path's last part), each query value, and a password before the host."""
    parts = urlsplit(url)
    rest = parts.path + (f"?{parts.query}" if parts.query else "")
    return {rest, parts.path.rpartition("/")[2], *(value for _, value in parse_qsl(parts.query)),
            parts.password or ""}


def make_settings(database_url: str, sim_url: str = "http://127.0.0.1:9", **overrides) -> Settings:
    """Settings pointing at the test database, broker and simulator."""
    values = dict(database_url=database_url, rabbitmq_url=RABBITMQ_URL, esi_base_url=sim_url,
                  sso_token_url=f"{sim_url}/v2/oauth/token", eve_client_id=CLIENT_ID,
                  eve_client_secret=CLIENT_SECRET, esi_user_agent=USER_AGENT, retry_base_seconds=1)
    values.update(overrides)
    watch_secrets(values.get("token_keys", ()))  # a key a test made up is watched too
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess these settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_", "RABBITMQ_", "ESI_", "EVE_", "TOKEN_KEY"))}
    env.update({
        "DATABASE_URL": settings.database_url, "RABBITMQ_URL": settings.rabbitmq_url,
        "QUEUE_NAME": settings.queue_name, "PREFETCH_COUNT": str(settings.prefetch_count),
        "ESI_BASE_URL": settings.esi_base_url, "SSO_TOKEN_URL": settings.sso_token_url,
        "EVE_CLIENT_ID": settings.eve_client_id, "EVE_CLIENT_SECRET": settings.eve_client_secret,
        "ESI_USER_AGENT": settings.esi_user_agent, "SYNC_INTERVAL_SECONDS": str(settings.sync_interval_seconds),
        "RETRY_BASE_SECONDS": str(settings.retry_base_seconds), "MAX_ATTEMPTS": str(settings.max_attempts),
        "DETAIL_CONCURRENCY": str(settings.detail_concurrency), "PYTHONUNBUFFERED": "1",
        "WORKER_STOP_GRACE_SECONDS": str(settings.worker_stop_grace_seconds),
        "JOB_STALL_SECONDS": str(settings.job_stall_seconds),
        "JOB_DEADLINE_SECONDS": str(settings.job_deadline_seconds),
        "HTTP_TIMEOUT_SECONDS": str(int(settings.http_timeout_seconds)),
        **({"TOKEN_KEY": ",".join(settings.token_keys)} if settings.token_keys else {}),
    })
    return env


def insert_users(conn, pilots) -> None:
    """Write users as the web app does at login: only its five columns."""
    pilots = list(pilots)
    watch_secrets([token for p in pilots for token in (p["access_token"], p["refresh_token"])])
    for p in pilots:
        conn.execute(
            "INSERT INTO users (character_id, character_name, access_token, refresh_token, expires_at) "
            "VALUES (%s, %s, %s, %s, %s)",
            (p["character_id"], p["character_name"], p["access_token"], p["refresh_token"], p["expires_at"]),
        )
    conn.commit()


def run_script(script: str, settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run one of the project's commands in a subprocess with these settings."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], env=settings_env(settings), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def wait_until(predicate, *, timeout: float = 60.0, what: str = "condition", interval: float = 0.05):
    """Poll a condition with a deadline (the condition is the synchronisation, not the interval)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def jobs(queue: str) -> list[tuple[int, dict]]:
    """Every job waiting in the queue, as (priority, body), taken off it."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel, found = connection.channel(), []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        found.append((properties.priority, json.loads(body)))
    connection.close()
    return found


def queue_counts(*queues: str, url: str = RABBITMQ_URL) -> list[int]:
    """Ready messages per queue (0 for a queue that does not exist), on the shared broker unless `url` says."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        counts = []
        channel = connection.channel()
        for queue in queues:
            try:
                counts.append(channel.queue_declare(queue, passive=True).method.message_count)
            except pika.exceptions.ChannelClosedByBroker:
                counts.append(0)
                channel = connection.channel()
        return counts
    finally:
        connection.close()


def ledger_spent(conn, bucket: str, now: datetime, *, window: int) -> dict:
    """What the ESI ledger counts against a bucket now: own and other tokens spent in the window, and in flight."""
    return conn.execute(
        """
        SELECT (SELECT coalesce(sum(own), 0) FROM esi_spent
                WHERE bucket = %(b)s AND second > %(since)s)::int AS own,
               (SELECT coalesce(sum(other), 0) FROM esi_spent
                WHERE bucket = %(b)s AND second > %(since)s)::int AS other,
               (SELECT coalesce(sum(tokens), 0) FROM esi_in_flight
                WHERE bucket = %(b)s AND sent_at > %(since)s)::int AS in_flight
        """,
        {"b": bucket, "since": now - timedelta(seconds=window)},
    ).fetchone()


@contextmanager
def round_trips(conn) -> Iterator[list[int]]:
    """Count the round trips a connection makes in the block, from libpq's protocol trace: each turn from the
    client's messages to the server's. The count is the list's one item once the block ends."""
    counted = [0]
    with tempfile.TemporaryFile("w+") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield counted
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        sending = False
        for line in trace:  # a query's text may go on over several lines, which start with neither
            if line.startswith("F\t"):
                sending = True
            elif line.startswith("B\t") and sending:
                counted[0] += 1
                sending = False


def waits_for_a_lock(conn, pid: int) -> bool:
    """Whether the backend `pid` is waiting for a lock (a row, a transaction, an advisory lock)."""
    row = conn.execute("SELECT wait_event_type = 'Lock' AS waiting FROM pg_stat_activity WHERE pid = %s",
                       (pid,)).fetchone()
    conn.commit()
    return bool(row and row["waiting"])

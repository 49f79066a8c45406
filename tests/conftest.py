"""Fixtures: a database of its own for each test run, queue names of their own for each test, the simulator, and
a check around every test that no test secret shows where a person could read it.

The tests use the real local PostgreSQL and RabbitMQ; a missing service fails the run rather than skipping.
TEST_ADMIN_DATABASE_URL (default postgresql://root@127.0.0.1:5432/postgres) is where test databases are made.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pika
import psycopg
import pytest
from flask.testing import FlaskClient
from pika.adapters.blocking_connection import BlockingChannel
from psycopg import pq

ROOT = Path(__file__).resolve().parent.parent
DEVTOOLS = ROOT / "devtools"
sys.path[:0] = [str(ROOT), str(DEVTOOLS)]  # the project's modules, and the simulator beside the demo

import broker  # noqa: E402
import db  # noqa: E402
from esi_simulator import Simulator  # noqa: E402
from settings import Settings  # noqa: E402

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


def _with_password(url: str, password: str) -> str:
    """The URL with this password, unless it has one already."""
    scheme, _, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" in userinfo:
        return url
    return f"{scheme}://{userinfo}:{password}@{host}"


def _fixed_secrets() -> set[str]:
    """The secrets every test may hold: the app's client secret, the database password, the broker's user:password
    (the broker's password alone, "guest", is also its user name), the status rows' tokens, TOKEN_KEY's keys."""
    from tests.screenshot import ACCESS_TOKEN, REFRESH_TOKEN
    broker_userinfo = RABBITMQ_URL.partition("://")[2].rpartition("@")[0]
    return {CLIENT_SECRET, _password(ADMIN_URL) or DATABASE_PASSWORD, ACCESS_TOKEN, REFRESH_TOKEN, *TOKEN_KEYS,
            *([f"{broker_userinfo}@"] if ":" in broker_userinfo else [])} - {None}


FIXED_SECRETS = _fixed_secrets()
MIN_SECRET = 8
_watched: list[Iterable[str]] = []  # this test's other secrets (read at its end: a simulator issues tokens as it goes)


def watch_secrets(secrets: Iterable[str]) -> None:
    """Have the running test fail should any of these secrets show (a live collection is read at the test's end)."""
    _watched.append(secrets)


def url_secrets(url: str) -> set[str]:
    """What a webhook's URL holds that only its owner may see: everything after the host (a Discord token is the
    path's last part), each query value, and a password before the host."""
    parts = urlsplit(url)
    rest = parts.path + (f"?{parts.query}" if parts.query else "")
    return {rest, parts.path.rpartition("/")[2], *(value for _, value in parse_qsl(parts.query)),
            parts.password or ""}


@pytest.fixture(autouse=True)
def no_secret_leaks(caplog, monkeypatch):
    """Fail the test when a test secret (a webhook's URL among them) shows in a log record, in the output of a
    command the test read, in an answer of a status app or in a queue message published or read in this process."""
    # pika narrates every connection at INFO. set_level also sets the capturing handler's level: the root's last.
    caplog.set_level(logging.WARNING, logger="pika")
    caplog.set_level(logging.INFO)  # the level operators read
    _watched.clear()
    seen: list[str] = []

    def record(*parts) -> None:
        seen.extend(p.decode(errors="replace") if isinstance(p, bytes) else str(p) for p in parts if p)

    communicate, open_, publish, get = (subprocess.Popen.communicate, FlaskClient.open, BlockingChannel.basic_publish,
                                        BlockingChannel.basic_get)

    def recorded_communicate(self, *args, **kwargs):  # subprocess.run reads a command's output through it too
        output = communicate(self, *args, **kwargs)
        record(*output)
        return output

    def recorded_open(self, *args, **kwargs):
        response = open_(self, *args, **kwargs)
        record(response.headers, response.get_data())
        return response

    def recorded_publish(self, exchange, routing_key, body, properties=None, *args, **kwargs):
        record(body, properties and properties.headers)
        return publish(self, exchange, routing_key, body, properties, *args, **kwargs)

    def recorded_get(self, *args, **kwargs):
        method, properties, body = get(self, *args, **kwargs)
        record(body, properties and properties.headers)
        return method, properties, body

    monkeypatch.setattr(subprocess.Popen, "communicate", recorded_communicate)
    monkeypatch.setattr(FlaskClient, "open", recorded_open)
    monkeypatch.setattr(BlockingChannel, "basic_publish", recorded_publish)
    monkeypatch.setattr(BlockingChannel, "basic_get", recorded_get)
    for name in ("add_webhook", "keep_webhook"):  # every webhook a test makes, whichever way it is made
        monkeypatch.setattr(db, name, _watching_url(getattr(db, name)))
    yield
    formatter = logging.Formatter()
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    texts = {"a log record": "\n".join(formatter.format(r) for r in records), "": "\n".join(seen)}
    # A token of a few characters ("A" in a row of test data) is no secret that text could be told apart from.
    secrets = {s for s in FIXED_SECRETS.union(*(set(source) for source in _watched)) if s and len(s) >= MIN_SECRET}
    where = sorted({place or "command output, an answer or a message" for place, text in texts.items()
                    for secret in secrets if secret in text})
    if where:  # the secret itself is not repeated: this line is output too
        pytest.fail(f"a test secret leaked into {' and '.join(where)}", pytrace=False)


def _watching_url(add):
    def watched(conn, name, url, *args, **kwargs):
        watch_secrets(url_secrets(url))
        return add(conn, name, url, *args, **kwargs)
    return watched


def pytest_addoption(parser):
    parser.addoption("--soak-minutes", type=float, default=3.0,
                     help="how long tests/faults/test_fault_soak.py runs its faults (default 3)")


@pytest.fixture(scope="session")
def database_url():
    """A fresh database with the schema applied, dropped after the run."""
    name = f"killmails_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = _with_password(ADMIN_URL.rsplit("/", 1)[0] + "/" + name, DATABASE_PASSWORD)
    with db.connect(url) as conn:
        db.apply_schema(conn)
    yield url
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def conn(database_url):
    """A connection to an emptied test database."""
    with db.connect(database_url) as connection:
        tables = [r["tablename"] for r in connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        connection.execute("TRUNCATE " + ", ".join(f'"{t}"' for t in tables))
        connection.commit()
        yield connection


@pytest.fixture
def queue_name():
    """A queue name of this test's own; its queues are deleted afterwards."""
    name = f"test_killmails_{uuid.uuid4().hex[:10]}"
    yield name
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    for queue in [name, broker.dead_queue(name)] + [broker.retry_queue(name, n) for n in range(1, 51)]:
        channel.queue_delete(queue)
    connection.close()


@pytest.fixture
def sim():
    """A running ESI + SSO simulator with no pilots yet."""
    simulator = Simulator(seed=7, client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    watch_secrets(simulator.issued_tokens)
    simulator.base_url = simulator.start(port=0)
    yield simulator
    simulator.stop()


@pytest.fixture
def make_client(database_url, queue_name):
    """Build Flask test clients of status apps with these settings overrides (and clock); their pools and broker
    connections are closed after."""
    import status_app
    apps = []

    def make(*, clock=time.monotonic, **overrides):
        overrides = {"database_url": database_url, "queue_name": queue_name, **overrides}
        app = status_app.create_app(make_settings(**overrides), clock=clock)
        apps.append(app)
        return app.test_client()

    yield make
    for app in apps:
        app.extensions["status_sources"].close()


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

"""Fixtures: a database of its own for each test run, queue names of their own for each test, the simulator.

The tests use the real local PostgreSQL and RabbitMQ; a missing service fails the run rather than skipping.
TEST_ADMIN_DATABASE_URL (default postgresql://root@127.0.0.1:5432/postgres) is where test databases are made.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pika
import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEVTOOLS = ROOT / "devtools"
sys.path[:0] = [str(ROOT), str(DEVTOOLS)]  # the project's modules, and the simulator beside the demo

import broker  # noqa: E402
import db  # noqa: E402
from esi_simulator import Simulator  # noqa: E402
from settings import Settings  # noqa: E402

ADMIN_URL = os.environ.get("TEST_ADMIN_DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
CLIENT_ID, CLIENT_SECRET = "test-client", "test-secret"
USER_AGENT = "killmail-worker-tests/1.0 (tests@example.org)"


@pytest.fixture(scope="session")
def database_url():
    """A fresh database with the schema applied, dropped after the run."""
    name = f"killmails_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
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
    simulator.base_url = simulator.start(port=0)
    yield simulator
    simulator.stop()


@pytest.fixture
def make_client(database_url, queue_name):
    """Build Flask test clients of status apps with these settings overrides; their pools are closed after."""
    import status_app
    apps = []

    def make(**overrides):
        overrides = {"database_url": database_url, "queue_name": queue_name, **overrides}
        app = status_app.create_app(make_settings(**overrides))
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
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "RABBITMQ_", "ESI_", "EVE_"))}
    env.update({
        "DATABASE_URL": settings.database_url, "RABBITMQ_URL": settings.rabbitmq_url,
        "QUEUE_NAME": settings.queue_name, "PREFETCH_COUNT": str(settings.prefetch_count),
        "ESI_BASE_URL": settings.esi_base_url, "SSO_TOKEN_URL": settings.sso_token_url,
        "EVE_CLIENT_ID": settings.eve_client_id, "EVE_CLIENT_SECRET": settings.eve_client_secret,
        "ESI_USER_AGENT": settings.esi_user_agent, "SYNC_INTERVAL_SECONDS": str(settings.sync_interval_seconds),
        "RETRY_BASE_SECONDS": str(settings.retry_base_seconds), "MAX_ATTEMPTS": str(settings.max_attempts),
        "DETAIL_CONCURRENCY": str(settings.detail_concurrency), "PYTHONUNBUFFERED": "1",
    })
    return env


def insert_users(conn, pilots) -> None:
    """Write users as the web app does at login: only its five columns."""
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


def queue_counts(*queues: str) -> list[int]:
    """Ready messages per queue (0 for a queue that does not exist)."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
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

"""Fixtures: a database of its own for each test run, queue names of their own for each test, the simulator, and
a check around every test that no test secret shows where a person could read it. What tests share besides
fixtures is in helpers.py.

The tests use the real local PostgreSQL and RabbitMQ; a missing service fails the run rather than skipping.
TEST_ADMIN_DATABASE_URL (default postgresql://root@127.0.0.1:5432/postgres) is where test databases are made.
"""
from __future__ import annotations

import logging
import subprocess
import time
import uuid

import pika
import psycopg
import pytest
from flask.testing import FlaskClient
from pika.adapters.blocking_connection import BlockingChannel

import broker
import db
import helpers
from esi_simulator import Simulator
from helpers import (
    ADMIN_URL,
    CLIENT_ID,
    CLIENT_SECRET,
    DATABASE_PASSWORD,
    FIXED_SECRETS,
    MIN_SECRET,
    RABBITMQ_URL,
    make_settings,
    record_output,
    url_secrets,
    watch_secrets,
    with_password,
)


@pytest.fixture(autouse=True)
def no_secret_leaks(caplog, monkeypatch):
    """Fail the test when a test secret (a webhook's URL among them) shows in a log record, in the output of a
    command the test read, in an answer of a status app or in a queue message published or read in this process."""
    # pika narrates every connection at INFO. set_level also sets the capturing handler's level: the root's last.
    caplog.set_level(logging.WARNING, logger="pika")
    caplog.set_level(logging.INFO)  # the level operators read
    helpers._watched.clear()
    helpers._seen.clear()
    # Why patch third-party methods: the places a secret could show are spread over some hundred tests, and a
    # check each test had to call would be forgotten by the next one. So, for this test only (monkeypatch undoes
    # it), four methods that every such place passes through record what they carry, then do what they did:
    # - subprocess.Popen.communicate: a command's output (subprocess.run reads through it too); a test that reads
    #   a pipe line by line records each line with helpers.record_output;
    # - FlaskClient.open: every answer of a status app under test, headers and body;
    # - BlockingChannel.basic_publish and basic_get: each queue message and its headers, sent or taken.
    # The db module's add_webhook and keep_webhook are wrapped too: each webhook URL a test makes is watched.
    communicate, open_, publish, get = (subprocess.Popen.communicate, FlaskClient.open, BlockingChannel.basic_publish,
                                        BlockingChannel.basic_get)

    def recorded_communicate(self, *args, **kwargs):
        output = communicate(self, *args, **kwargs)
        record_output(*output)
        return output

    def recorded_open(self, *args, **kwargs):
        response = open_(self, *args, **kwargs)
        record_output(str(response.headers), response.get_data())
        return response

    def recorded_publish(self, exchange, routing_key, body, properties=None, *args, **kwargs):
        record_output(body, properties and str(properties.headers))
        return publish(self, exchange, routing_key, body, properties, *args, **kwargs)

    def recorded_get(self, *args, **kwargs):
        method, properties, body = get(self, *args, **kwargs)
        record_output(body, properties and str(properties.headers))
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
    texts = {"a log record": "\n".join(formatter.format(r) for r in records), "": "\n".join(helpers._seen)}
    # A token of a few characters ("A" in a row of test data) is no secret that text could be told apart from.
    secrets = {s for s in FIXED_SECRETS.union(*(set(source) for source in helpers._watched))
               if s and len(s) >= MIN_SECRET}
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
    url = with_password(ADMIN_URL.rsplit("/", 1)[0] + "/" + name, DATABASE_PASSWORD)
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
    from web import create_app
    apps = []

    def make(*, clock=time.monotonic, **overrides):
        overrides = {"database_url": database_url, "queue_name": queue_name, **overrides}
        app = create_app(make_settings(**overrides), clock=clock)
        apps.append(app)
        return app.test_client()

    yield make
    for app in apps:
        app.extensions["status_sources"].close()

"""Tests that leak a test secret on purpose, run by test_conftest.py: each must fail at its teardown."""
from __future__ import annotations

import logging
import subprocess
import sys

from flask import Flask

import db
from helpers import CLIENT_SECRET, insert_users, record_output

log = logging.getLogger(__name__)


def test_clean():
    log.info("nothing secret here")


def test_client_secret_in_an_info_line():
    log.info("credentials: %s", CLIENT_SECRET)


def test_database_password_in_a_url_printed_whole(database_url):
    log.warning("cannot reach %s", database_url)


def test_simulator_token_in_a_traceback(sim):
    sim.add_pilots(n_pilots=1, n_killmails=0, revoked=0, corporations=1)
    try:
        raise ValueError(f"Invalid header value b'Bearer {sim.pilots()[0]['access_token']}\\n'")
    except ValueError:
        log.exception("job crashed")


def test_inserted_token_in_a_command_output(conn):
    insert_users(conn, [{"character_id": 1, "character_name": "P", "access_token": "probe-access-token-1",
                         "refresh_token": "probe-refresh-token-1", "expires_at": None}])
    subprocess.run([sys.executable, "-c", "print('probe-refresh-token-1')"], capture_output=True, check=True)


def test_client_secret_in_an_answer():
    app = Flask(__name__)
    app.get("/")(lambda: CLIENT_SECRET)
    assert app.test_client().get("/").status_code == 200


def test_webhook_query_token_in_a_warning(conn):
    db.add_webhook(conn, "probe", "https://hooks.example/x?token=probe-webhook-token-1")
    log.warning("posting to hooks.example?token=probe-webhook-token-1 failed")


def test_webhook_token_in_a_line_read_from_a_pipe(conn):
    db.add_webhook(conn, "probe", "https://hooks.example/api/webhooks/1/probe-webhook-token-2")
    child = subprocess.Popen([sys.executable, "-c", "print('posting to .../probe-webhook-token-2')"],
                             stdout=subprocess.PIPE, text=True)
    with child:
        for line in child.stdout:  # as the fault tests read a worker's log while it runs
            record_output(line)

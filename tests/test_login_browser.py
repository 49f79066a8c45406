"""Adding a pilot as a person does: headless Chromium opens /login on gunicorn, follows it to the simulator's
authorize page, clicks a pilot there, and comes back to /callback; then a burst worker syncs the pilot.

The screenshots of the added-pilot page and of a refused login go to LOGIN_SCREENSHOTS_DIR when it is set (for
the docs and reviews), else to the test's temporary folder.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

import db
from helpers import CLIENT_ID, CLIENT_SECRET, USER_AGENT, make_settings, queue_counts, run_script
from screenshot import CHROMIUM, chromium, free_port, serve, status_env

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason=f"{CHROMIUM} is not installed (apt-get install -y chromium)")
# Long enough for the redirects and the authorize page's click; virtual time ends as soon as the page is idle.
BROWSE = ("--virtual-time-budget=15000",)


@pytest.fixture
def served(database_url, conn, queue_name, sim, tmp_path):
    """gunicorn serving the status app with login enabled against the simulator; pilots 1 and 2 are in allowed
    corporations, pilot 3 is not."""
    pilots = sim.add_pilots(n_pilots=3, n_killmails=60, share=2, expired_fraction=0, revoked=0, corporations=3)
    port = free_port()
    env = status_env(database_url, queue=queue_name, EVE_CALLBACK_URL=f"http://127.0.0.1:{port}/callback",
                     EVE_CLIENT_ID=CLIENT_ID, EVE_CLIENT_SECRET=CLIENT_SECRET, ESI_USER_AGENT=USER_AGENT,
                     ESI_BASE_URL=sim.base_url, SSO_TOKEN_URL=f"{sim.base_url}/v2/oauth/token",
                     SSO_AUTHORIZE_URL=f"{sim.base_url}/v2/oauth/authorize", SSO_JWKS_URL=f"{sim.base_url}/oauth/jwks",
                     SSO_REVOKE_URL=f"{sim.base_url}/v2/oauth/revoke", LOGIN_ALLOWED_CORPORATIONS="98000001,98000002",
                     FLASK_SECRET_KEY="browser-test-flask-secret-key-5e8a14c07d")
    with serve(env, port=port, log_path=tmp_path / "gunicorn.log") as base:
        yield base, pilots


@needs_chromium
def test_a_person_adds_a_pilot_in_the_browser_and_a_worker_syncs_it(served, conn, sim, database_url, queue_name,
                                                                     tmp_path):
    base, pilots = served
    sim.choose_in_browser(pilots[0])
    dom = chromium(*BROWSE, "--dump-dom", f"{base}/login").stdout
    assert "Pilot 1 was added" in dom and 'id="login-added"' in dom
    user = db.get_user(conn, pilots[0])
    conn.commit()
    assert user["scopes"] == "publicData esi-killmails.read_killmails.v1" and user["queued_at"] is not None
    assert user["access_token"] not in dom and user["refresh_token"] not in dom
    log = (tmp_path / "gunicorn.log").read_text()
    assert "GET /callback" in log and "code=" not in log and user["refresh_token"] not in log
    assert queue_counts(queue_name) == [1]

    worker = run_script("killmail_worker.py", make_settings(database_url, sim.base_url, queue_name=queue_name),
                        "--burst")
    assert worker.returncode == 0, worker.stdout + worker.stderr
    stored = {r["killmail_id"] for r in conn.execute("SELECT killmail_id FROM killmails")}
    synced = db.get_user(conn, pilots[0])
    conn.commit()
    assert stored == sim.killmail_ids_for(pilots[0]) and stored
    assert synced["last_sync_status"] == "ok" and queue_counts(queue_name) == [0]


@needs_chromium
def test_a_refused_and_a_declined_login_store_nothing(served, conn, sim):
    base, pilots = served
    sim.choose_in_browser(pilots[2])
    dom = chromium(*BROWSE, "--dump-dom", f"{base}/login").stdout
    assert 'id="login-refused"' in dom and "Pilot 3 flies for corporation 98000003" in dom
    sim.choose_in_browser(None)
    dom = chromium(*BROWSE, "--dump-dom", f"{base}/login").stdout
    assert 'id="login-refused"' in dom and "you declined" in dom
    assert conn.execute("SELECT count(*) AS n FROM users").fetchone()["n"] == 0


@needs_chromium
def test_screenshots_of_an_added_pilot_and_a_refused_login(served, sim, tmp_path):
    base, pilots = served
    folder = Path(os.environ.get("LOGIN_SCREENSHOTS_DIR") or tmp_path)
    for name, pilot in (("login_added.png", pilots[1]), ("login_refused.png", pilots[2])):
        sim.choose_in_browser(pilot)
        png = folder / name
        chromium(*BROWSE, f"--screenshot={png}", "--window-size=900,640", f"{base}/login")
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (900, 640)
        assert len(data) > 15_000  # a rendered page, not a blank one

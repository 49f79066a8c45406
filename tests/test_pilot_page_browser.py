"""A pilot's page as a person uses it: headless Chromium, driven step by step (tests/browser.py), logs in on
gunicorn through the simulator's SSO, lands on /me, presses Sync now, sees the page updated after a worker ran,
and logs out. The screenshot of /me goes to LOGIN_SCREENSHOTS_DIR when it is set (for the docs), else to the
test's temporary folder.
"""
from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import pytest

from browser import Browser
from helpers import CLIENT_ID, CLIENT_SECRET, USER_AGENT, make_settings, queue_counts, run_script
from screenshot import CHROMIUM, free_port, serve, status_env

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason=f"{CHROMIUM} is not installed (apt-get install -y chromium)")
SECRET_KEY = "browser-test-flask-secret-key-7c1f90e2"


@pytest.fixture
def served(database_url, conn, queue_name, sim, tmp_path):
    """gunicorn serving the status app with login and pilot pages against the simulator, whose lists are not
    cached (so that a sync right after another sees new killmails)."""
    pilots = sim.add_pilots(n_pilots=2, n_killmails=30, share=1, expired_fraction=0, revoked=0, corporations=1)
    sim.configure(cache_seconds=0)
    port = free_port()
    env = status_env(database_url, queue=queue_name, EVE_CALLBACK_URL=f"http://127.0.0.1:{port}/callback",
                     EVE_CLIENT_ID=CLIENT_ID, EVE_CLIENT_SECRET=CLIENT_SECRET, ESI_USER_AGENT=USER_AGENT,
                     ESI_BASE_URL=sim.base_url, SSO_TOKEN_URL=f"{sim.base_url}/v2/oauth/token",
                     SSO_AUTHORIZE_URL=f"{sim.base_url}/v2/oauth/authorize", SSO_JWKS_URL=f"{sim.base_url}/oauth/jwks",
                     SSO_REVOKE_URL=f"{sim.base_url}/v2/oauth/revoke", FLASK_SECRET_KEY=SECRET_KEY)
    with serve(env, port=port, log_path=tmp_path / "gunicorn.log") as base:
        yield base, pilots


def shown(page: str) -> list[int]:
    """The killmail ids the page lists, in order."""
    return [int(i) for i in re.findall(r'data-killmail="(\d+)"', page)]


def text_of(page: str, element_id: str) -> str:
    return re.search(rf'id="{element_id}"[^>]*>(.*?)</', page, re.S).group(1)


@needs_chromium
def test_a_pilot_logs_in_syncs_now_sees_its_page_updated_and_logs_out(served, sim, database_url, queue_name,
                                                                        tmp_path):
    base, pilots = served
    worker_settings = make_settings(database_url, sim.base_url, queue_name=queue_name)
    sim.choose_in_browser(pilots[0])
    with Browser(width=1280, height=1100) as browser:
        page = browser.open(f"{base}/login")  # SSO's page clicks the pilot; /callback sends the browser to /me
        assert browser.evaluate("location.href") == f"{base}/me"
        assert "Pilot 1 was added" in page and text_of(page, "pilot-name") == "Pilot 1"
        assert 'id="no-killmails"' in page and text_of(page, "next-sync") == "queued: a worker takes it up shortly"
        assert "killmail_session" not in browser.evaluate("document.cookie")  # HttpOnly: no script reads it

        worker = run_script("killmail_worker.py", worker_settings, "--burst")
        assert worker.returncode == 0, worker.stdout + worker.stderr
        first = sim.killmail_ids_for(pilots[0])
        assert sorted(shown(browser.open(f"{base}/me")), reverse=True) == sorted(first, reverse=True)

        new = sim.add_killmails(pilots[0], 2)
        page = browser.click("#sync-now")
        assert browser.evaluate("location.href") == f"{base}/me"
        assert "Queued Pilot 1 at high priority" in page and not set(new) & set(shown(page))
        assert text_of(page, "next-sync") == "queued: a worker takes it up shortly" and queue_counts(queue_name) == [1]

        worker = run_script("killmail_worker.py", worker_settings, "--burst")
        assert worker.returncode == 0, worker.stdout + worker.stderr
        page = browser.open(f"{base}/me")
        assert sorted(shown(page)[:2]) == sorted(new) and set(shown(page)) == first | set(new)
        assert text_of(page, "last-sync").strip().startswith("just now") and text_of(page, "last-error") == "none"
        assert "Queued" not in page  # said once

        folder = Path(os.environ.get("LOGIN_SCREENSHOTS_DIR") or tmp_path)
        png = browser.screenshot()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1280, 1100)
        (folder / "me.png").write_bytes(png)

        again = browser.click("#sync-now")
        assert "once a minute" in again and queue_counts(queue_name) == [0]

        page = browser.click("#logout")
        assert "You are logged out" in page and shown(page) == []
        page = browser.open(f"{base}/me")
        assert 'id="logged-out"' in page and shown(page) == [] and 'href="/login"' in page

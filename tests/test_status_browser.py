"""The status page as a person sees it: gunicorn serves it with gunicorn.conf.py, headless Chromium loads it."""
from __future__ import annotations

import json
import re
import struct
import urllib.request
from datetime import UTC, datetime

import pytest

from screenshot import (
    ACCESS_TOKEN,
    CHROMIUM,
    REFRESH_TOKEN,
    charts_in,
    chromium,
    fill_queues,
    seed_status_rows,
    serve,
    status_env,
    take_screenshot,
)

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
                                    reason=f"{CHROMIUM} is not installed (apt-get install -y chromium)")


@pytest.fixture
def server(database_url, conn, queue_name, tmp_path):
    """gunicorn serving the known rows and a queue with 3 jobs waiting, 1 retrying and 2 dead letters."""
    seed_status_rows(conn, datetime.now(UTC))
    fill_queues(queue_name, max_attempts=8, waiting=3, retrying=1, dead=2)
    with serve(status_env(database_url, queue=queue_name), log_path=tmp_path / "gunicorn.log") as base:
        yield base


def test_gunicorn_serves_health_and_metrics(server):
    with urllib.request.urlopen(f"{server}/health", timeout=5) as response:
        assert (response.status, response.headers["Cache-Control"]) == (200, "no-store")
        assert json.load(response) == {"status": "ok", "database": "ok", "broker": "ok"}
    with urllib.request.urlopen(f"{server}/metrics", timeout=5) as response:
        assert 'killmail_users{state="active"} 2.0' in response.read().decode()


@needs_chromium
def test_the_page_shows_the_numbers_from_the_database(server):
    dom = chromium("--dump-dom", f"{server}/status").stdout
    shown = dict(re.findall(r'id="([a-z_-]+)">([^<]*)<', dom))
    assert {key: shown[key].replace("\u2009", " ") for key in (
        "total-users", "runs-window", "success-rate", "error-rate", "killmails-total", "killmails-hour",
        "failed-refs", "queue-depth", "queue-consumers", "queue-retrying", "queue-dead", "users-active", "users-due",
        "users-queued", "users-never_synced", "users-needs_relogin", "worker-state")} == {
        "total-users": "6", "runs-window": "5", "success-rate": "60.0 %", "error-rate": "20.0 %",
        "killmails-total": "5", "killmails-hour": "3", "failed-refs": "2", "queue-depth": "3", "queue-consumers": "0",
        "queue-retrying": "1", "queue-dead": "2", "users-active": "2", "users-due": "1", "users-queued": "1",
        "users-never_synced": "1", "users-needs_relogin": "1", "worker-state": "Running"}
    for text in ("Aria Vex", "2 min ago", "ServerError: ESI answered 502 Bad Gateway", "130000002", "3,412"):
        assert text in dom
    assert ACCESS_TOKEN not in dom and REFRESH_TOKEN not in dom


@needs_chromium
def test_the_page_draws_its_charts_without_script_or_external_asset(server):
    dom = chromium("--dump-dom", f"{server}/status").stdout
    charts = charts_in(dom)
    assert sorted(charts) == ["chart-durations", "chart-killmails", "chart-runs"]
    assert [len(hours) for hours in charts.values()] == [24, 24, 24]
    # The known rows' killmails of the last day were stored 10 min (2), 50 min and 5 h ago; of their runs, four
    # finished in the last 20 minutes (the needs_relogin one, 23 h ago, is at the window's edge).
    assert sum(bars["killmails"] for bars in charts["chart-killmails"].values()) == 4
    assert [sum(bars[s] for bars in charts["chart-runs"].values()) for s in ("ok", "partial", "error")] == [2, 1, 1]
    assert max(bars["p95"] for bars in charts["chart-durations"].values()) > 0
    assert dom.count("<svg") == 3 and dom.count("</svg>") == 3
    assert "<script" not in dom
    assert all("http" not in svg for svg in re.findall(r"<svg.*?</svg>", dom, re.S))
    assert not re.findall(r'(?:src|href|xlink:href)="(?:[a-z]+:)?//', dom) and "url(" not in dom


@needs_chromium
def test_the_page_renders_to_a_screenshot(server, tmp_path):
    png = tmp_path / "status.png"
    take_screenshot(f"{server}/status", png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1280, 1400)  # IHDR width and height
    assert len(data) > 30_000  # a rendered page, not a blank one

"""Screenshot of /status for the docs: `python -m devtools.screenshot docs/status.png` (`make screenshot`).

It makes a throwaway database and queue, fills them with the known rows below, serves the status app with
gunicorn on a free port and photographs /status with headless Chromium; then removes all it made. The rows,
the gunicorn runner and the Chromium helpers are shared with the tests of the status app and the browser tests
(which put devtools/ on sys.path, as for the simulator) and with bench/health_bench.py and bench/status_page.py.

The known rows, relative to now: six users (2 active, 1 due, 1 queued, 1 never synced, 1 needing a new login),
six runs (five in the last 24 hours: 2 ok, 1 partial, 1 error, 1 needs_relogin; the latest 2 min ago and
3.2 s long), five stored killmails (3 in the last hour, 4 in the last day), two failed references, four ESI
limit buckets (two per-character ones, one paused) and six ESI call counters. The screenshot adds a day of
history before them (seed_history), so that its charts have something to show.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import broker
import db

ROOT = Path(__file__).resolve().parent.parent

CHROMIUM = Path("/usr/bin/chromium")
DOCS_HEIGHT = 2060  # the docs' screenshot: the whole page, with its 20 latest runs
GUNICORN = Path(sys.executable).with_name("gunicorn")  # the one installed beside this Python (.venv/bin)
ADMIN_URL = os.environ.get("TEST_ADMIN_DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
# Distinctive tokens: no response of the status app may ever contain them.
ACCESS_TOKEN = "ACCESS-7f3a1c-never-show-me"
REFRESH_TOKEN = "REFRESH-91bc4e-never-show-me"

PILOTS = {1001: "Aria Vex", 1002: "Borin Tal", 1003: "Cyra Lune", 1004: "Dax Morrow", 1005: "Eon Hale",
          1006: "Fenn Ardent"}
EXPECTED_USERS = {"active": 2, "due": 1, "queued": 1, "never_synced": 1, "needs_relogin": 1}


def seed_status_rows(conn: db.Connection, now: datetime) -> None:
    """Insert the known rows (described in the module docstring) and commit."""
    ago = lambda **kw: now - timedelta(**kw)  # noqa: E731
    users: dict[int, dict[str, Any]] = {  # the worker's columns of each pilot
        1001: {"last_sync_at": ago(minutes=2), "last_new_killmail_at": ago(minutes=2)},
        1002: {"last_sync_at": ago(hours=3), "last_new_killmail_at": ago(days=1)},
        1003: {"last_sync_at": ago(days=1), "revoked_token_sha256": db.token_sha256(f"{REFRESH_TOKEN}-1003"),
               "token_error": "invalid_grant"},
        1004: {},
        1005: {"last_sync_at": ago(minutes=10), "queued_at": ago(minutes=1)},
        1006: {"last_sync_at": ago(minutes=4), "last_new_killmail_at": ago(hours=2)},
    }
    for character_id, columns in users.items():
        values = {"character_id": character_id, "character_name": PILOTS[character_id],
                  "access_token": f"{ACCESS_TOKEN}-{character_id}", "refresh_token": f"{REFRESH_TOKEN}-{character_id}",
                  "expires_at": now + timedelta(minutes=20), **columns}
        conn.execute(f"INSERT INTO users ({', '.join(values)}) VALUES ({', '.join(['%s'] * len(values))})",
                     list(values.values()))
    runs = [  # character, finished, seconds, status, listed, new, saved, skipped, failed, calls, attempt, error
        (1001, ago(days=2), 4.0, "ok", 30, 30, 30, 0, 0, 33, 1, None),
        (1003, ago(hours=23), 0.4, "needs_relogin", 0, 0, 0, 0, 0, 1, 1, "invalid_grant: refresh token revoked"),
        (1002, ago(minutes=20), 1.1, "error", 0, 0, 0, 0, 0, 2, 2, "ServerError: ESI answered 502 Bad Gateway"),
        (1005, ago(minutes=10), 2.0, "ok", 8, 1, 1, 0, 0, 3, 1, None),
        (1006, ago(minutes=4), 6.5, "partial", 40, 5, 4, 0, 1, 8, 1, None),
        (1001, ago(minutes=2), 3.2, "ok", 12, 3, 2, 1, 0, 5, 1, None),
    ]
    for run in runs:
        add_run(conn, run)
    for n, stored in enumerate([ago(minutes=10), ago(minutes=10), ago(minutes=50), ago(hours=5), ago(days=3)]):
        killmail_id = 120_000_001 + n
        add_killmail(conn, killmail_id, stored)
        conn.execute("INSERT INTO killmail_refs (killmail_id, killmail_hash, attempts) VALUES (%s, %s, %s)",
                     (killmail_id, f"hash{killmail_id}", 1 if n == 0 else 0))  # the first failed once, then was stored
    for killmail_id, attempts, error, next_attempt in (
            (130_000_001, 3, "ServerError: ESI answered 502 Bad Gateway", now + timedelta(minutes=8)),
            (130_000_002, 8, "InvalidHash: 422 Invalid killmail_id and/or killmail_hash", now + timedelta(hours=6)),
            (130_000_003, 0, None, None)):  # pending, never tried: not a failure
        conn.execute("INSERT INTO killmail_refs (killmail_id, killmail_hash, attempts, last_error, next_attempt_at, "
                     "first_seen_at) VALUES (%s, %s, %s, %s, %s, %s)",
                     (killmail_id, f"hash{killmail_id}", attempts, error, next_attempt, ago(hours=attempts)))
    for bucket, limit, window, remaining, paused in (
            ("error-limit", 100, 60, 97, None), ("killmail", 3600, 900, 3412, None),
            ("char-killmail:1001", 20, 900, 18, None), ("char-killmail:1006", 20, 900, 2, now + timedelta(minutes=4))):
        db.record_limit(conn, bucket, limit_tokens=limit, window_seconds=window, remaining=remaining,
                        paused_until=paused, status=200)
    db.add_esi_calls(conn, {("char-killmail", 200): 52, ("char-killmail", 304): 140, ("killmail", 200): 388,
                            ("killmail", 422): 1, ("killmail", 502): 3, ("character", 200): 6})
    conn.commit()


def add_run(conn: db.Connection, run: tuple) -> None:
    """Record one run given as (character, finished, seconds, status, listed, new, saved, skipped, failed, ESI
    calls, attempt, error)."""
    character_id, finished, seconds, status, listed, new, saved, skipped, failed, calls, attempt, error = run
    db.record_run(conn, {
        "character_id": character_id, "corporation_id": None, "kind": "character",
        "started_at": finished - timedelta(seconds=seconds), "finished_at": finished, "status": status,
        "listed": listed, "new": new, "saved": saved, "skipped": skipped, "failed": failed, "esi_calls": calls,
        "attempt": attempt, "worker": "worker-1", "error": error})


def add_killmail(conn: db.Connection, killmail_id: int, stored: datetime) -> None:
    """Store one small killmail at this time."""
    conn.execute(
        "INSERT INTO killmails (killmail_id, killmail_hash, killmail_time, solar_system_id, victim_ship_type_id, "
        "victim_damage_taken, raw, stored_at) VALUES (%s, %s, %s, 30000142, 587, 1500, %s, %s)",
        (killmail_id, f"hash{killmail_id}", stored - timedelta(minutes=30), json.dumps({"killmail_id": killmail_id}),
         stored))


def seed_history(conn: db.Connection, now: datetime) -> None:
    """A day of runs and stored killmails from 2 to 24 hours ago, the same every time, so that the screenshot's
    charts have a day to show (the tests count the known rows alone), and commit."""
    rng = random.Random(17)
    for hours_ago in range(2, 24):
        busy = 1 + (hours_ago % 12 in (3, 4, 5, 6))  # an afternoon with more pilots online
        for _ in range(rng.randint(4, 8) * busy):
            status = rng.choices(["ok", "partial", "error", "needs_relogin"], [86, 8, 5, 1])[0]
            finished = now - timedelta(hours=hours_ago, minutes=rng.uniform(0, 59))
            add_run(conn, (rng.choice(list(PILOTS)), finished, rng.lognormvariate(0.9, 0.5) * busy, status,
                           10, 2, 2, 0, 0, 4, 1, None))
        for n in range(rng.randint(0, 6) * busy):
            add_killmail(conn, 140_000_000 + hours_ago * 100 + n, now - timedelta(hours=hours_ago, minutes=n * 5))
    conn.commit()


def charts_in(page: str) -> dict[str, dict[str, dict[str, float]]]:
    """The numbers a page's charts draw: by chart id, hour ('2026-11-01T12:00Z') and series, each bar's
    data-value."""
    return {chart_id: {hour: {series: float(value) for series, value in
                              re.findall(r'data-series="([^"]+)" data-value="([^"]+)"', bars)}
                       for hour, bars in re.findall(r'<g data-hour="([^"]+)">(.*?)</g>', body, re.S)}
            for chart_id, body in re.findall(r'<svg id="(chart-[a-z]+)"(.*?)</svg>', page, re.S)}


def fill_queues(queue: str, *, max_attempts: int, waiting: int, retrying: int, dead: int) -> None:
    """Declare a queue's topology and leave this many messages in the queue, its first retry queue and its DLQ."""
    connection = broker.connect(RABBITMQ_URL)
    channel = connection.channel()
    broker.declare_topology(channel, queue, max_attempts=max_attempts)
    for target, count in ((queue, waiting), (broker.retry_queue(queue, 1), retrying), (broker.dead_queue(queue), dead)):
        for n in range(count):
            body = broker.encode_job(broker.new_job(1001 + n, PILOTS.get(1001 + n)))
            channel.basic_publish("", target, body)
    connection.close()


def delete_queues(queue: str, *, max_attempts: int) -> None:
    """Delete a queue, its retry queues and its dead-letter queue."""
    connection = broker.connect(RABBITMQ_URL)
    channel = connection.channel()
    for name in [queue, broker.dead_queue(queue)] + [broker.retry_queue(queue, n) for n in range(1, max_attempts)]:
        channel.queue_delete(name)
    connection.close()


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status_env(database_url: str, *, queue: str, rabbitmq_url: str = RABBITMQ_URL, **extra: str) -> dict[str, str]:
    """The environment of a status app process: this process's, minus settings, plus these."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_", "RABBITMQ_", "QUEUE_", "STATUS_", "ESI_", "EVE_", "PORT"))}
    env.update(DATABASE_URL=database_url, RABBITMQ_URL=rabbitmq_url, QUEUE_NAME=queue, PYTHONUNBUFFERED="1", **extra)
    return env


@contextmanager
def serve(env: dict[str, str], *, deadline: float = 20.0, log_path: Path | None = None,
          port: int | None = None, host: str = "127.0.0.1") -> Iterator[str]:
    """Run gunicorn with gunicorn.conf.py on this port (or a free one) of this address; yield its loopback base URL
    once /health answers."""
    port = port or free_port()
    log = open(log_path or os.devnull, "wb")
    process = subprocess.Popen(
        [str(GUNICORN), "-c", "gunicorn.conf.py", "status_app:app"],
        cwd=ROOT, env={**env, "STATUS_BIND": f"{host}:{port}"}, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{base}/health", process, deadline=deadline)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wait_until_answering(url: str, process: subprocess.Popen, *, deadline: float) -> None:
    """Poll a URL until it gives any HTTP answer; fail when the process exits or the deadline passes."""
    give_up = time.monotonic() + deadline
    while time.monotonic() < give_up:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {process.returncode} before answering")
        try:
            urllib.request.urlopen(url, timeout=3).close()
            return
        except urllib.error.HTTPError:
            return  # a 503 is an answer: the server is up
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {deadline} s")


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run headless Chromium with a throwaway profile and no background traffic."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run(
            [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=timeout, check=True)


def take_screenshot(url: str, png: Path, *, height: int = 1400) -> None:
    """Save a screenshot of a page, 1280 pixels wide and this high."""
    png.parent.mkdir(parents=True, exist_ok=True)
    chromium(f"--screenshot={png}", f"--window-size=1280,{height}", url)


@contextmanager
def throwaway_database() -> Iterator[str]:
    """A new database with the schema applied; dropped afterwards."""
    import psycopg

    name = f"killmails_screenshot_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        with db.connect(url) as conn:
            db.apply_schema(conn)
            conn.commit()
        yield url
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("png", type=Path, help="where to save the screenshot")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: apt-get install -y chromium", file=sys.stderr)
        return 2
    queue = f"screenshot_{uuid.uuid4().hex[:10]}"
    with throwaway_database() as url:
        with db.connect(url) as conn:
            seed_history(conn, datetime.now(UTC))  # first: the known rows stay the latest runs
            seed_status_rows(conn, datetime.now(UTC))
        fill_queues(queue, max_attempts=8, waiting=3, retrying=1, dead=1)
        try:
            with serve(status_env(url, queue=queue)) as base:
                take_screenshot(f"{base}/status", args.png.resolve(), height=DOCS_HEIGHT)
        finally:
            delete_queues(queue, max_attempts=8)
    print(f"saved {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: the whole pipeline end to end on a local ESI simulator, real PostgreSQL and real RabbitMQ.

Creates a demo database, starts the simulator with a few dozen pilots (some with expired access tokens, one
revoked), writes them to `users` as the web app would, runs the producer and two burst workers, and prints a
summary. Exits 0 when every killmail of every pilot with a valid grant is stored exactly once.

`make demo-serve` (`--serve`): the same pieces kept running until Ctrl-C: the simulator, two workers, the producer
every minute and the status app with /login, so that a person can add a simulated pilot in the browser (the
simulator's authorize page lists every pilot) and watch /status as it is synced.
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pika
import psycopg

# Run from the project's folder as `python -m devtools.demo` (make demo): the project's modules are importable.
import db
from devtools.esi_simulator import Simulator
from settings import redact_url

ROOT = Path(__file__).resolve().parent.parent

ADMIN_URL = os.environ.get("DEMO_ADMIN_DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres")
DEMO_DB = os.environ.get("DEMO_DATABASE_NAME", "killmails_demo")
RABBITMQ_URL = os.environ.get("DEMO_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
QUEUE = "killmail_demo_queue"
SERVE_DB = f"{DEMO_DB}_serve"  # apart from `make demo`'s
SERVE_QUEUE = os.environ.get("DEMO_SERVE_QUEUE_NAME", "killmail_demo_serve_queue")
PRODUCER_EVERY_SECONDS = 60
GUNICORN = Path(sys.executable).with_name("gunicorn")
CLIENT_ID, CLIENT_SECRET = "demo-client", "demo-secret"
START_HINT = ("start them with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start; "
              "rabbitmq-server -detached   (or: make services)")


def check_services() -> str | None:
    """One line saying which service is unreachable, or None when both answer."""
    try:
        psycopg.connect(ADMIN_URL, connect_timeout=5).close()
    except psycopg.OperationalError:
        return f"❌ PostgreSQL is not reachable at {redact_url(ADMIN_URL)}; {START_HINT}"
    try:
        parameters = pika.URLParameters(RABBITMQ_URL)
        parameters.socket_timeout = parameters.blocked_connection_timeout = 5
        pika.BlockingConnection(parameters).close()
    except pika.exceptions.AMQPError:
        return f"❌ RabbitMQ is not reachable at {redact_url(RABBITMQ_URL)}; {START_HINT}"
    return None


def fresh_database(name: str = DEMO_DB) -> str:
    """Drop and create the demo database, apply the schema, return its URL."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    with db.connect(url) as conn:
        db.apply_schema(conn)
    return url


def purge_queues(queue: str = QUEUE) -> None:
    """Start from empty demo queues."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    for name in [queue, f"{queue}.dead"] + [f"{queue}.retry.{n}" for n in range(1, 51)]:
        channel.queue_delete(name)
    connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The whole pipeline on a local ESI simulator.")
    parser.add_argument("--serve", action="store_true",
                        help="keep it running until Ctrl-C, with the status app's /login to add pilots in a browser")
    parser.add_argument("--port", type=int, default=8000, help="with --serve: the status app's port (default 8000)")
    args = parser.parse_args(argv)
    problem = check_services()
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return serve(args.port) if args.serve else run_once()


def run_once() -> int:
    """`make demo`: sync every pilot once with two burst workers and print the summary."""
    url = fresh_database()
    purge_queues()
    # The detail bucket is scaled up from ESI's 3600 tokens / 15 min so the demo ends in seconds; the workers
    # read the limit from the headers and pace themselves to it exactly as they would against ESI.
    sim = Simulator(seed=2026, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, detail_bucket=(200_000, 900))
    sim.add_pilots(n_pilots=36, n_killmails=1200, share=3, expired_fraction=0.3, revoked=1, corporations=4)
    base_url = sim.start(port=0)
    pilots = sim.pilots()
    with db.connect(url) as conn:
        for p in pilots:
            conn.execute("INSERT INTO users (character_id, character_name, access_token, refresh_token, expires_at)"
                         " VALUES (%s, %s, %s, %s, %s)",
                         (p["character_id"], p["character_name"], p["access_token"], p["refresh_token"],
                          p["expires_at"]))
    env = dict(os.environ, DATABASE_URL=url, RABBITMQ_URL=RABBITMQ_URL, QUEUE_NAME=QUEUE, PREFETCH_COUNT="5",
               ESI_BASE_URL=base_url, SSO_TOKEN_URL=f"{base_url}/v2/oauth/token", EVE_CLIENT_ID=CLIENT_ID,
               EVE_CLIENT_SECRET=CLIENT_SECRET, ESI_USER_AGENT="killmail-worker-demo/1.0 (demo@example.org)",
               PYTHONUNBUFFERED="1")
    print(f"🛰️  ESI simulator at {base_url}: {len(pilots)} pilots, "
          f"{sum(1 for p in pilots if p['expires_at'] <= datetime.now(UTC))} with expired access tokens, "
          f"{sum(1 for p in pilots if p['revoked'])} revoked")
    started = time.monotonic()
    producer = subprocess.run([sys.executable, "queue_killmails.py"], cwd=ROOT, env=env)
    if producer.returncode != 0:
        print("❌ the producer failed", file=sys.stderr)
        return 1
    workers = [subprocess.Popen([sys.executable, "killmail_worker.py", "--burst"], cwd=ROOT, env=env)
               for _ in range(2)]
    codes = [w.wait(timeout=600) for w in workers]
    elapsed = time.monotonic() - started
    stats = sim.stats()
    sim.stop()
    return summarize(url, sim, pilots, stats, codes, elapsed)


def serve(port: int) -> int:
    """`make demo-serve`: the simulator, two workers, the producer every minute and the status app, until Ctrl-C."""
    url = fresh_database(SERVE_DB)
    purge_queues(SERVE_QUEUE)
    sim = Simulator(seed=2026, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, detail_bucket=(200_000, 900))
    sim.add_pilots(n_pilots=12, n_killmails=400, share=2, expired_fraction=0.3, revoked=0, corporations=3)
    base_url = sim.start(port=0)
    pilots = sim.pilots()
    with db.connect(url) as conn:  # half the pilots are users already; the others wait to be added at /login
        for p in pilots[:len(pilots) // 2]:
            conn.execute("INSERT INTO users (character_id, character_name, access_token, refresh_token, expires_at)"
                         " VALUES (%s, %s, %s, %s, %s)",
                         (p["character_id"], p["character_name"], p["access_token"], p["refresh_token"],
                          p["expires_at"]))
    status = f"http://127.0.0.1:{port}"
    env = dict(os.environ, DATABASE_URL=url, RABBITMQ_URL=RABBITMQ_URL, QUEUE_NAME=SERVE_QUEUE, PREFETCH_COUNT="3",
               ESI_BASE_URL=base_url, SSO_TOKEN_URL=f"{base_url}/v2/oauth/token", EVE_CLIENT_ID=CLIENT_ID,
               EVE_CLIENT_SECRET=CLIENT_SECRET, ESI_USER_AGENT="killmail-worker-demo/1.0 (demo@example.org)",
               EVE_CALLBACK_URL=f"{status}/callback", FLASK_SECRET_KEY=secrets.token_urlsafe(32),
               SSO_AUTHORIZE_URL=f"{base_url}/v2/oauth/authorize",
               SSO_JWKS_URL=f"{base_url}/oauth/jwks", SSO_REVOKE_URL=f"{base_url}/v2/oauth/revoke",
               SYNC_INTERVAL_SECONDS="60", STATUS_BIND=f"127.0.0.1:{port}", PYTHONUNBUFFERED="1")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    # Each child in a session of its own: Ctrl-C reaches only this process, which stops them with one SIGTERM
    # (a worker takes a second signal to mean "now").
    started = [subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True) for command in (
        [str(GUNICORN), "-c", "gunicorn.conf.py", "status_app:app"],
        [sys.executable, "killmail_worker.py"], [sys.executable, "killmail_worker.py"])]
    print(f"🛰️  ESI simulator at {base_url}: {len(pilots)} pilots, {len(pilots) // 2} of them users already")
    print(f"📊 Status page:  {status}/status")
    print(f"➕ Add a pilot:  {status}/login   (click a pilot on the simulator's SSO page: you land on its /me)")
    print(f"⏹️  Ctrl-C stops everything (the producer runs every {PRODUCER_EVERY_SECONDS} s meanwhile)", flush=True)
    try:
        while not stop.is_set():
            subprocess.run([sys.executable, "queue_killmails.py"], cwd=ROOT, env=env, start_new_session=True)
            stop.wait(PRODUCER_EVERY_SECONDS)
    finally:
        for process in started:
            process.send_signal(signal.SIGTERM)
        codes = [_wait(process) for process in started]
        sim.stop()
    print(f"👋 Stopped (exit codes {codes})")
    return 0


def _wait(process: subprocess.Popen) -> int:
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def summarize(url: str, sim: Simulator, pilots: list[dict], stats: dict, codes: list[int], elapsed: float) -> int:
    """Print the demo's summary and return its exit code."""
    expected = set(sim.expected_killmails(valid_only=True))
    with db.connect(url) as conn:
        stored = {r["killmail_id"] for r in conn.execute("SELECT killmail_id FROM killmails")}
        runs = conn.execute("SELECT status, count(*) AS n FROM sync_runs GROUP BY status").fetchall()
        relogin = db.one_row(conn.execute("SELECT count(*) AS n FROM users WHERE revoked_token_sha256 IS NOT NULL"))
        attackers = db.one_row(conn.execute("SELECT count(*) AS n FROM attackers"))["n"]
        items = db.one_row(conn.execute("SELECT count(*) AS n FROM killmail_items"))["n"]
    by_status = {r["status"]: r["n"] for r in runs}
    synced = by_status.get("ok", 0) + by_status.get("partial", 0)
    missing = expected - stored
    print("━" * 60)
    print(f"📊 Users synced: {synced} of {len(pilots)} (needing a new login: {relogin['n']}); "
          f"runs by status: {by_status}")
    print(f"📊 Killmails saved: {len(stored)} of {len(expected)} expected, {attackers} attackers, {items} items; "
          f"missing: {len(missing)}")
    print(f"📊 ESI calls made: {stats['requests']} ({stats['by_route']}), duplicate detail fetches: "
          f"{stats['duplicate_detail_fetches']}, early list fetches: {stats['early_list_fetches']}, "
          f"420: {stats['status_420']}, 429: {stats['status_429']}")
    print(f"📊 Time: {elapsed:.1f} s; workers exited with {codes}")
    ok = not missing and all(c == 0 for c in codes) and stats["duplicate_detail_fetches"] == 0
    print("✅ Demo complete" if ok else "❌ Demo found problems (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

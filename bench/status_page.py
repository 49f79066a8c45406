"""The status app at scale: /health, /status (HTML and JSON) and /metrics over 100 000 pilots, 1 000 000 stored
killmails and 200 000 runs, each endpoint timed by sequential requests to gunicorn, and each status query of db.py
timed alone on the same database.

The world is written by a few INSERT ... SELECT FROM generate_series statements (about a minute), then vacuumed
and analyzed as autovacuum would leave a steady database:
- users: 100 000 pilots, last synced over the last 10 minutes; 1 in 50 never synced, 1 in 20 queued, 1 in 100
  with a revoked grant; one per-character list bucket each in esi_limits, the most a database keeps (the limiter
  writes a pilot's when it pauses it, and keeps it), 1 in 5 000 paused for the next hour.
- killmails: 1 000 000, one every 30 s back from now (the last 24 hours hold 2 880), a raw body of about 600
  bytes (real ones are larger, toasted out of line: the heap a count walks is the same), a third of them losses
  of one of the pilots; each with its reference. 30 000 more references are not stored: 70 % never tried, 20 %
  failed one to three times, 10 % given up (MAX_ATTEMPTS).
- sync_runs: 200 000 runs, all finished within the last 24 hours (the metrics' window): 90 % ok, 3 % partial,
  3 % error, 2 % locked, 2 % needs_relogin.
- an outbox of 50 000 delivered, 100 pending and 10 failed notifications; esi_calls by group and status.

    .venv/bin/python bench/run.py --only status
    .venv/bin/python bench/status_page.py [--requests 30] [--keep]   (the same, alone; --keep leaves the database)
"""
from __future__ import annotations

import argparse
import http.client
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import harness  # first: puts the project root and devtools/ on sys.path

# isort: split
import db
from enqueue import CLAIM_STALE_SECONDS
from results import Figure
from screenshot import serve, status_env
from settings import Settings
from web import report, sources

USERS, KILLMAILS, RUNS, UNSTORED_REFS = 100_000, 1_000_000, 200_000, 30_000
REQUESTS = 30          # sequential requests to each endpoint, after WARM_UP
WARM_UP = 3
PAGE_TARGET_MS, HEALTH_TARGET_MS = 300.0, 50.0
ENDPOINTS = (("/health", HEALTH_TARGET_MS), ("/status", PAGE_TARGET_MS), ("/status?format=json", PAGE_TARGET_MS),
             ("/metrics", PAGE_TARGET_MS))
SCENARIO = "status page, 100k pilots, 1M killmails, 200k runs"

WORLD_SQL = [
    f"""
    INSERT INTO users (character_id, character_name, access_token, refresh_token, expires_at, corporation_id,
                       last_sync_at, last_sync_status, queued_at, list_etag, list_expires_at, revoked_token_sha256,
                       last_new_killmail_at, created_at)
    SELECT 90000000 + g, 'Pilot ' || g, 'access', 'refresh-' || g, now() + interval '20 minutes', 98000000 + g % 500,
           CASE WHEN g % 50 = 0 THEN NULL ELSE now() - (g % 600) * interval '1 second' END, 'ok',
           CASE WHEN g % 20 = 0 THEN now() - interval '30 seconds' END, 'etag-' || g,
           now() + interval '5 minutes',
           CASE WHEN g % 100 = 1 THEN encode(sha256(convert_to('refresh-' || g, 'UTF8')), 'hex') END,
           now() - (g % 20) * interval '1 day', now() - interval '60 days'
    FROM generate_series(1, {USERS}) g
    """,
    f"""
    INSERT INTO killmails (killmail_id, killmail_hash, killmail_time, solar_system_id, victim_character_id,
                           victim_corporation_id, victim_ship_type_id, victim_damage_taken, position_x, position_y,
                           position_z, raw, stored_at, destroyed_value, dropped_value, total_value)
    SELECT 100000000 + g, md5(g::text), t, 30000000 + g % 5000, v, 98000000 + g % 700, 587 + g % 40, 1000 + g % 9000,
           g * 1.5, g * 2.5, g * 3.5,
           jsonb_build_object('killmail_id', 100000000 + g, 'killmail_time', t, 'solar_system_id', 30000000 + g % 5000,
                              'victim', jsonb_build_object('character_id', v, 'ship_type_id', 587 + g % 40,
                                                           'damage_taken', 1000 + g % 9000, 'items', jsonb_build_array(
                                  jsonb_build_object('flag', 5, 'item_type_id', 2000 + g % 300, 'singleton', 0,
                                                     'quantity_destroyed', g % 7 + 1),
                                  jsonb_build_object('flag', 27, 'item_type_id', 3000 + g % 200, 'singleton', 0,
                                                     'quantity_dropped', g % 3 + 1))),
                              'attackers', jsonb_build_array(
                                  jsonb_build_object('character_id', 95000000 + g % 77777, 'damage_done', 700,
                                                     'final_blow', true, 'security_status', -1.5,
                                                     'ship_type_id', 11000 + g % 50),
                                  jsonb_build_object('character_id', 95100000 + g % 55555, 'damage_done', 300,
                                                     'final_blow', false, 'security_status', 2.1,
                                                     'ship_type_id', 12000 + g % 50))),
           least(now(), t + interval '3 minutes'), 1e6 * (g % 997), 1e5 * (g % 101), 1.1e6 * (g % 997)
    FROM generate_series(1, {KILLMAILS}) g,
         LATERAL (SELECT now() - ({KILLMAILS} - g) * interval '30 seconds' AS t,
                         CASE WHEN g % 3 = 0 THEN 90000000 + g % {USERS} ELSE 96000000 + g END AS v) x
    """,
    f"""
    INSERT INTO killmail_refs (killmail_id, killmail_hash, first_seen_at, attempts, last_error, next_attempt_at)
    SELECT 100000000 + g, md5(g::text), now() - ({KILLMAILS} - g) * interval '30 seconds',
           CASE WHEN g % 200 = 0 THEN 1 ELSE 0 END, CASE WHEN g % 200 = 0 THEN 'ServerError: 502' END,
           CASE WHEN g % 200 = 0 THEN now() - interval '1 day' END
    FROM generate_series(1, {KILLMAILS}) g
    """,
    f"""
    INSERT INTO killmail_refs (killmail_id, killmail_hash, first_seen_at, attempts, last_error, next_attempt_at)
    SELECT 200000000 + g, md5(g::text), now() - g * interval '1 second', a,
           CASE WHEN a > 0 THEN 'ServerError: 503' END,
           CASE WHEN a > 0 THEN now() + (g % 360) * interval '1 minute' END
    FROM generate_series(1, {UNSTORED_REFS}) g,
         LATERAL (SELECT CASE WHEN g % 10 < 7 THEN 0 WHEN g % 10 < 9 THEN 1 + g % 3 ELSE {harness.MAX_ATTEMPTS} END
                  AS a) x
    """,
    f"""
    INSERT INTO sync_runs (character_id, kind, started_at, finished_at, status, listed, new, saved, esi_calls,
                           worker, error)
    SELECT 90000000 + g % {USERS}, 'character', f - (0.2 + (g % 30) / 10.0) * interval '1 second', f,
           CASE WHEN g % 100 < 90 THEN 'ok' WHEN g % 100 < 93 THEN 'partial' WHEN g % 100 < 96 THEN 'error'
                WHEN g % 100 < 98 THEN 'locked' ELSE 'needs_relogin' END,
           30, g % 3, g % 3, 1 + g % 3, 'bench:' || g % 10,
           CASE WHEN g % 100 BETWEEN 93 AND 95 THEN 'ServerError: 502' END
    FROM generate_series(1, {RUNS}) g, LATERAL (SELECT now() - g * interval '0.43 seconds' AS f) x
    """,
    f"""
    INSERT INTO esi_limits (bucket, limit_tokens, window_seconds, remaining, paused_until, last_status, updated_at)
    SELECT 'char-killmail:' || (90000000 + g), 300, 900, 290 - g % 50,
           CASE WHEN g % 5000 = 0 THEN now() + interval '1 hour' END, 304, now() - (g % 600) * interval '1 second'
    FROM generate_series(1, {USERS}) g
    """,
    "INSERT INTO esi_limits (bucket, limit_tokens, window_seconds, remaining, last_status) "
    "VALUES ('killmail', 3600, 900, 3000, 200), ('error-limit', 100, 60, 100, 200)",
    """
    INSERT INTO esi_calls (route_group, status, calls)
    VALUES ('killmail', 200, 1000000), ('killmail', 502, 1200), ('char-killmail', 200, 300000),
           ('char-killmail', 304, 5000000), ('char-killmail', 420, 3), ('char-killmail', 429, 1), ('sso', 200, 80000)
    """,
    "INSERT INTO webhooks (name, url) VALUES ('discord', 'https://discord.example/hook'), "
    "('json', 'https://json.example/hook')",
    f"""
    INSERT INTO outbox (webhook_id, killmail_id, created_at, attempts, next_attempt_at, delivered_at, last_error)
    SELECT 1 + g % 2, 100000000 + {KILLMAILS} - g, now() - g * interval '10 seconds', 1,
           CASE WHEN g <= 100 THEN now() WHEN g <= 110 THEN NULL END,
           CASE WHEN g > 110 THEN now() - g * interval '10 seconds' END,
           CASE WHEN g BETWEEN 101 AND 110 THEN 'HTTP 404' END
    FROM generate_series(1, 50110) g
    """,
    """
    INSERT INTO worker_jobs (worker, character_id, started_at, progress_at)
    SELECT 'bench:' || g, 90000000 + g, now() - interval '5 seconds', now() - interval '1 second'
    FROM generate_series(1, 10) g
    """,
]


def build_world(url: str) -> float:
    """Write the world into the database at url, vacuum and analyze it; returns the seconds it took."""
    started = time.monotonic()
    with db.connect(url, autocommit=True) as conn:
        for statement in WORLD_SQL:
            conn.execute(statement)
        conn.execute("VACUUM ANALYZE")
    return time.monotonic() - started


def get(base: str, path: str) -> tuple[int, float]:
    """One GET on a fresh connection: (status, seconds)."""
    parts = urlsplit(base)
    started = time.perf_counter()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    return response.status, time.perf_counter() - started


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50 and p95 (nearest rank) in milliseconds."""
    ordered = sorted(seconds)
    rank95 = max(0, -(-95 * len(ordered) // 100) - 1)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 1), "p95_ms": round(ordered[rank95] * 1000, 1)}


def time_endpoints(url: str, queue: str, requests: int) -> dict[str, dict]:
    """Each endpoint's p50 and p95 over `requests` sequential requests to gunicorn (after a warm-up)."""
    figures = {}
    with serve(status_env(url, queue=queue, rabbitmq_url=harness.RABBITMQ_URL)) as base:
        for path, _ in ENDPOINTS:
            for _ in range(WARM_UP):
                get(base, path)
            results = [get(base, path) for _ in range(requests)]
            figures[path] = {**percentiles([s for _, s in results]), "statuses": sorted({c for c, _ in results})}
    return figures


def time_queries(url: str, requests: int) -> dict[str, dict]:
    """Each status query of db.py timed alone, as web/report.py calls it, on a connection with the app's work_mem
    (p50 and p95 of `requests` calls)."""
    now = datetime.now(UTC)
    settings = Settings(database_url=url, max_attempts=harness.MAX_ATTEMPTS)
    interval, stale = settings.sync_interval_seconds, CLAIM_STALE_SECONDS
    first = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=report.HOURS_CHARTED - 1)
    until = first + timedelta(hours=report.HOURS_CHARTED)
    calls = {
        "latest_run": lambda c: db.latest_run(c),
        "run_figures": lambda c: db.run_figures(c, now - report.METRICS_WINDOW, first, until),
        # What run_figures replaced, timed when this file measures code from before it (a worktree of it).
        "run_stats": lambda c: db.run_stats(c, now - report.METRICS_WINDOW),
        "runs_per_hour": lambda c: db.runs_per_hour(c, first, until),
        "run_durations_per_hour": lambda c: db.run_durations_per_hour(c, first, until),
        "runs_by_status": lambda c: db.runs_by_status(c),
        "killmail_growth": lambda c: db.killmail_growth(c, now),
        "isk_last_day": lambda c: db.isk_last_day(c, now),
        "killmails_per_hour": lambda c: db.killmails_per_hour(c, first, until),
        "detail_backlog": lambda c: db.detail_backlog(c, max_attempts=settings.max_attempts),
        "user_states": lambda c: db.user_states(c, now, interval=interval, stale_after=stale),
        "recent_runs": lambda c: db.recent_runs(c, limit=report.RECENT_RUNS),
        "failed_refs": lambda c: db.failed_refs(c, limit=report.FAILED_REFS_SHOWN),
        "esi_limit_buckets": lambda c: db.esi_limit_buckets(c, now),
        "esi_call_counts": lambda c: db.esi_call_counts(c),
        "outbox_summary": lambda c: db.outbox_summary(c, now),
        "job_health": lambda c: db.job_health(c, now, stall_after=settings.job_stall_seconds, stale_claim_after=stale),
    }
    figures = {}
    with db.connect(url, autocommit=True) as conn:
        if hasattr(sources, "WORK_MEM"):  # the app's sessions' setting (code from before it has none)
            conn.execute(f"SET work_mem = '{sources.WORK_MEM}'")
        for name, call in calls.items():
            if not hasattr(db, name):
                continue
            call(conn)
            times = []
            for _ in range(requests):
                started = time.perf_counter()
                call(conn)
                times.append(time.perf_counter() - started)
            figures[name] = percentiles(times)
    return figures


def measure(requests: int = REQUESTS, *, keep: bool = False) -> dict:
    """Build the world in a database of its own, then time the endpoints and the queries."""
    with harness.lab("status", simulator=False) as lab:
        build = build_world(lab.database_url)
        endpoints = time_endpoints(lab.database_url, lab.queue, requests)
        queries = time_queries(lab.database_url, requests)
        if keep:
            with db.connect(harness.ADMIN_URL.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
                kept = f"killmails_bench_status_kept_{int(time.time())}"
                admin.execute(f'CREATE DATABASE "{kept}" TEMPLATE "{lab.database_url.rsplit("/", 1)[1]}"')
                print(f"kept a copy of the world: {kept}")
    return {"world": {"users": USERS, "killmails": KILLMAILS, "runs": RUNS, "unstored_refs": UNSTORED_REFS,
                      "build_seconds": round(build, 1)},
            "requests": requests, "endpoints": endpoints, "queries_ms": queries}


def run(requests: int = REQUESTS) -> tuple[list[Figure], dict]:
    """bench/run.py's entry: one figure per endpoint, p95 against its target."""
    data = measure(requests)
    figures = []
    for path, target in ENDPOINTS:
        got = data["endpoints"][path]
        figures.append(Figure(SCENARIO, f"GET {path}, p50 / p95 of {requests}",
                              f"{got['p50_ms']:.0f} / {got['p95_ms']:.0f} ms", f"p95 <= {target:.0f} ms",
                              got["p95_ms"] <= target and got["statuses"] == [200], got))
    return figures, {"status": data}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=REQUESTS, help="sequential requests to each endpoint")
    parser.add_argument("--keep", action="store_true", help="keep a copy of the world's database")
    args = parser.parse_args(argv)
    data = measure(args.requests, keep=args.keep)
    print(f"world built in {data['world']['build_seconds']} s")
    for path, target in ENDPOINTS:
        got = data["endpoints"][path]
        print(f"GET {path:22} p50 {got['p50_ms']:7.1f} ms  p95 {got['p95_ms']:7.1f} ms  statuses {got['statuses']}"
              f"  (target p95 <= {target:.0f} ms)")
    for name, got in sorted(data["queries_ms"].items(), key=lambda item: -item[1]["p50_ms"]):
        print(f"  {name:24} p50 {got['p50_ms']:7.1f} ms  p95 {got['p95_ms']:7.1f} ms")
    met = all(data["endpoints"][p]["p95_ms"] <= t and data["endpoints"][p]["statuses"] == [200] for p, t in ENDPOINTS)
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

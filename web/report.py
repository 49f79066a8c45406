"""What the status app reports: /status's numbers and /metrics' families, read through sources.py. The app
(web/__init__.py) serves them; nothing here knows of HTTP.

Nothing here ever reads a token column: the report and the metrics carry ids, names, counts and times.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import db
from enqueue import CLAIM_STALE_SECONDS
from settings import Settings, describe

from .sources import Sources

log = logging.getLogger(__name__)
T = TypeVar("T")

RUNNING_WINDOW = timedelta(minutes=5)   # a run finished this recently means the worker is running
METRICS_WINDOW = timedelta(hours=24)    # success rate, error rate, durations and growth are over this window
HOURS_CHARTED = 24                      # the page's charts: this many clock hours, the current one last
ESI_LIMIT_STATUSES = (420, 429)         # ESI's error limit and rate limit answers
RECENT_RUNS = 20
FAILED_REFS_SHOWN = 20


def build_report(conn: db.Connection, settings: Settings, queue: dict[str, Any], now: datetime, *,
                 beside: db.Connection | None = None) -> dict[str, Any]:
    """Everything /status shows, as plain data (times as aware datetimes). With a second connection `beside`, the
    day's runs (the longest read: their percentiles sort every run of the day) are read on it, in a thread, while
    the rest is read on conn."""
    first, until = charted_hours(now)
    with meanwhile(lambda c: db.run_figures(c, now - METRICS_WINDOW, first, until), conn, beside) as day_of_runs:
        latest = db.latest_run(conn)
        growth = db.killmail_growth(conn, now)
        isk = db.isk_last_day(conn, now)
        users = db.user_states(conn, now, interval=settings.sync_interval_seconds, stale_after=CLAIM_STALE_SECONDS)
        refs = db.failed_refs(conn, limit=FAILED_REFS_SHOWN)
        recent = db.recent_runs(conn, limit=RECENT_RUNS)
        limits = db.esi_limit_buckets(conn, now)
        calls = db.esi_call_counts(conn)
        outbox = db.outbox_summary(conn, now)
        jobs = db.job_health(conn, now, stall_after=settings.job_stall_seconds, stale_claim_after=CLAIM_STALE_SECONDS)
        runs = day_of_runs()
    stats = runs.stats
    last_sync = latest["finished_at"] if latest else None
    return {
        "generated_at": now,
        # The seed's WorkerStatus, under its own names (the web app reads them); lastSyncDuration in seconds.
        "worker": {"isRunning": is_running(last_sync, queue["consumers"], now), "lastSync": last_sync,
                   "totalUsers": sum(users.values()), "lastSyncDuration": latest["duration"] if latest else None},
        "metrics": {
            "window_hours": METRICS_WINDOW / timedelta(hours=1),
            "runs": stats["runs"],
            "success_rate": share(stats["succeeded"], stats["runs"]),
            "error_rate": share(stats["failed"], stats["runs"]),
            "sync_duration_avg_seconds": stats["avg_duration"],
            "sync_duration_p95_seconds": stats["p95_duration"],
            "killmails_total": growth["total"],
            "killmails_last_hour": growth["last_hour"],
            "killmails_per_hour": round(growth["last_day"] / (METRICS_WINDOW / timedelta(hours=1)), 2),
            # ISK of the last 24 h of killmails (by their time): the users' losses, and the rest (their kills).
            "isk_destroyed_last_day": float(isk["destroyed"]),
            "isk_lost_last_day": float(isk["lost"]),
        },
        "hourly": hourly(conn, now, runs),
        "queue": queue,
        "users": users,
        "runs": recent,
        "failed_killmails": {"total": refs[0]["total"] if refs else 0, "latest": [
            {**{k: v for k, v in ref.items() if k != "total"}, "gave_up": ref["attempts"] >= settings.max_attempts}
            for ref in refs]},
        "esi_limits": limits,
        "esi_calls": calls,
        "outbox": outbox,
        "jobs": jobs,
    }


@contextmanager
def meanwhile(read: Callable[[db.Connection], T], conn: db.Connection, beside: db.Connection | None
              ) -> Iterator[Callable[[], T]]:
    """`read` on the connection beside, in a thread of its own while the block runs; the block calls what this
    yields for the result (an error of the read is raised there). Without a connection beside, that call reads
    on conn."""
    if beside is None:
        yield lambda: read(conn)
        return
    # On leaving, even by an error, the executor waits for the read: the connection beside is done with after it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="status-read") as executor:
        yield executor.submit(read, beside).result


def charted_hours(now: datetime) -> tuple[datetime, datetime]:
    """The start of the first of the HOURS_CHARTED clock hours (UTC) the charts show, the current one last, and
    the end of the last."""
    first = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=HOURS_CHARTED - 1)
    return first, first + timedelta(hours=HOURS_CHARTED)


def hourly(conn: db.Connection, now: datetime, runs: db.RunFigures | None = None) -> list[dict[str, Any]]:
    """The last HOURS_CHARTED clock hours (UTC), oldest first, the current one last: killmails stored, runs
    finished by status, and the median and 95th percentile run duration in seconds. An hour with nothing in it
    counts zeros, and its durations are None. `runs` is db.run_figures' reading for `now`, when the caller has
    it already."""
    first, until = charted_hours(now)
    if runs is None:
        runs = db.run_figures(conn, now - METRICS_WINDOW, first, until)
    hours: dict[datetime, dict[str, Any]]
    hours = {first + timedelta(hours=n): {"hour": first + timedelta(hours=n), "killmails": 0, "runs": {},
                                          "duration_p50_seconds": None, "duration_p95_seconds": None}
             for n in range(HOURS_CHARTED)}
    for row in db.killmails_per_hour(conn, first, until):
        hours[row["hour"]]["killmails"] = row["killmails"]
    for row in runs.hours:
        hours[row["hour"]].update(runs=row["runs"], duration_p50_seconds=row["p50"], duration_p95_seconds=row["p95"])
    return list(hours.values())


def is_running(last_sync: datetime | None, consumers: int | None, now: datetime) -> bool:
    """A worker consumes the queue, or a run finished within RUNNING_WINDOW (a run is recorded when it ends)."""
    return bool(consumers) or (last_sync is not None and now - last_sync <= RUNNING_WINDOW)


def share(part: int, whole: int) -> float | None:
    """part / whole rounded to four places; None when there is no whole."""
    return round(part / whole, 4) if whole else None


class StatusCollector:
    """Prometheus metrics read from the database and the broker at each scrape."""

    def __init__(self, sources: Sources):
        self.sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Yield every metric family; a component that cannot be reached shows as killmail_status_up 0."""
        settings = self.sources.settings
        up = GaugeMetricFamily("killmail_status_up", "Whether the status app reached the component (1) or not (0)",
                               labels=["component"])
        try:
            with self.sources.connection() as conn:
                families = list(database_metrics(conn, settings, datetime.now(UTC)))
            up.add_metric(["database"], 1)
        except psycopg.Error as exc:
            log.warning("metrics: database unavailable: %s", describe(exc))
            families = []
            up.add_metric(["database"], 0)
        queue = self.sources.queue_state()
        up.add_metric(["broker"], 0 if queue["error"] else 1)
        yield up
        yield from families
        if not queue["error"]:
            for name, key, text in (("killmail_queue_depth", "depth", "Jobs waiting in the queue"),
                                    ("killmail_queue_consumers", "consumers", "Consumers of the queue"),
                                    ("killmail_queue_retrying", "retrying", "Jobs waiting in the retry queues"),
                                    ("killmail_dead_letters", "dead", "Jobs in the dead-letter queue")):
                yield GaugeMetricFamily(name, text, value=queue[key])


def database_metrics(conn: db.Connection, settings: Settings, now: datetime
                     ) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The metric families read from the database."""
    runs = CounterMetricFamily("killmail_sync_runs", "Sync runs recorded, by status", labels=["status"])
    for row in db.runs_by_status(conn):
        runs.add_metric([row["status"]], row["runs"])
    yield runs
    yield CounterMetricFamily("killmail_killmails_saved", "Killmails stored",
                              value=db.killmail_growth(conn, now)["total"])
    yield from esi_call_metrics(conn)
    backlog = GaugeMetricFamily("killmail_detail_backlog", "Listed killmails not stored yet: pending (attempts "
                                "left) or gave_up (every attempt used)", labels=["state"])
    for state, count in db.detail_backlog(conn, max_attempts=settings.max_attempts).items():
        backlog.add_metric([state], count)
    yield backlog
    users = GaugeMetricFamily("killmail_users", "Users by state", labels=["state"])
    for state, count in db.user_states(conn, now, interval=settings.sync_interval_seconds,
                                       stale_after=CLAIM_STALE_SECONDS).items():
        users.add_metric([state], count)
    yield users
    outbox = db.outbox_summary(conn, now)
    rows = GaugeMetricFamily("killmail_outbox_rows", "Notification outbox rows: pending, or failed (given up)",
                             labels=["state"])
    for state in ("pending", "failed"):
        rows.add_metric([state], outbox[state])
    yield rows
    yield GaugeMetricFamily("killmail_notify_refused", "Notification destinations that refused us",
                            value=len(outbox["refused"]))
    jobs = db.job_health(conn, now, stall_after=settings.job_stall_seconds, stale_claim_after=CLAIM_STALE_SECONDS)
    for name, key, text in (
            ("killmail_jobs_in_progress", "in_progress", "Jobs in hand of the live worker processes"),
            ("killmail_job_oldest_seconds", "oldest_seconds", "Age of the oldest job in hand, in seconds"),
            ("killmail_jobs_stalled", "stalled", "Jobs in hand with no progress for JOB_STALL_SECONDS"),
            ("killmail_claims_stale", "stale_claims",
             "Pilots and corporations claimed for a queue longer than the stale-claim limit")):
        yield GaugeMetricFamily(name, text, value=jobs[key])
    latest = db.latest_run(conn)
    # +Inf before the first run, so an alert on "age > N" fires for a worker that never ran.
    age = (now - latest["finished_at"]).total_seconds() if latest else math.inf
    yield GaugeMetricFamily("killmail_last_sync_age_seconds", "Seconds since the last run finished", value=age)
    remaining = GaugeMetricFamily("killmail_esi_limit_remaining",
                                  "Tokens left in an ESI limit bucket (lowest of a per-character group)",
                                  labels=["bucket"])
    paused = GaugeMetricFamily("killmail_esi_limit_paused", "ESI limit buckets paused now", labels=["bucket"])
    for row in db.esi_limit_buckets(conn, now):
        if row["remaining"] is not None:
            remaining.add_metric([row["bucket"]], row["remaining"])
        paused.add_metric([row["bucket"]], row["paused"])
    yield remaining
    yield paused


def esi_call_metrics(conn: db.Connection) -> Iterator[CounterMetricFamily]:
    """ESI calls by route group and status, and their 420s and 429s summed over route groups."""
    calls = CounterMetricFamily("killmail_esi_calls", "ESI calls by route group and status",
                                labels=["group", "status"])
    # The 420s and 429s again, present from the start at 0, so that an alert on their increase sees the first
    # one (a series that appears with its first answer shows no increase).
    limited = CounterMetricFamily("killmail_esi_limit_hits", "ESI answers 420 (error limit) and 429 (rate limit)",
                                  labels=["status"])
    hits = dict.fromkeys(ESI_LIMIT_STATUSES, 0)
    for row in db.esi_call_counts(conn):
        calls.add_metric([row["route_group"], str(row["status"])], row["calls"])
        if row["status"] in hits:
            hits[row["status"]] += row["calls"]
    for status, count in hits.items():
        limited.add_metric([str(status)], count)
    yield calls
    yield limited

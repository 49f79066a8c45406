"""The status app: /health for load balancers, /status for operators (HTML or JSON), /metrics for Prometheus.

Serve it with `gunicorn -c gunicorn.conf.py status_app:app`, or locally with `python status_app.py --port 8000`.
Each process opens its small connection pool at its first request (after gunicorn's fork, so the master holds
none) and checks the broker with a short-timeout connection whose answer it keeps for a second. Nothing here
ever reads a token column: pages and metrics carry ids, names, counts and times.
"""
from __future__ import annotations

import argparse
import hmac
import logging
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pika
import pika.exceptions
import psycopg
from flask import Flask, Request, Response, jsonify, render_template, request
from flask.json.provider import DefaultJSONProvider
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

import broker
import db
from queue_killmails import CLAIM_STALE_SECONDS
from settings import ConfigError, Settings, load_settings, setup_logging

log = logging.getLogger(__name__)

POOL_WAIT_SECONDS = 1.0       # a request waits this long for a pooled connection, then reports the database down
CONNECT_TIMEOUT_SECONDS = 2   # libpq connect_timeout, for a host that drops packets rather than refusing
# A pool retries a lost database in the background with growing delays; giving up after a few seconds lets the
# next request start a fresh attempt at once, so a restarted database is seen again within seconds, not minutes.
POOL_RECONNECT_SECONDS = 5.0
STATEMENT_TIMEOUT_MS = 5000   # no status query may hold a connection longer
BROKER_TIMEOUT_SECONDS = 1.0  # TCP connect and AMQP handshake, each
BROKER_CACHE_SECONDS = 1.0    # a probe every few ms must not open a broker connection each time
RUNNING_WINDOW = timedelta(minutes=5)   # a run finished this recently means the worker is running
METRICS_WINDOW = timedelta(hours=24)    # success rate, error rate, durations and growth are over this window
RECENT_RUNS = 20
FAILED_REFS_SHOWN = 20
PROTECTED = ("/status", "/metrics")     # /health never asks for a password: load balancers probe it


class Sources:
    """Where the numbers come from, each made at first use in this process: settings, pool, broker probe."""

    def __init__(self, settings: Settings | None = None):
        self._settings = settings
        self._pool: ConnectionPool | None = None
        self._pool_pid = 0
        self._pool_lock = threading.Lock()
        self._broker_lock = threading.Lock()
        self._broker_checked = -math.inf
        self._broker_error: str | None = None

    @property
    def settings(self) -> Settings:
        """The settings given, or read from the environment at first use (ConfigError names a bad variable)."""
        if self._settings is None:
            self._settings = load_settings(need_esi=False)
        return self._settings

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A pooled autocommit connection with dict rows; psycopg_pool.PoolTimeout when none comes in time."""
        with self._get_pool().connection(timeout=POOL_WAIT_SECONDS) as conn:
            yield conn

    def _get_pool(self) -> ConnectionPool:
        with self._pool_lock:
            # A pool belongs to the process that opened it: after a fork, the child opens its own.
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = ConnectionPool(
                    self.settings.database_url, min_size=1, max_size=4, open=False, name="status",
                    timeout=POOL_WAIT_SECONDS, reconnect_timeout=POOL_RECONNECT_SECONDS,
                    check=ConnectionPool.check_connection,
                    kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": CONNECT_TIMEOUT_SECONDS,
                            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"},
                )
                self._pool.open(wait=False)
                self._pool_pid = os.getpid()
            return self._pool

    def broker_error(self) -> str | None:
        """Why the broker refused a connection, or None when it accepted one (an answer kept for a second)."""
        with self._broker_lock:
            if time.monotonic() - self._broker_checked >= BROKER_CACHE_SECONDS:
                try:
                    open_broker(self.settings.rabbitmq_url).close()
                    self._broker_error = None
                except (pika.exceptions.AMQPError, OSError) as exc:
                    self._broker_error = describe(exc)
                    log.warning("health: broker unreachable: %s", self._broker_error)
                self._broker_checked = time.monotonic()
            return self._broker_error

    def close(self) -> None:
        """Close this process's pool (tests; a worker process simply exits)."""
        with self._pool_lock:
            if self._pool is not None and self._pool_pid == os.getpid():
                self._pool.close()
            self._pool = None


def open_broker(url: str) -> pika.BlockingConnection:
    """A broker connection that gives up within about two seconds."""
    parameters = pika.URLParameters(url)
    parameters.socket_timeout = BROKER_TIMEOUT_SECONDS
    parameters.stack_timeout = 2 * BROKER_TIMEOUT_SECONDS  # bounds TCP, TLS and the AMQP handshake together
    parameters.blocked_connection_timeout = 2 * BROKER_TIMEOUT_SECONDS
    parameters.connection_attempts = 1
    return pika.BlockingConnection(parameters)


def describe(exc: BaseException) -> str:
    """An exception as one short line for a log or a page (never carries a URL's password: pika and libpq
    do not put it in their messages)."""
    text = " ".join(str(exc).split()) or repr(exc)
    return f"{type(exc).__name__}: {text}"[:300]


# ---------------------------------------------------------------------------------------------- numbers


def queue_state(settings: Settings) -> dict[str, Any]:
    """Jobs waiting in the queue, its consumers, jobs in its retry queues and in its dead-letter queue; the
    numbers are None, with an error, when the broker cannot be reached."""
    state: dict[str, Any] = {"name": settings.queue_name, "depth": None, "consumers": None, "retrying": None,
                             "dead": None, "error": None}
    retries = [broker.retry_queue(settings.queue_name, n) for n in range(1, settings.max_attempts)]
    dead = broker.dead_queue(settings.queue_name)
    try:
        connection = open_broker(settings.rabbitmq_url)
        try:
            counts = passive_counts(connection, [settings.queue_name, *retries, dead])
        finally:
            connection.close()
    except (pika.exceptions.AMQPError, OSError) as exc:
        state["error"] = f"broker unreachable: {describe(exc)}"
        return state
    state.update(depth=counts[settings.queue_name][0], consumers=counts[settings.queue_name][1],
                 retrying=sum(counts[q][0] for q in retries), dead=counts[dead][0])
    return state


def passive_counts(connection: pika.BlockingConnection, queues: list[str]) -> dict[str, tuple[int, int]]:
    """(messages, consumers) of each queue by passive declare; a queue never declared counts (0, 0)."""
    channel = connection.channel()
    counts = {}
    for queue in queues:
        try:
            method = channel.queue_declare(queue, passive=True).method
            counts[queue] = (method.message_count, method.consumer_count)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            counts[queue] = (0, 0)
            channel = connection.channel()  # a failed passive declare closes the channel
    channel.close()
    return counts


def build_report(conn, settings: Settings, queue: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Everything /status shows, as plain data (times as aware datetimes)."""
    latest = db.latest_run(conn)
    stats = db.run_stats(conn, now - METRICS_WINDOW)
    growth = db.killmail_growth(conn, now)
    users = db.user_states(conn, now, interval=settings.sync_interval_seconds, stale_after=CLAIM_STALE_SECONDS)
    refs = db.failed_refs(conn, limit=FAILED_REFS_SHOWN)
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
        },
        "queue": queue,
        "users": users,
        "runs": db.recent_runs(conn, limit=RECENT_RUNS),
        "failed_killmails": {"total": refs[0]["total"] if refs else 0,
                             "latest": [{k: v for k, v in ref.items() if k != "total"} for ref in refs]},
        "esi_limits": db.esi_limit_buckets(conn, now),
        "esi_calls": db.esi_call_counts(conn),
    }


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
                families = list(database_metrics(conn, settings, datetime.now(timezone.utc)))
            up.add_metric(["database"], 1)
        except psycopg.Error as exc:
            log.warning("metrics: database unavailable: %s", describe(exc))
            families = []
            up.add_metric(["database"], 0)
        queue = queue_state(settings)
        up.add_metric(["broker"], 0 if queue["error"] else 1)
        yield up
        yield from families
        if not queue["error"]:
            for name, key, text in (("killmail_queue_depth", "depth", "Jobs waiting in the queue"),
                                    ("killmail_queue_consumers", "consumers", "Consumers of the queue"),
                                    ("killmail_queue_retrying", "retrying", "Jobs waiting in the retry queues"),
                                    ("killmail_dead_letters", "dead", "Jobs in the dead-letter queue")):
                yield GaugeMetricFamily(name, text, value=queue[key])


def database_metrics(conn, settings: Settings, now: datetime) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The metric families read from the database."""
    runs = CounterMetricFamily("killmail_sync_runs", "Sync runs recorded, by status", labels=["status"])
    for row in db.runs_by_status(conn):
        runs.add_metric([row["status"]], row["runs"])
    yield runs
    yield CounterMetricFamily("killmail_killmails_saved", "Killmails stored",
                              value=db.killmail_growth(conn, now)["total"])
    calls = CounterMetricFamily("killmail_esi_calls", "ESI calls by route group and status",
                                labels=["group", "status"])
    for row in db.esi_call_counts(conn):
        calls.add_metric([row["route_group"], str(row["status"])], row["calls"])
    yield calls
    users = GaugeMetricFamily("killmail_users", "Users by state", labels=["state"])
    for state, count in db.user_states(conn, now, interval=settings.sync_interval_seconds,
                                       stale_after=CLAIM_STALE_SECONDS).items():
        users.add_metric([state], count)
    yield users
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


# ---------------------------------------------------------------------------------------------- HTTP


class UtcJsonProvider(DefaultJSONProvider):
    """JSON with times in UTC ISO 8601 ('2026-11-01T12:00:00Z') rather than Flask's HTTP dates."""

    sort_keys = False

    @staticmethod
    def default(o: Any) -> Any:
        if isinstance(o, datetime):
            return iso_utc(o)
        return DefaultJSONProvider.default(o)


def iso_utc(moment: datetime) -> str:
    """An aware time as UTC ISO 8601 with a Z."""
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def ago(moment: datetime | None, now: datetime) -> str:
    """A time relative to now, as people say it: 'just now', '3 min ago', 'in 2 h'."""
    if moment is None:
        return "never"
    seconds = (now - moment).total_seconds()
    if abs(seconds) < 5:
        return "just now"
    unit, size = next((u, s) for u, s in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)) if abs(seconds) >= s)
    amount = f"{int(abs(seconds) // size)} {unit}"
    return f"{amount} ago" if seconds > 0 else f"in {amount}"


def duration(seconds: float | None) -> str:
    """Seconds as a short duration: '850 ms', '4.2 s', '3 min 5 s', '15 min', '2 h 10 min'."""
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def authorized(request_: Request, expected: str) -> bool:
    """Whether the request carries the basic-auth user:password expected (constant-time comparison)."""
    auth = request_.authorization
    if auth is None or auth.type != "basic":
        return False
    given = f"{auth.username or ''}:{auth.password or ''}".encode()
    return hmac.compare_digest(given, expected.encode())


def wants_json(request_: Request) -> bool:
    """?format=json or ?format=html decide; otherwise the Accept header, HTML when it takes both."""
    chosen = request_.args.get("format")
    if chosen in ("json", "html"):
        return chosen == "json"
    return request_.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json"


def check_health(sources: Sources, *, deep: bool, now: datetime) -> tuple[dict[str, Any], int]:
    """/health's body and status: the database and the broker answer; when deep, a run finished recently."""
    body: dict[str, Any] = {"status": "ok", "database": "ok", "broker": "ok"}
    latest = None
    try:
        with sources.connection() as conn:
            db.ping(conn)
            latest = db.latest_run(conn) if deep else None
    except psycopg.Error as exc:
        log.warning("health: database unavailable: %s", describe(exc))
        body["database"] = body["status"] = "unavailable"
    if sources.broker_error() is not None:
        body["broker"] = body["status"] = "unavailable"
    if deep and body["database"] == "ok":
        max_age = sources.settings.health_max_sync_age_seconds
        age = (now - latest["finished_at"]).total_seconds() if latest else None
        body.update(sync="ok" if age is not None and age <= max_age else "stalled",
                    last_sync=latest["finished_at"] if latest else None,
                    last_sync_age_seconds=round(age) if age is not None else None, max_sync_age_seconds=max_age)
        if body["sync"] == "stalled" and body["status"] == "ok":
            body["status"] = "stalled"
    return body, 200 if body["status"] == "ok" else 503


def create_app(settings: Settings | None = None) -> Flask:
    """The Flask app; settings are read from the environment at the first request when not given."""
    app = Flask(__name__)
    app.json = UtcJsonProvider(app)
    sources = Sources(settings)
    app.extensions["status_sources"] = sources
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(sources))
    app.add_template_filter(ago)
    app.add_template_filter(duration)
    app.add_template_filter(iso_utc)

    @app.errorhandler(ConfigError)
    def configuration_error(exc: ConfigError):
        log.error("configuration error: %s", exc)
        # The variable's name only: its value may be a URL with a password in it.
        return Response(f"configuration error in {exc.variable}; see the log\n", 500, mimetype="text/plain")

    @app.before_request
    def require_password():
        expected = sources.settings.status_basic_auth
        if expected and request.path in PROTECTED and not authorized(request, expected):
            return Response("authentication required\n", 401, mimetype="text/plain",
                            headers={"WWW-Authenticate": 'Basic realm="killmail status", charset="UTF-8"'})
        return None

    @app.after_request
    def no_store(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/health")
    def health():
        deep = request.args.get("deep", "").lower() in ("1", "true", "yes")
        body, code = check_health(sources, deep=deep, now=datetime.now(timezone.utc))
        return jsonify(body), code

    @app.get("/status")
    def status():
        now, as_json = datetime.now(timezone.utc), wants_json(request)
        queue = queue_state(sources.settings)  # before taking a connection, which is not held meanwhile
        report, error, code = None, None, 200
        try:
            with sources.connection() as conn:
                report = build_report(conn, sources.settings, queue, now)
        except psycopg.Error as exc:
            log.warning("status: database unavailable: %s", describe(exc))
            error, code = f"database unavailable: {describe(exc)}", 503
        if as_json:
            response = jsonify(report if report is not None else {"generated_at": now, "error": error})
        else:
            response = Response(render_template("status.html", report=report, error=error, now=now))
        response.status_code = code
        response.vary.add("Accept")
        return response

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    return app


app = create_app()


def main(argv: list[str] | None = None) -> int:
    """Serve the app with Flask's development server (gunicorn in production)."""
    parser = argparse.ArgumentParser(description="Serve /health, /status and /metrics locally "
                                                 "(in production: gunicorn -c gunicorn.conf.py status_app:app).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--verbose", action="store_true", help="log with time, level and pid")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(need_esi=False)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(verbose=args.verbose)
    create_app(settings).run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

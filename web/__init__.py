"""The web app: /health for load balancers, /status for operators (HTML or JSON), /metrics for Prometheus,
and, when EVE_CALLBACK_URL is set, /login and /callback to add pilots from a browser (login.py) and a pilot's /me
(pilot.py). The web app's /api routes (api.py) are served beside them, behind a bearer token of their own.

`create_app` builds it; status_app.py at the top is gunicorn's entry. Each process opens its small connection
pool at its first request (after gunicorn's fork, so the master holds none), checks the broker for /health with a
short-timeout connection whose answer it keeps for a second, and reads the queue figures of /status and /metrics
at most every few seconds through one kept connection (sources.py); the numbers themselves come from report.py.
The page is templates/status.html, its charts charts.py.
"""
from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
from flask import Flask, Request, Response, jsonify, render_template, request
from flask.json.provider import DefaultJSONProvider
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import db
from enqueue import CLAIM_STALE_SECONDS
from settings import ConfigError, Settings, describe, is_loopback

from . import charts
from .api import api_blueprint
from .login import login_blueprint
from .pilot import pilot_blueprint
from .report import StatusCollector, build_report
from .sources import Sources

log = logging.getLogger(__name__)

PROTECTED = ("/status", "/metrics")     # /health never asks for a password: load balancers probe it
OPERATOR_PREFIX = "/pilots/"            # operator actions (login's forget) need the password too


# On every answer. The pages need no script, font or image file: only their inline <style> and style attributes
# (the charts are inline SVG); forms post to the app itself, and no other site may frame a page.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


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
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


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


def from_this_machine(request_: Request) -> bool:
    """Whether a request comes straight from this machine: a loopback peer, and no proxy's forwarding header (a
    proxy on this host forwards the world's requests from loopback)."""
    forwarded = any(name in request_.headers for name in ("Forwarded", "X-Forwarded-For", "X-Real-IP"))
    return is_loopback(request_.remote_addr) and not forwarded


def wants_json(request_: Request) -> bool:
    """?format=json or ?format=html decide; otherwise the Accept header, HTML when it takes both."""
    chosen = request_.args.get("format")
    if chosen in ("json", "html"):
        return chosen == "json"
    return request_.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json"


def check_health(sources: Sources, *, deep: bool, now: datetime) -> tuple[dict[str, Any], int]:
    """/health's body and status: the database and the broker answer; when deep, a run finished recently and no
    job is stalled."""
    body: dict[str, Any] = {"status": "ok", "database": "ok", "broker": "ok"}
    latest = jobs = None
    try:
        with sources.connection() as conn:
            db.ping(conn)
            if deep:
                latest = db.latest_run(conn)
                jobs = db.job_health(conn, now, stall_after=sources.settings.job_stall_seconds,
                                     stale_claim_after=CLAIM_STALE_SECONDS)
    except psycopg.Error as exc:
        log.warning("health: database unavailable: %s", describe(exc))
        body["database"] = body["status"] = "unavailable"
    if sources.broker_error() is not None:
        body["broker"] = body["status"] = "unavailable"
    if deep and body["database"] == "ok":
        assert jobs is not None  # read whenever the database answered
        max_age = sources.settings.health_max_sync_age_seconds
        age = (now - latest["finished_at"]).total_seconds() if latest else None
        body.update(sync="ok" if age is not None and age <= max_age else "stalled",
                    last_sync=latest["finished_at"] if latest else None,
                    last_sync_age_seconds=round(age) if age is not None else None, max_sync_age_seconds=max_age)
        body.update(jobs_in_progress=jobs["in_progress"], jobs_stalled=jobs["stalled"])
        if jobs["stalled"]:
            body["sync"] = "stalled"
        if body["sync"] == "stalled" and body["status"] == "ok":
            body["status"] = "stalled"
    return body, 200 if body["status"] == "ok" else 503


def create_app(settings: Settings | None = None, *, clock: Callable[[], float] = time.monotonic) -> Flask:
    """The Flask app; settings are read from the environment at the first request when not given. `clock` times
    what the app keeps for a while (the queue figures, the broker's answer)."""
    app = Flask(__name__, static_folder=None)
    app.json = UtcJsonProvider(app)
    sources = Sources(settings, clock=clock)
    app.extensions["status_sources"] = sources
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(sources))
    app.add_template_filter(ago)
    app.add_template_filter(duration)
    app.add_template_filter(iso_utc)
    for chart in (charts.killmails_chart, charts.runs_chart, charts.durations_chart):
        app.add_template_global(chart)

    @app.errorhandler(ConfigError)
    def configuration_error(exc: ConfigError):
        log.error("configuration error: %s", exc)
        # The variable's name only: its value may be a URL with a password in it.
        return Response(f"configuration error in {exc.variable}; see the log\n", 500, mimetype="text/plain")

    @app.before_request
    def require_password():
        if not (request.path in PROTECTED or request.path.startswith(OPERATOR_PREFIX)):
            return None
        settings = sources.settings
        if settings.status_basic_auth:
            if authorized(request, settings.status_basic_auth):
                return None
            return Response("authentication required\n", 401, mimetype="text/plain",
                            headers={"WWW-Authenticate": 'Basic realm="killmail status", charset="UTF-8"'})
        if settings.status_auth_by_proxy or from_this_machine(request):
            return None
        return Response("refused: beyond this machine, /status, /metrics and /pilots answer only with "
                        "STATUS_BASIC_AUTH set (or STATUS_AUTH_BY_PROXY=1 where a proxy in front asks for a "
                        "password)\n", 403, mimetype="text/plain")

    @app.after_request
    def harden(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"
        response.headers.update(SECURITY_HEADERS)
        try:
            https = sources.settings.eve_callback_url.startswith("https://")
        except ConfigError:  # the answer is the configuration error's page already
            https = False
        if https:  # the app is served over https: browsers are to keep to it
            response.headers["Strict-Transport-Security"] = "max-age=31536000"
        return response

    @app.get("/health")
    def health():
        deep = request.args.get("deep", "").lower() in ("1", "true", "yes")
        body, code = check_health(sources, deep=deep, now=datetime.now(UTC))
        return jsonify(body), code

    @app.get("/status")
    def status():
        now, as_json = datetime.now(UTC), wants_json(request)
        queue = sources.queue_state()  # before taking a database connection, which is not held meanwhile
        report, error, code = None, None, 200
        try:
            with sources.connection() as conn, sources.spare_connection() as beside:
                report = build_report(conn, sources.settings, queue, now, beside=beside)
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

    app.register_blueprint(api_blueprint(sources))
    app.register_blueprint(login_blueprint(sources))
    app.register_blueprint(pilot_blueprint(sources))
    return app


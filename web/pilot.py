"""A pilot's own page after logging in with EVE SSO: its kills and losses, how its syncs go, and "Sync now".

- login.py's /callback starts a session (start_session) and sends the browser to /me. The session is Flask's
  signed cookie (itsdangerous), signed with FLASK_SECRET_KEY: HttpOnly, SameSite=Lax, Secure when the callback
  URL is https, and refused once older than SESSION_LIFETIME (the signature carries its time).
- `GET /me` lists the pilot's kills and losses, newest first, PAGE_SIZE at a time (`?before=<killmail_id>` pages
  on), with names, ISK values and zKillboard links; `?view=corporation` lists its corporation's, where its login
  granted the corporation killmail scope. Above them: the last sync, the next one due, and what went wrong in
  plain words.
- `POST /me/sync` is the seed's syncMyKillmails: with the session's CSRF token, at most once per SYNC_NOW_GAP
  seconds per pilot (counted in the database, so across every process), it queues the pilot at high priority.
- `POST /logout` ends the session.
No route takes a character id: a pilot reads only what its own session names. The routes answer 404 unless
EVE_CALLBACK_URL is set; the operator's pages keep STATUS_BASIC_AUTH.
"""
from __future__ import annotations

import hmac
import secrets
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlparse

from flask import Blueprint, Flask, Request, Response, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionMixin
from itsdangerous import URLSafeTimedSerializer

import db
from enqueue import queue_from_web

from .api import killmail_summary
from .sources import Sources

SESSION_COOKIE = "killmail_session"
SESSION_LIFETIME = timedelta(days=7)
PAGE_SIZE = 25
SYNC_NOW_GAP = 60  # seconds between two "Sync now" of one pilot
ZKILLBOARD_KILL = "https://zkillboard.com/kill/{}/"
NO_SESSION = "You are not logged in, or your session has expired."
# What the last run's error text says, in words for the pilot: the first matching fragment wins.
PLAIN_ERRORS = (
    ("RateLimited", "ESI asked this app to slow down"),
    ("ErrorLimited", "ESI's error limit was reached"),
    ("token refresh failed", "EVE SSO did not renew the login's access"),
    ("ServerError", "ESI answered with an error of its own"),
    ("Timeout", "ESI did not answer in time"),
    ("Connection", "ESI could not be reached"),
)


class PilotSessions(SecureCookieSessionInterface):
    """Flask's signed cookie session, keyed by FLASK_SECRET_KEY from the app's settings (read at the first
    request that carries the cookie, as the rest of the app reads its settings) and Secure on an https login."""

    def __init__(self, sources: Sources):
        self._sources = sources

    def open_session(self, app: Flask, request_: Request) -> SecureCookieSession | None:
        if self.get_cookie_name(app) not in request_.cookies:
            return self.session_class()  # /health and the operator's pages never need the settings for this
        return super().open_session(app, request_)

    def save_session(self, app: Flask, session_: SessionMixin, response: Response) -> None:
        if not session_ and not session_.modified:  # nothing to write or delete: no settings read (Flask's own
            if session_.accessed:                   # save asks for the cookie's attributes first)
                response.vary.add("Cookie")
            return
        super().save_session(app, session_, response)

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        key = self._sources.settings.flask_secret_key
        if not key:
            return None  # login is off: Flask answers with a session that cannot be written
        return URLSafeTimedSerializer(key, salt=self.salt, serializer=self.serializer, signer_kwargs={
            "key_derivation": self.key_derivation, "digest_method": self.digest_method})

    def get_cookie_secure(self, app: Flask) -> bool:
        return urlparse(self._sources.settings.eve_callback_url).scheme == "https"


def start_session(character_id: int, *, welcome: dict[str, Any] | None = None) -> None:
    """Make the browser's session this pilot's (a fresh one: nothing of an earlier session stays), with a new
    CSRF token; `welcome` is what /me says once, at the top."""
    session.clear()
    session.permanent = True
    session.update(character_id=character_id, csrf=secrets.token_urlsafe(32))
    if welcome:
        session["welcome"] = welcome


def isk(value: float | Decimal | None) -> str:
    """An ISK value as pilots write it: '950 ISK', '12.5k', '3.40M', '1.25B'; '–' when not valued yet."""
    if value is None:
        return "–"
    amount = float(value)
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if amount >= size:
            return f"{amount / size:.2f}{unit} ISK" if unit != "k" else f"{amount / size:.1f}k ISK"
    return f"{amount:,.0f} ISK"


def sync_problem(state: dict) -> str | None:
    """What keeps the pilot's syncs from going well, in plain words; None when nothing does."""
    token_error = state["token_error"] or ""
    if state["revoked"]:
        if token_error.startswith("forgotten"):
            return "log in again: an operator removed this pilot's grant"
        if "forbidden" in token_error:
            return "log in again: the grant lacks the scope to read your killmails"
        return "log in again: EVE revoked the grant"
    if state["run_status"] == "error":
        error = state["run_error"] or ""
        reason = next((words for fragment, words in PLAIN_ERRORS if fragment in error), "something went wrong")
        return f"the last sync did not finish: {reason}; it is tried again shortly"
    if state["run_status"] == "partial":
        return "some killmails could not be fetched yet; the next sync tries them again"
    return None


def next_due(state: dict, now: datetime) -> str:
    """When the pilot is synced next, in words."""
    if state["revoked"]:
        return "not until you log in again"
    if state["queued_at"] is not None:
        return "queued: a worker takes it up shortly"
    if state["next_due_at"] is None or state["next_due_at"] <= now:
        return "now: at the next queue run"
    return state["next_due_at"]


def pilot_blueprint(sources: Sources) -> Blueprint:
    """The /me, /me/sync and /logout routes; registering it also installs the signed session (PilotSessions)."""
    blueprint = Blueprint("pilot", __name__)

    @blueprint.record_once
    def install_sessions(state) -> None:
        state.app.session_interface = PilotSessions(sources)
        state.app.config.update(SESSION_COOKIE_NAME=SESSION_COOKIE, SESSION_COOKIE_HTTPONLY=True,
                                SESSION_COOKIE_SAMESITE="Lax", PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME)
        state.app.add_template_filter(isk)

    @blueprint.before_request
    def login_enabled():
        if not sources.settings.eve_callback_url:
            return Response("pilot pages are disabled (EVE_CALLBACK_URL is not set)\n", 404, mimetype="text/plain")
        return None

    @blueprint.get("/me")
    def me():
        character_id = session.get("character_id")
        if not isinstance(character_id, int):
            return logged_out(NO_SESSION, 401)
        now, settings = datetime.now(UTC), sources.settings
        view = "corporation" if request.args.get("view") == "corporation" else "character"
        before = request.args.get("before", "")
        with sources.connection() as conn:
            state = db.pilot_sync_state(conn, character_id, now, interval=settings.sync_interval_seconds)
            if state is None:  # the user row is gone: the session names nobody any more
                session.clear()
                return logged_out("This pilot is no longer a user here; please log in again.", 401)
            owner = character_id
            if view == "corporation":
                if db.CORPORATION_SCOPE not in (state["scopes"] or "").split() or state["corporation_id"] is None:
                    return Response("refused: your login did not grant your corporation's killmails (log in "
                                    "with the corporation option to add them)\n", 403, mimetype="text/plain")
                owner = state["corporation_id"]
            rows = db.killmails_page(conn, view, owner, limit=PAGE_SIZE,
                                     before=int(before) if before.isdigit() else None)
            names = db.names_of(conn, (row[key] for row in rows for key in db.NAMED_COLUMNS))
        killmails = [{**killmail_summary(row, names), "zkillboard": ZKILLBOARD_KILL.format(row["killmail_id"])}
                     for row in rows]
        return render_template(
            "me.html", state=state, now=now, killmails=killmails, view=view, welcome=session.pop("welcome", None),
            message=session.pop("message", None), problem=sync_problem(state), next_due=next_due(state, now),
            corporation_allowed=db.CORPORATION_SCOPE in (state["scopes"] or "").split(), csrf=session.get("csrf", ""),
            older=rows[-1]["killmail_id"] if len(rows) == PAGE_SIZE else None, paged=bool(before))

    @blueprint.post("/me/sync")
    def sync_now():
        character_id = session.get("character_id")
        if not isinstance(character_id, int):
            return logged_out(NO_SESSION, 401)
        if not csrf_matches(request.form.get("csrf_token", "")):
            return csrf_refused()
        now = datetime.now(UTC)
        with sources.connection() as conn:
            if db.request_sync(conn, character_id, now, min_gap=SYNC_NOW_GAP):
                session["message"] = queue_from_web(conn, sources.settings, character_id, now)
            else:
                session["message"] = f"Sync now works once a minute; your last one was less than {SYNC_NOW_GAP} s ago."
        return redirect(url_for("pilot.me"), 303)

    @blueprint.post("/logout")
    def logout():
        if session.get("character_id") is not None and not csrf_matches(request.form.get("csrf_token", "")):
            return csrf_refused()
        session.clear()
        return logged_out("You are logged out.", 200)

    return blueprint


def csrf_matches(given: str) -> bool:
    """Whether a form's CSRF token is this session's (constant-time comparison)."""
    expected = session.get("csrf", "")
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def csrf_refused() -> Response:
    """The answer to a form without this session's CSRF token."""
    return Response("refused: this form's token does not match your session; reload the page\n", 403,
                    mimetype="text/plain")


def logged_out(message: str, status: int) -> Response:
    """The page of a browser with no pilot's session: why, and a link to log in."""
    return Response(render_template("me.html", state=None, message=message, login_url=url_for("login.login")),
                    status)

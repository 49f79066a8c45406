"""Adding pilots from a browser: EVE SSO's authorization code flow on the status app, and the operator's forget.

- `GET /login` sends the browser to SSO with a fresh `state` and a PKCE challenge (`?corporation=1` also asks for
  the corporation killmail scope). The state is single use: its hash and the PKCE verifier wait in
  `login_states`, and an HttpOnly cookie binds it to this browser.
- `GET /callback` uses the state up, exchanges the code, verifies the access token against SSO's keys, checks
  the allow-lists with ESI's affiliation route, and only then writes `users` (as the web app would), queues the
  pilot's first sync at high priority, starts the pilot's session and sends it to its page, /me (pilot.py).
  Whatever goes wrong gets a plain page saying what, and stores nothing.
- `POST /pilots/<id>/forget` (behind STATUS_BASIC_AUTH) revokes the pilot's grant at SSO and clears its tokens;
  its killmails stay.
The routes answer 404 unless EVE_CALLBACK_URL is set. No page and no log line ever holds a token.
"""
from __future__ import annotations

import hmac
import logging
import secrets
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlparse

import psycopg
from flask import Blueprint, Response, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

import db
from enqueue import queue_from_web
from settings import Settings, describe
from tokens import TokenKeyError, TokenVault

from . import sso
from .pilot import start_session
from .sources import Sources

log = logging.getLogger(__name__)

STATE_COOKIE = "killmail_login_state"
STATE_MAX_AGE = 600  # seconds a login may take from /login to /callback
# /login needs no password and writes a row: logins under way (within STATE_MAX_AGE) are bounded per client
# address and in all, so a flood costs a count on an index per hit and cannot fill the table or the pool.
LOGINS_PER_CLIENT = 10
LOGINS_UNDER_WAY = 10_000


class BadCallback(sso.LoginError):
    """The callback itself is wrong: SSO's error, no code, or a state that is missing, used, old or another
    browser's."""


class NotAllowed(sso.LoginError):
    """The pilot flies for a corporation and alliance outside the allow-lists."""


class DatabaseUnavailable(sso.LoginError):
    """PostgreSQL did not answer."""


# OAuth's error codes at the callback (RFC 6749, 4.1.2.1) -> what the page says; any other text is not shown.
SSO_ERRORS = {
    "access_denied": "you declined",
    "invalid_request": "it found the login request invalid (invalid_request)",
    "unauthorized_client": "it does not let this app log pilots in (unauthorized_client)",
    "unsupported_response_type": "it does not support this login (unsupported_response_type)",
    "invalid_scope": "it refused the scopes asked for (invalid_scope)",
    "server_error": "it failed (server_error)",
    "temporarily_unavailable": "it is unavailable for now (temporarily_unavailable)",
}

# What went wrong -> the page's status, in one table.
ERROR_STATUS: dict[type[sso.LoginError], int] = {
    BadCallback: 400, sso.CodeRefused: 400, sso.TokenRejected: 400, NotAllowed: 403, sso.SsoRefused: 502,
    sso.ServiceUnavailable: 503, sso.AppRejected: 503, DatabaseUnavailable: 503,
}


@dataclass(frozen=True)
class Added:
    """A login that went through: who, what was asked, and whether the first sync is queued."""

    pilot: sso.Identity
    scopes_asked: tuple[str, ...]
    new: bool
    queued: str


def allowed(settings: Settings, affiliation: dict[str, Any]) -> bool:
    """Whether a pilot of this corporation and alliance may log in (no allow-list at all: anyone)."""
    corporations, alliances = settings.login_allowed_corporations, settings.login_allowed_alliances
    if not corporations and not alliances:
        return True
    return affiliation.get("corporation_id") in corporations or affiliation.get("alliance_id") in alliances


def error_status(exc: sso.LoginError) -> int:
    """The HTTP status of a failed login or forget."""
    return next((status for kind, status in ERROR_STATUS.items() if isinstance(exc, kind)), 400)


def login_blueprint(sources: Sources) -> Blueprint:
    """The /login, /callback and /pilots/<id>/forget routes, reading settings and the database from sources."""
    blueprint = Blueprint("login", __name__)
    client = _ClientHolder(sources)

    @blueprint.before_request
    def login_enabled():
        if not sources.settings.eve_callback_url:
            return Response("adding pilots is disabled (EVE_CALLBACK_URL is not set)\n", 404, mimetype="text/plain")
        return None

    @blueprint.get("/login")
    def login():
        settings, now = sources.settings, datetime.now(UTC)
        scopes = sso.login_scopes(corporation=request.args.get("corporation", "") in ("1", "true", "yes"))
        state, (verifier, challenge) = secrets.token_urlsafe(32), sso.pkce_pair()
        client = request.remote_addr or ""
        try:
            with sources.connection() as conn:
                total, mine = db.logins_under_way(conn, client, now - timedelta(seconds=STATE_MAX_AGE))
                if mine >= LOGINS_PER_CLIENT or total >= LOGINS_UNDER_WAY:
                    return Response("too many logins under way; please try again in a few minutes\n",
                                    429 if mine >= LOGINS_PER_CLIENT else 503, mimetype="text/plain",
                                    headers={"Retry-After": str(STATE_MAX_AGE)})
                db.save_login_state(conn, state, verifier, " ".join(scopes), now, max_age=STATE_MAX_AGE,
                                    client=client)
        except psycopg.Error as exc:
            return refused(DatabaseUnavailable(f"the database did not answer ({describe(exc)[:80]})"))
        response = redirect(sso.authorize_url(settings, state=state, challenge=challenge, scopes=scopes), 302)
        callback = urlparse(settings.eve_callback_url)
        response.set_cookie(STATE_COOKIE, state, max_age=STATE_MAX_AGE, path=callback.path, httponly=True,
                            samesite="Lax", secure=callback.scheme == "https")
        return response

    @blueprint.get("/callback")
    def callback():
        try:
            added = complete_login(sources, client.get(), request.args, request.cookies.get(STATE_COOKIE))
        except sso.LoginError as exc:
            response: BaseResponse = refused(exc)
        else:
            start_session(added.pilot.character_id, welcome={
                "title": f"{added.pilot.name} was added" if added.new else f"{added.pilot.name} logged in again",
                "message": _added_message(added), "scopes_asked": list(added.scopes_asked),
                "scopes_granted": list(added.pilot.scopes), "queued": added.queued, "note": _scope_note(added)})
            response = redirect(url_for("pilot.me"), 303)
        response.delete_cookie(STATE_COOKIE, path=urlparse(sources.settings.eve_callback_url).path)
        return response

    @blueprint.post("/pilots/<int:character_id>/forget")
    def forget(character_id: int):
        if not sources.settings.status_basic_auth:  # status_app asks for the password when it is set
            return Response("forgetting pilots needs STATUS_BASIC_AUTH (an operator's password) to be set\n", 403,
                            mimetype="text/plain")
        if not same_origin(request, sources.settings.eve_callback_url):
            return Response("refused: not a request from this app's own pages (a browser sends Sec-Fetch-Site, "
                            "Origin or Referer; a script may send Origin: <this app's origin>)\n", 403,
                            mimetype="text/plain")
        try:
            message, status = forget_pilot(sources, client.get(), character_id)
        except sso.LoginError as exc:
            message, status = f"not forgotten: {exc}", error_status(exc)
        log.info("forget %s: %s", character_id, message)
        return Response(message + "\n", status, mimetype="text/plain")

    return blueprint


def same_origin(request_: Any, callback_url: str) -> bool:
    """Whether a state-changing request comes from this app's own pages, as OWASP's CSRF defence checks it: a
    browser's Sec-Fetch-Site where it sends one; else Origin, else Referer, must be the app's own origin (the
    callback URL's, which a proxy serves, or the request's own); a request with neither is refused. A browser
    attaches cached basic-auth credentials to a cross-site form post, so the password alone proves nothing."""
    site = request_.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    source = request_.headers.get("Origin") or request_.headers.get("Referer")
    if not source or source == "null":
        return False
    return _origin(source) in {_origin(callback_url), _origin(request_.host_url)}


def _origin(url: str) -> str:
    parts = urlparse(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def complete_login(sources: Sources, client: sso.SsoClient, args: Any, cookie: str | None) -> Added:
    """The callback's steps, in order; a LoginError at any step leaves `users` as it was."""
    settings, now = sources.settings, datetime.now(UTC)
    try:
        with sources.connection() as conn:
            started = take_state(conn, args, cookie, now)
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"the database did not answer ({describe(exc)[:80]})") from None
    grant = client.exchange_code(args["code"], started["code_verifier"])
    pilot = client.verify(grant.access_token)
    if sso.CHAR_SCOPE not in pilot.scopes:
        raise BadCallback(f"the grant lacks the scope {sso.CHAR_SCOPE}, without which nothing can be synced")
    if settings.login_allowed_corporations or settings.login_allowed_alliances:
        affiliation = client.affiliation(pilot.character_id)
        if not allowed(settings, affiliation):
            alliance = f", alliance {affiliation['alliance_id']}" if affiliation.get("alliance_id") else ""
            raise NotAllowed(f"{pilot.name} flies for corporation {affiliation['corporation_id']}{alliance}, "
                             "which may not add pilots here")
    try:
        with sources.connection() as conn:
            with conn.transaction():
                refresh_token = TokenVault(settings.token_keys).seal(grant.refresh_token)
                new = db.save_login(conn, pilot.character_id, pilot.name, grant.access_token, refresh_token,
                                    now + timedelta(seconds=grant.expires_in), " ".join(pilot.scopes))
            queued = queue_from_web(conn, settings, pilot.character_id, now)
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"the database did not answer ({describe(exc)[:80]})") from None
    log.info("✅ %s (%s) logged in from a browser: %s user, scopes %s", pilot.name, pilot.character_id,
             "a new" if new else "a returning", " ".join(pilot.scopes))
    return Added(pilot, tuple(started["scopes"].split()), new, queued)


def take_state(conn: db.Connection, args: Any, cookie: str | None, now: datetime) -> dict:
    """Use up the callback's state and return its row (code_verifier, scopes); BadCallback when SSO sent an
    error or no code, or the state is missing, used, too old or not this browser's."""
    state = args.get("state", "")
    row = db.take_login_state(conn, state, now, max_age=STATE_MAX_AGE) if state else None
    if args.get("error"):
        # Anyone can send a browser here with ?error= of their choosing ("Account flagged, re-verify at ..."): the
        # page says only what the code means, and the code only when it is one of OAuth's own.
        reason = SSO_ERRORS.get(args["error"], "it refused the login")
        raise BadCallback(f"EVE SSO did not log you in: {reason}. Nothing was stored")
    if not state:
        raise BadCallback("the callback came without a state; please start at the login page")
    if row is None:
        raise BadCallback("this login was already used or has expired; please start again")
    if not cookie or not hmac.compare_digest(cookie.encode(), state.encode()):
        raise BadCallback("this login was started in another browser (or the browser kept no cookie); please start "
                          "again here")
    if not args.get("code"):
        raise BadCallback("EVE SSO sent no code; please start again")
    return row


def forget_pilot(sources: Sources, client: sso.SsoClient, character_id: int) -> tuple[str, int]:
    """Revoke a pilot's grant at SSO and clear its tokens, under its lock (so no sync refreshes them meanwhile)."""
    try:
        with sources.connection() as conn:
            if not db.try_lock(conn, db.LOCK_CHARACTER, character_id):
                return f"{character_id} is being synced right now; try again in a minute", 409
            try:
                user = db.get_user(conn, character_id)
                if user is None:
                    return f"no user with character id {character_id}", 404
                not_revoked = revoke_grant(client, TokenVault(sources.settings.token_keys), user)
                db.forget_tokens(conn, character_id)
            finally:
                db.unlock(conn, db.LOCK_CHARACTER, character_id)
    except psycopg.Error as exc:
        raise DatabaseUnavailable(f"the database did not answer ({describe(exc)[:80]})") from None
    name = user["character_name"] or character_id
    if not_revoked:
        return f"forgot {name} ({character_id}): its tokens are cleared, but its grant was not revoked at EVE SSO " \
               f"({not_revoked}; the pilot can revoke it in its EVE account); its killmails stay", 200
    return f"forgot {name} ({character_id}): its grant is revoked at EVE SSO and its tokens are cleared; its " \
           "killmails stay", 200


def revoke_grant(client: sso.SsoClient, vault: TokenVault, user: dict) -> str | None:
    """Revoke a user's refresh token at SSO; why not when its stored value cannot be opened, else None."""
    try:
        refresh_token = vault.open(user["refresh_token"])
    except TokenKeyError as exc:  # the operator asked to forget the pilot: a key it lacks must not stop that
        log.warning("forget %s: %s; its grant is not revoked at EVE SSO", user["character_id"], exc)
        return str(exc)
    if refresh_token:
        client.revoke(refresh_token)
    return None


def refused(exc: sso.LoginError) -> Response:
    """The plain page of a login that did not go through."""
    status = error_status(exc)
    log.info("login refused (%s): %s", status, exc)
    page = render_template("login.html", outcome="refused", title="The pilot was not added", message=f"{exc}.",
                           note=None, status_url=url_for("status"), login_url=url_for("login.login"))
    return Response(page, status)


def _added_message(added: Added) -> str:
    if added.new:
        return f"{added.pilot.name} is now a user: its kills and losses are synced from now on."
    return f"{added.pilot.name}'s new grant replaces its old one; its kills and losses are synced again."


def _scope_note(added: Added) -> str | None:
    missing = [s for s in added.scopes_asked if s not in added.pilot.scopes]
    return f"EVE SSO did not grant {', '.join(missing)}." if missing else None


class _ClientHolder:
    """One SsoClient per process, made at its first use (after gunicorn's fork) and kept: it caches SSO's keys."""

    def __init__(self, sources: Sources):
        self._sources = sources
        self._client: sso.SsoClient | None = None
        self._lock = threading.Lock()

    def get(self) -> sso.SsoClient:
        with self._lock:
            if self._client is None:
                self._client = sso.SsoClient(self._sources.settings)
            return self._client

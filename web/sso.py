"""EVE SSO's authorization code flow, for adding pilots from a browser (login.py serves the pages).

PKCE and the authorize URL; the code exchange; the access token verified against SSO's published keys (its
JWKS, fetched and cached); revocation; and ESI's public affiliation route, which says whom a pilot flies for.
The HTTP goes through one requests Session per process (esi.new_session: the app's User-Agent, proxies and CA
bundle); the JWT and key work is PyJWT's. Every failure is a LoginError subclass whose message is fit for the
pilot's page: it never holds a token or a secret.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import jwt
import requests

from db import CORPORATION_SCOPE
from esi import TokenGrant, new_session
from settings import Settings

log = logging.getLogger(__name__)

CHAR_SCOPE = "esi-killmails.read_killmails.v1"
LOGIN_SCOPES = ("publicData", CHAR_SCOPE)
ISSUERS = ("login.eveonline.com", "https://login.eveonline.com")
AUDIENCE = "EVE Online"      # besides the app's client id, as CCP's own validation advice asks
CHARACTER_SUB = re.compile(r"CHARACTER:EVE:(\d+)")
# Keys of these algorithms only: a JWKS entry that would verify with a shared secret (or none) is never used.
ASYMMETRIC = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"})
JWKS_TTL = 3600.0            # seconds the key set is used before it is fetched again
JWKS_REFETCH_AFTER = 60.0    # a token naming an unknown key fetches the set again (SSO rotated it), this rarely
LEEWAY_SECONDS = 30          # clock skew allowed on exp between this host and SSO
LOGIN_TIMEOUT_SECONDS = 10.0  # a person waits for the page: no single call may take longer


class LoginError(Exception):
    """A login (or a forget) cannot go on; the message says why, in words for the page."""


class ServiceUnavailable(LoginError):
    """SSO, its key set or ESI could not be reached or answered with an error of its own (5xx, 420, 429)."""


class AppRejected(LoginError):
    """SSO refused the app's own credentials (invalid_client): EVE_CLIENT_ID / EVE_CLIENT_SECRET are wrong."""


class CodeRefused(LoginError):
    """SSO refused the authorization code: unknown, used, expired, or its PKCE verifier does not match."""


class TokenRejected(LoginError):
    """The access token failed verification: not a JWT, an unknown key, a bad signature, issuer, audience,
    expiry or subject."""


class SsoRefused(LoginError):
    """SSO refused a request that is not a code exchange (a revocation), with a 4xx of its own."""


@dataclass(frozen=True)
class Identity:
    """Who logged in, from a verified access token."""

    character_id: int
    name: str
    scopes: tuple[str, ...]


def pkce_pair() -> tuple[str, str]:
    """A fresh PKCE code verifier and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(64)
    return verifier, code_challenge(verifier)


def code_challenge(verifier: str) -> str:
    """The S256 challenge of a code verifier: base64url(sha256(verifier)) without padding."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


def login_scopes(*, corporation: bool) -> tuple[str, ...]:
    """The scopes a login asks for: the pilot's own killmails, and its corporation's when asked."""
    return LOGIN_SCOPES + ((CORPORATION_SCOPE,) if corporation else ())


def authorize_url(settings: Settings, *, state: str, challenge: str, scopes: tuple[str, ...]) -> str:
    """Where to send the browser: SSO's authorize endpoint with the app, the callback, the scopes, the state and
    the PKCE challenge."""
    query = urlencode({"response_type": "code", "redirect_uri": settings.eve_callback_url,
                       "client_id": settings.eve_client_id, "scope": " ".join(scopes), "state": state,
                       "code_challenge": challenge, "code_challenge_method": "S256"})
    return f"{settings.sso_authorize_url}?{query}"


def scopes_of(claims: dict[str, Any]) -> tuple[str, ...]:
    """The `scp` claim as a tuple: SSO sends a string for one scope and a list for several."""
    scopes = claims.get("scp", [])
    if isinstance(scopes, str):
        return (scopes,)
    return tuple(s for s in scopes if isinstance(s, str)) if isinstance(scopes, list) else ()


class KeySet:
    """SSO's signing keys by kid, fetched on first use and again after JWKS_TTL, or sooner (at most every
    JWKS_REFETCH_AFTER seconds) when a token names a key the set lacks. Safe to share between threads."""

    def __init__(self, fetch: Callable[[], Any], *, clock: Callable[[], float] = time.monotonic):
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, jwt.PyJWK] | None = None
        self._fetched_at = 0.0

    def key(self, kid: str) -> jwt.PyJWK:
        """The key with this kid; TokenRejected when SSO does not publish it, ServiceUnavailable when the set
        cannot be had."""
        with self._lock:
            age = self._clock() - self._fetched_at
            if self._keys is None or age > JWKS_TTL or (kid not in self._keys and age > JWKS_REFETCH_AFTER):
                self._load()
            assert self._keys is not None
            if kid not in self._keys:
                raise TokenRejected("the access token is signed by a key EVE SSO does not publish")
            return self._keys[kid]

    def _load(self) -> None:
        try:
            data = self._fetch()
            keys = jwt.PyJWKSet.from_dict(data).keys if isinstance(data, dict) else []
        except ServiceUnavailable:
            if self._keys is None:
                raise
            log.warning("EVE SSO's key set could not be fetched again; using the keys fetched before")
            return
        except jwt.PyJWTError as exc:
            raise ServiceUnavailable("EVE SSO's key set holds no usable key") from exc
        self._keys = {k.key_id: k for k in keys if k.key_id and k.algorithm_name in ASYMMETRIC}
        self._fetched_at = self._clock()


class SsoClient:
    """The login's calls to SSO and ESI for one process; safe to share between its threads."""

    def __init__(self, settings: Settings, *, session: requests.Session | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.session = session or new_session(settings)
        self.keys = KeySet(self._fetch_jwks, clock=clock)
        self.timeout = min(settings.http_timeout_seconds, LOGIN_TIMEOUT_SECONDS)

    def exchange_code(self, code: str, code_verifier: str) -> TokenGrant:
        """Trade an authorization code (and its PKCE verifier) for the pilot's access and refresh tokens."""
        response = self._post_sso(self.settings.sso_token_url, {
            "grant_type": "authorization_code", "code": code, "code_verifier": code_verifier})
        if response.status_code != 200:
            error = _error_code(response)
            raise CodeRefused(f"EVE SSO refused the login code ({error or response.status_code}); please log in "
                              "again")
        try:
            body = response.json()
            return TokenGrant(str(body["access_token"]), str(body["refresh_token"]), int(body["expires_in"]))
        except (ValueError, KeyError, TypeError):
            raise ServiceUnavailable("EVE SSO answered the code exchange without the tokens") from None

    def verify(self, access_token: str) -> Identity:
        """Who the access token names, once its signature, issuer, audience and expiry check out."""
        try:
            kid = jwt.get_unverified_header(access_token).get("kid")
        except jwt.PyJWTError:
            raise TokenRejected("the access token is not a signed JWT") from None
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("the access token names no signing key")
        key = self.keys.key(kid)
        try:
            claims = jwt.decode(access_token, key.key, algorithms=[key.algorithm_name],
                                audience=self.settings.eve_client_id, issuer=ISSUERS, leeway=LEEWAY_SECONDS,
                                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"the access token is not valid: {_claim_problem(exc)}") from None
        audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
        if AUDIENCE not in audiences:
            raise TokenRejected(f"the access token is not valid: its audience lacks {AUDIENCE!r}")
        found = CHARACTER_SUB.fullmatch(str(claims["sub"]))
        if not found:
            raise TokenRejected("the access token names no character")
        return Identity(int(found.group(1)), str(claims.get("name") or found.group(1)), scopes_of(claims))

    def revoke(self, refresh_token: str) -> None:
        """Revoke a pilot's grant at SSO by its refresh token."""
        response = self._post_sso(self.settings.sso_revoke_url, {"token_type_hint": "refresh_token",
                                                                   "token": refresh_token})
        if response.status_code != 200:
            raise SsoRefused(f"EVE SSO refused to revoke the grant ({_error_code(response) or response.status_code})")

    def affiliation(self, character_id: int) -> dict[str, int | None]:
        """The pilot's corporation_id and alliance_id (None when in none), from ESI's public affiliation route."""
        url = f"{self.settings.esi_base_url}/characters/affiliation/"
        response = self._send("POST", url, "ESI", json=[character_id],
                              headers={"X-Compatibility-Date": self.settings.esi_compatibility_date})
        if response.status_code in (420, 429):
            raise ServiceUnavailable(f"ESI is limiting calls just now ({response.status_code}); please try again in "
                                     "a minute")
        try:
            entry = next(e for e in response.json() if e.get("character_id") == character_id) \
                if response.status_code == 200 else None
        except (ValueError, AttributeError, TypeError, StopIteration):
            entry = None
        if not isinstance(entry, dict) or not isinstance(entry.get("corporation_id"), int):
            raise ServiceUnavailable(f"ESI did not say whom character {character_id} flies for "
                                     f"({response.status_code})")
        return {"corporation_id": entry["corporation_id"], "alliance_id": entry.get("alliance_id")}

    # ---------------------------------------------------------------------------------------------- transport

    def _fetch_jwks(self) -> Any:
        response = self._send("GET", self.settings.sso_jwks_url, "EVE SSO's key set")
        try:
            return response.json() if response.status_code == 200 else None
        except ValueError:
            return None

    def _post_sso(self, url: str, form: dict[str, str]) -> requests.Response:
        credentials = f"{self.settings.eve_client_id}:{self.settings.eve_client_secret}".encode()
        response = self._send("POST", url, "EVE SSO", data=form, headers={
            "Authorization": "Basic " + base64.b64encode(credentials).decode(),
            "Content-Type": "application/x-www-form-urlencoded"})
        if response.status_code == 401 or _error_code(response) == "invalid_client":
            log.error("❌ EVE SSO rejected EVE_CLIENT_ID / EVE_CLIENT_SECRET (invalid_client) at %s", url)
            raise AppRejected("EVE SSO rejected this application's credentials; the operator must fix "
                              "EVE_CLIENT_ID and EVE_CLIENT_SECRET")
        return response

    def _send(self, method: str, url: str, what: str, **kwargs: Any) -> requests.Response:
        """One call, with SSO and ESI failures of their own turned into ServiceUnavailable."""
        try:
            response = self.session.request(method, url, timeout=self.timeout, allow_redirects=False, **kwargs)
        except requests.RequestException as exc:
            log.warning("%s could not be reached: %s", what, type(exc).__name__)
            raise ServiceUnavailable(f"{what} could not be reached ({type(exc).__name__}); please try again "
                                     "later") from exc
        if response.status_code >= 500 or response.is_redirect:
            log.warning("%s answered %s to %s %s", what, response.status_code, method, url.split("?")[0])
            raise ServiceUnavailable(f"{what} answered {response.status_code}; please try again later")
        return response


def _error_code(response: requests.Response) -> str | None:
    """OAuth's `error` field of an answer, if it has one (its description may quote what was sent: not kept)."""
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return str(error)[:60] if error else None


def _claim_problem(exc: jwt.PyJWTError) -> str:
    """What a verification error means, in words for the page."""
    problems = [(jwt.ExpiredSignatureError, "it has expired"),
                (jwt.InvalidSignatureError, "its signature does not match EVE SSO's key"),
                (jwt.InvalidIssuerError, "it was not issued by EVE SSO"),
                (jwt.InvalidAudienceError, "it was not issued to this application"),
                (jwt.InvalidAlgorithmError, "it is signed with an algorithm its key does not use"),
                (jwt.MissingRequiredClaimError, f"it lacks a claim ({getattr(exc, 'claim', '?')})")]
    return next((words for kind, words in problems if isinstance(exc, kind)), type(exc).__name__)

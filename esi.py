"""ESI and EVE SSO over HTTPS: one Session per process, typed outcomes, shared limits on every call."""
from __future__ import annotations

import base64
import io
import json
import logging
import random
import re
import reprlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from backoff import exponential, pause_seconds
from settings import Settings

log = logging.getLogger(__name__)

MAX_PAGES = 100         # 90 days of kills at 1000 a page; a wilder X-Pages is a broken answer, not a loop
MAX_WALK_RESTARTS = 3   # the cache turned over mid-walk this many times: give up for this run
SERVER_RETRIES = 3      # 5xx and timeouts are retried this often inside one call
SSO_BUCKET = "sso"      # the token endpoint's shared pause (its own 429s, or the app's rejected credentials)
INVALID_CLIENT_PAUSE = 600.0  # seconds no process calls SSO after invalid_client: the config must be fixed first
INT64_MAX = 2 ** 63 - 1
_HASH = re.compile(r"[0-9a-fA-F]{40}")  # a killmail hash: a SHA-1 in hexadecimal
# RFC 6750's b64token, what an Authorization header can carry: anything else (a newline, a non-Latin-1 character)
# makes http.client refuse the header with its whole value, the token, in the exception's message.
_BEARER = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MIN_TOKEN_LIFETIME = 1       # seconds an access token may live, as SSO's expires_in says (20 minutes in practice)
MAX_TOKEN_LIFETIME = 86400
MAX_BODY_BYTES = 32 * 1024 * 1024  # decompressed; a list page is ~100 kB, the biggest fights' details a few MB
REQUEST_DEADLINE = 120.0  # seconds for a whole call, retries and all: a trickling answer must not hold a lock
READ_CHUNK = 64 * 1024  # bytes read (and decompressed) at a time


class EsiError(Exception):
    """An ESI or SSO call did not give what was asked for."""

    status: int | None = None

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class NotModified(EsiError):
    """304: the list is unchanged since the ETag we sent."""

    status = 304

    def __init__(self, message: str = "not modified", *, expires_in: float | None = None):
        super().__init__(message)
        self.expires_in = expires_in


class BadRequest(EsiError):
    """A 4xx with no class of its own."""


class Unauthorized(EsiError):
    """401: no or an unusable access token."""

    status = 401


class Forbidden(EsiError):
    """403: the token lacks the scope or the character the role (a corporation list without Director)."""

    status = 403


class NotFound(EsiError):
    """404: no such thing."""

    status = 404


class InvalidHash(EsiError):
    """422: the killmail id and hash do not belong together."""

    status = 422


class ErrorLimited(EsiError):
    """420: the error limit is spent; every route refuses until the window resets."""

    status = 420

    def __init__(self, message: str, *, reset: float):
        super().__init__(message)
        self.reset = reset


class RateLimited(EsiError):
    """429: the route group's token bucket is empty."""

    status = 429

    def __init__(self, message: str, *, group: str, retry_after: float):
        super().__init__(message)
        self.group = group
        self.retry_after = retry_after


class ServerError(EsiError):
    """5xx, a timeout or a broken connection, after the retries."""


class MalformedResponse(EsiError):
    """A 2xx whose body is not what the spec says."""


class Paused(EsiError):
    """The shared limits say this bucket may not be called before `until`, too long to wait inline."""

    def __init__(self, message: str, *, bucket: str, until: datetime):
        super().__init__(message)
        self.bucket = bucket
        self.until = until


class Deferred(Paused):
    """A backlog detail (listed long ago, or in a pilot's first sync) that would wait long for ESI's detail bucket:
    left for a later sync, so that fresh killmails keep their share of the bucket and the job its process."""


class SsoError(EsiError):
    """EVE SSO refused or failed a token refresh."""


class InvalidGrant(SsoError):
    """The refresh token is dead for good (revoked, expired, character transferred): the user must log in."""


class InvalidClient(SsoError):
    """The app's client id or secret is wrong: a configuration error of the whole app."""


# Status code -> outcome, in one table; everything >= 500 is a ServerError, any other 4xx a BadRequest.
STATUS_ERRORS: dict[int, type[EsiError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    422: InvalidHash,
}


class Limits(Protocol):
    """Shared rate and error limit state (limits.SharedLimits); the client takes before and settles after every
    request."""

    def take(self, bucket: str, *, backlog: bool = False) -> Any: ...

    def settle(self, ticket: Any, status: int, headers: Any) -> None: ...

    def pause(self, bucket: str, seconds: float, *, status: int) -> None: ...

    def owner_take(self, bucket: str) -> Any: ...

    def prepaid(self, owner: Any, lease_id: int, calls: int) -> None: ...

    def job_bookings(self) -> Any: ...


class NoLimits:
    """Limits that never wait: for unit tests and one-off scripts."""

    def owner_take(self, bucket: str) -> None:
        """Nothing for a job's statements to take."""

    def prepaid(self, owner: Any, lease_id: int, calls: int) -> None:
        """Never called: owner_take takes nothing."""

    def job_bookings(self) -> None:
        """Nothing for a job's outcome to book."""

    def take(self, bucket: str, *, backlog: bool = False) -> None:
        """Never wait."""

    def settle(self, ticket: Any, status: int, headers: Any) -> None:
        """Remember nothing."""

    def pause(self, bucket: str, seconds: float, *, status: int) -> None:
        """Remember nothing."""


@dataclass(frozen=True)
class TokenGrant:
    """A refreshed access token and the rotated refresh token that replaces the old one."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_in: int


@dataclass(frozen=True)
class KillmailList:
    """Every page of a recent-killmails list: (id, hash) pairs, the first page's ETag and the cache lifetime."""

    refs: list[tuple[int, str]]
    etag: str | None
    expires_in: float | None
    pages: int


@dataclass(frozen=True)
class MarketPrices:
    """GET /markets/prices/: its entries (None when unchanged since `etag`), ETag and seconds until it expires."""

    prices: list[dict] | None
    etag: str | None
    expires_in: float | None


NAMES_BATCH = 1000  # ESI's most ids per POST /universe/names/
NAMES_REFUSALS = 20  # 404s one resolve_names takes at most: each costs the error limit; the rest wait a later job


def parse_http_date(value: str | None) -> datetime | None:
    """An HTTP date header as an aware datetime, or None when absent or unreadable."""
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def cache_lifetime(headers: Any) -> float | None:
    """Seconds until the response's Expires, measured on the server's own clock (Expires - Date)."""
    expires = parse_http_date(headers.get("Expires"))
    if expires is None:
        return None
    date = parse_http_date(headers.get("Date")) or datetime.now(UTC)
    return max(0.0, (expires - date).total_seconds())


def parse_pages(value: str | None) -> int:
    """X-Pages as a page count from 1 to MAX_PAGES; absent, zero, negative or junk means one page."""
    try:
        pages = int(value) if value is not None else 1
    except ValueError:
        return 1
    return min(max(pages, 1), MAX_PAGES)


def parse_refs(body: Any, *, where: str = "killmail list") -> list[tuple[int, str]]:
    """The (killmail_id, killmail_hash) pairs of a list page (`where` names it in the log); an entry that cannot
    be a killmail reference (an id no positive int64, a hash not 40 hexadecimal characters) is skipped."""
    if not isinstance(body, list):
        raise MalformedResponse(f"{where}: expected a list, got {type(body).__name__}")
    refs = []
    for entry in body:
        ref = _ref(entry)
        if ref is None:
            # Cut short in depth too: the full repr of a deeply nested entry is a RecursionError, which logging
            # lets through.
            log.warning("%s: skipping an entry that is no killmail reference: %s", where, reprlib.repr(entry))
        else:
            refs.append(ref)
    return refs


def _ref(entry: Any) -> tuple[int, str] | None:
    """One list entry as (id, hash), or None. The bounds matter: one id beyond int64 would fail the whole page's
    insert, and the hash goes into a URL path."""
    if not isinstance(entry, dict):
        return None
    killmail_id, killmail_hash = entry.get("killmail_id"), entry.get("killmail_hash")
    if isinstance(killmail_id, bool) or not isinstance(killmail_id, int) or not 0 < killmail_id <= INT64_MAX:
        return None
    if not isinstance(killmail_hash, str) or not _HASH.fullmatch(killmail_hash):
        return None
    return killmail_id, killmail_hash


def parse_grant(body: Any, refresh_token: str) -> TokenGrant:
    """SSO's 200 answer as a grant; SsoError (never InvalidGrant: the pilot's grant is not written off) when it
    is not one. A missing or null refresh token means SSO did not rotate it: the old one stays."""
    if not isinstance(body, dict):
        raise SsoError("SSO answered 200 without a JSON object")
    access_token, new_refresh = body.get("access_token"), body.get("refresh_token")
    expires_in = body.get("expires_in")
    if not isinstance(access_token, str) or not access_token:
        raise SsoError("SSO answered 200 without an access_token")
    if not is_bearer_token(access_token):
        raise SsoError("SSO answered 200 with an access_token that no header can carry")
    if new_refresh is None:
        new_refresh = refresh_token
    elif not isinstance(new_refresh, str) or not new_refresh:
        raise SsoError("SSO answered 200 with a refresh_token that is no token")
    # Infinity or a huge lifetime would overflow the expiry; zero or less would refresh on every call.
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) \
            or not MIN_TOKEN_LIFETIME <= expires_in <= MAX_TOKEN_LIFETIME:
        raise SsoError(f"SSO answered 200 with an expires_in out of range: {str(expires_in)[:40]}")
    return TokenGrant(access_token, new_refresh, int(expires_in))


def is_bearer_token(token: str) -> bool:
    """Whether a token can go in an Authorization header as it is (RFC 6750's characters)."""
    return _BEARER.fullmatch(token) is not None


def token_scopes(access_token: str | None) -> list[str]:
    """The `scp` claim of an SSO access token (a JWT), unverified: the worker got it from SSO itself."""
    if access_token is None:
        return []
    try:
        payload = access_token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (AttributeError, IndexError, ValueError):
        return []
    scopes = claims.get("scp", []) if isinstance(claims, dict) else []
    if isinstance(scopes, str):
        return [scopes]
    return [s for s in scopes if isinstance(s, str)] if isinstance(scopes, list) else []


class EsiClient:
    """ESI and SSO calls for one process; safe to share between the threads of one job."""

    def __init__(self, settings: Settings, *, limits: Limits | None = None, session: requests.Session | None = None,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None,
                 progress: Callable[[], None] | None = None):
        self.settings = settings
        self.progress = progress or (lambda: None)  # told of every answer (a worker's heartbeat of progress)
        self.limits = limits or NoLimits()
        self.session = session or new_session(settings)
        self.sleep = sleep
        self.rng = rng or random.Random()
        self._lock = threading.Lock()
        self.calls: Counter[tuple[str, int]] = Counter()  # (route group, status) -> responses, for sync_runs
        self._detail_pool: ThreadPoolExecutor | None = None

    def detail_pool(self) -> ThreadPoolExecutor:
        """The DETAIL_CONCURRENCY threads that fetch killmail details on this client's Session, started on first
        use and kept for the process's life: a routine job makes few calls, and starting threads for each would
        cost more than its calls do."""
        with self._lock:
            if self._detail_pool is None:
                self._detail_pool = ThreadPoolExecutor(max_workers=self.settings.detail_concurrency,
                                                       thread_name_prefix="detail")
            return self._detail_pool

    def take_calls(self) -> Counter:
        """Return the calls counted since the last take and start counting afresh."""
        with self._lock:
            calls, self.calls = self.calls, Counter()
        return calls

    def list_recent(self, *, character_id: int, token: str, etag: str | None = None,
                    corporation_id: int | None = None) -> KillmailList:
        """Walk every page of a character's (or, with corporation_id, its corporation's) recent killmails.

        Raises NotModified when the first page still has our ETag. If Last-Modified differs between pages, or a
        later page is gone (404: the list shrank), the cache turned over mid-walk, so the walk starts again.
        """
        if corporation_id is None:
            path, group = f"/characters/{character_id}/killmails/recent/", "char-killmail"
        else:
            path, group = f"/corporations/{corporation_id}/killmails/recent/", "corp-killmail"
        bucket = list_bucket(group, character_id)
        for _ in range(MAX_WALK_RESTARTS):
            first = self._get(path, group=group, bucket=bucket, token=token, etag=etag, params={"page": 1})
            pages = parse_pages(first.headers.get("X-Pages"))
            last_modified = first.headers.get("Last-Modified")
            refs = parse_refs(_json(first), where=f"{path} page 1")
            expires_in = cache_lifetime(first.headers)
            turned_over = False
            for page in range(2, pages + 1):
                try:
                    response = self._get(path, group=group, bucket=bucket, token=token, params={"page": page})
                except NotFound:  # the list shrank below this page since page 1: the cache turned over
                    turned_over = True
                    break
                if response.headers.get("Last-Modified") != last_modified:
                    turned_over = True
                    break
                refs.extend(parse_refs(_json(response), where=f"{path} page {page}"))
                lifetime = cache_lifetime(response.headers)
                if lifetime is not None:
                    expires_in = lifetime if expires_in is None else min(expires_in, lifetime)
            if not turned_over:
                unique = list(dict.fromkeys(refs))
                return KillmailList(unique, first.headers.get("ETag"), expires_in, pages)
            log.info("list of %s changed while paging; walking it again", character_id)
            etag = None
        raise ServerError(f"list of {character_id} kept changing while paging")

    def get_killmail(self, killmail_id: int, killmail_hash: str, *, backlog: bool = False) -> tuple[dict, str]:
        """One killmail: the decoded body (the caller validates it) and its JSON text as ESI sent it. A backlog
        detail spends only its share of the detail bucket, and raises Deferred rather than wait long for it."""
        # The detail bucket is per source IP: workers behind one IP share it, so they share its pacing.
        bucket = f"killmail@{self.settings.esi_egress}" if self.settings.esi_egress else "killmail"
        path = f"/killmails/{killmail_id}/{quote(killmail_hash, safe='')}/"  # a hash is ESI's text: quoted
        response = self._get(path, group="killmail", bucket=bucket, backlog=backlog)
        try:
            raw = response.content.decode("utf-8")  # JSON is UTF-8 (RFC 8259); ESI says so too
            body = json.loads(raw)
        except ValueError as exc:  # not UTF-8, or not JSON
            raise MalformedResponse(f"killmail {killmail_id}: body is not UTF-8 JSON") from exc
        except RecursionError:  # nested deeper than the decoder goes: no killmail is
            raise MalformedResponse(f"killmail {killmail_id}: body is nested too deep") from None
        if not isinstance(body, dict):
            raise MalformedResponse(f"killmail {killmail_id}: expected an object, got {type(body).__name__}")
        return body, raw

    def get_character(self, character_id: int) -> dict:
        """A pilot's public record (name, corporation_id, alliance_id)."""
        response = self._get(f"/characters/{character_id}/", group="character", bucket="character")
        body = _json(response)
        if not isinstance(body, dict):
            raise MalformedResponse(f"character {character_id}: expected an object")
        return body

    def get_market_prices(self, *, etag: str | None = None) -> MarketPrices:
        """Every type's average and adjusted price (public, cached by ESI for hours)."""
        try:
            response = self._get("/markets/prices/", group="market", bucket="market", etag=etag)
        except NotModified as exc:
            return MarketPrices(None, etag, exc.expires_in)
        body = _json(response)
        if not isinstance(body, list):
            raise MalformedResponse("/markets/prices/: expected a list")
        prices = [p for p in body if isinstance(p, dict) and type(p.get("type_id")) is int
                  and all(isinstance(p.get(k), (int, float, type(None))) for k in ("average_price", "adjusted_price"))]
        return MarketPrices(prices, response.headers.get("ETag"), cache_lifetime(response.headers))

    def resolve_names(self, ids: Iterable[int]) -> tuple[list[dict], list[int]]:
        """Names of ids (POST /universe/names/, in batches of NAMES_BATCH): ESI's entries (id, category, name),
        and the ids ESI could not resolve.

        ESI refuses a whole batch with 404 when any id in it is unknown: such a batch is split in halves until
        the unknown ids stand alone, so no batch that was refused is ever sent again; after NAMES_REFUSALS 404s
        (each costs the error limit) the ids not tried yet are left for a later call, in neither list."""
        wanted = sorted(set(ids))
        names: list[dict] = []
        unknown: list[int] = []
        todo = [wanted[i:i + NAMES_BATCH] for i in range(0, len(wanted), NAMES_BATCH)]
        refusals = 0
        while todo and refusals < NAMES_REFUSALS:
            batch = todo.pop()
            try:
                names.extend(self._post_names(batch))
            except NotFound:
                refusals += 1
                if len(batch) == 1:
                    unknown.extend(batch)
                else:
                    half = len(batch) // 2
                    todo.extend([batch[half:], batch[:half]])
        return names, unknown

    def _post_names(self, batch: list[int]) -> list[dict]:
        response = self._send("POST", self.settings.esi_base_url + "/universe/names/", group="universe",
                              bucket="universe", headers={"X-Compatibility-Date":
                                                          self.settings.esi_compatibility_date}, json_body=batch)
        _raise_for_status(response, "POST /universe/names/", "universe")
        body = _json(response)
        if not isinstance(body, list):
            raise MalformedResponse("/universe/names/: expected a list")
        return [n for n in body if isinstance(n, dict) and type(n.get("id")) is int and isinstance(n.get("name"), str)]

    def get_constellation_of(self, system_id: int) -> int:
        """The constellation a system is in (GET /universe/systems/{id}/, public, cached by ESI for a day)."""
        return self._universe_field(f"/universe/systems/{system_id}/", "constellation_id")

    def get_region_of(self, constellation_id: int) -> int:
        """The region a constellation is in (GET /universe/constellations/{id}/, public, cached for a day)."""
        return self._universe_field(f"/universe/constellations/{constellation_id}/", "region_id")

    def _universe_field(self, path: str, key: str) -> int:
        body = _json(self._get(path, group="universe", bucket="universe"))
        value = body.get(key) if isinstance(body, dict) else None
        if type(value) is not int:
            raise MalformedResponse(f"{path}: expected an object with an integer {key}")
        return value

    def refresh(self, refresh_token: str) -> TokenGrant:
        """Trade a refresh token for a new access token and the new refresh token that replaces it."""
        credentials = f"{self.settings.eve_client_id}:{self.settings.eve_client_secret}".encode()
        headers = {"Authorization": "Basic " + base64.b64encode(credentials).decode(),
                   "Content-Type": "application/x-www-form-urlencoded"}
        response = self._send("POST", self.settings.sso_token_url, group="sso", bucket=SSO_BUCKET, headers=headers,
                              data={"grant_type": "refresh_token", "refresh_token": refresh_token})
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.is_redirect:
            raise SsoError(f"SSO answered {response.status_code}: redirected to {response.headers['Location']}; set "
                           "SSO_TOKEN_URL to match", status=response.status_code)
        if response.status_code == 200:
            return parse_grant(body, refresh_token)
        error = body.get("error") if isinstance(body, dict) else None
        if error == "invalid_grant":  # its description is kept on the user and shown: bounded, one line
            raise InvalidGrant(f"invalid_grant: {_one_line(body.get('error_description', 'grant is gone'))}",
                               status=response.status_code)
        if error == "invalid_client" or response.status_code == 401:
            # The whole app's credentials are wrong: every process stops asking until someone fixes them.
            log.error("❌ SSO rejected EVE_CLIENT_ID / EVE_CLIENT_SECRET (invalid_client): no token refresh by "
                      "any worker for %.0f s", INVALID_CLIENT_PAUSE)
            self.limits.pause(SSO_BUCKET, INVALID_CLIENT_PAUSE, status=response.status_code)
            raise InvalidClient("SSO rejected EVE_CLIENT_ID / EVE_CLIENT_SECRET (invalid_client)",
                                status=response.status_code)
        raise SsoError(f"SSO answered {response.status_code}: {_one_line(error or 'no error code')}",
                       status=response.status_code)

    # ---------------------------------------------------------------------------------------------- transport

    def _get(self, path: str, *, group: str, bucket: str, token: str | None = None, etag: str | None = None,
             params: dict | None = None, backlog: bool = False) -> requests.Response:
        headers = {"X-Compatibility-Date": self.settings.esi_compatibility_date}
        if token:
            if not is_bearer_token(token):  # never sent, never quoted: a refresh replaces it
                raise Unauthorized(f"GET {path}: the stored access token has characters no header can carry")
            headers["Authorization"] = f"Bearer {token}"
        if etag:
            headers["If-None-Match"] = etag
        response = self._send("GET", self.settings.esi_base_url + path, group=group, bucket=bucket,
                              headers=headers, params=params, backlog=backlog)
        status = response.status_code
        if status == 200:
            return response
        if status == 304:
            raise NotModified(expires_in=cache_lifetime(response.headers))
        if response.is_redirect:  # ESI's routes do not move: the base URL is off (http for https, an old host)
            raise BadRequest(f"GET {path} -> {status}: redirected to {response.headers['Location']}; set "
                             "ESI_BASE_URL to match", status=status)
        _raise_for_status(response, f"GET {path}", group)
        raise AssertionError("unreachable")

    def _send(self, method: str, url: str, *, group: str, bucket: str, backlog: bool = False,
              **kwargs: Any) -> requests.Response:
        """Send with the shared limits around it; 5xx and timeouts are retried with backoff and jitter."""
        # One deadline for the whole call, retries included: per-read timeouts alone let an answer that trickles
        # (or never ends) hold the job, and the pilot's lock, for ever.
        deadline = time.monotonic() + REQUEST_DEADLINE
        for attempt in range(1, SERVER_RETRIES + 1):
            request = self._prepare(method, url, **kwargs)
            asked = time.monotonic()
            ticket = self.limits.take(bucket, backlog=backlog) if backlog else self.limits.take(bucket)
            # Waiting for ESI's limits (a spent bucket's tokens come back a window later) is no part of the
            # answer's time: an answer paid for must not be thrown away for the wait before it was sent.
            deadline += time.monotonic() - asked
            try:
                # Straight to the transport adapter: Session.send would look for cookies to store, redirects to
                # follow and hooks to run, none of which ESI or SSO use (ESI routes do not redirect).
                timeout = max(0.1, min(self.settings.http_timeout_seconds, deadline - time.monotonic()))
                # requests' stubs allow None for both: _prepare sets every URL, new_session leaves verify set.
                response = self.session.get_adapter(request.url).send(  # type: ignore[arg-type]
                    request, timeout=timeout, proxies=self.session.proxies,
                    verify=self.session.verify, cert=self.session.cert)  # type: ignore[arg-type]
                # Read the whole answer now, as Session.send does: only then does the connection go back to the
                # pool. A 304 or an error answer nobody reads would leave it out, and the next call would open
                # (over TLS, handshake and all) a new one.
                read_body(response, deadline=deadline, what=f"{method} {url.split('?')[0]}")
            # A timeout, a refused or reset connection, or one that broke while the body was read: retried.
            except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                self._count(group, 0)
                self.limits.settle(ticket, 0, {})  # a timeout counts against the error limit too
                if attempt == SERVER_RETRIES or time.monotonic() >= deadline:
                    raise ServerError(f"{method} {url.split('?')[0]}: {type(exc).__name__}") from exc
            except BaseException:
                self.limits.settle(ticket, 0, {})  # whatever broke, the call may have reached ESI
                raise
            else:
                self._count(group, response.status_code)
                self.limits.settle(ticket, response.status_code, response.headers)
                self.progress()
                if response.status_code < 500 or attempt == SERVER_RETRIES:
                    return response
            self.sleep(backoff_seconds(attempt, base=0.5, cap=8.0, rng=self.rng))
        raise AssertionError("unreachable")

    def _prepare(self, method: str, url: str, *, headers: dict, params: dict | None = None,
                 data: dict | None = None, json_body: Any = None) -> requests.PreparedRequest:
        """The request with the session's headers. A GET's URL is made here from the configured base URL and
        quoted parts, so it is built as it is: PreparedRequest.prepare would parse and quote it again and look
        for cookies and auth the client never uses. The SSO POST (a form body) is prepared by requests."""
        prepared = requests.PreparedRequest()
        headers = {**self.session.headers, **headers}
        if method != "GET" or data is not None or json_body is not None:
            prepared.prepare(method=method, url=url, headers=headers, params=params, data=data, json=json_body)
        else:
            prepared.method = method
            prepared.url = f"{url}?{urlencode(params)}" if params else url
            prepared.headers = CaseInsensitiveDict(headers)
        return prepared

    def _count(self, group: str, status: int) -> None:
        with self._lock:
            self.calls[(group, status)] += 1


def read_body(response: requests.Response, *, deadline: float, what: str) -> None:
    """Read a whole answer, decompressed, for response.content: ServerError past the deadline (time.monotonic),
    MalformedResponse beyond MAX_BODY_BYTES. The connection of an answer given up on is closed, never reused."""
    chunks, size = [], 0
    try:
        while chunk := _read_chunk(response):
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise MalformedResponse(f"{what}: answer larger than {MAX_BODY_BYTES} bytes")
            if time.monotonic() > deadline:
                raise ServerError(f"{what}: answer not read within the {REQUEST_DEADLINE:.0f} s deadline")
            chunks.append(chunk)
    except BaseException:
        response.close()
        raise
    # The body read, in place of the socket it came from: requests reads .content (and .json(), .text) from any
    # file-like `raw`, so the answer reads as any other once its size and time are checked.
    response.raw = io.BytesIO(b"".join(chunks))


def _read_chunk(response: requests.Response) -> bytes:
    """What one read of the socket gives (decompressed at most READ_CHUNK bytes: a gzip bomb is read in small
    steps), with urllib3's errors as requests' own, as Response.iter_content has them."""
    try:
        return response.raw.read1(READ_CHUNK, decode_content=True)
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.exceptions.ReadTimeout(exc) from exc
    except urllib3.exceptions.ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from exc
    except urllib3.exceptions.DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from exc
    except urllib3.exceptions.SSLError as exc:
        raise requests.exceptions.SSLError(exc) from exc


def list_bucket(group: str, character_id: int) -> str:
    """The rate-limit bucket of a list route ('char-killmail', 'corp-killmail'): per app + the character whose
    token is used."""
    return f"{group}:{character_id}"


def backoff_seconds(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: a random time up to base * 2**(attempt-1), at most cap."""
    return rng.uniform(0, exponential(attempt, base=base, cap=cap))


class OriginPools(HTTPAdapter):
    """requests' transport adapter, with each origin's connection pool looked up once. requests parses the URL,
    picks the proxy and builds the pool's key again for every call, a tenth of a warm poll's HTTP work; an ESI
    client calls two origins (ESI's, SSO's) through the session's proxies and TLS settings, fixed at its start."""

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._pools: dict[tuple, Any] = {}

    def get_connection_with_tls_context(self, request: requests.PreparedRequest, verify: bool | str | None,
                                        proxies: Mapping[str, str] | None = None, cert: Any = None) -> Any:
        scheme, _, origin = (request.url or "").partition("://")
        key = (scheme, origin.partition("/")[0], verify, cert)
        pool = self._pools.get(key)
        if pool is None or pool.pool is None:  # first call, or closed: the pool manager let it go (evicted)
            pool = self._pools[key] = super().get_connection_with_tls_context(request, verify, proxies, cert)
        return pool


def new_session(settings: Settings) -> requests.Session:
    """A Session with the app's User-Agent and a connection pool big enough for the detail threads."""
    session = requests.Session()
    # requests would read the proxy variables, ~/.netrc and the CA bundle variables again on every call, work
    # repeated for each of a poll's many small calls; Settings read them once.
    session.trust_env = False
    session.proxies.update(dict(settings.http_proxies))
    if settings.ca_bundle:
        session.verify = settings.ca_bundle
    session.headers["User-Agent"] = settings.esi_user_agent
    session.headers["Accept"] = "application/json"
    adapter = OriginPools(pool_connections=4, pool_maxsize=max(4, settings.detail_concurrency * 2))
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def _raise_for_status(response: requests.Response, what: str, group: str) -> None:
    """Raise the EsiError a status other than 2xx stands for."""
    status = response.status_code
    if status == 200:
        return
    message = f"{what} -> {status}: {_error_text(response)}"
    if status == 420:
        raise ErrorLimited(message, reset=pause_seconds(response.headers.get("X-ESI-Error-Limit-Reset"), 60,
                                                    header="X-ESI-Error-Limit-Reset"))
    if status == 429:
        raise RateLimited(message, group=response.headers.get("X-Ratelimit-Group", group),
                          retry_after=pause_seconds(response.headers.get("Retry-After"), 60, header="Retry-After"))
    if status >= 500:
        raise ServerError(message, status=status)
    raise STATUS_ERRORS.get(status, BadRequest)(message, status=status)


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise MalformedResponse(f"{response.url.split('?')[0]}: body is not JSON") from exc
    except RecursionError:
        raise MalformedResponse(f"{response.url.split('?')[0]}: body is nested too deep") from None


def _one_line(value: Any) -> str:
    """A value from an answer, fit for a message: one line of at most 200 characters."""
    return " ".join((value if isinstance(value, str) else reprlib.repr(value)).split())[:200]


def _error_text(response: requests.Response) -> str:
    try:
        body = response.json()
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the decoder goes
        return response.text[:200]
    shown = body.get("error", body) if isinstance(body, dict) else body
    return (shown if isinstance(shown, str) else reprlib.repr(shown))[:200]  # cut short in depth too

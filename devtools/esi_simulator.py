"""A local ESI + EVE SSO simulator for the demo, integration tests and benchmarks (never the production path).

It serves the killmail routes, the public character route and the SSO token endpoint over real HTTP, with ESI's
caching (Expires, ETag, 304), paging, error limit (420) and token-bucket rate limit (429), rotating refresh tokens,
and injectable faults, following ../../shared/esi/ESI.md. Where ESI leaves a choice open, the simulator answers:
- a missing, unknown, superseded or expired Bearer token: 401; a token of another character, a missing scope or
  the missing Director role: 403;
- a page past the last one: 404 "Requested page does not exist!" (still with X-Pages); an unknown killmail id:
  404; a known id with the wrong hash: 422;
- SSO is a separate service: it is outside the error limit and the buckets, and a bare User-Agent is only counted.
For adding pilots from a browser it also has SSO's authorize page (a link per pilot), the authorization_code grant
with PKCE, a JWKS whose RS256 key signs every access token, SSO's metadata, revocation, and ESI's affiliation route.
Its clock is the real clock plus whatever `advance()` added, so tests need no sleeps; Date, Expires, token expiry,
cache turnover and the limit windows all follow it.
"""
from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import logging
import math
import random
import re
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.utils import formatdate, parsedate_to_datetime
from functools import lru_cache
from html import escape
from http import HTTPStatus
from io import BytesIO
from typing import Any
from urllib.parse import unquote_to_bytes, urlencode

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from werkzeug.wrappers import Request

log = logging.getLogger(__name__)

COMPATIBILITY_DATE = "2026-08-18"
CHAR_SCOPE = "esi-killmails.read_killmails.v1"
CORP_SCOPE = "esi-killmails.read_corporation_killmails.v1"
ACCESS_TOKEN_SECONDS = 1199
DETAIL_CACHE_SECONDS = 30 * 86400
CHARACTER_CACHE_SECONDS = 86400
ROUTES = ("list_character", "list_corporation", "detail", "token", "character", "names", "prices", "system",
          "constellation", "other")
GROUPS = ("char-killmail", "corp-killmail", "killmail")
DEFAULTS: dict[str, Any] = {
    "page_size": 1000, "cache_seconds": 300, "latency_ms": 0, "error_rate_5xx": 0.0, "rate_429": 0.0,
    "detail_bucket": (3600, 900), "list_bucket": (30, 900), "error_limit": 100, "error_window": 60,
    "rate_limits": True, "background_share": 0.0, "token_seconds": ACCESS_TOKEN_SECONDS,
}

# ESI paths may carry a version prefix (/latest, /v5, ...) and a trailing slash.
_PREFIX = r"^(?:/(?:latest|legacy|dev|v\d+))?"
_ESI_ROUTES = [
    ("list_character", re.compile(_PREFIX + r"/characters/(?P<id>\d+)/killmails/recent/?$")),
    ("list_corporation", re.compile(_PREFIX + r"/corporations/(?P<id>\d+)/killmails/recent/?$")),
    ("detail", re.compile(_PREFIX + r"/killmails/(?P<id>\d+)/(?P<hash>[^/]+)/?$")),
    ("character", re.compile(_PREFIX + r"/characters/(?P<id>\d+)/?$")),
    ("names", re.compile(_PREFIX + r"/universe/names/?$")),
    ("prices", re.compile(_PREFIX + r"/markets/prices/?$")),
    ("system", re.compile(_PREFIX + r"/universe/systems/(?P<id>\d+)/?$")),
    ("constellation", re.compile(_PREFIX + r"/universe/constellations/(?P<id>\d+)/?$")),
]
_POST_ROUTES = {"names"}
# ESI's id ranges, as /universe/names/ tells categories apart: (first, end, category). Anything else is unknown.
_ID_RANGES = [(1, 500_000, "inventory_type"), (500_000, 1_000_000, "faction"), (1_000_000, 2_000_000, "corporation"),
              (3_000_000, 4_000_000, "character"), (10_000_000, 11_000_000, "region"),
              (20_000_000, 21_000_000, "constellation"), (30_000_000, 33_000_000, "solar_system"),
              (90_000_000, 98_000_000, "character"), (98_000_000, 99_000_000, "corporation"),
              (99_000_000, 100_000_000, "alliance"), (2_100_000_000, 2_200_000_000, "character")]
NAMES_MAX = 1000
PRICES_CACHE_SECONDS = 3600
UNIVERSE_CACHE_SECONDS = 86400  # systems and constellations: ESI caches them for a day
# The map: every SYSTEMS_PER_CONSTELLATION systems from 30 000 001 make a constellation from 20 000 001, every
# CONSTELLATIONS_PER_REGION constellations a region from 10 000 001, except the trade hubs, which sit in their
# regions as ESI places them (their constellations look like the real ones; the worker treats ids as opaque).
SYSTEMS_PER_CONSTELLATION = 8
CONSTELLATIONS_PER_REGION = 10
_HUB_CONSTELLATIONS = {30000142: 20000020, 30000144: 20000020, 30002187: 20000322, 30002659: 20000389,
                       30002510: 20000367, 30002053: 20000303}
_HUB_REGIONS = {20000020: 10000002, 20000322: 10000043, 20000389: 10000032, 20000367: 10000030,
                20000303: 10000042}
_TOKEN_PATH = re.compile(r"^/v2/oauth/token/?$")
# The SSO login's routes and ESI's affiliation route (the SSO login section of Simulator).
_LOGIN_PATHS = {
    "authorize": re.compile(r"^/v2/oauth/authorize/?$"), "jwks": re.compile(r"^/oauth/jwks/?$"),
    "metadata": re.compile(r"^/\.well-known/oauth-authorization-server/?$"),
    "revoke": re.compile(r"^/v2/oauth/revoke/?$"), "affiliation": re.compile(_PREFIX + r"/characters/affiliation/?$"),
}
SIGNING_KID = "JWT-Signature-Key"
CODE_SECONDS = 300  # an authorization code not exchanged by then is dead
_BARE_REQUESTS_AGENT = re.compile(r"^python-requests/[\w.]+$", re.IGNORECASE)
_REASONS = {420: "Error Limited"}
IDLE_SECONDS = 300  # a kept-alive connection with no request for this long is closed

# Type ids that look like the real thing; the worker treats them as opaque numbers.
_SHIPS = [587, 603, 11377, 17478, 24690, 29984, 33468, 12005, 11987, 22852, 17738, 670]
_STRUCTURES = [35832, 35833, 35825]
_NPC_SHIPS = [23707, 23708, 45879, 16236]
_NPC_CORPS = [1000125, 1000127, 1000134, 1000135]
_WEAPONS = [3178, 2873, 2977, 3001, 25715, 2488, 27371]
_ITEMS = [17482, 22542, 32817, 578, 31766, 2488, 31790, 82313, 82315, 82312, 82164, 377, 2048, 3841, 438]
_CONTAINERS = [3467, 3465, 11489]
_FLAGS = [5, 11, 12, 13, 19, 20, 27, 28, 87, 92, 93, 94, 134]
# Names /universe/names/ gives for ids the world uses, as ESI spells them (the player ships and structures, NPC
# corporations, factions and trade hubs); any other id in a range gets a made-up name of its category's shape.
_KNOWN_NAMES = {
    587: "Rifter", 603: "Merlin", 11377: "Nemesis", 17478: "Retriever", 24690: "Hyperion", 29984: "Tengu",
    33468: "Astero", 12005: "Ishtar", 11987: "Guardian", 22852: "Hel", 17738: "Machariel", 670: "Capsule",
    35683: "Hecate", 35832: "Astrahus", 35833: "Fortizar", 35825: "Raitaru", 16236: "Coercer", 2488: "Warrior II",
    1000125: "CONCORD", 1000127: "Guristas", 1000134: "Blood Raiders", 1000135: "Serpentis Corporation",
    500001: "Caldari State", 500002: "Minmatar Republic", 500003: "Amarr Empire", 500004: "Gallente Federation",
    30000142: "Jita", 30000144: "Perimeter", 30002187: "Amarr", 30002659: "Dodixie", 30002510: "Rens",
    30002053: "Hek", 20000020: "Kimotoro", 10000002: "The Forge", 10000043: "Domain", 10000032: "Sinq Laison",
    10000030: "Heimatar", 10000042: "Metropolis",
}
# Ids from before 2010 (100 000 000 to 2 099 999 999) are characters, corporations and alliances alike: only these
# are named (the sample killmail's alliance).
_OLD_IDS = {1354830081: ("alliance", "Goonswarm Federation")}
_SYLLABLES = ["ka", "ri", "vo", "ten", "shi", "mar", "lo", "zen", "dra", "ul", "ne", "aro", "vex", "ith", "sol"]
_CORPORATION_WORDS = ["Industries", "Holdings", "Logistics", "Mining Corp", "Security", "Enterprises"]
_ALLIANCE_WORDS = ["Alliance", "Coalition", "Federation", "Collective", "Syndicate"]
_DESIGNATION = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@dataclass
class Pilot:
    """One SSO grant: a character, its corporation and its current tokens."""

    character_id: int
    name: str
    corporation_id: int
    director: bool
    scopes: list[str]
    refresh_token: str = ""
    access_token: str = ""
    expires_at: float = 0.0
    revoked: bool = False


@dataclass
class Killmail:
    """A killmail as stored: its list reference, time (for ordering) and body."""

    killmail_id: int
    killmail_hash: str
    when: int
    body: dict
    created: int
    raw: tuple[bytes, str] = field(init=False)  # the body's JSON and ETag (bodies never change)

    def __post_init__(self) -> None:
        # Made with the world, not on the first fetch: serving should cost the simulator little CPU, since it
        # shares the machine with the worker it measures (real ESI does its encoding elsewhere).
        raw = _json(self.body)
        self.raw = (raw, _etag(raw))


@dataclass
class ListCache:
    """One cached result of a list route: every page shares its build time and Expires."""

    built: int
    expires: int
    items: list[tuple[int, str]]


@dataclass
class Reply:
    """An answer under construction; `remember`, `detail_id` and `listed` drive accounting once the status is
    final."""

    status: int
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    remember: tuple[tuple, int] | None = None
    detail_id: int | None = None
    listed: tuple[int, ...] = ()  # the killmail ids a list page shows


class Bucket:
    """A floating-window token bucket: each spend returns `window` seconds after it was made."""

    def __init__(self) -> None:
        self.spent: deque[tuple[float, int]] = deque()
        self.total = 0  # sum of the costs in `spent`, so used() needs no pass over it

    def used(self, now: float, window: int) -> int:
        """Tokens spent within the window ending now."""
        spent = self.spent
        while spent and spent[0][0] + window <= now:
            self.total -= spent.popleft()[1]
        return self.total

    def spend(self, now: float, cost: int) -> None:
        """Take `cost` tokens now."""
        self.spent.append((now, cost))
        self.total += cost

    def retry_after(self, now: float, window: int, limit: int, cost: int) -> int:
        """Whole seconds until enough tokens have returned to pay `cost`."""
        missing, freed = self.used(now, window) + cost - limit, 0
        for spent_at, spent in self.spent:
            freed += spent
            if freed >= missing:
                return max(1, math.ceil(spent_at + window - now))
        return window


class _Connection(socketserver.StreamRequestHandler):
    """One client connection on a thread of its own: HTTP/1.1 requests in turn (keep-alive) until the client
    closes it, asks to (`Connection: close`) or leaves it idle for IDLE_SECONDS.

    A hand-made server, not a library's: the simulator shares the machine with the worker it measures, and
    cheroot spent far more CPU per request (a parked keep-alive connection went through a selector and a queue
    to a thread for every request; here its thread simply reads the next one)."""

    server: _Server
    timeout = IDLE_SECONDS
    disable_nagle_algorithm = True
    wbufsize = 0  # each response goes out in one sendall

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        super().finish()

    def handle(self) -> None:
        try:
            while self.handle_one():
                pass
        except (OSError, ValueError) as exc:  # the client hung up, went idle too long, or the server stopped
            log.debug("simulator connection from %s ended: %r", self.client_address[0], exc)

    def handle_one(self) -> bool:
        """Serve one request; False when the connection is to be closed."""
        line = self.rfile.readline(65537)
        while line in (b"\r\n", b"\n"):  # stray blank lines between requests are allowed (RFC 9112 2.2)
            line = self.rfile.readline(65537)
        if not line:
            return False
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return self.reply_error(400, "malformed request line")
        method, target, version = (part.decode("latin-1") for part in parts)
        environ: dict[str, Any] = {}
        for _ in range(100):
            header = self.rfile.readline(65537)
            if header in (b"\r\n", b"\n", b""):
                break
            name, colon, value = header.decode("latin-1").partition(":")
            if not colon:
                return self.reply_error(400, "malformed header line")
            key = name.strip().upper().replace("-", "_")
            key = key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key
            environ[key] = f"{environ[key]}, {value.strip()}" if key in environ else value.strip()
        else:
            return self.reply_error(431, "too many header lines")
        if "HTTP_TRANSFER_ENCODING" in environ:
            return self.reply_error(411, "send a Content-Length")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return self.reply_error(400, "malformed Content-Length")
        body = self.rfile.read(length) if length > 0 else b""
        path, _, query = target.partition("?")
        environ.update({
            "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query, "SERVER_PROTOCOL": version, "SERVER_NAME": self.server.server_address[0],
            "SERVER_PORT": str(self.server.server_address[1]), "REMOTE_ADDR": self.client_address[0],
            "REMOTE_PORT": str(self.client_address[1]),
            "wsgi.input": BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http", "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
        })
        # Connection is a list of tokens (RFC 9110 7.6.1): "keep-alive, close" closes too.
        tokens = {token.strip() for token in environ.get("HTTP_CONNECTION", "").lower().split(",")}
        close = version != "HTTP/1.1" or "close" in tokens
        started: list = []
        try:
            payload = b"".join(self.server.app(environ, lambda status, headers, exc_info=None:
                                               started.append((status, headers))))
        except Exception:
            log.exception("simulator error on %s %s", method, path)
            return self.reply_error(500, "simulator error")
        status, headers = started[0]
        head = [f"HTTP/1.1 {status}\r\n"] + [f"{name}: {value}\r\n" for name, value in headers]
        if not status.startswith(("1", "204", "304")) and all(n.lower() != "content-length" for n, _ in headers):
            head.append(f"Content-Length: {len(payload)}\r\n")  # the only way a kept-alive client sees the end
        if all(n.lower() != "server" for n, _ in headers):
            head.append("Server: esi-simulator\r\n")
        if close:
            head.append("Connection: close\r\n")
        self.connection.sendall("".join(head).encode("latin-1") + b"\r\n" + payload)
        return not close

    def reply_error(self, status: int, reason: str) -> bool:
        """A bodiless error that closes the connection (what follows a bad request cannot be framed)."""
        log.debug("simulator: %s from %s: %s", status, self.client_address[0], reason)
        phrase = HTTPStatus(status).phrase
        self.connection.sendall(f"HTTP/1.1 {status} {phrase}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                                .encode("latin-1"))
        return False


class _Server(socketserver.ThreadingTCPServer):
    """A thread per connection; stop() closes the open connections too, so their threads end."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True  # the port can be bound again at once after stop(), even with sockets in TIME_WAIT
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], app: Callable) -> None:
        super().__init__(address, _Connection)
        self.app = app
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._closing = False

    def track(self, connection: socket.socket, is_open: bool) -> None:
        with self._open_lock:
            (self._open.add if is_open else self._open.discard)(connection)
            late = is_open and self._closing  # accepted just before stop(): close it too
        if late:
            _shut(connection)

    def close_connections(self) -> None:
        with self._open_lock:
            self._closing = True
            open_now = list(self._open)
        for connection in open_now:
            _shut(connection)


def _shut(connection: socket.socket) -> None:
    """End a connection for both sides: its thread's read returns at once and the thread ends."""
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Simulator:
    """ESI + SSO state behind one lock, and the WSGI app that serves it."""

    def __init__(self, seed: int, client_id: str, client_secret: str, **options: Any) -> None:
        self.client_id, self.client_secret = client_id, client_secret
        self._lock = threading.Lock()
        self._rng = random.Random(f"{seed}:data")  # data alone, so faults never change the generated world
        self._token_rng = random.Random(f"{seed}:tokens")
        self._fault_rng = random.Random(f"{seed}:faults")
        self._config = dict(DEFAULTS)
        self._offset = 0.0
        self._pilots: dict[int, Pilot] = {}
        self._by_refresh: dict[str, int] = {}
        self._issued: dict[str, int] = {}  # every access token ever issued -> its character
        self.issued_tokens: set[str] = set()  # every access and refresh token ever issued (tests look for leaks)
        self._codes: dict[str, dict] = {}   # authorization codes not yet exchanged (SSO login section)
        self._browser_choice: tuple[str, int | None] | None = None  # what the next authorize page picks itself
        self._alliances: dict[int, int | None] = {}
        self._killmails: dict[int, Killmail] = {}
        self._links: dict[int, set[int]] = {}
        self._malformed: set[int] = set()
        self._unknown_names: set[int] = set()  # ids /universe/names/ refuses, beside those in no id range
        self._last_id = 134_000_000
        self._lists: dict[tuple[str, int], ListCache] = {}
        self._given_expires: dict[tuple, int] = {}
        self._served_details: set[int] = set()
        self._buckets: dict[tuple[str, Any], Bucket] = {}
        # The background spender (another app behind the same IP): when its schedule started, and per detail
        # bucket the number of its next scheduled spend.
        self._background_start = 0.0
        self._background_next: dict[tuple[str, Any], int] = {}
        self._created_at: dict[int, float] = {}  # killmail id -> when it was added to the world
        self._visible_at: dict[int, float] = {}  # killmail id -> when a 200 list page first showed it
        self._faults: list[dict] = []
        self._stalls: list[dict] = []
        self._released = threading.Event()
        self._error_window_start, self._error_count = 0, 0
        self._in_flight = 0
        self.base_url: str | None = None  # set by start()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.configure(**options)
        self._stats = self._fresh_stats()

    # ---- set-up and control -------------------------------------------------------------------------------

    def configure(self, **options: Any) -> None:
        """Change any constructor option (page_size, cache_seconds, latency_ms, buckets, ...) at runtime.

        background_share (0..1) starts another app behind each source IP that spends that share of the detail
        bucket's limit per window, two tokens at a time at evenly spaced times, from now on."""
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown simulator option(s): {', '.join(sorted(unknown))}")
        with self._lock:
            restart = {"background_share", "detail_bucket"} & set(options)
            if restart:  # what the other app spent so far, under the settings it spent it under
                self._spend_background_everywhere(self._now())
            for name, value in options.items():
                if name.endswith("_bucket"):
                    limit, window = (int(v) for v in value)
                    if limit < 1 or window < 1:
                        raise ValueError(f"{name} needs a positive limit and window, got {value!r}")
                    value = (limit, window)
                elif name == "rate_limits":
                    value = bool(value)
                else:
                    value = type(DEFAULTS[name])(value)
                    if value < 0 or (name in ("page_size", "error_window", "error_limit") and value < 1) or (
                            name == "background_share" and value > 1):
                        raise ValueError(f"{name} out of range: {value!r}")
                self._config[name] = value
            if restart:
                self._background_start = self._now()
                self._background_next.clear()

    def add_pilots(self, n_pilots: int = 40, n_killmails: int = 1500, share: int = 3, expired_fraction: float = 0.25,
                   revoked: int = 1, corporations: int = 4) -> list[int]:
        """Create pilots and killmails shared among them, deterministically from the seed; return the pilots' ids."""
        if n_killmails and not n_pilots:
            raise ValueError("killmails need at least one pilot to link them to")
        with self._lock:
            now = int(self._now())
            pilots = self._create_pilots(n_pilots, max(1, corporations), expired_fraction, revoked, now)
            times = sorted(now - self._rng.randint(60, 90 * 86400 - 600) for _ in range(n_killmails))
            for when in times:
                count = min(len(pilots), self._rng.randint(1, max(1, 2 * share - 1)))
                self._create_killmail(when, self._rng.sample(pilots, count), now)
            return [p.character_id for p in pilots]

    def add_killmails(self, character_id: int, n: int, *, shared_with: Sequence[int] = ()) -> list[int]:
        """Give a pilot n new killmails (and the pilots it shares them with: on every one of them too); they
        show in their lists once the current cache turns over."""
        with self._lock:
            pilots = [self._pilot(c) for c in (character_id, *shared_with)]
            now = int(self._now())
            # within the last 30 s, so newer than every generated kill (those are at least 60 s old)
            return [self._create_killmail(now - self._rng.randint(0, 30), pilots, now) for _ in range(n)]

    def add_killmail_body(self, character_id: int, body: dict, killmail_hash: str) -> int:
        """Give a pilot this killmail body as it is (a real one from tests/data, say), newer than every generated
        one; it shows in the pilot's list once the current cache turns over."""
        with self._lock:
            pilot = self._pilot(character_id)
            now = int(self._now())
            killmail_id = body["killmail_id"]
            self._killmails[killmail_id] = Killmail(killmail_id, killmail_hash, now, copy.deepcopy(body), now)
            self._created_at[killmail_id] = self._now()
            self._links[pilot.character_id].add(killmail_id)
            return killmail_id

    def make_malformed(self, killmail_id: int) -> None:
        """Serve that killmail's detail without its required `victim` field from now on."""
        with self._lock:
            if killmail_id not in self._killmails:
                raise KeyError(killmail_id)
            self._malformed.add(killmail_id)

    def make_unknown_names(self, *ids: int) -> None:
        """Make /universe/names/ refuse these ids (a batch holding one is answered 404) from now on."""
        with self._lock:
            self._unknown_names.update(ids)

    def revoke(self, character_id: int) -> None:
        """Revoke a pilot's grant now: its refresh token gives invalid_grant and its access token stops working."""
        with self._lock:
            self._pilot(character_id).revoked = True

    def set_director(self, character_id: int, director: bool) -> None:
        """Give or take a pilot's Director role (giving it also grants the corporation killmail scope)."""
        with self._lock:
            pilot = self._pilot(character_id)
            pilot.director = director
            if director and CORP_SCOPE not in pilot.scopes:
                pilot.scopes.append(CORP_SCOPE)

    def advance(self, seconds: float) -> None:
        """Move the simulator's clock forward (Expires, token expiry, cache turnover, limit windows)."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._offset += seconds

    def stall_next(self, path_regex: str, count: int = 1) -> None:
        """Hold the answers of the next `count` requests whose path matches `path_regex` (an ESI that accepted the
        call and never answers) until release_stalls(). The path is searched with its query string
        ("/characters/1/killmails/recent/?page=2"), so that one page of a list can be held."""
        with self._lock:
            self._released.clear()
            self._stalls.append({"regex": re.compile(path_regex), "count": int(count)})

    def release_stalls(self) -> None:
        """Answer every held request now, and hold no more."""
        with self._lock:
            self._stalls.clear()
            self._released.set()

    def fail_next(self, path_regex: str, status: int, count: int = 1, *, retry_after: int | None = None,
                  body: dict | None = None) -> None:
        """Answer the next `count` requests whose path (with its query string, as for stall_next) matches
        `path_regex` with `status` (before any other check)."""
        if status < 400:
            raise ValueError("fail_next needs an error status (>= 400)")
        with self._lock:
            self._faults.append({"regex": re.compile(path_regex), "status": int(status), "count": int(count),
                                 "retry_after": retry_after, "body": body})

    def clear_faults(self) -> None:
        """Forget the faults fail_next set that have not been served yet."""
        with self._lock:
            self._faults.clear()

    # ---- inspection ---------------------------------------------------------------------------------------

    def pilots(self) -> list[dict]:
        """Every pilot as the web app would have written it to the users table at login (current tokens)."""
        with self._lock:
            return [{
                "character_id": p.character_id, "character_name": p.name, "corporation_id": p.corporation_id,
                "access_token": p.access_token, "refresh_token": p.refresh_token,
                "expires_at": datetime.fromtimestamp(p.expires_at, UTC), "revoked": p.revoked,
                "scopes": " ".join(p.scopes),
            } for p in self._pilots.values()]

    def list_etag(self, character_id: int) -> str:
        """The ETag a pilot's list (its first page) answers with now: what a worker that polled it before holds,
        so a benchmark can start from warm pilots without a cold sync of each."""
        with self._lock:
            cache = self._list_cache(("character", character_id), self._now())
            chunk = cache.items[:self._config["page_size"]]
            return _etag(_json([{"killmail_hash": h, "killmail_id": i} for i, h in chunk]))

    def killmail_ids_for(self, character_id: int) -> set[int]:
        """Ids of every killmail linked to that pilot (whether or not its list cache shows them yet)."""
        with self._lock:
            return set(self._links.get(character_id, ()))

    def killmail_hash(self, killmail_id: int) -> str:
        """The hash that lists give for a killmail."""
        with self._lock:
            return self._killmails[killmail_id].killmail_hash

    def now(self) -> datetime:
        """The simulator's clock (real time plus everything advance() added), as an aware UTC datetime."""
        with self._lock:
            return datetime.fromtimestamp(self._now(), UTC)

    def expected_killmails(self, valid_only: bool = True, *, corporations: bool = False) -> dict[int, dict]:
        """Bodies a correct worker ends up storing: killmails of pilots with a valid grant, malformed ones left out.

        With corporations=True, kills reachable through the corporation list of a valid director count too.
        """
        with self._lock:
            ids: set[int] = set()
            for pilot in self._pilots.values():
                if valid_only and pilot.revoked:
                    continue
                ids |= self._links.get(pilot.character_id, set())
                if corporations and pilot.director:
                    ids |= self._corporation_ids(pilot.corporation_id)
            return {i: copy.deepcopy(self._killmails[i].body) for i in sorted(ids - self._malformed)}

    def stats(self) -> dict:
        """A copy of the counters (see _fresh_stats for the keys), the background spender's brought up to now."""
        with self._lock:
            self._spend_background_everywhere(self._now())
            return copy.deepcopy(self._stats)

    def visibility(self) -> dict[int, dict]:
        """Per killmail, when it was added to the world and when a 200 list page first showed it (None: not yet),
        on the simulator's clock: {killmail_id: {"created": t, "visible": t}}."""
        with self._lock:
            return {i: {"created": t, "visible": self._visible_at.get(i)} for i, t in self._created_at.items()}

    def reset_stats(self) -> None:
        """Zero the counters; which details were served and which Expires were given are still remembered."""
        with self._lock:
            self._stats = self._fresh_stats()

    # ---- server -------------------------------------------------------------------------------------------

    def start(self, port: int = 0, *, host: str = "127.0.0.1") -> str:
        """Serve over HTTP/1.1 with keep-alive, a daemon thread per connection; return the base URL."""
        if self._server is not None:
            raise RuntimeError(f"the simulator is already serving at {self.base_url}")
        server = _Server((host, port), self.wsgi_app)  # binds now: a port in use raises here
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="esi-simulator", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        self.base_url = f"http://{host}:{server.server_address[1]}"
        return self.base_url

    def stop(self) -> None:
        """Stop the server started by start(), close its connections and free the port (harmless when not running)."""
        self.release_stalls()
        server, thread = self._server, self._thread
        if server is None or thread is None:  # both or neither
            return
        self._server = self._thread = self.base_url = None
        server.shutdown()
        server.server_close()
        server.close_connections()
        thread.join(timeout=5)

    def wsgi_app(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        """The WSGI entry point: /_sim/ control API, SSO token endpoint, ESI routes."""
        request = Request(environ)
        login_route = _login_route(request.path)
        if request.path.startswith("/_sim/"):
            reply = self._control(request)
        elif login_route:
            reply = self._serve_login(login_route, request)
        else:
            reply = self._serve(request)
        body = reply.body or b""
        if "Date" not in reply.headers:  # the one Date, from the simulator's clock
            reply.headers["Date"] = _http_date(self._now())
        headers = list(reply.headers.items())
        if reply.body is not None:
            headers.append(("Content-Length", str(len(body))))
            if "Content-Type" not in reply.headers:  # the login's authorize page is HTML
                headers.append(("Content-Type", "application/json; charset=utf-8"))
        reason = _REASONS.get(reply.status) or HTTPStatus(reply.status).phrase
        start_response(f"{reply.status} {reason}", headers)
        # No body for HEAD (the headers stay): werkzeug sent one and closed; on a kept-alive connection it would be
        # read as the start of the next response. The server leaves that to the app.
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [body]

    # ---- request pipeline ---------------------------------------------------------------------------------

    def _serve(self, request: Request) -> Reply:
        route, params = _match(request.path)
        with self._lock:
            self._stats["requests"] += 1
            self._stats["by_route"][route] += 1
            self._in_flight += 1
            self._stats["max_in_flight"] = max(self._stats["max_in_flight"], self._in_flight)
            latency = self._config["latency_ms"]
            stall = self._take_stall(request.full_path)
        try:
            if latency:
                time.sleep(latency / 1000)  # outside the lock, so concurrent requests overlap
            if stall is not None:
                stall.wait()  # an answer that does not come until the test lets it (release_stalls)
            with self._lock:
                now = self._now()
                reply = self._token(request, now) if route == "token" else self._esi(route, params, request, now)
                status = str(reply.status)
                self._stats["by_status"][status] = self._stats["by_status"].get(status, 0) + 1
                self._stats["status_420"] += reply.status == 420
                self._stats["status_429"] += reply.status == 429
                return reply
        finally:
            with self._lock:
                self._in_flight -= 1

    def _esi(self, route: str, params: dict, request: Request, now: float) -> Reply:
        if route == "detail":
            fetches = self._stats["detail_fetches"]
            fetches[params["id"]] = fetches.get(params["id"], 0) + 1
        if route.startswith("list_"):
            self._note_early(route, params, request, now)
        if self._error_state(now)[0] == 0:
            reply = _error(420, "error limited")
        else:
            group, key = self._group(route, params, request)
            fault = (self._take_fault(request.full_path) or self._random_fault(group)
                     or self._check_request(request, route))
            reply = getattr(self, f"_route_{route}")(params, request, now) if fault is None else fault
            if group and self._config["rate_limits"]:
                reply = self._charge(group, key, reply, now)
            self._account(reply, now)
        if reply.status >= 400:
            self._error_count += 1
        remain, reset = self._error_state(now)
        self._stats["min_error_limit_remain"] = min(self._stats["min_error_limit_remain"], remain)
        reply.headers.update({"X-ESI-Error-Limit-Remain": str(remain), "X-ESI-Error-Limit-Reset": str(reset),
                              "Date": _http_date(now)})
        return reply

    def _group(self, route: str, params: dict, request: Request) -> tuple[str | None, Any]:
        """The rate-limit group of a route and whose bucket pays for it."""
        if route == "list_character":
            return "char-killmail", params["id"]
        if route == "list_corporation":
            return "corp-killmail", self._issued.get(_bearer_token(request))
        if route == "detail":
            return "killmail", request.remote_addr  # per source IP: every local client shares one bucket
        return None, None

    def _note_early(self, route: str, params: dict, request: Request, now: float) -> None:
        """Count a list request made before the Expires this page last got for the same token owner."""
        owner = self._issued.get(_bearer_token(request))
        key = (route, params["id"], request.args.get("page", "1"), owner)
        if owner is not None and now < self._given_expires.get(key, 0):
            self._stats["early_list_fetches"] += 1

    def _take_stall(self, path: str) -> threading.Event | None:
        """The release event of a queued stall_next whose regex matches the path, used up once per request."""
        for stall in self._stalls:
            if stall["regex"].search(path):
                stall["count"] -= 1
                if stall["count"] <= 0:
                    self._stalls.remove(stall)
                self._stats["stalled"] += 1
                return self._released
        return None

    def _take_fault(self, path: str) -> Reply | None:
        """The first queued fail_next fault whose regex matches the path, used up once per request."""
        for fault in self._faults:
            if fault["regex"].search(path):
                fault["count"] -= 1
                if fault["count"] <= 0:
                    self._faults.remove(fault)
                self._stats["faults_injected"] += 1
                reply = Reply(fault["status"], _json(fault["body"] or {"error": "injected fault"}))
                if fault["retry_after"] is not None:
                    reply.headers["Retry-After"] = str(fault["retry_after"])
                return reply
        return None

    def _random_fault(self, group: str | None) -> Reply | None:
        """A random 5xx or 429 (error_rate_5xx, rate_429) on any ESI route; a 429 names the route's group, as a
        real one does (with rate limits on, _charge adds the bucket's counts to it)."""
        rng = self._fault_rng
        if self._config["error_rate_5xx"] and rng.random() < self._config["error_rate_5xx"]:
            self._stats["faults_injected"] += 1
            return _error(rng.choice((500, 502, 503, 504)), "Internal server error")
        if self._config["rate_429"] and rng.random() < self._config["rate_429"]:
            self._stats["faults_injected"] += 1
            headers = {"Retry-After": str(rng.randint(1, 5))}
            if group:
                headers["X-Ratelimit-Group"] = group
            return Reply(429, _json({"error": "Too many requests"}), headers)
        return None

    def _check_request(self, request: Request, route: str) -> Reply | None:
        """A 400 for a request without a proper User-Agent or X-Compatibility-Date (and 405 for a wrong method)."""
        if request.method != ("POST" if route in _POST_ROUTES else "GET"):
            return _error(405, "Method not allowed")
        agent = request.headers.get("User-Agent", "").strip()
        if not agent or _BARE_REQUESTS_AGENT.match(agent):
            self._stats["bad_user_agent"] += 1
            return _error(400, "User-Agent must name the application, its version and a contact")
        value = request.headers.get("X-Compatibility-Date", "")
        try:
            valid = date.fromisoformat(value).isoformat() == value and value <= COMPATIBILITY_DATE
        except ValueError:
            valid = False
        if not valid:
            self._stats["bad_compatibility_date"] += 1
            return _error(400, f"X-Compatibility-Date must be a date no later than {COMPATIBILITY_DATE}")
        return None

    def _charge(self, group: str, key: Any, reply: Reply, now: float) -> Reply:
        """Pay for a response from its group's bucket, or turn it into a 429 when the bucket cannot pay."""
        limit, window = self._config["list_bucket" if group != "killmail" else "detail_bucket"]
        bucket = self._buckets.setdefault((group, key), Bucket())
        if group == "killmail":
            self._spend_background((group, key), bucket, now)
        used, cost = bucket.used(now, window), _cost(reply.status)
        if cost and used and used + cost > limit:
            retry = bucket.retry_after(now, window, limit, cost)
            reply = Reply(429, _json({"error": "Too many requests"}), {"Retry-After": str(retry)})
        elif cost:
            bucket.spend(now, cost)
            used += cost
            self._stats["tokens_spent"][group] += cost
        reply.headers.update({"X-Ratelimit-Group": group, "X-Ratelimit-Limit": f"{limit}/{_window_text(window)}",
                              "X-Ratelimit-Remaining": str(max(0, limit - used)), "X-Ratelimit-Used": str(used)})
        return reply

    def _account(self, reply: Reply, now: float) -> None:
        """Remember what a final answer gave away: list Expires (for early fetches), which killmails a list showed
        first when, and served details."""
        if reply.remember and reply.status in (200, 304):
            self._given_expires[reply.remember[0]] = reply.remember[1]
        if reply.status == 200:
            for killmail_id in reply.listed:
                self._visible_at.setdefault(killmail_id, now)
        if reply.detail_id is not None and 200 <= reply.status < 300:
            if reply.detail_id in self._served_details:
                self._stats["duplicate_detail_fetches"] += 1
            self._served_details.add(reply.detail_id)
            if self._stats["first_detail_at"] is None:
                self._stats["first_detail_at"] = now
            self._stats["last_detail_at"] = now

    def _spend_background(self, key: tuple[str, Any], bucket: Bucket, now: float) -> None:
        """Make the background spender's scheduled spends up to now in one detail bucket, each at its own time, in
        order (so the bucket's spends stay in time order); a spend the bucket cannot pay is refused."""
        share = self._config["background_share"]
        if not share:
            return
        limit, window = self._config["detail_bucket"]
        every = 2 * window / (share * limit)  # seconds between two-token spends
        n = self._background_next.get(key, 1)
        while (at := self._background_start + n * every) <= now:
            if bucket.used(at, window) + 2 <= limit:
                bucket.spend(at, 2)
                self._stats["tokens_spent_background"] += 2
            else:
                self._stats["background_refused"] += 1
            n += 1
        self._background_next[key] = n

    def _spend_background_everywhere(self, now: float) -> None:
        for key, bucket in self._buckets.items():
            if key[0] == "killmail":
                self._spend_background(key, bucket, now)

    def _error_state(self, now: float) -> tuple[int, int]:
        """(remaining errors, seconds to reset) of the fixed error window containing now."""
        window = self._config["error_window"]
        start = math.floor(now / window) * window
        if start != self._error_window_start:
            self._error_window_start, self._error_count = start, 0
        remain = max(0, self._config["error_limit"] - self._error_count)
        return remain, max(1, math.ceil(start + window - now))

    # ---- ESI routes ---------------------------------------------------------------------------------------

    def _route_list_character(self, params: dict, request: Request, now: float) -> Reply:
        pilot = self._authorise(request, now)
        if isinstance(pilot, Reply):
            return pilot
        if pilot.character_id != params["id"]:
            return _error(403, "token is not valid for this character")
        if CHAR_SCOPE not in pilot.scopes:
            return _error(403, f"token is missing the scope {CHAR_SCOPE}")
        return self._list_page(("character", params["id"]), request, now, pilot.character_id)

    def _route_list_corporation(self, params: dict, request: Request, now: float) -> Reply:
        pilot = self._authorise(request, now)
        if isinstance(pilot, Reply):
            return pilot
        if pilot.corporation_id != params["id"]:
            return _error(403, "character is not a member of this corporation")
        if CORP_SCOPE not in pilot.scopes:
            return _error(403, f"token is missing the scope {CORP_SCOPE}")
        if not pilot.director:
            return _error(403, "Character does not have required role(s): Director")
        return self._list_page(("corporation", params["id"]), request, now, pilot.character_id)

    def _route_detail(self, params: dict, request: Request, now: float) -> Reply:
        killmail = self._killmails.get(params["id"])
        if killmail is None:
            return _error(404, "Killmail not found")
        if params["hash"] != killmail.killmail_hash:
            return _error(422, "Invalid killmail_id and/or killmail_hash")
        if killmail.killmail_id in self._malformed:  # rare, and may start at any time: not cached
            body = _json({k: v for k, v in killmail.body.items() if k != "victim"})
            etag = _etag(body)
        else:
            body, etag = killmail.raw
        reply = _cached(request, body, killmail.created, int(now) + DETAIL_CACHE_SECONDS, "public", now, etag)
        reply.detail_id = killmail.killmail_id
        return reply

    def _route_character(self, params: dict, request: Request, now: float) -> Reply:
        pilot = self._pilots.get(params["id"])
        if pilot is None:
            return _error(404, "Character not found")
        rng = random.Random(pilot.character_id)  # stable per character, independent of the world's generator
        body = {"name": pilot.name, "corporation_id": pilot.corporation_id, "birthday": "2015-03-24T11:37:00Z",
                "bloodline_id": rng.randint(1, 14), "race_id": rng.choice((1, 2, 4, 8)),
                "gender": rng.choice(("male", "female")), "security_status": round(rng.uniform(-5, 5), 2),
                "description": ""}
        if self._alliances.get(pilot.corporation_id):
            body["alliance_id"] = self._alliances[pilot.corporation_id]
        return _cached(request, _json(body), int(now), int(now) + CHARACTER_CACHE_SECONDS, "public", now)

    def _route_names(self, params: dict, request: Request, now: float) -> Reply:
        """POST /universe/names/: id, category and name of each id; 404 for the whole batch when one id is
        unknown (ESI's way), 400 for a body that is no list of 1 to 1000 ids."""
        ids = request.get_json(silent=True)
        if not isinstance(ids, list) or not 0 < len(ids) <= NAMES_MAX \
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return _error(400, f"body must be a JSON list of 1 to {NAMES_MAX} ids")
        answer = []
        for i in dict.fromkeys(ids):
            entry = self.name_of(i)
            if entry is None:
                return _error(404, "Ensure all IDs are valid before resolving.")
            answer.append(entry)
        self._stats["names_resolved"] += len(answer)
        return Reply(200, _json(answer))

    def name_of(self, id_: int) -> dict | None:
        """/universe/names/'s entry for an id (id, category, name), or None for an id ESI would refuse."""
        if id_ in self._unknown_names:
            return None
        if id_ in self._pilots:
            return {"id": id_, "category": "character", "name": self._pilots[id_].name}
        if id_ in _OLD_IDS:
            return {"id": id_, "category": _OLD_IDS[id_][0], "name": _OLD_IDS[id_][1]}
        category = next((c for first, end, c in _ID_RANGES if first <= id_ < end), None)
        if category is None:
            return None
        kind = "npc_ship" if id_ in _NPC_SHIPS else category
        return {"id": id_, "category": category, "name": _KNOWN_NAMES.get(id_) or made_up_name(id_, kind)}

    def _route_prices(self, params: dict, request: Request, now: float) -> Reply:
        """GET /markets/prices/: a price for every type the world's killmails hold, stable per type."""
        types = sorted({*_SHIPS, *_STRUCTURES, *_NPC_SHIPS, *_WEAPONS, *_ITEMS, *_CONTAINERS})
        prices = []
        for type_id in types:
            rng = random.Random(type_id)
            adjusted = round(rng.uniform(100, 50_000_000), 2)
            prices.append({"type_id": type_id, "adjusted_price": adjusted,
                           "average_price": round(adjusted * rng.uniform(0.8, 1.2), 2)})
        start = int(now) // PRICES_CACHE_SECONDS * PRICES_CACHE_SECONDS
        return _cached(request, _json(prices), start, start + PRICES_CACHE_SECONDS, "public", now)

    def _route_system(self, params: dict, request: Request, now: float) -> Reply:
        """GET /universe/systems/{id}/: a system's name, constellation, security and position; 404 for an id
        that names no system."""
        entry = self.name_of(params["id"])
        if entry is None or entry["category"] != "solar_system":
            return _error(404, "Solar system not found")
        rng = random.Random(params["id"])
        body = {"system_id": params["id"], "name": entry["name"], "constellation_id": constellation_of(params["id"]),
                "security_status": round(rng.uniform(-1, 1), 6), "position": _position(rng)}
        return self._universe(request, body, now)

    def _route_constellation(self, params: dict, request: Request, now: float) -> Reply:
        """GET /universe/constellations/{id}/: a constellation's name, region and systems; 404 for an id that
        names no constellation of the map."""
        entry, systems = self.name_of(params["id"]), systems_of(params["id"])
        if entry is None or entry["category"] != "constellation" or not systems:
            return _error(404, "Constellation not found")
        body = {"constellation_id": params["id"], "name": entry["name"], "region_id": region_of(params["id"]),
                "position": _position(random.Random(params["id"])), "systems": systems}
        return self._universe(request, body, now)

    def _universe(self, request: Request, body: dict, now: float) -> Reply:
        start = int(now) // UNIVERSE_CACHE_SECONDS * UNIVERSE_CACHE_SECONDS
        return _cached(request, _json(body), start, start + UNIVERSE_CACHE_SECONDS, "public", now)

    def _route_other(self, params: dict, request: Request, now: float) -> Reply:
        return _error(404, "Not found")

    def _authorise(self, request: Request, now: float) -> Pilot | Reply:
        """The pilot behind a valid Bearer token, or the 401 that answers an absent, stale or expired one."""
        token = _bearer_token(request)
        if not token:
            return _error(401, "authentication required")
        owner = self._issued.get(token)
        pilot = self._pilots.get(owner) if owner else None
        if pilot is None or token != pilot.access_token or pilot.revoked:
            return _error(401, "invalid token")
        if now >= pilot.expires_at:
            return _error(401, "token is expired")
        return pilot

    def _list_page(self, key: tuple[str, int], request: Request, now: float, owner: int) -> Reply:
        raw = request.args.get("page", "1")
        if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
            return _error(400, f"page must be a whole number from 1, got {raw!r}")
        page, cache = int(raw), self._list_cache(key, now)
        size = self._config["page_size"]
        pages = max(1, math.ceil(len(cache.items) / size))
        if page > pages:
            return _error(404, "Requested page does not exist!", {"X-Pages": str(pages)})
        chunk = cache.items[(page - 1) * size:page * size]
        body = _json([{"killmail_hash": h, "killmail_id": i} for i, h in chunk])
        reply = _cached(request, body, cache.built, cache.expires, "private", now)
        reply.headers["X-Pages"] = str(pages)
        route = "list_character" if key[0] == "character" else "list_corporation"
        reply.remember = ((route, key[1], raw, owner), cache.expires)
        reply.listed = tuple(i for i, _ in chunk)
        return reply

    def _list_cache(self, key: tuple[str, int], now: float) -> ListCache:
        """The cached result, rebuilt only once its Expires has passed (so new kills wait for the turnover)."""
        cache = self._lists.get(key)
        if cache is None or now >= cache.expires:
            ids = self._links.get(key[1], set()) if key[0] == "character" else self._corporation_ids(key[1])
            found = sorted((self._killmails[i] for i in ids), key=lambda k: (k.when, k.killmail_id), reverse=True)
            built = int(now)  # whole seconds: the Expires header must not round below the real expiry
            cache = ListCache(built, built + self._config["cache_seconds"], [(k.killmail_id, k.killmail_hash)
                                                                            for k in found])
            self._lists[key] = cache
        return cache

    def _corporation_ids(self, corporation_id: int) -> set[int]:
        ids: set[int] = set()
        for pilot in self._pilots.values():
            if pilot.corporation_id == corporation_id:
                ids |= self._links.get(pilot.character_id, set())
        return ids

    # ---- SSO ----------------------------------------------------------------------------------------------

    def _token(self, request: Request, now: float) -> Reply:
        """POST /v2/oauth/token: refresh_token grant with rotation; not under ESI's limits."""
        if not request.headers.get("User-Agent") or _BARE_REQUESTS_AGENT.match(request.headers["User-Agent"]):
            self._stats["bad_user_agent"] += 1  # counted, not refused: SSO does not enforce it
        fault = self._take_fault(request.full_path)
        if fault:
            return fault
        if request.method != "POST":
            return _error(405, "method not allowed")
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if request.headers.get("Authorization", "") != f"Basic {expected}":
            self._stats["invalid_client"] += 1
            return Reply(401, _json({"error": "invalid_client", "error_description": "Client authentication failed"}))
        if request.form.get("grant_type") == "authorization_code":
            return self._exchange_code(request, now)
        if request.form.get("grant_type") != "refresh_token":
            return Reply(400, _json({"error": "unsupported_grant_type",
                                     "error_description": "only refresh_token and authorization_code are simulated"}))
        owner = self._by_refresh.get(request.form.get("refresh_token", ""))
        pilot = self._pilots.get(owner) if owner else None
        if pilot is None or pilot.revoked:
            self._stats["invalid_grants"] += 1
            return Reply(400, _json({"error": "invalid_grant",
                                     "error_description": "Invalid refresh token. Token missing/expired."}))
        self._issue_tokens(pilot, int(now) + self._config["token_seconds"], now)
        self._stats["refreshes"] += 1
        return Reply(200, _json({"access_token": pilot.access_token, "expires_in": self._config["token_seconds"],
                                 "token_type": "Bearer", "refresh_token": pilot.refresh_token}),
                     {"Cache-Control": "no-store"})

    def _issue_tokens(self, pilot: Pilot, expires_at: float, now: float) -> None:
        """Rotate both tokens: the old refresh token and the old access token stop working at once."""
        rng = self._token_rng
        self._by_refresh.pop(pilot.refresh_token, None)
        pilot.refresh_token = _b64(rng.randbytes(18))
        self._by_refresh[pilot.refresh_token] = pilot.character_id
        claims = {"scp": pilot.scopes, "jti": f"{rng.getrandbits(128):032x}", "kid": "JWT-Signature-Key",
                  "sub": f"CHARACTER:EVE:{pilot.character_id}", "azp": self.client_id, "tenant": "tranquility",
                  "tier": "live", "region": "world", "aud": [self.client_id, "EVE Online"], "name": pilot.name,
                  "owner": _b64(rng.randbytes(20)), "exp": int(expires_at), "iat": int(now),
                  "iss": "login.eveonline.com"}
        # Signed for real (RS256, the key of /oauth/jwks), so that a login can verify it as it verifies SSO's.
        pilot.access_token = jwt.encode(claims, _signing_keys()[0], algorithm="RS256",
                                        headers={"kid": SIGNING_KID, "typ": "JWT"})
        pilot.expires_at = expires_at
        self._issued[pilot.access_token] = pilot.character_id
        self.issued_tokens.update((pilot.access_token, pilot.refresh_token))

    # ---- SSO login (authorization code flow) --------------------------------------------------------------

    def choose_in_browser(self, character_id: int | None) -> None:
        """Make the next authorize page choose by itself, as a person's click would: it clicks this pilot's link
        (None: the decline link) with a line of script. For tests that drive a headless browser."""
        with self._lock:
            if character_id is not None:
                self._pilot(character_id)
            self._browser_choice = ("decline", None) if character_id is None else ("pilot", character_id)

    def _serve_login(self, route: str, request: Request) -> Reply:
        """The login's routes: SSO's authorize page, key set, metadata and revocation, and ESI's affiliation.
        Outside ESI's limits and stats, like the token endpoint."""
        handlers = {"authorize": self._authorize, "jwks": self._jwks, "metadata": self._metadata,
                    "revoke": self._revoke, "affiliation": self._affiliation}
        with self._lock:
            return handlers[route](request, self._now())

    def _authorize(self, request: Request, now: float) -> Reply:
        """GET /v2/oauth/authorize: a page listing the pilots; a pilot's link sends the browser back to the
        redirect_uri with a code and the state, the decline link with error=access_denied."""
        args = request.args
        redirect_uri, state = args.get("redirect_uri", ""), args.get("state", "")
        if args.get("client_id") != self.client_id:
            return _page(400, "Unknown client", f"No application has the client id {args.get('client_id')!r}.")
        if not redirect_uri.startswith(("http://", "https://")):
            return _page(400, "Bad redirect_uri", "The redirect_uri must be an http or https URL.")
        if args.get("response_type") != "code" or (args.get("code_challenge")
                                                   and args.get("code_challenge_method") != "S256"):
            return _redirect(redirect_uri, error="invalid_request", state=state)
        if args.get("decline"):
            return _redirect(redirect_uri, error="access_denied", error_description="The user declined", state=state)
        if args.get("character_id"):
            pilot = self._pilots.get(int(args["character_id"])) if args["character_id"].isdigit() else None
            if pilot is None:
                return _page(400, "Unknown pilot", "No such pilot in this simulator.")
            code = secrets.token_urlsafe(24)
            self._codes[code] = {"character_id": pilot.character_id, "redirect_uri": redirect_uri,
                                 "challenge": args.get("code_challenge"), "expires": now + CODE_SECONDS,
                                 "scopes": args.get("scope", "").split()}
            return _redirect(redirect_uri, code=code, state=state)
        choice, self._browser_choice = self._browser_choice, None
        url = f"{request.base_url}?{request.query_string.decode('latin-1')}"  # as sent, not re-quoted
        return _authorize_page(url, list(self._pilots.values()), args.get("scope", "").split(), choice)

    def _exchange_code(self, request: Request, now: float) -> Reply:
        """The authorization_code grant: a code once, within CODE_SECONDS, with the PKCE verifier of its
        challenge; the pilot's grant becomes the scopes asked, and a revoked pilot is usable again."""
        entry = self._codes.pop(request.form.get("code", ""), None)
        problem = None
        if entry is None or now > entry["expires"]:
            problem = "Authorization code is invalid or expired"
        elif request.form.get("redirect_uri") not in (None, entry["redirect_uri"]):
            problem = "redirect_uri does not match the authorize request"
        elif entry["challenge"] and _pkce_challenge(request.form.get("code_verifier", "")) != entry["challenge"]:
            problem = "PKCE verification failed"
        if problem:
            self._stats["invalid_grants"] += 1
            return Reply(400, _json({"error": "invalid_grant", "error_description": problem}))
        assert entry is not None  # no code is a problem above
        pilot = self._pilots[entry["character_id"]]
        pilot.scopes, pilot.revoked = list(entry["scopes"]), False
        self._issue_tokens(pilot, int(now) + self._config["token_seconds"], now)
        return Reply(200, _json({"access_token": pilot.access_token, "expires_in": self._config["token_seconds"],
                                 "token_type": "Bearer", "refresh_token": pilot.refresh_token}),
                     {"Cache-Control": "no-store"})

    def _jwks(self, request: Request, now: float) -> Reply:
        """GET /oauth/jwks: the RS256 key that signs the access tokens, and an ES256 key beside it, as SSO's."""
        rsa_key, ec_key = _signing_keys()
        keys = [dict(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), alg="RS256",
                     kid=SIGNING_KID, use="sig"),
                dict(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True), alg="ES256",
                     kid="JWT-Signature-Key-ES256", use="sig")]
        return Reply(200, _json({"keys": keys, "SkipUnresolvedJsonWebKeys": True}))

    def _metadata(self, request: Request, now: float) -> Reply:
        """GET /.well-known/oauth-authorization-server, pointing at this simulator's endpoints."""
        base = request.host_url.rstrip("/")
        return Reply(200, _json({
            "issuer": "https://login.eveonline.com", "authorization_endpoint": f"{base}/v2/oauth/authorize",
            "token_endpoint": f"{base}/v2/oauth/token", "jwks_uri": f"{base}/oauth/jwks",
            "revocation_endpoint": f"{base}/v2/oauth/revoke", "response_types_supported": ["code", "token"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": ["S256"]}))

    def _revoke(self, request: Request, now: float) -> Reply:
        """POST /v2/oauth/revoke: the refresh token's grant ends (invalid_grant from now on); an unknown token is
        answered 200 all the same (RFC 7009)."""
        if request.method != "POST":
            return _error(405, "method not allowed")
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if request.headers.get("Authorization", "") != f"Basic {expected}":
            self._stats["invalid_client"] += 1
            return Reply(401, _json({"error": "invalid_client", "error_description": "Client authentication failed"}))
        owner = self._by_refresh.get(request.form.get("token", ""))
        if owner is not None and request.form.get("token_type_hint", "refresh_token") == "refresh_token":
            self._pilots[owner].revoked = True
        return Reply(200, b"")

    def _affiliation(self, request: Request, now: float) -> Reply:
        """POST /characters/affiliation/: corporation_id and alliance_id of each known character id sent."""
        ids = request.get_json(silent=True)
        if request.method != "POST":
            return _error(405, "Method not allowed")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return _error(400, "body must be a JSON list of character ids")
        answer = []
        for pilot in (self._pilots[i] for i in ids if i in self._pilots):
            entry: dict[str, int | None] = {"character_id": pilot.character_id, "corporation_id": pilot.corporation_id}
            if self._alliances.get(pilot.corporation_id):
                entry["alliance_id"] = self._alliances[pilot.corporation_id]
            answer.append(entry)
        return Reply(200, _json(answer), {"Cache-Control": "public, max-age=3600"})

    # ---- world generation ---------------------------------------------------------------------------------

    def _create_pilots(self, n: int, corporations: int, expired_fraction: float, revoked: int,
                       now: int) -> list[Pilot]:
        rng, first = self._rng, 98_000_001 + len(self._alliances)
        corps = [first + i for i in range(corporations)]
        for i, corp in enumerate(corps):
            self._alliances[corp] = 99_000_001 + i // 2 if i % 3 != 2 else None  # some corporations have none
        pilots = []
        for i in range(n):
            number = len(self._pilots) + 1
            director = i < corporations  # the first pilot of each corporation
            scopes = [CHAR_SCOPE, CORP_SCOPE] if director else [CHAR_SCOPE]
            pilot = Pilot(90_000_000 + number, f"Pilot {number}", corps[i % corporations], director, scopes)
            self._pilots[pilot.character_id] = pilot
            self._links[pilot.character_id] = set()
            pilots.append(pilot)
        members = [p for p in pilots if not p.director] or pilots
        gone = rng.sample(members, min(revoked, len(members)))
        alive = [p for p in pilots if p not in gone]
        expired = rng.sample(alive, min(len(alive), round(expired_fraction * n)))
        for pilot in pilots:
            pilot.revoked = pilot in gone
            # revoked grants also hold an expired access token, so no request can succeed for them
            stale = pilot.revoked or pilot in expired
            expiry = now - rng.randint(60, 86400) if stale else now + rng.randint(600, ACCESS_TOKEN_SECONDS)
            self._issue_tokens(pilot, expiry, now)
        return pilots

    def _create_killmail(self, when: int, linked: list[Pilot], now: int) -> int:
        rng = self._rng
        self._last_id += rng.randint(1, 400)
        victim = linked[0] if rng.random() < 0.35 else None
        attackers = linked[1:] if victim else linked
        body = make_killmail_body(rng, self._last_id, when, victim, attackers, self._alliances)
        self._killmails[self._last_id] = Killmail(self._last_id, f"{rng.getrandbits(160):040x}", when, body, now)
        self._created_at[self._last_id] = self._now()
        for pilot in linked:
            self._links[pilot.character_id].add(self._last_id)
        return self._last_id

    def _pilot(self, character_id: int) -> Pilot:
        if character_id not in self._pilots:
            raise KeyError(f"no pilot {character_id}")
        return self._pilots[character_id]

    def _now(self) -> float:
        return time.time() + self._offset

    def _fresh_stats(self) -> dict:
        return {"requests": 0, "by_route": dict.fromkeys(ROUTES, 0), "by_status": {}, "detail_fetches": {},
                "duplicate_detail_fetches": 0, "early_list_fetches": 0, "status_420": 0, "status_429": 0, "stalled": 0,
                "min_error_limit_remain": self._config["error_limit"], "tokens_spent": dict.fromkeys(GROUPS, 0),
                "refreshes": 0, "invalid_grants": 0, "invalid_client": 0, "bad_user_agent": 0,
                "bad_compatibility_date": 0, "faults_injected": 0, "max_in_flight": 0, "names_resolved": 0,
                # the background spender's tokens (in the detail buckets beside ours) and spends it could not pay
                "tokens_spent_background": 0, "background_refused": 0,
                # when the first and the last 2xx detail of these counters were served (simulator clock)
                "first_detail_at": None, "last_detail_at": None}

    # ---- control API --------------------------------------------------------------------------------------

    def _control(self, request: Request) -> Reply:
        """The /_sim/ API for a simulator running in another process; outside stats, limits and faults."""
        action = (request.method, request.path[len("/_sim/"):].strip("/"))
        data = request.get_json(silent=True) or {}
        try:
            if action == ("GET", "stats"):
                return Reply(200, _json(self.stats()))
            if action == ("GET", "visibility"):
                return Reply(200, _json(self.visibility()))
            if action == ("GET", "pilots"):
                pilots = [dict(p, expires_at=p["expires_at"].isoformat()) for p in self.pilots()]
                return Reply(200, _json(pilots))
            if action == ("GET", "expected"):
                valid_only = request.args.get("valid_only", "1") not in ("0", "false")
                return Reply(200, _json(sorted(self.expected_killmails(valid_only))))
            if action == ("POST", "add_killmails"):
                return Reply(200, _json(self.add_killmails(int(data["character_id"]), int(data.get("n", 1)))))
            handlers = {"reset_stats": lambda: self.reset_stats(), "configure": lambda: self.configure(**data),
                        "advance": lambda: self.advance(float(data["seconds"])),
                        "fail_next": lambda: self.fail_next(**data),
                        "make_malformed": lambda: self.make_malformed(int(data["killmail_id"])),
                        "revoke": lambda: self.revoke(int(data["character_id"]))}
            if action[0] != "POST" or action[1] not in handlers:
                return _error(404, "unknown control action")
            handlers[action[1]]()
            return Reply(200, _json({"ok": True}))
        except (KeyError, TypeError, ValueError, re.error) as exc:
            return _error(400, f"bad control request: {exc}")


# ---- helpers ---------------------------------------------------------------------------------------------------

def make_killmail_body(rng: random.Random, killmail_id: int, when: int, victim: Pilot | None,
                       attackers: list[Pilot], alliances: dict[int, int | None]) -> dict:
    """A killmail shaped like samples/killmail_134265477.json, with the awkward cases ESI really produces."""
    body: dict[str, Any] = {"killmail_id": killmail_id, "solar_system_id": rng.randint(30_000_001, 30_005_000),
                            "killmail_time": datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if rng.random() < 0.05:
        body["moon_id"] = rng.randint(40_000_001, 40_400_000)
    if rng.random() < 0.05:
        body["war_id"] = rng.randint(700_000, 760_000)
    body["attackers"] = _make_attackers(rng, attackers, alliances)
    damage = sum(a["damage_done"] for a in body["attackers"])
    if victim is not None:
        who = _person(rng, victim.character_id, victim.corporation_id, alliances.get(victim.corporation_id))
        ship = rng.choice(_SHIPS)
    elif rng.random() < 0.15:  # a structure or NPC victim has no character_id
        who, ship = {"corporation_id": rng.randint(98_100_000, 98_700_000)}, rng.choice(_STRUCTURES)
    else:
        who, ship = _person(rng, rng.randint(2_112_000_000, 2_124_000_000)), rng.choice(_SHIPS)
    body["victim"] = {**who, "damage_taken": damage, "ship_type_id": ship, "items": _make_items(rng)}
    if rng.random() < 0.9:
        body["victim"]["position"] = {axis: rng.uniform(-1e11, 1e11) for axis in "xyz"}
    return body


def _person(rng: random.Random, character_id: int, corporation_id: int | None = None,
            alliance_id: int | None = None) -> dict:
    person = {"character_id": character_id, "corporation_id": corporation_id or rng.randint(98_100_000, 98_700_000)}
    if alliance_id or (corporation_id is None and rng.random() < 0.5):
        person["alliance_id"] = alliance_id or rng.randint(99_000_100, 99_013_600)
    return person


def _make_attackers(rng: random.Random, pilots: list[Pilot], alliances: dict[int, int | None]) -> list[dict]:
    total = rng.randint(max(1, len(pilots)), 30)
    players = [_person(rng, p.character_id, p.corporation_id, alliances.get(p.corporation_id)) for p in pilots]
    out: list[dict] = []
    while len(players) + len(out) < total:
        if rng.random() < 0.25:  # identical NPCs are separate entries: a client must keep every one
            npc = {"corporation_id": rng.choice(_NPC_CORPS), "ship_type_id": rng.choice(_NPC_SHIPS),
                   "damage_done": rng.randint(0, 800), "final_blow": False, "security_status": 0}
            out += [dict(npc) for _ in range(min(rng.randint(2, 5), total - len(players) - len(out)))]
        else:
            players.append(_person(rng, rng.randint(2_112_000_000, 2_124_000_000)))
    for player in players:
        player.update({"damage_done": rng.randint(0, 5000), "final_blow": False,
                       "security_status": rng.choice([5, round(rng.uniform(-10, 5), 1)]),
                       "ship_type_id": rng.choice(_SHIPS), "weapon_type_id": rng.choice(_WEAPONS)})
    out = players + out
    rng.shuffle(out)
    rng.choice(players or out)["final_blow"] = True
    return out


def _make_items(rng: random.Random) -> list[dict]:
    total = rng.randint(0, 40)
    items: list[dict] = []
    while len(items) < total:
        roll, flag, type_id = rng.random(), rng.choice(_FLAGS), rng.choice(_ITEMS)
        if roll < 0.15 and len(items) + 2 <= total:  # one type under one flag, once destroyed and once dropped
            items.append({"flag": flag, "item_type_id": type_id, "quantity_destroyed": rng.randint(1, 20000),
                          "singleton": 0})
            items.append({"flag": flag, "item_type_id": type_id, "quantity_dropped": rng.randint(1, 20000),
                          "singleton": 0})
        elif roll < 0.22:  # a container with its contents one level down
            container = _item(rng, 5, rng.choice(_CONTAINERS))
            container.update(singleton=1, items=[_item(rng, 5, rng.choice(_ITEMS)) for _ in range(rng.randint(1, 5))])
            items.append(container)
        else:
            items.append(_item(rng, flag, type_id))
    return items


def _item(rng: random.Random, flag: int, type_id: int) -> dict:
    quantity = "quantity_destroyed" if rng.random() < 0.6 else "quantity_dropped"
    return {"flag": flag, "item_type_id": type_id, quantity: rng.randint(1, 100), "singleton": 0}


def made_up_name(id_: int, category: str) -> str:
    """A stable name of the shape ESI gives a category: "Kavo Tenshi", "Marlo Holdings", "1DQ-7A" (a null-sec
    system's designation), "Zenul Coalition", an NPC hull "Dravo Raider"; another type or a faction not in
    _KNOWN_NAMES gets a plain one."""
    rng = random.Random(id_)

    def word() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

    if category == "solar_system":
        left, right = rng.choice([(1, 4), (3, 2), (4, 1), (2, 3), (3, 3)])
        return "".join(rng.choice(_DESIGNATION) for _ in range(left)) + "-" + \
            "".join(rng.choice(_DESIGNATION) for _ in range(right))
    if category == "character":
        return f"{word()} {word()}"
    if category == "corporation":
        return f"{word()} {rng.choice(_CORPORATION_WORDS)}"
    if category == "alliance":
        return f"{word()} {rng.choice(_ALLIANCE_WORDS)}"
    if category in ("region", "constellation"):
        return word()
    if category == "npc_ship":
        return f"{word()} {rng.choice(['Raider', 'Sentinel', 'Invader'])}"
    return f"{word()} {'Module' if category == 'inventory_type' else 'Faction'} {id_ % 1000}"


def constellation_of(system_id: int) -> int:
    """The constellation a system of the simulated map is in."""
    return _HUB_CONSTELLATIONS.get(system_id) or 20_000_001 + (system_id - 30_000_001) // SYSTEMS_PER_CONSTELLATION


def region_of(constellation_id: int) -> int:
    """The region a constellation of the simulated map is in."""
    return _HUB_REGIONS.get(constellation_id) or \
        10_000_001 + (constellation_id - 20_000_001) // CONSTELLATIONS_PER_REGION


def systems_of(constellation_id: int) -> list[int]:
    """The systems of a constellation of the simulated map (none: no such constellation)."""
    first = 30_000_001 + (constellation_id - 20_000_001) * SYSTEMS_PER_CONSTELLATION
    near = range(max(30_000_001, first), min(33_000_000, first + SYSTEMS_PER_CONSTELLATION))
    return sorted({s for s in near if constellation_of(s) == constellation_id}
                  | {s for s, c in _HUB_CONSTELLATIONS.items() if c == constellation_id})


def _position(rng: random.Random) -> dict:
    return {axis: rng.uniform(-1e17, 1e17) for axis in ("x", "y", "z")}


def _match(path: str) -> tuple[str, dict]:
    if _TOKEN_PATH.match(path):
        return "token", {}
    for name, pattern in _ESI_ROUTES:
        found = pattern.match(path)
        if found:
            params = found.groupdict()
            return name, {**params, "id": int(params["id"])} if "id" in params else params
    return "other", {}


def _cached(request: Request, body: bytes, last_modified: int, expires: int, scope: str, now: float,
            etag: str | None = None) -> Reply:
    """A 200 with ESI's cache headers, or a bodiless 304 when If-None-Match / If-Modified-Since say unchanged."""
    etag = etag or _etag(body)
    max_age = max(0, expires - int(now))
    headers = {"ETag": etag, "Last-Modified": _http_date(last_modified), "Expires": _http_date(expires),
               "Cache-Control": f"{scope}, max-age={max_age}"}
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None:
        tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
        unchanged = "*" in tags or etag in tags
    else:
        unchanged = _not_modified_since(request.headers.get("If-Modified-Since"), last_modified)
    return Reply(304, None, headers) if unchanged else Reply(200, body, headers)


def _etag(body: bytes) -> str:
    return f'"{hashlib.sha256(body).hexdigest()[:56]}"'


def _not_modified_since(header: str | None, last_modified: int) -> bool:
    try:
        return header is not None and last_modified <= parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError):
        return False


def _bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _cost(status: int) -> int:
    """Tokens a response costs: 2xx 2, 304 1, 4xx 5 (429 nothing), 5xx nothing."""
    if status < 300:
        return 2
    if status < 400:
        return 1
    return 5 if status < 500 and status != 429 else 0


def _window_text(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, _json({"error": message}), dict(headers or {}))


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _http_date(timestamp: float) -> str:
    return formatdate(int(timestamp), usegmt=True)


def _login_route(path: str) -> str | None:
    """Which of the SSO login's routes (or ESI's affiliation route) a path is, if any."""
    return next((name for name, pattern in _LOGIN_PATHS.items() if pattern.match(path)), None)


@lru_cache(maxsize=1)
def _signing_keys() -> tuple[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey]:
    """The simulated SSO's keys, RS256 (signs every access token) and ES256, made once per process: making a
    2048-bit RSA key is slow, too slow for every simulator a test run starts."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048), ec.generate_private_key(ec.SECP256R1())


def _pkce_challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def _redirect(uri: str, **params: str) -> Reply:
    """A 302 back to the application's redirect_uri with these query parameters (an empty state is left out)."""
    query = urlencode({k: v for k, v in params.items() if v})
    return Reply(302, None, {"Location": f"{uri}{'&' if '?' in uri else '?'}{query}", "Cache-Control": "no-store"})


def _page(status: int, title: str, text: str, body: str = "") -> Reply:
    html = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            '<style>body{font:15px/1.5 system-ui,sans-serif;background:#101820;color:#e8edf2;margin:0}'
            'main{max-width:560px;margin:48px auto;padding:0 20px}a{color:#7fc4ff}'
            'li{margin:6px 0}.muted{color:#8a99a8}code{color:#c9d6e2}</style></head>'
            f'<body><main><h1>{escape(title)}</h1><p>{escape(text)}</p>{body}</main></body></html>')
    return Reply(status, html.encode(), {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"})


def _authorize_page(url: str, pilots: list[Pilot], scopes: list[str], choice: tuple[str, int | None] | None) -> Reply:
    """SSO's login page as the simulator has it: one link per pilot, and a decline link."""
    links = "".join(f'<li><a class="pilot" id="pilot-{p.character_id}" href="{escape(url)}&amp;character_id='
                    f'{p.character_id}">{escape(p.name)}</a> <span class="muted">corporation {p.corporation_id}'
                    f'</span></li>' for p in pilots)
    body = (f'<p>It asks for: {" ".join(f"<code>{escape(s)}</code>" for s in scopes) or "no scope"}</p>'
            f'<p>Log in as:</p><ul>{links}</ul>'
            f'<p><a id="decline" href="{escape(url)}&amp;decline=1">Decline</a></p>')
    if choice is not None:  # choose_in_browser: the click a person would make
        target = "decline" if choice[0] == "decline" else f"pilot-{choice[1]}"
        body += f'<script>document.getElementById("{target}").click()</script>'
    return _page(200, "EVE SSO (simulator)", "An application wants you to log in with EVE Online.", body)


def main(argv: list[str] | None = None) -> int:
    """Run the simulator in the foreground until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--pilots", type=int, default=40)
    parser.add_argument("--killmails", type=int, default=1500)
    parser.add_argument("--share", type=int, default=3)
    parser.add_argument("--expired-fraction", type=float, default=0.25)
    parser.add_argument("--revoked", type=int, default=1)
    parser.add_argument("--corporations", type=int, default=4)
    parser.add_argument("--client-id", default="demo-client")
    parser.add_argument("--client-secret", default="demo-secret")
    for name, default in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, tuple):
            parser.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",")), default=default,
                                metavar="LIMIT,WINDOW")
        elif isinstance(default, bool):
            parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false")
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sim = Simulator(args.seed, args.client_id, args.client_secret, **{k: getattr(args, k) for k in DEFAULTS})
    sim.add_pilots(args.pilots, args.killmails, args.share, args.expired_fraction, args.revoked, args.corporations)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    base_url = sim.start(args.port, host=args.host)
    log.info("ESI simulator at %s: %d pilots, %d killmails, seed %d", base_url, args.pilots, args.killmails,
             args.seed)
    while not stop.wait(0.5):
        pass
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

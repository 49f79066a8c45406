"""Announcing new killmails: what a post says (a Discord embed, plain JSON, zKillboard's add call), what a
destination's answer means, and the sender that delivers the outbox at least once.

Rows are written by db.save_killmails in the transaction that stores the killmail (the transactional outbox). A
sender locks one due row at a time (FOR UPDATE SKIP LOCKED, so several senders share the work), posts it, and
records the outcome in the same transaction: a sender killed mid-post releases its row at once, and the next
sender posts it again. So a post is delivered at least once: only one in flight at a kill, or one whose answer
timed out, can arrive twice.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import urlsplit

import psycopg
import requests

import db
import esi
from backoff import exponential, pause_seconds
from settings import ConfigError, Settings, describe, load_settings

log = logging.getLogger(__name__)
ZKILLBOARD_NAME = "zkillboard"  # the destination ZKILLBOARD_PUSH=1 registers
ZKILLBOARD = "https://zkillboard.com"
KILL_URL = ZKILLBOARD + "/kill/{}/"
RENDER_URL = "https://images.evetech.net/types/{}/render?size=64"  # EVE's image server: a ship type's render
COLOURS = {"kill": 0x2E8B57, "loss": 0xB22222, None: 0x5865F2}  # from the webhook's point of view
# What an id with no name shows as ("system 30000743"), and its zKillboard page, by the column that holds it.
KINDS = {"solar_system_id": ("system", "system"), "character_id": ("character", "character"),
         "corporation_id": ("corporation", "corporation"), "alliance_id": ("alliance", "alliance"),
         "ship_type_id": ("type", "ship"), "region_id": ("region", "region")}


@dataclass(frozen=True)
class SenderOptions:
    """How a sender posts: its User-Agent, timeouts, retries and paces."""

    user_agent: str
    timeout: float = 10.0               # seconds to connect, and between two reads of the answer
    deadline: float = 30.0              # seconds for the whole post, answer read: a trickle must not hold a row
    max_attempts: int = 8
    backoff_base: float = 5.0           # seconds before the second attempt; doubled each time, up to the cap
    backoff_cap: float = 900.0
    default_retry_after: float = 5.0    # a 429 that does not say how long
    zkillboard_interval: float = 1.0    # zKillboard asks for at most one add a second
    poll: float = 1.0                   # how often an idle sender looks for due rows
    name_wait: float = 30.0             # seconds a post waits for the names of its ids at the most
    keep_days: int = 30                 # delivered and given-up rows are kept this long (for the status page)
    prune_every: float = 3600.0


@dataclass(frozen=True)
class Outcome:
    """What to do with an outbox row after one attempt."""

    delivered: bool = False
    retry_in: float | None = None       # seconds to the next attempt; None with no other field: give up
    pause_for: float | None = None      # hold the whole destination (429); the row waits uncounted
    refuse: str | None = None           # the destination refused us: stop sending to it
    error: str = ""


class CannotStart(Exception):
    """A command cannot start: the message to print and the exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def open_database(*, need_user_agent: bool) -> tuple[Settings, db.Connection]:
    """The settings and a database connection for the notification commands, or CannotStart."""
    try:
        settings = load_settings(need_esi=False)
        if need_user_agent and not settings.esi_user_agent:
            raise ConfigError("ESI_USER_AGENT", "is required: every post says who sends it")
    except ConfigError as exc:
        raise CannotStart(f"configuration error: {exc}", 2) from None
    try:
        return settings, db.connect(settings.database_url)
    except psycopg.OperationalError as exc:
        raise CannotStart(f"❌ cannot reach PostgreSQL at DATABASE_URL: {describe(exc)}", 1) from None


# ------------------------------------------------------------------------------------------------- what is posted


def format_isk(value: Decimal | float | None) -> str:
    """ISK the way pilots read it: 1.23B, 45.6M, 789K."""
    if value is None:
        return "unknown"
    value = float(value)
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit} ISK"
    return f"{value:.0f} ISK"


def with_names(conn: db.Connection, killmail: Mapping) -> dict:
    """The killmail with `<field>_name` beside each id a post shows, and its system's `region_id` and
    `region_name` (None where no name or region is known)."""
    region_id = db.regions_of(conn, [killmail["solar_system_id"]]).get(killmail["solar_system_id"])
    shown, columns = {**killmail, "region_id": region_id}, (*db.NAMED_COLUMNS, "region_id")
    names = db.names_of(conn, (shown[column] for column in columns))
    return {**shown, **{_name_key(column): names.get(shown[column]) for column in columns}}


def side_of(killmail: Mapping, webhook: Mapping) -> str | None:
    """'loss' when one of the webhook's characters or corporations is the victim, 'kill' when one is among the
    attackers, None for a webhook that follows everyone."""
    characters, corporations = set(webhook["character_ids"]), set(webhook["corporation_ids"])
    if killmail["victim_character_id"] in characters or killmail["victim_corporation_id"] in corporations:
        return "loss"
    if characters & set(killmail["attacker_character_ids"]) or corporations & set(killmail["attacker_corporation_ids"]):
        return "kill"
    return None


def discord_embed(killmail: Mapping) -> dict:
    """A Discord webhook body read as zKillboard's bot reads: the victim's ship and system in the title, the
    victim, the final blow, the attacker count, the value and the time, a render of the ship, a link to
    zKillboard, coloured as a kill or a loss for this webhook."""
    victim = [_linked(killmail, "victim_" + key) for key in ("character_id", "corporation_id", "alliance_id")
              if killmail["victim_" + key] is not None]
    final_blow = [_linked(killmail, "final_blow_" + key) for key in ("character_id", "corporation_id")
                  if killmail["final_blow_" + key] is not None][:1]  # the pilot, else its (NPC) corporation
    if killmail["final_blow_ship_type_id"] is not None:
        final_blow.append(_linked(killmail, "final_blow_ship_type_id"))
    when = killmail["killmail_time"]
    title = f"{_shown(killmail, 'victim_ship_type_id')} destroyed in {_shown(killmail, 'solar_system_id')}"
    system = _linked(killmail, "solar_system_id")
    if killmail.get("region_name"):  # zKillboard's way: "Hek (Metropolis)"; no region where none is known
        title += f" ({killmail['region_name']})"
        system += f"\n{_linked(killmail, 'region_id')}"
    return {"embeds": [{
        "title": title,
        "url": KILL_URL.format(killmail["killmail_id"]),
        "timestamp": when.isoformat(),
        "color": COLOURS[killmail.get("side")],
        "thumbnail": {"url": RENDER_URL.format(killmail["victim_ship_type_id"])},
        "fields": [
            {"name": "Victim", "value": "\n".join(victim) or "unknown", "inline": True},
            {"name": "Final blow", "value": " in ".join(final_blow) or "unknown", "inline": True},
            {"name": "System", "value": system, "inline": True},
            {"name": "Value", "value": format_isk(killmail["total_value"]), "inline": True},
            {"name": "Attackers", "value": str(killmail["attackers"]), "inline": True},
            {"name": "Time", "value": when.astimezone(UTC).strftime("%Y-%m-%d %H:%M EVE"), "inline": True},
        ],
        "footer": {"text": f"killmail {killmail['killmail_id']}"},
    }]}


def _name_key(column: str) -> str:
    return column.removesuffix("_id") + "_name"


def _kind(column: str) -> tuple[str, str]:
    return next(kind for suffix, kind in KINDS.items() if column.endswith(suffix))


def _shown(killmail: Mapping, column: str) -> str:
    """An id's name, or (ESI could not name it, or not yet) its kind and id."""
    return killmail.get(_name_key(column)) or f"{_kind(column)[0]} {killmail[column]}"


def _linked(killmail: Mapping, column: str) -> str:
    """An id's name as a link to its zKillboard page."""
    return f"[{_shown(killmail, column)}]({ZKILLBOARD}/{_kind(column)[1]}/{killmail[column]}/)"


def plain_json(killmail: Mapping) -> dict:
    """The JSON body for any URL: the killmail's facts with `<field>_name` beside each id shown, the side (kill,
    loss or null for this webhook) and its zKillboard link."""
    hidden = ("killmail_time", "attacker_character_ids", "attacker_corporation_ids")
    body = {key: value for key, value in killmail.items() if key not in hidden}
    body["killmail_time"] = killmail["killmail_time"].isoformat()
    body["total_value"] = None if killmail["total_value"] is None else float(killmail["total_value"])
    body["url"] = KILL_URL.format(killmail["killmail_id"])
    return body


def request_for(format: str, url: str, killmail: Mapping) -> tuple[str, dict]:
    """The URL to post to and the JSON body, for a destination's format."""
    if format == "zkillboard":
        target = f"{url.rstrip('/')}/{killmail['killmail_id']}/{killmail['killmail_hash']}/"
        return target, {"killmail_id": killmail["killmail_id"], "killmail_hash": killmail["killmail_hash"]}
    return url, discord_embed(killmail) if format == "discord" else plain_json(killmail)


# ------------------------------------------------------------------------------------------------- what it means


def retry_after(response: requests.Response, default: float) -> float:
    """Seconds a 429 asks us to wait: Discord's JSON `retry_after`, else the Retry-After header; at most
    MAX_PAUSE (backoff.py), the default when unreadable (a receiver's 1e20 or inf must not stop the sender)."""
    try:
        body = response.json()
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the decoder goes
        body = None
    if isinstance(body, dict) and isinstance(body.get("retry_after"), int | float):
        return pause_seconds(str(body["retry_after"]), default, header="retry_after")
    return pause_seconds(response.headers.get("Retry-After"), default, header="Retry-After")


def backoff(attempts: int, options: SenderOptions) -> float | None:
    """Seconds before the next attempt after this many failed ones, or None once they are spent."""
    if attempts >= options.max_attempts:
        return None
    return exponential(attempts, base=options.backoff_base, cap=options.backoff_cap)


def judge(format: str, response: requests.Response | None, error: str, attempts: int,
          options: SenderOptions) -> Outcome:
    """The outcome of an attempt (attempts counts this one); response None: it timed out or never connected."""
    if response is None:
        return Outcome(retry_in=backoff(attempts, options), error=error)
    status = response.status_code
    if 200 <= status < 300:
        return Outcome(delivered=True)
    error = f"HTTP {status}: {' '.join(response.text.split())[:200]}"
    if status == 429:
        return Outcome(pause_for=retry_after(response, options.default_retry_after), error=error)
    if status >= 500:
        return Outcome(retry_in=backoff(attempts, options), error=error)
    if status in (401, 403, 404) or (format == "zkillboard" and status in (400, 410)):
        # A deleted Discord webhook answers 404 (401 with a bad token); zKillboard says no to an app with 403.
        return Outcome(refuse=f"HTTP {status}", error=error)
    return Outcome(error=error)


# ------------------------------------------------------------------------------------------------- the sender


def register_zkillboard(conn: db.Connection, url: str, *, enabled: bool) -> None:
    """Make zKillboard a destination at this URL (or stop posting to it) as ZKILLBOARD_PUSH says; a refusal is
    kept, so that a restart does not post again to a zKillboard that refused the app."""
    if enabled or db.get_webhook(conn, ZKILLBOARD_NAME) is not None:
        db.keep_webhook(conn, ZKILLBOARD_NAME, url, format="zkillboard", enabled=enabled)
    conn.commit()


def post(session: requests.Session, format: str, url: str, killmail: Mapping,
         options: SenderOptions) -> tuple[requests.Response | None, str]:
    """Post one killmail; the response, or None and the error when it timed out or never connected."""
    target, body = request_for(format, url, killmail)
    allowed = max(options.deadline, options.timeout)
    deadline = time.monotonic() + allowed
    try:
        # Never to another address than the one added (a 307 would send the body on, to an internal host
        # perhaps), and never more of an answer than esi reads from ESI, nor for longer than the deadline.
        response = session.post(target, data=json.dumps(body), timeout=options.timeout, allow_redirects=False,
                                stream=True,
                                headers={"Content-Type": "application/json", "User-Agent": options.user_agent})
        esi.read_body(response, deadline=deadline, what=f"POST {destination(target)}")
        return response, ""
    except esi.MalformedResponse:
        return None, f"answer larger than {esi.MAX_BODY_BYTES} bytes"
    except esi.ServerError:
        return None, f"answer not read within {allowed:.0f} s"
    except requests.RequestException as exc:
        # requests' messages quote the URL, in parts and in several spellings: none of that text is kept.
        return None, f"{type(exc).__name__} posting to {destination(target)}"


def destination(url: str) -> str:
    """A destination as error text may name it: its scheme and host. The rest of a webhook's URL is a secret (a
    Discord token in the path, a token in the query, a password before the host)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}"


def deliver_next(conn: db.Connection, session: requests.Session, options: SenderOptions, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> bool:
    """Post the next due outbox row and record what came of it; False when nothing was due."""
    row = None
    try:
        row = db.claim_notification(conn, clock(), name_wait=options.name_wait)
        if row is None:
            conn.rollback()
            return False
        stored = db.notification_killmail(conn, row["killmail_id"])
        if stored is None:  # deleted since: given up below, as a row that cannot be posted is
            raise LookupError(f"killmail {row['killmail_id']} is no longer stored")
        killmail = post_fields(conn, stored, row)
        response, error = post(session, row["format"], row["url"], killmail, options)
        outcome = judge(row["format"], response, error, row["attempts"] + 1, options)
        record(conn, row, outcome, clock(), options)
        conn.commit()
        return True
    except Exception as exc:
        conn.rollback()
        if row is None or isinstance(exc, psycopg.OperationalError):
            raise  # no row in hand, or PostgreSQL went away: serve() connects again
        # Whatever a destination's answer broke must not stop the sender: this row would be first in line again
        # after a restart, and every other destination would wait behind it.
        reason = f"failed: {type(exc).__name__}: {hide_url(str(exc), row['url'])}"[:300]
        log.error("❌ posting killmail %s to %s %s; given up", row["killmail_id"], row["name"], reason)
        db.retry_notification(conn, row["id"], reason, None)
        conn.commit()
        return True
    except BaseException:
        conn.rollback()
        raise


def post_fields(conn: db.Connection, killmail: Mapping, webhook: Mapping) -> dict:
    """What a post to this webhook says about a killmail of db.notification_killmail: with names and side."""
    return {**with_names(conn, killmail), "side": side_of(killmail, webhook)}


def hide_url(text: str, url: str) -> str:
    """Text with a webhook's URL, and each secret part of it, replaced by its destination (scheme and host)."""
    parts = urlsplit(url)
    for secret in (url, parts.path + (f"?{parts.query}" if parts.query else ""), parts.query, parts.password):
        if secret and len(secret) > 1:
            text = text.replace(secret, destination(url) if secret == url else "…")
    return text


def record(conn: db.Connection, row: Mapping, outcome: Outcome, now: datetime, options: SenderOptions) -> None:
    """Write an attempt's outcome to the outbox row and its destination."""
    if outcome.delivered:
        db.mark_delivered(conn, row["id"], now)
        if row["format"] == "zkillboard":
            db.pause_webhook(conn, row["webhook_id"], now + timedelta(seconds=options.zkillboard_interval))
        return
    if outcome.pause_for is not None:
        db.pause_webhook(conn, row["webhook_id"], now + timedelta(seconds=outcome.pause_for))
        db.retry_notification(conn, row["id"], outcome.error, now, counted=False)
        log.info("⏸ %s asks us to wait %.1f s", row["name"], outcome.pause_for)
        return
    if outcome.refuse is not None:
        db.refuse_webhook(conn, row["webhook_id"], outcome.refuse)
        db.retry_notification(conn, row["id"], outcome.error, now, counted=False)  # sent if it is added again
        log.warning("🚫 %s refused us (%s): nothing more is sent to it", row["name"], outcome.refuse)
        return
    retry_at = None if outcome.retry_in is None else now + timedelta(seconds=outcome.retry_in)
    db.retry_notification(conn, row["id"], outcome.error, retry_at)
    if retry_at is None:
        log.warning("❌ gave up posting killmail %s to %s: %s", row["killmail_id"], row["name"], outcome.error)


def run(conn: db.Connection, options: SenderOptions, stop: threading.Event) -> None:
    """Deliver due rows until stop is set (the row in hand is finished first); prune old rows now and then."""
    pruned_at = -options.prune_every
    with requests.Session() as session:
        while not stop.is_set():
            if time.monotonic() - pruned_at >= options.prune_every:
                db.prune_outbox(conn, datetime.now(UTC), keep_days=options.keep_days)
                conn.commit()
                pruned_at = time.monotonic()
            if not deliver_next(conn, session, options):
                stop.wait(options.poll)


def serve(connect: Callable[[], db.Connection], options: SenderOptions, stop: threading.Event) -> None:
    """run() until stop is set, on a new connection whenever PostgreSQL went away (waiting longer each time)."""
    failures = 0
    while not stop.is_set():
        try:
            with connect() as conn:
                failures = 0
                run(conn, options, stop)
        except psycopg.OperationalError as exc:
            failures += 1
            log.warning("⚠️ PostgreSQL unreachable (%s); trying again", describe(exc))
            stop.wait(exponential(failures + 1, base=options.poll, cap=60.0))

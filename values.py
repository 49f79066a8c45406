"""ISK values of killmails, from ESI's market prices.

The rule: every item entry counts its quantity_destroyed toward the destroyed value and its quantity_dropped
toward the dropped value, at its type's price; the victim's ship is destroyed at its price; items inside a
container count like any other; a blueprint copy (singleton 2) counts BLUEPRINT_COPY_VALUE each, whatever its
original sells for. A type's price is its average_price, else its adjusted_price, else 0. Total = destroyed +
dropped. Computed in Python when a batch is saved, from prices loaded once per process; a killmail saved while
no prices were known is valued by the next job that has them (value_missing).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

import db
from esi import EsiError
from killmail_model import ItemRow

log = logging.getLogger(__name__)

BLUEPRINT_COPY = 2                   # an item's singleton for a blueprint copy
BLUEPRINT_COPY_VALUE = Decimal("0.01")  # a copy has no market: a token value, as killboards show it
PRICES_KEY = "markets/prices"        # its esi_cache row
MIN_REFRESH = timedelta(hours=1)     # ESI's prices change daily: never asked more often than this
RECHECK = timedelta(minutes=1)       # how soon prices still stale (refreshed elsewhere, or failed) are looked at again
FIRST_LOAD_WAIT = 20.0               # seconds a process with no prices waits for the one loading them


def price_of(row: Mapping[str, Any]) -> Decimal:
    """A type's price: its average price, else its adjusted price, else 0."""
    for key in ("average_price", "adjusted_price"):
        if row.get(key) is not None:
            return Decimal(str(row[key]))
    return Decimal(0)


class StoredItem(NamedTuple):
    """What valuing reads of a stored item: the four columns db.killmails_without_value gives each item."""

    item_type_id: int
    singleton: int
    quantity_destroyed: int | None
    quantity_dropped: int | None


def killmail_values(ship_type_id: int, items: Iterable[ItemRow | StoredItem], prices: Mapping[int, Decimal]
                    ) -> tuple[Decimal, Decimal, Decimal]:
    """(destroyed, dropped, total) of a killmail: its victim's ship and its items (killmail_model's rows, nested
    ones included, or the stored items' columns) at `prices`."""
    destroyed = prices.get(ship_type_id, Decimal(0))
    dropped = Decimal(0)
    for item in items:
        each = BLUEPRINT_COPY_VALUE if item.singleton == BLUEPRINT_COPY else prices.get(item.item_type_id, Decimal(0))
        destroyed += each * (item.quantity_destroyed or 0)
        dropped += each * (item.quantity_dropped or 0)
    return destroyed, dropped, destroyed + dropped


REVALUE_BATCH = 500  # killmails valued per transaction by revalue


def value_missing(conn: db.Connection, prices: Mapping[int, Decimal], *, limit: int, notify_max_age: int) -> list[int]:
    """Value up to `limit` stored killmails that have no value yet (saved while prices were unknown) and write
    their outbox rows for the webhooks with a minimum value, which could not judge them before; commits and
    returns their ids. Rows another process is valuing are skipped, so each is valued (and announced) once."""
    rows = db.killmails_without_value(conn, limit=limit)
    worth = []
    for row in rows:
        items = [StoredItem(*item) for item in row["items"]]
        worth.append((row["killmail_id"], *killmail_values(row["victim_ship_type_id"], items, prices)))
    db.set_killmail_values(conn, worth)
    ids = [row["killmail_id"] for row in rows]
    db.queue_notifications(conn, ids, max_age=notify_max_age, valued_late=True)
    conn.commit()
    return ids


def revalue(conn: db.Connection, prices: Mapping[int, Decimal], *, notify_max_age: int) -> int:
    """Value every stored killmail whose value is missing (saved before prices were known); returns how many."""
    done = 0
    while ids := value_missing(conn, prices, limit=REVALUE_BATCH, notify_max_age=notify_max_age):
        done += len(ids)
    return done


class PriceBook:
    """One process's prices: loaded from market_prices once, refreshed from ESI when its Expires passed (at
    most hourly, by one process at a time; the others load what it stored). A process with no prices yet waits
    up to FIRST_LOAD_WAIT for the one loading them, or loads them itself, so its first batch is valued."""

    def __init__(self) -> None:
        self.prices: dict[int, Decimal] = {}
        self.expires_at: datetime | None = None
        self._lock = threading.Lock()

    def refresh(self, conn: db.Connection, esi, now: datetime) -> dict[int, Decimal]:
        """The prices, refreshed first if they expired; a failed refresh keeps the old ones (and logs it)."""
        with self._lock:
            if self.expires_at is not None and now < self.expires_at:
                return self.prices
            try:
                self._refresh(conn, esi, now)
            except EsiError as exc:
                log.warning("market prices not refreshed: %s", exc)
                self.expires_at = now + RECHECK
            return self.prices

    def _refresh(self, conn: db.Connection, esi, now: datetime) -> None:
        if _expired(db.get_esi_cache(conn, PRICES_KEY), now) and self._take_lock(conn):
            try:
                cached = db.get_esi_cache(conn, PRICES_KEY)  # the process waited for may have stored them
                if _expired(cached, now):
                    etag = cached["etag"] if cached and self.prices else None
                    answer = esi.get_market_prices(etag=etag)
                    expires_at = max(now + MIN_REFRESH, now + timedelta(seconds=answer.expires_in or 0))
                    if answer.prices is not None:
                        db.save_market_prices(conn, answer.prices, now)
                    db.save_esi_cache(conn, PRICES_KEY, answer.etag, expires_at)
                conn.commit()
            finally:
                conn.rollback()
                db.unlock(conn, db.LOCK_PRICES, 0)
                conn.commit()
        self._load(conn, now)

    def _take_lock(self, conn: db.Connection) -> bool:
        """The refresh lock: at once or not at all while prices are loaded; else waiting for its holder."""
        if self.prices:
            return db.try_lock(conn, db.LOCK_PRICES, 0)
        return db.wait_lock(conn, db.LOCK_PRICES, 0, timeout=FIRST_LOAD_WAIT)

    def _load(self, conn: db.Connection, now: datetime) -> None:
        self.prices = db.market_prices(conn)
        cached = db.get_esi_cache(conn, PRICES_KEY)
        conn.commit()
        expires_at = cached["expires_at"] if cached else None
        # Another process may be refreshing them right now: look again soon.
        self.expires_at = expires_at if expires_at and expires_at > now else now + RECHECK


def _expired(cached: Mapping | None, now: datetime) -> bool:
    """Whether the stored prices (their esi_cache row) are missing or past their Expires."""
    return cached is None or cached["expires_at"] is None or cached["expires_at"] <= now

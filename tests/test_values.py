"""values.py: ISK values by hand computation on the real sample killmail; nested items and blueprint copies;
the process's price book, loaded from market_prices and refreshed from ESI only when expired."""
from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

import db
import values
from esi import MarketPrices, ServerError
from helpers import wait_until, waits_for_a_lock
from killmail_model import parse_killmail

SAMPLE = json.loads((Path(__file__).resolve().parent / "data/killmail_134265477.json").read_text())
NOW = datetime(2026, 3, 25, 15, 0, tzinfo=UTC)

# Prices of a few of the sample's types; the others have none (0).
PRICES = {17478: Decimal("30000000.00"),  # the victim's ship
          17482: Decimal("1000000"),      # one destroyed (flag 28), one dropped (flag 27)
          22542: Decimal("500000"),       # one dropped, two destroyed
          2488: Decimal("1000"),          # 10 destroyed
          82313: Decimal("10")}           # 16379 destroyed, 14108 dropped


def sample_values(prices):
    killmail = parse_killmail(SAMPLE, killmail_id=134265477, killmail_hash="f" * 40)
    return values.killmail_values(killmail.row.victim_ship_type_id, killmail.items, prices)


def test_the_sample_killmail_is_valued_as_by_hand():
    destroyed = 30_000_000 + 1_000_000 + 2 * 500_000 + 10 * 1_000 + 16_379 * 10
    dropped = 1_000_000 + 500_000 + 14_108 * 10
    assert (destroyed, dropped) == (32_173_790, 1_641_080)
    assert sample_values(PRICES) == (Decimal(32_173_790), Decimal(1_641_080), Decimal(33_814_870))


def test_without_prices_a_killmail_is_worth_nothing():
    assert sample_values({}) == (0, 0, 0)


def test_nested_items_count_and_a_blueprint_copy_has_a_token_value():
    body = {"killmail_id": 1, "killmail_time": "2026-03-25T14:26:36Z", "solar_system_id": 30000142,
            "attackers": [{"damage_done": 1, "final_blow": True, "security_status": 0.0}],
            "victim": {"ship_type_id": 10, "damage_taken": 1, "items": [
                {"flag": 5, "item_type_id": 20, "singleton": 0, "quantity_dropped": 1, "items": [
                    {"flag": 5, "item_type_id": 30, "singleton": 0, "quantity_destroyed": 3},
                    {"flag": 5, "item_type_id": 40, "singleton": 2, "quantity_dropped": 2}]},
                {"flag": 5, "item_type_id": 40, "singleton": 1, "quantity_destroyed": 1}]}}
    killmail = parse_killmail(body, killmail_id=1, killmail_hash="f" * 40)
    prices = {10: Decimal(100), 20: Decimal(7), 30: Decimal(5), 40: Decimal(1000)}
    # ship 100 + 3 x 5 nested + an original blueprint 1000 destroyed; container 7 + two copies at 0.01 dropped
    assert values.killmail_values(10, killmail.items, prices) == (
        Decimal(1115), Decimal("7.02"), Decimal("1122.02"))


@pytest.mark.parametrize(("row", "price"), [
    ({"average_price": 2.5, "adjusted_price": 3}, Decimal("2.5")),
    ({"adjusted_price": 3}, Decimal(3)),
    ({"average_price": None, "adjusted_price": None}, Decimal(0)),
    ({}, Decimal(0)),
])
def test_price_of_takes_average_else_adjusted_else_zero(row, price):
    assert values.price_of(row) == price


class FakePrices:
    """ESI's /markets/prices/ as a callable: counts the calls, answers with fixed entries."""

    def __init__(self, prices, *, expires_in=3600.0):
        self.calls = 0
        self.prices, self.expires_in = prices, expires_in

    def get_market_prices(self, *, etag=None):
        self.calls += 1
        return MarketPrices(self.prices, '"v1"', self.expires_in)


def test_price_book_asks_esi_once_until_expiry(conn):
    esi = FakePrices([{"type_id": 17478, "average_price": 30e6, "adjusted_price": 1},
                      {"type_id": 2488, "adjusted_price": 1000}])
    book = values.PriceBook()
    assert book.refresh(conn, esi, NOW) == {17478: Decimal("30000000.0"), 2488: Decimal(1000)}
    assert book.refresh(conn, esi, NOW + timedelta(minutes=59)) is book.prices
    assert esi.calls == 1
    other = values.PriceBook()  # another process: loads what the first stored, asks ESI nothing
    assert other.refresh(conn, esi, NOW + timedelta(minutes=1)) == book.prices
    assert esi.calls == 1
    assert db.get_esi_cache(conn, values.PRICES_KEY)["etag"] == '"v1"'
    book.refresh(conn, esi, NOW + timedelta(hours=1, seconds=1))
    assert esi.calls == 2


def test_price_book_refreshes_at_most_hourly_whatever_expires_says(conn):
    esi = FakePrices([{"type_id": 1, "average_price": 1}], expires_in=5)
    book = values.PriceBook()
    book.refresh(conn, esi, NOW)
    book.refresh(conn, esi, NOW + timedelta(minutes=30))
    assert esi.calls == 1


class FailingPrices:
    calls = 0

    def get_market_prices(self, *, etag=None):
        self.calls += 1
        raise ServerError("GET /markets/prices/ -> 503")


def test_a_failed_price_refresh_keeps_the_old_prices_and_is_tried_again_a_minute_later(conn):
    book = values.PriceBook()
    book.refresh(conn, FakePrices([{"type_id": 1, "average_price": 4}]), NOW)
    failing = FailingPrices()
    later = NOW + timedelta(hours=2)
    assert book.refresh(conn, failing, later) == {1: Decimal(4)}
    assert book.refresh(conn, failing, later + timedelta(seconds=30)) == {1: Decimal(4)}
    assert failing.calls == 1
    book.refresh(conn, failing, later + values.RECHECK)
    assert failing.calls == 2


def test_unchanged_prices_keep_the_stored_ones_and_extend_their_expiry(conn):
    book = values.PriceBook()
    book.refresh(conn, FakePrices([{"type_id": 1, "average_price": 4}]), NOW)
    unchanged = FakePrices(None)  # a 304: MarketPrices(None, ...)
    later = NOW + timedelta(hours=2)
    assert book.refresh(conn, unchanged, later) == {1: Decimal(4)}
    assert book.expires_at == later + values.MIN_REFRESH and unchanged.calls == 1


def test_a_process_without_prices_waits_for_the_one_loading_them_instead_of_saving_unvalued(conn, database_url):
    loader = db.connect(database_url)
    assert db.try_lock(loader, db.LOCK_PRICES, 0)
    loader.commit()
    esi, got = FakePrices([{"type_id": 1, "average_price": 9}]), {}
    waiting = threading.Thread(target=lambda: got.update(prices=values.PriceBook().refresh(conn, esi, NOW)))
    waiting.start()
    wait_until(lambda: waits_for_a_lock(loader, conn.info.backend_pid), timeout=10,
               what="the second process waiting for the loader")
    db.save_market_prices(loader, [{"type_id": 1, "average_price": 4}], NOW)
    db.save_esi_cache(loader, values.PRICES_KEY, '"v0"', NOW + timedelta(hours=1))
    loader.commit()
    db.unlock(loader, db.LOCK_PRICES, 0)
    loader.commit()
    waiting.join(10)
    loader.close()
    assert got["prices"] == {1: Decimal(4)} and esi.calls == 0  # the loader's prices, no second ESI call


def test_a_loader_that_takes_too_long_leaves_the_prices_to_the_next_look(conn, database_url, monkeypatch):
    monkeypatch.setattr(values, "FIRST_LOAD_WAIT", 0.2)
    with db.connect(database_url) as loader:
        assert db.try_lock(loader, db.LOCK_PRICES, 0)
        loader.commit()
        book, esi = values.PriceBook(), FakePrices([{"type_id": 1, "average_price": 9}])
        assert book.refresh(conn, esi, NOW) == {} and esi.calls == 0
        assert book.expires_at == NOW + values.RECHECK
    assert book.refresh(conn, esi, NOW + values.RECHECK) == {1: Decimal(9)}  # the lock died with the loader

"""db.py and schema.sql against the real PostgreSQL."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

import db
from bench.row_by_row import save_killmail_row_by_row
from helpers import TOKEN_KEYS, ledger_spent, wait_until, waits_for_a_lock
from killmail_model import parse_killmail
from tokens import TokenVault

SAMPLE = json.loads((Path(__file__).resolve().parent / "data/killmail_134265477.json").read_text())
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def add_user(conn, character_id, **columns):
    values = {"character_id": character_id, "character_name": f"Pilot {character_id}", "access_token": "a",
              "refresh_token": f"r{character_id}", "expires_at": NOW + timedelta(minutes=20), **columns}
    names = ", ".join(values)
    conn.execute(f"INSERT INTO users ({names}) VALUES ({', '.join(['%s'] * len(values))})", list(values.values()))
    conn.commit()


def sample(killmail_id=SAMPLE["killmail_id"]):
    body = dict(SAMPLE, killmail_id=killmail_id)
    return parse_killmail(body, killmail_id=killmail_id, killmail_hash="h" * 40)


def test_schema_applies_twice_and_keeps_rows(conn):
    add_user(conn, 1)
    db.apply_schema(conn)
    conn.commit()
    assert conn.execute("SELECT count(*) AS n FROM users").fetchone()["n"] == 1


def test_a_row_with_only_the_web_apps_columns_is_a_due_user(conn):
    conn.execute("INSERT INTO users (character_id, character_name, access_token, refresh_token, expires_at) "
                 "VALUES (5, 'Five', 'a', 'r', now())")
    conn.commit()
    due = db.claim_due_users(conn, NOW, interval=300, stale_after=7200)
    assert [u["character_id"] for u in due] == [5]


def test_claim_due_users_claims_once_until_released_or_stale(conn):
    add_user(conn, 1)
    add_user(conn, 2, last_sync_at=NOW - timedelta(seconds=100))  # not due at 300 s
    add_user(conn, 3, last_sync_at=NOW - timedelta(seconds=400))
    first = db.claim_due_users(conn, NOW, interval=300, stale_after=7200)
    assert sorted(u["character_id"] for u in first) == [1, 3]
    assert db.claim_due_users(conn, NOW, interval=300, stale_after=7200) == []
    db.release_user(conn, 3)
    assert [u["character_id"] for u in db.claim_due_users(conn, NOW, interval=300, stale_after=7200)] == [3]
    later = NOW + timedelta(hours=3)
    assert sorted(u["character_id"] for u in db.claim_due_users(conn, later, interval=300, stale_after=7200)) \
        == [1, 2, 3]


def test_own_interval_wins_and_quiet_pilots_are_polled_less(conn):
    add_user(conn, 1, last_sync_at=NOW - timedelta(seconds=400), sync_interval_seconds=600)
    add_user(conn, 2, last_sync_at=NOW - timedelta(seconds=400), sync_interval_seconds=60)
    add_user(conn, 3, last_sync_at=NOW - timedelta(seconds=400), created_at=NOW - timedelta(days=10),
             last_new_killmail_at=NOW - timedelta(days=8))
    add_user(conn, 4, last_sync_at=NOW - timedelta(seconds=1300), created_at=NOW - timedelta(days=10),
             last_new_killmail_at=NOW - timedelta(days=8))
    # A quiet pilot's own interval still wins as it is: not stretched fourfold, nor capped at a day.
    add_user(conn, 5, last_sync_at=NOW - timedelta(seconds=100), sync_interval_seconds=90,
             created_at=NOW - timedelta(days=40), last_new_killmail_at=NOW - timedelta(days=35))
    add_user(conn, 6, last_sync_at=NOW - timedelta(days=1, hours=1), sync_interval_seconds=2 * 86400)
    due = {u["character_id"] for u in db.due_users(conn, NOW, interval=300, stale_after=7200)}
    assert due == {2, 4, 5}


def test_stranded_refs_are_those_no_live_owner_will_fetch(conn):
    add_user(conn, 1)                                   # live
    add_user(conn, 2)                                   # needs a new login
    db.mark_revoked(conn, 2, "r2", "invalid_grant")
    db.store_refs(conn, "character", 1, [(10, "a"), (11, "b")])
    db.store_refs(conn, "character", 2, [(11, "b"), (12, "c"), (13, "d"), (14, "e")])
    db.store_refs(conn, "corporation", 98, [(15, "f")])   # a corporation no member may read any more
    db.save_killmails(conn, [sample(13)])                 # stored already
    db.record_ref_failure(conn, 14, "boom", NOW, permanent=True, max_attempts=3)  # given up
    conn.commit()
    stranded = db.stranded_refs(conn, NOW, max_attempts=3, limit=10)
    assert [r["killmail_id"] for r in stranded] == [15, 12]  # 11 is also the live pilot's, 10 only his
    assert [r["killmail_id"] for r in db.stranded_refs(conn, NOW, max_attempts=3, limit=1)] == [15]
    conn.execute("UPDATE users SET refresh_token = 'a new login' WHERE character_id = 2")
    assert [r["killmail_id"] for r in db.stranded_refs(conn, NOW, max_attempts=3, limit=10)] == [15]


def test_a_refreshed_grant_is_stored_only_over_the_token_it_was_refreshed_from(conn):
    add_user(conn, 1, refresh_token="old")
    assert db.store_tokens(conn, 1, "a1", "r1", NOW, replaces="old") is True
    conn.execute("UPDATE users SET refresh_token = 'web-login', access_token = 'web' WHERE character_id = 1")
    # A job that refreshed r1 while the web app wrote a new login: the login stays.
    assert db.store_tokens(conn, 1, "a2", "r2", NOW, replaces="r1") is False
    user = db.get_user(conn, 1)
    assert (user["refresh_token"], user["access_token"]) == ("web-login", "web")


def test_a_token_the_web_app_already_replaced_is_never_marked_revoked(conn):
    add_user(conn, 1, refresh_token="old")
    conn.execute("UPDATE users SET refresh_token = 'web-login' WHERE character_id = 1")
    assert db.mark_revoked(conn, 1, "old", "invalid_grant") is False
    user = db.get_user(conn, 1)
    assert user["revoked"] is False and user["token_error"] is None and user["last_sync_status"] != "needs_relogin"
    assert db.mark_revoked(conn, 1, "web-login", "invalid_grant") is True
    assert db.get_user(conn, 1)["revoked"] is True


def test_a_revoked_token_is_not_due_until_a_new_one_is_written(conn):
    add_user(conn, 1)
    db.mark_revoked(conn, 1, "r1", "invalid_grant")
    conn.commit()
    assert db.get_user(conn, 1)["revoked"] is True
    assert db.due_users(conn, NOW, interval=300, stale_after=7200) == []
    conn.execute("UPDATE users SET refresh_token = 'new-login' WHERE character_id = 1")
    assert db.get_user(conn, 1)["revoked"] is False
    assert [u["character_id"] for u in db.due_users(conn, NOW, interval=300, stale_after=7200)] == [1]
    stored = conn.execute("SELECT revoked_token_sha256 FROM users").fetchone()["revoked_token_sha256"]
    assert "r1" not in stored and len(stored) == 64



def test_a_revoked_sealed_token_is_told_by_its_stored_value_without_a_key(conn):
    sealed = TokenVault(TOKEN_KEYS[:1]).seal("r1")
    add_user(conn, 1, refresh_token=sealed)
    assert db.mark_revoked(conn, 1, sealed, "invalid_grant") is True
    assert db.get_user(conn, 1)["revoked"] is True
    assert db.due_users(conn, NOW, interval=300, stale_after=7200) == []


def test_stored_refresh_tokens_come_in_batches_of_rows_that_hold_one(conn):
    for character_id, token in [(1, "r1"), (2, None), (3, ""), (4, "r4"), (5, "r5")]:
        add_user(conn, character_id, refresh_token=token)
    assert [r["character_id"] for r in db.stored_refresh_tokens(conn, limit=2)] == [1, 4]
    assert [(r["character_id"], r["refresh_token"]) for r in db.stored_refresh_tokens(conn, after=4)] == [(5, "r5")]


def test_a_token_rewritten_under_another_key_replaces_only_what_was_read_and_stays_revoked(conn):
    vault = TokenVault(TOKEN_KEYS[:1])
    add_user(conn, 1, refresh_token="r1")
    add_user(conn, 2, refresh_token="r2")
    db.mark_revoked(conn, 2, "r2", "invalid_grant")
    sealed1, sealed2 = vault.reseal("r1"), vault.reseal("r2")
    assert db.replace_stored_token(conn, 1, sealed1, replaces="r1") is True
    assert db.replace_stored_token(conn, 2, sealed2, replaces="r2") is True
    assert db.replace_stored_token(conn, 1, vault.reseal("r1"), replaces="r1") is False  # a login came meanwhile
    assert (db.get_user(conn, 1)["refresh_token"], db.get_user(conn, 1)["revoked"]) == (sealed1, False)
    assert db.get_user(conn, 2)["revoked"] is True and db.get_user(conn, 2)["refresh_token"] == sealed2


def add_member(conn, character_id, corporation_id):
    """A pilot whose grant has the corporation scope, in that corporation."""
    add_user(conn, character_id, corporation_id=corporation_id, scopes=f"esi-killmails.read_killmails.v1 "
             f"{db.CORPORATION_SCOPE}")


def corporations_due(conn, now) -> dict[int, int]:
    """corporation id -> the member its sync would use, at `now`."""
    return {r["corporation_id"]: r["character_id"]
            for r in db.due_corporations(conn, now, interval=300, stale_after=7200)}


def test_a_member_found_without_the_director_role_is_asked_again_a_week_later(conn):
    add_member(conn, 1, 98)
    db.set_director(conn, 1, False, checked_at=NOW)
    conn.commit()
    assert corporations_due(conn, NOW + timedelta(days=6)) == {}
    assert corporations_due(conn, NOW + timedelta(days=7)) == {98: 1}
    # Members never asked come before one asked again; a known director before both.
    add_member(conn, 3, 98)
    assert corporations_due(conn, NOW + timedelta(days=7)) == {98: 3}
    add_member(conn, 2, 98)
    db.set_director(conn, 2, True, checked_at=NOW)
    assert corporations_due(conn, NOW + timedelta(days=7)) == {98: 2}


def test_a_member_who_changed_corporation_is_asked_again_at_once(conn):
    add_member(conn, 1, 98)
    db.set_director(conn, 1, False, checked_at=NOW)
    db.save_profile(conn, 1, corporation_id=98, checked_at=NOW)  # the same corporation: still no director
    assert corporations_due(conn, NOW + timedelta(hours=1)) == {}
    db.save_profile(conn, 1, corporation_id=99, checked_at=NOW)
    assert corporations_due(conn, NOW + timedelta(hours=1)) == {99: 1}
    db.set_director(conn, 1, True, checked_at=NOW)
    db.save_profile(conn, 1, corporation_id=100, checked_at=NOW)  # a director of 99 is not known as one of 100
    user = db.get_user(conn, 1)
    assert (user["is_director"], user["director_checked_at"]) == (None, None)


def test_refs_pending_claimed_once_and_failures_bounded(conn, database_url):
    add_user(conn, 1)
    add_user(conn, 2)
    db.store_refs(conn, "character", 1, [(10, "a"), (11, "b")])
    db.store_refs(conn, kind="character", owner_id=2, refs=[(11, "b"), (12, "c")])
    conn.commit()
    pending = db.pending_refs(conn, kind="character", owner_id=1, now=NOW, max_attempts=3)
    assert [r["killmail_id"] for r in pending] == [11, 10]
    with db.connect(database_url) as other:
        first = db.claim_refs(other, [10, 11], NOW, seconds=600)
        other.commit()
        assert sorted(r["killmail_id"] for r in first) == [10, 11]
        assert [r["killmail_id"] for r in db.claim_refs(conn, [11, 12], NOW, seconds=600)] == [12]
        later = NOW + timedelta(seconds=601)
        assert [r["killmail_id"] for r in db.claim_refs(conn, [11], later, seconds=600)] == [11]
        db.release_refs(conn, [11])
        conn.commit()
    # The claiming process is gone (its connection closed): its claim on 10 is void at once.
    assert [r["killmail_id"] for r in db.claim_refs(conn, [10], NOW, seconds=600)] == [10]
    db.record_ref_failure(conn, 10, "InvalidHash: 422", NOW, permanent=True, max_attempts=3)
    pending = db.pending_refs(conn, "character", 1, NOW + timedelta(days=1), max_attempts=3)
    assert [r["killmail_id"] for r in pending] == [11]
    db.record_ref_failure(conn, 11, "ServerError", NOW, permanent=False, max_attempts=3)
    assert db.pending_refs(conn, "character", 1, NOW, max_attempts=3) == []
    pending = db.pending_refs(conn, "character", 1, NOW + timedelta(minutes=2), max_attempts=3)
    assert [r["killmail_id"] for r in pending] == [11]


def test_a_claim_skips_references_another_claim_is_locking_and_never_waits_for_it(conn, database_url):
    """Two jobs of pilots who share killmails claim at once. A claim that waited for the other's locked rows
    could deadlock with it (each locking in its own plan's order); it takes the rows free now instead."""
    add_user(conn, 1)
    db.store_refs(conn, "character", 1, [(10, "a"), (11, "b"), (12, "c")])
    conn.commit()
    with db.connect(database_url) as other:
        assert sorted(r["killmail_id"] for r in db.claim_refs(other, [10, 11], NOW, seconds=600)) == [10, 11]
        # `other` has not committed: its rows are locked. A claim that waited for them would fail here.
        conn.execute("SET lock_timeout = '2s'")
        assert [r["killmail_id"] for r in db.claim_refs(conn, [12, 11, 10], NOW, seconds=600)] == [12]
        conn.commit()
        other.commit()
        assert db.claim_refs(conn, [10, 11], NOW, seconds=600) == []  # claimed by `other`, whose session is live
    conn.execute("RESET lock_timeout")


def test_names_resolved_and_unknown_are_kept_as_esi_said_them(conn):
    day = timedelta(days=1)
    db.save_names(conn, [{"id": 3, "category": "character", "name": "Pilot Three"}], [1, 2], NOW, unknown_for=day)
    db.save_names(conn, [{"id": 2, "category": "corporation", "name": "Corp Two"}], [3], NOW + day, unknown_for=day)
    rows = conn.execute("SELECT id, category, name, resolved_at, unknown_until FROM names ORDER BY id").fetchall()
    conn.commit()
    assert [tuple(r.values()) for r in rows] == [
        (1, None, None, None, NOW + day),
        (2, "corporation", "Corp Two", NOW + day, None),          # named at last: no longer unknown
        (3, "character", "Pilot Three", NOW, NOW + 2 * day),      # a name once known is kept
    ]


def race(conn, database_url, hold, both, then) -> list[psycopg.Error]:
    """Two sessions write rows they share: the first writes with `hold` and keeps its transaction open; the second
    writes with `both` (in a thread) until it waits for the first; the first then writes with `then` and commits.
    What either failed with: a deadlock, where the second holds a row the first then waits for."""
    failures: list[psycopg.Error] = []
    with db.connect(database_url) as first, db.connect(database_url) as second:
        hold(first)

        def second_writes() -> None:
            try:
                both(second)
                second.commit()
            except psycopg.Error as exc:
                failures.append(exc)
        other = threading.Thread(target=second_writes)
        other.start()
        wait_until(lambda: waits_for_a_lock(conn, second.info.backend_pid), timeout=10,
                   what="the second session waiting for the first")
        try:
            then(first)
            first.commit()
        except psycopg.Error as exc:
            failures.append(exc)
            first.rollback()
        other.join(timeout=30)
    return failures


def test_naming_overlapping_ids_at_once_never_deadlocks(conn, database_url):
    """Two processes name ids they share. Names stored in ESI's order (2 then 1 here, against 1 then 2)
    deadlocked; in id order the second waits, holding nothing."""
    def named(*ids):
        return lambda session: db.save_names(session, [{"id": i, "category": "character", "name": f"N{i}"}
                                                      for i in ids], [], NOW, unknown_for=timedelta(1))
    assert race(conn, database_url, named(1), named(2, 1), named(2)) == []
    assert conn.execute("SELECT count(*) AS n FROM names").fetchone()["n"] == 2


def test_pilots_listing_shared_killmails_at_once_never_deadlock(conn, database_url):
    """Two jobs store the references their lists share. Rows stored in list order (12 then 11 here, against 11
    then 12) deadlocked; in id order the second waits, holding none."""
    add_user(conn, 1)
    add_user(conn, 2)

    def listed(owner, *ids):
        return lambda session: db.store_refs(session, "character", owner, [(i, f"h{i}") for i in ids])
    assert race(conn, database_url, listed(1, 11), listed(2, 12, 11), listed(1, 12)) == []
    links = conn.execute("SELECT character_id, killmail_id FROM character_killmails ORDER BY 1, 2").fetchall()
    assert [tuple(r.values()) for r in links] == [(1, 11), (1, 12), (2, 11), (2, 12)]


def test_save_killmails_stores_everything_once(conn):
    killmail = sample()
    assert db.save_killmails(conn, [killmail]) == [killmail.killmail_id]
    assert db.save_killmails(conn, [killmail]) == []
    conn.commit()
    row = conn.execute("SELECT * FROM killmails").fetchone()
    assert row["raw"] == SAMPLE
    assert row["victim_character_id"] == 2121652582 and row["position_x"] == SAMPLE["victim"]["position"]["x"]
    assert conn.execute("SELECT count(*) AS n FROM attackers").fetchone()["n"] == 1
    items = conn.execute("SELECT item_type_id, flag, quantity_destroyed, quantity_dropped FROM killmail_items "
                         "WHERE item_type_id = 82313 ORDER BY item_index").fetchall()
    assert [(i["quantity_destroyed"], i["quantity_dropped"]) for i in items] == [(16379, None), (None, 14108)]
    assert conn.execute("SELECT count(*) AS n FROM killmail_items").fetchone()["n"] == 18


def test_row_by_row_path_matches_the_batch_path(conn):
    assert save_killmail_row_by_row(conn, sample(1)) is True
    assert save_killmail_row_by_row(conn, sample(1)) is False
    db.save_killmails(conn, [sample(2)])
    counts = conn.execute("SELECT killmail_id, count(*) AS n FROM killmail_items GROUP BY 1 ORDER BY 1").fetchall()
    assert [c["n"] for c in counts] == [18, 18]


def test_binary_copy_stores_every_column_as_the_row_by_row_path_does(conn):
    body = dict(SAMPLE, killmail_id=1, war_id=2 ** 63 - 1, attackers=[
        {"character_id": 2 ** 40, "damage_done": 0, "final_blow": False, "security_status": -9.87},
        {"corporation_id": 1000125, "faction_id": 500021, "ship_type_id": 3789, "weapon_type_id": 2 ** 62,
         "damage_done": 2 ** 63 - 1, "final_blow": True, "security_status": 5}])
    body["victim"] = dict(SAMPLE["victim"], items=[
        {"flag": 2 ** 31 - 1, "item_type_id": 10, "singleton": -2 ** 31, "quantity_dropped": 2 ** 63 - 1},
        {"flag": 5, "item_type_id": 11, "singleton": 1, "quantity_destroyed": 1, "items": [
            {"flag": 5, "item_type_id": 12, "singleton": 0, "quantity_destroyed": 3}]}])
    killmails = {path: parse_killmail(dict(body, killmail_id=i), killmail_id=i, killmail_hash="h" * 40)
                 for path, i in (("batch", 1), ("row", 2))}
    db.save_killmails(conn, [killmails["batch"]])
    save_killmail_row_by_row(conn, killmails["row"])
    for table, order in (("killmails", "killmail_id"), ("attackers", "attacker_index"),
                         ("killmail_items", "item_index")):
        rows = conn.execute(f"SELECT * FROM {table} ORDER BY killmail_id, {order}").fetchall()
        by_path = [[{k: v for k, v in r.items() if k not in ("killmail_id", "stored_at", "raw")}
                    for r in rows if r["killmail_id"] == i] for i in (1, 2)]
        assert by_path[0] == by_path[1] and by_path[0], table
    items = conn.execute("SELECT * FROM killmail_items WHERE killmail_id = 1 ORDER BY item_index").fetchall()
    assert [(i["flag"], i["singleton"], i["parent_index"]) for i in items] == [(2 ** 31 - 1, -2 ** 31, None),
                                                                               (5, 1, None), (5, 0, 1)]
    attackers = conn.execute("SELECT * FROM attackers WHERE killmail_id = 1 ORDER BY attacker_index").fetchall()
    assert [(a["character_id"], a["weapon_type_id"], a["security_status"], a["final_blow"]) for a in attackers] == \
        [(2 ** 40, None, -9.87, False), (None, 2 ** 62, 5.0, True)]


def take(conn, now, bucket="killmail", limit=50, window=60, calls=1):
    """A call's take as limits.py makes it: 2 tokens held and 3 of room beside them (a 4xx costs 5)."""
    taken = db.take_tokens(conn, now, db.TokenTake(bucket, cost=2, headroom=3, limit=limit, window=window, floor=0,
                                                   reserve=0, calls=calls), poll=0.05)
    return ([taken.id] if taken.id is not None else None), taken.wait, taken.calls


def settle(conn, now, ids, *, cost=2, used=None):
    db.settle_tokens(conn, now, ids=ids, bookings=[db.Booking("killmail", cost, 60, used)])


def test_take_tokens_is_one_step_for_every_session(conn, database_url):
    """Sessions racing for a bucket of 10 calls in flight (5 tokens of room each): exactly 10 get tokens, whatever
    the interleaving."""
    from concurrent.futures import ThreadPoolExecutor

    def race(own):
        return [take(own, NOW)[0] is not None for _ in range(5)]

    # Every session stays open to the end: a closed one's calls are a dead process's, spent and holding no room.
    sessions = [db.connect(database_url, autocommit=True) for _ in range(8)]
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            won = sum(sum(r) for r in pool.map(race, sessions))
    finally:
        for own in sessions:
            own.close()
    assert won == 10


def test_take_tokens_names_when_the_oldest_spends_come_back(conn):
    ids = [take(conn, NOW, limit=20)[0] for _ in range(3)]
    for n, taken in enumerate(ids):  # answered in three seconds in turn: booked in the second after each answer
        settle(conn, NOW + timedelta(seconds=n), taken)
    later = NOW + timedelta(seconds=10)
    for _ in range(7):
        taken, _, _ = take(conn, later, limit=20)
        settle(conn, later, taken)
    nothing, wait, _ = take(conn, later, limit=20)    # full: the first answer's 2 tokens come back first
    assert nothing is None and wait == pytest.approx(50)  # NOW is a whole second: booked in it, back at +60
    assert take(conn, later, limit=24)[0] is not None               # one more call fits a bigger bucket ...
    assert take(conn, later, limit=24)[1] == pytest.approx(0.05)    # ... the next once its answer frees its room
    assert ledger_spent(conn, "killmail", later, window=60) == {"own": 20, "other": 0, "in_flight": 2}


def test_take_tokens_leases_as_many_calls_as_fit_in_one_row(conn):
    ids, _, calls = take(conn, NOW, calls=16)             # a bucket of 10 calls in flight: 10 of the 16
    assert len(ids) == 1 and calls == 10
    assert ledger_spent(conn, "killmail", NOW, window=60) == {"own": 0, "other": 0, "in_flight": 20}
    assert take(conn, NOW, calls=4)[:2] == (None, pytest.approx(0.05))   # full: nothing, not even the call
    settle(conn, NOW, ids, cost=4)                        # the lease ended having spent two calls' worth
    assert take(conn, NOW, calls=16)[2] == 9              # 4 spent + 9 x 5 of room + 2 within 50


def test_take_error_slots_keeps_the_calm_floor_until_an_error_is_booked(conn):
    """No row in the window: 90 slots may be out (the calm floor of 10); once an error is spent, half."""
    slots = db.SlotTake("error-limit", limit=100, window=60, hold=400, floor=50, calm_floor=10, slots=100)
    taken = db.take_error_slots(conn, NOW, slots, poll=0.05)
    assert (taken.calls, taken.wait) == (90, 0.0)
    assert db.take_error_slots(conn, NOW, slots, poll=0.05) == (None, 0, pytest.approx(0.05))
    db.settle_tokens(conn, NOW, ids=[taken.id], bookings=[db.Booking("error-limit", 1, 60)])
    assert db.take_error_slots(conn, NOW, slots, poll=0.05)[1] == 49     # 1 spent + 49 + the floor of 50


def test_a_leases_answers_are_booked_each_in_the_second_after_it_came(conn):
    """Settled together at the lease's end, 12.5 s after its first answer: each cost is spent in the whole second
    after its own answer (never before it, so never back before ESI gives it back), ESI's count once, for the
    last answer."""
    (lease,), _, calls = take(conn, NOW, calls=3)
    assert calls == 3
    settled = NOW + timedelta(seconds=12.5)
    db.settle_tokens(conn, settled, ids=[lease], bookings=[
        db.Booking("killmail", 2, 60, ago=12.5), db.Booking("killmail", 5, 60, ago=12.0),
        db.Booking("killmail", 1, 60, used=9, ago=0.2)])
    rows = conn.execute("SELECT second - %s AS after, own, other FROM esi_spent ORDER BY second",
                        (NOW,)).fetchall()
    assert [(r["after"].total_seconds(), r["own"], r["other"]) for r in rows] == [(0, 2, 0), (1, 5, 0), (13, 1, 1)]
    assert ledger_spent(conn, "killmail", settled, window=60)["in_flight"] == 0


def test_settle_tokens_books_what_esi_counts_beyond_the_ledger(conn):
    (taken, _, _), (flying, _, _) = take(conn, NOW), take(conn, NOW)
    settle(conn, NOW, taken, used=50)
    # ESI counts 50; the ledger 2 answered + 2 in flight: 46 are another app's.
    assert ledger_spent(conn, "killmail", NOW, window=60) == {"own": 2, "other": 46, "in_flight": 2}
    settle(conn, NOW, flying, used=50)       # ESI's count has not moved: both of ours were in it, nothing more
    assert ledger_spent(conn, "killmail", NOW, window=60)["other"] == 46


def test_take_tokens_on_the_database_clock_and_prune(conn):
    ids, _, _ = take(conn, None)
    settle(conn, None, ids)
    (row,) = conn.execute("SELECT second - now() AS ahead FROM esi_spent").fetchall()
    assert timedelta(0) <= row["ahead"] <= timedelta(seconds=2)
    assert db.prune_ledger(conn, older_than=3600) == 0
    conn.execute("UPDATE esi_spent SET second = second - interval '2 hours'")
    assert db.prune_ledger(conn, older_than=3600) == 1


def table_scans(conn) -> dict[str, int]:
    """Sequential scans of the ledger's tables so far, this session's included (flushed at its next idle moment)."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return {r["relname"]: r["seq_scan"] for r in conn.execute(
        "SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname IN ('esi_spent', 'esi_in_flight')")}


def test_the_ledger_looks_a_bucket_up_by_its_key_however_stale_the_statistics(conn):
    """The ledger's tables grow to a row per pilot's list call (300 000 spent at 100 000 pilots polled every 300 s)
    from a few rows when a worker's session made its plans, with statistics taken then. A plan that reads the
    whole table would cost each call those rows, and a session keeps its plans until the table is analyzed
    again. Every take and settle looks its bucket's rows up by key."""
    conn.autocommit = True
    grow = ("INSERT INTO esi_spent (bucket, second, own) SELECT 'char-killmail:' || i, %(at)s, 1 "
            "FROM generate_series(%(first)s::int, %(last)s::int) AS i")
    conn.execute(grow, {"at": NOW, "first": 1, "last": 100})
    conn.execute("ANALYZE esi_spent")
    conn.execute("ANALYZE esi_in_flight")
    slots = db.SlotTake("error-limit", limit=100, window=60, hold=400, floor=50, calm_floor=10, slots=1)

    def calls(seconds):
        for n in seconds:  # more than the custom plans a session makes before it may keep a generic one
            later = NOW + timedelta(seconds=n)
            settle(conn, later, take(conn, later, limit=10_000)[0], used=2 * n + 2)
            error = db.take_error_slots(conn, later, slots, poll=0.05)
            db.settle_tokens(conn, later, ids=[error.id], bookings=[db.Booking("error-limit", 0, 60)])

    calls(range(8))
    conn.execute(grow, {"at": NOW, "first": 101, "last": 20_000})
    conn.execute("INSERT INTO esi_in_flight (bucket, sent_at, tokens) SELECT 'char-killmail:' || i, %s, 1 "
                 "FROM generate_series(1, 20000) AS i", (NOW,))
    conn.execute("DELETE FROM esi_in_flight WHERE bucket LIKE 'char-killmail:%%'")  # dead rows until a vacuum
    before = table_scans(conn)
    calls(range(8, 16))
    assert table_scans(conn) == before
    assert ledger_spent(conn, "killmail", NOW + timedelta(seconds=16), window=60)["own"] == 32


def test_record_limit_only_extends_a_pause(conn):
    db.record_limit(conn, "error-limit", limit_tokens=None, window_seconds=None, remaining=5,
                    paused_until=NOW + timedelta(seconds=30), status=420)
    db.record_limit(conn, "error-limit", limit_tokens=None, window_seconds=None, remaining=90,
                    paused_until=None, status=200)
    (row,) = db.limit_state(conn, ["error-limit"])
    assert row["paused_until"] == NOW + timedelta(seconds=30) and row["remaining"] == 90


def test_advisory_lock_is_exclusive_between_sessions_within_its_namespace(conn, database_url):
    assert db.try_lock(conn, namespace=db.LOCK_CHARACTER, key=42)
    with db.connect(database_url) as other:
        assert not db.try_lock(other, namespace=db.LOCK_CHARACTER, key=42)
        assert db.try_lock(other, namespace=db.LOCK_CORPORATION, key=42)
    db.unlock(conn, namespace=db.LOCK_CHARACTER, key=42)


def test_esi_calls_accumulate(conn):
    db.add_esi_calls(conn, {("killmail", 200): 3, ("char-killmail", 304): 1})
    db.add_esi_calls(conn, {("killmail", 200): 2})
    rows = conn.execute("SELECT route_group, status, calls FROM esi_calls ORDER BY 1").fetchall()
    assert [(r["route_group"], r["status"], r["calls"]) for r in rows] == [("char-killmail", 304, 1),
                                                                          ("killmail", 200, 5)]


def run_of(character_id, **fields):
    return {"character_id": character_id, "corporation_id": None, "kind": "character", "started_at": NOW,
            "finished_at": NOW + timedelta(seconds=1), "status": "ok", "listed": 0, "new": 0, "saved": 0,
            "skipped": 0, "failed": 0, "esi_calls": 1, "attempt": 1, "worker": "w", "error": None, **fields}


def test_an_outcome_is_one_statement_that_writes_the_run_the_calls_and_the_list_cache(conn):
    add_user(conn, 7, list_etag='"old"', queued_at=NOW)
    add_user(conn, 8, list_etag='"kept"', list_expires_at=NOW, queued_at=NOW)
    expires = NOW + timedelta(minutes=5)
    with db.autocommitted(conn):
        db.record_outcome(conn, run_of(7), {("char-killmail", 304): 1}, found_new=False,
                          list_cache=('"old"', expires))
        db.record_outcome(conn, run_of(8, status="partial"), {}, found_new=True)
    users = {u["character_id"]: u for u in conn.execute("SELECT * FROM users ORDER BY character_id")}
    assert (users[7]["list_etag"], users[7]["list_expires_at"], users[7]["queued_at"]) == ('"old"', expires, None)
    assert users[7]["last_sync_at"] == NOW + timedelta(seconds=1) and users[7]["last_new_killmail_at"] is None
    assert (users[8]["list_etag"], users[8]["list_expires_at"], users[8]["last_sync_status"]) == ('"kept"', NOW,
                                                                                                  "partial")
    assert users[8]["last_new_killmail_at"] == NOW + timedelta(seconds=1)
    runs = conn.execute("SELECT character_id, status FROM sync_runs ORDER BY id").fetchall()
    assert [(r["character_id"], r["status"]) for r in runs] == [(7, "ok"), (8, "partial")]
    calls = conn.execute("SELECT route_group, status, calls FROM esi_calls").fetchall()
    assert [(c["route_group"], c["status"], c["calls"]) for c in calls] == [("char-killmail", 304, 1)]
    assert not conn.autocommit


def test_the_paused_buckets_of_every_pilot_are_read_by_an_index_not_a_pass_over_all(conn):
    conn.execute("INSERT INTO esi_limits (bucket, paused_until) SELECT 'char-killmail:' || g, "
                 "CASE WHEN g % 1000 = 0 THEN now() + interval '1 minute' END FROM generate_series(1, 20000) g")
    conn.execute("ANALYZE esi_limits")
    conn.commit()
    paused = db.limit_state(conn, ["error-limit", "char-killmail:7"], paused_per_owner_at=datetime.now(UTC))
    expected = ["char-killmail:7"] + [f"char-killmail:{g}" for g in range(1000, 20001, 1000)]  # named, or paused
    assert sorted(r["bucket"] for r in paused) == sorted(expected)
    plan = conn.execute("EXPLAIN SELECT * FROM esi_limits WHERE bucket = ANY(ARRAY['error-limit']) "
                        "OR (split_part(bucket, ':', 1) = ANY(ARRAY['char-killmail']) AND paused_until > now())")
    assert "esi_limits_paused" in " ".join(row["QUERY PLAN"] for row in plan)


def test_raw_bodies_are_compressed_with_lz4(conn):
    db.save_killmails(conn, [sample()])
    row = conn.execute("SELECT pg_column_compression(raw) AS method, attcompression FROM killmails, pg_attribute "
                       "WHERE attrelid = 'killmails'::regclass AND attname = 'raw'").fetchone()
    assert row["attcompression"] == "l"
    assert row["method"] in ("lz4", None)   # None: a body too small to be compressed at all


def server_keepalive_seconds(conn) -> int | None:
    """The keepalive timer of the server's end of this TCP connection, as the kernel shows it (`ss -o`), once
    no reply is waiting for its ACK; None if the socket shows no keepalive timer."""
    client = socket.socket(fileno=conn.pgconn.socket)
    try:
        port, server_port = client.getsockname()[1], client.getpeername()[1]
    finally:
        client.detach()  # the socket stays libpq's

    def timer():
        shown = subprocess.run(["ss", "-tnoH", "state", "established",
                                f"( sport = :{server_port} and dport = :{port} )"],
                               capture_output=True, text=True, check=True).stdout
        return re.search(r"timer:\((\w+),(\d+)(sec|min)", shown)

    found = wait_until(lambda: (t := timer()) and t[1] != "on" and t, timeout=10, what="an idle server socket")
    if found[1] != "keepalive":
        return None
    return int(found[2]) * (60 if found[3] == "min" else 1)


def test_a_session_asks_the_server_for_keepalives_that_find_a_vanished_host_in_minutes(database_url):
    """The server end of the connection probes an idle client after 60 s, every 10 s, 6 times, and gives up
    on a reply unacknowledged for 2 minutes: a worker host that vanished without closing its sessions loses its
    locks and claims in about 2 minutes. PostgreSQL's default is the kernel's: 2 hours before the first probe."""
    for autocommit in (False, True):
        with db.connect(database_url, autocommit=autocommit) as conn:
            assert conn.autocommit is autocommit
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # nothing left open
            assert server_keepalive_seconds(conn) <= 60
            shown = {name: conn.execute(f"SHOW {name}").fetchone()[name] for name in db.SESSION_KEEPALIVES}
            assert shown == {"tcp_keepalives_idle": "60", "tcp_keepalives_interval": "10",
                             "tcp_keepalives_count": "6", "tcp_user_timeout": "120000"}
    with psycopg.connect(database_url) as plain:  # the check itself tells the two apart (the kernel's 2 hours)
        assert server_keepalive_seconds(plain) > 60


def test_the_client_end_probes_a_silent_server_too_unless_the_url_says_otherwise(database_url):
    with db.connect(database_url) as conn:
        params = conn.info.get_parameters()
        assert {k: params.get(k) for k in db.CLIENT_KEEPALIVES} == db.CLIENT_KEEPALIVES
    separator = "&" if "?" in database_url else "?"
    with db.connect(f"{database_url}{separator}keepalives_idle=300") as conn:
        assert conn.info.get_parameters()["keepalives_idle"] == "300"


def table_names(conn) -> list[str]:
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").fetchall()
    conn.commit()
    return [r["tablename"] for r in rows]


def test_applying_the_schema_again_under_running_writers_neither_waits_nor_blocks_them(conn, database_url):
    """A worker's open transaction holds ROW EXCLUSIVE on every table it writes; applying the schema again
    meanwhile must not wait for it (ALTER TABLE and CREATE INDEX lock the table even when IF [NOT] EXISTS finds
    nothing to do), nor take a lock that would stop the next writer."""
    tables = table_names(conn)
    with db.connect(database_url) as worker:
        worker.execute("LOCK TABLE " + ", ".join(tables) + " IN ROW EXCLUSIVE MODE")
        conn.execute("SET LOCAL lock_timeout = '2s'")  # a wait fails the apply instead of hanging the test
        db.apply_schema(conn)
        held = conn.execute(
            "SELECT c.relname, l.mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "WHERE l.pid = pg_backend_pid() AND c.relnamespace = 'public'::regnamespace "
            "AND c.relname = ANY(%s) AND l.mode NOT IN ('AccessShareLock', 'RowShareLock', 'RowExclusiveLock')",
            (tables,)).fetchall()
        conn.rollback()
    assert held == []


def test_applying_the_schema_completes_a_database_that_misses_its_later_changes(conn):
    """What the catalog lacks is still added: a column, an index, lz4 compression; a dropped foreign key stays
    dropped."""
    conn.execute("ALTER TABLE users DROP COLUMN corporation_checked_at")
    conn.execute("DROP INDEX killmails_time")
    conn.execute("ALTER TABLE killmails ALTER COLUMN raw SET COMPRESSION pglz")
    conn.execute("ALTER TABLE attackers ADD CONSTRAINT attackers_killmail_id_fkey FOREIGN KEY (killmail_id) "
                 "REFERENCES killmails (killmail_id)")
    conn.execute("ALTER TABLE esi_limits ADD COLUMN next_slot TIMESTAMPTZ")
    conn.commit()
    db.apply_schema(conn)
    conn.commit()
    catalog = conn.execute(
        """
        SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'users'::regclass
                       AND attname = 'corporation_checked_at' AND NOT attisdropped) AS column_added,
               to_regclass('killmails_time') IS NOT NULL AS index_made,
               (SELECT attcompression FROM pg_attribute WHERE attrelid = 'killmails'::regclass
                AND attname = 'raw') AS compression,
               NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'attackers_killmail_id_fkey') AS fk_dropped,
               NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'esi_limits'::regclass
                           AND attname = 'next_slot' AND NOT attisdropped) AS column_dropped
        """).fetchone()
    assert catalog == {"column_added": True, "index_made": True, "compression": "l", "fk_dropped": True,
                       "column_dropped": True}


def test_applying_the_schema_drops_the_ledgers_former_functions(conn):
    """A database made by an earlier schema keeps no esi_take (one bucket's call in parallel arrays) nor the
    former esi_settle beside the functions that replaced them."""
    arrays = "TIMESTAMPTZ, TEXT[], " + "INTEGER[], " * 10 + "BOOLEAN[], DOUBLE PRECISION"
    conn.execute(f"CREATE FUNCTION esi_take({arrays}, OUT ids BIGINT[], OUT wait DOUBLE PRECISION, "
                 "OUT granted INTEGER[]) LANGUAGE sql AS 'SELECT NULL::bigint[], 0::float8, NULL::int[]'")
    conn.execute("CREATE FUNCTION esi_take(TIMESTAMPTZ, TEXT[], INTEGER[], INTEGER[], INTEGER[], INTEGER[], "
                 "INTEGER[], INTEGER[], DOUBLE PRECISION, OUT ids BIGINT[], OUT wait DOUBLE PRECISION) "
                 "LANGUAGE sql AS 'SELECT NULL::bigint[], 0::float8'")
    conn.execute("CREATE FUNCTION esi_settle(TIMESTAMPTZ, BIGINT[], TEXT[], INTEGER[], INTEGER[], INTEGER[], "
                 "BOOLEAN[]) RETURNS VOID LANGUAGE sql AS ''")
    conn.commit()
    db.apply_schema(conn)
    conn.commit()
    functions = conn.execute("SELECT oid::regprocedure::text AS f FROM pg_proc WHERE proname LIKE 'esi\\_%' "
                             "ORDER BY 1").fetchall()
    assert [r["f"].split("(")[0] for r in functions] == ["esi_settle", "esi_take_calls", "esi_take_errors",
                                                         "esi_take_tokens"]


def test_values_are_saved_with_the_killmail_and_missing_ones_filled_in_later(conn):
    from decimal import Decimal
    valued, unvalued = sample(1), sample(2)
    db.save_killmails(conn, [valued, unvalued], [(Decimal("2.5"), Decimal(1), Decimal("3.5")), None])
    conn.commit()
    rows = conn.execute("SELECT killmail_id, destroyed_value, dropped_value, total_value FROM killmails "
                        "ORDER BY killmail_id").fetchall()
    assert [tuple(r.values()) for r in rows] == [(1, Decimal("2.5"), 1, Decimal("3.5")), (2, None, None, None)]
    missing = db.killmails_without_value(conn, limit=10)
    assert [(r["killmail_id"], r["victim_ship_type_id"]) for r in missing] == [(2, 17478)]
    assert len(missing[0]["items"]) == 18 and missing[0]["items"][7] == [82313, 0, 16379, None]
    db.set_killmail_values(conn, [(2, 1, 2, 3)])
    assert db.killmails_without_value(conn, limit=10) == []


def test_unknown_names_are_not_asked_again_for_a_day(conn):
    db.save_names(conn, [{"id": 1, "category": "character", "name": "A"}], [2], NOW, unknown_for=timedelta(days=1))
    assert db.names_to_resolve(conn, [1, 2, 3], NOW + timedelta(hours=23)) == [3]
    assert db.names_to_resolve(conn, [1, 2, 3], NOW + timedelta(days=1)) == [2, 3]
    assert db.names_of(conn, [1, 2, None]) == {1: "A"}
    db.save_names(conn, [{"id": 2, "category": "corporation", "name": "B"}], [], NOW, unknown_for=timedelta(days=1))
    assert db.names_of(conn, [1, 2]) == {1: "A", 2: "B"}


def list_take(character_id: int) -> tuple[None, db.TokenTake]:
    """A take of one call's tokens of a pilot's list bucket (30 a window), on the database's clock."""
    return None, db.TokenTake(f"char-killmail:{character_id}", cost=2, headroom=3, limit=30, window=900, floor=0,
                              reserve=4)


def test_the_pilots_row_takes_its_list_tokens_only_when_the_list_is_to_be_read(conn):
    """Due (Expires passed, or none yet): taken. Fresh: nothing, unless a full sync. A dead grant, or no such
    user: nothing."""
    add_user(conn, 1, list_expires_at=NOW - timedelta(minutes=1))
    add_user(conn, 2, list_expires_at=datetime.now(UTC) + timedelta(hours=1))
    add_user(conn, 3, refresh_token=None)
    add_user(conn, 4)
    with db.autocommitted(conn):
        def taken(character_id, **options):
            row = db.get_user_to_sync(conn, character_id, datetime.now(UTC), max_attempts=8,
                                      take=list_take(character_id), **options)
            return row and (row["ledger_id"] is not None, row["ledger_calls"])
        assert taken(1) == (True, 1) and taken(4) == (True, 1)
        assert taken(2) == (False, None) and taken(2, full=True) == (True, 1)
        assert taken(3) == (False, None) and taken(5) is None
        flying = conn.execute("SELECT bucket, count(*) AS n FROM esi_in_flight GROUP BY 1 ORDER BY 1").fetchall()
    assert [(r["bucket"], r["n"]) for r in flying] == [("char-killmail:1", 1), ("char-killmail:2", 1),
                                                       ("char-killmail:4", 1)]


def test_an_outcome_with_a_settlement_ends_the_rows_taken_and_books_the_answers(conn):
    add_user(conn, 7, queued_at=NOW)
    with db.autocommitted(conn):
        row = db.get_user_to_sync(conn, 7, datetime.now(UTC), max_attempts=8, take=list_take(7))
        settlement = db.Settlement(None, [row["ledger_id"]], [db.Booking("char-killmail:7", 1, 900, used=3)])
        db.record_outcome(conn, run_of(7), {("char-killmail", 304): 1}, found_new=False, settlement=settlement)
    # ESI counted 3: the 2 beyond the ledger's own 1 are another app's.
    assert ledger_spent(conn, "char-killmail:7", datetime.now(UTC), window=900) == {"own": 1, "other": 2,
                                                                                   "in_flight": 0}
    assert conn.execute("SELECT count(*) AS n FROM sync_runs WHERE character_id = 7").fetchone()["n"] == 1

"""sync.py end to end: real PostgreSQL, real HTTP to the local ESI simulator."""
from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

import db
import names
import sync
import values
from esi import EsiClient, InvalidGrant
from helpers import (
    TOKEN_KEYS,
    insert_users,
    ledger_spent,
    make_settings,
    round_trips,
    wait_until,
    waits_for_a_lock,
)
from limits import SharedLimits
from tokens import TokenVault, is_sealed

SAMPLE = json.loads((Path(__file__).resolve().parent / "data/killmail_134265477.json").read_text())
# Prices of a few of the real sample's types (the others have none: they count 0), and what they make it worth,
# worked out by hand as in test_values.py: destroyed 30 000 000 (the ship) + 1 000 000 + 2 x 500 000 + 10 x 1 000
# + 16 379 x 10 = 32 173 790; dropped 1 000 000 + 500 000 + 14 108 x 10 = 1 641 080.
SAMPLE_PRICES = [{"type_id": 17478, "average_price": 30_000_000}, {"type_id": 17482, "average_price": 1_000_000},
                 {"type_id": 22542, "average_price": 500_000}, {"type_id": 2488, "average_price": 1_000},
                 {"type_id": 82313, "average_price": 10}]
SAMPLE_VALUES = {"destroyed_value": Decimal(32_173_790), "dropped_value": Decimal(1_641_080),
                 "total_value": Decimal(33_814_870)}
# What the pages show of it by name: its system, the victim's character, corporation, alliance and ship, the final
# blow's character, corporation, alliance and ship (neither has a faction; weapons and items go unnamed), and the
# system's region. The simulator's map: 8 systems a constellation from 20 000 001, 10 constellations a region from
# 10 000 001, so system 30 000 743 is the 743rd, in constellation 20 000 001 + 742 // 8 = 20 000 093, in region
# 10 000 001 + 92 // 10 = 10 000 010.
SAMPLE_NAMED = {30000743, 2121652582, 98366055, 1354830081, 17478, 96424385, 98601573, 99013537, 35683, 10000010}


@pytest.fixture
def esi(sim, database_url):
    """An ESI client of the simulator whose waits return at once, with the shared limits of the test database."""
    settings = make_settings(database_url, sim.base_url)
    limits = SharedLimits(lambda: db.connect(database_url, autocommit=True), sleep=lambda s: None)
    yield EsiClient(settings, limits=limits, sleep=lambda s: None)
    limits.close()


@pytest.fixture
def world(sim, conn, esi):
    """Ten pilots sharing 300 killmails, a fast detail bucket, users written as the web app does."""
    sim.configure(detail_bucket=(200_000, 900))
    sim.add_pilots(n_pilots=10, n_killmails=300, share=3, expired_fraction=0.3, revoked=1, corporations=2)
    insert_users(conn, sim.pilots())
    return esi


def now_for(sim) -> datetime:
    return sim.now()


def sync_all(conn, client, sim, now=None, options=None):
    """Sync every pilot in turn, as one process would: one set of options (one price book) for all."""
    options = options or sync.SyncOptions()
    return {p["character_id"]: sync.sync_character(conn, client, p["character_id"], now or now_for(sim),
                                                   options=options)
            for p in sim.pilots()}


def stored_ids(conn) -> set[int]:
    return {r["killmail_id"] for r in conn.execute("SELECT killmail_id FROM killmails")}


def test_cold_sync_stores_every_killmail_once_with_all_rows(conn, world, sim):
    results = sync_all(conn, world, sim)
    expected = sim.expected_killmails(valid_only=True)
    assert stored_ids(conn) == set(expected)
    stats = sim.stats()
    assert stats["duplicate_detail_fetches"] == 0
    assert stats["by_route"]["detail"] == len(expected)  # one detail per distinct killmail, shared ones once
    for killmail_id in list(expected)[:40]:
        body = expected[killmail_id]
        n_attackers = conn.execute("SELECT count(*) AS n FROM attackers WHERE killmail_id = %s",
                                   (killmail_id,)).fetchone()["n"]
        n_items = conn.execute("SELECT count(*) AS n FROM killmail_items WHERE killmail_id = %s",
                               (killmail_id,)).fetchone()["n"]
        flat_items = sum(1 + len(i.get("items", [])) for i in body["victim"].get("items", []))
        raw = conn.execute("SELECT raw FROM killmails WHERE killmail_id = %s", (killmail_id,)).fetchone()["raw"]
        assert (n_attackers, n_items, raw) == (len(body["attackers"]), flat_items, body)
    statuses = sorted(r.status for r in results.values())
    assert statuses.count("needs_relogin") == 1 and statuses.count("ok") == 9
    runs = conn.execute("SELECT count(*) AS n, sum(saved) AS saved FROM sync_runs").fetchone()
    assert runs["n"] == 10 and runs["saved"] == len(expected)


def test_expired_tokens_are_refreshed_and_the_rotated_token_stored(conn, world, sim):
    before = {p["character_id"]: p for p in sim.pilots()}
    sync_all(conn, world, sim)
    after = {p["character_id"]: p for p in sim.pilots()}
    refreshed = [cid for cid in before if before[cid]["refresh_token"] != after[cid]["refresh_token"]]
    assert refreshed and sim.stats()["refreshes"] == len(refreshed)
    for cid in refreshed:
        user = db.get_user(conn, cid)
        assert user["refresh_token"] == after[cid]["refresh_token"]
        assert user["access_token"] == after[cid]["access_token"]
    # Twenty-one minutes later every token has expired; the rotated refresh tokens work (the old ones would not).
    sim.advance(21 * 60)
    sim.reset_stats()
    results = sync_all(conn, world, sim, now=now_for(sim))
    stats = sim.stats()
    assert stats["refreshes"] == 9 and stats["invalid_grants"] == 0  # the revoked pilot is not asked again
    assert sum(r.status == "ok" for r in results.values()) == 9


def test_revoked_grant_marks_the_user_and_it_is_not_due_again(conn, world, sim):
    revoked = next(p for p in sim.pilots() if p["revoked"])
    result = sync.sync_character(conn, world, revoked["character_id"], now_for(sim))
    assert result.status == "needs_relogin" and "invalid_grant" in result.error
    assert db.get_user(conn, revoked["character_id"])["revoked"]
    due = db.due_users(conn, now_for(sim) + timedelta(hours=1), interval=300, stale_after=7200)
    assert revoked["character_id"] not in {u["character_id"] for u in due}
    sim.reset_stats()
    again = sync.sync_character(conn, world, revoked["character_id"], now_for(sim))
    assert again.status == "needs_relogin" and sim.stats()["requests"] == 0  # not asked again


def test_second_run_makes_no_call_before_expires_and_gets_304_after(conn, world, sim):
    sync_all(conn, world, sim)
    sim.reset_stats()
    sync_all(conn, world, sim)
    assert sim.stats()["requests"] == 0
    sim.advance(301)
    sync_all(conn, world, sim, now=now_for(sim))
    stats = sim.stats()
    assert stats["by_route"]["list_character"] == 9 and stats["by_status"] == {"304": 9}
    assert stats["early_list_fetches"] == 0 and stats["by_route"]["detail"] == 0


def test_a_304_keeps_the_etag_stores_the_new_expires_and_records_its_run(conn, world, sim):
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    etag = db.get_user(conn, pilot["character_id"])["list_etag"]
    sim.advance(301)
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    user = db.get_user(conn, pilot["character_id"])
    assert (result.status, result.listed, sim.stats()["by_status"]["304"]) == ("ok", 0, 1)
    assert user["list_etag"] == etag and user["list_expires_at"] > now_for(sim) + timedelta(seconds=290)
    assert user["queued_at"] is None and user["last_sync_at"] == result.finished_at
    run = conn.execute("SELECT status, esi_calls FROM sync_runs ORDER BY id DESC LIMIT 1").fetchone()
    assert (run["status"], run["esi_calls"]) == ("ok", 1)


def test_a_warm_poll_locks_reads_writes_its_outcome_and_unlocks_in_four_round_trips(conn, world, sim):
    sync_all(conn, world, sim)
    sim.advance(301)
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    assert not db.get_user_to_sync(conn, pilot["character_id"], now_for(sim), max_attempts=8)["refs_pending"]
    conn.commit()
    with round_trips(conn) as counted:
        result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.status == "ok" and sim.stats()["by_status"]["304"] >= 1
    assert counted == [4]  # the lock, the pilot's row, the outcome, the unlock


def list_ledger(conn, character_id: int) -> dict:
    """What the ledger counts of a pilot's list bucket in its window (own, other, in flight)."""
    return ledger_spent(conn, f"char-killmail:{character_id}", datetime.now(UTC), window=900)


def test_a_warm_poll_takes_and_books_its_list_tokens_in_its_own_statements(conn, world, sim, monkeypatch):
    """The pilot's row is read with its list call's tokens taken, the outcome written with the answer booked: the
    ledger counts exactly the 304's token, and the limiter makes no round trip of its own for the call."""
    sync_all(conn, world, sim)
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    before = list_ledger(conn, pilot["character_id"])
    sim.advance(301)
    conn.commit()
    ledger_calls = []

    def counted(name):
        real = getattr(db, name)
        return lambda *args, **kwargs: ledger_calls.append(name) or real(*args, **kwargs)

    for name in ("take_tokens", "settle_tokens"):
        monkeypatch.setattr(db, name, counted(name))
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.status == "ok" and sim.stats()["by_status"]["304"] == 1
    assert ledger_calls == []
    after = list_ledger(conn, pilot["character_id"])
    assert before["in_flight"] == after["in_flight"] == 0
    assert after["own"] - before["own"] == 1  # a 304 costs one token


def test_a_job_that_fails_after_its_list_call_leaves_the_booking_to_its_process(conn, world, sim):
    """The list answers 401: the job fails before its outcome statement, and the tokens its opening statement
    took are booked when the process ends its leases (as a worker does between jobs)."""
    sync_all(conn, world, sim)
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    before = list_ledger(conn, pilot["character_id"])
    sim.advance(301)
    sim.fail_next(rf"/characters/{pilot['character_id']}/killmails/recent", 401)
    with pytest.raises(sync.JobError, match="access token refused"):
        sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert list_ledger(conn, pilot["character_id"])["in_flight"] == 2  # the call's cost, held until booked
    world.limits.end_idle_leases()
    after = list_ledger(conn, pilot["character_id"])
    assert after["in_flight"] == 0 and after["own"] - before["own"] == 5  # a 4xx costs five


def test_a_pilots_list_is_not_taken_for_when_its_expires_has_not_passed(conn, world, sim):
    """A job for a pilot whose list is still fresh (a duplicate delivery) takes nothing from its bucket."""
    sync_all(conn, world, sim)
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    before = list_ledger(conn, pilot["character_id"])
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.status == "ok" and result.esi_calls == 0
    assert list_ledger(conn, pilot["character_id"]) == before


def test_a_warm_poll_that_refreshes_its_token_stores_it_in_one_more_round_trip(conn, world, sim):
    sync_all(conn, world, sim)
    sim.advance(21 * 60)  # every access token has expired
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    conn.commit()
    with round_trips(conn) as counted:
        result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    user = db.get_user(conn, pilot["character_id"])
    now_held = next(p for p in sim.pilots() if p["character_id"] == pilot["character_id"])
    assert result.status == "ok" and user["refresh_token"] == now_held["refresh_token"]
    assert counted == [5]  # the lock, the pilot's row, the new tokens, the outcome, the unlock


def test_a_304_still_fetches_what_an_earlier_run_left_pending(conn, world, sim):
    sync_all(conn, world, sim)
    pilot = next(p for p in sim.pilots() if not p["revoked"] and sim.killmail_ids_for(p["character_id"]))
    left = max(sim.killmail_ids_for(pilot["character_id"]))
    for table in ("attackers", "killmail_items", "killmails"):  # as if its fetch had failed
        conn.execute(f"DELETE FROM {table} WHERE killmail_id = %s", (left,))
    conn.commit()
    sim.advance(301)
    sim.reset_stats()
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert sim.stats()["by_status"].get("304") == 1 and sim.stats()["by_route"]["detail"] == 1
    assert result.saved == 1 and left in stored_ids(conn)


def test_new_killmails_after_expires_are_fetched(conn, world, sim):
    sync_all(conn, world, sim)
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    new_ids = sim.add_killmails(pilot["character_id"], 3)
    sim.advance(301)
    sim.reset_stats()
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.saved == 3 and set(new_ids) <= stored_ids(conn)
    assert sim.stats()["by_route"]["detail"] == 3


def test_paging_walks_every_page(conn, world, sim):
    sim.configure(page_size=50)
    pilot = max((p for p in sim.pilots() if not p["revoked"]),
                key=lambda p: len(sim.killmail_ids_for(p["character_id"])))
    ids = sim.killmail_ids_for(pilot["character_id"])
    assert len(ids) > 100
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.listed == len(ids) and ids <= stored_ids(conn)
    assert sim.stats()["by_route"]["list_character"] == -(-len(ids) // 50)


def test_malformed_killmail_is_a_failed_reference_and_the_rest_are_saved(conn, world, sim):
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    ids = sorted(sim.killmail_ids_for(pilot["character_id"]))
    sim.make_malformed(ids[0])
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.status == "partial" and result.failed == 1 and result.saved == len(ids) - 1
    ref = conn.execute("SELECT attempts, last_error FROM killmail_refs WHERE killmail_id = %s", (ids[0],)).fetchone()
    assert ref["attempts"] == 1 and "victim" in ref["last_error"]
    # The sweep: later syncs retry it with backoff, a bounded number of times, then leave it alone.
    sim.reset_stats()
    later = now_for(sim)
    for _ in range(10):
        later += timedelta(hours=7)
        sync.sync_character(conn, world, pilot["character_id"], later)
    assert sim.stats()["detail_fetches"].get(ids[0], 0) == sync.SyncOptions().max_attempts - 1


def test_a_detail_answer_that_never_comes_ends_the_job_at_its_deadline_and_loses_nothing(conn, world, sim):
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    ids = sorted(sim.killmail_ids_for(pilot["character_id"]))
    sim.stall_next(r"/killmails/\d+/", count=1)          # ESI took one detail call and never answers it
    options = sync.SyncOptions(deadline=time.monotonic() + 2, finish_wait=0.5, cancel_waits=world.limits.cancel_waits)
    with pytest.raises(sync.JobError, match="job deadline passed while waiting for 1 killmail details"):
        sync.sync_character(conn, world, pilot["character_id"], now_for(sim), options=options)
    stalled = set(ids) - stored_ids(conn)
    assert len(stalled) == 1                              # every other killmail saved as it came
    claims = conn.execute("SELECT count(*) AS n FROM killmail_refs WHERE killmail_id = ANY(%s) "
                          "AND claimed_until IS NOT NULL", (list(stalled),)).fetchone()
    assert claims["n"] == 0                               # and the one never answered released
    conn.commit()
    sim.release_stalls()
    world.limits.allow_waits()                            # the next job (the retry) waits for ESI's limits again
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.status == "ok" and stored_ids(conn) == set(ids)
    assert sim.stats()["duplicate_detail_fetches"] <= 1   # the abandoned answer may have come after all


def test_a_stopping_worker_saves_what_it_fetched_releases_the_rest_and_the_job_is_interrupted(conn, world, sim):
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    ids = sorted(sim.killmail_ids_for(pilot["character_id"]))
    sim.stall_next(r"/killmails/\d+/", count=len(ids))   # no detail answers until released
    stopping = threading.Event()
    options = sync.SyncOptions(stop_by=lambda: 0.0 if stopping.is_set() else None, finish_wait=0.5,
                               cancel_waits=world.limits.cancel_waits)
    runner = threading.Thread(target=lambda: outcome.append(run_capturing(
        lambda: sync.sync_character(conn, world, pilot["character_id"], now_for(sim), options=options))))
    outcome: list = []
    runner.start()
    wait_until(lambda: sim.stats()["stalled"] >= 1, what="a detail call under way")
    stopping.set()                                        # SIGTERM
    runner.join(timeout=30)
    assert not runner.is_alive()
    assert isinstance(outcome[0], sync.JobInterrupted) and "worker stopping" in str(outcome[0])
    unsaved = list(set(ids) - stored_ids(conn))
    assert unsaved                                        # none answered: nothing to save
    claims = conn.execute("SELECT count(*) AS n FROM killmail_refs WHERE killmail_id = ANY(%s) "
                          "AND claimed_until IS NOT NULL", (unsaved,)).fetchone()
    assert claims["n"] == 0                               # every reference released for the next run
    conn.commit()
    sim.release_stalls()
    world.limits.allow_waits()
    assert sync.sync_character(conn, world, pilot["character_id"], now_for(sim)).status == "ok"
    assert stored_ids(conn) == set(ids)


def test_a_cold_backlog_leaves_part_of_the_detail_bucket_to_new_kills_and_ends_its_job(conn, sim, database_url):
    sim.configure(detail_bucket=(100, 900))               # a rested bucket of 50 details, back 15 minutes later
    sim.add_pilots(n_pilots=1, n_killmails=120, share=1, expired_fraction=0.0, revoked=0, corporations=1)
    insert_users(conn, sim.pilots())
    (pilot,) = sim.pilots()
    limits = SharedLimits(lambda: db.connect(database_url, autocommit=True), sleep=lambda s: None)
    client = EsiClient(make_settings(database_url, sim.base_url), limits=limits, sleep=lambda s: None)
    try:
        some = next(iter(sim.killmail_ids_for(pilot["character_id"])))
        client.get_killmail(some, sim.killmail_hash(some))  # one answer: the bucket's limit is known
        first = sync.sync_character(conn, client, pilot["character_id"], now_for(sim))
        # Its first sync is all backlog: it spends the backlog's share, leaves the rest pending and ends (no
        # wait of minutes holding a process, no error).
        assert first.status == "ok" and 0 < first.saved <= 29 and first.saved + first.skipped == 120
        new = set(sim.add_killmails(pilot["character_id"], 2))
        sim.advance(301)                                  # the list's cache turns over: the new kills show
        second = sync.sync_character(conn, client, pilot["character_id"], sim.now())
        assert new <= stored_ids(conn)                    # fresh: fetched from the share kept for them
        assert second.status == "ok" and sim.stats()["status_429"] == 0
    finally:
        limits.close()


def run_capturing(work):
    """What work returned, or the exception it raised."""
    try:
        return work()
    except Exception as exc:  # noqa: BLE001 - the test looks at it
        return exc


@pytest.mark.parametrize("poison, reason", [
    (lambda body: body["victim"].setdefault("position", {"x": 0, "y": 0, "z": 0}).update(x=10 ** 400), "too large"),
    (lambda body: body.update(victim=None), "victim"),   # a malformed body, as before
])
def test_a_body_the_model_cannot_take_is_a_failed_reference_with_its_reason(conn, world, sim, poison, reason):
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    ids = sorted(sim.killmail_ids_for(pilot["character_id"]))
    get_killmail = world.get_killmail

    def poisoned(killmail_id, killmail_hash, **options):
        body, raw = get_killmail(killmail_id, killmail_hash, **options)
        if killmail_id == ids[0]:
            poison(body)
        return body, raw
    world.get_killmail = poisoned
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.failed == 1 and result.saved == len(ids) - 1
    ref = conn.execute("SELECT attempts, last_error FROM killmail_refs WHERE killmail_id = %s", (ids[0],)).fetchone()
    assert ref["attempts"] == 1 and reason in ref["last_error"]


def test_wrong_hash_is_not_retried(conn, world, sim):
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    first = sorted(sim.killmail_ids_for(pilot["character_id"]))[0]
    sim.fail_next(rf"/killmails/{first}/", 422)
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.failed == 1
    sim.reset_stats()
    sync.sync_character(conn, world, pilot["character_id"], now_for(sim) + timedelta(days=1))
    assert sim.stats()["detail_fetches"].get(first, 0) == 0


def test_server_errors_are_retried_inside_the_call(conn, world, sim):
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    sim.fail_next(r"/killmails/", 502, count=2)
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.failed == 0 and sim.killmail_ids_for(pilot["character_id"]) <= stored_ids(conn)


def test_rate_limited_list_fails_the_job_and_pauses_the_bucket_for_everyone(conn, world, sim, database_url):
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    sim.fail_next(r"/killmails/recent", 429, retry_after=120)
    with pytest.raises(sync.JobError) as caught:
        sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert caught.value.retry_after == 120
    (state,) = db.limit_state(conn, [f"char-killmail:{pilot['character_id']}"])
    assert state["paused_until"] > datetime.now(UTC) + timedelta(seconds=100)
    assert db.get_user(conn, pilot["character_id"])["list_etag"] is None  # nothing half-recorded


def test_a_failed_run_ends_under_its_lock_so_the_next_run_of_the_pilot_starts_after_it(conn, world, sim,
                                                                                       database_url):
    """The worker records a failed run after sync let go of the lock: its finished_at is the time the run
    ended under the lock, or a duplicate job that took the lock meanwhile would seem to overlap it."""
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    sim.fail_next(r"/killmails/recent", 429, retry_after=120)
    with pytest.raises(sync.JobError) as caught:
        sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    with db.connect(database_url) as other:
        assert db.try_lock(other, db.LOCK_CHARACTER, pilot["character_id"])  # the next run starts
        next_started = datetime.now(UTC)
        sync.record_failed_run(conn, world, caught.value.result, str(caught.value))
    (run,) = conn.execute("SELECT status, started_at, finished_at FROM sync_runs WHERE character_id = %s",
                          (pilot["character_id"],)).fetchall()
    assert run["status"] == "error" and run["started_at"] <= run["finished_at"] <= next_started


def test_a_pilot_whose_new_kills_another_job_stored_first_still_counts_as_active(conn, world, sim):
    sync_all(conn, world, sim)
    conn.execute("UPDATE users SET last_new_killmail_at = %s", (now_for(sim) - timedelta(days=20),))
    conn.commit()
    first, second, quiet = [p["character_id"] for p in sim.pilots() if not p["revoked"]][:3]
    sim.add_killmails(first, 3, shared_with=[second])
    sim.advance(301)  # the lists' cache turns over
    later = now_for(sim)
    assert sync.sync_character(conn, world, first, later).saved == 3
    beaten = sync.sync_character(conn, world, second, later)
    assert (beaten.listed > 0, beaten.saved) == (True, 0)  # its 3 new kills were stored by the first job
    sync.sync_character(conn, world, quiet, later)
    active = {u["character_id"]: u["last_new_killmail_at"] for u in conn.execute(
        "SELECT character_id, last_new_killmail_at FROM users")}
    recent = datetime.now(UTC) - timedelta(minutes=5)
    assert active[first] > recent and active[second] > recent
    assert active[quiet] < recent - timedelta(days=19)  # nothing new for it: still a quiet pilot


def test_a_403_right_after_a_refresh_stops_the_pilot_with_its_new_token(conn, world, sim):
    """The refresh rotated the token; the 403 must mark the new one, or the pilot stays due and is asked again."""
    pilot = next(p for p in sim.pilots() if not p["revoked"] and p["expires_at"] <= now_for(sim))
    sim.fail_next(r"/characters/\d+/killmails/recent", 403)
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.status == "needs_relogin"
    user = db.get_user(conn, pilot["character_id"])
    assert user["refresh_token"] != pilot["refresh_token"] and user["revoked"] is True
    assert pilot["character_id"] not in {u["character_id"] for u in db.due_users(
        conn, now_for(sim) + timedelta(hours=1), interval=300, stale_after=7200)}


def web_app_logs_in_during(client, conn, database_url, character_id, *, refused: bool):
    """Make the client's next refresh race a new login that the web app writes (on its own connection)."""
    refresh = client.refresh

    def racing_refresh(refresh_token):
        with db.connect(database_url) as web:
            web.execute("UPDATE users SET refresh_token = 'web-login', access_token = 'web-access' "
                        "WHERE character_id = %s", (character_id,))
        if refused:
            raise InvalidGrant("invalid_grant: gone")
        return refresh(refresh_token)
    client.refresh = racing_refresh


@pytest.mark.parametrize("refused", [False, True])
def test_a_login_the_web_app_writes_during_a_refresh_is_kept(conn, world, sim, database_url, refused):
    pilot = next(p for p in sim.pilots() if not p["revoked"] and p["expires_at"] <= now_for(sim))
    web_app_logs_in_during(world, conn, database_url, pilot["character_id"], refused=refused)
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    user = db.get_user(conn, pilot["character_id"])
    assert (user["refresh_token"], user["access_token"]) == ("web-login", "web-access")
    assert user["revoked"] is False and user["token_error"] is None
    assert result.status != "needs_relogin"


def test_a_wrong_client_secret_is_the_apps_error_not_the_pilots(conn, world, sim, database_url):
    """invalid_client: nobody is marked as needing a new login, and no process asks SSO again for a while."""
    expired = [p for p in sim.pilots() if not p["revoked"] and p["expires_at"] <= now_for(sim)][:2]
    settings = make_settings(database_url, sim.base_url, eve_client_secret="wrong")
    limits = SharedLimits(lambda: db.connect(database_url, autocommit=True), sleep=lambda s: None)
    misconfigured = EsiClient(settings, limits=limits, sleep=lambda s: None)
    sim.reset_stats()
    for pilot in expired:
        with pytest.raises(sync.JobError, match="SSO configuration error|paused") as caught:
            sync.sync_character(conn, misconfigured, pilot["character_id"], now_for(sim))
        assert caught.value.retry_after > 500
        assert db.get_user(conn, pilot["character_id"])["revoked"] is False
    assert sim.stats()["by_route"]["token"] == 1  # the second pilot's job did not ask SSO
    limits.close()


@pytest.mark.parametrize("junk", ["\n", "\u2603"])
def test_a_stored_access_token_no_header_can_carry_is_refreshed_on_the_retry(conn, world, sim, junk):
    """Written so by a web app: sending it would raise with the whole header in the message; the job is retried
    instead, and the retry refreshes the token."""
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    bad = f"{pilot['access_token']}{junk}x"
    conn.execute("UPDATE users SET access_token = %s, expires_at = now() + interval '1 hour' "
                 "WHERE character_id = %s", (bad, pilot["character_id"]))
    conn.commit()
    with pytest.raises(sync.JobError) as caught:
        sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert pilot["access_token"] not in str(caught.value) and sim.stats()["by_route"]["list_character"] == 0
    assert sync.sync_character(conn, world, pilot["character_id"], now_for(sim)).status == "ok"
    assert db.get_user(conn, pilot["character_id"])["access_token"] != bad


def test_killmails_left_behind_by_a_pilot_who_needs_a_new_login_are_swept(conn, world, sim):
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    ids = sim.killmail_ids_for(pilot["character_id"])
    sim.fail_next(r"/killmails/\d+/", 429, retry_after=90)   # the job stops early, most details unfetched
    with pytest.raises(sync.JobError):
        sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    conn.execute("UPDATE esi_limits SET paused_until = NULL")
    conn.commit()
    world.limits._read_at.clear()
    left = ids - stored_ids(conn)
    assert left
    assert sync.sweep_stranded(conn, world, now_for(sim), sync.SyncOptions()).saved == 0  # its pilot is live
    sim.revoke(pilot["character_id"])
    db.mark_revoked(conn, pilot["character_id"], db.get_user(conn, pilot["character_id"])["refresh_token"], "gone")
    conn.commit()
    sim.reset_stats()
    swept = 0
    while left - stored_ids(conn):
        done = sync.sweep_stranded(conn, world, now_for(sim), sync.SyncOptions())
        assert 0 < done.saved <= sync.SWEEP_LIMIT
        swept += done.saved
    assert swept == len(left) and sim.stats()["by_route"]["detail"] == len(left)
    assert sync.sweep_stranded(conn, world, now_for(sim), sync.SyncOptions()).saved == 0
    calls = conn.execute("SELECT sum(calls) AS n FROM esi_calls WHERE route_group = 'killmail' AND status = 200")
    assert calls.fetchone()["n"] >= len(left)  # the sweeps recorded their ESI calls


def test_a_retried_job_that_saves_the_new_kills_counts_the_pilot_as_active(conn, world, sim):
    """The first try linked the new kills and stopped on a 429; the retry saves them: the pilot is active."""
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    conn.execute("UPDATE users SET last_new_killmail_at = now() - interval '20 days'")
    conn.commit()
    sim.fail_next(r"/killmails/\d+/", 429, retry_after=90)
    with pytest.raises(sync.JobError):
        sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    conn.execute("UPDATE esi_limits SET paused_until = NULL")
    conn.commit()
    world.limits._read_at.clear()
    retry = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert (retry.listed, retry.saved > 0) == (0, True)  # the list was still fresh: nothing newly linked
    active = db.get_user(conn, pilot["character_id"])["last_new_killmail_at"]
    assert active > datetime.now(UTC) - timedelta(minutes=5)


def test_a_lists_expires_counts_from_its_answer_not_from_the_jobs_start(conn, world, sim):
    """A job whose list answer comes 40 s after its start (a slow refresh, a pause) must not store an Expires
    40 s early: the next job would ask before it."""
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    now = now_for(sim)
    ticks = iter([now, now + timedelta(seconds=40)])
    options = sync.SyncOptions(clock=lambda: next(ticks, now + timedelta(seconds=40)))
    sync.sync_character(conn, world, pilot["character_id"], now, options=options)
    stored = db.get_user(conn, pilot["character_id"])["list_expires_at"]
    # The simulator caches a list 300 s: answered 40 s into the job, it expires 340 s after the job's start.
    assert stored >= now + timedelta(seconds=40 + 300) - timedelta(seconds=2)


def test_a_locked_character_is_skipped_without_calls_and_freed_for_the_next_producer_run(conn, world, sim,
                                                                                          database_url):
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    claimed = db.claim_user(conn, pilot["character_id"], now_for(sim), stale_after=7200)
    conn.commit()
    assert claimed is not None
    with db.connect(database_url) as other:
        assert db.try_lock(other, db.LOCK_CHARACTER, pilot["character_id"])  # e.g. its corporation's run
        sim.reset_stats()
        result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.status == "locked" and sim.stats()["requests"] == 0
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # nothing left open
    assert db.get_user(conn, pilot["character_id"])["queued_at"] is None  # not stuck until the claim is stale
    (run,) = conn.execute("SELECT status, error, esi_calls FROM sync_runs WHERE character_id = %s",
                          (pilot["character_id"],)).fetchall()
    assert run == {"status": "locked", "error": "being synced by another process", "esi_calls": 0}


def test_a_redelivered_job_waits_for_the_lock_of_a_session_that_is_ending_and_syncs(conn, world, sim, database_url):
    """A job redelivered after its process was killed can reach PostgreSQL before the dead process's session has
    ended, its lock still held: it waits (lock_wait) rather than skip the pilot until the next producer run."""
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    db.claim_user(conn, pilot["character_id"], now_for(sim), stale_after=7200)
    conn.commit()
    dying = db.connect(database_url)
    assert db.try_lock(dying, db.LOCK_CHARACTER, pilot["character_id"])
    results: list[sync.SyncResult] = []
    options = sync.SyncOptions(lock_wait=sync.REDELIVERED_LOCK_WAIT)
    with db.connect(database_url) as job_conn, db.connect(database_url) as looker:
        job = threading.Thread(target=lambda: results.append(
            sync.sync_character(job_conn, world, pilot["character_id"], now_for(sim), options=options)))
        job.start()
        wait_until(lambda: waits_for_a_lock(looker, job_conn.info.backend_pid), timeout=10,
                   what="the job waiting for the lock")
        dying.close()  # the killed process's session ends
        job.join(timeout=30)
        assert not job.is_alive()
        assert job_conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert results[0].status == "ok" and results[0].new > 0
    assert db.get_user(conn, pilot["character_id"])["queued_at"] is None


def test_a_lock_held_past_the_wait_skips_the_job_as_a_held_lock_does(conn, world, sim, database_url):
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    with db.connect(database_url) as other:
        assert db.try_lock(other, db.LOCK_CHARACTER, pilot["character_id"])  # a live run of the same pilot
        sim.reset_stats()
        started = time.monotonic()
        result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim),
                                     options=sync.SyncOptions(lock_wait=0.2))
        waited = time.monotonic() - started
    assert result.status == "locked" and sim.stats()["requests"] == 0
    assert 0.2 <= waited < 5
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert conn.execute("SELECT current_setting('lock_timeout') AS t").fetchone()["t"] == "0"  # nothing lingers


def test_a_finished_job_leaves_no_lock_and_no_open_transaction(conn, world, sim, database_url):
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.status == "ok"
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with db.connect(database_url) as other:
        assert db.try_lock(other, db.LOCK_CHARACTER, pilot["character_id"])


def test_unknown_user_is_a_permanent_error(conn, world, sim):
    with pytest.raises(sync.PermanentJobError):
        sync.sync_character(conn, world, 12345, now_for(sim))


# ---------------------------------------------------------------------------------------------- corporations


def test_job_errors_declare_what_they_carry():
    """The wait asked for is the error's, set when it is made; the run's result is filled in as it leaves the run."""
    retried, permanent = sync.JobError("paused", retry_after=30.0), sync.PermanentJobError("no such user")
    assert (retried.retry_after, retried.result) == (30.0, None)
    assert sync.JobError("database").retry_after is None and permanent.result is None
    assert isinstance(retried, sync.JobFailed) and isinstance(permanent, sync.JobFailed)
    assert not isinstance(permanent, sync.JobError)  # never retried
    assert "retry_after" not in vars(sync.SyncResult(1))  # a wait belongs to the error, not to the run


def test_a_pilot_reads_its_own_list_and_a_director_its_corporations():
    expires = datetime(2026, 11, 29, 12, 5, tzinfo=UTC)
    director = {"character_id": 7, "corporation_id": 98, "list_etag": '"own"', "list_expires_at": None}
    corporation = {"corporation_id": 98, "list_etag": '"corp"', "list_expires_at": expires}
    assert sync.Owner.pilot(director) == sync.Owner("character", 7, reader_id=7, list_etag='"own"',
                                                    list_expires_at=None)
    assert sync.Owner.corporation(corporation, director=director) == sync.Owner(
        "corporation", 98, reader_id=7, list_etag='"corp"', list_expires_at=expires)


def sync_corporations(conn, client, sim, now=None):
    now = now or now_for(sim)
    due = db.claim_due_corporations(conn, now, interval=300, stale_after=7200)
    conn.commit()
    return [sync.sync_corporation(conn, client, c["corporation_id"], c["character_id"], now) for c in due]


def test_directors_sync_their_corporations_and_shared_kills_are_fetched_once(conn, world, sim):
    sync_all(conn, world, sim)
    directors = [p for p in sim.pilots() if "read_corporation_killmails" in p["scopes"] and not p["revoked"]]
    for p in directors:  # learned from the token's scopes and the public character route
        user = db.get_user(conn, p["character_id"])
        assert user["corporation_id"] == p["corporation_id"] and db.CORPORATION_SCOPE in user["scopes"].split()
    results = sync_corporations(conn, world, sim)
    assert sorted(r.corporation_id for r in results) == sorted({p["corporation_id"] for p in directors})
    assert all(r.status == "ok" and r.kind == "corporation" for r in results)
    assert stored_ids(conn) == set(sim.expected_killmails(valid_only=True, corporations=True))
    assert sim.stats()["duplicate_detail_fetches"] == 0
    runs = conn.execute("SELECT count(*) AS n FROM sync_runs WHERE kind = 'corporation'").fetchone()["n"]
    assert runs == len(results)
    assert sync_corporations(conn, world, sim) == []  # synced just now: not due


def test_a_directors_role_is_written_when_learned_not_on_every_corporation_poll(conn, world, sim):
    sync_all(conn, world, sim)
    sync_corporations(conn, world, sim)
    learned = {u["character_id"]: u["director_checked_at"]
               for u in conn.execute("SELECT * FROM users WHERE is_director").fetchall()}
    assert learned and all(learned.values())
    sim.advance(301)
    conn.execute("UPDATE corporations SET last_sync_at = last_sync_at - interval '1 hour'")
    conn.commit()
    results = sync_corporations(conn, world, sim)
    assert results and all(r.status == "ok" for r in results)
    again = {u["character_id"]: u["director_checked_at"]
             for u in conn.execute("SELECT * FROM users WHERE is_director").fetchall()}
    assert again == learned


def test_a_corporation_whose_director_is_being_synced_is_skipped_and_freed(conn, world, sim, database_url):
    sync_all(conn, world, sim)
    due = db.claim_due_corporations(conn, now_for(sim), interval=300, stale_after=7200)
    conn.commit()
    corporation = due[0]
    with db.connect(database_url) as other:
        assert db.try_lock(other, db.LOCK_CHARACTER, corporation["character_id"])  # the director's own run
        sim.reset_stats()
        result = sync.sync_corporation(conn, world, corporation["corporation_id"], corporation["character_id"],
                                       now_for(sim))
    assert result.status == "locked" and sim.stats()["requests"] == 0
    queued = conn.execute("SELECT queued_at FROM corporations WHERE corporation_id = %s",
                          (corporation["corporation_id"],)).fetchone()["queued_at"]
    assert queued is None
    runs = conn.execute("SELECT status FROM sync_runs WHERE kind = 'corporation'").fetchall()
    assert runs == [{"status": "locked"}]


def test_a_director_who_lost_the_role_is_not_asked_again(conn, world, sim):
    sync_all(conn, world, sim)
    director = next(p for p in sim.pilots() if "read_corporation_killmails" in p["scopes"] and not p["revoked"])
    sim.set_director(director["character_id"], False)
    due = db.claim_due_corporations(conn, now_for(sim), interval=300, stale_after=7200)
    conn.commit()
    corporation = next(c for c in due if c["character_id"] == director["character_id"])
    result = sync.sync_corporation(conn, world, corporation["corporation_id"], director["character_id"],
                                   now_for(sim))
    assert result.status == "forbidden" and "Director" in result.error
    assert db.get_user(conn, director["character_id"])["is_director"] is False
    later = now_for(sim) + timedelta(hours=1)
    again = db.claim_due_corporations(conn, later, interval=300, stale_after=7200)
    assert corporation["corporation_id"] not in {c["corporation_id"] for c in again}
    # Another member gains the role and the scope (a new login): the corporation is synced through it.
    member = next(p for p in sim.pilots() if p["corporation_id"] == corporation["corporation_id"]
                  and p["character_id"] != director["character_id"] and not p["revoked"])
    sim.set_director(member["character_id"], True)
    db.save_profile(conn, member["character_id"], corporation_id=member["corporation_id"],
                    scopes=f"esi-killmails.read_killmails.v1 {db.CORPORATION_SCOPE}")
    conn.commit()
    (picked,) = [c for c in db.claim_due_corporations(conn, later, interval=300, stale_after=7200)
                 if c["corporation_id"] == corporation["corporation_id"]]
    assert picked["character_id"] == member["character_id"]


def test_a_member_without_the_role_is_asked_again_a_week_later_and_may_have_it_then(conn, world, sim):
    sync_all(conn, world, sim)
    director = next(p for p in sim.pilots() if "read_corporation_killmails" in p["scopes"] and not p["revoked"])
    sim.set_director(director["character_id"], False)
    assert [r.status for r in sync_corporations(conn, world, sim)].count("forbidden") == 1
    corporation_id = director["corporation_id"]
    sim.set_director(director["character_id"], True)  # given the role again some day that week
    day = now_for(sim) + timedelta(days=1)
    assert corporation_id not in {c["corporation_id"] for c in
                                  db.claim_due_corporations(conn, day, interval=300, stale_after=7200)}
    conn.commit()
    week = now_for(sim) + timedelta(days=7, minutes=1)
    results = [r for r in sync_corporations(conn, world, sim, week) if r.corporation_id == corporation_id]
    assert [(r.character_id, r.status) for r in results] == [(director["character_id"], "ok")]
    assert db.get_user(conn, director["character_id"])["is_director"] is True


def test_a_429_on_details_stops_the_job_releases_the_rest_and_the_retry_finishes(conn, world, sim):
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    ids = sim.killmail_ids_for(pilot["character_id"])
    sim.fail_next(r"/killmails/\d+/", 429, retry_after=90)
    with pytest.raises(sync.JobError) as caught:
        sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert caught.value.retry_after > 60
    assert len(stored_ids(conn)) < len(ids)
    held = conn.execute("SELECT count(*) AS n FROM killmail_refs r WHERE claimed_until IS NOT NULL AND NOT EXISTS "
                        "(SELECT 1 FROM killmails k WHERE k.killmail_id = r.killmail_id)").fetchone()["n"]
    assert held == 0
    (state,) = db.limit_state(conn, ["killmail"])
    assert state["paused_until"] > datetime.now(UTC) + timedelta(seconds=60)
    run = conn.execute("SELECT status, saved FROM sync_runs").fetchall()
    assert run == []  # the worker records the failed run (sync.record_failed_run) when it retries the job
    conn.execute("UPDATE esi_limits SET paused_until = NULL")  # the pause is over
    conn.commit()
    world.limits._read_at.clear()
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.status == "ok" and ids <= stored_ids(conn)
    assert sim.stats()["duplicate_detail_fetches"] == 0


def test_a_batch_waits_no_longer_than_save_every_while_fetches_keep_arriving(monkeypatch):
    """Arrivals queued faster than they are handled must not hold an overdue batch back until SAVE_BATCH."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    clock = iter(range(0, 1000, 2))  # every reading of the clock is two seconds after the last one
    monkeypatch.setattr(sync, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    saved: list[list[int]] = []
    monkeypatch.setattr(sync, "_save", lambda job, batch: saved.append([k.killmail_id for k in batch]))
    claimed = [{"killmail_id": i, "killmail_hash": f"h{i}"} for i in (1, 2, 3)]
    futures = []
    for ref in claimed:  # all three fetched before the job looks: they wait in its queue together
        future = Future()
        future.set_result(SimpleNamespace(killmail_id=ref["killmail_id"]))
        futures.append(future)
    job = sync.Job(None, None, None, sync.SyncOptions(), sync.SyncResult(0))  # no connection: _save is replaced
    stop = sync._collect(job, claimed, futures, {1, 2, 3})
    assert stop is None
    assert [batch for batch in saved if batch] == [[1], [2], [3]]


def test_fetched_killmails_are_saved_as_they_arrive_not_behind_a_slower_fetch(conn, sim, database_url, monkeypatch):
    """Paced fetches end in no set order (each waits for its own slot): the one still waiting must not hold
    those already fetched unsaved, where a killed process would lose them and the bucket pay for them again."""
    import threading
    from concurrent.futures import Future

    from helpers import wait_until
    from killmail_model import parse_killmail

    monkeypatch.setattr(sync, "SAVE_EVERY", 0.05)
    sim.add_pilots(n_pilots=2, n_killmails=4, share=1, expired_fraction=0.0, revoked=0, corporations=1)
    bodies = sim.expected_killmails()
    ids = sorted(bodies)[:4]
    claimed = [{"killmail_id": i, "killmail_hash": sim.killmail_hash(i)} for i in ids]
    futures = [Future() for _ in ids]
    result = sync.SyncResult(0)
    job = sync.Job(conn, None, now_for(sim), sync.SyncOptions(), result)  # no ESI client: the futures are the fetches
    collecting = threading.Thread(target=sync._collect, args=(job, claimed, futures, set(ids)), daemon=True)
    collecting.start()
    for ref, future in zip(claimed[1:], futures[1:], strict=True):  # every fetch but the first one's ends
        future.set_result(parse_killmail(bodies[ref["killmail_id"]], **ref))
    with db.connect(database_url) as other:
        wait_until(lambda: len(stored_ids(other)) == 3, timeout=10, what="the three fetched killmails saved")
        assert ids[0] not in stored_ids(other)
        futures[0].set_result(parse_killmail(bodies[ids[0]], **claimed[0]))
        collecting.join(timeout=10)
        assert stored_ids(other) >= set(ids) and result.saved == 4


def test_killmails_are_valued_when_saved_and_their_ids_named_once_per_job(conn, world, sim):
    results = sync_all(conn, world, sim, options=sync.SyncOptions())  # a new process: prices not loaded yet
    stats = sim.stats()
    assert stats["by_route"]["prices"] == 1  # once for every job, until the prices expire
    jobs_that_saved = sum(1 for r in results.values() if r.saved)
    named = conn.execute("SELECT count(*) AS n, count(name) AS known FROM names").fetchone()
    assert named["n"] == named["known"] > 0
    # One call per job that saved, and one more per thousand ids (ESI's batch), none refused: all are known.
    assert 0 < stats["by_route"]["names"] <= jobs_that_saved + named["n"] // 1000
    assert conn.execute("SELECT count(*) AS n FROM killmails WHERE total_value IS NULL").fetchone()["n"] == 0
    # Which values and names, exactly: test_a_real_killmail_is_saved_valued_and_named_as_worked_out_by_hand.


def test_a_real_killmail_is_saved_valued_and_named_as_worked_out_by_hand(conn, sim, esi):
    sim.add_pilots(n_pilots=1, n_killmails=0, expired_fraction=0.0, revoked=0, corporations=1)
    pilot = sim.pilots()[0]
    sim.add_killmail_body(pilot["character_id"], SAMPLE, "f" * 40)
    insert_users(conn, [pilot])
    now = now_for(sim)
    db.save_market_prices(conn, SAMPLE_PRICES, now)  # as the process that last refreshed them left them
    db.save_esi_cache(conn, values.PRICES_KEY, '"v1"', now + timedelta(hours=1))
    conn.commit()
    # A new process (a price book of its own): it loads those.
    result = sync.sync_character(conn, esi, pilot["character_id"], now, options=sync.SyncOptions())
    assert (result.status, result.saved) == ("ok", 1)
    assert conn.execute("SELECT destroyed_value, dropped_value, total_value FROM killmails "
                        "WHERE killmail_id = 134265477").fetchone() == SAMPLE_VALUES
    names = {r["id"]: r["name"] for r in conn.execute("SELECT id, name FROM names")}
    assert set(names) == SAMPLE_NAMED and None not in names.values()
    assert names[1354830081] == "Goonswarm Federation"  # the victim's alliance, as ESI names it
    assert sim.stats()["by_route"]["prices"] == 0


def test_a_namer_names_the_ids_jobs_hand_it_off_their_path(conn, world, sim, database_url):
    """With a Namer, a job makes no names call: it hands its ids over, and the namer names them all together
    (here when it closes: its period is an hour)."""
    sim.add_killmail_body(sim.pilots()[0]["character_id"], SAMPLE, "f" * 40)
    namer = names.Namer(lambda: db.connect(database_url), world, every=3600)
    options = sync.SyncOptions(namer=namer)
    results = [sync.sync_character(conn, world, p["character_id"], now_for(sim), options=options)
               for p in sim.pilots()]
    assert sum(r.saved for r in results) > 0
    assert sim.stats()["by_route"]["names"] == 0
    assert conn.execute("SELECT count(*) AS n FROM names").fetchone()["n"] == 0
    namer.close()
    named = conn.execute("SELECT count(*) AS n FROM names").fetchone()["n"]
    assert sim.stats()["by_route"]["names"] == -(-named // 1000)   # ESI's batches of 1 000, none refused
    sample_names = conn.execute("SELECT id, name FROM names WHERE id = ANY(%s)", (list(SAMPLE_NAMED),)).fetchall()
    assert {r["id"] for r in sample_names if r["name"]} == SAMPLE_NAMED  # the real killmail's, worked out by hand


def test_ids_esi_cannot_name_are_remembered_and_the_sync_goes_on(conn, world, sim, monkeypatch):
    pilot = next(p for p in sim.pilots() if not p["revoked"])
    victim_ship = next(iter(sim.expected_killmails(valid_only=True).values()))["victim"]["ship_type_id"]
    sim.make_unknown_names(victim_ship)
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim))
    assert result.status == "ok" and result.saved > 0
    row = conn.execute("SELECT name, unknown_until FROM names WHERE id = %s", (victim_ship,)).fetchone()
    assert row is not None and row["name"] is None and row["unknown_until"] > now_for(sim)


def test_killmails_saved_while_prices_are_unreachable_are_valued_by_later_jobs_and_announced_once(
        conn, world, sim, monkeypatch):
    monkeypatch.setattr(sync, "VALUE_BATCH", 40)               # several jobs share the backlog
    db.add_webhook(conn, "all", "http://127.0.0.1:9/all", format="json")
    db.add_webhook(conn, "priced", "http://127.0.0.1:9/priced", format="json", min_value=1)
    conn.commit()
    # Old enough to announce some, not all; a new process: its price book has no prices yet.
    options = sync.SyncOptions(notify_max_age=40 * 86400)
    pilots = [p["character_id"] for p in sim.pilots()]
    sim.fail_next(r"/markets/prices", 503, count=1000)
    now = now_for(sim)
    for pilot in pilots:
        sync.sync_character(conn, world, pilot, now, options=options)
    sim.clear_faults()
    count = "SELECT count(*) AS n FROM killmails WHERE total_value IS NULL"
    outbox = "SELECT count(*) AS n, count(DISTINCT killmail_id) AS distinct FROM outbox o JOIN webhooks w " \
             "ON w.id = o.webhook_id WHERE w.name = %s"
    unvalued = conn.execute(count).fetchone()["n"]
    assert unvalued == len(stored_ids(conn)) > 0
    assert conn.execute(outbox, ("priced",)).fetchone()["n"] == 0     # it cannot judge them yet
    all_before = conn.execute(outbox, ("all",)).fetchone()["n"]
    later = now + values.RECHECK
    for pilot in pilots:   # the next jobs (lists still fresh: nothing new to fetch) value 40 killmails each
        sync.sync_character(conn, world, pilot, later, options=options)
    assert conn.execute(count).fetchone()["n"] == max(0, unvalued - 40 * len(pilots)) == 0
    wanted = conn.execute("SELECT count(*) AS n FROM killmails WHERE total_value >= 1 AND killmail_time > "
                          "now() - interval '40 days'").fetchone()["n"]
    assert 0 < wanted < unvalued
    assert dict(conn.execute(outbox, ("priced",)).fetchone()) == {"n": wanted, "distinct": wanted}
    assert conn.execute(outbox, ("all",)).fetchone()["n"] == all_before  # not queued a second time
    for pilot in pilots:
        sync.sync_character(conn, world, pilot, later + timedelta(minutes=1), options=options)
    assert conn.execute(outbox, ("priced",)).fetchone()["n"] == wanted


# ---------------------------------------------------------------------------------------------- TOKEN_KEY

NEW_KEY, OLD_KEY = TOKEN_KEYS


def sealed_sync(conn, client, sim, keys, *, now=None):
    """Sync every pilot with refresh tokens sealed and opened with these keys."""
    options = sync.SyncOptions(tokens=TokenVault(keys))
    return {p["character_id"]: sync.sync_character(conn, client, p["character_id"], now or now_for(sim),
                                                   options=options)
            for p in sim.pilots()}


def seal_rows(conn, keys) -> None:
    """Seal every stored refresh token with these keys, as an earlier worker would have."""
    vault = TokenVault(keys)
    for row in conn.execute("SELECT character_id, refresh_token FROM users").fetchall():
        conn.execute("UPDATE users SET refresh_token = %s WHERE character_id = %s",
                     (vault.seal(row["refresh_token"]), row["character_id"]))
    conn.commit()


def test_with_token_key_plaintext_rows_are_read_and_every_refreshed_token_is_stored_sealed(conn, world, sim):
    """Rows the web app wrote in plaintext are refreshed, and sealed as the rotated token is stored; twenty-one
    minutes later every live grant is refreshed from its sealed value."""
    results = sealed_sync(conn, world, sim, [NEW_KEY])
    assert sorted(r.status for r in results.values()).count("ok") == 9
    current = {p["character_id"]: p for p in sim.pilots()}
    refreshed = [cid for cid, r in results.items() if r.status == "ok"
                 and db.get_user(conn, cid)["refresh_token"] != current[cid]["refresh_token"]]
    assert refreshed  # those whose access token had expired
    for cid in refreshed:
        stored = db.get_user(conn, cid)["refresh_token"]
        assert is_sealed(stored) and current[cid]["refresh_token"] not in stored
        assert TokenVault([NEW_KEY]).open(stored) == current[cid]["refresh_token"]
    sim.advance(21 * 60)
    sim.reset_stats()
    again = sealed_sync(conn, world, sim, [NEW_KEY], now=now_for(sim))
    assert sim.stats()["refreshes"] == 9 and sim.stats()["invalid_grants"] == 0
    assert sum(r.status == "ok" for r in again.values()) == 9
    stored = conn.execute("SELECT refresh_token FROM users WHERE revoked_token_sha256 IS NULL").fetchall()
    assert len(stored) == 9 and all(is_sealed(r["refresh_token"]) for r in stored)


def test_rotation_a_token_under_the_second_key_is_refreshed_and_stored_under_the_first(conn, world, sim):
    seal_rows(conn, [OLD_KEY])
    results = sealed_sync(conn, world, sim, [NEW_KEY, OLD_KEY])
    assert sum(r.status == "ok" for r in results.values()) == 9
    assert sim.stats()["invalid_grants"] == 1  # the revoked pilot's only: each sealed token opened to the right one
    current = {p["character_id"]: p["refresh_token"] for p in sim.pilots()}
    expired = [p["character_id"] for p in sim.pilots() if not p["revoked"] and p["expires_at"] <= now_for(sim)]
    for cid in expired:
        assert TokenVault([NEW_KEY]).open(db.get_user(conn, cid)["refresh_token"]) == current[cid]


def test_a_token_no_key_opens_ends_the_run_with_a_clear_error_and_loses_nothing(conn, world, sim):
    seal_rows(conn, [OLD_KEY])
    pilot = next(p for p in sim.pilots() if not p["revoked"] and p["expires_at"] <= now_for(sim))
    before = db.get_user(conn, pilot["character_id"])["refresh_token"]
    sim.reset_stats()
    result = sync.sync_character(conn, world, pilot["character_id"], now_for(sim),
                                 options=sync.SyncOptions(tokens=TokenVault([NEW_KEY])))
    assert result.status == "error" and "TOKEN_KEY does not hold" in result.error
    assert sim.stats()["requests"] == 0  # SSO was not asked: the token it holds is still good
    user = db.get_user(conn, pilot["character_id"])
    assert user["refresh_token"] == before and user["revoked"] is False
    run = conn.execute("SELECT status, error FROM sync_runs WHERE character_id = %s",
                       (pilot["character_id"],)).fetchone()
    assert run["status"] == "error" and "TOKEN_KEY" in run["error"]
    # The operator puts the old key back as the second: the same row syncs, nothing was lost.
    fixed = sync.sync_character(conn, world, pilot["character_id"], now_for(sim),
                                options=sync.SyncOptions(tokens=TokenVault([NEW_KEY, OLD_KEY])))
    assert fixed.status == "ok"


def test_a_sealed_token_sso_refuses_is_marked_revoked_and_not_due_again(conn, world, sim):
    seal_rows(conn, [NEW_KEY])
    revoked = next(p for p in sim.pilots() if p["revoked"])
    result = sync.sync_character(conn, world, revoked["character_id"], now_for(sim),
                                 options=sync.SyncOptions(tokens=TokenVault([NEW_KEY])))
    assert result.status == "needs_relogin" and db.get_user(conn, revoked["character_id"])["revoked"]
    due = db.due_users(conn, now_for(sim) + timedelta(hours=1), interval=300, stale_after=7200)
    assert revoked["character_id"] not in {u["character_id"] for u in due}


def test_a_systems_region_is_looked_up_once_and_named_with_the_other_ids(conn, sim, database_url):
    client = EsiClient(make_settings(database_url, sim.base_url), sleep=lambda s: None)
    names.resolve_names(conn, client, {30002053, 17478}, now_for(sim))  # a Retriever's killmail in Hek
    assert db.regions_of(conn, [30002053]) == {30002053: 10000042}
    assert db.names_of(conn, [30002053, 10000042, 17478]) == {30002053: "Hek", 10000042: "Metropolis",
                                                              17478: "Retriever"}
    routes = sim.stats()["by_route"]
    assert (routes["system"], routes["constellation"], routes["names"]) == (1, 1, 1)  # the region in the same call
    names.resolve_names(conn, client, {30002053, 17478}, now_for(sim))  # a second killmail in Hek
    assert sim.stats()["by_route"] == routes


def test_a_system_esi_does_not_place_is_not_asked_again_and_a_failed_lookup_is(conn, sim, database_url):
    client = EsiClient(make_settings(database_url, sim.base_url), sleep=lambda s: None)
    sim.make_unknown_names(30000743)  # ESI answers 404 for it: no region, and asking again costs the error limit
    sim.fail_next(r"/universe/constellations/", 503, count=10)  # a constellation unreachable for now
    names.resolve_names(conn, client, {30000743, 30002053}, now_for(sim))
    assert db.regions_of(conn, [30000743, 30002053]) == {}
    assert db.systems_to_locate(conn, [30000743, 30002053]) == [30002053]
    sim.clear_faults()
    names.resolve_names(conn, client, {30000743, 30002053}, now_for(sim))  # the next killmail in both
    assert db.regions_of(conn, [30000743, 30002053]) == {30002053: 10000042}
    assert sim.stats()["by_route"]["system"] == 3  # 30000743 once, 30002053 twice


def test_no_transaction_is_open_while_a_systems_region_is_asked_of_esi(conn, sim, database_url):
    """Another process saving the same system's region would wait on an uncommitted row for as long as this
    lookup waits for ESI (its limits, a slow answer): every ESI call of the lookup finds the session idle."""
    client = EsiClient(make_settings(database_url, sim.base_url), sleep=lambda s: None)
    states = []
    for name in ("get_constellation_of", "get_region_of"):
        call = getattr(client, name)
        setattr(client, name, lambda arg, call=call: states.append(conn.info.transaction_status) or call(arg))
    names.locate_systems(conn, client, {30002053, 30000743}, now_for(sim))
    assert states == [psycopg.pq.TransactionStatus.IDLE] * 4  # two systems, two calls each
    assert db.regions_of(conn, [30002053, 30000743]) == {30002053: 10000042, 30000743: 10000010}


def test_region_lookups_end_when_told_and_the_names_call_still_comes(conn, sim, database_url):
    """A stopping namer (close) bounds its region lookups, two ESI calls a system, so that a worker's SIGTERM
    is not held by a cold start's hundreds of new systems; the ids themselves are still named."""
    client = EsiClient(make_settings(database_url, sim.base_url), sleep=lambda s: None)
    asked = []
    names.resolve_names(conn, client, {30002053, 30000743, 17478}, now_for(sim),
                       locate_while=lambda: not asked.append(1) and len(asked) <= 1)
    routes = sim.stats()["by_route"]
    assert (routes["system"], routes["constellation"], routes["names"]) == (1, 1, 1)
    assert len(db.systems_to_locate(conn, [30002053, 30000743])) == 1  # the other is left for a later killmail
    assert set(db.names_of(conn, [30002053, 30000743, 17478])) == {30002053, 30000743, 17478}


def test_a_namer_closed_without_time_names_its_ids_and_looks_up_no_region(conn, world, sim, database_url):
    namer = names.Namer(lambda: db.connect(database_url), world, every=3600)
    namer.add({30002053, 17478})
    namer.close(timeout=0.0)
    namer._thread.join()  # close(0) returns at once; the last round still runs
    routes = sim.stats()["by_route"]
    assert (routes["system"], routes["names"]) == (0, 1)
    assert set(db.names_of(conn, [30002053, 17478])) == {30002053, 17478}

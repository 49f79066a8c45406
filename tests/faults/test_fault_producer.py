"""Fault: the producer run every second while workers run, with duplicate jobs and tokens expiring under them."""
from __future__ import annotations

import random
import subprocess
import sys
import time

import pika
import pytest

import broker
from fault_helpers import (  # noqa: F401
    assert_all_stored,
    check_stored,
    fault_settings,
    faults_line,
    fixture_fast,
    fixture_own_rabbit,
    fixture_workers,
    overlapping_runs,
    publish_raw,
    queue_all,
    queue_counts,
    users_idle,
    wait_until,
)
from helpers import ROOT, insert_users, make_settings, run_script, settings_env

pytestmark = pytest.mark.timeout(300)

# The issue asks for a minute; 20 s keeps CI short and still gives every pilot several syncs (each is due again
# 5 s after its last one: users.sync_interval_seconds wins over SYNC_INTERVAL_SECONDS=30).
PRODUCER_SECONDS = 20
USER_INTERVAL = 5
# sync_runs.started_at is the job's clock, read before sync_character takes the character's lock, and
# finished_at is written before the lock is released: two runs that followed each other through the lock may
# still overlap by that gap (a millisecond or so on a loaded machine). Two runs that really ran together overlap
# by at least an ESI round trip (the simulator answers after 30 ms here).
CLOCK_BEFORE_LOCK = 0.02


def test_producer_every_second_never_syncs_one_character_twice_at_once(conn, fast, database_url, queue_name,
                                                                        workers):
    sim = fast
    sim.configure(cache_seconds=USER_INTERVAL, latency_ms=30)
    sim.add_pilots(n_pilots=16, n_killmails=480, share=3, expired_fraction=0.5, revoked=1, corporations=2)
    insert_users(conn, sim.pilots())
    conn.execute("UPDATE users SET sync_interval_seconds = %s", (USER_INTERVAL,))
    conn.commit()
    settings = fault_settings(database_url, sim, queue_name, sync_interval_seconds=30)
    running = [workers(settings), workers(settings)]
    rng = random.Random(3)
    everyone = [p["character_id"] for p in sim.pilots()]
    live = [p["character_id"] for p in sim.pilots() if not p["revoked"]]
    ticks = queued = duplicates = expired = added = 0

    def tick(*, churn: bool) -> None:
        """One cron tick: the producer; with churn, also duplicate jobs, tokens expiring and new kills."""
        nonlocal ticks, queued, duplicates, expired, added
        ticks += 1
        queued += queue_all(settings)
        if churn:
            # Jobs the producer's dedupe cannot see (a replayed dead letter, a stale claim): the worker's lock
            # must keep two processes off one character.
            # Each is sent three times at once, so that several children take the same character together.
            doubles = [c for c in rng.sample(everyone, 2) for _ in range(3)]
            publish_raw(queue_name, settings, *(broker.encode_job(broker.new_job(c, None)) for c in doubles))
            duplicates += len(doubles)
            # Access tokens reaching their end, so refreshes (and refresh-token rotations) happen all along.
            conn.execute("UPDATE users SET expires_at = now() WHERE character_id = ANY(%s)", (rng.sample(live, 2),))
            conn.commit()
            expired += 2
            if ticks % 3 == 0:
                added += len(sim.add_killmails(rng.choice(live), 2))

    started = time.monotonic()
    while time.monotonic() < started + PRODUCER_SECONDS:
        tick(churn=True)
        time.sleep(max(0.0, started + ticks - time.monotonic()))  # cron's schedule: once a second
    # Cron keeps running until the kills added last are listed (their pilots' caches turn over) and stored.
    wait_until(lambda: tick(churn=False) or not check_stored(conn, sim)["missing"], timeout=90,
               what="every killmail stored", interval=1.0)
    wait_until(lambda: users_idle(conn) and queue_counts(queue_name) == [0], timeout=60,
               what="the last jobs to finish", interval=0.3)
    for worker in running:
        worker.terminate()
    codes = [worker.wait(timeout=60) for worker in running]
    assert codes == [0, 0], [w.output()[-3000:] for w in running]

    check = assert_all_stored(conn, sim)
    stats = sim.stats()
    overlaps = overlapping_runs(conn)
    real = [o for o in overlaps if o["overlap_seconds"] > CLOCK_BEFORE_LOCK]
    users = {r["character_id"]: r for r in conn.execute(
        "SELECT character_id, refresh_token, revoked_token_sha256 FROM users").fetchall()}
    lost = [p["character_id"] for p in sim.pilots()
            if not p["revoked"] and (users[p["character_id"]]["refresh_token"] != p["refresh_token"]
                                     or users[p["character_id"]]["revoked_token_sha256"] is not None)]
    runs = conn.execute("SELECT count(*) AS n, count(*) FILTER (WHERE status = 'locked') AS locked, "
                        "count(*) FILTER (WHERE status = 'error') AS failed, count(DISTINCT character_id) AS users, "
                        "max(per) AS most FROM sync_runs, LATERAL (SELECT count(*) AS per FROM sync_runs s "
                        "WHERE s.character_id = sync_runs.character_id) x").fetchone()
    conn.commit()
    skips = sum(w.count("🔒") for w in running)
    revoked = sum(p["revoked"] for p in sim.pilots())
    faults_line("producer_every_second", seconds=PRODUCER_SECONDS, producer_runs=ticks, jobs_queued=queued,
                duplicate_jobs=duplicates, runs=runs["n"], most_runs_per_character=runs["most"],
                locked_skips=skips, failed_runs=runs["failed"], overlapping_runs=len(real),
                skew_overlaps=len(overlaps) - len(real),
                max_overlap_ms=round(1000 * max((o["overlap_seconds"] for o in overlaps), default=0), 1),
                tokens_expired=expired, refreshes=stats["refreshes"], invalid_grants=stats["invalid_grants"],
                revoked_pilots=revoked, refresh_tokens_lost=len(lost), killmails_added=added,
                killmails_expected=check["expected"], stored=check["stored"], duplicated_rows=check["duplicated"],
                duplicate_detail_fetches=stats["duplicate_detail_fetches"],
                early_list_fetches=stats["early_list_fetches"], status_420=stats["status_420"],
                status_429=stats["status_429"])
    assert real == [], [f"{o['character_id']}: runs {o['first']} ({o['a']}) and {o['second']} ({o['b']}) "
                        f"overlap by {o['overlap_seconds']:.3f} s" for o in real]
    assert stats["invalid_grants"] == revoked  # the revoked pilot's one refresh; no live pilot lost its grant
    assert lost == []
    assert stats["duplicate_detail_fetches"] == 0
    assert stats["status_420"] == 0


def test_a_broker_lost_in_the_middle_of_a_run_leaves_no_pilot_claimed_without_a_job(conn, database_url, queue_name,
                                                                                   own_rabbit):
    pilots = 100_000  # enough that the run is still publishing when the broker goes (a run takes seconds)
    conn.execute("INSERT INTO users (character_id, character_name, access_token, refresh_token, expires_at) "
                 "SELECT 90000000 + g, 'Pilot ' || g, 'a', 'r', now() + interval '1 hour' "
                 "FROM generate_series(1, %s) AS g", (pilots,))
    conn.commit()
    settings = make_settings(database_url, rabbitmq_url=own_rabbit.url, queue_name=queue_name)
    producer = subprocess.Popen([sys.executable, str(ROOT / "queue_killmails.py")], cwd=ROOT,
                                env=settings_env(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    wait_until(lambda: claimed(conn) > 0, timeout=60, interval=0.005, what="the run to claim its pilots")
    own_rabbit.stop_app()                                 # while it publishes
    output = producer.communicate(timeout=120)[0]
    own_rabbit.start_app()
    assert producer.returncode == 1, output
    assert 0 < depth(own_rabbit.url, queue_name) < pilots, output  # the broker went in the middle of the run
    # Every pilot still claimed has its job in the queue: the rest were released, and the next run queues them.
    assert claimed(conn) <= depth(own_rabbit.url, queue_name)
    done = run_script("queue_killmails.py", settings, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert claimed(conn) == pilots and depth(own_rabbit.url, queue_name) >= pilots


def claimed(conn) -> int:
    n = conn.execute("SELECT count(*) AS n FROM users WHERE queued_at IS NOT NULL").fetchone()["n"]
    conn.commit()
    return n


def depth(url: str, queue: str) -> int:
    """Messages ready in a queue of this broker."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def test_a_producer_killed_between_publish_and_confirm_has_its_pilots_queued_by_the_next_run(
        conn, database_url, queue_name, own_rabbit):
    pilots = 50
    conn.execute("INSERT INTO users (character_id, character_name, access_token, refresh_token, expires_at) "
                 "SELECT 90000000 + g, 'Pilot ' || g, 'a', 'r', now() + interval '1 hour' "
                 "FROM generate_series(1, %s) AS g", (pilots,))
    conn.commit()
    settings = make_settings(database_url, rabbitmq_url=own_rabbit.url, queue_name=queue_name)
    # A memory alarm: the broker takes the connection and its declarations, then blocks it at its first publish,
    # so the run's messages are sent and never confirmed.
    own_rabbit.ctl("set_vm_memory_high_watermark", "0")
    producer = subprocess.Popen([sys.executable, str(ROOT / "queue_killmails.py")], cwd=ROOT,
                                env=settings_env(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        wait_until(lambda: unconfirmed(conn) == pilots, timeout=60, interval=0.05, what="the run to claim")
        time.sleep(1)  # its messages written to the socket, the broker silent
        assert producer.poll() is None and unconfirmed(conn) == pilots
    finally:
        producer.kill()                                   # SIGKILL: no chance to release anything
        producer.communicate(timeout=30)
        own_rabbit.ctl("set_vm_memory_high_watermark", "0.4")
    assert claimed(conn) == pilots                         # still claimed, by a session that is gone
    wait_until(lambda: sessions_alive(conn) == 0, timeout=30, what="PostgreSQL to end the killed run's session")
    done = run_script("queue_killmails.py", settings, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"✓ Found {pilots} users to sync" in done.stdout
    assert claimed(conn) == pilots and unconfirmed(conn) == 0
    # Every pilot has a job; a message the broker took from the killed run before it noticed is a duplicate at worst.
    assert pilots <= depth(own_rabbit.url, queue_name) <= 2 * pilots


def unconfirmed(conn) -> int:
    n = conn.execute("SELECT count(*) AS n FROM users WHERE claimed_by IS NOT NULL").fetchone()["n"]
    conn.commit()
    return n


def sessions_alive(conn) -> int:
    """Backends that still hold a claim."""
    n = conn.execute("SELECT count(*) AS n FROM users u "
                     "JOIN pg_stat_activity a ON a.pid = u.claimed_by").fetchone()["n"]
    conn.commit()
    return n

"""killmail_worker.py as operators run it: subprocesses on the real broker and database, ESI simulated."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import typing
from datetime import UTC, datetime

import pika
import psycopg
import pytest
from cryptography.fernet import Fernet

import broker
import db
import killmail_worker
import sync
from helpers import (
    RABBITMQ_URL,
    ROOT,
    TOKEN_KEYS,
    insert_users,
    make_settings,
    queue_counts,
    run_script,
    settings_env,
    wait_until,
)
from tokens import TokenVault, is_sealed


def start_worker(settings, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "killmail_worker.py"), *args], cwd=ROOT,
                            env=settings_env(settings), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def stored(conn) -> dict[int, int]:
    """killmail id -> attacker rows stored."""
    rows = conn.execute("SELECT k.killmail_id, count(a.*) AS n FROM killmails k "
                        "LEFT JOIN attackers a USING (killmail_id) GROUP BY 1").fetchall()
    return {r["killmail_id"]: r["n"] for r in rows}


def assert_complete(conn, sim, *, duplicates: int = 0):
    expected = sim.expected_killmails(valid_only=True)
    got = stored(conn)
    assert set(got) == set(expected)
    assert all(got[i] == len(expected[i]["attackers"]) for i in expected)  # nothing half-saved
    assert sim.stats()["duplicate_detail_fetches"] <= duplicates


@pytest.fixture
def settings(database_url, queue_name, sim):
    sim.configure(detail_bucket=(2_000_000, 900))  # pacing is tested in test_limits; here it would only slow
    return make_settings(database_url, sim.base_url, queue_name=queue_name, prefetch_count=3)


@pytest.mark.parametrize("page_size", [1000, 50])
def test_two_burst_workers_store_every_killmail_once(conn, sim, settings, page_size):
    sim.configure(page_size=page_size)
    sim.add_pilots(n_pilots=40, n_killmails=1500, share=3, expired_fraction=0.25, revoked=1, corporations=4)
    insert_users(conn, sim.pilots())
    assert run_script("queue_killmails.py", settings).returncode == 0
    workers = [start_worker(settings, "--burst") for _ in range(2)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert_complete(conn, sim)
    stats = sim.stats()
    assert stats["by_route"]["detail"] == len(sim.expected_killmails())
    assert stats["status_420"] == stats["status_429"] == 0
    assert "👤 Processing: Pilot" in "".join(outputs) and "✅ Completed: Pilot" in "".join(outputs)
    # Right after: no user is due (the directors' corporations are, now that their corporation is known) ...
    again = run_script("queue_killmails.py", settings)
    assert "✓ Found 0 users to sync" in again.stdout and "And 4 corporations" in again.stdout
    start_worker(settings, "--burst").communicate(timeout=120)
    # ... and a forced job makes neither a list call (before Expires) nor a detail call.
    sim.reset_stats()
    pilot = next(p for p in sim.pilots() if not p["revoked"] and "corporation" not in p["scopes"])
    run_script("queue_killmails.py", settings, "--character-id", str(pilot["character_id"]))
    worker = start_worker(settings, "--burst")
    worker.communicate(timeout=120)
    assert sim.stats()["requests"] == 0
    assert conn.execute("SELECT count(*) AS n FROM sync_runs WHERE character_id = %s",
                        (pilot["character_id"],)).fetchone()["n"] == 2


def test_a_worker_sweeps_killmails_whose_pilot_needs_a_new_login(conn, sim, settings):
    """Listed before its pilot's grant died, never fetched: a child's first job is followed by a sweep."""
    import db
    sim.add_pilots(n_pilots=3, n_killmails=60, share=1, expired_fraction=0.0, revoked=0, corporations=1)
    insert_users(conn, sim.pilots())
    left, live = sim.pilots()[0], sim.pilots()[1:]
    ids = sorted(sim.killmail_ids_for(left["character_id"]))[:sync.SWEEP_LIMIT]
    db.store_refs(conn, "character", left["character_id"], [(i, sim.killmail_hash(i)) for i in ids])
    db.mark_revoked(conn, left["character_id"], left["refresh_token"], "invalid_grant")
    # The ledger of a list bucket nobody calls any more: the sweep prunes it too.
    conn.execute("INSERT INTO esi_spent (bucket, second, own) VALUES ('char-killmail:1', now() - interval '3 h', 2)")
    conn.commit()
    assert run_script("queue_killmails.py", settings).returncode == 0  # the two live pilots
    output = start_worker(settings, "--burst").communicate(timeout=120)[0]
    assert "🧹 Sweeping" in output, output
    assert conn.execute("SELECT count(*) AS n FROM esi_spent WHERE bucket = 'char-killmail:1'").fetchone()["n"] == 0
    assert set(ids) <= set(stored(conn))
    live_ids = set().union(*(sim.killmail_ids_for(p["character_id"]) for p in live))
    assert set(stored(conn)) == live_ids | set(ids)
    assert sim.stats()["duplicate_detail_fetches"] == 0


def test_sigterm_finishes_running_jobs_and_loses_nothing(conn, sim, settings):
    sim.configure(latency_ms=30)
    sim.add_pilots(n_pilots=12, n_killmails=400, share=2, expired_fraction=0.0, revoked=0, corporations=2)
    insert_users(conn, sim.pilots())
    run_script("queue_killmails.py", settings)
    worker = start_worker(settings)
    wait_until(lambda: sim.stats()["by_route"]["detail"] >= 5, what="a job in the middle of its details")
    worker.send_signal(signal.SIGTERM)
    output = worker.communicate(timeout=120)[0]
    assert worker.returncode == 0, output
    partial = stored(conn)
    expected = sim.expected_killmails()
    assert all(partial[i] == len(expected[i]["attackers"]) for i in partial)  # each saved whole or not at all
    assert len(partial) < len(expected)  # it stopped early: the rest is still queued
    finisher = start_worker(settings, "--burst")
    finisher.communicate(timeout=300)
    assert_complete(conn, sim)
    assert queue_counts(settings.queue_name) == [0]


def test_bad_message_is_dead_lettered_and_the_others_processed(conn, sim, settings):
    sim.add_pilots(n_pilots=3, n_killmails=30, share=1, expired_fraction=0.0, revoked=0, corporations=1)
    insert_users(conn, sim.pilots())
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    broker.declare_topology(channel, settings.queue_name, max_attempts=settings.max_attempts)
    channel.basic_publish("", settings.queue_name, b"{not json")
    channel.basic_publish("", settings.queue_name, b'{"character_id": "x"}')
    connection.close()
    run_script("queue_killmails.py", settings)
    worker = start_worker(settings, "--burst")
    output = worker.communicate(timeout=120)[0]
    assert worker.returncode == 0
    assert "bad message, dead-lettered: message is not JSON" in output
    assert_complete(conn, sim)
    assert queue_counts(settings.queue_name, broker.dead_queue(settings.queue_name)) == [0, 2]


def test_failing_job_backs_off_then_dead_letters_and_replays(conn, sim, database_url, queue_name):
    settings = make_settings(database_url, sim.base_url, queue_name=queue_name, prefetch_count=1, max_attempts=2)
    sim.add_pilots(n_pilots=1, n_killmails=5, share=1, expired_fraction=0.0, revoked=0, corporations=1)
    insert_users(conn, sim.pilots())
    sim.fail_next(r"/killmails/recent", 503, count=6)  # three tries per attempt, two attempts
    run_script("queue_killmails.py", settings)
    start_worker(settings, "--burst").communicate(timeout=120)
    retry, dead = broker.retry_queue(queue_name, 1), broker.dead_queue(queue_name)
    assert queue_counts(queue_name, retry, dead) in ([0, 1, 0], [1, 0, 0])
    wait_until(lambda: queue_counts(queue_name) == [1], what="the retry to come back after its delay")
    start_worker(settings, "--burst").communicate(timeout=120)
    assert queue_counts(queue_name, retry, dead) == [0, 0, 1]
    runs = conn.execute("SELECT status, attempt, error FROM sync_runs ORDER BY id").fetchall()
    assert [(r["status"], r["attempt"]) for r in runs] == [("error", 1), ("error", 2)]
    assert "503" in runs[0]["error"]
    replay = run_script("killmail_worker.py", settings, "--replay-dead")
    assert replay.returncode == 0 and "Moved 1 dead jobs back" in replay.stdout
    start_worker(settings, "--burst").communicate(timeout=120)
    assert_complete(conn, sim)


def test_a_killed_child_is_replaced_and_its_job_redelivered(conn, sim, settings):
    sim.configure(latency_ms=20)
    sim.add_pilots(n_pilots=6, n_killmails=300, share=1, expired_fraction=0.0, revoked=0, corporations=1)
    insert_users(conn, sim.pilots())
    run_script("queue_killmails.py", settings)
    worker = start_worker(settings, "--burst")
    wait_until(lambda: sim.stats()["by_route"]["detail"] >= 10, what="jobs in progress")
    victims = children_of(worker.pid)
    assert len(victims) == 3
    os.kill(victims[0], signal.SIGKILL)
    output = worker.communicate(timeout=300)[0]
    assert worker.returncode == 0, output
    assert "exited with -9; starting another" in output
    # Details the killed process had fetched but not yet saved are fetched again: at most one batch and the
    # fetches in flight.
    assert_complete(conn, sim, duplicates=sync.SAVE_BATCH + settings.detail_concurrency)


def test_corporations_are_queued_and_synced_through_their_directors(conn, sim, settings):
    sim.add_pilots(n_pilots=8, n_killmails=200, share=2, expired_fraction=0.25, revoked=0, corporations=2)
    insert_users(conn, sim.pilots())
    run_script("queue_killmails.py", settings)
    start_worker(settings, "--burst").communicate(timeout=120)
    # The first syncs learned which pilots are directors and of which corporation.
    second = run_script("queue_killmails.py", settings)
    assert "✓ Found 0 users to sync" in second.stdout and "And 2 corporations" in second.stdout
    output = start_worker(settings, "--burst").communicate(timeout=120)[0]
    assert "🏢 Corporation" in output
    assert set(stored(conn)) == set(sim.expected_killmails(valid_only=True, corporations=True))
    assert sim.stats()["duplicate_detail_fetches"] == 0
    kinds = conn.execute("SELECT kind, status, count(*) AS n FROM sync_runs GROUP BY 1, 2 ORDER BY 1").fetchall()
    assert [(k["kind"], k["status"], k["n"]) for k in kinds] == [("character", "ok", 8), ("corporation", "ok", 2)]


ARENA_PROBE = """
import ctypes, sys, threading
import killmail_worker
if sys.argv[1] == "capped":
    killmail_worker.cap_malloc_arenas()
start = threading.Barrier(16)
def churn():
    start.wait()  # all at once, so that glibc finds its arenas busy and would make new ones
    for _ in range(300):
        [bytearray(2000) for _ in range(50)]
threads = [threading.Thread(target=churn) for _ in range(16)]
for t in threads: t.start()
for t in threads: t.join()
ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena n:" paragraph per arena, on stderr
"""


@pytest.mark.parametrize("mode", ["capped", "uncapped"])
def test_the_worker_caps_glibc_malloc_arenas_for_its_detail_threads(mode):
    """Each thread that allocates may get a glibc arena of its own (up to 8 per core), and a child's RSS then
    grows with its DETAIL_CONCURRENCY threads; the worker caps them at MALLOC_ARENAS before it forks."""
    import killmail_worker

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run([sys.executable, "-c", ARENA_PROBE, mode], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    arenas = done.stderr.count("Arena ")
    if mode == "capped":
        assert 1 <= arenas <= killmail_worker.MALLOC_ARENAS
    else:
        assert arenas > killmail_worker.MALLOC_ARENAS  # what the cap is for: the probe does make more


def test_the_reconnect_backoff_starts_again_after_a_connection_that_lasted_and_not_after_a_brief_one():
    """An outage's backoff grows while the broker refuses or drops connections at once (a broker restarting in
    a loop), and starts again from its first step once a connection consumed for RECONNECT_CAP seconds."""
    cap = killmail_worker.RECONNECT_CAP
    failures = 0
    for consumed_for in (None, None, 2.0, None, 0.1):  # refused, refused, dropped after 2 s, refused, dropped
        failures = killmail_worker.failures_in_a_row(failures, consumed_for, cap)
    assert failures == 5
    assert killmail_worker.failures_in_a_row(failures, cap, cap) == 1  # a new outage after a lasting connection
    assert killmail_worker.failures_in_a_row(failures, cap * 100, cap) == 1
    assert killmail_worker.failures_in_a_row(failures, cap - 0.1, cap) == 6


def test_a_failed_jobs_wait_is_the_errors_own_field_and_outcomes_are_four(conn, database_url, queue_name,
                                                                           monkeypatch):
    """A JobError carries the wait ESI asked for as a declared field; the retry waits at least that long."""
    def paused(conn, esi, character_id, now, *, options):
        raise sync.JobError("recent killmails: paused", retry_after=3600.0)
    monkeypatch.setattr(sync, "sync_character", paused)
    child = killmail_worker.Child(make_settings(database_url, queue_name=queue_name), burst=True)
    outcome = child.process(broker.encode_job(broker.new_job(42, "Pilot")), 1)
    child.drop_db()
    assert (outcome.action, outcome.reason) == ("retry", "recent killmails: paused") and outcome.delay >= 3600
    run = conn.execute("SELECT character_id, status, error FROM sync_runs").fetchone()
    assert run == {"character_id": 42, "status": "error", "error": "recent killmails: paused"}
    assert typing.get_args(typing.get_type_hints(killmail_worker.Outcome)["action"]) == ("ack", "retry", "dead",
                                                                                  "release")


def test_only_a_redelivered_job_waits_for_its_pilots_lock(conn, database_url, queue_name, monkeypatch):
    """RabbitMQ marks a job redelivered when the process that had it died or lost its connection: that process's
    session may still hold the pilot's lock for a moment, so the job waits for it. A first delivery does not:
    its pilot's lock is held by a live run (a duplicate job), which the wait would only idle behind."""
    waits = []

    def synced(conn, esi, character_id, now, *, options):
        waits.append(options.lock_wait)
        return sync.SyncResult(character_id)
    monkeypatch.setattr(sync, "sync_character", synced)
    child = killmail_worker.Child(make_settings(database_url, queue_name=queue_name), burst=True)
    body = broker.encode_job(broker.new_job(42, "Pilot"))
    outcomes = [child.process(body, 1), child.process(body, 1, redelivered=True)]
    child.drop_db()
    assert [o.action for o in outcomes] == ["ack", "ack"]
    assert waits == [0.0, sync.REDELIVERED_LOCK_WAIT]


def test_a_deadlock_runs_the_job_again_and_is_logged_as_what_it_is(conn, database_url, queue_name, monkeypatch,
                                                                    caplog):
    """PostgreSQL ends one of two deadlocked transactions (DeadlockDetected, an OperationalError as a lost
    connection is): the job runs again in place, and the log does not send the operator after the network."""
    tries = []

    def synced(conn, esi, character_id, now, *, options):
        tries.append(character_id)
        if len(tries) == 1:
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        return sync.SyncResult(character_id)
    monkeypatch.setattr(sync, "sync_character", synced)
    child = killmail_worker.Child(make_settings(database_url, queue_name=queue_name), burst=True)
    outcome = child.process(broker.encode_job(broker.new_job(42, "Pilot")), 1)
    child.drop_db()
    assert outcome.action == "ack" and tries == [42, 42]
    assert "the database rolled the job's transaction back during the job (deadlock detected)" in caplog.text
    assert "connection lost" not in caplog.text


# ---------------------------------------------------------------------------------------------- a job's end
# A child's own consume loop on the real broker, its `process` replaced: RabbitMQ delivers the job, the job thread
# runs it, the I/O loop publishes the retry or dead letter and acks. The job queue is empty at the end only if the
# job was acked: the connection's close gives an unacked delivery back to it.

RETRY_HOURS = 3600  # retry_base_seconds that keep a retried job in its retry queue while the test looks


def run_one_job(settings, process, *, headers: dict | None, body: bytes = b"{}") -> None:
    """Queue one message (priority 3, message id "job-7") and have a burst child consume it with this `process`."""
    with broker.open_channel(RABBITMQ_URL, settings.queue_name, max_attempts=settings.max_attempts) as channel:
        broker.publish(channel, settings.queue_name, body, priority=3, headers=headers, message_id="job-7")
    child = killmail_worker.Child(settings, burst=True)
    child.process = process
    try:
        assert child.consume() is True  # burst: done once the queue has nothing ready
    finally:
        child.drop_db()


def messages(queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every message in a queue, taken off it."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    found = []
    try:
        channel = connection.channel()
        while (taken := channel.basic_get(queue, auto_ack=True))[0] is not None:
            found.append(taken[1:])
    finally:
        connection.close()
    return found


def where_jobs_are(settings) -> dict[str, int]:
    """Ready messages in each of the job's queues that holds any."""
    queue = settings.queue_name
    names = [queue, *(broker.retry_queue(queue, n) for n in range(1, settings.max_attempts)), broker.dead_queue(queue)]
    return {name: n for name, n in zip(names, queue_counts(*names), strict=True) if n}


def crashing(exc: Exception):
    def process(body, attempt, *, redelivered=False):
        raise exc
    return process


@pytest.mark.timeout(60)
@pytest.mark.parametrize("header, retry_queue", [
    ("abc", 1), (b"\xff", 1), (0, 1), (-3, 1), ("2", 2), (None, 1),
])
@pytest.mark.parametrize("crash", [RuntimeError("a bug"), OverflowError("int too large"), KeyError("x")])
def test_any_attempt_header_and_any_exception_end_in_an_ack_and_a_retry(database_url, queue_name, header,
                                                                        retry_queue, crash):
    settings = make_settings(database_url, queue_name=queue_name, retry_base_seconds=RETRY_HOURS)
    run_one_job(settings, crashing(crash), headers=None if header is None else {broker.ATTEMPT_HEADER: header})
    retry = broker.retry_queue(queue_name, retry_queue)
    assert where_jobs_are(settings) == {retry: 1}  # acked, and handed on to the attempt's retry queue
    (properties, body), = messages(retry)
    assert body == b"{}" and (properties.priority, properties.message_id) == (3, "job-7")
    assert properties.headers == {broker.ATTEMPT_HEADER: retry_queue + 1}
    assert int(properties.expiration) >= RETRY_HOURS * 1000 * 2 ** (retry_queue - 1)


@pytest.mark.timeout(60)
def test_a_retried_job_comes_back_to_the_job_queue_after_its_delay_one_attempt_on(database_url, queue_name):
    settings = make_settings(database_url, queue_name=queue_name, retry_base_seconds=1)
    run_one_job(settings, crashing(RuntimeError("a bug")), headers={broker.ATTEMPT_HEADER: 1})
    wait_until(lambda: where_jobs_are(settings) == {queue_name: 1}, timeout=30,
               what="the retry's expiry to dead-letter the job back to its queue")
    (properties, body), = messages(queue_name)
    assert body == b"{}" and properties.headers[broker.ATTEMPT_HEADER] == 2
    death, = properties.headers["x-death"]  # RabbitMQ's own record of the hop
    assert (death["queue"], death["reason"]) == (broker.retry_queue(queue_name, 1), "expired")


@pytest.mark.timeout(60)
def test_a_crash_message_never_reaches_the_dead_letter_header(database_url, queue_name):
    """An unforeseen error's text may quote what the failing call was given (http.client quotes a whole header)."""
    settings = make_settings(database_url, queue_name=queue_name, max_attempts=2)
    run_one_job(settings, crashing(ValueError("Invalid header value b'Bearer token-SECRET-6\\n'")),
                headers={broker.ATTEMPT_HEADER: 2})
    dead = broker.dead_queue(queue_name)
    assert where_jobs_are(settings) == {dead: 1}  # the last attempt: no retry queue
    (properties, body), = messages(dead)
    headers = properties.headers
    assert (headers["x-death-reason"], headers[broker.ATTEMPT_HEADER]) == ("worker error: ValueError", 2)
    assert datetime.fromisoformat(headers["x-failed-at"]) <= datetime.now(UTC)
    assert "SECRET" not in repr(headers) and body == b"{}" and properties.message_id == "job-7"


@pytest.mark.timeout(60)
def test_a_message_that_is_no_job_is_dead_lettered_at_once_with_the_reason(database_url, queue_name):
    settings = make_settings(database_url, queue_name=queue_name)
    child_process = killmail_worker.Child(settings, burst=True).process  # the real one: it fails at decoding
    run_one_job(settings, child_process, headers=None, body=b"not json")
    dead = broker.dead_queue(queue_name)
    assert where_jobs_are(settings) == {dead: 1}  # attempt 1 of 8, yet no retry: it would fail the same way
    (properties, body), = messages(dead)
    assert body == b"not json" and properties.headers[broker.ATTEMPT_HEADER] == 1
    assert properties.headers["x-death-reason"] == "message is not JSON: b'not json'"


@pytest.mark.timeout(60)
def test_a_childs_jobs_run_on_one_thread_for_its_life_each_acked(database_url, queue_name):
    settings = make_settings(database_url, queue_name=queue_name)
    with broker.open_channel(RABBITMQ_URL, queue_name, max_attempts=settings.max_attempts) as channel:
        for n in range(3):
            broker.publish(channel, queue_name, b"{}", priority=3, headers=None, message_id=f"job-{n}")
    child = killmail_worker.Child(settings, burst=True)
    ran_on: list[int] = []

    def process(body, attempt, *, redelivered=False):
        ran_on.append(threading.get_ident())
        return killmail_worker.Outcome("ack")
    child.process = process
    try:
        assert child.consume() is True  # burst: done once the queue has nothing ready
    finally:
        child.drop_db()
    assert len(ran_on) == 3 and not child.job_in_hand
    assert len(set(ran_on)) == 1 and ran_on[0] != threading.get_ident()  # one job thread, not one per job
    assert where_jobs_are(settings) == {}  # each acked: an unacked one would be back in the queue


@pytest.mark.timeout(60)
def test_a_retry_that_cannot_be_published_as_asked_is_dead_lettered_and_acked(database_url, queue_name):
    settings = make_settings(database_url, queue_name=queue_name)
    outcome = killmail_worker.Outcome("retry", "paused", float("inf"))   # a delay no expiration can carry
    run_one_job(settings, lambda body, attempt, **_: outcome, headers={})
    dead = broker.dead_queue(queue_name)
    assert where_jobs_are(settings) == {dead: 1}
    (properties, _), = messages(dead)
    assert properties.headers["x-death-reason"] == "paused (and OverflowError publishing it)"


def test_a_worker_stopped_during_its_start_up_exits_cleanly_and_forks_nothing(database_url, queue_name):
    """SIGTERM while the parent checks the broker and the database (systemd stopping a unit just started)."""
    supervisor = killmail_worker.Supervisor(make_settings(database_url, queue_name=queue_name), burst=False)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        supervisor.catch_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        assert supervisor.run() == 0
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    assert supervisor.children == {} and supervisor.restarts == 0


def test_a_heartbeat_tells_how_long_the_job_made_no_progress():
    beat = killmail_worker.Heartbeat()
    assert beat.stalled_for(10**9) == 0.0                 # no job: nothing stalls
    beat.start(4242)
    started, progress, character = beat.read()
    assert character == 4242 and started == progress
    assert beat.stalled_for(progress + 30) == pytest.approx(30)
    beat.beat()
    assert beat.read()[1] >= progress
    beat.end()
    assert beat.read() == (0.0, 0.0, 0)


def test_a_heartbeat_read_half_written_never_shows_a_stall_older_than_the_job():
    """The parent reads while a child writes start() (no lock between processes): a start seen with the last
    job's progress (or none) counts from the start, not from that older progress."""
    beat = killmail_worker.Heartbeat()
    beat._LAYOUT.pack_into(beat._map, 0, 1000.0, 0.0, 4242)      # the job's start written, its progress not yet
    assert beat.stalled_for(1010.0) == pytest.approx(10)
    beat._LAYOUT.pack_into(beat._map, 0, 1000.0, 400.0, 4242)    # the last job's progress still there
    assert beat.stalled_for(1010.0) == pytest.approx(10)


def test_the_watchdog_kills_a_child_whose_job_made_no_progress_and_spares_the_others(caplog, database_url):
    settings = make_settings(database_url, prefetch_count=2, job_stall_seconds=60)
    supervisor = killmail_worker.Supervisor(settings, burst=False)
    stuck, busy = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(2))
    try:
        supervisor.children = {stuck.pid: 0, busy.pid: 1}
        supervisor.heartbeats[0].start(1001, now=1000.0)
        supervisor.heartbeats[1].start(1002, now=1000.0)
        supervisor.heartbeats[1].beat(now=1050.0)         # this one's job answered since
        stalled_at = 1061.0
        with caplog.at_level("ERROR"):
            supervisor.watch(stalled_at)
        assert stuck.wait(timeout=10) == -signal.SIGKILL
        assert busy.poll() is None
        assert "character 1001) made no progress for 61 s" in caplog.text
        supervisor.watch(stalled_at)                      # killed once: not again while it is being reaped
        assert caplog.text.count("made no progress") == 1
    finally:
        for proc in (stuck, busy):
            proc.kill()
            proc.wait()


def test_the_children_still_running_when_the_stops_grace_ends_are_killed(database_url):
    settings = make_settings(database_url, prefetch_count=1, worker_stop_grace_seconds=5)
    supervisor = killmail_worker.Supervisor(settings, burst=False)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        supervisor.children = {child.pid: 0}
        supervisor.stop_by = 100.0
        supervisor.watch(99.0)                            # within the grace: left alone
        assert child.poll() is None
        supervisor.watch(100.0)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()


# ---------------------------------------------------------------------------------------------- TOKEN_KEY

def test_a_worker_with_token_key_refreshes_sealed_and_plaintext_tokens_and_stores_them_sealed(conn, sim,
                                                                                              settings):
    import db
    sim.add_pilots(n_pilots=3, n_killmails=30, share=1, expired_fraction=1.0, revoked=0, corporations=1)
    insert_users(conn, sim.pilots())
    under_old = sim.pilots()[0]
    conn.execute("UPDATE users SET refresh_token = %s WHERE character_id = %s",
                 (TokenVault([TOKEN_KEYS[1]]).seal(under_old["refresh_token"]), under_old["character_id"]))
    conn.commit()
    settings = dataclasses.replace(settings, token_keys=TOKEN_KEYS)
    assert run_script("queue_killmails.py", settings).returncode == 0
    output = start_worker(settings, "--burst").communicate(timeout=120)[0]
    assert "🔐 Refresh tokens: sealed with TOKEN_KEY (2 keys)" in output, output
    assert sim.stats()["refreshes"] == 3 and sim.stats()["invalid_grants"] == 0
    assert_complete(conn, sim)
    for pilot in sim.pilots():
        stored_token = db.get_user(conn, pilot["character_id"])["refresh_token"]
        assert is_sealed(stored_token) and TokenVault(TOKEN_KEYS[:1]).open(stored_token) == pilot["refresh_token"]


def test_seal_tokens_rewrites_every_row_under_the_first_key_and_leaves_what_no_key_opens(conn, sim, settings):
    import db
    sim.add_pilots(n_pilots=4, n_killmails=0, revoked=0, corporations=1)
    insert_users(conn, sim.pilots())
    plain, under_old, revoked, foreign = sim.pilots()
    conn.execute("UPDATE users SET refresh_token = %s WHERE character_id = %s",
                 (TokenVault([TOKEN_KEYS[1]]).seal(under_old["refresh_token"]), under_old["character_id"]))
    unknown_key = TokenVault([Fernet.generate_key().decode()]).seal(foreign["refresh_token"])
    conn.execute("UPDATE users SET refresh_token = %s WHERE character_id = %s",
                 (unknown_key, foreign["character_id"]))
    db.mark_revoked(conn, revoked["character_id"], revoked["refresh_token"], "invalid_grant")
    conn.commit()
    assert run_script("killmail_worker.py", settings, "--seal-tokens").returncode == 2  # without TOKEN_KEY
    result = run_script("killmail_worker.py", dataclasses.replace(settings, token_keys=TOKEN_KEYS), "--seal-tokens")
    assert result.returncode == 1 and "Sealed 3 refresh tokens" in result.stdout and "1 no key opens" in result.stdout
    first = TokenVault(TOKEN_KEYS[:1])
    for pilot in (plain, under_old, revoked):
        assert first.open(db.get_user(conn, pilot["character_id"])["refresh_token"]) == pilot["refresh_token"]
    assert db.get_user(conn, revoked["character_id"])["revoked"] is True
    assert db.get_user(conn, plain["character_id"])["revoked"] is False
    assert db.get_user(conn, foreign["character_id"])["refresh_token"] == unknown_key


def test_a_childs_job_and_its_progress_reach_worker_jobs_and_go_when_it_ends(conn, database_url):
    beat = killmail_worker.Heartbeat()
    reporter = killmail_worker.JobReporter(lambda: db.connect(database_url, autocommit=True), beat, "host:7",
                                           every=0.05)

    def row():
        found = conn.execute("SELECT character_id, progress_at FROM worker_jobs WHERE worker = 'host:7'").fetchone()
        conn.commit()
        return found

    try:
        beat.start(4242)
        assert wait_until(row, timeout=10, what="the job reported")["character_id"] == 4242
        beat.end()
        wait_until(lambda: row() is None, timeout=10, what="the ended job's row gone")
    finally:
        reporter.close()


JOB_THREAD_BUG = """
import sys
import killmail_worker
from settings import load_settings_or_exit
def broken(self, *delivery):
    raise RuntimeError("a bug outside any job")
killmail_worker.Child.run_job = broken
child = killmail_worker.Child(load_settings_or_exit(), burst=True)
child.consume()
"""


@pytest.mark.timeout(60)
def test_a_job_thread_that_fails_outside_any_job_ends_its_process_and_the_job_is_redelivered(database_url,
                                                                                              queue_name):
    """With prefetch 1, a delivery held by a thread that died would hold the child for good; the process ends
    instead (the parent forks another) and the broker gives the message to the next consumer."""
    settings = make_settings(database_url, queue_name=queue_name)
    with broker.open_channel(RABBITMQ_URL, queue_name, max_attempts=settings.max_attempts) as channel:
        broker.publish(channel, queue_name, b'{"character_id": 1}', priority=3, headers=None, message_id="job-1")
    done = subprocess.run([sys.executable, "-c", JOB_THREAD_BUG], cwd=ROOT, env=settings_env(settings),
                          capture_output=True, text=True, timeout=50)
    assert done.returncode == 70, done.stderr[-2000:]
    assert "the job thread failed outside any job" in done.stderr and "a bug outside any job" in done.stderr
    assert where_jobs_are(settings) == {queue_name: 1}  # back in its queue, untouched

"""Faults of the work itself: poison messages, a malformed killmail, a job that always fails; SIGTERM mid-job."""
from __future__ import annotations

import json
import time

import pika
import pytest

import broker
from fault_helpers import (  # noqa: F401
    assert_all_stored,
    broker_queue_state,
    check_stored,
    fault_settings,
    faults_line,
    fixture_fast,
    fixture_workers,
    publish_raw,
    queue_all,
    queue_counts,
    users_idle,
    wait_until,
)
from helpers import RABBITMQ_URL, insert_users, run_script

pytestmark = pytest.mark.timeout(240)

POISON = [b"{not json", b'{"character_id": "x"}', b"[1, 2]", b'{"character_id": 0}',
          json.dumps({"character_id": 123456789, "character_name": "nobody", "queued_at": ""}).encode()]


def dead_letters(queue_name: str) -> list[tuple[bytes, dict]]:
    """Take every message off the dead-letter queue: (body, headers)."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        channel = connection.channel()
        letters = []
        while True:
            method, properties, body = channel.basic_get(broker.dead_queue(queue_name), auto_ack=True)
            if method is None:
                return letters
            letters.append((body, properties.headers or {}))
    finally:
        connection.close()


def runs_of(conn, character_id: int) -> int:
    n = conn.execute("SELECT count(*) AS n FROM sync_runs WHERE character_id = %s", (character_id,)).fetchone()["n"]
    conn.commit()
    return n


def test_poison_messages_a_failing_job_and_a_malformed_killmail_touch_nothing_else(conn, fast, database_url,
                                                                                   queue_name, workers):
    sim = fast
    sim.add_pilots(n_pilots=6, n_killmails=180, share=1, expired_fraction=0.3, revoked=0, corporations=1)
    insert_users(conn, sim.pilots())
    settings = fault_settings(database_url, sim, queue_name, prefetch_count=2, max_attempts=3)
    pilots = [p["character_id"] for p in sim.pilots()]
    failing, damaged = pilots[-1], pilots[-2]
    malformed = min(sim.killmail_ids_for(damaged))
    sim.make_malformed(malformed)
    sim.fail_next(rf"/characters/{failing}/killmails/recent", 503, count=10_000)  # its list never answers
    publish_raw(queue_name, settings, *POISON)
    queued = queue_all(settings)
    worker = workers(settings)
    retries = [broker.retry_queue(queue_name, n) for n in range(1, settings.max_attempts)]
    dead = broker.dead_queue(queue_name)

    def settled():
        return users_idle(conn) and queue_counts(queue_name, *retries, dead) == [0] * settings.max_attempts + [
            len(POISON) + 1]

    wait_until(settled, timeout=120, what="poison and failing jobs dead-lettered, the rest done", interval=0.3)
    ref = conn.execute("SELECT attempts, last_error FROM killmail_refs WHERE killmail_id = %s",
                       (malformed,)).fetchone()
    run = conn.execute("SELECT status, failed FROM sync_runs WHERE character_id = %s", (damaged,)).fetchone()
    conn.commit()
    assert ref["attempts"] == 1 and "victim" in ref["last_error"] and run["status"] == "partial" and run["failed"] == 1
    # Later syncs (a pilot queued again once the reference's backoff has passed) retry the malformed killmail up
    # to the cap, then leave it alone.
    for _ in range(settings.max_attempts):
        conn.execute("UPDATE killmail_refs SET next_attempt_at = now() WHERE killmail_id = %s", (malformed,))
        conn.commit()
        before = runs_of(conn, damaged)
        assert run_script("queue_killmails.py", settings, "--character-id", str(damaged), timeout=60).returncode == 0
        wait_until(lambda before=before: runs_of(conn, damaged) > before and users_idle(conn), timeout=60,
                   what="the pilot's next sync", interval=0.2)
    worker.terminate()
    assert worker.wait(timeout=60) == 0, worker.output()[-4000:]

    letters = dead_letters(queue_name)
    by_body = {body: headers for body, headers in letters}
    assert len(letters) == len(POISON) + 1 and set(POISON) <= set(by_body)
    (failed_job,) = [h for b, h in letters if b not in POISON]
    assert failed_job[broker.ATTEMPT_HEADER] == settings.max_attempts and "503" in failed_job["x-death-reason"]
    assert all(by_body[b][broker.ATTEMPT_HEADER] == 1 and by_body[b]["x-death-reason"] for b in POISON)
    fetches = sim.stats()["detail_fetches"].get(malformed, 0)
    attempts = conn.execute("SELECT attempts FROM killmail_refs WHERE killmail_id = %s",
                            (malformed,)).fetchone()["attempts"]
    check = check_stored(conn, sim)
    failing_runs = conn.execute("SELECT status, attempt FROM sync_runs WHERE character_id = %s ORDER BY id",
                                (failing,)).fetchall()
    others = conn.execute("SELECT count(*) FILTER (WHERE status = 'ok') AS ok, count(DISTINCT character_id) AS n "
                          "FROM sync_runs WHERE character_id = ANY(%s)",
                          ([p for p in pilots if p not in (failing, damaged)],)).fetchone()
    faults_line("poison", poison_dead_lettered=len(POISON), failing_job_attempts=len(failing_runs),
                malformed_fetches=fetches, malformed_ref_attempts=attempts, cap=settings.max_attempts,
                jobs_queued=queued, killmails_expected=check["expected"], stored=check["stored"],
                missing=len(check["missing"]), duplicated_rows=check["duplicated"])
    assert [(r["status"], r["attempt"]) for r in failing_runs] == [("error", n) for n in
                                                                   range(1, settings.max_attempts + 1)]
    assert fetches == attempts == settings.max_attempts  # the last sync did not ask for it again
    assert set(check["missing"]) <= sim.killmail_ids_for(failing)  # only the failing pilot's own kills
    assert check["extra"] == check["partial"] == [] and check["duplicated"] == 0
    assert others["n"] == len(pilots) - 2 and others["ok"] == others["n"]


def test_sigterm_mid_jobs_acks_what_ran_and_leaves_the_rest_queued(conn, fast, database_url, queue_name, workers):
    sim = fast
    sim.configure(latency_ms=30)
    sim.add_pilots(n_pilots=12, n_killmails=720, share=1, expired_fraction=0.25, revoked=0, corporations=2)
    insert_users(conn, sim.pilots())
    settings = fault_settings(database_url, sim, queue_name)
    queued = queue_all(settings)
    worker = workers(settings)
    busy = wait_until(lambda: (jobs := worker.jobs()) and sum(j["phase"] == "details" for j in jobs.values()) == 3
                      and jobs, timeout=60, what="every child in the middle of its details", interval=0.05)
    in_flight = {j["character"] for j in busy.values()}
    signalled = time.monotonic()
    worker.terminate()
    code = worker.wait(timeout=120)
    took = time.monotonic() - signalled
    assert code == 0, worker.output()[-4000:]

    ready, unacked = broker_queue_state(queue_name)[queue_name]
    runs = conn.execute("SELECT character_id, status, extract(epoch FROM finished_at - started_at) AS seconds "
                        "FROM sync_runs").fetchall()
    conn.commit()
    processed = {r["character_id"] for r in runs if r["status"] in ("ok", "partial")}
    longest = max(float(r["seconds"]) for r in runs if r["character_id"] in in_flight)
    faults_line("sigterm", jobs_queued=queued, in_flight=len(in_flight), processed=len(processed),
                ready=ready, unacked=unacked, exit_seconds=round(took, 2), longest_job_seconds=round(longest, 2))
    assert unacked == 0
    assert len(runs) == len(processed)  # no job ran twice, none failed
    assert ready + len(processed) == queued  # every message either processed and acked, or still queued
    assert in_flight <= processed  # the running jobs finished rather than being abandoned
    assert 0 < ready  # it did stop early
    assert took <= longest + 5  # within the job's time (plus the children's exit)

    finisher = workers(settings, "--burst")
    assert finisher.wait(timeout=120) == 0, finisher.output()[-4000:]
    assert_all_stored(conn, sim)
    assert broker_queue_state(queue_name)[queue_name] == (0, 0)

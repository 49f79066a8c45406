"""Fault: ESI answering 10 % of all calls with a 5xx and 2 % with a 429 for a whole run."""
from __future__ import annotations

import time

import pytest

import broker
from fault_helpers import (  # noqa: F401
    assert_all_stored,
    fault_settings,
    faults_line,
    fixture_fast,
    fixture_workers,
    queue_all,
    queue_counts,
    users_idle,
    wait_until,
)
from helpers import insert_users, run_script

pytestmark = pytest.mark.timeout(420)

SWEEPS = 3


def failed_refs(conn) -> list[dict]:
    """References whose detail failed (5xx after the in-call retries) and that are still not stored."""
    rows = conn.execute(
        "SELECT r.killmail_id, r.attempts, min(c.character_id) AS character_id FROM killmail_refs r "
        "JOIN character_killmails c USING (killmail_id) "
        "WHERE NOT EXISTS (SELECT 1 FROM killmails k WHERE k.killmail_id = r.killmail_id) GROUP BY 1, 2"
    ).fetchall()
    conn.commit()
    return rows


def test_five_percent_server_errors_and_rate_limits_for_a_whole_run(conn, fast, database_url, queue_name, workers):
    sim = fast
    sim.configure(error_rate_5xx=0.10, rate_429=0.02)
    sim.add_pilots(n_pilots=12, n_killmails=360, share=1, expired_fraction=0.25, revoked=0, corporations=2)
    insert_users(conn, sim.pilots())
    settings = fault_settings(database_url, sim, queue_name)
    started = time.monotonic()
    queued = queue_all(settings)
    running = [workers(settings), workers(settings)]
    retries = [broker.retry_queue(queue_name, n) for n in range(1, settings.max_attempts)]

    def settled():
        return users_idle(conn) and queue_counts(queue_name, *retries) == [0] * settings.max_attempts

    wait_until(settled, timeout=240, what="every job to finish through its retries", interval=0.5)
    # A detail that failed three times within its call waits for a later sync (1 minute after the first failure).
    # Let that minute pass for those references and queue their pilots again, faults still on.
    swept = 0
    for _ in range(SWEEPS):
        left = failed_refs(conn)
        if not left:
            break
        swept += len(left)
        conn.execute("UPDATE killmail_refs SET next_attempt_at = now() WHERE killmail_id = ANY(%s)",
                     ([r["killmail_id"] for r in left],))
        conn.commit()
        for character_id in sorted({r["character_id"] for r in left}):
            run_script("queue_killmails.py", settings, "--character-id", str(character_id), timeout=60)
        wait_until(settled, timeout=120, what="the sweep's jobs to finish", interval=0.5)
    for worker in running:
        worker.terminate()
    codes = [worker.wait(timeout=90) for worker in running]
    elapsed = round(time.monotonic() - started, 1)
    check = assert_all_stored(conn, sim)
    stats = sim.stats()
    server_errors = sum(n for status, n in stats["by_status"].items() if status.startswith("5"))
    runs = conn.execute("SELECT count(*) FILTER (WHERE status = 'error') AS failed, count(*) AS runs, "
                        "max(attempt) AS most FROM sync_runs").fetchone()
    waits = sum(w.count("until its tokens come back") for w in running)  # the error budget's, here
    dead = queue_counts(broker.dead_queue(queue_name))[0]
    faults_line("esi_faults", rate_5xx=0.10, rate_429=0.02, requests=stats["requests"], status_5xx=server_errors,
                status_429=stats["status_429"], status_420=stats["status_420"],
                min_error_limit_remain=stats["min_error_limit_remain"], limit_waits=waits,
                job_retries=runs["failed"], runs=runs["runs"], most_attempts=runs["most"], dead_letters=dead,
                refs_swept=swept, jobs_queued=queued, killmails_expected=check["expected"], stored=check["stored"],
                duplicated_rows=check["duplicated"], duplicate_detail_fetches=stats["duplicate_detail_fetches"],
                seconds=elapsed)
    assert codes == [0, 0]
    assert stats["status_420"] == 0
    assert stats["min_error_limit_remain"] >= 50
    assert dead == 0
    assert stats["duplicate_detail_fetches"] == 0  # a 429 stops a job without losing what it had fetched

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
from limits import ERROR_FLOOR, ERROR_LIMIT, ERROR_LIMIT_BUCKET, ERROR_WINDOW

pytestmark = pytest.mark.timeout(420)

SWEEPS = 5  # later polls of the pilots whose references are left (deferred, failed, or stopped by a 429)


def errors_last_minute(conn) -> int:
    """Error answers the ledger counts in ESI's error window now."""
    row = conn.execute("SELECT coalesce(sum(own + other), 0) AS n FROM esi_spent WHERE starts_with(bucket, %s) "
                       "AND second > now() - make_interval(secs => %s)", (ERROR_LIMIT_BUCKET, ERROR_WINDOW)).fetchone()
    conn.commit()
    return row["n"]


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
    swept = []
    for _ in range(SWEEPS):
        left = failed_refs(conn)
        if not left:
            break
        swept.append(len(left))
        # A later poll, as the pilots' next due time would bring it: a backlog gives way to fresh calls while the
        # error budget is spent (limits.take), so polling again at once would only be deferred again.
        wait_until(lambda: errors_last_minute(conn) < ERROR_LIMIT - ERROR_FLOOR, timeout=ERROR_WINDOW + 30,
                   interval=1.0, what="the error budget to have room")
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
    left = conn.execute(
        "SELECT r.killmail_id, r.attempts, r.last_error, r.next_attempt_at, r.claimed_until, "
        "array_agg(c.character_id) AS pilots FROM killmail_refs r LEFT JOIN character_killmails c USING (killmail_id) "
        "WHERE NOT EXISTS (SELECT 1 FROM killmails k WHERE k.killmail_id = r.killmail_id) GROUP BY 1").fetchall()
    conn.commit()
    # What was left, and what the workers said of it, is the clue should any be missing.
    lines = [line for w in running for line in w.lines()
             if any(str(r["killmail_id"]) in line or any(str(p) in line for p in r["pilots"] if p) for r in left)]
    try:
        check = assert_all_stored(conn, sim)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; not stored: {left}\n" + "\n".join(lines[-60:])) from None
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
                refs_swept="/".join(map(str, swept)) or 0, jobs_queued=queued, killmails_expected=check["expected"],
                stored=check["stored"],
                duplicated_rows=check["duplicated"], duplicate_detail_fetches=stats["duplicate_detail_fetches"],
                seconds=elapsed)
    assert codes == [0, 0]
    assert stats["status_420"] == 0
    assert stats["min_error_limit_remain"] >= 50
    assert dead == 0
    assert stats["duplicate_detail_fetches"] == 0  # a 429 stops a job without losing what it had fetched

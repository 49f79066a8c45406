"""Fault: worker children killed with SIGKILL in the middle of their jobs, five times in one run."""
from __future__ import annotations

import os
import signal
import time

import pytest

import sync
from fault_helpers import (  # noqa: F401
    assert_all_stored,
    fault_settings,
    faults_line,
    fixture_fast,
    fixture_workers,
    queue_all,
    queue_counts,
    refetch_bound,
    users_idle,
    wait_until,
)
from helpers import insert_users

pytestmark = pytest.mark.timeout(300)

KILLS = 5


def test_five_kill_9_mid_job_lose_nothing_and_store_nothing_twice(conn, fast, database_url, queue_name, workers):
    sim = fast
    sim.configure(latency_ms=20)
    sim.add_pilots(n_pilots=30, n_killmails=3000, share=1, expired_fraction=0.2, revoked=0, corporations=3)
    insert_users(conn, sim.pilots())
    settings = fault_settings(database_url, sim, queue_name)
    queued = queue_all(settings)
    worker = workers(settings)
    killed: list[dict] = []

    def victim():
        children = worker.children()
        for pid, job in worker.jobs().items():
            if job["phase"] == "details" and pid in children and pid not in {k["pid"] for k in killed}:
                return pid, job
        return None

    deadline = time.monotonic() + 120
    while len(killed) < KILLS:
        pid, job = wait_until(victim, timeout=deadline - time.monotonic(), what="a child in the middle of its details",
                              interval=0.1)
        # Let it fetch a few more details, so it dies with fetched but unsaved killmails in hand (unless its job
        # ends first: near the end of the run there may be no more details to fetch).
        target = sim.stats()["by_route"]["detail"] + settings.detail_concurrency
        wait_until(lambda target=target, pid=pid: sim.stats()["by_route"]["detail"] >= target
                   or pid not in worker.jobs(), timeout=30, what="more detail fetches", interval=0.05)
        if pid not in worker.jobs():
            continue  # its job ended meanwhile: find another one in the middle of its work
        os.kill(pid, signal.SIGKILL)
        killed.append({"pid": pid, "character": job["character"], "listed": job["found"]})

    wait_until(lambda: users_idle(conn) and queue_counts(queue_name) == [0], timeout=180,
               what="every job, the killed ones redelivered, to finish", interval=0.3)
    # The parent notices a death when it is not sleeping out the restart delay of an earlier one: the redelivered
    # jobs can all be done before it has seen the last kill.
    wait_until(lambda: worker.count("exited with -9; starting another") == KILLS, timeout=120,
               what=f"the parent to see all {KILLS} kills", interval=0.2)
    # Nothing is left to do; the parent may still be waiting to replace the last child it lost. SIGTERM must not
    # wait for that: it is relayed at once, and idle children exit at once.
    children = len(worker.children())
    signalled = time.monotonic()
    worker.terminate()
    code = worker.wait(timeout=120)
    took = time.monotonic() - signalled
    assert code == 0, worker.output()[-4000:]
    assert worker.count("exited with -9; starting another") == KILLS
    check = assert_all_stored(conn, sim)
    # Every killed job was redelivered and finished by another process.
    for kill in killed:
        runs = conn.execute("SELECT count(*) AS n FROM sync_runs WHERE character_id = %s AND status IN "
                            "('ok', 'partial')", (kill["character"],)).fetchone()["n"]
        assert runs >= 1, kill
    assert queue_counts(queue_name) == [0]
    stats = sim.stats()
    # The estimate is SAVE_BATCH + DETAIL_CONCURRENCY per kill; the strict bound also counts the fetches
    # the pool finished ahead of the one the job waits for (refetch_bound).
    estimate = KILLS * (sync.SAVE_BATCH + settings.detail_concurrency)
    bound = KILLS * refetch_bound(settings)
    faults_line("kill9", kills_survived=len(killed), restarts=worker.count("starting another"), jobs_queued=queued,
                children_at_sigterm=children, exit_seconds=round(took, 2),
                killmails_expected=check["expected"], stored=check["stored"], duplicated_rows=check["duplicated"],
                duplicate_detail_fetches=stats["duplicate_detail_fetches"], duplicate_estimate=estimate,
                duplicate_bound=bound,
                detail_fetches=stats["by_route"]["detail"], status_420=stats["status_420"],
                status_429=stats["status_429"], min_error_limit_remain=stats["min_error_limit_remain"])
    assert stats["duplicate_detail_fetches"] <= bound
    assert stats["status_420"] == stats["status_429"] == 0
    assert took < 5, "SIGTERM waited for a pending restart"

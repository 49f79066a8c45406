"""Fault: worker children killed with SIGKILL in the middle of their jobs, five times in one run."""
from __future__ import annotations

import os
import signal
import time

import pytest

import sync
from conftest import insert_users
from fault_helpers import (assert_all_stored, fast, fault_settings, faults_line, queue_all, queue_counts,  # noqa: F401
                           wait_until, workers)

pytestmark = pytest.mark.timeout(300)

KILLS = 5


def test_five_kill_9_mid_job_lose_nothing_and_store_nothing_twice(conn, fast, database_url, queue_name, workers):
    sim = fast
    sim.configure(latency_ms=20)
    sim.add_pilots(n_pilots=30, n_killmails=3000, share=1, expired_fraction=0.2, revoked=0, corporations=3)
    insert_users(conn, sim.pilots())
    settings = fault_settings(database_url, sim, queue_name)
    queued = queue_all(settings)
    worker = workers(settings, "--burst")
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
        # Let it fetch a few more details, so it dies with fetched but unsaved killmails in hand.
        before = sim.stats()["by_route"]["detail"]
        wait_until(lambda: sim.stats()["by_route"]["detail"] >= before + 2 * settings.detail_concurrency,
                   timeout=30, what="more detail fetches", interval=0.1)
        if pid not in worker.jobs():
            continue  # its job ended meanwhile: find another one in the middle of its work
        os.kill(pid, signal.SIGKILL)
        killed.append({"pid": pid, "character": job["character"], "listed": job["found"]})

    code = worker.wait(timeout=240)
    output = worker.output()
    assert code == 0, output[-4000:]
    assert worker.count("exited with -9; starting another") == KILLS
    check = assert_all_stored(conn, sim)
    # Every killed job was redelivered and finished by another process.
    for kill in killed:
        runs = conn.execute("SELECT count(*) AS n FROM sync_runs WHERE character_id = %s AND status IN "
                            "('ok', 'partial')", (kill["character"],)).fetchone()["n"]
        assert runs >= 1, kill
    assert queue_counts(queue_name) == [0]
    stats = sim.stats()
    bound = KILLS * (sync.SAVE_BATCH + settings.detail_concurrency)
    faults_line("kill9", kills_survived=len(killed), restarts=worker.count("starting another"), jobs_queued=queued,
                killmails_expected=check["expected"], stored=check["stored"], duplicated_rows=check["duplicated"],
                duplicate_detail_fetches=stats["duplicate_detail_fetches"], duplicate_bound=bound,
                detail_fetches=stats["by_route"]["detail"], status_420=stats["status_420"],
                status_429=stats["status_429"], min_error_limit_remain=stats["min_error_limit_remain"])
    assert stats["duplicate_detail_fetches"] <= bound
    assert stats["status_420"] == stats["status_429"] == 0

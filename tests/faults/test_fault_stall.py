"""Fault: an ESI answer that never comes. The watchdog ends the job's process and the job is redelivered; a
SIGTERM ends the worker within its grace, the job released whole or redelivered."""
from __future__ import annotations

import time

import pytest

from fault_helpers import (  # noqa: F401
    assert_all_stored,
    fault_settings,
    fixture_fast,
    fixture_workers,
    queue_all,
    queue_counts,
    users_idle,
    wait_until,
)
from helpers import insert_users

pytestmark = pytest.mark.timeout(240)

LIST = r"/characters/\d+/killmails/recent"
DETAIL = r"/killmails/\d+/[0-9a-f]+"


@pytest.fixture
def one_pilot(conn, fast):
    fast.add_pilots(n_pilots=1, n_killmails=40, share=1, expired_fraction=0.0, revoked=0, corporations=1)
    insert_users(conn, fast.pilots())
    return fast


def test_a_job_whose_answer_never_comes_is_ended_by_the_watchdog_and_redelivered(conn, one_pilot, database_url,
                                                                               queue_name, workers):
    sim = one_pilot
    sim.stall_next(LIST)                                  # accepted, never answered (until the test ends)
    settings = fault_settings(database_url, sim, queue_name, prefetch_count=2, job_stall_seconds=10,
                              http_timeout_seconds=120)  # the read would wait two minutes: the watchdog is first
    assert queue_all(settings) == 1
    worker = workers(settings)
    wait_until(lambda: worker.count("made no progress for") == 1, timeout=60, what="the watchdog",
               interval=0.2)
    wait_until(lambda: users_idle(conn), timeout=60, what="the redelivered job to finish", interval=0.2)
    assert_all_stored(conn, sim)
    run = conn.execute("SELECT status FROM sync_runs ORDER BY id DESC LIMIT 1").fetchone()
    assert run["status"] == "ok"
    wait_until(lambda: worker.count("exited with -9; starting another") == 1, timeout=30,
               what="the parent to replace the process it killed", interval=0.2)
    worker.terminate()
    assert worker.wait(timeout=60) == 0


def test_sigterm_releases_a_job_waiting_for_an_answer_and_the_worker_exits_within_its_grace(
        conn, one_pilot, database_url, queue_name, workers):
    sim = one_pilot
    sim.stall_next(DETAIL, count=1000)                    # no detail answer comes
    settings = fault_settings(database_url, sim, queue_name, prefetch_count=1, http_timeout_seconds=120)
    assert queue_all(settings) == 1
    worker = workers(settings)
    wait_until(lambda: sim.stats()["stalled"] > 0, timeout=60, what="a detail call under way")
    signalled = time.monotonic()
    worker.terminate()
    assert worker.wait(timeout=settings.worker_stop_grace_seconds + 30) == 0
    took = time.monotonic() - signalled
    assert took < settings.worker_stop_grace_seconds
    assert worker.count("Released: Pilot") == 1, worker.output()[-3000:]
    assert queue_counts(queue_name) == [1]                # the job is back in the queue, whole
    run = conn.execute("SELECT status, attempt FROM sync_runs ORDER BY id DESC LIMIT 1").fetchone()
    assert (run["status"], run["attempt"]) == ("interrupted", 1)


def test_a_child_still_busy_when_the_grace_ends_is_killed_and_its_job_redelivered(conn, one_pilot, database_url,
                                                                                queue_name, workers):
    sim = one_pilot
    sim.stall_next(LIST)
    settings = fault_settings(database_url, sim, queue_name, prefetch_count=1, http_timeout_seconds=120,
                              worker_stop_grace_seconds=3)
    assert queue_all(settings) == 1
    worker = workers(settings)
    wait_until(lambda: sim.stats()["stalled"] > 0, timeout=60, what="the list call under way")
    signalled = time.monotonic()
    worker.terminate()
    assert worker.wait(timeout=30) == 0
    assert time.monotonic() - signalled < 3 + 5
    assert worker.count("still running 3 s after SIGTERM; killing them") == 1
    wait_until(lambda: queue_counts(queue_name) == [1], timeout=30, what="the job back in the queue")

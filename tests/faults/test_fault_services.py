"""Faults of the services: RabbitMQ stopped and started under running jobs, PostgreSQL sessions terminated, and
a PostgreSQL of the test's own restarted under running jobs."""
from __future__ import annotations

import time

import pytest

import db
from fault_helpers import (  # noqa: F401
    admin_connection,
    answer_or_false,
    assert_all_stored,
    broker_answers,
    fault_settings,
    faults_line,
    fixture_fast,
    fixture_own_postgres,
    fixture_own_rabbit,
    fixture_workers,
    per_pid,
    queue_all,
    queue_counts,
    rabbitmqctl,
    refetch_bound,
    sessions,
    stored_count,
    terminate_backends,
    users_idle,
    wait_until,
)
from helpers import insert_users

pytestmark = pytest.mark.timeout(300)

BROKER_RESTARTS = 2
DB_TERMINATIONS = 4
DB_RESTARTS = 2
LOST = "RabbitMQ connection lost"
BACK = "consuming again"


def jobs_running(*running_workers, at_least: int = 1):
    """A predicate: at least this many jobs are in the middle of their details across these workers."""
    return lambda: sum(j["phase"] == "details" for w in running_workers for j in w.jobs().values()) >= at_least


def test_broker_restarts_under_running_jobs_lose_no_job(conn, fast, database_url, queue_name, workers, own_rabbit):
    """On a RabbitMQ node of the test's own: stopping the shared one would cut every other client of it."""
    sim = fast
    sim.configure(latency_ms=20)
    sim.add_pilots(n_pilots=24, n_killmails=2400, share=1, expired_fraction=0.2, revoked=0, corporations=3)
    insert_users(conn, sim.pilots())
    # Four detail threads per child, not the default 32: jobs long enough for the broker to go down under them
    # each time (at 32 the queue can be empty before the last restart).
    settings = fault_settings(database_url, sim, queue_name, detail_concurrency=4, rabbitmq_url=own_rabbit.url)
    queued = queue_all(settings)
    steady = workers(settings)                 # runs until stopped
    burst = workers(settings, "--burst")       # exits once the queue is empty
    down_for = []
    for _ in range(BROKER_RESTARTS):
        # Jobs in flight, one at least in each worker still running (the burst one may have run out of jobs).
        wait_until(lambda: jobs_running(steady, burst, at_least=2)()
                   and all(w.jobs() for w in (steady, burst) if w.running()),
                   timeout=60, what="jobs in the middle of their details", interval=0.1)
        lost_before = steady.count(LOST), burst.count(LOST)
        stopped_at = time.monotonic()
        try:
            own_rabbit.stop_app()  # every client gets CONNECTION_FORCED
            # Down until both workers noticed it (a burst worker whose last job ended meanwhile has exited).
            wait_until(lambda lost_before=lost_before: steady.count(LOST) > lost_before[0]
                       and (burst.count(LOST) > lost_before[1] or not burst.running()),
                       timeout=20, what="both workers to notice the broker is gone", interval=0.1)
        finally:
            own_rabbit.start_app()
        down_for.append(round(time.monotonic() - stopped_at, 1))
        wait_until(lambda: broker_answers(own_rabbit.url), timeout=60, what="RabbitMQ to answer again",
                   interval=0.2)
        # Every child of the steady worker consumes again before the next restart (a job that ran on through the
        # outage would make "jobs in the middle of their details" true before any child reconnected).
        wait_until(lambda: all(per_pid(steady.lines(), BACK).get(pid, 0) >= len(down_for)
                               for pid in steady.children()), timeout=90,
                   what="every steady child to consume again", interval=0.1)

    code = burst.wait(timeout=240)
    assert code == 0, burst.output()[-4000:]
    wait_until(lambda: users_idle(conn) and queue_counts(queue_name, url=own_rabbit.url) == [0], timeout=180,
               what="every queued job to finish", interval=0.5)
    assert steady.running(), steady.output()[-4000:]  # it carried on by itself
    steady.terminate()
    assert steady.wait(timeout=60) == 0, steady.output()[-4000:]
    check = assert_all_stored(conn, sim)
    done = conn.execute("SELECT count(DISTINCT character_id) AS n FROM sync_runs WHERE status IN ('ok', 'partial')"
                        ).fetchone()["n"]
    stats = sim.stats()
    faults_line("broker_restart", restarts_survived=len(down_for), broker_down_seconds=down_for, jobs_queued=queued,
                users_synced=done, reconnects=steady.count("reconnecting in") + burst.count("reconnecting in"),
                killmails_expected=check["expected"], stored=check["stored"], duplicated_rows=check["duplicated"],
                duplicate_detail_fetches=stats["duplicate_detail_fetches"], status_420=stats["status_420"],
                status_429=stats["status_429"], min_error_limit_remain=stats["min_error_limit_remain"])
    assert done == len(sim.pilots())
    assert steady.count(LOST) >= BROKER_RESTARTS
    assert stats["duplicate_detail_fetches"] == 0  # a lost ack repeats a job, and a repeated job fetches nothing


def test_database_sessions_terminated_under_running_jobs(conn, fast, database_url, queue_name, workers):
    sim = fast
    sim.configure(latency_ms=20)
    sim.add_pilots(n_pilots=24, n_killmails=2400, share=1, expired_fraction=0.5, revoked=0, corporations=3)
    insert_users(conn, sim.pilots())
    settings = fault_settings(database_url, sim, queue_name, detail_concurrency=4)  # long jobs, as above
    queued = queue_all(settings)
    steady = workers(settings)
    burst = workers(settings, "--burst")
    ended = []
    with admin_connection(database_url) as admin:
        keep = {conn.info.backend_pid}
        for _ in range(DB_TERMINATIONS):
            wait_until(jobs_running(steady, burst, at_least=2), timeout=60,
                       what="jobs in the middle of their details", interval=0.1)
            gone = terminate_backends(admin, keep)
            ended.append(len(gone))
            # The next termination only once work has resumed: the workers connected again, then stored some more.
            # (Counted from before the termination, a batch committed just before it could pass for resumed
            # work, and the next termination would find no session to end.)
            wait_until(lambda gone=gone: sessions(admin, keep) - gone, timeout=60, what="the workers to reconnect",
                       interval=0.05)
            saved = stored_count(conn)
            wait_until(lambda saved=saved: stored_count(conn) > saved + 20, timeout=60, what="work to resume",
                       interval=0.2)

    code = burst.wait(timeout=240)
    assert code == 0, burst.output()[-4000:]
    wait_until(lambda: users_idle(conn) and queue_counts(queue_name) == [0], timeout=180,
               what="every queued job to finish", interval=0.5)
    assert steady.running(), steady.output()[-4000:]
    steady.terminate()
    assert steady.wait(timeout=60) == 0, steady.output()[-4000:]
    check = assert_all_stored(conn, sim)
    done = conn.execute("SELECT count(DISTINCT character_id) AS n FROM sync_runs WHERE status IN ('ok', 'partial')"
                        ).fetchone()["n"]
    stats = sim.stats()
    reruns = steady.count("running it again") + burst.count("running it again")
    tokens = {r["character_id"]: r["refresh_token"]
              for r in conn.execute("SELECT character_id, refresh_token FROM users")}
    lost_tokens = [p["character_id"] for p in sim.pilots() if tokens[p["character_id"]] != p["refresh_token"]]
    faults_line("pg_terminate", terminations=len(ended), sessions_ended=ended, jobs_queued=queued, users_synced=done,
                job_reruns=reruns, duplicate_bound=reruns * refetch_bound(settings),
                killmails_expected=check["expected"], stored=check["stored"], duplicated_rows=check["duplicated"],
                duplicate_detail_fetches=stats["duplicate_detail_fetches"], invalid_grants=stats["invalid_grants"],
                refresh_tokens_lost=len(lost_tokens), status_420=stats["status_420"], status_429=stats["status_429"],
                min_error_limit_remain=stats["min_error_limit_remain"])
    assert all(n > 0 for n in ended)
    assert done == len(sim.pilots())
    assert stats["invalid_grants"] == 0 and lost_tokens == []
    # A job whose connection died loses at most what it had fetched and not saved, and what was in flight.
    assert stats["duplicate_detail_fetches"] <= reruns * refetch_bound(settings)


def test_rotated_refresh_token_survives_a_lost_database_connection(conn, fast, database_url, queue_name, workers):
    """The connection dies while SSO is answering a refresh: the rotated token must still be stored."""
    sim = fast
    sim.add_pilots(n_pilots=1, n_killmails=5, share=1, expired_fraction=1.0, revoked=0, corporations=1)
    insert_users(conn, sim.pilots())
    sim.configure(latency_ms=2000)  # every answer takes 2 s: time to cut the database under a refresh
    settings = fault_settings(database_url, sim, queue_name, prefetch_count=1)
    queue_all(settings)
    worker = workers(settings, "--burst")
    with admin_connection(database_url) as admin:
        wait_until(lambda: sim.stats()["by_route"]["token"] == 1, timeout=30, what="the refresh to be asked",
                   interval=0.02)
        ended = len(terminate_backends(admin, {conn.info.backend_pid}))
        assert sim.stats()["refreshes"] == 0  # SSO has not answered yet: the cut came first
    assert worker.wait(timeout=60) == 0, worker.output()[-4000:]
    stats = sim.stats()
    (pilot,) = sim.pilots()
    user = conn.execute("SELECT refresh_token, last_sync_status FROM users").fetchone()
    faults_line("pg_terminate_during_refresh", sessions_ended=ended, refreshes=stats["refreshes"],
                invalid_grants=stats["invalid_grants"], job_reruns=worker.count("running it again"),
                token_kept=user["refresh_token"] == pilot["refresh_token"], status=user["last_sync_status"])
    assert worker.count("running it again") == 1
    assert stats["refreshes"] == 1 and stats["invalid_grants"] == 0
    assert user["refresh_token"] == pilot["refresh_token"] and user["last_sync_status"] == "ok"
    assert_all_stored(conn, sim)


def test_postgresql_restarts_under_running_jobs_lose_nothing(own_postgres, fast, queue_name, workers):
    """pg_ctl restart -m fast of the workers' PostgreSQL (a cluster of the test's own) in the middle of a run,
    twice: every killmail stored once, no refresh token lost, and the same worker processes carry on."""
    sim = fast
    sim.configure(latency_ms=20)
    sim.add_pilots(n_pilots=24, n_killmails=2400, share=1, expired_fraction=0.5, revoked=0, corporations=3)
    url = own_postgres.url
    with db.connect(url) as conn:
        insert_users(conn, sim.pilots())
    settings = fault_settings(url, sim, queue_name, detail_concurrency=4)  # long jobs, as above
    queued = queue_all(settings)
    steady = workers(settings)
    burst = workers(settings, "--burst")
    children = wait_until(lambda: len(kids := steady.children()) == settings.prefetch_count and set(kids),
                          timeout=30, what="the steady worker's children")
    saved_at_restart = []
    for _ in range(DB_RESTARTS):
        # Mid-run: jobs in the middle of their details, some killmails stored already.
        wait_until(lambda: jobs_running(steady, burst, at_least=2)() and answer_or_false(url, stored_count),
                   timeout=60, what="jobs in the middle of their details", interval=0.1)
        saved_at_restart.append(answer_or_false(url, stored_count))
        own_postgres.restart()
        # The next restart only once work has resumed: the workers stored more since the server came back.
        saved = wait_until(lambda: answer_or_false(url, stored_count), timeout=30, what="PostgreSQL to answer")
        wait_until(lambda saved=saved: answer_or_false(url, stored_count) > saved + 20, timeout=90,
                   what="work to resume after the restart", interval=0.2)

    code = burst.wait(timeout=240)
    assert code == 0, burst.output()[-4000:]
    wait_until(lambda: answer_or_false(url, users_idle) and queue_counts(queue_name) == [0], timeout=180,
               what="every queued job to finish", interval=0.5)
    assert steady.running(), steady.output()[-4000:]
    assert set(steady.children()) == children  # no child died and was replaced
    restarted = steady.count("exited with") + burst.count("exited with")
    steady.terminate()
    assert steady.wait(timeout=60) == 0, steady.output()[-4000:]
    with db.connect(url) as conn:
        check = assert_all_stored(conn, sim)
        done = conn.execute("SELECT count(DISTINCT character_id) AS n FROM sync_runs "
                            "WHERE status IN ('ok', 'partial')").fetchone()["n"]
        tokens = {r["character_id"]: r["refresh_token"]
                  for r in conn.execute("SELECT character_id, refresh_token FROM users")}
    stats = sim.stats()
    reruns = steady.count("running it again") + burst.count("running it again")
    lost_tokens = [p["character_id"] for p in sim.pilots() if tokens[p["character_id"]] != p["refresh_token"]]
    faults_line("pg_restart", restarts=DB_RESTARTS, stored_at_restart=saved_at_restart, jobs_queued=queued,
                users_synced=done, job_reruns=reruns, children_restarted=restarted,
                killmails_expected=check["expected"], stored=check["stored"], duplicated_rows=check["duplicated"],
                duplicate_detail_fetches=stats["duplicate_detail_fetches"], invalid_grants=stats["invalid_grants"],
                refresh_tokens_lost=len(lost_tokens), status_420=stats["status_420"], status_429=stats["status_429"])
    assert restarted == 0
    assert done == len(sim.pilots())
    assert stats["invalid_grants"] == 0 and lost_tokens == []
    assert stats["duplicate_detail_fetches"] <= reruns * refetch_bound(settings)


def test_rotated_refresh_token_survives_a_postgresql_restart(own_postgres, fast, queue_name, workers):
    """The server restarts while SSO is answering a refresh: the rotated token must still be stored, by the same
    worker, once the server is back."""
    sim = fast
    sim.add_pilots(n_pilots=1, n_killmails=5, share=1, expired_fraction=1.0, revoked=0, corporations=1)
    url = own_postgres.url
    with db.connect(url) as conn:
        insert_users(conn, sim.pilots())
    sim.configure(latency_ms=2000)  # every answer takes 2 s: time to restart the server under a refresh
    settings = fault_settings(url, sim, queue_name, prefetch_count=1)
    queue_all(settings)
    worker = workers(settings, "--burst")
    wait_until(lambda: sim.stats()["by_route"]["token"] == 1, timeout=30, what="the refresh to be asked",
               interval=0.02)
    assert sim.stats()["refreshes"] == 0  # SSO has not answered: the restart comes first
    own_postgres.restart()
    assert worker.wait(timeout=60) == 0, worker.output()[-4000:]
    stats = sim.stats()
    (pilot,) = sim.pilots()
    with db.connect(url) as conn:
        user = conn.execute("SELECT refresh_token, last_sync_status FROM users").fetchone()
        assert_all_stored(conn, sim)
    faults_line("pg_restart_during_refresh", refreshes=stats["refreshes"], invalid_grants=stats["invalid_grants"],
                job_reruns=worker.count("running it again"), children_restarted=worker.count("exited with"),
                token_kept=user["refresh_token"] == pilot["refresh_token"], status=user["last_sync_status"])
    assert worker.count("running it again") >= 1 and worker.count("exited with") == 0
    assert stats["refreshes"] == 1 and stats["invalid_grants"] == 0
    assert user["refresh_token"] == pilot["refresh_token"] and user["last_sync_status"] == "ok"

"""Warm polls of 2 000 unchanged pilots, zero latency: pilots per second through producer, queue, worker and
database on one host.

The simulator's list cache lives CACHE_SECONDS, so by the time a pass starts every list's Expires (as the
worker stored it) has passed in real time: each job takes the real path, a list call with If-None-Match
answered 304. The pilots are made due by moving their last sync an hour back. Two workers of five children
run throughout; a pass is timed from the producer's launch to the last sync_runs commit.
"""
from __future__ import annotations

import re
import time

import harness
from results import Figure, median

WORLD = dict(n_pilots=2000, n_killmails=2000, share=1, expired_fraction=0.0, revoked=0, corporations=1)
CACHE_SECONDS = 3
SIM = dict(cache_seconds=CACHE_SECONDS, detail_bucket=(10_000_000, 900))
WORKERS, CHILDREN = 2, 5
PASSES = 3
TARGET = 200
SCENARIO = "warm polls, 2000 pilots"


def run() -> tuple[list[Figure], dict]:
    """A cold sync to get there, then PASSES timed warm passes; the median rate."""
    with harness.lab("warm", seed=17, sim_options=SIM, world=WORLD) as lab:
        workers = [lab.start_worker(prefetch=CHILDREN) for _ in range(WORKERS)]
        clock = time.monotonic()
        jobs = queue_and_drain(lab)
        cold = {"jobs": jobs, "seconds": round(time.monotonic() - clock, 1)}
        passes = [warm_pass(lab) for _ in range(PASSES)]
        for worker in workers:
            worker.stop()
    rate = median([p["pilots_per_s"] for p in passes])
    data = {"world": WORLD, "workers": WORKERS, "children": CHILDREN, "cold_setup": cold, "passes": passes,
            "median_pilots_per_s": round(rate, 1)}
    first = passes[0]
    return [Figure(SCENARIO, "pilots/s, producer to last commit (median)",
                   f"{rate:.0f}/s ({first['jobs']} jobs a pass, {PASSES} passes, 2 workers x 5)", f">= {TARGET}/s",
                   rate >= TARGET, data)], {"warm_polls": data}


def warm_pass(lab: harness.Lab) -> dict:
    """Wait until every stored Expires has passed, make everyone due, and time one producer run to the end."""
    harness.wait_until(lambda: lab.count("SELECT count(*) FROM users WHERE list_expires_at > now()") == 0,
                       timeout=CACHE_SECONDS + 30, what="the lists' Expires to pass")
    lab.make_due()
    lab.sim.reset_stats()
    runs_before = lab.count("SELECT count(*) FROM sync_runs")
    started = time.time()
    jobs = queue_and_drain(lab, runs_before=runs_before)
    with lab.connect() as conn:
        last = conn.execute("SELECT max(finished_at) AS t FROM sync_runs").fetchone()["t"].timestamp()
    stats = lab.sim.stats()
    return {"jobs": jobs, "seconds": round(last - started, 2), "pilots_per_s": round(jobs / (last - started), 1),
            "list_calls": stats["by_route"]["list_character"] + stats["by_route"]["list_corporation"],
            "by_status": stats["by_status"], "detail_calls": stats["by_route"]["detail"],
            "token_calls": stats["by_route"]["token"]}


def queue_and_drain(lab: harness.Lab, *, runs_before: int | None = None) -> int:
    """Run the producer and wait until the running workers recorded a run for every job it queued."""
    if runs_before is None:
        runs_before = lab.count("SELECT count(*) FROM sync_runs")
    jobs = queued_jobs(lab.run_producer(prefetch=CHILDREN).stdout)
    harness.wait_until(lambda: lab.count("SELECT count(*) FROM sync_runs") - runs_before >= jobs, timeout=300,
                       what=f"{jobs} sync runs", every=0.05)
    return jobs


def queued_jobs(producer_output: str) -> int:
    """How many jobs (pilots and corporations) the producer says it queued."""
    users = re.search(r"All (\d+) users queued", producer_output)
    corporations = re.search(r"And (\d+) corporations", producer_output)
    if users is None:
        raise harness.BenchError(f"cannot read what the producer queued: {producer_output[-300:]}")
    return int(users[1]) + (int(corporations[1]) if corporations else 0)

"""Warm polls of 2 000 unchanged pilots, zero latency: pilots per second through producer, queue, worker and
database on one host.

The simulator's list cache lives CACHE_SECONDS, so by the time a pass starts every list's Expires (as the
worker stored it) has passed in real time: each job takes the real path, a list call with If-None-Match
answered 304. The pilots are made due by moving their last sync an hour back. Two workers of five children
run throughout; a pass is timed from the producer's launch to the last sync_runs commit.
"""
from __future__ import annotations

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
        jobs = lab.queue_and_drain(prefetch=CHILDREN)
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
    started = time.time()
    jobs = lab.queue_and_drain(prefetch=CHILDREN)
    last = lab.last_commit()
    stats = lab.sim.stats()
    return {"jobs": jobs, "seconds": round(last - started, 2), "pilots_per_s": round(jobs / (last - started), 1),
            "list_calls": stats["by_route"]["list_character"] + stats["by_route"]["list_corporation"],
            "by_status": stats["by_status"], "detail_calls": stats["by_route"]["detail"],
            "token_calls": stats["by_route"]["token"]}

"""A rested detail bucket (ESI's own 3,600 tokens / 15 min), 50 ms latency, 1,500 new killmails over 40 pilots,
two workers of five children: how long from the producer's start until every killmail is stored, and the 429s.

1,500 details cost 3,000 tokens, less than the rested bucket holds: a limiter that spends what the window allows
stores them all at once, limited only by latency and the workers; one that paces at the refill rate (4 tokens a
second) would need over 12 minutes. The workers run as services before the producer starts (cron starts the
producer); the end is the moment the bench sees the last killmail in PostgreSQL (polled every 20 ms, so every
commit before it). A run that has not stored them all by DEADLINE seconds is cut short and reported as such.
"""
from __future__ import annotations

import time

import harness
from results import Figure

WORLD = dict(n_pilots=40, n_killmails=1500, share=3, expired_fraction=0.25, revoked=0, corporations=1)
SIM = dict(latency_ms=50, detail_bucket=(3600, 900))
WORKERS, CHILDREN = 2, 5
TARGET_S = 20.0
DEADLINE = 60.0
SCENARIO = "rested bucket 3600/15m, 1500 kms, 50 ms"


def run() -> tuple[list[Figure], dict]:
    """Workers ready, then one producer run; the time until every killmail is stored."""
    with harness.lab("burst", seed=31, sim_options=SIM, world=WORLD) as lab:
        expected = len(lab.sim.expected_killmails(valid_only=True))
        workers = lab.start_ready_workers(WORKERS, prefetch=CHILDREN)
        started = time.time()
        lab.run_producer(prefetch=CHILDREN)
        done = lab.stored_by(expected, timeout=DEADLINE - (time.time() - started))
        stored = lab.count("SELECT count(*) FROM killmails")
        stats = lab.sim.stats()
        for worker in workers:
            worker.kill()  # nothing is measured after this: a cut-short run's jobs need not finish
    seconds = (done or time.time()) - started
    data = {"world": WORLD, "sim": SIM, "workers": WORKERS, "children": CHILDREN, "expected": expected,
            "stored": stored, "seconds": round(seconds, 2), "all_stored": done is not None,
            "detail_tokens_spent": stats["tokens_spent"]["killmail"], "status_429": stats["status_429"],
            "status_420": stats["status_420"], "max_in_flight": stats["max_in_flight"],
            "duplicate_detail_fetches": stats["duplicate_detail_fetches"], "by_status": stats["by_status"]}
    if done is None:
        value = f"{stored}/{expected} stored when cut short at {DEADLINE:.0f} s"
    else:
        value = f"{seconds:.1f} s ({expected} kms, {WORKERS} workers x {CHILDREN})"
    return [
        Figure(SCENARIO, "producer start to every killmail stored", value, f"<= {TARGET_S:.0f} s",
               done is not None and seconds <= TARGET_S, data),
        Figure(SCENARIO, "429 answers", str(stats["status_429"]), "0", stats["status_429"] == 0),
    ], {"rested_burst": data}

"""Freshness: how long a new kill takes from happening to its row in PostgreSQL, with time scaled down tenfold.

The list cache lives 30 s (ESI's 300 s / 10) and each character's list bucket is 30 tokens / 90 s (15 min / 10);
the producer runs every 6 s, as cron would, with SYNC_INTERVAL_SECONDS=30 (the least the settings allow); two
workers of five children. After a cold sync of the world (not measured), 2 new kills go to a pilot every 2 s for
150 s. A kill's freshness is its killmails.stored_at (PostgreSQL's clock, the transaction that stored it) minus
when the simulator created it; the simulator's clock is the real clock here (nothing advances it). Its two parts
come from the simulator too: creation to the first list page that showed the kill (ESI's cache, the polling),
then that to the row (the worker). A kill not stored within TAIL seconds of the last one's creation is lost.
"""
from __future__ import annotations

import math
import random
import threading
import time

import harness
from results import Figure

# A small world to start from: the cold sync is not measured, and its details wait on the bucket like the rest.
WORLD = dict(n_pilots=30, n_killmails=60, share=1, expired_fraction=0.0, revoked=0, corporations=1)
CACHE_SECONDS = 30
SIM = dict(cache_seconds=CACHE_SECONDS, list_bucket=(30, 90))
WORKERS, CHILDREN = 2, 5
PRODUCER_EVERY, SYNC_INTERVAL = 6, 30
NEW_EVERY, NEW_EACH, FOR_SECONDS = 2, 2, 150
TAIL = 90
TARGET_P95 = CACHE_SECONDS + PRODUCER_EVERY
SCENARIO = "freshness, cache 30 s, cron 6 s"


def run() -> tuple[list[Figure], dict]:
    """Cold sync, then new kills while cron runs; the 95th percentile of creation to stored."""
    env = dict(prefetch=CHILDREN, sync_interval=SYNC_INTERVAL)
    with harness.lab("fresh", seed=41, sim_options=SIM, world=WORLD) as lab:
        pilots = [p["character_id"] for p in lab.sim.pilots()]
        workers = lab.start_ready_workers(WORKERS, **env)
        stop, failures = threading.Event(), []
        cron = threading.Thread(target=run_cron, args=(lab, env, stop, failures), name="cron", daemon=True)
        cron.start()
        try:
            cold = len(lab.sim.expected_killmails(valid_only=True, corporations=True))
            if lab.stored_by(cold, timeout=120) is None:
                raise harness.BenchError(f"the cold sync did not store {cold} killmails in 120 s")
            new = add_kills(lab, pilots)
            lab.stored_by(cold + len(new), timeout=TAIL)
            stored = stored_times(lab, new)
        finally:
            stop.set()
            cron.join()
        seen = lab.sim.visibility()
        stats = lab.sim.stats()
        for worker in workers:
            worker.kill()  # nothing is measured after this
    if failures:
        raise failures[0]
    return figures(new, stored, seen, stats)


def run_cron(lab: harness.Lab, env: dict, stop: threading.Event, failures: list) -> None:
    """The producer every PRODUCER_EVERY seconds until stopped (a run that fails ends it, for run() to raise)."""
    next_run = time.monotonic()
    while not stop.wait(max(0.0, next_run - time.monotonic())):
        next_run += PRODUCER_EVERY
        try:
            lab.run_producer(**env)
        except harness.BenchError as exc:
            failures.append(exc)
            return


def add_kills(lab: harness.Lab, pilots: list[int]) -> list[int]:
    """NEW_EACH new kills to a random pilot every NEW_EVERY seconds for FOR_SECONDS; their ids."""
    rng, new = random.Random(41), []
    started = time.monotonic()
    for n in range(FOR_SECONDS // NEW_EVERY):
        time.sleep(max(0.0, started + n * NEW_EVERY - time.monotonic()))
        new += lab.sim.add_killmails(rng.choice(pilots), NEW_EACH)
    return new


def stored_times(lab: harness.Lab, ids: list[int]) -> dict[int, float]:
    """When each of these killmails was stored (killmails.stored_at, Unix time), for those that were."""
    with lab.connect() as conn:
        rows = conn.execute("SELECT killmail_id, stored_at FROM killmails WHERE killmail_id = ANY(%s)", (ids,))
        return {r["killmail_id"]: r["stored_at"].timestamp() for r in rows}


def figures(new: list[int], stored: dict[int, float], seen: dict[int, dict], stats: dict) -> tuple[list, dict]:
    fresh = sorted(stored[i] - seen[i]["created"] for i in stored)
    listed = sorted(seen[i]["visible"] - seen[i]["created"] for i in stored if seen[i]["visible"] is not None)
    fetched = sorted(stored[i] - seen[i]["visible"] for i in stored if seen[i]["visible"] is not None)
    lost = len(new) - len(stored)
    p95 = percentile(fresh, 0.95)
    data = {"world": WORLD, "sim": SIM, "workers": WORKERS, "children": CHILDREN,
            "producer_every_s": PRODUCER_EVERY, "sync_interval_s": SYNC_INTERVAL, "new_kills": len(new),
            "stored": len(stored), "lost": lost, "p50_s": percentile(fresh, 0.5), "p95_s": p95,
            "max_s": round(fresh[-1], 2) if fresh else None, "created_to_listed_p95_s": percentile(listed, 0.95),
            "listed_to_stored_p95_s": percentile(fetched, 0.95), "status_429": stats["status_429"],
            "status_420": stats["status_420"], "early_list_fetches": stats["early_list_fetches"],
            "duplicate_detail_fetches": stats["duplicate_detail_fetches"]}
    return [
        Figure(SCENARIO, "kill created to stored, p95",
               "none stored" if p95 is None else f"{p95:.1f} s (p50 {data['p50_s']:.1f} s, {len(new)} kills; "
               f"listed p95 {data['created_to_listed_p95_s']} s, then stored p95 {data['listed_to_stored_p95_s']} s)",
               f"<= {TARGET_P95} s", p95 is not None and p95 <= TARGET_P95, data),
        Figure(SCENARIO, "kills lost", f"{lost} of {len(new)}", "0", lost == 0),
    ], {"freshness": data}


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile of sorted values (nearest rank), rounded to 10 ms; None when there are none."""
    if not values:
        return None
    return round(values[max(0, math.ceil(q * len(values)) - 1)], 2)

"""Cold sync with 50 ms latency per ESI call and no rate-limit bucket: one worker (PREFETCH_COUNT=5) against
bench/seed_algorithm.py, start to finish, each on a fresh copy of the same world, runs alternating."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import harness
from results import Figure, median

WORLD = dict(n_pilots=30, n_killmails=1200, share=3, expired_fraction=0.0, revoked=0, corporations=3)
SIM = dict(latency_ms=50, rate_limits=False)
RUNS = 5  # the worker's time varies by a tenth of a second from run to run on a 2-core machine
PREFETCH = 5  # the seed's five users at a time
TARGET = 10.0
FEW = 4  # detail threads per child before they were 32
SCENARIO = "cold sync, 50 ms latency, no bucket"


def run() -> tuple[list[Figure], dict]:
    """Median start-to-finish time of the worker and of the seed algorithm, and their ratio."""
    worker_runs, seed_runs, few_runs = [], [], []
    for _ in range(RUNS):
        worker_runs.append(run_worker())
        seed_runs.append(run_seed())
    few_runs.append(run_worker(detail_concurrency=FEW))
    worker = median([r["seconds"] for r in worker_runs])
    seed = median([r["seconds"] for r in seed_runs])
    few = median([r["seconds"] for r in few_runs])
    ratio = seed / worker
    data = {"world": WORLD, "sim": SIM, "runs": RUNS, "worker": worker_runs, "seed": seed_runs,
            f"worker_detail_concurrency_{FEW}": few_runs, "median_worker_s": worker, "median_seed_s": seed,
            "ratio": round(ratio, 2)}
    kms = worker_runs[0]["stored"]
    return [
        Figure(SCENARIO, "seed time / worker time (median)",
               f"{ratio:.1f}x ({seed:.1f} s vs {worker:.2f} s, {kms} kms, {RUNS} runs each)", f">= {TARGET:.0f}x",
               ratio >= TARGET, data),
        Figure(SCENARIO, f"same with DETAIL_CONCURRENCY={FEW} (1 run)",
               f"{seed / few:.1f}x ({few:.2f} s)", "(the former default, for comparison)"),
    ], {"latency": data}


def run_worker(**env_options) -> dict:
    """Producer run to last commit (the latest sync_runs.finished_at), with the worker already running, as it
    runs in production (cron starts the producer; the workers are services). One producer run queues the pilots,
    the seed's whole job (their corporations, found by these syncs, would be the next cron run's)."""
    with harness.lab("latency", seed=5, sim_options=SIM, world=WORLD) as lab:
        worker = lab.start_ready_worker(prefetch=PREFETCH, **env_options)
        started = time.time()
        jobs = lab.queue_and_drain(prefetch=PREFETCH, **env_options)
        last = lab.last_commit()
        worker.stop()
        stored = lab.count("SELECT count(*) FROM killmails")
        expected = len(lab.sim.expected_killmails(valid_only=True))
        stats = lab.sim.stats()
    if stored != expected:
        raise harness.BenchError(f"the worker stored {stored} of {expected} killmails")
    return {"seconds": round(last - started, 2), "jobs": jobs, "stored": stored, "expected": expected,
            "requests": stats["requests"], "max_in_flight": stats["max_in_flight"]}


def run_seed() -> dict:
    """The seed algorithm as a process of its own, launch to its last commit."""
    with harness.lab("latency_seed", seed=5, sim_options=SIM, world=WORLD) as lab:
        started = time.time()
        done = subprocess.run([sys.executable, str(harness.ROOT / "bench" / "seed_algorithm.py")],
                              env=lab.env(), cwd=harness.ROOT, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise harness.BenchError(f"seed_algorithm.py exited with {done.returncode}: {done.stderr[-500:]}")
        tally = json.loads(done.stdout.strip().splitlines()[-1])
        stored = lab.count("SELECT count(*) FROM killmails")
        expected = len(lab.sim.expected_killmails(valid_only=True))
        stats = lab.sim.stats()
    return {"seconds": round(tally["finished"] - started, 2), "stored": stored, "expected": expected,
            "requests": stats["requests"], "duplicate_detail_fetches": stats["duplicate_detail_fetches"],
            "max_in_flight": stats["max_in_flight"], "tally": tally}

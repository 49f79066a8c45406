"""Cold sync with 50 ms latency per ESI call and no rate-limit bucket: one worker (PREFETCH_COUNT=5) against
bench/seed_algorithm.py, start to finish, each on a fresh copy of the same world, the seed's runs spread among
the worker's.

The world has the cold-sync scenario's density (bench/cold_sync.py: 200 pilots, 20 000 killmails, each in three
pilots' lists on average, so 100 killmails and 300 listed references a pilot), with 30 pilots: the whole cold
sync would take the seed over four minutes a run. The former, sparser world (40 killmails a pilot) is measured
once each for comparison: there the producer's start and the six jobs each child runs in turn, each waiting for
a list call and then a round of details, weigh two and a half times as much against the killmails fetched."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import harness
from results import Figure, median

WORLD = dict(n_pilots=30, n_killmails=3000, share=3, expired_fraction=0.0, revoked=0, corporations=3)
SPARSE_WORLD = dict(WORLD, n_killmails=1200)
SIM = dict(latency_ms=50, rate_limits=False)
RUNS = 5  # the worker's time follows the speed of a 2-core machine from run to run
SEED_RUNS = 3  # the seed waits on latency: its runs differ by a few percent
PREFETCH = 5  # the seed's five users at a time
TARGET = 10.0
FEW = 4  # detail threads per child before they were 32
SCENARIO = "cold sync, 50 ms latency, no bucket"


def run() -> tuple[list[Figure], dict]:
    """Median start-to-finish time of the worker and of the seed algorithm, and their ratio."""
    worker_runs, seed_runs = [], []
    for n in range(RUNS):  # the seed's runs spread among the worker's, so both meet the machine's changes
        worker_runs.append(run_worker(WORLD))
        if n % 2 == 0 and len(seed_runs) < SEED_RUNS:
            seed_runs.append(run_seed(WORLD))
    few_runs = [run_worker(WORLD, detail_concurrency=FEW)]
    sparse_worker, sparse_seed = run_worker(SPARSE_WORLD), run_seed(SPARSE_WORLD)
    worker = median([r["seconds"] for r in worker_runs])
    seed = median([r["seconds"] for r in seed_runs])
    few = median([r["seconds"] for r in few_runs])
    ratio = seed / worker
    sparse_ratio = sparse_seed["seconds"] / sparse_worker["seconds"]
    data = {"world": WORLD, "sim": SIM, "worker_runs": len(worker_runs), "seed_runs": len(seed_runs),
            "worker": worker_runs, "seed": seed_runs, f"worker_detail_concurrency_{FEW}": few_runs,
            "median_worker_s": worker, "median_seed_s": seed, "ratio": round(ratio, 2),
            "sparse": {"world": SPARSE_WORLD, "worker": sparse_worker, "seed": sparse_seed,
                       "ratio": round(sparse_ratio, 2)}}
    kms = worker_runs[0]["stored"]
    return [
        Figure(SCENARIO, "seed time / worker time (median)",
               f"{ratio:.1f}x (seed {seed:.1f} s, {len(seed_runs)} runs; worker {worker:.2f} s, "
               f"{len(worker_runs)} runs; {kms} kms)",
               f">= {TARGET:.0f}x", ratio >= TARGET, data),
        Figure(SCENARIO, f"same with DETAIL_CONCURRENCY={FEW} (1 run)",
               f"{seed / few:.1f}x ({few:.2f} s)", "(the former default, for comparison)"),
        Figure(SCENARIO, "same, 40 kms a pilot (1 run each)",
               f"{sparse_ratio:.1f}x ({sparse_seed['seconds']:.1f} s vs {sparse_worker['seconds']:.2f} s, "
               f"{sparse_worker['stored']} kms)", "(the former world, for comparison)"),
    ], {"latency": data}


def run_worker(world: dict, **env_options) -> dict:
    """Producer run to last commit (the latest sync_runs.finished_at), with the worker already running, as it
    runs in production (cron starts the producer; the workers are services). One producer run queues the pilots,
    the seed's whole job (their corporations, found by these syncs, would be the next cron run's)."""
    with harness.lab("latency", seed=5, sim_options=SIM, world=world) as lab:
        worker = lab.start_ready_worker(prefetch=PREFETCH, **env_options)
        started = time.time()
        jobs = lab.queue_and_drain(prefetch=PREFETCH, **env_options)
        last = lab.last_commit()
        worker.stop()
        stored, stats = stored_every_killmail(lab, "worker")
    return {"seconds": round(last - started, 2), "jobs": jobs, "stored": stored,
            "requests": stats["requests"], "max_in_flight": stats["max_in_flight"]}


def run_seed(world: dict) -> dict:
    """The seed algorithm as a process of its own, launch to its last commit."""
    with harness.lab("latency_seed", seed=5, sim_options=SIM, world=world) as lab:
        started = time.time()
        done = subprocess.run([sys.executable, str(harness.ROOT / "bench" / "seed_algorithm.py")],
                              env=lab.env(), cwd=harness.ROOT, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise harness.BenchError(f"seed_algorithm.py exited with {done.returncode}: {done.stderr[-500:]}")
        tally = json.loads(done.stdout.strip().splitlines()[-1])
        stored, stats = stored_every_killmail(lab, "seed")
    return {"seconds": round(tally["finished"] - started, 2), "stored": stored,
            "requests": stats["requests"], "duplicate_detail_fetches": stats["duplicate_detail_fetches"],
            "max_in_flight": stats["max_in_flight"], "tally": tally}


def stored_every_killmail(lab: harness.Lab, who: str) -> tuple[int, dict]:
    """How many killmails `who` stored and the simulator's counters; BenchError unless it stored every killmail
    the world holds (a time for less work would flatter it)."""
    stored = lab.count("SELECT count(*) FROM killmails")
    expected = len(lab.sim.expected_killmails(valid_only=True))
    if stored != expected:
        raise harness.BenchError(f"the {who} stored {stored} of {expected} killmails")
    return stored, lab.sim.stats()

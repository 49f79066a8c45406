"""Cold sync with 50 ms latency per ESI call: the worker against bench/seed_algorithm.py, in two worlds.

One worker (PREFETCH_COUNT=5) and the seed, start to finish, each on a fresh copy of the same world with the same
simulator, the seed's runs spread among the worker's, in a dense world and a sparse one. The target (10x) is for
each world.

ESI's headers: the simulator sends ESI's rate-limit headers (X-Ratelimit-Group, -Limit, -Remaining, -Used) on every
route with a bucket (the killmail lists and details), as ESI does, so the worker books its calls in its limits
ledger as in production. No bucket binds: each pilot's list is called once in its bucket of ESI's 30 tokens / 15 min,
and the detail bucket is ten times ESI's 3 600 / 15 min: the dense world's 3 000 details cost 6 000 tokens, more
than ESI's bucket holds, and a first sync may spend only 60 % of a bucket (limits.BACKLOG_SHARE). ESI's own bucket
would make this a measure of the bucket, which the burst and window scenarios are. With `--no-headers` the
simulator meters no route and sends no such header (the scenario as it was before issue 23), for comparison.

The worlds have 30 pilots, each killmail in three pilots' lists on average:
- dense: the cold-sync scenario's density (bench/cold_sync.py: 200 pilots, 20 000 killmails): 100 killmails and 300
  listed references a pilot, 3 000 killmails (the whole cold sync would take the seed over four minutes a run);
- sparse: 30 killmails and 90 references a pilot, 900 killmails. The fixed part of a run weighs more here against
  the killmails fetched: the producer's start, and the six jobs each child runs in turn, each waiting for a list
  call and then a round of details.

Worker CPU: user + system of the worker parent and its children (/proc/<pid>/stat) from the producer's launch to the
last commit, over the killmails stored.

    .venv/bin/python bench/run.py --only latency
    .venv/bin/python bench/latency.py [--no-headers] [--world dense|sparse] [--profile FILE [--gil]]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import harness
from results import Figure, median, report

WORLDS = {
    "dense": dict(n_pilots=30, n_killmails=3000, share=3, expired_fraction=0.0, revoked=0, corporations=3),
    "sparse": dict(n_pilots=30, n_killmails=900, share=3, expired_fraction=0.0, revoked=0, corporations=3),
}
# ESI's list bucket; the detail bucket ten times ESI's, so that neither the simulator nor the worker's backlog share
# binds (see above).
HEADERS = dict(latency_ms=50, rate_limits=True, list_bucket=(30, 900), detail_bucket=(36_000, 900))
NO_HEADERS = dict(latency_ms=50, rate_limits=False)
RUNS = 5  # the worker's time follows the speed of a 2-core machine from run to run
SEED_RUNS = 3  # the seed waits on latency: its runs differ by a few percent
PREFETCH = 5  # the seed's five users at a time
TARGET = 10.0
FEW = 4  # detail threads per child before they were 32


def scenario(headers: bool) -> str:
    return "cold sync, 50 ms latency, " + ("ESI's headers, no bucket binds" if headers else "no headers, no bucket")


def run(*, headers: bool = True, worlds: tuple[str, ...] = tuple(WORLDS), profile: Path | None = None,
        gil: bool = False) -> tuple[list[Figure], dict]:
    """Per world, the median start-to-finish time of the worker and of the seed algorithm, and their ratio. With
    `profile`, py-spy samples each of the worker's runs into a file of its own: that name with the world's and the
    run's number added (with `gil`, only where a thread holds the GIL: the Python code's CPU, not its waits)."""
    sim = HEADERS if headers else NO_HEADERS
    figures, data = [], {"headers": headers, "sim": sim}
    for name in worlds:
        found, data[name] = run_world(name, sim, scenario(headers), profile, gil)
        figures += found
    return figures, {"latency": data}


def run_world(name: str, sim: dict, title: str, profile: Path | None, gil: bool) -> tuple[list[Figure], dict]:
    world = WORLDS[name]
    worker_runs, seed_runs = [], []
    for n in range(RUNS):  # the seed's runs spread among the worker's, so both meet the machine's changes
        spy = None if profile is None else profile.with_stem(f"{profile.stem}-{name}-{n + 1}")
        worker_runs.append(run_worker(world, sim, profile=spy, gil=gil))
        progress(name, "worker", worker_runs[-1])
        if n % 2 == 0 and len(seed_runs) < SEED_RUNS:
            seed_runs.append(run_seed(world, sim))
            progress(name, "seed", seed_runs[-1])
    worker = median([r["seconds"] for r in worker_runs])
    seed = median([r["seconds"] for r in seed_runs])
    cpu = median([r["cpu_ms_per_killmail"] for r in worker_runs])
    ratio = seed / worker
    kms = worker_runs[0]["stored"]
    data = {"world": world, "worker": worker_runs, "seed": seed_runs, "median_worker_s": worker,
            "median_seed_s": seed, "median_cpu_ms_per_killmail": cpu, "ratio": round(ratio, 2)}
    figures = [Figure(
        title, f"{name} world ({kms // world['n_pilots']} kms a pilot): seed time / worker time (median)",
        f"{ratio:.1f}x (seed {seed:.1f} s, {len(seed_runs)} runs; worker {worker:.2f} s, {len(worker_runs)} runs, "
        f"{cpu:.2f} ms CPU a killmail; {kms} kms)", f">= {TARGET:.0f}x", ratio >= TARGET, data)]
    if name == "dense":  # the former default's figure, on the world it was first measured on
        few = run_worker(world, sim, detail_concurrency=FEW)
        progress(name, f"worker with DETAIL_CONCURRENCY={FEW}", few)
        data[f"worker_detail_concurrency_{FEW}"] = few
        figures.append(Figure(title, f"dense world with DETAIL_CONCURRENCY={FEW} (1 run)",
                              f"{seed / few['seconds']:.1f}x ({few['seconds']:.2f} s)",
                              "(the former default, for comparison)"))
    return figures, data


def progress(world: str, who: str, measured: dict) -> None:
    """Each run's time as it ends: the runs before one that could not be measured are not lost."""
    cpu = f", {measured['cpu_ms_per_killmail']:.2f} ms CPU a killmail" if "cpu_ms_per_killmail" in measured else ""
    print(f"  {world} world, {who}: {measured['seconds']:.2f} s{cpu}", flush=True)


def run_worker(world: dict, sim: dict, *, profile: Path | None = None, gil: bool = False, **env_options) -> dict:
    """Producer run to last commit (the latest sync_runs.finished_at), with the worker already running, as it
    runs in production (cron starts the producer; the workers are services). One producer run queues the pilots,
    the seed's whole job (their corporations, found by these syncs, would be the next cron run's)."""
    with harness.lab("latency", seed=5, sim_options=sim, world=world) as lab:
        worker = lab.start_ready_worker(prefetch=PREFETCH, **env_options)
        pids = harness.worker_pids([worker.pid])
        with harness.profiled(worker.pid, profile, gil=gil):
            before = sum(harness.cpu_ticks(pid) or 0 for pid in pids)
            started = time.time()
            jobs = lab.queue_and_drain(prefetch=PREFETCH, **env_options)
            last = lab.last_commit()
            ticks = sum(harness.cpu_ticks(pid) or 0 for pid in pids) - before
        worker.stop()
        stored, stats = stored_every_killmail(lab, "worker")
    return {"seconds": round(last - started, 2), "jobs": jobs, "stored": stored,
            "cpu_ms_per_killmail": round(ticks * 1000 / harness.TICKS / stored, 3),
            "requests": stats["requests"], "max_in_flight": stats["max_in_flight"],
            "status_429": stats["status_429"], "tokens_spent": stats["tokens_spent"]}


def run_seed(world: dict, sim: dict) -> dict:
    """The seed algorithm as a process of its own, launch to its last commit."""
    with harness.lab("latency_seed", seed=5, sim_options=sim, world=world) as lab:
        started = time.time()
        done = subprocess.run([sys.executable, str(harness.ROOT / "bench" / "seed_algorithm.py")],
                              env=lab.env(), cwd=harness.ROOT, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise harness.BenchError(f"seed_algorithm.py exited with {done.returncode}: {done.stderr[-500:]}")
        tally = json.loads(done.stdout.strip().splitlines()[-1])
        stored, stats = stored_every_killmail(lab, "seed")
    return {"seconds": round(tally["finished"] - started, 2), "stored": stored,
            "requests": stats["requests"], "duplicate_detail_fetches": stats["duplicate_detail_fetches"],
            "max_in_flight": stats["max_in_flight"], "status_429": stats["status_429"], "tally": tally}


def stored_every_killmail(lab: harness.Lab, who: str) -> tuple[int, dict]:
    """How many killmails `who` stored and the simulator's counters; BenchError unless it stored every killmail
    the world holds (a time for less work would flatter it) with no 429 (a bucket that bound)."""
    stored = lab.count("SELECT count(*) FROM killmails")
    expected = len(lab.sim.expected_killmails(valid_only=True))
    if stored != expected:
        raise harness.BenchError(f"the {who} stored {stored} of {expected} killmails")
    stats = lab.sim.stats()
    if stats["status_429"]:
        raise harness.BenchError(f"the {who} got {stats['status_429']} answers 429: a bucket bound")
    return stored, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-headers", action="store_true",
                        help="no rate-limit bucket or header on any route (the scenario before issue 23)")
    parser.add_argument("--world", choices=list(WORLDS), action="append",
                        help="run this world only (repeatable; default: every world)")
    parser.add_argument("--profile", type=Path, help="py-spy each of the worker's runs into a file of this name "
                        "with the world and the run added (speedscope format; the worker's times then include "
                        "py-spy's cost)")
    parser.add_argument("--gil", action="store_true", help="with --profile: only samples where a thread holds the GIL")
    args = parser.parse_args(argv)
    figures, data = run(headers=not args.no_headers, worlds=tuple(args.world or WORLDS), profile=args.profile,
                        gil=args.gil)
    return report(figures, data)


if __name__ == "__main__":
    sys.exit(main())

"""`make bench`: every benchmark scenario of issues #5, #13 and #23 in one go, on the local ESI simulator, the local
PostgreSQL and RabbitMQ. Prints one table (each figure beside its target) and writes bench/results.json.

    .venv/bin/python bench/run.py [--only cold,backlog,...]

Each scenario makes its own database and queue names and removes them afterwards. Exits 0 when every target is
met, 1 when one is missed, 2 when a scenario could not be measured.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import harness  # first: puts the project root and devtools/ on sys.path

# isort: split
import backlog
import cold_sync
import error_storm
import freshness
import ingest
import latency
import memory
import producer
import rested_burst
import scale
import status_page
import warm_job
import warm_polls
import window_backlog
from results import Figure, format_table, write_json

RESULTS_PATH = Path(__file__).resolve().parent / "results.json"

SCENARIOS = {
    "cold": cold_sync.run,
    "latency": latency.run,
    "ingest": ingest.run,
    "warm_polls": warm_polls.run,
    "backlog": backlog.run,
    "burst": rested_burst.run,
    "window": window_backlog.run_one_worker,
    "window_background": window_backlog.run_background,
    "window_two_workers": window_backlog.run_two_workers,
    "freshness": freshness.run,
    "error_storm": error_storm.run,
    "memory": memory.run,
    "producer": producer.run,
    "status": status_page.run,
    "scale": scale.run,
    "warm_job": warm_job.run,
}
# The memory soak lasts 10 minutes and measures RSS, not speed: once its cold part is over (that part runs alone),
# it goes on in the background while the other scenarios run one at a time, which keeps the whole run
# shorter by those 10 minutes. Its rounds wait while a scenario that measures speed on the CPU runs.
BACKGROUND = "memory"
TIMED = {"latency", "ingest", "warm_polls", "burst", "freshness", "producer", "status", "scale", "warm_job"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated scenarios to run: " + ", ".join(SCENARIOS))
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    args.names = names
    return args


def run_scenario(name: str, **options) -> tuple[list[Figure], dict, bool]:
    """One scenario's figures and data; a scenario that cannot be measured gives one failed figure."""
    try:
        found, data = SCENARIOS[name](**options)
        return found, data, False
    except Exception as exc:  # one scenario that cannot be measured must not lose the others' figures
        traceback.print_exc()
        return [Figure(name, "could not be measured", repr(exc)[:120], met=False)], {}, True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = harness.check_services()
    if problem:
        print(f"❌ {problem}", file=sys.stderr)
        return 2
    started, clock = datetime.now(UTC), time.monotonic()
    figures: list[Figure] = []
    details: dict = {}
    timings: dict[str, float] = {}
    broken = False
    load_before = os.getloadavg()
    outcomes = []
    gate = memory.Gate()
    with ThreadPoolExecutor(max_workers=1) as background:
        soak = None
        if BACKGROUND in args.names:
            print(f"▶ {BACKGROUND}: cold part alone, then its soak in the background ...", flush=True)
            soaking, soak_clock = threading.Event(), time.monotonic()
            soak = background.submit(run_scenario, BACKGROUND, soaking=soaking, gate=gate)
            soaking.wait()
            print(f"  soaking after {time.monotonic() - soak_clock:.0f} s", flush=True)
        for name in (n for n in args.names if n != BACKGROUND):
            print(f"▶ {name} ...", flush=True)
            if name in TIMED:
                gate.close()
            scenario_clock = time.monotonic()
            try:
                outcomes.append(run_scenario(name))
            finally:
                gate.open()
            timings[name] = round(time.monotonic() - scenario_clock, 1)
            print(f"  done in {timings[name]:.0f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
        if soak is not None:
            print(f"▶ waiting for the {BACKGROUND} soak to end ...", flush=True)
            outcomes.append(soak.result())
            timings[BACKGROUND] = round(time.monotonic() - soak_clock, 1)
    for found, data, failed in outcomes:
        figures += found
        details.update(data)
        broken = broken or failed
    wall = time.monotonic() - clock
    print()
    print(format_table(figures))
    print(f"\nwall time: {wall:.0f} s on {os.cpu_count()} cores; results in {RESULTS_PATH}")
    write_json(RESULTS_PATH, figures, details, {
        "started_at": started.isoformat(), "wall_seconds": round(wall, 1), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "scenarios_run": args.names, "seconds_by_scenario": timings,
        "in_background": BACKGROUND, "load_average_before": load_before, "load_average_after": os.getloadavg()})
    if broken:
        return 2
    return 0 if all(f.met is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())

"""A warm poll's CPU in one worker child alone: the code's own cost, apart from the host's contention.

The scale scenario measures a warm poll on a host whose two cores also run PostgreSQL, RabbitMQ, the simulator and
four other children: its figure moves by a quarter between runs with the machine's load. This one forks a single
process that builds a worker child (killmail_worker.Child: its ESI client, its shared limits, its database
connection, logging at INFO as a worker logs) and runs each pilot's job through Child.process, the job thread's
whole path: decode, lock, the pilot's row, the token (refreshed on one poll in four), the list call answered 304,
the outcome, the unlock. Not measured: pika's delivery and ack (the child's I/O thread), which the scale scenario
has. The simulator is the scale scenario's (ESI's rate-limit headers, 20-minute tokens) and runs in the bench's
own process, so its CPU is not the child's.

ROUNDS rounds over PILOTS pilots, each made due again with a quarter of their tokens expired; CPU by
time.process_time in the child (every thread of it). The figure is the median round's.

    .venv/bin/python bench/run.py --only warm_job
    .venv/bin/python bench/warm_job.py [--pilots 2000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import harness  # first: puts the project root on sys.path

# isort: split
import broker
import db
import killmail_worker
import names
import settings as settings_module
from results import Figure, median, report
from scale import EXPIRED_SHARE, SIM, make_due

PILOTS = 2_000
ROUNDS = 5
SCENARIO = "warm job: one worker child alone"


def run(*, pilots: int = PILOTS, rounds: int = ROUNDS) -> tuple[list[Figure], dict]:
    """Sync every pilot once (cold), then time `rounds` warm rounds in a forked child; the figures."""
    with harness.lab("warm_job", seed=23, sim_options=SIM) as lab:
        lab.sim.add_pilots(n_pilots=pilots, n_killmails=0, expired_fraction=EXPIRED_SHARE, revoked=0,
                           corporations=1)
        lab.insert_users(lab.sim.pilots())
        bodies = [broker.encode_job(broker.Job(p["character_id"], p["character_name"], "bench"))
                  for p in lab.sim.pilots()]
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: nothing of the bench's threads runs here
            try:
                os.close(read_end)
                ms = child_rounds(lab, bodies, rounds)
                os.write(write_end, json.dumps(ms).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as answer:
            text = answer.read()
        os.waitpid(pid, 0)
        if not text:
            raise harness.BenchError("the child measured nothing (see its output above)")
        per_round = json.loads(text)
        statuses = lab.sim.stats()["by_status"]
    middle = median(per_round)
    data = {"pilots": pilots, "rounds": rounds, "cpu_ms_per_poll": per_round, "median": middle,
            "statuses": statuses}
    return [Figure(SCENARIO, f"child CPU a warm poll (no broker), median of {rounds} rounds of {pilots}",
                   f"{middle:.2f} ms (rounds: {', '.join(f'{m:.2f}' for m in per_round)})", data=data)
            ], {"warm_job": data}


def child_rounds(lab: harness.Lab, bodies: list[bytes], rounds: int) -> list[float]:
    """In the forked child: a worker child's jobs for every pilot, once cold, then `rounds` timed warm rounds."""
    os.environ.update(lab.env(prefetch=1))
    logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"),  # noqa: SIM115  # the process's life
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    settings = settings_module.load_settings()
    child = killmail_worker.Child(settings, burst=True)
    child.ensure_db()
    child.limits.open()
    child.namer = names.Namer(lambda: db.connect(settings.database_url), child.esi)
    for body in bodies:
        child.process(body, 1)
    per_round = []
    for _ in range(rounds):
        make_due(lab, len(bodies))
        started = time.process_time()
        for body in bodies:
            child.process(body, 1)
        per_round.append(round((time.process_time() - started) * 1000 / len(bodies), 3))
    child.namer.close(timeout=5.0)
    return per_round


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pilots", type=int, default=PILOTS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args(argv)
    figures, data = run(pilots=args.pilots, rounds=args.rounds)
    return report(figures, data)


if __name__ == "__main__":
    sys.exit(main())

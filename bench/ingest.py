"""Ingest of prefetched killmail bodies into PostgreSQL: the worker's batch path (db.save_killmails: one
multi-row INSERT plus COPY of attackers and items, SAVE_BATCH killmails per transaction) against the row-by-row
path (row_by_row.py, one transaction per killmail, as the seed saved). Both start from the JSON
text ESI sent and include decoding and validation (parse_killmail). Each path runs in two processes with a
connection each (the machine's two cores, as two worker children would), and once in one process."""
from __future__ import annotations

import json
import multiprocessing
import time

import db
import harness
import sync
from esi_simulator import Simulator
from killmail_model import parse_killmail
from results import Figure, median
from row_by_row import save_killmail_row_by_row

BATCH_KILLMAILS = 4000
ROW_BY_ROW_KILLMAILS = 1000
RUNS = 5
TARGET_RATE, TARGET_RATIO = 2000, 8.0
SCENARIO = "ingest of prefetched bodies"


def bodies(n: int) -> list[tuple[int, str, bytes]]:
    """n killmail bodies as ESI sends them: (id, hash, JSON text), from the simulator's generator."""
    sim = Simulator(seed=3, client_id=harness.CLIENT_ID, client_secret=harness.CLIENT_SECRET)
    sim.add_pilots(n_pilots=100, n_killmails=n, share=3, expired_fraction=0.0, revoked=0, corporations=5)
    return [(i, sim.killmail_hash(i), json.dumps(body).encode())
            for i, body in sim.expected_killmails(valid_only=False).items()]


def run() -> tuple[list[Figure], dict]:
    """Median killmails per second of each path over RUNS runs (two processes), alternating, on emptied tables;
    then one run of each in a single process."""
    prefetched = bodies(BATCH_KILLMAILS)
    row_set = prefetched[:ROW_BY_ROW_KILLMAILS]
    batch_runs, row_runs = [], []
    with harness.lab("ingest", simulator=False) as lab:
        for _ in range(RUNS):
            batch_runs.append(timed(lab, prefetched, save_batched, processes=2))
            row_runs.append(timed(lab, row_set, save_row_by_row, processes=2))
        single = {"batch_per_s": timed(lab, prefetched, save_batched, processes=1),
                  "row_by_row_per_s": timed(lab, row_set, save_row_by_row, processes=1)}
        with lab.connect() as conn:
            rows = conn.execute("SELECT (SELECT count(*) FROM attackers) AS attackers, "
                                "(SELECT count(*) FROM killmail_items) AS items").fetchone()
    batch, row_by_row = median(batch_runs), median(row_runs)
    ratio = batch / row_by_row
    data = {"killmails": BATCH_KILLMAILS, "row_by_row_killmails": ROW_BY_ROW_KILLMAILS, "processes": 2,
            "save_batch": sync.SAVE_BATCH, "batch_per_s": batch_runs, "row_by_row_per_s": row_runs,
            "median_batch_per_s": round(batch), "median_row_by_row_per_s": round(row_by_row),
            "ratio": round(ratio, 2), "one_process": single, "last_run_rows": rows}
    one_ratio = single["batch_per_s"] / single["row_by_row_per_s"]
    return [
        Figure(SCENARIO, "batch path kms/s, 2 processes (median)",
               f"{batch:.0f}/s ({BATCH_KILLMAILS} kms, {sync.SAVE_BATCH} per transaction)", f">= {TARGET_RATE}/s",
               batch >= TARGET_RATE, data),
        Figure(SCENARIO, "batch / row-by-row, 2 processes (median)",
               f"{ratio:.1f}x (row by row {row_by_row:.0f}/s)", f">= {TARGET_RATIO:.0f}x", ratio >= TARGET_RATIO),
        Figure(SCENARIO, "same in 1 process (1 run)",
               f"{single['batch_per_s']:.0f}/s vs {single['row_by_row_per_s']:.0f}/s = {one_ratio:.1f}x"),
    ], {"ingest": data}


def timed(lab: harness.Lab, prefetched: list[tuple[int, str, bytes]], save, *, processes: int) -> float:
    """Killmails per second of one path over these bodies, split between processes (a connection each),
    starting from empty tables; the clock runs from the start signal until the last process is done."""
    with lab.connect(autocommit=True) as conn:
        conn.execute("TRUNCATE killmails, attackers, killmail_items")
        # Every run starts from a flushed cluster: the write-ahead log of earlier runs (and scenarios) is not
        # checkpointed on this run's clock.
        conn.execute("CHECKPOINT")
    context = multiprocessing.get_context("fork")
    go = context.Event()
    parts = [prefetched[n::processes] for n in range(processes)]
    workers = [context.Process(target=_ingest, args=(lab.database_url, part, save, go)) for part in parts]
    for worker in workers:
        worker.start()
    time.sleep(0.5)  # let each process connect before the clock starts
    clock = time.perf_counter()
    go.set()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - clock
    # Stored rows, not exit codes, say whether the processes did their part (a process forked from a thread
    # other than the main one may exit with 1 after its work is done).
    stored = lab.count("SELECT count(*) FROM killmails")
    if stored != len(prefetched):
        raise harness.BenchError(f"ingest stored {stored} of {len(prefetched)} killmails "
                                 f"(exit codes {[w.exitcode for w in workers]})")
    return round(len(prefetched) / elapsed, 1)


def _ingest(database_url: str, part: list[tuple[int, str, bytes]], save, go) -> None:
    with db.connect(database_url) as conn:
        conn.execute("SELECT 1")
        conn.commit()
        go.wait()
        save(conn, part)


def _parsed(entry: tuple[int, str, bytes]):
    killmail_id, killmail_hash, text = entry
    return parse_killmail(json.loads(text), killmail_id=killmail_id, killmail_hash=killmail_hash,
                          raw=text.decode())


def save_batched(conn, prefetched: list[tuple[int, str, bytes]]) -> None:
    """The worker's path: SAVE_BATCH killmails per db.save_killmails call and commit."""
    for start in range(0, len(prefetched), sync.SAVE_BATCH):
        db.save_killmails(conn, [_parsed(e) for e in prefetched[start:start + sync.SAVE_BATCH]])
        conn.commit()


def save_row_by_row(conn, prefetched: list[tuple[int, str, bytes]]) -> None:
    """The seed's path: one statement per row, one commit per killmail."""
    for entry in prefetched:
        save_killmail_row_by_row(conn, _parsed(entry))
        conn.commit()

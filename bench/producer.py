"""The producer at scale: one `queue_killmails.py` run that queues 100 000 due pilots, as cron runs it.

The users are written straight into PostgreSQL (the web app's five columns, never synced, so every one is due and
none has a corporation); no simulator is needed, since the producer calls no ESI. The run is a subprocess timed
from its launch to its exit, and `os.wait4` gives its CPU seconds (user + system) and its peak RSS (`ru_maxrss`),
read by a small launcher process (`harness.run_measured`): straight from the bench, the bench's own peak would count.
Afterwards the bench checks that it did the whole job: the queue holds one message a pilot and every pilot is
claimed with its claim confirmed.
"""
from __future__ import annotations

import sys

import harness
from results import Figure

PILOTS = 100_000
TARGET_SECONDS = 10.0
TARGET_RSS_MB = 150.0
SCENARIO = "producer, 100000 due pilots"


def run() -> tuple[list[Figure], dict]:
    """Write the pilots, run the producer once, check the queue; seconds, CPU seconds and peak RSS."""
    with harness.lab("producer", simulator=False) as lab:
        with lab.connect() as conn:
            conn.execute("INSERT INTO users (character_id, character_name, access_token, refresh_token, expires_at) "
                         "SELECT 90000000 + g, 'Pilot ' || g, 'a', 'r', now() + interval '20 minutes' "
                         "FROM generate_series(1, %s) AS g", (PILOTS,))
            conn.execute("ANALYZE users")
        run = run_once(lab)
        depth = harness.queue_depth(lab.queue)
        claimed = lab.count("SELECT count(*) FROM users WHERE queued_at IS NOT NULL")
    if run["exit"] != 0 or depth != PILOTS or claimed != PILOTS:
        raise harness.BenchError(f"the producer did not queue every pilot: exit {run['exit']}, {depth} messages, "
                                 f"{claimed} claimed: {run['output'][-300:]}")
    data = {"pilots": PILOTS, "seconds": run["seconds"], "cpu_seconds": run["cpu_seconds"],
            "peak_rss_mb": run["peak_rss_mb"], "queue_depth": depth}
    return [
        Figure(SCENARIO, "seconds, launch to exit", f"{run['seconds']:.1f} s ({run['cpu_seconds']:.1f} s CPU)",
               f"<= {TARGET_SECONDS:.0f} s", run["seconds"] <= TARGET_SECONDS, data),
        Figure(SCENARIO, "producer's peak RSS", f"{run['peak_rss_mb']:.0f} MB", f"<= {TARGET_RSS_MB:.0f} MB",
               run["peak_rss_mb"] <= TARGET_RSS_MB),
    ], {"producer": data}


def run_once(lab: harness.Lab) -> dict:
    """One producer run in a subprocess: its exit status, wall and CPU seconds, peak RSS and output."""
    log = harness.LOG_DIR / f"{lab.queue}-producer.log"
    harness.LOG_DIR.mkdir(exist_ok=True)
    with open(log, "w") as output:
        measured = harness.run_measured([sys.executable, str(harness.ROOT / "queue_killmails.py")], env=lab.env(),
                                        output=output)
    return {"exit": measured["exit"], "seconds": round(measured["seconds"], 2),
            "cpu_seconds": round(measured["cpu_seconds"], 2), "peak_rss_mb": round(measured["peak_rss_mb"], 1),
            "output": log.read_text()}

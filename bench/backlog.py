"""A backlog of 5 000 new killmails with the detail bucket scaled to 600 tokens / 60 s, two workers of five
children: the drain rate against the bucket's ceiling (600 / 60 s at 2 tokens a detail = 300 details a
minute), and the 429 and 420 answers.

Draining all 5 000 at the ceiling takes ~17 minutes, more than the whole benchmark may: the drain is measured
over a steady window of WINDOW seconds (two of the bucket's 60 s windows) after WARM_UP seconds, as killmails
stored in PostgreSQL per minute, and the workers are then stopped.
"""
from __future__ import annotations

import time
from itertools import pairwise

import harness
from results import Figure

WORLD = dict(n_pilots=20, n_killmails=5000, share=1, expired_fraction=0.0, revoked=0, corporations=1)
BUCKET = (600, 60)
SIM = dict(detail_bucket=BUCKET)
WORKERS, CHILDREN = 2, 5
WARM_UP, WINDOW, STEP = 15, 120, 10
CEILING_PER_MIN = BUCKET[0] / 2 * 60 / BUCKET[1]
TARGET_SHARE = 0.90
SCENARIO = "backlog 5000 kms, bucket 600/60s"


def run() -> tuple[list[Figure], dict]:
    """Start the drain, skip the warm-up, count stored killmails over the window, stop."""
    with harness.lab("backlog", seed=23, sim_options=SIM, world=WORLD) as lab:
        lab.run_producer(prefetch=CHILDREN)
        workers = [lab.start_worker(prefetch=CHILDREN) for _ in range(WORKERS)]
        time.sleep(WARM_UP)
        series = [progress(lab)]
        for _ in range(WINDOW // STEP):
            time.sleep(STEP)
            series.append(progress(lab))
        stats = lab.sim.stats()
        for worker in workers:
            worker.kill()
    (t0, stored0, tokens0), (t1, stored1, tokens1) = series[0], series[-1]
    per_min = (stored1 - stored0) / (t1 - t0) * 60
    served_per_min = (tokens1 - tokens0) / 2 / (t1 - t0) * 60
    steps = [round((b[1] - a[1]) / (b[0] - a[0]) * 60) for a, b in pairwise(series)]
    share = per_min / CEILING_PER_MIN
    data = {"world": WORLD, "bucket": BUCKET, "workers": WORKERS, "children": CHILDREN, "warm_up_s": WARM_UP,
            "window_s": round(t1 - t0, 1), "stored_in_window": stored1 - stored0,
            "stored_per_min": round(per_min, 1), "details_served_per_min": round(served_per_min, 1),
            "ceiling_per_min": CEILING_PER_MIN, "share_of_ceiling": round(share, 3),
            "per_min_by_10s_step": steps, "status_429": stats["status_429"], "status_420": stats["status_420"],
            "stored_total": stored1, "duplicate_detail_fetches": stats["duplicate_detail_fetches"]}
    errors = stats["status_429"] + stats["status_420"]
    return [
        Figure(SCENARIO, f"drain rate over {t1 - t0:.0f} s / ceiling",
               f"{share:.1%} ({per_min:.0f}/min stored, {served_per_min:.0f}/min served; ceiling "
               f"{CEILING_PER_MIN:.0f}/min)", f">= {TARGET_SHARE:.0%}", share >= TARGET_SHARE, data),
        Figure(SCENARIO, "429 / 420 answers", f"{stats['status_429']} / {stats['status_420']}", "0 / 0",
               errors == 0),
    ], {"backlog": data}


def progress(lab: harness.Lab) -> tuple[float, int, int]:
    """(now, killmails stored, detail tokens the simulator charged)."""
    return time.monotonic(), lab.count("SELECT count(*) FROM killmails"), lab.sim.stats()["tokens_spent"]["killmail"]

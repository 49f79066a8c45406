"""A backlog of details three windows deep, the detail bucket scaled to 600 tokens / 60 s: the drain against the
optimal schedule, one worker or two, and beside another app that spends a third of the bucket.

The optimal schedule spends the rested bucket at once (300 details at 2 tokens), then as much again each time
the first spends come back, one window later: 900 details are done at 2 x 60 s (optimal_seconds, from the
bucket and the backlog). The drain is measured on the simulator's clock from the first detail it served to the
moment the bench sees the last killmail in PostgreSQL (polled every 20 ms).

With the background spender (the simulator's `background_share`: another app behind the same IP spending a
third of the limit per window, smoothly) the world's clock is first moved one window on, so the other app has
spent a whole window's share before ours starts. What is left for us is the limit minus what it spent in each
window; the figure is our detail tokens over what was left, summed over the steady windows: the windows of 60 s
counted from the first detail served, after the first, that ended before the last detail was served.
"""
from __future__ import annotations

import math
import time
from itertools import pairwise

import harness
from results import Figure

BUCKET = (600, 60)
COST = 2  # tokens a detail costs (a 2xx)
WORLD = dict(n_pilots=20, n_killmails=900, share=1, expired_fraction=0.0, revoked=0, corporations=1)
# A third of the bucket is the other app's: 200 details a window are left, so 700 give two steady windows.
BACKGROUND_SHARE = 1 / 3
BACKGROUND_WORLD = dict(WORLD, n_killmails=700)
CHILDREN = 5
TARGET_RATIO, TARGET_USED = 1.05, 0.90
POLL = 0.02


def optimal_seconds(details: int, limit: int, window: int, *, other: int = 0) -> float:
    """The fastest drain of `details` from a rested bucket: what the window allows at once, then as much again
    each time the first spends come back, one window later; `other` tokens a window are other apps'."""
    per_window = (limit - other) // COST
    return (math.ceil(details / per_window) - 1) * window


def run_one_worker() -> tuple[list[Figure], dict]:
    """One worker of five children drains the backlog."""
    scenario = "backlog 900 details, 600/60s, 1 worker x 5"
    data = drain("window1", workers=1, world=WORLD)
    return schedule_figures(scenario, data), {"window_one_worker": data}


def run_two_workers() -> tuple[list[Figure], dict]:
    """Two workers of five children share one egress and drain the same backlog."""
    scenario = "backlog 900 details, 600/60s, 2 workers x 5"
    data = drain("window2", workers=2, world=WORLD)
    return schedule_figures(scenario, data), {"window_two_workers": data}


def run_background() -> tuple[list[Figure], dict]:
    """One worker drains a backlog while another app spends a third of the bucket."""
    scenario = "backlog 700 details, 600/60s, other app 1/3"
    data = drain("window_bg", workers=1, world=BACKGROUND_WORLD, background_share=BACKGROUND_SHARE)
    steady = data["steady_windows"]
    used = data["steady_used"]
    shown = ", ".join(f"{w['ours']}/{w['left']}" for w in steady) or "none"
    return [
        Figure(scenario, "429 answers", str(data["status_429"]), "0", data["status_429"] == 0, data),
        Figure(scenario, "what is left used, steady windows",
               "no steady window" if used is None else f"{used:.1%} (ours/left by window: {shown})",
               f">= {TARGET_USED:.0%}", used is not None and used >= TARGET_USED),
        Figure(scenario, "first detail to last stored / optimal", _schedule_value(data),
               "(with a third of the bucket gone, for comparison)"),
    ], {"window_background": data}


def schedule_figures(scenario: str, data: dict) -> list[Figure]:
    """The drain against the optimal schedule, and the 429s."""
    ratio = data["ratio"]
    return [
        Figure(scenario, "first detail to last stored / optimal", _schedule_value(data), f"<= {TARGET_RATIO}x",
               ratio is not None and ratio <= TARGET_RATIO, data),
        Figure(scenario, "429 answers", str(data["status_429"]), "0", data["status_429"] == 0),
    ]


def _schedule_value(data: dict) -> str:
    if data["ratio"] is None:
        return f"{data['stored']}/{data['expected']} stored when cut short at {data['seconds']:.0f} s"
    return f"{data['ratio']:.3f}x ({data['seconds']:.1f} s; optimal {data['optimal_s']:.0f} s)"


def drain(name: str, *, workers: int, world: dict, background_share: float = 0.0) -> dict:
    """Run the drain and return its measurements, window by window."""
    limit, window = BUCKET
    with harness.lab(name, seed=37, sim_options=dict(detail_bucket=BUCKET), world=world) as lab:
        expected = len(lab.sim.expected_killmails(valid_only=True))
        other = 0
        if background_share:
            lab.sim.configure(background_share=background_share)
            lab.advance_world(window)
            other = round(background_share * limit)
        optimal = optimal_seconds(expected, limit, window, other=other)
        running = lab.start_ready_workers(workers, prefetch=CHILDREN)
        lab.run_producer(prefetch=CHILDREN)
        first = harness.wait_until(lambda: lab.sim.stats()["first_detail_at"], timeout=60,
                                   what="the first detail", every=POLL)
        samples, done = follow(lab, first, expected, deadline=first + 1.5 * optimal + 60)
        stored = lab.count("SELECT count(*) FROM killmails")
        stats = lab.sim.stats()
        for worker in running:
            worker.kill()  # nothing is measured after this
    end = done if done is not None else samples[-1][0]
    windows = [{"ours": b[1] - a[1], "other": b[2] - a[2], "left": limit - (b[2] - a[2])}
               for a, b in pairwise(samples)]
    steady = [w for k, w in enumerate(windows) if k >= 1 and first + (k + 1) * window <= stats["last_detail_at"]]
    left = sum(w["left"] for w in steady)
    return {"world": world, "bucket": BUCKET, "workers": workers, "children": CHILDREN,
            "background_share": background_share, "expected": expected, "stored": stored,
            "seconds": round(end - first, 2), "optimal_s": optimal,
            "ratio": None if done is None else round((done - first) / optimal, 4),
            "windows": windows, "steady_windows": steady,
            "steady_used": round(sum(w["ours"] for w in steady) / left, 4) if left else None,
            "status_429": stats["status_429"], "status_420": stats["status_420"],
            "tokens_spent": stats["tokens_spent"]["killmail"],
            "tokens_spent_background": stats["tokens_spent_background"],
            "background_refused": stats["background_refused"],
            "duplicate_detail_fetches": stats["duplicate_detail_fetches"], "max_in_flight": stats["max_in_flight"]}


def follow(lab: harness.Lab, first: float, expected: int, *, deadline: float) -> tuple[list, float | None]:
    """Watch the drain on the simulator's clock: the detail tokens spent (ours, the other app's) at the first
    detail and at each window's end after it, and when every killmail was stored (None: not by the deadline)."""
    window = BUCKET[1]
    stats = lab.sim.stats()
    samples = [(first, 0, stats["tokens_spent_background"])]  # nothing of ours before the first detail
    while True:
        now = lab.sim.now().timestamp()
        if now >= first + len(samples) * window:
            stats = lab.sim.stats()
            samples.append((now, stats["tokens_spent"]["killmail"], stats["tokens_spent_background"]))
        if lab.count("SELECT count(*) FROM killmails") >= expected:
            return samples, lab.sim.now().timestamp()
        if now > deadline:
            return samples, None
        time.sleep(POLL)

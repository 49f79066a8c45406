"""Memory of a worker child: RSS (VmRSS) after the child itself stored 10 000 killmails, and whether it stays
flat over a soak of repeated polls that keep bringing new killmails.

One worker with PREFETCH_COUNT=1, so its one child does every job. The soak lasts 10 minutes: a round every
ROUND_EVERY seconds gives a few pilots new killmails, waits for the lists' short Expires, makes everyone due and
runs the producer, as cron would. "Flat" means the RSS trend over the soak (least squares) grows less than
FLAT_MB in 10 minutes. bench/run.py runs the soak in the background, beside the other scenarios; the cold part
runs alone, and rounds wait (the worker idles) while a scenario that measures speed runs (`Gate`).
"""
from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import harness
from results import Figure

WORLD = dict(n_pilots=40, n_killmails=10_400, share=1, expired_fraction=0.25, revoked=1, corporations=2)
CACHE_SECONDS = 2
# The soak polls every pilot every ROUND_EVERY seconds, 30 times as often as ESI's 5-minute list cache allows: a
# character's real list bucket (30 tokens / 15 min) would run dry within minutes, so this world's is bigger.
SIM = dict(cache_seconds=CACHE_SECONDS, detail_bucket=(10_000_000, 900), list_bucket=(10_000, 900))
SOAK = 600
ROUND_EVERY = 10.0
NEW_PER_ROUND = 10
TARGET_MB, FLAT_MB = 80.0, 5.0
SCENARIO = "memory, worker child"


class Gate:
    """Lets the soak's rounds run, or holds them while another scenario measures speed."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._open, self._busy = True, False

    def close(self) -> None:
        """Hold the next rounds, and wait for the running one to end."""
        with self._changed:
            self._open = False
            self._changed.wait_for(lambda: not self._busy)

    def open(self) -> None:
        with self._changed:
            self._open = True
            self._changed.notify_all()

    @contextmanager
    def round(self) -> Iterator[None]:
        """One round, once the gate is open."""
        with self._changed:
            self._changed.wait_for(lambda: self._open)
            self._busy = True
        try:
            yield
        finally:
            with self._changed:
                self._busy = False
                self._changed.notify_all()


def run(soaking: threading.Event | None = None, gate: Gate | None = None) -> tuple[list[Figure], dict]:
    """The cold sync, then the soak; `soaking` is set once the cold part is over (or failed)."""
    soaking = soaking or threading.Event()
    gate = gate or Gate()
    try:
        with harness.lab("memory", seed=29, sim_options=SIM, world=WORLD) as lab:
            worker = lab.start_worker(prefetch=1)
            with harness.MemoryWatch([worker.pid], every=0.5) as watch:
                clock = time.monotonic()
                lab.run_producer(prefetch=1)
                expected = len(lab.sim.expected_killmails(valid_only=True))
                harness.wait_until(lambda: lab.count("SELECT count(*) FROM killmails") >= expected, timeout=300,
                                   what=f"{expected} killmails stored", every=0.5)
                cold_seconds = time.monotonic() - clock
                after_cold = watch.sample()
                soaking.set()
                soak_start = time.monotonic()
                rounds = soak(lab, soak_start + SOAK, gate)
                soak_end = time.monotonic()
                final = watch.sample()
            worker.stop()
            with lab.connect() as conn:
                by_worker = conn.execute("SELECT worker, sum(saved) AS saved, count(*) AS jobs FROM sync_runs "
                                         "GROUP BY worker").fetchall()
    finally:
        soaking.set()
    child = max(after_cold, key=after_cold.get)
    soak_samples = [(t - soak_start, mb) for t, pid, mb in watch.samples if pid == child and t >= soak_start]
    slope = _slope(soak_samples) * 600  # MB per 10 minutes
    peak = max(mb for _, pid, mb in watch.samples if pid == child)
    data = {"world": WORLD, "children": 1, "cold_seconds": round(cold_seconds, 1), "stored_cold": expected,
            "rss_after_cold_mb": round(after_cold[child], 1), "rss_end_mb": round(final.get(child, 0), 1),
            "rss_peak_mb": round(peak, 1), "soak_seconds": round(soak_end - soak_start, 1), "soak_rounds": rounds,
            "trend_mb_per_10_min": round(slope, 2), "jobs_by_worker": by_worker,
            "soak_samples": [(round(t, 1), round(mb, 2)) for t, mb in soak_samples]}
    saved = sum(r["saved"] or 0 for r in by_worker)
    return [
        Figure(SCENARIO, f"RSS after {expected} kms (peak)",
               f"{after_cold[child]:.1f} MB (peak {peak:.1f} MB; 1 child stored {saved} in all)",
               f"<= {TARGET_MB:.0f} MB", peak <= TARGET_MB, data),
        Figure(SCENARIO, f"RSS trend over a {soak_end - soak_start:.0f} s soak",
               f"{slope:+.2f} MB/10 min ({after_cold[child]:.1f} -> {final.get(child, 0):.1f} MB, {rounds} rounds)",
               f"flat (< {FLAT_MB:.0f} MB/10 min)", abs(slope) < FLAT_MB),
    ], {"memory": data}


def soak(lab: harness.Lab, until: float, gate: Gate) -> int:
    """Rounds of polling with new killmails until the deadline; returns how many rounds ran."""
    rng = random.Random(29)
    live = [p["character_id"] for p in lab.sim.pilots() if not p["revoked"]]
    rounds = 0
    while time.monotonic() < until:
        round_start = time.monotonic()
        with gate.round():
            for character_id in rng.sample(live, NEW_PER_ROUND):
                lab.sim.add_killmails(character_id, 1)
            harness.wait_until(lambda: lab.count("SELECT count(*) FROM users WHERE list_expires_at > now()") == 0,
                               timeout=CACHE_SECONDS + 30, what="the lists' Expires to pass")
            lab.make_due()
            runs = lab.count("SELECT count(*) FROM sync_runs")
            lab.run_producer(prefetch=1)
            harness.wait_until(lambda runs=runs: harness.queue_depth(lab.queue) == 0 and
                               lab.count("SELECT count(*) FROM sync_runs") > runs, timeout=120,
                               what="a round's jobs")
        rounds += 1
        time.sleep(max(0.0, min(until, round_start + ROUND_EVERY) - time.monotonic()))  # the soak's pace
    return rounds


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per second."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (m - mean_m) for t, m in points) / var if var else 0.0

"""Cold sync of 200 pilots sharing ~20 000 killmails: ESI calls against the minimum, then warm re-polls of the
same pilots before and after the lists' Expires."""
from __future__ import annotations

import math
import time
from datetime import datetime, timedelta, timezone

import harness
from results import Figure

WORLD = dict(n_pilots=200, n_killmails=20_000, share=3, expired_fraction=0.25, revoked=2, corporations=10)
PAGE_SIZE = 200          # pilots hold 1 to 3 pages, so "one list call per page" is tested on several pages
CACHE_SECONDS = 300
SIM = dict(page_size=PAGE_SIZE, cache_seconds=CACHE_SECONDS, detail_bucket=(10_000_000, 900))
WORKERS, CHILDREN = 2, 5
REFRESH_MARGIN = timedelta(seconds=60)  # sync.REFRESH_MARGIN: a token this close to expiry is refreshed


def minimum_calls(sim, pilots: list[dict], started: datetime) -> dict[str, int]:
    """The fewest ESI and SSO calls a correct cold sync makes: one refresh per expired (or revoked) token, one
    list call per page of each pilot with a valid grant, one detail per distinct killmail."""
    valid = [p for p in pilots if not p["revoked"]]
    return {
        "token": sum(1 for p in pilots if p["expires_at"] <= started + REFRESH_MARGIN),
        "list_character": sum(max(1, math.ceil(len(sim.killmail_ids_for(p["character_id"])) / PAGE_SIZE))
                              for p in valid),
        "detail": len(sim.expected_killmails(valid_only=True)),
    }


def run() -> tuple[list[Figure], dict]:
    """Run the cold sync, then the two warm re-polls, on one world."""
    with harness.lab("cold", seed=11, sim_options=SIM, world=WORLD) as lab:
        cold, figures = cold_sync(lab)
        warm, more = warm_repoll(lab)
    return figures + more, {"cold_sync": cold, "warm_repoll": warm}


def cold_sync(lab: harness.Lab) -> tuple[dict, list[Figure]]:
    pilots = lab.sim.pilots()
    started = datetime.now(timezone.utc)
    minimum = minimum_calls(lab.sim, pilots, started)
    clock = time.monotonic()
    lab.run_producer()
    workers = [lab.start_worker("--burst", prefetch=CHILDREN) for _ in range(WORKERS)]
    with harness.MemoryWatch([w.pid for w in workers]) as memory:
        for worker in workers:
            worker.wait(timeout=400)
    elapsed = time.monotonic() - clock
    stats = lab.sim.stats()
    expected = set(lab.sim.expected_killmails(valid_only=True))
    with lab.connect() as conn:
        stored = {r["killmail_id"] for r in conn.execute("SELECT killmail_id FROM killmails")}
    made = {route: stats["by_route"][route] for route in minimum}
    other = stats["requests"] - sum(made.values())
    ratio = stats["requests"] / sum(minimum.values())
    duplicates = stats["duplicate_detail_fetches"]
    peaks = memory.peak_by_child()
    data = {"world": WORLD, "page_size": PAGE_SIZE, "workers": WORKERS, "children": CHILDREN,
            "seconds": round(elapsed, 1), "calls": made, "other_calls": other, "minimum": minimum,
            "requests": stats["requests"], "ratio": round(ratio, 4), "duplicate_detail_fetches": duplicates,
            "status_420": stats["status_420"], "status_429": stats["status_429"],
            "expected_killmails": len(expected), "stored_killmails": len(stored & expected),
            "missing": len(expected - stored), "child_rss_peak_mb": sorted(round(v, 1) for v in peaks.values())}
    calls = ", ".join(f"{made[k]}/{minimum[k]} {k}" for k in minimum)
    figures = [
        Figure("cold sync 200 pilots, 20k kms", "ESI calls / minimum", f"{ratio:.2f} ({calls})", "1.00",
               round(ratio, 2) == 1.00 and other == 0, data),
        Figure("cold sync 200 pilots, 20k kms", "duplicate detail fetches", str(duplicates), "0", duplicates == 0),
        Figure("cold sync 200 pilots, 20k kms", "killmails stored / expected",
               f"{len(stored & expected)}/{len(expected)} in {elapsed:.0f} s, 2x5 children",
               "all", not (expected - stored)),
    ]
    return data, figures


def warm_repoll(lab: harness.Lab) -> tuple[dict, list[Figure]]:
    """Re-poll every pilot once while its list is still fresh, and once after Expires; nothing new either time."""
    # Before Expires: the users are made due (last sync an hour back) while their stored Expires is still ahead.
    with lab.connect() as conn:
        conn.execute("UPDATE users SET last_sync_at = last_sync_at - interval '1 hour'")
    before = repoll(lab)
    # After Expires: the world's clock moves past the lists' Expires (simulator and the times stored from it).
    lab.advance_world(CACHE_SECONDS + 1)
    after = repoll(lab)
    jobs = after["jobs"]
    per_pilot = after["stats"]["tokens_spent"]["char-killmail"] / max(1, jobs)
    list_calls = after["stats"]["by_route"]["list_character"]
    details = after["stats"]["by_route"]["detail"] + before["stats"]["by_route"]["detail"]
    early = before["stats"]["early_list_fetches"] + after["stats"]["early_list_fetches"]
    before_lists = before["stats"]["by_route"]["list_character"]
    data = {"before_expires": before, "after_expires": after, "tokens_per_pilot": round(per_pilot, 3)}
    status_304 = after["stats"]["by_status"].get("304", 0)
    scenario = "warm re-poll, nothing new"
    return data, [
        Figure(scenario, "list tokens per pilot after Expires",
               f"{per_pilot:.2f} ({list_calls} list calls, {status_304} x 304, {jobs} jobs)", "<= 1",
               per_pilot <= 1),
        Figure(scenario, "detail calls (both re-polls)", str(details), "0", details == 0),
        Figure(scenario, "list calls before Expires", f"{before_lists} ({before['jobs']} jobs; early fetches "
               f"{early})", "0", before_lists == 0 and early == 0),
    ]


def repoll(lab: harness.Lab) -> dict:
    """Producer plus one burst worker over every due user; the simulator's counts for just that."""
    runs_before = lab.count("SELECT count(*) FROM sync_runs")
    lab.sim.reset_stats()
    clock = time.monotonic()
    lab.run_producer()
    lab.start_worker("--burst", prefetch=CHILDREN).wait(timeout=300)
    jobs = lab.count("SELECT count(*) FROM sync_runs") - runs_before
    return {"jobs": jobs, "seconds": round(time.monotonic() - clock, 1), "stats": _slim(lab.sim.stats())}


def _slim(stats: dict) -> dict:
    """Simulator counters without the per-killmail fetch table."""
    return {k: v for k, v in stats.items() if k != "detail_fetches"}

"""limits.py's pure parts: the rate-limit header, the pacing arithmetic and which responses pause what.

SharedLimits itself keeps its state in PostgreSQL and is exercised by the sync and worker tests.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from requests.structures import CaseInsensitiveDict

from limits import (BURST_SHARE, ERROR_LIMIT_BUCKET, ERROR_MARGIN, FLOOR_SHARE, PACE_SHARE, burst_allowance,
                    detail_spacing, parse_rate_limit, pause_after)

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
HEALTHY = {"X-ESI-Error-Limit-Remain": "100", "X-ESI-Error-Limit-Reset": "40",
           "X-Ratelimit-Group": "killmail", "X-Ratelimit-Limit": "3600/15m", "X-Ratelimit-Remaining": "3000"}


def seconds(until: datetime) -> float:
    return (until - NOW).total_seconds()


# ------------------------------------------------------------------------------------------------ the header

@pytest.mark.parametrize("value, parsed", [
    ("3600/15m", (3600, 900)),
    ("600/1m", (600, 60)),
    ("30/15m", (30, 900)),
    ("150/1h", (150, 3600)),
    ("10/30s", (10, 30)),
    ("10/30", (10, 30)),            # no unit: seconds
    (" 3600 / 15m ", (3600, 900)),
    (None, None),
    ("", None),
    ("junk", None),
    ("3600", None),
    ("3600/", None),
    ("/15m", None),
    ("0/15m", None),
    ("3600/0m", None),
    ("-30/15m", None),
    ("3600/15d", None),
    ("3600/15mm", None),
    ("3600/1.5m", None),
])
def test_parse_rate_limit(value, parsed):
    assert parse_rate_limit(value) == parsed


# ------------------------------------------------------------------------------------------------ pacing

@pytest.mark.parametrize("limit, window", [(3600, 900), (1800, 900), (7200, 900), (600, 60), (300, 900), (150, 900)])
def test_burst_and_paced_spend_in_one_window_stay_under_the_floor(limit, window):
    """A rested bucket lets the burst go at once (GCRA lets burst + 1 through), then one call per spacing.

    Whatever the phase, one window then holds at most burst + 1 + window / spacing calls; at 2 tokens each they
    must leave the floor share of the bucket untouched, so pause_after never has to stop the detail fetches.
    """
    spacing = detail_spacing(limit, window)
    burst = burst_allowance(limit)
    spent = 2 * (burst + 1 + window / spacing)
    assert spent <= limit * (1 - FLOOR_SHARE)


@pytest.mark.parametrize("limit, window, spacing", [
    (3600, 900, 2 * 900 / (3600 * PACE_SHARE)),   # about 0.53 s: ~1.9 calls a second for the whole IP
    (600, 60, 2 * 60 / (600 * PACE_SHARE)),
])
def test_detail_spacing(limit, window, spacing):
    assert detail_spacing(limit, window) == pytest.approx(spacing)
    assert detail_spacing(limit, window, cost=1) == pytest.approx(spacing / 2)


@pytest.mark.parametrize("limit, burst", [(3600, int(3600 * BURST_SHARE / 2)), (1800, 18), (100, 1), (30, 1), (1, 1)])
def test_burst_allowance_is_at_least_one_call(limit, burst):
    assert burst_allowance(limit) == burst


def test_paced_rate_is_below_the_bucket_refill_rate():
    # Tokens come back one window after they were spent: pacing must spend them slower than that.
    assert 2 / detail_spacing(3600, 900) < 3600 / 900


# ------------------------------------------------------------------------------------------------ pauses

@pytest.mark.parametrize("reset", [0, 1, 37, 60])
def test_420_pauses_the_error_limit_until_the_reset(reset):
    pauses = pause_after(420, {"X-ESI-Error-Limit-Remain": "0", "X-ESI-Error-Limit-Reset": str(reset)}, NOW)
    assert set(pauses) == {ERROR_LIMIT_BUCKET}
    assert reset <= seconds(pauses[ERROR_LIMIT_BUCKET]) <= reset + 2   # a little margin past the reset


def test_420_without_a_reset_pauses_about_a_window():
    pauses = pause_after(420, {}, NOW)
    assert 60 <= seconds(pauses[ERROR_LIMIT_BUCKET]) <= 62


@pytest.mark.parametrize("remain, paused", [
    (0, True), (1, True), (ERROR_MARGIN - 1, True), (ERROR_MARGIN, False), (99, False), (100, False),
])
def test_error_limit_remain_under_the_margin_pauses(remain, paused):
    headers = {"X-ESI-Error-Limit-Remain": str(remain), "X-ESI-Error-Limit-Reset": "25"}
    for status in (200, 404, 502):
        pauses = pause_after(status, headers, NOW)
        assert (ERROR_LIMIT_BUCKET in pauses) == paused
        if paused:
            assert 25 <= seconds(pauses[ERROR_LIMIT_BUCKET]) <= 27


@pytest.mark.parametrize("retry_after", [1, 12, 900])
def test_429_pauses_the_bucket_for_retry_after(retry_after):
    headers = {"Retry-After": str(retry_after), "X-Ratelimit-Group": "killmail", "X-Ratelimit-Limit": "3600/15m",
               "X-Ratelimit-Remaining": "0"}
    pauses = pause_after(429, headers, NOW)
    assert set(pauses) == {"bucket"}
    assert retry_after <= seconds(pauses["bucket"]) <= retry_after + 2


def test_429_without_retry_after_pauses_about_a_minute():
    assert 60 <= seconds(pause_after(429, {}, NOW)["bucket"]) <= 62


@pytest.mark.parametrize("limit, remaining, pause", [
    ("3600/15m", "0", 900 * 72 / 3600),        # the floor is 72 tokens; each comes back in 0.25 s
    ("3600/15m", "10", 900 * 62 / 3600),
    ("3600/15m", "71", 900 * 1 / 3600),
    ("10/30s", "1", 30 * 1 / 10),              # a small shared bucket: the floor is one answer's worth
])
def test_low_ratelimit_remaining_pauses_the_bucket_until_the_floor_is_back(limit, remaining, pause):
    pauses = pause_after(200, {"X-Ratelimit-Limit": limit, "X-Ratelimit-Remaining": remaining}, NOW)
    assert set(pauses) == {"bucket"}
    assert seconds(pauses["bucket"]) == pytest.approx(pause)


@pytest.mark.parametrize("remaining, paused", [("0", True), ("1", True), ("2", False), ("4", False)])
def test_a_characters_bucket_short_of_one_answer_pauses_for_a_whole_window(remaining, paused):
    """Spent in bursts (a walk of pages), its tokens come back only a window after: a 15-page walk may spend
    all 30, and the next call must wait the whole window rather than meet a 429."""
    headers = {"X-Ratelimit-Limit": "30/15m", "X-Ratelimit-Remaining": remaining}
    pauses = pause_after(200, headers, NOW, per_owner=True)
    assert (seconds(pauses["bucket"]) if paused else pauses) == (900 if paused else {})


@pytest.mark.parametrize("headers", [
    HEALTHY,
    {},
    {"X-Ratelimit-Limit": "3600/15m", "X-Ratelimit-Remaining": "72"},     # exactly the floor
    {"X-Ratelimit-Limit": "30/15m", "X-Ratelimit-Remaining": "2"},        # one more answer's worth
    {"X-Ratelimit-Remaining": "0"},                                        # no limit: nothing to measure against
    {"X-Ratelimit-Limit": "junk", "X-Ratelimit-Remaining": "0"},
    {"X-ESI-Error-Limit-Remain": "junk", "X-ESI-Error-Limit-Reset": "junk"},
    {"X-ESI-Error-Limit-Remain": ""},
])
def test_healthy_or_unreadable_headers_pause_nothing(headers):
    assert pause_after(200, headers, NOW) == {}
    assert pause_after(304, headers, NOW) == {}


def test_headers_are_read_whatever_their_case():
    headers = CaseInsensitiveDict({k.lower(): v for k, v in HEALTHY.items()})
    headers["x-esi-error-limit-remain"] = "3"
    headers["x-ratelimit-remaining"] = "0"
    assert set(pause_after(200, headers, NOW)) == {ERROR_LIMIT_BUCKET, "bucket"}


def test_a_420_with_low_tokens_pauses_both():
    headers = {"X-ESI-Error-Limit-Reset": "10", "X-Ratelimit-Limit": "3600/15m", "X-Ratelimit-Remaining": "0"}
    assert set(pause_after(420, headers, NOW)) == {ERROR_LIMIT_BUCKET, "bucket"}


def test_pauses_are_measured_from_the_clock_given():
    later = NOW + timedelta(hours=1)
    pauses = pause_after(420, {"X-ESI-Error-Limit-Reset": "30"}, later)
    assert later + timedelta(seconds=30) <= pauses[ERROR_LIMIT_BUCKET] <= later + timedelta(seconds=32)


# ------------------------------------------------------------------------------------------------ shared state

def test_a_characters_pause_reaches_other_processes_and_is_read_once_for_all_characters(conn, database_url,
                                                                                      monkeypatch):
    import db
    from limits import SharedLimits

    reads = []
    real_limit_state = db.limit_state
    monkeypatch.setattr(db, "limit_state", lambda *a, **k: reads.append(a[1]) or real_limit_state(*a, **k))
    waits: list[float] = []

    def process() -> SharedLimits:
        return SharedLimits(lambda: db.connect(database_url, autocommit=True), clock=lambda: NOW,
                            sleep=waits.append)

    one, other = process(), process()
    one.after("char-killmail:7", 429, {"Retry-After": "20"})      # a 429 on pilot 7's list
    for character_id in range(1, 50):
        other.before(f"char-killmail:{character_id}", pace=False)
    assert waits == [21.0]                                         # only pilot 7 waits, until Retry-After + 1
    assert len(reads) == 1                                         # one read served all 49 pilots
    one.close()
    other.close()


def test_a_pause_set_while_a_call_waited_for_its_slot_holds_that_call_back(conn, database_url, monkeypatch):
    import db
    import limits
    from limits import Paused, SharedLimits

    monkeypatch.setattr(limits, "STATE_TTL", 0.0)  # every check reads the shared state (no 1 s cache)
    waits: list[float] = []

    def process(sleep) -> SharedLimits:
        return SharedLimits(lambda: db.connect(database_url, autocommit=True), clock=lambda: NOW, sleep=sleep)

    other = process(waits.append)
    # Another process's detail call is answered 429 while this one sleeps until its slot.
    this = process(lambda seconds: waits.append(seconds) or other.after("killmail", 429, {"Retry-After": "300"}))
    this.after("killmail", 200, HEALTHY)  # the bucket's limit is known: detail calls are paced
    sent_after_the_wait = 0
    with pytest.raises(Paused):
        for _ in range(limits.burst_allowance(3600) + 2):  # what the bucket allows at once; then a call waits
            this.before("killmail", pace=True)
            sent_after_the_wait += bool(waits)
    assert len(waits) == 1 and waits[0] > 0
    assert sent_after_the_wait == 0  # the call that slept for its slot saw the 429 and was not sent
    this.close()
    other.close()


def test_a_call_held_back_by_a_short_pause_takes_a_new_slot_after_it(conn, database_url, monkeypatch):
    """Calls that waited for their slots and then met a short pause must not all go at once when it ends."""
    import db
    import limits
    from limits import SharedLimits

    monkeypatch.setattr(limits, "STATE_TTL", 0.0)
    clock = [NOW]
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # the clock moves on while a call sleeps
        waits.append(round(seconds, 2))
        clock[0] += timedelta(seconds=seconds)
        if len(waits) == 1:  # meanwhile, another process's detail call is answered 429 with Retry-After 5
            other.after("killmail", 429, {"Retry-After": "5"})

    other = SharedLimits(lambda: db.connect(database_url, autocommit=True), clock=lambda: clock[0])
    this = SharedLimits(lambda: db.connect(database_url, autocommit=True), clock=lambda: clock[0], sleep=sleep)
    this.after("killmail", 200, HEALTHY)
    this.before("killmail", pace=True)             # the bucket's first slot: now
    this.before("killmail", pace=True)             # waits for its slot, meets the pause, then takes a new slot
    spacing = round(limits.detail_spacing(3600, 900), 2)
    assert waits == [spacing, 6.0]                 # Retry-After + 1; the new slot is where the pause ends
    this.before("killmail", pace=True)             # the bucket is not rested after a pause: no burst, paced
    assert waits == [spacing, 6.0, spacing]
    this.close()
    other.close()


@pytest.mark.parametrize("egress", ["", "203.0.113.7", "2001:db8::7", "nat-1"])
def test_the_detail_bucket_is_shared_and_paced_whatever_the_egress_name(conn, database_url, egress):
    """An IPv6 egress puts ':' in the detail bucket's name; it must still be paced, not taken for a pilot's."""
    import db
    import limits
    from limits import SharedLimits

    bucket = f"killmail@{egress}" if egress else "killmail"
    waits: list[float] = []
    shared = SharedLimits(lambda: db.connect(database_url, autocommit=True), clock=lambda: NOW,
                          sleep=waits.append)
    shared.after(bucket, 200, HEALTHY)  # its limit is stored for every process to pace against
    for _ in range(limits.burst_allowance(3600) + 2):
        shared.before(bucket, pace=True)
    assert waits and waits[-1] == pytest.approx(limits.detail_spacing(3600, 900) * len(waits), rel=0.01)
    (row,) = db.limit_state(conn, [bucket])
    assert (row["limit_tokens"], row["window_seconds"]) == (3600, 900)
    shared.after("char-killmail:7", 429, {"Retry-After": "20"})
    shared.after("char-killmail:8", 429, {"Retry-After": "20"})
    shown = {b["bucket"]: b["buckets"] for b in db.esi_limit_buckets(conn, NOW)}
    assert shown == {bucket: 1, "char-killmail": 2}  # the status page folds characters, not egress names
    shared.close()


def test_one_paced_call_per_process_waits_for_a_slot_while_its_other_threads_queue(conn, database_url):
    """However many detail threads a process runs, it holds one slot ahead in the shared schedule: the others
    wait in the process, so a process that stops (or dies) leaves at most one slot of the schedule unused."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import db
    import limits
    from limits import SharedLimits

    sleeping, most, guard = [0], [0], threading.Lock()

    def sleep(seconds: float) -> None:  # a paced wait, long enough for the other threads to reach theirs
        with guard:
            sleeping[0] += 1
            most[0] = max(most[0], sleeping[0])
        time.sleep(0.01)
        with guard:
            sleeping[0] -= 1

    shared = SharedLimits(lambda: db.connect(database_url, autocommit=True), clock=lambda: NOW, sleep=sleep)
    shared.after("killmail", 200, HEALTHY)
    for _ in range(limits.burst_allowance(3600) + 2):  # the rested bucket's burst, then a paced call
        shared.before("killmail", pace=True)
    (before,) = db.limit_state(conn, ["killmail"])
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda _: shared.before("killmail", pace=True), range(16)))
    assert most == [1]  # sixteen calls waited for their slots, one at a time
    (after,) = db.limit_state(conn, ["killmail"])
    ahead = (after["next_slot"] - before["next_slot"]).total_seconds()
    assert ahead == pytest.approx(16 * limits.detail_spacing(3600, 900))  # a slot each, none taken twice
    shared.close()


def test_until_a_bucket_is_known_one_paced_call_goes_and_the_others_wait_for_its_answer(conn, database_url):
    """A new database (or a new ESI_EGRESS name) knows no detail bucket yet: the first answer tells it, and
    until then a process's detail threads must not all go at once, unpaced."""
    import threading

    import db
    import limits
    from limits import SharedLimits

    shared = SharedLimits(lambda: db.connect(database_url, autocommit=True), clock=lambda: NOW, sleep=lambda s: None)
    shared.before("killmail", pace=True)  # the first call asks
    gone = threading.Event()
    second = threading.Thread(target=lambda: (shared.before("killmail", pace=True), gone.set()))
    second.start()
    assert not gone.wait(0.3)  # held back while the first call has no answer
    shared.after("killmail", 200, HEALTHY)  # the answer: 3600/15m
    assert gone.wait(5)
    second.join()
    shared.before("killmail", pace=True)  # known now: paced from the shared schedule, no waiting for an answer
    (row,) = db.limit_state(conn, ["killmail"])
    assert (row["limit_tokens"], row["window_seconds"]) == (3600, 900) and row["next_slot"] is not None
    shared.close()


def test_a_bucket_that_answers_without_a_limit_is_not_paced_and_a_timeout_is_no_answer(conn, database_url):
    import threading

    import db
    from limits import SharedLimits

    shared = SharedLimits(lambda: db.connect(database_url, autocommit=True), clock=lambda: NOW, sleep=lambda s: None)
    shared.before("killmail", pace=True)
    shared.after("killmail", 0, {})  # the first call timed out: it told nothing
    shared.before("killmail", pace=True)  # so the next call asks again, without waiting
    gone = threading.Event()
    third = threading.Thread(target=lambda: (shared.before("killmail", pace=True), gone.set()))
    third.start()
    assert not gone.wait(0.3)
    shared.after("killmail", 200, {"X-ESI-Error-Limit-Remain": "100", "X-ESI-Error-Limit-Reset": "30"})
    assert gone.wait(5)
    third.join()
    for _ in range(50):  # an answer without X-Ratelimit-*: no bucket to pace against, nothing waits
        shared.before("killmail", pace=True)
    assert db.limit_state(conn, ["killmail"]) == [] or db.limit_state(conn, ["killmail"])[0]["next_slot"] is None
    shared.close()

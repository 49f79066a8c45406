"""limits.py: the header and cost rules, and the ledger shared through PostgreSQL, on a controlled clock.

Each SharedLimits stands for one worker process; two of them on one database are two processes (or hosts) behind
one egress. The clock only moves when a call sleeps, so a window passes without waiting for it.
"""
from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from requests.structures import CaseInsensitiveDict

import db
import limits
from backoff import MAX_PAUSE
from esi import SSO_BUCKET, Paused
from helpers import ledger_spent
from limits import (
    ANSWERED_BUCKET,
    ERROR_LIMIT,
    ERROR_LIMIT_BUCKET,
    SharedLimits,
    answer_cost,
    error_cost,
    parse_rate_limit,
    pause_after,
    reserve,
)

NOW = datetime(2026, 11, 29, 12, 0, 0, 250000, tzinfo=UTC)  # a quarter into a second
DETAIL = "killmail"


def seconds(until: datetime) -> float:
    return (until - NOW).total_seconds()


def answer(limit: str = "600/1m", remaining: int | None = None, errors_remain: int = 100) -> dict:
    headers = {"X-ESI-Error-Limit-Remain": str(errors_remain), "X-ESI-Error-Limit-Reset": "40",
               "X-Ratelimit-Limit": limit}
    if remaining is not None:
        headers["X-Ratelimit-Remaining"] = str(remaining)
    return headers


class Clock:
    """The processes' shared clock: it moves on only while a call sleeps."""

    def __init__(self):
        self.now = NOW
        self.waits: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(round(seconds, 3))
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock(conn):
    return Clock()


@pytest.fixture
def process(database_url, clock, monkeypatch):
    """A factory of SharedLimits that read the shared state on every call (no 1 s cache)."""
    monkeypatch.setattr(limits, "STATE_TTL", 0.0)
    made = []

    def make(**options) -> SharedLimits:
        shared = SharedLimits(lambda: db.connect(database_url, autocommit=True), clock=clock, sleep=clock.sleep,
                              **options)
        made.append(shared)
        return shared

    yield make
    for shared in made:
        shared.close()


def learn(shared: SharedLimits, bucket: str = DETAIL, limit: str = "600/1m") -> None:
    """One answered call, so that the bucket's limit is known (the ledger then counts it)."""
    shared.settle(shared.take(bucket), 200, answer(limit))


def spent(conn, bucket: str, clock: Clock, window: int = 60) -> dict:
    return ledger_spent(conn, bucket, clock.now, window=window)


def until(condition) -> None:
    """Wait for another thread to reach a state (it sets nothing to wait on)."""
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert condition()


# ------------------------------------------------------------------------------------------------ pure rules

@pytest.mark.parametrize("value, parsed", [
    ("3600/15m", (3600, 900)), ("600/1m", (600, 60)), ("30/15m", (30, 900)), ("150/1h", (150, 3600)),
    ("150/99999999h", (150, 3600)),  # an absurd window would hold the bucket for years: at most an hour
    ("10/30s", (10, 30)), ("10/30", (10, 30)), (" 3600 / 15m ", (3600, 900)),
    (None, None), ("", None), ("junk", None), ("3600", None), ("3600/", None), ("/15m", None), ("0/15m", None),
    ("3600/0m", None), ("-30/15m", None), ("3600/15d", None), ("3600/15mm", None), ("3600/1.5m", None),
])
def test_parse_rate_limit(value, parsed):
    assert parse_rate_limit(value) == parsed


@pytest.mark.parametrize("status, tokens, errors", [
    (200, 2, 0), (204, 2, 0), (304, 1, 0), (400, 5, 1), (404, 5, 1), (420, 5, 1), (422, 5, 1), (429, 0, 1),
    (500, 0, 1), (503, 0, 1), (0, 2, 1),  # a timeout: may have been answered, and counts as an error
])
def test_what_an_answer_costs(status, tokens, errors):
    assert (answer_cost(status), error_cost(status)) == (tokens, errors)


@pytest.mark.parametrize("limit, kept", [(3600, 72), (600, 12), (30, 4), (100, 4)])
def test_the_reserve_is_a_small_share_and_at_least_two_calls(limit, kept):
    assert reserve(limit) == kept


@pytest.mark.parametrize("reset", [0, 1, 37, 60])
def test_420_pauses_the_error_limit_until_the_reset(reset):
    pauses = pause_after(420, {"X-ESI-Error-Limit-Remain": "0", "X-ESI-Error-Limit-Reset": str(reset)}, NOW)
    assert set(pauses) == {ERROR_LIMIT_BUCKET}
    assert reset <= seconds(pauses[ERROR_LIMIT_BUCKET]) <= reset + 2


@pytest.mark.parametrize("retry_after", [1, 12, 900])
def test_429_pauses_the_bucket_for_retry_after(retry_after):
    pauses = pause_after(429, {"Retry-After": str(retry_after), "X-Ratelimit-Remaining": "0"}, NOW)
    assert set(pauses) == {ANSWERED_BUCKET}
    assert retry_after <= seconds(pauses[ANSWERED_BUCKET]) <= retry_after + 2


@pytest.mark.parametrize("status, header, bucket", [
    (420, "X-ESI-Error-Limit-Reset", ERROR_LIMIT_BUCKET), (429, "Retry-After", ANSWERED_BUCKET),
])
@pytest.mark.parametrize("value, low, high", [
    ("99999999999", MAX_PAUSE, MAX_PAUSE), ("1e300", MAX_PAUSE, MAX_PAUSE), ("901", MAX_PAUSE, MAX_PAUSE),
    ("inf", 60, 62), ("nan", 60, 62), ("-inf", 60, 62), ("soon", 60, 62), ("-5", 0, 2),
])
def test_a_pause_is_at_most_max_pause_and_an_unreadable_value_is_logged(caplog, status, header, bucket, value,
                                                                         low, high):
    pauses = pause_after(status, {header: value}, NOW)
    assert low <= seconds(pauses[bucket]) <= high
    assert MAX_PAUSE == 900
    if low == 60:
        assert header in caplog.text and repr(value) in caplog.text


def test_a_rate_limit_window_beyond_an_hour_is_logged(caplog):
    assert parse_rate_limit("10/2h") == (10, limits.MAX_WINDOW)
    assert "X-Ratelimit-Limit" in caplog.text


def test_420_and_429_without_their_headers_pause_about_a_minute():
    assert 60 <= seconds(pause_after(420, {}, NOW)[ERROR_LIMIT_BUCKET]) <= 62
    assert 60 <= seconds(pause_after(429, {}, NOW)[ANSWERED_BUCKET]) <= 62


@pytest.mark.parametrize("headers", [
    answer(remaining=0), answer(errors_remain=1), {}, {"X-Ratelimit-Limit": "junk", "X-Ratelimit-Remaining": "x"},
    {"X-ESI-Error-Limit-Remain": "junk", "X-ESI-Error-Limit-Reset": "junk"},
    CaseInsensitiveDict({"x-esi-error-limit-remain": "0", "x-ratelimit-remaining": "0"}),
])
def test_answers_other_than_420_and_429_pause_nothing_the_ledger_counts_them(headers):
    for status in (200, 304, 404, 502):
        assert pause_after(status, headers, NOW) == {}


# ------------------------------------------------------------------------------------------------ the ledger

def test_a_rested_bucket_is_spent_at_once_then_as_its_tokens_come_back(conn, process, clock):
    """600 tokens a minute: 300 calls go without a wait; the next goes exactly when the first second's tokens
    are back, one window after the second in which they were answered, and not before."""
    one = process()
    learn(one)                                    # call 1, answered at 12:00:00.25: booked in the second to 12:00:01
    for _ in range(299):
        one.settle(one.take(DETAIL), 200, answer())
    assert clock.waits == []
    assert spent(conn, DETAIL, clock)["own"] == 600
    one.take(DETAIL)                              # the 301st: waits for the first tokens to come back
    assert clock.now == datetime(2026, 11, 29, 12, 1, 1, tzinfo=UTC)
    assert sum(clock.waits) == pytest.approx(60.75)


def test_calls_in_flight_count_as_spent(conn, process, clock, monkeypatch):
    """Taken but not answered: the tokens are held; an answer cheaper than a 200 gives the difference back."""
    monkeypatch.setattr(limits, "MAX_INLINE_WAIT", 0.0)
    one = process()
    learn(one, "char-killmail:7", "30/15m")
    for _ in range(12):
        one.settle(one.take("char-killmail:7"), 200, answer("30/15m"))   # 26 of 30 spent
    walking = one.take("char-killmail:7")                                  # 28 with this page in flight
    with pytest.raises(Paused) as caught:                                  # a pilot's list bucket: retry queue
        one.take("char-killmail:7")
    assert caught.value.bucket == "char-killmail:7"
    one.settle(walking, 304, answer("30/15m"))                             # a 304 costs 1: 27
    walking = one.take("char-killmail:7")                                  # 29
    with pytest.raises(Paused):
        one.take("char-killmail:7")
    one.settle(walking, 503, answer("30/15m"))                             # a 5xx costs none: 27 again
    one.take("char-killmail:7")
    assert spent(conn, "char-killmail:7", clock, 900) == {"own": 27, "other": 0, "in_flight": 2}


def test_a_4xx_answer_costs_five_and_calls_in_flight_keep_room_for_it(conn, process, clock):
    """A 404 or 422 costs 5 where the call held 2: while others are in flight, each keeps 3 tokens of room."""
    one = process()
    learn(one)
    for _ in range(293):
        one.settle(one.take(DETAIL), 200, answer())                 # 588 of 600 spent
    first = one.take(DETAIL)                                        # 590 with one in flight
    second = one.take(DETAIL)                                       # 592 + 3 of room for the first's 4xx
    one.settle(first, 404, answer())                                # it was a 4xx: 5 tokens, not 2
    one.settle(second, 200, answer())
    assert spent(conn, DETAIL, clock) == {"own": 588 + 5 + 2, "other": 0, "in_flight": 0}
    one.take(DETAIL)                                                # 597: still fits, nothing else in flight
    assert clock.waits == []
    one.take(DETAIL)                                                # 599 + 3 room > 600: waits for an answer
    assert clock.waits and clock.waits[0] == limits.POLL


def test_every_process_and_host_of_one_egress_spends_one_bucket(conn, process, clock):
    one, other = process(egress="nat-1"), process(egress="nat-1")
    learn(one, "killmail@nat-1")
    for n in range(299):
        shared = (one, other)[n % 2]
        shared.settle(shared.take("killmail@nat-1"), 200, answer())
    assert clock.waits == []
    assert spent(conn, "killmail@nat-1", clock)["own"] == 600
    other.take("killmail@nat-1")
    assert sum(clock.waits) == pytest.approx(60.75)
    assert spent(conn, DETAIL, clock) == {"own": 0, "other": 0, "in_flight": 0}   # another egress: untouched


def test_what_esi_counts_beyond_the_ledger_is_booked_as_another_apps_and_a_reserve_is_kept(conn, process, clock):
    one = process()
    learn(one)
    one.settle(one.take(DETAIL), 200, answer(remaining=600 - 4 - 200))  # ESI: 200 more used than we spent
    assert spent(conn, DETAIL, clock) == {"own": 4, "other": 200, "in_flight": 0}
    calls = 0
    while not clock.waits:
        one.settle(one.take(DETAIL), 200, answer())
        calls += 1
    # 600 - 204 spent - the reserve kept while another app spends: those calls went without a wait.
    assert calls == (600 - 204 - reserve(600)) // 2 + 1


def test_esi_counting_less_than_the_ledger_books_nothing(conn, process, clock):
    """Our own calls in flight may not have reached ESI yet: only what is surely another app's is booked."""
    one = process()
    learn(one)
    flying = [one.take(DETAIL) for _ in range(10)]
    one.settle(flying[0], 200, answer(remaining=600 - 4))   # ESI has seen 2 of ours; the ledger holds 22
    assert spent(conn, DETAIL, clock)["other"] == 0


def test_a_killed_process_strands_its_calls_for_one_window_at_most(conn, process, clock):
    """Once its session is gone, its calls hold nothing in flight: their tokens stay spent until one window
    after they were sent (ESI charged them on arrival), their possible errors are dropped."""
    one = process()
    learn(one)
    for _ in range(40):
        one.take(DETAIL)                                   # sent, never answered: the process was killed
    one._conn.close()                                      # its session ends with it, leases and all
    later = process()
    small = {"limit_tokens": 83, "window_seconds": 60}     # seen as a bucket of 83, 2 + 40 calls fill it
    clock.sleep(59)
    assert later._take_once(DETAIL, small)[0] is None
    clock.sleep(2)                                         # a window after the second they were sent in: back
    assert later._take_once(DETAIL, small)[0] is not None
    assert [later._lease(1) for _ in range(90)] == [0.0] * 90   # the dead calls' 41 possible errors hold nothing
    assert later._lease(1) > 0                                   # 90 of ours in flight: the floor of a calm window
    assert spent(conn, DETAIL, clock)["in_flight"] == 2


def test_a_stopping_process_ends_its_wait(conn, process, clock):
    stopping = threading.Event()
    one = process(stopping=stopping)
    learn(one)
    for _ in range(299):
        one.settle(one.take(DETAIL), 200, answer())
    stopping.set()                                        # SIGTERM: a call facing a long wait gives up at once
    with pytest.raises(Paused, match="stopping"):
        one.take(DETAIL)
    assert clock.waits == []


def test_a_stopping_process_still_waits_out_a_short_wait(conn, process, clock):
    stopping = threading.Event()
    one = process(stopping=stopping)
    learn(one)
    for _ in range(299):
        one.settle(one.take(DETAIL), 200, answer())
    clock.sleep(60.75 - limits.STOP_WAIT / 2)             # the first tokens are back in half the stop's wait
    stopping.set()
    one.take(DETAIL)                                      # so the job finishes rather than going to the retry queue
    assert sum(clock.waits) == pytest.approx(60.75)


def test_a_backlog_spends_its_share_and_is_deferred_while_fresh_calls_spend_the_rest(conn, process, clock):
    one = process()
    learn(one)                                            # 600 tokens a minute
    backlog = 0
    with pytest.raises(limits.Deferred, match="backlog's share spent"):
        while backlog < 300:
            one.settle(one.take(DETAIL, backlog=True), 200, answer())
            backlog += 1
    assert sum(clock.waits) < limits.MAX_INLINE_WAIT      # deferred, not after a wait of a window
    assert backlog * limits.CALL_COST <= 600 * limits.BACKLOG_SHARE
    one.take(DETAIL)                                      # a fresh call still finds tokens, without waiting
    assert clock.waits == []


def test_an_answer_without_rate_limit_headers_lifts_the_default_limit(conn, process, clock):
    one = process()
    one.settle(one.take(DETAIL), 200, {"X-ESI-Error-Limit-Remain": "100"})  # ESI meters this group not
    assert one.take(DETAIL).tokens is None


def test_cancelled_waits_end_at_once_and_the_next_job_waits_again(conn, process, clock):
    one = process()
    learn(one)
    for _ in range(299):
        one.settle(one.take(DETAIL), 200, answer())
    one.cancel_waits()                                    # the job's deadline passed: no call waits any more
    with pytest.raises(Paused, match="stopped waiting"):
        one.take(DETAIL)
    assert clock.waits == []
    one.allow_waits()                                     # the next job waits for the tokens as before
    one.take(DETAIL)
    assert sum(clock.waits) == pytest.approx(60.75)


def test_a_process_waiting_for_a_spent_bucket_gives_back_the_error_slots_no_call_uses(conn, process, clock):
    one = process()
    learn(one)
    for _ in range(299):
        one.settle(one.take(DETAIL), 200, answer())
    kept = spent(conn, ERROR_LIMIT_BUCKET, clock)["in_flight"]  # the single slot kept for the next call
    one._lease(8)                                         # slots leased for calls that now wait for tokens
    assert spent(conn, ERROR_LIMIT_BUCKET, clock)["in_flight"] == kept + 8
    held: list[int] = []
    one.on_wait = lambda: held.append(spent(conn, ERROR_LIMIT_BUCKET, clock)["in_flight"])
    one.take(DETAIL)
    assert held and held[0] == 0                          # given back while the call waited, not after
    assert spent(conn, ERROR_LIMIT_BUCKET, clock)["in_flight"] == 1  # the call's own slot, once it had its tokens


def test_a_call_waiting_for_the_error_budget_gives_back_the_tokens_its_lease_holds(conn, process, clock):
    """Its tokens came from a lease of several calls; while the error budget keeps it waiting, the calls of that
    lease no thread uses go back to the ledger, where other processes' calls can spend them."""
    one = process()
    learn(one)
    for n in range(1, 51):                               # 50 errors: half the budget, no slot until they age
        one.settle(one.take("character"), 502, {"X-ESI-Error-Limit-Remain": str(100 - n)})
    one._wanting_tokens[DETAIL] = 5                       # five more threads on their way: a lease of six calls
    held: list[int] = []
    one.on_wait = lambda: held.append(spent(conn, DETAIL, clock)["in_flight"])
    ticket = one.take(DETAIL)
    assert held and held[0] == 0                          # nothing held while it waited, not 6 calls' tokens
    assert ticket.tokens is not None and spent(conn, DETAIL, clock)["in_flight"] > 0  # taken again once it could


def test_cancel_waits_ends_a_wait_under_way_in_another_thread(conn, process, clock):
    one = process(stopping=threading.Event())             # a worker's: it waits on the stop event, in real time
    learn(one)
    for _ in range(299):
        one.settle(one.take(DETAIL), 200, answer())
    waiting = threading.Event()
    one.on_wait = waiting.set                             # the ledger decreed a wait: the job is waiting
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            one.take(DETAIL)
        except Paused as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert waiting.wait(10)
    one.cancel_waits()
    caller.join(timeout=10)                               # ended within a RECHECK, not after the window
    assert not caller.is_alive()
    assert len(outcome) == 1 and "stopped waiting" in str(outcome[0])


# ------------------------------------------------------------------------------------------------ error budget

def test_calls_in_flight_leave_ten_errors_while_calm_and_half_the_budget_once_errors_come(conn, process, clock):
    """A route without a rate-limit bucket is still under the error limit: every call in flight may turn into an
    error. After a window without errors, 90 may be in flight (were all to fail at once, 10 are left: no 420);
    once an error came, no more than half the budget, errors and calls in flight together, over every process."""
    one, other = process(), process()
    assert [(one, other)[n % 2]._lease(1) for n in range(ERROR_LIMIT - limits.ERROR_CALM_FLOOR)] == [0.0] * 90
    assert one._lease(1) > 0 and other._lease(1) > 0
    for lease in one._leases + other._leases:                              # each a call in flight
        lease.used = 1
    failing = one._leases[0]
    one.settle(limits.Ticket("character", lease=failing), 502, {"X-ESI-Error-Limit-Remain": "99"})
    assert spent(conn, ERROR_LIMIT_BUCKET, clock) == {"own": 1, "other": 0, "in_flight": 89}
    one._end([lease.id for lease in one._leases[:41]], [])                # 41 more answers: 48 in flight
    assert other._lease(1) == 0.0                                          # 1 + 49 + 50: the floor, now half
    assert other._lease(1) > 0
    clock.sleep(limits.ERROR_WINDOW + 1)                                   # the error is a window old: calm again
    assert other._lease(1) == 0.0


def test_the_first_answer_showing_errors_closes_the_leases_taken_calm(conn, process, clock):
    """A calm lease's slots, handed out again after the errors came, would let the calm floor's 90 calls turn into
    errors one after another: once an answer shows errors, no new call goes on it, and a new lease is under the
    floor of half. A lease taken once errors were seen stays open."""
    one, other = process(), process()
    assert one._lease(limits.LEASE_SLOTS) == 0.0 and other._lease(limits.LEASE_SLOTS) == 0.0
    calm, quiet = one._leases[0], other._leases[0]
    assert calm.calm and calm.slots == limits.LEASE_SLOTS and calm.open(clock())
    calm.used = 2                                                          # two calls in flight on it
    one.settle(limits.Ticket("character", lease=calm), 502, {"X-ESI-Error-Limit-Remain": "99"})
    assert calm.closed and not calm.open(clock()) and calm in one._leases  # its last call still holds a slot
    one.settle(limits.Ticket("character", lease=calm), 200, {"X-ESI-Error-Limit-Remain": "99"})
    assert calm not in one._leases                                         # idle and closed: ended in the ledger
    assert quiet.open(clock())                                             # the other process saw no error yet
    quiet.used = 1
    other.settle(limits.Ticket("character", lease=quiet), 200, {"X-ESI-Error-Limit-Remain": "99"})
    assert quiet.closed                                                    # ESI counts errors: calm no more
    one.take("character")
    assert not one._leases[-1].calm and not one._leases[-1].closed


def test_errors_shrink_what_may_be_in_flight_until_they_age_out(conn, process, clock):
    one = process()
    for n in range(1, 11):  # the first answer is an error too: it tells the route has no rate-limit bucket
        one.settle(one.take("character"), 502, {"X-ESI-Error-Limit-Remain": str(100 - n)})
    for _ in range(40):
        one.take("character")                                   # 10 errors + 40 in flight: the floor
    assert clock.waits == []
    assert spent(conn, ERROR_LIMIT_BUCKET, clock) == {"own": 10, "other": 0, "in_flight": 40}


def test_errors_of_other_apps_behind_the_ip_count_too(conn, process, clock):
    one = process()
    one.settle(one.take("character"), 200, {"X-ESI-Error-Limit-Remain": "70"})   # 30 errors that are not ours
    # Its lease was taken calm: the answer that shows errors ends it (ESI did not count it, nor does the booking).
    assert spent(conn, ERROR_LIMIT_BUCKET, clock) == {"own": 0, "other": 30, "in_flight": 0}
    for _ in range(20):
        one.take("character")
    assert clock.waits == []
    one.take("character")                                       # 30 + 20 in flight: no more
    assert clock.waits


def test_errors_esi_counts_end_the_calm_even_when_the_calls_in_flight_could_be_them(conn, process, clock):
    """80 slots out, all in use, and ESI counts 40 errors: the ledger cannot tell them from our calls in flight,
    so it books none as another app's, but the window is no longer calm: the floor of half is back."""
    one, other = process(), process()
    for n in range(80):
        assert (one, other)[n % 2]._lease(1) == 0.0
    for lease in one._leases + other._leases:
        lease.used = 1
    one.settle(limits.Ticket("character", lease=one._leases[0]), 200, {"X-ESI-Error-Limit-Remain": "60"})
    # The answered call's lease was taken calm and is idle now: it ends; the 79 others still hold their calls.
    assert spent(conn, ERROR_LIMIT_BUCKET, clock) == {"own": 0, "other": 0, "in_flight": 79}
    assert other._lease(1) > 0                   # 79 in flight + 1 + 50 > 100, where a calm 10 would let it go


def test_an_sso_answer_is_no_esi_error(conn, process, clock):
    one = process()
    one.settle(one.take(SSO_BUCKET), 400, {})    # invalid_grant: SSO's, not under ESI's error limit
    one.settle(one.take(SSO_BUCKET), 0, {})
    assert spent(conn, ERROR_LIMIT_BUCKET, clock) == {"own": 0, "other": 0, "in_flight": 0}


def test_a_lost_connection_closes_the_leases_taken_on_it(conn, process, clock):
    """Their rows name the lost session, which other processes may take for a dead process's: no new call goes
    on them."""
    one = process()
    first = one.take("character")
    conn.execute("SELECT pg_terminate_backend(%s)", (one._conn.info.backend_pid,))
    second = one.take("character")               # its first query finds the connection lost, and reconnects
    assert first.lease.closed and second.lease is not first.lease


def test_a_short_error_budget_waits_briefly_for_the_slots_a_lease_holds(conn, process, clock):
    """Two leases of 15 slots are 30 calls in flight, not 2 rows: when errors among them leave the budget short,
    their other answers are near, and the wait is a poll, not the minute until the oldest error comes back."""
    one = process()
    for n in range(1, 21):
        one.settle(one.take("character"), 502, {"X-ESI-Error-Limit-Remain": str(100 - n)})   # 20 errors
    one._wanting = 15
    assert one._lease(15) == 0.0 and one._lease(15) == 0.0                 # 20 + 30 in flight: the floor
    one._wanting = 0
    for lease in one._leases:
        lease.used = 15
    for _ in range(5):                                                     # 5 of them fail
        one.settle(limits.Ticket("character", lease=one._leases[0]), 502, {"X-ESI-Error-Limit-Remain": "75"})
    assert one._lease(1) == pytest.approx(limits.POLL)   # 25 + 30 + 1 + 50 > 100, and 25 calls may free it


def test_a_call_held_too_long_by_the_error_budget_names_the_error_limit_not_its_bucket(conn, process, clock):
    """Half the error budget spent: a pilot's list call would wait a minute for an error slot. Its job goes to
    the retry queue, and what the log and the run's error say is the error limit: that pilot's own bucket is
    untouched."""
    one = process()
    for n in range(1, 51):
        one.settle(one.take("character"), 502, {"X-ESI-Error-Limit-Remain": str(100 - n)})   # 50 errors
    with pytest.raises(Paused, match=r"^error-limit spent for \d+ s"):
        one.take("char-killmail:90000001")


def test_a_backlog_calls_short_waits_for_the_error_budget_add_up_as_any_calls_do(conn, process, clock):
    """45 errors spent and ten slots held by another process's calls in flight (never answered here): the ledger
    answers short polls, since those calls may free slots. A backlog call polls like any call, beyond
    MAX_INLINE_WAIT in all, until the errors age out; it is deferred only for the backlog's share of its bucket,
    or a single long wait for the budget."""
    one, other = process(), process()
    for n in range(1, 46):
        one.settle(one.take("character"), 502, {"X-ESI-Error-Limit-Remain": str(100 - n)})   # 45 errors
    other._wanting = 10
    assert other._lease(10) == 0.0
    clock.waits.clear()
    assert one.take(DETAIL, backlog=True).lease is not None
    assert limits.MAX_INLINE_WAIT < sum(clock.waits) <= limits.ERROR_WINDOW + 1
    assert set(clock.waits) == {limits.POLL}


def test_a_backlog_call_gives_way_when_the_error_budget_is_spent_for_long(conn, process, clock):
    one = process()
    for n in range(1, 51):
        one.settle(one.take("character"), 502, {"X-ESI-Error-Limit-Remain": str(100 - n)})   # 50 errors
    with pytest.raises(limits.Deferred, match=r"^error-limit spent for \d+ s"):
        one.take(DETAIL, backlog=True)


def test_the_error_budget_is_per_egress(conn, process, clock):
    one, other = process(egress="nat-1"), process(egress="nat-2")
    for shared in (one, other):
        shared.settle(shared.take("character"), 200, {"X-ESI-Error-Limit-Remain": "100"})
    for _ in range(50):
        one.take("character")
        other.take("character")
    assert clock.waits == []


def test_threads_of_a_process_lease_error_slots_together_and_an_answer_without_error_costs_no_query(
        conn, process, clock, monkeypatch):
    """One thread asks for a lease while the ledger is busy; nineteen more come meanwhile: the first gets its
    one slot, the nineteen a lease of LEASE_SLOTS and one of the rest. Their answers (no error, on a route
    without a bucket) cost no query but the one that leaves a lease of several slots idle with no thread
    wanting one: it ends the lease. A single slot stays for the process's next call until it is closed."""
    shared = process()
    learn(shared, "character", "")                 # the route has no bucket; its lease ends
    clock.sleep(limits.LEASE_LIFE)
    shared.end_idle_leases()
    queries = []

    def counted(name):
        real = getattr(db, name)
        return lambda *args, **kwargs: queries.append(name) or real(*args, **kwargs)

    for name in ("take_tokens", "take_error_slots", "settle_tokens"):
        monkeypatch.setattr(db, name, counted(name))
    tickets = []

    def call():
        tickets.append(shared.take("character"))

    lock = "hashtextextended('esi:' || %s, 0)"
    threads = [threading.Thread(target=call) for _ in range(20)]
    with db.connect(conn.info.dsn) as busy:  # holds the error bucket's lock: the first lease waits in the ledger
        busy.execute(f"SELECT pg_advisory_lock({lock})", (ERROR_LIMIT_BUCKET,))
        threads[0].start()
        until(lambda: shared._leasing)
        for thread in threads[1:]:
            thread.start()
        until(lambda: shared._wanting == 20)
        busy.execute(f"SELECT pg_advisory_unlock({lock})", (ERROR_LIMIT_BUCKET,))
    for thread in threads:
        thread.join(10)
    assert len(tickets) == 20 and queries == ["take_error_slots"] * 3
    leases = {id(ticket.lease): ticket.lease for ticket in tickets}.values()
    assert sorted(lease.slots for lease in leases) == [1, 20 - 1 - limits.LEASE_SLOTS, limits.LEASE_SLOTS]
    assert spent(conn, ERROR_LIMIT_BUCKET, clock) == {"own": 0, "other": 0, "in_flight": 20}
    for ticket in tickets:
        shared.settle(ticket, 200, {"X-ESI-Error-Limit-Remain": "100"})
    assert queries == ["take_error_slots"] * 3 + ["settle_tokens"] * 2
    assert spent(conn, ERROR_LIMIT_BUCKET, clock)["in_flight"] == 1
    shared.end_idle_leases()                       # still young: the single slot takes new calls for LEASE_LIFE
    assert spent(conn, ERROR_LIMIT_BUCKET, clock)["in_flight"] == 1
    clock.sleep(limits.LEASE_LIFE)
    shared.end_idle_leases()                       # closed and idle: it ends
    assert queries[5:] == ["settle_tokens"]
    assert spent(conn, ERROR_LIMIT_BUCKET, clock)["in_flight"] == 0


def test_esis_count_of_errors_is_booked_when_it_moves_and_at_most_once_a_second_when_it_does_not(
        conn, process, clock, monkeypatch):
    """Every answer in a window that saw errors shows ESI's count until the window ends. The same count again has
    nothing new for the ledger: within a second it costs no query; a count that moved is booked at once."""
    one = process()
    learn(one, "character", "")                 # the route has no bucket: only its error slots are booked
    booked = []
    real = db.settle_tokens
    monkeypatch.setattr(db, "settle_tokens", lambda conn, now, *, ids, bookings: booked.extend(
        b.used for b in bookings if b.bucket == ERROR_LIMIT_BUCKET) or real(conn, now, ids=ids, bookings=bookings))

    def answers(count, remain):
        for _ in range(count):
            one.settle(one.take("character"), 200, {"X-ESI-Error-Limit-Remain": str(remain)})

    answers(10, 70)                              # 30 errors, not ours: booked once
    assert len(booked) == 1 and spent(conn, ERROR_LIMIT_BUCKET, clock)["other"] == 30
    answers(1, 65)                               # 5 more: booked at once
    assert len(booked) == 2 and spent(conn, ERROR_LIMIT_BUCKET, clock)["other"] == 35
    clock.sleep(limits.ERRORS_RECOUNT)
    answers(10, 65)                              # a second on: once more, with nothing new to book
    assert len(booked) == 3 and spent(conn, ERROR_LIMIT_BUCKET, clock)["other"] == 35
    one.settle(one.take("character"), 502, {"X-ESI-Error-Limit-Remain": "64"})  # our own error: booked
    assert len(booked) == 4 and spent(conn, ERROR_LIMIT_BUCKET, clock)["own"] == 1


def test_an_error_is_booked_when_it_comes_and_its_slot_is_not_handed_out_again(conn, process, clock):
    shared = process()
    shared.settle(shared.take("character"), 200, {"X-ESI-Error-Limit-Remain": "100"})
    first = shared.take("character")
    shared.settle(first, 502, {"X-ESI-Error-Limit-Remain": "99"})
    # The lease's one slot was spent by the error: the lease is over, ended with the error's booking.
    assert spent(conn, ERROR_LIMIT_BUCKET, clock) == {"own": 1, "other": 0, "in_flight": 0}
    second = shared.take("character")
    assert second.lease is not first.lease
    assert spent(conn, ERROR_LIMIT_BUCKET, clock) == {"own": 1, "other": 0, "in_flight": 1}




# ------------------------------------------------------------------------------------------------ token leases

def test_threads_of_a_process_lease_tokens_together_and_book_them_when_the_lease_ends(conn, process, clock,
                                                                                      monkeypatch):
    """One thread asks for tokens while the ledger is busy; nineteen more come meanwhile: the first gets its one
    call, the nineteen a lease of LEASE_CALLS and one of the rest, three queries in all. Their answers are booked
    once per lease, when its last call is answered, and the ledger counts exactly what they cost."""
    shared = process()
    learn(shared)                                  # 600 tokens a minute; its lease of one call ends with it
    queries = []
    real_take, real_settle = db.take_tokens, db.settle_tokens
    monkeypatch.setattr(db, "take_tokens", lambda *a, **k: queries.append("take") or real_take(*a, **k))
    monkeypatch.setattr(db, "settle_tokens",
                        lambda *a, **k: queries.append(("settle", sum(b.bucket == DETAIL for b in k["bookings"])))
                        or real_settle(*a, **k))
    tickets = []
    threads = [threading.Thread(target=lambda: tickets.append(shared.take(DETAIL))) for _ in range(20)]
    lock = "hashtextextended('esi:' || %s, 0)"
    with db.connect(conn.info.dsn) as busy:  # holds the bucket's lock: the first take waits in the ledger
        busy.execute(f"SELECT pg_advisory_lock({lock})", (DETAIL,))
        threads[0].start()
        until(lambda: queries == ["take"])
        for thread in threads[1:]:
            thread.start()
        until(lambda: shared._wanting_tokens.get(DETAIL) == 20)
        busy.execute(f"SELECT pg_advisory_unlock({lock})", (DETAIL,))
    for thread in threads:
        thread.join(10)
    leases = {id(ticket.tokens): ticket.tokens for ticket in tickets}.values()
    assert len(tickets) == 20 and queries.count("take") == 3
    assert sorted(lease.calls for lease in leases) == [1, 20 - 1 - limits.LEASE_CALLS, limits.LEASE_CALLS]
    assert spent(conn, DETAIL, clock) == {"own": 2, "other": 0, "in_flight": 40}
    for ticket in tickets[:-1]:
        shared.settle(ticket, 200, answer())
    shared.settle(tickets[-1], 404, answer())      # a 4xx: 5 tokens, within the room its lease kept
    booked = [query[1] for query in queries if query[0] == "settle" and query[1]]
    assert sorted(booked) == [1, 20 - 1 - limits.LEASE_CALLS, limits.LEASE_CALLS]  # one booking per lease
    assert spent(conn, DETAIL, clock) == {"own": 2 + 19 * 2 + 5, "other": 0, "in_flight": 0}


def test_a_backlog_call_never_spends_from_a_lease_taken_for_fresh_calls(conn, process, clock):
    """A fresh lease was taken without the backlog's floor: a backlog call on it would spend the share kept for
    fresh killmails. A lease taken under the floor serves fresh calls too."""
    shared = process()
    learn(shared)
    shared._wanting_tokens[DETAIL] = 3             # three more threads on their way: leases of four calls' worth
    fresh = shared.take(DETAIL)
    backlog = shared.take(DETAIL, backlog=True)
    assert fresh.tokens.calls == backlog.tokens.calls == 4 and backlog.tokens is not fresh.tokens
    assert shared.take(DETAIL, backlog=True).tokens is backlog.tokens
    assert shared.take(DETAIL).tokens is fresh.tokens
    fresh.tokens.started = fresh.tokens.calls      # the fresh lease is used up: a fresh call takes a backlog's
    assert shared.take(DETAIL).tokens is backlog.tokens


def spend_to(shared: SharedLimits, tokens: int) -> None:
    """Fresh calls answered 200 until the bucket (600 a minute, learnt) has `tokens` spent."""
    while spent_now(shared) < tokens:
        shared.settle(shared.take(DETAIL), 200, answer())


def spent_now(shared: SharedLimits) -> int:
    return shared._with_conn(lambda c: c.execute(
        "SELECT coalesce(sum(own + other), 0) AS n FROM esi_spent WHERE bucket = %s", (DETAIL,)).fetchone()["n"])


def test_a_lease_whose_life_is_over_ends_when_its_process_waits_rather_than_hold_every_call_polling(
        conn, process, clock):
    """A lease of four backlog calls, one used, kept open while other threads of the process wanted the bucket,
    then past its life: the ledger counts its three unused calls as in flight, and with the bucket a few tokens
    short of the backlog's floor it answers a short poll ("answers are about to give enough back"). No answer
    will: the process must end the lease itself, or every backlog call of every process polls until the spent
    tokens come back a window later."""
    shared = process()
    learn(shared)                                         # 600 tokens a minute; a backlog keeps 240 unspent
    spend_to(shared, 340)
    shared._wanting_tokens[DETAIL] = 3                    # three more threads on their way: a lease of four calls
    ticket = shared.take(DETAIL, backlog=True)
    assert ticket.tokens.calls == 4
    shared.settle(ticket, 200, answer())                  # kept: open, and wanted
    del shared._wanting_tokens[DETAIL]                    # the threads went elsewhere (their job ended)
    clock.sleep(limits.LEASE_LIFE)                        # its life is over with three calls unused
    clock.waits.clear()
    assert shared.take(DETAIL, backlog=True).tokens.calls == 1
    assert sum(clock.waits) <= limits.POLL                # one poll, not a window's worth of them
    assert spent(conn, DETAIL, clock)["own"] == 342       # the lease's one answer booked as it ended


def test_a_backlog_call_polling_for_answers_that_never_come_is_deferred_within_the_inline_wait(conn, process,
                                                                                           clock):
    """Another process holds a lease past its life and never ends it (its threads are stuck elsewhere): the
    ledger answers short polls. They add up, and the backlog call is deferred once their sum passes
    MAX_INLINE_WAIT, rather than poll for a window; a fresh call, under no floor, is not held at all."""
    one, other = process(), process()
    learn(one)
    spend_to(one, 340)
    other._wanting_tokens[DETAIL] = 3
    other.take(DETAIL, backlog=True)                      # four calls' tokens in flight, none ever answered
    with pytest.raises(limits.Deferred, match="backlog's share"):
        one.take(DETAIL, backlog=True)
    assert limits.MAX_INLINE_WAIT - 1 <= sum(clock.waits) <= limits.MAX_INLINE_WAIT + limits.RECHECK
    clock.waits.clear()
    one.take(DETAIL)
    assert clock.waits == []


def test_a_pilots_list_call_leaves_no_lease_and_no_count_behind(conn, process, clock):
    """One list call a job, a bucket per pilot: its lease ends with the answer (nobody else wants that bucket),
    and the process keeps nothing per pilot once the call is done (100,000 pilots pass through one process)."""
    shared = process()
    for character_id in range(1, 6):
        bucket = f"char-killmail:{character_id}"
        shared.settle(shared.take(bucket), 304, answer("30/15m"))
        assert spent(conn, bucket, clock, 900) == {"own": 1, "other": 0, "in_flight": 0}
    assert shared._token_leases == [] and shared._wanting_tokens == {}


def test_a_killed_processs_lease_stays_spent_a_window_past_its_last_possible_call(conn, process, clock):
    """Its calls may have gone out until LEASE_LIFE after the lease was taken, and ESI charged each on arrival:
    once its session is gone, the whole lease is spent from that last second, and back a window after it."""
    one = process()
    learn(one)                                             # 2 tokens, back at 12:01:01
    one._wanting_tokens[DETAIL] = 3
    assert one.take(DETAIL).tokens.calls == 4              # 8 tokens leased at 12:00:00.25
    one._conn.close()                                      # killed
    later = process()
    small = {"limit_tokens": 9, "window_seconds": 60}
    clock.sleep(61)                                        # 12:01:01.25: the learned call's tokens are back
    assert later._take_once(DETAIL, small)[0] is None      # the lease's 8 are not: its last call may be 5 s later
    clock.sleep(limits.LEASE_LIFE)
    assert later._take_once(DETAIL, small)[0] is not None


def test_a_detail_call_costs_a_fraction_of_a_round_trip_when_threads_share_leases(database_url, conn, clock):
    """Round trips of the limits connection per ESI call: 32 threads of one process fetching details (a 200 each,
    with ESI's rate-limit headers) share leases of tokens and of error slots."""
    executed = []

    class Counted:
        def __init__(self, connection):
            self._connection = connection

        def execute(self, *args, **kwargs):
            executed.append(args[0])
            return self._connection.execute(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._connection, name)

    shared = SharedLimits(lambda: Counted(db.connect(database_url, autocommit=True)))
    shared.open()

    def fetch(calls: int) -> None:
        for _ in range(calls):
            shared.settle(shared.take(DETAIL), 200, answer("3600/15m"))

    threads = [threading.Thread(target=fetch, args=(20,)) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    shared.close()
    assert spent(conn, DETAIL, clock, 900) == {"own": 32 * 20 * 2, "other": 0, "in_flight": 0}
    assert len(executed) / (32 * 20) < 0.5        # one call each was two round trips: a take and a settle


# ------------------------------------------------------------------------------------------------ pauses shared

def test_a_characters_pause_reaches_other_processes_and_is_read_once_for_all_characters(conn, database_url, clock,
                                                                                      monkeypatch):
    reads = []
    real_limit_state = db.limit_state
    monkeypatch.setattr(db, "limit_state", lambda *a, **k: reads.append(a[1]) or real_limit_state(*a, **k))

    def process() -> SharedLimits:
        return SharedLimits(lambda: db.connect(database_url, autocommit=True), clock=clock, sleep=clock.sleep)

    one, other = process(), process()
    one.settle(one.take("char-killmail:7"), 429, {"Retry-After": "20"})      # a 429 on pilot 7's list
    reads.clear()
    for character_id in range(1, 50):
        other.take(f"char-killmail:{character_id}")
    assert clock.waits == [21.0]                                            # only pilot 7 waits
    assert len(reads) <= 2                                                  # one read served all 49 pilots
    one.close()
    other.close()


def test_a_420_pauses_every_route_of_every_process(conn, process, clock, monkeypatch):
    monkeypatch.setattr(limits, "MAX_INLINE_WAIT", 5.0)
    one, other = process(), process()
    one.settle(one.take(DETAIL), 420, {"X-ESI-Error-Limit-Reset": "50"})
    with pytest.raises(Paused) as caught:
        other.take("char-killmail:9")
    assert 50 <= seconds(caught.value.until) <= 52


def test_a_bucket_not_answered_yet_is_spent_by_esis_default_limit_until_an_answer_corrects_it(conn, process, clock):
    shared = process()
    first, second = shared.take(DETAIL), shared.take(DETAIL)  # no call waits for another's answer
    assert first.tokens and second.tokens                     # both counted from the first call on (3600/15m)
    assert spent(conn, DETAIL, clock, 900)["in_flight"] == 4  # tokens: two calls of a 200 each
    shared.settle(first, 200, answer("1800/15m"))             # ESI says otherwise: its word is kept
    shared.settle(second, 200, answer("1800/15m"))
    (row,) = db.limit_state(conn, [DETAIL])
    assert (row["limit_tokens"], row["window_seconds"]) == (1800, 900)
    assert limits.DEFAULT_LIMITS[DETAIL] == (3600, 900)


def test_a_route_without_a_rate_limit_is_only_under_the_error_limit(conn, process, clock):
    shared = process()
    taken = shared.take("character")
    assert taken.tokens is None and taken.lease              # no limit it lacks, only an error slot
    shared.settle(taken, 200, {"X-ESI-Error-Limit-Remain": "100"})
    assert spent(conn, "character", clock)["in_flight"] == 0


def test_a_settle_the_database_refuses_loses_no_answer(conn, process, clock, monkeypatch, caplog):
    one = process()
    ticket = one.take(DETAIL)

    def refuse(*args, **kwargs):
        raise psycopg.OperationalError("the server closed the connection")

    monkeypatch.setattr(db, "settle_tokens", refuse)
    one.settle(ticket, 200, answer())         # the caller keeps its answer
    assert "could not settle" in caplog.text


def test_a_jobs_opening_statement_takes_its_list_bucket_only_while_neither_it_nor_the_error_limit_is_paused(
        process, clock):
    shared = process()
    owner = shared.owner_take("char-killmail:7")
    assert owner is not None and owner.take == limits.token_take("char-killmail:7", 30, 900)  # ESI's default
    assert shared.owner_take(DETAIL) is None          # a bucket every process shares is taken as it always was
    shared.pause("char-killmail:7", 60, status=429)
    assert shared.owner_take("char-killmail:7") is None and shared.owner_take("char-killmail:8") is not None
    shared.pause(ERROR_LIMIT_BUCKET, 60, status=420)
    assert shared.owner_take("char-killmail:8") is None
    clock.sleep(61)
    assert shared.owner_take("char-killmail:8") is not None

"""ESI's error limit and rate-limit buckets as one ledger shared by every worker process on every host, in
PostgreSQL.

ESI counts every answer's tokens against its bucket for exactly one window after they were spent (a floating
window), then gives them back. The ledger counts the same way: each call takes what it may cost before it goes
(calls in flight count as spent) and settles what the answer cost when it comes back. So a rested bucket is spent
at once, and a spent one as fast as its tokens return, never faster. What ESI's `X-Ratelimit-Remaining` shows
beyond the ledger (other apps behind the same IP) is booked too, and a small reserve is kept while they spend.

The error limit is a bucket of the same ledger: each call in flight holds one error it may turn into, and each
error answer is spent for a window. While errors come (any error in the window, ours or another app's), half of
ESI's 100 errors a window are never used: however many processes and threads there are, the calls in flight can
never take the error budget below half. After a window without any, up to 90 calls may be in flight: should
every one of them fail at once, 10 errors are still left, and the first error brings the half back: a process
closes the leases it took calm as soon as an answer shows errors, so no new call goes out on them. A process
leases those slots several at a time (one ledger row) and hands them to its threads, so that a call which ends
without an error costs the ledger nothing; errors are booked as they come. A 420 or a 429 still pauses the route
group for every process until its reset.

Rate-limit tokens are leased the same way (as YouTube's Doorman leases capacity to its clients): when several of
a process's threads are on their way to one bucket, it takes their calls' worth in one row, hands the calls out
for LEASE_LIFE at most, and books the answers together when the lease's last call is answered, each cost in the
second after its own answer. The ledger stays exact: the row holds every call of the lease, and the room for a
dearer answer, until its answers are booked.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import psycopg

import backoff
import db
from backoff import MAX_PAUSE
from esi import REQUEST_DEADLINE, SSO_BUCKET, Deferred, Paused

log = logging.getLogger(__name__)

ERROR_LIMIT_BUCKET = "error-limit"
ANSWERED_BUCKET = "answered-bucket"  # pause_after's name for the bucket of the call that got the 429

# ---------------------------------------------------------------------------------------------- the rule
# The whole rule, each line beside the fact of ESI.md ("Limits: two systems at once") it follows. schema.sql's
# section "ESI's limits: the rule" is the ledger that applies it (esi_take_calls does the arithmetic); token_take and
# error_take below hand it these numbers.
#
# Rate limit: a bucket per group, of `limit` tokens a floating `window` (X-Ratelimit-Limit, e.g. '3600/15m').
# Until an answer says otherwise, ESI's documented limits (below): a new database (or egress) spends from the
# first call as ESI will count it, with no call waiting for another's answer to learn them.
DEFAULT_LIMITS = {"killmail": (3600, 900),       # details: 3600 / 15 min per source IP (our egress)
                  "char-killmail": (30, 900),    # a character's recent list: 30 / 15 min per app + character
                  "corp-killmail": (30, 900)}    # a corporation's: the same, per app + director character
# An answer costs 2 (2xx), 1 (304), 5 (4xx), nothing (429, 5xx): answer_cost; a timeout what a 200 would. Its
# tokens are booked in the whole second after it and come back one window later, never before ESI's.
CALL_COST = 2              # what a call holds until its answer: the cost of a 200
HEADROOM = 3               # per call in flight: a 4xx costs 5 where the call holds the 2 of a 200
# A call goes when spent + in flight (cost and headroom each) + its cost + floor (+ reserve) <= limit. The floor
# is 0 for a fresh call. A backlog (killmails listed long ago, or in a pilot's first sync) may spend this share of
# a bucket: the rest is kept for fresh killmails. A rested detail bucket spent at once by a cold sync otherwise
# gives nothing back for a whole window (tokens return 15 minutes after they were spent), and new kills wait that
# long to be stored.
BACKLOG_SHARE = 0.6
RESERVE_SHARE = 0.02       # kept unspent while another app behind the IP spends the same bucket (it spends unseen
RESERVE_CALLS = 2          # between our answers), at least this many calls' tokens
# Error limit: at most 100 answers >= 400 (and timeouts) per window of about 60 s per IP; past it, 420s. A call
# in flight holds one slot (an error it may turn into); an error answer is spent for a window.
ERROR_LIMIT = 100          # ESI's error answers a window, per IP
ERROR_WINDOW = 60          # ESI's error window is fixed; the ledger's floating one never forgets an error sooner
ERROR_FLOOR = 50           # half of the error budget is never used once errors are coming, whatever is in flight
ERROR_CALM_FLOOR = 10      # while none came for a window: were every call in flight to fail at once, still no 420
# A 420 pauses every route until X-ESI-Error-Limit-Reset, a 429 its bucket until Retry-After (pause_after),
# for every process.
# ---------------------------------------------------------------------------------------------- end of the rule

MAX_WINDOW = 3600          # the longest rate-limit window believed
HOLD_MARGIN = 10           # seconds past a call's deadline that its possible error is still held
POLL = 0.05                # seconds before asking again when calls in flight may give tokens back
MAX_INLINE_WAIT = 30.0     # a longer wait fails the job into the retry queue rather than holding a process
MAX_SHARED_WAIT = 120.0    # the same for a bucket every process shares (the detail bucket), whose short waits
                           # are the pace of its tokens coming back, and long ones a bucket spent for minutes
STOP_WAIT = 10.0           # a stopping process still waits this long for tokens to finish its jobs
STATE_TTL = 1.0            # seconds a process trusts its last read of the shared pauses and limits
ERRORS_RECOUNT = 1.0       # seconds a process books ESI's unchanged error count at most once in (see _errors_news)
RECHECK = 1.0              # a call waiting for tokens looks at the pauses at least this often
WRITE_EVERY = 5.0          # seconds between routine writes of a bucket's remaining count (for the status page)
LEASE_SLOTS = 16           # at most this many error slots leased at once: one process never holds the whole budget
LEASE_CALLS = 16           # at most this many calls' tokens of one bucket leased at once, for the same reason
LEASE_LIFE = 5             # seconds a lease takes new calls; within HOLD_MARGIN, so its last call ends in its hold
LONGEST_READ = 300         # HTTP_TIMEOUT_SECONDS at most: the last read of a call may block that long past its deadline
# A lease's row counts this long at most: its last call starts within LEASE_LIFE and ends within its deadline and
# one last read.
ERROR_HOLD = int(LEASE_LIFE + REQUEST_DEADLINE + LONGEST_READ + HOLD_MARGIN)

_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_rate_limit(value: str | None) -> tuple[int, int] | None:
    """`X-Ratelimit-Limit` such as '3600/15m' as (tokens, window seconds); None when absent or unreadable."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*([smh]?)\s*", value or "")
    if not match:
        return None
    tokens, amount, unit = int(match[1]), int(match[2]), match[3] or "s"
    window = amount * _WINDOW_UNITS[unit]
    if window > MAX_WINDOW:  # ESI's windows are 15 minutes: an absurd one would hold the bucket for years
        log.warning("X-Ratelimit-Limit %r: window taken as %d s",
                    value[:40], MAX_WINDOW)  # type: ignore[index]  # it matched: a str
        window = MAX_WINDOW
    return (tokens, window) if tokens > 0 and window > 0 else None


def answer_cost(status: int) -> int:
    """Tokens an answer costs in ESI's rate-limit buckets: 2xx 2, 304 1, 4xx 5, 429 and 5xx nothing. A timeout
    (status 0) may have been answered after all: it costs what a 200 would."""
    if status == 0 or 200 <= status < 300:
        return 2
    if status == 304:
        return 1
    if status == 429 or status >= 500:
        return 0
    return 5 if 400 <= status < 500 else 0


def error_cost(status: int) -> int:
    """Errors an answer costs in ESI's error limit: any status from 400 on, and a timeout."""
    return 1 if status == 0 or status >= 400 else 0


def counts_errors(errors_remain: int | None) -> bool:
    """Whether an answer says ESI counts errors in its window (X-ESI-Error-Limit-Remain below the limit)."""
    return errors_remain is not None and errors_remain < ERROR_LIMIT


def reserve(limit_tokens: int) -> int:
    """Tokens kept back while another app spends the same bucket."""
    return max(RESERVE_CALLS * CALL_COST, int(limit_tokens * RESERVE_SHARE))


def token_take(bucket: str, limit: int, window: int, *, backlog: bool = False, calls: int = 1) -> db.TokenTake:
    """What a call (or a lease of `calls`) takes from a rate-limit bucket of `limit` tokens a `window`, by the
    rule: a backlog call leaves the share BACKLOG_SHARE does not give it to fresh calls."""
    return db.TokenTake(bucket, cost=CALL_COST, headroom=HEADROOM, limit=limit, window=window,
                        floor=limit - int(limit * BACKLOG_SHARE) if backlog else 0, reserve=reserve(limit),
                        calls=calls, life=LEASE_LIFE)


def error_take(bucket: str, slots: int = 1) -> db.SlotTake:
    """What a lease of `slots` calls takes from the error budget of one egress, by the rule."""
    return db.SlotTake(bucket, limit=ERROR_LIMIT, window=ERROR_WINDOW, hold=ERROR_HOLD, floor=ERROR_FLOOR,
                       calm_floor=ERROR_CALM_FLOOR, slots=slots)


def pause_after(status: int, headers: Any, now: datetime) -> dict[str, datetime]:
    """What an answer pauses for every process, and until when: the error limit (ERROR_LIMIT_BUCKET) on a 420,
    the bucket of the call answered (ANSWERED_BUCKET) on a 429 (a pure function of the answer and the clock)."""
    pauses: dict[str, datetime] = {}
    if status == 420:
        pauses[ERROR_LIMIT_BUCKET] = now + timedelta(seconds=_pause_seconds(headers, "X-ESI-Error-Limit-Reset"))
    if status == 429:
        pauses[ANSWERED_BUCKET] = now + timedelta(seconds=_pause_seconds(headers, "Retry-After"))
    return pauses


def _pause_seconds(headers: Any, name: str) -> float:
    """The pause a header asks for (backoff.pause_seconds: at most MAX_PAUSE, since pauses only grow and one absurd
    value would otherwise stop every process for years; a minute when absent or unreadable), a second more:
    ESI's reset is rounded."""
    return min(backoff.pause_seconds(headers.get(name), 60, header=name) + 1, MAX_PAUSE)


@dataclass(eq=False)
class _Lease:
    """Error slots one process took from the ledger in one row, handed to its calls one at a time."""

    id: int
    slots: int
    taken_at: datetime
    used: int = 0    # calls holding a slot now
    spent: int = 0   # slots whose call ended in an error: booked as spent, never handed out again
    closed: bool = False  # taken on a connection since lost (its row may soon look like a dead process's), or
    #                       taken calm and errors came since
    calm: bool = False  # taken while the process had seen no error for a window: it may hold the calm floor's

    def open(self, now: datetime) -> bool:
        """Whether the lease still takes new calls: a free slot, and young enough that its calls end in its hold."""
        return (not self.closed and self.used + self.spent < self.slots
                and (now - self.taken_at).total_seconds() < LEASE_LIFE)


@dataclass(eq=False)
class _TokenLease:
    """Rate-limit tokens one process took from the ledger in one row for up to `calls` calls of one bucket,
    handed to its calls one at a time. The answers' costs are kept here and booked together when it ends, each in
    the second after it came, so a call that does not end a lease costs the ledger nothing."""

    id: int
    bucket: str
    window: int
    calls: int
    taken_at: datetime
    backlog: bool      # taken under a backlog's floor: a fresh call may use it, and a backlog call only such a one
    started: int = 0   # calls handed out
    answers: list[tuple[float, int, int | None]] = field(default_factory=list)  # (when, cost, ESI's count)
    closed: bool = False  # taken on a connection since lost: its row may soon look like a dead process's
    by_job: bool = False  # taken by the job's opening statement, booked by its outcome statement (job_bookings)

    def open(self, now: datetime) -> bool:
        """Whether the lease still takes new calls: a call left, and young enough that ESI charges its last
        call within the row's hold (a window past LEASE_LIFE)."""
        return (not self.closed and self.started < self.calls
                and (now - self.taken_at).total_seconds() < LEASE_LIFE)

    def in_flight(self) -> int:
        """Calls handed out and not answered yet."""
        return self.started - len(self.answers)


class OwnerTake(NamedTuple):
    """A call's tokens of a job's own list bucket, for the job's opening statement to take (db.get_user_to_sync):
    the ledger's clock (None: the database's) and the take."""

    now: datetime | None
    take: db.TokenTake


@dataclass(frozen=True)
class Ticket:
    """What one call took from the ledger: a call of a lease of its bucket's tokens (none for a bucket without a
    rate limit) and its error slot (none for SSO)."""

    bucket: str
    tokens: _TokenLease | None = None
    lease: _Lease | None = None


class SharedLimits:
    """The shared limits for one process: takes and settles every call in the ledger, and reads the pauses and
    the buckets' limits through a short cache."""

    def __init__(self, connect: Callable[[], Any], *, egress: str = "",
                 clock: Callable[[], datetime] | None = None, sleep: Callable[[float], None] = time.sleep,
                 stopping: threading.Event | None = None):
        self._connect = connect
        self._stopping = stopping
        self._conn = None
        self._lock = threading.Lock()
        self._clock = clock or (lambda: datetime.now(UTC))
        # The ledger runs on the database's clock, one for every host (None), unless a test gives one.
        self._ledger_clock: Callable[[], datetime | None] = clock or (lambda: None)
        self._sleep = sleep
        self.error_bucket = f"{ERROR_LIMIT_BUCKET}@{egress}" if egress else ERROR_LIMIT_BUCKET
        self._state: dict[str, dict] = {}
        self._read_at: dict[str, float] = {}
        # Per-character buckets ('char-killmail:<id>') have a pause row only once paused: all paused ones are read
        # together, at most once per STATE_TTL, instead of one read per job.
        self._owner_pauses: dict[str, dict] = {}
        self._owners_read_at = -STATE_TTL
        self._written_at: dict[str, float] = {}
        # One thread per process and bucket group asks the ledger at a time (and waits, when the bucket is spent);
        # the process's other threads queue here, so waiting costs one query per process, not one per thread.
        self._take_locks: dict[str, threading.Lock] = {}
        # The process's leases of error slots; one thread at a time asks the ledger for a new one, for as many
        # slots as threads are waiting (`_wanting`), while the others wait on `_slots`.
        self._slots = threading.Condition()
        self._leases: list[_Lease] = []
        # Groups with a default limit whose answers came without one: ESI (or the stand-in) meters them not.
        self._unlimited: set[str] = set()
        self._wanting = 0
        # The process's leases of rate-limit tokens, and how many of its threads are on their way to a call of
        # each bucket (the size of its next lease); guarded by `_token_lock`, never held across a query.
        self._token_lock = threading.Lock()
        self._token_leases: list[_TokenLease] = []
        self._wanting_tokens: dict[str, int] = {}
        # Seconds on a clock that only moves forward, for how long ago an answer came (the test's clock if given).
        self._ticks = (lambda: clock().timestamp()) if clock else time.monotonic
        self._leasing = False
        # Set by cancel_waits (the job's deadline passed, or the worker stops): every wait of the process's calls
        # for the limits ends at once with Paused, until allow_waits (the next job).
        self._cancelled = threading.Event()
        self.on_wait: Callable[[], None] = lambda: None  # told of each wait the ledger decreed (a job's progress)
        self._errors_seen_at: datetime | None = None  # this process's last answer that showed ESI counting errors
        # ESI's count of errors this process booked last (its X-ESI-Error-Limit-Remain), and when (_errors_news).
        self._errors_booked: tuple[int | None, float] | None = None

    def cancel_waits(self) -> None:
        """End every wait of this process's calls for ESI's limits now (Paused), and refuse new ones."""
        self._cancelled.set()
        with self._slots:
            self._slots.notify_all()

    def allow_waits(self) -> None:
        """Let calls wait for ESI's limits again (a new job begins)."""
        self._cancelled.clear()

    def _check_cancelled(self, bucket: str) -> None:
        if self._cancelled.is_set():
            raise Paused(f"{bucket}: the job stopped waiting for ESI's limits", bucket=bucket, until=self._clock())

    def take(self, bucket: str, *, backlog: bool = False) -> Ticket:
        """Wait while the error limit or this bucket is paused or spent, then take what one call may cost.

        A backlog call (see BACKLOG_SHARE) spends only its share of the bucket and raises Deferred rather than wait
        longer than MAX_INLINE_WAIT for it.

        A pause (a 420 or 429) or a spent list bucket of one pilot's longer than MAX_INLINE_WAIT raises Paused,
        so the job goes to the retry queue; so does a wait for the shared detail bucket (its tokens come back a window
        after they were spent) or for the error budget longer than MAX_SHARED_WAIT. The bound is on the waits' sum.
        The stop of the process ends any wait with Paused."""
        if bucket == SSO_BUCKET:  # SSO is not under ESI's limits: only its own pause
            self._wait_out_pause(bucket, self._read([bucket]))
            return Ticket(bucket)
        group = _group(bucket)
        keys = [self.error_bucket, bucket, group] if group != bucket else [self.error_bucket, bucket]
        with self._slots:  # every thread on its way to a call counts, for the size of the next lease
            self._wanting += 1
        with self._token_lock:
            self._wanting_tokens[bucket] = self._wanting_tokens.get(bucket, 0) + 1
        try:
            with self._take_lock_held(group, bucket):
                return self._take_waiting(bucket, group, keys, self._read(keys), backlog=backlog)
        finally:
            with self._slots:
                self._wanting -= 1
            with self._token_lock:
                self._wanting_tokens[bucket] -= 1
                if not self._wanting_tokens[bucket]:  # one key per pilot's list bucket: none kept for long
                    del self._wanting_tokens[bucket]

    def _take_waiting(self, bucket: str, group: str, keys: list[str], state: list[dict], *,
                      backlog: bool = False) -> Ticket:
        """Take the call's ledger rows and error slot, sleeping through pauses and spent buckets (see take)."""
        waited = 0.0
        while True:
            self._wait_out_pause(bucket, state)
            ticket, wait = self._take_once(bucket, _row(state, group), backlog=backlog)
            short = bucket  # what the call waits for: its bucket's tokens, or an error slot
            if ticket is not None:
                short = self.error_bucket
                try:
                    lease, wait = self._error_slot()
                except BaseException:
                    with suppress(psycopg.Error):
                        self._end(*self._unstart(ticket.tokens))
                    raise
                if lease is not None:
                    return replace(ticket, lease=lease)
                self._end(*self._unstart(ticket.tokens))  # its tokens go back while it waits for the error budget
            if wait > POLL:
                # The bucket is spent, or the error budget short: this process's calls wait, and the error slots
                # and tokens it leased that no call uses would only keep other processes' calls waiting.
                ids, bookings = self._tokens_over(waiting=True)
                self._end(self._over(waiting=True) + ids, bookings)
            elif ticket is None:
                # The ledger answers a short wait while calls in flight may give tokens back, and counts this
                # process's leases whose life is over as in flight until they end: kept, they would hold every
                # process's calls (this one's too) polling for as long as no answer of theirs ends them.
                self._end(*self._tokens_over())
            # Short waits add up (answers in flight that never give enough back): the bound is on their sum. A
            # backlog yields its share of the bucket to fresh calls, and gives way to them when the error budget
            # is spent for long; its short waits for the budget (calls in flight freeing slots) are any call's.
            if backlog and (waited + wait if short == bucket else wait) > MAX_INLINE_WAIT:
                what = f"{bucket}: the backlog's share" if short == bucket else short
                raise Deferred(f"{what} spent for {waited + wait:.0f} s", bucket=bucket,
                               until=self._clock() + timedelta(seconds=wait))
            if waited + wait > (MAX_INLINE_WAIT if _per_owner(bucket) else MAX_SHARED_WAIT):
                # A spent bucket gives nothing back for minutes (its tokens return a window after they were
                # spent): the job goes to the retry queue rather than hold a process that other pilots' jobs
                # could use (their lists, their fresh kills in the share a backlog leaves).
                raise Paused(f"{short} spent for {waited + wait:.0f} s", bucket=bucket,
                             until=self._clock() + timedelta(seconds=wait))
            if waited == 0.0 and wait > POLL:
                log.info("ESI limits: %s spent, %.1f s until its tokens come back", short, wait)
            # Never longer than the state's life: a 420 or 429 seen elsewhere meanwhile holds this call back.
            nap = min(wait, RECHECK)
            self._nap(nap, bucket, left=wait)
            waited += nap
            state = self._read(keys)

    def _take_once(self, bucket: str, limit_row: dict, *, backlog: bool = False) -> tuple[Ticket | None, float]:
        """Take the call's tokens from the ledger: the ticket, or None and the seconds to wait."""
        limit, window = self._limit(bucket, limit_row)
        if not (limit and window):  # a bucket with no limit (ESI answered without one) is only under the error limit
            return Ticket(bucket), 0.0
        with self._token_lock:
            now = self._clock()
            # A lease taken under a backlog's floor serves any call; one taken for fresh calls no backlog call.
            tokens = next((lease for lease in self._token_leases if lease.bucket == bucket and lease.open(now)
                           and (lease.backlog or not backlog)), None)
            if tokens is not None:
                tokens.started += 1
                return Ticket(bucket, tokens), 0.0
            want = max(1, min(self._wanting_tokens.get(bucket, 0), LEASE_CALLS))
        taken = self._with_conn(lambda c: db.take_tokens(
            c, self._ledger_clock(), token_take(bucket, limit, window, backlog=backlog, calls=want), poll=POLL))
        if taken.id is None:
            return None, taken.wait
        tokens = _TokenLease(taken.id, bucket, window, taken.calls, self._clock(), backlog, started=1)
        with self._token_lock:
            self._token_leases.append(tokens)
        return Ticket(bucket, tokens), 0.0

    def _limit(self, bucket: str, limit_row: dict) -> tuple[int | None, int | None]:
        """The bucket's limit and window: as an answer gave them, else ESI's documented ones (None: no limit)."""
        limit, window = limit_row.get("limit_tokens"), limit_row.get("window_seconds")
        if not (limit and window) and _group(bucket) not in self._unlimited:
            limit, window = DEFAULT_LIMITS.get(_group(bucket), (None, None))
        return limit, window

    # ------------------------------------------------------------------------------------ a job's own list bucket

    def owner_take(self, bucket: str) -> OwnerTake | None:
        """What a job may take of its owner's list bucket ('char-killmail:<id>') in the statement that opens it: a
        call's tokens, as take would ask the ledger for them. Only the holder of the owner's lock calls that bucket,
        so the take and the booking (job_bookings) can ride on the job's own statements instead of two round trips
        of their own. None when take must ask as usual: the bucket or the error limit paused, or no limit known."""
        if not _per_owner(bucket):
            return None
        group = _group(bucket)
        state = self._read([self.error_bucket, bucket, group])
        until = _paused_until(state)
        limit, window = self._limit(bucket, _row(state, group))
        if (until and until > self._clock()) or not (limit and window):
            return None
        return OwnerTake(self._ledger_clock(), token_take(bucket, limit, window, calls=1))

    def prepaid(self, owner: OwnerTake, lease_id: int, calls: int) -> None:
        """The job's opening statement took the owner's list tokens (owner_take): its calls take them from here."""
        with self._token_lock:
            self._token_leases.append(_TokenLease(lease_id, owner.take.bucket, owner.take.window, calls, self._clock(),
                                                  backlog=False, by_job=True))

    def job_bookings(self) -> db.Settlement | None:
        """The leases the job's opening statement took, out of the process's hands, for its outcome statement to
        end and book (db.record_outcome). Should that statement fail, their rows count as in flight until their
        hold ends, a window after their last call: never less than ESI counts."""
        ids, bookings = self._take_out(lambda lease: lease.by_job and not lease.in_flight())
        return db.Settlement(self._ledger_clock(), ids, bookings) if ids else None

    def _unstart(self, tokens: _TokenLease | None) -> tuple[list[int], list[db.Booking]]:
        """A call that took its tokens does not go after all: they go back to its lease, which may be over."""
        if tokens is None:
            return [], []
        with self._token_lock:
            tokens.started -= 1
        return self._tokens_over()

    def _tokens_over(self, *, waiting: bool = False, idle: bool = False) -> tuple[list[int], list[db.Booking]]:
        """Take the token leases that are over out of the process's hands: their ids, and their answers to book.
        A lease with no call in flight is over once it takes no new call, or at once when no thread of the
        process wants its bucket (or all wait for a spent bucket): unused tokens held by one process are calls
        other processes cannot make. A job's own (prepaid) lease is its outcome's to book, unless the process is
        `idle`: the job ended without booking it (it failed)."""
        now = self._clock()
        return self._take_out(lambda lease: not lease.in_flight() and (
            idle if lease.by_job
            else (waiting or not lease.open(now) or not self._wanting_tokens.get(lease.bucket))))

    def _take_out(self, over_when: Callable[[_TokenLease], bool]) -> tuple[list[int], list[db.Booking]]:
        """Take the token leases that are over (`over_when`, asked under the lock) out of the process's hands: their
        ids, and their answers to book."""
        ticks = self._ticks()
        with self._token_lock:
            over = [lease for lease in self._token_leases if over_when(lease)]
            self._token_leases = [lease for lease in self._token_leases if lease not in over]
            # ESI does not count the calls this process still holds unused in its other leases; the ledger does.
            unused = {lease.bucket: 0 for lease in over}
            for lease in self._token_leases:
                if lease.bucket in unused:
                    unused[lease.bucket] += CALL_COST * (lease.calls - lease.started)
        bookings = [db.Booking(lease.bucket, cost, lease.window, None if used is None else used + unused[lease.bucket],
                               ago=max(0.0, ticks - at))
                    for lease in over for at, cost, used in lease.answers]
        return [lease.id for lease in over], bookings

    # ---------------------------------------------------------------------------------------------- error slots

    def _error_slot(self) -> tuple[_Lease | None, float]:
        """A slot of the error budget for one call: from a lease of this process's, or from a new lease of as many
        slots as its threads are waiting for, asked by one thread while the others wait for its answer. None and
        the seconds to wait when the budget is short."""
        while True:
            with self._slots:
                now = self._clock()
                lease = next((lease for lease in self._leases if lease.open(now)), None)
                if lease is not None:
                    lease.used += 1
                    return lease, 0.0
                if self._leasing:  # another thread is asking the ledger: its lease may serve this call too
                    self._check_cancelled(self.error_bucket)
                    self._slots.wait(RECHECK)
                    continue
                self._leasing = True
                want = max(1, min(self._wanting, LEASE_SLOTS))
            try:
                self._end(self._over(), [])
                wait = self._lease(want)
            finally:
                with self._slots:
                    self._leasing = False
                    self._slots.notify_all()
            if wait:
                return None, wait

    def _lease(self, want: int) -> float:
        """Ask the ledger for `want` error slots in one row (as many as fit, at least one): 0.0 once the lease
        is this process's, or the seconds until one slot would fit."""
        taken = self._with_conn(lambda c: db.take_error_slots(
            c, self._ledger_clock(), error_take(self.error_bucket, want), poll=POLL))
        if taken.id is None:
            return taken.wait
        with self._slots:
            now = self._clock()
            calm = self._errors_seen_at is None or (now - self._errors_seen_at).total_seconds() > ERROR_WINDOW
            self._leases.append(_Lease(taken.id, taken.calls, now, calm=calm))
        return 0.0

    def _end_the_calm(self) -> None:
        """An answer showed errors: the leases taken calm take no new call. They may hold up to the calm floor's
        90 slots, which kept being handed out while the errors came would take the budget below half; new leases
        are asked of the ledger, under its floor of half."""
        with self._slots:
            self._errors_seen_at = self._clock()
            for lease in self._leases:
                lease.closed = lease.closed or lease.calm

    def _give_back(self, lease: _Lease | None, *, error: bool = False) -> list[int]:
        """A call's error slot is free again (or spent, when its answer was an error); returns the leases that are
        over, to end in the ledger: closed, with no slot in use."""
        if lease is None:
            return []
        with self._slots:
            lease.used -= 1
            lease.spent += error
            self._slots.notify_all()
        return self._over()

    def _over(self, *, waiting: bool = False) -> list[int]:
        """Take the leases that are over out of the process's hands; their ids, to end in the ledger. A lease no
        call uses is over once closed, or at once when no thread of the process wants a slot: idle slots held by
        one process are calls other processes cannot make. One single slot stays open, for a process's calls one
        after another (a job's list pages)."""
        with self._slots:
            now = self._clock()
            idle = [lease for lease in self._leases if not lease.used]
            kept = [lease for lease in idle if lease.open(now)]
            if waiting:  # the process waits for a spent bucket's tokens: no call of its needs a slot soon
                kept = []
            elif not self._wanting:
                kept = [lease for lease in kept if lease.slots == 1][-1:]
            over = [lease for lease in idle if lease not in kept]
            self._leases = [lease for lease in self._leases if lease not in over]
        return [lease.id for lease in over]

    def end_idle_leases(self) -> None:
        """End the leases that are over: an idle process (no job) calls this, so that its last lease does not hold
        slots other processes could use until its row's hold ends."""
        try:
            ids, bookings = self._tokens_over(idle=True)
            self._end(self._over() + ids, bookings)
        except psycopg.Error as exc:
            log.warning("ESI limits: could not end the error leases (%s)", exc)

    def _unused_slots(self) -> int:
        """Error slots this process holds in the ledger that no call uses."""
        with self._slots:
            return sum(lease.slots - lease.used for lease in self._leases)

    def _end(self, ids: list[int], bookings: list[db.Booking]) -> None:
        """End these leases' rows in the ledger and book their answers (one round trip, when there are any)."""
        if ids or bookings:
            self._with_conn(lambda c: db.settle_tokens(c, self._ledger_clock(), ids=ids, bookings=bookings))

    def _nap(self, seconds: float, bucket: str, *, left: float) -> None:
        """Sleep. A stopping process (the `stopping` event set) finishes its jobs: it sleeps through a short wait
        (`left` seconds in all) and ends a long one with Paused, so that job goes to the retry queue. A cancelled
        one (cancel_waits) ends every wait at once."""
        self._check_cancelled(bucket)
        self.on_wait()
        if self._stopping is not None and self._stopping.is_set() and left > STOP_WAIT:
            raise Paused(f"{bucket}: the process is stopping", bucket=bucket, until=self._clock())
        if self._stopping is None or self._stopping.is_set():
            self._sleep(seconds)
        else:
            end = time.monotonic() + seconds
            # In steps of RECHECK at most, so that cancel_waits ends the wait as surely as a stop does.
            while not self._stopping.wait(max(0.0, min(RECHECK, end - time.monotonic()))):
                self._check_cancelled(bucket)
                if time.monotonic() >= end:
                    return
            if left - seconds > STOP_WAIT:
                raise Paused(f"{bucket}: the process is stopping", bucket=bucket, until=self._clock())
        self._check_cancelled(bucket)

    def settle(self, ticket: Ticket, status: int, headers: Any) -> None:
        """Book what the answer cost (a timeout is status 0) and feed its headers into the shared state."""
        limit = parse_rate_limit(headers.get("X-Ratelimit-Limit"))
        remaining = _int(headers.get("X-Ratelimit-Remaining"))
        try:
            errors_remain = _int(headers.get("X-ESI-Error-Limit-Remain"))
            if ticket.lease is not None and (error_cost(status) or counts_errors(errors_remain)):
                self._end_the_calm()  # before the slot goes back, so that a lease left idle ends with this answer
            ended = self._give_back(ticket.lease, error=error_cost(status) > 0)
            if ticket.tokens is not None:
                used = limit[0] - remaining if limit and remaining is not None and status != 429 else None
                with self._token_lock:
                    ticket.tokens.answers.append((self._ticks(), answer_cost(status), used))
            ids, bookings = self._tokens_over()
            self._settle_ledger(ticket, status, limit, errors_remain, ended + ids, bookings)
            self._record(ticket.bucket, status, headers, limit, remaining)
        except psycopg.Error as exc:
            # The answer is paid for and in hand: losing it would fetch it again. The call's rows in flight stop
            # counting when their hold ends.
            log.warning("ESI limits: could not settle a %s call (%s)", ticket.bucket, exc)

    def _settle_ledger(self, ticket: Ticket, status: int, limit: tuple[int, int] | None, errors_remain: int | None,
                       ids: list[int], bookings: list[db.Booking]) -> None:
        """One round trip, and only where there is something to book: the answers of the token leases that are
        over, the call's error, what ESI counts of errors beyond the ledger (when it counts any), and the leases'
        rows to end. A call of a lease that goes on costs the ledger nothing."""
        if limit and ticket.tokens is None:
            # The call that found its bucket's limit (a bucket not metered until now) spends from it.
            bookings = [*bookings, db.Booking(ticket.bucket, answer_cost(status), limit[1])]
        # An ESI call (SSO's are not counted): its own error, and ESI's count when it has news for the ledger.
        if ticket.lease is not None and (self._errors_news(errors_remain) or error_cost(status)):
            # The ledger counts this process's unused slots as in flight (idle ones, and those whose error is
            # booked besides); ESI does not see them.
            used = ERROR_LIMIT - errors_remain + self._unused_slots() if errors_remain is not None else None
            bookings = [*bookings, db.Booking(self.error_bucket, error_cost(status), ERROR_WINDOW, used)]
        self._end(ids, bookings)

    def _errors_news(self, errors_remain: int | None) -> bool:
        """Whether an answer's count of errors (ESI counts some in its window) is to be booked: it moved since
        this process booked it last, or a second has passed since. A window's errors show in every answer until
        it ends, and its count only grows until then: the same count again is nothing new, but for what the calls
        in flight of other processes hid at the last booking (see esi_settle), which a booking a second catches
        up on. Without this, every answer in the minute after one error anywhere behind the IP cost a query."""
        if not counts_errors(errors_remain):
            return False
        now = self._ticks()
        with self._slots:
            last = self._errors_booked
            if last is not None and last[0] == errors_remain and now - last[1] < ERRORS_RECOUNT:
                return False
            self._errors_booked = (errors_remain, now)
            return True

    def _record(self, bucket: str, status: int, headers: Any, limit: tuple[int, int] | None,
                remaining: int | None) -> None:
        """Pauses, a bucket's limit when it is new to this process, and now and then its remaining count."""
        group = _group(bucket)
        if limit is None and group in DEFAULT_LIMITS and (200 <= status < 300 or status == 304):
            self._unlimited.add(group)  # a later answer with the headers meters it again (see _take_once)
        elif limit is not None:
            self._unlimited.discard(group)
        pauses = pause_after(status, headers, self._clock())
        if ERROR_LIMIT_BUCKET in pauses:
            log.warning("ESI error limit spent (420): pausing every route until %s",
                        pauses[ERROR_LIMIT_BUCKET].isoformat())
            self._write(self.error_bucket, paused_until=pauses[ERROR_LIMIT_BUCKET], status=status,
                        remaining=_int(headers.get("X-ESI-Error-Limit-Remain")))
        if ANSWERED_BUCKET in pauses:
            log.warning("ESI bucket %s: 429, pausing until %s", bucket, pauses[ANSWERED_BUCKET].isoformat())
            self._write(bucket, paused_until=pauses[ANSWERED_BUCKET], status=status)
        known = self._state.get(group, {})
        changed = limit is not None and (known.get("limit_tokens"), known.get("window_seconds")) != limit
        due = time.monotonic() - self._written_at.get(group, 0.0) > WRITE_EVERY
        # A group's limit is written once (per character buckets all share it); the shared buckets' remaining
        # count now and then, for the status page.
        if changed or (due and group == bucket and remaining is not None):
            self._write(group, limit=limit, remaining=remaining if group == bucket else None, status=status)

    def pause(self, bucket: str, seconds: float, *, status: int) -> None:
        """Pause a bucket for every process (what no response header says, e.g. the app's rejected credentials)."""
        self._write(bucket, paused_until=self._clock() + timedelta(seconds=seconds), status=status)

    # ---------------------------------------------------------------------------------------------- state

    def _take_lock(self, group: str) -> threading.Lock:
        with self._lock:
            return self._take_locks.setdefault(group, threading.Lock())

    @contextmanager
    def _take_lock_held(self, group: str, bucket: str) -> Iterator[None]:
        """The group's take lock, waited for a RECHECK at a time so that cancel_waits ends the wait too."""
        lock = self._take_lock(group)
        while not lock.acquire(timeout=RECHECK):
            self._check_cancelled(bucket)
        try:
            yield
        finally:
            lock.release()

    def _wait_out_pause(self, bucket: str, state: list[dict]) -> bool:
        """Sleep through a short pause of these buckets (True if there was one); Paused for a long one."""
        now = self._clock()
        until = _paused_until(state)
        if not until or until <= now:
            return False
        wait = (until - now).total_seconds()
        if wait > MAX_INLINE_WAIT:
            raise Paused(f"{bucket} paused until {until.isoformat()}", bucket=bucket, until=until)
        log.info("ESI limits: %s paused for %.1f s", bucket, wait)
        self._nap(wait, bucket, left=wait)
        return True

    def _read(self, keys: list[str]) -> list[dict]:
        now = time.monotonic()
        stale = [k for k in keys if not _per_owner(k) and now - self._read_at.get(k, -STATE_TTL) >= STATE_TTL]
        owners_stale = any(_per_owner(k) for k in keys) and now - self._owners_read_at >= STATE_TTL
        if stale or owners_stale:
            with self._lock:
                since = self._clock() if owners_stale else None
                rows = self._with_conn(lambda c: db.limit_state(c, stale, paused_per_owner_at=since))
            for key in stale:
                self._state[key] = next((r for r in rows if r["bucket"] == key), {"bucket": key})
                self._read_at[key] = now
            if owners_stale:
                self._owner_pauses = {r["bucket"]: r for r in rows if _per_owner(r["bucket"])}
                self._owners_read_at = now
        return [self._owner_pauses.get(k, {"bucket": k}) if _per_owner(k) else self._state[k] for k in keys]

    def _write(self, bucket: str, *, limit: tuple[int, int] | None = None, remaining: int | None = None,
               paused_until: datetime | None = None, status: int | None = None) -> None:
        with self._lock:
            self._with_conn(lambda c: db.record_limit(
                c, bucket, limit_tokens=limit[0] if limit else None, window_seconds=limit[1] if limit else None,
                remaining=remaining, paused_until=paused_until, status=status))
        self._written_at[bucket] = time.monotonic()
        self._read_at.pop(bucket, None)  # read our own write (and everyone else's) next time
        if _per_owner(bucket):
            self._owners_read_at = -STATE_TTL
        if paused_until is not None:
            self._read_at.pop(self.error_bucket, None)

    def _with_conn(self, work: Callable[[Any], Any]) -> Any:
        """Run work on this process's autocommit connection, reconnecting once if it was lost. The process's
        threads share the connection: one that lost it closes only the connection it used, never a new one
        another thread has opened meanwhile."""
        for attempt in (1, 2):
            conn = self._conn
            if conn is None or conn.closed:
                conn = self._conn = self._connect()
            try:
                return work(conn)
            except psycopg.OperationalError:
                if self._conn is conn:
                    self._conn = None
                    # The leases' rows name the lost session: once a bucket is short, other processes take them
                    # for a dead process's. They take no new call; the calls holding their slots end as they do.
                    with self._slots:
                        for lease in self._leases:
                            lease.closed = True
                    with self._token_lock:
                        for tokens in self._token_leases:
                            tokens.closed = True
                conn.close()
                if attempt == 2:
                    raise

    def open(self) -> None:
        """Connect now (a child does before its first job) rather than on the first call's read."""
        self._with_conn(lambda conn: None)

    def close(self) -> None:
        """End the process's leases and close its limits connection."""
        with self._slots:
            ids, self._leases = [lease.id for lease in self._leases], []
        with self._token_lock:
            for tokens in self._token_leases:
                tokens.closed = True
        token_ids, bookings = self._tokens_over(idle=True)
        try:
            self._end(ids + token_ids, bookings)
        except psycopg.Error as exc:  # a dead session's rows stop counting once the budget is short
            log.warning("ESI limits: could not end the leases (%s)", exc)
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _row(state: list[dict], bucket: str) -> dict:
    """This bucket's row of the state read ({} when it has none)."""
    return next((s for s in state if s["bucket"] == bucket), {})


def _paused_until(state: list[dict]) -> datetime | None:
    """The latest pause end recorded in these buckets' state (past or not), None when none was ever paused."""
    return max((s["paused_until"] for s in state if s.get("paused_until")), default=None)


def _per_owner(bucket: str) -> bool:
    """A bucket of one character's (its list routes, '<group>:<character id>'), as opposed to one every caller
    shares (the detail bucket, 'killmail' or 'killmail@<egress>', whose egress may be an IPv6 address)."""
    group, colon, _ = bucket.partition(":")
    return bool(colon) and group in db.OWNER_BUCKET_GROUPS


def _group(bucket: str) -> str:
    """The key under which a bucket's limit is kept: a character's bucket shares its group's ('char-killmail')."""
    return bucket.partition(":")[0] if _per_owner(bucket) else bucket


def _int(value: Any) -> int | None:
    try:
        return int(float(value)) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None

"""ESI's error limit and rate-limit buckets as one state shared by every worker process, kept in PostgreSQL.

Every response's limit headers feed the state; every call first reads it. A 420, a 429 or a remaining count
under the safety margin pauses the bucket for all processes on all hosts until the reset, and the killmail
detail bucket is paced (a shared GCRA schedule) so that a backlog spends it smoothly instead of meeting a 429.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import db
from esi import SSO_BUCKET, Paused

log = logging.getLogger(__name__)

ERROR_LIMIT_BUCKET = "error-limit"
ERROR_MARGIN = 60          # pause every route while fewer than this many of the window's 100 errors are left:
                           # in-flight calls of every process still land, and half the budget stays unspent
PACE_SHARE = 0.95          # paced calls spend at most this share of a bucket per window
BURST_SHARE = 0.02         # a rested bucket may spend this share at once, on top of the paced rate
FLOOR_SHARE = 0.02         # below this share remaining, pause the bucket (other apps, our own 4xx costs)
FLOOR_TOKENS = 2           # ... and never below the cost of one more answer (a 200 costs 2 tokens)
MAX_INLINE_WAIT = 30.0     # a longer pause fails the job into the retry queue rather than holding a process
SLOT_RETRIES = 3           # a paced call paused this often while waiting for its slot gives up (Paused)
STATE_TTL = 1.0            # seconds a process trusts its last read of the shared state
FIRST_ANSWER_WAIT = 20.0   # at most this long a paced call waits for the first answer of a bucket not yet known
WRITE_EVERY = 5.0          # seconds between routine writes of a bucket's remaining count

_WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_rate_limit(value: str | None) -> tuple[int, int] | None:
    """`X-Ratelimit-Limit` such as '3600/15m' as (tokens, window seconds); None when absent or unreadable."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*([smh]?)\s*", value or "")
    if not match:
        return None
    tokens, amount, unit = int(match[1]), int(match[2]), match[3] or "s"
    window = amount * _WINDOW_UNITS[unit]
    return (tokens, window) if tokens > 0 and window > 0 else None


def detail_spacing(limit_tokens: int, window_seconds: int, *, cost: int = 2) -> float:
    """Seconds between paced calls so that, with a burst allowance, a bucket is never spent past its margin."""
    return cost * window_seconds / (limit_tokens * PACE_SHARE)


def burst_allowance(limit_tokens: int, *, cost: int = 2) -> int:
    """Calls a rested bucket may take at once; burst plus the paced rate stay above the floor."""
    return max(1, int(limit_tokens * BURST_SHARE / cost))


def pause_after(status: int, headers: Any, now: datetime, *, per_owner: bool = False) -> dict[str, datetime]:
    """Which buckets a response pauses, and until when (a pure function of the response and the clock);
    `per_owner` for a character's own bucket, spent in bursts rather than at a paced rate."""
    pauses: dict[str, datetime] = {}
    remain = _int(headers.get("X-ESI-Error-Limit-Remain"))
    reset = _int(headers.get("X-ESI-Error-Limit-Reset"))
    if status == 420 or (remain is not None and remain < ERROR_MARGIN):
        pauses[ERROR_LIMIT_BUCKET] = now + timedelta(seconds=(reset if reset is not None else 60) + 1)
    if status == 429:
        retry_after = _int(headers.get("Retry-After"))
        pauses["bucket"] = now + timedelta(seconds=(retry_after if retry_after is not None else 60) + 1)
    else:
        limit = parse_rate_limit(headers.get("X-Ratelimit-Limit"))
        remaining = _int(headers.get("X-Ratelimit-Remaining"))
        floor = max(limit[0] * FLOOR_SHARE, FLOOR_TOKENS) if limit else 0
        if limit and remaining is not None and remaining < floor:
            if per_owner:
                # A character's bucket is spent in bursts (a walk of pages): the tokens just spent may be all
                # that is missing, and they come back only a whole window later.
                pauses["bucket"] = now + timedelta(seconds=limit[1])
            else:
                # A big bucket spent at a paced rate: tokens come back as evenly as they went.
                pauses["bucket"] = now + timedelta(seconds=limit[1] * (floor - remaining) / limit[0])
    return pauses


class SharedLimits:
    """The shared limit state for one process, read through a short cache, written on what matters."""

    def __init__(self, connect: Callable[[], Any], *, clock: Callable[[], datetime] | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self._connect = connect
        self._conn = None
        self._lock = threading.Lock()
        self._pace_lock = threading.Lock()
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._sleep = sleep
        self._state: dict[str, dict] = {}
        self._read_at: dict[str, float] = {}
        # Per-character buckets ('char-killmail:<id>') have a row only once paused: all paused ones are read
        # together, at most once per STATE_TTL, instead of one read per job.
        self._owner_pauses: dict[str, dict] = {}
        self._owners_read_at = -STATE_TTL
        self._written_at: dict[str, float] = {}
        # Per paced bucket whose limit was not known, the first answer this process awaits (set once it came).
        self._first_answer: dict[str, threading.Event] = {}

    def before(self, bucket: str, *, pace: bool) -> None:
        """Wait while the error limit or this bucket is paused, then take a paced slot where asked."""
        keys = [bucket] if bucket == SSO_BUCKET else [ERROR_LIMIT_BUCKET, bucket]  # SSO is not under ESI's
        if not pace:
            self._wait_out_pause(bucket, self._read(keys))
            return
        # One paced call per process holds a slot it waits for; the process's other threads queue here. So the
        # shared schedule runs at most one slot per process ahead, however many detail threads a process has.
        with self._pace_lock:
            state = self._read(keys)
            if self._await_first_answer(bucket, state):
                state = self._read(keys)
            self._wait_out_pause(bucket, state)
            for _ in range(SLOT_RETRIES):
                if not self._wait_for_slot(bucket, state):
                    return
                # A 429 or 420 seen elsewhere while this call waited for its slot holds it back too; after the
                # pause it takes a new slot, so the calls held back do not all go at once when the pause ends.
                state = self._read(keys)
                if not self._wait_out_pause(bucket, state):
                    return
        raise Paused(f"{bucket} paused again and again while waiting for a slot", bucket=bucket,
                     until=self._clock() + timedelta(seconds=MAX_INLINE_WAIT))

    def _await_first_answer(self, bucket: str, state: list[dict]) -> bool:
        """While a paced bucket's limit is unknown (a new database, a new ESI_EGRESS name) and this process has
        had no answer from it, one call goes and the process's other calls wait for its answer, which tells the
        limit (pacing starts) or that the bucket has none. Otherwise every detail thread would start at once,
        unpaced. Called under the pace lock; True if it waited."""
        row = _row(state, bucket)
        waited = False
        while not row.get("limit_tokens"):
            asked = self._first_answer.get(bucket)
            if asked is None:  # this call asks
                self._first_answer[bucket] = threading.Event()
                break
            if asked.is_set():  # answered
                break
            waited = True
            if not asked.wait(FIRST_ANSWER_WAIT):
                self._first_answer.pop(bucket, None)  # no answer in time: this call asks instead
        return waited

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
        self._sleep(wait)
        return True

    def after(self, bucket: str, status: int, headers: Any) -> None:
        """Feed a response's limit headers into the shared state."""
        asked = self._first_answer.get(bucket)
        if asked is not None and not asked.is_set():
            if not status:  # a timeout tells nothing: the next call asks again
                self._first_answer.pop(bucket, None)
            asked.set()
        now = self._clock()
        pauses = pause_after(status, headers, now, per_owner=_per_owner(bucket))
        limit = parse_rate_limit(headers.get("X-Ratelimit-Limit"))
        remaining = _int(headers.get("X-Ratelimit-Remaining"))
        known = self._state.get(bucket, {})
        due = time.monotonic() - self._written_at.get(bucket, 0.0) > WRITE_EVERY
        changed = limit is not None and (known.get("limit_tokens"), known.get("window_seconds")) != limit
        if ERROR_LIMIT_BUCKET in pauses:
            log.warning("ESI error limit nearly spent: pausing every route until %s",
                        pauses[ERROR_LIMIT_BUCKET].isoformat())
            self._write(ERROR_LIMIT_BUCKET, paused_until=pauses[ERROR_LIMIT_BUCKET], status=status,
                        remaining=_int(headers.get("X-ESI-Error-Limit-Remain")))
        if "bucket" in pauses:
            log.warning("ESI bucket %s: pausing until %s (status %s)", bucket, pauses["bucket"].isoformat(), status)
        # Per-character list buckets are only written when they pause: one row per pilot and a write per list
        # call would cost more than they tell. Shared buckets (details) keep their limit for pacing.
        routine = not _per_owner(bucket) and (changed or (due and (limit or remaining is not None)))
        if "bucket" in pauses or routine:
            self._write(bucket, limit=limit, remaining=remaining, paused_until=pauses.get("bucket"), status=status)

    def pause(self, bucket: str, seconds: float, *, status: int) -> None:
        """Pause a bucket for every process (what no response header says, e.g. the app's rejected credentials)."""
        self._write(bucket, paused_until=self._clock() + timedelta(seconds=seconds), status=status)

    # ---------------------------------------------------------------------------------------------- state

    def _wait_for_slot(self, bucket: str, state: list[dict]) -> bool:
        """Take the bucket's next shared slot and sleep until it; True if that meant waiting."""
        row = _row(state, bucket)
        if not row.get("limit_tokens") or not row.get("window_seconds"):
            return False  # no limit seen yet for this bucket: nothing to pace against
        spacing = detail_spacing(row["limit_tokens"], row["window_seconds"])
        # After a pause the bucket is not rested: the schedule starts again, paced, where the pause ended.
        not_before = _paused_until(state)
        with self._lock:
            slot = self._with_conn(lambda c: db.reserve_slot(c, bucket, self._clock(), spacing=spacing,
                                                              burst=burst_allowance(row["limit_tokens"]),
                                                              not_before=not_before))
        wait = (slot - self._clock()).total_seconds()
        if wait > 0:
            self._sleep(wait)
        return wait > 0

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
            self._read_at.pop(ERROR_LIMIT_BUCKET, None)

    def _with_conn(self, work: Callable[[Any], Any]) -> Any:
        """Run work on this process's autocommit connection, reconnecting once if it was lost."""
        for attempt in (1, 2):
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            try:
                return work(self._conn)
            except db.psycopg.OperationalError:
                self._conn = None
                if attempt == 2:
                    raise

    def open(self) -> None:
        """Connect now (a child does before its first job) rather than on the first call's read."""
        self._with_conn(lambda conn: None)

    def close(self) -> None:
        """Close the process's limits connection."""
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
    return bucket.partition(":")[0] in db.OWNER_BUCKET_GROUPS


def _int(value: Any) -> int | None:
    try:
        return int(float(value)) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None

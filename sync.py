"""One sync job as plain functions: lock, token, list, references, details, save, record. Nothing from pika here."""
from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

import db
import names
import values
from esi import (
    INVALID_CLIENT_PAUSE,
    Deferred,
    ErrorLimited,
    EsiClient,
    EsiError,
    Forbidden,
    InvalidClient,
    InvalidGrant,
    InvalidHash,
    NotModified,
    Paused,
    RateLimited,
    Unauthorized,
    list_bucket,
    token_scopes,
)
from killmail_model import InvalidKillmail, Killmail, named_ids, parse_killmail
from tokens import TokenKeyError, TokenVault

log = logging.getLogger(__name__)

REFRESH_MARGIN = timedelta(seconds=60)  # refresh a little before expiry, never after a failed call
PROFILE_MAX_AGE = timedelta(days=1)     # how often a pilot's corporation is read again
SWEEP_LIMIT = 20                        # stranded references one sweep fetches at most
CLAIM_SECONDS = 6 * 3600                # a claim holds while its process lives (a dead one's lapse at once);
                                        # this bound only guards against a reused backend pid
SAVE_BATCH = 50                         # killmails per insert transaction at the most
SAVE_EVERY = 1.0                        # seconds a fetched killmail waits for its batch at the most: a killed
                                        # process loses (and its redelivered job fetches again) only that much
TICK = 1.0                              # seconds between a waiting job's looks at its deadline and at a stop
FINISH_WAIT = 10.0                      # seconds an interrupted job waits for the fetches already under way: a
                                        # stop's grace is 30 s, and a fetch past this is fetched again later
REDELIVERED_LOCK_WAIT = 5.0             # seconds a redelivered job waits for its owner's lock: the holder is most
                                        # likely the session of the process that had the job, ending as it died
VALUE_BATCH = 200                       # killmails saved without a value (no prices then) one job values at most


class JobFailed(Exception):
    """A job that ended without syncing. `result` is what its run did until then, for its sync_runs row: set
    as the error leaves the run's locks, None when it failed before it took them."""

    def __init__(self, message: str):
        super().__init__(message)
        self.result: SyncResult | None = None


class JobError(JobFailed):
    """A job that could not finish now; the worker retries it later with backoff, and not before `retry_after`
    seconds when ESI or SSO said how long to wait."""

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class PermanentJobError(JobFailed):
    """A job that can never succeed as sent (unknown user, bad message); never retried."""


class JobInterrupted(JobError):
    """A job the stopping worker ended early: what it fetched is saved, the rest released, and the job goes back
    to the queue as it was (no attempt counted)."""


@dataclass
class SyncResult:
    """What one job did; becomes a sync_runs row."""

    character_id: int
    character_name: str | None = None
    corporation_id: int | None = None
    kind: str = "character"     # whose killmails: a 'character' or a 'corporation' (the run's owner), or 'sweep'
    status: str = "ok"
    listed: int = 0
    new: int = 0
    saved: int = 0
    skipped: int = 0
    failed: int = 0
    esi_calls: int = 0
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempt: int = 1
    worker: str | None = None
    # Listed killmails this pilot (or corporation) was not linked to before: it is active, even when another
    # job stored those killmails first (or when a retried job's first try stored the links). Drives the slower
    # polling of quiet pilots, with `saved`.
    linked_new: int = field(default=0, repr=False)
    # Ids shown beside the killmails this run saved, named in one call once they are saved.
    name_ids: set[int] = field(default_factory=set, repr=False)
    # The ETag and Expires of a list answered 304, not yet written: the run's end writes them with its row.
    list_cache: tuple[str | None, datetime | None] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SyncOptions:
    """How a job runs: its limit on retries, the clock, and whether to ignore stored ETags."""

    max_attempts: int = 8
    full: bool = False
    attempt: int = 1
    worker: str | None = None
    notify_max_age: int = 3600          # NOTIFY_MAX_AGE_SECONDS: older new killmails are announced nowhere
    namer: Any = None                   # a Namer takes the ids to name; None: the job names them itself
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    deadline: float | None = None       # time.monotonic() by which the job gives up (JOB_DEADLINE_SECONDS)
    stop_by: Callable[[], float | None] = lambda: None  # once the worker stops: by when (time.monotonic()) the
                                        # job ends early, saving what it has, to leave within the stop's grace
    progress: Callable[[], None] = lambda: None  # told of each fetched killmail and each saved batch
    cancel_waits: Callable[[], None] = lambda: None  # ends the waits of the job's calls for ESI's limits
    finish_wait: float = FINISH_WAIT    # seconds an interrupted job waits for the fetches under way
    lock_wait: float = 0.0              # seconds the job waits for its owner's lock; 0: skipped if it is held
    tokens: TokenVault = TokenVault()   # seals and opens refresh tokens at rest (TOKEN_KEY)
    # The market prices: one book per process (the worker's child holds it), loaded once and refreshed when ESI's
    # Expires passes; a caller that passes none gets one book for every call of this process without options.
    prices: values.PriceBook = field(default_factory=values.PriceBook)


@dataclass(frozen=True)
class Owner:
    """Whose killmail list a run reads (a pilot's own, or a corporation's), with whose token, and what the last
    read of it left."""

    kind: str                           # 'character' or 'corporation', as SyncResult.kind
    id: int                             # the character's or the corporation's id
    reader_id: int                      # whose token reads the list: the pilot itself, or a director
    list_etag: str | None               # the stored list's ETag and Expires (its users or corporations row)
    list_expires_at: datetime | None
    synced_at: datetime | None = None   # its last sync's end: references first seen since are fresh

    @classmethod
    def pilot(cls, user: dict) -> Owner:
        """A pilot's own list, read with its own token."""
        return cls("character", user["character_id"], user["character_id"], user["list_etag"],
                   user["list_expires_at"], user.get("last_sync_at"))

    @classmethod
    def corporation(cls, corporation: dict, director: dict) -> Owner:
        """A corporation's list, read with one of its directors' tokens."""
        return cls("corporation", corporation["corporation_id"], director["character_id"],
                   corporation["list_etag"], corporation["list_expires_at"], corporation.get("last_sync_at"))


@dataclass(slots=True)
class Job:
    """What every step of one run shares: its connection and ESI client, the job's `now`, how it runs, what it
    did so far, the locks it holds (emptied once the run's end let them go), and whose list it reads."""

    conn: db.Connection
    esi: EsiClient
    now: datetime
    options: SyncOptions
    result: SyncResult
    locks: list[tuple[int, int]] = field(default_factory=list)  # none in a sweep
    owner: Owner | None = None          # set once the owner's row is read under the locks; none in a sweep


def needs_refresh(expires_at: datetime | None, now: datetime) -> bool:
    """Whether an access token must be refreshed before use (absent, expired, or expiring within a minute)."""
    return expires_at is None or expires_at <= now + REFRESH_MARGIN


def list_is_fresh(expires_at: datetime | None, now: datetime, *, full: bool) -> bool:
    """Whether the stored list is still inside ESI's Expires, so asking again would circumvent the cache."""
    return not full and expires_at is not None and expires_at > now


def sync_character(conn: db.Connection, esi: EsiClient, character_id: int, now: datetime, *,
                   options: SyncOptions = SyncOptions()) -> SyncResult:
    """Sync one pilot's kills and losses, holding its lock; returns the result already recorded in sync_runs."""
    result = SyncResult(character_id, started_at=now, attempt=options.attempt, worker=options.worker)
    locks = _lock(conn, [(db.LOCK_CHARACTER, character_id)], wait=options.lock_wait)
    if locks is None:
        # Its own run (a duplicate job) or its corporation's run with its token holds the lock: free the user
        # for the next producer run, or the claim would keep it unsynced until the claim goes stale.
        log.info("  🔒 %s is being synced by another process; skipping", character_id)
        db.release_user(conn, character_id)
        record_failed_run(conn, esi, result, "being synced by another process", status="locked")
        return result
    job = Job(conn, esi, now, options, result, locks)
    with _locked_run(job):
        _sync_character_locked(job, character_id)
    return result


def sync_corporation(conn: db.Connection, esi: EsiClient, corporation_id: int, character_id: int, now: datetime, *,
                     options: SyncOptions = SyncOptions()) -> SyncResult:
    """Sync a corporation's kills and losses with a director's token, holding the corporation's and the
    director's locks (the token may be refreshed); returns the recorded result."""
    result = SyncResult(character_id, corporation_id=corporation_id, kind="corporation", started_at=now,
                        attempt=options.attempt, worker=options.worker)
    locks = _lock(conn, [(db.LOCK_CORPORATION, corporation_id), (db.LOCK_CHARACTER, character_id)],
                  wait=options.lock_wait)
    if locks is None:
        # The director's own sync (or this corporation's) is running: free the corporation for the next run.
        log.info("  🔒 corporation %s or its director is being synced; skipping", corporation_id)
        db.release_corporation(conn, corporation_id)
        record_failed_run(conn, esi, result, "corporation or director being synced by another process",
                          status="locked")
        return result
    job = Job(conn, esi, now, options, result, locks)
    with _locked_run(job):
        _sync_corporation_locked(job, corporation_id, character_id)
    return result


@contextmanager
def _locked_run(job: Job) -> Iterator[None]:
    """A run under the locks just taken: it starts and, should it fail, ends while they are held, so runs of one
    owner never overlap in sync_runs; the locks are let go however it ends."""
    result = job.result
    result.started_at = max(result.started_at, job.options.clock())  # type: ignore[type-var]  # set as a job starts
    try:
        yield
    except JobFailed as exc:
        exc.result = result
        result.finished_at = job.options.clock()  # a run that succeeds is stamped by _finish, also under the locks
        raise
    finally:
        _release(job.conn, job.locks)


def _lock(conn: db.Connection, keys: list[tuple[int, int]], *, wait: float = 0.0) -> list[tuple[int, int]] | None:
    """Take every lock, each a (namespace, key) pair, or none; None when another process holds one of them (for
    up to `wait` seconds each)."""
    taken = []
    with db.autocommitted(conn):  # session locks, one statement each: no transaction to hold them in
        for namespace, key in keys:
            if not (db.wait_lock(conn, namespace, key, timeout=wait) if wait
                    else db.try_lock(conn, namespace, key)):
                break
            taken.append((namespace, key))
        else:
            return taken
    _release(conn, taken)
    return None


def _release(conn: db.Connection, locks: list[tuple[int, int]]) -> None:
    if not locks or conn.closed or conn.broken:
        return  # released by _finish already, or died with the session
    try:
        conn.rollback()
        for namespace, key in reversed(locks):
            db.unlock(conn, namespace, key)
        conn.commit()
    except psycopg.Error:
        log.warning("could not release the locks %s; they end with the connection", locks)


def _sync_character_locked(job: Job, character_id: int) -> None:
    conn, result, limits = job.conn, job.result, job.esi.limits
    # The list call's tokens are taken by the same statement when the list is due: only this lock's holder calls
    # the pilot's list bucket, and a warm poll's ledger then costs no round trip of its own (see _finish).
    take = limits.owner_take(list_bucket("char-killmail", character_id))
    with db.autocommitted(conn):  # read after the lock: a run that held it has committed all it wrote
        user = db.get_user_to_sync(conn, character_id, job.now, max_attempts=job.options.max_attempts, take=take,
                                   full=job.options.full)
    if user is None:
        raise PermanentJobError(f"unknown character {character_id}: no such user")
    if take is not None and user["ledger_id"] is not None:
        limits.prepaid(take, user["ledger_id"], user["ledger_calls"])
    result.character_name = user["character_name"]
    token = _live_token(job, user)
    if token is not None:
        _learn_profile(job, user, token)
        job.owner = Owner.pilot(user)
        try:
            _list_references(job, token)
        except Forbidden as exc:
            # The token lacks the killmail scope: asking again only spends the error limit. A new login fixes it.
            if db.mark_revoked(conn, character_id, user["refresh_token"], f"killmail list forbidden: {exc}"):
                result.status = "needs_relogin"
            else:  # the web app wrote a new login meanwhile: its grant may have the scope; the next run asks
                result.status = "error"
            conn.commit()
            result.error = str(exc)
        else:
            # Nothing listed anew and nothing left pending (a warm poll, most of them): nothing to fetch, and the
            # run's outcome is its one write.
            if result.list_cache is None or user["refs_pending"]:
                fetch_killmails(job)
    _finish(job)


def _sync_corporation_locked(job: Job, corporation_id: int, character_id: int) -> None:
    conn, result = job.conn, job.result
    corporation = db.get_corporation(conn, corporation_id)
    user = db.get_user(conn, character_id)
    conn.commit()
    if corporation is None or user is None:
        raise PermanentJobError(f"unknown corporation {corporation_id} or director {character_id}")
    result.character_name = user["character_name"]
    log.info("  🏢 Corporation %s through %s", corporation_id, user["character_name"] or character_id)
    token = _live_token(job, user)
    if token is not None:
        job.owner = Owner.corporation(corporation, director=user)
        try:
            _list_references(job, token)
        except Forbidden as exc:
            # The Director role is gone (or never was): another eligible member is tried on the next run.
            db.set_director(conn, character_id, False, checked_at=job.now)
            conn.commit()
            result.status, result.error = "forbidden", str(exc)
            log.warning("  🏢 %s may not read corporation %s's killmails: %s", user["character_name"],
                        corporation_id, exc)
        else:
            if not user["is_director"]:  # learned once: only a 403 says otherwise, and it is written then
                db.set_director(conn, character_id, True, checked_at=job.now)
            fetch_killmails(job)
    _finish(job)


def _live_token(job: Job, user: dict) -> str | None:
    """A usable access token, or None (and the result says why) when the user needs a new login."""
    if user["revoked"]:
        job.result.status = "needs_relogin"
        log.info("  🔑 %s needs a new login; skipping", user["character_name"] or user["character_id"])
        return None
    return _usable_token(job, user)


def _learn_profile(job: Job, user: dict, token: str) -> None:
    """Keep the pilot's token scopes and (daily, for directors) its corporation, which corporation syncs need."""
    scopes = " ".join(token_scopes(token)) or None
    checked = user["corporation_checked_at"]
    corporation_id = None
    # Only a pilot who may read its corporation's killmails needs its corporation (one public call a day).
    may_read_corporation = db.CORPORATION_SCOPE in (scopes or user["scopes"] or "").split()
    if may_read_corporation and (checked is None or checked < job.now - PROFILE_MAX_AGE):
        try:
            corporation_id = job.esi.get_character(user["character_id"]).get("corporation_id")
        except EsiError as exc:
            log.warning("  could not read the public record of %s: %s", user["character_id"], exc)
    if scopes != user["scopes"] or corporation_id is not None:
        db.save_profile(job.conn, user["character_id"], scopes=scopes,
                        corporation_id=corporation_id if isinstance(corporation_id, int) else None,
                        checked_at=job.now if corporation_id is not None else None)
        job.conn.commit()


def _usable_token(job: Job, user: dict) -> str | None:
    """The user's access token, refreshed under the lock when it is about to expire; None if the grant is gone
    or TOKEN_KEY cannot open it. `user["refresh_token"]` stays the value as stored (sealed or not)."""
    if not needs_refresh(user["expires_at"], job.now):
        return user["access_token"]
    vault = job.options.tokens
    try:
        refresh_token = vault.open(user["refresh_token"])
    except TokenKeyError as exc:
        # An operator's mistake (a key dropped too soon, a wrong one): the row is left as it is, so the right
        # TOKEN_KEY brings the pilot back; the run ends at once, recorded, and the next one tries again.
        job.result.status, job.result.error = "error", str(exc)
        log.error("  🔑 %s: %s; skipping", user["character_name"] or user["character_id"], exc)
        return None
    try:
        grant = job.esi.refresh(refresh_token)
    except InvalidGrant as exc:
        return _revoke(job, user, exc)  # type: ignore[func-returns-value]  # None: no token
    except InvalidClient as exc:
        raise _job_error("SSO configuration error", exc) from exc
    except EsiError as exc:
        raise _job_error("token refresh failed", exc) from exc
    # The old refresh token is dead from this moment: store the new one before anything else can fail. Sealed
    # with TOKEN_KEY's first key, which also moves a plaintext row (or one under an older key) to it.
    sealed = vault.seal(grant.refresh_token)
    conn = job.conn
    with db.autocommitted(conn):  # one statement, committed as it ends: one round trip where a transaction takes three
        stored = db.store_tokens(conn, user["character_id"], grant.access_token, sealed,
                                 job.now + timedelta(seconds=grant.expires_in), replaces=user["refresh_token"])
    if not stored:  # the web app wrote a new login while SSO answered: the login's grant stays the pilot's
        log.info("  🔑 %s logged in again during the refresh; the new login's tokens stay",
                 user["character_name"] or user["character_id"])
    user["refresh_token"] = sealed  # the one this job holds, as stored, should it have to mark it revoked
    return grant.access_token


def _revoke(job: Job, user: dict, exc: InvalidGrant) -> None:
    """Mark the refresh token SSO refused as dead (unless the web app already replaced it); always None."""
    result = job.result
    revoked = db.mark_revoked(job.conn, user["character_id"], user["refresh_token"], str(exc))
    job.conn.commit()
    result.error = str(exc)
    if not revoked:  # a new login came meanwhile: the next run uses it
        result.status = "error"
        log.info("  🔑 %s: the refreshed token was refused, but a new login has replaced it",
                 user["character_name"] or user["character_id"])
        return None
    result.status = "needs_relogin"
    log.warning("  🔑 %s: refresh token no longer valid (%s); marked as needing a new login",
                user["character_name"] or user["character_id"], exc)
    return None


def _list_references(job: Job, token: str) -> None:
    """Store the job's owner's listed references, unless the stored list is still fresh; the caller commits them
    with what it does next (fetch_killmails' claims).

    `token` is the reader's. A 403 is raised as esi.Forbidden for the caller: what it means depends on whose
    list it was.
    """
    conn, owner, result = job.conn, job.owner, job.result
    assert owner is not None  # the caller sets it before the list is read
    if list_is_fresh(owner.list_expires_at, job.now, full=job.options.full):
        return
    etag = None if job.options.full else owner.list_etag
    try:
        listing = job.esi.list_recent(character_id=owner.reader_id, token=token, etag=etag,
                                      corporation_id=owner.id if owner.kind == "corporation" else None)
    except NotModified as exc:
        # Written with the run's end (_finish), or before any fetch (fetch_killmails): one write a warm poll.
        result.list_cache = (etag, _list_expiry(job, exc.expires_in))
        return
    except Forbidden:
        raise
    except Unauthorized as exc:
        db.expire_access_token(conn, owner.reader_id, job.now)  # refresh it on the next try
        conn.commit()
        raise JobError(f"access token refused: {exc}") from exc
    except EsiError as exc:
        raise _job_error("recent killmails", exc) from exc
    result.linked_new = db.store_refs(conn, owner.kind, owner.id, listing.refs)
    db.save_list_cache(conn, owner.kind, owner.id, listing.etag, _list_expiry(job, listing.expires_in))
    result.listed = len(listing.refs)
    log.info("  📥 Found %d killmails", result.listed)


def fetch_killmails(job: Job) -> None:
    """Fetch and save the details of the job's owner's references that no process has stored or is fetching."""
    conn, owner, now, result = job.conn, job.owner, job.now, job.result
    assert owner is not None  # the caller listed its references
    if result.list_cache is not None:  # a 304's Expires holds before anything is waited for, however the job ends
        db.save_list_cache(conn, owner.kind, owner.id, *result.list_cache)
        result.list_cache = None
    conn.commit()  # the references just listed, before anything else is committed or waited for
    value_backlog(conn, job.esi, now, job.options)
    pending = db.pending_refs(conn, owner.kind, owner.id, now, max_attempts=job.options.max_attempts)
    claimed = db.claim_refs(conn, [r["killmail_id"] for r in pending], now, seconds=CLAIM_SECONDS)
    conn.commit()
    result.new = len(pending)
    result.skipped = max(0, result.listed - len(pending)) + len(pending) - len(claimed)
    if not claimed:
        if result.listed:
            log.info("  ✅ Saved: 0, Skipped: %d", result.skipped)
        return
    # An owner's first sync is all backlog (its 90 days); later, what was first listed since its last sync is fresh.
    fresh = {r["killmail_id"] for r in pending
             if owner.synced_at is not None and r["first_seen_at"] > owner.synced_at}
    _fetch_claimed(job, [{**r, "backlog": r["killmail_id"] not in fresh} for r in claimed])


def sweep_stranded(conn: db.Connection, esi: EsiClient, now: datetime, options: SyncOptions) -> SyncResult:
    """Fetch a few references that no owner's sync will fetch any more (every pilot who listed them needs a
    new login): a killmail once listed is stored even when its pilots left. Records its ESI calls itself;
    returns what it did (a limit that stopped it is logged, the rest waits for the next sweep)."""
    result = SyncResult(0, kind="sweep")
    stranded = db.stranded_refs(conn, now, max_attempts=options.max_attempts, limit=SWEEP_LIMIT)
    claimed = db.claim_refs(conn, [r["killmail_id"] for r in stranded], now, seconds=CLAIM_SECONDS)
    conn.commit()
    if claimed:
        log.info("🧹 Sweeping %d killmails listed only by pilots who need a new login", len(claimed))
        value_backlog(conn, esi, now, options)
        try:
            _fetch_claimed(Job(conn, esi, now, options, result), claimed)
        except JobError as exc:
            log.warning("  sweep stopped: %s", exc)
    db.add_esi_calls(conn, esi.take_calls())
    conn.commit()
    return result


def value_backlog(conn: db.Connection, esi: EsiClient, now: datetime, options: SyncOptions) -> None:
    """Load or refresh the process's prices (before a job saves anything), then value a bounded batch of the
    killmails stored while no prices were known, announcing those a minimum-value webhook now wants."""
    if options.prices.refresh(conn, esi, now):
        valued = values.value_missing(conn, options.prices.prices, limit=VALUE_BATCH,
                                      notify_max_age=options.notify_max_age)
        if valued:
            log.info("  💰 Valued %d killmails stored without a value", len(valued))


def _fetch_claimed(job: Job, claimed: list[dict]) -> None:
    """Fetch (on the client's detail threads) and save claimed references; release what was not fetched."""
    conn, esi, options, result = job.conn, job.esi, job.options, job.result
    unfetched = {r["killmail_id"] for r in claimed}
    pool = esi.detail_pool()
    # Fresh ones first: the pool starts them first, and they may spend what a backlog may not.
    claimed = sorted(claimed, key=lambda r: r.get("backlog", False))
    futures = [pool.submit(_fetch_one, esi, r["killmail_id"], r["killmail_hash"], r.get("backlog", False))
               for r in claimed]
    try:
        stop = _collect(job, claimed, futures, unfetched)
    except BaseException:
        # The job dies (its database connection, most likely) and is run again: fetch nothing more now, and
        # let the fetches under way end before the rerun claims the same references (for a bounded time: a
        # fetch still running then is one the rerun may fetch again, never one that holds the job for ever).
        for future in futures:
            future.cancel()
        options.cancel_waits()
        wait(futures, timeout=options.finish_wait)
        raise
    db.release_refs(conn, sorted(unfetched))
    conn.commit()
    if stop is None:
        result.skipped += len(unfetched)  # backlog deferred to later syncs (see _collect)
    log.info("  ✅ Saved: %d, Skipped: %d%s", result.saved, result.skipped,
             f", Failed: {result.failed}" if result.failed else "")
    if isinstance(stop, JobFailed):
        raise stop
    if stop is not None:
        raise _job_error("killmail details", stop)
    if options.namer is not None:
        options.namer.add(result.name_ids)
    else:
        names.resolve_names(conn, esi, result.name_ids, job.now)


def _collect(job: Job, claimed: list[dict], futures: list, unfetched: set[int]) -> EsiError | JobFailed | None:
    """Save fetched killmails in small batches as they arrive (in the order they arrive: paced fetches end in no
    set order, and one slow fetch must not hold the others unsaved), record failures, and return what stopped the
    fetching: ESI's limit error, the job's deadline or the worker's stop (None when all were tried). Ids left in
    `unfetched` were never fetched. No wait here is unbounded: the job looks at its deadline and at a stop every
    TICK, and once interrupted waits FINISH_WAIT at most for the fetches under way."""
    options = job.options
    stop: EsiError | JobFailed | None = None
    interrupted: JobFailed | None = None
    deferred = 0
    finish_by = float("inf")
    fetched: list[Killmail] = []
    batch_started = time.monotonic()
    refs = dict(zip(futures, claimed, strict=True))
    # Each future lands here once when it ends (fetched, failed or cancelled): one put per fetch, where waiting
    # on the set of pending futures again after each arrival would cost a pass over all of them.
    arrived: queue.SimpleQueue = queue.SimpleQueue()
    for future in futures:
        future.add_done_callback(arrived.put)
    left = len(futures)
    while left:
        clock = time.monotonic()
        if fetched and clock - batch_started >= SAVE_EVERY:  # the batch waited long enough
            _save(job, fetched)
            fetched = []
        if interrupted is None:
            interrupted = _interruption(options, clock, left)
            if interrupted is not None:
                log.warning("  ⏹️  %s", interrupted)
                for other in futures:
                    other.cancel()
                options.cancel_waits()
                finish_by = clock + options.finish_wait
        if clock >= finish_by:
            break  # fetches still under way: their references are released, the next run fetches them
        timeout = min(TICK, finish_by - clock)
        if fetched:
            timeout = min(timeout, max(0.0, batch_started + SAVE_EVERY - clock))
        try:
            future = arrived.get(timeout=timeout)
        except queue.Empty:
            continue
        left -= 1
        options.progress()
        killmail_id = refs[future]["killmail_id"]
        try:
            killmail = future.result()
        except CancelledError:
            continue
        except Deferred as exc:
            # The backlog's share of the detail bucket is spent: the rest of the backlog waits for a later sync
            # (its references stay pending), and this job, its fresh killmails done, gives its process back.
            if not deferred:
                log.info("  ⏳ %s: the backlog is left for later syncs", exc)
            deferred += 1
            for other, ref in refs.items():
                if ref.get("backlog"):
                    other.cancel()
            continue
        except (ErrorLimited, RateLimited, Paused) as exc:
            # ESI says stop: fetch nothing more; the rest are released and fetched on the job's retry.
            stop = stop or exc
            for other in futures:
                other.cancel()
            continue
        except (EsiError, InvalidKillmail) as exc:
            unfetched.discard(killmail_id)
            _record_failure(job, killmail_id, exc)
            continue
        unfetched.discard(killmail_id)
        if not fetched:
            batch_started = time.monotonic()
        fetched.append(killmail)
        if len(fetched) >= SAVE_BATCH:
            _save(job, fetched)
            fetched = []
    _save(job, fetched)
    return interrupted or stop


def _interruption(options: SyncOptions, clock: float, left: int) -> JobFailed | None:
    """Why the job must end now with `left` fetches not in: the worker stops, or the job's deadline passed."""
    stop_by = options.stop_by()
    if stop_by is not None and clock >= stop_by:
        return JobInterrupted(f"worker stopping: {left} killmail details left for the next run")
    if options.deadline is not None and clock >= options.deadline:
        return JobError(f"job deadline passed while waiting for {left} killmail details (ESI or its limits)")
    return None


def _fetch_one(esi: EsiClient, killmail_id: int, killmail_hash: str, backlog: bool = False) -> Killmail:
    body, raw = esi.get_killmail(killmail_id, killmail_hash, backlog=backlog) if backlog else \
        esi.get_killmail(killmail_id, killmail_hash)
    return parse_killmail(body, killmail_id=killmail_id, killmail_hash=killmail_hash, raw=raw)


def _save(job: Job, killmails: list[Killmail]) -> None:
    """Save a batch in one transaction; if the batch fails, save one by one so one bad killmail loses no other."""
    if not killmails:
        return
    conn, options, result = job.conn, job.options, job.result
    prices = options.prices.prices
    worth = [values.killmail_values(k.row.victim_ship_type_id, k.items, prices) if prices else None for k in killmails]
    try:
        saved = db.save_killmails(conn, killmails, worth, notify_max_age=options.notify_max_age)
        conn.commit()
        result.saved += len(saved)
        _note_names(killmails, saved, result)
        options.progress()
        return
    except psycopg.OperationalError:
        raise
    except psycopg.Error:
        conn.rollback()
    for killmail, value in zip(killmails, worth, strict=True):
        try:
            saved = db.save_killmails(conn, [killmail], [value], notify_max_age=options.notify_max_age)
            conn.commit()
            result.saved += len(saved)
            _note_names([killmail], saved, result)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            conn.rollback()
            _record_failure(job, killmail.killmail_id, exc)


def _note_names(killmails: list[Killmail], saved: list[int], result: SyncResult) -> None:
    new = set(saved)
    for killmail in killmails:
        if killmail.killmail_id in new:
            result.name_ids |= named_ids(killmail)


def _record_failure(job: Job, killmail_id: int, exc: Exception) -> None:
    # A wrong hash never becomes right; anything else (a 5xx, a malformed body, a row the database refused)
    # is retried by later syncs a bounded number of times.
    permanent = isinstance(exc, InvalidHash)
    db.record_ref_failure(job.conn, killmail_id, f"{type(exc).__name__}: {exc}", job.now,
                          permanent=permanent, max_attempts=job.options.max_attempts)
    job.conn.commit()
    job.result.failed += 1
    log.warning("  ⚠️  killmail %s not saved: %s", killmail_id, exc)


def _finish(job: Job) -> None:
    """Record the run, the ESI calls and the user's (or corporation's) sync state, with a 304's ETag and Expires,
    in one statement, its own transaction, then release the locks: a round trip each, the locks let go only after
    the commit."""
    conn, result = job.conn, job.result
    result.finished_at = job.options.clock()
    if result.status == "ok" and result.failed:
        result.status = "partial"
    calls = job.esi.take_calls()
    result.esi_calls = sum(calls.values())
    with db.autocommitted(conn):
        db.record_outcome(conn, run_row(result), calls, found_new=result.linked_new > 0 or result.saved > 0,
                          list_cache=result.list_cache, settlement=job.esi.limits.job_bookings())
        for namespace, key in reversed(job.locks):
            db.unlock(conn, namespace, key)
    job.locks.clear()


def record_failed_run(conn: db.Connection, esi: EsiClient, result: SyncResult, error: str, *,
                      status: str = "error") -> None:
    """Record a run that did not sync: failed (it will be retried or dead-lettered), or skipped as locked."""
    result.status, result.error = status, error[:2000]
    # A run that failed under its lock ended there (sync stamped it); one that never ran ends now.
    result.finished_at = result.finished_at or datetime.now(UTC)
    calls = esi.take_calls()
    result.esi_calls = sum(calls.values())
    db.add_esi_calls(conn, calls)
    db.record_run(conn, run_row(result))
    conn.commit()


def run_row(result: SyncResult) -> dict:
    """A SyncResult as the columns of sync_runs."""
    # Every field is a plain value: a shallow copy does (asdict deep-copies each one, for a row every job writes).
    return {f.name: getattr(result, f.name) for f in fields(result)
            if f.name not in ("character_name", "linked_new", "name_ids", "list_cache")}


def _list_expiry(job: Job, expires_in: float | None) -> datetime | None:
    """When a list just answered expires, on the job's clock: its Expires counts from the answer, which may come
    long after the job's start (a token refresh, a pause, retried timeouts), so `now` moves on by that much."""
    if expires_in is None:
        return None
    elapsed = job.options.clock() - job.result.started_at  # type: ignore[operator]  # set by now
    answered_at = job.now + max(timedelta(0), elapsed)
    return answered_at + timedelta(seconds=expires_in)


def _job_error(what: str, exc: EsiError) -> JobError:
    """A JobError for an ESI or SSO error, to be retried no sooner than the wait it asked for."""
    return JobError(f"{what}: {exc}", retry_after=_wait_asked(exc))


def _wait_asked(exc: EsiError) -> float | None:
    """Seconds an error says to wait before asking again; None when it says nothing."""
    if isinstance(exc, RateLimited):
        return exc.retry_after
    if isinstance(exc, ErrorLimited):
        return exc.reset
    if isinstance(exc, Paused):
        return max(0.0, (exc.until - datetime.now(UTC)).total_seconds())
    if isinstance(exc, InvalidClient):
        return INVALID_CLIENT_PAUSE  # the SSO pause every process now keeps
    return None

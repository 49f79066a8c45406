"""The killmail sync worker: a parent that forks PREFETCH_COUNT children, each consuming one job at a time.

Each child opens its own RabbitMQ and PostgreSQL connections after the fork. pika's I/O loop runs in the
child's main thread; the job runs in a worker thread, whose only call into pika is add_callback_threadsafe,
so heartbeats keep flowing during a long sync. A job is acked only after its database commit; a failed job
is republished to a delay queue with backoff (or, after the last attempt, to the dead-letter queue) and acked.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import mmap
import os
import queue
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Literal

import pika
import pika.exceptions
import psycopg

import broker
import db
import names
import sync
import values
from backoff import exponential
from esi import EsiClient, TokenGrant
from limits import SharedLimits
from settings import Settings, describe, load_settings_or_exit, setup_logging
from tokens import TokenKeyError, TokenVault

log = logging.getLogger(__name__)

DB_RETRIES_PER_JOB = 3          # a job whose database connection died is run again this often in place
RESTART_BACKOFF_CAP = 30.0      # seconds between restarts of a child that keeps dying
RECONNECT_CAP = 30.0            # seconds between a child's broker reconnects at the most
BURST_RESTARTS = 10             # a burst run stops replacing children after this many deaths (a crash loop)
SWEEP_EVERY = 300.0             # seconds between a child's sweeps for killmails no owner will fetch any more
LEDGER_KEEP = 7200             # seconds of ESI limit ledger kept: longer than any window (limits.MAX_WINDOW)
MALLOC_ARENAS = 2               # glibc malloc arenas per process, for DETAIL_CONCURRENCY threads (see below)
M_ARENA_MAX = -8                # glibc's mallopt() parameter number for the arena cap
BROKER_ERRORS = (pika.exceptions.AMQPError, OSError, broker.NotDelivered)
REPORT_EVERY = 10.0             # seconds between a child's writes of its job's progress (worker_jobs)
STOP_MARGIN = sync.FINISH_WAIT + 5.0  # seconds of a stop's grace left when a job in hand is ended early: its
                                # fetches under way end, it saves and releases, the process exits


class Heartbeat:
    """A child's job and its last progress, in memory shared with the parent (an anonymous mapping made before the
    fork): when the job started, whose it is, and when it last got an answer, saved a batch or waited as the ESI
    ledger said. A heartbeat of progress, not of liveness: a job blocked for ever beats no more, while its process
    lives on. The parent's watchdog reads it; times are time.monotonic(), one clock for every process of the host."""

    _LAYOUT = struct.Struct("ddq")  # job started (0.0: no job), last progress, character id

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, self._LAYOUT.size)

    def start(self, character_id: int, *, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._LAYOUT.pack_into(self._map, 0, now, now, character_id)

    def beat(self, *, now: float | None = None) -> None:
        struct.pack_into("d", self._map, 8, time.monotonic() if now is None else now)

    def end(self) -> None:
        self._LAYOUT.pack_into(self._map, 0, 0.0, 0.0, 0)

    def read(self) -> tuple[float, float, int]:
        """(job started, last progress, character id); (0.0, 0.0, 0) when the child has no job."""
        return self._LAYOUT.unpack_from(self._map, 0)

    def stalled_for(self, now: float) -> float:
        """Seconds the current job has made no progress (0.0 with no job). Read twice, alike, so that a write the
        child was making at that moment is never taken for a stall."""
        first, second = self.read(), self.read()
        if first != second or not first[0]:
            return 0.0
        # A job's progress is never older than its start: a progress field from before it (a write of start()
        # seen half done) counts from the start.
        return now - max(first[0], first[1])


@dataclass(frozen=True)
class Outcome:
    """What the I/O thread does with a delivered message once its job ended."""

    action: Literal["ack", "retry", "dead", "release"]
    reason: str = ""
    delay: float = 0.0


def reconnect_delay(failures: int, rng: random.Random) -> float:
    """Backoff with jitter between reconnect attempts: up to 1, 2, 4 ... 30 seconds."""
    return exponential(failures + 1, base=1.0, cap=RECONNECT_CAP) * rng.uniform(0.5, 1.0)


def failures_in_a_row(failures: int, lasted: float | None, cap: float) -> int:
    """Failures in a row, counting this one, of something retried with backoff up to `cap` seconds (a child's
    broker connection, a forked child). One that had lasted `cap` seconds or more ended the last streak, so
    this failure starts a new one (its backoff from the first step); one that ended sooner (a broker or a child
    failing in a loop) or never started goes on counting."""
    if lasted is not None and lasted >= cap:
        return 1
    return failures + 1


class JobEsiClient(EsiClient):
    """A child's ESI client, which keeps the grants SSO gave during the current job.

    SSO kills the old refresh token the moment it answers. If the database connection dies before the rotated
    token is committed, the job runs again in place and would spend the dead token: invalid_grant, and a pilot
    wrongly marked as needing a new login. The rerun gets the grant in hand instead and stores it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._grants: dict[str, TokenGrant] = {}

    def refresh(self, refresh_token: str) -> TokenGrant:
        """The grant already given for this refresh token in this job, or a new one from SSO."""
        grant = self._grants.get(refresh_token)
        if grant is None:
            grant = self._grants[refresh_token] = super().refresh(refresh_token)
        return grant

    def forget_grants(self) -> None:
        """The job is over: its grants are stored, or lost with a connection that never came back."""
        self._grants.clear()


class JobReporter:
    """Writes the child's job and its last progress to worker_jobs every REPORT_EVERY seconds, on a thread and a
    connection of its own, so that /status, /metrics and /health?deep=1 see a stalled job (the watchdog in the
    parent ends it); the row goes when the job ends. A failed write costs only that report."""

    def __init__(self, connect: Callable[[], Any], heartbeat: Heartbeat, worker: str, *,
                 every: float = REPORT_EVERY):
        self._connect, self._heartbeat, self._worker, self._every = connect, heartbeat, worker, every
        self._conn: db.Connection | None = None
        self._reported = False
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-reporter", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._closing.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._closing.wait(self._every):
            self.report()
        self.report(final=True)
        if self._conn is not None:
            self._conn.close()

    def report(self, *, final: bool = False) -> None:
        started, progress, character_id = self._heartbeat.read()
        if not started and not self._reported and not final:
            return
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            now, clock = datetime.now(UTC), time.monotonic()
            if started and not final:
                db.report_job(self._conn, self._worker, character_id,
                              started_at=now - timedelta(seconds=clock - started),
                              progress_at=now - timedelta(seconds=clock - progress))
                self._reported = True
            else:
                db.end_job_report(self._conn, self._worker)
                self._reported = False
        except psycopg.Error as exc:
            log.warning("could not report the job's progress: %s", describe(exc))
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class Child:
    """One forked worker process: a pika consumer with prefetch 1 and a thread that runs its jobs one by one."""

    def __init__(self, settings: Settings, *, burst: bool, heartbeat: Heartbeat | None = None):
        self.settings = settings
        self.burst = burst
        self.heartbeat = heartbeat or Heartbeat()
        self.stopping = threading.Event()
        self.stopped_at: float | None = None        # when SIGTERM came (time.monotonic())
        self.rng = random.Random()
        self.conn: db.Connection = None  # type: ignore[assignment]  # the job's; each use follows ensure_db()
        # The job thread lives as long as the process: a thread started for every job cost more CPU than a warm
        # poll's own work. The I/O thread hands it deliveries; `job_in_hand` (the I/O thread's own) holds from a
        # delivery to its ack, `job_idle` (the job thread's) says the last job handed over has ended.
        self.deliveries: queue.SimpleQueue = queue.SimpleQueue()
        self.job_in_hand = False
        self.job_idle = threading.Event()
        self.job_idle.set()
        self.job_thread = threading.Thread(target=self.run_jobs, name="job", daemon=True)
        self.broker_failures = 0                    # broker connections lost in a row (the reconnect backoff)
        self.consuming_since: float | None = None   # when the current broker connection began to consume
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"
        self.limits = SharedLimits(lambda: db.connect(settings.database_url, autocommit=True),
                                   egress=settings.esi_egress, stopping=self.stopping)
        self.esi = JobEsiClient(settings, limits=self.limits, progress=self.heartbeat.beat)
        self.tokens = TokenVault(settings.token_keys)
        self.prices = values.PriceBook()            # the market prices, loaded once for every job of the process
        self.limits.on_wait = self.heartbeat.beat  # a wait the ledger decreed is the job going at ESI's pace
        self.swept_at = -SWEEP_EVERY                # the first job's end sweeps
        self.namer: names.Namer | None = None        # names new killmails' ids off the jobs' path (run)

    def run(self) -> int:
        """Consume until stopped (or, in burst mode, until the queue is empty); reconnect on broker loss."""
        self.namer = names.Namer(lambda: db.connect(self.settings.database_url), self.esi)
        reporter = JobReporter(lambda: db.connect(self.settings.database_url, autocommit=True), self.heartbeat,
                               self.worker_name)
        try:
            return self.consume_until_done()
        finally:
            reporter.close()
            self.namer.close(timeout=5.0)  # names what its last jobs saved, within the stop's grace

    def consume_until_done(self) -> int:
        try:
            self.ensure_db()  # before the first job, which should not wait for its connections
            self.limits.open()
        except psycopg.OperationalError:
            # PostgreSQL went away again (the limits connect on their first read), or the child was stopped
            # while it was unreachable.
            if self.stopping.is_set():
                return 0
        while not self.stopping.is_set():
            try:
                if self.consume():
                    return 0
            except BROKER_ERRORS as exc:
                consumed_for = None if self.consuming_since is None else time.monotonic() - self.consuming_since
                self.consuming_since = None
                self.broker_failures = failures_in_a_row(self.broker_failures, consumed_for, RECONNECT_CAP)
                log.warning("⚠️  RabbitMQ connection lost (%r)", exc)
                self.wait_for_job()  # its ack, if lost, comes back as a redelivery
                delay = reconnect_delay(self.broker_failures, self.rng)
                log.info("reconnecting in %.1f s (attempt %d)", delay, self.broker_failures)
                self.stopping.wait(delay)
        self.wait_for_job()
        return 0

    def consume(self) -> bool:
        """One broker connection's life; True when the child is done (stopped, or burst and queue empty)."""
        with broker.open_channel(self.settings.rabbitmq_url, self.settings.queue_name,
                                 max_attempts=self.settings.max_attempts) as channel:
            connection = channel.connection
            channel.basic_qos(prefetch_count=1)
            tag = channel.basic_consume(self.settings.queue_name,
                                        on_message_callback=partial(self.on_message, connection))
            self.consuming_since = time.monotonic()
            if self.broker_failures:
                log.info("✅ RabbitMQ connection back after %d attempt(s); consuming again", self.broker_failures)
            while True:
                connection.process_data_events(time_limit=0.5)
                if self.job_in_hand:
                    continue
                self.limits.end_idle_leases()  # no job: the error slots it leased go back to the other processes
                if self.stopping.is_set():
                    channel.basic_cancel(tag)  # pika nacks (requeues) anything delivered but not yet dispatched
                    return True
                if self.burst and self.queue_empty(channel):
                    # A delivery may have arrived during the check (the queue then counts it as unacked, not
                    # ready): dispatch it before deciding that this child is done.
                    connection.process_data_events(time_limit=0)
                    if not self.job_in_hand:
                        channel.basic_cancel(tag)
                        return True

    def queue_empty(self, channel) -> bool:
        """Whether the job queue has no ready message (burst mode's end)."""
        return channel.queue_declare(self.settings.queue_name, passive=True).method.message_count == 0

    def on_message(self, connection, channel, method, properties, body: bytes) -> None:
        """pika delivered a job: run it in a worker thread so the I/O loop keeps serving heartbeats."""
        if self.stopping.is_set():
            channel.basic_reject(method.delivery_tag, requeue=True)  # untouched; another worker takes it
            return
        if not self.job_thread.is_alive():
            self.job_thread.start()  # here, not at the fork: a child that never gets a job runs no thread for it
        self.job_in_hand = True
        self.job_idle.clear()
        self.deliveries.put((connection, channel, method.delivery_tag, method.redelivered, properties, body))

    def run_jobs(self) -> None:
        """The job thread: run each delivery the I/O thread hands over, one at a time, for the process's life."""
        while True:
            delivery = self.deliveries.get()
            try:
                self.run_job(*delivery)  # sets job_idle as it hands its outcome over
            except BaseException:
                # run_job turns every failure of a job into an outcome; what escapes it is a bug of the worker's
                # own. The process ends at once rather than hold the delivery unacked with no thread to run the
                # next (prefetch 1): its connection closes, the job is redelivered and the parent forks another.
                log.exception("❌ the job thread failed outside any job; ending the process (the job is redelivered)")
                logging.shutdown()
                os._exit(70)

    def run_job(self, connection, channel, delivery_tag: int, redelivered: bool, properties, body: bytes) -> None:
        """The job thread: do the work, then hand the outcome to the I/O thread."""
        headers = properties.headers if isinstance(properties.headers, dict) else {}
        attempt = broker.attempt_number(headers.get(broker.ATTEMPT_HEADER))
        try:
            outcome = self.process(body, attempt, redelivered=redelivered)
        except Exception as exc:  # a bug must not kill the child with the message unaccounted for
            log.exception("job crashed")
            self.drop_db()  # the crash may have left claims and locks in its session: they end with it
            # The type alone travels on (log line, dead-letter header): an unforeseen error's text may quote what
            # the failing call was given, as http.client quotes a whole header it refuses.
            outcome = self.failure(None, attempt, f"worker error: {type(exc).__name__}")
        # Idle before the outcome goes to the I/O thread, which may hand over the next job as soon as it acks.
        self.job_idle.set()
        try:
            connection.add_callback_threadsafe(partial(self.on_job_done, channel, delivery_tag, properties, body,
                                                       attempt, outcome))
        except BROKER_ERRORS:
            log.warning("connection lost before the ack; the job will be redelivered")

    def process(self, body: bytes, attempt: int, *, redelivered: bool = False) -> Outcome:
        """Decode and run one job, with the database connection retried in place if it dies. A redelivered job
        waits a moment for its owner's lock: the process that had it may have just died, its session not yet
        ended, and skipping the job would leave the pilot unsynced until the next producer run."""
        try:
            job = broker.decode_job(body)
        except broker.BadMessage as exc:
            log.error("❌ bad message, dead-lettered: %s", exc)
            return Outcome("dead", str(exc))
        log.info("👤 Processing: %s (ID: %s), queued at %s", job.character_name or "unknown", job.character_id,
                 job.queued_at)
        self.heartbeat.start(job.character_id)
        self.limits.allow_waits()
        try:
            return self.run_sync(job, attempt, lock_wait=sync.REDELIVERED_LOCK_WAIT if redelivered else 0.0)
        finally:
            self.heartbeat.end()
            self.esi.forget_grants()

    def run_sync(self, job: broker.Job, attempt: int, *, lock_wait: float = 0.0) -> Outcome:
        """Run a decoded job; a lost database connection runs it again, up to DB_RETRIES_PER_JOB times."""
        for tries in range(1, DB_RETRIES_PER_JOB + 1):
            result = sync.SyncResult(job.character_id, corporation_id=job.corporation_id, kind=job.kind,
                                     attempt=attempt, worker=self.worker_name)
            options = self.sync_options(full=job.full, attempt=attempt, lock_wait=lock_wait)
            try:
                self.ensure_db()
                # The clock is read once PostgreSQL answers: minutes spent waiting for it must not age the job's
                # `now` (token expiry, list Expires, claims) nor its started_at.
                now = result.started_at = datetime.now(UTC)
                if job.corporation_id is not None:
                    result = sync.sync_corporation(self.conn, self.esi, job.corporation_id, job.character_id, now,
                                                   options=options)
                else:
                    result = sync.sync_character(self.conn, self.esi, job.character_id, now, options=options)
            except psycopg.OperationalError as exc:
                # A deadlock or serialization failure (SQLSTATE class 40, transaction rollback) is one too, on a
                # live connection.
                rolled_back = (exc.sqlstate or "").startswith("40")
                what = "the database rolled the job's transaction back" if rolled_back else "database connection lost"
                log.warning("⚠️  %s during the job (%s); running it again", what, exc)
                self.drop_db()
                if tries == DB_RETRIES_PER_JOB:
                    return self.failure(job, attempt, f"database: {exc}", result=result)
                continue
            except sync.JobInterrupted as exc:
                # The worker is stopping: what was fetched is saved, the rest released; another worker (or this
                # one's successor) takes the job from the queue at once. Not a failure: no attempt is counted.
                log.info("⏸️  Released: %s (%s)", job.character_name or job.character_id, exc)
                self.record_interrupted(exc.result or result, str(exc))
                return Outcome("release", str(exc))
            except sync.PermanentJobError as exc:
                return self.failure(job, attempt, str(exc), permanent=True, result=exc.result or result)
            except sync.JobError as exc:
                return self.failure(job, attempt, str(exc), result=exc.result or result, delay=exc.retry_after)
            if result.status not in ("locked",):
                log.info("✅ Completed: %s", result.character_name or job.character_id)
            self.sweep_if_due()
            return Outcome("ack")
        raise AssertionError("unreachable")

    def sync_options(self, **job) -> sync.SyncOptions:
        """This process's settings for sync, with a job's own (full, attempt)."""
        return sync.SyncOptions(max_attempts=self.settings.max_attempts, worker=self.worker_name,
                                notify_max_age=self.settings.notify_max_age_seconds, namer=self.namer,
                                deadline=time.monotonic() + self.settings.job_deadline_seconds,
                                stop_by=self.stop_by, progress=self.heartbeat.beat,
                                cancel_waits=self.limits.cancel_waits, tokens=self.tokens, prices=self.prices,
                                **job)

    def stop_by(self) -> float | None:
        """Once stopping, by when a job in hand ends early: time to save what it fetched, release the rest and
        exit, within the stop's grace. None while not stopping: jobs run to their end."""
        if self.stopped_at is None:
            return None
        return self.stopped_at + self.settings.worker_stop_grace_seconds - STOP_MARGIN

    def record_interrupted(self, result: sync.SyncResult, reason: str) -> None:
        """Record the run of a job released by a stop (its ESI calls, what it saved)."""
        try:
            self.ensure_db()
            sync.record_failed_run(self.conn, self.esi, result, reason, status="interrupted")
        except psycopg.Error as exc:
            log.warning("could not record the interrupted run: %s", exc)
            self.drop_db()

    def sweep_if_due(self) -> None:
        """Every SWEEP_EVERY seconds, after a job, fetch a few killmails whose pilots all need a new login (they
        were listed, so they belong to the board, but no sync will fetch them any more)."""
        if self.stopping.is_set() or time.monotonic() - self.swept_at < SWEEP_EVERY:
            return
        self.swept_at = time.monotonic()
        try:
            sync.sweep_stranded(self.conn, self.esi, datetime.now(UTC), self.sync_options())
            db.prune_ledger(self.conn, older_than=LEDGER_KEEP)  # buckets nobody calls any more
            self.conn.commit()
        except psycopg.OperationalError as exc:
            log.warning("⚠️  database connection lost during a sweep (%s); the next one tries again", exc)
            self.drop_db()
        except Exception:  # the job it follows succeeded: a sweep's bug must not fail it
            log.exception("sweep failed")
            self.drop_db()  # its claims end with the connection

    def failure(self, job: broker.Job | None, attempt: int, reason: str, *, permanent: bool = False,
                result: sync.SyncResult | None = None, delay: float | None = None) -> Outcome:
        """Record a failed run and decide between the retry ladder and the dead-letter queue."""
        last = permanent or attempt >= self.settings.max_attempts
        log.error("❌ Failed: %s (attempt %d of %d): %s%s", job.character_name if job else "?", attempt,
                  self.settings.max_attempts, reason, " -> dead-letter queue" if last else "")
        if job is not None and result is not None:
            try:
                self.ensure_db()
                sync.record_failed_run(self.conn, self.esi, result, reason)
                if last:
                    if job.corporation_id is not None:
                        db.release_corporation(self.conn, job.corporation_id)
                    else:
                        db.release_user(self.conn, job.character_id)
                    self.conn.commit()
            except psycopg.Error as exc:
                log.warning("could not record the failed run: %s", exc)
                self.drop_db()
        if last:
            return Outcome("dead", reason)
        wait = broker.retry_delay(attempt, self.settings.retry_base_seconds, self.rng)
        return Outcome("retry", reason, max(wait, delay or 0.0))

    def on_job_done(self, channel, delivery_tag: int, properties, body: bytes, attempt: int,
                    outcome: Outcome) -> None:
        """In the I/O thread: publish a retry or dead letter if needed, then ack (after the job's commit)."""
        self.job_in_hand = False
        if not channel.is_open:
            log.warning("channel closed before the ack; the job will be redelivered")
            return
        if outcome.action == "release":  # not a failure: the job goes back to the queue's head, attempt unchanged
            channel.basic_reject(delivery_tag, requeue=True)
            return
        try:
            self.hand_on(channel, properties, body, attempt, outcome)
        except BROKER_ERRORS:
            raise  # the connection's loss: the job comes back as a redelivery
        except Exception as exc:  # a retry that cannot be published as asked is dead-lettered, never stuck
            log.exception("could not publish the job's %s; dead-lettering it", outcome.action)
            self.hand_on(channel, properties, body, attempt,
                         Outcome("dead", f"{outcome.reason[:400]} (and {type(exc).__name__} publishing it)"))
        channel.basic_ack(delivery_tag)

    def hand_on(self, channel, properties, body: bytes, attempt: int, outcome: Outcome) -> None:
        """Publish a failed job to its retry queue or to the dead-letter queue, as its outcome says."""
        priority = properties.priority if isinstance(properties.priority, int) else 0
        if outcome.action == "retry":
            broker.publish(channel, broker.retry_queue(self.settings.queue_name, attempt), body,
                           priority=priority, headers={broker.ATTEMPT_HEADER: attempt + 1},
                           message_id=properties.message_id, expiration_ms=int(outcome.delay * 1000))
        elif outcome.action == "dead":
            broker.publish(channel, broker.dead_queue(self.settings.queue_name), body,
                           priority=priority, message_id=properties.message_id,
                           headers={broker.ATTEMPT_HEADER: attempt, "x-death-reason": outcome.reason[:500],
                                    "x-failed-at": datetime.now(UTC).isoformat()})

    def ensure_db(self) -> None:
        """Open the job connection if there is none, retrying with backoff until PostgreSQL answers."""
        failures = 0
        while self.conn is None or self.conn.closed or self.conn.broken:
            try:
                self.conn = db.connect(self.settings.database_url)
            except psycopg.OperationalError as exc:
                failures += 1
                if self.stopping.is_set():
                    raise
                delay = reconnect_delay(failures, self.rng)
                log.warning("⚠️  PostgreSQL unreachable (%s); retrying in %.1f s", describe(exc), delay)
                self.stopping.wait(delay)  # a SIGTERM meanwhile ends the wait (and the next failure, the child)

    def drop_db(self) -> None:
        """Close the job connection (a broken one, or one a failed job may have left claims and locks in)."""
        if self.conn is not None:
            try:
                self.conn.close()
            except psycopg.Error:
                pass
            self.conn = None  # type: ignore[assignment]  # until ensure_db() opens another

    def wait_for_job(self) -> None:
        """Let a running job finish (its ack may be lost with the connection; it is then redelivered)."""
        if self.job_in_hand:
            self.job_idle.wait()
            self.job_in_hand = False


# ---------------------------------------------------------------------------------------------- the parent


class Supervisor:
    """The parent: forks the children, restarts one that dies, relays SIGTERM and waits for them."""

    def __init__(self, settings: Settings, *, burst: bool):
        self.settings = settings
        self.burst = burst
        # One per slot, made before any fork: each child's job and progress, shared with this process.
        self.heartbeats = [Heartbeat() for _ in range(settings.prefetch_count)]
        self.stalled: set[int] = set()       # children killed by the watchdog, not yet reaped
        self.stop_by: float | None = None    # when the children still running after a SIGTERM are killed
        self.children: dict[int, int] = {}   # pid -> slot
        self.started: dict[int, float] = {}  # pid -> when it was forked (monotonic)
        self.signals = 0
        self.restarts = 0
        self.give_up = False

    def on_signal(self, signum, frame) -> None:
        """Signal handler: only counts; the loop does the work."""
        self.signals += 1

    def catch_signals(self) -> None:
        """SIGTERM and SIGINT stop the worker from now on, the start-up's checks included."""
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)

    def run(self) -> int:
        """Run the children until stopped (or, in burst mode, until all have finished)."""
        self.catch_signals()
        if self.signals:
            log.info("🛑 Stopped before the first job")
            return 0
        for slot in range(self.settings.prefetch_count):
            self.spawn(slot)
        relayed = 0
        failures = 0
        while self.children:
            if self.signals > relayed:
                relayed = self.signals
                sig = signal.SIGTERM if relayed == 1 else signal.SIGKILL
                if relayed == 1:
                    log.info("🛑 Stopping: finishing current jobs (at most %d s)...",
                             self.settings.worker_stop_grace_seconds)
                    self.stop_by = time.monotonic() + self.settings.worker_stop_grace_seconds
                for pid in list(self.children):
                    _kill(pid, sig)
            self.watch(time.monotonic())
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.2)
                continue
            self.stalled.discard(pid)
            slot = self.children.pop(pid, None)  # type: ignore[arg-type]  # None: a pid not forked (slot: int above)
            lived = time.monotonic() - self.started.pop(pid, time.monotonic())
            code = os.waitstatus_to_exitcode(status)
            if slot is None or self.signals or (self.burst and code == 0):
                continue
            failures = failures_in_a_row(failures, lived, RESTART_BACKOFF_CAP)
            self.restarts += 1
            if self.burst and failures > BURST_RESTARTS:
                log.error("❌ worker processes keep dying; giving up this burst run")
                self.give_up = True
                continue
            delay = exponential(failures + 1, base=0.5, cap=RESTART_BACKOFF_CAP)
            log.warning("⚠️  worker process %d exited with %s; starting another in %.1f s", pid, code, delay)
            self.wait_unless_signalled(delay)
            if not self.signals:
                self.spawn(slot)
        return 0 if self.signals <= 1 and not self.give_up else 1

    def watch(self, now: float) -> None:
        """The watchdog: kill a child whose job made no progress for JOB_STALL_SECONDS (its message goes back to
        the queue with its connection, and the child is replaced as any that died), and, once the stop's grace
        is over, every child still running."""
        if self.stop_by is not None and now >= self.stop_by:
            self.stop_by = None
            log.warning("⚠️  %d worker process(es) still running %d s after SIGTERM; killing them (their jobs are "
                        "redelivered)", len(self.children), self.settings.worker_stop_grace_seconds)
            for pid in list(self.children):
                _kill(pid, signal.SIGKILL)
        for pid, slot in list(self.children.items()):
            stalled = self.heartbeats[slot].stalled_for(now)
            if pid in self.stalled or stalled < self.settings.job_stall_seconds:
                continue
            character_id = self.heartbeats[slot].read()[2]
            log.error("❌ worker process %d: its job (character %d) made no progress for %.0f s; killing the process "
                      "(the job is redelivered)", pid, character_id, stalled)
            self.stalled.add(pid)
            _kill(pid, signal.SIGKILL)

    def wait_unless_signalled(self, seconds: float) -> None:
        """Sleep, but not past a signal: SIGTERM is relayed at once, not after a restart delay (and the watchdog
        keeps watching the other children meanwhile)."""
        deadline = time.monotonic() + seconds
        while not self.signals and time.monotonic() < deadline:
            time.sleep(max(0.0, min(0.2, deadline - time.monotonic())))
            self.watch(time.monotonic())

    def spawn(self, slot: int) -> None:
        """Fork one child; it makes its own connections."""
        self.heartbeats[slot].end()  # whatever the slot's last child left there
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child_main(self.settings, burst=self.burst, heartbeat=self.heartbeats[slot])
            except BaseException:
                log.exception("worker process crashed")
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = slot
        self.started[pid] = time.monotonic()


def child_main(settings: Settings, *, burst: bool, heartbeat: Heartbeat | None = None) -> int:
    """Entry point of a forked child."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C goes to the parent, which relays SIGTERM
    child = Child(settings, burst=burst, heartbeat=heartbeat)

    def on_term(signum, frame):
        if child.stopping.is_set():
            os._exit(1)  # a second signal means now; unacked messages are redelivered
        child.stopped_at = time.monotonic()
        child.stopping.set()

    signal.signal(signal.SIGTERM, on_term)
    return child.run()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------------- commands


def replay_dead(settings: Settings, limit: int | None) -> int:
    """Move dead-lettered jobs back to the job queue, attempts reset; returns how many moved."""
    moved = 0
    with broker.open_channel(settings.rabbitmq_url, settings.queue_name,
                             max_attempts=settings.max_attempts) as channel:
        while limit is None or moved < limit:
            method, properties, body = channel.basic_get(broker.dead_queue(settings.queue_name))
            if method is None:
                break
            broker.publish(channel, settings.queue_name, body, priority=properties.priority or 0,
                           message_id=properties.message_id)
            channel.basic_ack(method.delivery_tag)
            moved += 1
    return moved


def seal_tokens(settings: Settings) -> tuple[int, int]:
    """Rewrite every stored refresh token under TOKEN_KEY's first key, plaintext ones included, each in its own
    transaction and only over the value it read (a login or a refresh meanwhile wins); returns how many were
    rewritten and how many no key opens (left as they are)."""
    vault, rewritten, unopened, after = TokenVault(settings.token_keys), 0, 0, 0
    with db.connect(settings.database_url) as conn:
        while batch := db.stored_refresh_tokens(conn, after=after):
            conn.commit()
            for row in batch:
                try:
                    resealed = vault.reseal(row["refresh_token"])
                except TokenKeyError as exc:
                    log.warning("🔑 %s: %s; left as it is", row["character_id"], exc)
                    unopened += 1
                    continue
                rewritten += db.replace_stored_token(conn, row["character_id"], resealed,
                                                     replaces=row["refresh_token"])
                conn.commit()
            after = batch[-1]["character_id"]
    return rewritten, unopened


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sync killmails from ESI for queued users.")
    parser.add_argument("--burst", action="store_true", help="exit 0 once the queue is empty and nothing is in flight")
    parser.add_argument("--replay-dead", action="store_true", help="move dead-lettered jobs back to the queue")
    parser.add_argument("--limit", type=int, metavar="N", help="with --replay-dead: move at most N jobs")
    parser.add_argument("--seal-tokens", action="store_true",
                        help="rewrite every stored refresh token under TOKEN_KEY's first key, then exit")
    parser.add_argument("--verbose", action="store_true", help="log with time, level and pid")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(verbose=args.verbose)
    settings = load_settings_or_exit()
    if args.replay_dead:
        try:
            moved = replay_dead(settings, args.limit)
        except BROKER_ERRORS as exc:
            print(f"❌ cannot reach RabbitMQ at RABBITMQ_URL: {describe(exc)}", file=sys.stderr)
            return 1
        log.info("♻️  Moved %d dead jobs back to %s", moved, settings.queue_name)
        return 0
    if args.seal_tokens:
        return run_seal_tokens(settings)
    log.info("🔄 Killmail Worker Started")
    cap_malloc_arenas()
    log.info("📦 Queue: %s", settings.queue_name)
    log.info("⚡ Prefetch: %d concurrent users", settings.prefetch_count)
    log.info("🔐 Refresh tokens: %s", f"sealed with TOKEN_KEY ({len(settings.token_keys)} keys)"
             if settings.token_keys else "stored as given (TOKEN_KEY is not set)")
    supervisor = Supervisor(settings, burst=args.burst)
    supervisor.catch_signals()  # a stop while the broker and the database are checked ends the worker cleanly
    # The parent checks the broker and declares the queues, then closes: it holds no connection at the fork.
    try:
        with broker.open_channel(settings.rabbitmq_url, settings.queue_name, max_attempts=settings.max_attempts):
            pass
        with db.connect(settings.database_url) as conn:
            conn.execute("SELECT 1")
    except BROKER_ERRORS as exc:
        print(f"❌ cannot reach RabbitMQ at RABBITMQ_URL: {describe(exc)}", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"❌ cannot reach PostgreSQL at DATABASE_URL: {describe(exc)}", file=sys.stderr)
        return 1
    log.info("✅ Connected to RabbitMQ")
    log.info("⏳ Waiting for killmail sync jobs...")
    return supervisor.run()


def run_seal_tokens(settings: Settings) -> int:
    """The --seal-tokens command: 0 when every stored token is under the first key now, 1 otherwise."""
    if not settings.token_keys:
        print("configuration error: TOKEN_KEY: must be set to seal tokens", file=sys.stderr)
        return 2
    try:
        rewritten, unopened = seal_tokens(settings)
    except psycopg.OperationalError as exc:
        print(f"❌ cannot reach PostgreSQL at DATABASE_URL: {describe(exc)}", file=sys.stderr)
        return 1
    log.info("🔐 Sealed %d refresh tokens with TOKEN_KEY's first key; %d no key opens", rewritten, unopened)
    return 1 if unopened else 0


def cap_malloc_arenas() -> None:
    """Cap glibc's malloc arenas before the children are forked (they inherit it). glibc gives each thread that
    allocates an arena of its own, up to 8 per core, and keeps what each one grew to, so a child with many detail
    threads grows for minutes before it settles; with two arenas its memory stays flat (bench/memory.py).
    MALLOC_ARENA_MAX, when the operator sets it, wins; other C libraries have no such arenas."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())

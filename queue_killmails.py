"""Queue every user that is due for a killmail sync (run by cron every few minutes)."""
from __future__ import annotations

import argparse
import logging
import sys
from datetime import UTC, datetime

import pika.exceptions
import psycopg

import broker
import db
import values
from enqueue import CLAIM_STALE_SECONDS, queue_one
from esi import EsiClient
from limits import SharedLimits
from settings import ConfigError, Settings, describe, load_settings, setup_logging

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--character-id", type=int, metavar="N", help="queue this one character now, at high priority")
    parser.add_argument("--full", action="store_true",
                        help="with --character-id: re-read the character's whole 90 days, ignoring stored ETags")
    parser.add_argument("--dry-run", action="store_true", help="say what would be queued, queue nothing")
    parser.add_argument("--corporations", action="store_true",
                        help="queue only the due corporations (a plain run queues users and corporations)")
    parser.add_argument("--stats", action="store_true", help="print what is due, queued, retrying and dead")
    parser.add_argument("--revalue", action="store_true",
                        help="value the stored killmails whose ISK value is missing (refreshing prices if stale)")
    parser.add_argument("--verbose", action="store_true", help="log with time, level and pid")
    return parser.parse_args(argv)


def queue_due(conn, channel, settings: Settings, now: datetime, *, users: bool = True,
              corporations: bool = True) -> tuple[dict[str, int], list[str]]:
    """Claim and publish every due user and corporation; returns ({"users": n, "corporations": m}, problems).
    One whose message the broker did not take is released again, so the next run retries it."""
    claimed: list[tuple[broker.Job, int, str]] = []
    if users:
        rows = db.claim_due_users(conn, now, interval=settings.sync_interval_seconds,
                                  stale_after=CLAIM_STALE_SECONDS)
        conn.commit()
        log.info("✓ Found %d users to sync", len(rows))
        claimed += [(broker.new_job(r["character_id"], r["character_name"], now=now), _priority(r),
                     r["character_name"] or str(r["character_id"])) for r in rows]
    if corporations:
        rows = db.claim_due_corporations(conn, now, interval=settings.sync_interval_seconds,
                                         stale_after=CLAIM_STALE_SECONDS)
        conn.commit()
        if rows or not users:
            log.info("✓ Found %d corporations to sync through a director", len(rows))
        claimed += [(broker.new_job(r["character_id"], r["character_name"], corporation_id=r["corporation_id"],
                                    now=now), _priority(r), f"corporation {r['corporation_id']}") for r in rows]
    if claimed:
        log.info("📤 Adding to queue...")
    queued, problems = {"users": 0, "corporations": 0}, []
    for done, (job, priority, label) in enumerate(claimed):
        try:
            broker.publish(channel, settings.queue_name, broker.encode_job(job), priority=priority)
        except broker.NotDelivered as exc:
            _release(conn, [job])
            problems.append(f"{label}: {exc}")
            continue
        except BaseException:
            # The broker went away mid-run (or the run was stopped): none of the jobs not confirmed yet, this one
            # included, may stay claimed, or those pilots would wait for the stale-claim limit (hours) unsynced.
            # One that reached the queue after all is synced twice at worst, which the workers' locks allow.
            _release(conn, [j for j, _, _ in claimed[done:]])
            raise
        queued["users" if job.corporation_id is None else "corporations"] += 1
    return queued, problems


def _release(conn, jobs: list[broker.Job]) -> None:
    """Free the claims of jobs the broker did not take, so the next run queues them again."""
    for job in jobs:
        if job.corporation_id is not None:
            db.release_corporation(conn, job.corporation_id)
        else:
            db.release_user(conn, job.character_id)
    conn.commit()


def _priority(row: dict) -> int:
    """First syncs of new users come before routine polls."""
    return broker.PRIORITY_FIRST if row["last_sync_at"] is None else broker.PRIORITY_ROUTINE


def queue_all(conn, channel, settings: Settings, now: datetime, *, corporations_only: bool) -> int:
    """A plain run (users and corporations) or --corporations: queue what is due and say so; 1 when the broker
    did not take some of it."""
    queued, problems = queue_due(conn, channel, settings, now, users=not corporations_only)
    for problem in problems:
        log.error("❌ not queued: %s", problem)
    if problems:
        log.error("❌ %d users could not be queued; they will be retried on the next run", len(problems))
        return 1
    if corporations_only:
        log.info("✅ All %d corporations queued successfully!", queued["corporations"])
    else:
        log.info("✅ All %d users queued successfully!", queued["users"])
        if queued["corporations"]:
            log.info("✅ And %d corporations, each through a director", queued["corporations"])
    log.info("💡 Now run the worker to process them: python killmail_worker.py")
    return 0


def queue_character(conn, channel, settings: Settings, character_id: int, now: datetime, *, full: bool) -> int:
    """--character-id: queue one character now, at high priority; 1 when there is no such user."""
    try:
        queued, message = queue_one(conn, channel, settings, character_id, now, full=full)
    except LookupError as exc:
        print(f"❌ {exc}", file=sys.stderr)
        return 1
    log.info("%s %s", "✅" if queued else "⏳", message)
    return 0


def print_stats(conn, connection, settings: Settings, now: datetime) -> int:
    """--stats: what is due, queued, waiting for a retry and dead, for an operator."""
    users = db.user_states(conn, now, interval=settings.sync_interval_seconds, stale_after=CLAIM_STALE_SECONDS)
    log.info("👥 Users: %d in all; due now: %d, queued or running: %d, synced within their interval: %d, "
             "never synced: %d, needing a new login: %d", sum(users.values()), users["due"], users["queued"],
             users["active"], users["never_synced"], users["needs_relogin"])
    queue = broker.queue_depths(connection, settings.queue_name, max_attempts=settings.max_attempts)
    log.info("📦 Queue %s: %d ready, %d consumers; waiting for a retry: %d; dead: %d", settings.queue_name,
             queue["depth"], queue["consumers"], queue["retrying"], queue["dead"])
    return 0


def dry_run(conn, settings: Settings, now: datetime, character_id: int | None, *, corporations_only: bool) -> int:
    """--dry-run: print what a real run with the same flags would queue."""
    if not corporations_only:
        users = db.due_users(conn, now, interval=settings.sync_interval_seconds, stale_after=CLAIM_STALE_SECONDS)
        if character_id is not None:
            users = [u for u in users if u["character_id"] == character_id] or \
                ([u] if (u := db.get_user(conn, character_id)) else [])
        log.info("✓ Found %d users to sync (dry run: nothing queued)", len(users))
        for user in users:
            log.info("  would queue %s (ID: %s), %s", user["character_name"], user["character_id"],
                     _last_sync(user))
    if character_id is None:
        due = db.due_corporations(conn, now, interval=settings.sync_interval_seconds,
                                  stale_after=CLAIM_STALE_SECONDS)
        log.info("✓ Found %d corporations due (dry run: nothing queued)", len(due))
        for corporation in due:
            log.info("  would queue corporation %s through %s (ID: %s), %s", corporation["corporation_id"],
                     corporation["character_name"], corporation["character_id"], _last_sync(corporation))
    conn.rollback()
    return 0


def _last_sync(row: dict) -> str:
    return "first sync" if row["last_sync_at"] is None else f"last sync {row['last_sync_at'].isoformat()}"


def revalue(conn, settings: Settings, now: datetime) -> int:
    """Value the killmails saved without a value, at the stored prices (refreshed first when they expired)."""
    esi = EsiClient(settings, limits=SharedLimits(lambda: db.connect(settings.database_url, autocommit=True),
                                                 egress=settings.esi_egress))
    prices = values.PriceBook().refresh(conn, esi, now)
    if not prices:
        print("❌ no market prices: ESI did not answer /markets/prices/ and none are stored", file=sys.stderr)
        return 1
    log.info("💰 Valued %d killmails", values.revalue(conn, prices, notify_max_age=settings.notify_max_age_seconds))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Read the settings, connect, and run the mode the flags ask for; the exit status."""
    args = parse_args(argv)
    setup_logging(verbose=args.verbose)
    try:
        settings = load_settings(need_esi=args.revalue)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    log.info("📡 Queueing users for killmail sync...")
    now = datetime.now(UTC)
    try:
        conn = db.connect(settings.database_url)
    except psycopg.OperationalError as exc:
        print(f"❌ cannot reach PostgreSQL at DATABASE_URL: {describe(exc)}", file=sys.stderr)
        return 1
    with conn:
        if args.revalue:
            return revalue(conn, settings, now)
        if args.dry_run:
            return dry_run(conn, settings, now, args.character_id, corporations_only=args.corporations)
        # A run declares only the queue it publishes to: the retry and dead-letter queues are the workers' (each
        # declares them before it consumes), and a cron run should not spend its time on them. The stats read
        # them all.
        try:
            with broker.open_channel(settings.rabbitmq_url, settings.queue_name,
                                     max_attempts=settings.max_attempts if args.stats else None) as channel:
                if args.stats:
                    return print_stats(conn, channel.connection, settings, now)
                if args.character_id is not None:
                    return queue_character(conn, channel, settings, args.character_id, now, full=args.full)
                return queue_all(conn, channel, settings, now, corporations_only=args.corporations)
        except pika.exceptions.AMQPError as exc:
            print(f"❌ cannot reach RabbitMQ at RABBITMQ_URL: {describe(exc)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())

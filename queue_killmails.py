"""Queue every user that is due for a killmail sync (run by cron every few minutes)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import NamedTuple

import pika.exceptions
import psycopg

import broker
import db
import values
from enqueue import CLAIM_STALE_SECONDS, queue_one
from esi import EsiClient
from limits import SharedLimits
from settings import Settings, describe, load_settings_or_exit, setup_logging

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


# Owners claimed (and committed) at a time, as fetched from the cursor of those due.
CLAIM_BATCH = 2000
# Messages published and not yet confirmed at most: enough that the broker always has work while a batch is
# claimed, few enough that a run holds little.
PUBLISH_WINDOW = 10000


class Claim(NamedTuple):
    """One claimed owner whose job is on its way to the broker: kind is Job.kind."""

    kind: str
    owner_id: int
    label: str


def queue_due(conn: db.Connection, settings: Settings, now: datetime, *, users: bool = True,
              corporations: bool = True) -> tuple[dict[str, int], list[str]]:
    """Claim and publish every due user and corporation; returns ({"users": n, "corporations": m}, problems).

    The due are read from a cursor held on the server and claimed CLAIM_BATCH at a time, each claim committed
    before its messages go out, so the run holds one batch and the messages in flight, never every row. A claim
    is marked with this session (`claimed_by`, the PostgreSQL backend's pid) until the broker confirms its
    message; messages are published with up to PUBLISH_WINDOW in flight (broker.publish_confirmed). Each settles:
    - confirmed: the mark is cleared, and the claim stands until the worker ends the job;
    - nacked, returned or in flight when the connection went: the claim is released at once;
    - in flight when this process dies (killed between publish and confirm): the claim keeps the mark of a session
      that is gone, and the next run's db.release_unconfirmed frees it before it claims.
    A job that reached the queue although its claim was freed is synced twice at worst, which the workers' locks
    allow; a pilot is never left claimed without a job."""
    kinds = (["character"] if users else []) + (["corporation"] if corporations else [])
    for kind in kinds:
        db.release_unconfirmed(conn, kind)
    if corporations:
        db.add_eligible_corporations(conn, now)
    window = {"interval": settings.sync_interval_seconds, "stale_after": CLAIM_STALE_SECONDS}
    with contextlib.ExitStack() as cursors:
        due_users = cursors.enter_context(db.open_due_users(conn, now, **window)) if users else None
        due_corporations = cursors.enter_context(db.open_due_corporations(conn, now, **window)) \
            if corporations else None
        conn.commit()  # the cursors are held from here: each batch is claimed in a transaction of its own
        batches = _claimed_batches(conn, due_users, due_corporations, now, settings)
        queued: dict[str, int] = {"users": 0, "corporations": 0}
        problems: list[str] = []

        def settle(confirmed: list[Claim], failed: list[tuple[Claim, str]]) -> None:
            # A transaction a kind: a corporation's job holds its corporation's row and then writes its
            # director's users row, so a settle holding pilots' rows while it waited for a corporation's
            # would deadlock with it.
            for kind in kinds:
                db.confirm_claims(conn, kind, [c.owner_id for c in confirmed if c.kind == kind])
                db.release_claims(conn, kind, [c.owner_id for c, _ in failed if c.kind == kind])
                conn.commit()
            for claim in confirmed:
                queued["users" if claim.kind == "character" else "corporations"] += 1
            problems.extend(f"{claim.label}: {why}" for claim, why in failed)

        try:
            broker.publish_confirmed(settings.rabbitmq_url, settings.queue_name, batches, settle,
                                     window=PUBLISH_WINDOW)
        except BaseException:
            _release_unconfirmed(conn, kinds)
            raise
    return queued, problems


def _claimed_batches(conn: db.Connection, due_users, due_corporations, now: datetime,
                     settings: Settings) -> Iterator[list[broker.Outgoing]]:
    """Say how many are due, then claim them a batch at a time (users first), yielding each batch's messages."""
    first_users = due_users.fetchmany(CLAIM_BATCH) if due_users is not None else []
    first_corporations = due_corporations.fetchmany(CLAIM_BATCH) if due_corporations is not None else []
    conn.commit()
    if due_users is not None:
        log.info("✓ Found %d users to sync", first_users[0]["due"] if first_users else 0)
    if due_corporations is not None and (first_corporations or due_users is None):
        log.info("✓ Found %d corporations to sync through a director",
                 first_corporations[0]["due"] if first_corporations else 0)
    if first_users or first_corporations:
        log.info("📤 Adding to queue...")
    stamp = broker.new_job(0, None, now=now).queued_at
    for rows, cursor in ((first_users, due_users), (first_corporations, due_corporations)):
        while rows:
            if "corporation_id" in rows[0]:
                claimed = db.claim_corporations(conn, rows, now, interval=settings.sync_interval_seconds,
                                                stale_after=CLAIM_STALE_SECONDS)
            else:
                claimed = db.claim_users(conn, [r["character_id"] for r in rows], now,
                                         interval=settings.sync_interval_seconds, stale_after=CLAIM_STALE_SECONDS)
            conn.commit()
            yield [_message(row, stamp) for row in rows
                   if row.get("corporation_id", row["character_id"]) in claimed]
            rows = cursor.fetchmany(CLAIM_BATCH)


def _message(row: dict, stamp: str) -> broker.Outgoing:
    """The job message of a claimed user or corporation (a row of the due cursor)."""
    corporation_id = row.get("corporation_id")
    job = broker.Job(row["character_id"], row["character_name"], stamp, corporation_id)
    if corporation_id is None:
        claim = Claim("character", row["character_id"], row["character_name"] or str(row["character_id"]))
    else:
        claim = Claim("corporation", corporation_id, f"corporation {corporation_id}")
    return broker.Outgoing(broker.encode_job(job), _priority(row), claim)


def _release_unconfirmed(conn: db.Connection, kinds: list[str]) -> None:
    """The run stopped (the broker or the database went away, or a signal): free what it claimed and did not see
    confirmed now, rather than at the next run."""
    try:
        conn.rollback()
        for kind in kinds:
            db.release_unconfirmed(conn, kind)
        conn.commit()
    except psycopg.Error:
        log.warning("could not free this run's unconfirmed claims now; the next run frees them")


def _priority(row: dict) -> int:
    """First syncs of new users come before routine polls."""
    return broker.PRIORITY_FIRST if row["last_sync_at"] is None else broker.PRIORITY_ROUTINE


def queue_all(conn: db.Connection, settings: Settings, now: datetime, *, corporations_only: bool) -> int:
    """A plain run (users and corporations) or --corporations: queue what is due and say so; 1 when the broker
    did not take some of it."""
    queued, problems = queue_due(conn, settings, now, users=not corporations_only)
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


def queue_character(conn: db.Connection, channel, settings: Settings, character_id: int, now: datetime, *,
                    full: bool) -> int:
    """--character-id: queue one character now, at high priority; 1 when there is no such user."""
    try:
        queued, message = queue_one(conn, channel, settings, character_id, now, full=full)
    except LookupError as exc:
        print(f"❌ {exc}", file=sys.stderr)
        return 1
    log.info("%s %s", "✅" if queued else "⏳", message)
    return 0


def print_stats(conn: db.Connection, connection, settings: Settings, now: datetime) -> int:
    """--stats: what is due, queued, waiting for a retry and dead, for an operator."""
    users = db.user_states(conn, now, interval=settings.sync_interval_seconds, stale_after=CLAIM_STALE_SECONDS)
    log.info("👥 Users: %d in all; due now: %d, queued or running: %d, synced within their interval: %d, "
             "never synced: %d, needing a new login: %d", sum(users.values()), users["due"], users["queued"],
             users["active"], users["never_synced"], users["needs_relogin"])
    queue = broker.queue_depths(connection, settings.queue_name, max_attempts=settings.max_attempts)
    log.info("📦 Queue %s: %d ready, %d consumers; waiting for a retry: %d; dead: %d", settings.queue_name,
             queue["depth"], queue["consumers"], queue["retrying"], queue["dead"])
    return 0


def dry_run(conn: db.Connection, settings: Settings, now: datetime, character_id: int | None, *,
            corporations_only: bool) -> int:
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


def revalue(conn: db.Connection, settings: Settings, now: datetime) -> int:
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
    settings = load_settings_or_exit(need_esi=args.revalue)
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
            if not args.stats and args.character_id is None:
                return queue_all(conn, settings, now, corporations_only=args.corporations)
            with broker.open_channel(settings.rabbitmq_url, settings.queue_name,
                                     max_attempts=settings.max_attempts if args.stats else None) as channel:
                if args.stats:
                    return print_stats(conn, channel.connection, settings, now)
                return queue_character(conn, channel, settings, args.character_id, now, full=args.full)
        except pika.exceptions.AMQPError as exc:
            print(f"❌ cannot reach RabbitMQ at RABBITMQ_URL: {describe(exc)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())

"""Put one pilot on the job queue now, at high priority: claim it in PostgreSQL, publish its job, release the
claim when the broker does not take it. Shared by the producer (`--character-id`), the web app's API and the
login callback and a pilot's "Sync now".
"""
from __future__ import annotations

import logging
from datetime import datetime

import pika.exceptions

import broker
import db
from settings import Settings, describe

log = logging.getLogger(__name__)

# A claim older than this is taken to belong to a job that was lost (longer than a job's whole retry ladder).
CLAIM_STALE_SECONDS = 7200


class BrokerUnavailable(Exception):
    """RabbitMQ could not be reached to queue the job."""


def queue_one(conn: db.Connection, channel, settings: Settings, character_id: int, now: datetime, *,
              full: bool) -> tuple[bool, str]:
    """Queue one character at high priority; returns whether it was queued now, and what happened in words.
    LookupError for an unknown character; broker.NotDelivered if the broker did not take the message."""
    user = db.claim_user(conn, character_id, now, stale_after=CLAIM_STALE_SECONDS)
    conn.commit()
    if user is None:
        existing = db.get_user(conn, character_id)
        conn.commit()
        if existing is None:
            raise LookupError(f"no user with character id {character_id}")
        return False, f"{existing['character_name'] or character_id} is already queued (since {existing['queued_at']})"
    job = broker.new_job(character_id, user["character_name"], now=now, full=full)
    try:
        broker.publish(channel, settings.queue_name, broker.encode_job(job), priority=broker.PRIORITY_NOW)
    except broker.NotDelivered:
        db.release_user(conn, character_id)
        conn.commit()
        raise
    return True, f"Queued {user['character_name'] or character_id} at high priority"


def queue_one_now(conn: db.Connection, settings: Settings, character_id: int, now: datetime, *,
                  timeout: float = 2.0) -> tuple[bool, str]:
    """queue_one over a short-lived broker connection of its own, for a web request; BrokerUnavailable when
    RabbitMQ does not answer within about twice `timeout` seconds."""
    try:
        with broker.open_channel(settings.rabbitmq_url, settings.queue_name, max_attempts=settings.max_attempts,
                                 timeout=timeout) as channel:
            return queue_one(conn, channel, settings, character_id, now, full=False)
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailable(f"broker unavailable: {describe(exc)}") from exc


def queue_from_web(conn: db.Connection, settings: Settings, character_id: int, now: datetime) -> str:
    """queue_one_now for a page (a login, a pilot's "Sync now"), in words: a broker that is down only delays the
    sync to the producer's next run."""
    try:
        return queue_one_now(conn, settings, character_id, now)[1]
    except (BrokerUnavailable, broker.NotDelivered) as exc:
        log.warning("%s is not queued now: %s", character_id, exc)
        return "not queued just now (the broker did not answer); the producer's next run queues it"

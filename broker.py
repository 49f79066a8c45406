"""RabbitMQ topology and messages shared by the producer and the worker.

`<queue>` holds the jobs (durable, priorities 0-10). A failed job is republished to `<queue>.retry.<n>`, whose
messages expire after the n-th backoff delay and dead-letter back to `<queue>`; after the last attempt it goes
to `<queue>.dead`, where an operator sees it and replays it. Messages carry ids, never tokens.
"""
from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
from pika.exceptions import NackError, UnroutableError

MAX_PRIORITY = 10
PRIORITY_NOW = 9        # a user asked for a sync now
PRIORITY_FIRST = 5      # a user's first sync
PRIORITY_ROUTINE = 1    # a routine poll
ATTEMPT_HEADER = "x-killmail-attempt"
MAX_ATTEMPT = 1000  # an attempt header beyond any MAX_ATTEMPTS: the job is past its last try
JITTER = 0.25           # retry delays are stretched by up to this share, so failed jobs do not return together


class BadMessage(ValueError):
    """A queue message that is not a job (not JSON, or missing or wrong fields)."""


class NotDelivered(Exception):
    """The broker did not take a message (nacked, unroutable, or the connection went away)."""


@dataclass(frozen=True)
class Job:
    """One queued sync: a character's own killmails, or (with corporation_id) its corporation's."""

    character_id: int
    character_name: str | None
    queued_at: str
    corporation_id: int | None = None
    full: bool = False

    @property
    def kind(self) -> str:
        """'character' or 'corporation'."""
        return "character" if self.corporation_id is None else "corporation"


def attempt_number(value: Any) -> int:
    """A message's attempt header as an attempt number from 1 to MAX_ATTEMPT: absent, not a whole number (text
    or bytes of digits count) or below 1 means a first attempt; the header is the worker's own, a bad one the
    sign of a hand-made message, which must still land in an existing retry queue."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        digits = value.strip()
        if not (digits.isascii() and digits.isdigit()):
            return 1
        # More digits than any attempt count are past the last try (and never a 5000-digit int() to parse).
        value = int(digits) if len(digits) <= 9 else MAX_ATTEMPT
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return 1
    return min(value, MAX_ATTEMPT)


def retry_queue(queue: str, attempt: int) -> str:
    """The delay queue a job goes to after its attempt-th failure."""
    return f"{queue}.retry.{attempt}"


def dead_queue(queue: str) -> str:
    """The dead-letter queue of a job queue."""
    return f"{queue}.dead"


def retry_delay(attempt: int, base: int, rng: random.Random) -> float:
    """Seconds a job waits after its attempt-th failure: base * 2**(attempt-1), stretched by up to JITTER."""
    return base * 2 ** (attempt - 1) * (1 + rng.uniform(0, JITTER))


def declare_job_queue(channel, queue: str) -> None:
    """Declare the job queue (durable, with priorities), all a producer publishes to."""
    channel.queue_declare(queue, durable=True, arguments={"x-max-priority": MAX_PRIORITY})


def declare_topology(channel, queue: str, *, max_attempts: int) -> None:
    """Declare the job queue, its retry queues and its dead-letter queue (the same way in every process)."""
    declare_job_queue(channel, queue)
    for attempt in range(1, max_attempts):
        channel.queue_declare(retry_queue(queue, attempt), durable=True, arguments={
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
        })
    channel.queue_declare(dead_queue(queue), durable=True)


def encode_job(job: Job) -> bytes:
    """A job as the JSON body of a message."""
    body: dict[str, Any] = {"character_id": job.character_id, "character_name": job.character_name,
                            "queued_at": job.queued_at}
    if job.corporation_id is not None:
        body["corporation_id"] = job.corporation_id
    if job.full:
        body["full"] = True
    return json.dumps(body).encode()


def decode_job(body: bytes) -> Job:
    """Parse a message body into a Job, or raise BadMessage saying what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadMessage(f"message is not JSON: {body[:80]!r}") from exc
    if not isinstance(data, dict):
        raise BadMessage("message is not a JSON object")
    character_id = data.get("character_id")
    if isinstance(character_id, bool) or not isinstance(character_id, int) or character_id <= 0:
        raise BadMessage(f"message has no valid character_id: {character_id!r}")
    corporation_id = data.get("corporation_id")
    if corporation_id is not None and (isinstance(corporation_id, bool) or not isinstance(corporation_id, int)
                                       or corporation_id <= 0):
        raise BadMessage(f"message has an invalid corporation_id: {corporation_id!r}")
    name = data.get("character_name")
    return Job(character_id, name if isinstance(name, str) else None, str(data.get("queued_at", "")),
               corporation_id, bool(data.get("full", False)))


def new_job(character_id: int, character_name: str | None, *, corporation_id: int | None = None,
            full: bool = False, now: datetime | None = None) -> Job:
    """A job stamped with the time it was queued."""
    stamp = (now or datetime.now(UTC)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return Job(character_id, character_name, stamp, corporation_id, full)


def publish(channel, routing_key: str, body: bytes, *, priority: int = 0, headers: dict | None = None,
            message_id: str | None = None, expiration_ms: int | None = None) -> None:
    """Publish one persistent message on a confirming channel; raise NotDelivered if the broker did not take it."""
    properties = pika.BasicProperties(
        content_type="application/json", delivery_mode=pika.DeliveryMode.Persistent, priority=priority,
        message_id=message_id or uuid.uuid4().hex, headers=headers,
        expiration=str(expiration_ms) if expiration_ms is not None else None,
    )
    try:
        channel.basic_publish("", routing_key, body, properties=properties, mandatory=True)
    except (NackError, UnroutableError) as exc:
        raise NotDelivered(f"broker did not take the message for {routing_key}: {exc}") from exc
    except pika.exceptions.AMQPError as exc:
        raise NotDelivered(f"connection lost while publishing to {routing_key}: {exc!r}") from exc


def connect(url: str, *, heartbeat: int = 30, timeout: float = 10.0) -> pika.BlockingConnection:
    """A blocking connection with a heartbeat; connecting (TCP, TLS and the AMQP handshake) gives up after
    about twice `timeout` seconds."""
    parameters = pika.URLParameters(url)
    parameters.heartbeat = heartbeat
    parameters.socket_timeout = timeout
    parameters.stack_timeout = 2 * timeout
    parameters.blocked_connection_timeout = max(60.0, 2 * timeout)
    parameters.connection_attempts = 1
    return pika.BlockingConnection(parameters)


@contextmanager
def open_channel(url: str, queue: str, *, max_attempts: int | None = None,
                 timeout: float = 10.0) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A channel with publisher confirms on a connection of its own, with the job queue declared (given
    max_attempts, its retry and dead-letter queues too: what a consumer needs). The connection is closed when
    the block ends; `channel.connection` is it."""
    connection = connect(url, timeout=timeout)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        if max_attempts is None:
            declare_job_queue(channel, queue)
        else:
            declare_topology(channel, queue, max_attempts=max_attempts)
        yield channel
    finally:
        if connection.is_open:
            try:
                connection.close()
            except (pika.exceptions.AMQPError, OSError):
                pass  # what was published is confirmed or lost already: a failed goodbye changes neither


def queue_depths(connection, queue: str, *, max_attempts: int) -> dict[str, int]:
    """Jobs ready in the queue, its consumers, jobs waiting in its retry queues and jobs in its dead-letter
    queue, by passive declares (a queue never declared counts 0)."""
    retries = [retry_queue(queue, n) for n in range(1, max_attempts)]
    counts = _passive_counts(connection, [queue, *retries, dead_queue(queue)])
    return {"depth": counts[queue][0], "consumers": counts[queue][1],
            "retrying": sum(counts[q][0] for q in retries), "dead": counts[dead_queue(queue)][0]}


def _passive_counts(connection, queues: list[str]) -> dict[str, tuple[int, int]]:
    channel = connection.channel()
    counts = {}
    for name in queues:
        try:
            method = channel.queue_declare(name, passive=True).method
            counts[name] = (method.message_count, method.consumer_count)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise
            counts[name] = (0, 0)
            channel = connection.channel()  # a failed passive declare closes the channel
    channel.close()
    return counts

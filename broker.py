"""RabbitMQ topology and messages shared by the producer and the worker.

`<queue>` holds the jobs (durable, priorities 0-10). A failed job is republished to `<queue>.retry.<n>`, whose
messages expire after the n-th backoff delay and dead-letter back to `<queue>`; after the last attempt it goes
to `<queue>.dead`, where an operator sees it and replays it. Messages carry ids, never tokens.
"""
from __future__ import annotations

import json
import random
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import takewhile
from typing import Any

import pika
from pika.exceptions import NackError, UnroutableError

from backoff import exponential

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
    return exponential(attempt, base=base) * (1 + rng.uniform(0, JITTER))


def declare_job_queue(channel, queue: str, **callback) -> None:
    """Declare the job queue (durable, with priorities), all a producer publishes to (an asynchronous channel
    passes its `callback`)."""
    channel.queue_declare(queue, durable=True, arguments={"x-max-priority": MAX_PRIORITY}, **callback)


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
    return pika.BlockingConnection(_parameters(url, heartbeat=heartbeat, timeout=timeout))


def _parameters(url: str, *, heartbeat: int, timeout: float) -> pika.URLParameters:
    parameters = pika.URLParameters(url)
    parameters.heartbeat = heartbeat
    parameters.socket_timeout = timeout
    parameters.stack_timeout = 2 * timeout
    # A broker short of memory or disk blocks publishers: after this long the connection is closed, so a run
    # gives back what it holds rather than waiting for ever.
    parameters.blocked_connection_timeout = max(60.0, 2 * timeout)
    parameters.connection_attempts = 1
    return parameters


@dataclass(frozen=True)
class Outgoing:
    """A job message for publish_confirmed, with the caller's token, which comes back when it is settled."""

    body: bytes
    priority: int
    token: Any


# settle(confirmed tokens, [(token, why it was not taken)]): how publish_confirmed hands back what settled.
Settle = Callable[[list[Any], list[tuple[Any, str]]], None]


def publish_confirmed(url: str, queue: str, batches: Iterable[list[Outgoing]], settle: Settle, *,
                      window: int = 4000, timeout: float = 10.0) -> None:
    """Publish batches of persistent job messages to `queue` (declared first) on a connection of their own, with
    up to `window` messages in flight, each settled by the broker's basic.ack or basic.nack (publisher confirms,
    pipelined: pika's asynchronous adapter, as in pika's own asynchronous publisher example). A batch is taken
    only when fewer than half the window are in flight, and `settle` is called with what settled so far before
    each batch is taken and at the end. A connection that cannot be opened, or is lost, raises pika's error,
    after every message still in flight was settled as failed."""
    _Pipeline(_parameters(url, heartbeat=30, timeout=timeout), queue, iter(batches), settle, window).run()


class _Pipeline:
    """publish_confirmed's state: pika's callbacks (on_*) run in its I/O loop, which run() drives."""

    def __init__(self, parameters: pika.URLParameters, queue: str, batches: Iterator[list[Outgoing]],
                 settle: Settle, window: int):
        self.queue, self.batches, self.settle, self.window = queue, batches, settle, window
        self.in_flight: OrderedDict[int, tuple[Any, str]] = OrderedDict()  # delivery tag -> (token, message id)
        self.returned: set[str] = set()  # message ids the broker returned as unroutable (their ack follows)
        self.confirmed: list[Any] = []
        self.failed: list[tuple[Any, str]] = []
        self.published = 0  # the last delivery tag: the broker numbers a confirming channel's messages from 1
        self.exhausted = self.closing = self.caller_failed = False
        self.error: BaseException | None = None
        self.channel: Any = None  # pika's, once open (on_channel_open)
        self.connection = pika.SelectConnection(parameters, on_open_callback=self.on_open,
                                                on_open_error_callback=self.on_open_error,
                                                on_close_callback=self.on_closed)

    def run(self) -> None:
        """Drive the I/O loop until every message is settled or the connection is gone."""
        self.connection.ioloop.start()
        if self.caller_failed:
            assert self.error is not None  # set with caller_failed
            raise self.error
        if self.in_flight:  # the connection went before these were confirmed: none may stay claimed
            reason = f"connection lost before the broker confirmed the message: {self.error!r}"
            self.failed += [(token, reason) for token, _ in self.in_flight.values()]
            self.in_flight.clear()
        if self.confirmed or self.failed:
            self._settle()
        if self.error is not None:
            raise self.error

    def on_open(self, connection) -> None:
        connection.channel(on_open_callback=self.on_channel_open)

    def on_open_error(self, connection, error: BaseException) -> None:
        self.error = error
        connection.ioloop.stop()

    def on_channel_open(self, channel) -> None:
        self.channel = channel
        channel.add_on_close_callback(self.on_channel_closed)
        channel.add_on_return_callback(self.on_return)
        channel.confirm_delivery(ack_nack_callback=self.on_confirm,
                                 callback=lambda _: declare_job_queue(channel, self.queue, callback=self.on_declared))

    def on_declared(self, _frame) -> None:
        self._guarded(self._fill)

    def on_return(self, _channel, _method, properties, _body) -> None:
        self.returned.add(properties.message_id)

    def on_confirm(self, frame) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        # With `multiple`, every tag up to this one: the oldest in flight, so the walk stops at the first beyond.
        tags = list(takewhile(lambda tag: tag <= method.delivery_tag, self.in_flight)) if method.multiple \
            else [method.delivery_tag]
        for tag in tags:
            token, message_id = self.in_flight.pop(tag)
            if not acked:
                self.failed.append((token, "the broker nacked the message"))
            elif message_id in self.returned:
                self.returned.discard(message_id)
                self.failed.append((token, f"unroutable: no queue {self.queue}"))
            else:
                self.confirmed.append(token)
        if not self.exhausted and len(self.in_flight) <= self.window // 2:
            self._guarded(self._fill)
        elif self.exhausted and not self.in_flight:
            self._close()

    def on_channel_closed(self, _channel, reason: BaseException) -> None:
        if not self.closing:
            self.error = self.error or reason
            self._close()

    def on_closed(self, connection, reason: BaseException) -> None:
        if not self.closing:
            self.error = self.error or reason
        connection.ioloop.stop()

    def _fill(self) -> None:
        """Settle what was confirmed, then publish batches until the window is full or none is left."""
        self._settle()
        while len(self.in_flight) < self.window and not self.exhausted:
            batch = next(self.batches, None)
            if batch is None:
                self.exhausted = True
            else:
                for message in batch:
                    self._publish(message)
        if self.exhausted and not self.in_flight:
            self._close()

    def _publish(self, message: Outgoing) -> None:
        message_id = uuid.uuid4().hex
        properties = pika.BasicProperties(content_type="application/json", delivery_mode=pika.DeliveryMode.Persistent,
                                          priority=message.priority, message_id=message_id)
        self.channel.basic_publish("", self.queue, message.body, properties=properties, mandatory=True)
        self.published += 1
        self.in_flight[self.published] = (message.token, message_id)

    def _settle(self) -> None:
        confirmed, failed, self.confirmed, self.failed = self.confirmed, self.failed, [], []
        if confirmed or failed:
            self.settle(confirmed, failed)

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run the caller's code (taking a batch, settling) from a pika callback: an error in it ends the loop and
        is raised by run() as it is, nothing more settled (the caller releases what it has not seen confirmed)."""
        try:
            step()
        except BaseException as exc:  # raised again by run(), out of pika's loop
            self.error, self.caller_failed = exc, True
            self._close()

    def _close(self) -> None:
        self.closing = True
        if self.connection.is_open:
            self.connection.close()
        elif not self.connection.is_closing:
            self.connection.ioloop.stop()


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

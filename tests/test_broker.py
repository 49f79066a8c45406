"""broker.py's messages, queue names, retry delays and its thin pika calls (against a fake channel)."""
from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import pika
import pytest
from pika.exceptions import NackError, UnroutableError

import broker
from broker import BadMessage, Job, NotDelivered, decode_job, encode_job, new_job, retry_delay
from helpers import RABBITMQ_URL

# ------------------------------------------------------------------------------------------------ messages

@pytest.mark.parametrize("job", [
    Job(90000001, "Pilot One", "2026-11-29T12:00:00.000Z"),
    Job(90000001, None, "2026-11-29T12:00:00.000Z"),
    Job(90000001, "Director", "2026-11-29T12:00:00.000Z", corporation_id=98000001),
    Job(90000001, "Pilot One", "2026-11-29T12:00:00.000Z", full=True),
    Job(2 ** 40, "Ünïcödé ✓", "", corporation_id=2 ** 33, full=True),
])
def test_encode_decode_round_trip(job):
    assert decode_job(encode_job(job)) == job


def test_a_message_carries_ids_and_no_token():
    body = json.loads(encode_job(Job(42, "Pilot", "2026-11-29T12:00:00.000Z")))
    assert body == {"character_id": 42, "character_name": "Pilot", "queued_at": "2026-11-29T12:00:00.000Z"}


@pytest.mark.parametrize("body", [
    b"",
    b"not json",
    b"{character_id: 1}",
    b"\x80\x81",
    b"[1, 2]",
    b'"90000001"',
    b"90000001",
    b"null",
    b"{}",
    b'{"character_id": null}',
    b'{"character_id": 0}',
    b'{"character_id": -5}',
    b'{"character_id": true}',
    b'{"character_id": false}',
    b'{"character_id": "90000001"}',
    b'{"character_id": 1.5}',
    b'{"character_id": 1, "corporation_id": "98000001"}',
    b'{"character_id": 1, "corporation_id": true}',
    b'{"character_id": 1, "corporation_id": 0}',
    b'{"character_id": 1, "corporation_id": -1}',
])
def test_decode_job_rejects_what_is_not_a_job(body):
    with pytest.raises(BadMessage):
        decode_job(body)


def test_decode_job_is_lenient_about_the_optional_fields():
    job = decode_job(b'{"character_id": 7, "character_name": 12, "corporation_id": null}')
    assert job == Job(7, None, "", None, False)
    assert job.kind == "character"


def test_bad_message_is_a_value_error():
    assert issubclass(BadMessage, ValueError)


def test_new_job_is_stamped_in_utc_milliseconds():
    now = datetime(2026, 11, 29, 12, 34, 56, 789123, tzinfo=UTC)
    assert new_job(42, "Pilot", now=now) == Job(42, "Pilot", "2026-11-29T12:34:56.789Z")
    assert new_job(42, "Pilot", corporation_id=77, full=True, now=now).kind == "corporation"


# ------------------------------------------------------------------------------------------------ queues and delays

@pytest.mark.parametrize("queue, attempt, retry", [
    ("killmail_sync_queue", 1, "killmail_sync_queue.retry.1"),
    ("killmail_sync_queue", 7, "killmail_sync_queue.retry.7"),
    ("test_q", 3, "test_q.retry.3"),
])
def test_retry_queue_names(queue, attempt, retry):
    assert broker.retry_queue(queue, attempt) == retry


@pytest.mark.parametrize("queue, dead", [("killmail_sync_queue", "killmail_sync_queue.dead"), ("q", "q.dead")])
def test_dead_queue_names(queue, dead):
    assert broker.dead_queue(queue) == dead


@pytest.mark.parametrize("base", [1, 30])
@pytest.mark.parametrize("seed", range(5))
def test_retry_delay_grows_exponentially_within_the_jitter(base, seed):
    rng = random.Random(seed)
    delays = []
    for attempt in range(1, 11):
        low = base * 2 ** (attempt - 1)
        delay = retry_delay(attempt, base, rng)
        assert low <= delay <= low * (1 + broker.JITTER)
        delays.append(delay)
    assert delays == sorted(delays) and len(set(delays)) == len(delays)


def test_retry_delays_are_spread_so_failed_jobs_do_not_return_together():
    rng = random.Random(3)
    delays = {round(retry_delay(2, 30, rng), 3) for _ in range(50)}
    assert len(delays) > 40


@pytest.mark.parametrize("draw, expected", [(0.0, 120.0), (broker.JITTER, 150.0)])
def test_retry_delay_bounds_are_reached(draw, expected):
    class Fixed(random.Random):
        def uniform(self, a, b):
            assert (a, b) == (0, broker.JITTER)
            return draw
    assert retry_delay(3, 30, Fixed()) == expected


# ------------------------------------------------------------------------------------------------ pika shell

class FakeChannel:
    """Records declares and publishes; publishing raises `fail` when set."""

    def __init__(self, fail: Exception | None = None):
        self.declared: dict[str, dict] = {}
        self.published: list[tuple] = []
        self.fail = fail

    def queue_declare(self, queue, durable=False, arguments=None):
        self.declared[queue] = {"durable": durable, "arguments": arguments}

    def basic_publish(self, exchange, routing_key, body, properties=None, mandatory=False):
        if self.fail:
            raise self.fail
        self.published.append((exchange, routing_key, body, properties, mandatory))


def test_declare_topology_makes_the_job_retry_and_dead_queues():
    channel = FakeChannel()
    broker.declare_topology(channel, "q", max_attempts=4)
    assert list(channel.declared) == ["q", "q.retry.1", "q.retry.2", "q.retry.3", "q.dead"]
    assert all(d["durable"] for d in channel.declared.values())
    assert channel.declared["q"]["arguments"] == {"x-max-priority": broker.MAX_PRIORITY}
    for n in (1, 2, 3):
        assert channel.declared[f"q.retry.{n}"]["arguments"] == {"x-dead-letter-exchange": "",
                                                                 "x-dead-letter-routing-key": "q"}


def test_publish_sends_a_persistent_mandatory_message():
    channel = FakeChannel()
    broker.publish(channel, "q.retry.2", b"{}", priority=broker.PRIORITY_NOW, headers={broker.ATTEMPT_HEADER: 2},
                   expiration_ms=60000)
    exchange, routing_key, body, properties, mandatory = channel.published[0]
    assert (exchange, routing_key, body, mandatory) == ("", "q.retry.2", b"{}", True)
    assert properties.delivery_mode == pika.DeliveryMode.Persistent.value
    assert properties.priority == broker.PRIORITY_NOW
    assert properties.headers == {broker.ATTEMPT_HEADER: 2}
    assert properties.expiration == "60000"
    assert properties.message_id


@pytest.mark.parametrize("error", [NackError([]), UnroutableError([]), pika.exceptions.StreamLostError("gone"),
                                   pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND")])
def test_publish_that_the_broker_did_not_take_is_not_delivered(error):
    with pytest.raises(NotDelivered):
        broker.publish(FakeChannel(fail=error), "q", b"{}")


def declared(queue: str) -> bool:
    """Whether the broker has this queue (a passive declare on a connection of its own)."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        connection.channel().queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        if connection.is_open:
            connection.close()


@pytest.mark.parametrize("max_attempts", [None, 3])
def test_open_channel_confirms_declares_and_closes(queue_name, max_attempts):
    """The producer's channel declares the job queue only; a consumer's (max_attempts) its retries and dead
    letters too. Both confirm: an unroutable message is refused, not lost."""
    with broker.open_channel(RABBITMQ_URL, queue_name, max_attempts=max_attempts) as channel:
        broker.publish(channel, queue_name, b"{}")
        with pytest.raises(NotDelivered):
            broker.publish(channel, f"{queue_name}.nowhere", b"{}")
    assert not channel.connection.is_open
    assert declared(queue_name)
    retries_and_dead = [broker.retry_queue(queue_name, 1), broker.retry_queue(queue_name, 2),
                        broker.dead_queue(queue_name)]
    assert [declared(q) for q in retries_and_dead] == [max_attempts is not None] * 3
    assert not declared(broker.retry_queue(queue_name, 3))


@pytest.mark.parametrize("value, attempt", [
    (None, 1), (1, 1), (3, 3), ("3", 3), (b"4", 4), (" 5 ", 5), (0, 1), (-2, 1), ("0", 1), ("-7", 1),
    ("abc", 1), ("", 1), (b"\xff", 1), (2.5, 1), ("2.5", 1), (True, 1), ([3], 1), ({"a": 1}, 1), ("1e9", 1),
    (10 ** 30, broker.MAX_ATTEMPT), ("9" * 5000, broker.MAX_ATTEMPT),
])
def test_any_attempt_header_gives_a_valid_attempt_number(value, attempt):
    assert broker.attempt_number(value) == attempt

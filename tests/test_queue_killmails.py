"""queue_killmails.py as cron runs it: a subprocess against the real database and broker."""
from __future__ import annotations

import json
import subprocess
import threading
from datetime import UTC, datetime, timedelta

import pika
import pytest

import broker
import db
import queue_killmails
from helpers import RABBITMQ_URL, insert_users, make_settings, run_script, wait_until, waits_for_a_lock

NOW = datetime.now(UTC)


def pilots(n, **extra):
    return [{"character_id": 1000 + i, "character_name": f"Pilot {i}", "access_token": f"ACCESS-{i}",
             "refresh_token": f"REFRESH-{i}", "expires_at": NOW + timedelta(minutes=20), **extra} for i in range(n)]


def drain(queue: str) -> list[tuple]:
    """Every message in a queue as (priority, headers, body dict), acked."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    messages = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        messages.append((properties.priority, properties.delivery_mode, json.loads(body)))
    connection.close()
    return messages


@pytest.fixture
def settings(database_url, queue_name):
    return make_settings(database_url, queue_name=queue_name)


def test_queues_every_due_user_once_with_ids_only(conn, settings):
    insert_users(conn, pilots(3))
    conn.execute("UPDATE users SET last_sync_at = now() - interval '1 hour' WHERE character_id = 1000")
    conn.execute("UPDATE users SET last_sync_at = now() WHERE character_id = 1001")  # not due
    conn.commit()
    run = run_script("queue_killmails.py", settings)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "📡 Queueing users for killmail sync...",
        "✓ Found 2 users to sync",
        "📤 Adding to queue...",
        "✅ All 2 users queued successfully!",
        "💡 Now run the worker to process them: python killmail_worker.py",
    ]
    messages = drain(settings.queue_name)
    by_id = {m[2]["character_id"]: m for m in messages}
    assert set(by_id) == {1000, 1002}
    assert by_id[1002][0] == broker.PRIORITY_FIRST and by_id[1000][0] == broker.PRIORITY_ROUTINE
    assert all(m[1] == 2 for m in messages)  # persistent
    assert "ACCESS" not in json.dumps([m[2] for m in messages]) and "REFRESH" not in json.dumps(messages)
    assert set(by_id[1000][2]) == {"character_id", "character_name", "queued_at"}


def test_a_queued_user_is_not_queued_again(conn, settings):
    insert_users(conn, pilots(2))
    assert run_script("queue_killmails.py", settings).returncode == 0
    second = run_script("queue_killmails.py", settings)
    assert "✓ Found 0 users to sync" in second.stdout
    assert len(drain(settings.queue_name)) == 2


def test_revoked_users_are_skipped(conn, settings):
    import db
    insert_users(conn, pilots(2))
    db.mark_revoked(conn, 1000, "REFRESH-0", "invalid_grant")
    conn.commit()
    run_script("queue_killmails.py", settings)
    assert [m[2]["character_id"] for m in drain(settings.queue_name)] == [1001]


def test_dry_run_publishes_nothing_and_claims_nothing(conn, settings):
    insert_users(conn, pilots(2))
    run = run_script("queue_killmails.py", settings, "--dry-run")
    assert run.returncode == 0 and "would queue Pilot 0 (ID: 1000), first sync" in run.stdout
    assert conn.execute("SELECT count(*) AS n FROM users WHERE queued_at IS NOT NULL").fetchone()["n"] == 0
    assert run_script("queue_killmails.py", settings).returncode == 0
    assert len(drain(settings.queue_name)) == 2


def test_dry_run_names_the_corporations_a_run_would_queue_and_claims_none(conn, settings):
    scopes = "esi-killmails.read_killmails.v1 esi-killmails.read_corporation_killmails.v1"
    insert_users(conn, pilots(2))
    conn.execute("UPDATE users SET corporation_id = 98000001, scopes = %s, is_director = true "
                 "WHERE character_id = 1001", (scopes,))
    conn.commit()
    run = run_script("queue_killmails.py", settings, "--dry-run")
    assert run.returncode == 0, run.stderr
    assert "✓ Found 1 corporations due (dry run: nothing queued)" in run.stdout
    assert "would queue corporation 98000001 through Pilot 1 (ID: 1001), first sync" in run.stdout
    only = run_script("queue_killmails.py", settings, "--dry-run", "--corporations")
    assert "would queue corporation 98000001" in only.stdout and "users to sync" not in only.stdout
    assert conn.execute("SELECT count(*) AS n FROM corporations WHERE queued_at IS NOT NULL").fetchone()["n"] == 0
    assert run_script("queue_killmails.py", settings, "--corporations").returncode == 0
    assert [m[2].get("corporation_id") for m in drain(settings.queue_name)] == [98000001]


def test_one_character_at_high_priority(conn, settings):
    insert_users(conn, pilots(2))
    conn.execute("UPDATE users SET last_sync_at = now()")  # not due: asked for anyway
    conn.commit()
    run = run_script("queue_killmails.py", settings, "--character-id", "1001")
    assert run.returncode == 0 and "Queued Pilot 1 at high priority" in run.stdout
    (message,) = drain(settings.queue_name)
    assert message[0] == broker.PRIORITY_NOW and message[2]["character_id"] == 1001
    unknown = run_script("queue_killmails.py", settings, "--character-id", "42")
    assert unknown.returncode == 1 and "no user with character id 42" in unknown.stderr


def test_each_mode_is_a_function_of_its_own(conn, settings, caplog):
    """The modes run in process on a channel the caller opened, and return the exit status."""
    insert_users(conn, pilots(2))
    caplog.set_level("INFO")
    with broker.open_channel(RABBITMQ_URL, settings.queue_name) as channel:
        assert queue_killmails.queue_character(conn, channel, settings, 1001, NOW, full=True) == 0
        assert queue_killmails.queue_character(conn, channel, settings, 42, NOW, full=False) == 1
        assert queue_killmails.queue_all(conn, settings, NOW, corporations_only=False) == 0
        assert queue_killmails.print_stats(conn, channel.connection, settings, NOW) == 0
    assert "Queued Pilot 1 at high priority" in caplog.text and "All 1 users queued successfully" in caplog.text
    assert "queued or running: 2" in caplog.text
    assert sorted((m[2]["character_id"], m[2].get("full", False)) for m in drain(settings.queue_name)) == [
        (1000, False), (1001, True)]


def test_unreachable_broker_is_one_clear_line(conn, settings):
    insert_users(conn, pilots(1))
    bad = make_settings(settings.database_url, queue_name=settings.queue_name,
                        rabbitmq_url="amqp://guest:guest@127.0.0.1:1/%2F")
    run = run_script("queue_killmails.py", bad)
    assert run.returncode == 1 and "cannot reach RabbitMQ" in run.stderr and "Traceback" not in run.stderr
    # Nothing was claimed, so the next run queues the user.
    assert conn.execute("SELECT queued_at FROM users").fetchone()["queued_at"] is None


def test_unreachable_database_is_one_line_naming_the_error(settings):
    bad = make_settings("postgresql://root@127.0.0.1:1/killmails", queue_name=settings.queue_name)
    run = run_script("queue_killmails.py", bad)
    (line,) = run.stderr.splitlines()  # libpq's message spans lines: they are joined, not cut to the first
    assert run.returncode == 1
    assert line.startswith("❌ cannot reach PostgreSQL at DATABASE_URL: OperationalError: connection failed")
    assert "port 1 failed" in line and len(line) < 400


def test_priorities_hold_in_the_broker(conn, settings):
    insert_users(conn, pilots(3))
    conn.execute("UPDATE users SET last_sync_at = now() - interval '1 hour' WHERE character_id = 1000")
    conn.execute("UPDATE users SET last_sync_at = now() WHERE character_id = 1002")
    conn.commit()
    run_script("queue_killmails.py", settings)  # 1000 routine, 1001 first sync
    run_script("queue_killmails.py", settings, "--character-id", "1002")  # asked for now, queued last
    order = [m[2]["character_id"] for m in drain(settings.queue_name)]
    assert order == [1002, 1001, 1000]


def test_stats_for_an_operator(conn, settings):
    import db
    insert_users(conn, pilots(3))
    db.mark_revoked(conn, 1002, "REFRESH-2", "invalid_grant")
    conn.commit()
    run_script("queue_killmails.py", settings)
    stats = run_script("queue_killmails.py", settings, "--stats")
    assert stats.returncode == 0, stats.stderr
    assert "queued or running: 2" in stats.stdout and "needing a new login: 1" in stats.stdout
    assert f"Queue {settings.queue_name}: 2 ready" in stats.stdout


def test_revalue_values_the_killmails_saved_without_a_value(conn, settings):
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal
    from pathlib import Path

    import db
    import values
    from killmail_model import parse_killmail
    body = json.loads((Path(__file__).resolve().parent / "data/killmail_134265477.json").read_text())
    db.save_killmails(conn, [parse_killmail(body, killmail_id=134265477, killmail_hash="f" * 40)])
    now = datetime.now(UTC)
    db.save_market_prices(conn, [{"type_id": 17478, "average_price": 30e6}, {"type_id": 377, "adjusted_price": 5}],
                          now)
    db.save_esi_cache(conn, values.PRICES_KEY, None, now + timedelta(hours=1))  # fresh: ESI is not asked
    conn.commit()
    run = run_script("queue_killmails.py", settings, "--revalue")
    assert run.returncode == 0, run.stderr
    assert "Valued 1 killmails" in run.stdout
    row = conn.execute("SELECT destroyed_value, dropped_value, total_value FROM killmails").fetchone()
    assert tuple(row.values()) == (Decimal(30_000_000), Decimal(5), Decimal(30_000_005))


def claims(conn) -> dict[str, int]:
    """Users claimed, and of them those whose claim still waits for the broker's confirm."""
    row = conn.execute("SELECT count(*) FILTER (WHERE queued_at IS NOT NULL) AS claimed, "
                       "count(*) FILTER (WHERE claimed_by IS NOT NULL) AS unconfirmed FROM users").fetchone()
    conn.commit()
    return row


def test_a_message_the_broker_nacks_leaves_its_pilot_claimable_at_once(conn, settings):
    # A policy, not the queue's declaration (which stays broker.py's): at most 2 messages, the rest refused.
    policy = f"cap-{settings.queue_name}"
    rabbitmqctl("set_policy", "--apply-to", "queues", policy, f"^{settings.queue_name}$",
                '{"max-length": 2, "overflow": "reject-publish"}')
    try:
        insert_users(conn, pilots(5))
        run = run_script("queue_killmails.py", settings)
        assert run.returncode == 1
        assert "❌ 3 users could not be queued" in run.stderr + run.stdout
        assert "the broker nacked the message" in run.stderr + run.stdout
        assert claims(conn) == {"claimed": 2, "unconfirmed": 0}
        assert len(drain(settings.queue_name)) == 2
    finally:
        rabbitmqctl("clear_policy", policy)
    again = run_script("queue_killmails.py", settings)
    assert again.returncode == 0 and "✓ Found 3 users to sync" in again.stdout
    assert claims(conn) == {"claimed": 5, "unconfirmed": 0}


def test_a_claim_of_a_producer_session_that_is_gone_is_freed_by_the_next_run(conn, settings, database_url):
    insert_users(conn, pilots(3))
    with db.connect(database_url) as producer:  # a run that claimed and was gone before the broker confirmed
        assert db.claim_users(producer, [1000, 1001], NOW, interval=300, stale_after=7200) == {1000, 1001}
        producer.commit()
    wait_until(lambda: sessions_holding_claims(conn) == 0, what="PostgreSQL to end the session")
    run = run_script("queue_killmails.py", settings)
    assert run.returncode == 0 and "✓ Found 3 users to sync" in run.stdout
    assert sorted(m[2]["character_id"] for m in drain(settings.queue_name)) == [1000, 1001, 1002]
    assert claims(conn) == {"claimed": 3, "unconfirmed": 0}


def sessions_holding_claims(conn) -> int:
    n = conn.execute("SELECT count(*) AS n FROM users u "
                     "JOIN pg_stat_activity a ON a.pid = u.claimed_by").fetchone()["n"]
    conn.commit()
    return n


def test_a_live_producers_unconfirmed_claims_are_left_alone(conn, settings, database_url):
    insert_users(conn, pilots(2))
    with db.connect(database_url) as producer:  # another run, still waiting for its confirm
        db.claim_users(producer, [1000], NOW, interval=300, stale_after=7200)
        producer.commit()
        run = run_script("queue_killmails.py", settings)
        assert run.returncode == 0 and "✓ Found 1 users to sync" in run.stdout
        assert [m[2]["character_id"] for m in drain(settings.queue_name)] == [1001]
        assert claims(conn) == {"claimed": 2, "unconfirmed": 1}


@pytest.mark.timeout(60)
def test_confirming_holds_no_pilot_while_it_waits_for_a_corporations_row(conn, settings, database_url,
                                                                         monkeypatch):
    """A corporation's job holds its corporation's row, then writes its director's users row (db.set_director).
    The producer's confirms, waiting for that corporation's row, must not hold the director's row meanwhile: the
    two would deadlock."""
    scopes = "esi-killmails.read_killmails.v1 esi-killmails.read_corporation_killmails.v1"
    insert_users(conn, pilots(2))
    conn.execute("UPDATE users SET corporation_id = 98000001, scopes = %s WHERE character_id = 1001", (scopes,))
    conn.commit()
    real = broker.publish_confirmed
    outcome: list = []
    with db.connect(database_url) as job, db.connect(database_url) as looker:

        def settled_at_once(url, queue, batches, settle, *, window):
            """The confirms of both kinds settled in one call (as when they arrive together), after a worker took
            the corporation's job and wrote its row."""
            confirmed, failed = [], []
            real(url, queue, batches, lambda c, f: (confirmed.extend(c), failed.extend(f)), window=window)
            job.execute("UPDATE corporations SET list_etag = 'x' WHERE corporation_id = 98000001")
            settle(confirmed, failed)
        monkeypatch.setattr(broker, "publish_confirmed", settled_at_once)
        with db.connect(database_url) as producer:
            run = threading.Thread(target=lambda: outcome.append(
                queue_killmails.queue_due(producer, settings, NOW, users=True)))
            run.start()
            wait_until(lambda: waits_for_a_lock(looker, producer.info.backend_pid), timeout=30,
                       what="the confirm waiting for the job's row")
            job.execute("SET lock_timeout = '5s'")  # a confirm holding the director's row would time this out
            db.set_director(job, 1001, True, checked_at=NOW)
            job.commit()
            run.join(timeout=30)
            assert not run.is_alive()
    assert outcome == [({"users": 2, "corporations": 1}, [])]
    assert claims(conn) == {"claimed": 2, "unconfirmed": 0}
    drain(settings.queue_name)


@pytest.mark.timeout(600)
def test_a_hundred_thousand_due_pilots_are_each_queued_once(conn, settings):
    n = 100_000
    conn.execute("INSERT INTO users (character_id, character_name, access_token, refresh_token, expires_at) "
                 "SELECT 90000000 + g, 'Pilot ' || g, 'a', 'r', now() + interval '20 minutes' "
                 "FROM generate_series(1, %s) AS g", (n,))
    conn.execute("UPDATE users SET last_sync_at = now() - interval '1 hour' WHERE character_id % 2 = 0")
    conn.commit()
    run = run_script("queue_killmails.py", settings, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"✓ Found {n} users to sync" in run.stdout and f"✅ All {n} users queued successfully!" in run.stdout
    assert claims(conn) == {"claimed": n, "unconfirmed": 0}
    ids, priorities = consume_all(settings.queue_name)
    assert len(ids) == n and set(ids) == set(range(90000001, 90000001 + n))
    assert priorities == {broker.PRIORITY_FIRST: n // 2, broker.PRIORITY_ROUTINE: n // 2}
    assert "✓ Found 0 users to sync" in run_script("queue_killmails.py", settings).stdout


def consume_all(queue: str) -> tuple[list[int], dict[int, int]]:
    """Every character id in a queue, in order, and the messages by priority (consumed, auto-acked)."""
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1000)
    ids, priorities = [], {}
    for method, properties, body in channel.consume(queue, auto_ack=True, inactivity_timeout=2):
        if method is None:
            break
        ids.append(json.loads(body)["character_id"])
        priorities[properties.priority] = priorities.get(properties.priority, 0) + 1
    connection.close()
    return ids, priorities


def rabbitmqctl(*args: str) -> None:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr

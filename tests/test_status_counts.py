"""The status queries that read the counters schema.sql's triggers keep (row_counts) instead of counting the big
tables: each gives the answer the former count gave, worked out by hand here, and the counters stay exact through
saves, duplicate saves, failures, deletes and a TRUNCATE, on the real save path (db.save_killmails, db.store_refs,
db.record_ref_failure, db.record_run). And the ESI limit buckets, read by their indexes rather than a row per
pilot."""
from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import db
from killmail_model import parse_killmail

SAMPLE = json.loads((Path(__file__).resolve().parent / "data/killmail_134265477.json").read_text())
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
MAX = 3  # max_attempts of these tests


def killmail(killmail_id):
    return parse_killmail(dict(SAMPLE, killmail_id=killmail_id), killmail_id=killmail_id, killmail_hash="h" * 40)


def list_refs(conn, *ids):
    db.store_refs(conn, "character", 1, [(i, "h" * 40) for i in ids])
    conn.commit()


def fail(conn, killmail_id, *, permanent=False):
    db.record_ref_failure(conn, killmail_id, "ServerError: 502", NOW, permanent=permanent, max_attempts=MAX)
    conn.commit()


def save(conn, *ids):
    saved = db.save_killmails(conn, [killmail(i) for i in ids])
    conn.commit()
    return saved


def counted(conn):
    """Every counter's sum, without the zeros."""
    return {r["counter"]: r["n"] for r in conn.execute(
        "SELECT counter, sum(n)::bigint AS n FROM row_counts GROUP BY counter HAVING sum(n) <> 0")}


def recounted(conn):
    """The same counters, counted from the tables as the status queries used to."""
    rows = conn.execute(
        """
        SELECT 'killmails' AS counter, count(*) AS n FROM killmails HAVING count(*) > 0
        UNION ALL SELECT 'sync_runs:' || status, count(*) FROM sync_runs GROUP BY status
        UNION ALL SELECT 'unstored_refs:' || attempts, count(*) FROM killmail_refs r
                  WHERE NOT EXISTS (SELECT 1 FROM killmails k WHERE k.killmail_id = r.killmail_id) GROUP BY attempts
        """).fetchall()
    return {r["counter"]: r["n"] for r in rows}


def record_run(conn, status, finished):
    db.record_run(conn, {"character_id": 1, "corporation_id": None, "kind": "character",
                         "started_at": finished - timedelta(seconds=2), "finished_at": finished, "status": status,
                         "listed": 0, "new": 0, "saved": 0, "skipped": 0, "failed": 0, "esi_calls": 1, "attempt": 1,
                         "worker": "test", "error": None})
    conn.commit()


def test_backlog_and_failed_refs_follow_listing_failures_and_saves(conn):
    list_refs(conn, 1, 2, 3, 4, 5)
    list_refs(conn, 4, 5, 6)  # listed again by another page: 6 is the only new one
    assert db.detail_backlog(conn, max_attempts=MAX) == {"pending": 6, "gave_up": 0}
    assert db.failed_refs(conn, limit=20) == []
    fail(conn, 1)
    fail(conn, 1)
    fail(conn, 2, permanent=True)  # every attempt at once: given up
    fail(conn, 3)
    assert db.detail_backlog(conn, max_attempts=MAX) == {"pending": 5, "gave_up": 1}
    assert save(conn, 3, 4) == [3, 4]
    assert save(conn, 3, 4, 5) == [5]  # a duplicate save stores nothing again and counts nothing again
    assert db.detail_backlog(conn, max_attempts=MAX) == {"pending": 2, "gave_up": 1}  # 1 and 6; 2
    failed = db.failed_refs(conn, limit=20)
    assert [(r["killmail_id"], r["attempts"], r["total"]) for r in failed] == [(1, 2, 2), (2, MAX, 2)]
    assert [r["killmail_id"] for r in db.failed_refs(conn, limit=1)] == [1]
    assert db.detail_backlog(conn, max_attempts=2) == {"pending": 1, "gave_up": 2}  # the limit is the caller's
    assert counted(conn) == recounted(conn)


def test_killmail_growth_counts_every_save_once_and_the_last_day_by_stored_at(conn):
    save(conn, 11, 12, 13)
    save(conn, 12, 13, 14)
    conn.execute("UPDATE killmails SET stored_at = %s WHERE killmail_id = 11", (NOW - timedelta(hours=30),))
    conn.execute("UPDATE killmails SET stored_at = %s WHERE killmail_id = 12", (NOW - timedelta(hours=5),))
    conn.execute("UPDATE killmails SET stored_at = %s WHERE killmail_id IN (13, 14)", (NOW - timedelta(minutes=5),))
    conn.commit()
    assert db.killmail_growth(conn, NOW) == {"total": 4, "last_hour": 2, "last_day": 3}
    assert counted(conn) == {"killmails": 4}


def test_runs_by_status_counts_each_recorded_run(conn):
    for status in ("ok", "ok", "error", "locked", "partial", "ok"):
        record_run(conn, status, NOW)
    assert db.runs_by_status(conn) == [{"status": "error", "runs": 1}, {"status": "locked", "runs": 1},
                                       {"status": "ok", "runs": 3}, {"status": "partial", "runs": 1}]
    conn.execute("UPDATE sync_runs SET status = 'ok' WHERE status = 'error'")
    conn.execute("DELETE FROM sync_runs WHERE status = 'locked'")
    conn.commit()
    assert db.runs_by_status(conn) == [{"status": "ok", "runs": 4}, {"status": "partial", "runs": 1}]
    assert counted(conn) == recounted(conn)


def test_deletes_and_truncate_keep_the_counters_exact(conn):
    list_refs(conn, 1, 2, 3)
    fail(conn, 2)
    save(conn, 1, 2, 9)  # 9 has no reference
    conn.execute("DELETE FROM killmails WHERE killmail_id IN (2, 9)")  # 2 is pending again, with its attempt
    conn.execute("DELETE FROM killmail_refs WHERE killmail_id = 3")
    conn.commit()
    assert counted(conn) == {"killmails": 1, "unstored_refs:1": 1}
    assert db.detail_backlog(conn, max_attempts=MAX) == {"pending": 1, "gave_up": 0}
    conn.execute("TRUNCATE killmails")
    conn.commit()
    assert counted(conn) == {"unstored_refs:0": 1, "unstored_refs:1": 1}
    conn.execute("TRUNCATE killmail_refs")
    conn.commit()
    assert counted(conn) == {}


def test_the_schema_applied_again_counts_rows_written_before_its_triggers(conn):
    list_refs(conn, 1, 2)
    save(conn, 1)
    record_run(conn, "ok", NOW)
    for row in conn.execute("SELECT tgname, tgrelid::regclass::text AS t FROM pg_trigger WHERE NOT tgisinternal "
                            "AND tgrelid IN ('killmails'::regclass, 'killmail_refs'::regclass, 'sync_runs'::regclass)"
                            ).fetchall():
        conn.execute(f'DROP TRIGGER "{row["tgname"]}" ON "{row["t"]}"')
    conn.execute("TRUNCATE row_counts")  # as a database from before the counters
    conn.commit()
    db.apply_schema(conn)
    assert counted(conn) == {"killmails": 1, "unstored_refs:0": 1, "sync_runs:ok": 1}
    save(conn, 2)
    assert counted(conn) == recounted(conn) == {"killmails": 2, "sync_runs:ok": 1}


def test_a_failure_counted_while_its_killmail_is_saved_leaves_the_counters_exact(conn, database_url):
    list_refs(conn, 1)
    fail(conn, 1)
    with db.connect(database_url) as other:
        fail_started = threading.Event()
        db.record_ref_failure(other, 1, "Timeout", NOW, permanent=False, max_attempts=MAX)  # holds the row
        saver = threading.Thread(target=lambda: (fail_started.set(), save(conn, 1)))
        saver.start()
        fail_started.wait()
        saver.join(timeout=0.5)
        assert saver.is_alive()  # the save waits for the failure's commit to read the reference's attempts
        other.commit()
        saver.join(timeout=10)
    assert counted(conn) == recounted(conn) == {"killmails": 1}


def limit_row(conn, bucket, *, limit=None, window=None, remaining=None, paused=None, updated):
    conn.execute("INSERT INTO esi_limits (bucket, limit_tokens, window_seconds, remaining, paused_until, updated_at) "
                 "VALUES (%s, %s, %s, %s, %s, %s)", (bucket, limit, window, remaining, paused, updated))


def test_esi_limit_buckets_fold_the_pilots_paused_now_into_their_group(conn):
    at = lambda minutes: NOW + timedelta(minutes=minutes)  # noqa: E731
    limit_row(conn, "error-limit", limit=100, window=60, remaining=97, updated=at(-1))
    limit_row(conn, "killmail", limit=3600, window=900, remaining=3412, paused=at(2), updated=at(-2))
    limit_row(conn, "killmail@2001:db8::1", limit=3600, window=900, remaining=3000, updated=at(-3))  # an IPv6 egress
    limit_row(conn, "char-killmail", limit=20, window=900, updated=at(-60))  # the group's limit, kept by the limiter
    limit_row(conn, "char-killmail:1", paused=at(4), updated=at(-4))
    limit_row(conn, "char-killmail:2", paused=at(9), updated=at(-5))
    limit_row(conn, "char-killmail:3", paused=at(-1), updated=at(-1))  # its pause is over: not read
    limit_row(conn, "char-killmail:4", limit=20, window=900, remaining=1, updated=at(-1))  # never paused: not read
    limit_row(conn, "corp-killmail:98000001", paused=at(1), updated=at(-7))  # a group with no row of its own
    conn.commit()
    rows = db.esi_limit_buckets(conn, NOW)
    # By hand: char-killmail folds its own row and the two pilots paused at NOW (the latest pause ends at +9 min,
    # the latest write is pilot 1's at -4 min); the remaining counts of pilots 3 and 4 never show.
    assert [tuple(r.values()) for r in rows] == [
        ("char-killmail", 3, None, 20, 900, at(9), 2, at(-4)),
        ("corp-killmail", 1, None, None, None, at(1), 1, at(-7)),
        ("error-limit", 1, 97, 100, 60, None, 0, at(-1)),
        ("killmail", 1, 3412, 3600, 900, at(2), 1, at(-2)),
        ("killmail@2001:db8::1", 1, 3000, 3600, 900, None, 0, at(-3))]
    assert list(rows[0]) == ["bucket", "buckets", "remaining", "limit_tokens", "window_seconds", "paused_until",
                             "paused", "updated_at"]


def test_esi_limit_buckets_read_no_row_of_a_pilot_not_paused_now(conn):
    conn.execute("INSERT INTO esi_limits (bucket, paused_until) SELECT 'char-killmail:' || g, "
                 "CASE WHEN g %% 1000 = 0 THEN %s::timestamptz + interval '1 minute' END "
                 "FROM generate_series(1, 20000) g", (NOW,))
    for bucket in ("killmail", "error-limit", "char-killmail"):
        limit_row(conn, bucket, limit=100, window=60, updated=NOW)
    conn.execute("ANALYZE esi_limits")
    conn.commit()
    assert [(r["bucket"], r["buckets"], r["paused"]) for r in db.esi_limit_buckets(conn, NOW)] == [
        ("char-killmail", 21, 20), ("error-limit", 1, 0), ("killmail", 1, 0)]
    plan = "\n".join(r["QUERY PLAN"] for r in conn.execute(
        "EXPLAIN (ANALYZE, COSTS OFF) " + db._ESI_LIMIT_BUCKETS_SQL,
        {"now": NOW, "owner_groups": list(db.OWNER_BUCKET_GROUPS)}))
    assert "Index Scan using esi_limits_shared" in plan and "Index Scan using esi_limits_paused" in plan, plan
    assert "Seq Scan" not in plan and "Gather" not in plan, plan  # the few rows in one process, not a parallel plan

"""The web app (web/) through Flask's test client, against the real test database and broker
with known rows."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta, timezone

import pika
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

import db
import web
import web.report
import web.sources
from helpers import RABBITMQ_URL, ROOT, make_settings
from screenshot import (
    ACCESS_TOKEN,
    EXPECTED_USERS,
    GUNICORN,
    REFRESH_TOKEN,
    add_killmail,
    fill_queues,
    free_port,
    seed_status_rows,
    status_env,
    wait_until_answering,
)

CLOSED_DATABASE = "postgresql://root@127.0.0.1:1/x"
CLOSED_BROKER = "amqp://guest:guest@127.0.0.1:1/%2F"
JSON = {"Accept": "application/json"}
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def seeded(conn):
    """The known rows of devtools/screenshot.py, written now."""
    seed_status_rows(conn, datetime.now(UTC))
    return conn


def timed_get(client, path, **kwargs):
    started = time.monotonic()
    response = client.get(path, **kwargs)
    return response, time.monotonic() - started


# ---------------------------------------------------------------------------------------------- /health


def test_health_is_ok_when_database_and_broker_answer(client, conn):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "database": "ok", "broker": "ok"}
    assert response.headers["Cache-Control"] == "no-store"


def test_health_is_503_within_seconds_when_the_database_is_unreachable(make_client):
    response, took = timed_get(make_client(database_url=CLOSED_DATABASE), "/health")
    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "database": "unavailable", "broker": "ok"}
    assert took < 3


def test_health_is_503_within_seconds_when_the_broker_is_unreachable(make_client, conn):
    response, took = timed_get(make_client(rabbitmq_url=CLOSED_BROKER), "/health")
    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "database": "ok", "broker": "unavailable"}
    assert took < 3


class Relay:
    """A TCP relay to PostgreSQL that a test can cut and restore, as a database restart would."""

    def __init__(self, target_port: int = 5432):
        self.port, self.target_port = free_port(), target_port
        self.sockets: list[socket.socket] = []
        self.listener: socket.socket | None = None

    def start(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def stop(self) -> None:
        for sock in [self.listener, *self.sockets]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()


def test_health_follows_the_database_down_and_back_up(make_client, database_url, conn):
    relay = Relay()
    relay.start()
    client = make_client(database_url=database_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}"))
    try:
        assert client.get("/health").status_code == 200
        relay.stop()
        response, took = timed_get(client, "/health")
        assert (response.status_code, response.get_json()["database"], took < 3) == (503, "unavailable", True)
        relay.start()
        deadline = time.monotonic() + 15
        while client.get("/health").status_code != 200:  # the probe itself is the synchronisation
            assert time.monotonic() < deadline, "health did not recover after the database came back"
    finally:
        relay.stop()


def test_deep_health_is_ok_after_a_recent_sync(client, seeded):
    response = client.get("/health?deep=1")
    body = response.get_json()
    assert response.status_code == 200
    assert (body["status"], body["sync"], body["max_sync_age_seconds"]) == ("ok", "ok", 1800)
    assert 100 <= body["last_sync_age_seconds"] <= 200  # the latest run finished 2 min ago
    assert body["last_sync"].endswith("Z")


def test_deep_health_is_stalled_when_the_last_sync_is_too_old(make_client, seeded):
    response = make_client(health_max_sync_age_seconds=60).get("/health?deep=1")
    assert response.status_code == 503
    assert (response.get_json()["status"], response.get_json()["sync"]) == ("stalled", "stalled")


def test_deep_health_is_stalled_before_any_sync(client, conn):
    response = client.get("/health?deep=true")
    assert response.status_code == 503
    assert response.get_json() == {"status": "stalled", "database": "ok", "broker": "ok", "sync": "stalled",
                                   "last_sync": None, "last_sync_age_seconds": None, "max_sync_age_seconds": 1800,
                                   "jobs_in_progress": 0, "jobs_stalled": 0}


def test_plain_health_ignores_how_old_the_last_sync_is(client, conn):
    assert client.get("/health").status_code == 200


# ---------------------------------------------------------------------------------------------- /status


def test_status_json_reports_the_known_rows(client, seeded):
    response = client.get("/status", headers=JSON)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    report = response.get_json()
    worker = report["worker"]
    assert (worker["isRunning"], worker["totalUsers"], worker["lastSyncDuration"]) == (True, 6, pytest.approx(3.2))
    assert worker["lastSync"].endswith("Z")
    assert 100 <= (datetime.now(UTC) - datetime.fromisoformat(worker["lastSync"])).total_seconds() <= 200
    metrics = report["metrics"]
    assert {k: metrics[k] for k in ("runs", "success_rate", "error_rate", "killmails_total", "killmails_last_hour",
                                    "killmails_per_hour")} == {
        "runs": 5, "success_rate": 0.6, "error_rate": 0.2, "killmails_total": 5, "killmails_last_hour": 3,
        "killmails_per_hour": round(4 / 24, 2)}
    assert len(report["hourly"]) == 24 and sum(h["killmails"] for h in report["hourly"]) == 4
    assert metrics["sync_duration_avg_seconds"] == pytest.approx((0.4 + 1.1 + 2.0 + 6.5 + 3.2) / 5)
    assert report["users"] == EXPECTED_USERS
    assert report["queue"] == {"name": report["queue"]["name"], "depth": 0, "consumers": 0, "retrying": 0, "dead": 0,
                               "error": None}  # queues never declared count 0
    runs = report["runs"]
    assert [(r["character_name"], r["status"]) for r in runs] == [
        ("Aria Vex", "ok"), ("Fenn Ardent", "partial"), ("Eon Hale", "ok"), ("Borin Tal", "error"),
        ("Cyra Lune", "needs_relogin"), ("Aria Vex", "ok")]
    assert (runs[0]["saved"], runs[0]["skipped"], runs[1]["failed"]) == (2, 1, 1)
    assert runs[3]["error"] == "ServerError: ESI answered 502 Bad Gateway"
    assert runs[0]["finished_at"].endswith("Z") and runs[0]["started_at"].endswith("Z")
    failed = report["failed_killmails"]
    assert failed["total"] == 2
    assert [(r["killmail_id"], r["attempts"], r["gave_up"]) for r in failed["latest"]] == [
        (130000002, 8, True), (130000001, 3, False)]  # max_attempts is 8
    limits = {row["bucket"]: row for row in report["esi_limits"]}
    assert sorted(limits) == ["char-killmail", "error-limit", "killmail"]
    assert (limits["killmail"]["remaining"], limits["killmail"]["limit_tokens"], limits["killmail"]["paused_until"]) \
        == (3412, 3600, None)
    pilots = limits["char-killmail"]
    # Pilot 1006's bucket, paused; 1001's is not paused now, and is not read.
    assert (pilots["buckets"], pilots["remaining"], pilots["paused"]) == (1, 2, 1)
    assert pilots["paused_until"].endswith("Z")
    assert {(c["route_group"], c["status"]): c["calls"] for c in report["esi_calls"]}[("killmail", 502)] == 3


def test_status_shows_the_notification_outbox_and_refused_destinations(client, conn):
    now = datetime.now(UTC)
    ok, gone = (db.add_webhook(conn, name, "http://127.0.0.1:9/") for name in ("ops", "zkillboard"))
    db.refuse_webhook(conn, gone, "HTTP 403")
    conn.execute("INSERT INTO outbox (webhook_id, killmail_id, delivered_at, next_attempt_at) VALUES "
                 "(%(ok)s, 1, %(now)s, NULL), (%(ok)s, 2, %(old)s, NULL), (%(ok)s, 3, NULL, %(now)s), "
                 "(%(ok)s, 4, NULL, NULL), (%(gone)s, 1, NULL, %(now)s)",
                 {"ok": ok, "gone": gone, "now": now, "old": now - timedelta(days=2)})
    conn.commit()
    assert client.get("/status", headers=JSON).get_json()["outbox"] == {
        "pending": 2, "delivered_24h": 1, "failed": 1, "refused": [{"name": "zkillboard", "refused": "HTTP 403"}]}
    page = client.get("/status", headers=BROWSER).get_data(as_text=True)
    assert '<b id="outbox-pending">2</b>' in page and '<b id="outbox-failed">1</b>' in page
    assert "zkillboard answered HTTP 403" in page
    got = samples(client.get("/metrics"))
    assert [got[("killmail_outbox_rows", (("state", state),))] for state in ("pending", "failed")] == [2, 1]
    assert got[("killmail_notify_refused", ())] == 1


def test_status_shows_the_last_twenty_runs(client, conn):
    now = datetime.now(UTC)
    for n in range(25):
        conn.execute("INSERT INTO sync_runs (character_id, started_at, finished_at, status) VALUES (%s, %s, %s, 'ok')",
                     (n, now - timedelta(minutes=60 - n, seconds=1), now - timedelta(minutes=60 - n)))
    conn.commit()
    runs = client.get("/status?format=json").get_json()["runs"]
    assert [r["character_id"] for r in runs] == list(range(24, 4, -1))


def test_status_negotiates_html_and_json(client, seeded):
    assert client.get("/status", headers=BROWSER).mimetype == "text/html"
    assert client.get("/status").mimetype == "text/html"  # Accept: */* (curl) reads the page
    assert client.get("/status?format=json", headers=BROWSER).mimetype == "application/json"
    assert client.get("/status?format=html", headers=JSON).mimetype == "text/html"
    assert "Accept" in client.get("/status").headers["Vary"]


def test_status_html_shows_the_numbers_with_relative_times(client, seeded):
    response = client.get("/status", headers=BROWSER)
    page = response.get_data(as_text=True)
    assert response.status_code == 200
    for fragment in ('id="total-users">6<', 'id="success-rate">60.0&thinsp;%<', 'id="error-rate">20.0&thinsp;%<',
                     'id="killmails-total">5<', 'id="killmails-hour">3<', 'id="failed-refs">2<',
                     'id="users-needs_relogin">1<', 'id="users-active">2<', 'id="queue-depth">0<',
                     "Aria Vex", "2 min ago", "ServerError: ESI answered 502 Bad Gateway", "130000002",
                     "char-killmail", "3,412", ">Running<"):
        assert fragment in page
    assert "<script" not in page and "<link" not in page  # one self-contained page


def test_status_counts_the_queues(client, seeded, queue_name):
    fill_queues(queue_name, max_attempts=8, waiting=3, retrying=2, dead=1)
    queue = client.get("/status?format=json").get_json()["queue"]
    assert queue == {"name": queue_name, "depth": 3, "consumers": 0, "retrying": 2, "dead": 1, "error": None}


class Clock:
    """A monotonic clock that moves when the test says."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_consumer_means_the_worker_is_running(make_client, conn, queue_name):
    clock = Clock()
    client = make_client(clock=clock)
    assert client.get("/status?format=json").get_json()["worker"] == {
        "isRunning": False, "lastSync": None, "totalUsers": 0, "lastSyncDuration": None}
    fill_queues(queue_name, max_attempts=8, waiting=0, retrying=0, dead=0)
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        channel = connection.channel()
        channel.basic_consume(queue_name, lambda *args: None)
        clock.now += web.sources.QUEUE_CACHE_SECONDS
        report = client.get("/status?format=json").get_json()
    finally:
        connection.close()
    assert (report["queue"]["consumers"], report["worker"]["isRunning"]) == (1, True)


@pytest.fixture
def broker_connections(monkeypatch):
    """Every broker connection the status app opens (for /status and /metrics, or for /health), as it goes."""
    opened = []

    def open_broker(url):
        opened.append(connection := pika.BlockingConnection(pika.URLParameters(url)))
        return connection
    monkeypatch.setattr(web.sources, "open_broker", open_broker)
    return opened


def test_queue_figures_are_kept_for_a_few_seconds_and_read_through_one_connection(make_client, seeded, queue_name,
                                                                                 broker_connections):
    clock = Clock()
    client = make_client(clock=clock)
    fill_queues(queue_name, max_attempts=8, waiting=1, retrying=0, dead=0)
    depth = lambda: client.get("/status?format=json").get_json()["queue"]["depth"]  # noqa: E731
    assert depth() == 1
    fill_queues(queue_name, max_attempts=8, waiting=2, retrying=0, dead=0)
    clock.now += web.sources.QUEUE_CACHE_SECONDS - 0.1
    assert depth() == 1 and samples(client.get("/metrics"))[("killmail_queue_depth", ())] == 1  # kept
    clock.now += 0.1
    assert depth() == 3
    clock.now += web.sources.QUEUE_CACHE_SECONDS
    assert samples(client.get("/metrics"))[("killmail_queue_depth", ())] == 3
    assert len(broker_connections) == 1 and broker_connections[0].is_open  # one connection, kept


def test_a_kept_broker_connection_is_replaced_when_idle_or_lost(make_client, seeded, queue_name, broker_connections):
    relay = Relay(target_port=5672)
    relay.start()
    clock = Clock()
    client = make_client(clock=clock, rabbitmq_url=RABBITMQ_URL.replace("127.0.0.1:5672", f"127.0.0.1:{relay.port}"))
    fill_queues(queue_name, max_attempts=8, waiting=2, retrying=0, dead=0)
    queue = lambda: client.get("/status?format=json").get_json()["queue"]  # noqa: E731
    try:
        assert queue()["depth"] == 2
        clock.now += web.sources.BROKER_KEEP_SECONDS + 1  # its heartbeats went unanswered: the broker drops it
        assert queue()["depth"] == 2 and len(broker_connections) == 2 and not broker_connections[0].is_open
        relay.stop()  # the broker restarts: the kept connection is gone, pika does not know yet
        relay.start()
        clock.now += web.sources.QUEUE_CACHE_SECONDS
        assert (queue()["error"], queue()["depth"], len(broker_connections)) == (None, 2, 3)
    finally:
        relay.stop()


def test_status_still_renders_when_the_broker_is_unreachable(make_client, seeded):
    client = make_client(rabbitmq_url=CLOSED_BROKER)
    response, took = timed_get(client, "/status?format=json")
    queue = response.get_json()["queue"]
    assert response.status_code == 200 and took < 3
    assert [queue[k] for k in ("depth", "consumers", "retrying", "dead")] == [None] * 4
    assert queue["error"].startswith("broker unreachable")
    assert response.get_json()["users"] == EXPECTED_USERS
    page = client.get("/status", headers=BROWSER).get_data(as_text=True)
    assert 'id="broker-error">broker unreachable' in page and 'id="total-users">6<' in page


def test_status_is_503_when_the_database_is_unreachable(make_client):
    client = make_client(database_url=CLOSED_DATABASE)
    response, took = timed_get(client, "/status", headers=JSON)
    assert response.status_code == 503 and took < 3
    assert response.get_json()["error"].startswith("database unavailable")
    page = client.get("/status", headers=BROWSER)
    assert page.status_code == 503 and "database unavailable" in page.get_data(as_text=True)


def test_the_days_runs_read_beside_make_the_same_report(seeded, database_url):
    settings = make_settings(database_url)
    queue = {"name": "q", "depth": 0, "consumers": 0, "retrying": 0, "dead": 0, "error": None}
    now = datetime.now(UTC)
    with db.connect(database_url, autocommit=True) as beside:
        assert web.report.build_report(seeded, settings, queue, now, beside=beside) == \
            web.report.build_report(seeded, settings, queue, now)


def test_an_error_of_the_read_beside_is_raised_by_the_request(seeded, database_url):
    settings = make_settings(database_url)
    queue = {"name": "q", "depth": 0, "consumers": 0, "retrying": 0, "dead": 0, "error": None}
    with db.connect(database_url, autocommit=True) as beside:
        beside.execute("SET statement_timeout = 1")
        seeded.execute("LOCK TABLE sync_runs IN ACCESS EXCLUSIVE MODE")  # the read beside waits, then times out
        with pytest.raises(psycopg.errors.QueryCanceled):
            web.report.build_report(seeded, settings, queue, datetime.now(UTC), beside=beside)
        seeded.rollback()
        assert beside.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # done with when it returned


def test_one_request_at_a_time_has_a_second_connection(database_url):
    sources = web.sources.Sources(make_settings(database_url))
    try:
        with sources.connection() as first:
            assert first.execute("SHOW work_mem").fetchone() == {"work_mem": web.sources.WORK_MEM}
            deadline = time.monotonic() + 5
            while True:  # the pool opens its second connection after the first ask
                with sources.spare_connection() as spare:
                    if spare is not None:
                        assert spare is not first and spare.execute("SELECT 1 AS one").fetchone() == {"one": 1}
                        with sources.connection() as other, sources.spare_connection() as second_spare:
                            assert other not in (first, spare) and second_spare is None
                        break
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with sources.connection(), sources.spare_connection() as spare:
            assert spare is not None  # given back, and the lock with it
    finally:
        sources.close()


# ---------------------------------------------------------------------------------------------- /metrics


def samples(response) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text response, by name and sorted labels."""
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.get_data(as_text=True)) for s in family.samples}


def test_metrics_report_the_known_rows(client, seeded, queue_name):
    fill_queues(queue_name, max_attempts=8, waiting=4, retrying=1, dead=2)
    got = samples(client.get("/metrics"))
    assert got[("killmail_status_up", (("component", "database"),))] == 1
    assert got[("killmail_status_up", (("component", "broker"),))] == 1
    assert got[("killmail_sync_runs_total", (("status", "ok"),))] == 3
    assert got[("killmail_sync_runs_total", (("status", "needs_relogin"),))] == 1
    assert got[("killmail_killmails_saved_total", ())] == 5
    assert got[("killmail_esi_calls_total", (("group", "killmail"), ("status", "502")))] == 3
    assert got[("killmail_esi_calls_total", (("group", "char-killmail"), ("status", "304")))] == 140
    for state, count in EXPECTED_USERS.items():
        assert got[("killmail_users", (("state", state),))] == count
    assert 100 <= got[("killmail_last_sync_age_seconds", ())] <= 200
    assert got[("killmail_esi_limit_remaining", (("bucket", "killmail"),))] == 3412
    assert got[("killmail_esi_limit_remaining", (("bucket", "char-killmail"),))] == 2
    assert got[("killmail_esi_limit_paused", (("bucket", "char-killmail"),))] == 1
    assert (got[("killmail_queue_depth", ())], got[("killmail_queue_retrying", ())],
            got[("killmail_dead_letters", ())], got[("killmail_queue_consumers", ())]) == (4, 1, 2, 0)
    # 130000001 (3 attempts) and 130000003 (none yet) wait for their detail; 130000002 used all 8 attempts.
    assert (got[("killmail_detail_backlog", (("state", "pending"),))],
            got[("killmail_detail_backlog", (("state", "gave_up"),))]) == (2, 1)
    assert (got[("killmail_esi_limit_hits_total", (("status", "420"),))],
            got[("killmail_esi_limit_hits_total", (("status", "429"),))]) == (0, 0)  # present before the first


def test_metrics_sum_esi_420s_and_429s_over_route_groups(client, seeded):
    db.add_esi_calls(seeded, {("killmail", 420): 2, ("char-killmail", 429): 3, ("character", 429): 1,
                              ("killmail", 200): 5})
    seeded.commit()
    got = samples(client.get("/metrics"))
    assert (got[("killmail_esi_limit_hits_total", (("status", "420"),))],
            got[("killmail_esi_limit_hits_total", (("status", "429"),))]) == (2, 4)
    assert got[("killmail_esi_calls_total", (("group", "char-killmail"), ("status", "429")))] == 3


def test_metrics_detail_backlog_shrinks_as_details_are_stored(client, conn):
    for killmail_id in (170_000_001, 170_000_002, 170_000_003):
        conn.execute("INSERT INTO killmail_refs (killmail_id, killmail_hash) VALUES (%s, 'h')", (killmail_id,))
    conn.commit()
    assert samples(client.get("/metrics"))[("killmail_detail_backlog", (("state", "pending"),))] == 3
    add_killmail(conn, 170_000_002, datetime.now(UTC))
    conn.commit()
    got = samples(client.get("/metrics"))
    assert (got[("killmail_detail_backlog", (("state", "pending"),))],
            got[("killmail_detail_backlog", (("state", "gave_up"),))]) == (2, 0)


def test_metrics_before_any_run_say_the_last_sync_is_infinitely_old(client, conn):
    assert samples(client.get("/metrics"))[("killmail_last_sync_age_seconds", ())] == float("inf")


def test_metrics_still_answer_when_both_services_are_down(make_client):
    got = samples(make_client(database_url=CLOSED_DATABASE, rabbitmq_url=CLOSED_BROKER).get("/metrics"))
    assert got == {("killmail_status_up", (("component", "database"),)): 0,
                   ("killmail_status_up", (("component", "broker"),)): 0}


# ---------------------------------------------------------------------------------------------- protection


@pytest.mark.parametrize("path", ["/status", "/status?format=json", "/metrics"])
def test_basic_auth_protects_status_and_metrics(make_client, seeded, path):
    client = make_client(status_basic_auth="ops:s3cret:with-colon")
    for auth in (None, ("ops", "wrong"), ("someone", "s3cret:with-colon")):
        response = client.get(path, auth=auth)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Basic realm=")
    assert client.get(path, auth=("ops", "s3cret:with-colon")).status_code == 200


def test_health_never_asks_for_a_password(make_client, conn):
    client = make_client(status_basic_auth="ops:s3cret")
    assert client.get("/health").status_code == 200
    assert client.get("/health?deep=1").status_code == 503  # stalled (no run), but not 401


def test_no_response_ever_contains_a_token(make_client, seeded, queue_name):
    fill_queues(queue_name, max_attempts=8, waiting=1, retrying=1, dead=1)
    clients = [make_client(), make_client(rabbitmq_url=CLOSED_BROKER)]
    pages = [client.get(path, headers=headers).get_data(as_text=True) for client in clients
             for path, headers in (("/health", {}), ("/health?deep=1", {}), ("/status", JSON), ("/status", BROWSER),
                                   ("/metrics", {}))]
    assert len(pages) == 10 and all("Aria Vex" in page for page in pages if "<html" in page)
    for page in pages:
        assert ACCESS_TOKEN not in page and REFRESH_TOKEN not in page


# ---------------------------------------------------------------------------------------------- configuration


def test_settings_are_read_at_the_first_request_and_a_bad_one_is_one_line(monkeypatch, caplog):
    monkeypatch.setenv("STATUS_BASIC_AUTH", "no-colon-here")
    app = web.create_app()  # reads nothing yet
    response = app.test_client().get("/health")
    assert response.status_code == 500
    assert response.get_data(as_text=True) == "configuration error in STATUS_BASIC_AUTH; see the log\n"
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "configuration error: STATUS_BASIC_AUTH: must look like user:password"]


@pytest.mark.parametrize("value, problem", [
    ("no-colon-here", "must look like user:password"),
    ("ops:", "must look like user:password, neither of them empty"),
    (":s3cret", "must look like user:password, neither of them empty"),
])
def test_gunicorn_refuses_a_bad_environment_with_one_line(database_url, value, problem):
    env = status_env(database_url, queue="unused", STATUS_BASIC_AUTH=value, STATUS_BIND=f"127.0.0.1:{free_port()}")
    result = subprocess.run([str(GUNICORN), "-c", "gunicorn.conf.py", "status_app:app"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"configuration error: STATUS_BASIC_AUTH: {problem}"


def test_python_status_app_refuses_a_bad_environment_with_one_line(database_url):
    env = status_env(database_url, queue="unused", STATUS_BASIC_AUTH="no-colon-here")
    result = subprocess.run([sys.executable, "status_app.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=30)
    assert (result.returncode, result.stderr) == (2, "configuration error: STATUS_BASIC_AUTH: must look like "
                                                     "user:password\n")


def test_python_status_app_serves_locally_on_the_given_port(database_url, queue_name):
    port = free_port()
    process = subprocess.Popen([sys.executable, "status_app.py", "--port", str(port)], cwd=ROOT,
                               env=status_env(database_url, queue=queue_name), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_until_answering(f"http://127.0.0.1:{port}/health", process, deadline=20)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            assert json.load(response) == {"status": "ok", "database": "ok", "broker": "ok"}
    finally:
        process.terminate()
        process.wait(timeout=10)


# ---------------------------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("moment, expected", [
    (None, "never"), (NOW, "just now"), (NOW - timedelta(seconds=4), "just now"),
    (NOW - timedelta(seconds=42), "42 s ago"), (NOW - timedelta(minutes=3, seconds=59), "3 min ago"),
    (NOW - timedelta(hours=5), "5 h ago"), (NOW - timedelta(days=2, hours=3), "2 d ago"),
    (NOW + timedelta(minutes=4), "in 4 min"), (NOW.astimezone(timezone(timedelta(hours=2))) - timedelta(hours=1),
                                               "1 h ago"),
])
def test_ago(moment, expected):
    assert web.ago(moment, NOW) == expected


@pytest.mark.parametrize("seconds, expected", [
    (None, "–"), (0.25, "250 ms"), (3.21, "3.2 s"), (125, "2 min 5 s"), (900, "15 min"), (3600, "1 h"),
    (7800, "2 h 10 min"),
])
def test_duration(seconds, expected):
    assert web.duration(seconds) == expected


@pytest.mark.parametrize("last_sync, consumers, running", [
    (None, None, False), (None, 0, False), (None, 2, True), (NOW - timedelta(minutes=4), 0, True),
    (NOW - timedelta(minutes=6), None, False),
])
def test_is_running(last_sync, consumers, running):
    assert web.report.is_running(last_sync, consumers, NOW) is running


def test_times_are_utc_iso_8601_in_json():
    assert web.iso_utc(datetime(2026, 11, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))) == \
        "2026-11-01T12:00:00Z"


def test_status_shows_the_isk_destroyed_and_lost_in_the_last_day(client, conn):
    from decimal import Decimal
    from pathlib import Path

    from killmail_model import parse_killmail
    sample = json.loads((Path(__file__).resolve().parent / "data/killmail_134265477.json").read_text())
    now = datetime.now(UTC)
    conn.execute("INSERT INTO users (character_id, character_name) VALUES (2121652582, 'Victim')")
    killmails, worth = [], []
    for killmail_id, victim, age, total in [(1, 2121652582, 1, "1500000000"), (2, 5, 2, "2500000"),
                                            (3, 6, 30, "999"), (4, 7, 3, None)]:
        body = dict(sample, killmail_id=killmail_id, killmail_time=(now - timedelta(hours=age)).isoformat(),
                    victim=dict(sample["victim"], character_id=victim))
        killmails.append(parse_killmail(body, killmail_id=killmail_id, killmail_hash="a" * 40))
        worth.append(None if total is None else (Decimal(total), Decimal(0), Decimal(total)))
    db.save_killmails(conn, killmails, worth)
    conn.commit()
    metrics = client.get("/status", headers=JSON).get_json()["metrics"]
    # lost: the user's own loss; destroyed: the other kill of the last day (the older one and the unvalued count 0)
    assert (metrics["isk_lost_last_day"], metrics["isk_destroyed_last_day"]) == (1.5e9, 2.5e6)
    page = client.get("/status", headers=BROWSER).get_data(as_text=True)
    assert 'id="isk-lost">1.50&thinsp;B<' in page and 'id="isk-destroyed">2.50&thinsp;M<' in page


def test_a_stalled_job_fails_deep_health_and_shows_in_metrics_and_status(client, conn):
    now = datetime.now(UTC)
    db.report_job(conn, "host:1", 42, started_at=now - timedelta(minutes=9), progress_at=now - timedelta(minutes=8))
    db.report_job(conn, "host:2", 43, started_at=now - timedelta(seconds=20), progress_at=now)
    conn.execute("UPDATE users SET queued_at = NULL")  # (none here) and one pilot claimed three hours ago:
    conn.execute("INSERT INTO users (character_id, character_name, queued_at) VALUES (44, 'Old Claim', %s)",
                 (now - timedelta(hours=3),))
    conn.commit()
    health = client.get("/health?deep=1")
    assert health.status_code == 503
    assert health.get_json()["jobs_stalled"] == 1 and health.get_json()["jobs_in_progress"] == 2
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "killmail_jobs_in_progress 2.0" in metrics and "killmail_jobs_stalled 1.0" in metrics
    assert "killmail_claims_stale 1.0" in metrics
    oldest = next(line for line in metrics.splitlines() if line.startswith("killmail_job_oldest_seconds "))
    assert 539 <= float(oldest.split()[1]) <= 600
    jobs = client.get("/status?format=json").get_json()["jobs"]
    assert (jobs["in_progress"], jobs["stalled"], jobs["stale_claims"]) == (2, 1, 1)
    assert 'id="jobs"' in client.get("/status?format=html").get_data(as_text=True)


def test_a_dead_processs_job_counts_no_more(client, conn):
    now = datetime.now(UTC)
    db.report_job(conn, "host:1", 42, started_at=now - timedelta(hours=1), progress_at=now - timedelta(hours=1))
    conn.execute("UPDATE worker_jobs SET seen_at = now() - interval '2 minutes'")  # its process died
    conn.commit()
    assert client.get("/status?format=json").get_json()["jobs"]["in_progress"] == 0

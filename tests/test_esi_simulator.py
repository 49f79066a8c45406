"""Tests of the local ESI + SSO simulator, over real HTTP against sim.start(port=0)."""
from __future__ import annotations

import base64
import http.client
import json
import math
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from datetime import datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import pytest
import requests

import esi_simulator
from esi_simulator import CHAR_SCOPE, CORP_SCOPE, Bucket, Simulator
from helpers import record_output

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADERS = {"User-Agent": "esi-simulator-tests/1.0 (dev@example.org)", "X-Compatibility-Date": "2026-08-18"}
CLIENT_AUTH = "Basic " + base64.b64encode(b"demo-client:demo-secret").decode()


class Esi:
    """A tiny test client: the simulator, its base URL and request helpers."""

    def __init__(self, sim: Simulator, base: str) -> None:
        self.sim, self.base = sim, base

    def get(self, path: str, token: str | None = None, **headers: str) -> requests.Response:
        all_headers = {**HEADERS, **headers}
        if token:
            all_headers["Authorization"] = f"Bearer {token}"
        return requests.get(self.base + path, headers=all_headers, timeout=5)

    def refresh(self, refresh_token: str, auth: str = CLIENT_AUTH) -> requests.Response:
        return requests.post(self.base + "/v2/oauth/token", timeout=5,
                             headers={"Authorization": auth, "User-Agent": HEADERS["User-Agent"]},
                             data={"grant_type": "refresh_token", "refresh_token": refresh_token})

    def pilot(self, *, director: bool = False) -> dict:
        """A pilot with a valid grant and a working access token (refreshed only when it has expired)."""
        candidates = [p for p in self.sim.pilots() if not p["revoked"] and (CORP_SCOPE in p["scopes"]) == director]
        pilot = max(candidates, key=lambda p: p["expires_at"])
        if pilot["expires_at"] <= self.sim.now():
            tokens = self.refresh(pilot["refresh_token"]).json()
            pilot.update(access_token=tokens["access_token"], refresh_token=tokens["refresh_token"])
        return pilot

    def detail_path(self, killmail_id: int) -> str:
        return f"/killmails/{killmail_id}/{self.sim.killmail_hash(killmail_id)}/"

    def recent(self, pilot: dict, page: int = 1, **headers: str) -> requests.Response:
        return self.get(f"/characters/{pilot['character_id']}/killmails/recent?page={page}",
                        pilot["access_token"], **headers)


@pytest.fixture
def esi():
    sim = Simulator(seed=7, client_id="demo-client", client_secret="demo-secret", page_size=10)
    sim.add_pilots(n_pilots=8, n_killmails=120, share=3, expired_fraction=0.25, revoked=1, corporations=2)
    yield Esi(sim, sim.start(port=0))
    sim.stop()


def test_generated_world_matches_the_brief(esi):
    pilots = esi.sim.pilots()
    now = esi.sim.now()
    assert len(pilots) == 8 and all(90_000_000 < p["character_id"] for p in pilots)
    assert sum(p["revoked"] for p in pilots) == 1
    assert sum(p["expires_at"] <= now and not p["revoked"] for p in pilots) == 2
    assert sum(CORP_SCOPE in p["scopes"] for p in pilots) == 2
    assert all(CHAR_SCOPE in p["scopes"] and p["character_name"].startswith("Pilot ") for p in pilots)
    bodies = esi.sim.expected_killmails(valid_only=False)
    assert len(bodies) == 120
    assert 1 < sum(len(esi.sim.killmail_ids_for(p["character_id"])) for p in pilots) / 120 < 5
    attackers = [b["attackers"] for b in bodies.values()]
    assert all(1 <= len(a) <= 30 and sum(x["final_blow"] for x in a) == 1 for a in attackers)
    assert any(len({json.dumps(x, sort_keys=True) for x in a if "character_id" not in x})
               < sum("character_id" not in x for x in a) for a in attackers)  # identical NPC entries
    items = [b["victim"]["items"] for b in bodies.values()]
    assert all(0 <= len(i) <= 40 for i in items)
    assert any(any("items" in x for x in i) for i in items)
    assert any(len({(x["item_type_id"], x["flag"]) for x in i}) < len(i) for i in items)
    assert any("character_id" not in b["victim"] for b in bodies.values())
    assert any("moon_id" in b or "war_id" in b for b in bodies.values())
    assert all(len(esi.sim.killmail_hash(k)) == 40 for k in bodies)


def test_same_seed_gives_the_same_world():
    worlds = []
    for _ in range(2):
        sim = Simulator(seed=3, client_id="c", client_secret="s")
        sim.add_pilots(n_pilots=5, n_killmails=40, corporations=2)
        worlds.append(({k: sim.killmail_hash(k) for k in sim.expected_killmails(False)},
                       [p["refresh_token"] for p in sim.pilots()]))
    assert worlds[0] == worlds[1]


def test_paging_x_pages_and_order(esi):
    pilot = esi.pilot()
    expected = esi.sim.killmail_ids_for(pilot["character_id"])
    first = esi.recent(pilot)
    pages = int(first.headers["X-Pages"])
    assert pages == math.ceil(len(expected) / 10) and len(first.json()) == 10
    listed = [r for page in range(1, pages + 1) for r in esi.recent(pilot, page).json()]
    assert {r["killmail_id"] for r in listed} == expected and len(listed) == len(expected)
    bodies = esi.sim.expected_killmails(valid_only=False)
    keys = [(bodies[r["killmail_id"]]["killmail_time"], r["killmail_id"]) for r in listed]
    assert keys == sorted(keys, reverse=True)
    assert len({esi.recent(pilot, p).headers["Last-Modified"] for p in (1, pages)}) == 1
    beyond = esi.recent(pilot, pages + 1)
    assert beyond.status_code == 404 and beyond.headers["X-Pages"] == str(pages)
    assert esi.recent(pilot, 0).status_code == 400
    assert esi.get(f"/latest/characters/{pilot['character_id']}/killmails/recent/", pilot["access_token"]).ok


def test_etag_gives_304_and_costs_one_token(esi):
    pilot = esi.pilot()
    first = esi.recent(pilot)
    assert first.headers["ETag"].startswith('"')
    again = esi.recent(pilot, **{"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["ETag"] == first.headers["ETag"] and again.headers["Expires"] == first.headers["Expires"]
    assert esi.sim.stats()["tokens_spent"]["char-killmail"] == 3
    assert again.headers["X-Ratelimit-Used"] == "3"


def test_list_etag_is_the_one_the_first_page_answers_with(esi):
    pilot = esi.pilot()
    etag = esi.sim.list_etag(pilot["character_id"])
    answer = esi.recent(pilot, **{"If-None-Match": etag})
    assert answer.status_code == 304 and answer.headers["ETag"] == etag


def test_expires_and_early_fetch_counter(esi):
    pilot = esi.pilot()
    first = esi.recent(pilot)
    expires = parsedate_to_datetime(first.headers["Expires"])
    assert (expires - parsedate_to_datetime(first.headers["Date"])).total_seconds() == 300
    assert first.headers["Cache-Control"] == "private, max-age=300"
    esi.recent(pilot, **{"If-None-Match": first.headers["ETag"]})
    assert esi.sim.stats()["early_list_fetches"] == 1
    esi.sim.advance(300)
    later = esi.recent(pilot, **{"If-None-Match": first.headers["ETag"]})
    assert later.status_code == 304 and esi.sim.stats()["early_list_fetches"] == 1
    assert parsedate_to_datetime(later.headers["Expires"]) > expires


def test_new_killmails_wait_for_the_cache_turnover(esi):
    pilot = esi.pilot()
    first = esi.recent(pilot)
    new_ids = esi.sim.add_killmails(pilot["character_id"], 3)
    assert set(new_ids) <= esi.sim.killmail_ids_for(pilot["character_id"])
    cached = esi.recent(pilot)
    assert cached.headers["ETag"] == first.headers["ETag"]
    esi.sim.advance(300)
    fresh = esi.recent(pilot, **{"If-None-Match": first.headers["ETag"]})
    assert fresh.status_code == 200 and fresh.headers["ETag"] != first.headers["ETag"]
    assert {r["killmail_id"] for r in fresh.json()[:3]} == set(new_ids)


def test_token_rotation_and_invalid_grant(esi):
    pilot = esi.pilot()
    answer = esi.refresh(pilot["refresh_token"])
    assert answer.status_code == 200
    tokens = answer.json()
    assert tokens["expires_in"] == 1199 and tokens["token_type"] == "Bearer"
    assert tokens["refresh_token"] != pilot["refresh_token"]
    claims = json.loads(base64.urlsafe_b64decode(tokens["access_token"].split(".")[1] + "=="))
    assert claims["sub"] == f"CHARACTER:EVE:{pilot['character_id']}" and claims["iss"] == "login.eveonline.com"
    assert CHAR_SCOPE in claims["scp"] and claims["name"] == pilot["character_name"]
    old = esi.refresh(pilot["refresh_token"])
    assert old.status_code == 400 and old.json()["error"] == "invalid_grant"
    assert esi.recent(pilot).status_code == 401  # only the newest access token works
    assert esi.recent({**pilot, "access_token": tokens["access_token"]}).status_code == 200
    current = next(p for p in esi.sim.pilots() if p["character_id"] == pilot["character_id"])
    assert current["refresh_token"] == tokens["refresh_token"]
    esi.sim.advance(1199)
    assert esi.recent(current).json() == {"error": "token is expired"}
    assert esi.sim.stats()["refreshes"] == 1 and esi.sim.stats()["invalid_grants"] == 1


def test_revoked_pilot_and_invalid_client(esi):
    revoked = next(p for p in esi.sim.pilots() if p["revoked"])
    assert esi.recent(revoked).status_code == 401
    assert esi.refresh(revoked["refresh_token"]).json()["error"] == "invalid_grant"
    wrong = "Basic " + base64.b64encode(b"demo-client:nope").decode()
    answer = esi.refresh(esi.pilot()["refresh_token"], auth=wrong)
    assert answer.status_code == 401 and answer.json()["error"] == "invalid_client"
    valid = set().union(*(esi.sim.killmail_ids_for(p["character_id"]) for p in esi.sim.pilots() if not p["revoked"]))
    assert set(esi.sim.expected_killmails()) == valid
    assert valid < set(esi.sim.expected_killmails(valid_only=False))


def test_auth_scope_and_roles(esi):
    pilot, director = esi.pilot(), esi.pilot(director=True)
    assert esi.get(f"/characters/{pilot['character_id']}/killmails/recent").status_code == 401
    assert esi.get(f"/characters/{director['character_id']}/killmails/recent", pilot["access_token"]).status_code == 403
    corp = f"/corporations/{director['corporation_id']}/killmails/recent"
    answer = esi.get(corp, director["access_token"])
    assert answer.status_code == 200 and answer.headers["X-Ratelimit-Group"] == "corp-killmail"
    members = [p["character_id"] for p in esi.sim.pilots() if p["corporation_id"] == director["corporation_id"]]
    expected = set().union(*(esi.sim.killmail_ids_for(m) for m in members))
    assert answer.headers["X-Pages"] == str(math.ceil(len(expected) / 10))
    assert expected <= set(esi.sim.expected_killmails(corporations=True))
    member = next(p for p in esi.sim.pilots() if p["corporation_id"] == director["corporation_id"]
                  and p["character_id"] != director["character_id"] and not p["revoked"])
    member = {**member, "access_token": esi.refresh(member["refresh_token"]).json()["access_token"]}
    assert esi.get(corp, member["access_token"]).status_code == 403
    public = esi.get(f"/characters/{pilot['character_id']}/").json()
    assert public["name"] == pilot["character_name"] and public["corporation_id"] == pilot["corporation_id"]


def test_details_hash_checks_and_duplicates(esi):
    killmail_id, body = next(iter(esi.sim.expected_killmails().items()))
    good = esi.detail_path(killmail_id)
    first = esi.get(good)
    assert first.json() == body
    expires = parsedate_to_datetime(first.headers["Expires"]) - parsedate_to_datetime(first.headers["Date"])
    assert expires.days == 30 and first.headers["ETag"]
    wrong = esi.get(f"/killmails/{killmail_id}/{'0' * 40}/")
    assert wrong.status_code == 422 and wrong.json() == {"error": "Invalid killmail_id and/or killmail_hash"}
    assert esi.get(f"/killmails/1/{'0' * 40}/").status_code == 404
    esi.get(good)
    stats = esi.sim.stats()
    assert stats["detail_fetches"][killmail_id] == 3 and stats["duplicate_detail_fetches"] == 1


def test_malformed_body(esi):
    killmail_id = next(iter(esi.sim.expected_killmails()))
    esi.sim.make_malformed(killmail_id)
    body = esi.get(esi.detail_path(killmail_id)).json()
    assert "victim" not in body and body["killmail_id"] == killmail_id
    assert killmail_id not in esi.sim.expected_killmails()


def test_required_headers(esi):
    path = f"/killmails/{next(iter(esi.sim.expected_killmails()))}/x"
    assert esi.get(path, **{"User-Agent": "python-requests/2.32.3"}).status_code == 400
    assert esi.get(path, **{"X-Compatibility-Date": "2099-01-01"}).status_code == 400
    assert requests.get(esi.base + path, headers={"User-Agent": HEADERS["User-Agent"]}).status_code == 400
    assert esi.get(path, **{"X-Compatibility-Date": "2025-01-01"}).status_code == 422
    stats = esi.sim.stats()
    assert stats["bad_user_agent"] == 1 and stats["bad_compatibility_date"] == 2


def test_error_limit_gives_420_until_the_window_ends(esi):
    esi.sim.configure(error_limit=3, error_window=60)
    esi.sim.advance(60.5 - esi.sim.now().timestamp() % 60)  # start just inside a fresh window
    remains = [esi.get("/killmails/1/x").headers["X-ESI-Error-Limit-Remain"] for _ in range(3)]
    assert remains == ["2", "1", "0"]
    limited = esi.get(f"/characters/{esi.pilot()['character_id']}/")
    assert limited.status_code == 420 and limited.json() == {"error": "error limited"}
    assert 0 < int(limited.headers["X-ESI-Error-Limit-Reset"]) <= 60
    esi.sim.advance(int(limited.headers["X-ESI-Error-Limit-Reset"]))
    assert esi.get(f"/characters/{esi.pilot()['character_id']}/").status_code == 200
    stats = esi.sim.stats()
    assert stats["status_420"] == 1 and stats["min_error_limit_remain"] == 0


def test_rate_limit_429_with_retry_after(esi):
    esi.sim.configure(detail_bucket=(4, 60))
    killmail_id = next(iter(esi.sim.expected_killmails()))
    path = esi.detail_path(killmail_id)
    answers = [esi.get(path) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].headers["X-Ratelimit-Limit"] == "4/1m" and answers[0].headers["X-Ratelimit-Remaining"] == "2"
    assert answers[1].headers["X-Ratelimit-Used"] == "4"
    assert 55 <= int(answers[2].headers["Retry-After"]) <= 60
    esi.sim.advance(int(answers[2].headers["Retry-After"]))
    assert esi.get(path).status_code == 200
    stats = esi.sim.stats()
    assert stats["status_429"] == 1 and stats["tokens_spent"]["killmail"] == 6


def test_fail_next_and_random_faults(esi):
    killmail_id = next(iter(esi.sim.expected_killmails()))
    path = esi.detail_path(killmail_id)
    esi.sim.fail_next(r"^/killmails/", 503, count=2)
    esi.sim.fail_next(r"^/killmails/", 429, retry_after=7)
    statuses = [esi.get(path) for _ in range(4)]
    assert [a.status_code for a in statuses] == [503, 503, 429, 200]
    assert statuses[2].headers["Retry-After"] == "7" and "error" in statuses[0].json()
    esi.sim.fail_next("oauth", 502)
    assert esi.refresh(esi.sim.pilots()[0]["refresh_token"]).status_code == 502
    esi.sim.configure(error_rate_5xx=1.0)
    assert esi.get(path).status_code in (500, 502, 503, 504)
    esi.sim.configure(error_rate_5xx=0.0, rate_429=1.0)
    random_429 = esi.get(path)
    assert random_429.status_code == 429 and 1 <= int(random_429.headers["Retry-After"]) <= 5


def test_latency_overlaps_across_concurrent_requests(esi):
    esi.sim.configure(latency_ms=500)
    path = f"/characters/{esi.pilot()['character_id']}/"
    n = 64
    go = threading.Barrier(n + 1)
    results: list[int] = []

    def call() -> None:
        go.wait()
        results.append(esi.get(path).status_code)  # each on a connection of its own

    threads = [threading.Thread(target=call) for _ in range(n)]
    for thread in threads:
        thread.start()
    go.wait()
    started = time.monotonic()
    for thread in threads:
        thread.join()
    assert results == [200] * n and time.monotonic() - started < 5  # one after another would take 32 s
    assert esi.sim.stats()["max_in_flight"] == n  # all 64 sleeping at once: none waited for a server thread


def _recording(sim: Simulator) -> list[tuple[str, str]]:
    """Make sim record the client address and port of every request it serves (set before sim.start)."""
    seen: list[tuple[str, str]] = []
    app = sim.wsgi_app

    def wsgi_app(environ, start_response):
        seen.append((environ["REMOTE_ADDR"], environ["REMOTE_PORT"]))
        return app(environ, start_response)

    sim.wsgi_app = wsgi_app
    return seen


def test_a_session_keeps_one_connection_alive():
    sim = Simulator(seed=7, client_id="demo-client", client_secret="demo-secret")
    sim.add_pilots(n_pilots=2, n_killmails=5, corporations=1)
    seen = _recording(sim)
    base = sim.start(port=0)
    try:
        killmail_id = next(iter(sim.expected_killmails(valid_only=False)))
        url = f"{base}/killmails/{killmail_id}/{sim.killmail_hash(killmail_id)}/"
        with requests.Session() as session:
            answers = [session.get(url, headers=HEADERS, timeout=5) for _ in range(2)]
            pools = session.get_adapter(url).poolmanager.pools
            assert [(pools[k].num_connections, pools[k].num_requests) for k in pools.keys()] == [(1, 2)]
        assert [a.status_code for a in answers] == [200, 200]
        assert all("close" not in a.headers.get("Connection", "").lower() for a in answers)
        assert answers[0].content == answers[1].content and answers[0].headers["Content-Length"].isdigit()
        assert len(seen) == 2 and seen[0] == seen[1]  # the server saw both on one TCP connection
    finally:
        sim.stop()


@pytest.mark.parametrize("connection", ["close", "Close", "keep-alive, close", "Upgrade,close"])
def test_connection_close_among_other_tokens_closes_after_the_answer(esi, connection):
    host, port = urlsplit(esi.base).hostname, urlsplit(esi.base).port
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(f"GET /nope HTTP/1.1\r\nHost: x\r\nUser-Agent: t/1 (a@b)\r\nX-Compatibility-Date: 2026-08-18\r\n"
                    f"Connection: {connection}\r\n\r\n".encode())
        data = b""
        while chunk := raw.recv(65536):  # ends only when the server closes the connection
            data += chunk
    assert data.startswith(b"HTTP/1.1 404 ") and b"\r\nConnection: close\r\n" in data


def test_one_date_and_one_server_header_and_no_body_for_head(esi):
    host, port = urlsplit(esi.base).hostname, urlsplit(esi.base).port
    with socket.create_connection((host, port), timeout=5) as raw:
        ask = "{} /nope HTTP/1.1\r\nHost: x\r\nUser-Agent: t/1 (a@b)\r\nX-Compatibility-Date: 2026-08-18\r\n\r\n"
        raw.sendall((ask.format("HEAD") + ask.format("GET")).encode())  # two requests on one connection
        data = b""
        while data.count(b"\r\n\r\n") < 2 or not data.endswith(b"}"):
            chunk = raw.recv(65536)
            assert chunk, f"the server closed the connection after {data!r}"
            data += chunk
    head, get = data.split(b"HTTP/1.1 ")[1:]
    for answer in (head, get):
        names = [line.split(b":")[0].lower() for line in answer.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]]
        assert names.count(b"date") == 1 and names.count(b"server") == 1 and b"connection" not in names
    assert head.startswith(b"405 ") and head.endswith(b"\r\n\r\n") and b"Content-Length: 30" in head  # no body
    assert get.endswith(b'\r\n\r\n{"error":"Not found"}')
    date = re.search(rb"Date: ([^\r]+)", get).group(1).decode()
    esi.sim.advance(86400)  # the Date follows the simulator's clock, not the real one
    later = esi.get("/nope").headers["Date"]
    assert (parsedate_to_datetime(later) - parsedate_to_datetime(date)).total_seconds() >= 86400


def test_idle_keep_alive_connections_never_keep_a_new_one_waiting(esi):
    path = f"/characters/{esi.pilot()['character_id']}/"
    host, port = urlsplit(esi.base).hostname, urlsplit(esi.base).port
    idle = [http.client.HTTPConnection(host, port, timeout=5) for _ in range(300)]  # 2 workers' detail threads
    try:
        for conn in idle:
            conn.request("GET", path, headers=HEADERS)
            answer = conn.getresponse()
            assert answer.status == 200 and answer.getheader("Connection") is None and answer.read()
        sockets = [conn.sock for conn in idle]
        assert all(sockets)  # still open, now idle
        assert esi.get(path).status_code == 200  # a new connection is served all the same (timeout 5 s)
        for conn, sock in zip(idle, sockets, strict=True):
            conn.request("GET", path, headers=HEADERS)
            answer = conn.getresponse()
            assert answer.status == 200 and answer.read() and conn.sock is sock  # and so is each idle one
    finally:
        for conn in idle:
            conn.close()


def test_stop_is_prompt_frees_the_port_and_leaves_no_thread_behind():
    sim = Simulator(seed=7, client_id="demo-client", client_secret="demo-secret")
    sim.stop()  # harmless when not running
    before = set(threading.enumerate())
    base = sim.start(port=0)
    assert sim.base_url == base
    assert all(t.daemon for t in set(threading.enumerate()) - before)  # a forgotten stop() cannot hang the exit
    port = urlsplit(base).port
    with requests.Session() as session:
        assert session.get(base + "/_sim/stats", timeout=5).ok  # leaves an idle kept-alive connection
        started = time.monotonic()
        sim.stop()
        assert time.monotonic() - started < 1.0 and sim.base_url is None
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        again = sim.start(port=port)  # the same port at once, though the old connection has just closed
        try:
            assert again == base and session.get(base + "/_sim/stats", timeout=5).ok  # the client reconnects
        finally:
            sim.stop()
    sim.stop()
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=5)
    assert set(threading.enumerate()) <= before


def test_bucket_running_total_matches_the_spends_in_the_window():
    rng, bucket, spends = random.Random(4), Bucket(), deque()
    now = 1000.0
    for _ in range(3000):
        now += rng.choice([0, 0, 0.5, 1, 7, 40])
        window = rng.choice([60, 60, 60, 30])  # shrinking the window drops more entries at once
        while spends and spends[0][0] + window <= now:
            spends.popleft()
        assert bucket.used(now, window) == sum(cost for _, cost in spends)
        cost = rng.choice([1, 2, 5])
        bucket.spend(now, cost)
        spends.append((now, cost))


def test_bucket_retry_after_counts_the_oldest_spends_until_the_cost_fits():
    bucket = Bucket()
    for at in (0, 10, 20):
        bucket.spend(at, 2)
    assert bucket.retry_after(30, 60, 6, 2) == 30  # the spend at 0 is back at 60
    assert bucket.retry_after(30, 60, 6, 5) == 50  # 5 tokens: the spends at 0, 10 and 20, back at 80
    assert bucket.used(59.999, 60) == 6 and bucket.used(60, 60) == 4 and bucket.used(80, 60) == 0


def test_each_token_returns_exactly_one_window_after_it_was_spent(esi):
    esi.sim.configure(detail_bucket=(6, 60))
    path = esi.detail_path(next(iter(esi.sim.expected_killmails())))
    answers = [esi.get(path)]
    for _ in range(2):
        esi.sim.advance(20)
        answers.append(esi.get(path))
    assert [(a.headers["X-Ratelimit-Used"], a.headers["X-Ratelimit-Remaining"]) for a in answers] == [
        ("2", "4"), ("4", "2"), ("6", "0")]  # the counts after each answer's own cost
    esi.sim.advance(19.5)  # 59.5 s after the first spend
    early = esi.get(path)
    assert early.status_code == 429 and early.headers["Retry-After"] == "1"
    assert (early.headers["X-Ratelimit-Used"], early.headers["X-Ratelimit-Remaining"]) == ("6", "0")  # costs 0
    esi.sim.advance(0.5)  # the first spend's tokens are back, the others not yet
    back = esi.get(path)
    assert back.status_code == 200 and back.headers["X-Ratelimit-Remaining"] == "0"
    again = esi.get(path)
    assert again.status_code == 429 and again.headers["Retry-After"] == "20"  # the second spend, at 80 s
    stats = esi.sim.stats()
    assert stats["status_429"] == 2 and stats["tokens_spent"]["killmail"] == 8


def test_background_spender_shares_the_detail_bucket_and_its_headers(esi):
    path = esi.detail_path(next(iter(esi.sim.expected_killmails())))
    esi.sim.configure(detail_bucket=(60, 60), background_share=0.5)  # 30 tokens a window: 2 every 4 s
    assert esi.get(path).headers["X-Ratelimit-Used"] == "2"  # our IP's bucket, and the other app's beside us
    esi.sim.advance(60)  # our 2 tokens are back; the other app spent 2 at 4, 8, ... 60 s
    assert esi.sim.stats()["tokens_spent_background"] == 30
    first = esi.get(path)
    assert (first.headers["X-Ratelimit-Used"], first.headers["X-Ratelimit-Remaining"]) == ("32", "28")
    esi.sim.advance(4)  # its spend at 4 s comes back at 64 s, as it spends again
    assert esi.get(path).headers["X-Ratelimit-Used"] == "34"
    stats = esi.sim.stats()
    assert stats["tokens_spent"]["killmail"] == 6 and stats["background_refused"] == 0
    esi.sim.configure(background_share=0.0)  # the other app stops: its tokens come back, none go
    esi.sim.advance(60)
    assert esi.sim.stats()["tokens_spent_background"] == 32 and esi.get(path).headers["X-Ratelimit-Used"] == "2"
    with pytest.raises(ValueError):
        esi.sim.configure(background_share=1.5)


def test_background_spends_the_bucket_cannot_pay_are_refused_not_429(esi):
    path = esi.detail_path(next(iter(esi.sim.expected_killmails())))
    esi.sim.configure(detail_bucket=(10, 60), background_share=1.0)  # 2 tokens every 12 s
    assert [esi.get(path).status_code for _ in range(5)] == [200] * 5  # we spend the whole bucket at once
    esi.sim.advance(60)  # its spends at 12 ... 60 s find the bucket full: ours come back just after 60 s
    stats = esi.sim.stats()
    assert (stats["background_refused"], stats["tokens_spent_background"], stats["status_429"]) == (5, 0, 0)
    esi.sim.advance(12)
    answer = esi.get(path)
    assert (answer.headers["X-Ratelimit-Used"], answer.headers["X-Ratelimit-Remaining"]) == ("4", "6")
    assert esi.sim.stats()["tokens_spent_background"] == 2


def test_visibility_records_creation_and_the_first_list_page_that_shows_a_killmail(esi):
    pilot = esi.pilot()
    first = esi.recent(pilot)
    created_at = esi.sim.now().timestamp()
    new = esi.sim.add_killmails(pilot["character_id"], 2)
    seen = esi.sim.visibility()
    assert all(abs(seen[i]["created"] - created_at) < 1 and seen[i]["visible"] is None for i in new)
    old = next(iter(esi.sim.killmail_ids_for(pilot["character_id"]) - set(new)))
    assert seen[old]["visible"] is not None or old not in {r["killmail_id"] for r in first.json()}
    esi.recent(pilot)  # still the cached list, without them
    esi.sim.advance(300)
    unchanged = esi.recent(pilot, **{"If-None-Match": esi.recent(pilot).headers["ETag"]})
    assert unchanged.status_code == 304
    shown_at = esi.sim.visibility()[new[0]]["visible"]
    assert created_at + 300 <= shown_at < esi.sim.now().timestamp()
    over_http = requests.get(esi.base + "/_sim/visibility", timeout=5).json()
    assert over_http[str(new[0])] == {"created": seen[new[0]]["created"], "visible": shown_at}


@pytest.mark.parametrize("route", ["list_character", "detail", "character"])
def test_random_faults_apply_to_every_route_and_a_random_429_looks_real(esi, route):
    pilot = esi.pilot()
    paths = {"list_character": (f"/characters/{pilot['character_id']}/killmails/recent", "char-killmail"),
             "detail": (esi.detail_path(next(iter(esi.sim.expected_killmails()))), "killmail"),
             "character": (f"/characters/{pilot['character_id']}/", None)}
    path, group = paths[route]
    esi.sim.configure(error_rate_5xx=1.0)
    assert esi.get(path, pilot["access_token"]).status_code in (500, 502, 503, 504)
    esi.sim.configure(error_rate_5xx=0.0, rate_429=1.0)
    for rate_limits in (True, False):
        esi.sim.configure(rate_limits=rate_limits)
        limited = esi.get(path, pilot["access_token"])
        assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 5
        assert limited.headers.get("X-Ratelimit-Group") == group
        assert ("X-Ratelimit-Remaining" in limited.headers) == (rate_limits and group is not None)
    stats = esi.sim.stats()
    assert stats["status_429"] == 2 and stats["by_route"][route] == 3 and stats["faults_injected"] == 3


def test_stats_name_the_limits_and_the_details_first_and_last_served(esi):
    stats = esi.sim.stats()
    assert {"min_error_limit_remain", "status_420", "status_429", "max_in_flight", "tokens_spent",
            "tokens_spent_background", "background_refused"} <= set(stats)
    assert stats["first_detail_at"] is None and stats["last_detail_at"] is None
    path = esi.detail_path(next(iter(esi.sim.expected_killmails())))
    before = esi.sim.now().timestamp()
    esi.get(path)
    esi.sim.advance(5)
    esi.get(path)
    stats = esi.sim.stats()
    assert before <= stats["first_detail_at"] < before + 1 and stats["last_detail_at"] >= before + 5


def test_detail_json_is_made_with_the_world_and_malformed_bodies_still_lose_victim(esi, monkeypatch):
    """Serving a detail encodes nothing (the simulator's CPU is the worker's, on one machine)."""
    made: list[int] = []
    real_json = esi_simulator._json

    def counting_json(value):
        if isinstance(value, dict) and "killmail_time" in value:
            made.append(value["killmail_id"])
        return real_json(value)

    monkeypatch.setattr(esi_simulator, "_json", counting_json)
    first, second = list(esi.sim.expected_killmails())[:2]
    answers = [esi.get(esi.detail_path(first)) for _ in range(3)]
    assert made == [] and all(a.json() == esi.sim.expected_killmails()[first] for a in answers)
    assert len({a.headers["ETag"] for a in answers}) == 1 and len({a.content for a in answers}) == 1
    cached = esi.get(esi.detail_path(first), **{"If-None-Match": answers[0].headers["ETag"]})
    assert cached.status_code == 304 and made == []
    whole = esi.get(esi.detail_path(second))  # then the killmail is made malformed
    assert "victim" in whole.json()
    esi.sim.make_malformed(second)
    malformed = esi.get(esi.detail_path(second), **{"If-None-Match": whole.headers["ETag"]})
    assert malformed.status_code == 200 and malformed.headers["ETag"] != whole.headers["ETag"]
    assert malformed.json() == {k: v for k, v in whole.json().items() if k != "victim"}
    esi.sim.make_malformed(first)
    assert "victim" not in esi.get(esi.detail_path(first)).json()


def test_control_api(esi):
    base = esi.base + "/_sim"
    pilot = esi.pilot()
    assert requests.post(base + "/configure", json={"page_size": 5, "detail_bucket": [10, 60]}).ok
    assert len(esi.recent(pilot).json()) == 5
    stats = requests.get(base + "/stats").json()
    assert stats["by_route"]["list_character"] == 1 and stats["by_status"]["200"] >= 1
    pilots = requests.get(base + "/pilots").json()
    assert datetime.fromisoformat(pilots[0]["expires_at"]).tzinfo is not None
    new = requests.post(base + "/add_killmails", json={"character_id": pilot["character_id"], "n": 2}).json()
    assert set(new) <= set(requests.get(base + "/expected").json())
    assert requests.post(base + "/fail_next", json={"path_regex": "/characters/", "status": 500}).ok
    assert esi.get(f"/characters/{pilot['character_id']}").status_code == 500
    before = esi.recent(pilot)
    assert requests.post(base + "/advance", json={"seconds": 300}).ok
    assert esi.recent(pilot).headers["ETag"] != before.headers["ETag"]
    assert requests.post(base + "/reset_stats").ok
    assert requests.get(base + "/stats").json()["requests"] == 0
    assert requests.post(base + "/configure", json={"nope": 1}).status_code == 400


def test_cli_runs_until_sigterm():
    command = [sys.executable, "devtools/esi_simulator.py", "--port", "0", "--pilots", "3", "--killmails", "10"]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()  # the one start line, logged once the server listens
        record_output(line)
        base_url = re.search(r"http://127\.0\.0\.1:\d+", line).group()
        assert requests.get(base_url + "/_sim/pilots", timeout=5).json()[0]["character_name"] == "Pilot 1"
        assert "token" not in line
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()


def post_names(esi, ids) -> requests.Response:
    return requests.post(esi.base + "/universe/names/", json=ids, headers=HEADERS, timeout=5)


def test_names_resolve_every_category_as_esi_names_them_and_refuse_a_batch_with_an_unknown_id(esi):
    pilot = esi.sim.pilots()[0]
    answer = post_names(esi, [pilot["character_id"], 17478, 30000142, 98000001, 500001, 30000743, 35832])
    assert answer.status_code == 200
    named = {n["id"]: (n["category"], n["name"]) for n in answer.json()}
    assert {key: named[key] for key in (pilot["character_id"], 17478, 30000142, 500001, 35832)} == {
        pilot["character_id"]: ("character", pilot["character_name"]), 17478: ("inventory_type", "Retriever"),
        30000142: ("solar_system", "Jita"), 500001: ("faction", "Caldari State"), 35832: ("inventory_type", "Astrahus")}
    # A system the simulator has no name for gets a null-sec designation, a corporation a corporation's name.
    assert named[30000743][0] == "solar_system" and re.fullmatch(r"[A-Z0-9]{1,4}-[A-Z0-9]{1,4}", named[30000743][1])
    assert named[98000001][0] == "corporation" and not re.search(r"\d", named[98000001][1])
    assert post_names(esi, [30000743]).json() == [
        {"id": 30000743, "category": "solar_system", "name": named[30000743][1]}]  # the same name every time
    esi.sim.make_unknown_names(17478)
    assert post_names(esi, [17478, 30000142]).status_code == 404
    assert post_names(esi, [2_000_000_000]).status_code == 404  # in no id range
    assert post_names(esi, []).status_code == 400
    assert requests.get(esi.base + "/universe/names/", headers=HEADERS, timeout=5).status_code == 405


def test_market_prices_cover_the_worlds_types_and_are_cached(esi):
    answer = esi.get("/markets/prices/")
    assert answer.status_code == 200 and "Expires" in answer.headers
    prices = {p["type_id"]: p for p in answer.json()}
    assert {17478, 17482, 3467}.issubset(prices) and prices[17478]["average_price"] > 0
    assert esi.get("/markets/prices/", **{"If-None-Match": answer.headers["ETag"]}).status_code == 304


def test_systems_and_constellations_place_each_system_in_its_region_and_are_cached(esi):
    hek = esi.get("/universe/systems/30002053/")
    assert hek.status_code == 200 and {"Expires", "ETag", "Last-Modified"} <= set(hek.headers)
    assert (hek.json()["name"], hek.json()["system_id"]) == ("Hek", 30002053)
    constellation = esi.get(f"/latest/universe/constellations/{hek.json()['constellation_id']}")
    assert constellation.status_code == 200 and "Expires" in constellation.headers
    assert constellation.json()["region_id"] == 10000042 and 30002053 in constellation.json()["systems"]
    assert post_names(esi, [10000042]).json() == [{"id": 10000042, "category": "region", "name": "Metropolis"}]
    # Any other system sits in a constellation that lists it, in a region /universe/names/ names.
    system = esi.get("/universe/systems/30000743/").json()
    assert system["name"] == post_names(esi, [30000743]).json()[0]["name"]
    placed = esi.get(f"/universe/constellations/{system['constellation_id']}/").json()
    assert 30000743 in placed["systems"] and post_names(esi, [placed["region_id"]]).json()[0]["category"] == "region"
    assert esi.get("/universe/systems/30002053/", **{"If-None-Match": hek.headers["ETag"]}).status_code == 304
    assert esi.get("/universe/systems/17478/").status_code == 404  # a type, not a system
    assert esi.get("/universe/constellations/20999999/").status_code == 404
    assert esi.sim.stats()["by_route"]["system"] == 4 and esi.sim.stats()["by_route"]["constellation"] == 3

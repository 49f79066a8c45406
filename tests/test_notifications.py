"""The notification outbox: rows written with the killmail, the webhooks' filters, the sender's handling of
429/5xx/timeouts/refusals, zKillboard's pace, and delivery exactly as filtered across a kill -9 of the sender."""
from __future__ import annotations

import dataclasses
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest
import requests

import backoff
import db
import esi
import names
import notifications
from helpers import ROOT, make_settings, run_script, settings_env, wait_until
from killmail_model import named_ids, parse_killmail
from notifications import Outcome, SenderOptions
from webhook_receiver import Receiver, plain_answer

NOW = datetime.now(UTC)
FAST = SenderOptions(user_agent="killmail-worker-tests/1.0 (tests@example.org)", timeout=0.5, max_attempts=3,
                     backoff_base=0.0, backoff_cap=0.0, zkillboard_interval=0.3, poll=0.05, name_wait=0.0)


def killmail(killmail_id: int, *, victim: tuple[int, int], attackers: list[tuple[int, int]],
             time: datetime = NOW, system: int = 30000142):
    """A parsed killmail: victim and attackers as (character_id, corporation_id)."""
    body = {
        "killmail_id": killmail_id, "killmail_time": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "solar_system_id": system,
        "victim": {"character_id": victim[0], "corporation_id": victim[1], "ship_type_id": 587,
                   "damage_taken": 100},
        "attackers": [{"character_id": c, "corporation_id": corp, "damage_done": 100, "final_blow": i == 0,
                       "security_status": 0.5} for i, (c, corp) in enumerate(attackers)],
    }
    return parse_killmail(body, killmail_id=killmail_id, killmail_hash=f"{killmail_id:040x}")


def outbox(conn) -> set[tuple[str, int]]:
    return {(r["name"], r["killmail_id"]) for r in conn.execute(
        "SELECT w.name, o.killmail_id FROM outbox o JOIN webhooks w ON w.id = o.webhook_id")}


# ------------------------------------------------------------------------------------------------ the outbox rows


def test_outbox_rows_follow_each_webhooks_filters(conn):
    db.add_webhook(conn, "all", "http://127.0.0.1:9/a")
    db.add_webhook(conn, "corp-losses", "http://127.0.0.1:9/b", corporation_ids=[500], kills=False)
    db.add_webhook(conn, "pilot-kills", "http://127.0.0.1:9/c", character_ids=[7], losses=False)
    db.add_webhook(conn, "off", "http://127.0.0.1:9/d")
    db.set_webhook_enabled(conn, "off", False)
    saved = db.save_killmails(conn, [
        killmail(1, victim=(7, 500), attackers=[(8, 600)]),          # a loss of pilot 7 and corporation 500
        killmail(2, victim=(8, 600), attackers=[(9, 600), (7, 500)]),  # a kill of pilot 7 and corporation 500
        killmail(3, victim=(9, 600), attackers=[(8, 600)]),          # neither
        killmail(4, victim=(7, 500), attackers=[(8, 600)], time=NOW - timedelta(hours=2)),  # too old
    ])
    conn.commit()
    assert saved == [1, 2, 3, 4]
    assert outbox(conn) == {("all", 1), ("all", 2), ("all", 3), ("corp-losses", 1), ("pilot-kills", 2)}


def test_a_killmail_stored_again_is_not_queued_again(conn):
    db.add_webhook(conn, "all", "http://127.0.0.1:9/a")
    db.save_killmails(conn, [killmail(1, victim=(7, 500), attackers=[(8, 600)])])
    conn.execute("UPDATE outbox SET delivered_at = now()")
    assert db.save_killmails(conn, [killmail(1, victim=(7, 500), attackers=[(8, 600)])]) == []
    assert conn.execute("SELECT count(*) FROM outbox").fetchone()["count"] == 1


def test_no_outbox_rows_without_an_enabled_webhook_and_a_rollback_takes_them_back(conn):
    db.save_killmails(conn, [killmail(1, victim=(7, 500), attackers=[(8, 600)])])
    assert outbox(conn) == set()
    db.add_webhook(conn, "all", "http://127.0.0.1:9/a")
    conn.commit()
    db.save_killmails(conn, [killmail(2, victim=(7, 500), attackers=[(8, 600)])])
    conn.rollback()  # the killmail was not stored: nothing is announced
    assert outbox(conn) == set()


def test_min_value_needs_a_known_value_at_least_that(conn):
    db.add_webhook(conn, "big", "http://127.0.0.1:9/a", min_value=1_000_000)
    db.save_killmails(conn, [killmail(i, victim=(7, 500), attackers=[(8, 600)]) for i in (1, 2, 3)])
    assert outbox(conn) == set()  # no value known yet
    conn.execute("UPDATE killmails SET total_value = CASE killmail_id WHEN 1 THEN 5e5 ELSE 2e6 END "
                 "WHERE killmail_id IN (1, 2)")
    db.queue_notifications(conn, [1, 2, 3], max_age=3600)
    assert outbox(conn) == {("big", 2)}


def test_the_age_limit_is_a_parameter_and_zkillboard_takes_old_killmails_too(conn):
    db.add_webhook(conn, "all", "http://127.0.0.1:9/a")
    db.add_webhook(conn, "zkillboard", "http://127.0.0.1:9/z", format="zkillboard", character_ids=[1])
    db.save_killmails(conn, [killmail(1, victim=(7, 500), attackers=[(8, 600)], time=NOW - timedelta(days=2))],
                      notify_max_age=3 * 86400)
    db.save_killmails(conn, [killmail(2, victim=(7, 500), attackers=[(8, 600)], time=NOW - timedelta(days=2))],
                      notify_max_age=86400)
    assert outbox(conn) == {("all", 1), ("zkillboard", 1), ("zkillboard", 2)}


# ------------------------------------------------------------------------------------------------ what an answer means


class Answer(requests.Response):
    def __init__(self, status: int, body: bytes = b"", headers: dict | None = None):
        super().__init__()
        self.status_code, self._content = status, body
        self.headers.update(headers or {})


@pytest.mark.parametrize(("format", "answer", "attempts", "outcome"), [
    ("discord", Answer(204), 1, Outcome(delivered=True)),
    ("discord", Answer(429, b'{"retry_after": 1.5, "global": false}'), 1, Outcome(pause_for=1.5)),
    ("json", Answer(429, b"slow down", {"Retry-After": "7"}), 1, Outcome(pause_for=7.0)),
    ("json", Answer(429), 1, Outcome(pause_for=5.0)),
    ("discord", Answer(503), 1, Outcome(retry_in=5.0)),
    ("discord", Answer(502), 3, Outcome(retry_in=20.0)),
    ("discord", Answer(500), 8, Outcome(retry_in=None)),
    ("discord", None, 2, Outcome(retry_in=10.0)),
    ("discord", Answer(404), 1, Outcome(refuse="HTTP 404")),
    ("zkillboard", Answer(403), 1, Outcome(refuse="HTTP 403")),
    ("json", Answer(400), 1, Outcome()),
])
def test_judge_maps_an_answer_to_what_happens_next(format, answer, attempts, outcome):
    got = notifications.judge(format, answer, "ReadTimeout", attempts, SenderOptions(user_agent="x"))
    assert (got.delivered, got.retry_in, got.pause_for, got.refuse) == \
        (outcome.delivered, outcome.retry_in, outcome.pause_for, outcome.refuse)


def test_backoff_is_capped():
    options = SenderOptions(user_agent="x", backoff_base=5, backoff_cap=60, max_attempts=20)
    assert [notifications.backoff(n, options) for n in (1, 2, 4, 5, 19, 20)] == [5, 10, 40, 60, 60, None]


@pytest.mark.parametrize(("answer", "seconds"), [
    (Answer(429, b"", {"Retry-After": "1e20"}), backoff.MAX_PAUSE),
    (Answer(429, b"", {"Retry-After": "inf"}), 5.0),
    (Answer(429, b"", {"Retry-After": "nan"}), 5.0),
    (Answer(429, b"", {"Retry-After": "-3"}), 0.0),
    (Answer(429, b'{"retry_after": 1e300}'), backoff.MAX_PAUSE),
    (Answer(429, b'{"retry_after": 1e999}'), 5.0),            # Python's json reads it as inf
    (Answer(429, b'{"retry_after": ' + b"9" * 400 + b"}"), 5.0),  # an int too big for a float
    (Answer(429, b"[" * 100_000), 5.0),                       # deeper than the decoder goes
])
def test_every_pause_a_receiver_asks_for_is_clamped(answer, seconds):
    assert notifications.retry_after(answer, 5.0) == seconds


def name_everything(conn, killmails, *, unknown=()) -> None:
    """Store a name for every id the posts of these killmails show (ESI's answer), except the unknown ones."""
    ids = {i for k in killmails for i in named_ids(k)} - set(unknown)
    db.save_names(conn, [{"id": i, "category": "x", "name": f"Name {i}"} for i in ids], list(unknown), NOW,
                  unknown_for=timedelta(days=1))
    conn.commit()


POST = {"killmail_id": 134265477, "killmail_hash": "h", "killmail_time": NOW, "solar_system_id": 30000743,
        "victim_character_id": 2121652582, "victim_corporation_id": 98366055, "victim_alliance_id": 1354830081,
        "victim_ship_type_id": 17478, "total_value": Decimal("1234567890"), "attackers": 3,
        "final_blow_character_id": 96424385, "final_blow_corporation_id": 98601573, "final_blow_ship_type_id": 35683,
        "attacker_character_ids": [96424385, 5], "attacker_corporation_ids": [98601573]}
NAMES = {"solar_system_name": "Hek", "victim_character_name": "Ana Vel", "victim_corporation_name": "Miners Inc",
         "victim_alliance_name": "Goonswarm Federation", "victim_ship_type_name": "Retriever",
         "final_blow_character_name": "Bo Rex", "final_blow_corporation_name": "Hunters",
         "final_blow_ship_type_name": "Hecate"}


def test_a_discord_post_reads_like_zkillboards_with_every_name():
    embed = notifications.discord_embed({**POST, **NAMES, "side": "loss"})["embeds"][0]
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert embed["title"] == "Retriever destroyed in Hek"
    assert embed["url"] == "https://zkillboard.com/kill/134265477/"
    assert embed["thumbnail"]["url"] == "https://images.evetech.net/types/17478/render?size=64"
    assert fields["Victim"] == ("[Ana Vel](https://zkillboard.com/character/2121652582/)\n"
                                "[Miners Inc](https://zkillboard.com/corporation/98366055/)\n"
                                "[Goonswarm Federation](https://zkillboard.com/alliance/1354830081/)")
    assert fields["Final blow"] == ("[Bo Rex](https://zkillboard.com/character/96424385/) in "
                                    "[Hecate](https://zkillboard.com/ship/35683/)")
    assert fields["Attackers"] == "3" and fields["Value"] == "1.23B ISK"
    assert fields["Time"] == NOW.strftime("%Y-%m-%d %H:%M EVE") and embed["timestamp"] == NOW.isoformat()
    assert embed["color"] == notifications.COLOURS["loss"] != notifications.COLOURS["kill"]


def test_a_discord_post_names_the_systems_region_where_known():
    embed = notifications.discord_embed({**POST, **NAMES, "region_id": 10000042, "region_name": "Metropolis"})
    _, fields = embed_fields({"embeds": embed["embeds"]})
    assert embed["embeds"][0]["title"] == "Retriever destroyed in Hek (Metropolis)"
    assert fields["System"] == ("[Hek](https://zkillboard.com/system/30000743/)\n"
                                "[Metropolis](https://zkillboard.com/region/10000042/)")
    embed = notifications.discord_embed({**POST, **NAMES, "region_id": None, "region_name": None})
    assert embed["embeds"][0]["title"] == "Retriever destroyed in Hek"


def test_an_id_without_a_name_shows_as_its_kind_and_id():
    structure = {**POST, **NAMES, "victim_character_id": None, "victim_ship_type_id": 35832,
                 "victim_ship_type_name": None, "solar_system_name": None, "final_blow_character_id": None,
                 "final_blow_corporation_name": None}
    embed = notifications.discord_embed(structure)["embeds"][0]
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert embed["title"] == "type 35832 destroyed in system 30000743"
    assert fields["Victim"].startswith("[Miners Inc]")  # no pilot: a structure
    assert fields["Final blow"].startswith("[corporation 98601573](https://zkillboard.com/corporation/98601573/)")


@pytest.mark.parametrize(("characters", "corporations", "side"), [
    ([], [], None), ([2121652582], [], "loss"), ([], [98366055], "loss"), ([5], [], "kill"),
    ([], [98601573], "kill"), ([96424385], [98366055], "loss"),  # both sides: the loss counts
])
def test_kill_or_loss_is_seen_from_the_webhooks_own_characters_and_corporations(characters, corporations, side):
    assert notifications.side_of(POST, {"character_ids": characters, "corporation_ids": corporations}) == side


# ------------------------------------------------------------------------------------------------ the sender


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make() -> Receiver:
        made.append(Receiver())
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def deliver_all(conn, *, options: SenderOptions = FAST, timeout: float = 30) -> None:
    """Run the sender in this process until no row is pending and due."""
    with requests.Session() as session:
        wait_until(lambda: not notifications.deliver_next(conn, session, options) and not conn.execute(
            "SELECT 1 FROM outbox o JOIN webhooks w ON w.id = o.webhook_id WHERE o.delivered_at IS NULL "
            "AND o.next_attempt_at IS NOT NULL AND w.refused IS NULL").fetchone(),
            timeout=timeout, interval=0.01, what="the outbox to drain")
        conn.rollback()


def embed_fields(body: dict) -> tuple[dict, dict]:
    embed = body["embeds"][0]
    return embed, {f["name"]: f["value"] for f in embed["fields"]}


def test_a_post_waits_for_its_names_and_then_carries_every_one(conn, receivers):
    discord, plain = receivers(), receivers()
    db.add_webhook(conn, "discord", discord.url, corporation_ids=[600])
    db.add_webhook(conn, "plain", plain.url, format="json")
    loss = killmail(1, victim=(7, 500), attackers=[(8, 600)])
    db.save_killmails(conn, [loss])
    conn.commit()
    waiting = replace(FAST, name_wait=30.0)
    with requests.Session() as session:
        assert not notifications.deliver_next(conn, session, waiting)  # no id named yet, the wait not over
    name_everything(conn, [loss])
    deliver_all(conn, options=waiting)
    embed, fields = embed_fields(discord.bodies()[0])
    assert embed["title"] == "Name 587 destroyed in Name 30000142"
    assert fields["Victim"] == ("[Name 7](https://zkillboard.com/character/7/)\n"
                                "[Name 500](https://zkillboard.com/corporation/500/)")
    assert fields["Final blow"] == "[Name 8](https://zkillboard.com/character/8/)"
    assert embed["color"] == notifications.COLOURS["kill"]  # corporation 600 made the kill
    body = plain.bodies()[0]
    assert (body["solar_system_name"], body["victim_character_name"], body["victim_corporation_name"],
            body["victim_ship_type_name"], body["final_blow_character_name"], body["side"]) == (
        "Name 30000142", "Name 7", "Name 500", "Name 587", "Name 8", None)
    assert body["victim_alliance_name"] is None and "attacker_character_ids" not in body


def test_a_post_whose_names_never_come_goes_after_the_bounded_wait_with_kinds_and_ids(conn, receivers):
    discord = receivers()
    db.add_webhook(conn, "discord", discord.url)
    first = killmail(1, victim=(7, 500), attackers=[(8, 600)])
    second = killmail(2, victim=(9, 500), attackers=[(10, 700)])
    db.save_killmails(conn, [first])
    conn.commit()
    db.save_names(conn, [{"id": 587, "category": "inventory_type", "name": "Rifter"}], [], NOW,
                  unknown_for=timedelta(days=1))  # the ship named, the rest never (ESI unreachable, say)
    conn.commit()
    waiting = replace(FAST, name_wait=30.0)
    after = lambda seconds: lambda: datetime.now(UTC) + timedelta(seconds=seconds)  # noqa: E731
    with requests.Session() as session:
        assert not notifications.deliver_next(conn, session, waiting, clock=after(25))
        assert notifications.deliver_next(conn, session, waiting, clock=after(31))
        # Ids ESI said it cannot name count as looked up: such a post goes at once.
        db.save_killmails(conn, [second])
        conn.commit()
        name_everything(conn, [second], unknown=[9, 30000142])
        assert notifications.deliver_next(conn, session, waiting)
    embed, fields = embed_fields(discord.bodies()[0])
    assert embed["title"] == "Rifter destroyed in system 30000142"
    assert fields["Victim"] == ("[character 7](https://zkillboard.com/character/7/)\n"
                                "[corporation 500](https://zkillboard.com/corporation/500/)")
    embed, fields = embed_fields(discord.bodies()[1])
    assert embed["title"] == "Name 587 destroyed in system 30000142"
    assert fields["Final blow"] == "[Name 10](https://zkillboard.com/character/10/)"
    assert fields["Victim"].startswith("[character 9]")


def test_a_post_waits_for_its_systems_region_and_goes_without_it_when_the_lookup_fails(conn, receivers, sim,
                                                                                         database_url):
    discord, plain = receivers(), receivers()
    db.add_webhook(conn, "discord", discord.url)
    db.add_webhook(conn, "plain", plain.url, format="json")
    in_hek = killmail(1, victim=(90000001, 98000001), attackers=[], system=30002053)
    db.save_killmails(conn, [in_hek])
    conn.commit()
    client = esi.EsiClient(make_settings(database_url, sim.base_url), sleep=lambda s: None)
    waiting = replace(FAST, name_wait=30.0)
    after = lambda seconds: lambda: datetime.now(UTC) + timedelta(seconds=seconds)  # noqa: E731
    sim.fail_next(r"/universe/systems/", 503, count=10)  # ESI cannot place the system: named, but no region
    names.resolve_names(conn, client, named_ids(in_hek), NOW)
    sim.clear_faults()
    with requests.Session() as session:
        assert not notifications.deliver_next(conn, session, waiting, clock=after(25))  # waiting for the region
        assert notifications.deliver_next(conn, session, waiting, clock=after(31))
        assert notifications.deliver_next(conn, session, waiting, clock=after(31))
    in_jita = killmail(2, victim=(90000001, 98000001), attackers=[])
    db.save_killmails(conn, [in_jita])
    conn.commit()
    names.resolve_names(conn, client, named_ids(in_jita), NOW)
    deliver_all(conn, options=waiting)  # all named and placed: no wait
    titles = [embed_fields(body)[0]["title"] for body in discord.bodies()]
    assert titles == ["Rifter destroyed in Hek", "Rifter destroyed in Jita (The Forge)"]
    assert [(b["solar_system_name"], b["region_id"], b["region_name"]) for b in plain.bodies()] == [
        ("Hek", None, None), ("Jita", 10000002, "The Forge")]


def test_5xx_and_timeouts_are_retried_then_given_up_with_the_error(conn, receivers):
    flaky, dead = receivers(), receivers()
    flaky.fail_times, flaky.slow_times, flaky.slow_seconds = 1, 1, 2.0
    dead.fail_times = 100
    db.add_webhook(conn, "flaky", flaky.url)
    db.add_webhook(conn, "dead", dead.url, format="json")
    db.save_killmails(conn, [killmail(1, victim=(7, 500), attackers=[(8, 600)])])
    conn.commit()
    deliver_all(conn)
    assert [b["embeds"][0]["footer"]["text"] for b in flaky.bodies()] == ["killmail 1"]
    assert dead.bodies() == [] and dead.answers == [503, 503, 503]
    rows = {r["name"]: r for r in conn.execute(
        "SELECT w.name, o.* FROM outbox o JOIN webhooks w ON w.id = o.webhook_id")}
    assert rows["flaky"]["attempts"] == 3 and rows["flaky"]["delivered_at"] is not None
    assert rows["dead"]["next_attempt_at"] is None and rows["dead"]["last_error"].startswith("HTTP 503")
    assert db.outbox_summary(conn, datetime.now(UTC)) == {"pending": 0, "delivered_24h": 1, "failed": 1,
                                                          "refused": []}


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/api/webhooks/1/discord-webhook-token-5f1e9a",  # nothing listens on port 9
    "http://127.0.0.1:9/x?token=SUPERSECRET123",
    "http://hook-user:hook-password-77@127.0.0.1:9/x",
])
def test_an_error_names_only_the_webhooks_scheme_and_host(conn, url):
    db.add_webhook(conn, "closed", url)  # conftest watches the URL's secret parts from here on
    db.save_killmails(conn, [killmail(1, victim=(7, 500), attackers=[(8, 600)])])
    conn.commit()
    deliver_all(conn)
    (row,) = conn.execute("SELECT attempts, last_error FROM outbox").fetchall()
    assert row["attempts"] == FAST.max_attempts
    assert row["last_error"] == "ConnectionError posting to http://127.0.0.1"


def answer_flood(handler) -> None:
    """200 with a body of 100 MiB, written until the sender hangs up."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(100 * 2 ** 20))
    handler.end_headers()
    chunk = b"x" * 2 ** 16
    for _ in range(100 * 2 ** 4):
        handler.wfile.write(chunk)


def answer_trickle(handler) -> None:
    """200 with a body of a byte every 0.1 s (each read well within the sender's timeout), for 10 s."""
    handler.send_response(200)
    handler.send_header("Content-Length", "100")
    handler.end_headers()
    for _ in range(100):
        handler.wfile.write(b"x")
        handler.wfile.flush()
        time.sleep(0.1)  # the receiver's pace, not a synchronisation


def test_a_post_follows_no_redirect_reads_a_capped_answer_and_has_a_deadline(conn, receivers):
    redirecting, internal, flooding, trickling = receivers(), receivers(), receivers(), receivers()
    redirecting.answer_with = plain_answer(307, {"Location": internal.url})
    flooding.answer_with, trickling.answer_with = answer_flood, answer_trickle
    for name, receiver in (("redirecting", redirecting), ("flooding", flooding), ("trickling", trickling)):
        db.add_webhook(conn, name, receiver.url, format="json")
    db.save_killmails(conn, [killmail(1, victim=(7, 500), attackers=[(8, 600)])])
    conn.commit()
    started = time.monotonic()
    deliver_all(conn, options=dataclasses.replace(FAST, max_attempts=1, deadline=2.0))
    assert time.monotonic() - started < 8  # the trickle alone takes 10 s
    rows = {r["name"]: r for r in conn.execute(
        "SELECT w.name, o.* FROM outbox o JOIN webhooks w ON w.id = o.webhook_id")}
    assert internal.requests == 0 and rows["redirecting"]["last_error"].startswith("HTTP 307")
    assert rows["flooding"]["last_error"] == f"answer larger than {esi.MAX_BODY_BYTES} bytes"
    assert rows["trickling"]["last_error"] == "answer not read within 2 s"
    assert all(row["delivered_at"] is None and row["next_attempt_at"] is None for row in rows.values())


def test_a_404_marks_the_webhook_refused_and_keeps_its_rows(conn, receivers):
    gone = receivers()
    gone.refuse_with = 404
    db.add_webhook(conn, "gone", gone.url)
    db.save_killmails(conn, [killmail(i, victim=(7, 500), attackers=[(8, 600)]) for i in (1, 2)])
    conn.commit()
    deliver_all(conn)
    assert gone.answers == [404]
    assert db.outbox_summary(conn, datetime.now(UTC))["refused"] == [{"name": "gone", "refused": "HTTP 404"}]
    assert db.list_webhooks(conn)[0]["pending"] == 2


def test_zkillboard_gets_id_and_hash_with_the_user_agent_one_at_a_time_until_it_refuses(conn, receivers):
    zkb = receivers()
    notifications.register_zkillboard(conn, zkb.url, enabled=True)
    db.save_killmails(conn, [killmail(i, victim=(7, 500), attackers=[(8, 600)]) for i in (1, 2, 3)])
    conn.commit()
    deliver_all(conn)
    assert sorted(p["path"] for p in zkb.posts) == [f"/hook/{i}/{i:040x}/" for i in (1, 2, 3)]
    assert {p["headers"]["User-Agent"] for p in zkb.posts} == {FAST.user_agent}
    times = [p["at"] for p in zkb.posts]
    assert all(b - a >= FAST.zkillboard_interval * 0.9 for a, b in zip(times, times[1:], strict=False))
    zkb.refuse_with = 403
    db.save_killmails(conn, [killmail(4, victim=(7, 500), attackers=[(8, 600)])])
    conn.commit()
    deliver_all(conn)
    notifications.register_zkillboard(conn, zkb.url, enabled=True)  # a restart does not forget the refusal
    assert db.outbox_summary(conn, datetime.now(UTC))["refused"] == [{"name": "zkillboard", "refused": "HTTP 403"}]
    notifications.register_zkillboard(conn, "http://127.0.0.1:9/moved", enabled=False)
    assert (db.get_webhook(conn, "zkillboard")["url"], db.get_webhook(conn, "zkillboard")["enabled"]) == \
        ("http://127.0.0.1:9/moved", False)


# ------------------------------------------------------------------------------------------------ end to end


def start_sender(settings, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "send_notifications.py")], env=settings_env(settings) | env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@contextmanager
def sender_running(settings, **env: str) -> Iterator[subprocess.Popen]:
    """send_notifications.py while the block runs; then SIGTERM, which must stop it with 0."""
    sender = start_sender(settings, **env)
    try:
        yield sender
        sender.send_signal(signal.SIGTERM)
        output = sender.communicate(timeout=20)[0]  # read, so that the leak check sees it too
        assert sender.returncode == 0, output
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()


def test_zkillboard_push_registers_zkillboard_and_the_sender_posts_there(conn, database_url, receivers):
    zkb = receivers()
    with sender_running(make_settings(database_url), ZKILLBOARD_PUSH="1", ZKILLBOARD_URL=zkb.url):
        wait_until(lambda: db.get_webhook(conn, "zkillboard") or conn.rollback(), timeout=30,
                   what="zKillboard registered")
        db.save_killmails(conn, [killmail(9, victim=(7, 500), attackers=[(8, 600)], time=NOW - timedelta(days=5))])
        conn.commit()
        wait_until(lambda: zkb.posts, timeout=30, what="the post to zKillboard")
    assert [p["path"] for p in zkb.posts] == [f"/hook/9/{9:040x}/"]


def test_the_sender_names_a_bad_setting_and_exits_2(database_url):
    sender = start_sender(make_settings(database_url), ZKILLBOARD_PUSH="maybe")
    output, _ = sender.communicate(timeout=30)
    assert sender.returncode == 2
    assert output.strip() == "configuration error: ZKILLBOARD_PUSH: must be 1 or 0, got 'maybe'"


def test_a_429_asking_for_forever_pauses_that_receiver_and_the_sender_serves_the_others(conn, database_url,
                                                                                         receivers):
    hostile, other = receivers(), receivers()
    hostile.answer_with = plain_answer(429, {"Retry-After": "1e20"}, b"go away\n")  # not JSON
    db.add_webhook(conn, "hostile", hostile.url)  # its row is first in line
    db.add_webhook(conn, "other", other.url)
    posted = killmail(1, victim=(7, 500), attackers=[(8, 600)])
    db.save_killmails(conn, [posted])
    conn.commit()
    name_everything(conn, [posted])  # named already: the posts need not wait for names
    with sender_running(make_settings(database_url)) as sender:
        wait_until(lambda: other.bodies() or sender.poll() is not None, timeout=30, what="the other post")
        assert sender.poll() is None, sender.communicate()[0]
        assert hostile.requests == 1 and len(other.bodies()) == 1
        paused = conn.execute("SELECT paused_until - now() AS left FROM webhooks WHERE name = 'hostile'").fetchone()
        assert timedelta(seconds=backoff.MAX_PAUSE - 60) < paused["left"] <= timedelta(seconds=backoff.MAX_PAUSE)


def test_a_post_that_raises_is_given_up_with_its_reason_and_the_sender_goes_on(conn, receivers, monkeypatch):
    good = receivers()
    db.add_webhook(conn, "broken", "http://127.0.0.1:9/broken")
    db.add_webhook(conn, "good", good.url)
    db.save_killmails(conn, [killmail(1, victim=(7, 500), attackers=[(8, 600)])])
    conn.commit()
    request_for = notifications.request_for

    def breaks_for_one(format, url, killmail):
        if url.endswith("/broken"):
            raise ValueError("a post nobody foresaw")
        return request_for(format, url, killmail)

    monkeypatch.setattr(notifications, "request_for", breaks_for_one)
    deliver_all(conn)
    rows = {r["name"]: r for r in conn.execute(
        "SELECT w.name, o.* FROM outbox o JOIN webhooks w ON w.id = o.webhook_id")}
    assert rows["broken"]["next_attempt_at"] is None
    assert rows["broken"]["last_error"] == "failed: ValueError: a post nobody foresaw"
    assert rows["good"]["delivered_at"] is not None and len(good.bodies()) == 1


def expected(killmails, *, corporation=None, character=None, kills=True, losses=True) -> set[int]:
    wanted = set()
    for k in killmails:
        victim = (k.row.victim_character_id, k.row.victim_corporation_id)
        attackers = [(a.character_id, a.corporation_id) for a in k.attackers]
        hit = lambda who: who[0] == character or who[1] == corporation  # noqa: E731
        if (losses and hit(victim)) or (kills and any(map(hit, attackers))):
            wanted.add(k.killmail_id)
    return wanted


def test_each_receiver_gets_what_its_filters_ask_for_once_across_a_kill_and_a_429_window(
        conn, database_url, receivers):
    everything, corp_losses, pilot_kills = receivers(), receivers(), receivers()
    corp_losses.rate_limited_for, corp_losses.retry_after = 3.0, 0.25  # "a minute" of 429s, shortened
    everything.hold_at = 100
    db.add_webhook(conn, "everything", everything.url)
    db.add_webhook(conn, "corp-losses", corp_losses.url, format="json", corporation_ids=[500], kills=False)
    db.add_webhook(conn, "pilot-kills", pilot_kills.url, character_ids=[7], losses=False)
    conn.commit()
    rng = random.Random(16)
    people = [(7, 500), (8, 500), (9, 600), (10, 600), (11, 700)]
    recent = [killmail(1000 + i, victim=rng.choice(people), attackers=rng.sample(people, rng.randint(1, 3)))
              for i in range(500)]
    old = [killmail(5000 + i, victim=(7, 500), attackers=[(8, 500)], time=NOW - timedelta(hours=3))
           for i in range(20)]
    for start in range(0, 520, 50):
        db.save_killmails(conn, (recent + old)[start:start + 50])
        conn.commit()
    name_everything(conn, recent + old)  # as the workers' namers would: no post waits for its names
    settings = make_settings(database_url)
    sender = start_sender(settings)
    try:
        assert everything.held.wait(60), "the sender never posted the 100th killmail"
        os.kill(sender.pid, signal.SIGKILL)
        sender.wait(10)
        everything.release.set()
        senders = [start_sender(settings), start_sender(settings)]  # two at once share the rows
        wait_until(lambda: db.outbox_summary(conn, datetime.now(UTC))["pending"] == 0, timeout=120,
                   what="every post delivered")
        conn.rollback()
        for process in senders:
            process.send_signal(signal.SIGTERM)
        assert [process.wait(20) for process in senders] == [0, 0]
    finally:
        for process in [sender, *locals().get("senders", [])]:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert len(expected(recent, character=7, losses=False)) > 50  # the filters are not trivially empty
    ids = lambda bodies: [int(b["embeds"][0]["footer"]["text"].split()[1]) for b in bodies]  # noqa: E731
    want_all = {k.killmail_id for k in recent}
    assert sorted(ids(everything.bodies())) == sorted(want_all)
    assert sorted(b["killmail_id"] for b in corp_losses.bodies()) == sorted(
        expected(recent, corporation=500, kills=False))
    assert sorted(ids(pilot_kills.bodies())) == sorted(expected(recent, character=7, losses=False))
    assert 429 in corp_losses.answers and 503 in everything.answers
    assert db.outbox_summary(conn, datetime.now(UTC))["failed"] == 0


def test_the_sender_prunes_old_delivered_and_given_up_rows_only(conn, database_url):
    db.add_webhook(conn, "all", "http://127.0.0.1:9/a")
    db.save_killmails(conn, [killmail(i, victim=(7, 500), attackers=[(8, 600)]) for i in (1, 2, 3, 4, 5)])
    old = NOW - timedelta(days=31)
    conn.execute("UPDATE outbox SET delivered_at = %s WHERE killmail_id = 1", (old,))
    conn.execute("UPDATE outbox SET delivered_at = %s WHERE killmail_id = 2", (NOW,))
    conn.execute("UPDATE outbox SET next_attempt_at = NULL, created_at = %s WHERE killmail_id = 3", (old,))
    conn.execute("UPDATE outbox SET created_at = %s WHERE killmail_id = 4", (old,))  # old, but still pending
    conn.commit()
    db.set_webhook_enabled(conn, "all", False)  # the running sender only prunes
    conn.commit()
    stop = threading.Event()
    with db.connect(database_url) as sender_conn:
        sender = threading.Thread(target=notifications.run, args=(sender_conn, FAST, stop))
        sender.start()
        try:
            wait_until(lambda: {k for _, k in outbox(conn)} == {2, 4, 5}, timeout=10, what="the old rows pruned")
        finally:
            stop.set()
            sender.join(10)


def test_the_sender_connects_again_when_postgresql_went_away(conn, database_url, receivers):
    receiver = receivers()
    db.add_webhook(conn, "all", receiver.url)
    db.save_killmails(conn, [killmail(1, victim=(7, 500), attackers=[(8, 600)])])
    conn.commit()
    attempts = []

    def connect():
        attempts.append(1)
        if len(attempts) == 1:
            raise psycopg.OperationalError("connection refused")
        return db.connect(database_url)

    stop = threading.Event()
    sender = threading.Thread(target=notifications.serve, args=(connect, FAST, stop))
    sender.start()
    try:
        wait_until(lambda: receiver.bodies(), timeout=10, what="the post after a reconnect")
    finally:
        stop.set()
        sender.join(10)
    assert len(attempts) == 2 and not sender.is_alive()


# ------------------------------------------------------------------------------------------------ the CLI


def test_webhooks_cli_adds_lists_and_tests_with_names(conn, database_url, receivers, sim):
    receiver = receivers()
    settings = make_settings(database_url, sim.base_url)
    added = run_script("webhooks.py", settings, "add", "losses", receiver.url, "--format", "json",
                       "--corporation", "500", "--corporation", "600", "--no-kills", "--min-value", "1e9")
    assert added.returncode == 0, added.stderr
    webhook = db.get_webhook(conn, "losses")
    assert (webhook["format"], webhook["corporation_ids"], webhook["kills"], webhook["losses"],
            webhook["min_value"]) == ("json", [500, 600], False, True, Decimal("1e9"))
    listed = run_script("webhooks.py", settings, "list")
    assert listed.returncode == 0 and "losses\tjson\tenabled\t500,600\tkills=False" in listed.stdout
    tested = run_script("webhooks.py", settings, "test", "losses")  # nothing stored: the sample killmail
    assert tested.returncode == 0, tested.stderr
    assert [b["killmail_id"] for b in receiver.bodies()] == [134265477]
    sample = receiver.bodies()[0]  # named through ESI (the simulator), as the workers name ids
    assert (sample["victim_ship_type_name"], sample["final_blow_ship_type_name"]) == ("Retriever", "Hecate")
    assert all(sample[key] for key in ("solar_system_name", "victim_character_name", "victim_corporation_name",
                                       "victim_alliance_name", "final_blow_character_name"))
    assert sample["side"] is None  # neither corporation 500 nor 600 took part
    db.save_killmails(conn, [killmail(77, victim=(7, 500), attackers=[(8, 600)])])
    conn.commit()
    assert run_script("webhooks.py", settings, "test", "losses").returncode == 0  # now the latest stored one
    assert [b["killmail_id"] for b in receiver.bodies()] == [134265477, 77]
    receiver.refuse_with = 404
    assert run_script("webhooks.py", settings, "test", "losses").returncode == 1
    assert run_script("webhooks.py", settings, "test", "nobody").returncode == 1


def add_webhook_cli(settings, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "webhooks.py"), "add", *args], env=settings_env(settings) | env,
                          cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "http://hooks.example/api/webhooks/1/tok-3e1f0c9a",
                                 "ftp://hooks.example/x", "discord.com/api/webhooks/1/tok-3e1f0c9a"])
def test_webhooks_cli_adds_only_https_or_loopback_urls(conn, database_url, url):
    added = add_webhook_cli(make_settings(database_url), "bad", stdin=url + "\n")
    assert added.returncode == 2 and "must be an https URL (http only to localhost)" in added.stderr
    assert "tok-3e1f0c9a" not in added.stderr and db.get_webhook(conn, "bad") is None


def test_webhooks_cli_reads_the_url_from_stdin_or_the_environment_and_warns_about_the_command_line(conn,
                                                                                                  database_url):
    settings, url = make_settings(database_url), "https://discord.example/api/webhooks/1/tok-5d2b7e41"
    assert add_webhook_cli(settings, "piped", stdin=url + "\n").returncode == 0
    assert add_webhook_cli(settings, "env", WEBHOOK_URL=url).returncode == 0
    assert db.get_webhook(conn, "piped")["url"] == db.get_webhook(conn, "env")["url"] == url
    local = add_webhook_cli(settings, "local", "http://127.0.0.1:9/hook")
    assert local.returncode == 0 and "shows in ps and the shell's history" in local.stderr


def test_webhooks_cli_test_names_only_the_scheme_and_host_of_a_failing_webhook(conn, database_url):
    db.add_webhook(conn, "closed", "http://127.0.0.1:9/x?token=SUPERSECRET123")
    conn.commit()
    tested = run_script("webhooks.py", make_settings(database_url), "test", "closed")
    # (ESI is unreachable here too: the sample's names are not resolved, which it says first.)
    assert tested.returncode == 1 and "SUPERSECRET123" not in tested.stderr + tested.stdout
    assert tested.stderr.splitlines()[-1] == "❌ closed: ConnectionError posting to http://127.0.0.1"


def test_the_docs_embed_is_rendered_from_what_the_receiver_logged():
    from embed_screenshot import received_embed, render
    body = received_embed()
    page = render(body)
    assert body["embeds"][0]["url"] == "https://zkillboard.com/kill/134265477/"
    assert re.fullmatch(r"Retriever destroyed in \S+ \(\w+\)", body["embeds"][0]["title"])  # with the region
    assert "https://zkillboard.com/kill/134265477/" in page and "187.65M ISK" in page
    assert '<a href="https://zkillboard.com/ship/35683/">Hecate</a>' in page
    assert "images.evetech.net/types/17478/render?size=64" in page
    assert "character 2121652582" not in page and "system 30000743" not in page


def test_the_worker_passes_the_age_limit_to_sync(database_url):
    import killmail_worker
    child = killmail_worker.Child(make_settings(database_url, notify_max_age_seconds=600), burst=True)
    assert child.sync_options(full=True).notify_max_age == 600

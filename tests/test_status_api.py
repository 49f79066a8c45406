"""The web app's API on the status app: POST /api/sync/<id> and GET /api/characters/<id>/killmails."""
from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pika
import pytest
from flask import Flask

import broker
import db
from helpers import RABBITMQ_URL, insert_users, make_settings, watch_secrets
from killmail_model import parse_killmail
from web import api
from web.sources import Sources

TOKEN = "api-secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SAMPLE = json.loads((Path(__file__).resolve().parent / "data/killmail_134265477.json").read_text())
PILOT = 2121652582  # the sample's victim


@pytest.fixture
def client(make_client):
    watch_secrets([TOKEN])
    return make_client(app_api_token=TOKEN)


@pytest.fixture
def pilot(conn):
    insert_users(conn, [{"character_id": PILOT, "character_name": "Victim", "access_token": "A", "refresh_token": "R",
                         "expires_at": datetime.now(UTC)}])
    return PILOT


def store_killmails(conn, ids):
    killmails = [parse_killmail(dict(SAMPLE, killmail_id=i), killmail_id=i, killmail_hash=f"{i:040x}") for i in ids]
    db.save_killmails(conn, killmails)
    db.store_refs(conn, "character", PILOT, [(i, f"{i:040x}") for i in ids])
    conn.commit()


def test_the_api_is_a_blueprint_of_its_own(database_url, queue_name, pilot):
    """web/api.py serves /api on any Flask app, behind its own bearer token, without the status app around it."""
    sources = Sources(make_settings(database_url, queue_name=queue_name, app_api_token=TOKEN))
    app = Flask(__name__)
    app.register_blueprint(api.api_blueprint(sources))
    client = app.test_client()
    try:
        assert client.get(f"/api/characters/{pilot}/killmails").status_code == 401
        answer = client.get(f"/api/characters/{pilot}/killmails", headers=AUTH)
        assert answer.status_code == 200 and answer.get_json() == {"killmails": [], "next_before": None}
    finally:
        sources.close()


def test_api_is_disabled_without_a_token_setting(make_client, pilot):
    response = make_client().post(f"/api/sync/{pilot}", headers=AUTH)
    assert response.status_code == 404 and "disabled" in response.get_json()["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_api_refuses_a_missing_or_wrong_bearer_token(client, pilot, headers):
    for response in (client.post(f"/api/sync/{pilot}", headers=headers),
                     client.get(f"/api/characters/{pilot}/killmails", headers=headers)):
        assert response.status_code == 401 and response.get_json()["success"] is False


def test_sync_now_queues_the_pilot_at_high_priority_once(client, pilot, queue_name):
    response = client.post(f"/api/sync/{pilot}", headers=AUTH)
    assert response.status_code == 200
    assert response.get_json() == {"success": True, "message": "Queued Victim at high priority"}
    again = client.post(f"/api/sync/{pilot}", headers=AUTH).get_json()
    assert again["success"] is True and "already queued" in again["message"]
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    method, properties, body = channel.basic_get(queue_name, auto_ack=True)
    assert properties.priority == broker.PRIORITY_NOW and json.loads(body)["character_id"] == pilot
    assert channel.basic_get(queue_name, auto_ack=True)[0] is None
    connection.close()


def test_sync_now_for_an_unknown_user_is_404(client, conn):
    response = client.post("/api/sync/42", headers=AUTH)
    assert response.status_code == 404 and response.get_json()["success"] is False


def test_killmails_newest_first_with_summaries_and_keyset_paging(client, conn, pilot):
    store_killmails(conn, [101, 102, 103, 104, 105])
    first = client.get(f"/api/characters/{pilot}/killmails?limit=2", headers=AUTH).get_json()
    assert [k["killmail_id"] for k in first["killmails"]] == [105, 104] and first["next_before"] == 104
    one = first["killmails"][0]
    assert one["is_loss"] is True and one["victim"]["ship_type_id"] == 17478
    assert one["attackers"] == {"count": 1, "final_blow": {
        "character_id": 96424385, "character_name": None, "corporation_id": 98601573, "corporation_name": None,
        "ship_type_id": 35683, "ship_type_name": None}}
    assert one["killmail_time"] == "2026-03-25T14:26:36Z"
    second = client.get(f"/api/characters/{pilot}/killmails?limit=2&before=104", headers=AUTH).get_json()
    assert [k["killmail_id"] for k in second["killmails"]] == [103, 102]
    last = client.get(f"/api/characters/{pilot}/killmails?limit=2&before=102", headers=AUTH).get_json()
    assert [k["killmail_id"] for k in last["killmails"]] == [101] and last["next_before"] is None


def test_killmails_of_an_unknown_user_is_404_and_bad_paging_is_400(client, conn, pilot):
    assert client.get("/api/characters/42/killmails", headers=AUTH).status_code == 404
    assert client.get(f"/api/characters/{pilot}/killmails?limit=x", headers=AUTH).status_code == 400


def test_killmails_carry_names_beside_ids_and_isk_values(client, conn, pilot):
    from decimal import Decimal
    killmail = parse_killmail(dict(SAMPLE, killmail_id=101), killmail_id=101, killmail_hash="a" * 40)
    db.save_killmails(conn, [killmail], [(Decimal("30000000.50"), Decimal(1000), Decimal("30001000.50"))])
    db.store_refs(conn, "character", PILOT, [(101, "a" * 40)])
    db.save_names(conn, [{"id": 30000743, "category": "solar_system", "name": "Kor-Azor Prime"},
                         {"id": PILOT, "category": "character", "name": "Victim"},
                         {"id": 17478, "category": "inventory_type", "name": "Retriever"},
                         {"id": 96424385, "category": "character", "name": "Killer"}],
                  [98366055], datetime.now(UTC), unknown_for=timedelta(days=1))
    conn.commit()
    one = client.get(f"/api/characters/{pilot}/killmails", headers=AUTH).get_json()["killmails"][0]
    assert one["solar_system_name"] == "Kor-Azor Prime"
    assert (one["destroyed_value"], one["dropped_value"], one["total_value"]) == (30000000.5, 1000, 30001000.5)
    victim = one["victim"]
    assert (victim["character_name"], victim["ship_type_name"], victim["corporation_name"]) == (
        "Victim", "Retriever", None)  # the corporation ESI could not name is null
    assert one["attackers"]["final_blow"]["character_name"] == "Killer"

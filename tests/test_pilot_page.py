"""web/pilot.py through Flask's test client, against the real test database and broker: a pilot's /me, its
"Sync now" and /logout, and the sessions that are refused (none, forged, tampered, expired)."""
from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

import broker
import db
from helpers import insert_users, jobs, queue_counts
from killmail_model import parse_killmail
from web import pilot, sso

SECRET_KEY = "test-flask-secret-key-4d9e2a7c15b08f"
SAMPLE = json.loads((Path(__file__).resolve().parent / "data/killmail_134265477.json").read_text())
PILOT, OTHER = 2121652582, 90000002  # the sample's victim, and a pilot with killmails of its own
CORPORATION = 98366055  # the sample victim's corporation


@pytest.fixture
def client(make_client):
    return make_client(eve_callback_url="http://localhost/callback", flask_secret_key=SECRET_KEY,
                       status_basic_auth="op:secret")


@pytest.fixture
def pilots(conn):
    """PILOT with a loss (101), a second loss (102) and a kill (201); OTHER with a kill of its own (301)."""
    now = datetime.now(UTC)
    insert_users(conn, [{"character_id": c, "character_name": name, "access_token": f"ACCESS-{c}-token",
                         "refresh_token": f"REFRESH-{c}-token", "expires_at": now + timedelta(minutes=20)}
                        for c, name in ((PILOT, "Victim"), (OTHER, "Other Pilot"))])
    store(conn, PILOT, 101, value=Decimal("30001000.50"))
    store(conn, PILOT, 102)
    store(conn, PILOT, 201, victim=555)
    store(conn, OTHER, 301, victim=556)
    db.save_names(conn, [{"id": 30000743, "category": "solar_system", "name": "Kor-Azor Prime"},
                         {"id": 17478, "category": "inventory_type", "name": "Retriever"},
                         {"id": 96424385, "category": "character", "name": "Killer"}],
                  [], now, unknown_for=timedelta(days=1))
    conn.commit()
    return PILOT


def store(conn, character_id: int, killmail_id: int, *, victim: int | None = None, value: Decimal | None = None,
          kind: str = "character") -> None:
    """Store the sample as this killmail, linked to this pilot's (or corporation's) list."""
    body = dict(SAMPLE, killmail_id=killmail_id)
    if victim is not None:
        body["victim"] = {**SAMPLE["victim"], "character_id": victim}
    killmail = parse_killmail(body, killmail_id=killmail_id, killmail_hash=f"{killmail_id:040x}")
    db.save_killmails(conn, [killmail], [(value, Decimal(0), value) if value else None])
    db.store_refs(conn, kind, character_id, [(killmail_id, f"{killmail_id:040x}")])
    conn.commit()


def log_in_as(client, character_id: int) -> str:
    """Give the client this pilot's session, as /callback does; its CSRF token."""
    with client.session_transaction() as session:
        session.update(character_id=character_id, csrf=f"csrf-{character_id}-token-value")
    return f"csrf-{character_id}-token-value"


def signed_cookie(data: dict, *, key: str = SECRET_KEY, signed_at: float | None = None) -> str:
    """A session cookie's value as Flask signs it, with this key and signing time."""
    flask_sessions = SecureCookieSessionInterface()

    class At(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(signed_at if signed_at is not None else time.time())

    return URLSafeTimedSerializer(key, salt=flask_sessions.salt, serializer=flask_sessions.serializer, signer=At,
                                  signer_kwargs={"key_derivation": flask_sessions.key_derivation,
                                                 "digest_method": flask_sessions.digest_method}).dumps(data)


def page(response) -> str:
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and "ACCESS-" not in text and "REFRESH-" not in text
    return text


def shown_killmails(text: str) -> list[int]:
    import re
    return [int(i) for i in re.findall(r'data-killmail="(\d+)"', text)]


# ---------------------------------------------------------------------------------------------- the page


def test_the_page_lists_the_pilots_kills_and_losses_newest_first_with_names_values_and_links(client, pilots):
    log_in_as(client, PILOT)
    response = client.get("/me")
    text = page(response)
    assert response.status_code == 200 and shown_killmails(text) == [201, 102, 101]
    row_101 = text[text.index('data-killmail="101"'):]
    row_101 = row_101[:row_101.index("</tr>")]
    assert "Loss" in row_101 and "Retriever" in row_101 and "Kor-Azor Prime" in row_101 and "Killer" in row_101
    assert "30.00M ISK" in row_101 and 'href="https://zkillboard.com/kill/101/"' in row_101
    row_201 = text[text.index('data-killmail="201"'):]
    assert ">Kill<" in row_201[:row_201.index("</tr>")]
    assert "Victim" in text and 'id="sync-now"' in text and "/status" not in text


def test_the_page_is_paged_newest_first(client, conn, pilots, monkeypatch):
    monkeypatch.setattr(pilot, "PAGE_SIZE", 2)
    log_in_as(client, PILOT)
    first = page(client.get("/me"))
    assert shown_killmails(first) == [201, 102] and 'href="/me?before=102"' in first
    second = page(client.get("/me?before=102"))
    assert shown_killmails(second) == [101] and 'id="older"' not in second and 'id="newest"' in second


def test_a_pilot_sees_only_its_own_killmails_whatever_it_asks(client, pilots):
    log_in_as(client, PILOT)
    for url in ("/me", f"/me?character_id={OTHER}", f"/me?view=character&character_id={OTHER}"):
        assert shown_killmails(page(client.get(url))) == [201, 102, 101]
    response = client.get(f"/api/characters/{OTHER}/killmails")  # the API has a bearer token of its own
    assert response.status_code == 404 and "301" not in response.get_data(as_text=True)
    assert client.get("/status").status_code == 401  # the operator's page keeps its password


def test_the_corporation_view_is_refused_without_the_scope_and_shown_with_it(client, conn, pilots):
    store(conn, CORPORATION, 401, victim=557, kind="corporation")
    log_in_as(client, PILOT)
    refused = client.get("/me?view=corporation")
    assert refused.status_code == 403 and "401" not in page(refused)
    db.save_profile(conn, PILOT, corporation_id=CORPORATION,
                    scopes=f"publicData {sso.CHAR_SCOPE} {db.CORPORATION_SCOPE}")
    conn.commit()
    assert shown_killmails(page(client.get("/me?view=corporation"))) == [401]
    assert 'href="/me?view=corporation"' in page(client.get("/me"))


def test_the_sync_state_is_said_in_plain_words(client, conn, pilots):
    log_in_as(client, PILOT)
    text = page(client.get("/me"))
    assert "not yet" in text and "now: at the next queue run" in text and 'id="last-error">none<' in text
    db.finish_sync(conn, "character", PILOT, datetime.now(UTC) - timedelta(minutes=2), "ok", found_new=True)
    conn.commit()
    text = page(client.get("/me"))
    assert "2 min ago" in text and 'id="next-sync">in 2 min<' in text  # SYNC_INTERVAL_SECONDS: 300 s
    db.mark_revoked(conn, PILOT, f"REFRESH-{PILOT}-token", "invalid_grant: the refresh token is revoked")
    conn.commit()
    text = page(client.get("/me"))
    assert "log in again: EVE revoked the grant" in text and "not until you log in again" in text


@pytest.mark.parametrize("state, words", [
    ({"revoked": True, "token_error": "invalid_grant: Invalid refresh token"}, "log in again: EVE revoked the grant"),
    ({"revoked": True, "token_error": "forgotten: its grant was revoked by an operator"},
     "log in again: an operator removed this pilot's grant"),
    ({"revoked": True, "token_error": "killmail list forbidden: 403"},
     "log in again: the grant lacks the scope to read your killmails"),
    ({"run_status": "error", "run_error": "recent killmails: ServerError: ESI answered 502 Bad Gateway"},
     "the last sync did not finish: ESI answered with an error of its own; it is tried again shortly"),
    ({"run_status": "error", "run_error": "token refresh failed: ServerError: 503"},
     "the last sync did not finish: EVE SSO did not renew the login's access; it is tried again shortly"),
    ({"run_status": "partial"}, "some killmails could not be fetched yet; the next sync tries them again"),
    ({"run_status": "ok"}, None),
    ({"run_status": "locked"}, None),
])
def test_sync_problems_in_plain_words(state, words):
    assert pilot.sync_problem({"revoked": False, "token_error": None, "run_status": None, "run_error": None,
                                    **state}) == words


@pytest.mark.parametrize("value, shown", [(None, "–"), (950, "950 ISK"), (12_500, "12.5k ISK"),
                                          (Decimal("3400000"), "3.40M ISK"), (1_250_000_000, "1.25B ISK")])
def test_isk_values_as_pilots_write_them(value, shown):
    assert pilot.isk(value) == shown


# ---------------------------------------------------------------------------------------------- Sync now


def test_sync_now_queues_the_pilot_at_high_priority_at_most_once_a_minute(client, make_client, conn, pilots,
                                                                           queue_name):
    csrf = log_in_as(client, PILOT)
    response = client.post("/me/sync", data={"csrf_token": csrf})
    assert response.status_code == 303 and response.headers["Location"] == "/me"
    assert "Queued Victim at high priority" in page(client.get("/me"))
    assert [(p, body["character_id"]) for p, body in jobs(queue_name)] == [(broker.PRIORITY_NOW, PILOT)]
    db.release_user(conn, PILOT)  # as the job's end does
    conn.commit()
    again = client.post("/me/sync", data={"csrf_token": csrf}, follow_redirects=True)
    assert "once a minute" in page(again)
    # Once a minute per pilot, not per browser: another session of the pilot is held back too.
    other_browser = make_client(eve_callback_url="http://localhost/callback", flask_secret_key=SECRET_KEY)
    other_csrf = log_in_as(other_browser, PILOT)
    assert "once a minute" in page(other_browser.post("/me/sync", data={"csrf_token": other_csrf},
                                                      follow_redirects=True))
    assert jobs(queue_name) == []
    conn.execute("UPDATE users SET sync_requested_at = now() - interval '61 seconds'")
    conn.commit()
    assert "Queued Victim" in page(client.post("/me/sync", data={"csrf_token": csrf}, follow_redirects=True))
    assert [(p, body["character_id"]) for p, body in jobs(queue_name)] == [(broker.PRIORITY_NOW, PILOT)]


@pytest.mark.parametrize("form", [{}, {"csrf_token": ""}, {"csrf_token": "csrf-90000002-token-value"}])
def test_sync_now_without_the_sessions_csrf_token_is_refused(client, conn, pilots, queue_name, form):
    log_in_as(client, PILOT)
    response = client.post("/me/sync", data=form)
    assert response.status_code == 403 and "token" in page(response)
    assert queue_counts(queue_name) == [0]
    assert db.get_user(conn, PILOT)["sync_requested_at"] is None


# ---------------------------------------------------------------------------------------------- sessions


def test_without_a_session_the_page_and_sync_now_are_refused(client, pilots, queue_name):
    response = client.get("/me")
    assert response.status_code == 401 and 'href="/login"' in page(response)
    assert shown_killmails(page(response)) == []
    assert client.post("/me/sync", data={"csrf_token": ""}).status_code == 401
    assert queue_counts(queue_name) == [0]


def test_a_forged_session_is_refused(client, pilots):
    client.set_cookie(pilot.SESSION_COOKIE, signed_cookie({"character_id": OTHER, "csrf": "x"},
                                                                key="another-key-an-attacker-chose-123456"))
    response = client.get("/me")
    assert response.status_code == 401 and shown_killmails(page(response)) == []
    client.set_cookie(pilot.SESSION_COOKIE, signed_cookie({"character_id": OTHER, "csrf": "x"}))
    assert shown_killmails(page(client.get("/me"))) == [301]  # the same session, signed with the key: accepted


def test_a_tampered_session_is_refused(client, pilots):
    log_in_as(client, PILOT)
    value = client.get_cookie(pilot.SESSION_COOKIE).value
    payload, _, signature = value.partition(".")
    forged_payload = signed_cookie({"character_id": OTHER, "csrf": "x"}).partition(".")[0]
    client.set_cookie(pilot.SESSION_COOKIE, f"{forged_payload}.{signature}")
    response = client.get("/me")
    assert response.status_code == 401 and shown_killmails(page(response)) == []


def test_an_expired_session_is_refused(client, pilots):
    lifetime = pilot.SESSION_LIFETIME.total_seconds()
    client.set_cookie(pilot.SESSION_COOKIE, signed_cookie({"character_id": PILOT, "csrf": "x"},
                                                                signed_at=time.time() - lifetime - 60))
    response = client.get("/me")
    assert response.status_code == 401 and "expired" in page(response) and shown_killmails(page(response)) == []
    client.set_cookie(pilot.SESSION_COOKIE, signed_cookie({"character_id": PILOT, "csrf": "x"},
                                                                signed_at=time.time() - lifetime + 60))
    assert shown_killmails(page(client.get("/me"))) == [201, 102, 101]


def test_logout_ends_the_session(client, pilots):
    csrf = log_in_as(client, PILOT)
    assert client.post("/logout", data={"csrf_token": "wrong"}).status_code == 403
    assert client.get("/me").status_code == 200
    response = client.post("/logout", data={"csrf_token": csrf})
    assert response.status_code == 200 and "You are logged out" in page(response)
    assert client.get_cookie(pilot.SESSION_COOKIE) is None
    assert client.get("/me").status_code == 401


def test_the_pages_are_off_without_login(make_client, pilots):
    client = make_client()
    assert client.get("/me").status_code == 404 and client.post("/logout").status_code == 404

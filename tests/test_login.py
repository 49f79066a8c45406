"""web/login.py through Flask's test client: /login, /callback and /pilots/<id>/forget against the real test database
and broker, with EVE SSO and ESI simulated (the simulator), or answered by `responses` for forged tokens."""
from __future__ import annotations

import base64
import html
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives.asymmetric import rsa

import broker
import db
from helpers import CLIENT_ID, CLIENT_SECRET, TOKEN_KEYS, insert_users, jobs
from tokens import TokenVault, is_sealed
from web import sso

CALLBACK = "http://localhost/callback"
CLOSED = "http://127.0.0.1:9"
OPERATOR = {"Authorization": "Basic " + base64.b64encode(b"op:secret").decode(), "Origin": "http://localhost"}
FAKE_SSO = "https://sso.test"
SECRET_KEY = "test-flask-secret-key-0b7d1e5a93c2f6"


@pytest.fixture
def pilots(sim):
    """Three pilots in two corporations (the first two in alliance 99000001, the third in none)."""
    return sim.add_pilots(n_pilots=3, n_killmails=30, share=2, expired_fraction=0, revoked=0, corporations=3)


@pytest.fixture
def login_app(make_client, sim):
    """Build a status app's test client whose login talks to the simulator, with these settings overrides."""
    def make(**overrides):
        values = dict(sso_token_url=f"{sim.base_url}/v2/oauth/token", esi_base_url=sim.base_url,
                      eve_callback_url=CALLBACK, sso_authorize_url=f"{sim.base_url}/v2/oauth/authorize",
                      sso_jwks_url=f"{sim.base_url}/oauth/jwks", sso_revoke_url=f"{sim.base_url}/v2/oauth/revoke",
                      status_basic_auth="op:secret", eve_client_id=CLIENT_ID, flask_secret_key=SECRET_KEY)
        return make_client(**{**values, **overrides})
    return make


@pytest.fixture
def client(login_app):
    return login_app()


def start_login(client, query: str = "") -> str:
    """GET /login; the SSO authorize URL it sends the browser to."""
    response = client.get(f"/login{query}")
    assert response.status_code == 302
    return response.headers["Location"]


def choose(authorize_url: str, *, character_id: int | None = None, decline: bool = False) -> str:
    """What the pilot's click on the simulator's authorize page gives: the callback's path and query."""
    extra = "&decline=1" if decline else f"&character_id={character_id}"
    answer = requests.get(authorize_url + extra, allow_redirects=False, timeout=5)
    assert answer.status_code == 302
    location = urlsplit(answer.headers["Location"])
    return f"{location.path}?{location.query}"


def log_in(client, character_id: int, query: str = ""):
    """Log in as this pilot; the page the browser lands on (the pilot's /me after a login that went through)."""
    return client.get(choose(start_login(client, query), character_id=character_id), follow_redirects=True)


def users(conn) -> list[dict]:
    rows = conn.execute("SELECT * FROM users ORDER BY character_id").fetchall()
    conn.commit()
    return rows


def assert_no_token(response, *tokens: str) -> None:
    page = response.get_data(as_text=True)
    assert "Traceback" not in page
    for token in tokens:
        assert token not in page


# ---------------------------------------------------------------------------------------------- the happy path


def test_login_redirects_to_sso_with_state_pkce_and_a_bound_cookie(client):
    location = urlsplit(start_login(client))
    query = {k: v[0] for k, v in parse_qs(location.query).items()}
    assert query["response_type"] == "code" and query["client_id"] == CLIENT_ID
    assert query["redirect_uri"] == CALLBACK and query["code_challenge_method"] == "S256"
    assert query["scope"] == "publicData esi-killmails.read_killmails.v1"
    assert len(query["state"]) >= 32 and len(query["code_challenge"]) == 43
    cookie = client.get_cookie("killmail_login_state", path="/callback")
    assert cookie.value == query["state"] and cookie.http_only and cookie.same_site == "Lax" and not cookie.secure


def test_the_cookie_is_secure_when_the_callback_is_https(login_app):
    client = login_app(eve_callback_url="https://killmails.example.org/km/callback")
    start_login(client)
    cookie = client.get_cookie("killmail_login_state", domain="localhost", path="/km/callback")
    assert cookie.secure and cookie.http_only


def test_a_login_gives_a_signed_http_only_lax_session_and_lands_on_the_pilots_page(client, conn, pilots):
    response = client.get(choose(start_login(client), character_id=pilots[0]))
    assert response.status_code == 303 and response.headers["Location"] == "/me"
    cookie = client.get_cookie("killmail_session")
    assert cookie.http_only and cookie.same_site == "Lax" and not cookie.secure and cookie.expires is not None
    page = client.get("/me").get_data(as_text=True)
    assert 'id="pilot-name">Pilot 1<' in page and "Pilot 1 was added" in page


def test_the_session_cookie_is_secure_when_the_callback_is_https(login_app, conn, pilots):
    client = login_app(eve_callback_url="https://killmails.example.org/callback")
    response = client.get(choose(start_login(client), character_id=pilots[0]), base_url="https://localhost")
    assert response.status_code == 303
    cookie = client.get_cookie("killmail_session")
    assert cookie.secure and cookie.http_only and cookie.same_site == "Lax"


def test_a_login_adds_the_pilot_as_the_web_app_would_and_queues_its_first_sync(client, conn, sim, pilots,
                                                                                 queue_name):
    response = log_in(client, pilots[0], "?corporation=1")
    assert response.status_code == 200, response.get_data(as_text=True)
    page = response.get_data(as_text=True)
    assert "Pilot 1 was added" in page and "esi-killmails.read_corporation_killmails.v1" in page
    assert 'id="login-added"' in page and "Queued Pilot 1 at high priority" in page
    assert 'href="/status"' not in page  # the operator's page is not the pilot's
    [user] = users(conn)
    granted = next(p for p in sim.pilots() if p["character_id"] == pilots[0])
    assert (user["character_id"], user["character_name"], user["refresh_token"], user["access_token"]) == \
        (pilots[0], "Pilot 1", granted["refresh_token"], granted["access_token"])
    assert user["scopes"].split() == ["publicData", sso.CHAR_SCOPE, db.CORPORATION_SCOPE]
    assert abs((user["expires_at"] - datetime.now(UTC)).total_seconds() - 1199) < 30
    assert user["revoked_token_sha256"] is None and user["queued_at"] is not None
    assert jobs(queue_name) == [(broker.PRIORITY_NOW, {"character_id": pilots[0], "character_name": "Pilot 1",
                                                       "queued_at": jobs_stamp(user)})]
    assert_no_token(response, granted["access_token"], granted["refresh_token"])
    assert client.get_cookie("killmail_login_state", path="/callback") is None  # used up


def test_with_token_key_a_login_stores_the_refresh_token_sealed(login_app, conn, sim, pilots):
    response = log_in(login_app(token_keys=TOKEN_KEYS), pilots[0])
    assert response.status_code == 200, response.get_data(as_text=True)
    [user] = users(conn)
    granted = next(p for p in sim.pilots() if p["character_id"] == pilots[0])
    assert is_sealed(user["refresh_token"]) and granted["refresh_token"] not in user["refresh_token"]
    assert TokenVault(TOKEN_KEYS[:1]).open(user["refresh_token"]) == granted["refresh_token"]
    assert user["access_token"] == granted["access_token"]  # 20 minutes of life: stored as given (tokens.py)


def jobs_stamp(user: dict) -> str:
    return user["queued_at"].astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_a_revoked_pilot_who_logs_in_again_is_usable_again(client, conn, sim, pilots, queue_name):
    insert_users(conn, [p for p in sim.pilots() if p["character_id"] == pilots[1]])
    old = db.get_user(conn, pilots[1])
    sim.revoke(pilots[1])
    db.mark_revoked(conn, pilots[1], old["refresh_token"], "invalid_grant: gone")  # as the worker marks it
    conn.commit()
    assert db.get_user(conn, pilots[1])["revoked"] is True
    response = log_in(client, pilots[1])
    assert response.status_code == 200 and "Pilot 2 logged in again" in response.get_data(as_text=True)
    user = db.get_user(conn, pilots[1])
    conn.commit()
    assert user["revoked"] is False and user["revoked_token_sha256"] is None and user["token_error"] is None
    assert user["refresh_token"] != old["refresh_token"] and len(users(conn)) == 1
    assert [body["character_id"] for _, body in jobs(queue_name)] == [pilots[1]]


def test_a_broker_that_is_down_still_adds_the_pilot_for_the_producer(login_app, conn, pilots):
    response = log_in(login_app(rabbitmq_url="amqp://guest:guest@127.0.0.1:1/%2F"), pilots[0])
    page = html.unescape(response.get_data(as_text=True))
    assert response.status_code == 200 and "the producer's next run queues it" in page
    [user] = users(conn)
    assert user["queued_at"] is None and user["last_sync_at"] is None  # due: the next producer run takes it


# ---------------------------------------------------------------------------------------------- bad input


def assert_refused(response, conn, status: int, words: str) -> None:
    page = html.unescape(response.get_data(as_text=True))
    assert response.status_code == status, page
    assert "Login refused" in page and words in page, page
    assert_no_token(response)
    assert users(conn) == []


def test_a_callback_without_state_is_refused(client, conn, pilots):
    assert_refused(client.get("/callback?code=abc"), conn, 400, "came without a state")


def test_a_used_state_is_refused(client, conn, pilots, sim):
    callback = choose(start_login(client), character_id=pilots[0])
    assert client.get(callback).status_code == 303  # to /me
    conn.execute("DELETE FROM users")
    conn.commit()
    client.set_cookie("killmail_login_state", parse_qs(urlsplit(callback).query)["state"][0], path="/callback")
    assert_refused(client.get(callback), conn, 400, "already used or has expired")


def test_a_state_started_in_another_browser_is_refused(login_app, conn, pilots):
    callback = choose(start_login(login_app()), character_id=pilots[0])
    assert_refused(login_app().get(callback), conn, 400, "started in another browser")


def test_a_declined_login_is_refused_and_uses_its_state_up(client, conn, pilots):
    callback = choose(start_login(client), decline=True)
    assert_refused(client.get(callback), conn, 400, "you declined")
    assert conn.execute("SELECT count(*) AS n FROM login_states").fetchone()["n"] == 0


def test_a_code_sso_refuses_is_refused(client, conn, pilots):
    callback = choose(start_login(client), character_id=pilots[0]).replace("code=", "code=x")
    assert_refused(client.get(callback), conn, 400, "refused the login code (invalid_grant)")


@pytest.mark.parametrize("broken, words", [
    ({"sso_token_url": f"{CLOSED}/v2/oauth/token"}, "EVE SSO could not be reached"),
    ({"sso_jwks_url": f"{CLOSED}/oauth/jwks"}, "EVE SSO's key set could not be reached"),
    ({"esi_base_url": CLOSED, "login_allowed_corporations": (1,)}, "ESI could not be reached"),
])
def test_sso_jwks_or_esi_unreachable_is_503(login_app, conn, pilots, broken, words):
    assert_refused(log_in(login_app(**broken), pilots[0]), conn, 503, words)


def test_wrong_app_credentials_are_503_and_name_the_variables(login_app, conn, pilots):
    assert_refused(log_in(login_app(eve_client_secret="wrong"), pilots[0]), conn, 503, "EVE_CLIENT_SECRET")


# ---------------------------------------------------------------------------------------------- allow-lists


@pytest.mark.parametrize("lists, allowed", [
    ({"login_allowed_corporations": (98000001,)}, [True, False, False]),
    ({"login_allowed_alliances": (99000001,)}, [True, True, False]),
    ({"login_allowed_corporations": (98000003,), "login_allowed_alliances": (99000001,)}, [True, True, True]),
    ({"login_allowed_corporations": (1,), "login_allowed_alliances": (2,)}, [False, False, False]),
])
def test_the_allow_lists_decide_before_anything_is_stored(login_app, conn, pilots, lists, allowed):
    client = login_app(**lists)
    for character_id, expected in zip(pilots, allowed, strict=True):
        response = log_in(client, character_id)
        assert response.status_code == (200 if expected else 403)
        if not expected:
            assert "which may not add pilots here" in response.get_data(as_text=True)
    assert [u["character_id"] for u in users(conn)] == [c for c, ok in zip(pilots, allowed, strict=True) if ok]


# ---------------------------------------------------------------------------------------------- forged tokens


@pytest.fixture(scope="module")
def keys():
    return {name: rsa.generate_private_key(public_exponent=65537, key_size=2048) for name in ("sso", "other")}


def forged(keys, *, key: str = "sso", kid: str | None = "JWT-Signature-Key", algorithm: str = "RS256",
           **claims) -> str:
    now = int(time.time())
    payload = {"sub": "CHARACTER:EVE:90000001", "name": "Pilot 1", "scp": [sso.CHAR_SCOPE],
               "aud": [CLIENT_ID, "EVE Online"], "iss": "https://login.eveonline.com", "exp": now + 1199,
               "iat": now, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": kid} if kid else {}
    signing = "a-shared-secret-of-32-bytes-or-more!" if algorithm.startswith("HS") else keys[key]
    return jwt.encode(payload, signing if algorithm != "none" else None, algorithm=algorithm, headers=headers)


@pytest.fixture
def fake_sso(login_app, keys):
    """A status app whose SSO is answered by `responses`: the JWKS publishes the 'sso' key; set_token() says
    which access token the code exchange gives."""
    client = login_app(sso_token_url=f"{FAKE_SSO}/v2/oauth/token", sso_jwks_url=f"{FAKE_SSO}/oauth/jwks",
                       sso_authorize_url=f"{FAKE_SSO}/v2/oauth/authorize")
    public = jwt.algorithms.RSAAlgorithm.to_jwk(keys["sso"].public_key(), as_dict=True)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{FAKE_SSO}/oauth/jwks", json={"keys": [dict(public, kid="JWT-Signature-Key", alg="RS256")]})

        def set_token(token: str) -> None:
            mock.upsert(responses.POST, f"{FAKE_SSO}/v2/oauth/token",
                        json={"access_token": token, "refresh_token": "REFRESH-forged", "expires_in": 1199})
        yield client, set_token


def forged_login(client) -> object:
    state = parse_qs(urlsplit(start_login(client)).query)["state"][0]
    return client.get(f"/callback?code=a-code&state={state}")


def test_a_well_signed_token_from_the_fake_sso_is_accepted(fake_sso, keys, conn):
    client, set_token = fake_sso
    set_token(forged(keys, iss="login.eveonline.com", scp=sso.CHAR_SCOPE))  # the other issuer form; scp a string
    assert forged_login(client).status_code == 303  # to /me
    assert [(u["character_id"], u["scopes"]) for u in users(conn)] == [(90000001, sso.CHAR_SCOPE)]


@pytest.mark.parametrize("forgery, words", [
    ({"key": "other"}, "its signature does not match EVE SSO's key"),
    ({"kid": "Another-Key"}, "signed by a key EVE SSO does not publish"),
    ({"kid": None}, "names no signing key"),
    ({"iss": "https://evil.example"}, "it was not issued by EVE SSO"),
    ({"aud": ["someone-else", "EVE Online"]}, "it was not issued to this application"),
    ({"aud": [CLIENT_ID]}, "its audience lacks 'EVE Online'"),
    ({"exp": int(time.time()) - 3600}, "it has expired"),
    ({"exp": None}, "it lacks a claim (exp)"),
    ({"algorithm": "HS256"}, "signed with an algorithm its key does not use"),
    ({"algorithm": "none"}, "signed with an algorithm its key does not use"),
    ({"sub": "CORPORATION:EVE:98000001"}, "names no character"),
    ({"scp": ["publicData"]}, "lacks the scope esi-killmails.read_killmails.v1"),
])
def test_a_token_that_fails_verification_stores_nothing(fake_sso, keys, conn, forgery, words):
    client, set_token = fake_sso
    token = forged(keys, **forgery)
    set_token(token)
    response = forged_login(client)
    assert_refused(response, conn, 400, words)
    assert_no_token(response, token, "REFRESH-forged")


# ---------------------------------------------------------------------------------------------- forget


@pytest.fixture
def known(conn, sim, pilots):
    """Pilot 1 in users, with a stored killmail of its own."""
    insert_users(conn, [p for p in sim.pilots() if p["character_id"] == pilots[0]])
    conn.execute("INSERT INTO character_killmails (character_id, killmail_id) VALUES (%s, 1)", (pilots[0],))
    conn.commit()
    return pilots[0]


def test_forget_needs_the_operator_password(client, conn, known):
    assert client.post(f"/pilots/{known}/forget").status_code == 401
    assert db.get_user(conn, known)["refresh_token"]


def test_forget_needs_a_password_to_be_set_at_all(login_app, conn, known):
    response = login_app(status_basic_auth="").post(f"/pilots/{known}/forget")
    assert response.status_code == 403 and "STATUS_BASIC_AUTH" in response.get_data(as_text=True)


def test_forget_revokes_the_grant_and_clears_the_tokens_but_keeps_the_killmails(client, conn, sim, known):
    refresh = db.get_user(conn, known)["refresh_token"]
    conn.commit()
    response = client.post(f"/pilots/{known}/forget", headers=OPERATOR)
    assert response.status_code == 200 and "forgot Pilot 1" in response.get_data(as_text=True)
    assert refresh not in response.get_data(as_text=True)
    user = db.get_user(conn, known)
    assert (user["access_token"], user["refresh_token"], user["expires_at"]) == (None, None, None) and user["revoked"]
    assert conn.execute("SELECT count(*) AS n FROM character_killmails").fetchone()["n"] == 1
    conn.commit()
    assert next(p for p in sim.pilots() if p["character_id"] == known)["revoked"] is True
    answer = requests.post(f"{sim.base_url}/v2/oauth/token", data={"grant_type": "refresh_token",
                           "refresh_token": refresh}, auth=(CLIENT_ID, CLIENT_SECRET), timeout=5)
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


def test_forget_opens_a_sealed_token_to_revoke_it_at_sso(login_app, conn, sim, known):
    plain = db.get_user(conn, known)["refresh_token"]
    conn.execute("UPDATE users SET refresh_token = %s WHERE character_id = %s",
                 (TokenVault(TOKEN_KEYS[:1]).seal(plain), known))
    conn.commit()
    response = login_app(token_keys=TOKEN_KEYS).post(f"/pilots/{known}/forget", headers=OPERATOR)
    assert response.status_code == 200 and "revoked at EVE SSO" in response.get_data(as_text=True)
    assert next(p for p in sim.pilots() if p["character_id"] == known)["revoked"] is True


def test_forget_of_a_token_no_key_opens_clears_it_and_says_it_was_not_revoked(login_app, conn, sim, known):
    plain = db.get_user(conn, known)["refresh_token"]
    conn.execute("UPDATE users SET refresh_token = %s WHERE character_id = %s",
                 (TokenVault(TOKEN_KEYS[1:]).seal(plain), known))
    conn.commit()
    response = login_app(token_keys=TOKEN_KEYS[:1]).post(f"/pilots/{known}/forget", headers=OPERATOR)
    page = response.get_data(as_text=True)
    assert response.status_code == 200 and "not revoked at EVE SSO" in page and "TOKEN_KEY" in page
    assert db.get_user(conn, known)["refresh_token"] is None
    assert next(p for p in sim.pilots() if p["character_id"] == known)["revoked"] is False


def test_forget_leaves_the_tokens_when_sso_cannot_revoke(login_app, conn, known):
    response = login_app(sso_revoke_url=f"{CLOSED}/v2/oauth/revoke").post(f"/pilots/{known}/forget", headers=OPERATOR)
    assert response.status_code == 503
    assert db.get_user(conn, known)["refresh_token"]


def test_forget_of_an_unknown_pilot_is_404(client, conn):
    assert client.post("/pilots/42/forget", headers=OPERATOR).status_code == 404


def test_forget_waits_for_a_running_sync(client, conn, database_url, known):
    with db.connect(database_url, autocommit=True) as worker:
        assert db.try_lock(worker, db.LOCK_CHARACTER, known)
        assert client.post(f"/pilots/{known}/forget", headers=OPERATOR).status_code == 409
    assert db.get_user(conn, known)["refresh_token"]


# ---------------------------------------------------------------------------------------------- disabled


def test_without_a_callback_url_the_routes_are_404(login_app, conn, known):
    client = login_app(eve_callback_url="")
    for response in (client.get("/login"), client.get("/callback?code=a&state=b"),
                     client.post(f"/pilots/{known}/forget", headers=OPERATOR)):
        assert response.status_code == 404 and "EVE_CALLBACK_URL" in response.get_data(as_text=True)


def test_old_login_states_are_deleted_by_the_next_login(client, conn):
    conn.execute("INSERT INTO login_states (state_sha256, code_verifier, scopes, created_at) VALUES "
                 "('old', 'v', 's', %s)", (datetime.now(UTC) - timedelta(hours=1),))
    conn.commit()
    start_login(client)
    assert [r["state_sha256"] for r in conn.execute("SELECT state_sha256 FROM login_states")] != ["old"]
    assert conn.execute("SELECT count(*) AS n FROM login_states WHERE state_sha256 = 'old'").fetchone()["n"] == 0

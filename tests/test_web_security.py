"""The status app against hostile requests, served by a real gunicorn: out-of-range numbers, cross-site posts,
security headers, reflected error text."""
from __future__ import annotations

import socket
import uuid
from datetime import UTC, datetime

import psycopg
import pytest
import requests

import db
from helpers import CLIENT_ID, CLIENT_SECRET, ROOT, USER_AGENT, watch_secrets
from screenshot import EXPECTED_USERS, seed_status_rows, serve, status_env
from web.login import LOGINS_PER_CLIENT, LOGINS_UNDER_WAY

PASSWORD = "web-security-password-3f9a"
OPERATOR = ("ops", PASSWORD)
API_TOKEN = "web-security-api-token-8d2c"
API = {"Authorization": f"Bearer {API_TOKEN}"}
CALLBACK = "https://killmails.example/callback"
CLOSED = "http://127.0.0.1:9"  # nothing listens there: no test here reaches SSO or ESI


@pytest.fixture(scope="module")
def app_url(database_url):
    """One gunicorn for the module: operator password, API token and an https callback URL set."""
    env = status_env(database_url, queue=f"test_web_{uuid.uuid4().hex[:10]}", STATUS_BASIC_AUTH=f"ops:{PASSWORD}",
                     APP_API_TOKEN=API_TOKEN, EVE_CALLBACK_URL=CALLBACK, ESI_USER_AGENT=USER_AGENT,
                     EVE_CLIENT_ID=CLIENT_ID, EVE_CLIENT_SECRET=CLIENT_SECRET, ESI_BASE_URL=CLOSED,
                     SSO_TOKEN_URL=f"{CLOSED}/v2/oauth/token", SSO_JWKS_URL=f"{CLOSED}/oauth/jwks",
                     SSO_REVOKE_URL=f"{CLOSED}/v2/oauth/revoke",
                     FLASK_SECRET_KEY="web-security-session-key-" + "s" * 16)
    with serve(env) as base:
        yield base


@pytest.fixture(autouse=True)
def secrets():
    watch_secrets([PASSWORD, API_TOKEN])


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/characters/99999999999999999999/killmails"),
    ("GET", "/api/characters/1/killmails?before=99999999999999999999"),
    ("GET", "/api/characters/1/killmails?before=-99999999999999999999"),
    ("POST", "/api/sync/99999999999999999999"),
])
def test_api_numbers_out_of_range_are_400(app_url, conn, method, path):
    answer = requests.request(method, app_url + path, headers=API, timeout=10)
    assert answer.status_code == 400 and answer.json()["success"] is False


@pytest.mark.parametrize(("headers", "allowed"), [
    ({"Sec-Fetch-Site": "cross-site", "Origin": "https://killmails.example"}, False),
    ({"Sec-Fetch-Site": "same-site"}, False),
    ({"Sec-Fetch-Site": "same-origin"}, True),
    ({"Origin": "https://evil.example"}, False),       # no Sec-Fetch-Site: plain http, an older Safari
    ({"Origin": "null"}, False),                       # a sandboxed frame, a data: URL
    ({"Referer": "https://evil.example/page"}, False),
    ({"Origin": "https://evil.example", "Referer": "https://killmails.example/status"}, False),
    ({}, False),                                       # neither: refused
    ({"Origin": "https://killmails.example"}, True),   # the callback URL's origin, as a proxy serves the app
    ({"Referer": "https://killmails.example/status"}, True),
    ({"Origin": "APP"}, True),                         # the address it was reached at
])
def test_forget_refuses_a_cross_site_post_even_with_the_operators_password(app_url, conn, headers, allowed):
    headers = {k: v.replace("APP", app_url) for k, v in headers.items()}
    answer = requests.post(f"{app_url}/pilots/42/forget", headers=headers, auth=OPERATOR, timeout=10)
    # Pilot 42 is unknown: a request let through is answered 404 before anything is revoked.
    assert answer.status_code == (404 if allowed else 403), answer.text


@pytest.mark.parametrize(("method", "path", "auth"), [
    ("GET", "/health", None), ("GET", "/status", OPERATOR), ("GET", "/status", None), ("GET", "/metrics", OPERATOR),
    ("GET", "/login", None), ("GET", "/callback?error=access_denied", None), ("GET", "/nowhere", None),
    ("POST", "/pilots/42/forget", None), ("GET", "/api/characters/1/killmails", None),
])
def test_every_answer_carries_the_security_headers_and_hsts_for_an_https_callback(app_url, conn, method, path,
                                                                                  auth):
    answer = requests.request(method, app_url + path, auth=auth, allow_redirects=False, timeout=10)
    policy = answer.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "script-src" not in policy
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["Referrer-Policy"] == "no-referrer"
    assert answer.headers["Strict-Transport-Security"] == "max-age=31536000"


def test_no_hsts_when_the_callback_is_plain_http(make_client, conn):
    answer = make_client(eve_callback_url="http://127.0.0.1:8000/callback").get("/health")
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert "Strict-Transport-Security" not in answer.headers


@pytest.mark.parametrize(("error", "shown"), [
    ("Account flagged. Re-verify at evil.example now", "it refused the login"),
    ("<b>access_denied</b>", "it refused the login"),
    ("access_denied", "you declined"),
    ("temporarily_unavailable", "it is unavailable for now (temporarily_unavailable)"),
])
def test_the_callback_shows_a_fixed_message_for_sso_errors(app_url, conn, error, shown):
    answer = requests.get(f"{app_url}/callback", params={"error": error, "state": "s"}, timeout=10)
    assert answer.status_code == 400
    assert f"EVE SSO did not log you in: {shown}. Nothing was stored" in answer.text
    assert "evil" not in answer.text and "&lt;b&gt;" not in answer.text


def this_machines_address() -> str:
    """An address of this machine other than loopback (the one a route to the outside leaves from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: UDP's connect only picks the route
        return probe.getsockname()[0]


@pytest.mark.parametrize("by_proxy", [False, True])
def test_without_a_password_the_operators_pages_answer_only_on_loopback(database_url, conn, by_proxy):
    address = this_machines_address()
    assert address != "127.0.0.1"
    env = status_env(database_url, queue=f"test_web_{uuid.uuid4().hex[:10]}",
                     **({"STATUS_AUTH_BY_PROXY": "1"} if by_proxy else {}))
    with serve(env, host="0.0.0.0") as local:
        outside = local.replace("127.0.0.1", address)
        for path in ("/status", "/metrics", "/pilots/42/forget"):
            for base, headers, served in ((local, {}, True), (outside, {}, by_proxy),
                                          (local, {"X-Forwarded-For": "203.0.113.9"}, by_proxy)):
                answer = requests.get(base + path, headers=headers, timeout=10)
                assert (answer.status_code != 403) is served, (base, path, headers, answer.text)
                if not served:
                    assert "STATUS_BASIC_AUTH" in answer.text
        assert requests.get(outside + "/health", timeout=10).status_code == 200  # load balancers probe it


def test_logins_under_way_are_bounded_per_client_and_in_all(app_url, conn):
    login = lambda: requests.get(f"{app_url}/login", allow_redirects=False, timeout=10)  # noqa: E731
    assert [login().status_code for _ in range(LOGINS_PER_CLIENT + 2)] == [302] * LOGINS_PER_CLIENT + [429] * 2
    count = lambda: conn.execute("SELECT count(*) AS n FROM login_states").fetchone()["n"]  # noqa: E731
    assert count() == LOGINS_PER_CLIENT
    conn.execute("DELETE FROM login_states")
    conn.execute("INSERT INTO login_states (state_sha256, code_verifier, scopes, client) "
                 "SELECT 'state-' || i, 'verifier', 'scopes', 'client-' || i FROM generate_series(1, %s) i",
                 (LOGINS_UNDER_WAY,))
    conn.commit()
    try:
        refused = login()
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "600"
        assert count() == LOGINS_UNDER_WAY
    finally:  # tests of the login without the emptied database come next
        conn.execute("DELETE FROM login_states")
        conn.commit()
    indexed = {r["indexdef"].partition(" USING btree ")[2] for r in conn.execute(
        "SELECT indexdef FROM pg_indexes WHERE tablename = 'login_states'")}
    assert "(created_at)" in indexed and "(client, created_at)" in indexed
    conn.rollback()


@pytest.fixture
def status_role(database_url, conn):
    """A role of this run's own, made as deploy/postgresql/status-role.sql says, and the status app's URL for it."""
    role = f"killmail_status_{uuid.uuid4().hex[:8]}"
    grants = (ROOT / "deploy/postgresql/status-role.sql").read_text().replace("killmail_status", role)
    conn.execute(f'CREATE ROLE "{role}" LOGIN')
    conn.execute(grants)
    conn.commit()
    scheme, _, rest = database_url.partition("://")
    yield role, f"{scheme}://{role}:{rest.partition(':')[2]}"
    conn.rollback()
    conn.execute(f'DROP OWNED BY "{role}"')
    conn.execute(f'DROP SCHEMA "{role}" CASCADE')
    conn.execute(f'DROP ROLE "{role}"')
    conn.commit()


def test_the_status_role_shows_every_page_but_reads_and_writes_no_token(make_client, conn, status_role):
    role, url = status_role
    seed_status_rows(conn, datetime.now(UTC))
    client = make_client(database_url=url)
    report = client.get("/status", headers={"Accept": "application/json"})
    assert report.status_code == 200 and report.get_json()["users"] == EXPECTED_USERS
    assert client.get("/metrics").status_code == 200 and client.get("/health?deep=1").status_code == 200
    with db.connect(url) as reader:
        assert {r["refresh_token"] for r in reader.execute("SELECT refresh_token FROM users")} <= {"live", None}
        for statement in ("SELECT refresh_token FROM public.users", "SELECT access_token FROM public.users",
                          "UPDATE public.users SET queued_at = now()", "DELETE FROM killmails"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                reader.execute(statement)
            reader.rollback()

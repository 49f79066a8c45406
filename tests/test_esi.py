"""esi.py against HTTP answers faked with `responses`: headers, paging, caching, status mapping, retries, SSO."""
from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import random
import socket
import threading
import time
import types
from collections import Counter
from datetime import UTC, datetime
from urllib.parse import parse_qs

import pytest
import requests
import responses
from hypothesis import event, given, settings
from hypothesis import strategies as st
from responses import matchers

import backoff
import db
import esi
from esi import (
    BadRequest,
    ErrorLimited,
    EsiClient,
    Forbidden,
    InvalidClient,
    InvalidGrant,
    InvalidHash,
    KillmailList,
    MalformedResponse,
    NotFound,
    NotModified,
    Paused,
    RateLimited,
    ServerError,
    SsoError,
    TokenGrant,
    Unauthorized,
)
from settings import Settings
from strategies import INT64, PROPERTY, json_value, mutate, nested

SETTINGS = Settings(esi_base_url="https://esi.example", sso_token_url="https://sso.example/v2/oauth/token",
                    eve_client_id="id", eve_client_secret="secret", esi_user_agent="test/1.0 (t@example.org)")
TOKEN = "access-token-SECRET-1"
REFRESH = "refresh+token/SECRET=2"   # characters that must be form-encoded
LIST_URL = "https://esi.example/characters/42/killmails/recent/"
CORP_LIST_URL = "https://esi.example/corporations/77/killmails/recent/"
DETAIL_URL = "https://esi.example/killmails/1001/abc123/"
CHARACTER_URL = "https://esi.example/characters/42/"
SSO_URL = SETTINGS.sso_token_url
DATE = "Sun, 29 Nov 2026 04:00:00 GMT"
EXPIRES = "Sun, 29 Nov 2026 04:02:00 GMT"   # two minutes after DATE
KILLMAIL = {"killmail_id": 1001, "killmail_time": "2026-03-25T14:26:36Z", "solar_system_id": 30000743,
            "victim": {"damage_taken": 1, "ship_type_id": 2}, "attackers": []}
GRANT = {"access_token": "new-access-SECRET-3", "expires_in": 1199, "token_type": "Bearer",
         "refresh_token": "new-refresh-SECRET-4"}


class RecordingLimits:
    """A Limits that remembers every take() and settle() call; a ticket is the bucket's name."""

    def __init__(self):
        self.events: list[tuple] = []

    def take(self, bucket):
        self.events.append(("take", bucket))
        return bucket

    def settle(self, ticket, status, headers):
        self.events.append(("settle", ticket, status, dict(headers)))

    def pause(self, bucket, seconds, *, status):
        self.events.append(("pause", bucket, seconds, status))


@pytest.fixture
def http():
    """Every HTTP call of the test answered by `responses`; an unregistered call fails the test."""
    with responses.RequestsMock() as mock:
        yield mock


@pytest.fixture
def sleeps():
    return []


@pytest.fixture
def client(sleeps):
    return EsiClient(SETTINGS, sleep=sleeps.append, rng=random.Random(1))


def refs(*ids):
    return [{"killmail_id": i, "killmail_hash": h(i)} for i in ids]


def h(killmail_id):
    """A killmail hash as ESI gives them: 40 hexadecimal characters."""
    return f"{killmail_id:040x}"


def add_page(http, page, body, url=LIST_URL, **headers):
    http.add(responses.GET, url, json=body, headers=headers,
             match=[matchers.query_param_matcher({"page": str(page)})])


# ------------------------------------------------------------------------------------------------ headers

def test_every_call_sends_user_agent_and_esi_calls_send_compatibility_date(http, client):
    add_page(http, 1, refs(1))
    http.add(responses.GET, DETAIL_URL, json=KILLMAIL)
    http.add(responses.GET, CHARACTER_URL, json={"name": "Pilot", "corporation_id": 77})
    http.add(responses.POST, SSO_URL, json=GRANT)

    client.list_recent(character_id=42, token=TOKEN)
    client.get_killmail(1001, "abc123")
    client.get_character(42)
    client.refresh(REFRESH)

    assert len(http.calls) == 4
    for call in http.calls:
        assert call.request.headers["User-Agent"] == SETTINGS.esi_user_agent
    for call in http.calls[:3]:
        assert call.request.headers["X-Compatibility-Date"] == SETTINGS.esi_compatibility_date


def test_the_session_takes_proxies_and_ca_bundle_from_settings_not_from_the_environment(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://ignored:1")
    settings = Settings(esi_user_agent="ua", http_proxies=(("https://esi.example", "http://proxy:3128"),),
                        ca_bundle="/etc/ssl/corp.pem")
    session = esi.new_session(settings)
    assert session.trust_env is False
    assert session.proxies == {"https://esi.example": "http://proxy:3128"}
    assert session.verify == "/etc/ssl/corp.pem"
    assert esi.new_session(Settings(esi_user_agent="ua")).verify is True


def test_every_call_goes_through_the_sessions_proxies_ca_bundle_and_timeout(http, sleeps):
    settings = dataclasses.replace(SETTINGS, http_proxies=(("https://esi.example", "http://proxy:3128"),),
                                   ca_bundle="/etc/ssl/corp.pem")
    client = EsiClient(settings, sleep=sleeps.append)
    add_page(http, 1, refs(1))
    http.add(responses.GET, DETAIL_URL, json=KILLMAIL)
    http.add(responses.POST, SSO_URL, json=GRANT)
    client.list_recent(character_id=42, token=TOKEN)
    client.get_killmail(1001, "abc123")
    client.refresh(REFRESH)
    assert len(http.calls) == 3
    for call in http.calls:
        sent = call.request.req_kwargs
        assert sent["proxies"] == {"https://esi.example": "http://proxy:3128"}
        assert sent["verify"] == "/etc/ssl/corp.pem"
        assert sent["timeout"] == settings.http_timeout_seconds


def test_every_answer_gives_its_connection_back_to_the_pool(sim):
    """304s and error answers carry nothing the client reads, but their connection must still be reused: over
    TLS each new one costs a handshake."""
    from helpers import make_settings
    sim.add_pilots(n_pilots=1, n_killmails=3, share=1, expired_fraction=0.0, revoked=0, corporations=1)
    pilot = sim.pilots()[0]
    client = EsiClient(make_settings("postgresql://unused/unused", sim.base_url))
    listing = client.list_recent(character_id=pilot["character_id"], token=pilot["access_token"])
    for _ in range(3):
        with pytest.raises(NotModified):
            client.list_recent(character_id=pilot["character_id"], token=pilot["access_token"], etag=listing.etag)
    with pytest.raises(InvalidHash):
        client.get_killmail(listing.refs[0][0], "0" * 40)
    pools = client.session.get_adapter(sim.base_url).poolmanager.pools
    assert [(pools[key].num_connections, pools[key].num_requests) for key in pools.keys()] == [(1, 5)]


def test_a_killmail_hash_is_quoted_into_its_path(http, client):
    http.add(responses.GET, "https://esi.example/killmails/1001/a%2Fb%3Fc%20d/", json=KILLMAIL)
    client.get_killmail(1001, "a/b?c d")
    assert http.calls[0].request.url == "https://esi.example/killmails/1001/a%2Fb%3Fc%20d/"


def test_list_page_numbers_go_in_the_query(http, client):
    add_page(http, 1, refs(1), **{"X-Pages": "2"})
    add_page(http, 2, refs(2))
    client.list_recent(character_id=42, token=TOKEN)
    assert [call.request.url for call in http.calls] == [f"{LIST_URL}?page=1", f"{LIST_URL}?page=2"]


def test_list_sends_bearer_token_and_public_routes_do_not(http, client):
    add_page(http, 1, refs(1))
    http.add(responses.GET, DETAIL_URL, json=KILLMAIL)
    client.list_recent(character_id=42, token=TOKEN)
    client.get_killmail(1001, "abc123")
    assert http.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert "Authorization" not in http.calls[1].request.headers


# ------------------------------------------------------------------------------------------------ paging

def test_paging_follows_x_pages_and_collects_every_ref(http, client):
    add_page(http, 1, refs(1, 2), **{"X-Pages": "3", "ETag": '"etag-1"', "Last-Modified": DATE})
    add_page(http, 2, refs(3, 4), **{"X-Pages": "3", "Last-Modified": DATE})
    add_page(http, 3, refs(5), **{"X-Pages": "3", "Last-Modified": DATE})

    result = client.list_recent(character_id=42, token=TOKEN)

    assert result.refs == [(1, h(1)), (2, h(2)), (3, h(3)), (4, h(4)), (5, h(5))]
    assert result.pages == 3
    assert result.etag == '"etag-1"'
    assert [c.request.url.split("page=")[1] for c in http.calls] == ["1", "2", "3"]


def test_corporation_list_uses_the_corporation_route(http, client):
    add_page(http, 1, refs(9), url=CORP_LIST_URL)
    result = client.list_recent(character_id=42, token=TOKEN, corporation_id=77)
    assert result.refs == [(9, h(9))]


def test_a_ref_listed_on_two_pages_is_kept_once(http, client):
    add_page(http, 1, refs(1, 2), **{"X-Pages": "2"})
    add_page(http, 2, refs(2, 3), **{"X-Pages": "2"})
    assert client.list_recent(character_id=42, token=TOKEN).refs == [(1, h(1)), (2, h(2)), (3, h(3))]


@pytest.mark.parametrize("x_pages", ["abc", "0", "-1", "", "1.5", None])
def test_unusable_x_pages_means_one_page(http, client, x_pages):
    headers = {} if x_pages is None else {"X-Pages": x_pages}
    add_page(http, 1, refs(1), **headers)
    result = client.list_recent(character_id=42, token=TOKEN)
    assert result.pages == 1
    assert result.refs == [(1, h(1))]
    assert len(http.calls) == 1


@pytest.mark.parametrize("value, pages", [
    (None, 1), ("1", 1), ("3", 3), (" 7 ", 7), ("0", 1), ("-1", 1), ("junk", 1), ("", 1),
    (str(esi.MAX_PAGES), esi.MAX_PAGES), ("100000", esi.MAX_PAGES),
])
def test_parse_pages(value, pages):
    assert esi.parse_pages(value) == pages


# ------------------------------------------------------------------------------------------------ caching

def test_etag_is_sent_and_304_is_not_modified_with_cache_lifetime(http, client):
    http.add(responses.GET, LIST_URL, status=304, headers={"Date": DATE, "Expires": EXPIRES})
    with pytest.raises(NotModified) as caught:
        client.list_recent(character_id=42, token=TOKEN, etag='"etag-1"')
    assert http.calls[0].request.headers["If-None-Match"] == '"etag-1"'
    assert caught.value.expires_in == 120
    assert caught.value.status == 304


def test_no_if_none_match_without_an_etag(http, client):
    add_page(http, 1, refs(1), Date=DATE, Expires=EXPIRES)
    result = client.list_recent(character_id=42, token=TOKEN)
    assert "If-None-Match" not in http.calls[0].request.headers
    assert result.expires_in == 120


def test_list_lifetime_is_the_shortest_of_its_pages(http, client):
    add_page(http, 1, refs(1), **{"X-Pages": "2", "Date": DATE, "Expires": EXPIRES})
    add_page(http, 2, refs(2), **{"X-Pages": "2", "Date": DATE, "Expires": "Sun, 29 Nov 2026 04:00:30 GMT"})
    assert client.list_recent(character_id=42, token=TOKEN).expires_in == 30


@pytest.mark.parametrize("headers, lifetime", [
    ({"Date": DATE, "Expires": EXPIRES}, 120.0),
    ({"Date": EXPIRES, "Expires": DATE}, 0.0),        # already expired: never negative
    ({"Date": DATE}, None),
    ({"Date": DATE, "Expires": "not a date"}, None),
    ({}, None),
])
def test_cache_lifetime(headers, lifetime):
    assert esi.cache_lifetime(headers) == lifetime


@pytest.mark.parametrize("value, ok", [
    (DATE, True), ("Sun, 29 Nov 2026 04:00:00", True), ("", False), (None, False), ("garbage", False),
])
def test_parse_http_date(value, ok):
    parsed = esi.parse_http_date(value)
    assert (parsed is not None) == ok
    if ok:
        assert parsed.tzinfo is not None


def test_last_modified_change_between_pages_restarts_the_walk(http, client):
    old, new = DATE, EXPIRES
    add_page(http, 1, refs(1, 2), **{"X-Pages": "2", "Last-Modified": old, "ETag": '"old"'})
    add_page(http, 2, refs(3), **{"X-Pages": "2", "Last-Modified": new})          # cache turned over
    add_page(http, 1, refs(7, 1), **{"X-Pages": "2", "Last-Modified": new, "ETag": '"new"'})
    add_page(http, 2, refs(2, 3), **{"X-Pages": "2", "Last-Modified": new})

    result = client.list_recent(character_id=42, token=TOKEN, etag='"older"')

    assert len(http.calls) == 4
    assert result.refs == [(7, h(7)), (1, h(1)), (2, h(2)), (3, h(3))]
    assert result.etag == '"new"'
    assert http.calls[0].request.headers["If-None-Match"] == '"older"'
    # The second walk must not send the ETag: a 304 would answer for a list we never finished reading.
    assert "If-None-Match" not in http.calls[2].request.headers


def test_a_page_gone_mid_walk_restarts_the_walk(http, client):
    """The list shrank between page 1 and page 2 (old kills age out): ESI answers 404 for the page."""
    add_page(http, 1, refs(1, 2), **{"X-Pages": "2", "Last-Modified": DATE, "ETag": '"old"'})
    http.add(responses.GET, LIST_URL, status=404, json={"error": "Requested page does not exist!"},
             match=[matchers.query_param_matcher({"page": "2"})])
    add_page(http, 1, refs(1, 2), **{"X-Pages": "1", "Last-Modified": EXPIRES, "ETag": '"new"'})

    result = client.list_recent(character_id=42, token=TOKEN)

    assert [c.request.url.rsplit("=", 1)[1] for c in http.calls] == ["1", "2", "1"]
    assert result.refs == [(1, h(1)), (2, h(2))] and result.etag == '"new"'


def test_a_list_that_keeps_changing_gives_up_with_server_error(http, client):
    for _ in range(esi.MAX_WALK_RESTARTS):
        add_page(http, 1, refs(1), **{"X-Pages": "2", "Last-Modified": DATE})
        add_page(http, 2, refs(2), **{"X-Pages": "2", "Last-Modified": EXPIRES})
    with pytest.raises(ServerError, match="kept changing"):
        client.list_recent(character_id=42, token=TOKEN)
    assert len(http.calls) == 2 * esi.MAX_WALK_RESTARTS


# ------------------------------------------------------------------------------------------------ list entries

def test_invalid_list_entries_are_dropped(http, client):
    body = [
        {"killmail_id": 0, "killmail_hash": "zero"},      # the spec's own example
        {"killmail_id": 5},                                # no hash
        {"killmail_id": 6, "killmail_hash": ""},
        {"killmail_id": -1, "killmail_hash": "neg"},
        {"killmail_id": True, "killmail_hash": "bool"},
        {"killmail_id": "8", "killmail_hash": "str"},
        {"killmail_hash": "no id"},
        "junk", None, 17,
        {"killmail_id": 2 ** 63, "killmail_hash": h(10)},  # beyond int64
        {"killmail_id": 11, "killmail_hash": "h11"},       # not 40 hexadecimal characters
        {"killmail_id": 12, "killmail_hash": h(12) + "0"},
        {"killmail_id": 9, "killmail_hash": h(9)},
    ]
    add_page(http, 1, body)
    assert client.list_recent(character_id=42, token=TOKEN).refs == [(9, h(9))]


@pytest.mark.parametrize("body, expected", [
    ([], []),
    ([{"killmail_id": 1, "killmail_hash": h(1)}], [(1, h(1))]),
    ([{"killmail_id": 1, "killmail_hash": "A" * 40}], [(1, "A" * 40)]),
    ([{"killmail_id": 1, "killmail_hash": "a"}], []),
    ([{"killmail_id": 1, "killmail_hash": "g" * 40}], []),
    ([{"killmail_id": 1, "killmail_hash": "a/../" + "a" * 35}], []),
    ([{"killmail_id": 2 ** 63 - 1, "killmail_hash": h(1)}], [(2 ** 63 - 1, h(1))]),
    ([{"killmail_id": 2 ** 63, "killmail_hash": h(1)}], []),
    ([{"killmail_id": 10 ** 400, "killmail_hash": h(1)}], []),
    ([{"killmail_id": 0, "killmail_hash": "a"}], []),
    ([{"killmail_id": 1}], []),
    ([{"killmail_id": 1, "killmail_hash": None}], []),
    ([{"killmail_id": 1.0, "killmail_hash": "a"}], []),
    ([{"killmail_id": False, "killmail_hash": "a"}], []),
    ([["1", "a"]], []),
    ([{"killmail_id": 2 ** 40, "killmail_hash": h(2)}], [(2 ** 40, h(2))]),   # int64 ids
])
def test_parse_refs(body, expected):
    assert esi.parse_refs(body) == expected


def test_a_skipped_list_entry_is_logged_with_the_list_it_came_from(caplog):
    body = [{"killmail_id": 1, "killmail_hash": "short"}, {"killmail_id": 2, "killmail_hash": h(2)}]
    assert esi.parse_refs(body, where="/characters/42/killmails/recent/ page 3") == [(2, h(2))]
    assert "/characters/42/killmails/recent/ page 3" in caplog.text and "short" in caplog.text


def test_a_deeply_nested_list_entry_is_skipped_and_logged_cut_short(caplog):
    body = [nested(5000), {"killmail_id": 2, "killmail_hash": h(2)}]
    assert esi.parse_refs(body, where="page 1") == [(2, h(2))]
    assert "page 1: skipping an entry" in caplog.text and len(caplog.text) < 500


@pytest.mark.parametrize("body", [{}, {"killmail_id": 1}, "text", None, 3])
def test_parse_refs_rejects_a_body_that_is_not_a_list(body):
    with pytest.raises(MalformedResponse):
        esi.parse_refs(body)


# A list page as ESI sends it, its entries mutated, or anything at all; as bytes on the wire.
ref_entry = st.fixed_dictionaries({"killmail_id": st.integers(1, INT64 - 1),
                                   "killmail_hash": st.text("0123456789abcdefABCDEF", min_size=40, max_size=40)})
list_page = st.lists(st.one_of(ref_entry, ref_entry, json_value), max_size=8)
x_pages = st.one_of(st.none(), st.sampled_from(["1", "2", "3", "0", "-1", "101", "1e3", "", " 2 ", "٣"]),
                    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=6))


def is_ref(entry) -> bool:
    """What a killmail reference is, said once more by the test: a positive int64 id, a 40-hex hash."""
    return (isinstance(entry, dict) and type(entry.get("killmail_id")) is int
            and 0 < entry["killmail_id"] < INT64 and isinstance(entry.get("killmail_hash"), str)
            and len(entry["killmail_hash"]) == 40
            and all(c in "0123456789abcdefABCDEF" for c in entry["killmail_hash"]))


def depth(value) -> int:
    """How deep a JSON value nests."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        value, level = todo.pop()
        deepest = max(deepest, level)
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        todo.extend((child, level + 1) for child in children)
    return deepest


def walk_list(content: bytes, x_pages_value: str | None):
    """list_recent over one HTTP answer given to every page: its KillmailList, or the EsiError it raised."""
    client = EsiClient(SETTINGS, sleep=lambda seconds: None, rng=random.Random(1))
    with responses.RequestsMock() as mock:
        headers = {} if x_pages_value is None else {"X-Pages": x_pages_value}
        mock.add(responses.GET, LIST_URL, body=content, headers=headers, content_type="application/json")
        try:
            return client.list_recent(character_id=42, token=TOKEN)
        except esi.EsiError as exc:
            return exc


@settings(PROPERTY, max_examples=400)
@given(st.data())
def test_any_list_answer_gives_its_valid_references_or_malformed_response(data):
    """Bytes that are JSON text of a list page (its entries mutated), of any JSON value, or no JSON at all:
    list_recent keeps exactly the entries that are references, once each, or raises MalformedResponse."""
    kind = data.draw(st.sampled_from(["page", "json", "bytes"]), label="kind")
    if kind == "bytes":
        content = data.draw(st.binary(max_size=200), label="content")
    else:
        body = data.draw(list_page if kind == "page" else json_value, label="body")
        if kind == "page" and body and data.draw(st.booleans(), label="mutated"):
            body = mutate(data, body)
        try:
            text = json.dumps(body, ensure_ascii=data.draw(st.booleans(), label="ensure_ascii"))
        except (ValueError, RecursionError):  # no JSON text is this value
            return
        try:
            content = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate goes over the wire escaped
            content = json.dumps(body).encode("ascii")
    got = walk_list(content, data.draw(x_pages, label="x_pages"))
    event(type(got).__name__)
    try:
        page = json.loads(content) if kind != "bytes" else None
    except RecursionError:  # deeper than the decoder goes: malformed, as esi.py says
        page = None
    if isinstance(got, esi.EsiError):
        assert isinstance(got, MalformedResponse), got
        # How deep the decoder goes depends on the stack it runs on: a page nested some hundreds of levels is
        # malformed in esi.py's calls before it is in this test's.
        assert not isinstance(page, list) or depth(page) > 100
        return
    assert all(0 < i < INT64 and len(h) == 40 for i, h in got.refs)
    assert 1 <= got.pages <= esi.MAX_PAGES
    if page is not None:
        expected = [(e["killmail_id"], e["killmail_hash"]) for e in page if is_ref(e)]
        assert got.refs == list(dict.fromkeys(expected))


# ------------------------------------------------------------------------------------------------ statuses

@pytest.mark.parametrize("status, error", [
    (400, BadRequest), (401, Unauthorized), (403, Forbidden), (404, NotFound), (405, BadRequest),
    (409, BadRequest), (422, InvalidHash),
])
def test_4xx_maps_to_its_class_and_is_not_retried(http, client, sleeps, status, error):
    http.add(responses.GET, DETAIL_URL, status=status, json={"error": "nope"})
    with pytest.raises(error) as caught:
        client.get_killmail(1001, "abc123")
    assert type(caught.value) is error
    assert caught.value.status == status
    assert len(http.calls) == 1
    assert sleeps == []


def test_an_error_answer_nested_deeper_than_the_decoder_goes_is_still_its_status_class(http, client):
    http.add(responses.GET, LIST_URL, status=403, body="[" * 5000 + "]" * 5000)
    with pytest.raises(Forbidden, match="403"):
        client.list_recent(character_id=42, token=TOKEN)


def test_403_on_a_corporation_list_is_forbidden(http, client):
    http.add(responses.GET, CORP_LIST_URL, status=403, json={"error": "Character does not have required role(s)"})
    with pytest.raises(Forbidden):
        client.list_recent(character_id=42, token=TOKEN, corporation_id=77)


@pytest.mark.parametrize("headers, reset", [
    ({"X-ESI-Error-Limit-Reset": "37", "X-ESI-Error-Limit-Remain": "0"}, 37.0),
    ({}, 60.0),                                       # no header: a full window
    ({"X-ESI-Error-Limit-Reset": "soon"}, 60.0),
])
def test_420_is_error_limited_with_the_reset(http, client, headers, reset):
    http.add(responses.GET, DETAIL_URL, status=420, json={"error": "error limited"}, headers=headers)
    with pytest.raises(ErrorLimited) as caught:
        client.get_killmail(1001, "abc123")
    assert caught.value.reset == reset
    assert caught.value.status == 420
    assert len(http.calls) == 1


@pytest.mark.parametrize("headers, group, retry_after", [
    ({"Retry-After": "12", "X-Ratelimit-Group": "killmail"}, "killmail", 12.0),
    ({"Retry-After": "3"}, "killmail", 3.0),           # no group header: the route's own group
    ({}, "killmail", 60.0),
])
def test_429_is_rate_limited_with_group_and_retry_after(http, client, headers, group, retry_after):
    http.add(responses.GET, DETAIL_URL, status=429, json={"error": "too many requests"}, headers=headers)
    with pytest.raises(RateLimited) as caught:
        client.get_killmail(1001, "abc123")
    assert caught.value.group == group
    assert caught.value.retry_after == retry_after
    assert len(http.calls) == 1


@pytest.mark.parametrize("value, seconds", [
    ("99999999999", backoff.MAX_PAUSE), ("1e300", backoff.MAX_PAUSE), ("inf", 60.0), ("nan", 60.0), ("-Infinity", 60.0),
    ("soon", 60.0), ("901", backoff.MAX_PAUSE), ("899", 899.0),
])
def test_a_pause_from_esis_headers_is_at_most_max_pause_and_junk_is_logged(http, client, caplog, value, seconds):
    http.add(responses.GET, DETAIL_URL, status=429, headers={"Retry-After": value})
    http.add(responses.GET, DETAIL_URL, status=420, headers={"X-ESI-Error-Limit-Reset": value})
    with pytest.raises(RateLimited) as limited:
        client.get_killmail(1001, "abc123")
    with pytest.raises(ErrorLimited) as errors:
        client.get_killmail(1001, "abc123")
    assert limited.value.retry_after == errors.value.reset == seconds
    assert backoff.MAX_PAUSE == 900
    if seconds == 60.0:
        assert "Retry-After" in caplog.text and "X-ESI-Error-Limit-Reset" in caplog.text


def test_429_on_a_list_names_the_list_group(http, client):
    http.add(responses.GET, LIST_URL, status=429, headers={"Retry-After": "900"})
    with pytest.raises(RateLimited) as caught:
        client.list_recent(character_id=42, token=TOKEN)
    assert (caught.value.group, caught.value.retry_after) == ("char-killmail", 900.0)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_retried_then_server_error(http, client, sleeps, status):
    http.add(responses.GET, DETAIL_URL, status=status, json={"error": "down"})
    with pytest.raises(ServerError) as caught:
        client.get_killmail(1001, "abc123")
    assert caught.value.status == status
    assert len(http.calls) == esi.SERVER_RETRIES
    assert len(sleeps) == esi.SERVER_RETRIES - 1      # no sleep after the last attempt


def test_a_killmail_comes_with_its_json_text_as_sent(http, client):
    text = '{"killmail_id": 1001,  "killmail_time": "2026-01-01T00:00:00Z", "name": "\u00c9ve \u2013 \u00e9"}'
    http.add(responses.GET, DETAIL_URL, body=text.encode(), content_type="application/json")
    body, raw = client.get_killmail(1001, "abc123")
    assert raw == text and body["name"] == "\u00c9ve \u2013 \u00e9"


@pytest.mark.parametrize("body", [
    '{"killmail_id": 1001, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",   # deeper than json can recurse
    '{"killmail_id": 1001, "x": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}",
])
def test_a_killmail_nested_too_deep_is_malformed(http, client, body):
    http.add(responses.GET, DETAIL_URL, body=body)
    with pytest.raises(MalformedResponse):
        client.get_killmail(1001, "abc123")


def test_a_killmail_that_is_not_utf8_is_malformed(http, client):
    http.add(responses.GET, DETAIL_URL, body='{"name": "\u00e9"}'.encode("latin-1"), content_type="application/json")
    with pytest.raises(MalformedResponse):
        client.get_killmail(1001, "abc123")


def test_5xx_then_200_succeeds(http, client, sleeps):
    http.add(responses.GET, DETAIL_URL, status=502)
    http.add(responses.GET, DETAIL_URL, json=KILLMAIL)
    assert client.get_killmail(1001, "abc123")[0] == KILLMAIL
    assert len(http.calls) == 2
    assert len(sleeps) == 1


@pytest.mark.parametrize("exc", [requests.Timeout("read timed out"), requests.ConnectionError("reset by peer")])
def test_timeouts_and_broken_connections_are_retried_then_server_error(http, client, sleeps, exc):
    http.add(responses.GET, DETAIL_URL, body=exc)
    with pytest.raises(ServerError) as caught:
        client.get_killmail(1001, "abc123")
    assert isinstance(caught.value.__cause__, type(exc))
    assert len(http.calls) == esi.SERVER_RETRIES
    assert len(sleeps) == esi.SERVER_RETRIES - 1


def test_a_body_cut_off_mid_read_is_retried_then_server_error(sleeps):
    """The answer's head arrives, then the connection breaks inside the body (Content-Length not reached)."""
    import socketserver
    import threading

    class CutOff(socketserver.StreamRequestHandler):
        def handle(self):
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
            self.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"killmail_id": 10')

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), CutOff) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        settings = dataclasses.replace(SETTINGS, esi_base_url=f"http://127.0.0.1:{server.server_address[1]}")
        client = EsiClient(settings, sleep=sleeps.append)
        try:
            with pytest.raises(ServerError) as caught:
                client.get_killmail(1001, "abc123")
        finally:
            server.shutdown()
    assert isinstance(caught.value.__cause__, requests.exceptions.ChunkedEncodingError)
    assert client.take_calls() == Counter({("killmail", 0): esi.SERVER_RETRIES})


def test_a_redirect_is_not_followed_and_says_where_it_points(http, client):
    moved = "https://esi.example/latest/killmails/1001/abc123/"
    http.add(responses.GET, DETAIL_URL, status=301, headers={"Location": moved})
    http.add(responses.POST, SSO_URL, status=302, headers={"Location": "https://sso.example/v3/oauth/token"})
    with pytest.raises(BadRequest, match=f"redirected to {moved}; set ESI_BASE_URL"):
        client.get_killmail(1001, "abc123")
    with pytest.raises(SsoError, match="redirected to https://sso.example/v3/oauth/token; set SSO_TOKEN_URL"):
        client.refresh(REFRESH)
    assert len(http.calls) == 2


def test_a_timeout_then_200_succeeds(http, client):
    http.add(responses.GET, DETAIL_URL, body=requests.Timeout("slow"))
    http.add(responses.GET, DETAIL_URL, json=KILLMAIL)
    assert client.get_killmail(1001, "abc123")[0] == KILLMAIL


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 10])
def test_backoff_stays_within_full_jitter_bounds(attempt):
    rng = random.Random(attempt)
    for _ in range(200):
        delay = esi.backoff_seconds(attempt, base=0.5, cap=8.0, rng=rng)
        assert 0 <= delay <= min(8.0, 0.5 * 2 ** (attempt - 1))


@pytest.mark.parametrize("url, body, method", [
    (DETAIL_URL, "<html>bad gateway</html>", "get_killmail"),
    (DETAIL_URL, "[1, 2]", "get_killmail"),           # JSON, but not an object
    (CHARACTER_URL, "not json", "get_character"),
    (CHARACTER_URL, '"a string"', "get_character"),
])
def test_a_body_that_is_not_the_expected_json_is_malformed(http, client, url, body, method):
    http.add(responses.GET, url, body=body, status=200)
    with pytest.raises(MalformedResponse):
        if method == "get_killmail":
            client.get_killmail(1001, "abc123")
        else:
            client.get_character(42)


@pytest.mark.parametrize("body", ["<html></html>", '{"killmail_id": 1}'])
def test_a_list_page_that_is_not_a_json_list_is_malformed(http, client, body):
    http.add(responses.GET, LIST_URL, body=body)
    with pytest.raises(MalformedResponse):
        client.list_recent(character_id=42, token=TOKEN)


# ------------------------------------------------------------------------------------------------ SSO

def test_refresh_sends_basic_auth_and_form_and_returns_the_rotated_token(http, client):
    http.add(responses.POST, SSO_URL, json=GRANT)

    grant = client.refresh(REFRESH)

    request = http.calls[0].request
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"id:secret").decode()
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qs(request.body) == {"grant_type": ["refresh_token"], "refresh_token": [REFRESH]}
    assert grant == TokenGrant(GRANT["access_token"], GRANT["refresh_token"], 1199)
    assert grant.refresh_token != REFRESH


@pytest.mark.parametrize("status, body, error", [
    (400, {"error": "invalid_grant", "error_description": "Invalid refresh token. Token missing/expired."},
     InvalidGrant),
    (400, {"error": "invalid_grant"}, InvalidGrant),
    (401, {"error": "invalid_client", "error_description": "Client authentication failed"}, InvalidClient),
    (400, {"error": "invalid_client"}, InvalidClient),
    (401, None, InvalidClient),
    (400, {"error": "invalid_request"}, SsoError),
    (200, {"access_token": "only half"}, SsoError),
    (200, None, SsoError),
])
def test_refresh_failures(http, client, status, body, error):
    if body is None:
        http.add(responses.POST, SSO_URL, status=status, body="not json")
    else:
        http.add(responses.POST, SSO_URL, status=status, json=body)
    with pytest.raises(error) as caught:
        client.refresh(REFRESH)
    assert type(caught.value) is error
    assert len(http.calls) == 1


@pytest.mark.parametrize("body", [
    {"error": "invalid_grant", "error_description": "Token expired.\nFAKE LOG LINE " + "x" * 100_000},
    {"error": "invalid_grant", "error_description": {"nested": ["x" * 100_000] * 50}},
    {"error": "made_up\n" + "y" * 100_000},
])
def test_sso_error_text_is_one_bounded_line(http, client, body):
    http.add(responses.POST, SSO_URL, status=400, json=body)
    with pytest.raises(SsoError) as caught:
        client.refresh(REFRESH)
    assert len(str(caught.value)) <= 250 and "\n" not in str(caught.value)


@pytest.mark.parametrize("expires_in", [float("inf"), float("nan"), 10 ** 12, 0, -5, "soon", None, True, [1199]])
def test_an_sso_answer_with_an_unusable_expires_in_is_an_sso_error(http, client, expires_in):
    http.add(responses.POST, SSO_URL, body=json.dumps({**GRANT, "expires_in": expires_in}))
    with pytest.raises(SsoError) as caught:
        client.refresh(REFRESH)
    assert type(caught.value) is SsoError  # never invalid_grant: the pilot's grant is not written off


@pytest.mark.parametrize("body", [
    {k: v for k, v in GRANT.items() if k != "refresh_token"},
    {**GRANT, "refresh_token": None},
])
def test_an_sso_answer_without_a_refresh_token_keeps_the_old_one(http, client, body):
    http.add(responses.POST, SSO_URL, json=body)
    assert client.refresh(REFRESH) == TokenGrant(GRANT["access_token"], REFRESH, 1199)


@pytest.mark.parametrize("body", [
    {**GRANT, "refresh_token": 5}, {**GRANT, "refresh_token": ""}, {**GRANT, "refresh_token": ["r"]},
    {**GRANT, "access_token": None}, {**GRANT, "access_token": ""}, {**GRANT, "access_token": 7},
    [GRANT], "a string",
])
def test_an_sso_answer_of_the_wrong_shape_is_an_sso_error(http, client, body):
    http.add(responses.POST, SSO_URL, json=body)
    with pytest.raises(SsoError) as caught:
        client.refresh(REFRESH)
    assert type(caught.value) is SsoError


def test_invalid_client_pauses_sso_for_every_process(http, conn, database_url):
    """The app's credentials are wrong: after one 401 no process calls SSO again until the pause ends."""
    from limits import SharedLimits

    http.add(responses.POST, SSO_URL, json=GRANT)
    http.add(responses.POST, SSO_URL, status=401, json={"error": "invalid_client"})
    processes = [SharedLimits(lambda: db.connect(database_url, autocommit=True)) for _ in range(2)]
    one, other = (EsiClient(SETTINGS, limits=limits, sleep=lambda s: None) for limits in processes)
    processes[0].settle(processes[0].take("killmail"), 420, {"X-ESI-Error-Limit-Reset": "50"})
    assert one.refresh(REFRESH).refresh_token == GRANT["refresh_token"]  # ESI's error limit does not hold SSO
    with pytest.raises(InvalidClient):
        one.refresh(REFRESH)
    with pytest.raises(esi.Paused) as caught:
        other.refresh("another pilot's token")
    assert caught.value.bucket == esi.SSO_BUCKET
    assert len(http.calls) == 2
    (state,) = db.limit_state(conn, [esi.SSO_BUCKET])
    assert (state["last_status"], round((state["paused_until"] - datetime.now(UTC)).total_seconds(), -1)) \
        == (401, esi.INVALID_CLIENT_PAUSE)
    for limits in processes:
        limits.close()


def test_invalid_grant_is_not_an_invalid_client_and_vice_versa():
    assert not issubclass(InvalidGrant, InvalidClient) and not issubclass(InvalidClient, InvalidGrant)
    assert issubclass(InvalidGrant, SsoError) and issubclass(InvalidClient, SsoError)


def test_refresh_5xx_is_retried_then_an_sso_error(http, client):
    http.add(responses.POST, SSO_URL, status=503, body="busy")
    with pytest.raises(SsoError) as caught:
        client.refresh(REFRESH)
    assert caught.value.status == 503
    assert len(http.calls) == esi.SERVER_RETRIES


UNSENDABLE = ["bad\ntoken-SECRET-5", "bad\r\ntoken-SECRET-5", "bad\u2603token-SECRET-5", "bad token-SECRET-5",
              "bad\x00token-SECRET-5", "bad\u00e9token-SECRET-5"]


@pytest.mark.parametrize("token", UNSENDABLE)
def test_a_token_no_header_can_carry_is_never_sent_nor_quoted(sim, token):
    """http.client would refuse it with the whole header, the token, in its message."""
    client = EsiClient(dataclasses.replace(SETTINGS, esi_base_url=sim.base_url), sleep=lambda s: None)
    sim.add_pilots(n_pilots=1, n_killmails=0, revoked=0, corporations=1)
    with pytest.raises(Unauthorized) as caught:
        client.list_recent(character_id=sim.pilots()[0]["character_id"], token=token)
    assert "SECRET" not in str(caught.value) and "SECRET" not in repr(caught.value)
    assert client.calls == Counter()  # nothing sent, no error spent


@pytest.mark.parametrize("token", UNSENDABLE)
def test_an_access_token_no_header_can_carry_is_no_grant(http, client, token):
    http.add(responses.POST, SSO_URL, json={**GRANT, "access_token": token})
    with pytest.raises(SsoError) as caught:
        client.refresh(REFRESH)
    assert type(caught.value) is SsoError and "SECRET" not in str(caught.value)


def test_token_grant_repr_hides_the_tokens():
    text = repr(TokenGrant("access-SECRET", "refresh-SECRET", 1199))
    assert "SECRET" not in text and "1199" in text


# ------------------------------------------------------------------------------------------------ limits

def test_limits_are_told_about_every_list_call_under_the_character_bucket(http, sleeps):
    limits = RecordingLimits()
    client = EsiClient(SETTINGS, limits=limits, sleep=sleeps.append)
    add_page(http, 1, refs(1), **{"X-Pages": "2", "X-Ratelimit-Remaining": "28"})
    add_page(http, 2, refs(2), **{"X-Pages": "2", "X-Ratelimit-Remaining": "26"})

    client.list_recent(character_id=42, token=TOKEN)

    assert [e[:3] for e in limits.events] == [
        ("take", "char-killmail:42"), ("settle", "char-killmail:42", 200),
        ("take", "char-killmail:42"), ("settle", "char-killmail:42", 200),
    ]
    assert [e[3]["X-Ratelimit-Remaining"] for e in limits.events if e[0] == "settle"] == ["28", "26"]


def test_corporation_list_bucket_is_per_character_whose_token_is_used(http):
    limits = RecordingLimits()
    client = EsiClient(SETTINGS, limits=limits)
    add_page(http, 1, refs(1), url=CORP_LIST_URL)
    client.list_recent(character_id=42, token=TOKEN, corporation_id=77)
    assert limits.events[0] == ("take", "corp-killmail:42")


def test_detail_calls_are_taken_from_the_killmail_bucket(http):
    limits = RecordingLimits()
    client = EsiClient(SETTINGS, limits=limits)
    http.add(responses.GET, DETAIL_URL, json=KILLMAIL)
    client.get_killmail(1001, "abc123")
    assert [e[:3] for e in limits.events] == [("take", "killmail"), ("settle", "killmail", 200)]


def test_limits_see_error_statuses_every_retry_and_timeouts_as_zero(http, sleeps):
    limits = RecordingLimits()
    client = EsiClient(SETTINGS, limits=limits, sleep=sleeps.append)
    http.add(responses.GET, DETAIL_URL, status=502)
    http.add(responses.GET, DETAIL_URL, body=requests.Timeout("slow"))
    http.add(responses.GET, DETAIL_URL, status=429, headers={"Retry-After": "5"})

    with pytest.raises(RateLimited):
        client.get_killmail(1001, "abc123")

    assert [e[:3] for e in limits.events] == [
        ("take", "killmail"), ("settle", "killmail", 502),
        ("take", "killmail"), ("settle", "killmail", 0),
        ("take", "killmail"), ("settle", "killmail", 429),
    ]
    assert limits.events[-1][3]["Retry-After"] == "5"


def test_sso_calls_have_a_bucket_of_their_own(http):
    limits = RecordingLimits()
    client = EsiClient(SETTINGS, limits=limits)
    http.add(responses.POST, SSO_URL, json=GRANT)
    client.refresh(REFRESH)
    assert [e[:3] for e in limits.events] == [("take", esi.SSO_BUCKET), ("settle", esi.SSO_BUCKET, 200)]


def test_a_paused_bucket_stops_the_call_before_it_is_sent(http):
    class PausedLimits(RecordingLimits):
        def take(self, bucket):
            raise Paused("paused", bucket=bucket, until=None)

    client = EsiClient(SETTINGS, limits=PausedLimits())
    with pytest.raises(Paused):
        client.get_killmail(1001, "abc123")
    assert len(http.calls) == 0


# ------------------------------------------------------------------------------------------------ counting

def test_take_calls_counts_by_group_and_status_and_resets(http, sleeps):
    client = EsiClient(SETTINGS, sleep=sleeps.append)
    add_page(http, 1, refs(1))
    http.add(responses.GET, DETAIL_URL, json=KILLMAIL)
    http.add(responses.GET, DETAIL_URL, json=KILLMAIL)
    http.add(responses.GET, "https://esi.example/killmails/1002/bad/", status=422)
    http.add(responses.GET, CHARACTER_URL, body=requests.Timeout("slow"))
    http.add(responses.GET, CHARACTER_URL, json={"name": "Pilot"})
    http.add(responses.POST, SSO_URL, json=GRANT)

    client.list_recent(character_id=42, token=TOKEN)
    client.get_killmail(1001, "abc123")
    client.get_killmail(1001, "abc123")
    with pytest.raises(InvalidHash):
        client.get_killmail(1002, "bad")
    client.get_character(42)
    client.refresh(REFRESH)

    assert client.take_calls() == Counter({
        ("char-killmail", 200): 1, ("killmail", 200): 2, ("killmail", 422): 1,
        ("character", 0): 1, ("character", 200): 1, ("sso", 200): 1,
    })
    assert client.take_calls() == Counter()


# ------------------------------------------------------------------------------------------------ no tokens

def _failures(http, client):
    """Run every failing call once, yielding the exception of each."""
    http.add(responses.GET, LIST_URL, status=403, json={"error": "token is not valid for scope(s)"})
    http.add(responses.GET, LIST_URL, status=401, json={"error": "authorization not valid"})
    http.add(responses.GET, LIST_URL, status=500, json={"error": "oops"})
    http.add(responses.GET, LIST_URL, status=500, json={"error": "oops"})
    http.add(responses.GET, LIST_URL, status=500, json={"error": "oops"})
    for _ in range(esi.SERVER_RETRIES):
        http.add(responses.GET, LIST_URL, body=requests.Timeout("slow"))
    http.add(responses.GET, LIST_URL, body="not json")
    http.add(responses.GET, LIST_URL, status=420, json={"error": "error limited"})
    http.add(responses.GET, LIST_URL, status=429)
    for _ in range(7):
        try:
            client.list_recent(character_id=42, token=TOKEN, etag='"e"')
        except esi.EsiError as exc:
            yield exc
    http.add(responses.POST, SSO_URL, status=400, json={"error": "invalid_grant", "error_description": "expired"})
    http.add(responses.POST, SSO_URL, status=401, json={"error": "invalid_client"})
    http.add(responses.POST, SSO_URL, status=400, json={"error": "invalid_request"})
    http.add(responses.POST, SSO_URL, status=200, json={"access_token": GRANT["access_token"]})
    for _ in range(4):
        try:
            client.refresh(REFRESH)
        except esi.EsiError as exc:
            yield exc


def test_no_token_appears_in_exception_messages(http, client):
    errors = list(_failures(http, client))
    assert len(errors) == 11
    secrets = [TOKEN, REFRESH, GRANT["access_token"], SETTINGS.eve_client_secret,
               base64.b64encode(b"id:secret").decode()]
    for exc in errors:
        for text in (str(exc), repr(exc)):
            for secret in secrets:
                assert secret not in text, (type(exc).__name__, text)


def test_killmail_list_is_plain_data():
    listing = KillmailList([(1, "a")], '"e"', 300.0, 1)
    assert listing.refs == [(1, "a")] and listing.pages == 1


# ------------------------------------------------------------------------------------------------ size and time

def serve_once(head: bytes, body: bytes, *, chunk: int = 1 << 16, pause: float = 0.0) -> tuple[str, threading.Event]:
    """A one-connection HTTP server that sends `head` then `body` in chunks with a pause between them; its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve():
        connection, _ = listener.accept()
        with connection, listener:
            connection.recv(65536)
            try:
                connection.sendall(head)
                for start in range(0, len(body), chunk):
                    if done.wait(pause):
                        return
                    connection.sendall(body[start:start + chunk])
            except OSError:  # the client hung up: what a deadline or a size cap does
                pass
            done.wait(5)

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", done


def test_an_answer_that_trickles_past_the_deadline_is_a_server_error(monkeypatch, sleeps):
    monkeypatch.setattr(esi, "REQUEST_DEADLINE", 1.0)
    body = json.dumps(KILLMAIL).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    url, done = serve_once(head, body, chunk=2, pause=0.05)   # every read within the timeout, the whole never
    client = EsiClient(dataclasses.replace(SETTINGS, esi_base_url=url), sleep=sleeps.append)
    started = time.monotonic()
    try:
        with pytest.raises(ServerError, match="deadline"):
            client.get_killmail(1001, "abc123")
    finally:
        done.set()
    assert time.monotonic() - started < 3
    assert sleeps == []   # the deadline is the whole call's: no retry after it


@responses.activate
def test_a_wait_for_esis_limits_is_no_part_of_the_calls_deadline(monkeypatch, sleeps):
    """A spent detail bucket can hold a call back for two windows before it goes; its answer, once paid for,
    is read and kept, not refused for a deadline that ran while the call waited."""
    now = [1000.0]
    monkeypatch.setattr(esi, "time", types.SimpleNamespace(monotonic=lambda: now[0]))

    class WaitingLimits(RecordingLimits):
        def take(self, bucket):
            now[0] += 2 * esi.REQUEST_DEADLINE       # two windows of a spent bucket
            return super().take(bucket)

    responses.get("https://esi.example/killmails/1001/abc123/", json=KILLMAIL)
    client = EsiClient(SETTINGS, limits=WaitingLimits(), sleep=sleeps.append)
    assert client.get_killmail(1001, "abc123")[0]["killmail_id"] == KILLMAIL["killmail_id"]


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_an_answer_larger_than_the_cap_is_malformed(monkeypatch, sleeps, encoding):
    monkeypatch.setattr(esi, "MAX_BODY_BYTES", 100_000)
    text = json.dumps({**KILLMAIL, "padding": " " * 200_000}).encode()
    body = gzip.compress(text) if encoding == "gzip" else text   # the cap counts what it decompresses to
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: %s\r\n"
            b"Content-Length: %d\r\n\r\n" % (encoding.encode(), len(body)))
    url, done = serve_once(head, body, chunk=4096)
    client = EsiClient(dataclasses.replace(SETTINGS, esi_base_url=url), sleep=sleeps.append)
    try:
        with pytest.raises(MalformedResponse, match="larger than"):
            client.get_killmail(1001, "abc123")
    finally:
        done.set()


def test_the_size_cap_is_generous_for_real_answers():
    assert esi.MAX_BODY_BYTES >= 8 * 1024 * 1024   # a list page is ~100 kB, the biggest fights' details a few MB


NAMES_URL = "https://esi.example/universe/names/"
PRICES_URL = "https://esi.example/markets/prices/"


def answer_names(unknown: set[int]):
    """A callback answering POST /universe/names/ as ESI does: 404 for a batch holding any unknown id."""
    def callback(request):
        ids = json.loads(request.body)
        if unknown & set(ids):
            return 404, {}, json.dumps({"error": "Ensure all IDs are valid before resolving."})
        return 200, {}, json.dumps([{"id": i, "category": "character", "name": f"N{i}"} for i in ids])
    return callback


def test_names_are_resolved_in_batches_of_a_thousand_under_the_universe_bucket(http):
    http.add_callback(responses.POST, NAMES_URL, callback=answer_names(set()))
    limits = RecordingLimits()
    client = EsiClient(SETTINGS, limits=limits)
    names, unknown = client.resolve_names(range(1, 1502))
    assert sorted(n["id"] for n in names) == list(range(1, 1502)) and unknown == []
    assert sorted(len(json.loads(c.request.body)) for c in http.calls) == [501, 1000]
    assert [e[:3] for e in limits.events] == [("take", "universe"), ("settle", "universe", 200)] * 2
    assert http.calls[0].request.headers["Content-Type"] == "application/json"


def test_a_refused_names_batch_is_split_until_the_unknown_ids_stand_alone(http):
    http.add_callback(responses.POST, NAMES_URL, callback=answer_names({3, 6}))
    names, unknown = EsiClient(SETTINGS).resolve_names([1, 2, 3, 4, 5, 6, 7, 8])
    assert sorted(n["id"] for n in names) == [1, 2, 4, 5, 7, 8] and sorted(unknown) == [3, 6]
    sent = [tuple(json.loads(c.request.body)) for c in http.calls]
    assert len(sent) == len(set(sent))  # no refused batch is ever sent again
    # 404s: the eight, both fours, the pairs (3, 4) and (5, 6), then 3 and 6 alone
    assert sum(c.response.status_code == 404 for c in http.calls) == 7


def test_market_prices_with_etag_and_expiry(http):
    http.add(responses.GET, PRICES_URL, json=[{"type_id": 1, "average_price": 2.5, "adjusted_price": 3},
                                              {"type_id": 2, "adjusted_price": 7}, {"bogus": 1}],
             headers={"ETag": '"p1"', "Date": DATE, "Expires": EXPIRES})
    http.add(responses.GET, PRICES_URL, status=304, headers={"Date": DATE, "Expires": EXPIRES})
    client = EsiClient(SETTINGS)
    first = client.get_market_prices()
    assert first == esi.MarketPrices([{"type_id": 1, "average_price": 2.5, "adjusted_price": 3},
                                      {"type_id": 2, "adjusted_price": 7}], '"p1"', 120.0)
    assert client.get_market_prices(etag='"p1"') == esi.MarketPrices(None, '"p1"', 120.0)
    assert http.calls[1].request.headers["If-None-Match"] == '"p1"'


def test_names_stop_splitting_after_a_bounded_number_of_refusals(http):
    http.add_callback(responses.POST, NAMES_URL, callback=answer_names(set(range(1, 100))))
    names, unknown = EsiClient(SETTINGS).resolve_names(range(1, 100))
    assert len(http.calls) == esi.NAMES_REFUSALS and names == [] and len(unknown) < 99


def test_a_systems_region_is_read_through_its_constellation_under_the_universe_bucket(http):
    http.add(responses.GET, "https://esi.example/universe/systems/30002053/",
             json={"system_id": 30002053, "name": "Hek", "constellation_id": 20000303, "security_status": 0.5})
    http.add(responses.GET, "https://esi.example/universe/constellations/20000303/",
             json={"constellation_id": 20000303, "name": "Hed", "region_id": 10000042, "systems": [30002053]})
    limits = RecordingLimits()
    client = EsiClient(SETTINGS, limits=limits)
    assert client.get_region_of(client.get_constellation_of(30002053)) == 10000042
    assert [e[:3] for e in limits.events] == [("take", "universe"), ("settle", "universe", 200)] * 2
    assert all(c.request.headers["X-Compatibility-Date"] for c in http.calls)


@pytest.mark.parametrize(("status", "body", "error"), [
    (404, {"error": "Solar system not found"}, NotFound),
    (200, {"system_id": 30002053, "constellation_id": "20000303"}, MalformedResponse),
    (200, [20000303], MalformedResponse),
])
def test_a_system_esi_does_not_place_raises_an_esi_error(http, status, body, error):
    http.add(responses.GET, "https://esi.example/universe/systems/30002053/", status=status, json=body)
    with pytest.raises(error):
        EsiClient(SETTINGS).get_constellation_of(30002053)


def test_the_adapter_looks_each_origins_pool_up_once_and_again_once_it_is_closed():
    adapter = esi.OriginPools()

    def pool(url):
        request = requests.Request("GET", url).prepare()
        return adapter.get_connection_with_tls_context(request, True)

    first = pool("http://127.0.0.1:9/characters/1/killmails/recent/?page=1")
    assert pool("http://127.0.0.1:9/killmails/2/abc/") is first
    assert pool("http://127.0.0.1:10/killmails/2/abc/") is not first       # another origin, another pool
    assert pool("https://127.0.0.1:9/killmails/2/abc/") is not first       # another scheme too
    adapter.poolmanager.clear()  # as when the pool manager evicts a pool: it forgets it, and closes it
    first.close()
    again = pool("http://127.0.0.1:9/killmails/2/abc/")
    assert again is not first and again.pool is not None
